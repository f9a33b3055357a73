//! The embedded broker: librdkafka's mock cluster, a real Kafka-protocol broker on localhost
//! ports, in-process, with nothing to install. It is for function, not throughput: it consumes
//! at tens of thousands of messages per second, ignores TLS/SASL and does not support the
//! CreateTopics admin API (topics are created through it here), does not enforce
//! transactions (open and aborted transactions are visible to read_committed readers), and
//! keeps at most [`RETAINED_RECORDS`] records or 5 MiB per partition, dropping the oldest.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::{RDKafkaApiKey, RDKafkaErrorCode, RDKafkaRespErr};

use crate::error::{Error, Result};

/// Records a partition of the embedded broker keeps (librdkafka's mock cluster, fixed); it
/// also keeps at most 5 MiB. Older records are dropped: a consumer further behind loses them
/// (a query then fails with `data loss`, rather than skip them).
pub const RETAINED_RECORDS: usize = 100_000;

/// What `urbanstream broker` and the demo say about the embedded broker's limits.
pub const LIMITS: &str = "the embedded broker keeps at most 100 000 records or 5 MiB per \
     partition, dropping the oldest, and does not enforce transactions: for replays of more \
     data, or to test exactly-once, use a real Kafka (--brokers)";

/// An in-process Kafka-protocol broker. Dropping it shuts it down.
pub struct EmbeddedBroker {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl EmbeddedBroker {
    /// Starts a one-broker cluster on a free localhost port.
    pub fn start() -> Result<Self> {
        Ok(Self {
            cluster: MockCluster::new(1)?,
        })
    }

    /// Its `bootstrap.servers`.
    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// Creates `topic` with `partitions` partitions.
    pub fn create_topic(&self, topic: &str, partitions: i32) -> Result<()> {
        Ok(self.cluster.create_topic(topic, partitions, 1)?)
    }

    /// Fault injection: takes the broker down (connections closed, new ones refused) or
    /// brings it back up. Its data is kept.
    pub fn set_down(&self, down: bool) -> Result<()> {
        if down {
            self.cluster.broker_down(BROKER_ID)?;
        } else {
            self.cluster.broker_up(BROKER_ID)?;
        }
        Ok(())
    }

    /// Fault injection: the next requests of kind `api` fail, one per error, in order (then
    /// requests succeed again). `RD_KAFKA_RESP_ERR__TRANSPORT` drops the connection instead.
    pub fn fail_requests(&self, api: RDKafkaApiKey, errors: &[RDKafkaRespErr]) {
        self.cluster.request_errors(api, errors);
    }

    /// Fault injection: delays every response of the broker by `delay` (zero to stop).
    pub fn set_round_trip_time(&self, delay: Duration) -> Result<()> {
        Ok(self.cluster.broker_round_trip_time(BROKER_ID, delay)?)
    }
}

/// The id of the embedded cluster's one broker.
const BROKER_ID: i32 = 1;

/// How long a command waits for a broker to answer before it gives up.
pub const REACH_TIMEOUT: Duration = Duration::from_secs(5);

/// Checks within [`REACH_TIMEOUT`] that the Kafka at `brokers` answers a metadata request;
/// the error names the address and what to try.
pub async fn check_reachable(brokers: &str) -> Result<()> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("socket.connection.setup.timeout.ms", "4000")
        .set("log_level", "0")
        .create()?;
    let answer = tokio::task::spawn_blocking(move || {
        consumer
            .fetch_metadata(None, REACH_TIMEOUT)
            .map(|m| m.brokers().len())
    })
    .await
    .map_err(|e| Error::Config(format!("checking the broker: {e}")))?;
    match answer {
        Ok(_) => Ok(()),
        Err(e) => Err(Error::Config(format!(
            "no Kafka broker answered at {brokers} within {} s ({e}): check the address and \
             that the broker runs (`urbanstream broker` starts a local one), or leave out \
             --brokers to use the embedded broker",
            REACH_TIMEOUT.as_secs()
        ))),
    }
}

/// Creates topics on an external Kafka through the admin API; existing topics are left alone.
pub async fn create_topics(brokers: &str, topics: &[(String, i32)]) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&new, &options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(Error::Config(format!(
                    "cannot create topic {topic}: {code}"
                )));
            }
        }
    }
    Ok(())
}
