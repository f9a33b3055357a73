//! Rows an analyst's SQL cannot multiply without bound.
//!
//! `unnest` repeats a row's other columns for every element of its list, and a lookup join
//! repeats them for every row of the table its condition matches. Neither is bounded by the
//! functions' limits ([`super::bounded`]): `unnest(range(0, 100000))` beside a column of
//! large texts asks, in one allocation, for the product of the two, which no limit on a
//! function's output sees; ten joins to a table of ten rows on a condition every row meets
//! make ten billion rows of one event. An allocation that fails aborts the process, so:
//!
//! - before `unnest` runs, [`UnnestGuardExec`] computes from each batch it would unnest
//!   (list lengths and row sizes, cheaply) the bytes it would make, and over
//!   [`super::bounded::MAX_CALL_BYTES`] the micro-batch fails with an error naming unnest;
//! - a lookup join counts the rows it makes in one run of its plan
//!   ([`MAX_JOIN_ROWS`], checked in [`super::lookup`]).

use std::fmt;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use datafusion::arrow::datatypes::DataType;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::unnest::{ListUnnest, UnnestExec};
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties, ReplaceChildrenOptions,
};
use futures::StreamExt;

use super::bounded::MAX_CALL_BYTES;

/// The most rows a lookup join may make in one run of its plan (one micro-batch).
pub const MAX_JOIN_ROWS: u64 = 1 << 22;

/// `plan` with every `unnest` guarded by an [`UnnestGuardExec`] over its input.
pub fn guard_unnest(plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
    plan.transform_up(|node| {
        let Some(unnest) = node.downcast_ref::<UnnestExec>() else {
            return Ok(Transformed::no(node));
        };
        let input = unnest.input().clone();
        if input.downcast_ref::<UnnestGuardExec>().is_some() {
            return Ok(Transformed::no(node));
        }
        let guard = Arc::new(UnnestGuardExec {
            properties: input.properties().clone(),
            lists: unnest.list_column_indices().to_vec(),
            input,
        });
        Ok(Transformed::yes(node.clone().replace_children(
            vec![guard],
            ReplaceChildrenOptions::new(
                datafusion::physical_plan::ChildrenPropertiesMode::Recompute,
            ),
        )?))
    })
    .map(|t| t.data)
}

/// Passes its input's batches on to an `unnest` of `lists`, after checking what the unnest
/// would make of them.
#[derive(Debug)]
pub struct UnnestGuardExec {
    input: Arc<dyn ExecutionPlan>,
    lists: Vec<ListUnnest>,
    properties: Arc<PlanProperties>,
}

impl DisplayAs for UnnestGuardExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "UnnestGuardExec")
    }
}

impl ExecutionPlan for UnnestGuardExec {
    fn name(&self) -> &str {
        "UnnestGuardExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        match <[_; 1]>::try_from(children) {
            Ok([input]) => Ok(Arc::new(Self {
                properties: input.properties().clone(),
                lists: self.lists.clone(),
                input,
            })),
            Err(_) => Err(DataFusionError::Internal(
                "UnnestGuardExec has one child".into(),
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
        let input = self.input.execute(partition, context)?;
        let schema = input.schema();
        let lists = self.lists.clone();
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            schema,
            input.map(move |batch| {
                let batch = batch?;
                let bytes = unnested_bytes(&batch, &lists)?;
                if bytes > MAX_CALL_BYTES {
                    return Err(DataFusionError::Execution(format!(
                        "unnest would make {bytes} bytes of {} rows in one micro-batch, more \
                         than the {MAX_CALL_BYTES} it may (each element repeats the row's other \
                         columns): unnest shorter lists, or carry fewer or smaller columns \
                         through the unnest",
                        batch.num_rows()
                    )));
                }
                Ok(batch)
            }),
        )))
    }
}

/// The bytes `unnest` of `lists` would make of `batch`: per row, the elements it makes of it
/// (the longest list's, flattened to its depth; at least one) times the row's other columns'
/// bytes.
fn unnested_bytes(batch: &RecordBatch, lists: &[ListUnnest]) -> Result<u128> {
    let rows = batch.num_rows();
    let mut fan = vec![1u128; rows];
    for list in lists {
        let counts = flattened(batch.column(list.index_in_input_schema), list.depth);
        for (f, c) in fan.iter_mut().zip(counts) {
            *f = (*f).max(c);
        }
    }
    let unnested: Vec<usize> = lists.iter().map(|l| l.index_in_input_schema).collect();
    let mut row_bytes = vec![0u128; rows];
    for (c, column) in batch.columns().iter().enumerate() {
        if unnested.contains(&c) {
            continue;
        }
        for (bytes, b) in row_bytes.iter_mut().zip(value_bytes(column)) {
            *bytes += b;
        }
    }
    Ok(fan.iter().zip(&row_bytes).map(|(f, b)| f * b.max(&1)).sum())
}

/// Per row of `list`, how many values flattening `depth` levels of it makes (1 for a value
/// that is not a list).
fn flattened(list: &ArrayRef, depth: usize) -> Vec<u128> {
    let spans: Vec<(usize, usize)> = match list.data_type() {
        DataType::List(_) => {
            let l = list.as_list::<i32>();
            l.offsets()
                .windows(2)
                .map(|w| (w[0] as usize, w[1] as usize))
                .collect()
        }
        DataType::LargeList(_) => {
            let l = list.as_list::<i64>();
            l.offsets()
                .windows(2)
                .map(|w| (w[0] as usize, w[1] as usize))
                .collect()
        }
        DataType::FixedSizeList(_, n) => {
            let n = (*n).max(0) as usize;
            (0..list.len()).map(|r| (r * n, r * n + n)).collect()
        }
        _ => return vec![1; list.len()],
    };
    let values = match list.data_type() {
        DataType::List(_) => list.as_list::<i32>().values().clone(),
        DataType::LargeList(_) => list.as_list::<i64>().values().clone(),
        _ => list.as_fixed_size_list().values().clone(),
    };
    if depth <= 1 {
        return spans.iter().map(|(a, b)| (b - a) as u128).collect();
    }
    let inner = flattened(&values, depth - 1);
    spans
        .iter()
        .map(|(a, b)| inner.get(*a..*b).map_or(0, |s| s.iter().sum()))
        .collect()
}

/// The bytes of each value of a variable-width column: its span of the data and its offset.
fn spans<O: datafusion::arrow::array::OffsetSizeTrait>(
    offsets: &datafusion::arrow::buffer::OffsetBuffer<O>,
) -> Vec<u128> {
    let width = std::mem::size_of::<O>() as u128;
    offsets
        .windows(2)
        .map(|w| (w[1] - w[0]).as_usize() as u128 + width)
        .collect()
}

/// Per row of `column`, about the bytes a copy of its value takes.
fn value_bytes(column: &ArrayRef) -> Vec<u128> {
    let rows = column.len();
    match column.data_type() {
        DataType::Utf8 => spans(column.as_string::<i32>().offsets()),
        DataType::LargeUtf8 => spans(column.as_string::<i64>().offsets()),
        DataType::Binary => spans(column.as_binary::<i32>().offsets()),
        DataType::LargeBinary => spans(column.as_binary::<i64>().offsets()),
        // A view is copied, not its bytes.
        DataType::Utf8View | DataType::BinaryView => vec![16; rows],
        dt => match dt.primitive_width() {
            Some(w) => vec![w as u128; rows],
            // Nested and other values: their share of the column's rows (of a slice, not of
            // the buffers it shares with the whole batch).
            None => {
                let bytes = column
                    .to_data()
                    .get_slice_memory_size()
                    .unwrap_or_else(|_| column.get_array_memory_size());
                let share = bytes as u128 / rows.max(1) as u128;
                vec![share.max(1); rows]
            }
        },
    }
}
