//! The Skoltech Anomaly Benchmark (SKAB) through the default detector, scored as SKAB scores
//! its leaderboard: NAB changepoint scores (windows of 60 s to the right of each labelled
//! changepoint) and per-point outlier F1, FAR and MAR.
//!
//! Every experiment is run causally from its first row, one reading at a time, with the same
//! state the stream engine keeps per key: each of the 8 sensor columns through
//! `anomaly_score`, and the pump as a whole through `anomaly_vector` over all 8 (the columns'
//! likelihoods combined by a Bonferroni bound, `1 − min(1, 8 · min(1 − lᵢ))`: the chance
//! that any one of 8 calibrated columns reaches its level by chance), and through
//! `anomaly_t2` (Hotelling's T² of the 8 together, its half-life the one of
//! [`T2_HALF_LIVES_MS`] that raises the fewest alerts on the anomaly-free run). Alerts are
//! raised at a likelihood of `threshold` and cleared below `clear`; an alert's raising and
//! its clearing are the predicted changepoints, and a reading is flagged while an alert is
//! active. The anomaly-free run gives the false alerts per day of a healthy pump.

use std::path::Path;

use serde::Serialize;
use urbanstream_operators::detect::udwf::SeriesKind;
use urbanstream_operators::detect::{
    AlertMachine, AlertRule, AlertTransition, Emitted, Hotelling, SeriesState,
};

use super::nab::{NabTotals, PointCounts, windows};
use crate::error::{Error, Result};

/// SKAB's detection window after each changepoint.
pub const WINDOW_MS: i64 = 60_000;

/// One experiment (or the anomaly-free run).
#[derive(Debug, Clone)]
pub struct Experiment {
    /// `folder/file`.
    pub name: String,
    /// Row times, epoch ms.
    pub times: Vec<i64>,
    /// Sensor column names.
    pub columns: Vec<String>,
    /// Readings per column.
    pub values: Vec<Vec<Option<f64>>>,
    /// The `anomaly` label per row (all false for the anomaly-free run).
    pub anomaly: Vec<bool>,
    /// Times of rows labelled `changepoint`.
    pub changepoints: Vec<i64>,
}

fn load_file(path: &Path, name: String) -> Result<Experiment> {
    let bad = |what: String| Error::Config(format!("{}: {what}", path.display()));
    crate::files::check_line_lengths(path)?;
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(b';')
        .from_path(path)
        .map_err(|e| bad(e.to_string()))?;
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| bad(e.to_string()))?
        .iter()
        .map(str::to_string)
        .collect();
    let label = |n: &str| header.iter().position(|h| h == n);
    let (anomaly_at, changepoint_at) = (label("anomaly"), label("changepoint"));
    let sensors: Vec<usize> = (1..header.len())
        .filter(|i| Some(*i) != anomaly_at && Some(*i) != changepoint_at)
        .collect();
    let mut e = Experiment {
        name,
        times: Vec::new(),
        columns: sensors.iter().map(|i| header[*i].clone()).collect(),
        values: vec![Vec::new(); sensors.len()],
        anomaly: Vec::new(),
        changepoints: Vec::new(),
    };
    for (line, record) in reader.records().enumerate() {
        let record = record.map_err(|e| bad(e.to_string()))?;
        let at = |what: &str| bad(format!("line {}: bad {what}", line + 2));
        let t = humantime::parse_rfc3339_weak(record.get(0).unwrap_or(""))
            .map_err(|_| at("datetime"))?
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|_| at("datetime"))?
            .as_millis() as i64;
        e.times.push(t);
        for (k, i) in sensors.iter().enumerate() {
            let v = record.get(*i).unwrap_or("").trim();
            e.values[k].push(if v.is_empty() {
                None
            } else {
                Some(v.parse::<f64>().map_err(|_| at(&header[*i]))?)
            });
        }
        let flag = |i: Option<usize>| {
            i.and_then(|i| record.get(i))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .is_some_and(|v| v >= 0.5)
        };
        e.anomaly.push(flag(anomaly_at));
        if flag(changepoint_at) {
            e.changepoints.push(t);
        }
    }
    Ok(e)
}

/// Reads SKAB's data folder: the experiments of `valve1/`, `valve2/` and `other/` (in that
/// order, files by number), and the run of `anomaly-free/` if present.
pub fn load(dir: &Path) -> Result<(Vec<Experiment>, Option<Experiment>)> {
    let mut out = Vec::new();
    for folder in ["valve1", "valve2", "other"] {
        let path = dir.join(folder);
        let entries = std::fs::read_dir(&path).map_err(|e| {
            Error::Config(format!(
                "{}: {e} (is this SKAB's data folder?)",
                path.display()
            ))
        })?;
        let mut files: Vec<(u32, std::path::PathBuf)> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "csv"))
            .map(|p| {
                let n = p
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(u32::MAX);
                (n, p)
            })
            .collect();
        files.sort();
        for (_, p) in files {
            let name = format!(
                "{folder}/{}",
                p.file_name().and_then(|s| s.to_str()).unwrap_or("?")
            );
            out.push(load_file(&p, name)?);
        }
    }
    let free = dir.join("anomaly-free").join("anomaly-free.csv");
    let free = if free.exists() {
        Some(load_file(
            &free,
            "anomaly-free/anomaly-free.csv".to_string(),
        )?)
    } else {
        None
    };
    Ok((out, free))
}

/// Likelihoods of one column under the default detector (`anomaly_score`), row by row.
pub fn likelihoods(times: &[i64], values: &[Option<f64>]) -> Result<Vec<Option<f64>>> {
    let mut state = SeriesKind::Score
        .state(&[])
        .map_err(|e| Error::Config(e.to_string()))?;
    Ok(times
        .iter()
        .zip(values)
        .map(|(t, x)| match state.step(*t, *x) {
            Emitted::Score(s) => s.likelihood,
            _ => None,
        })
        .collect())
}

/// Likelihoods of all columns together under `anomaly_vector`, row by row.
pub fn vector_likelihoods(times: &[i64], columns: &[Vec<Option<f64>>]) -> Result<Vec<Option<f64>>> {
    let state = SeriesKind::Vector
        .state(&[])
        .map_err(|e| Error::Config(e.to_string()))?;
    Ok(row_likelihoods(state, times, columns))
}

/// The likelihood of each row of `columns` under a multivariate detector's `state`, stepped
/// one row at a time as the SQL function steps it.
fn row_likelihoods(
    mut state: SeriesState,
    times: &[i64],
    columns: &[Vec<Option<f64>>],
) -> Vec<Option<f64>> {
    let mut row = Vec::with_capacity(columns.len());
    times
        .iter()
        .enumerate()
        .map(|(r, t)| {
            row.clear();
            row.extend(columns.iter().map(|c| c[r]));
            match state.step_values(*t, &row) {
                Emitted::Vector(v) => v.score.likelihood,
                _ => None,
            }
        })
        .collect()
}

/// Half-lives `anomaly_t2` is tried with on the anomaly-free run; the one with the fewest
/// alerts there is used on the experiments (no experiment is looked at to choose it).
pub const T2_HALF_LIVES_MS: [i64; 5] = [150_000, 300_000, 600_000, 1_200_000, 3_600_000];

/// Likelihoods of all columns together under `anomaly_t2` (Hotelling's T²) with `half_life_ms`,
/// row by row: the state and step the SQL function runs.
pub fn t2_likelihoods(
    times: &[i64],
    columns: &[Vec<Option<f64>>],
    half_life_ms: i64,
) -> Vec<Option<f64>> {
    let state = SeriesState::Hotelling(Box::new(Hotelling::new(half_life_ms)));
    row_likelihoods(state, times, columns)
}

/// The half-life of [`T2_HALF_LIVES_MS`] that raises the fewest alerts on the anomaly-free
/// run (the shortest among equals), and the alerts per day of each.
pub fn choose_t2_half_life(
    free: &Experiment,
    threshold: f64,
    clear: f64,
) -> (i64, Vec<(i64, usize)>) {
    let raised: Vec<(i64, usize)> = T2_HALF_LIVES_MS
        .iter()
        .map(|&h| {
            let l = t2_likelihoods(&free.times, &free.values, h);
            let (changes, _) = alerts(&free.times, &l, threshold, clear);
            (h, changes.len().div_ceil(2))
        })
        .collect();
    let best = raised
        .iter()
        .min_by_key(|(_, n)| *n)
        .map_or(Hotelling::DEFAULT_HALF_LIFE_MS, |(h, _)| *h);
    (best, raised)
}

/// Alert transitions (raised and cleared) and the per-row active flag of one likelihood
/// series.
fn alerts(
    times: &[i64],
    likelihood: &[Option<f64>],
    threshold: f64,
    clear: f64,
) -> (Vec<i64>, Vec<bool>) {
    let mut machine = AlertMachine::new(AlertRule {
        raise: threshold,
        clear,
        min_duration_ms: 0,
        cooldown_ms: 0,
        expire_ms: None,
    });
    let mut changes = Vec::new();
    let mut active = Vec::with_capacity(times.len());
    let mut on = false;
    for (t, l) in times.iter().zip(likelihood) {
        match machine.update(*t, *l).state {
            Some(AlertTransition::Raised) => {
                on = true;
                changes.push(*t);
            }
            Some(AlertTransition::Cleared) => {
                on = false;
                changes.push(*t);
            }
            _ => {}
        }
        active.push(on);
    }
    (changes, active)
}

/// One detector's results on SKAB.
#[derive(Debug, Clone, Serialize)]
pub struct SkabReport {
    /// A sensor column, or the combination of all.
    pub detector: String,
    /// NAB scores: standard, low FP, low FN.
    pub nab: [f64; 3],
    /// Changepoint windows detected, missed, and predictions outside every window.
    pub changepoints: NabTotals,
    /// Per-point outlier counts.
    pub points: PointCounts,
    /// Alerts raised per day on the anomaly-free run.
    pub free_alerts_per_day: Option<f64>,
    /// Share of the anomaly-free run's readings with likelihood ≥ 1 − 10⁻³ and ≥ 1 − 10⁻⁴.
    pub free_tail_shares: Option<(f64, f64)>,
}

/// Evaluates every column and their combination.
pub fn evaluate(
    experiments: &[Experiment],
    free: Option<&Experiment>,
    threshold: f64,
    clear: f64,
) -> Result<Vec<SkabReport>> {
    let columns = experiments
        .first()
        .map(|e| e.columns.clone())
        .unwrap_or_default();
    let all = format!("anomaly_vector of all {}", columns.len());
    let half_life = free.map_or(Hotelling::DEFAULT_HALF_LIFE_MS, |f| {
        choose_t2_half_life(f, threshold, clear).0
    });
    let t2 = format!(
        "anomaly_t2 of all {}, half-life {} s",
        columns.len(),
        half_life / 1000
    );
    let names: Vec<String> = columns.iter().cloned().chain([all, t2]).collect();
    let mut reports: Vec<SkabReport> = names
        .iter()
        .map(|n| SkabReport {
            detector: n.clone(),
            nab: [0.0; 3],
            changepoints: NabTotals::default(),
            points: PointCounts::default(),
            free_alerts_per_day: None,
            free_tail_shares: None,
        })
        .collect();
    let per_column = |e: &Experiment| -> Result<Vec<Vec<Option<f64>>>> {
        if e.columns != columns {
            return Err(Error::Config(format!(
                "{}: columns {:?} differ from the first experiment's",
                e.name, e.columns
            )));
        }
        let mut out = e
            .values
            .iter()
            .map(|v| likelihoods(&e.times, v))
            .collect::<Result<Vec<_>>>()?;
        out.push(vector_likelihoods(&e.times, &e.values)?);
        out.push(t2_likelihoods(&e.times, &e.values, half_life));
        Ok(out)
    };
    for e in experiments {
        let w = windows(&e.changepoints, WINDOW_MS);
        for (report, l) in reports.iter_mut().zip(per_column(e)?) {
            let (changes, active) = alerts(&e.times, &l, threshold, clear);
            report.changepoints.add(&w, &changes);
            for (a, y) in active.iter().zip(&e.anomaly) {
                report.points.add(*a, *y);
            }
        }
    }
    if let Some(free) = free {
        let days = (free.times.last().unwrap_or(&0) - free.times.first().unwrap_or(&0)) as f64
            / 86_400_000.0;
        for (report, l) in reports.iter_mut().zip(per_column(free)?) {
            let (changes, _) = alerts(&free.times, &l, threshold, clear);
            let raised = changes.len().div_ceil(2);
            report.free_alerts_per_day = (days > 0.0).then(|| raised as f64 / days);
            let scored: Vec<f64> = l.iter().flatten().copied().collect();
            let share = |eps: f64| {
                scored.iter().filter(|x| **x >= 1.0 - eps).count() as f64
                    / scored.len().max(1) as f64
            };
            report.free_tail_shares = Some((share(1e-3), share(1e-4)));
        }
    }
    for r in &mut reports {
        r.nab = r.changepoints.scores();
    }
    Ok(reports)
}

/// The reports as a Markdown table, with SKAB's published leaderboard below.
pub fn table(reports: &[SkabReport], threshold: f64, clear: f64) -> String {
    let mut out = format!(
        "alerts raised at likelihood ≥ {threshold}, cleared below {clear}\n\n\
         | detector | NAB standard | NAB low FP | NAB low FN | CPs found / missed / false | F1 | FAR % | MAR % | healthy pump: alerts/day | healthy: P(l ≥ 1−1e-3) | P(l ≥ 1−1e-4) |\n\
         |---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|\n"
    );
    for r in reports {
        let (s1, s2) = r
            .free_tail_shares
            .map_or(("–".into(), "–".into()), |(a, b)| {
                (format!("{a:.1e}"), format!("{b:.1e}"))
            });
        out.push_str(&format!(
            "| {} | {:.2} | {:.2} | {:.2} | {} / {} / {} | {:.2} | {:.1} | {:.1} | {} | {s1} | {s2} |\n",
            r.detector,
            r.nab[0],
            r.nab[1],
            r.nab[2],
            r.changepoints.detected,
            r.changepoints.missed,
            r.changepoints.false_positives,
            r.points.f1(),
            r.points.far(),
            r.points.mar(),
            r.free_alerts_per_day
                .map_or("–".into(), |v| format!("{v:.1}")),
        ));
    }
    out.push_str(
        "\nSKAB's published leaderboard (offline, trained on each file's first part): \
         changepoints NAB standard / low FP / low FN: MSCRED 32.42 / 16.53 / 40.28, \
         isolation forest 26.16, T-squared+Q 25.35, Conv-AE 23.61, LSTM-AE 23.51, null 0, \
         perfect 100; outliers F1: Conv-AE 0.78, MSET 0.78, T-squared+Q 0.76, LSTM-AE 0.74, \
         T-squared 0.66, isolation forest 0.29 (flagging every reading: 0.52).\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a SKAB-shaped experiment: 2 sensors at 1 Hz, noise, and from row `from` to row
    /// `to` the first sensor stepped up by `step` (labelled anomaly, changepoints at both
    /// ends).
    fn write(path: &Path, rows: usize, anomaly: Option<(usize, usize, f64)>, labels: bool) {
        let mut text = String::from("datetime;A;B");
        if labels {
            text.push_str(";anomaly;changepoint");
        }
        text.push('\n');
        for i in 0..rows {
            let s = i % 60;
            let noise = |k: usize| (((i * 7919 + k * 104_729) % 1000) as f64 / 1000.0) - 0.5;
            let inside = anomaly.is_some_and(|(a, b, _)| a <= i && i < b);
            let a = 10.0
                + noise(1)
                + if inside {
                    anomaly.map_or(0.0, |x| x.2)
                } else {
                    0.0
                };
            let b = 50.0 + 3.0 * noise(2);
            text.push_str(&format!("2020-03-09 10:{:02}:{s:02};{a};{b}", i / 60));
            if labels {
                let cp = anomaly.is_some_and(|(x, y, _)| i == x || i == y);
                text.push_str(&format!(";{}.0;{}.0", u8::from(inside), u8::from(cp)));
            }
            text.push('\n');
        }
        std::fs::write(path, text).expect("write");
    }

    #[test]
    fn skab_folders_are_read_and_a_step_is_found_by_its_column_and_the_combination() {
        let dir = tempfile::tempdir().expect("tempdir");
        for folder in ["valve1", "valve2", "other", "anomaly-free"] {
            std::fs::create_dir(dir.path().join(folder)).expect("mkdir");
        }
        write(
            &dir.path().join("valve1/1.csv"),
            1200,
            Some((700, 1000, 8.0)),
            true,
        );
        write(
            &dir.path().join("valve1/0.csv"),
            1200,
            Some((650, 950, 8.0)),
            true,
        );
        write(&dir.path().join("other/3.csv"), 1200, None, true);
        write(
            &dir.path().join("anomaly-free/anomaly-free.csv"),
            3000,
            None,
            false,
        );
        let (experiments, free) = load(dir.path()).expect("load");
        let names: Vec<&str> = experiments.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["valve1/0.csv", "valve1/1.csv", "other/3.csv"]);
        assert_eq!(experiments[0].columns, ["A", "B"]);
        assert_eq!(experiments[0].changepoints.len(), 2);
        assert_eq!(experiments[0].anomaly.iter().filter(|a| **a).count(), 300);
        assert!(free.as_ref().is_some_and(|f| f.anomaly.iter().all(|a| !a)));
        let reports = evaluate(&experiments, free.as_ref(), 0.9999, 0.99).expect("evaluate");
        let names: Vec<&str> = reports.iter().map(|r| r.detector.as_str()).collect();
        assert_eq!(names[..3], ["A", "B", "anomaly_vector of all 2"]);
        assert!(
            names[3].starts_with("anomaly_t2 of all 2, half-life "),
            "{names:?}"
        );
        for r in [&reports[0], &reports[2]] {
            // Both steps' onsets are found, early in their windows.
            assert!(r.changepoints.detected >= 2, "{r:?}");
            assert!(r.nab[0] > 20.0, "{r:?}");
            assert!(r.points.tp > 0, "{r:?}");
        }
        // The untouched column finds nothing there.
        assert_eq!(reports[1].changepoints.detected, 0, "{:?}", reports[1]);
        // T² finds both onsets and holds each step for most of its 300 readings (the others
        // mark where it starts and ends).
        let t2 = &reports[3];
        assert!(t2.changepoints.detected >= 2, "{t2:?}");
        assert!(t2.points.tp >= 480, "{t2:?}");
        assert!(t2.points.tp > 2 * reports[2].points.tp, "{t2:?}");
        assert!(reports.iter().all(|r| r.free_alerts_per_day.is_some()));
    }
}
