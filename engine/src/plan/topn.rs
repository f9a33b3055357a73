//! Top-N per window: `ROW_NUMBER()`, `RANK()` or `DENSE_RANK()` `OVER (PARTITION BY
//! window_start, … ORDER BY …)` over the rows of a windowed aggregation, usually filtered
//! (`WHERE rn <= 5`), as Flink's window Top-N. The ranking runs over all the groups of a
//! window each time the window emits, and only the rows that entered or left the result are
//! published ([`crate::state::ranked`]).

use std::sync::Arc;

use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::common::{Result, plan_err};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::windows::{BoundedWindowAggExec, WindowAggExec, WindowExpr};

use urbanstream_operators::window::WindowSpec;

use super::chain::Windowed;
use super::feed::FeedExec;
use crate::state::keyed::{KeyedSeriesExec, is_ranking};
use crate::state::ranked::RankedState;

/// A ranking over a whole window, as an analyst would write it.
const EXAMPLE: &str = "SELECT * FROM (SELECT segment_id, window_start, n, ROW_NUMBER() OVER \
     (PARTITION BY window_start ORDER BY n DESC) AS rn FROM (SELECT segment_id, window_start, \
     count(*) AS n FROM camera_events GROUP BY tumble(event_time, INTERVAL '1 minute'), \
     segment_id)) WHERE rn <= 5";

/// A window aggregation's input and window expressions.
type WindowNode = (Arc<dyn ExecutionPlan>, Vec<Arc<dyn WindowExpr>>);

/// The window expressions of the rankings in `plan`, with the node's input.
pub(super) fn rankings(plan: &Arc<dyn ExecutionPlan>) -> Result<Vec<WindowNode>> {
    let mut found = Vec::new();
    plan.apply(|node| {
        let (exprs, input) = if let Some(w) = node.downcast_ref::<WindowAggExec>() {
            (w.window_expr().to_vec(), w.input().clone())
        } else if let Some(w) = node.downcast_ref::<BoundedWindowAggExec>() {
            (w.window_expr().to_vec(), w.input().clone())
        } else {
            return Ok(TreeNodeRecursion::Continue);
        };
        if exprs.iter().any(|w| is_ranking(w.as_ref())) {
            found.push((input, exprs));
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    Ok(found)
}

/// Refuses a ranking in `plan`, a plan run per micro-batch.
pub(super) fn refuse_per_batch(plan: &Arc<dyn ExecutionPlan>) -> Result<()> {
    if rankings(plan)?.is_empty() {
        return Ok(());
    }
    plan_err!(
        "ROW_NUMBER, RANK and DENSE_RANK over a stream would rank each micro-batch on its own: \
         rank the groups of a window instead (top-N per window), e.g. {EXAMPLE}"
    )
}

/// Makes the last stage of `windowed` rank its windows when its emission plan ranks their
/// rows; refuses rankings anywhere else. Whether it ranks.
pub(super) fn plan_ranking(windowed: &mut Windowed) -> Result<bool> {
    let stages = windowed.stages().count();
    for (i, w) in windowed.stages().enumerate() {
        if i + 1 < stages && !rankings(w.emission_plan())?.is_empty() {
            return plan_err!(
                "a ranking between two windowed aggregations is not supported yet: rank the \
                 rows of the last one"
            );
        }
    }
    let last = windowed.last_mut();
    let found = rankings(&last.upper)?;
    if found.is_empty() {
        return Ok(false);
    }
    if last.sessions {
        return plan_err!(
            "top-N over session windows is not supported (a session is withdrawn when it \
             merges, and its rank with it): rank tumbling, hopping or cumulating windows"
        );
    }
    if last
        .upper
        .exists(|n| Ok(n.downcast_ref::<KeyedSeriesExec>().is_some()))?
    {
        return plan_err!(
            "a ranking and detectors over the same windows are not supported together: rank \
             in one query, and run the detectors in another"
        );
    }
    let mut leaf = None;
    last.upper.apply(|n| {
        if n.downcast_ref::<FeedExec>().is_some() {
            leaf = Some(n.clone());
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    let Some(leaf) = leaf else {
        return plan_err!("internal: the plan over the window's rows has no leaf");
    };
    for (input, exprs) in &found {
        for w in exprs {
            if !is_ranking(w.as_ref()) {
                return plan_err!(
                    "{} cannot be computed beside a ranking over a stream's windows: compute \
                     it in the query (GROUP BY) below the ranking",
                    w.name()
                );
            }
            // Cumulating windows of a period share their start: only the end names one.
            let cumulating = matches!(last.spec, WindowSpec::Cumulate { .. });
            let per_window = w.partition_by().iter().any(|p| {
                match super::chain::bound_of(input, p, &leaf, last.window_position) {
                    Some("window_end") => true,
                    Some(_) => !cumulating,
                    None => false,
                }
            });
            if !per_window && cumulating {
                return plan_err!(
                    "{} over cumulating windows must rank within one window: PARTITION BY \
                     window_end (the windows of a period share their window_start)",
                    w.name()
                );
            }
            if !per_window {
                return plan_err!(
                    "{} over a stream must rank within one window: PARTITION BY window_start \
                     (or window_end), and any other columns, e.g. {EXAMPLE}",
                    w.name()
                );
            }
        }
    }
    let rows =
        super::chain::changelog_state(&last.upper_schema, last.groups.len(), last.window_position)?;
    last.ranked = Some(RankedState::new(
        rows,
        last.upper_schema.fields().len(),
        last.upper.schema(),
    )?);
    // The ranking sees every row of the window, HAVING included.
    last.having = None;
    Ok(true)
}
