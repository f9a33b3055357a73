//! Files written so that a crash leaves either the old or the new contents, never a torn file.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::Result;

/// Writes `bytes` to `path` atomically: to a temporary file beside it, synced, renamed over
/// it, and the directory synced.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    // The rename itself is durable once the directory is synced.
    File::open(&dir)?.sync_all()?;
    Ok(())
}
