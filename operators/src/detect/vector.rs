//! The default detector over several quantities of one entity.

use serde::{Deserialize, Serialize};

use super::{Combined, Score};

/// The default detector over several columns of one entity (a pump's sensors; a segment's
/// flow, speed and occupancy): each column through its own [`Combined`], and the entity's
/// likelihood the chance that *any* of them is that anomalous, bounded by Bonferroni:
/// `1 − min(1, d · min(1 − lᵢ))` over its `d` columns. So a threshold on it means at most the
/// same false-alert rate as on one column, however many columns there are.
///
/// Its score and baseline are those of the most anomalous column (the one with the highest
/// likelihood; by `|score|` while no column has a likelihood), reported by its 1-based
/// position. The number of columns is fixed by the key's first reading, at most
/// [`VectorScore::MAX_COLUMNS`] (the values of a row are data: an array column of a record must
/// not make a key's state unbounded); a later reading with fewer values counts the absent ones
/// as missing, and values beyond that number are ignored.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct VectorScore {
    offset_ms: i64,
    columns: Vec<Combined>,
}

impl Clone for VectorScore {
    fn clone(&self) -> Self {
        let Self { offset_ms, columns } = self;
        Self {
            offset_ms: *offset_ms,
            columns: columns.clone(),
        }
    }

    /// Reuses each column's buffers ([`Combined`]'s `clone_from`).
    fn clone_from(&mut self, source: &Self) {
        let Self { offset_ms, columns } = source;
        self.offset_ms = *offset_ms;
        self.columns.clone_from(columns);
    }
}

/// What [`VectorScore`] says about one reading.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct VectorOut {
    /// The combined verdict: the most anomalous column's score and baseline, and the
    /// entity's likelihood.
    pub score: Score,
    /// The most anomalous column, 1-based.
    pub column: Option<u32>,
}

impl VectorScore {
    /// The most columns a key's detector keeps (each is an [`anomaly_score`'s](Combined)
    /// state, about 9 KB).
    pub const MAX_COLUMNS: usize = 32;

    /// A detector in local time `offset_ms` from UTC (for the columns' daily profiles).
    pub fn new(offset_ms: i64) -> Self {
        Self {
            offset_ms,
            columns: Vec::new(),
        }
    }

    pub(crate) fn heap_size(&self) -> usize {
        self.columns
            .iter()
            .map(|c| std::mem::size_of::<Combined>() + c.heap_size())
            .sum()
    }

    /// Columns this detector was started with (0 before its first reading).
    pub fn width(&self) -> usize {
        self.columns.len()
    }

    /// Scores the readings `xs` (one per column) at `t_ms`, then learns from them.
    pub fn update(&mut self, t_ms: i64, xs: &[Option<f64>]) -> VectorOut {
        if self.columns.is_empty() {
            self.columns = vec![Combined::new(self.offset_ms); xs.len().min(Self::MAX_COLUMNS)];
        }
        let d = self.columns.len();
        let missing = std::iter::repeat(&None);
        let mut worst: Option<(usize, Score)> = None;
        let mut least_p: Option<f64> = None;
        let mut warming = false;
        for (i, (column, x)) in self
            .columns
            .iter_mut()
            .zip(xs.iter().chain(missing))
            .enumerate()
        {
            let s = column.update(t_ms, *x);
            warming |= s.warming;
            if let Some(l) = s.likelihood {
                least_p = Some(least_p.map_or(1.0 - l, |p: f64| p.min(1.0 - l)));
            }
            let worse = match &worst {
                None => s.score.is_some(),
                Some((_, w)) => match (s.likelihood, w.likelihood) {
                    (Some(a), Some(b)) => a > b,
                    (Some(_), None) => true,
                    (None, Some(_)) => false,
                    (None, None) => s.score.map_or(0.0, f64::abs) > w.score.map_or(0.0, f64::abs),
                },
            };
            if worse {
                worst = Some((i, s));
            }
        }
        let Some((i, s)) = worst else {
            return VectorOut {
                score: Score {
                    warming: true,
                    ..Score::default()
                },
                column: None,
            };
        };
        VectorOut {
            score: Score {
                score: s.score,
                baseline: s.baseline,
                warming,
                likelihood: least_p.map(|p| 1.0 - (d as f64 * p).min(1.0)),
                scale: s.scale,
            },
            column: Some(i as u32 + 1),
        }
    }
}
