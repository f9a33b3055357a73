//! Planning `UNION ALL` of streams.
//!
//! DataFusion plans `SELECT … FROM a UNION ALL SELECT … FROM b` as a union whose children
//! each read one stream. The planner takes it apart: each child becomes a branch run per
//! micro-batch of its stream, and a feed of the union's rows takes the union's place, so the
//! plan above it (windows, detectors) runs over the merged rows as it runs over one stream's.
//! Each stream keeps its own watermark; the union's is the lowest of them.

use crate::plan::reused::ReusedPlan;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::common::{Result, plan_err};
use datafusion::physical_plan::ExecutionPlan;

use super::feed::{Feed, FeedExec};
use super::join::trace;
use super::table::StreamTable;
use crate::time::WatermarkTracker;

/// A union of streams taken apart by [`plan_union`].
pub(super) struct PlannedUnion {
    /// Per branch: its plan, the feed of its stream it reads, and that stream's table.
    pub branches: Vec<(Arc<dyn ExecutionPlan>, Feed, String)>,
    /// The union node, and the leaf over its rows that replaces it.
    pub node: Arc<dyn ExecutionPlan>,
    pub leaf: Arc<dyn ExecutionPlan>,
    pub output: Feed,
}

/// Takes apart `node`, a union whose children each read one stream.
pub(super) fn plan_union(node: &Arc<dyn ExecutionPlan>) -> Result<PlannedUnion> {
    let mut branches = Vec::new();
    for child in node.children() {
        let stateful = super::join::keeps_state(child)?
            || child.exists(|n| {
                Ok(n.name().contains("Join") && super::join::two_stream_node(n).is_some())
            })?;
        if stateful {
            return plan_err!(
                "a branch of a UNION ALL of streams aggregates, joins streams or keeps state per \
                 key, which is not supported yet: union the streams' events, aggregate the union \
                 in windows, and detect over the windows' rows"
            );
        }
        let mut leaves: Vec<(String, Feed)> = Vec::new();
        child.apply(|n| {
            if let Some(f) = n.downcast_ref::<FeedExec>() {
                leaves.push((f.table().to_string(), f.feed().clone()));
            }
            Ok(TreeNodeRecursion::Continue)
        })?;
        let [(table, feed)] = leaves.as_slice() else {
            return plan_err!(
                "a branch of the UNION ALL reads {} streams: each branch reads one stream",
                leaves.len()
            );
        };
        branches.push(((*child).clone(), feed.clone(), table.clone()));
    }
    let output = Feed::default();
    let mut names: Vec<&str> = branches.iter().map(|b| b.2.as_str()).collect();
    names.dedup();
    let leaf: Arc<dyn ExecutionPlan> = Arc::new(FeedExec::new(
        names.join(" ∪ "),
        output.clone(),
        node.schema(),
        None,
    )?);
    Ok(PlannedUnion {
        branches,
        node: node.clone(),
        leaf,
        output,
    })
}

/// Whether column `index` of the union's rows is, in every branch, its stream's event time;
/// `event_time` gives a stream table's event-time column.
pub(super) fn is_event_time(
    planned: &PlannedUnion,
    index: usize,
    event_time: &dyn Fn(&str) -> Option<String>,
) -> bool {
    planned.branches.iter().all(|(plan, _, table)| {
        trace(plan, index).is_some_and(|(leaf, c)| {
            leaf.downcast_ref::<FeedExec>().is_some()
                && event_time(table).is_some_and(|t| leaf.schema().field(c).name() == &t)
        })
    })
}

/// A stream a query reads besides its source: its table, watermark and held offsets.
pub(super) struct OtherInput {
    pub table: Arc<StreamTable>,
    pub watermarks: WatermarkTracker,
    /// Offsets held for open windows, by window end.
    pub held: BTreeMap<i64, HashMap<i32, i64>>,
}

impl OtherInput {
    pub fn new(table: Arc<StreamTable>) -> Self {
        Self {
            watermarks: WatermarkTracker::new(
                table.options.watermark_delay,
                table.options.idle_timeout,
            ),
            table,
            held: BTreeMap::new(),
        }
    }
}

/// A union's branches as a query runs them.
pub(super) fn reused_branches(
    branches: Vec<(Arc<dyn ExecutionPlan>, Feed, String)>,
) -> Vec<(ReusedPlan, Feed, String)> {
    branches
        .into_iter()
        .map(|(plan, feed, table)| (ReusedPlan::new(plan), feed, table))
        .collect()
}

/// A union of streams as a query runs it.
pub(super) struct UnionInput {
    pub branches: Vec<(ReusedPlan, Feed, String)>,
    /// The streams besides the query's source.
    pub others: Vec<OtherInput>,
    /// The union's rows.
    pub schema: SchemaRef,
    /// The highest union watermark so far.
    pub watermark: Option<i64>,
}

impl UnionInput {
    /// Runs the branches that read `table` over `rows` (admitted rows of it), as one batch of
    /// the union's rows.
    pub async fn merge(
        &self,
        table: &str,
        rows: &RecordBatch,
        ctx: Arc<datafusion::execution::TaskContext>,
    ) -> Result<RecordBatch> {
        let mut out = Vec::new();
        for (plan, feed, t) in &self.branches {
            if t != table || rows.num_rows() == 0 {
                continue;
            }
            feed.set(vec![rows.clone()]);
            for b in plan.collect(ctx.clone()).await? {
                // Branches give the union's types; its names and nullability are the union's.
                let options = datafusion::arrow::array::RecordBatchOptions::new()
                    .with_row_count(Some(b.num_rows()));
                out.push(RecordBatch::try_new_with_options(
                    self.schema.clone(),
                    b.columns().to_vec(),
                    &options,
                )?);
            }
        }
        Ok(datafusion::arrow::compute::concat_batches(
            &self.schema,
            &out,
        )?)
    }
}
