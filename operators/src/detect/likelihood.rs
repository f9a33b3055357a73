//! Calibration of a raw anomaly statistic into a likelihood that means the same on every series.

use serde::{Deserialize, Serialize};

/// Turns a detector's raw, non-negative statistic (a `|score|`) into an anomaly *likelihood*
/// in [0, 1]: one minus the probability, under the series' own recent history of that
/// statistic, of a value at least as large. On a stationary series without anomalies,
/// `P(likelihood ≥ 1 − ε) ≈ ε` whatever the distribution of the series or its scale, so one
/// threshold fits every series.
///
/// - **Body**: the statistic's distribution is kept in a log-binned histogram
///   ([`Calibrator::BINS_PER_DECADE`] bins per decade from [`Calibrator::LOW`] over
///   [`Calibrator::DECADES`] decades); within a bin the mass is taken as log-uniform.
/// - **Tail**: beyond the top [`Calibrator::TAIL`] of the mass, where a histogram of finite
///   history has too few values, the excesses over that threshold are fitted with a
///   generalised Pareto distribution by the method of moments (peaks over threshold, as in
///   SPOT, Siffer et al., KDD 2017), its shape kept in [−0.5, 0.9].
/// - **Forgetting** is by time, not by readings: a value learnt `Δt` ago weighs
///   `exp(−Δt / forget)`, so a one-second sensor and an hourly one both forget over the same
///   span. Decay costs O(1) per reading (weights grow instead, renormalised rarely).
///
/// O(bins) per reading (a few hundred additions), about 1.6 KB per key.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct Calibrator {
    /// Weights per bin: `[0]` at or below [`Calibrator::LOW`], `[1..=BINS]` log bins, then one
    /// bin for everything above the top edge.
    counts: Vec<f64>,
    /// Sum of `counts`.
    total: f64,
    /// Readings learnt (not decayed), for warm-up.
    seen: u64,
    /// Event time the weights are relative to, epoch ms.
    origin: Option<i64>,
    /// Forgetting time constant, ms.
    forget_ms: i64,
    /// The highest bin holding weight (the bins above it are empty).
    top: usize,
}

impl Clone for Calibrator {
    fn clone(&self) -> Self {
        let mut copy = Self {
            counts: Vec::new(),
            ..*self
        };
        copy.counts.clone_from(&self.counts);
        copy
    }

    /// Reuses the histogram's buffer (a key's state copied while a checkpoint holds it).
    fn clone_from(&mut self, source: &Self) {
        let Self {
            counts,
            total,
            seen,
            origin,
            forget_ms,
            top,
        } = source;
        self.counts.clone_from(counts);
        self.total = *total;
        self.seen = *seen;
        self.origin = *origin;
        self.forget_ms = *forget_ms;
        self.top = *top;
    }
}

impl Default for Calibrator {
    fn default() -> Self {
        Self::new(Self::DEFAULT_FORGET_MS)
    }
}

impl Calibrator {
    /// Values at or below this count as 0.
    pub const LOW: f64 = 1.0e-3;
    /// Decades covered above [`Calibrator::LOW`].
    pub const DECADES: usize = 8;
    /// Bins per decade.
    pub const BINS_PER_DECADE: usize = 24;
    /// Fraction of the mass fitted by the tail model.
    pub const TAIL: f64 = 0.02;
    /// Readings learnt before a likelihood is given.
    pub const WARMUP: u64 = 300;
    /// Default forgetting time constant: 30 days.
    pub const DEFAULT_FORGET_MS: i64 = 30 * 86_400_000;
    /// The likelihood an alert is raised at by default: on anomaly-free data, about one
    /// reading in 10 000 reaches it.
    pub const DEFAULT_THRESHOLD: f64 = 0.9999;

    const BINS: usize = Self::DECADES * Self::BINS_PER_DECADE;

    /// A calibrator forgetting with time constant `forget_ms`.
    pub fn new(forget_ms: i64) -> Self {
        Self {
            counts: vec![0.0; Self::BINS + 2],
            total: 0.0,
            seen: 0,
            origin: None,
            forget_ms: forget_ms.max(1),
            top: 0,
        }
    }

    pub(crate) fn heap_size(&self) -> usize {
        self.counts.capacity() * std::mem::size_of::<f64>()
    }

    fn bin(v: f64) -> usize {
        if v.is_nan() || v <= Self::LOW {
            return 0;
        }
        let i = ((v / Self::LOW).log10() * Self::BINS_PER_DECADE as f64).floor() as usize + 1;
        i.min(Self::BINS + 1)
    }

    /// Lower edge of bin `i` (`i ≥ 1`).
    fn edge(i: usize) -> f64 {
        Self::LOW * 10f64.powf((i - 1) as f64 / Self::BINS_PER_DECADE as f64)
    }

    /// A representative value of bin `i`: its geometric middle (the lower edge for the open
    /// top bin, 0 for the bottom one).
    fn middle(i: usize) -> f64 {
        match i {
            0 => 0.0,
            i if i > Self::BINS => Self::edge(i),
            i => Self::edge(i) * 10f64.powf(0.5 / Self::BINS_PER_DECADE as f64),
        }
    }

    /// Weight of a reading at `t_ms` relative to the origin; renormalises when it grows large.
    fn weight(&mut self, t_ms: i64) -> f64 {
        let origin = *self.origin.get_or_insert(t_ms);
        let w = ((t_ms - origin) as f64 / self.forget_ms as f64).exp();
        if w > 1.0e100 || !w.is_finite() {
            // Renormalise to t_ms as the new origin.
            let shrink = (-((t_ms - origin) as f64) / self.forget_ms as f64).exp();
            for c in &mut self.counts {
                *c *= shrink;
            }
            self.total = self.counts.iter().sum();
            self.origin = Some(t_ms);
            return 1.0;
        }
        w
    }

    /// Whether enough has been learnt to give a likelihood.
    pub fn warming(&self) -> bool {
        self.seen < Self::WARMUP || self.total <= 0.0
    }

    /// The probability under the learnt distribution of a value at least `v`; `None` while
    /// warming up.
    pub fn p_value(&self, v: f64) -> Option<f64> {
        if self.warming() || v.is_nan() {
            return None;
        }
        let total = self.total;
        let i = Self::bin(v);
        // The tail threshold: the lowest bin edge with at most TAIL of the mass above it.
        let mut above = 0.0;
        let mut j = self.top;
        while j > 1 && above + self.counts[j] <= Self::TAIL * total {
            above += self.counts[j];
            j -= 1;
        }
        // Bins j+1.. hold at most TAIL; the threshold is the lower edge of bin j+1.
        let u = Self::edge(j + 1);
        if v > u && above > 0.0 {
            return Some(self.tail(j + 1, u, above / total, v));
        }
        let mut p = self
            .counts
            .get(i + 1..=self.top)
            .map_or(0.0, |c| c.iter().sum::<f64>());
        if (1..=Self::BINS).contains(&i) {
            let (a, b) = (Self::edge(i), Self::edge(i + 1));
            p += self.counts[i] * ((b / v).ln() / (b / a).ln()).clamp(0.0, 1.0);
        } else {
            p += self.counts[i];
        }
        Some((p / total).clamp(0.0, 1.0))
    }

    /// Generalised Pareto tail over `u` fitted to the mass of bins `from..` (a fraction
    /// `mass` of the whole), evaluated at `v > u`.
    fn tail(&self, from: usize, u: f64, mass: f64, v: f64) -> f64 {
        let (mut w, mut m1, mut m2) = (0.0, 0.0, 0.0);
        for (k, c) in self.counts.iter().enumerate().take(self.top + 1).skip(from) {
            if *c > 0.0 {
                let e = (Self::middle(k) - u).max(0.0);
                w += c;
                m1 += c * e;
                m2 += c * e * e;
            }
        }
        let mean = m1 / w;
        if mean <= 0.0 || !mean.is_finite() {
            return mass * 1e-3;
        }
        let var = (m2 / w - mean * mean).max(0.0);
        let ratio = if var > 0.0 { mean * mean / var } else { 1.0 };
        let shape = (0.5 * (1.0 - ratio)).clamp(-0.5, 0.9);
        let sigma = mean * (1.0 - shape);
        let y = (v - u) / sigma;
        let survival = if shape.abs() < 1e-6 {
            (-y).exp()
        } else {
            (1.0 + shape * y).max(0.0).powf(-1.0 / shape)
        };
        (mass * survival).clamp(f64::MIN_POSITIVE, 1.0)
    }

    /// The likelihood of `v`: `1 − p_value(v)`; `None` while warming up.
    pub fn likelihood(&self, v: f64) -> Option<f64> {
        self.p_value(v).map(|p| 1.0 - p)
    }

    /// Learns `v` (observed at `t_ms`).
    pub fn learn(&mut self, t_ms: i64, v: f64) {
        if v.is_nan() {
            return;
        }
        let w = self.weight(t_ms);
        let bin = Self::bin(v.abs());
        self.counts[bin] += w;
        self.top = self.top.max(bin);
        self.total += w;
        self.seen += 1;
    }
}
