//! The session-window operator: per group key, events less than `gap` apart form one session.
//!
//! Every session is a group of one shared set of DataFusion `GroupsAccumulator`s, as a
//! tumbling window's groups are: a batch is placed event by event (the key's sessions are
//! looked up once per event and are nearly always one), then each aggregate is updated once
//! for the whole batch. An event joins every session of its key that it is within `gap` of;
//! sessions it bridges are merged by remembering the merged session's group, whose state is
//! folded into the survivor's when that group is next drained. Sessions to emit are
//! evaluated by draining the accumulators' oldest groups, up to the last group of a session
//! to emit (the accumulators hand out only a prefix): each session holding a group there gets
//! one new group at the end with their merged state, and freed sessions' groups are dropped.
//! Sessions close about in the order they opened, so that is mostly the closing sessions.
//! When the prefix is most of the groups, and when freed groups outnumber live ones, and for
//! a checkpoint, every group is drained and merged back (compaction). A session `[first event, last event + gap)` is
//! emitted when the watermark reaches its end and freed when the watermark reaches end +
//! allowed lateness. A late event within the allowed
//! lateness updates its session, which is re-emitted as a revision; if it moves the session's
//! start, the session is emitted under its new `window_start` with revision 0.
//!
//! The output is a changelog keyed by the group keys and `window_start`: a row published for
//! a session that later merges into another, or whose start moves earlier, is withdrawn by a
//! row with the same keys and window and `op = 'retract'` (carrying the values it was
//! published with), emitted before the rows that replace it.
//!
//! An event is late when a session of its own, `[t, t + gap)`, would already be past end +
//! allowed lateness and no live session of its key reaches it: lateness is tested against the
//! merged session, so an old event deep inside a long session still open updates it. A
//! session freed after allowed lateness is not reopened: an event after it (not late for a
//! session of its own) starts a new session.
//!
//! What a watermark step looks at is indexed, so that a micro-batch costs in proportion to the
//! keys it touches and the sessions that close, not to the keys held: the keys whose sessions
//! need a look (a new or reopened session, a revision of an emitted one, and every change
//! once early results are asked for; an event that only extends an open session needs none),
//! the ends of open sessions and of sessions waiting out their allowed lateness (timers by
//! event time, in buckets of a second), and the sessions' starts (for the oldest one still
//! live). A step that emits a session revised or shown early (whose group sits near the end)
//! still drains about every group.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, BinaryArray, BooleanArray, Int64Array, RecordBatch, StructArray,
    TimestampMillisecondArray, UInt32Array, UInt64Array, new_null_array,
};
use datafusion::arrow::compute::{cast, concat, take};
use datafusion::arrow::datatypes::DataType;
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::{HashMap, Result, internal_err};
use datafusion::logical_expr::{EmitTo, GroupsAccumulator};
use urbanstream_operators::window::{WindowSpec, window_fields};

use super::WindowedAggregation;
use super::window::{AggregateSpec, Emission, Inputs};
use crate::checkpoint::{StateSnapshot, column, meta_field, table, typed};

struct Session {
    start: i64,
    last: i64,
    /// Its group in the shared accumulators.
    slot: usize,
    /// Groups of sessions merged into it since the last compaction.
    merged: Vec<usize>,
    updated: u64,
    emitted_at: Option<u64>,
    final_fired: bool,
    revisions: u32,
    /// The row last published for it, under the window it had then.
    published: Option<Published>,
    /// The end under which it waits in the operator's `closing` timers, if it does.
    scheduled: Option<i64>,
    /// The last watermark step that looked at its key (kept on a key's first session).
    looked: u64,
}

impl Session {
    /// Its slot and the slots merged into it.
    fn slots(&self) -> impl Iterator<Item = usize> + '_ {
        std::iter::once(self.slot).chain(self.merged.iter().copied())
    }
}

/// One key's sessions, ordered by start, with the key (the map's own `Arc`, so that the
/// indexes name the key without a second lookup).
struct Sessions {
    key: Arc<[u8]>,
    list: Vec<Session>,
    /// The last update step that named the key for the next watermark step.
    marked: u64,
    /// The last drain of the accumulators' groups (the oldest, or all of them) that moved
    /// the key's sessions.
    drained: u64,
}

/// Keys due at event times (a session's end; end + allowed lateness), in buckets of
/// [`Timers::BUCKET_MS`] of event time: adding one costs O(1), and a watermark step takes the
/// buckets it has passed whole and looks through the one it is in. An entry can go stale
/// (its session moved on, merged or was freed): the key is looked at when it comes due and
/// the entry dropped.
#[derive(Default)]
struct Timers {
    /// Per bucket (event time / [`Timers::BUCKET_MS`]), its entries.
    buckets: BTreeMap<i64, Vec<Timer>>,
    len: usize,
}

/// A key due at a time.
type Timer = (i64, Arc<[u8]>);

impl Timers {
    /// Event time one bucket spans.
    const BUCKET_MS: i64 = 1_000;

    fn push(&mut self, at: i64, key: Arc<[u8]>) {
        self.buckets
            .entry(at.div_euclid(Self::BUCKET_MS))
            .or_default()
            .push((at, key));
        self.len += 1;
    }

    /// Takes every entry due at or before `t`, adding its key to `out`.
    fn take_due(&mut self, t: i64, out: &mut Vec<Arc<[u8]>>) {
        let current = t.div_euclid(Self::BUCKET_MS);
        while let Some(mut entry) = self.buckets.first_entry() {
            if *entry.key() > current {
                break;
            }
            if *entry.key() < current {
                let due = entry.remove();
                self.len -= due.len();
                out.extend(due.into_iter().map(|(_, key)| key));
                continue;
            }
            // The bucket `t` is in: its entries up to `t`.
            let bucket = entry.get_mut();
            let before = bucket.len();
            bucket.retain(|(at, key)| {
                let due = *at <= t;
                if due {
                    out.push(key.clone());
                }
                !due
            });
            self.len -= before - bucket.len();
            if bucket.is_empty() {
                entry.remove();
            }
            break;
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn clear(&mut self) {
        self.buckets.clear();
        self.len = 0;
    }
}

impl std::ops::Deref for Sessions {
    type Target = Vec<Session>;
    fn deref(&self) -> &Vec<Session> {
        &self.list
    }
}

impl std::ops::DerefMut for Sessions {
    fn deref_mut(&mut self) -> &mut Vec<Session> {
        &mut self.list
    }
}

/// A session's last published row: its window and aggregate values (one row each).
#[derive(Clone)]
struct Published {
    start: i64,
    end: i64,
    values: Vec<ArrayRef>,
    revisions: u32,
}

/// Incremental state of a query grouped by `session(ts, gap)`.
pub struct SessionOperator {
    spec: AggregateSpec,
    gap: i64,
    lateness_ms: i64,
    /// Sessions per group key (row-encoded), ordered by start.
    keys: HashMap<Arc<[u8]>, Sessions>,
    /// Sessions held.
    count: usize,
    /// How many sessions start at each time.
    starts: BTreeMap<i64, usize>,
    /// Keys touched since the last watermark step, and keys with changes not yet emitted.
    pending: Vec<Arc<[u8]>>,
    /// Whether the keys touched since the last step are most of them: the step then looks at
    /// every key, and `pending` is not kept.
    pending_all: bool,
    /// Open sessions' ends, with their keys: looked at once the watermark reaches them.
    /// Entries of sessions that moved on since are found stale then and dropped.
    closing: Timers,
    /// Ends of sessions emitted finally, with their keys: freed once the watermark is past
    /// end + allowed lateness.
    freeing: Timers,
    /// Keys with changes no early result has shown yet (once early results were asked for).
    unshown: Vec<Arc<[u8]>>,
    /// Whether an early result was ever asked for.
    early_results: bool,
    /// Keys in `unshown` when it was last rid of repeats.
    unshown_distinct: usize,
    /// Watermark steps taken.
    advances: u64,
    row_converter: RowConverter,
    watermark: i64,
    late_frontier: i64,
    evicted_through: i64,
    step: u64,
    /// Published rows no session stands for any more (merged into another, or moved to an
    /// earlier start), to retract at the next emission.
    retractions: Vec<SessionRow>,
    /// The aggregates' state, one group per slot.
    accumulators: Vec<Box<dyn GroupsAccumulator>>,
    /// The slot after the last one given out. Slots are numbered from `base` (the
    /// accumulators' group 0) up: the accumulators hold live sessions' slots, slots merged
    /// into another session, and slots of freed sessions, until they are drained.
    slots: usize,
    /// The slot that is the accumulators' group 0.
    base: usize,
    /// Per group of the accumulators, the key of the session holding it (`None` once that
    /// session is freed).
    owners: VecDeque<Option<Arc<[u8]>>>,
    /// Slots of freed sessions.
    dead: usize,
    /// Drains of the accumulators' groups (the oldest, or all of them) so far.
    drains: u64,
}

impl SessionOperator {
    /// An operator with empty state.
    pub fn new(spec: AggregateSpec, lateness_ms: i64) -> Result<Self> {
        let WindowSpec::Session { gap } = spec.window else {
            return internal_err!("not a session window");
        };
        let fields: Vec<SortField> = if spec.group_schema.fields().is_empty() {
            vec![SortField::new(DataType::Boolean)]
        } else {
            spec.group_schema
                .fields()
                .iter()
                .map(|f| SortField::new(f.data_type().clone()))
                .collect()
        };
        Ok(Self {
            row_converter: RowConverter::new(fields)?,
            accumulators: spec.new_accumulators()?,
            slots: 0,
            base: 0,
            owners: VecDeque::new(),
            dead: 0,
            drains: 0,
            spec,
            gap,
            lateness_ms: lateness_ms.max(0),
            keys: HashMap::new(),
            count: 0,
            starts: BTreeMap::new(),
            pending: Vec::new(),
            pending_all: false,
            closing: Timers::default(),
            freeing: Timers::default(),
            unshown: Vec::new(),
            early_results: false,
            unshown_distinct: 0,
            advances: 0,
            watermark: i64::MIN,
            late_frontier: i64::MIN,
            evicted_through: i64::MIN,
            step: 0,
            retractions: Vec::new(),
        })
    }
}

impl WindowedAggregation for SessionOperator {
    fn prepare(&self, batch: &RecordBatch) -> Result<Option<Inputs>> {
        if batch.num_rows() == 0 {
            return Ok(None);
        }
        Ok(Some(self.spec.inputs(batch)?))
    }

    fn update_prepared(&mut self, batch: &RecordBatch, inputs: Option<Inputs>) -> Result<()> {
        let n = batch.num_rows();
        let inputs = match inputs {
            Some(inputs) => inputs,
            None if n == 0 => return Ok(()),
            None => self.spec.inputs(batch)?,
        };
        self.step += 1;
        let Inputs {
            times,
            keys,
            args,
            filters,
        } = inputs;
        let rows = self
            .row_converter
            .convert_columns(&super::comparable_keys(&keys))?;
        let mut groups = Vec::with_capacity(n);
        let step = self.step;
        let mut place = Placement {
            gap: self.gap,
            step,
            early_results: self.early_results,
            slots: &mut self.slots,
            owners: &mut self.owners,
            retractions: &mut self.retractions,
            count: &mut self.count,
            starts: &mut self.starts,
        };
        let half = self.keys.len() / 2;
        for i in 0..n {
            let t = times.value(i);
            let key = rows.row(i);
            let slot = match self.keys.get_mut(key.as_ref()) {
                Some(sessions) => {
                    let (slot, look) = place.event(&mut sessions.list, &sessions.key, t);
                    // Named once per update step for the next watermark step (which looks at
                    // every key once most of them are named); an event that only extends an
                    // open session, whose timer is set, needs no look.
                    if look && !self.pending_all && sessions.marked != step {
                        sessions.marked = step;
                        if self.pending.len() > half {
                            self.pending_all = true;
                            self.pending.clear();
                        } else {
                            self.pending.push(sessions.key.clone());
                        }
                    }
                    slot
                }
                None => {
                    let key: Arc<[u8]> = key.as_ref().into();
                    let mut sessions = Sessions {
                        key: key.clone(),
                        list: Vec::with_capacity(1),
                        marked: step,
                        drained: 0,
                    };
                    let (slot, _) = place.event(&mut sessions.list, &key, t);
                    self.pending.push(key.clone());
                    self.keys.insert(key, sessions);
                    slot
                }
            };
            groups.push(slot - self.base);
        }
        let groups_total = self.held();
        for (a, acc) in self.accumulators.iter_mut().enumerate() {
            let filter = filters[a]
                .as_ref()
                .and_then(|f| f.as_any().downcast_ref::<BooleanArray>());
            acc.update_batch(&args[a], &groups, filter, groups_total)?;
        }
        Ok(())
    }

    fn advance(&mut self, watermark: i64, early_fire: bool) -> Result<Vec<Emission>> {
        self.watermark = self.watermark.max(watermark);
        // The sessions emitted finally and early: rows of the due sessions' values.
        let mut finals = Emitted::default();
        let mut partials = Emitted::default();
        let mut emitted = Vec::new();
        let step = self.step;
        // The keys to look at: those touched (or holding changes not yet shown), and those
        // with a session whose end the watermark has reached.
        let mut candidates = std::mem::take(&mut self.pending);
        let mut everything = false;
        if early_fire {
            if !self.early_results {
                // The first early result: every key's changes so far (tracked from now on).
                self.early_results = true;
                everything = true;
            }
            candidates.append(&mut self.unshown);
            self.unshown_distinct = 0;
        }
        self.closing.take_due(self.watermark, &mut candidates);
        // The sessions to emit, by key and position, and whether finally.
        let mut due: Due = Vec::new();
        self.advances += 1;
        let mut look = LookAt {
            advance: self.advances,
            once: true,
            watermark: self.watermark,
            gap: self.gap,
            early_fire,
            early_results: self.early_results,
            due: &mut due,
            closing: &mut self.closing,
            unshown: &mut self.unshown,
        };
        let all = std::mem::take(&mut self.pending_all);
        if everything || all || candidates.len() > self.keys.len() / 2 {
            // Most keys are named anyway: one pass over all of them costs less than a
            // lookup each.
            drop(candidates);
            look.once = false;
            for (key, sessions) in self.keys.iter_mut() {
                look.key(key, sessions);
            }
        } else {
            // A key named twice (touched, and its timer due) is looked at once: `LookAt::key`
            // tells by the step mark.
            for key in candidates {
                if let Some(sessions) = self.keys.get_mut(&key) {
                    look.key(&key, sessions);
                }
            }
        }
        if self.unshown.len() > 2 * self.unshown_distinct + 4_096 {
            // A key waits here once, however many steps pass before the next early result.
            self.unshown.sort_unstable();
            self.unshown.dedup();
            self.unshown_distinct = self.unshown.len();
        }
        if !due.is_empty() {
            let (due, values) = self.due_values(due)?;
            for (r, (key, j, is_final)) in due.into_iter().enumerate() {
                let Some(s) = self.keys.get_mut(&key).and_then(|s| s.get_mut(j)) else {
                    continue;
                };
                let end = s.last + self.gap;
                s.published = Some(Published {
                    start: s.start,
                    end,
                    values: values.iter().map(|v| v.slice(r, 1)).collect(),
                    revisions: s.revisions + 1,
                });
                let rows = if is_final { &mut finals } else { &mut partials };
                rows.rows.push(u32::try_from(r).unwrap_or(u32::MAX));
                rows.starts.push(s.start);
                rows.ends.push(end);
                rows.revisions.push(s.revisions);
                s.revisions += 1;
                s.emitted_at = Some(step);
                if is_final {
                    if !s.final_fired {
                        self.freeing.push(end, key.clone());
                    }
                    s.final_fired = true;
                }
                rows.keys.push(key);
            }
            for (rows, is_final) in [(finals, true), (partials, false)] {
                if !rows.rows.is_empty() {
                    let picked = UInt32Array::from(rows.rows);
                    let values = values
                        .iter()
                        .map(|v| take(v, &picked, None))
                        .collect::<std::result::Result<Vec<_>, _>>()?;
                    let keys = rows.keys.iter().map(|k| k.as_ref());
                    let batch = self.output(keys, &rows.starts, &rows.ends, values)?;
                    emitted.push(Emission {
                        batch,
                        revisions: rows.revisions,
                        is_final,
                        retract: false,
                        until: rows.ends.iter().copied().max().unwrap_or(i64::MIN),
                    });
                }
            }
        }
        let mut out = Vec::new();
        // Withdrawn rows go first, so that a consumer applying the changelog in order never
        // holds a merged session and its parts at once.
        let retractions = std::mem::take(&mut self.retractions);
        if let Some(mut e) = self.retraction_emission(retractions)? {
            e.retract = true;
            out.push(e);
        }
        out.append(&mut emitted);
        // Evict sessions past end + allowed lateness.
        let frontier = self.watermark.saturating_sub(self.lateness_ms);
        self.late_frontier = frontier;
        let gap = self.gap;
        let mut freed = 0;
        let mut expiring = Vec::new();
        self.freeing.take_due(frontier, &mut expiring);
        expiring.sort_unstable();
        expiring.dedup();
        for key in expiring {
            let Some(sessions) = self.keys.get_mut(&key) else {
                continue;
            };
            let (base, owners) = (self.base, &mut self.owners);
            sessions.retain(|s| {
                let keep = !(s.final_fired && s.last + gap <= frontier);
                if !keep {
                    freed += 1 + s.merged.len();
                    for slot in s.slots() {
                        owners[slot - base] = None;
                    }
                    self.count -= 1;
                    forget_start(&mut self.starts, s.start);
                }
                keep
            });
            if sessions.is_empty() {
                self.keys.remove(&key);
            }
        }
        self.dead += freed;
        if self.dead > 1024 && self.dead > self.held() - self.dead {
            self.compact()?;
        }
        let oldest_live = self.starts.keys().next().copied();
        self.evicted_through = match oldest_live {
            Some(start) => frontier.min(start.saturating_add(gap) - 1),
            None => frontier,
        };
        Ok(out)
    }

    fn is_late(&self, t: i64) -> bool {
        t.saturating_add(self.gap) <= self.late_frontier
    }

    fn timely_from(&self) -> i64 {
        self.late_frontier
    }

    fn late_for_keys(&self, keys: &[ArrayRef], times: &[i64]) -> Result<Vec<bool>> {
        let n = times.len();
        let keys: Vec<ArrayRef> = if self.spec.group_schema.fields().is_empty() {
            vec![Arc::new(BooleanArray::from(vec![true; n]))]
        } else {
            if keys.len() != self.spec.group_schema.fields().len() {
                // Keys that do not match the sessions': tested as a session of its own.
                return Ok(times.iter().map(|t| self.is_late(*t)).collect());
            }
            keys.iter()
                .zip(self.spec.group_schema.fields())
                .map(|(k, f)| cast(k, f.data_type()))
                .collect::<std::result::Result<_, _>>()?
        };
        let rows = self
            .row_converter
            .convert_columns(&super::comparable_keys(&keys))?;
        let gap = self.gap;
        Ok(times
            .iter()
            .enumerate()
            .map(|(r, &t)| {
                // Late when a session of its own would be past allowed lateness and no live
                // session of its key reaches it (one that does would absorb it, and the
                // merged session ends after the frontier).
                self.is_late(t)
                    && !self.keys.get(rows.row(r).as_ref()).is_some_and(|sessions| {
                        sessions
                            .iter()
                            .any(|s| s.start - gap < t && t < s.last + gap)
                    })
            })
            .collect())
    }

    fn keyed_lateness(&self) -> bool {
        true
    }

    fn last_window_end(&self, t: i64) -> i64 {
        t.saturating_add(self.gap)
    }

    fn evicted_through(&self) -> i64 {
        self.evicted_through
    }

    fn group_count(&self) -> usize {
        self.count
    }

    fn state_bytes(&self) -> usize {
        let entry = std::mem::size_of::<Arc<[u8]>>();
        let timer = std::mem::size_of::<Timer>();
        self.keys
            .iter()
            .map(|(k, s)| 16 + k.len() + s.len() * std::mem::size_of::<Session>())
            .sum::<usize>()
            + self.accumulators.iter().map(|a| a.size()).sum::<usize>()
            + (self.closing.len() + self.freeing.len()) * timer
            + (self.pending.len() + self.unshown.len()) * entry
            + self.starts.len() * 48
            + self.owners.len() * std::mem::size_of::<Option<Arc<[u8]>>>()
    }

    fn window_count(&self) -> usize {
        self.group_count()
    }

    /// Table `sessions`: per session its key (row-encoded), bounds, bookkeeping and the
    /// aggregates' state columns.
    fn snapshot(&mut self) -> crate::Result<StateSnapshot> {
        let mut keys: Vec<&[u8]> = Vec::new();
        let (mut starts, mut lasts, mut updated, mut emitted, mut fired, mut revisions) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        let (mut pub_starts, mut pub_ends, mut pub_revisions) = (vec![], vec![], vec![]);
        let value_types = self.value_types();
        let mut pub_values: Vec<Vec<ArrayRef>> = vec![Vec::new(); value_types.len()];
        // One slot per session, then each session's state row in the order they are listed.
        let compacted = self.compact()?;
        let mut order: Vec<u32> = Vec::new();
        // In the order of their groups (a key's sessions are together after compaction), so
        // that a restore keeps the order the sessions opened in.
        let mut previous: Option<&Arc<[u8]>> = None;
        for key in self.owners.iter().flatten() {
            if previous.is_some_and(|p| Arc::ptr_eq(p, key)) {
                continue;
            }
            previous = Some(key);
            let Some(sessions) = self.keys.get(key) else {
                continue;
            };
            for s in sessions.iter() {
                order.push(u32::try_from(s.slot).unwrap_or(u32::MAX));
                keys.push(key.as_ref());
                starts.push(s.start);
                lasts.push(s.last);
                updated.push(s.updated);
                emitted.push(s.emitted_at);
                fired.push(s.final_fired);
                revisions.push(s.revisions);
                pub_starts.push(s.published.as_ref().map(|p| p.start));
                pub_ends.push(s.published.as_ref().map(|p| p.end));
                pub_revisions.push(s.published.as_ref().map(|p| p.revisions));
                for (a, dt) in value_types.iter().enumerate() {
                    pub_values[a].push(match &s.published {
                        Some(p) => p.values[a].clone(),
                        None => new_null_array(dt, 1),
                    });
                }
            }
        }
        let order = UInt32Array::from(order);
        let mut out = StateSnapshot::default();
        let mut state_columns = Vec::new();
        if !keys.is_empty() {
            let mut columns: Vec<(String, ArrayRef)> = vec![
                ("key".into(), Arc::new(BinaryArray::from(keys))),
                ("start".into(), Arc::new(Int64Array::from(starts))),
                ("last".into(), Arc::new(Int64Array::from(lasts))),
                ("updated".into(), Arc::new(UInt64Array::from(updated))),
                ("emitted_at".into(), Arc::new(UInt64Array::from(emitted))),
                ("final_fired".into(), Arc::new(BooleanArray::from(fired))),
                ("revisions".into(), Arc::new(UInt32Array::from(revisions))),
                (
                    "published_start".into(),
                    Arc::new(Int64Array::from(pub_starts)),
                ),
                ("published_end".into(), Arc::new(Int64Array::from(pub_ends))),
                (
                    "published_revisions".into(),
                    Arc::new(UInt32Array::from(pub_revisions)),
                ),
            ];
            for (a, values) in pub_values.iter().enumerate() {
                let parts: Vec<&dyn Array> = values.iter().map(|v| v.as_ref()).collect();
                columns.push((format!("published{a}"), concat(&parts)?));
            }
            for (a, state) in compacted.iter().enumerate() {
                state_columns.push(state.len());
                for (j, column) in state.iter().enumerate() {
                    columns.push((format!("state{a}_{j}"), take(column, &order, None)?));
                }
            }
            out.tables.insert("sessions".into(), table(columns)?);
        }
        out.meta = serde_json::json!({
            "watermark": self.watermark,
            "late_frontier": self.late_frontier,
            "evicted_through": self.evicted_through,
            "step": self.step,
            "state_columns": state_columns,
        });
        Ok(out)
    }

    fn spec(&self) -> &AggregateSpec {
        &self.spec
    }

    fn restore(&mut self, snapshot: &StateSnapshot) -> crate::Result<()> {
        let meta = &snapshot.meta;
        self.watermark = meta_field(meta, "watermark")?;
        self.late_frontier = meta_field(meta, "late_frontier")?;
        self.evicted_through = meta_field(meta, "evicted_through")?;
        self.step = meta_field(meta, "step")?;
        let state_columns: Vec<usize> = meta_field(meta, "state_columns")?;
        self.keys.clear();
        self.count = 0;
        self.starts.clear();
        self.pending.clear();
        self.closing.clear();
        self.freeing.clear();
        self.unshown.clear();
        self.accumulators = self.spec.new_accumulators()?;
        self.slots = 0;
        self.base = 0;
        self.owners.clear();
        self.dead = 0;
        let Some(t) = snapshot.tables.get("sessions") else {
            return Ok(());
        };
        if state_columns.len() != self.spec.aggregates.len() {
            return Err(crate::Error::Checkpoint(format!(
                "session state has {} aggregates, the query computes {}",
                state_columns.len(),
                self.spec.aggregates.len()
            )));
        }
        let keys = typed::<BinaryArray>(column(t, "key")?, "key")?;
        let starts = typed::<Int64Array>(column(t, "start")?, "start")?;
        let lasts = typed::<Int64Array>(column(t, "last")?, "last")?;
        let updated = typed::<UInt64Array>(column(t, "updated")?, "updated")?;
        let emitted = typed::<UInt64Array>(column(t, "emitted_at")?, "emitted_at")?;
        let fired = typed::<BooleanArray>(column(t, "final_fired")?, "final_fired")?;
        let revisions = typed::<UInt32Array>(column(t, "revisions")?, "revisions")?;
        // What each session last published (checkpoints written before retractions existed
        // have none: their sessions are not retracted).
        let published = match t.column_by_name("published_start") {
            Some(_) => Some((
                typed::<Int64Array>(column(t, "published_start")?, "published_start")?,
                typed::<Int64Array>(column(t, "published_end")?, "published_end")?,
                typed::<UInt32Array>(column(t, "published_revisions")?, "published_revisions")?,
                (0..self.value_types().len())
                    .map(|a| column(t, &format!("published{a}")).cloned())
                    .collect::<crate::Result<Vec<_>>>()?,
            )),
            None => None,
        };
        // Session r is group r.
        let rows = t.num_rows();
        let groups: Vec<usize> = (0..rows).collect();
        for (a, acc) in self.accumulators.iter_mut().enumerate() {
            let state: Vec<ArrayRef> = (0..state_columns[a])
                .map(|j| column(t, &format!("state{a}_{j}")).cloned())
                .collect::<crate::Result<_>>()?;
            acc.merge_batch(&state, &groups, rows)?;
        }
        self.slots = rows;
        self.owners = std::iter::repeat_n(None, rows).collect();
        for r in 0..rows {
            let key: Arc<[u8]> = keys.value(r).into();
            self.keys
                .entry(key.clone())
                .or_insert_with(|| Sessions {
                    key,
                    list: Vec::new(),
                    marked: 0,
                    drained: 0,
                })
                .push(Session {
                    start: starts.value(r),
                    last: lasts.value(r),
                    slot: r,
                    merged: Vec::new(),
                    updated: updated.value(r),
                    emitted_at: (!emitted.is_null(r)).then(|| emitted.value(r)),
                    final_fired: fired.value(r),
                    revisions: revisions.value(r),
                    published: published.as_ref().and_then(|(s, e, n, values)| {
                        (!s.is_null(r)).then(|| Published {
                            start: s.value(r),
                            end: e.value(r),
                            revisions: n.value(r),
                            values: values.iter().map(|v| v.slice(r, 1)).collect(),
                        })
                    }),
                    scheduled: None,
                    looked: 0,
                });
        }
        for (key, sessions) in self.keys.iter_mut() {
            sessions.sort_by_key(|s| s.start);
            let mut changed = false;
            for s in sessions.iter_mut() {
                self.owners[s.slot] = Some(key.clone());
                self.count += 1;
                *self.starts.entry(s.start).or_default() += 1;
                let end = s.last + self.gap;
                if s.final_fired {
                    self.freeing.push(end, key.clone());
                } else {
                    self.closing.push(end, key.clone());
                    s.scheduled = Some(end);
                }
                changed |= s.updated > s.emitted_at.unwrap_or(0);
            }
            if changed {
                self.pending.push(key.clone());
            }
        }
        Ok(())
    }
}

/// What a watermark step does with one key's sessions: the ones to emit go to `due`; the
/// ones still open get a timer at their end (once), and a key with changes no early result
/// has shown waits in `unshown`.
struct LookAt<'a> {
    /// The step's number: a key is looked at once per step.
    advance: u64,
    /// Whether keys may be named more than once (and are looked at once by `advance`).
    once: bool,
    watermark: i64,
    gap: i64,
    early_fire: bool,
    early_results: bool,
    due: &'a mut Due,
    closing: &'a mut Timers,
    unshown: &'a mut Vec<Arc<[u8]>>,
}

impl LookAt<'_> {
    fn key(&mut self, key: &Arc<[u8]>, sessions: &mut [Session]) {
        if self.once {
            match sessions.first_mut() {
                Some(first) if first.looked != self.advance => first.looked = self.advance,
                _ => return,
            }
        }
        let mut waiting = false;
        for (j, s) in sessions.iter_mut().enumerate() {
            if s.scheduled.is_some_and(|e| e <= self.watermark) {
                // Its timer has gone off (this step or, stale, before).
                s.scheduled = None;
            }
            let end = s.last + self.gap;
            let changed = s.updated > s.emitted_at.unwrap_or(0);
            let (emit, is_final) = if !s.final_fired && end <= self.watermark {
                (true, true)
            } else if s.final_fired {
                (changed, true)
            } else {
                (self.early_fire && changed, false)
            };
            if emit {
                self.due.push((key.clone(), j, is_final));
            }
            if !(s.final_fired || (emit && is_final)) {
                // Still open after this step (an early result included): looked at again
                // when the watermark reaches its end, or for its changes at the next early
                // result.
                if s.scheduled.is_none() {
                    self.closing.push(end, key.clone());
                    s.scheduled = Some(end);
                }
                waiting |= !emit && changed;
            }
        }
        if waiting && self.early_results {
            self.unshown.push(key.clone());
        }
    }
}

/// Takes one session starting at `start` off `starts`.
fn forget_start(starts: &mut BTreeMap<i64, usize>, start: i64) {
    if let Some(n) = starts.get_mut(&start) {
        *n -= 1;
        if *n == 0 {
            starts.remove(&start);
        }
    }
}

type SessionRow = (Box<[u8]>, i64, i64, Vec<ArrayRef>, u32);

/// Sessions emitted in a step, finally or early: their keys, windows and revisions, and
/// their rows among the due sessions' values.
#[derive(Default)]
struct Emitted {
    keys: Vec<Arc<[u8]>>,
    starts: Vec<i64>,
    ends: Vec<i64>,
    revisions: Vec<u32>,
    rows: Vec<u32>,
}

/// The row withdrawing a published one: its key and window, the values it was published
/// with (so filters above the aggregation treat it as they treated the row), and the next
/// revision of that window.
fn retraction(key: &[u8], p: Published) -> SessionRow {
    (key.into(), p.start, p.end, p.values, p.revisions)
}

/// Where the events of a batch go: the key's session they fall into, created or merged as
/// needed.
struct Placement<'a> {
    gap: i64,
    step: u64,
    /// Whether early results are asked for: every key with a change is looked at then.
    early_results: bool,
    slots: &'a mut usize,
    owners: &'a mut VecDeque<Option<Arc<[u8]>>>,
    retractions: &'a mut Vec<SessionRow>,
    /// The operator's count of sessions and their starts.
    count: &'a mut usize,
    starts: &'a mut BTreeMap<i64, usize>,
}

impl Placement<'_> {
    /// Places the event at `t` among `sessions` (one key's, ordered by start, never within
    /// `gap` of each other); the slot it updates, and whether the next watermark step must
    /// look at the key: a session without a timer (new, or open again after its final
    /// result), a change to a finally emitted session (a revision), or any change once early
    /// results are asked for. An event that extends an open session needs none: its timer
    /// goes off at the old end, and the step then looks at the key.
    fn event(&mut self, sessions: &mut Vec<Session>, key: &Arc<[u8]>, t: i64) -> (usize, bool) {
        let gap = self.gap;
        // Less than `gap` apart: a session is `[first, last + gap)`, closed when the
        // watermark reaches its end, so an event at its end starts another.
        let touches = |s: &Session| s.start - gap < t && t < s.last + gap;
        // Sessions are more than `gap` apart, so an event touches at most two, neighbours;
        // nearly always it is the key's latest.
        let first = match sessions.last() {
            Some(s) if touches(s) => {
                let j = sessions.len() - 1;
                if j > 0 && touches(&sessions[j - 1]) {
                    Some(j - 1)
                } else {
                    Some(j)
                }
            }
            _ => sessions.iter().position(touches),
        };
        let target = match first {
            None => {
                let at = sessions.partition_point(|s| s.start < t);
                sessions.insert(
                    at,
                    Session {
                        start: t,
                        last: t,
                        slot: *self.slots,
                        merged: Vec::new(),
                        updated: self.step,
                        emitted_at: None,
                        final_fired: false,
                        revisions: 0,
                        published: None,
                        scheduled: None,
                        looked: 0,
                    },
                );
                *self.slots += 1;
                self.owners.push_back(Some(key.clone()));
                *self.count += 1;
                *self.starts.entry(t).or_default() += 1;
                return (sessions[at].slot, true);
            }
            Some(j) => {
                if j + 1 < sessions.len() && touches(&sessions[j + 1]) {
                    // The event bridges two sessions: the later one merges into the first.
                    let mut other = sessions.remove(j + 1);
                    *self.count -= 1;
                    forget_start(self.starts, other.start);
                    if let Some(p) = other.published.take() {
                        self.retractions.push(retraction(key, p));
                    }
                    let s = &mut sessions[j];
                    s.merged.push(other.slot);
                    s.merged.append(&mut other.merged);
                    s.last = s.last.max(other.last);
                    s.final_fired = false;
                }
                j
            }
        };
        let s = &mut sessions[target];
        if t < s.start {
            // The session now starts earlier: it is a new window for consumers, and the row
            // published under the old start is withdrawn.
            if let Some(p) = s.published.take() {
                self.retractions.push(retraction(key, p));
            }
            forget_start(self.starts, s.start);
            *self.starts.entry(t).or_default() += 1;
            s.start = t;
            s.revisions = 0;
            s.final_fired = false;
        }
        if t > s.last {
            // The session now ends later: it closes again.
            s.final_fired = false;
            s.last = t;
        }
        s.updated = self.step;
        (
            s.slot,
            self.early_results || s.final_fired || s.scheduled.is_none(),
        )
    }
}

/// Sessions to emit: key, position in the key's list, and whether finally.
type Due = Vec<(Arc<[u8]>, usize, bool)>;

impl SessionOperator {
    /// The aggregates' values of the `due` sessions (one row each, in the order kept; entries
    /// naming no session are dropped).
    ///
    /// The accumulators can only hand out a prefix of their groups, so this drains the
    /// groups up to the last slot of a due session (sessions close about in the order they
    /// opened, so that is mostly the sessions closing now) rather than every live session's:
    /// each session holding a slot there gets one new slot at the end with their merged
    /// state, and the slots of freed sessions are dropped. The due sessions' values are
    /// those merged states. When the prefix is most of the groups, it compacts them all.
    fn due_values(&mut self, due: Due) -> Result<(Due, Vec<ArrayRef>)> {
        let due: Due = due
            .into_iter()
            .filter(|(key, j, _)| self.keys.get(key).is_some_and(|s| *j < s.len()))
            .collect();
        let mut end = self.base;
        for (key, j, _) in &due {
            if let Some(s) = self.keys.get(key).and_then(|s| s.get(*j)) {
                end = end.max(s.slots().max().unwrap_or(s.slot) + 1);
            }
        }
        let prefix = end - self.base;
        let held = self.held();
        if 2 * prefix > held {
            // Compaction leaves one slot per session: the due sessions' slots, after it.
            let compacted = self.compact()?;
            let slots: Vec<usize> = due
                .iter()
                .filter_map(|(key, j, _)| Some(self.keys.get(key)?.get(*j)?.slot))
                .collect();
            let values = self.values_of(&compacted, &slots)?;
            return Ok((due, values));
        }
        let holders = self.holders(prefix);
        // Each of their sessions with slots in the prefix: those slots' rows (`keep`, as
        // groups of the prefix) merged into one new group (`into`) after the groups that
        // stay.
        let stay = held - prefix;
        let mut keep: Vec<u32> = Vec::new();
        let mut into: Vec<usize> = Vec::new();
        let mut moved: Vec<Arc<[u8]>> = Vec::new();
        for key in holders {
            let Some(sessions) = self.keys.get_mut(&key) else {
                continue;
            };
            for s in sessions.list.iter_mut() {
                let before = keep.len();
                for slot in s.slots().filter(|slot| *slot < end) {
                    keep.push(u32::try_from(slot - self.base).unwrap_or(u32::MAX));
                    into.push(stay + moved.len());
                }
                if keep.len() == before {
                    continue;
                }
                let new = self.slots + moved.len();
                s.merged.retain(|slot| *slot >= end);
                if s.slot < end {
                    s.slot = new;
                } else {
                    s.merged.push(new);
                }
                moved.push(key.clone());
            }
        }
        // The rows of each due session (all its slots were in the prefix; it now has one).
        let mut due_of: Vec<Option<usize>> = vec![None; moved.len()];
        for (r, (key, j, _)) in due.iter().enumerate() {
            if let Some(s) = self.keys.get(key).and_then(|s| s.get(*j)) {
                due_of[s.slot - self.slots] = Some(r);
            }
        }
        let (mut picked, mut picked_into) = (Vec::new(), Vec::new());
        for (row, group) in into.iter().enumerate() {
            if let Some(r) = due_of[group - stay] {
                picked.push(u32::try_from(row).unwrap_or(u32::MAX));
                picked_into.push(r);
            }
        }
        let keep = UInt32Array::from(keep);
        let picked = UInt32Array::from(picked);
        let mut copies = self.spec.new_accumulators()?;
        let mut values = Vec::with_capacity(copies.len());
        for (acc, copy) in self.accumulators.iter_mut().zip(copies.iter_mut()) {
            let state = acc.state(EmitTo::First(prefix))?;
            let kept = state
                .iter()
                .map(|c| take(c, &keep, None))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            acc.merge_batch(&kept, &into, stay + moved.len())?;
            let rows = kept
                .iter()
                .map(|c| take(c, &picked, None))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            copy.merge_batch(&rows, &picked_into, due.len())?;
            values.push(copy.evaluate(EmitTo::All)?);
        }
        self.dead -= self
            .owners
            .iter()
            .take(prefix)
            .filter(|o| o.is_none())
            .count();
        self.owners.drain(..prefix);
        self.owners.extend(moved.iter().cloned().map(Some));
        self.base = end;
        self.slots += moved.len();
        Ok((due, values))
    }

    /// The keys holding a slot among the accumulators' first `groups` groups, once each, in
    /// the order of their first slot there (a new drain: each key is marked with it).
    fn holders(&mut self, groups: usize) -> Vec<Arc<[u8]>> {
        self.drains += 1;
        let mut holders = Vec::new();
        for key in self.owners.iter().take(groups).flatten() {
            if let Some(sessions) = self.keys.get_mut(key)
                && sessions.drained != self.drains
            {
                sessions.drained = self.drains;
                holders.push(key.clone());
            }
        }
        holders
    }

    /// The groups the accumulators hold.
    fn held(&self) -> usize {
        self.slots - self.base
    }

    /// Drains every group's state and merges it back with each session's slots (its own and
    /// those merged into it) as one new slot, in the order the sessions are listed, and the
    /// slots of freed sessions dropped. Returns the compacted state columns of each
    /// aggregate (one row per session, at its new slot).
    fn compact(&mut self) -> Result<Vec<Vec<ArrayRef>>> {
        let mut keep: Vec<u32> = Vec::with_capacity(self.held() - self.dead);
        let mut into: Vec<usize> = Vec::with_capacity(self.held() - self.dead);
        let mut live = 0;
        // Keys in the order of their oldest slot, so that the groups stay about in the order
        // the sessions opened (the order they close in, which emission relies on).
        let mut order = self.holders(self.owners.len());
        self.owners.clear();
        if order.len() < self.keys.len() {
            // Every live session holds a group, so this is not expected; keys missed would
            // keep stale slots.
            for (key, sessions) in self.keys.iter_mut() {
                if sessions.drained != self.drains {
                    sessions.drained = self.drains;
                    order.push(key.clone());
                }
            }
        }
        for key in order {
            let Some(sessions) = self.keys.get_mut(&key) else {
                continue;
            };
            for s in sessions.list.iter_mut() {
                for old in std::iter::once(s.slot).chain(s.merged.drain(..)) {
                    keep.push(u32::try_from(old - self.base).unwrap_or(u32::MAX));
                    into.push(live);
                }
                s.slot = live;
                self.owners.push_back(Some(key.clone()));
                live += 1;
            }
        }
        let mut fresh = self.spec.new_accumulators()?;
        self.base = 0;
        if live == 0 {
            // Nothing to keep (and an accumulator holding no group may have no state
            // columns to drain).
            self.accumulators = fresh;
            self.slots = 0;
            self.dead = 0;
            return Ok(vec![Vec::new(); self.accumulators.len()]);
        }
        let keep = UInt32Array::from(keep);
        let mut compacted = Vec::with_capacity(self.accumulators.len());
        for (acc, new) in self.accumulators.iter_mut().zip(fresh.iter_mut()) {
            let state = acc.state(EmitTo::All)?;
            let kept = state
                .iter()
                .map(|c| take(c, &keep, None))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            new.merge_batch(&kept, &into, live)?;
            if keep.len() == live {
                // No merged slots: the kept rows are the sessions' states, in order.
                compacted.push(kept);
            } else {
                // One row per session: its state after the merge (merged sessions combined).
                let merged = new.state(EmitTo::All)?;
                new.merge_batch(&merged, &(0..live).collect::<Vec<_>>(), live)?;
                compacted.push(merged);
            }
        }
        self.accumulators = fresh;
        self.slots = live;
        self.dead = 0;
        Ok(compacted)
    }

    /// The aggregates' values of `slots` (one row per slot, in order) from `compacted`, the
    /// state [`SessionOperator::compact`] returned.
    fn values_of(&self, compacted: &[Vec<ArrayRef>], slots: &[usize]) -> Result<Vec<ArrayRef>> {
        let picked = UInt32Array::from_iter_values(
            slots.iter().map(|s| u32::try_from(*s).unwrap_or(u32::MAX)),
        );
        let rows: Vec<usize> = (0..slots.len()).collect();
        let mut out = Vec::with_capacity(self.accumulators.len());
        let mut copies = self.spec.new_accumulators()?;
        for (state, copy) in compacted.iter().zip(copies.iter_mut()) {
            let picked = state
                .iter()
                .map(|c| take(c, &picked, None))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            copy.merge_batch(&picked, &rows, slots.len())?;
            out.push(copy.evaluate(EmitTo::All)?);
        }
        Ok(out)
    }
}

impl SessionOperator {
    /// The types of the aggregates' output columns.
    fn value_types(&self) -> Vec<DataType> {
        let first = self.spec.output_schema.fields().len() - self.spec.aggregates.len();
        self.spec.output_schema.fields()[first..]
            .iter()
            .map(|f| f.data_type().clone())
            .collect()
    }

    /// Rows in the aggregation's output schema: per row its key (row-encoded) and window,
    /// and per aggregate a column of values.
    fn output<'k>(
        &self,
        keys: impl Iterator<Item = &'k [u8]>,
        starts: &[i64],
        ends: &[i64],
        values: Vec<ArrayRef>,
    ) -> Result<RecordBatch> {
        let parser = self.row_converter.parser();
        let keys = self
            .row_converter
            .convert_rows(keys.map(|k| parser.parse(k)))?;
        let keys = if self.spec.groups.is_empty() {
            Vec::new()
        } else {
            keys
        };
        let starts: ArrayRef = Arc::new(TimestampMillisecondArray::from(starts.to_vec()));
        let ends: ArrayRef = Arc::new(TimestampMillisecondArray::from(ends.to_vec()));
        let window: ArrayRef = Arc::new(StructArray::try_new(
            window_fields(),
            vec![starts, ends],
            None,
        )?);
        self.spec.output_batch(keys, window, values)
    }

    /// The rows withdrawing published ones, as one batch.
    fn retraction_emission(&self, rows: Vec<SessionRow>) -> Result<Option<Emission>> {
        if rows.is_empty() {
            return Ok(None);
        }
        let values = (0..self.spec.aggregates.len())
            .map(|a| {
                let parts: Vec<&dyn Array> = rows.iter().map(|r| r.3[a].as_ref()).collect();
                Ok(concat(&parts)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let starts: Vec<i64> = rows.iter().map(|r| r.1).collect();
        let ends: Vec<i64> = rows.iter().map(|r| r.2).collect();
        let batch = self.output(rows.iter().map(|r| r.0.as_ref()), &starts, &ends, values)?;
        Ok(Some(Emission {
            batch,
            revisions: rows.iter().map(|r| r.4).collect(),
            is_final: true,
            retract: false,
            until: ends.iter().copied().max().unwrap_or(i64::MIN),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::StringArray;
    use datafusion::arrow::datatypes::{Field, Schema, TimeUnit};
    use datafusion::functions_aggregate::sum::sum_udaf;
    use datafusion::physical_expr::aggregate::AggregateExprBuilder;
    use datafusion::physical_expr::expressions::col;

    /// `SELECT k, sum(v) … GROUP BY session(t, 10 ms), k` with lateness 1 s, over input
    /// `(k, t, v)`.
    fn sum_by_key() -> SessionOperator {
        let input = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new("t", DataType::Timestamp(TimeUnit::Millisecond, None), false),
            Field::new("v", DataType::Int64, false),
        ]));
        let column = |name: &str| col(name, &input).expect("column");
        let sum = AggregateExprBuilder::new(sum_udaf(), vec![column("v")])
            .schema(input.clone())
            .alias("s")
            .build()
            .expect("sum");
        let group_schema = Arc::new(Schema::new(vec![Field::new("k", DataType::Utf8, false)]));
        let window = Field::new("window", DataType::Struct(window_fields()), false);
        let output_schema = Arc::new(Schema::new(vec![
            window,
            Field::new("k", DataType::Utf8, false),
            Field::new("s", DataType::Int64, true),
        ]));
        let spec = AggregateSpec {
            window: WindowSpec::Session { gap: 10 },
            time: column("t"),
            groups: vec![column("k")],
            window_position: 0,
            aggregates: vec![Arc::new(sum)],
            filters: vec![None],
            output_schema,
            group_schema,
        };
        SessionOperator::new(spec, 1_000).expect("operator")
    }

    fn events(rows: &[(&str, i64, i64)]) -> RecordBatch {
        let k: ArrayRef = Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0)));
        let t: ArrayRef = Arc::new(TimestampMillisecondArray::from_iter_values(
            rows.iter().map(|r| r.1),
        ));
        let v: ArrayRef = Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.2)));
        RecordBatch::try_from_iter(vec![("k", k), ("t", t), ("v", v)]).expect("batch")
    }

    /// A key's sessions.
    fn sessions_of<'a>(op: &'a SessionOperator, key: &str) -> &'a [Session] {
        let keys: ArrayRef = Arc::new(StringArray::from(vec![key]));
        let rows = op.row_converter.convert_columns(&[keys]).expect("rows");
        op.keys
            .get(rows.row(0).as_ref())
            .map(|s| &s.list[..])
            .unwrap_or_default()
    }

    /// The latest published (start, sum) of each key's sessions, by (key, start).
    fn apply(published: &mut BTreeMap<(String, i64), (u32, i64)>, emissions: Vec<Emission>) {
        for e in emissions {
            let window = e
                .batch
                .column(0)
                .as_any()
                .downcast_ref::<StructArray>()
                .expect("window");
            let starts = window
                .column(0)
                .as_any()
                .downcast_ref::<TimestampMillisecondArray>()
                .expect("start");
            let keys = e
                .batch
                .column(1)
                .as_any()
                .downcast_ref::<StringArray>()
                .expect("k");
            let sums = e
                .batch
                .column(2)
                .as_any()
                .downcast_ref::<Int64Array>()
                .expect("s");
            for r in 0..e.batch.num_rows() {
                let id = (keys.value(r).to_string(), starts.value(r));
                if e.retract {
                    published.remove(&id);
                } else {
                    published.insert(id, (e.revisions[r], sums.value(r)));
                }
            }
        }
    }

    /// A due session's slots lie in the oldest groups: only those are drained, and the
    /// sessions holding them move to new slots at the end. Here one of them holds a merged
    /// slot there and its own slot after it (a session that opened earlier, out of order,
    /// took in one that had moved already); its state must come through whole.
    #[test]
    fn emitting_from_the_oldest_groups_keeps_every_session_state() {
        let mut op = sum_by_key();
        let mut published = BTreeMap::new();
        let mut step = |op: &mut SessionOperator, rows: &[(&str, i64, i64)], watermark: i64| {
            op.update(&events(rows)).expect("update");
            let emitted = op.advance(watermark, false).expect("advance");
            apply(&mut published, emitted);
        };
        // Slots: a 0, x 1, g0 2, g1 3.
        step(
            &mut op,
            &[
                ("a", 100, 1),
                ("x", 100, 10),
                ("g0", 100, 100),
                ("g1", 100, 100),
            ],
            100,
        );
        step(
            &mut op,
            &[("a", 108, 2), ("g0", 108, 100), ("g1", 108, 100)],
            109,
        );
        // x closes (end 110): the oldest two groups are drained; a moves to 4, x to 5.
        step(
            &mut op,
            &[("a", 115, 4), ("g0", 115, 100), ("g1", 115, 100)],
            115,
        );
        assert_eq!((op.base, op.slots), (2, 6));
        // a's session at 82 opens out of order (slot 6); 91 bridges it with the one at 100
        // (less than the gap, 10, from both), which merges into it: a's session holds slot 6
        // and the moved slot 4.
        step(
            &mut op,
            &[
                ("a", 82, 8),
                ("a", 91, 16),
                ("g0", 120, 100),
                ("g1", 120, 100),
            ],
            120,
        );
        step(
            &mut op,
            &[
                ("h0", 121, 1000),
                ("h1", 121, 1000),
                ("h2", 121, 1000),
                ("h3", 121, 1000),
            ],
            121,
        );
        let a = sessions_of(&op, "a");
        assert_eq!(a.len(), 1);
        assert_eq!((a[0].slot, a[0].merged.clone()), (6, vec![4]));
        // x's revision (slot 5) drains groups 2..=5 only: g0, g1, a's slot 4 and x.
        step(
            &mut op,
            &[
                ("x", 105, 20),
                ("a", 124, 64),
                ("g0", 125, 100),
                ("g1", 125, 100),
            ],
            125,
        );
        assert_eq!(op.base, 6);
        let a = sessions_of(&op, "a");
        assert_eq!(a[0].slot, 6);
        assert_eq!(a[0].merged.len(), 1);
        // Everything closes.
        step(&mut op, &[], 500);
        let sums: Vec<(String, i64, i64)> = published
            .into_iter()
            .map(|((k, start), (_, sum))| (k, start, sum))
            .collect();
        assert_eq!(
            sums,
            vec![
                ("a".into(), 82, 95),
                ("g0".into(), 100, 500),
                ("g1".into(), 100, 500),
                ("h0".into(), 121, 1000),
                ("h1".into(), 121, 1000),
                ("h2".into(), 121, 1000),
                ("h3".into(), 121, 1000),
                ("x".into(), 100, 30),
            ]
        );
    }

    #[test]
    fn timers_come_due_in_time_across_buckets_and_within_one() {
        let mut timers = Timers::default();
        let key = |s: &str| -> Arc<[u8]> { s.as_bytes().into() };
        for (at, k) in [
            (-1_500, "neg"),
            (999, "a"),
            (1_000, "b"),
            (1_400, "c"),
            (1_999, "d"),
            (5_000, "e"),
        ] {
            timers.push(at, key(k));
        }
        let mut due = Vec::new();
        let mut take = |timers: &mut Timers, t: i64| {
            due.clear();
            timers.take_due(t, &mut due);
            let mut names: Vec<String> = due
                .iter()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .collect();
            names.sort();
            names
        };
        assert_eq!(take(&mut timers, -2_000), Vec::<String>::new());
        assert_eq!(take(&mut timers, 1_000), ["a", "b", "neg"]);
        // Within the bucket of 1 000..2 000: only what is due.
        assert_eq!(take(&mut timers, 1_500), ["c"]);
        assert_eq!(timers.len(), 2);
        timers.push(1_600, key("f"));
        assert_eq!(take(&mut timers, 4_999), ["d", "f"]);
        assert_eq!(take(&mut timers, 5_000), ["e"]);
        assert_eq!(timers.len(), 0);
        assert!(timers.buckets.is_empty());
    }
}
