//! Seeded data generators shared by the benches: the city simulator's records, gathered into
//! raw batches per topic.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{
    DataType, Field, Schema, SchemaRef, TimeUnit, TimestampMillisecondType,
};
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
/// 8 192 simulated records (seed 42) decoded once and repeated, each copy moved on in event
/// time to a minute after the one before, so that the records go on in time as a stream's do
/// (plain repeats would be older than the watermark: late).
pub fn decoded_batches(topic: SimTopic, schema: &str, n: usize) -> Vec<RecordBatch> {
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
    advancing(out)
}

/// `batches` (copies of one batch) moved on in event time, each copy starting a minute after
/// the one before ends.
fn advancing(batches: Vec<RecordBatch>) -> Vec<RecordBatch> {
    let mut next_from = i64::MIN;
    batches
        .into_iter()
        .map(|b| {
            let i = b.schema().index_of("event_time").expect("event_time");
            let t = cast(
                b.column(i),
                &DataType::Timestamp(TimeUnit::Millisecond, None),
            )
            .expect("time");
            let t = t.as_primitive::<TimestampMillisecondType>();
            let (lo, hi) = (
                t.iter().flatten().min().unwrap_or(0),
                t.iter().flatten().max().unwrap_or(0),
            );
            let shift = if next_from == i64::MIN {
                0
            } else {
                next_from - lo
            };
            next_from = hi + shift + 60_000;
            let moved: ArrayRef = Arc::new(t.unary::<_, TimestampMillisecondType>(|v| v + shift));
            let moved = cast(&moved, b.schema().field(i).data_type()).expect("time");
            let mut columns = b.columns().to_vec();
            columns[i] = moved;
            RecordBatch::try_new(b.schema(), columns).expect("batch")
        })
        .collect()
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
