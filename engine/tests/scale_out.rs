//! Scale-out: two service processes in one consumer group share a query's input partitions,
//! each partition's state checkpointed to a directory both reach. A second process joining
//! takes half the partitions with their state (checkpointed by the first when it let them
//! go); the first, killed with SIGKILL, leaves its partitions to the survivor, which restores
//! their last checkpoints and replays from there. The output, read with read_committed, holds
//! every window exactly once with the counts of a batch computation over the same events.
//!
//! A second query totals the same events per ward (of the segment, from the reference table):
//! its groups span input partitions, so it is repartitioned through an internal topic keyed
//! by ward; its output too is complete and duplicate-free against the batch computation.

mod common;

use std::io::Read;
use std::time::Duration;

use common::*;

const EVENTS: usize = 3_000;
const OUTPUT: &str = "scale.counts";

const WARDS: &str = "scale.wards";

fn log_text(path: &std::path::Path) -> anyhow::Result<String> {
    let mut text = String::new();
    std::fs::File::open(path)?.read_to_string(&mut text)?;
    Ok(text)
}

#[test]
fn two_processes_share_the_partitions_and_the_survivor_takes_over_with_state() -> anyhow::Result<()>
{
    let dir = tempfile::tempdir()?;
    let checkpoints = dir.path().join("checkpoints");
    scale_out(dir.path(), |_| (checkpoints.clone(), String::new()))
}

/// The same on two machines' worth of storage: each process has a checkpoint directory of
/// its own, and both keep checkpoints in one bucket of an S3-protocol server
/// (`checkpoint.url`), from which each restores the partitions it is handed.
#[test]
fn two_processes_with_their_own_disks_share_state_through_an_s3_bucket() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (_s3, endpoint) = s3_server(dir.path(), "state")?;
    let root = dir.path().to_path_buf();
    scale_out(dir.path(), |name| {
        (
            root.join(format!("{name}-local-checkpoints")),
            format!(
                "url = \"s3://state/urbanstream\"\n[checkpoint.store]\n\
                 aws_endpoint = \"{endpoint}\"\naws_allow_http = \"true\"\n\
                 aws_region = \"us-east-1\"\naws_access_key_id = \"test\"\n\
                 aws_secret_access_key = \"test\"\n"
            ),
        )
    })?;
    // The state went to the bucket, not to the processes' own directories.
    for name in ["a", "b"] {
        let local = root.join(format!("{name}-local-checkpoints"));
        assert!(
            !local.exists() || std::fs::read_dir(&local)?.next().is_none(),
            "process {name} wrote checkpoints to its own disk"
        );
    }
    Ok(())
}

/// Two processes share a query's partitions; the first is killed. `storage` gives each
/// process (`a`, `b`) its checkpoint directory and lines to add to its `[checkpoint]`.
fn scale_out(
    dir: &std::path::Path,
    storage: impl Fn(&str) -> (std::path::PathBuf, String),
) -> anyhow::Result<()> {
    let (_broker, brokers) = broker(dir)?;
    let api = Api::new()?;
    let mut members = Vec::new();
    for name in ["a", "b"] {
        let port = free_port()?;
        let config = dir.join(format!("{name}.toml"));
        let (checkpoints, extra) = storage(name);
        std::fs::write(
            &config,
            service_config(
                &brokers,
                "scale",
                port,
                &dir.join(format!("{name}.catalog.json")),
                &checkpoints,
                &format!("scale-{name}"),
            ) + &extra,
        )?;
        members.push((
            config,
            dir.join(format!("{name}.log")),
            format!("http://127.0.0.1:{port}"),
        ));
    }
    let (a_config, a_log, a) = &members[0];
    let (b_config, b_log, b) = &members[1];
    let sql = counts_query(OUTPUT);

    let mut first = serve(a_config, a_log)?;
    api.wait_live(a)?;
    api.create(a, "counts", &sql)?;
    api.create(a, "wards", &ward_query(WARDS))?;
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
    api.create(b, "wards", &ward_query(WARDS))?;
    // Each query's group splits its partitions: the counts query's input partitions; the
    // ward query's input partitions and those of its repartition topic.
    for (query, partitions) in [("counts", PARTITIONS), ("wards", 2 * PARTITIONS)] {
        wait_until("the two processes never shared the partitions", || {
            let (x, y) = (api.assigned(a, query), api.assigned(b, query));
            x > 0 && y > 0 && x + y == i64::from(partitions)
        })?;
    }
    eprintln!(
        "shared: counts {}/{}, wards {}/{} partitions (first/second)",
        api.assigned(a, "counts"),
        api.assigned(b, "counts"),
        api.assigned(a, "wards"),
        api.assigned(b, "wards")
    );

    for (query, how) in [("counts", "per_partition"), ("wards", "repartitioned")] {
        let status = api.status(b, query).unwrap_or_default();
        assert_eq!(status["partitioning"], how, "{query}: {status}");
    }

    // Both process for a while; then the first dies.
    std::thread::sleep(Duration::from_secs(4));
    first.0.kill()?; // SIGKILL
    first.0.wait()?;
    wait_until("the survivor never took over every partition", || {
        api.assigned(b, "counts") == i64::from(PARTITIONS)
            && api.assigned(b, "wards") == i64::from(2 * PARTITIONS)
    })?;
    producer
        .join()
        .map_err(|_| anyhow::anyhow!("producer panicked"))??;

    let (checked, checked_wards) = assert_counts_exactly_once(&brokers, t0, EVENTS, OUTPUT, WARDS)?;
    // The numbered events are in order in each partition: none of them is late, before or
    // after the repartitioning.
    let late = read_output(&brokers, "city.late")?;
    assert!(
        late.is_empty(),
        "events found late: {:?}",
        &late[..late.len().min(5)]
    );

    let (a_text, b_text) = (log_text(a_log)?, log_text(b_log)?);
    let handed_on = a_text.matches("partitions handed on").count();
    let restored = b_text.matches("state restored from checkpoint").count();
    let restored_by = |query: &str| {
        b_text
            .matches(&format!("state restored from checkpoint name=\"{query}\""))
            .count()
    };
    eprintln!(
        "segment windows {checked} and ward windows {checked_wards} exactly once; first \
         process handed partitions on {handed_on} times, second restored {restored} \
         partition checkpoints"
    );
    // The first checkpointed what it let go when the second joined; the second restored
    // those and, after the kill, the first's last checkpoints of the rest, for both queries.
    assert!(
        handed_on >= 1,
        "the first process never let partitions go:\n{a_text}"
    );
    assert!(
        restored_by("counts") >= 1 && restored_by("wards") >= 1,
        "the second process restored {restored} partition checkpoints:\n{b_text}"
    );

    Ok(())
}
