//! Hostile input: the decoders never panic on arbitrary bytes and account for every record
//! (decoded or rejected, exactly once); through the embedded broker, a stream with 10 %
//! garbage delivers every good record and dead-letters every bad one with its provenance.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use proptest::prelude::*;
use serde_json::json;
use urbanstream::decode::JsonDecoder;
use urbanstream::pipeline::{Pipeline, PipelineConfig, PipelineStats, Topics};
use urbanstream::schema::SchemaRegistry;
use urbanstream::source::RawBatch;
use urbanstream_tests::{TestCluster, read_json, read_until_quiet};

/// A valid camera detection.
fn camera_event(i: u64) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "camera_id": format!("cam-{:04}", i % 50), "segment_id": format!("seg-{}", i % 7),
        "event_time": 1_767_222_000_000_i64 + (i % 1_000_000) as i64 * 10, "kind": "detection",
        "vehicle_class": "motorbike", "speed_kmh": 31.5, "confidence": 0.9
    }))
    .expect("json")
}

/// Records: either a valid event or arbitrary bytes (which may, rarely, be valid JSON of
/// another shape).
fn records() -> impl Strategy<Value = Vec<(bool, Vec<u8>)>> {
    prop::collection::vec(
        prop_oneof![
            3 => any::<u64>().prop_map(|i| (true, camera_event(i))),
            1 => prop::collection::vec(any::<u8>(), 0..300).prop_map(|b| (false, b)),
            1 => "[ -~]{0,200}".prop_map(|s| (false, s.into_bytes())),
            1 => any::<u64>().prop_map(|i| {
                // A valid event cut short, or with a field of the wrong type.
                let mut v = camera_event(i);
                if i % 2 == 0 {
                    v.truncate((i % v.len() as u64) as usize);
                    (false, v)
                } else {
                    let s = String::from_utf8_lossy(&v).replace("31.5", "\"fast\"");
                    (false, s.into_bytes())
                }
            }),
        ],
        0..120,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Every schema's decoder takes any bytes without panicking; each record is decoded or
    /// rejected, exactly once; valid events are always decoded.
    #[test]
    fn decoders_account_for_every_record(records in records()) {
        let schemas = SchemaRegistry::embedded().expect("schemas");
        for schema in ["camera_event", "detector_reading", "air_reading"] {
            let decoder = JsonDecoder::new(schemas.get(schema).expect("schema"));
            let mut raw = RawBatch::new("t");
            for (i, (_, bytes)) in records.iter().enumerate() {
                raw.push(0, i as i64, Some(b"k"), Some(bytes));
            }
            let decoded = decoder.decode(&raw).expect("a batch of records never fails whole");
            let mut seen: Vec<u32> = decoded.rows.clone();
            seen.extend(decoded.rejects.iter().map(|r| r.index));
            seen.sort_unstable();
            let all: Vec<u32> = (0..records.len() as u32).collect();
            prop_assert_eq!(seen, all);
            prop_assert_eq!(decoded.batch.num_rows(), decoded.rows.len());
            if schema == "camera_event" {
                for (i, (valid, _)) in records.iter().enumerate() {
                    if *valid {
                        prop_assert!(decoded.rows.contains(&(i as u32)), "valid record {} rejected", i);
                    }
                }
            }
        }
    }
}

/// The `n`th bad record: binary, wrong type, truncated, a long key (8 KB), and now and then a
/// value too big to decode (300 KB; rare, since the embedded broker drops old log segments of
/// a partition that grows large).
fn garbage(n: u64) -> (String, Vec<u8>) {
    if n % 100 == 3 {
        let mut huge = camera_event(n);
        huge.truncate(huge.len() - 1);
        huge.extend(format!(r#","direction":"{}"}}"#, "x".repeat(300_000)).into_bytes());
        return ("k".into(), huge);
    }
    match n % 4 {
        0 => ("k".into(), b"\x00\xff\xfe not json".to_vec()),
        1 => ("k".into(), br#"{"camera_id": 7}"#.to_vec()),
        2 => ("k".into(), camera_event(n)[..20].to_vec()),
        _ => ("k".repeat(8_192), camera_event(n)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_percent_garbage_loses_no_good_record() -> anyhow::Result<()> {
    garbage_through_the_broker(2_000, |i| i % 10 == 3, garbage).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_garbage_does_not_stall_good_records() -> anyhow::Result<()> {
    garbage_through_the_broker(1_000, |i| i % 10 != 3, garbage).await
}

/// A key of nearly a megabyte (the broker's default record limit): its DLQ record, which
/// copies the key in part into its value, must not carry it whole as its own Kafka key too,
/// or the DLQ record is over the limit and cannot be published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_too_big_to_copy_whole_is_cut_in_its_dlq_record() -> anyhow::Result<()> {
    garbage_through_the_broker(
        30,
        |i| i % 10 == 3,
        |n| ("k".repeat(960_000), camera_event(n)),
    )
    .await
}

/// `total` camera records through a query, those for which `bad` holds replaced by garbage:
/// every good one reaches the output, every bad one the DLQ with its provenance, a big one
/// with its size named and its bytes copied in part.
async fn garbage_through_the_broker(
    total: u64,
    bad: impl Fn(u64) -> bool,
    garbage: impl Fn(u64) -> (String, Vec<u8>),
) -> anyhow::Result<()> {
    let cluster = TestCluster::start(2)?;
    cluster.broker.create_topic("test.passed", 1)?;
    let topics = Topics::default();
    let mut bad_offsets = BTreeSet::new();
    let mut good = 0usize;
    for i in 0..total {
        let partition = (i % 2) as i32;
        let (key, value) = if bad(i) {
            garbage(bad_offsets.len() as u64)
        } else {
            good += 1;
            ("k".to_string(), camera_event(i))
        };
        let (p, offset) = cluster
            .produce(&topics.camera, partition, &key, &value)
            .await?;
        if bad(i) {
            bad_offsets.insert((p, offset));
        }
    }
    let stats = Arc::new(PipelineStats::new());
    let stop = Arc::new(AtomicBool::new(false));
    let config = passthrough(&cluster.brokers, "garbage", "passthrough", "passed");
    let pipeline = Pipeline::new(config, stats.clone()).await?;
    let task = tokio::spawn(pipeline.run(stop.clone()));

    let passed = read_json(
        &cluster.consumer("test.passed")?,
        good,
        Duration::from_secs(60),
    )
    .await?;
    let dead = read_json(
        &cluster.consumer(&topics.dlq)?,
        bad_offsets.len(),
        Duration::from_secs(60),
    )
    .await?;
    stop.store(true, Ordering::Relaxed);
    task.await??;

    assert_eq!(passed.len(), good);
    assert_eq!(stats.dlq.load(Ordering::Relaxed), bad_offsets.len() as u64);
    let dead_offsets: BTreeSet<(i32, i64)> = dead
        .iter()
        .map(|(key, v)| {
            assert!(
                key.as_ref().is_none_or(|k| k.len() <= 64 * 1024),
                "a DLQ record's key of {} bytes",
                key.as_ref().map_or(0, String::len)
            );
            assert_eq!(v["topic"], topics.camera.as_str());
            assert_eq!(v["query"], "passthrough");
            assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
            let payload = v["payload"].as_str().unwrap_or_default();
            assert!(
                payload.len() <= 4 * 64 * 1024 / 3 + 4,
                "{} bytes",
                payload.len()
            );
            let error = v["error"].as_str().unwrap_or_default();
            if error.starts_with("record value of") {
                assert!(error.contains("payload copied in part"), "{error}");
            }
            (
                v["partition"].as_i64().unwrap_or(-1) as i32,
                v["offset"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    assert_eq!(dead_offsets, bad_offsets);
    let oversize = dead
        .iter()
        .filter(|(_, v)| {
            v["error"]
                .as_str()
                .is_some_and(|e| e.contains("over the limit"))
        })
        .count();
    assert!(oversize > 0, "no record was refused for its size");
    Ok(())
}

/// A result row larger than the producer's largest record fails the query with the reason,
/// once: taken for a broker's passing trouble, it was retried without end, and every retry
/// published the rows before it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_row_over_the_record_limit_fails_the_query_with_the_reason() -> anyhow::Result<()>
{
    let cluster = TestCluster::start(1)?;
    cluster.broker.create_topic("test.padded", 1)?;
    let topics = Topics::default();
    for i in 0..20 {
        cluster
            .produce(&topics.camera, 0, "k", &camera_event(i))
            .await?;
    }
    let stats = Arc::new(PipelineStats::new());
    let stop = Arc::new(AtomicBool::new(false));
    let config = one_query(
        &cluster.brokers,
        "padded",
        "padded",
        "CREATE EXTERNAL TABLE padded (camera_id VARCHAR NOT NULL, pad VARCHAR NOT NULL)
         STORED AS KAFKA OPTIONS ('topic' 'test.padded', 'format' 'json');
         INSERT INTO padded SELECT camera_id,
           CASE WHEN camera_id = 'cam-0012' THEN repeat('x', 1100000) ELSE 'ok' END AS pad
         FROM camera_events",
    );
    let pipeline = Pipeline::new(config, stats.clone()).await?;
    let run = tokio::time::timeout(Duration::from_secs(60), pipeline.run(stop.clone())).await;
    stop.store(true, Ordering::Relaxed);
    let error = match run {
        Ok(Err(e)) => e,
        Ok(Ok(())) => anyhow::bail!("the query ran on"),
        Err(_) => anyhow::bail!("the query neither failed nor finished in 60 s"),
    };
    assert!(!error.is_transient(), "{error}");
    let message = error.to_string();
    assert!(
        message.contains("a result row for topic test.padded is 1100")
            && message.contains("more than the largest record the producer sends"),
        "{message}"
    );
    Ok(())
}

/// A new query begins reading a partition at its log's start while the log is full and
/// records keep arriving: the broker deletes the log's old end before the query reaches it
/// (the embedded broker keeps 5 MiB a partition). Those records were never the query's to
/// read, as it starts at whatever the log holds: their gap is recorded in the DLQ and the
/// query reads on, rather than fail at once ("data loss") and again when re-created; with
/// checkpoints (the service's default) as without.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_query_reads_on_when_the_log_start_passes_it_in_its_backlog() -> anyhow::Result<()> {
    for checkpointed in [false, true] {
        let dir = tempfile::tempdir()?;
        let (result, dead) = backlog_cut(checkpointed.then_some(dir.path()), 20).await?;
        result.map_err(|e| anyhow::anyhow!("checkpointed {checkpointed}: {e}"))?;
        let gaps: Vec<&serde_json::Value> = dead.iter().filter(|v| v["stage"] == "gap").collect();
        assert!(!gaps.is_empty(), "no gap record: {dead:?}");
        for gap in gaps {
            let (from, end) = (
                gap["offset"].as_i64().unwrap_or(-1),
                gap["gap_end"].as_i64().unwrap_or(-1),
            );
            // The backlog was offsets up to 80.
            assert!(0 <= from && from < end && end <= 80, "{gap}");
            assert!(
                gap["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("backlog the query began with")),
                "{gap}"
            );
        }
    }
    Ok(())
}

/// The same, but the deletion reaches past the backlog, into records that arrived after the
/// query began: those were the query's to read, and it fails with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_deleted_past_the_backlog_fail_the_query() -> anyhow::Result<()> {
    let (result, dead) = backlog_cut(None, 120).await?;
    let error = result.err().unwrap_or_default();
    assert!(error.contains("data loss"), "{error}");
    assert!(dead.iter().all(|v| v["stage"] != "gap"), "{dead:?}");
    Ok(())
}

/// A log of 80 records of 100 KB (more than the 5 MiB a partition keeps), a new query over it
/// whose first fetches fail, and `more` records produced once it holds the partition: how
/// the query ended (an error's text), and the DLQ's records.
async fn backlog_cut(
    checkpoints: Option<&std::path::Path>,
    more: u64,
) -> anyhow::Result<(Result<(), String>, Vec<serde_json::Value>)> {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let cluster = TestCluster::start(1)?;
    cluster.broker.create_topic("test.backlog", 1)?;
    let topics = Topics::default();
    let pad = "x".repeat(100_000);
    let padded = |i: u64| -> Vec<u8> {
        let mut v: serde_json::Value = serde_json::from_slice(&camera_event(i)).expect("json");
        v["pad"] = json!(pad);
        serde_json::to_vec(&v).expect("json")
    };
    for i in 0..80 {
        cluster.produce(&topics.camera, 0, "k", &padded(i)).await?;
    }
    // The query's first fetches fail (the broker answers "not the leader"): the records
    // produced once it holds the partition delete its log start before it reads it.
    cluster.broker.fail_requests(
        RDKafkaApiKey::Fetch,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 10],
    );
    let stats = Arc::new(PipelineStats::new());
    let stop = Arc::new(AtomicBool::new(false));
    let mut config = passthrough(&cluster.brokers, "backlog", "backlog", "backlog");
    if let Some(dir) = checkpoints {
        config.checkpoint = Some(urbanstream::pipeline::CheckpointSettings {
            location: urbanstream::checkpoint::Location::Local(dir.to_path_buf()),
            interval: Duration::from_secs(1),
            retain: 2,
            transactional_id: None,
            read_back_from_log_start: false,
            claim: false,
        });
    }
    let pipeline = Pipeline::new(config, stats.clone()).await?;
    let mut task = tokio::spawn(pipeline.run(stop.clone()));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while stats.assigned_partitions.load(Ordering::Relaxed) == 0 {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the partition was not assigned"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 80..80 + more {
        cluster.produce(&topics.camera, 0, "k", &padded(i)).await?;
    }
    let marker = json!({
        "camera_id": "cam-done", "segment_id": "seg-1", "event_time": 1_767_222_100_000_i64,
        "kind": "detection", "vehicle_class": "car", "speed_kmh": 20.0, "confidence": 0.9
    });
    cluster
        .produce(&topics.camera, 0, "k", &serde_json::to_vec(&marker)?)
        .await?;
    let output = cluster.consumer("test.backlog")?;
    let result = tokio::select! {
        read = async {
            loop {
                let batch = read_json(&output, 1, Duration::from_secs(60)).await?;
                if batch.iter().any(|(_, v)| v["camera_id"] == "cam-done") {
                    return anyhow::Ok(());
                }
            }
        } => {
            read?;
            stop.store(true, Ordering::Relaxed);
            (&mut task).await?.map_err(|e| e.to_string())
        }
        ended = &mut task => Err(match ended? {
            Ok(()) => "the query ended".to_string(),
            Err(e) => e.to_string(),
        }),
    };
    let dead = read_until_quiet(
        &cluster.consumer(&topics.dlq)?,
        Duration::from_secs(3),
        Duration::from_secs(10),
    )
    .await;
    Ok((result, dead))
}

/// A pipeline of one query, `sql` named `name`, in consumer group `group`.
fn one_query(brokers: &str, group: &str, name: &str, sql: &str) -> PipelineConfig {
    let mut config = PipelineConfig::new(brokers);
    config.group_id = group.into();
    config.default_queries = false;
    config.name = Some(name.into());
    config.queries = vec![(name.into(), sql.into())];
    config
}

/// A pipeline of one query, `name`, that writes each camera event's id and time to topic
/// `test.{table}`.
fn passthrough(brokers: &str, group: &str, name: &str, table: &str) -> PipelineConfig {
    one_query(
        brokers,
        group,
        name,
        &format!(
            "CREATE EXTERNAL TABLE {table} (camera_id VARCHAR NOT NULL, \
               event_time TIMESTAMP NOT NULL)
             STORED AS KAFKA OPTIONS ('topic' 'test.{table}', 'format' 'json');
             INSERT INTO {table} SELECT camera_id, event_time FROM camera_events"
        ),
    )
}
