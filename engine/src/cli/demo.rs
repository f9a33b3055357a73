//! `urbanstream demo`: the whole pipeline on an embedded broker with a simulated city.
//!
//! It starts the broker (or uses `--brokers`), creates the city's topics, produces simulated
//! traffic and air data, runs the pipeline, and reads the indicator topic back with an
//! ordinary consumer, so the view shows what really came out of Kafka. On a terminal the view
//! redraws every second; otherwise it prints a plain line every five seconds. A summary
//! follows on exit.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;

use super::{DemoArgs, sim_producer};
use crate::broker::{EmbeddedBroker, create_topics};
use crate::dashboard::{AirRow, AlertRow, CityView, IndicatorRow, View, read_outputs};
use crate::error::{Error, Result};
use crate::pipeline::{Pipeline, PipelineConfig, PipelineStats, Topics};
use crate::reference::ReferenceData;
use crate::schema::SchemaRegistry;
use crate::signals::stop_on_signal;
use crate::simulate::{CitySimulator, ProducerStats, SimTopics, run_producer};
use crate::time::display::DisplayZone;

/// `YYYY-MM-DD HH:MM:SS` in the city's time, `-` for an unset time.
pub fn hanoi_time(epoch_ms: i64) -> String {
    DisplayZone::CITY.format(epoch_ms)
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> Result<()> {
    let topics = Topics::default();
    let schemas = SchemaRegistry::embedded()?;
    let all_topics = topics.declared(&schemas)?;
    let mut embedded = None;
    let brokers = match &args.brokers {
        Some(b) => {
            crate::broker::check_reachable(b).await?;
            let wanted: Vec<_> = all_topics
                .iter()
                .map(|t| (t.clone(), args.partitions))
                .collect();
            create_topics(b, &wanted).await?;
            b.clone()
        }
        None => {
            let broker = EmbeddedBroker::start()?;
            for topic in &all_topics {
                broker.create_topic(topic, args.partitions)?;
            }
            let b = broker.bootstrap_servers();
            embedded = Some(broker);
            b
        }
    };
    let reference = Arc::new(ReferenceData::embedded()?);
    let zone = args.display_time_zone;
    let city = CityView::new(&reference, zone);

    let stop = Arc::new(AtomicBool::new(false));
    stop_on_signal(stop.clone());

    // The simulated city.
    let sim_stop = Arc::new(AtomicBool::new(false));
    let sim_stats = Arc::new(ProducerStats::default());
    let simulator = CitySimulator::new(args.sim.sim_config(), reference.clone());
    let sim_task = tokio::spawn(run_producer(
        simulator,
        sim_producer(&brokers)?,
        SimTopics::new(&topics, &schemas)?,
        args.sim.speedup,
        sim_stop.clone(),
        sim_stats.clone(),
    ));

    // The pipeline.
    let stats = Arc::new(PipelineStats::new());
    let pipeline_stop = Arc::new(AtomicBool::new(false));
    let pipeline = Pipeline::new(PipelineConfig::new(&brokers), stats.clone()).await?;
    let pipeline_task = tokio::spawn(pipeline.run(pipeline_stop.clone()));

    // An ordinary consumer of the output topics feeds the view (and the web console).
    let view_stop = Arc::new(AtomicBool::new(false));
    let mut view_client = ClientConfig::new();
    view_client.set("bootstrap.servers", &brokers);
    let view_task = tokio::spawn(read_outputs(
        city.clone(),
        view_client,
        topics.clone(),
        None,
        view_stop.clone(),
    ));
    let web = match args.listen {
        Some(listen) if !args.no_web => match serve_console(listen, city.clone()).await {
            Ok(address) => Some(address),
            Err(e) => {
                eprintln!("web console not started: {e} (choose another --listen, or --no-web)");
                None
            }
        },
        _ => None,
    };

    let started = Instant::now();
    let terminal = std::io::stdout().is_terminal();
    if let (Some(address), false) = (web, terminal) {
        println!("web console and city map: http://{address}/");
    }
    let every = if terminal {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(5)
    };
    let mut last_in = 0;
    let mut last_at = Instant::now();
    let mut failed = None;
    while !stop.load(Ordering::Relaxed) {
        if args.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
        if pipeline_task.is_finished() {
            failed = Some("the pipeline stopped");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100).min(every)).await;
        if last_at.elapsed() < every {
            continue;
        }
        let records = stats.records_in.load(Ordering::Relaxed);
        let rate = (records - last_in) as f64 / last_at.elapsed().as_secs_f64();
        last_in = records;
        last_at = Instant::now();
        let Some(v) = city.with(View::clone) else {
            return Err(Error::Config("view lock poisoned".into()));
        };
        if terminal {
            draw(
                &Screen {
                    brokers: &brokers,
                    embedded: embedded.is_some(),
                    web,
                    args: &args,
                    stats: &stats,
                    sim: &sim_stats,
                },
                &v,
                &city,
                rate,
                started,
            );
        } else {
            let worst = v
                .wards
                .values()
                .filter(|r| r.window_end == v.last_hour)
                .max_by_key(|r| r.aqi);
            let flooded = v.water.values().filter(|g| g.warning_level >= 1).count();
            let fullest = v.parking_wards.values().max_by(|a, b| {
                a.occupancy_pct
                    .unwrap_or(0.0)
                    .total_cmp(&b.occupancy_pct.unwrap_or(0.0))
            });
            println!(
                "t={:>4}s in={:>7.0}/s events={} dlq={} late={} indicators_out={} received={} watermark={} worst_ward_aqi={} gauges_at_warning={flooded} fullest_parking={}",
                started.elapsed().as_secs(),
                rate,
                records,
                stats.dlq.load(Ordering::Relaxed),
                stats.late.load(Ordering::Relaxed),
                stats.indicators_out.load(Ordering::Relaxed),
                v.received,
                zone.format(stats.watermark_ms.load(Ordering::Relaxed)),
                worst.map_or("-".into(), |r| format!(
                    "{}:{}:{}",
                    r.entity_id,
                    r.aqi.map_or("-".into(), |a| a.to_string()),
                    r.category_en.as_deref().unwrap_or("-")
                )),
                fullest.map_or("-".into(), |p| format!(
                    "{}:{:.0}%",
                    p.entity_id,
                    p.occupancy_pct.unwrap_or(0.0)
                )),
            );
        }
    }

    sim_stop.store(true, Ordering::Relaxed);
    let _ = sim_task.await;
    pipeline_stop.store(true, Ordering::Relaxed);
    let pipeline_result = pipeline_task.await;
    // Give the view consumer a moment to read the last published windows, then close every
    // client before the embedded broker goes away.
    tokio::time::sleep(Duration::from_millis(500)).await;
    view_stop.store(true, Ordering::Relaxed);
    let _ = view_task.await;
    let on_embedded = embedded.is_some();
    drop(embedded);

    let indicators = stats.indicators_out.load(Ordering::Relaxed);
    println!();
    println!(
        "urbanstream demo summary ({:.0} s)",
        started.elapsed().as_secs_f64()
    );
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed).to_string();
    for (label, value) in [
        ("records produced", load(&sim_stats.produced)),
        ("records in", load(&stats.records_in)),
        ("  camera events", load(&stats.camera_events)),
        ("  detector readings", load(&stats.detector_readings)),
        ("  air readings", load(&stats.air_readings)),
        (
            "  other topics read",
            stats
                .records_in
                .load(Ordering::Relaxed)
                .saturating_sub(
                    stats.camera_events.load(Ordering::Relaxed)
                        + stats.detector_readings.load(Ordering::Relaxed)
                        + stats.air_readings.load(Ordering::Relaxed),
                )
                .to_string(),
        ),
        ("rows out, all outputs", indicators.to_string()),
        (
            "  read back by the view",
            city.with(|v| v.received).unwrap_or(0).to_string(),
        ),
        ("DLQ records", load(&stats.dlq)),
        ("late records, per query", load(&stats.late)),
        (
            "final watermark",
            zone.format_labelled(stats.watermark_ms.load(Ordering::Relaxed)),
        ),
    ] {
        println!("  {label:<28}{value:>12}");
    }
    let produced = sim_stats.produced.load(Ordering::Relaxed);
    let read = stats.records_in.load(Ordering::Relaxed);
    if produced != read {
        println!(
            "  note: {} records produced were not read before the stop",
            produced.saturating_sub(read)
        );
    }
    println!(
        "  note: the other topics read are parking, water levels, citizen reports and the \
         outputs other queries read (availability, water and congestion indicators, alerts)"
    );
    println!(
        "  note: the view reads back congestion, air, parking, water and alerts (not the top-5 \
         and travel-time topics); a late event is one record per query it was late for"
    );
    if on_embedded {
        println!("  note: {}", crate::broker::LIMITS);
    }

    match pipeline_result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(e) => return Err(Error::Config(format!("pipeline task failed: {e}"))),
    }
    if let Some(why) = failed {
        return Err(Error::Config(why.into()));
    }
    if indicators == 0 {
        return Err(Error::Config(
            "no indicators were produced: run longer, or check the broker".into(),
        ));
    }
    Ok(())
}

/// What the terminal screen shows besides the view.
struct Screen<'a> {
    brokers: &'a str,
    embedded: bool,
    web: Option<SocketAddr>,
    args: &'a DemoArgs,
    stats: &'a PipelineStats,
    sim: &'a ProducerStats,
}

fn draw(screen: &Screen, view: &View, city: &CityView, rate: f64, started: Instant) {
    let Screen {
        brokers,
        embedded,
        web,
        args,
        stats,
        sim,
    } = *screen;
    let zone = args.display_time_zone;
    let mut out = String::new();
    let w = stats.watermark_ms.load(Ordering::Relaxed);
    let sim_now = sim.sim_time_ms.load(Ordering::Relaxed);
    out.push_str(&format!(
        "urbanstream demo · {} broker {brokers} · simulated Hanoi at {}× · {:.0} s · times in {zone} · Ctrl-C to stop\n{}\n",
        if embedded { "embedded" } else { "external" },
        args.sim.speedup,
        started.elapsed().as_secs_f64(),
        web.map_or_else(String::new, |a| format!("web console and city map: http://{a}/\n")),
    ));
    out.push_str(&format!(
        "input     {rate:>9.0} records/s   total {:>9}   camera {:>9}   detectors {:>6}   air {:>6}\n",
        stats.records_in.load(Ordering::Relaxed),
        stats.camera_events.load(Ordering::Relaxed),
        stats.detector_readings.load(Ordering::Relaxed),
        stats.air_readings.load(Ordering::Relaxed),
    ));
    out.push_str(&format!(
        "output    indicators {:>7}   read back {:>7}   DLQ {:>6}   late {:>6}\n",
        stats.indicators_out.load(Ordering::Relaxed),
        view.received,
        stats.dlq.load(Ordering::Relaxed),
        stats.late.load(Ordering::Relaxed),
    ));
    out.push_str(&format!(
        "time      simulated {}   watermark {}   open groups {}\n\n",
        zone.format(sim_now),
        zone.format(w),
        stats.state_groups.load(Ordering::Relaxed),
    ));
    let mut rows: Vec<&IndicatorRow> = view
        .latest
        .values()
        .filter(|r| r.window_start == view.last_window)
        .collect();
    rows.sort_by(|a, b| {
        b.vehicles
            .cmp(&a.vehicles)
            .then(a.segment_id.cmp(&b.segment_id))
    });
    out.push_str(&format!(
        "busiest segments, minute {} – {} (from city.indicators.congestion)\n",
        zone.format(view.last_window),
        zone.clock(view.last_window + 60_000)
    ));
    out.push_str(&format!(
        "  {:<48} {:>8} {:>9} {:>6} {:>4} {:>10}\n",
        "segment", "veh/min", "km/h", "TTI", "LOS", "motorbike"
    ));
    let dash = || "-".to_string();
    for row in rows.iter().take(10) {
        let name = city.name(&row.segment_id);
        out.push_str(&format!(
            "  {:<48} {:>8} {:>9} {:>6} {:>4} {:>9}%\n",
            truncate(&name, 48),
            row.vehicles,
            row.space_mean_speed_kmh
                .or(row.mean_speed_kmh)
                .map_or_else(dash, |v| format!("{v:.1}")),
            row.tti.map_or_else(dash, |v| format!("{v:.2}")),
            row.los.clone().unwrap_or_else(dash),
            row.motorbike_share
                .map_or_else(dash, |v| format!("{:.0}", v * 100.0)),
        ));
    }
    let mut wards: Vec<&AirRow> = view
        .wards
        .values()
        .filter(|r| r.window_end == view.last_hour)
        .collect();
    wards.sort_by(|a, b| b.aqi.cmp(&a.aqi).then(a.entity_id.cmp(&b.entity_id)));
    out.push_str(&format!(
        "\nair quality by ward, hour {} – {} (VN_AQI, PM by NowCast; from city.indicators.air)\n",
        if view.last_hour == 0 {
            "-".into()
        } else {
            zone.format(view.last_hour - 3_600_000)
        },
        zone.clock(view.last_hour)
    ));
    out.push_str(&format!(
        "  {:<28} {:>4}  {:<24} {:>10} {:>13}\n",
        "ward", "AQI", "category", "dominant", "PM2.5 NowCast"
    ));
    for row in wards.iter().take(8) {
        let name = city.name(&row.entity_id);
        let category = match (&row.category, &row.category_en) {
            (Some(vi), Some(en)) => format!("{vi} ({en})"),
            (Some(vi), None) => vi.clone(),
            _ => dash(),
        };
        out.push_str(&format!(
            "  {:<28} {:>4}  {:<24} {:>10} {:>13}\n",
            truncate(&name, 28),
            row.aqi.map_or_else(dash, |v| v.to_string()),
            truncate(&category, 24),
            row.dominant_pollutant.clone().unwrap_or_else(dash),
            row.pm25_nowcast.map_or_else(dash, |v| format!("{v:.1}")),
        ));
    }
    // Water and parking, from city.indicators.water and city.indicators.parking.
    let mut gauges: Vec<_> = view.water.values().collect();
    gauges.sort_by(|a, b| {
        b.warning_level.cmp(&a.warning_level).then(
            b.level_cm
                .unwrap_or(0.0)
                .total_cmp(&a.level_cm.unwrap_or(0.0)),
        )
    });
    out.push_str("\nwater (warning level 0–III, from city.indicators.water)   ");
    for g in gauges.iter().take(4) {
        out.push_str(&format!(
            "{} {} cm ({})   ",
            truncate(&city.name(&g.gauge_id), 22),
            g.level_cm.map_or_else(dash, |v| format!("{v:.0}")),
            ["-", "I", "II", "III"][g.warning_level.clamp(0, 3) as usize],
        ));
    }
    let mut parking: Vec<_> = view.parking_wards.values().collect();
    parking.sort_by(|a, b| {
        b.occupancy_pct
            .unwrap_or(0.0)
            .total_cmp(&a.occupancy_pct.unwrap_or(0.0))
    });
    out.push_str("\nparking (occupied, free spaces; from city.indicators.parking)  ");
    for p in parking.iter().take(4) {
        out.push_str(&format!(
            "{} {} % ({} free)   ",
            truncate(&city.name(&p.entity_id), 16),
            p.occupancy_pct.map_or_else(dash, |v| format!("{v:.0}")),
            p.free_spaces.map_or_else(dash, |v| format!("{v:.0}")),
        ));
    }
    out.push('\n');
    let alerts: Vec<&AlertRow> = view.active_alerts();
    out.push_str(&format!(
        "\nactive alerts {} (raised {}, cleared {}; from city.alerts)\n",
        view.alerts.len(),
        view.raised,
        view.cleared
    ));
    for a in alerts.iter().take(8) {
        out.push_str(&format!(
            "  {:>2} {:<19} {:<26} since {}  {}\n",
            a.severity.map_or_else(dash, |v| v.to_string()),
            a.kind,
            truncate(&city.name(&a.entity_id), 26),
            zone.clock(a.started_at),
            truncate(a.message.as_deref().unwrap_or(""), 60),
        ));
    }
    // The screen is cleared, then the view written with the control characters of its data
    // (alert kinds and messages are written by analysts' queries) escaped, not obeyed.
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(b"\x1b[2J\x1b[H");
    let _ = stdout.write_all(crate::service::client::printable(&out).as_bytes());
    let _ = stdout.flush();
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).collect::<String>() + "…"
    }
}

/// Serves the web console and the city view on `listen` (no query console: the demo runs
/// its pipeline without the service); the address it listens on.
async fn serve_console(listen: SocketAddr, city: Arc<CityView>) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Error::Config(format!("--listen {listen}: {e}")))?;
    let address = listener.local_addr()?;
    // As the service's API does: a page of another origin, or one reaching the loopback
    // through a name of its own (DNS rebinding), is refused.
    let app = axum::Router::new()
        .merge(crate::dashboard::console_routes())
        .nest("/v1", crate::dashboard::city_routes(city))
        .layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| async move {
                match crate::service::api::foreign(request.headers(), request.method(), address) {
                    Some(why) => axum::response::IntoResponse::into_response((
                        axum::http::StatusCode::FORBIDDEN,
                        why,
                    )),
                    None => next.run(request).await,
                }
            },
        ));
    tokio::spawn(crate::service::http::serve(
        listener,
        app,
        crate::service::http::Limits::default(),
        std::future::pending(),
    ));
    Ok(address)
}
