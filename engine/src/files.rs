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
    sync_dir(&dir)
}

/// Makes the entries of directory `dir` (a file renamed into it or out of it) durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// The largest file of SQL statements read (the statements themselves are held to the
/// sandbox's limits when planned).
pub const SQL_FILE_BYTES: u64 = 16 << 20;

/// The longest line a file of rows (CSV, JSON lines, a labelled series) may have: far above
/// any record the engine takes (256 KiB), so that a file with no line ends (a JSON array on
/// one line, a device) is refused rather than read into memory whole.
pub const MAX_LINE_BYTES: u64 = 64 << 20;

/// Refuses `path` if a line of it is longer than [`MAX_LINE_BYTES`], naming the line; reads
/// it through once, holding a buffer's worth at a time.
pub fn check_line_lengths(path: &Path) -> Result<()> {
    check_lines_within(path, MAX_LINE_BYTES, 1 << 20)
}

/// [`check_line_lengths`] with a limit of `max` bytes, reading `buffer` bytes at a time.
fn check_lines_within(path: &Path, max: u64, buffer: usize) -> Result<()> {
    use std::io::BufRead;
    let shown = path.display();
    let file =
        File::open(path).map_err(|e| crate::error::Error::Config(format!("{shown}: {e}")))?;
    let mut reader = std::io::BufReader::with_capacity(buffer, file);
    let (mut line, mut length) = (1u64, 0u64);
    loop {
        let buffer = reader
            .fill_buf()
            .map_err(|e| crate::error::Error::Config(format!("{shown}: {e}")))?;
        if buffer.is_empty() {
            return Ok(());
        }
        let n = buffer.len();
        let mut start = 0;
        while let Some(at) = buffer[start..].iter().position(|b| *b == b'\n') {
            if length + at as u64 > max {
                break;
            }
            line += 1;
            length = 0;
            start += at + 1;
        }
        length += (n - start) as u64;
        if length > max {
            let limit = match max >> 20 {
                0 => format!("{max} bytes"),
                mib => format!("{mib} MiB"),
            };
            return Err(crate::error::Error::Config(format!(
                "{shown}: line {line} is longer than {limit} (a record may be at most 256 \
                 KiB): a file of rows has one row a line (a JSON array on one line, or a file \
                 without line ends, is not one)"
            )));
        }
        reader.consume(n);
    }
}

/// The text of `path`, refused past `max` bytes (a device or a file of another kind given
/// where a small text is expected would otherwise be read into memory whole). `what` names
/// it in errors.
pub fn read_text(path: &Path, max: u64, what: &str) -> Result<String> {
    use std::io::Read;
    let shown = path.display();
    let file = File::open(path)
        .map_err(|e| crate::error::Error::Config(format!("{what} {shown}: {e}")))?;
    let mut bytes = Vec::new();
    file.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| crate::error::Error::Config(format!("{what} {shown}: {e}")))?;
    if bytes.len() as u64 > max {
        return Err(crate::error::Error::Config(format!(
            "{what} {shown}: longer than {max} bytes, more than such a file holds"
        )));
    }
    String::from_utf8(bytes)
        .map_err(|e| crate::error::Error::Config(format!("{what} {shown}: not UTF-8 text ({e})")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line over the limit is named, wherever it falls among buffers (a limit of 4 096
    /// bytes, read 1 000 bytes at a time, the long lines shifted across buffer edges); lines
    /// up to it pass.
    #[test]
    fn a_line_over_the_limit_is_named() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("rows.jsonl");
        let limit = 4096;
        for shift in [0, 1, 333, 999] {
            let mut text = b"{\"a\":1}\n".to_vec();
            text.extend(std::iter::repeat_n(b' ', shift));
            text.push(b'\n');
            text.extend(std::iter::repeat_n(b'x', limit));
            text.extend_from_slice(b"\n{\"a\":2}\n");
            std::fs::write(&path, &text)?;
            check_lines_within(&path, limit as u64, 1000)?;
            text.extend(std::iter::repeat_n(b'y', limit + 1));
            std::fs::write(&path, &text)?;
            let e = check_lines_within(&path, limit as u64, 1000).expect_err("too long");
            assert!(
                e.to_string().contains("line 5 is longer than 4096 bytes"),
                "{e}"
            );
        }
        Ok(())
    }
}
