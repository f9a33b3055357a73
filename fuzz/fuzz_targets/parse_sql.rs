//! Arbitrary text through the SQL front end (statement splitting, the KAFKA table rewrite,
//! DataFusion's parser): an error is fine, a panic is not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use urbanstream::plan::stream::StreamContext;

fuzz_target!(|data: &[u8]| {
    if let Ok(sql) = std::str::from_utf8(data) {
        let _ = StreamContext::parse(sql);
    }
});
