//! Savepoints: a query's state kept under a name, to go back to or to start changed SQL
//! from.
//!
//! A query's checkpoints live in one store ([`CheckpointStore`]) when one state holds all its
//! partitions, or in one store per input partition (`<topic>.<partition>/`) otherwise. A
//! savepoint copies the newest whole checkpoint of every store below the query's location to
//! a location of its own, with `savepoint.json` beside them:
//!
//! ```text
//! _savepoints/<query>/<savepoint>/
//!   savepoint.json                 name, query, SQL, state layouts, stores with their epochs
//!   chk-000000000042/…             the query's one store, or
//!   city.camera.events.0/chk-…/…   one store per input partition
//! ```
//!
//! Savepoints are not pruned and outlive the query they were taken of. Going back to one
//! ([`restore`]) writes each of its checkpoints into the query's store of the same name as
//! the store's newest, and then removes the stores the savepoint has none of; the query then
//! recovers from them as from its own checkpoints. Nothing of the query's is removed before
//! every store is written, so a failed attempt can be made again.

use object_store::ObjectStoreExt;
use serde::{Deserialize, Serialize};

use super::{CheckpointStore, Location, Manifest, Position, block_on, io_error, object_error};
use crate::error::{Error, Result};

/// The file that describes a savepoint.
const FILE: &str = "savepoint.json";

/// What `savepoint.json` says.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Savepoint {
    /// Its name.
    pub name: String,
    /// The query it was taken of.
    pub query: String,
    /// The query's SQL when it was taken.
    pub sql: String,
    /// When it was taken, epoch ms.
    pub created_at_ms: i64,
    /// What the state it keeps holds (`StreamQuery::state_layout`), as its checkpoints
    /// recorded it: one per stream statement with state.
    pub layouts: Vec<Vec<String>>,
    /// The stores copied.
    pub stores: Vec<SavedStore>,
    /// Bytes copied.
    pub bytes: u64,
    /// In a listing, why a savepoint's `savepoint.json` does not read (its other fields are
    /// then empty); never written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub damaged: Option<String>,
}

/// One store of a [`Savepoint`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedStore {
    /// Its directory below the query's location (`<topic>.<partition>`); empty for the
    /// query's one store.
    pub store: String,
    /// The epoch of the checkpoint copied.
    pub epoch: u64,
    /// Its input positions: where the query goes on reading once restored.
    pub positions: Vec<Position>,
}

/// The stores below `location`: `""` when it holds checkpoints itself, and each
/// sub-directory that holds checkpoints, sorted.
pub fn stores_below(location: &Location) -> Result<Vec<String>> {
    let is_checkpoint = |name: &str| name.starts_with("chk-");
    let mut out = std::collections::BTreeSet::new();
    match location {
        Location::Local(dir) => {
            if !dir.exists() {
                return Ok(Vec::new());
            }
            for entry in std::fs::read_dir(dir).map_err(|e| io_error("list", dir, e))? {
                let entry = entry.map_err(|e| io_error("list", dir, e))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if is_checkpoint(&name) {
                    out.insert(String::new());
                } else if !name.starts_with('.')
                    // A directory of its own, not a symbolic link to one elsewhere (a savepoint
                    // once read a linked directory's checkpoints, and a go-back wrote there).
                    && entry.file_type().is_ok_and(|t| t.is_dir())
                    && std::fs::read_dir(entry.path())
                        .map_err(|e| io_error("list", &entry.path(), e))?
                        .filter_map(|e| e.ok())
                        .any(|e| is_checkpoint(&e.file_name().to_string_lossy()))
                {
                    out.insert(name);
                }
            }
        }
        Location::Object { store, prefix, .. } => {
            use futures::TryStreamExt;
            let objects: Vec<object_store::path::Path> = block_on(
                store
                    .list(Some(prefix))
                    .map_ok(|m| m.location)
                    .try_collect(),
            )?
            .map_err(|e| object_error("list", location, e))?;
            for object in &objects {
                let parts: Vec<String> = object
                    .prefix_match(prefix)
                    .map(|p| p.map(|s| s.as_ref().to_string()).collect())
                    .unwrap_or_default();
                match parts.as_slice() {
                    [dir, _] if is_checkpoint(dir) => {
                        out.insert(String::new());
                    }
                    [store, dir, _] if is_checkpoint(dir) => {
                        out.insert(store.clone());
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(out.into_iter().collect())
}

/// Copies the newest whole checkpoint of every store below `from` to the same store below
/// `to` (a new savepoint); returns the stores copied and the bytes written. Fails when a
/// store has no checkpoint that reads back whole. Blocking (object stores are reached
/// through the current tokio runtime: call it from a blocking thread).
pub fn copy_newest(from: &Location, to: &Location) -> Result<(Vec<SavedStore>, u64)> {
    copy_stores(from, to, false)
}

/// Takes the query at `to` back to the savepoint at `from`: each of the savepoint's
/// checkpoints becomes the newest of the query's store of the same name (numbered after the
/// store's own), then the query's stores the savepoint has none of are removed. Blocking.
pub fn restore(from: &Location, to: &Location) -> Result<Vec<SavedStore>> {
    let (stores, _) = copy_stores(from, to, true)?;
    for name in stores_below(to)? {
        if !stores.iter().any(|s| s.store == name) {
            let at = if name.is_empty() {
                // The query's one store, where the savepoint has per-partition ones: its
                // checkpoints are the `chk-*` entries beside them.
                return Err(Error::Checkpoint(format!(
                    "{to} holds one state for all partitions and the savepoint one per \
                     partition: the query was planned otherwise when it was taken"
                )));
            } else {
                to.join(&name)
            };
            block_on(at.remove_all())??;
        }
    }
    Ok(stores)
}

fn copy_stores(from: &Location, to: &Location, after: bool) -> Result<(Vec<SavedStore>, u64)> {
    let mut stores = Vec::new();
    let mut bytes = 0;
    for name in stores_below(from)? {
        let (source, target) = if name.is_empty() {
            (from.clone(), to.clone())
        } else {
            (from.join(&name), to.join(&name))
        };
        let Some(checkpoint) = CheckpointStore::at(source.clone(), usize::MAX)?.latest()? else {
            return Err(Error::Checkpoint(format!(
                "{source} has no checkpoint that reads back whole"
            )));
        };
        let mut manifest = checkpoint.manifest;
        let (epoch, positions) = (manifest.epoch, manifest.positions.clone());
        let target = CheckpointStore::at(target, usize::MAX)?;
        if after && let Some(newest) = target.epochs()?.first() {
            manifest.epoch = manifest.epoch.max(newest.saturating_add(1));
        }
        let written = target.write(manifest, checkpoint.queries)?;
        bytes += written.bytes;
        stores.push(SavedStore {
            store: name,
            epoch,
            positions,
        });
    }
    Ok((stores, bytes))
}

/// The manifest of the newest whole checkpoint of every store below `location`, with the
/// store's name. Blocking.
pub fn newest_manifests(location: &Location) -> Result<Vec<(String, Manifest)>> {
    let mut out = Vec::new();
    for name in stores_below(location)? {
        let at = if name.is_empty() {
            location.clone()
        } else {
            location.join(&name)
        };
        if let Some(manifest) = CheckpointStore::at(at, usize::MAX)?.latest_manifest()? {
            out.push((name, manifest));
        }
    }
    Ok(out)
}

/// A stream statement that state is to be restored into.
#[derive(Debug, Clone)]
pub struct Wanted {
    /// Its SQL.
    pub sql: String,
    /// Its `SET urbanstream.…` statements.
    pub settings: Vec<String>,
    /// What its state holds (`StreamQuery::state_layout`).
    pub layout: Vec<String>,
    /// The topics it reads and writes (`StreamQuery::tables_identity`).
    pub tables: Vec<String>,
    /// The topic by whose partitions its state is kept, when it is kept per partition: its
    /// input, or its repartition topic.
    pub topic: String,
}

/// Why the newest checkpoints `held` (each with its store's name, as
/// [`newest_manifests`] gives them) cannot be restored into the stream statements `wanted`,
/// in their order; `None` when each fits. Recovery restores a store's states into the
/// statements that read the store's topic (every statement, for the query's one store)
/// one by one in order, so statements swapped, added or removed do not fit.
pub fn misfit(held: &[(String, Manifest)], wanted: &[Wanted]) -> Option<String> {
    let plural = |n: usize| if n == 1 { "" } else { "s" };
    for (store, manifest) in held {
        let topic = store.rsplit_once('.').map(|(topic, _)| topic);
        let ours: Vec<(usize, &Wanted)> = wanted
            .iter()
            .enumerate()
            .filter(|(_, w)| topic.is_none_or(|t| w.topic == t))
            .collect();
        let taken = &manifest.queries;
        if taken.len() != ours.len() {
            let reading = topic.map_or(String::new(), |t| format!(" reading {t}"));
            return Some(format!(
                "the state holds {} stream statement{}{reading} where the new SQL has {} \
                 stream statement{}{reading}: an upgrade keeps the statements of a query in \
                 their order (register another statement as a query of its own)",
                taken.len(),
                plural(taken.len()),
                ours.len(),
                plural(ours.len()),
            ));
        }
        for (taken, (i, w)) in taken.iter().zip(ours) {
            if let Some(why) = super::misfit(taken, &w.sql, &w.settings, &w.tables, &w.layout) {
                return Some(format!(
                    "stream statement {} of the new SQL: {why} (an upgrade keeps the \
                     statements of a query in their order)",
                    i + 1
                ));
            }
        }
    }
    None
}

/// Checks that the savepoint at `location` holds what `savepoint` lists, before anything of
/// the query's is changed: each store's checkpoint, reading back whole at the epoch it was
/// taken at, and no store it does not list. Blocking.
pub fn verify(location: &Location, savepoint: &Savepoint) -> Result<()> {
    let named = |store: &str| match store {
        "" => "its one store".to_string(),
        s => format!("its store {s}"),
    };
    let found = stores_below(location)?;
    for saved in &savepoint.stores {
        if !found.contains(&saved.store) {
            return Err(Error::Checkpoint(format!(
                "{} is missing",
                named(&saved.store)
            )));
        }
        let at = match saved.store.as_str() {
            "" => location.clone(),
            s => location.join(s),
        };
        let latest = CheckpointStore::at(at, usize::MAX)?.latest().map_err(|e| {
            Error::Checkpoint(format!(
                "{} does not read back whole ({e})",
                named(&saved.store)
            ))
        })?;
        match latest {
            Some(c) if c.manifest.epoch == saved.epoch => {}
            Some(c) => {
                return Err(Error::Checkpoint(format!(
                    "{} reads back whole at epoch {} only, not at epoch {} it was taken at",
                    named(&saved.store),
                    c.manifest.epoch,
                    saved.epoch
                )));
            }
            None => {
                return Err(Error::Checkpoint(format!(
                    "{} does not read back whole",
                    named(&saved.store)
                )));
            }
        }
    }
    if let Some(other) = found
        .iter()
        .find(|f| !savepoint.stores.iter().any(|s| &s.store == *f))
    {
        return Err(Error::Checkpoint(format!(
            "it holds {}, which it does not list",
            named(other)
        )));
    }
    Ok(())
}

/// Writes `savepoint`'s description into `location` (last, once its stores are there).
pub fn describe(location: &Location, savepoint: &Savepoint) -> Result<()> {
    let json = serde_json::to_vec_pretty(savepoint)
        .map_err(|e| Error::Checkpoint(format!("cannot encode the savepoint: {e}")))?;
    match location {
        Location::Local(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| io_error("create", dir, e))?;
            crate::files::write_atomically(&dir.join(FILE), &json)
        }
        Location::Object { store, prefix, .. } => {
            block_on(store.put(&prefix.clone().join(FILE), json.into()))?
                .map_err(|e| object_error("write", location, e))?;
            Ok(())
        }
    }
}

/// The savepoint at `location`, if there is one. Blocking, like [`copy_newest`].
pub fn read(location: &Location) -> Result<Option<Savepoint>> {
    let bytes = match location {
        Location::Local(dir) => match std::fs::read(dir.join(FILE)) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_error("read", &dir.join(FILE), e)),
        },
        Location::Object { store, prefix, .. } => {
            let path = prefix.clone().join(FILE);
            match block_on(async { store.get(&path).await?.bytes().await })? {
                Ok(b) => b.to_vec(),
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(object_error("read", location, e)),
            }
        }
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| Error::Checkpoint(format!("{location}/{FILE}: not a savepoint: {e}")))
}

/// The savepoints kept below `location` (one sub-directory each), by name. Blocking.
pub fn list(location: &Location) -> Result<Vec<Savepoint>> {
    let names: Vec<String> = match location {
        Location::Local(dir) => {
            if !dir.exists() {
                return Ok(Vec::new());
            }
            std::fs::read_dir(dir)
                .map_err(|e| io_error("list", dir, e))?
                .filter_map(|e| e.ok())
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        }
        Location::Object { store, prefix, .. } => {
            let listed = block_on(store.list_with_delimiter(Some(prefix)))?
                .map_err(|e| object_error("list", location, e))?;
            listed
                .common_prefixes
                .iter()
                .filter_map(|p| p.filename().map(str::to_string))
                .collect()
        }
    };
    let mut out = Vec::new();
    for name in names {
        // One damaged description does not hide the others.
        match read(&location.join(&name)) {
            Ok(Some(savepoint)) => out.push(savepoint),
            Ok(None) => {}
            Err(e) => out.push(Savepoint {
                name,
                query: String::new(),
                sql: String::new(),
                created_at_ms: 0,
                layouts: Vec::new(),
                stores: Vec::new(),
                bytes: 0,
                damaged: Some(e.to_string()),
            }),
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{ArrayRef, Int64Array};

    use super::*;
    use crate::checkpoint::{Manifest, QueryManifest, StateSnapshot, table};

    fn checkpoint(epoch: u64, partition: i32, value: i64) -> (Manifest, Vec<StateSnapshot>) {
        let manifest = Manifest {
            version: 0,
            epoch,
            created_at_ms: 1,
            positions: vec![Position {
                topic: "in".into(),
                partition,
                offset: epoch as i64 * 10,
            }],
            outputs: vec![],
            queries: vec![QueryManifest {
                name: "q".into(),
                sql: "SELECT 1".into(),
                layout: vec!["window".into()],
                settings: Vec::new(),
                tables: Vec::new(),
                meta: serde_json::Value::Null,
            }],
            files: vec![],
            digests: Default::default(),
            partition_counts: Default::default(),
        };
        let mut state = StateSnapshot {
            meta: serde_json::json!({"value": value}),
            ..Default::default()
        };
        let column: ArrayRef = Arc::new(Int64Array::from(vec![value]));
        state
            .tables
            .insert("t".into(), table(vec![("v".into(), column)]).unwrap());
        (manifest, vec![state])
    }

    fn stores(location: &Location) -> Vec<(String, u64, i64)> {
        stores_below(location)
            .unwrap()
            .into_iter()
            .map(|name| {
                let at = if name.is_empty() {
                    location.clone()
                } else {
                    location.join(&name)
                };
                let c = CheckpointStore::at(at, 1)
                    .unwrap()
                    .latest()
                    .unwrap()
                    .unwrap();
                let value = c.queries[0].meta["value"].as_i64().unwrap();
                (name, c.manifest.epoch, value)
            })
            .collect()
    }

    /// A savepoint is checked whole before a query goes back to it: a store it lists gone, one
    /// whose checkpoint does not read back, or one it does not list is named (the query's own
    /// state was replaced, and it failed, before this was found); a description that does not
    /// read is listed as damaged beside the others, which stay listed.
    #[test]
    fn a_damaged_savepoint_is_named_before_anything_changes() {
        let dir = tempfile::tempdir().unwrap();
        let query = Location::Local(dir.path().join("q"));
        for partition in 0..3 {
            let store = CheckpointStore::at(query.join(&format!("in.{partition}")), 3).unwrap();
            let (m, s) = checkpoint(2, partition, 7);
            store.write(m, s).unwrap();
        }
        let root = dir.path().join("_savepoints/q");
        let take = |name: &str| {
            let saved = Location::Local(root.join(name));
            let (stores, bytes) = copy_newest(&query, &saved).unwrap();
            let described = Savepoint {
                name: name.into(),
                query: "q".into(),
                sql: "SELECT 1".into(),
                created_at_ms: 7,
                layouts: vec![],
                stores,
                bytes,
                damaged: None,
            };
            describe(&saved, &described).unwrap();
            (saved, described)
        };
        let (good, described) = take("good");
        verify(&good, &described).unwrap();
        let (gone, described) = take("gone");
        std::fs::remove_dir_all(root.join("gone/in.1")).unwrap();
        let e = verify(&gone, &described).unwrap_err().to_string();
        assert!(e.contains("its store in.1 is missing"), "{e}");
        let (cut, described) = take("cut");
        let files: Vec<_> = walk(&root.join("cut/in.2"))
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "arrow"))
            .collect();
        assert!(!files.is_empty());
        for f in files {
            let bytes = std::fs::read(&f).unwrap();
            std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
        }
        let e = verify(&cut, &described).unwrap_err().to_string();
        assert!(e.contains("its store in.2 does not read back whole"), "{e}");
        let (more, mut described) = take("more");
        described.stores.pop();
        let e = verify(&more, &described).unwrap_err().to_string();
        assert!(
            e.contains("it holds its store in.2, which it does not list"),
            "{e}"
        );
        std::fs::write(root.join("more/savepoint.json"), "{").unwrap();
        let listed = list(&Location::Local(root.clone())).unwrap();
        let shown: Vec<(&str, bool)> = listed
            .iter()
            .map(|s| (s.name.as_str(), s.damaged.is_some()))
            .collect();
        assert_eq!(
            shown,
            [
                ("cut", false),
                ("gone", false),
                ("good", false),
                ("more", true)
            ]
        );
    }

    /// Every file below `dir`.
    fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                out.extend(walk(&path));
            } else {
                out.push(path);
            }
        }
        out
    }

    #[tokio::test]
    async fn the_newest_checkpoint_of_every_partition_store_is_saved_and_restored() {
        let dir = tempfile::tempdir().unwrap();
        let query = Location::Local(dir.path().join("q"));
        for (partition, epochs) in [(0, 3u64), (1, 5)] {
            let store = CheckpointStore::at(query.join(&format!("in.{partition}")), 3).unwrap();
            for epoch in 1..=epochs {
                let (m, s) = checkpoint(epoch, partition, epoch as i64 * 100 + partition as i64);
                store.write(m, s).unwrap();
            }
        }
        // A directory without checkpoints is not a store.
        std::fs::create_dir_all(dir.path().join("q/empty")).unwrap();
        let saved = Location::Local(dir.path().join("_savepoints/q/before"));
        let (copied, bytes) = copy_newest(&query, &saved).unwrap();
        assert!(bytes > 0);
        assert_eq!(
            copied
                .iter()
                .map(|s| (s.store.as_str(), s.epoch, s.positions[0].offset))
                .collect::<Vec<_>>(),
            [("in.0", 3, 30), ("in.1", 5, 50)]
        );
        assert_eq!(
            stores(&saved),
            [("in.0".to_string(), 3, 300), ("in.1".to_string(), 5, 501)]
        );
        describe(
            &saved,
            &Savepoint {
                name: "before".into(),
                query: "q".into(),
                sql: "SELECT 1".into(),
                created_at_ms: 7,
                layouts: vec![vec!["window".into()]],
                stores: copied,
                bytes,
                damaged: None,
            },
        )
        .unwrap();
        // The query goes on (and takes up a third partition); then it is taken back to the
        // savepoint: each store's newest checkpoint is the savepoint's, numbered after the
        // store's own, and the store the savepoint has none of is gone.
        let store = CheckpointStore::at(query.join("in.0"), 3).unwrap();
        let (m, s) = checkpoint(4, 0, 999);
        store.write(m, s).unwrap();
        let store = CheckpointStore::at(query.join("in.2"), 3).unwrap();
        let (m, s) = checkpoint(1, 2, 2);
        store.write(m, s).unwrap();
        let at = (saved.clone(), query.clone());
        let back = tokio::task::spawn_blocking(move || restore(&at.0, &at.1))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(
            stores(&query),
            [("in.0".to_string(), 5, 300), ("in.1".to_string(), 6, 501)]
        );
        let manifests = newest_manifests(&query).unwrap();
        assert_eq!(manifests.len(), 2);
        let wanted = |sql: &str, layout: &str, topic: &str| Wanted {
            sql: sql.into(),
            settings: Vec::new(),
            layout: vec![layout.into()],
            tables: Vec::new(),
            topic: topic.into(),
        };
        assert_eq!(
            misfit(&manifests, &[wanted("SELECT 2", "window", "in")]),
            None
        );
        assert_eq!(
            misfit(&manifests, &[wanted("SELECT 2", "other", "in")]).as_deref(),
            Some(
                "stream statement 1 of the new SQL: the state holds \"window\" where the new \
                 SQL needs \"other\" (an upgrade keeps the statements of a query in their order)"
            )
        );
        // A statement of another input takes none of this state; one more of this input
        // would have none to take.
        assert_eq!(
            misfit(
                &manifests,
                &[
                    wanted("SELECT 2", "window", "in"),
                    wanted("SELECT 3", "x", "other")
                ]
            ),
            None
        );
        let more = misfit(
            &manifests,
            &[
                wanted("SELECT 2", "window", "in"),
                wanted("SELECT 3", "window", "in"),
            ],
        )
        .unwrap();
        assert!(
            more.starts_with(
                "the state holds 1 stream statement reading in where the new SQL has 2"
            ),
            "{more}"
        );
        // An empty savepoint store is an error, not a savepoint without it.
        assert!(copy_newest(&Location::Local(dir.path().join("nothing")), &saved).is_ok());
        std::fs::create_dir_all(dir.path().join("broken/chk-000000000001")).unwrap();
        assert!(
            copy_newest(
                &Location::Local(dir.path().join("broken")),
                &Location::Local(dir.path().join("out"))
            )
            .is_err()
        );
        let listed = list(&Location::Local(dir.path().join("_savepoints/q"))).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].name, "before");
        assert_eq!(listed[0].stores.len(), 2);
        assert!(
            read(&Location::Local(dir.path().join("nothing")))
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn savepoints_work_in_an_object_store() {
        tokio::task::spawn_blocking(move || {
            let store: Arc<dyn object_store::ObjectStore> =
                Arc::new(object_store::memory::InMemory::new());
            let at = |prefix: &str| Location::Object {
                store: store.clone(),
                prefix: object_store::path::Path::from(prefix),
                url: "memory://".into(),
            };
            let query = at("root/q");
            CheckpointStore::at(query.clone(), 3)
                .unwrap()
                .write(checkpoint(2, 0, 42).0, checkpoint(2, 0, 42).1)
                .unwrap();
            let saved = at("root/_savepoints/q/s1");
            let (copied, bytes) = copy_newest(&query, &saved).unwrap();
            assert_eq!(copied.len(), 1);
            assert_eq!(copied[0].store, "");
            describe(
                &saved,
                &Savepoint {
                    name: "s1".into(),
                    query: "q".into(),
                    sql: "SELECT 1".into(),
                    created_at_ms: 7,
                    layouts: vec![],
                    stores: copied,
                    bytes,
                    damaged: None,
                },
            )
            .unwrap();
            assert_eq!(stores(&saved), [(String::new(), 2, 42)]);
            let listed = list(&at("root/_savepoints/q")).unwrap();
            assert_eq!(listed.len(), 1);
            assert_eq!(listed[0].name, "s1");
        })
        .await
        .unwrap();
    }
}
