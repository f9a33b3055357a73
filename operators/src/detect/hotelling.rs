//! Hotelling's T² over several columns of one entity, learnt online and calibrated by the
//! χ² distribution.

use serde::{Deserialize, Serialize};

use super::{Score, VectorOut};

/// A multivariate detector for an entity whose columns move together (a pump's vibration,
/// current, pressure, temperature and flow; a machine's sensors): the distance of a reading
/// from the columns' recent mean, measured against their recent covariance (Hotelling's T²,
/// `rᵀ Σ⁻¹ r`), so that a change in how the columns relate (a flow that falls while the
/// current holds) stands out even when each column stays in its own range.
///
/// - **Learning**: the mean and covariance are exponentially weighted in *time* (half-life
///   `half_life_ms`; a reading older than the last learnt one is learnt without decay), one
///   reading at a time (a weighted Welford update), O(d²) per reading.
/// - **Score**: `√T²` (a Mahalanobis distance, in σ), after [`Hotelling::WARMUP`] learnt
///   readings. The covariance is regularised (its diagonal raised by
///   [`Hotelling::RIDGE`]) so that collinear columns do not make it singular.
/// - **Likelihood**: `P(χ²_d ≤ T²)` over the `d` columns present: for Gaussian noise around
///   a steady state, one reading in 10 000 reaches 0.9999.
/// - **Holding through an anomaly**: a reading at likelihood ≥ [`Hotelling::ENTER`] starts an
///   anomalous stretch, which ends at the first reading below [`Hotelling::LEAVE`]; during
///   it the detector does not learn, so a collective anomaly (a valve closed for minutes)
///   stays anomalous for as long as it lasts instead of becoming the new normal. After
///   [`Hotelling::HOLD_MS`] of one stretch it learns again: a lasting change is absorbed.
/// - A reading with missing columns is scored on the columns present and not learnt; one too
///   large to learn (beyond 10¹⁵⁰) is scored (likelihood 1) and not learnt; after a silence
///   long enough to forget (weight below 10 readings a column) it learns before it scores.
///
/// The columns are fixed by the key's first reading (at most [`Hotelling::MAX_COLUMNS`]). No
/// daily profile: for seasonal series (traffic, air) `anomaly_vector` fits better.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct Hotelling {
    half_life_ms: i64,
    /// Columns, fixed by the first reading.
    d: usize,
    /// Decayed weight of the readings learnt.
    weight: f64,
    /// Readings learnt (for the warm-up), saturating.
    learnt: u32,
    mean: Vec<f64>,
    /// Decayed co-moments, `d × d`, row-major.
    comoment: Vec<f64>,
    /// Time of the newest reading learnt.
    last_ms: Option<i64>,
    /// Start of the current anomalous stretch.
    anomalous_since: Option<i64>,
}

impl Clone for Hotelling {
    fn clone(&self) -> Self {
        let mut copy = Self {
            mean: Vec::new(),
            comoment: Vec::new(),
            ..*self
        };
        copy.clone_from(self);
        copy
    }

    /// Reuses the buffers of the means and co-moments.
    fn clone_from(&mut self, source: &Self) {
        let Self {
            half_life_ms,
            d,
            weight,
            learnt,
            mean,
            comoment,
            last_ms,
            anomalous_since,
        } = source;
        self.half_life_ms = *half_life_ms;
        self.d = *d;
        self.weight = *weight;
        self.learnt = *learnt;
        self.mean.clone_from(mean);
        self.comoment.clone_from(comoment);
        self.last_ms = *last_ms;
        self.anomalous_since = *anomalous_since;
    }
}

impl Hotelling {
    /// Readings learnt before a score is given.
    pub const WARMUP: u32 = 300;
    /// Relative ridge on the covariance's diagonal.
    pub const RIDGE: f64 = 1e-3;
    /// Likelihood that starts an anomalous stretch (the alert rules' default raise).
    pub const ENTER: f64 = 0.9999;
    /// Likelihood below which the stretch ends (the alert rules' default clear).
    pub const LEAVE: f64 = 0.99;
    /// Longest the detector stops learning for one anomalous stretch.
    pub const HOLD_MS: i64 = 30 * 60_000;
    /// The most columns a key keeps (its state is `O(d²)`).
    pub const MAX_COLUMNS: usize = 32;
    /// Weight (readings, discounted by age) per column below which it does not score.
    pub const MIN_WEIGHT_PER_COLUMN: f64 = 10.0;
    /// Default half-life of what it learns.
    pub const DEFAULT_HALF_LIFE_MS: i64 = 3_600_000;

    /// A detector whose memory halves every `half_life_ms` (at least 1 ms).
    pub fn new(half_life_ms: i64) -> Self {
        Self {
            half_life_ms: half_life_ms.max(1),
            d: 0,
            weight: 0.0,
            learnt: 0,
            mean: Vec::new(),
            comoment: Vec::new(),
            last_ms: None,
            anomalous_since: None,
        }
    }

    pub(crate) fn heap_size(&self) -> usize {
        (self.mean.capacity() + self.comoment.capacity()) * std::mem::size_of::<f64>()
    }

    /// Columns this detector was started with (0 before its first reading).
    pub fn width(&self) -> usize {
        self.d
    }

    /// Scores the readings `xs` (one per column) at `t_ms`, then learns from them unless they
    /// belong to an anomalous stretch or miss a column.
    pub fn update(&mut self, t_ms: i64, xs: &[Option<f64>]) -> VectorOut {
        if self.d == 0 {
            let d = xs.len().min(Self::MAX_COLUMNS);
            if d == 0 {
                return warming();
            }
            self.d = d;
            self.mean = vec![0.0; d];
            self.comoment = vec![0.0; d * d];
        }
        let d = self.d;
        let x: Vec<Option<f64>> = (0..d)
            .map(|i| xs.get(i).copied().flatten().filter(|v| v.is_finite()))
            .collect();
        let present: Vec<usize> = (0..d).filter(|i| x[*i].is_some()).collect();
        if present.is_empty() {
            return warming();
        }
        let mut out = warming();
        // Enough learnt, and not forgotten: after a silence of many half-lives the memory is
        // too thin to judge against (it is rebuilt first).
        if self.learnt >= Self::WARMUP
            && self.weight * self.decay_to(t_ms) >= Self::MIN_WEIGHT_PER_COLUMN * d as f64
        {
            out = self.score(t_ms, &x, &present);
        }
        let holding = self
            .anomalous_since
            .is_some_and(|since| t_ms.saturating_sub(since) < Self::HOLD_MS);
        // A reading too large to learn (its square overflows) is scored, not learnt.
        let learnable = x.iter().flatten().all(|v| v.abs() < 1e150);
        if present.len() == d && !holding && learnable {
            let values: Vec<f64> = x.iter().map(|v| v.unwrap_or_default()).collect();
            self.learn(t_ms, &values);
        }
        out
    }

    fn score(&mut self, t_ms: i64, x: &[Option<f64>], present: &[usize]) -> VectorOut {
        let k = present.len();
        let d = self.d;
        let mut cov = vec![0.0; k * k];
        for (a, &i) in present.iter().enumerate() {
            for (b, &j) in present.iter().enumerate() {
                cov[a * k + b] = self.comoment[i * d + j] / self.weight;
            }
        }
        let scale = (0..k).map(|a| cov[a * k + a].abs()).fold(0.0, f64::max);
        for a in 0..k {
            cov[a * k + a] += Self::RIDGE * cov[a * k + a].abs() + 1e-12 * scale.max(1e-12);
        }
        let r: Vec<f64> = present
            .iter()
            .map(|&i| x[i].unwrap_or_default() - self.mean[i])
            .collect();
        let Some(t2) = mahalanobis(&cov, &r, k) else {
            return warming();
        };
        let t2 = t2.max(0.0);
        let likelihood = 1.0 - chi2_sf(t2, k);
        // Leaving first: a stretch ends below LEAVE, one starts at ENTER.
        match self.anomalous_since {
            Some(_) if likelihood < Self::LEAVE => self.anomalous_since = None,
            None if likelihood >= Self::ENTER => self.anomalous_since = Some(t_ms),
            _ => {}
        }
        // The column furthest from its mean, in its own σ.
        let (column, _) =
            present
                .iter()
                .enumerate()
                .fold((present[0], f64::MIN), |(best, z_best), (a, &i)| {
                    let z = r[a].abs() / cov[a * k + a].sqrt().max(1e-300);
                    if z > z_best { (i, z) } else { (best, z_best) }
                });
        VectorOut {
            score: Score {
                score: Some(t2.sqrt().min(super::MAX_SCORE)),
                baseline: Some(self.mean[column]),
                warming: false,
                likelihood: Some(likelihood),
                // The column's own spread: the T² score is not in its units, but the
                // expected range of the column it names is.
                scale: Some(
                    (self.comoment[column * d + column] / self.weight)
                        .abs()
                        .sqrt(),
                ),
            },
            column: Some(column as u32 + 1),
        }
    }

    /// How much of the memory is left at `t_ms` (1 for a reading not newer than the last).
    fn decay_to(&self, t_ms: i64) -> f64 {
        match self.last_ms {
            Some(last) if t_ms > last => {
                0.5_f64.powf((t_ms - last) as f64 / self.half_life_ms as f64)
            }
            _ => 1.0,
        }
    }

    fn learn(&mut self, t_ms: i64, x: &[f64]) {
        let d = self.d;
        let decay = self.decay_to(t_ms);
        if self.last_ms.is_none_or(|last| t_ms > last) {
            self.last_ms = Some(t_ms);
        }
        self.weight = self.weight * decay + 1.0;
        for m in &mut self.comoment {
            *m *= decay;
        }
        let delta: Vec<f64> = x.iter().zip(&self.mean).map(|(x, m)| x - m).collect();
        for (m, dx) in self.mean.iter_mut().zip(&delta) {
            *m += dx / self.weight;
        }
        let after: Vec<f64> = x.iter().zip(&self.mean).map(|(x, m)| x - m).collect();
        for (row, dj) in self.comoment.chunks_exact_mut(d).zip(&delta) {
            for (cell, ai) in row.iter_mut().zip(&after) {
                *cell += dj * ai;
            }
        }
        self.learnt = self.learnt.saturating_add(1);
    }
}

fn warming() -> VectorOut {
    VectorOut {
        score: Score {
            warming: true,
            ..Score::default()
        },
        column: None,
    }
}

/// `rᵀ A⁻¹ r` for a symmetric positive definite `k × k` matrix `a` (row-major), by Cholesky;
/// `None` when it is not positive definite; infinite when the distance overflows.
fn mahalanobis(a: &[f64], r: &[f64], k: usize) -> Option<f64> {
    let mut l = vec![0.0; k * k];
    for i in 0..k {
        for j in 0..=i {
            let mut sum = (a[i * k + j] + a[j * k + i]) / 2.0;
            for p in 0..j {
                sum -= l[i * k + p] * l[j * k + p];
            }
            if i == j {
                if sum <= 0.0 || !sum.is_finite() {
                    return None;
                }
                l[i * k + i] = sum.sqrt();
            } else {
                l[i * k + j] = sum / l[j * k + j];
            }
        }
    }
    // Solve L y = r; T² = |y|².
    let mut y = vec![0.0; k];
    for i in 0..k {
        let mut sum = r[i];
        for p in 0..i {
            sum -= l[i * k + p] * y[p];
        }
        y[i] = sum / l[i * k + i];
    }
    let t2: f64 = y.iter().map(|v| v * v).sum();
    (!t2.is_nan()).then_some(t2)
}

/// `P(χ²_k > x)`: the regularised upper incomplete gamma function `Q(k/2, x/2)`.
pub(crate) fn chi2_sf(x: f64, k: usize) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    if x.is_infinite() {
        return 0.0;
    }
    gamma_q(k as f64 / 2.0, x / 2.0).clamp(0.0, 1.0)
}

/// `Q(a, x)` by its series below `a + 1` and its continued fraction above (as in Numerical
/// Recipes, §6.2).
fn gamma_q(a: f64, x: f64) -> f64 {
    let ln_prefix = a * x.ln() - x - ln_gamma(a);
    if x < a + 1.0 {
        let (mut sum, mut term, mut n) = (1.0 / a, 1.0 / a, a);
        for _ in 0..1000 {
            n += 1.0;
            term *= x / n;
            sum += term;
            if term.abs() < sum.abs() * 1e-15 {
                break;
            }
        }
        1.0 - sum * ln_prefix.exp()
    } else {
        let tiny = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / tiny;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..1000 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < tiny {
                d = tiny;
            }
            c = b + an / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            let step = d * c;
            h *= step;
            if (step - 1.0).abs() < 1e-15 {
                break;
            }
        }
        ln_prefix.exp() * h
    }
}

/// `ln Γ(x)` for `x > 0` (Lanczos, g = 7, n = 9).
fn ln_gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection.
        return (std::f64::consts::PI / (std::f64::consts::PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = G[0];
    let t = x + 7.5;
    for (i, g) in G.iter().enumerate().skip(1) {
        a += g / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chi2_tails_match_known_quantiles() {
        // Quantiles of χ² (df, x, upper tail): from standard tables.
        for (k, x, p) in [
            (1, 3.841_458_8, 0.05),
            (2, 9.210_340_4, 0.01),
            (8, 20.090_235, 0.01),
            (8, 26.124_482, 0.001),
            (8, 37.331_947, 1e-5),
            (3, 0.351_846_3, 0.95),
            (32, 53.485_772, 0.01),
        ] {
            let got = chi2_sf(x, k);
            assert!(
                (got - p).abs() / p < 1e-3,
                "df {k}, x {x}: {got} (expected {p})"
            );
        }
        assert_eq!(chi2_sf(0.0, 4), 1.0);
        assert!(chi2_sf(1e4, 8) < 1e-300 || chi2_sf(1e4, 8) == 0.0);
    }

    /// A deterministic stream of correlated pairs: b follows a, with its own small noise.
    /// A detector with half-life `half_life_ms` that has learnt 400 readings of [`pair`],
    /// one a second.
    fn trained(half_life_ms: i64) -> Hotelling {
        let mut d = Hotelling::new(half_life_ms);
        for i in 0..400 {
            let (a, b) = pair(i);
            d.update(i as i64 * 1_000, &[Some(a), Some(b)]);
        }
        d
    }

    fn pair(i: u64) -> (f64, f64) {
        // Two uniform draws from a simple LCG, turned into roughly Gaussian noise.
        let mut s = i
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let mut draw = || {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (s >> 11) as f64 / (1u64 << 53) as f64
        };
        let g = |u: [f64; 4]| u.iter().sum::<f64>() - 2.0;
        let a = 10.0 + 2.0 * g([draw(), draw(), draw(), draw()]);
        let b = 2.0 * a + 0.2 * g([draw(), draw(), draw(), draw()]);
        (a, b)
    }

    #[test]
    fn a_broken_relation_scores_and_a_collective_anomaly_is_held_until_it_ends() {
        let mut d = Hotelling::new(3_600_000);
        let mut t = 0;
        for i in 0..600 {
            let (a, b) = pair(i);
            let out = d.update(t, &[Some(a), Some(b)]);
            assert_eq!(out.score.warming, i < u64::from(Hotelling::WARMUP), "{i}");
            t += 1_000;
        }
        // Each column within its own range, but b no longer twice a: far off the relation.
        let out = d.update(t, &[Some(10.0), Some(24.0)]);
        let l = out.score.likelihood.expect("a likelihood");
        assert!(l > 0.9999, "likelihood {l}");
        assert_eq!(out.column, Some(2));
        // Ten minutes of it: still anomalous all along (not learnt).
        for _ in 0..600 {
            t += 1_000;
            let out = d.update(t, &[Some(10.0), Some(24.0)]);
            assert!(out.score.likelihood.expect("likelihood") > 0.9999);
        }
        // Back to normal: the stretch ends, and ordinary readings are ordinary.
        let mut high = 0;
        for i in 600..1200 {
            t += 1_000;
            let (a, b) = pair(i);
            let out = d.update(t, &[Some(a), Some(b)]);
            if out.score.likelihood.expect("likelihood") >= 0.9999 {
                high += 1;
            }
        }
        assert!(high <= 2, "{high} false highs after the anomaly");
        assert!(d.anomalous_since.is_none());
    }

    #[test]
    fn a_lasting_change_is_learnt_after_the_hold() {
        let mut d = Hotelling::new(600_000);
        let mut t = 0;
        for i in 0..400 {
            let (a, b) = pair(i);
            d.update(t, &[Some(a), Some(b)]);
            t += 1_000;
        }
        // The relation changes for good: anomalous for the hold, then learnt.
        let mut last = 1.0;
        for i in 400..(400 + 5_400) {
            let (a, b) = pair(i);
            last = d
                .update(t, &[Some(a), Some(b + 5.0)])
                .score
                .likelihood
                .expect("likelihood");
            t += 1_000;
        }
        assert!(
            last < 0.99,
            "still anomalous an hour and a half later: {last}"
        );
    }

    #[test]
    fn a_huge_reading_is_as_far_off_as_can_be_and_not_learnt_and_a_long_silence_warms_again() {
        let mut d = trained(600_000);
        let before = d.clone();
        let out = d.update(400_000, &[Some(1e200), Some(20.0)]);
        assert_eq!(out.score.likelihood, Some(1.0), "{out:?}");
        assert_eq!(out.column, Some(1));
        assert_eq!((d.learnt, &d.mean), (before.learnt, &before.mean));
        let (a, b) = pair(401);
        let out = d.update(401_000, &[Some(a), Some(b)]);
        assert!(out.score.likelihood.is_some_and(|l| l < 0.99), "{out:?}");
        // Off for a day (144 half-lives): the memory is gone, so it learns before it scores.
        let out = d.update(401_000 + 86_400_000, &[Some(a), Some(b)]);
        assert!(out.score.warming, "{out:?}");
        for i in 1..30 {
            let (a, b) = pair(500 + i);
            d.update(401_000 + 86_400_000 + i as i64 * 1_000, &[Some(a), Some(b)]);
        }
        let (a, b) = pair(600);
        let out = d.update(401_000 + 86_400_000 + 30_000, &[Some(a), Some(b)]);
        assert!(
            !out.score.warming && out.score.likelihood.is_some(),
            "{out:?}"
        );
    }

    #[test]
    fn missing_columns_are_scored_on_the_rest_and_not_learnt() {
        let mut d = trained(3_600_000);
        let before = d.clone();
        let out = d.update(400_000, &[None, Some(f64::NAN)]);
        assert!(out.score.warming && out.score.likelihood.is_none());
        let out = d.update(401_000, &[Some(10.0), None]);
        assert!(out.score.likelihood.is_some_and(|l| l < 0.99), "{out:?}");
        assert_eq!(out.column, Some(1));
        assert_eq!(d.learnt, before.learnt);
        assert_eq!(d.mean, before.mean);
    }
}
