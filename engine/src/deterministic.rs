//! Deterministic mode: the engine fed from memory, for tests.
//!
//! [`DeterministicEngine`] runs the same planner, operators and sink conformance as the Kafka
//! pipeline, but its sources are fed by SQL `INSERT … VALUES` statements, processing time is
//! set explicitly, and each sink's output is collected in memory where plain `SELECT`s read
//! it. It understands, besides ordinary SQL:
//!
//! | statement | effect |
//! |---|---|
//! | `CREATE EXTERNAL TABLE …`, `CREATE VIEW …`, `DROP …`, `SET urbanstream.… = …` | as in the service |
//! | `CREATE TABLE name (…) AS VALUES (…), …` | a reference table of the rows given (the service takes reference tables from `schemas/reference/` and refuses this) |
//! | `INSERT INTO sink SELECT … FROM stream …` | registers a running stream query |
//! | `INSERT INTO stream [PARTITION n] VALUES (…), …` | feeds one micro-batch to the queries reading `stream`, as Kafka partition `n` (default 0) |
//! | `ADVANCE WATERMARK stream TO '<timestamp>'` | raises the watermark of the queries reading `stream` |
//! | `ADVANCE TIME <duration>` | moves processing time forward (idle partitions, early fire) |
//! | `SET CLOCK '<timestamp>'` | sets processing time |
//! | `SELECT … FROM sink …` | reads what the queries published to `sink` so far |
//! | `SHOW LATE` | the diverted input rows: query, event time, watermark, reason (`query_error: …` for a row the query's plan failed on, which the service sends to the DLQ) |
//! | `RESTART` | checkpoints every query to disk, plans each again from its SQL and restores it from the checkpoint read back, as a restarted service does |

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, RecordBatch, StringArray, TimestampMillisecondArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::common::{DataFusionError, Result, plan_err};
use datafusion::datasource::MemTable;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::{SetExpr, Statement};

use crate::plan::stream::{StepOutput, StreamContext, StreamQuery};
use crate::plan::table::StreamTable;
use crate::sink::conform_stream;

/// What a statement returned.
#[derive(Debug)]
pub enum Outcome {
    /// A statement without rows.
    Done,
    /// Rows of a `SELECT` or `SHOW LATE`.
    Rows(Vec<RecordBatch>),
}

#[derive(Debug, Clone)]
struct LateRow {
    query: usize,
    event_time: Option<i64>,
    watermark: i64,
    /// The reason, with the missed window for `window_closed`.
    reason: String,
}

/// The engine in deterministic mode.
pub struct DeterministicEngine {
    ctx: StreamContext,
    queries: Vec<StreamQuery>,
    outputs: HashMap<String, Vec<RecordBatch>>,
    late: Vec<LateRow>,
    now_ms: i64,
}

impl Default for DeterministicEngine {
    fn default() -> Self {
        Self::new()
    }
}

impl DeterministicEngine {
    /// An engine with no tables; processing time starts at 2030-01-01T00:00:00Z.
    pub fn new() -> Self {
        Self::with_context(StreamContext::new())
    }

    /// An engine over the tables of `ctx` (the city's, from [`crate::plan::city_context`]).
    pub fn with_context(ctx: StreamContext) -> Self {
        Self {
            ctx,
            queries: Vec::new(),
            outputs: HashMap::new(),
            late: Vec::new(),
            now_ms: 1_893_456_000_000,
        }
    }

    /// The stream context, to register tables.
    pub fn context(&self) -> &StreamContext {
        &self.ctx
    }

    /// Runs every statement of `sql`; returns the outcome of the last.
    pub async fn execute(&mut self, sql: &str) -> Result<Outcome> {
        let trimmed = sql.trim().trim_end_matches(';').trim();
        let upper = trimmed.to_ascii_uppercase();
        if let Some(rest) = upper.strip_prefix("ADVANCE TIME ") {
            let d = humantime::parse_duration(rest.trim().to_ascii_lowercase().as_str())
                .map_err(|e| DataFusionError::Plan(format!("ADVANCE TIME: {e}")))?;
            self.now_ms += d.as_millis() as i64;
            return self.tick_all().await;
        }
        if upper.starts_with("SET CLOCK ") {
            self.now_ms = parse_timestamp(&trimmed["SET CLOCK ".len()..])?;
            return self.tick_all().await;
        }
        if upper.starts_with("ADVANCE WATERMARK ") {
            let rest = &trimmed["ADVANCE WATERMARK ".len()..];
            let Some(to) = rest.to_ascii_uppercase().find(" TO ") else {
                return plan_err!("expected ADVANCE WATERMARK <stream> TO '<timestamp>'");
            };
            // Named as in SQL: unquoted, in any case; quoted, as written.
            let name = rest[..to].trim();
            let stream = match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
                Some(quoted) => quoted.to_string(),
                None => name.to_ascii_lowercase(),
            };
            if !self.ctx.session().table_exist(stream.as_str())? {
                return plan_err!("ADVANCE WATERMARK: there is no stream {name}");
            }
            let watermark = parse_timestamp(&rest[to + 4..])?;
            for i in 0..self.queries.len() {
                if self.queries[i].reads(&stream) {
                    let mut out = self.queries[i]
                        .advance_watermark_of(&stream, watermark, self.now_ms)
                        .await?;
                    self.queries[i].finish_step(self.now_ms, &mut out).await?;
                    self.collect(i, out)?;
                }
            }
            return Ok(Outcome::Done);
        }
        if upper == "SHOW LATE" {
            return self.show_late();
        }
        if upper == "RESTART" {
            return self.restart().await;
        }
        let (sql, partition) = strip_partition(trimmed)?;
        let mut outcome = Outcome::Done;
        // Test data comes as SQL too: no size limit on it here.
        for statement in StreamContext::parse_within(&sql, usize::MAX)? {
            outcome = self.statement(statement, partition).await?;
        }
        Ok(outcome)
    }

    async fn statement(&mut self, mut statement: DFStatement, partition: i32) -> Result<Outcome> {
        crate::plan::stream::with_into_insert(&mut statement);
        if let DFStatement::Statement(s) = &statement {
            match s.as_ref() {
                Statement::Insert(insert)
                    if insert
                        .source
                        .as_ref()
                        .is_some_and(|q| matches!(q.body.as_ref(), SetExpr::Values(_))) =>
                {
                    return self.feed(statement, partition).await;
                }
                Statement::Query(_) => return select(self.result_tables(), statement).await,
                Statement::CreateTable(create)
                    if create
                        .query
                        .as_ref()
                        .is_some_and(|q| matches!(q.body.as_ref(), SetExpr::Values(_))) =>
                {
                    // Test data for lookups: the session is used directly, outside the
                    // sandbox, as the engine registers its own reference tables.
                    let session = self.ctx.session();
                    let plan = session.state().statement_to_plan(statement).await?;
                    session.execute_logical_plan(plan).await?.collect().await?;
                    return Ok(Outcome::Done);
                }
                _ => {}
            }
        }
        // Planned as the service plans a client's SQL: on a planning thread of its own, with
        // its budget for what constant expressions make (waited for by blocking: the caller's
        // runtime may have no timer).
        let ctx = self.ctx.clone();
        let planned = crate::plan::sandbox::on_planning_thread_blocking(move || async move {
            ctx.plan(statement).await
        })?;
        if let Some(query) = planned {
            if query.sink().is_none() {
                return plan_err!(
                    "in deterministic mode a stream query is INSERT INTO <sink> SELECT …"
                );
            }
            self.queries.push(query);
        }
        Ok(Outcome::Done)
    }

    /// `INSERT INTO stream VALUES …`: one micro-batch for the queries reading `stream`.
    async fn feed(&mut self, statement: DFStatement, partition: i32) -> Result<Outcome> {
        let plan = self
            .ctx
            .session()
            .state()
            .statement_to_plan(statement)
            .await?;
        let LogicalPlan::Dml(dml) = plan else {
            return plan_err!("expected INSERT … VALUES");
        };
        let stream = dml.table_name.table().to_string();
        if self.ctx.stream_table(&stream).await?.is_none() {
            return plan_err!("{stream} is not a stream table");
        }
        let input = dml.input.as_ref().clone();
        let batches = self
            .ctx
            .session()
            .execute_logical_plan(input)
            .await?
            .collect()
            .await?;
        for batch in batches {
            let partitions = vec![partition; batch.num_rows()];
            for i in 0..self.queries.len() {
                if self.queries[i].reads(&stream) {
                    let mut out = self.queries[i]
                        .process_from(&stream, &batch, &partitions, None, self.now_ms)
                        .await?;
                    self.queries[i].finish_step(self.now_ms, &mut out).await?;
                    self.collect(i, out)?;
                }
            }
        }
        Ok(Outcome::Done)
    }

    /// `RESTART`: every query's state through a checkpoint on disk into a freshly planned
    /// copy of the query.
    async fn restart(&mut self) -> Result<Outcome> {
        use crate::checkpoint::{CheckpointStore, Manifest, QueryManifest};
        static RESTARTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let external = |e: crate::Error| DataFusionError::External(Box::new(e));
        let n = RESTARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("urbanstream-restart-{}-{n}", std::process::id()));
        let store = CheckpointStore::open(&dir, 1).map_err(external)?;
        let mut states = Vec::new();
        let mut queries = Vec::new();
        for (i, q) in self.queries.iter_mut().enumerate() {
            states.push(q.snapshot(self.now_ms).map_err(external)?);
            queries.push(QueryManifest {
                name: format!("q{i}"),
                sql: q.sql().to_string(),
                layout: q.state_layout(),
                settings: q.settings_sql(),
                tables: q.tables_identity(),
                meta: serde_json::Value::Null,
            });
        }
        let manifest = Manifest {
            version: 0,
            epoch: 1,
            created_at_ms: self.now_ms,
            positions: Vec::new(),
            outputs: Vec::new(),
            queries,
            files: Vec::new(),
            digests: Default::default(),
            partition_counts: Default::default(),
        };
        store.write(manifest, states).map_err(external)?;
        let read = store.latest().map_err(external)?;
        let _ = std::fs::remove_dir_all(&dir);
        let Some(checkpoint) = read else {
            return plan_err!("RESTART: the checkpoint did not read back");
        };
        // Each query is planned again with the settings it was registered with (as the
        // service does), not the session's current ones.
        let current = self
            .ctx
            .session()
            .state()
            .config()
            .options()
            .extensions
            .get::<crate::plan::stream::StreamSettings>()
            .cloned()
            .unwrap_or_default();
        if checkpoint.queries.len() != self.queries.len() {
            return plan_err!("RESTART: the checkpoint holds another set of queries");
        }
        let plans: Vec<(String, Vec<String>)> = self
            .queries
            .iter()
            .map(|q| (q.sql().to_string(), q.settings_sql()))
            .collect();
        let mut restored = Vec::new();
        for ((sql, settings), state) in plans.into_iter().zip(&checkpoint.queries) {
            for set in settings.iter().chain(std::iter::once(&sql)) {
                for statement in StreamContext::parse(set)? {
                    if let Some(mut query) = self.ctx.plan(statement).await? {
                        query.restore(state, self.now_ms).map_err(external)?;
                        restored.push(query);
                    }
                }
            }
        }
        if restored.len() != checkpoint.queries.len() {
            return plan_err!("RESTART: a query did not plan again from its SQL");
        }
        for set in crate::plan::stream::settings_sql(&current) {
            for statement in StreamContext::parse(&set)? {
                self.ctx.plan(statement).await?;
            }
        }
        self.queries = restored;
        Ok(Outcome::Done)
    }

    async fn tick_all(&mut self) -> Result<Outcome> {
        for i in 0..self.queries.len() {
            let mut out = self.queries[i].tick(self.now_ms).await?;
            self.queries[i].finish_step(self.now_ms, &mut out).await?;
            self.collect(i, out)?;
        }
        Ok(Outcome::Done)
    }

    fn collect(&mut self, query: usize, out: StepOutput) -> Result<()> {
        let q = &self.queries[query];
        for f in out.failed {
            self.late.push(LateRow {
                query,
                event_time: f.event_time,
                watermark: q.watermark().unwrap_or(i64::MIN),
                reason: format!("query_error: {}", f.error),
            });
        }
        for r in out.refused {
            self.late.push(LateRow {
                query,
                event_time: None,
                watermark: q.watermark().unwrap_or(i64::MIN),
                reason: format!("result_error: {}: {}", r.row, r.error),
            });
        }
        for d in out.diverted {
            self.late.push(LateRow {
                query,
                event_time: d.event_time,
                watermark: d.watermark,
                reason: match d.window {
                    Some((start, end)) => format!(
                        "{} [{}, {})",
                        d.reason.as_str(),
                        format_ms(start),
                        format_ms(end)
                    ),
                    None => d.reason.as_str().to_string(),
                },
            });
        }
        let Some(sink) = q.sink() else { return Ok(()) };
        let sink: &Arc<StreamTable> = sink;
        for rows in out.rows {
            let rows = conform_stream(&rows, &sink.topic_schema)
                .map_err(|e| DataFusionError::Execution(e.to_string()))?;
            // A JSON topic's row with a float JSON cannot carry goes to the DLQ.
            let rows = match sink.options.format {
                crate::topics::Format::Json => {
                    let (kept, unwritable) = crate::sink::without_non_finite(&rows)
                        .map_err(|e| DataFusionError::Execution(e.to_string()))?;
                    for (row, why) in unwritable {
                        self.late.push(LateRow {
                            query,
                            event_time: None,
                            watermark: q.watermark().unwrap_or(i64::MIN),
                            reason: format!("result_error: {row}: {why}"),
                        });
                    }
                    kept
                }
                _ => rows,
            };
            self.outputs
                .entry(sink.name.clone())
                .or_default()
                .push(rows);
        }
        Ok(())
    }

    /// The sinks' collected output, as tables for a `SELECT`.
    fn result_tables(&self) -> Vec<(String, SchemaRef, Vec<RecordBatch>)> {
        // One table per sink, however many queries write to it.
        let mut seen = std::collections::HashSet::new();
        self.queries
            .iter()
            .filter_map(|q| q.sink())
            .filter(|sink| seen.insert(sink.name.clone()))
            .map(|sink| {
                let batches = self.outputs.get(&sink.name).cloned().unwrap_or_default();
                (
                    sink.name.clone(),
                    sink.topic_schema.output_schema(),
                    batches,
                )
            })
            .collect()
    }

    fn show_late(&self) -> Result<Outcome> {
        let ts = DataType::Timestamp(TimeUnit::Millisecond, None);
        let schema = Arc::new(Schema::new(vec![
            Field::new("query", DataType::Utf8, false),
            Field::new("event_time", ts.clone(), true),
            Field::new("watermark", ts, true),
            Field::new("reason", DataType::Utf8, false),
        ]));
        let opt = |v: i64| (v != i64::MIN).then_some(v);
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(
                self.late.iter().map(|l| format!("q{}", l.query + 1)),
            )),
            Arc::new(TimestampMillisecondArray::from_iter(
                self.late.iter().map(|l| l.event_time),
            )),
            Arc::new(TimestampMillisecondArray::from_iter(
                self.late.iter().map(|l| opt(l.watermark)),
            )),
            Arc::new(StringArray::from_iter_values(
                self.late.iter().map(|l| l.reason.as_str()),
            )),
        ];
        Ok(Outcome::Rows(vec![RecordBatch::try_new(schema, columns)?]))
    }

    /// State held by the running queries: (groups, bytes).
    pub fn state_size(&self) -> (usize, usize) {
        self.queries.iter().fold((0, 0), |(g, b), q| {
            (g + q.state_groups(), b + q.state_bytes())
        })
    }

    /// The running queries.
    pub fn queries(&self) -> &[StreamQuery] {
        &self.queries
    }
}

/// A `SELECT` over the sinks' collected output.
async fn select(
    tables: Vec<(String, SchemaRef, Vec<RecordBatch>)>,
    statement: DFStatement,
) -> Result<Outcome> {
    let results = SessionContext::new();
    urbanstream_operators::register_all(&results);
    for (name, schema, batches) in tables {
        results.register_table(
            name.as_str(),
            Arc::new(MemTable::try_new(schema, vec![batches])?),
        )?;
    }
    let plan = results.state().statement_to_plan(statement).await?;
    Ok(Outcome::Rows(
        results.execute_logical_plan(plan).await?.collect().await?,
    ))
}

/// Epoch ms as `YYYY-MM-DDTHH:MM:SS` (UTC), as the result tables print timestamps.
fn format_ms(ms: i64) -> String {
    let a = TimestampMillisecondArray::from(vec![ms]);
    datafusion::arrow::util::display::array_value_to_string(&a, 0)
        .unwrap_or_else(|_| ms.to_string())
}

/// Strips a `PARTITION n` clause after `INSERT INTO <name>`.
fn strip_partition(sql: &str) -> Result<(String, i32)> {
    let upper = sql.to_ascii_uppercase();
    if !upper.starts_with("INSERT INTO ") {
        return Ok((sql.to_string(), 0));
    }
    let Some(at) = upper.find(" PARTITION ") else {
        return Ok((sql.to_string(), 0));
    };
    let rest = &sql[at + " PARTITION ".len()..];
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    let partition = digits
        .parse::<i32>()
        .map_err(|_| DataFusionError::Plan("PARTITION takes a number".into()))?;
    Ok((
        format!("{}{}", &sql[..at], &rest[digits.len()..]),
        partition,
    ))
}

fn parse_timestamp(text: &str) -> Result<i64> {
    let text = text.trim().trim_matches('\'');
    let value = datafusion::arrow::compute::cast(
        &(Arc::new(StringArray::from(vec![text])) as ArrayRef),
        &DataType::Timestamp(TimeUnit::Millisecond, None),
    )?;
    let value = value
        .as_any()
        .downcast_ref::<TimestampMillisecondArray>()
        .filter(|a| !a.is_null(0))
        .map(|a| a.value(0));
    value.ok_or_else(|| DataFusionError::Plan(format!("'{text}' is not a timestamp")))
}
