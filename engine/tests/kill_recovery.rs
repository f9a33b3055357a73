//! Crash recovery with exactly-once output: the service, killed with SIGKILL at random points
//! and started again ten times while numbered events stream in, publishes every window of
//! two queries exactly once, with the counts a batch computation over the same events gives:
//! one per segment (the input's key, one state per input partition) and one per ward (through
//! the `segments` lookup, repartitioned through an internal topic).
//!
//! Processes: `urbanstream broker` (the broker keeps its data while the service dies),
//! `urbanstream serve` (checkpoints every second, `exactly_once = true`), and this test as the
//! producer of numbered events and the read_committed consumer of the output.
//!
//! The embedded broker is librdkafka's mock cluster, which does not enforce transactions (an
//! open or aborted transaction is visible to read_committed there): this test shows the
//! engine's recovery and its read-back of what was published (no window twice, none lost),
//! not transactional isolation. `real_broker.rs` shows exactly-once on a broker that
//! implements transactions.

mod common;

use std::io::Read;
use std::time::Duration;

use common::*;
use rand::{Rng, SeedableRng};

const EVENTS: usize = 3_000;
const OUTPUT: &str = "kill.counts";
const WARDS: &str = "kill.wards";

#[test]
fn a_sigkilled_service_publishes_every_window_exactly_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (_broker, brokers) = broker(dir.path())?;
    let (m, mut service, api) = counting_service(dir.path(), &brokers, "kill", OUTPUT)?;
    let base = &m.base;
    api.create(base, "wards", &ward_query(WARDS))?;

    // Numbered events over about 30 s, while the service is killed and started again.
    let t0 = first_window()?;
    let producer_brokers = brokers.clone();
    let producer = std::thread::spawn(move || produce(&producer_brokers, t0, EVENTS));

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for kill in 0..10 {
        // The restarted member gets its partitions back (at once: static membership): a kill
        // lands while the restarted query processes.
        wait_until("the queries never got their partitions back", || {
            api.assigned(base, "counts") == i64::from(PARTITIONS)
                && api.assigned(base, "wards") == i64::from(2 * PARTITIONS)
        })?;
        std::thread::sleep(Duration::from_millis(rng.random_range(200..2_500)));
        kill_and_restart(&mut service, &m, &api)?;
        eprintln!("kill {} done", kill + 1);
    }
    producer
        .join()
        .map_err(|_| anyhow::anyhow!("producer panicked"))??;

    let (checked, checked_wards) = assert_counts_exactly_once(&brokers, t0, EVENTS, OUTPUT, WARDS)?;
    let mut log_text = String::new();
    std::fs::File::open(&m.log)?.read_to_string(&mut log_text)?;
    // One line per input partition restored.
    let restored = log_text.matches("state restored from checkpoint").count();
    let held_back = log_text.matches("will not be published again").count();
    eprintln!(
        "segment windows {checked} and ward windows {checked_wards} exactly once, partition \
         restores {restored}, restores that held back published outputs {held_back}"
    );
    // Most kills land while the query runs (some while the service is still starting): it
    // recovered from its checkpoints again and again.
    assert!(
        restored >= 5 * usize::try_from(PARTITIONS)?,
        "the service restored {restored} partition checkpoints:\n{log_text}"
    );
    Ok(())
}
