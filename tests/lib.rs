//! Shared helpers for the integration tests: an embedded broker with the city's topics, a
//! producer that writes to explicit partitions, and a consumer that collects a topic's records.

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use urbanstream::broker::EmbeddedBroker;
use urbanstream::pipeline::Topics;
use urbanstream::plan::stream::{StreamContext, StreamQuery};

/// An embedded broker with every city topic created.
pub struct TestCluster {
    /// The broker.
    pub broker: EmbeddedBroker,
    /// Its bootstrap servers.
    pub brokers: String,
    producer: FutureProducer,
}

impl TestCluster {
    /// Starts a broker; every topic gets `partitions` partitions.
    pub fn start(partitions: i32) -> anyhow::Result<Self> {
        let broker = EmbeddedBroker::start()?;
        for topic in Topics::default().all() {
            broker.create_topic(&topic, partitions)?;
        }
        let brokers = broker.bootstrap_servers();
        let producer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("linger.ms", "0")
            .create()?;
        Ok(Self {
            broker,
            brokers,
            producer,
        })
    }

    /// Produces one record to an explicit partition and waits for its acknowledgement.
    pub async fn produce(
        &self,
        topic: &str,
        partition: i32,
        key: &str,
        value: &[u8],
    ) -> anyhow::Result<(i32, i64)> {
        self.produce_to(topic, partition, Some(key), value).await
    }

    /// Produces one record without a key to an explicit partition and waits for its
    /// acknowledgement.
    pub async fn produce_without_key(
        &self,
        topic: &str,
        partition: i32,
        value: &[u8],
    ) -> anyhow::Result<(i32, i64)> {
        self.produce_to(topic, partition, None, value).await
    }

    async fn produce_to(
        &self,
        topic: &str,
        partition: i32,
        key: Option<&str>,
        value: &[u8],
    ) -> anyhow::Result<(i32, i64)> {
        let mut record = FutureRecord::<str, [u8]>::to(topic)
            .partition(partition)
            .payload(value);
        if let Some(key) = key {
            record = record.key(key);
        }
        let delivery = self
            .producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| anyhow::anyhow!("produce failed: {e}"))?;
        Ok((delivery.partition, delivery.offset))
    }

    /// Produces every `(topic, key, value)`, each to the partition of `partitions` its key
    /// hashes to (so a key stays in one partition), and waits for every acknowledgement.
    pub async fn produce_keyed(
        &self,
        records: &[(String, String, Vec<u8>)],
        partitions: i32,
    ) -> anyhow::Result<()> {
        let mut pending = Vec::with_capacity(records.len());
        for (topic, key, value) in records {
            let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
            let partition = (hash % partitions as u64) as i32;
            loop {
                let record = FutureRecord::to(topic)
                    .partition(partition)
                    .key(key)
                    .payload(value);
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push(delivery);
                        break;
                    }
                    // The producer's queue is full: let what is in flight land first.
                    Err((
                        rdkafka::error::KafkaError::MessageProduction(
                            rdkafka::types::RDKafkaErrorCode::QueueFull,
                        ),
                        _,
                    )) if !pending.is_empty() => wait_all(&mut pending).await?,
                    Err((e, _)) => anyhow::bail!("produce failed: {e}"),
                }
            }
        }
        wait_all(&mut pending).await
    }

    /// A consumer of `topic` from the beginning, in its own group.
    pub fn consumer(&self, topic: &str) -> anyhow::Result<StreamConsumer> {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", format!("test-reader-{topic}"))
            .set("auto.offset.reset", "earliest")
            .create()?;
        consumer.subscribe(&[topic])?;
        Ok(consumer)
    }
}

/// Waits for every acknowledgement of `pending`.
async fn wait_all(pending: &mut Vec<rdkafka::producer::DeliveryFuture>) -> anyhow::Result<()> {
    for delivery in pending.drain(..) {
        match delivery.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => anyhow::bail!("produce failed: {e}"),
            Err(_) => anyhow::bail!("produce cancelled"),
        }
    }
    Ok(())
}

/// Reads JSON values from `consumer` until none has come for `quiet` (after the first), or
/// `timeout` passes.
pub async fn read_until_quiet(
    consumer: &StreamConsumer,
    quiet: Duration,
    timeout: Duration,
) -> Vec<serde_json::Value> {
    read_at_least(consumer, 1, quiet, timeout).await
}

/// [`read_until_quiet`], where the reading stops at a quiet spell only once `at_least`
/// values have arrived: a pipeline still working through its backlog may be quiet for a
/// while on a loaded machine.
pub async fn read_at_least(
    consumer: &StreamConsumer,
    at_least: usize,
    quiet: Duration,
    timeout: Duration,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return out;
        }
        let wait = if out.len() < at_least {
            left
        } else {
            quiet.min(left)
        };
        match tokio::time::timeout(wait, consumer.recv()).await {
            Ok(Ok(m)) => {
                if let Ok(v) = serde_json::from_slice(m.payload().unwrap_or_default()) {
                    out.push(v);
                }
            }
            Ok(Err(_)) => {}
            Err(_) if out.len() < at_least => {}
            Err(_) => return out,
        }
    }
}

/// Reads JSON values from `consumer` until `n` have arrived or `timeout` passes.
pub async fn read_json(
    consumer: &StreamConsumer,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<(Option<String>, serde_json::Value)>> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            anyhow::bail!("timed out after {} of {n} records: {out:?}", out.len());
        }
        let Ok(message) = tokio::time::timeout(left, consumer.recv()).await else {
            continue;
        };
        let message = message?;
        let key = message
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned());
        let value = serde_json::from_slice(message.payload().unwrap_or_default())?;
        out.push((key, value));
    }
    Ok(out)
}

/// Reads whatever arrives on `consumer` within `wait` (to check that nothing more comes).
pub async fn read_more(consumer: &StreamConsumer, wait: Duration) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return out;
        }
        match tokio::time::timeout(left, consumer.recv()).await {
            Ok(Ok(m)) => {
                if let Ok(v) = serde_json::from_slice(m.payload().unwrap_or_default()) {
                    out.push(v);
                }
            }
            _ => return out,
        }
    }
}

/// Plans `statements` in turn on a fresh context (tables, settings, the query); the query
/// the last of them that plans to one.
pub async fn plan_query(
    statements: impl IntoIterator<Item = impl AsRef<str>>,
) -> anyhow::Result<StreamQuery> {
    let ctx = StreamContext::new();
    let mut query = None;
    for sql in statements {
        for statement in StreamContext::parse(sql.as_ref())? {
            if let Some(q) = ctx.plan(statement).await? {
                query = Some(q);
            }
        }
    }
    query.ok_or_else(|| anyhow::anyhow!("no query"))
}
