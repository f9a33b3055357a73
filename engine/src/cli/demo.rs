//! `urbanstream demo`: the whole pipeline on an embedded broker with a simulated city.
//!
//! It starts the broker (or uses `--brokers`), creates the city's topics, produces simulated
//! traffic and air data, runs the pipeline, and reads the indicator topic back with an
//! ordinary consumer, so the view shows what really came out of Kafka. On a terminal the view
//! redraws every second; otherwise it prints a plain line every five seconds. A summary
//! follows on exit.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use serde::Deserialize;

use super::{DemoArgs, sim_producer, stop_on_signal};
use crate::broker::{EmbeddedBroker, create_topics};
use crate::error::{Error, Result};
use crate::pipeline::{Pipeline, PipelineConfig, PipelineStats, Topics};
use crate::reference::ReferenceData;
use crate::simulate::{CitySimulator, HANOI_OFFSET_MS, ProducerStats, run_producer};

/// A congestion indicator as read back from its topic.
#[derive(Debug, Clone, Deserialize)]
pub struct IndicatorRow {
    /// Segment.
    pub segment_id: String,
    /// Window start, epoch ms.
    pub window_start: i64,
    /// Window end, epoch ms.
    pub window_end: i64,
    /// Vehicles in the window.
    pub vehicles: i64,
    /// Time-mean speed.
    pub mean_speed_kmh: Option<f64>,
    /// Motorbike share.
    pub motorbike_share: Option<f64>,
    /// Space-mean speed.
    #[serde(default)]
    pub space_mean_speed_kmh: Option<f64>,
    /// Travel Time Index.
    #[serde(default)]
    pub tti: Option<f64>,
    /// Level of service A–F.
    #[serde(default)]
    pub los: Option<String>,
}

/// An air indicator as read back from its topic.
#[derive(Debug, Clone, Deserialize)]
pub struct AirRow {
    /// Ward or sensor id.
    pub entity_id: String,
    /// `ward` or `sensor`.
    pub scope: String,
    /// `hour` or `day`.
    #[serde(default)]
    pub period: Option<String>,
    /// Window end, epoch ms.
    pub window_end: i64,
    /// VN_AQI.
    pub aqi: Option<i64>,
    /// Category (Vietnamese).
    pub category: Option<String>,
    /// Category (English).
    #[serde(default)]
    pub category_en: Option<String>,
    /// Dominant parameter.
    pub dominant_pollutant: Option<String>,
    /// PM2.5 NowCast.
    #[serde(default)]
    pub pm25_nowcast: Option<f64>,
}

/// An alert record as read back from its topic.
#[derive(Debug, Clone, Deserialize)]
pub struct AlertRow {
    /// Stable id across the alert's records.
    pub alert_id: String,
    /// RAISED, UPDATED or CLEARED.
    pub state: String,
    /// Alert kind.
    pub kind: String,
    /// The entity.
    pub entity_id: String,
    /// Event time the condition began, epoch ms.
    pub started_at: i64,
    /// 2–5.
    #[serde(default)]
    pub severity: Option<i32>,
    /// Explanation.
    #[serde(default)]
    pub message: Option<String>,
}

#[derive(Default)]
struct View {
    /// Active alerts by id.
    alerts: HashMap<String, AlertRow>,
    raised: u64,
    cleared: u64,
    latest: HashMap<String, IndicatorRow>,
    received: u64,
    last_window: i64,
    /// Latest hourly AQI per ward.
    wards: HashMap<String, AirRow>,
    last_hour: i64,
}

impl View {
    /// Takes one record read back from an indicator topic.
    fn take(&mut self, topic: &str, topics: &Topics, payload: &[u8]) -> bool {
        if topic == topics.congestion.as_str() {
            let Ok(row) = serde_json::from_slice::<IndicatorRow>(payload) else {
                return false;
            };
            self.last_window = self.last_window.max(row.window_start);
            self.latest.insert(row.segment_id.clone(), row);
        } else if topic == topics.alerts.as_str() {
            let Ok(row) = serde_json::from_slice::<AlertRow>(payload) else {
                return false;
            };
            if row.state == "CLEARED" {
                self.cleared += 1;
                self.alerts.remove(&row.alert_id);
            } else {
                self.raised += u64::from(row.state == "RAISED");
                self.alerts.insert(row.alert_id.clone(), row);
            }
        } else if topic == topics.air_indicators.as_str() {
            let Ok(row) = serde_json::from_slice::<AirRow>(payload) else {
                return false;
            };
            if row.scope == "ward" && row.period.as_deref() != Some("day") {
                self.last_hour = self.last_hour.max(row.window_end);
                self.wards.insert(row.entity_id.clone(), row);
            }
        } else {
            return false;
        }
        self.received += 1;
        true
    }
}

/// `HH:MM:SS` of [`hanoi_time`], or `-` before any time is known.
pub fn hanoi_clock(epoch_ms: i64) -> String {
    let t = hanoi_time(epoch_ms);
    t.get(11..).map_or_else(|| "-".to_string(), str::to_string)
}

/// `YYYY-MM-DD HH:MM:SS` in Hanoi time, `-` for an unset time.
pub fn hanoi_time(epoch_ms: i64) -> String {
    if epoch_ms == i64::MIN || epoch_ms == 0 {
        return "-".into();
    }
    let local = epoch_ms + HANOI_OFFSET_MS;
    let days = local.div_euclid(86_400_000);
    let ms = local.rem_euclid(86_400_000);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> Result<()> {
    let topics = Topics::default();
    let mut embedded = None;
    let brokers = match &args.brokers {
        Some(b) => {
            crate::broker::check_reachable(b).await?;
            let wanted: Vec<_> = topics
                .all()
                .into_iter()
                .map(|t| (t, args.partitions))
                .collect();
            create_topics(b, &wanted).await?;
            b.clone()
        }
        None => {
            let broker = EmbeddedBroker::start()?;
            for topic in topics.all() {
                broker.create_topic(&topic, args.partitions)?;
            }
            let b = broker.bootstrap_servers();
            embedded = Some(broker);
            b
        }
    };
    let reference = Arc::new(ReferenceData::embedded()?);
    let names: HashMap<String, String> = reference
        .segments
        .iter()
        .map(|s| (s.segment_id.clone(), s.name.clone()))
        .chain(
            reference
                .wards
                .iter()
                .map(|w| (w.ward_id.clone(), w.name.clone())),
        )
        .collect();

    let stop = Arc::new(AtomicBool::new(false));
    stop_on_signal(stop.clone());

    // The simulated city.
    let sim_stop = Arc::new(AtomicBool::new(false));
    let sim_stats = Arc::new(ProducerStats::default());
    let simulator = CitySimulator::new(args.sim.sim_config(), reference.clone());
    let sim_task = tokio::spawn(run_producer(
        simulator,
        sim_producer(&brokers)?,
        [
            topics.camera.clone(),
            topics.detectors.clone(),
            topics.air.clone(),
        ],
        args.sim.speedup,
        sim_stop.clone(),
        sim_stats.clone(),
    ));

    // The pipeline.
    let stats = Arc::new(PipelineStats::new());
    let pipeline_stop = Arc::new(AtomicBool::new(false));
    let pipeline = Pipeline::new(PipelineConfig::new(&brokers), stats.clone()).await?;
    let pipeline_task = tokio::spawn(pipeline.run(pipeline_stop.clone()));

    // An ordinary consumer of the indicator topics feeds the view.
    let view = Arc::new(Mutex::new(View::default()));
    let view_consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "urbanstream-demo-view")
        .set("auto.offset.reset", "earliest")
        .create()?;
    view_consumer.subscribe(&[&topics.congestion, &topics.air_indicators, &topics.alerts])?;
    let received = Arc::new(AtomicU64::new(0));
    let view_stop = Arc::new(AtomicBool::new(false));
    let view_task = {
        let view = view.clone();
        let received = received.clone();
        let view_stop = view_stop.clone();
        let topics = topics.clone();
        tokio::spawn(async move {
            // Stops cooperatively so that the consumer closes while the broker is still up.
            while !view_stop.load(Ordering::Relaxed) {
                let next = tokio::time::timeout(Duration::from_millis(200), view_consumer.recv());
                let Ok(Ok(message)) = next.await else {
                    continue;
                };
                let Some(payload) = message.payload() else {
                    continue;
                };
                if let Ok(mut v) = view.lock()
                    && v.take(message.topic(), &topics, payload)
                {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    let started = Instant::now();
    let terminal = std::io::stdout().is_terminal();
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
        let v = view
            .lock()
            .map_err(|_| Error::Config("view lock poisoned".into()))?;
        if terminal {
            draw(
                &brokers,
                embedded.is_some(),
                &args,
                &stats,
                &sim_stats,
                &v,
                &names,
                rate,
                started,
            );
        } else {
            let worst = v
                .wards
                .values()
                .filter(|r| r.window_end == v.last_hour)
                .max_by_key(|r| r.aqi);
            println!(
                "t={:>4}s in={:>7.0}/s events={} dlq={} late={} indicators_out={} received={} watermark={} worst_ward_aqi={}",
                started.elapsed().as_secs(),
                rate,
                records,
                stats.dlq.load(Ordering::Relaxed),
                stats.late.load(Ordering::Relaxed),
                stats.indicators_out.load(Ordering::Relaxed),
                v.received,
                hanoi_time(stats.watermark_ms.load(Ordering::Relaxed)),
                worst.map_or("-".into(), |r| format!(
                    "{}:{}:{}",
                    r.entity_id,
                    r.aqi.map_or("-".into(), |a| a.to_string()),
                    r.category_en.as_deref().unwrap_or("-")
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
        ("indicators out", indicators.to_string()),
        ("indicators read back", load(&received)),
        ("DLQ records", load(&stats.dlq)),
        ("late events", load(&stats.late)),
        (
            "final watermark",
            hanoi_time(stats.watermark_ms.load(Ordering::Relaxed)),
        ),
    ] {
        println!("  {label:<24}{value:>12}");
    }
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

#[allow(clippy::too_many_arguments)]
fn draw(
    brokers: &str,
    embedded: bool,
    args: &DemoArgs,
    stats: &PipelineStats,
    sim: &ProducerStats,
    view: &View,
    names: &HashMap<String, String>,
    rate: f64,
    started: Instant,
) {
    let mut out = String::new();
    let w = stats.watermark_ms.load(Ordering::Relaxed);
    let sim_now = sim.sim_time_ms.load(Ordering::Relaxed);
    out.push_str("\x1b[2J\x1b[H");
    out.push_str(&format!(
        "urbanstream demo · {} broker {brokers} · simulated Hanoi at {}× · {:.0} s · Ctrl-C to stop\n\n",
        if embedded { "embedded" } else { "external" },
        args.sim.speedup,
        started.elapsed().as_secs_f64()
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
        hanoi_time(sim_now),
        hanoi_time(w),
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
        hanoi_time(view.last_window),
        hanoi_clock(view.last_window + 60_000)
    ));
    out.push_str(&format!(
        "  {:<48} {:>8} {:>9} {:>6} {:>4} {:>10}\n",
        "segment", "veh/min", "km/h", "TTI", "LOS", "motorbike"
    ));
    let dash = || "-".to_string();
    for row in rows.iter().take(10) {
        let name = display_name(names, &row.segment_id);
        out.push_str(&format!(
            "  {:<48} {:>8} {:>9} {:>6} {:>4} {:>9}%\n",
            truncate(name, 48),
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
            hanoi_time(view.last_hour - 3_600_000)
        },
        hanoi_clock(view.last_hour)
    ));
    out.push_str(&format!(
        "  {:<28} {:>4}  {:<24} {:>10} {:>13}\n",
        "ward", "AQI", "category", "dominant", "PM2.5 NowCast"
    ));
    for row in wards.iter().take(8) {
        let name = display_name(names, &row.entity_id);
        let category = match (&row.category, &row.category_en) {
            (Some(vi), Some(en)) => format!("{vi} ({en})"),
            (Some(vi), None) => vi.clone(),
            _ => dash(),
        };
        out.push_str(&format!(
            "  {:<28} {:>4}  {:<24} {:>10} {:>13}\n",
            truncate(name, 28),
            row.aqi.map_or_else(dash, |v| v.to_string()),
            truncate(&category, 24),
            row.dominant_pollutant.clone().unwrap_or_else(dash),
            row.pm25_nowcast.map_or_else(dash, |v| format!("{v:.1}")),
        ));
    }
    let mut alerts: Vec<&AlertRow> = view.alerts.values().collect();
    alerts.sort_by(|a, b| {
        b.severity
            .cmp(&a.severity)
            .then(b.started_at.cmp(&a.started_at))
            .then(a.alert_id.cmp(&b.alert_id))
    });
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
            truncate(display_name(names, &a.entity_id), 26),
            hanoi_clock(a.started_at),
            truncate(a.message.as_deref().unwrap_or(""), 60),
        ));
    }
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(out.as_bytes());
    let _ = stdout.flush();
}

/// The reference name of a segment or ward, or its id when it has none.
fn display_name<'a>(names: &'a HashMap<String, String>, id: &'a str) -> &'a str {
    names.get(id).map_or(id, String::as_str)
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).collect::<String>() + "…"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hanoi_time_formats_local_time() {
        // 2026-01-01 06:00 in Hanoi is 2025-12-31 23:00 UTC.
        assert_eq!(hanoi_time(1_767_222_000_000), "2026-01-01 06:00:00");
        assert_eq!(hanoi_time(i64::MIN), "-");
        assert_eq!(hanoi_clock(1_767_222_000_000), "06:00:00");
        assert_eq!(hanoi_clock(0), "-");
    }

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
}
