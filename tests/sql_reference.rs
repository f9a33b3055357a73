//! README's "Tables and columns" is generated from the schemas: every stream table of the
//! city (its topic, key, event time and watermark delay from the stream context, its columns
//! from the Avro schema that the Arrow schema is derived from, with the schema's own `doc`)
//! and every reference table. This test renders it and fails when README says something else;
//! `URBANSTREAM_BLESS=1 cargo test -p urbanstream-tests --test integration sql_reference::`
//! rewrites it.

use std::path::Path;

use datafusion::arrow::datatypes::{DataType, TimeUnit};
use serde_json::Value;
use urbanstream::pipeline::Topics;
use urbanstream::plan::city_context;
use urbanstream::plan::table::StreamTable;
use urbanstream::schema::SchemaRegistry;

const BEGIN: &str = "<!-- sql-tables:begin (generated from schemas/ by tests/sql_reference.rs) -->";
const END: &str = "<!-- sql-tables:end -->";

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The SQL name of an Arrow type as analysts write it in `CREATE EXTERNAL TABLE`.
fn sql_type(t: &DataType) -> String {
    match t {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "VARCHAR".into(),
        DataType::Dictionary(_, v) => sql_type(v),
        DataType::Int8 => "TINYINT".into(),
        DataType::Int16 => "SMALLINT".into(),
        DataType::Int32 => "INT".into(),
        DataType::Int64 => "BIGINT".into(),
        DataType::UInt32 => "INT UNSIGNED".into(),
        DataType::UInt64 => "BIGINT UNSIGNED".into(),
        DataType::Float32 => "REAL".into(),
        DataType::Float64 => "DOUBLE".into(),
        DataType::Boolean => "BOOLEAN".into(),
        DataType::Date32 => "DATE".into(),
        DataType::Timestamp(TimeUnit::Millisecond, None) => "TIMESTAMP".into(),
        DataType::Timestamp(unit, zone) => format!(
            "TIMESTAMP ({unit:?}{})",
            zone.as_ref().map_or(String::new(), |z| format!(", {z}"))
        ),
        DataType::List(f) => format!("{}[]", sql_type(f.data_type())),
        other => other.to_string(),
    }
}

/// The `doc` of each field of `schemas/topics/<schema>.avsc`, and the record's own.
fn docs(table: &str) -> anyhow::Result<(String, Vec<(String, String)>)> {
    let dir = root().join("schemas/topics");
    let file = [table.strip_suffix('s').unwrap_or(table), table]
        .into_iter()
        .map(|n| dir.join(format!("{n}.avsc")))
        .find(|p| p.exists())
        .ok_or_else(|| anyhow::anyhow!("no schemas/topics/*.avsc for {table}"))?;
    let avsc: Value = serde_json::from_str(&std::fs::read_to_string(file)?)?;
    let fields = avsc["fields"]
        .as_array()
        .map(|f| {
            f.iter()
                .map(|f| {
                    (
                        f["name"].as_str().unwrap_or_default().to_string(),
                        f["doc"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    Ok((avsc["doc"].as_str().unwrap_or_default().to_string(), fields))
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

async fn render() -> anyhow::Result<String> {
    let topics = Topics::default();
    let ctx = city_context(&topics, &SchemaRegistry::embedded()?)?;
    let schema = ctx
        .session()
        .catalog("datafusion")
        .and_then(|c| c.schema("public"))
        .ok_or_else(|| anyhow::anyhow!("no public schema"))?;
    let mut names = schema.table_names();
    names.sort();
    let (mut streams, mut reference) = (String::new(), String::new());
    for name in names {
        let Some(provider) = schema.table(&name).await? else {
            continue;
        };
        match provider.downcast_ref::<StreamTable>() {
            Some(stream) => {
                let o = &stream.options;
                let (about, field_docs) = docs(&name)?;
                let direction = if topics.inputs().contains(&o.topic) {
                    "input"
                } else {
                    "output"
                };
                let time = match (direction, &o.event_time) {
                    ("input", Some(t)) => format!(
                        ", event time `{t}`, watermark delay {} s",
                        o.watermark_delay.as_secs_f64()
                    ),
                    _ => String::new(),
                };
                streams.push_str(&format!(
                    "#### `{name}` ({direction} stream)\n\nTopic `{}`, key `{}`{time}. {}\n\n\
                     | column | type | null | meaning |\n|---|---|---|---|\n",
                    o.topic,
                    o.key.as_deref().unwrap_or("-"),
                    cell(&about),
                ));
                for f in provider.schema().fields() {
                    let doc = field_docs
                        .iter()
                        .find(|(n, _)| n == f.name())
                        .map_or("", |(_, d)| d.as_str());
                    streams.push_str(&format!(
                        "| `{}` | {} | {} | {} |\n",
                        f.name(),
                        sql_type(f.data_type()),
                        if f.is_nullable() { "yes" } else { "no" },
                        cell(doc)
                    ));
                }
                streams.push('\n');
            }
            None => {
                let columns: Vec<String> = provider
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| format!("`{}` {}", f.name(), sql_type(f.data_type())))
                    .collect();
                reference.push_str(&format!("| `{name}` | {} |\n", columns.join(", ")));
            }
        }
    }
    Ok(format!(
        "{BEGIN}\n\n{streams}#### Reference tables\n\n| table | columns |\n|---|---|\n{reference}\n{END}"
    ))
}

#[tokio::test]
async fn the_readme_lists_every_table_and_column_as_the_schemas_define_them() -> anyhow::Result<()>
{
    let generated = render().await?;
    let path = root().join("README.md");
    let readme = std::fs::read_to_string(&path)?;
    let (Some(start), Some(end)) = (readme.find(BEGIN), readme.find(END)) else {
        anyhow::bail!("README.md has no {BEGIN} … {END} block");
    };
    let current = &readme[start..end + END.len()];
    if current == generated {
        return Ok(());
    }
    if std::env::var_os("URBANSTREAM_BLESS").is_some() {
        let updated = format!(
            "{}{generated}{}",
            &readme[..start],
            &readme[end + END.len()..]
        );
        std::fs::write(&path, updated)?;
        return Ok(());
    }
    anyhow::bail!(
        "README.md's table reference differs from schemas/: run \
         URBANSTREAM_BLESS=1 cargo test -p urbanstream-tests --test integration sql_reference::\n\
         generated:\n{generated}"
    )
}
