//! State: open windows of a query, each holding mergeable partial aggregates per group.
//!
//! The state never holds raw events: each micro-batch is partially aggregated by DataFusion
//! and its partials are merged here. Each window also remembers, per input partition, the
//! smallest offset among its events, so the pipeline knows which offsets are safe to commit
//! (every event of an open window must be re-read after a restart).

pub mod window;

use std::collections::{BTreeMap, HashMap};

/// Mergeable partial aggregates of one group of the congestion query.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SegmentPartial {
    /// Detections.
    pub vehicles: i64,
    /// Sum of spot speeds (km/h) over detections that had one.
    pub speed_sum: f64,
    /// Detections that had a speed.
    pub speed_n: i64,
    /// Motorbike detections.
    pub motorbikes: i64,
}

impl SegmentPartial {
    /// Adds `other` into `self`.
    pub fn merge(&mut self, other: &SegmentPartial) {
        self.vehicles += other.vehicles;
        self.speed_sum += other.speed_sum;
        self.speed_n += other.speed_n;
        self.motorbikes += other.motorbikes;
    }
}

/// One open window.
#[derive(Debug, Clone, Default)]
pub struct WindowEntry {
    /// Partials by group key.
    pub groups: HashMap<String, SegmentPartial>,
    /// Smallest input offset per partition among the window's events.
    pub min_offsets: HashMap<i32, i64>,
}

/// The open windows of a query, by window start (epoch ms).
#[derive(Debug, Clone, Default)]
pub struct WindowState {
    windows: BTreeMap<i64, WindowEntry>,
}

impl WindowState {
    /// The entry of the window starting at `start`, created if needed.
    pub fn window_mut(&mut self, start: i64) -> &mut WindowEntry {
        self.windows.entry(start).or_default()
    }

    /// Removes and returns, in start order, every window that starts before `before`.
    pub fn close_before(&mut self, before: i64) -> Vec<(i64, WindowEntry)> {
        let open = self.windows.split_off(&before);
        std::mem::replace(&mut self.windows, open)
            .into_iter()
            .collect()
    }

    /// Smallest offset per partition still needed by an open window.
    pub fn min_offsets(&self) -> HashMap<i32, i64> {
        let mut out: HashMap<i32, i64> = HashMap::new();
        for entry in self.windows.values() {
            for (&p, &o) in &entry.min_offsets {
                out.entry(p).and_modify(|m| *m = (*m).min(o)).or_insert(o);
            }
        }
        out
    }

    /// Open windows.
    pub fn open_windows(&self) -> usize {
        self.windows.len()
    }

    /// (window, group) entries held.
    pub fn group_count(&self) -> usize {
        self.windows.values().map(|w| w.groups.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closing_frees_windows_and_offsets() {
        let mut s = WindowState::default();
        s.window_mut(0).min_offsets.insert(0, 5);
        s.window_mut(60_000).min_offsets.insert(0, 9);
        s.window_mut(60_000)
            .groups
            .insert("a".into(), SegmentPartial::default());
        assert_eq!(s.min_offsets().get(&0), Some(&5));
        let closed = s.close_before(60_000);
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].0, 0);
        assert_eq!(s.min_offsets().get(&0), Some(&9));
        assert_eq!(s.close_before(i64::MAX).len(), 1);
        assert_eq!((s.open_windows(), s.group_count()), (0, 0));
    }
}
