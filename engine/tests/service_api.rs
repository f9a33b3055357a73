//! The service through its real router (axum, every middleware included) with queries running
//! against the embedded broker: the API's contract, a restart that keeps registered queries,
//! and a query over its memory limit that fails while another keeps producing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use tower::ServiceExt;
use urbanstream::broker::EmbeddedBroker;
use urbanstream::service::config::ServiceConfig;
use urbanstream::service::{Service, api};

const TOKEN: &str = "test-token-1234";
/// The token that may only read.
const READ_TOKEN: &str = "test-read-token-5678";

/// A window query of vehicles per segment and minute into its own topic.
fn per_minute(name: &str) -> String {
    format!(
        "CREATE EXTERNAL TABLE {name}_out (segment_id VARCHAR NOT NULL, \
            window_start TIMESTAMP NOT NULL, window_end TIMESTAMP NOT NULL, n BIGINT NOT NULL) \
         STORED AS KAFKA OPTIONS ('topic' 'test.{name}', 'format' 'json', 'key' 'segment_id');
         INSERT INTO {name}_out SELECT segment_id, window_start, window_end, count(*) AS n \
         FROM camera_events GROUP BY tumble(event_time, INTERVAL '1 minute'), segment_id"
    )
}

/// A service on `brokers` with its catalog in `dir`, without the built-in queries. The
/// embedded broker hands a stopped member's partitions to the group's next member only once
/// the stopped member's session has timed out, so the restart test shortens the session from
/// Kafka's 45 s.
async fn service(brokers: &str, dir: &std::path::Path) -> anyhow::Result<Arc<Service>> {
    service_with_cap(brokers, dir, 2_000_000).await
}

/// [`service`] with `queries.max_state_groups` at `cap`.
async fn service_with_cap(
    brokers: &str,
    dir: &std::path::Path,
    cap: usize,
) -> anyhow::Result<Arc<Service>> {
    service_with(brokers, dir, cap, "").await
}

/// [`service_with_cap`] with `extra` TOML sections.
async fn service_with(
    brokers: &str,
    dir: &std::path::Path,
    cap: usize,
    extra: &str,
) -> anyhow::Result<Arc<Service>> {
    let file = dir.join("urbanstream.toml");
    std::fs::write(
        &file,
        format!(
            "[kafka]\nbrokers = \"{brokers}\"\ngroup_id = \"svc-test\"\n\
             [kafka.properties]\n\"session.timeout.ms\" = \"6000\"\n\
             [api]\ntoken = \"{TOKEN}\"\nread_token = \"{READ_TOKEN}\"\nmax_body = \"4KiB\"\n\
             [catalog]\npath = \"{}\"\n[queries]\ndefaults = false\nmax_queries = 3\n\
             max_state_groups = {cap}\n\
             [pipeline]\nlinger = \"5ms\"\n\
             [checkpoint]\ndir = \"{}\"\ninterval = \"2s\"\n{extra}",
            dir.join("data/catalog.json").display(),
            dir.join("data/checkpoints").display()
        ),
    )?;
    Ok(Service::start(ServiceConfig::load(Some(&file))?).await?)
}

/// Sends one request through the router; the status and the JSON body (null if none).
async fn call(
    app: &axum::Router,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> anyhow::Result<(StatusCode, Value)> {
    let mut request = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let body = match body {
        Some(v) => {
            request = request.header(header::CONTENT_TYPE, "application/json");
            Body::from(serde_json::to_vec(&v)?)
        }
        None => Body::empty(),
    };
    let response = app.clone().oneshot(request.body(body)?).await?;
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    Ok((status, value))
}

/// Sends one request with a text body (`content_type`) through the router; the status and the
/// body as text.
async fn call_text(
    app: &axum::Router,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<(&str, String)>,
) -> anyhow::Result<(StatusCode, String)> {
    let mut request = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let body = match body {
        Some((content_type, text)) => {
            request = request.header(header::CONTENT_TYPE, content_type);
            Body::from(text)
        }
        None => Body::empty(),
    };
    let response = app.clone().oneshot(request.body(body)?).await?;
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

/// Asks for `name`'s status until `done` holds for it, or fails after `limit`.
async fn wait_for(
    app: &axum::Router,
    name: &str,
    limit: Duration,
    done: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let start = Instant::now();
    loop {
        let (status, q) = call(
            app,
            "GET",
            &format!("/v1/queries/{name}"),
            Some(TOKEN),
            None,
        )
        .await?;
        anyhow::ensure!(status == StatusCode::OK, "{name}: {status} {q}");
        if done(&q) {
            return Ok(q);
        }
        anyhow::ensure!(start.elapsed() < limit, "{name} never got there: {q}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Registers a query through the API; it must be accepted (201).
async fn create(app: &axum::Router, name: &str, sql: &str) -> anyhow::Result<Value> {
    let (status, body) = call(
        app,
        "POST",
        "/v1/queries",
        Some(TOKEN),
        Some(json!({"name": name, "sql": sql})),
    )
    .await?;
    anyhow::ensure!(status == StatusCode::CREATED, "{name}: {status} {body}");
    Ok(body)
}

/// A broker, a service on it and its router, with the query `counts` ([`per_minute`])
/// registered; the directory holds the catalog and lives as long as the caller keeps it.
async fn counting_service() -> anyhow::Result<(
    EmbeddedBroker,
    String,
    tempfile::TempDir,
    Arc<Service>,
    axum::Router,
)> {
    let broker = broker()?;
    let brokers = broker.bootstrap_servers();
    let dir = tempfile::tempdir()?;
    let service = service(&brokers, dir.path()).await?;
    let app = api::router(service.clone());
    create(&app, "counts", &per_minute("counts")).await?;
    Ok((broker, brokers, dir, service, app))
}

/// [`counting_service`] once its query has read 300 events from `t0` (returned last).
async fn counting_service_read_300() -> anyhow::Result<(
    EmbeddedBroker,
    String,
    tempfile::TempDir,
    Arc<Service>,
    axum::Router,
    i64,
)> {
    let (broker, brokers, dir, service, app) = counting_service().await?;
    let t0 = 1_767_222_000_000;
    produce_events(&brokers, t0, 300, 10).await?;
    wait_for(&app, "counts", Duration::from_secs(30), |q| {
        q["rows_in"] == 300
    })
    .await?;
    Ok((broker, brokers, dir, service, app, t0))
}

fn is(state: &'static str) -> impl Fn(&Value) -> bool {
    move |q| q["state"] == state
}

/// Produces `n` camera detections from `cameras` distinct cameras on 4 segments, one second
/// apart in event time from `t0`.
async fn produce_events(brokers: &str, t0: i64, n: usize, cameras: usize) -> anyhow::Result<()> {
    produce_events_to(brokers, t0, n, cameras, None).await
}

/// [`produce_events`], event `i` to partition `i % spread` when `spread` is given (else by
/// the segment key).
async fn produce_events_to(
    brokers: &str,
    t0: i64,
    n: usize,
    cameras: usize,
    spread: Option<i32>,
) -> anyhow::Result<()> {
    produce_events_into(brokers, "city.camera.events", t0, n, cameras, spread).await
}

/// [`produce_events_to`] into `topic`.
async fn produce_events_into(
    brokers: &str,
    topic: &str,
    t0: i64,
    n: usize,
    cameras: usize,
    spread: Option<i32>,
) -> anyhow::Result<()> {
    // Idempotent, so that the fault tests' retried produce requests never write an event twice.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("enable.idempotence", "true")
        .create()?;
    let mut sends = Vec::with_capacity(n);
    for i in 0..n {
        let segment = format!("seg-{}", i % 4);
        let value = json!({
            "camera_id": format!("cam-{}", i % cameras), "segment_id": segment,
            "event_time": t0 + i as i64 * 1000, "kind": "detection",
            "vehicle_class": "motorbike", "speed_kmh": 30.0, "confidence": 0.9
        })
        .to_string();
        let mut record = FutureRecord::to(topic).key(&segment).payload(&value);
        if let Some(spread) = spread {
            record = record.partition(i as i32 % spread);
        }
        sends.push(producer.send_result(record).map_err(|(e, _)| e)?);
    }
    for send in sends {
        send.await?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

fn broker() -> anyhow::Result<EmbeddedBroker> {
    let broker = EmbeddedBroker::start()?;
    for topic in urbanstream::pipeline::Topics::default().all() {
        broker.create_topic(&topic, 2)?;
    }
    for topic in [
        "test.counts",
        "test.hog",
        "test.kept",
        "test.intervals",
        "test.previewed",
    ] {
        broker.create_topic(topic, 1)?;
    }
    Ok(broker)
}

/// A query whose output its format cannot carry (an Avro field name Avro refuses, a type Avro
/// output does not carry, a Protobuf message there is no descriptor of) is refused by
/// validation and creation with the reason, and not registered: each was said valid, created,
/// and failed once started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_their_format_cannot_carry_are_refused_before_registration() -> anyhow::Result<()> {
    let broker = broker()?;
    let dir = tempfile::tempdir()?;
    let service = service(&broker.bootstrap_servers(), dir.path()).await?;
    let app = api::router(service.clone());
    let sink = |columns: &str, options: &str, select: &str| {
        format!(
            "CREATE EXTERNAL TABLE o ({columns}) STORED AS KAFKA OPTIONS ('topic' 'test.o', \
             {options}); INSERT INTO o SELECT {select} FROM camera_events"
        )
    };
    for (sql, why) in [
        (
            sink(
                "\"a b\" VARCHAR",
                "'format' 'avro'",
                "segment_id AS \"a b\"",
            ),
            "stream o cannot be written as Avro",
        ),
        (
            sink("d DATE", "'format' 'avro'", "CAST(event_time AS DATE) AS d"),
            "which Avro output does not carry yet",
        ),
        (
            sink(
                "segment_id VARCHAR",
                "'format' 'protobuf', 'protobuf_message' 'no.such.Message'",
                "segment_id",
            ),
            "no such Protobuf message",
        ),
    ] {
        for (path, body) in [
            ("/v1/queries/validate", json!({"sql": sql})),
            ("/v1/queries", json!({"name": "unwritable", "sql": sql})),
        ] {
            let (status, answer) = call(&app, "POST", path, Some(TOKEN), Some(body)).await?;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {sql}: {answer}");
            assert!(
                answer["message"].as_str().is_some_and(|m| m.contains(why)),
                "{path} {sql}: {answer}"
            );
        }
    }
    let (status, _) = call(&app, "GET", "/v1/queries/unwritable", Some(TOKEN), None).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // A sink its format carries is still valid.
    let (status, answer) = call(
        &app,
        "POST",
        "/v1/queries/validate",
        Some(TOKEN),
        Some(json!({"sql": sink("segment_id VARCHAR", "'format' 'avro'", "segment_id")})),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{answer}");
    service.shutdown().await;
    Ok(())
}

/// The read token reads (GET, and HEAD as GET without the body), validates and explains;
/// every change is refused with the reason, and nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_token_reads_and_changes_nothing() -> anyhow::Result<()> {
    let broker = broker()?;
    let dir = tempfile::tempdir()?;
    let service = service(&broker.bootstrap_servers(), dir.path()).await?;
    let app = api::router(service.clone());
    create(&app, "counts", &per_minute("counts")).await?;
    for (method, path, body) in [
        ("GET", "/v1/queries", None),
        ("HEAD", "/v1/queries", None),
        ("GET", "/v1/queries/counts", None),
        ("HEAD", "/v1/queries/counts", None),
        ("GET", "/v1/tables", None),
        ("GET", "/v1/info", None),
        (
            "POST",
            "/v1/queries/validate",
            Some(json!({"sql": per_minute("other")})),
        ),
    ] {
        let (status, answer) = call(&app, method, path, Some(READ_TOKEN), body).await?;
        assert_eq!(status, StatusCode::OK, "{method} {path}: {answer}");
        if method == "HEAD" {
            assert_eq!(answer, Value::Null, "{method} {path}");
        }
    }
    for (method, path, body) in [
        (
            "POST",
            "/v1/queries",
            Some(json!({"name": "mine", "sql": per_minute("mine")})),
        ),
        ("POST", "/v1/queries/counts/pause", None),
        ("DELETE", "/v1/queries/counts", None),
    ] {
        let (status, answer) = call(&app, method, path, Some(READ_TOKEN), body).await?;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {answer}");
        assert!(
            answer["message"]
                .as_str()
                .is_some_and(|m| m.contains("changes need api.token")),
            "{answer}"
        );
    }
    let (_, list) = call(&app, "GET", "/v1/queries", Some(TOKEN), None).await?;
    let names: Vec<&str> = list
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|q| q["name"].as_str())
        .collect();
    assert_eq!(names, ["counts"], "{list}");
    let (_, counts) = call(&app, "GET", "/v1/queries/counts", Some(TOKEN), None).await?;
    assert_ne!(counts["state"], "PAUSED", "{counts}");
    service.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_contract() -> anyhow::Result<()> {
    let broker = broker()?;
    let dir = tempfile::tempdir()?;
    let service = service(&broker.bootstrap_servers(), dir.path()).await?;
    let app = api::router(service.clone());

    // Only /livez is open without the token.
    let (status, _) = call(&app, "GET", "/livez", None, None).await?;
    assert_eq!(status, StatusCode::OK);
    for path in ["/v1/queries", "/v1/info", "/readyz", "/metrics"] {
        let (status, body) = call(&app, "GET", path, None, None).await?;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|m| m.contains("token")),
            "{body}"
        );
        let (status, _) = call(&app, "GET", path, Some("wrong"), None).await?;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
    }

    // Invalid SQL: 400 with the position the parser gave, from validate and from create.
    let bad = "INSERT INTO alerts SELEC * FROM camera_events";
    let (status, body) = call(
        &app,
        "POST",
        "/v1/queries/validate",
        Some(TOKEN),
        Some(json!({"sql": bad})),
    )
    .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["position"], json!({"line": 1, "column": 20}), "{body}");
    let (status, body) = call(
        &app,
        "POST",
        "/v1/queries",
        Some(TOKEN),
        Some(json!({"name": "bad", "sql": bad})),
    )
    .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    // Planning errors name the problem.
    let (status, body) = call(
        &app,
        "POST",
        "/v1/queries/validate",
        Some(TOKEN),
        Some(json!({"sql": "INSERT INTO alerts SELECT nope FROM camera_events"})),
    )
    .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| m.contains("nope")),
        "{body}"
    );
    // Valid SQL: what it reads and writes.
    let (status, body) = call(
        &app,
        "POST",
        "/v1/queries/validate",
        Some(TOKEN),
        Some(json!({"sql": per_minute("counts")})),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["queries"][0]["sink_topic"], "test.counts", "{body}");
    assert_eq!(body["queries"][0]["windowed"], true, "{body}");
    assert_eq!(body["queries"][0]["also_reads"], json!([]), "{body}");
    // A join of two topics names both.
    let join = "CREATE EXTERNAL TABLE pairs_out (segment_id VARCHAR NOT NULL, n BIGINT) \
         STORED AS KAFKA OPTIONS ('topic' 'test.pairs', 'format' 'json'); \
         INSERT INTO pairs_out SELECT c.segment_id, d.volume_car AS n FROM camera_events c \
         JOIN detector_readings d ON c.segment_id = d.segment_id \
         AND d.event_time BETWEEN c.event_time - INTERVAL '1 minute' AND c.event_time";
    let (status, body) = call(
        &app,
        "POST",
        "/v1/queries/validate",
        Some(TOKEN),
        Some(json!({ "sql": join })),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["queries"][0]["source"], "camera_events", "{body}");
    assert_eq!(
        body["queries"][0]["also_reads"],
        json!([["detector_readings", "city.traffic.detectors"]]),
        "{body}"
    );

    // Create, duplicate, list, get.
    let body = create(&app, "counts", &per_minute("counts")).await?;
    assert_eq!(body["name"], "counts");
    let (status, body) = call(
        &app,
        "POST",
        "/v1/queries",
        Some(TOKEN),
        Some(json!({"name": "counts", "sql": per_minute("counts")})),
    )
    .await?;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("exists")),
        "{body}"
    );
    // A built-in query's name is taken even while the built-in queries are off (once they
    // were on again, both ran under one name, one of them out of the API's reach).
    let (status, body) = call(
        &app,
        "POST",
        "/v1/queries",
        Some(TOKEN),
        Some(json!({"name": "water_level_gauge", "sql": per_minute("gauge")})),
    )
    .await?;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("the name of a built-in query")),
        "{body}"
    );
    wait_for(&app, "counts", Duration::from_secs(20), is("RUNNING")).await?;
    let (status, body) = call(&app, "GET", "/v1/queries", Some(TOKEN), None).await?;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<&str> = body
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|q| q["name"].as_str())
        .collect();
    assert_eq!(names, vec!["counts"]);
    let (status, body) = call(&app, "GET", "/v1/queries/nope", Some(TOKEN), None).await?;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(body["message"].is_string());

    // Data flows: rows in, rows out, watermark.
    let t0 = 1_767_222_000_000;
    produce_events(&broker.bootstrap_servers(), t0, 400, 10).await?;
    let q = wait_for(&app, "counts", Duration::from_secs(30), |q| {
        q["rows_in"] == 400 && q["rows_out"].as_u64().unwrap_or(0) >= 4 * 5
    })
    .await?;
    assert_eq!(
        q["watermark_ms"].as_i64(),
        Some(t0 + 399_000 - 5_000),
        "{q}"
    );
    assert_eq!(q["dlq"], 0);

    // Pause, resume (only from PAUSED), restart.
    wait_for(&app, "counts", Duration::from_secs(10), |q| {
        q["assigned_partitions"].as_u64() > Some(0)
    })
    .await?;
    let (status, body) = call(&app, "POST", "/v1/queries/counts/pause", Some(TOKEN), None).await?;
    assert_eq!(
        (status, &body["state"]),
        (StatusCode::OK, &json!("PAUSED")),
        "{body}"
    );
    // Paused, it holds no partition (it showed those it held when it stopped).
    let (_, paused) = call(&app, "GET", "/v1/queries/counts", Some(TOKEN), None).await?;
    assert_eq!(paused["assigned_partitions"], 0, "{paused}");
    // Its lag is not measured while paused (its last figure stayed while input piled up).
    assert_eq!(paused["consumer_lag"], Value::Null, "{paused}");
    let (status, body) = call(&app, "POST", "/v1/queries/counts/resume", Some(TOKEN), None).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_for(&app, "counts", Duration::from_secs(20), is("RUNNING")).await?;
    let (status, body) = call(&app, "POST", "/v1/queries/counts/resume", Some(TOKEN), None).await?;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, body) = call(
        &app,
        "POST",
        "/v1/queries/counts/restart",
        Some(TOKEN),
        None,
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let q = wait_for(&app, "counts", Duration::from_secs(20), is("RUNNING")).await?;
    assert!(q["restarts"].as_u64().unwrap_or(0) >= 2, "{q}");

    // Readiness, metrics, info (without the token's value).
    let start = Instant::now();
    loop {
        let (status, body) = call(&app, "GET", "/readyz", Some(TOKEN), None).await?;
        if status == StatusCode::OK {
            assert_eq!(body["kafka_reachable"], true);
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "never ready: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, body) = call(&app, "GET", "/metrics", Some(TOKEN), None).await?;
    assert_eq!(status, StatusCode::OK);
    let text = body.as_str().unwrap_or_default();
    for series in [
        "urbanstream_events_in_total{query=\"counts\"}",
        "urbanstream_rows_out_total{query=\"counts\"}",
        "urbanstream_watermark_lag_seconds{query=\"counts\"}",
        "urbanstream_emit_latency_seconds_bucket{query=\"counts\",le=\"0.05\"}",
        "urbanstream_checkpoint_bytes{query=\"counts\"}",
        "urbanstream_checkpoint_age_seconds{query=\"counts\"}",
        "urbanstream_queries{state=\"RUNNING\"} 1",
        "urbanstream_kafka_reachable 1",
    ] {
        assert!(text.contains(series), "{series} missing from\n{text}");
    }
    let (status, body) = call(&app, "GET", "/v1/info", Some(TOKEN), None).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["brokers"], broker.bootstrap_servers());
    assert!(!body.to_string().contains(TOKEN), "{body}");

    // Bodies: too large, not JSON, unknown fields; unknown paths and methods.
    let huge = "x".repeat(8 * 1024);
    let (status, body) = call(
        &app,
        "POST",
        "/v1/queries",
        Some(TOKEN),
        Some(json!({"name": "huge", "sql": huge})),
    )
    .await?;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(body["message"].is_string());
    let request = Request::post("/v1/queries")
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{not json"))?;
    let response = app.clone().oneshot(request).await?;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let (status, _) = call(
        &app,
        "POST",
        "/v1/queries",
        Some(TOKEN),
        Some(json!({"name": "x", "sql": "SELECT 1", "colour": "red"})),
    )
    .await?;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, body) = call(&app, "GET", "/v2/nothing", Some(TOKEN), None).await?;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = call(&app, "PUT", "/v1/queries", Some(TOKEN), None).await?;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{body}");
    assert!(body["message"].is_string());
    let (status, _) = call(
        &app,
        "POST",
        "/v1/queries",
        Some(TOKEN),
        Some(json!({"name": "no spaces", "sql": per_minute("x")})),
    )
    .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Delete: 204, then 404.
    let (status, _) = call(&app, "DELETE", "/v1/queries/counts", Some(TOKEN), None).await?;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = call(&app, "GET", "/v1/queries/counts", Some(TOKEN), None).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = call(&app, "DELETE", "/v1/queries/counts", Some(TOKEN), None).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    service.shutdown().await;
    Ok(())
}

/// Every built-in query passes the checks a registered one does, and starts: one that reads
/// the topic it writes (report confirmations read the alerts, without their own kind) was
/// refused as a loop at every start, and the service was never ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_built_in_query_starts() -> anyhow::Result<()> {
    let broker = broker()?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("urbanstream.toml");
    std::fs::write(
        &file,
        format!(
            "[kafka]\nbrokers = \"{}\"\ngroup_id = \"svc-builtin\"\n\
             [api]\ntoken = \"{TOKEN}\"\n\
             [catalog]\npath = \"{}\"\n[queries]\ndefaults = true\n\
             [checkpoint]\ndir = \"{}\"\n",
            broker.bootstrap_servers(),
            dir.path().join("data/catalog.json").display(),
            dir.path().join("data/checkpoints").display()
        ),
    )?;
    let service = Service::start(ServiceConfig::load(Some(&file))?).await?;
    let app = api::router(service.clone());
    let (status, list) = call(&app, "GET", "/v1/queries", Some(TOKEN), None).await?;
    assert_eq!(status, StatusCode::OK);
    let queries = list.as_array().cloned().unwrap_or_default();
    assert!(queries.len() >= 20, "{list}");
    let failed: Vec<&Value> = queries.iter().filter(|q| q["state"] == "FAILED").collect();
    assert!(failed.is_empty(), "built-in queries failed: {failed:?}");
    // Restarting it (the way back from FAILED) checks it as a built-in too.
    let (status, body) = call(
        &app,
        "POST",
        "/v1/queries/alerts_reports_confirmed/restart",
        Some(TOKEN),
        None,
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    service.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_query_runs_again_after_a_restart() -> anyhow::Result<()> {
    let broker = broker()?;
    let dir = tempfile::tempdir()?;
    let first = service(&broker.bootstrap_servers(), dir.path()).await?;
    let app = api::router(first.clone());
    for name in ["kept", "held"] {
        create(&app, name, &per_minute(name)).await?;
    }
    wait_for(&app, "kept", Duration::from_secs(20), is("RUNNING")).await?;
    let (status, _) = call(&app, "POST", "/v1/queries/held/pause", Some(TOKEN), None).await?;
    assert_eq!(status, StatusCode::OK);
    first.shutdown().await;
    drop(app);
    drop(first);

    let second = service(&broker.bootstrap_servers(), dir.path()).await?;
    let app = api::router(second.clone());
    wait_for(&app, "kept", Duration::from_secs(20), is("RUNNING")).await?;
    let held = wait_for(&app, "held", Duration::from_secs(5), is("PAUSED")).await?;
    assert_eq!(held["sql"], per_minute("held"));
    // It runs, not only shows: it reads what is produced after the restart.
    produce_events(&broker.bootstrap_servers(), 1_767_222_000_000, 200, 10).await?;
    wait_for(&app, "kept", Duration::from_secs(30), |q| {
        q["rows_in"] == 200 && q["rows_out"].as_u64().unwrap_or(0) > 0
    })
    .await?;
    second.shutdown().await;
    Ok(())
}

/// Two partitions' checkpoint stores swapped by hand: each holds the other partition's state,
/// which was restored as the partition's own and published windows as two partial rows. The
/// query is refused instead, naming the moved directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_store_holding_another_partitions_state_is_refused() -> anyhow::Result<()> {
    let broker = broker()?;
    let dir = tempfile::tempdir()?;
    let first = service(&broker.bootstrap_servers(), dir.path()).await?;
    let app = api::router(first.clone());
    create(&app, "counts", &per_minute("counts")).await?;
    wait_for(&app, "counts", Duration::from_secs(20), is("RUNNING")).await?;
    produce_events(&broker.bootstrap_servers(), 1_767_222_000_000, 400, 10).await?;
    wait_for(&app, "counts", Duration::from_secs(30), |q| {
        q["rows_in"] == 400
    })
    .await?;
    let stores = dir.path().join("data/checkpoints/counts");
    let store = |p: i32| stores.join(format!("city.camera.events.{p}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(0..2).all(|p| {
        std::fs::read_dir(store(p)).is_ok_and(|mut d| {
            d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("chk-")))
        })
    }) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "no checkpoint of both partitions"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    first.shutdown().await;
    drop(app);
    drop(first);
    std::fs::rename(store(0), stores.join("moving"))?;
    std::fs::rename(store(1), store(0))?;
    std::fs::rename(stores.join("moving"), store(1))?;

    let second = service(&broker.bootstrap_servers(), dir.path()).await?;
    let app = api::router(second.clone());
    let failed = wait_for(&app, "counts", Duration::from_secs(30), is("FAILED")).await?;
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("a checkpoint directory was moved"),
        "{failed}"
    );
    second.shutdown().await;
    Ok(())
}

/// Two services given one checkpoint storage, each with its own `kafka.group_id`: the
/// second's query of the same name is refused the first's checkpoints (it restored them and
/// wrote its epochs into the same stores), and dropping it there leaves them in place (it
/// removed them). The first goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_services_on_one_checkpoint_storage_keep_to_their_own() -> anyhow::Result<()> {
    let broker = broker()?;
    let brokers = broker.bootstrap_servers();
    let dir = tempfile::tempdir()?;
    let first = service(&brokers, dir.path()).await?;
    let app = api::router(first.clone());
    create(&app, "counts", &per_minute("counts")).await?;
    wait_for(&app, "counts", Duration::from_secs(20), is("RUNNING")).await?;
    let owner = dir.path().join("data/checkpoints/counts/owner.json");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !owner.exists() {
        anyhow::ensure!(Instant::now() < deadline, "no owner of the checkpoints");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let other = tempfile::tempdir()?;
    let file = other.path().join("urbanstream.toml");
    std::fs::write(
        &file,
        format!(
            "[kafka]\nbrokers = \"{brokers}\"\ngroup_id = \"another\"\n\
             [api]\ntoken = \"{TOKEN}\"\n\
             [catalog]\npath = \"{}\"\n[queries]\ndefaults = false\n\
             [checkpoint]\ndir = \"{}\"\ninterval = \"2s\"\n",
            other.path().join("catalog.json").display(),
            dir.path().join("data/checkpoints").display()
        ),
    )?;
    let second = Service::start(ServiceConfig::load(Some(&file))?).await?;
    let second_app = api::router(second.clone());
    create(&second_app, "counts", &per_minute("counts")).await?;
    let failed = wait_for(&second_app, "counts", Duration::from_secs(30), is("FAILED")).await?;
    let error = failed["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("holds the checkpoints of consumer group svc-test.counts")
            && error.contains("this query reads in group another.counts"),
        "{failed}"
    );
    let (status, body) = call(
        &second_app,
        "POST",
        "/v1/queries/counts/reset",
        Some(TOKEN),
        None,
    )
    .await?;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, body) = call(
        &second_app,
        "DELETE",
        "/v1/queries/counts",
        Some(TOKEN),
        None,
    )
    .await?;
    assert!(status.is_success(), "{status} {body}");
    assert!(
        owner.exists(),
        "the first service's checkpoints were removed"
    );
    second.shutdown().await;
    let q = wait_for(&app, "counts", Duration::from_secs(10), is("RUNNING")).await?;
    assert!(q["error"].is_null(), "{q}");
    first.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_over_its_memory_limit_fails_and_another_keeps_producing() -> anyhow::Result<()> {
    let broker = broker()?;
    let dir = tempfile::tempdir()?;
    let service = service(&broker.bootstrap_servers(), dir.path()).await?;
    let app = api::router(service.clone());
    // One state group per camera and hour: 5 000 cameras do not fit 64 KiB.
    let hog = "CREATE EXTERNAL TABLE hog_out (camera_id VARCHAR NOT NULL, \
            window_start TIMESTAMP NOT NULL, window_end TIMESTAMP NOT NULL, n BIGINT NOT NULL) \
         STORED AS KAFKA OPTIONS ('topic' 'test.hog', 'format' 'json', 'key' 'camera_id');
         INSERT INTO hog_out SELECT camera_id, window_start, window_end, count(*) AS n \
         FROM camera_events GROUP BY tumble(event_time, INTERVAL '1 hour'), camera_id";
    for body in [
        json!({"name": "hog", "sql": hog, "memory_limit": 64 * 1024}),
        json!({"name": "counts", "sql": per_minute("counts")}),
    ] {
        let (status, answer) = call(&app, "POST", "/v1/queries", Some(TOKEN), Some(body)).await?;
        assert_eq!(status, StatusCode::CREATED, "{answer}");
    }
    wait_for(&app, "counts", Duration::from_secs(20), is("RUNNING")).await?;
    wait_for(&app, "hog", Duration::from_secs(20), is("RUNNING")).await?;
    let t0 = 1_767_222_000_000;
    produce_events(&broker.bootstrap_servers(), t0, 6_000, 5_000).await?;
    let hog = wait_for(&app, "hog", Duration::from_secs(60), is("FAILED")).await?;
    let error = hog["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("resource limit") && error.contains("memory limit of 65536 bytes"),
        "{hog}"
    );
    // Rows in are counted when a batch is taken, rows out once its outputs are acknowledged:
    // wait for both.
    let counts = wait_for(&app, "counts", Duration::from_secs(60), |q| {
        q["rows_in"] == 6_000 && q["rows_out"].as_u64().unwrap_or(0) > 0
    })
    .await?;
    assert_eq!(counts["state"], "RUNNING", "{counts}");
    let before = counts["rows_out"].as_u64().unwrap_or(0);
    assert!(before > 0, "{counts}");
    // After the failure, the other query goes on publishing new windows.
    produce_events(&broker.bootstrap_servers(), t0 + 6_000_000, 600, 10).await?;
    wait_for(&app, "counts", Duration::from_secs(60), |q| {
        q["rows_out"].as_u64().unwrap_or(0) > before && q["state"] == "RUNNING"
    })
    .await?;
    assert_eq!(
        call(&app, "GET", "/v1/queries/hog", Some(TOKEN), None)
            .await?
            .1["state"],
        "FAILED"
    );
    // The query limit (3) counts every query, the failed one included.
    for (name, expected) in [
        ("third", StatusCode::CREATED),
        ("fourth", StatusCode::CONFLICT),
    ] {
        let (status, body) = call(
            &app,
            "POST",
            "/v1/queries",
            Some(TOKEN),
            Some(json!({"name": name, "sql": per_minute(name)})),
        )
        .await?;
        assert_eq!(status, expected, "{body}");
    }
    service.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_is_ridden_out_without_losing_a_window() -> anyhow::Result<()> {
    let (broker, brokers, _dir, service, app, t0) = counting_service_read_300().await?;
    let ready = |app: axum::Router| async move {
        call(&app, "GET", "/readyz", Some(TOKEN), None)
            .await
            .map(|(status, _)| status == StatusCode::OK)
    };
    let start = Instant::now();
    while !ready(app.clone()).await? {
        anyhow::ensure!(start.elapsed() < Duration::from_secs(20), "never ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The broker goes away for 30 s; the next 300 events are produced meanwhile (the
    // producer holds them until it is back).
    broker.set_down(true)?;
    let producing = tokio::spawn({
        let brokers = brokers.clone();
        async move { produce_events(&brokers, t0 + 300_000, 300, 10).await }
    });
    let down = Instant::now();
    let mut saw_not_ready = false;
    while down.elapsed() < Duration::from_secs(30) {
        saw_not_ready |= !ready(app.clone()).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(saw_not_ready, "/readyz stayed ready with the broker down");
    broker.set_down(false)?;
    producing.await??;

    // It recovers by itself: ready again, and every window of the 600 events is published
    // with its full count (the watermark reaches t0 + 594 s: minutes 0 to 8 close).
    let q = wait_for(&app, "counts", Duration::from_secs(90), |q| {
        q["state"] == "RUNNING" && q["watermark_ms"].as_i64() == Some(t0 + 594_000)
    })
    .await?;
    // The pipeline failed on the outage and its supervisor started it again (with backoff).
    assert!(q["restarts"].as_u64().unwrap_or(0) >= 1, "{q}");
    let start = Instant::now();
    while !ready(app.clone()).await? {
        anyhow::ensure!(start.elapsed() < Duration::from_secs(30), "not ready again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_whole_windows(&brokers, "test.counts", t0, 9).await?;
    service.shutdown().await;
    Ok(())
}

/// A broker that stops answering (its process stopped, connections open) for longer than the
/// group's session timeout: the query's member loses its partitions, and the query goes on
/// once the broker answers again. Its pipeline stopped on the loss, and closing its consumer
/// waited for good (the group waited for the lost partitions to be given up, and the pipeline
/// had taken that change from the queue without answering it), so the query read nothing
/// more, still said RUNNING, and a restart did not return.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_stops_answering_longer_than_a_session_is_ridden_out() -> anyhow::Result<()> {
    let (broker, brokers, _dir, service, app, t0) = counting_service_read_300().await?;
    // Every answer takes 25 s, for 25 s: past the 10 s session timeout.
    broker.set_round_trip_time(Duration::from_secs(25))?;
    tokio::time::sleep(Duration::from_secs(25)).await;
    broker.set_round_trip_time(Duration::ZERO)?;
    produce_events(&brokers, t0 + 300_000, 300, 10).await?;
    // Every window of the 600 events is published with its full count (the watermark
    // reaches t0 + 594 s: minutes 0 to 8 close).
    let q = wait_for(&app, "counts", Duration::from_secs(120), |q| {
        q["state"] == "RUNNING"
            && q["watermark_ms"].as_i64() == Some(t0 + 594_000)
            && q["assigned_partitions"] == 2
    })
    .await?;
    // It stopped on the lost partitions and its supervisor started it again.
    assert!(q["restarts"].as_u64().unwrap_or(0) >= 1, "{q}");
    assert_whole_windows(&brokers, "test.counts", t0, 9).await?;
    service.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_explosion_hits_the_state_cap_with_a_clear_failure() -> anyhow::Result<()> {
    let broker = broker()?;
    let dir = tempfile::tempdir()?;
    let service = service_with_cap(&broker.bootstrap_servers(), dir.path(), 10_000).await?;
    let app = api::router(service.clone());
    // One group per camera and day; 30 000 distinct cameras (all within 8.3 hours) against a
    // cap of 10 000.
    let per_camera = "CREATE EXTERNAL TABLE per_camera (camera_id VARCHAR NOT NULL, \
            window_start TIMESTAMP NOT NULL, window_end TIMESTAMP NOT NULL, n BIGINT NOT NULL) \
         STORED AS KAFKA OPTIONS ('topic' 'test.hog', 'format' 'json', 'key' 'camera_id');
         INSERT INTO per_camera SELECT camera_id, window_start, window_end, count(*) AS n \
         FROM camera_events GROUP BY tumble(event_time, INTERVAL '1 day'), camera_id";
    create(&app, "per_camera", per_camera).await?;
    produce_events(
        &broker.bootstrap_servers(),
        1_767_222_000_000,
        30_000,
        30_000,
    )
    .await?;
    let q = wait_for(&app, "per_camera", Duration::from_secs(60), is("FAILED")).await?;
    let error = q["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("over the cap of 10000") && error.contains("queries.max_state_groups"),
        "{q}"
    );
    // The service itself goes on: it still answers and lists the query.
    let (status, _) = call(&app, "GET", "/v1/queries", Some(TOKEN), None).await?;
    assert_eq!(status, StatusCode::OK);
    service.shutdown().await;
    Ok(())
}

/// Regression: dropping a query and creating one under the same name resumed the old consumer
/// group's offsets (`rows_in: 0`). A dropped query's group is put back to the start of its
/// input, so the new query reads every event again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_dropped_and_created_again_starts_from_scratch() -> anyhow::Result<()> {
    let (_broker, brokers, _dir, service, app) = counting_service().await?;
    produce_events(&brokers, 1_767_222_000_000, 120, 10).await?;
    wait_for(&app, "counts", Duration::from_secs(30), |q| {
        q["rows_in"] == 120
    })
    .await?;
    // Let the committed offsets catch up with what was read.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, body) = call(&app, "DELETE", "/v1/queries/counts", Some(TOKEN), None).await?;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    create(&app, "counts", &per_minute("counts")).await?;
    let q = wait_for(&app, "counts", Duration::from_secs(30), |q| {
        q["rows_in"] == 120
    })
    .await?;
    assert_eq!(q["state"], "RUNNING", "{q}");
    service.shutdown().await;
    Ok(())
}

/// `reset` removes a query's checkpoints and starts it afresh: it reads every event again
/// from the beginning of its input, whatever its consumer group committed; a paused query
/// stays paused until resumed, then reads afresh too, also when the service stopped in
/// between (the reset is kept in the catalog until the query checkpoints); an unknown query
/// is 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_query_starts_afresh_from_the_beginning_of_its_input() -> anyhow::Result<()> {
    let (_broker, brokers, dir, service, app) = counting_service().await?;
    produce_events(&brokers, 1_767_222_000_000, 120, 10).await?;
    wait_for(&app, "counts", Duration::from_secs(30), |q| {
        q["rows_in"] == 120
    })
    .await?;
    // A checkpoint (every 2 s) holds what was read.
    let checkpoints = dir.path().join("data/checkpoints/counts");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !checkpoints.exists() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no checkpoint was written"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, body) = call(&app, "POST", "/v1/queries/counts/reset", Some(TOKEN), None).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    // The same handle counts on: every event read a second time.
    let q = wait_for(&app, "counts", Duration::from_secs(30), |q| {
        q["rows_in"] == 240
    })
    .await?;
    assert_eq!(q["state"], "RUNNING", "{q}");
    // Paused, reset, resumed: read afresh once more.
    let (status, body) = call(&app, "POST", "/v1/queries/counts/pause", Some(TOKEN), None).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["watermark_ms"].is_i64(), "{body}");
    let (status, body) = call(&app, "POST", "/v1/queries/counts/reset", Some(TOKEN), None).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "PAUSED", "{body}");
    // Its state gone, it shows no watermark or state of the run before.
    assert!(body["watermark_ms"].is_null(), "{body}");
    assert_eq!(body["state_groups"], 0, "{body}");
    let (status, body) = call(&app, "POST", "/v1/queries/counts/resume", Some(TOKEN), None).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_for(&app, "counts", Duration::from_secs(30), |q| {
        q["rows_in"] == 360
    })
    .await?;
    let (status, _) = call(&app, "POST", "/v1/queries/nothing/reset", Some(TOKEN), None).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Reset while paused and the service stopped before it was resumed: the reset is in the
    // catalog, so the query started by the next service reads afresh too.
    let (status, body) = call(&app, "POST", "/v1/queries/counts/pause", Some(TOKEN), None).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = call(&app, "POST", "/v1/queries/counts/reset", Some(TOKEN), None).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    service.shutdown().await;
    drop(app);
    let service = crate::service(&brokers, dir.path()).await?;
    let app = api::router(service.clone());
    let (status, body) = call(&app, "POST", "/v1/queries/counts/resume", Some(TOKEN), None).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let q = wait_for(&app, "counts", Duration::from_secs(30), |q| {
        q["rows_in"] == 120
    })
    .await?;
    assert_eq!(q["state"], "RUNNING", "{q}");
    service.shutdown().await;
    Ok(())
}

/// Vehicles per camera and minute: grouped by camera over a topic keyed by segment, so
/// repartitioned through an internal topic (`<group>.q0.repartition`).
const BY_CAMERA: &str = "CREATE EXTERNAL TABLE by_camera_out (camera_id VARCHAR NOT NULL, \
        window_start TIMESTAMP NOT NULL, n BIGINT NOT NULL) \
     STORED AS KAFKA OPTIONS ('topic' 'test.kept', 'format' 'json', 'key' 'camera_id');
     INSERT INTO by_camera_out SELECT camera_id, window_start, count(*) AS n \
     FROM camera_events GROUP BY tumble(event_time, INTERVAL '1 minute'), camera_id";

/// A broker, a service on it with [`BY_CAMERA`] registered as `by_camera`, its router, a
/// reader of its output, and `t0`: 90 events from `t0` were read, minute 0 closed (6 events of
/// each of 10 cameras) and 30 of minute 1 are held. Events go to both input partitions, so
/// that neither holds the watermark back for its idle timeout.
async fn by_camera_service() -> anyhow::Result<(
    EmbeddedBroker,
    String,
    tempfile::TempDir,
    Arc<Service>,
    axum::Router,
    rdkafka::consumer::StreamConsumer,
    i64,
)> {
    let broker = broker()?;
    let brokers = broker.bootstrap_servers();
    let dir = tempfile::tempdir()?;
    let service = service(&brokers, dir.path()).await?;
    let app = api::router(service.clone());
    create(&app, "by_camera", BY_CAMERA).await?;
    let out = reader(&brokers, "reader-by-camera", "test.kept")?;
    let t0 = 1_767_222_000_000;
    produce_events_to(&brokers, t0, 90, 10, Some(2)).await?;
    expect_minutes(&out, &[t0], 6).await?;
    // A checkpoint (every 2 s) holds them.
    tokio::time::sleep(Duration::from_secs(3)).await;
    Ok((broker, brokers, dir, service, app, out, t0))
}

/// The next records of `out` are the 10 cameras' counts of the minutes from `starts`, in any
/// order, each `n`.
async fn expect_minutes(
    out: &rdkafka::consumer::StreamConsumer,
    starts: &[i64],
    n: u64,
) -> anyhow::Result<()> {
    let records = next_records(out, 10 * starts.len()).await?;
    let mut windows: Vec<(&str, i64)> = Vec::new();
    for r in &records {
        let start = r["window_start"].as_i64().unwrap_or_default();
        assert!(starts.contains(&start), "{records:?}");
        assert_eq!(r["n"].as_u64(), Some(n), "{records:?}");
        windows.push((r["camera_id"].as_str().unwrap_or_default(), start));
    }
    windows.sort();
    windows.dedup();
    assert_eq!(windows.len(), records.len(), "{records:?}");
    Ok(())
}

/// Writes to `topic` again, as they are (partition, key, value, headers), its records whose
/// event time is at or after `from`: what a repartitioned query's first stage had passed on
/// and its second stage had not read yet when it stopped.
async fn leave_unread(brokers: &str, topic: &str, from: i64) -> anyhow::Result<usize> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "reader-internal")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut ends = Vec::new();
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut assignment = rdkafka::TopicPartitionList::new();
    for p in metadata.topics().iter().flat_map(|t| t.partitions()) {
        let (_, high) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
        ends.push((p.id(), high));
        assignment.add_partition_offset(topic, p.id(), rdkafka::Offset::Beginning)?;
    }
    consumer.assign(&assignment)?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    let mut copies = Vec::new();
    let mut done: std::collections::HashSet<i32> = ends
        .iter()
        .filter(|(_, high)| *high == 0)
        .map(|(p, _)| *p)
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while done.len() < ends.len() {
        anyhow::ensure!(Instant::now() < deadline, "{topic} not read to its end");
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message?;
        let end = ends.iter().find(|(p, _)| *p == message.partition());
        if end.is_some_and(|(_, high)| message.offset() + 1 >= *high) {
            done.insert(message.partition());
        }
        let Some(payload) = message.payload().filter(|p| !p.is_empty()) else {
            continue;
        };
        let value: Value = serde_json::from_slice(payload)?;
        if value["event_time"].as_i64().is_some_and(|t| t >= from) {
            copies.push((
                message.partition(),
                message.key().map(<[u8]>::to_vec),
                payload.to_vec(),
                message.headers().map(|h| h.detach()),
            ));
        }
    }
    for (partition, key, payload, headers) in &copies {
        let mut record = FutureRecord::<Vec<u8>, Vec<u8>>::to(topic)
            .partition(*partition)
            .payload(payload);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(headers) = headers {
            record = record.headers(headers.clone());
        }
        producer
            .send(record, Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)?;
    }
    Ok(copies.len())
}

/// `POST /v1/queries/{name}/{action}` (pause, resume, reset, …), which must answer 200; its
/// body.
async fn act(app: &axum::Router, name: &str, action: &str) -> anyhow::Result<Value> {
    let (status, body) = call(
        app,
        "POST",
        &format!("/v1/queries/{name}/{action}"),
        Some(TOKEN),
        None,
    )
    .await?;
    anyhow::ensure!(status == StatusCode::OK, "{action} {name}: {status} {body}");
    Ok(body)
}

/// A query repartitioned through an internal topic, dropped and created again, and later
/// reset, counts every event once: the records its predecessor's first stage passed on
/// through the internal topic and its second stage had not read when it stopped are not
/// read by the new one, whose first stage passes every input record on again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repartitioned_query_dropped_or_reset_counts_every_event_once() -> anyhow::Result<()> {
    let (_broker, brokers, _dir, service, app, out, t0) = by_camera_service().await?;
    let internal = "svc-test.by_camera.q0.repartition";

    // Stopped with minute 1's records not read from the internal topic yet; dropped and
    // created again: minute 0 is computed again from the input, once.
    act(&app, "by_camera", "pause").await?;
    assert_eq!(leave_unread(&brokers, internal, t0 + 60_000).await?, 30);
    let (status, body) = call(&app, "DELETE", "/v1/queries/by_camera", Some(TOKEN), None).await?;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    create(&app, "by_camera", BY_CAMERA).await?;
    expect_minutes(&out, &[t0], 6).await?;
    // Minute 1 closes with its events from before the drop and after it, each once.
    produce_events_to(&brokers, t0 + 90_000, 60, 10, Some(2)).await?;
    expect_minutes(&out, &[t0 + 60_000], 6).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The same through a reset of the paused query.
    act(&app, "by_camera", "pause").await?;
    assert_eq!(leave_unread(&brokers, internal, t0 + 120_000).await?, 30);
    let body = act(&app, "by_camera", "reset").await?;
    assert_eq!(body["state"], "PAUSED", "{body}");
    act(&app, "by_camera", "resume").await?;
    expect_minutes(&out, &[t0, t0 + 60_000], 6).await?;
    produce_events_to(&brokers, t0 + 150_000, 60, 10, Some(2)).await?;
    expect_minutes(&out, &[t0 + 120_000], 6).await?;
    service.shutdown().await;
    Ok(())
}

/// `LAG` over windows grouped by another key than the input's (cameras, of segment-keyed
/// events), keyed by the windows' group: the query is repartitioned, and its keys' previous
/// values, held in its internal partitions' state, survive a restart from the checkpoint
/// (lost, the first window after it would have no change: null where 0 is due).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_over_repartitioned_windows_keeps_its_values_across_a_restart() -> anyhow::Result<()> {
    let broker = broker()?;
    let brokers = broker.bootstrap_servers();
    let dir = tempfile::tempdir()?;
    let service = service(&brokers, dir.path()).await?;
    let app = api::router(service.clone());
    create(
        &app,
        "changes",
        "CREATE EXTERNAL TABLE changes_out (camera_id VARCHAR NOT NULL, \
           window_end TIMESTAMP NOT NULL, n BIGINT NOT NULL, change BIGINT) \
         STORED AS KAFKA OPTIONS ('topic' 'test.kept', 'format' 'json', 'key' 'camera_id'); \
         INSERT INTO changes_out SELECT camera_id, window_end, n, \
           n - lag(n) OVER (PARTITION BY camera_id ORDER BY window_end) AS change \
         FROM (SELECT camera_id, window_end, count(*) AS n FROM camera_events \
           GROUP BY tumble(event_time, INTERVAL '1 minute'), camera_id)",
    )
    .await?;
    let out = reader(&brokers, "reader-changes", "test.kept")?;
    let t0 = 1_767_222_000_000;
    // Minute 0 (6 events of each of 10 cameras) closes; 30 events of minute 1 are held.
    produce_events_to(&brokers, t0, 90, 10, Some(2)).await?;
    let first = next_records(&out, 10).await?;
    for r in &first {
        assert_eq!(r["window_end"], t0 + 60_000, "{first:?}");
        assert_eq!(
            (r["n"].as_i64(), r["change"].as_i64()),
            (Some(6), None),
            "{first:?}"
        );
    }
    let status = wait_for(&app, "changes", Duration::from_secs(10), |q| {
        q["partitioning"] == "repartitioned"
    })
    .await?;
    assert_eq!(status["state"], "RUNNING", "{status}");
    // A checkpoint (every 2 s) holds them.
    tokio::time::sleep(Duration::from_secs(3)).await;
    service.shutdown().await;
    drop(app);
    drop(service);

    let again = service_with_cap(&brokers, dir.path(), 2_000_000).await?;
    let app = api::router(again.clone());
    produce_events_to(&brokers, t0 + 90_000, 60, 10, Some(2)).await?;
    let second = next_records(&out, 10).await?;
    let mut cameras = Vec::new();
    for r in &second {
        assert_eq!(r["window_end"], t0 + 120_000, "{second:?}");
        assert_eq!(
            (r["n"].as_i64(), r["change"].as_i64()),
            (Some(6), Some(0)),
            "{second:?}"
        );
        cameras.push(r["camera_id"].as_str().unwrap_or_default().to_string());
    }
    cameras.sort();
    cameras.dedup();
    assert_eq!(cameras.len(), 10, "{second:?}");
    let status = wait_for(&app, "changes", Duration::from_secs(10), |q| {
        q["partitioning"] == "repartitioned"
    })
    .await?;
    assert_eq!(status["state"], "RUNNING", "{status}");
    again.shutdown().await;
    Ok(())
}

/// Restarted with nothing new to read, a query shows the watermark it restored and no lag,
/// repartitioned or not: a repartitioned one showed neither (null) until new records came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_query_shows_its_watermark_and_lag_before_new_records() -> anyhow::Result<()> {
    let (broker, brokers, dir, first, app, _out, t0) = by_camera_service().await?;
    create(&app, "per_segment", &per_minute("per_segment")).await?;
    let settled = |q: &Value| q["watermark_ms"].as_i64().is_some() && q["consumer_lag"] == 0;
    let mut before = std::collections::HashMap::new();
    for name in ["by_camera", "per_segment"] {
        let q = wait_for(&app, name, Duration::from_secs(30), |q| {
            settled(q) && q["rows_in"] == 90
        })
        .await?;
        before.insert(name, q["watermark_ms"].as_i64().unwrap_or_default());
    }
    // A checkpoint taken after the 90 were read holds each (every 2 s).
    let read_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    for name in ["by_camera", "per_segment"] {
        wait_for(&app, name, Duration::from_secs(30), |q| {
            q["last_checkpoint"]["at_ms"]
                .as_i64()
                .is_some_and(|at| at >= read_at)
        })
        .await?;
    }
    first.shutdown().await;
    drop(app);
    drop(first);

    let again = service(&brokers, dir.path()).await?;
    let app = api::router(again.clone());
    for name in ["by_camera", "per_segment"] {
        let q = wait_for(&app, name, Duration::from_secs(30), settled).await?;
        let w = q["watermark_ms"].as_i64().unwrap_or_default();
        assert!(w >= before[name] && w < t0 + 120_000, "{name}: {q}");
        // From the checkpoint: nothing read again.
        assert_eq!(q["rows_in"], 0, "{name}: {q}");
    }
    again.shutdown().await;
    drop(broker);
    Ok(())
}

/// Two queries registered at once, each reading what the other writes, make a loop that
/// would pass a record round without end: one of them is refused, as it is when they come one
/// after the other (each was checked before the other was registered, and both were taken).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_queries_feeding_each_other_registered_at_once_are_refused() -> anyhow::Result<()> {
    let broker = broker()?;
    let dir = tempfile::tempdir()?;
    let service = service(&broker.bootstrap_servers(), dir.path()).await?;
    let app = api::router(service.clone());
    let relay = |from: &str, to: &str| {
        format!(
            "CREATE EXTERNAL TABLE src (k VARCHAR) STORED AS KAFKA OPTIONS ('topic' '{from}');
             CREATE EXTERNAL TABLE dst (k VARCHAR) STORED AS KAFKA OPTIONS ('topic' '{to}');
             INSERT INTO dst SELECT k FROM src"
        )
    };
    for round in 0..8 {
        let (a, b) = (format!("loop.{round}.a"), format!("loop.{round}.b"));
        let (there, back) = (relay(&a, &b), relay(&b, &a));
        let post = |name: String, sql: String| {
            let app = app.clone();
            tokio::spawn(async move {
                call(
                    &app,
                    "POST",
                    "/v1/queries",
                    Some(TOKEN),
                    Some(json!({"name": name, "sql": sql})),
                )
                .await
            })
        };
        let (first, second) = tokio::join!(
            post(format!("there{round}"), there),
            post(format!("back{round}"), back)
        );
        let (first, second) = (first??, second??);
        let created = [&first, &second]
            .iter()
            .filter(|(status, _)| *status == StatusCode::CREATED)
            .count();
        assert_eq!(created, 1, "round {round}: {first:?} {second:?}");
        let (refused, taken) = if first.0 == StatusCode::CREATED {
            (&second, format!("there{round}"))
        } else {
            (&first, format!("back{round}"))
        };
        assert!(
            refused
                .1
                .to_string()
                .contains("whose records come back to it"),
            "{refused:?}"
        );
        // (The service's test limit is three queries.)
        let (status, body) = call(
            &app,
            "DELETE",
            &format!("/v1/queries/{taken}"),
            Some(TOKEN),
            None,
        )
        .await?;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    }
    service.shutdown().await;
    Ok(())
}

/// A query repartitioned through an internal topic goes back to a savepoint: both stages go
/// back (the input to the savepoint's positions, the internal topic to its second stage's),
/// and the window open at the savepoint is computed again, counting each event once (the
/// records passed on again are told from the ones read again by their input offsets). New SQL
/// that would select other records than those passed on since the savepoint is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repartitioned_query_goes_back_to_a_savepoint() -> anyhow::Result<()> {
    let (_broker, brokers, _dir, service, app, out, t0) = by_camera_service().await?;
    let (status, saved) = call(
        &app,
        "POST",
        "/v1/queries/by_camera/savepoints",
        Some(TOKEN),
        Some(json!({"savepoint": "before"})),
    )
    .await?;
    assert_eq!(status, StatusCode::CREATED, "{saved}");
    wait_for(&app, "by_camera", Duration::from_secs(30), is("RUNNING")).await?;
    produce_events_to(&brokers, t0 + 90_000, 60, 10, Some(2)).await?;
    expect_minutes(&out, &[t0 + 60_000], 6).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Not with a filter the records passed on were not selected by, in place or going back:
    // refused, and the query goes on as it was.
    let filtered = BY_CAMERA.replace(
        "FROM camera_events GROUP BY",
        "FROM camera_events WHERE vehicle_class <> 'bus' GROUP BY",
    );
    for request in [
        json!({"sql": filtered}),
        json!({"savepoint": "before", "sql": filtered}),
    ] {
        let (status, refused) = call(
            &app,
            "POST",
            "/v1/queries/by_camera/upgrade",
            Some(TOKEN),
            Some(request),
        )
        .await?;
        assert_eq!(status, StatusCode::CONFLICT, "{refused}");
        assert!(
            refused["message"]
                .as_str()
                .is_some_and(|m| m.contains("repartitioned") && m.contains("WHERE")),
            "{refused}"
        );
        wait_for(&app, "by_camera", Duration::from_secs(5), is("RUNNING")).await?;
    }
    // Back with a HAVING added, which the first stage does not see: accepted.
    let having = format!("{} HAVING count(*) > 0", BY_CAMERA);
    let (status, back) = call(
        &app,
        "POST",
        "/v1/queries/by_camera/upgrade",
        Some(TOKEN),
        Some(json!({"savepoint": "before", "sql": having})),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{back}");
    // Minute 1 again, from the savepoint's state and the events after it, each once.
    expect_minutes(&out, &[t0 + 60_000], 6).await?;
    produce_events_to(&brokers, t0 + 150_000, 60, 10, Some(2)).await?;
    expect_minutes(&out, &[t0 + 120_000], 6).await?;

    // With a statement that cannot be split beside it, the statement is not repartitioned:
    // both run in one state, which reads its input itself, and takes savepoints like any
    // query of one state.
    let (status, body) = call(&app, "DELETE", "/v1/queries/by_camera", Some(TOKEN), None).await?;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let mixed = format!(
        "{BY_CAMERA};
         CREATE EXTERNAL TABLE scores_out (camera_id VARCHAR NOT NULL, score DOUBLE) \
         STORED AS KAFKA OPTIONS ('topic' 'test.hog', 'format' 'json', 'key' 'camera_id');
         INSERT INTO scores_out SELECT camera_id, d['score'] AS score FROM (SELECT camera_id, \
         anomaly_score(speed_kmh, event_time) OVER (PARTITION BY camera_id ORDER BY \
         event_time) AS d FROM camera_events)"
    );
    create(&app, "mixed", &mixed).await?;
    wait_for(&app, "mixed", Duration::from_secs(30), is("RUNNING")).await?;
    let (status, saved) = call(
        &app,
        "POST",
        "/v1/queries/mixed/savepoints",
        Some(TOKEN),
        Some(json!({"savepoint": "before"})),
    )
    .await?;
    assert_eq!(status, StatusCode::CREATED, "{saved}");
    let positions = saved["stores"][0]["positions"].to_string();
    assert!(
        positions.contains("city.camera.events") && !positions.contains(".repartition"),
        "{saved}"
    );
    wait_for(&app, "mixed", Duration::from_secs(30), is("RUNNING")).await?;
    service.shutdown().await;
    Ok(())
}

/// Analysts can discover what SQL can use: the tables with their columns, event time, delay
/// and key, and the functions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_and_functions_are_discoverable() -> anyhow::Result<()> {
    let broker = broker()?;
    let dir = tempfile::tempdir()?;
    let service = service(&broker.bootstrap_servers(), dir.path()).await?;
    let app = api::router(service.clone());
    let (status, tables) = call(&app, "GET", "/v1/tables", Some(TOKEN), None).await?;
    assert_eq!(status, StatusCode::OK, "{tables}");
    let names: Vec<&str> = tables
        .as_array()
        .map(|a| a.iter().filter_map(|t| t["name"].as_str()).collect())
        .unwrap_or_default();
    for name in [
        "camera_events",
        "air_readings",
        "alerts",
        "segments",
        "wards",
    ] {
        assert!(names.contains(&name), "{name} missing: {names:?}");
    }
    let (status, camera) = call(&app, "GET", "/v1/tables/camera_events", Some(TOKEN), None).await?;
    assert_eq!(status, StatusCode::OK, "{camera}");
    assert_eq!(camera["kind"], "stream");
    assert_eq!(camera["topic"], "city.camera.events");
    assert_eq!(camera["event_time"], "event_time");
    assert_eq!(camera["key"], "segment_id");
    assert_eq!(camera["watermark_delay_ms"], 5000);
    assert_eq!(camera["format"], "json");
    let columns = camera["columns"].as_array().cloned().unwrap_or_default();
    assert!(
        columns
            .iter()
            .any(|c| c["name"] == "speed_kmh" && c["nullable"] == true),
        "{camera}"
    );
    let (status, segments) = call(&app, "GET", "/v1/tables/segments", Some(TOKEN), None).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(segments["kind"], "reference");
    let (status, missing) = call(&app, "GET", "/v1/tables/nope", Some(TOKEN), None).await?;
    assert_eq!(status, StatusCode::NOT_FOUND, "{missing}");
    let (status, functions) = call(&app, "GET", "/v1/functions", Some(TOKEN), None).await?;
    assert_eq!(status, StatusCode::OK);
    let find = |name: &str| {
        functions
            .as_array()
            .and_then(|a| a.iter().find(|f| f["name"] == name).cloned())
    };
    for (name, kind, ours) in [
        ("tumble", "scalar", true),
        ("vn_aqi_sub", "scalar", true),
        ("anomaly_score", "window", true),
        ("abs", "scalar", false),
        ("count", "aggregate", false),
    ] {
        let f = find(name).unwrap_or_default();
        assert_eq!(f["kind"], kind, "{name}: {f}");
        assert_eq!(f["urbanstream"], ours, "{name}: {f}");
    }
    let (status, explained) = call(
        &app,
        "POST",
        "/v1/queries/explain",
        Some(TOKEN),
        Some(json!({"sql": per_minute("explained")})),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{explained}");
    let q = &explained["queries"][0];
    assert_eq!(q["source"]["topic"], "city.camera.events", "{q}");
    assert_eq!(q["sink"]["topic"], "test.explained", "{q}");
    let stages: Vec<&str> = q["stages"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s["stage"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(stages, ["per batch", "window", "per emission"], "{q}");
    assert_eq!(q["stages"][1]["kind"], "tumble", "{q}");
    assert_eq!(q["stages"][1]["window"]["size_ms"], 60_000, "{q}");
    assert!(
        q["partitioning"]
            .as_str()
            .is_some_and(|p| p.starts_with("per_partition")),
        "{q}"
    );
    service.shutdown().await;
    Ok(())
}

/// Resident memory of this process, bytes (Linux).
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Keyed detector state counts against the caps like window state: a detector per camera
/// over 30 000 cameras fails one query on the entry cap and another on its memory limit,
/// each with the reason, while the process stays far below what the keys would take unbounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detector_keys_hit_the_state_and_memory_caps_with_a_clear_failure() -> anyhow::Result<()> {
    let broker = broker()?;
    let dir = tempfile::tempdir()?;
    let service = service_with_cap(&broker.bootstrap_servers(), dir.path(), 10_000).await?;
    let app = api::router(service.clone());
    let detector = |name: &str| {
        format!(
            "CREATE EXTERNAL TABLE {name} (camera_id VARCHAR NOT NULL, event_time TIMESTAMP NOT NULL,                 score DOUBLE) STORED AS KAFKA OPTIONS ('topic' 'test.{name}', 'format' 'json');
             INSERT INTO {name} SELECT camera_id, event_time, s['score'] AS score FROM              (SELECT camera_id, event_time, anomaly_score(speed_kmh, event_time)                 OVER (PARTITION BY camera_id ORDER BY event_time) AS s FROM camera_events)"
        )
    };
    create(&app, "keys", &detector("keys")).await?;
    let (status, body) = call(
        &app,
        "POST",
        "/v1/queries",
        Some(TOKEN),
        Some(json!({"name": "small", "sql": detector("small"), "memory_limit": 1 << 20})),
    )
    .await?;
    anyhow::ensure!(status == StatusCode::CREATED, "{status} {body}");
    let rss_before = rss_bytes();
    produce_events(
        &broker.bootstrap_servers(),
        1_767_222_000_000,
        30_000,
        30_000,
    )
    .await?;
    let q = wait_for(&app, "keys", Duration::from_secs(60), is("FAILED")).await?;
    let error = q["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("detector keys") && error.contains("over the cap of 10000"),
        "{q}"
    );
    let q = wait_for(&app, "small", Duration::from_secs(60), is("FAILED")).await?;
    let error = q["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("does not fit the query's memory limit of 1048576 bytes"),
        "{q}"
    );
    let grown = rss_bytes().saturating_sub(rss_before);
    assert!(grown < 512 << 20, "RSS grew by {grown} bytes");
    service.shutdown().await;
    Ok(())
}

/// Reads `topic` (the output of [`per_minute`]) until the first `minutes` windows of each of the
/// 4 segments from `t0` have arrived; each must hold its 15 events, whether it came once or
/// again after a restart (at least once).
async fn assert_whole_windows(
    brokers: &str,
    topic: &str,
    t0: i64,
    minutes: i64,
) -> anyhow::Result<()> {
    let consumer: rdkafka::consumer::StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{topic}"))
        .set("auto.offset.reset", "earliest")
        .create()?;
    rdkafka::consumer::Consumer::subscribe(&consumer, &[topic])?;
    let mut expected: Vec<(String, i64)> = (0..minutes)
        .flat_map(|m| (0..4).map(move |s| (format!("seg-{s}"), t0 + m * 60_000)))
        .collect();
    expected.sort();
    let mut windows = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while windows.len() < expected.len() && Instant::now() < deadline {
        let Ok(message) = tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await
        else {
            continue;
        };
        let message = message?;
        let v: Value = serde_json::from_slice(
            rdkafka::message::Message::payload(&message).unwrap_or_default(),
        )?;
        assert_eq!(v["n"], 15, "{v}");
        windows.insert((
            v["segment_id"].as_str().unwrap_or_default().to_string(),
            v["window_start"].as_i64().unwrap_or_default(),
        ));
    }
    let got: Vec<(String, i64)> = windows.into_iter().collect();
    assert_eq!(got, expected);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_broker_responses_lose_nothing() -> anyhow::Result<()> {
    let (broker, brokers, _dir, service, app) = counting_service().await?;
    wait_for(&app, "counts", Duration::from_secs(20), is("RUNNING")).await?;
    // Every response of the broker takes 250 ms while 240 events go through.
    broker.set_round_trip_time(Duration::from_millis(250))?;
    let t0 = 1_767_222_000_000;
    produce_events(&brokers, t0, 240, 10).await?;
    wait_for(&app, "counts", Duration::from_secs(60), |q| {
        q["rows_in"] == 240 && q["watermark_ms"].as_i64() == Some(t0 + 234_000)
    })
    .await?;
    broker.set_round_trip_time(Duration::ZERO)?;
    // The watermark reaches t0 + 234 s: minutes 0 to 2 close.
    assert_whole_windows(&brokers, "test.counts", t0, 3).await?;
    let q = wait_for(&app, "counts", Duration::from_secs(5), is("RUNNING")).await?;
    assert_eq!(q["rows_out"], 12, "{q}");
    service.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_broker_requests_are_retried_and_lose_nothing() -> anyhow::Result<()> {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let (broker, brokers, _dir, service, app) = counting_service().await?;
    wait_for(&app, "counts", Duration::from_secs(20), is("RUNNING")).await?;
    // Produce, fetch and offset-commit requests fail (retriable errors and dropped
    // connections) while 240 events go through.
    let not_leader = RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION;
    let timed_out = RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT;
    let transport = RDKafkaRespErr::RD_KAFKA_RESP_ERR__TRANSPORT;
    broker.fail_requests(
        RDKafkaApiKey::Produce,
        &[not_leader, timed_out, transport, not_leader],
    );
    broker.fail_requests(
        RDKafkaApiKey::Fetch,
        &[not_leader, transport, not_leader, timed_out],
    );
    broker.fail_requests(RDKafkaApiKey::OffsetCommit, &[timed_out, transport]);
    let t0 = 1_767_222_000_000;
    produce_events(&brokers, t0, 240, 10).await?;
    wait_for(&app, "counts", Duration::from_secs(60), |q| {
        q["rows_in"].as_u64().unwrap_or(0) >= 240
            && q["watermark_ms"].as_i64() == Some(t0 + 234_000)
    })
    .await?;
    assert_whole_windows(&brokers, "test.counts", t0, 3).await?;
    service.shutdown().await;
    Ok(())
}

/// Queries waiting on Kafka run apart from the API: with the broker refusing every
/// transactional producer's initialisation (it keeps answering "coordinator not available",
/// which the client retries for a minute), three exactly-once queries are stuck starting,
/// each holding a thread; the probes and the API, run as tasks on the API's threads, still
/// answer at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_while_queries_wait_on_the_broker() -> anyhow::Result<()> {
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    let broker = broker()?;
    broker.fail_requests(
        RDKafkaApiKey::InitProducerId,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE; 2_000],
    );
    let brokers = broker.bootstrap_servers();
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("urbanstream.toml");
    std::fs::write(
        &file,
        format!(
            "[kafka]\nbrokers = \"{brokers}\"\ngroup_id = \"stuck\"\n\
             [api]\ntoken = \"{TOKEN}\"\n\
             [catalog]\npath = \"{}\"\n[queries]\ndefaults = false\nmax_queries = 3\n\
             [checkpoint]\ndir = \"{}\"\nexactly_once = true\n",
            dir.path().join("catalog.json").display(),
            dir.path().join("checkpoints").display()
        ),
    )?;
    let service = Service::start(ServiceConfig::load(Some(&file))?).await?;
    let app = api::router(service.clone());
    for name in ["q1", "q2", "q3"] {
        create(&app, name, &per_minute(name)).await?;
    }
    // The queries reach their producers' initialisation and wait there. (A thread sleep: a
    // timer of the runtime would itself wait for a free thread.)
    std::thread::sleep(Duration::from_secs(3));
    let (_, q) = call(&app, "GET", "/v1/queries/q1", Some(TOKEN), None).await?;
    assert_eq!(q["state"], "STARTING", "{q}");
    for path in ["/livez", "/readyz", "/v1/queries"] {
        for _ in 0..5 {
            let app = app.clone();
            // Wall-clock: with every API thread blocked, tokio's own timers stall too.
            let asked_at = Instant::now();
            let (status, body) =
                tokio::spawn(async move { call(&app, "GET", path, Some(TOKEN), None).await })
                    .await??;
            let waited = asked_at.elapsed();
            // (Well below the broker calls' own timeouts, 10 s and more, well above what a
            // loaded machine takes to answer.)
            assert!(
                waited < Duration::from_secs(8),
                "{path} answered only after {waited:?} while the queries wait on the broker"
            );
            assert!(
                status == StatusCode::OK
                    || (path == "/readyz" && status == StatusCode::SERVICE_UNAVAILABLE),
                "{path}: {status} {body}"
            );
        }
    }
    // Not shut down gracefully: the queries' initialisations run to their timeouts; the
    // queries' runtime is dropped without waiting for them.
    drop(service);
    drop(broker);
    Ok(())
}

/// A consumer of `topic` from its beginning, in consumer group `group`.
fn reader(
    brokers: &str,
    group: &str,
    topic: &str,
) -> anyhow::Result<rdkafka::consumer::StreamConsumer> {
    let consumer: rdkafka::consumer::StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .create()?;
    rdkafka::consumer::Consumer::subscribe(&consumer, &[topic])?;
    Ok(consumer)
}

/// Registers `intervals` (each air reading with its sensor's `interval_s` from the `sensors`
/// reference table) and waits for it to run; readers of its output and of the DLQ.
async fn intervals_query(
    app: &axum::Router,
    brokers: &str,
) -> anyhow::Result<(
    rdkafka::consumer::StreamConsumer,
    rdkafka::consumer::StreamConsumer,
)> {
    create(
        app,
        "intervals",
        "CREATE EXTERNAL TABLE intervals (sensor_id VARCHAR NOT NULL, interval_s BIGINT, \
         event_time TIMESTAMP NOT NULL) STORED AS KAFKA OPTIONS ('topic' 'test.intervals'); \
         INSERT INTO intervals SELECT a.sensor_id, s.interval_s, a.event_time \
         FROM air_readings a LEFT JOIN sensors s ON a.sensor_id = s.sensor_id",
    )
    .await?;
    wait_for(app, "intervals", Duration::from_secs(60), is("RUNNING")).await?;
    Ok((
        reader(brokers, "reader-intervals", "test.intervals")?,
        reader(
            brokers,
            "reader-dlq",
            &urbanstream::pipeline::Topics::default().dlq,
        )?,
    ))
}

/// The next `n` records of `consumer`'s topic, as JSON, or fails after 60 s.
async fn next_records(
    consumer: &rdkafka::consumer::StreamConsumer,
    n: usize,
) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while out.len() < n {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {n} records: {out:?}",
            out.len()
        );
        let Ok(message) = tokio::time::timeout(Duration::from_secs(1), consumer.recv()).await
        else {
            continue;
        };
        let message = message?;
        out.push(serde_json::from_slice(
            rdkafka::message::Message::payload(&message).unwrap_or_default(),
        )?);
    }
    Ok(out)
}

/// A reference table replaced through the API: the CSV is checked (a wrong header, a derived
/// table, a stream and a missing token are refused), the new version is read by a running
/// query from its next micro-batch, and it is still there after the service restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_tables_are_replaced_at_run_time_and_kept() -> anyhow::Result<()> {
    let broker = broker()?;
    let brokers = broker.bootstrap_servers();
    let dir = tempfile::tempdir()?;
    let service = service(&brokers, dir.path()).await?;
    let app = api::router(service.clone());
    let (status, built_in) =
        call_text(&app, "GET", "/v1/tables/sensors/rows", Some(TOKEN), None).await?;
    assert_eq!(status, StatusCode::OK, "{built_in}");
    assert_eq!(
        built_in.lines().next(),
        Some("sensor_id,ward_id,kind,lat,lon,interval_s")
    );
    let (consumer, _) = intervals_query(&app, &brokers).await?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()?;
    let air = urbanstream::pipeline::Topics::default().air;
    let send = |at: i64| {
        let value = json!({"sensor_id": "hn-st-07", "ward_id": "ba_dinh", "event_time": at,
                           "pm25": 41.0})
        .to_string();
        let producer = producer.clone();
        let air = air.clone();
        async move {
            producer
                .send(
                    FutureRecord::to(&air).key("ba_dinh").payload(&value),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)
        }
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    send(now - 60_000).await?;
    let before = next_records(&consumer, 1).await?;
    assert_eq!(before[0]["sensor_id"], "hn-st-07", "{before:?}");
    assert!(
        before[0]["interval_s"].is_null(),
        "not declared yet: {before:?}"
    );
    // Processed (the default policy) and counted.
    let status = wait_for(&app, "intervals", Duration::from_secs(10), |q| {
        q["unknown_ids"] == 1
    })
    .await?;
    assert_eq!(status["dlq"], 0, "{status}");

    // Refused, each with its reason.
    let header = "sensor_id,ward_id,kind,lat,lon,interval_s\n";
    for (path, token, csv, expected, reason) in [
        (
            "sensors",
            Some(TOKEN),
            "station,ward\nx,y\n".to_string(),
            StatusCode::BAD_REQUEST,
            "header must be",
        ),
        (
            "sensors",
            Some(TOKEN),
            format!("{header}x,nowhere,station,21.0,105.8,3600\n"),
            StatusCode::BAD_REQUEST,
            "unknown ward",
        ),
        (
            "ward_sensors",
            Some(TOKEN),
            "ward_id\nx\n".to_string(),
            StatusCode::BAD_REQUEST,
            "replace sensors instead",
        ),
        (
            "camera_events",
            Some(TOKEN),
            "camera_id\nx\n".to_string(),
            StatusCode::CONFLICT,
            "is a stream",
        ),
        (
            "sensors",
            None,
            built_in.clone(),
            StatusCode::UNAUTHORIZED,
            "bearer token",
        ),
    ] {
        let (status, answer) = call_text(
            &app,
            "PUT",
            &format!("/v1/tables/{path}/rows"),
            token,
            Some(("text/csv", csv)),
        )
        .await?;
        assert_eq!(status, expected, "{path}: {answer}");
        assert!(answer.contains(reason), "{path}: {answer}");
    }
    // A view or a table a registered query declares, quoted or not, keeps its name (a view's
    // name, or a quoted one, was taken by the table, and the query could not plan again).
    create(
        &app,
        "declares",
        "CREATE VIEW fastcars AS SELECT * FROM camera_events WHERE speed_kmh > 50; \
         CREATE EXTERNAL TABLE \"quoted_out\" (segment_id VARCHAR NOT NULL, \
           window_start TIMESTAMP NOT NULL, n BIGINT NOT NULL) \
         STORED AS KAFKA OPTIONS ('topic' 'test.quoted', 'format' 'json'); \
         INSERT INTO \"quoted_out\" SELECT segment_id, window_start, count(*) AS n \
         FROM fastcars GROUP BY tumble(event_time, INTERVAL '1 minute'), segment_id",
    )
    .await?;
    for path in ["fastcars", "quoted_out"] {
        let (status, answer) = call_text(
            &app,
            "PUT",
            &format!("/v1/tables/{path}/rows"),
            Some(TOKEN),
            Some(("text/csv", "a,b\n1,2\n".to_string())),
        )
        .await?;
        assert_eq!(status, StatusCode::CONFLICT, "{path}: {answer}");
        assert!(answer.contains("query declares"), "{path}: {answer}");
    }

    // Sixty hourly stations: a CSV larger than api.max_body (4 KiB), which bounds JSON only.
    let mut csv = built_in.clone();
    for i in 0..60 {
        csv.push_str(&format!("hn-st-{i:02},ba_dinh,station,21.03,105.81,3600\n"));
    }
    assert!(csv.len() > 4096);
    let (status, answer) = call_text(
        &app,
        "PUT",
        "/v1/tables/sensors/rows",
        Some(TOKEN),
        Some(("text/csv", csv.clone())),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let answer: Value = serde_json::from_str(&answer)?;
    assert_eq!(answer["version"], 2, "{answer}");
    assert_eq!(answer["rows"], csv.lines().count() - 1, "{answer}");
    send(now).await?;
    let after = next_records(&consumer, 1).await?;
    assert_eq!(
        after[0]["interval_s"], 3600,
        "read without a restart: {after:?}"
    );

    // A segment added: the city map shows it without a restart (it showed the segments
    // compiled into the binary, whatever the tables held).
    let (_, segments) =
        call_text(&app, "GET", "/v1/tables/segments/rows", Some(TOKEN), None).await?;
    let added = "added_segment,Added Street,Added Street,khuong_dinh,2,40,3000,urban_street,500,\
                 \"LINESTRING(105.8000 21.0000, 105.8100 21.0100)\"\n";
    let (status, answer) = call_text(
        &app,
        "PUT",
        "/v1/tables/segments/rows",
        Some(TOKEN),
        Some(("text/csv", format!("{segments}{added}"))),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let shows_added = |map: &Value| {
        map["segments"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["id"] == "added_segment"))
    };
    let start = Instant::now();
    loop {
        let (status, map) = call(&app, "GET", "/v1/city/map", Some(TOKEN), None).await?;
        assert_eq!(status, StatusCode::OK, "{map}");
        if shows_added(&map) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the map never showed the added segment"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, snapshot) = call(&app, "GET", "/v1/city", Some(TOKEN), None).await?;
    assert_eq!(snapshot["map_version"], 1, "{snapshot}");

    // Another process over the same directory reads the kept versions, and its map shows
    // them.
    service.shutdown().await;
    drop(service);
    let service = service_with_cap(&brokers, dir.path(), 2_000_000).await?;
    let app = api::router(service.clone());
    let (status, sensors) = call(&app, "GET", "/v1/tables/sensors", Some(TOKEN), None).await?;
    assert_eq!(status, StatusCode::OK, "{sensors}");
    assert_eq!(sensors["version"], 2, "{sensors}");
    let (_, ward_sensors) = call(&app, "GET", "/v1/tables/ward_sensors", Some(TOKEN), None).await?;
    assert_eq!(ward_sensors["derived_from"], "sensors", "{ward_sensors}");
    assert_eq!(ward_sensors["version"], 2, "{ward_sensors}");
    let (_, map) = call(&app, "GET", "/v1/city/map", Some(TOKEN), None).await?;
    assert!(shows_added(&map), "the kept segments are not on the map");
    service.shutdown().await;
    Ok(())
}

/// A table of an analyst's own is added, read by queries, and removed once no query reads
/// it; the city's tables and streams are not removed; a removal survives a restart, and the
/// name can then be taken by a table of other columns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_added_at_run_time_is_removed_once_no_query_reads_it() -> anyhow::Result<()> {
    let broker = broker()?;
    let brokers = broker.bootstrap_servers();
    let dir = tempfile::tempdir()?;
    let service = service(&brokers, dir.path()).await?;
    let app = api::router(service.clone());
    let put = |name: &'static str, csv: &'static str| {
        let app = app.clone();
        async move {
            call_text(
                &app,
                "PUT",
                &format!("/v1/tables/{name}/rows"),
                Some(TOKEN),
                Some(("text/csv", csv.to_string())),
            )
            .await
        }
    };
    let (status, answer) =
        put("speed_limits", "segment_id,limit_kmh\nseg-1,40\nseg-2,60\n").await?;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let sink = |name: &str| {
        format!(
            "CREATE EXTERNAL TABLE {name}_out (camera_id VARCHAR NOT NULL, speed_kmh DOUBLE, \
               limit_kmh BIGINT) STORED AS KAFKA OPTIONS ('topic' 'test.{name}', 'format' 'json'); "
        )
    };
    // One reads it in a join, one through a view, one has a CTE of its name over another
    // table (which shadows it: that query does not read the table).
    create(
        &app,
        "joins",
        &format!(
            "{}INSERT INTO joins_out SELECT c.camera_id, c.speed_kmh, l.limit_kmh \
             FROM camera_events c JOIN speed_limits l ON c.segment_id = l.segment_id \
             WHERE c.speed_kmh > l.limit_kmh",
            sink("joins")
        ),
    )
    .await?;
    create(
        &app,
        "viewed",
        &format!(
            "CREATE VIEW limits AS SELECT segment_id, limit_kmh FROM speed_limits; {}\
             INSERT INTO viewed_out SELECT c.camera_id, c.speed_kmh, l.limit_kmh \
             FROM camera_events c JOIN limits l ON c.segment_id = l.segment_id",
            sink("viewed")
        ),
    )
    .await?;
    create(
        &app,
        "shadows",
        &format!(
            "{}INSERT INTO shadows_out WITH speed_limits AS \
               (SELECT segment_id, CAST(lanes AS BIGINT) AS limit_kmh FROM segments) \
             SELECT c.camera_id, c.speed_kmh, l.limit_kmh \
             FROM camera_events c JOIN speed_limits l ON c.segment_id = l.segment_id",
            sink("shadows")
        ),
    )
    .await?;
    let delete = |path: &'static str, token: Option<&'static str>| {
        let app = app.clone();
        async move { call_text(&app, "DELETE", path, token, None).await }
    };
    for (path, token, expected, reason) in [
        (
            "/v1/tables/speed_limits",
            Some(TOKEN),
            StatusCode::CONFLICT,
            "read by queries joins, viewed: drop them first",
        ),
        (
            "/v1/tables/sensors",
            Some(TOKEN),
            StatusCode::CONFLICT,
            "one of the city's tables",
        ),
        (
            "/v1/tables/ward_sensors",
            Some(TOKEN),
            StatusCode::CONFLICT,
            "one of the city's tables",
        ),
        (
            "/v1/tables/camera_events",
            Some(TOKEN),
            StatusCode::CONFLICT,
            "is a stream",
        ),
        (
            "/v1/tables/nowhere",
            Some(TOKEN),
            StatusCode::NOT_FOUND,
            "no table named",
        ),
        (
            "/v1/tables/speed_limits",
            None,
            StatusCode::UNAUTHORIZED,
            "bearer token",
        ),
    ] {
        let (status, answer) = delete(path, token).await?;
        assert_eq!(status, expected, "{path}: {answer}");
        assert!(answer.contains(reason), "{path}: {answer}");
    }
    for query in ["joins", "viewed"] {
        let (status, answer) = delete(
            if query == "joins" {
                "/v1/queries/joins"
            } else {
                "/v1/queries/viewed"
            },
            Some(TOKEN),
        )
        .await?;
        assert_eq!(status, StatusCode::NO_CONTENT, "{query}: {answer}");
    }
    let (status, answer) = delete("/v1/tables/speed_limits", Some(TOKEN)).await?;
    assert_eq!(status, StatusCode::NO_CONTENT, "{answer}");
    let (status, answer) =
        call_text(&app, "GET", "/v1/tables/speed_limits", Some(TOKEN), None).await?;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
    // SQL no longer finds it.
    let (status, answer) = call(
        &app,
        "POST",
        "/v1/queries/validate",
        Some(TOKEN),
        Some(json!({"sql": format!(
            "{}INSERT INTO again_out SELECT c.camera_id, c.speed_kmh, l.limit_kmh \
             FROM camera_events c JOIN speed_limits l ON c.segment_id = l.segment_id",
            sink("again")
        )})),
    )
    .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    assert!(answer.to_string().contains("speed_limits"), "{answer}");
    // The shadowing query runs on.
    let (_, shadows) = call(&app, "GET", "/v1/queries/shadows", Some(TOKEN), None).await?;
    assert_ne!(shadows["state"], "FAILED", "{shadows}");

    // Gone after a restart too, and the name is free for a table of other columns.
    service.shutdown().await;
    drop(service);
    let service = service_with_cap(&brokers, dir.path(), 2_000_000).await?;
    let app = api::router(service.clone());
    let (status, answer) =
        call_text(&app, "GET", "/v1/tables/speed_limits", Some(TOKEN), None).await?;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
    let (status, answer) = call_text(
        &app,
        "PUT",
        "/v1/tables/speed_limits/rows",
        Some(TOKEN),
        Some(("text/csv", "road,kmh,note\nA,50,x\n".to_string())),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (_, table) = call(&app, "GET", "/v1/tables/speed_limits", Some(TOKEN), None).await?;
    assert_eq!(table["version"], 1, "{table}");
    assert_eq!(
        table["columns"].as_array().map(Vec::len),
        Some(3),
        "{table}"
    );
    service.shutdown().await;
    Ok(())
}

/// A preview runs a query over rows given in the request, unregistered: its rows are the
/// registered query's over the same records through Kafka (the windows both closed), with the
/// rejected rows counted; bad requests are refused with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preview_gives_the_rows_the_registered_query_publishes() -> anyhow::Result<()> {
    let broker = broker()?;
    let brokers = broker.bootstrap_servers();
    let dir = tempfile::tempdir()?;
    let service = service(&brokers, dir.path()).await?;
    let app = api::router(service.clone());
    let minute = 60_000;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let t0 = (now - 3_600_000) / minute * minute;
    // Five minutes of detections (as produce_events makes them), then one ten minutes later
    // that closes their windows.
    let mut csv =
        String::from("camera_id,segment_id,event_time,kind,vehicle_class,speed_kmh,confidence\n");
    for i in 0..300 {
        csv.push_str(&format!(
            "cam-{},seg-{},{},detection,motorbike,30.0,0.9\n",
            i % 7,
            i % 4,
            t0 + i as i64 * 1000
        ));
    }
    let closing = t0 + 10 * minute;
    csv.push_str(&format!(
        "cam-0,seg-0,{closing},detection,motorbike,30.0,0.9\n"
    ));
    csv.push_str(&format!("cam-0,seg-0,{t0},detection,hovercraft,30.0,0.9\n"));
    let sql = per_minute("previewed");
    let (status, preview) = call(
        &app,
        "POST",
        "/v1/queries/preview",
        Some(TOKEN),
        Some(json!({"sql": sql, "input": {"format": "csv", "data": csv}, "limit": 1000})),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{preview}");
    assert_eq!(preview["input_rows"], 302, "{preview}");
    assert_eq!(preview["rejected"], 1, "{preview}");
    assert!(
        preview["first_rejection"]
            .as_str()
            .is_some_and(|r| r.contains("hovercraft")),
        "{preview}"
    );
    assert_eq!(preview["output_rows"], 21, "{preview}");
    let windows = |rows: &[Value]| {
        let mut out: Vec<(String, i64, i64)> = rows
            .iter()
            .map(|r| {
                (
                    r["segment_id"].as_str().unwrap_or_default().to_string(),
                    r["window_start"].as_i64().unwrap_or_default(),
                    r["n"].as_i64().unwrap_or_default(),
                )
            })
            .filter(|(_, start, _)| *start < t0 + 5 * minute)
            .collect();
        out.sort();
        out
    };
    let previewed = windows(preview["rows"].as_array().map_or(&[], Vec::as_slice));
    assert_eq!(previewed.len(), 20, "{preview}");
    assert!(previewed.iter().all(|(_, _, n)| *n == 15), "{previewed:?}");

    // The same file as Parquet (written by DataFusion, Snappy-compressed), sent as base64:
    // the same answer.
    let csv_file = dir.path().join("detections.csv");
    std::fs::write(&csv_file, &csv)?;
    let parquet_file = dir.path().join("detections.parquet");
    {
        use datafusion::dataframe::DataFrameWriteOptions;
        use datafusion::prelude::{CsvReadOptions, SessionContext};
        SessionContext::new()
            .read_csv(csv_file.to_string_lossy().as_ref(), CsvReadOptions::new())
            .await?
            .write_parquet(
                parquet_file.to_string_lossy().as_ref(),
                DataFrameWriteOptions::new().with_single_file_output(true),
                None,
            )
            .await?;
    }
    let bytes = std::fs::read(&parquet_file)?;
    assert_eq!(&bytes[..4], b"PAR1");
    let data = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(&bytes)
    };
    let (status, from_parquet) = call(
        &app,
        "POST",
        "/v1/queries/preview",
        Some(TOKEN),
        Some(json!({"sql": sql, "input": {"format": "parquet", "data": data}, "limit": 1000})),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{from_parquet}");
    for count in ["input_rows", "rejected", "output_rows"] {
        assert_eq!(
            from_parquet[count], preview[count],
            "{count}: {from_parquet}"
        );
    }
    assert_eq!(
        windows(from_parquet["rows"].as_array().map_or(&[], Vec::as_slice)),
        previewed
    );

    // Numbers come back with every digit: the answer's rows went through floats, and
    // `1234567890123456.1234` came back `1234567890123456.0`.
    let exact = "CREATE EXTERNAL TABLE exact (id VARCHAR, v DECIMAL(20,4), n BIGINT, \
                 event_time TIMESTAMP) STORED AS KAFKA OPTIONS ('topic' 'exact', \
                 'event_time' 'event_time'); SELECT id, v, n FROM exact";
    let rows = format!(
        "{{\"id\":\"a\",\"v\":1234567890123456.1234,\"n\":9007199254740993,\"event_time\":{t0}}}\n"
    );
    let body = json!({"sql": exact, "input": {"format": "jsonl", "data": rows}});
    let (status, answer) = call_text(
        &app,
        "POST",
        "/v1/queries/preview",
        Some(TOKEN),
        Some(("application/json", body.to_string())),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(
        answer.contains(r#"{"id":"a","v":1234567890123456.1234,"n":9007199254740993}"#),
        "{answer}"
    );

    // Refused, with the reason.
    for (body, reason) in [
        (
            json!({"sql": sql, "input": {"format": "xml", "data": "x"}}),
            "csv, jsonl or parquet",
        ),
        (
            json!({"sql": sql, "input": {"format": "parquet", "data": "PAR1 not base64!"}}),
            "bytes in base64",
        ),
        (
            json!({"sql": sql, "input": {"format": "csv", "data": csv}, "limit": 0}),
            "between 1 and",
        ),
        (
            json!({"sql": "CREATE EXTERNAL TABLE f (a INT) STORED AS CSV LOCATION '/etc/passwd'; \
                           SELECT * FROM f", "input": {"format": "csv", "data": "a\n1\n"}}),
            "is not available in stream queries",
        ),
        (
            json!({"sql": "SELECT 1", "input": {"format": "csv", "data": "a\n1\n"}}),
            "stream",
        ),
        // Eight bytes that look like Parquet panicked its reader (a 500).
        (
            json!({"sql": sql, "input": {"format": "parquet", "data": "UEFSMVBBUjE="}}),
            "input.data is not a Parquet file: 8 bytes",
        ),
        // The request's fields, not the command's flags or the server's files.
        (
            json!({"sql": sql, "input": {"format": "csv", "data": csv, "rename": ["nope=x"]}}),
            "input.rename nope=…: input.data has no column nope",
        ),
        // A negative time went to the broker (a 500 with librdkafka's words).
        (
            json!({"sql": sql, "topic": {"from_ms": -1}}),
            "topic.from_ms -1: a time in epoch milliseconds, 0 or more",
        ),
    ] {
        let (status, answer) =
            call(&app, "POST", "/v1/queries/preview", Some(TOKEN), Some(body)).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        assert!(
            answer["message"]
                .as_str()
                .is_some_and(|m| m.contains(reason)),
            "{answer}"
        );
    }

    // The same records through Kafka, to the registered query.
    create(&app, "previewed", &sql).await?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()?;
    for line in csv.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let value = json!({"camera_id": f[0], "segment_id": f[1],
                           "event_time": f[2].parse::<i64>()?, "kind": f[3],
                           "vehicle_class": f[4], "speed_kmh": 30.0, "confidence": 0.9})
        .to_string();
        producer
            .send(
                FutureRecord::to("city.camera.events")
                    .key(f[1])
                    .payload(&value),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    let consumer = reader(&brokers, "reader-previewed", "test.previewed")?;
    let published = next_records(&consumer, 20).await?;
    assert_eq!(windows(&published), previewed);
    // The same query previewed over the topic's records, all of them and the first 100 of
    // each partition.
    let (status, over_topic) = call(
        &app,
        "POST",
        "/v1/queries/preview",
        Some(TOKEN),
        Some(json!({"sql": sql, "topic": {}, "limit": 1000})),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{over_topic}");
    assert_eq!(over_topic["input_rows"], 302, "{over_topic}");
    assert_eq!(over_topic["rejected"], 1, "{over_topic}");
    assert_eq!(over_topic["input_truncated"], false, "{over_topic}");
    assert_eq!(
        windows(over_topic["rows"].as_array().map_or(&[], Vec::as_slice)),
        previewed
    );
    let (status, first) = call(
        &app,
        "POST",
        "/v1/queries/preview",
        Some(TOKEN),
        Some(json!({"sql": sql, "topic": {"to_offset": 100}})),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{first}");
    let probe: rdkafka::consumer::BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()?;
    let mut expected = 0;
    for p in 0..2 {
        let (_, high) = rdkafka::consumer::Consumer::fetch_watermarks(
            &probe,
            "city.camera.events",
            p,
            Duration::from_secs(10),
        )?;
        expected += high.min(100);
    }
    assert_eq!(first["input_rows"], expected, "per partition: {first}");
    let (status, both) = call(
        &app,
        "POST",
        "/v1/queries/preview",
        Some(TOKEN),
        Some(json!({"sql": sql, "topic": {}, "input": {"format": "csv", "data": csv}})),
    )
    .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{both}");
    let status = wait_for(&app, "previewed", Duration::from_secs(10), |q| {
        q["dlq"] == 1
    })
    .await?;
    assert_eq!(status["rows_out"], 20, "{status}");
    service.shutdown().await;
    Ok(())
}

/// With `reference.unknown_ids = "dead_letter"`, a reading from a sensor that is not in the
/// sensors table goes to the DLQ with the reason (the id, the table, its version), and a
/// reading from a known sensor is processed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_of_unknown_sensors_are_dead_lettered_by_policy() -> anyhow::Result<()> {
    let broker = broker()?;
    let brokers = broker.bootstrap_servers();
    let dir = tempfile::tempdir()?;
    let service = service_with(
        &brokers,
        dir.path(),
        2_000_000,
        "[reference]\nunknown_ids = \"dead_letter\"\n",
    )
    .await?;
    let app = api::router(service.clone());
    let (output, dlq) = intervals_query(&app, &brokers).await?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    for sensor in ["hn-st-07", "aq-001"] {
        let value = json!({"sensor_id": sensor, "ward_id": "hoan_kiem", "event_time": now,
                           "pm25": 41.0})
        .to_string();
        producer
            .send(
                FutureRecord::to(&urbanstream::pipeline::Topics::default().air)
                    .key("hoan_kiem")
                    .payload(&value),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    let processed = next_records(&output, 1).await?;
    assert_eq!(processed[0]["sensor_id"], "aq-001", "{processed:?}");
    assert_eq!(processed[0]["interval_s"], 60, "{processed:?}");
    let dead = next_records(&dlq, 1).await?;
    assert_eq!(dead[0]["stage"], "reference", "{dead:?}");
    assert_eq!(dead[0]["query"], "intervals", "{dead:?}");
    let error = dead[0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("\"hn-st-07\"") && error.contains("sensors (version 1)"),
        "{error}"
    );
    let status = wait_for(&app, "intervals", Duration::from_secs(10), |q| {
        q["unknown_ids"] == 1 && q["dlq"] == 1
    })
    .await?;
    assert_eq!(status["rows_out"], 1, "{status}");
    service.shutdown().await;
    Ok(())
}

/// `[reference.topics]`: `sensors` kept current from a compacted topic of JSON rows. The topic
/// read at start is the table (a station of its own included), a running query reads a row
/// added later from its next micro-batch, a record that does not fit goes to the DLQ with its
/// reason, a version the table's checks refuse leaves the table as it was (and says why), a
/// tombstone deletes, the API does not replace a followed table, and a restart over the same
/// topic keeps the version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_tables_follow_their_compacted_topics() -> anyhow::Result<()> {
    let broker = broker()?;
    let brokers = broker.bootstrap_servers();
    let topic = "test.reference.sensors";
    broker.create_topic(topic, 4)?;
    let dir = tempfile::tempdir()?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()?;
    let send = |key: &str, value: Option<String>| {
        let producer = producer.clone();
        let key = key.to_string();
        async move {
            let mut record = FutureRecord::<str, str>::to(topic).key(&key);
            if let Some(value) = &value {
                record = record.payload(value);
            }
            producer
                .send(record, Duration::from_secs(10))
                .await
                .map(|_| ())
                .map_err(|(e, _)| anyhow::anyhow!("{e}"))
        }
    };
    let station = |id: &str, ward: &str, interval: i64| {
        json!({"sensor_id": id, "ward_id": ward, "kind": "station", "lat": 21.03,
               "lon": 105.84, "interval_s": interval})
        .to_string()
    };
    // The topic as an operator seeds it (README): the table's rows as CSV, a station of their
    // own added, replayed keyed by id.
    let built_in = urbanstream::reference::ReferenceTables::embedded()?;
    let mut csv = built_in.get("sensors").expect("sensors").csv.to_string();
    let seeded = csv.lines().skip(1).filter(|l| !l.trim().is_empty()).count();
    if !csv.ends_with('\n') {
        csv.push('\n');
    }
    csv.push_str("hn-st-07,ba_dinh,station,21.03,105.84,3600\n");
    let file = dir.path().join("sensors.csv");
    std::fs::write(&file, csv)?;
    urbanstream::cli::replay::replay(&urbanstream::cli::replay::ReplayArgs {
        key: Some("sensor_id".into()),
        ..urbanstream::cli::replay::ReplayArgs::new(file, topic, &brokers)
    })
    .await?;
    let extra = format!(
        "[reference]\nunknown_ids = \"dead_letter\"\n[reference.topics]\nsensors = \"{topic}\"\n"
    );
    let service = service_with(&brokers, dir.path(), 2_000_000, &extra).await?;
    let app = api::router(service.clone());
    let table = |app: axum::Router| async move {
        let (status, body) = call(&app, "GET", "/v1/tables/sensors", Some(TOKEN), None).await?;
        anyhow::ensure!(status == StatusCode::OK, "{body}");
        Ok::<Value, anyhow::Error>(body)
    };
    let until = |app: axum::Router, what: &'static str, check: fn(&Value) -> bool| async move {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let body = table(app.clone()).await?;
            if check(&body) {
                return Ok::<Value, anyhow::Error>(body);
            }
            anyhow::ensure!(Instant::now() < deadline, "{what}: {body}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let loaded = until(app.clone(), "the topic read", |t| {
        t["follows"]["loaded"] == true && t["version"] == 2
    })
    .await?;
    assert_eq!(loaded["rows"], seeded + 1, "{loaded}");
    assert_eq!(loaded["follows"]["topic"], topic, "{loaded}");
    assert!(loaded["follows"]["error"].is_null(), "{loaded}");
    let (_, rows) = call_text(&app, "GET", "/v1/tables/sensors/rows", Some(TOKEN), None).await?;
    assert!(
        rows.lines()
            .any(|l| l == "hn-st-07,ba_dinh,station,21.03,105.84,3600"),
        "{rows}"
    );

    let (output, dlq) = intervals_query(&app, &brokers).await?;
    let air = urbanstream::pipeline::Topics::default().air;
    let reading = |sensor: &'static str, at: i64| {
        let producer = producer.clone();
        let air = air.clone();
        async move {
            let value = json!({"sensor_id": sensor, "ward_id": "ba_dinh", "event_time": at,
                               "pm25": 41.0})
            .to_string();
            producer
                .send(
                    FutureRecord::to(&air).key("ba_dinh").payload(&value),
                    Duration::from_secs(10),
                )
                .await
                .map(|_| ())
                .map_err(|(e, _)| anyhow::anyhow!("{e}"))
        }
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    reading("hn-st-07", now - 120_000).await?;
    let first = next_records(&output, 1).await?;
    assert_eq!(first[0]["interval_s"], 3600, "{first:?}");

    // A record that does not fit the table: to the DLQ with its reason, nothing else changes.
    send(
        "hn-st-09",
        Some("{\"sensor_id\": \"hn-st-09\", \"colour\": 1}".into()),
    )
    .await?;
    let dead = next_records(&dlq, 1).await?;
    assert_eq!(dead[0]["stage"], "reference", "{dead:?}");
    assert_eq!(dead[0]["topic"], topic, "{dead:?}");
    let error = dead[0]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("sensors") && error.contains("no column \"colour\""),
        "{error}"
    );
    // A row added while the query runs: read from its next micro-batch.
    send("hn-st-08", Some(station("hn-st-08", "ba_dinh", 1800))).await?;
    until(app.clone(), "the new row installed", |t| t["version"] == 3).await?;
    reading("hn-st-08", now - 60_000).await?;
    let second = next_records(&output, 1).await?;
    assert_eq!(second[0]["sensor_id"], "hn-st-08", "{second:?}");
    assert_eq!(second[0]["interval_s"], 1800, "{second:?}");

    // A row of an unknown ward: the version is refused whole and the table says why.
    send("hn-st-10", Some(station("hn-st-10", "nowhere", 3600))).await?;
    let refused = until(app.clone(), "the refusal shown", |t| {
        t["follows"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("nowhere"))
    })
    .await?;
    assert_eq!(refused["version"], 3, "{refused}");
    assert_eq!(refused["follows"]["refused_records"], 1, "{refused}");
    // Its tombstone, and one of hn-st-07: the next version has neither.
    send("hn-st-10", None).await?;
    send("hn-st-07", None).await?;
    let deleted = until(app.clone(), "the tombstones installed", |t| {
        t["version"] == 4 && t["follows"]["error"].is_null()
    })
    .await?;
    assert_eq!(deleted["rows"], seeded + 1, "{deleted}");
    let (_, rows) = call_text(&app, "GET", "/v1/tables/sensors/rows", Some(TOKEN), None).await?;
    assert!(
        !rows.contains("hn-st-07") && rows.contains("hn-st-08"),
        "{rows}"
    );

    // The API does not replace a followed table.
    let one_row = rows.lines().take(2).collect::<Vec<_>>().join("\n");
    let (status, body) = call_text(
        &app,
        "PUT",
        "/v1/tables/sensors/rows",
        Some(TOKEN),
        Some(("text/csv", one_row)),
    )
    .await?;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body.contains(topic), "{body}");

    // A restart reads the topic again and keeps the version it had.
    service.shutdown().await;
    drop(app);
    drop(service);
    let service = service_with(&brokers, dir.path(), 2_000_000, &extra).await?;
    let app = api::router(service.clone());
    let again = until(app.clone(), "the topic read again", |t| {
        t["follows"]["loaded"] == true
    })
    .await?;
    assert_eq!(again["version"], 4, "{again}");
    assert_eq!(again["rows"], seeded + 1, "{again}");
    service.shutdown().await;
    Ok(())
}

/// Two followed tables: a sensor of a ward that only `wards`' topic will bring is refused by
/// `sensors`' checks, then installed as soon as the ward arrives through the other topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_reference_version_is_installed_when_the_table_it_needs_changes()
-> anyhow::Result<()> {
    let broker = broker()?;
    let brokers = broker.bootstrap_servers();
    for topic in ["test.reference.wards", "test.reference.sensors"] {
        broker.create_topic(topic, 4)?;
    }
    let dir = tempfile::tempdir()?;
    // Both topics seeded with the built-in rows.
    let built_in = urbanstream::reference::ReferenceTables::embedded()?;
    for (table, topic, key) in [
        ("wards", "test.reference.wards", "ward_id"),
        ("sensors", "test.reference.sensors", "sensor_id"),
    ] {
        let file = dir.path().join(format!("{table}.csv"));
        std::fs::write(&file, built_in.get(table).expect("table").csv.as_bytes())?;
        urbanstream::cli::replay::replay(&urbanstream::cli::replay::ReplayArgs {
            key: Some(key.into()),
            ..urbanstream::cli::replay::ReplayArgs::new(file, topic, &brokers)
        })
        .await?;
    }
    let extra = "[reference.topics]\nwards = \"test.reference.wards\"\n\
                 sensors = \"test.reference.sensors\"\n";
    let service = service_with(&brokers, dir.path(), 2_000_000, extra).await?;
    let app = api::router(service.clone());
    let table = |name: &'static str| {
        let app = app.clone();
        async move {
            let (status, body) = call(
                &app,
                "GET",
                &format!("/v1/tables/{name}"),
                Some(TOKEN),
                None,
            )
            .await?;
            anyhow::ensure!(status == StatusCode::OK, "{body}");
            Ok::<Value, anyhow::Error>(body)
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while table("sensors").await?["follows"]["loaded"] != true
        || table("wards").await?["follows"]["loaded"] != true
    {
        anyhow::ensure!(Instant::now() < deadline, "the topics were not read");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = table("sensors").await?;
    // A query may not write the table's topic: its rows would become every query's sensors.
    let (status, body) = call(
        &app,
        "POST",
        "/v1/queries/validate",
        Some(TOKEN),
        Some(
            json!({"sql": "CREATE EXTERNAL TABLE poison (sensor_id VARCHAR NOT NULL, \
            ward_id VARCHAR NOT NULL) STORED AS KAFKA OPTIONS ('topic' 'test.reference.sensors', \
            'format' 'json', 'key' 'sensor_id'); \
            INSERT INTO poison SELECT sensor_id, ward_id FROM air_readings"}),
        ),
    )
    .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body.to_string().contains(
            "poison writes to test.reference.sensors, the topic reference table sensors is kept \
             current from"
        ),
        "{body}"
    );
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()?;
    let send = |topic: &'static str, key: &'static str, value: Value| {
        let producer = producer.clone();
        async move {
            let value = value.to_string();
            producer
                .send(
                    FutureRecord::to(topic).key(key).payload(&value),
                    Duration::from_secs(10),
                )
                .await
                .map(|_| ())
                .map_err(|(e, _)| anyhow::anyhow!("{e}"))
        }
    };
    send(
        "test.reference.sensors",
        "st-new",
        json!({"sensor_id": "st-new", "ward_id": "new_ward", "kind": "station",
               "lat": 21.0, "lon": 105.8, "interval_s": 3600}),
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t = table("sensors").await?;
        if t["follows"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("new_ward"))
        {
            assert_eq!(t["version"], before["version"], "{t}");
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "no refusal shown: {t}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    send(
        "test.reference.wards",
        "new_ward",
        json!({"ward_id": "new_ward", "name": "Phường Mới", "lat": 21.0, "lon": 105.8}),
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t = table("sensors").await?;
        if t["version"] != before["version"] {
            assert!(t["follows"]["error"].is_null(), "{t}");
            assert_eq!(
                t["rows"].as_u64(),
                before["rows"].as_u64().map(|r| r + 1),
                "{t}"
            );
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "never installed: {t}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    service.shutdown().await;
    Ok(())
}

/// Vehicles per (segment, window start) of [`produce_events`] batches `(t0, n)`.
fn expected_counts(batches: &[(i64, usize)]) -> std::collections::BTreeMap<(String, i64), u64> {
    let mut out = std::collections::BTreeMap::new();
    for (t0, n) in batches {
        for i in 0..*n {
            let t = t0 + i as i64 * 1000;
            *out.entry((format!("seg-{}", i % 4), t - t.rem_euclid(60_000)))
                .or_default() += 1;
        }
    }
    out
}

/// The next `n` records of `consumer` as (segment, window start) → count.
async fn next_counts(
    consumer: &rdkafka::consumer::StreamConsumer,
    n: usize,
) -> anyhow::Result<std::collections::BTreeMap<(String, i64), u64>> {
    Ok(next_records(consumer, n)
        .await?
        .iter()
        .map(|v| {
            (
                (
                    v["segment_id"].as_str().unwrap_or_default().to_string(),
                    v["window_start"].as_i64().unwrap_or_default(),
                ),
                v["n"].as_u64().unwrap_or_default(),
            )
        })
        .collect())
}

/// A query keeps its state across an upgrade of its SQL, refuses SQL its state does not fit
/// (and goes on as it was), and is taken back to a savepoint: the window open across the
/// upgrade counts the events from before and after it, and after going back to the savepoint
/// the same window is computed again from the savepoint's state and positions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_is_upgraded_with_its_state_and_taken_back_to_a_savepoint() -> anyhow::Result<()> {
    let (_broker, brokers, _dir, service, app) = counting_service().await?;
    let out = reader(&brokers, "reader-upgrade", "test.counts")?;
    let t0 = 1_767_222_000_000;
    produce_events(&brokers, t0, 90, 10).await?;
    wait_for(&app, "counts", Duration::from_secs(30), |q| {
        q["rows_in"] == 90
    })
    .await?;
    // Minute 0 closes; minute 1 holds 30 events in the query's state.
    let first = next_counts(&out, 4).await?;
    let expected = expected_counts(&[(t0, 90)]);
    for (window, n) in &first {
        assert_eq!(window.1, t0, "{first:?}");
        assert_eq!(Some(n), expected.get(window), "{first:?}");
    }

    let (status, saved) = call(
        &app,
        "POST",
        "/v1/queries/counts/savepoints",
        Some(TOKEN),
        Some(json!({"savepoint": "before"})),
    )
    .await?;
    assert_eq!(status, StatusCode::CREATED, "{saved}");
    assert_eq!(saved["name"], "before");
    assert_eq!(saved["sql"], per_minute("counts"));
    // One store per input partition (the query groups by the topic's key).
    assert_eq!(saved["stores"].as_array().map(Vec::len), Some(2), "{saved}");
    let (status, again) = call(
        &app,
        "POST",
        "/v1/queries/counts/savepoints",
        Some(TOKEN),
        Some(json!({"savepoint": "before"})),
    )
    .await?;
    assert_eq!(status, StatusCode::CONFLICT, "{again}");
    let (status, listed) = call(
        &app,
        "GET",
        "/v1/queries/counts/savepoints",
        Some(TOKEN),
        None,
    )
    .await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    wait_for(&app, "counts", Duration::from_secs(30), is("RUNNING")).await?;

    // An upgrade of nothing (no SQL, no savepoint) is refused: it answered 200.
    let (status, refused) = call(
        &app,
        "POST",
        "/v1/queries/counts/upgrade",
        Some(TOKEN),
        Some(json!({})),
    )
    .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .is_some_and(|m| m.contains("an upgrade needs \"sql\"")),
        "{refused}"
    );

    // Another aggregate: the state does not fit, the query goes on unchanged.
    let distinct = per_minute("counts").replace("count(*)", "count(DISTINCT camera_id)");
    let (status, refused) = call(
        &app,
        "POST",
        "/v1/queries/counts/upgrade",
        Some(TOKEN),
        Some(json!({"sql": distinct})),
    )
    .await?;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    let message = refused["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("the state holds") && message.contains("count(DISTINCT"),
        "{message}"
    );
    let q = wait_for(&app, "counts", Duration::from_secs(5), is("RUNNING")).await?;
    assert_eq!(q["sql"], per_minute("counts"));
    // Another output topic, declared beside the same INSERT: refused too (it was taken as
    // the same SQL, and the state went on into the other topic).
    let moved = per_minute("counts").replace("'topic' 'test.counts'", "'topic' 'test.counts2'");
    let (status, refused) = call(
        &app,
        "POST",
        "/v1/queries/counts/upgrade",
        Some(TOKEN),
        Some(json!({"sql": moved})),
    )
    .await?;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    let message = refused["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("\"writes test.counts\" where the new SQL needs \"writes test.counts2\""),
        "{message}"
    );
    let q = wait_for(&app, "counts", Duration::from_secs(5), is("RUNNING")).await?;
    assert_eq!(q["sql"], per_minute("counts"));
    let (status, missing) = call(
        &app,
        "POST",
        "/v1/queries/counts/upgrade",
        Some(TOKEN),
        Some(json!({"savepoint": "never-taken"})),
    )
    .await?;
    assert_eq!(status, StatusCode::NOT_FOUND, "{missing}");
    // A damaged savepoint (a file of its state cut short) is refused before anything of the
    // query's changes: it keeps running on its own state (it was stopped, its state replaced
    // in part, and left FAILED). A description that does not read is listed as damaged.
    let (status, saved) = call(
        &app,
        "POST",
        "/v1/queries/counts/savepoints",
        Some(TOKEN),
        Some(json!({"savepoint": "cut"})),
    )
    .await?;
    assert_eq!(status, StatusCode::CREATED, "{saved}");
    let cut = _dir.path().join("data/checkpoints/_savepoints/counts/cut");
    let mut cut_files = 0;
    let mut dirs = vec![cut.clone()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "arrow") {
                let bytes = std::fs::read(&path)?;
                std::fs::write(&path, &bytes[..bytes.len() / 2])?;
                cut_files += 1;
            }
        }
    }
    assert!(cut_files > 0, "the savepoint holds state");
    let (status, refused) = call(
        &app,
        "POST",
        "/v1/queries/counts/upgrade",
        Some(TOKEN),
        Some(json!({"savepoint": "cut"})),
    )
    .await?;
    assert_eq!(status, StatusCode::CONFLICT, "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .is_some_and(|m| m.contains("savepoint cut of query counts is damaged")
                && m.contains("does not read back whole")),
        "{refused}"
    );
    let q = wait_for(&app, "counts", Duration::from_secs(60), |q| {
        q["state"] != "STARTING"
    })
    .await?;
    assert_eq!(q["state"], "RUNNING", "{q}");
    std::fs::write(cut.join("savepoint.json"), "{")?;
    let (status, listed) = call(
        &app,
        "GET",
        "/v1/queries/counts/savepoints",
        Some(TOKEN),
        None,
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{listed}");
    let damaged: Vec<&str> = listed
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["damaged"].is_string())
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(damaged, ["cut"], "{listed}");

    // A filter added: the state carries over.
    let filtered = per_minute("counts").replace(
        "FROM camera_events GROUP BY",
        "FROM camera_events WHERE vehicle_class <> 'bus' GROUP BY",
    );
    let (status, upgraded) = call(
        &app,
        "POST",
        "/v1/queries/counts/upgrade",
        Some(TOKEN),
        Some(json!({"sql": filtered})),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{upgraded}");
    assert_eq!(upgraded["sql"], filtered);
    wait_for(&app, "counts", Duration::from_secs(30), is("RUNNING")).await?;
    produce_events(&brokers, t0 + 90_000, 60, 10).await?;
    // Minute 1 closes with the events read before the upgrade and after it.
    let expected = expected_counts(&[(t0, 90), (t0 + 90_000, 60)]);
    let minute = next_counts(&out, 4).await?;
    for (window, n) in &minute {
        assert_eq!(window.1, t0 + 60_000, "{minute:?}");
        assert_eq!(
            Some(n),
            expected.get(window),
            "state lost in the upgrade: {minute:?}"
        );
    }

    // Back to the savepoint: minute 1 is computed again from the state it had then, and
    // the events read since are read again.
    let (status, back) = call(
        &app,
        "POST",
        "/v1/queries/counts/upgrade",
        Some(TOKEN),
        Some(json!({"savepoint": "before"})),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{back}");
    let again = next_counts(&out, 4).await?;
    assert_eq!(again, minute);
    let q = wait_for(&app, "counts", Duration::from_secs(30), |q| {
        q["state"] == "RUNNING" && q["rows_in"] == 60
    })
    .await?;
    assert_eq!(q["sql"], filtered);
    service.shutdown().await;
    Ok(())
}

/// An upgrade of a query of several statements keeps its statements in their order: state is
/// restored statement by statement, so SQL that swaps, adds or removes statements is refused
/// with the reason (swapped statements were accepted and the query then failed to restore),
/// and SQL that keeps them in order carries their state over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_keeps_the_statements_of_a_query_in_their_order() -> anyhow::Result<()> {
    let broker = broker()?;
    let brokers = broker.bootstrap_servers();
    let dir = tempfile::tempdir()?;
    let service = service(&brokers, dir.path()).await?;
    let app = api::router(service.clone());
    let tables = "CREATE EXTERNAL TABLE pair_counts (segment_id VARCHAR NOT NULL, \
            window_start TIMESTAMP NOT NULL, window_end TIMESTAMP NOT NULL, n BIGINT NOT NULL) \
         STORED AS KAFKA OPTIONS ('topic' 'test.pair.counts', 'format' 'json', 'key' 'segment_id');
         CREATE EXTERNAL TABLE pair_speeds (segment_id VARCHAR NOT NULL, \
            window_start TIMESTAMP NOT NULL, window_end TIMESTAMP NOT NULL, v DOUBLE) \
         STORED AS KAFKA OPTIONS ('topic' 'test.pair.speeds', 'format' 'json', 'key' 'segment_id');";
    let counts = |filter: &str| {
        format!(
            "INSERT INTO pair_counts SELECT segment_id, window_start, window_end, count(*) AS n \
             FROM camera_events {filter} GROUP BY tumble(event_time, INTERVAL '1 minute'), \
             segment_id;"
        )
    };
    let speeds = |filter: &str| {
        format!(
            "INSERT INTO pair_speeds SELECT segment_id, window_start, window_end, \
             max(speed_kmh) AS v FROM camera_events {filter} GROUP BY \
             tumble(event_time, INTERVAL '1 minute'), segment_id;"
        )
    };
    let sql = format!("{tables}\n{}\n{}", counts(""), speeds(""));
    create(&app, "pair", &sql).await?;
    let t0 = 1_767_222_000_000;
    produce_events(&brokers, t0, 90, 10).await?;
    wait_for(&app, "pair", Duration::from_secs(30), |q| {
        q["rows_in"] == 90 && !q["last_checkpoint"].is_null()
    })
    .await?;

    let upgrade = |sql: String| {
        let app = app.clone();
        async move {
            call(
                &app,
                "POST",
                "/v1/queries/pair/upgrade",
                Some(TOKEN),
                Some(json!({"sql": sql})),
            )
            .await
        }
    };
    let refusals = [
        (
            format!("{tables}\n{}\n{}", speeds(""), counts("")),
            "statement 1",
        ),
        (
            format!(
                "{tables}\n{}\n{}\n{}",
                counts(""),
                speeds(""),
                counts("WHERE speed_kmh > 1")
            ),
            "3 stream statements",
        ),
        (format!("{tables}\n{}", counts("")), "1 stream statement"),
    ];
    for (new, reason) in refusals {
        let (status, refused) = upgrade(new.clone()).await?;
        assert_eq!(status, StatusCode::CONFLICT, "{new}: {refused}");
        let message = refused["message"].as_str().unwrap_or_default();
        assert!(message.contains(reason), "{reason}: {message}");
        assert!(!message.contains("repartitioned"), "{message}");
        let q = wait_for(&app, "pair", Duration::from_secs(30), is("RUNNING")).await?;
        assert_eq!(q["sql"], sql.as_str(), "{q}");
    }
    // In their order, each with a filter added: both states carry over and the query runs.
    let filtered = format!(
        "{tables}\n{}\n{}",
        counts("WHERE vehicle_class <> 'bus'"),
        speeds("WHERE vehicle_class <> 'bus'")
    );
    let (status, upgraded) = upgrade(filtered.clone()).await?;
    assert_eq!(status, StatusCode::OK, "{upgraded}");
    let q = wait_for(&app, "pair", Duration::from_secs(30), |q| {
        q["state"] == "RUNNING" && q["sql"] == filtered.as_str()
    })
    .await?;
    assert!(q["error"].is_null(), "{q}");
    service.shutdown().await;
    Ok(())
}

/// A query with a statement kept per partition and a repartitioned one, registered as its
/// input topic is created: the repartitioned statement counts every event, none late. Its
/// second stage waited for the one input partition the missing topic was counted as when the
/// pipeline planned it, and the other three partitions' events, passed on after the first's
/// progress, were late (or the test timed out waiting for exact windows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repartitioned_query_registered_before_its_input_exists_counts_every_event()
-> anyhow::Result<()> {
    let broker = broker()?;
    let brokers = broker.bootstrap_servers();
    broker.create_topic("test.fresh.camera", 1)?;
    let dir = tempfile::tempdir()?;
    let service = service(&brokers, dir.path()).await?;
    let app = api::router(service.clone());
    let sql = "CREATE EXTERNAL TABLE fresh_cam (camera_id VARCHAR NOT NULL, \
            segment_id VARCHAR NOT NULL, event_time TIMESTAMP NOT NULL, kind VARCHAR, \
            vehicle_class VARCHAR, speed_kmh DOUBLE, confidence DOUBLE) \
         STORED AS KAFKA OPTIONS ('topic' 'test.fresh.cam', 'format' 'json', \
            'event_time' 'event_time', 'key' 'segment_id', 'watermark_delay' '1s');
         CREATE EXTERNAL TABLE fresh_seg (segment_id VARCHAR NOT NULL, \
            window_start TIMESTAMP NOT NULL, n BIGINT NOT NULL) \
         STORED AS KAFKA OPTIONS ('topic' 'test.fresh.seg', 'format' 'json', 'key' 'segment_id');
         CREATE EXTERNAL TABLE fresh_by_camera (camera_id VARCHAR NOT NULL, \
            window_start TIMESTAMP NOT NULL, n BIGINT NOT NULL) \
         STORED AS KAFKA OPTIONS ('topic' 'test.fresh.camera', 'format' 'json', \
            'key' 'camera_id');
         INSERT INTO fresh_seg SELECT segment_id, window_start, count(*) AS n FROM fresh_cam \
         GROUP BY tumble(event_time, INTERVAL '1 minute'), segment_id;
         INSERT INTO fresh_by_camera SELECT camera_id, window_start, count(*) AS n \
         FROM fresh_cam GROUP BY tumble(event_time, INTERVAL '1 minute'), camera_id";
    create(&app, "fresh", sql).await?;
    // Created as the query starts: the pipeline found no input partitions when it planned
    // the repartitioned statement, and its consumer finds four.
    tokio::time::sleep(Duration::from_millis(50)).await;
    broker.create_topic("test.fresh.cam", 4)?;
    let out = reader(&brokers, "reader-fresh", "test.fresh.camera")?;
    // Once the query holds the new topic's partitions: four minutes, one event a second,
    // event i to partition i % 4, partition 0's first (its progress reaches the second stage
    // before the others' events do); then one event a little later on each partition closes
    // the fourth minute.
    wait_for(&app, "fresh", Duration::from_secs(120), |q| {
        q["assigned_partitions"].as_u64() >= Some(5)
    })
    .await?;
    let t0 = 1_767_222_000_000;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("linger.ms", "5")
        .create()?;
    let event = |i: i64| {
        json!({
            "camera_id": format!("cam-{}", i % 10), "segment_id": format!("seg-{}", i % 4),
            "event_time": t0 + i * 1000, "kind": "detection", "vehicle_class": "motorbike",
            "speed_kmh": 30.0, "confidence": 0.9
        })
        .to_string()
    };
    for first in [true, false] {
        for i in (0..240).chain(250..254) {
            if (i % 4 == 0) != first {
                continue;
            }
            producer
                .send(
                    FutureRecord::<(), String>::to("test.fresh.cam")
                        .partition((i % 4) as i32)
                        .payload(&event(i)),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)?;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let records = next_records(&out, 40).await?;
    let mut counts: std::collections::BTreeMap<(String, i64), u64> = Default::default();
    for r in &records {
        let key = (
            r["camera_id"].as_str().unwrap_or_default().to_string(),
            r["window_start"].as_i64().unwrap_or_default(),
        );
        *counts.entry(key).or_default() += r["n"].as_u64().unwrap_or_default();
    }
    let expected: std::collections::BTreeMap<(String, i64), u64> = (0..10)
        .flat_map(|c| (0..4).map(move |m| ((format!("cam-{c}"), t0 + m * 60_000), 6)))
        .collect();
    assert_eq!(counts, expected, "{records:?}");
    let q = wait_for(&app, "fresh", Duration::from_secs(10), |q| {
        q["rows_in"] == 244
    })
    .await?;
    assert_eq!(q["late"], 0, "{q}");
    service.shutdown().await;
    Ok(())
}

/// A query writes neither where its records come back to it (itself, or through another
/// query: one record made a million in seconds with `unnest`), nor into the city's inputs,
/// the DLQ or the late topic; a topic's name is one Kafka takes and not the broker's own (a
/// topic named `../../x` put its checkpoints outside the checkpoint directory), nor records
/// another query reading or writing their topic declares otherwise. Each refusal says why and
/// what to write; validate, create and upgrade refuse alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_writes_nowhere_its_records_come_back_from_or_the_city_trusts() -> anyhow::Result<()>
{
    let broker = broker()?;
    let dir = tempfile::tempdir()?;
    let service = service(&broker.bootstrap_servers(), dir.path()).await?;
    let app = api::router(service.clone());
    let table = |name: &str, topic: &str| {
        format!(
            "CREATE EXTERNAL TABLE {name} (id VARCHAR NOT NULL, event_time TIMESTAMP NOT NULL, \
             n BIGINT) STORED AS KAFKA OPTIONS ('topic' '{topic}', 'format' 'json', \
             'event_time' 'event_time', 'key' 'id');"
        )
    };
    let copy =
        |from: &str, to: &str| format!("INSERT INTO {to} SELECT id, event_time, n FROM {from}");
    let refused = |sql: String, words: Vec<String>| {
        let app = app.clone();
        async move {
            for (path, request) in [
                ("/v1/queries/validate", json!({"sql": sql})),
                ("/v1/queries", json!({"name": "loop", "sql": sql})),
            ] {
                let (status, body) = call(&app, "POST", path, Some(TOKEN), Some(request)).await?;
                anyhow::ensure!(status == StatusCode::BAD_REQUEST, "{path}: {status} {body}");
                let message = body["message"].as_str().unwrap_or_default();
                anyhow::ensure!(
                    words.iter().all(|w| message.contains(w.as_str())),
                    "{path}: {message} lacks {words:?}"
                );
            }
            anyhow::Ok(())
        }
    };
    // Into itself, doubled by unnest.
    refused(
        format!(
            "{} INSERT INTO l SELECT id, event_time, unnest(make_array(n + 1, n + 1)) AS n FROM l",
            table("l", "test.loop")
        ),
        vec!["test.loop".into(), "reads itself".into()],
    )
    .await?;
    // Into the city's inputs, the DLQ, the late topic.
    for topic in [
        "city.camera.events",
        "city.air.readings",
        "city.parking.readings",
    ] {
        refused(
            format!(
                "{} {} {}",
                table("l", "test.in"),
                table("forged", topic),
                copy("l", "forged")
            ),
            vec![topic.into(), "input of the city".into()],
        )
        .await?;
    }
    for topic in ["city.dlq", "city.late"] {
        refused(
            format!(
                "{} {} {}",
                table("l", "test.in"),
                table("d", topic),
                copy("l", "d")
            ),
            vec![topic.into(), "only the engine writes".into()],
        )
        .await?;
    }
    // The platform's topics beside the broker, and a city output topic declared with other
    // columns than the city's schema of it (its consumers read it by that schema).
    for (topic, words) in [
        ("_schemas", vec!["_schemas", "begins with '_'"]),
        ("_confluent-metrics", vec!["begins with '_'"]),
        (
            "city.indicators.congestion",
            vec![
                "the city's congestion_indicators topic",
                "id is not a column of it",
                "its column segment_id is required",
                "INSERT INTO congestion_indicators",
            ],
        ),
        (
            "city.alerts",
            vec!["the city's alerts topic", "n is not a column of it"],
        ),
    ] {
        refused(
            format!(
                "{} {} {}",
                table("l", "test.in"),
                table("o", topic),
                copy("l", "o")
            ),
            words.into_iter().map(String::from).collect(),
        )
        .await?;
    }
    // The city's columns, one of them declared nullable where the city's never is: its
    // consumers would dead-letter the rows with a null there.
    refused(
        format!(
            "{} CREATE EXTERNAL TABLE own_alerts (alert_id VARCHAR, state VARCHAR NOT NULL, \
             kind VARCHAR NOT NULL, entity_type VARCHAR NOT NULL, entity_id VARCHAR NOT NULL, \
             started_at TIMESTAMP NOT NULL) STORED AS KAFKA OPTIONS ('topic' 'city.alerts'); \
             INSERT INTO own_alerts SELECT id AS alert_id, 'RAISED' AS state, 'test' AS kind, \
             'sensor' AS entity_type, id AS entity_id, event_time AS started_at FROM l",
            table("l", "test.in")
        ),
        vec!["alert_id is never null in it: declare it alert_id NOT NULL".into()],
    )
    .await?;
    // The same declared NOT NULL writes there, as does the city's own declaration.
    let (status, body) = call(
        &app,
        "POST",
        "/v1/queries/validate",
        Some(TOKEN),
        Some(json!({"sql": format!(
            "{} CREATE EXTERNAL TABLE own_alerts (alert_id VARCHAR NOT NULL, state VARCHAR NOT \
             NULL, kind VARCHAR NOT NULL, entity_type VARCHAR NOT NULL, entity_id VARCHAR NOT \
             NULL, started_at TIMESTAMP NOT NULL, message VARCHAR) STORED AS KAFKA OPTIONS \
             ('topic' 'city.alerts'); INSERT INTO own_alerts SELECT id AS alert_id, 'RAISED' AS \
             state, 'test' AS kind, 'sensor' AS entity_type, id AS entity_id, event_time AS \
             started_at, 'a test' AS message FROM l",
            table("l", "test.in")
        )})),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let city = format!(
        "{} INSERT INTO alerts SELECT id AS alert_id, 'RAISED' AS state, 'test' AS kind, \
         'sensor' AS entity_type, id AS entity_id, event_time AS started_at FROM l",
        table("l", "test.in")
    );
    let (status, body) = call(
        &app,
        "POST",
        "/v1/queries/validate",
        Some(TOKEN),
        Some(json!({"sql": city})),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Names Kafka does not take, and the broker's own topics.
    for (topic, word) in [
        ("../../escaped", "not a Kafka topic name"),
        ("/tmp/absolute", "not a Kafka topic name"),
        ("..", "not a Kafka topic name"),
        ("__consumer_offsets", "internal to the broker"),
    ] {
        let words = vec![word.to_string()];
        refused(
            format!(
                "{} {} {}",
                table("s", topic),
                table("o", "test.out"),
                copy("s", "o")
            ),
            words,
        )
        .await?;
    }
    // Through another query: a → (first) → b, then b → a.
    let first = format!(
        "{} {} {}",
        table("a", "test.a"),
        table("b", "test.b"),
        copy("a", "b")
    );
    create(&app, "first", &first).await?;
    let back = format!(
        "{} {} {}",
        table("b", "test.b"),
        table("a", "test.a"),
        copy("b", "a")
    );
    refused(
        back,
        vec!["test.a".into(), "test.a → (first) → test.b".into()],
    )
    .await?;
    // A chain that does not come back is taken; so is the first query's upgrade that keeps
    // its own way, and refused one that would write into the chain's start.
    let on = format!(
        "{} {} {}",
        table("b", "test.b"),
        table("c", "test.c"),
        copy("b", "c")
    );
    create(&app, "second", &on).await?;
    let (status, body) = call(
        &app,
        "POST",
        "/v1/queries/first/upgrade",
        Some(TOKEN),
        Some(json!({"sql": first})),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = call(
        &app,
        "POST",
        "/v1/queries/second/upgrade",
        Some(TOKEN),
        Some(json!({"sql": format!("{} {} {}", table("b", "test.b"), table("a", "test.a"), copy("b", "a"))})),
    )
    .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("test.a → (first) → test.b")),
        "{body}"
    );
    // A topic another query writes or reads: what is written must read as its readers declare
    // it (each record would go to their DLQ otherwise), and as the query already writing it
    // declares it. `first` writes test.b, `second` reads it and writes test.c.
    let typed = |name: &str, topic: &str, columns: &str| {
        format!(
            "CREATE EXTERNAL TABLE {name} ({columns}) STORED AS KAFKA OPTIONS ('topic' \
             '{topic}', 'format' 'json', 'event_time' 'event_time', 'key' 'id');"
        )
    };
    refused(
        format!(
            "{} {} INSERT INTO b SELECT id, event_time, CAST(n AS VARCHAR) AS n FROM l",
            table("l", "test.in"),
            typed(
                "b",
                "test.b",
                "id VARCHAR NOT NULL, event_time TIMESTAMP NOT NULL, n VARCHAR"
            ),
        ),
        vec![
            "b writes to test.b, which".into(),
            "n is written as Utf8".into(),
            "read as Int64".into(),
        ],
    )
    .await?;
    refused(
        format!(
            "{} {} {}",
            typed(
                "c",
                "test.c",
                "id VARCHAR NOT NULL, event_time TIMESTAMP NOT NULL, speed DOUBLE NOT NULL"
            ),
            table("o", "test.out"),
            "INSERT INTO o SELECT id, event_time, CAST(speed AS BIGINT) AS n FROM c"
        ),
        vec![
            "c reads test.c, which second writes as table c".into(),
            "speed is required there and not written".into(),
        ],
    )
    .await?;
    refused(
        format!(
            "{} {} {} {}",
            table("l", "test.in"),
            table("x", "test.x"),
            typed(
                "y",
                "test.x",
                "id VARCHAR NOT NULL, event_time TIMESTAMP NOT NULL, n BIGINT NOT NULL"
            ),
            "INSERT INTO x SELECT id, event_time, n FROM l; \
             INSERT INTO o2 SELECT id, event_time, n FROM y"
                .replace(
                    "INSERT INTO o2",
                    &format!("{} INSERT INTO o2", table("o2", "test.out")),
                ),
        ),
        vec![
            "test.x".into(),
            "this query".into(),
            "n is never null there and may be null as written".into(),
        ],
    )
    .await?;
    // Fewer columns read, a number read as a wider one (BIGINT as DOUBLE, as the decoders
    // take it), and the same declaration written: taken.
    for sql in [
        format!(
            "{} {} INSERT INTO o SELECT id, event_time, CAST(n AS BIGINT) AS n FROM b",
            typed(
                "b",
                "test.b",
                "id VARCHAR NOT NULL, event_time TIMESTAMP NOT NULL, n DOUBLE"
            ),
            table("o", "test.out")
        ),
        format!(
            "{} {} INSERT INTO o SELECT id, event_time, 1 AS n FROM c",
            typed(
                "c",
                "test.c",
                "id VARCHAR NOT NULL, event_time TIMESTAMP NOT NULL"
            ),
            table("o", "test.out")
        ),
        format!(
            "{} {} {}",
            table("l", "test.in"),
            table("b", "test.b"),
            copy("l", "b")
        ),
    ] {
        let (status, body) = call(
            &app,
            "POST",
            "/v1/queries/validate",
            Some(TOKEN),
            Some(json!({ "sql": sql })),
        )
        .await?;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    service.shutdown().await;
    Ok(())
}

/// A query's consumer lag is known when some of its input partitions are empty: nothing read
/// from them left their position unset, and the lag was null for good (so was its metric).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_lag_is_known_with_empty_partitions() -> anyhow::Result<()> {
    let broker = broker()?;
    let dir = tempfile::tempdir()?;
    let service = service(&broker.bootstrap_servers(), dir.path()).await?;
    let app = api::router(service.clone());
    create(&app, "lagged", &per_minute("lagged")).await?;
    wait_for(&app, "lagged", Duration::from_secs(20), is("RUNNING")).await?;
    // Every event to partition 0 of four.
    produce_events_to(
        &broker.bootstrap_servers(),
        1_767_222_000_000,
        50,
        3,
        Some(1),
    )
    .await?;
    wait_for(&app, "lagged", Duration::from_secs(30), |q| {
        q["rows_in"] == 50
    })
    .await?;
    // Measured every second: once everything is read, none.
    wait_for(&app, "lagged", Duration::from_secs(30), |q| {
        q["consumer_lag"] == 0
    })
    .await?;
    service.shutdown().await;
    Ok(())
}
