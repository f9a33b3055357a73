//! Time: event-time watermarks.
//!
//! [`WatermarkTracker`] keeps, per input partition, the largest event time seen; the
//! partition's watermark is that minus the allowed out-of-orderness. The query watermark is the
//! minimum over partitions that are not idle: a partition that has had no record for the idle
//! timeout (processing time) stops holding the watermark back. The watermark never goes
//! backwards. Processing time is passed in explicitly (epoch ms), so a test can drive it.

pub mod display;

use std::collections::HashMap;
use std::time::Duration;

/// The earliest event time a query places in time: 0001-01-01T00:00:00Z, in epoch ms. Window
/// arithmetic on times near `i64::MIN` would overflow. (The decoders refuse a record stamped
/// before 1990 already; this bounds every other way in.)
pub const EARLIEST_EVENT_MS: i64 = -62_135_596_800_000;

/// The latest event time a query places in time: 9999-12-31T23:59:59.999Z, in epoch ms.
pub const LATEST_EVENT_MS: i64 = 253_402_300_799_999;

/// Whether a query places an event at `t` (epoch ms) in time: the years 0001 to 9999.
pub fn in_time_range(t: i64) -> bool {
    (EARLIEST_EVENT_MS..=LATEST_EVENT_MS).contains(&t)
}

/// Event-time watermark over the partitions of a query's input.
#[derive(Debug, Clone)]
pub struct WatermarkTracker {
    delay_ms: i64,
    idle_ms: i64,
    partitions: HashMap<i32, PartitionTime>,
    watermark: Option<i64>,
}

#[derive(Debug, Clone, Copy)]
struct PartitionTime {
    max_event_ms: i64,
    /// From when it holds the watermark for an idle timeout: its last delivery, or later
    /// when it is expected or another delivers after a spell of silence.
    last_seen_ms: i64,
    /// When it last delivered (`i64::MIN` before it has).
    delivered_ms: i64,
}

impl WatermarkTracker {
    /// A tracker allowing `delay` of out-of-orderness, with partitions idle after
    /// `idle_timeout` without records.
    pub fn new(delay: Duration, idle_timeout: Duration) -> Self {
        Self {
            delay_ms: i64::try_from(delay.as_millis()).unwrap_or(i64::MAX),
            idle_ms: i64::try_from(idle_timeout.as_millis()).unwrap_or(i64::MAX),
            partitions: HashMap::new(),
            watermark: None,
        }
    }

    /// Records that `partition` has seen events up to `max_event_ms` at processing time
    /// `now_ms`.
    ///
    /// A partition is idle when it has delivered nothing for the idle timeout while others
    /// went on: when every partition has been silent that long and one delivers again, the
    /// others hold the watermark again for an idle timeout from then, as had they just
    /// delivered. Their records of the same burst, read a moment later, are then not late
    /// against the first one's (most of a burst after a quiet minute went to the late topic).
    pub fn observe(&mut self, partition: i32, max_event_ms: i64, now_ms: i64) {
        if self.idle_ms < i64::MAX && self.is_idle(now_ms) == Some(true) {
            for p in self.partitions.values_mut() {
                p.last_seen_ms = p.last_seen_ms.max(now_ms);
            }
        }
        let entry = self.partitions.entry(partition).or_insert(PartitionTime {
            max_event_ms,
            last_seen_ms: now_ms,
            delivered_ms: now_ms,
        });
        entry.max_event_ms = entry.max_event_ms.max(max_event_ms);
        entry.last_seen_ms = now_ms;
        entry.delivered_ms = now_ms;
    }

    /// Makes `partition` hold the watermark back from processing time `now_ms` on until it
    /// delivers (or goes idle), though nothing of it has been seen yet: an input whose
    /// partitions are all known in advance does not let the first ones to deliver run ahead.
    /// A partition known already (restored from a checkpoint, taken up again) holds it at its
    /// newest event time from `now_ms` on, idle or not before.
    pub fn expect(&mut self, partition: i32, now_ms: i64) {
        let entry = self.partitions.entry(partition).or_insert(PartitionTime {
            max_event_ms: i64::MIN,
            last_seen_ms: now_ms,
            delivered_ms: i64::MIN,
        });
        entry.last_seen_ms = entry.last_seen_ms.max(now_ms);
    }

    /// Raises the watermark to at least `watermark` (an explicit advance, e.g. from a test or
    /// a source that knows no older data will come).
    pub fn force(&mut self, watermark: i64) {
        self.watermark = Some(self.watermark.map_or(watermark, |w| w.max(watermark)));
    }

    /// Recomputes the watermark at processing time `now_ms` and returns it (`None` until some
    /// partition has data). Idle partitions are left out; if all are idle the watermark holds
    /// (it only follows events stamped ahead of the clock, up to processing time). A
    /// partition's newest event time counts up to `now_ms`.
    pub fn advance(&mut self, now_ms: i64) -> Option<i64> {
        // A partition's newest event time counts up to processing time only: an event stamped
        // ahead of the clock moves the watermark as the clock reaches its time.
        let mark = |p: &PartitionTime| p.max_event_ms.min(now_ms).saturating_sub(self.delay_ms);
        let active = self
            .partitions
            .values()
            .filter(|p| now_ms.saturating_sub(p.last_seen_ms) < self.idle_ms)
            .map(mark)
            .min();
        // With every partition idle, the lowest of those that delivered last (within an idle
        // timeout of the last delivery): it holds the watermark where it is, but lets it
        // follow events ahead of the clock that processing time has reached. A partition
        // silent an idle timeout before the last delivery was idle then and stays so (one that
        // went quiet before a closing marker on another held its windows open for good); one
        // that never delivered has no time to hold it at (an empty partition of a topic read
        // to its end held a single-state query's watermark at nothing for good).
        let active = active.or_else(|| {
            let delivered = self
                .partitions
                .values()
                .filter(|p| p.max_event_ms != i64::MIN);
            let last = delivered.clone().map(|p| p.delivered_ms).max()?;
            delivered
                .filter(|p| last.saturating_sub(p.delivered_ms) < self.idle_ms)
                .map(mark)
                .min()
        });
        if let Some(candidate) = active {
            self.watermark = Some(self.watermark.map_or(candidate, |w| w.max(candidate)));
        }
        self.watermark
    }

    /// When a partition last delivered (`None` before one has).
    pub fn last_delivered(&self) -> Option<i64> {
        self.partitions
            .values()
            .filter(|p| p.max_event_ms != i64::MIN)
            .map(|p| p.delivered_ms)
            .filter(|t| *t != i64::MIN)
            .max()
    }

    /// How long a partition may be silent before it no longer holds the watermark, in ms.
    pub fn idle_ms(&self) -> i64 {
        self.idle_ms
    }

    /// Whether every partition seen has been silent for the idle timeout at `now_ms` (`None`
    /// before any record).
    pub fn is_idle(&self, now_ms: i64) -> Option<bool> {
        if self.partitions.is_empty() {
            return None;
        }
        Some(
            self.partitions
                .values()
                .all(|p| now_ms.saturating_sub(p.last_seen_ms) >= self.idle_ms),
        )
    }

    /// The highest watermark events up to `newest` could make at processing time `now_ms`,
    /// whatever their partitions: an upper bound, to tell cheaply that a batch moves it past
    /// nothing. The partitions active now hold it at the lowest of their newest times (each
    /// raised to `newest` at most); one idle now only lowers it if it delivers.
    pub fn reachable(&self, newest: i64, now_ms: i64) -> i64 {
        let newest = newest.min(now_ms);
        let lowest = self
            .partitions
            .values()
            .filter(|p| now_ms.saturating_sub(p.last_seen_ms) < self.idle_ms)
            .map(|p| p.max_event_ms.min(now_ms).max(newest))
            .min()
            .unwrap_or(newest);
        self.watermark
            .unwrap_or(i64::MIN)
            .max(lowest.saturating_sub(self.delay_ms))
    }

    /// The current watermark, as of the last [`WatermarkTracker::advance`].
    pub fn current(&self) -> Option<i64> {
        self.watermark
    }

    /// The watermark and, per partition, the largest event time and when it was last seen,
    /// at processing time `now_ms`, for a checkpoint.
    pub fn snapshot(&self, now_ms: i64) -> serde_json::Value {
        let mut partitions: Vec<(i32, i64, i64)> = self
            .partitions
            .iter()
            .map(|(p, t)| (*p, t.max_event_ms, t.last_seen_ms))
            .collect();
        partitions.sort_unstable();
        // Apart, so that a checkpoint stays readable by a version without them.
        let mut delivered: Vec<(i32, i64)> = self
            .partitions
            .iter()
            .map(|(p, t)| (*p, t.delivered_ms))
            .collect();
        delivered.sort_unstable();
        serde_json::json!({
            "watermark": self.watermark,
            "partitions": partitions,
            "delivered": delivered,
            "taken_at_ms": now_ms,
        })
    }

    /// Restores a [`WatermarkTracker::snapshot`] at processing time `now_ms`. The time the
    /// process was down does not count towards idleness: each partition's last sighting moves
    /// forward by it, so a partition active at the checkpoint has its remaining idle timeout
    /// to deliver again before the watermark passes it.
    pub fn restore(&mut self, snapshot: &serde_json::Value, now_ms: i64) -> Option<()> {
        self.watermark = serde_json::from_value(snapshot.get("watermark")?.clone()).ok()?;
        let partitions: Vec<(i32, i64, i64)> =
            serde_json::from_value(snapshot.get("partitions")?.clone()).ok()?;
        // A checkpoint taken before deliveries were kept has none: delivered when held from.
        let delivered: HashMap<i32, i64> = snapshot
            .get("delivered")
            .and_then(|d| serde_json::from_value::<Vec<(i32, i64)>>(d.clone()).ok())
            .unwrap_or_default()
            .into_iter()
            .collect();
        let taken_at: i64 = serde_json::from_value(snapshot.get("taken_at_ms")?.clone()).ok()?;
        let downtime = now_ms.saturating_sub(taken_at).max(0);
        let mut restored = HashMap::new();
        for (partition, max_event_ms, last_seen_ms) in partitions {
            let delivered_ms = delivered
                .get(&partition)
                .copied()
                .unwrap_or(match max_event_ms {
                    i64::MIN => i64::MIN,
                    _ => last_seen_ms,
                });
            let shifted = |t: i64| match t {
                i64::MIN => i64::MIN,
                t => t.saturating_add(downtime),
            };
            restored.insert(
                partition,
                PartitionTime {
                    max_event_ms,
                    last_seen_ms: last_seen_ms.saturating_add(downtime),
                    delivered_ms: shifted(delivered_ms),
                },
            );
        }
        self.partitions = restored;
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimum_over_partitions_minus_delay() {
        let now = 1_000_000;
        let mut w = WatermarkTracker::new(Duration::from_secs(5), Duration::from_secs(60));
        assert_eq!(w.advance(now), None);
        w.observe(0, 100_000, now);
        w.observe(1, 50_000, now);
        assert_eq!(w.advance(now), Some(45_000));
        w.observe(1, 200_000, now);
        assert_eq!(w.advance(now), Some(95_000));
    }

    /// Every partition silent past the idle timeout, then one delivers a record stamped past
    /// the open windows (a closing marker): the others hold the watermark for an idle
    /// timeout from then (their burst may follow), and once they stay silent that long, the
    /// watermark follows the one that delivered. It stayed at the silent ones' times for good:
    /// held again, they went idle together with the marker's partition, and with every
    /// partition idle the lowest of them all held it.
    #[test]
    fn a_closing_marker_after_a_quiet_spell_moves_the_watermark_once_the_others_stay_quiet() {
        let now = 1_000_000;
        let mut w = WatermarkTracker::new(Duration::from_secs(5), Duration::from_secs(5));
        for p in 0..4 {
            w.observe(p, 59_000 + i64::from(p), now);
        }
        assert_eq!(w.advance(now), Some(54_000));
        let marker = now + 12_000;
        w.observe(0, 200_000, marker);
        assert_eq!(
            w.advance(marker),
            Some(54_001),
            "the others' burst may follow"
        );
        assert_eq!(w.advance(marker + 4_000), Some(54_001));
        assert_eq!(
            w.advance(marker + 5_000),
            Some(195_000),
            "the others stayed silent an idle timeout after the marker"
        );
        // Ticked long after, the same.
        assert_eq!(w.advance(marker + 60_000), Some(195_000));
        // A second marker on the same partition moves it on at once: the others are idle.
        let second = marker + 70_000;
        w.observe(0, 300_000, second);
        assert_eq!(w.advance(second + 5_000), Some(295_000));

        // A burst ending on every partition at once still holds at the lowest of them.
        let mut burst = WatermarkTracker::new(Duration::from_secs(5), Duration::from_secs(5));
        for p in 0..4 {
            burst.observe(p, 100_000 * i64::from(p + 1), now + i64::from(p) * 100);
        }
        assert_eq!(burst.advance(now + 60_000), Some(95_000));
    }

    /// A partition known already, silent for longer than the idle timeout (restored from a
    /// checkpoint taken while it was), holds the watermark again once it is expected: it was
    /// left idle, and its backlog read after the others' was late.
    #[test]
    fn an_expected_partition_holds_the_watermark_though_it_was_idle() {
        let now = 1_000_000;
        let mut w = WatermarkTracker::new(Duration::from_secs(1), Duration::from_secs(10));
        w.observe(0, 100_000, now);
        w.expect(1, now);
        // Partition 0 goes on, partition 1 stays silent past the idle timeout.
        w.observe(0, 200_000, now + 6_000);
        let later = now + 12_000;
        w.observe(0, 400_000, later);
        assert_eq!(w.advance(later), Some(399_000), "partition 1 is idle");
        let mut restored = WatermarkTracker::new(Duration::from_secs(1), Duration::from_secs(10));
        restored.restore(&w.snapshot(later), later + 5_000);
        restored.expect(0, later + 5_000);
        restored.expect(1, later + 5_000);
        restored.observe(0, 500_000, later + 6_000);
        assert_eq!(
            restored.advance(later + 6_000),
            Some(399_000),
            "held by partition 1"
        );
        restored.observe(1, 450_000, later + 7_000);
        assert_eq!(restored.advance(later + 7_000), Some(449_000));
    }

    /// A topic read to its end, one of whose partitions is empty: once every partition is
    /// idle, the empty one (expected, never delivered) does not hold the watermark at
    /// nothing, and the windows the others have passed close.
    #[test]
    fn an_empty_partition_does_not_hold_the_watermark_once_all_are_idle() {
        let now = 1_000_000;
        let mut w = WatermarkTracker::new(Duration::from_secs(1), Duration::from_secs(10));
        for p in 0..4 {
            w.expect(p, now);
        }
        for p in [0, 1, 3] {
            w.observe(p, 600_000 + i64::from(p), now);
        }
        assert!(
            w.advance(now).is_none_or(|m| m < 0),
            "held by the partition expected"
        );
        assert_eq!(w.advance(now + 60_000), Some(599_000));
    }

    #[test]
    fn never_goes_backwards() {
        let now = 1_000_000;
        let mut w = WatermarkTracker::new(Duration::ZERO, Duration::from_secs(60));
        w.observe(0, 100_000, now);
        assert_eq!(w.advance(now), Some(100_000));
        // A new partition far behind does not pull the watermark back.
        w.observe(1, 10_000, now);
        assert_eq!(w.advance(now), Some(100_000));
    }

    #[test]
    fn an_event_ahead_of_the_clock_moves_the_watermark_as_the_clock_reaches_it() {
        let now = 1_000_000;
        let mut w = WatermarkTracker::new(Duration::ZERO, Duration::from_secs(10));
        w.observe(0, now + 5_000, now);
        assert_eq!(w.advance(now), Some(now));
        assert_eq!(w.advance(now + 2_000), Some(now + 2_000));
        // Idle, and the clock past the event: the watermark reaches it, no further.
        assert_eq!(w.advance(now + 60_000), Some(now + 5_000));
    }

    #[test]
    fn idle_partition_stops_holding_back() {
        let t0 = 1_000_000;
        let mut w = WatermarkTracker::new(Duration::ZERO, Duration::from_secs(10));
        w.observe(0, 100_000, t0);
        w.observe(1, 20_000, t0);
        assert_eq!(w.advance(t0), Some(20_000));
        w.observe(0, 120_000, t0 + 6_000);
        let later = t0 + 11_000;
        w.observe(0, 150_000, later);
        assert_eq!(w.advance(later), Some(150_000));
        // Everything idle: the watermark holds.
        assert_eq!(w.advance(later + 60_000), Some(150_000));
    }

    /// After every partition has been quiet for the idle timeout, the first to deliver again
    /// does not run ahead of the others: they hold the watermark again for an idle timeout,
    /// and only one still silent then stops holding it back.
    #[test]
    fn partitions_quiet_together_hold_the_watermark_again_when_one_delivers() {
        let t0 = 1_000_000;
        let mut w = WatermarkTracker::new(Duration::ZERO, Duration::from_secs(10));
        w.observe(0, 100_000, t0);
        w.observe(1, 100_000, t0);
        w.observe(2, 100_000, t0);
        assert_eq!(w.advance(t0), Some(100_000));
        // A minute of quiet, then partition 0's burst arrives first.
        let back = t0 + 60_000;
        w.observe(0, 400_000, back);
        assert_eq!(w.advance(back), Some(100_000), "held by 1 and 2");
        w.observe(1, 390_000, back + 100);
        assert_eq!(w.advance(back + 100), Some(100_000), "held by 2");
        w.observe(2, 380_000, back + 200);
        assert_eq!(w.advance(back + 200), Some(380_000));
        // Partition 2 falls silent while the others go on: idle after the timeout.
        w.observe(0, 500_000, back + 5_000);
        w.observe(1, 500_000, back + 5_000);
        assert_eq!(w.advance(back + 5_000), Some(380_000));
        w.observe(0, 600_000, back + 10_500);
        w.observe(1, 600_000, back + 10_500);
        assert_eq!(w.advance(back + 10_500), Some(600_000), "2 is idle");
    }
}
