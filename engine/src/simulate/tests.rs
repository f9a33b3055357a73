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
        SimTopics::city().expect("topics"),
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

fn city(seed: u64, start_ms: i64, storm_at_ms: Option<i64>) -> CitySimulator {
    let reference = Arc::new(ReferenceData::embedded().expect("reference"));
    CitySimulator::new(
        SimConfig {
            seed,
            start_ms,
            detections_per_sim_second: 20.0,
            all_feeds: true,
            storm_at_ms,
            ..SimConfig::default()
        },
        reference,
    )
}

#[test]
fn every_feed_decodes_against_its_schema() {
    let start = SimConfig::default().start_ms;
    let mut sim = city(5, start, Some(start));
    let records: Vec<SimRecord> = (0..3_600).flat_map(|_| sim.next_tick()).collect();
    let registry = SchemaRegistry::embedded().expect("schemas");
    let streams = registry.streams().expect("streams");
    for feed in SimTopic::ALL {
        let (schema, _) = streams
            .iter()
            .find(|(_, d)| d.table == feed.table())
            .expect("declared");
        let mut raw = RawBatch::new(schema.name.as_str());
        for (i, r) in records.iter().filter(|r| r.topic == feed).enumerate() {
            raw.push(0, i as i64, Some(r.key.as_bytes()), Some(&r.payload));
        }
        assert!(!raw.is_empty(), "no {} records", schema.name);
        let decoded = JsonDecoder::new(schema.clone())
            .decode(&raw)
            .expect("decode");
        assert!(
            decoded.rejects.len() * 100 <= raw.len(),
            "{}: {:?}",
            schema.name,
            &decoded.rejects[..3.min(decoded.rejects.len())]
        );
    }
    // An hour: every lot and gauge once a minute; reports of the storm's flooding among them.
    let count = |feed| records.iter().filter(|r| r.topic == feed).count();
    let (lots, gauges) = {
        let r = ReferenceData::embedded().expect("reference");
        (r.parking_lots, r.gauges)
    };
    assert_eq!(count(SimTopic::Parking), 60 * lots.len());
    assert_eq!(count(SimTopic::Water), 60 * gauges.len());
    assert!(
        records.iter().any(|r| r.topic == SimTopic::Report
            && String::from_utf8_lossy(&r.payload).contains("\"flooding\"")),
        "no flooding reported in a storm"
    );
}

#[test]
fn a_storm_floods_roads_and_slows_their_traffic_then_drains() {
    let start = SimConfig::default().start_ms + 4 * 3_600_000; // 10:00, off-peak
    let mut dry = city(9, start, None);
    let mut wet = city(9, start, Some(start));
    let speed = |records: &[SimRecord], segment: &str| {
        let speeds: Vec<f64> = records
            .iter()
            .filter(|r| r.topic == SimTopic::Camera)
            .filter_map(|r| serde_json::from_slice::<serde_json::Value>(&r.payload).ok())
            .filter(|v| v["segment_id"] == segment && v["kind"] == "detection")
            .filter_map(|v| v["speed_kmh"].as_f64())
            .collect();
        speeds.iter().sum::<f64>() / speeds.len().max(1) as f64
    };
    let (mut flooded_at, mut drained_at) = (None, None);
    let (mut dry_records, mut wet_records) = (Vec::new(), Vec::new());
    for s in 0..3 * 3_600 {
        let d = dry.next_tick();
        let w = wet.next_tick();
        if flooded_at.is_none() && !wet.flooded_gauges().is_empty() {
            flooded_at = Some(s);
        }
        if flooded_at.is_some() && drained_at.is_none() && wet.flooded_gauges().is_empty() {
            drained_at = Some(s);
        }
        if flooded_at.is_some_and(|f| s >= f + 300 && s < f + 1_200) {
            dry_records.extend(d);
            wet_records.extend(w);
        }
    }
    let flooded_at = flooded_at.expect("the storm flooded a road");
    assert!(flooded_at < 3_600, "flooded after {flooded_at} s");
    // The gauges flooded: their segments slower than on the dry day's same minutes.
    let (lots, gauges) = {
        let r = ReferenceData::embedded().expect("reference");
        (r.parking_lots, r.gauges)
    };
    drop(lots);
    let slowed = gauges
        .iter()
        .filter_map(|g| g.segment_id.clone().filter(|s| !s.is_empty()))
        .filter(|s| speed(&wet_records, s) < 0.8 * speed(&dry_records, s))
        .count();
    assert!(slowed >= 3, "{slowed} flooded segments slowed");
    // Within three hours the storm has passed and the roads have drained.
    let drained_at = drained_at.expect("the roads drained");
    assert!(drained_at > flooded_at + 1_200, "{flooded_at} {drained_at}");
}

#[test]
fn parking_follows_its_areas_day() {
    use services::{hanoi_weekday, parking_demand};
    // 2026-01-01 was a Thursday; 2026-01-03 a Saturday.
    let thursday = SimConfig::default().start_ms;
    assert_eq!(hanoi_weekday(thursday), 3);
    assert_eq!(hanoi_weekday(thursday + 2 * 86_400_000), 5);
    assert!(parking_demand("old_quarter", 20.0, false) > 0.85);
    assert!(parking_demand("old_quarter", 20.0, true) >= 0.95);
    assert!(parking_demand("old_quarter", 7.0, false) < 0.5);
    assert!(parking_demand("office", 11.0, false) > 0.85);
    assert!(parking_demand("office", 11.0, true) < 0.4);
    assert!(parking_demand("visitor", 10.0, true) > parking_demand("visitor", 10.0, false));
    // Readings: occupied within spaces, barrier lots at their capacity.
    let mut sim = city(2, thursday + 13 * 3_600_000, None);
    let (lots, _) = {
        let r = ReferenceData::embedded().expect("reference");
        (r.parking_lots, r.gauges)
    };
    for r in (0..600)
        .flat_map(|_| sim.next_tick())
        .filter(|r| r.topic == SimTopic::Parking)
    {
        let v: serde_json::Value = serde_json::from_slice(&r.payload).expect("json");
        let lot = lots.iter().find(|l| l.lot_id == r.key).expect("known lot");
        let (spaces, occupied) = (
            v["spaces"].as_u64().unwrap(),
            v["occupied"].as_u64().unwrap(),
        );
        assert!(
            occupied <= spaces && spaces <= u64::from(lot.capacity),
            "{v}"
        );
        if lot.kind == "lot" {
            assert_eq!(spaces, u64::from(lot.capacity));
        }
    }
}

#[test]
fn the_other_feeds_leave_traffic_and_air_as_the_seed_made_them() {
    let start = SimConfig::default().start_ms;
    let reference = Arc::new(ReferenceData::embedded().expect("reference"));
    let config = SimConfig {
        seed: 4,
        detections_per_sim_second: 20.0,
        ..SimConfig::default()
    };
    let mut plain = CitySimulator::new(config, reference);
    // A storm at once: by the second hour its water slows the gauges' segments, and only those.
    let mut all = city(4, start, Some(start));
    let (_, gauges) = {
        let r = ReferenceData::embedded().expect("reference");
        (r.parking_lots, r.gauges)
    };
    let watched: Vec<String> = gauges.iter().filter_map(|g| g.segment_id.clone()).collect();
    let mut differed = 0;
    for _ in 0..7_200 {
        let a = plain.next_tick();
        let b: Vec<SimRecord> = all
            .next_tick()
            .into_iter()
            .filter(|r| {
                matches!(
                    r.topic,
                    SimTopic::Camera | SimTopic::Detector | SimTopic::Air
                )
            })
            .collect();
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            if x != y {
                assert!(watched.contains(&x.key), "{} changed: {x:?}", x.key);
                differed += 1;
            }
        }
    }
    assert!(differed > 0, "the flood slowed nothing");
}
