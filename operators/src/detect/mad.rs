//! Rolling median and median absolute deviation over the last readings.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use super::{Score, standardise};

/// Robust score: `(x - median) / (1.4826 · MAD)` over the last `window` readings, the reading
/// itself excluded. A spike barely moves the median or the MAD, so it stands out even among
/// other spikes; a level shift is absorbed once it fills half the window.
///
/// O(window) time per reading (a selection, not a sort) and O(window) memory. When more than
/// half the window is one value the MAD is zero; the scale then falls back to the mean absolute
/// deviation (× 1.2533, the normal-consistent factor).
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct RollingMad {
    window: usize,
    warmup: usize,
    values: VecDeque<f64>,
}

impl Clone for RollingMad {
    fn clone(&self) -> Self {
        // Every field is set by `clone_from`.
        let mut copy = Self::new(self.window, self.warmup);
        copy.clone_from(self);
        copy
    }

    /// Reuses the window's buffer (a key's state copied while a checkpoint holds it).
    fn clone_from(&mut self, source: &Self) {
        let Self {
            window,
            warmup,
            values,
        } = source;
        self.window = *window;
        self.warmup = *warmup;
        self.values.clone_from(values);
    }
}

thread_local! {
    /// Scratch space for the selections of [`RollingMad::location_scale`]: a thread's, not
    /// each key's.
    static SCRATCH: std::cell::RefCell<Vec<f64>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl RollingMad {
    /// Default readings in the window.
    pub const DEFAULT_WINDOW: usize = 60;
    /// Default readings before the score is trusted.
    pub const DEFAULT_WARMUP: usize = 10;

    /// A detector over the last `window` readings (at least 3), warming for `warmup`.
    pub fn new(window: usize, warmup: usize) -> Self {
        let window = window.max(3);
        Self {
            window,
            warmup: warmup.min(window),
            values: VecDeque::with_capacity(window),
        }
    }

    pub(crate) fn heap_size(&self) -> usize {
        self.values.capacity() * std::mem::size_of::<f64>()
    }

    /// Median and robust scale of the window, if it holds anything.
    pub fn location_scale(&self) -> Option<(f64, f64)> {
        if self.values.is_empty() {
            return None;
        }
        SCRATCH.with_borrow_mut(|scratch| {
            scratch.clear();
            scratch.extend(self.values.iter().copied());
            let median = median_in_place(scratch);
            for v in scratch.iter_mut() {
                *v = (*v - median).abs();
            }
            let mad = median_in_place(scratch);
            let scale = if mad > 0.0 {
                1.4826 * mad
            } else {
                let n = scratch.len() as f64;
                1.2533 * scratch.iter().sum::<f64>() / n
            };
            Some((median, scale))
        })
    }

    /// Pushes `x` into the window, dropping the oldest reading when full.
    pub fn push(&mut self, x: f64) {
        if self.values.len() == self.window {
            self.values.pop_front();
        }
        self.values.push_back(x);
    }

    /// Readings in the window.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether the window is empty.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Scores `x` against the window, then pushes it.
    pub fn update(&mut self, x: Option<f64>) -> Score {
        let warming = self.values.len() < self.warmup;
        let Some(x) = super::usable(x) else {
            let spread = self.location_scale();
            return Score {
                score: None,
                baseline: spread.map(|(m, _)| m),
                warming,
                likelihood: None,
                scale: spread.filter(|_| self.values.len() >= 2).map(|(_, s)| s),
            };
        };
        let out = match self.location_scale() {
            // One earlier reading says nothing about the spread.
            Some((median, _)) if self.values.len() < 2 => Score {
                score: None,
                baseline: Some(median),
                warming,
                likelihood: None,
                scale: None,
            },
            Some((median, scale)) => Score {
                score: Some(standardise(x, median, scale)),
                baseline: Some(median),
                warming,
                likelihood: None,
                scale: Some(scale),
            },
            None => Score {
                score: Some(0.0),
                baseline: Some(x),
                warming,
                likelihood: None,
                scale: None,
            },
        };
        self.push(x);
        out
    }
}

/// The median of `values` (reordered); the mean of the two middle values for an even count.
fn median_in_place(values: &mut [f64]) -> f64 {
    let n = values.len();
    let mid = n / 2;
    let (lower, m, _) = values.select_nth_unstable_by(mid, f64::total_cmp);
    let m = *m;
    if n % 2 == 1 {
        m
    } else {
        let below = lower.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (below + m) / 2.0
    }
}
