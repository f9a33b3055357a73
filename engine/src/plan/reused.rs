//! [`ReusedPlan`]: a physical plan run again for every micro-batch, in copies that bound
//! what its runs leave behind.
//!
//! DataFusion's operators register their metrics in their plan node at every run
//! (`ExecutionPlan::execute`): each run adds a few hundred bytes per node and expression, and
//! a node keeps every metric registered in it for as long as it lives. A plan made once and
//! run for every micro-batch of a stream grew without end that way (about 150 MB in 40 s of
//! the simulator at 2 000 events/s, for one alert query). So the runs go to a copy of the
//! plan ([`reset_plan_states`]), replaced by a fresh copy every [`RUNS_PER_COPY`] runs.
//!
//! A copy is the same plan: the engine's own nodes share their state with the plan they are
//! copied from (feeds, window, detector and lookup state are handles), and a join collects
//! its build side (reference tables) once per copy.

use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, Mutex};

use datafusion::arrow::record_batch::RecordBatch;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::TaskContext;
use datafusion::physical_plan::execution_plan::reset_plan_states;
use datafusion::physical_plan::{ExecutionPlan, collect};

/// Runs a copy of a plan takes before the next one replaces it: a copy holds the metrics of
/// at most this many runs, and a join over reference tables collects them again once in as
/// many micro-batches.
pub const RUNS_PER_COPY: u32 = 64;

/// A physical plan run again and again: [`ReusedPlan::collect`] runs a copy of it. It
/// dereferences to the plan as planned (for its schema, display and inspection), which is
/// never run itself.
#[derive(Clone)]
pub struct ReusedPlan {
    planned: Arc<dyn ExecutionPlan>,
    /// The copy being run and how many runs it has taken; `None` before the first.
    running: Arc<Mutex<Option<RunningCopy>>>,
}

/// A copy of a plan and the runs it has taken.
type RunningCopy = (Arc<dyn ExecutionPlan>, u32);

impl ReusedPlan {
    /// `planned`, to be run through copies of it.
    pub fn new(planned: Arc<dyn ExecutionPlan>) -> Self {
        Self {
            planned,
            running: Arc::new(Mutex::new(None)),
        }
    }

    /// The copy the next run takes: the current one, or a fresh copy of the plan when it
    /// has taken [`RUNS_PER_COPY`] runs.
    fn next_copy(&self) -> Result<Arc<dyn ExecutionPlan>> {
        let mut running = self
            .running
            .lock()
            .map_err(|_| DataFusionError::Internal("plan lock poisoned".into()))?;
        match running.as_mut() {
            Some((copy, runs)) if *runs < RUNS_PER_COPY => {
                *runs += 1;
                Ok(copy.clone())
            }
            _ => {
                let copy = reset_plan_states(self.planned.clone())?;
                *running = Some((copy.clone(), 1));
                Ok(copy)
            }
        }
    }

    /// Runs the plan over what its feeds hold, to the end.
    pub async fn collect(&self, ctx: Arc<TaskContext>) -> Result<Vec<RecordBatch>> {
        collect(self.next_copy()?, ctx).await
    }

    /// Metrics registered over the nodes of the copy being run (none before the first run).
    #[cfg(test)]
    fn registered_metrics(&self) -> usize {
        use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
        let copy = match self.running.lock() {
            Ok(running) => running.as_ref().map(|(copy, _)| copy.clone()),
            Err(_) => None,
        };
        let mut n = 0;
        if let Some(copy) = copy {
            let _ = copy.apply(|node| {
                n += node.metrics().map_or(0, |m| m.iter().count());
                Ok(TreeNodeRecursion::Continue)
            });
        }
        n
    }
}

impl Deref for ReusedPlan {
    type Target = Arc<dyn ExecutionPlan>;

    fn deref(&self) -> &Self::Target {
        &self.planned
    }
}

impl fmt::Debug for ReusedPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReusedPlan")
            .field("planned", &self.planned.name())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::feed::{Feed, FeedExec};
    use datafusion::arrow::array::Int64Array;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::common::ScalarValue;
    use datafusion::logical_expr::Operator;
    use datafusion::physical_expr::expressions::{BinaryExpr, Column, Literal};
    use datafusion::physical_plan::filter::FilterExec;
    use datafusion::physical_plan::projection::ProjectionExec;
    use datafusion::prelude::SessionContext;

    /// A plan run for many micro-batches holds the metrics of at most [`RUNS_PER_COPY`] runs,
    /// and gives every run's rows.
    #[tokio::test]
    async fn runs_leave_no_more_behind_than_one_copy_holds() -> Result<()> {
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        let feed = Feed::default();
        let leaf: Arc<dyn ExecutionPlan> =
            Arc::new(FeedExec::new("t", feed.clone(), schema.clone(), None)?);
        let v = || Arc::new(Column::new("v", 0));
        let odd = Arc::new(BinaryExpr::new(
            Arc::new(BinaryExpr::new(
                v(),
                Operator::Modulo,
                Arc::new(Literal::new(ScalarValue::Int64(Some(2)))),
            )),
            Operator::Eq,
            Arc::new(Literal::new(ScalarValue::Int64(Some(1)))),
        ));
        let filtered: Arc<dyn ExecutionPlan> = Arc::new(FilterExec::try_new(odd, leaf)?);
        let doubled = Arc::new(BinaryExpr::new(
            v(),
            Operator::Multiply,
            Arc::new(Literal::new(ScalarValue::Int64(Some(2)))),
        ));
        let plan = ReusedPlan::new(Arc::new(ProjectionExec::try_new(
            vec![(doubled as _, "w".to_string())],
            filtered,
        )?));
        let ctx = SessionContext::new().task_ctx();
        let mut most = 0;
        let mut after_one_copy = 0;
        for run in 0..(5 * RUNS_PER_COPY as i64) {
            feed.set(vec![RecordBatch::try_new(
                schema.clone(),
                vec![Arc::new(Int64Array::from(vec![run, run + 1]))],
            )?]);
            let out = plan.collect(ctx.clone()).await?;
            let rows: Vec<i64> = out
                .iter()
                .flat_map(|b| {
                    b.column(0)
                        .as_any()
                        .downcast_ref::<Int64Array>()
                        .map(|a| a.values().to_vec())
                        .unwrap_or_default()
                })
                .collect();
            let odd = if run % 2 == 1 { run } else { run + 1 };
            assert_eq!(rows, vec![2 * odd], "run {run}");
            let held = plan.registered_metrics();
            most = most.max(held);
            if run == RUNS_PER_COPY as i64 - 1 {
                after_one_copy = held;
            }
        }
        assert!(after_one_copy > 0, "the copy's runs register metrics");
        assert_eq!(
            most, after_one_copy,
            "no copy holds more than one copy's runs"
        );
        // The plan as planned is never run.
        let planned = plan.metrics().map_or(0, |m| m.iter().count());
        assert_eq!(planned, 0);
        Ok(())
    }
}
