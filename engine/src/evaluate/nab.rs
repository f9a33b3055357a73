//! Changepoint scoring in the manner of the Numenta Anomaly Benchmark (Lavin & Ahmad, 2015),
//! with the window placement and scaling function of SKAB's own scorer, and per-point
//! outlier metrics.
//!
//! - Each true changepoint opens a detection window `[cp, cp + width]`; a window that would
//!   overlap the previous one starts where that one ends.
//! - A predicted changepoint inside a window is a true positive, scored by how early it
//!   came: `A_tp` at the window's start falling to `A_fp` at its end along a scaled
//!   `tanh` (SKAB's "improved" scale, evaluated on 1000 steps). Only the first prediction in
//!   a window counts; later ones in it are neither rewarded nor penalised.
//! - A window without a prediction costs `A_fn`; each prediction outside every window costs
//!   `A_fp`.
//! - The total over all series is normalised to `100 · (S − S_null) / (S_perfect − S_null)`,
//!   where the null detector predicts nothing (`S_null = n · A_fn`) and the perfect one
//!   predicts each changepoint at its time (`S_perfect = n · A_tp`).

use serde::Serialize;

use super::ratio;

/// A scoring profile's weights.
#[derive(Debug, Clone, Copy)]
pub struct Profile {
    /// Name, as NAB and SKAB print it.
    pub name: &'static str,
    /// Weight of a true positive at the start of its window.
    pub a_tp: f64,
    /// Weight of a false positive.
    pub a_fp: f64,
    /// Weight of a missed window.
    pub a_fn: f64,
}

/// NAB's three profiles: standard, reward low false positives, reward low false negatives.
pub const PROFILES: [Profile; 3] = [
    Profile {
        name: "standard",
        a_tp: 1.0,
        a_fp: -0.11,
        a_fn: -1.0,
    },
    Profile {
        name: "low FP",
        a_tp: 1.0,
        a_fp: -0.22,
        a_fn: -1.0,
    },
    Profile {
        name: "low FN",
        a_tp: 1.0,
        a_fp: -0.11,
        a_fn: -2.0,
    },
];

/// Detection windows of `width_ms` to the right of each changepoint (times in ms, sorted).
pub fn windows(changepoints: &[i64], width_ms: i64) -> Vec<(i64, i64)> {
    let mut out: Vec<(i64, i64)> = changepoints.iter().map(|c| (*c, c + width_ms)).collect();
    for i in 1..out.len() {
        if out[i - 1].1 >= out[i].0 {
            out[i].0 = out[i - 1].1;
        }
    }
    out
}

/// Detection windows for labelled windows `[start, end]` (sorted by start): each extended by
/// `tolerance_ms`, the extension ending before the next labelled window begins (a window
/// overlapping the next keeps only what comes before it). One detection finds at most one
/// window (two only when they start at the same time), and a detection inside a labelled
/// window finds that one, not the one before it.
pub fn extended(labelled: &[(i64, i64)], tolerance_ms: i64) -> Vec<(i64, i64)> {
    (0..labelled.len())
        .map(|i| {
            let (a, b) = labelled[i];
            let end = b.saturating_add(tolerance_ms);
            match labelled.get(i + 1) {
                Some(&(next, _)) => (a, end.min(next - 1).max(a)),
                None => (a, end),
            }
        })
        .collect()
}

/// The weight of a detection at `t` in the window `[a, b]`.
fn scaled(a: i64, t: i64, b: i64, p: &Profile) -> f64 {
    const STEPS: usize = 1000;
    let step = if b > a {
        (((t - a) as f64 / (b - a) as f64) * STEPS as f64) as usize
    } else {
        0
    }
    .min(STEPS - 1);
    let half = std::f64::consts::FRAC_PI_2;
    let x = -half + step as f64 * (2.0 * half / (STEPS - 1) as f64);
    let span = (p.a_tp - p.a_fp) / 2.0;
    -span * x.tanh() / half.tanh() + span + p.a_fp
}

/// Per profile, `100 · (S − S_null) / (S_perfect − S_null)` of its (score, null score, perfect
/// score); 0 without windows to score.
fn normalised(sums: &[(f64, f64, f64); 3]) -> [f64; 3] {
    sums.map(|(s, null, perfect)| {
        if perfect > null {
            100.0 * (s - null) / (perfect - null)
        } else {
            0.0
        }
    })
}

/// Changepoint scores accumulated over series.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NabTotals {
    /// Per profile: (score, null score, perfect score).
    sums: [(f64, f64, f64); 3],
    /// Windows with a detection.
    pub detected: usize,
    /// Windows without one.
    pub missed: usize,
    /// Predictions outside every window.
    pub false_positives: usize,
}

impl NabTotals {
    /// Adds one series: its detection windows and its predicted changepoint times.
    pub fn add(&mut self, windows: &[(i64, i64)], predictions: &[i64]) {
        // As SKAB's scorer does: each window takes its own first prediction (one exactly on
        // the boundary of two adjacent windows counts for both); a prediction in no window is
        // a false positive.
        let first: Vec<Option<i64>> = windows
            .iter()
            .map(|(a, b)| {
                predictions
                    .iter()
                    .filter(|t| *a <= **t && **t <= *b)
                    .min()
                    .copied()
            })
            .collect();
        let false_positives = predictions
            .iter()
            .filter(|t| !windows.iter().any(|(a, b)| *a <= **t && **t <= *b))
            .count();
        let detected = first.iter().filter(|f| f.is_some()).count();
        let missed = windows.len() - detected;
        for (sum, p) in self.sums.iter_mut().zip(PROFILES.iter()) {
            sum.0 += p.a_fp * false_positives as f64 + p.a_fn * missed as f64;
            for ((a, b), t) in windows.iter().zip(&first) {
                if let Some(t) = t {
                    sum.0 += scaled(*a, *t, *b, p);
                }
            }
            sum.1 += windows.len() as f64 * p.a_fn;
            sum.2 += windows.len() as f64 * p.a_tp;
        }
        self.detected += detected;
        self.missed += missed;
        self.false_positives += false_positives;
    }

    /// The normalised scores, one per profile of [`PROFILES`] (0 for the null detector, 100
    /// for the perfect one).
    pub fn scores(&self) -> [f64; 3] {
        normalised(&self.sums)
    }
}

/// NAB's own scoring (Numenta's scorer, `nab/sweeper.py`, after the NAB paper): each
/// detection is scored by its row's position relative to a window's right edge along
/// `S(y) = 2·sigmoid(−5y) − 1`.
///
/// - Inside a window of `w` rows ending at row `r`, a detection at row `i` is at
///   `y = −(r − i + 1) / w` and scores `A_tp · S(y) / S(−1)`; the window takes its best
///   (earliest) detection, and a window without one costs `A_fn`.
/// - Outside every window, a detection scores `A_fp · S(y)` (negative), `y` its distance in
///   rows past the previous window's right edge over that window's width less one (a
///   detection before any window: `y = 3`, the full `A_fp`); every detection outside counts.
/// - Detections in the first 15 % of a series' rows (at most 750) are not scored, nor are
///   windows that lie wholly inside them.
/// - Overlapping windows are merged, as NAB's labeller combines them. The total over all
///   series is normalised as [`NabTotals::scores`] does: 0 for no detection, 100 for each
///   window detected at its first row and nothing else.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NabPaperTotals {
    /// Per profile: (score, null score, perfect score).
    sums: [(f64, f64, f64); 3],
}

/// `S(y)` of [`NabPaperTotals`].
fn scaled_sigmoid(y: f64) -> f64 {
    if y >= 3.0 {
        -1.0
    } else {
        2.0 / (1.0 + (5.0 * y).exp()) - 1.0
    }
}

impl NabPaperTotals {
    /// Adds one series: its reading times (sorted), its windows `[start, end]` in time and
    /// its detections' times.
    pub fn add(&mut self, times: &[i64], windows: &[(i64, i64)], detections: &[i64]) {
        let probation = ((times.len() as f64 * 0.15).floor() as usize).min(750);
        // Windows in rows, merged where they overlap.
        let mut rows: Vec<(usize, usize)> = Vec::new();
        let mut sorted = windows.to_vec();
        sorted.sort_unstable();
        for (a, b) in sorted {
            let first = times.partition_point(|t| *t < a);
            let last = times.partition_point(|t| *t <= b);
            if first >= last {
                continue;
            }
            let (first, last) = (first, last - 1);
            match rows.last_mut() {
                Some(prev) if prev.1 >= first => prev.1 = prev.1.max(last),
                _ => rows.push((first, last)),
            }
        }
        rows.retain(|(_, last)| *last >= probation);
        // Each scored detection, once for every profile: its window's unweighted score
        // (relative to the earliest), or its unweighted score outside every window.
        let max_tp = scaled_sigmoid(-1.0);
        let mut inside: Vec<Option<f64>> = vec![None; rows.len()];
        let mut outside = 0.0;
        for t in detections {
            let i = times.partition_point(|x| x < t);
            if i >= times.len() || i < probation {
                continue;
            }
            // The first window ending at or after row i, and whether it holds i.
            let k = rows.partition_point(|(_, b)| *b < i);
            match rows.get(k) {
                Some(&(a, b)) if a <= i => {
                    let y = -((b - i + 1) as f64) / (b - a + 1) as f64;
                    let score = scaled_sigmoid(y) / max_tp;
                    inside[k] = Some(inside[k].map_or(score, |s: f64| s.max(score)));
                }
                _ => {
                    let y = match k.checked_sub(1).map(|k| rows[k]) {
                        Some((a, b)) => (i - b) as f64 / ((b - a) as f64).max(1.0),
                        None => 3.0,
                    };
                    outside += scaled_sigmoid(y);
                }
            }
        }
        for (sum, p) in self.sums.iter_mut().zip(PROFILES.iter()) {
            let (tp, fp, fn_) = (p.a_tp, -p.a_fp, -p.a_fn);
            let found: f64 = inside.iter().map(|s| s.map_or(-fn_, |s| s * tp)).sum();
            sum.0 += found + outside * fp;
            sum.1 -= rows.len() as f64 * fn_;
            sum.2 += rows.len() as f64 * tp;
        }
    }

    /// The normalised scores, one per profile of [`PROFILES`].
    pub fn scores(&self) -> [f64; 3] {
        normalised(&self.sums)
    }
}

/// Per-point outlier counts.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PointCounts {
    /// Flagged and labelled.
    pub tp: usize,
    /// Flagged, not labelled.
    pub fp: usize,
    /// Labelled, not flagged.
    pub fn_: usize,
    /// Neither.
    pub tn: usize,
}

impl PointCounts {
    /// Counts one point.
    pub fn add(&mut self, flagged: bool, labelled: bool) {
        match (flagged, labelled) {
            (true, true) => self.tp += 1,
            (true, false) => self.fp += 1,
            (false, true) => self.fn_ += 1,
            (false, false) => self.tn += 1,
        }
    }

    /// F1 = TP / (TP + (FN + FP) / 2).
    pub fn f1(&self) -> f64 {
        ratio(2 * self.tp, 2 * self.tp + self.fn_ + self.fp)
    }

    /// False alarm rate, %: FP / (FP + TN).
    pub fn far(&self) -> f64 {
        100.0 * ratio(self.fp, self.fp + self.tn)
    }

    /// Missed alarm rate, %: FN / (FN + TP).
    pub fn mar(&self) -> f64 {
        100.0 * ratio(self.fn_, self.fn_ + self.tp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NAB's own rules on one series of 100 one-minute rows with a window of rows 50–59,
    /// checked against values worked out by hand from `sweeper.py`'s formulas.
    #[test]
    fn the_nab_paper_scores_detections_by_their_rows() {
        let times: Vec<i64> = (0..100).map(|i| i * 60_000).collect();
        let window = [(times[50], times[59])];
        let score = |detections: &[i64]| {
            let mut totals = NabPaperTotals::default();
            totals.add(&times, &window, detections);
            totals.scores()
        };
        let close = |a: f64, b: f64| (a - b).abs() < 1e-3;
        // At the window's first row: the perfect score; none: the null score.
        assert!(score(&[times[50]]).iter().all(|s| close(*s, 100.0)));
        assert!(score(&[]).iter().all(|s| close(*s, 0.0)));
        // At its last row: y = −0.1, S = 0.24492, weighted 0.24492 / 0.98661 = 0.24824.
        let last = score(&[times[59]]);
        assert!(close(last[0], 100.0 * (0.248_24 + 1.0) / 2.0), "{last:?}");
        // Only the best detection in the window counts.
        assert!(
            score(&[times[59], times[50], times[55]])
                .iter()
                .all(|s| close(*s, 100.0))
        );
        // Eleven rows past the window's end: y = 11 / 9, S = −0.99557, times A_fp.
        let late = score(&[times[50], times[70]]);
        assert!(
            close(late[0], 100.0 * (1.0 - 0.11 * 0.995_57 + 1.0) / 2.0),
            "{late:?}"
        );
        assert!(
            close(late[1], 100.0 * (1.0 - 0.22 * 0.995_57 + 1.0) / 2.0),
            "{late:?}"
        );
        // Low FN: a miss costs 2; the null score is −2.
        let missed_late = score(&[times[70]]);
        assert!(close(
            missed_late[2],
            100.0 * (-2.0 - 0.11 * 0.995_57 + 2.0) / 3.0
        ));
        // Before any window: the full A_fp. In the probation (the first 15 rows): nothing.
        let early = score(&[times[20], times[50]]);
        assert!(
            close(early[0], 100.0 * (1.0 - 0.11 + 1.0) / 2.0),
            "{early:?}"
        );
        assert!(
            score(&[times[5], times[50]])
                .iter()
                .all(|s| close(*s, 100.0))
        );
        // Overlapping windows are merged into one.
        let mut totals = NabPaperTotals::default();
        totals.add(
            &times,
            &[(times[50], times[55]), (times[53], times[59])],
            &[times[50]],
        );
        assert!(totals.scores().iter().all(|s| close(*s, 100.0)));
    }

    #[test]
    fn null_perfect_and_late_detectors_score_as_nab_defines() {
        let w = windows(&[1_000, 30_000, 100_000], 60_000);
        // The second window overlapped the first: it starts at the first's end (a
        // prediction on that boundary is a detection in both).
        assert_eq!(
            w,
            vec![(1_000, 61_000), (61_000, 90_000), (100_000, 160_000)]
        );
        let mut null = NabTotals::default();
        null.add(&w, &[]);
        assert_eq!(null.scores(), [0.0; 3]);
        let mut perfect = NabTotals::default();
        perfect.add(&w, &[1_000, 61_000, 100_000]);
        for s in perfect.scores() {
            assert!((s - 100.0).abs() < 1e-9, "{s}");
        }
        // A detection at a window's end is worth A_fp; one in its middle about half of
        // A_tp + A_fp; a second detection in a window counts for nothing.
        let mut late = NabTotals::default();
        late.add(&[(0, 60_000)], &[60_000]);
        assert!((late.scores()[0] - 100.0 * (-0.11 + 1.0) / 2.0).abs() < 1e-9);
        let mut middle = NabTotals::default();
        middle.add(&[(0, 60_000)], &[30_000]);
        let mid = (1.0 - 0.11) / 2.0;
        assert!((middle.scores()[0] - 100.0 * (mid + 1.0) / 2.0).abs() < 0.2);
        let mut twice = NabTotals::default();
        twice.add(&[(0, 60_000)], &[30_000, 0]);
        assert!((twice.scores()[0] - 100.0).abs() < 1e-9);
        // False positives cost A_fp each, twice as much under the low-FP profile.
        let mut noisy = NabTotals::default();
        noisy.add(&[(0, 60_000)], &[0, 100_000, 200_000]);
        let [standard, low_fp, low_fn] = noisy.scores();
        assert!((standard - 100.0 * (1.0 - 0.22 + 1.0) / 2.0).abs() < 1e-9);
        assert!((low_fp - 100.0 * (1.0 - 0.44 + 1.0) / 2.0).abs() < 1e-9);
        assert!((low_fn - 100.0 * (1.0 - 0.22 + 2.0) / 3.0).abs() < 1e-9);
        assert_eq!(
            (noisy.detected, noisy.missed, noisy.false_positives),
            (1, 0, 2)
        );
    }

    #[test]
    fn point_counts_give_skabs_f1_far_and_mar() {
        let mut c = PointCounts::default();
        for (f, l) in [
            (true, true),
            (true, true),
            (true, false),
            (false, true),
            (false, false),
        ] {
            c.add(f, l);
        }
        assert!((c.f1() - 2.0 / 3.0).abs() < 1e-12);
        assert!((c.far() - 50.0).abs() < 1e-12);
        assert!((c.mar() - 100.0 / 3.0).abs() < 1e-12);
    }
}
