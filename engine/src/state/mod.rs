//! State: what stream queries keep between micro-batches.
//!
//! Windowed aggregation state never holds raw events, only DataFusion group keys and
//! accumulator state:
//! - [`window::WindowOperator`]: `tumble`, `hop` and `cumulate`, in panes shared by windows;
//! - [`session::SessionOperator`]: `session`, per key.
//!
//! Both implement [`WindowedAggregation`], which the query runtime drives.
//!
//! [`upsert`] holds the latest row per key of a source read as a changelog; [`ranked`] the
//! groups of each window for a ranking over them (top-N per window).
//!
//! [`join`] holds the rows of the two sides of a stream–stream join until no row to come can
//! meet them; [`lag`] each key's last values for `LAG`, in a [`layered`] map.
//!
//! [`keyed`] holds the per-key state of detectors, health checks and alert machines
//! (`anomaly_score(…) OVER (PARTITION BY …)` and friends) across micro-batches, in a
//! [`layered`] map that a checkpoint takes whole at once.

pub mod join;
pub mod keyed;
pub mod lag;
pub mod layered;
pub mod ranked;
pub mod session;
pub mod upsert;
pub mod window;

use datafusion::arrow::array::RecordBatch;
use datafusion::common::Result;

use crate::checkpoint::StateSnapshot;
use window::Emission;

/// Key columns as they are compared in the row format: a float's negative zero made zero,
/// and every NaN one NaN (half floats as they are). SQL's `=` (and DataFusion's grouping)
/// takes `-0.0 = 0.0`, while the row format tells their bits apart: a join on a DOUBLE key
/// paired no `0.0` with a `-0.0`, and sessions, `LAG` and detectors kept them as two keys.
pub fn comparable_keys(
    columns: &[datafusion::arrow::array::ArrayRef],
) -> Vec<datafusion::arrow::array::ArrayRef> {
    use datafusion::arrow::array::{AsArray, PrimitiveArray};
    use datafusion::arrow::datatypes::{DataType, Float32Type, Float64Type};
    use std::sync::Arc;
    columns
        .iter()
        .map(|c| match c.data_type() {
            DataType::Float64 => {
                let a: PrimitiveArray<Float64Type> = c.as_primitive::<Float64Type>().unary(|v| {
                    if v == 0.0 {
                        0.0
                    } else if v.is_nan() {
                        f64::NAN
                    } else {
                        v
                    }
                });
                Arc::new(a) as _
            }
            DataType::Float32 => {
                let a: PrimitiveArray<Float32Type> = c.as_primitive::<Float32Type>().unary(|v| {
                    if v == 0.0 {
                        0.0
                    } else if v.is_nan() {
                        f32::NAN
                    } else {
                        v
                    }
                });
                Arc::new(a) as _
            }
            _ => c.clone(),
        })
        .collect()
}

/// Incremental windowed aggregation, as the query runtime drives it.
pub trait WindowedAggregation: Send {
    /// Adds the rows of `batch` (the aggregation's input). Rows must not be late.
    fn update(&mut self, batch: &RecordBatch) -> Result<()> {
        let inputs = self.prepare(batch)?;
        self.update_prepared(batch, inputs)
    }
    /// Evaluates what [`WindowedAggregation::update`] takes from `batch` (event times, group
    /// keys, aggregate arguments and filters) without changing any state: where an update
    /// fails on the rows' values (a cast, a division by zero), it fails here. `None`: nothing
    /// to evaluate first (no rows, or rows a changelog window takes as they are).
    fn prepare(&self, batch: &RecordBatch) -> Result<Option<window::Inputs>>;
    /// [`WindowedAggregation::update`] with what [`WindowedAggregation::prepare`] gave for
    /// `batch`.
    fn update_prepared(
        &mut self,
        batch: &RecordBatch,
        inputs: Option<window::Inputs>,
    ) -> Result<()>;
    /// Withdraws rows added earlier (over a changelog input, rows superseded upstream).
    fn retract(&mut self, batch: &RecordBatch) -> Result<()> {
        let _ = batch;
        datafusion::common::not_impl_err!("this aggregation cannot take rows back")
    }
    /// Advances the watermark and returns the emissions due (final results, revisions from
    /// late events, and early partial results when `early_fire`); frees expired state.
    fn advance(&mut self, watermark: i64, early_fire: bool) -> Result<Vec<Emission>>;
    /// Whether the last [`WindowedAggregation::advance`] left windows to emit (it returns a
    /// bounded amount of results a call): advance again before new rows.
    fn due(&self) -> bool {
        false
    }
    /// The watermark through which every window has been emitted at `watermark` (less than
    /// it while [`WindowedAggregation::due`]): what a stage above may take as closed.
    fn emitted_through(&self, watermark: i64) -> i64 {
        watermark
    }
    /// Whether an event at `t` can no longer change any output.
    fn is_late(&self, t: i64) -> bool;
    /// Events at or after this time are late for none of their windows: neither
    /// [`WindowedAggregation::is_late`] nor [`WindowedAggregation::closed_windows_of`] holds
    /// for them, so a batch's rows need not be asked one by one.
    fn timely_from(&self) -> i64;
    /// Whether `keys` (group key columns, one row per event) at `times` can no longer change
    /// any output: [`WindowedAggregation::is_late`] unless lateness depends on the key (a
    /// session still open absorbs an event older than a session of its own would allow).
    fn late_for_keys(
        &self,
        keys: &[datafusion::arrow::array::ArrayRef],
        times: &[i64],
    ) -> Result<Vec<bool>> {
        let _ = keys;
        Ok(times.iter().map(|t| self.is_late(*t)).collect())
    }
    /// Whether [`WindowedAggregation::late_for_keys`] looks at the keys.
    fn keyed_lateness(&self) -> bool {
        false
    }
    /// The end of the last window an event at `t` may belong to (for offset tracking).
    fn last_window_end(&self, t: i64) -> i64;
    /// The windows (start, end) of an event at `t` that are already gone while others of its
    /// windows are not (hop, cumulate): the event updates the live ones and is recorded as
    /// late for these. Empty when the event is late for none, or for all of them.
    fn closed_windows_of(&self, _t: i64) -> Vec<(i64, i64)> {
        Vec::new()
    }
    /// Events whose [`WindowedAggregation::last_window_end`] is at or before this no longer
    /// matter to any live window.
    fn evicted_through(&self) -> i64;
    /// The end through which windows are gone once the watermark reaches `watermark` (as
    /// [`WindowedAggregation::evicted_through`] would be after advancing to it), when
    /// whether an event is late depends on its time alone; `None` otherwise (sessions, where
    /// a live session of the event's key may still take it).
    fn frontier(&self, watermark: i64) -> Option<i64> {
        let _ = watermark;
        None
    }
    /// Whether a window of an event at `t` ends after `after` and at or before `through`:
    /// it would be gone for the event had the windows been evicted through `through`
    /// rather than `after`.
    fn closes_between(&self, t: i64, after: i64, through: i64) -> bool {
        let _ = (t, after, through);
        false
    }
    /// (window, group) partials held.
    fn group_count(&self) -> usize;
    /// Bytes of state held.
    fn state_bytes(&self) -> usize;
    /// Live windows (sessions, for session windows).
    fn window_count(&self) -> usize;
    /// The state, for a checkpoint.
    fn snapshot(&mut self) -> crate::Result<StateSnapshot>;
    /// Replaces the state with a [`WindowedAggregation::snapshot`] of the same query.
    fn restore(&mut self, snapshot: &StateSnapshot) -> crate::Result<()>;
    /// The aggregation it performs.
    fn spec(&self) -> &window::AggregateSpec;
    /// Whether it keeps its input rows (over a changelog, to aggregate windows afresh).
    fn holds_rows(&self) -> bool {
        false
    }
}

/// The `PARTITION BY` keys a keyed operator (detectors, `LAG`) runs with: `partition_by`, or,
/// without any, one constant key, so that the whole stream is one series (a row converter
/// over no columns would give no rows).
pub fn series_keys(
    partition_by: Vec<std::sync::Arc<dyn datafusion::physical_expr::PhysicalExpr>>,
) -> Vec<std::sync::Arc<dyn datafusion::physical_expr::PhysicalExpr>> {
    if !partition_by.is_empty() {
        return partition_by;
    }
    vec![std::sync::Arc::new(
        datafusion::physical_expr::expressions::Literal::new(
            datafusion::common::ScalarValue::Boolean(Some(true)),
        ),
    )]
}

/// The rows of `batch` in the order of `order` (epoch ms; NULL first), rows of one time in
/// the order of their values, not of their arrival: a key's state stepped over them does not
/// depend on how the input was cut or which partition delivered first.
pub(crate) fn time_then_value_order(
    batch: &RecordBatch,
    order: &datafusion::arrow::array::TimestampMillisecondArray,
) -> Result<Vec<usize>> {
    use datafusion::arrow::array::Array;
    use datafusion::arrow::row::{RowConverter, SortField};
    let time = |r: usize| {
        if order.is_null(r) {
            i64::MIN
        } else {
            order.value(r)
        }
    };
    let mut sequence: Vec<usize> = (0..batch.num_rows()).collect();
    sequence.sort_by_key(|&r| time(r));
    if sequence.windows(2).any(|w| time(w[0]) == time(w[1])) {
        let fields = batch
            .schema()
            .fields()
            .iter()
            .map(|f| SortField::new(f.data_type().clone()))
            .collect();
        let whole = RowConverter::new(fields)?.convert_columns(batch.columns())?;
        sequence.sort_by(|&a, &b| {
            time(a)
                .cmp(&time(b))
                .then_with(|| whole.row(a).cmp(&whole.row(b)))
        });
    }
    Ok(sequence)
}

/// `expr` as SQL-like text without the column positions DataFusion prints (`speed@3` is
/// `speed`): a state's layout names what it holds, not where the plan below found it.
pub fn expr_layout(expr: &dyn std::fmt::Display) -> String {
    let text = expr.to_string();
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        if c == '\'' {
            quoted = !quoted;
        }
        if !quoted && c == '@' && chars.peek().is_some_and(char::is_ascii_digit) {
            while chars.peek().is_some_and(char::is_ascii_digit) {
                chars.next();
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl WindowedAggregation for window::WindowOperator {
    fn prepare(&self, batch: &RecordBatch) -> Result<Option<window::Inputs>> {
        window::WindowOperator::prepare(self, batch)
    }
    fn update_prepared(
        &mut self,
        batch: &RecordBatch,
        inputs: Option<window::Inputs>,
    ) -> Result<()> {
        window::WindowOperator::update_prepared(self, batch, inputs)
    }
    fn retract(&mut self, batch: &RecordBatch) -> Result<()> {
        window::WindowOperator::retract(self, batch)
    }
    fn advance(&mut self, watermark: i64, early_fire: bool) -> Result<Vec<Emission>> {
        window::WindowOperator::advance(self, watermark, early_fire)
    }
    fn due(&self) -> bool {
        window::WindowOperator::due(self)
    }
    fn emitted_through(&self, watermark: i64) -> i64 {
        window::WindowOperator::emitted_through(self, watermark)
    }
    fn is_late(&self, t: i64) -> bool {
        window::WindowOperator::is_late(self, t)
    }
    fn timely_from(&self) -> i64 {
        // Every window of an event ends after it: at or after `evicted_through`, none of
        // them has been evicted.
        window::WindowOperator::evicted_through(self)
    }
    fn last_window_end(&self, t: i64) -> i64 {
        window::WindowOperator::last_window_end(self, t)
    }
    fn closed_windows_of(&self, t: i64) -> Vec<(i64, i64)> {
        window::WindowOperator::closed_windows_of(self, t)
    }
    fn frontier(&self, watermark: i64) -> Option<i64> {
        Some(window::WindowOperator::frontier(self, watermark))
    }
    fn closes_between(&self, t: i64, after: i64, through: i64) -> bool {
        window::WindowOperator::closes_between(self, t, after, through)
    }
    fn evicted_through(&self) -> i64 {
        window::WindowOperator::evicted_through(self)
    }
    fn group_count(&self) -> usize {
        window::WindowOperator::group_count(self)
    }
    fn state_bytes(&self) -> usize {
        window::WindowOperator::state_bytes(self)
    }
    fn window_count(&self) -> usize {
        window::WindowOperator::window_count(self)
    }
    fn snapshot(&mut self) -> crate::Result<StateSnapshot> {
        window::WindowOperator::snapshot(self)
    }
    fn restore(&mut self, snapshot: &StateSnapshot) -> crate::Result<()> {
        window::WindowOperator::restore(self, snapshot)
    }
    fn spec(&self) -> &window::AggregateSpec {
        window::WindowOperator::spec(self)
    }
    fn holds_rows(&self) -> bool {
        window::WindowOperator::holds_rows(self)
    }
}
