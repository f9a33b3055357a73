//! Seeded data generators shared by the benches: the city simulator's records, gathered into
//! raw batches per topic.

use std::sync::Arc;

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
