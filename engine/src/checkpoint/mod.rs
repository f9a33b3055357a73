//! Checkpoints: a pipeline's state and input positions on disk, for recovery.
//!
//! A checkpoint is a directory `chk-<epoch>` under the pipeline's checkpoint directory:
//!
//! ```text
//! chk-000000000042/
//!   manifest.json          epoch, time, input positions, output marks, per-query scalars
//!   q0.window.panes.arrow  Arrow IPC files: accumulator state, window and key bookkeeping
//!   q0.window.windows.arrow
//!   q1.keyed0.keys.arrow   detector and alert state per key
//! ```
//!
//! It is written into `.chk-<epoch>.tmp`, every file fsynced, the directory fsynced, then
//! renamed into place and the parent fsynced: a reader sees a whole checkpoint or none.
//! Leftover temporary directories (a crash while writing) are removed when the store opens;
//! older checkpoints beyond `retain` are pruned after each write. Recovery reads the newest
//! checkpoint that reads back whole, falling back to older ones.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, RecordBatch};
use datafusion::arrow::datatypes::{Field, Schema};
use datafusion::arrow::ipc::reader::FileReader;
use datafusion::arrow::ipc::writer::FileWriter;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::error::{Error, Result};

/// One operator's state: small scalars as JSON, bulk state as Arrow tables (one batch each).
#[derive(Debug, Clone, Default)]
pub struct StateSnapshot {
    /// Scalars (watermarks, counters, bookkeeping).
    pub meta: serde_json::Value,
    /// Named tables; an absent table is empty.
    pub tables: BTreeMap<String, RecordBatch>,
}

impl StateSnapshot {
    /// Adds the tables and meta of `inner` under `prefix` (`prefix.table`, `meta[prefix]`).
    pub fn nest(&mut self, prefix: &str, inner: StateSnapshot) {
        for (name, table) in inner.tables {
            self.tables.insert(format!("{prefix}.{name}"), table);
        }
        if !self.meta.is_object() {
            self.meta = serde_json::Value::Object(Default::default());
        }
        if let Some(map) = self.meta.as_object_mut() {
            map.insert(prefix.to_string(), inner.meta);
        }
    }

    /// The part nested under `prefix` by [`StateSnapshot::nest`].
    pub fn nested(&self, prefix: &str) -> StateSnapshot {
        let start = format!("{prefix}.");
        StateSnapshot {
            meta: self
                .meta
                .get(prefix)
                .cloned()
                .unwrap_or(serde_json::Value::Null),
            tables: self
                .tables
                .iter()
                .filter_map(|(k, v)| k.strip_prefix(&start).map(|n| (n.to_string(), v.clone())))
                .collect(),
        }
    }

    /// Bytes of the tables' arrays.
    pub fn bytes(&self) -> usize {
        self.tables
            .values()
            .map(RecordBatch::get_array_memory_size)
            .sum()
    }
}

/// A table of `columns`, every field nullable (state columns come in whatever nullability
/// the accumulator gives).
pub fn table(columns: Vec<(String, ArrayRef)>) -> Result<RecordBatch> {
    let fields: Vec<Field> = columns
        .iter()
        .map(|(name, a)| Field::new(name, a.data_type().clone(), true))
        .collect();
    let arrays = columns.into_iter().map(|(_, a)| a).collect();
    Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)?)
}

/// Reads a scalar field of a snapshot's meta.
pub fn meta_field<T: serde::de::DeserializeOwned>(
    meta: &serde_json::Value,
    name: &str,
) -> Result<T> {
    let value = meta
        .get(name)
        .ok_or_else(|| Error::Checkpoint(format!("state is missing '{name}'")))?;
    serde_json::from_value(value.clone())
        .map_err(|e| Error::Checkpoint(format!("state field '{name}': {e}")))
}

/// A (topic, partition, offset) triple of the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset: for inputs, the next one to read; for outputs, the partition's end.
    pub offset: i64,
}

/// What a checkpoint says besides its tables.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version.
    pub version: u32,
    /// Checkpoint number, increasing.
    pub epoch: u64,
    /// When it was taken, epoch ms.
    pub created_at_ms: i64,
    /// Next input offset to read, per partition the pipeline has read.
    pub positions: Vec<Position>,
    /// End offsets of the output partitions when it was taken (exactly-once recovery reads
    /// the outputs written after these).
    pub outputs: Vec<Position>,
    /// Per query: its name, SQL and scalars.
    pub queries: Vec<QueryManifest>,
    /// Files of the checkpoint with their sizes in bytes.
    pub files: Vec<(String, u64)>,
}

/// One query of a [`Manifest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueryManifest {
    /// The query's name.
    pub name: String,
    /// The SQL it was planned from; state is restored only into the same query.
    pub sql: String,
    /// Its scalars.
    pub meta: serde_json::Value,
}

/// Manifest format version.
const VERSION: u32 = 1;

/// A checkpoint read back.
#[derive(Debug)]
pub struct Checkpoint {
    /// Its manifest.
    pub manifest: Manifest,
    /// Per query (in manifest order), its state.
    pub queries: Vec<StateSnapshot>,
    /// Where it is.
    pub path: PathBuf,
}

/// What [`CheckpointStore::write`] did.
#[derive(Debug, Clone, Serialize)]
pub struct Written {
    /// Checkpoint number.
    pub epoch: u64,
    /// Its directory.
    pub path: PathBuf,
    /// Bytes on disk.
    pub bytes: u64,
}

/// The checkpoints of one pipeline, in one directory.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    dir: PathBuf,
    retain: usize,
}

impl CheckpointStore {
    /// Opens (creating) `dir`, keeping the newest `retain` (at least 1) checkpoints, and
    /// removes what a crash while writing left behind.
    pub fn open(dir: impl Into<PathBuf>, retain: usize) -> Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|e| io_error("create", &dir, e))?;
        for entry in fs::read_dir(&dir).map_err(|e| io_error("list", &dir, e))? {
            let entry = entry.map_err(|e| io_error("list", &dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".chk-") && name.ends_with(".tmp") {
                let path = entry.path();
                fs::remove_dir_all(&path).map_err(|e| io_error("remove", &path, e))?;
            }
        }
        Ok(Self {
            dir,
            retain: retain.max(1),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Epochs of the complete checkpoints, newest first.
    pub fn epochs(&self) -> Result<Vec<u64>> {
        let mut out: Vec<u64> = fs::read_dir(&self.dir)
            .map_err(|e| io_error("list", &self.dir, e))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("chk-"))
                    .and_then(|n| n.parse().ok())
            })
            .collect();
        out.sort_unstable_by(|a, b| b.cmp(a));
        Ok(out)
    }

    /// Writes checkpoint `manifest.epoch` with the queries' tables (`states[i]` belongs to
    /// `manifest.queries[i]`; their meta goes into the manifest), atomically, then prunes.
    pub fn write(&self, mut manifest: Manifest, states: Vec<StateSnapshot>) -> Result<Written> {
        manifest.version = VERSION;
        let name = format!("chk-{:012}", manifest.epoch);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let target = self.dir.join(&name);
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(|e| io_error("remove", &tmp, e))?;
        }
        fs::create_dir_all(&tmp).map_err(|e| io_error("create", &tmp, e))?;
        let mut files = Vec::new();
        for (i, state) in states.into_iter().enumerate() {
            if let Some(q) = manifest.queries.get_mut(i) {
                q.meta = state.meta;
            }
            for (table, batch) in state.tables {
                let file = format!("q{i}.{table}.arrow");
                let path = tmp.join(&file);
                let bytes = write_ipc(&path, &batch)?;
                files.push((file, bytes));
            }
        }
        manifest.files = files;
        let path = tmp.join("manifest.json");
        let json = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| Error::Checkpoint(format!("cannot encode the manifest: {e}")))?;
        write_synced(&path, &json)?;
        sync_dir(&tmp)?;
        if target.exists() {
            // A checkpoint of the same epoch from an earlier run that did not get further.
            fs::remove_dir_all(&target).map_err(|e| io_error("remove", &target, e))?;
        }
        fs::rename(&tmp, &target).map_err(|e| io_error("rename", &tmp, e))?;
        sync_dir(&self.dir)?;
        let bytes = manifest.files.iter().map(|(_, b)| b).sum::<u64>() + json.len() as u64;
        self.prune()?;
        Ok(Written {
            epoch: manifest.epoch,
            path: target,
            bytes,
        })
    }

    /// Removes all but the newest `retain` checkpoints.
    fn prune(&self) -> Result<()> {
        for epoch in self.epochs()?.into_iter().skip(self.retain) {
            let path = self.dir.join(format!("chk-{epoch:012}"));
            fs::remove_dir_all(&path).map_err(|e| io_error("remove", &path, e))?;
        }
        Ok(())
    }

    /// The newest checkpoint that reads back whole; a damaged one is reported and skipped.
    pub fn latest(&self) -> Result<Option<Checkpoint>> {
        for epoch in self.epochs()? {
            let path = self.dir.join(format!("chk-{epoch:012}"));
            match read_checkpoint(&path) {
                Ok(c) => return Ok(Some(c)),
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "checkpoint unreadable, trying an older one")
                }
            }
        }
        Ok(None)
    }
}

fn read_checkpoint(path: &Path) -> Result<Checkpoint> {
    let manifest_path = path.join("manifest.json");
    let bytes = fs::read(&manifest_path).map_err(|e| io_error("read", &manifest_path, e))?;
    let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
        Error::Checkpoint(format!("{}: not a manifest: {e}", manifest_path.display()))
    })?;
    if manifest.version != VERSION {
        return Err(Error::Checkpoint(format!(
            "{}: manifest version {} (this build reads {VERSION})",
            manifest_path.display(),
            manifest.version
        )));
    }
    let mut queries: Vec<StateSnapshot> = manifest
        .queries
        .iter()
        .map(|q| StateSnapshot {
            meta: q.meta.clone(),
            tables: BTreeMap::new(),
        })
        .collect();
    for (file, size) in &manifest.files {
        let file_path = path.join(file);
        let actual = fs::metadata(&file_path)
            .map_err(|e| io_error("read", &file_path, e))?
            .len();
        if actual != *size {
            return Err(Error::Checkpoint(format!(
                "{}: {actual} bytes, the manifest says {size}",
                file_path.display()
            )));
        }
        let (query, table) = file
            .strip_suffix(".arrow")
            .and_then(|f| f.strip_prefix('q'))
            .and_then(|f| f.split_once('.'))
            .and_then(|(i, t)| i.parse::<usize>().ok().map(|i| (i, t.to_string())))
            .ok_or_else(|| Error::Checkpoint(format!("unexpected file {file}")))?;
        let batch = read_ipc(&file_path)?;
        let Some(state) = queries.get_mut(query) else {
            return Err(Error::Checkpoint(format!("{file} names no query")));
        };
        state.tables.insert(table, batch);
    }
    Ok(Checkpoint {
        manifest,
        queries,
        path: path.to_path_buf(),
    })
}

fn write_ipc(path: &Path, batch: &RecordBatch) -> Result<u64> {
    let file = File::create(path).map_err(|e| io_error("create", path, e))?;
    let mut writer = FileWriter::try_new(BufWriter::new(file), &batch.schema())?;
    writer.write(batch)?;
    writer.finish()?;
    let mut inner = writer.into_inner()?;
    inner.flush().map_err(|e| io_error("write", path, e))?;
    let file = inner
        .into_inner()
        .map_err(|e| io_error("write", path, e.into_error()))?;
    file.sync_all().map_err(|e| io_error("sync", path, e))?;
    Ok(file
        .metadata()
        .map_err(|e| io_error("stat", path, e))?
        .len())
}

fn read_ipc(path: &Path) -> Result<RecordBatch> {
    let file = File::open(path).map_err(|e| io_error("open", path, e))?;
    let reader = FileReader::try_new(BufReader::new(file), None)
        .map_err(|e| Error::Checkpoint(format!("{}: {e}", path.display())))?;
    let schema = reader.schema();
    let batches = reader
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Checkpoint(format!("{}: {e}", path.display())))?;
    Ok(datafusion::arrow::compute::concat_batches(
        &schema, &batches,
    )?)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = File::create(path).map_err(|e| io_error("create", path, e))?;
    file.write_all(bytes)
        .map_err(|e| io_error("write", path, e))?;
    file.sync_all().map_err(|e| io_error("sync", path, e))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("sync", dir, e))
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Checkpoint(format!("cannot {what} {}: {e}", path.display()))
}

/// Rows `[offset, offset + len)` of a table's column `name`.
pub fn column<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a ArrayRef> {
    batch
        .column_by_name(name)
        .ok_or_else(|| Error::Checkpoint(format!("state table lacks column {name}")))
}

/// Downcasts a state column.
pub fn typed<'a, T: Array + 'static>(array: &'a ArrayRef, name: &str) -> Result<&'a T> {
    array.as_any().downcast_ref::<T>().ok_or_else(|| {
        Error::Checkpoint(format!(
            "state column {name} has type {}",
            array.data_type()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::Int64Array;

    fn state(n: i64) -> StateSnapshot {
        let mut s = StateSnapshot {
            meta: serde_json::json!({ "n": n }),
            tables: BTreeMap::new(),
        };
        s.tables.insert(
            "t".into(),
            table(vec![(
                "x".into(),
                Arc::new(Int64Array::from(vec![n, n + 1])) as ArrayRef,
            )])
            .expect("table"),
        );
        s
    }

    fn manifest(epoch: u64) -> Manifest {
        Manifest {
            version: 0,
            epoch,
            created_at_ms: 1,
            positions: vec![Position {
                topic: "in".into(),
                partition: 0,
                offset: epoch as i64 * 10,
            }],
            outputs: vec![],
            queries: vec![QueryManifest {
                name: "q".into(),
                sql: "SELECT 1".into(),
                meta: serde_json::Value::Null,
            }],
            files: vec![],
        }
    }

    #[test]
    fn written_checkpoints_read_back_and_old_ones_are_pruned() {
        let dir = tempfile::tempdir().expect("dir");
        let store = CheckpointStore::open(dir.path(), 2).expect("store");
        assert!(store.latest().expect("latest").is_none());
        for epoch in 1..=4 {
            store
                .write(manifest(epoch), vec![state(epoch as i64)])
                .expect("write");
        }
        assert_eq!(store.epochs().expect("epochs"), vec![4, 3]);
        let c = store.latest().expect("latest").expect("some");
        assert_eq!(c.manifest.epoch, 4);
        assert_eq!(c.manifest.positions[0].offset, 40);
        assert_eq!(c.queries[0].meta["n"], 4);
        let t = &c.queries[0].tables["t"];
        let x = t
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("i64");
        assert_eq!(x.values(), &[4, 5]);
    }

    #[test]
    fn a_damaged_checkpoint_falls_back_and_leftovers_are_removed() {
        let dir = tempfile::tempdir().expect("dir");
        let store = CheckpointStore::open(dir.path(), 3).expect("store");
        store.write(manifest(1), vec![state(1)]).expect("write");
        let written = store.write(manifest(2), vec![state(2)]).expect("write");
        // A torn file in the newest checkpoint.
        let file = written.path.join("q0.t.arrow");
        let bytes = fs::read(&file).expect("read");
        fs::write(&file, &bytes[..bytes.len() / 2]).expect("truncate");
        fs::create_dir_all(dir.path().join(".chk-000000000003.tmp")).expect("tmp");
        let store = CheckpointStore::open(dir.path(), 3).expect("reopen");
        assert!(!dir.path().join(".chk-000000000003.tmp").exists());
        let c = store.latest().expect("latest").expect("some");
        assert_eq!(c.manifest.epoch, 1);
    }

    #[test]
    fn nesting_keeps_parts_apart() {
        let mut outer = StateSnapshot::default();
        outer.nest("window", state(1));
        outer.nest("keyed0", state(2));
        assert_eq!(outer.tables.len(), 2);
        let w = outer.nested("window");
        assert_eq!(w.meta["n"], 1);
        assert!(w.tables.contains_key("t"));
        assert_eq!(outer.nested("keyed0").meta["n"], 2);
        assert!(outer.nested("keyed1").tables.is_empty());
    }
}
