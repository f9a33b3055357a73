//! A per-key profile by time of day (and day of week), learnt online.

use serde::{Deserialize, Serialize};

use super::{Score, standardise};

const DAY_MS: i64 = 86_400_000;

/// Which cycle the profile follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Season {
    /// One profile for every day.
    Day,
    /// One profile per day of the week (takes two weeks to warm up).
    Week,
    /// Two profiles: Monday to Friday, and the weekend.
    DayType,
}

impl Season {
    /// Parses `day`, `week` or `daytype`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "day" => Some(Season::Day),
            "week" => Some(Season::Week),
            "daytype" | "day_type" | "weekday" => Some(Season::DayType),
            _ => None,
        }
    }

    fn profiles(self) -> usize {
        match self {
            Season::Day => 1,
            Season::Week => 7,
            Season::DayType => 2,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Bin {
    /// Profile mean and variance (of readings around the profile mean).
    mean: f64,
    var: f64,
    /// Completed occurrences folded into the profile.
    seen: u32,
    /// Which occurrence of the bin the accumulators below belong to.
    occurrence: i64,
    n: u32,
    sum: f64,
    sum_sq: f64,
    residual_sq: f64,
}

/// Seasonal baseline: the cycle (`Season`) is cut into bins of `bin` milliseconds of local
/// time (`offset` from UTC, e.g. +7 h for Hanoi); each bin keeps an exponentially weighted
/// profile of its level and spread across occurrences (days or weeks). A reading is scored
/// against its bin's profile: a jam at 8:00 is normal where 8:00 is always jammed, the same
/// speed at 3:00 is not.
///
/// Readings of the current occurrence of a bin are accumulated and folded into the profile when
/// the bin comes round again (weight `alpha` per occurrence, 1/n for the first ones); an
/// occurrence far from the profile is folded in clipped at 4 σ, so one bad day does not
/// rewrite the profile. O(1) time per reading; memory is one small record per bin.
///
/// Warming until the reading's bin has `min_seen` completed occurrences; meanwhile it scores
/// against what the current occurrence has shown so far.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Seasonal {
    season: Season,
    bin_ms: i64,
    offset_ms: i64,
    alpha: f64,
    min_seen: u32,
    bins: Vec<Bin>,
}

impl Seasonal {
    /// Default bin width: 15 minutes.
    pub const DEFAULT_BIN_MS: i64 = 15 * 60_000;
    /// Default weight of a new occurrence in the profile.
    pub const DEFAULT_ALPHA: f64 = 0.2;
    /// Default completed occurrences of a bin before its score is trusted.
    pub const DEFAULT_MIN_SEEN: u32 = 2;

    /// A profile over `season` in bins of `bin_ms` (clamped to 1 minute … 1 day, rounded to
    /// divide a day) in local time `offset_ms` from UTC.
    pub fn new(season: Season, bin_ms: i64, offset_ms: i64) -> Self {
        let mut bin_ms = bin_ms.clamp(60_000, DAY_MS);
        while DAY_MS % bin_ms != 0 {
            bin_ms -= 60_000;
        }
        Self {
            season,
            bin_ms,
            offset_ms,
            alpha: Self::DEFAULT_ALPHA,
            min_seen: Self::DEFAULT_MIN_SEEN,
            bins: Vec::new(),
        }
    }

    pub(crate) fn heap_size(&self) -> usize {
        self.bins.capacity() * std::mem::size_of::<Bin>()
    }

    fn bin_of(&self, t_ms: i64) -> (usize, i64) {
        let local = t_ms.saturating_add(self.offset_ms);
        let per_day = (DAY_MS / self.bin_ms) as usize;
        let in_day = (local.rem_euclid(DAY_MS) / self.bin_ms) as usize;
        // 1970-01-01 was a Thursday: day 0 is weekday 3 (Monday = 0).
        let weekday = (local.div_euclid(DAY_MS) + 3).rem_euclid(7) as usize;
        let profile = match self.season {
            Season::Day => 0,
            Season::Week => weekday,
            Season::DayType => usize::from(weekday >= 5),
        };
        (profile * per_day + in_day, local.div_euclid(self.bin_ms))
    }

    /// Scores `x` at `t_ms` against its bin's profile, then accumulates it.
    pub fn update(&mut self, t_ms: i64, x: Option<f64>) -> Score {
        if self.bins.is_empty() {
            let n = self.season.profiles() * (DAY_MS / self.bin_ms) as usize;
            self.bins = vec![Bin::default(); n];
        }
        let (index, occurrence) = self.bin_of(t_ms);
        let (alpha, min_seen) = (self.alpha, self.min_seen);
        let bin = &mut self.bins[index];
        if bin.occurrence != occurrence {
            fold(bin, alpha);
            bin.occurrence = occurrence;
        }
        let warming = bin.seen < min_seen;
        let (baseline, scale) = if bin.seen > 0 {
            (Some(bin.mean), bin.var.sqrt())
        } else if bin.n > 0 {
            let mean = bin.sum / f64::from(bin.n);
            let var = (bin.sum_sq / f64::from(bin.n) - mean * mean).max(0.0);
            (Some(mean), var.sqrt())
        } else {
            (None, 0.0)
        };
        let Some(x) = x.filter(|v| v.is_finite()) else {
            return Score {
                score: None,
                baseline,
                warming,
                likelihood: None,
                scale: baseline.map(|_| scale),
            };
        };
        let score = baseline.map_or(0.0, |b| standardise(x, b, scale));
        bin.n += 1;
        bin.sum += x;
        bin.sum_sq += x * x;
        if bin.seen > 0 {
            bin.residual_sq += score.clamp(-4.0, 4.0).powi(2) * bin.var;
        }
        Score {
            score: Some(score),
            baseline: Some(baseline.unwrap_or(x)),
            warming,
            likelihood: None,
            scale: baseline.map(|_| scale),
        }
    }
}

/// Folds a bin's finished occurrence into its profile.
fn fold(bin: &mut Bin, alpha: f64) {
    if bin.n > 0 {
        let n = f64::from(bin.n);
        let mean = bin.sum / n;
        if bin.seen == 0 {
            bin.mean = mean;
            bin.var = (bin.sum_sq / n - mean * mean).max(0.0);
        } else {
            let a = alpha.max(1.0 / f64::from(bin.seen + 1));
            let reach = 4.0 * bin.var.sqrt();
            let deviation = if reach > 0.0 {
                (mean - bin.mean).clamp(-reach, reach)
            } else {
                mean - bin.mean
            };
            // The spread is what readings showed around the profile, plus how far this
            // occurrence's level was from it.
            let spread = bin.residual_sq / n;
            let spread = if spread > 0.0 {
                spread
            } else {
                deviation * deviation
            };
            bin.mean += a * deviation;
            bin.var += a * (spread - bin.var);
        }
        bin.seen = bin.seen.saturating_add(1);
    }
    bin.n = 0;
    bin.sum = 0.0;
    bin.sum_sq = 0.0;
    bin.residual_sq = 0.0;
}
