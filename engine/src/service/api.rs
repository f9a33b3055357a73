//! The REST API (axum).
//!
//! | method | path | does |
//! |---|---|---|
//! | GET | `/livez` | 200 while the process serves requests (always open) |
//! | GET | `/` | the web console: city map, alerts, queries, SQL editor (always open; its calls need the token) |
//! | GET | `/v1/city/map`, `/v1/city`, `/v1/city/events` | the city's geometry, what the output topics say now, and that as server-sent events (see [`crate::dashboard`]) |
//! | GET | `/readyz` | 200 when Kafka is reachable and every query that should run runs, else 503 |
//! | GET | `/metrics` | Prometheus exposition |
//! | GET | `/v1/info` | version, build, brokers, configuration with secrets redacted |
//! | GET | `/v1/queries` | every query's status |
//! | POST | `/v1/queries` | `{"name", "sql", "memory_limit"?}`: validate, register, start (201) |
//! | POST | `/v1/queries/validate` | `{"sql"}`: plan without registering (200 or 400) |
//! | POST | `/v1/queries/preview` | `{"sql", "input": {"format": "csv"\|"jsonl"\|"parquet", "data" (Parquet: base64), "rename"?, "time_zone"?, "time_unit"?}` or `"topic": {…}, "limit"?}`: run the query over the rows given or a range of its topic, unregistered (in its memory pool, within `api.preview_timeout`, body up to `api.max_preview_body`, two at a time, admin token): the first rows and the counts of rejected, unreadable and late rows |
//! | POST | `/v1/queries/explain` | `{"sql"}`: how its stream queries would run: stages, state, partitioning, emission |
//! | GET | `/v1/queries/{name}` | one query's status |
//! | DELETE | `/v1/queries/{name}` | stop and forget a registered query (204) |
//! | POST | `/v1/queries/{name}/pause`, `/resume`, `/restart` | change its state |
//! | POST | `/v1/queries/{name}/reset` | remove its state and start it afresh from its inputs' beginning |
//! | POST | `/v1/queries/{name}/upgrade` | `{"sql"?, "savepoint"?}`: new SQL that keeps the query's state, or the query taken back to a savepoint (with its SQL or new SQL); 409 naming what does not fit when the state cannot carry over |
//! | POST | `/v1/queries/{name}/savepoints` | `{"savepoint"}`: keep the query's state under a name (it stops for the copy and goes on) (201) |
//! | GET | `/v1/queries/{name}/savepoints` | the savepoints kept of a query (a dropped one's too) |
//! | GET | `/v1/tables`, `/v1/tables/{name}` | the tables SQL can use: streams (topic, event time, watermark delay, key) and reference tables, with their columns |
//! | GET | `/v1/tables/{name}/rows` | a reference table's current version as CSV (header `x-urbanstream-version`) |
//! | PUT | `/v1/tables/{name}/rows` | CSV body: the next version of a reference table (or a new one), checked, kept beside the catalog and read by every query from its next micro-batch; answers the table as `/v1/tables/{name}` does |
//! | GET | `/v1/functions` | the functions SQL can call (urbanstream's first) |
//!
//! Errors are JSON `{"message": …}` (with `"position": {"line", "column"}` for SQL the parser
//! refused): 400 bad request, 401 missing or wrong token, 404 unknown query or path, 405, 409
//! duplicate name / query limit / dropping a built-in query, 413 body over `api.max_body`, 415
//! not sent as JSON, 422 a JSON body with a field missing or of the wrong type, 500. With `api.token` set, every path but `/livez` and the console's page and
//! assets (`/`, `/ui/*`) needs `Authorization: Bearer <token>`. A change (any method but GET)
//! sent by a page of another origin is refused (403), token or not, and an API listening on
//! the loopback answers only requests for a loopback host (no DNS rebinding).

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::Service;
use super::manager::{
    FunctionInfo, PlannedStatement, PreviewAnswer, PreviewRequest, QueryStatus, SavepointRequest,
    ServiceError, TableInfo, UpgradeRequest,
};
use crate::checkpoint::savepoint::Savepoint;

/// The API's routes over `service`.
pub fn router(service: Arc<Service>) -> Router {
    let max_body = usize::try_from(service.config.api.max_body.as_u64()).unwrap_or(usize::MAX);
    let max_preview_body =
        usize::try_from(service.config.api.max_preview_body.as_u64()).unwrap_or(usize::MAX);
    let v1 = Router::new()
        .route("/info", get(info))
        .route("/queries", get(list).post(create))
        .route("/queries/validate", post(validate))
        .route("/queries/explain", post(explain))
        .route(
            "/queries/preview",
            post(preview).layer(DefaultBodyLimit::max(max_preview_body)),
        )
        .route("/queries/{name}", get(show).delete(drop_query))
        .route("/queries/{name}/pause", post(pause))
        .route("/queries/{name}/resume", post(resume))
        .route("/queries/{name}/restart", post(restart))
        .route("/queries/{name}/reset", post(reset))
        .route("/queries/{name}/upgrade", post(upgrade))
        .route(
            "/queries/{name}/savepoints",
            get(savepoints).post(take_savepoint),
        )
        .route("/tables", get(tables))
        .route("/tables/{name}", get(table).delete(remove_table))
        .route(
            "/tables/{name}/rows",
            get(table_rows)
                .put(replace_table_rows)
                .layer(DefaultBodyLimit::max(
                    crate::reference::tables::MAX_CSV_BYTES,
                )),
        )
        .route("/functions", get(functions))
        .merge(crate::dashboard::city_routes(service.city.clone()));
    let guarded = Router::new()
        .nest("/v1", v1)
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(service.clone(), authorize));
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .merge(crate::dashboard::console_routes())
        .merge(guarded)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such path") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed on this path",
            )
        })
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(service)
}

/// Why a request that a web page may have sent on a visitor's behalf is refused, if it is:
/// a change (not GET or HEAD) from another origin (`Origin` other than the `Host` asked, or
/// `Sec-Fetch-Site` other than same-origin or none), or any request naming a host other than
/// the loopback when the API listens there (a DNS-rebinding page). Programs such as the CLI
/// and curl send neither header and are not refused.
pub(crate) fn foreign(
    headers: &HeaderMap,
    method: &axum::http::Method,
    listen: std::net::SocketAddr,
) -> Option<&'static str> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let host = header("host");
    if listen.ip().is_loopback()
        && let Some(host) = host
    {
        let name = host
            .rsplit_once(':')
            .filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit()))
            .map_or(host, |(name, _)| name);
        let name = name.trim_start_matches('[').trim_end_matches(']');
        let loopback = name.eq_ignore_ascii_case("localhost")
            || name
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !loopback {
            return Some(
                "this API listens on the loopback and answers only requests for localhost or 127.0.0.1 (the Host header names another host)",
            );
        }
    }
    let changes = !matches!(*method, axum::http::Method::GET | axum::http::Method::HEAD);
    if !changes {
        return None;
    }
    let cross_site = header("sec-fetch-site").is_some_and(|s| s != "same-origin" && s != "none");
    let other_origin = header("origin").is_some_and(|origin| {
        let authority = origin
            .split_once("://")
            .map_or(origin, |(_, rest)| rest)
            .trim_end_matches('/');
        host.is_none_or(|h| !h.eq_ignore_ascii_case(authority))
    });
    (cross_site || other_origin).then_some(
        "a change requested by a page of another origin is refused (use the console served by this API, the CLI, or a client that sends no Origin header)",
    )
}

/// An error response: a status and `{"message": …}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    position: Option<(u64, u64)>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            position: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "message": self.message });
        if let Some((line, column)) = self.position {
            body["position"] = json!({ "line": line, "column": column });
        }
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED
            && let Ok(v) = header::HeaderValue::from_str("Bearer realm=\"urbanstream\"")
        {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        response
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Invalid { message, position } => Self {
                status: StatusCode::BAD_REQUEST,
                message,
                position,
            },
            ServiceError::NotFound(m) => Self::new(StatusCode::NOT_FOUND, m),
            ServiceError::Conflict(m) => Self::new(StatusCode::CONFLICT, m),
            ServiceError::Internal(m) => Self::new(StatusCode::INTERNAL_SERVER_ERROR, m),
            ServiceError::Busy(m) => Self::new(StatusCode::SERVICE_UNAVAILABLE, m),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let status = rejection.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "request body too large (api.max_body)".to_string()
        } else {
            rejection.body_text()
        };
        Self::new(status, message)
    }
}

/// Refuses requests without a configured bearer token: the admin token opens every path, the
/// read token only reads (GET, and validating SQL). The scheme is case-insensitive; tokens are
/// compared as SHA-256 digests in constant time.
async fn authorize(
    State(service): State<Arc<Service>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let api = &service.config.api;
    if let Some(why) = foreign(&headers, request.method(), api.listen) {
        return ApiError::new(StatusCode::FORBIDDEN, why).into_response();
    }
    if api.token.is_empty() && api.read_token.is_empty() {
        return next.run(request).await;
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer);
    let Some(given) = given else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing bearer token (Authorization: Bearer <token>)",
        )
        .into_response();
    };
    let reads = matches!(
        *request.method(),
        axum::http::Method::GET | axum::http::Method::HEAD
    ) || matches!(
        request.uri().path(),
        "/v1/queries/validate" | "/v1/queries/explain"
    );
    if !api.token.is_empty() && same_token(given, &api.token) {
        next.run(request).await
    } else if !api.read_token.is_empty() && same_token(given, &api.read_token) {
        if reads {
            next.run(request).await
        } else {
            ApiError::new(
                StatusCode::FORBIDDEN,
                "the read token may only read (GET, HEAD) and validate; changes need api.token",
            )
            .into_response()
        }
    } else {
        ApiError::new(StatusCode::UNAUTHORIZED, "wrong bearer token").into_response()
    }
}

/// The token of an `Authorization` value with the `Bearer` scheme, in any case.
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(char::is_whitespace)?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Whether `given` is `token`: their SHA-256 digests compared in time that depends on neither
/// the tokens' lengths nor where they differ.
fn same_token(given: &str, token: &str) -> bool {
    use sha2::{Digest, Sha256};
    let (a, b) = (
        Sha256::digest(given.as_bytes()),
        Sha256::digest(token.as_bytes()),
    );
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

async fn readyz(State(service): State<Arc<Service>>) -> Response {
    let (ready, reason) = service.ready();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "ready": ready,
        "reason": reason,
        "kafka_reachable": service.kafka_reachable(),
        "queries": service.manager.counts(),
    });
    (status, Json(body)).into_response()
}

async fn metrics(State(service): State<Arc<Service>>) -> Response {
    let text = super::metrics::render(
        &service.manager.list(),
        &service.manager.counts(),
        service.kafka_reachable(),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn info(State(service): State<Arc<Service>>) -> Json<serde_json::Value> {
    let config = &service.config;
    Json(json!({
        "name": "urbanstream",
        "version": env!("CARGO_PKG_VERSION"),
        "build": {
            "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
            "target": format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS),
            "datafusion": datafusion::DATAFUSION_VERSION,
        },
        "brokers": config.kafka.brokers,
        "kafka_reachable": service.kafka_reachable(),
        "queries": service.manager.counts(),
        "config": config.redacted(),
    }))
}

/// Body of `POST /v1/queries`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CreateQuery {
    /// Name: 1 to 64 of `[A-Za-z0-9_-]`, starting with a letter.
    pub name: String,
    /// SQL.
    pub sql: String,
    /// Memory pool in bytes, instead of `queries.memory_limit`.
    #[serde(default)]
    pub memory_limit: Option<u64>,
}

/// Body of `POST /v1/queries/validate`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ValidateQuery {
    /// SQL.
    pub sql: String,
}

async fn explain(
    State(service): State<Arc<Service>>,
    body: Result<Json<ValidateQuery>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(body) = body?;
    let plans = service.manager.explain(&body.sql).await?;
    Ok(Json(json!({ "queries": plans })))
}

async fn preview(
    State(service): State<Arc<Service>>,
    request: Request,
) -> Result<Json<PreviewAnswer>, ApiError> {
    // A turn first, then the body (up to `api.max_preview_body`): requests refused for want
    // of a turn never read theirs.
    let slot = service.manager.preview_slot()?;
    let Json(body) = Json::<PreviewRequest>::from_request(request, &service).await?;
    Ok(Json(service.manager.preview(body, slot).await?))
}

async fn tables(State(service): State<Arc<Service>>) -> Result<Json<Vec<TableInfo>>, ApiError> {
    Ok(Json(service.manager.tables().await?))
}

async fn table(
    State(service): State<Arc<Service>>,
    Path(name): Path<String>,
) -> Result<Json<TableInfo>, ApiError> {
    Ok(Json(service.manager.table(&name).await?))
}

async fn remove_table(
    State(service): State<Arc<Service>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    service.manager.remove_reference(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn table_rows(
    State(service): State<Arc<Service>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let (version, csv) = service.manager.reference_rows(&name)?;
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
            (
                header::HeaderName::from_static("x-urbanstream-version"),
                version.to_string(),
            ),
        ],
        // The table's own copy, shared: a copy per answer let slow readers hold a table's
        // size each for as long as they kept their connections open.
        axum::body::Body::from(axum::body::Bytes::from_owner(SharedText(csv))),
    )
        .into_response())
}

/// A shared text as the bytes of an answer's body.
struct SharedText(Arc<str>);

impl AsRef<[u8]> for SharedText {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

async fn replace_table_rows(
    State(service): State<Arc<Service>>,
    Path(name): Path<String>,
    request: Request,
) -> Result<Json<TableInfo>, ApiError> {
    // A turn first, then the body, as for previews.
    let slot = service.manager.replacement_slot()?;
    let csv = String::from_request(request, &service)
        .await
        .map_err(|e| ApiError::new(e.status(), e.body_text()))?;
    Ok(Json(
        service.manager.replace_reference(&name, csv, slot).await?,
    ))
}

async fn functions(
    State(service): State<Arc<Service>>,
) -> Result<Json<Vec<FunctionInfo>>, ApiError> {
    Ok(Json(service.manager.functions()?))
}

async fn list(State(service): State<Arc<Service>>) -> Json<Vec<QueryStatus>> {
    Json(service.manager.list())
}

async fn create(
    State(service): State<Arc<Service>>,
    body: Result<Json<CreateQuery>, JsonRejection>,
) -> Result<(StatusCode, Json<QueryStatus>), ApiError> {
    let Json(body) = body?;
    let status = service
        .manager
        .create(&body.name, &body.sql, body.memory_limit)
        .await?;
    Ok((StatusCode::CREATED, Json(status)))
}

async fn validate(
    State(service): State<Arc<Service>>,
    body: Result<Json<ValidateQuery>, JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(body) = body?;
    let planned: Vec<PlannedStatement> = service.manager.validate(&body.sql).await?;
    Ok(Json(json!({ "valid": true, "queries": planned })))
}

async fn show(
    State(service): State<Arc<Service>>,
    Path(name): Path<String>,
) -> Result<Json<QueryStatus>, ApiError> {
    Ok(Json(service.manager.get(&name)?))
}

async fn drop_query(
    State(service): State<Arc<Service>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    service.manager.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn pause(
    State(service): State<Arc<Service>>,
    Path(name): Path<String>,
) -> Result<Json<QueryStatus>, ApiError> {
    Ok(Json(service.manager.pause(&name).await?))
}

async fn resume(
    State(service): State<Arc<Service>>,
    Path(name): Path<String>,
) -> Result<Json<QueryStatus>, ApiError> {
    Ok(Json(service.manager.resume(&name).await?))
}

async fn restart(
    State(service): State<Arc<Service>>,
    Path(name): Path<String>,
) -> Result<Json<QueryStatus>, ApiError> {
    Ok(Json(service.manager.restart(&name).await?))
}

async fn reset(
    State(service): State<Arc<Service>>,
    Path(name): Path<String>,
) -> Result<Json<QueryStatus>, ApiError> {
    // In a task of its own, like an upgrade: a client that goes away does not leave the query
    // stopped with its checkpoints half removed.
    let reset = tokio::spawn(async move { service.manager.reset(&name).await })
        .await
        .map_err(|e| ServiceError::Internal(format!("reset task failed: {e}")))??;
    Ok(Json(reset))
}

async fn upgrade(
    State(service): State<Arc<Service>>,
    Path(name): Path<String>,
    body: Result<Json<UpgradeRequest>, JsonRejection>,
) -> Result<Json<QueryStatus>, ApiError> {
    let Json(body) = body?;
    // In a task of its own: a client that goes away does not cancel the upgrade half-way
    // (its query stopped and not started again).
    let upgraded = tokio::spawn(async move { service.manager.upgrade(&name, body).await })
        .await
        .map_err(|e| ServiceError::Internal(format!("upgrade task failed: {e}")))??;
    Ok(Json(upgraded))
}

async fn take_savepoint(
    State(service): State<Arc<Service>>,
    Path(name): Path<String>,
    body: Result<Json<SavepointRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Savepoint>), ApiError> {
    let Json(body) = body?;
    // In a task of its own, like an upgrade: the query stops for the copy and must start
    // again whatever the client does.
    let saved =
        tokio::spawn(async move { service.manager.savepoint(&name, &body.savepoint).await })
            .await
            .map_err(|e| ServiceError::Internal(format!("savepoint task failed: {e}")))??;
    Ok((StatusCode::CREATED, Json(saved)))
}

async fn savepoints(
    State(service): State<Arc<Service>>,
    Path(name): Path<String>,
) -> Result<Json<Vec<Savepoint>>, ApiError> {
    Ok(Json(service.manager.savepoints(&name).await?))
}

#[cfg(test)]
mod foreign_requests {
    use axum::http::{HeaderMap, HeaderValue, Method};

    use super::foreign;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn pages_of_other_origins_cannot_change_anything() {
        let loopback = "127.0.0.1:8080".parse().unwrap();
        let public = "0.0.0.0:8080".parse().unwrap();
        let host = ("host", "127.0.0.1:8080");
        for (method, pairs, listen, refused) in [
            // The CLI and curl: no Origin, no Sec-Fetch-Site.
            (Method::POST, vec![host], loopback, false),
            (Method::POST, vec![], loopback, false),
            // The console itself.
            (
                Method::POST,
                vec![
                    host,
                    ("origin", "http://127.0.0.1:8080"),
                    ("sec-fetch-site", "same-origin"),
                ],
                loopback,
                false,
            ),
            (
                Method::POST,
                vec![
                    ("host", "localhost:8080"),
                    ("origin", "http://localhost:8080"),
                ],
                loopback,
                false,
            ),
            (Method::POST, vec![("host", "[::1]:8080")], loopback, false),
            // Another page, by Origin or by Sec-Fetch-Site (same-site is another port too).
            (
                Method::POST,
                vec![host, ("origin", "http://evil.example")],
                loopback,
                true,
            ),
            (
                Method::DELETE,
                vec![host, ("sec-fetch-site", "cross-site")],
                loopback,
                true,
            ),
            (
                Method::POST,
                vec![host, ("sec-fetch-site", "same-site")],
                loopback,
                true,
            ),
            // Reading is left to the browser's same-origin policy...
            (
                Method::GET,
                vec![host, ("origin", "http://evil.example")],
                loopback,
                false,
            ),
            // ...but not through a rebound name.
            (
                Method::GET,
                vec![("host", "evil.example:8080")],
                loopback,
                true,
            ),
            (
                Method::GET,
                vec![("host", "evil.example:8080")],
                public,
                false,
            ),
            (
                Method::POST,
                vec![
                    ("host", "city.example:8080"),
                    ("origin", "http://city.example:8080"),
                ],
                public,
                false,
            ),
        ] {
            let h = headers(&pairs);
            assert_eq!(
                foreign(&h, &method, listen).is_some(),
                refused,
                "{method} {pairs:?} on {listen}"
            );
        }
    }
}
