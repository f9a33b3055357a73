//! The reference tables a running engine reads, as versioned Arrow tables that can be
//! replaced while queries run.
//!
//! Each table starts from the CSV compiled into the binary (`schemas/reference/`) or from
//! the newest version kept in the reference directory (`<dir>/<table>/v<N>.csv`). A new
//! version is CSV text: checked (the table's header and column types, and for the city's
//! tables each row's type and the cross-references: a sensor's ward exists, ids are unique,
//! intervals are positive), written to the directory before it is installed, then installed
//! at once for every query. [`ReferenceTables::generation`] changes with every replacement,
//! so plans that keep a table's rows (a lookup join's hash table) know to read it again.
//!
//! `ward_sensors(ward_id, sensors, expected_per_hour)` is derived from `sensors`: per ward,
//! its sensors and the readings they send in an hour together (what a ward's hourly mean
//! is complete against). It follows every new version of `sensors`, under its version number.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use datafusion::arrow::csv::ReaderBuilder;
use datafusion::arrow::csv::reader::Format;
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::record_batch::RecordBatch;

use super::{EMBEDDED, ReferenceData};
use crate::error::{Error, Result};

/// The derived table and the table it follows.
const DERIVED: (&str, &str) = ("ward_sensors", "sensors");
/// Versions of a table kept in the reference directory.
const KEPT_VERSIONS: u64 = 10;
/// The largest CSV accepted as one table's version.
pub const MAX_CSV_BYTES: usize = 64 << 20;
/// The most reference tables held (the city's and new ones).
pub const MAX_TABLES: usize = 64;
/// The most columns of a new reference table.
pub const MAX_COLUMNS: usize = 1024;
/// The most CSV all the tables' current versions hold together, unless configured
/// otherwise (`reference.max_total_bytes`): their rows are held in memory, about five
/// times the CSV's size.
pub const MAX_TOTAL_CSV_BYTES: usize = 256 << 20;

/// One version of a reference table.
#[derive(Debug)]
pub struct TableVersion {
    /// The table's name in SQL.
    pub name: String,
    /// 1 for the built-in table (or the first version of a table added at run time), then
    /// one more with every replacement.
    pub version: u64,
    /// Its columns (the same in every version of a table).
    pub schema: SchemaRef,
    /// Its rows.
    pub batches: Vec<RecordBatch>,
    /// Number of rows.
    pub rows: usize,
    /// The CSV it was read from (shared: every reader of the table's rows answers with it).
    pub csv: Arc<str>,
    /// The table it is computed from, for a derived table (which cannot be replaced).
    pub derived_from: Option<&'static str>,
    /// When it was installed, epoch ms (0: compiled into the binary).
    pub installed_ms: i64,
    /// The values of its first column (the id of the city's tables), made when first asked.
    ids: std::sync::OnceLock<std::collections::HashSet<String>>,
}

/// The reference tables of a process, shared by its queries (a clone is the same tables).
#[derive(Debug, Clone)]
pub struct ReferenceTables {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    tables: RwLock<BTreeMap<String, Arc<TableVersion>>>,
    generation: Arc<AtomicU64>,
    dir: Option<PathBuf>,
    /// The most CSV the current versions may hold together.
    max_total_bytes: usize,
    /// Serialises replacements (check, write, install).
    writer: Mutex<()>,
}

impl ReferenceTables {
    /// The tables compiled into the binary, kept in memory only.
    pub fn embedded() -> Result<Self> {
        Self::load(None)
    }

    /// The tables compiled into the binary, each replaced by its newest version in `dir`
    /// (tables added at run time included); new versions are written there.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        Self::open_limited(dir, MAX_TOTAL_CSV_BYTES)
    }

    /// [`ReferenceTables::open`], holding at most `max_total_bytes` of CSV in all the
    /// tables' current versions: a version that would take them over is refused. Versions
    /// kept from before (the limit lowered since) are all loaded, with a warning.
    pub fn open_limited(dir: impl Into<PathBuf>, max_total_bytes: usize) -> Result<Self> {
        let tables = Self::load(Some(dir.into()))?;
        let held = tables.total_bytes(None);
        if held > max_total_bytes {
            tracing::warn!(
                held,
                limit = max_total_bytes,
                "the reference tables kept hold more CSV than reference.max_total_bytes: \
                 no table can grow until some are removed or replaced by smaller versions"
            );
        }
        Ok(Self {
            inner: Arc::new(Inner {
                max_total_bytes,
                ..Arc::into_inner(tables.inner).expect("not shared yet")
            }),
        })
    }

    fn load(dir: Option<PathBuf>) -> Result<Self> {
        let mut texts: BTreeMap<String, (u64, String)> = EMBEDDED
            .iter()
            .map(|(file, text)| (table_name(file).to_string(), (1, text.to_string())))
            .collect();
        // When each kept version was written (its file's time).
        let mut installed: BTreeMap<String, i64> = BTreeMap::new();
        if let Some(dir) = &dir {
            for (name, (version, text, written_ms)) in newest_versions(dir)? {
                if name == DERIVED.0 {
                    continue;
                }
                installed.insert(name.clone(), written_ms);
                texts.insert(name, (version, text));
            }
        }
        let city = ReferenceData::from_csv(&|file| {
            texts
                .get(table_name(file))
                .map(|(_, text)| text.clone())
                .ok_or_else(|| Error::Reference {
                    file: file.into(),
                    message: "missing".into(),
                })
        })
        .map_err(|e| match &dir {
            Some(dir) => Error::Reference {
                file: dir.display().to_string(),
                message: format!("the kept reference tables are inconsistent: {e}"),
            },
            None => e,
        })?;
        let mut tables = BTreeMap::new();
        for (name, (version, text)) in texts {
            // The columns: the built-in table's, or those of the first version of a table
            // added at run time (later versions were checked against them).
            let first = match &dir {
                Some(dir) if embedded_text(&name).is_none() => {
                    std::fs::read_to_string(dir.join(&name).join("v1.csv"))
                        .ok()
                        .map(|t| without_bom(&t).to_string())
                }
                _ => None,
            };
            let schema = match (embedded_text(&name), &first) {
                (Some(built_in), _) => Some(infer_schema(&name, built_in)?),
                (None, Some(first)) => Some(infer_schema(&name, first)?),
                (None, None) => None,
            };
            let (schema, batches) = match schema {
                Some(schema) => (schema.clone(), read(&name, &text, schema)?),
                None => infer(&name, &text)?,
            };
            let written_ms = installed.get(&name).copied().unwrap_or(0);
            tables.insert(
                name.clone(),
                Arc::new(TableVersion::new(
                    name, version, schema, batches, text, None, written_ms,
                )),
            );
        }
        let followed = tables
            .get(DERIVED.1)
            .map_or(1, |t: &Arc<TableVersion>| t.version);
        let derived = derive_ward_sensors(&city, followed)?;
        tables.insert(derived.name.clone(), Arc::new(derived));
        Ok(Self {
            inner: Arc::new(Inner {
                tables: RwLock::new(tables),
                generation: Arc::new(AtomicU64::new(0)),
                dir,
                max_total_bytes: MAX_TOTAL_CSV_BYTES,
                writer: Mutex::new(()),
            }),
        })
    }

    /// The CSV the current versions hold together, but for table `except`'s.
    fn total_bytes(&self, except: Option<&str>) -> usize {
        self.list()
            .iter()
            .filter(|t| Some(t.name.as_str()) != except && t.derived_from.is_none())
            .map(|t| t.csv.len())
            .sum()
    }

    /// The current version of table `name` (names are case-insensitive).
    pub fn get(&self, name: &str) -> Option<Arc<TableVersion>> {
        let tables = self.inner.tables.read().ok()?;
        tables.get(&name.to_ascii_lowercase()).cloned()
    }

    /// The current version of every table, by name.
    pub fn list(&self) -> Vec<Arc<TableVersion>> {
        match self.inner.tables.read() {
            Ok(tables) => tables.values().cloned().collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Version `version` of table `name`, as the current one or as kept in the reference
    /// directory (the built-in text for version 1 of a city table), read with the table's
    /// columns; `None` when it is no longer kept (or the table is derived or gone).
    pub fn kept_version(&self, name: &str, version: u64) -> Option<Arc<TableVersion>> {
        let current = self.get(name)?;
        if current.version == version {
            return Some(current);
        }
        if current.derived_from.is_some() {
            return None;
        }
        let kept = self.inner.dir.as_ref().and_then(|dir| {
            std::fs::read_to_string(dir.join(name).join(format!("v{version}.csv"))).ok()
        });
        let text = match (kept, version, embedded_text(name)) {
            (Some(text), _, _) => text,
            (None, 1, Some(built_in)) => built_in.to_string(),
            _ => return None,
        };
        let text = without_bom(&text).to_string();
        let batches = read(name, &text, current.schema.clone()).ok()?;
        Some(Arc::new(TableVersion::new(
            current.name.clone(),
            version,
            current.schema.clone(),
            batches,
            text,
            None,
            0,
        )))
    }

    /// The city's reference data (wards, segments, cameras, …) as the tables hold it now.
    pub fn city(&self) -> Result<ReferenceData> {
        ReferenceData::from_csv(&|file| {
            self.get(table_name(file))
                .map(|t| t.csv.to_string())
                .ok_or_else(|| Error::Reference {
                    file: file.into(),
                    message: "missing".into(),
                })
        })
    }

    /// A counter that changes whenever a table gets a new version.
    pub fn generation(&self) -> Arc<AtomicU64> {
        self.inner.generation.clone()
    }

    /// The directory new versions are kept in, if any.
    pub fn dir(&self) -> Option<&Path> {
        self.inner.dir.as_deref()
    }

    /// Installs `csv` as the next version of table `name`, or as the first version of a new
    /// table (its columns and types read off the CSV). A replacement keeps the table's
    /// header and column types; the city's tables are checked row by row and against each
    /// other. The version is written to the reference directory before it is installed.
    pub fn replace(&self, name: &str, csv: &str) -> Result<Arc<TableVersion>> {
        let csv = without_bom(csv);
        let name = name.to_ascii_lowercase();
        let bad = |message: String| Error::Reference {
            file: name.clone(),
            message,
        };
        if !valid_name(&name) {
            return Err(bad(
                "a table name is letters, digits and '_', starting with a letter".into(),
            ));
        }
        if name == DERIVED.0 {
            return Err(bad(format!(
                "{} is computed from {}: replace {} instead",
                DERIVED.0, DERIVED.1, DERIVED.1
            )));
        }
        if csv.len() > MAX_CSV_BYTES {
            return Err(bad(format!(
                "{} bytes of CSV, more than the {MAX_CSV_BYTES} a reference table may hold",
                csv.len()
            )));
        }
        let _writer = self
            .inner
            .writer
            .lock()
            .map_err(|_| bad("a replacement failed midway; restart the process".into()))?;
        let others = self.total_bytes(Some(&name));
        if others + csv.len() > self.inner.max_total_bytes {
            return Err(bad(format!(
                "{} bytes of CSV, while the other reference tables hold {others} of the \
                 {} all of them may hold together (reference.max_total_bytes; their rows are \
                 held in memory): remove a table added at run time, or replace one by a \
                 smaller version, first",
                csv.len(),
                self.inner.max_total_bytes
            )));
        }
        let current = self.get(&name);
        let (schema, batches) = match &current {
            Some(current) => (
                current.schema.clone(),
                read(&name, csv, current.schema.clone())?,
            ),
            None => {
                if self.list().len() >= MAX_TABLES {
                    return Err(bad(format!(
                        "{MAX_TABLES} reference tables are held, the most: replace one of them \
                         instead"
                    )));
                }
                // Counted before the types are read: reading 300 000 columns took seconds.
                let columns = csv::Reader::from_reader(csv.as_bytes())
                    .headers()
                    .map(|h| h.len())
                    .unwrap_or(0);
                if columns > MAX_COLUMNS {
                    return Err(bad(format!(
                        "{columns} columns, more than the {MAX_COLUMNS} a reference table may have"
                    )));
                }
                let (schema, batches) = infer(&name, csv)?;
                new_columns(&schema, &batches).map_err(bad)?;
                (schema, batches)
            }
        };
        if batches.iter().all(|b| b.num_rows() == 0) && current.is_some() {
            return Err(bad(
                "the CSV has no rows: a reference table is replaced whole, not emptied".into(),
            ));
        }
        let city = if embedded_text(&name).is_some() {
            Some(ReferenceData::from_csv(&|file| {
                let table = table_name(file);
                if table == name {
                    return Ok(csv.to_string());
                }
                self.get(table)
                    .map(|t| t.csv.to_string())
                    .ok_or_else(|| bad(format!("{table} is missing")))
            })?)
        } else {
            None
        };
        let version = current.as_ref().map_or(1, |c| c.version + 1);
        let installed_ms = now_ms();
        // Everything that can fail comes before the version is written.
        let derived = match (&city, name == DERIVED.1) {
            (Some(city), true) => {
                let mut derived = derive_ward_sensors(city, version)?;
                derived.installed_ms = installed_ms;
                Some(Arc::new(derived))
            }
            _ => None,
        };
        if let Some(dir) = &self.inner.dir {
            let table_dir = dir.join(&name);
            crate::files::write_atomically(
                &table_dir.join(format!("v{version}.csv")),
                csv.as_bytes(),
            )?;
            // Version 1 stays: a table added at run time takes its columns' types from it.
            if version > KEPT_VERSIONS && version - KEPT_VERSIONS > 1 {
                let old = table_dir.join(format!("v{}.csv", version - KEPT_VERSIONS));
                let _ = std::fs::remove_file(old);
            }
        }
        let installed = Arc::new(TableVersion::new(
            name.clone(),
            version,
            schema,
            batches,
            csv.to_string(),
            None,
            installed_ms,
        ));
        {
            let mut tables = self
                .inner
                .tables
                .write()
                .map_err(|_| bad("the tables' lock is poisoned".into()))?;
            tables.insert(name, installed.clone());
            if let Some(derived) = derived {
                tables.insert(derived.name.clone(), derived);
            }
        }
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        Ok(installed)
    }

    /// Removes table `name`, added at run time, with the versions kept of it; queries that
    /// still read it must be stopped first (the caller's to check). The city's tables are
    /// replaced, never removed.
    pub fn remove(&self, name: &str) -> Result<Arc<TableVersion>> {
        let name = name.to_ascii_lowercase();
        let bad = |message: String| Error::Reference {
            file: name.clone(),
            message,
        };
        if name == DERIVED.0 || embedded_text(&name).is_some() {
            return Err(bad(format!(
                "{name} is one of the city's tables, which are replaced, never removed \
                 (`urbanstream table replace {name} --file …`)"
            )));
        }
        let _writer = self
            .inner
            .writer
            .lock()
            .map_err(|_| bad("a replacement failed midway; restart the process".into()))?;
        let Some(current) = self.get(&name) else {
            return Err(bad("no such reference table".into()));
        };
        if let Some(dir) = &self.inner.dir {
            // Moved aside in one step, so that a removal cut short leaves the table whole or
            // gone (a name starting with '.' is no table's, and is cleared at the next start).
            let aside = dir.join(format!(".{name}.removed-{}", std::process::id()));
            match std::fs::rename(dir.join(&name), &aside) {
                Ok(()) => {
                    // Moved aside, the table is gone at the next start whatever follows: it
                    // goes from memory too, even if the directory cannot be synced.
                    if let Err(e) = crate::files::sync_dir(dir) {
                        tracing::warn!(table = %name, error = %e, "removal not synced to disk");
                    }
                    let _ = std::fs::remove_dir_all(&aside);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.inner
            .tables
            .write()
            .map_err(|_| bad("the tables' lock is poisoned".into()))?
            .remove(&name);
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        Ok(current)
    }
}

impl TableVersion {
    fn new(
        name: String,
        version: u64,
        schema: SchemaRef,
        batches: Vec<RecordBatch>,
        csv: String,
        derived_from: Option<&'static str>,
        installed_ms: i64,
    ) -> Self {
        let rows = batches.iter().map(RecordBatch::num_rows).sum();
        Self {
            name,
            version,
            schema,
            batches,
            rows,
            csv: csv.into(),
            derived_from,
            installed_ms,
            ids: Default::default(),
        }
    }

    /// The values of the first column (the id: `sensor_id`, `camera_id`, …) as text.
    pub fn ids(&self) -> &std::collections::HashSet<String> {
        self.ids.get_or_init(|| {
            let mut ids = std::collections::HashSet::with_capacity(self.rows);
            for b in &self.batches {
                let Some(column) = b.columns().first() else {
                    continue;
                };
                let Ok(text) = datafusion::arrow::compute::cast(
                    column,
                    &datafusion::arrow::datatypes::DataType::Utf8,
                ) else {
                    continue;
                };
                let text = datafusion::arrow::array::AsArray::as_string::<i32>(&text);
                ids.extend(text.iter().flatten().map(str::to_string));
            }
            ids
        })
    }
}

/// `csv` without a byte-order mark (spreadsheets write one before "CSV UTF-8").
fn without_bom(csv: &str) -> &str {
    csv.strip_prefix('\u{feff}').unwrap_or(csv)
}

/// `wards.csv` → `wards`.
fn table_name(file: &str) -> &str {
    file.trim_end_matches(".csv")
}

fn embedded_text(name: &str) -> Option<&'static str> {
    EMBEDDED
        .iter()
        .find(|(file, _)| table_name(file) == name)
        .map(|(_, text)| *text)
}

fn valid_name(name: &str) -> bool {
    name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The newest `v<N>.csv` of every table directory under `dir` (none when `dir` is absent):
/// its version, text and when it was written (epoch ms).
fn newest_versions(dir: &Path) -> Result<BTreeMap<String, (u64, String, i64)>> {
    let mut out = BTreeMap::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e.into()),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !entry.file_type()?.is_dir() || !valid_name(&name) {
            // A table's versions moved aside by a removal cut short (see `remove`).
            if name.starts_with('.') && name.contains(".removed-") {
                let _ = std::fs::remove_dir_all(entry.path());
            }
            continue;
        }
        let mut newest: Option<(u64, PathBuf)> = None;
        for file in std::fs::read_dir(entry.path())? {
            let file = file?.path();
            // A write cut short (`.v<N>.csv.tmp-<pid>`) left nothing installed: remove it.
            if file
                .file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.starts_with('.') && f.contains(".csv.tmp-"))
            {
                let _ = std::fs::remove_file(&file);
                continue;
            }
            let version = file.file_name().and_then(|f| f.to_str()).and_then(|f| {
                f.strip_prefix('v')?
                    .strip_suffix(".csv")?
                    .parse::<u64>()
                    .ok()
            });
            if let Some(v) = version
                && newest.as_ref().is_none_or(|(n, _)| v > *n)
            {
                newest = Some((v, file));
            }
        }
        if let Some((version, path)) = newest {
            let text = std::fs::read_to_string(&path).map_err(|e| Error::Reference {
                file: path.display().to_string(),
                message: e.to_string(),
            })?;
            let written_ms = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(0));
            out.insert(name, (version, without_bom(&text).to_string(), written_ms));
        }
    }
    Ok(out)
}

/// The rows of `csv`, whose header must name `schema`'s columns in order.
pub(super) fn read(name: &str, csv: &str, schema: SchemaRef) -> Result<Vec<RecordBatch>> {
    let bad = |message: String| Error::Reference {
        file: name.into(),
        message,
    };
    let expected: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    let header = csv::Reader::from_reader(csv.as_bytes())
        .headers()
        .map_err(|e| bad(format!("the header: {e}")))?
        .clone();
    let got: Vec<&str> = header.iter().map(str::trim).collect();
    if got != expected {
        return Err(bad(format!(
            "the header must be `{}` (got `{}`)",
            expected.join(","),
            got.join(",")
        )));
    }
    let reader = ReaderBuilder::new(schema.clone())
        .with_header(true)
        .build(csv.as_bytes())
        .map_err(|e| bad(e.to_string()))?;
    reader.collect::<Result<Vec<_>, _>>().map_err(|e| {
        // Arrow names the column by its index: name it.
        let message = e.to_string();
        let column = message
            .split("for column ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<usize>().ok())
            .and_then(|n| schema.fields().get(n));
        match column {
            Some(f) => bad(format!(
                "column {} ({}): {message}",
                f.name(),
                f.data_type()
            )),
            None => bad(message),
        }
    })
}

/// The columns (types inferred from the values) and rows of `csv`.
fn infer(name: &str, csv: &str) -> Result<(SchemaRef, Vec<RecordBatch>)> {
    let schema = infer_schema(name, csv)?;
    let batches = read(name, csv, schema.clone())?;
    Ok((schema, batches))
}

/// The columns of `csv`, types inferred from the values.
fn infer_schema(name: &str, csv: &str) -> Result<SchemaRef> {
    let (schema, _) = Format::default()
        .with_header(true)
        .infer_schema(csv.as_bytes(), None)
        .map_err(|e| Error::Reference {
            file: name.into(),
            message: e.to_string(),
        })?;
    if schema.fields().is_empty() {
        return Err(Error::Reference {
            file: name.into(),
            message: "the CSV has no header row".into(),
        });
    }
    Ok(codes_as_text(csv, at_least_milliseconds(schema)))
}

/// `schema` with timestamps read to the second (a first version's times all whole seconds)
/// read to the millisecond, the engine's resolution: the type is kept for every later
/// version, whose `…00.750Z` lost its 750 ms.
fn at_least_milliseconds(schema: Schema) -> Schema {
    use datafusion::arrow::datatypes::TimeUnit;
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            DataType::Timestamp(TimeUnit::Second, zone) => f
                .as_ref()
                .clone()
                .with_data_type(DataType::Timestamp(TimeUnit::Millisecond, zone.clone())),
            _ => f.as_ref().clone(),
        })
        .collect();
    Schema::new(fields)
}

/// Which columns of `schema` (the columns of the CSV `reader` reads, types guessed) were
/// guessed numbers but hold a code written with leading zeros or a sign (`007`, `0101`,
/// `+84`): read as numbers, `007` and `7` would be one value, and `0101` would lose its zero.
pub(crate) fn coded_columns(reader: impl std::io::Read, schema: &Schema) -> Vec<bool> {
    let numeric: Vec<usize> = (0..schema.fields().len())
        .filter(|&i| schema.field(i).data_type().is_numeric())
        .collect();
    let mut coded = vec![false; schema.fields().len()];
    if numeric.is_empty() {
        return coded;
    }
    let mut reader = csv::Reader::from_reader(reader);
    for record in reader.records().flatten() {
        for &i in &numeric {
            let value = record.get(i).unwrap_or("").trim();
            let digits = value.strip_prefix('-').unwrap_or(value).as_bytes();
            if value.starts_with('+')
                || (digits.len() > 1 && digits[0] == b'0' && digits[1].is_ascii_digit())
            {
                coded[i] = true;
            }
        }
    }
    coded
}

/// `schema` with every column read as a number that holds a code written with leading
/// zeros or a sign (`007`, `0101`, `+84`) read as text instead: as a number, `007` and `7`
/// would be one key, and a stream's codes would be cast to numbers to meet them (a code
/// that is no number failing the query).
fn codes_as_text(csv: &str, schema: Schema) -> SchemaRef {
    let coded = coded_columns(csv.as_bytes(), &schema);
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .zip(coded)
        .map(|(f, coded)| match coded {
            true => f.as_ref().clone().with_data_type(DataType::Utf8),
            false => f.as_ref().clone(),
        })
        .collect();
    Arc::new(Schema::new(fields))
}

/// Why the columns a new table's first version gives cannot be its columns, if they cannot:
/// they are kept for every later version, so each must have a name of its own and a type
/// read from a value (a header alone, or a column empty in every row, gave a column of type
/// Null that no later version could fill).
fn new_columns(schema: &SchemaRef, batches: &[RecordBatch]) -> std::result::Result<(), String> {
    if batches.iter().all(|b| b.num_rows() == 0) {
        return Err(
            "the CSV has no rows: a new table's column types are read from its rows".into(),
        );
    }
    let mut seen = std::collections::HashSet::new();
    for field in schema.fields() {
        let name = field.name();
        if name.trim().is_empty() {
            return Err("a column of the header has no name".into());
        }
        if !seen.insert(name.to_lowercase()) {
            return Err(format!("column {name} appears twice in the header"));
        }
        if field.data_type() == &datafusion::arrow::datatypes::DataType::Null {
            return Err(format!(
                "column {name} is empty in every row, so its type cannot be read: give it a \
                 value in at least one row"
            ));
        }
    }
    Ok(())
}

fn derive_ward_sensors(city: &ReferenceData, version: u64) -> Result<TableVersion> {
    let mut wards: BTreeMap<&str, (u32, f64)> = BTreeMap::new();
    for s in &city.sensors {
        let w = wards.entry(s.ward_id.as_str()).or_default();
        w.0 += 1;
        w.1 += 3600.0 / f64::from(s.interval_s.max(1));
    }
    // Through a CSV writer: a ward id may hold a comma or a quote.
    let mut writer = csv::Writer::from_writer(Vec::new());
    let failed = |e: csv::Error| Error::Reference {
        file: DERIVED.0.into(),
        message: e.to_string(),
    };
    writer
        .write_record(["ward_id", "sensors", "expected_per_hour"])
        .map_err(failed)?;
    for (ward, (n, expected)) in wards {
        writer
            .write_record([ward.to_string(), n.to_string(), format!("{expected:.6}")])
            .map_err(failed)?;
    }
    let csv = String::from_utf8(writer.into_inner().map_err(|e| Error::Reference {
        file: DERIVED.0.into(),
        message: e.to_string(),
    })?)
    .map_err(|e| Error::Reference {
        file: DERIVED.0.into(),
        message: e.to_string(),
    })?;
    // Fixed types, whatever the values look like (a whole number of expected readings).
    let schema = Arc::new(datafusion::arrow::datatypes::Schema::new(vec![
        datafusion::arrow::datatypes::Field::new(
            "ward_id",
            datafusion::arrow::datatypes::DataType::Utf8,
            true,
        ),
        datafusion::arrow::datatypes::Field::new(
            "sensors",
            datafusion::arrow::datatypes::DataType::Int64,
            true,
        ),
        datafusion::arrow::datatypes::Field::new(
            "expected_per_hour",
            datafusion::arrow::datatypes::DataType::Float64,
            true,
        ),
    ]));
    let batches = read(DERIVED.0, &csv, schema.clone())?;
    Ok(TableVersion::new(
        DERIVED.0.into(),
        version,
        schema,
        batches,
        csv,
        Some(DERIVED.1),
        0,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{AsArray, Float64Array};

    fn expected_per_hour(tables: &ReferenceTables, ward: &str) -> Option<f64> {
        let t = tables.get("ward_sensors")?;
        for b in &t.batches {
            let ids = b.column(0).as_string::<i32>();
            let expected = b.column(2).as_any().downcast_ref::<Float64Array>()?;
            for i in 0..b.num_rows() {
                if ids.value(i) == ward {
                    return Some(expected.value(i));
                }
            }
        }
        None
    }

    /// A new table's first version fixes its columns for good: a header alone (a column of
    /// type Null that later rows were read into as nulls), a column empty in every row, a
    /// nameless or repeated column (a join over the table then failed) are refused; and the
    /// tables held are bounded.
    #[test]
    fn a_new_tables_columns_are_named_and_typed_by_its_first_version() -> Result<()> {
        let tables = ReferenceTables::embedded()?;
        let wide = format!(
            "{}\n{}\n",
            (0..1025)
                .map(|i| format!("c{i}"))
                .collect::<Vec<_>>()
                .join(","),
            vec!["1"; 1025].join(",")
        );
        for (csv, reason) in [
            ("a\n", "no rows"),
            ("a,b\n1,\n2,\n", "column b is empty in every row"),
            (",b\n1,2\n", "has no name"),
            ("a,A\n1,2\n", "column A appears twice"),
            (&wide, "1025 columns, more than the 1024"),
        ] {
            let e = tables.replace("lots", csv).expect_err(reason).to_string();
            assert!(e.contains(reason), "{reason}: {e}");
            assert!(tables.get("lots").is_none());
        }
        // Codes written with leading zeros or a sign are text: 007 is not 7.
        let codes = tables.replace("codes", "code,n,phone\n007,1,+84\n7,2,+1\n0101,-03,12\n")?;
        let types: Vec<String> = codes
            .schema
            .fields()
            .iter()
            .map(|f| f.data_type().to_string())
            .collect();
        assert_eq!(types, ["Utf8", "Utf8", "Utf8"]);
        let values = codes.batches[0].column(0).as_string::<i32>();
        assert_eq!((values.value(0), values.value(1)), ("007", "7"));
        let plain = tables.replace("plain", "code,x\n7,0.5\n10,-0.25\n0,3\n")?;
        assert_eq!(plain.schema.field(0).data_type(), &DataType::Int64);
        assert_eq!(plain.schema.field(1).data_type(), &DataType::Float64);
        let v1 = tables.replace("lots", "a,b\n1,x\n")?;
        assert_eq!((v1.version, v1.rows), (1, 1));
        let held = tables.list().len();
        for i in held..MAX_TABLES {
            tables.replace(&format!("extra_{i}"), "a\n1\n")?;
        }
        let e = tables
            .replace("one_too_many", "a\n1\n")
            .expect_err("cap")
            .to_string();
        assert!(e.contains("64 reference tables are held"), "{e}");
        // Replacing one of them is still fine.
        assert_eq!(tables.replace("lots", "a,b\n2,y\n")?.version, 2);
        Ok(())
    }

    #[test]
    fn the_tables_together_hold_at_most_the_configured_csv() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let built_in = ReferenceTables::open(dir.path())?.total_bytes(None);
        let limit = built_in + 1_000;
        let tables = ReferenceTables::open_limited(dir.path(), limit)?;
        let rows = |n: usize| {
            let mut csv = String::from("id,v\n");
            for i in 0..n {
                csv.push_str(&format!("{i:04},{i}\n"));
            }
            csv
        };
        // 587 + 291 bytes fit beside the city's tables, and 155 more do not.
        assert_eq!(tables.replace("a", &rows(74))?.csv.len(), 587);
        assert_eq!(tables.replace("b", &rows(37))?.csv.len(), 291);
        let e = tables
            .replace("c", &rows(20))
            .expect_err("over")
            .to_string();
        assert!(
            e.contains("reference.max_total_bytes") && e.contains(&limit.to_string()),
            "{e}"
        );
        assert!(tables.get("c").is_none());
        // A table's own current version does not count against its replacement: a grows into
        // the room it left, then no further.
        assert_eq!(tables.replace("a", &rows(80))?.version, 2);
        let e = tables
            .replace("a", &rows(150))
            .expect_err("over")
            .to_string();
        assert!(
            e.contains("bytes of CSV, while the other reference tables hold"),
            "{e}"
        );
        assert_eq!(tables.get("a").map(|t| t.rows), Some(80));
        // Removing a table makes room again.
        tables.remove("b")?;
        assert_eq!(tables.replace("c", &rows(20))?.csv.len(), 155);
        // Lowered below what is kept, the tables still load (with a warning), and only a
        // smaller version is taken.
        let lowered = ReferenceTables::open_limited(dir.path(), built_in + 500)?;
        assert_eq!(lowered.get("a").map(|t| t.rows), Some(80));
        lowered.replace("a", &rows(80)).expect_err("still over");
        lowered.replace("a", &rows(40))?;
        Ok(())
    }

    /// A table whose first version's times were whole seconds was typed to the second, and
    /// a later version's `00:00:00.750Z` lost its 750 ms, silently.
    #[test]
    fn times_keep_their_milliseconds_whatever_the_first_version_held() -> Result<()> {
        use datafusion::arrow::array::AsArray;
        use datafusion::arrow::datatypes::{TimeUnit, TimestampMillisecondType};
        let dir = tempfile::tempdir()?;
        let tables = ReferenceTables::open(dir.path())?;
        tables.replace("closures", "id,until\nx,2026-01-01T00:00:00Z\n")?;
        let v2 = tables.replace("closures", "id,until\nx,2026-01-01T00:00:00.750Z\n")?;
        assert!(matches!(
            v2.schema.field(1).data_type(),
            DataType::Timestamp(TimeUnit::Millisecond, _)
        ));
        let until = v2.batches[0]
            .column(1)
            .as_primitive::<TimestampMillisecondType>()
            .value(0);
        assert_eq!(until, 1_767_225_600_750);
        Ok(())
    }

    #[test]
    fn a_new_version_is_checked_kept_and_survives_a_restart() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let tables = ReferenceTables::open(dir.path())?;
        let built_in = tables.get("sensors").expect("sensors");
        assert_eq!(built_in.version, 1);
        let header = "sensor_id,ward_id,kind,lat,lon,interval_s";
        let before = tables.generation().load(Ordering::Acquire);

        // Refused, each with the reason, and nothing changes.
        for (csv, reason) in [
            ("station,ward\nx,y\n".to_string(), "header must be"),
            (
                format!("{header}\nst-1,nowhere,station,21.0,105.8,3600\n"),
                "unknown ward",
            ),
            (
                format!("{header}\nst-1,ba_dinh,station,21.0,105.8,0\n"),
                "interval_s is 0",
            ),
            (
                format!(
                    "{header}\nst-1,ba_dinh,station,21.0,105.8,3600\nst-1,ba_dinh,station,21.0,105.8,3600\n"
                ),
                "appears twice",
            ),
            (
                format!("{header}\nst-1,ba_dinh,station,north,105.8,3600\n"),
                "lat",
            ),
            (format!("{header}\n"), "no rows"),
        ] {
            let e = tables
                .replace("sensors", &csv)
                .expect_err(reason)
                .to_string();
            assert!(e.contains(reason), "{reason}: {e}");
        }
        assert!(tables.replace("ward_sensors", "ward_id\nx\n").is_err());
        assert_eq!(tables.generation().load(Ordering::Acquire), before);
        assert_eq!(tables.get("sensors").map(|t| t.version), Some(1));

        // Two hourly stations in one ward.
        let csv = format!(
            "{header}\nst-1,ba_dinh,station,21.03,105.81,3600\nst-2,ba_dinh,station,21.04,105.82,3600\n"
        );
        let v2 = tables.replace("sensors", &csv)?;
        assert_eq!((v2.version, v2.rows), (2, 2));
        assert_ne!(tables.generation().load(Ordering::Acquire), before);
        assert_eq!(expected_per_hour(&tables, "ba_dinh"), Some(2.0));
        assert_eq!(expected_per_hour(&tables, "hoan_kiem"), None);
        assert!(dir.path().join("sensors").join("v2.csv").exists());

        // A table of the analyst's own.
        let pairs = tables.replace("camera_pairs", "first,second,metres\ncam-1,cam-2,850\n")?;
        assert_eq!((pairs.version, pairs.rows), (1, 1));

        // What a new process over the same directory reads; a write cut short is removed.
        let torn = dir.path().join("sensors").join(".v3.csv.tmp-12345");
        std::fs::write(&torn, "sensor_id,ward_id\nhalf")?;
        let reopened = ReferenceTables::open(dir.path())?;
        assert!(!torn.exists());
        assert_eq!(reopened.get("sensors").map(|t| t.version), Some(2));
        assert_eq!(expected_per_hour(&reopened, "ba_dinh"), Some(2.0));
        assert_eq!(reopened.get("camera_pairs").map(|t| t.rows), Some(1));
        assert_eq!(reopened.get("wards").map(|t| t.version), Some(1));
        Ok(())
    }

    #[test]
    fn parking_lots_and_gauges_are_checked_against_wards_and_segments() -> Result<()> {
        let tables = ReferenceTables::embedded()?;
        let lots = "lot_id,name,kind,area,ward_id,capacity,lat,lon";
        let gauges =
            "gauge_id,name,kind,ward_id,segment_id,lat,lon,level_1_cm,level_2_cm,level_3_cm";
        for (table, csv, reason) in [
            (
                "parking_lots",
                format!("{lots}\npk-1,A,lot,office,nowhere,100,21.0,105.8\n"),
                "pk-1: unknown ward nowhere",
            ),
            (
                "parking_lots",
                format!("{lots}\npk-1,A,lot,office,ba_dinh,0,21.0,105.8\n"),
                "capacity is 0",
            ),
            (
                "gauges",
                format!("{gauges}\nwl-1,G,gauge,ba_dinh,no_such_road,21.0,105.8,10,20,30\n"),
                "unknown segment no_such_road",
            ),
            (
                "gauges",
                format!("{gauges}\nwl-1,G,gauge,ba_dinh,,21.0,105.8,10,30,20\n"),
                "do not rise",
            ),
        ] {
            let e = tables.replace(table, &csv).expect_err(reason).to_string();
            assert!(e.contains(reason), "{reason}: {e}");
        }
        // The river gauge watches no road.
        let river = tables.replace(
            "gauges",
            &format!("{gauges}\nwl-1,River,gauge,ba_dinh,,21.0,105.8,900,950,1000\n"),
        )?;
        assert_eq!((river.version, river.rows), (2, 1));
        Ok(())
    }
}
