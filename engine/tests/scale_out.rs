//! Scale-out: two service processes in one consumer group share a query's input partitions,
//! each partition's state checkpointed to a directory both reach. A second process joining
//! takes half the partitions with their state (checkpointed by the first when it let them
//! go); the first, killed with SIGKILL, leaves its partitions to the survivor, which restores
//! their last checkpoints and replays from there. The output, read with read_committed, holds
//! every window exactly once with the counts of a batch computation over the same events.
//!
//! A query grouping by something other than its input's key cannot keep its state per input
//! partition; it is refused a second process with a message saying so instead of publishing
//! partial groups.

mod common;

use std::io::Read;
use std::time::Duration;

use common::*;

const EVENTS: usize = 3_000;
const OUTPUT: &str = "scale.counts";

/// Per ward (of the segment, from the reference table) and 10 s: groups that span input
/// partitions.
const WARD_QUERY: &str = "CREATE EXTERNAL TABLE ward_out (ward_id VARCHAR, \
     window_start TIMESTAMP NOT NULL, window_end TIMESTAMP NOT NULL, events BIGINT NOT NULL, \
     revision INT NOT NULL, is_final BOOLEAN NOT NULL) \
     STORED AS KAFKA OPTIONS ('topic' 'scale.wards', 'key' 'ward_id'); \
     INSERT INTO ward_out SELECT s.ward_id, window_start, window_end, count(*) AS events \
     FROM camera_events c LEFT JOIN segments s ON c.segment_id = s.segment_id \
     GROUP BY tumble(c.event_time, INTERVAL '10 seconds'), s.ward_id";

fn log_text(path: &std::path::Path) -> anyhow::Result<String> {
    let mut text = String::new();
    std::fs::File::open(path)?.read_to_string(&mut text)?;
    Ok(text)
}

#[test]
fn two_processes_share_the_partitions_and_the_survivor_takes_over_with_state() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let (_broker, brokers) = broker(dir.path())?;
    let checkpoints = dir.path().join("checkpoints");
    let api = Api::new()?;
    let mut members = Vec::new();
    for name in ["a", "b"] {
        let port = free_port()?;
        let config = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &config,
            service_config(
                &brokers,
                "scale",
                port,
                &dir.path().join(format!("{name}.catalog.json")),
                &checkpoints,
                &format!("scale-{name}"),
            ),
        )?;
        members.push((
            config,
            dir.path().join(format!("{name}.log")),
            format!("http://127.0.0.1:{port}"),
        ));
    }
    let (a_config, a_log, a) = &members[0];
    let (b_config, b_log, b) = &members[1];
    let sql = counts_query(OUTPUT);

    let mut first = serve(a_config, a_log)?;
    api.wait_live(a)?;
    api.create(a, "counts", &sql)?;
    api.create(a, "wards", WARD_QUERY)?;
    wait_until("the first process never got the partitions", || {
        api.assigned(a, "counts") == i64::from(PARTITIONS)
    })?;

    let t0 = first_window()?;
    let producer_brokers = brokers.clone();
    let producer = std::thread::spawn(move || produce(&producer_brokers, t0, EVENTS));

    // A second process joins after a few seconds: the group splits the partitions.
    std::thread::sleep(Duration::from_secs(4));
    let _second = serve(b_config, b_log)?;
    api.wait_live(b)?;
    api.create(b, "counts", &sql)?;
    api.create(b, "wards", WARD_QUERY)?;
    wait_until("the two processes never shared the partitions", || {
        let (x, y) = (api.assigned(a, "counts"), api.assigned(b, "counts"));
        x > 0 && y > 0 && x + y == i64::from(PARTITIONS)
    })?;
    eprintln!(
        "shared: first {} partitions, second {}",
        api.assigned(a, "counts"),
        api.assigned(b, "counts")
    );

    // The ward query keeps one state for all partitions: a process that has to give some
    // away fails it with the reason rather than publish partial groups.
    let refused = |base: &str| {
        api.status(base, "wards").is_some_and(|q| {
            q["state"] == "FAILED"
                && q["error"].as_str().is_some_and(|e| {
                    e.contains("groups by something other than its input topic's key")
                })
        })
    };
    wait_until("no process refused the ward query a second process", || {
        refused(a) || refused(b)
    })?;

    // Both process for a while; then the first dies.
    std::thread::sleep(Duration::from_secs(4));
    first.0.kill()?; // SIGKILL
    first.0.wait()?;
    wait_until("the survivor never took over every partition", || {
        api.assigned(b, "counts") == i64::from(PARTITIONS)
    })?;
    producer
        .join()
        .map_err(|_| anyhow::anyhow!("producer panicked"))??;

    // The windows closed by the flush events (watermark: flush time minus the 5 s delay).
    let watermark = t0 + EVENTS as i64 * STEP_MS + 60_000 - 5_000;
    let expected = expected(t0, EVENTS, watermark);
    let checked = assert_exactly_once(&brokers, OUTPUT, &expected)?;

    let (a_text, b_text) = (log_text(a_log)?, log_text(b_log)?);
    let handed_on = a_text.matches("partitions handed on").count();
    let restored = b_text.matches("state restored from checkpoint").count();
    eprintln!(
        "windows {checked} exactly once; first process handed partitions on {handed_on} \
         times, second restored {restored} partition checkpoints"
    );
    // The first checkpointed what it let go when the second joined; the second restored
    // those and, after the kill, the first's last checkpoints of the rest.
    assert!(
        handed_on >= 1,
        "the first process never let partitions go:\n{a_text}"
    );
    assert!(
        restored >= usize::try_from(PARTITIONS)?,
        "the second process restored {restored} partition checkpoints:\n{b_text}"
    );

    Ok(())
}
