//! Stream SQL tests: every `.slt` file under `tests/slt/` runs against the engine's
//! deterministic mode (the same planner and operators as the service), following the pattern
//! insert events → query the sink → advance the watermark → query again. Each file runs twice:
//! as written, and with every query checkpointed, planned again and restored after each
//! statement (`RESTART`), which must not change any result.
//!
//! Files under `tests/slt/city/` run in the city's SQL context (the streams declared by
//! `schemas/topics/`, the reference tables of `schemas/reference/`), where
//! `DEFAULT QUERY <name>` registers `queries/<name>.sql` as the service does: those files test
//! the default queries themselves.

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use datafusion::arrow::array::Array;
use datafusion::arrow::util::display::array_value_to_string;
use datafusion::error::DataFusionError;
use sqllogictest::{AsyncDB, DBOutput, DefaultColumnType, Runner};
use urbanstream::deterministic::{DeterministicEngine, Outcome};
use urbanstream::plan::{DEFAULT_QUERIES, city_context};
use urbanstream::schema::SchemaRegistry;
use urbanstream::topics::Topics;

/// The engine, and whether it restarts from a checkpoint after every statement.
struct Engine(DeterministicEngine, bool);

#[async_trait]
impl AsyncDB for Engine {
    type Error = DataFusionError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, DataFusionError> {
        let default_query = sql
            .trim()
            .strip_prefix("DEFAULT QUERY ")
            .map(|name| name.trim().trim_end_matches(';'));
        let sql = match default_query {
            Some(name) => DEFAULT_QUERIES
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, sql)| *sql)
                .ok_or_else(|| {
                    DataFusionError::Plan(format!("no default query {name} in queries/"))
                })?,
            None => sql,
        };
        match self.0.execute(sql).await? {
            Outcome::Done => {
                // Not after DROP: a query of the service carries its own DDL, but here a
                // dropped view is gone for the running queries planned over it.
                let drop = sql.trim_start().to_ascii_uppercase().starts_with("DROP");
                if self.1 && !drop {
                    self.0.execute("RESTART").await?;
                }
                Ok(DBOutput::StatementComplete(0))
            }
            Outcome::Rows(batches) => {
                let columns = batches.first().map_or(0, |b| b.num_columns());
                let mut rows = Vec::new();
                for batch in &batches {
                    for r in 0..batch.num_rows() {
                        let row = batch
                            .columns()
                            .iter()
                            .map(|c| {
                                if c.is_null(r) {
                                    Ok("NULL".to_string())
                                } else {
                                    array_value_to_string(c, r)
                                        .map(|s| if s.is_empty() { "(empty)".into() } else { s })
                                }
                            })
                            .collect::<Result<Vec<_>, _>>()?;
                        rows.push(row);
                    }
                }
                Ok(DBOutput::Rows {
                    types: vec![DefaultColumnType::Any; columns],
                    rows,
                })
            }
        }
    }

    async fn shutdown(&mut self) {}

    fn engine_name(&self) -> &str {
        "urbanstream-deterministic"
    }

    async fn sleep(dur: std::time::Duration) {
        tokio::time::sleep(dur).await;
    }
}

fn slt_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            slt_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "slt") {
            out.push(path);
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    // `SLT_DIR` runs the `.slt` files of another directory (files of one's own).
    let root = std::env::var_os("SLT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("slt"));
    let filter = std::env::args().nth(1).filter(|a| !a.starts_with('-'));
    let mut files = Vec::new();
    slt_files(&root, &mut files);
    files.sort();
    let (mut passed, mut failed) = (0, 0);
    for file in files {
        let name = file
            .strip_prefix(&root)
            .unwrap_or(&file)
            .display()
            .to_string();
        if filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        let city = name.starts_with("city/");
        for restarts in [false, true] {
            let mut runner = Runner::new(move || async move {
                let engine = if city {
                    let schemas = SchemaRegistry::embedded().expect("schemas");
                    DeterministicEngine::with_context(
                        city_context(&Topics::default(), &schemas).expect("city"),
                    )
                } else {
                    DeterministicEngine::new()
                };
                Ok(Engine(engine, restarts))
            });
            let label = if restarts { " (restarting)" } else { "" };
            match runner.run_file_async(&file).await {
                Ok(()) => {
                    println!("test slt::{name}{label} ... ok");
                    passed += 1;
                }
                Err(e) => {
                    println!("test slt::{name}{label} ... FAILED\n{e}");
                    failed += 1;
                }
            }
        }
    }
    println!("\nslt: {passed} passed, {failed} failed");
    if failed > 0 || passed == 0 {
        std::process::exit(1);
    }
}
