//! Windows of windows: a windowed aggregation over the results of another in the same query.
//!
//! `SELECT …, avg(speed) FROM (SELECT segment_id, window_end AS minute, avg(speed) AS speed
//! FROM camera_events GROUP BY tumble(event_time, INTERVAL '1 minute'), segment_id)
//! GROUP BY hop(minute, INTERVAL '1 minute', INTERVAL '5 minutes'), segment_id` plans as two
//! stages. The lower stage is the query's ordinary windowed aggregation; each stage above it is
//! a [`Chained`] stage:
//!
//! - its event time is the `window_end` (or, for tumbling and hopping windows, the
//!   `window_start`) of the stage below, and its watermark is that bound of the earliest
//!   window below still open: when the stage below closes a window, the stage above closes
//!   its own in the same step, with no topic round trip;
//! - the stage below's results are a changelog for it: a revision replaces the row published
//!   earlier for its group and window, a retraction deletes it, and early results are
//!   replaced by the final ones. So its windows run over a changelog
//!   ([`WindowOperator::over_changelog`]), and [`UpsertState`] keeps what the stage below has
//!   published until the stage above can no longer change;
//! - it inherits the query's allowed lateness (plus the window size below when it windows by
//!   `window_start`, or the step of the grid the windows below end on when by `window_end`,
//!   as its watermark leads to the next end below): a revision of the stage below always
//!   lands in a window of this stage that is still open or revisable.

use crate::plan::reused::ReusedPlan;
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, AsArray, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Result, ScalarValue, plan_err};
use datafusion::execution::TaskContext;
use datafusion::physical_expr::expressions::{CastExpr, Column, Literal, TryCastExpr};
use datafusion::physical_expr::{PhysicalExpr, ScalarFunctionExpr};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode};
use urbanstream_operators::window::{WINDOW_FUNCTIONS, WindowSpec, interval_ms};

use super::feed::{Feed, FeedExec};
use crate::checkpoint::StateSnapshot;
use crate::state::WindowedAggregation;
use crate::state::keyed::KeyedSeriesExec;
use crate::state::ranked::RankedState;
use crate::state::upsert::UpsertState;
use crate::state::window::{AggregateSpec, Emission, WindowOperator};

/// A windowed aggregation as the query runtime drives it: the operator, the plan run over its
/// results, and the stage above it, if any.
pub(super) struct Windowed {
    pub(super) operator: Box<dyn WindowedAggregation>,
    pub(super) upper: ReusedPlan,
    pub(super) upper_feed: Feed,
    /// Schema of the aggregation's output, which the upper plan reads.
    pub(super) upper_schema: SchemaRef,
    /// Its group keys besides the window, over the lower plan's rows.
    pub(super) groups: Vec<Arc<dyn PhysicalExpr>>,
    /// Whether the windows are sessions (whose rows may be retracted).
    pub(super) sessions: bool,
    /// The window.
    pub(super) spec: WindowSpec,
    /// For session windows grouped by keys: the group keys of source records, so that an old
    /// record is tested for lateness against its key's live sessions.
    pub(super) lateness_keys: Option<super::repartition::KeyPlan>,
    /// The `HAVING` condition over the window's rows: a revision that no longer passes it
    /// withdraws its key and window. Only on the last stage (a stage below passes its rows on
    /// as a changelog, where the condition is part of the next stage's input plan).
    pub(super) having: Option<super::stream::Having>,
    /// The windowed aggregation over this one's results, in the same query.
    pub(super) next: Option<Box<Chained>>,
    /// Position of the window column among the aggregation's output columns.
    pub(super) window_position: usize,
    /// On the last stage of a query ranking each window's groups (top-N per window): the
    /// groups of each window, ranked afresh whenever the window emits.
    pub(super) ranked: Option<RankedState>,
    /// Per output column of the upper plan: whether it is one of the aggregates' results
    /// passed on as it is (a revision of the window changes it).
    pub(super) aggregate_outputs: Vec<bool>,
}

impl Windowed {
    /// This stage and the ones above it, from the bottom.
    pub(super) fn stages(&self) -> impl Iterator<Item = &Windowed> {
        std::iter::successors(Some(self), |w| w.next.as_deref().map(|c| &c.stage))
    }

    /// The plan run per emission: over the window's rows to the query's output, or, below
    /// another stage, to that stage's input.
    pub(super) fn emission_plan(&self) -> &Arc<dyn ExecutionPlan> {
        match &self.next {
            Some(next) => &next.lower,
            None => &self.upper,
        }
    }

    /// Whether this stage keeps rows encoded in a plan's schema: the rows of a changelog it
    /// aggregates (to withdraw them through its input plan), the rows the stage below
    /// published, or the rows it ranked. Such state is only restored into the same plans.
    pub(super) fn holds_rows(&self) -> bool {
        self.operator.holds_rows()
            || self.ranked.is_some()
            || self.next.as_ref().is_some_and(|n| n.published.is_some())
    }

    /// Groups held over all stages (with the rows kept of the stages below).
    pub(super) fn group_count(&self) -> usize {
        self.stages()
            .map(|w| w.operator.group_count())
            .sum::<usize>()
            + self
                .chained()
                .filter_map(|c| c.published.as_ref())
                .map(UpsertState::len)
                .sum::<usize>()
            + self
                .stages()
                .filter_map(|w| w.ranked.as_ref())
                .map(RankedState::len)
                .sum::<usize>()
    }

    /// Bytes held over all stages.
    pub(super) fn state_bytes(&self) -> usize {
        self.stages()
            .map(|w| w.operator.state_bytes())
            .sum::<usize>()
            + self
                .chained()
                .filter_map(|c| c.published.as_ref())
                .map(UpsertState::bytes)
                .sum::<usize>()
            + self
                .stages()
                .filter_map(|w| w.ranked.as_ref())
                .map(RankedState::bytes)
                .sum::<usize>()
    }

    /// Live windows over all stages.
    pub(super) fn window_count(&self) -> usize {
        self.stages().map(|w| w.operator.window_count()).sum()
    }

    /// The stages above this one.
    fn chained(&self) -> impl Iterator<Item = &Chained> {
        std::iter::successors(self.next.as_deref(), |c| c.stage.next.as_deref())
    }

    /// Every stage's state: the bottom one's under `window` (as a query of one stage has
    /// it), stage i (from 2) under `window<i>`, with the rows it keeps of the stage below
    /// under `published<i>`.
    pub(super) fn snapshot(&mut self, out: &mut StateSnapshot) -> crate::Result<()> {
        out.nest("window", self.operator.snapshot()?);
        let mut stages = 1;
        let mut next = self.next.as_deref_mut();
        while let Some(c) = next {
            stages += 1;
            out.nest(&format!("window{stages}"), c.stage.operator.snapshot()?);
            if let Some(published) = &mut c.published {
                out.nest(&format!("published{stages}"), published.snapshot()?);
            }
            next = c.stage.next.as_deref_mut();
        }
        if let Some(meta) = out.meta.as_object_mut() {
            meta.insert("stages".into(), stages.into());
        }
        let mut stage = Some(self);
        while let Some(w) = stage {
            if let Some(ranked) = &mut w.ranked {
                out.nest("ranked", ranked.snapshot()?);
                break;
            }
            stage = w.next.as_deref_mut().map(|c| &mut c.stage);
        }
        Ok(())
    }

    /// Restores a [`Windowed::snapshot`] of the same stages.
    pub(super) fn restore(&mut self, snapshot: &StateSnapshot) -> crate::Result<()> {
        let stages = snapshot
            .meta
            .get("stages")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(1);
        if stages != self.stages().count() as u64 {
            return Err(crate::Error::Checkpoint(format!(
                "the state holds {stages} windowed stages, the query {}",
                self.stages().count()
            )));
        }
        self.operator.restore(&snapshot.nested("window"))?;
        let mut stage = 1;
        let mut next = self.next.as_deref_mut();
        while let Some(c) = next {
            stage += 1;
            c.stage
                .operator
                .restore(&snapshot.nested(&format!("window{stage}")))?;
            if let Some(published) = &mut c.published {
                published.restore(&snapshot.nested(&format!("published{stage}")))?;
            }
            next = c.stage.next.as_deref_mut();
        }
        if let Some(ranked) = &mut self.last_mut().ranked {
            if snapshot.meta.get("ranked").is_none() {
                return Err(crate::Error::Checkpoint(
                    "the state has no ranking of the windows' groups, which this query keeps"
                        .into(),
                ));
            }
            ranked.restore(&snapshot.nested("ranked"))?;
        }
        Ok(())
    }

    /// The topmost stage.
    pub(super) fn last_mut(&mut self) -> &mut Windowed {
        match self.next {
            Some(ref mut next) => next.stage.last_mut(),
            None => self,
        }
    }

    /// End of the last window of the topmost stage that a row at event time `t` (of the
    /// bottom stage's input) contributes to: once that stage has evicted it, nothing at `t`
    /// can change any output.
    pub(super) fn last_window_end(&self, t: i64) -> i64 {
        let mut end = self.operator.last_window_end(t);
        let mut w = self;
        while let Some(next) = &w.next {
            end = next.stage.operator.last_window_end(end - next.lag_ms);
            w = &next.stage;
        }
        end
    }
}

/// A windowed aggregation over the rows of the stage below it.
pub(super) struct Chained {
    /// What the stage below has published, per group and window: a revision replaces its
    /// row, a retraction deletes it. Its rows are the stage below's output columns, the end
    /// of their window and the `op`. None when the stage below publishes each row once (no
    /// allowed lateness, no early results): its rows are then only ever added.
    published: Option<UpsertState>,
    /// Output columns of the stage below.
    width: usize,
    /// Position of the window column among them.
    window_position: usize,
    /// The leaf of `lower`: the stage below's rows.
    feed: Feed,
    /// The plan from the stage below's rows to this aggregation's input (projections,
    /// filters, lookup joins): a replaced row goes through it again to be withdrawn.
    lower: ReusedPlan,
    /// This stage's event time, over `lower`'s rows.
    time: Arc<dyn PhysicalExpr>,
    /// How far this stage's event times trail the ends of the windows below (0 when it
    /// windows by `window_end`, the window size by `window_start`).
    pub(super) lag_ms: i64,
    /// The window of the stage below.
    below: WindowSpec,
    pub(super) stage: Windowed,
}

impl Chained {
    /// Passes the stage below's emissions on as changes to this stage's windows. A row of
    /// the stage below that this stage's plan fails on by its value is left out and pushed
    /// to `refused` (the plan keeps no state: it is run again to find such rows).
    pub(super) async fn take(
        &mut self,
        emissions: &[Emission],
        task_ctx: &Arc<TaskContext>,
        refused: &mut Vec<super::stream::RefusedResult>,
    ) -> Result<()> {
        for e in emissions {
            if e.batch.num_rows() == 0 {
                continue;
            }
            let changes = match &mut self.published {
                Some(published) => {
                    let changes = published.apply(&as_changelog(
                        &e.batch,
                        self.window_position,
                        e.retract,
                        &published.schema(),
                    )?)?;
                    let own: Vec<usize> = (0..self.width).collect();
                    vec![
                        (changes.withdrawn.project(&own)?, false),
                        (changes.added.project(&own)?, true),
                    ]
                }
                None if e.retract => {
                    return plan_err!("internal: a retraction reached an append-only stage");
                }
                None => vec![(e.batch.clone(), true)],
            };
            for (rows, add) in changes {
                if rows.num_rows() == 0 {
                    continue;
                }
                let (lowered, _) =
                    super::stream::isolated(&self.feed, &self.lower, rows, task_ctx, refused)
                        .await?;
                for b in lowered {
                    if b.num_rows() == 0 {
                        continue;
                    }
                    let late = self.late_rows(&b)?;
                    if late > 0 {
                        return plan_err!(
                            "internal: {late} rows of the stage below reached windows of the \
                             stage above that are gone"
                        );
                    }
                    if add {
                        self.stage.operator.update(&b)?;
                    } else {
                        self.stage.operator.retract(&b)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// This stage's watermark when the stage below has `watermark`: the earliest event time
    /// it may still receive, which is the start or end of the earliest window below still
    /// open. (Revisions of closed windows below come later, within the allowed lateness.)
    pub(super) fn watermark(&self, watermark: i64) -> i64 {
        if watermark == i64::MIN {
            return watermark;
        }
        if self.lag_ms == 0 {
            // By `window_end`: the windows below ending up to `watermark` are closed, and the
            // next ends on their grid after it, so this stage's windows ending by then have
            // all their rows.
            return watermark.saturating_add(lead_ms(self.below, watermark));
        }
        // The start of the earliest window below still open (saturating at the extremes).
        let on_grid = |t: i64, step: i64, offset: i64| {
            t.saturating_sub((t.rem_euclid(step) - offset.rem_euclid(step)).rem_euclid(step))
        };
        match self.below {
            WindowSpec::Tumble { width, offset } => on_grid(watermark, width, offset),
            WindowSpec::Hop { slide, size } => {
                on_grid(watermark.saturating_sub(size), slide, 0).saturating_add(slide)
            }
            _ => watermark.saturating_sub(self.lag_ms),
        }
    }

    /// Rows of `batch` (this stage's input) at event times this stage has evicted.
    fn late_rows(&self, batch: &RecordBatch) -> Result<usize> {
        let times = self.time.evaluate(batch)?.into_array(batch.num_rows())?;
        let times = datafusion::arrow::compute::cast(
            &times,
            &DataType::Timestamp(TimeUnit::Millisecond, None),
        )?;
        let times = times.as_primitive::<datafusion::arrow::datatypes::TimestampMillisecondType>();
        Ok(times
            .iter()
            .flatten()
            .filter(|t| self.stage.operator.is_late(*t))
            .count())
    }

    /// Forgets the rows of the stage below that can no longer change this stage.
    pub(super) fn evict(&mut self) {
        let lag = self.lag_ms;
        let operator = &self.stage.operator;
        let Some(published) = &mut self.published else {
            return;
        };
        published.evict(|end| operator.is_late(end.saturating_sub(lag)));
    }
}

/// How far past `watermark` the next window of `below` ends (0 for windows not on a grid):
/// a stage windowing by `window_end` receives no earlier event time once the stage below
/// has `watermark`.
fn lead_ms(below: WindowSpec, watermark: i64) -> i64 {
    // The distance to the next point of the grid `offset + k * step` after `watermark`
    // (a whole step when it is on the grid), without overflow at any watermark.
    let to_next = |step: i64, offset: i64| {
        step - (watermark.rem_euclid(step) - offset.rem_euclid(step)).rem_euclid(step)
    };
    match below {
        WindowSpec::Tumble { width, offset } => to_next(width, offset),
        // Hopping windows end a size after starts on the slide's grid.
        WindowSpec::Hop { slide, size } => to_next(slide, size),
        WindowSpec::Cumulate { step, .. } => to_next(step, 0),
        WindowSpec::Session { .. } => 0,
    }
}

/// The most [`lead_ms`] can be for `below`.
fn max_lead_ms(below: WindowSpec) -> i64 {
    match below {
        WindowSpec::Tumble { width, .. } => width,
        WindowSpec::Hop { slide, .. } => slide,
        WindowSpec::Cumulate { step, .. } => step,
        WindowSpec::Session { .. } => 0,
    }
}

/// State keeping the latest row of each group and window of an aggregation whose output is
/// `output` (`groups` group columns besides the window, at `window_position`): rows as
/// [`as_changelog`] makes them, keyed by the groups and the window's end.
pub(super) fn changelog_state(
    output: &SchemaRef,
    groups: usize,
    window_position: usize,
) -> Result<UpsertState> {
    let width = output.fields().len();
    let mut fields: Vec<Field> = output.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(Field::new(
        "published_window_end",
        DataType::Timestamp(TimeUnit::Millisecond, None),
        false,
    ));
    fields.push(Field::new("op", DataType::Utf8, false));
    let keys: Vec<usize> = (0..=groups)
        .filter(|i| *i != window_position)
        .chain([width])
        .collect();
    UpsertState::by_index(Arc::new(Schema::new(fields)), keys, width, Some(width + 1))
}

/// An aggregation's emitted rows with their window's end and an `op` (`retract` when
/// `retract`), in `schema` (of a [`changelog_state`]).
pub(super) fn as_changelog(
    batch: &RecordBatch,
    window_position: usize,
    retract: bool,
    schema: &SchemaRef,
) -> Result<RecordBatch> {
    let window = batch.column(window_position).as_struct();
    let Some(end) = window.column_by_name("window_end") else {
        return plan_err!("internal: the window column has no window_end");
    };
    let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
    columns.push(datafusion::arrow::compute::cast(
        end,
        &DataType::Timestamp(TimeUnit::Millisecond, None),
    )?);
    let op = if retract { "retract" } else { "update" };
    columns.push(Arc::new(StringArray::from(vec![op; batch.num_rows()])));
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

/// An aggregation: the node that finishes it and the node that starts it (the same node in
/// single mode).
pub(super) type Aggregation = (Arc<dyn ExecutionPlan>, Arc<dyn ExecutionPlan>);

/// The lowest aggregation among `aggregates` (found top-down in one plan) with the node that
/// finishes it: the same node in single mode, the final step over a partial one.
pub(super) fn lowest_aggregation(
    aggregates: &[Arc<dyn ExecutionPlan>],
) -> Result<Option<Aggregation>> {
    let Some(bottom) = aggregates.last() else {
        return Ok(None);
    };
    let mode = |p: &Arc<dyn ExecutionPlan>| p.downcast_ref::<AggregateExec>().map(|a| *a.mode());
    match mode(bottom) {
        Some(AggregateMode::Single | AggregateMode::SinglePartitioned) => {
            Ok(Some((bottom.clone(), bottom.clone())))
        }
        Some(AggregateMode::Partial) => {
            match aggregates.len().checked_sub(2).map(|i| &aggregates[i]) {
                Some(top)
                    if matches!(
                        mode(top),
                        Some(AggregateMode::Final | AggregateMode::FinalPartitioned)
                    ) =>
                {
                    Ok(Some((top.clone(), bottom.clone())))
                }
                _ => plan_err!("internal: a partial aggregation without its final step"),
            }
        }
        other => plan_err!("internal: unexpected aggregation mode {other:?}"),
    }
}

/// A windowed aggregation: its spec (the window's time argument as written, unchecked) and
/// the window function's name.
pub(super) fn aggregate_spec(
    top: &Arc<dyn ExecutionPlan>,
    bottom: &Arc<dyn ExecutionPlan>,
    time_hint: &str,
) -> Result<(AggregateSpec, String)> {
    let (Some(_), Some(bottom_agg)) = (
        top.downcast_ref::<AggregateExec>(),
        bottom.downcast_ref::<AggregateExec>(),
    ) else {
        return plan_err!("internal: aggregation not found");
    };
    if bottom_agg.group_expr().has_grouping_set() {
        return plan_err!("GROUPING SETS, CUBE and ROLLUP are not supported on streams");
    }
    let group_exprs = bottom_agg.group_expr().expr();
    let mut window = None;
    let mut groups = Vec::new();
    for (i, (expr, _name)) in group_exprs.iter().enumerate() {
        match expr.downcast_ref::<ScalarFunctionExpr>() {
            Some(f) if WINDOW_FUNCTIONS.contains(&f.name()) => {
                window = Some((i, f.name().to_string(), f.args().to_vec()));
            }
            _ => groups.push(expr.clone()),
        }
    }
    let Some((window_position, window_name, args)) = window else {
        return plan_err!(
            "an aggregation over an unbounded stream never finishes: add a window to GROUP BY, e.g. GROUP BY tumble({time_hint}, INTERVAL '1 minute'), …"
        );
    };
    let intervals = args[1..]
        .iter()
        .map(|a| match a.downcast_ref::<Literal>() {
            Some(l) => interval_ms(l.value()),
            None => {
                plan_err!("{window_name}(): window sizes must be constant intervals, got {a}")
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let window = WindowSpec::new(&window_name, &intervals)?;
    let output_schema = top.schema();
    let group_schema = Arc::new(Schema::new(
        (0..group_exprs.len())
            .filter(|i| *i != window_position)
            .map(|i| output_schema.field(i).as_ref().clone())
            .collect::<Vec<_>>(),
    ));
    Ok((
        AggregateSpec {
            window,
            time: args[0].clone(),
            groups,
            window_position,
            aggregates: super::stream::unordered_input(bottom_agg.aggr_expr())?,
            filters: bottom_agg.filter_expr().to_vec(),
            output_schema,
            group_schema,
        },
        window_name,
    ))
}

/// The column under `expr` when it is a column, possibly cast (to milliseconds, say).
pub(super) fn time_column_of(expr: &Arc<dyn PhysicalExpr>) -> Option<&Column> {
    expr.downcast_ref::<Column>().or_else(|| {
        let cast = expr
            .downcast_ref::<CastExpr>()
            .map(|c| c.expr())
            .or_else(|| expr.downcast_ref::<TryCastExpr>().map(|c| c.expr()));
        cast.and_then(|e| e.downcast_ref::<Column>())
    })
}

/// Which bound of the window below (`window_start` or `window_end`) `expr`, over `plan`'s
/// rows, is: followed through projections and filters down to `leaf`, whose column
/// `window_position` is the window.
pub(super) fn bound_of(
    plan: &Arc<dyn ExecutionPlan>,
    expr: &Arc<dyn PhysicalExpr>,
    leaf: &Arc<dyn ExecutionPlan>,
    window_position: usize,
) -> Option<&'static str> {
    use datafusion::physical_plan::filter::FilterExec;
    use datafusion::physical_plan::projection::ProjectionExec;
    if let Some(c) = time_column_of(expr) {
        if Arc::ptr_eq(plan, leaf) {
            return None;
        }
        if let Some(p) = plan.downcast_ref::<ProjectionExec>() {
            let e = &p.expr().get(c.index())?.expr;
            return bound_of(p.input(), e, leaf, window_position);
        }
        if let Some(f) = plan.downcast_ref::<FilterExec>() {
            let index = match f.projection() {
                Some(p) => *p.get(c.index())?,
                None => c.index(),
            };
            let e: Arc<dyn PhysicalExpr> = Arc::new(Column::new(c.name(), index));
            return bound_of(f.input(), &e, leaf, window_position);
        }
        if let Some(child) = same_columns(plan) {
            return bound_of(&child, expr, leaf, window_position);
        }
        return None;
    }
    let f = expr.downcast_ref::<ScalarFunctionExpr>()?;
    if f.name() != "get_field" {
        return None;
    }
    let [inner, name] = f.args() else {
        return None;
    };
    let bound = match name.downcast_ref::<Literal>()?.value() {
        ScalarValue::Utf8(Some(n))
        | ScalarValue::Utf8View(Some(n))
        | ScalarValue::LargeUtf8(Some(n)) => match n.as_str() {
            "window_start" => "window_start",
            "window_end" => "window_end",
            _ => return None,
        },
        _ => return None,
    };
    is_window(plan, inner, leaf, window_position).then_some(bound)
}

/// Whether `plan` is a join (of any kind DataFusion plans).
fn is_join(plan: &Arc<dyn ExecutionPlan>) -> bool {
    use datafusion::physical_plan::joins::{
        CrossJoinExec, HashJoinExec, NestedLoopJoinExec, SortMergeJoinExec, SymmetricHashJoinExec,
    };
    plan.downcast_ref::<HashJoinExec>().is_some()
        || plan.downcast_ref::<NestedLoopJoinExec>().is_some()
        || plan.downcast_ref::<CrossJoinExec>().is_some()
        || plan.downcast_ref::<SortMergeJoinExec>().is_some()
        || plan.downcast_ref::<SymmetricHashJoinExec>().is_some()
}

/// The input of `plan` when `plan` passes its one input's columns on as they are (a sort, a
/// repartition, a merge), so that a column of it is the same column of the input.
fn same_columns(plan: &Arc<dyn ExecutionPlan>) -> Option<Arc<dyn ExecutionPlan>> {
    match plan.children().as_slice() {
        [child] if child.schema().fields() == plan.schema().fields() => Some((*child).clone()),
        _ => None,
    }
}

/// Whether `expr` over `plan`'s rows is the window column of `leaf`.
fn is_window(
    plan: &Arc<dyn ExecutionPlan>,
    expr: &Arc<dyn PhysicalExpr>,
    leaf: &Arc<dyn ExecutionPlan>,
    window_position: usize,
) -> bool {
    use datafusion::physical_plan::filter::FilterExec;
    use datafusion::physical_plan::projection::ProjectionExec;
    let Some(c) = expr.downcast_ref::<Column>() else {
        return false;
    };
    if Arc::ptr_eq(plan, leaf) {
        return c.index() == window_position;
    }
    if let Some(p) = plan.downcast_ref::<ProjectionExec>() {
        return p
            .expr()
            .get(c.index())
            .is_some_and(|e| is_window(p.input(), &e.expr, leaf, window_position));
    }
    if let Some(f) = plan.downcast_ref::<FilterExec>() {
        let index = match f.projection() {
            Some(p) => match p.get(c.index()) {
                Some(i) => *i,
                None => return false,
            },
            None => c.index(),
        };
        let e: Arc<dyn PhysicalExpr> = Arc::new(Column::new(c.name(), index));
        return is_window(f.input(), &e, leaf, window_position);
    }
    match same_columns(plan) {
        Some(child) => is_window(&child, expr, leaf, window_position),
        None => false,
    }
}

/// The windowed aggregation over the results of the stage below, if `upper` (the rest of the
/// query above that stage, reading its rows from `leaf`, fed by `feed`) has one; with the
/// stages above it in turn.
pub(super) fn plan_chain(
    upper: &Arc<dyn ExecutionPlan>,
    leaf: &Arc<dyn ExecutionPlan>,
    feed: &Feed,
    below: &AggregateSpec,
    lateness_ms: i64,
    append_only: bool,
) -> Result<Option<Chained>> {
    let mut aggregates: Vec<Arc<dyn ExecutionPlan>> = Vec::new();
    upper.apply(|node| {
        if node.downcast_ref::<AggregateExec>().is_some() && super::stream::reads_stream(node) {
            aggregates.push(node.clone());
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    let Some((top, bottom)) = lowest_aggregation(&aggregates)? else {
        return Ok(None);
    };
    let windowed = bottom.downcast_ref::<AggregateExec>().is_some_and(|a| {
        a.group_expr().expr().iter().any(|(e, _)| {
            e.downcast_ref::<ScalarFunctionExpr>()
                .is_some_and(|f| WINDOW_FUNCTIONS.contains(&f.name()))
        })
    });
    if !windowed {
        return plan_err!(
            "the query aggregates a windowed result again (SELECT DISTINCT, or GROUP BY over a \
             windowed subquery) without a window of its own, which would never finish: window \
             it by the window_start or window_end of the result below, e.g. SELECT …, \
             max(n) FROM (SELECT segment_id, window_start AS minute, count(*) AS n FROM … \
             GROUP BY tumble(event_time, INTERVAL '1 minute'), segment_id) GROUP BY \
             tumble(minute, INTERVAL '5 minutes'), segment_id"
        );
    }
    let (spec, window_name) = aggregate_spec(&top, &bottom, "window_end")?;
    let lower = bottom.children()[0].clone();
    if lower.exists(|n| {
        Ok(n.downcast_ref::<KeyedSeriesExec>().is_some()
            || n.downcast_ref::<crate::state::lag::KeyedLagExec>()
                .is_some())
    })? {
        return plan_err!(
            "detectors, alerts and LAG between two windowed aggregations are not supported yet \
             (a revision of the windows below would have to be taken back from them): apply \
             them to the last aggregation's rows"
        );
    }
    let bound = bound_of(&lower, &spec.time, leaf, below.window_position);
    let lag_ms = match (bound, below.window) {
        (_, WindowSpec::Session { .. }) => {
            return plan_err!(
                "a window over session windows' results is not supported yet (a session's row \
                 may be retracted when sessions merge): aggregate the sessions' output topic in \
                 a second query"
            );
        }
        (Some("window_end"), _) => 0,
        (Some(_), WindowSpec::Tumble { width, .. }) => width,
        (Some(_), WindowSpec::Hop { size, .. }) => size,
        (Some(_), WindowSpec::Cumulate { .. }) => {
            return plan_err!(
                "{window_name}() over cumulate windows' results must be over their window_end \
                 (cumulating windows share their start)"
            );
        }
        (None, _)
            if lower.exists(|n| {
                Ok(
                    n.downcast_ref::<datafusion::physical_plan::windows::BoundedWindowAggExec>()
                        .is_some()
                        || n.downcast_ref::<datafusion::physical_plan::windows::WindowAggExec>()
                            .is_some(),
                )
            })? =>
        {
            // A window function over the rows below (a ranking) carries no window of theirs
            // up.
            return plan_err!(
                "a window function (… OVER (…), such as a ranking with ROW_NUMBER, RANK or \
                 DENSE_RANK) between two windowed aggregations is not supported yet: apply it \
                 to the last aggregation's rows instead (… OVER (PARTITION BY window_start …) \
                 over the {window_name}() aggregation), or publish its rows to a topic and \
                 aggregate that in a second query"
            );
        }
        (None, _) if lower.exists(|n| Ok(is_join(n)))? => {
            // The time column is not followed through a join.
            return plan_err!(
                "a join between two windowed aggregations is not supported yet: join the \
                 table below the first aggregation (and group by its columns there, e.g. \
                 GROUP BY tumble(…), s.ward_id over camera_events JOIN segments s), or above \
                 the last one"
            );
        }
        (None, _) => {
            return plan_err!(
                "{window_name}() over a windowed result must be over the window_start or \
                 window_end of the windows below (as selected there), got {}",
                spec.time
            );
        }
    };
    if matches!(spec.window, WindowSpec::Session { .. }) {
        return plan_err!(
            "session windows over a windowed result are not supported yet: use tumble(…), \
             hop(…) or cumulate(…) over its window_end"
        );
    }
    super::stream::refuse_window_calls_below(&lower)?;
    let stage_feed = Feed::default();
    let output_schema = top.schema();
    let stage_leaf: Arc<dyn ExecutionPlan> = Arc::new(FeedExec::new(
        "window_output",
        stage_feed.clone(),
        output_schema.clone(),
        None,
    )?);
    let stage_upper = upper
        .clone()
        .transform_down(|node| {
            if Arc::ptr_eq(&node, &top) {
                Ok(Transformed::yes(stage_leaf.clone()))
            } else {
                Ok(Transformed::no(node))
            }
        })?
        .data;
    let width = below.output_schema.fields().len();
    // Below a stage whose rows are only ever added, this one aggregates incrementally like
    // the bottom stage (its windows close on time, with no revision to wait for); otherwise
    // its windows run over the changelog of what the stage below published.
    let published = if append_only {
        None
    } else {
        Some(changelog_state(
            &below.output_schema,
            below.group_schema.fields().len(),
            below.window_position,
        )?)
    };
    // A revision of a window below lands at its start, up to a window size before this
    // stage's watermark (or, by `window_end`, up to a step of the grid below before it, as
    // this stage's watermark leads): this stage keeps its windows that much longer.
    let lead = if lag_ms == 0 {
        max_lead_ms(below.window)
    } else {
        0
    };
    let stage_lateness = if append_only {
        0
    } else {
        lateness_ms.saturating_add(lag_ms).saturating_add(lead)
    };
    let next = plan_chain(
        &stage_upper,
        &stage_leaf,
        &stage_feed,
        &spec,
        stage_lateness,
        append_only,
    )?;
    let having = match next {
        None => super::stream::having_of(&stage_upper, &stage_leaf)?,
        Some(_) => None,
    };
    if !append_only
        && next.is_none()
        && super::topn::rankings(&stage_upper)?.is_empty()
        && let Some(what) = super::stream::unretractable_condition(
            &stage_upper,
            &stage_leaf,
            having.as_ref(),
            spec.groups.len() + 1,
        )?
    {
        return super::stream::unretractable(what);
    }
    let time = spec.time.clone();
    let window_position = spec.window_position;
    let groups = spec.groups.clone();
    let window = spec.window;
    Ok(Some(Chained {
        published,
        width,
        window_position: below.window_position,
        feed: feed.clone(),
        time,
        lag_ms,
        below: below.window,
        stage: Windowed {
            operator: if append_only {
                Box::new(WindowOperator::new(spec, 0)?)
            } else {
                Box::new(WindowOperator::over_changelog(
                    spec,
                    stage_lateness,
                    lower.schema(),
                )?)
            },
            aggregate_outputs: super::stream::aggregate_outputs(
                &stage_upper,
                &stage_leaf,
                groups.len() + 1,
            ),
            upper: ReusedPlan::new(stage_upper),
            upper_feed: stage_feed,
            upper_schema: output_schema,
            groups,
            sessions: false,
            spec: window,
            lateness_keys: None,
            having,
            next: next.map(Box::new),
            window_position,
            ranked: None,
        },
        lower: ReusedPlan::new(lower),
    }))
}

#[cfg(test)]
mod tests {
    use crate::schema::SchemaRegistry;
    use crate::topics::Topics;

    async fn plan(sql: &str) -> crate::plan::stream::StreamQuery {
        let schemas = SchemaRegistry::embedded().expect("schemas");
        let ctx = crate::plan::city_context(&Topics::default(), &schemas).expect("city");
        crate::plan::plan_all(&ctx, sql)
            .await
            .expect("plan")
            .pop()
            .expect("query")
    }

    /// A state's layout changes exactly where the state would mean something else to the new
    /// SQL: filters, projections and HAVING keep it; the window, group keys, aggregates and
    /// detectors' arguments do not.
    #[tokio::test]
    async fn state_layouts_differ_where_the_state_would_mean_something_else() {
        let windowed = |select: &str, filter: &str, group: &str, having: &str| {
            format!("SELECT {select} FROM camera_events {filter} GROUP BY {group} {having}")
        };
        let base = windowed(
            "segment_id, window_start, count(*) AS n, avg(speed_kmh) AS v",
            "",
            "tumble(event_time, INTERVAL '1 minute'), segment_id",
            "",
        );
        let layout = plan(&base).await.state_layout();
        assert!(
            layout.iter().any(|l| l.starts_with("window 1: Tumble")
                && l.contains("segment_id")
                && l.contains("count(Int64(1))")
                && l.contains("avg(camera_events.speed_kmh)")),
            "{layout:?}"
        );
        for same in [
            windowed(
                "segment_id, window_end, count(*) AS n, avg(speed_kmh) AS v",
                "WHERE vehicle_class <> 'bus'",
                "tumble(event_time, INTERVAL '1 minute'), segment_id",
                "HAVING count(*) > 3",
            ),
            windowed(
                "window_start, count(*) AS n, segment_id, avg(speed_kmh) AS v",
                "WHERE confidence > 0.5",
                "tumble(event_time, INTERVAL '1 minute'), segment_id",
                "",
            ),
        ] {
            let other = plan(&same).await.state_layout();
            assert_eq!(
                crate::checkpoint::layout_difference(&layout, &other),
                None,
                "{same}"
            );
        }
        for (different, named) in [
            (
                windowed(
                    "segment_id, window_start, count(*) AS n, avg(speed_kmh) AS v",
                    "",
                    "tumble(event_time, INTERVAL '2 minutes'), segment_id",
                    "",
                ),
                "120000",
            ),
            (
                windowed(
                    "camera_id, window_start, count(*) AS n, avg(speed_kmh) AS v",
                    "",
                    "tumble(event_time, INTERVAL '1 minute'), camera_id",
                    "",
                ),
                // Grouped by another key than the topic's, its state is split otherwise.
                "one state per partition of its repartition topic",
            ),
            (
                windowed(
                    "segment_id, window_start, count(*) AS n, avg(confidence) AS v",
                    "",
                    "tumble(event_time, INTERVAL '1 minute'), segment_id",
                    "",
                ),
                "avg(camera_events.confidence)",
            ),
            (
                windowed(
                    "segment_id, window_start, count(*) AS n, max(speed_kmh) AS v",
                    "",
                    "tumble(event_time, INTERVAL '1 minute'), segment_id",
                    "",
                ),
                "max(camera_events.speed_kmh)",
            ),
            (
                // The aggregates' states are kept by position.
                windowed(
                    "segment_id, window_start, avg(speed_kmh) AS v, count(*) AS n",
                    "",
                    "tumble(event_time, INTERVAL '1 minute'), segment_id",
                    "",
                ),
                "of avg(camera_events.speed_kmh)",
            ),
        ] {
            let other = plan(&different).await.state_layout();
            let why = crate::checkpoint::layout_difference(&layout, &other)
                .unwrap_or_else(|| panic!("same layout: {different}"));
            assert!(why.contains(named), "{different}: {why}");
        }
        let detector = |value: &str| {
            format!(
                "SELECT segment_id, speed, n, anomaly_score({value}, window_end) \
                     OVER (PARTITION BY segment_id ORDER BY window_end) AS d \
                 FROM (SELECT segment_id, window_start, window_end, avg(speed_kmh) AS speed, \
                       count(*) AS n FROM camera_events \
                       GROUP BY tumble(event_time, INTERVAL '1 minute'), segment_id)"
            )
        };
        let speed = plan(&detector("speed")).await.state_layout();
        assert!(
            speed
                .iter()
                .any(|l| l.starts_with("detectors") && l.contains("anomaly_score(speed")),
            "{speed:?}"
        );
        let flow = plan(&detector("CAST(n AS DOUBLE)")).await.state_layout();
        let why = crate::checkpoint::layout_difference(&speed, &flow).expect("differ");
        assert!(why.contains("anomaly_score("), "{why}");

        // With allowed lateness, the stage above a window keeps the rows of the one below and
        // withdraws them through its input plan: a changed filter between them would not
        // find them again, so the plans are part of the layout; and the lateness itself is.
        let stages = |filter: &str| {
            format!(
                "SET urbanstream.allowed_lateness = '1m'; \
                 SELECT window_start, count(*) AS segments, sum(n) AS vehicles FROM \
                 (SELECT segment_id, window_end AS minute, count(*) AS n FROM camera_events \
                  GROUP BY tumble(event_time, INTERVAL '1 minute'), segment_id) {filter} \
                 GROUP BY tumble(minute, INTERVAL '5 minutes')"
            )
        };
        let kept = plan(&stages("")).await.state_layout();
        assert!(
            kept.iter()
                .any(|l| l.starts_with("rows kept under the plans")),
            "{kept:?}"
        );
        let filtered = plan(&stages("WHERE n > 2")).await.state_layout();
        let why = crate::checkpoint::layout_difference(&kept, &filtered).expect("differ");
        assert!(why.contains("rows kept under the plans"), "{why}");
        let on_time = plan(&stages("").replace("'1m'", "'0s'"))
            .await
            .state_layout();
        let why = crate::checkpoint::layout_difference(&kept, &on_time).expect("differ");
        assert!(why.contains("allowed lateness 60000 ms"), "{why}");
        assert_eq!(
            crate::state::expr_layout(&"x@1 = 'a@1'"),
            "x = 'a@1'",
            "positions are dropped outside literals only"
        );
    }

    /// Per segment and minute, then per ward and five minutes: two window stages, the second
    /// grouping by another key, so the query keeps one state (it is not repartitioned by the
    /// first stage's keys, which would split a ward's segments).
    #[tokio::test]
    async fn a_window_over_a_window_is_explained_as_two_stages_in_one_state() {
        let query = plan(
            "SELECT ward_id, window_start, avg(speed) AS speed FROM \
             (SELECT s.ward_id, c.segment_id, window_end AS minute, count(*) AS speed \
              FROM camera_events c LEFT JOIN segments s ON c.segment_id = s.segment_id \
              GROUP BY tumble(c.event_time, INTERVAL '1 minute'), s.ward_id, c.segment_id) \
             GROUP BY hop(minute, INTERVAL '1 minute', INTERVAL '5 minutes'), ward_id",
        )
        .await;
        assert!(!query.is_partition_local());
        assert!(!query.is_repartitionable());
        let explained = query.explain();
        let stages = explained["stages"].as_array().expect("stages");
        let kinds: Vec<&str> = stages
            .iter()
            .map(|s| s["stage"].as_str().unwrap_or_default())
            .collect();
        assert_eq!(
            kinds,
            [
                "per batch",
                "window",
                "window over the window below",
                "per emission",
                "per emission"
            ]
        );
        assert_eq!(stages[2]["kind"], "hop");
        assert_eq!(stages[2]["window"]["size_ms"], 300_000);
        assert!(stages[1]["passes_on"].is_string());
        assert!(
            explained["partitioning"]
                .as_str()
                .unwrap_or_default()
                .starts_with("single")
        );
    }

    /// A ranking of each minute's segments: one state, and the window stage says it ranks.
    #[tokio::test]
    async fn a_top_n_query_is_explained_as_ranking_its_windows() {
        let query = plan(
            "SELECT * FROM (SELECT segment_id, window_start, n, ROW_NUMBER() OVER \
             (PARTITION BY window_start ORDER BY n DESC) AS place FROM (SELECT segment_id, \
             window_start, count(*) AS n FROM camera_events GROUP BY tumble(event_time, \
             INTERVAL '1 minute'), segment_id)) WHERE place <= 5",
        )
        .await;
        assert!(!query.is_partition_local() && !query.is_repartitionable());
        let explained = query.explain();
        assert!(explained["stages"][1]["ranks"].is_string(), "{explained}");
    }

    /// Both stages grouped by the topic's key: one state per input partition.
    #[tokio::test]
    async fn stages_grouped_by_the_topics_key_stay_partition_local() {
        let query = plan(
            "SELECT segment_id, window_start, max(n) AS most FROM \
             (SELECT segment_id, window_start AS minute, count(*) AS n FROM camera_events \
              GROUP BY tumble(event_time, INTERVAL '1 minute'), segment_id) \
             GROUP BY tumble(minute, INTERVAL '5 minutes'), segment_id",
        )
        .await;
        assert!(query.is_partition_local());
    }
}
