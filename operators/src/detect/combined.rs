//! The default detector: seasonal baseline, robust residual scale and a CUSUM for shifts.

use serde::{Deserialize, Serialize};

use super::{Calibrator, Ewma, RollingMad, Score, Season, Seasonal, standardise};

/// The default detector, meant to work on traffic speed, occupancy, travel time and pollutant
/// series without per-series tuning:
///
/// 1. **Baseline**: the [`Seasonal`] daily profile (15-minute bins, local time) once the
///    reading's bin is warm; before that, a slow EWMA of the level (weight 0.05, fed readings
///    clipped at 6 robust σ).
/// 2. **Residual** `r = x − baseline`, standardised robustly against the last 120 residuals:
///    `z = (r − median) / (1.4826 · MAD)`, the scale floored at 2 % of the baseline so that
///    quantised or near-constant series do not give absurd scores (a change of less than 8 %
///    of the level never scores 4 on its own). Subtracting the residuals'
///    median lets it tolerate a baseline that is biased for a while (a weekend against a
///    weekday profile, a trend).
/// 3. **Shift**: a two-sided CUSUM on `z` clipped at ±4 (slack 1); a sustained deviation too
///    small to stand out reading by reading accumulates. Reported as `S / 2`, so that 4 means
///    `S = 8`, e.g. eight readings 2 σ off. The sums are capped at 16, so the alarm ends within a
///    few readings of the series coming back. The shift part waits for the seasonal profile of
///    the reading's time of day: before it, a slow change (a rush hour building up on the first
///    day) cannot be told from the daily cycle, and only sudden deviations score.
///
/// The score is the spike score `z` or the shift score, whichever is larger in magnitude,
/// signed (negative below the baseline, e.g. a speed collapse).
///
/// 4. **Likelihood**: `|score|` calibrated against this series' own history of scores
///    ([`Calibrator`], forgetting over 30 days), so that one threshold means the same on
///    every series: alert on `likelihood ≥ 0.9999` (about one reading in 10 000 of a series
///    without anomalies), whatever the series' scale, noise or tails. The raw score's scale
///    is not comparable across series (a heavy-tailed or near-constant series reaches tens of
///    σ in normal operation). No likelihood for the first 300 scored readings.
///
/// O(120) time every 8 readings (the MAD of the residual window), O(bins) for the
/// likelihood, O(1) otherwise; warming for the first 30 readings.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct Combined {
    seasonal: Seasonal,
    level: Ewma,
    residuals: RollingMad,
    pos: f64,
    neg: f64,
    n: u32,
    /// The residuals' (median, scale), refreshed every [`Combined::REFRESH`] readings.
    spread: Option<(f64, f64)>,
    since_refresh: u32,
    /// The calibration of `|score|` into a likelihood.
    #[serde(default)]
    calibration: Calibrator,
}

impl Clone for Combined {
    fn clone(&self) -> Self {
        // Every field is set by `clone_from`, into buffers of the sizes it needs.
        let mut copy = Self::new(0);
        copy.clone_from(self);
        copy
    }

    /// Reuses the buffers of the profile, the residual window and the histogram: a key's
    /// state copied while a checkpoint holds it then touches no fresh memory.
    fn clone_from(&mut self, source: &Self) {
        let Self {
            seasonal,
            level,
            residuals,
            pos,
            neg,
            n,
            spread,
            since_refresh,
            calibration,
        } = source;
        self.seasonal.clone_from(seasonal);
        self.level.clone_from(level);
        self.residuals.clone_from(residuals);
        self.pos = *pos;
        self.neg = *neg;
        self.n = *n;
        self.spread = *spread;
        self.since_refresh = *since_refresh;
        self.calibration.clone_from(calibration);
    }
}

impl Combined {
    /// Readings before the score is trusted.
    pub const WARMUP: u32 = 30;
    /// Readings between two computations of the residuals' median and MAD (a selection over
    /// the window each time): the spread of 120 residuals barely moves in 8.
    pub const REFRESH: u32 = 8;
    /// Residuals in the robust scale's window.
    pub const RESIDUAL_WINDOW: usize = 120;
    /// CUSUM slack, in robust σ: shifts of about 2 σ and more accumulate; the slow wander of
    /// weather and demand around a daily profile does not.
    pub const SLACK: f64 = 1.0;
    /// The CUSUM sums stop here (a shift score of 8), so that once a shift ends the sum drains
    /// in a few readings instead of alarming long after the series is back.
    pub const MAX_SUM: f64 = 16.0;
    /// Scale floor relative to the baseline's magnitude.
    pub const RELATIVE_FLOOR: f64 = 0.02;

    /// The default detector in local time `offset_ms` from UTC.
    pub fn new(offset_ms: i64) -> Self {
        Self {
            seasonal: Seasonal::new(Season::Day, Seasonal::DEFAULT_BIN_MS, offset_ms),
            level: Ewma::new(0.05, 0),
            residuals: RollingMad::new(Self::RESIDUAL_WINDOW, 0),
            pos: 0.0,
            neg: 0.0,
            n: 0,
            spread: None,
            since_refresh: 0,
            calibration: Calibrator::default(),
        }
    }

    pub(crate) fn heap_size(&self) -> usize {
        self.seasonal.heap_size() + self.residuals.heap_size() + self.calibration.heap_size()
    }

    /// Scores `x` at `t_ms`, then learns from it.
    pub fn update(&mut self, t_ms: i64, x: Option<f64>) -> Score {
        let seasonal = self.seasonal.update(t_ms, x);
        let warming = self.n < Self::WARMUP;
        let baseline = match seasonal {
            Score {
                warming: false,
                baseline: Some(b),
                ..
            } => Some(b),
            _ => self.level.mean(),
        };
        let Some(x) = super::usable(x) else {
            return Score {
                score: None,
                baseline: baseline.map(|b| b + self.spread.map_or(0.0, |(centre, _)| centre)),
                warming,
                likelihood: None,
                scale: self
                    .spread
                    .zip(baseline)
                    .map(|((_, scale), b)| scale.max(Self::RELATIVE_FLOOR * b.abs())),
            };
        };
        self.n = self.n.saturating_add(1);
        let Some(baseline) = baseline else {
            self.level.fold(x);
            return Score {
                score: Some(0.0),
                baseline: Some(x),
                warming,
                likelihood: None,
                scale: None,
            };
        };
        let residual = x - baseline;
        if self.spread.is_none() || self.since_refresh >= Self::REFRESH || self.n <= Self::WARMUP {
            self.spread = self.residuals.location_scale();
            self.since_refresh = 0;
        }
        self.since_refresh += 1;
        let (centre, scale) = self.spread.unwrap_or((0.0, 0.0));
        let scale = scale.max(Self::RELATIVE_FLOOR * baseline.abs());
        let z = standardise(residual, centre, scale);
        let reach = 6.0 * scale;
        self.residuals
            .push(residual.clamp(centre - reach, centre + reach));
        let level = self.level.mean().unwrap_or(x);
        self.level.fold(x.clamp(level - reach, level + reach));
        if seasonal.warming {
            // Without a profile, a slow change is the daily cycle as often as an anomaly: only
            // sudden deviations count until the reading's time of day is known.
            self.pos = 0.0;
            self.neg = 0.0;
        } else if !warming {
            let clipped = z.clamp(-4.0, 4.0);
            self.pos = (self.pos + clipped - Self::SLACK).clamp(0.0, Self::MAX_SUM);
            self.neg = (self.neg - clipped - Self::SLACK).clamp(0.0, Self::MAX_SUM);
        }
        let shift = if self.pos >= self.neg {
            self.pos / 2.0
        } else {
            -self.neg / 2.0
        };
        let score = if z.abs() >= shift.abs() { z } else { shift };
        let likelihood = if warming {
            None
        } else {
            let l = self.calibration.likelihood(score.abs());
            self.calibration.learn(t_ms, score.abs());
            l
        };
        Score {
            score: Some(score),
            baseline: Some(baseline + centre),
            warming,
            likelihood,
            scale: Some(scale),
        }
    }
}
