//! The window operator: incremental aggregation of `tumble`, `hop` and `cumulate` windows.
//!
//! State is kept in **panes**, the largest time slices every window is a union of: a tumbling
//! window is one pane; a hopping window of `size` every `slide` spans panes of
//! `gcd(slide, size)`; a cumulating window spans panes of `step`. Each pane holds, for its
//! groups, DataFusion's own aggregation state: a `GroupValues` interner for the group keys and
//! one `GroupsAccumulator` per aggregate. Every micro-batch updates the panes its rows fall
//! in (`update_batch`), so raw events are never kept. A window is evaluated by merging its
//! panes' `state()` into fresh accumulators (`merge_batch`) and calling `evaluate`: the same
//! partial/final split DataFusion uses for parallel aggregation, and the same state arrays a
//! checkpoint writes.
//!
//! Emission: a window is emitted (revision 0, `is_final = true`) when the watermark reaches
//! its end; with allowed lateness `L` it stays until the watermark reaches `end + L`, and each
//! step in which late events changed some of its groups re-emits those groups with the next
//! revision. With an early-fire interval, windows not yet final emit their changed groups with
//! `is_final = false`. An event whose every window is past `end + L` is late: the caller
//! diverts it (see [`WindowOperator::is_late`]).
//!
//! **Changelog input** ([`WindowOperator::over_changelog`]): when the input is itself a
//! changelog (an upstream query's output read with `upsert_key`), a row can be withdrawn
//! again ([`WindowOperator::retract`]), which DataFusion's accumulators cannot do. Panes then
//! keep their input rows (a multiset, row-encoded) instead of accumulator state, and a window
//! is evaluated afresh from its rows at each emission. What is published is compared with
//! what each group last published: only groups whose values changed are re-emitted, and a
//! group whose rows are all gone is retracted with the values it was published with.
//!
//! **Checkpoints off the query's thread**: reading a pane's state out drains DataFusion's
//! interner and accumulators and merges them back, which costs in proportion to its groups.
//! A snapshot therefore *lends* each pane to the checkpoint instead ([`Lent`]): the pane is
//! read out into its table when the checkpoint is written, on the writing thread, while the
//! query goes on. Updates to a lent pane wait, in order, until the pane is back, then are
//! applied as they would have been (the same batches into the same accumulators, so the
//! results do not depend on when checkpoints are taken). A pane is taken back at the next
//! micro-batch after its table is read and catches up two waiting updates a micro-batch
//! ([`CATCH_UP`]), its new ones waiting behind, so that no micro-batch pays for all of them;
//! a window that closes or the next snapshot take it back and catch it up at once, reading
//! the table itself if the writer has not yet; more than [`MAX_WAITING`] waiting updates
//! make the query wait for the reading (or do it) before catching up as usual.

use std::collections::BTreeMap;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex, TryLockError};

use datafusion::arrow::array::{
    Array, ArrayRef, BinaryArray, BinaryViewArray, BooleanArray, Int64Array, RecordBatch,
    StringViewArray, StructArray, TimestampMillisecondArray, UInt32Array, UInt64Array,
};
use datafusion::arrow::compute::{cast, concat_batches, filter_record_batch, take};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::{Result, exec_err, internal_err};
use datafusion::logical_expr::{EmitTo, GroupsAccumulator};
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;
use datafusion::physical_expr::{GroupsAccumulatorAdapter, PhysicalExpr};
use datafusion::physical_plan::aggregates::group_values::{GroupValues, new_group_values};
use datafusion::physical_plan::aggregates::order::GroupOrdering;
use urbanstream_operators::window::{WindowSpec, window_fields};

use crate::checkpoint::{DeferredTable, StateSnapshot, column, table, typed};
use crate::state::layered::{Layered, LayeredCounts, Shared, SharedCounts};

/// The aggregation a windowed query performs, taken from DataFusion's physical plan.
#[derive(Debug, Clone)]
pub struct AggregateSpec {
    /// The window and its parameters.
    pub window: WindowSpec,
    /// Expression giving each input row's event time.
    pub time: Arc<dyn PhysicalExpr>,
    /// Group expressions other than the window, over the aggregation's input.
    pub groups: Vec<Arc<dyn PhysicalExpr>>,
    /// Position of the window column among the aggregation's output group columns.
    pub window_position: usize,
    /// The aggregate functions.
    pub aggregates: Vec<Arc<AggregateFunctionExpr>>,
    /// Their `FILTER (WHERE …)` clauses.
    pub filters: Vec<Option<Arc<dyn PhysicalExpr>>>,
    /// Schema of the aggregation's output: group columns (with the window struct), then one
    /// column per aggregate.
    pub output_schema: SchemaRef,
    /// Schema of the group columns other than the window.
    pub group_schema: SchemaRef,
}

/// A row `Accumulator` behind DataFusion's adapter, which fails when asked for no groups
/// (`count(DISTINCT)`, `approx_percentile_cont`… over a window a changelog or a retraction
/// emptied): no groups give empty columns of the aggregate's types.
struct Adapted {
    inner: GroupsAccumulatorAdapter,
    /// Groups held.
    groups: usize,
    /// The aggregate's type.
    values: DataType,
    /// Its state's types.
    states: Vec<DataType>,
}

impl Adapted {
    /// How many groups `emit_to` takes; they are no longer held.
    fn take(&mut self, emit_to: EmitTo) -> usize {
        let taken = match emit_to {
            EmitTo::All => self.groups,
            EmitTo::First(n) => n.min(self.groups),
        };
        self.groups -= taken;
        taken
    }
}

impl GroupsAccumulator for Adapted {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        self.groups = self.groups.max(total_num_groups);
        self.inner
            .update_batch(values, group_indices, opt_filter, total_num_groups)
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        if self.take(emit_to) == 0 {
            return Ok(datafusion::arrow::array::new_empty_array(&self.values));
        }
        self.inner.evaluate(emit_to)
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        if self.take(emit_to) == 0 {
            return Ok(self
                .states
                .iter()
                .map(datafusion::arrow::array::new_empty_array)
                .collect());
        }
        self.inner.state(emit_to)
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        self.groups = self.groups.max(total_num_groups);
        self.inner
            .merge_batch(values, group_indices, total_num_groups)
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        self.inner.convert_to_state(values, opt_filter)
    }

    fn size(&self) -> usize {
        self.inner.size()
    }
}

/// Aggregates whose vectorised accumulator keeps the arrays it is given and counts them by
/// their views alone (`array_agg`: 16 bytes a text of any length), so that 1 200 texts of
/// 200 KB were 40 KB of state against a 64 MiB limit while they took 226 MB.
const RETAINING: &[&str] = &["array_agg"];

/// A [`RETAINING`] aggregate's accumulator, counted at the larger of its own size and the
/// arrays it was given since it was last emitted whole. Texts and bytes kept by view are
/// compacted first (`gc`): a view array taken from a micro-batch pins all of the batch's
/// text buffers, which each pane's accumulator would keep (and be counted for) whole.
struct Retaining {
    inner: Box<dyn GroupsAccumulator>,
    retained: usize,
    /// Groups held.
    groups: usize,
}

impl Retaining {
    /// `values` with view arrays compacted, counted.
    fn took(&mut self, values: &[ArrayRef]) -> Vec<ArrayRef> {
        let values: Vec<ArrayRef> = values
            .iter()
            .map(|v| {
                if let Some(texts) = v.as_any().downcast_ref::<StringViewArray>() {
                    Arc::new(texts.gc()) as ArrayRef
                } else if let Some(bytes) = v.as_any().downcast_ref::<BinaryViewArray>() {
                    Arc::new(bytes.gc()) as ArrayRef
                } else {
                    v.clone()
                }
            })
            .collect();
        self.retained = self
            .retained
            .saturating_add(values.iter().map(|v| v.get_array_memory_size()).sum());
        values
    }

    /// After emitting `emit_to`: nothing kept after all groups, the share of the groups left
    /// after the first n.
    fn gave(&mut self, emit_to: EmitTo) {
        match emit_to {
            EmitTo::All => {
                self.retained = 0;
                self.groups = 0;
            }
            EmitTo::First(n) => {
                let left = self.groups.saturating_sub(n);
                self.retained = match self.groups {
                    0 => 0,
                    groups => (self.retained as u128 * left as u128 / groups as u128) as usize,
                };
                self.groups = left;
            }
        }
    }
}

impl GroupsAccumulator for Retaining {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        let values = self.took(values);
        self.groups = self.groups.max(total_num_groups);
        self.inner
            .update_batch(&values, group_indices, opt_filter, total_num_groups)
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        self.gave(emit_to);
        self.inner.evaluate(emit_to)
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        self.gave(emit_to);
        self.inner.state(emit_to)
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        let values = self.took(values);
        self.groups = self.groups.max(total_num_groups);
        self.inner
            .merge_batch(&values, group_indices, total_num_groups)
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        self.inner.convert_to_state(values, opt_filter)
    }

    fn size(&self) -> usize {
        self.inner.size().max(self.retained)
    }
}

impl AggregateSpec {
    /// What its state holds, as one line: the window, the group keys with their types, each
    /// aggregate with the types of its state, the filters and the event time. Two queries
    /// whose aggregations have the same layout can take over each other's state (a
    /// checkpoint restored into changed SQL); column positions are left out.
    pub fn layout(&self) -> String {
        let keys: Vec<String> = self
            .group_schema
            .fields()
            .iter()
            .map(|f| format!("{} {}", f.name(), f.data_type()))
            .collect();
        let aggregates: Vec<String> = self
            .aggregates
            .iter()
            .zip(&self.filters)
            .map(|(a, filter)| {
                let state: Vec<String> = a
                    .state_fields()
                    .map(|fields| fields.iter().map(|f| f.data_type().to_string()).collect())
                    .unwrap_or_default();
                let filter = filter
                    .as_ref()
                    .map(|f| format!(" FILTER (WHERE {})", super::expr_layout(f)))
                    .unwrap_or_default();
                format!("{}{filter} [{}]", a.name(), state.join(", "))
            })
            .collect();
        format!(
            "{:?} over {} by ({}) of {}",
            self.window,
            super::expr_layout(&self.time),
            keys.join(", "),
            aggregates.join(", ")
        )
    }

    /// One fresh accumulator per aggregate: DataFusion's vectorised `GroupsAccumulator` where
    /// the function has one, its row `Accumulator` behind an adapter otherwise.
    pub fn new_accumulators(&self) -> Result<Vec<Box<dyn GroupsAccumulator>>> {
        self.aggregates
            .iter()
            .map(|a| {
                if a.groups_accumulator_supported() {
                    let inner = a.create_groups_accumulator()?;
                    if RETAINING.contains(&a.fun().name()) {
                        return Ok(Box::new(Retaining {
                            inner,
                            retained: 0,
                            groups: 0,
                        }) as Box<dyn GroupsAccumulator>);
                    }
                    Ok(inner)
                } else {
                    let values = a.field().data_type().clone();
                    let states = a
                        .state_fields()?
                        .iter()
                        .map(|f| f.data_type().clone())
                        .collect();
                    let a = a.clone();
                    Ok(Box::new(Adapted {
                        inner: GroupsAccumulatorAdapter::new(move || a.create_accumulator()),
                        groups: 0,
                        values,
                        states,
                    }) as Box<dyn GroupsAccumulator>)
                }
            })
            .collect()
    }

    /// Evaluates, over a batch of the aggregation's input, each row's event time, group key
    /// columns (one constant column for a window-only grouping), aggregate arguments and
    /// filters.
    pub fn inputs(&self, batch: &RecordBatch) -> Result<Inputs> {
        let n = batch.num_rows();
        let evaluate = |e: &Arc<dyn PhysicalExpr>| e.evaluate(batch).and_then(|v| v.into_array(n));
        let times = cast(
            &evaluate(&self.time)?,
            &DataType::Timestamp(TimeUnit::Millisecond, None),
        )?;
        let Some(times) = times
            .as_any()
            .downcast_ref::<TimestampMillisecondArray>()
            .cloned()
        else {
            return internal_err!("the window's time column is not a timestamp");
        };
        if times.null_count() > 0 {
            return datafusion::common::exec_err!("the window's event-time column has nulls");
        }
        let keys = if self.groups.is_empty() {
            vec![Arc::new(BooleanArray::from(vec![true; n])) as ArrayRef]
        } else {
            self.groups
                .iter()
                .map(evaluate)
                .collect::<Result<Vec<_>>>()?
        };
        // Each aggregate's arguments, then its ORDER BY expressions: what DataFusion's
        // partial aggregation feeds an order-sensitive accumulator (`first_value(x ORDER BY
        // t)`, `array_agg(x ORDER BY t)`), which sorts by them itself.
        let args = self
            .aggregates
            .iter()
            .map(|a| {
                a.expressions()
                    .iter()
                    .chain(a.order_bys().iter().map(|o| &o.expr))
                    .map(evaluate)
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        let filters = self
            .filters
            .iter()
            .map(|f| f.as_ref().map(evaluate).transpose())
            .collect::<Result<Vec<_>>>()?;
        Ok(Inputs {
            times,
            keys,
            args,
            filters,
        })
    }

    /// Rows in the aggregation's output schema from the group key columns (none for a
    /// window-only grouping), the window column and one column per aggregate.
    pub fn output_batch(
        &self,
        keys: Vec<ArrayRef>,
        window: ArrayRef,
        values: Vec<ArrayRef>,
    ) -> Result<RecordBatch> {
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.output_schema.fields().len());
        let mut keys = keys.into_iter();
        for position in 0..=self.groups.len() {
            if position == self.window_position {
                columns.push(window.clone());
            } else if let Some(k) = keys.next() {
                columns.push(k);
            }
        }
        columns.extend(values);
        let columns = columns
            .iter()
            .zip(self.output_schema.fields())
            .map(|(c, f)| {
                if c.data_type() == f.data_type() {
                    Ok(c.clone())
                } else {
                    Ok(cast(c, f.data_type())?)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(RecordBatch::try_new(self.output_schema.clone(), columns)?)
    }
}

/// The evaluated inputs of the aggregation over one batch (see [`AggregateSpec::inputs`]).
pub struct Inputs {
    /// Event time of each row, milliseconds.
    pub times: TimestampMillisecondArray,
    /// Group key columns.
    pub keys: Vec<ArrayRef>,
    /// Per aggregate, its argument columns.
    pub args: Vec<Vec<ArrayRef>>,
    /// Per aggregate, its `FILTER` column, if any.
    pub filters: Vec<Option<ArrayRef>>,
}

/// Rows a window emitted, with their revision and finality.
#[derive(Debug, Clone)]
pub struct Emission {
    /// Rows in the aggregation's output schema.
    pub batch: RecordBatch,
    /// Revision of each row: 0 for the first emission of its (window, group).
    pub revisions: Vec<u32>,
    /// Whether the watermark had passed the window's end.
    pub is_final: bool,
    /// Whether the rows retract rows published earlier (a session merged into another, or
    /// published under a start it no longer has): their keys and window identify the rows
    /// withdrawn, and they carry the values those rows were published with.
    pub retract: bool,
    /// The latest window end among the rows: operators above the aggregation (keyed timers)
    /// see the watermark at most here while they process these rows, as they would had the
    /// watermark stopped just after this window closed.
    pub until: i64,
}

struct Pane {
    groups: Box<dyn GroupValues>,
    accumulators: Vec<Box<dyn GroupsAccumulator>>,
    /// Over a changelog: the pane's input rows (row-encoded) with their multiplicity, in
    /// byte order, so that a window's rows reach the accumulators in the same order every
    /// time (floating-point sums, unordered `first_value` give the same value again). A
    /// checkpoint takes them in O(1) and reads them out on its own thread while the query
    /// goes on changing them, the changes waiting in front meanwhile.
    rows: LayeredCounts<Box<[u8]>>,
    /// Step of the last update, per group.
    updated: Vec<u64>,
    /// Step of the last update of any group.
    last_update: u64,
}

/// A pane lent to a checkpoint (see the module documentation).
struct Lent {
    loan: Arc<Loan>,
    /// The pane, once back from the checkpoint, while it catches up with `queued`.
    back: Option<Pane>,
    /// Updates since it was lent, in order.
    queued: std::collections::VecDeque<Queued>,
    /// Step of the last update of any group, queued ones included.
    last_update: u64,
    /// Groups and bytes when it was lent (queued updates are counted in `queued_bytes`).
    groups: usize,
    bytes: usize,
    queued_bytes: usize,
}

/// One update of a lent pane: the rows' group keys, aggregate arguments and filters.
struct Queued {
    keys: Vec<ArrayRef>,
    args: Vec<Vec<ArrayRef>>,
    filters: Vec<Option<ArrayRef>>,
    step: u64,
    /// Bytes of its arrays (each shared array once).
    bytes: usize,
}

/// Updates a lent pane holds at most while its checkpoint reads it out: one more, and the
/// query waits for the reading (or does it), then catches up two a micro-batch.
const MAX_WAITING: usize = 64;

/// Waiting updates a lent pane applies per micro-batch once it is back: each micro-batch then
/// does at most this many more updates' work, and the pane catches up by one less a batch.
const CATCH_UP: usize = 2;

/// Bytes a live window takes before any emission: its entry in the windows' B-tree (key and
/// bookkeeping, nodes from half to all full: counted twice) and the empty shared table each of
/// its two layered maps allocates (an `Arc` of a `HashMap`). Counting the bookkeeping alone
/// undercounted a window by 2.7 times (200 B counted, 548 B of resident memory each over
/// 300 000 hop windows).
const WINDOW_BYTES: usize = 2
    * (std::mem::size_of::<(i64, i64)>() + std::mem::size_of::<WindowMeta>())
    + 2 * (2 * std::mem::size_of::<usize>()
        + std::mem::size_of::<std::collections::HashMap<u8, u8>>());

/// Bytes of results one [`WindowOperator::advance`] returns at most (past them, the window
/// that crossed them is the last): a hop with many windows an event, or a catch-up closing
/// a day of windows at once, would otherwise hold all of their results together however
/// little state they come from. The windows left are emitted by the next calls, before any
/// new input (see [`WindowOperator::due`]).
pub const EMIT_BUDGET: usize = 8 << 20;

/// A lent pane and, once read out, its table for the checkpoint.
struct Loan(Mutex<LoanState>);

struct LoanState {
    start: i64,
    /// `None` once the operator has taken it back.
    pane: Option<Pane>,
    table: Option<RecordBatch>,
    /// Per aggregate, the state columns the snapshot announces.
    state_columns: Vec<usize>,
    /// Why reading the pane out failed: the pane may be drained, its state lost.
    failed: Option<String>,
}

impl std::fmt::Debug for Loan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Loan")
    }
}

impl Loan {
    /// The pane's table, read out of it now unless that was done already.
    fn table(&self) -> Result<RecordBatch> {
        let mut state = self.0.lock().map_err(|_| {
            datafusion::common::DataFusionError::Internal("a lent pane's lock is poisoned".into())
        })?;
        state.read()
    }
}

impl LoanState {
    fn read(&mut self) -> Result<RecordBatch> {
        if let Some(t) = &self.table {
            return Ok(t.clone());
        }
        if let Some(e) = &self.failed {
            return exec_err!("reading window state out for a checkpoint failed: {e}");
        }
        let Some(pane) = self.pane.as_mut() else {
            return internal_err!("a lent pane was taken back before its table was read");
        };
        match pane_table(self.start, pane, &self.state_columns) {
            Ok(t) => {
                self.table = Some(t.clone());
                Ok(t)
            }
            Err(e) => {
                self.failed = Some(e.to_string());
                Err(e)
            }
        }
    }
}

/// The `panes` table of a snapshot: the lent panes' tables, concatenated.
#[derive(Debug)]
struct PanesTable(Vec<Arc<Loan>>);

impl DeferredTable for PanesTable {
    fn compute(&self) -> crate::Result<RecordBatch> {
        let tables = self
            .0
            .iter()
            .map(|l| l.table())
            .collect::<Result<Vec<_>>>()?;
        let Some(first) = tables.first() else {
            return Err(crate::Error::Checkpoint("no pane to write".into()));
        };
        Ok(concat_batches(&first.schema(), &tables)?)
    }
}

/// The `rows` table of a snapshot over a changelog: each pane's rows as the snapshot took
/// them, per pane a row without one that carries the pane's last update (so that an emptied
/// pane still counts as changed), then its rows in byte order.
#[derive(Debug)]
struct TakenRows(Vec<TakenPane>);

/// A pane's start, last update and rows, as a snapshot took them.
type TakenPane = (i64, u64, SharedCounts<Box<[u8]>>);

impl DeferredTable for TakenRows {
    fn compute(&self) -> crate::Result<RecordBatch> {
        let n = self.0.iter().map(|(_, _, rows)| rows.len() + 1).sum();
        let (mut pane_starts, mut updates, mut rows, mut counts) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for (start, last_update, held) in &self.0 {
            pane_starts.push(*start);
            updates.push(*last_update);
            rows.push(None);
            counts.push(0u64);
            for (row, n) in held.iter() {
                pane_starts.push(*start);
                updates.push(*last_update);
                rows.push(Some(row.as_ref()));
                counts.push(*n);
            }
        }
        table(vec![
            ("pane_start".into(), Arc::new(Int64Array::from(pane_starts))),
            ("last_update".into(), Arc::new(UInt64Array::from(updates))),
            ("row".into(), Arc::new(BinaryArray::from(rows))),
            ("count".into(), Arc::new(UInt64Array::from(counts))),
        ])
    }
}

/// A live window's emission bookkeeping as a snapshot took it.
#[derive(Debug)]
struct TakenWindow {
    end: i64,
    start: i64,
    emitted_at: Option<u64>,
    final_fired: bool,
    revisions: Shared<Box<[u8]>, u32>,
    published: Shared<Box<[u8]>, Box<[u8]>>,
}

/// The `windows` table of a snapshot: per live window a row without a key (its emission
/// bookkeeping), then per emitted group its revision count and, over a changelog, the values
/// it last published.
#[derive(Debug)]
struct TakenWindows(Vec<TakenWindow>);

impl DeferredTable for TakenWindows {
    fn compute(&self) -> crate::Result<RecordBatch> {
        let (mut ends, mut starts, mut emitted, mut fired, mut keys, mut revisions) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        let mut published: Vec<Option<&[u8]>> = Vec::new();
        for w in &self.0 {
            ends.push(w.end);
            starts.push(w.start);
            emitted.push(w.emitted_at);
            fired.push(w.final_fired);
            keys.push(None);
            revisions.push(None);
            published.push(None);
            for (key, count) in w.revisions.iter() {
                ends.push(w.end);
                starts.push(w.start);
                emitted.push(None);
                fired.push(false);
                keys.push(Some(key.as_ref()));
                revisions.push(Some(*count));
                published.push(w.published.get(key).map(|v| v.as_ref()));
            }
        }
        table(vec![
            ("end".into(), Arc::new(Int64Array::from(ends))),
            ("start".into(), Arc::new(Int64Array::from(starts))),
            ("emitted_at".into(), Arc::new(UInt64Array::from(emitted))),
            ("final_fired".into(), Arc::new(BooleanArray::from(fired))),
            ("key".into(), Arc::new(BinaryArray::from(keys))),
            ("revisions".into(), Arc::new(UInt32Array::from(revisions))),
            ("published".into(), Arc::new(BinaryArray::from(published))),
        ])
    }
}

#[derive(Debug, Default)]
struct WindowMeta {
    /// Step of the last emission, if any.
    emitted_at: Option<u64>,
    final_fired: bool,
    /// Emissions so far per group key (row-encoded). Layered, as is `published`: a
    /// checkpoint takes both in O(1) and reads them out on its own thread.
    revisions: Layered<Box<[u8]>, u32>,
    /// Over a changelog: per group key, the values it last published (row-encoded output
    /// columns but the window), which a retraction carries.
    published: Layered<Box<[u8]>, Box<[u8]>>,
}

/// Over a changelog input: how rows are kept and outputs compared.
struct Recompute {
    /// The aggregation's input schema.
    input_schema: SchemaRef,
    /// Encodes input rows.
    rows: RowConverter,
    /// Encodes output rows without the window column.
    outputs: RowConverter,
    /// Rows withdrawn from a pane that holds no such row (see [`WindowOperator::retract`]).
    unmatched: u64,
}

/// Incremental state of one windowed query.
pub struct WindowOperator {
    spec: AggregateSpec,
    pane_ms: i64,
    /// Pane boundaries are `pane_offset + k × pane_ms` (a tumbling window's offset).
    pane_offset: i64,
    lateness_ms: i64,
    panes: BTreeMap<i64, Pane>,
    /// Panes lent to a checkpoint, by start: a pane is in `panes` or here.
    lent: BTreeMap<i64, Lent>,
    /// Live windows by (end, start).
    windows: BTreeMap<(i64, i64), WindowMeta>,
    /// Windows ending at or before this are gone; events only in them are late.
    evicted_through: i64,
    watermark: i64,
    step: u64,
    row_converter: RowConverter,
    /// Schema the group keys are interned with: the group columns, or one constant column
    /// when the window is the only grouping (DataFusion's interners need a column).
    intern_schema: SchemaRef,
    /// Set when the input is a changelog: windows are evaluated from their rows.
    recompute: Option<Recompute>,
    /// Where the last [`WindowOperator::advance`] stopped at [`EMIT_BUDGET`]: the next one
    /// goes on from this window (end, start), if its watermark is still the one the walk
    /// began with (second).
    resume: Option<((i64, i64), i64)>,
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

impl WindowOperator {
    /// An operator with empty state. `lateness_ms` is the allowed lateness.
    pub fn new(spec: AggregateSpec, lateness_ms: i64) -> Result<Self> {
        let pane_offset = match spec.window {
            WindowSpec::Tumble { offset, .. } => offset,
            _ => 0,
        };
        let pane_ms = match spec.window {
            WindowSpec::Tumble { width, .. } => width,
            WindowSpec::Hop { slide, size } => gcd(slide, size),
            WindowSpec::Cumulate { step, .. } => step,
            WindowSpec::Session { .. } => {
                return internal_err!("session windows are not pane-based");
            }
        };
        let intern_schema = if spec.group_schema.fields().is_empty() {
            Arc::new(Schema::new(vec![Field::new(
                "__window_only",
                DataType::Boolean,
                false,
            )]))
        } else {
            spec.group_schema.clone()
        };
        let sort_fields = intern_schema
            .fields()
            .iter()
            .map(|f| SortField::new(f.data_type().clone()))
            .collect();
        Ok(Self {
            intern_schema,
            row_converter: RowConverter::new(sort_fields)?,
            spec,
            pane_ms,
            pane_offset,
            lateness_ms: lateness_ms.max(0),
            panes: BTreeMap::new(),
            lent: BTreeMap::new(),
            windows: BTreeMap::new(),
            evicted_through: i64::MIN,
            watermark: i64::MIN,
            step: 0,
            recompute: None,
            resume: None,
        })
    }

    /// An operator over a changelog whose rows (after the query's filters and projections)
    /// have schema `input_schema`: rows can be retracted, and windows are evaluated from the
    /// rows they hold (see the module documentation).
    pub fn over_changelog(
        spec: AggregateSpec,
        lateness_ms: i64,
        input_schema: SchemaRef,
    ) -> Result<Self> {
        let sort_fields = |fields: Vec<&Arc<Field>>| -> Vec<SortField> {
            fields
                .into_iter()
                .map(|f| SortField::new(f.data_type().clone()))
                .collect()
        };
        let rows = RowConverter::new(sort_fields(input_schema.fields().iter().collect()))?;
        let outputs = RowConverter::new(sort_fields(
            spec.output_schema
                .fields()
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != spec.window_position)
                .map(|(_, f)| f)
                .collect(),
        ))?;
        let mut op = Self::new(spec, lateness_ms)?;
        op.recompute = Some(Recompute {
            input_schema,
            rows,
            outputs,
            unmatched: 0,
        });
        Ok(op)
    }

    /// Event time (ms) of each row of `batch`.
    fn times(&self, batch: &RecordBatch) -> Result<TimestampMillisecondArray> {
        let times = cast(
            &self
                .spec
                .time
                .evaluate(batch)?
                .into_array(batch.num_rows())?,
            &DataType::Timestamp(TimeUnit::Millisecond, None),
        )?;
        match times.as_any().downcast_ref::<TimestampMillisecondArray>() {
            Some(t) if t.null_count() == 0 => Ok(t.clone()),
            Some(_) => datafusion::common::exec_err!("the window's event-time column has nulls"),
            None => internal_err!("the window's time column is not a timestamp"),
        }
    }

    /// Over a changelog: adds (`sign` 1) or withdraws (`sign` -1) the rows of `batch`. A row
    /// withdrawn from a pane that no longer holds it (its windows are gone) changes nothing.
    fn change_rows(&mut self, batch: &RecordBatch, add: bool) -> Result<()> {
        let Some(recompute) = &self.recompute else {
            return internal_err!("rows are kept only over a changelog");
        };
        if batch.num_rows() == 0 {
            return Ok(());
        }
        self.step += 1;
        let step = self.step;
        let times = self.times(batch)?;
        let rows = recompute.rows.convert_columns(batch.columns())?;
        // Changes made while a checkpoint held the rows are folded back a few at a time: as
        // many as the micro-batch has rows (a walk of an ordered map each, the micro-batch's
        // own cost again at most), however many wait.
        let settle = batch.num_rows().max(1_024);
        for pane in self.panes.values_mut() {
            pane.rows.settle(settle);
        }
        let mut unmatched = 0u64;
        for (i, t) in times.values().iter().enumerate() {
            let pane_start = self.pane_start(*t);
            if add && !self.panes.contains_key(&pane_start) {
                let pane = self.new_pane()?;
                self.panes.insert(pane_start, pane);
                self.register_windows(pane_start);
            }
            let Some(pane) = self.panes.get_mut(&pane_start) else {
                continue;
            };
            let row: &[u8] = rows.row(i).data();
            if add {
                pane.rows.add(row);
            } else if !pane.rows.remove_one(row) {
                unmatched += 1;
                continue;
            }
            pane.last_update = step;
        }
        if unmatched > 0
            && let Some(recompute) = &mut self.recompute
        {
            let before = recompute.unmatched;
            recompute.unmatched += unmatched;
            // Logged at the first, then as the count passes each power of two.
            if before.checked_ilog2() != recompute.unmatched.checked_ilog2() {
                tracing::warn!(
                    withdrawals = recompute.unmatched,
                    "a withdrawn row was not among its window's rows, whose results keep the \
                     row added before: the plan below the window gave another row for it than \
                     when it was added (a reference table replaced since, read by a lookup \
                     join below the window)"
                );
            }
        }
        Ok(())
    }

    /// Over a changelog: withdraws rows of `batch` added earlier (rows superseded upstream).
    /// A row its pane does not hold is left out, with a warning in the log (doubled counts
    /// apart): the rows are computed again from the changelog's rows to be withdrawn, and a
    /// lookup join reads its reference table's current version, so a table replaced between
    /// the row's addition and its withdrawal gives another row, and the window's results
    /// keep the one added.
    pub fn retract(&mut self, batch: &RecordBatch) -> Result<()> {
        self.change_rows(batch, false)
    }

    /// The windows (start, end) that contain event time `t`.
    pub fn windows_of(&self, t: i64) -> Vec<(i64, i64)> {
        match self.spec.window {
            WindowSpec::Tumble { width, offset } => {
                let s = (t - offset).div_euclid(width) * width + offset;
                vec![(s, s + width)]
            }
            WindowSpec::Hop { slide, size } => {
                let last = t.div_euclid(slide) * slide;
                let mut out = Vec::new();
                let mut s = last;
                while s > t - size {
                    out.push((s, s + size));
                    s -= slide;
                }
                out.reverse();
                out
            }
            WindowSpec::Cumulate { step, max } => {
                let period = t.div_euclid(max) * max;
                let first_end = period + (t - period).div_euclid(step) * step + step;
                (0..)
                    .map(|k| first_end + k * step)
                    .take_while(|end| *end <= period + max)
                    .map(|end| (period, end))
                    .collect()
            }
            WindowSpec::Session { .. } => Vec::new(),
        }
    }

    /// Whether an event at `t` can no longer change any window (every window containing it
    /// is past its end plus the allowed lateness).
    pub fn is_late(&self, t: i64) -> bool {
        self.last_window_end(t) <= self.evicted_through
    }

    /// End of the last window containing event time `t`: once the operator has evicted
    /// through it, nothing at `t` can change any output.
    pub fn last_window_end(&self, t: i64) -> i64 {
        match self.spec.window {
            WindowSpec::Tumble { width, offset } => {
                (t - offset).div_euclid(width) * width + offset + width
            }
            WindowSpec::Hop { slide, size } => t.div_euclid(slide) * slide + size,
            WindowSpec::Cumulate { max, .. } => t.div_euclid(max) * max + max,
            WindowSpec::Session { gap } => t.saturating_add(gap),
        }
    }

    /// The windows of an event at `t` that are gone while others of them are live (see
    /// [`crate::state::WindowedAggregation::closed_windows_of`]).
    pub fn closed_windows_of(&self, t: i64) -> Vec<(i64, i64)> {
        let first_end = match self.spec.window {
            WindowSpec::Tumble { .. } | WindowSpec::Session { .. } => return Vec::new(),
            WindowSpec::Hop { slide, size } => (t - size).div_euclid(slide) * slide + slide + size,
            WindowSpec::Cumulate { step, max } => {
                let period = t.div_euclid(max) * max;
                period + (t - period).div_euclid(step) * step + step
            }
        };
        if first_end > self.evicted_through || self.is_late(t) {
            return Vec::new();
        }
        self.windows_of(t)
            .into_iter()
            .filter(|(_, end)| *end <= self.evicted_through)
            .collect()
    }

    /// Windows ending at or before this are evicted once the watermark reaches `watermark`
    /// (every window end lies on the pane grid, so ending at or before it is ending at or
    /// before the pane start [`WindowOperator::advance`] evicts through).
    pub fn frontier(&self, watermark: i64) -> i64 {
        watermark.saturating_sub(self.lateness_ms)
    }

    /// Whether a window of an event at `t` ends after `after` and at or before `through`.
    /// Constant time: the ends of an event's windows lie a slide (a step) apart, from the
    /// first window's to the last's.
    pub fn closes_between(&self, t: i64, after: i64, through: i64) -> bool {
        // Every window of an event ends after it.
        if through <= after || t >= through {
            return false;
        }
        let (first, last, step) = match self.spec.window {
            WindowSpec::Tumble { .. } => {
                let end = self.last_window_end(t);
                (end, end, 1)
            }
            WindowSpec::Hop { slide, size } => (
                (t - size).div_euclid(slide) * slide + slide + size,
                self.last_window_end(t),
                slide,
            ),
            WindowSpec::Cumulate { step, max } => {
                let period = t.div_euclid(max) * max;
                (
                    period + (t - period).div_euclid(step) * step + step,
                    period + max,
                    step,
                )
            }
            WindowSpec::Session { .. } => return false,
        };
        let next = if first > after {
            first
        } else {
            first + ((after - first) / step + 1) * step
        };
        next <= through && next <= last
    }

    /// Windows ending at or before this have been evicted.
    pub fn evicted_through(&self) -> i64 {
        self.evicted_through
    }

    /// Adds the rows of `batch` (the aggregation's input). Rows must not be late.
    pub fn update(&mut self, batch: &RecordBatch) -> Result<()> {
        let inputs = self.prepare(batch)?;
        self.update_prepared(batch, inputs)
    }

    /// What [`WindowOperator::update`] evaluates over `batch` before it changes any state
    /// (`None` without rows, or over a changelog, whose rows are taken as they are).
    pub fn prepare(&self, batch: &RecordBatch) -> Result<Option<Inputs>> {
        if self.recompute.is_some() || batch.num_rows() == 0 {
            return Ok(None);
        }
        Ok(Some(self.spec.inputs(batch)?))
    }

    /// [`WindowOperator::update`] with what [`WindowOperator::prepare`] gave for `batch`.
    pub fn update_prepared(&mut self, batch: &RecordBatch, inputs: Option<Inputs>) -> Result<()> {
        let inputs = match inputs {
            Some(inputs) => inputs,
            None if self.recompute.is_some() => return self.change_rows(batch, true),
            None if batch.num_rows() == 0 => return Ok(()),
            None => self.spec.inputs(batch)?,
        };
        self.step += 1;
        let Inputs {
            times,
            keys: group_values,
            args: agg_args,
            filters: agg_filters,
        } = inputs;
        // Rows by pane; batches are mostly in time order, so this is a handful of panes.
        let mut by_pane: BTreeMap<i64, Vec<u32>> = BTreeMap::new();
        for (i, t) in times.values().iter().enumerate() {
            by_pane
                .entry(self.pane_start(*t))
                .or_default()
                .push(i as u32);
        }
        let single_pane = by_pane.len() == 1;
        for (pane_start, rows) in by_pane {
            let indices = UInt32Array::from(rows);
            let pick = |a: &ArrayRef| -> Result<ArrayRef> {
                if single_pane {
                    Ok(a.clone())
                } else {
                    Ok(take(a.as_ref(), &indices, None)?)
                }
            };
            let keys = group_values.iter().map(pick).collect::<Result<Vec<_>>>()?;
            let args = agg_args
                .iter()
                .map(|a| a.iter().map(pick).collect::<Result<Vec<_>>>())
                .collect::<Result<Vec<_>>>()?;
            let filters = agg_filters
                .iter()
                .map(|f| f.as_ref().map(pick).transpose())
                .collect::<Result<Vec<_>>>()?;
            let step = self.step;
            if let Some(lent) = self.lent.get_mut(&pane_start) {
                // Aggregates often share an argument (`sum(v)`, `avg(v)`): each array once.
                let mut arrays: Vec<&ArrayRef> = keys
                    .iter()
                    .chain(args.iter().flatten())
                    .chain(filters.iter().flatten())
                    .collect();
                arrays.sort_by_key(|a| Arc::as_ptr(a) as *const () as usize);
                arrays.dedup_by_key(|a| Arc::as_ptr(a) as *const () as usize);
                let bytes = arrays.iter().map(|a| a.get_array_memory_size()).sum();
                lent.queued_bytes += bytes;
                lent.last_update = step;
                lent.queued.push_back(Queued {
                    keys,
                    args,
                    filters,
                    step,
                    bytes,
                });
                // Memory for waiting updates is bounded: past the bound, the query waits for
                // the checkpoint to read the pane out (as it would without lending), then
                // catches up as usual.
                if lent.queued.len() > MAX_WAITING && lent.back.is_none() {
                    lent.back = Self::given_back(lent, true)?;
                }
                continue;
            }
            if !self.panes.contains_key(&pane_start) {
                let pane = self.new_pane()?;
                self.panes.insert(pane_start, pane);
                self.register_windows(pane_start);
            }
            let Some(pane) = self.panes.get_mut(&pane_start) else {
                continue;
            };
            apply(pane, &keys, &args, &filters, step)?;
        }
        Ok(())
    }

    /// Takes back the lent panes in `range` whose tables the checkpoint has read, and
    /// applies the updates they missed, [`CATCH_UP`] a call (the pane stays with the lent
    /// ones, its new updates waiting behind, until it has caught up), so that no micro-batch
    /// pays for all of them at once; with `wait`, every pane in `range` is back and caught up
    /// on return, its table read here if the checkpoint has not yet (or waited for while the
    /// checkpoint reads it).
    fn take_back(&mut self, range: impl RangeBounds<i64>, wait: bool) -> Result<()> {
        let starts: Vec<i64> = self.lent.range(range).map(|(s, _)| *s).collect();
        for start in starts {
            let Some(lent) = self.lent.get_mut(&start) else {
                continue;
            };
            if lent.back.is_none() {
                let Some(pane) = Self::given_back(lent, wait)? else {
                    continue;
                };
                lent.back = Some(pane);
            }
            let n = if wait {
                lent.queued.len()
            } else {
                CATCH_UP.min(lent.queued.len())
            };
            if let Some(pane) = lent.back.as_mut() {
                for q in lent.queued.drain(..n) {
                    apply(pane, &q.keys, &q.args, &q.filters, q.step)?;
                    lent.queued_bytes = lent.queued_bytes.saturating_sub(q.bytes);
                }
            }
            if lent.queued.is_empty()
                && let Some(pane) = self.lent.remove(&start).and_then(|l| l.back)
            {
                self.panes.insert(start, pane);
            }
        }
        Ok(())
    }

    /// The pane of `lent` if its checkpoint has read it out (with `wait`, once it has, reading
    /// it here if it has not begun), `None` if it is still wanted.
    fn given_back(lent: &Lent, wait: bool) -> Result<Option<Pane>> {
        let pane = {
            let mut state = match lent.loan.0.try_lock() {
                Ok(state) => state,
                Err(TryLockError::WouldBlock) if !wait => return Ok(None),
                Err(TryLockError::WouldBlock) => lent.loan.0.lock().map_err(|_| {
                    datafusion::common::DataFusionError::Internal(
                        "a lent pane's lock is poisoned".into(),
                    )
                })?,
                Err(TryLockError::Poisoned(_)) => {
                    return internal_err!("a lent pane's lock is poisoned");
                }
            };
            // A pane whose reading out failed half way may be drained: its state is
            // lost, and the query with it.
            if let Some(e) = &state.failed {
                return exec_err!(
                    "reading window state out for a checkpoint failed, which leaves the \
                         state incomplete: {e}"
                );
            }
            // A checkpoint still holding the loan wants the table; one dropped unwritten
            // does not, nor one already written.
            if Arc::strong_count(&lent.loan) > 1 {
                if state.table.is_none() {
                    if !wait {
                        return Ok(None);
                    }
                    state.read()?;
                }
            } else {
                state.table = None;
            }
            state.pane.take()
        };
        match pane {
            Some(pane) => Ok(Some(pane)),
            None => internal_err!("a lent pane was not given back"),
        }
    }

    /// Start of the pane containing `t`.
    fn pane_start(&self, t: i64) -> i64 {
        (t - self.pane_offset).div_euclid(self.pane_ms) * self.pane_ms + self.pane_offset
    }

    fn new_pane(&self) -> Result<Pane> {
        Ok(Pane {
            groups: new_group_values(self.intern_schema.clone(), &GroupOrdering::None)?,
            accumulators: self.spec.new_accumulators()?,
            rows: LayeredCounts::default(),
            updated: Vec::new(),
            last_update: 0,
        })
    }

    /// Registers the live windows containing the pane starting at `pane_start`.
    fn register_windows(&mut self, pane_start: i64) {
        for (start, end) in self.windows_of(pane_start) {
            if end > self.evicted_through {
                self.windows.entry((end, start)).or_default();
            }
        }
    }

    /// Advances the watermark and returns what is due: final results of windows the
    /// watermark has reached, revisions of windows changed by late events, and, when
    /// `early_fire` is set, partial results of windows not yet final that changed since their
    /// last emission. Then frees windows past their allowed lateness and panes no live window
    /// needs.
    pub fn advance(&mut self, watermark: i64, early_fire: bool) -> Result<Vec<Emission>> {
        // Once a micro-batch (after its updates): lent panes read out come back, catching up,
        // and the emission bookkeeping changed while a checkpoint held it is folded back.
        self.take_back(.., false)?;
        // After a call that stopped at the budget, the windows from where it stopped (the
        // call that began the walk folded the bookkeeping back); from the first again when
        // the watermark has moved since (windows before it may have come due) or early
        // results are due.
        let from = self
            .resume
            .take()
            .filter(|(_, began)| *began >= watermark.max(self.watermark) && !early_fire)
            .map(|(from, _)| from);
        if from.is_none() {
            for meta in self.windows.values_mut() {
                meta.revisions.settle(Layered::<Box<[u8]>, u32>::SETTLE);
                meta.published
                    .settle(Layered::<Box<[u8]>, Box<[u8]>>::SETTLE);
            }
        }
        self.watermark = self.watermark.max(watermark);
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut next = from.map_or(Bound::Unbounded, Bound::Included);
        while let Some((&(end, start), _)) = self.windows.range((next, Bound::Unbounded)).next() {
            next = Bound::Excluded((end, start));
            if bytes >= EMIT_BUDGET {
                self.resume = Some(((end, start), self.watermark));
                break;
            }
            let changed = self.changed_since(start, end);
            let Some(meta) = self.windows.get(&(end, start)) else {
                continue;
            };
            let (emit, is_final) = if !meta.final_fired && end <= self.watermark {
                (true, true)
            } else if meta.final_fired {
                (changed, true)
            } else {
                (early_fire && changed, false)
            };
            if !emit {
                continue;
            }
            let emitted = if self.recompute.is_some() {
                self.emit_recomputed(start, end, is_final)?
            } else {
                self.emit(start, end, is_final)?.into_iter().collect()
            };
            bytes += emitted
                .iter()
                .map(|e| e.batch.get_array_memory_size())
                .sum::<usize>();
            out.extend(emitted);
        }
        self.evict();
        Ok(out)
    }

    /// Whether the last [`WindowOperator::advance`] stopped at [`EMIT_BUDGET`] with windows
    /// left to look at: advance again (with the same watermark) before giving it new rows,
    /// which the windows it has not emitted yet would otherwise take as if still open.
    pub fn due(&self) -> bool {
        self.resume.is_some()
    }

    /// The watermark through which every window has been emitted at `watermark`: `watermark`
    /// itself unless [`WindowOperator::advance`] stopped at the budget, then just before the
    /// end of the first window it has not looked at (what a stage above may take as closed).
    pub fn emitted_through(&self, watermark: i64) -> i64 {
        match self.resume {
            Some(((end, _), _)) => watermark.min(end.saturating_sub(1)),
            None => watermark,
        }
    }

    fn changed_since(&self, start: i64, end: i64) -> bool {
        let Some(meta) = self.windows.get(&(end, start)) else {
            return false;
        };
        let since = meta.emitted_at.unwrap_or(0);
        self.panes
            .range(start..end)
            .any(|(_, p)| p.last_update > since)
            || self
                .lent
                .range(start..end)
                .any(|(_, l)| l.last_update > since)
    }

    /// Evaluates window [start, end): merges its panes and evaluates, keeping only the
    /// groups changed since the window's last emission (all groups at its first emission).
    fn emit(&mut self, start: i64, end: i64, is_final: bool) -> Result<Option<Emission>> {
        // The first final emission carries every group; early fires and revisions carry the
        // groups changed since the window's last emission.
        let since = match self.windows.get(&(end, start)) {
            Some(m) if m.final_fired || !is_final => m.emitted_at,
            _ => None,
        };
        self.take_back(start..end, true)?;
        let mut groups = new_group_values(self.intern_schema.clone(), &GroupOrdering::None)?;
        let mut accumulators = self.spec.new_accumulators()?;
        let mut last_update: Vec<u64> = Vec::new();
        let mut window_ids = Vec::new();
        for (_, pane) in self.panes.range_mut(start..end) {
            let n = pane.groups.len();
            if n == 0 {
                continue;
            }
            let (keys, states) = read_pane(pane)?;
            groups.intern(&keys, &mut window_ids)?;
            let total = groups.len();
            last_update.resize(total, 0);
            for (i, &w) in window_ids.iter().enumerate() {
                last_update[w] = last_update[w].max(pane.updated[i]);
            }
            for (state, window_acc) in states.iter().zip(accumulators.iter_mut()) {
                window_acc.merge_batch(state, &window_ids, total)?;
            }
        }
        let n = groups.len();
        if n == 0 {
            if let Some(meta) = self.windows.get_mut(&(end, start)) {
                meta.emitted_at = Some(self.step);
                meta.final_fired |= is_final;
            }
            return Ok(None);
        }
        let keys = groups.emit(EmitTo::All)?;
        // The constant key of a window-only grouping is not an output column.
        let keys = if self.spec.groups.is_empty() {
            Vec::new()
        } else {
            keys
        };
        let values = accumulators
            .iter_mut()
            .map(|a| a.evaluate(EmitTo::All))
            .collect::<Result<Vec<_>>>()?;
        let window = window_column(start, end, n)?;
        let mut batch = self.spec.output_batch(keys, window, values)?;
        if let Some(since) = since {
            let keep: BooleanArray = last_update.iter().map(|u| Some(*u > since)).collect();
            batch = filter_record_batch(&batch, &keep)?;
        }
        let step = self.step;
        if batch.num_rows() == 0 {
            if let Some(meta) = self.windows.get_mut(&(end, start)) {
                meta.emitted_at = Some(step);
                meta.final_fired |= is_final;
            }
            return Ok(None);
        }
        let group_columns: Vec<ArrayRef> = if self.spec.groups.is_empty() {
            vec![Arc::new(BooleanArray::from(vec![true; batch.num_rows()])) as ArrayRef]
        } else {
            (0..batch.num_columns())
                .filter(|&i| i < self.spec.groups.len() + 1 && i != self.spec.window_position)
                .map(|i| batch.column(i).clone())
                .collect()
        };
        let rows = self.row_converter.convert_columns(&group_columns)?;
        let Some(meta) = self.windows.get_mut(&(end, start)) else {
            return internal_err!("emitting a window that is not live");
        };
        let mut revisions = Vec::with_capacity(batch.num_rows());
        for row in rows.iter() {
            let count = meta.revisions.get_or_insert_with(row.as_ref().into(), || 0);
            revisions.push(*count);
            *count += 1;
        }
        meta.emitted_at = Some(step);
        meta.final_fired |= is_final;
        Ok(Some(Emission {
            batch,
            revisions,
            is_final,
            retract: false,
            until: end,
        }))
    }

    /// Over a changelog: evaluates window [start, end) from its rows and emits the groups
    /// whose values differ from what they last published (every group at the first final
    /// emission), then retracts the groups published earlier that have no rows left.
    fn emit_recomputed(&mut self, start: i64, end: i64, is_final: bool) -> Result<Vec<Emission>> {
        let Some(recompute) = &self.recompute else {
            return internal_err!("recomputing a window needs its rows");
        };
        // The window's rows, each as often as it is held.
        let parser = recompute.rows.parser();
        let mut held = Vec::new();
        for (_, pane) in self.panes.range(start..end) {
            for (row, n) in pane.rows.iter() {
                for _ in 0..n {
                    held.push(parser.parse(row));
                }
            }
        }
        let count = held.len();
        let columns = recompute.rows.convert_rows(held)?;
        let input = RecordBatch::try_new_with_options(
            recompute.input_schema.clone(),
            columns,
            &datafusion::arrow::array::RecordBatchOptions::new().with_row_count(Some(count)),
        )?;
        let Inputs {
            keys: group_values,
            args,
            filters,
            ..
        } = self.spec.inputs(&input)?;
        let mut groups = new_group_values(self.intern_schema.clone(), &GroupOrdering::None)?;
        let mut ids = Vec::with_capacity(input.num_rows());
        groups.intern(&group_values, &mut ids)?;
        let n = groups.len();
        let mut accumulators = self.spec.new_accumulators()?;
        for (a, acc) in accumulators.iter_mut().enumerate() {
            let filter = filters[a]
                .as_ref()
                .and_then(|f| f.as_any().downcast_ref::<BooleanArray>());
            acc.update_batch(&args[a], &ids, filter, n)?;
        }
        let keys = groups.emit(EmitTo::All)?;
        let key_rows = self.row_converter.convert_columns(&keys)?;
        let keys = if self.spec.groups.is_empty() {
            Vec::new()
        } else {
            keys
        };
        let values = accumulators
            .iter_mut()
            .map(|a| a.evaluate(EmitTo::All))
            .collect::<Result<Vec<_>>>()?;
        let batch = self
            .spec
            .output_batch(keys, window_column(start, end, n)?, values)?;
        let without_window = |b: &RecordBatch| -> Vec<ArrayRef> {
            (0..b.num_columns())
                .filter(|i| *i != self.spec.window_position)
                .map(|i| b.column(i).clone())
                .collect()
        };
        let value_rows = recompute.outputs.convert_columns(&without_window(&batch))?;
        let step = self.step;
        let Some(meta) = self.windows.get_mut(&(end, start)) else {
            return internal_err!("emitting a window that is not live");
        };
        let all = is_final && !meta.final_fired;
        let mut keep = Vec::with_capacity(n);
        let mut revisions = Vec::new();
        let mut present: std::collections::HashSet<&[u8]> = std::collections::HashSet::new();
        for i in 0..n {
            let key: &[u8] = key_rows.row(i).data();
            let value: &[u8] = value_rows.row(i).data();
            present.insert(key);
            let changed = meta.published.get(key).is_none_or(|v| v.as_ref() != value);
            keep.push(all || changed);
            if all || changed {
                meta.published.insert(key.into(), value.into());
                let count = meta.revisions.get_or_insert_with(key.into(), || 0);
                revisions.push(*count);
                *count += 1;
            }
        }
        // Groups published earlier with no rows left: withdrawn, with their last values, in
        // key order (the same every run).
        let mut gone: Vec<Box<[u8]>> = meta
            .published
            .iter()
            .map(|(k, _)| k)
            .filter(|k| !present.contains(k.as_ref()))
            .cloned()
            .collect();
        gone.sort_unstable();
        let mut withdrawn = Vec::with_capacity(gone.len());
        let mut retract_revisions = Vec::with_capacity(gone.len());
        for key in &gone {
            if let Some(value) = meta.published.remove(key) {
                withdrawn.push(value);
                let count = meta.revisions.get_or_insert_with(key.clone(), || 0);
                retract_revisions.push(*count);
                *count += 1;
            }
        }
        meta.emitted_at = Some(step);
        meta.final_fired |= is_final;
        let mut out = Vec::new();
        let batch = filter_record_batch(&batch, &BooleanArray::from(keep))?;
        if batch.num_rows() > 0 {
            out.push(Emission {
                batch,
                revisions,
                is_final,
                retract: false,
                until: end,
            });
        }
        if !withdrawn.is_empty() {
            let parser = recompute.outputs.parser();
            let mut columns = recompute
                .outputs
                .convert_rows(withdrawn.iter().map(|v| parser.parse(v)))?;
            columns.insert(
                self.spec.window_position,
                window_column(start, end, withdrawn.len())?,
            );
            let columns = columns
                .iter()
                .zip(self.spec.output_schema.fields())
                .map(|(c, f)| {
                    if c.data_type() == f.data_type() {
                        Ok(c.clone())
                    } else {
                        Ok(cast(c, f.data_type())?)
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            out.push(Emission {
                batch: RecordBatch::try_new(self.spec.output_schema.clone(), columns)?,
                revisions: retract_revisions,
                is_final,
                retract: true,
                until: end,
            });
        }
        Ok(out)
    }

    fn evict(&mut self) {
        let frontier = self.watermark.saturating_sub(self.lateness_ms);
        // Windows from where an advance stopped may still have a revision to emit; those
        // before are done.
        let before = self
            .resume
            .map_or(Bound::Unbounded, |(from, _)| Bound::Excluded(from));
        let expired: Vec<(i64, i64)> = self
            .windows
            .range((Bound::Unbounded, before))
            .take_while(|((end, _), _)| *end <= frontier)
            .filter(|(_, meta)| meta.final_fired)
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            self.windows.remove(&key);
            self.evicted_through = self.evicted_through.max(key.0);
        }
        // Windows that never had data end here too; not past those the walk has yet to
        // look at, which are live until they are emitted.
        let limit = self.resume.map_or(frontier, |((end, _), _)| {
            frontier.min(end.saturating_sub(1))
        });
        if limit > self.evicted_through {
            self.evicted_through = self.evicted_through.max(self.pane_start(limit));
        }
        if self.resume.is_some() {
            // Panes go once the walk over the windows is done.
            return;
        }
        // The spans the live windows cover, merged: a pane is kept when one holds it.
        let mut spans: Vec<(i64, i64)> = self.windows.keys().map(|(e, s)| (*s, *e)).collect();
        spans.sort_unstable();
        let mut covered: Vec<(i64, i64)> = Vec::with_capacity(spans.len());
        for (s, e) in spans {
            match covered.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => covered.push((s, e)),
            }
        }
        let needed = |p: &i64| {
            let i = covered.partition_point(|(s, _)| s <= p);
            i > 0 && *p < covered[i - 1].1
        };
        self.panes.retain(|p, _| needed(p));
        // A lent pane no window needs is dropped with its queued updates; the checkpoint
        // that holds it still reads its table.
        self.lent.retain(|p, _| needed(p));
    }

    /// Live (window, group) partials held, summed over panes. A pane lent to a checkpoint
    /// counts the groups it had when lent: groups its waiting updates create are counted once
    /// it is back (their bytes count meanwhile, in [`WindowOperator::state_bytes`]).
    pub fn group_count(&self) -> usize {
        self.panes
            .values()
            .map(|p| p.groups.len() + p.rows.len())
            .sum::<usize>()
            + self.lent.values().map(|l| l.groups).sum::<usize>()
    }

    /// Bytes held by pane state (group keys and accumulators) and by the live windows'
    /// emission bookkeeping (the revision count of each emitted group).
    pub fn state_bytes(&self) -> usize {
        let panes: usize = self.panes.values().map(pane_bytes).sum::<usize>()
            + self
                .lent
                .values()
                .map(|l| l.bytes + l.queued_bytes)
                .sum::<usize>();
        let windows: usize = self
            .windows
            .values()
            .map(|w| {
                WINDOW_BYTES
                    + w.revisions.len() * (std::mem::size_of::<(Box<[u8]>, u32)>() + 8)
                    + w.revisions.iter().map(|(k, _)| k.len()).sum::<usize>()
                    + w.published
                        .iter()
                        .map(|(k, v)| k.len() + v.len() + 32)
                        .sum::<usize>()
            })
            .sum();
        panes + windows
    }

    /// Live windows.
    pub fn window_count(&self) -> usize {
        self.windows.len()
    }

    /// The aggregation it performs.
    pub fn spec(&self) -> &AggregateSpec {
        &self.spec
    }

    /// Whether it keeps its input rows (over a changelog).
    pub fn holds_rows(&self) -> bool {
        self.recompute.is_some()
    }
}

/// A pane's group keys and, per aggregate, its state arrays (DataFusion's partial
/// aggregation state), leaving the pane as it was.
///
/// `GroupValues::emit(EmitTo::All)` drains the interner's values but, for the multi-column
/// interner, leaves its hash table pointing at them: the interner must be cleared
/// (`clear_shrink`, as DataFusion's own aggregation does after a full emit) before keys are
/// interned into it again, or it compares new keys against group indices that no longer exist.
fn read_pane(pane: &mut Pane) -> Result<(Vec<ArrayRef>, Vec<Vec<ArrayRef>>)> {
    let n = pane.groups.len();
    let keys = pane.groups.emit(EmitTo::All)?;
    pane.groups.clear_shrink(n);
    let mut same = Vec::with_capacity(n);
    pane.groups.intern(&keys, &mut same)?;
    if same.iter().enumerate().any(|(i, g)| *g != i) {
        return internal_err!("pane groups changed order while being read");
    }
    let mut states = Vec::with_capacity(pane.accumulators.len());
    for acc in pane.accumulators.iter_mut() {
        let state = acc.state(EmitTo::All)?;
        acc.merge_batch(&state, &same, n)?;
        states.push(state);
    }
    Ok((keys, states))
}

/// Applies one update to `pane`: interns the rows' group `keys` and updates each aggregate
/// with its arguments and filter, at `step`.
fn apply(
    pane: &mut Pane,
    keys: &[ArrayRef],
    args: &[Vec<ArrayRef>],
    filters: &[Option<ArrayRef>],
    step: u64,
) -> Result<()> {
    let mut group_ids = Vec::with_capacity(keys.first().map_or(0, |k| k.len()));
    pane.groups.intern(keys, &mut group_ids)?;
    let total = pane.groups.len();
    pane.updated.resize(total, 0);
    for &g in &group_ids {
        pane.updated[g] = step;
    }
    pane.last_update = step;
    for ((acc, args), filter) in pane.accumulators.iter_mut().zip(args).zip(filters) {
        let filter = filter
            .as_ref()
            .and_then(|f| f.as_any().downcast_ref::<BooleanArray>());
        acc.update_batch(args, &group_ids, filter, total)?;
    }
    Ok(())
}

/// Bytes held by a pane's state.
fn pane_bytes(p: &Pane) -> usize {
    p.groups.size()
        + p.accumulators.iter().map(|a| a.size()).sum::<usize>()
        + p.updated.capacity() * 8
        + p.rows.iter().map(|(r, _)| r.len() + 32).sum::<usize>()
}

/// The checkpoint table of the pane starting at `start` (per group: the pane start, update
/// steps, group key columns and the aggregates' state columns), leaving the pane as it was.
/// `state_columns` is what the snapshot announced per aggregate.
fn pane_table(start: i64, pane: &mut Pane, state_columns: &[usize]) -> Result<RecordBatch> {
    let n = pane.groups.len();
    let (keys, states) = read_pane(pane)?;
    if !states
        .iter()
        .map(Vec::len)
        .eq(state_columns.iter().copied())
    {
        return internal_err!("an aggregate's state has other columns than its state fields");
    }
    let mut columns: Vec<(String, ArrayRef)> = vec![
        (
            "pane_start".into(),
            Arc::new(Int64Array::from(vec![start; n])),
        ),
        (
            "updated".into(),
            Arc::new(UInt64Array::from(pane.updated[..n].to_vec())),
        ),
        (
            "last_update".into(),
            Arc::new(UInt64Array::from(vec![pane.last_update; n])),
        ),
    ];
    columns.extend(
        keys.into_iter()
            .enumerate()
            .map(|(i, k)| (format!("key{i}"), k)),
    );
    for (a, state) in states.into_iter().enumerate() {
        columns.extend(
            state
                .into_iter()
                .enumerate()
                .map(|(j, c)| (format!("state{a}_{j}"), c)),
        );
    }
    table(columns).map_err(|e| datafusion::common::DataFusionError::External(Box::new(e)))
}

/// Snapshot of the scalars of a [`WindowOperator`].
#[derive(serde::Serialize, serde::Deserialize)]
struct WindowMetaSnapshot {
    evicted_through: i64,
    watermark: i64,
    step: u64,
    /// Group key columns, then per aggregate its number of state columns.
    key_columns: usize,
    state_columns: Vec<usize>,
}

impl WindowOperator {
    /// The operator's state for a checkpoint: table `panes` (per pane and group: the pane
    /// start, update steps, group key columns and the aggregates' state columns) and table
    /// `windows` (per live window its emission bookkeeping, and per emitted group its
    /// revision count).
    /// The `panes` table is deferred: each pane holding groups is lent to the snapshot and
    /// read out when the snapshot is resolved (see the module documentation).
    pub fn snapshot(&mut self) -> crate::Result<StateSnapshot> {
        // Panes still lent to the last checkpoint come back first.
        self.take_back(.., true)?;
        let key_columns = self.intern_schema.fields().len();
        let state_columns = self
            .spec
            .aggregates
            .iter()
            .map(|a| a.state_fields().map(|f| f.len()))
            .collect::<Result<Vec<_>>>()?;
        let lend: Vec<i64> = self
            .panes
            .iter()
            .filter(|(_, p)| !p.groups.is_empty())
            .map(|(s, _)| *s)
            .collect();
        let mut loans = Vec::with_capacity(lend.len());
        for start in lend {
            let Some(pane) = self.panes.remove(&start) else {
                continue;
            };
            let lent = Lent {
                back: None,
                last_update: pane.last_update,
                groups: pane.groups.len(),
                bytes: pane_bytes(&pane),
                queued_bytes: 0,
                queued: Default::default(),
                loan: Arc::new(Loan(Mutex::new(LoanState {
                    start,
                    pane: Some(pane),
                    table: None,
                    state_columns: state_columns.clone(),
                    failed: None,
                }))),
            };
            loans.push(lent.loan.clone());
            self.lent.insert(start, lent);
        }
        let mut out = StateSnapshot::default();
        if !loans.is_empty() {
            out.deferred
                .insert("panes".into(), Arc::new(PanesTable(loans)));
        }
        if self.recompute.is_some() && !self.panes.is_empty() {
            // Over a changelog: each pane's rows, taken as they are now (O(1) a pane once the
            // last checkpoint's changes are folded back).
            let panes = self
                .panes
                .iter_mut()
                .map(|(start, pane)| (*start, pane.last_update, pane.rows.share()))
                .collect();
            out.deferred
                .insert("rows".into(), Arc::new(TakenRows(panes)));
        }
        if !self.windows.is_empty() {
            let windows = self
                .windows
                .iter_mut()
                .map(|((end, start), meta)| TakenWindow {
                    end: *end,
                    start: *start,
                    emitted_at: meta.emitted_at,
                    final_fired: meta.final_fired,
                    revisions: meta.revisions.share(),
                    published: meta.published.share(),
                })
                .collect();
            out.deferred
                .insert("windows".into(), Arc::new(TakenWindows(windows)));
        }
        out.meta = serde_json::to_value(WindowMetaSnapshot {
            evicted_through: self.evicted_through,
            watermark: self.watermark,
            step: self.step,
            key_columns,
            state_columns,
        })
        .map_err(|e| crate::Error::Checkpoint(e.to_string()))?;
        Ok(out)
    }

    /// Replaces the operator's state with a [`WindowOperator::snapshot`] of the same query.
    pub fn restore(&mut self, snapshot: &StateSnapshot) -> crate::Result<()> {
        let meta: WindowMetaSnapshot = serde_json::from_value(snapshot.meta.clone())
            .map_err(|e| crate::Error::Checkpoint(format!("window state: {e}")))?;
        if meta.key_columns != self.intern_schema.fields().len() {
            return Err(crate::Error::Checkpoint(format!(
                "window state has {} key columns, the query groups by {}",
                meta.key_columns,
                self.intern_schema.fields().len()
            )));
        }
        self.panes.clear();
        self.lent.clear();
        self.windows.clear();
        self.resume = None;
        self.evicted_through = meta.evicted_through;
        self.watermark = meta.watermark;
        self.step = meta.step;
        if let Some(panes) = snapshot.tables.get("panes") {
            let starts = typed::<Int64Array>(column(panes, "pane_start")?, "pane_start")?.clone();
            let mut from = 0;
            while from < panes.num_rows() {
                let start = starts.value(from);
                let mut to = from;
                while to < panes.num_rows() && starts.value(to) == start {
                    to += 1;
                }
                let rows = panes.slice(from, to - from);
                self.restore_pane(start, &rows, &meta)?;
                from = to;
            }
        }
        if let Some(rows) = snapshot.tables.get("rows") {
            if self.recompute.is_none() {
                return Err(crate::Error::Checkpoint(
                    "window state holds rows of a changelog, the query does not read one".into(),
                ));
            }
            let starts = typed::<Int64Array>(column(rows, "pane_start")?, "pane_start")?;
            let updates = typed::<UInt64Array>(column(rows, "last_update")?, "last_update")?;
            let values = typed::<BinaryArray>(column(rows, "row")?, "row")?;
            let counts = typed::<UInt64Array>(column(rows, "count")?, "count")?;
            for r in 0..rows.num_rows() {
                let start = starts.value(r);
                if !self.panes.contains_key(&start) {
                    let pane = self.new_pane()?;
                    self.panes.insert(start, pane);
                }
                if let Some(pane) = self.panes.get_mut(&start) {
                    pane.last_update = updates.value(r);
                    if !values.is_null(r) {
                        pane.rows.insert(values.value(r).into(), counts.value(r));
                    }
                }
            }
        }
        if let Some(windows) = snapshot.tables.get("windows") {
            // Absent from checkpoints of queries that never read a changelog.
            let published = windows
                .column_by_name("published")
                .and_then(|c| c.as_any().downcast_ref::<BinaryArray>());
            let ends = typed::<Int64Array>(column(windows, "end")?, "end")?;
            let starts = typed::<Int64Array>(column(windows, "start")?, "start")?;
            let emitted = typed::<UInt64Array>(column(windows, "emitted_at")?, "emitted_at")?;
            let fired = typed::<BooleanArray>(column(windows, "final_fired")?, "final_fired")?;
            let keys = typed::<BinaryArray>(column(windows, "key")?, "key")?;
            let revisions = typed::<UInt32Array>(column(windows, "revisions")?, "revisions")?;
            for r in 0..windows.num_rows() {
                let meta = self
                    .windows
                    .entry((ends.value(r), starts.value(r)))
                    .or_default();
                if keys.is_null(r) {
                    meta.emitted_at = (!emitted.is_null(r)).then(|| emitted.value(r));
                    meta.final_fired = fired.value(r);
                } else {
                    meta.revisions
                        .insert(keys.value(r).into(), revisions.value(r));
                    if let Some(p) = published.filter(|p| !p.is_null(r)) {
                        meta.published
                            .insert(keys.value(r).into(), p.value(r).into());
                    }
                }
            }
        }
        Ok(())
    }

    fn restore_pane(
        &mut self,
        start: i64,
        rows: &RecordBatch,
        meta: &WindowMetaSnapshot,
    ) -> crate::Result<()> {
        let n = rows.num_rows();
        let mut pane = self.new_pane()?;
        let keys: Vec<ArrayRef> = (0..meta.key_columns)
            .map(|i| column(rows, &format!("key{i}")).cloned())
            .collect::<crate::Result<_>>()?;
        let mut ids = Vec::with_capacity(n);
        pane.groups.intern(&keys, &mut ids)?;
        if ids.iter().enumerate().any(|(i, g)| *g != i) {
            return Err(crate::Error::Checkpoint(format!(
                "pane {start} holds a group key twice"
            )));
        }
        if meta.state_columns.len() != pane.accumulators.len() {
            return Err(crate::Error::Checkpoint(format!(
                "window state has {} aggregates, the query computes {}",
                meta.state_columns.len(),
                pane.accumulators.len()
            )));
        }
        for (a, acc) in pane.accumulators.iter_mut().enumerate() {
            let state: Vec<ArrayRef> = (0..meta.state_columns[a])
                .map(|j| column(rows, &format!("state{a}_{j}")).cloned())
                .collect::<crate::Result<_>>()?;
            acc.merge_batch(&state, &ids, n)?;
        }
        pane.updated = typed::<UInt64Array>(column(rows, "updated")?, "updated")?
            .values()
            .to_vec();
        pane.last_update =
            typed::<UInt64Array>(column(rows, "last_update")?, "last_update")?.value(0);
        self.panes.insert(start, pane);
        Ok(())
    }
}

fn window_column(start: i64, end: i64, n: usize) -> Result<ArrayRef> {
    let starts: ArrayRef = Arc::new(TimestampMillisecondArray::from(vec![start; n]));
    let ends: ArrayRef = Arc::new(TimestampMillisecondArray::from(vec![end; n]));
    Ok(Arc::new(StructArray::try_new(
        window_fields(),
        vec![starts, ends],
        None,
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(window: WindowSpec) -> WindowOperator {
        use datafusion::arrow::datatypes::{Field, Schema};
        let group_schema = Arc::new(Schema::new(vec![Field::new("k", DataType::Utf8, true)]));
        let spec = AggregateSpec {
            window,
            time: Arc::new(datafusion::physical_expr::expressions::Column::new("t", 0)),
            groups: vec![],
            window_position: 0,
            aggregates: vec![],
            filters: vec![],
            output_schema: group_schema.clone(),
            group_schema,
        };
        WindowOperator::new(spec, 0).expect("operator")
    }

    #[test]
    fn windows_of_each_kind() {
        let t = op(WindowSpec::Tumble {
            width: 60,
            offset: 0,
        });
        assert_eq!(t.windows_of(61), vec![(60, 120)]);
        assert_eq!(t.windows_of(-1), vec![(-60, 0)]);
        let day = op(WindowSpec::Tumble {
            width: 100,
            offset: 70,
        });
        assert_eq!(day.windows_of(69), vec![(-30, 70)]);
        assert_eq!(day.windows_of(70), vec![(70, 170)]);
        assert_eq!(day.last_window_end(169), 170);
        assert_eq!(day.pane_start(169), 70);
        let h = op(WindowSpec::Hop {
            slide: 10,
            size: 30,
        });
        assert_eq!(h.windows_of(25), vec![(0, 30), (10, 40), (20, 50)]);
        assert_eq!(h.pane_ms, 10);
        let h = op(WindowSpec::Hop {
            slide: 20,
            size: 30,
        });
        assert_eq!(h.windows_of(25), vec![(0, 30), (20, 50)]);
        assert_eq!(h.windows_of(15), vec![(0, 30)]);
        assert_eq!(h.windows_of(35), vec![(20, 50)]);
        assert_eq!(h.pane_ms, 10);
        let c = op(WindowSpec::Cumulate { step: 10, max: 30 });
        assert_eq!(c.windows_of(15), vec![(0, 20), (0, 30)]);
        assert_eq!(c.windows_of(31), vec![(30, 40), (30, 50), (30, 60)]);
    }

    /// `closes_between` (constant time) says what the windows an event belongs to say.
    #[test]
    fn closes_between_agrees_with_the_windows_of_an_event() {
        let ops = [
            op(WindowSpec::Tumble {
                width: 60,
                offset: 0,
            }),
            op(WindowSpec::Tumble {
                width: 100,
                offset: 70,
            }),
            op(WindowSpec::Hop {
                slide: 10,
                size: 30,
            }),
            op(WindowSpec::Hop {
                slide: 20,
                size: 30,
            }),
            op(WindowSpec::Cumulate { step: 10, max: 30 }),
        ];
        for o in &ops {
            for t in -130..130 {
                for after in (-150..150).step_by(7) {
                    for through in (after..after + 90).step_by(3) {
                        let want = o
                            .windows_of(t)
                            .iter()
                            .any(|(_, end)| after < *end && *end <= through);
                        assert_eq!(
                            o.closes_between(t, after, through),
                            want,
                            "{:?} t {t} after {after} through {through}",
                            o.spec.window
                        );
                    }
                }
            }
        }
    }
}
