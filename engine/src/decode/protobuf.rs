//! Protobuf records, read by reflection over message descriptors.
//!
//! A stream with `'format' 'protobuf'` names its message (`'protobuf_message'
//! 'urbanstream.city.CameraEvent'`). Descriptors come from the city's own `.proto`
//! (`schemas/protobuf/city.proto`, compiled into the binary) and from the files the operator
//! configures (`[protobuf] files`: `.proto` files, compiled with protox, or
//! `FileDescriptorSet` files as `protoc --descriptor_set_out` writes them): analysts' SQL never
//! names a file.
//!
//! A record is the message's binary encoding, plain or in the Confluent wire format (magic
//! byte 0, a 4-byte schema id, the message indexes, then the message; a plain message never
//! starts with a zero byte, since no field has number 0). The message's fields are matched to
//! the topic schema's by name: a field with presence that is not set is null (then the
//! schema's default, or a validation reject if required); enums are read as their value names;
//! a time is an integer in the stream's event-time unit or a `google.protobuf.Timestamp`.
//! Each record is decoded on its own, so a bad one costs nothing else.

use std::path::{Path, PathBuf};

use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, BinaryBuilder, BooleanBuilder, Date32Builder, Float32Builder, Float64Builder,
    Int32Builder, Int64Builder, RecordBatch, StringBuilder, StringViewBuilder,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Schema, TimeUnit};
use prost::Message as _;
use prost_reflect::{
    DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, Value,
};

use super::{Decoded, Reject, RejectStage, Shape};
use crate::error::{Error, Result};
use crate::source::RawBatch;

/// The city's `.proto`, compiled into the binary.
pub const CITY_PROTO: &str = include_str!("../../../schemas/protobuf/city.proto");
/// Its name among the descriptors.
const CITY_PROTO_NAME: &str = "urbanstream/city.proto";

/// The city's message for a topic schema of `schemas/topics/`: the `protobuf_message` of the
/// stream the schema file declares.
pub fn city_message(schema: &str) -> Option<String> {
    let avsc = crate::decode::avro::embedded_avsc(schema)?;
    let json: serde_json::Value = serde_json::from_str(avsc).ok()?;
    json.get("urbanstream")?
        .get("protobuf_message")?
        .as_str()
        .map(String::from)
}

/// Message descriptors by full name.
#[derive(Debug, Clone)]
pub struct Descriptors {
    pool: DescriptorPool,
}

/// Serves the embedded city `.proto` to the compiler.
struct Embedded;

impl protox::file::FileResolver for Embedded {
    fn open_file(&self, name: &str) -> std::result::Result<protox::file::File, protox::Error> {
        if name == CITY_PROTO_NAME {
            protox::file::File::from_source(name, CITY_PROTO)
        } else {
            Err(protox::Error::file_not_found(name))
        }
    }
}

fn proto_error(file: &str, e: impl std::fmt::Display) -> Error {
    Error::schema(file, e.to_string())
}

impl Descriptors {
    /// The city's messages.
    pub fn embedded() -> Result<Self> {
        Self::load(&[])
    }

    /// The city's messages and those of `files` (`.proto`, compiled with the file's directory
    /// as the include path; anything else is read as a binary `FileDescriptorSet`).
    pub fn load(files: &[PathBuf]) -> Result<Self> {
        let mut resolver = protox::file::ChainFileResolver::new();
        resolver.add(Embedded);
        resolver.add(protox::file::GoogleFileResolver::new());
        let mut compiler = protox::Compiler::with_file_resolver(resolver);
        compiler
            .open_file(CITY_PROTO_NAME)
            .map_err(|e| proto_error(CITY_PROTO_NAME, e))?;
        let mut pool = compiler.descriptor_pool();
        for file in files {
            let name = file.display().to_string();
            if file.extension().and_then(|e| e.to_str()) == Some("proto") {
                let dir = file.parent().unwrap_or(Path::new("."));
                let mut compiler =
                    protox::Compiler::new([dir]).map_err(|e| proto_error(&name, e))?;
                compiler
                    .include_imports(true)
                    .open_file(file)
                    .map_err(|e| proto_error(&name, e))?;
                pool.add_file_descriptor_set(compiler.file_descriptor_set())
                    .map_err(|e| proto_error(&name, e))?;
            } else {
                let bytes = std::fs::read(file).map_err(|e| proto_error(&name, e))?;
                pool.decode_file_descriptor_set(bytes.as_slice())
                    .map_err(|e| proto_error(&name, e))?;
            }
        }
        Ok(Self { pool })
    }

    /// The message called `name` (its full name, with the package).
    pub fn message(&self, name: &str) -> Result<MessageDescriptor> {
        self.pool.get_message_by_name(name).ok_or_else(|| {
            let mut known: Vec<String> = self
                .pool
                .all_messages()
                .filter(|m| !m.full_name().starts_with("google."))
                .map(|m| m.full_name().to_string())
                .collect();
            known.sort();
            Error::schema(
                name,
                format!(
                    "no such Protobuf message (known: {}); add its .proto or descriptor set to \
                     [protobuf] files",
                    known.join(", ")
                ),
            )
        })
    }
}

/// Decodes Protobuf records of one message into a topic schema.
#[derive(Debug)]
pub struct ProtobufDecoder {
    shape: Shape,
    message: MessageDescriptor,
    /// For each field of the topic schema, the message's field of that name.
    fields: Vec<Option<FieldDescriptor>>,
}

impl ProtobufDecoder {
    /// Matches `message`'s fields to the topic schema's; a field of a type that cannot be read
    /// as the schema's, or a required field the message lacks, is an error naming it.
    pub(crate) fn new(shape: Shape, message: MessageDescriptor) -> Result<Self> {
        let topic = shape.topic_schema();
        let mut fields = Vec::new();
        for (k, field) in shape.wire_schema.fields().iter().enumerate() {
            // Every column can be built, whether the message has it or not.
            Builder::new(field.data_type(), 0)
                .map_err(|e| Error::schema(&topic.name, format!("column {}: {e}", field.name())))?;
            match message.get_field_by_name(field.name()) {
                Some(f) => {
                    if f.is_list() || f.is_map() || !readable_as(&f.kind(), field.data_type()) {
                        return Err(Error::schema(
                            &topic.name,
                            format!(
                                "Protobuf field {}.{} ({:?}) cannot be read as {}",
                                message.full_name(),
                                f.name(),
                                f.kind(),
                                field.data_type()
                            ),
                        ));
                    }
                    fields.push(Some(f));
                }
                None if topic.required[k] => {
                    return Err(Error::schema(
                        &topic.name,
                        format!(
                            "Protobuf message {} has no field {}, which {} requires",
                            message.full_name(),
                            field.name(),
                            topic.name
                        ),
                    ));
                }
                None => fields.push(None),
            }
        }
        Ok(Self {
            shape,
            message,
            fields,
        })
    }

    /// Decodes every record of `raw`; bad records are rejected one by one.
    pub fn decode(&self, raw: &RawBatch) -> Result<Decoded> {
        let mut builders: Vec<Builder> = self
            .shape
            .wire_schema
            .fields()
            .iter()
            .map(|f| Builder::new(f.data_type(), raw.len()))
            .collect::<Result<_>>()?;
        let mut rows = Vec::with_capacity(raw.len());
        let mut rejects = Vec::new();
        for i in 0..raw.len() {
            let outcome = match self.shape.oversize(raw, i) {
                Some(error) => Err(error),
                None => self.decode_one(raw.value(i), &mut builders),
            };
            match outcome {
                Ok(()) => rows.push(i as u32),
                Err(error) => rejects.push(Reject {
                    index: i as u32,
                    stage: RejectStage::Decode,
                    error,
                }),
            }
        }
        let columns = builders
            .into_iter()
            .zip(self.shape.wire_schema.fields())
            .map(|(b, f)| b.finish(f.data_type()))
            .collect::<Result<Vec<ArrayRef>>>()?;
        let batch = RecordBatch::try_new(self.shape.wire_schema.clone(), columns)?;
        self.shape.finish(vec![batch], rows, rejects)
    }

    /// Appends one record's cells to `builders`, or says why it cannot be read (and appends
    /// nothing).
    fn decode_one(
        &self,
        value: &[u8],
        builders: &mut [Builder],
    ) -> std::result::Result<(), String> {
        let body = unframe(value)?;
        let message = DynamicMessage::decode(self.message.clone(), body)
            .map_err(|e| format!("bad Protobuf record ({}): {e}", self.message.full_name()))?;
        let values: Vec<Option<std::borrow::Cow<'_, Value>>> = self
            .fields
            .iter()
            .map(|f| match f {
                Some(f) if !f.supports_presence() || message.has_field(f) => {
                    Some(message.get_field(f))
                }
                _ => None,
            })
            .collect();
        let cells = values
            .iter()
            .zip(&self.fields)
            .zip(self.shape.wire_schema.fields())
            .map(|((v, f), field)| match (v, f) {
                (Some(v), Some(f)) => cell(v, f, field.data_type())
                    .ok_or_else(|| format!("field {}: not a {}", f.name(), field.data_type())),
                _ => Ok(Cell::Null),
            })
            .collect::<std::result::Result<Vec<Cell<'_>>, String>>()?;
        for (builder, cell) in builders.iter_mut().zip(cells) {
            builder.append(cell);
        }
        Ok(())
    }
}

/// One field's value, converted for its column.
enum Cell<'a> {
    Null,
    Str(std::borrow::Cow<'a, str>),
    Int(i64),
    F64(f64),
    F32(f32),
    Bool(bool),
    Bytes(&'a [u8]),
}

/// A column being built.
enum Builder {
    Utf8(StringBuilder),
    Utf8View(StringViewBuilder),
    Int64(Int64Builder),
    Int32(Int32Builder),
    Date32(Date32Builder),
    /// Timestamps in the column's unit, typed at the end.
    Timestamp(Int64Builder),
    Float64(Float64Builder),
    Float32(Float32Builder),
    Boolean(BooleanBuilder),
    Binary(BinaryBuilder),
}

impl Builder {
    fn new(data_type: &DataType, capacity: usize) -> Result<Self> {
        Ok(match data_type {
            DataType::Utf8 => Builder::Utf8(StringBuilder::with_capacity(capacity, capacity * 16)),
            DataType::Utf8View => Builder::Utf8View(StringViewBuilder::with_capacity(capacity)),
            DataType::Int64 => Builder::Int64(Int64Builder::with_capacity(capacity)),
            DataType::Int32 => Builder::Int32(Int32Builder::with_capacity(capacity)),
            DataType::Date32 => Builder::Date32(Date32Builder::with_capacity(capacity)),
            DataType::Timestamp(..) => Builder::Timestamp(Int64Builder::with_capacity(capacity)),
            DataType::Float64 => Builder::Float64(Float64Builder::with_capacity(capacity)),
            DataType::Float32 => Builder::Float32(Float32Builder::with_capacity(capacity)),
            DataType::Boolean => Builder::Boolean(BooleanBuilder::with_capacity(capacity)),
            DataType::Binary => Builder::Binary(BinaryBuilder::with_capacity(capacity, 0)),
            other => {
                return Err(Error::schema(
                    "(protobuf)",
                    format!("columns of type {other} are not read from Protobuf"),
                ));
            }
        })
    }

    /// Appends a cell; [`cell`] made it for this column's type, so only a null can differ.
    fn append(&mut self, cell: Cell<'_>) {
        match (self, cell) {
            (Builder::Utf8(b), Cell::Str(s)) => b.append_value(s),
            (Builder::Utf8View(b), Cell::Str(s)) => b.append_value(s),
            (Builder::Int64(b) | Builder::Timestamp(b), Cell::Int(n)) => b.append_value(n),
            (Builder::Int32(b), Cell::Int(n)) => b.append_value(n as i32),
            (Builder::Date32(b), Cell::Int(n)) => b.append_value(n as i32),
            (Builder::Float64(b), Cell::F64(x)) => b.append_value(x),
            (Builder::Float32(b), Cell::F32(x)) => b.append_value(x),
            (Builder::Boolean(b), Cell::Bool(x)) => b.append_value(x),
            (Builder::Binary(b), Cell::Bytes(x)) => b.append_value(x),
            (Builder::Utf8(b), _) => b.append_null(),
            (Builder::Utf8View(b), _) => b.append_null(),
            (Builder::Int64(b) | Builder::Timestamp(b), _) => b.append_null(),
            (Builder::Int32(b), _) => b.append_null(),
            (Builder::Date32(b), _) => b.append_null(),
            (Builder::Float64(b), _) => b.append_null(),
            (Builder::Float32(b), _) => b.append_null(),
            (Builder::Boolean(b), _) => b.append_null(),
            (Builder::Binary(b), _) => b.append_null(),
        }
    }

    fn finish(self, data_type: &DataType) -> Result<ArrayRef> {
        Ok(match self {
            Builder::Utf8(mut b) => Arc::new(b.finish()),
            Builder::Utf8View(mut b) => Arc::new(b.finish()),
            Builder::Int64(mut b) => Arc::new(b.finish()),
            Builder::Int32(mut b) => Arc::new(b.finish()),
            Builder::Date32(mut b) => Arc::new(b.finish()),
            // The values are in the column's unit: the cast only types them.
            Builder::Timestamp(mut b) => cast(&b.finish(), data_type)?,
            Builder::Float64(mut b) => Arc::new(b.finish()),
            Builder::Float32(mut b) => Arc::new(b.finish()),
            Builder::Boolean(mut b) => Arc::new(b.finish()),
            Builder::Binary(mut b) => Arc::new(b.finish()),
        })
    }
}

/// The message bytes of a record: after the Confluent header and message indexes, if any.
fn unframe(value: &[u8]) -> std::result::Result<&[u8], String> {
    match value.first() {
        None => Err("empty record: no Protobuf message".into()),
        Some(0) => {
            let mut rest = value.get(5..).ok_or_else(|| {
                format!(
                    "truncated Confluent header: {} bytes, where it has 5 (magic byte 0, \
                     4-byte schema id) and the message indexes before the message",
                    value.len()
                )
            })?;
            // The message indexes: a count, then that many indexes (zig-zag varints); a count
            // of 0 stands for the first message.
            let bad = || "bad message indexes after the Confluent header".to_string();
            let count = prost::encoding::decode_varint(&mut rest).map_err(|_| bad())?;
            let count = (count >> 1) as i64 ^ -((count & 1) as i64);
            if !(0..=100).contains(&count) {
                return Err(bad());
            }
            for _ in 0..count {
                prost::encoding::decode_varint(&mut rest).map_err(|_| bad())?;
            }
            Ok(rest)
        }
        Some(_) => Ok(value),
    }
}

/// Checks that rows of `schema` can be written as `message`: every column is a field of a
/// kind its values fit (times as integers of epoch milliseconds, as the sink writes them).
pub fn check_writable(message: &MessageDescriptor, schema: &Schema) -> Result<()> {
    for column in schema.fields() {
        let Some(field) = message.get_field_by_name(column.name()) else {
            return Err(Error::schema(
                message.full_name(),
                format!(
                    "no field {} to write the column of that name into",
                    column.name()
                ),
            ));
        };
        let fits = match column.data_type() {
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
                matches!(field.kind(), Kind::String | Kind::Enum(_))
            }
            DataType::Int8 | DataType::Int16 | DataType::Int32 => matches!(
                field.kind(),
                Kind::Int32
                    | Kind::Sint32
                    | Kind::Sfixed32
                    | Kind::Int64
                    | Kind::Sint64
                    | Kind::Sfixed64
            ),
            DataType::Int64 | DataType::Timestamp(..) => {
                matches!(field.kind(), Kind::Int64 | Kind::Sint64 | Kind::Sfixed64)
            }
            DataType::Float32 | DataType::Float64 => matches!(field.kind(), Kind::Double),
            DataType::Boolean => matches!(field.kind(), Kind::Bool),
            _ => false,
        };
        if !fits || field.is_list() || field.is_map() {
            return Err(Error::schema(
                message.full_name(),
                format!(
                    "field {} ({:?}) cannot hold column {} ({})",
                    field.name(),
                    field.kind(),
                    column.name(),
                    column.data_type()
                ),
            ));
        }
    }
    Ok(())
}

/// Whether a field of `kind` is read as `to`.
fn readable_as(kind: &Kind, to: &DataType) -> bool {
    use DataType::*;
    match kind {
        Kind::Double => matches!(to, Float64),
        Kind::Float => matches!(to, Float32 | Float64),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => {
            matches!(to, Int32 | Int64 | Float64 | Date32 | Timestamp(..))
        }
        Kind::Uint32 | Kind::Fixed32 => matches!(to, Int64 | Float64),
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => {
            matches!(to, Int64 | Float64 | Timestamp(..))
        }
        Kind::Uint64 | Kind::Fixed64 => matches!(to, Int64 | Float64),
        Kind::Bool => matches!(to, Boolean),
        Kind::String | Kind::Enum(_) => matches!(to, Utf8 | Utf8View),
        Kind::Bytes => matches!(to, Binary),
        Kind::Message(m) => {
            m.full_name() == "google.protobuf.Timestamp" && matches!(to, Timestamp(..))
        }
    }
}

/// A field's value as a cell of a column of type `to`; `None` if it does not fit (a 64-bit
/// unsigned value beyond `i64`, a time out of range).
fn cell<'a>(value: &'a Value, field: &FieldDescriptor, to: &DataType) -> Option<Cell<'a>> {
    let int = |v: &Value| -> Option<i64> {
        match v {
            Value::I32(n) => Some(i64::from(*n)),
            Value::I64(n) => Some(*n),
            Value::U32(n) => Some(i64::from(*n)),
            Value::U64(n) => i64::try_from(*n).ok(),
            _ => None,
        }
    };
    Some(match to {
        DataType::Utf8 | DataType::Utf8View => Cell::Str(match value {
            Value::String(s) => std::borrow::Cow::Borrowed(s.as_str()),
            Value::EnumNumber(n) => match field.kind().as_enum().and_then(|e| e.get_value(*n)) {
                Some(v) => std::borrow::Cow::Owned(v.name().to_string()),
                None => std::borrow::Cow::Owned(n.to_string()),
            },
            _ => return None,
        }),
        DataType::Float64 => Cell::F64(match value {
            Value::F64(x) => *x,
            Value::F32(x) => f64::from(*x),
            other => int(other)? as f64,
        }),
        DataType::Float32 => Cell::F32(match value {
            Value::F32(x) => *x,
            _ => return None,
        }),
        DataType::Int64 => Cell::Int(int(value)?),
        DataType::Int32 | DataType::Date32 => {
            Cell::Int(i64::from(i32::try_from(int(value)?).ok()?))
        }
        DataType::Boolean => Cell::Bool(value.as_bool()?),
        DataType::Binary => Cell::Bytes(value.as_bytes()?.as_ref()),
        DataType::Timestamp(wire_unit, _) => Cell::Int(match value {
            Value::Message(m) => {
                // google.protobuf.Timestamp: seconds and nanos, in the wire unit.
                let seconds = m.get_field_by_name("seconds").and_then(|v| v.as_i64())?;
                let nanos = i64::from(m.get_field_by_name("nanos").and_then(|v| v.as_i32())?);
                // Out of range (a hostile or corrupt value) is no cell, not an overflow.
                let (scale, per) = match wire_unit {
                    TimeUnit::Second => (1, 1_000_000_000),
                    TimeUnit::Millisecond => (1_000, 1_000_000),
                    TimeUnit::Microsecond => (1_000_000, 1_000),
                    TimeUnit::Nanosecond => (1_000_000_000, 1),
                };
                seconds.checked_mul(scale)?.checked_add(nanos / per)?
            }
            // An integer is in the stream's event-time unit, which is the wire unit.
            other => int(other)?,
        }),
        _ => return None,
    })
}

/// Writes JSON objects as Protobuf messages (plain, or Confluent-framed with a schema id),
/// for producers (`urbanstream replay --format protobuf`) and tests.
#[derive(Debug, Clone)]
pub struct ProtobufEncoder {
    message: MessageDescriptor,
    /// The Confluent header and message indexes (`[0]`: the first message), if framed.
    header: Option<Vec<u8>>,
}

impl ProtobufEncoder {
    /// An encoder of `message`; with `schema_id`, in the Confluent wire format.
    pub fn new(message: MessageDescriptor, schema_id: Option<u32>) -> Self {
        let header = schema_id.map(|id| {
            let mut h = vec![0];
            h.extend_from_slice(&id.to_be_bytes());
            h.push(0);
            h
        });
        Self { message, header }
    }

    /// One JSON object (as the JSON topics carry it) as one message: fields by name, numbers
    /// into the field's type, absent and null fields left unset.
    pub fn encode_json(&self, json: &[u8]) -> Result<Vec<u8>> {
        let bad = |m: String| Error::schema(self.message.full_name(), m);
        let object: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(json).map_err(|e| bad(format!("not a JSON object: {e}")))?;
        let mut message = DynamicMessage::new(self.message.clone());
        for (name, mut value) in object {
            if value.is_null() {
                continue;
            }
            let field = self
                .message
                .get_field_by_name(&name)
                .ok_or_else(|| bad(format!("no field {name}")))?;
            let scalar = match field.kind() {
                Kind::String => Some(super::Scalar::Text),
                Kind::Int32
                | Kind::Sint32
                | Kind::Sfixed32
                | Kind::Int64
                | Kind::Sint64
                | Kind::Sfixed64
                | Kind::Uint32
                | Kind::Fixed32
                | Kind::Uint64
                | Kind::Fixed64 => Some(super::Scalar::Whole),
                Kind::Double | Kind::Float => Some(super::Scalar::Real),
                Kind::Bool => Some(super::Scalar::Boolean),
                _ => None,
            };
            if let Some(scalar) = scalar
                && !field.is_list()
            {
                super::written_as(scalar, &mut value);
            }
            let v = match (field.kind(), &value) {
                (Kind::String, serde_json::Value::String(s)) => Value::String(s.clone()),
                (Kind::Enum(e), serde_json::Value::String(s)) => Value::EnumNumber(
                    e.get_value_by_name(s)
                        .ok_or_else(|| bad(format!("field {name}: no enum value {s}")))?
                        .number(),
                ),
                (Kind::Double, v) => Value::F64(v.as_f64().ok_or_else(|| bad(name.clone()))?),
                (Kind::Float, v) => Value::F32(v.as_f64().ok_or_else(|| bad(name.clone()))? as f32),
                (Kind::Int32 | Kind::Sint32 | Kind::Sfixed32, v) => Value::I32(
                    v.as_i64()
                        .and_then(|n| i32::try_from(n).ok())
                        .ok_or_else(|| bad(name.clone()))?,
                ),
                (Kind::Int64 | Kind::Sint64 | Kind::Sfixed64, v) => {
                    Value::I64(v.as_i64().ok_or_else(|| bad(name.clone()))?)
                }
                (Kind::Uint32 | Kind::Fixed32, v) => Value::U32(
                    v.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| bad(name.clone()))?,
                ),
                (Kind::Uint64 | Kind::Fixed64, v) => {
                    Value::U64(v.as_u64().ok_or_else(|| bad(name.clone()))?)
                }
                (Kind::Bool, serde_json::Value::Bool(b)) => Value::Bool(*b),
                (kind, v) => return Err(bad(format!("field {name}: {v} is not a {kind:?}"))),
            };
            message.set_field(&field, v);
        }
        let mut out = self.header.clone().unwrap_or_default();
        message.encode(&mut out).map_err(|e| bad(e.to_string()))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;
    use crate::decode::{Codecs, JsonDecoder, TopicDecoder};
    use crate::schema::{SchemaRegistry, TopicSchema};
    use crate::topics::Format;

    const GOOD: &[u8] = br#"{"camera_id":"cam-0001","segment_id":"kim_ma_w","event_time":1767222000000,"kind":"collision","vehicle_class":"motorbike","speed_kmh":31.5,"lane":1,"direction":"inbound","confidence":0.93,"severity":3}"#;
    const GOOD2: &[u8] = br#"{"camera_id":"cam-0002","segment_id":"kim_ma_w","event_time":1767222001000,"vehicle_class":"car","speed_kmh":0,"lane":2,"confidence":0.9}"#;

    fn camera() -> Arc<TopicSchema> {
        SchemaRegistry::embedded()
            .expect("schemas")
            .get("camera_event")
            .expect("camera")
    }

    fn raw(values: &[Vec<u8>]) -> RawBatch {
        let mut b = RawBatch::new("cam");
        for (i, v) in values.iter().enumerate() {
            b.push(0, i as i64, Some(b"seg"), Some(v));
        }
        b
    }

    fn decoder(schema: Arc<TopicSchema>, message: &str, codecs: &Codecs) -> TopicDecoder {
        TopicDecoder::new(
            Format::Protobuf,
            schema,
            Some(("event_time", TimeUnit::Millisecond)),
            codecs,
            Some(message),
        )
        .expect("decoder")
    }

    fn encoder(framed: Option<u32>) -> ProtobufEncoder {
        let d = Descriptors::embedded().expect("descriptors");
        ProtobufEncoder::new(
            d.message("urbanstream.city.CameraEvent").expect("msg"),
            framed,
        )
    }

    #[test]
    fn city_messages_decode_to_what_the_same_json_decodes_to() {
        let plain = encoder(None);
        let framed = encoder(Some(12));
        let values = vec![
            plain.encode_json(GOOD).expect("encode"),
            framed.encode_json(GOOD2).expect("encode"),
        ];
        assert_eq!(&values[1][..6], &[0, 0, 0, 0, 12, 0]);
        let d = decoder(camera(), "urbanstream.city.CameraEvent", &Codecs::default())
            .decode(&raw(&values))
            .expect("decode");
        assert!(d.rejects.is_empty(), "{:?}", d.rejects);
        let json: Vec<Vec<u8>> = vec![GOOD.to_vec(), GOOD2.to_vec()];
        let expected = JsonDecoder::new(camera())
            .with_event_time("event_time", TimeUnit::Millisecond)
            .decode(&raw(&json))
            .expect("json");
        // GOOD2's lane 0 is set (an optional field), its absent kind gets the default.
        assert_eq!(d.batch, expected.batch);
    }

    /// Values written as another kind than their fields' (a CSV replayed) encode as the
    /// values they write, as in Avro; one that is none of its field's kind is refused.
    #[test]
    fn values_written_as_another_kind_encode_as_their_fields_kind() {
        const WRITTEN: &[u8] = br#"{"camera_id":1,"segment_id":"kim_ma_w","event_time":1767222000000,"kind":"collision","vehicle_class":"motorbike","speed_kmh":" 31.5 ","lane":"1","direction":"inbound","confidence":"0.93","severity":" 3"}"#;
        const DIGITS: &[u8] = br#"{"camera_id":"1","segment_id":"kim_ma_w","event_time":1767222000000,"kind":"collision","vehicle_class":"motorbike","speed_kmh":31.5,"lane":1,"direction":"inbound","confidence":0.93,"severity":3}"#;
        let plain = encoder(None);
        let values = vec![plain.encode_json(WRITTEN).expect("encode")];
        let d = decoder(camera(), "urbanstream.city.CameraEvent", &Codecs::default())
            .decode(&raw(&values))
            .expect("decode");
        assert!(d.rejects.is_empty(), "{:?}", d.rejects);
        let json: Vec<Vec<u8>> = vec![DIGITS.to_vec()];
        let expected = JsonDecoder::new(camera())
            .with_event_time("event_time", TimeUnit::Millisecond)
            .decode(&raw(&json))
            .expect("json");
        assert_eq!(d.batch, expected.batch);
        let bad = br#"{"camera_id":"c","segment_id":"s","event_time":1767222000000,"lane":"x"}"#;
        assert!(plain.encode_json(bad).is_err());
    }

    #[test]
    fn every_declared_input_has_a_message_that_decodes_as_its_json_does() {
        use crate::reference::ReferenceData;
        use crate::simulate::{CitySimulator, SimConfig, SimTopic};
        let start = SimConfig::default().start_ms;
        let mut sim = CitySimulator::new(
            SimConfig {
                all_feeds: true,
                storm_at_ms: Some(start),
                malformed_share: 0.0,
                detections_per_sim_second: 2.0,
                ..SimConfig::default()
            },
            Arc::new(ReferenceData::embedded().expect("reference")),
        );
        let records: Vec<_> = (0..3_600).flat_map(|_| sim.next_tick()).collect();
        let registry = SchemaRegistry::embedded().expect("schemas");
        let descriptors = Descriptors::embedded().expect("descriptors");
        let inputs: Vec<_> = registry
            .streams()
            .expect("streams")
            .into_iter()
            .filter(|(_, d)| d.role == crate::schema::StreamRole::Input)
            .collect();
        assert_eq!(inputs.len(), SimTopic::ALL.len());
        for (schema, declared) in inputs {
            let message = city_message(&schema.name).expect("a declared message");
            assert_eq!(Some(&message), declared.protobuf_message.as_ref());
            let encoder =
                ProtobufEncoder::new(descriptors.message(&message).expect("in city.proto"), None);
            let feed = SimTopic::ALL
                .into_iter()
                .find(|f| f.table() == declared.table)
                .expect("simulated");
            let json: Vec<Vec<u8>> = records
                .iter()
                .filter(|r| r.topic == feed)
                .map(|r| r.payload.clone())
                .collect();
            assert!(!json.is_empty(), "{}", declared.table);
            let encoded: Vec<Vec<u8>> = json
                .iter()
                .map(|j| encoder.encode_json(j).expect("encode"))
                .collect();
            let d = decoder(schema.clone(), &message, &Codecs::default())
                .decode(&raw(&encoded))
                .expect("decode");
            assert!(
                d.rejects.is_empty(),
                "{}: {:?}",
                declared.table,
                &d.rejects[..1]
            );
            let expected = JsonDecoder::new(schema.clone())
                .with_event_time("event_time", TimeUnit::Millisecond)
                .decode(&raw(&json))
                .expect("json");
            assert_eq!(d.batch, expected.batch, "{}", declared.table);
        }
    }

    #[test]
    fn bad_records_go_with_their_reason_and_spoil_nothing() {
        let plain = encoder(None);
        let good = plain.encode_json(GOOD).expect("encode");
        let unknown_symbol = plain
            .encode_json(
                &String::from_utf8_lossy(GOOD)
                    .replace("motorbike", "hovercraft")
                    .into_bytes(),
            )
            .expect("encode");
        // No camera id: absent, as in JSON, since the city's fields have presence.
        let missing = plain
            .encode_json(
                br#"{"segment_id":"kim_ma_w","event_time":1767222000000,"confidence":0.0}"#,
            )
            .expect("encode");
        let values = vec![
            good.clone(),
            vec![],
            good[..good.len() - 4].to_vec(),
            vec![0, 0, 1],
            vec![
                0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ],
            unknown_symbol,
            missing,
            good.clone(),
        ];
        let d = decoder(camera(), "urbanstream.city.CameraEvent", &Codecs::default())
            .decode(&raw(&values))
            .expect("decode");
        assert_eq!(d.rows, vec![0, 7]);
        let reasons: Vec<(u32, RejectStage, &str)> = d
            .rejects
            .iter()
            .map(|r| (r.index, r.stage, r.error.as_str()))
            .collect();
        let expect = [
            (1, RejectStage::Decode, "empty record"),
            (2, RejectStage::Decode, "bad Protobuf record"),
            (3, RejectStage::Decode, "truncated Confluent header"),
            (4, RejectStage::Decode, "bad Protobuf record"),
            (5, RejectStage::Validate, "unknown symbol \"hovercraft\""),
            (6, RejectStage::Validate, "missing required field camera_id"),
        ];
        assert_eq!(reasons.len(), expect.len(), "{reasons:?}");
        for ((i, stage, why), (j, s, part)) in reasons.iter().zip(expect) {
            assert_eq!((*i, *stage), (j, s));
            assert!(why.contains(part), "{i}: {why}");
        }
    }

    #[test]
    fn numbers_outside_the_schemas_ranges_are_rejected_as_in_json() {
        use crate::decode::tests::{OUT_OF_RANGE, assert_out_of_range_rejected};
        let plain = encoder(None);
        let values: Vec<Vec<u8>> = OUT_OF_RANGE
            .iter()
            .map(|j| plain.encode_json(j).expect("encode"))
            .collect();
        let d = decoder(camera(), "urbanstream.city.CameraEvent", &Codecs::default())
            .decode(&raw(&values))
            .expect("decode");
        assert_out_of_range_rejected(&d);
    }

    #[test]
    fn an_operators_proto_with_enums_and_timestamps_is_read_by_field_name() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("parking.proto");
        std::fs::write(
            &file,
            r#"syntax = "proto3";
            package city.parking;
            import "google/protobuf/timestamp.proto";
            enum Source { SOURCE_UNSPECIFIED = 0; BARRIER = 1; BAY_SENSOR = 2; }
            message Occupancy {
              string lot_id = 1;
              google.protobuf.Timestamp at = 2;
              uint32 occupied = 3;
              Source source = 4;
              optional float fill = 5;
              string firmware = 6;
            }"#,
        )
        .expect("write");
        let descriptors = Arc::new(Descriptors::load(&[file]).expect("compiled"));
        let message = descriptors
            .message("city.parking.Occupancy")
            .expect("message");
        let arrow = Arc::new(datafusion::arrow::datatypes::Schema::new(vec![
            // VARCHAR in SQL.
            datafusion::arrow::datatypes::Field::new("lot_id", DataType::Utf8View, false),
            datafusion::arrow::datatypes::Field::new(
                "at",
                DataType::Timestamp(TimeUnit::Millisecond, None),
                false,
            ),
            datafusion::arrow::datatypes::Field::new("occupied", DataType::Int64, false),
            datafusion::arrow::datatypes::Field::new("source", DataType::Utf8, true),
            datafusion::arrow::datatypes::Field::new("fill", DataType::Float64, true),
        ]));
        let schema = Arc::new(TopicSchema::from_arrow("occupancy", arrow));
        let mut m = DynamicMessage::new(message.clone());
        m.set_field_by_name("lot_id", Value::String("hk-07".into()));
        let mut at = DynamicMessage::new(
            descriptors
                .message("google.protobuf.Timestamp")
                .expect("timestamp"),
        );
        at.set_field_by_name("seconds", Value::I64(1_767_222_000));
        at.set_field_by_name("nanos", Value::I32(250_000_000));
        m.set_field_by_name("at", Value::Message(at));
        m.set_field_by_name("occupied", Value::U32(41));
        m.set_field_by_name("source", Value::EnumNumber(2));
        let codecs = Codecs {
            registry: None,
            descriptors: Some(descriptors.clone()),
        };
        let d = TopicDecoder::new(
            Format::Protobuf,
            schema.clone(),
            Some(("at", TimeUnit::Millisecond)),
            &codecs,
            Some("city.parking.Occupancy"),
        )
        .expect("decoder")
        .decode(&raw(&[m.encode_to_vec()]))
        .expect("decode");
        assert!(d.rejects.is_empty(), "{:?}", d.rejects);
        let row = crate::sink::encode_json_rows(&d.batch).expect("json");
        assert_eq!(
            String::from_utf8_lossy(&row.0).trim(),
            r#"{"lot_id":"hk-07","at":1767222000250,"occupied":41,"source":"BAY_SENSOR","fill":null}"#
        );

        // A field that cannot be read as the column's type is refused at once, named.
        let strings = Arc::new(TopicSchema::from_arrow(
            "o",
            Arc::new(datafusion::arrow::datatypes::Schema::new(vec![
                datafusion::arrow::datatypes::Field::new("firmware", DataType::Float64, true),
            ])),
        ));
        let e = TopicDecoder::new(
            Format::Protobuf,
            strings,
            None,
            &codecs,
            Some("city.parking.Occupancy"),
        )
        .expect_err("type");
        assert!(
            e.to_string().contains("city.parking.Occupancy.firmware"),
            "{e}"
        );
        let e = descriptors
            .message("city.parking.Nope")
            .expect_err("unknown");
        assert!(
            e.to_string().contains("known: city.parking.Occupancy"),
            "{e}"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        /// Arbitrary bytes, framed or not, never panic the decoder nor cost a good record.
        #[test]
        fn garbage_never_costs_a_good_record(
            garbage in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..48), 1..8),
        ) {
            let good = encoder(None).encode_json(GOOD).expect("encode");
            let mut values = Vec::new();
            for g in &garbage {
                values.push(good.clone());
                values.push(g.clone());
            }
            let d = decoder(camera(), "urbanstream.city.CameraEvent", &Codecs::default())
                .decode(&raw(&values))
                .expect("decode");
            for i in (0..values.len()).step_by(2) {
                prop_assert!(d.rows.contains(&(i as u32)), "good record {} lost", i);
            }
            prop_assert_eq!(d.rows.len() + d.rejects.len(), values.len());
        }
    }
}
