//! The session-window operator: per group key, events less than `gap` apart form one session.
//!
//! Each session holds its own DataFusion accumulators (one group each). An event joins every
//! session of its key that it is within `gap` of, merging them (`state` → `merge_batch`); a
//! session `[first event, last event + gap)` is emitted when the watermark reaches its end and
//! freed when the watermark reaches end + allowed lateness. A late event within the allowed
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

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, BinaryArray, BooleanArray, Int64Array, RecordBatch, StructArray,
    TimestampMillisecondArray, UInt32Array, UInt64Array, new_null_array,
};
use datafusion::arrow::compute::{cast, concat};
use datafusion::arrow::datatypes::DataType;
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::{Result, internal_err};
use datafusion::logical_expr::{EmitTo, GroupsAccumulator};
use urbanstream_operators::window::{WindowSpec, window_fields};

use super::WindowedAggregation;
use super::window::{AggregateSpec, Emission, Inputs};
use crate::checkpoint::{StateSnapshot, column, meta_field, table, typed};

struct Session {
    start: i64,
    last: i64,
    accumulators: Vec<Box<dyn GroupsAccumulator>>,
    updated: u64,
    emitted_at: Option<u64>,
    final_fired: bool,
    revisions: u32,
    /// The row last published for it, under the window it had then.
    published: Option<Published>,
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
    keys: HashMap<Box<[u8]>, Vec<Session>>,
    row_converter: RowConverter,
    watermark: i64,
    late_frontier: i64,
    evicted_through: i64,
    step: u64,
    /// Published rows no session stands for any more (merged into another, or moved to an
    /// earlier start), to retract at the next emission.
    retractions: Vec<SessionRow>,
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
            spec,
            gap,
            lateness_ms: lateness_ms.max(0),
            keys: HashMap::new(),
            watermark: i64::MIN,
            late_frontier: i64::MIN,
            evicted_through: i64::MIN,
            step: 0,
            retractions: Vec::new(),
        })
    }
}

impl WindowedAggregation for SessionOperator {
    fn update(&mut self, batch: &RecordBatch) -> Result<()> {
        let n = batch.num_rows();
        if n == 0 {
            return Ok(());
        }
        self.step += 1;
        let Inputs {
            times,
            keys,
            args,
            filters,
        } = self.spec.inputs(batch)?;
        let rows = self.row_converter.convert_columns(&keys)?;
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| {
            rows.row(a)
                .cmp(&rows.row(b))
                .then(times.value(a).cmp(&times.value(b)))
        });
        let step = self.step;
        let gap = self.gap;
        for i in order {
            let t = times.value(i);
            let key = rows.row(i);
            if !self.keys.contains_key(key.as_ref()) {
                self.keys.insert(key.as_ref().into(), Vec::new());
            }
            let fresh = self.spec.new_accumulators()?;
            let Some(sessions) = self.keys.get_mut(key.as_ref()) else {
                continue;
            };
            let touching: Vec<usize> = sessions
                .iter()
                .enumerate()
                .filter(|(_, s)| s.start - gap <= t && t <= s.last + gap)
                .map(|(j, _)| j)
                .collect();
            let target = match touching.first() {
                None => {
                    sessions.push(Session {
                        start: t,
                        last: t,
                        accumulators: fresh,
                        updated: step,
                        emitted_at: None,
                        final_fired: false,
                        revisions: 0,
                        published: None,
                    });
                    sessions.len() - 1
                }
                Some(&first) => {
                    // Merge every other touched session into the first (latest first, so the
                    // indices stay valid).
                    for &j in touching[1..].iter().rev() {
                        let mut other = sessions.remove(j);
                        if let Some(p) = other.published.take() {
                            self.retractions.push(retraction(key.as_ref(), p));
                        }
                        let s = &mut sessions[first];
                        for (acc, other_acc) in
                            s.accumulators.iter_mut().zip(other.accumulators.iter_mut())
                        {
                            let state = other_acc.state(EmitTo::All)?;
                            acc.merge_batch(&state, &[0], 1)?;
                        }
                        s.last = s.last.max(other.last);
                        s.final_fired = false;
                    }
                    first
                }
            };
            let s = &mut sessions[target];
            if t < s.start {
                // The session now starts earlier: it is a new window for consumers, and the
                // row published under the old start is withdrawn.
                if let Some(p) = s.published.take() {
                    self.retractions.push(retraction(key.as_ref(), p));
                }
                s.start = t;
                s.revisions = 0;
                s.final_fired = false;
            }
            if t > s.last {
                // The session now ends later: it closes again.
                s.final_fired = false;
                s.last = t;
            }
            s.updated = step;
            for (a, acc) in s.accumulators.iter_mut().enumerate() {
                let row_args: Vec<ArrayRef> = args[a].iter().map(|c| c.slice(i, 1)).collect();
                let filter = filters[a].as_ref().map(|f| f.slice(i, 1));
                let filter = filter
                    .as_ref()
                    .and_then(|f| f.as_any().downcast_ref::<BooleanArray>());
                acc.update_batch(&row_args, &[0], filter, 1)?;
            }
            sessions.sort_by_key(|s| s.start);
        }
        Ok(())
    }

    fn advance(&mut self, watermark: i64, early_fire: bool) -> Result<Vec<Emission>> {
        self.watermark = self.watermark.max(watermark);
        let mut finals: Vec<SessionRow> = Vec::new();
        let mut partials: Vec<SessionRow> = Vec::new();
        let step = self.step;
        for (key, sessions) in self.keys.iter_mut() {
            for s in sessions.iter_mut() {
                let end = s.last + self.gap;
                let changed = s.updated > s.emitted_at.unwrap_or(0);
                let (emit, is_final) = if !s.final_fired && end <= self.watermark {
                    (true, true)
                } else if s.final_fired {
                    (changed, true)
                } else {
                    (early_fire && changed, false)
                };
                if !emit {
                    continue;
                }
                let values = evaluate(s, &self.spec)?;
                s.published = Some(Published {
                    start: s.start,
                    end,
                    values: values.clone(),
                    revisions: s.revisions + 1,
                });
                let row = (key.clone(), s.start, end, values, s.revisions);
                s.revisions += 1;
                s.emitted_at = Some(step);
                if is_final {
                    s.final_fired = true;
                    finals.push(row);
                } else {
                    partials.push(row);
                }
            }
        }
        let mut out = Vec::new();
        // Withdrawn rows go first, so that a consumer applying the changelog in order never
        // holds a merged session and its parts at once.
        let retractions = std::mem::take(&mut self.retractions);
        if let Some(mut e) = self.emission(retractions, true)? {
            e.retract = true;
            out.push(e);
        }
        for (rows, is_final) in [(finals, true), (partials, false)] {
            if let Some(e) = self.emission(rows, is_final)? {
                out.push(e);
            }
        }
        // Evict sessions past end + allowed lateness.
        let frontier = self.watermark.saturating_sub(self.lateness_ms);
        self.late_frontier = frontier;
        let gap = self.gap;
        for sessions in self.keys.values_mut() {
            sessions.retain(|s| !(s.final_fired && s.last + gap <= frontier));
        }
        self.keys.retain(|_, s| !s.is_empty());
        let oldest_live = self.keys.values().flatten().map(|s| s.start).min();
        self.evicted_through = match oldest_live {
            Some(start) => frontier.min(start.saturating_add(gap) - 1),
            None => frontier,
        };
        Ok(out)
    }

    fn is_late(&self, t: i64) -> bool {
        t.saturating_add(self.gap) <= self.late_frontier
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
        let rows = self.row_converter.convert_columns(&keys)?;
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
                            .any(|s| s.start - gap <= t && t <= s.last + gap)
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
        self.keys.values().map(Vec::len).sum()
    }

    fn state_bytes(&self) -> usize {
        self.keys
            .iter()
            .map(|(k, s)| {
                k.len()
                    + s.iter()
                        .map(|s| s.accumulators.iter().map(|a| a.size()).sum::<usize>())
                        .sum::<usize>()
            })
            .sum()
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
        let mut states: Vec<Vec<Vec<ArrayRef>>> = vec![Vec::new(); self.spec.aggregates.len()];
        for (key, sessions) in self.keys.iter_mut() {
            for s in sessions.iter_mut() {
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
                for (a, acc) in s.accumulators.iter_mut().enumerate() {
                    let state = acc.state(EmitTo::All)?;
                    acc.merge_batch(&state, &[0], 1)?;
                    states[a].push(state);
                }
            }
        }
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
            for (a, per_session) in states.iter().enumerate() {
                let width = per_session.first().map_or(0, Vec::len);
                state_columns.push(width);
                for j in 0..width {
                    let parts: Vec<&dyn Array> =
                        per_session.iter().map(|s| s[j].as_ref()).collect();
                    columns.push((format!("state{a}_{j}"), concat(&parts)?));
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

    fn restore(&mut self, snapshot: &StateSnapshot) -> crate::Result<()> {
        let meta = &snapshot.meta;
        self.watermark = meta_field(meta, "watermark")?;
        self.late_frontier = meta_field(meta, "late_frontier")?;
        self.evicted_through = meta_field(meta, "evicted_through")?;
        self.step = meta_field(meta, "step")?;
        let state_columns: Vec<usize> = meta_field(meta, "state_columns")?;
        self.keys.clear();
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
        for r in 0..t.num_rows() {
            let mut accumulators = self.spec.new_accumulators()?;
            for (a, acc) in accumulators.iter_mut().enumerate() {
                let state: Vec<ArrayRef> = (0..state_columns[a])
                    .map(|j| column(t, &format!("state{a}_{j}")).map(|c| c.slice(r, 1)))
                    .collect::<crate::Result<_>>()?;
                acc.merge_batch(&state, &[0], 1)?;
            }
            self.keys
                .entry(keys.value(r).into())
                .or_default()
                .push(Session {
                    start: starts.value(r),
                    last: lasts.value(r),
                    accumulators,
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
                });
        }
        for sessions in self.keys.values_mut() {
            sessions.sort_by_key(|s| s.start);
        }
        Ok(())
    }
}

type SessionRow = (Box<[u8]>, i64, i64, Vec<ArrayRef>, u32);

/// The row withdrawing a published one: its key and window, the values it was published
/// with (so filters above the aggregation treat it as they treated the row), and the next
/// revision of that window.
fn retraction(key: &[u8], p: Published) -> SessionRow {
    (key.into(), p.start, p.end, p.values, p.revisions)
}

/// The session's aggregate values (one row each), leaving its state as it was.
fn evaluate(session: &mut Session, spec: &AggregateSpec) -> Result<Vec<ArrayRef>> {
    let mut fresh = spec.new_accumulators()?;
    let mut out = Vec::with_capacity(fresh.len());
    for (acc, copy) in session.accumulators.iter_mut().zip(fresh.iter_mut()) {
        let state = acc.state(EmitTo::All)?;
        acc.merge_batch(&state, &[0], 1)?;
        copy.merge_batch(&state, &[0], 1)?;
        out.push(copy.evaluate(EmitTo::All)?);
    }
    Ok(out)
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

    /// One batch of emitted sessions, in the aggregation's output schema.
    fn emission(&self, rows: Vec<SessionRow>, is_final: bool) -> Result<Option<Emission>> {
        if rows.is_empty() {
            return Ok(None);
        }
        let parser = self.row_converter.parser();
        let keys = self
            .row_converter
            .convert_rows(rows.iter().map(|r| parser.parse(&r.0)))?;
        let keys = if self.spec.groups.is_empty() {
            Vec::new()
        } else {
            keys
        };
        let starts: ArrayRef = Arc::new(TimestampMillisecondArray::from_iter_values(
            rows.iter().map(|r| r.1),
        ));
        let ends: ArrayRef = Arc::new(TimestampMillisecondArray::from_iter_values(
            rows.iter().map(|r| r.2),
        ));
        let window: ArrayRef = Arc::new(StructArray::try_new(
            window_fields(),
            vec![starts, ends],
            None,
        )?);
        let values = (0..self.spec.aggregates.len())
            .map(|a| {
                let parts: Vec<&dyn Array> = rows.iter().map(|r| r.3[a].as_ref()).collect();
                Ok(concat(&parts)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let batch = self.spec.output_batch(keys, window, values)?;
        Ok(Some(Emission {
            batch,
            revisions: rows.iter().map(|r| r.4).collect(),
            is_final,
            retract: false,
            until: rows.iter().map(|r| r.2).max().unwrap_or(i64::MIN),
        }))
    }
}
