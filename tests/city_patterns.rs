//! The default queries built on joins of two streams and on patterns over hours, over
//! hand-made input in the city's tables: incidents confirmed by a camera and a detector, and
//! pollution episodes by the consecutive-hours rule.

use datafusion::arrow::array::{AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, TimeUnit};
use datafusion::arrow::util::display::array_value_to_string;
use urbanstream::deterministic::{DeterministicEngine, Outcome};
use urbanstream::pipeline::Topics;
use urbanstream::plan::{DEFAULT_QUERIES, city_context};
use urbanstream::schema::SchemaRegistry;

async fn engine_with(query: &str) -> anyhow::Result<DeterministicEngine> {
    let ctx = city_context(&Topics::default(), &SchemaRegistry::embedded()?)?;
    let mut engine = DeterministicEngine::with_context(ctx);
    let (_, sql) = DEFAULT_QUERIES
        .iter()
        .find(|(name, _)| *name == query)
        .ok_or_else(|| anyhow::anyhow!("no default query {query}"))?;
    engine.execute(sql).await?;
    Ok(engine)
}

/// The alerts published: (entity, state, window end as text), sorted.
async fn alerts(engine: &mut DeterministicEngine) -> anyhow::Result<Vec<(String, String, String)>> {
    let Outcome::Rows(batches) = engine
        .execute("SELECT entity_id, state, window_end FROM alerts")
        .await?
    else {
        anyhow::bail!("no rows")
    };
    let mut out = Vec::new();
    for b in &batches {
        out.extend(rows(b)?);
    }
    out.sort();
    Ok(out)
}

fn rows(b: &RecordBatch) -> anyhow::Result<Vec<(String, String, String)>> {
    let entity = cast(b.column(0), &DataType::Utf8)?;
    let state = cast(b.column(1), &DataType::Utf8)?;
    let end = cast(
        b.column(2),
        &DataType::Timestamp(TimeUnit::Millisecond, None),
    )?;
    let end_text = end;
    Ok((0..b.num_rows())
        .map(|r| {
            let t = array_value_to_string(&end_text, r).unwrap_or_default();
            let t = t.get(11..16).unwrap_or_default().to_string();
            (
                entity.as_string::<i32>().value(r).to_string(),
                state.as_string::<i32>().value(r).to_string(),
                t,
            )
        })
        .collect())
}

/// Each row as its cells' text, space-separated, in order.
fn text_rows(batches: &[RecordBatch]) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for b in batches {
        let text: Vec<_> = (0..b.num_columns())
            .map(|c| cast(b.column(c), &DataType::Utf8))
            .collect::<Result<_, _>>()?;
        for r in 0..b.num_rows() {
            out.push(
                text.iter()
                    .map(|a| a.as_string::<i32>().value(r).to_string())
                    .collect::<Vec<_>>()
                    .join(" "),
            );
        }
    }
    Ok(out)
}

#[tokio::test]
async fn a_camera_incident_confirmed_by_a_crawling_detector_raises_an_alert() -> anyhow::Result<()>
{
    let mut engine = engine_with("alerts_incidents_confirmed").await?;
    // lang_ntso (a segment of the reference, in ward lang): a stalled vehicle, and a minute
    // later a detector of the segment at 8 km/h.
    // s2: a collision, but the detector sees free flow. s3: a queue, and the crawl comes five
    // minutes later, out of the two-minute bound. The detector reading of lang_ntso arrives first.
    engine
        .execute(
            "INSERT INTO detector_readings (detector_id, segment_id, event_time, interval_s, \
             occupancy_pct, mean_speed_kmh) VALUES \
             ('d1', 'lang_ntso', '2026-01-01T06:11:00', 20, 35.0, 8.0), \
             ('d2', 's2', '2026-01-01T06:10:40', 20, 10.0, 42.0), \
             ('d3', 's3', '2026-01-01T06:15:40', 20, 40.0, 6.0)",
        )
        .await?;
    engine
        .execute(
            "INSERT INTO camera_events (camera_id, segment_id, event_time, kind, confidence, \
             severity) VALUES \
             ('c1', 'lang_ntso', '2026-01-01T06:10:30', 'stalled_vehicle', 0.9, 3), \
             ('c2', 's2', '2026-01-01T06:10:20', 'collision', 0.8, 4), \
             ('c3', 's3', '2026-01-01T06:10:10', 'congestion_queue', 0.7, 2), \
             ('c1', 'lang_ntso', '2026-01-01T06:10:35', 'detection', 0.9, NULL)",
        )
        .await?;
    for stream in ["camera_events", "detector_readings"] {
        engine
            .execute(&format!(
                "ADVANCE WATERMARK {stream} TO '2026-01-01T07:00:00'"
            ))
            .await?;
    }
    assert_eq!(
        alerts(&mut engine).await?,
        vec![
            ("lang_ntso".into(), "CLEARED".into(), "06:26".into()),
            ("lang_ntso".into(), "RAISED".into(), "06:11".into()),
        ]
    );
    // The alert carries the segment's ward, from the reference table.
    let Outcome::Rows(batches) = engine
        .execute("SELECT DISTINCT ward_id FROM alerts")
        .await?
    else {
        anyhow::bail!("no rows")
    };
    assert_eq!(text_rows(&batches)?, vec!["lang".to_string()]);
    Ok(())
}

#[tokio::test]
async fn three_consecutive_hours_above_150_raise_a_pollution_episode() -> anyhow::Result<()> {
    let mut engine = engine_with("alerts_pollution_hours").await?;
    // PM2.5 100 µg/m³ is a VN_AQI sub-index above 150; 40 is below. Ward w1: two hours above,
    // one below, three above, one below. Ward w2: two hours above, an hour silent, two above.
    let hours: [(&str, &[(u32, f64)]); 2] = [
        (
            "w1",
            &[
                (6, 100.0),
                (7, 100.0),
                (8, 40.0),
                (9, 100.0),
                (10, 110.0),
                (11, 120.0),
                (12, 40.0),
            ],
        ),
        ("w2", &[(6, 100.0), (7, 100.0), (9, 100.0), (10, 100.0)]),
    ];
    for hour in 6..13u32 {
        let mut rows = Vec::new();
        for (ward, series) in &hours {
            if let Some((_, pm25)) = series.iter().find(|(h, _)| *h == hour) {
                for minute in [5, 25, 45] {
                    rows.push(format!(
                        "('{ward}-s', '{ward}', '2026-01-01T{hour:02}:{minute:02}:00', {pm25})"
                    ));
                }
            }
        }
        if rows.is_empty() {
            continue;
        }
        engine
            .execute(&format!(
                "INSERT INTO air_readings (sensor_id, ward_id, event_time, pm25) VALUES {}",
                rows.join(", ")
            ))
            .await?;
        // A restart between hours: the hours before are in the checkpoint.
        if hour == 9 {
            engine.execute("RESTART").await?;
        }
    }
    engine
        .execute("ADVANCE WATERMARK air_readings TO '2026-01-01T14:00:00'")
        .await?;
    assert_eq!(
        alerts(&mut engine).await?,
        vec![
            ("w1".into(), "CLEARED".into(), "13:00".into()),
            ("w1".into(), "RAISED".into(), "12:00".into()),
        ]
    );
    Ok(())
}

#[tokio::test]
async fn the_most_congested_segments_of_each_ward_are_ranked_each_minute() -> anyhow::Result<()> {
    let mut engine = engine_with("congestion_top_wards").await?;
    // Thanh Xuân: Nguyễn Trãi at 10 km/h (TTI 5), Khuất Duy Tiến at 25 (TTI 2), Ring Road 3
    // at 40 of 80 (TTI 2, ranked after Khuất Duy Tiến by id). A segment of Láng alone in its
    // ward. In the next minute Nguyễn Trãi clears (50 km/h, TTI 1) and drops to last.
    let detections = [
        ("nguyen_trai_ntso", "06:10:10", 10.0),
        ("nguyen_trai_ntso", "06:10:40", 10.0),
        ("khuat_duy_tien", "06:10:20", 25.0),
        ("rr3_elev_thanh_xuan", "06:10:30", 40.0),
        ("lang_ntso", "06:10:50", 30.0),
        ("nguyen_trai_ntso", "06:11:10", 50.0),
        ("khuat_duy_tien", "06:11:20", 25.0),
        ("rr3_elev_thanh_xuan", "06:11:30", 20.0),
    ];
    let rows: Vec<String> = detections
        .iter()
        .map(|(segment, at, speed)| {
            format!("('cam', '{segment}', '2026-01-01T{at}', 'detection', 'car', {speed}, 0.9)")
        })
        .collect();
    engine
        .execute(&format!(
            "INSERT INTO camera_events (camera_id, segment_id, event_time, kind, vehicle_class, \
             speed_kmh, confidence) VALUES {}",
            rows.join(", ")
        ))
        .await?;
    engine
        .execute("ADVANCE WATERMARK camera_events TO '2026-01-01T06:12:00'")
        .await?;
    let Outcome::Rows(batches) = engine
        .execute(
            "SELECT ward_id, to_char(window_start, '%H:%M') AS minute, place, segment_id \
             FROM congestion_top ORDER BY ward_id, minute, place",
        )
        .await?
    else {
        anyhow::bail!("no rows")
    };
    let got = text_rows(&batches)?;
    assert_eq!(
        got,
        vec![
            "lang 06:10 1 lang_ntso",
            "thanh_xuan 06:10 1 nguyen_trai_ntso",
            "thanh_xuan 06:10 2 khuat_duy_tien",
            "thanh_xuan 06:10 3 rr3_elev_thanh_xuan",
            "thanh_xuan 06:11 1 rr3_elev_thanh_xuan",
            "thanh_xuan 06:11 2 khuat_duy_tien",
            "thanh_xuan 06:11 3 nguyen_trai_ntso",
        ]
    );
    Ok(())
}

#[tokio::test]
async fn vehicles_read_by_two_cameras_give_travel_times() -> anyhow::Result<()> {
    let mut engine = engine_with("travel_times").await?;
    // p1 and p2 pass cam-0005 and then cam-0007 (inbound on Nguyễn Trãi) in 60 s and 90 s;
    // p3 is read once; p4 by cam-0005 and then by an outbound camera (another direction).
    // p2's second reading arrives in a later batch than its first.
    let readings = [
        ("cam-0005", "inbound", "p1", "06:00:10"),
        ("cam-0007", "inbound", "p1", "06:01:10"),
        ("cam-0005", "inbound", "p2", "06:02:00"),
        ("cam-0005", "inbound", "p3", "06:02:10"),
        ("cam-0005", "inbound", "p4", "06:02:20"),
        ("cam-0006", "outbound", "p4", "06:02:50"),
    ];
    let row = |(camera, direction, plate, at): &(&str, &str, &str, &str)| {
        format!(
            "('{camera}', 'nguyen_trai_ntso', '2026-01-01T{at}', 'detection', 'car', 30.0, \
             '{direction}', 0.9, '{plate}')"
        )
    };
    let insert = |rows: Vec<String>| {
        format!(
            "INSERT INTO camera_events (camera_id, segment_id, event_time, kind, vehicle_class, \
             speed_kmh, direction, confidence, plate_hash) VALUES {}",
            rows.join(", ")
        )
    };
    engine
        .execute(&insert(readings.iter().map(row).collect()))
        .await?;
    engine
        .execute(&insert(vec![row(&(
            "cam-0007", "inbound", "p2", "06:03:30",
        ))]))
        .await?;
    engine
        .execute("ADVANCE WATERMARK camera_events TO '2026-01-01T06:10:00'")
        .await?;
    let Outcome::Rows(batches) = engine
        .execute(
            "SELECT segment_id, to_char(window_start, '%H:%M') AS minute, vehicles, \
             mean_travel_s, min_travel_s, max_travel_s FROM travel_times",
        )
        .await?
    else {
        anyhow::bail!("no rows")
    };
    let got = text_rows(&batches)?;
    assert_eq!(got, vec!["nguyen_trai_ntso 06:00 2 75.0 60.0 90.0"]);
    Ok(())
}

/// The simulated city's camera records over 20 minutes, through `travel_times` in
/// micro-batches of one simulated second: the travel times equal those computed here from
/// the records' plate hashes (the same plate read by two cameras of a segment facing the
/// same way, the second within ten minutes, per five minutes of the second reading).
#[tokio::test]
async fn simulated_travel_times_match_the_plates_read_twice() -> anyhow::Result<()> {
    use std::collections::BTreeMap;
    use urbanstream::decode::JsonDecoder;
    use urbanstream::reference::ReferenceData;
    use urbanstream::simulate::{CitySimulator, SimConfig, SimTopic};
    use urbanstream::source::RawBatch;
    let schemas = SchemaRegistry::embedded()?;
    let ctx = city_context(&Topics::default(), &schemas)?;
    let (_, sql) = DEFAULT_QUERIES
        .iter()
        .find(|(name, _)| *name == "travel_times")
        .ok_or_else(|| anyhow::anyhow!("no travel_times"))?;
    let mut query = None;
    for statement in urbanstream::plan::stream::StreamContext::parse(sql)? {
        query = ctx.plan(statement).await?;
    }
    let mut query = query.ok_or_else(|| anyhow::anyhow!("travel_times planned to nothing"))?;
    let decoder = JsonDecoder::new(schemas.get("camera_event")?)
        .with_event_time("event_time", TimeUnit::Millisecond);
    let config = SimConfig {
        seed: 11,
        detections_per_sim_second: 20.0,
        malformed_share: 0.0,
        late_share: 0.0,
        out_of_order_share: 0.0,
        air_history_hours: 0,
        ..SimConfig::default()
    };
    let mut sim = CitySimulator::new(config, std::sync::Arc::new(ReferenceData::embedded()?));
    // The reference: each plate's readings, (segment, direction, camera, time).
    let mut readings: BTreeMap<String, Vec<(String, String, String, i64)>> = BTreeMap::new();
    let mut published = Vec::new();
    let mut offset = 0;
    let now = i64::MAX / 4;
    for _ in 0..20 * 60 {
        let mut raw = RawBatch::new("city.camera.events");
        for record in sim.next_tick() {
            if record.topic != SimTopic::Camera {
                continue;
            }
            let v: serde_json::Value = serde_json::from_slice(&record.payload)?;
            if let Some(plate) = v["plate_hash"].as_str() {
                readings.entry(plate.to_string()).or_default().push((
                    v["segment_id"].as_str().unwrap_or_default().to_string(),
                    v["direction"].as_str().unwrap_or_default().to_string(),
                    v["camera_id"].as_str().unwrap_or_default().to_string(),
                    record.event_time,
                ));
            }
            raw.push(
                0,
                offset,
                Some(record.key.as_bytes()),
                Some(&record.payload),
            );
            offset += 1;
        }
        let decoded = decoder.decode(&raw)?;
        let partitions = vec![0; decoded.batch.num_rows()];
        let out = query
            .process(&decoded.batch, &partitions, None, now)
            .await?;
        anyhow::ensure!(out.diverted.is_empty(), "simulated readings set aside");
        published.extend(out.rows);
    }
    let end = sim.sim_time_ms() + 3_600_000;
    published.extend(query.advance_watermark(end, now).await?.rows);
    // Per (segment, window start): (vehicles, total travel ms).
    let mut want: BTreeMap<(String, i64), (i64, i64)> = BTreeMap::new();
    for reads in readings.values() {
        for a in reads {
            for b in reads {
                if a.0 == b.0 && a.1 == b.1 && a.2 != b.2 && b.3 > a.3 && b.3 <= a.3 + 600_000 {
                    let w = want
                        .entry((a.0.clone(), b.3.div_euclid(300_000) * 300_000))
                        .or_default();
                    w.0 += 1;
                    w.1 += b.3 - a.3;
                }
            }
        }
    }
    anyhow::ensure!(
        want.len() > 10,
        "too few travel times simulated: {}",
        want.len()
    );
    let mut got: BTreeMap<(String, i64), (i64, i64)> = BTreeMap::new();
    for b in &published {
        let segment = cast(
            b.column_by_name("segment_id").expect("segment"),
            &DataType::Utf8,
        )?;
        let start = cast(
            b.column_by_name("window_start").expect("start"),
            &DataType::Timestamp(TimeUnit::Millisecond, None),
        )?;
        let start = start.as_primitive::<datafusion::arrow::datatypes::TimestampMillisecondType>();
        let n = cast(
            b.column_by_name("vehicles").expect("vehicles"),
            &DataType::Int64,
        )?;
        let n = n.as_primitive::<datafusion::arrow::datatypes::Int64Type>();
        let mean = b.column_by_name("mean_travel_s").expect("mean");
        let mean = mean.as_primitive::<datafusion::arrow::datatypes::Float64Type>();
        for r in 0..b.num_rows() {
            let key = (
                segment.as_string::<i32>().value(r).to_string(),
                start.value(r),
            );
            let total = (mean.value(r) * 1000.0 * n.value(r) as f64).round() as i64;
            anyhow::ensure!(
                got.insert(key.clone(), (n.value(r), total)).is_none(),
                "{key:?} published twice"
            );
        }
    }
    assert_eq!(got, want);
    Ok(())
}

/// Stations declared at run time, reporting once an hour: the hours before they are declared
/// are incomplete (an unknown sensor is expected every 60 s), and from the declaration on,
/// without restarting or re-planning the queries, every hour and every local day of the
/// stations and of their ward gets a VN_AQI. A restart in the middle (the queries planned
/// again, their state from a checkpoint) keeps them; the versions are kept on disk for a new
/// process.
#[tokio::test]
async fn hourly_stations_declared_at_run_time_get_hourly_and_daily_vn_aqi() -> anyhow::Result<()> {
    use urbanstream::plan::city_context_in;
    use urbanstream::plan::stream::StreamContext;
    use urbanstream::reference::ReferenceTables;

    let dir = tempfile::tempdir()?;
    let tables = ReferenceTables::open(dir.path())?;
    let ctx = city_context_in(
        StreamContext::new(),
        &Topics::default(),
        &SchemaRegistry::embedded()?,
        &tables,
    )?;
    let mut engine = DeterministicEngine::with_context(ctx);
    for name in ["air_hourly_sensor", "air_hourly_ward", "air_daily_sensor"] {
        let (_, sql) = DEFAULT_QUERIES
            .iter()
            .find(|(n, _)| *n == name)
            .ok_or_else(|| anyhow::anyhow!("no default query {name}"))?;
        engine.execute(sql).await?;
    }
    let stations = ["hn-st-01", "hn-st-02"];
    let reading = |station: &str, day: u32, hour: u32| {
        let pm25 = 30.0 + f64::from((hour * 7 + day) % 40);
        format!("('{station}', 'quan_trac', '2026-01-{day:02}T{hour:02}:20:00', {pm25}, 25.0)")
    };
    let insert = |rows: Vec<String>| {
        format!(
            "INSERT INTO air_readings (sensor_id, ward_id, event_time, pm25, no2) VALUES {}",
            rows.join(", ")
        )
    };
    // 14:00–17:00 UTC on 1 January: not declared yet.
    for hour in 14..17 {
        engine
            .execute(&insert(
                stations.iter().map(|s| reading(s, 1, hour)).collect(),
            ))
            .await?;
    }
    // The ward and its two hourly stations, declared as CSV beside the built-in rows.
    let mut wards = tables
        .get("wards")
        .map(|t| t.csv.to_string())
        .unwrap_or_default();
    wards.push_str("quan_trac,Trạm quan trắc,21.05,105.80\n");
    tables.replace("wards", &wards)?;
    let mut sensors = tables
        .get("sensors")
        .map(|t| t.csv.to_string())
        .unwrap_or_default();
    for (i, s) in stations.iter().enumerate() {
        sensors.push_str(&format!("{s},quan_trac,station,21.0{i},105.80,3600\n"));
    }
    tables.replace("sensors", &sensors)?;
    // Two local days (UTC+7), 17:00 UTC on 1 January to 17:00 UTC on 3 January.
    for step in 0..48u32 {
        let (day, hour) = (1 + (17 + step) / 24, (17 + step) % 24);
        engine
            .execute(&insert(
                stations.iter().map(|s| reading(s, day, hour)).collect(),
            ))
            .await?;
        if step == 20 {
            engine.execute("RESTART").await?;
        }
    }
    engine
        .execute("ADVANCE WATERMARK air_readings TO '2026-01-03T18:00:00'")
        .await?;
    let Outcome::Rows(batches) = engine
        .execute(
            "SELECT entity_id, scope, period, CAST(window_end AS VARCHAR) AS w, complete, \
             CAST(aqi IS NOT NULL AS VARCHAR) AS has_aqi FROM air_indicators \
             WHERE entity_id IN ('hn-st-01', 'hn-st-02', 'quan_trac') \
             ORDER BY scope, period, entity_id, window_end",
        )
        .await?
    else {
        anyhow::bail!("no rows")
    };
    let rows = text_rows(&batches)?;
    let count = |prefix: &str, complete: &str, aqi: &str| {
        rows.iter()
            .filter(|r| r.starts_with(prefix) && r.ends_with(&format!(" {complete} {aqi}")))
            .count()
    };
    for s in stations {
        // The three hours before the declaration: one reading of the 60 expected.
        assert_eq!(
            count(&format!("{s} sensor hour"), "false", "false"),
            3,
            "{rows:#?}"
        );
        // Every hour after: complete, with an AQI.
        assert_eq!(
            count(&format!("{s} sensor hour"), "true", "true"),
            48,
            "{rows:#?}"
        );
        // The local days of 2 and 3 January: 24 complete hours each.
        assert_eq!(
            count(&format!("{s} sensor day"), "true", "true"),
            2,
            "{rows:#?}"
        );
    }
    // The ward: both stations every hour from the declaration on.
    assert_eq!(
        count("quan_trac ward hour", "true", "true"),
        48,
        "{rows:#?}"
    );
    // The versions are kept beside the catalog, for a new process.
    let reopened = ReferenceTables::open(dir.path())?;
    assert_eq!(reopened.get("sensors").map(|t| t.version), Some(2));
    assert_eq!(reopened.get("wards").map(|t| t.version), Some(2));
    assert_eq!(
        reopened.get("sensors").map(|t| t.csv.clone()),
        tables.get("sensors").map(|t| t.csv.clone())
    );
    Ok(())
}
