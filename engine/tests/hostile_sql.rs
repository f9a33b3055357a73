//! Analysts' SQL as an attacker would write it, sent to a real `urbanstream serve` process over
//! HTTP: file reads through every table type and `LOCATION`, COPY, CTAS, settings, table
//! functions, recursion, deep nesting, huge statements and bodies, malformed bytes and a
//! concurrent flood. Every request is answered 4xx with a message, no answer carries a byte
//! of the files the service can read, and after each the process is alive and answers
//! `/livez` within a second.

mod common;

use std::time::{Duration, Instant};

use common::{Api, Process, broker, free_port, serve, wait_until};
use serde_json::{Value, json};

const TOKEN: &str = "hostile-test-token-7f3a";
/// Written into every file an attack tries to read: no response may contain it.
const MARKER: &str = "SECRET-MARKER-5d41402abc4b2a76";

struct Target {
    api: Api,
    /// A client without connection reuse, for `/livez` (a refused body may end the
    /// connection it came on).
    probe: reqwest::Client,
    base: String,
    _broker: Process,
    _service: Process,
    /// Files the attacks try to read.
    secret: String,
    config: String,
    catalog: String,
}

fn start(dir: &std::path::Path) -> anyhow::Result<Target> {
    let (broker_process, brokers) = broker(dir)?;
    let port = free_port()?;
    let secret = dir.join("secret.csv");
    std::fs::write(&secret, format!("line\n{MARKER}\n{MARKER},{MARKER}\n"))?;
    let catalog = dir.join("data/catalog.json");
    let config = dir.join("urbanstream.toml");
    std::fs::write(
        &config,
        format!(
            "# {MARKER}\n[kafka]\nbrokers = \"{brokers}\"\ngroup_id = \"hostile\"\n\
             [api]\nlisten = \"127.0.0.1:{port}\"\ntoken = \"{TOKEN}\"\nmax_body = \"64KiB\"\n\
             [catalog]\npath = \"{}\"\n[queries]\ndefaults = false\nmemory_limit = \"256MiB\"\n\
             max_memory_limit = \"1GiB\"\n\
             [checkpoint]\ndir = \"{}\"\n",
            catalog.display(),
            dir.join("data/checkpoints").display()
        ),
    )?;
    let service = serve(&config, &dir.join("service.log"))?;
    let api = Api::new()?;
    let base = format!("http://127.0.0.1:{port}");
    api.wait_live(&base)?;
    let probe = {
        let _entered = api.rt.enter();
        reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()?
    };
    Ok(Target {
        probe,
        api,
        base,
        _broker: broker_process,
        _service: service,
        secret: secret.display().to_string(),
        config: config.display().to_string(),
        catalog: catalog.display().to_string(),
    })
}

impl Target {
    /// Sends `body` (raw bytes, JSON content type) to `path`; the status and the body text.
    fn post_raw(&self, path: &str, body: Vec<u8>) -> anyhow::Result<(u16, String)> {
        self.api.rt.block_on(async {
            let r = self
                .api
                .client
                .post(format!("{}{path}", self.base))
                .header("authorization", format!("bearer {TOKEN}"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await?;
            let status = r.status().as_u16();
            anyhow::Ok((status, r.text().await?))
        })
    }

    fn post(&self, path: &str, body: &Value) -> anyhow::Result<(u16, String)> {
        self.post_raw(path, serde_json::to_vec(body)?)
    }

    /// Whether `/livez` answers 200 within a second.
    fn live(&self) -> bool {
        self.api.rt.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(1),
                self.probe.get(format!("{}/livez", self.base)).send(),
            )
            .await
            .is_ok_and(|r| r.is_ok_and(|r| r.status().is_success()))
        })
    }

    /// `answer` is a refusal with a message and no secret; the process is still alive.
    fn assert_refused(&self, what: &str, status: u16, answer: &str) {
        assert!(
            (400..500).contains(&status),
            "{what}: expected 4xx, got {status}: {}",
            cut(answer)
        );
        let message = serde_json::from_str::<Value>(answer)
            .ok()
            .and_then(|v| v["message"].as_str().map(String::from))
            .unwrap_or_default();
        assert!(
            message.len() > 10,
            "{what}: no clear message: {}",
            cut(answer)
        );
        for secret in [MARKER, TOKEN, "root:x:0:0"] {
            assert!(
                !answer.contains(secret),
                "{what}: the answer leaks {secret}: {}",
                cut(answer)
            );
        }
        assert!(self.live(), "{what}: /livez did not answer within 1 s");
    }
}

fn cut(s: &str) -> &str {
    &s[..s.len().min(400)]
}

/// The attacks on `/v1/queries/validate`: (name, SQL).
fn attacks(t: &Target) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut add = |name: &str, sql: String| out.push((name.to_string(), sql));
    let leak = "CREATE TABLE leak AS SELECT CAST(string_agg(line, ' ## ') AS INT) FROM p";
    for file in [&t.secret, &t.config, &t.catalog, &"/etc/passwd".to_string()] {
        for kind in ["CSV", "JSON", "NDJSON", "PARQUET", "AVRO", "ARROW"] {
            add(
                &format!("STORED AS {kind} {file}"),
                format!(
                    "CREATE EXTERNAL TABLE p (line VARCHAR) STORED AS {kind} LOCATION '{file}'; {leak}"
                ),
            );
        }
    }
    add(
        "file URL",
        format!(
            "CREATE EXTERNAL TABLE p (line VARCHAR) STORED AS CSV LOCATION 'file://{}'; {leak}",
            t.secret
        ),
    );
    add(
        "object store",
        "CREATE EXTERNAL TABLE p (line VARCHAR) STORED AS PARQUET LOCATION 's3://bucket/x/'".into(),
    );
    add(
        "http location",
        "CREATE EXTERNAL TABLE p (line VARCHAR) STORED AS CSV LOCATION 'http://127.0.0.1:1/x'"
            .into(),
    );
    add(
        "KAFKA with a location",
        format!(
            "CREATE EXTERNAL TABLE p (line VARCHAR) STORED AS KAFKA LOCATION '{}' \
             OPTIONS ('topic' 't'); INSERT INTO alerts SELECT * FROM p",
            t.secret
        ),
    );
    add(
        "a path as a table",
        format!("INSERT INTO alerts SELECT * FROM '{}'", t.secret),
    );
    add(
        "a view over a path",
        format!("CREATE VIEW v AS SELECT * FROM '{}'", t.secret),
    );
    add(
        "read_csv",
        format!("SELECT * FROM read_csv('{}')", t.secret),
    );
    add(
        "COPY out",
        "COPY (SELECT 1 AS a) TO '/tmp/urbanstream-copy.csv' STORED AS CSV".into(),
    );
    add(
        "COPY a table",
        "COPY camera_events TO '/tmp/urbanstream-copy' STORED AS PARQUET".into(),
    );
    add("CTAS", "CREATE TABLE t AS SELECT 1 AS a".into());
    add("CTAS values", "CREATE TABLE t AS VALUES (1), (2)".into());
    add(
        "SELECT INTO",
        "SELECT a.* INTO t FROM segments a, segments b, segments c".into(),
    );
    add(
        "SELECT INTO a bomb",
        "SELECT unnest(range(1, 1000000000)) AS x INTO t".into(),
    );
    add(
        "4000 UNIONs",
        format!("SELECT 1 AS a {}", "UNION ALL SELECT 1 ".repeat(3_000)),
    );
    add(
        "100 joined tables",
        format!(
            "INSERT INTO alerts SELECT a.* FROM alerts a {}",
            (0..100)
                .map(|i| format!("JOIN segments s{i} ON true "))
                .collect::<String>()
        ),
    );
    add(
        "WITH ORDER",
        "CREATE EXTERNAL TABLE p (a INT) STORED AS KAFKA WITH ORDER (a ASC) OPTIONS ('topic' 't')"
            .into(),
    );
    add("CREATE TABLE", "CREATE TABLE t (a INT)".into());
    add(
        "INSERT into a memory table",
        "CREATE TABLE t (a INT); INSERT INTO t VALUES (1)".into(),
    );
    add(
        "CREATE FUNCTION",
        "CREATE FUNCTION f(a INT) RETURNS INT LANGUAGE SQL RETURN a + 1".into(),
    );
    add("CREATE SCHEMA", "CREATE SCHEMA s".into());
    add("CREATE DATABASE", "CREATE DATABASE d".into());
    add("ATTACH", "ATTACH DATABASE '/etc/passwd' AS x".into());
    add(
        "SET catalog location",
        "SET datafusion.catalog.location = '/etc'".into(),
    );
    add(
        "SET partitions",
        "SET datafusion.execution.target_partitions = 1000000".into(),
    );
    add("RESET", "RESET datafusion.catalog.location".into());
    add(
        "generate_series bomb",
        "SELECT * FROM generate_series(1, 30000000)".into(),
    );
    add(
        "range bomb joined to a stream",
        "INSERT INTO alerts SELECT a.* FROM alerts a CROSS JOIN range(1, 1000000000000)".into(),
    );
    add(
        "recursive CTE",
        "WITH RECURSIVE r AS (SELECT 1 AS n UNION ALL SELECT n + 1 FROM r) \
         INSERT INTO alerts SELECT a.* FROM alerts a JOIN r ON true"
            .into(),
    );
    add("EXPLAIN ANALYZE", "EXPLAIN ANALYZE SELECT 1".into());
    add("PREPARE", "PREPARE p AS SELECT 1".into());
    add("DESCRIBE a path", format!("DESCRIBE '{}'", t.secret));
    add("UPDATE", "UPDATE alerts SET severity = 1".into());
    add("DELETE", "DELETE FROM alerts".into());
    add("TRUNCATE", "TRUNCATE TABLE alerts".into());
    add(
        "a join of streams",
        "INSERT INTO alerts SELECT a.* FROM alerts a, alerts b, alerts c".into(),
    );
    // Depth and size.
    let sum = |n: usize| vec!["1"; n].join(" + ");
    add(
        "800-term sum",
        format!(
            "INSERT INTO alerts SELECT * FROM alerts WHERE severity < {}",
            sum(800)
        ),
    );
    add("10k-term sum", format!("SELECT {}", sum(10_000)));
    add(
        "10k-term AND",
        format!("SELECT 1 WHERE {}", vec!["true"; 10_000].join(" AND ")),
    );
    add(
        "10k-term string concatenation",
        format!("SELECT {}", vec!["'a'"; 10_000].join(" || ")),
    );
    add(
        "10k nested parentheses",
        format!("SELECT {}1{}", "(".repeat(10_000), ")".repeat(10_000)),
    );
    add(
        "10k nested subqueries",
        format!(
            "SELECT {}1{}",
            "(SELECT ".repeat(10_000),
            ")".repeat(10_000)
        ),
    );
    add("10k NOTs", format!("SELECT {}true", "NOT ".repeat(10_000)));
    add(
        "10k unary minus",
        format!("SELECT {}1", "- ".repeat(10_000)),
    );
    add(
        "10k nested functions",
        format!("SELECT {}1{}", "abs(".repeat(10_000), ")".repeat(10_000)),
    );
    add(
        "10k nested CASE",
        format!(
            "SELECT {}1{}",
            "CASE WHEN true THEN ".repeat(5_000),
            " END".repeat(5_000)
        ),
    );
    add(
        "10k nested arrays",
        format!("SELECT {}1{}", "[".repeat(10_000), "]".repeat(10_000)),
    );
    add(
        "huge IN list",
        format!(
            "SELECT 1 WHERE 1 IN ({})",
            (0..100_000)
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(",")
        ),
    );
    add(
        "huge string literal",
        format!("SELECT '{}'", "x".repeat(60_000)),
    );
    add(
        "huge number literal",
        format!("SELECT 1{}", "0".repeat(60_000)),
    );
    add("NUL bytes", "SELECT 1\u{0}; DROP TABLE alerts".into());
    add("empty", "   ".into());
    add("only a comment", "-- nothing".into());
    add("unterminated string", "SELECT 'abc".into());
    out
}

#[test]
fn hostile_sql_is_refused_and_the_service_stays_up() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let t = start(dir.path())?;

    // A registered query whose SQL the catalog keeps: other analysts' SQL is a secret too.
    let (status, body) = t.post(
        "/v1/queries",
        &json!({"name": "private", "sql": format!(
            "CREATE EXTERNAL TABLE private_out (segment_id VARCHAR NOT NULL, \
             window_start TIMESTAMP NOT NULL, n BIGINT NOT NULL) STORED AS KAFKA \
             OPTIONS ('topic' 'test.private', 'format' 'json'); \
             INSERT INTO private_out SELECT segment_id, window_start, count(*) AS n \
             FROM camera_events WHERE camera_id <> '{MARKER}' \
             GROUP BY tumble(event_time, INTERVAL '1 minute'), segment_id")}),
    )?;
    assert_eq!(status, 201, "{body}");
    wait_until("the catalog is written", || {
        std::fs::read_to_string(&t.catalog).is_ok_and(|c| c.contains(MARKER))
    })?;

    let attacks = attacks(&t);
    assert!(attacks.len() >= 50, "{} attacks", attacks.len());
    for (name, sql) in &attacks {
        let started = Instant::now();
        let (status, answer) = t
            .post("/v1/queries/validate", &json!({ "sql": sql }))
            .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        t.assert_refused(name, status, &answer);
        println!("{name}: {status} {}", cut(&answer));
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{name}: took {:?}",
            started.elapsed()
        );
    }
    // The same through create: nothing registered, nothing run.
    for (name, sql) in attacks.iter().take(12) {
        let (status, answer) = t.post("/v1/queries", &json!({ "name": "evil", "sql": sql }))?;
        t.assert_refused(&format!("create: {name}"), status, &answer);
    }

    // Bodies: malformed UTF-8, not JSON, 10 MB, a memory limit beyond the server's maximum.
    let mut bad_utf8 = br#"{"sql": "SELECT 1 "#.to_vec();
    bad_utf8.extend([0xff, 0xfe, 0xc3, 0x28]);
    bad_utf8.extend(br#""}"#);
    let (status, answer) = t.post_raw("/v1/queries/validate", bad_utf8)?;
    t.assert_refused("malformed UTF-8", status, &answer);
    let (status, answer) = t.post_raw("/v1/queries/validate", b"SELECT 1".to_vec())?;
    t.assert_refused("not JSON", status, &answer);
    let huge = serde_json::to_vec(&json!({"sql": format!("SELECT '{}'", "x".repeat(10 << 20))}))?;
    // The service answers 413 as soon as the body passes api.max_body and closes the
    // connection, which the client may see as a reset while it is still sending.
    match t.post_raw("/v1/queries/validate", huge) {
        Ok((status, answer)) => t.assert_refused("10 MB body", status, &answer),
        Err(e) => assert!(t.live(), "10 MB body: {e}; /livez did not answer"),
    }
    let (status, answer) = t.post(
        "/v1/queries",
        &json!({"name": "greedy", "memory_limit": 9_223_372_036_854_775_807_u64,
                "sql": "INSERT INTO alerts SELECT * FROM alerts"}),
    )?;
    t.assert_refused("memory limit above the maximum", status, &answer);
    assert!(answer.contains("max_memory_limit"), "{answer}");

    // A flood: 64 deep and 64 file-reading requests at once, from 8 connections each.
    let deep = format!("SELECT {}", vec!["1"; 20_000].join("+"));
    let file = format!(
        "CREATE EXTERNAL TABLE p (line VARCHAR) STORED AS CSV LOCATION '{}'",
        t.secret
    );
    let answers: Vec<(u16, String)> = t.api.rt.block_on(async {
        let requests = (0..128).map(|i| {
            let sql = if i % 2 == 0 { &deep } else { &file };
            let request = t
                .api
                .client
                .post(format!("{}/v1/queries/validate", t.base))
                .header("authorization", format!("Bearer {TOKEN}"))
                .json(&json!({ "sql": sql }));
            async move {
                let r = request.send().await?;
                let status = r.status().as_u16();
                anyhow::Ok((status, r.text().await?))
            }
        });
        futures_all(requests).await
    })?;
    for (i, (status, answer)) in answers.iter().enumerate() {
        t.assert_refused(&format!("flood request {i}"), *status, answer);
    }

    // Nothing was written by COPY, and the registered query still runs.
    assert!(!std::path::Path::new("/tmp/urbanstream-copy.csv").exists());
    let status: Value = t.api.rt.block_on(async {
        t.api
            .client
            .get(format!("{}/v1/queries/private", t.base))
            .header("authorization", format!("BEARER {TOKEN}"))
            .send()
            .await?
            .json()
            .await
    })?;
    assert_eq!(status["state"], "RUNNING", "{status}");
    Ok(())
}

/// Runs the futures concurrently and collects their results in order.
async fn futures_all<F, T>(futures: impl Iterator<Item = F>) -> anyhow::Result<Vec<T>>
where
    F: std::future::Future<Output = anyhow::Result<T>>,
{
    let results = futures::future::join_all(futures).await;
    results.into_iter().collect()
}
