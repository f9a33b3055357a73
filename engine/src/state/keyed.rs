//! Keyed series state: the detectors, health checks and alert machines of stream queries.
//!
//! A detector is written in SQL as a window function over one entity's series,
//! `anomaly_score(speed, window_end) OVER (PARTITION BY segment_id ORDER BY window_end)`.
//! DataFusion plans it as a `WindowAggExec` that would start every partition from scratch on
//! each execution; [`replace_series_windows`] swaps it for a [`KeyedSeriesExec`], which keeps
//! one [`SeriesState`] per key and function across the micro-batches of the query:
//!
//! - each execution takes the rows of a micro-batch (or a window emission), orders them by
//!   the `ORDER BY` time, steps each key's state row by row and appends the function columns;
//!   a row older than the key's last one (a revision of an earlier window) is scored against
//!   the state without being learnt;
//! - states that want to speak without input (`sensor_missing` for a sensor gone silent, an
//!   `alert_state` that expires) are woken when the query watermark passes their time: the
//!   execution then appends a row for the key that repeats its last row, with the `ORDER BY`
//!   column set to that time, so the query above sees it like any other row.
//!
//! Rows of one key reach it in time order, so that results do not depend on how the input is
//! cut into micro-batches: over a stream's events, the planner holds the rows until the
//! watermark passes them and releases them sorted (`plan/ordered.rs`); over windows, rows
//! come as windows close. Elsewhere (below a window, over a join or a union of streams) it is
//! refused.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BinaryArray, BinaryBuilder, BooleanArray, Int64Array,
    LargeBinaryArray, LargeBinaryBuilder, RecordBatch, StructArray, new_null_array,
};
use datafusion::arrow::compute::{cast, concat_batches};
use datafusion::arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{DataFusionError, Result, ScalarValue, plan_err};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::expressions::{CastExpr, Column, TryCastExpr};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::windows::{
    BoundedWindowAggExec, StandardWindowExpr, WindowAggExec, WindowExpr, WindowUDFExpr,
};
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
    ReplaceChildrenOptions, collect,
};
use urbanstream_operators::detect::udwf::{SeriesFunc, SeriesKind, inputs};
use urbanstream_operators::detect::{Emitted, SeriesState};

use super::layered::{Layered, Shared};
use crate::checkpoint::{DeferredTable, StateSnapshot, column, meta_field, table, typed};

/// `PARTITION BY` and `ORDER BY` of a window specification.
type Spec = (Vec<Arc<dyn PhysicalExpr>>, Arc<dyn PhysicalExpr>);

/// One function call of a [`KeyedSeriesExec`].
#[derive(Debug, Clone)]
struct Call {
    kind: SeriesKind,
    value: Arc<dyn PhysicalExpr>,
    ts: Arc<dyn PhysicalExpr>,
    prototype: SeriesState,
}

/// One key's state.
#[derive(Debug)]
struct KeyState {
    last_t: i64,
    series: Vec<SeriesState>,
    /// The key's last input row, kept only when some state has timers.
    last_row: Option<Vec<ScalarValue>>,
    due: Option<i64>,
}

impl Clone for KeyState {
    fn clone(&self) -> Self {
        let Self {
            last_t,
            series,
            last_row,
            due,
        } = self;
        Self {
            last_t: *last_t,
            series: series.clone(),
            last_row: last_row.clone(),
            due: *due,
        }
    }

    /// Reuses the detectors' buffers: a key copied while a checkpoint holds it, into a state
    /// the last checkpoint let go of, touches no fresh memory ([`Layered`]).
    fn clone_from(&mut self, source: &Self) {
        let Self {
            last_t,
            series,
            last_row,
            due,
        } = source;
        self.last_t = *last_t;
        self.series.clone_from(series);
        self.last_row.clone_from(last_row);
        self.due = *due;
    }
}

/// The state of one [`KeyedSeriesExec`], shared by its executions.
///
/// The keys are a [`Layered`] map: a checkpoint takes all of them at once (one reference,
/// whatever their number) and encodes them on the thread that writes it, while a key the
/// query changes meanwhile is copied in front of them first, into the buffers of a key state
/// that the previous checkpoint let go of (a copy then costs a copy, not fresh memory to be
/// faulted in: about 9 µs a day-old `anomaly_score` key took that way).
#[derive(Debug)]
pub struct KeyedStore {
    keys: Layered<Box<[u8]>, KeyState>,
    /// Earliest wake-up time over all keys.
    next_due: Option<i64>,
    /// Watermark of the last sweep for silent keys.
    swept_at: Option<i64>,
    /// Keys dropped for silence so far.
    expired: u64,
}

impl Default for KeyedStore {
    fn default() -> Self {
        Self {
            keys: Layered::with_spares(),
            next_due: None,
            swept_at: None,
            expired: 0,
        }
    }
}

impl KeyedStore {
    /// Keys dropped so far because they stayed silent longer than the query's key TTL.
    pub fn expired(&self) -> u64 {
        self.expired
    }

    /// Drops the keys whose last row is more than `ttl` before `watermark` and that wait on
    /// no timer. Sweeps at most once per tenth of the TTL of event time.
    fn expire(&mut self, watermark: i64, ttl: i64) {
        if watermark == i64::MIN
            || self
                .swept_at
                .is_some_and(|s| watermark.saturating_sub(s) < (ttl / 10).max(1))
        {
            return;
        }
        self.swept_at = Some(watermark);
        let horizon = watermark.saturating_sub(ttl);
        let before = self.keys.len();
        self.keys.retain(|k| {
            k.due.is_some() || k.last_t >= horizon || k.series.iter().any(SeriesState::is_open)
        });
        self.expired += (before - self.keys.len()) as u64;
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Approximate bytes held: the keys' states and the spare states kept for the next
    /// checkpoint's copies ([`Layered::with_spares`], at most one a key). A checkpoint being
    /// written holds an older copy of the keys changed meanwhile besides.
    pub fn bytes(&self) -> usize {
        let state = |s: &KeyState| {
            std::mem::size_of::<KeyState>()
                + s.series.iter().map(SeriesState::size).sum::<usize>()
                + s.last_row
                    .as_ref()
                    .map_or(0, |r| r.iter().map(ScalarValue::size).sum::<usize>())
        };
        self.keys
            .iter()
            .map(|(k, s)| k.len() + state(s))
            .sum::<usize>()
            + self.keys.spares().map(state).sum::<usize>()
    }
}

/// What the query runtime holds of a [`KeyedSeriesExec`]: its state and the watermark it
/// wakes timers with.
#[derive(Debug, Clone)]
pub struct KeyedHandle {
    store: Arc<Mutex<KeyedStore>>,
    watermark: Arc<AtomicI64>,
    timers: bool,
    /// Event time a key may stay silent before its state is dropped, ms; `i64::MAX` for
    /// ever.
    ttl: Arc<AtomicI64>,
    /// Names of its functions, for explanations.
    functions: Vec<String>,
    /// What its state holds: the keys and each call with its arguments.
    layout: String,
    /// The types of its input's columns, which a key's kept last row holds.
    row_types: Vec<DataType>,
}

impl KeyedHandle {
    /// The names of the functions whose state it holds.
    pub fn functions(&self) -> Vec<String> {
        self.functions.clone()
    }

    /// What its state holds, as one line: the `PARTITION BY` keys and each function with
    /// its arguments (column positions left out).
    pub fn layout(&self) -> &str {
        &self.layout
    }

    /// Sets how long a key may stay silent before its state is dropped (`None`: for ever).
    pub fn set_ttl(&self, ttl_ms: Option<i64>) {
        self.ttl
            .store(ttl_ms.unwrap_or(i64::MAX), AtomicOrdering::Relaxed);
    }

    /// Sets the watermark the next executions wake timers with.
    pub fn set_watermark(&self, watermark: i64) {
        self.watermark.store(watermark, AtomicOrdering::Relaxed);
    }

    /// Whether some state wakes on the watermark (so the plan must run even without input).
    pub fn has_timers(&self) -> bool {
        self.timers
    }

    /// Runs `f` on the state.
    pub fn with_store<T>(&self, f: impl FnOnce(&KeyedStore) -> T) -> Option<T> {
        self.store.lock().ok().map(|s| f(&s))
    }

    /// The state for a checkpoint: table `keys`, per key (row-encoded) its last time, next
    /// wake-up, detector states (CBOR) and, with timers, its last input row (`row<i>`
    /// columns, `has_row` false where it has none). The table is deferred: the query's
    /// thread only takes the keys ([`Layered::share`]), and the table is encoded from them
    /// when the snapshot is resolved ([`StateSnapshot::resolve`]).
    pub fn snapshot(&self) -> crate::Result<StateSnapshot> {
        let mut store = self
            .store
            .lock()
            .map_err(|_| crate::Error::Checkpoint("keyed state lock poisoned".into()))?;
        let mut out = StateSnapshot {
            meta: serde_json::json!({ "next_due": store.next_due }),
            ..Default::default()
        };
        if store.keys.is_empty() {
            return Ok(out);
        }
        let taken = TakenKeys(store.keys.share());
        out.deferred.insert("keys".into(), Arc::new(taken));
        Ok(out)
    }

    /// Replaces the state with a [`KeyedHandle::snapshot`] of the same query.
    pub fn restore(&self, snapshot: &StateSnapshot) -> crate::Result<()> {
        let mut store = self
            .store
            .lock()
            .map_err(|_| crate::Error::Checkpoint("keyed state lock poisoned".into()))?;
        store.keys.clear();
        store.next_due = meta_field(&snapshot.meta, "next_due")?;
        let Some(t) = snapshot.tables.get("keys") else {
            return Ok(());
        };
        let keys = typed::<BinaryArray>(column(t, "key")?, "key")?;
        let last_t = typed::<Int64Array>(column(t, "last_t")?, "last_t")?;
        let due = typed::<Int64Array>(column(t, "due")?, "due")?;
        // `Binary` in checkpoints written before the column had large offsets.
        let series = cast(column(t, "series")?, &DataType::LargeBinary)
            .map_err(|e| crate::Error::Checkpoint(format!("detector state: {e}")))?;
        let series = typed::<LargeBinaryArray>(&series, "series")?;
        let has_row = typed::<BooleanArray>(column(t, "has_row")?, "has_row")?;
        // Kept rows as the input's columns are now: a checkpoint of an earlier version may
        // hold a detector's struct with fewer fields (before `scale`).
        let rows: Vec<ArrayRef> = (0..)
            .map_while(|c| t.column_by_name(&format!("row{c}")))
            .enumerate()
            .map(|(c, column)| match self.row_types.get(c) {
                Some(to) => fit(column, to),
                None => Ok(Arc::clone(column)),
            })
            .collect::<Result<_>>()?;
        for r in 0..t.num_rows() {
            let states: Vec<SeriesState> = ciborium::from_reader(series.value(r))
                .map_err(|e| crate::Error::Checkpoint(format!("detector state: {e}")))?;
            let last_row = if has_row.value(r) {
                Some(
                    rows.iter()
                        .map(|c| ScalarValue::try_from_array(c, r).map(ScalarValue::compacted))
                        .collect::<Result<Vec<_>>>()?,
                )
            } else {
                None
            };
            store.keys.insert(
                keys.value(r).into(),
                KeyState {
                    last_t: last_t.value(r),
                    series: states,
                    last_row,
                    due: (!due.is_null(r)).then(|| due.value(r)),
                },
            );
        }
        Ok(())
    }
}

/// The keys' states as a [`KeyedHandle::snapshot`] took them, encoded into its `keys` table
/// when the snapshot is resolved.
#[derive(Debug)]
struct TakenKeys(Shared<Box<[u8]>, KeyState>);

impl DeferredTable for TakenKeys {
    fn compute(&self) -> crate::Result<RecordBatch> {
        let n = self.0.len();
        // Large offsets: 7.5 KB of state a key passes 2 GiB at under 300 000 keys.
        let (mut keys, mut series) = (BinaryBuilder::new(), LargeBinaryBuilder::new());
        let (mut last_t, mut due, mut has_row) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let mut bytes = Vec::new();
        for (key, state) in self.0.iter() {
            keys.append_value(key);
            last_t.push(state.last_t);
            due.push(state.due);
            // CBOR, not JSON: detector state holds non-finite floats (an empty minimum).
            bytes.clear();
            ciborium::into_writer(&state.series, &mut bytes).map_err(|e| {
                crate::Error::Checkpoint(format!("cannot encode detector state: {e}"))
            })?;
            series.append_value(&bytes);
            has_row.push(state.last_row.is_some());
        }
        let mut columns: Vec<(String, ArrayRef)> = vec![
            ("key".into(), Arc::new(keys.finish())),
            ("last_t".into(), Arc::new(Int64Array::from(last_t))),
            ("due".into(), Arc::new(Int64Array::from(due))),
            ("series".into(), Arc::new(series.finish())),
            ("has_row".into(), Arc::new(BooleanArray::from(has_row))),
        ];
        let states = || self.0.values();
        let width = states()
            .find_map(|s| s.last_row.as_ref().map(Vec::len))
            .unwrap_or(0);
        for c in 0..width {
            let Some(like) = states().find_map(|s| s.last_row.as_ref().map(|r| r[c].data_type()))
            else {
                continue;
            };
            let null = ScalarValue::try_from(&like)?;
            let values =
                states().map(|s| s.last_row.as_ref().map_or(null.clone(), |r| r[c].clone()));
            columns.push((format!("row{c}"), ScalarValue::iter_to_array(values)?));
        }
        table(columns)
    }
}

/// Keeps detector, health and alert state per key across executions; see the module doc.
#[derive(Debug, Clone)]
pub struct KeyedSeriesExec {
    input: Arc<dyn ExecutionPlan>,
    schema: SchemaRef,
    keys: Vec<Arc<dyn PhysicalExpr>>,
    order: Arc<dyn PhysicalExpr>,
    calls: Vec<Call>,
    handle: KeyedHandle,
    properties: Arc<PlanProperties>,
}

impl KeyedSeriesExec {
    fn try_new(
        input: Arc<dyn ExecutionPlan>,
        schema: SchemaRef,
        window_exprs: &[Arc<dyn WindowExpr>],
    ) -> Result<Option<Self>> {
        let mut calls = Vec::new();
        let mut layouts = Vec::new();
        let mut spec: Option<Spec> = None;
        let mut foreign = Vec::new();
        for w in window_exprs {
            let udwf = udwf_of(w.as_ref());
            let Some((udwf, func)) = udwf.and_then(|u| {
                u.fun()
                    .inner()
                    .as_ref()
                    .downcast_ref::<SeriesFunc>()
                    .map(|f| (u, f))
            }) else {
                foreign.push(w.name().to_string());
                continue;
            };
            let name = func.kind().name();
            let order = match w.order_by() {
                [one] => one.expr.clone(),
                _ => {
                    return plan_err!(
                        "{name}(…) OVER (…) on a stream needs ORDER BY the time column alone, e.g. OVER (PARTITION BY sensor_id ORDER BY event_time)"
                    );
                }
            };
            if w.order_by()[0].options.descending {
                return plan_err!("{name}(…) OVER (…): ORDER BY must be ascending on a stream");
            }
            let this = (w.partition_by().to_vec(), Arc::clone(&order));
            match &spec {
                None => spec = Some(this),
                Some((k, o)) if *k == this.0 && *o == this.1 => {}
                Some(_) => {
                    return plan_err!(
                        "{name}(…): every detector of one SELECT must share PARTITION BY and ORDER BY; use a subquery for another"
                    );
                }
            }
            let args = udwf.args();
            // The function measures durations on its time argument while the rows are stepped
            // in ORDER BY order: another time (`now()`, another column) made an alert that never
            // raised.
            let bare = |e: &Arc<dyn PhysicalExpr>| {
                let mut e = Arc::clone(e);
                loop {
                    let inner = if let Some(c) = e.downcast_ref::<CastExpr>() {
                        Arc::clone(c.expr())
                    } else if let Some(c) = e.downcast_ref::<TryCastExpr>() {
                        Arc::clone(c.expr())
                    } else {
                        return e;
                    };
                    e = inner;
                }
            };
            // (An ORDER BY that is no time is refused below, saying what to order by.)
            if let Some(ts) = args.get(1)
                && bare(ts) != bare(&order)
                && matches!(
                    order.data_type(&input.schema()),
                    Ok(DataType::Timestamp(..) | DataType::Date32 | DataType::Date64)
                )
            {
                let (ts, order) = (super::expr_layout(ts), super::expr_layout(&order));
                return plan_err!(
                    "{name}(…)'s time argument ({ts}) must be the column it is ordered by \
                     ({order}): write {name}(value, {order}, …) OVER (… ORDER BY {order})"
                );
            }
            layouts.push(format!(
                "{}({})",
                func.kind().name(),
                args.iter()
                    .map(|a| super::expr_layout(a))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
            calls.push(Call {
                kind: func.kind(),
                value: args[0].clone(),
                ts: args[1].clone(),
                prototype: func.kind().state_from_exprs(args)?,
            });
        }
        if calls.is_empty() {
            return Ok(None);
        }
        if !foreign.is_empty() {
            return plan_err!(
                "window functions other than urbanstream's detectors are not supported on streams ({}): aggregate with GROUP BY tumble/hop/cumulate instead, and rank a window's groups in a query of their own",
                foreign.join(", ")
            );
        }
        let Some((keys, order)) = spec else {
            return Ok(None);
        };
        let keys = super::series_keys(keys);
        let timers = calls
            .iter()
            .any(|c| matches!(c.kind, SeriesKind::Missing | SeriesKind::Alert));
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(schema.clone()),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Final,
            Boundedness::Bounded,
        ));
        let functions = calls.iter().map(|c| c.kind.name().to_string()).collect();
        let row_types = input
            .schema()
            .fields()
            .iter()
            .map(|f| f.data_type().clone())
            .collect();
        let layout = format!(
            "per ({}) ordered by {}: {}",
            keys.iter()
                .map(|k| super::expr_layout(k))
                .collect::<Vec<_>>()
                .join(", "),
            super::expr_layout(&order),
            layouts.join(", ")
        );
        Ok(Some(Self {
            input,
            schema,
            keys,
            order,
            calls,
            handle: KeyedHandle {
                store: Arc::default(),
                watermark: Arc::new(AtomicI64::new(i64::MIN)),
                timers,
                ttl: Arc::new(AtomicI64::new(i64::MAX)),
                functions,
                layout,
                row_types,
            },
            properties,
        }))
    }

    /// The expressions of its `PARTITION BY`: what its state is kept per.
    pub fn keys(&self) -> &[Arc<dyn PhysicalExpr>] {
        &self.keys
    }

    /// Its `ORDER BY`, over the input's rows.
    pub fn order(&self) -> &Arc<dyn PhysicalExpr> {
        &self.order
    }

    /// The state handle.
    pub fn handle(&self) -> &KeyedHandle {
        &self.handle
    }

    fn run(&self, batches: Vec<RecordBatch>) -> Result<Vec<RecordBatch>> {
        let input_schema = self.input.schema();
        let batch = concat_batches(&input_schema, &batches)?;
        let mut store = self
            .handle
            .store
            .lock()
            .map_err(|_| DataFusionError::Internal("keyed state lock poisoned".into()))?;
        store.keys.settle_before(batch.num_rows());
        let watermark = self.handle.watermark.load(AtomicOrdering::Relaxed);
        let mut out = Vec::new();
        if batch.num_rows() > 0 {
            out.push(self.step(&mut store, &batch, watermark)?);
        }
        if store.next_due.is_some_and(|d| d < watermark)
            && let Some(b) = self.wake(&mut store, watermark)?
        {
            out.push(b);
        }
        let ttl = self.handle.ttl.load(AtomicOrdering::Relaxed);
        if ttl != i64::MAX {
            store.expire(watermark, ttl);
        }
        Ok(out)
    }

    fn converter(&self) -> Result<RowConverter> {
        let input_schema = self.input.schema();
        let fields = self
            .keys
            .iter()
            .map(|k| Ok(SortField::new(k.data_type(&input_schema)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(RowConverter::new(fields)?)
    }

    /// Steps the rows of `batch` in time order. With timers, a key's timers due before a row
    /// of that key fire just before it (and before `watermark`), so that rows and timers are
    /// taken in event-time order however the input was cut into batches. Returns the rows
    /// with their function columns, then the rows the timers fired, ordered by time.
    fn step(
        &self,
        store: &mut KeyedStore,
        batch: &RecordBatch,
        watermark: i64,
    ) -> Result<RecordBatch> {
        let n = batch.num_rows();
        let key_columns = self
            .keys
            .iter()
            .map(|k| k.evaluate(batch)?.into_array(n))
            .collect::<Result<Vec<_>>>()?;
        let converter = self.converter()?;
        let rows = converter.convert_columns(&super::comparable_keys(&key_columns))?;
        let order = self.order.evaluate(batch)?.into_array(n)?;
        let order = cast(&order, &DataType::Timestamp(TimeUnit::Millisecond, None))?;
        let order = order.as_primitive::<datafusion::arrow::datatypes::TimestampMillisecondType>();
        let args = self
            .calls
            .iter()
            .map(|c| {
                let v = c.value.evaluate(batch)?.into_array(n)?;
                let t = c.ts.evaluate(batch)?.into_array(n)?;
                inputs(c.kind.name(), &[v, t])
            })
            .collect::<Result<Vec<_>>>()?;
        // Rows without a time cannot be ordered; they come first and get blank results. Rows
        // at one time are stepped in the order of their values (as LAG takes them).
        let sequence = super::time_then_value_order(batch, order)?;
        let blank: Vec<Emitted> = self.calls.iter().map(|c| c.prototype.blank()).collect();
        let mut outputs: Vec<Vec<Emitted>> = blank.iter().map(|b| vec![*b; n]).collect();
        let timers = self.handle.timers;
        // With timers: each key's latest row of this batch so far (in time order).
        let mut last_row_of: HashMap<Box<[u8]>, usize> = HashMap::new();
        let mut fired = Fired::new(self.calls.len());
        let ttl = self.handle.ttl.load(AtomicOrdering::Relaxed);
        let mut values = Vec::new();
        let mut expired = 0;
        for &r in &sequence {
            let key = rows.row(r);
            if order.is_null(r) {
                // A row without a time cannot be placed: its function columns stay blank,
                // and it creates no state.
                continue;
            }
            let t = order.value(r);
            let fresh = || KeyState {
                last_t: i64::MIN,
                series: self.calls.iter().map(|c| c.prototype.clone()).collect(),
                last_row: None,
                due: None,
            };
            let state = match store.keys.get_mut(key.as_ref()) {
                Some(s) => s,
                None => store.keys.get_or_insert_with(key.as_ref().into(), fresh),
            };
            if timers && state.due.is_some_and(|d| d < t.min(watermark)) {
                let last = last_row_of.get(key.as_ref()).copied();
                fired.fire(
                    state,
                    t.min(watermark),
                    self.order_column(),
                    |row| match last {
                        Some(i) => batch_row(batch, i, row),
                        None => Ok(()),
                    },
                )?;
            }
            // A key silent longer than the TTL starts afresh, whether or not a sweep has
            // dropped it yet (so the result does not depend on when sweeps ran); a timer
            // that fired before this row counts as its last activity, as it does for a sweep.
            if ttl != i64::MAX
                && state.last_t != i64::MIN
                && t.saturating_sub(state.last_t) > ttl
                && state.due.is_none()
                && !state.series.iter().any(SeriesState::is_open)
            {
                *state = fresh();
                expired += 1;
            }
            let in_order = t >= state.last_t;
            if in_order {
                state.last_t = t;
            }
            for (i, (x, ts)) in args.iter().enumerate() {
                x.row(r, &mut values);
                let at = if ts.is_null(r) { t } else { ts.value(r) };
                outputs[i][r] = if in_order {
                    state.series[i].step_values(at, &values)
                } else if matches!(self.calls[i].kind, SeriesKind::Alert) {
                    // An alert machine does not step back: a transition computed on a copy
                    // would be published and never take effect.
                    blank[i]
                } else {
                    state.series[i].clone().step_values(at, &values)
                };
            }
            if timers && in_order {
                state.due = state.series.iter().filter_map(SeriesState::due).min();
                match last_row_of.get_mut(key.as_ref()) {
                    Some(last) => *last = r,
                    None => {
                        last_row_of.insert(key.as_ref().into(), r);
                    }
                }
            }
        }
        store.expired += expired;
        if timers {
            for (key, &r) in &last_row_of {
                let mut row = Vec::new();
                batch_row(batch, r, &mut row)?;
                if let Some(state) = store.keys.get_mut(key) {
                    state.last_row = Some(row);
                }
            }
            store.next_due = store.keys.values().filter_map(|s| s.due).min();
        }
        let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
        for (call, rows) in self.calls.iter().zip(&outputs) {
            columns.push(call.kind.build(rows)?);
        }
        let stepped = RecordBatch::try_new(self.schema.clone(), columns)?;
        match fired.into_batch(self)? {
            None => Ok(stepped),
            Some(fired) => {
                // Fired rows interleave with the stepped ones by time.
                let all = concat_batches(&self.schema, [&stepped, &fired])?;
                let times = self.order.evaluate(&all)?.into_array(all.num_rows())?;
                let times = cast(&times, &DataType::Timestamp(TimeUnit::Millisecond, None))?;
                let times =
                    times.as_primitive::<datafusion::arrow::datatypes::TimestampMillisecondType>();
                // A stable order: rows of equal time keep the order they came in.
                let mut order: Vec<u32> = (0..all.num_rows() as u32).collect();
                order.sort_by_key(|&i| {
                    if times.is_null(i as usize) {
                        i64::MIN
                    } else {
                        times.value(i as usize)
                    }
                });
                let indices = datafusion::arrow::array::UInt32Array::from(order);
                Ok(datafusion::arrow::compute::take_record_batch(
                    &all, &indices,
                )?)
            }
        }
    }

    /// Index of the `ORDER BY` column among the input's columns, when it is a column.
    fn order_column(&self) -> Option<usize> {
        self.order.downcast_ref::<Column>().map(|c| c.index())
    }

    /// Wakes the keys whose time has come; one row per key and due time that has something
    /// to say.
    fn wake(&self, store: &mut KeyedStore, watermark: i64) -> Result<Option<RecordBatch>> {
        let mut fired = Fired::new(self.calls.len());
        // In the order of their times, then keys: the rows do not depend on how the keys
        // are hashed or when a checkpoint last took them.
        let mut due: Vec<(i64, Box<[u8]>)> = store
            .keys
            .iter()
            .filter_map(|(k, s)| s.due.filter(|d| *d < watermark).map(|d| (d, k.clone())))
            .collect();
        due.sort_unstable();
        for (_, key) in due {
            if let Some(state) = store.keys.get_mut(&key) {
                fired.fire(state, watermark, self.order_column(), |_| Ok(()))?;
            }
        }
        store.next_due = store.keys.values().filter_map(|s| s.due).min();
        fired.into_batch(self)
    }
}

/// Appends row `r` of `batch` as scalars to `row`, copied out of the batch: a struct or list
/// value taken as it is would keep (and be counted with) the whole batch's buffers, for each
/// key holding a row of it.
fn batch_row(batch: &RecordBatch, r: usize, row: &mut Vec<ScalarValue>) -> Result<()> {
    for c in batch.columns() {
        row.push(ScalarValue::try_from_array(c, r)?.compacted());
    }
    Ok(())
}

/// Rows fired by timers: the key's last input row with the `ORDER BY` column set to the
/// timer's time, and the function columns.
struct Fired {
    rows: Vec<Vec<ScalarValue>>,
    outputs: Vec<Vec<Emitted>>,
}

impl Fired {
    fn new(calls: usize) -> Self {
        Self {
            rows: Vec::new(),
            outputs: vec![Vec::new(); calls],
        }
    }

    /// Fires `state`'s timers due before `at`. The key's last row is its stored one, unless
    /// `in_batch` supplies a newer one of the batch being stepped.
    fn fire(
        &mut self,
        state: &mut KeyState,
        at: i64,
        order_column: Option<usize>,
        in_batch: impl FnOnce(&mut Vec<ScalarValue>) -> Result<()>,
    ) -> Result<()> {
        let mut last = Vec::new();
        in_batch(&mut last)?;
        if last.is_empty()
            && let Some(stored) = &state.last_row
        {
            last = stored.clone();
        }
        // One row per due time, earliest first: two functions of one key due at different
        // times give two rows, as they would in steps of their own.
        while let Some(due) = state.due.filter(|d| *d < at) {
            let fired: Vec<Option<Emitted>> = state
                .series
                .iter_mut()
                .map(|s| s.fire(due.saturating_add(1)))
                .collect();
            if fired.iter().any(Option::is_some) && !last.is_empty() {
                let mut row = last.clone();
                if let Some(i) = order_column {
                    row[i] = time_like(&row[i], due)?;
                }
                for (i, (f, s)) in fired.into_iter().zip(&state.series).enumerate() {
                    self.outputs[i].push(f.unwrap_or_else(|| s.blank()));
                }
                self.rows.push(row);
                state.last_t = state.last_t.max(due);
            }
            let next = state.series.iter().filter_map(SeriesState::due).min();
            if next == Some(due) {
                // A timer that did not fire at its own time would loop: leave it for later.
                break;
            }
            state.due = next;
        }
        state.due = state.series.iter().filter_map(SeriesState::due).min();
        Ok(())
    }

    fn into_batch(self, exec: &KeyedSeriesExec) -> Result<Option<RecordBatch>> {
        if self.rows.is_empty() {
            return Ok(None);
        }
        let input_schema = exec.input.schema();
        let mut columns: Vec<ArrayRef> = (0..input_schema.fields().len())
            .map(|c| ScalarValue::iter_to_array(self.rows.iter().map(|r| r[c].clone())))
            .collect::<Result<Vec<_>>>()?;
        for (call, out) in exec.calls.iter().zip(&self.outputs) {
            columns.push(call.kind.build(out)?);
        }
        Ok(Some(RecordBatch::try_new(exec.schema.clone(), columns)?))
    }
}

/// `array` as type `to`: structs field by field by name (a field it lacks is NULL), anything
/// else cast.
fn fit(array: &ArrayRef, to: &DataType) -> Result<ArrayRef> {
    if array.data_type() == to {
        return Ok(Arc::clone(array));
    }
    match (array.data_type(), to) {
        (DataType::Struct(_), DataType::Struct(fields)) => {
            let from = array.as_struct();
            let columns = fields
                .iter()
                .map(|f| match from.column_by_name(f.name()) {
                    Some(c) => fit(c, f.data_type()),
                    None => Ok(new_null_array(f.data_type(), from.len())),
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Arc::new(StructArray::try_new(
                fields.clone(),
                columns,
                from.nulls().cloned(),
            )?))
        }
        _ => Ok(cast(array, to)?),
    }
}

/// `t_ms` as a value of the same type as `like` (a timestamp column of any unit).
fn time_like(like: &ScalarValue, t_ms: i64) -> Result<ScalarValue> {
    ScalarValue::TimestampMillisecond(Some(t_ms), None).cast_to(&like.data_type())
}

impl DisplayAs for KeyedSeriesExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let names: Vec<&str> = self.calls.iter().map(|c| c.kind.name()).collect();
        write!(f, "KeyedSeriesExec: [{}]", names.join(", "))
    }
}

impl ExecutionPlan for KeyedSeriesExec {
    fn name(&self) -> &str {
        "KeyedSeriesExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        for e in self.keys.iter().chain(std::iter::once(&self.order)) {
            if f(e)? == TreeNodeRecursion::Stop {
                return Ok(TreeNodeRecursion::Stop);
            }
        }
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        match children.pop() {
            Some(input) if children.is_empty() => Ok(Arc::new(Self {
                input,
                ..self.as_ref().clone()
            })),
            _ => Err(DataFusionError::Internal(
                "KeyedSeriesExec has one child".into(),
            )),
        }
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.replace_children(
            children,
            ReplaceChildrenOptions::new(
                datafusion::physical_plan::ChildrenPropertiesMode::Recompute,
            ),
        )
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "KeyedSeriesExec has one partition, asked for {partition}"
            )));
        }
        let input = self.input.clone();
        let this = self.clone();
        let schema = self.schema.clone();
        let stream = futures::stream::once(async move {
            let batches = collect(input, context).await?;
            let out = this.run(batches)?;
            let schema = this.schema.clone();
            datafusion::arrow::compute::concat_batches(&schema, &out).map_err(DataFusionError::from)
        });
        Ok(Box::pin(
            datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(schema, stream),
        ))
    }
}

/// The ranking window functions, which rank the groups of one window (top-N per window).
pub const RANKINGS: [&str; 3] = ["row_number", "rank", "dense_rank"];

/// Whether `w` is `ROW_NUMBER`, `RANK` or `DENSE_RANK`.
pub fn is_ranking(w: &dyn WindowExpr) -> bool {
    udwf_of(w).is_some_and(|u| RANKINGS.contains(&u.fun().name()))
}

/// The user-defined window function of a window expression, if it is one (urbanstream's
/// detectors, and DataFusion's `row_number`, `lag` and friends, are).
pub fn udwf_of(w: &dyn WindowExpr) -> Option<&WindowUDFExpr> {
    w.as_any()
        .downcast_ref::<StandardWindowExpr>()
        .and_then(|s| {
            s.get_standard_func_expr()
                .as_any()
                .downcast_ref::<WindowUDFExpr>()
        })
}

/// Replaces every window aggregation made of urbanstream's series functions with a
/// [`KeyedSeriesExec`], returning the new plan and the handles of their state.
pub fn replace_series_windows(
    plan: Arc<dyn ExecutionPlan>,
) -> Result<(Arc<dyn ExecutionPlan>, Vec<KeyedHandle>)> {
    let mut handles = Vec::new();
    let plan = plan
        .transform_up(|node| {
            let (exprs, input) = if let Some(w) = node.downcast_ref::<WindowAggExec>() {
                (w.window_expr().to_vec(), w.input().clone())
            } else if let Some(w) = node.downcast_ref::<BoundedWindowAggExec>() {
                (w.window_expr().to_vec(), w.input().clone())
            } else {
                return Ok(Transformed::no(node));
            };
            // Rankings (top-N per window) run as they are, over a window's rows.
            if exprs.iter().all(|w| is_ranking(w.as_ref())) {
                return Ok(Transformed::no(node));
            }
            match KeyedSeriesExec::try_new(input, node.schema(), &exprs)? {
                Some(exec) => {
                    handles.push(exec.handle.clone());
                    Ok(Transformed::yes(Arc::new(exec) as Arc<dyn ExecutionPlan>))
                }
                None => plan_err!(
                    "window functions with OVER (…) are not supported on streams, except urbanstream's detectors (anomaly_*, sensor_*, alert_state) and rankings of a window's groups (ROW_NUMBER, RANK, DENSE_RANK OVER (PARTITION BY window_start …) over a windowed aggregation): aggregate with GROUP BY tumble/hop/cumulate instead"
                ),
            }
        })?
        .data;
    Ok((plan, handles))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key's last row kept by a checkpoint before detectors gave their `scale` holds
    /// `{score, baseline, warming, likelihood}`: restored, it is the struct the plan's input
    /// has now, the missing field NULL, so a timer firing on that row builds its batch.
    #[test]
    fn a_kept_row_of_an_older_struct_is_restored_as_the_input_is_now() -> crate::Result<()> {
        use datafusion::arrow::array::Float64Array;
        use datafusion::arrow::datatypes::{Fields, Float64Type};
        let now = SeriesKind::Score.output_fields();
        let then: Fields = now
            .iter()
            .filter(|f| f.name() != "scale")
            .cloned()
            .collect();
        let old: ArrayRef = Arc::new(StructArray::try_new(
            then,
            vec![
                Arc::new(Float64Array::from(vec![-4.5])),
                Arc::new(Float64Array::from(vec![40.0])),
                Arc::new(BooleanArray::from(vec![false])),
                Arc::new(Float64Array::from(vec![None])),
            ],
            None,
        )?);
        let mut store = KeyedStore::default();
        let mut kept = key(10, Some(900));
        kept.last_row = Some(vec![
            ScalarValue::Int64(Some(7)),
            ScalarValue::try_from_array(&old, 0)?,
        ]);
        store.keys.insert(b"seg".to_vec().into(), kept);
        let table = TakenKeys(store.keys.share()).compute()?;
        let handle = |row_types| KeyedHandle {
            store: Arc::default(),
            watermark: Arc::new(AtomicI64::new(i64::MIN)),
            timers: true,
            ttl: Arc::new(AtomicI64::new(i64::MAX)),
            functions: Vec::new(),
            layout: String::new(),
            row_types,
        };
        let restored = handle(vec![DataType::Int64, DataType::Struct(now.clone())]);
        restored.restore(&StateSnapshot {
            meta: serde_json::json!({ "next_due": 900 }),
            tables: [("keys".to_string(), table)].into(),
            ..Default::default()
        })?;
        let row = restored
            .with_store(|s| {
                s.keys
                    .get(b"seg".as_slice())
                    .and_then(|k| k.last_row.clone())
            })
            .flatten()
            .expect("the key's row");
        assert_eq!(row[0], ScalarValue::Int64(Some(7)));
        assert_eq!(row[1].data_type(), DataType::Struct(now));
        let fitted = row[1].to_array()?;
        let fitted = fitted.as_struct();
        let baseline = fitted.column_by_name("baseline").expect("baseline");
        assert_eq!(baseline.as_primitive::<Float64Type>().value(0), 40.0);
        assert!(fitted.column_by_name("scale").expect("scale").is_null(0));
        Ok(())
    }

    fn key(last_t: i64, due: Option<i64>) -> KeyState {
        KeyState {
            last_t,
            series: Vec::new(),
            last_row: None,
            due,
        }
    }

    /// The detector store keeps the key states a fold replaces, for the next checkpoint's
    /// copies to go into, and counts them in its bytes (the state-bytes metric and the
    /// memory limit see them).
    #[test]
    fn the_store_keeps_replaced_states_as_spares_and_counts_them() {
        let mut store = KeyedStore::default();
        for i in 0..10u8 {
            store.keys.insert(vec![i].into(), key(10, None));
        }
        let alone = store.bytes();
        let checkpoint = store.keys.share();
        for i in 0..10u8 {
            if let Some(k) = store.keys.get_mut([i].as_slice()) {
                k.last_t = 20;
            }
        }
        drop(checkpoint);
        store.keys.settle(usize::MAX);
        assert_eq!(store.keys.spares().count(), 10);
        assert_eq!(
            store.bytes(),
            alone + 10 * std::mem::size_of::<KeyState>(),
            "the spares are counted"
        );
        assert!(store.keys.values().all(|k| k.last_t == 20));
    }

    /// Keys silent longer than the TTL are dropped and counted; a key waiting on a timer (an
    /// alert to expire, a silence to report) is kept; sweeps are spaced by a tenth of the TTL.
    #[test]
    fn silent_keys_expire_after_the_ttl() {
        let mut store = KeyedStore::default();
        store.keys.insert(b"old".to_vec().into(), key(0, None));
        store
            .keys
            .insert(b"waiting".to_vec().into(), key(0, Some(50)));
        store.keys.insert(b"recent".to_vec().into(), key(900, None));
        store.expire(1_000, 500);
        assert_eq!(store.len(), 2);
        assert_eq!(store.expired(), 1);
        assert!(!store.keys.contains_key(b"old".as_slice()));
        // The next sweep waits for the watermark to move by a tenth of the TTL.
        store.keys.insert(b"old2".to_vec().into(), key(0, None));
        store.expire(1_020, 500);
        assert_eq!(store.len(), 3);
        store.expire(1_050, 500);
        assert_eq!(store.len(), 2);
        assert_eq!(store.expired(), 2);
        // Before any watermark nothing is swept.
        let mut fresh = KeyedStore::default();
        fresh.keys.insert(b"k".to_vec().into(), key(0, None));
        fresh.expire(i64::MIN, 500);
        assert_eq!(fresh.len(), 1);
    }

    /// A checkpoint's keys are those of the moment it was taken: keys expired, changed or
    /// added afterwards do not reach its table, and the store goes on with them.
    #[test]
    fn a_taken_snapshot_holds_the_keys_as_they_were() -> crate::Result<()> {
        let mut store = KeyedStore::default();
        store.keys.insert(b"old".to_vec().into(), key(0, None));
        store.keys.insert(b"recent".to_vec().into(), key(900, None));
        let taken = TakenKeys(store.keys.share());
        store.expire(1_000, 500);
        if let Some(k) = store.keys.get_mut(b"recent".as_slice()) {
            k.last_t = 950;
        }
        store
            .keys
            .insert(b"new".to_vec().into(), key(990, Some(1_200)));
        let table = taken.compute()?;
        let keys = typed::<BinaryArray>(column(&table, "key")?, "key")?;
        let last_t = typed::<Int64Array>(column(&table, "last_t")?, "last_t")?;
        let mut rows: Vec<(Vec<u8>, i64)> = (0..table.num_rows())
            .map(|r| (keys.value(r).to_vec(), last_t.value(r)))
            .collect();
        rows.sort();
        assert_eq!(rows, vec![(b"old".to_vec(), 0), (b"recent".to_vec(), 900)]);
        assert_eq!(store.len(), 2);
        assert_eq!(
            store.keys.get(b"recent".as_slice()).map(|k| k.last_t),
            Some(950)
        );
        drop(taken);
        assert_eq!(store.keys.settle(usize::MAX), 0);
        assert!(!store.keys.contains_key(b"old".as_slice()));
        Ok(())
    }
}
