//! Reference tables in plans, current at every run of a plan.
//!
//! A stream query's physical plan is made once and run again for every micro-batch. A
//! reference table's scan is [`ReferenceExec`], which reads the table's current version of
//! [`ReferenceTables`] each time it runs. A join collects its build side once per plan and
//! keeps it (DataFusion's hash, nested-loop and cross joins all do), and an uncorrelated
//! scalar subquery is run once per plan and its value kept (the plan run is a copy, renewed
//! every [`super::reused::RUNS_PER_COPY`] runs: each copy collects them once). So every join whose build side
//! reads only reference tables, and every scalar subquery over reference tables only, is
//! wrapped in a [`RefreshingExec`]: when a table gets a new version, the next run starts from
//! a fresh copy of the node ([`ExecutionPlan::reset_state`]) that collects the new rows.
//! Between replacements they are collected once, as before.

use std::any::Any;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::Session;
use datafusion::common::Statistics;
use datafusion::common::stats::Precision;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::datasource::{TableProvider, TableType};
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::Expr;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::joins::{CrossJoinExec, HashJoinExec, NestedLoopJoinExec};
use datafusion::physical_plan::scalar_subquery::ScalarSubqueryExec;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
    ReplaceChildrenOptions,
};
use futures::StreamExt;

use super::fan_out::MAX_JOIN_ROWS;
use super::feed::FeedExec;
use crate::reference::ReferenceTables;

/// A table of [`ReferenceTables`] as DataFusion sees it.
#[derive(Debug)]
pub struct ReferenceTable {
    name: String,
    tables: ReferenceTables,
    schema: SchemaRef,
}

impl ReferenceTable {
    /// Table `name` of `tables`, if there is one.
    pub fn new(tables: &ReferenceTables, name: &str) -> Option<Self> {
        let current = tables.get(name)?;
        Some(Self {
            name: current.name.clone(),
            tables: tables.clone(),
            schema: current.schema.clone(),
        })
    }
}

#[async_trait]
impl TableProvider for ReferenceTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(ReferenceExec::new(
            self.name.clone(),
            self.tables.clone(),
            self.schema.clone(),
            projection.cloned(),
        )?))
    }
}

/// Versions of reference tables that a run of a plan reads in place of the current ones,
/// when its task context carries them (a [`SessionConfig`] extension, [`Pinned::context`]):
/// a plan that computes again, to withdraw them, rows it computed earlier gives the same rows
/// only with the versions it read then.
///
/// [`SessionConfig`]: datafusion::execution::config::SessionConfig
#[derive(Debug)]
pub struct Pinned {
    /// Tells apart the sets of versions a plan's nodes have collected (never 0).
    id: u64,
    versions: std::collections::BTreeMap<String, Arc<crate::reference::TableVersion>>,
}

impl Pinned {
    /// The current versions of tables `names` of `tables`.
    fn current(tables: &ReferenceTables, names: &[String]) -> Arc<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Arc::new(Self {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            versions: names
                .iter()
                .filter_map(|n| tables.get(n).map(|t| (n.clone(), t)))
                .collect(),
        })
    }

    /// Whether every table of `names` is at the version pinned (or still missing).
    fn is_current(&self, tables: &ReferenceTables, names: &[String]) -> bool {
        names
            .iter()
            .all(|n| tables.get(n).map(|t| t.version) == self.versions.get(n).map(|t| t.version))
    }

    /// `ctx`, its plans reading these versions.
    pub fn context(self: &Arc<Self>, ctx: &TaskContext) -> Arc<TaskContext> {
        Arc::new(TaskContext::new(
            ctx.task_id(),
            ctx.session_id(),
            ctx.session_config().clone().with_extension(self.clone()),
            ctx.scalar_functions().clone(),
            ctx.higher_order_functions().clone(),
            ctx.aggregate_functions().clone(),
            ctx.window_functions().clone(),
            ctx.runtime_env(),
        ))
    }
}

/// The reference tables' versions a plan that computes again the rows it withdraws runs
/// with ([`Pinned`]): the versions current when it was made, renewed by the caller when a
/// table gets a new version (after withdrawing the rows made with the versions before).
#[derive(Debug)]
pub struct Pinning {
    tables: ReferenceTables,
    /// The tables the plan reads.
    names: Vec<String>,
    /// The tables' generation when the pinned versions were last found current.
    seen: u64,
    pinned: Arc<Pinned>,
    /// The task context with the pinned versions, and the context it was made from.
    context: Option<(usize, Arc<TaskContext>)>,
}

impl Pinning {
    /// Pinning for `plan`, if it reads a reference table: the versions of the tables it
    /// reads.
    pub fn of(plan: &Arc<dyn ExecutionPlan>) -> Result<Option<Self>> {
        let mut tables = None;
        let mut names: Vec<String> = Vec::new();
        plan.apply(|node| {
            if let Some(r) = node.downcast_ref::<ReferenceExec>() {
                tables = Some(r.tables.clone());
                if !names.contains(&r.name) {
                    names.push(r.name.clone());
                }
            }
            Ok(TreeNodeRecursion::Continue)
        })?;
        Ok(tables.map(|tables| {
            // Read before the versions: a replacement meanwhile shows as a newer
            // generation, never as an older one.
            let seen = tables.generation().load(Ordering::Acquire);
            Self {
                pinned: Pinned::current(&tables, &names),
                tables,
                names,
                seen,
                context: None,
            }
        }))
    }

    /// When a table the plan reads has got a new version since the versions were pinned:
    /// the versions pinned until now, the current ones being pinned in their place (another
    /// table's replacement changes nothing).
    pub fn renew(&mut self) -> Option<Arc<Pinned>> {
        let now = self.tables.generation().load(Ordering::Acquire);
        if now == self.seen {
            return None;
        }
        self.seen = now;
        if self.pinned.is_current(&self.tables, &self.names) {
            return None;
        }
        self.context = None;
        Some(std::mem::replace(
            &mut self.pinned,
            Pinned::current(&self.tables, &self.names),
        ))
    }

    /// The version of each table pinned, for a checkpoint.
    pub fn versions(&self) -> std::collections::BTreeMap<String, u64> {
        self.pinned
            .versions
            .iter()
            .map(|(n, t)| (n.clone(), t.version))
            .collect()
    }

    /// Pins the versions a checkpoint recorded ([`Pinning::versions`]), those still kept,
    /// so that the next [`Pinning::renew`] moves the rows restored with them to the current
    /// ones. A version no longer kept is pinned as the current one, with a warning.
    pub fn restore(&mut self, versions: &std::collections::BTreeMap<String, u64>) {
        let mut pinned = std::collections::BTreeMap::new();
        for name in &self.names {
            let Some(current) = self.tables.get(name) else {
                continue;
            };
            let version = versions.get(name).copied().unwrap_or(current.version);
            match self.tables.kept_version(name, version) {
                Some(kept) => {
                    pinned.insert(name.clone(), kept);
                }
                None => {
                    tracing::warn!(
                        table = %name,
                        version,
                        current = current.version,
                        "the reference table's version the restored state was computed with \
                         is no longer kept: rows it gave may not be withdrawn"
                    );
                    pinned.insert(name.clone(), current);
                }
            }
        }
        static NEXT: AtomicU64 = AtomicU64::new(u64::MAX / 2);
        self.pinned = Arc::new(Pinned {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            versions: pinned,
        });
        self.context = None;
        // Compared again at the next renewal.
        self.seen = self
            .tables
            .generation()
            .load(Ordering::Acquire)
            .wrapping_sub(1);
    }

    /// `ctx` with the pinned versions (made once per versions and context).
    pub fn context(&mut self, ctx: &Arc<TaskContext>) -> Arc<TaskContext> {
        let from = Arc::as_ptr(ctx) as usize;
        match &self.context {
            Some((made_from, pinned)) if *made_from == from => pinned.clone(),
            _ => {
                let pinned = self.pinned.context(ctx);
                self.context = Some((from, pinned.clone()));
                pinned
            }
        }
    }
}

/// A leaf that yields the current rows of a reference table (or the version its run's task
/// context pins, [`Pinned`]), projected.
#[derive(Debug)]
pub struct ReferenceExec {
    name: String,
    tables: ReferenceTables,
    projection: Option<Vec<usize>>,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
}

impl ReferenceExec {
    fn new(
        name: String,
        tables: ReferenceTables,
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
            name,
            tables,
            projection,
            schema,
            properties,
        })
    }
}

impl DisplayAs for ReferenceExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "ReferenceExec: table={}", self.name)
    }
}

impl ExecutionPlan for ReferenceExec {
    fn name(&self) -> &str {
        "ReferenceExec"
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
            Err(DataFusionError::Internal(
                "ReferenceExec has no children".into(),
            ))
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

    /// The current version's row count: the optimizer makes the smaller side of a join
    /// the one it collects.
    fn partition_statistics(&self, _partition: Option<usize>) -> Result<Arc<Statistics>> {
        let mut stats = Statistics::new_unknown(&self.schema);
        if let Some(t) = self.tables.get(&self.name) {
            stats.num_rows = Precision::Inexact(t.rows);
        }
        Ok(Arc::new(stats))
    }

    fn execute(
        &self,
        _partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let pinned = context
            .session_config()
            .get_extension::<Pinned>()
            .and_then(|p| p.versions.get(&self.name).cloned());
        let table = pinned
            .or_else(|| self.tables.get(&self.name))
            .ok_or_else(|| {
                DataFusionError::Execution(format!("reference table {} is gone", self.name))
            })?;
        super::feed::projected_stream(
            table.batches.clone(),
            self.projection.as_deref(),
            self.schema.clone(),
        )
    }
}

/// A join whose build side reads reference tables only (or a scalar subquery over them),
/// run from a fresh copy after any table gets a new version, or when a run's task context
/// pins other versions ([`Pinned`]) than the copy collected. It is the wrapped node for
/// every other purpose: same children, properties and display, and `downcast_ref` finds the
/// node it wraps. The wrapped node itself never runs (what it would collect would be held for
/// the life of the plan): copies of it do.
#[derive(Debug)]
pub struct RefreshingExec {
    join: Arc<dyn ExecutionPlan>,
    generation: Arc<AtomicU64>,
    /// The copy that runs, and what it collected its build side from: (the generation, 0) for
    /// the current versions, (0, the pin's id) for pinned ones; `None` until it first runs.
    running: Mutex<(Option<Collected>, Arc<dyn ExecutionPlan>)>,
}

/// What a join's build side was collected from: (the generation, 0) for the current
/// versions, (0, a pin's id) for pinned ones.
type Collected = (u64, u64);

impl RefreshingExec {
    fn new(join: Arc<dyn ExecutionPlan>, generation: Arc<AtomicU64>) -> Result<Self> {
        Ok(Self {
            running: Mutex::new((None, join.clone().reset_state()?)),
            join,
            generation,
        })
    }
}

/// Wraps every join of `plan` whose build side reads no stream, and every scalar subquery
/// that reads no stream, in a [`RefreshingExec`] that starts afresh whenever `generation`
/// ([`ReferenceTables::generation`]) changes.
pub fn refresh_lookup_joins(
    plan: Arc<dyn ExecutionPlan>,
    generation: &Arc<AtomicU64>,
) -> Result<Arc<dyn ExecutionPlan>> {
    plan.transform_up(|node| {
        let already = (node.as_ref() as &dyn Any).is::<RefreshingExec>();
        let collected_once: Vec<&Arc<dyn ExecutionPlan>> =
            if let Some(j) = node.downcast_ref::<HashJoinExec>() {
                vec![j.left()]
            } else if let Some(j) = node.downcast_ref::<NestedLoopJoinExec>() {
                vec![j.left()]
            } else if let Some(j) = node.downcast_ref::<CrossJoinExec>() {
                vec![j.left()]
            } else if node.downcast_ref::<ScalarSubqueryExec>().is_some() {
                node.children().into_iter().skip(1).collect()
            } else {
                Vec::new()
            };
        if already || collected_once.is_empty() || collected_once.iter().any(|c| reads_stream(c)) {
            return Ok(Transformed::no(node));
        }
        Ok(Transformed::yes(
            Arc::new(RefreshingExec::new(node.clone(), generation.clone())?)
                as Arc<dyn ExecutionPlan>,
        ))
    })
    .map(|t| t.data)
}

/// `join` in place of `node` (a join, or a [`RefreshingExec`] around one), wrapped as `node`
/// was, so that it too starts afresh when a reference table changes.
pub fn replace_join(
    node: &Arc<dyn ExecutionPlan>,
    join: Arc<dyn ExecutionPlan>,
) -> Result<Arc<dyn ExecutionPlan>> {
    match (node.as_ref() as &dyn Any).downcast_ref::<RefreshingExec>() {
        Some(r) => Ok(Arc::new(RefreshingExec::new(join, r.generation.clone())?)),
        None => Ok(join),
    }
}

fn reads_stream(plan: &Arc<dyn ExecutionPlan>) -> bool {
    plan.exists(|n| Ok(n.downcast_ref::<FeedExec>().is_some()))
        .unwrap_or(true)
}

impl DisplayAs for RefreshingExec {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        self.join.fmt_as(t, f)
    }
}

impl ExecutionPlan for RefreshingExec {
    fn name(&self) -> &str {
        self.join.name()
    }

    fn downcast_delegate(&self) -> Option<&dyn ExecutionPlan> {
        Some(self.join.as_ref())
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.join.properties()
    }

    fn input_distribution_requirements(
        &self,
    ) -> datafusion::physical_plan::distribution_requirements::InputDistributionRequirements {
        self.join.input_distribution_requirements()
    }

    fn required_input_ordering(
        &self,
    ) -> Vec<Option<datafusion::physical_expr::OrderingRequirements>> {
        self.join.required_input_ordering()
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        self.join.maintains_input_order()
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        self.join.children()
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        self.join.apply_expressions(f)
    }

    fn replace_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
        options: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let join = self.join.clone().replace_children(children, options)?;
        Ok(Arc::new(Self::new(join, self.generation.clone())?))
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

    fn reset_state(self: Arc<Self>) -> Result<Arc<dyn ExecutionPlan>> {
        let join = self.join.clone().reset_state()?;
        Ok(Arc::new(Self::new(join, self.generation.clone())?))
    }

    fn statistics_from_inputs(
        &self,
        input_stats: &[Arc<Statistics>],
        args: &datafusion::physical_plan::statistics::StatisticsArgs,
    ) -> Result<Arc<Statistics>> {
        self.join.statistics_from_inputs(input_stats, args)
    }

    fn child_stats_requests(
        &self,
        partition: Option<usize>,
    ) -> Vec<datafusion::physical_plan::statistics::ChildStats> {
        self.join.child_stats_requests(partition)
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        let now = match context.session_config().get_extension::<Pinned>() {
            Some(pinned) => (0, pinned.id),
            None => (self.generation.load(Ordering::Acquire), 0),
        };
        let running = {
            let mut running = self
                .running
                .lock()
                .map_err(|_| DataFusionError::Internal("join lock poisoned".into()))?;
            match running.0 {
                Some(collected) if collected == now => {}
                // A fresh copy has collected nothing yet.
                None => running.0 = Some(now),
                Some(_) => *running = (Some(now), self.join.clone().reset_state()?),
            }
            running.1.clone()
        };
        let stream = running.execute(partition, context)?;
        let schema = stream.schema();
        // A condition that many rows of the table meet repeats each event as many times.
        let mut made = 0u64;
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            schema,
            stream.map(move |batch| {
                let batch = batch?;
                made += batch.num_rows() as u64;
                if made > MAX_JOIN_ROWS {
                    return Err(DataFusionError::Execution(format!(
                        "a join with a reference table made more than {MAX_JOIN_ROWS} rows in \
                         one micro-batch: its ON condition matches too many of the table's \
                         rows for each event; join on the table's key \
                         (ON t.segment_id = s.segment_id)"
                    )));
                }
                Ok(batch)
            }),
        )))
    }
}
