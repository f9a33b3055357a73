//! The query manager: every query (built-in or registered) runs as its own pipeline (its own
//! consumer group `<group_id>.<name>`, producer, DataFusion session and memory pool), so one
//! query can be paused, restarted or fail without touching the others.
//!
//! A query stopped by an error that may pass (the broker unreachable) is started again after a
//! backoff that doubles up to 30 s; any other error (a resource limit, a bad record batch the
//! plan refuses) leaves it FAILED with the error until it is restarted.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use super::catalog::{Catalog, CatalogEntry};
use super::config::ServiceConfig;
use crate::error::Error;
use crate::pipeline::{
    CheckpointInfo, CheckpointSettings, Pipeline, PipelineConfig, PipelineStats, epoch_ms,
};
use crate::plan::repartition::key_statement;
use crate::plan::{DEFAULT_QUERIES, city_context_in, plan_all};
use crate::reference::ReferenceTables;
use crate::schema::SchemaRegistry;
use futures::FutureExt;
use std::panic::AssertUnwindSafe;

/// Longest wait between two attempts to start a query stopped by a transient error.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// How old a consumer lag measurement may be and still be shown (they are taken about once
/// a second while a query runs).
const LAG_FRESH_MS: i64 = 10_000;

/// Longest query name.
const MAX_NAME: usize = 64;

/// Where a query is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum QueryState {
    /// Connecting and planning, or waiting to retry after a transient error.
    Starting,
    /// Reading, computing and publishing.
    Running,
    /// Stopped on request; its offsets are committed.
    Paused,
    /// Stopped by an error; see `error`.
    Failed,
}

impl QueryState {
    /// The state's name as the API shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            QueryState::Starting => "STARTING",
            QueryState::Running => "RUNNING",
            QueryState::Paused => "PAUSED",
            QueryState::Failed => "FAILED",
        }
    }
}

/// What went wrong with a request, and how the API reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceError {
    /// The request is malformed: bad name, SQL that does not parse or plan. With the position
    /// in the SQL when the parser gave one.
    Invalid {
        /// What is wrong.
        message: String,
        /// (line, column), 1-based.
        position: Option<(u64, u64)>,
    },
    /// No query of that name.
    NotFound(String),
    /// The request conflicts with what exists: a duplicate name, the query limit, deleting a
    /// built-in query.
    Conflict(String),
    /// The service could not do it (the catalog could not be written).
    Internal(String),
    /// The service cannot take it now (every planning thread busy): ask again shortly.
    Busy(String),
}

impl std::fmt::Display for ServiceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServiceError::Invalid { message, .. }
            | ServiceError::NotFound(message)
            | ServiceError::Conflict(message)
            | ServiceError::Internal(message)
            | ServiceError::Busy(message) => f.write_str(message),
        }
    }
}

impl ServiceError {
    fn invalid(message: impl Into<String>) -> Self {
        let message = message.into();
        let position = sql_position(&message);
        ServiceError::Invalid { message, position }
    }

    fn not_found(name: &str) -> Self {
        ServiceError::NotFound(format!("no query named {name:?}"))
    }
}

/// What an analyst is told about SQL that did not plan: the reason without the layers it
/// passed through (`datafusion: Error during planning: …`, `ParserError("…")`).
fn sql_error_message(e: &Error) -> String {
    use datafusion::error::DataFusionError;
    use datafusion::sql::sqlparser::parser::ParserError;
    let Error::DataFusion(e) = e else {
        return e.to_string();
    };
    match e.find_root() {
        DataFusionError::Plan(m) => m.clone(),
        DataFusionError::SQL(p, _) => match p.as_ref() {
            // At the end there is no line and column to name: say so.
            ParserError::ParserError(m) if m.ends_with("found: EOF") => {
                format!("syntax error: {m} (the statement ends before it is complete)")
            }
            ParserError::ParserError(m) => format!("syntax error: {m}"),
            ParserError::TokenizerError(m) => format!("syntax error: {m}"),
            // Not reached from analysts' SQL: the sandbox parses with a higher limit and
            // refuses past its own nesting limit first.
            ParserError::RecursionLimitExceeded => "the statement nests expressions too deep \
                for the parser"
                .to_string(),
        },
        DataFusionError::SchemaError(e, _) => e.to_string(),
        DataFusionError::NotImplemented(m) => format!("not supported: {m}"),
        other => other.to_string(),
    }
}

/// (line, column) of a parser message such as `… at Line: 1, Column: 8`.
fn sql_position(message: &str) -> Option<(u64, u64)> {
    let after = |key: &str| -> Option<u64> {
        let start = message.rfind(key)? + key.len();
        let digits: String = message[start..]
            .chars()
            .skip_while(|c| c.is_whitespace())
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse().ok()
    };
    Some((after("Line:")?, after("Column:")?))
}

/// One stream query found in a query's SQL.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedStatement {
    /// Table it reads.
    pub source: String,
    /// Topic it reads.
    pub source_topic: String,
    /// The other streams it reads (a join's right side, a union's other branches), as
    /// (table, topic).
    pub also_reads: Vec<(String, String)>,
    /// Table it writes.
    pub sink: String,
    /// Topic it writes.
    pub sink_topic: String,
    /// Whether it aggregates over windows (and so keeps state).
    pub windowed: bool,
    /// The columns the sink's declaration gives its topic.
    #[serde(skip)]
    pub sink_schema: datafusion::arrow::datatypes::SchemaRef,
    /// The tables it reads and writes, as declared.
    #[serde(skip)]
    flow: Flow,
}

impl PlannedStatement {
    /// Every topic it reads.
    fn read_topics(&self) -> Vec<String> {
        std::iter::once(self.source_topic.clone())
            .chain(self.also_reads.iter().map(|(_, topic)| topic.clone()))
            .collect()
    }
}

/// What a statement reads and writes: the tables over the topics, as it declares them.
#[derive(Debug, Clone)]
struct Flow {
    reads: Vec<Arc<crate::plan::table::StreamTable>>,
    writes: Arc<crate::plan::table::StreamTable>,
}

/// How the records `writer` writes would not read as `reader` declares their topic: another
/// format, a column of another type, a required column `writer` does not write (every record
/// dead-lettered), a null where it takes none. Columns `writer` adds or leaves out are left
/// alone (a reader takes the fields it declares, and an optional column is null where
/// absent).
fn misfits(
    reader: &crate::plan::table::StreamTable,
    writer: &crate::plan::table::StreamTable,
) -> Vec<String> {
    let mut out = Vec::new();
    if reader.options.format != writer.options.format {
        out.push(format!(
            "its records are {}, read as {}",
            writer.options.format.as_str(),
            reader.options.format.as_str()
        ));
    }
    let read = reader.topic_schema.output_schema();
    let written = writer.topic_schema.output_schema();
    for (i, c) in read.fields().iter().enumerate() {
        let required = reader
            .topic_schema
            .required
            .get(i)
            .copied()
            .unwrap_or(false)
            && reader
                .topic_schema
                .defaults
                .get(i)
                .is_none_or(Option::is_none);
        match written.field_with_name(c.name()) {
            Err(_) if required => out.push(format!(
                "{} is required there and not written: every record would go to the DLQ",
                c.name()
            )),
            // An optional column: null where it is not written.
            Err(_) => {}
            Ok(w) if !readable_as(w.data_type(), c.data_type()) => out.push(format!(
                "{} is written as {} and read as {}",
                c.name(),
                w.data_type(),
                c.data_type()
            )),
            Ok(w) if required && w.is_nullable() => out.push(format!(
                "{} is never null there and may be null as written: declare it {} NOT NULL",
                c.name(),
                c.name()
            )),
            Ok(_) => {}
        }
    }
    out
}

/// The way from topic `from` along `edges` (topic → (query, topic written)) to one of
/// `targets`, as `a → (q1) → b → (q2) → c`; `None` when there is none.
fn path_back(
    edges: &BTreeMap<String, Vec<(String, String)>>,
    from: &str,
    targets: &[String],
) -> Option<String> {
    // Breadth first, each topic once: the shortest way back.
    let mut came_from: HashMap<String, Option<(String, String)>> = HashMap::new();
    came_from.insert(from.to_string(), None);
    let mut queue = std::collections::VecDeque::from([from.to_string()]);
    while let Some(topic) = queue.pop_front() {
        if targets.contains(&topic) {
            let mut steps = vec![topic.clone()];
            let mut at = topic;
            while let Some(Some((query, before))) = came_from.get(&at) {
                steps.push(format!("({query})"));
                steps.push(before.clone());
                at = before.clone();
            }
            steps.reverse();
            return Some(steps.join(" → "));
        }
        for (query, next) in edges.get(&topic).into_iter().flatten() {
            if !came_from.contains_key(next) {
                came_from.insert(next.clone(), Some((query.clone(), topic.clone())));
                queue.push_back(next.clone());
            }
        }
    }
    None
}

/// Body of `POST /v1/queries/{name}/upgrade`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpgradeRequest {
    /// The new SQL; the query's own when absent (going back to a savepoint).
    #[serde(default)]
    pub sql: Option<String>,
    /// The savepoint whose state the query starts from; its own newest state when absent.
    #[serde(default)]
    pub savepoint: Option<String>,
}

/// Body of `POST /v1/queries/{name}/savepoints`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SavepointRequest {
    /// The savepoint's name: 1 to 64 of `[A-Za-z0-9_-]`, starting with a letter.
    pub savepoint: String,
}

/// Body of `POST /v1/queries/preview`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PreviewRequest {
    /// The query's SQL (its `CREATE EXTERNAL TABLE` and `SET` statements included).
    pub sql: String,
    /// The rows of its stream, given inline (or `topic`).
    #[serde(default)]
    pub input: Option<PreviewInput>,
    /// A range of its stream's topic to read instead (every partition; at most
    /// 200 000 records).
    #[serde(default)]
    pub topic: Option<crate::source::range::TopicRange>,
    /// Output rows returned (1 to 10 000; default 100). All are counted.
    #[serde(default)]
    pub limit: Option<usize>,
}

/// The input of a preview: a file's contents and how to read them.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PreviewInput {
    /// `csv` (with a header), `jsonl` or `parquet`.
    pub format: String,
    /// The file's contents (a Parquet file's bytes in base64).
    pub data: String,
    /// `old=new` column renames.
    #[serde(default)]
    pub rename: Vec<String>,
    /// Time zone of event-time texts written without one (default `+00:00`).
    #[serde(default)]
    pub time_zone: Option<String>,
    /// Unit of a numeric event-time column: `s`, `ms` (default) or `us`.
    #[serde(default)]
    pub time_unit: Option<String>,
}

/// What a preview gave.
#[derive(Debug, Clone, Serialize)]
pub struct PreviewAnswer {
    /// The first output rows, as the sink would publish them (their numbers' digits as
    /// written: through a float, `1234567890123456.1234` lost its last ones).
    pub rows: Vec<Box<serde_json::value::RawValue>>,
    /// The output's columns in their order, with their types (none without output rows).
    pub columns: Vec<ColumnInfo>,
    /// Whether there were more output rows than returned.
    pub truncated: bool,
    /// Rows of the input.
    pub input_rows: u64,
    /// Output rows in all.
    pub output_rows: u64,
    /// Input rows the stream's schema rejected (the DLQ's records in a running query).
    pub rejected: u64,
    /// The first rejection's reason.
    pub first_rejection: Option<String>,
    /// Result rows not published: a window's result the plan above the windows failed on,
    /// or a row with a float JSON cannot carry (the DLQ's `result` records in a running
    /// query).
    pub refused_results: u64,
    /// The first of them, with the reason.
    pub first_refused_result: Option<String>,
    /// Input rows without a readable event time.
    pub unreadable_time: u64,
    /// The first of them's time, as written.
    pub first_unreadable: Option<String>,
    /// Columns of a file that the stream does not have (not read).
    pub ignored_columns: Vec<String>,
    /// Fields of the stream that a file does not have (NULL in every row).
    pub missing_fields: Vec<String>,
    /// Input rows diverted as late or future-stamped, by reason.
    pub diverted: std::collections::BTreeMap<String, u64>,
    /// Whether a topic range held more than a preview reads (200 000 records, or
    /// `api.max_preview_body` bytes).
    pub input_truncated: bool,
}

/// A table analysts' SQL can read or write, as `/v1/tables` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct TableInfo {
    /// Its name in SQL.
    pub name: String,
    /// `stream` (a Kafka topic) or `reference` (a table of `schemas/reference/`).
    pub kind: &'static str,
    /// Topic of a stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Event-time column of a stream, if it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_time: Option<String>,
    /// Watermark delay of a stream, ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watermark_delay_ms: Option<u64>,
    /// Column the stream's records are keyed by.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// How a stream's records are encoded: `json`, `avro` or `protobuf`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<&'static str>,
    /// The Protobuf message of a `protobuf` stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protobuf_message: Option<String>,
    /// Version of a reference table (1: as built in; one more per replacement).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Rows of a reference table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows: Option<usize>,
    /// The table a derived reference table is computed from (it cannot be replaced).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub derived_from: Option<&'static str>,
    /// When the version was installed, epoch ms (absent: built in).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub installed_ms: Option<i64>,
    /// The topic a reference table is kept current from, and how that goes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub follows: Option<super::follow::FollowStatus>,
    /// Its columns.
    pub columns: Vec<ColumnInfo>,
}

/// One column of a [`TableInfo`].
#[derive(Debug, Clone, Serialize)]
pub struct ColumnInfo {
    /// Name.
    pub name: String,
    /// SQL-ish type (Arrow's name for it).
    #[serde(rename = "type")]
    pub data_type: String,
    /// Whether it may be null.
    pub nullable: bool,
}

impl ColumnInfo {
    /// The columns of `schema`, in its order.
    fn of(schema: &datafusion::arrow::datatypes::Schema) -> Vec<Self> {
        schema
            .fields()
            .iter()
            .map(|f| Self {
                name: f.name().clone(),
                data_type: f.data_type().to_string(),
                nullable: f.is_nullable(),
            })
            .collect()
    }
}

/// A function analysts' SQL can call, as `/v1/functions` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct FunctionInfo {
    /// Name.
    pub name: String,
    /// `scalar`, `aggregate` or `window`.
    pub kind: &'static str,
    /// Whether it is one of urbanstream's (windows, indicators, detectors, alerts) rather than
    /// DataFusion's.
    pub urbanstream: bool,
}

/// A query's status as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct QueryStatus {
    /// Name.
    pub name: String,
    /// Whether it is one of the queries of `queries/`.
    pub builtin: bool,
    /// RUNNING, PAUSED, FAILED or STARTING.
    pub state: QueryState,
    /// Why it failed, or the last transient error while it is retried.
    pub error: Option<String>,
    /// The SQL.
    pub sql: String,
    /// Registered at, epoch ms (start of the service for built-in queries).
    pub created_at: i64,
    /// Last (re)started at, epoch ms.
    pub started_at: Option<i64>,
    /// Starts after the first (retries and restarts).
    pub restarts: u64,
    /// Input records read.
    pub rows_in: u64,
    /// Result rows published and acknowledged.
    pub rows_out: u64,
    /// Events beyond allowed lateness, sent to the late topic.
    pub late: u64,
    /// Records its source schema rejected, sent to the DLQ.
    pub dlq: u64,
    /// Records whose camera, detector or sensor is not in its reference table (processed
    /// or dead-lettered as `reference.unknown_ids` says).
    pub unknown_ids: u64,
    /// Micro-batches processed.
    pub batches: u64,
    /// Micro-batches read while the one before was processed: it reads ahead while its reads
    /// fill a quarter of a micro-batch or more (behind its input, or under heavy load).
    pub batches_read_ahead: u64,
    /// Records between its position and the end of its partitions; null until known.
    pub consumer_lag: Option<i64>,
    /// Partitions assigned to it in this process: its input's, and those of its repartition
    /// topic when it has one.
    pub assigned_partitions: u64,
    /// How it keeps its state (once planned): `per_partition` (it groups by its input's key:
    /// one state per input partition), `repartitioned` (through an internal topic keyed by
    /// its groups) or `single` (one state for all partitions; one process per group).
    pub partitioning: Option<&'static str>,
    /// Its watermark, epoch ms; null before the first event.
    pub watermark_ms: Option<i64>,
    /// Its watermark as RFC 3339 UTC.
    pub watermark: Option<String>,
    /// Wall clock minus watermark, ms.
    pub watermark_lag_ms: Option<i64>,
    /// Entries held in state: (window, group) partials and detector keys.
    pub state_groups: u64,
    /// Bytes of state held (windows, sessions, detector keys, held offsets).
    pub state_bytes: u64,
    /// Detector keys dropped after staying silent for `urbanstream.key_ttl` (since start).
    pub keys_expired: u64,
    /// Its memory pool, bytes.
    pub memory_limit: u64,
    /// The last checkpoint of its state (written, or restored at start); null before the
    /// first.
    pub last_checkpoint: Option<CheckpointInfo>,
}

/// The mutable part of a query's status.
#[derive(Debug)]
struct Status {
    state: QueryState,
    error: Option<String>,
    started_at: Option<i64>,
}

/// The running task of a query and the flag that stops it.
#[derive(Default)]
struct Control {
    stop: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// A query known to the manager.
struct QueryHandle {
    entry: CatalogEntry,
    builtin: bool,
    memory_limit: u64,
    stats: Arc<PipelineStats>,
    status: Mutex<Status>,
    /// Pipelines started for it so far.
    starts: AtomicU64,
    /// Created under the name of a dropped query (the catalog remembers drops across restarts)
    /// and not yet run: it reads its input from the beginning, whatever the dropped one left
    /// committed in the group.
    fresh: AtomicBool,
    control: tokio::sync::Mutex<Control>,
    /// Replaced by an upgrade: never started again.
    retired: AtomicBool,
}

impl QueryHandle {
    /// A handle for `entry`, STARTING, never run.
    fn new(entry: CatalogEntry, builtin: bool, memory_limit: u64) -> Self {
        Self {
            builtin,
            memory_limit,
            stats: Arc::new(PipelineStats::new()),
            status: Mutex::new(Status {
                state: QueryState::Starting,
                error: None,
                started_at: None,
            }),
            starts: AtomicU64::new(0),
            fresh: AtomicBool::new(false),
            control: tokio::sync::Mutex::new(Control::default()),
            retired: AtomicBool::new(false),
            entry,
        }
    }

    fn set(&self, state: QueryState, error: Option<String>) {
        if let Ok(mut s) = self.status.lock() {
            s.state = state;
            s.error = error;
            if state == QueryState::Running {
                s.started_at = Some(epoch_ms());
            }
        }
    }

    fn state(&self) -> QueryState {
        self.status
            .lock()
            .map_or(QueryState::Failed, |status| status.state)
    }

    fn status(&self) -> QueryStatus {
        let (state, error, started_at) = self.status.lock().map_or(
            (
                QueryState::Failed,
                Some("status lock poisoned".into()),
                None,
            ),
            |s| (s.state, s.error.clone(), s.started_at),
        );
        let stats = &self.stats;
        let watermark_ms =
            Some(stats.watermark_ms.load(Ordering::Relaxed)).filter(|w| *w != i64::MIN);
        let lag = stats.consumer_lag.load(Ordering::Relaxed);
        QueryStatus {
            name: self.entry.name.clone(),
            builtin: self.builtin,
            state,
            error,
            sql: self.entry.sql.clone(),
            created_at: self.entry.created_at,
            started_at,
            restarts: self.starts.load(Ordering::Relaxed).saturating_sub(1),
            rows_in: stats.records_in.load(Ordering::Relaxed),
            rows_out: stats.indicators_out.load(Ordering::Relaxed),
            late: stats.late.load(Ordering::Relaxed),
            dlq: stats.dlq.load(Ordering::Relaxed),
            unknown_ids: stats.unknown_ids.load(Ordering::Relaxed),
            batches: stats.batches.load(Ordering::Relaxed),
            batches_read_ahead: stats.reads_ahead.load(Ordering::Relaxed),
            // Measured by a running query's consumer only, recently: a paused, failed or
            // restarting query's last figure (0, say), or that of a query held up (a
            // checkpoint store not answering), stayed while its input piled up.
            consumer_lag: (lag >= 0
                && state == QueryState::Running
                && epoch_ms().saturating_sub(stats.consumer_lag_at.load(Ordering::Relaxed))
                    <= LAG_FRESH_MS)
                .then_some(lag),
            assigned_partitions: stats.assigned_partitions.load(Ordering::Relaxed),
            partitioning: stats.partitioning.lock().ok().and_then(|p| *p),
            watermark_ms,
            watermark: watermark_ms.map(rfc3339),
            watermark_lag_ms: watermark_ms.map(|w| epoch_ms() - w),
            state_groups: stats.state_groups.load(Ordering::Relaxed),
            keys_expired: stats.keys_expired.load(Ordering::Relaxed),
            state_bytes: stats.state_bytes.load(Ordering::Relaxed),
            memory_limit: self.memory_limit,
            last_checkpoint: stats.last_checkpoint.lock().ok().and_then(|c| c.clone()),
        }
    }
}

/// RFC 3339 UTC of epoch ms.
fn rfc3339(ms: i64) -> String {
    humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0)),
    )
    .to_string()
}

/// Runs the queries and keeps the catalog.
pub struct QueryManager {
    config: Arc<ServiceConfig>,
    catalog: Arc<Mutex<Catalog>>,
    queries: Mutex<BTreeMap<String, Arc<QueryHandle>>>,
    /// Per registered query, its SQL and what each of its statements reads and writes (see
    /// [`QueryManager::check_outputs`]).
    flows: Mutex<HashMap<String, (String, Vec<Flow>)>>,
    schemas: SchemaRegistry,
    runtime: QueryRuntime,
    /// Where previews run (see [`QueryRuntime::previews`]).
    preview_runtime: QueryRuntime,
    /// Where the queries' checkpoints go (one location per query below it).
    checkpoint_root: crate::checkpoint::Location,
    /// The reference tables every query reads, replaced through the API.
    reference: ReferenceTables,
    /// The schema registry of Avro streams (shared by every query, with its cache) and the
    /// Protobuf descriptors.
    codecs: crate::decode::Codecs,
    /// Previews running at once (each reads its input and keeps a query's state).
    previews: Arc<tokio::sync::Semaphore>,
    /// Table replacements running at once (each holds a CSV of up to 64 MiB).
    replacements: Arc<tokio::sync::Semaphore>,
    /// The reference tables kept current from Kafka topics.
    followers: Arc<super::follow::Followers>,
    /// One lock per query name, held by whatever changes a query's life (create, drop,
    /// pause, resume, restart, upgrade, savepoint), so that those run one at a time.
    operations: NamedLocks,
    /// Held while a query's SQL is checked against the other queries' and registered (create,
    /// upgrade): two queries registered at once, each feeding the other, were each checked
    /// before the other was there, and a record went round between them without end.
    registering: tokio::sync::Mutex<()>,
}

/// The name of the table or view `statement` declares, as SQL resolves it (unquoted in
/// lower case, quoted as written).
/// Whether `sql` reads table `name` (in a statement, a view or a subquery; a CTE of that name
/// shadows it). SQL that does not parse reads nothing.
fn reads_table(sql: &str, name: &str) -> bool {
    let Ok(statements) = crate::plan::stream::StreamContext::parse(sql) else {
        return false;
    };
    statements.iter().any(|statement| {
        datafusion::sql::resolve::resolve_table_references(statement, true)
            .is_ok_and(|(tables, _)| tables.iter().any(|t| t.table().eq_ignore_ascii_case(name)))
    })
}

fn declared_table(statement: &datafusion::sql::parser::Statement) -> Option<String> {
    use datafusion::sql::parser::Statement;
    use datafusion::sql::sqlparser::ast::Statement as Sql;
    let name = match statement {
        Statement::CreateExternalTable(c) => &c.name,
        Statement::Statement(s) => match s.as_ref() {
            Sql::CreateView(v) => &v.name,
            _ => return None,
        },
        _ => return None,
    };
    let ident = name.0.last()?.as_ident()?;
    Some(match ident.quote_style {
        Some(_) => ident.value.clone(),
        None => ident.value.to_lowercase(),
    })
}

/// One of the previews or table replacements that may run at once (see
/// [`QueryManager::preview_slot`], [`QueryManager::replacement_slot`]): held by the work
/// itself until it ends, whether or not its client still waits for it. (A preview whose
/// client has gone is stopped at once, but for the one pass over its file that drops
/// malformed lines, if it has begun: that pass ends on its own, without the turn.)
pub struct Turn(#[allow(dead_code)] tokio::sync::OwnedSemaphorePermit);

/// An error of `urbanstream run`'s code path as a preview's client knows it: the file it
/// wrote the request's data to is `input.data`, and the options are the request's fields, not
/// the command's flags.
fn in_request_terms(e: Error, path: &str) -> Error {
    let text = e.to_string();
    let flags = [
        "--rename",
        "--time-unit",
        "--time-zone",
        "--time ",
        "--key ",
    ];
    if !text.contains(path) && !flags.iter().any(|f| text.contains(f)) {
        return e;
    }
    Error::Config(
        text.replace(path, "input.data")
            .replace("--rename", "input.rename")
            .replace("--time-unit", "input.time_unit")
            .replace("--time-zone", "input.time_zone")
            .replace("--time ", "event-time column ")
            .replace("--key ", "key column "),
    )
}

/// One lock per name, forgotten when no one holds or waits for it: requests about names that
/// do not exist leave nothing behind.
#[derive(Default)]
struct NamedLocks(Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl NamedLocks {
    /// Waits for the holder of `name`'s lock; holds it while the guard lives.
    async fn lock(&self, name: &str) -> NamedGuard<'_> {
        let lock = self
            .0
            .lock()
            .map(|mut locks| locks.entry(name.to_string()).or_default().clone())
            .unwrap_or_default();
        NamedGuard {
            guard: Some(lock.clone().lock_owned().await),
            lock,
            name: name.to_string(),
            locks: self,
        }
    }

    /// Names with a holder or a waiter.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().map(|l| l.len()).unwrap_or_default()
    }
}

/// A name's lock held (see [`NamedLocks::lock`]).
struct NamedGuard<'a> {
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    lock: Arc<tokio::sync::Mutex<()>>,
    name: String,
    locks: &'a NamedLocks,
}

impl Drop for NamedGuard<'_> {
    fn drop(&mut self) {
        self.guard = None;
        if let Ok(mut locks) = self.locks.0.lock()
            // Held by the map and this guard only: no one waits for it (a waiter takes its
            // clone from the map, under the map's lock).
            && Arc::strong_count(&self.lock) == 2
        {
            locks.remove(&self.name);
        }
    }
}

/// The runtime the queries' pipelines run on, apart from the one serving the API: a query
/// waiting on Kafka (a transaction's initialisation, an offset lookup during a broker outage)
/// can hold one of its threads, never one of the API's, so `/livez` and `/readyz` answer.
struct QueryRuntime(Option<tokio::runtime::Runtime>);

impl QueryRuntime {
    fn new() -> crate::Result<Self> {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
        Self::with_threads(threads, "urbanstream-query")
    }

    /// The runtime previews run on, a thread of their own for each of the two that may run at
    /// once: a preview's plan runs between its awaits without yielding (a function over large
    /// arrays may take hours), so one that outlives its timeout holds that thread, never a
    /// query's.
    fn previews() -> crate::Result<Self> {
        Self::with_threads(2, "urbanstream-preview")
    }

    fn with_threads(threads: usize, name: &str) -> crate::Result<Self> {
        Ok(Self(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name(name)
                .enable_all()
                .build()?,
        )))
    }

    fn handle(&self) -> tokio::runtime::Handle {
        match &self.0 {
            Some(rt) => rt.handle().clone(),
            None => tokio::runtime::Handle::current(),
        }
    }
}

impl Drop for QueryRuntime {
    fn drop(&mut self) {
        // Without blocking: the manager may be dropped on an async thread. The queries have
        // been stopped by then ([`QueryManager::shutdown`]).
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// How many more times a registered query is planned at start while the planner is busy
/// (each time after a second, and up to the planner's time limit waiting for it).
const STARTUP_PLANNING_RETRIES: usize = 10;

impl QueryManager {
    /// The schema registry that Avro inputs and outputs use.
    pub fn registry(&self) -> Option<Arc<crate::decode::Registry>> {
        self.codecs.registry.clone()
    }

    /// Opens the catalog; nothing runs until [`QueryManager::start_all`].
    pub fn new(config: Arc<ServiceConfig>) -> crate::Result<Self> {
        let catalog = Catalog::open(&config.catalog.path)?;
        let checkpoint_root = config.checkpoint_root()?;
        let reference = ReferenceTables::open_limited(
            config.reference_dir(),
            config.reference.max_total_bytes,
        )?;
        let followers = Arc::new(super::follow::Followers::new(&config, &reference)?);
        let codecs = crate::decode::Codecs {
            registry: Some(Arc::new(config.schema_registry()?)),
            descriptors: Some(Arc::new(crate::decode::Descriptors::load(
                &config.protobuf.files,
            )?)),
        };
        Ok(Self {
            checkpoint_root,
            reference,
            codecs,
            previews: Arc::new(tokio::sync::Semaphore::new(2)),
            replacements: Arc::new(tokio::sync::Semaphore::new(2)),
            followers,
            operations: NamedLocks::default(),
            registering: tokio::sync::Mutex::new(()),
            config,
            catalog: Arc::new(Mutex::new(catalog)),
            queries: Mutex::new(BTreeMap::new()),
            flows: Mutex::new(HashMap::new()),
            schemas: SchemaRegistry::embedded()?,
            runtime: QueryRuntime::new()?,
            preview_runtime: QueryRuntime::previews()?,
        })
    }

    /// Registers the built-in queries (unless disabled) and every query of the catalog, and
    /// starts those not paused. A query whose SQL no longer plans is FAILED; the others start.
    pub async fn start_all(&self) -> crate::Result<()> {
        self.followers.start(&self.config, &self.reference)?;
        let now = epoch_ms();
        let mut entries: Vec<(CatalogEntry, bool)> = Vec::new();
        let reset: Vec<String>;
        {
            let catalog = self.catalog()?;
            if self.config.queries.defaults {
                for (name, sql) in DEFAULT_QUERIES {
                    let entry = CatalogEntry {
                        name: name.to_string(),
                        sql: sql.to_string(),
                        paused: catalog.builtin_paused(name),
                        memory_limit: None,
                        created_at: now,
                    };
                    entries.push((entry, true));
                }
            }
            // A query registered under a built-in's name while the built-in queries were off
            // keeps it; the built-in does not start (two pipelines under one name, one of
            // them out of reach of the API).
            entries.retain(|(builtin, _)| {
                let taken = catalog.entries().iter().any(|e| e.name == builtin.name);
                if taken {
                    warn!(
                        query = %builtin.name,
                        "built-in query not started: a registered query has its name (drop it \
                         and register it under another name to run both)"
                    );
                }
                !taken
            });
            entries.extend(catalog.entries().iter().cloned().map(|e| (e, false)));
            reset = entries
                .iter()
                .filter(|(e, _)| catalog.reset_pending(&e.name))
                .map(|(e, _)| e.name.clone())
                .collect();
        }
        for (entry, builtin) in entries {
            let paused = entry.paused;
            let name = entry.name.clone();
            let handle = self.register(entry, builtin);
            // Reset before the service stopped, and not checkpointed since: still afresh.
            handle.fresh.store(reset.contains(&name), Ordering::Relaxed);
            if paused {
                handle.set(QueryState::Paused, None);
                continue;
            }
            // The planner busy with the queries started before (each plans its statements
            // as it starts) is no fault of the SQL: asked again, for a while, before the
            // query is taken for one that no longer plans.
            let mut checked = self.validate_handle(&handle).await;
            for _ in 0..STARTUP_PLANNING_RETRIES {
                if !matches!(checked, Err(ServiceError::Busy(_))) {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                checked = self.validate_handle(&handle).await;
            }
            if let Err(e) = checked {
                warn!(query = %name, error = %e, "registered query no longer plans");
                handle.set(QueryState::Failed, Some(format!("does not plan: {e}")));
                continue;
            }
            self.start(&handle).await;
        }
        Ok(())
    }

    fn catalog(&self) -> crate::Result<std::sync::MutexGuard<'_, Catalog>> {
        self.catalog
            .lock()
            .map_err(|_| Error::Config("catalog lock poisoned".into()))
    }

    fn register(&self, entry: CatalogEntry, builtin: bool) -> Arc<QueryHandle> {
        let handle = self.new_handle(entry, builtin);
        if let Ok(mut queries) = self.queries.lock() {
            queries.insert(handle.entry.name.clone(), handle.clone());
        }
        handle
    }

    fn new_handle(&self, entry: CatalogEntry, builtin: bool) -> Arc<QueryHandle> {
        let memory_limit = entry
            .memory_limit
            .unwrap_or(self.config.queries.memory_limit.as_u64());
        Arc::new(QueryHandle::new(entry, builtin, memory_limit))
    }

    /// Waits for the other changes to query `name`'s life to finish; the change in hand runs
    /// while the guard lives.
    async fn operation(&self, name: &str) -> NamedGuard<'_> {
        self.operations.lock(name).await
    }

    fn handle(&self, name: &str) -> Result<Arc<QueryHandle>, ServiceError> {
        self.queries
            .lock()
            .ok()
            .and_then(|q| q.get(name).cloned())
            .ok_or_else(|| ServiceError::not_found(name))
    }

    fn handles(&self) -> Vec<Arc<QueryHandle>> {
        self.queries
            .lock()
            .map(|q| q.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Plans `sql` against the city's tables without running it: the stream queries it holds,
    /// or why it cannot run (with the position in the SQL when known).
    pub async fn validate(&self, sql: &str) -> Result<Vec<PlannedStatement>, ServiceError> {
        let planned = statements(&self.plan_request(sql).await?)?;
        self.check_outputs(&planned, None, false).await?;
        // New SQL only: queries registered before this check keep running as they are.
        check_shared_topics(&planned, &self.registered_flows(None).await)?;
        Ok(planned)
    }

    /// [`QueryManager::validate`] for a query known already: a built-in one is checked for its
    /// targets only (see [`QueryManager::check_outputs`]).
    async fn validate_handle(&self, handle: &QueryHandle) -> Result<(), ServiceError> {
        let planned = statements(&self.plan_request(&handle.entry.sql).await?)?;
        self.check_outputs(&planned, None, handle.builtin).await
    }

    /// Refuses statements that would write where a query must not: the city's input topics
    /// (its sensors' readings, which every query trusts), the DLQ and late topics, a
    /// repartition topic, or a topic whose records come back to the statement, read by the
    /// query itself or through other registered queries (each record would be processed
    /// again, without end; `unnest` made one record a million in seconds). `replacing`: the
    /// query being upgraded, whose current statements do not count. `builtin`: one of the
    /// queries of `queries/`, whose loops are broken in their SQL (report confirmations read
    /// the alerts without their own kind, and write alerts); only their targets are checked.
    async fn check_outputs(
        &self,
        planned: &[PlannedStatement],
        replacing: Option<&str>,
        builtin: bool,
    ) -> Result<(), ServiceError> {
        let topics = &self.config.topics;
        let inputs = topics.inputs();
        for s in planned {
            let sink = s.sink_topic.as_str();
            if inputs.iter().any(|t| t == sink) {
                return Err(ServiceError::invalid(format!(
                    "{} writes to {sink}, an input of the city (its sensors' records, read by \
                     every query that trusts them): write to a topic of your own, declared \
                     with CREATE EXTERNAL TABLE … STORED AS KAFKA OPTIONS ('topic' '…')",
                    s.sink
                )));
            }
            if let Some((table, _)) = self
                .config
                .reference
                .topics
                .iter()
                .find(|(_, topic)| *topic == sink)
            {
                return Err(ServiceError::invalid(format!(
                    "{} writes to {sink}, the topic reference table {table} is kept current from \
                     ([reference.topics]): its rows are the table every query reads; write to a \
                     topic of your own",
                    s.sink
                )));
            }
            if sink == topics.dlq || sink == topics.late {
                return Err(ServiceError::invalid(format!(
                    "{} writes to {sink}, which only the engine writes (dead letters and late \
                     records, with their provenance): write to a topic of your own",
                    s.sink
                )));
            }
            if sink.ends_with(".repartition") {
                return Err(ServiceError::invalid(format!(
                    "{} writes to {sink}, a name of the engine's internal repartition topics: \
                     write to a topic of your own",
                    s.sink
                )));
            }
            // `__` is the broker's own (refused where the table is declared).
            if sink.starts_with('_') {
                return Err(ServiceError::invalid(format!(
                    "{} writes to {sink}: a topic whose name begins with '_' belongs to the \
                     platform beside the broker (a schema registry's _schemas, Confluent's \
                     _confluent-…), whose records are not a query's to write: write to a topic \
                     of your own",
                    s.sink
                )));
            }
            self.check_city_output(s)?;
            // An output its format cannot carry failed the query once started, after
            // validation had said it was valid.
            s.flow
                .writes
                .check_writable(self.codecs.descriptors.as_ref())
                .map_err(|e| ServiceError::invalid(e.to_string()))?;
        }
        if builtin {
            return Ok(());
        }
        let registered = self.registered_flows(replacing).await;
        // Topic → topics written from it, by every other registered query and this one.
        let mut edges: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        for (name, flows) in &registered {
            for flow in flows {
                for table in &flow.reads {
                    edges
                        .entry(table.options.topic.clone())
                        .or_default()
                        .push((name.clone(), flow.writes.options.topic.clone()));
                }
            }
        }
        for s in planned {
            for topic in s.read_topics() {
                edges
                    .entry(topic)
                    .or_default()
                    .push(("this query".into(), s.sink_topic.clone()));
            }
        }
        for s in planned {
            let reads = s.read_topics();
            if reads.contains(&s.sink_topic) {
                return Err(ServiceError::invalid(format!(
                    "{} writes to {}, which it reads itself: every record would be read again \
                     without end; write to a topic of your own",
                    s.sink, s.sink_topic
                )));
            }
            if let Some(path) = path_back(&edges, &s.sink_topic, &reads) {
                return Err(ServiceError::invalid(format!(
                    "{} writes to {}, whose records come back to it: {}. Every record would \
                     be read again without end: write to a topic that no query it reads from \
                     reads",
                    s.sink, s.sink_topic, path
                )));
            }
        }
        Ok(())
    }

    /// Refuses a statement writing to one of the city's output topics (read by the
    /// operations centre and by other queries, by the city's schema of it) rows of another
    /// shape: a column the city's schema lacks or has of another type, or a required column
    /// of it missing. The city's own table of the topic, or a declaration of the same
    /// columns, writes there.
    fn check_city_output(&self, s: &PlannedStatement) -> Result<(), ServiceError> {
        let streams = self
            .schemas
            .streams()
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        let Some((city, declared)) = streams.iter().find(|(_, d)| {
            d.role == crate::schema::StreamRole::Output
                && self.config.topics.topic_of(d) == s.sink_topic
        }) else {
            return Ok(());
        };
        let schema = city.output_schema();
        let mut differences = Vec::new();
        for f in s.sink_schema.fields() {
            match schema.field_with_name(f.name()) {
                Err(_) => differences.push(format!("{} is not a column of it", f.name())),
                Ok(c) if !same_type(c.data_type(), f.data_type()) => differences.push(format!(
                    "{} is {} in it, not {}",
                    f.name(),
                    c.data_type(),
                    f.data_type()
                )),
                // A null there is a record its consumers dead-letter.
                Ok(c) if !c.is_nullable() && f.is_nullable() => differences.push(format!(
                    "{} is never null in it: declare it {} NOT NULL",
                    f.name(),
                    f.name()
                )),
                Ok(_) => {}
            }
        }
        // Left out, a column with a default gets it; one without is missing from every row.
        for (i, c) in schema.fields().iter().enumerate() {
            let required = city.required.get(i).copied().unwrap_or(false)
                && city.defaults.get(i).is_none_or(Option::is_none);
            if required && s.sink_schema.field_with_name(c.name()).is_err() {
                differences.push(format!("its column {} is required", c.name()));
            }
        }
        if differences.is_empty() {
            return Ok(());
        }
        Err(ServiceError::invalid(format!(
            "{} writes to {}, the city's {} topic, whose consumers read it by the city's schema, \
             and declares other columns: {}. Write INSERT INTO {} (the city's declaration of \
             it), or to a topic of your own",
            s.sink,
            s.sink_topic,
            declared.table,
            differences.join("; "),
            declared.table
        )))
    }

    /// Per registered query (but `except`), the (topics read, topic written) of each of its
    /// statements; planned once per query and SQL, then remembered.
    async fn registered_flows(&self, except: Option<&str>) -> Vec<(String, Vec<Flow>)> {
        let mut out = Vec::new();
        for handle in self.handles() {
            let name = &handle.entry.name;
            if except == Some(name.as_str()) {
                continue;
            }
            let known = self.flows.lock().ok().and_then(|f| {
                f.get(name)
                    .filter(|(sql, _)| *sql == handle.entry.sql)
                    .map(|(_, flows)| flows.clone())
            });
            let flows = match known {
                Some(flows) => flows,
                None => {
                    // A query whose SQL no longer plans reads and writes nothing now.
                    let flows: Vec<Flow> = match self.plan_request(&handle.entry.sql).await {
                        Ok(planned) => planned.iter().filter_map(flow_of).collect(),
                        Err(_) => Vec::new(),
                    };
                    if let Ok(mut f) = self.flows.lock() {
                        f.insert(name.clone(), (handle.entry.sql.clone(), flows.clone()));
                    }
                    flows
                }
            };
            out.push((name.clone(), flows));
        }
        // Queries dropped since are forgotten.
        let registered: std::collections::HashSet<String> = self
            .handles()
            .iter()
            .map(|h| h.entry.name.clone())
            .collect();
        if let Ok(mut f) = self.flows.lock() {
            f.retain(|name, _| registered.contains(name));
        }
        out
    }

    /// How the stream queries in `sql` would run (see [`crate::plan::stream::StreamQuery::explain`]),
    /// without registering anything.
    pub async fn explain(&self, sql: &str) -> Result<Vec<serde_json::Value>, ServiceError> {
        Ok(self
            .plan_request(sql)
            .await?
            .iter()
            .map(|q| q.explain())
            .collect())
    }

    /// Plans a request's SQL in the city's context: its stream queries, at least one.
    async fn plan_request(
        &self,
        sql: &str,
    ) -> Result<Vec<crate::plan::stream::StreamQuery>, ServiceError> {
        if sql.trim().is_empty() {
            return Err(ServiceError::invalid("sql is empty"));
        }
        let ctx = self.context()?;
        let planned = plan_all(&ctx, sql).await.map_err(|e| {
            let message = sql_error_message(&e);
            if message.starts_with(crate::plan::sandbox::BUSY_PLANNING) {
                ServiceError::Busy(message)
            } else {
                ServiceError::invalid(message)
            }
        })?;
        if planned.is_empty() {
            return Err(ServiceError::invalid(
                "no stream query: the SQL must hold an INSERT INTO <stream table> SELECT … \
                 (CREATE EXTERNAL TABLE … STORED AS KAFKA declares a new output topic)",
            ));
        }
        Ok(planned)
    }

    /// The city's SQL context over this process's reference tables.
    fn context(&self) -> Result<crate::plan::stream::StreamContext, ServiceError> {
        city_context_in(
            crate::plan::stream::StreamContext::new(),
            &self.config.topics,
            &self.schemas,
            &self.reference,
        )
        .map_err(|e| ServiceError::Internal(e.to_string()))
    }

    /// A place among the previews running at once, or a conflict when both are taken.
    pub fn preview_slot(&self) -> Result<Turn, ServiceError> {
        self.previews
            .clone()
            .try_acquire_owned()
            .map(Turn)
            .map_err(|_| {
                ServiceError::Conflict(
                    "two previews are running, the most at once: try again when one is done".into(),
                )
            })
    }

    /// A place among the table replacements running at once, or a conflict when both are
    /// taken.
    pub fn replacement_slot(&self) -> Result<Turn, ServiceError> {
        self.replacements
            .clone()
            .try_acquire_owned()
            .map(Turn)
            .map_err(|_| {
                ServiceError::Conflict(
                    "two table replacements are running, the most at once: try again when one is \
                 done"
                        .into(),
                )
            })
    }

    /// Runs `sql`'s stream query over `input`'s rows without registering it, as `urbanstream
    /// run` does offline: in the query's memory pool, within `api.preview_timeout`, on the
    /// previews' own thread (a preview that outlives its timeout holds no query's thread).
    /// Keeps the first `limit` rows.
    /// `slot` ([`QueryManager::preview_slot`]) is taken before the request's body is read, so
    /// that clients waiting their turn hold no body in memory.
    pub async fn preview(
        &self,
        request: PreviewRequest,
        slot: Turn,
    ) -> Result<PreviewAnswer, ServiceError> {
        const MAX_ROWS: usize = 10_000;
        let limit = request.limit.unwrap_or(100);
        if limit == 0 || limit > MAX_ROWS {
            return Err(ServiceError::invalid(format!(
                "limit {limit}: between 1 and {MAX_ROWS} rows"
            )));
        }
        if request.input.is_some() == request.topic.is_some() {
            return Err(ServiceError::invalid(
                "give the stream's rows as \"input\" (a file's contents) or a \"topic\" range \
                 ({\"from_ms\", \"to_ms\"} or {\"from_offset\", \"to_offset\"}), one of them",
            ));
        }
        if let Some(input) = &request.input
            && !matches!(
                input.format.to_ascii_lowercase().as_str(),
                "csv" | "jsonl" | "ndjson" | "json" | "parquet"
            )
        {
            return Err(ServiceError::invalid(format!(
                "input.format {:?}: csv, jsonl or parquet",
                input.format
            )));
        }
        if request.sql.trim().is_empty() {
            return Err(ServiceError::invalid("sql is empty"));
        }
        if let Some(range) = &request.topic {
            range
                .check()
                .map_err(|e| ServiceError::invalid(e.to_string()))?;
        }
        let pool = usize::try_from(self.config.queries.memory_limit.as_u64()).unwrap_or(usize::MAX);
        let ctx = city_context_in(
            crate::plan::stream::StreamContext::with_memory_limit(pool)
                .map_err(|e| ServiceError::Internal(e.to_string()))?,
            &self.config.topics,
            &self.schemas,
            &self.reference,
        )
        .map_err(|e| ServiceError::Internal(e.to_string()))?;
        let query = crate::pipeline::offline::one_query(&ctx, &request.sql, "the SQL")
            .await
            .map_err(|e| ServiceError::invalid(sql_error_message(&e)))?;
        if request.topic.is_some() && query.inputs().len() > 1 {
            return Err(ServiceError::invalid(format!(
                "a preview over a topic reads one stream, and this query reads {} ({}): \
                 preview it over a file (\"input\"), or register it",
                query.inputs().len(),
                query.input_names()
            )));
        }
        let timeout = self.config.api.preview_timeout;
        let run = match (request.input, request.topic) {
            (Some(input), _) => {
                let extension = match input.format.to_ascii_lowercase().as_str() {
                    "csv" => ".csv",
                    "parquet" => ".parquet",
                    _ => ".jsonl",
                };
                let PreviewInput {
                    data,
                    rename,
                    time_zone,
                    time_unit,
                    ..
                } = input;
                // A Parquet file travels as its bytes in base64.
                let data = if extension == ".parquet" {
                    use base64::Engine as _;
                    base64::engine::general_purpose::STANDARD
                        .decode(data.trim())
                        .map_err(|e| {
                            ServiceError::invalid(format!(
                                "input.data of a parquet input is the file's bytes in base64: {e}"
                            ))
                        })?
                } else {
                    data.into_bytes()
                };
                self.preview_runtime.handle().spawn(async move {
                    let _turn = slot;
                    // Written off the runtime's threads: the body may be large.
                    let file = tokio::task::spawn_blocking(move || {
                        let file = tempfile::Builder::new()
                            .prefix("urbanstream-preview-")
                            .suffix(extension)
                            .tempfile()?;
                        std::fs::write(file.path(), &data)?;
                        Ok::<_, std::io::Error>(file)
                    })
                    .await
                    .map_err(|e| crate::Error::Config(format!("a file for the preview: {e}")))?
                    .map_err(crate::Error::Io)?;
                    let input = crate::pipeline::offline::RunInput {
                        path: file.path().to_path_buf(),
                        rename,
                        time_unit,
                        time_zone: time_zone.unwrap_or_else(|| "+00:00".into()),
                        state_limit: Some(pool),
                    };
                    let summary = crate::pipeline::offline::run_query(
                        query,
                        &input,
                        limit,
                        None::<&mut std::io::Sink>,
                    )
                    .await
                    .map_err(|e| in_request_terms(e, &file.path().to_string_lossy()));
                    drop(file);
                    summary.map(|s| (s, false))
                })
            }
            (None, Some(range)) => {
                const MAX_RECORDS: usize = 200_000;
                let max_bytes = usize::try_from(self.config.api.max_preview_body.as_u64())
                    .unwrap_or(usize::MAX);
                let brokers = self.config.kafka.brokers.clone();
                let properties = self.config.kafka_properties();
                let topic = query.source().options.topic.clone();
                let codecs = self.codecs.clone();
                let ctx = ctx.clone();
                self.preview_runtime.handle().spawn(async move {
                    let _turn = slot;
                    let read = tokio::task::spawn_blocking(move || {
                        crate::source::range::read_range(
                            &brokers,
                            &properties,
                            &topic,
                            &range,
                            (MAX_RECORDS, max_bytes),
                            timeout,
                        )
                    })
                    .await
                    .map_err(|e| crate::Error::Config(format!("reading the topic: {e}")))??;
                    let summary = crate::pipeline::offline::run_query_over_records(
                        query,
                        &ctx,
                        &read.batches,
                        limit,
                        &codecs,
                        Some(pool),
                    )
                    .await?;
                    Ok((summary, read.truncated))
                })
            }
            (None, None) => return Err(ServiceError::invalid("no input")),
        };
        // A client gone (the request dropped) stops its preview; the turn is free once the
        // preview's task has ended.
        let run = tokio_util::task::AbortOnDropHandle::new(run);
        let abort = run.abort_handle();
        let (summary, input_truncated) = match tokio::time::timeout(timeout, run).await {
            Ok(Ok(Ok(summary))) => summary,
            // The broker or the disk failed: not the request's fault.
            Ok(Ok(Err(e @ (Error::Kafka(_) | Error::Io(_))))) => {
                return Err(ServiceError::Internal(format!(
                    "the preview could not run: {e}"
                )));
            }
            Ok(Ok(Err(e))) => return Err(ServiceError::invalid(sql_error_message(&e))),
            Ok(Err(e)) => {
                return Err(ServiceError::Internal(format!("the preview stopped: {e}")));
            }
            Err(_) => {
                abort.abort();
                return Err(ServiceError::invalid(format!(
                    "the preview ran longer than api.preview_timeout ({}): preview fewer rows",
                    humantime::format_duration(timeout)
                )));
            }
        };
        let mut rows = Vec::new();
        for batch in &summary.shown {
            let (bytes, _) = crate::sink::encode_json_rows(batch)
                .map_err(|e| ServiceError::Internal(e.to_string()))?;
            for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                let line = String::from_utf8(line.to_vec())
                    .map_err(|e| ServiceError::Internal(e.to_string()))?;
                rows.push(
                    serde_json::value::RawValue::from_string(line)
                        .map_err(|e| ServiceError::Internal(e.to_string()))?,
                );
            }
        }
        let columns = summary
            .shown
            .first()
            .map_or_else(Vec::new, |batch| ColumnInfo::of(&batch.schema()));
        Ok(PreviewAnswer {
            truncated: summary.output_rows > rows.len() as u64,
            rows,
            columns,
            input_rows: summary.input_rows,
            output_rows: summary.output_rows,
            rejected: summary.rejected,
            first_rejection: summary.first_rejection,
            refused_results: summary.refused_results,
            first_refused_result: summary.first_refused_result,
            unreadable_time: summary.unreadable_time,
            first_unreadable: summary.first_unreadable,
            ignored_columns: summary.ignored_columns,
            missing_fields: summary.missing_fields,
            diverted: summary.diverted,
            input_truncated,
        })
    }

    /// The CSV of reference table `name`'s current version, and its version.
    pub fn reference_rows(&self, name: &str) -> Result<(u64, Arc<str>), ServiceError> {
        let table = self.reference.get(name).ok_or_else(|| {
            ServiceError::NotFound(format!(
                "no reference table named {name:?} (GET /v1/tables lists them)"
            ))
        })?;
        Ok((table.version, table.csv.clone()))
    }

    /// Installs `csv` as the next version of reference table `name` (or a new table): every
    /// query reads it from its next micro-batch on. Refused with the reason when the CSV does
    /// not fit the table (header, types, the city's cross-references), or when `name` is a
    /// stream.
    /// `slot` ([`QueryManager::replacement_slot`]) is taken before the CSV is read.
    pub async fn replace_reference(
        &self,
        name: &str,
        csv: String,
        slot: Turn,
    ) -> Result<TableInfo, ServiceError> {
        if let Some(follows) = self.followers.status(name) {
            return Err(ServiceError::Conflict(format!(
                "{name} is kept current from topic {}: produce its changes there (one JSON \
                 object per row, keyed by its id), or remove it from [reference.topics]",
                follows.topic
            )));
        }
        if let Ok(t) = self.table(name).await
            && t.kind == "stream"
        {
            return Err(ServiceError::Conflict(format!(
                "{name} is a stream (topic {}), not a reference table",
                t.topic.unwrap_or_default()
            )));
        }
        // A table a registered query declares (its output, say) keeps its name.
        let declared = {
            let catalog = self
                .catalog()
                .map_err(|e| ServiceError::Internal(e.to_string()))?;
            catalog.entries().iter().find_map(|entry| {
                let statements = crate::plan::stream::StreamContext::parse(&entry.sql).ok()?;
                statements
                    .iter()
                    .filter_map(declared_table)
                    .any(|declared| declared.eq_ignore_ascii_case(name))
                    .then(|| entry.name.clone())
            })
        };
        if let Some(query) = declared {
            return Err(ServiceError::Conflict(format!(
                "{name} is a table or view query {query} declares: give the reference table \
                 another name"
            )));
        }
        // Parsing, checking and two fsyncs: off the API's threads.
        let (tables, table, csv) = (self.reference.clone(), name.to_string(), csv.to_string());
        // The turn is held until the replacement ends, even if its client has gone.
        let installed = tokio::task::spawn_blocking(move || {
            let _turn = slot;
            tables.replace(&table, &csv)
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("replacing {name}: {e}")))?
        .map_err(|e| match e {
            crate::Error::Reference { .. } => ServiceError::invalid(e.to_string()),
            other => ServiceError::Internal(other.to_string()),
        })?;
        tracing::info!(
            table = %installed.name,
            version = installed.version,
            rows = installed.rows,
            "reference table replaced"
        );
        self.table(&installed.name).await
    }

    /// Removes a reference table added at run time, with its kept versions. Refused for the
    /// city's tables, a table kept current from a topic, and a table a query reads (named).
    pub async fn remove_reference(&self, name: &str) -> Result<(), ServiceError> {
        if let Some(follows) = self.followers.status(name) {
            return Err(ServiceError::Conflict(format!(
                "{name} is kept current from topic {}: remove it from [reference.topics] first",
                follows.topic
            )));
        }
        match self.table(name).await {
            Ok(t) if t.kind == "stream" => {
                return Err(ServiceError::Conflict(format!(
                    "{name} is a stream (topic {}), not a reference table",
                    t.topic.unwrap_or_default()
                )));
            }
            Ok(_) => {}
            Err(e) => return Err(e),
        }
        // Under the registry's lock: no query that reads it can be registered meanwhile.
        let _registering = self.registering.lock().await;
        let readers: Vec<String> = self
            .handles()
            .iter()
            .filter(|h| reads_table(&h.entry.sql, name))
            .map(|h| h.entry.name.clone())
            .collect();
        if !readers.is_empty() {
            return Err(ServiceError::Conflict(format!(
                "{name} is read by {} {}: drop {} first",
                if readers.len() == 1 {
                    "query"
                } else {
                    "queries"
                },
                readers.join(", "),
                if readers.len() == 1 { "it" } else { "them" },
            )));
        }
        let (tables, table) = (self.reference.clone(), name.to_string());
        let removed = tokio::task::spawn_blocking(move || tables.remove(&table))
            .await
            .map_err(|e| ServiceError::Internal(format!("removing {name}: {e}")))?
            .map_err(|e| match e {
                crate::Error::Reference { .. } => ServiceError::Conflict(e.to_string()),
                other => ServiceError::Internal(other.to_string()),
            })?;
        tracing::info!(
            table = %removed.name,
            version = removed.version,
            "reference table removed"
        );
        Ok(())
    }

    /// The tables of the city's SQL context: streams and reference tables, by name.
    pub async fn tables(&self) -> Result<Vec<TableInfo>, ServiceError> {
        use crate::plan::table::StreamTable;
        let ctx = self.context()?;
        let session = ctx.session();
        let Some(schema) = session
            .catalog("datafusion")
            .and_then(|c| c.schema("public"))
        else {
            return Ok(Vec::new());
        };
        let mut names = schema.table_names();
        names.sort();
        let mut out = Vec::new();
        for name in names {
            let Ok(Some(provider)) = schema.table(&name).await else {
                continue;
            };
            let columns = ColumnInfo::of(&provider.schema());
            out.push(match provider.downcast_ref::<StreamTable>() {
                Some(stream) => TableInfo {
                    name,
                    kind: "stream",
                    topic: Some(stream.options.topic.clone()),
                    event_time: stream.options.event_time.clone(),
                    watermark_delay_ms: Some(stream.options.watermark_delay.as_millis() as u64),
                    key: stream.options.key.clone(),
                    format: Some(stream.options.format.as_str()),
                    protobuf_message: stream.options.protobuf_message.clone(),
                    version: None,
                    rows: None,
                    derived_from: None,
                    installed_ms: None,
                    follows: None,
                    columns,
                },
                None => {
                    let current = self.reference.get(&name);
                    TableInfo {
                        kind: "reference",
                        topic: None,
                        event_time: None,
                        watermark_delay_ms: None,
                        key: None,
                        format: None,
                        protobuf_message: None,
                        version: current.as_ref().map(|t| t.version),
                        rows: current.as_ref().map(|t| t.rows),
                        derived_from: current.as_ref().and_then(|t| t.derived_from),
                        installed_ms: current
                            .as_ref()
                            .map(|t| t.installed_ms)
                            .filter(|ms| *ms > 0),
                        follows: self.followers.status(&name),
                        name,
                        columns,
                    }
                }
            });
        }
        Ok(out)
    }

    /// One table of [`QueryManager::tables`].
    pub async fn table(&self, name: &str) -> Result<TableInfo, ServiceError> {
        self.tables()
            .await?
            .into_iter()
            .find(|t| t.name.eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                ServiceError::NotFound(format!(
                    "no table named {name:?} (GET /v1/tables lists them)"
                ))
            })
    }

    /// Every function analysts' SQL can call, urbanstream's first, then by name.
    pub fn functions(&self) -> Result<Vec<FunctionInfo>, ServiceError> {
        let ctx = crate::plan::stream::StreamContext::new();
        let state = ctx.session().state();
        let ours: std::collections::HashSet<String> = urbanstream_operators::scalar_functions()
            .iter()
            .map(|f| f.name().to_string())
            .chain(
                urbanstream_operators::aggregate_functions()
                    .iter()
                    .map(|f| f.name().to_string()),
            )
            .chain(
                urbanstream_operators::window_functions()
                    .iter()
                    .map(|f| f.name().to_string()),
            )
            .collect();
        let mut out: Vec<FunctionInfo> = Vec::new();
        let kinds: [(&'static str, Vec<String>); 3] = [
            ("scalar", state.scalar_functions().keys().cloned().collect()),
            (
                "aggregate",
                state.aggregate_functions().keys().cloned().collect(),
            ),
            ("window", state.window_functions().keys().cloned().collect()),
        ];
        for (kind, names) in kinds {
            for name in names {
                out.push(FunctionInfo {
                    urbanstream: ours.contains(&name),
                    name,
                    kind,
                });
            }
        }
        out.sort_by(|a, b| b.urbanstream.cmp(&a.urbanstream).then(a.name.cmp(&b.name)));
        Ok(out)
    }

    /// Validates and registers a new query, writes the catalog, and starts it.
    pub async fn create(
        &self,
        name: &str,
        sql: &str,
        memory_limit: Option<u64>,
    ) -> Result<QueryStatus, ServiceError> {
        check_name("query", name)?;
        if DEFAULT_QUERIES.iter().any(|(builtin, _)| *builtin == name) {
            return Err(ServiceError::Conflict(format!(
                "{name} is the name of a built-in query (taken even while the built-in queries \
                 are off): give your query another name"
            )));
        }
        let _operation = self.operation(name).await;
        if self.handle(name).is_ok() {
            return Err(duplicate(name));
        }
        if memory_limit == Some(0) {
            return Err(ServiceError::invalid("memory_limit must be above 0 bytes"));
        }
        let max = self.config.queries.max_memory_limit;
        if memory_limit.is_some_and(|m| m > max.as_u64()) {
            return Err(ServiceError::invalid(format!(
                "memory_limit is above the server's queries.max_memory_limit ({max}): ask for \
                 at most {} bytes",
                max.as_u64()
            )));
        }
        let registering = self.registering.lock().await;
        self.validate(sql).await?;
        let entry = CatalogEntry {
            name: name.to_string(),
            sql: sql.to_string(),
            paused: false,
            memory_limit,
            created_at: epoch_ms(),
        };
        let handle = {
            // The name, the limit, the catalog and the registry are checked and changed under
            // the registry's lock, so two requests for one name cannot both succeed.
            let mut queries = self
                .queries
                .lock()
                .map_err(|_| ServiceError::Internal("registry lock poisoned".into()))?;
            if queries.contains_key(name) {
                return Err(duplicate(name));
            }
            let max = self.config.queries.max_queries;
            if queries.len() >= max {
                return Err(ServiceError::Conflict(format!(
                    "the service runs its limit of {max} queries (queries.max_queries); drop \
                     one first"
                )));
            }
            let was_dropped = self
                .catalog()
                .and_then(|mut c| c.insert(entry.clone()))
                .map_err(|e| ServiceError::Internal(format!("catalog not written: {e}")))?;
            let handle = self.new_handle(entry, false);
            handle.fresh.store(was_dropped, Ordering::Relaxed);
            queries.insert(name.to_string(), handle.clone());
            handle
        };
        drop(registering);
        info!(query = name, "query registered");
        self.start(&handle).await;
        Ok(handle.status())
    }

    /// Every query's status, by name.
    pub fn list(&self) -> Vec<QueryStatus> {
        self.handles().iter().map(|h| h.status()).collect()
    }

    /// One query's status.
    pub fn get(&self, name: &str) -> Result<QueryStatus, ServiceError> {
        Ok(self.handle(name)?.status())
    }

    /// Stops a registered query, removes it from the catalog and forgets it.
    pub async fn delete(&self, name: &str) -> Result<(), ServiceError> {
        let _operation = self.operation(name).await;
        let handle = self.handle(name)?;
        if handle.builtin {
            return Err(ServiceError::Conflict(format!(
                "{name} is a built-in query: pause it, or run without the built-in queries \
                 (queries.defaults = false)"
            )));
        }
        self.catalog()
            .and_then(|mut c| c.remove(name))
            .map_err(|e| ServiceError::Internal(format!("catalog not written: {e}")))?;
        stop(&handle).await;
        // A query created later under the same name starts from scratch: the catalog has
        // recorded the drop (see `fresh`), and its checkpoints go now, before the name is free
        // again, so a create racing this one cannot find them.
        let checkpoints = self.checkpoint_root.join(name);
        let group = group_of(&self.config.kafka.group_id, &handle.entry);
        match checkpoints.owner().await {
            // Another service's, given the same checkpoint storage: not this query's to remove.
            Ok(Some(owner)) if owner != group => {
                warn!(query = name, location = %checkpoints, owner = %owner, "checkpoints of another consumer group left in place");
            }
            Err(e) => {
                warn!(query = name, location = %checkpoints, error = %e, "checkpoints left in place: whose they are does not read");
            }
            Ok(_) => {
                if let Err(e) = checkpoints.remove_all().await {
                    tracing::warn!(query = name, location = %checkpoints, error = %e, "checkpoints not removed");
                }
            }
        }
        if let Ok(mut queries) = self.queries.lock() {
            queries.remove(name);
        }
        info!(query = name, "query dropped");
        Ok(())
    }

    /// Stops a query after it publishes what it has and commits; it stays paused across
    /// restarts of the service.
    pub async fn pause(&self, name: &str) -> Result<QueryStatus, ServiceError> {
        let _operation = self.operation(name).await;
        let handle = self.handle(name)?;
        self.persist_paused(&handle, true)?;
        stop(&handle).await;
        handle.set(QueryState::Paused, None);
        info!(query = name, "query paused");
        Ok(handle.status())
    }

    /// Starts a paused query again from its committed offsets.
    pub async fn resume(&self, name: &str) -> Result<QueryStatus, ServiceError> {
        let _operation = self.operation(name).await;
        let handle = self.handle(name)?;
        if handle.state() != QueryState::Paused {
            return Err(ServiceError::Conflict(format!(
                "{name} is {}, not PAUSED (restart starts a query in any state)",
                handle.state().as_str()
            )));
        }
        self.persist_paused(&handle, false)?;
        self.start(&handle).await;
        info!(query = name, "query resumed");
        Ok(handle.status())
    }

    /// Refuses to change the checkpoints of query `name` (reset, upgrade, savepoint) when
    /// another consumer group than `group` claimed them (another service given the same
    /// checkpoint storage), or when whose they are does not read.
    async fn check_owner(&self, name: &str, group: &str) -> Result<(), ServiceError> {
        if !self.config.checkpoint.enabled {
            return Ok(());
        }
        let at = self.checkpoint_root.join(name);
        match at.owner().await {
            Ok(Some(owner)) if owner != group => Err(ServiceError::Conflict(format!(
                "{name}'s checkpoints at {at} are those of consumer group {owner}, another \
                 service's given the same checkpoint storage, not this one's ({group}): they \
                 are not this service's to change. Give each service a checkpoint.dir (or \
                 checkpoint.url) of its own"
            ))),
            Ok(_) => Ok(()),
            Err(e) => Err(ServiceError::Internal(format!(
                "{name}'s checkpoints at {at}: whose they are does not read ({e}); they are \
                 left as they are"
            ))),
        }
    }

    /// Where the savepoints of query `name` are kept: beside the queries' checkpoints, under
    /// `_savepoints/` (query names start with a letter, so no query's checkpoints are
    /// there), which a dropped query's removal leaves alone.
    fn savepoints_of(&self, name: &str) -> crate::checkpoint::Location {
        self.checkpoint_root.join("_savepoints").join(name)
    }

    /// Keeps the query's state under the name `savepoint`: a running query stops (publishing
    /// what it has, committing and checkpointing), the newest checkpoint of each of its
    /// stores is copied, and it starts again from where it stopped.
    pub async fn savepoint(
        &self,
        name: &str,
        savepoint: &str,
    ) -> Result<crate::checkpoint::savepoint::Savepoint, ServiceError> {
        use crate::checkpoint::savepoint;
        let _operation = self.operation(name).await;
        let handle = self.handle(name)?;
        check_name("savepoint", savepoint)?;
        if !self.config.checkpoint.enabled {
            return Err(ServiceError::Conflict(
                "checkpoints are off (checkpoint.enabled = false), so queries keep no state to \
                 save"
                    .into(),
            ));
        }
        self.check_owner(name, &group_of(&self.config.kafka.group_id, &handle.entry))
            .await?;
        let target = self.savepoints_of(name).join(savepoint);
        let at = target.clone();
        if blocking(move || savepoint::read(&at)).await?.is_some() {
            return Err(ServiceError::Conflict(format!(
                "query {name} has a savepoint named {savepoint:?} already: choose another name"
            )));
        }
        let running = matches!(handle.state(), QueryState::Running | QueryState::Starting);
        if running {
            stop(&handle).await;
        }
        let from = self.checkpoint_root.join(name);
        let described = savepoint::Savepoint {
            name: savepoint.to_string(),
            query: name.to_string(),
            sql: handle.entry.sql.clone(),
            created_at_ms: epoch_ms(),
            layouts: Vec::new(),
            stores: Vec::new(),
            bytes: 0,
            damaged: None,
        };
        let result = blocking(move || {
            // What a failed attempt left (no description): gone first.
            if !savepoint::stores_below(&target)?.is_empty() {
                crate::checkpoint::block_on(target.remove_all())??;
            }
            if savepoint::stores_below(&from)?.is_empty() {
                return Ok(None);
            }
            let (stores, bytes) = savepoint::copy_newest(&from, &target)?;
            let mut layouts: Vec<Vec<String>> = savepoint::newest_manifests(&target)?
                .into_iter()
                .flat_map(|(_, m)| m.queries.into_iter().map(|q| q.layout))
                .collect();
            layouts.sort();
            layouts.dedup();
            let described = savepoint::Savepoint {
                stores,
                bytes,
                layouts,
                ..described
            };
            savepoint::describe(&target, &described)?;
            Ok(Some(described))
        })
        .await;
        if running {
            self.start(&handle).await;
        }
        let saved = result?.ok_or_else(|| {
            ServiceError::Conflict(format!(
                "query {name} has no checkpoint to save yet: it writes its first once it has \
                 read its input (every checkpoint.interval, and when it stops)"
            ))
        })?;
        info!(
            query = name,
            savepoint,
            stores = saved.stores.len(),
            bytes = saved.bytes,
            "savepoint taken"
        );
        Ok(saved)
    }

    /// The savepoints kept of query `name` (a dropped query's too), by name.
    pub async fn savepoints(
        &self,
        name: &str,
    ) -> Result<Vec<crate::checkpoint::savepoint::Savepoint>, ServiceError> {
        check_name("query", name)?;
        let at = self.savepoints_of(name);
        blocking(move || crate::checkpoint::savepoint::list(&at)).await
    }

    /// Replaces a query's SQL and keeps its state, or takes it back to a savepoint (with its
    /// SQL or new SQL). The state checkpointed (the query's newest, or the savepoint's) must
    /// fit the new SQL: each of its checkpoints' queries has the new SQL's state layout (or
    /// the same SQL). Otherwise the upgrade is refused, naming what differs, and the query
    /// goes on as it was. Built-in queries come with the binary and are not upgraded.
    pub async fn upgrade(
        &self,
        name: &str,
        request: UpgradeRequest,
    ) -> Result<QueryStatus, ServiceError> {
        use crate::checkpoint::savepoint;
        let _operation = self.operation(name).await;
        let handle = self.handle(name)?;
        if handle.builtin {
            return Err(ServiceError::Conflict(format!(
                "{name} is a built-in query: its SQL comes with urbanstream; register your \
                 version under another name (and pause {name})"
            )));
        }
        if request.sql.is_none() && request.savepoint.is_none() {
            return Err(ServiceError::invalid(format!(
                "an upgrade needs \"sql\" (the query's new SQL), \"savepoint\" (the state to \
                 go back to), or both; to start the query again as it is, POST \
                 /v1/queries/{name}/restart"
            )));
        }
        let new_sql = request.sql.is_some();
        let sql = request.sql.unwrap_or_else(|| handle.entry.sql.clone());
        // Until the new SQL is the query's (see `registering`).
        let _registering = self.registering.lock().await;
        let planned = self.plan_request(&sql).await?;
        self.check_outputs(&statements(&planned)?, Some(name), false)
            .await?;
        if new_sql {
            check_shared_topics(
                &statements(&planned)?,
                &self.registered_flows(Some(name)).await,
            )?;
        }
        let group = group_of(&self.config.kafka.group_id, &handle.entry);
        // Another service's checkpoints (another group's, given the same storage): neither
        // replaced by a savepoint nor taken over by new SQL.
        self.check_owner(name, &group).await?;
        let wanted: Vec<savepoint::Wanted> = planned
            .iter()
            .zip(first_stages(&planned))
            .enumerate()
            .map(|(i, (q, stage))| savepoint::Wanted {
                sql: q.sql().to_string(),
                settings: q.settings_sql(),
                layout: q.state_layout(),
                tables: q.tables_identity(),
                topic: match stage {
                    Some(_) => crate::pipeline::repartition_topic_of(&group, i),
                    None => q.source().options.topic.clone(),
                },
            })
            .collect();
        let enabled = self.config.checkpoint.enabled;
        let (held_at, what, saved_sql) = match &request.savepoint {
            Some(name_of) => {
                check_name("savepoint", name_of)?;
                if !enabled {
                    return Err(ServiceError::Conflict(
                        "checkpoints are off (checkpoint.enabled = false): a query cannot go \
                         back to a savepoint"
                            .into(),
                    ));
                }
                let at = self.savepoints_of(name).join(name_of);
                let damaged = |e: Error| {
                    ServiceError::Conflict(format!(
                        "savepoint {name_of} of query {name} is damaged: {e}; the query goes on \
                         as it is: go back to another savepoint (`urbanstream query savepoints \
                         {name}` lists them)"
                    ))
                };
                // The savepoint is read and checked whole before anything of the query's
                // changes: a store missing or not reading back would otherwise be found
                // with the query stopped and its own state half replaced.
                let found = blocking({
                    let at = at.clone();
                    move || {
                        Ok(match savepoint::read(&at) {
                            Ok(Some(found)) => Some(savepoint::verify(&at, &found).map(|()| found)),
                            Ok(None) => None,
                            Err(e) => Some(Err(e)),
                        })
                    }
                })
                .await?;
                let found = match found {
                    Some(found) => found.map_err(damaged)?,
                    None => {
                        return Err(ServiceError::NotFound(format!(
                            "query {name} has no savepoint named {name_of:?} (`urbanstream \
                             query savepoints {name}` lists them)"
                        )));
                    }
                };
                (Some(at), format!("savepoint {name_of}"), Some(found.sql))
            }
            None if enabled => (
                Some(self.checkpoint_root.join(name)),
                "the query's state".to_string(),
                None,
            ),
            // Without checkpoints a query keeps no state across a restart.
            None => (None, String::new(), None),
        };
        if let Some(at) = held_at {
            let manifests = blocking(move || savepoint::newest_manifests(&at)).await?;
            if let Some(why) = savepoint::misfit(&manifests, &wanted) {
                return Err(ServiceError::Conflict(format!(
                    "the new SQL cannot take over {what}: {why}. An upgrade keeps the windows, \
                     group keys, aggregates (in their order), detectors, joins, output topic \
                     and the settings of lateness and early results (filters, projections, \
                     HAVING and the columns published may change, except in a query that \
                     keeps rows: see README); to start afresh, drop the query and create it \
                     again, or register the new SQL under another name"
                )));
            }
        }
        // A repartitioned query's first stage selects and routes records by the SQL it runs:
        // what it has passed on (and, going back to a savepoint, passes on again) must be
        // what the new SQL's would.
        let stages = first_stages(&planned);
        if let Ok(current) = self.plan_request(&handle.entry.sql).await
            && stages_differ(&first_stages(&current), &stages)
        {
            return Err(ServiceError::Conflict(format!(
                "{name} is repartitioned through an internal topic, whose first stage selects \
                 and routes records by the windowed select's FROM, joins, WHERE and group \
                 keys; the new SQL changes them, and what it has passed on was selected by \
                 them. Keep those clauses as they are, or drop the query and create it again \
                 (or register the new SQL under another name)"
            )));
        }
        if let (Some(name_of), Some(saved_sql)) = (&request.savepoint, saved_sql)
            && stages.iter().any(Option::is_some)
            && stages_differ(
                &first_stages(&self.plan_request(&saved_sql).await?),
                &stages,
            )
        {
            return Err(ServiceError::Conflict(format!(
                "{name} is repartitioned through an internal topic, and savepoint {name_of} was \
                 taken when its first stage selected or routed records by another FROM, joins, \
                 WHERE or group keys than it does now: going back, the records passed on since \
                 would be read as another SQL selected them"
            )));
        }
        let paused = handle.state() == QueryState::Paused;
        let was_running = !paused && handle.state() != QueryState::Failed;
        stop(&handle).await;
        if let Some(name_of) = &request.savepoint {
            let from = self.savepoints_of(name).join(name_of);
            let to = self.checkpoint_root.join(name);
            if let Err(e) = blocking(move || savepoint::restore(&from, &to)).await {
                // Some stores may have gone back already: the query waits for the attempt
                // to be made again rather than run half restored.
                let message =
                    format!("going back to savepoint {name_of} failed: {e}; try the upgrade again");
                handle.set(QueryState::Failed, Some(message.clone()));
                return Err(ServiceError::Internal(message));
            }
        }
        if let Err(e) = self.catalog().and_then(|mut c| c.set_sql(name, &sql)) {
            let message = format!("catalog not written: {e}");
            if request.savepoint.is_some() {
                // Its state went back already: it waits for the upgrade to be made again.
                handle.set(
                    QueryState::Failed,
                    Some(format!("{message}; try the upgrade again")),
                );
            } else if was_running {
                self.start(&handle).await;
            }
            return Err(ServiceError::Internal(message));
        }
        let entry = CatalogEntry {
            sql,
            ..handle.entry.clone()
        };
        let upgraded = self.new_handle(entry, false);
        upgraded
            .fresh
            .store(handle.fresh.load(Ordering::Relaxed), Ordering::Relaxed);
        handle.retired.store(true, Ordering::Relaxed);
        if let Ok(mut queries) = self.queries.lock() {
            queries.insert(name.to_string(), upgraded.clone());
        }
        if paused {
            upgraded.set(QueryState::Paused, None);
        } else {
            self.start(&upgraded).await;
        }
        info!(
            query = name,
            savepoint = request.savepoint.as_deref(),
            "query upgraded"
        );
        Ok(upgraded.status())
    }

    /// Stops a query, removes its checkpoints and starts it afresh: with empty state, from
    /// the beginning of its inputs, whatever its consumer group committed (as a query dropped
    /// and created again, but keeping its name, catalog entry and savepoints). The way to
    /// start a built-in query whose checkpointed state does not fit the SQL a new version
    /// ships. A paused query stays paused, and starts afresh when resumed.
    pub async fn reset(&self, name: &str) -> Result<QueryStatus, ServiceError> {
        let _operation = self.operation(name).await;
        let handle = self.handle(name)?;
        let group = group_of(&self.config.kafka.group_id, &handle.entry);
        self.check_owner(name, &group).await?;
        let paused = handle.state() == QueryState::Paused;
        // Recorded first: should the service stop half-way, the query still starts afresh.
        self.catalog()
            .and_then(|mut c| c.set_reset(name, true))
            .map_err(|e| ServiceError::Internal(format!("catalog not written: {e}")))?;
        stop(&handle).await;
        // A run that started afresh and had settled clears the record as it stops: again.
        self.catalog()
            .and_then(|mut c| c.set_reset(name, true))
            .map_err(|e| ServiceError::Internal(format!("catalog not written: {e}")))?;
        let checkpoints = self.checkpoint_root.join(name);
        if let Err(e) = checkpoints.remove_all().await {
            // Started again as it was, it would restore a partly removed state: it waits
            // for the reset to be made again.
            let why = format!(
                "its checkpoints at {checkpoints} were not all removed ({e}); reset it again"
            );
            handle.set(QueryState::Failed, Some(format!("reset: {why}")));
            return Err(ServiceError::Internal(format!("{name}: {why}")));
        }
        handle.fresh.store(true, Ordering::Relaxed);
        if let Ok(mut last) = handle.stats.last_checkpoint.lock() {
            *last = None;
        }
        // Its state is gone: no watermark or state to show until the new run has its own.
        handle.stats.watermark_ms.store(i64::MIN, Ordering::Relaxed);
        handle.stats.state_groups.store(0, Ordering::Relaxed);
        handle.stats.state_bytes.store(0, Ordering::Relaxed);
        if paused {
            handle.set(QueryState::Paused, None);
        } else {
            self.start(&handle).await;
        }
        info!(
            query = name,
            "query reset: its state removed, it reads its inputs afresh"
        );
        Ok(handle.status())
    }

    /// Stops a query if it runs and starts it again (a FAILED query included).
    pub async fn restart(&self, name: &str) -> Result<QueryStatus, ServiceError> {
        let _operation = self.operation(name).await;
        let handle = self.handle(name)?;
        self.validate_handle(&handle).await?;
        self.persist_paused(&handle, false)?;
        stop(&handle).await;
        self.start(&handle).await;
        info!(query = name, "query restarted");
        Ok(handle.status())
    }

    fn persist_paused(&self, handle: &QueryHandle, paused: bool) -> Result<(), ServiceError> {
        self.catalog()
            .and_then(|mut c| c.set_paused(&handle.entry.name, paused, handle.builtin))
            .map_err(|e| ServiceError::Internal(format!("catalog not written: {e}")))
    }

    /// Stops every query (each publishes what it has, flushes and commits); the catalog keeps
    /// them for the next start.
    pub async fn shutdown(&self) {
        let handles = self.handles();
        futures::future::join_all(handles.iter().map(|h| stop_within(h, SHUTDOWN_WAIT))).await;
        info!(queries = handles.len(), "queries stopped");
        let followers = self.followers.clone();
        let _ = tokio::task::spawn_blocking(move || followers.stop()).await;
    }

    /// The process's reference tables, as its queries read them.
    pub fn reference_tables(&self) -> &ReferenceTables {
        &self.reference
    }

    /// The reference tables whose topic has not been read to its end yet.
    pub fn reference_tables_loading(&self) -> Vec<String> {
        self.followers.loading()
    }

    /// The names of the queries in `state`.
    pub fn names_in(&self, state: QueryState) -> Vec<String> {
        self.handles()
            .iter()
            .filter(|h| h.state() == state)
            .map(|h| h.entry.name.clone())
            .collect()
    }

    /// Names of the RUNNING queries that hold no input partition.
    pub fn running_without_partitions(&self) -> Vec<String> {
        self.handles()
            .iter()
            .filter(|h| {
                h.state() == QueryState::Running
                    && h.stats.assigned_partitions.load(Ordering::Relaxed) == 0
            })
            .map(|h| h.entry.name.clone())
            .collect()
    }

    /// Counts of queries per state.
    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        let mut counts: BTreeMap<&'static str, usize> = [
            QueryState::Starting,
            QueryState::Running,
            QueryState::Paused,
            QueryState::Failed,
        ]
        .into_iter()
        .map(|s| (s.as_str(), 0))
        .collect();
        for h in self.handles() {
            *counts.entry(h.state().as_str()).or_default() += 1;
        }
        counts
    }

    /// The pipeline settings of `handle`'s query.
    fn pipeline_config(&self, handle: &QueryHandle) -> PipelineConfig {
        let c = &self.config;
        let mut p = PipelineConfig::new(c.kafka.brokers.clone());
        p.group_id = group_of(&c.kafka.group_id, &handle.entry);
        p.topics = c.topics.clone();
        p.max_batch_rows = c.pipeline.max_batch_rows;
        p.linger = c.pipeline.linger;
        p.producer_linger = c.pipeline.producer_linger;
        p.properties = c.kafka_properties();
        p.topic_properties = c
            .kafka
            .topic_properties
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        p.default_queries = false;
        p.queries = vec![(handle.entry.name.clone(), handle.entry.sql.clone())];
        p.name = Some(handle.entry.name.clone());
        p.builtin = handle.builtin;
        p.memory_limit = Some(usize::try_from(handle.memory_limit).unwrap_or(usize::MAX));
        p.max_state_groups = Some(c.queries.max_state_groups);
        // With exactly-once output, `checkpoint.instance` already names this process (its
        // transactional ids), so it is also its stable member id in each query's group:
        // restarted, it gets its partitions back at once; a second live process with its
        // identity is fenced. (At-least-once processes may share the default instance name,
        // so they join as dynamic members.)
        p.reference = Some(self.reference.clone());
        p.unknown_ids = c.reference.unknown_ids;
        p.registry = self.codecs.registry.clone();
        p.descriptors = self.codecs.descriptors.clone();
        p.group_instance_id = (c.checkpoint.enabled && c.checkpoint.exactly_once)
            .then(|| c.checkpoint.instance.clone());
        p.checkpoint = c.checkpoint.enabled.then(|| CheckpointSettings {
            location: self.checkpoint_root.join(&handle.entry.name),
            interval: c.checkpoint.interval,
            retain: c.checkpoint.retain,
            transactional_id: c.checkpoint.exactly_once.then(|| {
                format!(
                    "{}.{}.{}",
                    c.kafka.group_id, handle.entry.name, c.checkpoint.instance
                )
            }),
            read_back_from_log_start: c.checkpoint.read_back_from_log_start,
            claim: true,
        });
        p
    }

    /// Starts `handle`'s pipeline under a supervisor that retries transient errors.
    async fn start(&self, handle: &Arc<QueryHandle>) {
        if handle.retired.load(Ordering::Relaxed) {
            return;
        }
        let mut control = handle.control.lock().await;
        let stop = Arc::new(AtomicBool::new(false));
        control.stop = stop.clone();
        handle.set(QueryState::Starting, None);
        control.task = Some(self.runtime.handle().spawn(supervise(
            handle.clone(),
            self.pipeline_config(handle),
            self.catalog.clone(),
            self.config.pipeline.retry_backoff,
            stop,
        )));
    }
}

/// Per statement of `planned`, what decides which records its first stage passes on through
/// an internal topic, and where ([`key_statement`]); `None` for a statement without one. As
/// the pipeline plans it, no statement has one unless every statement's state can be split
/// (per input partition, or through a first stage): with one state for all partitions, each
/// reads its input itself.
fn first_stages(planned: &[crate::plan::stream::StreamQuery]) -> Vec<Option<String>> {
    let stages: Vec<Option<String>> = planned
        .iter()
        .map(|q| {
            if q.is_partition_local() || !q.is_repartitionable() {
                return None;
            }
            key_statement(q.sql(), &q.source().name).ok().flatten()
        })
        .collect();
    let splittable = planned
        .iter()
        .zip(&stages)
        .all(|(q, stage)| q.is_partition_local() || stage.is_some());
    if splittable {
        stages
    } else {
        vec![None; stages.len()]
    }
}

/// Whether a statement repartitioned under one SQL (first stages `a`) is not repartitioned
/// alike under another (`b`): statements without a first stage may come and go.
fn stages_differ(a: &[Option<String>], b: &[Option<String>]) -> bool {
    (0..a.len().max(b.len())).any(|i| {
        let (a, b) = (a.get(i).cloned().flatten(), b.get(i).cloned().flatten());
        a != b && (a.is_some() || b.is_some())
    })
}

/// The consumer group of a query: `<group_id>.<name>`. Every process of a deployment that
/// registers a query under one name shares its group, and so its partitions.
fn group_of(group_id: &str, entry: &CatalogEntry) -> String {
    format!("{group_id}.{}", entry.name)
}

fn duplicate(name: &str) -> ServiceError {
    ServiceError::Conflict(format!("a query named {name:?} exists already"))
}

/// What each planned stream query reads and writes, or why one cannot be registered (a
/// SELECT that publishes nothing).
fn statements(
    planned: &[crate::plan::stream::StreamQuery],
) -> Result<Vec<PlannedStatement>, ServiceError> {
    planned
        .iter()
        .map(|q| {
            let Some(sink) = q.sink() else {
                return Err(ServiceError::invalid(format!(
                    "a SELECT without INSERT INTO publishes nothing: write INSERT INTO \
                         <stream table> {}",
                    q.sql()
                )));
            };
            Ok(PlannedStatement {
                source: q.source().name.clone(),
                source_topic: q.source().options.topic.clone(),
                also_reads: q
                    .inputs()
                    .iter()
                    .skip(1)
                    .map(|t| (t.name.clone(), t.options.topic.clone()))
                    .collect(),
                sink: sink.name.clone(),
                sink_topic: sink.options.topic.clone(),
                windowed: q.is_windowed(),
                sink_schema: sink.topic_schema.output_schema(),
                flow: Flow {
                    reads: q.inputs().into_iter().cloned().collect(),
                    writes: sink.clone(),
                },
            })
        })
        .collect()
}

/// What a stream query reads and writes; `None` for one that publishes nothing.
fn flow_of(q: &crate::plan::stream::StreamQuery) -> Option<Flow> {
    Some(Flow {
        reads: q.inputs().into_iter().cloned().collect(),
        writes: q.sink()?.clone(),
    })
}

/// Refuses a statement of `planned` whose records would not read as a query that reads their
/// topic declares it (each would go to the DLQ there, or lose columns), whose declaration of a
/// topic it reads does not fit what a query writes there, or that writes a topic of another
/// shape than a query already writing it (whose declaration is what readers of the topic go
/// by). `registered`: every other query's flows; the statements of `planned` are checked
/// against each other too.
fn check_shared_topics(
    planned: &[PlannedStatement],
    registered: &[(String, Vec<Flow>)],
) -> Result<(), ServiceError> {
    let this = String::from("this query");
    let others = registered
        .iter()
        .flat_map(|(name, flows)| flows.iter().map(move |f| (name, f)))
        .chain(planned.iter().map(|s| (&this, &s.flow)));
    let others: Vec<(&String, &Flow)> = others.collect();
    for s in planned {
        let writes = &s.flow.writes;
        let topic = &writes.options.topic;
        for (name, other) in &others {
            if std::ptr::eq(*other, &s.flow) {
                continue;
            }
            let mut found = Vec::new();
            for reader in other.reads.iter().filter(|t| t.options.topic == *topic) {
                let misfit = misfits(reader, writes);
                if !misfit.is_empty() {
                    found.push((format!("{name} reads as table {}", reader.name), misfit));
                }
            }
            if other.writes.options.topic == *topic {
                let misfit = misfits(&other.writes, writes);
                if !misfit.is_empty() {
                    found.push((
                        format!("{name} writes as table {}", other.writes.name),
                        misfit,
                    ));
                }
            }
            if let Some((whom, misfit)) = found.into_iter().next() {
                return Err(ServiceError::invalid(format!(
                    "{} writes to {topic}, which {whom}: {}. Declare {} with the columns it \
                     has there, or write to a topic of your own",
                    s.sink,
                    misfit.join("; "),
                    s.sink
                )));
            }
            for reader in s
                .flow
                .reads
                .iter()
                .filter(|t| t.options.topic == other.writes.options.topic)
            {
                let misfit = misfits(reader, &other.writes);
                if !misfit.is_empty() {
                    return Err(ServiceError::invalid(format!(
                        "{} reads {}, which {name} writes as table {}: {}. Declare {} with the \
                         columns written there",
                        reader.name,
                        reader.options.topic,
                        other.writes.name,
                        misfit.join("; "),
                        reader.name
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Whether a value written as type `written` reads as type `read` from a topic's JSON or
/// Avro record, as the decoders take it: the same type ([`same_type`]), an integer into a
/// wider integer or a float, a float into a wider float, a timestamp of any unit or zone
/// (records carry epoch milliseconds).
fn readable_as(
    written: &datafusion::arrow::datatypes::DataType,
    read: &datafusion::arrow::datatypes::DataType,
) -> bool {
    use datafusion::arrow::datatypes::DataType::{
        Float16, Float32, Float64, Int8, Int16, Int32, Int64, Timestamp, UInt8, UInt16, UInt32,
    };
    // The bits a value of an integer type needs as a signed integer.
    let bits = |t: &datafusion::arrow::datatypes::DataType| match t {
        Int8 => Some(8),
        Int16 | UInt8 => Some(16),
        Int32 | UInt16 => Some(32),
        Int64 | UInt32 => Some(64),
        _ => None,
    };
    if same_type(written, read) {
        return true;
    }
    match (written, read) {
        (Timestamp(..), Timestamp(..)) => true,
        (Float16 | Float32, Float64) | (Float16, Float32) => true,
        (w, Float32 | Float64) => bits(w).is_some(),
        (w, r) => matches!((bits(w), bits(r)), (Some(a), Some(b)) if a <= b),
    }
}

/// Whether a column of type `a` and one of type `b` hold the same values as a topic's
/// records carry them: text is text however Arrow lays it out (SQL's VARCHAR is a view).
fn same_type(
    a: &datafusion::arrow::datatypes::DataType,
    b: &datafusion::arrow::datatypes::DataType,
) -> bool {
    use datafusion::arrow::datatypes::DataType::{
        Binary, BinaryView, LargeBinary, LargeUtf8, Utf8, Utf8View,
    };
    let plain = |t: &datafusion::arrow::datatypes::DataType| match t {
        Utf8View | LargeUtf8 => Utf8,
        BinaryView | LargeBinary => Binary,
        t => t.clone(),
    };
    plain(a) == plain(b)
}

/// Runs `work` (checkpoint or object-store I/O) on a blocking thread.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> crate::Result<T> + Send + 'static,
) -> Result<T, ServiceError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ServiceError::Internal(format!("task failed: {e}")))?
        .map_err(|e| ServiceError::Internal(e.to_string()))
}

/// Names are 1 to 64 of `[A-Za-z0-9_-]`, starting with a letter: a query's name becomes part
/// of a consumer group id and a metrics label, a savepoint's a directory name.
fn check_name(kind: &str, name: &str) -> Result<(), ServiceError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(ServiceError::invalid(format!(
            "{kind} name {name:?}: use 1 to {MAX_NAME} letters, digits, '_' or '-', starting \
             with a letter"
        )))
    }
}

/// How long a service stopping waits for each query to flush and commit.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(30);

/// [`stop`], waiting at most `limit`: a query that has not stopped by then (its broker
/// unreachable, say) is ended where it is, as a crash would end it, and resumes from its last
/// checkpoint and committed offsets at the next start. A service asked to stop with its broker
/// gone waited for its queries without end.
async fn stop_within(handle: &QueryHandle, limit: Duration) {
    let mut control = handle.control.lock().await;
    control.stop.store(true, Ordering::Relaxed);
    if let Some(task) = control.task.take()
        && !finish_or_abort(task, limit).await
    {
        warn!(
            query = %handle.entry.name,
            waited_s = limit.as_secs(),
            "query did not stop in time: ended without its last flush and commit; it resumes \
             from its last checkpoint"
        );
    }
}

/// Waits up to `limit` for `task`; aborts it then. Whether it finished.
async fn finish_or_abort(mut task: tokio::task::JoinHandle<()>, limit: Duration) -> bool {
    match tokio::time::timeout(limit, &mut task).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            error!(error = %e, "query task ended abnormally");
            true
        }
        Err(_) => {
            task.abort();
            false
        }
    }
}

/// Stops `handle`'s pipeline, if it runs, and waits until it has flushed and committed.
async fn stop(handle: &QueryHandle) {
    let mut control = handle.control.lock().await;
    control.stop.store(true, Ordering::Relaxed);
    if let Some(task) = control.task.take()
        && let Err(e) = task.await
    {
        error!(query = %handle.entry.name, error = %e, "query task ended abnormally");
    }
}

/// Runs a query's pipeline until `stop`; transient errors start it again after a backoff,
/// others leave it FAILED.
async fn supervise(
    handle: Arc<QueryHandle>,
    config: PipelineConfig,
    catalog: Arc<Mutex<Catalog>>,
    backoff: Duration,
    stop: Arc<AtomicBool>,
) {
    let run = {
        let handle = handle.clone();
        move |stop: Arc<AtomicBool>| {
            let mut config = config.clone();
            let handle = handle.clone();
            let catalog = catalog.clone();
            async move {
                let fresh = handle.fresh.load(Ordering::Relaxed);
                config.from_beginning = fresh;
                let checkpointed = config.checkpoint.is_some();
                let batches = handle.stats.batches.load(Ordering::Relaxed);
                let pipeline = Pipeline::new(config, handle.stats.clone()).await?;
                handle.set(QueryState::Running, None);
                let result = pipeline.run(stop).await;
                // A fresh query has positions of its own once it has written a checkpoint
                // (which holds them), or, without checkpoints, once it has processed input
                // (and committed); until then every start is afresh.
                let settled = if checkpointed {
                    handle
                        .stats
                        .last_checkpoint
                        .lock()
                        .ok()
                        .is_some_and(|c| c.as_ref().is_some_and(|c| !c.restored))
                } else {
                    handle.stats.batches.load(Ordering::Relaxed) > batches
                };
                if fresh && settled {
                    handle.fresh.store(false, Ordering::Relaxed);
                    let name = &handle.entry.name;
                    if let Err(e) = catalog
                        .lock()
                        .map_err(|_| Error::Config("catalog lock poisoned".into()))
                        .and_then(|mut c| c.set_reset(name, false))
                    {
                        warn!(query = %name, error = %e, "catalog not written after a reset");
                    }
                }
                result
            }
        }
    };
    supervise_with(handle, backoff, stop, run).await;
}

/// [`supervise`] with the run of one attempt given: `run(stop)` runs until `stop` is set or
/// an error. A panic inside it ends this query alone: it becomes FAILED with the panic's
/// message (a panic is a defect, not a passing condition, so it is not retried); the other
/// queries and the API go on.
async fn supervise_with<F, Fut>(
    handle: Arc<QueryHandle>,
    backoff: Duration,
    stop: Arc<AtomicBool>,
    mut run: F,
) where
    F: FnMut(Arc<AtomicBool>) -> Fut,
    Fut: Future<Output = crate::Result<()>>,
{
    let name = handle.entry.name.clone();
    let mut delay = backoff;
    loop {
        handle.starts.fetch_add(1, Ordering::Relaxed);
        let started = tokio::time::Instant::now();
        let result = match AssertUnwindSafe(run(stop.clone())).catch_unwind().await {
            Ok(result) => result,
            Err(panic) => {
                let message = crate::plan::sandbox::panic_message(&*panic);
                error!(query = %name, panic = %message, "query panicked");
                handle.set(
                    QueryState::Failed,
                    Some(format!(
                        "the query panicked: {message} (an engine defect: please report it; \
                         POST /v1/queries/{name}/restart starts it again)"
                    )),
                );
                return;
            }
        };
        match result {
            Ok(()) => return,
            // No transaction of this attempt can have outlived its timeout: a producer with
            // this query's transactional id was started after this one, by another live
            // process. Retrying would fence that one in turn, and so on.
            Err(e)
                if e.is_producer_fenced()
                    && started.elapsed() < crate::sink::TRANSACTION_LIFETIME
                    && !stop.load(Ordering::Relaxed) =>
            {
                error!(query = %name, error = %e, "query's transactional id taken by another process");
                handle.set(
                    QueryState::Failed,
                    Some(format!(
                        "another process started a producer with this query's transactional id \
                         ({e}): two processes share one identity; give each its own \
                         checkpoint.instance (it names the group member and the transactional \
                         ids)"
                    )),
                );
                return;
            }
            Err(e) if e.is_transient() && !stop.load(Ordering::Relaxed) => {
                warn!(query = %name, error = %e, retry_in = ?delay, "query stopped; retrying");
                handle.set(
                    QueryState::Starting,
                    Some(format!(
                        "{e} (retrying in {})",
                        humantime::format_duration(delay)
                    )),
                );
                let until = tokio::time::Instant::now() + delay;
                while tokio::time::Instant::now() < until {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                delay = (delay * 2).min(MAX_BACKOFF);
            }
            Err(e) => {
                error!(query = %name, error = %e, "query failed");
                handle.set(QueryState::Failed, Some(e.to_string()));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query task that does not stop (a pipeline waiting on a broker that is gone) is ended
    /// after the wait; one that stops is awaited.
    #[tokio::test]
    async fn a_query_that_does_not_stop_in_time_is_ended() {
        let stuck = tokio::spawn(std::future::pending::<()>());
        let started = std::time::Instant::now();
        assert!(!finish_or_abort(stuck, Duration::from_millis(200)).await);
        assert!(started.elapsed() < Duration::from_secs(5));
        let quick = tokio::spawn(async {});
        assert!(finish_or_abort(quick, Duration::from_secs(5)).await);
    }

    fn handle(name: &str) -> Arc<QueryHandle> {
        let entry = CatalogEntry {
            name: name.into(),
            sql: String::new(),
            paused: false,
            memory_limit: None,
            created_at: 0,
        };
        Arc::new(QueryHandle::new(entry, false, 1 << 20))
    }

    /// A statement cut short had no position to show and named nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unfinished_statement_says_so() {
        let (_dir, m) = manager("");
        let e = m
            .validate("SELECT segment_id FROM camera_events WHERE")
            .await
            .expect_err("unfinished");
        assert!(
            e.to_string()
                .contains("the statement ends before it is complete"),
            "{e}"
        );
    }

    /// The consumer lag is shown only while the query runs and has measured it lately: a
    /// restarting query (the broker gone) and one held up (a checkpoint store not answering)
    /// showed their last figure while their input piled up.
    #[test]
    fn a_stale_or_unmeasured_lag_is_not_shown() {
        let q = handle("lagging");
        q.stats.consumer_lag.store(41, Ordering::Relaxed);
        q.stats.consumer_lag_at.store(epoch_ms(), Ordering::Relaxed);
        q.set(QueryState::Running, None);
        assert_eq!(q.status().consumer_lag, Some(41));
        q.set(QueryState::Starting, Some("Kafka is not reachable".into()));
        assert_eq!(q.status().consumer_lag, None, "restarting");
        q.set(QueryState::Running, None);
        q.stats
            .consumer_lag_at
            .store(epoch_ms() - LAG_FRESH_MS - 1_000, Ordering::Relaxed);
        assert_eq!(q.status().consumer_lag, None, "measured 11 s ago");
    }

    /// The lock of a query name serialises the changes to it and is forgotten once they end:
    /// requests about names that do not exist once kept one entry each, forever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn name_locks_serialise_and_are_forgotten() {
        let locks = Arc::new(NamedLocks::default());
        for i in 0..100 {
            let _held = locks.lock(&format!("missing-{i}")).await;
        }
        assert_eq!(locks.len(), 0);
        let inside = Arc::new(AtomicU64::new(0));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (locks, inside) = (locks.clone(), inside.clone());
                tokio::spawn(async move {
                    let _held = locks.lock("q").await;
                    assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "one at a time");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task");
        }
        assert_eq!(locks.len(), 0);
    }

    /// A manager of its own directories (kept while the returned one lives), with `extra`
    /// configuration; its queries are not started.
    fn manager(extra: &str) -> (tempfile::TempDir, QueryManager) {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("svc.toml");
        std::fs::write(
            &file,
            format!(
                "[catalog]\npath = \"{0}/catalog\"\n[checkpoint]\ndir = \"{0}/ckpt\"\n{extra}",
                dir.path().display()
            ),
        )
        .expect("config");
        let config = Arc::new(ServiceConfig::load(Some(&file)).expect("config"));
        (dir, QueryManager::new(config).expect("manager"))
    }

    /// A preview whose client has gone (its request dropped) stops: abandoned previews once
    /// ran on to the end, with no timeout, while their turns went to new ones (7 at once
    /// where 2 may run, 1 GB resident).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_preview_whose_client_has_gone_stops() {
        const ROWS: u64 = 800_000;
        let (_dir, manager) = manager("[api]\npreview_timeout = \"1h\"\n");
        let manager = Arc::new(manager);
        let mut csv = String::from("gauge_id,kind,level_cm,rainfall_mm_h,event_time\n");
        for i in 0..ROWS {
            csv.push_str(&format!(
                "g{},street,{}.5,1.0,{}\n",
                i % 997,
                i % 300,
                1_767_247_200_000 + i * 100
            ));
        }
        let request = PreviewRequest {
            sql: "SELECT gauge_id, window_start, count(*) AS n, max(level_cm) AS mx \
                  FROM water_levels GROUP BY tumble(event_time, INTERVAL '1 minute'), gauge_id"
                .into(),
            input: Some(PreviewInput {
                format: "csv".into(),
                data: csv,
                rename: Vec::new(),
                time_zone: None,
                time_unit: None,
            }),
            topic: None,
            limit: None,
        };
        let running = || manager.preview_runtime.handle().metrics().num_alive_tasks();
        let free = || manager.previews.available_permits();
        // The whole preview, waited for: how long it takes here.
        let whole = std::time::Instant::now();
        let slot = manager.preview_slot().expect("a turn");
        let answer = manager
            .preview(request.clone(), slot)
            .await
            .expect("preview");
        let whole = whole.elapsed();
        assert_eq!(answer.input_rows, ROWS);
        assert_eq!(free(), 2);
        // The same, its client gone 100 ms after it started.
        let client = tokio::spawn({
            let manager = manager.clone();
            async move {
                let slot = manager.preview_slot().expect("a turn");
                manager.preview(request, slot).await
            }
        });
        while running() == 0 {
            tokio::task::yield_now().await;
        }
        let started = std::time::Instant::now();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(running() > 0, "the preview runs on");
        client.abort();
        let _ = client.await;
        while running() > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let stopped = started.elapsed();
        assert!(
            stopped < whole / 2,
            "the preview ran on after its client had gone: it stopped {stopped:?} after it \
             started, the whole preview takes {whole:?}"
        );
        assert_eq!(free(), 2);
    }

    /// The flows remembered to refuse a query writing where its records come back are those
    /// of the queries registered now: with queries created and dropped again and again they
    /// once kept one entry per name ever used.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn flows_of_dropped_queries_are_forgotten() {
        let (_dir, manager) = manager("");
        let register = |name: &str| {
            let entry = CatalogEntry {
                name: name.into(),
                sql: format!("INSERT INTO alerts SELECT * FROM alerts_{name}"),
                paused: false,
                memory_limit: None,
                created_at: 0,
            };
            let handle = Arc::new(QueryHandle::new(entry, false, 1 << 20));
            manager
                .queries
                .lock()
                .expect("queries")
                .insert(name.to_string(), handle);
        };
        let remembered = || {
            let mut names: Vec<String> = manager
                .flows
                .lock()
                .expect("flows")
                .keys()
                .cloned()
                .collect();
            names.sort();
            names
        };
        for i in 0..20 {
            register(&format!("q{i}"));
            manager.registered_flows(None).await;
            manager
                .queries
                .lock()
                .expect("queries")
                .remove(&format!("q{i}"));
        }
        register("kept");
        manager.registered_flows(None).await;
        assert_eq!(remembered(), ["kept"]);
    }

    /// A panic inside one query's run makes that query FAILED with the panic's text; a query
    /// beside it keeps running and the panicking one is not restarted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_query_fails_alone() {
        let (bad, good) = (handle("bad"), handle("good"));
        let stop = Arc::new(AtomicBool::new(false));
        let steps = Arc::new(AtomicU64::new(0));
        let good_task = tokio::spawn(supervise_with(
            good.clone(),
            Duration::from_millis(10),
            stop.clone(),
            {
                let (good, steps) = (good.clone(), steps.clone());
                move |stop: Arc<AtomicBool>| {
                    let (good, steps) = (good.clone(), steps.clone());
                    async move {
                        good.set(QueryState::Running, None);
                        while !stop.load(Ordering::Relaxed) {
                            steps.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        Ok(())
                    }
                }
            },
        ));
        let bad_task = tokio::spawn(supervise_with(
            bad.clone(),
            Duration::from_millis(10),
            stop.clone(),
            {
                let bad = bad.clone();
                move |_stop: Arc<AtomicBool>| {
                    let bad = bad.clone();
                    async move {
                        bad.set(QueryState::Running, None);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        let index: Vec<u8> = Vec::new();
                        let i = bad.starts.load(Ordering::Relaxed) as usize;
                        // An out-of-bounds index, as a defect inside a query would be.
                        std::hint::black_box(index[i]);
                        Ok::<(), Error>(())
                    }
                }
            },
        ));
        bad_task
            .await
            .expect("the supervisor itself does not panic");
        let status = bad.status();
        assert_eq!(status.state, QueryState::Failed);
        let error = status.error.unwrap_or_default();
        assert!(
            error.contains("panicked") && error.contains("index out of bounds"),
            "{error}"
        );
        assert_eq!(
            bad.starts.load(Ordering::Relaxed),
            1,
            "a panic is not retried"
        );
        let before = steps.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            steps.load(Ordering::Relaxed) > before,
            "the other query stopped"
        );
        assert_eq!(good.state(), QueryState::Running);
        stop.store(true, Ordering::Relaxed);
        good_task.await.expect("good query");
    }

    /// A producer fenced soon after its attempt started was fenced by another live process
    /// with the query's transactional id (none of the attempt's transactions can have outlived
    /// their timeout): the query fails naming the shared identity, instead of fencing that
    /// process in turn, again and again. Other Kafka errors are still retried.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_producer_fenced_by_another_process_fails_its_query() {
        use rdkafka::error::KafkaError;
        use rdkafka::types::RDKafkaErrorCode;
        let twin = handle("twin");
        let attempts = Arc::new(AtomicU64::new(0));
        supervise_with(
            twin.clone(),
            Duration::from_millis(1),
            Arc::new(AtomicBool::new(false)),
            {
                let attempts = attempts.clone();
                move |_stop: Arc<AtomicBool>| {
                    let attempt = attempts.fetch_add(1, Ordering::Relaxed);
                    async move {
                        let code = if attempt == 0 {
                            RDKafkaErrorCode::MessageTimedOut
                        } else {
                            RDKafkaErrorCode::ProducerFenced
                        };
                        Err::<(), Error>(Error::Kafka(KafkaError::MessageProduction(code)))
                    }
                }
            },
        )
        .await;
        let status = twin.status();
        assert_eq!(status.state, QueryState::Failed);
        let error = status.error.unwrap_or_default();
        assert!(
            error.contains("two processes share one identity")
                && error.contains("checkpoint.instance"),
            "{error}"
        );
        assert_eq!(
            twin.starts.load(Ordering::Relaxed),
            2,
            "the timeout is retried"
        );
    }

    #[test]
    fn parser_positions_are_found() {
        assert_eq!(
            sql_position(
                "sql parser error: Expected: end of statement, found: x at Line: 2, Column: 17"
            ),
            Some((2, 17))
        );
        assert_eq!(sql_position("table 'nope' not found"), None);
    }

    #[test]
    fn names_are_checked() {
        for good in ["a", "congestion_5m", "Ward-totals", &"x".repeat(64)] {
            assert!(check_name("query", good).is_ok(), "{good}");
        }
        for bad in ["", "5m", "_x", "a b", "a.b", "é", &"x".repeat(65)] {
            assert!(
                matches!(check_name("query", bad), Err(ServiceError::Invalid { .. })),
                "{bad}"
            );
        }
    }
}
