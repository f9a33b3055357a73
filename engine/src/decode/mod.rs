//! Decode: Kafka record bytes into Arrow `RecordBatch`es.
//!
//! [`JsonDecoder`] turns a [`RawBatch`] (the records of one topic, in one contiguous buffer)
//! into a [`Decoded`] batch with the topic's Arrow schema (see [`crate::schema`]), using
//! arrow-json's streaming decoder: no per-row JSON value trees.
//!
//! A bad record never spoils its batch:
//! - **Fast path.** Every record is fed to one decoder; after each record the decoder must hold
//!   exactly one more complete row (so a truncated record, an empty payload or two objects in
//!   one payload are caught at their own record, and bytes of one record can never leak into
//!   the next). A record that fails that check is rejected and the decoder is rebuilt from the
//!   good records since the last flush. Records are flushed in chunks.
//! - **Slow path.** Errors only a flush can see (a wrong type, bad UTF-8) fail their chunk;
//!   that chunk is decoded again record by record to find the culprits.
//! - **Validation** runs vectorised on the decoded batch: required fields present, enum
//!   symbols known; Avro defaults are filled in. JSON numbers are read exactly: `2.5` in an
//!   integer field, a decimal place a DECIMAL does not keep or a REAL beyond its range
//!   rejects its record instead of being truncated or made infinite.
//!
//! Rejected records are returned with the reason; the pipeline sends them to the DLQ with
//! their provenance and original bytes.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BooleanArray, RecordBatch, StringArray};
use datafusion::arrow::compute::kernels::zip::zip;
use datafusion::arrow::compute::{cast, concat_batches, filter_record_batch, is_not_null};
use datafusion::arrow::datatypes::{
    DataType, Field, Float64Type, Int64Type, Schema, SchemaRef, TimeUnit, TimestampMillisecondType,
};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::json::ReaderBuilder;
use datafusion::arrow::json::reader::Decoder;

use crate::error::{Error, Result};
use crate::schema::TopicSchema;
use crate::source::RawBatch;
use crate::time::LATEST_EVENT_MS;
use crate::topics::Format;

pub mod avro;
mod numbers;
pub mod protobuf;
pub mod registry;

pub use avro::{AvroDecoder, AvroEncoder};
pub use protobuf::{Descriptors, ProtobufDecoder, ProtobufEncoder};
pub use registry::Registry;

/// Turns a row's JSON (as the sink encodes rows) into a record of another format.
#[derive(Debug, Clone)]
pub enum RecordEncoder {
    /// Confluent-framed Avro.
    Avro(AvroEncoder),
    /// Plain Protobuf messages.
    Protobuf(ProtobufEncoder),
}

impl RecordEncoder {
    /// One row as one record.
    pub fn encode_json(&self, json: &[u8]) -> Result<Vec<u8>> {
        match self {
            RecordEncoder::Avro(e) => e.encode_json(json),
            RecordEncoder::Protobuf(e) => e.encode_json(json),
        }
    }
}

/// The kind of scalar a field of another format is, for [`written_as`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scalar {
    /// A string.
    Text,
    /// An integer of any width.
    Whole,
    /// A float or a double.
    Real,
    /// A boolean.
    Boolean,
}

/// JSON value `v` of a field of kind `kind` as that kind where it is written as another: a
/// number or a boolean of a text field as its text, a text of a number or boolean field as
/// the number or boolean it writes (spaces around it, as JSON topics read such texts). A CSV
/// has no types: `replay` guesses its columns' from their values, and ids written as digits
/// (a number) or a column of numbers with one other value in it (texts) failed every record
/// of an Avro or Protobuf topic. Any other value stays as it is (and the encoder refuses it).
pub(crate) fn written_as(kind: Scalar, v: &mut serde_json::Value) {
    use serde_json::Value as J;
    let read = match (kind, &*v) {
        // Digits read back as written: a whole number past 64 bits went through a double
        // (`1.2345678901234568e22`), and is left for the encoder to refuse.
        (Scalar::Text, J::Number(n))
            if n.is_i64() || n.is_u64() || !n.to_string().contains('e') =>
        {
            Some(J::String(n.to_string()))
        }
        (Scalar::Text, J::Bool(b)) => Some(J::String(b.to_string())),
        (Scalar::Whole, J::String(s)) => s
            .trim()
            .parse::<i64>()
            .ok()
            .map(J::from)
            .or_else(|| s.trim().parse::<u64>().ok().map(J::from)),
        (Scalar::Real, J::String(s)) => s
            .trim()
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(J::Number),
        (Scalar::Boolean, J::String(s)) => boolean_text(s).map(J::Bool),
        _ => None,
    };
    if let Some(read) = read {
        *v = read;
    }
}

/// What decoders of formats other than JSON need: the schema registry of Avro records and the
/// descriptors of Protobuf messages.
#[derive(Debug, Clone, Default)]
pub struct Codecs {
    /// Writer schemas of Avro records.
    pub registry: Option<Arc<Registry>>,
    /// Protobuf message descriptors.
    pub descriptors: Option<Arc<Descriptors>>,
}

/// Records flushed together on the fast path. A type error costs at most one chunk's worth of
/// record-by-record decoding.
const CHUNK: usize = 1024;

/// Why a record was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectStage {
    /// Not a JSON object of the topic's schema (syntax, types, encoding).
    Decode,
    /// Well-formed, but breaks a rule of the schema (missing required field, unknown symbol),
    /// or has no Kafka key where a query keeps state per partition of a keyed topic.
    Validate,
    /// Valid, but its id is not in its reference table (with `reference.unknown_ids =
    /// "dead_letter"`).
    Reference,
    /// Valid, but the query's plan fails on its values (a text cast to a number that is
    /// none, a division by zero): left out of the query's results.
    Query,
}

/// What happens to a record whose id (camera, detector, sensor) is not in its reference
/// table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownIds {
    /// Counted, and processed with the queries' defaults.
    #[default]
    Process,
    /// Counted, and sent to the DLQ with the reason.
    DeadLetter,
}

impl RejectStage {
    /// The name used in DLQ records.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectStage::Decode => "decode",
            RejectStage::Validate => "validate",
            RejectStage::Reference => "reference",
            RejectStage::Query => "query",
        }
    }
}

/// A rejected record: its index in the [`RawBatch`] and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    /// Index of the record in its raw batch.
    pub index: u32,
    /// Where it failed.
    pub stage: RejectStage,
    /// Why, in words that name the field when there is one.
    pub error: String,
}

/// The outcome of decoding one raw batch.
#[derive(Debug, Clone)]
pub struct Decoded {
    /// The good records, in input order, with the topic's output schema.
    pub batch: RecordBatch,
    /// For each row of `batch`, the index of its record in the raw batch.
    pub rows: Vec<u32>,
    /// The rejected records.
    pub rejects: Vec<Reject>,
}

impl Decoded {
    /// Checks column `column` of the good records against `ids` (the id column of reference
    /// table `table`, `version`); returns how many are not there. With
    /// [`UnknownIds::DeadLetter`] those records become rejects (stage `reference`, naming the
    /// id and the table). Null ids and batches without the column pass.
    pub fn check_ids(
        &mut self,
        column: &str,
        ids: &std::collections::HashSet<String>,
        table: &str,
        version: u64,
        policy: UnknownIds,
    ) -> Result<usize> {
        let Ok(index) = self.batch.schema().index_of(column) else {
            return Ok(0);
        };
        let values = cast(self.batch.column(index), &DataType::Utf8)?;
        let values = values.as_string::<i32>();
        let known: BooleanArray = (0..values.len())
            .map(|r| Some(values.is_null(r) || ids.contains(values.value(r))))
            .collect();
        let unknown = known.false_count();
        if unknown == 0 || policy == UnknownIds::Process {
            return Ok(unknown);
        }
        for r in (0..known.len()).filter(|&r| !known.value(r)) {
            self.rejects.push(Reject {
                index: self.rows[r],
                stage: RejectStage::Reference,
                error: format!(
                    "unknown {column} {:?}: not in reference table {table} (version \
                     {version}); declare it with `urbanstream table replace {table}`, or set \
                     reference.unknown_ids = \"process\"",
                    values.value(r)
                ),
            });
        }
        self.keep(&known)?;
        Ok(unknown)
    }
}

impl Decoded {
    /// Checks that each good record of `raw` has a Kafka key, where its topic is declared
    /// keyed by column `column` and read by a query keeping state per input partition;
    /// returns how many have none. A record without a key is placed in any partition (the
    /// producer's partitioner spreads such records), away from its group's other records:
    /// its partition's state would publish a second, partial result of the group's window.
    /// It becomes a reject (stage `validate`, naming the column and its value). A record
    /// with a key passes, whatever its bytes: producers write a key column's value in many
    /// encodings (its text, quoted, an Avro or Protobuf key, a big-endian integer), and any
    /// of them keeps a group's records together.
    pub fn check_keys(&mut self, raw: &RawBatch, column: &str, topic: &str) -> Result<usize> {
        let Ok(index) = self.batch.schema().index_of(column) else {
            return Ok(0);
        };
        let values = self.batch.column(index).clone();
        let keyed: BooleanArray = (0..values.len())
            .map(|r| Some(values.is_null(r) || raw.key(self.rows[r] as usize).is_some()))
            .collect();
        let unkeyed = keyed.false_count();
        if unkeyed == 0 {
            return Ok(0);
        }
        let values = cast(&values, &DataType::Utf8)?;
        let values = values.as_string::<i32>();
        for r in (0..keyed.len()).filter(|&r| !keyed.value(r)) {
            let value: String = values.value(r).chars().take(64).collect();
            self.rejects.push(Reject {
                index: self.rows[r],
                stage: RejectStage::Validate,
                error: format!(
                    "record without a key, where {topic} is declared keyed by {column} \
                     ({value:?}): the query keeps its groups' state per partition of {topic}, \
                     and a record without a key may be in another partition than its group's \
                     other records; produce the topic's records keyed by {column} (its text, as \
                     `urbanstream replay` does), or declare the table without 'key' (its \
                     queries are then repartitioned by their group keys)"
                ),
            });
        }
        self.keep(&keyed)?;
        Ok(unkeyed)
    }

    /// Keeps the good records marked in `keep` (the others just became rejects).
    fn keep(&mut self, keep: &BooleanArray) -> Result<()> {
        self.rejects.sort_by_key(|r| r.index);
        self.batch = filter_record_batch(&self.batch, keep)?;
        self.rows = (0..keep.len())
            .filter(|&r| keep.value(r))
            .map(|r| self.rows[r])
            .collect();
        Ok(())
    }
}

/// The topic schema as the decoders see it: the Arrow schema records are read into, the
/// limits on record size, the event-time column, and the checks every decoded batch passes.
#[derive(Debug, Clone)]
pub(crate) struct Shape {
    schema: Arc<TopicSchema>,
    /// All fields nullable: required fields are checked after decoding, so that a missing
    /// field is a cheap validation reject with a clear message instead of a failed flush.
    pub(crate) wire_schema: SchemaRef,
    output_schema: SchemaRef,
    /// Largest record value accepted, bytes.
    max_value_bytes: usize,
    /// Largest record key accepted, bytes.
    max_key_bytes: usize,
    /// The event-time column (its index), checked for plausible values.
    event_time: Option<usize>,
    /// For JSON: the wire schema without the carriers of exact numbers (see [`numbers`]),
    /// which names the field of a value arrow-json cannot read.
    json_plain: Option<SchemaRef>,
    /// Its BOOLEAN fields' names, for booleans written as text
    /// ([`JsonDecoder::booleans_as_literals`]).
    booleans: Vec<String>,
    /// Its number fields' names (integers, decimals, floats), for numbers written as text
    /// with spaces around them ([`JsonDecoder::booleans_as_literals`]).
    numbers: Vec<String>,
}

/// A topic's decoder, for the format its records are in.
#[derive(Debug)]
pub enum TopicDecoder {
    /// JSON objects.
    Json(JsonDecoder),
    /// Confluent-framed Avro.
    Avro(AvroDecoder),
    /// Protobuf messages.
    Protobuf(ProtobufDecoder),
}

impl TopicDecoder {
    /// A decoder of `format` for `schema`, with its event-time column (`unit`: of JSON
    /// numbers, and of Avro longs and Protobuf integers). Avro needs the registry its
    /// producers register their schemas in; Protobuf the descriptors and its `message`.
    pub fn new(
        format: Format,
        schema: Arc<TopicSchema>,
        event_time: Option<(&str, TimeUnit)>,
        codecs: &Codecs,
        message: Option<&str>,
    ) -> Result<Self> {
        let mut shape = Shape::new(schema);
        if format == Format::Json {
            shape = shape.carrying_json_numbers();
        }
        if let Some((column, unit)) = event_time {
            shape = shape.with_event_time(column, unit);
        }
        Ok(match format {
            Format::Json => TopicDecoder::Json(JsonDecoder { shape }),
            Format::Protobuf => {
                let descriptors = match &codecs.descriptors {
                    Some(d) => d.clone(),
                    None => Arc::new(Descriptors::embedded()?),
                };
                let message = message.ok_or_else(|| {
                    Error::Config(format!(
                        "a protobuf stream of {} names no message (option 'protobuf_message')",
                        shape.topic_schema().name
                    ))
                })?;
                TopicDecoder::Protobuf(ProtobufDecoder::new(shape, descriptors.message(message)?)?)
            }
            Format::Avro => {
                let registry = codecs.registry.as_ref().ok_or_else(|| {
                    Error::Config(
                        "Avro records need a schema registry: set [schema_registry] url, or \
                         leave it empty for the directory registry"
                            .into(),
                    )
                })?;
                TopicDecoder::Avro(AvroDecoder::new(shape, registry.clone()))
            }
        })
    }

    /// The format it reads.
    pub fn format(&self) -> Format {
        match self {
            TopicDecoder::Json(_) => Format::Json,
            TopicDecoder::Avro(_) => Format::Avro,
            TopicDecoder::Protobuf(_) => Format::Protobuf,
        }
    }

    /// Fetches what decoding `raw` needs that is not at hand (Avro writer schemas).
    pub async fn prepare(&self, raw: &RawBatch) -> Result<()> {
        match self {
            TopicDecoder::Json(_) | TopicDecoder::Protobuf(_) => Ok(()),
            TopicDecoder::Avro(d) => d.prepare(raw).await,
        }
    }

    /// Decodes every record of `raw`; bad records are rejected one by one.
    pub fn decode(&self, raw: &RawBatch) -> Result<Decoded> {
        match self {
            TopicDecoder::Json(d) => d.decode(raw),
            TopicDecoder::Avro(d) => d.decode(raw),
            TopicDecoder::Protobuf(d) => d.decode(raw),
        }
    }
}

/// Decodes JSON records of one topic schema into Arrow.
#[derive(Debug, Clone)]
pub struct JsonDecoder {
    shape: Shape,
}

/// Event times before this (1990-01-01, epoch ms) are taken for a unit mistake.
const EARLIEST_EVENT_MS: i64 = 631_152_000_000;

/// Largest record value a decoder accepts by default (city events are a few hundred bytes).
pub const MAX_VALUE_BYTES: usize = 256 * 1024;
/// Largest record key a decoder accepts by default.
pub const MAX_KEY_BYTES: usize = 4 * 1024;

impl Shape {
    pub(crate) fn new(schema: Arc<TopicSchema>) -> Self {
        let wire_fields: Vec<_> = schema
            .arrow
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect();
        let booleans = schema
            .arrow
            .fields()
            .iter()
            .filter(|f| f.data_type() == &DataType::Boolean)
            .map(|f| f.name().clone())
            .collect();
        let numbers = schema
            .arrow
            .fields()
            .iter()
            .filter(|f| f.data_type().is_numeric())
            .map(|f| f.name().clone())
            .collect();
        Self {
            wire_schema: Arc::new(Schema::new(wire_fields)),
            output_schema: schema.output_schema(),
            schema,
            max_value_bytes: MAX_VALUE_BYTES,
            max_key_bytes: MAX_KEY_BYTES,
            event_time: None,
            json_plain: None,
            booleans,
            numbers,
        }
    }

    /// Reads JSON numbers exactly: integer and decimal fields are carried as wide decimals
    /// and settled in [`Shape::validate`].
    fn carrying_json_numbers(mut self) -> Self {
        let plain = self.wire_schema.clone();
        self.wire_schema = retype(&plain, |_, f| numbers::carrier(f.data_type()));
        self.json_plain = Some(plain);
        self
    }

    fn with_event_time(mut self, column: &str, unit: TimeUnit) -> Self {
        let Ok(index) = self.wire_schema.index_of(column) else {
            return self;
        };
        if let DataType::Timestamp(_, tz) = self.wire_schema.field(index).data_type().clone() {
            let unit = DataType::Timestamp(unit, tz);
            let at = |i: usize, _: &Field| (i == index).then(|| unit.clone());
            self.wire_schema = retype(&self.wire_schema, at);
            self.json_plain = self.json_plain.map(|plain| retype(&plain, at));
            self.event_time = Some(index);
        }
        self
    }

    /// The topic schema.
    pub(crate) fn topic_schema(&self) -> &TopicSchema {
        &self.schema
    }

    /// Why a record is too big to decode, if it is.
    pub(crate) fn oversize(&self, raw: &RawBatch, i: usize) -> Option<String> {
        let value = raw.value(i).len();
        let key = raw.key(i).map_or(0, <[u8]>::len);
        if value > self.max_value_bytes {
            Some(format!(
                "record value of {value} bytes is over the limit of {} bytes",
                self.max_value_bytes
            ))
        } else if key > self.max_key_bytes {
            Some(format!(
                "record key of {key} bytes is over the limit of {} bytes",
                self.max_key_bytes
            ))
        } else {
            None
        }
    }

    /// The decoded parts, concatenated and validated; rejects in record order.
    pub(crate) fn finish(
        &self,
        mut parts: Vec<RecordBatch>,
        rows: Vec<u32>,
        rejects: Vec<Reject>,
    ) -> Result<Decoded> {
        let batch = match parts.len() {
            0 => RecordBatch::new_empty(self.wire_schema.clone()),
            1 => parts
                .pop()
                .unwrap_or_else(|| RecordBatch::new_empty(self.wire_schema.clone())),
            _ => concat_batches(&self.wire_schema, &parts)?,
        };
        let mut decoded = self.validate(batch, rows, rejects)?;
        decoded.rejects.sort_by_key(|r| r.index);
        Ok(decoded)
    }

    /// Checks required fields and enum symbols, fills defaults, and gives the batch its
    /// output schema.
    pub(crate) fn validate(
        &self,
        batch: RecordBatch,
        rows: Vec<u32>,
        mut rejects: Vec<Reject>,
    ) -> Result<Decoded> {
        let n = batch.num_rows();
        let mut reason: Vec<Option<String>> = vec![None; n];
        let mut any_bad = false;
        let batch = match &self.json_plain {
            Some(plain) => {
                let mut columns = Vec::with_capacity(batch.num_columns());
                for (column, field) in batch.columns().iter().zip(plain.fields()) {
                    let (column, bad) =
                        numbers::settle(column, field.name(), field.data_type(), &mut reason)?;
                    columns.push(column);
                    any_bad |= bad;
                }
                RecordBatch::try_new(plain.clone(), columns)?
            }
            None => batch,
        };
        for (c, field) in self.schema.arrow.fields().iter().enumerate() {
            let column = batch.column(c);
            if self.schema.required[c] && column.null_count() > 0 {
                for (r, slot) in reason.iter_mut().enumerate() {
                    if slot.is_none() && column.is_null(r) {
                        *slot = Some(format!("missing required field {}", field.name()));
                        any_bad = true;
                    }
                }
            }
            if let Some(symbols) = &self.schema.enum_symbols[c] {
                let Some(values) = column.as_any().downcast_ref::<StringArray>() else {
                    continue;
                };
                for (r, slot) in reason.iter_mut().enumerate() {
                    if slot.is_some() || values.is_null(r) {
                        continue;
                    }
                    let v = values.value(r);
                    if !symbols.iter().any(|s| s == v) {
                        *slot = Some(format!(
                            "field {}: unknown symbol {v:?} (expected one of {})",
                            field.name(),
                            symbols.join(", ")
                        ));
                        any_bad = true;
                    }
                }
            }
        }
        for (c, range) in self.schema.ranges.iter().enumerate() {
            let Some(range) = range else { continue };
            let column = batch.column(c);
            let numbers = cast(column, &DataType::Float64)?;
            let numbers = numbers.as_primitive::<Float64Type>();
            for (r, slot) in reason.iter_mut().enumerate() {
                if slot.is_some() || numbers.is_null(r) {
                    continue;
                }
                let x = numbers.value(r);
                if !range.contains(x) {
                    *slot = Some(format!(
                        "field {}: {x} is outside its range, {range}",
                        self.schema.arrow.field(c).name()
                    ));
                    any_bad = true;
                }
            }
        }
        if let Some(c) = self.event_time {
            let ms = cast(
                batch.column(c),
                &DataType::Timestamp(TimeUnit::Millisecond, None),
            )?;
            let ms = ms.as_primitive::<TimestampMillisecondType>();
            let field = self.schema.arrow.field(c).name();
            let raw = batch.column(c);
            let numbers = cast(raw, &DataType::Int64)?;
            let numbers = numbers.as_primitive::<Int64Type>();
            for (r, slot) in reason.iter_mut().enumerate() {
                if slot.is_some() || raw.is_null(r) {
                    continue;
                }
                // A time in seconds too large for milliseconds converts to null.
                if ms.is_null(r) || ms.value(r) > LATEST_EVENT_MS {
                    *slot = Some(format!(
                        "field {field}: event time {} is outside the years 1990 to 9999",
                        numbers.value(r)
                    ));
                    any_bad = true;
                } else if ms.value(r) < EARLIEST_EVENT_MS {
                    *slot = Some(format!(
                        "field {field}: event time {} is before 1990; if the topic carries \
                         epoch seconds (or microseconds), declare OPTIONS ('event_time_unit' \
                         's') (or 'us'); a file run or previewed in another unit than its \
                         stream's is read with --time-unit",
                        ms.value(r)
                    ));
                    any_bad = true;
                }
            }
        }
        let (batch, rows) = if any_bad {
            let keep: BooleanArray = reason.iter().map(|r| Some(r.is_none())).collect();
            let mut kept_rows = Vec::with_capacity(n);
            for (r, why) in reason.into_iter().enumerate() {
                match why {
                    None => kept_rows.push(rows[r]),
                    Some(error) => rejects.push(Reject {
                        index: rows[r],
                        stage: RejectStage::Validate,
                        error,
                    }),
                }
            }
            (filter_record_batch(&batch, &keep)?, kept_rows)
        } else {
            (batch, rows)
        };
        let columns = batch
            .columns()
            .iter()
            .zip(&self.schema.defaults)
            .zip(self.output_schema.fields())
            .map(|((column, default), field)| {
                let column = fill_default(column, default.as_ref())?;
                // An event time read in another unit is held in milliseconds.
                if column.data_type() == field.data_type() {
                    Ok(column)
                } else {
                    Ok(cast(&column, field.data_type())?)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let batch = RecordBatch::try_new(self.output_schema.clone(), columns)?;
        Ok(Decoded {
            batch,
            rows,
            rejects,
        })
    }
}

impl JsonDecoder {
    /// A decoder for the records of `schema`.
    pub fn new(schema: Arc<TopicSchema>) -> Self {
        Self {
            shape: Shape::new(schema).carrying_json_numbers(),
        }
    }

    /// Names the event-time column and the unit its JSON numbers are in (`Millisecond` for
    /// the city's topics): numbers are read in that unit; a record whose event time falls
    /// before 1990 is rejected with a hint about the unit, instead of being read as an event
    /// of 1970 that every window has long passed.
    pub fn with_event_time(mut self, column: &str, unit: TimeUnit) -> Self {
        self.shape = self.shape.with_event_time(column, unit);
        self
    }

    /// Records with a larger value or key are rejected without being parsed.
    pub fn with_limits(mut self, max_value_bytes: usize, max_key_bytes: usize) -> Self {
        self.shape.max_value_bytes = max_value_bytes;
        self.shape.max_key_bytes = max_key_bytes;
        self
    }

    /// The schema of decoded batches.
    pub fn output_schema(&self) -> SchemaRef {
        self.shape.output_schema.clone()
    }

    /// Decodes every record of `raw`; bad records are rejected one by one.
    pub fn decode(&self, raw: &RawBatch) -> Result<Decoded> {
        let mut parts = Vec::new();
        let mut rows = Vec::with_capacity(raw.len());
        let mut rejects = Vec::new();
        let mut start = 0;
        while start < raw.len() {
            let end = (start + CHUNK).min(raw.len());
            self.decode_chunk(raw, start..end, &mut parts, &mut rows, &mut rejects)?;
            start = end;
        }
        self.shape.finish(parts, rows, rejects)
    }

    fn new_decoder(&self, capacity: usize) -> Result<Decoder> {
        Ok(ReaderBuilder::new(self.shape.wire_schema.clone())
            .with_batch_size(capacity.max(1))
            .build_decoder()?)
    }

    /// Feeds records `range` to a decoder, rejecting any record that is not exactly one
    /// complete JSON value, then flushes. If the flush fails, falls back to one record at a
    /// time for this chunk.
    fn decode_chunk(
        &self,
        raw: &RawBatch,
        range: std::ops::Range<usize>,
        parts: &mut Vec<RecordBatch>,
        rows: &mut Vec<u32>,
        rejects: &mut Vec<Reject>,
    ) -> Result<()> {
        let mut decoder = self.new_decoder(range.len())?;
        let mut good: Vec<u32> = Vec::with_capacity(range.len());
        for i in range.clone() {
            let value = raw.value(i);
            if let Some(error) = self
                .shape
                .oversize(raw, i)
                .or_else(|| nested_too_deep(value))
            {
                rejects.push(Reject {
                    index: i as u32,
                    stage: RejectStage::Decode,
                    error,
                });
                continue;
            }
            match feed_one(&mut decoder, value, good.len()) {
                Ok(()) => good.push(i as u32),
                Err(error) => {
                    rejects.push(Reject {
                        index: i as u32,
                        stage: RejectStage::Decode,
                        error,
                    });
                    // The decoder may hold part of the bad record: rebuild it from the good
                    // records of this chunk (each is re-fed at most once per bad record).
                    decoder = self.new_decoder(range.len())?;
                    for (k, &g) in good.iter().enumerate() {
                        if let Err(error) = feed_one(&mut decoder, raw.value(g as usize), k) {
                            return Err(ArrowError::JsonError(format!(
                                "record {g} decoded once but not twice: {error}"
                            ))
                            .into());
                        }
                    }
                }
            }
        }
        match decoder.flush() {
            Ok(Some(batch)) if batch.num_rows() == good.len() => {
                parts.push(batch);
                rows.extend_from_slice(&good);
            }
            Ok(None) if good.is_empty() => {}
            // A flush error (wrong type, bad UTF-8) does not say which record: find out,
            // unless it is booleans written as text (a topic fed by a replayed CSV has them
            // in every record): then the chunk again with them as booleans, at once.
            _ => {
                if let Some(batch) = self.with_boolean_literals(raw, &good)? {
                    parts.push(batch);
                    rows.extend_from_slice(&good);
                    return Ok(());
                }
                for g in good {
                    let value = raw.value(g as usize);
                    let mut outcome = self.decode_one(value)?;
                    // A boolean written as text (a CSV replayed) is the boolean.
                    if outcome.is_err()
                        && let Some(literal) = self.booleans_as_literals(value)
                        && let read @ Ok(_) = self.decode_one(&literal)?
                    {
                        outcome = read;
                    }
                    match outcome {
                        Ok(Some(batch)) if batch.num_rows() == 1 => {
                            parts.push(batch);
                            rows.push(g);
                        }
                        Ok(_) => rejects.push(Reject {
                            index: g,
                            stage: RejectStage::Decode,
                            error: "expected one JSON object".into(),
                        }),
                        Err(error) => rejects.push(Reject {
                            index: g,
                            stage: RejectStage::Decode,
                            error: self.plain_error(raw.value(g as usize)).unwrap_or(error),
                        }),
                    }
                }
            }
        }
        Ok(())
    }

    /// Records `good` of `raw` decoded together with their booleans written as text read as
    /// booleans ([`JsonDecoder::booleans_as_literals`]), if that decodes all of them; `None`
    /// otherwise (or when none has such a boolean).
    fn with_boolean_literals(&self, raw: &RawBatch, good: &[u32]) -> Result<Option<RecordBatch>> {
        let mut decoder = self.new_decoder(good.len())?;
        let mut changed = false;
        for (k, &g) in good.iter().enumerate() {
            let value = raw.value(g as usize);
            let fed = match self.booleans_as_literals(value) {
                Some(literal) => {
                    changed = true;
                    feed_one(&mut decoder, &literal, k)
                }
                None => feed_one(&mut decoder, value, k),
            };
            if fed.is_err() {
                return Ok(None);
            }
        }
        if !changed {
            return Ok(None);
        }
        Ok(match decoder.flush() {
            Ok(Some(batch)) if batch.num_rows() == good.len() => Some(batch),
            _ => None,
        })
    }

    /// `value` decoded alone: its row, or why it is none.
    fn decode_one(&self, value: &[u8]) -> Result<Result<Option<RecordBatch>, String>> {
        let mut one = self.new_decoder(1)?;
        Ok(feed_one(&mut one, value, 0).and_then(|()| one.flush().map_err(|e| json_message(&e))))
    }

    /// `value` with the texts `true` and `false` (any case, spaces around) of its BOOLEAN
    /// fields written as JSON's `true` and `false`, and the texts of its number fields
    /// without the spaces around them (`" 42 "`, as a CSV's `a, 42 ,b` is replayed), if it
    /// has any; every other value as written. A CSV's column of booleans with one other value
    /// in it is replayed as texts. (A DOUBLE's text was read with its spaces, an integer's
    /// not: `urbanstream run` and previews, which read a CSV's numbers without them, kept
    /// rows the service dead-lettered.)
    fn booleans_as_literals(&self, value: &[u8]) -> Option<Vec<u8>> {
        let (booleans, numbers) = (&self.shape.booleans, &self.shape.numbers);
        if booleans.is_empty() && numbers.is_empty() {
            return None;
        }
        let fields = json_fields(value)?;
        let mut changed = false;
        let mut out = Vec::with_capacity(value.len());
        out.push(b'{');
        for (i, (name, value)) in fields.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(serde_json::to_string(name).ok()?.as_bytes());
            out.push(b':');
            let text = || serde_json::from_str::<String>(value.get()).ok();
            let literal = if booleans.contains(name) {
                text()
                    .and_then(|text| boolean_text(&text))
                    .map(|b| if b { "true" } else { "false" }.to_string())
            } else if numbers.contains(name) {
                text()
                    .filter(|t| t.trim().len() < t.len() && !t.trim().is_empty())
                    .and_then(|t| serde_json::to_string(t.trim()).ok())
            } else {
                None
            };
            match literal {
                Some(literal) => {
                    changed = true;
                    out.extend_from_slice(literal.as_bytes());
                }
                None => out.extend_from_slice(value.get().as_bytes()),
            }
        }
        out.push(b'}');
        changed.then_some(out)
    }

    /// Why arrow-json cannot read `value` by the fields' own types, if it cannot: that
    /// message names the field, where a carrier's (a decimal's) does not.
    fn plain_error(&self, value: &[u8]) -> Option<String> {
        let plain = self.shape.json_plain.clone()?;
        let mut decoder = ReaderBuilder::new(plain)
            .with_batch_size(1)
            .build_decoder()
            .ok()?;
        feed_one(&mut decoder, value, 0)
            .and_then(|()| decoder.flush().map_err(|e| json_message(&e)))
            .err()
    }
}

/// Deepest nesting of arrays and objects a JSON record may have: far more than any schema's
/// types, far less than what overflows a thread's stack, and what serde_json reads (its
/// recursion limit: a deeper line failed the whole file in `urbanstream run`, whose reading
/// of JSON lines goes through it).
pub const MAX_JSON_DEPTH: usize = 127;

/// Why JSON `value` is refused for its nesting, if it nests arrays and objects deeper than
/// [`MAX_JSON_DEPTH`]: the JSON reader describes a value it cannot take by walking it
/// recursively, and `[[[…]]]` 60 000 deep (120 KB, within the record size limit) overflowed
/// the stack of the query's thread and aborted the process, at every restart again. A scan of
/// the bytes, strings skipped; the reader judges everything else.
pub fn nested_too_deep(value: &[u8]) -> Option<String> {
    // Every record is looked at: first a count of the opening brackets (vectorised; a record
    // of the usual kind has a handful), the scan only when there are more than the limit.
    if value.iter().filter(|&&b| b == b'[' || b == b'{').count() <= MAX_JSON_DEPTH {
        return None;
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in value {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_JSON_DEPTH {
                    return Some(format!(
                        "the record nests arrays or objects more than {MAX_JSON_DEPTH} deep"
                    ));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

/// The boolean a text writes: `true` or `false`, any case, spaces around (not arrow's `yes`,
/// `on` or `1`), as the decoder and `urbanstream run` read a boolean written as text.
pub fn boolean_text(text: &str) -> Option<bool> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("true") {
        Some(true)
    } else if text.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

/// The fields of the JSON object `value` in their order, each value as written (its
/// numbers' digits kept); `None` when `value` is not one JSON object.
pub fn json_fields(value: &[u8]) -> Option<Vec<(String, Box<serde_json::value::RawValue>)>> {
    use serde::Deserializer as _;
    struct Fields;
    impl<'de> serde::de::Visitor<'de> for Fields {
        type Value = Vec<(String, Box<serde_json::value::RawValue>)>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> std::result::Result<Self::Value, A::Error> {
            let mut fields = Vec::new();
            while let Some(field) = map.next_entry()? {
                fields.push(field);
            }
            Ok(fields)
        }
    }
    let mut reader = serde_json::Deserializer::from_slice(value);
    let fields = reader.deserialize_map(Fields).ok()?;
    reader.end().ok()?;
    Some(fields)
}

/// `schema` with the fields `to` gives a type for (by index) of that type.
fn retype(schema: &SchemaRef, to: impl Fn(usize, &Field) -> Option<DataType>) -> SchemaRef {
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| match to(i, f) {
            Some(t) => f.as_ref().clone().with_data_type(t),
            None => f.as_ref().clone(),
        })
        .collect();
    Arc::new(Schema::new(fields))
}

/// Feeds one record; it must add exactly one complete row to the decoder.
fn feed_one(decoder: &mut Decoder, value: &[u8], rows_before: usize) -> Result<(), String> {
    let consumed = decoder.decode(value).map_err(|e| json_message(&e))?;
    if consumed != value.len() {
        return Err("more than one JSON value in the record".into());
    }
    if decoder.has_partial_record() {
        return Err("truncated JSON: the record ends inside a value".into());
    }
    match decoder.len() - rows_before {
        1 => Ok(()),
        0 => Err("empty record: no JSON object".into()),
        _ => Err("more than one JSON value in the record".into()),
    }
}

fn json_message(e: &ArrowError) -> String {
    match e {
        ArrowError::JsonError(m) => m.clone(),
        other => other.to_string(),
    }
}

fn fill_default(
    column: &ArrayRef,
    default: Option<&datafusion::scalar::ScalarValue>,
) -> Result<ArrayRef> {
    match default {
        Some(value) if column.null_count() > 0 => {
            let present = is_not_null(column)?;
            let fallback = value.to_scalar()?;
            Ok(zip(&present, column, &fallback)?)
        }
        _ => Ok(column.clone()),
    }
}

#[cfg(test)]
mod tests;
