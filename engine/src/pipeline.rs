//! The running pipeline: source → decode → time → plan → state → sink, and offset commits.
//!
//! [`Pipeline::run`] loops over micro-batches: decode each topic's records (bad ones to the
//! DLQ), feed camera events to the congestion query, publish the windows it closes and the
//! events it found late, wait until the broker has acknowledged all of that, and only then
//! commit the input offsets. For the camera topic the committed offset never passes the oldest
//! event still held in an open window, so a restart re-reads every event whose window has
//! not been published yet (at-least-once).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use tracing::{debug, info};

use crate::decode::JsonDecoder;
use crate::error::Result;
use crate::plan::{CongestionQuery, EventTimeConfig};
use crate::schema::{SchemaRegistry, TopicSchema};
use crate::sink::{DlqRecord, KafkaSink, KafkaSinkConfig, LateRecord, Pending, conform};
use crate::source::{KafkaSource, KafkaSourceConfig, RawBatch};

/// Topic names. All configurable; the defaults are the city's.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// Event-time settings of the congestion query.
    pub event_time: EventTimeConfig,
    /// Source batch size in records.
    pub max_batch_rows: usize,
    /// Source linger.
    pub linger: Duration,
    /// Extra librdkafka properties for consumer and producer.
    pub properties: Vec<(String, String)>,
}

impl PipelineConfig {
    /// Defaults for `brokers`.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            group_id: "urbanstream".into(),
            topics: Topics::default(),
            event_time: EventTimeConfig::default(),
            max_batch_rows: 8192,
            linger: Duration::from_millis(20),
            properties: Vec::new(),
        }
    }
}

/// Live counters of a pipeline, shared with views and tests.
#[derive(Debug, Default)]
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
    /// Congestion query watermark, epoch ms (`i64::MIN` before any event).
    pub watermark_ms: AtomicI64,
    /// (window, segment) groups held in state.
    pub state_groups: AtomicU64,
}

impl PipelineStats {
    /// New counters; the watermark starts unset.
    pub fn new() -> Self {
        let s = Self::default();
        s.watermark_ms.store(i64::MIN, Ordering::Relaxed);
        s
    }
}

/// The pipeline with its Kafka clients and query state.
pub struct Pipeline {
    config: PipelineConfig,
    source: KafkaSource,
    sink: KafkaSink,
    decoders: HashMap<String, JsonDecoder>,
    congestion_schema: Arc<TopicSchema>,
    query: CongestionQuery,
    stats: Arc<PipelineStats>,
    /// Next offset to read, per (topic, partition), of everything processed so far.
    next_offsets: HashMap<(Arc<str>, i32), i64>,
    committed: HashMap<(Arc<str>, i32), i64>,
}

impl Pipeline {
    /// Connects to Kafka and prepares decoders and the query.
    pub fn new(config: PipelineConfig, stats: Arc<PipelineStats>) -> Result<Self> {
        let schemas = SchemaRegistry::embedded()?;
        let mut decoders = HashMap::new();
        decoders.insert(
            config.topics.camera.clone(),
            JsonDecoder::new(schemas.get("camera_event")?),
        );
        decoders.insert(
            config.topics.detectors.clone(),
            JsonDecoder::new(schemas.get("detector_reading")?),
        );
        decoders.insert(
            config.topics.air.clone(),
            JsonDecoder::new(schemas.get("air_reading")?),
        );
        let mut source_config = KafkaSourceConfig::new(&config.brokers, config.topics.inputs());
        source_config.group_id = config.group_id.clone();
        source_config.max_batch_rows = config.max_batch_rows;
        source_config.linger = config.linger;
        source_config.properties = config.properties.clone();
        let mut sink_config = KafkaSinkConfig::new(&config.brokers);
        sink_config.properties = config.properties.clone();
        let query = CongestionQuery::new(config.event_time);
        let congestion_schema = schemas.get("congestion_indicator")?;
        // Refuse at start-up, not at the first window, if the query and its topic disagree.
        conform(
            &datafusion::arrow::array::RecordBatch::new_empty(query.output_schema()),
            &congestion_schema,
        )?;
        Ok(Self {
            source: KafkaSource::new(source_config)?,
            sink: KafkaSink::new(&sink_config)?,
            decoders,
            congestion_schema,
            query,
            stats,
            next_offsets: HashMap::new(),
            committed: HashMap::new(),
            config,
        })
    }

    /// Runs until `stop` is set, then publishes what is pending, flushes and commits.
    pub async fn run(mut self, stop: Arc<AtomicBool>) -> Result<()> {
        info!(brokers = %self.config.brokers, topics = ?self.config.topics.inputs(), "pipeline started");
        while !stop.load(Ordering::Relaxed) {
            let batches = self.source.next_batches(Duration::from_millis(200)).await?;
            self.step(batches).await?;
        }
        self.sink.flush(Duration::from_secs(10))?;
        self.commit()?;
        info!("pipeline stopped");
        Ok(())
    }

    /// Processes one set of batches: decode, query, publish, wait for acknowledgements, commit.
    pub async fn step(&mut self, batches: Vec<RawBatch>) -> Result<()> {
        let received_at = epoch_ms();
        let now = received_at;
        let mut pending = Pending::default();
        let mut dlq_count = 0;
        let mut late_count = 0;
        let mut indicator_count = 0;
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
                        (
                            raw.key(r.index as usize).map(<[u8]>::to_vec),
                            DlqRecord::new(raw, r, received_at),
                        )
                    })
                    .collect();
                dlq_count += records.len();
                self.sink
                    .send_json(&topics.dlq, &records, &mut pending)
                    .await?;
            }
            let counter = if *raw.topic == *topics.camera {
                &self.stats.camera_events
            } else if *raw.topic == *topics.detectors {
                &self.stats.detector_readings
            } else {
                &self.stats.air_readings
            };
            counter.fetch_add(decoded.batch.num_rows() as u64, Ordering::Relaxed);
            if *raw.topic == *topics.camera {
                let output = self.query.process(raw, &decoded, now).await?;
                if !output.late.is_empty() {
                    let records: Vec<_> = output
                        .late
                        .iter()
                        .map(|l| {
                            let i = l.index as usize;
                            let record = LateRecord {
                                query: "congestion_minute".into(),
                                topic: raw.topic.to_string(),
                                partition: raw.partitions[i],
                                offset: raw.offsets[i],
                                event_time: l.event_time,
                                watermark: l.watermark,
                                reason: "beyond_allowed_lateness".into(),
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
                if let Some(rows) = output.rows {
                    indicator_count += rows.num_rows();
                    let rows = conform(&rows, &self.congestion_schema)?;
                    self.sink
                        .send_rows(&topics.congestion, &rows, "segment_id", &mut pending)
                        .await?;
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
            // No input: idle partitions may still let the watermark close windows.
            if let Some(rows) = self.query.tick(now)? {
                indicator_count += rows.num_rows();
                let rows = conform(&rows, &self.congestion_schema)?;
                self.sink
                    .send_rows(&topics.congestion, &rows, "segment_id", &mut pending)
                    .await?;
            }
        }
        let outputs = pending.len();
        pending.acknowledged().await?;
        self.stats
            .dlq
            .fetch_add(dlq_count as u64, Ordering::Relaxed);
        self.stats
            .late
            .fetch_add(late_count as u64, Ordering::Relaxed);
        self.stats
            .indicators_out
            .fetch_add(indicator_count as u64, Ordering::Relaxed);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        if let Some(w) = self.query.watermark() {
            self.stats.watermark_ms.store(w, Ordering::Relaxed);
        }
        self.stats
            .state_groups
            .store(self.query.state().group_count() as u64, Ordering::Relaxed);
        if outputs > 0 {
            debug!(
                outputs,
                dlq = dlq_count,
                late = late_count,
                indicators = indicator_count,
                "batch published"
            );
        }
        self.commit()
    }

    /// Commits every offset whose outputs are acknowledged and whose events are in no open
    /// window.
    fn commit(&mut self) -> Result<()> {
        let held = self.query.state().min_offsets();
        let mut changed = HashMap::new();
        for ((topic, partition), next) in &self.next_offsets {
            let mut offset = *next;
            if **topic == *self.config.topics.camera
                && let Some(min) = held.get(partition)
            {
                offset = offset.min(*min);
            }
            let key = (topic.clone(), *partition);
            if self.committed.get(&key) != Some(&offset) {
                changed.insert(key, offset);
            }
        }
        self.source.commit(&changed)?;
        self.committed.extend(changed);
        Ok(())
    }
}

/// Wall-clock time, epoch ms.
pub fn epoch_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
