//! Evaluation of the anomaly detectors and health checks on labelled series: precision,
//! recall and detection delay per detector (`urbanstream evaluate`).
//!
//! The built-in set has two parts. [`builtin`] is seeded and synthetic, one family of cases at
//! a time: spikes, level shifts, slow drifts and seasonal anomalies on traffic-speed and PM2.5
//! series with daily cycles, incidents shaped like the simulator's (a segment's speed
//! collapses for 10–40 minutes), quiet series for false alerts, and sensor faults (stuck,
//! missing, out of range, jumps). [`simulated`] runs the city simulator for some days and
//! labels what it injected: each loop detector's speed series with its segment's incidents,
//! each air sensor's PM2.5 with its stuck and missing periods. `--data` evaluates on any labelled CSV instead (`series,timestamp,value,label`,
//! label 1 inside an anomaly), e.g. a public benchmark converted to that shape.
//!
//! Scoring is by event: every detector's score goes through the same alert machine
//! (`|score| ≥ raise` raises, `≤ clear` clears; health checks raise on a fault), and each
//! raised alert is one detection. A labelled window is found when an alert is raised inside it
//! or within the tolerance after its end; an alert that overlaps no (tolerance-extended) window
//! is a false alert. Scores of a detector still warming up raise nothing.

pub mod alerts;
pub mod nab;
pub mod skab;

use std::collections::BTreeMap;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::Serialize;
use urbanstream_operators::detect::udwf::SeriesKind;
use urbanstream_operators::detect::{AlertMachine, AlertRule, AlertTransition, Emitted};

use crate::error::{Error, Result};

const MIN: i64 = 60_000;

/// The runs of consecutive minutes in `minutes` (sorted epoch ms, one per labelled minute):
/// `(first, last)` of each, a gap of more than a minute starting a new one.
pub(super) fn runs_of_minutes(minutes: &[i64]) -> Vec<(i64, i64)> {
    let mut out: Vec<(i64, i64)> = Vec::new();
    for &m in minutes {
        match out.last_mut() {
            Some(w) if m - w.1 <= MIN => w.1 = m,
            _ => out.push((m, m)),
        }
    }
    out
}
const DAY: i64 = 86_400_000;
/// 2026-01-05T00:00:00+07:00, a Monday.
const START: i64 = 1_767_546_000_000;

/// One labelled series.
#[derive(Debug, Clone)]
pub struct Series {
    /// Name, `family/…`.
    pub name: String,
    /// Reading times, epoch ms, increasing.
    pub times: Vec<i64>,
    /// Readings (`None`: no reading at that time).
    pub values: Vec<Option<f64>>,
    /// Anomaly windows `[start, end]`, epoch ms.
    pub windows: Vec<(i64, i64)>,
    /// What kind of anomaly the windows hold: `score` for detectors, or a health check.
    pub target: Target,
    /// Quantity, for range and jump checks.
    pub quantity: &'static str,
}

/// What the labelled windows of a series are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Anomalies for the detectors.
    Anomaly,
    /// Faults for one health check.
    Fault(SeriesKind),
}

/// One detector's results.
#[derive(Debug, Clone, Serialize)]
pub struct DetectorReport {
    /// Function name.
    pub detector: String,
    /// Labelled windows.
    pub windows: usize,
    /// Windows found.
    pub found: usize,
    /// Alerts raised.
    pub alerts: usize,
    /// Alerts that match no window.
    pub false_alerts: usize,
    /// found / windows; none without labelled windows.
    pub recall: Option<f64>,
    /// (alerts − false alerts) / alerts; none without alerts.
    pub precision: Option<f64>,
    /// Median minutes from a window's start to its first alert.
    pub median_delay_min: Option<f64>,
    /// Recall per family of cases.
    pub recall_by_family: BTreeMap<String, f64>,
    /// False alerts per day of series.
    pub false_alerts_per_day: f64,
    /// Per-point F1: a reading is flagged while an alert is active, labelled inside a window.
    pub point_f1: f64,
    /// NAB scores (standard, low FP, low FN) with each labelled window, extended by the
    /// tolerance, as a detection window and each alert's start as a prediction, by SKAB's
    /// rules ([`nab::NabTotals`]); none without labelled windows, which the scores are
    /// normalised against.
    pub nab: Option<[f64; 3]>,
    /// The same by NAB's own rules ([`nab::NabPaperTotals`]).
    pub nab_paper: Option<[f64; 3]>,
}

fn noise(rng: &mut ChaCha8Rng, sd: f64) -> f64 {
    Normal::new(0.0, sd).map_or(0.0, |n| n.sample(rng))
}

/// Speed of a busy urban segment at local hour `h` (rush hours at 8:00 and 17:30).
fn speed_profile(h: f64) -> f64 {
    let rush = (-(h - 8.0).powi(2) / 1.5).exp() + (-(h - 17.5).powi(2) / 2.0).exp();
    42.0 - 24.0 * rush
}

/// PM2.5 at local hour `h` (traffic peaks, night inversion).
fn pm_profile(h: f64) -> f64 {
    55.0 + 15.0 * (-(h - 8.5).powi(2) / 3.0).exp() + 20.0 * (-(h - 21.0).powi(2) / 6.0).exp()
}

fn local_hour(t: i64) -> f64 {
    ((t + 7 * 3_600_000).rem_euclid(DAY)) as f64 / 3_600_000.0
}

struct Builder {
    rng: ChaCha8Rng,
    out: Vec<Series>,
}

impl Builder {
    fn base(
        &mut self,
        days: i64,
        every: i64,
        profile: fn(f64) -> f64,
        sd: f64,
    ) -> (Vec<i64>, Vec<f64>) {
        let n = (days * DAY / every) as usize;
        let mut times = Vec::with_capacity(n);
        let mut values = Vec::with_capacity(n);
        // Day-to-day weather: a slowly wandering multiplier.
        let mut weather = 1.0_f64;
        for i in 0..n {
            let t = START + i as i64 * every;
            weather = (weather + noise(&mut self.rng, 0.002)).clamp(0.85, 1.15);
            times.push(t);
            values.push(profile(local_hour(t)) * weather + noise(&mut self.rng, sd));
        }
        (times, values)
    }

    fn push(
        &mut self,
        name: String,
        times: Vec<i64>,
        values: Vec<f64>,
        windows: Vec<(i64, i64)>,
        quantity: &'static str,
    ) {
        self.out.push(Series {
            name,
            times,
            values: values.into_iter().map(Some).collect(),
            windows,
            target: Target::Anomaly,
            quantity,
        });
    }

    /// A random reading index in days `from..to` of a series of `every` ms.
    fn at(&mut self, from: i64, to: i64, every: i64) -> usize {
        (self.rng.random_range(from * DAY..to * DAY) / every) as usize
    }
}

/// The built-in labelled set, from `seed`.
pub fn builtin(seed: u64) -> Vec<Series> {
    let mut b = Builder {
        rng: ChaCha8Rng::seed_from_u64(seed),
        out: Vec::new(),
    };
    for k in 0..4 {
        // Spikes: single readings far off (a mis-detection burst, a puff of smoke).
        let (t, mut v) = b.base(4, 5 * MIN, speed_profile, 1.5);
        let mut w = Vec::new();
        for _ in 0..3 {
            let i = b.at(2, 4, 5 * MIN);
            v[i] *= if b.rng.random_bool(0.5) { 0.3 } else { 1.8 };
            w.push((t[i], t[i]));
        }
        b.push(format!("spike/speed-{k}"), t, v, w, "speed_kmh");
        // Level shifts: a PM2.5 sensor re-calibrated, a lane closed for good.
        let (t, mut v) = b.base(4, 5 * MIN, pm_profile, 3.0);
        let i = b.at(2, 3, 5 * MIN);
        let shift = if b.rng.random_bool(0.5) { 25.0 } else { -20.0 };
        for x in &mut v[i..] {
            *x += shift;
        }
        b.push(
            format!("level_shift/pm25-{k}"),
            t.clone(),
            v,
            vec![(t[i], t[i] + 3_600_000)],
            "pm25",
        );
        // Slow drifts: a sensor ageing, +30 µg/m³ over 6 hours.
        let (t, mut v) = b.base(4, 5 * MIN, pm_profile, 3.0);
        let i = b.at(2, 3, 5 * MIN);
        let steps = 72;
        for (j, x) in v[i..].iter_mut().enumerate() {
            *x += 30.0 * (j.min(steps) as f64 / steps as f64);
        }
        b.push(
            format!("drift/pm25-{k}"),
            t.clone(),
            v,
            vec![(t[i], t[i + steps])],
            "pm25",
        );
        // Seasonal anomalies: rush-hour speeds at 3:00, which a plain threshold would not see.
        let (t, mut v) = b.base(5, 5 * MIN, speed_profile, 1.5);
        // 03:00 local time on the fifth day.
        let i = ((4 * DAY + 3 * 3_600_000) / (5 * MIN)) as usize;
        for x in &mut v[i..i + 6] {
            *x = 19.0 + noise(&mut b.rng, 1.5);
        }
        b.push(
            format!("seasonal/speed-{k}"),
            t.clone(),
            v,
            vec![(t[i], t[i + 5])],
            "speed_kmh",
        );
        // Incidents, shaped like the simulator's: speed collapses to a third for 10–40 min.
        let (t, mut v) = b.base(5, MIN, speed_profile, 2.0);
        let mut w = Vec::new();
        for d in 2..5 {
            let i = b.at(d, d + 1, MIN);
            let len = b.rng.random_range(10..40usize).min(v.len() - i - 1);
            for x in &mut v[i..i + len] {
                *x *= 0.33;
            }
            w.push((t[i], t[i + len]));
        }
        b.push(format!("incident/speed-{k}"), t, v, w, "speed_kmh");
        // Quiet series: nothing to find; every alert is false.
        let (t, v) = b.base(5, 5 * MIN, pm_profile, 4.0);
        b.push(format!("quiet/pm25-{k}"), t, v, Vec::new(), "pm25");
    }
    // Sensor faults on one-minute PM2.5 readings, one kind per series.
    for (k, kind) in [
        SeriesKind::Stuck,
        SeriesKind::Missing,
        SeriesKind::OutOfRange,
        SeriesKind::Jump,
    ]
    .into_iter()
    .enumerate()
    {
        let (t, v) = b.base(2, MIN, pm_profile, 3.0);
        let mut values: Vec<Option<f64>> = v.into_iter().map(Some).collect();
        let mut windows = Vec::new();
        for _ in 0..4 {
            let i = b.at(1, 2, MIN).min(values.len() - 60);
            let len = b.rng.random_range(15..45usize);
            match kind {
                SeriesKind::Stuck => {
                    let x = values[i].unwrap_or(40.0).round();
                    values[i..i + len].iter_mut().for_each(|v| *v = Some(x));
                }
                SeriesKind::Missing => values[i..i + len].iter_mut().for_each(|v| *v = None),
                SeriesKind::OutOfRange => values[i] = Some(-5.0),
                _ => values[i] = Some(values[i].unwrap_or(40.0) + 700.0),
            }
            let end = match kind {
                SeriesKind::Stuck | SeriesKind::Missing => i + len,
                _ => i + 1,
            };
            windows.push((t[i], t[end.min(t.len() - 1)]));
        }
        // Missing readings are not sent at all.
        let (times, values): (Vec<i64>, Vec<Option<f64>>) = if kind == SeriesKind::Missing {
            t.into_iter()
                .zip(values)
                .filter(|(_, v)| v.is_some())
                .unzip()
        } else {
            (t, values)
        };
        b.out.push(Series {
            name: format!("fault/{}-{k}", kind.name()),
            times,
            values,
            windows,
            target: Target::Fault(kind),
            quantity: "pm25",
        });
    }
    b.out
}

/// The city simulator's detector and air readings over `hours` simulated hours from a Monday
/// midnight (Hanoi time), labelled with the incidents and sensor faults it injected.
pub fn simulated(seed: u64, hours: u32) -> Result<Vec<Series>> {
    use crate::simulate::{CitySimulator, SimConfig, SimTopic};
    let reference = std::sync::Arc::new(crate::reference::ReferenceData::embedded()?);
    let mut sim = CitySimulator::new(
        SimConfig {
            seed,
            // Cameras are not evaluated here; the detectors see the same incidents.
            detections_per_sim_second: 0.0,
            start_ms: START,
            malformed_share: 0.0,
            late_share: 0.0,
            out_of_order_share: 0.0,
            air_history_hours: 0,
            ..SimConfig::default()
        },
        reference.clone(),
    );
    type Readings = BTreeMap<String, Vec<(i64, Option<f64>)>>;
    let mut speeds: Readings = BTreeMap::new();
    let mut detector_segment: BTreeMap<String, String> = BTreeMap::new();
    let mut pm25: Readings = BTreeMap::new();
    // Labelled minutes per segment, and per (sensor, fault kind).
    let mut incident_minutes: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    let mut fault_minutes: BTreeMap<(String, &'static str), Vec<i64>> = BTreeMap::new();
    let end = START + i64::from(hours) * 3_600_000;
    while sim.sim_time_ms() < end {
        let t0 = sim.sim_time_ms();
        if t0.rem_euclid(MIN) == 0 {
            for segment in sim.active_incidents() {
                incident_minutes
                    .entry(segment.to_string())
                    .or_default()
                    .push(t0);
            }
            for (sensor, kind) in sim.active_faults() {
                fault_minutes
                    .entry((sensor.to_string(), kind))
                    .or_default()
                    .push(t0);
            }
        }
        for record in sim.next_tick() {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&record.payload) else {
                continue;
            };
            let text = |f: &str| v[f].as_str().unwrap_or_default().to_string();
            match record.topic {
                SimTopic::Detector => {
                    detector_segment.insert(text("detector_id"), text("segment_id"));
                    speeds
                        .entry(text("detector_id"))
                        .or_default()
                        .push((record.event_time, v["mean_speed_kmh"].as_f64()));
                }
                SimTopic::Air => pm25
                    .entry(text("sensor_id"))
                    .or_default()
                    .push((record.event_time, v["pm25"].as_f64())),
                _ => {}
            }
        }
    }
    let runs = |minutes: Option<&Vec<i64>>| runs_of_minutes(minutes.map_or(&[][..], |m| m));
    let mut out = Vec::new();
    for (detector, readings) in speeds {
        let segment = detector_segment.get(&detector).cloned().unwrap_or_default();
        out.push(Series {
            name: format!("sim_incident/{detector}"),
            times: readings.iter().map(|r| r.0).collect(),
            values: readings.iter().map(|r| r.1).collect(),
            windows: runs(incident_minutes.get(&segment)),
            target: Target::Anomaly,
            quantity: "speed_kmh",
        });
    }
    for (sensor, readings) in pm25 {
        for (kind, check) in [
            ("stuck", SeriesKind::Stuck),
            ("missing", SeriesKind::Missing),
        ] {
            out.push(Series {
                name: format!("sim_fault/{kind}/{sensor}"),
                times: readings.iter().map(|r| r.0).collect(),
                values: readings.iter().map(|r| r.1).collect(),
                windows: runs(fault_minutes.get(&(sensor.clone(), kind))),
                target: Target::Fault(check),
                quantity: "pm25",
            });
        }
    }
    Ok(out)
}

/// Reads a labelled CSV: `series,timestamp,value,label` (timestamp RFC 3339, with or
/// without an offset (UTC), or a number in `unit_ms` milliseconds, epoch milliseconds for 1;
/// label 0/1; an empty value is a missing reading). Columns are found by the header's names
/// where it names the time, value and label (`timestamp`/`time`/`event_time`, `value`,
/// `label`/`anomaly`, any case; the series `series`/`key`, or else in four columns or more the
/// first of the others), by position otherwise; three columns are one series named after the
/// file.
pub fn from_csv(path: &Path) -> Result<Vec<Series>> {
    from_csv_in(path, 1)
}

/// [`from_csv`], numeric timestamps counted in units of `unit_ms` milliseconds.
pub fn from_csv_in(path: &Path, unit_ms: i64) -> Result<Vec<Series>> {
    crate::files::check_line_lengths(path)?;
    let mut reader = csv::Reader::from_path(path)
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    let mut by_series: BTreeMap<String, Vec<(i64, Option<f64>, bool)>> = BTreeMap::new();
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("series")
        .to_string();
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?
        .iter()
        .map(|h| h.trim().trim_start_matches('\u{feff}').to_ascii_lowercase())
        .collect();
    let named = |names: &[&str]| header.iter().position(|h| names.contains(&h.as_str()));
    // (series, timestamp, value, label) columns: by name, or by position.
    let by_name = (
        named(&["series", "key"]),
        named(&["timestamp", "time", "event_time"]),
        named(&["value"]),
        named(&["label", "anomaly"]),
    );
    let columns = match by_name {
        // The series: its named column, or in a file of four columns or more the first
        // column that is none of the others (`sensor,timestamp,value,label`).
        (series, Some(t), Some(v), Some(l)) => (
            series.or_else(|| {
                (header.len() >= 4)
                    .then(|| (0..header.len()).find(|c| ![t, v, l].contains(c)))
                    .flatten()
            }),
            t,
            v,
            l,
        ),
        _ if header.len() == 3 => (None, 0, 1, 2),
        _ if header.len() >= 4 => (Some(0), 1, 2, 3),
        _ => {
            return Err(Error::Config(format!(
                "{}: the header names {} columns: write series,timestamp,value,label (or \
                 timestamp,value,label for one series)",
                path.display(),
                header.len()
            )));
        }
    };
    let column_name = |i: usize| header.get(i).cloned().unwrap_or_default();
    let mut seconds_like = 0usize;
    let mut numeric = 0usize;
    for (line, record) in reader.records().enumerate() {
        let record = record.map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        let field = |i: usize| record.get(i).unwrap_or("").trim();
        let name = match columns.0 {
            Some(c) => field(c),
            None => stem.as_str(),
        };
        let bad = |column: usize, what: &str| {
            Error::Config(format!(
                "{}: line {}: column {} ({}) holds {:?}, which is not {what}",
                path.display(),
                line + 2,
                column + 1,
                column_name(column),
                field(column)
            ))
        };
        let written = field(columns.1);
        let t = match written.parse::<i64>() {
            Ok(n) => {
                numeric += 1;
                // Epoch seconds of these decades read as milliseconds fall in January 1970.
                if unit_ms == 1 && (1_000_000_000..10_000_000_000).contains(&n) {
                    seconds_like += 1;
                }
                n.checked_mul(unit_ms)
                    .ok_or_else(|| bad(columns.1, "a time (past the range of one)"))?
            }
            Err(_) => {
                datafusion::arrow::compute::kernels::cast_utils::string_to_timestamp_nanos(written)
                    .map(|ns| ns.div_euclid(1_000_000))
                    .map_err(|_| {
                        bad(
                            columns.1,
                            "a time (RFC 3339, 2026-01-01T06:00:00+07:00, or epoch milliseconds)",
                        )
                    })?
            }
        };
        let value = match field(columns.2) {
            "" => None,
            v => Some(v.parse::<f64>().map_err(|_| bad(columns.2, "a number"))?),
        };
        let label = match field(columns.3) {
            "0" | "0.0" | "false" | "FALSE" | "False" => false,
            "1" | "1.0" | "true" | "TRUE" | "True" => true,
            _ => return Err(bad(columns.3, "a label (0 or 1)")),
        };
        by_series
            .entry(name.to_string())
            .or_default()
            .push((t, value, label));
    }
    if numeric > 0 && seconds_like == numeric {
        return Err(Error::Config(format!(
            "{}: every timestamp is a number between 10⁹ and 10¹⁰, which as epoch milliseconds \
             is January 1970: these look like epoch seconds; say so with --time-unit s (or \
             write milliseconds or RFC 3339 times)",
            path.display()
        )));
    }
    Ok(by_series
        .into_iter()
        .map(|(name, mut rows)| {
            rows.sort_by_key(|r| r.0);
            let mut windows = Vec::new();
            let mut open: Option<(i64, i64)> = None;
            for &(t, _, label) in &rows {
                match (&mut open, label) {
                    (Some(w), true) => w.1 = t,
                    (None, true) => open = Some((t, t)),
                    (Some(_), false) => windows.extend(open.take()),
                    (None, false) => {}
                }
            }
            windows.extend(open);
            Series {
                name,
                times: rows.iter().map(|r| r.0).collect(),
                values: rows.iter().map(|r| r.1).collect(),
                windows,
                target: Target::Anomaly,
                quantity: "",
            }
        })
        .collect())
}

/// What an alert rule is applied to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum On {
    /// `|score|` (for a health check: 1 on a fault).
    Score,
    /// The calibrated likelihood.
    Likelihood,
}

/// The detectors evaluated, with the alert rule (raise, clear) and what it applies to. The
/// default detector is evaluated both on its raw score and on its likelihood, at the
/// documented default threshold.
pub const DETECTORS: [(SeriesKind, On, f64, f64); 6] = [
    (SeriesKind::Ewma, On::Score, 5.0, 2.0),
    (SeriesKind::Mad, On::Score, 5.0, 2.0),
    (SeriesKind::Cusum, On::Score, 5.0, 1.0),
    (SeriesKind::Seasonal, On::Score, 5.0, 2.0),
    (SeriesKind::Score, On::Score, 5.0, 2.0),
    (
        SeriesKind::Score,
        On::Likelihood,
        urbanstream_operators::detect::Calibrator::DEFAULT_THRESHOLD,
        0.99,
    ),
];

/// A detector's name in reports.
fn detector_name(kind: SeriesKind, on: On) -> String {
    match on {
        On::Score => kind.name().to_string(),
        On::Likelihood => format!("{} likelihood", kind.name()),
    }
}

/// The UTC offset of the built-in set's local days (Hanoi, UTC+7): its daily profiles follow
/// local hours. A labelled CSV is read with the offset given (the SQL functions' default,
/// 0, unless told otherwise).
pub const HANOI_UTC_OFFSET_MS: i64 = 7 * 3_600_000;

/// One reading as a detector saw it: its time, value, score (`|score|`; none while warming
/// up or without a reading) and whether an alert was active after it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PointScore {
    /// Reading time, epoch ms.
    pub t: i64,
    /// The reading.
    pub value: Option<f64>,
    /// `|score|` (a health check: 1 for a fault, 0 otherwise).
    pub score: Option<f64>,
    /// Whether the alert rule's alert was active after this reading.
    pub alert: bool,
}

/// Runs one detector (or health check) over one series, one reading at a time as the stream
/// engine does, calling `point` with each reading's score; returns the alert windows.
fn run_series(
    kind: SeriesKind,
    on: On,
    raise: f64,
    clear: f64,
    s: &Series,
    utc_offset_ms: i64,
    mut point: impl FnMut(PointScore),
) -> Result<Vec<(i64, i64)>> {
    let params: Vec<datafusion::common::ScalarValue> = match kind {
        SeriesKind::Score => vec![interval(utc_offset_ms)],
        SeriesKind::Seasonal => vec![
            datafusion::common::ScalarValue::from("day"),
            interval(15 * MIN),
            interval(utc_offset_ms),
        ],
        SeriesKind::OutOfRange | SeriesKind::Jump => {
            vec![datafusion::common::ScalarValue::from(s.quantity)]
        }
        SeriesKind::Missing => {
            let every = s.times.windows(2).map(|w| w[1] - w[0]).min().unwrap_or(MIN);
            vec![interval(every.max(1))]
        }
        _ => Vec::new(),
    };
    let mut state = kind
        .state(&params)
        .map_err(|e| Error::Config(e.to_string()))?;
    let mut alert = AlertMachine::new(AlertRule {
        raise,
        clear,
        min_duration_ms: 0,
        cooldown_ms: 0,
        expire_ms: None,
    });
    let mut out = Vec::new();
    let mut open: Option<i64> = None;
    for (t, x) in s.times.iter().zip(&s.values) {
        // Timers fire as a stream's watermark would: a silence is reported once the next
        // reading's time has passed it.
        if let Some(due) = state.due().filter(|d| d < t)
            && let Some(Emitted::Health(h)) = state.fire(*t)
            && alert.update(due, Some(f64::from(u8::from(h.fault)))).state
                == Some(AlertTransition::Raised)
        {
            open = Some(due);
        }
        let score = match state.step(*t, *x) {
            Emitted::Score(sc) if !sc.warming => match on {
                On::Score => sc.score.map(f64::abs),
                On::Likelihood => sc.likelihood,
            },
            Emitted::Score(_) => None,
            Emitted::Health(h) => Some(if h.fault { 1.0 } else { 0.0 }),
            Emitted::Alert(_) | Emitted::Vector(_) => None,
        };
        match alert.update(*t, score).state {
            Some(AlertTransition::Raised) => open = Some(*t),
            Some(AlertTransition::Cleared) => out.extend(open.take().map(|o| (o, *t))),
            _ => {}
        }
        point(PointScore {
            t: *t,
            value: *x,
            score,
            alert: open.is_some(),
        });
    }
    out.extend(open.map(|o| (o, s.times.last().copied().unwrap_or(o))));
    Ok(out)
}

fn interval(ms: i64) -> datafusion::common::ScalarValue {
    datafusion::common::ScalarValue::new_interval_mdn(0, (ms / DAY) as i32, (ms % DAY) * 1_000_000)
}

/// Writes every reading of the labelled series (the detectors' targets) as each detector
/// scored it: CSV `series,timestamp,value,label,detector,score,alert` (timestamp epoch ms,
/// label 1 inside a labelled window, score `|score|` (the likelihood for a likelihood rule)
/// or empty while warming up, alert 1
/// while the alert rule's alert is active). Returns the rows written.
pub fn write_scores(
    set: &[Series],
    utc_offset_ms: i64,
    out: &mut impl std::io::Write,
) -> Result<usize> {
    let io = |e: std::io::Error| Error::Config(format!("writing scores: {e}"));
    writeln!(out, "series,timestamp,value,label,detector,score,alert").map_err(io)?;
    let mut rows = 0;
    for s in set.iter().filter(|s| s.target == Target::Anomaly) {
        let labelled = |t: i64| s.windows.iter().any(|(a, b)| *a <= t && t <= *b);
        for (kind, on, raise, clear) in DETECTORS {
            let mut failed = None;
            run_series(kind, on, raise, clear, s, utc_offset_ms, |p| {
                if failed.is_some() {
                    return;
                }
                let value = p.value.map_or(String::new(), |v| v.to_string());
                let score = p.score.map_or(String::new(), |v| format!("{v:.6}"));
                if let Err(e) = writeln!(
                    out,
                    "{},{},{value},{},{},{score},{}",
                    s.name.replace(',', ";"),
                    p.t,
                    u8::from(labelled(p.t)),
                    detector_name(kind, on),
                    u8::from(p.alert)
                ) {
                    failed = Some(e);
                }
                rows += 1;
            })?;
            if let Some(e) = failed {
                return Err(io(e));
            }
        }
    }
    Ok(rows)
}

/// Evaluates `kind` over every series it applies to; `tolerance_ms` after a window's end
/// still counts as finding it.
pub fn evaluate(
    kind: SeriesKind,
    on: On,
    raise: f64,
    clear: f64,
    set: &[Series],
    tolerance_ms: i64,
    utc_offset_ms: i64,
) -> Result<DetectorReport> {
    let mut report = DetectorReport {
        detector: detector_name(kind, on),
        windows: 0,
        found: 0,
        alerts: 0,
        false_alerts: 0,
        recall: None,
        precision: None,
        median_delay_min: None,
        recall_by_family: BTreeMap::new(),
        false_alerts_per_day: 0.0,
        point_f1: 0.0,
        nab: None,
        nab_paper: None,
    };
    let mut points = nab::PointCounts::default();
    let mut changepoints = nab::NabTotals::default();
    let mut paper = nab::NabPaperTotals::default();
    let mut delays = Vec::new();
    let mut family: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut days = 0.0;
    for s in set {
        let applies = match s.target {
            Target::Anomaly => kind.output_fields().find("score").is_some(),
            Target::Fault(k) => k == kind,
        };
        if !applies {
            continue;
        }
        days += (s.times.last().unwrap_or(&0) - s.times.first().unwrap_or(&0)) as f64 / DAY as f64;
        let labelled = |t: i64| s.windows.iter().any(|(a, b)| *a <= t && t <= *b);
        let alerts = run_series(kind, on, raise, clear, s, utc_offset_ms, |p| {
            points.add(p.alert, labelled(p.t));
        })?;
        // Each labelled window extended by the tolerance up to the next one: one alert
        // finds one window.
        let mut labelled_windows = s.windows.clone();
        labelled_windows.sort_unstable();
        let detection = nab::extended(&labelled_windows, tolerance_ms);
        let starts: Vec<i64> = alerts.iter().map(|(a, _)| *a).collect();
        changepoints.add(&detection, &starts);
        let tolerated: Vec<(i64, i64)> = labelled_windows
            .iter()
            .map(|(a, b)| (*a, b + tolerance_ms))
            .collect();
        paper.add(&s.times, &tolerated, &starts);
        report.alerts += alerts.len();
        report.false_alerts += alerts
            .iter()
            .filter(|(a, b)| {
                !s.windows
                    .iter()
                    .any(|(ws, we)| *a <= we + tolerance_ms && *b >= *ws)
            })
            .count();
        let fam = family
            .entry(s.name.split('/').next().unwrap_or("").to_string())
            .or_default();
        for ((ws, _), (ds, de)) in labelled_windows.iter().zip(&detection) {
            report.windows += 1;
            fam.0 += 1;
            if let Some((a, _)) = alerts.iter().find(|(a, _)| a >= ds && a <= de) {
                report.found += 1;
                fam.1 += 1;
                delays.push((a - ws) as f64 / MIN as f64);
            }
        }
    }
    report.point_f1 = points.f1();
    // Undefined without labelled windows (recall, NAB) or alerts (precision): none, as the
    // table shows `-` (the JSON said 0.0).
    let labelled = report.windows > 0;
    report.nab = labelled.then(|| changepoints.scores());
    report.nab_paper = labelled.then(|| paper.scores());
    report.recall = labelled.then(|| ratio(report.found, report.windows));
    report.precision =
        (report.alerts > 0).then(|| ratio(report.alerts - report.false_alerts, report.alerts));
    report.median_delay_min = median(delays);
    report.recall_by_family = family
        .into_iter()
        .filter(|(_, (n, _))| *n > 0)
        .map(|(k, (n, f))| (k, ratio(f, n)))
        .collect();
    report.false_alerts_per_day = if days > 0.0 {
        report.false_alerts as f64 / days
    } else {
        0.0
    };
    Ok(report)
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// NAB scores as a table cell, `-` without labelled windows.
fn nab_cell(scores: Option<&[f64; 3]>) -> String {
    scores.map_or("-".into(), |s| {
        format!("{:.1} / {:.1} / {:.1}", s[0], s[1], s[2])
    })
}

/// The median of `values` (the mean of the middle two of an even number); `None` for none.
pub fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

/// Every detector and health check over `set`.
pub fn evaluate_all(
    set: &[Series],
    tolerance_ms: i64,
    utc_offset_ms: i64,
) -> Result<Vec<DetectorReport>> {
    let mut out = Vec::new();
    for (kind, on, raise, clear) in DETECTORS {
        out.push(evaluate(
            kind,
            on,
            raise,
            clear,
            set,
            tolerance_ms,
            utc_offset_ms,
        )?);
    }
    for kind in [
        SeriesKind::Stuck,
        SeriesKind::Missing,
        SeriesKind::OutOfRange,
        SeriesKind::Jump,
    ] {
        if set.iter().any(|s| s.target == Target::Fault(kind)) {
            out.push(evaluate(
                kind,
                On::Score,
                1.0,
                0.0,
                set,
                tolerance_ms,
                utc_offset_ms,
            )?);
        }
    }
    Ok(out)
}

/// The reports as a Markdown table.
pub fn table(reports: &[DetectorReport]) -> String {
    let families: Vec<String> = reports
        .iter()
        .flat_map(|r| r.recall_by_family.keys().cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .filter(|f| !matches!(f.as_str(), "quiet" | "fault" | "sim_fault"))
        .collect();
    let mut out = format!(
        "| detector | windows | found | alerts | false | precision | recall | median delay (min) | false/day | point F1 | NAB standard / low FP / low FN | NAB paper standard / low FP / low FN |{}\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|{}\n",
        families
            .iter()
            .map(|f| format!(" recall {f} |"))
            .collect::<String>(),
        "---:|".repeat(families.len())
    );
    for r in reports {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {:.2} | {} | {} |{}\n",
            r.detector,
            r.windows,
            r.found,
            r.alerts,
            r.false_alerts,
            r.precision.map_or("-".into(), |p| format!("{p:.2}")),
            r.recall.map_or("-".into(), |p| format!("{p:.2}")),
            r.median_delay_min.map_or("-".into(), |d| format!("{d:.0}")),
            r.false_alerts_per_day,
            r.point_f1,
            // Without labelled windows there is nothing to normalise against.
            nab_cell(r.nab.as_ref()),
            nab_cell(r.nab_paper.as_ref()),
            families
                .iter()
                .map(|f| r
                    .recall_by_family
                    .get(f)
                    .map_or(" - |".to_string(), |v| format!(" {v:.2} |")))
                .collect::<String>()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_set_is_seeded_and_labelled() {
        let a = builtin(7);
        let b = builtin(7);
        assert_eq!(a.len(), b.len());
        assert_eq!(a[0].values, b[0].values);
        assert!(
            a.iter()
                .filter(|s| s.name.starts_with("quiet"))
                .all(|s| s.windows.is_empty())
        );
        assert!(
            a.iter()
                .filter(|s| !s.name.starts_with("quiet"))
                .all(|s| !s.windows.is_empty())
        );
    }

    #[test]
    fn health_checks_find_their_faults_and_the_default_detector_finds_incidents() {
        let set = builtin(1);
        let reports = evaluate_all(&set, 30 * MIN, HANOI_UTC_OFFSET_MS).expect("evaluate");
        let get = |name: &str| reports.iter().find(|r| r.detector == name).expect(name);
        for check in [
            "sensor_stuck",
            "sensor_missing",
            "sensor_out_of_range",
            "sensor_jump",
        ] {
            let r = get(check);
            assert!(r.recall.is_some_and(|v| v >= 0.75), "{check}: {r:?}");
            assert!(r.precision.is_some_and(|v| v >= 0.75), "{check}: {r:?}");
        }
        let combined = get("anomaly_score");
        assert!(combined.recall_by_family["incident"] >= 0.9, "{combined:?}");
        assert!(combined.precision.is_some_and(|v| v > 0.5), "{combined:?}");
    }

    #[test]
    fn the_simulator_labels_what_it_injects() {
        let set = simulated(3, 12).expect("simulated");
        let incidents: usize = set
            .iter()
            .filter(|s| s.name.starts_with("sim_incident/"))
            .map(|s| s.windows.len())
            .sum();
        let faults: usize = set
            .iter()
            .filter(|s| s.name.starts_with("sim_fault/"))
            .map(|s| s.windows.len())
            .sum();
        assert!(
            incidents > 0 && faults > 0,
            "{incidents} incidents, {faults} faults"
        );
        // Readings stop while a sensor is missing.
        for s in set
            .iter()
            .filter(|s| s.name.starts_with("sim_fault/missing/"))
        {
            for (a, b) in &s.windows {
                assert!(!s.times.iter().any(|t| t > a && t < b), "{}", s.name);
            }
        }
        let reports = evaluate_all(&set, 30 * MIN, HANOI_UTC_OFFSET_MS).expect("evaluate");
        let missing = reports
            .iter()
            .find(|r| r.detector == "sensor_missing")
            .expect("missing");
        assert!(missing.recall.is_some_and(|v| v > 0.9), "{missing:?}");
    }

    #[test]
    fn labelled_csv_windows_are_runs_of_ones() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("l.csv");
        std::fs::write(
            &path,
            "series,timestamp,value,label\na,0,1,0\na,60000,9,1\na,120000,9,1\na,180000,1,0\nb,2026-01-01T00:00:00Z,,0\n",
        )
        .expect("write");
        let set = from_csv(&path).expect("csv");
        assert_eq!(set.len(), 2);
        assert_eq!(set[0].windows, vec![(60_000, 120_000)]);
        assert_eq!(set[1].values, vec![None]);
        assert!(from_csv(&dir.path().join("missing.csv")).is_err());
        // `time,value,label`: one series, named after the file.
        let single = dir.path().join("pump7.csv");
        std::fs::write(&single, "time,value,label\n0,1,0\n60000,9,1\n120000,1,0\n").expect("write");
        let set = from_csv(&single).expect("csv");
        assert_eq!(set.len(), 1);
        assert_eq!(set[0].name, "pump7");
        assert_eq!(set[0].windows, vec![(60_000, 60_000)]);
        assert_eq!(set[0].values, vec![Some(1.0), Some(9.0), Some(1.0)]);
        // Labels written as numbers of another notation are read; other labels are refused
        // (`1.0` was read as 0, and every alert in its window counted false).
        std::fs::write(
            &single,
            "time,value,label\n0,1,0.0\n60000,9,1.0\n120000,1,0\n",
        )
        .expect("write");
        assert_eq!(
            from_csv(&single).expect("csv")[0].windows,
            vec![(60_000, 60_000)]
        );
        std::fs::write(&single, "time,value,label\n0,1,0\n60000,9,2\n").expect("write");
        let refused = from_csv(&single).expect_err("label 2").to_string();
        assert!(
            refused.contains("line 3: column 3 (label) holds \"2\", which is not a label (0 or 1)"),
            "{refused}"
        );
        // Columns by the header's names, in any order; times with an offset; epoch seconds
        // said to be seconds, and refused as milliseconds (they fell in January 1970).
        let named = dir.path().join("named.csv");
        std::fs::write(
            &named,
            "Label,value,timestamp,series\n0,1,2026-01-01T07:00:00+07:00,a\n\
             1,9,2026-01-01T00:01:00Z,a\n0,1,1767225720000,a\n",
        )
        .expect("write");
        let set = from_csv(&named).expect("csv");
        assert_eq!(set.len(), 1);
        assert_eq!(set[0].name, "a");
        assert_eq!(
            set[0].times,
            vec![1_767_225_600_000, 1_767_225_660_000, 1_767_225_720_000]
        );
        assert_eq!(set[0].windows, vec![(1_767_225_660_000, 1_767_225_660_000)]);
        // A series column of another name, first or not, names the series (a file of two
        // sensors was read as one series).
        for (name, csv) in [
            (
                "sensor_first.csv",
                "sensor,timestamp,value,label\np1,0,1,0\np2,0,2,0\np1,60000,1,0\n",
            ),
            (
                "sensor_last.csv",
                "timestamp,value,label,sensor\n0,1,0,p1\n0,2,0,p2\n60000,1,0,p1\n",
            ),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, csv).expect("write");
            let set = from_csv(&path).expect("csv");
            let names: Vec<&str> = set.iter().map(|s| s.name.as_str()).collect();
            assert_eq!(names, vec!["p1", "p2"], "{name}");
        }
        let seconds = dir.path().join("seconds.csv");
        std::fs::write(
            &seconds,
            "series,timestamp,value,label\ns,1767225600,1,0\ns,1767225660,2,0\n",
        )
        .expect("write");
        let refused = from_csv(&seconds).expect_err("seconds").to_string();
        assert!(refused.contains("--time-unit s"), "{refused}");
        assert_eq!(
            from_csv_in(&seconds, 1_000).expect("seconds")[0].times,
            vec![1_767_225_600_000, 1_767_225_660_000]
        );
    }

    /// Two labelled windows that overlap once the tolerance extends the first: the first's
    /// tolerance ends where the second begins, and one alert finds one of them, not both (it
    /// found both, and scored twice in the NAB totals).
    #[test]
    fn one_alert_finds_one_of_two_overlapping_windows() {
        assert_eq!(
            nab::extended(&[(0, 5), (50, 60), (100, 130)], 30),
            vec![(0, 35), (50, 90), (100, 160)]
        );
        assert_eq!(
            nab::extended(&[(0, 100), (10, 20)], 30),
            vec![(0, 9), (10, 50)]
        );
        let times: Vec<i64> = (0..600).map(|i| START + i * MIN).collect();
        let values: Vec<Option<f64>> = (0..600)
            .map(|i| {
                Some(if i == 500 {
                    100.0
                } else {
                    10.0 + (i % 7) as f64 * 0.3
                })
            })
            .collect();
        let set = vec![Series {
            name: "steady/two".into(),
            windows: vec![(times[480], times[482]), (times[500], times[502])],
            times,
            values,
            target: Target::Anomaly,
            quantity: "",
        }];
        let reports = evaluate_all(&set, 30 * MIN, 0).expect("evaluate");
        let mut alerted = 0;
        for r in &reports {
            assert_eq!(r.windows, 2, "{r:?}");
            assert!(r.found <= r.alerts, "{r:?}");
            if r.alerts == 1 {
                alerted += 1;
                assert_eq!(r.found, 1, "{r:?}");
            }
        }
        assert!(
            alerted > 0,
            "no detector raised exactly one alert: {reports:?}"
        );
    }

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        assert_eq!(median(vec![20.0, 0.0]), Some(10.0));
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(Vec::new()), None);
    }

    #[test]
    fn per_point_scores_cover_every_reading_of_every_detector() {
        // Ten hours of a steady reading with a labelled spike near the end.
        let times: Vec<i64> = (0..600).map(|i| START + i * MIN).collect();
        let values: Vec<Option<f64>> = (0..600)
            .map(|i| {
                Some(if (560..566).contains(&i) {
                    100.0
                } else {
                    10.0 + (i % 7) as f64 * 0.3
                })
            })
            .collect();
        let set = vec![Series {
            name: "steady/one".into(),
            windows: vec![(times[560], times[565])],
            times,
            values,
            target: Target::Anomaly,
            quantity: "",
        }];
        let mut out = Vec::new();
        let rows = write_scores(&set, HANOI_UTC_OFFSET_MS, &mut out).expect("scores");
        assert_eq!(rows, 600 * DETECTORS.len());
        let text = String::from_utf8(out).expect("utf8");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "series,timestamp,value,label,detector,score,alert"
        );
        assert_eq!(lines.len(), rows + 1);
        // The default detector alerts inside the labelled window; its first readings warm up
        // (no score).
        let default: Vec<Vec<&str>> = lines[1..]
            .iter()
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|f| f[4] == "anomaly_score")
            .collect();
        assert_eq!(default.len(), 600);
        assert_eq!(
            default[0][5], "",
            "a score during warm-up: {:?}",
            default[0]
        );
        assert!(
            default.iter().any(|f| f[3] == "1" && f[6] == "1"),
            "no alert inside the labelled window"
        );
        assert_eq!(default.iter().filter(|f| f[3] == "1").count(), 6);
    }
}
