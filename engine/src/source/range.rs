//! A bounded range of a topic's records, read once (for previews): every partition from a
//! start (an offset, the first record at or after a time, or the log's start) to an end (an
//! offset, the first record at or after a time, or the partition's end when the read began).
//! The embedded broker cannot look offsets up by time: there, every record of the partitions
//! is read and those written outside the times are left out.

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::{RawBatch, is_mock_cluster, partitions_of};
use crate::error::{Error, Result};

/// Which records of each partition.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TopicRange {
    /// First offset read (default: the log's start, or `from_ms`).
    #[serde(default)]
    pub from_offset: Option<i64>,
    /// Offset read up to, excluded (default: the end when the read began, or `to_ms`).
    #[serde(default)]
    pub to_offset: Option<i64>,
    /// Read from the first record written at or after this time (its Kafka timestamp, not
    /// its event time), epoch ms.
    #[serde(default)]
    pub from_ms: Option<i64>,
    /// Read up to the first record written at or after this time (its Kafka timestamp),
    /// epoch ms.
    #[serde(default)]
    pub to_ms: Option<i64>,
}

impl TopicRange {
    /// Why the range cannot be read, if it cannot: offsets and times are 0 or more (Kafka
    /// takes a negative one for a special position, or fails on it).
    pub fn check(&self) -> Result<()> {
        for (field, value, what) in [
            ("from_offset", self.from_offset, "an offset"),
            ("to_offset", self.to_offset, "an offset"),
            ("from_ms", self.from_ms, "a time in epoch milliseconds"),
            ("to_ms", self.to_ms, "a time in epoch milliseconds"),
        ] {
            if let Some(v) = value
                && v < 0
            {
                return Err(Error::Config(format!(
                    "topic.{field} {v}: {what}, 0 or more"
                )));
            }
        }
        Ok(())
    }
}

/// What a read gave: the records in batches of at most `batch_rows`, and whether it stopped
/// at `max_records` before the range's end.
pub struct RangeRead {
    /// The records, partitions interleaved as they arrived.
    pub batches: Vec<RawBatch>,
    /// Whether records of the range were left unread.
    pub truncated: bool,
}

/// Reads `range` of `topic` through a consumer of its own (no group, nothing committed),
/// at most `max_records` records and `max_bytes` of keys and values in all, within
/// `timeout`. Blocking.
pub fn read_range(
    brokers: &str,
    properties: &[(String, String)],
    topic: &str,
    range: &TopicRange,
    (max_records, max_bytes): (usize, usize),
    timeout: Duration,
) -> Result<RangeRead> {
    range.check()?;
    let mut config = ClientConfig::new();
    for (k, v) in properties {
        config.set(k, v);
    }
    let consumer: BaseConsumer = config
        .set("bootstrap.servers", brokers)
        .set("group.id", "urbanstream-preview")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("isolation.level", "read_committed")
        .create()?;
    let started = Instant::now();
    let left = || {
        timeout
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(1))
    };
    let partitions = partitions_of(&consumer, &[topic.to_string()], left())?;
    if partitions.is_empty() {
        return Err(Error::Config(format!(
            "topic {topic} has no partitions (does it exist on {brokers}?)"
        )));
    }
    let at_times = |ms: i64| -> Result<Vec<Option<i64>>> {
        let mut list = TopicPartitionList::new();
        for (_, p) in &partitions {
            list.add_partition_offset(topic, *p, Offset::Offset(ms))?;
        }
        let found = consumer.offsets_for_times(list, left())?;
        Ok(partitions
            .iter()
            .map(|(_, p)| {
                found
                    .find_partition(topic, *p)
                    .and_then(|e| e.offset().to_raw())
                    .filter(|o| *o >= 0)
            })
            .collect())
    };
    // The embedded broker finds no offset for a time (it answers "none at or after it" for
    // every time): its records' timestamps are compared as they are read instead.
    let by_time = range.from_ms.is_some() || range.to_ms.is_some();
    let scan = by_time && is_mock_cluster(&consumer, left());
    let (from_times, to_times) = if scan {
        (None, None)
    } else {
        (
            range.from_ms.map(&at_times).transpose()?,
            range.to_ms.map(&at_times).transpose()?,
        )
    };
    let in_time = |t: Option<i64>| {
        !scan
            || t.is_some_and(|t| {
                range.from_ms.is_none_or(|from| t >= from) && range.to_ms.is_none_or(|to| t < to)
            })
    };
    // (partition, first offset, end offset excluded), the empty ones left out.
    let mut spans = Vec::new();
    for (i, (_, p)) in partitions.iter().enumerate() {
        let (low, high) = consumer.fetch_watermarks(topic, *p, left())?;
        let mut start = range.from_offset.unwrap_or(low).max(low);
        if let Some(times) = &from_times {
            start = start.max(times[i].unwrap_or(high));
        }
        let mut end = range.to_offset.unwrap_or(high).min(high);
        if let Some(times) = &to_times {
            end = end.min(times[i].unwrap_or(high));
        }
        if start < end {
            spans.push((*p, start, end));
        }
    }
    let mut list = TopicPartitionList::new();
    for (p, start, _) in &spans {
        list.add_partition_offset(topic, *p, Offset::Offset(*start))?;
    }
    consumer.assign(&list)?;
    let mut open: std::collections::HashMap<i32, i64> =
        spans.iter().map(|(p, _, end)| (*p, *end)).collect();
    let mut batches = Vec::new();
    let mut batch = RawBatch::new(topic);
    let mut read = 0usize;
    let mut bytes = 0usize;
    let mut truncated = false;
    while !open.is_empty() {
        if read >= max_records || bytes >= max_bytes {
            truncated = true;
            break;
        }
        if started.elapsed() >= timeout {
            return Err(Error::Config(format!(
                "reading {topic} took longer than {}: preview a shorter range",
                humantime::format_duration(timeout)
            )));
        }
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            // A partition ending in a transaction marker (never delivered) is done once the
            // consumer's position passes the end.
            let positions = consumer.position()?;
            open.retain(|p, end| {
                positions
                    .find_partition(topic, *p)
                    .and_then(|e| e.offset().to_raw())
                    .is_none_or(|position| position < *end)
            });
            continue;
        };
        let message = message?;
        let (p, offset) = (message.partition(), message.offset());
        let Some(end) = open.get(&p).copied() else {
            continue;
        };
        if offset < end && in_time(message.timestamp().to_millis()) {
            batch.push(p, offset, message.key(), message.payload());
            read += 1;
            bytes +=
                message.key().map_or(0, <[u8]>::len) + message.payload().map_or(0, <[u8]>::len);
            if batch.len() >= 8192 {
                batches.push(std::mem::replace(&mut batch, RawBatch::new(topic)));
            }
        }
        if offset + 1 >= end {
            open.remove(&p);
        }
    }
    if !batch.is_empty() {
        batches.push(batch);
    }
    Ok(RangeRead { batches, truncated })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

    /// Regression: on the embedded broker, which finds no offset for a time, a range from a
    /// time read nothing and a range to a time read every record. Records of two partitions
    /// written a second apart are read by their timestamps, and by offsets as before.
    #[test]
    fn a_time_range_reads_the_records_written_in_it_on_the_embedded_broker() {
        let broker = crate::broker::EmbeddedBroker::start().expect("broker");
        broker.create_topic("ranged", 2).expect("topic");
        let brokers = broker.bootstrap_servers();
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()
            .expect("producer");
        const T: i64 = 1_767_222_000_000;
        for p in 0..2 {
            for i in 0..10i64 {
                let value = format!("{p}:{i}");
                producer
                    .send(
                        BaseRecord::<(), _>::to("ranged")
                            .partition(p)
                            .payload(&value)
                            .timestamp(T + i * 1_000),
                    )
                    .expect("send");
            }
        }
        producer.flush(Duration::from_secs(10)).expect("flush");
        let read = |range: TopicRange| -> Vec<String> {
            let read = read_range(
                &brokers,
                &[],
                "ranged",
                &range,
                (1_000, 1 << 20),
                Duration::from_secs(30),
            )
            .expect("read");
            let mut values: Vec<String> = read
                .batches
                .iter()
                .flat_map(|b| {
                    (0..b.len()).map(|i| String::from_utf8_lossy(b.value(i)).into_owned())
                })
                .collect();
            values.sort();
            values
        };
        let expect = |from: i64, to: i64| -> Vec<String> {
            let mut v: Vec<String> = (0..2)
                .flat_map(|p| (from..to).map(move |i| format!("{p}:{i}")))
                .collect();
            v.sort();
            v
        };
        let between = read(TopicRange {
            from_ms: Some(T + 3_000),
            to_ms: Some(T + 7_000),
            ..TopicRange::default()
        });
        assert_eq!(between, expect(3, 7));
        let from = read(TopicRange {
            from_ms: Some(T + 8_500),
            ..TopicRange::default()
        });
        assert_eq!(from, expect(9, 10));
        let to = read(TopicRange {
            to_ms: Some(T + 2_000),
            ..TopicRange::default()
        });
        assert_eq!(to, expect(0, 2));
        let offsets = read(TopicRange {
            from_offset: Some(4),
            to_offset: Some(6),
            ..TopicRange::default()
        });
        assert_eq!(offsets, expect(4, 6));
        let later = read(TopicRange {
            from_ms: Some(T + 60_000),
            ..TopicRange::default()
        });
        assert!(later.is_empty(), "{later:?}");
    }
}
