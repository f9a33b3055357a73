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
//! In a local directory it is written into `.chk-<epoch>.tmp`, every file fsynced, the
//! directory fsynced, then renamed into place and the parent fsynced: a reader sees a whole
//! checkpoint or none. Leftover temporary directories (a crash while writing) are removed when
//! the store opens. In an object store ([`Location::Object`]: S3 or an S3-compatible server,
//! GCS, Azure), which every machine of a deployment reaches, each file is one object under
//! `<prefix>/chk-<epoch>/` and the manifest is put last: a checkpoint is whole once its
//! manifest is there, and incomplete ones are removed when a newer one is written. Older
//! checkpoints beyond `retain` are pruned after each write. Recovery reads the newest
//! checkpoint that reads back whole (every file of the size and SHA-256 its manifest records,
//! read from its own directory, not through a symbolic link), falling back to older ones.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::TryStreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};

use datafusion::arrow::array::{Array, ArrayRef, RecordBatch};
use datafusion::arrow::datatypes::{Field, Schema};
use datafusion::arrow::ipc::reader::FileReader;
use datafusion::arrow::ipc::writer::FileWriter;
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::error::{Error, Result};

pub mod savepoint;

/// A table of a snapshot read out of the operator's state when the snapshot is written
/// ([`StateSnapshot::resolve`]), on the thread that writes it, while the query goes on.
pub trait DeferredTable: Send + Sync + std::fmt::Debug {
    /// The table, as the state was when the snapshot was taken.
    fn compute(&self) -> Result<RecordBatch>;
}

/// One operator's state: small scalars as JSON, bulk state as Arrow tables (one batch each).
#[derive(Debug, Clone, Default)]
pub struct StateSnapshot {
    /// Scalars (watermarks, counters, bookkeeping).
    pub meta: serde_json::Value,
    /// Named tables; an absent table is empty.
    pub tables: BTreeMap<String, RecordBatch>,
    /// Tables still to be read out of the state, named as in `tables`.
    pub deferred: BTreeMap<String, Arc<dyn DeferredTable>>,
}

impl StateSnapshot {
    /// Reads the deferred tables out of the state into `tables`.
    pub fn resolve(&mut self) -> Result<()> {
        for (name, table) in std::mem::take(&mut self.deferred) {
            self.tables.insert(name, table.compute()?);
        }
        Ok(())
    }

    /// Adds the tables and meta of `inner` under `prefix` (`prefix.table`, `meta[prefix]`).
    pub fn nest(&mut self, prefix: &str, inner: StateSnapshot) {
        for (name, table) in inner.tables {
            self.tables.insert(format!("{prefix}.{name}"), table);
        }
        for (name, table) in inner.deferred {
            self.deferred.insert(format!("{prefix}.{name}"), table);
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
            deferred: self
                .deferred
                .iter()
                .filter_map(|(k, v)| k.strip_prefix(&start).map(|n| (n.to_string(), v.clone())))
                .collect(),
        }
    }

    /// Bytes of the tables' arrays; deferred tables count once resolved.
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

/// The columns of held rows as a state table's columns, each named by its position and
/// field name (`c<i>_<name>`), read back by position.
pub fn row_columns(rows: &RecordBatch) -> Vec<(String, ArrayRef)> {
    rows.schema()
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| (format!("c{i}_{}", f.name()), rows.column(i).clone()))
        .collect()
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
    /// In a store of one input partition's state: the partition count of its topic when the
    /// state was taken (the state is split by partition, so it holds only for that count).
    #[serde(default)]
    pub partition_counts: BTreeMap<String, i32>,
    /// Files of the checkpoint with their sizes in bytes.
    pub files: Vec<(String, u64)>,
    /// SHA-256 of each file, in hex: a flipped byte is found, not restored (empty in
    /// checkpoints written before digests were recorded, which are read by size alone).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub digests: BTreeMap<String, String>,
}

/// One query of a [`Manifest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueryManifest {
    /// The query's name.
    pub name: String,
    /// The SQL it was planned from.
    pub sql: String,
    /// What its state holds (`StreamQuery::state_layout`): state is restored into the SQL
    /// it was taken for, or into changed SQL with the same layout. Empty in checkpoints
    /// written before layouts were recorded.
    #[serde(default)]
    pub layout: Vec<String>,
    /// Its `SET urbanstream.…` statements: a change of them is a change of SQL.
    #[serde(default)]
    pub settings: Vec<String>,
    /// The topics it reads and writes and how they are keyed
    /// (`StreamQuery::tables_identity`): declared beside the statement, so a change of them
    /// leaves its SQL as it was. Empty in checkpoints written before they were recorded.
    #[serde(default)]
    pub tables: Vec<String>,
    /// Its scalars.
    pub meta: serde_json::Value,
}

/// Why state with layout `held` cannot be restored into a query whose state has layout
/// `wanted` (see [`QueryManifest::layout`]); `None` when it can.
pub fn layout_difference(held: &[String], wanted: &[String]) -> Option<String> {
    if held == wanted {
        return None;
    }
    if held.is_empty() {
        return Some(
            "the state was written before state layouts were recorded, so it can only be \
             restored into the SQL it was taken for"
                .into(),
        );
    }
    let i = held
        .iter()
        .zip(wanted)
        .position(|(a, b)| a != b)
        .unwrap_or(held.len().min(wanted.len()));
    Some(match (held.get(i), wanted.get(i)) {
        (Some(a), Some(b)) => format!("the state holds \"{a}\" where the new SQL needs \"{b}\""),
        (Some(a), None) => format!("the state holds \"{a}\", which the new SQL has no place for"),
        (None, Some(b)) => format!("the new SQL needs \"{b}\", which the state lacks"),
        (None, None) => "the layouts differ".into(),
    })
}

/// Why the state `taken` cannot be restored into a stream statement planned from `sql` with
/// `settings` over the topics `tables`, whose state has `layout`; `None` when it can: the SQL
/// it was taken for with the same settings and topics (or a checkpoint that recorded
/// neither), or SQL with the same layout over the same topics.
pub fn misfit(
    taken: &QueryManifest,
    sql: &str,
    settings: &[String],
    tables: &[String],
    layout: &[String],
) -> Option<String> {
    let same_tables = taken.tables.is_empty() || taken.tables == tables;
    if taken.sql == sql && same_tables && (taken.layout.is_empty() || taken.settings == settings) {
        return None;
    }
    if let Some(why) = layout_difference(&taken.layout, layout) {
        return Some(why);
    }
    if same_tables {
        return None;
    }
    let changed: Vec<String> = taken
        .tables
        .iter()
        .filter(|t| !tables.contains(t))
        .map(|t| format!("{t} (now {})", counterpart(t, tables)))
        .collect();
    Some(format!(
        "the state was taken over other topics: {}; positions and state belong to the topics \
         they were read from and written to",
        changed.join("; ")
    ))
}

/// The line of `tables` for the same table as `line` (`source NAME: …`), or "gone".
fn counterpart(line: &str, tables: &[String]) -> String {
    let head = line.split_once(':').map_or(line, |(h, _)| h);
    tables
        .iter()
        .find(|t| t.split_once(':').is_some_and(|(h, _)| h == head))
        .and_then(|t| t.split_once(':').map(|(_, rest)| rest.trim().to_string()))
        .unwrap_or_else(|| "gone".into())
}

/// Manifest format version.
const VERSION: u32 = 1;

/// Where a pipeline's checkpoints live: a local directory, or a prefix in an object store
/// (S3 and S3-compatible servers, Google Cloud Storage, Azure Blob Storage) that every
/// machine of a deployment reaches.
#[derive(Clone)]
pub enum Location {
    /// A directory on this machine.
    Local(PathBuf),
    /// A prefix in an object store.
    Object {
        /// The store.
        store: Arc<dyn ObjectStore>,
        /// The prefix, without a trailing slash.
        prefix: ObjectPath,
        /// The store's URL (`s3://bucket`), for messages.
        url: String,
    },
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Local(dir) => write!(f, "{}", dir.display()),
            Location::Object { prefix, url, .. } => write!(f, "{url}/{prefix}"),
        }
    }
}

impl Location {
    /// `url` (`s3://bucket/prefix`, `gs://…`, `az://…` or `abfss://…`) with the store's
    /// options (e.g. `aws_endpoint`, `aws_region`, `aws_access_key_id`,
    /// `aws_secret_access_key`, `aws_allow_http`; see the `object_store` crate), after the
    /// store's own environment variables (`AWS_*`, `GOOGLE_*`, `AZURE_*`).
    pub fn object(url: &str, options: &BTreeMap<String, String>) -> Result<Self> {
        let parsed = url::Url::parse(url).map_err(|e| {
            Error::Config(format!(
                "checkpoint.url {url:?} is not a URL ({e}): write e.g. s3://bucket/prefix"
            ))
        })?;
        let mut settings: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| {
                ["AWS_", "GOOGLE_", "AZURE_"]
                    .iter()
                    .any(|p| k.starts_with(p))
            })
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect();
        settings.extend(options.iter().map(|(k, v)| (k.clone(), v.clone())));
        let (store, prefix) = object_store::parse_url_opts(&parsed, settings)
            .map_err(|e| Error::Config(format!("checkpoint.url {url}: {e}")))?;
        if matches!(parsed.scheme(), "file" | "memory") {
            return Err(Error::Config(format!(
                "checkpoint.url {url}: a local directory is checkpoint.dir; checkpoint.url is \
                 for object stores (s3://, gs://, az://)"
            )));
        }
        let host = parsed.host_str().unwrap_or_default();
        Ok(Location::Object {
            store: Arc::from(store),
            prefix,
            url: format!("{}://{host}", parsed.scheme()),
        })
    }

    /// The location `part` (one path segment) below this one.
    pub fn join(&self, part: &str) -> Self {
        match self {
            Location::Local(dir) => Location::Local(dir.join(part)),
            Location::Object { store, prefix, url } => Location::Object {
                store: store.clone(),
                prefix: prefix.clone().join(part),
                url: url.clone(),
            },
        }
    }

    /// The consumer group whose query's state this location holds (its `owner.json`), if
    /// one has claimed it ([`Location::claim`]).
    pub async fn owner(&self) -> Result<Option<String>> {
        let bytes = match self {
            Location::Local(dir) => match tokio::fs::read(dir.join(OWNER)).await {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(io_error("read", &dir.join(OWNER), e)),
            },
            Location::Object { store, prefix, .. } => {
                let path = prefix.clone().join(OWNER);
                match store.get(&path).await {
                    Ok(got) => got
                        .bytes()
                        .await
                        .map_err(|e| object_error("read", self, e))?
                        .to_vec(),
                    Err(object_store::Error::NotFound { .. }) => return Ok(None),
                    Err(e) => return Err(object_error("read", self, e)),
                }
            }
        };
        let owner: Owner = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Checkpoint(format!("{self}/{OWNER}: {e}")))?;
        Ok(Some(owner.group))
    }

    /// Claims this location (a query's checkpoints) for consumer group `group`, or refuses
    /// it when another group has: two services given one checkpoint storage (each with its
    /// own `kafka.group_id`) would restore each other's state, write their epochs into the
    /// same stores, and drop each other's checkpoints. Processes of one deployment share a
    /// query's group, and so its location.
    pub async fn claim(&self, group: &str) -> Result<()> {
        let refused = |owner: &str| {
            Error::Checkpoint(format!(
                "{self} holds the checkpoints of consumer group {owner}, and this query reads \
                 in group {group}: two services (each with its own kafka.group_id) share one \
                 checkpoint storage. Give each service a checkpoint.dir (or checkpoint.url) of \
                 its own; processes that share a query's partitions share its kafka.group_id. \
                 (If this service's kafka.group_id was changed, remove {self}/{OWNER} for its \
                 queries to take their checkpoints over.)"
            ))
        };
        match self.owner().await? {
            Some(owner) if owner == group => return Ok(()),
            Some(owner) => return Err(refused(&owner)),
            None => {}
        }
        let json = serde_json::to_vec(&Owner {
            group: group.to_string(),
        })
        .map_err(|e| Error::Checkpoint(format!("cannot encode the owner: {e}")))?;
        // Created only where none is: of two services claiming at once, one writes it and
        // the other reads it back.
        let created = match self {
            Location::Local(dir) => {
                let dir = dir.clone();
                tokio::task::spawn_blocking(move || create_new(&dir, OWNER, &json))
                    .await
                    .map_err(|e| Error::Checkpoint(format!("claiming {self}: {e}")))??
            }
            Location::Object { store, prefix, .. } => {
                let path = prefix.clone().join(OWNER);
                let create = object_store::PutOptions {
                    mode: object_store::PutMode::Create,
                    ..Default::default()
                };
                match store.put_opts(&path, json.clone().into(), create).await {
                    Ok(_) => true,
                    Err(object_store::Error::AlreadyExists { .. }) => false,
                    // A store without conditional writes: the claim is written as it is.
                    Err(object_store::Error::NotImplemented { .. }) => {
                        store
                            .put(&path, json.into())
                            .await
                            .map_err(|e| object_error("write", self, e))?;
                        true
                    }
                    Err(e) => return Err(object_error("write", self, e)),
                }
            }
        };
        if created {
            return Ok(());
        }
        match self.owner().await? {
            Some(owner) if owner == group => Ok(()),
            Some(owner) => Err(refused(&owner)),
            None => Err(Error::Checkpoint(format!(
                "{self}/{OWNER} was there when claimed and is gone: claim it again"
            ))),
        }
    }

    /// Removes everything below this location (a dropped query's checkpoints).
    pub async fn remove_all(&self) -> Result<()> {
        match self {
            Location::Local(dir) => {
                if dir.exists() {
                    tokio::fs::remove_dir_all(dir)
                        .await
                        .map_err(|e| io_error("remove", dir, e))?;
                }
                Ok(())
            }
            Location::Object { store, prefix, .. } => {
                let paths: Vec<ObjectPath> = store
                    .list(Some(prefix))
                    .map_ok(|m| m.location)
                    .try_collect()
                    .await
                    .map_err(|e| object_error("list", self, e))?;
                for path in paths {
                    store
                        .delete(&path)
                        .await
                        .map_err(|e| object_error("delete", self, e))?;
                }
                Ok(())
            }
        }
    }
}

/// Writes `bytes` as `dir/name` unless that exists (then `false`): whole, synced, under a
/// name of its own first, then linked to `name`, which fails where `name` is.
fn create_new(dir: &Path, name: &str, bytes: &[u8]) -> Result<bool> {
    fs::create_dir_all(dir).map_err(|e| io_error("create", dir, e))?;
    // Unique to this call: other processes by their id and the time, other threads by a
    // count (two may read the same nanosecond).
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let unique = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{unique}-{call}",
        std::process::id()
    ));
    write_synced(&tmp, bytes)?;
    let target = dir.join(name);
    let linked = fs::hard_link(&tmp, &target);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            sync_dir(dir)?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        // A file system without hard links: created in place, exclusively.
        Err(_) => {
            use std::io::Write;
            let mut file = match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&target)
            {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
                Err(e) => return Err(io_error("create", &target, e)),
            };
            file.write_all(bytes)
                .and_then(|()| file.sync_all())
                .map_err(|e| io_error("write", &target, e))?;
            sync_dir(dir)?;
            Ok(true)
        }
    }
}

/// The file naming the consumer group whose query's checkpoints a location holds.
const OWNER: &str = "owner.json";

/// What `owner.json` says.
#[derive(Debug, Serialize, Deserialize)]
struct Owner {
    group: String,
}

/// A checkpoint read back.
#[derive(Debug)]
pub struct Checkpoint {
    /// Its manifest.
    pub manifest: Manifest,
    /// Per query (in manifest order), its state.
    pub queries: Vec<StateSnapshot>,
    /// Where it is.
    pub location: String,
}

/// What [`CheckpointStore::write`] did.
#[derive(Debug, Clone, Serialize)]
pub struct Written {
    /// Checkpoint number.
    pub epoch: u64,
    /// Where it is.
    pub location: String,
    /// Bytes stored.
    pub bytes: u64,
}

/// The checkpoints of one pipeline (or of one of its partitions), in one location.
///
/// Its methods block: call them on a blocking thread (`spawn_blocking`), which for an object
/// store must belong to a tokio runtime (its requests run on the runtime's I/O driver).
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    location: Location,
    retain: usize,
}

/// Name of checkpoint `epoch`.
fn checkpoint_name(epoch: u64) -> String {
    format!("chk-{epoch:012}")
}

impl CheckpointStore {
    /// Opens (creating) the local directory `dir`, keeping the newest `retain` (at least 1)
    /// checkpoints, and removes what a crash while writing left behind.
    pub fn open(dir: impl Into<PathBuf>, retain: usize) -> Result<Self> {
        Self::at(Location::Local(dir.into()), retain)
    }

    /// Opens the store at `location`. A local directory is created and cleared of what a
    /// crash while writing left behind; in an object store a checkpoint is whole once its
    /// manifest is there (it is written last), and incomplete ones are removed when a newer
    /// one is written.
    pub fn at(location: Location, retain: usize) -> Result<Self> {
        if let Location::Local(dir) = &location {
            fs::create_dir_all(dir).map_err(|e| io_error("create", dir, e))?;
            for entry in fs::read_dir(dir).map_err(|e| io_error("list", dir, e))? {
                let entry = entry.map_err(|e| io_error("list", dir, e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(".chk-") && name.ends_with(".tmp") {
                    let path = entry.path();
                    fs::remove_dir_all(&path).map_err(|e| io_error("remove", &path, e))?;
                }
            }
        }
        Ok(Self {
            location,
            retain: retain.max(1),
        })
    }

    /// Where the checkpoints are.
    pub fn location(&self) -> &Location {
        &self.location
    }

    /// Epochs of the complete checkpoints, newest first.
    pub fn epochs(&self) -> Result<Vec<u64>> {
        let mut out = self.listed()?.0;
        out.sort_unstable_by(|a, b| b.cmp(a));
        Ok(out)
    }

    /// The complete checkpoints' epochs and the epochs of objects left without a manifest
    /// (an object store's incomplete checkpoints; none for a local directory, whose
    /// checkpoints all count: one without its manifest is damaged, and said so on restore).
    fn listed(&self) -> Result<(Vec<u64>, Vec<u64>)> {
        // Only the names this code writes: `chk-0` once parsed as epoch 0, and its removal
        // (as `chk-000000000000`) failed the query for good.
        let epoch_of = |name: &str| {
            name.strip_prefix("chk-")
                .and_then(|n| n.parse::<u64>().ok())
                .filter(|epoch| checkpoint_name(*epoch) == name)
        };
        match &self.location {
            Location::Local(dir) => Ok((
                fs::read_dir(dir)
                    .map_err(|e| io_error("list", dir, e))?
                    .filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().to_str().and_then(epoch_of))
                    .collect(),
                Vec::new(),
            )),
            Location::Object { store, prefix, .. } => {
                let objects: Vec<ObjectPath> = block_on(
                    store
                        .list(Some(prefix))
                        .map_ok(|m| m.location)
                        .try_collect(),
                )?
                .map_err(|e| object_error("list", &self.location, e))?;
                let mut complete = std::collections::BTreeSet::new();
                let mut seen = std::collections::BTreeSet::new();
                for object in &objects {
                    let parts: Vec<_> = object
                        .prefix_match(prefix)
                        .map(|p| p.collect())
                        .unwrap_or_default();
                    let [dir, file] = parts.as_slice() else {
                        continue;
                    };
                    let Some(epoch) = epoch_of(dir.as_ref()) else {
                        continue;
                    };
                    seen.insert(epoch);
                    if file.as_ref() == "manifest.json" {
                        complete.insert(epoch);
                    }
                }
                let incomplete = seen.difference(&complete).copied().collect();
                Ok((complete.into_iter().collect(), incomplete))
            }
        }
    }

    /// Writes checkpoint `manifest.epoch` with the queries' tables (`states[i]` belongs to
    /// `manifest.queries[i]`; their meta goes into the manifest), atomically, then prunes.
    /// Deferred tables are read out of their operators' state first, on this thread.
    pub fn write(&self, mut manifest: Manifest, states: Vec<StateSnapshot>) -> Result<Written> {
        manifest.version = VERSION;
        let name = checkpoint_name(manifest.epoch);
        let mut files: Vec<(String, Vec<u8>)> = Vec::new();
        for (i, mut state) in states.into_iter().enumerate() {
            state.resolve()?;
            if let Some(q) = manifest.queries.get_mut(i) {
                q.meta = state.meta;
            }
            for (table, batch) in state.tables {
                files.push((format!("q{i}.{table}.arrow"), ipc_bytes(&batch)?));
            }
        }
        manifest.files = files
            .iter()
            .map(|(f, b)| (f.clone(), b.len() as u64))
            .collect();
        manifest.digests = files.iter().map(|(f, b)| (f.clone(), digest(b))).collect();
        let json = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| Error::Checkpoint(format!("cannot encode the manifest: {e}")))?;
        let bytes = manifest.files.iter().map(|(_, b)| b).sum::<u64>() + json.len() as u64;
        let location = match &self.location {
            Location::Local(dir) => {
                let tmp = dir.join(format!(".{name}.tmp"));
                let target = dir.join(&name);
                if tmp.exists() {
                    fs::remove_dir_all(&tmp).map_err(|e| io_error("remove", &tmp, e))?;
                }
                fs::create_dir_all(&tmp).map_err(|e| io_error("create", &tmp, e))?;
                for (file, data) in &files {
                    write_synced(&tmp.join(file), data)?;
                }
                write_synced(&tmp.join("manifest.json"), &json)?;
                sync_dir(&tmp)?;
                if target.exists() {
                    // A checkpoint of the same epoch from an earlier run that did not get
                    // further.
                    fs::remove_dir_all(&target).map_err(|e| io_error("remove", &target, e))?;
                }
                fs::rename(&tmp, &target).map_err(|e| io_error("rename", &tmp, e))?;
                sync_dir(dir)?;
                target.display().to_string()
            }
            Location::Object { store, prefix, .. } => {
                let dir = prefix.clone().join(name.as_str());
                block_on(async {
                    // What an earlier run left under this epoch goes first: the manifest is
                    // what makes a checkpoint whole, so it is deleted before the files.
                    let _ = store.delete(&dir.clone().join("manifest.json")).await;
                    for (file, data) in files {
                        store
                            .put(&dir.clone().join(file.as_str()), data.into())
                            .await
                            .map_err(|e| object_error("write", &self.location, e))?;
                    }
                    store
                        .put(&dir.clone().join("manifest.json"), json.into())
                        .await
                        .map_err(|e| object_error("write", &self.location, e))?;
                    Ok::<(), Error>(())
                })??;
                format!("{}/{name}", self.location)
            }
        };
        self.prune()?;
        Ok(Written {
            epoch: manifest.epoch,
            location,
            bytes,
        })
    }

    /// Removes all but the newest `retain` checkpoints, and incomplete ones older than the
    /// newest complete one. In a local directory, where a checkpoint appears whole by a
    /// rename, a directory without a manifest (put there, or emptied, by another hand) is
    /// removed whatever its epoch, and does not count among the `retain` kept: once a
    /// checkpoint is written, it is not one to fall back to.
    fn prune(&self) -> Result<()> {
        let (complete, mut incomplete) = self.listed()?;
        let (mut complete, junk): (Vec<u64>, Vec<u64>) = match &self.location {
            Location::Local(dir) => complete.into_iter().partition(|epoch| {
                dir.join(checkpoint_name(*epoch))
                    .join("manifest.json")
                    .exists()
            }),
            Location::Object { .. } => (complete, Vec::new()),
        };
        complete.sort_unstable_by(|a, b| b.cmp(a));
        let newest = complete.first().copied().unwrap_or(0);
        incomplete.retain(|e| *e < newest);
        let doomed: Vec<u64> = complete
            .into_iter()
            .skip(self.retain)
            .chain(incomplete)
            .chain(junk)
            .collect();
        for epoch in doomed {
            let name = checkpoint_name(epoch);
            match &self.location {
                Location::Local(dir) => {
                    let path = dir.join(&name);
                    fs::remove_dir_all(&path).map_err(|e| io_error("remove", &path, e))?;
                }
                Location::Object { prefix, .. } => {
                    let below = self.location.join(&name);
                    block_on(below.remove_all())??;
                    let _ = prefix;
                }
            }
        }
        Ok(())
    }

    /// The manifest of the newest whole checkpoint (its tables are not read); an unreadable
    /// one is reported and skipped.
    pub fn latest_manifest(&self) -> Result<Option<Manifest>> {
        for epoch in self.epochs()? {
            let name = checkpoint_name(epoch);
            let bytes = match &self.location {
                Location::Local(dir) => {
                    let path = dir.join(&name).join("manifest.json");
                    fs::read(&path).map_err(|e| io_error("read", &path, e))
                }
                Location::Object { store, prefix, .. } => {
                    let object = prefix.clone().join(name.as_str()).join("manifest.json");
                    block_on(async { store.get(&object).await?.bytes().await })?
                        .map(|b| b.to_vec())
                        .map_err(|e| object_error("read", &self.location, e))
                }
            };
            match bytes.and_then(|b| {
                serde_json::from_slice::<Manifest>(&b).map_err(|e| {
                    Error::Checkpoint(format!("{name}/manifest.json: not a manifest: {e}"))
                })
            }) {
                Ok(manifest) => return Ok(Some(manifest)),
                Err(e) => {
                    warn!(location = %self.location, epoch, error = %e, "manifest unreadable, trying an older one")
                }
            }
        }
        Ok(None)
    }

    /// The newest checkpoint that reads back whole; a damaged one is reported and skipped.
    pub fn latest(&self) -> Result<Option<Checkpoint>> {
        let epochs = self.epochs()?;
        let mut newest_error = None;
        for &epoch in &epochs {
            let name = checkpoint_name(epoch);
            let found = match &self.location {
                Location::Local(dir) => {
                    let path = dir.join(&name);
                    read_checkpoint(&path.display().to_string(), |file| {
                        let p = path.join(file);
                        // Read only what lies in the checkpoint's directory: not through a
                        // symbolic link (of the file or of the directory) to elsewhere.
                        for link in [&path, &p] {
                            if fs::symlink_metadata(link).is_ok_and(|m| m.file_type().is_symlink())
                            {
                                return Err(Error::Checkpoint(format!(
                                    "{} is a symbolic link: a checkpoint is read only from its \
                                     own directory",
                                    link.display()
                                )));
                            }
                        }
                        fs::read(&p).map_err(|e| io_error("read", &p, e))
                    })
                }
                Location::Object { store, prefix, .. } => {
                    let dir = prefix.clone().join(name.as_str());
                    read_checkpoint(&format!("{}/{name}", self.location), |file| {
                        let object = dir.clone().join(file);
                        block_on(async {
                            store.get(&object).await?.bytes().await.map(|b| b.to_vec())
                        })?
                        .map_err(|e| object_error("read", &self.location, e))
                    })
                }
            };
            // The manifest's epoch is its directory's (a hand-edited one overflowed the next
            // epoch and panicked the query).
            let found = found.and_then(|c| {
                if c.manifest.epoch == epoch {
                    Ok(c)
                } else {
                    Err(Error::Checkpoint(format!(
                        "{name}/manifest.json says epoch {}, its directory {epoch}",
                        c.manifest.epoch
                    )))
                }
            });
            match found {
                Ok(c) => return Ok(Some(c)),
                Err(e) => {
                    warn!(location = %self.location, epoch, error = %e, "checkpoint unreadable, trying an older one");
                    newest_error.get_or_insert_with(|| format!("{name}: {e}"));
                }
            }
        }
        // Checkpoints there, none whole: the state is lost to this process, which must not
        // go on as if there had been none (it told of another process's storage).
        match newest_error {
            Some(newest) => Err(Error::Checkpoint(format!(
                "{} holds {} checkpoint{} and none reads back whole (the newest, {newest}): the \
                 state is not restored from a damaged checkpoint, and starting from empty \
                 state would publish wrong windows. Put back an intact copy of the \
                 checkpoint's files, or reset the query to start it afresh",
                self.location,
                epochs.len(),
                if epochs.len() == 1 { "" } else { "s" },
            ))),
            None => Ok(None),
        }
    }
}

/// Runs `future` to completion on the current tokio runtime, from a blocking thread.
pub(crate) fn block_on<F: std::future::Future>(future: F) -> Result<F::Output> {
    let handle = tokio::runtime::Handle::try_current().map_err(|_| {
        Error::Checkpoint("an object store is reached from a tokio runtime only".into())
    })?;
    Ok(handle.block_on(future))
}

fn object_error(what: &str, location: &Location, e: object_store::Error) -> Error {
    Error::Checkpoint(format!("cannot {what} checkpoints at {location}: {e}"))
}

/// Reads checkpoint `name` whose files `read` returns.
fn read_checkpoint(
    name: &str,
    mut read: impl FnMut(&str) -> Result<Vec<u8>>,
) -> Result<Checkpoint> {
    let bytes = read("manifest.json")?;
    let manifest: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| Error::Checkpoint(format!("{name}/manifest.json: not a manifest: {e}")))?;
    if manifest.version != VERSION {
        return Err(Error::Checkpoint(format!(
            "{name}/manifest.json: manifest version {} (this build reads {VERSION})",
            manifest.version
        )));
    }
    let mut queries: Vec<StateSnapshot> = manifest
        .queries
        .iter()
        .map(|q| StateSnapshot {
            meta: q.meta.clone(),
            ..Default::default()
        })
        .collect();
    for (file, size) in &manifest.files {
        // The name is checked before anything is opened: `q<i>.<table>.arrow` in the
        // checkpoint's own directory (a manifest naming /etc/hostname had it opened).
        let (query, table) = file
            .strip_suffix(".arrow")
            .and_then(|f| f.strip_prefix('q'))
            .and_then(|f| f.split_once('.'))
            .filter(|(_, t)| {
                !t.is_empty()
                    && t.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-')
                    && !t.contains("..")
            })
            .and_then(|(i, t)| i.parse::<usize>().ok().map(|i| (i, t.to_string())))
            .ok_or_else(|| Error::Checkpoint(format!("{name}: unexpected file {file:?}")))?;
        let data = read(file)?;
        if data.len() as u64 != *size {
            return Err(Error::Checkpoint(format!(
                "{name}/{file}: {} bytes, the manifest says {size}",
                data.len()
            )));
        }
        if !manifest.digests.is_empty() && manifest.digests.get(file) != Some(&digest(&data)) {
            return Err(Error::Checkpoint(format!(
                "{name}/{file}: its content is not what was written (SHA-256 differs)"
            )));
        }
        let batch = read_ipc(&format!("{name}/{file}"), data)?;
        let Some(state) = queries.get_mut(query) else {
            return Err(Error::Checkpoint(format!("{file} names no query")));
        };
        state.tables.insert(table, batch);
    }
    Ok(Checkpoint {
        manifest,
        queries,
        location: name.to_string(),
    })
}

/// SHA-256 of `bytes`, in hex.
fn digest(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `batch` as an Arrow IPC file.
fn ipc_bytes(batch: &RecordBatch) -> Result<Vec<u8>> {
    let mut writer = FileWriter::try_new(Vec::new(), &batch.schema())?;
    writer.write(batch)?;
    writer.finish()?;
    Ok(writer.into_inner()?)
}

fn read_ipc(name: &str, data: Vec<u8>) -> Result<RecordBatch> {
    let reader = FileReader::try_new(std::io::Cursor::new(data), None)
        .map_err(|e| Error::Checkpoint(format!("{name}: {e}")))?;
    let schema = reader.schema();
    let batches = reader
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Checkpoint(format!("{name}: {e}")))?;
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

/// A file operation of a checkpoint that failed. Out of file descriptors or space, or
/// interrupted, it may pass: an I/O error, after which the query is started again (it once
/// failed for good when a flood of connections had used up the descriptors for a moment).
/// Anything else (no permission, not a directory) is for the operator to fix.
fn io_error(what: &str, path: &Path, e: std::io::Error) -> Error {
    use nix::errno::Errno;
    use std::io::ErrorKind;
    let message = format!("cannot {what} {}: {e}", path.display());
    let passing = [
        Errno::EMFILE,
        Errno::ENFILE,
        Errno::ENOSPC,
        Errno::EDQUOT,
        Errno::EINTR,
    ]
    .iter()
    .any(|errno| e.raw_os_error() == Some(*errno as i32))
        || matches!(
            e.kind(),
            ErrorKind::StorageFull
                | ErrorKind::QuotaExceeded
                | ErrorKind::Interrupted
                | ErrorKind::TimedOut
        );
    if passing {
        Error::Io(std::io::Error::new(e.kind(), message))
    } else {
        Error::Checkpoint(message)
    }
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

    /// A checkpoint that fails for want of file descriptors or space is retried; one that
    /// fails for want of permission is not.
    /// A statement's topics are declared beside it: taken over one topic, its state is not
    /// restored into the same SQL over another (its SQL and layout being the same), while a
    /// checkpoint that recorded no topics is still restored as before.
    #[test]
    fn state_is_restored_over_the_topics_it_was_taken_over() {
        let over = |topic: &str| vec![format!("reads ev: topic {topic}, keyed by k, event time t")];
        let taken = QueryManifest {
            name: "q".into(),
            sql: "INSERT INTO o SELECT …".into(),
            layout: vec!["window".into()],
            settings: Vec::new(),
            tables: over("a"),
            meta: serde_json::Value::Null,
        };
        let layout = vec!["window".to_string()];
        assert_eq!(misfit(&taken, &taken.sql, &[], &over("a"), &layout), None);
        let why = misfit(&taken, &taken.sql, &[], &over("b"), &layout).expect("refused");
        assert!(
            why.contains("reads ev: topic a, keyed by k, event time t (now topic b, keyed by k"),
            "{why}"
        );
        let old = QueryManifest {
            tables: Vec::new(),
            ..taken
        };
        assert_eq!(misfit(&old, &old.sql, &[], &over("b"), &layout), None);
    }

    #[test]
    fn passing_file_errors_are_transient_and_the_others_not() {
        let path = Path::new("/checkpoints/q");
        for errno in [nix::errno::Errno::EMFILE, nix::errno::Errno::ENOSPC] {
            let e = io_error(
                "create",
                path,
                std::io::Error::from_raw_os_error(errno as i32),
            );
            assert!(e.is_transient(), "{e}");
            assert!(
                e.to_string().contains("cannot create /checkpoints/q"),
                "{e}"
            );
        }
        let denied = std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        assert!(!io_error("create", path, denied).is_transient());
    }

    fn state(n: i64) -> StateSnapshot {
        let mut s = StateSnapshot {
            meta: serde_json::json!({ "n": n }),
            ..Default::default()
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
                layout: Vec::new(),
                settings: Vec::new(),
                tables: Vec::new(),
                meta: serde_json::Value::Null,
            }],
            files: vec![],
            digests: Default::default(),
            partition_counts: Default::default(),
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

    /// Of services claiming one location at once for their groups, one gets it and every
    /// other is refused naming it; its own group claims it again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_group_claims_a_location_of_many_at_once() {
        let dir = tempfile::tempdir().expect("dir");
        let at = Location::Local(dir.path().join("q"));
        let claims: Vec<_> = (0..8)
            .map(|i| {
                let at = at.clone();
                tokio::spawn(async move { at.claim(&format!("group-{i}.q")).await })
            })
            .collect();
        let mut won = Vec::new();
        for (i, claim) in claims.into_iter().enumerate() {
            match claim.await.expect("task") {
                Ok(()) => won.push(i),
                Err(e) => assert!(
                    e.to_string()
                        .contains("holds the checkpoints of consumer group group-"),
                    "{e}"
                ),
            }
        }
        assert_eq!(won.len(), 1, "{won:?}");
        let owner = at.owner().await.expect("owner").expect("claimed");
        assert_eq!(owner, format!("group-{}.q", won[0]));
        at.claim(&owner).await.expect("its own group again");
    }

    /// A local directory named as a checkpoint but without a manifest (put there, or emptied,
    /// by another hand), whatever its epoch, goes at the next write and takes no place among
    /// the checkpoints kept: an empty `chk-000000009999` stayed for good and left one
    /// checkpoint fewer to fall back to.
    #[test]
    fn a_local_checkpoint_without_a_manifest_is_pruned_whatever_its_epoch() {
        let dir = tempfile::tempdir().expect("dir");
        let store = CheckpointStore::open(dir.path(), 2).expect("store");
        for epoch in 1..=2 {
            store
                .write(manifest(epoch), vec![state(epoch as i64)])
                .expect("write");
        }
        std::fs::create_dir_all(dir.path().join(checkpoint_name(9999))).expect("junk");
        store.write(manifest(3), vec![state(3)]).expect("write");
        assert_eq!(store.epochs().expect("epochs"), vec![3, 2]);
    }

    #[test]
    fn hand_edited_checkpoints_are_refused_and_nothing_outside_is_read() {
        let dir = tempfile::tempdir().expect("dir");
        let store = CheckpointStore::open(dir.path(), 10).expect("store");
        store.write(manifest(1), vec![state(1)]).expect("write");
        let edit = |epoch: u64, change: &dyn Fn(&mut serde_json::Value)| {
            let written = store
                .write(manifest(epoch), vec![state(epoch as i64)])
                .expect("write");
            let path = PathBuf::from(&written.location).join("manifest.json");
            let mut m: serde_json::Value =
                serde_json::from_slice(&fs::read(&path).expect("read")).expect("json");
            change(&mut m);
            fs::write(&path, m.to_string()).expect("write");
            PathBuf::from(&written.location)
        };
        // An epoch other than its directory's (u64::MAX overflowed the next one: a panic).
        let at = edit(2, &|m| m["epoch"] = serde_json::json!(u64::MAX));
        let e = read_checkpoint("c", |f| Ok(fs::read(at.join(f))?))
            .map(|c| c.manifest.epoch)
            .expect("reads");
        assert_eq!(e, u64::MAX);
        assert_eq!(
            store.latest().expect("latest").map(|c| c.manifest.epoch),
            Some(1)
        );
        // A file outside the directory is not opened: the name is refused first.
        let outside = dir.path().join("secret");
        fs::write(&outside, "x").expect("write");
        let at = edit(3, &|m| {
            m["files"]
                .as_array_mut()
                .expect("files")
                .push(serde_json::json!([outside.display().to_string(), 1]))
        });
        let opened = std::cell::RefCell::new(Vec::new());
        let e = read_checkpoint("c", |f| {
            opened.borrow_mut().push(f.to_string());
            Ok(fs::read(at.join(f))?)
        })
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(e.contains("unexpected file"), "{e}");
        assert!(!opened.borrow().iter().any(|f| f.contains("secret")));
        // A state file that is a link to a file elsewhere is not read.
        let written = store.write(manifest(4), vec![state(4)]).expect("write");
        let file = PathBuf::from(&written.location).join("q0.t.arrow");
        let elsewhere = dir.path().join("elsewhere.arrow");
        fs::rename(&file, &elsewhere).expect("move");
        std::os::unix::fs::symlink(&elsewhere, &file).expect("link");
        assert_eq!(
            store.latest().expect("latest").map(|c| c.manifest.epoch),
            Some(1)
        );
        // A flipped byte of a state file, its size unchanged: found, not restored.
        let written = store.write(manifest(5), vec![state(5)]).expect("write");
        let file = PathBuf::from(&written.location).join("q0.t.arrow");
        let mut bytes = fs::read(&file).expect("read");
        let at = bytes.len() / 2;
        bytes[at] ^= 0x10;
        fs::write(&file, &bytes).expect("write");
        let e = read_checkpoint("c", |f| {
            Ok(fs::read(PathBuf::from(&written.location).join(f))?)
        })
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(e.contains("SHA-256 differs"), "{e}");
        assert_eq!(
            store.latest().expect("latest").map(|c| c.manifest.epoch),
            Some(1)
        );
        // Every checkpoint damaged: an error that says so, not "no checkpoint".
        let damaged = CheckpointStore::open(dir.path().join("damaged"), 2).expect("store");
        let written = damaged.write(manifest(1), vec![state(1)]).expect("write");
        let file = PathBuf::from(&written.location).join("q0.t.arrow");
        let mut bytes = fs::read(&file).expect("read");
        bytes[0] ^= 0x01;
        fs::write(&file, &bytes).expect("write");
        let e = damaged
            .latest()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("holds 1 checkpoint and none reads back whole (the newest, chk-"),
            "{e}"
        );
        // A directory named as no checkpoint this code writes is not one.
        fs::create_dir_all(dir.path().join("chk-0")).expect("dir");
        assert!(!store.epochs().expect("epochs").contains(&0));
    }

    #[test]
    fn a_damaged_checkpoint_falls_back_and_leftovers_are_removed() {
        let dir = tempfile::tempdir().expect("dir");
        let store = CheckpointStore::open(dir.path(), 3).expect("store");
        store.write(manifest(1), vec![state(1)]).expect("write");
        let written = store.write(manifest(2), vec![state(2)]).expect("write");
        // A torn file in the newest checkpoint.
        let file = PathBuf::from(&written.location).join("q0.t.arrow");
        let bytes = fs::read(&file).expect("read");
        fs::write(&file, &bytes[..bytes.len() / 2]).expect("truncate");
        fs::create_dir_all(dir.path().join(".chk-000000000003.tmp")).expect("tmp");
        let store = CheckpointStore::open(dir.path(), 3).expect("reopen");
        assert!(!dir.path().join(".chk-000000000003.tmp").exists());
        let c = store.latest().expect("latest").expect("some");
        assert_eq!(c.manifest.epoch, 1);
    }

    #[test]
    fn an_object_store_holds_whole_checkpoints_only() {
        use object_store::memory::InMemory;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let root = Location::Object {
            store: store.clone(),
            prefix: ObjectPath::from("deploy"),
            url: "memory://test".into(),
        };
        let location = root.join("counts").join("camera.0");
        let checkpoints = CheckpointStore::at(location, 2).expect("store");
        rt.block_on(async {
            let c = checkpoints.clone();
            tokio::task::spawn_blocking(move || {
                assert!(c.latest().expect("latest").is_none());
                for epoch in 1..=3 {
                    c.write(manifest(epoch), vec![state(epoch as i64)])
                        .expect("write");
                }
                assert_eq!(c.epochs().expect("epochs"), vec![3, 2]);
                let latest = c.latest().expect("latest").expect("some");
                assert_eq!(latest.manifest.epoch, 3);
                assert_eq!(latest.queries[0].meta["n"], 3);
            })
            .await
            .expect("task");
            // A checkpoint whose manifest never got written (a crash) does not count, and
            // goes when a newer one is written; a damaged file falls back to the one before.
            let dir = ObjectPath::from("deploy/counts/camera.0/chk-000000000004");
            store
                .put(&dir.clone().join("q0.t.arrow"), vec![1u8, 2, 3].into())
                .await
                .expect("put");
            let newest = ObjectPath::from("deploy/counts/camera.0/chk-000000000003/q0.t.arrow");
            store.put(&newest, vec![0u8; 10].into()).await.expect("put");
            let c = checkpoints.clone();
            tokio::task::spawn_blocking(move || {
                assert_eq!(c.epochs().expect("epochs"), vec![3, 2]);
                assert_eq!(c.latest().expect("latest").expect("some").manifest.epoch, 2);
                c.write(manifest(5), vec![state(5)]).expect("write");
                assert_eq!(c.epochs().expect("epochs"), vec![5, 3]);
            })
            .await
            .expect("task");
            let left: Vec<ObjectPath> = store
                .list(Some(&ObjectPath::from("deploy")))
                .map_ok(|m| m.location)
                .try_collect()
                .await
                .expect("list");
            assert!(
                left.iter()
                    .all(|p| !p.as_ref().contains("chk-000000000004")),
                "{left:?}"
            );
            // Dropping the query removes its checkpoints.
            root.join("counts").remove_all().await.expect("remove");
            let left: Vec<ObjectPath> = store
                .list(None)
                .map_ok(|m| m.location)
                .try_collect()
                .await
                .expect("list");
            assert!(left.is_empty(), "{left:?}");
        });
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
