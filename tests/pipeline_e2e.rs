//! The whole path through the embedded broker: hand-written camera events (in order, out of
//! order, an incident, malformed ones, a late one) are produced to two partitions; the
//! pipeline runs; the indicator, DLQ and late topics are read back and compared exactly.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;
use urbanstream::pipeline::{Pipeline, PipelineConfig, PipelineStats, Topics};
use urbanstream_tests::{TestCluster, read_json, read_more};

/// 2026-01-01 06:00 Hanoi, on a minute boundary.
const T0: i64 = 1_767_222_000_000;

fn detection(segment: &str, t: i64, class: &str, speed: Option<f64>) -> Vec<u8> {
    let mut v = json!({
        "camera_id": "cam-0001", "segment_id": segment, "event_time": t,
        "kind": "detection", "vehicle_class": class, "confidence": 0.9
    });
    if let Some(s) = speed {
        v["speed_kmh"] = json!(s);
    }
    serde_json::to_vec(&v).expect("json")
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The congestion indicator of one segment-minute from its detections' speeds and PCU factors,
/// computed here by the definitions of INDICATORS.md §3.
fn minute(
    segment: &str,
    start: i64,
    speeds: &[Option<f64>],
    pcus: &[f64],
    motorbikes: usize,
    (lanes, free_flow, capacity): (f64, f64, f64),
    los: &str,
) -> serde_json::Value {
    let n = pcus.len() as f64;
    let known: Vec<f64> = speeds.iter().flatten().copied().collect();
    let mean = known.iter().sum::<f64>() / known.len() as f64;
    let space_mean = known.len() as f64 / known.iter().map(|s| 1.0 / s).sum::<f64>();
    let flow_pcu = pcus.iter().sum::<f64>() * 60.0;
    json!({"segment_id": segment, "window_start": start, "window_end": start + 60_000,
        "vehicles": pcus.len(), "mean_speed_kmh": mean, "motorbike_share": motorbikes as f64 / n,
        "space_mean_speed_kmh": space_mean, "flow_veh_h": n * 60.0, "flow_pcu_h": flow_pcu,
        "density_pcu_km_ln": flow_pcu / space_mean / lanes, "v_c": flow_pcu / capacity,
        "tti": (free_flow / space_mean).max(1.0), "los": los, "revision": 0, "is_final": true})
}

/// Equal JSON, numbers up to floating-point summation order.
fn close(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0),
            _ => x == y,
        },
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| close(v, w)))
        }
        _ => a == b,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn camera_events_to_indicators_dlq_and_late() -> anyhow::Result<()> {
    let cluster = TestCluster::start(2)?;
    let topics = Topics::default();
    let cam = topics.camera.as_str();
    let (a, b) = ("kim_ma_w", "xuan_thuy");

    // Phase 1. Partition 0 carries segment a, partition 1 segment b.
    let truncated = &detection(a, T0 + 3_000, "car", Some(1.0))[..40];
    let hovercraft = br#"{"camera_id":"cam-0003","segment_id":"xuan_thuy","event_time":1767222003000,"vehicle_class":"hovercraft","confidence":0.9}"#;
    let p0: Vec<Vec<u8>> = vec![
        detection(a, T0 + 1_000, "motorbike", Some(30.0)),
        detection(a, T0 + 10_000, "car", Some(50.0)),
        detection(a, T0 + 5_000, "motorbike", Some(20.0)), // out of order, within the delay
        serde_json::to_vec(&json!({"camera_id": "cam-0001", "segment_id": a,
            "event_time": T0 + 30_000, "kind": "collision", "severity": 3, "confidence": 0.8}))?,
        detection(a, T0 + 61_000, "motorbike", Some(10.0)),
        truncated.to_vec(),
        detection(a, T0 + 125_000, "car", Some(40.0)), // advances partition 0
    ];
    let p1: Vec<Vec<u8>> = vec![
        detection(b, T0 + 2_000, "bus", Some(25.0)),
        detection(b, T0 + 59_999, "motorbike", None),
        detection(b, T0 + 62_000, "car", Some(44.0)),
        hovercraft.to_vec(),
        Vec::new(),
        detection(b, T0 + 126_000, "car", Some(42.0)), // advances partition 1
    ];
    for v in &p0 {
        cluster.produce(cam, 0, a, v).await?;
    }
    for v in &p1 {
        cluster.produce(cam, 1, b, v).await?;
    }

    let stats = Arc::new(PipelineStats::new());
    let stop = Arc::new(AtomicBool::new(false));
    let mut config = PipelineConfig::new(&cluster.brokers);
    config.group_id = "e2e".into();
    let pipeline = Pipeline::new(config, stats.clone()).await?;
    let task = tokio::spawn(pipeline.run(stop.clone()));

    // Watermark = min(T0+125 s, T0+126 s) − 5 s = T0+120 s: the first two minutes close.
    let indicators = cluster.consumer(&topics.congestion)?;
    let mut rows = read_json(&indicators, 4, Duration::from_secs(60)).await?;
    rows.sort_by_key(|(_, v)| {
        (
            v["window_start"].as_i64(),
            v["segment_id"].as_str().map(String::from),
        )
    });
    // Kim Mã W: 6 lanes, 50 km/h free flow, 10 200 PCU/h; Xuân Thủy: 4, 40, 6 800.
    let (kim_ma, xuan_thuy) = ((6.0, 50.0, 10_200.0), (4.0, 40.0, 6_800.0));
    let expected = vec![
        (
            a,
            minute(
                a,
                T0,
                &[Some(30.0), Some(50.0), Some(20.0)],
                &[0.3, 1.0, 0.3],
                2,
                kim_ma,
                "C",
            ),
        ),
        (
            b,
            minute(b, T0, &[Some(25.0), None], &[2.0, 0.3], 1, xuan_thuy, "C"),
        ),
        (
            a,
            minute(a, T0 + 60_000, &[Some(10.0)], &[0.3], 1, kim_ma, "F"),
        ),
        (
            b,
            minute(b, T0 + 60_000, &[Some(44.0)], &[1.0], 0, xuan_thuy, "A"),
        ),
    ];
    let expected: Vec<(Option<String>, serde_json::Value)> = expected
        .into_iter()
        .map(|(k, v)| (Some(k.to_string()), v))
        .collect();
    assert_eq!(rows.len(), expected.len());
    for (got, want) in rows.iter().zip(&expected) {
        assert_eq!(got.0, want.0);
        assert!(close(&got.1, &want.1), "got {}\nwant {}", got.1, want.1);
    }

    let dlq = cluster.consumer(&topics.dlq)?;
    let mut dead = read_json(&dlq, 3, Duration::from_secs(30)).await?;
    dead.sort_by_key(|(_, v)| (v["partition"].as_i64(), v["offset"].as_i64()));
    let strip = |mut v: serde_json::Value| {
        assert!(v["received_at"].as_i64().is_some_and(|t| t > T0));
        v.as_object_mut().expect("object").remove("received_at");
        v
    };
    let dead: Vec<_> = dead.into_iter().map(|(k, v)| (k, strip(v))).collect();
    assert_eq!(
        dead,
        vec![
            (
                Some(a.to_string()),
                json!({"topic": cam, "partition": 0, "offset": 5, "key": b64(a.as_bytes()),
            "error": "truncated JSON: the record ends inside a value", "stage": "decode",
            "payload": b64(truncated), "query": null})
            ),
            (
                Some(b.to_string()),
                json!({"topic": cam, "partition": 1, "offset": 3, "key": b64(b.as_bytes()),
            "error": "field vehicle_class: unknown symbol \"hovercraft\" (expected one of motorbike, car, bus, truck, bicycle, other)",
            "stage": "validate", "payload": b64(hovercraft), "query": null})
            ),
            (
                Some(b.to_string()),
                json!({"topic": cam, "partition": 1, "offset": 4, "key": b64(b.as_bytes()),
            "error": "empty record: no JSON object", "stage": "decode", "payload": "",
            "query": null})
            ),
        ]
    );

    // The collision raised an incident alert on its segment, explained.
    let alerts = cluster.consumer(&topics.alerts)?;
    let alert_rows = read_json(&alerts, 1, Duration::from_secs(30)).await?;
    let (key, alert) = &alert_rows[0];
    assert_eq!(key.as_deref(), Some(a));
    for (field, value) in [
        ("state", json!("RAISED")),
        ("kind", json!("incident")),
        ("entity_type", json!("segment")),
        ("entity_id", json!(a)),
        ("detector", json!("camera")),
        ("window_start", json!(T0)),
        ("window_end", json!(T0 + 60_000)),
        ("started_at", json!(T0 + 60_000)),
        ("severity", json!(3)),
        ("value", json!(1.0)),
    ] {
        assert_eq!(alert[field], value, "{field} of {alert}");
    }
    assert!(
        alert["message"]
            .as_str()
            .is_some_and(|m| m.contains("collision")),
        "{alert}"
    );
    assert!(
        alert["alert_id"]
            .as_str()
            .is_some_and(|id| id.starts_with("incident:"))
    );

    // Phase 2: an event for the closed first minute is late; nothing is dropped silently.
    let late_event = detection(a, T0 + 50_000, "motorbike", Some(12.0));
    let (_, late_offset) = cluster.produce(cam, 0, a, &late_event).await?;
    assert_eq!(late_offset, 7);
    let late = cluster.consumer(&topics.late)?;
    // Each windowed query over the camera stream reports it, naming itself.
    let mut late_rows = read_json(&late, 6, Duration::from_secs(30)).await?;
    late_rows.sort_by_key(|(_, v)| v["query"].as_str().map(String::from));
    // The joins over the camera stream too (incidents confirmed by detectors, travel times):
    // the event is older than the camera stream's watermark there.
    let expected_late: Vec<_> = [
        "alerts_congestion",
        "alerts_incidents",
        "alerts_incidents_confirmed",
        "congestion_minute",
        "congestion_top_wards",
        "travel_times",
    ]
    .iter()
    .map(|query| {
        (
            Some(a.to_string()),
            json!({
            "query": query, "topic": cam, "partition": 0, "offset": 7,
            "event_time": T0 + 50_000, "watermark": T0 + 120_000,
            "reason": "beyond_allowed_lateness", "window_start": null, "window_end": null,
            "payload": b64(&late_event)}),
        )
    })
    .collect();
    assert_eq!(late_rows, expected_late);

    // The late event changed no published window, and the window it would have joined is not
    // re-opened.
    assert!(
        read_more(&indicators, Duration::from_secs(2))
            .await
            .is_empty()
    );

    stop.store(true, Ordering::Relaxed);
    task.await??;
    // Four congestion rows, the incident alert, and the same four segment-minutes ranked
    // among their wards' most congested (no ward has more than three segments).
    assert_eq!(stats.indicators_out.load(Ordering::Relaxed), 9);
    assert_eq!(stats.dlq.load(Ordering::Relaxed), 3);
    assert_eq!(stats.late.load(Ordering::Relaxed), 6);
    assert_eq!(stats.camera_events.load(Ordering::Relaxed), 11);
    Ok(())
}

/// Regression: the demo panicked (`index out of bounds: the len is 0`) once its simulated
/// clock reached the wall clock. The default queries run in one state for all partitions
/// (one of them cannot be split), and the per-sensor air aggregates were repartitioned then;
/// a future-stamped reading diverted by stage 2 indexed an empty list of record origins. It
/// goes to the late topic, reported where it came from (the input topic, partition and
/// offset), and the pipeline runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_future_stamped_reading_of_a_repartitioned_query_goes_to_the_late_topic()
-> anyhow::Result<()> {
    let cluster = TestCluster::start(4)?;
    let topics = Topics::default();
    let now = urbanstream::pipeline::epoch_ms();
    let reading = |t: i64| {
        serde_json::to_vec(&json!({"sensor_id": "aq-001", "ward_id": "hoan_kiem",
            "event_time": t, "pm25": 31.5}))
    };
    cluster
        .produce(&topics.air, 2, "hoan_kiem", &reading(now - 60_000)?)
        .await?;
    let future = reading(now + 3_600_000)?;
    let (partition, offset) = cluster
        .produce(&topics.air, 2, "hoan_kiem", &future)
        .await?;

    let stats = Arc::new(PipelineStats::new());
    let stop = Arc::new(AtomicBool::new(false));
    let mut config = PipelineConfig::new(&cluster.brokers);
    config.group_id = "future".into();
    let pipeline = Pipeline::new(config, stats.clone()).await?;
    let task = tokio::spawn(pipeline.run(stop.clone()));

    let late = cluster.consumer(&topics.late)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let record = loop {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no late record from the repartitioned query"
        );
        anyhow::ensure!(
            !task.is_finished(),
            "the pipeline stopped: {:?}",
            task.await
        );
        let rows = read_more(&late, Duration::from_secs(1)).await;
        if let Some(r) = rows.into_iter().find(|r| r["query"] == "air_hourly_sensor") {
            break r;
        }
    };
    assert_eq!(record["reason"], "future_timestamp", "{record}");
    assert_eq!(record["topic"], topics.air.as_str(), "{record}");
    assert_eq!(record["partition"], partition, "{record}");
    assert_eq!(record["offset"], offset, "{record}");
    assert_eq!(record["payload"], b64(&future), "{record}");
    // Records in are the input topics' records, once (the demo's summary showed more
    // records in than produced when they passed through a repartition topic too).
    assert_eq!(stats.records_in.load(Ordering::Relaxed), 2);
    stop.store(true, Ordering::Relaxed);
    task.await??;
    Ok(())
}

/// A record late for every statement of a query is one late record of the query (and one in
/// its count): a query of four statements over one stream sent four for each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_late_for_several_statements_is_one_late_record() -> anyhow::Result<()> {
    let cluster = TestCluster::start(1)?;
    let topics = Topics::default();
    let stats = Arc::new(PipelineStats::new());
    let stop = Arc::new(AtomicBool::new(false));
    let mut config = PipelineConfig::new(&cluster.brokers);
    config.group_id = "late-once".into();
    config.default_queries = false;
    config.from_beginning = true;
    config.name = Some("twice".into());
    config.queries = vec![(
        "twice".into(),
        "CREATE EXTERNAL TABLE ev (k VARCHAR, ts TIMESTAMP NOT NULL)
         STORED AS KAFKA OPTIONS ('topic' 'test.twice.in', 'format' 'json',
           'event_time' 'ts', 'watermark_delay' '0s');
         CREATE EXTERNAL TABLE per_k (k VARCHAR, window_start TIMESTAMP NOT NULL, c BIGINT NOT NULL)
         STORED AS KAFKA OPTIONS ('topic' 'test.twice.per_k', 'format' 'json');
         CREATE EXTERNAL TABLE all_k (window_start TIMESTAMP NOT NULL, c BIGINT NOT NULL)
         STORED AS KAFKA OPTIONS ('topic' 'test.twice.all', 'format' 'json');
         INSERT INTO per_k SELECT k, window_start, count(*) AS c FROM ev
           GROUP BY tumble(ts, INTERVAL '1 minute'), k;
         INSERT INTO all_k SELECT window_start, count(*) AS c FROM ev
           GROUP BY tumble(ts, INTERVAL '1 minute')"
            .into(),
    )];
    for topic in ["test.twice.in", "test.twice.per_k", "test.twice.all"] {
        cluster.broker.create_topic(topic, 1)?;
    }
    let record = |t: i64| serde_json::to_vec(&json!({"k": "a", "ts": t}));
    cluster
        .produce("test.twice.in", 0, "a", &record(T0)?)
        .await?;
    cluster
        .produce("test.twice.in", 0, "a", &record(T0 + 300_000)?)
        .await?;
    let pipeline = Pipeline::new(config, stats.clone()).await?;
    let task = tokio::spawn(pipeline.run(stop.clone()));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    // The first minute closed (by both statements) before the late record comes.
    let per_k = cluster.consumer("test.twice.per_k")?;
    let all = cluster.consumer("test.twice.all")?;
    let (mut closed_k, mut closed_all) = (false, false);
    while !(closed_k && closed_all) {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the first minute did not close"
        );
        closed_k |= !read_more(&per_k, Duration::from_millis(200))
            .await
            .is_empty();
        closed_all |= !read_more(&all, Duration::from_millis(200)).await.is_empty();
    }
    let (_, offset) = cluster
        .produce("test.twice.in", 0, "a", &record(T0 + 10_000)?)
        .await?;
    let late = cluster.consumer(&topics.late)?;
    let mut records = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while records.is_empty() || stats.late.load(Ordering::Relaxed) == 0 {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no late record: {records:?}, {} counted late, {} records in, {} dead letters, watermark {}",
            stats.late.load(Ordering::Relaxed),
            stats.records_in.load(Ordering::Relaxed),
            stats.dlq.load(Ordering::Relaxed),
            stats.watermark_ms.load(Ordering::Relaxed)
        );
        anyhow::ensure!(
            !task.is_finished(),
            "the pipeline stopped: {:?}",
            task.await
        );
        records.extend(read_more(&late, Duration::from_secs(1)).await);
    }
    // Anything sent twice would be there by now.
    records.extend(read_more(&late, Duration::from_secs(2)).await);
    stop.store(true, Ordering::Relaxed);
    task.await??;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["query"], "twice");
    assert_eq!(records[0]["offset"], offset);
    assert_eq!(stats.late.load(Ordering::Relaxed), 1);
    Ok(())
}

/// Regression: the watermark was the minimum over the partitions seen *so far*, so a
/// partition whose first records arrived after the others had moved the watermark had its
/// older records diverted as late: how many depended on how the fetches happened to be
/// paced (the demo's warm-up backfill lost 6 000 to 13 000 of 63 000 events that way). Each
/// assigned partition now holds the watermark until it has delivered or gone idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_that_delivers_last_is_not_late_against_the_others() -> anyhow::Result<()> {
    let cluster = TestCluster::start(4)?;
    let topics = Topics::default();
    let cam = topics.camera.as_str();
    let segments = ["kim_ma_w", "xuan_thuy", "truong_chinh_e", "lang_ntso"];
    // Partitions 0–2 deliver minute 0 and then a record two minutes on.
    for (p, segment) in segments[..3].iter().enumerate() {
        for t in [T0 + 1_000, T0 + 125_000] {
            cluster
                .produce(
                    cam,
                    p as i32,
                    segment,
                    &detection(segment, t, "car", Some(40.0)),
                )
                .await?;
        }
    }
    let stats = Arc::new(PipelineStats::new());
    let stop = Arc::new(AtomicBool::new(false));
    let mut config = PipelineConfig::new(&cluster.brokers);
    config.group_id = "last-partition".into();
    let pipeline = Pipeline::new(config, stats.clone()).await?;
    let task = tokio::spawn(pipeline.run(stop.clone()));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while stats.camera_events.load(Ordering::Relaxed) < 6 {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the first partitions were not read"
        );
        anyhow::ensure!(
            !task.is_finished(),
            "the pipeline stopped: {:?}",
            task.await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The first three partitions have been processed; now partition 3 delivers its backlog,
    // minute 0 included.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let last = segments[3];
    for t in [T0 + 2_000, T0 + 3_000, T0 + 126_000] {
        cluster
            .produce(cam, 3, last, &detection(last, t, "car", Some(40.0)))
            .await?;
    }
    let indicators = cluster.consumer(&topics.congestion)?;
    let rows = read_json(&indicators, 4, Duration::from_secs(60)).await?;
    let mut minute0: Vec<(String, i64)> = rows
        .iter()
        .filter(|(_, v)| v["window_start"] == T0)
        .map(|(_, v)| {
            (
                v["segment_id"].as_str().unwrap_or_default().to_string(),
                v["vehicles"].as_i64().unwrap_or_default(),
            )
        })
        .collect();
    minute0.sort();
    let mut want: Vec<(String, i64)> = segments
        .iter()
        .map(|s| (s.to_string(), if *s == last { 2 } else { 1 }))
        .collect();
    want.sort();
    assert_eq!(minute0, want);
    stop.store(true, Ordering::Relaxed);
    task.await??;
    assert_eq!(stats.late.load(Ordering::Relaxed), 0);
    Ok(())
}

/// Produces to the camera topic, for each of 4 segments (`seg-j` into partition j),
/// `count(j, m)` detections a second apart in each minute m of the first `minutes` from T0,
/// then one at minute `close` (closing those minutes). Gives (segment, minute's start, count)
/// of each minute.
async fn produce_minutes(
    cluster: &TestCluster,
    minutes: i64,
    count: impl Fn(i32, i64) -> i64,
    close: i64,
) -> anyhow::Result<Vec<(String, i64, i64)>> {
    let topic = Topics::default().camera;
    let mut produced = Vec::new();
    for j in 0..4i32 {
        let segment = format!("seg-{j}");
        for m in 0..minutes {
            let n = count(j, m);
            for k in 0..n {
                let t = T0 + m * 60_000 + k * 1_000;
                let record = detection(&segment, t, "car", Some(30.0));
                cluster.produce(&topic, j, &segment, &record).await?;
            }
            produced.push((segment.clone(), T0 + m * 60_000, n));
        }
        let record = detection(&segment, T0 + close * 60_000, "car", None);
        cluster.produce(&topic, j, &segment, &record).await?;
    }
    Ok(produced)
}

/// Windows of windows through the whole pipeline: per segment and minute, then per five
/// minutes of those minutes, in one registered query over 4 partitions. Each five minutes is
/// published once, with its minutes and events counted exactly, as soon as the minutes that
/// make it have closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_over_a_window_runs_in_one_query() -> anyhow::Result<()> {
    let cluster = TestCluster::start(4)?;
    let mut want = std::collections::BTreeMap::new();
    for (segment, minute, count) in
        produce_minutes(&cluster, 10, |j, m| (i64::from(j) + m) % 3 + 1, 20).await?
    {
        let w = want
            .entry((segment, T0 + (minute - T0) / 300_000 * 300_000))
            .or_insert((0, 0));
        w.0 += 1;
        w.1 += count;
    }
    let stats = Arc::new(PipelineStats::new());
    let stop = Arc::new(AtomicBool::new(false));
    let mut config = PipelineConfig::new(&cluster.brokers);
    config.group_id = "stages".into();
    config.default_queries = false;
    config.name = Some("five".into());
    config.queries = vec![(
        "five".into(),
        "CREATE EXTERNAL TABLE five (segment_id VARCHAR NOT NULL, window_start TIMESTAMP NOT NULL,
           minutes BIGINT NOT NULL, n BIGINT NOT NULL)
         STORED AS KAFKA OPTIONS ('topic' 'test.five', 'format' 'json');
         INSERT INTO five SELECT segment_id, window_start, count(*) AS minutes, sum(n) AS n
         FROM (SELECT segment_id, window_start AS minute, count(*) AS n FROM camera_events
               GROUP BY tumble(event_time, INTERVAL '1 minute'), segment_id)
         GROUP BY tumble(minute, INTERVAL '5 minutes'), segment_id"
            .into(),
    )];
    let pipeline = Pipeline::new(config, stats.clone()).await?;
    let task = tokio::spawn(pipeline.run(stop.clone()));
    let five = cluster.consumer("test.five")?;
    let rows = read_json(&five, want.len(), Duration::from_secs(60)).await;
    // Nothing more: each five minutes once, and nothing of the window still open.
    let more = read_more(&five, Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    task.await??;
    let mut got = std::collections::BTreeMap::new();
    for (_, v) in rows? {
        let key = (
            v["segment_id"].as_str().unwrap_or_default().to_string(),
            v["window_start"].as_i64().unwrap_or(-1),
        );
        let value = (
            v["minutes"].as_i64().unwrap_or(-1),
            v["n"].as_i64().unwrap_or(-1),
        );
        anyhow::ensure!(
            got.insert(key.clone(), value).is_none(),
            "{key:?} published twice"
        );
    }
    assert_eq!(got, want);
    assert!(more.is_empty(), "more rows than windows: {more:?}");
    Ok(())
}

/// A join of two topics, 4 partitions each, in one registered query: every entry with its
/// exit within ten minutes, or with none once no exit can come; each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_topics_join_in_one_query() -> anyhow::Result<()> {
    let cluster = TestCluster::start(4)?;
    for topic in ["test.entries", "test.exits", "test.visits"] {
        cluster.broker.create_topic(topic, 4)?;
    }
    let mut want = std::collections::BTreeMap::new();
    for i in 0..40i64 {
        let plate = format!("p{i:02}");
        let entered = T0 + i * 10_000;
        let record = json!({"plate": plate, "event_time": entered});
        cluster
            .produce(
                "test.entries",
                (i % 4) as i32,
                &plate,
                &serde_json::to_vec(&record)?,
            )
            .await?;
        let exited = (i % 5 != 0).then(|| entered + (2 + i % 7) * 60_000);
        if let Some(t) = exited {
            let record = json!({"plate": plate, "event_time": t});
            cluster
                .produce(
                    "test.exits",
                    ((i + 1) % 4) as i32,
                    &plate,
                    &serde_json::to_vec(&record)?,
                )
                .await?;
        }
        want.insert(plate, (entered, exited));
    }
    // Every partition of both topics moves on to an hour later: no exit can come for the
    // entries above any more.
    for j in 0..4 {
        for (topic, plate) in [
            ("test.entries", "close-entry"),
            ("test.exits", "close-exit"),
        ] {
            let record = json!({"plate": plate, "event_time": T0 + 3_600_000});
            cluster
                .produce(topic, j, plate, &serde_json::to_vec(&record)?)
                .await?;
        }
    }
    let stats = Arc::new(PipelineStats::new());
    let stop = Arc::new(AtomicBool::new(false));
    let mut config = PipelineConfig::new(&cluster.brokers);
    config.group_id = "joins".into();
    config.default_queries = false;
    config.from_beginning = true;
    config.name = Some("visits".into());
    config.queries = vec![(
        "visits".into(),
        "CREATE EXTERNAL TABLE entries (plate VARCHAR NOT NULL, event_time TIMESTAMP NOT NULL)
         STORED AS KAFKA OPTIONS ('topic' 'test.entries', 'format' 'json',
           'event_time' 'event_time', 'watermark_delay' '0s');
         CREATE EXTERNAL TABLE exits (plate VARCHAR NOT NULL, event_time TIMESTAMP NOT NULL)
         STORED AS KAFKA OPTIONS ('topic' 'test.exits', 'format' 'json',
           'event_time' 'event_time', 'watermark_delay' '0s');
         CREATE EXTERNAL TABLE visits (plate VARCHAR NOT NULL, entered TIMESTAMP NOT NULL,
           exited TIMESTAMP)
         STORED AS KAFKA OPTIONS ('topic' 'test.visits', 'format' 'json', 'key' 'plate');
         INSERT INTO visits SELECT a.plate, a.event_time AS entered, b.event_time AS exited
         FROM entries a LEFT JOIN exits b ON a.plate = b.plate
           AND b.event_time BETWEEN a.event_time AND a.event_time + INTERVAL '10 minutes'"
            .into(),
    )];
    let pipeline = Pipeline::new(config, stats.clone()).await?;
    let task = tokio::spawn(pipeline.run(stop.clone()));
    let visits = cluster.consumer("test.visits")?;
    let rows = read_json(&visits, want.len(), Duration::from_secs(60)).await;
    let more = read_more(&visits, Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    task.await??;
    let mut got = std::collections::BTreeMap::new();
    for (key, v) in rows? {
        let plate = v["plate"].as_str().unwrap_or_default().to_string();
        assert_eq!(key.as_deref(), Some(plate.as_str()), "keyed by plate");
        let value = (v["entered"].as_i64().unwrap_or(-1), v["exited"].as_i64());
        anyhow::ensure!(
            got.insert(plate.clone(), value).is_none(),
            "{plate} published twice"
        );
    }
    assert_eq!(got, want);
    assert!(more.is_empty(), "more rows than entries: {more:?}");
    Ok(())
}

/// The pipeline's watermark (the demo's and the service's progress figure) is the lowest of
/// its queries' watermarks, but a query whose inputs have all gone quiet holds only its own:
/// a join of two sparse streams waiting for either does not make the whole pipeline look
/// stuck while the camera stream goes on. The figure never goes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_whose_inputs_went_quiet_does_not_hold_the_pipelines_watermark()
-> anyhow::Result<()> {
    let cluster = TestCluster::start(4)?;
    for topic in ["test.entries", "test.exits", "test.visits", "test.counts"] {
        cluster.broker.create_topic(topic, 4)?;
    }
    let camera = Topics::default().camera;
    for j in 0..4 {
        for (topic, plate) in [("test.entries", "early"), ("test.exits", "early")] {
            let record = json!({"plate": plate, "event_time": T0});
            cluster
                .produce(topic, j, plate, &serde_json::to_vec(&record)?)
                .await?;
        }
        let segment = format!("seg-{j}");
        let record = detection(&segment, T0, "car", Some(30.0));
        cluster.produce(&camera, j, &segment, &record).await?;
    }
    let stats = Arc::new(PipelineStats::new());
    let stop = Arc::new(AtomicBool::new(false));
    let mut config = PipelineConfig::new(&cluster.brokers);
    config.group_id = "quiet".into();
    config.default_queries = false;
    config.from_beginning = true;
    config.queries = vec![
        (
            "counts".into(),
            "CREATE EXTERNAL TABLE counts (segment_id VARCHAR NOT NULL, n BIGINT NOT NULL)
             STORED AS KAFKA OPTIONS ('topic' 'test.counts', 'format' 'json');
             INSERT INTO counts SELECT segment_id, count(*) AS n FROM camera_events
             GROUP BY tumble(event_time, INTERVAL '1 minute'), segment_id"
                .into(),
        ),
        (
            "visits".into(),
            "CREATE EXTERNAL TABLE entries (plate VARCHAR NOT NULL, event_time TIMESTAMP NOT NULL)
             STORED AS KAFKA OPTIONS ('topic' 'test.entries', 'format' 'json',
               'event_time' 'event_time', 'watermark_delay' '0s', 'idle_timeout' '15s');
             CREATE EXTERNAL TABLE exits (plate VARCHAR NOT NULL, event_time TIMESTAMP NOT NULL)
             STORED AS KAFKA OPTIONS ('topic' 'test.exits', 'format' 'json',
               'event_time' 'event_time', 'watermark_delay' '0s', 'idle_timeout' '15s');
             CREATE EXTERNAL TABLE visits (plate VARCHAR NOT NULL, entered TIMESTAMP NOT NULL,
               exited TIMESTAMP)
             STORED AS KAFKA OPTIONS ('topic' 'test.visits', 'format' 'json', 'key' 'plate');
             INSERT INTO visits SELECT a.plate, a.event_time AS entered, b.event_time AS exited
             FROM entries a JOIN exits b ON a.plate = b.plate
               AND b.event_time BETWEEN a.event_time AND a.event_time + INTERVAL '10 minutes'"
                .into(),
        ),
    ];
    let pipeline = Pipeline::new(config, stats.clone()).await?;
    let task = tokio::spawn(pipeline.run(stop.clone()));
    let watermark = || stats.watermark_ms.load(Ordering::Relaxed);
    let waited = std::time::Instant::now();
    while stats.records_in.load(Ordering::Relaxed) < 12 || watermark() == i64::MIN {
        anyhow::ensure!(
            waited.elapsed() < Duration::from_secs(60),
            "the first records were not processed: {} records in, watermark {}",
            stats.records_in.load(Ordering::Relaxed),
            watermark()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every partition of both queries' inputs held the watermark until it delivered; then the
    // lowest is the join's: pairs up to 10 minutes before its inputs' T0 may still come (the
    // cameras' is T0 less 5 s).
    let first = watermark();
    assert_eq!(first, T0 - 600_000, "the join's watermark");
    // Then only the cameras, a minute of event time per step; the join's inputs go quiet
    // after their 15 s, and until then the join's watermark is the lowest. (With 2 s, a
    // first micro-batch slower than that had the join's inputs quiet before the first look.)
    let mut seen = vec![first];
    for step in 1..=40i64 {
        for j in 0..4 {
            let segment = format!("seg-{j}");
            let record = detection(&segment, T0 + step * 60_000, "car", Some(30.0));
            cluster.produce(&camera, j, &segment, &record).await?;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        seen.push(watermark());
    }
    let last_produced = T0 + 40 * 60_000;
    let waited = std::time::Instant::now();
    while watermark() < last_produced - 5_000 && waited.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        seen.push(watermark());
    }
    stop.store(true, Ordering::Relaxed);
    task.await??;
    assert!(
        seen.windows(2).all(|w| w[1] >= w[0]),
        "the watermark went back: {seen:?}"
    );
    assert_eq!(
        *seen.last().unwrap_or(&i64::MIN),
        last_produced - 5_000,
        "the cameras' watermark (their last event less the 5 s delay) once the join's inputs \
         went quiet: {seen:?}"
    );
    Ok(())
}

/// Every revision of a window's row goes to one partition, in order, where the sink's key
/// column holds NULL or an empty text: such records have no key to place them by, and the
/// producer spread them over the partitions at random, so that an upserting consumer could
/// keep an older revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revisions_of_a_row_without_a_key_value_stay_in_one_partition() -> anyhow::Result<()> {
    let cluster = TestCluster::start(4)?;
    topics_of(&cluster, "keyless")?;
    let (stop, task) = start_one_query(
        &cluster,
        "keyless",
        "SET urbanstream.allowed_lateness = '10m';
         INSERT INTO o SELECT k, window_start, count(*) AS c FROM ev
         GROUP BY tumble(ts, INTERVAL '1 minute'), k",
    )
    .await?;
    let keys = [json!(null), json!(""), json!("a")];
    // Minute 0 on every partition, then minute 2 everywhere (minute 0 closes), then six
    // rounds of late events into minute 0, each round a revision.
    let mut expected = 0;
    for (round, t) in [(0, T0), (1, T0 + 120_000)] {
        for p in 0..4 {
            for k in &keys {
                let record = json!({"k": k, "ts": t + round});
                cluster
                    .produce("test.keyless.in", p, "x", &serde_json::to_vec(&record)?)
                    .await?;
            }
        }
    }
    let out = cluster.consumer("test.keyless.out")?;
    let wait_for = |n: usize| read_with_partitions(&out, n);
    let mut seen = wait_for(3).await?;
    for round in 0..6 {
        for k in &keys {
            let record = json!({"k": k, "ts": T0 + 1_000 + round});
            let p = i32::try_from(round % 4)?;
            cluster
                .produce("test.keyless.in", p, "x", &serde_json::to_vec(&record)?)
                .await?;
        }
        expected += 3;
        seen.extend(wait_for(3).await?);
    }
    stop.store(true, Ordering::Relaxed);
    task.await??;
    assert_eq!(seen.len(), 3 + expected, "{seen:?}");
    for k in &keys {
        let mine: Vec<&(i32, serde_json::Value)> =
            seen.iter().filter(|(_, r)| r["k"] == *k).collect();
        let partitions: std::collections::BTreeSet<i32> = mine.iter().map(|(p, _)| *p).collect();
        assert_eq!(partitions.len(), 1, "{k}: {mine:?}");
        // In order: each revision counts one more.
        let counts: Vec<i64> = mine
            .iter()
            .map(|(_, r)| r["c"].as_i64().unwrap_or(-1))
            .collect();
        assert_eq!(counts, (4..=10).collect::<Vec<i64>>(), "{k}: {mine:?}");
    }
    drop(out);
    Ok(())
}

/// A micro-batch that closes more windows than one part of results (a hop of 2 000 windows
/// a reading, readings far apart on 4 partitions: 48 000 windows closed at once) publishes
/// every window once, part after part, before it takes the next records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_closing_many_windows_publishes_every_one_once() -> anyhow::Result<()> {
    const SIZE: i64 = 2_000_000;
    let cluster = TestCluster::start(4)?;
    topics_of(&cluster, "parts")?;
    // Six readings a partition, each alone in its windows, then one far ahead that closes
    // them all; produced before the query starts, so that they come in few micro-batches.
    for p in 0..4 {
        for i in 0..7 {
            let t = T0 + i * (SIZE + 1_000) + if i == 6 { 100 * SIZE } else { 0 };
            let record = json!({"k": format!("k{p}"), "ts": t});
            cluster
                .produce("test.parts.in", p, "x", &serde_json::to_vec(&record)?)
                .await?;
        }
    }
    let (stop, task) = start_one_query(
        &cluster,
        "parts",
        "INSERT INTO o SELECT k, window_start, count(*) AS c FROM ev
         GROUP BY hop(ts, INTERVAL '1 second', INTERVAL '2000 seconds'), k",
    )
    .await?;
    let out = cluster.consumer("test.parts.out")?;
    let expected = 4 * 6 * 2_000;
    let seen = read_with_partitions(&out, expected).await?;
    // Nothing more comes: each window once.
    let more = tokio::time::timeout(Duration::from_secs(3), out.recv()).await;
    assert!(more.is_err(), "a window published twice: {more:?}");
    stop.store(true, Ordering::Relaxed);
    task.await??;
    let windows: std::collections::BTreeSet<(String, String)> = seen
        .iter()
        .map(|(_, r)| (r["k"].to_string(), r["window_start"].to_string()))
        .collect();
    assert_eq!(windows.len(), expected);
    assert!(
        seen.iter().all(|(_, r)| r["c"] == json!(1)),
        "a window of one reading"
    );
    drop(out);
    Ok(())
}

/// Makes the topics of [`start_one_query`]'s query `name`, of 4 partitions.
fn topics_of(cluster: &TestCluster, name: &str) -> anyhow::Result<()> {
    for topic in [format!("test.{name}.in"), format!("test.{name}.out")] {
        cluster.broker.create_topic(&topic, 4)?;
    }
    Ok(())
}

/// Starts a pipeline of one query, `name`, over `test.{name}.in` (`ev (k VARCHAR, ts
/// TIMESTAMP NOT NULL)`, no watermark delay, idle after an hour) into `test.{name}.out` (`o (k VARCHAR,
/// window_start TIMESTAMP NOT NULL, c BIGINT NOT NULL)`, keyed by k), read from the
/// beginning: `sql` is the query's statements after the tables. The topics are made with
/// [`topics_of`] first.
async fn start_one_query(
    cluster: &TestCluster,
    name: &str,
    sql: &str,
) -> anyhow::Result<(
    Arc<AtomicBool>,
    tokio::task::JoinHandle<urbanstream::Result<()>>,
)> {
    let stats = Arc::new(PipelineStats::new());
    let stop = Arc::new(AtomicBool::new(false));
    let mut config = PipelineConfig::new(&cluster.brokers);
    config.group_id = name.into();
    config.default_queries = false;
    config.from_beginning = true;
    config.queries = vec![(
        name.into(),
        format!(
            "CREATE EXTERNAL TABLE ev (k VARCHAR, ts TIMESTAMP NOT NULL)
             STORED AS KAFKA OPTIONS ('topic' 'test.{name}.in', 'format' 'json',
               'event_time' 'ts', 'watermark_delay' '0s', 'idle_timeout' '1h');
             CREATE EXTERNAL TABLE o (k VARCHAR, window_start TIMESTAMP NOT NULL, c BIGINT NOT NULL)
             STORED AS KAFKA OPTIONS ('topic' 'test.{name}.out', 'format' 'json', 'key' 'k');
             {sql}"
        ),
    )];
    let pipeline = Pipeline::new(config, stats).await?;
    let task = tokio::spawn(pipeline.run(stop.clone()));
    Ok((stop, task))
}

/// The next `n` records of `consumer`, with their partitions.
async fn read_with_partitions(
    consumer: &rdkafka::consumer::StreamConsumer,
    n: usize,
) -> anyhow::Result<Vec<(i32, serde_json::Value)>> {
    use rdkafka::message::Message;
    let mut out = Vec::new();
    while out.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
            .await
            .map_err(|_| anyhow::anyhow!("only {} of {n} records: {out:?}", out.len()))??;
        out.push((
            m.partition(),
            serde_json::from_slice(m.payload().unwrap_or_default())?,
        ));
    }
    Ok(out)
}

/// A query counting camera events per segment and minute into `test.minutes`, checkpointed
/// every `interval` into `dir`.
fn minutes_config(
    cluster: &TestCluster,
    dir: &std::path::Path,
    interval: Duration,
) -> PipelineConfig {
    let mut config = PipelineConfig::new(&cluster.brokers);
    config.default_queries = false;
    config.name = Some("minutes".into());
    config.queries = vec![(
        "minutes".into(),
        "CREATE EXTERNAL TABLE minutes (segment_id VARCHAR NOT NULL,
           window_start TIMESTAMP NOT NULL, n BIGINT NOT NULL)
         STORED AS KAFKA OPTIONS ('topic' 'test.minutes', 'format' 'json');
         INSERT INTO minutes SELECT segment_id, window_start, count(*) AS n FROM camera_events
         GROUP BY tumble(event_time, INTERVAL '1 minute'), segment_id"
            .into(),
    )];
    config.checkpoint = Some(urbanstream::pipeline::CheckpointSettings {
        location: urbanstream::checkpoint::Location::Local(dir.to_path_buf()),
        interval,
        retain: 2,
        transactional_id: None,
        read_back_from_log_start: false,
        claim: false,
    });
    config
}

/// A query behind its input reads its next micro-batch while it processes one (micro-batches
/// of 16 records here, so it does so all along its backlog). Stopped again and again in the
/// middle of that backlog and started again from its checkpoints, over 4 partitions, it still
/// publishes every window once with every event counted: the records a cancelled read had
/// taken are read again by the next run, and none is counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_stopped_again_and_again_in_its_backlog_counts_every_event_once()
-> anyhow::Result<()> {
    let cluster = TestCluster::start(4)?;
    let mut want = std::collections::BTreeMap::new();
    let mut total = 0u64;
    for (segment, minute, count) in
        produce_minutes(&cluster, 40, |j, m| (i64::from(j) + m) % 4 + 3, 45).await?
    {
        want.insert((segment, minute), count);
        total += count as u64;
    }
    let dir = tempfile::tempdir()?;
    let mut config = minutes_config(&cluster, dir.path(), Duration::from_secs(3600));
    config.group_id = "stopped-in-backlog".into();
    config.max_batch_rows = 16;
    let stats = Arc::new(PipelineStats::new());
    let minutes = cluster.consumer("test.minutes")?;
    let mut rows = Vec::new();
    let mut runs = 0;
    // Each run stops once it has read another 100 records (about six micro-batches) of the
    // backlog's 720, or when it has read nothing for a second (the backlog's end). The stop
    // lands a few micro-batches later when the machine is busy, so a run may read twice as
    // many; the backlog is long enough for three runs all the same. The runs go on until every
    // record has been read: the last windows a run publishes may reach the output after the
    // short read below, and a run after them would have nothing to read.
    while stats.records_in.load(Ordering::Relaxed) < total + 4 {
        anyhow::ensure!(runs < 60, "not every window was published in 60 runs");
        runs += 1;
        let from = stats.records_in.load(Ordering::Relaxed);
        let stop = Arc::new(AtomicBool::new(false));
        // A consumer group of its own each run: the positions are the checkpoint's, and a
        // member of the last run's group would wait out the group's rebalance first.
        config.group_id = format!("stopped-in-backlog-{runs}");
        let pipeline = Pipeline::new(config.clone(), stats.clone()).await?;
        let task = tokio::spawn(pipeline.run(stop.clone()));
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let (mut seen, mut changed) = (from, std::time::Instant::now());
        loop {
            let now = stats.records_in.load(Ordering::Relaxed);
            if now != seen {
                (seen, changed) = (now, std::time::Instant::now());
            }
            if now >= from + 100
                || (now > from && changed.elapsed() > Duration::from_secs(1))
                || task.is_finished()
            {
                break;
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "run {runs} read nothing"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        stop.store(true, Ordering::Relaxed);
        task.await??;
        rows.extend(read_more(&minutes, Duration::from_millis(300)).await);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while rows.len() < want.len() && std::time::Instant::now() < deadline {
        rows.extend(read_more(&minutes, Duration::from_secs(1)).await);
    }
    rows.extend(read_more(&minutes, Duration::from_secs(1)).await);
    // Every stop checkpointed just what its run had processed: no record was processed twice
    // (nor, arriving again after its window closed, diverted as late), and the reads ahead
    // that were cancelled lost nothing.
    assert_eq!(stats.records_in.load(Ordering::Relaxed), total + 4);
    assert_eq!(stats.late.load(Ordering::Relaxed), 0);
    assert!(
        stats.reads_ahead.load(Ordering::Relaxed) > 0,
        "no read ran ahead"
    );
    let mut got = std::collections::BTreeMap::new();
    for v in rows {
        let key = (
            v["segment_id"].as_str().unwrap_or_default().to_string(),
            v["window_start"].as_i64().unwrap_or(-1),
        );
        let n = v["n"].as_i64().unwrap_or(-1);
        anyhow::ensure!(
            got.insert(key.clone(), n).is_none(),
            "{key:?} published twice"
        );
    }
    assert_eq!(got, want);
    assert!(
        runs >= 3,
        "the backlog was read in {runs} runs, not stopped in its middle"
    );
    Ok(())
}

/// A query keeping its state per input partition (counts per segment, the camera topic's key)
/// needs each record placed by its segment: a record without a key sits in any partition,
/// whose state would publish a second, partial count of its segment's window. Such records
/// go to the DLQ, naming the column and its value; a record keyed by its segment in another
/// encoding (quoted) passes; each window is published once, over 4 partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_without_a_key_go_to_the_dlq_not_into_a_second_state() -> anyhow::Result<()> {
    let cluster = TestCluster::start(4)?;
    cluster.broker.create_topic("test.minutes", 4)?;
    let topics = Topics::default();
    let cam = topics.camera.as_str();
    let seg = |j: i32| format!("seg-{j}");
    let event = |j: i32, t: i64| detection(&seg(j), t, "car", Some(30.0));
    // Each segment in its own partition, keyed by itself; segment 1's record keyed by its
    // JSON text.
    cluster
        .produce(cam, 0, &seg(0), &event(0, T0 + 1_000))
        .await?;
    cluster
        .produce(cam, 0, &seg(0), &event(0, T0 + 2_000))
        .await?;
    cluster
        .produce(cam, 1, "\"seg-1\"", &event(1, T0 + 1_000))
        .await?;
    // Segment 0's records in partitions 2 and 3, without a key.
    let unkeyed = [event(0, T0 + 3_000), event(0, T0 + 4_000)];
    cluster.produce_without_key(cam, 2, &unkeyed[0]).await?;
    cluster.produce_without_key(cam, 3, &unkeyed[1]).await?;
    cluster
        .produce(cam, 2, &seg(2), &event(2, T0 + 5_000))
        .await?;
    cluster
        .produce(cam, 3, &seg(3), &event(3, T0 + 6_000))
        .await?;
    // Two minutes on in every partition: minute 0 closes.
    for j in 0..4 {
        cluster
            .produce(cam, j, &seg(j), &event(j, T0 + 125_000))
            .await?;
    }
    let dir = tempfile::tempdir()?;
    let mut config = minutes_config(&cluster, dir.path(), Duration::from_secs(60));
    config.checkpoint = None;
    config.group_id = "unkeyed".into();
    config.from_beginning = true;
    let stats = Arc::new(PipelineStats::new());
    let stop = Arc::new(AtomicBool::new(false));
    let pipeline = Pipeline::new(config, stats.clone()).await?;
    let task = tokio::spawn(pipeline.run(stop.clone()));

    let minutes = cluster.consumer("test.minutes")?;
    let mut rows: Vec<_> = read_json(&minutes, 4, Duration::from_secs(60))
        .await?
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    rows.extend(read_more(&minutes, Duration::from_secs(2)).await);
    let counts = minute_counts(&rows);
    let want: Vec<(String, i64, i64)> = (0..4)
        .map(|j| (seg(j), T0, if j == 0 { 2 } else { 1 }))
        .collect();
    assert_eq!(counts, want);

    let dlq = cluster.consumer(&topics.dlq)?;
    let mut dead = read_json(&dlq, 2, Duration::from_secs(30)).await?;
    dead.extend(
        read_more(&dlq, Duration::from_secs(1))
            .await
            .into_iter()
            .map(|v| (None, v)),
    );
    dead.sort_by_key(|(_, v)| v["partition"].as_i64());
    let seen: Vec<_> = dead
        .iter()
        .map(|(key, v)| {
            (
                key.clone(),
                v["partition"].as_i64(),
                v["offset"].as_i64(),
                v["stage"].as_str().map(String::from),
                v["payload"].as_str().map(String::from),
            )
        })
        .collect();
    let dead_letter = |partition: i64, payload: &[u8]| {
        (
            None,
            Some(partition),
            Some(0),
            Some("validate".to_string()),
            Some(b64(payload)),
        )
    };
    assert_eq!(
        seen,
        [dead_letter(2, &unkeyed[0]), dead_letter(3, &unkeyed[1])]
    );
    for (_, v) in &dead {
        let error = v["error"].as_str().unwrap_or_default();
        assert!(
            error.starts_with(
                "record without a key, where city.camera.events is declared keyed by \
                 segment_id (\"seg-0\")"
            ) && error.contains("declare the table without 'key'"),
            "{error}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    task.await??;
    assert_eq!(stats.dlq.load(Ordering::Relaxed), 2);
    assert_eq!(stats.late.load(Ordering::Relaxed), 0);
    Ok(())
}

/// The (segment, window start, count) of each row of `test.minutes`, sorted.
fn minute_counts(rows: &[serde_json::Value]) -> Vec<(String, i64, i64)> {
    let mut counts: Vec<(String, i64, i64)> = rows
        .iter()
        .map(|v| {
            (
                v["segment_id"].as_str().unwrap_or_default().to_string(),
                v["window_start"].as_i64().unwrap_or(-1),
                v["n"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    counts.sort();
    counts
}

/// Records without a key stay in the query when another of its statements reads their topic
/// without state per partition (here one passing every record on): that statement reads them
/// correctly, and none goes to the DLQ. (The per-segment counts beside it then count such a
/// record in its own partition, as README says.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_without_a_key_stay_when_another_statement_reads_them_whole() -> anyhow::Result<()>
{
    let cluster = TestCluster::start(4)?;
    cluster.broker.create_topic("test.minutes", 4)?;
    cluster.broker.create_topic("test.passed", 4)?;
    let cam = Topics::default().camera;
    let seg = |j: i32| format!("seg-{j}");
    let event = |j: i32, t: i64| detection(&seg(j), t, "car", Some(30.0));
    cluster
        .produce(&cam, 0, &seg(0), &event(0, T0 + 1_000))
        .await?;
    cluster
        .produce_without_key(&cam, 2, &event(0, T0 + 2_000))
        .await?;
    cluster
        .produce_without_key(&cam, 3, &event(0, T0 + 3_000))
        .await?;
    let dir = tempfile::tempdir()?;
    let mut config = minutes_config(&cluster, dir.path(), Duration::from_secs(60));
    config.checkpoint = None;
    config.group_id = "unkeyed-passed".into();
    config.from_beginning = true;
    config.queries[0].1.push_str(
        ";
         CREATE EXTERNAL TABLE passed (segment_id VARCHAR NOT NULL, event_time TIMESTAMP NOT NULL)
         STORED AS KAFKA OPTIONS ('topic' 'test.passed', 'format' 'json');
         INSERT INTO passed SELECT segment_id, event_time FROM camera_events",
    );
    let stats = Arc::new(PipelineStats::new());
    let stop = Arc::new(AtomicBool::new(false));
    let pipeline = Pipeline::new(config, stats.clone()).await?;
    let task = tokio::spawn(pipeline.run(stop.clone()));
    let passed = cluster.consumer("test.passed")?;
    let mut times: Vec<i64> = read_json(&passed, 3, Duration::from_secs(60))
        .await?
        .into_iter()
        .filter_map(|(_, v)| v["event_time"].as_i64())
        .collect();
    times.sort();
    assert_eq!(times, [T0 + 1_000, T0 + 2_000, T0 + 3_000]);
    stop.store(true, Ordering::Relaxed);
    task.await??;
    assert_eq!(stats.dlq.load(Ordering::Relaxed), 0);
    Ok(())
}

/// On a topic of one partition every group's records are together, keyed or not: a query
/// keeping state per partition of it counts records without a key, and sends none to the DLQ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_without_a_key_in_a_topic_of_one_partition_are_counted() -> anyhow::Result<()> {
    let cluster = TestCluster::start(1)?;
    cluster.broker.create_topic("test.single.in", 1)?;
    cluster.broker.create_topic("test.single.out", 1)?;
    let record = |k: &str, t: i64| serde_json::to_vec(&json!({"k": k, "ts": t}));
    for (k, t) in [("a", 1_000), ("a", 2_000), ("b", 3_000), ("a", 125_000)] {
        cluster
            .produce_without_key("test.single.in", 0, &record(k, T0 + t)?)
            .await?;
    }
    let stats = Arc::new(PipelineStats::new());
    let stop = Arc::new(AtomicBool::new(false));
    let mut config = PipelineConfig::new(&cluster.brokers);
    config.group_id = "single".into();
    config.name = Some("single".into());
    config.default_queries = false;
    config.from_beginning = true;
    config.queries = vec![(
        "single".into(),
        "CREATE EXTERNAL TABLE ev (k VARCHAR NOT NULL, ts TIMESTAMP NOT NULL)
         STORED AS KAFKA OPTIONS ('topic' 'test.single.in', 'format' 'json', 'key' 'k',
           'event_time' 'ts', 'watermark_delay' '0s');
         CREATE EXTERNAL TABLE o (k VARCHAR NOT NULL, window_start TIMESTAMP NOT NULL,
           c BIGINT NOT NULL)
         STORED AS KAFKA OPTIONS ('topic' 'test.single.out', 'format' 'json', 'key' 'k');
         INSERT INTO o SELECT k, window_start, count(*) AS c FROM ev
         GROUP BY tumble(ts, INTERVAL '1 minute'), k"
            .into(),
    )];
    let pipeline = Pipeline::new(config, stats.clone()).await?;
    let task = tokio::spawn(pipeline.run(stop.clone()));
    let out = cluster.consumer("test.single.out")?;
    let mut rows: Vec<(String, i64, i64)> = read_json(&out, 2, Duration::from_secs(60))
        .await?
        .into_iter()
        .map(|(_, v)| {
            (
                v["k"].as_str().unwrap_or_default().to_string(),
                v["window_start"].as_i64().unwrap_or(-1),
                v["c"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    rows.sort();
    assert_eq!(rows, [("a".to_string(), T0, 2), ("b".to_string(), T0, 1)]);
    stop.store(true, Ordering::Relaxed);
    task.await??;
    assert_eq!(stats.dlq.load(Ordering::Relaxed), 0);
    Ok(())
}

/// A checkpoint is written when the state or the input positions have changed since the last,
/// not every interval: an idle query writes none (its files and object-store writes would
/// grow with idle time), the next record it reads is checkpointed again, and a restart after
/// an idle stop resumes from the checkpoint written last, over 4 partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_query_writes_no_checkpoint_until_it_reads_again() -> anyhow::Result<()> {
    let cluster = TestCluster::start(4)?;
    let topic = Topics::default().camera;
    for j in 0..4i32 {
        let segment = format!("seg-{j}");
        for k in 0..3 {
            let record = detection(&segment, T0 + k * 1_000, "car", Some(30.0));
            cluster.produce(&topic, j, &segment, &record).await?;
        }
    }
    let dir = tempfile::tempdir()?;
    let mut config = minutes_config(&cluster, dir.path(), Duration::from_millis(100));
    config.group_id = "idle-checkpoints".into();
    let stats = Arc::new(PipelineStats::new());
    let stop = Arc::new(AtomicBool::new(false));
    let pipeline = Pipeline::new(config.clone(), stats.clone()).await?;
    let task = tokio::spawn(pipeline.run(stop.clone()));
    let epoch = || {
        stats
            .last_checkpoint
            .lock()
            .ok()
            .and_then(|c| c.as_ref().map(|c| c.epoch))
            .unwrap_or(0)
    };
    // Once every record is read, the epochs stop: at some point within a minute (partitions
    // going idle move the watermark, and that is a change), two seconds (twenty intervals)
    // pass without one.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (mut last, mut since) = (epoch(), std::time::Instant::now());
    loop {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "checkpoints went on every interval while idle: epoch {} after a minute, {} records read",
            epoch(),
            stats.records_in.load(Ordering::Relaxed)
        );
        anyhow::ensure!(!task.is_finished(), "the pipeline stopped");
        let now = epoch();
        if now != last {
            (last, since) = (now, std::time::Instant::now());
        }
        if stats.records_in.load(Ordering::Relaxed) == 12
            && now > 0
            && since.elapsed() >= Duration::from_secs(2)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let idle = epoch();
    let record = detection("seg-1", T0 + 5_000, "car", Some(30.0));
    cluster.produce(&topic, 1, "seg-1", &record).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while epoch() == idle {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no checkpoint after a record was read"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stats.records_in.load(Ordering::Relaxed), 13);
    // Stopped while idle again (its last checkpoint not written again) and started anew from
    // its checkpoints: it resumes after the 13 records, with their counts, and publishes each
    // segment's minute once, exactly, when the next records close it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    task.await??;
    config.group_id = "idle-checkpoints-again".into();
    let stats = Arc::new(PipelineStats::new());
    let stop = Arc::new(AtomicBool::new(false));
    let pipeline = Pipeline::new(config, stats.clone()).await?;
    let task = tokio::spawn(pipeline.run(stop.clone()));
    let minutes = cluster.consumer("test.minutes")?;
    for j in 0..4i32 {
        let segment = format!("seg-{j}");
        let record = detection(&segment, T0 + 120_000, "car", Some(30.0));
        cluster.produce(&topic, j, &segment, &record).await?;
    }
    let mut rows = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while rows.len() < 4 && std::time::Instant::now() < deadline {
        rows.extend(read_more(&minutes, Duration::from_secs(1)).await);
    }
    rows.extend(read_more(&minutes, Duration::from_secs(1)).await);
    stop.store(true, Ordering::Relaxed);
    task.await??;
    assert_eq!(
        stats.records_in.load(Ordering::Relaxed),
        4,
        "the restarted query read records again"
    );
    let got = minute_counts(&rows);
    let want: Vec<(String, i64, i64)> = (0..4)
        .map(|j| (format!("seg-{j}"), T0, if j == 1 { 4 } else { 3 }))
        .collect();
    assert_eq!(got, want);
    Ok(())
}

/// A built-in query whose SQL changed with the binary finds its checkpoint taken under the
/// old SQL: when the state does not fit the new SQL the query stops, and since a built-in
/// query is neither dropped nor upgraded, the message says what can be done instead (reset
/// it, or pause it and register a copy). A registered query is told to go back to its old
/// SQL or reset it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_built_in_query_whose_state_does_not_fit_its_new_sql_says_what_to_do()
-> anyhow::Result<()> {
    let cluster = TestCluster::start(4)?;
    produce_minutes(&cluster, 3, |_, _| 2, 5).await?;
    let dir = tempfile::tempdir()?;
    let mut config = minutes_config(&cluster, dir.path(), Duration::from_secs(3600));
    config.group_id = "built-in-upgrade".into();
    // The old SQL runs until it has read everything, and checkpoints as it stops.
    let stats = Arc::new(PipelineStats::new());
    let stop = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn(
        Pipeline::new(config.clone(), stats.clone())
            .await?
            .run(stop.clone()),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while stats.records_in.load(Ordering::Relaxed) < 4 * 3 * 2 {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the input was not read"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    task.await??;
    // The new SQL keeps another aggregate: its state does not fit.
    config.queries[0].1 = config.queries[0].1.replace("count(*) AS n", "max(1) AS n");
    for builtin in [true, false] {
        config.builtin = builtin;
        let error = Pipeline::new(config.clone(), Arc::new(PipelineStats::new()))
            .await?
            .run(Arc::new(AtomicBool::new(false)))
            .await
            .expect_err("a state that does not fit stops the query")
            .to_string();
        let root = dir.path().display().to_string();
        if builtin {
            for said in [
                "built-in query minutes was checkpointed under the SQL of another version",
                "urbanstream query reset minutes",
                &format!("its state at {root} removed"),
                "urbanstream query pause minutes",
            ] {
                assert!(error.contains(said), "{said:?} not in: {error}");
            }
        } else {
            assert!(
                error.contains("checkpointed under other SQL")
                    && error.contains("urbanstream query reset minutes"),
                "{error}"
            );
        }
    }
    Ok(())
}

/// Regression: in the demo, most of the warm-up's air history went to the late topic. The
/// default queries keep one state for all partitions (some cannot be split), yet the
/// per-sensor aggregates went through their repartition topic: one instance read every
/// internal partition, each at its own pace, so a ward partition's readings passed on to one
/// internal partition moved its watermark past those still waiting in another. With one
/// state for all, a query now reads its input itself. A backlog of four hours of every
/// sensor's readings, keyed by ward over 4 partitions, is read with nothing late and every
/// closed hour of every sensor complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_read_in_one_state_for_all_partitions_is_not_late() -> anyhow::Result<()> {
    let cluster = TestCluster::start(4)?;
    let topics = Topics::default();
    let sensors: Vec<(String, String)> = include_str!("../schemas/reference/sensors.csv")
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split(',');
            Some((fields.next()?.to_string(), fields.next()?.to_string()))
        })
        .collect();
    let hours = 4;
    let mut records = Vec::new();
    for minute in 0..hours * 60 {
        for (sensor, ward) in &sensors {
            let reading = json!({"sensor_id": sensor, "ward_id": ward,
                "event_time": T0 + minute * 60_000 + 5_000, "pm25": 30.0 + (minute % 7) as f64});
            records.push((
                topics.air.clone(),
                ward.clone(),
                serde_json::to_vec(&reading)?,
            ));
        }
    }
    cluster.produce_keyed(&records, 4).await?;

    let stats = Arc::new(PipelineStats::new());
    let stop = Arc::new(AtomicBool::new(false));
    let mut config = PipelineConfig::new(&cluster.brokers);
    config.group_id = "air-backlog".into();
    let pipeline = Pipeline::new(config, stats.clone()).await?;
    let task = tokio::spawn(pipeline.run(stop.clone()));

    // Every sensor's hours 1 to 3 (those closed by the readings of the fourth).
    let indicators = cluster.consumer(&topics.air_indicators)?;
    let mut readings: std::collections::BTreeMap<(String, i64), i64> = Default::default();
    let want = sensors.len() * (hours as usize - 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while readings.len() < want {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{} of {want} sensor-hours published; {} records late",
            readings.len(),
            stats.late.load(Ordering::Relaxed)
        );
        anyhow::ensure!(
            !task.is_finished(),
            "the pipeline stopped: {:?}",
            task.await
        );
        for row in read_more(&indicators, Duration::from_millis(500)).await {
            if row["scope"] == "sensor" && row["is_final"] != false {
                let start = row["window_start"].as_i64().unwrap_or_default();
                if start >= T0 && start < T0 + (hours - 1) * 3_600_000 {
                    let entity = row["entity_id"].as_str().unwrap_or_default().to_string();
                    readings.insert((entity, start), row["readings"].as_i64().unwrap_or(-1));
                }
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    task.await??;
    let short: Vec<_> = readings.iter().filter(|(_, n)| **n != 60).collect();
    assert!(
        short.is_empty(),
        "sensor-hours without all 60 readings: {short:?}"
    );
    assert_eq!(
        stats.air_readings.load(Ordering::Relaxed),
        records.len() as u64
    );
    assert_eq!(stats.late.load(Ordering::Relaxed), 0);
    Ok(())
}

/// Pacing: a query working slowly through a backlog (micro-batches of one record) with an
/// idle timeout far shorter than the backlog takes (200 ms; one state for all partitions: a
/// detector keyed by another column than the topic's beside the windows) reads 4
/// partitions' backlog with nothing late and every window exact: the partitions it is
/// behind on keep delivering in turn, and none goes idle meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_read_one_record_at_a_time_is_not_late() -> anyhow::Result<()> {
    let cluster = TestCluster::start(4)?;
    let topic = Topics::default().air;
    let mut records = Vec::new();
    let mut want: std::collections::BTreeMap<(String, i64), i64> = Default::default();
    for p in 0..4 {
        for i in 0..300i64 {
            let (g, t) = (format!("g{}", i % 3), T0 + i * 1_000);
            *want.entry((g.clone(), T0 + i / 60 * 60_000)).or_default() += 1;
            records.push((p, json!({"k": format!("k{p}"), "g": g, "t": t})));
        }
        records.push((
            p,
            json!({"k": format!("k{p}"), "g": "end", "t": T0 + 3_600_000}),
        ));
    }
    for (p, record) in &records {
        cluster
            .produce(&topic, *p, &format!("k{p}"), &serde_json::to_vec(record)?)
            .await?;
    }
    let stats = Arc::new(PipelineStats::new());
    let stop = Arc::new(AtomicBool::new(false));
    let mut config = PipelineConfig::new(&cluster.brokers);
    config.group_id = "slow-backlog".into();
    config.default_queries = false;
    config.max_batch_rows = 1;
    config.queries = vec![(
        "per_g".into(),
        format!(
            "CREATE EXTERNAL TABLE ev (k VARCHAR NOT NULL, g VARCHAR NOT NULL,
               t TIMESTAMP NOT NULL)
             STORED AS KAFKA OPTIONS ('topic' '{topic}', 'format' 'json', 'event_time' 't',
               'key' 'k', 'watermark_delay' '0s', 'idle_timeout' '200ms');
             CREATE EXTERNAL TABLE per_g (g VARCHAR NOT NULL, window_start TIMESTAMP NOT NULL,
               n BIGINT NOT NULL)
             STORED AS KAFKA OPTIONS ('topic' 'test.per_g', 'format' 'json');
             INSERT INTO per_g SELECT g, window_start, count(*) AS n FROM ev
             GROUP BY tumble(t, INTERVAL '1 minute'), g;
             CREATE EXTERNAL TABLE scores (g VARCHAR NOT NULL, score DOUBLE)
             STORED AS KAFKA OPTIONS ('topic' 'test.scores', 'format' 'json');
             INSERT INTO scores SELECT g, d['score'] AS score FROM (SELECT g,
               anomaly_score(1.0, t) OVER (PARTITION BY g ORDER BY t) AS d FROM ev)"
        ),
    )];
    let pipeline = Pipeline::new(config, stats.clone()).await?;
    let task = tokio::spawn(pipeline.run(stop.clone()));
    let out = cluster.consumer("test.per_g")?;
    let mut got: std::collections::BTreeMap<(String, i64), i64> = Default::default();
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while got.len() < want.len() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{} of {} windows; {} records late",
            got.len(),
            want.len(),
            stats.late.load(Ordering::Relaxed)
        );
        anyhow::ensure!(
            !task.is_finished(),
            "the pipeline stopped: {:?}",
            task.await
        );
        for row in read_more(&out, Duration::from_millis(500)).await {
            let g = row["g"].as_str().unwrap_or_default().to_string();
            let start = row["window_start"].as_i64().unwrap_or_default();
            if g != "end" {
                got.insert((g, start), row["n"].as_i64().unwrap_or(-1));
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    task.await??;
    assert_eq!(stats.late.load(Ordering::Relaxed), 0);
    assert_eq!(got, want);
    Ok(())
}

/// A record the query's plan fails on by its values alone (here a segment code cast to a
/// number that it is not) goes to the DLQ with stage `query`, the error and where it was
/// read, and the query goes on over 4 partitions: every other record is counted. The query
/// used to fail for good, and again on the same record at every restart. Grouped by the
/// code, the query is repartitioned and the record fails in the plan that keys it; without
/// a window, in the query's own plan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_query_fails_on_goes_to_the_dlq_and_the_rest_goes_on() -> anyhow::Result<()> {
    records_the_query_fails_on(
        "INSERT INTO coded SELECT CAST(segment_id AS BIGINT) AS code, window_start,
           count(*) AS n
         FROM camera_events GROUP BY tumble(event_time, INTERVAL '1 minute'),
           CAST(segment_id AS BIGINT)",
        true,
    )
    .await?;
    records_the_query_fails_on(
        "INSERT INTO coded SELECT CAST(segment_id AS BIGINT) AS code,
           date_trunc('minute', event_time) AS window_start, CAST(1 AS BIGINT) AS n
         FROM camera_events WHERE speed_kmh IS NOT NULL",
        false,
    )
    .await
}

/// A window's result the plan above the windows fails on by its values (a count of speeds of
/// 0 as a divisor) goes to the DLQ with stage `result`, the window's row as its payload and
/// the input partition it was computed from, and the window's other results and the next
/// windows are published, over 4 partitions. The query used to fail for good, and again on
/// the same window at every restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_result_the_query_fails_on_goes_to_the_dlq_and_the_rest_goes_on()
-> anyhow::Result<()> {
    let cluster = TestCluster::start(4)?;
    let topics = Topics::default();
    let mut want = std::collections::BTreeMap::new();
    let mut refused = std::collections::BTreeSet::new();
    for j in 0..4i32 {
        let segment = format!("seg{j}");
        for m in 0..4i64 {
            // In one minute of each partition (another each), no detection has a speed.
            let speedless = m == i64::from(j);
            for k in 0..3i64 {
                let speed = (!speedless).then_some(30.0);
                let record = detection(&segment, T0 + m * 60_000 + k * 1_000, "car", speed);
                cluster
                    .produce(&topics.camera, j, &segment, &record)
                    .await?;
            }
            if speedless {
                refused.insert((j, segment.clone(), T0 + m * 60_000));
            } else {
                want.insert((segment.clone(), T0 + m * 60_000), 1);
            }
        }
        // Closes the four minutes; its own stays open.
        let record = detection(&segment, T0 + 6 * 60_000, "car", Some(1.0));
        cluster
            .produce(&topics.camera, j, &segment, &record)
            .await?;
    }
    let stats = Arc::new(PipelineStats::new());
    let stop = Arc::new(AtomicBool::new(false));
    let mut config = PipelineConfig::new(&cluster.brokers);
    config.group_id = "ratios".into();
    config.default_queries = false;
    config.name = Some("ratios".into());
    config.queries = vec![(
        "ratios".into(),
        "CREATE EXTERNAL TABLE ratios (segment_id VARCHAR NOT NULL,
           window_start TIMESTAMP NOT NULL, r BIGINT NOT NULL)
         STORED AS KAFKA OPTIONS ('topic' 'test.ratios', 'format' 'json');
         INSERT INTO ratios SELECT segment_id, window_start, count(*) / count(speed_kmh) AS r
         FROM camera_events GROUP BY tumble(event_time, INTERVAL '1 minute'), segment_id"
            .into(),
    )];
    let pipeline = Pipeline::new(config, stats.clone()).await?;
    let task = tokio::spawn(pipeline.run(stop.clone()));
    let (ratios, dlq) = (
        cluster.consumer("test.ratios")?,
        cluster.consumer(&topics.dlq)?,
    );
    let rows = read_json(&ratios, want.len(), Duration::from_secs(60)).await;
    let dead = read_json(&dlq, refused.len(), Duration::from_secs(30)).await;
    // Nothing more: no window published twice, none refused twice.
    let more = read_more(&ratios, Duration::from_secs(2)).await;
    let more_dead = read_more(&dlq, Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    task.await??;
    assert!(
        more.is_empty() && more_dead.is_empty(),
        "{more:?} {more_dead:?}"
    );
    let mut got = std::collections::BTreeMap::new();
    for (_, v) in rows? {
        let key = (
            v["segment_id"].as_str().unwrap_or_default().to_string(),
            v["window_start"].as_i64().unwrap_or(-1),
        );
        let r = v["r"].as_i64().unwrap_or(-1);
        anyhow::ensure!(
            got.insert(key.clone(), r).is_none(),
            "{key:?} published twice"
        );
    }
    assert_eq!(got, want);
    let mut dead_windows = std::collections::BTreeSet::new();
    for (_, v) in dead? {
        assert_eq!(v["stage"], "result", "{v}");
        assert_eq!(v["query"], "ratios", "{v}");
        assert_eq!(v["topic"], topics.camera.as_str(), "{v}");
        assert_eq!(v["offset"], -1, "{v}");
        let error = v["error"].as_str().unwrap_or_default();
        assert!(
            error.starts_with("the query failed on a result of its window")
                && error.contains("Divide by zero"),
            "{error}"
        );
        use base64::Engine as _;
        use datafusion::arrow::array::{AsArray, StringArray};
        use datafusion::arrow::datatypes::{DataType, TimeUnit, TimestampMillisecondType};
        let payload = base64::engine::general_purpose::STANDARD
            .decode(v["payload"].as_str().unwrap_or_default())?;
        let row: serde_json::Value = serde_json::from_slice(&payload)?;
        assert_eq!(row["count(*)"], 3, "{row}");
        assert_eq!(row["count(camera_events.speed_kmh)"], 0, "{row}");
        let start = datafusion::arrow::compute::cast(
            &StringArray::from(vec![row["window_start"].as_str().unwrap_or_default()]),
            &DataType::Timestamp(TimeUnit::Millisecond, None),
        )?;
        let start = start.as_primitive::<TimestampMillisecondType>().value(0);
        dead_windows.insert((
            v["partition"].as_i64().unwrap_or(-2) as i32,
            row["segment_id"].as_str().unwrap_or_default().to_string(),
            start,
        ));
    }
    assert_eq!(dead_windows, refused);
    assert!(
        stats.dlq.load(Ordering::Relaxed) >= refused.len() as u64,
        "the DLQ records are counted"
    );
    Ok(())
}

/// A result row with a float JSON cannot carry (here 1 / 0.0) goes to the DLQ with stage
/// `result`, naming the column and its value, instead of being published with a null there;
/// the other rows are published, over 4 partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_json_cannot_carry_goes_to_the_dlq() -> anyhow::Result<()> {
    let cluster = TestCluster::start(4)?;
    let topics = Topics::default();
    let (mut finite, mut infinite) = (0, 0);
    for j in 0..4i32 {
        let segment = format!("seg{j}");
        for k in 0..6i64 {
            // One detection in three at 30 km/h: 1 / (speed - 30) is infinite.
            let speed = if (k + i64::from(j)) % 3 == 0 {
                30.0
            } else {
                40.0
            };
            let record = detection(&segment, T0 + k * 1_000, "car", Some(speed));
            cluster
                .produce(&topics.camera, j, &segment, &record)
                .await?;
            match speed == 30.0 {
                true => infinite += 1,
                false => finite += 1,
            }
        }
    }
    let stats = Arc::new(PipelineStats::new());
    let stop = Arc::new(AtomicBool::new(false));
    let mut config = PipelineConfig::new(&cluster.brokers);
    config.group_id = "inverse".into();
    config.default_queries = false;
    config.name = Some("inverse".into());
    config.queries = vec![(
        "inverse".into(),
        "CREATE EXTERNAL TABLE inverse (segment_id VARCHAR NOT NULL, r DOUBLE)
         STORED AS KAFKA OPTIONS ('topic' 'test.inverse', 'format' 'json');
         INSERT INTO inverse SELECT segment_id, 1.0 / (speed_kmh - 30.0) AS r
         FROM camera_events"
            .into(),
    )];
    let pipeline = Pipeline::new(config, stats.clone()).await?;
    let task = tokio::spawn(pipeline.run(stop.clone()));
    let (inverse, dlq) = (
        cluster.consumer("test.inverse")?,
        cluster.consumer(&topics.dlq)?,
    );
    let rows = read_json(&inverse, finite, Duration::from_secs(60)).await;
    let dead = read_json(&dlq, infinite, Duration::from_secs(30)).await;
    // Nothing more: an infinite row is not published (as a null) beside its DLQ record.
    let more = read_more(&inverse, Duration::from_secs(2)).await;
    let more_dead = read_more(&dlq, Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    task.await??;
    assert!(
        more.is_empty() && more_dead.is_empty(),
        "{more:?} {more_dead:?}"
    );
    for (_, v) in rows? {
        assert!(
            v["r"].as_f64().is_some_and(|r| (r - 0.1).abs() < 1e-9),
            "{v}"
        );
    }
    for (_, v) in dead? {
        assert_eq!(v["stage"], "result", "{v}");
        assert_eq!(v["query"], "inverse", "{v}");
        let error = v["error"].as_str().unwrap_or_default();
        assert!(
            error.starts_with("r is inf, which a JSON record cannot carry"),
            "{error}"
        );
    }
    Ok(())
}

/// Runs `insert` (into `coded`: code, window_start, n) over 4 partitions of detections, one
/// in five of them of a segment whose code is no number, and checks what it publishes
/// (`windowed`: counts per code and minute; otherwise one row per record) and the DLQ.
async fn records_the_query_fails_on(insert: &str, windowed: bool) -> anyhow::Result<()> {
    let cluster = TestCluster::start(4)?;
    let topics = Topics::default();
    let mut bad = Vec::new();
    let mut want = std::collections::BTreeMap::new();
    for j in 0..4i32 {
        let mut offset = 0;
        for m in 0..3i64 {
            for k in 0..5i64 {
                let t = T0 + m * 60_000 + k * 1_000;
                // One record in five names its segment by a code that is no number.
                let segment = if (k + i64::from(j)) % 5 == 2 {
                    bad.push((j, offset));
                    format!("s{j}")
                } else {
                    format!("{}", 10 + j)
                };
                let record = detection(&segment, t, "car", Some(30.0));
                cluster
                    .produce(&topics.camera, j, &segment, &record)
                    .await?;
                offset += 1;
                if !segment.starts_with('s') {
                    *want
                        .entry((10 + i64::from(j), T0 + m * 60_000))
                        .or_insert(0) += 1;
                }
            }
        }
        // Closes the three minutes (its own stays open; without a speed, it is filtered
        // out without a window).
        let segment = format!("{}", 10 + j);
        let record = detection(&segment, T0 + 5 * 60_000, "car", None);
        cluster
            .produce(&topics.camera, j, &segment, &record)
            .await?;
    }
    let expected: usize = if windowed {
        want.len()
    } else {
        want.values().sum::<i64>() as usize
    };
    let stats = Arc::new(PipelineStats::new());
    let stop = Arc::new(AtomicBool::new(false));
    let mut config = PipelineConfig::new(&cluster.brokers);
    config.group_id = "coded".into();
    config.default_queries = false;
    config.name = Some("coded".into());
    config.queries = vec![(
        "coded".into(),
        format!(
            "CREATE EXTERNAL TABLE coded (code BIGINT NOT NULL, window_start TIMESTAMP NOT NULL,
               n BIGINT NOT NULL)
             STORED AS KAFKA OPTIONS ('topic' 'test.coded', 'format' 'json');
             {insert}"
        ),
    )];
    let pipeline = Pipeline::new(config, stats.clone()).await?;
    let task = tokio::spawn(pipeline.run(stop.clone()));
    let coded = cluster.consumer("test.coded")?;
    let rows = read_json(&coded, expected, Duration::from_secs(60)).await;
    let dlq = cluster.consumer(&topics.dlq)?;
    let dead = read_json(&dlq, bad.len(), Duration::from_secs(30)).await;
    stop.store(true, Ordering::Relaxed);
    task.await??;
    let mut got = std::collections::BTreeMap::new();
    for (_, v) in rows? {
        let key = (
            v["code"].as_i64().unwrap_or(-1),
            v["window_start"].as_i64().unwrap_or(-1),
        );
        let n = v["n"].as_i64().unwrap_or(-1);
        match windowed {
            true => anyhow::ensure!(got.insert(key, n).is_none(), "{key:?} published twice"),
            false => *got.entry(key).or_insert(0) += n,
        }
    }
    assert_eq!(got, want);
    let mut dead: Vec<(i64, i64)> = dead?
        .into_iter()
        .map(|(_, v)| {
            assert_eq!(v["stage"], "query", "{v}");
            assert_eq!(v["query"], "coded", "{v}");
            assert_eq!(v["topic"], topics.camera.as_str(), "{v}");
            let error = v["error"].as_str().unwrap_or_default();
            assert!(
                error.starts_with("the query failed on this record: ")
                    && error.contains("Cannot cast string 's"),
                "{error}"
            );
            (
                v["partition"].as_i64().unwrap_or(-1),
                v["offset"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    dead.sort();
    let mut bad: Vec<(i64, i64)> = bad.into_iter().map(|(p, o)| (i64::from(p), o)).collect();
    bad.sort();
    assert_eq!(dead, bad);
    assert!(
        stats.dlq.load(Ordering::Relaxed) >= bad.len() as u64,
        "the DLQ records are counted"
    );
    Ok(())
}

/// Detectors and `LAG` over windows grouped by another key than the input's (wards, of
/// segment-keyed camera events) are repartitioned when keyed by every group key: each
/// ward-and-class key's state lives in the internal partition of its groups. Segments of one
/// ward lie in different input partitions. Every window's count and change from the minute
/// before equal the model's; the detector's scores equal those of the same query run over
/// the same records in one state, offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detectors_over_windows_of_another_key_run_repartitioned() -> anyhow::Result<()> {
    use std::collections::BTreeMap;
    use urbanstream::source::RawBatch;
    let cluster = TestCluster::start(4)?;
    cluster.broker.create_topic("test.ward_changes", 4)?;
    let camera = Topics::default().camera;
    // (segment, ward, partition): each ward's segments spread over the partitions.
    let segments = [
        ("tay_son", "dong_da", 0),
        ("thai_ha_flyover", "dong_da", 1),
        ("lang_ntso", "lang", 2),
        ("lang_cau_giay", "lang", 3),
        ("nguyen_chi_thanh", "lang", 0),
        ("xuan_thuy", "cau_giay", 1),
        ("cau_giay_st", "cau_giay", 2),
        ("kim_ma_w", "giang_vo", 3),
    ];
    let classes = ["car", "motorbike"];
    let minutes = 11i64;
    let count = |i: usize, c: usize, m: i64| 1 + ((i * 5 + c * 3) as i64 + m * m) % 4;
    let mut records = RawBatch::new(camera.as_str());
    let mut n: BTreeMap<(String, String, i64), i64> = BTreeMap::new();
    for m in 0..minutes {
        for (i, (segment, ward, partition)) in segments.iter().enumerate() {
            for (c, class) in classes.iter().enumerate() {
                for k in 0..count(i, c, m) {
                    let t = T0 + m * 60_000 + (c as i64 * 10 + k) * 1_000;
                    let value = detection(segment, t, class, Some(30.0));
                    let (p, offset) = cluster
                        .produce(&camera, *partition, segment, &value)
                        .await?;
                    records.push(p, offset, Some(segment.as_bytes()), Some(&value));
                }
                *n.entry((ward.to_string(), class.to_string(), T0 + (m + 1) * 60_000))
                    .or_default() += count(i, c, m);
            }
        }
    }
    // A detection two minutes on in every partition closes the minutes before.
    for (segment, _, partition) in &segments[..4] {
        let value = detection(segment, T0 + (minutes + 1) * 60_000, "bus", Some(30.0));
        let (p, offset) = cluster
            .produce(&camera, *partition, segment, &value)
            .await?;
        records.push(p, offset, Some(segment.as_bytes()), Some(&value));
    }
    // The model: each key's count and its change from the minute before.
    let mut expected: Vec<(String, String, i64, i64, Option<i64>)> = Vec::new();
    let mut before: BTreeMap<(String, String), i64> = BTreeMap::new();
    for ((ward, class, end), count) in &n {
        let key = (ward.clone(), class.clone());
        let change = before.insert(key, *count).map(|b| count - b);
        expected.push((ward.clone(), class.clone(), *end, *count, change));
    }
    expected.sort();

    let sql = "CREATE EXTERNAL TABLE ward_changes (ward_id VARCHAR, vehicle_class VARCHAR, \
                 window_end TIMESTAMP NOT NULL, n BIGINT NOT NULL, change BIGINT, score DOUBLE) \
               STORED AS KAFKA OPTIONS ('topic' 'test.ward_changes', 'format' 'json'); \
               INSERT INTO ward_changes \
               SELECT ward_id, vehicle_class, window_end, n, \
                 n - lag(n) OVER (PARTITION BY ward_id, vehicle_class ORDER BY window_end) \
                   AS change, \
                 anomaly_score(CAST(n AS DOUBLE), window_end) \
                   OVER (PARTITION BY vehicle_class, ward_id ORDER BY window_end)['score'] AS score \
               FROM (SELECT s.ward_id, c.vehicle_class, window_end, count(*) AS n \
                 FROM camera_events c JOIN segments s ON c.segment_id = s.segment_id \
                 GROUP BY tumble(c.event_time, INTERVAL '1 minute'), s.ward_id, c.vehicle_class)";
    let stats = Arc::new(PipelineStats::new());
    let stop = Arc::new(AtomicBool::new(false));
    let mut config = PipelineConfig::new(&cluster.brokers);
    config.group_id = "ward-detectors".into();
    config.default_queries = false;
    config.from_beginning = true;
    config.queries = vec![("wards".into(), sql.into())];
    let pipeline = Pipeline::new(config, stats.clone()).await?;
    let task = tokio::spawn(pipeline.run(stop.clone()));
    let output = cluster.consumer("test.ward_changes")?;
    let rows = read_json(&output, expected.len(), Duration::from_secs(120)).await?;
    // Nothing more: the last minute is still open.
    let more = read_more(&output, Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    task.await??;
    assert!(more.is_empty(), "more rows than windows: {more:?}");
    assert_eq!(
        stats.partitioning.lock().ok().and_then(|p| *p),
        Some("repartitioned")
    );
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
    let mut got: Vec<(String, String, i64, i64, Option<i64>)> = rows
        .iter()
        .map(|(_, v)| {
            (
                text(&v["ward_id"]),
                text(&v["vehicle_class"]),
                v["window_end"].as_i64().unwrap_or_default(),
                v["n"].as_i64().unwrap_or_default(),
                v["change"].as_i64(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(got, expected);

    // The scores of one state over the same records, offline.
    let schemas = urbanstream::schema::SchemaRegistry::embedded()?;
    let ctx = urbanstream::plan::city_context(&Topics::default(), &schemas)?;
    let query = urbanstream::pipeline::offline::one_query(&ctx, sql, "the SQL").await?;
    let summary = urbanstream::pipeline::offline::run_query_over_records(
        query,
        &ctx,
        &[records],
        usize::MAX,
        &Default::default(),
        None,
    )
    .await?;
    let mut one_state: BTreeMap<(String, String, i64), Option<f64>> = BTreeMap::new();
    for batch in &summary.shown {
        let (bytes, ends) = urbanstream::sink::encode_json_rows(batch)?;
        let mut start = 0;
        for end in ends {
            let v: serde_json::Value = serde_json::from_slice(&bytes[start..end])?;
            start = end;
            let end = v["window_end"].as_i64().unwrap_or_default();
            if end <= T0 + minutes * 60_000 {
                one_state.insert(
                    (text(&v["ward_id"]), text(&v["vehicle_class"]), end),
                    v["score"].as_f64(),
                );
            }
        }
    }
    let repartitioned: BTreeMap<(String, String, i64), Option<f64>> = rows
        .iter()
        .map(|(_, v)| {
            (
                (
                    text(&v["ward_id"]),
                    text(&v["vehicle_class"]),
                    v["window_end"].as_i64().unwrap_or_default(),
                ),
                v["score"].as_f64(),
            )
        })
        .collect();
    assert_eq!(one_state.len(), expected.len());
    assert!(
        one_state.values().any(Option::is_some),
        "the detector scored nothing"
    );
    assert_eq!(repartitioned, one_state);
    Ok(())
}
