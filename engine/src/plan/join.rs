//! Planning stream–stream joins bounded in event time (see [`crate::state::join`]).
//!
//! DataFusion plans `a JOIN b ON a.k = b.k AND b.ts BETWEEN a.ts - INTERVAL … AND a.ts +
//! INTERVAL …` as a hash join (or a nested-loop join without equi keys) whose children read
//! the two streams. The planner takes that node apart: each child becomes a side plan run
//! per micro-batch of its stream, the node's keys, filter and projection describe the
//! [`IntervalJoin`], and a feed of the join's output takes the node's place, so the plan
//! above it (projections, windows, detectors) runs over joined rows as it runs over a
//! stream's rows. The time bound is read from the filter: comparisons between the two sides'
//! event-time columns, each plus or minus a constant interval.

use crate::plan::reused::ReusedPlan;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, TimeUnit};
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::common::{JoinSide, JoinType, NullEquality, Result, ScalarValue, plan_err};
use datafusion::logical_expr::Operator;
use datafusion::physical_expr::expressions::{BinaryExpr, CastExpr, Column, Literal, TryCastExpr};
use datafusion::physical_expr::{PhysicalExpr, PhysicalExprRef, split_conjunction};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::aggregates::AggregateExec;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::joins::utils::JoinFilter;
use datafusion::physical_plan::joins::{CrossJoinExec, HashJoinExec, NestedLoopJoinExec};
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::union::UnionExec;

use super::feed::{Feed, FeedExec};
use super::stream::reads_stream;
use super::table::StreamTable;
use crate::state::join::{IntervalJoin, JoinSpec};
use crate::time::WatermarkTracker;

/// The bounded form a stream–stream join must take, for refusals.
pub(super) const BOUNDED_FORM: &str = "a JOIN b ON a.k = b.k AND b.event_time BETWEEN \
     a.event_time - INTERVAL '1 minute' AND a.event_time + INTERVAL '5 minutes'";

/// The node of `plan` whose two children each read a stream, if any.
pub(super) fn two_stream_node(plan: &Arc<dyn ExecutionPlan>) -> Option<Arc<dyn ExecutionPlan>> {
    let mut found = None;
    let _ = plan.apply(|node| {
        let children = node.children();
        if children.len() >= 2 && children.iter().filter(|c| reads_stream(c)).count() >= 2 {
            found = Some(node.clone());
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found
}

/// A stream–stream join taken apart by [`plan_join`].
pub(super) struct PlannedJoin {
    pub spec: JoinSpec,
    /// Per side, the plan run over its stream's rows, and the feed of that stream it reads.
    pub sides: [(Arc<dyn ExecutionPlan>, Feed); 2],
    /// Per side, the stream table it reads.
    pub tables: [String; 2],
    /// Per side, the columns of its rows that are its stream's event time.
    pub time_columns: [Vec<usize>; 2],
    /// The join node, and the leaf over its output that replaces it.
    pub node: Arc<dyn ExecutionPlan>,
    pub leaf: Arc<dyn ExecutionPlan>,
    pub output: Feed,
}

/// Takes apart `node`, a join whose children read one stream each; `event_time` gives a
/// stream table's event-time column.
pub(super) fn plan_join(
    node: &Arc<dyn ExecutionPlan>,
    event_time: &dyn Fn(&str) -> Option<String>,
) -> Result<PlannedJoin> {
    let (left, right, on, filter, join_type, projection, nulls_equal) = if let Some(j) =
        node.downcast_ref::<HashJoinExec>()
    {
        (
            j.left().clone(),
            j.right().clone(),
            j.on().to_vec(),
            j.filter().cloned(),
            *j.join_type(),
            j.projection.as_ref().map(|p| p.to_vec()),
            j.null_equality() == NullEquality::NullEqualsNull,
        )
    } else if let Some(j) = node.downcast_ref::<NestedLoopJoinExec>() {
        (
            j.left().clone(),
            j.right().clone(),
            Vec::new(),
            j.filter().cloned(),
            *j.join_type(),
            j.projection().as_ref().map(|p| p.to_vec()),
            false,
        )
    } else if node.downcast_ref::<CrossJoinExec>().is_some() {
        return plan_err!(
            "a join of two streams needs an event-time bound, or it would keep every event \
                 of both forever: write {BOUNDED_FORM}"
        );
    } else if node.downcast_ref::<UnionExec>().is_some() {
        return plan_err!("internal: a union is not a join");
    } else {
        return plan_err!(
            "{} over two streams is not supported: join them with a time bound ({BOUNDED_FORM}) \
                 or union them (SELECT … FROM a UNION ALL SELECT … FROM b)",
            node.name()
        );
    };
    if !matches!(
        join_type,
        JoinType::Inner | JoinType::Left | JoinType::Right | JoinType::Full
    ) {
        return plan_err!(
            "a {join_type} join of two streams (EXISTS, IN or NOT IN over a stream) is not \
             supported: write an inner or outer join with a time bound, {BOUNDED_FORM}"
        );
    }
    let mut sides = Vec::new();
    let mut tables = Vec::new();
    let mut time_columns = Vec::new();
    let mut shifted = Vec::new();
    let mut timed: Vec<(usize, i64)> = Vec::new();
    for (name, side) in [("left", &left), ("right", &right)] {
        refuse_state_below(side, name)?;
        let mut leaves: Vec<(String, Feed, Arc<dyn ExecutionPlan>)> = Vec::new();
        side.apply(|n| {
            if let Some(f) = n.downcast_ref::<FeedExec>() {
                leaves.push((f.table().to_string(), f.feed().clone(), n.clone()));
            }
            Ok(TreeNodeRecursion::Continue)
        })?;
        let [(table, feed, leaf)] = leaves.as_slice() else {
            return plan_err!(
                "the {name} side of the join reads {} streams: a join takes one stream on each \
                 side",
                leaves.len()
            );
        };
        let Some(time) = event_time(table) else {
            return plan_err!(
                "a join of two streams pairs events by time, and stream table {table} declares \
                 no event-time column (OPTIONS ('event_time' '<column>'))"
            );
        };
        // Columns that are the event time, or the event time plus a constant (DataFusion
        // computes `a.t - INTERVAL …` below a nested-loop join and compares the result).
        let offsets: Vec<(usize, i64)> = (0..side.schema().fields().len())
            .filter_map(|i| time_offset(side, i, leaf, &time).map(|k| (i, k)))
            .collect();
        let columns: Vec<usize> = offsets
            .iter()
            .filter(|(_, k)| *k == 0)
            .map(|(i, _)| *i)
            .collect();
        // The side is timed by its event time, or by the event time plus a constant where
        // the join keeps only that (`b.t BETWEEN a.t + INTERVAL '10 seconds' AND …`).
        let Some(timed_by) = columns
            .first()
            .map(|c| (*c, 0))
            .or(offsets.first().copied())
        else {
            return plan_err!(
                "a join of two streams needs an event-time bound on both sides, or it would keep \
                 every event forever: add one to the ON clause comparing {table}.{time} with the \
                 other stream's event time, {BOUNDED_FORM}"
            );
        };
        shifted.push(offsets);
        timed.push(timed_by);
        sides.push((side.clone(), feed.clone()));
        tables.push(table.clone());
        time_columns.push(columns);
    }
    let time_columns: [Vec<usize>; 2] = [time_columns[0].clone(), time_columns[1].clone()];
    let shifted: [Vec<(usize, i64)>; 2] = [shifted[0].clone(), shifted[1].clone()];
    let Some((lo, hi, bound_only)) = filter
        .as_ref()
        .and_then(|f| time_bound(f, &shifted))
        .or_else(|| {
            equal_times(
                &on,
                &shifted,
                [&left.schema(), &right.schema()],
                filter.is_none(),
            )
        })
    else {
        if filter
            .as_ref()
            .is_some_and(|f| names_months(f.expression()))
        {
            return plan_err!(
                "a join's time bound in months has no fixed length (a month is 28 to 31 \
                 days), and the join must know how long to keep each event: write it in days \
                 or hours (INTERVAL '31 days')"
            );
        }
        return plan_err!(
            "a join of two streams needs an event-time bound on both sides, or it would keep \
             every event forever: add one to the ON clause, {BOUNDED_FORM}"
        );
    };
    if lo > hi {
        // Named by table: the optimizer may have swapped the sides the query wrote.
        return plan_err!(
            "the join's time bound admits no pair ({}'s event time would have to be at least \
             {lo} ms and at most {hi} ms after {}'s)",
            tables[1],
            tables[0]
        );
    }
    // Without equi keys every row has the same key: one constant.
    let on = if on.is_empty() {
        let one: Arc<dyn PhysicalExpr> = Arc::new(Literal::new(ScalarValue::Int32(Some(1))));
        vec![(one.clone(), one)]
    } else {
        on
    };
    let spec = JoinSpec {
        join_type,
        on,
        filter,
        projection,
        nulls_equal,
        lo,
        hi,
        bound_only,
        time: [timed[0].0, timed[1].0],
        time_shift: [timed[0].1, timed[1].1],
        sides: [left.schema(), right.schema()],
        schema: node.schema(),
    };
    let output = Feed::default();
    let leaf: Arc<dyn ExecutionPlan> = Arc::new(FeedExec::new(
        format!("{} ⋈ {}", tables[0], tables[1]),
        output.clone(),
        node.schema(),
        None,
    )?);
    let mut sides = sides.into_iter();
    let (Some(l), Some(r)) = (sides.next(), sides.next()) else {
        return plan_err!("internal: a join without two sides");
    };
    let mut tables = tables.into_iter();
    let (Some(lt), Some(rt)) = (tables.next(), tables.next()) else {
        return plan_err!("internal: a join without two tables");
    };
    Ok(PlannedJoin {
        spec,
        sides: [l, r],
        tables: [lt, rt],
        time_columns,
        node: node.clone(),
        leaf,
        output,
    })
}

/// Refuses state below a join of streams: each side runs per micro-batch.
fn refuse_state_below(side: &Arc<dyn ExecutionPlan>, name: &str) -> Result<()> {
    if keeps_state(side)? {
        return plan_err!(
            "the {name} side of the join of two streams aggregates or keeps state per key, \
             which is not supported below a join yet: join the streams' events, aggregate the \
             joined rows in windows, and detect over the windows' rows"
        );
    }
    Ok(())
}

/// Whether `plan` aggregates or keeps state per key (detectors, `LAG`, window functions):
/// what a per-batch side of a join or branch of a union cannot run.
pub(super) fn keeps_state(plan: &Arc<dyn ExecutionPlan>) -> Result<bool> {
    plan.exists(|n| {
        Ok(n.downcast_ref::<AggregateExec>().is_some()
            || n.downcast_ref::<crate::state::keyed::KeyedSeriesExec>()
                .is_some()
            || n.downcast_ref::<crate::state::lag::KeyedLagExec>()
                .is_some()
            || n.name().contains("Window"))
    })
}

/// The leaf that column `index` of `plan`'s rows comes from, with its index there: followed
/// through projections, filters, lookup joins and nodes that pass rows on unchanged.
pub(super) fn trace(
    plan: &Arc<dyn ExecutionPlan>,
    index: usize,
) -> Option<(Arc<dyn ExecutionPlan>, usize)> {
    if plan.children().is_empty() {
        return Some((plan.clone(), index));
    }
    if let Some(p) = plan.downcast_ref::<ProjectionExec>() {
        let expr = &p.expr().get(index)?.expr;
        let schema = p.input().schema();
        let inner = keeps_time(expr, &schema).unwrap_or(expr);
        let c = inner.downcast_ref::<Column>()?;
        return trace(p.input(), c.index());
    }
    let (child, index) = pass_through(plan, index)?;
    trace(&child, index)
}

/// The child and its column that column `index` of `plan`'s rows is, unchanged: through
/// filters, lookup joins and nodes that pass rows on as they are.
pub(super) fn pass_through(
    plan: &Arc<dyn ExecutionPlan>,
    index: usize,
) -> Option<(Arc<dyn ExecutionPlan>, usize)> {
    if let Some(f) = plan.downcast_ref::<FilterExec>() {
        let index = match f.projection() {
            Some(p) => *p.get(index)?,
            None => index,
        };
        return Some((f.input().clone(), index));
    }
    if let Some(j) = plan.downcast_ref::<HashJoinExec>() {
        let index = match &j.projection {
            Some(p) => *p.get(index)?,
            None => index,
        };
        let left = j.left().schema().fields().len();
        return Some(if index < left {
            (j.left().clone(), index)
        } else {
            (j.right().clone(), index - left)
        });
    }
    match plan.children().as_slice() {
        [child] if child.schema().fields() == plan.schema().fields() => {
            Some(((*child).clone(), index))
        }
        _ => None,
    }
}

/// How far column `index` of `plan`'s rows is from the event time `time` of stream leaf
/// `leaf`, when it is that time plus a constant: followed through projections (computing
/// `t ± interval`), filters, lookup joins and nodes that pass rows on unchanged.
fn time_offset(
    plan: &Arc<dyn ExecutionPlan>,
    index: usize,
    leaf: &Arc<dyn ExecutionPlan>,
    time: &str,
) -> Option<i64> {
    if Arc::ptr_eq(plan, leaf) {
        return (plan.schema().field(index).name() == time).then_some(0);
    }
    if let Some(p) = plan.downcast_ref::<ProjectionExec>() {
        let schema = p.input().schema();
        let (c, k) = shifted_column(&p.expr().get(index)?.expr, &schema)?;
        return time_offset(p.input(), c, leaf, time)?.checked_add(k);
    }
    let (child, index) = pass_through(plan, index)?;
    time_offset(&child, index, leaf, time)
}

/// `expr` over rows of `schema` as (column, ms): that column plus a constant.
fn shifted_column(
    expr: &Arc<dyn PhysicalExpr>,
    schema: &datafusion::arrow::datatypes::Schema,
) -> Option<(usize, i64)> {
    if let Some(c) = expr.downcast_ref::<Column>() {
        return Some((c.index(), 0));
    }
    if let Some(inner) = keeps_time(expr, schema) {
        return shifted_column(inner, schema);
    }
    let b = expr.downcast_ref::<BinaryExpr>()?;
    match b.op() {
        Operator::Plus => match (shifted_column(b.left(), schema), constant_ms(b.right())) {
            (Some((c, k)), Some(m)) => Some((c, k.checked_add(m)?)),
            _ => {
                let (c, k) = shifted_column(b.right(), schema)?;
                Some((c, k.checked_add(constant_ms(b.left())?)?))
            }
        },
        Operator::Minus => {
            let (c, k) = shifted_column(b.left(), schema)?;
            Some((c, k.checked_sub(constant_ms(b.right())?)?))
        }
        _ => None,
    }
}

/// `[lo, hi]` such that the filter holds only when `right.ts - left.ts` lies within, in ms,
/// from its conjuncts comparing the two sides' event times (each plus or minus a constant).
///
/// Also whether the bound is the whole filter: every conjunct an inclusive comparison of
/// millisecond event times (so that testing the difference is testing the filter).
fn time_bound(
    filter: &JoinFilter,
    time_columns: &[Vec<(usize, i64)>; 2],
) -> Option<(i64, i64, bool)> {
    let mut lo: Option<i64> = None;
    let mut hi: Option<i64> = None;
    let conjuncts = split_conjunction(filter.expression());
    let mut inclusive = 0;
    for conjunct in &conjuncts {
        let Some(b) = conjunct.downcast_ref::<BinaryExpr>() else {
            continue;
        };
        let (Some((ls, lc)), Some((rs, rc))) = (
            linear(b.left(), filter, time_columns),
            linear(b.right(), filter, time_columns),
        ) else {
            continue;
        };
        if ls == rs {
            continue;
        }
        // ts[ls] + lc  op  ts[rs] + rc, as a bound on d = ts[right] - ts[left].
        let k = lc.checked_sub(rc)?;
        // For `<`/`<=`: ts[rs] - ts[ls] >= k; for `>`/`>=`: ts[rs] - ts[ls] <= k.
        let (lower, upper) = match b.op() {
            Operator::Lt | Operator::LtEq => (Some(k), None),
            Operator::Gt | Operator::GtEq => (None, Some(k)),
            Operator::Eq => (Some(k), Some(k)),
            _ => continue,
        };
        if matches!(b.op(), Operator::LtEq | Operator::GtEq | Operator::Eq) {
            inclusive += 1;
        }
        // When the right side is on the left of the comparison, d is the negation.
        let (lower, upper) = if rs == 1 {
            (lower, upper)
        } else {
            (upper.map(|u| -u), lower.map(|l| -l))
        };
        if let Some(l) = lower {
            lo = Some(lo.map_or(l, |x| x.max(l)));
        }
        if let Some(u) = upper {
            hi = Some(hi.map_or(u, |x| x.min(u)));
        }
    }
    let (mut lo, mut hi) = (lo?, hi?);
    // A day of a time zone with daylight saving is not always 24 hours: the bound is widened
    // by an hour each way (the filter still decides each pair exactly).
    let zoned = filter
        .schema()
        .fields()
        .iter()
        .any(|f| matches!(f.data_type(), DataType::Timestamp(_, Some(_))));
    let mut days = false;
    let _ = filter.expression().apply(|e| {
        if let Some(l) = e.downcast_ref::<Literal>() {
            days |= match l.value() {
                ScalarValue::IntervalMonthDayNano(Some(v)) => v.days != 0,
                ScalarValue::IntervalDayTime(Some(v)) => v.days != 0,
                _ => false,
            };
        }
        Ok(TreeNodeRecursion::Continue)
    });
    if zoned && days {
        lo = lo.saturating_sub(3_600_000);
        hi = hi.saturating_add(3_600_000);
    }
    let milliseconds = filter
        .column_indices()
        .iter()
        .zip(filter.schema().fields())
        .filter(|(c, _)| match c.side {
            JoinSide::Left => time_columns[0].iter().any(|(i, _)| *i == c.index),
            JoinSide::Right => time_columns[1].iter().any(|(i, _)| *i == c.index),
            JoinSide::None => false,
        })
        .all(|(_, f)| {
            matches!(
                f.data_type(),
                DataType::Timestamp(TimeUnit::Millisecond, None)
            )
        });
    // Arithmetic on second timestamps rounds to the second: a bound in ms is widened by one.
    if filter
        .schema()
        .fields()
        .iter()
        .any(|f| matches!(f.data_type(), DataType::Timestamp(TimeUnit::Second, _)))
    {
        lo = lo.saturating_sub(1000);
        hi = hi.saturating_add(1000);
    }
    let exact = inclusive == conjuncts.len() && milliseconds && !(zoned && days);
    Some((lo, hi, exact))
}

/// The bound of a join whose events meet at an exact offset, written as an equality the
/// planner made a join key (`b.t = a.t + INTERVAL '10 seconds'`): `right.t - left.t` is that
/// offset. `only` when the keys are the whole condition.
fn equal_times(
    on: &[(PhysicalExprRef, PhysicalExprRef)],
    time_columns: &[Vec<(usize, i64)>; 2],
    schemas: [&datafusion::arrow::datatypes::SchemaRef; 2],
    only: bool,
) -> Option<(i64, i64, bool)> {
    // (offset, and how far the offset may be from the times' difference): a day in a time
    // zone with daylight saving is not always 24 hours, and arithmetic on second timestamps
    // rounds to the second; the key's equality still decides each pair exactly.
    let offset = |expr: &Arc<dyn PhysicalExpr>, side: usize| {
        let c = expr.downcast_ref::<Column>()?;
        let k = time_columns[side]
            .iter()
            .find(|(i, _)| *i == c.index())
            .map(|(_, k)| *k)?;
        let slack = match schemas[side].field(c.index()).data_type() {
            DataType::Timestamp(_, Some(_)) => 3_600_000,
            DataType::Timestamp(TimeUnit::Second, None) => 1_000,
            _ => 0,
        };
        Some((k, slack))
    };
    on.iter().find_map(|(l, r)| {
        let ((kl, sl), (kr, sr)) = (offset(l, 0)?, offset(r, 1)?);
        let d = kl.checked_sub(kr)?;
        let slack = sl.max(sr);
        Some((
            d.saturating_sub(slack),
            d.saturating_add(slack),
            only && slack == 0,
        ))
    })
}

/// Whether `expr` holds an interval of months.
fn names_months(expr: &Arc<dyn PhysicalExpr>) -> bool {
    let mut months = false;
    let _ = expr.apply(|e| {
        if let Some(l) = e.downcast_ref::<Literal>() {
            months |= match l.value() {
                ScalarValue::IntervalMonthDayNano(Some(v)) => v.months != 0,
                ScalarValue::IntervalYearMonth(Some(v)) => *v != 0,
                _ => false,
            };
        }
        Ok(TreeNodeRecursion::Continue)
    });
    months
}

/// `expr` as (side, ms) meaning that side's event time plus ms; `None` when it is not one.
fn linear(
    expr: &Arc<dyn PhysicalExpr>,
    filter: &JoinFilter,
    time_columns: &[Vec<(usize, i64)>; 2],
) -> Option<(usize, i64)> {
    if let Some(c) = expr.downcast_ref::<Column>() {
        let index = filter.column_indices().get(c.index())?;
        let side = match index.side {
            JoinSide::Left => 0,
            JoinSide::Right => 1,
            JoinSide::None => return None,
        };
        return time_columns[side]
            .iter()
            .find(|(i, _)| *i == index.index)
            .map(|(_, k)| (side, *k));
    }
    if let Some(inner) = keeps_time(expr, filter.schema()) {
        return linear(inner, filter, time_columns);
    }
    let b = expr.downcast_ref::<BinaryExpr>()?;
    match b.op() {
        Operator::Plus => match (
            linear(b.left(), filter, time_columns),
            constant_ms(b.right()),
        ) {
            (Some((s, c)), Some(k)) => Some((s, c.checked_add(k)?)),
            _ => {
                let (s, c) = linear(b.right(), filter, time_columns)?;
                Some((s, c.checked_add(constant_ms(b.left())?)?))
            }
        },
        Operator::Minus => {
            let (s, c) = linear(b.left(), filter, time_columns)?;
            Some((s, c.checked_sub(constant_ms(b.right())?)?))
        }
        _ => None,
    }
}

/// The expression under `expr` when `expr` casts it to a timestamp no coarser than its own
/// (which keeps each time as it is); `None` for anything else.
fn keeps_time<'a>(
    expr: &'a Arc<dyn PhysicalExpr>,
    schema: &datafusion::arrow::datatypes::Schema,
) -> Option<&'a Arc<dyn PhysicalExpr>> {
    let (inner, to) = if let Some(c) = expr.downcast_ref::<CastExpr>() {
        (c.expr(), c.cast_type())
    } else if let Some(c) = expr.downcast_ref::<TryCastExpr>() {
        (c.expr(), c.cast_type())
    } else {
        return None;
    };
    let rank = |u: &TimeUnit| match u {
        TimeUnit::Second => 0,
        TimeUnit::Millisecond => 1,
        TimeUnit::Microsecond => 2,
        TimeUnit::Nanosecond => 3,
    };
    match (inner.data_type(schema).ok()?, to) {
        (DataType::Timestamp(from, from_zone), DataType::Timestamp(to, to_zone))
            if rank(&from) <= rank(to) && from_zone == *to_zone =>
        {
            Some(inner)
        }
        _ => None,
    }
}

/// A constant interval or duration in whole ms; `None` for months (of no fixed length), for
/// parts of a millisecond and for anything else.
fn constant_ms(expr: &Arc<dyn PhysicalExpr>) -> Option<i64> {
    let expr = expr.downcast_ref::<CastExpr>().map_or(expr, |c| c.expr());
    let l = expr.downcast_ref::<Literal>()?;
    match l.value() {
        ScalarValue::IntervalMonthDayNano(Some(v))
            if v.months == 0 && v.nanoseconds % 1_000_000 == 0 =>
        {
            Some(i64::from(v.days) * 86_400_000 + v.nanoseconds / 1_000_000)
        }
        ScalarValue::IntervalDayTime(Some(v)) => {
            Some(i64::from(v.days) * 86_400_000 + i64::from(v.milliseconds))
        }
        ScalarValue::DurationSecond(Some(v)) => v.checked_mul(1000),
        ScalarValue::DurationMillisecond(Some(v)) => Some(*v),
        ScalarValue::DurationMicrosecond(Some(v)) if v % 1000 == 0 => Some(v / 1000),
        ScalarValue::DurationNanosecond(Some(v)) if v % 1_000_000 == 0 => Some(v / 1_000_000),
        _ => None,
    }
}

/// A stream–stream join as a query runs it: its state, each side's plan and the right
/// stream's own watermark (when the two sides read different streams).
pub(super) struct JoinInput {
    pub state: IntervalJoin,
    pub sides: [(ReusedPlan, Feed); 2],
    pub tables: [String; 2],
    /// The right side's stream, when it is not the left's.
    pub right: Option<Arc<StreamTable>>,
    pub right_watermarks: WatermarkTracker,
    /// Offsets of the right stream held for open windows, by window end.
    pub held_right: BTreeMap<i64, HashMap<i32, i64>>,
    /// The side whose event time the windows above use.
    pub window_side: Option<usize>,
}

impl JoinInput {
    /// The running form of `planned`; `right` is the right side's stream when it is not the
    /// left's, `window_side` the side whose event time the windows above use.
    pub fn new(
        planned: PlannedJoin,
        right: Option<Arc<StreamTable>>,
        window_side: Option<usize>,
    ) -> Result<Self> {
        let right_watermarks = match &right {
            Some(r) => WatermarkTracker::new(r.options.watermark_delay, r.options.idle_timeout),
            None => WatermarkTracker::new(Default::default(), Default::default()),
        };
        Ok(Self {
            state: IntervalJoin::new(planned.spec)?,
            sides: planned
                .sides
                .map(|(plan, feed)| (ReusedPlan::new(plan), feed)),
            tables: planned.tables,
            right,
            right_watermarks,
            held_right: BTreeMap::new(),
            window_side,
        })
    }

    /// Rows of a joined pair's time on `side` are at most this far from either event.
    pub fn reach(&self) -> i64 {
        let spec = self.state.spec();
        spec.lo.saturating_abs().max(spec.hi.saturating_abs())
    }

    /// The watermark of the join's output, from the sides' input watermarks: no row to come
    /// has an event time (on the window's side; on both without windows) below it.
    pub fn output_watermark(&self, watermarks: [Option<i64>; 2]) -> Option<i64> {
        let spec = self.state.spec();
        let [Some(l), Some(r)] = watermarks else {
            return None;
        };
        // New pairs come from new left rows (at or after l) or new right rows meeting buffered
        // left rows (at or after r - hi); and symmetrically for the right's time.
        let left = l.min(r.saturating_sub(spec.hi));
        let right = r.min(l.saturating_add(spec.lo));
        Some(match self.window_side {
            Some(0) => left,
            Some(_) => right,
            None => left.min(right),
        })
    }

    /// Which side's event time column `index` of the join's output is.
    pub fn side_of_output(planned: &PlannedJoin, index: usize) -> Option<usize> {
        let index = match &planned.spec.projection {
            Some(p) => *p.get(index)?,
            None => index,
        };
        let left = planned.spec.sides[0].fields().len();
        let (side, i) = if index < left {
            (0, index)
        } else {
            (1, index - left)
        };
        planned.time_columns[side].contains(&i).then_some(side)
    }
}
