//! Source: Kafka records into [`RawBatch`]es.
//!
//! [`KafkaSource`] is an rdkafka consumer in a consumer group over the input topics. It
//! gathers records until a batch holds `max_batch_rows` or `linger` has passed since its first
//! record, and hands out one [`RawBatch`] per topic. Keys and values are copied into one
//! contiguous buffer per batch (no allocation per record). Offsets are never committed
//! automatically: the pipeline commits them with [`KafkaSource::commit`] once every output that
//! depends on them has been acknowledged.
//!
//! The group's partition changes are not carried out in the rebalance callback but queued
//! ([`KafkaSource::rebalances`]) for the pipeline, which restores a newly assigned
//! partition's state before it fetches anything of it and checkpoints a revoked one's before
//! letting it go ([`KafkaSource::assign`], [`KafkaSource::unassign`]). With checkpoints the
//! pipeline's own positions are the truth: [`KafkaSource::set_positions`] says where each
//! partition resumes, whatever offset the group has committed.
//!
//! Reads block ([`KafkaSource::read_batches`]): the pipeline runs them on a thread that may
//! wait. They wait in librdkafka's own queue, which wakes them when a record arrives; rdkafka's
//! stream consumer could miss that wake-up (its waker is set after the queue was found empty,
//! rust-rdkafka issue 665) and was asked again every 2 ms to make up for it, which kept every
//! idle query's thread busy.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, ConsumerGroupMetadata,
};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, warn};

use crate::error::{Error, Result};

pub mod range;

/// The records of one topic, in arrival order, stored column-wise.
#[derive(Debug, Clone, Default)]
pub struct RawBatch {
    /// Topic the records came from.
    pub topic: Arc<str>,
    /// Partition of each record.
    pub partitions: Vec<i32>,
    /// Offset of each record.
    pub offsets: Vec<i64>,
    /// When the source received the first record of the micro-batch this batch belongs to.
    pub first_received: Option<Instant>,
    /// Records of a repartition topic: the input partition and offset each came from (one
    /// per record; empty for other topics).
    pub origins: Vec<(i32, i64)>,
    /// Progress records of a repartition topic (not records of the batch).
    pub progress: Vec<Progress>,
    values: Vec<u8>,
    value_ends: Vec<usize>,
    keys: Vec<u8>,
    key_ends: Vec<usize>,
    key_present: Vec<bool>,
}

impl RawBatch {
    /// An empty batch for `topic`.
    pub fn new(topic: impl Into<Arc<str>>) -> Self {
        Self {
            topic: topic.into(),
            ..Self::default()
        }
    }

    /// Appends one record. A missing value (tombstone) is stored as empty bytes.
    pub fn push(&mut self, partition: i32, offset: i64, key: Option<&[u8]>, value: Option<&[u8]>) {
        self.partitions.push(partition);
        self.offsets.push(offset);
        self.values.extend_from_slice(value.unwrap_or_default());
        self.value_ends.push(self.values.len());
        self.keys.extend_from_slice(key.unwrap_or_default());
        self.key_ends.push(self.keys.len());
        self.key_present.push(key.is_some());
    }

    /// Appends record `i` of `other`, with its origin.
    pub fn push_from(&mut self, other: &RawBatch, i: usize) {
        self.push(
            other.partitions[i],
            other.offsets[i],
            other.key(i),
            Some(other.value(i)),
        );
        if let Some(origin) = other.origins.get(i) {
            self.origins.push(*origin);
        }
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.offsets.len()
    }

    /// Whether there are no records.
    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    /// The value bytes of record `i`.
    pub fn value(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.value_ends[i - 1] };
        &self.values[start..self.value_ends[i]]
    }

    /// The key bytes of record `i`, if it had a key.
    pub fn key(&self, i: usize) -> Option<&[u8]> {
        if !self.key_present[i] {
            return None;
        }
        let start = if i == 0 { 0 } else { self.key_ends[i - 1] };
        Some(&self.keys[start..self.key_ends[i]])
    }
}

/// A progress record of a repartition topic: the input partition it speaks for has seen
/// events up to `max_event_ms` (so the stage reading the topic can track that partition's
/// watermark even when none of its records go to this partition).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Partition of the repartition topic.
    pub partition: i32,
    /// Offset of the progress record.
    pub offset: i64,
    /// The input partition.
    pub input_partition: i32,
    /// Its largest event time so far, epoch ms (`i64::MIN`: none known yet).
    pub max_event_ms: i64,
    /// Whether the input partition has records stage 1 has not read yet (`Some(true)`), has
    /// caught up (`Some(false)`), or the record does not say.
    pub behind: Option<bool>,
}

/// Header of a repartitioned record: its input partition (i32) and offset (i64), big-endian.
pub const ORIGIN_HEADER: &str = "urbanstream-origin";

/// Header of a progress record: an input partition (i32) and its largest event time (i64,
/// epoch ms), big-endian.
pub const PROGRESS_HEADER: &str = "urbanstream-progress";

/// Header of a progress record that also says whether its input partition is behind the end
/// of its log: the input partition (i32) and 1 or 0 (i64), big-endian.
pub const BEHIND_HEADER: &str = "urbanstream-behind";

/// A partition (i32) and a number (i64), big-endian, as in the repartition headers.
pub fn encode_pair(partition: i32, n: i64) -> [u8; 12] {
    let mut out = [0; 12];
    out[..4].copy_from_slice(&partition.to_be_bytes());
    out[4..].copy_from_slice(&n.to_be_bytes());
    out
}

fn decode_pair(bytes: &[u8]) -> Option<(i32, i64)> {
    let partition = i32::from_be_bytes(bytes.get(..4)?.try_into().ok()?);
    let n = i64::from_be_bytes(bytes.get(4..12)?.try_into().ok()?);
    Some((partition, n))
}

/// Settings of the Kafka source.
#[derive(Debug, Clone)]
pub struct KafkaSourceConfig {
    /// Bootstrap servers, `host:port[,host:port]`.
    pub brokers: String,
    /// Consumer group id; processes with the same id split the partitions.
    pub group_id: String,
    /// Topics to consume.
    pub topics: Vec<String>,
    /// A batch is handed out when it holds this many records...
    pub max_batch_rows: usize,
    /// ...or when this long has passed since its first record.
    pub linger: Duration,
    /// Extra librdkafka properties (security.protocol, sasl.*, ssl.*, ...).
    pub properties: Vec<(String, String)>,
    /// Topics whose partitions start at their beginning when first assigned without a resume
    /// position, not at the group's committed offset (a query created under the name of a
    /// dropped one). Later assignments use the committed offsets as usual.
    pub from_beginning: Vec<String>,
    /// Partitions that start at the given offset when first assigned without a resume
    /// position, not at the group's committed offset: the internal topic of a repartitioned
    /// query started afresh is read from where it ended when the query started, so that the
    /// records its predecessor's first stage left there unread are not read with the ones
    /// its own first stage passes on again from the beginning of the input. Each applies to
    /// the partition's first assignment; later ones use the committed offsets as usual.
    pub start_at: HashMap<(String, i32), i64>,
    /// Static group membership (`group.instance.id`): a restarted process with the same id
    /// gets its partitions back at once, without waiting for its old session to time out,
    /// and a second live process with the same id is fenced.
    pub group_instance_id: Option<String>,
}

impl KafkaSourceConfig {
    /// Defaults for `brokers` and `topics`: group `urbanstream`, 8 192 rows or 20 ms.
    pub fn new(brokers: impl Into<String>, topics: Vec<String>) -> Self {
        Self {
            brokers: brokers.into(),
            group_id: "urbanstream".into(),
            topics,
            max_batch_rows: 8192,
            linger: Duration::from_millis(20),
            properties: Vec::new(),
            from_beginning: Vec::new(),
            start_at: HashMap::new(),
            group_instance_id: None,
        }
    }
}

/// How long one wait for a record lasts before a cancellable read looks at its flag.
const CANCEL_SLICE: Duration = Duration::from_millis(10);

/// `d` rounded up to whole milliseconds: librdkafka waits in whole milliseconds, and rdkafka
/// polls again (without waiting) for whatever a shorter wait left of the time asked for.
fn whole_ms(d: Duration) -> Duration {
    let ms = d.as_millis() as u64 + u64::from(!d.subsec_nanos().is_multiple_of(1_000_000));
    Duration::from_millis(ms)
}

/// Where each (topic, partition) resumes when the group assigns it.
pub type Positions = HashMap<(String, i32), i64>;

/// A change of this consumer's partitions decided by the group, for the pipeline to carry
/// out ([`KafkaSource::rebalances`]). The consumer fetches nothing of newly assigned
/// partitions and keeps fetching revoked ones until the pipeline answers with
/// [`KafkaSource::assign`] or [`KafkaSource::unassign`]: so state can be restored before
/// the first record of a partition and checkpointed before its last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionChange {
    /// The group gave these partitions to this consumer.
    Assigned(Vec<(String, i32)>),
    /// The group moves these partitions to other members, which start once this one lets go.
    Revoked(Vec<(String, i32)>),
    /// This consumer's session expired (the coordinator not reached in time): the group may
    /// already have given these partitions to other members.
    Lost(Vec<(String, i32)>),
}

/// The consumer's context: queues the group's partition changes for the pipeline.
#[derive(Default)]
pub struct SourceContext {
    changes: Arc<Mutex<Vec<PartitionChange>>>,
    /// Set when the consumer closes: nobody answers queued changes any more, so the
    /// callback carries them out itself (closing waits for the revocation to complete).
    closing: Arc<AtomicBool>,
    /// Whether the group's assignment is cooperative (incremental) rather than eager.
    cooperative: bool,
}

impl ClientContext for SourceContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        crate::error::log_kafka_client_error(&error, reason);
    }
}

impl ConsumerContext for SourceContext {
    /// Replaces rdkafka's handling, which assigns and revokes within the callback: the change
    /// is queued and the pipeline answers later (librdkafka's contract is that the answer
    /// comes within the session timeout, not necessarily from the callback).
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: rdkafka::types::RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        use rdkafka::types::RDKafkaRespErr as E;
        let list: Vec<(String, i32)> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        let change = match err {
            E::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => PartitionChange::Assigned(list),
            E::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS if consumer.assignment_lost() => {
                PartitionChange::Lost(list)
            }
            E::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => PartitionChange::Revoked(list),
            other => {
                warn!(error = ?other, "consumer group rebalance failed");
                return;
            }
        };
        debug!(?change, "consumer group rebalance");
        if self.closing.load(Ordering::Acquire) {
            let done = match (&change, self.cooperative) {
                (PartitionChange::Assigned(_), true) => consumer.incremental_assign(tpl),
                (PartitionChange::Assigned(_), false) => consumer.assign(tpl),
                (_, true) => consumer.incremental_unassign(tpl),
                (_, false) => consumer.unassign(),
            };
            if let Err(e) = done {
                warn!(error = %e, "partition change at close failed");
            }
            return;
        }
        if let Ok(mut changes) = self.changes.lock() {
            changes.push(change);
        }
    }
}

/// A consumer-group member over the input topics.
pub struct KafkaSource {
    consumer: BaseConsumer<SourceContext>,
    /// Where each partition resumes, moved forward as the pipeline processes.
    positions: Mutex<Positions>,
    /// An error met after some records of a batch were gathered: the batch is returned, and
    /// the error with the next call.
    deferred: Mutex<Option<Error>>,
    changes: Arc<Mutex<Vec<PartitionChange>>>,
    closing: Arc<AtomicBool>,
    config: KafkaSourceConfig,
    /// A client outside the group that asks for partitions' end offsets and metadata, shared
    /// by the sources of the process with the same cluster settings ([`shared_probe`]).
    lag_probe: Arc<BaseConsumer>,
    lag_probe_busy: Arc<AtomicBool>,
    /// Lag measurements completed.
    lag_measured: Arc<std::sync::atomic::AtomicU64>,
    /// Per partition, the count of completed measurements when one last reached it.
    measured_in: Arc<Mutex<HashMap<(String, i32), u64>>>,
    /// The partitions with records not read yet, as measured with the lag, and when each
    /// was last found so.
    behind: Arc<Mutex<HashMap<(String, i32), std::time::Instant>>>,
    /// Where each partition started being read when it was last assigned.
    started: Mutex<Positions>,
    /// Whether [`KafkaSourceConfig::from_beginning`] still applies (until the first
    /// assignment has been answered).
    rewinding: AtomicBool,
    /// The partitions of [`KafkaSourceConfig::start_at`] not assigned yet.
    start_at: Mutex<HashMap<(String, i32), i64>>,
    /// Partitions started at their log's start in this run (nothing committed, or read anew),
    /// with the end of their log when they were assigned: their backlog, which retention may
    /// shorten at its old end while the query reads it ([`Self::reading_backlog`]).
    backlogs: Mutex<HashMap<(String, i32), Backlog>>,
}

/// Where a partition's log started and ended when a query began reading it at its start.
#[derive(Clone, Copy, Debug)]
struct Backlog {
    start: i64,
    end: i64,
}

/// Assigned partitions whose position is not in their log (see [`KafkaSource::out_of_log`]).
#[derive(Debug, Default)]
pub struct OutOfLog {
    /// Before the log's start: (topic, partition, position, log start).
    pub gaps: Vec<(String, i32, i64, i64)>,
    /// Past the log's end: (topic, partition, position, log end).
    pub past_end: Vec<(String, i32, i64, i64)>,
}

impl OutOfLog {
    /// Why the query cannot go on where a position is past its log's end, if one is.
    pub fn past_end_reason(&self) -> Option<String> {
        if self.past_end.is_empty() {
            return None;
        }
        let partitions: Vec<String> = self
            .past_end
            .iter()
            .map(|(topic, partition, position, end)| {
                format!("{topic} [{partition}] ends at offset {end}, before the query's position {position}")
            })
            .collect();
        Some(format!(
            "{}: the broker no longer holds records this query has read (the topic deleted and \
             created again, or a broker that came back without its data, as the embedded \
             broker does when restarted); the query stops rather than guess where to resume. \
             To read its input again from the beginning, with its state started afresh, reset \
             it (in a service: `urbanstream query reset NAME`)",
            partitions.join("; ")
        ))
    }
}

/// The consumer group's session timeout (`session.timeout.ms`), ms.
const SESSION_TIMEOUT_MS: &str = "10000";

/// How long one end-offset request of the lag probe may take.
const LAG_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

impl KafkaSource {
    /// Connects and subscribes. Offsets start at the group's committed offsets, or at the
    /// earliest offset for a new group.
    pub fn new(config: KafkaSourceConfig) -> Result<Self> {
        let lag_probe = shared_probe(&config.brokers, &config.properties)?;
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &config.brokers)
            .set("group.id", &config.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // Never skip silently: a position no longer in the log (retention or truncation
            // removed records not yet read) is an error, not a jump to either end. Where
            // nothing is committed, assignment starts at the beginning explicitly.
            .set("auto.offset.reset", "error")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", FETCH_WAIT.as_millis().to_string())
            // When a partition's prefetch queue is full, fetch it again 10 ms later, not
            // librdkafka's default 1 s: a query working through a backlog empties the queue
            // long before that, and waited idle for the rest (a third of the speed; benches/
            // README, "Draining a backlog"). The queue stays bounded as before
            // (queued.min.messages, queued.max.messages.kbytes).
            .set("fetch.queue.backoff.ms", "10")
            // How long the group waits for a member it no longer hears from: Kafka's default
            // before 3.0 rather than librdkafka's 45 s. A process that died leaves its
            // partitions unread that long (at-least-once queries join as dynamic members);
            // and on librdkafka's mock cluster (the embedded broker) a query paused and
            // resumed, or dropped and created again, waited that long for its partitions
            // even though its consumer had left the group (the mock delays the rebalance
            // after a leave by the session timeout). `kafka.properties` may set another.
            .set("session.timeout.ms", SESSION_TIMEOUT_MS)
            .set("partition.assignment.strategy", "cooperative-sticky");
        if let Some(id) = &config.group_instance_id {
            client.set("group.instance.id", id);
        }
        for (k, v) in &config.properties {
            client.set(k, v);
        }
        // The protocol of the assignor configured (librdkafka refuses a mix): asking the
        // consumer (`rebalance_protocol`) waits on its group thread, which a consumer being
        // closed no longer answers, and the process hung there for good.
        let cooperative = client
            .get("partition.assignment.strategy")
            .is_some_and(|s| s.contains("cooperative"));
        let changes: Arc<Mutex<Vec<PartitionChange>>> = Arc::default();
        let closing: Arc<AtomicBool> = Arc::default();
        let consumer: BaseConsumer<SourceContext> = client.create_with_context(SourceContext {
            changes: changes.clone(),
            closing: closing.clone(),
            cooperative,
        })?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        Ok(Self {
            consumer,
            positions: Mutex::default(),
            deferred: Mutex::default(),
            changes,
            closing,
            lag_probe,
            lag_probe_busy: Arc::new(AtomicBool::new(false)),
            lag_measured: Default::default(),
            measured_in: Default::default(),
            behind: Arc::default(),
            started: Mutex::default(),
            rewinding: AtomicBool::new(!config.from_beginning.is_empty()),
            start_at: Mutex::new(config.start_at.clone()),
            backlogs: Mutex::new(HashMap::new()),
            config,
        })
    }

    /// Waits for records and returns them as one batch per topic: as soon as `max_batch_rows`
    /// are gathered, or `linger` after the first one (records already queued then are taken
    /// too, up to `max_batch_rows`). Returns an empty list if nothing arrived within `idle` (so
    /// the caller can advance idle partitions and refresh its view), or once `cancel` is set
    /// while it waits for the first record (looked at every [`CANCEL_SLICE`]). Blocking: the
    /// group's partition changes are queued from within it.
    pub fn read_batches(
        &self,
        idle: Duration,
        cancel: Option<&AtomicBool>,
    ) -> Result<Vec<RawBatch>> {
        if let Some(e) = self.deferred.lock().ok().and_then(|mut d| d.take()) {
            return Err(e);
        }
        // One batch per topic; a query reads one to three topics, so a search beats a hash.
        let mut batches: Vec<RawBatch> = Vec::new();
        let mut rows = 0;
        let give_up = Instant::now() + idle;
        let first = loop {
            let now = Instant::now();
            if now >= give_up || cancel.is_some_and(|c| c.load(Ordering::Acquire)) {
                return Ok(Vec::new());
            }
            let mut wait = give_up - now;
            if cancel.is_some() {
                wait = wait.min(CANCEL_SLICE);
            }
            // None also when the wait ended on a group event (a partition change, queued).
            if let Some(message) = self.consumer.poll(whole_ms(wait)) {
                break message.map_err(|e| self.consume_error(e))?;
            }
        };
        let first_received = Instant::now();
        push(&mut batches, &first);
        drop(first);
        rows += 1;
        let deadline = first_received + self.config.linger;
        while rows < self.config.max_batch_rows {
            // A record already queued is taken without waiting (and without a clock read).
            let next = match self.consumer.poll(Duration::ZERO) {
                Some(next) => next,
                None => {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    match self.consumer.poll(whole_ms(deadline - now)) {
                        Some(next) => next,
                        None => continue,
                    }
                }
            };
            match next {
                Ok(message) => {
                    push(&mut batches, &message);
                    rows += 1;
                }
                Err(e) => {
                    // The records gathered so far are processed; the error comes next.
                    if let Ok(mut d) = self.deferred.lock() {
                        *d = Some(self.consume_error(e));
                    }
                    break;
                }
            }
        }
        Ok(batches
            .into_iter()
            .map(|mut b| {
                b.first_received = Some(first_received);
                b
            })
            .collect())
    }

    /// A consumer error, named for the operator where it is a configuration problem.
    fn consume_error(&self, e: KafkaError) -> Error {
        use rdkafka::types::RDKafkaErrorCode;
        if e.rdkafka_error_code() == Some(RDKafkaErrorCode::FencedInstanceId)
            || (e.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal)
                && e.to_string().contains("fenced"))
        {
            return Error::Config(format!(
                "another process joined consumer group {} as {}: two processes share one \
                 identity; give each its own checkpoint.instance (it names the group member \
                 and the transactional ids) ({e})",
                self.config.group_id,
                self.config.group_instance_id.as_deref().unwrap_or("?"),
            ));
        }
        if e.rdkafka_error_code() == Some(RDKafkaErrorCode::AutoOffsetReset) {
            return Error::DataLoss(format!(
                "a partition's position is no longer in the log of {} (retention or a \
                 truncation removed records this query had not read yet: {e}); the query stops \
                 rather than skip them. Read what is left by resetting the query (`urbanstream \
                 query reset NAME`: it starts at the log's beginning, with its state afresh), \
                 or keep records longer (retention.ms; {})",
                self.config.topics.join(", "),
                crate::broker::LIMITS
            ));
        }
        Error::Kafka(e)
    }

    /// The assigned partitions whose position is outside their log: before its start
    /// (records deleted before they were read), or past its end (records the broker no
    /// longer holds though they were read: a topic deleted and created again, a broker that
    /// came back without its data). Blocking.
    pub fn out_of_log(&self, timeout: Duration) -> Result<OutOfLog> {
        let positions = self.positions();
        let fetching: HashMap<(String, i32), i64> = self
            .consumer
            .position()
            .map(|list| {
                list.elements()
                    .iter()
                    .filter_map(|e| match e.offset() {
                        Offset::Offset(o) => Some(((e.topic().to_string(), e.partition()), o)),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut out = OutOfLog::default();
        for e in self.consumer.assignment()?.elements() {
            let key = (e.topic().to_string(), e.partition());
            let backlog_start = self
                .backlogs
                .lock()
                .ok()
                .and_then(|b| b.get(&key).map(|b| b.start));
            let Some(position) = positions
                .get(&key)
                .or(fetching.get(&key))
                .copied()
                .or(backlog_start)
            else {
                continue;
            };
            let (low, high) = self.consumer.fetch_watermarks(&key.0, key.1, timeout)?;
            if position < low {
                out.gaps.push((key.0, key.1, position, low));
            } else if position > high {
                out.past_end.push((key.0, key.1, position, high));
            }
        }
        Ok(out)
    }

    /// Moves `partition` of `topic` on to `offset` (past a gap), for fetching and as its
    /// resume position.
    pub fn skip_to(&self, topic: &str, partition: i32, offset: i64) -> Result<()> {
        if let Ok(mut p) = self.positions.lock() {
            p.insert((topic.to_string(), partition), offset);
        }
        // A partition stopped by an offset reset cannot seek: it is placed again.
        let mut one = TopicPartitionList::new();
        one.add_partition(topic, partition);
        let mut placed = TopicPartitionList::new();
        placed.add_partition_offset(topic, partition, Offset::Offset(offset))?;
        match self.consumer.context().cooperative {
            true => {
                self.consumer.incremental_unassign(&one)?;
                self.consumer.incremental_assign(&placed)?;
            }
            _ => {
                // Every assigned partition again, each at its resume position.
                let positions = self.positions();
                let mut all = TopicPartitionList::new();
                for e in self.consumer.assignment()?.elements() {
                    let key = (e.topic().to_string(), e.partition());
                    let at = positions
                        .get(&key)
                        .map_or(Offset::Invalid, |o| Offset::Offset(*o));
                    all.add_partition_offset(&key.0, key.1, at)?;
                }
                self.consumer.assign(&all)?;
            }
        }
        Ok(())
    }

    /// The assigned partitions with records the consumer has not read yet, as the lag's
    /// measurements found them ([`KafkaSource::measure_lag`]): the end of the partition's log
    /// at least two past where it reads next (one past may be a transaction's marker alone).
    /// A partition the last measurement could not reach stays as found before, for
    /// [`BEHIND_KEPT`] at most.
    pub fn behind(&self) -> Vec<(String, i32)> {
        self.behind
            .lock()
            .map(|b| b.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// How many lag measurements have completed ([`KafkaSource::behind`] is as the last
    /// found it).
    pub fn lag_measurements(&self) -> u64 {
        self.lag_measured.load(Ordering::Acquire)
    }

    /// The count of completed lag measurements when one last reached `topic`/`partition`
    /// (0: none has): once it is past the count when the partition was assigned, whether it
    /// is behind is known.
    pub fn measured_in(&self, topic: &str, partition: i32) -> u64 {
        self.measured_in
            .lock()
            .ok()
            .and_then(|m| m.get(&(topic.to_string(), partition)).copied())
            .unwrap_or(0)
    }

    /// How many partitions the consumer group has assigned to this consumer.
    pub fn assigned_partitions(&self) -> usize {
        self.consumer.assignment().map_or(0, |a| a.count())
    }

    /// Starts measuring, in the background, the records between this consumer's positions
    /// and the ends of its assigned partitions, summed, and stores the sum in `lag` (-1 when
    /// it cannot be known: no positions yet, the broker not answering), and when, epoch ms,
    /// in `at`. A measurement still under way is not doubled.
    pub fn measure_lag(&self, lag: Arc<AtomicI64>, at: Arc<AtomicI64>) {
        if self.lag_probe_busy.swap(true, Ordering::AcqRel) {
            return;
        }
        let positions: Vec<(String, i32, Offset)> = self
            .consumer
            .position()
            .map(|list| {
                list.elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition(), e.offset()))
                    .collect()
            })
            .unwrap_or_default();
        let probe = self.lag_probe.clone();
        let busy = self.lag_probe_busy.clone();
        let measured_count = self.lag_measured.clone();
        let measured_in = self.measured_in.clone();
        let resume = self.positions();
        let started = self.started.lock().map(|s| s.clone()).unwrap_or_default();
        let behind_now = self.behind.clone();
        tokio::task::spawn_blocking(move || {
            let mut total = 0;
            let mut behind = Vec::new();
            let mut measured = Vec::new();
            let mut known = !positions.is_empty();
            for (topic, partition, position) in positions {
                let (low, high) = match probe.fetch_watermarks(&topic, partition, LAG_PROBE_TIMEOUT)
                {
                    Ok(marks) => marks,
                    Err(_) => {
                        known = false;
                        break;
                    }
                };
                // A partition nothing has been read from yet has no position: an empty one
                // has no lag (it made the whole lag unknown, for good); another is read from
                // where it resumes, if that is known (at the group's committed offset it is
                // not known here: the lag is unknown, not its whole log).
                let key = (topic.clone(), partition);
                measured.push(key.clone());
                let position = match position {
                    Offset::Offset(position) => position,
                    _ if low == high => high,
                    _ => match resume.get(&key) {
                        Some(resume) => *resume,
                        // Nothing read yet of a partition without a resume position: the
                        // total is not known, but the partition's backlog is, from where it
                        // started.
                        None => {
                            known = false;
                            if let Some(at) = started.get(&key)
                                && high - (*at).max(low) >= 2
                            {
                                behind.push(key);
                            }
                            continue;
                        }
                    },
                };
                let unread = (high - position.max(low)).max(0);
                total += unread;
                if unread >= 2 {
                    behind.push((topic, partition));
                }
            }
            lag.store(if known { total } else { -1 }, Ordering::Relaxed);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            at.store(now, Ordering::Relaxed);
            if let Ok(mut b) = behind_now.lock() {
                let now = std::time::Instant::now();
                for key in &measured {
                    b.remove(key);
                }
                for key in behind {
                    b.insert(key, now);
                }
                // Not reached again for a while (the broker not answering for it): no longer
                // held.
                b.retain(|_, at| now.duration_since(*at) < BEHIND_KEPT);
            }
            let count = measured_count.fetch_add(1, Ordering::AcqRel) + 1;
            if let Ok(mut m) = measured_in.lock() {
                for key in measured {
                    m.insert(key, count);
                }
            }
            busy.store(false, Ordering::Release);
        });
    }

    /// Sets where partitions resume when they are assigned (those not listed resume at the
    /// group's committed offset).
    pub fn set_positions(&self, positions: Positions) {
        if let Ok(mut p) = self.positions.lock() {
            *p = positions;
        }
    }

    /// Where each partition resumes: the positions set, moved forward by what the pipeline
    /// has processed.
    pub fn positions(&self) -> Positions {
        self.positions.lock().map(|p| p.clone()).unwrap_or_default()
    }

    /// Moves the resume positions forward to what the pipeline has processed, so that a
    /// partition revoked and assigned again resumes after it.
    pub fn advance_positions(&self, next: &HashMap<(Arc<str>, i32), i64>) {
        if let Ok(mut p) = self.positions.lock() {
            for ((topic, partition), offset) in next {
                p.insert((topic.to_string(), *partition), *offset);
            }
        }
    }

    /// Forgets the resume positions of partitions this consumer no longer holds.
    pub fn forget_positions(&self, partitions: &[(String, i32)]) {
        if let Ok(mut p) = self.positions.lock() {
            for key in partitions {
                p.remove(key);
            }
        }
        // Assigned again, a partition starts where the group left it, not in a backlog.
        if let Ok(mut b) = self.backlogs.lock() {
            for key in partitions {
                b.remove(key);
            }
        }
    }

    /// Whether the group has partition changes not yet taken with [`Self::rebalances`].
    pub fn changes_pending(&self) -> bool {
        self.changes.lock().is_ok_and(|c| !c.is_empty())
    }

    /// The oldest partition change not carried out yet, left in the queue until
    /// [`KafkaSource::carried_out`]: a pipeline stopped while carrying it out (its task
    /// aborted midway) leaves it for the consumer's drop to answer.
    pub fn next_change(&self) -> Option<PartitionChange> {
        self.changes.lock().ok().and_then(|c| c.first().cloned())
    }

    /// Takes the oldest partition change off the queue, once carried out.
    pub fn carried_out(&self) {
        if let Ok(mut c) = self.changes.lock()
            && !c.is_empty()
        {
            c.remove(0);
        }
    }

    /// The partition changes the group decided since the last call, oldest first. Each must
    /// be answered with [`KafkaSource::assign`] or [`KafkaSource::unassign`].
    pub fn rebalances(&self) -> Vec<PartitionChange> {
        self.changes
            .lock()
            .map(|mut c| std::mem::take(&mut *c))
            .unwrap_or_default()
    }

    /// Answers `change` without taking anything up (the pipeline is stopping): an
    /// assignment is accepted, to be revoked by the consumer's close, and a revocation or a
    /// loss carried out. The group waits for every change to be answered: a consumer closed
    /// with one unanswered (partitions lost while the broker did not answer) waited for good,
    /// and its query never started again. Best effort: a change answered already fails here.
    pub fn answer(&self, change: &PartitionChange) {
        let list_of = |partitions: &[(String, i32)]| {
            let mut list = TopicPartitionList::new();
            for (topic, partition) in partitions {
                list.add_partition(topic, *partition);
            }
            list
        };
        let done = match (change, self.consumer.context().cooperative) {
            (PartitionChange::Assigned(list), true) => {
                self.consumer.incremental_assign(&list_of(list))
            }
            (PartitionChange::Assigned(list), false) => self.consumer.assign(&list_of(list)),
            (PartitionChange::Revoked(list) | PartitionChange::Lost(list), true) => {
                self.consumer.incremental_unassign(&list_of(list))
            }
            (_, false) => self.consumer.unassign(),
        };
        if let Err(e) = done {
            debug!(error = %e, ?change, "partition change answered already");
        }
    }

    /// Starts fetching `partitions` (answering [`PartitionChange::Assigned`]), each at its
    /// resume position when it has one, else at the group's committed offset (the earliest
    /// without one), or the first time at the beginning for the topics of
    /// [`KafkaSourceConfig::from_beginning`] and at [`KafkaSourceConfig::start_at`].
    pub fn assign(&self, partitions: &[(String, i32)]) -> Result<()> {
        let positions = self.positions();
        // Partitions without a resume position start at the group's committed offset, or at
        // the beginning when nothing is committed.
        let unplaced: Vec<(String, i32)> = self
            .not_rewinding(partitions)
            .into_iter()
            .filter(|k| !positions.contains_key(k))
            .collect();
        let committed = self.committed(&unplaced, Duration::from_secs(30))?;
        let mut list = TopicPartitionList::new();
        for key in partitions {
            let offset = match (positions.get(key), self.start_at(key), committed.get(key)) {
                (Some(&o), _, _) | (None, Some(o), _) | (None, None, Some(&o)) => Offset::Offset(o),
                (None, None, None) => self.log_start(key),
            };
            debug!(topic = %key.0, partition = key.1, ?offset, "partition assigned");
            if let Ok(mut started) = self.started.lock() {
                // From the log's start when its offset is not known (read as 0: the low
                // watermark is taken where it is higher).
                let at = match offset {
                    Offset::Offset(o) => o,
                    _ => 0,
                };
                started.insert(key.clone(), at);
            }
            list.add_partition_offset(&key.0, key.1, offset)?;
        }
        if self.consumer.context().cooperative {
            self.consumer.incremental_assign(&list)?;
        } else {
            self.consumer.assign(&list)?;
        }
        self.rewinding.store(false, Ordering::Relaxed);
        if let Ok(mut start_at) = self.start_at.lock() {
            for key in partitions {
                start_at.remove(key);
            }
        }
        Ok(())
    }

    /// Where a partition without a position starts: its log's start, asked for explicitly
    /// and noted with its end as the backlog the query reads first. Blocking.
    fn log_start(&self, key: &(String, i32)) -> Offset {
        match self
            .consumer
            .fetch_watermarks(&key.0, key.1, Duration::from_secs(30))
        {
            Ok((start, end)) => {
                self.note_backlog(key, Backlog { start, end });
                Offset::Offset(start)
            }
            Err(e) => {
                debug!(topic = %key.0, partition = key.1, error = %e, "log start not known");
                Offset::Beginning
            }
        }
    }

    fn note_backlog(&self, key: &(String, i32), backlog: Backlog) {
        if let Ok(mut backlogs) = self.backlogs.lock() {
            backlogs.insert(key.clone(), backlog);
        }
    }

    /// Whether the gap `[from, to)` of a partition lies in the backlog the query found there
    /// when it began reading the partition at its log's start in this run. Records deleted
    /// from that backlog's old end before the query reached them were never the query's to
    /// read (it starts at whatever the log holds), so their gap is recorded, not a failure; a
    /// gap reaching past the backlog holds input that arrived after the query began, which it
    /// fell behind on.
    pub fn reading_backlog(&self, topic: &str, partition: i32, from: i64, to: i64) -> bool {
        self.backlogs.lock().is_ok_and(|b| {
            b.get(&(topic.to_string(), partition))
                .is_some_and(|b| from < to && to <= b.end)
        })
    }

    /// The group's committed offsets of those of `partitions` that have one. Blocking.
    pub fn committed(
        &self,
        partitions: &[(String, i32)],
        timeout: Duration,
    ) -> Result<HashMap<(String, i32), i64>> {
        let mut committed = HashMap::new();
        if partitions.is_empty() {
            return Ok(committed);
        }
        let mut ask = TopicPartitionList::new();
        for (topic, partition) in partitions {
            ask.add_partition(topic, *partition);
        }
        for e in self.consumer.committed_offsets(ask, timeout)?.elements() {
            if let Offset::Offset(o) = e.offset() {
                committed.insert((e.topic().to_string(), e.partition()), o);
            }
        }
        Ok(committed)
    }

    /// Of `partitions`, those the group has read before (a committed offset past the log's
    /// start) and that do not start from their beginning anew
    /// ([`KafkaSourceConfig::from_beginning`]): their state, if the queries keep any, should
    /// be in a checkpoint. Blocking.
    pub fn read_before(
        &self,
        partitions: &[(String, i32)],
        timeout: Duration,
    ) -> Result<Vec<((String, i32), i64)>> {
        let mut out = Vec::new();
        for ((topic, partition), offset) in
            self.committed(&self.not_rewinding(partitions), timeout)?
        {
            // A position at the log's start reads nothing before it: the first checkpoint of a
            // new query commits its starting positions, and a crash before that checkpoint is
            // written leaves them committed.
            let (low, _) = self
                .lag_probe
                .fetch_watermarks(&topic, partition, timeout)?;
            if offset > low {
                out.push(((topic, partition), offset));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Those of `partitions` that do not start anew: at their topic's beginning, or at
    /// [`KafkaSourceConfig::start_at`].
    fn not_rewinding(&self, partitions: &[(String, i32)]) -> Vec<(String, i32)> {
        partitions
            .iter()
            .filter(|k| !self.rewinds(&k.0) && self.start_at(k).is_none())
            .cloned()
            .collect()
    }

    /// Where `partition` starts anew ([`KafkaSourceConfig::start_at`]), until it is first
    /// assigned.
    fn start_at(&self, partition: &(String, i32)) -> Option<i64> {
        self.start_at
            .lock()
            .ok()
            .and_then(|s| s.get(partition).copied())
    }

    /// Whether partitions of `topic` start at their beginning (see
    /// [`KafkaSourceConfig::from_beginning`]).
    fn rewinds(&self, topic: &str) -> bool {
        self.rewinding.load(Ordering::Relaxed)
            && self.config.from_beginning.iter().any(|t| t == topic)
    }

    /// Stops fetching `partitions` (answering [`PartitionChange::Revoked`] or
    /// [`PartitionChange::Lost`]); the group then hands them on.
    pub fn unassign(&self, partitions: &[(String, i32)]) -> Result<()> {
        let mut list = TopicPartitionList::new();
        for (topic, partition) in partitions {
            list.add_partition(topic, *partition);
        }
        if self.consumer.context().cooperative {
            self.consumer.incremental_unassign(&list)?;
        } else {
            self.consumer.unassign()?;
        }
        debug!(?partitions, "partitions released");
        Ok(())
    }

    /// The (topic, partition)s the group has assigned to this consumer now.
    pub fn assignment(&self) -> Vec<(String, i32)> {
        self.consumer
            .assignment()
            .map(|a| {
                a.elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The consumer group's state, for committing offsets in a producer's transaction.
    pub fn group_metadata(&self) -> Option<ConsumerGroupMetadata> {
        self.consumer.group_metadata()
    }

    /// Every partition of the input topics. Blocking.
    pub fn topic_partitions(&self, timeout: Duration) -> Result<Vec<(String, i32)>> {
        partitions_of(&self.lag_probe, &self.config.topics, timeout)
    }

    /// Where each of `partitions` would start for this group now: its committed offset, or
    /// its earliest offset when nothing is committed (or with
    /// [`KafkaSourceConfig::from_beginning`]), or [`KafkaSourceConfig::start_at`]. Blocking.
    pub fn starting_positions(
        &self,
        partitions: &[(String, i32)],
        timeout: Duration,
    ) -> Result<Positions> {
        let committed = self.committed(&self.not_rewinding(partitions), timeout)?;
        let mut out = Positions::new();
        for key in partitions {
            let offset = match (self.start_at(key), committed.get(key)) {
                (Some(o), _) | (None, Some(&o)) => o,
                (None, None) => {
                    let (start, end) = self.lag_probe.fetch_watermarks(&key.0, key.1, timeout)?;
                    self.note_backlog(key, Backlog { start, end });
                    start
                }
            };
            out.insert(key.clone(), offset);
        }
        Ok(out)
    }

    /// Each partition's end offset, for the given (topic, partition)s. Blocking.
    pub fn end_offsets(
        &self,
        partitions: &[(String, i32)],
        timeout: Duration,
    ) -> Result<Positions> {
        partitions
            .iter()
            .map(|(t, p)| {
                let (_, high) = self.lag_probe.fetch_watermarks(t, *p, timeout)?;
                Ok(((t.clone(), *p), high))
            })
            .collect()
    }

    /// The client that reads metadata and end offsets outside the group.
    pub fn probe(&self) -> Arc<BaseConsumer> {
        self.lag_probe.clone()
    }

    /// Commits, per (topic, partition), the offset of the next record to read.
    pub fn commit(&self, offsets: &HashMap<(Arc<str>, i32), i64>) -> Result<()> {
        self.commit_in(offsets, CommitMode::Async)
    }

    /// [`KafkaSource::commit`], waiting for the coordinator's answer (before partitions are
    /// handed on). Blocking.
    pub fn commit_sync(&self, offsets: &HashMap<(Arc<str>, i32), i64>) -> Result<()> {
        self.commit_in(offsets, CommitMode::Sync)
    }

    fn commit_in(&self, offsets: &HashMap<(Arc<str>, i32), i64>, mode: CommitMode) -> Result<()> {
        if offsets.is_empty() {
            return Ok(());
        }
        let mut list = TopicPartitionList::new();
        for ((topic, partition), offset) in offsets {
            list.add_partition_offset(topic, *partition, Offset::Offset(*offset))?;
        }
        self.consumer.commit(&list, mode)?;
        Ok(())
    }
}

/// Whether `probe` talks to librdkafka's mock cluster (the embedded broker), which lacks
/// some of Kafka's requests: CreateTopics, and ListOffsets by time. Blocking.
pub fn is_mock_cluster<C: ConsumerContext>(probe: &BaseConsumer<C>, timeout: Duration) -> bool {
    probe
        .client()
        .fetch_cluster_id(timeout)
        .is_some_and(|id| id.starts_with("mockCluster"))
}

/// The partitions of `topics` (a topic not yet created has none), asked of `probe`. Blocking.
pub fn partitions_of<C: ConsumerContext>(
    probe: &BaseConsumer<C>,
    topics: &[String],
    timeout: Duration,
) -> Result<Vec<(String, i32)>> {
    let mut out = Vec::new();
    for topic in topics {
        let metadata = probe.fetch_metadata(Some(topic), timeout)?;
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

/// How long a partition found behind stays so when the measurements after cannot reach it.
const BEHIND_KEPT: Duration = Duration::from_secs(10);

/// How long the broker may hold a fetch that finds no record (`fetch.wait.max.ms`;
/// `kafka.properties` may set another). The embedded broker and tansu hold such a fetch for
/// the whole wait even when records arrive meanwhile, so the wait adds to the latency of a
/// record that arrives during it (through tansu at 2 000 events/s, 500 ms took the median
/// from 119 to 417 ms). Apache Kafka answers as soon as a record arrives: there, librdkafka's
/// 500 ms cost no latency and spare the client and the broker a fetch every 10 ms per idle
/// consumer (README, "Idle cost").
const FETCH_WAIT: Duration = Duration::from_millis(10);

/// The process's client outside any group for offset and metadata lookups on the cluster at
/// `brokers` with `properties`: one for every source with the same settings (each query had
/// its own, with librdkafka's threads and connections), closed once none holds it.
fn shared_probe(brokers: &str, properties: &[(String, String)]) -> Result<Arc<BaseConsumer>> {
    type Probes = Mutex<HashMap<Vec<(String, String)>, std::sync::Weak<BaseConsumer>>>;
    static PROBES: std::sync::OnceLock<Probes> = std::sync::OnceLock::new();
    let mut settings = vec![("bootstrap.servers".to_string(), brokers.to_string())];
    settings.extend(properties.iter().cloned());
    let mut probes = PROBES
        .get_or_init(Probes::default)
        .lock()
        .map_err(|_| Error::Config("the lookup clients' lock is poisoned".into()))?;
    if let Some(probe) = probes.get(&settings).and_then(std::sync::Weak::upgrade) {
        return Ok(probe);
    }
    probes.retain(|_, probe| probe.strong_count() > 0);
    let mut client = ClientConfig::new();
    for (k, v) in &settings {
        client.set(k, v);
    }
    let probe = Arc::new(client.create::<BaseConsumer>()?);
    probes.insert(settings, Arc::downgrade(&probe));
    Ok(probe)
}

impl Drop for KafkaSource {
    fn drop(&mut self) {
        // The consumer closes after this: partition changes are carried out in the callback,
        // and those queued before are answered now (an eager unassign did not answer a
        // cooperative consumer's revocation, and its close waited for good).
        self.closing.store(true, Ordering::Release);
        for change in self.rebalances() {
            self.answer(&change);
        }
    }
}

fn push<M: Message>(batches: &mut Vec<RawBatch>, message: &M) {
    let topic = message.topic();
    let i = match batches.iter().position(|b| *b.topic == *topic) {
        Some(i) => i,
        None => {
            batches.push(RawBatch::new(topic));
            batches.len() - 1
        }
    };
    let batch = &mut batches[i];
    let (mut origin, mut progress, mut behind) = (None, None, None);
    if let Some(headers) = message.headers() {
        use rdkafka::message::Headers;
        for h in headers.iter() {
            match h.key {
                ORIGIN_HEADER => origin = h.value.and_then(decode_pair),
                PROGRESS_HEADER => progress = h.value.and_then(decode_pair),
                BEHIND_HEADER => behind = h.value.and_then(decode_pair).map(|(_, b)| b != 0),
                _ => {}
            }
        }
    }
    if let Some((input_partition, max_event_ms)) = progress {
        batch.progress.push(Progress {
            partition: message.partition(),
            offset: message.offset(),
            input_partition,
            max_event_ms,
            behind,
        });
        return;
    }
    batch.push(
        message.partition(),
        message.offset(),
        message.key(),
        message.payload(),
    );
    if let Some(origin) = origin {
        batch.origins.push(origin);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_batch_keeps_records_apart() {
        let mut b = RawBatch::new("t");
        b.push(0, 10, Some(b"k1"), Some(b"{}"));
        b.push(1, 11, None, None);
        b.push(0, 12, Some(b""), Some(b"xyz"));
        assert_eq!(b.len(), 3);
        assert_eq!(b.value(0), b"{}");
        assert_eq!(b.value(1), b"");
        assert_eq!(b.value(2), b"xyz");
        assert_eq!(b.key(0), Some(&b"k1"[..]));
        assert_eq!(b.key(1), None);
        assert_eq!(b.key(2), Some(&b""[..]));
        assert_eq!(b.partitions, vec![0, 1, 0]);
    }
}
