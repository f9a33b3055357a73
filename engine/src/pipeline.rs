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

use std::collections::HashMap;
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
use crate::plan::stream::StreamContext;
use crate::plan::stream::StreamQuery;
use crate::plan::table::StreamTable;
use crate::plan::{city_context, city_context_in, default_queries, plan_all};
use crate::schema::SchemaRegistry;
use crate::service::metrics::CityGauges;
use crate::sink::{DlqRecord, KafkaSink, KafkaSinkConfig, LateRecord, Pending, conform_stream};
use crate::source::{KafkaSource, KafkaSourceConfig, Positions, RawBatch};
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
    /// Input partitions assigned to this process by the consumer group (checked about once a
    /// second).
    pub assigned_partitions: AtomicU64,
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
    query: StreamQuery,
}

/// The pipeline with its Kafka clients and query state.
pub struct Pipeline {
    config: PipelineConfig,
    source: KafkaSource,
    sink: KafkaSink,
    decoders: HashMap<String, JsonDecoder>,
    queries: Vec<Running>,
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
    store: CheckpointStore,
    interval: Duration,
    /// Number of the last checkpoint written or restored.
    epoch: u64,
    last: std::time::Instant,
    /// While replaying after recovery in exactly-once mode.
    replay: Option<Replay>,
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
                queries.push(Running { name, query });
            }
        }
        for (name, sql) in &config.queries {
            for query in plan_all(&ctx, sql).await? {
                queries.push(Running {
                    name: name.clone(),
                    query,
                });
            }
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
        let checkpoints = match &config.checkpoint {
            Some(settings) => Some(Checkpoints {
                store: CheckpointStore::open(&settings.dir, settings.retain)?,
                interval: settings.interval,
                epoch: 0,
                last: std::time::Instant::now(),
                replay: None,
            }),
            None => None,
        };
        let mut pipeline = Self {
            source,
            sink,
            checkpoints,
            decoders,
            queries,
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
        if pipeline.checkpoints.is_some() {
            pipeline.recover().await?;
        }
        Ok(pipeline)
    }

    /// Restores the newest checkpoint, if any, and places the source at its positions (at
    /// the group's positions otherwise); in exactly-once mode, reads back what the query
    /// published since the checkpoint so that the replay does not publish it again. Then
    /// writes a first checkpoint, so that a crash before the next one recovers from here.
    async fn recover(&mut self) -> Result<()> {
        let Some(checkpoints) = &self.checkpoints else {
            return Ok(());
        };
        let store = checkpoints.store.clone();
        let found = tokio::task::spawn_blocking(move || store.latest())
            .await
            .map_err(|e| Error::Checkpoint(format!("reading task failed: {e}")))??;
        let now = epoch_ms();
        let (positions, marks, epoch) = match &found {
            Some(checkpoint) => {
                let manifest = &checkpoint.manifest;
                let names: Vec<(&str, &str)> = manifest
                    .queries
                    .iter()
                    .map(|q| (q.name.as_str(), q.sql.as_str()))
                    .collect();
                let ours: Vec<(&str, &str)> = self
                    .queries
                    .iter()
                    .map(|r| (r.name.as_str(), r.query.sql()))
                    .collect();
                if names != ours {
                    return Err(Error::Checkpoint(format!(
                        "{} was taken for other queries ({}) than these ({}); move the \
                         directory away to start from scratch",
                        checkpoint.path.display(),
                        names.iter().map(|n| n.0).collect::<Vec<_>>().join(", "),
                        ours.iter().map(|n| n.0).collect::<Vec<_>>().join(", ")
                    )));
                }
                for (running, state) in self.queries.iter_mut().zip(&checkpoint.queries) {
                    running.query.restore(state, now).map_err(|e| {
                        Error::Checkpoint(format!(
                            "{}: query {}: {e}",
                            checkpoint.path.display(),
                            running.name
                        ))
                    })?;
                }
                let positions: Positions = manifest
                    .positions
                    .iter()
                    .map(|p| ((p.topic.clone(), p.partition), p.offset))
                    .collect();
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
                    partitions = positions.len(),
                    "state restored from checkpoint"
                );
                (positions, Some(manifest.outputs.clone()), manifest.epoch)
            }
            None => {
                // A short blocking call at start: the group's committed offsets.
                let positions = self.source.starting_positions(Duration::from_secs(30))?;
                (positions, None, 0)
            }
        };
        self.source.set_positions(positions.clone());
        if self.sink.is_transactional() {
            let marks = self.suppress_published(marks).await?;
            let inputs: Vec<(String, i32)> = positions.keys().cloned().collect();
            let until = self.source.end_offsets(&inputs, Duration::from_secs(30))?;
            if let Some(c) = &mut self.checkpoints {
                c.replay = Some(Replay { until, marks });
            }
        }
        if let Some(c) = &mut self.checkpoints {
            c.epoch = epoch;
        }
        self.checkpoint().await
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

    /// Takes a checkpoint: waits for every output's acknowledgement, commits the epoch's
    /// transaction (exactly-once) and writes state, positions and output marks; at-least-once,
    /// commits the positions to the group afterwards (for lag monitoring).
    async fn checkpoint(&mut self) -> Result<()> {
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
        let mut states = Vec::with_capacity(self.queries.len());
        let mut queries = Vec::with_capacity(self.queries.len());
        for running in &mut self.queries {
            states.push(running.query.snapshot(now)?);
            queries.push(QueryManifest {
                name: running.name.clone(),
                sql: running.query.sql().to_string(),
                meta: serde_json::Value::Null,
            });
        }
        let Some(c) = &mut self.checkpoints else {
            return Ok(());
        };
        let mut sorted: Vec<Position> = positions
            .iter()
            .map(|((topic, partition), offset)| Position {
                topic: topic.clone(),
                partition: *partition,
                offset: *offset,
            })
            .collect();
        sorted.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        let manifest = Manifest {
            version: 0,
            epoch: c.epoch + 1,
            created_at_ms: now,
            positions: sorted,
            outputs,
            queries,
            files: Vec::new(),
        };
        let store = c.store.clone();
        let written = tokio::task::spawn_blocking(move || store.write(manifest, states))
            .await
            .map_err(|e| Error::Checkpoint(format!("writing task failed: {e}")))??;
        c.epoch = written.epoch;
        c.last = std::time::Instant::now();
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
        debug!(
            epoch = written.epoch,
            bytes = written.bytes,
            duration_ms,
            "checkpoint written"
        );
        if let Ok(mut last) = self.stats.last_checkpoint.lock() {
            *last = Some(CheckpointInfo {
                epoch: written.epoch,
                at_ms: now,
                bytes: written.bytes,
                duration_ms,
                restored: false,
            });
        }
        Ok(())
    }

    /// Stops the pipeline when the group took partitions from it. State is one state for all
    /// of a query's partitions, so it cannot follow a partition to another member: without
    /// checkpoints the pipeline starts again from the committed offsets (held back to what
    /// open windows need), and windows open at that moment are published again in full
    /// rather than in part; with checkpoints, a session lost (broker unreachable) starts it
    /// again from its checkpoint, and partitions taken by another process fail the query.
    fn check_assignment(&self) -> Result<()> {
        let group = &self.config.group_id;
        if self.source.partitions_lost() {
            return Err(Error::Rebalanced(format!(
                "the session in consumer group {group} expired and its partitions were lost"
            )));
        }
        if !self.source.partitions_revoked() {
            return Ok(());
        }
        if self.checkpoints.is_none() {
            return Err(Error::Rebalanced(format!(
                "another member of consumer group {group} took partitions from this one"
            )));
        }
        Err(Error::Checkpoint(format!(
            "another process joined consumer group {group} and took partitions from this one; \
             a checkpointed query keeps one state for all its partitions and runs in one \
             process per group (set checkpoint.enabled = false to share a group, \
             at-least-once)"
        )))
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
        if caught_up {
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
            self.check_assignment()?;
            let read = waited.elapsed();
            let stepped = std::time::Instant::now();
            let records: usize = batches.iter().map(RawBatch::len).sum();
            if let Err(e) = self.step(batches).await {
                return Err(self.resource_error(e));
            }
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
            for running in &mut self.queries {
                if running.query.source().options.topic != *raw.topic {
                    continue;
                }
                let out = running
                    .query
                    .process(&decoded.batch, &partitions, Some(&offsets), now)
                    .await?;
                if !out.diverted.is_empty() {
                    let records: Vec<_> = out
                        .diverted
                        .iter()
                        .map(|d| {
                            let i = decoded.rows[d.row as usize] as usize;
                            let record = LateRecord {
                                query: running.name.clone(),
                                topic: raw.topic.to_string(),
                                partition: raw.partitions[i],
                                offset: raw.offsets[i],
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
            for (p, o) in raw.partitions.iter().zip(&raw.offsets) {
                let next = self
                    .next_offsets
                    .entry((raw.topic.clone(), *p))
                    .or_insert(o + 1);
                *next = (*next).max(o + 1);
            }
        }
        if batches.is_empty() {
            // No input: idle partitions and early fires may still make results due.
            for running in &mut self.queries {
                let out = running.query.tick(now).await?;
                rows_out += publish(
                    &self.sink,
                    running.query.sink().cloned(),
                    out.rows,
                    &mut pending,
                    self.gauges.as_ref(),
                )
                .await?;
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
            .filter_map(|r| r.query.watermark())
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
        let groups: usize = self.queries.iter().map(|r| r.query.state_groups()).sum();
        let bytes: usize = self.queries.iter().map(|r| r.query.state_bytes()).sum();
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
                if running.query.source().options.topic == **topic
                    && let Some(held) = running.query.held_offsets().get(partition)
                {
                    offset = offset.min(*held);
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
