//! Stage 1 of repartitioned queries: the internal topic and the input partitions' progress
//! (see [`crate::plan::repartition`]).

use std::collections::HashMap;
use std::time::Duration;

use datafusion::arrow::array::RecordBatch;
use tracing::debug;

use super::PipelineConfig;
use crate::error::{Error, Result};
use crate::plan::repartition::KeyPlan;
use crate::source::partitions_of;

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
}

/// Per partition, the largest event time of the rows of `batch` (`partitions[i]` is row i's)
/// not later than `limit` (rows later are diverted), and at most `now` (a clock ahead within
/// the tolerance does not move the watermark past processing time).
pub(super) fn event_time_maxima(
    batch: &RecordBatch,
    time: &str,
    partitions: &[i32],
    limit: i64,
    now: i64,
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
            let t = t.min(now);
            let m = out.entry(*p).or_insert(t);
            *m = (*m).max(t);
        }
    }
    Ok(out)
}

/// Creates the repartition topic `topic` for input `input` with as many partitions as the
/// input, unless it exists (through the admin API; a broker without it, like the embedded
/// one, creates it on first use); returns how many partitions it and the input have.
pub(super) async fn repartition_topic(
    config: &PipelineConfig,
    input: &str,
    topic: &str,
) -> Result<(u32, u32)> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::consumer::BaseConsumer;
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
        Ok(partitions_of(probe, &[name.to_string()], Duration::from_secs(10))?.len())
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
