//! The bench's load generator (open loop, fixed rate) and downstream receiver.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::Workload;
use crate::error::{Error, Result};
use crate::pipeline::latency_histogram;

/// Wall-clock time, epoch µs.
pub fn epoch_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// When each event is due: event `i` at `start + i / rate`.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// Offered rate, events/s.
    pub rate: u64,
    /// Events in all.
    pub events: u64,
    /// Due time of event 0 (monotonic clock).
    pub start: Instant,
    /// Due time of event 0, epoch µs.
    pub start_epoch_us: i64,
}

impl Schedule {
    /// A schedule starting shortly from now, leaving time for the clients to connect.
    pub fn new(rate: u64, events: u64) -> Self {
        // Start on a whole millisecond (event times are whole ms), shortly from now.
        let now_us = epoch_us();
        let start_epoch_us = (now_us / 1000 + 500) * 1000;
        Self {
            rate,
            events,
            start: Instant::now() + Duration::from_micros((start_epoch_us - now_us) as u64),
            start_epoch_us,
        }
    }

    /// A backlog: `events` whose due times, `rate` apart, end now, so they are all due at
    /// once and the generator produces them as fast as the broker takes them.
    pub fn backlog(rate: u64, events: u64) -> Self {
        let span_us = (u128::from(events) * 1_000_000 / u128::from(rate.max(1))) as u64;
        let now_us = epoch_us();
        let start_epoch_us = (now_us - span_us as i64) / 1000 * 1000;
        let back = Duration::from_micros((now_us - start_epoch_us) as u64);
        Self {
            rate,
            events,
            start: Instant::now()
                .checked_sub(back)
                .unwrap_or_else(Instant::now),
            start_epoch_us,
        }
    }

    /// Offset of event `i`'s due time from event 0's, µs.
    pub fn offset_us(&self, i: u64) -> i64 {
        (u128::from(i) * 1_000_000 / u128::from(self.rate)) as i64
    }

    /// How many events are due `elapsed` after the start.
    fn due(&self, elapsed: Duration) -> u64 {
        let n = elapsed.as_nanos() * u128::from(self.rate) / 1_000_000_000 + 1;
        (n as u64).min(self.events)
    }
}

/// Counts the broker's acknowledgements, with each event's due time → acknowledged, and
/// keeps the producer's own figures of where a record waited (librdkafka's statistics).
struct DeliveryCounter {
    acknowledged: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    acknowledged_latency: Arc<Mutex<Histogram<u64>>>,
    waits: Arc<Mutex<ProducerWaits>>,
}

/// The longest waits of the generator's records inside its producer and at the broker, µs,
/// from librdkafka's statistics (every second, each the largest over that second).
#[derive(Debug, Clone, Copy, Default)]
pub struct ProducerWaits {
    /// In the producer's queue before being put in a request (`int_latency`).
    pub queued_us: i64,
    /// In a request written but not yet sent to the broker (`outbuf_latency`).
    pub unsent_us: i64,
    /// From a produce request sent to the broker's answer (`rtt`).
    pub round_trip_us: i64,
}

impl ClientContext for DeliveryCounter {
    fn stats(&self, statistics: rdkafka::Statistics) {
        let Ok(mut waits) = self.waits.lock() else {
            return;
        };
        for broker in statistics.brokers.values() {
            let max = |w: &Option<rdkafka::statistics::Window>| w.as_ref().map_or(0, |w| w.max);
            waits.queued_us = waits.queued_us.max(max(&broker.int_latency));
            waits.unsent_us = waits.unsent_us.max(max(&broker.outbuf_latency));
            waits.round_trip_us = waits.round_trip_us.max(max(&broker.rtt));
        }
    }
}

impl ProducerContext for DeliveryCounter {
    /// The event's due time, epoch µs.
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, due_us: Self::DeliveryOpaque) {
        match result {
            Ok(_) => {
                self.acknowledged.fetch_add(1, Ordering::Relaxed);
                let waited = epoch_us().saturating_sub(due_us as i64).max(1) as u64;
                if let Ok(mut h) = self.acknowledged_latency.lock() {
                    h.saturating_record(waited);
                }
            }
            Err(_) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// What the generator did.
#[derive(Debug, Clone)]
pub struct Generated {
    /// Events the broker acknowledged.
    pub acknowledged: u64,
    /// Events the broker refused.
    pub failed: u64,
    /// From the first due time until the last event was handed to the producer.
    pub elapsed: Duration,
    /// The furthest the generator fell behind its schedule.
    pub max_behind: Duration,
    /// Each acknowledged event's due time → its acknowledgement by the broker, µs: a delay
    /// here is in the producer or the broker's write, before any reader could see the event.
    pub acknowledged_latency: Histogram<u64>,
    /// Where the producer's records waited longest.
    pub waits: ProducerWaits,
}

/// The open-loop generator of camera events, on its own thread.
pub struct Generator {
    handle: JoinHandle<Result<Generated>>,
    acknowledged: Arc<AtomicU64>,
}

impl Generator {
    /// Starts producing `schedule`'s events to `topic`, keyed by segment over `keys` segments.
    pub fn start(
        brokers: &str,
        topic: &str,
        schedule: Schedule,
        keys: u32,
        seed: u64,
    ) -> Result<Self> {
        let acknowledged = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let acknowledged_latency = Arc::new(Mutex::new(latency_histogram()));
        let waits = Arc::new(Mutex::new(ProducerWaits::default()));
        let producer: ThreadedProducer<DeliveryCounter> = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("linger.ms", "1")
            .set("acks", "1")
            .set("queue.buffering.max.messages", "1000000")
            .set("statistics.interval.ms", "1000")
            .create_with_context(DeliveryCounter {
                acknowledged: acknowledged.clone(),
                failed: failed.clone(),
                acknowledged_latency: acknowledged_latency.clone(),
                waits: waits.clone(),
            })?;
        let topic = topic.to_string();
        let events = EventTemplates::new(keys, seed);
        let ack = acknowledged.clone();
        let handle = std::thread::Builder::new()
            .name("bench-generator".into())
            .spawn(move || {
                let mut generated =
                    generate(producer, &topic, schedule, &events, seed, &ack, &failed)?;
                if let Ok(h) = acknowledged_latency.lock() {
                    generated.acknowledged_latency = h.clone();
                }
                if let Ok(w) = waits.lock() {
                    generated.waits = *w;
                }
                Ok(generated)
            })
            .map_err(|e| Error::Config(format!("cannot start the generator thread: {e}")))?;
        Ok(Self {
            handle,
            acknowledged,
        })
    }

    /// Whether every event has been handed to the producer and flushed.
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Events acknowledged so far.
    pub fn acknowledged(&self) -> u64 {
        self.acknowledged.load(Ordering::Relaxed)
    }

    /// Waits for the generator to finish.
    pub fn join(self) -> Result<Generated> {
        self.handle
            .join()
            .map_err(|_| Error::Config("the generator thread panicked".into()))?
    }
}

/// Pre-rendered pieces of camera events: per segment the JSON up to the event time, and a
/// set of tails (class, speed, lane, direction, confidence).
struct EventTemplates {
    keys: Vec<String>,
    heads: Vec<Vec<u8>>,
    tails: Vec<Vec<u8>>,
}

impl EventTemplates {
    fn new(keys: u32, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut segments = Vec::with_capacity(keys as usize);
        let mut heads = Vec::with_capacity(keys as usize);
        for k in 0..keys {
            let segment = format!("SEG-{k:06}");
            heads.push(
                format!(
                    r#"{{"camera_id":"CAM-{k:06}-{}","segment_id":"{segment}","event_time":"#,
                    k % 2 + 1
                )
                .into_bytes(),
            );
            segments.push(segment);
        }
        const CLASSES: [(&str, f64); 4] = [
            ("motorbike", 0.8),
            ("car", 0.15),
            ("bus", 0.02),
            ("truck", 0.03),
        ];
        let tails = (0..1024)
            .map(|_| {
                let mut u: f64 = rng.random();
                let class = CLASSES
                    .iter()
                    .find(|(_, share)| {
                        u -= share;
                        u < 0.0
                    })
                    .map_or("motorbike", |(c, _)| c);
                let speed: f64 = 5.0 + rng.random::<f64>() * 55.0;
                let lane: u32 = rng.random_range(1..=3);
                let direction = if rng.random::<bool>() {
                    "inbound"
                } else {
                    "outbound"
                };
                let confidence: f64 = 0.6 + rng.random::<f64>() * 0.4;
                format!(
                    r#","kind":"detection","vehicle_class":"{class}","speed_kmh":{speed:.1},"lane":{lane},"direction":"{direction}","confidence":{confidence:.2}}}"#
                )
                .into_bytes()
            })
            .collect();
        Self {
            keys: segments,
            heads,
            tails,
        }
    }
}

fn generate(
    producer: ThreadedProducer<DeliveryCounter>,
    topic: &str,
    schedule: Schedule,
    events: &EventTemplates,
    seed: u64,
    acknowledged: &AtomicU64,
    failed: &AtomicU64,
) -> Result<Generated> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    let mut payload = Vec::with_capacity(256);
    let mut max_behind = Duration::ZERO;
    let mut i: u64 = 0;
    if let Some(wait) = schedule.start.checked_duration_since(Instant::now()) {
        std::thread::sleep(wait);
    }
    while i < schedule.events {
        let now = Instant::now();
        let due = schedule.due(now.duration_since(schedule.start));
        if i < due {
            let scheduled = schedule.start + Duration::from_micros(schedule.offset_us(i) as u64);
            max_behind = max_behind.max(now.saturating_duration_since(scheduled));
        }
        while i < due {
            let key = rng.random_range(0..events.keys.len());
            let tail = rng.random_range(0..events.tails.len());
            let due_us = schedule.start_epoch_us + schedule.offset_us(i);
            let event_ms = due_us / 1000;
            payload.clear();
            payload.extend_from_slice(&events.heads[key]);
            let _ = write!(payload, "{event_ms}");
            payload.extend_from_slice(&events.tails[tail]);
            let mut record = BaseRecord::with_opaque_to(topic, due_us.max(0) as usize)
                .key(events.keys[key].as_bytes())
                .payload(payload.as_slice());
            loop {
                match producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        std::thread::sleep(Duration::from_micros(500));
                    }
                    Err((e, _)) => return Err(e.into()),
                }
            }
            i += 1;
        }
        if i < schedule.events {
            let next = schedule.start + Duration::from_micros(schedule.offset_us(i) as u64);
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait.min(Duration::from_millis(1)));
            }
        }
    }
    let elapsed = schedule.start.elapsed();
    producer.flush(Duration::from_secs(60))?;
    Ok(Generated {
        acknowledged: acknowledged.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        elapsed,
        max_behind,
        acknowledged_latency: latency_histogram(),
        waits: ProducerWaits::default(),
    })
}

/// Which rows are recorded and how their latency is measured.
#[derive(Debug, Clone, Copy)]
pub struct Recording {
    /// Rows whose reference time (epoch µs) is at or after this are recorded...
    pub from_us: i64,
    /// ...up to this.
    pub to_us: i64,
    /// What the rows are.
    pub kind: Workload,
    /// Watermark delay, ms.
    pub delay_ms: i64,
}

impl Recording {
    /// The earliest instant (epoch µs) `row` could have existed: for a window row, the due
    /// time of the first event past its end plus the watermark delay; for an event, its due
    /// time (event times are whole ms, so this is at most 1 ms early).
    fn reference_us(&self, row: &Row) -> Option<i64> {
        match self.kind {
            Workload::Window => row.window_end.map(|end| (end + self.delay_ms) * 1000),
            Workload::Filter => row.event_time.map(|t| t * 1000),
        }
    }
}

#[derive(serde::Deserialize)]
struct Row {
    window_end: Option<i64>,
    event_time: Option<i64>,
}

/// What the receiver saw.
#[derive(Debug, Clone)]
pub struct Received {
    /// End-to-end latency of each recorded row, µs.
    pub latency: Histogram<u64>,
    /// For each recorded row, from the timestamp its producer gave it (create time, whole
    /// ms) to its receipt, µs: the last hop, broker to downstream consumer.
    pub last_hop: Histogram<u64>,
    /// Rows whose reference time fell in the recording interval.
    pub recorded: u64,
    /// Rows that were not JSON with the expected time field.
    pub unreadable: u64,
    /// Rows read in all.
    pub rows: u64,
    /// When the first row was read.
    pub first_at: Option<Instant>,
    /// When the last row was read.
    pub last_at: Option<Instant>,
    /// The longest round trip of the consumer's requests to a broker (fetches, mostly), µs,
    /// from librdkafka's statistics: a delay that shows here is the broker's answer.
    pub round_trip_max_us: i64,
}

/// The receiver's client context: keeps the longest request round trip to a broker from
/// librdkafka's statistics (every second, each the largest over that second).
struct RoundTrips(Arc<std::sync::atomic::AtomicI64>);

impl ClientContext for RoundTrips {
    fn stats(&self, statistics: rdkafka::Statistics) {
        for broker in statistics.brokers.values() {
            if let Some(rtt) = &broker.rtt {
                self.0.fetch_max(rtt.max, Ordering::Relaxed);
            }
        }
    }
}

impl rdkafka::consumer::ConsumerContext for RoundTrips {}

/// The downstream consumer, on its own thread.
pub struct Receiver {
    handle: JoinHandle<Result<Received>>,
    rows: Arc<AtomicU64>,
    latency: Arc<Mutex<Histogram<u64>>>,
}

impl Receiver {
    /// Starts reading every partition of `topic` from the beginning, with `properties` set on
    /// its client.
    pub fn start(
        brokers: &str,
        topic: &str,
        recording: Recording,
        properties: &[(String, String)],
        stop: Arc<AtomicBool>,
    ) -> Result<Self> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("bench-receiver-{}", epoch_us()))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "5")
            .set("isolation.level", "read_committed")
            .set("statistics.interval.ms", "1000");
        for (k, v) in properties {
            config.set(k, v);
        }
        let round_trips = Arc::new(std::sync::atomic::AtomicI64::new(0));
        let consumer: BaseConsumer<RoundTrips> =
            config.create_with_context(RoundTrips(round_trips.clone()))?;
        assign_from_beginning(&consumer, topic)?;
        let rows = Arc::new(AtomicU64::new(0));
        let latency = Arc::new(Mutex::new(latency_histogram()));
        let (r, l) = (rows.clone(), latency.clone());
        let handle = std::thread::Builder::new()
            .name("bench-receiver".into())
            .spawn(move || {
                let mut received = receive(&consumer, recording, &stop, &r, &l)?;
                received.round_trip_max_us = round_trips.load(Ordering::Relaxed);
                Ok(received)
            })
            .map_err(|e| Error::Config(format!("cannot start the receiver thread: {e}")))?;
        Ok(Self {
            handle,
            rows,
            latency,
        })
    }

    /// Whether the receiver has stopped (on `stop`, or on an error `join` returns).
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Rows read so far.
    pub fn received(&self) -> u64 {
        self.rows.load(Ordering::Relaxed)
    }

    /// The p99 recorded so far, for the progress line.
    pub fn p99_text(&self) -> String {
        match self.latency.lock() {
            Ok(h) if !h.is_empty() => format!("{:.1} ms", h.value_at_quantile(0.99) as f64 / 1e3),
            _ => "-".into(),
        }
    }

    /// Stops (once `stop` is set) and returns what was seen.
    pub fn join(self) -> Result<Received> {
        self.handle
            .join()
            .map_err(|_| Error::Config("the receiver thread panicked".into()))?
    }
}

/// Assigns `consumer` every partition of `topic`, each from its beginning.
pub fn assign_from_beginning<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
) -> Result<()> {
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions = metadata
        .topics()
        .first()
        .map_or(0, |t| t.partitions().len());
    if partitions == 0 {
        return Err(Error::Config(format!("topic {topic} has no partitions")));
    }
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        assignment.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    Ok(())
}

fn receive(
    consumer: &BaseConsumer<RoundTrips>,
    recording: Recording,
    stop: &AtomicBool,
    rows: &AtomicU64,
    latency: &Mutex<Histogram<u64>>,
) -> Result<Received> {
    let mut recorded = 0;
    let mut unreadable = 0;
    let mut last_hop = latency_histogram();
    let (mut first_at, mut last_at) = (None, None);
    // An empty interval records nothing: rows are only counted, not parsed (a plain drain).
    let timed = recording.from_us <= recording.to_us;
    while !stop.load(Ordering::Relaxed) {
        let Some(message) = consumer.poll(Duration::from_millis(50)) else {
            continue;
        };
        let message = message?;
        let at = Instant::now();
        first_at.get_or_insert(at);
        last_at = Some(at);
        rows.fetch_add(1, Ordering::Relaxed);
        if !timed {
            continue;
        }
        let now = epoch_us();
        let reference = message
            .payload()
            .and_then(|p| serde_json::from_slice::<Row>(p).ok())
            .and_then(|row| recording.reference_us(&row));
        let Some(reference) = reference else {
            unreadable += 1;
            continue;
        };
        if reference >= recording.from_us && reference <= recording.to_us {
            recorded += 1;
            if let Some(created_ms) = message.timestamp().to_millis() {
                last_hop.saturating_record((now - created_ms * 1000).max(1) as u64);
            }
            if let Ok(mut h) = latency.lock() {
                h.saturating_record((now - reference).max(1) as u64);
            }
        }
    }
    let latency = latency
        .lock()
        .map_err(|_| Error::Config("latency histogram poisoned".into()))?
        .clone();
    Ok(Received {
        latency,
        last_hop,
        recorded,
        unreadable,
        rows: rows.load(Ordering::Relaxed),
        first_at,
        last_at,
        round_trip_max_us: 0,
    })
}

impl Schedule {
    /// Events due from `from_us` to `to_us` (epoch µs, inclusive): what a plain consumer or
    /// a filter must deliver for that interval.
    pub fn due_between(&self, from_us: i64, to_us: i64) -> u64 {
        if self.events == 0 {
            return 0;
        }
        let rate = u128::from(self.rate);
        let first = ((from_us - self.start_epoch_us).max(0) as u128 * rate).div_ceil(1_000_000);
        let last = ((to_us - self.start_epoch_us).max(0) as u128 * rate / 1_000_000)
            .min(u128::from(self.events - 1));
        (last + 1).saturating_sub(first) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_spreads_events_evenly() {
        let s = Schedule::new(1000, 5000);
        assert_eq!(s.offset_us(0), 0);
        assert_eq!(s.offset_us(1), 1000);
        assert_eq!(s.offset_us(4999), 4_999_000);
        assert_eq!(s.due(Duration::ZERO), 1);
        assert_eq!(s.due(Duration::from_micros(2500)), 3);
        assert_eq!(s.due(Duration::from_secs(100)), 5000);
    }

    #[test]
    fn events_due_in_an_interval_are_counted_inclusively() {
        // 1000/s from 0: events at 0, 1000, 2000, ... µs; [1000, 3000] holds 3 of them.
        let mut s = Schedule::new(1000, 10);
        s.start_epoch_us = 0;
        assert_eq!(s.due_between(1000, 3000), 3);
        assert_eq!(s.due_between(999, 3999), 3);
        // Only 10 events exist: 0 .. 9 000 µs.
        assert_eq!(s.due_between(0, 10_000), 10);
        assert_eq!(s.due_between(9_500, 20_000), 0);
        s.start_epoch_us = 500;
        assert_eq!(s.due_between(0, 500), 1);
    }

    #[test]
    fn generated_events_are_camera_events_the_decoder_accepts() {
        let templates = EventTemplates::new(3, 7);
        let registry = crate::schema::SchemaRegistry::embedded().expect("schemas");
        let decoder =
            crate::decode::JsonDecoder::new(registry.get("camera_event").expect("schema"));
        let mut raw = crate::source::RawBatch::new("bench");
        for (i, tail) in templates.tails.iter().take(50).enumerate() {
            let mut payload = templates.heads[i % 3].clone();
            payload.extend_from_slice(b"1767222000123");
            payload.extend_from_slice(tail);
            raw.push(
                0,
                i as i64,
                Some(templates.keys[i % 3].as_bytes()),
                Some(&payload),
            );
        }
        let decoded = decoder.decode(&raw).expect("decode");
        assert!(decoded.rejects.is_empty(), "{:?}", decoded.rejects);
        assert_eq!(decoded.batch.num_rows(), 50);
    }

    #[test]
    fn window_rows_are_referenced_to_the_closing_event() {
        let r = Recording {
            from_us: 0,
            to_us: i64::MAX,
            kind: Workload::Window,
            delay_ms: 100,
        };
        let row = Row {
            window_end: Some(5000),
            event_time: None,
        };
        assert_eq!(r.reference_us(&row), Some(5_100_000));
        let f = Recording {
            kind: Workload::Filter,
            ..r
        };
        let row = Row {
            window_end: None,
            event_time: Some(7),
        };
        assert_eq!(f.reference_us(&row), Some(7000));
    }
}
