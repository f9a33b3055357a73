//! Stage 1 of repartitioned queries: the internal topic and the input partitions' progress
//! (see [`crate::plan::repartition`]).

use std::collections::HashMap;
use std::time::Duration;

use datafusion::arrow::array::RecordBatch;
use tracing::debug;

use super::PipelineConfig;
use crate::error::{Error, Result};
use crate::plan::repartition::KeyPlan;
use crate::source::{is_mock_cluster, partitions_of};

/// Stage 1 of a repartitioned query (see [`crate::plan::repartition`]).
pub(super) struct Repartition {
    /// The input topic.
    pub(super) input: String,
    /// The internal topic, read by stage 2, and its number of partitions.
    pub(super) topic: String,
    pub(super) partitions: u32,
    /// The input topic's number of partitions.
    pub(super) inputs: u32,
    pub(super) keys: KeyPlan,
    /// Per input partition, the largest event time passed on in progress records.
    pub(super) progress: HashMap<i32, i64>,
    /// Per input partition this process holds, what stage 2 was last told of it.
    pub(super) announced: HashMap<i32, Announced>,
}

/// What stage 2 was last told of an input partition stage 1 holds.
#[derive(Debug, Clone, Copy)]
pub(super) struct Announced {
    /// Whether it is behind the end of its log.
    pub(super) behind: bool,
    /// When, epoch ms (`i64::MIN`: not told yet).
    pub(super) at: i64,
    /// The count of lag measurements when it was taken up: stage 2 is told nothing of it
    /// until a measurement after that has reached it
    /// ([`crate::source::KafkaSource::measured_in`]).
    pub(super) from: u64,
}

/// How long stage 2 holds an input partition after stage 1 last said it is behind (stage 1
/// says so again every second at most while it is), unless stage 2's own partition has
/// records it has not read (which may hold the next notice): a notice that it caught up
/// may be lost with the process that would have sent it.
pub(super) const BEHIND_LEASE_MS: i64 = 3_000;

/// Per partition, the largest event time of the rows of `batch` (`partitions[i]` is row i's)
/// not later than `limit` (rows later are diverted). A time ahead of the clock is passed on as
/// it is: the watermark caps it by processing time as the clock goes on.
pub(super) fn event_time_maxima(
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
            && crate::time::in_time_range(t)
        {
            let m = out.entry(*p).or_insert(t);
            *m = (*m).max(t);
        }
    }
    Ok(out)
}

/// Creates the repartition topic `topic` for input `input` with as many partitions as the
/// input, unless it exists; returns how many partitions it and the input have.
pub(super) async fn repartition_topic(
    config: &PipelineConfig,
    input: &str,
    topic: &str,
) -> Result<(u32, u32)> {
    let inputs = partition_count(config, input)?.max(1);
    let n = ensure_topic(config, topic, inputs).await?;
    Ok((n, inputs))
}

fn client_config(config: &PipelineConfig, auto_create: bool) -> rdkafka::ClientConfig {
    let mut client = rdkafka::ClientConfig::new();
    client
        .set("bootstrap.servers", &config.brokers)
        .set("allow.auto.create.topics", auto_create.to_string());
    for (k, v) in &config.properties {
        client.set(k, v);
    }
    client
}

/// How many partitions `topic` has (0 when it does not exist).
pub(super) fn partition_count(config: &PipelineConfig, topic: &str) -> Result<u32> {
    use rdkafka::consumer::BaseConsumer;
    let probe: BaseConsumer = client_config(config, false).create()?;
    Ok(partitions_of(&probe, &[topic.to_string()], Duration::from_secs(10))?.len() as u32)
}

/// The end offsets of `topic`'s partitions `0..partitions`. Blocking.
pub(super) fn end_offsets(
    config: &PipelineConfig,
    topic: &str,
    partitions: u32,
) -> Result<Vec<((String, i32), i64)>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let probe: BaseConsumer = client_config(config, false).create()?;
    (0..partitions as i32)
        .map(|p| {
            let (_, high) = probe.fetch_watermarks(topic, p, Duration::from_secs(30))?;
            Ok(((topic.to_string(), p), high))
        })
        .collect()
}

/// Makes sure `topic` exists, creating it with `partitions` partitions when it does not:
/// through the admin API, then (a broker without it, like the embedded one) the way a broker
/// with `auto.create.topics.enable` creates topics, on a metadata request. Returns its
/// partition count; fails naming the topic when neither works.
pub(super) async fn ensure_topic(
    config: &PipelineConfig,
    topic: &str,
    partitions: u32,
) -> Result<u32> {
    use rdkafka::consumer::BaseConsumer;
    let count = |probe: &BaseConsumer| -> Result<u32> {
        Ok(partitions_of(probe, &[topic.to_string()], Duration::from_secs(10))?.len() as u32)
    };
    let probe: BaseConsumer = client_config(config, false).create()?;
    let existing = count(&probe)?;
    if existing > 0 {
        return Ok(existing);
    }
    // librdkafka's mock cluster (the embedded broker) has no CreateTopics: the admin call
    // would only time out. It creates topics on first use.
    if !is_mock_cluster(&probe, Duration::from_secs(5)) {
        create_topic(config, topic, partitions).await?;
    }
    let creator: BaseConsumer = client_config(config, true).create()?;
    for _ in 0..50 {
        let n = count(&creator)?;
        if n > 0 {
            return Ok(n);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(Error::Config(format!(
        "topic {topic} does not exist and could not be created (neither by the broker on first \
         use nor through the admin API); create it with {partitions} partitions"
    )))
}

/// Asks the broker's admin API to create `topic` with the configured topic settings. What it
/// answers is logged, not returned (the caller checks whether the topic exists), but for a
/// refusal of the topic settings: those are the operator's, and a topic created without them
/// (by the broker on first use) would silently lack them.
async fn create_topic(config: &PipelineConfig, topic: &str, partitions: u32) -> Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::types::RDKafkaErrorCode;
    let admin: AdminClient<DefaultClientContext> = client_config(config, false).create()?;
    // Replication as the broker sets it by default (KIP-464), like a topic it creates itself.
    let mut new = NewTopic::new(topic, partitions as i32, TopicReplication::Fixed(-1));
    for (key, value) in &config.topic_properties {
        new = new.set(key, value);
    }
    let options = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(5)))
        .request_timeout(Some(Duration::from_secs(5)));
    let created = tokio::time::timeout(
        Duration::from_secs(6),
        admin.create_topics([&new], &options),
    );
    match created.await {
        Ok(Ok(results)) => {
            for r in results {
                match r {
                    Err((_, RDKafkaErrorCode::TopicAlreadyExists)) | Ok(_) => {}
                    Err((_, code))
                        if !config.topic_properties.is_empty()
                            && matches!(
                                code,
                                RDKafkaErrorCode::InvalidConfig
                                    | RDKafkaErrorCode::InvalidRequest
                                    | RDKafkaErrorCode::PolicyViolation
                                    | RDKafkaErrorCode::InvalidReplicationFactor
                            ) =>
                    {
                        return Err(Error::Config(format!(
                            "the broker refused to create topic {topic} with \
                             [kafka.topic_properties] {}: {code}",
                            config
                                .topic_properties
                                .iter()
                                .map(|(k, v)| format!("{k}={v}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        )));
                    }
                    Err((_, code)) if !config.topic_properties.is_empty() => {
                        tracing::warn!(%topic, %code, "topic not created through the admin API \
                            with [kafka.topic_properties]; a topic the broker creates on first \
                            use will not have them");
                    }
                    Err((_, code)) => {
                        debug!(%topic, %code, "topic not created through the admin API");
                    }
                }
            }
        }
        Ok(Err(e)) => debug!(%topic, error = %e, "topic not created through the admin API"),
        Err(_) => debug!(%topic, "the admin API did not answer"),
    }
    Ok(())
}
