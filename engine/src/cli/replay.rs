//! `urbanstream replay`: a CSV, JSON-lines or Parquet file produced into a topic as JSON records
//! (or Confluent-framed Avro records of a topic schema), in event-time order, as fast as the
//! broker takes them or paced.
//!
//! The file is read through DataFusion (streamed, sorted by event time with spilling), its
//! columns renamed as asked, its event-time column turned into epoch milliseconds (numbers in
//! the given unit; text as RFC 3339, or as `YYYY-MM-DD HH:MM[:SS]` in the given time zone), and
//! each row produced as one JSON object keyed by the key column. Rows without a readable event
//! time are not produced; they are counted and the first is shown.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use datafusion::arrow::array::{Array, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use futures::StreamExt;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::decode::{AvroEncoder, Registry};
use crate::error::{Error, Result};
use crate::pipeline::offline::{Unreadable, open_file, unit_ms, with_epoch_ms};
use crate::topics::Format;

/// Options of `replay`.
#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    /// The file: CSV with a header (`.csv`), JSON lines (`.jsonl`, `.ndjson`, `.json`) or
    /// Parquet (`.parquet`).
    #[arg(long)]
    pub file: PathBuf,
    /// Topic to produce into.
    #[arg(long)]
    pub topic: String,
    /// Kafka bootstrap servers.
    #[arg(long, default_value = "localhost:9092")]
    pub brokers: String,
    /// Column whose value keys each record (e.g. `sensor_id`), after renaming; none: no key.
    #[arg(long)]
    pub key: Option<String>,
    /// Event-time column, after renaming: records go out in its order, as epoch milliseconds.
    #[arg(long)]
    pub time: Option<String>,
    /// Unit of a numeric event-time column: `s`, `ms` or `us`.
    #[arg(long, default_value = "ms")]
    pub time_unit: String,
    /// Time zone of event-time texts written without one, as an offset (`+07:00`) or a name
    /// (`Asia/Ho_Chi_Minh`).
    #[arg(long, default_value = "+00:00")]
    pub time_zone: String,
    /// Renames a column: `--rename station=sensor_id` (repeatable).
    #[arg(long)]
    pub rename: Vec<String>,
    /// Paces records by event time, this many times faster than real time (e.g. 3600: an
    /// hour of data a second); without it, as fast as the broker takes them.
    #[arg(long, value_parser = super::positive)]
    pub speedup: Option<f64>,
    /// Creates the topic with this many partitions when it is missing (on a broker with the
    /// admin API).
    #[arg(long)]
    pub partitions: Option<i32>,
    /// Record format: `json`, `avro` (Confluent wire format) or `protobuf` (plain messages);
    /// the last two need `--schema`.
    #[arg(long, default_value = "json", value_parser = parse_format)]
    pub format: Format,
    /// With `--format avro`: the records' Avro schema, a topic schema's name
    /// (`camera_event`, `air_reading`, …) or an `.avsc` file, registered under the subject
    /// `<topic>-value`. With `--format protobuf`: the message's full name
    /// (`urbanstream.city.AirReading`, or one of `--descriptors`).
    #[arg(long)]
    pub schema: Option<String>,
    /// With `--format protobuf`: `.proto` or `FileDescriptorSet` files with the message
    /// (repeatable); the city's messages need none.
    #[arg(long)]
    pub descriptors: Vec<PathBuf>,
    /// With `--format avro`: the schema registry, a Confluent Schema Registry's URL or a
    /// directory (the service's default directory registry).
    #[arg(long, default_value = "urbanstream-data/registry")]
    pub registry: String,
}

impl ReplayArgs {
    /// `file` into `topic` at `brokers` with the command line's defaults: no key, no event
    /// time (file order), JSON, unpaced.
    pub fn new(file: impl Into<PathBuf>, topic: &str, brokers: &str) -> Self {
        Self {
            file: file.into(),
            topic: topic.to_string(),
            brokers: brokers.to_string(),
            key: None,
            time: None,
            time_unit: "ms".into(),
            time_zone: "+00:00".into(),
            rename: Vec::new(),
            speedup: None,
            partitions: None,
            format: Format::Json,
            schema: None,
            descriptors: Vec::new(),
            registry: "urbanstream-data/registry".into(),
        }
    }
}

fn parse_format(s: &str) -> std::result::Result<Format, String> {
    Format::parse(s).ok_or_else(|| format!("{s:?} is not a format: write json, avro or protobuf"))
}

/// The registry at `location`: a URL, or a directory.
pub fn registry_at(location: &str) -> Result<Registry> {
    if location.starts_with("http://") || location.starts_with("https://") {
        Registry::http(location)
    } else {
        Registry::dir(location)
    }
}

/// Turns a row's JSON into a record of another format.
type Encode = Box<dyn Fn(&[u8]) -> Result<Vec<u8>> + Send + Sync>;

/// The encoder of `args`' format (`None`: JSON as it is).
async fn encoder(args: &ReplayArgs) -> Result<Option<Encode>> {
    Ok(match args.format {
        Format::Json => None,
        Format::Avro => {
            let e = avro_encoder(args).await?;
            Some(Box::new(move |json| e.encode_json(json)))
        }
        Format::Protobuf => {
            let Some(message) = &args.schema else {
                return Err(Error::Config(
                    "--format protobuf needs --schema: the message's full name (e.g. \
                     urbanstream.city.AirReading)"
                        .into(),
                ));
            };
            let descriptors = crate::decode::Descriptors::load(&args.descriptors)?;
            let e = crate::decode::ProtobufEncoder::new(descriptors.message(message)?, None);
            Some(Box::new(move |json| e.encode_json(json)))
        }
    })
}

/// The Avro encoder of `args`: its schema registered under `<topic>-value`.
async fn avro_encoder(args: &ReplayArgs) -> Result<AvroEncoder> {
    let Some(schema) = &args.schema else {
        return Err(Error::Config(
            "--format avro needs --schema: a topic schema's name (camera_event, air_reading, \
             …) or an .avsc file"
                .into(),
        ));
    };
    let text = match crate::decode::avro::embedded_avsc(schema) {
        Some(text) => text.to_string(),
        None => std::fs::read_to_string(schema).map_err(|e| {
            Error::Config(format!(
                "--schema {schema}: neither a topic schema's name nor a readable file ({e})"
            ))
        })?,
    };
    let registry = registry_at(&args.registry)?;
    AvroEncoder::registered(&registry, &format!("{}-value", args.topic), &text).await
}

/// What a replay did.
#[derive(Debug, Default)]
pub struct ReplaySummary {
    /// Records acknowledged by the broker.
    pub produced: u64,
    /// Rows without a readable event time, not produced.
    pub skipped: u64,
    /// The first of those, shown.
    pub first_skipped: Option<String>,
    /// Rows the Avro schema or Protobuf message cannot hold (a required field missing, a value of another type),
    /// not produced.
    pub unfit: u64,
    /// The first of those, with the reason.
    pub first_unfit: Option<String>,
    /// Rows whose record is larger than the producer sends (`message.max.bytes`), not
    /// produced.
    pub too_large: u64,
    /// The first of those: its size and how it begins.
    pub first_too_large: Option<String>,
    /// Lines of the file that cannot be a row, not produced.
    pub malformed: crate::pipeline::offline::Malformed,
    /// Event times of the first and last records produced.
    pub span_ms: Option<(i64, i64)>,
    /// Records and bytes (keys and values) acknowledged, by partition.
    pub per_partition: std::collections::BTreeMap<i32, (u64, u64)>,
    /// Whether the broker is the embedded one (librdkafka's mock cluster), which keeps only
    /// the newest records of a partition ([`crate::broker::LIMITS`]).
    pub embedded_broker: bool,
    /// On the embedded broker, where each partition written to begins after the replay: past
    /// 0, it dropped the oldest records.
    pub log_starts: std::collections::BTreeMap<i32, i64>,
}

impl ReplaySummary {
    /// The partitions whose oldest records the embedded broker dropped (its log now begins
    /// past 0), with the records and bytes the replay gave each and where it now begins; none
    /// on another broker. Measured, not estimated from the broker's limits (records of the
    /// topic from before count too: they are gone as well).
    pub fn beyond_embedded_limits(&self) -> Vec<(i32, u64, u64, i64)> {
        if !self.embedded_broker {
            return Vec::new();
        }
        self.per_partition
            .iter()
            .filter_map(|(p, (records, bytes))| {
                let start = *self.log_starts.get(p)?;
                (start > 0).then_some((*p, *records, *bytes, start))
            })
            .collect()
    }
}

/// Creates `args.topic` with `partitions` partitions unless it exists. The embedded broker
/// (librdkafka's mock cluster) takes no CreateTopics: asked to, the replay waited a minute and
/// failed with a timeout; it is refused at once, saying what to do instead.
async fn create_topic(args: &ReplayArgs, partitions: i32) -> Result<()> {
    use rdkafka::consumer::BaseConsumer;
    let (brokers, topic) = (args.brokers.clone(), args.topic.clone());
    let (existing, mock) = tokio::task::spawn_blocking(move || -> Result<(usize, bool)> {
        let probe: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create()?;
        let existing =
            crate::source::partitions_of(&probe, &[topic], Duration::from_secs(10))?.len();
        Ok((
            existing,
            crate::source::is_mock_cluster(&probe, Duration::from_secs(5)),
        ))
    })
    .await
    .map_err(|e| Error::Config(format!("asking the broker about {}: {e}", args.topic)))??;
    if existing > 0 {
        if existing != partitions as usize {
            eprintln!(
                "note: topic {} exists with {existing} partitions, not {partitions}: replaying \
                 into it as it is",
                args.topic
            );
        }
        return Ok(());
    }
    if mock {
        return Err(Error::Config(format!(
            "--partitions {partitions}: the embedded broker cannot create topics on request; it \
             creates {} on its first record, with its own partition count. Replay without \
             --partitions, or into a Kafka that has the admin API",
            args.topic
        )));
    }
    crate::broker::create_topics(&args.brokers, &[(args.topic.clone(), partitions)]).await
}

/// Produces `args.file` into `args.topic`.
pub async fn replay(args: &ReplayArgs) -> Result<ReplaySummary> {
    // The service refuses these names for a query's topics; a replay does as well.
    crate::plan::table::check_topic_name(&args.topic).map_err(|e| {
        Error::Config(match e {
            datafusion::error::DataFusionError::Plan(m) => format!("--topic: {m}"),
            e => format!("--topic: {e}"),
        })
    })?;
    // A city input topic's records are placed by its declared key: queries keep one state
    // per partition on that (the built-in ward air indicators among them), and records keyed
    // by another column split one ward's readings between partitions' states, each hour
    // incomplete and without an AQI.
    if let Some(declared) = crate::schema::SchemaRegistry::embedded()?
        .streams()?
        .into_iter()
        .map(|(_, d)| d)
        .find(|d| d.topic == args.topic && d.role == crate::schema::StreamRole::Input)
        && let Some(key) = &declared.key
        && args.key.as_deref() != Some(key.as_str())
    {
        return Err(Error::Config(format!(
            "{} is keyed by {key}: queries keep their state per partition on it, and records \
             keyed otherwise would split a {key}'s records between partitions; replay with \
             --key {key}",
            args.topic
        )));
    }
    if args.speedup.is_some() && args.time.is_none() {
        return Err(Error::Config(
            "--speedup paces records by their event times: name the event-time column with \
             --time (without it the records went as fast as the broker took them)"
                .into(),
        ));
    }
    crate::broker::check_reachable(&args.brokers).await?;
    if let Some(partitions) = args.partitions {
        create_topic(args, partitions).await?;
    }
    let unit_ms = unit_ms(&args.time_unit)?;
    let encoder = encoder(args).await?;
    let opened = open_file(
        &args.file,
        &args.rename,
        (args.time.as_deref(), unit_ms, &args.time_zone),
        args.key.as_deref(),
        false,
    )
    .await?;
    let mut stream = opened.stream;

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("linger.ms", "20")
        .set("enable.idempotence", "true")
        .create()?;
    let mut summary = ReplaySummary {
        malformed: opened.malformed,
        ..ReplaySummary::default()
    };
    let mut unreadable = Unreadable::default();
    let started = Instant::now();
    let mut last_report = Instant::now();
    let mut pace: Option<(i64, Instant)> = None;
    let mut inflight = Vec::new();
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        let (batch, times) = match &args.time {
            Some(time) => {
                let (batch, times) =
                    with_epoch_ms(&batch, time, unit_ms, &args.time_zone, &mut unreadable)?;
                (batch, Some(times))
            }
            None => (batch, None),
        };
        if batch.num_rows() == 0 {
            continue;
        }
        let keys = match &args.key {
            Some(k) => {
                let column = batch
                    .column_by_name(k)
                    .ok_or_else(|| Error::Config(format!("key column {k} is missing")))?;
                let texts = cast(column, &DataType::Utf8)?;
                // A field of several kinds holds its values' JSON texts: a text's key is the
                // text, not its quoted JSON (`A7`, not `"A7"`).
                let values = batch
                    .schema()
                    .field_with_name(k)
                    .is_ok_and(|f| f.metadata().contains_key(crate::sink::JSON_VALUE_TEXT));
                Some(if values { unquoted(&texts) } else { texts })
            }
            None => None,
        };
        let keys = keys
            .as_ref()
            .and_then(|k| k.as_any().downcast_ref::<StringArray>());
        let (bytes, ends) = crate::sink::encode_json_rows(&batch)?;
        let mut start = 0;
        for (r, end) in ends.into_iter().enumerate() {
            if let (Some(speedup), Some(times)) = (args.speedup, &times) {
                let t = times.value(r);
                let (t0, wall0) = *pace.get_or_insert((t, Instant::now()));
                let due =
                    wall0 + Duration::from_secs_f64(((t - t0).max(0) as f64 / 1_000.0) / speedup);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    tokio::time::sleep(wait).await;
                }
            }
            let key = keys.filter(|k| !k.is_null(r)).map(|k| k.value(r));
            let json = &bytes[start..end];
            start = end + 1;
            let encoded;
            let value = match &encoder {
                Some(encode) => match encode(json) {
                    Ok(v) => {
                        encoded = v;
                        &encoded[..]
                    }
                    Err(e) => {
                        summary.unfit += 1;
                        if summary.first_unfit.is_none() {
                            summary.first_unfit =
                                Some(format!("{}: {e}", String::from_utf8_lossy(json)));
                        }
                        continue;
                    }
                },
                None => json,
            };
            let mut record = FutureRecord::<str, [u8]>::to(&args.topic).payload(value);
            if let Some(key) = key {
                record = record.key(key);
            }
            let bytes = (value.len() + key.map_or(0, str::len)) as u64;
            match producer.send_result(record) {
                Ok(delivery) => {
                    inflight.push((delivery, bytes));
                    if let Some(times) = &times {
                        let t = times.value(r);
                        summary.span_ms = Some(match summary.span_ms {
                            Some((a, b)) => (a.min(t), b.max(t)),
                            None => (t, t),
                        });
                    }
                }
                // One row too large for the producer is left out, counted and named; the
                // rows after it go on (it once stopped the replay part-way, unsummed).
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::MessageSizeTooLarge,
                    ),
                    _,
                )) => {
                    summary.too_large += 1;
                    if summary.first_too_large.is_none() {
                        summary.first_too_large = Some(too_large(value, json));
                    }
                }
                Err((e, _)) => return Err(Error::Kafka(e)),
            }
            if inflight.len() >= 10_000 {
                acknowledged(std::mem::take(&mut inflight), &mut summary).await?;
            }
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            tracing::info!(
                produced = summary.produced + inflight.len() as u64,
                rate = ((summary.produced + inflight.len() as u64) as f64
                    / started.elapsed().as_secs_f64()) as u64,
                "replaying"
            );
        }
    }
    acknowledged(inflight, &mut summary).await?;
    let (brokers, topic) = (args.brokers.clone(), args.topic.clone());
    let partitions: Vec<i32> = summary.per_partition.keys().copied().collect();
    (summary.embedded_broker, summary.log_starts) = tokio::task::spawn_blocking(move || {
        let Ok(probe) = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .create::<rdkafka::consumer::BaseConsumer>()
        else {
            return (false, Default::default());
        };
        if !crate::source::is_mock_cluster(&probe, Duration::from_secs(5)) {
            return (false, Default::default());
        }
        let starts = partitions
            .into_iter()
            .filter_map(|p| {
                use rdkafka::consumer::Consumer;
                let (low, _) = probe
                    .fetch_watermarks(&topic, p, Duration::from_secs(5))
                    .ok()?;
                Some((p, low))
            })
            .collect();
        (true, starts)
    })
    .await
    .unwrap_or_default();
    summary.skipped = unreadable.skipped;
    summary.first_skipped = unreadable.first;
    Ok(summary)
}

/// Waits for deliveries; how many were acknowledged (the first failure is returned).
async fn acknowledged(
    deliveries: Vec<(rdkafka::producer::DeliveryFuture, u64)>,
    summary: &mut ReplaySummary,
) -> Result<()> {
    for (d, bytes) in deliveries {
        match d.await {
            Ok(Ok(delivery)) => {
                summary.produced += 1;
                let partition = summary.per_partition.entry(delivery.partition).or_default();
                *partition = (partition.0 + 1, partition.1 + bytes);
            }
            // The broker refused a batch of records as too large, which says nothing of one
            // record's size (librdkafka does not split a batch): stop, saying what to change.
            Ok(Err((
                rdkafka::error::KafkaError::MessageProduction(
                    rdkafka::types::RDKafkaErrorCode::MessageSizeTooLarge,
                ),
                _,
            ))) => {
                return Err(Error::Config(format!(
                    "the broker refused a batch of records as too large after {} records were \
                     produced: the topic's max.message.bytes is below what the producer sends \
                     at once (its batch.size, 1 MB): raise the topic's max.message.bytes, or \
                     replay again with a smaller batch.size in the producer's settings",
                    summary.produced
                )));
            }
            Ok(Err((e, _))) => return Err(Error::Kafka(e)),
            Err(_) => {
                return Err(Error::Config(
                    "the producer went away before a record was acknowledged".into(),
                ));
            }
        }
    }
    Ok(())
}

/// A record too large to produce, named: its size and how it begins.
fn too_large(value: &[u8], row: &[u8]) -> String {
    let text = String::from_utf8_lossy(&row[..row.len().min(120)]);
    format!("{} bytes, beginning {text}…", value.len())
}

/// Texts of JSON values as the keys they stand for: a JSON string's own text, any other
/// value's JSON text as it is.
fn unquoted(texts: &datafusion::arrow::array::ArrayRef) -> datafusion::arrow::array::ArrayRef {
    use datafusion::arrow::array::AsArray;
    let keys: StringArray = texts
        .as_string::<i32>()
        .iter()
        .map(|t| {
            t.map(|t| match serde_json::from_str::<String>(t) {
                Ok(inner) => inner,
                Err(_) => t.to_string(),
            })
        })
        .collect();
    std::sync::Arc::new(keys)
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{ArrayRef, AsArray, StringArray};

    /// A key column of a JSON field of several kinds holds its values' JSON texts: a text
    /// keys its records by itself, as it did before the field held other kinds too.
    #[test]
    fn a_key_of_several_kinds_is_the_text_not_its_json() {
        let texts: ArrayRef = std::sync::Arc::new(StringArray::from(vec![
            Some("\"A7\""),
            Some("101"),
            None,
            Some("\"a\\\"b\""),
            Some("[1]"),
        ]));
        let keys = super::unquoted(&texts);
        let keys: Vec<Option<&str>> = keys.as_string::<i32>().iter().collect();
        assert_eq!(
            keys,
            [Some("A7"), Some("101"), None, Some("a\"b"), Some("[1]")]
        );
    }
}
