//! Avro records in the Confluent wire format, decoded straight into Arrow with `arrow-avro`.
//!
//! Each record is the magic byte `0`, the writer schema's id (4 bytes, big-endian) and the
//! Avro binary body. The writer schema comes from the [`Registry`] by id; records are decoded
//! with it, and its fields are matched to the topic schema's by name: a field the topic
//! schema lacks is dropped, one the writer lacks is null (then the topic schema's default, or
//! a validation reject if it is required), and a type is read as the topic schema's type
//! where Avro's promotions allow it (int to long, float or double; long to float or double;
//! float to double; enum to string). A writer schema that cannot be read that way is refused
//! once, with the reason, and its records go to the DLQ with it.
//!
//! A bad record never spoils its batch, as with JSON: every record must add exactly one row
//! to the decoder and consume all of its bytes; otherwise it is rejected (bad magic byte,
//! unknown schema id, truncated body, bytes left over) and the decoder is rebuilt from the
//! good records since the last flush.
//!
//! [`AvroEncoder`] writes records the same way, for producers (`urbanstream replay --format
//! avro`, the demo) and tests.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use arrow_avro::reader::{Decoder as AvroBodyDecoder, ReaderBuilder};
use arrow_avro::schema::{AvroSchema, Fingerprint, FingerprintAlgorithm, SchemaStore};
use datafusion::arrow::array::{RecordBatch, new_null_array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;

use super::registry::Registry;
use super::{Decoded, Reject, RejectStage, Shape};
use crate::error::{Error, Result};
use crate::source::RawBatch;

/// The Confluent wire format's magic byte.
pub const MAGIC: u8 = 0;
/// Magic byte and schema id.
const HEADER: usize = 5;
/// Records flushed together.
const CHUNK: usize = 1024;
/// Schema ids looked up for one batch at most.
const MAX_LOOKUPS: usize = 16;

/// How records of one writer schema are read into the topic schema.
#[derive(Debug)]
struct Writer {
    /// The writer schema, as the registry gave it.
    avro: AvroSchema,
    /// For each field of the topic schema, the column of the decoded batch that holds it.
    columns: Vec<Option<usize>>,
}

/// Decodes Confluent-framed Avro records of one topic schema into Arrow.
#[derive(Debug)]
pub struct AvroDecoder {
    shape: Shape,
    registry: Arc<Registry>,
    /// Per writer schema id seen: how its records are read, or why they cannot be.
    writers: Mutex<HashMap<u32, Arc<std::result::Result<Writer, String>>>>,
}

impl AvroDecoder {
    pub(crate) fn new(shape: Shape, registry: Arc<Registry>) -> Self {
        Self {
            shape,
            registry,
            writers: Mutex::new(HashMap::new()),
        }
    }

    /// Looks up the writer schemas of `raw`'s records that have not been seen yet (in the
    /// registry, which caches them). Ids the registry does not have are left for
    /// [`AvroDecoder::decode`] to reject; a registry that cannot be reached is an error.
    pub async fn prepare(&self, raw: &RawBatch) -> Result<()> {
        let mut wanted = HashSet::new();
        {
            let writers = self.writers.lock().unwrap_or_else(|e| e.into_inner());
            for i in 0..raw.len() {
                if let Some(id) = schema_id(raw.value(i))
                    && !writers.contains_key(&id)
                {
                    wanted.insert(id);
                }
            }
        }
        // A batch of records with made-up ids costs a bounded number of lookups.
        let mut wanted: Vec<u32> = wanted.into_iter().collect();
        wanted.sort_unstable();
        wanted.truncate(MAX_LOOKUPS);
        for id in wanted {
            if let Some(text) = self.registry.schema(id).await? {
                let writer = self.writer(id, &text);
                if let Err(why) = &writer {
                    tracing::warn!(id, error = %why, "writer schema refused");
                }
                self.writers
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id, Arc::new(writer));
            }
        }
        Ok(())
    }

    /// How records written with schema `id` (`text`) are read, or why they cannot be.
    fn writer(&self, id: u32, text: &str) -> std::result::Result<Writer, String> {
        let topic = self.shape.topic_schema();
        let avro = AvroSchema::new(text.to_string());
        let decoder = body_decoder(id, &avro, 1)
            .map_err(|e| format!("writer schema {id} cannot be decoded: {e}"))?;
        let decoded = decoder.schema();
        let mut columns = Vec::with_capacity(self.shape.wire_schema.fields().len());
        for (k, field) in self.shape.wire_schema.fields().iter().enumerate() {
            match decoded.index_of(field.name()) {
                Ok(c) => {
                    let from = decoded.field(c).data_type();
                    if !readable_as(from, field.data_type()) {
                        return Err(format!(
                            "writer schema {id}: field {} is {from} there but {} in {}; Avro \
                             cannot promote one to the other",
                            field.name(),
                            field.data_type(),
                            topic.name
                        ));
                    }
                    columns.push(Some(c));
                }
                Err(_) if topic.required[k] => {
                    return Err(format!(
                        "writer schema {id} has no field {}, which {} requires",
                        field.name(),
                        topic.name
                    ));
                }
                Err(_) => columns.push(None),
            }
        }
        Ok(Writer { avro, columns })
    }

    /// Decodes every record of `raw` (after [`AvroDecoder::prepare`]); bad records are
    /// rejected one by one.
    pub fn decode(&self, raw: &RawBatch) -> Result<Decoded> {
        let writers = self
            .writers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut out = Out {
            shape: &self.shape,
            parts: Vec::new(),
            rows: Vec::with_capacity(raw.len()),
            rejects: Vec::new(),
        };
        let mut start = 0;
        while start < raw.len() {
            let end = (start + CHUNK).min(raw.len());
            let mut run: Option<Run> = None;
            for i in start..end {
                let reject = |error: String| Reject {
                    index: i as u32,
                    stage: RejectStage::Decode,
                    error,
                };
                if let Some(error) = self.shape.oversize(raw, i) {
                    out.rejects.push(reject(error));
                    continue;
                }
                let value = raw.value(i);
                let id = match frame(value) {
                    Ok(id) => id,
                    Err(error) => {
                        out.rejects.push(reject(error));
                        continue;
                    }
                };
                let writer = match writers.get(&id).map(|w| w.as_ref()) {
                    Some(Ok(_)) => writers[&id].clone(),
                    Some(Err(why)) => {
                        out.rejects.push(reject(why.clone()));
                        continue;
                    }
                    None => {
                        out.rejects
                            .push(reject(self.registry.why_unknown(id).unwrap_or_else(|| {
                                format!(
                                    "unknown schema id {id}: not looked up (more than \
                                     {MAX_LOOKUPS} new schema ids in one batch)"
                                )
                            })));
                        continue;
                    }
                };
                if run.as_ref().is_none_or(|r| r.id != id) {
                    if let Some(mut done) = run.take() {
                        done.flush(raw, &mut out)?;
                    }
                    run = Some(Run::new(id, writer, end - i)?);
                }
                if let Some(r) = run.as_mut() {
                    r.feed(raw, i, &mut out)?;
                }
            }
            if let Some(mut done) = run.take() {
                done.flush(raw, &mut out)?;
            }
            start = end;
        }
        self.shape.finish(out.parts, out.rows, out.rejects)
    }
}

/// Consecutive records of one writer schema, fed to one decoder.
struct Run {
    id: u32,
    writer: Arc<std::result::Result<Writer, String>>,
    decoder: AvroBodyDecoder,
    capacity: usize,
    /// The records fed, by index in the raw batch.
    good: Vec<u32>,
}

impl Run {
    fn new(
        id: u32,
        writer: Arc<std::result::Result<Writer, String>>,
        capacity: usize,
    ) -> Result<Self> {
        // One row more than records left, so that a record holding two is seen as such
        // instead of stopping the decoder.
        let capacity = capacity + 1;
        let decoder = body_decoder(id, &Self::schema(&writer)?.avro, capacity)?;
        Ok(Self {
            id,
            writer,
            decoder,
            capacity,
            good: Vec::new(),
        })
    }

    fn schema(writer: &std::result::Result<Writer, String>) -> Result<&Writer> {
        writer
            .as_ref()
            .map_err(|why| Error::schema("(writer)", why.clone()))
    }

    /// Feeds record `i`. A bad one is rejected; the decoder, which may hold part of it, is
    /// rebuilt from the good records since the last flush, and those are flushed, so that
    /// each good record is fed again at most once whatever the number of bad ones.
    fn feed(&mut self, raw: &RawBatch, i: usize, out: &mut Out<'_>) -> Result<()> {
        let value = raw.value(i);
        let outcome = feed_one(&mut self.decoder, value, self.good.len()).and_then(|()| {
            // A record ending in a copy of its own header: the decoder has taken that copy
            // for the next record's prefix (and would read the next record as its body)
            // unless the body really runs to the end. Decoded alone, with room for one row
            // only, the record shows which.
            let n = value.len();
            if n >= 2 * HEADER && value[n - HEADER..] == value[..HEADER] {
                let writer = Self::schema(&self.writer).map_err(|e| e.to_string())?;
                let mut alone =
                    body_decoder(self.id, &writer.avro, 1).map_err(|e| e.to_string())?;
                let consumed = alone.decode(value).map_err(|e| e.to_string())?;
                if consumed < n {
                    return Err(format!(
                        "{} bytes after the end of the Avro record: more than one record, or \
                         not written with the schema its id names",
                        n - consumed
                    ));
                }
            }
            Ok(())
        });
        let error = match outcome {
            Ok(()) => {
                self.good.push(i as u32);
                return Ok(());
            }
            Err(error) => error,
        };
        out.rejects.push(Reject {
            index: i as u32,
            stage: RejectStage::Decode,
            error,
        });
        self.rebuild(raw, out)
    }

    /// A fresh decoder fed the good records since the last flush, which are flushed. A record
    /// that does not decode again (which a record that decoded once cannot do) is rejected
    /// rather than failing the batch.
    fn rebuild(&mut self, raw: &RawBatch, out: &mut Out<'_>) -> Result<()> {
        let avro = Self::schema(&self.writer)?.avro.clone();
        loop {
            self.decoder = body_decoder(self.id, &avro, self.capacity)?;
            let mut failed = None;
            for (k, &g) in self.good.iter().enumerate() {
                if let Err(error) = feed_one(&mut self.decoder, raw.value(g as usize), k) {
                    failed = Some((k, error));
                    break;
                }
            }
            let Some((k, error)) = failed else { break };
            let g = self.good.remove(k);
            out.rejects.push(Reject {
                index: g,
                stage: RejectStage::Decode,
                error: format!("decoded differently when fed again: {error}"),
            });
        }
        self.flush(raw, out)
    }

    /// The rows fed since the last flush, in the topic schema's fields, to `out`; if the
    /// flush fails, record by record.
    fn flush(&mut self, raw: &RawBatch, out: &mut Out<'_>) -> Result<()> {
        let writer = Self::schema(&self.writer)?;
        let good = std::mem::take(&mut self.good);
        match self.decoder.flush() {
            Ok(Some(batch)) if batch.num_rows() == good.len() => {
                out.parts.push(align(out.shape, writer, &batch)?);
                out.rows.extend_from_slice(&good);
            }
            Ok(None) if good.is_empty() => {}
            _ => {
                for g in good {
                    let mut one = body_decoder(self.id, &writer.avro, 2)?;
                    let outcome = feed_one(&mut one, raw.value(g as usize), 0)
                        .and_then(|()| one.flush().map_err(|e| e.to_string()));
                    match outcome {
                        Ok(Some(batch)) if batch.num_rows() == 1 => {
                            out.parts.push(align(out.shape, writer, &batch)?);
                            out.rows.push(g);
                        }
                        Ok(_) => out.rejects.push(Reject {
                            index: g,
                            stage: RejectStage::Decode,
                            error: "expected one Avro record".into(),
                        }),
                        Err(error) => out.rejects.push(Reject {
                            index: g,
                            stage: RejectStage::Decode,
                            error,
                        }),
                    }
                }
                self.decoder = body_decoder(self.id, &writer.avro, self.capacity)?;
            }
        }
        Ok(())
    }
}

/// Where decoded parts go.
struct Out<'a> {
    shape: &'a Shape,
    parts: Vec<RecordBatch>,
    rows: Vec<u32>,
    rejects: Vec<Reject>,
}

/// A decoder of record bodies written with schema `id`.
fn body_decoder(id: u32, avro: &AvroSchema, capacity: usize) -> Result<AvroBodyDecoder> {
    let mut store = SchemaStore::new_with_type(FingerprintAlgorithm::Id);
    store.set(Fingerprint::Id(id), avro.clone())?;
    Ok(ReaderBuilder::new()
        .with_writer_schema_store(store)
        .with_batch_size(capacity)
        .build_decoder()?)
}

/// The schema id of a well-framed record.
fn schema_id(value: &[u8]) -> Option<u32> {
    match value {
        [MAGIC, a, b, c, d, ..] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

/// The schema id, or why the record is not Confluent-framed.
fn frame(value: &[u8]) -> std::result::Result<u32, String> {
    if let Some(id) = schema_id(value) {
        return Ok(id);
    }
    Err(match value.first() {
        None => "empty record: no Avro header".into(),
        Some(&MAGIC) => format!(
            "truncated Avro header: {} bytes, where the Confluent wire format has {HEADER} \
             (magic byte 0, 4-byte schema id) before the body",
            value.len()
        ),
        Some(b'{') => "not Avro: the record starts with '{' (JSON?); declare the stream with \
                       'format' 'json'"
            .into(),
        Some(&b) => format!(
            "not Confluent-framed Avro: the first byte is 0x{b:02x}, not the magic byte 0x00"
        ),
    })
}

/// Feeds one record; it must add exactly one complete row and consume all its bytes.
fn feed_one(
    decoder: &mut AvroBodyDecoder,
    value: &[u8],
    rows_before: usize,
) -> std::result::Result<(), String> {
    let consumed = decoder
        .decode(value)
        .map_err(|e| format!("bad Avro record: {e}"))?;
    let rows = decoder.batch_size() - decoder.capacity();
    let added = rows - rows_before;
    if added == 0 {
        return Err("truncated Avro record: it ends inside a value".into());
    }
    if consumed < value.len() || added > 1 {
        return Err(format!(
            "{} bytes after the end of the Avro record: more than one record, or not written \
             with the schema its id names",
            value.len() - consumed
        ));
    }
    Ok(())
}

/// Whether a column decoded as `from` is read as `to` (Avro's promotions, enums as strings,
/// timestamps in any unit, and whole numbers as an event time in the declared unit).
fn readable_as(from: &DataType, to: &DataType) -> bool {
    use DataType::*;
    let from = match from {
        Dictionary(_, values) => values.as_ref(),
        other => other,
    };
    from == to
        || matches!(
            (from, to),
            (Utf8 | LargeUtf8 | Utf8View, Utf8 | Utf8View)
                | (Int32, Int64 | Float32 | Float64)
                | (Int64, Float32 | Float64)
                | (Float32, Float64)
                | (Timestamp(..), Timestamp(..))
                | (Int32 | Int64, Timestamp(..))
        )
}

/// A decoded batch in the topic schema's wire fields.
fn align(shape: &Shape, writer: &Writer, batch: &RecordBatch) -> Result<RecordBatch> {
    let n = batch.num_rows();
    let columns = shape
        .wire_schema
        .fields()
        .iter()
        .zip(&writer.columns)
        .map(|(field, column)| match column {
            Some(c) => Ok(cast(batch.column(*c), field.data_type())?),
            None => Ok(new_null_array(field.data_type(), n)),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(RecordBatch::try_new(shape.wire_schema.clone(), columns)?)
}

/// Writes records of one Avro schema in the Confluent wire format.
#[derive(Debug, Clone)]
pub struct AvroEncoder {
    schema: apache_avro::Schema,
    header: [u8; HEADER],
    /// Fields of type `double` (true) or `float` (false), not nullable: a JSON null there is
    /// a NaN or an infinity (which JSON cannot carry), written as NaN.
    not_a_number: Vec<(String, bool)>,
    /// The record's fields of a scalar kind (their union's non-null branch for a nullable
    /// one), each read as its kind where a JSON row writes it as another ([`super::written_as`]).
    scalars: Vec<(String, super::Scalar)>,
}

impl AvroEncoder {
    /// An encoder for `schema` (Avro JSON), registered with `id`.
    pub fn new(schema: &str, id: u32) -> Result<Self> {
        let schema = apache_avro::Schema::parse_str(schema)
            .map_err(|e| Error::schema("(encoder)", e.to_string()))?;
        let mut header = [MAGIC; HEADER];
        header[1..].copy_from_slice(&id.to_be_bytes());
        let not_a_number = match &schema {
            apache_avro::Schema::Record(r) => r
                .fields
                .iter()
                .filter_map(|f| match f.schema {
                    apache_avro::Schema::Double => Some((f.name.clone(), true)),
                    apache_avro::Schema::Float => Some((f.name.clone(), false)),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        let scalars = match &schema {
            apache_avro::Schema::Record(r) => r
                .fields
                .iter()
                .filter_map(|f| Some((f.name.clone(), scalar_kind(&f.schema)?)))
                .collect(),
            _ => Vec::new(),
        };
        Ok(Self {
            schema,
            header,
            not_a_number,
            scalars,
        })
    }

    /// An encoder for the topic schema `topic` (from `schemas/topics/`), its schema
    /// registered in `registry` under `subject` (Confluent's `<topic>-value`).
    pub async fn registered(registry: &Registry, subject: &str, avsc: &str) -> Result<Self> {
        let id = registry.register(subject, avsc).await?;
        Self::new(avsc, id)
    }

    /// One JSON object (as the JSON topics carry it: event times in epoch milliseconds,
    /// optional fields left out) as one framed Avro record.
    pub fn encode_json(&self, json: &[u8]) -> Result<Vec<u8>> {
        let mut value: serde_json::Value = serde_json::from_slice(json)
            .map_err(|e| Error::schema("(encoder)", format!("not JSON: {e}")))?;
        if let serde_json::Value::Object(fields) = &mut value {
            for (name, kind) in &self.scalars {
                if let Some(v) = fields.get_mut(name) {
                    super::written_as(*kind, v);
                }
            }
        }
        let mut avro = apache_avro::types::Value::from(value);
        if let apache_avro::types::Value::Map(fields) = &mut avro {
            for (name, double) in &self.not_a_number {
                if let Some(v @ apache_avro::types::Value::Null) = fields.get_mut(name) {
                    *v = if *double {
                        apache_avro::types::Value::Double(f64::NAN)
                    } else {
                        apache_avro::types::Value::Float(f32::NAN)
                    };
                }
            }
        }
        let avro = avro
            .resolve(&self.schema)
            .map_err(|e| Error::schema("(encoder)", e.to_string()))?;
        let body = apache_avro::to_avro_datum(&self.schema, avro)
            .map_err(|e| Error::schema("(encoder)", e.to_string()))?;
        let mut out = Vec::with_capacity(HEADER + body.len());
        out.extend_from_slice(&self.header);
        out.extend_from_slice(&body);
        Ok(out)
    }
}

/// The scalar kind of a field of Avro schema `schema` (of its union's non-null branch), if it
/// is one.
fn scalar_kind(schema: &apache_avro::Schema) -> Option<super::Scalar> {
    use apache_avro::Schema as S;
    let target = match schema {
        S::Union(u) => u.variants().iter().find(|s| !matches!(s, S::Null))?,
        s => s,
    };
    match target {
        S::String | S::Uuid => Some(super::Scalar::Text),
        S::Int | S::Long => Some(super::Scalar::Whole),
        S::Float | S::Double => Some(super::Scalar::Real),
        S::Boolean => Some(super::Scalar::Boolean),
        _ => None,
    }
}

/// One Confluent-framed Avro record as JSON (timestamps as epoch milliseconds, enums as
/// their symbols, unions as their value), its writer schema from `registry`: for people
/// reading Avro topics (`urbanstream tail`) and tests.
pub async fn avro_to_json(registry: &Registry, value: &[u8]) -> Result<serde_json::Value> {
    let id = frame(value).map_err(|e| Error::schema("(record)", e))?;
    let text = registry.schema(id).await?.ok_or_else(|| {
        Error::schema(
            "(record)",
            format!("unknown schema id {id} in {}", registry.location()),
        )
    })?;
    let schema = apache_avro::Schema::parse_str(&text)
        .map_err(|e| Error::schema(format!("schema {id}"), e.to_string()))?;
    let mut body = &value[HEADER..];
    let decoded = apache_avro::from_avro_datum(&schema, &mut body, None)
        .map_err(|e| Error::schema("(record)", e.to_string()))?;
    serde_json::Value::try_from(decoded).map_err(|e| Error::schema("(record)", e.to_string()))
}

/// The Avro schema text of a topic schema compiled into the binary, by name.
pub fn embedded_avsc(name: &str) -> Option<&'static str> {
    crate::schema::EMBEDDED
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, text)| *text)
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::datatypes::TimeUnit;
    use proptest::prelude::*;

    use super::*;
    use crate::decode::{JsonDecoder, TopicDecoder};
    use crate::schema::SchemaRegistry;
    use crate::topics::Format;

    const GOOD: &[u8] = br#"{"camera_id":"cam-0001","segment_id":"kim_ma_w","event_time":1767222000000,"kind":"collision","vehicle_class":"motorbike","speed_kmh":31.5,"lane":1,"direction":"inbound","confidence":0.93,"severity":3}"#;
    const GOOD2: &[u8] = br#"{"camera_id":"cam-0002","segment_id":"kim_ma_w","event_time":1767222001000,"vehicle_class":"car","speed_kmh":40,"confidence":0.9}"#;

    /// A schema a producer evolved: `lane` dropped, a field added, speed as a float.
    const V2: &str = r#"{"type":"record","name":"CameraEvent","namespace":"city.camera","fields":[
        {"name":"camera_id","type":"string"},{"name":"segment_id","type":"string"},
        {"name":"event_time","type":{"type":"long","logicalType":"timestamp-millis"}},
        {"name":"vehicle_class","type":["null","string"],"default":null},
        {"name":"speed_kmh","type":["null","float"],"default":null},
        {"name":"confidence","type":"double"},
        {"name":"firmware","type":"string","default":"1.0"}]}"#;

    struct Fixture {
        _dir: tempfile::TempDir,
        registry: Arc<Registry>,
        decoder: TopicDecoder,
        encoder: AvroEncoder,
    }

    async fn fixture() -> Fixture {
        let dir = tempfile::tempdir().expect("dir");
        let registry = Arc::new(Registry::dir(dir.path()).expect("registry"));
        let schema = SchemaRegistry::embedded()
            .expect("schemas")
            .get("camera_event")
            .expect("camera");
        let avsc = embedded_avsc("camera_event").expect("avsc");
        let encoder = AvroEncoder::registered(&registry, "cam-value", avsc)
            .await
            .expect("encoder");
        let decoder = TopicDecoder::new(
            Format::Avro,
            schema,
            Some(("event_time", TimeUnit::Millisecond)),
            &crate::decode::Codecs {
                registry: Some(registry.clone()),
                descriptors: None,
            },
            None,
        )
        .expect("decoder");
        Fixture {
            _dir: dir,
            registry,
            decoder,
            encoder,
        }
    }

    fn raw(values: &[Vec<u8>]) -> RawBatch {
        let mut b = RawBatch::new("cam");
        for (i, v) in values.iter().enumerate() {
            b.push(0, i as i64, Some(b"seg"), Some(v));
        }
        b
    }

    async fn decode(f: &Fixture, values: &[Vec<u8>]) -> Decoded {
        let raw = raw(values);
        f.decoder.prepare(&raw).await.expect("prepare");
        f.decoder.decode(&raw).expect("decode")
    }

    fn json_decoded(values: &[&[u8]]) -> RecordBatch {
        let schema = SchemaRegistry::embedded()
            .expect("schemas")
            .get("camera_event")
            .expect("camera");
        let values: Vec<Vec<u8>> = values.iter().map(|v| v.to_vec()).collect();
        let d = JsonDecoder::new(schema)
            .with_event_time("event_time", TimeUnit::Millisecond)
            .decode(&raw(&values))
            .expect("json");
        assert!(d.rejects.is_empty(), "{:?}", d.rejects);
        d.batch
    }

    #[tokio::test]
    async fn avro_records_decode_to_what_the_same_json_decodes_to() {
        let f = fixture().await;
        let values: Vec<Vec<u8>> = [GOOD, GOOD2]
            .iter()
            .map(|j| f.encoder.encode_json(j).expect("encode"))
            .collect();
        let d = decode(&f, &values).await;
        assert!(d.rejects.is_empty(), "{:?}", d.rejects);
        assert_eq!(d.rows, vec![0, 1]);
        assert_eq!(d.batch, json_decoded(&[GOOD, GOOD2]));
    }

    /// A record whose values are written as another kind than their fields' (a CSV replayed:
    /// ids of digits guessed as numbers, numbers as texts with spaces around them) encodes
    /// as the values they write; a value that is none of its field's kind is still refused.
    /// (Every such record failed, and with it every row of the replayed file.)
    #[tokio::test]
    async fn values_written_as_another_kind_encode_as_their_fields_kind() {
        const WRITTEN: &[u8] = br#"{"camera_id":1,"segment_id":"kim_ma_w","event_time":1767222000000,"kind":"collision","vehicle_class":"motorbike","speed_kmh":" 31.5 ","lane":"1","direction":"inbound","confidence":"0.93","severity":" 3"}"#;
        const DIGITS: &[u8] = br#"{"camera_id":"1","segment_id":"kim_ma_w","event_time":1767222000000,"kind":"collision","vehicle_class":"motorbike","speed_kmh":31.5,"lane":1,"direction":"inbound","confidence":0.93,"severity":3}"#;
        let f = fixture().await;
        let values = vec![f.encoder.encode_json(WRITTEN).expect("encode")];
        let d = decode(&f, &values).await;
        assert!(d.rejects.is_empty(), "{:?}", d.rejects);
        assert_eq!(d.batch, json_decoded(&[DIGITS]));
        for bad in [
            br#"{"camera_id":"c","segment_id":"s","event_time":1767222000000,"lane":"x"}"#
                .as_slice(),
            br#"{"camera_id":"c","segment_id":"s","event_time":1767222000000,"speed_kmh":"fast"}"#,
            // Digits past 64 bits come back from JSON through a double: refused, not written
            // as `1.2345678901234568e22`.
            br#"{"camera_id":12345678901234567890123,"segment_id":"s","event_time":1767222000000}"#,
        ] {
            assert!(
                f.encoder.encode_json(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[tokio::test]
    async fn numbers_outside_the_schemas_ranges_are_rejected_as_in_json() {
        use crate::decode::tests::{OUT_OF_RANGE, assert_out_of_range_rejected};
        let f = fixture().await;
        let values: Vec<Vec<u8>> = OUT_OF_RANGE
            .iter()
            .map(|j| f.encoder.encode_json(j).expect("encode"))
            .collect();
        let d = decode(&f, &values).await;
        assert_out_of_range_rejected(&d);
    }

    #[tokio::test]
    async fn bad_records_go_with_their_reason_and_spoil_nothing() {
        let f = fixture().await;
        let good = f.encoder.encode_json(GOOD).expect("encode");
        let good2 = f.encoder.encode_json(GOOD2).expect("encode");
        let mut unknown_id = good.clone();
        unknown_id[1..5].copy_from_slice(&77u32.to_be_bytes());
        let truncated = good[..good.len() - 6].to_vec();
        let mut trailing = good2.clone();
        trailing.extend_from_slice(&good2);
        // A record followed by a copy of its header, then an honest record: the copy must not
        // take the honest record for its body.
        let mut spare_header = good2.clone();
        spare_header.extend_from_slice(&good2[..HEADER]);
        let values = vec![
            good.clone(),
            spare_header,
            good2.clone(),
            GOOD.to_vec(), // JSON on an Avro topic
            vec![0, 0, 1], // header cut short
            unknown_id,    // no such schema
            truncated,     // body cut short
            good2.clone(),
            trailing,         // two records in one value
            vec![],           // empty
            vec![0xC3, 1, 2], // another framing (single-object)
            good2.clone(),
        ];
        let d = decode(&f, &values).await;
        assert_eq!(d.rows, vec![0, 2, 7, 11]);
        assert_eq!(d.batch, json_decoded(&[GOOD, GOOD2, GOOD2, GOOD2]));
        let reasons: Vec<(u32, &str)> = d
            .rejects
            .iter()
            .map(|r| (r.index, r.error.as_str()))
            .collect();
        let expect = [
            (1, "5 bytes after the end of the Avro record"),
            (3, "not Avro: the record starts with '{'"),
            (4, "truncated Avro header: 3 bytes"),
            (5, "unknown schema id 77: the schema registry"),
            (6, "truncated Avro record"),
            (8, "bytes after the end of the Avro record"),
            (9, "empty record"),
            (10, "the first byte is 0xc3"),
        ];
        assert_eq!(reasons.len(), expect.len(), "{reasons:?}");
        for ((i, why), (j, start)) in reasons.iter().zip(expect) {
            assert_eq!(*i, j);
            assert!(why.starts_with(start) || why.contains(start), "{i}: {why}");
        }
        assert!(d.rejects.iter().all(|r| r.stage == RejectStage::Decode));
    }

    #[tokio::test]
    async fn records_of_an_evolved_schema_are_read_into_the_topic_schema() {
        let f = fixture().await;
        let v2 = AvroEncoder::registered(&f.registry, "cam-value", V2)
            .await
            .expect("v2");
        let values = vec![
            v2.encode_json(GOOD2).expect("v2"),
            f.encoder.encode_json(GOOD).expect("v1"),
            v2.encode_json(GOOD2).expect("v2"),
        ];
        let d = decode(&f, &values).await;
        assert!(d.rejects.is_empty(), "{:?}", d.rejects);
        assert_eq!(d.rows, vec![0, 1, 2]);
        // GOOD2 has no lane and a speed a float holds exactly: the same rows as from JSON.
        assert_eq!(d.batch, json_decoded(&[GOOD2, GOOD, GOOD2]));
    }

    /// Across flush chunks: bad records on and next to the chunk boundaries, and the writer
    /// schema changing there, cost no good record and keep the order.
    #[tokio::test]
    async fn bad_records_and_schema_changes_at_chunk_boundaries() {
        let f = fixture().await;
        let v2 = AvroEncoder::registered(&f.registry, "cam-value", V2)
            .await
            .expect("v2");
        let bad_at = [
            0,
            CHUNK - 1,
            CHUNK,
            2 * CHUNK - 1,
            2 * CHUNK + 1,
            2 * CHUNK + 451,
        ];
        let mut values = Vec::new();
        let mut json: Vec<&[u8]> = Vec::new();
        for i in 0..2 * CHUNK + 452 {
            let (encoder, record) = match i % 5 {
                0 | 3 => (&v2, GOOD2),
                1 => (&f.encoder, GOOD2),
                _ => (&f.encoder, GOOD),
            };
            let mut value = encoder.encode_json(record).expect("encode");
            if bad_at.contains(&i) {
                value.truncate(value.len() - 2);
            } else {
                json.push(record);
            }
            values.push(value);
        }
        let d = decode(&f, &values).await;
        let good: Vec<u32> = (0..values.len() as u32)
            .filter(|i| !bad_at.contains(&(*i as usize)))
            .collect();
        assert_eq!(d.rows, good);
        let bad: Vec<u32> = d.rejects.iter().map(|r| r.index).collect();
        assert_eq!(bad, bad_at.map(|i| i as u32).to_vec());
        assert_eq!(d.batch, json_decoded(&json));
    }

    #[tokio::test]
    async fn a_writer_schema_that_cannot_be_read_is_refused_with_the_reason() {
        let f = fixture().await;
        let ints = V2.replace(
            r#"{"name":"camera_id","type":"string"}"#,
            r#"{"name":"camera_id","type":"int"}"#,
        );
        let bad = AvroEncoder::registered(&f.registry, "cam-value", &ints)
            .await
            .expect("registered");
        let json = String::from_utf8_lossy(GOOD2).replace("\"cam-0002\"", "2");
        let values = vec![bad.encode_json(json.as_bytes()).expect("encode")];
        let d = decode(&f, &values).await;
        assert_eq!(d.batch.num_rows(), 0);
        assert!(
            d.rejects[0].error.contains("field camera_id is Int32"),
            "{:?}",
            d.rejects
        );
        let missing = V2.replace(r#"{"name":"confidence","type":"double"},"#, "");
        let bad = AvroEncoder::registered(&f.registry, "cam-value", &missing)
            .await
            .expect("registered");
        let d = decode(&f, &[bad.encode_json(GOOD2).expect("encode")]).await;
        assert!(
            d.rejects[0].error.contains("has no field confidence"),
            "{:?}",
            d.rejects
        );
    }

    #[tokio::test]
    async fn rows_of_a_stream_declared_in_sql_written_as_avro_read_back_the_same() {
        use datafusion::arrow::array::{
            BooleanArray, Float64Array, Int32Array, Int64Array, StringViewArray,
            TimestampMillisecondArray,
        };
        use datafusion::arrow::datatypes::{Field, Schema};
        let f = fixture().await;
        let arrow = Arc::new(Schema::new(vec![
            // VARCHAR in SQL.
            Field::new("segment_id", DataType::Utf8View, false),
            Field::new("t", DataType::Timestamp(TimeUnit::Millisecond, None), false),
            Field::new("vehicles", DataType::Int64, true),
            Field::new("lanes", DataType::Int32, false),
            Field::new("speed", DataType::Float64, true),
            Field::new("jam", DataType::Boolean, true),
            Field::new("ratio", DataType::Float64, false),
        ]));
        let schema = crate::schema::TopicSchema::from_arrow("busy segments", arrow.clone());
        let avsc = schema.avro_schema().expect("derived");
        assert!(avsc.contains("\"busy_segments\""), "{avsc}");
        let encoder = AvroEncoder::registered(&f.registry, "busy-value", &avsc)
            .await
            .expect("registered");
        let batch = RecordBatch::try_new(
            arrow,
            vec![
                Arc::new(StringViewArray::from(vec!["a", "b", "c"])),
                Arc::new(TimestampMillisecondArray::from(vec![
                    1_767_222_000_000,
                    1_767_222_060_000,
                    1_767_222_120_000,
                ])),
                Arc::new(Int64Array::from(vec![Some(12), None, Some(0)])),
                Arc::new(Int32Array::from(vec![2, 4, 6])),
                Arc::new(Float64Array::from(vec![Some(31.25), Some(-0.5), None])),
                Arc::new(BooleanArray::from(vec![None, Some(true), Some(false)])),
                // JSON cannot carry NaN: the Avro record still does.
                Arc::new(Float64Array::from(vec![0.5, f64::NAN, 2.0])),
            ],
        )
        .expect("batch");
        let (bytes, ends) = crate::sink::encode_json_rows(&batch).expect("json");
        let mut start = 0;
        let mut values = Vec::new();
        for end in ends {
            values.push(encoder.encode_json(&bytes[start..end]).expect("avro"));
            start = end + 1;
        }
        let decoder = TopicDecoder::new(
            Format::Avro,
            Arc::new(schema),
            Some(("t", TimeUnit::Millisecond)),
            &crate::decode::Codecs {
                registry: Some(f.registry.clone()),
                descriptors: None,
            },
            None,
        )
        .expect("decoder");
        let raw = raw(&values);
        decoder.prepare(&raw).await.expect("prepare");
        let d = decoder.decode(&raw).expect("decode");
        assert!(d.rejects.is_empty(), "{:?}", d.rejects);
        assert_eq!(d.batch, batch);

        let lists = crate::schema::TopicSchema::from_arrow(
            "l",
            Arc::new(Schema::new(vec![Field::new(
                "xs",
                DataType::new_list(DataType::Int64, true),
                true,
            )])),
        );
        let e = lists.avro_schema().expect_err("lists");
        assert!(e.to_string().contains("column xs"), "{e}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Arbitrary bytes after a valid header, anywhere in a batch of good records, never
        /// panic the decoder nor cost a good record.
        #[test]
        fn garbage_bodies_never_cost_a_good_record(
            garbage in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 1..6),
            goods in 1usize..6,
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().build().expect("rt");
            runtime.block_on(async {
                let f = fixture().await;
                let good = f.encoder.encode_json(GOOD).expect("encode");
                let mut values = Vec::new();
                let mut expected_good = Vec::new();
                for (k, g) in garbage.iter().enumerate() {
                    if k < goods {
                        expected_good.push(values.len() as u32);
                        values.push(good.clone());
                    }
                    let mut bad = good[..HEADER].to_vec();
                    bad.extend_from_slice(g);
                    values.push(bad);
                }
                let d = decode(&f, &values).await;
                // Every good record is kept; garbage is kept only if it is a valid record.
                for i in &expected_good {
                    assert!(d.rows.contains(i), "good record {i} lost: {:?}", d.rejects);
                }
                assert_eq!(d.rows.len() + d.rejects.len(), values.len());
            });
        }
    }
}
