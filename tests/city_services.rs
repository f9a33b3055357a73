//! The city's other feeds end to end through the embedded broker (4 partitions): the
//! simulator's parking readings, water levels (with a storm) and citizens' reports are produced
//! to their topics, the default queries of `queries/` for them run in one pipeline as the
//! service runs them, and what they publish is read back and checked against what the produced
//! records say, computed here independently.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use urbanstream::pipeline::{Pipeline, PipelineConfig, PipelineStats, Topics};
use urbanstream::plan::DEFAULT_QUERIES;
use urbanstream::reference::ReferenceData;
use urbanstream::simulate::{CitySimulator, SimConfig, SimRecord, SimTopic, SimTopics};
use urbanstream_tests::{TestCluster, read_at_least, read_until_quiet};

const PARTITIONS: i32 = 4;
const MINUTE: i64 = 60_000;

/// The simulated city with every feed, from `start_ms` for `minutes`.
fn simulate(start_ms: i64, minutes: i64, storm_at_ms: Option<i64>) -> Vec<SimRecord> {
    let reference = Arc::new(ReferenceData::embedded().expect("reference"));
    let mut sim = CitySimulator::new(
        SimConfig {
            seed: 11,
            start_ms,
            detections_per_sim_second: 4.0,
            malformed_share: 0.0,
            out_of_order_share: 0.0,
            late_share: 0.0,
            all_feeds: true,
            storm_at_ms,
            ..SimConfig::default()
        },
        reference,
    );
    (0..minutes * 60).flat_map(|_| sim.next_tick()).collect()
}

/// Produces the records of `feeds` to their topics, keyed as the simulator keys them.
async fn produce(cluster: &TestCluster, records: &[SimRecord], feeds: &[SimTopic]) {
    let topics = SimTopics::city().expect("topics");
    let keyed: Vec<(String, String, Vec<u8>)> = records
        .iter()
        .filter(|r| feeds.contains(&r.topic))
        .map(|r| {
            (
                topics.topic(r.topic).to_string(),
                r.key.clone(),
                r.payload.clone(),
            )
        })
        .collect();
    cluster
        .produce_keyed(&keyed, PARTITIONS)
        .await
        .expect("produce");
}

/// Runs the default queries `names` in one pipeline, as the service does.
async fn run(
    cluster: &TestCluster,
    group: &str,
    names: &[&str],
) -> (
    Arc<AtomicBool>,
    tokio::task::JoinHandle<urbanstream::error::Result<()>>,
) {
    let mut config = PipelineConfig::new(&cluster.brokers);
    config.group_id = group.into();
    config.default_queries = false;
    config.from_beginning = true;
    config.queries = names
        .iter()
        .map(|name| {
            let (_, sql) = DEFAULT_QUERIES
                .iter()
                .find(|(n, _)| n == name)
                .expect("a default query");
            (name.to_string(), sql.to_string())
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let pipeline = Pipeline::new(config, Arc::new(PipelineStats::new()))
        .await
        .expect("pipeline");
    let task = tokio::spawn(pipeline.run(stop.clone()));
    (stop, task)
}

fn json(record: &SimRecord) -> serde_json::Value {
    serde_json::from_slice(&record.payload).expect("the simulator writes JSON")
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn close(a: &serde_json::Value, b: f64) -> bool {
    a.as_f64().is_some_and(|a| (a - b).abs() < 1e-6)
}

/// A Saturday evening in the old quarter: availability per lot and ward every 5 minutes equals
/// what the readings give, and the lots that were full for long got a "full" alert (and only
/// lots whose readings were full).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parking_availability_and_full_alerts_through_the_broker() {
    // 2026-01-03 (a Saturday) 17:30 in Hanoi, for three hours.
    let start = SimConfig::default().start_ms + 2 * 86_400_000 + 11 * 3_600_000 + 30 * MINUTE;
    let minutes = 180;
    let records = simulate(start, minutes, None);
    let cluster = TestCluster::start(PARTITIONS).expect("broker");
    produce(&cluster, &records, &[SimTopic::Parking]).await;
    let (stop, task) = run(
        &cluster,
        "parking-e2e",
        &[
            "parking_lot_availability",
            "parking_ward_availability",
            "alerts_parking_full",
        ],
    )
    .await;

    // What the readings say, per lot and 5 minutes, and per lot and minute.
    let lots = ReferenceData::embedded().expect("reference").parking_lots;
    let capacity: BTreeMap<String, (f64, String)> = lots
        .iter()
        .map(|l| (l.lot_id.clone(), (f64::from(l.capacity), l.ward_id.clone())))
        .collect();
    // (lot, window start) -> (occupied, spaces, readings, peak %)
    let mut five: BTreeMap<(String, i64), (i64, i64, i64, f64)> = BTreeMap::new();
    let mut minute: BTreeMap<String, BTreeMap<i64, f64>> = BTreeMap::new();
    for r in records.iter().filter(|r| r.topic == SimTopic::Parking) {
        let v = json(r);
        let (spaces, occupied) = (
            v["spaces"].as_i64().unwrap(),
            v["occupied"].as_i64().unwrap(),
        );
        let w = five
            .entry((
                r.key.clone(),
                r.event_time.div_euclid(5 * MINUTE) * 5 * MINUTE,
            ))
            .or_default();
        w.0 += occupied;
        w.1 += spaces;
        w.2 += 1;
        w.3 = w.3.max(100.0 * occupied as f64 / spaces as f64);
        minute
            .entry(r.key.clone())
            .or_default()
            .insert(r.event_time, 100.0 * occupied as f64 / spaces as f64);
    }
    // Windows that close before the last reading's window.
    let closed = start + (minutes - 5) * MINUTE;
    let lot_windows = five
        .keys()
        .filter(|(_, w)| *w < closed - 5 * MINUTE)
        .count();
    let wards: BTreeSet<&String> = capacity.values().map(|(_, w)| w).collect();
    let ward_windows = wards.len() * ((minutes as usize - 10) / 5);

    let consumer = cluster
        .consumer(
            &Topics::default()
                .topic_of_table("parking_availability")
                .expect("declared"),
        )
        .expect("consumer");
    let rows = read_at_least(
        &consumer,
        lot_windows + ward_windows,
        Duration::from_secs(15),
        Duration::from_secs(180),
    )
    .await;
    let mut checked_lots = 0;
    let mut ward_free: BTreeMap<(String, i64), (i64, f64, f64)> = BTreeMap::new();
    for row in &rows {
        let start_ms = row["window_start"].as_i64().expect("window_start");
        let id = row["entity_id"].as_str().expect("entity_id").to_string();
        if row["entity_type"] == "lot" {
            let (occupied, spaces, readings, peak) = five[&(id.clone(), start_ms)];
            let (cap, ward) = &capacity[&id];
            let share = occupied as f64 / spaces as f64;
            assert!(
                close(
                    &row["occupancy_pct"],
                    round1(100.0 * occupied as f64 / spaces as f64)
                ),
                "{row}"
            );
            assert!(
                close(&row["free_spaces"], round1(cap * (1.0 - share))),
                "{row}"
            );
            assert!(close(&row["peak_occupancy_pct"], round1(peak)), "{row}");
            assert_eq!(row["readings"], readings, "{row}");
            assert_eq!(row["ward_id"], ward.as_str(), "{row}");
            let w = ward_free.entry((ward.clone(), start_ms)).or_default();
            w.0 += 1;
            w.1 += cap;
            w.2 += cap * (1.0 - share);
            checked_lots += 1;
        }
    }
    assert!(
        checked_lots >= lot_windows,
        "{checked_lots} lot windows of {lot_windows}"
    );
    let mut checked_wards = 0;
    for row in rows.iter().filter(|r| r["entity_type"] == "ward") {
        let key = (
            row["entity_id"].as_str().unwrap().to_string(),
            row["window_start"].as_i64().unwrap(),
        );
        let (lots_in, cap, free) = ward_free[&key];
        assert_eq!(row["lots"], lots_in, "{row}");
        assert!(close(&row["capacity"], cap), "{row}");
        assert!(close(&row["free_spaces"], round1(free)), "{row}");
        checked_wards += 1;
    }
    assert!(
        checked_wards >= ward_windows,
        "{checked_wards} ward windows of {ward_windows}"
    );

    // Full alerts: raised only where the minutes before were at 95 % or more for 5 minutes, and
    // on every lot that stayed full for a quarter of an hour.
    let alerts = cluster
        .consumer(&Topics::default().alerts)
        .expect("consumer");
    let alerts = read_until_quiet(&alerts, Duration::from_secs(10), Duration::from_secs(60)).await;
    let raised: BTreeSet<String> = alerts
        .iter()
        .filter(|a| a["kind"] == "parking_full" && a["state"] == "RAISED")
        .map(|a| {
            let lot = a["entity_id"].as_str().unwrap().to_string();
            let at = a["window_end"].as_i64().unwrap();
            let series = &minute[&lot];
            for m in 1..=5 {
                let pct = series[&(at - m * MINUTE)];
                assert!(
                    pct >= 95.0,
                    "{lot} raised at {at} with {pct} % {m} minutes before"
                );
            }
            lot
        })
        .collect();
    let long_full: BTreeSet<String> = minute
        .iter()
        .filter(|(_, series)| {
            let mut run = 0;
            series.values().any(|pct| {
                run = if *pct >= 95.0 { run + 1 } else { 0 };
                run >= 15
            })
        })
        .map(|(lot, _)| lot.clone())
        .collect();
    assert!(
        !long_full.is_empty(),
        "no lot was full on a Saturday evening"
    );
    assert!(
        long_full.is_subset(&raised),
        "full {long_full:?}, raised {raised:?}"
    );

    stop.store(true, Ordering::Relaxed);
    task.await.expect("join").expect("pipeline");
}

/// A storm: water indicators per gauge and 5 minutes equal what the levels say; every road gauge
/// that reached level I raised a flood warning and cleared it after; the flooded roads alert
/// joins them to the congestion the same cameras measured; citizens' flooding reports are
/// confirmed in the wards with a warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_through_the_broker_floods_roads_and_confirms_reports() {
    // 2026-01-01 10:00 in Hanoi; the storm at once; two and a half hours.
    let start = SimConfig::default().start_ms + 4 * 3_600_000;
    let minutes = 150;
    let records = simulate(start, minutes, Some(start));
    let cluster = TestCluster::start(PARTITIONS).expect("broker");
    produce(
        &cluster,
        &records,
        &[SimTopic::Water, SimTopic::Camera, SimTopic::Report],
    )
    .await;
    let (stop, task) = run(
        &cluster,
        "flood-e2e",
        &[
            "water_level_gauge",
            "alerts_flood",
            "congestion_minute",
            "alerts_flooded_roads",
            "alerts_reports_confirmed",
        ],
    )
    .await;

    let gauges = ReferenceData::embedded().expect("reference").gauges;
    // (gauge, window start) -> (latest level, max level, readings)
    let mut five: BTreeMap<(String, i64), (f64, f64, i64)> = BTreeMap::new();
    // Gauges at level I or above for five readings in a row: each must get a warning.
    let mut reached: BTreeSet<String> = BTreeSet::new();
    let mut runs: BTreeMap<String, u32> = BTreeMap::new();
    // Per gauge: its readings with a level, by time.
    let mut levels: BTreeMap<String, BTreeMap<i64, f64>> = BTreeMap::new();
    for r in records.iter().filter(|r| r.topic == SimTopic::Water) {
        let Some(level) = json(r)["level_cm"].as_f64() else {
            continue;
        };
        let gauge = gauges.iter().find(|g| g.gauge_id == r.key).expect("gauge");
        levels
            .entry(r.key.clone())
            .or_default()
            .insert(r.event_time, level);
        let run = runs.entry(r.key.clone()).or_default();
        *run = if level >= gauge.level_1_cm {
            *run + 1
        } else {
            0
        };
        if *run >= 5 {
            reached.insert(gauge.gauge_id.clone());
        }
        let w = five
            .entry((
                r.key.clone(),
                r.event_time.div_euclid(5 * MINUTE) * 5 * MINUTE,
            ))
            .or_insert((level, level, 0));
        w.0 = level;
        w.1 = w.1.max(level);
        w.2 += 1;
    }
    assert!(reached.len() >= 3, "the storm flooded {reached:?}");
    let closed = start + (minutes - 10) * MINUTE;
    let expected_windows = five.keys().filter(|(_, w)| *w < closed).count();

    let water = cluster
        .consumer(
            &Topics::default()
                .topic_of_table("water_indicators")
                .expect("declared"),
        )
        .expect("consumer");
    let rows = read_at_least(
        &water,
        expected_windows,
        Duration::from_secs(15),
        Duration::from_secs(180),
    )
    .await;
    let mut flooded_segments = BTreeSet::new();
    let mut checked = 0;
    for row in &rows {
        let gauge_id = row["gauge_id"].as_str().unwrap().to_string();
        let gauge = gauges
            .iter()
            .find(|g| g.gauge_id == gauge_id)
            .expect("gauge");
        let (latest, max, readings) =
            five[&(gauge_id.clone(), row["window_start"].as_i64().unwrap())];
        assert!(close(&row["level_cm"], latest), "{row}");
        assert!(close(&row["max_level_cm"], max), "{row}");
        assert_eq!(row["readings"], readings, "{row}");
        let warning = [gauge.level_1_cm, gauge.level_2_cm, gauge.level_3_cm]
            .iter()
            .filter(|l| max >= **l)
            .count();
        assert_eq!(row["warning_level"], warning, "{row}");
        if warning >= 1 {
            flooded_segments.insert(row["segment_id"].as_str().unwrap().to_string());
        }
        checked += 1;
    }
    assert!(
        checked >= expected_windows,
        "{checked} windows of {expected_windows}"
    );

    let alerts = cluster
        .consumer(&Topics::default().alerts)
        .expect("consumer");
    let alerts = read_until_quiet(&alerts, Duration::from_secs(20), Duration::from_secs(180)).await;
    let of = |kind: &str, state: &str| -> BTreeSet<String> {
        alerts
            .iter()
            .filter(|a| a["kind"] == kind && a["state"] == state)
            .map(|a| a["entity_id"].as_str().unwrap().to_string())
            .collect()
    };
    // Flood warnings: raised on every gauge that stayed at level I for five minutes, and only
    // after two minutes of readings at level I; every one cleared once the roads drained.
    let raised = of("flood_warning", "RAISED");
    assert!(
        reached.is_subset(&raised),
        "{reached:?} not all in {raised:?}"
    );
    for a in alerts
        .iter()
        .filter(|a| a["kind"] == "flood_warning" && a["state"] == "RAISED")
    {
        let gauge_id = a["entity_id"].as_str().unwrap();
        let gauge = gauges
            .iter()
            .find(|g| g.gauge_id == gauge_id)
            .expect("gauge");
        let at = a["window_end"].as_i64().unwrap();
        let before: Vec<f64> = levels[gauge_id]
            .range(at - 3 * MINUTE..at)
            .map(|(_, l)| *l)
            .collect();
        assert!(
            before.len() >= 2 && before.iter().all(|l| *l >= gauge.level_1_cm),
            "{gauge_id} raised at {at} after {before:?}"
        );
    }
    assert_eq!(of("flood_warning", "CLEARED"), raised);
    // Flooded roads: on every segment a gauge had at level I, with its traffic in the message.
    assert_eq!(of("flooded_road", "RAISED"), flooded_segments);
    for a in alerts
        .iter()
        .filter(|a| a["kind"] == "flooded_road" && a["state"] == "RAISED")
    {
        let message = a["message"].as_str().unwrap();
        assert!(message.contains("level of service"), "{message}");
    }
    // Reports: reports of a ward with a matching alert from 30 minutes before to 10 after are
    // confirmed; no ward is confirmed without one.
    let warnings: Vec<(String, String, i64)> = alerts
        .iter()
        .filter(|a| {
            matches!(a["kind"].as_str(), Some("flood_warning" | "flooded_road"))
                && a["state"] != "CLEARED"
        })
        .map(|a| {
            (
                a["kind"].as_str().unwrap().to_string(),
                a["ward_id"].as_str().unwrap().to_string(),
                a["window_end"].as_i64().unwrap(),
            )
        })
        .collect();
    // The first confirmable report's ward (its window closes while the warnings go on; a
    // window of reports late in the flood closes only when alerts come 10 minutes after it).
    let mut confirmable: Vec<(i64, String)> = Vec::new();
    for r in records.iter().filter(|r| r.topic == SimTopic::Report) {
        let v = json(r);
        let ward = v["ward_id"].as_str().unwrap();
        // The kinds this run's queries raise: flood warnings and flooded roads.
        let matching: &[&str] = match v["category"].as_str() {
            Some("flooding") => &["flood_warning", "flooded_road"],
            Some("accident" | "congestion") => &["flooded_road"],
            _ => &[],
        };
        if warnings.iter().any(|(kind, w, at)| {
            matching.contains(&kind.as_str())
                && w == ward
                && *at >= r.event_time - 30 * MINUTE
                && *at <= r.event_time + 10 * MINUTE
        }) {
            confirmable.push((r.event_time, ward.to_string()));
        }
    }
    confirmable.sort();
    let (_, first) = confirmable.first().expect("a flooding report to confirm");
    let confirmed = of("report_confirmed", "RAISED");
    let wards: BTreeSet<String> = confirmable.iter().map(|(_, w)| w.clone()).collect();
    assert!(confirmed.contains(first), "{first} not in {confirmed:?}");
    assert!(
        confirmed.is_subset(&wards),
        "{confirmed:?} beyond {wards:?}"
    );
    for a in alerts.iter().filter(|a| a["kind"] == "report_confirmed") {
        let message = a["message"].as_str().unwrap();
        assert!(
            message.contains("flood_warning:") || message.contains("flooded_road:"),
            "{message}"
        );
    }

    stop.store(true, Ordering::Relaxed);
    task.await.expect("join").expect("pipeline");
}
