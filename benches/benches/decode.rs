//! Decode stage: records into Arrow batches, per topic, in records per second: JSON
//! (`decode/<schema>`), the same records as Confluent-framed Avro (`decode/avro_<schema>`)
//! and as Protobuf messages of the city's `.proto` (`decode/protobuf_<schema>`); JSON and
//! Avro also with 1 % malformed records spread through a camera batch; and the same rows
//! encoded from JSON to Avro (`decode/avro_encode_<schema>`), as an Avro sink does.
#![allow(missing_docs)] // criterion_group! generates undocumented items

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::sync::Arc;

use datafusion::arrow::datatypes::TimeUnit;
use urbanstream::decode::avro::embedded_avsc;
use urbanstream::decode::protobuf::city_message;
use urbanstream::decode::{
    AvroEncoder, Codecs, Descriptors, JsonDecoder, ProtobufEncoder, Registry, TopicDecoder,
};
use urbanstream::pipeline::Format;
use urbanstream::schema::SchemaRegistry;
use urbanstream::simulate::SimTopic;
use urbanstream::source::RawBatch;
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
    avro(&mut group, &registry);
    protobuf(&mut group, &registry);
    group.finish();
}

/// The same simulated records as Protobuf messages (plain), decoded by reflection.
fn protobuf(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    schemas: &SchemaRegistry,
) {
    let descriptors = Arc::new(Descriptors::embedded().expect("descriptors"));
    let codecs = Codecs {
        registry: None,
        descriptors: Some(descriptors.clone()),
    };
    for (topic, schema, n) in [
        (SimTopic::Camera, "camera_event", 8192),
        (SimTopic::Detector, "detector_reading", 4096),
        (SimTopic::Air, "air_reading", 4096),
    ] {
        let json = simulated_batch(topic, n);
        let message = city_message(schema).expect("message");
        let encoder = ProtobufEncoder::new(descriptors.message(&message).expect("message"), None);
        let mut raw = RawBatch::new(schema);
        for i in 0..json.len() {
            let value = encoder.encode_json(json.value(i)).expect("encode");
            raw.push(json.partitions[i], i as i64, json.key(i), Some(&value));
        }
        let decoder = TopicDecoder::new(
            Format::Protobuf,
            schemas.get(schema).expect(schema),
            Some(("event_time", TimeUnit::Millisecond)),
            &codecs,
            Some(message.as_str()),
        )
        .expect("decoder");
        group.throughput(Throughput::Elements(raw.len() as u64));
        group.bench_function(format!("protobuf_{schema}"), |b| {
            b.iter(|| {
                let decoded = decoder.decode(&raw).expect("decode");
                assert_eq!(decoded.batch.num_rows(), raw.len());
                decoded
            })
        });
    }
}

/// The same simulated records as Avro, written with the topic schemas (registered in a
/// directory registry) and decoded with the writer schema looked up by id.
fn avro(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    schemas: &SchemaRegistry,
) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("dir");
    let registry = Arc::new(Registry::dir(dir.path()).expect("registry"));
    for (topic, schema, n) in [
        (SimTopic::Camera, "camera_event", 8192),
        (SimTopic::Detector, "detector_reading", 4096),
        (SimTopic::Air, "air_reading", 4096),
    ] {
        let json = simulated_batch(topic, n);
        let encoder = runtime
            .block_on(AvroEncoder::registered(
                &registry,
                schema,
                embedded_avsc(schema).expect("avsc"),
            ))
            .expect("encoder");
        let mut raw = RawBatch::new(schema);
        let mut malformed = RawBatch::new(schema);
        for i in 0..json.len() {
            let value = encoder.encode_json(json.value(i)).expect("encode");
            raw.push(json.partitions[i], i as i64, json.key(i), Some(&value));
            let value = if i % 100 == 50 {
                value[..value.len() / 2].to_vec()
            } else {
                value
            };
            malformed.push(json.partitions[i], i as i64, json.key(i), Some(&value));
        }
        let decoder = TopicDecoder::new(
            Format::Avro,
            schemas.get(schema).expect(schema),
            Some(("event_time", TimeUnit::Millisecond)),
            &Codecs {
                registry: Some(registry.clone()),
                descriptors: None,
            },
            None,
        )
        .expect("decoder");
        runtime.block_on(decoder.prepare(&raw)).expect("schemas");
        group.throughput(Throughput::Elements(raw.len() as u64));
        // The other way: rows as the sink writes them (JSON) to framed Avro, as an Avro sink
        // and `replay --format avro` do.
        group.bench_function(format!("avro_encode_{schema}"), |b| {
            b.iter(|| {
                (0..json.len())
                    .map(|i| encoder.encode_json(json.value(i)).expect("encode").len())
                    .sum::<usize>()
            })
        });
        group.bench_function(format!("avro_{schema}"), |b| {
            b.iter(|| {
                let decoded = decoder.decode(&raw).expect("decode");
                assert_eq!(decoded.batch.num_rows(), raw.len());
                decoded
            })
        });
        if topic == SimTopic::Camera {
            group.bench_function("avro_camera_event_1pct_malformed", |b| {
                b.iter(|| {
                    let decoded = decoder.decode(&malformed).expect("decode");
                    assert_eq!(
                        decoded.rejects.len(),
                        (50..malformed.len()).step_by(100).len()
                    );
                    decoded
                })
            });
        }
    }
}

criterion_group!(benches, decode);
criterion_main!(benches);
