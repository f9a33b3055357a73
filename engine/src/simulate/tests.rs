use super::*;
use crate::decode::JsonDecoder;
use crate::schema::SchemaRegistry;
use crate::source::RawBatch;

fn run(seed: u64, seconds: usize) -> Vec<SimRecord> {
    let reference = Arc::new(ReferenceData::embedded().expect("reference"));
    let config = SimConfig {
        seed,
        ..SimConfig::default()
    };
    let mut sim = CitySimulator::new(config, reference);
    (0..seconds).flat_map(|_| sim.next_tick()).collect()
}

#[test]
fn same_seed_same_events() {
    let a = run(7, 180);
    let b = run(7, 180);
    assert!(a.len() > 1000);
    assert_eq!(a, b);
    assert_ne!(a, run(8, 180));
}

#[test]
fn produces_all_three_topics_decodable_with_few_rejects() {
    let records = run(1, 300);
    let registry = SchemaRegistry::embedded().expect("schemas");
    for (topic, schema) in [
        (SimTopic::Camera, "camera_event"),
        (SimTopic::Detector, "detector_reading"),
        (SimTopic::Air, "air_reading"),
    ] {
        let mut raw = RawBatch::new(schema);
        for (i, r) in records.iter().filter(|r| r.topic == topic).enumerate() {
            raw.push(0, i as i64, Some(r.key.as_bytes()), Some(&r.payload));
        }
        assert!(!raw.is_empty(), "no {schema} records");
        let decoded = JsonDecoder::new(registry.get(schema).expect(schema))
            .decode(&raw)
            .expect("decode");
        // Malformed records are a small share (0.2 % by default) and are rejected; the rest
        // decode.
        assert!(
            decoded.rejects.len() * 100 <= raw.len(),
            "{schema}: {:?}",
            &decoded.rejects[..3.min(decoded.rejects.len())]
        );
        assert_eq!(decoded.batch.num_rows() + decoded.rejects.len(), raw.len());
    }
}

#[test]
fn malformed_records_appear_at_the_configured_share() {
    let reference = Arc::new(ReferenceData::embedded().expect("reference"));
    let config = SimConfig {
        seed: 3,
        malformed_share: 0.05,
        ..SimConfig::default()
    };
    let mut sim = CitySimulator::new(config, reference);
    let records: Vec<_> = (0..120).flat_map(|_| sim.next_tick()).collect();
    let registry = SchemaRegistry::embedded().expect("schemas");
    let mut raw = RawBatch::new("camera");
    for (i, r) in records
        .iter()
        .filter(|r| r.topic == SimTopic::Camera)
        .enumerate()
    {
        raw.push(0, i as i64, None, Some(&r.payload));
    }
    let decoded = JsonDecoder::new(registry.get("camera_event").expect("schema"))
        .decode(&raw)
        .expect("decode");
    let share = decoded.rejects.len() as f64 / raw.len() as f64;
    // Not every corruption is fatal (e.g. renaming a field absent from the record), so the
    // rejected share is a little below the injected share.
    assert!((0.02..0.06).contains(&share), "rejected share {share}");
}

#[test]
fn rush_hour_is_slower_and_busier_than_night() {
    assert!(traffic_profile(8.0) > 0.9);
    assert!(traffic_profile(3.0) < 0.1);
    assert!(traffic_profile(18.0) > traffic_profile(14.0));
    assert!(pm_diurnal(20.5) > pm_diurnal(14.5));
    assert!((hanoi_hour(1_767_222_000_000) - 6.0).abs() < 1e-9);
}

#[test]
fn motorbikes_dominate_urban_detections() {
    let records = run(5, 120);
    let camera: Vec<_> = records
        .iter()
        .filter(|r| r.topic == SimTopic::Camera)
        .collect();
    let moto = camera
        .iter()
        .filter(|r| r.payload.windows(11).any(|w| w == b"\"motorbike\""))
        .count();
    let share = moto as f64 / camera.len() as f64;
    assert!((0.6..0.9).contains(&share), "motorbike share {share}");
}

/// Regression: at 60× and more, the simulated clock ran past the wall clock (the demo then
/// stamped every event in the future). It is capped at the wall clock and runs in real time
/// from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_time_never_passes_the_wall_clock() {
    let broker = crate::broker::EmbeddedBroker::start().expect("broker");
    let topics = crate::topics::Topics::default();
    for t in topics.inputs() {
        broker.create_topic(&t, 1).expect("topic");
    }
    let reference = Arc::new(ReferenceData::embedded().expect("reference"));
    let start = crate::pipeline::epoch_ms() - 3_000;
    let config = SimConfig {
        start_ms: start,
        air_history_hours: 0,
        detections_per_sim_second: 1.0,
        ..SimConfig::default()
    };
    let producer: rdkafka::producer::FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .create()
        .expect("producer");
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(ProducerStats::default());
    let task = tokio::spawn(run_producer(
        CitySimulator::new(config, reference),
        producer,
        [
            topics.camera.clone(),
            topics.detectors.clone(),
            topics.air.clone(),
        ],
        3_600.0,
        stop.clone(),
        stats.clone(),
    ));
    let mut ahead = i64::MIN;
    for _ in 0..30 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let sim = stats.sim_time_ms.load(Ordering::Relaxed);
        ahead = ahead.max(sim - crate::pipeline::epoch_ms());
    }
    stop.store(true, Ordering::Relaxed);
    task.await.expect("task").expect("producer");
    let reached = stats.sim_time_ms.load(Ordering::Relaxed);
    // At 3600× the 3 s of history are gone in a millisecond; then one tick (1 s) at most ahead.
    assert!(
        reached >= start + 3_000,
        "simulated time stalled at {reached}"
    );
    assert!(
        ahead <= 1_000,
        "simulated time ran {ahead} ms ahead of the wall clock"
    );
}
