//! A per-key profile by time of day (and day of week), learnt online.

use serde::ser::SerializeStruct;
use serde::{Deserialize, Serialize, Serializer};

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
///
/// Serialised (for checkpoints) with only the bins that hold anything, each as a tuple
/// without field names ([`BinAt`]); the form with every bin by name, written before, is
/// still read.
#[derive(Debug, PartialEq, Deserialize)]
#[serde(try_from = "SeasonalRepr")]
pub struct Seasonal {
    season: Season,
    bin_ms: i64,
    offset_ms: i64,
    alpha: f64,
    min_seen: u32,
    bins: Vec<Bin>,
}

impl Clone for Seasonal {
    fn clone(&self) -> Self {
        let mut copy = Self::new(self.season, self.bin_ms, self.offset_ms);
        copy.clone_from(self);
        copy
    }

    /// Reuses the profile's buffer (a key's state copied while a checkpoint holds it).
    fn clone_from(&mut self, source: &Self) {
        let Self {
            season,
            bin_ms,
            offset_ms,
            alpha,
            min_seen,
            bins,
        } = source;
        self.season = *season;
        self.bin_ms = *bin_ms;
        self.offset_ms = *offset_ms;
        self.alpha = *alpha;
        self.min_seen = *min_seen;
        self.bins.clone_from(bins);
    }
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
        let Some(x) = super::usable(x) else {
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

impl Serialize for Seasonal {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut out = serializer.serialize_struct("Seasonal", 7)?;
        out.serialize_field("season", &self.season)?;
        out.serialize_field("bin_ms", &self.bin_ms)?;
        out.serialize_field("offset_ms", &self.offset_ms)?;
        out.serialize_field("alpha", &self.alpha)?;
        out.serialize_field("min_seen", &self.min_seen)?;
        out.serialize_field("len", &self.bins.len())?;
        out.serialize_field("profile", &Profile(&self.bins))?;
        out.end()
    }
}

/// The bins of a profile that hold anything, as [`BinAt`]s.
struct Profile<'a>(&'a [Bin]);

impl Serialize for Profile<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let empty = Bin::default();
        serializer.collect_seq(
            self.0
                .iter()
                .enumerate()
                .filter(|(_, bin)| **bin != empty)
                .map(|(i, b)| {
                    BinAt(
                        i as u32,
                        b.mean,
                        b.var,
                        b.seen,
                        b.occurrence,
                        b.n,
                        b.sum,
                        b.sum_sq,
                        b.residual_sq,
                    )
                }),
        )
    }
}

/// One bin in a serialised profile: its index, then the fields of [`Bin`] in order.
#[derive(Serialize, Deserialize)]
struct BinAt(u32, f64, f64, u32, i64, u32, f64, f64, f64);

/// What a serialised [`Seasonal`] holds: the bins by index (`len`, `profile`), or, as
/// written before, every bin by name (`bins`).
#[derive(Deserialize)]
struct SeasonalRepr {
    season: Season,
    bin_ms: i64,
    offset_ms: i64,
    alpha: f64,
    min_seen: u32,
    #[serde(default)]
    bins: Vec<Bin>,
    #[serde(default)]
    len: usize,
    #[serde(default)]
    profile: Vec<BinAt>,
}

impl TryFrom<SeasonalRepr> for Seasonal {
    type Error = String;

    fn try_from(r: SeasonalRepr) -> Result<Self, String> {
        // As `Seasonal::new` makes them: whole minutes that divide a day.
        if r.bin_ms < 60_000 || r.bin_ms > DAY_MS || DAY_MS % r.bin_ms != 0 {
            return Err(format!("a seasonal profile in bins of {} ms", r.bin_ms));
        }
        let expected = r.season.profiles() * (DAY_MS / r.bin_ms) as usize;
        let len = if r.bins.is_empty() {
            r.len
        } else {
            r.bins.len()
        };
        if len != 0 && len != expected {
            return Err(format!(
                "a seasonal profile of {len} bins where its season and bin width make {expected}"
            ));
        }
        if len == 0 && !r.profile.is_empty() {
            return Err("a seasonal profile with bins but no length".into());
        }
        let bins = if r.bins.is_empty() && r.len > 0 {
            let mut bins = vec![Bin::default(); r.len];
            for BinAt(i, mean, var, seen, occurrence, n, sum, sum_sq, residual_sq) in r.profile {
                let Some(bin) = bins.get_mut(i as usize) else {
                    return Err(format!("seasonal bin {i} of {}", r.len));
                };
                *bin = Bin {
                    mean,
                    var,
                    seen,
                    occurrence,
                    n,
                    sum,
                    sum_sq,
                    residual_sq,
                };
            }
            bins
        } else {
            r.bins
        };
        Ok(Self {
            season: r.season,
            bin_ms: r.bin_ms,
            offset_ms: r.offset_ms,
            alpha: r.alpha,
            min_seen: r.min_seen,
            bins,
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::Combined;

    const MIN: i64 = 60_000;

    fn cbor<T: Serialize>(value: &T) -> Vec<u8> {
        let mut bytes = Vec::new();
        ciborium::into_writer(value, &mut bytes).expect("encodes");
        bytes
    }

    fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> T {
        ciborium::from_reader(bytes).expect("decodes")
    }

    /// A speed with a daily cycle and noise, one reading a minute.
    fn speed(i: i64) -> f64 {
        let day = (i % 1440) as f64 / 1440.0;
        40.0 - 15.0 * (std::f64::consts::TAU * day).sin().max(0.0) + ((i * 7919) % 13) as f64 / 4.0
    }

    /// Seasonal profiles as checkpoints wrote them before the sparse form: every bin by name.
    #[derive(Serialize)]
    struct Named<'a> {
        season: Season,
        bin_ms: i64,
        offset_ms: i64,
        alpha: f64,
        min_seen: u32,
        bins: &'a [Bin],
    }

    fn named(s: &Seasonal) -> Named<'_> {
        Named {
            season: s.season,
            bin_ms: s.bin_ms,
            offset_ms: s.offset_ms,
            alpha: s.alpha,
            min_seen: s.min_seen,
            bins: &s.bins,
        }
    }

    #[test]
    fn profiles_round_trip_sparse_and_read_the_named_form() {
        let t0 = 1_767_225_600_000; // 2026-01-01T00:00Z
        // Fresh, one hour in (4 of 96 bins used), and three days in (every bin used); daily
        // and weekly profiles.
        for (season, minutes) in [
            (Season::Day, 0),
            (Season::Day, 60),
            (Season::Day, 3 * 1440),
            (Season::Week, 3 * 1440),
        ] {
            let mut s = Seasonal::new(season, Seasonal::DEFAULT_BIN_MS, 7 * 3_600_000);
            for i in 0..minutes {
                s.update(t0 + i * MIN, Some(speed(i)));
            }
            let sparse = cbor(&s);
            let mut back: Seasonal = decode(&sparse);
            assert_eq!(back, s, "{season:?} after {minutes} minutes");
            let old = cbor(&named(&s));
            let mut from_old: Seasonal = decode(&old);
            assert_eq!(
                from_old, s,
                "named form, {season:?} after {minutes} minutes"
            );
            // Both go on exactly as the original does.
            for i in minutes..minutes + 120 {
                let t = t0 + i * MIN;
                let expected = s.update(t, Some(speed(i)));
                assert_eq!(back.update(t, Some(speed(i))), expected);
                assert_eq!(from_old.update(t, Some(speed(i))), expected);
            }
            // A fresh profile (no bins yet) takes a few bytes more than before.
            assert!(
                minutes == 0 || sparse.len() <= old.len(),
                "{} bytes sparse against {} named",
                sparse.len(),
                old.len()
            );
            eprintln!(
                "{season:?} profile after {minutes} minutes: {} bytes (every bin by name: {})",
                sparse.len(),
                old.len()
            );
        }
    }

    /// What the default detector's state per key takes in a checkpoint (its profile the
    /// larger part), fresh and after days of minutes; printed for benches/README.md.
    #[test]
    fn default_detector_state_bytes_per_key() {
        let t0 = 1_767_225_600_000;
        for minutes in [1, 60, 1440, 7 * 1440] {
            let mut d = Combined::new(7 * 3_600_000);
            let mut s = Seasonal::new(Season::Day, Seasonal::DEFAULT_BIN_MS, 7 * 3_600_000);
            for i in 0..minutes {
                let (t, x) = (t0 + i * MIN, Some(speed(i)));
                d.update(t, x);
                s.update(t, x);
            }
            let whole = cbor(&d).len();
            let (sparse, old) = (cbor(&s).len(), cbor(&named(&s)).len());
            let back: Combined = decode(&cbor(&d));
            assert_eq!(back, d);
            assert!(sparse <= old);
            eprintln!(
                "anomaly_score after {minutes} minutes: {whole} bytes a key ({} with every \
                 profile bin by name)",
                whole - sparse + old
            );
        }
    }

    #[test]
    fn a_profile_of_the_wrong_size_is_refused() {
        let mut s = Seasonal::new(Season::Day, Seasonal::DEFAULT_BIN_MS, 0);
        s.update(0, Some(1.0));
        s.bins.pop();
        let error = ciborium::from_reader::<Seasonal, _>(cbor(&s).as_slice()).unwrap_err();
        assert!(error.to_string().contains("95 bins"), "{error}");
        // Bins of a width `Seasonal::new` never makes (a profile of a million bins) too.
        let mut s = Seasonal::new(Season::Day, Seasonal::DEFAULT_BIN_MS, 0);
        s.bin_ms = 1;
        let error = ciborium::from_reader::<Seasonal, _>(cbor(&s).as_slice()).unwrap_err();
        assert!(error.to_string().contains("bins of 1 ms"), "{error}");
    }
}
