use super::*;

#[test]
fn view_takes_rows_of_both_indicator_topics() {
    let topics = Topics::default();
    let mut view = View::default();
    let congestion = br#"{"segment_id":"kim_ma_w","window_start":60000,"window_end":120000,
        "vehicles":12,"mean_speed_kmh":31.0,"motorbike_share":0.7,"tti":1.6,"los":"C"}"#;
    assert!(view.take(&topics.congestion, &topics, congestion));
    let ward = br#"{"entity_id":"lang","scope":"ward","period":"hour","window_start":0,
        "window_end":3600000,"aqi":117,"category":"K\u00e9m","category_en":"Poor",
        "dominant_pollutant":"pm25","pm25_nowcast":61.2,"readings":120}"#;
    assert!(view.take(&topics.air_indicators, &topics, ward));
    let daily = br#"{"entity_id":"aq-001","scope":"sensor","period":"day","window_start":0,
        "window_end":86400000,"aqi":90,"readings":24}"#;
    assert!(view.take(&topics.air_indicators, &topics, daily));
    assert!(!view.take(&topics.air_indicators, &topics, b"not json"));
    assert_eq!(view.received, 3);
    assert_eq!(view.latest["kim_ma_w"].los.as_deref(), Some("C"));
    assert_eq!(view.wards["lang"].aqi, Some(117));
    assert_eq!(view.wards.len(), 1, "only hourly ward rows are shown");
    assert_eq!(view.last_hour, 3_600_000);
}

#[test]
fn parking_and_water_rows_reach_the_snapshot_and_the_map_places_lots_and_gauges() {
    let reference = ReferenceData::embedded().unwrap();
    let city = CityView::new(&reference, DisplayZone::CITY);
    let topics = Topics::default();
    let parking = topics.topic_of_table("parking_availability").unwrap();
    let water = topics.topic_of_table("water_indicators").unwrap();
    let lot = |start: i64, pct: f64| {
        format!(
            r#"{{"entity_type":"lot","entity_id":"pk-hk-01","ward_id":"hoan_kiem",
            "window_start":{start},"window_end":{},"lots":1,"capacity":320,
            "occupancy_pct":{pct},"free_spaces":{},"peak_occupancy_pct":{pct},"readings":5}}"#,
            start + 300_000,
            320.0 * (1.0 - pct / 100.0)
        )
    };
    assert!(city.take(&parking, &topics, lot(600_000, 97.5).as_bytes()));
    // An older window read late does not replace it.
    assert!(city.take(&parking, &topics, lot(300_000, 40.0).as_bytes()));
    let ward = br#"{"entity_type":"ward","entity_id":"hoan_kiem","ward_id":"hoan_kiem",
        "window_start":600000,"window_end":900000,"lots":2,"capacity":360,
        "occupancy_pct":93.6,"free_spaces":23.0,"peak_occupancy_pct":100.0,"readings":8}"#;
    assert!(city.take(&parking, &topics, ward));
    let gauge = br#"{"gauge_id":"wl-001","ward_id":"thanh_xuan","segment_id":"nguyen_trai_ntso",
        "window_start":600000,"window_end":900000,"level_cm":21.0,"max_level_cm":22.0,
        "rise_cm_h":60.0,"rainfall_mm_h":80.0,"warning_level":2,"readings":5}"#;
    assert!(city.take(&water, &topics, gauge));
    // Ids outside the reference are not kept.
    let stranger = br#"{"gauge_id":"wl-x","window_start":600000,"level_cm":1.0,
        "max_level_cm":1.0,"rise_cm_h":null,"warning_level":0}"#;
    assert!(!city.take(&water, &topics, stranger));
    let snapshot = city.snapshot();
    assert_eq!(
        snapshot["parking"]["lots"]["pk-hk-01"]["occupancy_pct"],
        97.5
    );
    assert_eq!(
        snapshot["parking"]["wards"]["hoan_kiem"]["free_spaces"],
        23.0
    );
    assert_eq!(snapshot["water"]["gauges"]["wl-001"]["warning_level"], 2);
    assert!(snapshot["water"]["gauges"].get("wl-x").is_none());
    let map = city.map();
    let reference = ReferenceData::embedded().unwrap();
    let (lots, gauges) = (&reference.parking_lots, &reference.gauges);
    assert_eq!(map["lots"].as_array().unwrap().len(), lots.len());
    assert_eq!(map["gauges"].as_array().unwrap().len(), gauges.len());
    assert_eq!(map["gauges"][0]["levels"], json!([10.0, 20.0, 30.0]));
}

#[test]
fn an_older_window_read_late_does_not_replace_a_newer_one() {
    let topics = Topics::default();
    let mut view = View::default();
    let row = |start: i64, los: &str| {
        format!(
            r#"{{"segment_id":"kim_ma_w","window_start":{start},"window_end":{},
            "vehicles":1,"mean_speed_kmh":null,"motorbike_share":null,"los":"{los}"}}"#,
            start + 60_000
        )
    };
    assert!(view.take(&topics.congestion, &topics, row(120_000, "F").as_bytes()));
    assert!(view.take(&topics.congestion, &topics, row(60_000, "A").as_bytes()));
    assert_eq!(view.latest["kim_ma_w"].los.as_deref(), Some("F"));
    assert_eq!(view.last_window, 120_000);
}

#[test]
fn view_keeps_active_alerts_until_cleared() {
    let topics = Topics::default();
    let mut view = View::default();
    let raised = br#"{"alert_id":"incident:kim_ma_w:20260101T060000","state":"RAISED",
        "kind":"incident","entity_type":"segment","entity_id":"kim_ma_w","started_at":60000,
        "severity":3,"message":"1 camera incident event(s) (collision) in the minute"}"#;
    assert!(view.take(&topics.alerts, &topics, raised));
    assert_eq!(view.alerts.len(), 1);
    let cleared = br#"{"alert_id":"incident:kim_ma_w:20260101T060000","state":"CLEARED",
        "kind":"incident","entity_type":"segment","entity_id":"kim_ma_w","started_at":60000}"#;
    assert!(view.take(&topics.alerts, &topics, cleared));
    assert!(view.alerts.is_empty());
    assert_eq!((view.raised, view.cleared), (1, 1));
}

#[test]
fn the_map_has_every_segment_and_ward_of_the_reference() {
    let reference = ReferenceData::embedded().unwrap();
    let city = CityView::new(&reference, DisplayZone::CITY);
    let map = city.map();
    let segments = map["segments"].as_array().unwrap();
    assert_eq!(segments.len(), reference.segments.len());
    assert!(
        segments
            .iter()
            .all(|s| s["coords"].as_array().is_some_and(|c| c.len() >= 2)),
        "every segment has a line"
    );
    assert_eq!(
        map["wards"].as_array().unwrap().len(),
        reference.wards.len()
    );
    let b = map["bounds"].as_array().unwrap();
    let (w, s, e, n) = (
        b[0].as_f64().unwrap(),
        b[1].as_f64().unwrap(),
        b[2].as_f64().unwrap(),
        b[3].as_f64().unwrap(),
    );
    assert!(105.0 < w && w < e && e < 106.5 && 20.5 < s && s < n && n < 21.5);
    assert!(linestring("POINT(1 2)").is_empty());
    assert!(linestring("LINESTRING(1 2, x 3)").len() == 1);
}

#[test]
fn a_snapshot_names_entities_and_shows_times_in_the_display_zone() {
    let reference = ReferenceData::embedded().unwrap();
    let city = CityView::new(&reference, DisplayZone::CITY);
    let topics = Topics::default();
    let changes = city.subscribe();
    // 2026-01-01 06:00 in Hanoi.
    let raised = br#"{"alert_id":"a1","state":"RAISED","kind":"incident",
        "entity_id":"kim_ma_w","started_at":1767222000000,"severity":3,"message":"m"}"#;
    assert!(city.take(&topics.alerts, &topics, raised));
    assert!(changes.has_changed().unwrap());
    let snapshot = city.snapshot();
    assert_eq!(snapshot["time_zone"], "UTC+07:00");
    assert_eq!(snapshot["alerts"][0]["started"], "2026-01-01 06:00:00");
    assert_ne!(snapshot["alerts"][0]["entity_name"], "kim_ma_w");
    assert_eq!(snapshot["alerts_active"], 1);
    assert!(!city.take("elsewhere", &topics, raised));
    assert_eq!(snapshot["version"], 1);
}

#[test]
fn the_snapshot_text_is_made_once_per_version() {
    let reference = ReferenceData::embedded().unwrap();
    let city = CityView::new(&reference, DisplayZone::CITY);
    let topics = Topics::default();
    let first = city.snapshot_text();
    assert!(Arc::ptr_eq(&first, &city.snapshot_text()));
    let raised = br#"{"alert_id":"a1","state":"RAISED","kind":"incident",
        "entity_id":"kim_ma_w","started_at":1767222000000,"severity":3,"message":"m"}"#;
    assert!(city.take(&topics.alerts, &topics, raised));
    let second = city.snapshot_text();
    assert!(!Arc::ptr_eq(&first, &second));
    assert!(second.contains("\"alerts_active\":1"));
}

#[tokio::test]
async fn event_streams_beyond_the_cap_are_refused() {
    let reference = ReferenceData::embedded().unwrap();
    let city = CityView::new(&reference, DisplayZone::CITY);
    let response = events(State(city.clone())).await;
    assert_eq!(response.status(), axum::http::StatusCode::OK);
    drop(response);
    let held = city
        .streams
        .clone()
        .try_acquire_many_owned(u32::try_from(MAX_STREAMS).unwrap())
        .unwrap();
    let refused = events(State(city.clone())).await;
    assert_eq!(
        refused.status(),
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    );
    drop(held);
    assert_eq!(
        events(State(city)).await.status(),
        axum::http::StatusCode::OK
    );
}

#[test]
fn ids_outside_the_reference_and_alerts_past_the_cap_do_not_grow_the_view() {
    let reference = ReferenceData::embedded().unwrap();
    let city = CityView::new(&reference, DisplayZone::CITY);
    let topics = Topics::default();
    for i in 0..100 {
        let row = format!(
            r#"{{"segment_id":"made-up-{i}","window_start":60000,"window_end":120000,
            "vehicles":1,"mean_speed_kmh":null,"motorbike_share":null,"los":"F"}}"#
        );
        assert!(!city.take(&topics.congestion, &topics, row.as_bytes()));
        let ward = format!(
            r#"{{"entity_id":"made-up-{i}","scope":"ward","period":"hour","window_end":3600000,
            "aqi":500,"category":null,"dominant_pollutant":null}}"#
        );
        city.take(&topics.air_indicators, &topics, ward.as_bytes());
    }
    let known = r#"{"segment_id":"kim_ma_w","window_start":60000,"window_end":120000,
        "vehicles":1,"mean_speed_kmh":null,"motorbike_share":null,"los":"F"}"#;
    assert!(city.take(&topics.congestion, &topics, known.as_bytes()));
    assert_eq!(city.with(|v| (v.latest.len(), v.wards.len())), Some((1, 0)));

    let mut view = View::default();
    for i in 0..MAX_ACTIVE_ALERTS as i64 + 5 {
        let alert = format!(
            r#"{{"alert_id":"a{i}","state":"RAISED","kind":"k","entity_id":"e","started_at":{i}}}"#
        );
        assert!(view.take(&topics.alerts, &topics, alert.as_bytes()));
    }
    assert_eq!(view.alerts.len(), MAX_ACTIVE_ALERTS);
    assert!(
        !view.alerts.contains_key("a0"),
        "the first to begin is dropped"
    );
    assert!(
        view.alerts
            .contains_key(&format!("a{}", MAX_ACTIVE_ALERTS + 4))
    );
}

/// Analysts' queries write the alerts topic: an alert with an id, kind or state longer than a
/// city alert's is not kept, and a long message is cut (10 000 alerts of a megabyte each were
/// once held, and sent in every snapshot). A row whose time is not one (microseconds taken
/// for milliseconds: the year 58 000) is not taken either: it once pinned the newest window
/// for good, so every fresh segment showed as stale and other gauges' warnings were hidden.
#[test]
fn alerts_are_bounded_and_rows_out_of_time_are_not_taken() {
    let topics = Topics::default();
    let mut view = View::default();
    let long_id = format!(
        r#"{{"alert_id":"{}","state":"RAISED","kind":"k","entity_id":"e","started_at":60000}}"#,
        "x".repeat(300)
    );
    assert!(!view.take(&topics.alerts, &topics, long_id.as_bytes()));
    let long_message = format!(
        r#"{{"alert_id":"a","state":"RAISED","kind":"k","entity_id":"e","started_at":60000,
        "message":"{}"}}"#,
        "é".repeat(600_000)
    );
    assert!(view.take(&topics.alerts, &topics, long_message.as_bytes()));
    let kept = view.alerts["a"].message.clone().unwrap_or_default();
    assert!(
        kept.len() <= 1024 + '…'.len_utf8() && kept.ends_with('…'),
        "{}",
        kept.len()
    );
    let far = r#"{"alert_id":"b","state":"RAISED","kind":"k","entity_id":"e",
        "started_at":1767225600000000}"#;
    assert!(!view.take(&topics.alerts, &topics, far.as_bytes()));
    assert_eq!(view.alerts.len(), 1);

    let row = |start: i64| {
        format!(
            r#"{{"segment_id":"kim_ma_w","window_start":{start},"window_end":{},
            "vehicles":1,"mean_speed_kmh":null,"motorbike_share":null,"los":"F"}}"#,
            start + 60_000
        )
    };
    assert!(view.take(
        &topics.congestion,
        &topics,
        row(1_767_225_600_000).as_bytes()
    ));
    assert!(!view.take(
        &topics.congestion,
        &topics,
        row(1_767_225_600_000_000).as_bytes()
    ));
    assert_eq!(view.last_window, 1_767_225_600_000);
    assert_eq!(view.latest["kim_ma_w"].window_start, 1_767_225_600_000);
}

/// The view reads a partition whose log start the broker has moved past 0 and that holds
/// fewer records than the tail it reads back: it once reset to the log start and took the
/// tail off again, forever, and showed nothing new while the page said "live".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_view_follows_a_topic_whose_log_start_moved() {
    use rdkafka::ClientConfig;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    let broker = crate::broker::EmbeddedBroker::start().expect("broker");
    let topics = Topics::default();
    broker.create_topic(&topics.alerts, 1).expect("topic");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .create()
        .expect("producer");
    let alert = |id: &str, message_bytes: usize| {
        format!(
            r#"{{"alert_id":"{id}","state":"RAISED","kind":"k","entity_id":"e",
            "started_at":60000,"message":"{}"}}"#,
            "m".repeat(message_bytes)
        )
    };
    // 8 MiB in 80 records: the broker keeps 5 MiB, so the log starts past 0.
    for i in 0..80 {
        producer
            .send(
                FutureRecord::to(&topics.alerts)
                    .key("k")
                    .payload(&alert(&format!("old-{i}"), 100 * 1024)),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("send");
    }
    let reference = ReferenceData::embedded().unwrap();
    let city = CityView::new(&reference, DisplayZone::CITY);
    let stop = Arc::new(AtomicBool::new(false));
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", broker.bootstrap_servers());
    let reader = tokio::spawn(read_outputs(
        city.clone(),
        client,
        topics.clone(),
        None,
        stop.clone(),
    ));
    producer
        .send(
            FutureRecord::to(&topics.alerts)
                .key("k")
                .payload(&alert("new", 10)),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("send");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut seen = false;
    while std::time::Instant::now() < deadline {
        seen = city.with(|v| v.alerts.contains_key("new")).unwrap_or(false);
        if seen {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = reader.await;
    assert!(seen, "the alert produced after the start was never read");
    assert!(
        city.with(|v| v.alerts.contains_key("old-79"))
            .unwrap_or(false),
        "the retained tail is read back"
    );
}
