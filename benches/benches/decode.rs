//! Decode stage: JSON records into Arrow batches, per topic, in records per second.
#![allow(missing_docs)] // criterion_group! generates undocumented items

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use urbanstream::decode::JsonDecoder;
use urbanstream::schema::SchemaRegistry;
use urbanstream::simulate::SimTopic;
use urbanstream_benches::simulated_batch;

fn decode(c: &mut Criterion) {
    let registry = SchemaRegistry::embedded().expect("schemas");
    let mut group = c.benchmark_group("decode");
    for (topic, schema, n) in [
        (SimTopic::Camera, "camera_event", 8192),
        (SimTopic::Detector, "detector_reading", 4096),
        (SimTopic::Air, "air_reading", 4096),
    ] {
        let raw = simulated_batch(topic, n);
        let decoder = JsonDecoder::new(registry.get(schema).expect(schema));
        group.throughput(Throughput::Elements(raw.len() as u64));
        group.bench_function(schema, |b| {
            b.iter(|| {
                let decoded = decoder.decode(&raw).expect("decode");
                assert_eq!(decoded.batch.num_rows(), raw.len());
                decoded
            })
        });
    }
    // The same camera batch with 1 % malformed records spread through it: the slow path.
    let mut raw = simulated_batch(SimTopic::Camera, 8192);
    let mut mixed = urbanstream::source::RawBatch::new("mixed");
    for i in 0..raw.len() {
        let value: &[u8] = if i % 100 == 50 {
            b"{\"camera_id\": 1"
        } else {
            raw.value(i)
        };
        mixed.push(0, i as i64, None, Some(value));
    }
    raw = mixed;
    let decoder = JsonDecoder::new(registry.get("camera_event").expect("camera"));
    group.throughput(Throughput::Elements(raw.len() as u64));
    group.bench_function("camera_event_1pct_malformed", |b| {
        b.iter(|| decoder.decode(&raw).expect("decode"))
    });
    group.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
