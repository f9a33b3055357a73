//! Topic schemas: Avro `.avsc` files in `schemas/topics/` are the single source of truth.
//!
//! At start-up each file is parsed and validated with `apache-avro`, and its Arrow schema is
//! derived from it: the decoder reads JSON into that Arrow schema, validation checks enum
//! symbols and fills defaults from it, and the sinks encode output rows in its field order.
//! The files are compiled into the binary, so the engine runs from any directory; a
//! `--schemas DIR` option (or [`SchemaRegistry::load_dir`]) reads them from disk instead.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use apache_avro::Schema as AvroSchema;
use apache_avro::schema::{RecordField, RecordSchema};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::scalar::ScalarValue;

use crate::error::{Error, Result};

/// The schema files compiled into the binary: (name, contents), every `*.avsc` of
/// `schemas/topics/`.
pub const EMBEDDED: &[(&str, &str)] = crate::embedded::SCHEMA_FILES;

/// The `"urbanstream"` attribute of a schema file, checked against its fields.
fn declaration(name: &str, avsc: &str) -> Result<Option<StreamDeclaration>> {
    let json: serde_json::Value =
        serde_json::from_str(avsc).map_err(|e| Error::schema(name, e.to_string()))?;
    let Some(value) = json.get("urbanstream") else {
        return Ok(None);
    };
    let declared: StreamDeclaration = serde_json::from_value(value.clone()).map_err(|e| {
        Error::schema(
            name,
            format!(
                "\"urbanstream\": {e}; write {{\"table\": \"<name>\", \"topic\": \"<topic>\", \
                 \"role\": \"input\" or \"output\", \"key\": \"<field>\"}}"
            ),
        )
    })?;
    let fields: Vec<&str> = json
        .get("fields")
        .and_then(|f| f.as_array())
        .map(|f| f.iter().filter_map(|f| f.get("name")?.as_str()).collect())
        .unwrap_or_default();
    if let Some(key) = &declared.key
        && !fields.contains(&key.as_str())
    {
        return Err(Error::schema(
            name,
            format!(
                "\"urbanstream\": key {key} is not a field (fields: {})",
                fields.join(", ")
            ),
        ));
    }
    if let Some(time) = &declared.event_time
        && !fields.contains(&time.as_str())
    {
        return Err(Error::schema(
            name,
            format!(
                "\"urbanstream\": event_time {time} is not a field (fields: {})",
                fields.join(", ")
            ),
        ));
    }
    let valid = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    };
    if !valid(&declared.table) {
        return Err(Error::schema(
            name,
            format!(
                "\"urbanstream\": table {:?} is not a plain name (lower-case letters, digits, _)",
                declared.table
            ),
        ));
    }
    if declared.topic.is_empty() {
        return Err(Error::schema(name, "\"urbanstream\": topic is empty"));
    }
    Ok(Some(declared))
}

/// One topic schema: the Avro original and what the engine derives from it.
#[derive(Debug, Clone)]
pub struct TopicSchema {
    /// Schema name (the file stem, e.g. `camera_event`).
    pub name: String,
    /// Arrow schema derived from the Avro record. Timestamps are
    /// `Timestamp(Millisecond, None)` holding UTC instants.
    pub arrow: SchemaRef,
    /// Per Arrow field: the allowed symbols if the Avro type is an enum.
    pub enum_symbols: Vec<Option<Arc<[String]>>>,
    /// Per Arrow field: the Avro default, if it has a non-null one. A record without the field
    /// gets this value.
    pub defaults: Vec<Option<ScalarValue>>,
    /// Per Arrow field: whether the record must carry a non-null value (non-union type without
    /// a default).
    pub required: Vec<bool>,
    /// Per Arrow field: the values a number may take (`"urbanstream": {"min": 0, "max": 1}` on
    /// the Avro field); a record outside is rejected like one missing a required field.
    pub ranges: Vec<Option<ValueRange>>,
    /// The Avro schema it was parsed from; `None` for a schema declared in SQL.
    pub avsc: Option<Arc<str>>,
    /// The city stream the schema file declares over its topic, if any.
    pub stream: Option<StreamDeclaration>,
}

/// The city stream a schema file declares: the object under the record's `"urbanstream"`
/// attribute (Avro keeps attributes it does not define as metadata). Every such file becomes
/// a table of the city's SQL context, so a new sensor type is a schema file and a query:
///
/// ```json
/// "urbanstream": {"table": "parking_readings", "topic": "city.parking.readings",
///                 "role": "input", "key": "lot_id"}
/// ```
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamDeclaration {
    /// The table queries name it by.
    pub table: String,
    /// Its topic; `[topics]` of the configuration may name another.
    pub topic: String,
    /// Whether records come from outside (`input`) or are written by queries (`output`).
    pub role: StreamRole,
    /// The column whose value keys its records.
    #[serde(default)]
    pub key: Option<String>,
    /// The Protobuf message its records are when the city's inputs are Protobuf.
    #[serde(default)]
    pub protobuf_message: Option<String>,
    /// The column queries reading the stream take event time from: `event_time` when the
    /// record has one; an output stream read by another query names its own (`window_end`).
    #[serde(default)]
    pub event_time: Option<String>,
    /// Further stream options, named as in `OPTIONS` of `CREATE EXTERNAL TABLE`
    /// (`watermark_delay`, `idle_timeout`, `future_tolerance`, `event_time_unit`,
    /// `upsert_key`): a sparse stream, such as citizens' reports, goes idle sooner.
    #[serde(default)]
    pub options: std::collections::BTreeMap<String, String>,
}

/// The values a numeric field may take, both ends included.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ValueRange {
    /// The least, if bounded below.
    pub min: Option<f64>,
    /// The greatest, if bounded above.
    pub max: Option<f64>,
}

impl ValueRange {
    /// The range a field declares under its `"urbanstream"` attribute, if any.
    fn of_field(schema: &str, field: &RecordField, data_type: &DataType) -> Result<Option<Self>> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Declared {
            min: Option<f64>,
            max: Option<f64>,
        }
        let Some(value) = field.custom_attributes.get("urbanstream") else {
            return Ok(None);
        };
        let wrong = |why: String| {
            Error::schema(
                schema,
                format!(
                    "field {}: \"urbanstream\": {why}; write {{\"min\": <number>, \"max\": <number>}} \
                     (either may be left out)",
                    field.name
                ),
            )
        };
        let declared: Declared =
            serde_json::from_value(value.clone()).map_err(|e| wrong(e.to_string()))?;
        if !data_type.is_numeric() {
            return Err(wrong(format!(
                "a range needs a number field, not {data_type}"
            )));
        }
        match (declared.min, declared.max) {
            (None, None) => Err(wrong("give min, max or both".into())),
            (Some(min), Some(max)) if min > max => {
                Err(wrong(format!("min ({min}) is above max ({max})")))
            }
            (min, max) => Ok(Some(Self { min, max })),
        }
    }

    /// Whether `x` is within it.
    pub fn contains(&self, x: f64) -> bool {
        self.min.is_none_or(|m| x >= m) && self.max.is_none_or(|m| x <= m)
    }
}

impl std::fmt::Display for ValueRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.min, self.max) {
            (Some(min), Some(max)) => write!(f, "{min} to {max}"),
            (Some(min), None) => write!(f, "at least {min}"),
            (None, Some(max)) => write!(f, "at most {max}"),
            (None, None) => write!(f, "any number"),
        }
    }
}

/// The SQL name of an Arrow type, as a column of it is declared (`BIGINT`, `VARCHAR`, …).
pub fn sql_type_name(data_type: &DataType) -> String {
    match data_type {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "VARCHAR".into(),
        DataType::Int64 => "BIGINT".into(),
        DataType::Int32 => "INT".into(),
        DataType::Int16 => "SMALLINT".into(),
        DataType::Int8 => "TINYINT".into(),
        DataType::UInt64 => "BIGINT UNSIGNED".into(),
        DataType::UInt32 => "INT UNSIGNED".into(),
        DataType::Float64 => "DOUBLE".into(),
        DataType::Float32 => "REAL".into(),
        DataType::Boolean => "BOOLEAN".into(),
        DataType::Timestamp(_, None) => "TIMESTAMP".into(),
        DataType::Timestamp(_, Some(zone)) => format!("TIMESTAMP WITH TIME ZONE ({zone})"),
        DataType::Date32 | DataType::Date64 => "DATE".into(),
        DataType::Decimal128(p, s) | DataType::Decimal256(p, s) => format!("DECIMAL({p}, {s})"),
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => "BYTEA".into(),
        other => other.to_string(),
    }
}

/// Which side of the engine a declared stream is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamRole {
    /// Produced by the city's sensors (read in `[topics] input_format`).
    Input,
    /// Written by queries (in `[topics] output_format`).
    Output,
}

impl TopicSchema {
    /// Parses an Avro record schema and derives its Arrow form.
    pub fn from_avsc(name: &str, avsc: &str) -> Result<Self> {
        let avro = AvroSchema::parse_str(avsc).map_err(|e| Error::schema(name, e.to_string()))?;
        let AvroSchema::Record(RecordSchema { fields, .. }) = &avro else {
            return Err(Error::schema(name, "the top-level type must be a record"));
        };
        let mut arrow_fields = Vec::with_capacity(fields.len());
        let mut enum_symbols = Vec::with_capacity(fields.len());
        let mut defaults = Vec::with_capacity(fields.len());
        let mut required = Vec::with_capacity(fields.len());
        let mut ranges = Vec::with_capacity(fields.len());
        for field in fields {
            let (data_type, nullable, symbols) = arrow_type(name, field, &field.schema)?;
            ranges.push(ValueRange::of_field(name, field, &data_type)?);
            let default = field_default(name, field, &data_type)?;
            required.push(!nullable && default.is_none());
            // Fields with a default are nullable on the wire and filled after decoding.
            arrow_fields.push(Field::new(
                &field.name,
                data_type,
                nullable || default.is_some(),
            ));
            enum_symbols.push(symbols);
            defaults.push(default);
        }
        Ok(Self {
            name: name.to_string(),
            arrow: Arc::new(Schema::new(arrow_fields)),
            enum_symbols,
            defaults,
            required,
            ranges,
            avsc: Some(avsc.into()),
            stream: declaration(name, avsc)?,
        })
    }

    /// A schema declared in SQL (a column list): no enums, no defaults; non-nullable columns
    /// are required.
    pub fn from_arrow(name: &str, arrow: SchemaRef) -> Self {
        let n = arrow.fields().len();
        Self {
            name: name.to_string(),
            enum_symbols: vec![None; n],
            defaults: vec![None; n],
            required: arrow.fields().iter().map(|f| !f.is_nullable()).collect(),
            ranges: vec![None; n],
            arrow,
            avsc: None,
            stream: None,
        }
    }

    /// The Avro schema records of this schema are written with: the `.avsc` it came from, or
    /// one derived from the SQL column list (nullable columns as `["null", T]` with a null
    /// default, timestamps as `timestamp-millis`, as the engine writes them).
    pub fn avro_schema(&self) -> Result<String> {
        if let Some(avsc) = &self.avsc {
            return Ok(avsc.to_string());
        }
        let mut fields = Vec::with_capacity(self.arrow.fields().len());
        for field in self.arrow.fields() {
            let t = match field.data_type() {
                DataType::Boolean => serde_json::json!("boolean"),
                DataType::Int8 | DataType::Int16 | DataType::Int32 => serde_json::json!("int"),
                DataType::Int64 | DataType::UInt8 | DataType::UInt16 | DataType::UInt32 => {
                    serde_json::json!("long")
                }
                DataType::Float32 => serde_json::json!("float"),
                DataType::Float64 => serde_json::json!("double"),
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
                    serde_json::json!("string")
                }
                DataType::Timestamp(..) => {
                    serde_json::json!({"type": "long", "logicalType": "timestamp-millis"})
                }
                other => {
                    return Err(Error::schema(
                        &self.name,
                        format!(
                            "column {} is {other}, which Avro output does not carry yet; cast \
                             it to VARCHAR, BIGINT, DOUBLE or TIMESTAMP",
                            field.name()
                        ),
                    ));
                }
            };
            fields.push(if field.is_nullable() {
                serde_json::json!({"name": field.name(), "type": ["null", t], "default": null})
            } else {
                serde_json::json!({"name": field.name(), "type": t})
            });
        }
        let name: String = self
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let name = if name.starts_with(|c: char| c.is_ascii_digit()) || name.is_empty() {
            format!("R{name}")
        } else {
            name
        };
        Ok(serde_json::json!({"type": "record", "name": name, "fields": fields}).to_string())
    }

    /// The Arrow schema of decoded batches: like [`TopicSchema::arrow`], but fields with a
    /// default are non-null once the defaults are filled in.
    pub fn output_schema(&self) -> SchemaRef {
        let fields: Vec<Field> = self
            .arrow
            .fields()
            .iter()
            .zip(&self.defaults)
            .zip(&self.required)
            .map(|((f, d), r)| f.as_ref().clone().with_nullable(!(*r || d.is_some())))
            .collect();
        Arc::new(Schema::new(fields))
    }
}

/// An Avro type's Arrow type, whether it is nullable, and its enum symbols if any.
type ArrowTypeOf = (DataType, bool, Option<Arc<[String]>>);

fn arrow_type(name: &str, field: &RecordField, schema: &AvroSchema) -> Result<ArrowTypeOf> {
    let unsupported = |what: &str| {
        Err(Error::schema(
            name,
            format!("field {}: unsupported Avro type {what}", field.name),
        ))
    };
    Ok(match schema {
        AvroSchema::Boolean => (DataType::Boolean, false, None),
        AvroSchema::Int => (DataType::Int32, false, None),
        AvroSchema::Long => (DataType::Int64, false, None),
        AvroSchema::Float => (DataType::Float32, false, None),
        AvroSchema::Double => (DataType::Float64, false, None),
        AvroSchema::String | AvroSchema::Uuid => (DataType::Utf8, false, None),
        AvroSchema::Bytes => (DataType::Binary, false, None),
        AvroSchema::TimestampMillis => (
            DataType::Timestamp(TimeUnit::Millisecond, None),
            false,
            None,
        ),
        AvroSchema::TimestampMicros => (
            DataType::Timestamp(TimeUnit::Microsecond, None),
            false,
            None,
        ),
        AvroSchema::Date => (DataType::Date32, false, None),
        AvroSchema::Enum(e) => (DataType::Utf8, false, Some(e.symbols.clone().into())),
        AvroSchema::Union(u) => {
            let variants = u.variants();
            let non_null: Vec<&AvroSchema> = variants
                .iter()
                .filter(|v| !matches!(v, AvroSchema::Null))
                .collect();
            if non_null.len() != 1 || variants.len() > 2 {
                return unsupported("union (only [\"null\", T] is supported)");
            }
            let (t, _, symbols) = arrow_type(name, field, non_null[0])?;
            (t, true, symbols)
        }
        other => return unsupported(&format!("{other:?}")),
    })
}

fn field_default(name: &str, field: &RecordField, t: &DataType) -> Result<Option<ScalarValue>> {
    let Some(value) = &field.default else {
        return Ok(None);
    };
    let bad = || {
        Error::schema(
            name,
            format!("field {}: default {value} is not a {t}", field.name),
        )
    };
    Ok(match (value, t) {
        (serde_json::Value::Null, _) => None,
        (serde_json::Value::String(s), DataType::Utf8) => Some(ScalarValue::Utf8(Some(s.clone()))),
        (serde_json::Value::Bool(b), DataType::Boolean) => Some(ScalarValue::Boolean(Some(*b))),
        (serde_json::Value::Number(n), DataType::Int32) => {
            let v = n
                .as_i64()
                .and_then(|v| i32::try_from(v).ok())
                .ok_or_else(bad)?;
            Some(ScalarValue::Int32(Some(v)))
        }
        (serde_json::Value::Number(n), DataType::Int64) => {
            Some(ScalarValue::Int64(Some(n.as_i64().ok_or_else(bad)?)))
        }
        (serde_json::Value::Number(n), DataType::Float64) => {
            Some(ScalarValue::Float64(Some(n.as_f64().ok_or_else(bad)?)))
        }
        _ => return Err(bad()),
    })
}

/// All topic schemas, by name.
#[derive(Debug, Clone)]
pub struct SchemaRegistry {
    schemas: HashMap<String, Arc<TopicSchema>>,
}

impl SchemaRegistry {
    /// The schemas compiled into the binary.
    pub fn embedded() -> Result<Self> {
        let mut schemas = HashMap::new();
        for (name, avsc) in EMBEDDED {
            schemas.insert(
                name.to_string(),
                Arc::new(TopicSchema::from_avsc(name, avsc)?),
            );
        }
        Ok(Self { schemas })
    }

    /// Every `*.avsc` file of a directory; the file stem is the schema's name.
    pub fn load_dir(dir: &Path) -> Result<Self> {
        let mut schemas = HashMap::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("avsc") {
                continue;
            }
            let name = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_string();
            let text = std::fs::read_to_string(&path)?;
            schemas.insert(
                name.clone(),
                Arc::new(TopicSchema::from_avsc(&name, &text)?),
            );
        }
        Ok(Self { schemas })
    }

    /// The streams the schemas declare, by table name; an error when two declare one table
    /// or one topic, or a key that is not a field.
    pub fn streams(&self) -> Result<Vec<(Arc<TopicSchema>, StreamDeclaration)>> {
        let mut streams: Vec<_> = self
            .schemas
            .values()
            .filter_map(|s| s.stream.clone().map(|d| (s.clone(), d)))
            .collect();
        streams.sort_by(|a, b| a.1.table.cmp(&b.1.table));
        for pair in streams.windows(2) {
            if pair[0].1.table == pair[1].1.table {
                return Err(Error::schema(
                    &pair[1].0.name,
                    format!(
                        "declares table {}, which {} declares too: name it otherwise",
                        pair[1].1.table, pair[0].0.name
                    ),
                ));
            }
        }
        for (i, (schema, d)) in streams.iter().enumerate() {
            if let Some((other, _)) = streams[..i].iter().find(|(_, o)| o.topic == d.topic) {
                return Err(Error::schema(
                    &schema.name,
                    format!(
                        "declares topic {}, which {} declares too: one topic, one schema",
                        d.topic, other.name
                    ),
                ));
            }
        }
        Ok(streams)
    }

    /// The schema called `name`.
    pub fn get(&self, name: &str) -> Result<Arc<TopicSchema>> {
        self.schemas
            .get(name)
            .cloned()
            .ok_or_else(|| Error::schema(name, "no such schema in schemas/topics"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn declared(attribute: &str) -> Result<TopicSchema> {
        TopicSchema::from_avsc(
            "probe",
            &format!(
                r#"{{"type": "record", "name": "Probe", {attribute}
                    "fields": [{{"name": "id", "type": "string"}},
                               {{"name": "event_time", "type": {{"type": "long", "logicalType": "timestamp-millis"}}}}]}}"#
            ),
        )
    }

    #[test]
    fn schema_files_declare_their_streams_and_bad_declarations_are_named() {
        let ok = declared(
            r#""urbanstream": {"table": "probes", "topic": "city.probes", "role": "input",
                "key": "id", "options": {"idle_timeout": "5s"}},"#,
        )
        .expect("declared");
        let d = ok.stream.expect("a declaration");
        assert_eq!(
            (d.table.as_str(), d.topic.as_str(), d.role),
            ("probes", "city.probes", StreamRole::Input)
        );
        assert_eq!(d.options["idle_timeout"], "5s");
        assert!(declared("").expect("plain").stream.is_none());
        for (attribute, says) in [
            (
                r#""urbanstream": {"table": "p", "topic": "t", "role": "sideways"},"#,
                "unknown variant",
            ),
            (
                r#""urbanstream": {"table": "p", "topic": "t", "role": "input", "kee": "id"},"#,
                "unknown field",
            ),
            (
                r#""urbanstream": {"table": "p", "topic": "t", "role": "input", "key": "nope"},"#,
                "key nope is not a field",
            ),
            (
                r#""urbanstream": {"table": "p", "topic": "t", "role": "output", "event_time": "nope"},"#,
                "event_time nope is not a field",
            ),
            (
                r#""urbanstream": {"table": "Probes!", "topic": "t", "role": "input"},"#,
                "not a plain name",
            ),
            (
                r#""urbanstream": {"table": "p", "topic": "", "role": "input"},"#,
                "topic is empty",
            ),
        ] {
            let e = declared(attribute).expect_err(attribute).to_string();
            assert!(e.contains(says), "{attribute}: {e}");
        }
        // Two files declaring one table, or one topic.
        let twin = |table: &str, topic: &str| {
            Arc::new(
                declared(&format!(
                    r#""urbanstream": {{"table": "{table}", "topic": "{topic}", "role": "input"}},"#
                ))
                .expect("declared"),
            )
        };
        let registry = |a: Arc<TopicSchema>, b: Arc<TopicSchema>| SchemaRegistry {
            schemas: HashMap::from([("a".to_string(), a), ("b".to_string(), b)]),
        };
        let e = registry(twin("p", "t1"), twin("p", "t2"))
            .streams()
            .expect_err("one table")
            .to_string();
        assert!(e.contains("declares table p"), "{e}");
        let e = registry(twin("p", "t"), twin("q", "t"))
            .streams()
            .expect_err("one topic")
            .to_string();
        assert!(e.contains("declares topic t"), "{e}");
        // Every schema file of the city declares a stream but the DLQ's and the late topic's.
        let city = SchemaRegistry::embedded().expect("schemas");
        let tables: Vec<String> = city
            .streams()
            .expect("streams")
            .into_iter()
            .map(|(_, d)| d.table)
            .collect();
        assert_eq!(tables.len(), EMBEDDED.len() - 2, "{tables:?}");
    }

    #[test]
    fn embedded_schemas_parse_and_derive_arrow() {
        let registry = SchemaRegistry::embedded().expect("embedded schemas parse");
        let camera = registry.get("camera_event").expect("camera schema");
        let schema = camera.output_schema();
        let event_time = schema.field_with_name("event_time").expect("event_time");
        assert_eq!(
            event_time.data_type(),
            &DataType::Timestamp(TimeUnit::Millisecond, None)
        );
        assert!(!event_time.is_nullable());
        let kind = schema.index_of("kind").expect("kind");
        assert_eq!(
            camera.defaults[kind],
            Some(ScalarValue::Utf8(Some("detection".into())))
        );
        assert!(!schema.field(kind).is_nullable());
        let class = schema.index_of("vehicle_class").expect("vehicle_class");
        assert!(schema.field(class).is_nullable());
        let symbols = camera.enum_symbols[class].as_ref().expect("enum");
        assert!(symbols.iter().any(|s| s == "motorbike"));
    }

    #[test]
    fn directory_matches_embedded() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas/topics");
        let from_disk = SchemaRegistry::load_dir(&dir).expect("schemas dir");
        let embedded = SchemaRegistry::embedded().expect("embedded");
        for (name, _) in EMBEDDED {
            assert_eq!(
                from_disk.get(name).unwrap().arrow,
                embedded.get(name).unwrap().arrow
            );
        }
    }

    #[test]
    fn unsupported_types_are_named() {
        let avsc = r#"{"type":"record","name":"R","fields":[{"name":"m","type":{"type":"map","values":"int"}}]}"#;
        let err = TopicSchema::from_avsc("r", avsc).unwrap_err().to_string();
        assert!(err.contains("field m"), "{err}");
        assert!(TopicSchema::from_avsc("r", "{not json").is_err());
    }
}
