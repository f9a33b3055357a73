//! Avro and Protobuf through the embedded broker: the same simulated city as JSON records, as
//! Confluent-framed Avro records (schemas in a directory registry) and as Protobuf messages
//! (the city's `.proto`; camera events Confluent-framed, the others plain) gives the same
//! congestion indicators, the Avro run writing them as Avro with the topic schemas registered;
//! Avro records with a bad magic byte, an unknown schema id or a truncated body go to the DLQ
//! with the reason, and cost no good record.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use rdkafka::message::Message;
use serde_json::Value;
use urbanstream::decode::avro::{avro_to_json, embedded_avsc};
use urbanstream::decode::{
    AvroEncoder, Codecs, Descriptors, ProtobufEncoder, Registry, TopicDecoder,
};
use urbanstream::pipeline::{Format, Pipeline, PipelineConfig, PipelineStats, Topics};
use urbanstream::reference::ReferenceData;
use urbanstream::schema::TopicSchema;
use urbanstream::simulate::{CitySimulator, SimConfig, SimTopic};
use urbanstream::source::RawBatch;
use urbanstream_tests::TestCluster;

const PARTITIONS: i32 = 4;

/// A partition for a key, the same for both formats.
fn partition_of(key: &str) -> i32 {
    let h = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    (h % PARTITIONS as u64) as i32
}

/// The city's topics under `prefix`, inputs in `input`, outputs in `output`.
fn topics(prefix: &str, input: Format, output: Format) -> Topics {
    let d = Topics::default();
    let p = |t: &str| format!("{prefix}.{t}");
    Topics {
        camera: p(&d.camera),
        detectors: p(&d.detectors),
        air: p(&d.air),
        congestion: p(&d.congestion),
        air_indicators: p(&d.air_indicators),
        congestion_top: p(&d.congestion_top),
        travel: p(&d.travel),
        alerts: p(&d.alerts),
        dlq: p(&d.dlq),
        late: p(&d.late),
        input_format: input,
        output_format: output,
        streams: [
            "parking_readings",
            "water_levels",
            "citizen_reports",
            "parking_availability",
            "water_indicators",
        ]
        .iter()
        .map(|t| (t.to_string(), p(&d.topic_of_table(t).expect("declared"))))
        .collect(),
    }
}

/// Rows of a topic, sorted, once nothing more arrives: until two seconds pass without a
/// record after the first (or fifteen without any).
/// Avro records are read with their writer schema from `registry`, and each is marked with
/// `"_avro": true`.
async fn settled(
    cluster: &TestCluster,
    topic: &str,
    registry: &Registry,
) -> anyhow::Result<Vec<Value>> {
    let consumer = cluster.consumer(topic)?;
    let mut rows = Vec::new();
    let mut wait = Duration::from_secs(15);
    while let Ok(message) = tokio::time::timeout(wait, consumer.recv()).await {
        let message = message?;
        let payload = message.payload().unwrap_or_default();
        rows.push(if payload.first() == Some(&0) {
            let mut row = avro_to_json(registry, payload).await?;
            row["_avro"] = Value::Bool(true);
            row
        } else {
            serde_json::from_slice(payload)?
        });
        wait = Duration::from_secs(2);
    }
    rows.sort_by_key(|v: &Value| v.to_string());
    Ok(rows)
}

/// The values of a topic's records, once nothing more arrives.
async fn settled_bytes(cluster: &TestCluster, topic: &str) -> anyhow::Result<Vec<Vec<u8>>> {
    let consumer = cluster.consumer(topic)?;
    let mut values = Vec::new();
    let mut wait = Duration::from_secs(15);
    while let Ok(message) = tokio::time::timeout(wait, consumer.recv()).await {
        values.push(message?.payload().unwrap_or_default().to_vec());
        wait = Duration::from_secs(2);
    }
    Ok(values)
}

/// Waits until the pipeline has decoded `n` camera events and rejected `dlq` records.
async fn consumed(stats: &PipelineStats, n: u64, dlq: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while stats.camera_events.load(Ordering::Relaxed) < n || stats.dlq.load(Ordering::Relaxed) < dlq
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} of {n} camera events, {} of {dlq} dead letters",
            stats.camera_events.load(Ordering::Relaxed),
            stats.dlq.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_and_protobuf_inputs_give_the_indicators_json_gives() -> anyhow::Result<()> {
    let cluster = TestCluster::start(PARTITIONS)?;
    let json_topics = Topics::default();
    let avro = topics("avro", Format::Avro, Format::Avro);
    let pb = topics("pb", Format::Protobuf, Format::Json);
    for topic in avro.all().into_iter().chain(pb.all()) {
        cluster.broker.create_topic(&topic, PARTITIONS)?;
    }
    let dir = tempfile::tempdir()?;
    let registry = Arc::new(Registry::dir(dir.path().join("registry"))?);
    let encoder = |schema: &'static str, topic: String| {
        let registry = registry.clone();
        async move {
            let avsc = embedded_avsc(schema).expect("schema");
            AvroEncoder::registered(&registry, &format!("{topic}-value"), avsc).await
        }
    };
    let camera = encoder("camera_event", avro.camera.clone()).await?;
    let detector = encoder("detector_reading", avro.detectors.clone()).await?;
    let air = encoder("air_reading", avro.air.clone()).await?;
    // Protobuf: camera events in the Confluent wire format, the others plain.
    let descriptors = Descriptors::embedded()?;
    let message = |name: &str, framed| {
        Ok::<_, anyhow::Error>(ProtobufEncoder::new(
            descriptors.message(&format!("urbanstream.city.{name}"))?,
            framed,
        ))
    };
    let pb_camera = message("CameraEvent", Some(1))?;
    let pb_detector = message("DetectorReading", None)?;
    let pb_air = message("AirReading", None)?;

    // Four simulated minutes of the city, well-formed, some of it out of order.
    let mut simulator = CitySimulator::new(
        SimConfig {
            seed: 7,
            detections_per_sim_second: 6.0,
            malformed_share: 0.0,
            late_share: 0.0,
            ..SimConfig::default()
        },
        Arc::new(ReferenceData::embedded()?),
    );
    let mut cameras = 0u64;
    let mut last_time = 0i64;
    let mut keys: BTreeMap<i32, String> = BTreeMap::new();
    for _ in 0..240 {
        for record in simulator.next_tick() {
            let p = partition_of(&record.key);
            let (json_topic, avro_topic, encoder, pb_topic, pb_encoder) = match record.topic {
                SimTopic::Camera => (
                    &json_topics.camera,
                    &avro.camera,
                    &camera,
                    &pb.camera,
                    &pb_camera,
                ),
                SimTopic::Detector => (
                    &json_topics.detectors,
                    &avro.detectors,
                    &detector,
                    &pb.detectors,
                    &pb_detector,
                ),
                SimTopic::Air => (&json_topics.air, &avro.air, &air, &pb.air, &pb_air),
                // The simulator makes the other feeds only when asked (`all_feeds`).
                SimTopic::Parking | SimTopic::Water | SimTopic::Report => continue,
            };
            if record.topic == SimTopic::Camera {
                cameras += 1;
                last_time = last_time.max(record.event_time);
                keys.entry(p).or_insert_with(|| record.key.clone());
            }
            cluster
                .produce(json_topic, p, &record.key, &record.payload)
                .await?;
            let value = encoder.encode_json(&record.payload)?;
            cluster.produce(avro_topic, p, &record.key, &value).await?;
            let value = pb_encoder.encode_json(&record.payload)?;
            cluster.produce(pb_topic, p, &record.key, &value).await?;
        }
    }
    anyhow::ensure!(
        keys.len() == PARTITIONS as usize,
        "a partition without cameras"
    );
    // A detection ten minutes on in every partition closes every window of both.
    for (p, key) in &keys {
        let closing = serde_json::to_vec(&serde_json::json!({
            "camera_id": "cam-0001", "segment_id": key, "event_time": last_time + 600_000,
            "vehicle_class": "car", "speed_kmh": 30.0, "confidence": 0.9}))?;
        cluster
            .produce(&json_topics.camera, *p, key, &closing)
            .await?;
        cluster
            .produce(&avro.camera, *p, key, &camera.encode_json(&closing)?)
            .await?;
        cluster
            .produce(&pb.camera, *p, key, &pb_camera.encode_json(&closing)?)
            .await?;
        cameras += 1;
    }
    // Bad Avro records, among the good ones.
    let good = camera.encode_json(&serde_json::to_vec(&serde_json::json!({
        "camera_id": "cam-0001", "segment_id": keys[&0], "event_time": last_time,
        "vehicle_class": "bus", "speed_kmh": 20.0, "confidence": 0.9}))?)?;
    let mut unknown = good.clone();
    unknown[1..5].copy_from_slice(&4242u32.to_be_bytes());
    let bad: Vec<(Vec<u8>, &str)> = vec![
        (b"{\"camera_id\":\"cam-0001\"}".to_vec(), "not Avro"),
        (unknown, "unknown schema id 4242"),
        (good[..good.len() - 3].to_vec(), "truncated Avro record"),
    ];
    for (value, _) in &bad {
        cluster.produce(&avro.camera, 0, &keys[&0], value).await?;
    }

    let run = |topics: Topics, group: &str| {
        let mut config = PipelineConfig::new(&cluster.brokers);
        config.group_id = group.into();
        config.topics = topics;
        config.registry = Some(registry.clone());
        config
    };
    let stop = Arc::new(AtomicBool::new(false));
    let json_stats = Arc::new(PipelineStats::new());
    let avro_stats = Arc::new(PipelineStats::new());
    let json_task = tokio::spawn(
        Pipeline::new(run(json_topics.clone(), "json"), json_stats.clone())
            .await?
            .run(stop.clone()),
    );
    let avro_task = tokio::spawn(
        Pipeline::new(run(avro.clone(), "avro"), avro_stats.clone())
            .await?
            .run(stop.clone()),
    );
    let pb_stats = Arc::new(PipelineStats::new());
    // The Protobuf run also writes per-minute counts as Protobuf messages of an operator's
    // `.proto`.
    let proto = dir.path().join("counts.proto");
    std::fs::write(
        &proto,
        "syntax = \"proto3\";\npackage test;\nmessage Counts { optional string segment_id = 1; \
         optional int64 window_start = 2; optional int64 vehicles = 3; }\n",
    )?;
    let counts_descriptors = Arc::new(Descriptors::load(&[proto])?);
    let mut pb_config = run(pb.clone(), "pb");
    pb_config.descriptors = Some(counts_descriptors.clone());
    pb_config.queries = vec![(
        "counts".into(),
        "CREATE EXTERNAL TABLE pb_counts (segment_id VARCHAR NOT NULL, \
         window_start TIMESTAMP NOT NULL, vehicles BIGINT NOT NULL) STORED AS KAFKA \
         OPTIONS ('topic' 'pb.counts', 'format' 'protobuf', 'protobuf_message' 'test.Counts', \
         'key' 'segment_id'); \
         INSERT INTO pb_counts SELECT segment_id, window_start, count(*) AS vehicles \
         FROM camera_events WHERE kind = 'detection' \
         GROUP BY tumble(event_time, INTERVAL '1 minute'), segment_id;"
            .into(),
    )];
    let pb_task = tokio::spawn(
        Pipeline::new(pb_config, pb_stats.clone())
            .await?
            .run(stop.clone()),
    );
    consumed(&json_stats, cameras, 0).await?;
    consumed(&avro_stats, cameras, bad.len() as u64).await?;
    consumed(&pb_stats, cameras, 0).await?;

    // Read together: each reader joins a consumer group of its own first.
    let (from_json, from_avro, top_json, top_avro, mut dead, json_dead, from_pb) = tokio::try_join!(
        settled(&cluster, &json_topics.congestion, &registry),
        settled(&cluster, &avro.congestion, &registry),
        settled(&cluster, &json_topics.congestion_top, &registry),
        settled(&cluster, &avro.congestion_top, &registry),
        settled(&cluster, &avro.dlq, &registry),
        settled(&cluster, &json_topics.dlq, &registry),
        settled(&cluster, &pb.congestion, &registry),
    )?;
    assert_eq!(from_json, from_pb);
    // The counts written as Protobuf, read back by the Protobuf decoder, are the indicators'
    // vehicle counts.
    let counts = settled_bytes(&cluster, "pb.counts").await?;
    let schema = Arc::new(TopicSchema::from_arrow(
        "counts",
        Arc::new(Schema::new(vec![
            Field::new("segment_id", DataType::Utf8, false),
            Field::new(
                "window_start",
                DataType::Timestamp(TimeUnit::Millisecond, None),
                false,
            ),
            Field::new("vehicles", DataType::Int64, false),
        ])),
    ));
    let mut raw = RawBatch::new("pb.counts");
    for (i, v) in counts.iter().enumerate() {
        raw.push(0, i as i64, None, Some(v));
    }
    let decoded = TopicDecoder::new(
        Format::Protobuf,
        schema,
        Some(("window_start", TimeUnit::Millisecond)),
        &Codecs {
            registry: None,
            descriptors: Some(counts_descriptors),
        },
        Some("test.Counts"),
    )?
    .decode(&raw)?;
    assert!(decoded.rejects.is_empty(), "{:?}", decoded.rejects);
    let (json_rows, _) = urbanstream::sink::encode_json_rows(&decoded.batch)?;
    let mut from_protobuf: Vec<(String, i64, i64)> = json_rows
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            let v: Value = serde_json::from_slice(l).expect("row");
            (
                v["segment_id"].as_str().unwrap_or_default().to_string(),
                v["window_start"].as_i64().unwrap_or_default(),
                v["vehicles"].as_i64().unwrap_or_default(),
            )
        })
        .collect();
    from_protobuf.sort();
    let mut expected: Vec<(String, i64, i64)> = from_json
        .iter()
        .map(|v| {
            (
                v["segment_id"].as_str().unwrap_or_default().to_string(),
                v["window_start"].as_i64().unwrap_or_default(),
                v["vehicles"].as_i64().unwrap_or_default(),
            )
        })
        .collect();
    expected.sort();
    assert_eq!(from_protobuf, expected);
    // Four minutes of a few dozen segments.
    assert!(from_json.len() > 40, "{} rows", from_json.len());
    assert_eq!(from_json.len(), from_avro.len());
    for (j, a) in from_json.iter().zip(&from_avro) {
        let mut a = a.clone();
        assert_eq!(a["_avro"].take(), Value::Bool(true));
        a.as_object_mut().map(|o| o.remove("_avro"));
        assert_eq!(j, &a);
    }
    assert!(!top_json.is_empty());
    let top_avro: Vec<Value> = top_avro
        .into_iter()
        .map(|mut v| {
            assert_eq!(v["_avro"].take(), Value::Bool(true));
            v.as_object_mut().map(|o| o.remove("_avro"));
            v
        })
        .collect();
    assert_eq!(top_json, top_avro);
    // The Avro run wrote Avro, with the topic schema registered under the topic's subject.
    let subject = dir
        .path()
        .join("registry/subjects")
        .join(format!("{}-value", avro.congestion));
    assert!(subject.exists(), "{} registered", subject.display());

    // The bad records went to the DLQ, each with its reason and offset; the JSON run had
    // none.
    dead.sort_by_key(|v| v["offset"].as_i64());
    assert_eq!(dead.len(), bad.len(), "{dead:?}");
    for (d, (_, reason)) in dead.iter().zip(&bad) {
        assert_eq!(d["topic"], Value::from(avro.camera.clone()));
        assert_eq!(d["stage"], "decode");
        assert!(
            d["error"].as_str().is_some_and(|e| e.contains(reason)),
            "{d}"
        );
    }
    assert!(json_dead.is_empty(), "{json_dead:?}");
    assert_eq!(json_stats.dlq.load(Ordering::Relaxed), 0);

    stop.store(true, Ordering::Relaxed);
    json_task.await??;
    avro_task.await??;
    pb_task.await??;
    Ok(())
}
