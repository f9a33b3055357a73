//! Two-sided CUSUM for level shifts.

use serde::{Deserialize, Serialize};

use super::{Ewma, Score, standardise};

/// Two-sided CUSUM (Page, 1954) on readings standardised by a slow EWMA baseline:
/// `S⁺ = max(0, S⁺ + z − k)`, `S⁻ = max(0, S⁻ − z − k)`. The score is `S⁺` or `−S⁻`, whichever
/// is larger in magnitude, in standard deviations accumulated beyond the slack `k`: a shift of
/// δ σ reaches `h` after about `h / (δ − k)` readings. A single spike adds at most its clipped
/// z (`±4`), so it does not trigger alone. The baseline keeps adapting (weight `alpha`), so once
/// the series settles at its new level the sums drain and the score returns to zero; a shift
/// too large to be learnt that way restarts the baseline at the new level once the sum passes
/// [`Cusum::RESTART`].
///
/// O(1) time and memory. Warming until the baseline has `warmup` readings; the sums stay zero
/// meanwhile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cusum {
    slack: f64,
    baseline: Ewma,
    warmup: u32,
    pos: f64,
    neg: f64,
}

impl Cusum {
    /// Default slack `k`, in standard deviations (detects shifts of about 2k = 1 σ best).
    pub const DEFAULT_SLACK: f64 = 0.5;
    /// Default weight of the baseline's EWMA.
    pub const DEFAULT_ALPHA: f64 = 0.02;
    /// Default readings before the score is trusted.
    pub const DEFAULT_WARMUP: u32 = 20;
    /// Standardised readings are clipped to this before they are summed.
    pub const CLIP: f64 = 4.0;
    /// Past this sum the new level is taken as the baseline and the sums restart (a shift of
    /// many σ alarms for about `RESTART / (CLIP − k)` readings, then becomes the new normal).
    pub const RESTART: f64 = 50.0;

    /// A detector with slack `k` (σ), baseline weight `alpha`, warming for `warmup` readings.
    pub fn new(slack: f64, alpha: f64, warmup: u32) -> Self {
        Self {
            slack: slack.max(0.0),
            baseline: Ewma::new(alpha, 0),
            warmup,
            pos: 0.0,
            neg: 0.0,
        }
    }

    /// Scores `x` (the updated sums), then folds it into the baseline.
    pub fn update(&mut self, x: Option<f64>) -> Score {
        let warming = self.baseline.count() < self.warmup;
        let baseline = self.baseline.mean();
        let Some(x) = super::usable(x) else {
            return Score {
                score: None,
                baseline,
                warming,
                likelihood: None,
                scale: self.baseline.std().filter(|_| self.baseline.count() > 1),
            };
        };
        let (Some(mean), Some(std)) = (baseline, self.baseline.std()) else {
            self.baseline.fold(x);
            return Score {
                score: Some(0.0),
                baseline: Some(x),
                warming,
                likelihood: None,
                scale: None,
            };
        };
        // One earlier reading says nothing about the spread.
        let spread = (self.baseline.count() > 1).then_some(std);
        let z = standardise(x, mean, std).clamp(-Self::CLIP, Self::CLIP);
        if !warming {
            self.pos = (self.pos + z - self.slack).max(0.0);
            self.neg = (self.neg - z - self.slack).max(0.0);
        }
        // Once warm, a reading far out moves the baseline as if it were at the clip, so a shift
        // is not learnt faster than it is detected (the clip has a floor relative to the level,
        // so even a perfectly constant series learns its new level eventually).
        if warming {
            self.baseline.fold(x);
        } else {
            let reach = Self::CLIP * std.max(1e-3 * mean.abs()).max(1e-9);
            self.baseline.fold(x.clamp(mean - reach, mean + reach));
        }
        let score = if self.pos >= self.neg {
            self.pos
        } else {
            -self.neg
        };
        if self.pos.max(self.neg) > Self::RESTART {
            // The series has held its new level long enough to be the new normal: start again
            // from it, as a CUSUM does after it signals.
            self.baseline.set_level(x);
            self.pos = 0.0;
            self.neg = 0.0;
        }
        Score {
            score: Some(score),
            baseline: Some(mean),
            warming,
            likelihood: None,
            scale: spread,
        }
    }
}
