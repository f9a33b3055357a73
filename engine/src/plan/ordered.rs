//! `LAG`, detectors and alert machines over raw events: rows held until the watermark, then
//! released in event-time order.
//!
//! Events arrive in any order within the watermark delay, and `LAG`, a detector or an alert
//! machine needs each key's rows in time order (and a timer, such as a sensor's silence,
//! fires only once every row before its time has been stepped). The planner splits the plan
//! at the lowest of them: the part below it runs per micro-batch, and its rows wait in a
//! buffer; when the watermark passes their event time (no event at or before it is still to
//! come: older ones are late and set aside), they are released sorted by time, and the part
//! from it up runs over them. So results come one watermark delay after their events, and do
//! not depend on arrival order or batch cuts.

use crate::plan::reused::ReusedPlan;
use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, BooleanArray, RecordBatch, UInt32Array};
use datafusion::arrow::compute::{cast, concat_batches, filter_record_batch, take_record_batch};
use datafusion::arrow::datatypes::{DataType, SchemaRef, TimeUnit, TimestampMillisecondType};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Result, plan_err};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::ExecutionPlan;

use super::feed::{Feed, FeedExec};
use crate::checkpoint::StateSnapshot;
use crate::state::keyed::KeyedSeriesExec;
use crate::state::lag::KeyedLagExec;

/// The rows below the lowest `LAG`, detector or alert machine of a query over raw events,
/// waiting for the watermark.
pub(super) struct Ordered {
    /// The plan from there up, over released rows.
    pub upper: ReusedPlan,
    /// The feed `upper` reads.
    pub feed: Feed,
    /// The rows' schema (that node's input).
    pub schema: SchemaRef,
    /// Their event-time column.
    pub time: usize,
    /// The rows waiting, in any order.
    pub buffer: Vec<RecordBatch>,
    /// The earliest event time among them (`i64::MAX` when none): until the watermark passes
    /// it, a micro-batch does not look at the rows waiting.
    earliest: i64,
}

/// Whether `plan` holds `LAG`, a detector or an alert machine.
pub(super) fn holds_keyed(plan: &Arc<dyn ExecutionPlan>) -> Result<bool> {
    plan.exists(|n| Ok(keyed_order(n).is_some()))
}

/// The `ORDER BY` of `node` when it keeps state per key in time order (`LAG`, a detector or
/// an alert machine).
fn keyed_order(node: &Arc<dyn ExecutionPlan>) -> Option<&Arc<dyn PhysicalExpr>> {
    match node.downcast_ref::<KeyedLagExec>() {
        Some(lag) => Some(lag.order()),
        None => node.downcast_ref::<KeyedSeriesExec>().map(|k| k.order()),
    }
}

/// Splits `plan` at its lowest `LAG`, detector or alert machine over the stream: (the plan
/// below it, the ordered stage); `None` when it has none. `is_event_time` tells whether a
/// column of the rows below (followed down to the stream) is the stream's event time.
pub(super) fn split(
    plan: &Arc<dyn ExecutionPlan>,
    is_event_time: &dyn Fn(&Arc<dyn ExecutionPlan>, usize) -> bool,
) -> Result<Option<(Arc<dyn ExecutionPlan>, Ordered)>> {
    let mut lowest: Option<Arc<dyn ExecutionPlan>> = None;
    plan.apply(|n| {
        if keyed_order(n).is_some() && !n.children()[0].exists(|c| Ok(keyed_order(c).is_some()))? {
            lowest = Some(n.clone());
        }
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    })?;
    let Some(keyed) = lowest else {
        return Ok(None);
    };
    let Some(order) = keyed_order(&keyed) else {
        return Ok(None);
    };
    let below = keyed.children()[0].clone();
    let time = super::chain::time_column_of(order)
        .map(|c| c.index())
        .filter(|&i| is_event_time(&below, i));
    let Some(time) = time else {
        return plan_err!(
            "LAG, detectors and alerts over events must be ordered by the stream's event time \
             (OVER (PARTITION BY … ORDER BY event_time)), got ORDER BY {}: the rows are put in \
             that order as the watermark passes them",
            crate::state::expr_layout(order)
        );
    };
    let feed = Feed::default();
    let leaf: Arc<dyn ExecutionPlan> = Arc::new(FeedExec::new(
        "ordered rows",
        feed.clone(),
        below.schema(),
        None,
    )?);
    let upper = plan
        .clone()
        .transform_down(|n| {
            if Arc::ptr_eq(&n, &below) {
                Ok(Transformed::yes(leaf.clone()))
            } else {
                Ok(Transformed::no(n))
            }
        })?
        .data;
    Ok(Some((
        below.clone(),
        Ordered {
            upper: ReusedPlan::new(upper),
            feed,
            schema: below.schema(),
            time,
            buffer: Vec::new(),
            earliest: i64::MAX,
        },
    )))
}

impl Ordered {
    /// Event times of `batch`'s rows, ms.
    fn times(&self, batch: &RecordBatch) -> Result<Vec<i64>> {
        let t = cast(
            batch.column(self.time),
            &DataType::Timestamp(TimeUnit::Millisecond, None),
        )?;
        let t = t.as_primitive::<TimestampMillisecondType>();
        Ok((0..t.len())
            .map(|i| if t.is_valid(i) { t.value(i) } else { i64::MIN })
            .collect())
    }

    /// Takes rows to hold until the watermark passes them.
    pub fn hold(&mut self, rows: RecordBatch) -> Result<()> {
        if rows.num_rows() > 0 {
            let earliest = self.times(&rows)?.into_iter().min().unwrap_or(i64::MAX);
            self.earliest = self.earliest.min(earliest);
            self.buffer.push(rows);
        }
        Ok(())
    }

    /// The rows older than `watermark`, sorted by event time (arrival order among equal
    /// times), taken out of the buffer.
    pub fn release(&mut self, watermark: i64) -> Result<Option<RecordBatch>> {
        if self.buffer.is_empty() || watermark <= self.earliest {
            return Ok(None);
        }
        let all = concat_batches(&self.schema, &self.buffer)?;
        let times = self.times(&all)?;
        let waiting: BooleanArray = times.iter().map(|t| Some(*t >= watermark)).collect();
        let rest = filter_record_batch(&all, &waiting)?;
        self.earliest = times
            .iter()
            .copied()
            .filter(|t| *t >= watermark)
            .min()
            .unwrap_or(i64::MAX);
        self.buffer = if rest.num_rows() > 0 {
            vec![rest]
        } else {
            Vec::new()
        };
        let mut order: Vec<u32> = (0..times.len() as u32)
            .filter(|&i| times[i as usize] < watermark)
            .collect();
        order.sort_by_key(|&i| (times[i as usize], i));
        Ok(Some(take_record_batch(&all, &UInt32Array::from(order))?))
    }

    /// Rows held.
    pub fn rows(&self) -> usize {
        self.buffer.iter().map(RecordBatch::num_rows).sum()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.buffer
            .iter()
            .map(RecordBatch::get_array_memory_size)
            .sum()
    }

    /// The held rows, for a checkpoint (table `rows`).
    pub fn snapshot(&self) -> crate::Result<StateSnapshot> {
        let mut out = StateSnapshot {
            meta: serde_json::json!({ "rows": self.rows() }),
            ..Default::default()
        };
        if !self.buffer.is_empty() {
            let rows = concat_batches(&self.schema, &self.buffer)?;
            out.tables.insert(
                "rows".into(),
                crate::checkpoint::table(crate::checkpoint::row_columns(&rows))?,
            );
        }
        Ok(out)
    }

    /// Replaces the held rows with an [`Ordered::snapshot`]'s.
    pub fn restore(&mut self, snapshot: &StateSnapshot) -> crate::Result<()> {
        self.buffer.clear();
        self.earliest = i64::MAX;
        let Some(t) = snapshot.tables.get("rows") else {
            return Ok(());
        };
        if t.num_columns() != self.schema.fields().len() {
            return Err(crate::Error::Checkpoint(format!(
                "the held rows have {} columns, the query's {}",
                t.num_columns(),
                self.schema.fields().len()
            )));
        }
        let columns = (0..t.num_columns())
            .map(|i| {
                let want = self.schema.field(i).data_type();
                let c = t.column(i);
                Ok(if c.data_type() == want {
                    c.clone()
                } else {
                    cast(c, want)?
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.hold(RecordBatch::try_new(self.schema.clone(), columns)?)?;
        Ok(())
    }
}
