//! Compiles the files of `schemas/topics/`, `schemas/reference/` and `queries/` into the
//! binary: a new schema, reference table or default query is a new file, with no list to edit.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("manifest dir"));
    let root = manifest.parent().expect("workspace root").to_path_buf();
    let mut out = String::new();
    for (name, relative, ext, stem) in [
        ("SCHEMA_FILES", "schemas/topics", "avsc", true),
        ("REFERENCE_FILES", "schemas/reference", "csv", false),
        ("QUERY_FILES", "queries", "sql", true),
    ] {
        let dir = root.join(relative);
        println!("cargo:rerun-if-changed={}", dir.display());
        let files = files(&dir, ext);
        writeln!(
            out,
            "/// The `*.{ext}` files of `{}`: (name, contents), by name.",
            relative
        )
        .expect("write");
        writeln!(out, "pub const {name}: &[(&str, &str)] = &[").expect("write");
        for path in files {
            let file = path
                .file_name()
                .and_then(|n| n.to_str())
                .expect("utf-8 name");
            let key = if stem {
                path.file_stem()
                    .and_then(|n| n.to_str())
                    .expect("utf-8 name")
            } else {
                file
            };
            println!("cargo:rerun-if-changed={}", path.display());
            writeln!(
                out,
                "    ({key:?}, include_str!({:?})),",
                path.display().to_string()
            )
            .expect("write");
        }
        writeln!(out, "];").expect("write");
    }
    let target = PathBuf::from(std::env::var_os("OUT_DIR").expect("out dir")).join("embedded.rs");
    std::fs::write(target, out).expect("write embedded.rs");
}

/// The files of `dir` ending in `.ext`, by name.
fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().and_then(|e| e.to_str()) == Some(ext))
        .collect();
    files.sort();
    files
}
