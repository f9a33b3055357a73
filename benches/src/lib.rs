//! Seeded data generators shared by the benches: the city simulator's records, gathered into
//! raw batches per topic.

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use urbanstream::reference::ReferenceData;
use urbanstream::simulate::{CitySimulator, SimConfig, SimTopic};
use urbanstream::source::RawBatch;

/// `n` simulated records of `topic` (seed 42, no malformed records), as one raw batch, with
/// partitions cycling over 0..4.
pub fn simulated_batch(topic: SimTopic, n: usize) -> RawBatch {
    let reference = Arc::new(ReferenceData::embedded().expect("embedded reference data"));
    let config = SimConfig {
        seed: 42,
        detections_per_sim_second: 2000.0,
        malformed_share: 0.0,
        ..SimConfig::default()
    };
    let mut sim = CitySimulator::new(config, reference);
    let mut batch = RawBatch::new(format!("{topic:?}"));
    let mut i: i64 = 0;
    while batch.len() < n {
        for record in sim.next_tick() {
            if record.topic == topic && batch.len() < n {
                batch.push(
                    (i % 4) as i32,
                    i,
                    Some(record.key.as_bytes()),
                    Some(&record.payload),
                );
                i += 1;
            }
        }
    }
    batch
}

/// `n` decoded records of `topic` (Avro schema `schema`) as Arrow batches of up to 8 192 rows:
/// 8 192 simulated records (seed 42) decoded once and repeated, as a stream query sees them.
pub fn decoded_batches(
    topic: SimTopic,
    schema: &str,
    n: usize,
) -> Vec<datafusion::arrow::record_batch::RecordBatch> {
    let registry = urbanstream::schema::SchemaRegistry::embedded().expect("schemas");
    let decoder = urbanstream::decode::JsonDecoder::new(registry.get(schema).expect(schema));
    let raw = simulated_batch(topic, 8192);
    let batch = decoder.decode(&raw).expect("decode").batch;
    let mut out = Vec::new();
    let mut rows = 0;
    while rows < n {
        let take = batch.num_rows().min(n - rows);
        out.push(batch.slice(0, take));
        rows += take;
    }
    out
}

/// The stream query of `select` over the stream `ev` ([`key_time_value_schema`]; event time
/// `event_time`, no watermark delay).
pub async fn key_time_value_query(select: &str) -> urbanstream::plan::stream::StreamQuery {
    use urbanstream::plan::stream::StreamContext;
    let ctx = StreamContext::new();
    for sql in [
        "CREATE EXTERNAL TABLE ev (k VARCHAR NOT NULL, event_time TIMESTAMP NOT NULL, v DOUBLE) \
         STORED AS KAFKA OPTIONS ('topic' 'ev', 'event_time' 'event_time', 'watermark_delay' '0s')",
        select,
    ] {
        for statement in StreamContext::parse(sql).expect("parse") {
            if let Some(q) = ctx.plan(statement).await.expect("plan") {
                return q;
            }
        }
    }
    panic!("no query planned")
}

/// The stream `ev (k VARCHAR NOT NULL, event_time TIMESTAMP NOT NULL, v DOUBLE)` of the window
/// and checkpoint benches, as Arrow (SQL's VARCHAR is a string view in DataFusion).
pub fn key_time_value_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("k", DataType::Utf8View, false),
        Field::new(
            "event_time",
            DataType::Timestamp(TimeUnit::Millisecond, None),
            false,
        ),
        Field::new("v", DataType::Float64, true),
    ]))
}
