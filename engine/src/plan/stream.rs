//! Stream queries: SQL planned once by DataFusion, run micro-batch by micro-batch.
//!
//! [`StreamContext`] is a DataFusion session with the stream tables, reference tables and
//! urbanstream's functions. [`StreamContext::plan`] takes one SQL statement: DDL (`CREATE
//! EXTERNAL TABLE … STORED AS KAFKA`, `CREATE VIEW`, `DROP …`, `SET urbanstream.…`) runs at
//! once; `INSERT INTO sink SELECT …` (or a bare `SELECT`) becomes a [`StreamQuery`].
//!
//! Planning lets DataFusion plan the whole query with one partition, then splits its physical
//! plan at the aggregation:
//!
//! ```text
//!   upper  (projection, HAVING, ORDER BY)      runs on each window emission, over a FeedExec
//!   ── AggregateExec ──                        replaced by the WindowOperator (panes of
//!                                              GroupsAccumulator state, see state::window)
//!   lower  (scan, filter, lookup joins, …)     runs on each micro-batch, over a FeedExec
//! ```
//!
//! A query without aggregation is just the lower part. Below `lower`, a query may read more
//! than one stream: a join of two streams bounded in event time (`plan/join.rs`) or a
//! `UNION ALL` of streams (`plan/union.rs`) feeds `lower` in place of the stream; and `LAG`,
//! detectors and alert machines over the stream's events split the plan once more, holding
//! rows until the watermark (`plan/ordered.rs`). Windows over windows chain above the
//! aggregation (`plan/chain.rs`). Queries that cannot run on an unbounded stream are refused at planning
//! with a message that says what to write instead.

use crate::plan::reused::ReusedPlan;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::{
    Array, ArrayRef, BooleanArray, Int32Array, RecordBatch, StringArray, TimestampMillisecondArray,
};
use datafusion::arrow::compute::{cast, filter_record_batch};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::catalog::TableProviderFactory;
use datafusion::common::config::ConfigExtension;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Result, extensions_options, plan_datafusion_err, plan_err};
use datafusion::datasource::MemTable;
use datafusion::execution::TaskContext;
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_expr::ScalarFunctionExpr;
use datafusion::physical_expr::expressions::Column;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::aggregates::AggregateExec;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::{Statement, TableObject};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use urbanstream_operators::window::{WINDOW_FUNCTIONS, WindowSpec};

use super::chain::Windowed;
use super::feed::{Feed, FeedExec};
use super::repartition::key_plan;
use super::rewrite::rewrite_windows_knowing;
use super::table::{KafkaTableFactory, StreamTable, within_bounds};
use crate::checkpoint::{StateSnapshot, meta_field};
use crate::state::keyed::{KeyedHandle, replace_series_windows};
use crate::state::session::SessionOperator;
use crate::state::upsert::UpsertState;
use crate::state::window::{Emission, WindowOperator};
use crate::time::{WatermarkTracker, in_time_range};

extensions_options! {
    /// Settings of the next stream queries, set in SQL with `SET urbanstream.<name> = '<value>'`.
    pub struct StreamSettings {
        /// How long after a window's end late events still update it (re-emitted as a
        /// revision), e.g. '30s'. Events later than that go to the late output.
        pub allowed_lateness: String, default = "0s".to_string()
        /// Processing-time interval at which windows not yet final emit partial results
        /// (`is_final = false`), e.g. '10s'; empty for none.
        pub early_fire: String, default = String::new()
        /// How long a key of a detector or alert (`anomaly_*`, `sensor_*`, `alert_state`) may
        /// stay silent, in event time, before its state is dropped, e.g. '7d'; '0s' keeps
        /// every key for ever.
        pub key_ttl: String, default = "7d".to_string()
        /// What the query does when records it had not read yet were deleted from its input
        /// (retention, a truncation): 'fail' stops it with the reason; 'skip' records the gap
        /// in the DLQ (topic, partition, the missing offsets; stage 'gap') and goes on from
        /// the log's start.
        pub on_data_loss: String, default = "fail".to_string()
    }
}

impl ConfigExtension for StreamSettings {
    const PREFIX: &'static str = "urbanstream";
}

/// Why an input row was diverted instead of processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DivertReason {
    /// Every window it belongs to is past its end plus the allowed lateness.
    BeyondAllowedLateness,
    /// Stamped further into the future than the source's tolerance.
    FutureTimestamp,
    /// Too late for one of its windows (hop, cumulate), which was already gone, but not for
    /// the others, which it updated.
    WindowClosed,
    /// Its event time is NULL: it cannot be placed in time.
    MissingEventTime,
    /// Its event time is outside the years 0001 to 9999 (see [`in_time_range`]): it cannot
    /// be placed in time either.
    EventTimeOutOfRange,
}

impl DivertReason {
    /// Whether the row was not taken for being too late, or for having no time at all; not
    /// for a time in the future (or one closed window of several).
    fn is_late(self) -> bool {
        matches!(
            self,
            DivertReason::BeyondAllowedLateness
                | DivertReason::MissingEventTime
                | DivertReason::EventTimeOutOfRange
        )
    }

    /// The name used in late records.
    pub fn as_str(self) -> &'static str {
        match self {
            DivertReason::BeyondAllowedLateness => "beyond_allowed_lateness",
            DivertReason::FutureTimestamp => "future_timestamp",
            DivertReason::WindowClosed => "window_closed",
            DivertReason::MissingEventTime => "missing_event_time",
            DivertReason::EventTimeOutOfRange => "event_time_out_of_range",
        }
    }
}

/// An input row a query did not process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diverted {
    /// Row index in the batch given to [`StreamQuery::process`].
    pub row: u32,
    /// Its event time, epoch ms; `None` when it is NULL.
    pub event_time: Option<i64>,
    /// The query watermark when it arrived (`i64::MIN` before any).
    pub watermark: i64,
    /// Why.
    pub reason: DivertReason,
    /// For [`DivertReason::WindowClosed`]: the window (start, end) the event missed; the
    /// event still updated its other windows.
    pub window: Option<(i64, i64)>,
}

/// What one step of a query produced.
#[derive(Debug, Default)]
pub struct StepOutput {
    /// Result rows, in [`StreamQuery::output_schema`].
    pub rows: Vec<RecordBatch>,
    /// Input rows diverted (late or future-stamped).
    pub diverted: Vec<Diverted>,
    /// Input rows the query's plan failed on (see [`Failed`]), left out of its results.
    pub failed: Vec<Failed>,
    /// Windows' results the plan above the windows failed on (see [`RefusedResult`]), left
    /// out of `rows`.
    pub refused: Vec<RefusedResult>,
}

impl StepOutput {
    /// Takes what `more` holds after what this one holds.
    pub fn append(&mut self, more: StepOutput) {
        self.rows.extend(more.rows);
        self.diverted.extend(more.diverted);
        self.failed.extend(more.failed);
        self.refused.extend(more.refused);
    }
}

/// A window's result the plan above the windows failed on by its values alone (a count of 0
/// as a divisor, a cast of a sum that does not fit): the window's other results are
/// published, and this one goes to the DLQ with the error, instead of failing the query for
/// good (it would fail again on the same window at every restart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedResult {
    /// The window's row as its aggregation gave it (group keys, aggregates, the window's
    /// bounds), as one JSON object.
    pub row: String,
    /// The plan's error on it alone.
    pub error: String,
}

/// An input row the plan below a query's state failed on by its values alone (a text cast
/// to a number that is none, a division by zero, an overflow): the rest of its micro-batch
/// is processed, and the row goes to the DLQ with the error, instead of failing the query
/// for good (it would fail again on the same row at every restart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failed {
    /// Row index in the batch given to [`StreamQuery::process`].
    pub row: u32,
    /// Its event time, epoch ms.
    pub event_time: Option<i64>,
    /// The plan's error on the row alone.
    pub error: String,
}

/// The output columns of `plan`, each with what it is computed from: its expression through
/// the projections and filters of `plan` (`v = speed_kmh * 1000`), down to the columns of the
/// first other node (a stream's feed, a join, a window's rows).
/// The walk visits at most [`LINEAGE_STEPS`] columns in all: a column used twice in each of
/// many nested subqueries would otherwise be spelled out 2^depth times. Past the budget a
/// column is known by its name.
fn lineage_of(plan: &Arc<dyn ExecutionPlan>) -> String {
    let mut budget = LINEAGE_STEPS;
    plan.schema()
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| format!("{} = {}", f.name(), lineage(plan, i, 0, &mut budget)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Columns [`lineage_of`] resolves at most, over all of a plan's columns.
const LINEAGE_STEPS: usize = 4_096;

/// How output column `i` of `plan` is computed (see [`lineage_of`]); `depth` bounds the walk
/// down, `budget` the columns resolved.
fn lineage(plan: &Arc<dyn ExecutionPlan>, i: usize, depth: usize, budget: &mut usize) -> String {
    use datafusion::physical_plan::filter::FilterExec;
    use datafusion::physical_plan::projection::ProjectionExec;
    let schema = plan.schema();
    let name = || {
        schema
            .fields()
            .get(i)
            .map_or_else(|| format!("#{i}"), |f| f.name().clone())
    };
    if depth > 64 || *budget == 0 {
        return name();
    }
    *budget -= 1;
    if let Some(p) = plan.downcast_ref::<ProjectionExec>() {
        let Some(e) = p.expr().get(i) else {
            return name();
        };
        let input = p.input();
        let resolved = Arc::clone(&e.expr).transform(|node| {
            Ok(match node.downcast_ref::<Column>() {
                Some(c) => Transformed::yes(Arc::new(Column::new(
                    &format!("({})", lineage(input, c.index(), depth + 1, budget)),
                    0,
                ))
                    as Arc<dyn datafusion::physical_expr::PhysicalExpr>),
                None => Transformed::no(node),
            })
        });
        return match resolved {
            Ok(t) => crate::state::expr_layout(&t.data),
            Err(_) => name(),
        };
    }
    if let Some(f) = plan.downcast_ref::<FilterExec>() {
        let below = match f.projection() {
            Some(projection) => projection.get(i).copied(),
            None => Some(i),
        };
        return below.map_or_else(name, |j| lineage(f.input(), j, depth + 1, budget));
    }
    // Nodes that pass their child's columns through as they are.
    let children = plan.children();
    if let [child] = children.as_slice()
        && child.schema().fields() == schema.fields()
    {
        return lineage(child, i, depth + 1, budget);
    }
    name()
}

/// Whether a plan's error comes from the values of the rows it ran over: run over other
/// rows, the plan may well succeed. Arrow's kernels fail on values (a cast, a parse, a
/// division by zero, an overflow, a value a kernel does not take), and so do functions,
/// with an execution error (`to_timestamp(s, '%Y-%m-%d')` of a text that is no date,
/// `sqrt` of a negative number, `factorial(40)`); but not the engine's own limits on what a
/// micro-batch may make (they say "micro-batch"), which running the plan over smaller parts
/// would get around.
pub(crate) fn is_data_error(e: &datafusion::common::DataFusionError) -> bool {
    is_value_error(e) || is_function_error(e)
}

/// Whether an Arrow kernel failed on a value: a cast, a parse, a division by zero, an
/// overflow.
fn is_value_error(e: &datafusion::common::DataFusionError) -> bool {
    use datafusion::arrow::error::ArrowError;
    match e.find_root() {
        datafusion::common::DataFusionError::ArrowError(a, _) => matches!(
            a.as_ref(),
            ArrowError::CastError(_)
                | ArrowError::ParseError(_)
                | ArrowError::DivideByZero
                | ArrowError::ArithmeticOverflow(_)
        ),
        _ => false,
    }
}

/// Whether a function or kernel failed, perhaps on a value (`sqrt(-1)`), perhaps on all
/// values alike (a constant argument it refuses): `lower_isolating` tells them apart.
fn is_function_error(e: &datafusion::common::DataFusionError) -> bool {
    use datafusion::arrow::error::ArrowError;
    match e.find_root() {
        datafusion::common::DataFusionError::ArrowError(a, _) => matches!(
            a.as_ref(),
            ArrowError::ComputeError(_) | ArrowError::InvalidArgumentError(_)
        ),
        datafusion::common::DataFusionError::Execution(message) => !message.contains("micro-batch"),
        _ => false,
    }
}

/// A DataFusion session for stream queries. Clones share the session (its tables, views and
/// settings).
#[derive(Clone)]
pub struct StreamContext {
    ctx: SessionContext,
    /// Changes when a reference table gets a new version ([`Self::register_reference_tables`]).
    reference_generation: Arc<std::sync::atomic::AtomicU64>,
}

impl Default for StreamContext {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamContext {
    /// A session with urbanstream's functions and the KAFKA table factory, planning with one
    /// partition (parallelism comes from Kafka partitions, not from DataFusion).
    pub fn new() -> Self {
        Self::with_runtime(Arc::new(RuntimeEnv::default()))
    }

    /// Like [`StreamContext::new`], with a memory pool of `limit` bytes that DataFusion's
    /// operators and the query's window state (see [`StreamQuery::state_bytes`]) draw from.
    pub fn with_memory_limit(limit: usize) -> Result<Self> {
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(limit, 1.0)
            .build_arc()?;
        Ok(Self::with_runtime(runtime))
    }

    fn with_runtime(runtime: Arc<RuntimeEnv>) -> Self {
        let config = SessionConfig::new()
            .with_target_partitions(1)
            .with_repartition_aggregations(false)
            .with_repartition_joins(false)
            .with_option_extension(StreamSettings::default());
        // Plans are run again for every micro-batch, through copies made by
        // `reset_plan_states`, whose contract excludes plans with dynamic filters: a filter
        // made from one run's join build side or aggregate would be left in the copy.
        let mut config = config;
        let optimizer = &mut config.options_mut().optimizer;
        optimizer.enable_dynamic_filter_pushdown = false;
        optimizer.enable_join_dynamic_filter_pushdown = false;
        optimizer.enable_topk_dynamic_filter_pushdown = false;
        optimizer.enable_aggregate_dynamic_filter_pushdown = false;
        let state = SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(runtime)
            .with_default_features()
            // The sandbox: Kafka tables only (no file-backed table types) and no table
            // functions; reference tables are registered by the engine.
            .with_table_factories(HashMap::from([(
                "KAFKA".to_string(),
                Arc::new(KafkaTableFactory) as Arc<dyn TableProviderFactory>,
            )]))
            .with_table_functions(HashMap::new())
            .build();
        let ctx = SessionContext::new_with_state(state);
        // `COUNT(DISTINCT x)` alone is rewritten by DataFusion into two aggregations (distinct
        // groups, then a count); a window keeps one aggregation's state, so distinct
        // aggregates are planned as they are written: accumulators that keep the distinct
        // values and merge their states.
        ctx.remove_optimizer_rule("single_distinct_aggregation_to_group_by");
        urbanstream_operators::register_all(&ctx);
        super::bounded::bound_functions(&ctx);
        super::checked::check_sums(&ctx);
        super::corr::stable_corr(&ctx);
        Self {
            ctx,
            reference_generation: Default::default(),
        }
    }

    /// The DataFusion session.
    pub fn session(&self) -> &SessionContext {
        &self.ctx
    }

    /// Registers a stream table under its name.
    pub fn register_stream(&self, table: StreamTable) -> Result<()> {
        let name = table.name.clone();
        self.ctx.register_table(name.as_str(), Arc::new(table))?;
        Ok(())
    }

    /// Registers CSV text (with a header row) as a reference table for lookup joins.
    pub fn register_reference_csv(&self, name: &str, csv: &str) -> Result<()> {
        use datafusion::arrow::csv::ReaderBuilder;
        use datafusion::arrow::csv::reader::Format;
        let format = Format::default().with_header(true);
        let (schema, _) = format.infer_schema(csv.as_bytes(), None)?;
        let schema = Arc::new(schema);
        let reader = ReaderBuilder::new(schema.clone())
            .with_format(format)
            .build(csv.as_bytes())?;
        let batches = reader.collect::<Result<Vec<_>, _>>()?;
        self.ctx
            .register_table(name, Arc::new(MemTable::try_new(schema, vec![batches])?))?;
        Ok(())
    }

    /// Registers every table of `tables` for lookup joins: queries read each table's current
    /// version, a new version included, without being planned again.
    pub fn register_reference_tables(
        &mut self,
        tables: &crate::reference::ReferenceTables,
    ) -> Result<()> {
        for t in tables.list() {
            if self.ctx.table_exist(t.name.as_str())? {
                return plan_err!(
                    "reference table {} has the name of a table already declared (a stream): \
                     name it otherwise",
                    t.name
                );
            }
            if let Some(table) = super::lookup::ReferenceTable::new(tables, &t.name) {
                self.ctx.register_table(t.name.as_str(), Arc::new(table))?;
            }
        }
        self.reference_generation = tables.generation();
        Ok(())
    }

    /// A counter that changes whenever a reference table gets a new version.
    pub fn reference_generation(&self) -> &Arc<std::sync::atomic::AtomicU64> {
        &self.reference_generation
    }

    /// The stream table called `name`, if it is one.
    pub async fn stream_table(&self, name: &str) -> Result<Option<Arc<StreamTable>>> {
        let Ok(provider) = self.ctx.table_provider(name).await else {
            return Ok(None);
        };
        Ok(provider.downcast_ref::<StreamTable>().map(|t| {
            Arc::new(StreamTable {
                name: t.name.clone(),
                topic_schema: t.topic_schema.clone(),
                options: t.options.clone(),
            })
        }))
    }

    /// Which of `window_start`/`window_end` are columns of the tables `statement` reads.
    async fn window_columns_read(&self, statement: &DFStatement) -> Vec<String> {
        use datafusion::sql::sqlparser::ast::{ObjectName, Visit, Visitor};
        struct Tables(Vec<String>);
        impl Visitor for Tables {
            type Break = ();
            fn pre_visit_relation(&mut self, relation: &ObjectName) -> std::ops::ControlFlow<()> {
                self.0.push(relation.to_string());
                std::ops::ControlFlow::Continue(())
            }
        }
        let DFStatement::Statement(s) = statement else {
            return Vec::new();
        };
        let mut tables = Tables(Vec::new());
        // The tables read: an INSERT's sink is written, not read.
        match s.as_ref() {
            Statement::Insert(insert) => {
                if let Some(source) = &insert.source {
                    let _ = source.visit(&mut tables);
                }
            }
            other => {
                let _ = other.visit(&mut tables);
            }
        }
        let mut out = Vec::new();
        for name in tables.0 {
            let Ok(provider) = self.ctx.table_provider(name.as_str()).await else {
                continue;
            };
            for column in ["window_start", "window_end"] {
                if provider.schema().field_with_name(column).is_ok()
                    && !out.iter().any(|c| c == column)
                {
                    out.push(column.to_string());
                }
            }
        }
        out
    }

    /// Splits SQL text into statements, with syntax errors naming their position, within the
    /// sandbox's size and nesting limits ([`super::sandbox::parse_checked`]).
    pub fn parse(sql: &str) -> Result<Vec<DFStatement>> {
        Self::parse_within(sql, super::sandbox::MAX_SQL_BYTES)
    }

    /// [`StreamContext::parse`] with another size limit (see
    /// [`super::sandbox::parse_within`]).
    pub fn parse_within(sql: &str, max_bytes: usize) -> Result<Vec<DFStatement>> {
        if sql.len() > max_bytes {
            return super::sandbox::parse_within(sql, max_bytes);
        }
        // The size is the analyst's text; the LOCATION '' added for KAFKA tables is ours.
        super::sandbox::parse_within(&add_kafka_location(sql), usize::MAX)
    }

    /// Plans one statement: DDL and `SET` run now (`Ok(None)`); a stream query is returned.
    /// Statements the sandbox does not allow are refused
    /// ([`super::sandbox::check_statement`]).
    pub async fn plan(&self, statement: DFStatement) -> Result<Option<StreamQuery>> {
        let unions_windows = unions_windows(&statement);
        let leaves_out = leaves_columns_out(&statement);
        let defaults_lag = {
            let sql = statement.to_string().to_ascii_lowercase();
            sql.contains("lag(") || sql.contains("lead(")
        };
        let shadowed = self.window_columns_read(&statement).await;
        self.plan_statement(statement)
            .await
            .map_err(|e| match shadowed_bound(&e, &shadowed) {
                Some(column) => plan_datafusion_err!(
                    "the statement reads a table with a {column} column of its own (an \
                     upstream window's bound, as declared), so a bare {column} in it names a \
                     column, not a bound of a GROUP BY's window: a window's bounds are \
                     window.window_start and window.window_end, e.g. SELECT k, \
                     window.window_start AS window_start, sum(n) AS n FROM upstream GROUP BY \
                     tumble(window_start, INTERVAL '10 minutes'), k"
                ),
                None => with_window_hint(e),
            })
            .map_err(|e| match e {
                // A union's second windowed branch loses its window columns.
                datafusion::error::DataFusionError::Plan(m)
                    if unions_windows && m.contains("is a column of a window's result") =>
                {
                    plan_datafusion_err!(
                        "a UNION ALL of windowed aggregations is not supported: union the \
                         streams, then aggregate once (SELECT … FROM (SELECT k, v, event_time \
                         FROM a UNION ALL SELECT k, v, event_time FROM b) GROUP BY \
                         tumble(event_time, INTERVAL '1 minute'), k), or write one INSERT per \
                         aggregation into the same sink"
                    )
                }
                // DataFusion names neither the clause nor the columns there are.
                datafusion::error::DataFusionError::SchemaError(e, _)
                    if matches!(
                        e.as_ref(),
                        datafusion::common::SchemaError::FieldNotFound { field, valid_fields }
                            if field.relation.is_none()
                                && leaves_out.iter().any(|c| c.eq_ignore_ascii_case(&field.name))
                                && !valid_fields.iter().any(|v| v.name == field.name)
                    ) =>
                {
                    let datafusion::common::SchemaError::FieldNotFound {
                        field,
                        valid_fields,
                    } = e.as_ref()
                    else {
                        return plan_datafusion_err!("{e}");
                    };
                    let columns: Vec<&str> = valid_fields.iter().map(|c| c.name.as_str()).collect();
                    plan_datafusion_err!(
                        "SELECT * EXCEPT (…) or EXCLUDE (…) names {}, which is not a column of \
                         the FROM: leave out only columns it has ({})",
                        field.name,
                        columns.join(", ")
                    )
                }
                // A constant the plan converts while planning (a LAG's default of another
                // type than its value): Arrow names the value, not where it is written.
                e if defaults_lag
                    && matches!(
                        e.find_root(),
                        datafusion::error::DataFusionError::ArrowError(a, _)
                            if matches!(a.as_ref(), datafusion::arrow::error::ArrowError::CastError(_))
                    ) =>
                {
                    plan_datafusion_err!(
                        "a constant of the statement cannot take the type it is used as ({}): \
                         write it in that type, e.g. a number as the default of LAG or LEAD over \
                         a number column (lag(v, 1, 0.0), not lag(v, 1, 'x')), or cast it \
                         where you mean the conversion (CAST('12' AS DOUBLE))",
                        e.find_root()
                    )
                }
                // An interval literal past what its fields hold: Arrow names the number only.
                e if matches!(
                    e.find_root(),
                    datafusion::error::DataFusionError::ArrowError(a, _)
                        if matches!(
                            a.as_ref(),
                            datafusion::arrow::error::ArrowError::InvalidArgumentError(m)
                                if m.starts_with("Unable to represent")
                        )
                ) =>
                {
                    plan_datafusion_err!(
                        "an interval of the statement is too large to be one ({}): an \
                         interval holds up to 2^31 − 1 days, and a window's sizes, slides, \
                         gaps and offsets up to ten years (INTERVAL '3650 days')",
                        e.find_root()
                    )
                }
                e => e,
            })
    }

    async fn plan_statement(&self, mut statement: DFStatement) -> Result<Option<StreamQuery>> {
        with_into_insert(&mut statement);
        super::sandbox::check_statement(&statement)?;
        let sql = statement.to_string();
        let shadowed = self.window_columns_read(&statement).await;
        {
            let state = self.ctx.state();
            let is_function = |name: &str| {
                state.scalar_functions().contains_key(name)
                    || state.aggregate_functions().contains_key(name)
                    || state.window_functions().contains_key(name)
            };
            rewrite_windows_knowing(&mut statement, &shadowed, &is_function)?;
        }
        // INSERT INTO a stream table: plan the SELECT; its columns meet the sink's by name.
        if let DFStatement::Statement(s) = &statement
            && let Statement::Insert(insert) = s.as_ref()
        {
            let TableObject::TableName(name) = &insert.table else {
                return plan_err!("INSERT INTO a table function is not supported");
            };
            let sink_name = name.to_string();
            let Some(sink) = self.stream_table(&sink_name).await? else {
                return plan_err!(
                    "INSERT INTO {sink_name}: not a stream table (declare it with CREATE EXTERNAL TABLE … STORED AS KAFKA)"
                );
            };
            let Some(source) = &insert.source else {
                return plan_err!("INSERT INTO {sink_name} needs a SELECT");
            };
            let select = DFStatement::Statement(Box::new(Statement::Query(source.clone())));
            let plan = self
                .ctx
                .state()
                .statement_to_plan(select)
                .await
                .map_err(super::sandbox::shorten_unsupported)?;
            let mut query = self.plan_query(plan, sql).await?;
            if !insert.columns.is_empty() {
                query.rename_outputs(insert.columns.iter().map(|c| c.to_string()).collect())?;
            }
            query.check_sink(sink)?;
            return Ok(Some(query));
        }
        let plan = self
            .ctx
            .state()
            .statement_to_plan(statement)
            .await
            .map_err(super::sandbox::shorten_unsupported)?;
        match plan {
            LogicalPlan::Statement(datafusion::logical_expr::Statement::SetVariable(set))
                if set
                    .variable
                    .to_ascii_lowercase()
                    .starts_with("urbanstream.") =>
            {
                // Checked now, not when the next query is planned.
                check_setting(&set.variable, &set.value)?;
                self.ctx
                    .execute_logical_plan(LogicalPlan::Statement(
                        datafusion::logical_expr::Statement::SetVariable(set),
                    ))
                    .await?
                    .collect()
                    .await?;
                Ok(None)
            }
            LogicalPlan::Ddl(ddl) => {
                use datafusion::logical_expr::DdlStatement;
                let ddl = match ddl {
                    DdlStatement::CreateView(mut view) => {
                        super::sandbox::refuse_large_plans(&view.input, "view")?;
                        super::bounded::refuse_wide_types(&view.input)?;
                        view.input = Arc::new(super::bounded::bound_operators(
                            Arc::unwrap_or_clone(view.input),
                        )?);
                        DdlStatement::CreateView(view)
                    }
                    other => other,
                };
                match &ddl {
                    DdlStatement::CreateExternalTable(_)
                    | DdlStatement::CreateView(_)
                    | DdlStatement::DropTable(_)
                    | DdlStatement::DropView(_) => {}
                    other => {
                        // `SELECT … INTO t` plans as CREATE TABLE … AS, for one.
                        return plan_err!(
                            "{} is not available in stream queries: it would create or change \
                             tables of the session (SELECT … INTO is CREATE TABLE … AS); \
                             write INSERT INTO <stream table> SELECT …",
                            other.name()
                        );
                    }
                }
                self.ctx
                    .execute_logical_plan(LogicalPlan::Ddl(ddl))
                    .await?
                    .collect()
                    .await?;
                Ok(None)
            }
            LogicalPlan::Statement(_) => plan_err!(
                "this statement is not available in stream queries; write SET \
                 urbanstream.<name> = '<value>' for settings"
            ),
            LogicalPlan::Dml(dml) => {
                plan_err!(
                    "{} on a stream is not supported; stream queries are INSERT INTO … SELECT",
                    dml.op
                )
            }
            LogicalPlan::Explain(_) | LogicalPlan::Analyze(_) => {
                plan_err!(
                    "EXPLAIN is answered by the API: POST /v1/queries/explain {{\"sql\": …}} shows \
                 a stream query's stages, state, partitioning and emission"
                )
            }
            plan => Ok(Some(self.plan_query(plan, sql).await?)),
        }
    }

    async fn plan_query(&self, plan: LogicalPlan, sql: String) -> Result<StreamQuery> {
        super::sandbox::refuse_large_plans(&plan, "query")?;
        super::bounded::refuse_wide_types(&plan)?;
        let plan = super::bounded::bound_operators(plan)?;
        refuse_unbounded(&plan)?;
        let settings = self
            .ctx
            .state()
            .config()
            .options()
            .extensions
            .get::<StreamSettings>()
            .cloned()
            .unwrap_or_default();
        let lateness = parse_setting("urbanstream.allowed_lateness", &settings.allowed_lateness)?
            .unwrap_or_default();
        let early_fire = parse_setting("urbanstream.early_fire", &settings.early_fire)?;
        data_loss_policy(&settings.on_data_loss)?;
        let reword = |e: datafusion::error::DataFusionError| {
            if e.to_string().contains("OuterReferenceColumn") {
                plan_datafusion_err!(
                    "a subquery that reads a column of the query around it (a correlated \
                     subquery or LATERAL) is not supported here: join the table on that column \
                     instead (FROM stream s JOIN table t ON t.k = s.k)"
                )
            } else if e
                .to_string()
                .contains("does not support logical expression ScalarSubquery")
            {
                // A scalar subquery DataFusion could neither run nor turn into a join: one
                // that reads the query's own columns.
                plan_datafusion_err!("{OWN_COLUMN_SUBQUERY}")
            } else if e
                .to_string()
                .contains("does not support logical expression WindowFunction")
            {
                // DataFusion names the plan's expression tree, 2 KB of it.
                plan_datafusion_err!(
                    "a window function (… OVER (…)) is taken only among the SELECT's columns, \
                     not in WHERE, GROUP BY, HAVING or an aggregate's argument: compute it in a \
                     subquery and filter or group its result, e.g. SELECT * FROM (SELECT …, \
                     lag(v) OVER (PARTITION BY k ORDER BY window_end) AS before FROM …) WHERE \
                     before > 150"
                )
            } else {
                e
            }
        };
        let state = self.ctx.state();
        // The optimizer folds constants: a pattern made by a function (`repeat('%a', 1e5)`)
        // is a literal after it.
        let optimized = state.optimize(&plan).map_err(reword)?;
        let optimized = distinct_floats_as_sql_compares(optimized)?;
        super::bounded::refuse_wide_types(&optimized)?;
        refuse_subqueries_in_windows(&optimized)?;
        let physical = state
            .query_planner()
            .create_physical_plan(&optimized, &state)
            .await
            .map_err(reword)?;
        let physical = super::checked::check_arithmetic(physical)?;
        let physical = super::lookup::refresh_lookup_joins(physical, &self.reference_generation)?;
        let physical = super::fan_out::guard_unnest(physical)?;
        let key_ttl = parse_setting("urbanstream.key_ttl", &settings.key_ttl)?
            .filter(|d| !d.is_zero())
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let (physical, lags) = crate::state::lag::replace_lag_windows(physical)?;
        let (physical, keyed) = replace_series_windows(physical)?;
        for k in &keyed {
            k.set_ttl(key_ttl);
        }
        for l in &lags {
            l.handle.set_ttl(key_ttl);
        }
        let mut series_keys: Vec<Vec<Arc<dyn datafusion::physical_expr::PhysicalExpr>>> =
            Vec::new();
        physical.apply(|node| {
            if let Some(k) = node.downcast_ref::<crate::state::keyed::KeyedSeriesExec>() {
                series_keys.push(k.keys().to_vec());
            }
            if let Some(k) = node.downcast_ref::<crate::state::lag::KeyedLagExec>() {
                series_keys.push(k.keys().to_vec());
            }
            Ok(TreeNodeRecursion::Continue)
        })?;

        // The stream leaf.
        let mut feeds: Vec<(String, Feed)> = Vec::new();
        physical.apply(|node| {
            if let Some(f) = node.downcast_ref::<FeedExec>() {
                feeds.push((f.table().to_string(), f.feed().clone()));
            }
            Ok(TreeNodeRecursion::Continue)
        })?;
        let mut physical = physical;
        let mut join: Option<super::join::PlannedJoin> = None;
        let mut union: Option<super::union::PlannedUnion> = None;
        let (source_name, feed) = match feeds.as_slice() {
            [one] => one.clone(),
            [] if logical_reads_stream(&plan) => {
                // The optimizer found a condition that is never true and dropped the scan.
                return plan_err!(
                    "the query never emits a row: a condition of its WHERE, ON or HAVING is \
                     never true (a comparison with NULL is NULL, never true: test for NULL with \
                     IS NULL or IS NOT NULL, or write the value the column should have)"
                );
            }
            [] => {
                return plan_err!(
                    "the query reads no stream table: a stream query reads one of the stream \
                     tables (camera_events, detector_readings, air_readings, or one declared \
                     STORED AS KAFKA), e.g. INSERT INTO <sink> SELECT … FROM camera_events"
                );
            }
            [_, _]
                if super::join::two_stream_node(&physical).is_some_and(|n| {
                    n.downcast_ref::<datafusion::physical_plan::union::UnionExec>()
                        .is_none()
                }) =>
            {
                let mut times = HashMap::new();
                for (t, _) in &feeds {
                    if let Some(table) = self.stream_table(t).await? {
                        times.insert(t.clone(), table.options.event_time.clone());
                    }
                }
                let Some(node) = super::join::two_stream_node(&physical) else {
                    return plan_err!("internal: the join of two streams went missing");
                };
                let planned = super::join::plan_join(&node, &|t| times.get(t).cloned().flatten())?;
                physical = physical
                    .transform_down(|n| {
                        if Arc::ptr_eq(&n, &planned.node) {
                            Ok(Transformed::yes(planned.leaf.clone()))
                        } else {
                            Ok(Transformed::no(n))
                        }
                    })?
                    .data;
                let left = (planned.tables[0].clone(), planned.output.clone());
                join = Some(planned);
                left
            }
            _ if super::join::two_stream_node(&physical).is_some_and(|n| {
                n.downcast_ref::<datafusion::physical_plan::union::UnionExec>()
                    .is_some()
            }) =>
            {
                let Some(node) = super::join::two_stream_node(&physical) else {
                    return plan_err!("internal: the union of streams went missing");
                };
                let planned = super::union::plan_union(&node)?;
                physical = physical
                    .transform_down(|n| {
                        if Arc::ptr_eq(&n, &planned.node) {
                            Ok(Transformed::yes(planned.leaf.clone()))
                        } else {
                            Ok(Transformed::no(n))
                        }
                    })?
                    .data;
                let first = (planned.branches[0].2.clone(), planned.output.clone());
                union = Some(planned);
                first
            }
            _ => {
                return plan_err!(
                    "the query reads {} streams ({}): a query reads one stream, or joins two \
                     with an event-time bound ({}); to merge streams, run one query per stream \
                     into the same sink",
                    feeds.len(),
                    feeds
                        .iter()
                        .map(|(t, _)| t.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    super::join::BOUNDED_FORM
                );
            }
        };
        let Some(source) = self.stream_table(&source_name).await? else {
            return plan_err!("{source_name} is not a stream table");
        };
        let mut right = None;
        if let Some(planned) = &join {
            for t in &planned.tables {
                let Some(table) = self.stream_table(t).await? else {
                    return plan_err!("{t} is not a stream table");
                };
                if !table.options.upsert_key.is_empty() {
                    return plan_err!(
                        "{t} is read as a changelog (OPTIONS 'upsert_key'), and a join of two \
                         streams cannot take back the pairs of a row a later record replaces: \
                         declare the topic again without 'upsert_key' to join its events"
                    );
                }
                if *t != source.name {
                    right = Some(table);
                }
            }
        }
        let mut others: Vec<super::union::OtherInput> = Vec::new();
        let mut event_times: HashMap<String, Option<String>> = HashMap::new();
        if let Some(planned) = &union {
            for (_, _, t) in &planned.branches {
                let Some(table) = self.stream_table(t).await? else {
                    return plan_err!("{t} is not a stream table");
                };
                if !table.options.upsert_key.is_empty() {
                    return plan_err!(
                        "{t} is read as a changelog (OPTIONS 'upsert_key'), and a UNION ALL of \
                         streams takes events: declare the topic again without 'upsert_key'"
                    );
                }
                event_times.insert(t.clone(), table.options.event_time.clone());
                if *t != source.name && !others.iter().any(|o| o.table.name == *t) {
                    others.push(super::union::OtherInput::new(table));
                }
            }
        }
        refuse_stream_build_sides(&physical).map_err(|e| {
            // A join the query does not write came from a subquery over its own columns
            // (one DataFusion could fold, `(SELECT NULL * v)`, but still joins).
            if written_joins(&plan) {
                e
            } else {
                plan_datafusion_err!("{OWN_COLUMN_SUBQUERY}")
            }
        })?;
        refuse_streamless_union(&physical)?;

        // The aggregation over the stream, if any (aggregates within reference-table
        // subqueries are part of the per-batch plan); aggregations over its results are
        // stages above it (see [`super::chain`]).
        let mut aggregates: Vec<Arc<dyn ExecutionPlan>> = Vec::new();
        physical.apply(|node| {
            if node.downcast_ref::<AggregateExec>().is_some() && reads_stream(node) {
                aggregates.push(node.clone());
            }
            Ok(TreeNodeRecursion::Continue)
        })?;
        let windowed = super::chain::lowest_aggregation(&aggregates)?;
        let task_ctx = Arc::new(TaskContext::from(&self.ctx.state()));
        let time_column = source.options.event_time.clone();
        let watermarks =
            WatermarkTracker::new(source.options.watermark_delay, source.options.idle_timeout);
        // The column the topic is keyed by places its groups in one partition only when it
        // cannot be null: a record whose key is null is produced without a Kafka key, to any
        // partition, so its groups would be split between partitions' states.
        let source_key = source.options.key.clone().filter(|k| {
            source
                .topic_schema
                .output_schema()
                .field_with_name(k)
                .is_ok_and(|f| !f.is_nullable())
        });
        let keyed_local = series_keys
            .iter()
            .all(|keys| names_column(keys, source_key.as_deref()));
        let changelog = !source.options.upsert_key.is_empty();
        if changelog && !keyed.is_empty() {
            return plan_err!(
                "{} is read as a changelog (OPTIONS 'upsert_key' '{}'), and detectors and alerts \
                 cannot take back a row that a later record replaces: aggregate it in windows \
                 (GROUP BY tumble(…), …), or declare the topic again without 'upsert_key' to \
                 read every record as an event",
                source.name,
                source.options.upsert_key.join(", ")
            );
        }
        let Some((top, bottom)) = windowed else {
            if changelog {
                return plan_err!(
                    "{} is read as a changelog (OPTIONS 'upsert_key' '{}'): a query over it must \
                     aggregate it in windows (GROUP BY tumble(…), hop(…) or cumulate(…)), where \
                     a record replacing an earlier one replaces its contribution; to pass every \
                     record on as it comes, declare the topic again without 'upsert_key'",
                    source.name,
                    source.options.upsert_key.join(", ")
                );
            }
            super::topn::refuse_per_batch(&physical)?;
            // LAG over the stream's events: the rows below it wait for the watermark.
            let source_feed = feed.clone();
            let event_time = time_column.clone();
            let split = if join.is_none() && union.is_none() {
                if time_column.is_none() && super::ordered::holds_keyed(&physical)? {
                    return plan_err!(
                        "LAG, detectors and alerts over a stream's events take them in \
                         event-time order, but stream table {} declares no event time: declare \
                         it (OPTIONS ('event_time' '<column>'))",
                        source.name
                    );
                }
                super::ordered::split(&physical, &|below, i| {
                    super::join::trace(below, i).is_some_and(|(leaf, c)| {
                        leaf.downcast_ref::<FeedExec>().is_some_and(|f| {
                            f.feed().same(&source_feed)
                                && event_time.as_deref() == Some(leaf.schema().field(c).name())
                        })
                    })
                })?
            } else {
                refuse_keyed_per_batch(&physical)?;
                None
            };
            let output_schema = physical.schema();
            let (physical, ordered) = match split {
                Some((below, ordered)) => (below, Some(Box::new(ordered))),
                None => (physical, None),
            };
            let join = match join {
                Some(planned) => Some(Box::new(super::join::JoinInput::new(planned, right, None)?)),
                None => None,
            };
            let union = union.map(|u| {
                Box::new(super::union::UnionInput {
                    schema: u.node.schema(),
                    branches: super::union::reused_branches(u.branches),
                    others,
                    watermark: None,
                })
            });
            return Ok(StreamQuery {
                sql,
                settings,
                partition_local: keyed_local && join.is_none() && union.is_none(),
                // Not windowed: never repartitioned.
                series_follow_groups: false,
                source,
                sink: None,
                feed,
                lower: ReusedPlan::new(physical),
                pinning: None,
                windowed: None,
                upsert: None,
                task_ctx,
                watermarks,
                time_column,
                early_fire_ms: None,
                forced_late: Vec::new(),
                last_early_fire_ms: i64::MIN,
                output_schema,
                held: Default::default(),
                owner: None,
                keyed,
                lags,
                join,
                union,
                ordered,
                settled: None,
                changes: 0,
                unproven: Unproven::Failed(0),
            });
        };
        let (spec, window_name) = super::chain::aggregate_spec(
            &top,
            &bottom,
            time_column.as_deref().unwrap_or("event_time"),
        )?;
        let Some(time_name) = time_column.clone() else {
            return plan_err!(
                "{window_name}() needs an event-time column, but stream table {} declares none (OPTIONS ('event_time' '<column>'))",
                source.name
            );
        };
        let lower = bottom.children()[0].clone();
        // Over a join, the event time of one side, which the join's output passes on.
        let window_side = match &join {
            Some(planned) => {
                let side = super::chain::time_column_of(&spec.time)
                    .and_then(|c| super::join::trace(&lower, c.index()))
                    .filter(|(leaf, _)| Arc::ptr_eq(leaf, &planned.leaf))
                    .and_then(|(_, i)| super::join::JoinInput::side_of_output(planned, i));
                let Some(side) = side else {
                    return plan_err!(
                        "{window_name}() over a join of two streams must be over the event time \
                         of one of them ({}.{} or {}.{}), got {}",
                        planned.tables[0],
                        time_name,
                        planned.tables[1],
                        right
                            .as_ref()
                            .and_then(|r| r.options.event_time.clone())
                            .unwrap_or_else(|| time_name.clone()),
                        spec.time
                    );
                };
                let padded = match planned.spec.join_type {
                    datafusion::common::JoinType::Left => side == 1,
                    datafusion::common::JoinType::Right => side == 0,
                    datafusion::common::JoinType::Full => true,
                    _ => false,
                };
                if padded {
                    return plan_err!(
                        "{window_name}() is over the event time of {}, which the outer join \
                         leaves null for unmatched rows: window by the event time of the side \
                         the join keeps whole",
                        planned.tables[side]
                    );
                }
                Some(side)
            }
            None => None,
        };
        if let Some(planned) = &union {
            let over_event_times = super::chain::time_column_of(&spec.time)
                .and_then(|c| super::join::trace(&lower, c.index()))
                .filter(|(leaf, _)| Arc::ptr_eq(leaf, &planned.leaf))
                .is_some_and(|(_, i)| {
                    super::union::is_event_time(planned, i, &|t| {
                        event_times.get(t).cloned().flatten()
                    })
                });
            if !over_event_times {
                return plan_err!(
                    "{window_name}() over a UNION ALL of streams must be over a column that is \
                     each stream's event time in its branch, got {}",
                    spec.time
                );
            }
            if matches!(spec.window, WindowSpec::Session { .. }) {
                return plan_err!(
                    "session windows over a UNION ALL of streams are not supported yet: use \
                     tumble(…), hop(…) or cumulate(…), or one query per stream"
                );
            }
        }
        match super::chain::time_column_of(&spec.time) {
            _ if join.is_some() || union.is_some() => {}
            Some(c) if c.name() == time_name => {}
            _ => {
                // The physical expression's own form names intervals in nanoseconds
                // (`IntervalMonthDayNano { months: 0, … }`): said in words.
                return plan_err!(
                    "{window_name}() must be over the event-time column {time_name} of {} \
                     itself, not {}: to see windows in another time zone, shift window_start \
                     and window_end in the SELECT (window_start + INTERVAL '7 hours'); another \
                     column is made the event time by the stream's 'event_time' option",
                    source.name,
                    if super::chain::time_column_of(&spec.time).is_some() {
                        "another column"
                    } else {
                        "an expression over it"
                    }
                );
            }
        }
        let output_schema = spec.output_schema.clone();
        let window_position = spec.window_position;
        refuse_window_calls_below(&lower)?;
        let upper_feed = Feed::default();
        let upper_leaf: Arc<dyn ExecutionPlan> = Arc::new(FeedExec::new(
            "window_output",
            upper_feed.clone(),
            output_schema.clone(),
            None,
        )?);
        let upper = physical
            .clone()
            .transform_down(|node| {
                if Arc::ptr_eq(&node, &top) {
                    Ok(Transformed::yes(upper_leaf.clone()))
                } else {
                    Ok(Transformed::no(node))
                }
            })?
            .data;
        let lateness_ms = i64::try_from(lateness.as_millis()).unwrap_or(i64::MAX);
        // Without allowed lateness or early results, and over a source that is not a
        // changelog, each window publishes each group once: the stages above only add.
        let append_only = lateness_ms == 0 && early_fire.is_none() && !changelog;
        let next = super::chain::plan_chain(
            &upper,
            &upper_leaf,
            &upper_feed,
            &spec,
            lateness_ms,
            append_only,
        )?;
        if matches!(spec.window, WindowSpec::Session { .. })
            && upper.exists(|n| {
                Ok(n.downcast_ref::<crate::state::keyed::KeyedSeriesExec>()
                    .is_some())
            })?
        {
            return plan_err!(
                "detectors and alerts over session windows are not supported yet (a session's \
                 rows may be retracted, which a detector cannot take back): use a tumbling or \
                 hopping window below the detector"
            );
        }
        let mut above: Vec<Arc<dyn datafusion::physical_expr::PhysicalExpr>> = Vec::new();
        upper.apply(|n| {
            if let Some(k) = n.downcast_ref::<crate::state::keyed::KeyedSeriesExec>() {
                above.push(k.order().clone());
            }
            Ok(TreeNodeRecursion::Continue)
        })?;
        if !above.is_empty() && (lateness_ms > 0 || early_fire.is_some()) {
            return plan_err!(
                "detectors and alerts over windows that emit more than once \
                 (urbanstream.allowed_lateness or urbanstream.early_fire set) are not supported \
                 yet: a revision or an early result would be learnt as another reading, and an \
                 alert would turn on partial windows; SET urbanstream.allowed_lateness = '0s' \
                 and urbanstream.early_fire = '' before this query"
            );
        }
        // Windows close in the order of their ends, and timers (alert expiries, silences)
        // fire as each window's end passes: detectors over them follow that order only.
        for order in &above {
            if !is_column(order, &["window_end"]) {
                return plan_err!(
                    "detectors and alerts over windows must be ordered by the window's end \
                     (OVER (PARTITION BY … ORDER BY window_end)), the order windows close and \
                     timers fire in; ORDER BY {} is not",
                    crate::state::expr_layout(order)
                );
            }
        }
        let series_follow_groups = series_follow_groups(
            &physical,
            &upper,
            &upper_leaf,
            spec.groups.len(),
            window_position,
        )?;
        let mut fields: Vec<Field> = upper
            .schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.push(Field::new("revision", DataType::Int32, false));
        fields.push(Field::new("is_final", DataType::Boolean, false));
        fields.push(Field::new("op", DataType::Utf8, false));
        if changelog && matches!(spec.window, WindowSpec::Session { .. }) {
            return plan_err!(
                "{} is read as a changelog (OPTIONS 'upsert_key' '{}'), and session windows over \
                 a changelog are not supported: use tumble(…), hop(…) or cumulate(…)",
                source.name,
                source.options.upsert_key.join(", ")
            );
        }
        // Over a changelog, one key's records must meet in one partition's state: the upsert
        // key holds the column the topic is keyed by.
        let partition_local = keyed_local
            && names_column(&spec.groups, source_key.as_deref())
            && next.as_ref().is_none_or(|n| {
                n.stage
                    .stages()
                    .all(|w| names_column(&w.groups, source_key.as_deref()))
            })
            && (!changelog
                || source_key.as_ref().is_some_and(|k| {
                    source
                        .options
                        .upsert_key
                        .iter()
                        .any(|u| u.eq_ignore_ascii_case(k))
                }));
        let upsert = if changelog {
            Some(UpsertState::new(
                source.topic_schema.output_schema(),
                &source.options.upsert_key,
                &time_name,
            )?)
        } else {
            None
        };
        let lower_schema = lower.schema();
        let groups = spec.groups.clone();
        let sessions = matches!(spec.window, WindowSpec::Session { .. });
        let window_spec = spec.window;
        let having = match next {
            None => having_of(&upper, &upper_leaf)?,
            Some(_) => None,
        };
        // Without a key plan (grouping by a select alias or position, say), an old event is
        // tested against a session of its own, as before.
        let lateness_keys = if sessions && !groups.is_empty() && join.is_none() && union.is_none() {
            key_plan(self, sql.clone(), source.clone())
                .await
                .ok()
                .flatten()
        } else {
            None
        };
        super::topn::refuse_per_batch(&lower)?;
        refuse_keyed_per_batch(&lower)?;
        // Windows come out in the order of their ends: LAG over them follows that order only.
        for l in &lags {
            if !is_column(&l.order, &["window_end", "window_start"]) {
                return plan_err!(
                    "LAG over windows must be ordered by their window_end (ORDER BY \
                     window_end), the order the windows close in; ORDER BY {} would compare \
                     each window with the ones before it in another order",
                    crate::state::expr_layout(&l.order)
                );
            }
        }
        if (lateness > Duration::ZERO || early_fire.is_some())
            && next.is_none()
            && super::topn::rankings(&upper)?.is_empty()
            && let Some(what) =
                unretractable_condition(&upper, &upper_leaf, having.as_ref(), groups.len() + 1)?
        {
            return unretractable(what);
        }
        if !lags.is_empty() && (lateness > Duration::ZERO || early_fire.is_some()) {
            return plan_err!(
                "LAG over windows that emit more than once (urbanstream.allowed_lateness or \
                 urbanstream.early_fire set) is not supported yet: a revision would come after \
                 the rows that followed it; SET urbanstream.allowed_lateness = '0s' and \
                 urbanstream.early_fire = '' before this query"
            );
        }
        let aggregate_outputs = aggregate_outputs(&upper, &upper_leaf, groups.len() + 1);
        let mut windowed = Windowed {
            aggregate_outputs,
            operator: match spec.window {
                WindowSpec::Session { .. } => {
                    Box::new(SessionOperator::new(spec, lateness.as_millis() as i64)?)
                }
                _ if changelog => Box::new(WindowOperator::over_changelog(
                    spec,
                    lateness.as_millis() as i64,
                    lower_schema,
                )?),
                _ => Box::new(WindowOperator::new(spec, lateness.as_millis() as i64)?),
            },
            upper: ReusedPlan::new(upper),
            upper_feed,
            upper_schema: output_schema,
            groups,
            sessions,
            spec: window_spec,
            lateness_keys,
            having,
            next: next.map(Box::new),
            window_position,
            ranked: None,
        };
        // A ranking needs every group of a window in one state.
        let ranked = super::topn::plan_ranking(&mut windowed)?;
        let join = match join {
            Some(planned) => Some(Box::new(super::join::JoinInput::new(
                planned,
                right,
                window_side,
            )?)),
            None => None,
        };
        let union = union.map(|u| {
            Box::new(super::union::UnionInput {
                schema: u.node.schema(),
                branches: super::union::reused_branches(u.branches),
                others,
                watermark: None,
            })
        });
        Ok(StreamQuery {
            sql,
            settings,
            partition_local: partition_local && !ranked && join.is_none() && union.is_none(),
            series_follow_groups,
            source,
            sink: None,
            feed,
            pinning: match &upsert {
                Some(_) => super::lookup::Pinning::of(&lower)?,
                None => None,
            },
            lower: ReusedPlan::new(lower),
            windowed: Some(windowed),
            upsert,
            task_ctx,
            watermarks,
            time_column,
            early_fire_ms: early_fire.map(|d| d.as_millis() as i64),
            forced_late: Vec::new(),
            last_early_fire_ms: i64::MIN,
            output_schema: Arc::new(Schema::new(fields)),
            held: Default::default(),
            owner: None,
            keyed,
            lags,
            join,
            union,
            ordered: None,
            settled: None,
            changes: 0,
            unproven: Unproven::Failed(0),
        })
    }
}

/// Whether `statement` holds a UNION (or another set operation) with a branch that groups by a
/// window function (`tumble`, `hop`, `session`, `cumulate`).
fn unions_windows(statement: &DFStatement) -> bool {
    use datafusion::sql::sqlparser::ast::{Expr, Query, SetExpr, Visit, Visitor};
    struct Windows;
    impl Visitor for Windows {
        type Break = ();
        fn pre_visit_expr(&mut self, expr: &Expr) -> std::ops::ControlFlow<()> {
            match expr {
                Expr::Function(f)
                    if ["tumble", "hop", "session", "cumulate"]
                        .iter()
                        .any(|w| f.name.to_string().eq_ignore_ascii_case(w)) =>
                {
                    std::ops::ControlFlow::Break(())
                }
                _ => std::ops::ControlFlow::Continue(()),
            }
        }
    }
    struct Unions;
    impl Visitor for Unions {
        type Break = ();
        fn pre_visit_query(&mut self, query: &Query) -> std::ops::ControlFlow<()> {
            match query.body.as_ref() {
                SetExpr::SetOperation { left, right, .. }
                    if left.visit(&mut Windows).is_break()
                        || right.visit(&mut Windows).is_break() =>
                {
                    std::ops::ControlFlow::Break(())
                }
                _ => std::ops::ControlFlow::Continue(()),
            }
        }
    }
    let DFStatement::Statement(s) = statement else {
        return false;
    };
    s.visit(&mut Unions).is_break()
}

/// `WITH w AS (…) INSERT INTO t SELECT … FROM w` as `INSERT INTO t WITH w AS (…) SELECT …`:
/// the parser hangs the WITH over the INSERT, where DataFusion plans the SELECT without the
/// stream tables and said the stream it reads was not found.
pub(crate) fn with_into_insert(statement: &mut DFStatement) {
    use datafusion::sql::sqlparser::ast::SetExpr;
    let DFStatement::Statement(s) = statement else {
        return;
    };
    let Statement::Query(query) = s.as_mut() else {
        return;
    };
    let SetExpr::Insert(Statement::Insert(insert)) = query.body.as_mut() else {
        return;
    };
    let Some(source) = insert.source.as_mut() else {
        return;
    };
    let Some(with) = query.with.take() else {
        return;
    };
    match &mut source.with {
        // The SELECT's own WITH may read the outer one's tables: the outer ones first.
        Some(inner) => {
            let mut tables = with.cte_tables;
            tables.append(&mut inner.cte_tables);
            inner.cte_tables = tables;
            inner.recursive |= with.recursive;
        }
        None => source.with = Some(with),
    }
    let insert = Statement::Insert(insert.clone());
    **s = insert;
}

/// The window column (`window_start`, `window_end`) that error `e` is about, when the query
/// reads a table with such a column of its own (`shadowed`): a bare name is that column
/// there, and a query taking it for its window's bound is told so.
fn shadowed_bound(e: &datafusion::error::DataFusionError, shadowed: &[String]) -> Option<String> {
    let message = e.to_string();
    shadowed
        .iter()
        .find(|c| {
            (message.contains("must appear in the GROUP BY")
                && message.contains(&format!(".{c}\" must appear")))
                || (message.contains("neither grouped nor aggregated")
                    && message.contains(&format!("column {c} is ")))
                || message.contains(&format!("No field named {c}."))
                || message.contains(&format!("No field named {c}\n"))
                || message.ends_with(&format!("No field named {c}"))
        })
        .cloned()
}

/// The columns `statement` leaves out of a `*` (`* EXCEPT (…)`, `* EXCLUDE (…)`), anywhere.
fn leaves_columns_out(statement: &DFStatement) -> Vec<String> {
    use datafusion::sql::sqlparser::ast::{ExcludeSelectItem, SelectItem, SetExpr, Visit, Visitor};
    struct Finds(Vec<String>);
    impl Visitor for Finds {
        type Break = ();
        fn pre_visit_query(
            &mut self,
            query: &datafusion::sql::sqlparser::ast::Query,
        ) -> std::ops::ControlFlow<()> {
            if let SetExpr::Select(select) = query.body.as_ref() {
                for item in &select.projection {
                    let (SelectItem::Wildcard(o) | SelectItem::QualifiedWildcard(_, o)) = item
                    else {
                        continue;
                    };
                    if let Some(except) = &o.opt_except {
                        self.0.push(except.first_element.value.clone());
                        self.0
                            .extend(except.additional_elements.iter().map(|i| i.value.clone()));
                    }
                    match &o.opt_exclude {
                        Some(ExcludeSelectItem::Single(name)) => self.0.push(name.to_string()),
                        Some(ExcludeSelectItem::Multiple(names)) => {
                            self.0.extend(names.iter().map(|n| n.to_string()));
                        }
                        None => {}
                    }
                }
            }
            std::ops::ControlFlow::Continue(())
        }
    }
    let mut finds = Finds(Vec::new());
    if let DFStatement::Statement(s) = statement {
        let _ = s.visit(&mut finds);
    }
    finds.0
}

/// A window column asked for where no window makes it (`SELECT segment_id, window_start, …
/// GROUP BY segment_id`): the planner's "no field named window_start" with the way to get one.
fn with_window_hint(e: datafusion::error::DataFusionError) -> datafusion::error::DataFusionError {
    let message = e.to_string();
    // The column itself, not one whose name begins with it (window_start_utc).
    let named = |c: &str| {
        let pattern = format!("No field named {c}");
        message.match_indices(&pattern).any(|(at, _)| {
            !message[at + pattern.len()..].starts_with(|ch: char| ch.is_alphanumeric() || ch == '_')
        })
    };
    let missing = ["window_start", "window_end", "window_time"]
        .into_iter()
        .find(|c| named(c));
    match missing {
        Some(column) => datafusion::error::DataFusionError::Plan(format!(
            "{column} is a column of a window's result: it exists above a GROUP BY with a \
             window (GROUP BY tumble(event_time, INTERVAL '1 minute'), …; or hop, cumulate, \
             session), in its SELECT, HAVING or an outer query, not in the WHERE below it nor \
             without a window; or leave {column} out"
        )),
        None => e,
    }
}

/// DataFusion's parser wants a `LOCATION` in `CREATE EXTERNAL TABLE`; a KAFKA table names its
/// topic in `OPTIONS` instead, so an empty `LOCATION ''` is added after `STORED AS KAFKA` when
/// the statement has none. Works on sqlparser's tokens, so comments and strings are safe.
pub fn add_kafka_location(sql: &str) -> String {
    use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
    let Ok(tokens) = Tokenizer::new(&GenericDialect {}, sql).tokenize_with_location() else {
        return sql.to_string();
    };
    // Byte offset of each line start, to turn (line, column) into an offset.
    let mut line_starts = vec![0usize];
    line_starts.extend(sql.match_indices('\n').map(|(i, _)| i + 1));
    let offset = |line: u64, column: u64| -> Option<usize> {
        let start = *line_starts.get((line as usize).checked_sub(1)?)?;
        let text = &sql[start..];
        let chars = (column as usize).checked_sub(1)?;
        Some(
            start
                + text
                    .char_indices()
                    .nth(chars)
                    .map_or(text.len(), |(i, _)| i),
        )
    };
    let words: Vec<(String, u64, u64, u64, u64)> = tokens
        .iter()
        .filter_map(|t| match &t.token {
            Token::Word(w) => Some((
                w.value.to_ascii_uppercase(),
                t.span.start.line,
                t.span.start.column,
                t.span.end.line,
                t.span.end.column,
            )),
            Token::SemiColon => Some((";".into(), 0, 0, 0, 0)),
            _ => None,
        })
        .collect();
    let mut inserts = Vec::new();
    let mut statement_has_location = false;
    let mut kafka_end = None;
    for (i, w) in words.iter().enumerate() {
        match w.0.as_str() {
            ";" => {
                if let (Some(at), false) = (kafka_end, statement_has_location) {
                    inserts.push(at);
                }
                statement_has_location = false;
                kafka_end = None;
            }
            "LOCATION" => statement_has_location = true,
            "KAFKA" if i >= 2 && words[i - 1].0 == "AS" && words[i - 2].0 == "STORED" => {
                kafka_end = offset(w.3, w.4);
            }
            _ => {}
        }
    }
    if let (Some(at), false) = (kafka_end, statement_has_location) {
        inserts.push(at);
    }
    let mut out = sql.to_string();
    for at in inserts.into_iter().rev() {
        out.insert_str(at, " LOCATION ''");
    }
    out
}

/// Checks `urbanstream.on_data_loss`.
fn data_loss_policy(value: &str) -> Result<()> {
    if matches!(value.trim(), "fail" | "skip") {
        return Ok(());
    }
    plan_err!(
        "urbanstream.on_data_loss: '{value}' is not a policy; write 'fail' (stop the query when \
         unread input was deleted) or 'skip' (record the gap in the DLQ and go on)"
    )
}

fn parse_setting(name: &str, value: &str) -> Result<Option<Duration>> {
    if value.trim().is_empty() {
        return Ok(None);
    }
    let d = humantime::parse_duration(value.trim()).map_err(|e| {
        plan_datafusion_err!("{name}: '{value}' is not a duration ({e}); write e.g. '30s'")
    })?;
    within_bounds(name, value, d).map(Some)
}

/// Refuses a window function evaluated below the windowed aggregation, where rows have no
/// window yet and the query would fail on its first batch. DataFusion pushes a condition on
/// group keys alone below an aggregation; the rewrite keeps `HAVING` conditions on the
/// window's bounds above it (see [`super::rewrite`]), and this guards any other way there.
pub(super) fn refuse_window_calls_below(lower: &Arc<dyn ExecutionPlan>) -> Result<()> {
    let mut found = false;
    lower.apply(|node| {
        node.apply_expressions(
            &mut |e: &Arc<dyn datafusion::physical_expr::PhysicalExpr>| {
                e.apply(|n| {
                    found |= n
                        .downcast_ref::<ScalarFunctionExpr>()
                        .is_some_and(|f| WINDOW_FUNCTIONS.contains(&f.name()));
                    Ok(TreeNodeRecursion::Continue)
                })
            },
        )?;
        Ok(if found {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    })?;
    if found {
        return plan_err!(
            "a HAVING condition on window_start or window_end alone is not supported yet (it \
             would be evaluated before the window): filter the events with WHERE on the \
             event-time column, or filter the window's rows in a query reading its output topic"
        );
    }
    Ok(())
}

/// The names of the [`StreamSettings`].
const SETTINGS: [&str; 4] = ["allowed_lateness", "early_fire", "key_ttl", "on_data_loss"];

/// The `SET urbanstream.…` statements that give a session `settings`.
pub fn settings_sql(settings: &StreamSettings) -> Vec<String> {
    [
        ("allowed_lateness", &settings.allowed_lateness),
        ("early_fire", &settings.early_fire),
        ("key_ttl", &settings.key_ttl),
        ("on_data_loss", &settings.on_data_loss),
    ]
    .into_iter()
    .map(|(name, value)| format!("SET urbanstream.{name} = '{}'", value.replace('\'', "''")))
    .collect()
}

/// Refuses `LAG`, detectors and alert machines in `plan`, a plan run per micro-batch of raw
/// events (whose arrival order is not event-time order): below a window, or over a join or
/// union of streams.
fn refuse_keyed_per_batch(plan: &Arc<dyn ExecutionPlan>) -> Result<()> {
    let mut found = None;
    plan.apply(|n| {
        if n.downcast_ref::<crate::state::lag::KeyedLagExec>()
            .is_some()
        {
            found = Some("LAG".to_string());
        } else if let Some(k) = n.downcast_ref::<crate::state::keyed::KeyedSeriesExec>() {
            found = Some(k.handle().functions().join(", "));
        }
        Ok(if found.is_some() {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    })?;
    if let Some(what) = found {
        return plan_err!(
            "{what} over the raw events below a window, or of a join or union of streams, \
             would depend on the order they arrive in: aggregate them in windows first and take \
             it over the windows' rows (OVER (PARTITION BY … ORDER BY window_end)), e.g. SELECT \
             station, window_end, aqi, lag(aqi, 1) OVER (PARTITION BY station ORDER BY \
             window_end) FROM (SELECT station, window_end, avg(pm25) AS aqi FROM air GROUP BY \
             tumble(event_time, INTERVAL '1 hour'), station); over one stream's events, it may \
             be taken on its own (OVER (PARTITION BY … ORDER BY event_time))"
        );
    }
    Ok(())
}

/// Whether `plan` reads the stream (holds its feed leaf).
pub(super) fn reads_stream(plan: &Arc<dyn ExecutionPlan>) -> bool {
    let mut found = false;
    let _ = plan.apply(|n| {
        found |= n.downcast_ref::<FeedExec>().is_some();
        Ok(if found {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    });
    found
}

/// Refuses a union of the stream with rows that do not come from it: a reference table or
/// literal rows would be published again with every micro-batch.
fn refuse_streamless_union(plan: &Arc<dyn ExecutionPlan>) -> Result<()> {
    use datafusion::physical_plan::union::UnionExec;
    let mut refused = false;
    plan.apply(|node| {
        if node.downcast_ref::<UnionExec>().is_some()
            && node.children().iter().any(|c| !reads_stream(c))
        {
            refused = true;
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    if refused {
        return plan_err!(
            "UNION of the stream with rows that are not from the stream (a reference table or \
             VALUES) would publish those rows again with every micro-batch: keep the union to \
             the stream, and join a reference table instead"
        );
    }
    Ok(())
}

/// Refuses `SET <name> = <value>` of an `urbanstream.` setting there is not, or with a
/// value the setting does not take, saying which settings there are or what it takes.
pub fn check_setting(name: &str, value: &str) -> Result<()> {
    let lower = name.to_ascii_lowercase();
    if !SETTINGS.iter().any(|s| lower == format!("urbanstream.{s}")) {
        return plan_err!(
            "there is no setting {name}: the settings are {}",
            SETTINGS
                .iter()
                .map(|s| format!("urbanstream.{s}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if lower == "urbanstream.on_data_loss" {
        data_loss_policy(value)?;
    } else {
        parse_setting(name, value)?;
    }
    Ok(())
}

/// A DISTINCT aggregate's float arguments with -0.0 read as 0.0: DataFusion tells distinct
/// floats apart by their bits, so `count(DISTINCT f)` counted 0.0 and -0.0 as two values
/// (and `array_agg(DISTINCT f)` kept both), where SQL's `=`, `GROUP BY f` and the engine's
/// keys take them as one. `f + 0.0` is `f` with -0.0 made 0.0; the aggregate keeps its
/// name.
fn distinct_floats_as_sql_compares(plan: LogicalPlan) -> Result<LogicalPlan> {
    use datafusion::common::ScalarValue;
    use datafusion::common::tree_node::Transformed;
    use datafusion::logical_expr::expr::{AggregateFunction, Alias};
    use datafusion::logical_expr::{Aggregate, Expr, ExprSchemable, lit};
    let float =
        |t: &DataType| matches!(t, DataType::Float16 | DataType::Float32 | DataType::Float64);
    plan.transform_up(|node| {
        let LogicalPlan::Aggregate(aggregate) = &node else {
            return Ok(Transformed::no(node));
        };
        let schema = aggregate.input.schema().clone();
        let mut changed = false;
        let mut exprs = Vec::with_capacity(aggregate.aggr_expr.len());
        for e in &aggregate.aggr_expr {
            let (inner, alias) = match e {
                Expr::Alias(a) => (a.expr.as_ref(), Some(a)),
                other => (other, None),
            };
            let Expr::AggregateFunction(f) = inner else {
                exprs.push(e.clone());
                continue;
            };
            if !f.params.distinct {
                exprs.push(e.clone());
                continue;
            }
            let mut args = Vec::with_capacity(f.params.args.len());
            let mut any = false;
            for a in &f.params.args {
                let t = a.get_type(&schema)?;
                if float(&t) {
                    args.push(a.clone() + lit(ScalarValue::new_zero(&t)?));
                    any = true;
                } else {
                    args.push(a.clone());
                }
            }
            if !any {
                exprs.push(e.clone());
                continue;
            }
            changed = true;
            let mut params = f.params.clone();
            // A DISTINCT aggregate orders by its arguments only (`array_agg(DISTINCT f ORDER
            // BY f)`): the order follows them.
            for sort in params.order_by.iter_mut() {
                if let Some(i) = f.params.args.iter().position(|a| *a == sort.expr) {
                    sort.expr = args[i].clone();
                }
            }
            params.args = args;
            let rewritten = Expr::AggregateFunction(AggregateFunction {
                func: f.func.clone(),
                params,
            });
            exprs.push(match alias {
                Some(a) => Expr::Alias(Alias {
                    expr: Box::new(rewritten),
                    ..a.clone()
                }),
                None => rewritten.alias(e.schema_name().to_string()),
            });
        }
        if !changed {
            return Ok(Transformed::no(node));
        }
        let LogicalPlan::Aggregate(aggregate) = node else {
            return Ok(Transformed::no(node));
        };
        Ok(Transformed::yes(LogicalPlan::Aggregate(
            Aggregate::try_new(aggregate.input, aggregate.group_expr, exprs)?,
        )))
    })
    .map(|t| t.data)
}

/// The aggregates as they must run over micro-batches: DataFusion plans an ordered aggregate
/// (`array_agg(x ORDER BY t)`) over input it has sorted and tells it so, and the aggregate
/// then appends rows as they come; a window's rows arrive over many batches in any order, so
/// each ordered aggregate is told its input is not ordered and orders it itself.
pub(super) fn unordered_input(
    aggregates: &[Arc<datafusion::physical_expr::aggregate::AggregateFunctionExpr>],
) -> Result<Vec<Arc<datafusion::physical_expr::aggregate::AggregateFunctionExpr>>> {
    aggregates
        .iter()
        .map(|a| {
            if a.order_bys().is_empty() {
                return Ok(a.clone());
            }
            Ok(match a.clone().with_beneficial_ordering(false)? {
                Some(unordered) => Arc::new(unordered),
                None => a.clone(),
            })
        })
        .collect()
}

/// Refuses logical plans that cannot run on an unbounded stream, saying what to write instead.
/// Joins collect one side once per plan (the build side) and stream the other: a stream on a
/// build side would be joined with its first batch forever, and a join that emits the build
/// side's unmatched rows would emit the whole reference table with every batch. Both are
/// refused with the reason.
fn refuse_stream_build_sides(plan: &Arc<dyn ExecutionPlan>) -> Result<()> {
    use datafusion::common::JoinType;
    use datafusion::physical_plan::joins::{CrossJoinExec, HashJoinExec, NestedLoopJoinExec};
    let mut error = None;
    plan.apply(|node| {
        let (build, join_type) = if let Some(j) = node.downcast_ref::<HashJoinExec>() {
            (j.left(), Some(*j.join_type()))
        } else if let Some(j) = node.downcast_ref::<NestedLoopJoinExec>() {
            (j.left(), Some(*j.join_type()))
        } else if let Some(j) = node.downcast_ref::<CrossJoinExec>() {
            (j.left(), None)
        } else {
            return Ok(TreeNodeRecursion::Continue);
        };
        if matches!(join_type, Some(JoinType::Full)) {
            error = Some(
                "a FULL JOIN of a stream with a table would emit the table's unmatched rows with every batch: use LEFT JOIN (stream first) to keep every event".to_string(),
            );
        } else if reads_stream(build) {
            error = Some(format!(
                "the join keeps the stream on the side it collects once ({}): join a stream with a reference table, stream first (FROM stream LEFT JOIN table …)",
                node.name()
            ));
        } else if matches!(
            join_type,
            Some(JoinType::Left | JoinType::LeftAnti | JoinType::LeftSemi | JoinType::LeftMark)
        ) {
            error = Some(
                "the join would emit reference rows per batch (a RIGHT JOIN of the stream keeps every table row): keep every event with FROM stream LEFT JOIN table".to_string(),
            );
        }
        Ok(if error.is_some() {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    })?;
    match error {
        Some(e) => plan_err!("{e}"),
        None => Ok(()),
    }
}

fn refuse_unbounded(plan: &LogicalPlan) -> Result<()> {
    let has_aggregate = plan.exists(|p| Ok(matches!(p, LogicalPlan::Aggregate(_))))?;
    let mut problem = None;
    plan.apply(|p| {
        if !logical_reads_stream(p) {
            // Sorting, limiting or deduplicating a reference table is bounded.
            return Ok(TreeNodeRecursion::Jump);
        }
        problem = match p {
            LogicalPlan::Sort(_) if !has_aggregate => Some(
                "ORDER BY over a whole stream never finishes: drop it, or order within windows (GROUP BY tumble(…) … ORDER BY window_start)",
            ),
            LogicalPlan::Limit(_) => {
                Some("LIMIT over a stream is not supported: a stream query runs continuously")
            }
            // UNION without ALL is a DISTINCT over the union.
            LogicalPlan::Distinct(d)
                if !has_aggregate && matches!(d.input().as_ref(), LogicalPlan::Union(_)) =>
            {
                Some(
                    "UNION (without ALL) removes duplicate rows, which over streams never \
                     finishes: write UNION ALL to merge the streams (every row of each), or \
                     group the union by a window to count each row once per window",
                )
            }
            LogicalPlan::Distinct(_) if !has_aggregate => Some(
                "SELECT DISTINCT over a stream never finishes: group by a window instead, e.g. GROUP BY tumble(event_time, INTERVAL '1 minute'), …",
            ),
            _ => None,
        };
        Ok(if problem.is_some() { TreeNodeRecursion::Stop } else { TreeNodeRecursion::Continue })
    })?;
    match problem {
        Some(p) => plan_err!("{p}"),
        None => Ok(()),
    }
}

/// `batch`, rows of a query without a window, under the names of its output (`schema`):
/// those an `INSERT INTO sink (a, b)` lists, in place of the SELECT's own.
fn named(schema: &SchemaRef, batch: RecordBatch) -> Result<RecordBatch> {
    let same = batch
        .schema()
        .fields()
        .iter()
        .zip(schema.fields())
        .all(|(a, b)| a.name() == b.name());
    if same || batch.num_columns() != schema.fields().len() {
        return Ok(batch);
    }
    let options =
        datafusion::arrow::array::RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .zip(batch.columns())
        .map(|(f, c)| {
            Field::new(
                f.name(),
                c.data_type().clone(),
                f.is_nullable() || c.null_count() > 0,
            )
        })
        .collect();
    Ok(RecordBatch::try_new_with_options(
        Arc::new(Schema::new(fields)),
        batch.columns().to_vec(),
        &options,
    )?)
}

/// The refusal of a subquery in an expression that reads the query's own columns.
const OWN_COLUMN_SUBQUERY: &str = "a subquery in an expression that reads the query's own \
    columns ((SELECT v + 1) over a column v of the FROM) is not supported: write the expression \
    without the subquery (v + 1), or join the table it reads on that column (FROM stream s JOIN \
    table t ON t.k = s.k)";

/// Whether the query (as planned from its SQL, before the optimizer turns subqueries into
/// joins) joins tables itself, or tests rows against a subquery (`IN`, `EXISTS`).
fn written_joins(plan: &LogicalPlan) -> bool {
    use datafusion::logical_expr::Expr;
    plan.exists(|p| {
        Ok(matches!(p, LogicalPlan::Join(_))
            || p.expressions().iter().any(|e| {
                e.exists(|x| Ok(matches!(x, Expr::Exists(_) | Expr::InSubquery(_))))
                    .unwrap_or(false)
            }))
    })
    .unwrap_or(true)
}

/// Refuses a scalar subquery (`(SELECT max(x) FROM t)`) in a stream's aggregation or below
/// it: the window evaluates those rows itself, where the subquery's value is not computed
/// (DataFusion's "ScalarSubqueryExpr evaluated before the subquery was executed"). Above
/// the aggregation (`HAVING`) and in a query without one it runs.
fn refuse_subqueries_in_windows(plan: &LogicalPlan) -> Result<()> {
    use datafusion::logical_expr::Expr;
    let has_subquery = |p: &LogicalPlan| -> Result<bool> {
        let mut found = false;
        for e in p.expressions() {
            found |= e.exists(|x| Ok(matches!(x, Expr::ScalarSubquery(_))))?;
        }
        Ok(found)
    };
    let below = plan.exists(|p| {
        Ok(matches!(p, LogicalPlan::Aggregate(_))
            && logical_reads_stream(p)
            && p.exists(|n| has_subquery(n))?)
    })?;
    if below {
        return plan_err!(
            "a scalar subquery ((SELECT … FROM <table>)) in a window's aggregation or below \
             it is not supported: join its value instead, e.g. FROM camera_events c CROSS \
             JOIN (SELECT max(free_flow_kmh) AS top FROM segments) m WHERE c.speed_kmh < \
             m.top, or test it above the window, in HAVING"
        );
    }
    Ok(())
}

/// Whether a logical plan scans a stream table.
fn logical_reads_stream(plan: &LogicalPlan) -> bool {
    plan.exists(|p| {
        Ok(match p {
            LogicalPlan::TableScan(scan) => {
                datafusion::datasource::source_as_provider(&scan.source)
                    .is_ok_and(|provider| provider.downcast_ref::<StreamTable>().is_some())
            }
            _ => false,
        })
    })
    .unwrap_or(true)
}

/// How a window's revision that no longer passes the conditions over its rows (`HAVING`, or
/// a `WHERE` above a lookup join of the window's rows) is told, so that the row published
/// before for its key and window is withdrawn.
pub(super) enum Having {
    /// A `HAVING` over the window's rows (through projections only), tested on its own.
    Direct {
        /// The plan under the condition (projections over the window's rows, row for row).
        input: ReusedPlan,
        /// The condition, over `input`'s rows.
        predicate: Arc<dyn datafusion::physical_expr::PhysicalExpr>,
        /// The upper plan without the condition.
        unfiltered: ReusedPlan,
    },
    /// Conditions elsewhere on the way to the window's rows (above a join): the upper plan
    /// run without them gives the rows a revision would publish if they all passed; the
    /// ones the upper plan drops are withdrawn.
    Rerun {
        /// The upper plan without the filters and join conditions on its way to the rows.
        unfiltered: ReusedPlan,
        /// Encodes output rows, to tell the ones the conditions drop.
        rows: datafusion::arrow::row::RowConverter,
    },
}

/// The rows of `all` (the unfiltered plan's output) that are not in `kept` (the upper plan's),
/// as many times as they are missing.
fn dropped(
    converter: &datafusion::arrow::row::RowConverter,
    all: &[RecordBatch],
    kept: &[RecordBatch],
) -> Result<Vec<RecordBatch>> {
    let mut counts: HashMap<Vec<u8>, usize> = HashMap::new();
    for b in kept {
        let rows = converter.convert_columns(b.columns())?;
        for r in rows.iter() {
            *counts.entry(r.as_ref().to_vec()).or_default() += 1;
        }
    }
    let mut out = Vec::new();
    for b in all {
        let rows = converter.convert_columns(b.columns())?;
        let missing: BooleanArray = rows
            .iter()
            .map(|r| match counts.get_mut(r.as_ref()) {
                Some(n) if *n > 0 => {
                    *n -= 1;
                    Some(false)
                }
                _ => Some(true),
            })
            .collect();
        if missing.true_count() > 0 {
            out.push(filter_record_batch(b, &missing)?);
        }
    }
    Ok(out)
}

/// The input of `node` when it runs scalar subqueries (wrapped or not), without them. The
/// plans that run without their conditions always run right after the upper plan, which
/// computed the subqueries' values into the store both share (a second run would find its
/// values there and fail).
fn without_subqueries(node: &Arc<dyn ExecutionPlan>) -> Option<Arc<dyn ExecutionPlan>> {
    node.downcast_ref::<datafusion::physical_plan::scalar_subquery::ScalarSubqueryExec>()?;
    node.children().first().map(|c| Arc::clone(c))
}

/// Whether `plan` reads `leaf`.
fn reads(plan: &Arc<dyn ExecutionPlan>, leaf: &Arc<dyn ExecutionPlan>) -> Result<bool> {
    plan.exists(|n| Ok(Arc::ptr_eq(n, leaf)))
}

/// The conditions on the way from the upper plan's root to the window's rows (`leaf`):
/// filters, and joins' conditions beyond their keys (DataFusion moves a `WHERE` that reads
/// both sides of a join into it).
fn conditions_on_path(
    upper: &Arc<dyn ExecutionPlan>,
    leaf: &Arc<dyn ExecutionPlan>,
) -> Result<Vec<Arc<dyn ExecutionPlan>>> {
    use datafusion::physical_plan::filter::FilterExec;
    use datafusion::physical_plan::joins::HashJoinExec;
    let mut found = Vec::new();
    upper.apply(|n| {
        if !reads(n, leaf)? {
            return Ok(TreeNodeRecursion::Jump);
        }
        if n.downcast_ref::<FilterExec>().is_some()
            || n.downcast_ref::<HashJoinExec>()
                .is_some_and(|j| j.filter().is_some())
        {
            found.push(n.clone());
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    Ok(found)
}

/// How the upper plan's conditions over the window's rows are told apart ([`Having`]); none
/// when there are none, when the upper plan holds keyed operators (their state cannot take a
/// row back, nor step a row twice) or when its rows cannot be compared (the refusal while
/// windows revise says so: [`unretractable_condition`]).
pub(super) fn having_of(
    upper: &Arc<dyn ExecutionPlan>,
    leaf: &Arc<dyn ExecutionPlan>,
) -> Result<Option<Having>> {
    use datafusion::common::JoinType;
    use datafusion::physical_plan::filter::FilterExec;
    use datafusion::physical_plan::joins::HashJoinExec;
    use datafusion::physical_plan::projection::ProjectionExec;
    if super::ordered::holds_keyed(upper)? {
        return Ok(None);
    }
    let conditions = conditions_on_path(upper, leaf)?;
    if conditions.is_empty() {
        return Ok(None);
    }
    // Whether `plan` is `leaf` under projections only (row for row, in order).
    fn over_leaf(plan: &Arc<dyn ExecutionPlan>, leaf: &Arc<dyn ExecutionPlan>) -> bool {
        if Arc::ptr_eq(plan, leaf) {
            return true;
        }
        match plan.downcast_ref::<ProjectionExec>() {
            Some(p) => over_leaf(p.input(), leaf),
            None => false,
        }
    }
    // A filter without its condition: its input, or the projection it carries (DataFusion
    // embeds one that drops a column the condition reads, as HAVING on an aggregate the
    // SELECT leaves out does).
    let without = |f: &FilterExec| -> Result<Arc<dyn ExecutionPlan>> {
        let input = f.input().clone();
        let Some(columns) = f.projection() else {
            return Ok(input);
        };
        let schema = input.schema();
        let exprs: Vec<(Arc<dyn datafusion::physical_expr::PhysicalExpr>, String)> = columns
            .iter()
            .map(|&i| {
                let name = schema.field(i).name().clone();
                (
                    Arc::new(datafusion::physical_expr::expressions::Column::new(
                        &name, i,
                    )) as Arc<dyn datafusion::physical_expr::PhysicalExpr>,
                    name,
                )
            })
            .collect();
        Ok(Arc::new(ProjectionExec::try_new(exprs, input)?) as Arc<dyn ExecutionPlan>)
    };
    // One HAVING right over the window's rows: tested on its own, the cheaper way.
    if let [only] = conditions.as_slice()
        && let Some(f) = only.downcast_ref::<FilterExec>()
        && over_leaf(f.input(), leaf)
    {
        let (input, predicate) = (f.input().clone(), f.predicate().clone());
        let unfiltered = upper
            .clone()
            .transform_up(|n| {
                if let Some(inner) = without_subqueries(&n) {
                    return Ok(Transformed::yes(inner));
                }
                match n.downcast_ref::<FilterExec>() {
                    Some(f) if Arc::ptr_eq(f.input(), &input) => Ok(Transformed::yes(without(f)?)),
                    _ => Ok(Transformed::no(n)),
                }
            })?
            .data;
        return Ok(Some(Having::Direct {
            input: ReusedPlan::new(input),
            predicate,
            unfiltered: ReusedPlan::new(unfiltered),
        }));
    }
    // Bottom up, so that a filter right above a join with a condition loses both.
    let unfiltered = upper
        .clone()
        .transform_up(|n| {
            if let Some(inner) = without_subqueries(&n) {
                return Ok(Transformed::yes(inner));
            }
            if !reads(&n, leaf)? {
                return Ok(Transformed::no(n));
            }
            if let Some(j) = n.downcast_ref::<HashJoinExec>()
                && j.filter().is_some()
                && matches!(
                    j.join_type(),
                    JoinType::Inner | JoinType::Left | JoinType::Right | JoinType::Full
                )
            {
                let join = j.builder().with_filter(None).reset_state().build_exec()?;
                return Ok(Transformed::yes(super::lookup::replace_join(&n, join)?));
            }
            match n.downcast_ref::<FilterExec>() {
                Some(f) => Ok(Transformed::yes(without(f)?)),
                None => Ok(Transformed::no(n)),
            }
        })?
        .data;
    if unfiltered.schema().fields().len() != upper.schema().fields().len() {
        return plan_err!("internal: the plan without its conditions has other columns");
    }
    let fields = upper
        .schema()
        .fields()
        .iter()
        .map(|f| datafusion::arrow::row::SortField::new(f.data_type().clone()))
        .collect();
    let Ok(rows) = datafusion::arrow::row::RowConverter::new(fields) else {
        return Ok(None);
    };
    Ok(Some(Having::Rerun {
        unfiltered: ReusedPlan::new(unfiltered),
        rows,
    }))
}

/// A condition on the way from the upper plan's root to the window's rows (`leaf`) whose
/// failing revisions `having` cannot tell (the upper plan's [`having_of`]): one in an
/// `EXISTS` or `IN` subquery, in a join without an equality key, a join on a column
/// computed from the window's aggregates (a revision may stop matching), or conditions over
/// output columns whose rows cannot be compared. `keys` is the number of the
/// window's leading columns that are its window and group keys. (Detectors and alert
/// functions over revising windows are refused on their own.)
pub(super) fn unretractable_condition(
    upper: &Arc<dyn ExecutionPlan>,
    leaf: &Arc<dyn ExecutionPlan>,
    having: Option<&Having>,
    keys: usize,
) -> Result<Option<&'static str>> {
    use datafusion::common::JoinType;
    use datafusion::physical_plan::joins::{HashJoinExec, NestedLoopJoinExec};
    let mut found = None;
    upper.apply(|n| {
        if !reads(n, leaf)? {
            return Ok(TreeNodeRecursion::Jump);
        }
        found = if let Some(j) = n.downcast_ref::<HashJoinExec>() {
            let stream_left = reads(j.left(), leaf)?;
            let on_keys = j.on().iter().all(|(l, r)| {
                let (expr, side) = if stream_left {
                    (l, j.left())
                } else {
                    (r, j.right())
                };
                expr.downcast_ref::<datafusion::physical_expr::expressions::Column>()
                    .and_then(|c| leaf_column(side, c.index(), leaf))
                    .is_some_and(|i| i < keys)
            });
            if !matches!(
                j.join_type(),
                JoinType::Inner | JoinType::Left | JoinType::Right | JoinType::Full
            ) {
                Some("a condition in an EXISTS or IN subquery")
            } else if !on_keys {
                Some("a join on a column computed from the window's aggregates")
            } else {
                None
            }
        } else if n
            .downcast_ref::<NestedLoopJoinExec>()
            .is_some_and(|j| j.filter().is_some())
        {
            Some("a join condition without an equality on a key")
        } else {
            None
        };
        Ok(if found.is_some() {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    })?;
    if found.is_some() {
        return Ok(found);
    }
    let conditions = !conditions_on_path(upper, leaf)?.is_empty();
    let keyed = super::ordered::holds_keyed(upper)?;
    Ok(match having {
        None if conditions && !keyed => {
            Some("a condition over output columns of a type rows cannot be compared in")
        }
        _ => None,
    })
}

/// The refusal of [`unretractable_condition`]'s `what`.
pub(super) fn unretractable<T>(what: &str) -> Result<T> {
    plan_err!(
        "{what} over a window that emits revisions (urbanstream.allowed_lateness or \
         urbanstream.early_fire set) is not supported: a revision that no longer passes it \
         could not withdraw the row published before. Write the condition on the window's own \
         columns in HAVING or in a WHERE above a join on the group keys, or SET \
         urbanstream.allowed_lateness = '0s' and urbanstream.early_fire = '' before this query"
    )
}

/// Per output column of `upper` (over the aggregation's rows at `leaf`, whose first `keys`
/// columns are its group keys and window): whether it is an aggregate's result as it is.
pub(super) fn aggregate_outputs(
    upper: &Arc<dyn ExecutionPlan>,
    leaf: &Arc<dyn ExecutionPlan>,
    keys: usize,
) -> Vec<bool> {
    (0..upper.schema().fields().len())
        .map(|i| leaf_column(upper, i, leaf).is_some_and(|c| c >= keys))
        .collect()
}

/// The column of `leaf` that column `index` of `plan` is, through projections and filters
/// (a column itself, or a field of it: a window's bounds); none when it is computed.
fn leaf_column(
    plan: &Arc<dyn ExecutionPlan>,
    index: usize,
    leaf: &Arc<dyn ExecutionPlan>,
) -> Option<usize> {
    use datafusion::physical_expr::ScalarFunctionExpr;
    use datafusion::physical_expr::expressions::Column;
    use datafusion::physical_plan::filter::FilterExec;
    use datafusion::physical_plan::projection::ProjectionExec;
    if Arc::ptr_eq(plan, leaf) {
        return Some(index);
    }
    if let Some(p) = plan.downcast_ref::<ProjectionExec>() {
        let e = &p.expr().get(index)?.expr;
        let c = match e.downcast_ref::<Column>() {
            Some(c) => c,
            None => e
                .downcast_ref::<ScalarFunctionExpr>()
                .filter(|f| f.name() == "get_field")
                .and_then(|f| f.args().first())
                .and_then(|a| a.downcast_ref::<Column>())?,
        };
        return leaf_column(p.input(), c.index(), leaf);
    }
    if let Some(f) = plan.downcast_ref::<FilterExec>() {
        let i = match f.projection() {
            Some(p) => *p.get(index)?,
            None => index,
        };
        return leaf_column(f.input(), i, leaf);
    }
    None
}

/// Whether one of `exprs` is the column `key` itself.
fn names_column(
    exprs: &[Arc<dyn datafusion::physical_expr::PhysicalExpr>],
    key: Option<&str>,
) -> bool {
    let Some(key) = key else {
        return false;
    };
    exprs
        .iter()
        .any(|e| e.downcast_ref::<Column>().is_some_and(|c| c.name() == key))
}

/// Whether every detector and `LAG` of `physical` (none at all included) is in `upper`, the
/// plan over the windows' rows read from `upper_leaf`, and keyed by columns that include each
/// of the windows' `groups` group keys (the window's own column at `window_position` of the
/// windows' rows, the keys around it): a key's rows then all belong to one group's key, so
/// its state can live wherever that group's state does.
fn series_follow_groups(
    physical: &Arc<dyn ExecutionPlan>,
    upper: &Arc<dyn ExecutionPlan>,
    upper_leaf: &Arc<dyn ExecutionPlan>,
    groups: usize,
    window_position: usize,
) -> Result<bool> {
    let is_series = |n: &Arc<dyn ExecutionPlan>| -> Option<Vec<Arc<dyn datafusion::physical_expr::PhysicalExpr>>> {
        if let Some(k) = n.downcast_ref::<crate::state::keyed::KeyedSeriesExec>() {
            return Some(k.keys().to_vec());
        }
        n.downcast_ref::<crate::state::lag::KeyedLagExec>()
            .map(|l| l.keys().to_vec())
    };
    let mut all = 0;
    physical.apply(|n| {
        all += usize::from(is_series(n).is_some());
        Ok(TreeNodeRecursion::Continue)
    })?;
    let group_columns: Vec<usize> = (0..=groups).filter(|&i| i != window_position).collect();
    let mut following = 0;
    upper.apply(|n| {
        let children = n.children();
        let (Some(keys), [input]) = (is_series(n), children.as_slice()) else {
            return Ok(TreeNodeRecursion::Continue);
        };
        let keyed_by: std::collections::HashSet<usize> = keys
            .iter()
            .filter_map(|k| k.downcast_ref::<Column>())
            .filter_map(|c| column_of(input, c.index(), upper_leaf))
            .collect();
        following += usize::from(group_columns.iter().all(|g| keyed_by.contains(g)));
        Ok(TreeNodeRecursion::Continue)
    })?;
    Ok(following == all)
}

/// The column of `leaf`'s rows that column `index` of `plan`'s rows is: followed through
/// projections, filters, lookup joins, nodes that pass rows on unchanged and nodes that add
/// columns after their input's (detectors, `LAG`, window functions).
fn column_of(
    plan: &Arc<dyn ExecutionPlan>,
    index: usize,
    leaf: &Arc<dyn ExecutionPlan>,
) -> Option<usize> {
    if Arc::ptr_eq(plan, leaf) {
        return Some(index);
    }
    if let Some(p) = plan.downcast_ref::<datafusion::physical_plan::projection::ProjectionExec>() {
        let c = p.expr().get(index)?.expr.downcast_ref::<Column>()?;
        return column_of(p.input(), c.index(), leaf);
    }
    if let [child] = plan.children().as_slice() {
        let (fields, below) = (
            plan.schema().fields().clone(),
            child.schema().fields().clone(),
        );
        if index < below.len()
            && fields.len() > below.len()
            && fields.iter().zip(below.iter()).all(|(a, b)| a == b)
        {
            return column_of(child, index, leaf);
        }
    }
    let (child, index) = super::join::pass_through(plan, index)?;
    column_of(&child, index, leaf)
}

/// A running stream query: its plan pieces, its window state and its watermark.
pub struct StreamQuery {
    sql: String,
    /// The `SET urbanstream.…` settings it was planned with.
    settings: StreamSettings,
    /// Whether each of its groups (and detector keys) lives in one input partition: it groups
    /// by the column its input topic is keyed by, or holds no state. Such a query can keep one
    /// state per input partition.
    partition_local: bool,
    /// Whether each of its detectors and `LAG`s, if any, is above its windows and keyed by
    /// every group key of them (and more): its keys' state then lives where the groups do,
    /// in stage 2 of a repartitioned query as in one state for all partitions.
    series_follow_groups: bool,
    source: Arc<StreamTable>,
    sink: Option<Arc<StreamTable>>,
    feed: Feed,
    lower: ReusedPlan,
    windowed: Option<Windowed>,
    /// When the source is read as a changelog: the latest row of each key.
    upsert: Option<UpsertState>,
    /// Over a changelog whose plan below the windows reads reference tables: the versions
    /// it runs with, so that a superseded row is withdrawn from the windows as it was added
    /// (see [`StreamQuery::repin`]).
    pinning: Option<super::lookup::Pinning>,
    task_ctx: Arc<TaskContext>,
    watermarks: WatermarkTracker,
    time_column: Option<String>,
    early_fire_ms: Option<i64>,
    /// Rows of the run [`StreamQuery::process_run`] is given that the rows before them in
    /// their micro-batch made late (row, the watermark they made), found by
    /// [`StreamQuery::cuts`]; taken by the run's `admit`.
    forced_late: Vec<(u32, i64)>,
    last_early_fire_ms: i64,
    output_schema: SchemaRef,
    /// In stage 2 of a repartitioned query, (partitions, this one): only rows of the groups
    /// that belong to this partition are aggregated.
    owner: Option<(u32, u32)>,
    /// Per end of the last window an admitted row belongs to: the smallest input offset per
    /// partition. An offset is safe to commit once no unevicted window needs its row.
    held: std::collections::BTreeMap<i64, HashMap<i32, i64>>,
    /// State of the detectors, health checks and alert machines, per key.
    keyed: Vec<KeyedHandle>,
    /// State of the `LAG` calls, per key.
    lags: Vec<crate::state::lag::LagState>,
    /// When it joins two streams: the join, which feeds `lower` with pairs.
    join: Option<Box<super::join::JoinInput>>,
    /// When it reads a union of streams: the branches, which feed `lower` with their rows.
    union: Option<Box<super::union::UnionInput>>,
    /// When it takes `LAG`, detectors or alert machines over the stream's events: `lower`'s
    /// rows, waiting for the watermark to be released in time order.
    ordered: Option<Box<super::ordered::Ordered>>,
    /// The input watermark at which the last tick left it with nothing more due: until it
    /// takes input or the watermark moves, a tick has nothing to do (its timers are in event
    /// time, early fires aside).
    settled: Option<Option<i64>>,
    /// How many times its state may have changed: a checkpoint with the same count (and the
    /// same input positions) as the last would write the same state again.
    changes: u64,
    /// What its rows have shown of a function's errors: see [`Unproven`].
    unproven: Unproven,
}

/// Rows a function failed on before the plan first ran through a row, in row order.
/// A function that refuses its arguments as written (a constant) fails every row; one that
/// fails on a row's value fails that row. The plan is taken to refuse its constants when
/// the first [`UNPROVEN_ROWS`] rows it meets all fail in a function (the query fails with
/// the error; rows failed on a value, as a cast, count neither way); before that, and once
/// one row has passed, a failed row goes to the DLQ. It is counted in row order and kept in
/// the checkpoint, so neither how the rows are cut into micro-batches nor a restart changes
/// the outcome.
#[derive(Debug, Clone, Copy)]
enum Unproven {
    /// This many rows failed in a function, none passed.
    Failed(u64),
    /// A row passed: function errors are the rows' own from now on.
    Passed,
}

/// See [`Unproven`].
const UNPROVEN_ROWS: u64 = 32;

impl StreamQuery {
    /// The SQL it was planned from.
    pub fn sql(&self) -> &str {
        &self.sql
    }

    /// Whether input deleted before it was read is skipped and recorded as a gap
    /// (`urbanstream.on_data_loss = 'skip'`) rather than failing the query.
    pub fn skips_data_loss(&self) -> bool {
        self.settings.on_data_loss.trim() == "skip"
    }

    /// How it runs, for `POST /v1/queries/explain`: its source and sink, each stage (the plan
    /// run per micro-batch, the window and its state, keyed detectors, the plan run per
    /// emission), how it keeps state across partitions, and when it emits.
    pub fn explain(&self) -> serde_json::Value {
        use datafusion::physical_plan::displayable;
        let plan = |p: &Arc<dyn ExecutionPlan>| displayable(p.as_ref()).indent(false).to_string();
        let mut stages = Vec::new();
        if let Some(j) = &self.join {
            let spec = j.state.spec();
            for side in 0..2 {
                stages.push(serde_json::json!({
                    "stage": if side == 0 { "join: left side, per batch" } else { "join: right side, per batch" },
                    "reads": j.tables[side],
                    "plan": plan(&j.sides[side].0),
                }));
            }
            stages.push(serde_json::json!({
                "stage": "interval join",
                "join_type": spec.join_type.to_string(),
                "keys": spec.on.iter().map(|(l, r)| format!("{l} = {r}")).collect::<Vec<_>>(),
                "condition": spec.filter.as_ref().map(|f| f.expression().to_string()),
                "right_minus_left_ms": [spec.lo, spec.hi],
                "state": "each side's rows, indexed by key, until the other side's watermark \
                          passes the last time they can meet",
                "emits": "each pair once, when the later of its rows arrives; an outer join's \
                          unmatched rows with nulls when they are evicted",
            }));
        }
        if let Some(u) = &self.union {
            for (plan_of_branch, _, table) in &u.branches {
                stages.push(serde_json::json!({
                    "stage": "union: branch, per batch",
                    "reads": table,
                    "plan": plan(plan_of_branch),
                }));
            }
        }
        stages.push(serde_json::json!({
            "stage": "per batch",
            "does": if self.union.is_some() {
                "filters, projections and lookup joins over the union's rows"
            } else if self.join.is_some() {
                "filters, projections and lookup joins over the joined rows"
            } else {
                "filters, projections and lookup joins over each micro-batch of the stream"
            },
            "plan": plan(&self.lower),
        }));
        if let Some(o) = &self.ordered {
            stages.push(serde_json::json!({
                "stage": "in event-time order",
                "does": "holds the rows until the watermark passes their event time, then \
                         takes them sorted by it through LAG, detectors and alert machines \
                         (late rows to the late topic)",
                "plan": plan(&o.upper),
            }));
        }
        let lateness = parse_setting("", &self.settings.allowed_lateness)
            .ok()
            .flatten()
            .unwrap_or_default()
            .as_millis() as u64;
        if let Some(bottom) = &self.windowed {
            for (i, w) in bottom.stages().enumerate() {
                let (kind, window) = match w.spec {
                    WindowSpec::Tumble { width, offset } => (
                        "tumble",
                        serde_json::json!({"size_ms": width, "offset_ms": offset}),
                    ),
                    WindowSpec::Hop { slide, size } => (
                        "hop",
                        serde_json::json!({"size_ms": size, "slide_ms": slide}),
                    ),
                    WindowSpec::Cumulate { step, max } => (
                        "cumulate",
                        serde_json::json!({"step_ms": step, "max_ms": max}),
                    ),
                    WindowSpec::Session { gap } => ("session", serde_json::json!({"gap_ms": gap})),
                };
                let state = if w.sessions {
                    "per group key and session: DataFusion accumulators, merged when sessions meet"
                } else if i > 0 {
                    "per window: the rows of the stage below it (a revision below replaces its \
                     row, a retraction deletes it), aggregated afresh on emission"
                } else {
                    "per pane and group: DataFusion's partial aggregation state (GroupValues and \
                     GroupsAccumulator), merged into windows on emission"
                };
                let mut stage = serde_json::json!({
                    "stage": if i == 0 { "window" } else { "window over the window below" },
                    "kind": kind,
                    "window": window,
                    "group_keys": w.groups.iter().map(|g| g.to_string()).collect::<Vec<_>>(),
                    "state": state,
                    "emits": format!(
                        "when the watermark passes a window's end (revision 0, is_final); late \
                         events within {lateness} ms of allowed lateness re-emit the window's \
                         changed groups as revisions{}{}",
                        self.early_fire_ms
                            .map(|e| format!("; partial results every {e} ms (is_final false)"))
                            .unwrap_or_default(),
                        if w.sessions {
                            "; a merged or earlier-starting session retracts its published row \
                             (op = 'retract')"
                        } else {
                            ""
                        }
                    ),
                });
                if w.ranked.is_some() {
                    stage["ranks"] = "the groups of each window that emits, afresh over all of \
                        them (top-N per window); rows that entered the result are published, \
                        rows that left it retracted; the window's groups are kept until it can \
                        no longer be revised"
                        .into();
                }
                if w.next.is_some() {
                    stage["passes_on"] = "its rows, as a changelog, to the window above it in the \
                        same step (no topic between them)"
                        .into();
                }
                stages.push(stage);
            }
        }
        for l in &self.lags {
            stages.push(serde_json::json!({
                "stage": "lag",
                "keys": l.keys.iter().map(|k| k.to_string()).collect::<Vec<_>>(),
                "state": "per key, its last values (as many as the largest offset), in \
                          event-time order of the windows' rows",
            }));
        }
        for k in &self.keyed {
            stages.push(serde_json::json!({
                "stage": "keyed",
                "functions": k.functions(),
                "state": "per key, in event-time order; silent keys dropped after urbanstream.key_ttl",
                "timers": k.has_timers(),
            }));
        }
        if let Some(w) = &self.windowed {
            for (i, w) in w.stages().enumerate() {
                stages.push(serde_json::json!({
                    "stage": "per emission",
                    "window": i + 1,
                    "does": if w.next.is_some() {
                        "projections, filters and lookup joins from this window's rows to the \
                         input of the window above"
                    } else {
                        "projection, HAVING and keyed functions over each window's rows"
                    },
                    "plan": plan(w.emission_plan()),
                }));
            }
        }
        let partitioning = if self.partition_local {
            "per_partition: one state per input partition (the groups include the topic's key)"
        } else if self.is_repartitionable() {
            "repartitioned: records are sent through an internal topic keyed by the group keys"
        } else if self.windowed.is_none()
            && self.keyed.is_empty()
            && self.lags.is_empty()
            && self.join.is_none()
        {
            "stateless"
        } else {
            "single: one state for all partitions, in one process of the group"
        };
        serde_json::json!({
            "source": {
                "table": self.source.name,
                "topic": self.source.options.topic,
                "event_time": self.source.options.event_time,
                "watermark_delay_ms": self.source.options.watermark_delay.as_millis() as u64,
                "key": self.source.options.key,
            },
            "also_reads": self.union.as_ref().map(|u| u.others.iter().map(|o| serde_json::json!({
                "table": o.table.name,
                "topic": o.table.options.topic,
                "event_time": o.table.options.event_time,
                "watermark_delay_ms": o.table.options.watermark_delay.as_millis() as u64,
            })).collect::<Vec<_>>()),
            "joins": self.join.as_ref().and_then(|j| j.right.as_ref()).map(|r| serde_json::json!({
                "table": r.name,
                "topic": r.options.topic,
                "event_time": r.options.event_time,
                "watermark_delay_ms": r.options.watermark_delay.as_millis() as u64,
            })),
            "sink": self.sink.as_ref().map(|s| serde_json::json!({
                "table": s.name,
                "topic": s.options.topic,
            })),
            "stages": stages,
            "partitioning": partitioning,
            "allowed_lateness_ms": lateness,
        })
    }

    /// What its state holds, a line per part: what it reads and writes, how its state is
    /// split across partitions, each window stage's aggregation ([`AggregateSpec::layout`]),
    /// the detectors, `LAG` calls, join and buffers. A checkpoint is restored into changed SQL
    /// only when the two layouts are equal: the state then means the same to the new query
    /// (a changed filter, projection, `HAVING` or output column keeps it; a changed window,
    /// group key, aggregate, detector or sink does not).
    ///
    /// [`AggregateSpec::layout`]: crate::state::window::AggregateSpec::layout
    pub fn state_layout(&self) -> Vec<String> {
        use crate::state::expr_layout;
        let fields = |schema: &SchemaRef| {
            schema
                .fields()
                .iter()
                .map(|f| format!("{} {}", f.name(), f.data_type()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let partitioning = if self.partition_local {
            "one state per input partition"
        } else if self.is_repartitionable() {
            "one state per partition of its repartition topic"
        } else {
            "one state for all partitions"
        };
        let mut tables = vec![self.source.name.clone()];
        if let Some(u) = &self.union {
            tables.extend(u.others.iter().map(|o| o.table.name.clone()));
        }
        if let Some(r) = self.join.as_ref().and_then(|j| j.right.as_ref()) {
            tables.push(r.name.clone());
        }
        let mut out = vec![
            format!("reads {}", tables.join(", ")),
            format!(
                "writes {}",
                self.sink
                    .as_ref()
                    .map_or("nothing".to_string(), |s| s.options.topic.clone())
            ),
            format!("keeps {partitioning}"),
        ];
        if self.upsert.is_some() {
            out.push("the latest row per key of its changelog source".into());
        }
        if let Some(j) = &self.join {
            let spec = j.state.spec();
            out.push(format!(
                "{} join on {} where {} with right minus left time in [{}, {}] ms, left ({}), right ({})",
                spec.join_type,
                spec.on
                    .iter()
                    .map(|(l, r)| format!("{} = {}", expr_layout(l), expr_layout(r)))
                    .collect::<Vec<_>>()
                    .join(" AND "),
                spec.filter
                    .as_ref()
                    .map_or("true".to_string(), |f| expr_layout(f.expression())),
                spec.lo,
                spec.hi,
                fields(&spec.sides[0]),
                fields(&spec.sides[1]),
            ));
        }
        if let Some(o) = &self.ordered {
            out.push(format!(
                "rows in event-time order of ({})",
                fields(&o.schema)
            ));
        }
        if let Some(bottom) = &self.windowed {
            let ms = |value: &str| {
                parse_setting("", value)
                    .ok()
                    .flatten()
                    .map_or("none".to_string(), |d| format!("{} ms", d.as_millis()))
            };
            out.push(format!(
                "allowed lateness {}, early results {}",
                ms(&self.settings.allowed_lateness),
                ms(&self.settings.early_fire)
            ));
            for (i, w) in bottom.stages().enumerate() {
                out.push(format!(
                    "window {}: {}, window column {}{}{}",
                    i + 1,
                    w.operator.spec().layout(),
                    w.window_position,
                    if w.holds_rows() { ", keeping rows" } else { "" },
                    if w.ranked.is_some() { ", ranked" } else { "" }
                ));
            }
        }
        for l in &self.lags {
            out.push(format!(
                "LAG per ({}) of {}",
                l.keys
                    .iter()
                    .map(|k| expr_layout(k))
                    .collect::<Vec<_>>()
                    .join(", "),
                l.types
                    .iter()
                    .map(DataType::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        for k in &self.keyed {
            out.push(format!("detectors {}", k.layout()));
        }
        // What the columns a window aggregates and a detector reads mean: a column computed
        // in a subquery (`SELECT speed_kmh * 1000 AS v`) keeps its name when its meaning
        // changes.
        if self.windowed.is_some() {
            out.push(format!("windows read {}", lineage_of(&self.lower)));
        }
        let mut plans: Vec<&Arc<dyn ExecutionPlan>> = vec![&self.lower];
        if let Some(w) = &self.windowed {
            plans.extend(w.stages().map(|s| s.emission_plan()));
        }
        if let Some(o) = &self.ordered {
            plans.push(&o.upper);
        }
        for plan in plans {
            let _ = plan.apply(|node| {
                if node
                    .downcast_ref::<crate::state::keyed::KeyedSeriesExec>()
                    .is_some()
                    && let Some(input) = node.children().first()
                {
                    out.push(format!("detectors read {}", lineage_of(input)));
                }
                Ok(TreeNodeRecursion::Continue)
            });
        }
        // State kept as rows of a plan's schema (rows of a changelog to withdraw through the
        // plan above them, ranked rows, the rows of a stage below, a detector's last row for
        // its timers, LAG's values) is read back only by the same plans.
        let rows = self.upsert.is_some()
            || !self.lags.is_empty()
            || self.keyed.iter().any(KeyedHandle::has_timers)
            || self
                .windowed
                .as_ref()
                .is_some_and(|w| w.stages().any(super::chain::Windowed::holds_rows));
        if rows {
            use datafusion::physical_plan::displayable;
            let plan = |p: &Arc<dyn ExecutionPlan>| {
                displayable(p.as_ref())
                    .indent(false)
                    .to_string()
                    .lines()
                    .map(str::trim)
                    .collect::<Vec<_>>()
                    .join(" <- ")
            };
            let mut plans = vec![plan(&self.lower)];
            if let Some(w) = &self.windowed {
                plans.extend(w.stages().map(|s| plan(s.emission_plan())));
            }
            if let Some(o) = &self.ordered {
                plans.push(plan(&o.upper));
            }
            out.push(format!("rows kept under the plans {}", plans.join(" | ")));
        }
        out
    }

    /// The topics it reads and writes, with what keys their records and which column is
    /// their event time: what its state's positions and partitions belong to, declared
    /// beside the statement (`CREATE EXTERNAL TABLE`), so that a change of them is not a
    /// change of its SQL. A table's other options (delays, format, fields) may change.
    pub fn tables_identity(&self) -> Vec<String> {
        let line = |role: &str, t: &StreamTable| {
            let o = &t.options;
            format!(
                "{role} {}: topic {}, keyed by {}, event time {}{}",
                t.name,
                o.topic,
                o.key.as_deref().unwrap_or("-"),
                o.event_time.as_deref().unwrap_or("-"),
                if o.upsert_key.is_empty() {
                    String::new()
                } else {
                    format!(", a changelog by {}", o.upsert_key.join(", "))
                }
            )
        };
        let mut out: Vec<String> = self.inputs().iter().map(|t| line("reads", t)).collect();
        if let Some(sink) = &self.sink {
            out.push(line("writes", sink));
        }
        out
    }

    /// Whether it can keep one state per input partition: every window group (and every key
    /// of its detectors) includes the column its input topic is keyed by (the source's `key`
    /// option), or it holds no state at all. A query grouping by anything else needs all of
    /// its input in one state.
    pub fn is_partition_local(&self) -> bool {
        self.partition_local
    }

    /// The column its input's records must be keyed by for its state to be kept per input
    /// partition: the source's `key`, when it keeps state per partition. A record keyed
    /// otherwise may sit in another partition than its group's other records.
    pub fn placed_by(&self) -> Option<&str> {
        let stateful = self.windowed.is_some() || !self.keyed.is_empty() || !self.lags.is_empty();
        if self.partition_local && stateful {
            self.source.options.key.as_deref()
        } else {
            None
        }
    }

    /// The `SET urbanstream.…` statements that give a session the settings this query was
    /// planned with.
    pub fn settings_sql(&self) -> Vec<String> {
        settings_sql(&self.settings)
    }

    /// Plans this query again in `ctx`, the context it was planned in, with the settings it
    /// was planned with: a new instance of it with empty state.
    pub fn replan<'a>(
        &self,
        ctx: &'a StreamContext,
    ) -> impl Future<Output = Result<StreamQuery>> + Send + 'a {
        let sql = self.sql.clone();
        let settings = self.settings_sql();
        // Planned like a client's SQL: on a planning thread, not on the runtime's workers.
        let ctx = ctx.clone();
        super::sandbox::on_planning_thread(move || async move {
            let ctx = &ctx;
            for set in settings {
                for statement in StreamContext::parse(&set)? {
                    ctx.plan(statement).await?;
                }
            }
            let mut statements = StreamContext::parse(&sql)?;
            match (statements.pop(), statements.is_empty()) {
                (Some(statement), true) => match ctx.plan(statement).await? {
                    Some(query) => Ok(query),
                    None => plan_err!("internal: query text planned to no query: {sql}"),
                },
                _ => plan_err!("internal: query text is not one statement: {sql}"),
            }
        })
    }

    /// Makes this instance stage 2 of a repartitioned query for partition `partition` of
    /// `partitions`: after its joins and filters it keeps only the rows of its own groups.
    pub fn set_owner(&mut self, partitions: u32, partition: u32) {
        self.touch();
        self.owner = Some((partitions, partition));
    }

    /// Makes input partitions `0..inputs` hold the watermark back from processing time
    /// `now_ms` until each has delivered or gone idle (stage 2 of a repartitioned query,
    /// which hears from every input partition through the repartition topic).
    pub fn expect_inputs(&mut self, inputs: u32, now_ms: i64) {
        for p in 0..inputs {
            self.expect_partition(p as i32, now_ms);
        }
    }

    /// Makes input `partition` hold the watermark back from processing time `now_ms` until
    /// it has delivered or gone idle: a partition just assigned, whose backlog may be older
    /// than what the others have delivered, does not find its records late on arrival.
    pub fn expect_partition(&mut self, partition: i32, now_ms: i64) {
        self.touch();
        self.watermarks.expect(partition, now_ms);
    }

    /// [`StreamQuery::expect_partition`] for partition `partition` of input topic `topic`
    /// (of whichever of its input streams reads it).
    pub fn expect_topic_partition(&mut self, topic: &str, partition: i32, now_ms: i64) {
        self.touch();
        if self.source.options.topic == topic {
            self.watermarks.expect(partition, now_ms);
        }
        if let Some(j) = &mut self.join
            && j.right.as_ref().is_some_and(|r| r.options.topic == topic)
        {
            j.right_watermarks.expect(partition, now_ms);
        }
        if let Some(u) = &mut self.union {
            for o in &mut u.others {
                if o.table.options.topic == topic {
                    o.watermarks.expect(partition, now_ms);
                }
            }
        }
    }

    /// Whether it can be repartitioned: it aggregates over windows in one stage, and its
    /// detectors and `LAG`s, if any, are over the windows' rows and keyed by every group key
    /// (keys of their own would need their own partitioning). A window over a window
    /// groups by other keys than the one below, so it runs in one state unless every stage
    /// groups by the input topic's key.
    pub fn is_repartitionable(&self) -> bool {
        self.windowed
            .as_ref()
            .is_some_and(|w| w.next.is_none() && w.ranked.is_none())
            && self.series_follow_groups
            && self.upsert.is_none()
            && self.join.is_none()
            && self.union.is_none()
    }

    /// Records that input `partition` has seen events up to `max_event_ms` (a progress record
    /// of a repartition topic) at processing time `now_ms`.
    pub fn observe(&mut self, partition: i32, max_event_ms: i64, now_ms: i64) {
        self.touch();
        self.watermarks.observe(partition, max_event_ms, now_ms);
    }

    /// Whether every input partition it has seen has been silent for the idle timeout at
    /// processing time `now_ms` (`None` before any event).
    pub fn is_idle(&self, now_ms: i64) -> Option<bool> {
        self.watermarks.is_idle(now_ms)
    }

    /// Whether none of its inputs (its stream, the stream it joins, the streams of its union)
    /// has delivered within its idle timeout at processing time `now_ms`: its watermark holds
    /// until one does. An input whose tracker knows no partition yet counts as quiet; one
    /// expecting partitions that have delivered nothing is quiet only once the idle timeout
    /// has passed.
    pub fn inputs_quiet(&self, now_ms: i64) -> bool {
        let right = self
            .join
            .as_ref()
            .filter(|j| j.right.is_some())
            .map(|j| &j.right_watermarks);
        let others = self
            .union
            .iter()
            .flat_map(|u| &u.others)
            .map(|o| &o.watermarks);
        std::iter::once(&self.watermarks)
            .chain(right)
            .chain(others)
            .all(|w| w.is_idle(now_ms) != Some(false))
    }

    /// The stream it reads.
    pub fn source(&self) -> &Arc<StreamTable> {
        &self.source
    }

    /// The stream it writes, for `INSERT INTO`.
    pub fn sink(&self) -> Option<&Arc<StreamTable>> {
        self.sink.as_ref()
    }

    /// Schema of its result rows (windowed queries end with `revision` and `is_final`).
    pub fn output_schema(&self) -> SchemaRef {
        self.output_schema.clone()
    }

    /// Whether it keeps state between micro-batches (windows, detectors, alert machines).
    pub fn holds_state(&self) -> bool {
        self.windowed.is_some()
            || !self.keyed.is_empty()
            || !self.lags.is_empty()
            || self.join.is_some()
            || self.ordered.is_some()
    }

    /// Whether it aggregates over windows.
    pub fn is_windowed(&self) -> bool {
        self.windowed.is_some()
    }

    /// The rest of a step's results while [`StreamQuery::is_due`], added to `out`: for
    /// callers that keep every result anyway (tests, evaluations). A service publishes each
    /// part before asking for the next.
    pub async fn finish_step(&mut self, now_ms: i64, out: &mut StepOutput) -> Result<()> {
        while self.is_due() {
            let more = self.tick(now_ms).await?;
            out.append(more);
        }
        Ok(())
    }

    /// Emits what the steps before left due ([`StreamQuery::is_due`]) into `out`, before a
    /// step takes new rows: none may reach windows closed but not yet emitted. (A caller
    /// that publishes part by part has nothing left here; a micro-batch cut into runs, each
    /// a step of its own, holds the results of the runs before its last together.)
    async fn emit_rest(&mut self, now_ms: i64, out: &mut StepOutput) -> Result<()> {
        while self.is_due() {
            self.emit(now_ms, out).await?;
        }
        Ok(())
    }

    /// Whether the last step left closed windows' results to emit: a step returns a
    /// bounded amount of them ([`crate::state::window::EMIT_BUDGET`] a stage), however many
    /// windows the watermark closed. Until it is false, call [`StreamQuery::tick`] (each
    /// call gives the next part) and give the query no new input, which the windows not yet
    /// emitted would otherwise take as if still open.
    pub fn is_due(&self) -> bool {
        let mut stage = self.windowed.as_ref();
        while let Some(w) = stage {
            if w.operator.due() {
                return true;
            }
            stage = w.next.as_deref().map(|n| &n.stage);
        }
        false
    }

    /// The query watermark, once any event has been seen.
    pub fn watermark(&self) -> Option<i64> {
        let left = self.watermarks.current();
        if let Some(u) = &self.union {
            // The union's own once it has one: the lowest of its streams that are not idle,
            // never moving back (what lateness is decided by).
            if u.watermark.is_some() {
                return u.watermark;
            }
            return std::iter::once(left)
                .chain(u.others.iter().map(|o| o.watermarks.current()))
                .flatten()
                .min();
        }
        match &self.join {
            Some(j) => j.output_watermark([
                left,
                match &j.right {
                    Some(_) => j.right_watermarks.current(),
                    None => left,
                },
            ]),
            None => left,
        }
    }

    /// The names of its input streams, for messages (`camera_events, detector_readings`).
    pub fn input_names(&self) -> String {
        self.inputs()
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The stream tables it reads: its source, and the other stream it joins.
    pub fn inputs(&self) -> Vec<&Arc<StreamTable>> {
        let mut out = vec![&self.source];
        if let Some(r) = self.join.as_ref().and_then(|j| j.right.as_ref()) {
            out.push(r);
        }
        if let Some(u) = &self.union {
            out.extend(u.others.iter().map(|o| &o.table));
        }
        out
    }

    /// Whether it reads stream table `table`.
    pub fn reads(&self, table: &str) -> bool {
        self.inputs().iter().any(|t| t.name == table)
    }

    /// Whether it reads Kafka topic `topic`.
    pub fn reads_topic(&self, topic: &str) -> bool {
        self.inputs().iter().any(|t| t.options.topic == topic)
    }

    /// Raises the watermark of input `table` to `watermark` explicitly and emits what that
    /// closes.
    pub async fn advance_watermark_of(
        &mut self,
        table: &str,
        watermark: i64,
        now_ms: i64,
    ) -> Result<StepOutput> {
        self.touch();
        if table == self.source.name {
            self.watermarks.force(watermark);
        }
        if let Some(j) = &mut self.join
            && j.right.as_ref().is_some_and(|r| r.name == table)
        {
            j.right_watermarks.force(watermark);
        }
        if let Some(u) = &mut self.union {
            for o in &mut u.others {
                if o.table.name == table {
                    o.watermarks.force(watermark);
                }
            }
        }
        self.tick(now_ms).await
    }

    /// Entries held in state: (window, group) partials, and keys of detectors and alerts.
    pub fn state_groups(&self) -> usize {
        self.windowed.as_ref().map_or(0, Windowed::group_count)
            + self
                .keyed
                .iter()
                .map(|k| k.with_store(|s| s.len()).unwrap_or(0))
                .sum::<usize>()
            + self.lags.iter().map(|l| l.handle.len()).sum::<usize>()
            + self.upsert.as_ref().map_or(0, UpsertState::len)
            + self.join.as_ref().map_or(0, |j| j.state.rows())
            + self.ordered.as_ref().map_or(0, |o| o.rows())
    }

    /// Bytes held in state: window and session partials with their emission bookkeeping,
    /// detector and alert state per key, and the offsets held back for open windows.
    pub fn state_bytes(&self) -> usize {
        let held: usize = self
            .held
            .values()
            .map(|p| 16 + p.len() * (std::mem::size_of::<(i32, i64)>() + 8))
            .sum();
        self.windowed.as_ref().map_or(0, Windowed::state_bytes)
            + self
                .keyed
                .iter()
                .map(|k| k.with_store(|s| s.bytes()).unwrap_or(0))
                .sum::<usize>()
            + self.lags.iter().map(|l| l.handle.bytes()).sum::<usize>()
            + self.upsert.as_ref().map_or(0, UpsertState::bytes)
            + self.join.as_ref().map_or(0, |j| j.state.bytes())
            + self.ordered.as_ref().map_or(0, |o| o.bytes())
            + held
    }

    /// Keys of detectors and alerts dropped after staying silent for `urbanstream.key_ttl`.
    pub fn keys_expired(&self) -> u64 {
        self.keyed
            .iter()
            .map(|k| k.with_store(|s| s.expired()).unwrap_or(0))
            .sum::<u64>()
            + self.lags.iter().map(|l| l.handle.expired()).sum::<u64>()
    }

    /// Per partition, the oldest input offset a window not yet evicted (or a row held for the
    /// watermark) still needs. Offsets before it are safe to commit once this step's outputs
    /// are acknowledged.
    pub fn held_offsets(&self) -> HashMap<i32, i64> {
        let mut out: HashMap<i32, i64> = HashMap::new();
        for partitions in self.held.values() {
            for (&p, &o) in partitions {
                out.entry(p).and_modify(|m| *m = (*m).min(o)).or_insert(o);
            }
        }
        out
    }

    /// Per partition of input topic `topic`, the oldest offset the query's state still needs
    /// (open windows, rows a join holds, rows held for the watermark).
    pub fn held_offsets_of(&self, topic: &str) -> HashMap<i32, i64> {
        let mut out = HashMap::new();
        let merge =
            |out: &mut HashMap<i32, i64>,
             held: &std::collections::BTreeMap<i64, HashMap<i32, i64>>| {
                for partitions in held.values() {
                    for (&p, &o) in partitions {
                        out.entry(p)
                            .and_modify(|m: &mut i64| *m = (*m).min(o))
                            .or_insert(o);
                    }
                }
            };
        if self.source.options.topic == topic {
            merge(&mut out, &self.held);
            if let Some(j) = &self.join {
                j.state.held_offsets(0, &mut out);
                if j.right.is_none() {
                    j.state.held_offsets(1, &mut out);
                }
            }
        }
        if let Some(j) = &self.join
            && j.right.as_ref().is_some_and(|r| r.options.topic == topic)
        {
            merge(&mut out, &j.held_right);
            j.state.held_offsets(1, &mut out);
        }
        if let Some(u) = &self.union {
            for o in &u.others {
                if o.table.options.topic == topic {
                    merge(&mut out, &o.held);
                }
            }
        }
        out
    }

    /// The query's state at processing time `now_ms`, for a checkpoint: its watermark,
    /// window state (`window.*` tables) and keyed detector state (`keyed<i>.*`).
    pub fn snapshot(&mut self, now_ms: i64) -> crate::Result<StateSnapshot> {
        let held: Vec<(i64, Vec<(i32, i64)>)> = self
            .held
            .iter()
            .map(|(end, p)| (*end, p.iter().map(|(a, b)| (*a, *b)).collect()))
            .collect();
        let mut out = StateSnapshot {
            meta: serde_json::json!({
                "watermarks": self.watermarks.snapshot(now_ms),
                "last_early_fire_ms": self.last_early_fire_ms,
                "failed_before_a_row_passed": match self.unproven {
                    Unproven::Failed(n) => Some(n),
                    Unproven::Passed => None,
                },
                "held": held,
                "keyed": self.keyed.len(),
                "lags": self.lags.len(),
            }),
            ..Default::default()
        };
        if let Some(w) = &mut self.windowed {
            w.snapshot(&mut out)?;
        }
        if let Some(u) = &mut self.upsert {
            out.nest("upsert", u.snapshot()?);
        }
        // The reference tables' versions the rows in the windows were computed with.
        if let (Some(p), Some(meta)) = (&self.pinning, out.meta.as_object_mut()) {
            meta.insert("pinned".into(), serde_json::json!(p.versions()));
        }
        for (i, k) in self.keyed.iter().enumerate() {
            out.nest(&format!("keyed{i}"), k.snapshot()?);
        }
        for (i, l) in self.lags.iter().enumerate() {
            out.nest(&format!("lag{i}"), l.handle.snapshot(&l.types)?);
        }
        if let Some(j) = &self.join {
            let mut state = j.state.snapshot()?;
            let held: Vec<(i64, Vec<(i32, i64)>)> = j
                .held_right
                .iter()
                .map(|(end, p)| (*end, p.iter().map(|(a, b)| (*a, *b)).collect()))
                .collect();
            if let Some(meta) = state.meta.as_object_mut() {
                meta.insert(
                    "right_watermarks".into(),
                    j.right_watermarks.snapshot(now_ms),
                );
                meta.insert("held_right".into(), serde_json::json!(held));
            }
            out.nest("join", state);
        }
        if let Some(o) = &self.ordered {
            out.nest("ordered", o.snapshot()?);
        }
        if let Some(u) = &self.union {
            let inputs: Vec<serde_json::Value> = u
                .others
                .iter()
                .map(|o| {
                    let held: Vec<(i64, Vec<(i32, i64)>)> = o
                        .held
                        .iter()
                        .map(|(end, p)| (*end, p.iter().map(|(a, b)| (*a, *b)).collect()))
                        .collect();
                    serde_json::json!({
                        "table": o.table.name,
                        "watermarks": o.watermarks.snapshot(now_ms),
                        "held": held,
                    })
                })
                .collect();
            if let Some(meta) = out.meta.as_object_mut() {
                meta.insert("union".into(), serde_json::json!(inputs));
                meta.insert("union_watermark".into(), serde_json::json!(u.watermark));
            }
        }
        Ok(out)
    }

    /// Replaces the query's state with a [`StreamQuery::snapshot`] of the same query, at
    /// processing time `now_ms`.
    pub fn restore(&mut self, snapshot: &StateSnapshot, now_ms: i64) -> crate::Result<()> {
        self.touch();
        if !snapshot.deferred.is_empty() {
            return Err(crate::Error::Checkpoint(
                "internal: a snapshot restored before its state was read out (resolve it, or \
                 write and read it back)"
                    .into(),
            ));
        }
        let meta = &snapshot.meta;
        let keyed: usize = meta_field(meta, "keyed")?;
        if keyed != self.keyed.len()
            || snapshot.meta.get("window").is_some() != self.windowed.is_some()
        {
            return Err(crate::Error::Checkpoint(format!(
                "the state's shape ({keyed} keyed states, windowed: {}) is not this query's",
                snapshot.meta.get("window").is_some()
            )));
        }
        let watermarks = meta
            .get("watermarks")
            .ok_or_else(|| crate::Error::Checkpoint("state lacks the watermark".into()))?;
        self.watermarks
            .restore(watermarks, now_ms)
            .ok_or_else(|| crate::Error::Checkpoint("unreadable watermark state".into()))?;
        self.last_early_fire_ms = meta_field(meta, "last_early_fire_ms")?;
        // A state written before this was kept: its query had run.
        self.unproven = match meta.get("failed_before_a_row_passed") {
            Some(serde_json::Value::Number(n)) => Unproven::Failed(n.as_u64().unwrap_or(0)),
            _ => Unproven::Passed,
        };
        let held: Vec<(i64, Vec<(i32, i64)>)> = meta_field(meta, "held")?;
        self.held = held
            .into_iter()
            .map(|(end, p)| (end, p.into_iter().collect()))
            .collect();
        if let Some(w) = &mut self.windowed {
            w.restore(snapshot)?;
        }
        if let Some(u) = &mut self.upsert {
            u.restore(&snapshot.nested("upsert"))?;
        }
        if let Some(p) = &mut self.pinning
            && let Some(versions) = meta
                .get("pinned")
                .and_then(|v| serde_json::from_value(v.clone()).ok())
        {
            p.restore(&versions);
        }
        for (i, k) in self.keyed.iter().enumerate() {
            k.restore(&snapshot.nested(&format!("keyed{i}")))?;
        }
        let lags = meta
            .get("lags")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        if lags != self.lags.len() as u64 {
            return Err(crate::Error::Checkpoint(format!(
                "the state holds {lags} LAG states, the query {}",
                self.lags.len()
            )));
        }
        for (i, l) in self.lags.iter().enumerate() {
            l.handle
                .restore(&snapshot.nested(&format!("lag{i}")), l.types.len())?;
        }
        if let Some(j) = &mut self.join {
            let state = snapshot.nested("join");
            if state.meta.is_null() {
                return Err(crate::Error::Checkpoint(
                    "the state holds no join, the query joins two streams".into(),
                ));
            }
            j.state.restore(&state)?;
            if let Some(w) = state.meta.get("right_watermarks") {
                j.right_watermarks.restore(w, now_ms).ok_or_else(|| {
                    crate::Error::Checkpoint("unreadable watermark state of the join".into())
                })?;
            }
            let held: Vec<(i64, Vec<(i32, i64)>)> = meta_field(&state.meta, "held_right")?;
            j.held_right = held
                .into_iter()
                .map(|(end, p)| (end, p.into_iter().collect()))
                .collect();
        }
        if let Some(o) = &mut self.ordered {
            o.restore(&snapshot.nested("ordered"))?;
        }
        if let Some(u) = &mut self.union {
            let inputs: Vec<serde_json::Value> = meta_field(meta, "union")?;
            // Checkpoints taken before it was kept: none, taken up again at the next step.
            u.watermark = meta
                .get("union_watermark")
                .and_then(serde_json::Value::as_i64);
            for o in &mut u.others {
                let Some(state) = inputs
                    .iter()
                    .find(|i| i.get("table").and_then(|t| t.as_str()) == Some(&o.table.name))
                else {
                    return Err(crate::Error::Checkpoint(format!(
                        "the state holds nothing of stream {}, which the query reads",
                        o.table.name
                    )));
                };
                o.watermarks
                    .restore(
                        state.get("watermarks").unwrap_or(&serde_json::Value::Null),
                        now_ms,
                    )
                    .ok_or_else(|| {
                        crate::Error::Checkpoint(format!(
                            "unreadable watermark state of {}",
                            o.table.name
                        ))
                    })?;
                let held: Vec<(i64, Vec<(i32, i64)>)> = meta_field(state, "held")?;
                o.held = held
                    .into_iter()
                    .map(|(end, p)| (end, p.into_iter().collect()))
                    .collect();
            }
        }
        pass_watermark(&self.keyed, self.watermark().unwrap_or(i64::MIN));
        Ok(())
    }

    /// Live windows.
    pub fn open_windows(&self) -> usize {
        self.windowed.as_ref().map_or(0, Windowed::window_count)
    }

    fn rename_outputs(&mut self, names: Vec<String>) -> Result<()> {
        let user_columns = self.output_schema.fields().len()
            - if self.is_windowed() {
                crate::sink::ENGINE_COLUMNS.len()
            } else {
                0
            };
        if names.len() != user_columns {
            return plan_err!(
                "INSERT lists {} columns but the SELECT produces {user_columns}",
                names.len()
            );
        }
        let mut fields: Vec<Field> = self
            .output_schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        for (f, n) in fields.iter_mut().zip(&names) {
            *f = f.clone().with_name(n);
        }
        self.output_schema = Arc::new(Schema::new(fields));
        Ok(())
    }

    /// Why a group's row of a window may be published more than once (revised or withdrawn),
    /// if it may.
    fn rows_change(&self) -> Result<Option<&'static str>> {
        if self.windowed.is_none() {
            return Ok(None);
        }
        if let Some(why) = self.withdraws_rows()? {
            return Ok(Some(why));
        }
        let lateness = parse_setting(
            "urbanstream.allowed_lateness",
            &self.settings.allowed_lateness,
        )?
        .is_some_and(|d| !d.is_zero());
        if lateness {
            return Ok(Some(
                "with urbanstream.allowed_lateness a window's row is published again, revised, \
                 as late rows come",
            ));
        }
        if parse_setting("urbanstream.early_fire", &self.settings.early_fire)?.is_some() {
            return Ok(Some(
                "with urbanstream.early_fire a window's row is published early and again when \
                 the window closes",
            ));
        }
        Ok(None)
    }

    /// Why the query publishes rows that withdraw rows it published (`op = 'retract'`), if
    /// it does.
    fn withdraws_rows(&self) -> Result<Option<&'static str>> {
        let Some(w) = &self.windowed else {
            return Ok(None);
        };
        let revises = parse_setting(
            "urbanstream.allowed_lateness",
            &self.settings.allowed_lateness,
        )?
        .is_some_and(|d| !d.is_zero())
            || parse_setting("urbanstream.early_fire", &self.settings.early_fire)?.is_some();
        let mut stage = Some(w);
        let mut below = false;
        while let Some(w) = stage {
            if w.sessions {
                return Ok(Some(
                    "a session window's rows are withdrawn when sessions merge or start earlier",
                ));
            }
            if w.operator.holds_rows() {
                return Ok(Some(
                    "a window over a changelog withdraws a row when the rows it was computed \
                     from are replaced",
                ));
            }
            if w.ranked.is_some() {
                return Ok(Some("a top-N result withdraws the rows that leave it"));
            }
            if revises && w.having.is_some() {
                return Ok(Some(
                    "with revisions (urbanstream.allowed_lateness or urbanstream.early_fire), a \
                     window's row that no longer passes HAVING (or a condition above a join of \
                     the window's rows) is withdrawn",
                ));
            }
            below |= revises;
            stage = w.next.as_deref().map(|c| &c.stage);
            if below && stage.is_some() {
                return Ok(Some(
                    "with revisions, a window's revision withdraws its earlier row from the \
                     window above",
                ));
            }
        }
        Ok(None)
    }

    fn check_sink(&mut self, sink: Arc<StreamTable>) -> Result<()> {
        if sink.options.topic.ends_with(".repartition") {
            return plan_err!(
                "topic {} is internal to the engine (a repartition topic): write to a topic of \
                 your own",
                sink.options.topic
            );
        }
        let has_op = sink
            .topic_schema
            .output_schema()
            .field_with_name("op")
            .is_ok_and(|f| matches!(f.data_type(), DataType::Utf8 | DataType::Utf8View));
        if !has_op && let Some(why) = self.withdraws_rows()? {
            return plan_err!(
                "sink {} has no op column: {why} (op = 'retract'), so its sink needs op VARCHAR \
                 beside window_start; consumers upsert by the group keys and window_start and \
                 delete on 'retract'",
                sink.name
            );
        }
        // A window's row published more than once must reach its consumers in order: rows
        // without a key would go to any partition. A sink without one is keyed by the
        // window's bound, so every row of a window goes to one partition; one keyed by an
        // aggregate's result would give each revision another key, and is refused.
        let mut options = sink.options.clone();
        if let Some(why) = self.rows_change()? {
            match &options.key {
                Some(key) => {
                    if let Some(w) = &self.windowed
                        && let Ok(i) = self.output_schema.index_of(key)
                        && w.stages()
                            .last()
                            .is_some_and(|s| s.aggregate_outputs.get(i) == Some(&true))
                    {
                        return plan_err!(
                            "sink {} is keyed by {key}, an aggregate's result: {why}, and each \
                             revision would carry another key to another partition of topic {}, \
                             where a consumer may read a window's earlier row after its later \
                             one. Key the sink by a GROUP BY column (OPTIONS ('key' '<group \
                             column>')), or by window_start",
                            sink.name,
                            sink.options.topic
                        );
                    }
                    options.keyless_in_order = true;
                }
                None => {
                    let sink_fields = sink.topic_schema.output_schema();
                    let Some(bound) = ["window_start", "window_end"].into_iter().find(|c| {
                        self.output_schema.field_with_name(c).is_ok()
                            && sink_fields.field_with_name(c).is_ok()
                    }) else {
                        return plan_err!(
                            "sink {} has no 'key': {why}, and without a key its rows go to any \
                             partition of topic {}, where a consumer may read a window's \
                             earlier row after its later one and keep the wrong one. Declare the \
                             key in the sink's OPTIONS, a group column (OPTIONS ('topic' '{}', \
                             'key' '<column>')), or publish window_start, which then keys the \
                             rows",
                            sink.name,
                            sink.options.topic,
                            sink.options.topic
                        );
                    };
                    options.key = Some(bound.to_string());
                }
            }
        }
        let sink = if options == sink.options {
            sink
        } else {
            Arc::new(StreamTable {
                name: sink.name.clone(),
                topic_schema: sink.topic_schema.clone(),
                options,
            })
        };
        crate::sink::check_fit(&self.output_schema, &sink.topic_schema)
            .map_err(|e| plan_datafusion_err!("the SELECT does not fit sink {}: {e}", sink.name))?;
        let empty = RecordBatch::new_empty(self.output_schema.clone());
        crate::sink::conform_stream(&empty, &sink.topic_schema)
            .map_err(|e| plan_datafusion_err!("the SELECT does not fit sink {}: {e}", sink.name))?;
        self.sink = Some(sink);
        Ok(())
    }

    /// Processes a decoded batch of the source (`partitions[i]` is row i's Kafka partition)
    /// at processing time `now_ms`: diverts future-stamped and late rows, runs the stateless
    /// part, updates window state, advances the watermark and returns what is due.
    ///
    /// `offsets[i]`, when given, is row i's Kafka offset: the query then remembers, per
    /// partition, the oldest offset a window still open needs ([`StreamQuery::held_offsets`]).
    pub async fn process(
        &mut self,
        batch: &RecordBatch,
        partitions: &[i32],
        offsets: Option<&[i64]>,
        now_ms: i64,
    ) -> Result<StepOutput> {
        self.touch();
        if self.join.is_some() || self.union.is_some() {
            let table = self.source.name.clone();
            return Box::pin(self.process_from(&table, batch, partitions, offsets, now_ms)).await;
        }
        // A changelog's record whose op is none the engine reads goes to the DLQ.
        let unknown = match &self.upsert {
            Some(u) => u.unknown_ops(batch)?,
            None => Vec::new(),
        };
        if !unknown.is_empty() {
            return Box::pin(self.process_without(batch, partitions, offsets, now_ms, unknown))
                .await;
        }
        let (cuts, late) = self.cuts(batch, partitions, now_ms)?;
        if cuts.is_empty() {
            self.forced_late = late;
            return self.process_run(batch, partitions, offsets, now_ms).await;
        }
        // Each run is a step of its own: its rows are judged against the windows the rows
        // before them closed, as had they arrived in micro-batches of their own.
        let n = batch.num_rows();
        let mut out = StepOutput::default();
        let starts = std::iter::once(0).chain(cuts.iter().copied());
        for (start, end) in starts.zip(cuts.iter().copied().chain(std::iter::once(n))) {
            let partitions = if partitions.len() == n {
                &partitions[start..end]
            } else {
                partitions
            };
            self.forced_late = late
                .iter()
                .filter(|(r, _)| (start..end).contains(&(*r as usize)))
                .map(|(r, w)| (r - start as u32, *w))
                .collect();
            let step = self
                .process_run(
                    &batch.slice(start, end - start),
                    partitions,
                    offsets.map(|o| if o.len() == n { &o[start..end] } else { o }),
                    now_ms,
                )
                .await?;
            out.rows.extend(step.rows);
            out.diverted
                .extend(step.diverted.into_iter().map(|d| Diverted {
                    row: d.row + start as u32,
                    ..d
                }));
            out.failed.extend(step.failed.into_iter().map(|f| Failed {
                row: f.row + start as u32,
                ..f
            }));
            out.refused.extend(step.refused);
        }
        Ok(out)
    }

    /// [`StreamQuery::process`] of `batch` without the changelog records whose `op` is
    /// unknown (`unknown`: their rows and ops), which are failed rows of the step.
    async fn process_without(
        &mut self,
        batch: &RecordBatch,
        partitions: &[i32],
        offsets: Option<&[i64]>,
        now_ms: i64,
        unknown: Vec<(u32, String)>,
    ) -> Result<StepOutput> {
        let n = batch.num_rows();
        let gone: std::collections::HashSet<u32> = unknown.iter().map(|(r, _)| *r).collect();
        let kept: Vec<u32> = (0..n as u32).filter(|r| !gone.contains(r)).collect();
        let rows = datafusion::arrow::array::UInt32Array::from(kept.clone());
        let rest = datafusion::arrow::compute::take_record_batch(batch, &rows)?;
        let pick = |all: &[i32]| -> Vec<i32> {
            if all.len() == n {
                kept.iter().map(|&r| all[r as usize]).collect()
            } else {
                all.to_vec()
            }
        };
        let rest_partitions = pick(partitions);
        let rest_offsets: Option<Vec<i64>> = offsets.map(|o| {
            if o.len() == n {
                kept.iter().map(|&r| o[r as usize]).collect()
            } else {
                o.to_vec()
            }
        });
        let mut out = self
            .process(&rest, &rest_partitions, rest_offsets.as_deref(), now_ms)
            .await?;
        for d in &mut out.diverted {
            d.row = kept[d.row as usize];
        }
        for f in &mut out.failed {
            f.row = kept[f.row as usize];
        }
        let times = match &self.source.options.event_time {
            Some(t) => Some(event_times(batch, t)?),
            None => None,
        };
        out.failed.extend(unknown.into_iter().map(|(row, op)| {
            Failed {
                row,
                event_time: times
                    .as_ref()
                    .and_then(|t| t.is_valid(row as usize).then(|| t.value(row as usize))),
                error: format!(
                    "op '{op}' is none of insert, update, retract and delete (in any case; a \
                 null op is an upsert): the record is neither taken as a row nor as a deletion"
                ),
            }
        }));
        out.failed.sort_by_key(|f| f.row);
        Ok(out)
    }

    /// How a micro-batch of a windowed query over one stream is judged so that no row is
    /// judged against windows that the rows before it in the same micro-batch would have
    /// closed (by the watermark they made, and the allowed lateness): a row all of whose
    /// windows they closed is late (returned with that watermark); the micro-batch is cut
    /// before a row only some of whose windows they closed (hop, cumulate), so that it is
    /// judged against the windows as those rows left them. The cuts are at most the window
    /// ends the micro-batch passes. Whether a row is late then does not depend on how the
    /// input was cut into micro-batches. Nothing in the common case, told cheaply: no row is
    /// behind the highest watermark the micro-batch could make. Sessions are not judged so (a
    /// session event's lateness depends on the live sessions of its key).
    #[allow(clippy::type_complexity)]
    fn cuts(
        &self,
        batch: &RecordBatch,
        partitions: &[i32],
        now_ms: i64,
    ) -> Result<(Vec<usize>, Vec<(u32, i64)>)> {
        let (Some(time), Some(w)) = (&self.time_column, &self.windowed) else {
            return Ok(Default::default());
        };
        if batch.num_rows() < 2 || w.operator.keyed_lateness() {
            return Ok(Default::default());
        }
        let times = event_times(batch, time)?;
        let (Some(lo), Some(hi)) = (
            datafusion::arrow::compute::min(&times),
            datafusion::arrow::compute::max(&times),
        ) else {
            return Ok(Default::default());
        };
        let after = w.operator.evicted_through();
        let Some(highest) = w.operator.frontier(self.watermarks.reachable(hi, now_ms)) else {
            return Ok(Default::default());
        };
        // A window of a row ends after it: none of a row at or after `highest` can close.
        if highest <= after || lo >= highest {
            return Ok(Default::default());
        }
        let future_limit =
            now_ms.saturating_add(self.source.options.future_tolerance.as_millis() as i64);
        let mut running = self.watermarks.clone();
        let mut after = after;
        let mut observed = false;
        let (mut cuts, mut late) = (Vec::new(), Vec::new());
        // A changelog's records of one key in a run are taken together, the last deciding,
        // and the first supersedes the row the key held before the run: a record whose key
        // had a row (held, or a record earlier in the run) a window of which the records
        // before it in the run closed starts a run of its own, so that the earlier row
        // counted in that window (as had they come in micro-batches of their own). Per key,
        // the distinct times of its records in the run, and the time of its last record in
        // the micro-batch (the row it holds when a later run starts).
        let keys = match &self.upsert {
            Some(u) => Some((u, u.key_rows(batch)?)),
            None => None,
        };
        let mut keys_in_run: HashMap<&[u8], Vec<i64>> = HashMap::new();
        let mut last_in_batch: HashMap<&[u8], i64> = HashMap::new();
        for (r, t) in times.iter().enumerate() {
            let placed = t.filter(|t| *t <= future_limit && in_time_range(*t));
            if let Some((upsert, keys)) = &keys {
                let key = keys.row(r).data();
                // The key's earlier times: its records in the run, or else the row it held
                // before the run (no copy per record).
                let (in_run, held) = match keys_in_run.get(key) {
                    Some(times) => (times.as_slice(), None),
                    None => (
                        &[][..],
                        last_in_batch
                            .get(key)
                            .copied()
                            .or_else(|| upsert.held_time(key)),
                    ),
                };
                if observed && (!in_run.is_empty() || held.is_some()) {
                    let watermark = running.advance(now_ms).unwrap_or(i64::MIN);
                    let through = w.operator.frontier(watermark).unwrap_or(i64::MIN);
                    if in_run
                        .iter()
                        .chain(held.as_ref())
                        .any(|e| w.operator.closes_between(*e, after, through))
                    {
                        cuts.push(r);
                        after = through;
                        keys_in_run.clear();
                    }
                }
                let times = keys_in_run.entry(key).or_default();
                if let Some(t) = placed {
                    if !times.contains(&t) {
                        times.push(t);
                    }
                    last_in_batch.insert(key, t);
                }
            }
            let Some(t) = t else {
                continue;
            };
            if placed.is_none() {
                // Diverted without moving the watermark.
                continue;
            }
            // Until a row of the micro-batch is seen, the watermark is the one its run
            // starts with.
            if observed && t < highest {
                let watermark = running.advance(now_ms).unwrap_or(i64::MIN);
                let through = w.operator.frontier(watermark).unwrap_or(i64::MIN);
                if w.operator.closes_between(t, after, through) {
                    if w.operator.last_window_end(t) <= through {
                        late.push((r as u32, watermark));
                    } else {
                        cuts.push(r);
                        after = through;
                        // The run starts with this row.
                        if let Some((_, keys)) = &keys {
                            keys_in_run.clear();
                            keys_in_run.insert(keys.row(r).data(), vec![t]);
                        }
                    }
                }
            }
            // Late or not, a row shows how far its partition has come (as in `admit`).
            let p = partitions.get(r).copied().unwrap_or(0);
            running.observe(p, t, now_ms);
            observed = true;
        }
        Ok((cuts, late))
    }

    /// [`StreamQuery::process`] of one run of rows, judged against the windows as they are.
    async fn process_run(
        &mut self,
        batch: &RecordBatch,
        partitions: &[i32],
        offsets: Option<&[i64]>,
        now_ms: i64,
    ) -> Result<StepOutput> {
        let mut out = StepOutput::default();
        self.emit_rest(now_ms, &mut out).await?;
        check_schema(&self.source, batch)?;
        let arrived = batch;
        let batch = match self.time_column.clone() {
            Some(time) => {
                self.admit(
                    arrived,
                    partitions,
                    offsets,
                    (&time, None),
                    now_ms,
                    &mut out.diverted,
                )
                .await?
            }
            None => arrived.clone(),
        };
        self.repin().await?;
        // A changelog source: each key's latest record takes effect, and the rows it
        // supersedes are withdrawn from the windows. A record too late for its windows is
        // still its key's latest: the row it supersedes is withdrawn all the same (one
        // stamped in the future is not taken at all).
        let (batch, withdrawn) = match &mut self.upsert {
            Some(u) if out.diverted.iter().any(|d| d.reason.is_late()) => {
                let n = arrived.num_rows();
                let (mut late, mut taken) = (vec![false; n], vec![true; n]);
                for d in &out.diverted {
                    match d.reason {
                        // A record without a time is still its key's latest, as a late one.
                        DivertReason::BeyondAllowedLateness
                        | DivertReason::MissingEventTime
                        | DivertReason::EventTimeOutOfRange => late[d.row as usize] = true,
                        DivertReason::FutureTimestamp => taken[d.row as usize] = false,
                        DivertReason::WindowClosed => {}
                    }
                }
                let considered = filter_record_batch(arrived, &BooleanArray::from(taken.clone()))?;
                let late: Vec<bool> = late
                    .into_iter()
                    .zip(taken)
                    .filter_map(|(l, t)| t.then_some(l))
                    .collect();
                let changes = u.apply_with_late(&considered, &late)?;
                (changes.added, Some(changes.withdrawn))
            }
            Some(u) if batch.num_rows() > 0 => {
                let changes = u.apply(&batch)?;
                (changes.added, Some(changes.withdrawn))
            }
            _ => (batch, None),
        };
        if let Some(withdrawn) = withdrawn
            && withdrawn.num_rows() > 0
            && self.windowed.is_some()
        {
            self.feed.set(vec![withdrawn]);
            let ctx = self.lower_context();
            let lowered = self.lower.collect(ctx).await?;
            if let Some(w) = &mut self.windowed {
                for b in &lowered {
                    w.operator.retract(b)?;
                }
            }
        }
        let wake = self.keyed_watermark(now_ms);
        // Rows of a changelog have taken effect above (a failed one could not be withdrawn
        // again): their failures fail the query.
        let failed = self
            .run_lower(batch, wake, self.upsert.is_none(), &mut out)
            .await?;
        if !failed.is_empty() {
            let time = self.time_column.as_deref();
            let failed = failed_inputs(arrived, &out.diverted, time, failed)?;
            out.failed.extend(failed);
        }
        self.emit(now_ms, &mut out).await?;
        Ok(out)
    }

    /// The task context the plan below the aggregation runs in: with the pinned versions of
    /// the reference tables, when it keeps them.
    fn lower_context(&mut self) -> Arc<TaskContext> {
        match &mut self.pinning {
            Some(p) => p.context(&self.task_ctx),
            None => self.task_ctx.clone(),
        }
    }

    /// Over a changelog, when a reference table that the plan below the windows reads has
    /// got a new version: every key's latest row is taken out of the windows as the plan
    /// made it with the versions before, and put in again as it makes it with the current
    /// ones (now pinned), so that a later withdrawal takes out what is there. A row the plan
    /// fails on with the new versions fails the step, as a changelog row's failure does.
    async fn repin(&mut self) -> Result<()> {
        let Some(before) = self.pinning.as_mut().and_then(|p| p.renew()) else {
            return Ok(());
        };
        let held = match (&self.upsert, &self.windowed) {
            (Some(u), Some(_)) => u.held()?,
            _ => return Ok(()),
        };
        if held.num_rows() == 0 {
            return Ok(());
        }
        self.feed.set(vec![held.clone()]);
        let old = self.lower.collect(before.context(&self.task_ctx)).await?;
        let ctx = self.lower_context();
        self.feed.set(vec![held]);
        let new = self.lower.collect(ctx).await?;
        // Only the rows the new versions change move: a table the rows do not depend on
        // revises nothing.
        let (gone, came) = multiset_difference(&self.lower.schema(), &old, &new)?;
        if let Some(w) = &mut self.windowed {
            w.operator.retract(&gone)?;
            w.operator.update(&came)?;
        }
        Ok(())
    }

    /// Runs the plan below the aggregation over `batch` (the stream's admitted rows, or a
    /// join's pairs), into the windows or, without them, into the output; `wake`: even
    /// without rows, for the keyed timers.
    ///
    /// With `isolate`, rows the plan (or the window's evaluation of its keys and arguments)
    /// fails on by their values alone are left out and returned with the error (their index
    /// in `batch`), and the others go on.
    async fn run_lower(
        &mut self,
        batch: RecordBatch,
        wake: bool,
        isolate: bool,
        out: &mut StepOutput,
    ) -> Result<Vec<(u32, String)>> {
        let mut failed = Vec::new();
        // With rows held for the watermark, the keyed states are above them: they wake there.
        if batch.num_rows() > 0 || (wake && self.ordered.is_none()) {
            let lowered = if isolate {
                self.lower_isolating(batch, &mut failed).await?
            } else {
                self.lower_once(batch).await?
            };
            self.take_lowered(lowered, out)?;
        }
        Ok(failed)
    }

    /// Takes the output of the plan below the aggregation into the windows, the rows held
    /// for the watermark or, without either, the output.
    fn take_lowered(
        &mut self,
        lowered: Vec<(RecordBatch, Option<crate::state::window::Inputs>)>,
        out: &mut StepOutput,
    ) -> Result<()> {
        match &mut self.windowed {
            Some(w) => {
                for (b, inputs) in lowered {
                    w.operator.update_prepared(&b, inputs)?;
                }
            }
            None => match &mut self.ordered {
                Some(o) => {
                    for (b, _) in lowered {
                        o.hold(b)?;
                    }
                }
                None => {
                    for (b, _) in lowered.into_iter().filter(|(b, _)| b.num_rows() > 0) {
                        out.rows.push(named(&self.output_schema, b)?);
                    }
                }
            },
        }
        Ok(())
    }

    /// The union's branches that read `table` over `rows` (admitted rows of it), then the
    /// plan below the aggregation over their output (see [`StreamQuery::lower_once`]).
    async fn union_once(
        &mut self,
        table: &str,
        rows: RecordBatch,
    ) -> Result<Vec<(RecordBatch, Option<crate::state::window::Inputs>)>> {
        let rows = match &self.union {
            Some(u) => u.merge(table, &rows, self.task_ctx.clone()).await?,
            None => return plan_err!("internal: not a union"),
        };
        self.lower_once(rows).await
    }

    /// The plan below the aggregation over `batch`, and for a window, each output batch's
    /// rows of this instance with the window's inputs evaluated over them (nothing changed
    /// yet: where this fails, no state has).
    async fn lower_once(
        &mut self,
        batch: RecordBatch,
    ) -> Result<Vec<(RecordBatch, Option<crate::state::window::Inputs>)>> {
        self.feed.set(vec![batch]);
        let ctx = self.lower_context();
        let lowered = self.lower.collect(ctx).await?;
        let Some(w) = &self.windowed else {
            return Ok(lowered.into_iter().map(|b| (b, None)).collect());
        };
        lowered
            .into_iter()
            .map(|b| {
                let b = match self.owner {
                    Some((n, q)) if b.num_rows() > 0 => {
                        let keys = w
                            .groups
                            .iter()
                            .map(|g| g.evaluate(&b)?.into_array(b.num_rows()))
                            .collect::<Result<Vec<_>>>()?;
                        let mine: BooleanArray = super::repartition::group_partitions(&keys, n)?
                            .into_iter()
                            .map(|p| Some(p == q))
                            .collect();
                        filter_record_batch(&b, &mine)?
                    }
                    _ => b,
                };
                let inputs = w.operator.prepare(&b)?;
                Ok((b, inputs))
            })
            .collect()
    }

    /// [`StreamQuery::lower_once`], leaving out the rows it fails on by their values
    /// ([`Isolating`]): they are pushed to `failed` with the error; the output over the other
    /// rows is returned in their order.
    async fn lower_isolating(
        &mut self,
        batch: RecordBatch,
        failed: &mut Vec<(u32, String)>,
    ) -> Result<Vec<(RecordBatch, Option<crate::state::window::Inputs>)>> {
        let n = batch.num_rows();
        let mut lowered = Vec::new();
        let mut runs = Isolating::new(n);
        while let Some((start, len)) = runs.next() {
            let run = self.lower_once(batch.slice(start, len)).await;
            lowered.extend(runs.took(run, failed)?.into_iter().flatten());
        }
        self.judge_failures(runs)?;
        Ok(lowered)
    }

    /// Notes what `runs` over a batch showed of the plan's errors, and fails the query when
    /// the first [`UNPROVEN_ROWS`] rows it met have all failed in a function (see
    /// [`Unproven`]; rows failed on a value, as a cast, count neither way).
    fn judge_failures(&mut self, runs: Isolating) -> Result<()> {
        let Unproven::Failed(before) = self.unproven else {
            return Ok(());
        };
        if runs.n == 0 {
            return Ok(());
        }
        let (in_functions, passed) = runs.before_a_pass();
        if before + in_functions >= UNPROVEN_ROWS
            && let Some(error) = runs.error
        {
            return Err(error.context(format!(
                "the first {UNPROVEN_ROWS} rows the query met all failed: the call refuses \
                 its arguments as written (a constant it cannot take?), or the input is not \
                 what it expects"
            )));
        }
        self.unproven = match passed {
            true => Unproven::Passed,
            false => Unproven::Failed(before + in_functions),
        };
        Ok(())
    }

    /// The rows of a join's `side` from `kept` (that side's admitted rows): its plan's
    /// output, whose join keys are checked to evaluate.
    async fn join_side_once(&mut self, side: usize, kept: RecordBatch) -> Result<RecordBatch> {
        let Some(join) = &self.join else {
            return plan_err!("internal: not a join");
        };
        let (plan, feed) = &join.sides[side];
        feed.set(vec![kept]);
        let rows = plan.collect(self.task_ctx.clone()).await?;
        let rows = datafusion::arrow::compute::concat_batches(&plan.schema(), &rows)?;
        join.state.check_keys(side, &rows)?;
        Ok(rows)
    }

    /// Processes a decoded batch of Kafka topic `topic`: for each of its input streams that
    /// reads the topic (a self-join reads one stream twice; two streams may share a topic).
    pub async fn process_topic(
        &mut self,
        topic: &str,
        batch: &RecordBatch,
        partitions: &[i32],
        offsets: Option<&[i64]>,
        now_ms: i64,
    ) -> Result<StepOutput> {
        if self.join.is_none() && self.union.is_none() {
            return self.process(batch, partitions, offsets, now_ms).await;
        }
        let tables: Vec<String> = self
            .inputs()
            .iter()
            .filter(|t| t.options.topic == topic)
            .map(|t| t.name.clone())
            .collect();
        let mut out = StepOutput::default();
        for table in tables {
            let step = self
                .process_from(&table, batch, partitions, offsets, now_ms)
                .await?;
            out.append(step);
        }
        Ok(out)
    }

    /// Processes a decoded batch of stream table `table`, one of the query's inputs; see
    /// [`StreamQuery::process`].
    pub async fn process_from(
        &mut self,
        table: &str,
        batch: &RecordBatch,
        partitions: &[i32],
        offsets: Option<&[i64]>,
        now_ms: i64,
    ) -> Result<StepOutput> {
        self.touch();
        if self.union.is_some() {
            return self
                .process_union(table, batch, partitions, offsets, now_ms)
                .await;
        }
        if self.join.is_none() {
            if table != self.source.name {
                return plan_err!("the query does not read {table}");
            }
            return self.process(batch, partitions, offsets, now_ms).await;
        }
        let mut out = StepOutput::default();
        self.emit_rest(now_ms, &mut out).await?;
        let left = table == self.source.name;
        let input = match &self.join {
            _ if left => self.source.clone(),
            Some(j) => match &j.right {
                Some(r) if r.name == table => r.clone(),
                _ => return plan_err!("the query does not read {table}"),
            },
            None => return plan_err!("the query does not read {table}"),
        };
        check_schema(&input, batch)?;
        let (kept, holds) = self.admit_join(
            &input,
            left,
            batch,
            partitions,
            offsets,
            now_ms,
            &mut out.diverted,
        )?;
        // Each side's rows, with the rows its plan or keys fail on left out.
        let sides: Vec<usize> = match &self.join {
            Some(join) if kept.num_rows() > 0 => {
                (0..2).filter(|s| join.tables[*s] == table).collect()
            }
            _ => Vec::new(),
        };
        let n = kept.num_rows();
        let mut failed: Vec<(u32, String)> = Vec::new();
        let mut rows_of = Vec::new();
        for &side in &sides {
            let mut rows = Vec::new();
            let mut side_failed = Vec::new();
            let mut runs = Isolating::new(n);
            while let Some((start, len)) = runs.next() {
                let run = self.join_side_once(side, kept.slice(start, len)).await;
                rows.extend(runs.took(run, &mut side_failed)?);
            }
            self.judge_failures(runs)?;
            failed.extend(side_failed);
            rows_of.push((side, rows));
        }
        failed.sort_by_key(|(row, _)| *row);
        failed.dedup_by_key(|(row, _)| *row);
        // A self-join's row that one side failed on goes to the DLQ and to neither side: the
        // other side's rows are made again without it.
        if sides.len() == 2 && !failed.is_empty() {
            let keep: BooleanArray = {
                let gone: std::collections::HashSet<u32> = failed.iter().map(|(r, _)| *r).collect();
                (0..n as u32).map(|r| Some(!gone.contains(&r))).collect()
            };
            let rest = filter_record_batch(&kept, &keep)?;
            rows_of.clear();
            for &side in &sides {
                let rows = self.join_side_once(side, rest.clone()).await?;
                rows_of.push((side, vec![rows]));
            }
        }
        let mut pairs = Vec::new();
        // Rows the join's condition refused: (side, the kept row it is when the side's rows
        // are the kept rows one for one, the row, the error).
        let mut refused: Vec<(usize, Option<u32>, RecordBatch, String)> = Vec::new();
        let skip: std::collections::HashSet<u32> = failed.iter().map(|(r, _)| *r).collect();
        for (side, rows) in rows_of {
            let Some(join) = &mut self.join else {
                break;
            };
            let schema = join.sides[side].0.schema();
            let all = datafusion::arrow::compute::concat_batches(&schema, &rows)?;
            let one_for_one = skip.is_empty() && all.num_rows() == n;
            let mut taken = 0;
            let mut rest = Some(all);
            while let Some(rows) = rest.take() {
                let Some(join) = &mut self.join else {
                    break;
                };
                let count = rows.num_rows();
                let arrival = join.state.arrive(side, rows, holds.clone())?;
                pairs.extend(arrival.pairs);
                rest = arrival.rest;
                for (i, row, error) in arrival.refused {
                    // A function refusing its arguments (a constant one refuses every row)
                    // fails the query, as it does in the side's plan before any row passed.
                    if !is_value_error(&error) {
                        return Err(error);
                    }
                    let at = one_for_one.then(|| (taken + i) as u32);
                    refused.push((side, at, row, error.to_string()));
                }
                taken += count - rest.as_ref().map_or(0, RecordBatch::num_rows);
                if rest.is_some() {
                    // A large batch's pairs go on above the join part by part.
                    self.join_part(std::mem::take(&mut pairs), &mut out).await?;
                }
            }
        }
        // Records whose rows the join's condition failed on with a row of the other stream
        // joined nothing and are not held: they go to the DLQ with the error, as a record the
        // query's plan fails on does, rather than failing the query at every restart. (In a
        // self-join, the record's row on the other side has joined as usual.)
        let say = |error: &str| {
            format!(
                "the join's condition failed on the record and a row of the other stream: {error}"
            )
        };
        for side in 0..2 {
            let mut untraced: Vec<(RecordBatch, String)> = Vec::new();
            for (_, at, row, error) in refused.iter().filter(|(s, ..)| *s == side) {
                match at {
                    Some(at) => failed.push((*at, say(error))),
                    None => untraced.push((row.clone(), error.clone())),
                }
            }
            if untraced.is_empty() {
                continue;
            }
            // The side's plan left rows out or failed on some: the records are traced by
            // their rows.
            for (row, error) in self.sources_of(side, &kept, &skip, &untraced).await? {
                failed.push((row, say(&error)));
            }
        }
        failed.sort_by_key(|(row, _)| *row);
        failed.dedup_by_key(|(row, _)| *row);
        if !failed.is_empty() {
            let time = input.options.event_time.as_deref();
            out.failed
                .extend(failed_inputs(batch, &out.diverted, time, failed)?);
        }
        self.join_step(pairs, now_ms, &mut out).await?;
        Ok(out)
    }

    /// The rows of `kept` (but those in `skip`) whose row on join side `side` is one of
    /// `rows`, each with the error of its row: found by halving, running the side's plan over
    /// each half that still makes one of them, so a few rows cost a few runs.
    async fn sources_of(
        &mut self,
        side: usize,
        kept: &RecordBatch,
        skip: &std::collections::HashSet<u32>,
        rows: &[(RecordBatch, String)],
    ) -> Result<Vec<(u32, String)>> {
        use datafusion::arrow::row::{RowConverter, SortField};
        let Some((first, _)) = rows.first() else {
            return Ok(Vec::new());
        };
        let converter = RowConverter::new(
            first
                .schema()
                .fields()
                .iter()
                .map(|f| SortField::new(f.data_type().clone()))
                .collect(),
        )?;
        let mut wanted: HashMap<Vec<u8>, String> = HashMap::new();
        for (row, error) in rows {
            let encoded = converter.convert_columns(row.columns())?;
            for r in encoded.iter() {
                wanted
                    .entry(r.as_ref().to_vec())
                    .or_insert_with(|| error.clone());
            }
        }
        let mut found = Vec::new();
        let mut traced: std::collections::HashSet<Vec<u8>> = Default::default();
        let mut ranges: Vec<Vec<u32>> = vec![
            (0..kept.num_rows() as u32)
                .filter(|r| !skip.contains(r))
                .collect(),
        ];
        while let Some(range) = ranges.pop() {
            if range.is_empty() {
                continue;
            }
            let subset = datafusion::arrow::compute::take_record_batch(
                kept,
                &datafusion::arrow::array::UInt32Array::from(range.clone()),
            )?;
            let made = self.join_side_once(side, subset).await?;
            let encoded = converter.convert_columns(made.columns())?;
            let Some((key, error)) = encoded
                .iter()
                .find_map(|r| wanted.get_key_value(r.as_ref()))
            else {
                continue;
            };
            if let [row] = range[..] {
                traced.insert(key.clone());
                found.push((row, error.clone()));
            } else {
                let (a, b) = range.split_at(range.len() / 2);
                ranges.push(b.to_vec());
                ranges.push(a.to_vec());
            }
        }
        if traced.len() < wanted.len() {
            return plan_err!("internal: a row the join's condition failed on has no record");
        }
        Ok(found)
    }

    /// Runs the plan above a join over a part of one batch's pairs. With no aggregation above
    /// the join, its results of one micro-batch are held to [`crate::state::join::MAX_PAIRS`]
    /// rows.
    async fn join_part(&mut self, pairs: Vec<RecordBatch>, out: &mut StepOutput) -> Result<()> {
        let Some(join) = &self.join else {
            return Ok(());
        };
        let schema = join.state.spec().schema.clone();
        let batch = datafusion::arrow::compute::concat_batches(&schema, &pairs)?;
        drop(pairs);
        self.run_lower(batch, false, false, out).await?;
        Self::check_join_rows(out)
    }

    /// Holds a join's results of one micro-batch, with no aggregation above the join, to
    /// [`crate::state::join::MAX_PAIRS`] rows.
    fn check_join_rows(out: &StepOutput) -> Result<()> {
        let rows: usize = out.rows.iter().map(RecordBatch::num_rows).sum();
        if rows as u64 > crate::state::join::MAX_PAIRS {
            return Err(datafusion::error::DataFusionError::Execution(format!(
                "a join of two streams gave more than {} result rows from one micro-batch: too \
                 many rows of one key meet within its time bound; narrow the bound (BETWEEN \
                 a.event_time - INTERVAL '1 minute' AND …), join on a more selective key, or \
                 aggregate the pairs (GROUP BY a window)",
                crate::state::join::MAX_PAIRS
            )));
        }
        Ok(())
    }

    /// Processes a batch of `table`, one of the streams of a union: admits its rows against
    /// the windows (with that stream's own watermark fed), runs the branches that read it, and
    /// the plan above the union over their rows.
    async fn process_union(
        &mut self,
        table: &str,
        batch: &RecordBatch,
        partitions: &[i32],
        offsets: Option<&[i64]>,
        now_ms: i64,
    ) -> Result<StepOutput> {
        let mut out = StepOutput::default();
        self.emit_rest(now_ms, &mut out).await?;
        let input = if table == self.source.name {
            None
        } else {
            match self
                .union
                .as_ref()
                .and_then(|u| u.others.iter().position(|o| o.table.name == table))
            {
                Some(i) => Some(i),
                None => return plan_err!("the query does not read {table}"),
            }
        };
        let stream = match input {
            None => self.source.clone(),
            Some(i) => match &self.union {
                Some(u) => u.others[i].table.clone(),
                None => return plan_err!("internal: not a union"),
            },
        };
        check_schema(&stream, batch)?;
        let kept = match stream.options.event_time.clone() {
            Some(time) => {
                self.admit(
                    batch,
                    partitions,
                    offsets,
                    (&time, input),
                    now_ms,
                    &mut out.diverted,
                )
                .await?
            }
            None => batch.clone(),
        };
        // Rows the branches or the plan above them fail on by their values go to the DLQ,
        // as in a query over one stream.
        let wake = self.keyed_watermark(now_ms);
        let n = kept.num_rows();
        let mut failed = Vec::new();
        if n > 0 || (wake && self.ordered.is_none()) {
            let mut lowered = Vec::new();
            let mut runs = Isolating::new(n);
            while let Some((start, len)) = runs.next() {
                let run = self.union_once(table, kept.slice(start, len)).await;
                lowered.extend(runs.took(run, &mut failed)?.into_iter().flatten());
            }
            self.judge_failures(runs)?;
            self.take_lowered(lowered, &mut out)?;
        }
        if !failed.is_empty() {
            let time = stream.options.event_time.as_deref();
            out.failed
                .extend(failed_inputs(batch, &out.diverted, time, failed)?);
        }
        self.emit(now_ms, &mut out).await?;
        Ok(out)
    }

    /// After a join's input: evicts what no row to come can meet (emitting an outer join's
    /// unmatched rows), runs the plan above the join over the pairs, and emits what is due.
    async fn join_step(
        &mut self,
        mut pairs: Vec<RecordBatch>,
        now_ms: i64,
        out: &mut StepOutput,
    ) -> Result<()> {
        let watermarks = self.join_watermarks(now_ms);
        let Some(join) = &mut self.join else {
            return Ok(());
        };
        pairs.extend(join.state.evict(watermarks)?);
        let schema = join.state.spec().schema.clone();
        let batch = datafusion::arrow::compute::concat_batches(&schema, &pairs)?;
        let wake = self.keyed_watermark(now_ms);
        self.run_lower(batch, wake, false, out).await?;
        if self.windowed.is_none() && self.ordered.is_none() {
            Self::check_join_rows(out)?;
        }
        self.emit(now_ms, out).await
    }

    /// The input watermarks of a join's sides at processing time `now_ms`.
    /// A stream whose partitions have all gone idle follows the other: it holds nothing back.
    fn join_watermarks(&mut self, now_ms: i64) -> [Option<i64>; 2] {
        self.watermarks.advance(now_ms);
        if let Some(j) = &mut self.join {
            j.right_watermarks.advance(now_ms);
        }
        self.join_watermarks_now(now_ms)
    }

    /// [`StreamQuery::join_watermarks`] as of the last advance, at processing time `now_ms`.
    fn join_watermarks_now(&self, now_ms: i64) -> [Option<i64>; 2] {
        let left = self.watermarks.current();
        match &self.join {
            Some(j) if j.right.is_some() => {
                // A side that followed the other while idle does not go back behind what the
                // other side's rows were evicted by.
                let left = left.max(j.state.evicted_by(0));
                let right = j.right_watermarks.current().max(j.state.evicted_by(1));
                let left_idle = self.watermarks.is_idle(now_ms) == Some(true);
                let right_idle = j.right_watermarks.is_idle(now_ms) == Some(true);
                match (left_idle, right_idle) {
                    (true, false) => [left.max(right), right],
                    (false, true) => [left, right.max(left)],
                    _ => [left, right],
                }
            }
            _ => [left, left],
        }
    }

    /// The watermark its operators go by: as [`StreamQuery::watermark`], but a joined stream
    /// or a branch of a union that has gone quiet follows the others, as the query's own
    /// steps let it. The sides' watermarks are those of its last micro-batch; whether a side
    /// is quiet is judged at processing time `now_ms`, so a side that went quiet since then
    /// already counts as quiet here (its next step lets the join follow too). A union's is
    /// the one its last step went by. For progress figures.
    pub fn progress_watermark(&self, now_ms: i64) -> Option<i64> {
        if let Some(u) = &self.union {
            return u.watermark;
        }
        let watermarks = self.join_watermarks_now(now_ms);
        match &self.join {
            Some(j) => j.output_watermark(watermarks),
            None => watermarks[0],
        }
    }

    /// The watermark of the rows `lower` gets at processing time `now_ms`: the stream's, or
    /// a join's output watermark.
    fn input_watermark(&mut self, now_ms: i64) -> Option<i64> {
        if let Some(u) = &mut self.union {
            let mut marks = vec![UnionMark::of(&mut self.watermarks, now_ms)];
            for o in &mut u.others {
                marks.push(UnionMark::of(&mut o.watermarks, now_ms));
            }
            // It never moves back (a stream resuming behind the others, all going idle).
            let w = union_watermark(marks).max(u.watermark);
            u.watermark = w;
            return w;
        }
        let watermarks = self.join_watermarks(now_ms);
        match &self.join {
            Some(j) => j.output_watermark(watermarks),
            None => watermarks[0],
        }
    }

    /// Splits off the rows of join input `input` (the left stream when `left`) that must not
    /// be processed (late for the join, stamped in the future), feeds that stream's
    /// watermark with the rest, and holds their offsets; returns the rows kept with their
    /// smallest offset per partition.
    #[allow(clippy::too_many_arguments)]
    fn admit_join(
        &mut self,
        input: &StreamTable,
        left: bool,
        batch: &RecordBatch,
        partitions: &[i32],
        offsets: Option<&[i64]>,
        now_ms: i64,
        diverted: &mut Vec<Diverted>,
    ) -> Result<(RecordBatch, HashMap<i32, i64>)> {
        let Some(join) = &mut self.join else {
            return plan_err!("internal: not a join");
        };
        let Some(time) = &input.options.event_time else {
            return plan_err!("stream {} has no event-time column", input.name);
        };
        let column = batch
            .column_by_name(time)
            .ok_or_else(|| plan_datafusion_err!("event-time column {time} missing"))?;
        let column = cast(column, &DataType::Timestamp(TimeUnit::Millisecond, None))?;
        let Some(times) = column.as_any().downcast_ref::<TimestampMillisecondArray>() else {
            return plan_err!("event-time column {time} is not a timestamp");
        };
        let reach = join.reach();
        // Late against the side's own watermark, or the one the other side's rows were
        // evicted by when this side had gone idle and followed the other.
        let evicted_by = join.state.evicted_by(usize::from(!left));
        let (tracker, held) = if left {
            (&mut self.watermarks, &mut self.held)
        } else {
            (&mut join.right_watermarks, &mut join.held_right)
        };
        let future_limit = now_ms.saturating_add(input.options.future_tolerance.as_millis() as i64);
        let watermark = tracker.current().max(evicted_by);
        let mut keep = Vec::with_capacity(batch.num_rows());
        let mut max_by_partition = NewestByPartition::default();
        let mut holds: HashMap<i32, i64> = HashMap::new();
        for (r, t) in times.iter().enumerate() {
            let reason = match t {
                None => Some(DivertReason::MissingEventTime),
                Some(t) if !in_time_range(t) => Some(DivertReason::EventTimeOutOfRange),
                Some(t) if t > future_limit => Some(DivertReason::FutureTimestamp),
                Some(t) if watermark.is_some_and(|w| t < w) => {
                    Some(DivertReason::BeyondAllowedLateness)
                }
                Some(_) => None,
            };
            if let Some(reason) = reason {
                // A late row still shows how far its partition has come (see the windows'
                // input).
                if let (Some(t), DivertReason::BeyondAllowedLateness) = (t, &reason) {
                    let p = partitions.get(r).copied().unwrap_or(0);
                    max_by_partition.observe(p, t);
                }
                diverted.push(Diverted {
                    row: r as u32,
                    event_time: t,
                    watermark: watermark.unwrap_or(i64::MIN),
                    reason,
                    window: None,
                });
                keep.push(false);
                continue;
            }
            let t = t.unwrap_or_default();
            let p = partitions.get(r).copied().unwrap_or(0);
            max_by_partition.observe(p, t);
            if let Some(&offset) = offsets.and_then(|o| o.get(r)) {
                holds
                    .entry(p)
                    .and_modify(|o| *o = (*o).min(offset))
                    .or_insert(offset);
                // Its pairs fall in windows up to the last one of a time `reach` later.
                if let Some(w) = &self.windowed {
                    hold(
                        held,
                        (w.last_window_end(t.saturating_add(reach)), p),
                        offset,
                    );
                }
            }
            keep.push(true);
        }
        for (p, t) in max_by_partition.entries {
            tracker.observe(p, t, now_ms);
        }
        let kept = if keep.iter().all(|k| *k) {
            batch.clone()
        } else {
            filter_record_batch(batch, &BooleanArray::from(keep))?
        };
        Ok((kept, holds))
    }

    /// Advances processing time without input: idle partitions stop holding the watermark,
    /// early fires come due. A tick at the watermark of the last, with no input or early fire
    /// since, does nothing: what it would emit is due only when the watermark moves. Not so
    /// for a join or a union, whose inputs' watermarks move on processing time (a quiet input
    /// following the others) and release rows while the output's watermark may stay put.
    pub async fn tick(&mut self, now_ms: i64) -> Result<StepOutput> {
        let early = self
            .early_fire_ms
            .is_some_and(|every| now_ms.saturating_sub(self.last_early_fire_ms) >= every);
        let watermark = self.input_watermark(now_ms);
        if !early
            && self.join.is_none()
            && self.union.is_none()
            && self.settled == Some(watermark)
            && !self.is_due()
        {
            return Ok(StepOutput::default());
        }
        self.touch();
        let out = self.tick_due(now_ms).await?;
        self.settled = Some(watermark);
        Ok(out)
    }

    /// Records that its state may change: the next tick runs, the next checkpoint writes.
    fn touch(&mut self) {
        self.settled = None;
        self.changes = self.changes.wrapping_add(1);
    }

    /// A count that moves whenever its state may have changed (input, a tick that ran, a
    /// restore, new partitions): equal counts between two checkpoints, with equal input
    /// positions, mean the second would write what the first did.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    async fn tick_due(&mut self, now_ms: i64) -> Result<StepOutput> {
        if self.join.is_some() {
            let mut out = StepOutput::default();
            self.join_step(Vec::new(), now_ms, &mut out).await?;
            return Ok(out);
        }
        if self.windowed.is_none() && self.keyed_watermark(now_ms) {
            // Timers of detectors over the raw stream (a sensor gone silent) fire on the
            // watermark, with or without input.
            if let Some(u) = &self.union {
                let empty = RecordBatch::new_empty(u.schema.clone());
                let mut out = StepOutput::default();
                self.run_lower(empty, true, false, &mut out).await?;
                return Ok(out);
            }
            let empty = RecordBatch::new_empty(self.source.topic_schema.output_schema());
            return self.process(&empty, &[], None, now_ms).await;
        }
        let mut out = StepOutput::default();
        self.emit(now_ms, &mut out).await?;
        Ok(out)
    }

    /// Keys held by detectors, health checks and alert machines.
    pub fn keyed_states(&self) -> usize {
        self.keyed
            .iter()
            .filter_map(|h| h.with_store(|s| s.len()))
            .sum()
    }

    /// Passes the watermark to the keyed states below the aggregation (all of them for a
    /// query without one); whether some of them have timers, so that the plan must run even
    /// without input.
    fn keyed_watermark(&mut self, now_ms: i64) -> bool {
        if self.keyed.is_empty() {
            return false;
        }
        let watermark = match self.windowed {
            Some(_) => self.watermark(),
            None => self.input_watermark(now_ms),
        };
        pass_watermark(&self.keyed, watermark.unwrap_or(i64::MIN)) && self.windowed.is_none()
    }

    /// Raises the watermark to `watermark` explicitly and emits what that closes.
    pub async fn advance_watermark(&mut self, watermark: i64, now_ms: i64) -> Result<StepOutput> {
        self.touch();
        self.watermarks.force(watermark);
        self.tick(now_ms).await
    }

    /// The rows of `batch` at `times` that a session of their own would find late but a
    /// session of their key absorbs (session windows only): a live one, or one a row before
    /// it in the micro-batch opens or extends (rows are taken in arrival order, as they would
    /// be in micro-batches of their own). (`&mut`: a shared borrow of the state held across
    /// the key plan's await would make the step's future not `Send`.)
    async fn absorbed(
        &mut self,
        batch: &RecordBatch,
        times: &TimestampMillisecondArray,
        future_limit: i64,
    ) -> Result<std::collections::HashSet<usize>> {
        let mut absorbed = std::collections::HashSet::new();
        let Some(w) = self
            .windowed
            .as_ref()
            .filter(|w| w.operator.keyed_lateness())
        else {
            return Ok(absorbed);
        };
        let timely_from = w.operator.timely_from();
        let late_alone: Vec<bool> = times
            .iter()
            .map(|t| {
                t.is_some_and(|t| {
                    in_time_range(t)
                        && t < timely_from
                        && t <= future_limit
                        && w.operator.is_late(t)
                })
            })
            .collect();
        if !late_alone.contains(&true) {
            return Ok(absorbed);
        }
        // A session is [first, last + gap): an event at t reaches one holding an event less
        // than the gap from t.
        let gap = w.operator.last_window_end(0);
        let reaches = |points: Option<&std::collections::BTreeSet<i64>>, t: i64| {
            points.is_some_and(|p| {
                p.range(t.saturating_sub(gap).saturating_add(1)..t.saturating_add(gap))
                    .next()
                    .is_some()
            })
        };
        // The rows that take part: placed in time, not stamped in the future.
        let considered: Vec<u32> = times
            .iter()
            .enumerate()
            .filter_map(|(r, t)| {
                t.filter(|&t| t <= future_limit && in_time_range(t))
                    .map(|_| r as u32)
            })
            .collect();
        if w.groups.is_empty() {
            let ts: Vec<i64> = considered
                .iter()
                .map(|&r| times.value(r as usize))
                .collect();
            let live_late = w.operator.late_for_keys(&[], &ts)?;
            let mut points = std::collections::BTreeSet::new();
            for ((&r, &t), late) in considered.iter().zip(&ts).zip(live_late) {
                if late_alone[r as usize] {
                    if late && !reaches(Some(&points), t) {
                        continue;
                    }
                    absorbed.insert(r as usize);
                }
                points.insert(t);
            }
            return Ok(absorbed);
        }
        let subset = datafusion::arrow::compute::take_record_batch(
            batch,
            &datafusion::arrow::array::UInt32Array::from(considered.clone()),
        )?;
        let pieces = match self
            .windowed
            .as_mut()
            .and_then(|w| w.lateness_keys.as_mut())
        {
            Some(plan) => plan.keys(&subset).await?,
            None => return Ok(absorbed),
        };
        let Some(w) = &self.windowed else {
            return Ok(absorbed);
        };
        // Per row taken part, its groups (a lookup join may give several; the query's
        // filters none), each with whether a live session of it reaches the row.
        let mut groups: Vec<Vec<(Vec<u8>, bool)>> = vec![Vec::new(); considered.len()];
        let owner = self.owner;
        for (rows, keys) in pieces {
            // In stage 2 of a repartitioned query, only the groups this partition holds.
            let (rows, keys) = match owner {
                Some((n, q)) => {
                    let mine: BooleanArray = super::repartition::group_partitions(&keys, n)?
                        .into_iter()
                        .map(|p| Some(p == q))
                        .collect();
                    let rows = datafusion::arrow::compute::filter(&rows, &mine)?;
                    let keys = keys
                        .iter()
                        .map(|k| datafusion::arrow::compute::filter(k, &mine))
                        .collect::<std::result::Result<Vec<_>, _>>()?;
                    let Some(rows) = rows
                        .as_any()
                        .downcast_ref::<datafusion::arrow::array::UInt32Array>()
                        .cloned()
                    else {
                        return plan_err!("internal: row numbers are not UInt32");
                    };
                    (rows, keys)
                }
                None => (rows, keys),
            };
            let ts: Vec<i64> = rows
                .values()
                .iter()
                .map(|&i| times.value(considered[i as usize] as usize))
                .collect();
            let live_late = w.operator.late_for_keys(&keys, &ts)?;
            let encoded = datafusion::arrow::row::RowConverter::new(
                keys.iter()
                    .map(|k| datafusion::arrow::row::SortField::new(k.data_type().clone()))
                    .collect(),
            )?
            .convert_columns(&keys)?;
            for (j, &i) in rows.values().iter().enumerate() {
                groups[i as usize].push((encoded.row(j).as_ref().to_vec(), !live_late[j]));
            }
        }
        let mut points: HashMap<Vec<u8>, std::collections::BTreeSet<i64>> = HashMap::new();
        for (i, &r) in considered.iter().enumerate() {
            let t = times.value(r as usize);
            if late_alone[r as usize] {
                let reached = !groups[i].is_empty()
                    && groups[i]
                        .iter()
                        .all(|(g, live)| *live || reaches(points.get(g), t));
                if !reached {
                    continue;
                }
                absorbed.insert(r as usize);
            }
            for (g, _) in &groups[i] {
                points.entry(g.clone()).or_default().insert(t);
            }
        }
        Ok(absorbed)
    }

    /// Splits off rows that must not be processed, and feeds the watermark with the rest:
    /// rows of event-time column `time` of the source (`input` none) or of a union's other
    /// stream `input`.
    async fn admit(
        &mut self,
        batch: &RecordBatch,
        partitions: &[i32],
        offsets: Option<&[i64]>,
        (time, input): (&str, Option<usize>),
        now_ms: i64,
        diverted: &mut Vec<Diverted>,
    ) -> Result<RecordBatch> {
        let times = &event_times(batch, time)?;
        let tolerance = match (input, &self.union) {
            (Some(i), Some(u)) => u.others[i].table.options.future_tolerance,
            _ => self.source.options.future_tolerance,
        };
        let future_limit = now_ms.saturating_add(tolerance.as_millis() as i64);
        let watermark = self.watermark().unwrap_or(i64::MIN);
        let absorbed = self.absorbed(batch, times, future_limit).await?;
        let timely_from = self
            .windowed
            .as_ref()
            .map_or(i64::MIN, |w| w.operator.timely_from());
        // Rows put in order (LAG, detectors over the events) of one stream: a row behind the
        // watermark the rows before it in the micro-batch made would come after rows already
        // released, had they arrived in micro-batches of their own; it is judged row by row,
        // so that whether it is late does not depend on how the input was cut. Told cheaply
        // when no row is behind the highest watermark the micro-batch could make.
        let mut running = match (&self.ordered, input, &self.union) {
            (Some(_), None, None) => {
                let reach = datafusion::arrow::compute::max(times)
                    .map_or(i64::MIN, |hi| self.watermarks.reachable(hi, now_ms));
                datafusion::arrow::compute::min(times)
                    .is_some_and(|lo| lo < reach && watermark < reach)
                    .then(|| (self.watermarks.clone(), reach, false))
            }
            _ => None,
        };
        let forced = match input {
            None => std::mem::take(&mut self.forced_late),
            Some(_) => Vec::new(),
        };
        let mut next_forced = 0;
        let mut keep = Vec::with_capacity(batch.num_rows());
        let mut max_by_partition = NewestByPartition::default();
        let mut run: Option<((i64, i32), i64)> = None;
        for (r, t) in times.iter().enumerate() {
            let Some(t) = t else {
                // A null event time cannot be placed in time: it goes to the late output.
                diverted.push(Diverted {
                    row: r as u32,
                    event_time: None,
                    watermark,
                    reason: DivertReason::MissingEventTime,
                    window: None,
                });
                keep.push(false);
                continue;
            };
            // The watermark this row is judged by, when the rows before it moved it.
            let mut moved = None;
            let reason = if !in_time_range(t) {
                Some(DivertReason::EventTimeOutOfRange)
            } else if t > future_limit {
                Some(DivertReason::FutureTimestamp)
            } else if let Some(&(_, w)) = forced.get(next_forced).filter(|(f, _)| *f == r as u32) {
                // Its windows closed by the rows before it in the micro-batch.
                next_forced += 1;
                moved = Some(w);
                Some(DivertReason::BeyondAllowedLateness)
            } else if t < timely_from
                && self
                    .windowed
                    .as_ref()
                    .is_some_and(|w| w.operator.is_late(t))
                && !absorbed.contains(&r)
            {
                Some(DivertReason::BeyondAllowedLateness)
            } else if self.ordered.is_some() && t < watermark {
                // Rows before the watermark have been put in order: it would come after.
                Some(DivertReason::BeyondAllowedLateness)
            } else if let Some((tracker, _, true)) =
                running.as_mut().filter(|(_, reach, _)| t < *reach)
                && let Some(w) = tracker.advance(now_ms).filter(|w| t < *w)
            {
                moved = Some(w);
                Some(DivertReason::BeyondAllowedLateness)
            } else {
                None
            };
            match reason {
                Some(reason) => {
                    // A late row still shows how far its partition has come: a partition
                    // whose first rows are late holds the watermark from then on, so that its
                    // next rows, on time, are not found late against the others alone.
                    if matches!(reason, DivertReason::BeyondAllowedLateness) {
                        let p = partitions.get(r).copied().unwrap_or(0);
                        max_by_partition.observe(p, t);
                        if let Some((tracker, _, seen)) = &mut running {
                            tracker.observe(p, t, now_ms);
                            *seen = true;
                        }
                    }
                    diverted.push(Diverted {
                        row: r as u32,
                        event_time: Some(t),
                        watermark: moved.unwrap_or(watermark),
                        reason,
                        window: None,
                    });
                    keep.push(false);
                }
                None => {
                    // Kept, but too late for some of its windows: each missed one is
                    // recorded, so that nothing leaves a window without a trace.
                    if let Some(w) = self.windowed.as_ref().filter(|_| t < timely_from) {
                        for window in w.operator.closed_windows_of(t) {
                            diverted.push(Diverted {
                                row: r as u32,
                                event_time: Some(t),
                                watermark,
                                reason: DivertReason::WindowClosed,
                                window: Some(window),
                            });
                        }
                    }
                    // A device clock ahead of processing time (within the tolerance) moves
                    // the watermark no further than processing time as it passes
                    // (`WatermarkTracker::advance`): the events stamped correctly after it
                    // are not made late, and its own window still closes once the clock
                    // reaches its time.
                    let p = partitions.get(r).copied().unwrap_or(0);
                    max_by_partition.observe(p, t);
                    if let Some((tracker, _, seen)) = &mut running {
                        tracker.observe(p, t, now_ms);
                        *seen = true;
                    }
                    if let (true, Some(&offset)) =
                        (self.ordered.is_some(), offsets.and_then(|o| o.get(r)))
                    {
                        // Held until the watermark passes the next second.
                        let key = (t.div_euclid(1000).saturating_add(1).saturating_mul(1000), p);
                        match &mut run {
                            Some((k, min)) if *k == key => *min = (*min).min(offset),
                            _ => {
                                if let Some((k, min)) = run.replace((key, offset)) {
                                    hold(held_map(&mut self.held, &mut self.union, input), k, min);
                                }
                            }
                        }
                    }
                    if let (Some(w), Some(&offset)) =
                        (&self.windowed, offsets.and_then(|o| o.get(r)))
                    {
                        // Rows of a batch mostly share (window end, partition): merge each run
                        // into the held offsets once.
                        let key = (w.last_window_end(t), p);
                        match &mut run {
                            Some((k, min)) if *k == key => *min = (*min).min(offset),
                            _ => {
                                if let Some((k, min)) = run.replace((key, offset)) {
                                    hold(held_map(&mut self.held, &mut self.union, input), k, min);
                                }
                            }
                        }
                    }
                    keep.push(true);
                }
            }
        }
        if let Some((k, min)) = run {
            hold(held_map(&mut self.held, &mut self.union, input), k, min);
        }
        let tracker = match (input, &mut self.union) {
            (Some(i), Some(u)) => &mut u.others[i].watermarks,
            _ => &mut self.watermarks,
        };
        for (p, t) in max_by_partition.entries {
            tracker.observe(p, t, now_ms);
        }
        if keep.iter().all(|k| *k) {
            return Ok(batch.clone());
        }
        Ok(filter_record_batch(batch, &BooleanArray::from(keep))?)
    }

    /// [`StreamQuery::emit_due`], a failure on values named as one above the window. A
    /// window's result the plan above the windows fails on (a count of 0 as a divisor) goes
    /// to the DLQ ([`RefusedResult`]), as does a row between stages of windows, but where
    /// the query keeps state above its windows (detectors, `LAG`) or ranks (top-N): there it
    /// fails the query, which says where and how to guard it.
    async fn emit(&mut self, now_ms: i64, out: &mut StepOutput) -> Result<()> {
        // What keeps a window's result from going to the DLQ alone, as the query has it.
        let mut kept_in = Vec::new();
        if !self.keyed.is_empty() {
            kept_in.push("detectors or alerts");
        }
        if !self.lags.is_empty() {
            kept_in.push("LAG");
        }
        if self.windowed.as_ref().is_some_and(|w| w.ranked.is_some()) {
            kept_in.push("a ranking");
        }
        let why = match kept_in.is_empty() {
            true => String::new(),
            false => format!(
                "; with {} above the windows, a window's result cannot be left out to the DLQ",
                kept_in.join(", ")
            ),
        };
        self.emit_due(now_ms, out).await.map_err(|e| {
            if is_value_error(&e) {
                datafusion::error::DataFusionError::Execution(format!(
                    "the query failed on a result of its window, above the GROUP BY ({}){why}: \
                     guard the expression, e.g. x / NULLIF(count(y), 0), or TRY_CAST(x AS …)",
                    e.find_root()
                ))
            } else {
                e
            }
        })
    }

    async fn emit_due(&mut self, now_ms: i64, out: &mut StepOutput) -> Result<()> {
        if self.ordered.is_some() {
            let watermark = self.input_watermark(now_ms).unwrap_or(i64::MIN);
            // Detectors' timers (a sensor gone silent) fire on the watermark, with or
            // without rows released.
            let timers = self.keyed.iter().any(KeyedHandle::has_timers);
            if let Some(o) = &mut self.ordered
                && let Some(rows) = match o.release(watermark)? {
                    None if timers => Some(RecordBatch::new_empty(o.schema.clone())),
                    released => released,
                }
            {
                o.feed.set(vec![rows]);
                for b in o.upper.collect(self.task_ctx.clone()).await? {
                    if b.num_rows() > 0 {
                        out.rows.push(named(&self.output_schema, b)?);
                    }
                }
            }
            // Rows before the watermark are released: their offsets may be committed.
            self.held = self.held.split_off(&watermark.saturating_add(1));
            for l in &self.lags {
                l.handle.expire(watermark);
            }
        }
        if self.windowed.is_none() {
            return Ok(());
        }
        let watermark = self.input_watermark(now_ms).unwrap_or(i64::MIN);
        let Some(w) = &mut self.windowed else {
            return Ok(());
        };
        let early = match self.early_fire_ms {
            Some(every) if now_ms.saturating_sub(self.last_early_fire_ms) >= every => {
                self.last_early_fire_ms = now_ms;
                true
            }
            _ => false,
        };
        let mut emissions = w.operator.advance(watermark, early)?;
        if let Some(u) = &mut self.upsert {
            u.evict(|t| w.operator.is_late(t));
        }
        // The stages above take what the ones below emit in the same step, and close their
        // windows on watermarks that trail by at most their lag: no topic round trip. A stage
        // that stopped at its emission budget holds the watermark above it back to the
        // windows it has emitted.
        let mut watermark = w.operator.emitted_through(watermark);
        let mut w = w;
        loop {
            if w.next.is_none() {
                break;
            }
            let Some(next) = w.next.as_deref_mut() else {
                break;
            };
            // Keyed state and LAG sit above the last stage: a run between stages learns
            // nothing, and is run again over the rows it fails on.
            next.take(&emissions, &self.task_ctx, &mut out.refused)
                .await?;
            watermark = next.watermark(watermark);
            emissions = next.stage.operator.advance(watermark, early)?;
            watermark = next.stage.operator.emitted_through(watermark);
            next.evict();
            w = &mut next.stage;
        }
        // Keyed timers above the aggregation (alert expiries, silences) fire in event-time
        // order with the windows' rows: while the rows of a window are processed, the keyed
        // operators see the watermark at that window's end, as if each window had closed in a
        // step of its own; the query's watermark reaches them after the last window, in a run
        // of the upper plan without rows. So one step that closes several windows (a catch-up
        // or backfill) gives what one step per window gives.
        let timers = self.keyed.iter().any(KeyedHandle::has_timers);
        if timers {
            emissions.push(Emission {
                batch: RecordBatch::new_empty(w.upper_schema.clone()),
                revisions: Vec::new(),
                is_final: true,
                retract: false,
                until: watermark,
            });
        }
        let evicted = w.operator.evicted_through();
        self.held = self.held.split_off(&evicted.saturating_add(1));
        if let Some(j) = &mut self.join {
            j.held_right = j.held_right.split_off(&evicted.saturating_add(1));
        }
        if let Some(u) = &mut self.union {
            for o in &mut u.others {
                o.held = o.held.split_off(&evicted.saturating_add(1));
            }
        }
        if let Some(ranked) = &mut w.ranked {
            // Top-N: the step's emissions are taken first (a window over a changelog may
            // emit updates and retractions of one window apart); then each window that
            // emitted is ranked afresh over all of its groups, once, and what entered or
            // left the result is published.
            let mut touched: std::collections::BTreeMap<i64, bool> = Default::default();
            for emission in &emissions {
                if emission.batch.num_rows() == 0 {
                    continue;
                }
                let rows = super::chain::as_changelog(
                    &emission.batch,
                    w.window_position,
                    emission.retract,
                    &ranked.rows_schema(),
                )?;
                for end in ranked.take(&rows)? {
                    *touched.entry(end).or_default() |= emission.is_final;
                }
            }
            let ends = touched.keys().copied().collect();
            for (end, current) in ranked.windows(&ends)? {
                let is_final = touched.get(&end).copied().unwrap_or(false);
                w.upper_feed.set(vec![current]);
                let result = w.upper.collect(self.task_ctx.clone()).await?;
                let change = ranked.publish(end, &result, is_final)?;
                out.rows.extend(changelog_rows(
                    &self.output_schema,
                    &change.left,
                    change.revision,
                    is_final,
                    "retract",
                )?);
                out.rows.extend(changelog_rows(
                    &self.output_schema,
                    &change.entered,
                    change.revision,
                    is_final,
                    if change.first { "insert" } else { "update" },
                )?);
            }
            ranked.evict_through(evicted);
            expire_lags(&self.lags, watermark);
            return Ok(());
        }
        for emission in emissions {
            pass_watermark(&self.keyed, emission.until.min(watermark));
            // Rows of one revision go through the upper plan together, so that each output
            // row keeps its revision even when HAVING drops rows.
            let mut by_revision: std::collections::BTreeMap<u32, Vec<bool>> = Default::default();
            for (i, r) in emission.revisions.iter().enumerate() {
                by_revision
                    .entry(*r)
                    .or_insert_with(|| vec![false; emission.revisions.len()])[i] = true;
            }
            if by_revision.is_empty() {
                // No window closed: the upper plan still runs, for its keyed timers.
                by_revision.insert(0, Vec::new());
            }
            for (revision, mask) in by_revision {
                let rows = filter_record_batch(&emission.batch, &BooleanArray::from(mask))?;
                let op = match (emission.retract, revision) {
                    (true, _) => "retract",
                    (false, 0) => "insert",
                    (false, _) => "update",
                };
                // Keyed state above the windows (detectors, LAG) would learn a row again at
                // each run over it: only a plan without any is run again to find the rows
                // it fails on.
                let (published, rows) = if self.keyed.is_empty() && self.lags.is_empty() {
                    let before = out.refused.len();
                    let isolated = isolated(
                        &w.upper_feed,
                        &w.upper,
                        rows,
                        &self.task_ctx,
                        &mut out.refused,
                    )
                    .await?;
                    if revision > 0 {
                        for r in &mut out.refused[before..] {
                            r.error.push_str(&format!(
                                " (revision {revision} of the window's result, whose earlier \
                                 revision stays published)"
                            ));
                        }
                    }
                    isolated
                } else {
                    w.upper_feed.set(vec![rows.clone()]);
                    (w.upper.collect(self.task_ctx.clone()).await?, rows)
                };
                // A revision that no longer passes the conditions over the window's rows:
                // the row published for its key and window (by an earlier revision) is
                // withdrawn.
                let mut withdrawn = Vec::new();
                match (&w.having, revision > 0, emission.retract) {
                    (
                        Some(Having::Direct {
                            input,
                            predicate,
                            unfiltered,
                        }),
                        true,
                        false,
                    ) if rows.num_rows() > 0 => {
                        w.upper_feed.set(vec![rows.clone()]);
                        let tested = input.collect(self.task_ctx.clone()).await?;
                        let tested =
                            datafusion::arrow::compute::concat_batches(&input.schema(), &tested)?;
                        if tested.num_rows() != rows.num_rows() {
                            return plan_err!(
                                "internal: the rows under HAVING are not the window's"
                            );
                        }
                        let pass = predicate.evaluate(&tested)?.into_array(tested.num_rows())?;
                        let pass = cast(&pass, &DataType::Boolean)?;
                        let Some(pass) = pass.as_any().downcast_ref::<BooleanArray>() else {
                            return plan_err!("internal: HAVING is not a condition");
                        };
                        let failing: BooleanArray =
                            pass.iter().map(|p| Some(p != Some(true))).collect();
                        if failing.true_count() > 0 {
                            w.upper_feed
                                .set(vec![filter_record_batch(&rows, &failing)?]);
                            withdrawn = unfiltered.collect(self.task_ctx.clone()).await?;
                        }
                    }
                    (
                        Some(Having::Rerun {
                            unfiltered,
                            rows: converter,
                        }),
                        true,
                        false,
                    ) if rows.num_rows() > 0 => {
                        w.upper_feed.set(vec![rows.clone()]);
                        let all = unfiltered.collect(self.task_ctx.clone()).await?;
                        withdrawn = dropped(converter, &all, &published)?;
                    }
                    _ => {}
                }
                let withdrawn = withdrawn.into_iter().map(|b| (b, "retract"));
                for (b, op) in withdrawn.chain(published.into_iter().map(|b| (b, op))) {
                    out.rows.extend(changelog_rows(
                        &self.output_schema,
                        &b,
                        revision,
                        emission.is_final,
                        op,
                    )?);
                }
            }
        }
        // Keys silent for the TTL go once the step's windows have all been through LAG: the
        // first of several windows closed in one step may follow a key's row the step's
        // watermark is already a TTL past.
        expire_lags(&self.lags, watermark);
        Ok(())
    }
}

/// The rows of `old` that `new` does not have, and those of `new` that `old` does not have,
/// counting repeats (rows of `schema`).
fn multiset_difference(
    schema: &SchemaRef,
    old: &[RecordBatch],
    new: &[RecordBatch],
) -> Result<(RecordBatch, RecordBatch)> {
    use datafusion::arrow::row::{RowConverter, SortField};
    let converter = RowConverter::new(
        schema
            .fields()
            .iter()
            .map(|f| SortField::new(f.data_type().clone()))
            .collect(),
    )?;
    let old = datafusion::arrow::compute::concat_batches(schema, old)?;
    let new = datafusion::arrow::compute::concat_batches(schema, new)?;
    let old_rows = converter.convert_columns(old.columns())?;
    let new_rows = converter.convert_columns(new.columns())?;
    let mut count: HashMap<&[u8], i64> = HashMap::new();
    for r in old_rows.iter() {
        *count.entry(r.data()).or_default() += 1;
    }
    for r in new_rows.iter() {
        *count.entry(r.data()).or_default() -= 1;
    }
    let mut pick = |rows: &datafusion::arrow::row::Rows, sign: i64| {
        let mut taken = Vec::new();
        for (i, r) in rows.iter().enumerate() {
            if let Some(c) = count.get_mut(r.data())
                && *c * sign > 0
            {
                *c -= sign;
                taken.push(i as u32);
            }
        }
        datafusion::arrow::array::UInt32Array::from(taken)
    };
    let gone = pick(&old_rows, 1);
    let came = pick(&new_rows, -1);
    Ok((
        datafusion::arrow::compute::take_record_batch(&old, &gone)?,
        datafusion::arrow::compute::take_record_batch(&new, &came)?,
    ))
}

/// Runs a plan above the windows (over a window's results, or between stages of windows)
/// over `rows`, leaving out the rows it fails on by their values alone ([`is_value_error`];
/// found as [`Isolating`] finds them), which are pushed to `refused`: the output and the rows
/// kept. A function failing on every row of `rows` (a constant argument it refuses) fails,
/// as does any other error.
pub(super) async fn isolated(
    feed: &Feed,
    plan: &ReusedPlan,
    rows: RecordBatch,
    ctx: &Arc<TaskContext>,
    refused: &mut Vec<RefusedResult>,
) -> Result<(Vec<RecordBatch>, RecordBatch)> {
    feed.set(vec![rows.clone()]);
    match plan.collect(ctx.clone()).await {
        Ok(out) => return Ok((out, rows)),
        Err(e) if !is_data_error(&e) => return Err(e),
        Err(_) => {}
    }
    let mut runs = Isolating::new(rows.num_rows());
    let mut out = Vec::new();
    let mut failed = Vec::new();
    while let Some((start, len)) = runs.next() {
        feed.set(vec![rows.slice(start, len)]);
        let run = plan.collect(ctx.clone()).await;
        out.extend(runs.took(run, &mut failed)?.into_iter().flatten());
    }
    let (in_functions, passed) = runs.before_a_pass();
    if in_functions > 0
        && !passed
        && let Some(error) = runs.error.take()
    {
        return Err(error);
    }
    let mut keep = vec![true; rows.num_rows()];
    for (row, error) in failed {
        keep[row as usize] = false;
        let one = rows.slice(row as usize, 1);
        // A row JSON cannot write is given as Arrow shows it, rather than fail the query.
        let row = row_json(&one).unwrap_or_else(|_| {
            datafusion::arrow::util::pretty::pretty_format_batches(&[one])
                .map(|t| t.to_string())
                .unwrap_or_default()
        });
        refused.push(RefusedResult { row, error });
    }
    let kept = filter_record_batch(&rows, &BooleanArray::from(keep))?;
    Ok((out, kept))
}

/// A window's row as one JSON object, as an analyst reads it: its window (a struct of
/// `window_start` and `window_end` named after the window function's call) as two fields, and
/// `count(*)` so named.
fn row_json(row: &RecordBatch) -> Result<String> {
    let schema = row.schema();
    let mut fields: Vec<Field> = Vec::new();
    let mut columns: Vec<ArrayRef> = Vec::new();
    for (f, c) in schema.fields().iter().zip(row.columns()) {
        match (
            f.data_type(),
            datafusion::arrow::array::AsArray::as_struct_opt(c),
        ) {
            (DataType::Struct(inner), Some(s))
                if inner.iter().any(|i| i.name() == "window_start") =>
            {
                for (i, field) in inner.iter().enumerate() {
                    if schema.field_with_name(field.name()).is_err() {
                        fields.push(field.as_ref().clone());
                        columns.push(s.column(i).clone());
                    }
                }
            }
            _ => {
                let name = f.name().replace("count(Int64(1))", "count(*)");
                fields.push(f.as_ref().clone().with_name(name));
                columns.push(c.clone());
            }
        }
    }
    let row = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?;
    let mut writer = datafusion::arrow::json::LineDelimitedWriter::new(Vec::new());
    writer.write(&row)?;
    writer.finish()?;
    Ok(String::from_utf8_lossy(&writer.into_inner())
        .trim_end()
        .to_string())
}

/// Whether `expr` is a column named one of `names`.
fn is_column(expr: &Arc<dyn datafusion::physical_expr::PhysicalExpr>, names: &[&str]) -> bool {
    expr.downcast_ref::<datafusion::physical_expr::expressions::Column>()
        .is_some_and(|c| names.iter().any(|n| c.name().eq_ignore_ascii_case(n)))
}

/// Drops the keys of `lags` silent for their TTL at `watermark`.
fn expire_lags(lags: &[crate::state::lag::LagState], watermark: i64) {
    for l in lags {
        l.handle.expire(watermark);
    }
}

/// Rows of the upper plan `b` with their changelog columns (`revision`, `is_final`, `op`),
/// as `schema` has them; none for an empty batch.
fn changelog_rows(
    schema: &SchemaRef,
    b: &RecordBatch,
    revision: u32,
    is_final: bool,
    op: &str,
) -> Result<Option<RecordBatch>> {
    let n = b.num_rows();
    if n == 0 {
        return Ok(None);
    }
    let mut columns: Vec<ArrayRef> = b.columns().to_vec();
    columns.push(Arc::new(Int32Array::from(vec![revision as i32; n])));
    columns.push(Arc::new(BooleanArray::from(vec![is_final; n])));
    columns.push(Arc::new(StringArray::from(vec![op; n])));
    Ok(Some(RecordBatch::try_new(schema.clone(), columns)?))
}

/// One stream of a union at one processing time, for [`union_watermark`].
#[derive(Debug, Clone, Copy)]
struct UnionMark {
    watermark: Option<i64>,
    idle: Option<bool>,
    last_delivered: Option<i64>,
    idle_ms: i64,
}

impl UnionMark {
    /// `tracker`'s, advanced to `now_ms`.
    fn of(tracker: &mut crate::time::WatermarkTracker, now_ms: i64) -> Self {
        Self {
            watermark: tracker.advance(now_ms),
            idle: tracker.is_idle(now_ms),
            last_delivered: tracker.last_delivered(),
            idle_ms: tracker.idle_ms(),
        }
    }
}

/// The watermark of a union from its streams' at one processing time: the lowest of them; a
/// stream gone idle, or with no partition seen or expected, holds nothing back; one
/// expecting partitions that have not delivered holds everything. With every stream idle,
/// the lowest of those that delivered last (within their idle timeout of the last delivery),
/// as a stream's watermark follows its partitions: a burst on every stream shorter than the
/// idle timeout (the backlog read after a restart) moved each stream's watermark only once
/// all were idle, which the union left out, and its windows stayed open for good.
fn union_watermark(marks: Vec<UnionMark>) -> Option<i64> {
    let mut low: Option<i64> = None;
    for m in &marks {
        match (m.watermark, m.idle) {
            (_, Some(true)) | (None, None) => {}
            (None, Some(false)) => return None,
            (Some(w), _) => low = Some(low.map_or(w, |l| l.min(w))),
        }
    }
    low.or_else(|| {
        let last = marks.iter().filter_map(|m| m.last_delivered).max()?;
        marks
            .iter()
            .filter(|m| {
                m.last_delivered
                    .is_some_and(|d| last.saturating_sub(d) < m.idle_ms)
            })
            .filter_map(|m| m.watermark)
            .min()
    })
}

/// Passes `watermark` to keyed states; whether some of them have timers.
fn pass_watermark(keyed: &[KeyedHandle], watermark: i64) -> bool {
    let mut timers = false;
    for h in keyed {
        h.set_watermark(watermark);
        timers |= h.has_timers();
    }
    timers
}

/// The rows of `arrived` that `failed` names by their index among the rows its admission
/// kept (the others are `diverted`, once each; those too late for only some of their
/// windows stay in), with their event time (column `time`).
fn failed_inputs(
    arrived: &RecordBatch,
    diverted: &[Diverted],
    time: Option<&str>,
    failed: Vec<(u32, String)>,
) -> Result<Vec<Failed>> {
    let left_out: std::collections::HashSet<u32> = diverted
        .iter()
        .filter(|d| !matches!(d.reason, DivertReason::WindowClosed))
        .map(|d| d.row)
        .collect();
    let kept: Vec<u32> = (0..arrived.num_rows() as u32)
        .filter(|r| !left_out.contains(r))
        .collect();
    let times = time.map(|t| event_times(arrived, t)).transpose()?;
    Ok(failed
        .into_iter()
        .map(|(row, error)| {
            let row = kept[row as usize];
            Failed {
                row,
                event_time: times
                    .as_ref()
                    .and_then(|t| t.is_valid(row as usize).then(|| t.value(row as usize))),
                error,
            }
        })
        .collect())
}

/// Runs of a plan over a batch that leave out the rows it fails on by their values alone
/// ([`is_data_error`]): the whole batch first; where that fails, the rows that fail are found
/// by halving it (a run per half, down to single rows: about 2·k·log₂ n runs for k such rows
/// of n). An error the plan also makes of no rows is not the rows' doing: it is the result.
///
/// ```text
/// let mut runs = Isolating::new(n);
/// while let Some((start, len)) = runs.next() {
///     let run = plan(batch.slice(start, len));
///     if let Some(out) = runs.took(run, &mut failed)? { outputs.push(out) }
/// }
/// ```
struct Isolating {
    n: usize,
    /// Ranges still to run, the next on top.
    ranges: Vec<(usize, usize)>,
    /// The range last handed out.
    current: Option<(usize, usize)>,
    /// The run over the whole batch's error, once it failed.
    error: Option<datafusion::common::DataFusionError>,
    /// Whether the run of no rows (after the whole batch failed) is out.
    probing: bool,
    /// The rows failed alone, in row order, and whether on a value ([`is_value_error`]) rather
    /// than in a function.
    failures: Vec<(u32, bool)>,
}

impl Isolating {
    fn new(n: usize) -> Self {
        Self {
            n,
            ranges: vec![(0, n)],
            current: None,
            error: None,
            probing: false,
            failures: Vec::new(),
        }
    }

    /// The next range of rows to run, (start, length).
    fn next(&mut self) -> Option<(usize, usize)> {
        self.current = self.ranges.pop();
        self.current
    }

    /// Takes the run over the range last handed out: its output when it passed; rows it
    /// failed on, alone, are pushed to `failed` (in row order) with the error.
    fn took<T>(&mut self, run: Result<T>, failed: &mut Vec<(u32, String)>) -> Result<Option<T>> {
        let Some((start, len)) = self.current.take() else {
            return Ok(None);
        };
        if self.probing {
            self.probing = false;
            return match (run, self.error.take()) {
                (Ok(_), Some(error)) => {
                    if self.n == 1 {
                        failed.push((0, error.to_string()));
                        self.failures.push((0, is_value_error(&error)));
                    } else {
                        let n = self.n;
                        self.ranges = vec![(n / 2, n - n / 2), (0, n / 2)];
                    }
                    self.error = Some(error);
                    Ok(None)
                }
                (_, error) => Err(error.unwrap_or_else(|| {
                    datafusion::common::DataFusionError::Internal("no error to isolate".into())
                })),
            };
        }
        match run {
            Ok(out) => Ok(Some(out)),
            Err(e) if self.error.is_none() && is_data_error(&e) && self.n > 0 => {
                // The whole batch failed: does the plan fail on no rows too?
                self.error = Some(e);
                self.probing = true;
                self.ranges = vec![(0, 0)];
                Ok(None)
            }
            Err(e) if self.error.is_some() && is_data_error(&e) => {
                if len == 1 {
                    failed.push((start as u32, e.to_string()));
                    self.failures.push((start as u32, is_value_error(&e)));
                } else {
                    self.ranges.push((start + len / 2, len - len / 2));
                    self.ranges.push((start, len / 2));
                }
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// How many rows failed in a function, in row order, before the first that passed, and
    /// whether one passed (rows failed on a value count neither way).
    fn before_a_pass(&self) -> (u64, bool) {
        let mut failures = self.failures.iter().peekable();
        let mut in_functions = 0;
        for row in 0..self.n as u32 {
            match failures.next_if(|(r, _)| *r == row) {
                Some((_, true)) => {}
                Some((_, false)) => in_functions += 1,
                None => return (in_functions, true),
            }
        }
        (in_functions, false)
    }
}

/// The event times of `batch`, in milliseconds, from column `time`.
fn event_times(batch: &RecordBatch, time: &str) -> Result<TimestampMillisecondArray> {
    let column = batch
        .column_by_name(time)
        .ok_or_else(|| plan_datafusion_err!("event-time column {time} missing"))?;
    let column = cast(column, &DataType::Timestamp(TimeUnit::Millisecond, None))?;
    match column.as_any().downcast_ref::<TimestampMillisecondArray>() {
        Some(times) => Ok(times.clone()),
        None => plan_err!("event-time column {time} is not a timestamp"),
    }
}

/// Refuses a batch that does not have stream `table`'s schema (column count and types).
fn check_schema(table: &StreamTable, batch: &RecordBatch) -> Result<()> {
    let expected = table.topic_schema.output_schema();
    if batch.num_columns() != expected.fields().len()
        || batch
            .schema()
            .fields()
            .iter()
            .zip(expected.fields())
            .any(|(a, b)| a.data_type() != b.data_type())
    {
        return plan_err!(
            "a batch for stream {} does not have the stream's schema: got {}, expected {}",
            table.name,
            batch.schema(),
            expected
        );
    }
    Ok(())
}

/// The held offsets of the query's source (`input` none) or of a union's other stream.
fn held_map<'a>(
    held: &'a mut std::collections::BTreeMap<i64, HashMap<i32, i64>>,
    union: &'a mut Option<Box<super::union::UnionInput>>,
    input: Option<usize>,
) -> &'a mut std::collections::BTreeMap<i64, HashMap<i32, i64>> {
    match (input, union) {
        (Some(i), Some(u)) => &mut u.others[i].held,
        _ => held,
    }
}

/// The newest event time of each partition among a batch's rows. A batch's rows mostly come
/// in runs of one partition, so the partition of the row before is tried first: no hashing
/// per row.
#[derive(Default)]
struct NewestByPartition {
    entries: Vec<(i32, i64)>,
    last: usize,
}

impl NewestByPartition {
    fn observe(&mut self, partition: i32, t: i64) {
        let i = match self.entries.get(self.last) {
            Some((p, _)) if *p == partition => self.last,
            _ => match self.entries.iter().position(|(p, _)| *p == partition) {
                Some(i) => i,
                None => {
                    self.entries.push((partition, t));
                    self.entries.len() - 1
                }
            },
        };
        self.last = i;
        let newest = &mut self.entries[i].1;
        *newest = (*newest).max(t);
    }
}

/// Records that the window ending at `key.0` holds partition `key.1` from offset `min` on.
fn hold(held: &mut std::collections::BTreeMap<i64, HashMap<i32, i64>>, key: (i64, i32), min: i64) {
    let o = held.entry(key.0).or_default().entry(key.1).or_insert(min);
    *o = (*o).min(min);
}

#[cfg(test)]
mod union_watermark_tests {
    use super::*;
    use crate::time::WatermarkTracker;
    use std::time::Duration;

    /// Two streams restored with an empty partition each, expected again on assignment, then a
    /// burst on their other partitions shorter than the idle timeout: each stream's watermark
    /// moves only once all its partitions are idle, and the union's follows them then. It
    /// stayed behind for good (a union's windows never closed after a restart).
    #[test]
    fn a_union_follows_its_streams_once_every_one_is_idle() {
        let now = 1_000_000;
        let stream = || {
            let mut t = WatermarkTracker::new(Duration::from_secs(5), Duration::from_secs(5));
            for p in 0..4 {
                t.expect(p, now);
            }
            for p in 1..4 {
                t.observe(p, 700_000 + i64::from(p), now + 20);
            }
            t
        };
        let (mut a, mut b) = (stream(), stream());
        let marks = |a: &mut WatermarkTracker, b: &mut WatermarkTracker, at: i64| {
            vec![UnionMark::of(a, at), UnionMark::of(b, at)]
        };
        // The empty partitions hold both streams while they are expected.
        assert_eq!(
            union_watermark(marks(&mut a, &mut b, now + 1_000)),
            Some(i64::MIN)
        );
        let later = now + 20 + 5_000;
        assert_eq!(
            union_watermark(marks(&mut a, &mut b, later)),
            Some(695_001),
            "every stream idle: the lowest of those that delivered last"
        );
        // A stream silent long before the other's last delivery holds nothing back.
        let mut c = WatermarkTracker::new(Duration::from_secs(5), Duration::from_secs(5));
        c.observe(0, 100_000, now - 60_000);
        let at = later + 1;
        let with_silent = vec![UnionMark::of(&mut a, at), UnionMark::of(&mut c, at)];
        assert_eq!(union_watermark(with_silent), Some(695_001));
    }
}
