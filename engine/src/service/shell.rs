//! `urbanstream sql`: an interactive SQL shell against a running service, as analysts know
//! from ksqlDB's CLI, Flink's SQL client or psql.
//!
//! Statements end with `;` and may span lines; history is kept in
//! `~/.urbanstream_history`. What the shell understands:
//!
//! | statement | does (through the REST API) |
//! |---|---|
//! | `SHOW TABLES;` | the streams and reference tables (`GET /v1/tables`) |
//! | `DESCRIBE <table>;` | a table's columns, topic, event time, key, version |
//! | `SHOW FUNCTIONS;` | the functions SQL can call |
//! | `SHOW QUERIES;` | the registered queries and their state |
//! | `EXPLAIN <query>;` | how the query would run |
//! | `SELECT …;`, `INSERT INTO … SELECT …;` | a preview: the query run unregistered over the file set with `\data`, or else over the last five minutes of its stream's topic |
//! | `CREATE QUERY <name> AS <query>;` | registers and starts the query |
//! | `DROP QUERY <name>;` | stops and removes it |
//! | `SET urbanstream.<setting> = '<value>';` | checked, then sent before every query of the session |
//! | `RESET urbanstream.<setting>;`, `RESET ALL;` | no longer sent |
//! | `SET limit = <n>;`, `SET time_zone = '<zone>';` | rows a preview shows; zone of the data file's times |
//! | `\data <file> [old=new …]` | the CSV or JSON-lines file previews read, with column renames |
//! | `help`, `quit` | |

use std::path::PathBuf;

use clap::Args;
use reqwest::Method;
use serde_json::json;

use super::client::{
    Client, ServerArgs, aligned, preview_input, preview_text, printable, segment, table,
    table_details, tables_text, text,
};
use crate::error::{Error, Result};

/// Options of `urbanstream sql`.
#[derive(Debug, Clone, Args)]
pub struct ShellArgs {
    /// The service.
    #[command(flatten)]
    pub server: ServerArgs,
}

const HELP: &str = "\
SHOW TABLES;                      streams and reference tables
DESCRIBE <table>;                 columns, topic, event time, key, version
SHOW FUNCTIONS;  SHOW QUERIES;
EXPLAIN <query>;                  how the query would run
SELECT …;  INSERT INTO … SELECT …; a preview: the query over the \\data file, or else over the
                                  last five minutes of its stream's topic (nothing registered)
CREATE QUERY <name> AS <query>;   register and start it
DROP QUERY <name>;
SET urbanstream.<setting> = '…';  sent before every query of this session
RESET urbanstream.<setting>;  RESET ALL;
SET limit = <n>;  SET time_zone = '+07:00';
\\data <file.csv|file.jsonl> [old=new …]   the rows previews read (\\data alone: the topic)
quit
";

/// The session: settings and the preview's input.
#[derive(Debug, Default)]
struct Session {
    /// `SET urbanstream.… = …;` statements, in order, one per setting.
    settings: Vec<(String, String)>,
    limit: Option<usize>,
    time_zone: Option<String>,
    data: Option<(PathBuf, Vec<String>)>,
}

impl Session {
    /// `sql` after the session's settings.
    fn with_settings(&self, sql: &str) -> String {
        let mut out = String::new();
        for (key, value) in &self.settings {
            out.push_str(&format!("SET {key} = {value};\n"));
        }
        out.push_str(sql);
        out
    }
}

/// Runs the shell until `quit` or end of input.
pub async fn run(args: ShellArgs) -> Result<()> {
    let client = args.server.client()?;
    // Reach the service first, saying where it was looked for.
    client
        .call(Method::GET, "/v1/info", None)
        .await
        .map_err(|e| {
            Error::Api(format!(
                "{e}\nIs `urbanstream serve` running there? Give its address with --server."
            ))
        })?;
    let mut editor =
        rustyline::DefaultEditor::new().map_err(|e| Error::Api(format!("the terminal: {e}")))?;
    let history = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".urbanstream_history"));
    if let Some(h) = &history {
        let _ = editor.load_history(h);
    }
    println!(
        "urbanstream SQL shell on {} — statements end with ';', `help` lists them",
        args.server.server
    );
    let mut session = Session::default();
    let mut pending = String::new();
    loop {
        let prompt = if pending.is_empty() {
            "urbanstream> "
        } else {
            "          -> "
        };
        let line = match editor.readline(prompt) {
            Ok(line) => line,
            Err(rustyline::error::ReadlineError::Interrupted) => {
                pending.clear();
                continue;
            }
            Err(rustyline::error::ReadlineError::Eof) => break,
            Err(e) => return Err(Error::Api(format!("reading input: {e}"))),
        };
        let trimmed = line.trim();
        if pending.is_empty() {
            if trimmed.is_empty() {
                continue;
            }
            let word = trimmed.trim_end_matches(';').to_ascii_lowercase();
            if matches!(word.as_str(), "quit" | "exit" | "\\q") {
                break;
            }
            if matches!(word.as_str(), "help" | "\\?" | "\\h") {
                print!("{HELP}");
                continue;
            }
            if trimmed.starts_with('\\') {
                let _ = editor.add_history_entry(trimmed);
                report(meta(&mut session, trimmed));
                continue;
            }
        }
        pending.push_str(&line);
        pending.push('\n');
        if !trimmed.ends_with(';') {
            continue;
        }
        let statement = std::mem::take(&mut pending);
        let _ = editor.add_history_entry(statement.trim());
        report(execute(&client, &mut session, statement.trim()).await);
    }
    if let Some(h) = &history {
        let _ = editor.save_history(h);
    }
    Ok(())
}

/// Prints what a statement gave, or its error.
fn report(outcome: Result<String>) {
    match outcome {
        Ok(text) => print!("{}", printable(&text)),
        Err(e) => println!("error: {}", printable(&e.to_string())),
    }
}

/// A `\` command.
fn meta(session: &mut Session, line: &str) -> Result<String> {
    let mut words = line.split_whitespace();
    match words.next() {
        Some("\\data") => match words.next() {
            Some(file) => {
                let path = PathBuf::from(file);
                if !path.is_file() {
                    return Err(Error::Api(format!("{file}: no such file")));
                }
                let renames: Vec<String> = words.map(str::to_string).collect();
                if let Some(bad) = renames.iter().find(|r| !r.contains('=')) {
                    return Err(Error::Api(format!("{bad}: write renames as old=new")));
                }
                session.data = Some((path, renames));
                Ok(format!("previews read {file}\n"))
            }
            None => {
                session.data = None;
                Ok("previews read the last five minutes of the stream's topic\n".into())
            }
        },
        _ => Err(Error::Api(format!(
            "{line}: unknown command (help lists them)"
        ))),
    }
}

/// Runs one statement (ending with `;`).
async fn execute(client: &Client, session: &mut Session, statement: &str) -> Result<String> {
    let body = statement.trim_end_matches(';').trim();
    let words: Vec<&str> = body.split_whitespace().collect();
    let upper_words: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
    let first_two = upper_words
        .iter()
        .take(2)
        .map(String::as_str)
        .collect::<Vec<_>>();
    match first_two.as_slice() {
        ["SHOW", "TABLES"] => Ok(tables_text(
            &client.call(Method::GET, "/v1/tables", None).await?,
        )),
        ["SHOW", "QUERIES"] => {
            let queries = client.call(Method::GET, "/v1/queries", None).await?;
            Ok(table(
                queries.as_array().map(Vec::as_slice).unwrap_or_default(),
                client.zone,
            ))
        }
        ["SHOW", "FUNCTIONS"] => {
            let functions = client.call(Method::GET, "/v1/functions", None).await?;
            let mut rows = vec![["NAME", "KIND", "URBANSTREAM"].map(String::from)];
            for f in functions.as_array().into_iter().flatten() {
                rows.push([text(&f["name"]), text(&f["kind"]), text(&f["urbanstream"])]);
            }
            Ok(aligned(&rows))
        }
        ["DESCRIBE", name] | ["DESC", name] => {
            let name = name.to_ascii_lowercase();
            Ok(table_details(
                &client
                    .call(
                        Method::GET,
                        &format!("/v1/tables/{}", segment(&name)?),
                        None,
                    )
                    .await?,
                client.zone,
            ))
        }
        ["EXPLAIN", ..] => {
            let sql = session.with_settings(body["EXPLAIN".len()..].trim());
            let plan = client
                .call(
                    Method::POST,
                    "/v1/queries/explain",
                    Some(json!({ "sql": sql })),
                )
                .await?;
            Ok(format!(
                "{}\n",
                serde_json::to_string_pretty(&plan["queries"]).unwrap_or_default()
            ))
        }
        ["SET", ..] => set(session, body),
        ["RESET", ..] => reset(session, body),
        ["CREATE", "QUERY"] => {
            let (Some(name), Some(as_word)) = (words.get(2), upper_words.get(3)) else {
                return Err(Error::Api("write CREATE QUERY <name> AS <query>;".into()));
            };
            if as_word != "AS" {
                return Err(Error::Api("write CREATE QUERY <name> AS <query>;".into()));
            }
            // The query follows the fourth word, however the words are spaced (a newline
            // after AS once sent the SQL from the next " AS " on).
            let query = after_words(body, 4)
                .ok_or_else(|| Error::Api("write CREATE QUERY <name> AS <query>;".into()))?;
            let sql = session.with_settings(query.trim());
            let status = client
                .call(
                    Method::POST,
                    "/v1/queries",
                    Some(json!({ "name": unquoted(name), "sql": sql })),
                )
                .await?;
            Ok(format!(
                "registered {} ({})\n",
                text(&status["name"]),
                text(&status["state"])
            ))
        }
        ["DROP", "QUERY"] => {
            let name = words
                .get(2)
                .map(|w| unquoted(w))
                .ok_or_else(|| Error::Api("write DROP QUERY <name>;".into()))?;
            client
                .call(
                    Method::DELETE,
                    &format!("/v1/queries/{}", segment(name)?),
                    None,
                )
                .await?;
            Ok(format!("dropped {name}\n"))
        }
        _ => preview(client, session, body).await,
    }
}

/// `text` after its first `n` words (separated by any whitespace), if it has more.
fn after_words(text: &str, n: usize) -> Option<&str> {
    let mut rest = text;
    for _ in 0..n {
        let start = rest.find(|c: char| !c.is_whitespace())?;
        rest = &rest[start..];
        let end = rest.find(char::is_whitespace)?;
        rest = &rest[end..];
    }
    Some(rest)
}

/// A name as written, without the quotes around it (`'q'`, `"q"`).
fn unquoted(word: &str) -> &str {
    for quote in ['\'', '"'] {
        if let Some(inner) = word.strip_prefix(quote).and_then(|w| w.strip_suffix(quote)) {
            return inner;
        }
    }
    word
}

/// `SET key = value`: the shell's own settings, or a setting sent with every query.
fn set(session: &mut Session, body: &str) -> Result<String> {
    let rest = body["SET".len()..].trim();
    let (key, value) = rest
        .split_once('=')
        .or_else(|| rest.split_once(char::is_whitespace))
        .ok_or_else(|| Error::Api("write SET <key> = <value>;".into()))?;
    let key = key.trim().to_ascii_lowercase();
    let value = value.trim().to_string();
    let unquoted = value.trim_matches('\'').to_string();
    match key.as_str() {
        "limit" => {
            let n: usize = unquoted
                .parse()
                .map_err(|_| Error::Api(format!("limit {value}: a number of rows")))?;
            session.limit = Some(n);
        }
        "time_zone" => {
            crate::pipeline::offline::check_time_zone(&unquoted)
                .map_err(|e| Error::Api(e.to_string().replace("--time-zone", "time_zone")))?;
            session.time_zone = Some(unquoted);
        }
        k if k.starts_with("urbanstream.") => {
            // Checked here: a setting the service refuses, kept, made every later statement
            // of the session fail.
            crate::plan::stream::check_setting(&key, &unquoted)
                .map_err(|e| Error::Api(e.to_string().replace("Error during planning: ", "")))?;
            session.settings.retain(|(existing, _)| *existing != key);
            session.settings.push((key.clone(), value.clone()));
        }
        _ => {
            return Err(Error::Api(format!(
                "{key}: the shell knows limit, time_zone and urbanstream.* settings"
            )));
        }
    }
    Ok(format!("{key} = {value}\n"))
}

/// `RESET urbanstream.<setting>` (or `RESET ALL`): a setting no longer sent with the queries;
/// `RESET limit` and `RESET time_zone`: the shell's own, back to their defaults.
fn reset(session: &mut Session, body: &str) -> Result<String> {
    let key = body["RESET".len()..].trim().to_ascii_lowercase();
    match key.as_str() {
        "" => return Err(Error::Api("write RESET <setting>; or RESET ALL;".into())),
        "all" => {
            session.settings.clear();
            session.limit = None;
            session.time_zone = None;
            return Ok("every setting of the session reset\n".into());
        }
        "limit" => {
            session.limit = None;
            return Ok("limit reset\n".into());
        }
        "time_zone" => {
            session.time_zone = None;
            return Ok("time_zone reset\n".into());
        }
        _ => {}
    }
    let before = session.settings.len();
    session.settings.retain(|(existing, _)| *existing != key);
    if session.settings.len() == before {
        let set: Vec<&str> = session.settings.iter().map(|(k, _)| k.as_str()).collect();
        return Err(Error::Api(format!(
            "{key} is not set in this session (set: {}): write RESET <setting>; or RESET ALL;",
            if set.is_empty() {
                "none".to_string()
            } else {
                set.join(", ")
            }
        )));
    }
    Ok(format!("{key} reset\n"))
}

/// Runs a query unregistered over the session's data file, or the last five minutes of its
/// topic, and shows its rows.
async fn preview(client: &Client, session: &Session, sql: &str) -> Result<String> {
    let mut body = json!({
        "sql": session.with_settings(sql),
        "limit": session.limit.unwrap_or(20),
    });
    match &session.data {
        Some((path, renames)) => {
            let (format, data) = preview_input(path)?;
            body["input"] = json!({"format": format, "data": data, "rename": renames,
                                   "time_zone": session.time_zone});
        }
        None => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            body["topic"] = json!({ "from_ms": now - 5 * 60_000 });
        }
    }
    let answer = client
        .call(Method::POST, "/v1/queries/preview", Some(body))
        .await?;
    Ok(preview_text(&answer, client.zone))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `CREATE QUERY q AS` at the end of a line sent the SQL from the next " AS " on, and a
    /// quoted name kept its quotes.
    #[test]
    fn a_query_follows_its_fourth_word_however_spaced() {
        let body = "CREATE QUERY shq AS\nINSERT INTO t SELECT count(*) AS n FROM s";
        assert_eq!(
            after_words(body, 4).map(str::trim),
            Some("INSERT INTO t SELECT count(*) AS n FROM s")
        );
        assert_eq!(after_words("CREATE QUERY q AS", 4), None);
        assert_eq!(unquoted("'shq'"), "shq");
        assert_eq!(unquoted("\"shq\""), "shq");
        assert_eq!(unquoted("shq"), "shq");
    }

    /// A setting the service refuses was kept by the shell, and every later statement of the
    /// session failed with it; nothing took it back.
    #[test]
    fn settings_are_checked_when_set_and_can_be_reset() {
        let mut session = Session::default();
        let e = set(&mut session, "SET urbanstream.evil = 'x'").expect_err("no such setting");
        assert!(
            e.to_string()
                .contains("there is no setting urbanstream.evil"),
            "{e}"
        );
        let e = set(&mut session, "SET urbanstream.allowed_lateness = '-5m'").expect_err("-5m");
        assert!(e.to_string().contains("allowed_lateness"), "{e}");
        assert!(session.settings.is_empty());
        set(&mut session, "SET urbanstream.allowed_lateness = '5m'").expect("a setting");
        set(&mut session, "SET urbanstream.key_ttl = '1h'").expect("a setting");
        assert_eq!(session.settings.len(), 2);
        reset(&mut session, "RESET urbanstream.allowed_lateness").expect("reset");
        assert_eq!(
            session.with_settings("SELECT 1"),
            "SET urbanstream.key_ttl = '1h';\nSELECT 1"
        );
        assert!(reset(&mut session, "RESET urbanstream.allowed_lateness").is_err());
        set(&mut session, "SET limit = 5").expect("limit");
        reset(&mut session, "RESET limit").expect("the shell's own");
        assert_eq!(session.limit, None);
        assert!(reset(&mut session, "RESET").is_err());
        reset(&mut session, "RESET ALL").expect("reset all");
        assert_eq!(session.with_settings("SELECT 1"), "SELECT 1");
    }
}
