//! `urbanstream replay` into the embedded broker: a CSV of hourly station readings with local
//! times, columns renamed, produced in event-time order as epoch milliseconds keyed by
//! station; a row whose time cannot be read is counted, not produced; `--speedup` paces the
//! records by event time.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use urbanstream::cli::replay::{ReplayArgs, replay};
use urbanstream_tests::TestCluster;

fn args(cluster: &TestCluster, file: &std::path::Path, topic: &str) -> ReplayArgs {
    ReplayArgs {
        key: Some("sensor_id".into()),
        time: Some("event_time".into()),
        time_zone: "+07:00".into(),
        rename: vec!["station=sensor_id".into(), "time=event_time".into()],
        registry: String::new(),
        ..ReplayArgs::new(file, topic, &cluster.brokers)
    }
}

/// Every record of `topic`, (key, value) per partition in offset order.
async fn read_all(
    cluster: &TestCluster,
    topic: &str,
    n: usize,
) -> anyhow::Result<BTreeMap<i32, Vec<(String, serde_json::Value)>>> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cluster.brokers)
        .set("group.id", format!("replay-check-{topic}"))
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[topic])?;
    let mut out: BTreeMap<i32, Vec<(String, serde_json::Value)>> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = 0;
    while seen < n && Instant::now() < deadline {
        let Ok(m) = tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await else {
            continue;
        };
        let m = m?;
        let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
        let value: serde_json::Value = serde_json::from_slice(m.payload().unwrap_or_default())?;
        out.entry(m.partition()).or_default().push((key, value));
        seen += 1;
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csv_of_station_hours_goes_into_a_topic_in_time_order() -> anyhow::Result<()> {
    let cluster = TestCluster::start(4)?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("stations.csv");
    // Out of order in the file, local Hanoi times (UTC+7), one unreadable time.
    std::fs::write(
        &file,
        "station,time,pm25\n\
         hk-01,2026-01-01 08:00:00,41.5\n\
         hk-01,2026-01-01 06:00:00,35.0\n\
         cg-02,2026-01-01 07:00:00,52.25\n\
         hk-01,2026-01-01 07:00:00,38.0\n\
         cg-02,yesterday,10.0\n\
         cg-02,2026-01-01 06:00:00,49.0\n",
    )?;
    let summary = replay(&args(&cluster, &file, "stations")).await?;
    assert_eq!(summary.produced, 5);
    assert_eq!(summary.skipped, 1);
    assert_eq!(summary.first_skipped.as_deref(), Some("yesterday"));
    // 2026-01-01 06:00 at UTC+7 is 2025-12-31 23:00 UTC.
    let six = 1_767_222_000_000_i64;
    assert_eq!(summary.span_ms, Some((six, six + 2 * 3_600_000)));

    let records = read_all(&cluster, "stations", 5).await?;
    let mut by_station: BTreeMap<String, Vec<(i64, f64)>> = BTreeMap::new();
    for rows in records.values() {
        for (key, value) in rows {
            assert_eq!(
                value["sensor_id"],
                key.as_str(),
                "keyed by station: {value}"
            );
            by_station.entry(key.clone()).or_default().push((
                value["event_time"].as_i64().expect("epoch ms"),
                value["pm25"].as_f64().expect("pm25"),
            ));
        }
    }
    let hour = 3_600_000;
    assert_eq!(
        by_station,
        BTreeMap::from([
            ("cg-02".to_string(), vec![(six, 49.0), (six + hour, 52.25)]),
            (
                "hk-01".to_string(),
                vec![(six, 35.0), (six + hour, 38.0), (six + 2 * hour, 41.5)]
            ),
        ]),
        "each station's readings in event-time order, times in UTC milliseconds"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speedup_paces_records_by_event_time_and_bad_options_are_named() -> anyhow::Result<()> {
    let cluster = TestCluster::start(4)?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("two_hours.jsonl");
    std::fs::write(
        &file,
        "{\"station\":\"hk-01\",\"time\":1767222000,\"pm25\":35.0}\n\
         {\"station\":\"hk-01\",\"time\":1767225600,\"pm25\":38.0}\n\
         {\"station\":\"hk-01\",\"time\":1767229200,\"pm25\":41.5}\n",
    )?;
    let mut paced = args(&cluster, &file, "paced");
    paced.time_unit = "s".into();
    // Two hours of event time at 7 200× is one second.
    paced.speedup = Some(7_200.0);
    let started = Instant::now();
    let summary = replay(&paced).await?;
    assert_eq!(summary.produced, 3);
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "not paced: {:?}",
        started.elapsed()
    );
    let records = read_all(&cluster, "paced", 3).await?;
    let times: Vec<i64> = records
        .values()
        .flatten()
        .map(|(_, v)| v["event_time"].as_i64().unwrap_or_default())
        .collect();
    assert_eq!(
        times,
        vec![1_767_222_000_000, 1_767_225_600_000, 1_767_229_200_000]
    );

    // Every time readable: the CSV reader takes the column for timestamps without a zone,
    // which are local times in --time-zone all the same.
    let local = dir.path().join("local.csv");
    std::fs::write(
        &local,
        "station,time,pm25\nhk-01,2026-01-01 06:00:00,35.0\n",
    )?;
    let summary = replay(&args(&cluster, &local, "local")).await?;
    assert_eq!(
        summary.span_ms,
        Some((1_767_222_000_000, 1_767_222_000_000))
    );

    let mut bad = args(&cluster, &file, "paced");
    bad.rename = vec!["stationid=sensor_id".into()];
    let e = replay(&bad).await.expect_err("unknown column");
    assert!(e.to_string().contains("has no column stationid"), "{e}");
    // One name per column: a rename onto another column's name failed deep in the reader,
    // and a second rename of one column was ignored.
    for (renames, says) in [
        (
            vec!["station=sensor_id", "time=event_time", "time=k"],
            "--rename time=… is given twice",
        ),
        (
            vec!["station=sensor_id", "time=sensor_id"],
            "station is renamed sensor_id already",
        ),
        (
            vec!["pm25=time", "station=sensor_id"],
            "has a column time already: rename that one too",
        ),
    ] {
        let mut bad = args(&cluster, &file, "paced");
        bad.rename = renames.iter().map(|r| r.to_string()).collect();
        let e = replay(&bad).await.expect_err(says);
        assert!(e.to_string().contains(says), "{renames:?}: {e}");
    }
    // Into the city's air readings, keyed by ward as the topic is: keyed by sensor, one
    // ward's readings would be split between partitions, and its hours never complete.
    for key in [Some("sensor_id"), None] {
        let mut air = args(&cluster, &file, "city.air.readings");
        air.key = key.map(String::from);
        let e = replay(&air).await.expect_err("another key");
        assert!(
            e.to_string()
                .contains("city.air.readings is keyed by ward_id")
                && e.to_string().contains("--key ward_id"),
            "{e}"
        );
    }
    let mut unpaced = args(&cluster, &file, "paced");
    unpaced.time = None;
    unpaced.speedup = Some(600.0);
    let e = replay(&unpaced)
        .await
        .expect_err("--speedup without --time");
    assert!(
        e.to_string()
            .contains("name the event-time column with --time"),
        "{e}"
    );
    let mut bad = args(&cluster, &file.with_extension("xlsx"), "paced");
    bad.rename = Vec::new();
    let e = replay(&bad).await.expect_err("a spreadsheet");
    assert!(e.to_string().contains("nor .parquet"), "{e}");
    // Topic names the service refuses for a query's topics (a path, the broker's own).
    for (topic, words) in [
        ("../../etc", "is not a Kafka topic name"),
        ("__consumer_offsets", "is internal to the broker"),
    ] {
        let bad = args(&cluster, &file, topic);
        let e = replay(&bad).await.expect_err(topic);
        assert!(e.to_string().contains(words), "{e}");
    }
    // --partitions for a new topic on the embedded broker, which creates topics only on
    // their first record: refused, saying so (it waited a minute for a timeout).
    let mut partitioned = args(&cluster, &file, "not_yet_a_topic");
    partitioned.time_unit = "s".into();
    partitioned.partitions = Some(1);
    let e = replay(&partitioned).await.expect_err("no CreateTopics");
    assert!(
        e.to_string()
            .contains("the embedded broker cannot create topics on request"),
        "{e}"
    );
    // A topic that exists is replayed into as it is.
    let mut existing = args(&cluster, &file, "paced");
    existing.time_unit = "s".into();
    existing.partitions = Some(4);
    assert_eq!(replay(&existing).await?.produced, 3);
    Ok(())
}

/// The same station-hours as Parquet: epoch seconds, and timestamps with a zone (compressed
/// with Snappy, as most Parquet writers do), give the records the JSON-lines file gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_files_are_replayed_like_the_others() -> anyhow::Result<()> {
    use std::sync::Arc;

    use datafusion::arrow::array::{
        Float64Array, Int64Array, StringArray, TimestampMillisecondArray,
    };
    use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    use datafusion::arrow::record_batch::RecordBatch;
    use datafusion::parquet::arrow::ArrowWriter;
    use datafusion::parquet::basic::Compression;
    use datafusion::parquet::file::properties::WriterProperties;

    let cluster = TestCluster::start(2)?;
    let dir = tempfile::tempdir()?;
    let seconds = [1_767_229_200i64, 1_767_222_000, 1_767_225_600];
    let write = |name: &str, time: (DataType, Arc<dyn datafusion::arrow::array::Array>)| {
        let schema = Arc::new(Schema::new(vec![
            Field::new("station", DataType::Utf8, false),
            Field::new("time", time.0, false),
            Field::new("pm25", DataType::Float64, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(vec!["hk-01", "hk-01", "hk-02"])),
                time.1,
                Arc::new(Float64Array::from(vec![Some(41.5), Some(35.0), None])),
            ],
        )?;
        let path = dir.path().join(name);
        let properties = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build();
        let mut writer =
            ArrowWriter::try_new(std::fs::File::create(&path)?, schema, Some(properties))?;
        writer.write(&batch)?;
        writer.close()?;
        anyhow::Ok(path)
    };
    let epoch = write(
        "epoch.parquet",
        (
            DataType::Int64,
            Arc::new(Int64Array::from(seconds.to_vec())),
        ),
    )?;
    let stamped = write(
        "stamped.parquet",
        (
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            Arc::new(
                TimestampMillisecondArray::from(
                    seconds.iter().map(|s| s * 1_000).collect::<Vec<_>>(),
                )
                .with_timezone("UTC"),
            ),
        ),
    )?;
    let mut from_epoch = args(&cluster, &epoch, "parquet.epoch");
    from_epoch.time_unit = "s".into();
    assert_eq!(replay(&from_epoch).await?.produced, 3);
    assert_eq!(
        replay(&args(&cluster, &stamped, "parquet.stamped"))
            .await?
            .produced,
        3
    );
    for topic in ["parquet.epoch", "parquet.stamped"] {
        // In event-time order per key, as epoch milliseconds, renamed, nulls kept.
        let mut records: Vec<(String, i64, Option<f64>)> = read_all(&cluster, topic, 3)
            .await?
            .into_values()
            .flatten()
            .map(|(k, v)| {
                (
                    k,
                    v["event_time"].as_i64().unwrap_or_default(),
                    v["pm25"].as_f64(),
                )
            })
            .collect();
        records.sort_by_key(|r| r.1);
        assert_eq!(
            records,
            vec![
                ("hk-01".to_string(), 1_767_222_000_000, Some(35.0)),
                ("hk-02".to_string(), 1_767_225_600_000, None),
                ("hk-01".to_string(), 1_767_229_200_000, Some(41.5)),
            ],
            "{topic}"
        );
    }
    Ok(())
}

/// More bytes into one partition than the embedded broker keeps (5 MiB of its log; 24 000
/// records of about 210 bytes): the summary names the partition, its records and bytes, where
/// a replay of fewer than 100 000 records said nothing and the consumer then found about
/// 21 000. A replay within the limits is not flagged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_past_what_the_embedded_broker_keeps_says_so() -> anyhow::Result<()> {
    let cluster = TestCluster::start(2)?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("same_key.jsonl");
    let pad = "x".repeat(150);
    let mut text = String::new();
    for j in 0..24_000 {
        text.push_str(&format!(
            "{{\"k\":\"same\",\"event_time\":{},\"pad\":\"{pad}\",\"j\":{j}}}\n",
            1_767_225_600_000i64 + j
        ));
    }
    std::fs::write(&file, &text)?;
    let args = ReplayArgs {
        key: Some("k".into()),
        time: Some("event_time".into()),
        registry: String::new(),
        ..ReplayArgs::new(&file, "replay.big", &cluster.brokers)
    };
    let summary = replay(&args).await?;
    assert_eq!(summary.produced, 24_000);
    assert!(summary.embedded_broker);
    let beyond = summary.beyond_embedded_limits();
    assert_eq!(beyond.len(), 1, "{:?}", summary.per_partition);
    let (partition, records, bytes, start) = beyond[0];
    assert_eq!(records, 24_000);
    assert!(bytes > 4 << 20, "{bytes}");
    // The broker kept only the newest of them, as the summary says.
    let probe: rdkafka::consumer::BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cluster.brokers)
        .create()?;
    let (low, high) = probe.fetch_watermarks("replay.big", partition, Duration::from_secs(10))?;
    assert_eq!(high, 24_000);
    assert!(low > 0, "the broker kept all {high}");
    assert_eq!(start, low);

    let small = dir.path().join("small.jsonl");
    std::fs::write(
        &small,
        text.lines().take(100).collect::<Vec<_>>().join("\n"),
    )?;
    let summary = replay(&ReplayArgs {
        key: Some("k".into()),
        time: Some("event_time".into()),
        registry: String::new(),
        ..ReplayArgs::new(&small, "replay.small", &cluster.brokers)
    })
    .await?;
    assert_eq!(summary.produced, 100);
    assert!(summary.beyond_embedded_limits().is_empty());
    Ok(())
}
