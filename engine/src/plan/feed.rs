//! [`FeedExec`]: a leaf of a physical plan that yields the batches pushed into its [`Feed`].
//!
//! A stream query is planned once. Its physical plan reads the stream through a `FeedExec`;
//! for each micro-batch the engine pushes the batch into the feed and executes the same plan
//! again (a copy of it, [`super::reused::ReusedPlan`]), so there is no re-planning per batch.

use std::fmt;
use std::sync::{Arc, Mutex};

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::common::Statistics;
use datafusion::common::stats::Precision;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::memory::MemoryStream;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
    ReplaceChildrenOptions,
};

/// The batches waiting for the next execution of a plan.
#[derive(Debug, Clone, Default)]
pub struct Feed {
    batches: Arc<Mutex<Vec<RecordBatch>>>,
}

impl Feed {
    /// Whether `other` is this feed (a clone of it).
    pub fn same(&self, other: &Feed) -> bool {
        Arc::ptr_eq(&self.batches, &other.batches)
    }

    /// Replaces the waiting batches.
    pub fn set(&self, batches: Vec<RecordBatch>) {
        if let Ok(mut slot) = self.batches.lock() {
            *slot = batches;
        }
    }

    fn take(&self) -> Result<Vec<RecordBatch>> {
        self.batches
            .lock()
            .map(|mut slot| std::mem::take(&mut *slot))
            .map_err(|_| DataFusionError::Internal("feed lock poisoned".into()))
    }
}

/// A leaf that yields whatever its [`Feed`] holds, projected.
#[derive(Debug)]
pub struct FeedExec {
    /// Name of the table it reads, for plan display.
    table: String,
    feed: Feed,
    projection: Option<Vec<usize>>,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
}

impl FeedExec {
    /// A feed leaf over batches of `table_schema`, yielding `projection` of their columns.
    pub fn new(
        table: impl Into<String>,
        feed: Feed,
        table_schema: SchemaRef,
        projection: Option<Vec<usize>>,
    ) -> Result<Self> {
        let schema = match &projection {
            Some(p) => Arc::new(table_schema.project(p)?),
            None => table_schema,
        };
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(schema.clone()),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        Ok(Self {
            table: table.into(),
            feed,
            projection,
            schema,
            properties,
        })
    }

    /// A table's scan: a leaf over a new feed of `table_schema`, as a plan.
    pub fn scan(
        table: impl Into<String>,
        table_schema: SchemaRef,
        projection: Option<&Vec<usize>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(Self::new(
            table,
            Feed::default(),
            table_schema,
            projection.cloned(),
        )?))
    }

    /// The feed this leaf reads.
    pub fn feed(&self) -> &Feed {
        &self.feed
    }

    /// The table it reads.
    pub fn table(&self) -> &str {
        &self.table
    }
}

impl DisplayAs for FeedExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "FeedExec: table={}", self.table)
    }
}

/// Rows a stream reports to the optimizer: more than any reference table.
const STREAM_ROWS: usize = 1 << 40;

impl ExecutionPlan for FeedExec {
    fn name(&self) -> &str {
        "FeedExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
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
        if children.is_empty() {
            Ok(self)
        } else {
            Err(DataFusionError::Internal("FeedExec has no children".into()))
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

    /// A stream is unbounded: it reports itself as far larger than any table, so that
    /// DataFusion's join selection makes the reference table the side a join collects once
    /// (the build side) and streams each batch through the other.
    fn partition_statistics(&self, _partition: Option<usize>) -> Result<Arc<Statistics>> {
        let mut stats = Statistics::new_unknown(&self.schema);
        stats.num_rows = Precision::Inexact(STREAM_ROWS);
        stats.total_byte_size = Precision::Inexact(STREAM_ROWS.saturating_mul(64));
        Ok(Arc::new(stats))
    }

    fn execute(
        &self,
        _partition: usize,
        _context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        projected_stream(
            self.feed.take()?,
            self.projection.as_deref(),
            self.schema.clone(),
        )
    }
}

/// `batches`, projected to `projection` (of `schema`'s columns), as a stream.
pub(super) fn projected_stream(
    batches: Vec<RecordBatch>,
    projection: Option<&[usize]>,
    schema: SchemaRef,
) -> Result<SendableRecordBatchStream> {
    let batches = match projection {
        Some(p) => batches
            .iter()
            .map(|b| b.project(p))
            .collect::<Result<Vec<_>, _>>()?,
        None => batches,
    };
    Ok(Box::pin(MemoryStream::try_new(batches, schema, None)?))
}
