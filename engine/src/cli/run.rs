//! `urbanstream run`: a stream query over a file, offline, without Kafka.
//!
//! The file's rows become the records of the query's stream through the code the service
//! uses: encoded as JSON, decoded and validated by the stream's schema (a row the schema
//! rejects is counted with its reason, as the DLQ would get it), fed in event-time order to
//! the planned query micro-batch by micro-batch, with processing time following the data.
//! At the end of the file every window closes, as at the end of a batch run. Analysts try a
//! query on a CSV before registering it.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;

use crate::error::{Error, Result};
pub use crate::pipeline::offline::{
    RunInput, RunSummary, one_query, run_query, run_query_over_records,
};
use crate::plan::city_context_in;
use crate::plan::stream::StreamContext;
use crate::reference::ReferenceTables;
use crate::schema::SchemaRegistry;
use crate::topics::Topics;

/// Options of `run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// The query: a file of SQL statements (`CREATE EXTERNAL TABLE …`, `SET urbanstream.…`,
    /// then one stream query), as registered with the service.
    #[arg(long)]
    pub query: PathBuf,
    /// The input: a CSV (with a header) or JSON-lines file whose rows are the records of the
    /// query's stream.
    #[arg(long)]
    pub input: PathBuf,
    /// Renames a column of the file to the stream's field: `--rename station=sensor_id`
    /// (repeatable).
    #[arg(long)]
    pub rename: Vec<String>,
    /// Unit of a numeric event-time column: `s`, `ms` or `us` (default: the stream's own
    /// `'event_time_unit'`, milliseconds unless declared).
    #[arg(long)]
    pub time_unit: Option<String>,
    /// Time zone of event-time texts written without one (`+07:00`, `Asia/Ho_Chi_Minh`).
    #[arg(long, default_value = "+00:00")]
    pub time_zone: String,
    /// Output rows shown (all of them are counted and written to `--output`).
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// Writes every output row here, as JSON lines.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Replaces a reference table for this run by a CSV with its header:
    /// `--reference sensors=stations.csv` (repeatable; a new name adds a table).
    #[arg(long)]
    pub reference: Vec<String>,
}

/// Runs `args.query` over `args.input`.
pub async fn run_file(args: &RunArgs) -> Result<RunSummary> {
    let sql = crate::files::read_text(&args.query, crate::files::SQL_FILE_BYTES, "--query")
        .map_err(|e| Error::Config(format!("{e} (--query takes a file of SQL statements)")))?;
    let reference = ReferenceTables::embedded()?;
    let mut pending = Vec::new();
    for spec in &args.reference {
        let (name, file) = spec.split_once('=').ok_or_else(|| {
            Error::Config(format!(
                "--reference {spec}: expected TABLE=FILE, e.g. sensors=stations.csv"
            ))
        })?;
        let csv = crate::files::read_text(
            std::path::Path::new(file),
            crate::reference::tables::MAX_CSV_BYTES as u64,
            &format!("--reference {}:", name.trim()),
        )?;
        pending.push((spec, name.trim(), csv));
    }
    // Each table is checked against the others as they are when it goes in: one that names
    // rows of a table given after it (a segment of a ward added by a later --reference) is
    // tried again once the others are in, so the order they are given in does not matter.
    while !pending.is_empty() {
        let mut refused = Vec::new();
        let before = pending.len();
        for (spec, name, csv) in pending {
            if let Err(e) = reference.replace(name, &csv) {
                refused.push((spec, name, csv, e));
            }
        }
        if refused.len() == before {
            let (spec, _, _, e) = refused.swap_remove(0);
            return Err(Error::Config(format!("--reference {spec}: {e}")));
        }
        pending = refused
            .into_iter()
            .map(|(spec, name, csv, _)| (spec, name, csv))
            .collect();
    }
    let ctx = city_context_in(
        StreamContext::new(),
        &Topics::default(),
        &SchemaRegistry::embedded()?,
        &reference,
    )?;
    let query = one_query(&ctx, &sql, &args.query.display().to_string()).await?;
    let input = RunInput {
        path: args.input.clone(),
        rename: args.rename.clone(),
        time_unit: args.time_unit.clone(),
        time_zone: args.time_zone.clone(),
        state_limit: None,
    };
    let mut output = match &args.output {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(path)
                .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?,
        )),
        None => None,
    };
    let summary = run_query(query, &input, args.limit, output.as_mut()).await?;
    if let Some(mut w) = output {
        w.flush()
            .map_err(|e| Error::Config(format!("writing the output: {e}")))?;
    }
    Ok(summary)
}

/// The summary and rows of a run, for the terminal; `zone` is the one its file's times
/// without an offset were read in.
pub fn report(summary: &RunSummary, zone: &str) -> Result<String> {
    let mut out = String::new();
    if !summary.shown.is_empty() {
        let shown = summary
            .shown
            .iter()
            .map(cells_for_a_terminal)
            .collect::<Result<Vec<_>>>()?;
        out.push_str(&datafusion::arrow::util::pretty::pretty_format_batches(&shown)?.to_string());
        out.push('\n');
    }
    out.push_str(&format!(
        "{} input rows, {} output rows",
        summary.input_rows, summary.output_rows
    ));
    if summary.output_rows > summary.shown.iter().map(|b| b.num_rows() as u64).sum() {
        out.push_str(" (the first shown; --limit, --output for all)");
    }
    out.push('\n');
    if summary.rejected > 0 {
        out.push_str(&format!(
            "{} rows rejected, by the stream's schema or by the query (the first: {})\n",
            summary.rejected,
            summary.first_rejection.as_deref().unwrap_or("")
        ));
    }
    if summary.refused_results > 0 {
        out.push_str(&format!(
            "{} result rows not published, left out of the output (DLQ records of stage \
             `result` in the service; the first: {})\n",
            summary.refused_results,
            summary.first_refused_result.as_deref().unwrap_or("")
        ));
    }
    if summary.unreadable_time > 0 {
        let first = summary.first_unreadable.as_deref().unwrap_or("");
        let why = crate::pipeline::offline::why_unreadable(first, zone)
            .unwrap_or_else(|| "see --time-unit, --time-zone".into());
        out.push_str(&format!(
            "{} rows without a readable event time (the first: {first:?}; {why})\n",
            summary.unreadable_time,
        ));
    }
    if !summary.ignored_columns.is_empty() {
        out.push_str(&format!(
            "columns of the file that the stream does not have, not read: {} (--rename \
             old=new names a column as the stream's field)\n",
            summary.ignored_columns.join(", ")
        ));
    }
    if !summary.missing_fields.is_empty() {
        out.push_str(&format!(
            "fields of the stream that the file does not have, NULL in every row: {}\n",
            summary.missing_fields.join(", ")
        ));
    }
    for (reason, n) in &summary.diverted {
        out.push_str(&format!("{n} rows diverted: {reason}\n"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes::DataType;

    /// A query `sql` run over the file `name` holding `rows`, in `dir`, with the defaults of
    /// `urbanstream run` (times without an offset in UTC, the stream's own time unit).
    fn run_over(dir: &std::path::Path, sql: &str, name: &str, rows: &str) -> Result<RunArgs> {
        let query = dir.join("q.sql");
        std::fs::write(&query, sql).map_err(|e| Error::Config(e.to_string()))?;
        let input = dir.join(name);
        std::fs::write(&input, rows).map_err(|e| Error::Config(e.to_string()))?;
        Ok(RunArgs {
            query,
            input,
            rename: Vec::new(),
            time_unit: None,
            time_zone: "+00:00".into(),
            limit: 20,
            output: None,
            reference: Vec::new(),
        })
    }

    /// A CSV number written with spaces around it (`a, 7`, as after a comma) is the number:
    /// it was rejected as "can't parse the string value  7 to decimal".
    #[tokio::test]
    async fn a_csv_number_with_spaces_around_it_is_read() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Config(e.to_string()))?;
        let args = run_over(
            dir.path(),
            "CREATE EXTERNAL TABLE s (k VARCHAR, event_time TIMESTAMP NOT NULL, n BIGINT, \
             v DOUBLE) STORED AS KAFKA OPTIONS ('topic' 's', 'event_time' 'event_time', \
             'watermark_delay' '0s'); SELECT k, n, v FROM s",
            "rows.csv",
            "k,event_time,n,v\n a ,2026-01-01T00:00:01Z, 7,2.5 \nb,2026-01-01T00:00:02Z,8 , 1\n",
        )?;
        let summary = run_file(&args).await?;
        assert_eq!(
            (summary.rejected, summary.output_rows),
            (0, 2),
            "{summary:?}"
        );
        let text = report(&summary, "+00:00")?;
        // Texts keep their spaces; numbers are read without them.
        assert!(text.contains("|  a  | 7 | 2.5 |"), "{text}");
        assert!(text.contains("| b   | 8 | 1.0 |"), "{text}");
        Ok(())
    }

    /// A file's column the stream does not have is not part of its records: a 300 KB one put
    /// its row over the record size limit, and the row was rejected. A file without a row
    /// (empty, or blank lines) has no records: a JSON-lines one failed naming a missing
    /// event-time column. Event times all null are named as such (they were shown as "").
    #[tokio::test]
    async fn columns_not_read_and_files_without_rows_reject_nothing() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Config(e.to_string()))?;
        let sql = "CREATE EXTERNAL TABLE s (k VARCHAR, event_time TIMESTAMP NOT NULL, n BIGINT) \
                   STORED AS KAFKA OPTIONS ('topic' 's', 'event_time' 'event_time', \
                   'watermark_delay' '0s'); SELECT k, n FROM s";
        let long = "x".repeat(300_000);
        let args = run_over(
            dir.path(),
            sql,
            "rows.csv",
            &format!(
                "k,event_time,n,notes\na,2026-01-01T00:00:01Z,1,short\nb,2026-01-01T00:00:02Z,2,{long}\n"
            ),
        )?;
        let summary = run_file(&args).await?;
        assert_eq!(
            (summary.rejected, summary.output_rows),
            (0, 2),
            "{summary:?}"
        );
        assert_eq!(summary.ignored_columns, vec!["notes".to_string()]);
        for (name, rows) in [("empty.jsonl", ""), ("blank.jsonl", "\n\n  \n")] {
            let summary = run_file(&run_over(dir.path(), sql, name, rows)?).await?;
            assert_eq!(
                (summary.input_rows, summary.rejected, summary.output_rows),
                (0, 0, 0),
                "{name}: {summary:?}"
            );
            assert!(summary.missing_fields.is_empty(), "{name}: {summary:?}");
        }
        let summary = run_file(&run_over(
            dir.path(),
            sql,
            "nulls.jsonl",
            "{\"k\":\"a\",\"event_time\":null,\"n\":1}\n{\"k\":\"b\",\"event_time\":null,\"n\":2}\n",
        )?)
        .await?;
        assert_eq!(summary.unreadable_time, 2, "{summary:?}");
        assert_eq!(summary.first_unreadable.as_deref(), Some("null (no time)"));
        Ok(())
    }

    /// A JSON line with a number past a double's range is rejected alone (it failed the
    /// whole file); a CSV whose header is not UTF-8 (UTF-16) is refused naming the file given
    /// (the error named a temporary copy).
    #[tokio::test]
    async fn a_number_past_a_double_and_a_header_not_utf8_are_named() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Config(e.to_string()))?;
        let sql = "CREATE EXTERNAL TABLE s (k VARCHAR, event_time TIMESTAMP NOT NULL, v DOUBLE) \
                   STORED AS KAFKA OPTIONS ('topic' 's', 'event_time' 'event_time', \
                   'watermark_delay' '0s'); SELECT k, v FROM s";
        let args = run_over(
            dir.path(),
            sql,
            "rows.jsonl",
            "{\"k\":\"a\",\"event_time\":\"2026-01-01T00:00:01Z\",\"v\":1e400}\n\
             {\"k\":\"b\",\"event_time\":\"2026-01-01T00:00:02Z\",\"v\":2.5}\n",
        )?;
        let summary = run_file(&args).await?;
        assert_eq!(
            (summary.rejected, summary.output_rows),
            (1, 1),
            "{summary:?}"
        );
        assert!(
            summary
                .first_rejection
                .as_deref()
                .is_some_and(|e| e.contains("field v holds 1e400, a number past the range")),
            "{summary:?}"
        );
        // A lone half of a surrogate pair: the line alone, named by its number.
        let args = run_over(
            dir.path(),
            sql,
            "surrogate.jsonl",
            "{\"k\":\"a\",\"event_time\":\"2026-01-01T00:00:01Z\",\"v\":1}\n\
             {\"k\":\"b\",\"event_time\":\"2026-01-01T00:00:02Z\",\"v\":2}\n\
             {\"k\":\"\\ud800\",\"event_time\":\"2026-01-01T00:00:03Z\",\"v\":3}\n\
             {\"k\":\"\\u00e9\\ud83d\\ude97\",\"event_time\":\"2026-01-01T00:00:04Z\",\"v\":4}\n",
        )?;
        let summary = run_file(&args).await?;
        assert_eq!(
            (summary.rejected, summary.output_rows),
            (1, 3),
            "{summary:?}"
        );
        assert!(
            summary
                .first_rejection
                .as_deref()
                .is_some_and(|e| e.contains("line 3: field k holds no text")),
            "{summary:?}"
        );
        let mut args = run_over(dir.path(), sql, "wide.csv", "")?;
        let utf16: Vec<u8> = "k,event_time,v\na,2026-01-01T00:00:01Z,1\n"
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        std::fs::write(&args.input, [&[0xff, 0xfe][..], &utf16].concat())
            .map_err(|e| Error::Config(e.to_string()))?;
        args.input = dir.path().join("wide.csv");
        let e = run_file(&args).await.expect_err("not UTF-8");
        assert!(
            e.to_string()
                .contains("wide.csv: its header (line 1) is not UTF-8 text"),
            "{e}"
        );
        Ok(())
    }

    /// An avg of DECIMALs past what its result type holds (DataFusion's DECIMAL(38, s + 4),
    /// four digits fewer before the point than the column's DECIMAL(38, s)) fails naming the
    /// function and the casts to write instead, not only "Arithmetic Overflow in
    /// AvgAccumulator".
    #[tokio::test]
    async fn an_avg_of_decimals_past_its_type_says_what_to_write_instead() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Config(e.to_string()))?;
        let sql = "CREATE EXTERNAL TABLE ev (k VARCHAR NOT NULL, d DECIMAL(38, 10), \
                   event_time TIMESTAMP NOT NULL) STORED AS KAFKA OPTIONS ('topic' 'ev', \
                   'format' 'json', 'event_time' 'event_time');
                   SELECT k, avg(d) AS ad FROM ev \
                   GROUP BY tumble(event_time, INTERVAL '1 minute'), k";
        let args = run_over(
            dir.path(),
            sql,
            "rows.jsonl",
            "{\"k\":\"a\",\"event_time\":\"2026-01-01T00:00:01Z\",\"d\":1.5}\n\
             {\"k\":\"b\",\"event_time\":\"2026-01-01T00:00:02Z\",\"d\":10000000000000000000000000}\n",
        )?;
        let e = run_file(&args).await.expect_err("overflow");
        assert!(
            e.to_string().contains(
                "an avg of DECIMALs overflowed its result type, a DECIMAL(p + 4, s + 4) of at \
                 most 38 digits"
            ) && e.to_string().contains("avg(CAST(x AS DOUBLE))"),
            "{e}"
        );
        Ok(())
    }

    /// A file's numeric event times are in the stream's own unit unless `--time-unit` says
    /// otherwise: a stream declaring epoch seconds had every row of its file rejected as
    /// before 1990, with a hint to declare the unit it had declared.
    #[tokio::test]
    async fn a_files_times_are_in_the_streams_declared_unit() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Config(e.to_string()))?;
        let mut args = run_over(
            dir.path(),
            "CREATE EXTERNAL TABLE s (k VARCHAR, event_time TIMESTAMP NOT NULL) STORED AS KAFKA \
             OPTIONS ('topic' 's', 'event_time' 'event_time', 'watermark_delay' '0s', \
             'event_time_unit' 's'); \
             SELECT k, window_start, count(*) AS n FROM s \
             GROUP BY tumble(event_time, INTERVAL '1 minute'), k",
            "rows.jsonl",
            "{\"k\":\"a\",\"event_time\":1767225600}\n\
             {\"k\":\"a\",\"event_time\":1767225601.5}\n\
             {\"k\":\"a\",\"event_time\":1767225660}\n",
        )?;
        let summary = run_file(&args).await?;
        assert_eq!(
            (summary.rejected, summary.output_rows),
            (0, 2),
            "{summary:?}"
        );
        // Told otherwise, the file is read in milliseconds: before 1990, the hint names the
        // option.
        args.time_unit = Some("ms".into());
        let summary = run_file(&args).await?;
        assert_eq!(summary.rejected, 3, "{summary:?}");
        assert!(
            summary
                .first_rejection
                .as_deref()
                .is_some_and(|e| e.contains("is before 1990") && e.contains("--time-unit")),
            "{summary:?}"
        );
        Ok(())
    }

    /// Regressions: a CSV was read by types guessed from its first 1000 rows, so a later row
    /// of another type (`2.5` in a column of whole numbers so far, `xx`, a time that is not
    /// one) failed the whole file; a time with an offset was read as local time and shifted
    /// by `--time-zone` again; rows were sorted by the text of their times, not the instant
    /// (a row written `+07:00` sorted after a row of `Z` that it precedes, and was late); a
    /// column the stream lacks, and a field the file lacks, went unmentioned. Now the CSV's
    /// columns are text read by the stream's schema, row by row.
    #[tokio::test]
    async fn a_csv_is_read_by_the_streams_schema_row_by_row() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Config(e.to_string()))?;
        let query = dir.path().join("q.sql");
        std::fs::write(
            &query,
            "CREATE EXTERNAL TABLE s (id VARCHAR NOT NULL, event_time TIMESTAMP NOT NULL, \
             n INT, v DOUBLE, ok BOOLEAN, note VARCHAR) STORED AS KAFKA OPTIONS ('topic' 's', \
             'event_time' 'event_time', 'watermark_delay' '0s'); \
             SELECT id, event_time, n, v, ok FROM s",
        )
        .map_err(|e| Error::Config(e.to_string()))?;
        let input = dir.path().join("rows.csv");
        let mut csv = String::from("id,event_time,n,v,ok,remark\n");
        // 1100 rows from 2026-01-01T00:00:00Z, a second apart, whole numbers in `v`.
        for i in 0..1100 {
            csv.push_str(&format!(
                "r{i},2026-01-01T00:{:02}:{:02}Z,{i},{i},true,\n",
                i / 60,
                i % 60
            ));
        }
        csv.push_str("frac,2026-01-01T00:18:21Z,1,2.5,false,\n");
        csv.push_str("bad_n,2026-01-01T00:18:22Z,xx,1,true,\n");
        csv.push_str("bad_ok,2026-01-01T00:18:23Z,1,1,maybe,\n");
        csv.push_str("bad_time,not-a-time,1,1,true,\n");
        // 07:18:24 at +07:00 is 00:18:24Z: after the rows above, before the next.
        csv.push_str("offset,2026-01-01T07:18:24+07:00,1,1,true,\n");
        csv.push_str("last,2026-01-01T00:18:25Z,1,1,true,\n");
        std::fs::write(&input, csv).map_err(|e| Error::Config(e.to_string()))?;
        let args = RunArgs {
            query,
            input,
            rename: Vec::new(),
            time_unit: Some("ms".into()),
            time_zone: "+07:00".into(),
            limit: 2000,
            output: None,
            reference: Vec::new(),
        };
        let summary = run_file(&args).await?;
        assert_eq!(summary.input_rows, 1106);
        assert_eq!(summary.rejected, 2, "{summary:?}");
        assert!(
            summary
                .first_rejection
                .as_deref()
                .is_some_and(|e| e.contains("\"xx\"") || e.contains("\"maybe\" is not a boolean")),
            "{summary:?}"
        );
        assert_eq!(summary.unreadable_time, 1);
        assert_eq!(summary.first_unreadable.as_deref(), Some("not-a-time"));
        assert!(summary.diverted.is_empty(), "{summary:?}");
        assert_eq!(summary.ignored_columns, vec!["remark".to_string()]);
        assert_eq!(summary.missing_fields, vec!["note".to_string()]);
        let shown =
            datafusion::arrow::compute::concat_batches(&summary.shown[0].schema(), &summary.shown)?;
        assert_eq!(shown.num_rows(), 1103);
        let ids = datafusion::arrow::compute::cast(shown.column(0), &DataType::Utf8)?;
        let ids = ids.as_string::<i32>();
        let tail: Vec<&str> = (1100..1103).map(|r| ids.value(r)).collect();
        assert_eq!(tail, vec!["frac", "offset", "last"]);
        let times = datafusion::arrow::compute::cast(shown.column(1), &DataType::Int64)?;
        let times = times.as_primitive::<datafusion::arrow::datatypes::Int64Type>();
        // 2026-01-01T00:18:24Z.
        assert_eq!(times.value(1101), 1_767_226_704_000);
        let v = datafusion::arrow::compute::cast(shown.column(3), &DataType::Float64)?;
        let v = v.as_primitive::<datafusion::arrow::datatypes::Float64Type>();
        assert_eq!(v.value(1100), 2.5);
        let text = report(&summary, "+00:00")?;
        assert!(text.contains("not read: remark"), "{text}");
        assert!(text.contains("NULL in every row: note"), "{text}");
        Ok(())
    }

    /// A line that cannot be a row (a CSV row with a field more or less than the header, a
    /// row that is not UTF-8, a JSON line that is not one object) is rejected alone, with its
    /// line number; the rows around it are read (one such line failed the whole file).
    #[tokio::test]
    async fn malformed_lines_are_rejected_alone() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Config(e.to_string()))?;
        let query = dir.path().join("q.sql");
        std::fs::write(
            &query,
            "CREATE EXTERNAL TABLE s (id VARCHAR NOT NULL, event_time TIMESTAMP NOT NULL, \
             n INT) STORED AS KAFKA OPTIONS ('topic' 's', 'event_time' 'event_time', \
             'watermark_delay' '0s'); \
             SELECT id, n FROM s",
        )
        .map_err(|e| Error::Config(e.to_string()))?;
        let csv: &[u8] = b"id,event_time,n\n\
            a,2026-01-01T00:00:00Z,1\n\
            long,2026-01-01T00:00:01Z,2,extra\n\
            short,2026-01-01T00:00:02Z\n\
            \"quoted, with a comma\",2026-01-01T00:00:03Z,3\n\
            bad\xff\xfe,2026-01-01T00:00:04Z,4\n\
            z,2026-01-01T00:00:05Z,5\n";
        let jsonl: &[u8] = b"{\"id\":\"a\",\"event_time\":\"2026-01-01T00:00:00Z\",\"n\":1}\n\
            not json at all\n\
            [1, 2]\n\
            \n\
            {\"id\":\"z\",\"event_time\":\"2026-01-01T00:00:05Z\",\"n\":5}\n";
        // A field holding another kind of value than the other lines' (one such line failed
        // the whole file: the columns are read with one type each; then such a line was
        // left out whole, where the service reads "6" in an INT as 6). Each value goes to the
        // stream's schema as written, which reads or rejects it as the service does.
        let kinds: &[u8] = b"{\"id\":\"a\",\"event_time\":\"2026-01-01T00:00:00Z\",\"n\":1}\n\
            {\"id\":\"b\",\"event_time\":\"2026-01-01T00:00:01Z\",\"n\":\"two\"}\n\
            {\"id\":\"c\",\"event_time\":\"2026-01-01T00:00:02Z\",\"n\":[3]}\n\
            {\"id\":4,\"event_time\":\"2026-01-01T00:00:03Z\",\"n\":4}\n\
            {\"id\":\"e\",\"event_time\":\"2026-01-01T00:00:04Z\",\"n\":null}\n\
            {\"id\":\"f\",\"event_time\":\"2026-01-01T00:00:05Z\",\"n\":\"6\"}\n\
            {\"event_time\":\"2026-01-01T00:00:06Z\",\"n\":7,\"id\":\"z\"}\n";
        // The event time is read by the file's rows, not by the stream's schema: one of
        // another kind than most lines' is left out with its line.
        let times: &[u8] = b"{\"id\":\"a\",\"event_time\":\"2026-01-01T00:00:00Z\",\"n\":1}\n\
            {\"id\":\"b\",\"event_time\":1767225601000,\"n\":2}\n\
            {\"id\":\"z\",\"event_time\":\"2026-01-01T00:00:05Z\",\"n\":5}\n";
        // A line nested deeper than the readers take (it failed the whole file, naming line
        // 1); one as deep as they take is read (its extra field not).
        let deep = |depth: usize, id: &str| {
            format!(
                "{{\"id\":\"{id}\",\"event_time\":\"2026-01-01T00:00:01Z\",\"x\":{}{}}}\n",
                "[".repeat(depth),
                "]".repeat(depth)
            )
        };
        let nested = format!(
            "{{\"id\":\"a\",\"event_time\":\"2026-01-01T00:00:00Z\",\"n\":1}}\n{}{}",
            deep(crate::decode::MAX_JSON_DEPTH, "too_deep"),
            deep(crate::decode::MAX_JSON_DEPTH - 1, "z")
        );
        let nested = nested.as_bytes();
        for (name, bytes, rejected, first, ids) in [
            (
                "nested.jsonl",
                nested,
                1,
                "line 2: the record nests arrays or objects more than 127 deep",
                vec!["a", "z"],
            ),
            (
                "rows.csv",
                csv,
                3,
                "line 3: 4 fields where the header has 3",
                vec!["a", "quoted, with a comma", "z"],
            ),
            (
                "rows.jsonl",
                jsonl,
                2,
                "line 2: not one JSON object",
                vec!["a", "z"],
            ),
            (
                "kinds.jsonl",
                kinds,
                3,
                "whilst decoding field 'n': failed to parse \"two\" as Int32",
                vec!["a", "e", "f", "z"],
            ),
            (
                "times.jsonl",
                times,
                1,
                "line 2: field event_time holds a number where most lines hold a text",
                vec!["a", "z"],
            ),
        ] {
            let input = dir.path().join(name);
            std::fs::write(&input, bytes).map_err(|e| Error::Config(e.to_string()))?;
            let args = RunArgs {
                query: query.clone(),
                input,
                rename: Vec::new(),
                time_unit: Some("ms".into()),
                time_zone: "+00:00".into(),
                limit: 10,
                output: None,
                reference: Vec::new(),
            };
            let summary = run_file(&args).await?;
            assert_eq!(summary.rejected, rejected, "{name}: {summary:?}");
            assert!(
                summary
                    .first_rejection
                    .as_deref()
                    .is_some_and(|e| e.starts_with(first)),
                "{name}: {summary:?}"
            );
            let shown = datafusion::arrow::compute::concat_batches(
                &summary.shown[0].schema(),
                &summary.shown,
            )?;
            let got = datafusion::arrow::compute::cast(shown.column(0), &DataType::Utf8)?;
            let got: Vec<&str> = got.as_string::<i32>().iter().flatten().collect();
            assert_eq!(got, ids, "{name}");
            if name == "kinds.jsonl" {
                let n = datafusion::arrow::compute::cast(shown.column(1), &DataType::Int64)?;
                let n: Vec<Option<i64>> = n
                    .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                    .iter()
                    .collect();
                assert_eq!(n, [Some(1), None, Some(6), Some(7)], "{name}");
            }
        }
        Ok(())
    }

    /// A file of more columns than a stream's rows have is refused at once, naming the limit:
    /// 300 000 columns in one CSV row took minutes (a preview went on past its time limit).
    #[tokio::test]
    async fn a_file_of_too_many_columns_is_refused_naming_the_limit() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Config(e.to_string()))?;
        let query = dir.path().join("q.sql");
        std::fs::write(&query, "SELECT camera_id FROM camera_events")
            .map_err(|e| Error::Config(e.to_string()))?;
        let names: Vec<String> = (0..5_000).map(|i| format!("c{i}")).collect();
        let csv = format!("{}\n{}\n", names.join(","), vec!["1"; 5_000].join(","));
        let fields: Vec<String> = names.iter().map(|n| format!("\"{n}\":null")).collect();
        let jsonl = format!("{{{}}}\n", fields.join(","));
        for (name, text) in [("wide.csv", csv), ("wide.jsonl", jsonl)] {
            let input = dir.path().join(name);
            std::fs::write(&input, text).map_err(|e| Error::Config(e.to_string()))?;
            let args = RunArgs {
                query: query.clone(),
                input,
                rename: Vec::new(),
                time_unit: None,
                time_zone: "+00:00".into(),
                limit: 10,
                output: None,
                reference: Vec::new(),
            };
            let error = run_file(&args).await.map(|_| ()).unwrap_err().to_string();
            assert!(error.contains("over the limit of 4096"), "{name}: {error}");
        }
        Ok(())
    }

    /// A file that only looks like Parquet is refused with the reason: `PAR1PAR1` (8 bytes)
    /// panicked the Parquet reader, and a preview (the same path, with a client's bytes)
    /// answered 500.
    #[tokio::test]
    async fn a_file_that_is_not_parquet_is_refused_with_the_reason() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Config(e.to_string()))?;
        let query = dir.path().join("q.sql");
        std::fs::write(
            &query,
            "SELECT camera_id, count(*) AS n FROM camera_events \
             GROUP BY tumble(event_time, INTERVAL '1 minute'), camera_id",
        )
        .map_err(|e| Error::Config(e.to_string()))?;
        let mut huge_footer = b"PAR1".to_vec();
        huge_footer.extend_from_slice(&[0; 8]);
        huge_footer.extend_from_slice(&u32::MAX.to_le_bytes());
        huge_footer.extend_from_slice(b"PAR1");
        for (bytes, why) in [
            (b"PAR1PAR1".to_vec(), "8 bytes, fewer than the 12"),
            (
                b"PAR1 not a parquet file".to_vec(),
                "does not start and end with PAR1",
            ),
            (huge_footer, "4294967295 bytes of metadata"),
        ] {
            let input = dir.path().join("rows.parquet");
            std::fs::write(&input, bytes).map_err(|e| Error::Config(e.to_string()))?;
            let args = RunArgs {
                query: query.clone(),
                input,
                rename: Vec::new(),
                time_unit: Some("ms".into()),
                time_zone: "+00:00".into(),
                limit: 10,
                output: None,
                reference: Vec::new(),
            };
            let error = run_file(&args).await.expect_err("not parquet").to_string();
            assert!(
                error.contains("is not a Parquet file") && error.contains(why),
                "{error}"
            );
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_query_runs_over_a_csv_as_over_its_topic() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Config(e.to_string()))?;
        let query = dir.path().join("busy.sql");
        std::fs::write(
            &query,
            "CREATE EXTERNAL TABLE busy (segment_id VARCHAR NOT NULL, window_start TIMESTAMP \
             NOT NULL, n BIGINT NOT NULL) STORED AS KAFKA OPTIONS ('topic' 'busy'); \
             INSERT INTO busy SELECT segment_id, window_start, count(*) AS n FROM camera_events \
             GROUP BY tumble(event_time, INTERVAL '1 minute'), segment_id",
        )
        .map_err(|e| Error::Config(e.to_string()))?;
        let input = dir.path().join("cameras.csv");
        std::fs::write(
            &input,
            "cam,segment,time,kind,class,confidence\n\
             cam-0001,kim_ma_w,2026-01-01 06:00:05,detection,car,0.9\n\
             cam-0001,kim_ma_w,2026-01-01 06:00:45,detection,motorbike,0.9\n\
             cam-0002,xuan_thuy,2026-01-01 06:00:10,detection,bus,0.8\n\
             cam-0001,kim_ma_w,2026-01-01 06:01:15,detection,hovercraft,0.9\n\
             cam-0001,kim_ma_w,2026-01-01 06:01:20,detection,car,0.9\n",
        )
        .map_err(|e| Error::Config(e.to_string()))?;
        let args = RunArgs {
            query,
            input,
            rename: [
                "cam=camera_id",
                "segment=segment_id",
                "time=event_time",
                "class=vehicle_class",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            time_unit: Some("ms".into()),
            time_zone: "+07:00".into(),
            limit: 10,
            output: Some(dir.path().join("out.jsonl")),
            reference: Vec::new(),
        };
        let summary = run_file(&args).await?;
        assert_eq!(summary.input_rows, 5);
        assert_eq!(summary.rejected, 1, "the hovercraft");
        assert!(
            summary
                .first_rejection
                .as_deref()
                .is_some_and(|e| e.contains("hovercraft")),
            "{summary:?}"
        );
        assert_eq!(summary.output_rows, 3);
        let written = std::fs::read_to_string(dir.path().join("out.jsonl"))
            .map_err(|e| Error::Config(e.to_string()))?;
        let mut rows: Vec<serde_json::Value> = written
            .lines()
            .map(|l| serde_json::from_str(l).map_err(|e| Error::Config(e.to_string())))
            .collect::<Result<_>>()?;
        rows.sort_by_key(|r| (r["window_start"].as_i64(), r["segment_id"].to_string()));
        // 06:00 at UTC+7 is 23:00 UTC the day before.
        let six = 1_767_222_000_000_i64;
        let got: Vec<(String, i64, i64)> = rows
            .iter()
            .map(|r| {
                (
                    r["segment_id"].as_str().unwrap_or_default().to_string(),
                    r["window_start"].as_i64().unwrap_or_default(),
                    r["n"].as_i64().unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("kim_ma_w".into(), six, 2),
                ("xuan_thuy".into(), six, 1),
                ("kim_ma_w".into(), six + 60_000, 1),
            ]
        );
        let text = report(&summary, "+00:00")?;
        assert!(text.contains("5 input rows, 3 output rows"), "{text}");
        assert!(text.contains("1 rows rejected"), "{text}");
        Ok(())
    }

    /// A JSON-lines file that begins with a byte-order mark (some Windows tools write one) has
    /// its first line read: it was rejected as no JSON object.
    #[tokio::test]
    async fn a_byte_order_mark_does_not_cost_the_first_line() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Config(e.to_string()))?;
        let sql = "CREATE EXTERNAL TABLE s (k VARCHAR, event_time TIMESTAMP NOT NULL, n BIGINT) \
                   STORED AS KAFKA OPTIONS ('topic' 's', 'event_time' 'event_time', \
                   'watermark_delay' '0s'); SELECT k, n FROM s";
        let rows = "\u{feff}{\"k\":\"a\",\"event_time\":\"2026-01-01T00:00:01Z\",\"n\":1}\n\
                    {\"k\":\"b\",\"event_time\":\"2026-01-01T00:00:02Z\",\"n\":2}\n";
        let summary = run_file(&run_over(dir.path(), sql, "bom.jsonl", rows)?).await?;
        assert_eq!(
            (summary.input_rows, summary.rejected, summary.output_rows),
            (2, 0, 2),
            "{summary:?}"
        );
        Ok(())
    }

    /// Results not published (a window's result the plan above the windows fails on, a float
    /// JSON cannot carry) are counted apart from the input rows rejected: they were counted
    /// as rejected input rows, so a run could report more rows rejected than it read.
    #[tokio::test]
    async fn results_not_published_are_counted_apart_from_rejected_rows() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Config(e.to_string()))?;
        let sql = "CREATE EXTERNAL TABLE s (k VARCHAR NOT NULL, event_time TIMESTAMP NOT NULL, \
                   v DOUBLE) STORED AS KAFKA OPTIONS ('topic' 's', 'event_time' 'event_time', \
                   'watermark_delay' '0s'); \
                   SELECT k, window_start, count(*) / count(v) AS per, sum(v) AS total \
                   FROM s GROUP BY tumble(event_time, INTERVAL '1 minute'), k";
        // a: fine; b: no v, so count(v) is 0 (the division fails); c: a sum past the largest
        // double (infinity); d: not a number in v (an input row rejected).
        let rows = "k,event_time,v\n\
                    a,2026-01-01T00:00:01Z,1.5\n\
                    b,2026-01-01T00:00:02Z,\n\
                    c,2026-01-01T00:00:03Z,1e308\n\
                    c,2026-01-01T00:00:04Z,1e308\n\
                    d,2026-01-01T00:00:05Z,lots\n";
        let summary = run_file(&run_over(dir.path(), sql, "rows.csv", rows)?).await?;
        assert_eq!(
            (
                summary.input_rows,
                summary.rejected,
                summary.refused_results,
                summary.output_rows
            ),
            (5, 1, 2, 1),
            "{summary:?}"
        );
        let text = report(&summary, "+00:00")?;
        assert!(text.contains("1 rows rejected"), "{text}");
        assert!(
            text.contains("2 result rows not published")
                && text.contains("the query failed on a result of its window"),
            "{text}"
        );
        Ok(())
    }
}

#[cfg(test)]
mod reference_tests {
    use super::*;
    use crate::reference::ReferenceData;
    use datafusion::arrow::array::AsArray;

    /// An hourly station over a CSV, offline: without its declaration each hour is
    /// incomplete (60 readings expected); declared with `--reference`, every hour is complete.
    #[tokio::test]
    async fn a_run_reads_reference_tables_given_as_files() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Config(e.to_string()))?;
        let write = |name: &str, text: &str| -> Result<PathBuf> {
            let path = dir.path().join(name);
            std::fs::write(&path, text).map_err(|e| Error::Config(e.to_string()))?;
            Ok(path)
        };
        let mut readings = String::from("station,ward_id,time,pm25\n");
        for hour in 0..6 {
            readings.push_str(&format!(
                "hn-01,ba_dinh,2026-03-01 {hour:02}:15,{}\n",
                40 + hour
            ));
        }
        let mut sensors = ReferenceData::embedded_csv("sensors.csv")
            .unwrap_or_default()
            .to_string();
        sensors.push_str("hn-01,ba_dinh,station,21.03,105.81,3600\n");
        let query =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../queries/air_hourly_sensor.sql");
        let mut args = RunArgs {
            query,
            input: write("hourly.csv", &readings)?,
            rename: vec!["station=sensor_id".into(), "time=event_time".into()],
            time_unit: Some("ms".into()),
            time_zone: "+07:00".into(),
            limit: 100,
            output: None,
            reference: Vec::new(),
        };
        let complete = |summary: &RunSummary| -> Result<(usize, usize)> {
            let mut counts = (0, 0);
            for b in &summary.shown {
                let complete = b
                    .column_by_name("complete")
                    .ok_or_else(|| Error::Config("no complete column".into()))?;
                let complete = complete.as_boolean();
                for r in 0..b.num_rows() {
                    if complete.value(r) {
                        counts.0 += 1;
                    } else {
                        counts.1 += 1;
                    }
                }
            }
            Ok(counts)
        };
        let undeclared = run_file(&args).await?;
        assert_eq!(
            complete(&undeclared)?.0,
            0,
            "an unknown sensor is expected every 60 s"
        );
        args.reference = vec![format!(
            "sensors={}",
            write("sensors.csv", &sensors)?.display()
        )];
        let declared = run_file(&args).await?;
        let (yes, _) = complete(&declared)?;
        assert_eq!(yes, 6, "every hour of the station, declared hourly");
        args.reference = vec!["sensors".into()];
        assert!(run_file(&args).await.is_err(), "TABLE=FILE");
        // A station of a ward added by a later --reference: the order the tables are given in
        // does not matter (the sensors were checked before the ward was in, and refused).
        let mut wards = ReferenceData::embedded_csv("wards.csv")
            .unwrap_or_default()
            .to_string();
        wards.push_str("w_x,Phường X,21.03,105.81\n");
        let in_new_ward = sensors.replace("hn-01,ba_dinh,station", "hn-01,w_x,station");
        let sensors_file = write("sensors_w_x.csv", &in_new_ward)?;
        let wards_file = write("wards_w_x.csv", &wards)?;
        args.reference = vec![
            format!("sensors={}", sensors_file.display()),
            format!("wards={}", wards_file.display()),
        ];
        let declared = run_file(&args).await?;
        assert_eq!(
            complete(&declared)?.0,
            6,
            "declared with its ward given after it"
        );
        // Without the ward, refused, naming the file given.
        args.reference = vec![format!("sensors={}", sensors_file.display())];
        let refused = run_file(&args).await.expect_err("unknown ward").to_string();
        assert!(
            refused.contains("--reference sensors=")
                && refused.contains("sensors_w_x.csv")
                && refused.contains("w_x"),
            "{refused}"
        );
        Ok(())
    }
}

/// `batch` with every control character of its texts written as an escape (`\u{1b}`, `\u{a}`):
/// an escape sequence in a row's value was obeyed by the terminal, and a newline in one drew
/// rows of its own in the table.
fn cells_for_a_terminal(
    batch: &datafusion::arrow::array::RecordBatch,
) -> Result<datafusion::arrow::array::RecordBatch> {
    use datafusion::arrow::array::{Array, ArrayRef, AsArray, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    let mut fields = Vec::with_capacity(batch.num_columns());
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(batch.num_columns());
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        if matches!(
            field.data_type(),
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
        ) {
            let text = datafusion::arrow::compute::cast(column, &DataType::Utf8)?;
            let text = text.as_string::<i32>();
            let escaped: StringArray = (0..text.len())
                .map(|i| {
                    text.is_valid(i).then(|| {
                        crate::service::client::escape_controls(text.value(i), &[]).into_owned()
                    })
                })
                .collect();
            fields.push(Field::new(
                field.name(),
                DataType::Utf8,
                field.is_nullable(),
            ));
            columns.push(std::sync::Arc::new(escaped));
        } else {
            fields.push(field.as_ref().clone());
            columns.push(column.clone());
        }
    }
    Ok(datafusion::arrow::array::RecordBatch::try_new(
        std::sync::Arc::new(Schema::new(fields)),
        columns,
    )?)
}

#[cfg(test)]
mod terminal_tests {
    use super::*;

    /// A value's escape sequence and newline are shown as escapes, not obeyed.
    #[test]
    fn a_runs_table_shows_control_characters_as_escapes() {
        use datafusion::arrow::array::{ArrayRef, RecordBatch, StringArray};
        let batch = RecordBatch::try_from_iter(vec![(
            "t",
            std::sync::Arc::new(StringArray::from(vec![
                Some("red\u{1b}[31m"),
                Some("a\nb"),
                None,
            ])) as ArrayRef,
        )])
        .expect("batch");
        let summary = RunSummary {
            shown: vec![batch],
            ..RunSummary::default()
        };
        let text = report(&summary, "+00:00").expect("report");
        assert!(!text.contains('\u{1b}'), "{text}");
        assert!(text.contains("red\\u{1b}[31m"), "{text}");
        assert!(text.contains("a\\u{a}b"), "{text}");
    }
}
