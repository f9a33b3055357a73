//! Arbitrary bytes, cut into records at newlines, through each input topic's JSON decoder:
//! it must never panic, and every record must come out decoded or rejected, exactly once.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use urbanstream::decode::JsonDecoder;
use urbanstream::schema::SchemaRegistry;
use urbanstream::source::RawBatch;

fn decoders() -> &'static [JsonDecoder] {
    static DECODERS: OnceLock<Vec<JsonDecoder>> = OnceLock::new();
    DECODERS.get_or_init(|| {
        let schemas = SchemaRegistry::embedded().expect("embedded schemas load");
        ["camera_event", "detector_reading", "air_reading"]
            .into_iter()
            .map(|name| JsonDecoder::new(schemas.get(name).expect("schema exists")))
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let mut raw = RawBatch::new("fuzz");
    for (i, record) in data.split(|b| *b == b'\n').enumerate() {
        raw.push(0, i as i64, None, Some(record));
    }
    for decoder in decoders() {
        let decoded = decoder.decode(&raw).expect("a batch never fails whole");
        assert_eq!(decoded.rows.len() + decoded.rejects.len(), raw.len());
        assert_eq!(decoded.batch.num_rows(), decoded.rows.len());
    }
});
