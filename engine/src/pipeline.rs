//! The running pipeline: source → decode → time → plan → state → sink, and offset commits.
//!
//! [`Pipeline::run`] loops over micro-batches: decode each topic's records (bad ones to the
//! DLQ), feed them to the stream queries reading that topic (the queries of `queries/`,
//! planned through the SQL layer), publish their results and the events they found late, and
//! commit the input offsets only once the broker has acknowledged all of that and all earlier
//! outputs (the next micro-batches are read meanwhile, up to 8 awaiting acknowledgement). The
//! committed offset never passes the oldest event a query still holds in an unevicted window,
//! so a restart re-reads every event whose window has not been published yet (at-least-once).
//!
//! With checkpoints ([`CheckpointSettings`]), the pipeline instead writes its queries' state
//! and input positions every interval and when it stops, and a new pipeline restores the
//! newest checkpoint and resumes at its positions. With a transactional id, each interval's
//! outputs and consumed offsets commit in one Kafka transaction just before the checkpoint,
//! and a recovering pipeline does not publish again what it published after its checkpoint.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hdrhistogram::Histogram;
use tracing::{debug, info};

use datafusion::arrow::array::RecordBatch;

use crate::checkpoint::{CheckpointStore, Manifest, Position, QueryManifest};
use crate::decode::JsonDecoder;
use crate::error::{Error, Result};
use crate::plan::repartition::{KeyPlan, key_plan};
use crate::plan::stream::StreamContext;
use crate::plan::stream::StreamQuery;
use crate::plan::table::StreamTable;
use crate::plan::{city_context, city_context_in, default_queries, plan_all};
use crate::schema::SchemaRegistry;
use crate::service::metrics::CityGauges;
use crate::sink::{DlqRecord, KafkaSink, KafkaSinkConfig, LateRecord, Pending, conform_stream};
use crate::source::{
    KafkaSource, KafkaSourceConfig, ORIGIN_HEADER, PROGRESS_HEADER, PartitionChange, Positions,
    RawBatch, encode_pair,
};
use datafusion::execution::memory_pool::{MemoryConsumer, MemoryReservation};

/// Topic names. All configurable (`[topics]` of the service's configuration); the defaults
/// are the city's.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Topics {
    /// Camera events (input).
    pub camera: String,
    /// Detector readings (input).
    pub detectors: String,
    /// Air readings (input).
    pub air: String,
    /// Congestion indicators (output).
    pub congestion: String,
    /// Air indicators (output).
    pub air_indicators: String,
    /// Alerts (output).
    pub alerts: String,
    /// Dead-letter queue (output).
    pub dlq: String,
    /// Late events (output).
    pub late: String,
}

impl Default for Topics {
    fn default() -> Self {
        Self {
            camera: "city.camera.events".into(),
            detectors: "city.traffic.detectors".into(),
            air: "city.air.readings".into(),
            congestion: "city.indicators.congestion".into(),
            air_indicators: "city.indicators.air".into(),
            alerts: "city.alerts".into(),
            dlq: "city.dlq".into(),
            late: "city.late".into(),
        }
    }
}

impl Topics {
    /// The input topics.
    pub fn inputs(&self) -> Vec<String> {
        vec![
            self.camera.clone(),
            self.detectors.clone(),
            self.air.clone(),
        ]
    }

    /// Every topic, inputs first.
    pub fn all(&self) -> Vec<String> {
        let mut all = self.inputs();
        all.extend([
            self.congestion.clone(),
            self.air_indicators.clone(),
            self.alerts.clone(),
            self.dlq.clone(),
            self.late.clone(),
        ]);
        all
    }
}

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
}

/// How a pipeline checkpoints and recovers.
#[derive(Debug, Clone)]
pub struct CheckpointSettings {
    /// This pipeline's checkpoint directory.
    pub dir: std::path::PathBuf,
    /// Time between checkpoints (and between transactions in exactly-once mode).
    pub interval: Duration,
    /// Checkpoints kept.
    pub retain: usize,
    /// Exactly-once output: a transactional producer with this id commits each epoch's
    /// outputs and consumed offsets together. `None`: at-least-once.
    pub transactional_id: Option<String>,
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
            default_queries: true,
            queries: Vec::new(),
            name: None,
            memory_limit: None,
            max_state_groups: None,
            checkpoint: None,
        }
    }
}

/// Live counters of a pipeline, shared with views and tests.
#[derive(Debug)]
pub struct PipelineStats {
    /// Input records read, all topics.
    pub records_in: AtomicU64,
    /// Camera events decoded.
    pub camera_events: AtomicU64,
    /// Detector readings decoded.
    pub detector_readings: AtomicU64,
    /// Air readings decoded.
    pub air_readings: AtomicU64,
    /// Records sent to the DLQ (acknowledged).
    pub dlq: AtomicU64,
    /// Late events sent to the late topic (acknowledged).
    pub late: AtomicU64,
    /// Indicator rows published (acknowledged).
    pub indicators_out: AtomicU64,
    /// Micro-batches processed.
    pub batches: AtomicU64,
    /// The queries' lowest watermark, epoch ms (`i64::MIN` before any event).
    pub watermark_ms: AtomicI64,
    /// (window, group) partials held in state.
    pub state_groups: AtomicU64,
    /// Bytes of window state held.
    pub state_bytes: AtomicU64,
    /// Records behind the end of the assigned partitions (checked about once a second; -1
    /// until known).
    pub consumer_lag: Arc<AtomicI64>,
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
    /// When it was taken, epoch ms.
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
            camera_events: AtomicU64::default(),
            detector_readings: AtomicU64::default(),
            air_readings: AtomicU64::default(),
            dlq: AtomicU64::default(),
            late: AtomicU64::default(),
            indicators_out: AtomicU64::default(),
            batches: AtomicU64::default(),
            watermark_ms: AtomicI64::new(i64::MIN),
            state_groups: AtomicU64::default(),
            state_bytes: AtomicU64::default(),
            consumer_lag: Arc::new(AtomicI64::new(-1)),
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

/// A histogram of latencies in µs from 1 µs to 1 h at 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant histogram bounds are valid")
}

/// A micro-batch that took longer than this to read or to process is logged (debug).
const SLOW_STEP: Duration = Duration::from_millis(50);

/// Acknowledged offsets are committed at most this often.
const COMMIT_INTERVAL: Duration = Duration::from_millis(100);

/// How long, after the replay following a recovery has caught up with the input, outputs
/// read back are still held back while some have not come again (they may be due on
/// processing time: an idle partition's windows, an early fire).
const REPLAY_GRACE: Duration = Duration::from_secs(120);

/// Micro-batches whose outputs may be awaiting acknowledgement at once.
const MAX_IN_FLIGHT: usize = 8;

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

/// Stage 1 of a repartitioned query (see [`crate::plan::repartition`]).
struct Repartition {
    /// The input topic.
    input: String,
    /// The internal topic, read by stage 2, and its number of partitions.
    topic: String,
    partitions: u32,
    /// The input topic's number of partitions.
    inputs: u32,
    keys: KeyPlan,
    /// Per input partition, the largest event time passed on in progress records.
    progress: HashMap<i32, i64>,
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
}

impl Running {
    /// The topic its instances read: its input, or its repartition topic.
    fn topic(&self) -> &str {
        match &self.repartition {
            Some(r) => &r.topic,
            None => &self.query.source().options.topic,
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
    source: KafkaSource,
    sink: KafkaSink,
    decoders: HashMap<String, JsonDecoder>,
    queries: Vec<Running>,
    /// The context the queries were planned in; partitions' instances are planned in it.
    ctx: StreamContext,
    /// Whether each query keeps one state per input partition, which moves with the
    /// partition when the group moves it (every query is partition-local); otherwise one
    /// state holds all partitions.
    partitioned: bool,
    /// The input partitions this member holds (assigned by the group and taken up).
    held: BTreeSet<(String, i32)>,
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
    /// Emit latency in seconds, labelled with the query's name, when it has one.
    emit_latency: Option<metrics::Histogram>,
    /// City gauges (LOS, ward AQI) from published indicators, when the query has a name.
    gauges: Option<CityGauges>,
    /// Checkpointing, when configured.
    checkpoints: Option<Checkpoints>,
}

/// A pipeline's checkpointing state.
struct Checkpoints {
    /// The pipeline's directory and checkpoints kept.
    dir: std::path::PathBuf,
    retain: usize,
    /// Where checkpoints go, with the number of the last one written or restored: one store
    /// in the directory itself when one state holds all partitions; one per input partition
    /// (sub-directory `<topic>.<partition>`) otherwise.
    stores: HashMap<Option<(String, i32)>, (CheckpointStore, u64)>,
    interval: Duration,
    last: std::time::Instant,
    /// While replaying after recovery in exactly-once mode.
    replay: Option<Replay>,
    /// When the replay reached the input's ends at recovery.
    caught_up: Option<std::time::Instant>,
}

impl Checkpoints {
    /// The store of `key` (a partition's; the one store when `None`), opened on first use.
    fn store(&mut self, key: &Option<(String, i32)>) -> Result<CheckpointStore> {
        if let Some((store, _)) = self.stores.get(key) {
            return Ok(store.clone());
        }
        let dir = match key {
            Some((topic, partition)) => self.dir.join(format!("{topic}.{partition}")),
            None => self.dir.clone(),
        };
        let store = CheckpointStore::open(dir, self.retain)?;
        self.stores.insert(key.clone(), (store.clone(), 0));
        Ok(store)
    }
}

/// The input positions of a checkpoint.
fn positions_of(manifest: &Manifest) -> Positions {
    manifest
        .positions
        .iter()
        .map(|p| ((p.topic.clone(), p.partition), p.offset))
        .collect()
}

/// `topic[0, 1], other[3]`, for logs and messages.
fn describe(list: &[(String, i32)]) -> String {
    let mut by_topic: BTreeMap<&str, Vec<i32>> = BTreeMap::new();
    for (topic, partition) in list {
        by_topic.entry(topic).or_default().push(*partition);
    }
    by_topic
        .into_iter()
        .map(|(topic, mut partitions)| {
            partitions.sort_unstable();
            let partitions: Vec<String> = partitions.iter().map(i32::to_string).collect();
            format!("{topic}[{}]", partitions.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// A replay after recovery in exactly-once mode.
struct Replay {
    /// The input ends at recovery: once every partition is read up to them, nothing
    /// published before the crash can be produced again, and suppression ends.
    until: Positions,
    /// Where the read-back of published outputs started. Checkpoints taken during the replay
    /// keep these as their output marks: records published after them and not yet replayed
    /// are still to be held back if this process dies too.
    marks: Vec<Position>,
}

impl Pipeline {
    /// Connects to Kafka, registers the city's tables and plans the default queries of
    /// `queries/`.
    pub async fn new(config: PipelineConfig, stats: Arc<PipelineStats>) -> Result<Self> {
        let schemas = SchemaRegistry::embedded()?;
        let ctx = match config.memory_limit {
            Some(limit) => city_context_in(
                StreamContext::with_memory_limit(limit)?,
                &config.topics,
                &schemas,
            )?,
            None => city_context(&config.topics, &schemas)?,
        };
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
        let emit_latency = config.name.as_ref().map(|name| {
            metrics::histogram!(crate::service::metrics::EMIT_LATENCY, "query" => name.clone())
        });
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
        // their plan allows (a windowed aggregation without detectors).
        for (i, running) in queries.iter_mut().enumerate() {
            if running.query.is_partition_local() || !running.query.is_repartitionable() {
                continue;
            }
            let (sql, source) = (
                running.query.sql().to_string(),
                running.query.source().clone(),
            );
            let Some(keys) = key_plan(&ctx, sql, source).await? else {
                continue;
            };
            let input = running.query.source().options.topic.clone();
            let topic = format!("{}.q{i}.repartition", config.group_id);
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
            });
        }
        // Every city input topic is decoded (and its bad records dead-lettered), read by a
        // query or not, when the default queries run; other queries' sources are decoded with
        // the schema their table declares.
        let mut decoders = HashMap::new();
        if config.default_queries {
            for (topic, schema) in [
                (&config.topics.camera, "camera_event"),
                (&config.topics.detectors, "detector_reading"),
                (&config.topics.air, "air_reading"),
            ] {
                decoders.insert(topic.clone(), JsonDecoder::new(schemas.get(schema)?));
            }
        }
        for running in &queries {
            let source = running.query.source();
            decoders
                .entry(source.options.topic.clone())
                .or_insert_with(|| JsonDecoder::new(source.topic_schema.clone()));
            if let Some(r) = &running.repartition {
                decoders.insert(
                    r.topic.clone(),
                    JsonDecoder::new(source.topic_schema.clone()),
                );
            }
        }
        let mut inputs: Vec<String> = decoders.keys().cloned().collect();
        inputs.sort();
        let mut source_config = KafkaSourceConfig::new(&config.brokers, inputs);
        source_config.group_id = config.group_id.clone();
        source_config.max_batch_rows = config.max_batch_rows;
        source_config.linger = config.linger;
        source_config.properties = config.properties.clone();
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
        let source = KafkaSource::new(source_config)?;
        let sink = KafkaSink::new(&sink_config)?;
        let partitioned = queries
            .iter()
            .all(|r| r.query.is_partition_local() || r.repartition.is_some());
        let checkpoints = match &config.checkpoint {
            Some(settings) => {
                let mut stores = HashMap::new();
                if !partitioned {
                    stores.insert(
                        None,
                        (CheckpointStore::open(&settings.dir, settings.retain)?, 0),
                    );
                }
                Some(Checkpoints {
                    dir: settings.dir.clone(),
                    retain: settings.retain,
                    stores,
                    interval: settings.interval,
                    last: std::time::Instant::now(),
                    replay: None,
                    caught_up: None,
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
        let mut pipeline = Self {
            source,
            sink,
            checkpoints,
            decoders,
            queries,
            ctx,
            partitioned,
            held: BTreeSet::new(),
            stats,
            next_offsets: HashMap::new(),
            committed: HashMap::new(),
            in_flight: Default::default(),
            committable_acked: HashMap::new(),
            last_commit: std::time::Instant::now(),
            reservation,
            emit_latency,
            gauges,
            config,
        };
        if pipeline.checkpoints.is_some() && !pipeline.partitioned {
            pipeline.recover().await?;
        }
        Ok(pipeline)
    }

    /// One state for all partitions: restores the newest checkpoint, if any, and places the
    /// source at its positions (at the group's positions otherwise); in exactly-once mode,
    /// reads back what the query published since the checkpoint so that the replay does not
    /// publish it again. Then writes a first checkpoint, so that a crash before the next one
    /// recovers from here.
    async fn recover(&mut self) -> Result<()> {
        let now = epoch_ms();
        let found = self.restore(None, now).await?;
        let (positions, marks) = match found {
            Some(manifest) => (positions_of(&manifest), Some(manifest.outputs)),
            None => {
                // A short blocking call at start: the group's committed offsets.
                let all = self.source.topic_partitions(Duration::from_secs(30))?;
                let positions = self
                    .source
                    .starting_positions(&all, Duration::from_secs(30))?;
                (positions, None)
            }
        };
        self.source.set_positions(positions.clone());
        if self.sink.is_transactional() {
            let inputs: Vec<(String, i32)> = positions.keys().cloned().collect();
            self.replay_from(marks, &inputs).await?;
        }
        self.checkpoint().await
    }

    /// Reads the newest checkpoint of `key`'s store (the one store when `None`) and restores
    /// it into the queries' instances for it; returns its manifest, if there was one.
    async fn restore(&mut self, key: Option<(String, i32)>, now: i64) -> Result<Option<Manifest>> {
        let Some(checkpoints) = &mut self.checkpoints else {
            return Ok(None);
        };
        let store = checkpoints.store(&key)?;
        let found = tokio::task::spawn_blocking(move || store.latest())
            .await
            .map_err(|e| Error::Checkpoint(format!("reading task failed: {e}")))??;
        let Some(checkpoint) = found else {
            return Ok(None);
        };
        let manifest = &checkpoint.manifest;
        let names: Vec<(&str, &str)> = manifest
            .queries
            .iter()
            .map(|q| (q.name.as_str(), q.sql.as_str()))
            .collect();
        let ours: Vec<(&str, &str)> = self
            .queries
            .iter()
            .filter(|r| key.as_ref().is_none_or(|(t, _)| r.topic() == t))
            .map(|r| (r.name.as_str(), r.query.sql()))
            .collect();
        if names != ours {
            return Err(Error::Checkpoint(format!(
                "{} was taken for other queries ({}) than these ({}); move the directory \
                 away to start from scratch",
                checkpoint.path.display(),
                names.iter().map(|n| n.0).collect::<Vec<_>>().join(", "),
                ours.iter().map(|n| n.0).collect::<Vec<_>>().join(", ")
            )));
        }
        let mut states = checkpoint.queries.iter();
        for running in &mut self.queries {
            let (instance, upstream) = match &key {
                None => (&mut running.query, None),
                Some((topic, partition)) => {
                    if running.topic() != topic {
                        continue;
                    }
                    match running.parts.get_mut(partition) {
                        Some(part) => (&mut part.query, Some(&mut part.upstream)),
                        None => continue,
                    }
                }
            };
            let Some(state) = states.next() else {
                break;
            };
            if let (Some(upstream), Some(seen)) = (upstream, state.meta.get("upstream")) {
                let seen: Vec<(i32, i64)> = serde_json::from_value(seen.clone())
                    .map_err(|e| Error::Checkpoint(format!("upstream offsets: {e}")))?;
                *upstream = seen.into_iter().collect();
            }
            instance.restore(state, now).map_err(|e| {
                Error::Checkpoint(format!(
                    "{}: query {}: {e}",
                    checkpoint.path.display(),
                    running.name
                ))
            })?;
        }
        if let Some(c) = &mut self.checkpoints
            && let Some(entry) = c.stores.get_mut(&key)
        {
            entry.1 = entry.1.max(manifest.epoch);
        }
        if let Ok(mut last) = self.stats.last_checkpoint.lock() {
            *last = Some(CheckpointInfo {
                epoch: manifest.epoch,
                at_ms: manifest.created_at_ms,
                bytes: manifest.files.iter().map(|f| f.1).sum(),
                duration_ms: 0,
                restored: true,
            });
        }
        info!(
            name = self.config.name.as_deref().unwrap_or("all"),
            epoch = manifest.epoch,
            path = %checkpoint.path.display(),
            partitions = manifest.positions.len(),
            "state restored from checkpoint"
        );
        Ok(Some(checkpoint.manifest))
    }

    /// Exactly-once: after restoring state for `inputs`, holds back what this query
    /// published after the output marks `marks` (everything it published, when `None`),
    /// until the replay has read `inputs` up to their present ends. Adds to a replay under way.
    async fn replay_from(
        &mut self,
        marks: Option<Vec<Position>>,
        inputs: &[(String, i32)],
    ) -> Result<()> {
        let marks = self.suppress_published(marks).await?;
        let until = self.source.end_offsets(inputs, Duration::from_secs(30))?;
        if let Some(c) = &mut self.checkpoints {
            match &mut c.replay {
                Some(replay) => {
                    replay.until.extend(until);
                    for mark in marks {
                        match replay
                            .marks
                            .iter_mut()
                            .find(|m| m.topic == mark.topic && m.partition == mark.partition)
                        {
                            Some(m) => m.offset = m.offset.min(mark.offset),
                            None => replay.marks.push(mark),
                        }
                    }
                }
                None => c.replay = Some(Replay { until, marks }),
            }
            c.caught_up = None;
        }
        Ok(())
    }

    /// Exactly-once recovery: the ids this query published after the checkpoint's output
    /// marks (all it published, without a checkpoint) are not published again.
    /// Returns where the read-back started, per output partition.
    async fn suppress_published(&mut self, marks: Option<Vec<Position>>) -> Result<Vec<Position>> {
        let query = self
            .config
            .name
            .clone()
            .unwrap_or_else(|| self.config.group_id.clone());
        let topics = self.output_topics();
        let probe = self.source.probe();
        let partitions = tokio::task::spawn_blocking(move || partitions_of(&probe, &topics))
            .await
            .map_err(|e| Error::Checkpoint(format!("metadata task failed: {e}")))??;
        let from: Vec<(String, i32, i64)> = partitions
            .into_iter()
            .map(|(t, p)| {
                let start = marks
                    .as_ref()
                    .and_then(|m| m.iter().find(|x| x.topic == t && x.partition == p))
                    .map_or(0, |x| x.offset);
                (t, p, start)
            })
            .collect();
        debug!(?from, "reading back outputs published after the checkpoint");
        let read_from = from
            .iter()
            .map(|(topic, partition, offset)| Position {
                topic: topic.clone(),
                partition: *partition,
                offset: *offset,
            })
            .collect();
        let (brokers, properties) = (self.config.brokers.clone(), self.config.properties.clone());
        let ids = tokio::task::spawn_blocking(move || {
            crate::sink::published_ids(
                &brokers,
                &properties,
                &query,
                &from,
                Duration::from_secs(60),
            )
        })
        .await
        .map_err(|e| Error::Checkpoint(format!("reading task failed: {e}")))??;
        let records: u32 = ids.values().sum();
        debug!(records, "outputs published after the checkpoint read back");
        if records > 0 {
            info!(
                records,
                "outputs published after the checkpoint will not be published again"
            );
        }
        self.sink.suppress(ids);
        Ok(read_from)
    }

    /// The topics this pipeline writes: its queries' sinks, the DLQ and the late topic.
    fn output_topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = self
            .queries
            .iter()
            .filter_map(|r| r.query.sink().map(|s| s.options.topic.clone()))
            .chain([
                self.config.topics.dlq.clone(),
                self.config.topics.late.clone(),
            ])
            .collect();
        topics.sort();
        topics.dedup();
        topics
    }

    /// Takes a checkpoint of everything this member holds: waits for every output's
    /// acknowledgement, commits the epoch's transaction (exactly-once) and writes state,
    /// positions and output marks; at-least-once, commits the positions to the group
    /// afterwards (for lag monitoring).
    async fn checkpoint(&mut self) -> Result<()> {
        self.checkpoint_of(None).await
    }

    /// [`Pipeline::checkpoint`], writing only the given partitions' checkpoints when the
    /// state is per partition (`None`: all held).
    async fn checkpoint_of(&mut self, only: Option<&[(String, i32)]>) -> Result<()> {
        if self.checkpoints.is_none() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        self.settle(true).await?;
        // The source's resume positions: the restored (or starting) ones, moved forward at
        // the end of every micro-batch processed.
        let positions = self.source.positions();
        if self.sink.is_transactional() {
            let group = self.source.group_metadata().ok_or_else(|| {
                Error::Checkpoint("the consumer has no group metadata yet".into())
            })?;
            self.sink.commit_epoch(&positions, group).await?;
        }
        let replay_marks = self
            .checkpoints
            .as_ref()
            .and_then(|c| c.replay.as_ref())
            .map(|r| r.marks.clone());
        let topics = self.output_topics();
        let probe = self.source.probe();
        let outputs = match replay_marks {
            Some(marks) => marks,
            None => tokio::task::spawn_blocking(move || -> Result<Vec<Position>> {
                use rdkafka::consumer::Consumer;
                let mut out = Vec::new();
                for (topic, partition) in partitions_of(&probe, &topics)? {
                    let (_, high) =
                        probe.fetch_watermarks(&topic, partition, Duration::from_secs(30))?;
                    out.push(Position {
                        topic,
                        partition,
                        offset: high,
                    });
                }
                Ok(out)
            })
            .await
            .map_err(|e| Error::Checkpoint(format!("output marks task failed: {e}")))??,
        };
        let now = epoch_ms();
        let targets: Vec<Option<(String, i32)>> = if self.partitioned {
            match only {
                Some(list) => list.iter().cloned().map(Some).collect(),
                None => self.held.iter().cloned().map(Some).collect(),
            }
        } else {
            vec![None]
        };
        let (mut epoch, mut bytes) = (0, 0);
        for key in targets {
            let mut states = Vec::new();
            let mut queries = Vec::new();
            for running in &mut self.queries {
                let (instance, upstream) = match &key {
                    None => (&mut running.query, None),
                    Some((topic, partition)) => {
                        if running.topic() != topic {
                            continue;
                        }
                        match running.parts.get_mut(partition) {
                            Some(part) => (&mut part.query, Some(&part.upstream)),
                            None => continue,
                        }
                    }
                };
                let mut state = instance.snapshot(now)?;
                if let (Some(upstream), Some(meta)) = (upstream, state.meta.as_object_mut())
                    && running.repartition.is_some()
                {
                    let seen: Vec<(i32, i64)> = upstream.iter().map(|(p, o)| (*p, *o)).collect();
                    meta.insert("upstream".into(), serde_json::json!(seen));
                }
                states.push(state);
                queries.push(QueryManifest {
                    name: running.name.clone(),
                    sql: running.query.sql().to_string(),
                    meta: serde_json::Value::Null,
                });
            }
            let mut sorted: Vec<Position> = positions
                .iter()
                .filter(|(k, _)| key.as_ref().is_none_or(|key| key == *k))
                .map(|((topic, partition), offset)| Position {
                    topic: topic.clone(),
                    partition: *partition,
                    offset: *offset,
                })
                .collect();
            sorted.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
            let Some(c) = &mut self.checkpoints else {
                return Ok(());
            };
            let store = c.store(&key)?;
            let last_epoch = c.stores.get(&key).map_or(0, |s| s.1);
            let manifest = Manifest {
                version: 0,
                epoch: last_epoch + 1,
                created_at_ms: now,
                positions: sorted,
                outputs: outputs.clone(),
                queries,
                files: Vec::new(),
            };
            let written = tokio::task::spawn_blocking(move || store.write(manifest, states))
                .await
                .map_err(|e| Error::Checkpoint(format!("writing task failed: {e}")))??;
            if let Some(entry) = c.stores.get_mut(&key) {
                entry.1 = written.epoch;
            }
            epoch = epoch.max(written.epoch);
            bytes += written.bytes;
        }
        if let Some(c) = &mut self.checkpoints {
            c.last = std::time::Instant::now();
        }
        if !self.sink.is_transactional() {
            // For lag monitoring: the positions of the partitions this member holds (a commit
            // before the group has assigned any would be refused).
            let assigned: std::collections::HashSet<(String, i32)> =
                self.source.assignment().into_iter().collect();
            let commit: HashMap<(Arc<str>, i32), i64> = positions
                .iter()
                .filter(|(k, _)| assigned.contains(*k))
                .map(|((t, p), o)| ((Arc::from(t.as_str()), *p), *o))
                .collect();
            self.source.commit(&commit)?;
        }
        let duration_ms = started.elapsed().as_millis() as u64;
        debug!(epoch, bytes, duration_ms, "checkpoint written");
        if let Ok(mut last) = self.stats.last_checkpoint.lock() {
            *last = Some(CheckpointInfo {
                epoch,
                at_ms: now,
                bytes,
                duration_ms,
                restored: false,
            });
        }
        Ok(())
    }

    /// Carries out the group's partition changes since the last micro-batch: takes up newly
    /// assigned partitions (restoring their state) and lets revoked ones go (checkpointing
    /// theirs first). Partitions lost with the group session stop the pipeline
    /// ([`Error::Rebalanced`]), to start again from its checkpoints or committed offsets: the
    /// group may have given them to another member already.
    async fn rebalance(&mut self) -> Result<()> {
        for change in self.source.rebalances() {
            match change {
                PartitionChange::Assigned(list) => self.take(list).await?,
                PartitionChange::Revoked(list) => self.release(list).await?,
                PartitionChange::Lost(list) => {
                    return Err(Error::Rebalanced(format!(
                        "the session in consumer group {} expired and its partitions were lost \
                         ({})",
                        self.config.group_id,
                        describe(&list)
                    )));
                }
            }
        }
        Ok(())
    }

    /// Takes up partitions the group assigned: with one state per partition, plans each
    /// query's instance for it and restores its newest checkpoint (exactly-once: holding
    /// back what was published after it); then starts fetching them, each at its restored
    /// position (its committed offset otherwise), and checkpoints them at once.
    async fn take(&mut self, list: Vec<(String, i32)>) -> Result<()> {
        if !self.partitioned {
            // One state for all partitions: the positions restored at start apply.
            self.source.assign(&list)?;
            self.held.extend(list);
            return Ok(());
        }
        let now = epoch_ms();
        let mut positions = Positions::new();
        let mut marks: Option<Vec<Position>> = None;
        let mut restored = Vec::new();
        let mut fresh = Vec::new();
        for key in &list {
            self.ensure_parts(key, now).await?;
            if self.checkpoints.is_none() {
                continue;
            }
            match self.restore(Some(key.clone()), now).await? {
                Some(manifest) => {
                    positions.extend(positions_of(&manifest));
                    let m = marks.get_or_insert_with(|| manifest.outputs.clone());
                    for mark in &manifest.outputs {
                        match m
                            .iter_mut()
                            .find(|x| x.topic == mark.topic && x.partition == mark.partition)
                        {
                            Some(x) => x.offset = x.offset.min(mark.offset),
                            None => m.push(mark.clone()),
                        }
                    }
                    restored.push(key.clone());
                }
                None => fresh.push(key.clone()),
            }
        }
        if !fresh.is_empty() {
            positions.extend(
                self.source
                    .starting_positions(&fresh, Duration::from_secs(30))?,
            );
        }
        let mut all = self.source.positions();
        all.extend(positions);
        self.source.set_positions(all);
        if self.sink.is_transactional() && !restored.is_empty() {
            self.replay_from(marks, &restored).await?;
        }
        self.source.assign(&list)?;
        info!(
            name = self.config.name.as_deref().unwrap_or("all"),
            partitions = %describe(&list),
            restored = restored.len(),
            "partitions taken up"
        );
        self.held.extend(list.iter().cloned());
        self.checkpoint_of(Some(&list)).await
    }

    /// Lets partitions the group revoked go: with one state per partition, checkpoints their
    /// state (or, without checkpoints, commits their offsets, held back to what their open
    /// windows need) once every output is acknowledged, drops it and releases them. With one
    /// state for all partitions the pipeline cannot go on: without checkpoints it starts
    /// again from its committed offsets; with them, the query fails with the reason.
    async fn release(&mut self, list: Vec<(String, i32)>) -> Result<()> {
        let group = &self.config.group_id;
        if !self.partitioned {
            if self.checkpoints.is_none() {
                return Err(Error::Rebalanced(format!(
                    "another member of consumer group {group} took partitions from this one"
                )));
            }
            return Err(Error::Checkpoint(format!(
                "another process joined consumer group {group} and took partitions ({}) from \
                 this one; this query groups by something other than its input topic's key, \
                 so one state holds all its partitions and it runs in one process per group",
                describe(&list)
            )));
        }
        if self.checkpoints.is_some() {
            self.checkpoint_of(Some(&list)).await?;
        } else {
            self.settle(true).await?;
            let committable = self.committable();
            let revoked: HashMap<(Arc<str>, i32), i64> = committable
                .into_iter()
                .filter(|((t, p), _)| list.iter().any(|(lt, lp)| **t == **lt && p == lp))
                .collect();
            self.source.commit_sync(&revoked)?;
        }
        for running in &mut self.queries {
            for (topic, partition) in &list {
                if running.topic() == topic {
                    running.parts.remove(partition);
                }
            }
        }
        let keys: Vec<(Arc<str>, i32)> = list
            .iter()
            .map(|(t, p)| (Arc::from(t.as_str()), *p))
            .collect();
        for key in &keys {
            self.next_offsets.remove(key);
            self.committed.remove(key);
            self.committable_acked.remove(key);
        }
        if let Some(replay) = self.checkpoints.as_mut().and_then(|c| c.replay.as_mut()) {
            for key in &list {
                replay.until.remove(key);
            }
        }
        for key in &list {
            self.held.remove(key);
        }
        self.source.forget_positions(&list);
        self.source.unassign(&list)?;
        info!(
            name = self.config.name.as_deref().unwrap_or("all"),
            partitions = %describe(&list),
            "partitions handed on"
        );
        Ok(())
    }

    /// Plans, for each query reading `key`'s topic, its instance for `key`'s partition if
    /// it has none yet.
    async fn ensure_parts(&mut self, key: &(String, i32), now: i64) -> Result<()> {
        for running in &mut self.queries {
            if running.topic() != key.0 || running.parts.contains_key(&key.1) {
                continue;
            }
            let mut query = running.query.replan(&self.ctx).await?;
            if let Some(r) = &running.repartition {
                query.set_owner(r.partitions, u32::try_from(key.1).unwrap_or_default());
                query.expect_inputs(r.inputs, now);
            }
            running.parts.insert(
                key.1,
                Part {
                    query,
                    since_ms: now,
                    upstream: BTreeMap::new(),
                },
            );
        }
        Ok(())
    }

    /// Ends output suppression once the replay after recovery has read every input partition
    /// up to where it ended at recovery.
    fn check_replay(&mut self) {
        let Some(c) = &mut self.checkpoints else {
            return;
        };
        let Some(replay) = &c.replay else {
            return;
        };
        let positions = self.source.positions();
        let caught_up = replay
            .until
            .iter()
            .all(|(key, end)| positions.get(key).is_some_and(|p| p >= end));
        // Outputs due on processing time (windows closed by a partition going idle, early
        // fires) come after the input has caught up: suppression lasts until every record read
        // back has come again, or for a grace period after catching up.
        let done = match (caught_up, c.caught_up) {
            (false, _) => false,
            (true, None) => {
                c.caught_up = Some(std::time::Instant::now());
                !self.sink.is_suppressing()
            }
            (true, Some(at)) => !self.sink.is_suppressing() || at.elapsed() >= REPLAY_GRACE,
        };
        if done {
            c.caught_up = None;
            c.replay = None;
            let (suppressed, left) = self.sink.end_suppression();
            info!(
                suppressed,
                left,
                "replay after recovery done: outputs published before the restart were not published again"
            );
        }
    }

    /// Runs until `stop` is set, then publishes what is pending, flushes and commits.
    pub async fn run(mut self, stop: Arc<AtomicBool>) -> Result<()> {
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
            let batches = self.source.next_batches(Duration::from_millis(200)).await?;
            let read = waited.elapsed();
            let stepped = std::time::Instant::now();
            let records: usize = batches.iter().map(RawBatch::len).sum();
            if let Err(e) = self.step(batches).await {
                return Err(self.resource_error(e));
            }
            self.rebalance().await?;
            self.check_replay();
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
                self.source.measure_lag(self.stats.consumer_lag.clone());
            }
        }
        self.sink.flush(Duration::from_secs(10))?;
        self.settle(true).await?;
        self.checkpoint().await?;
        info!(
            name = self.config.name.as_deref().unwrap_or("all"),
            "pipeline stopped"
        );
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
        let mut rows_out = 0;
        let mut windowed_out = 0;
        let first_received = batches.iter().filter_map(|b| b.first_received).min();
        let topics = self.config.topics.clone();
        let batches = if self.partitioned {
            // Records of partitions handed on meanwhile are the new owner's to process.
            let batches: Vec<RawBatch> = batches.into_iter().map(|b| self.held_only(b)).collect();
            for raw in &batches {
                let mut seen: Vec<i32> = raw.partitions.clone();
                seen.sort_unstable();
                seen.dedup();
                for p in seen {
                    self.ensure_parts(&(raw.topic.to_string(), p), now).await?;
                }
            }
            batches
        } else {
            batches
        };
        // The instances fed in this step, by (query, partition; -1 for all).
        let mut fed: std::collections::HashSet<(usize, i32)> = Default::default();
        for raw in &batches {
            self.stats
                .records_in
                .fetch_add(raw.len() as u64, Ordering::Relaxed);
            let Some(decoder) = self.decoders.get(raw.topic.as_ref()) else {
                continue;
            };
            let decoded = decoder.decode(raw)?;
            if !decoded.rejects.is_empty() {
                let records: Vec<_> = decoded
                    .rejects
                    .iter()
                    .map(|r| {
                        let key = raw.key(r.index as usize).map(<[u8]>::to_vec);
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
                let targets = r.keys.targets(&decoded.batch, r.partitions).await?;
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
                    for q in 0..r.partitions {
                        self.sink
                            .send_to_partition(
                                &r.topic,
                                q as i32,
                                None,
                                &[],
                                &[(PROGRESS_HEADER, &progress)],
                                &mut pending,
                            )
                            .await?;
                    }
                }
            }
            // Row indices of the decoded batch per instance: per partition, or all together.
            let mut splits: BTreeMap<i32, Vec<u32>> = BTreeMap::new();
            for (i, p) in partitions.iter().enumerate() {
                let key = if self.partitioned { *p } else { -1 };
                splits.entry(key).or_default().push(i as u32);
            }
            for (qi, running) in self.queries.iter_mut().enumerate() {
                if running.topic() != &*raw.topic {
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
                    // offset; one passed on again after a failover of stage 1 is dropped.
                    let mut origins: Vec<(i32, i64)> = Vec::new();
                    let rows: Vec<u32> = match (repartitioned, upstream) {
                        (true, Some(upstream)) => rows
                            .iter()
                            .copied()
                            .filter(|&r| {
                                let Some(&(p, o)) =
                                    raw.origins.get(decoded.rows[r as usize] as usize)
                                else {
                                    return false;
                                };
                                let next = upstream.entry(p).or_insert(0);
                                if o < *next {
                                    return false;
                                }
                                *next = o + 1;
                                origins.push((p, o));
                                true
                            })
                            .collect(),
                        _ => rows.clone(),
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
                        origins.iter().map(|o| o.0).collect()
                    } else {
                        sub_partitions
                    };
                    let out = instance
                        .process(&batch, &sub_partitions, Some(&sub_offsets), now)
                        .await?;
                    if !out.diverted.is_empty() {
                        let records: Vec<_> = out
                            .diverted
                            .iter()
                            .map(|d| {
                                let i = decoded.rows[rows[d.row as usize] as usize] as usize;
                                // A repartitioned record is reported where it came from.
                                let (topic, partition, offset) = match &running.repartition {
                                    Some(r) => {
                                        let (p, o) = origins[d.row as usize];
                                        (r.input.clone(), p, o)
                                    }
                                    None => {
                                        (raw.topic.to_string(), raw.partitions[i], raw.offsets[i])
                                    }
                                };
                                let record = LateRecord {
                                    query: running.name.clone(),
                                    topic,
                                    partition,
                                    offset,
                                    event_time: d.event_time,
                                    watermark: d.watermark.max(0),
                                    reason: d.reason.as_str().into(),
                                    payload: BASE64.encode(raw.value(i)),
                                };
                                (raw.key(i).map(<[u8]>::to_vec), record)
                            })
                            .collect();
                        late_count += records.len();
                        self.sink
                            .send_json(&topics.late, &records, &mut pending)
                            .await?;
                    }
                    let published = publish(
                        &self.sink,
                        running.query.sink().cloned(),
                        out.rows,
                        &mut pending,
                        self.gauges.as_ref(),
                    )
                    .await?;
                    rows_out += published;
                    if running.query.is_windowed() {
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
                        part.query
                            .observe(progress.input_partition, progress.max_event_ms, now);
                    }
                }
                let next = self
                    .next_offsets
                    .entry((raw.topic.clone(), progress.partition))
                    .or_insert(progress.offset + 1);
                *next = (*next).max(progress.offset + 1);
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
                    outputs.push(running.query.tick(now).await?);
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
                            outputs.push(part.query.advance_watermark(w, now).await?);
                        }
                        _ if !fed.contains(&(qi, *partition)) => {
                            outputs.push(part.query.tick(now).await?);
                        }
                        _ => {}
                    }
                }
            }
            for out in outputs {
                let published = publish(
                    &self.sink,
                    sink.clone(),
                    out.rows,
                    &mut pending,
                    self.gauges.as_ref(),
                )
                .await?;
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
        if let Some(w) = self
            .queries
            .iter()
            .flat_map(|r| r.instances())
            .filter_map(|q| q.watermark())
            .min()
        {
            self.stats.watermark_ms.store(w, Ordering::Relaxed);
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

    /// The records of `raw` from partitions this member holds.
    fn held_only(&self, raw: RawBatch) -> RawBatch {
        let topic = raw.topic.to_string();
        let held = |p: i32| self.held.contains(&(topic.clone(), p));
        if raw.partitions.iter().all(|p| held(*p)) && raw.progress.iter().all(|p| held(p.partition))
        {
            return raw;
        }
        let mut out = RawBatch::new(raw.topic.clone());
        out.first_received = raw.first_received;
        for i in 0..raw.len() {
            if held(raw.partitions[i]) {
                out.push_from(&raw, i);
            }
        }
        out.progress = raw
            .progress
            .iter()
            .filter(|p| held(p.partition))
            .copied()
            .collect();
        debug!(
            dropped = raw.len() - out.len(),
            "records of partitions handed on left to their new owner"
        );
        out
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
    /// memory pool or the cap on groups.
    fn check_limits(&mut self) -> Result<()> {
        let instances = || self.queries.iter().flat_map(|r| r.instances());
        let groups: usize = instances().map(|q| q.state_groups()).sum();
        let bytes: usize = instances().map(|q| q.state_bytes()).sum();
        self.stats
            .state_groups
            .store(groups as u64, Ordering::Relaxed);
        self.stats
            .state_bytes
            .store(bytes as u64, Ordering::Relaxed);
        if let Some(max) = self.config.max_state_groups
            && groups > max
        {
            return Err(Error::ResourceLimit(format!(
                "state holds {groups} (window, group) partials, over the cap of {max} \
                 (queries.max_state_groups)"
            )));
        }
        if let Some(reservation) = &mut self.reservation
            && let Err(e) = reservation.try_resize(bytes)
        {
            let limit = self.config.memory_limit.unwrap_or_default();
            return Err(Error::ResourceLimit(format!(
                "window state of {bytes} bytes in {groups} groups does not fit the query's \
                 memory limit of {limit} bytes ({e})"
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
        let mut out = HashMap::new();
        for ((topic, partition), next) in &self.next_offsets {
            let mut offset = *next;
            for running in &self.queries {
                if running.topic() != &**topic {
                    continue;
                }
                for instance in running.instances() {
                    let held = instance.held_offsets();
                    // Stage 2 of a repartitioned query keys its held offsets (of its own
                    // partition) by input partition.
                    let held = match running.repartition {
                        Some(_) => held.values().min().copied(),
                        None => held.get(partition).copied(),
                    };
                    if let Some(held) = held {
                        offset = offset.min(held);
                    }
                }
            }
            out.insert((topic.clone(), *partition), offset);
        }
        out
    }
}

/// The partitions of `topics` (a topic not yet created has none). Blocking.
fn partitions_of(
    probe: &rdkafka::consumer::BaseConsumer,
    topics: &[String],
) -> Result<Vec<(String, i32)>> {
    use rdkafka::consumer::Consumer;
    let mut out = Vec::new();
    for topic in topics {
        let metadata = probe.fetch_metadata(Some(topic), Duration::from_secs(30))?;
        for t in metadata.topics() {
            if t.error().is_some() {
                continue;
            }
            out.extend(
                t.partitions()
                    .iter()
                    .map(|p| (t.name().to_string(), p.id())),
            );
        }
    }
    Ok(out)
}

/// Per partition, the largest event time of the rows of `batch` (`partitions[i]` is row i's)
/// not later than `limit`.
fn event_time_maxima(
    batch: &RecordBatch,
    time: &str,
    partitions: &[i32],
    limit: i64,
) -> Result<HashMap<i32, i64>> {
    use datafusion::arrow::array::{Array, TimestampMillisecondArray};
    use datafusion::arrow::datatypes::{DataType, TimeUnit};
    let mut out = HashMap::new();
    let Some(column) = batch.column_by_name(time) else {
        return Ok(out);
    };
    let column = datafusion::arrow::compute::cast(
        column,
        &DataType::Timestamp(TimeUnit::Millisecond, None),
    )?;
    let Some(times) = column.as_any().downcast_ref::<TimestampMillisecondArray>() else {
        return Ok(out);
    };
    for (r, t) in times.iter().enumerate() {
        if let (Some(t), Some(p)) = (t, partitions.get(r))
            && t <= limit
        {
            let m = out.entry(*p).or_insert(t);
            *m = (*m).max(t);
        }
    }
    Ok(out)
}

/// Creates the repartition topic `topic` for input `input` with as many partitions as the
/// input, unless it exists (through the admin API; a broker without it, like the embedded
/// one, creates it on first use); returns how many partitions it and the input have.
async fn repartition_topic(
    config: &PipelineConfig,
    input: &str,
    topic: &str,
) -> Result<(u32, u32)> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let client = |auto_create: bool| {
        let mut client = rdkafka::ClientConfig::new();
        client
            .set("bootstrap.servers", &config.brokers)
            .set("allow.auto.create.topics", auto_create.to_string());
        for (k, v) in &config.properties {
            client.set(k, v);
        }
        client
    };
    let count = |probe: &BaseConsumer, name: &str| -> Result<usize> {
        let metadata = probe.fetch_metadata(Some(name), Duration::from_secs(10))?;
        Ok(metadata
            .topics()
            .iter()
            .filter(|t| t.error().is_none())
            .map(|t| t.partitions().len())
            .sum())
    };
    let probe: BaseConsumer = client(false).create()?;
    let inputs = count(&probe, input)?.max(1);
    let existing = count(&probe, topic)?;
    if existing > 0 {
        return Ok((existing as u32, inputs as u32));
    }
    let admin: AdminClient<DefaultClientContext> = client(false).create()?;
    let new = NewTopic::new(topic, inputs as i32, TopicReplication::Fixed(1));
    let options = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(5)))
        .request_timeout(Some(Duration::from_secs(5)));
    if let Err(e) = admin.create_topics([&new], &options).await {
        debug!(%topic, error = %e, "repartition topic not created through the admin API");
    }
    let creator: BaseConsumer = client(true).create()?;
    for _ in 0..50 {
        let n = count(&creator, topic)?;
        if n > 0 {
            return Ok((n as u32, inputs as u32));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(Error::Config(format!(
        "repartition topic {topic} could not be created; create it with {inputs} partitions"
    )))
}

/// Publishes a query's result rows to its sink topic, keyed by the sink's key column.
async fn publish(
    sink: &KafkaSink,
    table: Option<Arc<StreamTable>>,
    rows: Vec<RecordBatch>,
    pending: &mut Pending,
    gauges: Option<&CityGauges>,
) -> Result<usize> {
    let Some(table) = table else { return Ok(0) };
    let mut n = 0;
    for batch in rows {
        let batch = conform_stream(&batch, &table.topic_schema)?;
        n += batch.num_rows();
        if let Some(gauges) = gauges {
            gauges.observe(&table.options.topic, &batch);
        }
        sink.send_rows(
            &table.options.topic,
            &batch,
            table.options.key.as_deref(),
            pending,
        )
        .await?;
    }
    Ok(n)
}

/// Wall-clock time, epoch ms.
pub fn epoch_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
