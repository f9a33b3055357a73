//! Reference tables kept current from compacted Kafka topics (`[reference.topics]`).
//!
//! Each followed table has a thread of its own (its Kafka calls block, and must not hold the
//! API's or the queries' runtime threads) that reads the table's topic from its start, folds
//! its records into the table's rows ([`crate::reference::changelog`]) and, once it has read
//! up to the end the topic had when it started, installs them as the table's next version,
//! checked as a replacement through the API is. It then follows the topic: a burst of changes
//! becomes one version, installed once the topic has been quiet for a moment (or after at most
//! two seconds of changes). A version whose rows are the current version's is not installed,
//! so a restart over an unchanged topic keeps the version it had.
//!
//! A record that does not fit the table goes to the DLQ (stage `reference`, with the reason)
//! and changes nothing; a version the table's own checks refuse (a sensor's unknown ward, say)
//! leaves the table as it was and is shown in the table's status until a later version is
//! accepted; it is tried again whenever a reference table changes (the ward it lacked may
//! arrive through another table's topic). Until the first read completes, the service is not
//! ready.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::Offset;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::topic_partition_list::TopicPartitionList;
use serde::Serialize;
use tracing::{info, warn};

use super::config::ServiceConfig;
use crate::error::{Error, Result};
use crate::reference::ReferenceTables;
use crate::reference::changelog::{Change, Changelog};
use crate::sink::DlqRecord;

/// How long the topic stays quiet before the changes read are installed.
const QUIET: Duration = Duration::from_millis(300);
/// The longest changes wait while records keep arriving.
const MOST_WAIT: Duration = Duration::from_secs(2);
/// How long a Kafka metadata or offsets request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a missing topic or a failed client waits before it is tried again.
const RETRY: Duration = Duration::from_secs(2);

/// What `/v1/tables` shows of a followed table.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct FollowStatus {
    /// The topic the table follows.
    pub topic: String,
    /// Whether the topic has been read up to the end it had when the service started.
    pub loaded: bool,
    /// Records read.
    pub records: u64,
    /// Records refused (sent to the DLQ with the reason).
    pub refused_records: u64,
    /// Rows the topic holds now.
    pub rows: usize,
    /// Why the rows read last were not installed (a refused version), or why the topic
    /// cannot be read; absent when the table holds what the topic says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

type Statuses = Arc<Mutex<BTreeMap<String, FollowStatus>>>;

/// The threads that keep reference tables current from their topics.
pub struct Followers {
    statuses: Statuses,
    stop: Arc<AtomicBool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Followers {
    /// Checks `[reference.topics]` against the tables: each names a reference table that
    /// exists and is not derived. Nothing runs until [`Followers::start`].
    pub fn new(config: &ServiceConfig, tables: &ReferenceTables) -> Result<Self> {
        let mut statuses = BTreeMap::new();
        for (table, topic) in &config.reference.topics {
            let name = table.to_ascii_lowercase();
            let current = tables.get(&name).ok_or_else(|| {
                Error::Config(format!(
                    "reference.topics names {table}, which is not a reference table (`urbanstream \
                     table list` shows them; a table of your own is added with `urbanstream \
                     table replace {table} --file FILE` first, which sets its columns)"
                ))
            })?;
            if let Some(source) = current.derived_from {
                return Err(Error::Config(format!(
                    "reference.topics names {table}, which is computed from {source}: follow \
                     {source} instead"
                )));
            }
            if topic.trim().is_empty() {
                return Err(Error::Config(format!("reference.topics.{table} is empty")));
            }
            statuses.insert(
                name,
                FollowStatus {
                    topic: topic.clone(),
                    ..FollowStatus::default()
                },
            );
        }
        Ok(Self {
            statuses: Arc::new(Mutex::new(statuses)),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Mutex::new(Vec::new()),
        })
    }

    /// Starts following every table's topic.
    pub fn start(&self, config: &ServiceConfig, tables: &ReferenceTables) -> Result<()> {
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", &config.kafka.brokers);
        for (k, v) in config.kafka_properties() {
            client.set(k, v);
        }
        let followed: Vec<(String, String)> = self
            .statuses
            .lock()
            .map_err(|_| Error::Config("the followers' lock is poisoned".into()))?
            .iter()
            .map(|(table, status)| (table.clone(), status.topic.clone()))
            .collect();
        let mut threads = self
            .threads
            .lock()
            .map_err(|_| Error::Config("the followers' lock is poisoned".into()))?;
        for (table, topic) in followed {
            let follower = Follower {
                table: table.clone(),
                topic,
                client: client.clone(),
                dlq: config.topics.dlq.clone(),
                tables: tables.clone(),
                statuses: self.statuses.clone(),
                stop: self.stop.clone(),
            };
            threads.push(
                std::thread::Builder::new()
                    .name(format!("reference-{table}"))
                    .spawn(move || follower.run())?,
            );
        }
        Ok(())
    }

    /// Whether table `name` follows a topic, and how that goes.
    pub fn status(&self, name: &str) -> Option<FollowStatus> {
        self.statuses
            .lock()
            .ok()?
            .get(&name.to_ascii_lowercase())
            .cloned()
    }

    /// The followed tables whose topic has not been read to its end yet.
    pub fn loading(&self) -> Vec<String> {
        self.statuses.lock().map_or_else(
            |_| Vec::new(),
            |s| {
                s.iter()
                    .filter(|(_, status)| !status.loaded)
                    .map(|(table, _)| table.clone())
                    .collect()
            },
        )
    }

    /// Stops every follower and waits for its thread (at most one poll, a fraction of a
    /// second, or a Kafka request in flight).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let threads = match self.threads.lock() {
            Ok(mut threads) => std::mem::take(&mut *threads),
            Err(_) => return,
        };
        for thread in threads {
            let _ = thread.join();
        }
    }
}

impl Drop for Followers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One table's follower.
struct Follower {
    table: String,
    topic: String,
    client: ClientConfig,
    dlq: String,
    tables: ReferenceTables,
    statuses: Statuses,
    stop: Arc<AtomicBool>,
}

impl Follower {
    fn run(self) {
        while !self.stopped() {
            if let Err(e) = self.follow() {
                warn!(table = %self.table, topic = %self.topic, error = %e,
                    "following a reference table's topic failed; again in 2 s");
                self.update(|s| s.error = Some(format!("reading topic {}: {e}", self.topic)));
                self.sleep(RETRY);
            }
        }
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn sleep(&self, total: Duration) {
        let until = Instant::now() + total;
        while !self.stopped() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn update(&self, change: impl FnOnce(&mut FollowStatus)) {
        if let Ok(mut statuses) = self.statuses.lock()
            && let Some(status) = statuses.get_mut(&self.table)
        {
            change(status);
        }
    }

    /// Reads the topic from its start with one client until stopped; an error ends it.
    fn follow(&self) -> Result<()> {
        let consumer: BaseConsumer = self
            .client
            .clone()
            .set("group.id", format!("urbanstream-reference-{}", self.table))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // The end of a partition is known by this event, not by offsets: compaction can
            // remove the last records, so the last offset read may stay below the end.
            .set("enable.partition.eof", "true")
            .create()?;
        let producer: ThreadedProducer<DefaultProducerContext> = self.client.create()?;
        // The partitions and the end each had when the read began.
        let ends = loop {
            if self.stopped() {
                return Ok(());
            }
            let metadata = consumer.fetch_metadata(Some(&self.topic), REQUEST_TIMEOUT)?;
            let partitions: Vec<i32> = metadata
                .topics()
                .iter()
                .filter(|t| t.name() == self.topic && t.error().is_none())
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            if partitions.is_empty() {
                self.update(|s| {
                    s.error = Some(format!(
                        "topic {} does not exist yet: the table keeps its version until it does",
                        self.topic
                    ));
                });
                self.sleep(RETRY);
                continue;
            }
            let mut ends = Vec::with_capacity(partitions.len());
            for p in partitions {
                let (low, high) = consumer.fetch_watermarks(&self.topic, p, REQUEST_TIMEOUT)?;
                ends.push((p, low, high));
            }
            break ends;
        };
        let mut assignment = TopicPartitionList::new();
        for (p, _, _) in &ends {
            assignment.add_partition_offset(&self.topic, *p, Offset::Beginning)?;
        }
        consumer.assign(&assignment)?;
        let current = self
            .tables
            .get(&self.table)
            .ok_or_else(|| Error::Config(format!("reference table {} is gone", self.table)))?;
        let mut log = Changelog::new(&self.table, current.schema.clone());
        let mut next: HashMap<i32, i64> = HashMap::new();
        let mut at_end: std::collections::HashSet<i32> = std::collections::HashSet::new();
        let mut loaded = false;
        // A version refused by the table's checks (a sensor's ward not there yet) is tried
        // again when any reference table changes (the ward arriving through its own topic).
        let generation = self.tables.generation();
        let mut refused_at: Option<u64> = None;
        // When the first change not yet installed was read, and the last record.
        let mut pending: Option<Instant> = None;
        let mut last_record = Instant::now();
        self.update(|s| {
            s.error = None;
            s.loaded = false;
            s.records = 0;
        });
        while !self.stopped() {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(message)) => {
                    last_record = Instant::now();
                    at_end.remove(&message.partition());
                    next.insert(message.partition(), message.offset() + 1);
                    let applied = log.apply(message.key(), message.payload());
                    self.update(|s| {
                        s.records += 1;
                        s.rows = log.len();
                    });
                    match applied {
                        Ok(Change::None) => {}
                        Ok(_) => {
                            pending.get_or_insert_with(Instant::now);
                        }
                        Err(reason) => self.refuse(&producer, &message, reason),
                    }
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                    at_end.insert(p);
                }
                Some(Err(e)) => {
                    warn!(table = %self.table, topic = %self.topic, error = %e,
                        "reading a reference table's topic");
                    self.update(|s| s.error = Some(format!("reading topic {}: {e}", self.topic)));
                }
                None => {}
            }
            if !loaded {
                if !self.read_to(&consumer, &ends, &next, &at_end) {
                    continue;
                }
                loaded = true;
                info!(table = %self.table, topic = %self.topic, rows = log.len(),
                    "reference table's topic read to its end");
                refused_at = self.install(&log, &producer, &generation);
                pending = None;
                self.update(|s| s.loaded = true);
                continue;
            }
            let retry = refused_at.is_some_and(|g| g != generation.load(Ordering::Acquire));
            if retry
                || pending.is_some_and(|since| {
                    last_record.elapsed() >= QUIET || since.elapsed() >= MOST_WAIT
                })
            {
                refused_at = self.install(&log, &producer, &generation);
                pending = None;
            }
        }
        let _ = producer.flush(REQUEST_TIMEOUT);
        Ok(())
    }

    /// Whether every partition has been read up to the end it had when the read began.
    fn read_to(
        &self,
        consumer: &BaseConsumer,
        ends: &[(i32, i64, i64)],
        next: &HashMap<i32, i64>,
        at_end: &std::collections::HashSet<i32>,
    ) -> bool {
        // The consumer's position also moves past what a reader is never given (transaction
        // markers, aborted records).
        let positions = consumer.position().ok();
        ends.iter().all(|(p, low, high)| {
            if high <= low || at_end.contains(p) {
                return true;
            }
            let read = next.get(p).copied().unwrap_or(-1);
            let position = positions
                .as_ref()
                .and_then(|l| l.find_partition(&self.topic, *p))
                .and_then(|e| e.offset().to_raw())
                .unwrap_or(-1);
            read.max(position) >= *high
        })
    }

    /// Installs the rows read as the table's next version, unless they are its current rows
    /// or the topic holds none. A refusal answers the tables' generation it was refused at.
    fn install(
        &self,
        log: &Changelog,
        producer: &ThreadedProducer<DefaultProducerContext>,
        generation: &std::sync::atomic::AtomicU64,
    ) -> Option<u64> {
        let at = generation.load(Ordering::Acquire);
        // The refused records are in Kafka before the version that left them out is.
        let _ = producer.flush(REQUEST_TIMEOUT);
        if log.is_empty() {
            self.update(|s| {
                s.error = Some(format!(
                    "topic {} holds no rows: the table keeps its version until it does",
                    self.topic
                ));
            });
            return None;
        }
        let csv = log.csv();
        if self.tables.get(&self.table).is_some_and(|t| *t.csv == *csv) {
            self.update(|s| s.error = None);
            return None;
        }
        // The status is held while the version is installed: `/v1/tables` reads the table
        // first and its status second, and must never show a new version beside the error of
        // the version refused before it.
        let mut statuses = self.statuses.lock().unwrap_or_else(|e| e.into_inner());
        match self.tables.replace(&self.table, &csv) {
            Ok(installed) => {
                info!(table = %installed.name, version = installed.version,
                    rows = installed.rows, topic = %self.topic,
                    "reference table updated from its topic");
                if let Some(status) = statuses.get_mut(&self.table) {
                    status.error = None;
                }
                None
            }
            Err(e) => {
                let reason = match e {
                    Error::Reference { message, .. } => message,
                    other => other.to_string(),
                };
                warn!(table = %self.table, topic = %self.topic, error = %reason,
                    "the rows of a reference table's topic were refused; the table keeps its version");
                if let Some(status) = statuses.get_mut(&self.table) {
                    status.error = Some(format!(
                        "the rows read were refused, the table keeps its version (tried again \
                         when a reference table changes): {reason}"
                    ));
                }
                Some(at)
            }
        }
    }

    /// Sends a record that does not fit the table to the DLQ with the reason.
    fn refuse(
        &self,
        producer: &ThreadedProducer<DefaultProducerContext>,
        message: &rdkafka::message::BorrowedMessage<'_>,
        reason: String,
    ) {
        use crate::sink::DLQ_COPY_BYTES;
        use base64::Engine as _;
        let encode = |bytes: &[u8]| {
            base64::engine::general_purpose::STANDARD
                .encode(&bytes[..bytes.len().min(DLQ_COPY_BYTES)])
        };
        let record = DlqRecord {
            topic: self.topic.clone(),
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().map(encode),
            error: format!("a row of reference table {}: {reason}", self.table),
            stage: "reference".into(),
            payload: encode(message.payload().unwrap_or_default()),
            received_at: crate::pipeline::epoch_ms(),
            query: None,
            gap_end: None,
        };
        warn!(table = %self.table, topic = %self.topic, partition = message.partition(),
            offset = message.offset(), error = %record.error, "reference record refused");
        metrics::counter!("urbanstream_reference_records_refused_total", "table" => self.table.clone())
            .increment(1);
        self.update(|s| s.refused_records += 1);
        let Ok(payload) = serde_json::to_vec(&record) else {
            return;
        };
        let key = crate::sink::dlq_key(message.key());
        let mut out = BaseRecord::<[u8], [u8]>::to(&self.dlq).payload(&payload);
        if let Some(key) = &key {
            out = out.key(key);
        }
        if let Err((e, _)) = producer.send(out) {
            warn!(table = %self.table, error = %e, "a refused reference record could not be sent to the DLQ");
        }
    }
}
