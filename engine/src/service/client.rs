//! `urbanstream query …` and `urbanstream table …`: the REST API's client, with table output
//! or `--json`.

use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::time::display::DisplayZone;

/// The service a client command talks to.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// The service's API.
    #[arg(
        long,
        global = true,
        env = "URBANSTREAM_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    pub server: String,
    /// Bearer token, when the service has one (`api.token`; changes need it).
    #[arg(long, global = true, env = "URBANSTREAM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Time zone times are shown in (a UTC offset such as +07:00, or UTC); the city's by
    /// default.
    #[arg(
        long,
        global = true,
        env = "URBANSTREAM_DISPLAY_TIME_ZONE",
        default_value = "+07:00"
    )]
    pub display_time_zone: DisplayZone,
}

impl ServerArgs {
    /// A client of this service.
    pub fn client(&self) -> Result<Client> {
        let mut client = Client::new(&self.server, self.token.clone())?;
        client.zone = self.display_time_zone;
        Ok(client)
    }
}

/// Options of `urbanstream query`.
#[derive(Debug, Clone, Args)]
pub struct QueryArgs {
    /// The service.
    #[command(flatten)]
    pub server: ServerArgs,
    /// Print the API's JSON answer instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub action: QueryAction,
}

/// Where a query's SQL comes from: the argument, `--file`, or standard input with `-`.
#[derive(Debug, Clone, Args)]
pub struct SqlInput {
    /// The SQL (statements separated by `;`); `-` reads it from standard input.
    #[arg(conflicts_with = "file")]
    pub sql: Option<String>,
    /// Read the SQL from this file.
    #[arg(long, short)]
    pub file: Option<PathBuf>,
}

impl SqlInput {
    fn read(&self) -> Result<String> {
        match (&self.sql, &self.file) {
            (_, Some(path)) => {
                crate::files::read_text(path, crate::files::SQL_FILE_BYTES, "--file")
                    .map_err(|e| Error::Api(e.to_string()))
            }
            (Some(sql), None) if sql == "-" => {
                let mut sql = String::new();
                std::io::stdin().read_to_string(&mut sql)?;
                Ok(sql)
            }
            (Some(sql), None) => Ok(sql.clone()),
            (None, None) => Err(Error::Api(
                "give the SQL as an argument, with --file FILE, or with - on standard input".into(),
            )),
        }
    }
}

/// The `query` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum QueryAction {
    /// Register a query and start it (its SQL is validated first).
    ///
    /// Example: `urbanstream query add busy_segments --file busy.sql`
    Add {
        /// Name: letters, digits, '_' or '-', starting with a letter.
        name: String,
        /// The SQL.
        #[command(flatten)]
        input: SqlInput,
        /// Memory pool of this query, bytes (default: the service's `queries.memory_limit`).
        #[arg(long)]
        memory_limit: Option<u64>,
    },
    /// Check that SQL plans against the city's tables, without registering it.
    ///
    /// Example: `urbanstream query validate "INSERT INTO alerts SELECT …"`
    Validate {
        /// The SQL.
        #[command(flatten)]
        input: SqlInput,
    },
    /// Run a query over the rows of a CSV or JSON-lines file, or over a range of its
    /// stream's topic, without registering it: the service answers with its first output
    /// rows and what was rejected or late.
    ///
    /// Example: `urbanstream query preview --file busy.sql --data detections.csv \
    /// --rename time=event_time --time-zone +07:00` or
    /// `urbanstream query preview --file busy.sql --from 2026-11-30T06:00:00Z --to 2026-11-30T07:00:00Z`
    Preview {
        /// The SQL.
        #[command(flatten)]
        input: SqlInput,
        /// The rows of the query's stream: a CSV (with a header) or JSON-lines file. Without
        /// it, the stream's topic is read (`--from`, `--to`, `--from-offset`, `--to-offset`).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Topic records written from this time (their Kafka timestamps; RFC 3339 or epoch
        /// ms).
        #[arg(long, conflicts_with = "data")]
        from: Option<String>,
        /// Topic records written before this time (their Kafka timestamps; RFC 3339 or epoch
        /// ms).
        #[arg(long, conflicts_with = "data")]
        to: Option<String>,
        /// First offset read in each partition.
        #[arg(long, conflicts_with = "data")]
        from_offset: Option<i64>,
        /// Offset each partition is read up to (excluded).
        #[arg(long, conflicts_with = "data")]
        to_offset: Option<i64>,
        /// Renames a column of the file to the stream's field: `--rename station=sensor_id`
        /// (repeatable).
        #[arg(long)]
        rename: Vec<String>,
        /// Time zone of event-time texts written without one (`+07:00`, `Asia/Ho_Chi_Minh`).
        #[arg(long)]
        time_zone: Option<String>,
        /// Unit of a numeric event-time column: `s`, `ms` or `us`.
        #[arg(long)]
        time_unit: Option<String>,
        /// Output rows shown (all are counted).
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// List every query with its state and counts.
    ///
    /// Example: `urbanstream query list` or `urbanstream query list --json`
    List,
    /// Show one query: state, error, counts, lag, watermark, SQL.
    ///
    /// Example: `urbanstream query show congestion_minute`
    Show {
        /// Its name.
        name: String,
    },
    /// Stop a registered query and remove it from the catalog.
    ///
    /// Example: `urbanstream query drop busy_segments`
    Drop {
        /// Its name.
        name: String,
    },
    /// Stop a query after it publishes what it holds and commits; it stays paused across
    /// restarts of the service.
    ///
    /// Example: `urbanstream query pause alerts_pollution`
    Pause {
        /// Its name.
        name: String,
    },
    /// Start a paused query again from its committed offsets.
    ///
    /// Example: `urbanstream query resume alerts_pollution`
    Resume {
        /// Its name.
        name: String,
    },
    /// Stop a query in any state (FAILED included) and start it again.
    ///
    /// Example: `urbanstream query restart busy_segments`
    Restart {
        /// Its name.
        name: String,
    },
    /// Remove a query's state (its checkpoints) and start it afresh from the beginning of its
    /// inputs, whatever its consumer group committed: for a built-in query whose state does
    /// not fit the SQL a new version of urbanstream ships. Its savepoints are kept.
    ///
    /// Example: `urbanstream query reset alerts_congestion`
    Reset {
        /// Its name.
        name: String,
    },
    /// Give a query new SQL and keep its state, or take it back to a savepoint. The state
    /// carries over when the new SQL keeps the windows, group keys, aggregates, detectors,
    /// joins and output topic (filters, projections, HAVING and the columns published may
    /// change); otherwise the service refuses and names what does not fit, and the query
    /// goes on as it was.
    ///
    /// Example: `urbanstream query upgrade busy_segments --file busy-v2.sql` or
    /// `urbanstream query upgrade busy_segments --savepoint before-v2`
    #[command(group(
        clap::ArgGroup::new("upgrade_from").required(true).multiple(true).args(["file", "savepoint"])
    ))]
    Upgrade {
        /// Its name.
        name: String,
        /// The new SQL (the query's own without it: going back to a savepoint).
        #[arg(long, short)]
        file: Option<PathBuf>,
        /// Start from this savepoint instead of the query's newest state.
        #[arg(long)]
        savepoint: Option<String>,
    },
    /// Keep a query's state under a name, to upgrade from or go back to later. A running
    /// query stops for the copy (publishing and committing what it holds) and goes on.
    ///
    /// Example: `urbanstream query savepoint busy_segments before-v2`
    Savepoint {
        /// The query.
        name: String,
        /// The savepoint's name.
        savepoint: String,
    },
    /// List the savepoints kept of a query (a dropped query's too).
    ///
    /// Example: `urbanstream query savepoints busy_segments`
    Savepoints {
        /// The query.
        name: String,
    },
}

/// Options of `urbanstream table`.
#[derive(Debug, Clone, Args)]
pub struct TableArgs {
    /// The service.
    #[command(flatten)]
    pub server: ServerArgs,
    /// Print the API's JSON answer instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub action: TableAction,
}

/// The `table` subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum TableAction {
    /// List the tables SQL can read: streams and reference tables (with version and rows).
    ///
    /// Example: `urbanstream table list`
    List,
    /// Show one table: kind, topic, event time, key, version, columns.
    ///
    /// Example: `urbanstream table show sensors`
    Show {
        /// Its name.
        name: String,
    },
    /// Print a reference table's current rows as CSV.
    ///
    /// Example: `urbanstream table rows sensors > sensors.csv`
    Rows {
        /// Its name.
        name: String,
    },
    /// Install a CSV as the next version of a reference table (or as a new table). It is
    /// checked first (the table's header and types; for the city's tables every row and the
    /// references between them), kept beside the service's catalog, and read by every query
    /// from its next micro-batch, without a restart.
    ///
    /// Example: `urbanstream table rows sensors > sensors.csv`, add rows, then
    /// `urbanstream table replace sensors --file sensors.csv`
    Replace {
        /// Its name.
        name: String,
        /// The CSV, with a header row.
        #[arg(long, short)]
        file: PathBuf,
    },
    /// Remove a reference table added at run time, with its kept versions. The city's tables
    /// are replaced, never removed; a table a query reads is removed once those queries are
    /// dropped.
    ///
    /// Example: `urbanstream table remove camera_pairs`
    Remove {
        /// Its name.
        name: String,
    },
}

/// Runs one `urbanstream table` command and prints its answer.
pub async fn run_table(args: TableArgs) -> Result<()> {
    let client = args.server.client()?;
    let answer = match &args.action {
        TableAction::Rows { name } => {
            let csv = client
                .send(
                    Method::GET,
                    &format!("/v1/tables/{}/rows", segment(name)?),
                    None,
                )
                .await?;
            print!("{}", csv_for_stdout(&csv));
            return Ok(());
        }
        TableAction::Remove { name } => {
            client
                .send(
                    Method::DELETE,
                    &format!("/v1/tables/{}", segment(name)?),
                    None,
                )
                .await?;
            println!("table {name} removed");
            return Ok(());
        }
        TableAction::List => client.call(Method::GET, "/v1/tables", None).await?,
        TableAction::Show { name } => {
            client
                .call(Method::GET, &format!("/v1/tables/{}", segment(name)?), None)
                .await?
        }
        TableAction::Replace { name, file } => {
            let csv = crate::files::read_text(
                file,
                crate::reference::tables::MAX_CSV_BYTES as u64,
                "--file",
            )
            .map_err(|e| Error::Api(e.to_string()))?;
            let text = client
                .send(
                    Method::PUT,
                    &format!("/v1/tables/{}/rows", segment(name)?),
                    Some(("text/csv", csv)),
                )
                .await?;
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        }
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&answer).unwrap_or_default()
        );
        return Ok(());
    }
    match &args.action {
        TableAction::List => print!("{}", printable(&tables_text(&answer))),
        _ => print!("{}", printable(&table_details(&answer, client.zone))),
    }
    Ok(())
}

/// Every table, one row each.
pub(super) fn tables_text(tables: &Value) -> String {
    let mut rows = vec![["NAME", "KIND", "TOPIC / VERSION", "ROWS", "COLUMNS"].map(String::from)];
    for t in tables.as_array().into_iter().flatten() {
        let columns = t["columns"].as_array().map_or(0, Vec::len);
        let (source, rows_text) = if t["kind"] == "stream" {
            (
                format!("{} ({})", text(&t["topic"]), text(&t["format"])),
                "-".to_string(),
            )
        } else {
            let follows = match t["follows"]["topic"].as_str() {
                Some(topic) => format!(" (follows {topic})"),
                None => String::new(),
            };
            (
                format!("v{}{follows}", text(&t["version"])),
                text(&t["rows"]),
            )
        };
        rows.push([
            text(&t["name"]),
            text(&t["kind"]),
            source,
            rows_text,
            columns.to_string(),
        ]);
    }
    aligned(&rows)
}

/// One table: its properties, then a column per line.
pub(super) fn table_details(t: &Value, zone: DisplayZone) -> String {
    let mut out = String::new();
    for key in [
        "name",
        "kind",
        "topic",
        "format",
        "protobuf_message",
        "event_time",
        "watermark_delay_ms",
        "key",
        "version",
        "rows",
        "derived_from",
        "installed_ms",
    ] {
        if key == "installed_ms" {
            if let Some(ms) = t[key].as_i64() {
                out.push_str(&format!(
                    "{:<20} {}\n",
                    "installed",
                    zone.format_labelled(ms)
                ));
            }
        } else if !t[key].is_null() {
            out.push_str(&format!("{key:<20} {}\n", text(&t[key])));
        }
    }
    let follows = &t["follows"];
    if let Some(topic) = follows["topic"].as_str() {
        out.push_str(&format!(
            "{:<20} {topic} ({}, {} records read, {} refused to the DLQ)\n",
            "follows",
            if follows["loaded"] == true {
                "read to its end"
            } else {
                "reading"
            },
            text(&follows["records"]),
            text(&follows["refused_records"]),
        ));
        if let Some(error) = follows["error"].as_str() {
            out.push_str(&format!("{:<20} {error}\n", "follow error"));
        }
    }
    let mut rows = vec![["COLUMN", "TYPE", "NULLABLE"].map(String::from)];
    for c in t["columns"].as_array().into_iter().flatten() {
        rows.push([text(&c["name"]), text(&c["type"]), text(&c["nullable"])]);
    }
    out.push_str(&aligned(&rows));
    out
}

/// A file as a preview's input: its format by its extension (`csv`, `parquet`, or else
/// `jsonl`) and its contents as the request carries them (a Parquet file's bytes in base64).
pub(super) fn preview_input(path: &std::path::Path) -> Result<(&'static str, String)> {
    use base64::Engine as _;
    let unreadable = |e: std::io::Error| Error::Api(format!("{}: {e}", path.display()));
    let format = match path.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("csv") => "csv",
        Some(e) if e.eq_ignore_ascii_case("parquet") => "parquet",
        _ => "jsonl",
    };
    let data = if format == "parquet" {
        base64::engine::general_purpose::STANDARD.encode(std::fs::read(path).map_err(unreadable)?)
    } else {
        std::fs::read_to_string(path).map_err(unreadable)?
    };
    Ok((format, data))
}

/// A time given as epoch milliseconds or RFC 3339.
fn epoch_ms(text: &str) -> Result<i64> {
    if let Ok(ms) = text.trim().parse::<i64>() {
        return Ok(ms);
    }
    let t = humantime::parse_rfc3339_weak(text.trim()).map_err(|e| {
        Error::Api(format!(
            "{text}: {e} (write RFC 3339, 2026-11-30T06:00:00Z, or epoch milliseconds)"
        ))
    })?;
    let ms = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| Error::Api(format!("{text}: {e}")))?
        .as_millis();
    Ok(i64::try_from(ms).unwrap_or(i64::MAX))
}

/// A preview's rows as a table (columns in the query's order; times, published as epoch
/// milliseconds, in `zone`), then its counts.
pub(super) fn preview_text(answer: &Value, zone: DisplayZone) -> String {
    let rows = answer["rows"].as_array().cloned().unwrap_or_default();
    let mut out = String::new();
    // (name, whether a time) of each column: as the answer lists them, or (an answer
    // without the list) the first row's keys.
    let mut columns: Vec<(String, bool)> = answer["columns"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| {
            let name = c["name"].as_str()?.to_string();
            let time = c["type"]
                .as_str()
                .is_some_and(|t| t.starts_with("Timestamp"));
            Some((name, time))
        })
        .collect();
    if columns.is_empty()
        && let Some(first) = rows.first().and_then(Value::as_object)
    {
        columns = first.keys().map(|k| (k.clone(), false)).collect();
    }
    if !rows.is_empty() && !columns.is_empty() {
        let mut cells = vec![columns.iter().map(|(c, _)| c.clone()).collect::<Vec<_>>()];
        for r in &rows {
            cells.push(
                columns
                    .iter()
                    .map(|(c, time)| match (time, r[c].as_i64()) {
                        (true, Some(ms)) => zone.format_data(ms),
                        _ => text(&r[c]),
                    })
                    .collect(),
            );
        }
        out.push_str(&aligned(&cells));
        if columns.iter().any(|(_, time)| *time) {
            out.push_str(&format!("times in {zone}\n"));
        }
    }
    out.push_str(&format!(
        "{} input rows, {} output rows{}\n",
        text(&answer["input_rows"]),
        text(&answer["output_rows"]),
        if answer["truncated"] == true {
            " (the first shown; --limit for more)"
        } else {
            ""
        }
    ));
    if answer["input_truncated"] == true {
        out.push_str("the range held more records than a preview reads: narrow it\n");
    }
    if answer["rejected"].as_u64().unwrap_or(0) > 0 {
        out.push_str(&format!(
            "{} rows rejected, by the stream's schema or by the query (the first: {})\n",
            text(&answer["rejected"]),
            text(&answer["first_rejection"])
        ));
    }
    if answer["refused_results"].as_u64().unwrap_or(0) > 0 {
        out.push_str(&format!(
            "{} result rows not published (DLQ records of stage `result` in a running query; \
             the first: {})\n",
            text(&answer["refused_results"]),
            text(&answer["first_refused_result"])
        ));
    }
    if answer["unreadable_time"].as_u64().unwrap_or(0) > 0 {
        out.push_str(&format!(
            "{} rows without a readable event time (the first: {}; see --time-unit, \
             --time-zone)\n",
            text(&answer["unreadable_time"]),
            answer["first_unreadable"]
        ));
    }
    for (key, what) in [
        (
            "ignored_columns",
            "columns of the file that the stream does not have, not read",
        ),
        (
            "missing_fields",
            "fields of the stream that the file does not have, NULL in every row",
        ),
    ] {
        let names: Vec<String> = answer[key]
            .as_array()
            .into_iter()
            .flatten()
            .map(text)
            .collect();
        if !names.is_empty() {
            out.push_str(&format!("{what}: {}\n", names.join(", ")));
        }
    }
    for (reason, n) in answer["diverted"].as_object().into_iter().flatten() {
        out.push_str(&format!("{} rows diverted: {reason}\n", text(n)));
    }
    out
}

/// Rows of cells, columns padded to their widest cell.
pub(super) fn aligned<R: AsRef<[String]>>(rows: &[R]) -> String {
    let columns = rows.first().map_or(0, |r| r.as_ref().len());
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .map(|r| r.as_ref().get(c).map_or(0, |cell| cell.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .as_ref()
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Runs one `urbanstream query` command and prints its answer.
pub async fn run(args: QueryArgs) -> Result<()> {
    let client = args.server.client()?;
    let (method, path, body, kind) = match &args.action {
        QueryAction::Add {
            name,
            input,
            memory_limit,
        } => {
            let mut body = json!({ "name": name, "sql": input.read()? });
            if let Some(limit) = memory_limit {
                body["memory_limit"] = json!(limit);
            }
            (
                Method::POST,
                "/v1/queries".to_string(),
                Some(body),
                Shown::One,
            )
        }
        QueryAction::Validate { input } => (
            Method::POST,
            "/v1/queries/validate".to_string(),
            Some(json!({ "sql": input.read()? })),
            Shown::Validated,
        ),
        QueryAction::Preview {
            input,
            data,
            from,
            to,
            from_offset,
            to_offset,
            rename,
            time_zone,
            time_unit,
            limit,
        } => {
            let mut body = json!({ "sql": input.read()?, "limit": limit });
            match data {
                Some(data) => {
                    let (format, text) = preview_input(data)?;
                    body["input"] = json!({"format": format, "data": text, "rename": rename,
                                           "time_zone": time_zone, "time_unit": time_unit});
                }
                None => {
                    let ms = |t: &Option<String>| -> Result<Option<i64>> {
                        t.as_deref().map(epoch_ms).transpose()
                    };
                    body["topic"] = json!({"from_ms": ms(from)?, "to_ms": ms(to)?,
                                           "from_offset": from_offset, "to_offset": to_offset});
                }
            }
            (
                Method::POST,
                "/v1/queries/preview".to_string(),
                Some(body),
                Shown::Preview,
            )
        }
        QueryAction::List => (Method::GET, "/v1/queries".to_string(), None, Shown::List),
        QueryAction::Show { name } => (
            Method::GET,
            format!("/v1/queries/{}", segment(name)?),
            None,
            Shown::One,
        ),
        QueryAction::Drop { name } => (
            Method::DELETE,
            format!("/v1/queries/{}", segment(name)?),
            None,
            Shown::Dropped(name.clone()),
        ),
        QueryAction::Pause { name } => control(name, "pause")?,
        QueryAction::Resume { name } => control(name, "resume")?,
        QueryAction::Restart { name } => control(name, "restart")?,
        QueryAction::Reset { name } => control(name, "reset")?,
        QueryAction::Upgrade {
            name,
            file,
            savepoint,
        } => {
            let sql = file
                .as_ref()
                .map(|path| {
                    crate::files::read_text(path, crate::files::SQL_FILE_BYTES, "--file")
                        .map_err(|e| Error::Api(e.to_string()))
                })
                .transpose()?;
            (
                Method::POST,
                format!("/v1/queries/{}/upgrade", segment(name)?),
                Some(json!({ "sql": sql, "savepoint": savepoint })),
                Shown::One,
            )
        }
        QueryAction::Savepoint { name, savepoint } => (
            Method::POST,
            format!("/v1/queries/{}/savepoints", segment(name)?),
            Some(json!({ "savepoint": savepoint })),
            Shown::Savepoints,
        ),
        QueryAction::Savepoints { name } => (
            Method::GET,
            format!("/v1/queries/{}/savepoints", segment(name)?),
            None,
            Shown::Savepoints,
        ),
    };
    let answer = client.call(method, &path, body).await?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&answer).unwrap_or_default()
        );
    } else {
        print!("{}", printable(&render(&answer, &kind, client.zone)));
    }
    Ok(())
}

/// `POST /v1/queries/{name}/{action}`, answered with the query's status.
fn control(name: &str, action: &str) -> Result<(Method, String, Option<Value>, Shown)> {
    Ok((
        Method::POST,
        format!("/v1/queries/{}/{action}", segment(name)?),
        None,
        Shown::One,
    ))
}

/// A table's CSV as `table rows` prints it: as it is into a file or a pipe (a copy to edit
/// and replace the table with: its CRLF line ends were written out as `\u{d}`, and the
/// header no longer matched), and on a terminal with its line ends as the terminal's and
/// its other control characters escaped ([`printable`]).
fn csv_for_stdout(csv: &str) -> std::borrow::Cow<'_, str> {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() {
        return std::borrow::Cow::Borrowed(csv);
    }
    std::borrow::Cow::Owned(printable(&csv.replace("\r\n", "\n")).into_owned())
}

/// `text` safe for a terminal: control characters other than newlines and tabs (an escape
/// sequence in a query's SQL or a row's value, which the terminal would obey) written as
/// escapes (`\u{1b}`).
pub(crate) fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    escape_controls(text, &['\n', '\t'])
}

/// `text` with its control characters but those of `keep` written as escapes (`\u{1b}`).
pub(crate) fn escape_controls<'a>(text: &'a str, keep: &[char]) -> std::borrow::Cow<'a, str> {
    let unsafe_char = |c: char| c.is_control() && !keep.contains(&c);
    if !text.contains(unsafe_char) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// `name` as one segment of a URL's path: every byte but ASCII letters, digits, '-' and '_'
/// percent-encoded, so that a name holding '/', '?' or '#' names itself, not another path (a
/// drop of `scratch/../victim` dropped `victim`). `.` and `..` are no name.
pub(crate) fn segment(name: &str) -> Result<String> {
    if name.is_empty() || name == "." || name == ".." {
        return Err(Error::Api(format!("{name:?} is not a name")));
    }
    Ok(name
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect())
}

/// How an answer is printed.
enum Shown {
    Preview,
    One,
    List,
    Validated,
    Dropped(String),
    Savepoints,
}

/// The API's client.
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
    /// The time zone answers are shown in.
    pub zone: DisplayZone,
}

impl Client {
    /// A client of the API at `server` (`http://host:port`).
    pub fn new(server: &str, token: Option<String>) -> Result<Self> {
        let base = server.trim_end_matches('/').to_string();
        if !base.starts_with("http://") && !base.starts_with("https://") {
            return Err(Error::Api(format!(
                "--server {server}: expected http://host:port"
            )));
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| Error::Api(e.to_string()))?;
        Ok(Self {
            base,
            token,
            http,
            zone: DisplayZone::CITY,
        })
    }

    /// Sends a request; the answer's JSON (null for 204), or the API's error message.
    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value> {
        let body = body.map(|b| ("application/json", b.to_string()));
        let text = self.send(method, path, body).await?;
        Ok(if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        })
    }

    /// Sends a request with a body of a content type; the answer's text, or the API's error
    /// message.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, String)>,
    ) -> Result<String> {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method, &url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some((content_type, body)) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, content_type)
                .body(body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| Error::Api(format!("cannot reach {}: {e}", self.base)))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| Error::Api(format!("{url}: {e}")))?;
        if status.is_success() {
            return Ok(text);
        }
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if value.get("message").is_none() && status == reqwest::StatusCode::NOT_FOUND {
            // The API answers every error with a message: this is another server (the demo
            // serves its console only).
            return Err(Error::Api(format!(
                "{status}: {} has no urbanstream API at {path} (the demo serves only its web \
                 console; the API is `urbanstream serve`'s): give the service's address with \
                 --server or URBANSTREAM_SERVER",
                self.base
            )));
        }
        let mut message = value
            .get("message")
            .and_then(Value::as_str)
            .map_or_else(|| value.to_string(), str::to_string);
        if let Some(p) = value.get("position") {
            message.push_str(&format!(" (line {}, column {})", p["line"], p["column"]));
        }
        Err(Error::Api(format!("{status}: {message}")))
    }
}

/// The answer as text.
fn render(answer: &Value, kind: &Shown, zone: DisplayZone) -> String {
    match kind {
        Shown::List => table(
            answer.as_array().map(Vec::as_slice).unwrap_or_default(),
            zone,
        ),
        Shown::One => details(answer, zone),
        Shown::Dropped(name) => format!("dropped {name}\n"),
        Shown::Savepoints => {
            let one = [answer.clone()];
            let list = match answer.as_array() {
                Some(list) => list.as_slice(),
                None => &one,
            };
            if list.is_empty() {
                return "no savepoints\n".into();
            }
            let mut out = String::new();
            for s in list {
                if let Some(why) = s["damaged"].as_str() {
                    out.push_str(&format!("{}  damaged: {why}\n", text(&s["name"])));
                    continue;
                }
                let stores = s["stores"].as_array().map_or(0, Vec::len);
                out.push_str(&format!(
                    "{}  of {}  taken {}  {} store{}, {} bytes\n",
                    text(&s["name"]),
                    text(&s["query"]),
                    s["created_at_ms"]
                        .as_i64()
                        .map_or("-".into(), |ms| zone.format_labelled(ms)),
                    stores,
                    if stores == 1 { "" } else { "s" },
                    text(&s["bytes"]),
                ));
            }
            out
        }
        Shown::Preview => preview_text(answer, zone),
        Shown::Validated => {
            let mut out = String::from("valid\n");
            for q in answer["queries"].as_array().into_iter().flatten() {
                let others: String = q["also_reads"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|t| format!(" + {} ({})", text(&t[0]), text(&t[1])))
                    .collect();
                out.push_str(&format!(
                    "  {} ({}){others} -> {} ({}){}\n",
                    text(&q["source"]),
                    text(&q["source_topic"]),
                    text(&q["sink"]),
                    text(&q["sink_topic"]),
                    if q["windowed"].as_bool() == Some(true) {
                        ", windowed"
                    } else {
                        ""
                    }
                ));
            }
            out
        }
    }
}

pub(super) fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Every query, one row each, columns padded to their widest cell.
pub(super) fn table(queries: &[Value], zone: DisplayZone) -> String {
    let watermark = format!("WATERMARK ({zone})");
    let header = [
        "NAME",
        "STATE",
        "ROWS IN",
        "ROWS OUT",
        "LATE",
        "DLQ",
        "LAG",
        watermark.as_str(),
        "ERROR",
    ];
    let mut rows = vec![header.map(String::from)];
    for q in queries {
        let mut error = text(&q["error"]);
        if error.chars().count() > 60 {
            error = error.chars().take(57).collect::<String>() + "...";
        }
        rows.push([
            text(&q["name"]),
            text(&q["state"]),
            text(&q["rows_in"]),
            text(&q["rows_out"]),
            text(&q["late"]),
            text(&q["dlq"]),
            text(&q["consumer_lag"]),
            q["watermark_ms"]
                .as_i64()
                .map_or_else(|| "-".to_string(), |ms| zone.format(ms)),
            error,
        ]);
    }
    aligned(&rows)
}

/// One query as `key: value` lines, then its SQL.
fn details(q: &Value, zone: DisplayZone) -> String {
    let mut out = String::new();
    for key in [
        "name",
        "state",
        "error",
        "builtin",
        "rows_in",
        "rows_out",
        "late",
        "dlq",
        "unknown_ids",
        "batches",
        "batches_read_ahead",
        "consumer_lag",
        "assigned_partitions",
        "watermark",
        "watermark_lag_ms",
        "state_groups",
        "state_bytes",
        "memory_limit",
        "restarts",
        "last_checkpoint",
    ] {
        let value = match key {
            "watermark" => q["watermark_ms"]
                .as_i64()
                .map_or_else(|| "-".to_string(), |ms| zone.format_labelled(ms)),
            "last_checkpoint" => match &q[key] {
                Value::Null => "-".to_string(),
                c => format!(
                    "epoch {} {} at {}, {} bytes, took {} ms",
                    text(&c["epoch"]),
                    if c["restored"].as_bool() == Some(true) {
                        "restored"
                    } else {
                        "written"
                    },
                    c["at_ms"]
                        .as_i64()
                        .map_or_else(|| "-".to_string(), |ms| zone.format_labelled(ms)),
                    text(&c["bytes"]),
                    text(&c["duration_ms"]),
                ),
            },
            _ => text(&q[key]),
        };
        out.push_str(&format!("{key:<20} {value}\n"));
    }
    out.push_str(&format!("sql:\n{}\n", text(&q["sql"]).trim_end()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `table rows` into a file writes the CSV as the service gives it, CRLF line ends
    /// included, so that the file replaces the table again (the line ends were escaped to
    /// `\u{d}` and the header no longer matched). Tests run with stdout not a terminal.
    #[test]
    fn table_rows_into_a_file_are_the_csv_as_given() {
        let csv = "sensor_id,ward_id\r\nhn-01,ba_dinh\r\n";
        assert_eq!(csv_for_stdout(csv), csv);
    }

    /// A name is one path segment whatever it holds (`query drop scratch/../victim` dropped
    /// `victim`), and what is printed holds no control character a terminal would obey.
    #[test]
    fn names_stay_in_their_segment_and_output_is_printable() {
        assert_eq!(segment("counts").ok().as_deref(), Some("counts"));
        assert_eq!(
            segment("scratch/../victim").ok().as_deref(),
            Some("scratch%2F%2E%2E%2Fvictim")
        );
        assert_eq!(segment("a?b").ok().as_deref(), Some("a%3Fb"));
        assert!(segment("..").is_err() && segment(".").is_err() && segment("").is_err());
        assert_eq!(
            printable("a\x1b]0;pwned\x07\x1b[2J\tb\n"),
            "a\\u{1b}]0;pwned\\u{7}\\u{1b}[2J\tb\n"
        );
        assert!(matches!(printable("plain"), std::borrow::Cow::Borrowed(_)));
    }

    /// A preview's columns come in the query's order and its times (epoch ms, as published)
    /// in the display zone; a null shows as `-`.
    #[test]
    fn a_preview_shows_its_columns_in_order_and_times_in_the_zone() {
        let answer = json!({
            "rows": [{"segment_id": "kim_ma_w", "window_start": 1_767_222_000_000_i64, "n": 2},
                     {"segment_id": "xuan_thuy", "window_start": null, "n": 1}],
            "columns": [{"name": "segment_id", "type": "Utf8", "nullable": false},
                        {"name": "window_start", "type": "Timestamp(ms)", "nullable": true},
                        {"name": "n", "type": "Int64", "nullable": false}],
            "input_rows": 3, "output_rows": 2, "truncated": false,
        });
        let out = preview_text(&answer, DisplayZone::CITY);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            ["segment_id", "window_start", "n"]
        );
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            ["kim_ma_w", "2026-01-01", "06:00:00", "2"]
        );
        assert_eq!(
            lines[2].split_whitespace().collect::<Vec<_>>(),
            ["xuan_thuy", "-", "1"]
        );
        assert_eq!(lines[3], "times in UTC+07:00");
        assert_eq!(lines[4], "3 input rows, 2 output rows");
        let utc = preview_text(&answer, DisplayZone::UTC);
        assert!(utc.contains("2025-12-31 23:00:00"), "{utc}");
    }

    #[test]
    fn the_table_aligns_columns_and_shortens_errors() {
        let rows = vec![
            json!({"name": "a", "state": "RUNNING", "rows_in": 10, "rows_out": 2, "late": 0,
                   "dlq": 1, "consumer_lag": 5, "watermark_ms": 1_763_769_600_000_i64,
                   "error": null}),
            json!({"name": "longer_name", "state": "FAILED", "rows_in": 0, "rows_out": 0,
                   "late": 0, "dlq": 0, "consumer_lag": null, "watermark": null,
                   "error": "x".repeat(100)}),
        ];
        let out = table(&rows, DisplayZone::CITY);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("NAME         STATE"), "{out}");
        assert!(lines[1].starts_with("a            RUNNING  10"), "{out}");
        assert!(
            lines[2].contains("FAILED") && lines[2].ends_with("..."),
            "{out}"
        );
        assert_eq!(lines[2].find("FAILED"), lines[0].find("STATE"));
        // Midnight UTC is 07:00 in Hanoi, and the header says so.
        assert!(lines[0].contains("WATERMARK (UTC+07:00)"), "{out}");
        assert!(lines[1].contains("2025-11-22 07:00:00"), "{out}");
    }

    #[test]
    fn a_preview_input_is_text_or_a_parquet_file_in_base64() -> Result<()> {
        use base64::Engine as _;
        let dir = tempfile::tempdir()?;
        let bytes: &[u8] = b"PAR1\x00\xff binary PAR1";
        for (name, contents, format) in [
            ("a.CSV", &b"a,b\n1,2\n"[..], "csv"),
            ("a.jsonl", &b"{\"a\": 1}\n"[..], "jsonl"),
            ("a.parquet", bytes, "parquet"),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, contents)?;
            let (got, data) = preview_input(&path)?;
            assert_eq!(got, format);
            let sent = if format == "parquet" {
                base64::engine::general_purpose::STANDARD
                    .decode(&data)
                    .expect("base64")
            } else {
                data.into_bytes()
            };
            assert_eq!(sent, contents, "{name}");
        }
        let missing = preview_input(&dir.path().join("none.csv")).expect_err("missing");
        assert!(missing.to_string().contains("none.csv"), "{missing}");
        Ok(())
    }

    #[test]
    fn a_followed_table_shows_its_topic_and_how_it_goes() {
        let sensors = json!({"name": "sensors", "kind": "reference", "version": 4, "rows": 61,
            "follows": {"topic": "city.reference.sensors", "loaded": true, "records": 70,
                        "refused_records": 2, "rows": 61,
                        "error": "the rows read were refused: x: unknown ward nowhere"},
            "columns": [{"name": "sensor_id", "type": "Utf8", "nullable": true}]});
        let list = tables_text(&json!([sensors.clone()]));
        assert!(
            list.contains("v4 (follows city.reference.sensors)"),
            "{list}"
        );
        let details = table_details(&sensors, DisplayZone::CITY);
        assert!(
            details.contains(
                "follows              city.reference.sensors (read to its end, 70 records read, \
                 2 refused to the DLQ)"
            ),
            "{details}"
        );
        assert!(
            details.contains("follow error         the rows read were refused"),
            "{details}"
        );
    }

    #[test]
    fn a_server_without_a_scheme_is_refused() {
        assert!(Client::new("localhost:8080", None).is_err());
        assert!(Client::new("http://localhost:8080/", None).is_ok());
    }

    /// A server that is not the API (the demo's console, another program) answers 404
    /// without the API's message: the client says so and how to reach the API, not `404 Not
    /// Found: ""`.
    #[tokio::test]
    async fn a_server_without_the_api_is_named_as_such() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let server = tokio::spawn(async move {
            axum::serve(listener, axum::Router::new()).await.ok();
        });
        let client = Client::new(&format!("http://{address}"), None).expect("client");
        let error = client
            .call(reqwest::Method::GET, "/v1/queries", None)
            .await
            .expect_err("no API there")
            .to_string();
        assert!(
            error.contains(&format!(
                "http://{address} has no urbanstream API at /v1/queries"
            )) && error.contains("--server"),
            "{error}"
        );
        server.abort();
    }
}
