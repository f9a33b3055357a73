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
use urbanstream_tests::{TestCluster, read_json};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_percent_garbage_loses_no_good_record() -> anyhow::Result<()> {
    let cluster = TestCluster::start(2)?;
    cluster.broker.create_topic("test.passed", 1)?;
    let topics = Topics::default();
    let total = 2_000u64;
    let mut bad_offsets = BTreeSet::new();
    let mut good = 0usize;
    for i in 0..total {
        let partition = (i % 2) as i32;
        let value = if i % 10 == 3 {
            match i % 3 {
                0 => b"\x00\xff\xfe not json".to_vec(),
                1 => br#"{"camera_id": 7}"#.to_vec(),
                _ => camera_event(i)[..20].to_vec(),
            }
        } else {
            good += 1;
            camera_event(i)
        };
        let (p, offset) = cluster
            .produce(&topics.camera, partition, "k", &value)
            .await?;
        if i % 10 == 3 {
            bad_offsets.insert((p, offset));
        }
    }
    let stats = Arc::new(PipelineStats::new());
    let stop = Arc::new(AtomicBool::new(false));
    let mut config = PipelineConfig::new(&cluster.brokers);
    config.group_id = "garbage".into();
    config.default_queries = false;
    config.name = Some("passthrough".into());
    config.queries = vec![(
        "passthrough".into(),
        "CREATE EXTERNAL TABLE passed (camera_id VARCHAR NOT NULL, event_time TIMESTAMP NOT NULL)
         STORED AS KAFKA OPTIONS ('topic' 'test.passed', 'format' 'json');
         INSERT INTO passed SELECT camera_id, event_time FROM camera_events"
            .into(),
    )];
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
        .map(|(_, v)| {
            assert_eq!(v["topic"], topics.camera.as_str());
            assert_eq!(v["query"], "passthrough");
            assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
            assert!(v["payload"].is_string(), "{v}");
            (
                v["partition"].as_i64().unwrap_or(-1) as i32,
                v["offset"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    assert_eq!(dead_offsets, bad_offsets);
    Ok(())
}
