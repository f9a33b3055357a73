//! Arbitrary bytes, cut into records by a length byte before each, through each input topic's
//! Avro decoder (the topic schema registered as id 1; a record whose first byte is odd gets a
//! valid Confluent header, so the body is fuzzed too) and Protobuf decoder (the city's
//! messages): they must never panic, and every record must come out decoded or rejected,
//! exactly once.
#![no_main]

use std::sync::{Arc, OnceLock};

use datafusion::arrow::datatypes::TimeUnit;
use libfuzzer_sys::fuzz_target;
use urbanstream::decode::avro::embedded_avsc;
use urbanstream::decode::protobuf::city_message;
use urbanstream::decode::{Codecs, Descriptors, Registry, TopicDecoder};
use urbanstream::pipeline::Format;
use urbanstream::schema::SchemaRegistry;
use urbanstream::source::RawBatch;

struct Fixture {
    runtime: tokio::runtime::Runtime,
    decoders: Vec<TopicDecoder>,
    _dir: tempfile::TempDir,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("dir");
        let schemas = SchemaRegistry::embedded().expect("embedded schemas load");
        let mut decoders = Vec::new();
        for name in ["camera_event", "detector_reading", "air_reading"] {
            // One registry per schema, so that each topic's schema has id 1.
            let registry = Arc::new(Registry::dir(dir.path().join(name)).expect("registry"));
            runtime
                .block_on(registry.register(name, embedded_avsc(name).expect("avsc")))
                .expect("registered");
            let codecs = Codecs {
                registry: Some(registry),
                descriptors: Some(Arc::new(Descriptors::embedded().expect("descriptors"))),
            };
            for format in [Format::Avro, Format::Protobuf] {
                decoders.push(
                    TopicDecoder::new(
                        format,
                        schemas.get(name).expect("schema exists"),
                        Some(("event_time", TimeUnit::Millisecond)),
                        &codecs,
                        city_message(name).as_deref(),
                    )
                    .expect("decoder"),
                );
            }
        }
        Fixture {
            runtime,
            decoders,
            _dir: dir,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let mut raw = RawBatch::new("fuzz");
    let mut rest = data;
    let mut i = 0;
    while let Some((&len, tail)) = rest.split_first() {
        let (record, tail) = tail.split_at((len as usize / 2).min(tail.len()));
        let mut value = Vec::new();
        if len % 2 == 1 {
            value.extend_from_slice(&[0, 0, 0, 0, 1]);
        }
        value.extend_from_slice(record);
        raw.push(0, i, None, Some(&value));
        i += 1;
        rest = tail;
    }
    let f = fixture();
    for decoder in &f.decoders {
        f.runtime
            .block_on(decoder.prepare(&raw))
            .expect("the registry answers");
        let decoded = decoder.decode(&raw).expect("a batch never fails whole");
        assert_eq!(decoded.rows.len() + decoded.rejects.len(), raw.len());
        assert_eq!(decoded.batch.num_rows(), decoded.rows.len());
    }
});
