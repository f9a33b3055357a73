//! A reference table as a changelog: the rows of a compacted Kafka topic folded into the
//! table's next version.
//!
//! The topic holds the whole table, one record per row, keyed by the row's id (the table's
//! first column: `sensor_id`, `camera_id`, …). A record's value is a JSON object of the
//! table's columns (absent columns and `null` are empty cells); the last record of a key wins,
//! and a record without a value (a tombstone) deletes the key's row. That is what a compacted
//! topic keeps, so reading the topic from its start gives the table whatever compaction has
//! done to it.
//!
//! Each record is checked on its own as it is applied (a JSON object, only the table's
//! columns, each cell of its column's type, a city table's required cells present, the key
//! equal to the id); a record that fails is refused with the reason and changes nothing. Checks across rows (ids unique, a sensor's
//! ward exists) are the table's own, made when the folded rows are installed.

use std::collections::BTreeMap;

use datafusion::arrow::datatypes::SchemaRef;

use super::tables::{MAX_CSV_BYTES, read};

/// The rows of a table folded from its changelog, by id.
#[derive(Debug, Clone)]
pub struct Changelog {
    name: String,
    schema: SchemaRef,
    /// Each row's cells as CSV text, in the schema's column order, by id.
    rows: BTreeMap<String, Vec<String>>,
    /// Bytes of the cells held (a bound on the memory a topic's records can take).
    bytes: usize,
}

/// What applying a record did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A row was added or replaced.
    Upsert,
    /// A row was deleted (a tombstone of an id the table had).
    Delete,
    /// Nothing: a tombstone of an id the table does not have, or a row equal to the one held.
    None,
}

impl Changelog {
    /// An empty changelog of table `name` with these columns.
    pub fn new(name: &str, schema: SchemaRef) -> Self {
        Self {
            name: name.to_string(),
            schema,
            rows: BTreeMap::new(),
            bytes: 0,
        }
    }

    /// Number of rows held.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether no rows are held.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Applies one record: `value` `None` (or empty) is a tombstone of `key`. Refused with the
    /// reason when the record does not fit the table; a refused record changes nothing.
    pub fn apply(&mut self, key: Option<&[u8]>, value: Option<&[u8]>) -> Result<Change, String> {
        let id_column = self
            .schema
            .fields()
            .first()
            .map(|f| f.name().clone())
            .unwrap_or_default();
        let key = match key {
            Some(k) => Some(
                std::str::from_utf8(k)
                    .map_err(|_| "the key is not UTF-8 text".to_string())?
                    .to_string(),
            ),
            None => None,
        };
        let value = value.filter(|v| !v.is_empty());
        let Some(value) = value else {
            let key = key.filter(|k| !k.is_empty()).ok_or_else(|| {
                format!("a tombstone needs a key: the {id_column} of the row to delete")
            })?;
            return Ok(match self.rows.remove(&key) {
                Some(old) => {
                    self.bytes -= row_bytes(&old);
                    Change::Delete
                }
                None => Change::None,
            });
        };
        let object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(value)
            .map_err(|e| {
                format!(
                    "a row of {} is a JSON object of its columns ({}): {e}",
                    self.name,
                    self.columns().join(", ")
                )
            })?;
        if let Some(unknown) = object
            .keys()
            .find(|k| self.schema.field_with_name(k).is_err())
        {
            return Err(format!(
                "{} has no column {unknown:?}; its columns are {}",
                self.name,
                self.columns().join(", ")
            ));
        }
        let mut cells = Vec::with_capacity(self.schema.fields().len());
        for field in self.schema.fields() {
            let cell = match object.get(field.name()) {
                None | Some(serde_json::Value::Null) => String::new(),
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Number(n)) => n.to_string(),
                Some(serde_json::Value::Bool(b)) => b.to_string(),
                Some(other) => {
                    return Err(format!("column {} is a value, not {other}", field.name()));
                }
            };
            cells.push(cell);
        }
        let id = cells.first().cloned().unwrap_or_default();
        if id.trim().is_empty() {
            return Err(format!("the row has no {id_column}"));
        }
        // Compaction keeps the last record of each key: a row keyed otherwise than by its id
        // (or not at all) would outlive its tombstone or vanish.
        match &key {
            Some(key) if *key == id => {}
            Some(key) => {
                return Err(format!(
                    "the key {key:?} is not the row's {id_column} {id:?}: a row is keyed by its \
                     id, so that compaction keeps its last version"
                ));
            }
            None => {
                return Err(format!(
                    "the row has no key: key it by its {id_column} ({id:?}), so that compaction \
                     keeps its last version"
                ));
            }
        }
        let replaced = self.rows.get(&id).map_or(0, |old| row_bytes(old));
        let bytes = self.bytes - replaced + row_bytes(&cells);
        if bytes > MAX_CSV_BYTES {
            return Err(format!(
                "{} would hold more than the {MAX_CSV_BYTES} bytes a reference table may hold",
                self.name
            ));
        }
        // The row's cells against the columns' types, on their own.
        let one = self.csv_of([&cells].into_iter());
        read(&self.name, &one, self.schema.clone()).map_err(|e| match e {
            crate::Error::Reference { message, .. } => message,
            other => other.to_string(),
        })?;
        // A city table's row as its row type (its required cells), so that no row the table
        // would refuse whole is held: the rows after it would wait for it.
        super::ReferenceData::check_rows(&format!("{}.csv", self.name), &one)?;
        self.bytes = bytes;
        Ok(match self.rows.insert(id, cells.clone()) {
            Some(previous) if previous == cells => Change::None,
            _ => Change::Upsert,
        })
    }

    /// The rows held as the table's CSV (header first, rows by id).
    pub fn csv(&self) -> String {
        self.csv_of(self.rows.values())
    }

    fn columns(&self) -> Vec<&str> {
        self.schema
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect()
    }

    fn csv_of<'a>(&self, rows: impl Iterator<Item = &'a Vec<String>>) -> String {
        let mut writer = csv::Writer::from_writer(Vec::new());
        // Writing to memory cannot fail.
        let _ = writer.write_record(self.columns());
        for row in rows {
            let _ = writer.write_record(row);
        }
        writer
            .into_inner()
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }
}

/// Bytes a row's cells take in CSV (its separators and line end included).
fn row_bytes(cells: &[String]) -> usize {
    cells.iter().map(|c| c.len() + 1).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::ReferenceTables;

    fn sensors() -> Changelog {
        let tables = ReferenceTables::embedded().expect("tables");
        let sensors = tables.get("sensors").expect("sensors");
        Changelog::new("sensors", sensors.schema.clone())
    }

    const STATION: &str = r#"{"sensor_id":"st1","ward_id":"hoan_kiem","kind":"station","lat":21.03,"lon":105.85,"interval_s":3600}"#;

    #[test]
    fn the_last_record_of_a_key_wins_and_a_tombstone_deletes() {
        let mut log = sensors();
        assert_eq!(
            log.apply(Some(b"st1"), Some(STATION.as_bytes())),
            Ok(Change::Upsert)
        );
        assert_eq!(
            log.apply(Some(b"st1"), Some(STATION.as_bytes())),
            Ok(Change::None)
        );
        let moved = STATION.replace("hoan_kiem", "lang");
        assert_eq!(
            log.apply(Some(b"st1"), Some(moved.as_bytes())),
            Ok(Change::Upsert)
        );
        let other = STATION.replace("st1", "st2");
        assert_eq!(
            log.apply(Some(b"st2"), Some(other.as_bytes())),
            Ok(Change::Upsert)
        );
        assert_eq!(log.len(), 2);
        let csv = log.csv();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines[0], "sensor_id,ward_id,kind,lat,lon,interval_s");
        assert_eq!(lines[1], "st1,lang,station,21.03,105.85,3600");
        assert_eq!(lines[2], "st2,hoan_kiem,station,21.03,105.85,3600");
        assert_eq!(log.apply(Some(b"st1"), None), Ok(Change::Delete));
        assert_eq!(log.apply(Some(b"st1"), Some(b"")), Ok(Change::None));
        assert_eq!(log.len(), 1);
    }

    #[test]
    fn a_record_that_does_not_fit_the_table_is_refused_with_the_reason() {
        let mut log = sensors();
        let refused = |log: &mut Changelog, key: Option<&[u8]>, value: &str| {
            log.apply(key, Some(value.as_bytes())).expect_err("refused")
        };
        assert!(refused(&mut log, Some(b"st1"), "not json").contains("JSON object"));
        assert!(refused(&mut log, Some(b"st1"), "[1,2]").contains("JSON object"));
        let unknown = STATION.replace("\"kind\"", "\"colour\"");
        assert!(refused(&mut log, Some(b"st1"), &unknown).contains("no column \"colour\""));
        let bad_type = STATION.replace("21.03", "\"north\"");
        let reason = refused(&mut log, Some(b"st1"), &bad_type);
        assert!(
            reason.contains("lat") && reason.contains("north"),
            "{reason}"
        );
        assert!(refused(&mut log, Some(b"st9"), STATION).contains("not the row's sensor_id"));
        // A cell the city's sensors need, missing: refused on its own, naming the column
        // (it used to be held, and the table then refused every version with it).
        let no_interval = STATION.replace(",\"interval_s\":3600", "");
        let reason = refused(&mut log, Some(b"st1"), &no_interval);
        assert!(reason.contains("column interval_s"), "{reason}");
        // A row no query could use (a place off the globe, no readings between intervals) is
        // refused alone, before the table would refuse it whole and hold the rows after it.
        let off_the_globe = STATION.replace("21.03", "999");
        let reason = refused(&mut log, Some(b"st1"), &off_the_globe);
        assert!(
            reason.contains("st1: lat 999, lon 105.85 is not a place"),
            "{reason}"
        );
        let never = STATION.replace("3600", "0");
        let reason = refused(&mut log, Some(b"st1"), &never);
        assert!(reason.contains("st1: interval_s is 0"), "{reason}");
        let nested = STATION.replace("\"station\"", "{\"a\":1}");
        assert!(refused(&mut log, Some(b"st1"), &nested).contains("column kind"));
        let no_id = STATION.replace("\"st1\"", "null");
        assert!(refused(&mut log, Some(b""), &no_id).contains("no sensor_id"));
        assert!(refused(&mut log, None, STATION).contains("has no key"));
        assert!(refused(&mut log, Some(b"st1 "), STATION).contains("not the row's sensor_id"));
        assert!(
            log.apply(None, None)
                .expect_err("refused")
                .contains("tombstone needs a key")
        );
        assert!(log.is_empty(), "a refused record changes nothing");
    }

    #[test]
    fn the_rows_held_stay_within_a_tables_size() {
        let mut log = sensors();
        let half = "x".repeat(MAX_CSV_BYTES / 2);
        let row = |id: &str| {
            STATION
                .replace("st1", id)
                .replace("\"station\"", &format!("\"{half}\""))
        };
        assert_eq!(
            log.apply(Some(b"a"), Some(row("a").as_bytes())),
            Ok(Change::Upsert)
        );
        // Replacing a row counts only the new one.
        assert!(log.apply(Some(b"a"), Some(row("a").as_bytes())).is_ok());
        let refused = log
            .apply(Some(b"b"), Some(row("b").as_bytes()))
            .expect_err("over the size");
        assert!(refused.contains("more than the"), "{refused}");
        assert_eq!(log.len(), 1);
        // A deletion frees its bytes.
        assert_eq!(log.apply(Some(b"a"), None), Ok(Change::Delete));
        assert!(log.apply(Some(b"b"), Some(row("b").as_bytes())).is_ok());
    }

    #[test]
    fn cells_with_commas_and_quotes_stay_one_cell() {
        let tables = ReferenceTables::embedded().expect("tables");
        let wards = tables.get("wards").expect("wards");
        let mut log = Changelog::new("wards", wards.schema.clone());
        let row = r#"{"ward_id":"w1","name":"Phường \"Mới\", Hà Nội","lat":21.0,"lon":105.8}"#;
        assert_eq!(
            log.apply(Some(b"w1"), Some(row.as_bytes())),
            Ok(Change::Upsert)
        );
        let csv = log.csv();
        let mut reader = csv::Reader::from_reader(csv.as_bytes());
        let record = reader.records().next().expect("a row").expect("csv");
        assert_eq!(&record[1], "Phường \"Mới\", Hà Nội");
    }
}
