//! Stream tables: Kafka topics as DataFusion tables.
//!
//! A [`StreamTable`] is a topic with a schema and stream options. It is a source when a query
//! reads it and a sink when a query inserts into it. Tables come from `schemas/` at start-up
//! ([`StreamTable::from_topic_schema`]) or from SQL through [`KafkaTableFactory`]:
//!
//! ```sql
//! CREATE EXTERNAL TABLE camera_events (camera_id VARCHAR NOT NULL, segment_id VARCHAR NOT NULL,
//!     event_time TIMESTAMP NOT NULL, speed_kmh DOUBLE)
//! STORED AS KAFKA
//! OPTIONS ('topic' 'city.camera.events', 'format' 'json', 'event_time' 'event_time',
//!          'watermark_delay' '5s', 'idle_timeout' '1m');
//! ```
//!
//! Scanning a stream table yields a [`FeedExec`] that the engine feeds micro-batch by
//! micro-batch.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use datafusion::arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use datafusion::catalog::{Session, TableProvider, TableProviderFactory};
use datafusion::common::{Result, plan_datafusion_err, plan_err};
use datafusion::datasource::TableType;
use datafusion::logical_expr::{CreateExternalTable, Expr};
use datafusion::physical_plan::ExecutionPlan;

use super::feed::FeedExec;
use crate::schema::TopicSchema;
use crate::topics::Format;

/// The options of a stream table.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamOptions {
    /// Kafka topic.
    pub topic: String,
    /// Record format: `json`, or `avro` (Confluent wire format, writer schemas from the schema
    /// registry).
    pub format: Format,
    /// Event-time column (a timestamp), required to read the table in a windowed query.
    pub event_time: Option<String>,
    /// Allowed out-of-orderness: the watermark trails the largest event time by this much.
    pub watermark_delay: Duration,
    /// A partition silent for this long (processing time) stops holding the watermark back.
    pub idle_timeout: Duration,
    /// Unit of an event-time column carried as a JSON number: seconds, milliseconds (the
    /// default, as the city's topics) or microseconds. Strings are RFC 3339 whatever the unit.
    pub event_time_unit: TimeUnit,
    /// Events stamped further than this into the future (processing time) are diverted.
    /// Events within it are processed, but no event moves the watermark past processing time
    /// minus the delay.
    pub future_tolerance: Duration,
    /// Column whose value keys the topic's records: the key of the records a sink produces;
    /// for a source, the column its producers key records by (so all records with one value
    /// are in one partition), which lets queries grouping by it keep state per partition.
    pub key: Option<String>,
    /// The Protobuf message of a `protobuf` stream, by full name
    /// (`urbanstream.city.CameraEvent`), from the descriptors the service was given.
    pub protobuf_message: Option<String>,
    /// Columns identifying a row when the topic is a changelog (an upstream query's output,
    /// e.g. `segment_id, window_start`): a record replaces the earlier one with the same
    /// values, and one whose `op` is `retract` deletes it. Empty: every record is an event.
    pub upsert_key: Vec<String>,
    /// For a sink whose rows are published more than once (revised, fired early,
    /// withdrawn): a row whose key column is NULL or empty, which has no key to place it by,
    /// goes to partition 0, so that its revisions stay in order. Set by the planner.
    pub keyless_in_order: bool,
}

/// Refuses what is not a topic name Kafka takes (1 to 249 of `A-Z a-z 0-9 . _ -`, not `.` or
/// `..`), or is a broker's internal topic (`__consumer_offsets`, `__transaction_state`): a
/// topic's name also names its state's directory, and an internal topic is the broker's own.
pub fn check_topic_name(topic: &str) -> Result<()> {
    let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if topic.is_empty() || topic.len() > 249 || !topic.chars().all(legal) {
        return plan_err!(
            "topic '{}' is not a Kafka topic name: write 1 to 249 letters, digits, '.', '_' or \
             '-' (e.g. 'city.indicators.busy')",
            topic.escape_default()
        );
    }
    if topic == "." || topic == ".." {
        return plan_err!(
            "topic '{topic}' is not a Kafka topic name: '.' and '..' are not allowed"
        );
    }
    if topic.starts_with("__") {
        return plan_err!(
            "topic '{topic}' is internal to the broker (a name beginning with '__'): a query \
             neither reads nor writes it"
        );
    }
    Ok(())
}

impl StreamOptions {
    /// Defaults for `topic`: JSON, 5 s watermark delay, 1 min idle timeout, 10 s future
    /// tolerance, no event time, no key.
    pub fn new(topic: impl Into<String>) -> Self {
        Self {
            topic: topic.into(),
            format: Format::Json,
            event_time: None,
            watermark_delay: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            future_tolerance: Duration::from_secs(10),
            event_time_unit: TimeUnit::Millisecond,
            key: None,
            upsert_key: Vec::new(),
            protobuf_message: None,
            keyless_in_order: false,
        }
    }

    /// The option names understood in `OPTIONS (...)`.
    pub const NAMES: [&'static str; 10] = [
        "topic",
        "format",
        "event_time",
        "event_time_unit",
        "watermark_delay",
        "idle_timeout",
        "future_tolerance",
        "key",
        "upsert_key",
        "protobuf_message",
    ];

    /// Parses `OPTIONS (...)`; unknown names and bad values are errors that name them.
    pub fn parse(options: &HashMap<String, String>) -> Result<Self> {
        let get = |k: &str| {
            options
                .get(k)
                .or_else(|| options.get(&format!("format.{k}")))
        };
        for key in options.keys() {
            let bare = key.strip_prefix("format.").unwrap_or(key);
            if !Self::NAMES.contains(&bare) {
                return plan_err!(
                    "unknown option '{bare}' for a KAFKA table (known: {})",
                    Self::NAMES.join(", ")
                );
            }
        }
        let Some(topic) = get("topic") else {
            return plan_err!("a KAFKA table needs OPTIONS ('topic' '<name>')");
        };
        check_topic_name(topic)?;
        let mut out = Self::new(topic.clone());
        if let Some(format) = get("format") {
            let Some(format) = Format::parse(format) else {
                return plan_err!(
                    "format '{format}' is not supported: write 'json' (one JSON object per \
                     record), 'avro' (Confluent-framed Avro, schemas from the registry) or \
                     'protobuf' (with 'protobuf_message')"
                );
            };
            out.format = format;
        }
        out.protobuf_message = get("protobuf_message").cloned();
        match (out.format, &out.protobuf_message) {
            (Format::Protobuf, None) => {
                return plan_err!(
                    "a 'protobuf' stream names its message: OPTIONS ('protobuf_message' \
                     'package.Message'), e.g. 'urbanstream.city.CameraEvent'"
                );
            }
            (Format::Json | Format::Avro, Some(_)) => {
                return plan_err!(
                    "option 'protobuf_message' is for 'format' 'protobuf' streams only"
                );
            }
            _ => {}
        }
        out.event_time = get("event_time").cloned();
        out.key = get("key").cloned();
        if let Some(v) = get("upsert_key") {
            out.upsert_key = v
                .split(',')
                .map(|c| c.trim().to_string())
                .filter(|c| !c.is_empty())
                .collect();
            if out.upsert_key.is_empty() {
                return plan_err!(
                    "option 'upsert_key' names no column: write the columns that identify a \
                     row of the changelog, e.g. 'segment_id, window_start'"
                );
            }
        }
        let duration = |name: &str, value: &String| {
            let d = humantime::parse_duration(value).map_err(|e| {
                plan_datafusion_err!(
                    "option '{name}': '{value}' is not a duration ({e}); write e.g. '5s' or '1m'"
                )
            })?;
            within_bounds(&format!("option '{name}'"), value, d)
        };
        if let Some(v) = get("watermark_delay") {
            out.watermark_delay = duration("watermark_delay", v)?;
        }
        if let Some(v) = get("idle_timeout") {
            out.idle_timeout = duration("idle_timeout", v)?;
        }
        if let Some(v) = get("future_tolerance") {
            out.future_tolerance = duration("future_tolerance", v)?;
        }
        if let Some(v) = get("event_time_unit") {
            out.event_time_unit = match v.to_ascii_lowercase().as_str() {
                "s" => TimeUnit::Second,
                "ms" => TimeUnit::Millisecond,
                "us" => TimeUnit::Microsecond,
                _ => {
                    return plan_err!(
                        "option 'event_time_unit': '{v}' is not a unit; write 's' (epoch \
                         seconds), 'ms' (milliseconds) or 'us' (microseconds)"
                    );
                }
            };
        }
        Ok(out)
    }
}

/// The longest duration an option or setting takes: event times and processing times are
/// milliseconds in an `i64`, and a span longer than this would overflow them.
/// (Years of 365.25 days, as durations such as `'100y'` count them.)
pub const LONGEST_DURATION: Duration = Duration::from_secs(100 * 31_557_600);

/// `d`, parsed from `value` of `what`, when no longer than [`LONGEST_DURATION`].
pub(super) fn within_bounds(what: &str, value: &str, d: Duration) -> Result<Duration> {
    if d > LONGEST_DURATION {
        return plan_err!(
            "{what}: '{value}' is longer than 100 years, which no stream can wait for; write \
             e.g. '5s' or '1h'"
        );
    }
    Ok(d)
}

/// A Kafka topic as a table.
#[derive(Debug)]
pub struct StreamTable {
    /// Table name in SQL.
    pub name: String,
    /// Decoding schema (Avro-derived, or from the column list).
    pub topic_schema: Arc<TopicSchema>,
    /// Stream options.
    pub options: StreamOptions,
}

impl StreamTable {
    /// A table over `options.topic` with `schema`; the event-time column, if any, must be a
    /// timestamp of the schema, and the key column a column of it.
    pub fn new(
        name: impl Into<String>,
        schema: Arc<TopicSchema>,
        options: StreamOptions,
    ) -> Result<Self> {
        let name = name.into();
        let arrow = schema.output_schema();
        if let Some(col) = &options.event_time {
            match arrow.field_with_name(col) {
                Ok(f) if matches!(f.data_type(), DataType::Timestamp(..)) => {}
                Ok(f) => {
                    return plan_err!(
                        "table {name}: event_time column '{col}' is {}, not a timestamp",
                        f.data_type()
                    );
                }
                Err(_) => {
                    return plan_err!("table {name}: event_time column '{col}' does not exist");
                }
            }
        }
        if let Some(col) = &options.key
            && arrow.field_with_name(col).is_err()
        {
            return plan_err!("table {name}: key column '{col}' does not exist");
        }
        if !options.upsert_key.is_empty() {
            if options.event_time.is_none() {
                return plan_err!(
                    "table {name}: a changelog ('upsert_key') needs an event-time column \
                     (OPTIONS ('event_time' '<column>'), e.g. the upstream window_start)"
                );
            }
            for col in &options.upsert_key {
                if arrow.field_with_name(col).is_err() {
                    return plan_err!(
                        "table {name}: option 'upsert_key': {col} is not a column of the table \
                         (columns: {})",
                        arrow
                            .fields()
                            .iter()
                            .map(|f| f.name().as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
            }
            // Without it, a retraction of the upstream query would be read as a row.
            let op = arrow
                .fields()
                .iter()
                .find(|f| f.name().eq_ignore_ascii_case("op"));
            let fits = op.is_some_and(|f| {
                matches!(
                    f.data_type(),
                    DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
                )
            });
            if !fits {
                return plan_err!(
                    "table {name}: a table read as a changelog (OPTIONS 'upsert_key') needs an op \
                     VARCHAR column{}: a record with op = 'retract' deletes its key's row (the \
                     sinks of urbanstream's queries write it); a producer that never deletes \
                     leaves it null",
                    op.map(|f| format!(" (op is {})", f.data_type()))
                        .unwrap_or_default()
                );
            }
        }
        Ok(Self {
            name,
            topic_schema: schema,
            options,
        })
    }

    /// A table from a topic schema of `schemas/` (event time `event_time` if it has one).
    pub fn from_topic_schema(
        name: impl Into<String>,
        schema: Arc<TopicSchema>,
        topic: impl Into<String>,
        key: Option<&str>,
    ) -> Result<Self> {
        let mut options = StreamOptions::new(topic);
        let has_time = schema
            .arrow
            .field_with_name("event_time")
            .is_ok_and(|f| matches!(f.data_type(), DataType::Timestamp(TimeUnit::Millisecond, _)));
        if has_time {
            options.event_time = Some("event_time".into());
        }
        options.key = key.map(String::from);
        Self::new(name, schema, options)
    }
}

impl StreamTable {
    /// A decoder of the stream's records in `format` (its own, or the one its topic is read
    /// in), with its event-time column and Protobuf message.
    pub fn decoder(
        &self,
        format: crate::topics::Format,
        codecs: &crate::decode::Codecs,
    ) -> crate::error::Result<crate::decode::TopicDecoder> {
        crate::decode::TopicDecoder::new(
            format,
            self.topic_schema.clone(),
            self.options
                .event_time
                .as_deref()
                .map(|c| (c, self.options.event_time_unit)),
            codecs,
            self.options.protobuf_message.as_deref(),
        )
    }

    /// Checks that rows can be written to the stream in its format, as a sink: an Avro
    /// schema of its columns that Avro takes (field names, types), a Protobuf message of
    /// `descriptors` (the embedded ones when none) with a field for every column. Returns the
    /// Protobuf message of a Protobuf sink. Run before a query is registered, so that a query
    /// whose output cannot be written is refused rather than failing once started.
    pub fn check_writable(
        &self,
        descriptors: Option<&Arc<crate::decode::Descriptors>>,
    ) -> crate::error::Result<Option<prost_reflect::MessageDescriptor>> {
        use crate::error::Error;
        use crate::topics::Format;
        match self.options.format {
            Format::Avro => {
                let avsc = self.topic_schema.avro_schema()?;
                crate::decode::AvroEncoder::new(&avsc, 0).map_err(|e| {
                    Error::Config(format!(
                        "stream {} cannot be written as Avro: {e}",
                        self.name
                    ))
                })?;
                Ok(None)
            }
            Format::Protobuf => {
                let Some(message) = &self.options.protobuf_message else {
                    return Err(Error::Config(format!(
                        "stream {} is written as Protobuf but names no message; the city's \
                         outputs have none: [topics] output_format is json or avro",
                        self.name
                    )));
                };
                let message = match descriptors {
                    Some(d) => d.message(message)?,
                    None => crate::decode::Descriptors::embedded()?.message(message)?,
                };
                crate::decode::protobuf::check_writable(&message, &self.topic_schema.arrow)?;
                Ok(Some(message))
            }
            _ => Ok(None),
        }
    }
}

#[async_trait]
impl TableProvider for StreamTable {
    fn schema(&self) -> SchemaRef {
        self.topic_schema.output_schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        FeedExec::scan(self.name.clone(), self.schema(), projection)
    }
}

/// Creates [`StreamTable`]s for `CREATE EXTERNAL TABLE … STORED AS KAFKA`.
#[derive(Debug, Default)]
pub struct KafkaTableFactory;

#[async_trait]
impl TableProviderFactory for KafkaTableFactory {
    async fn create(
        &self,
        _state: &dyn Session,
        cmd: &CreateExternalTable,
    ) -> Result<Arc<dyn TableProvider>> {
        // The topic comes from OPTIONS ('topic' …) or, equivalently, LOCATION '<topic>'.
        let mut raw = cmd.options.clone();
        let location = cmd.locations.iter().find(|l| !l.is_empty());
        if let Some(location) = location {
            match raw.get("topic") {
                Some(topic) if topic != location => {
                    return plan_err!(
                        "LOCATION '{location}' and OPTIONS ('topic' '{topic}') disagree"
                    );
                }
                _ => {
                    raw.insert("topic".into(), location.clone());
                }
            }
        }
        let options = StreamOptions::parse(&raw)?;
        let name = cmd.name.table().to_string();
        let arrow = Arc::new(cmd.schema.as_arrow().clone());
        // Timestamps are held in milliseconds, like the topics.
        let fields: Vec<_> = arrow
            .fields()
            .iter()
            .map(|f| match f.data_type() {
                DataType::Timestamp(_, tz) => f
                    .as_ref()
                    .clone()
                    .with_data_type(DataType::Timestamp(TimeUnit::Millisecond, tz.clone())),
                _ => f.as_ref().clone(),
            })
            .collect();
        let schema = Arc::new(TopicSchema::from_arrow(
            &name,
            Arc::new(datafusion::arrow::datatypes::Schema::new(fields)),
        ));
        Ok(Arc::new(StreamTable::new(name, schema, options)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn options_parse_with_defaults() {
        let o = StreamOptions::parse(&opts(&[("topic", "t"), ("watermark_delay", "2s")]))
            .expect("options");
        assert_eq!(o.topic, "t");
        assert_eq!(o.watermark_delay, Duration::from_secs(2));
        assert_eq!(o.idle_timeout, Duration::from_secs(60));
        assert_eq!(o.future_tolerance, Duration::from_secs(10));
        assert_eq!(o.event_time_unit, TimeUnit::Millisecond);
        let o = StreamOptions::parse(&opts(&[("topic", "t"), ("event_time_unit", "s")]))
            .expect("options");
        assert_eq!(o.event_time_unit, TimeUnit::Second);
        let e = StreamOptions::parse(&opts(&[("topic", "t"), ("event_time_unit", "days")]))
            .expect_err("unit");
        assert!(e.to_string().contains("write 's' (epoch seconds)"), "{e}");
    }

    #[test]
    fn bad_options_are_named() {
        let e = StreamOptions::parse(&opts(&[("topic", "t"), ("watermark", "2s")]))
            .expect_err("unknown option");
        assert!(e.to_string().contains("unknown option 'watermark'"), "{e}");
        let e = StreamOptions::parse(&opts(&[("topic", "t"), ("idle_timeout", "soon")]))
            .expect_err("bad duration");
        assert!(e.to_string().contains("option 'idle_timeout'"), "{e}");
        // Milliseconds past an i64 would wrap to a negative timeout or delay.
        for option in ["idle_timeout", "watermark_delay", "future_tolerance"] {
            let e = StreamOptions::parse(&opts(&[("topic", "t"), (option, "300000000y")]))
                .expect_err("absurd duration");
            assert!(
                e.to_string().contains(&format!(
                    "option '{option}': '300000000y' is longer than 100 years"
                )),
                "{e}"
            );
        }
        let o = StreamOptions::parse(&opts(&[("topic", "t"), ("idle_timeout", "100y")]))
            .expect("the longest timeout");
        assert_eq!(o.idle_timeout, LONGEST_DURATION);
        let e = StreamOptions::parse(&opts(&[("format", "json")])).expect_err("no topic");
        assert!(e.to_string().contains("'topic'"), "{e}");
        let e = StreamOptions::parse(&opts(&[("topic", "t"), ("format", "thrift")]))
            .expect_err("format");
        assert!(e.to_string().contains("not supported: write 'json'"), "{e}");
        let e = StreamOptions::parse(&opts(&[("topic", "t"), ("format", "protobuf")]))
            .expect_err("message");
        assert!(e.to_string().contains("'protobuf_message'"), "{e}");
        let e = StreamOptions::parse(&opts(&[("topic", "t"), ("protobuf_message", "a.B")]))
            .expect_err("json");
        assert!(e.to_string().contains("'protobuf' streams only"), "{e}");
        let avro =
            StreamOptions::parse(&opts(&[("topic", "t"), ("format", "AVRO")])).expect("avro");
        assert_eq!(avro.format, Format::Avro);
    }
}
