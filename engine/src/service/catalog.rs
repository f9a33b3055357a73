//! The catalog: the queries analysts registered, kept in one JSON file that is rewritten
//! atomically on every change (written to a temporary file beside it, synced, renamed over it,
//! and the directory synced), so a crash leaves either the old or the new catalog, never a
//! torn one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
pub use crate::files::write_atomically;

/// Version of the catalog file's layout.
const VERSION: u32 = 1;

/// Names of dropped queries the catalog remembers, at most.
pub const MAX_DROPPED: usize = 10_000;

/// A registered query.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogEntry {
    /// Its name (also its consumer group's suffix and its metrics label).
    pub name: String,
    /// Its SQL: `CREATE EXTERNAL TABLE`, `SET` and `INSERT INTO … SELECT …` statements.
    pub sql: String,
    /// Whether it was paused (a paused query stays paused after a restart).
    #[serde(default)]
    pub paused: bool,
    /// Its memory pool in bytes when not the configured default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit: Option<u64>,
    /// When it was registered, epoch ms.
    pub created_at: i64,
}

/// What the file holds.
#[derive(Debug, Default, Serialize, Deserialize)]
struct CatalogFile {
    version: u32,
    /// Analysts' queries, in the order they were registered.
    queries: Vec<CatalogEntry>,
    /// Built-in queries an operator paused.
    #[serde(default)]
    paused_builtins: Vec<String>,
    /// Names of dropped queries not registered again since: one registered under such a name
    /// starts from scratch rather than resume the dropped one's committed offsets.
    #[serde(default)]
    dropped: Vec<String>,
    /// Queries reset and not checkpointed since: they start afresh (with empty state, from
    /// the beginning of their inputs) at their next start, also after the service restarts.
    #[serde(default)]
    reset: Vec<String>,
}

/// The catalog on disk and in memory.
#[derive(Debug)]
pub struct Catalog {
    path: PathBuf,
    file: CatalogFile,
}

impl Catalog {
    /// Opens the catalog at `path`, or starts an empty one if there is no file yet (its
    /// directory is created on the first write).
    pub fn open(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let file = match std::fs::read(&path) {
            Ok(bytes) => {
                let file: CatalogFile = serde_json::from_slice(&bytes)
                    .map_err(|e| Error::Config(format!("catalog {}: {e}", path.display())))?;
                if file.version != VERSION {
                    return Err(Error::Config(format!(
                        "catalog {}: layout version {} (this urbanstream reads {VERSION})",
                        path.display(),
                        file.version
                    )));
                }
                file
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => CatalogFile {
                version: VERSION,
                ..CatalogFile::default()
            },
            Err(e) => {
                return Err(Error::Config(format!("catalog {}: {e}", path.display())));
            }
        };
        Ok(Self { path, file })
    }

    /// Where the catalog lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The registered queries.
    pub fn entries(&self) -> &[CatalogEntry] {
        &self.file.queries
    }

    /// Whether the built-in query `name` was paused.
    pub fn builtin_paused(&self, name: &str) -> bool {
        self.file.paused_builtins.iter().any(|n| n == name)
    }

    /// Adds `entry` (its name must be new) and writes the catalog. Returns whether a query of
    /// that name was dropped before (see [`Catalog::remove`]): it then starts afresh, as a
    /// reset one does, until it has checkpointed ([`Catalog::set_reset`]), also after a
    /// restart.
    pub fn insert(&mut self, entry: CatalogEntry) -> Result<bool> {
        let was_dropped = self.file.dropped.contains(&entry.name);
        self.update(|file| {
            file.dropped.retain(|n| *n != entry.name);
            file.queries.retain(|e| e.name != entry.name);
            file.reset.retain(|n| *n != entry.name);
            if was_dropped {
                file.reset.push(entry.name.clone());
            }
            file.queries.push(entry);
        })?;
        Ok(was_dropped)
    }

    /// Removes the query `name`, remembers that it was dropped (the last [`MAX_DROPPED`]
    /// names), and writes the catalog.
    pub fn remove(&mut self, name: &str) -> Result<()> {
        self.update(|file| {
            file.queries.retain(|e| e.name != name);
            if !file.dropped.iter().any(|n| n == name) {
                file.dropped.push(name.to_string());
            }
            // Bounded: a client creating and dropping ever new names grew the catalog without
            // end. A name dropped before the last MAX_DROPPED others, registered again,
            // resumes the offsets its consumer group committed.
            if file.dropped.len() > MAX_DROPPED {
                let over = file.dropped.len() - MAX_DROPPED;
                file.dropped.drain(..over);
            }
        })
    }

    /// Records whether `name` is paused (a registered or a built-in query) and writes the
    /// catalog.
    pub fn set_paused(&mut self, name: &str, paused: bool, builtin: bool) -> Result<()> {
        self.update(|file| {
            if builtin {
                file.paused_builtins.retain(|n| n != name);
                if paused {
                    file.paused_builtins.push(name.to_string());
                }
            } else if let Some(entry) = file.queries.iter_mut().find(|e| e.name == name) {
                entry.paused = paused;
            }
        })
    }

    /// Whether the query `name` was reset and has not been checkpointed since.
    pub fn reset_pending(&self, name: &str) -> bool {
        self.file.reset.iter().any(|n| n == name)
    }

    /// Records that the query `name` was reset (`pending`), or that it has checkpointed
    /// since, and writes the catalog.
    pub fn set_reset(&mut self, name: &str, pending: bool) -> Result<()> {
        if self.reset_pending(name) == pending {
            return Ok(());
        }
        self.update(|file| {
            file.reset.retain(|n| n != name);
            if pending {
                file.reset.push(name.to_string());
            }
        })
    }

    /// Replaces the SQL of the registered query `name` (an upgrade).
    pub fn set_sql(&mut self, name: &str, sql: &str) -> Result<()> {
        self.update(|file| {
            if let Some(entry) = file.queries.iter_mut().find(|e| e.name == name) {
                entry.sql = sql.to_string();
            }
        })
    }

    /// Applies `change` to a copy, writes it, and keeps it only once it is on disk.
    fn update(&mut self, change: impl FnOnce(&mut CatalogFile)) -> Result<()> {
        let mut next = CatalogFile {
            version: VERSION,
            queries: self.file.queries.clone(),
            paused_builtins: self.file.paused_builtins.clone(),
            dropped: self.file.dropped.clone(),
            reset: self.file.reset.clone(),
        };
        change(&mut next);
        write_atomically(
            &self.path,
            &serde_json::to_vec_pretty(&next)
                .map_err(|e| Error::Config(format!("catalog {}: {e}", self.path.display())))?,
        )?;
        self.file = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str) -> CatalogEntry {
        CatalogEntry {
            name: name.into(),
            sql: format!("INSERT INTO out SELECT * FROM {name}"),
            paused: false,
            memory_limit: None,
            created_at: 1,
        }
    }

    /// The names of dropped queries are bounded: a client creating and dropping ever new
    /// names grew the catalog without end. The oldest go first.
    #[test]
    fn the_dropped_names_remembered_are_bounded() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("catalog.json");
        let file = CatalogFile {
            version: 1,
            dropped: (0..MAX_DROPPED).map(|i| format!("q{i}")).collect(),
            ..CatalogFile::default()
        };
        std::fs::write(&path, serde_json::to_vec(&file).expect("json")).expect("write");
        let mut catalog = Catalog::open(&path).expect("open");
        catalog.insert(entry("new")).expect("insert");
        catalog.remove("new").expect("remove");
        let reopened = Catalog::open(&path).expect("reopen");
        assert_eq!(reopened.file.dropped.len(), MAX_DROPPED);
        assert_eq!(
            reopened.file.dropped.first().map(String::as_str),
            Some("q1")
        );
        assert_eq!(
            reopened.file.dropped.last().map(String::as_str),
            Some("new")
        );
    }

    #[test]
    fn entries_survive_reopening() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("data/catalog.json");
        let mut catalog = Catalog::open(&path).expect("new");
        assert!(catalog.entries().is_empty());
        catalog.insert(entry("a")).expect("insert");
        catalog.insert(entry("b")).expect("insert");
        catalog.set_paused("b", true, false).expect("pause");
        catalog
            .set_paused("congestion_minute", true, true)
            .expect("pause");
        catalog.remove("a").expect("remove");
        let reopened = Catalog::open(&path).expect("reopen");
        let mut b = entry("b");
        b.paused = true;
        assert_eq!(reopened.entries(), &[b]);
        assert!(reopened.builtin_paused("congestion_minute"));
        assert!(!reopened.builtin_paused("air_hourly_ward"));
        // The drop of a is remembered across the reopening, once.
        let mut reopened = reopened;
        assert!(
            reopened.insert(entry("a")).expect("insert"),
            "a was dropped"
        );
        // Created again after a drop, it starts afresh until it checkpoints, also when the
        // service restarts before that.
        assert!(reopened.reset_pending("a"));
        reopened.set_reset("a", false).expect("checkpointed");
        reopened.remove("a").expect("remove");
        assert!(reopened.insert(entry("a")).expect("insert"));
        assert!(!reopened.insert(entry("c")).expect("insert"), "c never was");
        assert!(!reopened.reset_pending("c"));
        assert!(Catalog::open(&path).expect("reopen").reset_pending("a"));
        reopened.remove("a").expect("remove");
        reopened.remove("c").expect("remove");
        // Nothing but the catalog is left in its directory.
        let names: Vec<_> = std::fs::read_dir(path.parent().expect("dir"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("catalog.json")]);
    }

    #[test]
    fn a_damaged_catalog_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("catalog.json");
        std::fs::write(&path, b"{\"version\": 1, \"queries\": [").expect("write");
        let err = Catalog::open(&path).expect_err("damaged").to_string();
        assert!(err.contains("catalog.json"), "{err}");
    }
}
