//! The running pipeline: source → decode → time → plan → state → sink, and offset commits.
//!
//! [`Pipeline::run`] loops over micro-batches: decode each topic's records (bad ones to the
//! DLQ), feed them to the stream queries reading that topic (the queries of `queries/`,
//! planned through the SQL layer), publish their results and the events they found late, and
//! commit the input offsets only once the broker has acknowledged all of that and all earlier
//! outputs (the next micro-batches are read meanwhile, up to 8 awaiting acknowledgement). The
//! committed offset never passes the oldest event a query still holds in an unevicted window,
//! so a restart re-reads every event whose window has not been published yet (at-least-once).
//! While records come fast, the next micro-batch is read from the consumer while the current
//! one is processed (`ReadAhead`); the group's partition changes are answered between
//! micro-batches with no read in flight.
//!
//! With checkpoints ([`CheckpointSettings`]), the pipeline instead writes its queries' state
//! and input positions every interval and when it stops, and a new pipeline restores the
//! newest checkpoint and resumes at its positions. With a transactional id, each interval's
//! outputs and consumed offsets commit in one Kafka transaction just before the checkpoint,
//! and a recovering pipeline does not publish again what it published after its checkpoint.
//!
//! A query keeps one state per input partition when it groups by its input's key, or one per
//! partition of an internal topic when it is repartitioned; otherwise one state for all.
//! `recovery` restores and takes checkpoints, `rebalance` answers the consumer group's
//! partition changes, `repartition` holds stage 1 of repartitioned queries.

pub mod offline;
mod rebalance;
mod recovery;
mod repartition;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use datafusion::arrow::datatypes::TimeUnit;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hdrhistogram::Histogram;
use tracing::{debug, info, warn};

use datafusion::arrow::array::RecordBatch;

use crate::checkpoint::CheckpointStore;
use crate::decode::TopicDecoder;
use crate::error::{Error, Result};
use crate::plan::repartition::key_plan;
use crate::plan::stream::StreamContext;
use crate::plan::stream::StreamQuery;
use crate::plan::table::StreamTable;
use crate::plan::{city_context_in, default_queries, plan_all};
use crate::schema::SchemaRegistry;
use crate::sink::{DlqRecord, KafkaSink, KafkaSinkConfig, LateRecord, Pending, conform_stream};
use crate::source::{
    BEHIND_HEADER, KafkaSource, KafkaSourceConfig, ORIGIN_HEADER, PROGRESS_HEADER, RawBatch,
    encode_pair,
};
use crate::telemetry::CityGauges;
pub use crate::topics::{Format, Topics};
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryReservation};
use recovery::Checkpoints;
use repartition::{Repartition, event_time_maxima, repartition_topic};

/// Settings of the pipeline.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Bootstrap servers.
    pub brokers: String,
    /// Consumer group.
    pub group_id: String,
    /// Topic names.
    pub topics: Topics,
    /// Source batch size in records.
    pub max_batch_rows: usize,
    /// Source linger.
    pub linger: Duration,
    /// How long the producer waits to fill a batch of outputs.
    pub producer_linger: Duration,
    /// Extra librdkafka properties for consumer and producer.
    pub properties: Vec<(String, String)>,
    /// Settings of the topics the pipeline creates (`retention.ms`, …).
    pub topic_properties: Vec<(String, String)>,
    /// Whether the default queries of `queries/` run.
    pub default_queries: bool,
    /// Further queries, `(name, sql)`: each may hold several statements (`CREATE EXTERNAL
    /// TABLE` for its own sinks, `SET`, then `INSERT INTO … SELECT …`), planned after the
    /// defaults in the city's context.
    pub queries: Vec<(String, String)>,
    /// The query's name when this pipeline runs one registered query of the service: it tags
    /// the query's DLQ records and labels its metrics.
    pub name: Option<String>,
    /// Memory pool of the queries, bytes: DataFusion's operators and the window state draw
    /// from it; going over fails the pipeline with [`Error::ResourceLimit`].
    pub memory_limit: Option<usize>,
    /// Most (window, group) partials the queries may hold together; more fails the pipeline
    /// with [`Error::ResourceLimit`].
    pub max_state_groups: Option<usize>,
    /// Checkpoints, when the pipeline keeps them (the service does; the demo does not).
    pub checkpoint: Option<CheckpointSettings>,
    /// Read partitions without a checkpoint from their beginning, ignoring what the consumer
    /// group committed (a query created under the name of a dropped one).
    pub from_beginning: bool,
    /// The one query is a built-in query of the service (it comes with the binary, and is
    /// neither dropped nor upgraded): a state that does not fit it says what to do instead.
    pub builtin: bool,
    /// Static membership in the consumer group under this id (see
    /// [`crate::source::KafkaSourceConfig::group_instance_id`]).
    pub group_instance_id: Option<String>,
    /// The reference tables its queries read (the process's, whose new versions they see);
    /// `None`: the ones compiled into the binary.
    pub reference: Option<crate::reference::ReferenceTables>,
    /// What happens to records whose camera, detector or sensor is not in its reference
    /// table.
    pub unknown_ids: crate::decode::UnknownIds,
    /// The schema registry of Avro inputs; `None`: a directory registry in the working
    /// directory's `registry/`, made when a stream is Avro.
    pub registry: Option<Arc<crate::decode::Registry>>,
    /// The Protobuf message descriptors of protobuf streams; `None`: the city's
    /// (`schemas/protobuf/city.proto`).
    pub descriptors: Option<Arc<crate::decode::Descriptors>>,
}

/// How a pipeline checkpoints and recovers.
#[derive(Debug, Clone)]
pub struct CheckpointSettings {
    /// Where this pipeline's checkpoints go: a local directory or an object store's prefix.
    pub location: crate::checkpoint::Location,
    /// Time between checkpoints (and between transactions in exactly-once mode).
    pub interval: Duration,
    /// Checkpoints kept.
    pub retain: usize,
    /// Exactly-once output: a transactional producer with this id commits each epoch's
    /// outputs and consumed offsets together. `None`: at-least-once.
    pub transactional_id: Option<String>,
    /// Exactly-once recovery reads back from the output partitions' log start, not from the
    /// checkpoint's marks (see `checkpoint.read_back_from_log_start`).
    pub read_back_from_log_start: bool,
    /// Whether the pipeline claims `location` for its consumer group, refusing one another
    /// group claimed ([`crate::checkpoint::Location::claim`]): the service's queries, whose
    /// groups name their deployment (`<kafka.group_id>.<query>`).
    pub claim: bool,
}

impl PipelineConfig {
    /// Defaults for `brokers`.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            group_id: "urbanstream".into(),
            topics: Topics::default(),
            max_batch_rows: 8192,
            linger: Duration::from_millis(20),
            producer_linger: Duration::from_millis(5),
            properties: Vec::new(),
            topic_properties: Vec::new(),
            default_queries: true,
            queries: Vec::new(),
            name: None,
            memory_limit: None,
            max_state_groups: None,
            checkpoint: None,
            from_beginning: false,
            builtin: false,
            group_instance_id: None,
            reference: None,
            unknown_ids: Default::default(),
            registry: None,
            descriptors: None,
        }
    }

    /// The schema registry Avro streams use.
    pub fn registry(&self) -> Result<Arc<crate::decode::Registry>> {
        match &self.registry {
            Some(r) => Ok(r.clone()),
            None => Ok(Arc::new(crate::decode::Registry::dir("registry")?)),
        }
    }
}

/// Live counters of a pipeline, shared with views and tests.
#[derive(Debug)]
pub struct PipelineStats {
    /// Input records read, all topics.
    pub records_in: AtomicU64,
    /// Micro-batches read while the one before was processed (see `ReadAhead`).
    pub reads_ahead: AtomicU64,
    /// Camera events decoded.
    pub camera_events: AtomicU64,
    /// Detector readings decoded.
    pub detector_readings: AtomicU64,
    /// Air readings decoded.
    pub air_readings: AtomicU64,
    /// Records sent to the DLQ (acknowledged).
    pub dlq: AtomicU64,
    /// Records whose camera, detector or sensor is not in its reference table.
    pub unknown_ids: AtomicU64,
    /// Late events sent to the late topic (acknowledged).
    pub late: AtomicU64,
    /// Indicator rows published (acknowledged).
    pub indicators_out: AtomicU64,
    /// Micro-batches processed.
    pub batches: AtomicU64,
    /// The lowest watermark of the queries with an input that delivered within its idle
    /// timeout, epoch ms (`i64::MIN` before any event). A query whose inputs have all gone
    /// quiet holds its own watermark (a join of two sparse streams, waiting for either) without
    /// holding this one back, as an idle partition does within a query; a quiet stream of a
    /// join or union follows the others, as in the query itself. It never goes back within a
    /// run, so a query resuming behind it does not pull it back.
    pub watermark_ms: AtomicI64,
    /// Entries held in state: (window, group) partials and detector keys.
    pub state_groups: AtomicU64,
    /// Bytes of state held (windows, sessions, detector keys, held offsets).
    pub state_bytes: AtomicU64,
    /// Detector keys dropped after staying silent for `urbanstream.key_ttl`.
    pub keys_expired: AtomicU64,
    /// Records behind the end of the assigned partitions (checked about once a second; -1
    /// until known).
    pub consumer_lag: Arc<AtomicI64>,
    /// When `consumer_lag` was last measured, epoch ms (`i64::MIN` before).
    pub consumer_lag_at: Arc<AtomicI64>,
    /// Partitions assigned to this process by the consumer group (checked about once a
    /// second): the input's, and those of a repartition topic.
    pub assigned_partitions: AtomicU64,
    /// How the queries keep their state, once planned: `per_partition`, `repartitioned` (one
    /// state per partition of an internal topic) or `single` (one state for all partitions).
    pub partitioning: Mutex<Option<&'static str>>,
    /// Emit latency of windowed results, µs, one count per row: from the arrival of the first
    /// record of the micro-batch that closed the window to the broker's acknowledgement of
    /// the row.
    pub emit_latency_us: Mutex<Histogram<u64>>,
    /// The last checkpoint written, if any.
    pub last_checkpoint: Mutex<Option<CheckpointInfo>>,
}

/// What the last checkpoint was.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckpointInfo {
    /// Its number.
    pub epoch: u64,
    /// When it was taken, epoch ms; or when it was last found to hold the state still (a
    /// checkpoint is not written again while nothing changes).
    pub at_ms: i64,
    /// Bytes on disk.
    pub bytes: u64,
    /// How long taking it took (waiting for acknowledgements, committing, writing), ms.
    pub duration_ms: u64,
    /// Whether the pipeline started from it (restored) or wrote it.
    pub restored: bool,
}

impl Default for PipelineStats {
    fn default() -> Self {
        Self {
            records_in: AtomicU64::default(),
            reads_ahead: AtomicU64::default(),
            camera_events: AtomicU64::default(),
            detector_readings: AtomicU64::default(),
            air_readings: AtomicU64::default(),
            dlq: AtomicU64::default(),
            unknown_ids: AtomicU64::default(),
            late: AtomicU64::default(),
            indicators_out: AtomicU64::default(),
            batches: AtomicU64::default(),
            watermark_ms: AtomicI64::new(i64::MIN),
            state_groups: AtomicU64::default(),
            keys_expired: AtomicU64::default(),
            state_bytes: AtomicU64::default(),
            consumer_lag: Arc::new(AtomicI64::new(-1)),
            consumer_lag_at: Arc::new(AtomicI64::new(i64::MIN)),
            assigned_partitions: AtomicU64::default(),
            emit_latency_us: Mutex::new(latency_histogram()),
            last_checkpoint: Mutex::new(None),
            partitioning: Mutex::new(None),
        }
    }
}

impl PipelineStats {
    /// New counters; the watermark starts unset.
    pub fn new() -> Self {
        Self::default()
    }
}

/// The internal topic through which statement `statement` (counted from 0) of the pipeline
/// of consumer group `group_id` is repartitioned, when its groups span input partitions.
pub fn repartition_topic_of(group_id: &str, statement: usize) -> String {
    format!("{group_id}.q{statement}.repartition")
}

/// A histogram of latencies in µs from 1 µs to 1 h at 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant histogram bounds are valid")
}

/// A micro-batch that took longer than this to read or to process is logged (debug).
const SLOW_STEP: Duration = Duration::from_millis(50);

/// How long a read waits for a first record before the micro-batch goes on without any (to
/// advance idle partitions and refresh the query's view).
const IDLE_READ: Duration = Duration::from_millis(200);

/// The next micro-batch's read, running while the current one is processed: reading records
/// off the consumer's queue and processing them take turns on one thread otherwise, and a
/// backlog drains at the sum of their costs instead of the larger one (benches/README,
/// "Draining a backlog"). The read runs on a thread of its own (the runtime's blocking pool):
/// a task spawned from the busy pipeline task would wait on that task's worker until the step
/// yields. Dropping it cancels the read; records it had taken are not processed, so their
/// offsets are neither committed nor checkpointed and they are read again by the next run.
struct ReadAhead {
    read: tokio::task::JoinHandle<Result<Vec<RawBatch>>>,
    /// Set to cancel the read.
    cancelled: Arc<AtomicBool>,
}

impl ReadAhead {
    fn start(source: &Arc<KafkaSource>) -> Self {
        let source = source.clone();
        let cancelled = Arc::new(AtomicBool::new(false));
        let flag = cancelled.clone();
        let read = tokio::task::spawn_blocking(move || source.read_batches(IDLE_READ, Some(&flag)));
        Self { read, cancelled }
    }

    /// Cancels the read and waits until it has let go of the consumer.
    async fn cancel(mut self) {
        self.cancelled.store(true, Ordering::Release);
        let _ = (&mut self.read).await;
    }

    async fn batches(mut self) -> Result<Vec<RawBatch>> {
        (&mut self.read)
            .await
            .map_err(|e| Error::Config(format!("input read task failed: {e}")))?
    }
}

impl Drop for ReadAhead {
    fn drop(&mut self) {
        self.cancelled.store(true, Ordering::Release);
    }
}

/// Reads the next micro-batch on a thread that may wait (the runtime's blocking pool), not on
/// the query's worker: a query waiting for records holds no worker, and no CPU.
async fn read_next(source: &Arc<KafkaSource>) -> Result<Vec<RawBatch>> {
    let source = source.clone();
    tokio::task::spawn_blocking(move || source.read_batches(IDLE_READ, None))
        .await
        .map_err(|e| Error::Config(format!("input read task failed: {e}")))?
}

/// Acknowledged offsets are committed at most this often.
const COMMIT_INTERVAL: Duration = Duration::from_millis(100);

/// Micro-batches whose outputs may be awaiting acknowledgement at once.
const MAX_IN_FLIGHT: usize = 8;

/// Longest time between two measurements of the state's bytes (see
/// `Pipeline::check_limits`).
const MEASURE_EVERY: Duration = Duration::from_millis(500);

/// A micro-batch whose outputs are being acknowledged, and the offsets it lets commit.
struct InFlight {
    acknowledged: tokio::task::JoinHandle<Result<usize>>,
    offsets: HashMap<(Arc<str>, i32), i64>,
}

/// A query running in the pipeline.
struct Running {
    name: String,
    /// The query as planned. When the pipeline keeps one state per input partition, it is
    /// the pattern of each partition's instance and is never fed; otherwise it holds the
    /// state of all the partitions.
    query: StreamQuery,
    /// With one state per input partition: each partition's instance of the query.
    parts: BTreeMap<i32, Part>,
    /// When its groups span input partitions: stage 1, which passes its input on to an
    /// internal topic by group; the instances (stage 2) are per partition of that topic.
    repartition: Option<Repartition>,
}

/// A query's instance for one input partition.
struct Part {
    query: StreamQuery,
    /// When it was made, epoch ms: a partition that has delivered nothing is not held back
    /// for longer than its idle timeout after it.
    since_ms: i64,
    /// Stage 2 of a repartitioned query: per input partition, the offset after the last
    /// input record processed. A record passed on again (stage 1 replaying after a
    /// failover) is dropped.
    upstream: BTreeMap<i32, i64>,
    /// Stage 2 of a repartitioned query: the input partitions stage 1 last said are behind
    /// the end of their logs, and when that was read (epoch ms).
    behind_inputs: BTreeMap<i32, i64>,
}

impl Running {
    /// Its instance for input partition `part` (the query itself without one per partition).
    fn instance(&mut self, part: i32) -> &mut StreamQuery {
        match self.parts.get_mut(&part) {
            Some(p) => &mut p.query,
            None => &mut self.query,
        }
    }

    /// The topic its instances read: its input, or its repartition topic.
    fn topic(&self) -> &str {
        match &self.repartition {
            Some(r) => &r.topic,
            None => &self.query.source().options.topic,
        }
    }

    /// Whether its instances read `topic`: one of its inputs (a join reads two), or its
    /// repartition topic.
    fn reads(&self, topic: &str) -> bool {
        match &self.repartition {
            Some(r) => r.topic == topic,
            None => self.query.reads_topic(topic),
        }
    }

    /// Its instance for checkpoint key `key` (a partition of the topic its instances read;
    /// `None`: the one for all partitions), with the input offsets it has seen when it is
    /// stage 2 of a repartitioned query; `None` when it has none there.
    fn instance_for(
        &mut self,
        key: &Option<(String, i32)>,
    ) -> Option<(&mut StreamQuery, Option<&mut BTreeMap<i32, i64>>)> {
        match key {
            None => Some((&mut self.query, None)),
            Some((topic, partition)) => {
                if self.topic() != topic {
                    return None;
                }
                let part = self.parts.get_mut(partition)?;
                Some((&mut part.query, Some(&mut part.upstream)))
            }
        }
    }

    /// Every instance that holds state.
    fn instances(&self) -> Vec<&StreamQuery> {
        if self.parts.is_empty() {
            vec![&self.query]
        } else {
            self.parts.values().map(|p| &p.query).collect()
        }
    }
}

/// The pipeline with its Kafka clients and query state.
pub struct Pipeline {
    config: PipelineConfig,
    source: Arc<KafkaSource>,
    /// The next micro-batch's read, while one runs beside the current micro-batch.
    ahead: Option<ReadAhead>,
    sink: KafkaSink,
    decoders: HashMap<String, TopicDecoder>,
    /// The reference tables the queries read.
    reference: crate::reference::ReferenceTables,
    /// Per input topic, the column checked against a reference table's ids, and the table.
    id_checks: HashMap<String, (&'static str, &'static str)>,
    /// Per input topic read only by statements keeping state per partition of it, the column
    /// it is declared keyed by, and whether a record without a key has been reported.
    key_checks: HashMap<String, (String, bool)>,
    queries: Vec<Running>,
    /// The context the queries were planned in; partitions' instances are planned in it.
    ctx: StreamContext,
    /// Whether each query keeps one state per input partition, which moves with the
    /// partition when the group moves it (every query is partition-local); otherwise one
    /// state holds all partitions.
    partitioned: bool,
    /// The input partitions this member holds (assigned by the group and taken up).
    held: BTreeSet<(String, i32)>,
    /// With one state per partition: the partition count of each input topic when its
    /// partitions were last taken up. A state split over one count cannot serve another.
    partition_counts: HashMap<String, i32>,
    stats: Arc<PipelineStats>,
    /// Next offset to read, per (topic, partition), of everything processed so far.
    next_offsets: HashMap<(Arc<str>, i32), i64>,
    committed: HashMap<(Arc<str>, i32), i64>,
    in_flight: std::collections::VecDeque<InFlight>,
    /// The offsets of the latest micro-batch whose outputs (and all earlier) are acknowledged.
    committable_acked: HashMap<(Arc<str>, i32), i64>,
    last_commit: std::time::Instant,
    /// The window state's share of the memory pool, when there is a limit.
    reservation: Option<MemoryReservation>,
    /// When the state's bytes were last measured, and the entries it held then.
    measured: Option<(std::time::Instant, usize)>,
    /// Emit latency in seconds, labelled with the query's name, when it has one.
    emit_latency: Option<metrics::Histogram>,
    /// City gauges (LOS, ward AQI) from published indicators, when the query has a name.
    gauges: Option<CityGauges>,
    /// Checkpointing, when configured.
    checkpoints: Option<Checkpoints>,
    /// When gaps in the input were last recorded (`urbanstream.on_data_loss = 'skip'`).
    gaps_recorded: Option<std::time::Instant>,
    /// The watermark shown in [`PipelineStats::watermark_ms`] by this run.
    watermark_shown: i64,
}

impl Pipeline {
    /// Connects to Kafka, registers the city's tables and plans the default queries of
    /// `queries/`.
    pub async fn new(config: PipelineConfig, stats: Arc<PipelineStats>) -> Result<Self> {
        let schemas = SchemaRegistry::embedded()?;
        let reference = match &config.reference {
            Some(tables) => tables.clone(),
            None => crate::reference::ReferenceTables::embedded()?,
        };
        let ctx = match config.memory_limit {
            Some(limit) => StreamContext::with_memory_limit(limit)?,
            None => StreamContext::new(),
        };
        let ctx = city_context_in(ctx, &config.topics, &schemas, &reference)?;
        let reservation = config.memory_limit.map(|_| {
            MemoryConsumer::new("window state").register(&ctx.session().runtime_env().memory_pool)
        });
        let gauges = match &config.name {
            Some(_) => {
                let wards: Vec<String> = crate::reference::ReferenceData::embedded()?
                    .wards
                    .into_iter()
                    .map(|w| w.ward_id)
                    .collect();
                Some(CityGauges::new(
                    &config.topics.congestion,
                    &config.topics.air_indicators,
                    &wards,
                ))
            }
            None => None,
        };
        let emit_latency = config.name.as_ref().map(
            |name| metrics::histogram!(crate::telemetry::EMIT_LATENCY, "query" => name.clone()),
        );
        let mut queries: Vec<Running> = Vec::new();
        if config.default_queries {
            for (name, query) in default_queries(&ctx).await? {
                queries.push(Running {
                    name,
                    query,
                    parts: BTreeMap::new(),
                    repartition: None,
                });
            }
        }
        for (name, sql) in &config.queries {
            for query in plan_all(&ctx, sql).await? {
                queries.push(Running {
                    name: name.clone(),
                    query,
                    parts: BTreeMap::new(),
                    repartition: None,
                });
            }
        }
        // Queries whose groups span input partitions go through a repartition topic, when
        // their plan allows (one windowed aggregation; detectors and `LAG` above it keyed by
        // all of its groups) and every other query's state can be split too. With one state for all partitions, a query reads
        // its input itself: one instance reading every internal partition, each at its own
        // pace, would find an input partition's records passed on to one of them late against
        // those passed on to another.
        let candidates: Vec<(usize, Option<_>)> = queries
            .iter()
            .enumerate()
            .filter(|(_, r)| !r.query.is_partition_local())
            .map(|(i, r)| {
                let q = &r.query;
                let statement = q
                    .is_repartitionable()
                    .then(|| (q.sql().to_string(), q.source().clone()));
                (i, statement)
            })
            .collect();
        let mut key_plans = Vec::new();
        for (i, statement) in candidates {
            let plan = match statement {
                Some((sql, source)) => key_plan(&ctx, sql, source).await?,
                None => None,
            };
            key_plans.push((i, plan));
        }
        let splittable = key_plans.iter().all(|(_, plan)| plan.is_some());
        for (i, keys) in key_plans {
            let (Some(keys), true) = (keys, splittable) else {
                continue;
            };
            let running = &mut queries[i];
            let input = running.query.source().options.topic.clone();
            let topic = repartition_topic_of(&config.group_id, i);
            let (partitions, inputs) = repartition_topic(&config, &input, &topic).await?;
            info!(
                query = %running.name,
                %topic,
                partitions,
                "groups span input partitions: repartitioned by group"
            );
            running.repartition = Some(Repartition {
                input,
                topic,
                partitions,
                inputs,
                keys,
                progress: HashMap::new(),
                announced: HashMap::new(),
            });
        }
        // Output topics exist before the first publish: a broker that does not create topics
        // on first use (most production clusters) would otherwise fail every send. Created
        // with as many partitions as the query's input.
        let mut outputs: BTreeMap<String, (u32, bool)> = BTreeMap::new();
        for running in &queries {
            let input = &running.query.source().options.topic;
            let partitions = repartition::partition_count(&config, input)?.max(1);
            if let Some(sink) = running.query.sink() {
                let n = outputs
                    .entry(sink.options.topic.clone())
                    .or_insert((0, true));
                n.0 = n.0.max(partitions);
                n.1 = true;
            }
            for topic in [&config.topics.late, &config.topics.dlq] {
                let n = outputs.entry(topic.clone()).or_insert((0, false));
                n.0 = n.0.max(partitions);
            }
        }
        for (topic, (partitions, required)) in outputs {
            // A query cannot run without its sink; the late and DLQ topics are written only
            // when a record goes there, so a deployment that forbids creating them is warned.
            match repartition::ensure_topic(&config, &topic, partitions).await {
                Err(e) if !required => {
                    tracing::warn!(%topic, error = %e, "late/DLQ topic missing and not created")
                }
                r => {
                    r?;
                }
            }
        }
        // Every city input topic (of every input stream a schema file declares) is decoded
        // (and its bad records dead-lettered), read by a query or not, when the default
        // queries run; other queries' sources are decoded with
        // the schema their table declares.
        let mut decoders = HashMap::new();
        let avro = config.default_queries && config.topics.input_format == Format::Avro
            || queries.iter().any(|r| {
                r.query
                    .inputs()
                    .iter()
                    .any(|s| s.options.format == Format::Avro)
                    || r.query
                        .sink()
                        .is_some_and(|s| s.options.format == Format::Avro)
            });
        let codecs = crate::decode::Codecs {
            registry: if avro { Some(config.registry()?) } else { None },
            descriptors: config.descriptors.clone(),
        };
        let registry = codecs.registry.clone();
        // Protobuf sinks: plain messages of the stream's message, every column a field.
        let mut protobuf_sinks = Vec::new();
        for table in queries.iter().filter_map(|r| r.query.sink()) {
            if table.options.format != Format::Protobuf {
                continue;
            }
            let Some(message) = table.check_writable(codecs.descriptors.as_ref())? else {
                continue;
            };
            protobuf_sinks.push((
                table.options.topic.clone(),
                crate::decode::ProtobufEncoder::new(message, None),
            ));
        }
        if config.default_queries {
            for (schema, declared) in schemas.streams()? {
                if declared.role != crate::schema::StreamRole::Input {
                    continue;
                }
                decoders.insert(
                    config.topics.topic_of(&declared),
                    TopicDecoder::new(
                        config.topics.input_format,
                        schema,
                        Some(("event_time", TimeUnit::Millisecond)),
                        &codecs,
                        declared.protobuf_message.as_deref(),
                    )?,
                );
            }
        }
        for running in &queries {
            for source in running.query.inputs() {
                let decoder = |format| source.decoder(format, &codecs);
                match decoders.get(&source.options.topic) {
                    None => {
                        decoders.insert(
                            source.options.topic.clone(),
                            decoder(source.options.format)?,
                        );
                    }
                    // One topic, one format: a stream declaring another would see every
                    // record rejected.
                    Some(d) if d.format() != source.options.format => {
                        return Err(Error::Config(format!(
                            "stream {} reads topic {} as {}, but it is read as {} here (the \
                             city's inputs as [topics] input_format says): one topic has one \
                             format",
                            source.name,
                            source.options.topic,
                            source.options.format.as_str(),
                            d.format().as_str()
                        )));
                    }
                    Some(_) => {}
                }
                // Stage 1 forwards the input's records as they are.
                if let Some(r) = &running.repartition {
                    let format = decoders
                        .get(&source.options.topic)
                        .map_or(source.options.format, TopicDecoder::format);
                    decoders.insert(r.topic.clone(), decoder(format)?);
                }
            }
        }
        let mut inputs: Vec<String> = decoders.keys().cloned().collect();
        inputs.sort();
        let mut source_config = KafkaSourceConfig::new(&config.brokers, inputs);
        source_config.group_id = config.group_id.clone();
        source_config.max_batch_rows = config.max_batch_rows;
        source_config.linger = config.linger;
        source_config.properties = config.properties.clone();
        source_config.group_instance_id = config.group_instance_id.clone();
        if config.from_beginning {
            // The queries' inputs from their beginning; the internal topics of repartitioned
            // ones from their ends now, before this pipeline's first stage passes anything on:
            // what the dropped (or reset) query's first stage passed on and its second stage
            // had not read is passed on again, and read once.
            source_config.from_beginning = queries
                .iter()
                .flat_map(|r| r.query.inputs())
                .map(|t| t.options.topic.clone())
                .collect();
            for r in queries.iter().filter_map(|r| r.repartition.as_ref()) {
                let (topic, partitions) = (r.topic.clone(), r.partitions);
                let ends = blocking(|| repartition::end_offsets(&config, &topic, partitions))?;
                source_config.start_at.extend(ends);
            }
        }
        let mut sink_config = KafkaSinkConfig::new(&config.brokers);
        sink_config.linger = config.producer_linger;
        sink_config.properties = config.properties.clone();
        sink_config.query = config
            .name
            .clone()
            .unwrap_or_else(|| config.group_id.clone());
        sink_config.transactional_id = config
            .checkpoint
            .as_ref()
            .and_then(|c| c.transactional_id.clone());
        if sink_config.transactional_id.is_some() {
            source_config
                .properties
                .push(("isolation.level".into(), "read_committed".into()));
        }
        // The transactional producer first: its initialisation fences a predecessor with the
        // same transactional id and aborts the transaction that predecessor left open, before
        // this process reads anything (so it never waits at an open transaction of its own
        // predecessor, e.g. in a repartition topic it both writes and reads). It waits on the
        // broker.
        let mut sink = blocking(|| KafkaSink::new(&sink_config))?;
        // Avro sinks write with their schema, registered under `<topic>-value`.
        let mut sink_formats: HashMap<&str, (Format, &str)> = HashMap::new();
        for table in queries.iter().filter_map(|r| r.query.sink()) {
            let (format, name) = *sink_formats
                .entry(table.options.topic.as_str())
                .or_insert((table.options.format, table.name.as_str()));
            if format != table.options.format {
                return Err(Error::Config(format!(
                    "streams {name} and {} both write topic {}, as {} and as {}: one topic has \
                     one format",
                    table.name,
                    table.options.topic,
                    format.as_str(),
                    table.options.format.as_str()
                )));
            }
        }
        let avro_sinks = queries
            .iter()
            .filter_map(|r| r.query.sink())
            .filter(|t| t.options.format == Format::Avro)
            .map(|t| Ok((t.options.topic.clone(), t.topic_schema.avro_schema()?)))
            .collect::<Result<BTreeMap<String, String>>>()?;
        if let Some(registry) = &registry {
            for (topic, avsc) in avro_sinks {
                let subject = format!("{topic}-value");
                let encoder =
                    crate::decode::AvroEncoder::registered(registry, &subject, &avsc).await?;
                sink.write_as(topic, crate::decode::RecordEncoder::Avro(encoder));
            }
        }
        for (topic, encoder) in protobuf_sinks {
            sink.write_as(topic, crate::decode::RecordEncoder::Protobuf(encoder));
        }
        let source = Arc::new(KafkaSource::new(source_config)?);
        let partitioned = queries
            .iter()
            .all(|r| r.query.is_partition_local() || r.repartition.is_some());
        let checkpoints = match &config.checkpoint {
            Some(settings) => {
                // Another service's checkpoints (another group's) are neither restored nor
                // written over.
                if settings.claim {
                    settings.location.claim(&config.group_id).await?;
                }
                let mut stores = HashMap::new();
                if !partitioned {
                    stores.insert(
                        None,
                        (
                            CheckpointStore::at(settings.location.clone(), settings.retain)?,
                            0,
                        ),
                    );
                }
                Some(Checkpoints {
                    location: settings.location.clone(),
                    retain: settings.retain,
                    stores,
                    interval: settings.interval,
                    last: std::time::Instant::now(),
                    replay: None,
                    caught_up: None,
                    writing: None,
                    written: None,
                })
            }
            None => None,
        };
        let partitioning = match (partitioned, queries.iter().any(|r| r.repartition.is_some())) {
            (true, true) => "repartitioned",
            (true, false) => "per_partition",
            (false, _) => "single",
        };
        if let Ok(mut p) = stats.partitioning.lock() {
            *p = Some(partitioning);
        }
        info!(
            name = config.name.as_deref().unwrap_or("all"),
            state = partitioning,
            "queries planned"
        );
        let id_checks = [
            (&config.topics.camera, ("camera_id", "cameras")),
            (&config.topics.detectors, ("detector_id", "detectors")),
            (&config.topics.air, ("sensor_id", "sensors")),
        ]
        .into_iter()
        .filter(|(topic, _)| decoders.contains_key(topic.as_str()))
        .map(|(topic, check)| (topic.clone(), check))
        .collect();
        // Records without a key are dead-lettered only from a topic every statement reading
        // it keeps state per partition of, by one key column: another statement (one without
        // state, stage 1 of a repartitioned one) reads such records correctly.
        let mut key_checks: HashMap<String, (String, bool)> = HashMap::new();
        if partitioned {
            let mut unchecked = std::collections::HashSet::new();
            for r in &queries {
                let source = &r.query.source().options.topic;
                for input in r.query.inputs() {
                    let topic = &input.options.topic;
                    match r.query.placed_by().filter(|_| topic == source) {
                        Some(column)
                            if key_checks
                                .get(topic)
                                .is_none_or(|(c, _)| c.as_str() == column) =>
                        {
                            key_checks.insert(topic.clone(), (column.to_string(), false));
                        }
                        _ => {
                            unchecked.insert(topic.clone());
                        }
                    }
                }
            }
            key_checks.retain(|topic, _| !unchecked.contains(topic));
        }
        let mut pipeline = Self {
            source,
            ahead: None,
            sink,
            checkpoints,
            decoders,
            reference,
            id_checks,
            key_checks,
            queries,
            ctx,
            partitioned,
            held: BTreeSet::new(),
            partition_counts: HashMap::new(),
            stats,
            next_offsets: HashMap::new(),
            committed: HashMap::new(),
            in_flight: Default::default(),
            committable_acked: HashMap::new(),
            last_commit: std::time::Instant::now(),
            reservation,
            measured: None,
            emit_latency,
            gauges,
            config,
            gaps_recorded: None,
            watermark_shown: i64::MIN,
        };
        if pipeline.checkpoints.is_some() && !pipeline.partitioned {
            pipeline.recover().await?;
        }
        Ok(pipeline)
    }

    /// Runs until `stop` is set, then publishes what is pending, flushes and commits. On an
    /// error, a checkpoint still being written is waited for first, so that the next run
    /// (or the next owner of the partitions) never finds it half written.
    pub async fn run(mut self, stop: Arc<AtomicBool>) -> Result<()> {
        let result = self.run_until(stop).await;
        // A read still running is cancelled: what it took is read again by the next run. It
        // has let go of the consumer when this returns, so the consumer closes with the
        // pipeline.
        if let Some(read) = self.ahead.take() {
            read.cancel().await;
        }
        if result.is_err() {
            let _ = self.finish_writing().await;
        }
        // Stopped (paused, failed, finished), it holds no partition.
        self.stats.assigned_partitions.store(0, Ordering::Relaxed);
        result
    }

    /// The watermark [`PipelineStats::watermark_ms`] shows at processing time `now`, before
    /// it is kept from going back: the lowest of the query instances with an input that
    /// delivered within its idle timeout, each as its operators go by; with every input quiet
    /// (restored, or the stream paused), the lowest of them all. It once stayed where it was
    /// when the inputs went quiet: a repartitioned query whose closing marker moved its
    /// watermark once the others were idle showed the one before the marker.
    fn lowest_watermark(&self, now: i64) -> Option<i64> {
        let instances = || self.queries.iter().flat_map(|r| r.instances());
        instances()
            .filter(|q| !q.inputs_quiet(now))
            .filter_map(|q| q.progress_watermark(now))
            .min()
            .or_else(|| instances().filter_map(|q| q.progress_watermark(now)).min())
    }

    async fn run_until(&mut self, stop: Arc<AtomicBool>) -> Result<()> {
        let mut topics: Vec<&String> = self.decoders.keys().collect();
        topics.sort();
        info!(
            name = self.config.name.as_deref().unwrap_or("all"),
            brokers = %self.config.brokers,
            group = %self.config.group_id,
            ?topics,
            queries = self.queries.len(),
            "pipeline started"
        );
        let mut assignment_checked: Option<std::time::Instant> = None;
        while !stop.load(Ordering::Relaxed) {
            let waited = std::time::Instant::now();
            let read = match self.ahead.take() {
                Some(read) => read.batches().await,
                None => read_next(&self.source).await,
            };
            let batches = match read {
                Err(Error::DataLoss(reason)) => {
                    self.record_gaps(&reason).await?;
                    continue;
                }
                other => other?,
            };
            let read = waited.elapsed();
            let records: usize = batches.iter().map(RawBatch::len).sum();
            // While records come fast (this read filled a quarter of a micro-batch or more),
            // the next read runs beside this step, holding a thread of its own; a query fed
            // slowly or idle reads in turn and holds none. Not while the group has partition
            // changes for this member: those are answered with no read in flight, so that no
            // record of a partition read before the answer is processed after it.
            if records * 4 >= self.config.max_batch_rows && !self.source.changes_pending() {
                self.ahead = Some(ReadAhead::start(&self.source));
                self.stats.reads_ahead.fetch_add(1, Ordering::Relaxed);
            }
            let stepped = std::time::Instant::now();
            if let Err(e) = self.step(batches).await {
                return Err(self.resource_error(e));
            }
            if self.ahead.is_none() {
                self.rebalance().await?;
            }
            self.check_replay();
            self.poll_writing().await?;
            if self
                .checkpoints
                .as_ref()
                .is_some_and(|c| c.last.elapsed() >= c.interval)
            {
                self.checkpoint().await?;
            }
            let step = stepped.elapsed();
            if step > SLOW_STEP || (records > 0 && read > SLOW_STEP) {
                debug!(
                    read_ms = read.as_millis() as u64,
                    step_ms = step.as_millis() as u64,
                    records,
                    in_flight = self.in_flight.len(),
                    "slow micro-batch"
                );
            }
            if assignment_checked.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                assignment_checked = Some(std::time::Instant::now());
                self.stats
                    .assigned_partitions
                    .store(self.source.assigned_partitions() as u64, Ordering::Relaxed);
                self.source.measure_lag(
                    self.stats.consumer_lag.clone(),
                    self.stats.consumer_lag_at.clone(),
                );
            }
        }
        // A read still running is cancelled first (`ReadAhead::cancel`), so that nothing
        // reads on while the pipeline flushes and checkpoints.
        if let Some(read) = self.ahead.take() {
            read.cancel().await;
        }
        blocking(|| self.sink.flush(Duration::from_secs(10)))?;
        self.settle(true).await?;
        self.checkpoint().await?;
        self.finish_writing().await?;
        info!(
            name = self.config.name.as_deref().unwrap_or("all"),
            "pipeline stopped"
        );
        Ok(())
    }

    /// Whether its queries skip input deleted before they read it, recording the gap
    /// (`urbanstream.on_data_loss = 'skip'`).
    fn skips_data_loss(&self) -> bool {
        !self.queries.is_empty() && self.queries.iter().all(|r| r.query.skips_data_loss())
    }

    /// Input records deleted before they were read (`reason`, from the consumer). Where the
    /// queries skip such input (`urbanstream.on_data_loss = 'skip'`), or the records were in
    /// the backlog a partition held when the query began reading it at its log's start (the
    /// log's old end, deleted before the query got there), each gap goes to the DLQ as a gap
    /// record (topic, partition, first and end offset, stage `gap`), is counted and logged,
    /// and its partition goes on from its log's start. Otherwise the query fails with the
    /// reason.
    async fn record_gaps(&mut self, reason: &str) -> Result<()> {
        let out = blocking(|| self.source.out_of_log(Duration::from_secs(30)))?;
        if let Some(reason) = out.past_end_reason() {
            return Err(Error::DataLoss(reason));
        }
        let gaps = out.gaps;
        if !self.skips_data_loss()
            && !gaps.iter().all(|(topic, partition, from, to)| {
                self.source.reading_backlog(topic, *partition, *from, *to)
            })
        {
            return Err(Error::DataLoss(reason.to_string()));
        }
        if gaps.is_empty() {
            // The consumer reports each partition's reset: those after the first arrive once
            // every gap is recorded already.
            if self
                .gaps_recorded
                .is_some_and(|t| t.elapsed() < Duration::from_secs(10))
            {
                return Ok(());
            }
            return Err(Error::DataLoss(format!(
                "{reason} (and no assigned partition is behind its log start now)"
            )));
        }
        self.gaps_recorded = Some(std::time::Instant::now());
        let now = epoch_ms();
        let records: Vec<(Option<Vec<u8>>, DlqRecord)> = gaps
            .iter()
            .map(|(topic, partition, from, to)| {
                (
                    None,
                    DlqRecord {
                        topic: topic.clone(),
                        partition: *partition,
                        offset: *from,
                        key: None,
                        error: format!(
                            "{} records (offsets {from} to {}) were deleted from the log before \
                             the query read them; skipped {}",
                            to - from,
                            to - 1,
                            if self.skips_data_loss() {
                                "under urbanstream.on_data_loss = 'skip'"
                            } else {
                                "as the old end of the backlog the query began with at the \
                                 log's start"
                            }
                        ),
                        stage: "gap".into(),
                        payload: String::new(),
                        received_at: now,
                        query: self.config.name.clone(),
                        gap_end: Some(*to),
                    },
                )
            })
            .collect();
        let mut pending = Pending::default();
        let dlq = self.config.topics.dlq.clone();
        self.sink.send_json(&dlq, &records, &mut pending).await?;
        pending.acknowledged().await?;
        for (topic, partition, from, to) in &gaps {
            warn!(
                name = self.config.name.as_deref().unwrap_or("all"),
                topic,
                partition,
                from,
                to,
                "input deleted before it was read: gap recorded in the DLQ, reading on from the log start"
            );
            blocking(|| self.source.skip_to(topic, *partition, *to))?;
            self.next_offsets
                .insert((Arc::from(topic.as_str()), *partition), *to);
        }
        self.stats
            .dlq
            .fetch_add(gaps.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Processes one set of batches: decode, run the queries, publish, wait for
    /// acknowledgements, commit.
    pub async fn step(&mut self, batches: Vec<RawBatch>) -> Result<()> {
        let received_at = epoch_ms();
        let now = received_at;
        let mut pending = Pending::default();
        let mut dlq_count = 0;
        let mut late_count = 0;
        // The late records sent in this step, by query, where the record was read, why and
        // the window it missed: a query's statements that each find a record late for the
        // same reason report it once (a query of four statements over one stream sent four
        // late records for each); each window a record missed is still reported.
        type LateKey = (String, String, i32, i64, &'static str, Option<(i64, i64)>);
        let mut reported_late: std::collections::HashSet<LateKey> = Default::default();
        let mut rows_out = 0;
        let mut windowed_out = 0;
        let first_received = batches.iter().filter_map(|b| b.first_received).min();
        let topics = self.config.topics.clone();
        let batches: Vec<RawBatch> = if self.partitioned {
            // Records of partitions handed on meanwhile are the new owner's to process.
            batches.into_iter().map(|b| self.held_only(b)).collect()
        } else {
            batches
        };
        // A partition with records not read yet holds the watermark, however long it has
        // been silent: catching up a backlog (after a restart or a broker's stall), the
        // partition read first ran ahead, and the others' records, judged against it, were
        // late. Held from now, it has its idle timeout once it has caught up.
        for (topic, partition) in self.source.behind() {
            for running in self
                .queries
                .iter_mut()
                .filter(|r| r.repartition.is_none() && r.reads(&topic))
            {
                if running.parts.is_empty() {
                    running.query.expect_topic_partition(&topic, partition, now);
                } else if let Some(part) = running.parts.get_mut(&partition) {
                    part.query.expect_topic_partition(&topic, partition, now);
                }
            }
        }
        // A repartitioned query's stage 2 learns its input partitions' progress from stage
        // 1's progress records: stage 1 tells it, through them, which input partitions are
        // behind (repeated while they are) and when they have caught up, and stage 2, in
        // whichever process, holds those meanwhile rather than let them go idle.
        let behind: BTreeSet<(String, i32)> = self.source.behind().into_iter().collect();
        for running in self.queries.iter_mut() {
            let Some(r) = &mut running.repartition else {
                continue;
            };
            let every = (running.query.source().options.idle_timeout.as_millis() as i64 / 2)
                .clamp(100, 1_000);
            for (&p, told) in r.announced.iter_mut() {
                if self.source.measured_in(&r.input, p) < told.from {
                    continue;
                }
                let now_behind = behind.contains(&(r.input.clone(), p));
                if now_behind == told.behind
                    && told.at != i64::MIN
                    && (!now_behind || now.saturating_sub(told.at) < every)
                {
                    continue;
                }
                if now_behind != told.behind || told.at == i64::MIN {
                    debug!(
                        query = %running.name,
                        input = %r.input,
                        partition = p,
                        behind = now_behind,
                        "stage 2 told whether an input partition is behind"
                    );
                }
                (told.behind, told.at) = (now_behind, now);
                let max = r.progress.get(&p).copied().unwrap_or(i64::MIN);
                let (progress, state) = (encode_pair(p, max), encode_pair(p, now_behind.into()));
                self.sink
                    .send_to_partitions(
                        &r.topic,
                        r.partitions,
                        &[(PROGRESS_HEADER, &progress), (BEHIND_HEADER, &state)],
                        &mut pending,
                    )
                    .await?;
            }
        }
        // The instances fed in this step, by (query, partition; -1 for all).
        let mut fed: std::collections::HashSet<(usize, i32)> = Default::default();
        for raw in &batches {
            // Input records, once: a record passing through a repartition topic is not a
            // record in again.
            if !raw.topic.ends_with(".repartition") {
                self.stats
                    .records_in
                    .fetch_add(raw.len() as u64, Ordering::Relaxed);
            }
            let Some(decoder) = self.decoders.get(raw.topic.as_ref()) else {
                continue;
            };
            decoder.prepare(raw).await?;
            let mut decoded = decoder.decode(raw)?;
            if let Some((column, table)) = self.id_checks.get(raw.topic.as_ref())
                && let Some(t) = self.reference.get(table)
            {
                let unknown = decoded.check_ids(
                    column,
                    t.ids(),
                    table,
                    t.version,
                    self.config.unknown_ids,
                )?;
                self.stats
                    .unknown_ids
                    .fetch_add(unknown as u64, Ordering::Relaxed);
            }
            // A topic of one partition keeps every group together, keyed or not.
            let split = self
                .partition_counts
                .get(raw.topic.as_ref())
                .is_some_and(|n| *n > 1);
            if let Some((column, reported)) = self
                .key_checks
                .get_mut(raw.topic.as_ref())
                .filter(|_| split)
            {
                let unkeyed = decoded.check_keys(raw, column, &raw.topic)?;
                if unkeyed > 0 && !*reported {
                    *reported = true;
                    warn!(
                        topic = %raw.topic,
                        column = %column,
                        unkeyed,
                        "records without a key: sent to the DLQ, since the query keeps its \
                         state per partition of the topic and such records may be in another \
                         partition than their groups (further ones are counted in the DLQ only)"
                    );
                }
            }
            if !decoded.rejects.is_empty() {
                let records: Vec<_> = decoded
                    .rejects
                    .iter()
                    .map(|r| {
                        let key = crate::sink::dlq_key(raw.key(r.index as usize));
                        let mut record = DlqRecord::new(raw, r, received_at);
                        record.query.clone_from(&self.config.name);
                        (key, record)
                    })
                    .collect();
                dlq_count += records.len();
                self.sink
                    .send_json(&topics.dlq, &records, &mut pending)
                    .await?;
            }
            let counter = if *raw.topic == *topics.camera {
                Some(&self.stats.camera_events)
            } else if *raw.topic == *topics.detectors {
                Some(&self.stats.detector_readings)
            } else if *raw.topic == *topics.air {
                Some(&self.stats.air_readings)
            } else {
                None
            };
            if let Some(counter) = counter {
                counter.fetch_add(decoded.batch.num_rows() as u64, Ordering::Relaxed);
            }
            let partitions: Vec<i32> = decoded
                .rows
                .iter()
                .map(|&i| raw.partitions[i as usize])
                .collect();
            let offsets: Vec<i64> = decoded
                .rows
                .iter()
                .map(|&i| raw.offsets[i as usize])
                .collect();
            // Stage 1 of repartitioned queries reading this topic: each record to the
            // partitions of its groups, then the input partitions' progress.
            for running in self.queries.iter_mut() {
                let Some(r) = &mut running.repartition else {
                    continue;
                };
                if r.input != *raw.topic {
                    continue;
                }
                let (targets, failed) = r.keys.targets(&decoded.batch, r.partitions).await?;
                if !failed.is_empty() {
                    let records: Vec<_> = failed
                        .into_iter()
                        .map(|(row, error)| {
                            DlqRecord::query_failure(
                                raw,
                                decoded.rows[row as usize],
                                &error,
                                received_at,
                                self.config.name.as_ref(),
                            )
                        })
                        .collect();
                    dlq_count += records.len();
                    self.sink
                        .send_json(&topics.dlq, &records, &mut pending)
                        .await?;
                }
                for (row, qs) in targets.iter().enumerate() {
                    let i = decoded.rows[row] as usize;
                    let origin = encode_pair(raw.partitions[i], raw.offsets[i]);
                    for q in qs {
                        self.sink
                            .send_to_partition(
                                &r.topic,
                                *q as i32,
                                raw.key(i),
                                raw.value(i),
                                &[(ORIGIN_HEADER, &origin)],
                                &mut pending,
                            )
                            .await?;
                    }
                }
                let options = &running.query.source().options;
                let limit = now.saturating_add(options.future_tolerance.as_millis() as i64);
                let maxima = match &options.event_time {
                    Some(time) => event_time_maxima(&decoded.batch, time, &partitions, limit)?,
                    None => HashMap::new(),
                };
                for (p, max) in maxima {
                    if r.progress.get(&p).is_some_and(|m| *m >= max) {
                        continue;
                    }
                    r.progress.insert(p, max);
                    let progress = encode_pair(p, max);
                    self.sink
                        .send_to_partitions(
                            &r.topic,
                            r.partitions,
                            &[(PROGRESS_HEADER, &progress)],
                            &mut pending,
                        )
                        .await?;
                }
            }
            // Row indices of the decoded batch per instance: per partition, or all together.
            let mut splits: BTreeMap<i32, Vec<u32>> = BTreeMap::new();
            for (i, p) in partitions.iter().enumerate() {
                let key = if self.partitioned { *p } else { -1 };
                splits.entry(key).or_default().push(i as u32);
            }
            if self.partitioned {
                for &p in splits.keys() {
                    self.ensure_parts(&(raw.topic.to_string(), p), now).await?;
                }
            }
            for (qi, running) in self.queries.iter_mut().enumerate() {
                if !running.reads(&raw.topic) {
                    continue;
                }
                for (&part, rows) in &splits {
                    let repartitioned = running.repartition.is_some();
                    let (instance, upstream) = match running.parts.get_mut(&part) {
                        Some(p) => (&mut p.query, Some(&mut p.upstream)),
                        None => (&mut running.query, None),
                    };
                    fed.insert((qi, part));
                    // Stage 2 of a repartitioned query: rows keep their input partition and
                    // offset (from the record's origin header); one passed on again after a
                    // failover of stage 1 is dropped where the instance tracks its upstream
                    // positions. `origins` is aligned with `rows`.
                    let mut origins: Vec<Option<(i32, i64)>> = Vec::new();
                    let origin_of =
                        |r: u32| raw.origins.get(decoded.rows[r as usize] as usize).copied();
                    let rows: Vec<u32> = match (repartitioned, upstream) {
                        (true, Some(upstream)) => rows
                            .iter()
                            .copied()
                            .filter(|&r| {
                                let Some((p, o)) = origin_of(r) else {
                                    return false;
                                };
                                let next = upstream.entry(p).or_insert(0);
                                if o < *next {
                                    return false;
                                }
                                *next = o + 1;
                                origins.push(Some((p, o)));
                                true
                            })
                            .collect(),
                        (true, None) => {
                            origins = rows.iter().map(|&r| origin_of(r)).collect();
                            rows.clone()
                        }
                        (false, _) => rows.clone(),
                    };
                    if repartitioned && rows.is_empty() {
                        continue;
                    }
                    let (batch, sub_partitions, sub_offsets) = if rows.len() == partitions.len() {
                        (decoded.batch.clone(), partitions.clone(), offsets.clone())
                    } else {
                        let indices = datafusion::arrow::array::UInt32Array::from(rows.clone());
                        (
                            datafusion::arrow::compute::take_record_batch(
                                &decoded.batch,
                                &indices,
                            )?,
                            rows.iter().map(|&r| partitions[r as usize]).collect(),
                            rows.iter()
                                .map(|&r| offsets[r as usize])
                                .collect::<Vec<i64>>(),
                        )
                    };
                    let sub_partitions: Vec<i32> = if repartitioned {
                        origins
                            .iter()
                            .zip(&sub_partitions)
                            .map(|(o, p)| o.map_or(*p, |o| o.0))
                            .collect()
                    } else {
                        sub_partitions
                    };
                    let out = instance
                        .process_topic(&raw.topic, &batch, &sub_partitions, Some(&sub_offsets), now)
                        .await?;
                    if !out.failed.is_empty() {
                        let records: Vec<_> = out
                            .failed
                            .iter()
                            .map(|f| {
                                let (key, mut record) = DlqRecord::query_failure(
                                    raw,
                                    decoded.rows[rows[f.row as usize] as usize],
                                    &f.error,
                                    received_at,
                                    self.config.name.as_ref(),
                                );
                                // A repartitioned record is reported where it came from.
                                if let (Some(r), Some((p, o))) = (
                                    &running.repartition,
                                    origins.get(f.row as usize).copied().flatten(),
                                ) {
                                    (record.topic, record.partition, record.offset) =
                                        (r.input.clone(), p, o);
                                }
                                (key, record)
                            })
                            .collect();
                        dlq_count += records.len();
                        self.sink
                            .send_json(&topics.dlq, &records, &mut pending)
                            .await?;
                    }
                    if !out.diverted.is_empty() {
                        let records: Vec<_> = out
                            .diverted
                            .iter()
                            .map(|d| {
                                let i = decoded.rows[rows[d.row as usize] as usize] as usize;
                                // A repartitioned record is reported where it came from.
                                let origin = origins.get(d.row as usize).copied().flatten();
                                let (topic, partition, offset) =
                                    match (&running.repartition, origin) {
                                        (Some(r), Some((p, o))) => (r.input.clone(), p, o),
                                        _ => (
                                            raw.topic.to_string(),
                                            raw.partitions[i],
                                            raw.offsets[i],
                                        ),
                                    };
                                let record = LateRecord {
                                    query: running.name.clone(),
                                    topic,
                                    partition,
                                    offset,
                                    event_time: d.event_time,
                                    watermark: d.watermark.max(0),
                                    reason: d.reason.as_str().into(),
                                    window_start: d.window.map(|w| w.0),
                                    window_end: d.window.map(|w| w.1),
                                    payload: BASE64.encode(raw.value(i)),
                                };
                                (raw.key(i).map(<[u8]>::to_vec), record)
                            })
                            .zip(&out.diverted)
                            .filter(|((_, r), d)| {
                                reported_late.insert((
                                    r.query.clone(),
                                    r.topic.clone(),
                                    r.partition,
                                    r.offset,
                                    d.reason.as_str(),
                                    d.window,
                                ))
                            })
                            .map(|(record, _)| record)
                            .collect();
                        late_count += records.len();
                        self.sink
                            .send_json(&topics.late, &records, &mut pending)
                            .await?;
                    }
                    let sink = running.query.sink().cloned();
                    let windowed = running.query.is_windowed();
                    let refused = Refused::of(running, &topics.dlq, part, received_at);
                    let (published, dead) = publish_all(
                        running.instance(part),
                        out,
                        now,
                        &self.sink,
                        sink,
                        &refused,
                        &mut pending,
                        self.gauges.as_ref(),
                    )
                    .await?;
                    dlq_count += dead;
                    rows_out += published;
                    if windowed {
                        windowed_out += published;
                    }
                }
            }
            for (p, o) in raw.partitions.iter().zip(&raw.offsets) {
                let next = self
                    .next_offsets
                    .entry((raw.topic.clone(), *p))
                    .or_insert(o + 1);
                *next = (*next).max(o + 1);
            }
        }
        // Progress records of repartition topics: the input partitions' event time, for the
        // instances of stage 2.
        for raw in &batches {
            for progress in &raw.progress {
                for running in &mut self.queries {
                    if running.topic() == &*raw.topic
                        && let Some(part) = running.parts.get_mut(&progress.partition)
                    {
                        if progress.max_event_ms != i64::MIN {
                            part.query.observe(
                                progress.input_partition,
                                progress.max_event_ms,
                                now,
                            );
                        }
                        match progress.behind {
                            Some(true) => {
                                part.behind_inputs.insert(progress.input_partition, now);
                            }
                            Some(false) => {
                                part.behind_inputs.remove(&progress.input_partition);
                            }
                            None => {}
                        }
                    }
                }
                let next = self
                    .next_offsets
                    .entry((raw.topic.clone(), progress.partition))
                    .or_insert(progress.offset + 1);
                *next = (*next).max(progress.offset + 1);
            }
        }
        // Input partitions stage 1 says are behind hold their stage 2 instances however long
        // they are silent: for the lease after the last notice read, and for as long as the
        // instance's own partition has records not read yet (the next notice may be among
        // them).
        for running in self.queries.iter_mut() {
            let topic = running.topic().to_string();
            for (q, part) in running.parts.iter_mut() {
                let unread = behind.contains(&(topic.clone(), *q));
                part.behind_inputs.retain(|_, at| {
                    unread || now.saturating_sub(*at) < repartition::BEHIND_LEASE_MS
                });
                for p in part.behind_inputs.keys() {
                    part.query.expect_partition(*p, now);
                }
            }
        }
        // Instances without input: idle partitions and early fires may still make results
        // due. With one state per partition, a partition silent for its idle timeout no
        // longer holds its windows back: its watermark follows the lowest of the others.
        for (qi, running) in self.queries.iter_mut().enumerate() {
            let sink = running.query.sink().cloned();
            let mut outputs = Vec::new();
            if running.parts.is_empty() {
                if !fed.contains(&(qi, -1)) {
                    outputs.push((-1, running.query.tick(now).await?));
                }
            } else {
                let idle_ms = running.query.source().options.idle_timeout.as_millis() as i64;
                let active = running
                    .parts
                    .values()
                    .filter(|p| p.query.is_idle(now) == Some(false))
                    .filter_map(|p| p.query.watermark())
                    .min();
                for (partition, part) in &mut running.parts {
                    let follows = match part.query.is_idle(now) {
                        Some(idle) => idle,
                        None => now.saturating_sub(part.since_ms) >= idle_ms,
                    };
                    match active {
                        Some(w) if follows && part.query.watermark().is_none_or(|own| own < w) => {
                            outputs.push((*partition, part.query.advance_watermark(w, now).await?));
                        }
                        _ if !fed.contains(&(qi, *partition)) => {
                            outputs.push((*partition, part.query.tick(now).await?));
                        }
                        _ => {}
                    }
                }
            }
            for (part, out) in outputs {
                let refused = Refused::of(running, &topics.dlq, part, now);
                let (published, dead) = publish_all(
                    running.instance(part),
                    out,
                    now,
                    &self.sink,
                    sink.clone(),
                    &refused,
                    &mut pending,
                    self.gauges.as_ref(),
                )
                .await?;
                dlq_count += dead;
                rows_out += published;
                if running.query.is_windowed() {
                    windowed_out += published;
                }
            }
        }
        let outputs = pending.len();
        // The outputs are acknowledged in the background while the next micro-batch is read;
        // this batch's offsets are committed once they and every earlier batch's are.
        let stats = self.stats.clone();
        let emit_latency = self.emit_latency.clone();
        let acknowledged = tokio::spawn(async move {
            let n = pending.acknowledged().await?;
            if let Some(first) = first_received
                && windowed_out > 0
            {
                let us = u64::try_from(first.elapsed().as_micros()).unwrap_or(u64::MAX);
                if let Ok(mut h) = stats.emit_latency_us.lock() {
                    h.saturating_record_n(us.max(1), windowed_out as u64);
                }
                if let Some(histogram) = emit_latency {
                    histogram.record_many(us as f64 / 1e6, windowed_out);
                }
            }
            stats.dlq.fetch_add(dlq_count as u64, Ordering::Relaxed);
            stats.late.fetch_add(late_count as u64, Ordering::Relaxed);
            stats
                .indicators_out
                .fetch_add(rows_out as u64, Ordering::Relaxed);
            Ok(n)
        });
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        if let Some(w) = self.lowest_watermark(epoch_ms()) {
            // From this run on: a run restarted from an older checkpoint shows its own.
            self.watermark_shown = self.watermark_shown.max(w);
            self.stats
                .watermark_ms
                .store(self.watermark_shown, Ordering::Relaxed);
        }
        self.check_limits()?;
        if outputs > 0 {
            debug!(
                outputs,
                dlq = dlq_count,
                late = late_count,
                rows = rows_out,
                "batch published"
            );
        }
        if self.checkpoints.is_some() {
            self.source.advance_positions(&self.next_offsets);
        }
        let offsets = self.committable();
        self.in_flight.push_back(InFlight {
            acknowledged,
            offsets,
        });
        self.settle(false).await
    }

    /// DataFusion's refusal to allocate from the query's memory pool, as the resource limit it
    /// is; other errors as they are.
    fn resource_error(&self, e: Error) -> Error {
        match (&e, self.config.memory_limit) {
            (Error::DataFusion(df), Some(limit)) => match df.find_root() {
                datafusion::error::DataFusionError::ResourcesExhausted(message) => {
                    Error::ResourceLimit(format!(
                        "an operator does not fit the query's memory limit of {limit} bytes \
                         ({message})"
                    ))
                }
                _ => e,
            },
            _ => e,
        }
    }

    /// Records the state's size and fails with [`Error::ResourceLimit`] when it is over the
    /// memory pool or the cap on groups. The entries are counted on every micro-batch (each
    /// operator knows its count); the bytes, which take a walk over the whole state, are
    /// measured again only when the entries grew by an eighth or 4 096 since, or after
    /// [`MEASURE_EVERY`]: a micro-batch costs in proportion to what it changes, not to the
    /// state held, and a growing state is still measured before it can grow far.
    fn check_limits(&mut self) -> Result<()> {
        let instances = || self.queries.iter().flat_map(|r| r.instances());
        let groups: usize = instances().map(|q| q.state_groups()).sum();
        self.stats
            .state_groups
            .store(groups as u64, Ordering::Relaxed);
        if let Some(max) = self.config.max_state_groups
            && groups > max
        {
            return Err(Error::ResourceLimit(format!(
                "state holds {groups} entries ((window, group) partials, detector keys and rows \
                 held), over the cap of {max} (queries.max_state_groups)"
            )));
        }
        let due = self.measured.is_none_or(|(at, then)| {
            at.elapsed() >= MEASURE_EVERY || groups > then + (then / 8).max(4_096)
        });
        if !due {
            return Ok(());
        }
        self.measured = Some((std::time::Instant::now(), groups));
        let bytes: usize = instances().map(|q| q.state_bytes()).sum();
        let expired: u64 = instances().map(|q| q.keys_expired()).sum();
        self.stats.keys_expired.store(expired, Ordering::Relaxed);
        self.stats
            .state_bytes
            .store(bytes as u64, Ordering::Relaxed);
        if let Some(reservation) = &mut self.reservation
            && let Err(e) = reservation.try_resize(bytes)
        {
            let limit = self.config.memory_limit.unwrap_or_default();
            return Err(Error::ResourceLimit(format!(
                "state of {bytes} bytes in {groups} entries (windows, sessions, detector \
                 keys) does not fit the query's memory limit of {limit} bytes ({e})"
            )));
        }
        Ok(())
    }

    /// Commits the offsets of every micro-batch at the front of the queue whose outputs are
    /// acknowledged; waits for the front one when more than [`MAX_IN_FLIGHT`] are out, or for
    /// all of them with `all`. A refused output fails the pipeline before its offsets commit.
    async fn settle(&mut self, all: bool) -> Result<()> {
        while let Some(front) = self.in_flight.front() {
            if !(all || front.acknowledged.is_finished() || self.in_flight.len() > MAX_IN_FLIGHT) {
                break;
            }
            let Some(done) = self.in_flight.pop_front() else {
                break;
            };
            done.acknowledged
                .await
                .map_err(|e| Error::Config(format!("acknowledgement task failed: {e}")))??;
            self.committable_acked = done.offsets;
        }
        // Acknowledged offsets are committed at most every COMMIT_INTERVAL (and at the end);
        // with checkpoints, the checkpoint's positions are committed instead.
        if self.checkpoints.is_none() && (all || self.last_commit.elapsed() >= COMMIT_INTERVAL) {
            let changed: HashMap<_, _> = self
                .committable_acked
                .iter()
                .filter(|(key, offset)| self.committed.get(*key) != Some(*offset))
                .map(|(k, o)| (k.clone(), *o))
                .collect();
            self.source.commit(&changed)?;
            self.committed.extend(changed);
            self.last_commit = std::time::Instant::now();
        }
        Ok(())
    }

    /// Per (topic, partition), the offset that may be committed once everything published so
    /// far is acknowledged: the next offset to read, held back to the oldest event an open
    /// window of any query still needs.
    fn committable(&self) -> HashMap<(Arc<str>, i32), i64> {
        // Per topic, once: the oldest offset each partition's readers hold, and a floor for
        // every partition (stage 2 of a repartitioned query keys its held offsets, of its own
        // partition, by input partition).
        let mut held: HashMap<&str, (HashMap<i32, i64>, Option<i64>)> = HashMap::new();
        for (topic, _) in self.next_offsets.keys() {
            if held.contains_key(&**topic) {
                continue;
            }
            let (by_partition, floor) = held.entry(&**topic).or_default();
            for running in &self.queries {
                if !running.reads(topic) {
                    continue;
                }
                for instance in running.instances() {
                    match running.repartition {
                        Some(_) => {
                            let low = instance
                                .held_offsets_of(&instance.source().options.topic)
                                .values()
                                .min()
                                .copied();
                            if let Some(low) = low {
                                *floor = Some(floor.map_or(low, |f| f.min(low)));
                            }
                        }
                        None => {
                            for (p, o) in instance.held_offsets_of(topic) {
                                by_partition
                                    .entry(p)
                                    .and_modify(|m| *m = (*m).min(o))
                                    .or_insert(o);
                            }
                        }
                    }
                }
            }
        }
        let mut out = HashMap::new();
        for ((topic, partition), next) in &self.next_offsets {
            let mut offset = *next;
            if let Some((by_partition, floor)) = held.get(&**topic) {
                if let Some(h) = by_partition.get(partition) {
                    offset = offset.min(*h);
                }
                if let Some(f) = floor {
                    offset = offset.min(*f);
                }
            }
            out.insert((topic.clone(), *partition), offset);
        }
        out
    }
}

/// Where the results a query does not publish go (a window's result its plan above the
/// windows failed on, a row with a float JSON cannot carry): the DLQ, as records of the
/// query's input topic and partition (-1: every partition) without an offset, stage
/// `result`, the row as their payload.
struct Refused<'a> {
    dlq: &'a str,
    query: String,
    topic: String,
    partition: i32,
    received_at: i64,
}

impl<'a> Refused<'a> {
    /// For `running`'s state of partition `part` (-1: all), at `received_at`.
    fn of(running: &Running, dlq: &'a str, part: i32, received_at: i64) -> Self {
        Self {
            dlq,
            query: running.name.clone(),
            topic: running.query.source().options.topic.clone(),
            // A repartitioned query's part is a partition of its internal topic.
            partition: if running.repartition.is_some() {
                -1
            } else {
                part
            },
            received_at,
        }
    }

    /// Sends the windows' `results` the plan refused to the DLQ; how many.
    async fn send(
        &self,
        sink: &KafkaSink,
        results: Vec<crate::plan::stream::RefusedResult>,
        pending: &mut Pending,
    ) -> Result<usize> {
        let rows = results
            .into_iter()
            .map(|r| {
                (
                    r.row,
                    format!(
                        "the query failed on a result of its window, above the GROUP BY: {}",
                        r.error
                    ),
                )
            })
            .collect();
        self.send_rows(sink, rows, pending).await
    }

    /// Sends result rows not published, (the row as JSON, why), to the DLQ; how many.
    async fn send_rows(
        &self,
        sink: &KafkaSink,
        rows: Vec<(String, String)>,
        pending: &mut Pending,
    ) -> Result<usize> {
        if rows.is_empty() {
            return Ok(0);
        }
        let records: Vec<_> = rows
            .into_iter()
            .map(|(row, mut error)| {
                // A row of long texts or lists is copied in part, as a long record is, so
                // that the DLQ record stays publishable.
                let copied = crate::sink::DLQ_COPY_BYTES;
                let row = row.as_bytes();
                let payload = if row.len() > copied {
                    error.push_str(&format!(
                        " (the row copied in part: its first {copied} of {} bytes)",
                        row.len()
                    ));
                    &row[..copied]
                } else {
                    row
                };
                let record = DlqRecord {
                    topic: self.topic.clone(),
                    partition: self.partition,
                    offset: -1,
                    key: None,
                    error,
                    stage: "result".into(),
                    payload: BASE64.encode(payload),
                    received_at: self.received_at,
                    query: Some(self.query.clone()),
                    gap_end: None,
                };
                (None, record)
            })
            .collect();
        sink.send_json(self.dlq, &records, pending).await?;
        Ok(records.len())
    }
}

/// Publishes a query's result rows to its sink topic, keyed by the sink's key column.
/// [`publish`] of a step's rows, then of the rest of the step's results while `query` has
/// more of them due ([`StreamQuery::is_due`]): a step that closes many windows is published
/// a part at a time, never holding all of its results at once. Windows' results the query
/// refused go to the DLQ (`refused`). The rows published and the results refused.
#[allow(clippy::too_many_arguments)]
async fn publish_all(
    query: &mut StreamQuery,
    out: crate::plan::stream::StepOutput,
    now: i64,
    sink: &KafkaSink,
    table: Option<Arc<StreamTable>>,
    refused: &Refused<'_>,
    pending: &mut Pending,
    gauges: Option<&CityGauges>,
) -> Result<(usize, usize)> {
    let (mut n, mut dead) =
        publish(sink, table.clone(), out.rows, refused, pending, gauges).await?;
    dead += refused.send(sink, out.refused, pending).await?;
    while query.is_due() {
        let more = query.tick(now).await?;
        let (more_n, more_dead) =
            publish(sink, table.clone(), more.rows, refused, pending, gauges).await?;
        n += more_n;
        dead += more_dead + refused.send(sink, more.refused, pending).await?;
    }
    Ok((n, dead))
}

/// Publishes `rows` to `table`'s topic; a row of a JSON topic with a float JSON cannot carry
/// goes to the DLQ instead (`refused`). The rows published and those sent to the DLQ.
async fn publish(
    sink: &KafkaSink,
    table: Option<Arc<StreamTable>>,
    rows: Vec<RecordBatch>,
    refused: &Refused<'_>,
    pending: &mut Pending,
    gauges: Option<&CityGauges>,
) -> Result<(usize, usize)> {
    let Some(table) = table else {
        return Ok((0, 0));
    };
    let mut n = 0;
    let mut dead = 0;
    for batch in rows {
        let batch = conform_stream(&batch, &table.topic_schema)?;
        let batch = match table.options.format {
            crate::topics::Format::Json => {
                let (kept, unwritable) = crate::sink::without_non_finite(&batch)?;
                dead += refused.send_rows(sink, unwritable, pending).await?;
                kept
            }
            _ => batch,
        };
        n += batch.num_rows();
        if let Some(gauges) = gauges {
            gauges.observe(&table.options.topic, &batch);
        }
        sink.send_rows(
            &table.options.topic,
            &batch,
            table.options.key.as_deref(),
            table.options.keyless_in_order,
            pending,
        )
        .await?;
    }
    Ok((n, dead))
}

/// Runs a blocking Kafka call (an offset or metadata lookup, which waits on the broker: up to
/// its timeout during an outage) from a pipeline's task. On a multi-threaded runtime the
/// worker first hands its other tasks, the other queries, to another thread, so that one
/// query waiting on the broker does not hold the others up; elsewhere it just runs.
pub(crate) fn blocking<T>(call: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(call)
        }
        _ => call(),
    }
}

/// Wall-clock time, epoch ms.
pub fn epoch_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use super::*;

    /// Reads `records` (JSON, as published) back with the engine's own decoder for schema
    /// `name`: each must be a valid record of it, and every field of the schema must be
    /// written by some record.
    fn read_back(
        name: &str,
        records: &[serde_json::Value],
    ) -> datafusion::arrow::array::RecordBatch {
        let registry = crate::schema::SchemaRegistry::embedded().expect("schemas");
        let schema = registry.get(name).expect(name);
        let fields: Vec<String> = schema
            .arrow
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let mut raw = crate::source::RawBatch::new("out");
        for (i, record) in records.iter().enumerate() {
            for key in record.as_object().expect("object").keys() {
                assert!(fields.contains(key), "{name} has no field {key}: {record}");
            }
            let json = serde_json::to_vec(record).expect("json");
            raw.push(0, i as i64, None, Some(&json));
        }
        let decoded = crate::decode::JsonDecoder::new(schema.clone())
            .decode(&raw)
            .expect("decode");
        assert!(
            decoded.rejects.is_empty(),
            "{name}: {:?}",
            decoded
                .rejects
                .iter()
                .map(|r| (&records[r.index as usize], &r.error))
                .collect::<Vec<_>>()
        );
        for field in &fields {
            assert!(
                records.iter().any(|r| r.get(field).is_some()),
                "no record wrote {name}.{field}"
            );
        }
        decoded.batch
    }

    /// Every kind of DLQ and late record the engine writes is a valid record of the topic's
    /// published schema: every stage, every reason, a gap and a record without an event time.
    #[test]
    fn dlq_and_late_records_follow_their_schemas() {
        use crate::decode::{Reject, RejectStage};
        use crate::plan::stream::DivertReason;
        use crate::sink::{DlqRecord, LateRecord};
        use crate::source::RawBatch;
        let mut raw = RawBatch::new("city.camera.events");
        raw.push(2, 41, Some(b"seg"), Some(&[0xff, 0xfe]));
        let mut dlq: Vec<serde_json::Value> = [
            RejectStage::Decode,
            RejectStage::Validate,
            RejectStage::Reference,
            RejectStage::Query,
        ]
        .into_iter()
        .map(|stage| {
            let reject = Reject {
                index: 0,
                stage,
                error: "bad".into(),
            };
            serde_json::to_value(DlqRecord::new(&raw, &reject, 7)).expect("json")
        })
        .collect();
        assert_eq!(dlq[0]["payload"], "//4=");
        assert_eq!(dlq[0]["key"], "c2Vn");
        dlq.push(
            serde_json::to_value(DlqRecord {
                topic: "t".into(),
                partition: 1,
                offset: 10,
                key: None,
                error: "deleted".into(),
                stage: "gap".into(),
                payload: String::new(),
                received_at: 7,
                query: Some("q".into()),
                gap_end: Some(20),
            })
            .expect("json"),
        );
        let read = read_back("dlq_record", &dlq);
        assert_eq!(read.num_rows(), 5);

        let reasons = [
            DivertReason::BeyondAllowedLateness,
            DivertReason::FutureTimestamp,
            DivertReason::WindowClosed,
            DivertReason::MissingEventTime,
            DivertReason::EventTimeOutOfRange,
        ];
        // A reason added later must be added above.
        for (i, reason) in reasons.into_iter().enumerate() {
            let listed = match reason {
                DivertReason::BeyondAllowedLateness => 0,
                DivertReason::FutureTimestamp => 1,
                DivertReason::WindowClosed => 2,
                DivertReason::MissingEventTime => 3,
                DivertReason::EventTimeOutOfRange => 4,
            };
            assert_eq!(listed, i);
        }
        let late: Vec<serde_json::Value> = reasons
            .into_iter()
            .map(|reason| {
                let window = (reason == DivertReason::WindowClosed).then_some((60_000, 120_000));
                serde_json::to_value(LateRecord {
                    query: "q".into(),
                    topic: "t".into(),
                    partition: 0,
                    offset: 1,
                    event_time: (reason != DivertReason::MissingEventTime).then_some(2),
                    watermark: 3,
                    reason: reason.as_str().into(),
                    window_start: window.map(|w| w.0),
                    window_end: window.map(|w| w.1),
                    payload: String::new(),
                })
                .expect("json")
            })
            .collect();
        let read = read_back("late_record", &late);
        assert_eq!(read.num_rows(), reasons.len());
        let event_time = read.column_by_name("event_time").expect("event_time");
        assert_eq!(event_time.null_count(), 1);
    }

    /// A pipeline waiting on the broker in [`blocking`] leaves its worker thread's other tasks
    /// (the other queries) running, even on a runtime of one worker.
    #[test]
    fn a_blocking_call_does_not_hold_up_the_other_tasks_of_its_worker() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let ticks = Arc::new(AtomicU64::new(0));
        let other = {
            let ticks = ticks.clone();
            runtime.spawn(async move {
                loop {
                    ticks.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        };
        let during = runtime.block_on(async {
            let ticks = ticks.clone();
            runtime
                .spawn(async move {
                    // Let the other task start, then wait "on the broker".
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    blocking(|| {
                        let before = ticks.load(Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(400));
                        ticks.load(Ordering::Relaxed) - before
                    })
                })
                .await
                .expect("task")
        });
        other.abort();
        assert!(
            during >= 10,
            "the other task ran {during} times while one waited in a blocking call"
        );
        // Outside a runtime, or on a single-threaded one, the call simply runs.
        assert_eq!(blocking(|| 7), 7);
        let single = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        assert_eq!(single.block_on(async { blocking(|| 8) }), 8);
    }
}
