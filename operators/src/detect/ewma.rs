//! Exponentially weighted mean and variance, and the z-score of each reading against them.

use serde::{Deserialize, Serialize};

use super::{Score, standardise};

/// EWMA z-score: the mean and variance decay with weight `alpha` per reading (plain averages
/// while `1/n > alpha`); each reading is scored against the state before it, then folded in.
/// O(1) time and memory.
///
/// Sensitive to spikes and to level shifts until the mean has caught up (about `1/alpha`
/// readings); a slow drift is absorbed. Warming for the first `warmup` readings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ewma {
    alpha: f64,
    warmup: u32,
    n: u32,
    mean: f64,
    var: f64,
}

impl Ewma {
    /// Default weight of a new reading.
    pub const DEFAULT_ALPHA: f64 = 0.1;
    /// Default readings before the score is trusted.
    pub const DEFAULT_WARMUP: u32 = 20;

    /// A detector with weight `alpha` in (0, 1] and `warmup` readings of warm-up.
    pub fn new(alpha: f64, warmup: u32) -> Self {
        Self {
            alpha: alpha.clamp(1e-6, 1.0),
            warmup,
            n: 0,
            mean: 0.0,
            var: 0.0,
        }
    }

    /// The current mean, once a reading has been seen.
    pub fn mean(&self) -> Option<f64> {
        (self.n > 0).then_some(self.mean)
    }

    /// The current standard deviation, once a reading has been seen.
    pub fn std(&self) -> Option<f64> {
        (self.n > 0).then_some(self.var.sqrt())
    }

    /// Readings folded in so far (saturating).
    pub fn count(&self) -> u32 {
        self.n
    }

    /// Scores `x` against the state, then folds it in.
    pub fn update(&mut self, x: Option<f64>) -> Score {
        let warming = self.n < self.warmup;
        let Some(x) = super::usable(x) else {
            return Score {
                score: None,
                baseline: self.mean(),
                warming,
                likelihood: None,
                scale: (self.n > 1).then(|| self.var.sqrt()),
            };
        };
        if self.n == 0 {
            self.n = 1;
            self.mean = x;
            self.var = 0.0;
            return Score {
                score: Some(0.0),
                baseline: Some(x),
                warming,
                likelihood: None,
                scale: None,
            };
        }
        let baseline = self.mean;
        // One earlier reading says nothing about the spread.
        let scale = (self.n > 1).then(|| self.var.sqrt());
        let z = scale.map(|scale| standardise(x, baseline, scale));
        self.fold(x);
        Score {
            score: z,
            baseline: Some(baseline),
            warming,
            likelihood: None,
            scale,
        }
    }

    /// Moves the mean to `x`, keeping the variance (a new level, same noise).
    pub fn set_level(&mut self, x: f64) {
        self.mean = x;
    }

    /// Folds `x` in without scoring it.
    pub fn fold(&mut self, x: f64) {
        if self.n == 0 {
            self.mean = x;
            self.var = 0.0;
        } else {
            // The first readings are averaged plainly (weight 1/n) until 1/n falls below alpha,
            // so the variance does not start biased towards zero.
            let alpha = self.alpha.max(1.0 / f64::from(self.n.saturating_add(1)));
            let d = x - self.mean;
            let inc = alpha * d;
            self.mean += inc;
            self.var = (1.0 - alpha) * (self.var + d * inc);
        }
        self.n = self.n.saturating_add(1);
    }
}
