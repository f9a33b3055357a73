//! `LAG` over raw events: rows held until the watermark, then released in event-time order.
//!
//! Events arrive in any order within the watermark delay, and `LAG` needs each key's rows in
//! time order. The planner splits the plan at the lowest `LAG`: the part below it runs per
//! micro-batch, and its rows wait in a buffer; when the watermark passes their event time (no
//! event at or before it is still to come: older ones are late and set aside), they are
//! released sorted by time, and the part from the `LAG` up runs over them. So results come
//! one watermark delay after their events, and do not depend on arrival order or batch cuts.

use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, BooleanArray, RecordBatch, UInt32Array};
use datafusion::arrow::compute::{cast, concat_batches, filter_record_batch, take_record_batch};
use datafusion::arrow::datatypes::{DataType, SchemaRef, TimeUnit, TimestampMillisecondType};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Result, plan_err};
use datafusion::physical_plan::ExecutionPlan;

use super::feed::{Feed, FeedExec};
use crate::checkpoint::StateSnapshot;
use crate::state::lag::KeyedLagExec;

/// The rows below the lowest `LAG` of a query over raw events, waiting for the watermark.
pub(super) struct Ordered {
    /// The plan from the `LAG` up, over released rows.
    pub upper: Arc<dyn ExecutionPlan>,
    /// The feed `upper` reads.
    pub feed: Feed,
    /// The rows' schema (the `LAG`'s input).
    pub schema: SchemaRef,
    /// Their event-time column.
    pub time: usize,
    /// The rows waiting, in any order.
    pub buffer: Vec<RecordBatch>,
}

/// Splits `plan` at its lowest `LAG` over the stream: (the plan below it, the ordered stage);
/// `None` when it has no `LAG`. `is_event_time` tells whether a column of the rows below
/// (followed down to the stream) is the stream's event time.
pub(super) fn split(
    plan: &Arc<dyn ExecutionPlan>,
    is_event_time: &dyn Fn(&Arc<dyn ExecutionPlan>, usize) -> bool,
) -> Result<Option<(Arc<dyn ExecutionPlan>, Ordered)>> {
    let mut lowest: Option<Arc<dyn ExecutionPlan>> = None;
    plan.apply(|n| {
        if n.downcast_ref::<KeyedLagExec>().is_some()
            && !n.children()[0].exists(|c| Ok(c.downcast_ref::<KeyedLagExec>().is_some()))?
        {
            lowest = Some(n.clone());
        }
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    })?;
    let Some(lag) = lowest else {
        return Ok(None);
    };
    let Some(exec) = lag.downcast_ref::<KeyedLagExec>() else {
        return Ok(None);
    };
    let below = exec.input().clone();
    let time = super::chain::time_column_of(exec.order())
        .map(|c| c.index())
        .filter(|&i| is_event_time(&below, i));
    let Some(time) = time else {
        return plan_err!(
            "LAG over events must be ordered by the stream's event time (ORDER BY event_time), \
             got ORDER BY {}: the rows are put in that order as the watermark passes them",
            exec.order()
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
            upper,
            feed,
            schema: below.schema(),
            time,
            buffer: Vec::new(),
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
    pub fn hold(&mut self, rows: RecordBatch) {
        if rows.num_rows() > 0 {
            self.buffer.push(rows);
        }
    }

    /// The rows older than `watermark`, sorted by event time (arrival order among equal
    /// times), taken out of the buffer.
    pub fn release(&mut self, watermark: i64) -> Result<Option<RecordBatch>> {
        if self.buffer.is_empty() {
            return Ok(None);
        }
        let all = concat_batches(&self.schema, &self.buffer)?;
        let times = self.times(&all)?;
        let due: BooleanArray = times.iter().map(|t| Some(*t < watermark)).collect();
        if due.true_count() == 0 {
            self.buffer = vec![all];
            return Ok(None);
        }
        let waiting: BooleanArray = times.iter().map(|t| Some(*t >= watermark)).collect();
        let rest = filter_record_batch(&all, &waiting)?;
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
        self.buffer
            .push(RecordBatch::try_new(self.schema.clone(), columns)?);
        Ok(())
    }
}
