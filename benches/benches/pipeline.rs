//! The whole pipeline in process, without a broker, in input records per second: simulated
//! camera, detector and air records (the simulator's own mix and order, about 600 k
//! records, seed 42) are decoded into Arrow in raw batches of up to 8 192 per topic, run
//! through every default query of `queries/` (congestion and air indicators, the alert
//! queries), and their results are conformed to the sink topics and encoded as JSON rows.
//! `encode/congestion` measures the last step alone over the congestion indicators.
#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::collections::HashMap;
use std::sync::Arc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use datafusion::arrow::record_batch::RecordBatch;
use urbanstream::decode::JsonDecoder;
use urbanstream::pipeline::Topics;
use urbanstream::plan::{city_context, default_queries};
use urbanstream::reference::ReferenceData;
use urbanstream::schema::SchemaRegistry;
use urbanstream::simulate::{CitySimulator, SimConfig, SimTopic};
use urbanstream::sink::{conform_stream, encode_json_rows};
use urbanstream::source::RawBatch;

const RECORDS: usize = 600_000;
const BATCH: usize = 8_192;

/// (stream table, Avro schema) of each simulated topic.
fn stream_of(topic: SimTopic) -> (&'static str, &'static str) {
    match topic {
        SimTopic::Camera => ("camera_events", "camera_event"),
        SimTopic::Detector => ("detector_readings", "detector_reading"),
        SimTopic::Air => ("air_readings", "air_reading"),
        SimTopic::Parking => ("parking_readings", "parking_reading"),
        SimTopic::Water => ("water_levels", "water_level"),
        SimTopic::Report => ("citizen_reports", "citizen_report"),
    }
}

/// The simulator's records in its order, cut into raw batches per topic.
fn raw_batches() -> Vec<(SimTopic, RawBatch)> {
    let reference = Arc::new(ReferenceData::embedded().expect("reference"));
    let mut sim = CitySimulator::new(
        SimConfig {
            seed: 42,
            detections_per_sim_second: 2000.0,
            malformed_share: 0.0,
            ..SimConfig::default()
        },
        reference,
    );
    let mut out = Vec::new();
    let mut open: HashMap<SimTopic, RawBatch> = HashMap::new();
    let mut n = 0usize;
    while n < RECORDS {
        for record in sim.next_tick() {
            let batch = open
                .entry(record.topic)
                .or_insert_with(|| RawBatch::new(format!("{:?}", record.topic)));
            batch.push(
                0,
                n as i64,
                Some(record.key.as_bytes()),
                Some(&record.payload),
            );
            n += 1;
            if batch.len() == BATCH {
                let full = std::mem::replace(batch, RawBatch::new(format!("{:?}", record.topic)));
                out.push((record.topic, full));
            }
        }
        // Each simulated second ends a micro-batch, as a consumer poll would.
        for (topic, batch) in open.drain() {
            if !batch.is_empty() {
                out.push((topic, batch));
            }
        }
    }
    out
}

fn pipeline(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let schemas = SchemaRegistry::embedded().expect("schemas");
    let input = raw_batches();
    let records: usize = input.iter().map(|(_, b)| b.len()).sum();
    let decoders: HashMap<SimTopic, JsonDecoder> =
        [SimTopic::Camera, SimTopic::Detector, SimTopic::Air]
            .into_iter()
            .map(|t| {
                (
                    t,
                    JsonDecoder::new(schemas.get(stream_of(t).1).expect("schema")),
                )
            })
            .collect();
    let run = |collect_congestion: bool| {
        runtime.block_on(async {
            let ctx = city_context(&Topics::default(), &schemas).expect("city");
            let mut queries = default_queries(&ctx).await.expect("queries");
            let mut bytes = 0usize;
            let mut congestion: Vec<RecordBatch> = Vec::new();
            let now = urbanstream::pipeline::epoch_ms();
            for (topic, raw) in &input {
                let decoded = decoders[topic].decode(raw).expect("decode");
                let partitions = vec![0; decoded.batch.num_rows()];
                for (name, q) in queries.iter_mut() {
                    if q.source().name != stream_of(*topic).0 {
                        continue;
                    }
                    let out = q
                        .process(&decoded.batch, &partitions, None, now)
                        .await
                        .expect("process");
                    let Some(sink) = q.sink().cloned() else {
                        continue;
                    };
                    for rows in out.rows {
                        let conformed = conform_stream(&rows, &sink.topic_schema).expect("conform");
                        bytes += encode_json_rows(&conformed).expect("encode").0.len();
                        if collect_congestion && name == "congestion_minute" {
                            congestion.push(rows);
                        }
                    }
                }
            }
            (bytes, congestion)
        })
    };
    let (_, congestion) = run(true);
    let mut group = c.benchmark_group("pipeline");
    group.sample_size(10);
    group.throughput(Throughput::Elements(records as u64));
    group.bench_function("decode_default_queries_encode", |b| {
        b.iter(|| {
            let (bytes, _) = run(false);
            assert!(bytes > 0);
            bytes
        })
    });
    group.finish();

    let sink = schemas.get("congestion_indicator").expect("schema");
    let rows: usize = congestion.iter().map(|b| b.num_rows()).sum();
    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements(rows as u64));
    group.bench_function("congestion", |b| {
        b.iter_batched(
            || congestion.clone(),
            |batches| {
                let mut bytes = 0;
                for rows in &batches {
                    let conformed = conform_stream(rows, &sink).expect("conform");
                    bytes += encode_json_rows(&conformed).expect("encode").0.len();
                }
                bytes
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
