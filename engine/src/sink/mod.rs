//! Sink: output rows into Kafka topics.
//!
//! [`encode_json_rows`] turns a batch into one JSON object per row, in the field order and
//! types of the output topic's schema (see [`conform`]); timestamps are written as epoch
//! milliseconds, as in the input topics. [`KafkaSink`] publishes them with an idempotent
//! producer, keyed by a column, and returns a [`Pending`] set of deliveries: the pipeline
//! awaits it before committing the input offsets the outputs depend on. DLQ and late records
//! go out the same way.
//!
//! For exactly-once output the producer is transactional ([`KafkaSinkConfig::transactional_id`]):
//! each checkpoint epoch's records and the consumed offsets commit together
//! ([`KafkaSink::commit_epoch`]). Every record then carries two headers, `urbanstream-query`
//! (the query's name) and `urbanstream-id` (8 bytes identifying the record: a hash of topic,
//! key and value for indicator rows; of the input record's topic, partition and offset for DLQ
//! and late records). A pipeline recovering from a checkpoint reads the ids its query published
//! after that checkpoint and [`KafkaSink::suppress`]es them, so that the replay does not
//! publish again what the broker already made visible.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use datafusion::arrow::array::AsArray;
use datafusion::arrow::array::{Array, ArrayRef, RecordBatch, StringArray, new_null_array};
use datafusion::arrow::compute::{CastOptions, cast, cast_with_options};
use datafusion::arrow::datatypes::FieldRef;
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::json::writer::{
    Encoder, EncoderFactory, EncoderOptions, LineDelimited, NullableEncoder, WriterBuilder,
};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde::Serialize;

use crate::decode::Reject;
use crate::error::{Error, Result};
use crate::schema::TopicSchema;
use crate::source::RawBatch;

mod delivery;
use delivery::{Deliveries, Delivery, DeliveryPoller};

/// Casts and reorders `batch` to the output topic's schema, matching columns by name. A
/// missing field takes its Avro default, or null if it is nullable; a missing required field
/// or an extra column is an error that names it.
pub fn conform(batch: &RecordBatch, schema: &TopicSchema) -> Result<RecordBatch> {
    let target = schema.output_schema();
    let input = batch.schema();
    for field in input.fields() {
        if target.field_with_name(field.name()).is_err() {
            return Err(Error::schema(
                &schema.name,
                format!("column {} is not a field of the output topic", field.name()),
            ));
        }
    }
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(target.fields().len());
    for (f, field) in target.fields().iter().enumerate() {
        match input.index_of(field.name()) {
            Ok(i) => {
                let from = batch.column(i);
                let to = cast(from, field.data_type())?;
                // A value the field cannot hold (a BIGINT beyond an INT) is an error naming
                // it, not a null; a float that is no number (NaN, ±∞) is null in any number
                // field, as it is in JSON. (Logical nulls: a column of NULLs, `NULL AS b`, has
                // no null buffer and once failed every nullable field.)
                if to.logical_null_count() > from.logical_null_count()
                    && !from.data_type().is_floating()
                {
                    let strict = cast_with_options(
                        from,
                        field.data_type(),
                        &CastOptions {
                            safe: false,
                            ..CastOptions::default()
                        },
                    );
                    let why = strict.err().map_or_else(String::new, |e| format!(": {e}"));
                    return Err(Error::schema(
                        &schema.name,
                        format!(
                            "column {} holds a value its field's type {} cannot hold{why}",
                            field.name(),
                            crate::schema::sql_type_name(field.data_type())
                        ),
                    ));
                }
                columns.push(to);
            }
            Err(_) if schema.defaults[f].is_some() => {
                let default = schema.defaults[f]
                    .as_ref()
                    .map(|d| d.to_array_of_size(batch.num_rows()));
                if let Some(default) = default {
                    columns.push(cast(&default?, field.data_type())?);
                }
            }
            Err(_) if field.is_nullable() => {
                columns.push(new_null_array(field.data_type(), batch.num_rows()))
            }
            Err(_) => {
                return Err(Error::schema(
                    &schema.name,
                    format!("the query does not produce required field {}", field.name()),
                ));
            }
        }
    }
    for (field, column) in target.fields().iter().zip(&columns) {
        if !field.is_nullable() && column.null_count() > 0 {
            return Err(Error::schema(
                &schema.name,
                format!(
                    "field {name} may not be NULL, but the query gave NULL for it in {} of {} \
                     rows: write COALESCE({name}, <a value>) AS {name} in the SELECT, or filter \
                     those rows out, or declare the field without NOT NULL",
                    column.null_count(),
                    column.len(),
                    name = field.name()
                ),
            ));
        }
    }
    Ok(RecordBatch::try_new(target, columns)?)
}

/// Why a query whose results have the columns of `output` cannot write them to `schema`'s
/// fields, if it cannot; checked when the query is planned, so that no value is written as a
/// null it was not.
pub fn check_fit(output: &Schema, schema: &TopicSchema) -> std::result::Result<(), String> {
    let target = schema.output_schema();
    fn is_text(t: &DataType) -> bool {
        match t {
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => true,
            DataType::Dictionary(_, values) => is_text(values),
            _ => false,
        }
    }
    let takes_text = |t: &DataType| {
        is_text(t)
            || matches!(
                t,
                DataType::Binary | DataType::LargeBinary | DataType::BinaryView
            )
    };
    for field in target.fields() {
        if let DataType::Decimal128(p, s) | DataType::Decimal256(p, s) = field.data_type()
            && i16::from(*p) - i16::from(*s) > 76
        {
            return Err(format!(
                "the sink's field {} is DECIMAL({p}, {s}), whose numbers have up to {} digits: \
                 results are written with at most 76; declare it with a scale of at least {}",
                field.name(),
                i16::from(*p) - i16::from(*s),
                i16::from(*p) - 76
            ));
        }
    }
    for field in output.fields() {
        let name = field.name();
        let Ok(to) = target.field_with_name(name) else {
            if ENGINE_COLUMNS.contains(&name.as_str()) {
                continue;
            }
            return Err(format!(
                "column {name} is not a field of the output topic (fields: {})",
                target
                    .fields()
                    .iter()
                    .map(|f| f.name().as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        };
        let (from, into) = (field.data_type(), to.data_type());
        let sql = crate::schema::sql_type_name(into);
        if *from == DataType::Null && !to.is_nullable() {
            return Err(format!(
                "column {name} is NULL in every row (NULL AS {name}), but the sink's field \
                 {name} is NOT NULL: write a value of type {sql} there, or declare the field \
                 without NOT NULL"
            ));
        }
        if from != into && is_text(from) && !takes_text(into) {
            return Err(format!(
                "column {name} is text but the sink's field {name} is {sql}: a text is not \
                 written as a {sql}. Convert it in the SELECT (CAST({name} AS {sql}), or a \
                 CASE), or declare the field VARCHAR"
            ));
        }
        if from != into && !datafusion::arrow::compute::can_cast_types(from, into) {
            return Err(format!(
                "column {name} is {} but the sink's field {name} is {sql}, which it cannot be \
                 converted to",
                crate::schema::sql_type_name(from)
            ));
        }
    }
    Ok(())
}

/// Columns the engine adds to windowed results; a sink without such a field drops them.
pub const ENGINE_COLUMNS: [&str; 3] = ["revision", "is_final", "op"];

/// [`conform`] for a stream query's results: the engine's own columns ([`ENGINE_COLUMNS`])
/// are dropped when the sink has no field for them.
pub fn conform_stream(batch: &RecordBatch, schema: &TopicSchema) -> Result<RecordBatch> {
    let target = schema.output_schema();
    let keep: Vec<usize> = batch
        .schema()
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| {
            !(ENGINE_COLUMNS.contains(&f.name().as_str())
                && target.field_with_name(f.name()).is_err())
        })
        .map(|(i, _)| i)
        .collect();
    conform(&batch.project(&keep)?, schema)
}

/// Field metadata of a text column whose values are numbers as a file wrote them (a file's
/// numbers are read as their text, so that none is changed by a type guessed from the file):
/// [`encode_json_rows`] writes them back as those numbers.
pub const JSON_NUMBER_TEXT: &str = "urbanstream.json_number_text";

/// Marks a text column whose values are each one JSON value's text (a JSON-lines field whose
/// values are of several kinds, `12.5` and `"12.5"`): encoded as JSON, each is that value again.
pub const JSON_VALUE_TEXT: &str = "urbanstream.json_value_text";

/// Encodes the columns marked [`JSON_NUMBER_TEXT`] as the numbers their texts are, and those
/// marked [`JSON_VALUE_TEXT`] as the values their texts are.
#[derive(Debug)]
struct NumberTexts;

impl EncoderFactory for NumberTexts {
    fn make_default_encoder<'a>(
        &self,
        field: &'a FieldRef,
        array: &'a dyn Array,
        _options: &'a EncoderOptions,
    ) -> std::result::Result<Option<NullableEncoder<'a>>, ArrowError> {
        let values = field.metadata().contains_key(JSON_VALUE_TEXT);
        if !values && !field.metadata().contains_key(JSON_NUMBER_TEXT) {
            return Ok(None);
        }
        let Some(texts) = array.as_string_opt::<i32>() else {
            return Ok(None);
        };
        let encoder: Box<dyn Encoder + 'a> = if values {
            Box::new(ValueText(texts))
        } else {
            Box::new(NumberText(texts))
        };
        Ok(Some(NullableEncoder::new(encoder, texts.nulls().cloned())))
    }
}

/// `text` (a number as a CSV may write it: spaces around, a `+`, no digit before or after
/// its point) in JSON's form with the same digits, if it is one.
fn as_json_number(text: &str) -> Option<String> {
    let text = text.trim();
    let (sign, digits) = match text.as_bytes().first() {
        Some(b'-') => ("-", &text[1..]),
        Some(b'+') => ("", &text[1..]),
        _ => ("", text),
    };
    let (mantissa, exponent) = match digits.find(['e', 'E']) {
        Some(at) => digits.split_at(at),
        None => (digits, ""),
    };
    let mantissa = match mantissa.split_once('.') {
        Some(("", fraction)) => format!("0.{fraction}"),
        Some((whole, "")) => whole.to_string(),
        _ => mantissa.to_string(),
    };
    let number = format!("{sign}{mantissa}{exponent}");
    is_json_number(&number).then_some(number)
}

/// Whether `text` is one JSON number (RFC 8259: `-? int frac? exp?`).
fn is_json_number(text: &str) -> bool {
    let b = text.as_bytes();
    let mut i = usize::from(b.first() == Some(&b'-'));
    let digits = |i: &mut usize| {
        let start = *i;
        while b.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i - start
    };
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            digits(&mut i);
        }
        _ => return false,
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if digits(&mut i) == 0 {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == b.len()
}

struct NumberText<'a>(&'a datafusion::arrow::array::StringArray);

impl Encoder for NumberText<'_> {
    fn encode(&mut self, idx: usize, out: &mut Vec<u8>) {
        let text = self.0.value(idx);
        if is_json_number(text) {
            out.extend_from_slice(text.as_bytes());
            return;
        }
        // A CSV's ` 5`, `+5`, `.5` or `5.` is no JSON number: written as the same digits in
        // JSON's form, or, if they make none (`NaN`), as the text it is (never a line that is
        // no JSON, nor a number through a float).
        match as_json_number(text) {
            Some(number) => out.extend_from_slice(number.as_bytes()),
            None => out.extend_from_slice(serde_json::Value::from(text).to_string().as_bytes()),
        }
    }
}

struct ValueText<'a>(&'a datafusion::arrow::array::StringArray);

impl Encoder for ValueText<'_> {
    fn encode(&mut self, idx: usize, out: &mut Vec<u8>) {
        let text = self.0.value(idx);
        // The reader made each one JSON value; anything else goes as the text it is (never a
        // line that is no JSON).
        if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() {
            out.extend_from_slice(text.as_bytes());
        } else {
            out.extend_from_slice(serde_json::Value::from(text).to_string().as_bytes());
        }
    }
}

/// Rows of `batch` with a float that is not a number JSON can carry (NaN, an infinity: a
/// division by 0.0, a sum past the largest double), which a JSON record would carry as null,
/// silently another value: `batch` without them, and each of them as (its row as JSON, the
/// float written as text, and why it is not published). Nested floats are not looked into.
pub fn without_non_finite(batch: &RecordBatch) -> Result<(RecordBatch, Vec<(String, String)>)> {
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes::{Float16Type, Float32Type, Float64Type};
    let n = batch.num_rows();
    let schema = batch.schema();
    // Most batches have no such float: a pass over the floats' values (null slots too, which
    // the rows below tell apart) finds that without building anything per row.
    let all_finite = batch.columns().iter().all(|c| match c.data_type() {
        DataType::Float64 => c
            .as_primitive::<Float64Type>()
            .values()
            .iter()
            .all(|v| v.is_finite()),
        DataType::Float32 => c
            .as_primitive::<Float32Type>()
            .values()
            .iter()
            .all(|v| v.is_finite()),
        DataType::Float16 => c
            .as_primitive::<Float16Type>()
            .values()
            .iter()
            .all(|v| v.is_finite()),
        _ => true,
    });
    if all_finite {
        return Ok((batch.clone(), Vec::new()));
    }
    let mut bad: Vec<Option<String>> = vec![None; n];
    for (field, column) in schema.fields().iter().zip(batch.columns()) {
        let finite: Vec<bool> = match field.data_type() {
            DataType::Float64 => column
                .as_primitive::<Float64Type>()
                .iter()
                .map(|v| v.is_none_or(f64::is_finite))
                .collect(),
            DataType::Float32 => column
                .as_primitive::<Float32Type>()
                .iter()
                .map(|v| v.is_none_or(f32::is_finite))
                .collect(),
            DataType::Float16 => column
                .as_primitive::<Float16Type>()
                .iter()
                .map(|v| v.is_none_or(|v| v.is_finite()))
                .collect(),
            _ => continue,
        };
        for (row, finite) in finite.into_iter().enumerate() {
            if !finite && bad[row].is_none() {
                let value = datafusion::arrow::util::display::array_value_to_string(column, row)
                    .unwrap_or_default();
                bad[row] = Some(format!(
                    "{} is {value}, which a JSON record cannot carry (it would be null): the \
                     row is not published; a division by 0.0 or a total past the largest \
                     double makes one, NULLIF(x, 0.0) or a guard in CASE keeps it out",
                    field.name()
                ));
            }
        }
    }
    if bad.iter().all(Option::is_none) {
        return Ok((batch.clone(), Vec::new()));
    }
    // The refused rows with their floats as text ("inf", "NaN").
    let mut fields = Vec::with_capacity(batch.num_columns());
    let mut columns = Vec::with_capacity(batch.num_columns());
    for (field, column) in schema.fields().iter().zip(batch.columns()) {
        if matches!(
            field.data_type(),
            DataType::Float16 | DataType::Float32 | DataType::Float64
        ) {
            columns.push(cast(column, &DataType::Utf8)?);
            fields.push(Field::new(field.name(), DataType::Utf8, true));
        } else {
            columns.push(column.clone());
            fields.push(field.as_ref().clone());
        }
    }
    let texts = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?;
    let mut refused = Vec::new();
    for (row, why) in bad.iter().enumerate() {
        if let Some(why) = why {
            let (bytes, _) = encode_json_rows(&texts.slice(row, 1))?;
            let json = String::from_utf8_lossy(&bytes).trim_end().to_string();
            refused.push((json, why.clone()));
        }
    }
    let keep: datafusion::arrow::array::BooleanArray =
        bad.iter().map(|b| Some(b.is_none())).collect();
    let kept = datafusion::arrow::compute::filter_record_batch(batch, &keep)?;
    Ok((kept, refused))
}

/// Encodes each row as a JSON object (nulls written out, timestamps as epoch ms). Returns the
/// bytes and the end offset of each row in them.
pub fn encode_json_rows(batch: &RecordBatch) -> Result<(Vec<u8>, Vec<usize>)> {
    // Timestamps go out as epoch milliseconds, like the inputs.
    let mut fields = Vec::with_capacity(batch.num_columns());
    let mut columns = Vec::with_capacity(batch.num_columns());
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        if let DataType::Timestamp(..) = field.data_type() {
            let ms = cast(
                column,
                &DataType::Timestamp(datafusion::arrow::datatypes::TimeUnit::Millisecond, None),
            )?;
            columns.push(cast(&ms, &DataType::Int64)?);
            fields.push(Field::new(field.name(), DataType::Int64, true));
        } else if let DataType::Decimal128(p, s) | DataType::Decimal256(p, s) = field.data_type()
            && *s < 0
        {
            // Arrow's JSON writer writes a negative scale's digits without their zeros
            // (`000` for 1 200, not JSON): the same number at scale 0, exactly.
            let whole = DataType::Decimal256((i16::from(*p) - i16::from(*s)).min(76) as u8, 0);
            columns.push(cast(column, &whole)?);
            fields.push(Field::new(field.name(), whole, true));
        } else {
            columns.push(column.clone());
            fields.push(field.as_ref().clone().with_nullable(true));
        }
    }
    // Every field nullable: a function may give NULL where its result is declared NOT NULL
    // (`to_timestamp_seconds` past the timestamps' range), and the rows were refused whole
    // (a preview answered 500); JSON writes the null.
    let plain = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?;
    let mut writer = WriterBuilder::new()
        .with_explicit_nulls(true)
        .with_encoder_factory(Arc::new(NumberTexts))
        .build::<_, LineDelimited>(Vec::new());
    writer.write(&plain)?;
    writer.finish()?;
    let bytes = writer.into_inner();
    // JSON strings escape newlines, so each '\n' ends exactly one row.
    let ends: Vec<usize> = bytes
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .map(|(i, _)| i)
        .collect();
    Ok((bytes, ends))
}

/// A DLQ record (schema `schemas/topics/dlq_record.avsc`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq, serde::Deserialize)]
pub struct DlqRecord {
    /// Topic the record was read from.
    pub topic: String,
    /// Partition it was read from.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Original key, base64.
    pub key: Option<String>,
    /// Why it was rejected.
    pub error: String,
    /// `decode`, `validate`, `reference` (an id a reference table does not hold, or a row of
    /// a followed reference table's topic that does not fit it), `gap` (records deleted
    /// before the query read them), `query` (a record the query's plan failed on) or `result`
    /// (a window's result the plan above the windows failed on; offset -1, the window's row
    /// as JSON for payload).
    pub stage: String,
    /// Original value bytes, base64.
    pub payload: String,
    /// When it was rejected, epoch ms.
    pub received_at: i64,
    /// The query whose source schema rejected it, when each query decodes its own input (the
    /// service); null when one decoder serves every query of a topic.
    pub query: Option<String>,
    /// A gap record (stage `gap`): the offset after the last record missing; `offset` is the
    /// first. Absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gap_end: Option<i64>,
}

/// A record that stands for one input record: its identity is that record's position, not its
/// content (which carries processing times).
pub trait Provenance {
    /// The input record's topic, partition and offset, and the query.
    fn provenance(&self) -> (&str, i32, i64, Option<&str>);
}

impl Provenance for DlqRecord {
    /// A result not published (stage `result`) has no input position: it is known by its
    /// row, which a replay of the same input gives again.
    fn provenance(&self) -> (&str, i32, i64, Option<&str>) {
        let offset = match self.stage.as_str() {
            "result" => record_id(&[self.payload.as_bytes()]) as i64,
            _ => self.offset,
        };
        (&self.topic, self.partition, offset, self.query.as_deref())
    }
}

impl Provenance for LateRecord {
    fn provenance(&self) -> (&str, i32, i64, Option<&str>) {
        (&self.topic, self.partition, self.offset, Some(&self.query))
    }
}

/// FNV-1a over byte strings, each followed by its length: a stable identity across processes
/// and builds (unlike the standard library's hasher).
pub fn record_id(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.iter().chain((part.len() as u64).to_le_bytes().iter()) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The ids of the records `query` published to `partitions` from the given offsets up to
/// their current ends, read with read_committed, with their counts. With `from_log_start`,
/// each partition is read from its log start (only records at or past the given offset
/// count): for brokers that list, in a fetch, aborted transactions that ended before it.
/// Blocking; gives up on a partition that does not reach its end within `timeout`.
pub fn published_ids(
    brokers: &str,
    properties: &[(String, String)],
    query: &str,
    partitions: &[(String, i32, i64)],
    from_log_start: bool,
    timeout: Duration,
) -> Result<HashMap<u64, u32>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Headers;
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", brokers)
        .set("group.id", "urbanstream-recovery")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("isolation.level", "read_committed");
    for (k, v) in properties {
        client.set(k, v);
    }
    let consumer: BaseConsumer = client.create()?;
    let mut list = rdkafka::TopicPartitionList::new();
    let mut ends: HashMap<(String, i32), i64> = HashMap::new();
    for (topic, partition, from) in partitions {
        let (_, high) = consumer.fetch_watermarks(topic, *partition, timeout)?;
        if high > *from {
            let start = if from_log_start {
                rdkafka::Offset::Beginning
            } else {
                rdkafka::Offset::Offset(*from)
            };
            list.add_partition_offset(topic, *partition, start)?;
            ends.insert((topic.clone(), *partition), high);
        }
    }
    let mut ids: HashMap<u64, u32> = HashMap::new();
    if ends.is_empty() {
        return Ok(ids);
    }
    consumer.assign(&list)?;
    let deadline = std::time::Instant::now() + timeout;
    while !ends.is_empty() && std::time::Instant::now() < deadline {
        // By position, not by the last message seen: a partition of transactional records
        // ends with a commit marker that is never delivered.
        if let Ok(positions) = consumer.position() {
            for e in positions.elements() {
                let key = (e.topic().to_string(), e.partition());
                if let rdkafka::Offset::Offset(p) = e.offset()
                    && ends.get(&key).is_some_and(|end| p >= *end)
                {
                    ends.remove(&key);
                }
            }
        }
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message?;
        let key = (message.topic().to_string(), message.partition());
        let counted = partitions
            .iter()
            .find(|(t, p, _)| *t == key.0 && *p == key.1)
            .is_some_and(|(_, _, from)| message.offset() >= *from);
        if let (true, Some(headers)) = (counted, message.headers()) {
            let mut ours = false;
            let mut id = None;
            for h in headers.iter() {
                if h.key == QUERY_HEADER {
                    ours = h.value == Some(query.as_bytes());
                } else if h.key == ID_HEADER
                    && let Some(v) = h.value.and_then(|v| <[u8; 8]>::try_from(v).ok())
                {
                    id = Some(u64::from_be_bytes(v));
                }
            }
            if let (true, Some(id)) = (ours, id) {
                *ids.entry(id).or_default() += 1;
            }
        }
        if ends
            .get(&key)
            .is_some_and(|end| message.offset() + 1 >= *end)
        {
            ends.remove(&key);
        }
    }
    if !ends.is_empty() {
        tracing::warn!(
            partitions = ends.len(),
            "outputs published before the restart could not all be read back in time; some may be published again"
        );
    }
    Ok(ids)
}

/// Most bytes of a rejected record's key or value copied into its DLQ record.
pub const DLQ_COPY_BYTES: usize = 64 * 1024;

/// Header naming the query that published a record (exactly-once mode).
pub const QUERY_HEADER: &str = "urbanstream-query";
/// Header with a record's identity (exactly-once mode).
pub const ID_HEADER: &str = "urbanstream-id";

/// The Kafka key of the DLQ record of a record keyed `key`: its first [`DLQ_COPY_BYTES`] (a
/// key near the broker's record limit, copied whole beside its copy in the value, would put
/// the DLQ record over the limit, and it could never be published).
pub fn dlq_key(key: Option<&[u8]>) -> Option<Vec<u8>> {
    key.map(|k| k[..k.len().min(DLQ_COPY_BYTES)].to_vec())
}

impl DlqRecord {
    /// The DLQ record of record `index` of `raw`, which query `query`'s plan failed on with
    /// `error` (stage `query`), with the record's Kafka key.
    pub fn query_failure(
        raw: &RawBatch,
        index: u32,
        error: &str,
        received_at: i64,
        query: Option<&String>,
    ) -> (Option<Vec<u8>>, Self) {
        let reject = Reject {
            index,
            stage: crate::decode::RejectStage::Query,
            error: format!("the query failed on this record: {error}"),
        };
        let mut record = Self::new(raw, &reject, received_at);
        record.query = query.cloned();
        (dlq_key(raw.key(index as usize)), record)
    }

    /// The DLQ record of a rejected record of `raw`. A key or value over
    /// [`DLQ_COPY_BYTES`] is copied in part (so that the DLQ record itself stays publishable);
    /// the error says so, and the whole record stays at its topic, partition and offset.
    pub fn new(raw: &RawBatch, reject: &Reject, received_at: i64) -> Self {
        let i = reject.index as usize;
        let value = raw.value(i);
        let key = raw.key(i);
        let mut error = reject.error.clone();
        let cut = |bytes: &[u8], what: &str, error: &mut String| -> String {
            if bytes.len() > DLQ_COPY_BYTES {
                error.push_str(&format!(
                    " ({what} copied in part: its first {DLQ_COPY_BYTES} of {} bytes)",
                    bytes.len()
                ));
                BASE64.encode(&bytes[..DLQ_COPY_BYTES])
            } else {
                BASE64.encode(bytes)
            }
        };
        let key = key.map(|k| cut(k, "key", &mut error));
        let payload = cut(value, "payload", &mut error);
        Self {
            topic: raw.topic.to_string(),
            partition: raw.partitions[i],
            offset: raw.offsets[i],
            key,
            error,
            stage: reject.stage.as_str().to_string(),
            payload,
            received_at,
            query: None,
            gap_end: None,
        }
    }
}

/// A late record (schema `schemas/topics/late_record.avsc`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq, serde::Deserialize)]
pub struct LateRecord {
    /// Query that could not use it.
    pub query: String,
    /// Topic the record was read from.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// The event's time, epoch ms; null when the record had none (`missing_event_time`).
    pub event_time: Option<i64>,
    /// The query watermark when it arrived, epoch ms.
    pub watermark: i64,
    /// `beyond_allowed_lateness`, `future_timestamp`, `window_closed` (too late for the
    /// window named by `window_start`/`window_end`; the event updated its other windows), or
    /// `missing_event_time`, or `event_time_out_of_range` (outside the years 0001 to 9999).
    pub reason: String,
    /// The window it missed, epoch ms (`window_closed` only).
    pub window_start: Option<i64>,
    /// End of the window it missed, epoch ms (`window_closed` only).
    pub window_end: Option<i64>,
    /// Original value bytes, base64.
    pub payload: String,
}

/// Settings of the Kafka sink.
#[derive(Debug, Clone)]
pub struct KafkaSinkConfig {
    /// Bootstrap servers.
    pub brokers: String,
    /// How long the producer waits to fill a batch.
    pub linger: Duration,
    /// Extra librdkafka properties.
    pub properties: Vec<(String, String)>,
    /// With a transactional id, the producer is transactional (exactly-once output): records
    /// are visible to read_committed consumers once [`KafkaSink::commit_epoch`] commits them.
    pub transactional_id: Option<String>,
    /// The query's name, written into the `urbanstream-query` header in exactly-once mode.
    pub query: String,
}

impl KafkaSinkConfig {
    /// Defaults for `brokers`: 5 ms linger, not transactional.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            linger: Duration::from_millis(5),
            properties: Vec::new(),
            transactional_id: None,
            query: String::new(),
        }
    }
}

/// How long a transaction call (init, offsets, commit) may take.
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a transaction may stay open before the broker aborts it and fences its producer
/// (`transaction.timeout.ms`).
pub const TRANSACTION_LIFETIME: Duration = Duration::from_secs(120);

/// Deliveries not yet acknowledged by the broker.
#[derive(Default)]
pub struct Pending {
    deliveries: Vec<Delivery>,
    /// Deliveries acknowledged and let go (see [`Pending::push`]).
    acknowledged: usize,
    /// The first delivery the broker refused among those let go.
    refused: Option<KafkaError>,
    /// Outstanding deliveries at which those acknowledged are let go next.
    settle_at: usize,
}

/// Deliveries [`Pending`] holds before it lets go of those already acknowledged: a step that
/// sends millions of records (a catch-up closing many windows) keeps a handle for the ones
/// still in flight only, which the producer's queue bounds.
const SETTLE_EVERY: usize = 1 << 16;

impl Pending {
    /// Number of deliveries, acknowledged or outstanding.
    pub fn len(&self) -> usize {
        self.deliveries.len() + self.acknowledged
    }

    /// Whether it holds no delivery.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push(&mut self, delivery: Delivery) {
        if self.deliveries.len() >= self.settle_at.max(SETTLE_EVERY) {
            let before = self.deliveries.len();
            let refused = &mut self.refused;
            self.deliveries.retain_mut(|d| match d.try_recv() {
                Ok(Ok(())) => false,
                Ok(Err(e)) => {
                    refused.get_or_insert(e);
                    false
                }
                Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                    refused.get_or_insert(KafkaError::Canceled);
                    false
                }
                Err(tokio::sync::oneshot::error::TryRecvError::Empty) => true,
            });
            self.acknowledged += before - self.deliveries.len();
            // Twice those still in flight: each pass lets go of as many as it keeps, or more.
            self.settle_at = 2 * self.deliveries.len();
        }
        self.deliveries.push(delivery);
    }

    /// Waits for every delivery; fails on the first that the broker refused.
    pub async fn acknowledged(self) -> Result<usize> {
        let n = self.len();
        if let Some(e) = self.refused {
            return Err(e.into());
        }
        for delivery in self.deliveries {
            match delivery.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => return Err(KafkaError::Canceled.into()),
            }
        }
        Ok(n)
    }
}

/// An idempotent (or transactional) producer for indicator, DLQ and late topics.
pub struct KafkaSink {
    producer: Arc<BaseProducer<Deliveries>>,
    /// Serves the producer's delivery reports while the sink lives.
    _poller: DeliveryPoller,
    /// Exactly-once mode: the query's name for the header.
    tag: Option<String>,
    /// Ids already published (read back at recovery), with their counts: not sent again.
    suppressed: std::sync::Mutex<std::collections::HashMap<u64, u32>>,
    /// Whether `suppressed` holds any id: records skip its lock otherwise.
    suppressing: std::sync::atomic::AtomicBool,
    /// Records not sent because they were suppressed.
    suppressed_count: std::sync::atomic::AtomicU64,
    /// Topics written as Avro or Protobuf, with their encoders; the others get JSON.
    encoders: std::collections::HashMap<String, crate::decode::RecordEncoder>,
    /// The largest record the producer sends (`message.max.bytes`).
    max_record_bytes: usize,
}

/// librdkafka's default `message.max.bytes`.
const DEFAULT_MAX_RECORD_BYTES: usize = 1_000_000;

/// What a record's framing takes beside its key and value (headers included), kept free.
const RECORD_OVERHEAD: usize = 1024;

/// A transactional call's error; a broker without Kafka transactions is named as such (a
/// configuration problem: retrying cannot help).
fn transaction_error(e: KafkaError) -> Error {
    use rdkafka::types::RDKafkaErrorCode;
    let unsupported = matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::UnsupportedFeature | RDKafkaErrorCode::UnsupportedVersion)
    ) || e.to_string().contains("not supported by broker");
    if unsupported {
        return Error::Config(format!(
            "the broker does not implement Kafka transactions ({e}): checkpoint.exactly_once \
             needs one that does (Apache Kafka 0.11 or later, or a compatible broker with \
             transactions); set checkpoint.exactly_once = false for at-least-once output"
        ));
    }
    Error::Kafka(e)
}

impl KafkaSink {
    /// Creates the producer; a transactional one is initialised (fencing an earlier instance
    /// with the same id) and opens its first transaction.
    pub fn new(config: &KafkaSinkConfig) -> Result<Self> {
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &config.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", config.linger.as_millis().to_string())
            .set("message.timeout.ms", "300000");
        if let Some(id) = &config.transactional_id {
            // A record must time out before its transaction does.
            client
                .set("transactional.id", id)
                .set(
                    "transaction.timeout.ms",
                    TRANSACTION_LIFETIME.as_millis().to_string(),
                )
                .set("message.timeout.ms", "110000");
        }
        for (k, v) in &config.properties {
            client.set(k, v);
        }
        let producer: Arc<BaseProducer<Deliveries>> =
            Arc::new(client.create_with_context(Deliveries)?);
        let poller = DeliveryPoller::start(&producer, &config.query)?;
        if config.transactional_id.is_some() {
            producer
                .init_transactions(TRANSACTION_TIMEOUT)
                .map_err(transaction_error)?;
            producer.begin_transaction().map_err(transaction_error)?;
        }
        Ok(Self {
            producer,
            _poller: poller,
            tag: config
                .transactional_id
                .as_ref()
                .map(|_| config.query.clone()),
            suppressed: Default::default(),
            suppressing: Default::default(),
            suppressed_count: Default::default(),
            encoders: Default::default(),
            max_record_bytes: config
                .properties
                .iter()
                .rev()
                .find(|(k, _)| k == "message.max.bytes")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(DEFAULT_MAX_RECORD_BYTES),
        })
    }

    /// Writes `topic`'s rows with `encoder` (Avro with its schema registered, or Protobuf)
    /// from now on.
    pub fn write_as(&mut self, topic: impl Into<String>, encoder: crate::decode::RecordEncoder) {
        self.encoders.insert(topic.into(), encoder);
    }

    /// Whether the producer is transactional.
    pub fn is_transactional(&self) -> bool {
        self.tag.is_some()
    }

    /// Commits the open transaction with the consumed `offsets` (next offset to read per
    /// input partition) of `group`, and opens the next. Blocks on a worker thread.
    pub async fn commit_epoch(
        &self,
        offsets: &HashMap<(String, i32), i64>,
        group: rdkafka::consumer::ConsumerGroupMetadata,
    ) -> Result<()> {
        let mut list = rdkafka::TopicPartitionList::new();
        for ((topic, partition), offset) in offsets {
            list.add_partition_offset(topic, *partition, rdkafka::Offset::Offset(*offset))?;
        }
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            producer
                .send_offsets_to_transaction(&list, &group, TRANSACTION_TIMEOUT)
                .map_err(transaction_error)?;
            producer
                .commit_transaction(TRANSACTION_TIMEOUT)
                .map_err(transaction_error)?;
            producer.begin_transaction().map_err(transaction_error)?;
            Ok(())
        })
        .await
        .map_err(|e| Error::Config(format!("transaction task failed: {e}")))?
    }

    /// Records with these ids are not published again (one time per count), besides those
    /// already held back.
    pub fn suppress(&self, ids: HashMap<u64, u32>) {
        if let Ok(mut s) = self.suppressed.lock() {
            for (id, n) in ids {
                *s.entry(id).or_default() += n;
            }
            self.suppressing
                .store(!s.is_empty(), std::sync::atomic::Ordering::Release);
        }
    }

    /// Whether records read back are still held back.
    pub fn is_suppressing(&self) -> bool {
        self.suppressed
            .lock()
            .map(|s| !s.is_empty())
            .unwrap_or(false)
    }

    /// Ends suppression; returns how many records it held back and how many ids were left.
    pub fn end_suppression(&self) -> (u64, usize) {
        self.suppressing
            .store(false, std::sync::atomic::Ordering::Release);
        let left = self
            .suppressed
            .lock()
            .map(|mut s| std::mem::take(&mut *s).len())
            .unwrap_or(0);
        (
            self.suppressed_count
                .load(std::sync::atomic::Ordering::Relaxed),
            left,
        )
    }

    /// Publishes each row of `batch` (already conformed to the topic's schema) as JSON (or as
    /// Avro or Protobuf, for a topic given to [`KafkaSink::write_as`]), keyed by the column
    /// `key_column` (its text form), or without key. With `keyless_in_order`, a row whose key
    /// is NULL or empty goes to partition 0 (see
    /// [`crate::plan::table::StreamOptions::keyless_in_order`]).
    pub async fn send_rows(
        &self,
        topic: &str,
        batch: &RecordBatch,
        key_column: Option<&str>,
        keyless_in_order: bool,
        pending: &mut Pending,
    ) -> Result<()> {
        let keys = match key_column {
            Some(name) => {
                let column = batch
                    .column_by_name(name)
                    .ok_or_else(|| Error::Config(format!("key column {name} is missing")))?;
                Some(cast(column, &DataType::Utf8)?)
            }
            None => None,
        };
        let keys = keys
            .as_ref()
            .and_then(|k| k.as_any().downcast_ref::<StringArray>());
        let (bytes, ends) = encode_json_rows(batch)?;
        let mut start = 0;
        for (r, end) in ends.into_iter().enumerate() {
            let key = keys
                .filter(|k| !k.is_null(r))
                .map(|k| k.value(r).as_bytes());
            // A revised row keyed by a column whose value is NULL or empty has no key to
            // place it by (the producer spreads such records over the partitions at random):
            // it goes to the first partition, so that a window's revisions of it stay in
            // order.
            let partition =
                (keyless_in_order && key_column.is_some() && key.is_none_or(<[u8]>::is_empty))
                    .then_some(0);
            let json = &bytes[start..end];
            start = end + 1;
            let encoded;
            let value = match self.encoders.get(topic) {
                Some(encoder) => {
                    encoded = encoder.encode_json(json)?;
                    &encoded[..]
                }
                None => json,
            };
            let size = key.map_or(0, <[u8]>::len) + value.len();
            if size + RECORD_OVERHEAD > self.max_record_bytes {
                // Not a broker's passing trouble: retried, the query published the rows
                // before it again and again and never got past it.
                return Err(Error::ResourceLimit(format!(
                    "a result row for topic {topic} is {size} bytes, more than the largest \
                     record the producer sends (message.max.bytes = {}): make the row smaller \
                     (aggregate less text into one row, cut long texts with left(x, n))",
                    self.max_record_bytes
                )));
            }
            let id = self
                .tag
                .as_ref()
                .map(|_| record_id(&[topic.as_bytes(), key.unwrap_or_default(), value]));
            self.send(topic, partition, key, value, id, pending).await?;
        }
        Ok(())
    }

    /// Publishes serialisable records (DLQ, late) as JSON.
    pub async fn send_json<T: Serialize + Provenance>(
        &self,
        topic: &str,
        records: &[(Option<Vec<u8>>, T)],
        pending: &mut Pending,
    ) -> Result<()> {
        for (key, record) in records {
            let payload = serde_json::to_vec(record)
                .map_err(|e| Error::Config(format!("cannot encode record: {e}")))?;
            let id = self.tag.as_ref().map(|_| {
                let (t, p, o, q) = record.provenance();
                record_id(&[
                    topic.as_bytes(),
                    t.as_bytes(),
                    &p.to_le_bytes(),
                    &o.to_le_bytes(),
                    q.unwrap_or_default().as_bytes(),
                ])
            });
            self.send(topic, None, key.as_deref(), &payload, id, pending)
                .await?;
        }
        Ok(())
    }

    /// Whether a record with this id was already published (and counts it off).
    fn is_suppressed(&self, id: u64) -> bool {
        if !self.suppressing.load(std::sync::atomic::Ordering::Acquire) {
            return false;
        }
        let Ok(mut s) = self.suppressed.lock() else {
            return false;
        };
        if s.is_empty() {
            self.suppressing
                .store(false, std::sync::atomic::Ordering::Release);
            return false;
        }
        match s.get_mut(&id) {
            Some(n) => {
                *n -= 1;
                if *n == 0 {
                    s.remove(&id);
                }
                self.suppressed_count
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    async fn send(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: Option<&[u8]>,
        payload: &[u8],
        id: Option<u64>,
        pending: &mut Pending,
    ) -> Result<()> {
        if let Some(id) = id
            && self.is_suppressed(id)
        {
            return Ok(());
        }
        let id_bytes = id.map(u64::to_be_bytes);
        let mut headers: Vec<(&str, &[u8])> = Vec::new();
        if let (Some(tag), Some(id)) = (&self.tag, &id_bytes) {
            headers.push((QUERY_HEADER, tag.as_bytes()));
            headers.push((ID_HEADER, &id[..]));
        }
        self.produce(topic, partition, key, payload, &headers, pending)
            .await
    }

    /// Publishes one record to `partition` of `topic` as it is, with `headers`: a
    /// repartitioned input record or a progress record. Never held back by recovery (the
    /// stage reading the topic drops what it has seen).
    pub async fn send_to_partition(
        &self,
        topic: &str,
        partition: i32,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: &[(&str, &[u8])],
        pending: &mut Pending,
    ) -> Result<()> {
        self.produce(topic, Some(partition), key, payload, headers, pending)
            .await
    }

    /// Publishes a record of `headers` alone (a progress record) to each of the first
    /// `partitions` partitions of `topic`, as [`KafkaSink::send_to_partition`] does.
    pub async fn send_to_partitions(
        &self,
        topic: &str,
        partitions: u32,
        headers: &[(&str, &[u8])],
        pending: &mut Pending,
    ) -> Result<()> {
        for q in 0..partitions {
            let q = i32::try_from(q).unwrap_or(i32::MAX);
            self.send_to_partition(topic, q, None, &[], headers, pending)
                .await?;
        }
        Ok(())
    }

    async fn produce(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: &[(&str, &[u8])],
        pending: &mut Pending,
    ) -> Result<()> {
        loop {
            let (delivered, delivery) = tokio::sync::oneshot::channel();
            let mut record =
                BaseRecord::<[u8], [u8], _>::with_opaque_to(topic, Box::new(delivered))
                    .payload(payload);
            if let Some(partition) = partition {
                record = record.partition(partition);
            }
            if let Some(key) = key {
                record = record.key(key);
            }
            if !headers.is_empty() {
                let mut owned = OwnedHeaders::new();
                for (key, value) in headers {
                    owned = owned.insert(Header {
                        key,
                        value: Some(*value),
                    });
                }
                record = record.headers(owned);
            }
            match self.producer.send(record) {
                Ok(()) => {
                    pending.push(delivery);
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // The local queue is full: let deliveries drain, then try again.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }

    /// Waits until every queued record is delivered or `timeout` passes.
    pub fn flush(&self, timeout: Duration) -> Result<()> {
        self.producer.flush(timeout)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A column of JSON values' texts (a JSON-lines field of several kinds) is written as
    /// those values, digits and all; one that is no JSON value is written as a string, never
    /// as a line that is no JSON. A column of number texts is written as numbers.
    #[test]
    fn value_and_number_texts_are_written_as_the_values_they_are() {
        let marked = |name: &str, marker: &str| {
            Field::new(name, DataType::Utf8, true).with_metadata(std::collections::HashMap::from([
                (marker.into(), "true".into()),
            ]))
        };
        let schema = Arc::new(Schema::new(vec![
            marked("v", JSON_VALUE_TEXT),
            marked("n", JSON_NUMBER_TEXT),
        ]));
        let values = datafusion::arrow::array::StringArray::from(vec![
            Some("0.1000000000000000055"),
            Some("\"12.5\""),
            Some("[1, \"a\"]"),
            None,
            Some("not json"),
        ]);
        let numbers = datafusion::arrow::array::StringArray::from(vec![
            Some("12345678901234567890"),
            Some(" +.5"),
            Some("1e300"),
            Some("NaN"),
            None,
        ]);
        let batch =
            RecordBatch::try_new(schema, vec![Arc::new(values), Arc::new(numbers)]).expect("batch");
        let (bytes, ends) = encode_json_rows(&batch).expect("encoded");
        let mut start = 0;
        let rows: Vec<&str> = ends
            .iter()
            .map(|&end| {
                let row = std::str::from_utf8(&bytes[start..end]).expect("utf-8");
                start = end;
                row.trim_start_matches('\n')
            })
            .collect();
        assert_eq!(
            rows,
            [
                r#"{"v":0.1000000000000000055,"n":12345678901234567890}"#,
                r#"{"v":"12.5","n":0.5}"#,
                r#"{"v":[1, "a"],"n":1e300}"#,
                r#"{"v":null,"n":"NaN"}"#,
                r#"{"v":"not json","n":null}"#,
            ]
        );
    }

    /// A broker without transactions (tansu 0.6 answers EndTxn as unsupported) fails an
    /// exactly-once query as a configuration problem naming the remedy; other transactional
    /// errors stay Kafka errors (retried).
    #[test]
    fn a_broker_without_transactions_is_named() {
        let e = transaction_error(KafkaError::MessageProduction(
            RDKafkaErrorCode::UnsupportedFeature,
        ));
        assert!(
            matches!(&e, Error::Config(m) if m.contains("does not implement Kafka transactions")
                && m.contains("exactly_once = false")),
            "{e}"
        );
        assert!(!e.is_transient());
        let e = transaction_error(KafkaError::MessageProduction(
            RDKafkaErrorCode::MessageTimedOut,
        ));
        assert!(matches!(e, Error::Kafka(_)), "{e}");
        // A fenced producer is retried (a transaction past its timeout is fenced too); a
        // fenced group member is not.
        assert!(
            Error::Kafka(KafkaError::MessageProduction(
                RDKafkaErrorCode::ProducerFenced
            ))
            .is_transient()
        );
        assert!(
            !Error::Kafka(KafkaError::MessageConsumption(
                RDKafkaErrorCode::FencedInstanceId
            ))
            .is_transient()
        );
    }
    use crate::schema::SchemaRegistry;

    #[test]
    fn conform_orders_casts_and_names_problems() {
        use datafusion::arrow::array::{Int64Array, TimestampMillisecondArray};
        let registry = SchemaRegistry::embedded().expect("schemas");
        let schema = registry.get("congestion_indicator").expect("schema");
        let batch = RecordBatch::try_from_iter(vec![
            ("vehicles", Arc::new(Int64Array::from(vec![3])) as ArrayRef),
            (
                "segment_id",
                Arc::new(StringArray::from(vec!["kim_ma_w"])) as ArrayRef,
            ),
            (
                "window_start",
                Arc::new(TimestampMillisecondArray::from(vec![60_000])) as ArrayRef,
            ),
            (
                "window_end",
                Arc::new(TimestampMillisecondArray::from(vec![120_000])) as ArrayRef,
            ),
            ("revision", Arc::new(Int64Array::from(vec![0])) as ArrayRef),
        ])
        .expect("batch");
        let out = conform(&batch, &schema).expect("conform");
        let (bytes, ends) = encode_json_rows(&out).expect("encode");
        assert_eq!(ends.len(), 1);
        assert_eq!(
            std::str::from_utf8(&bytes[..ends[0]]).expect("utf8"),
            concat!(
                r#"{"segment_id":"kim_ma_w","window_start":60000,"window_end":120000,"vehicles":3,"#,
                r#""mean_speed_kmh":null,"motorbike_share":null,"space_mean_speed_kmh":null,"#,
                r#""flow_veh_h":null,"flow_pcu_h":null,"density_pcu_km_ln":null,"v_c":null,"#,
                r#""tti":null,"los":null,"revision":0,"is_final":true}"#
            )
        );
        let extra = RecordBatch::try_from_iter(vec![(
            "speed",
            Arc::new(Int64Array::from(vec![1])) as ArrayRef,
        )])
        .expect("batch");
        let err = conform(&extra, &schema).unwrap_err().to_string();
        assert!(err.contains("column speed"), "{err}");
        // A NULL in a field that may not be NULL is named with the way out (it was Arrow's
        // "declared as non-nullable but contains null values").
        let no_segment = RecordBatch::try_from_iter(vec![
            (
                "segment_id",
                Arc::new(StringArray::from(vec![Some("kim_ma_w"), None])) as ArrayRef,
            ),
            (
                "window_start",
                Arc::new(TimestampMillisecondArray::from(vec![60_000, 60_000])) as ArrayRef,
            ),
            (
                "window_end",
                Arc::new(TimestampMillisecondArray::from(vec![120_000, 120_000])) as ArrayRef,
            ),
            (
                "vehicles",
                Arc::new(Int64Array::from(vec![3, 4])) as ArrayRef,
            ),
        ])
        .expect("batch");
        let err = conform(&no_segment, &schema).unwrap_err().to_string();
        assert!(
            err.contains(
                "field segment_id may not be NULL, but the query gave NULL for it in 1 of 2 rows: \
                 write COALESCE(segment_id, <a value>) AS segment_id"
            ),
            "{err}"
        );
    }

    #[test]
    fn decimals_of_a_negative_scale_are_written_as_json_numbers() {
        use datafusion::arrow::array::Decimal128Array;
        let hundreds = Decimal128Array::from(vec![Some(12), None, Some(-3)])
            .with_precision_and_scale(10, -2)
            .expect("decimal");
        let batch =
            RecordBatch::try_from_iter(vec![("x", Arc::new(hundreds) as ArrayRef)]).expect("batch");
        let (bytes, ends) = encode_json_rows(&batch).expect("encode");
        assert_eq!(ends.len(), 3);
        let text = std::str::from_utf8(&bytes).expect("utf8");
        let rows: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect(l))
            .collect();
        assert_eq!(
            rows,
            [
                serde_json::json!({"x": 1200}),
                serde_json::json!({"x": null}),
                serde_json::json!({"x": -300})
            ]
        );
    }

    /// A number its field cannot hold fails with the field named (a safe cast wrote it as
    /// null); a float that is no number is null in any number field, as before.
    #[test]
    fn a_number_too_large_for_its_field_is_an_error_and_nan_is_null() {
        use datafusion::arrow::array::{Float64Array, Int64Array, TimestampMillisecondArray};
        let registry = SchemaRegistry::embedded().expect("schemas");
        let schema = registry.get("water_indicator").expect("schema");
        let field = schema
            .output_schema()
            .fields()
            .iter()
            .find(|f| f.data_type() == &DataType::Int32)
            .map(|f| f.name().clone())
            .expect("an INT field");
        let batch_of = |values: ArrayRef| {
            let mut columns: Vec<(String, ArrayRef)> = Vec::new();
            for f in schema.output_schema().fields() {
                if !f.is_nullable() && f.name() != &field {
                    let column: ArrayRef = match f.data_type() {
                        DataType::Utf8 => Arc::new(StringArray::from(vec!["x"])),
                        DataType::Timestamp(..) => {
                            Arc::new(TimestampMillisecondArray::from(vec![60_000]))
                        }
                        other => datafusion::scalar::ScalarValue::new_zero(other)
                            .and_then(|z| z.to_array_of_size(1))
                            .expect("a zero"),
                    };
                    columns.push((f.name().clone(), column));
                }
            }
            columns.push((field.clone(), values));
            RecordBatch::try_from_iter(columns).expect("batch")
        };
        let err = conform(
            &batch_of(Arc::new(Int64Array::from(vec![5_000_000_000]))),
            &schema,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(&format!(
                "column {field} holds a value its field's type INT cannot hold"
            )),
            "{err}"
        );
        let fits = conform(&batch_of(Arc::new(Int64Array::from(vec![3]))), &schema);
        assert!(fits.is_ok(), "{fits:?}");
        let nan = batch_of(Arc::new(Float64Array::from(vec![f64::NAN])));
        match conform(&nan, &schema) {
            Ok(out) => assert!(out.column_by_name(&field).expect("field").is_null(0)),
            // A field that may not be null says so, not that NaN does not fit.
            Err(e) => assert!(e.to_string().contains("may not be NULL"), "{e}"),
        }
    }

    #[test]
    fn a_text_is_not_written_into_a_number_field() {
        let registry = SchemaRegistry::embedded().expect("schemas");
        let schema = registry.get("congestion_indicator").expect("schema");
        let fits = |column: &str, data_type: DataType| {
            check_fit(
                &Schema::new(vec![Field::new(column, data_type, true)]),
                &schema,
            )
        };
        let err = fits("tti", DataType::Utf8).unwrap_err();
        assert!(
            err.starts_with("column tti is text but the sink's field tti is DOUBLE"),
            "{err}"
        );
        assert!(fits("tti", DataType::Int64).is_ok());
        assert!(fits("los", DataType::Float64).is_ok());
        assert!(fits("revision", DataType::Int32).is_ok());
        let err = fits("speed", DataType::Int64).unwrap_err();
        assert!(err.starts_with("column speed is not a field"), "{err}");
    }
}

#[cfg(test)]
mod number_text_tests {
    use super::*;

    /// A file's number goes on with its digits, in JSON's form: through a float,
    /// `.1000000000000000055511151231257827` became `0.1`.
    #[test]
    fn a_number_as_a_csv_writes_it_keeps_its_digits() {
        for (text, expected) in [
            ("12345678901234567890", Some("12345678901234567890")),
            (
                ".1000000000000000055511151231257827",
                Some("0.1000000000000000055511151231257827"),
            ),
            ("-.5", Some("-0.5")),
            ("+5", Some("5")),
            (" 5 ", Some("5")),
            ("12345678901234567890.", Some("12345678901234567890")),
            ("5.e3", Some("5e3")),
            ("1E-7", Some("1E-7")),
            ("NaN", None),
            ("inf", None),
            ("007", None),
            ("", None),
            ("-", None),
        ] {
            assert_eq!(as_json_number(text).as_deref(), expected, "{text:?}");
        }
    }
}
