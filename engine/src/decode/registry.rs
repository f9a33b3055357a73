//! Writer schemas of Avro records, by the schema id their Confluent framing carries.
//!
//! Two registries answer the same two questions ("which schema has id N?", "which id has this
//! schema under this subject?"):
//! - a **Confluent Schema Registry** over its REST protocol (`GET /schemas/ids/{id}`,
//!   `POST /subjects/{subject}/versions`), for deployments that have one;
//! - a **directory** (`ids/<id>.avsc`, `subjects/<subject>` listing its ids), the embedded
//!   default, which producers on the same machine (`urbanstream replay --format avro`, the
//!   demo) and the engine share.
//!
//! Schemas are cached once found. An id the registry does not have is remembered as unknown
//! for [`UNKNOWN_FOR`], then asked again (a producer may register it meanwhile). A registry
//! that cannot be reached is an [`Error::Registry`]: transient, so records are not
//! dead-lettered for it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// How long an id the registry does not have is taken as unknown before it is asked again.
pub const UNKNOWN_FOR: Duration = Duration::from_secs(5);

/// The media type of the Confluent REST protocol.
const CONFLUENT_JSON: &str = "application/vnd.schemaregistry.v1+json";

/// Where writer schemas come from.
#[derive(Debug)]
enum Source {
    /// A Confluent Schema Registry at this base URL (with basic-auth credentials, if the URL
    /// carried them).
    Http {
        base: url::Url,
        auth: Option<(String, String)>,
        client: reqwest::Client,
    },
    /// A directory of schema files.
    Dir(PathBuf),
}

/// What is known of one id.
#[derive(Debug, Clone)]
enum Entry {
    Found(Arc<str>),
    /// The registry has no such id, or answered for it with something no record can be read
    /// with (another schema type, a malformed answer): why, and when it was asked.
    Unknown(String, Instant),
}

/// Unknown ids remembered at most; beyond, they are forgotten (and asked again).
const MAX_UNKNOWN: usize = 10_000;

/// A schema registry client with a cache.
#[derive(Debug)]
pub struct Registry {
    source: Source,
    cache: Mutex<HashMap<u32, Entry>>,
}

impl Registry {
    /// A Confluent Schema Registry at `url` (e.g. `http://registry:8081`; credentials in the
    /// URL are sent as basic auth).
    pub fn http(url: &str) -> Result<Self> {
        // The URL may carry a password: messages do not repeat it.
        let mut base =
            url::Url::parse(url).map_err(|e| Error::Config(format!("schema_registry.url: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(Error::Config(format!(
                "schema_registry.url: {}: is not http:// or https://",
                base.scheme()
            )));
        }
        let auth = (!base.username().is_empty()).then(|| {
            (
                base.username().to_string(),
                base.password().unwrap_or_default().to_string(),
            )
        });
        // The credentials go in a header, never into logged URLs.
        let _ = base.set_username("");
        let _ = base.set_password(None);
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| Error::Registry(e.to_string()))?;
        Ok(Self::with_source(Source::Http { base, auth, client }))
    }

    /// A registry kept in `dir` (created when missing).
    pub fn dir(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(dir.join("ids"))?;
        std::fs::create_dir_all(dir.join("subjects"))?;
        Ok(Self::with_source(Source::Dir(dir)))
    }

    fn with_source(source: Source) -> Self {
        Self {
            source,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Where it is, for messages: the URL or the directory.
    pub fn location(&self) -> String {
        match &self.source {
            Source::Http { base, .. } => base.to_string(),
            Source::Dir(dir) => dir.display().to_string(),
        }
    }

    /// The schema with `id` if it is cached (`Some(None)`: known to be missing; `None`: not
    /// asked yet, or asked too long ago).
    pub fn cached(&self, id: u32) -> Option<Option<Arc<str>>> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        match cache.get(&id)? {
            Entry::Found(s) => Some(Some(s.clone())),
            Entry::Unknown(_, at) if at.elapsed() < UNKNOWN_FOR => Some(None),
            Entry::Unknown(..) => None,
        }
    }

    /// Why the registry gave no schema for `id`, if it was asked.
    pub fn why_unknown(&self, id: u32) -> Option<String> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        match cache.get(&id)? {
            Entry::Unknown(why, _) => Some(why.clone()),
            Entry::Found(_) => None,
        }
    }

    /// The schema with `id`, from the cache or the registry; `None` if the registry has no
    /// such id.
    pub async fn schema(&self, id: u32) -> Result<Option<Arc<str>>> {
        if let Some(known) = self.cached(id) {
            return Ok(known);
        }
        let missing = |why: String| Err::<Arc<str>, String>(why);
        let found: std::result::Result<Arc<str>, String> = match &self.source {
            Source::Dir(dir) => match std::fs::read_to_string(id_file(dir, id)) {
                Ok(text) => Ok(text.into()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing(format!(
                    "unknown schema id {id}: the schema registry ({}) has no such schema; \
                     register the producer's schema there",
                    dir.display()
                )),
                Err(e) => return Err(e.into()),
            },
            Source::Http { base, auth, client } => {
                let url = base
                    .join(&format!("schemas/ids/{id}"))
                    .map_err(|e| Error::Registry(e.to_string()))?;
                let response = send(client.get(url.clone()), auth).await?;
                let status = response.status();
                let text = response.text().await.unwrap_or_default();
                let body: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                match status.as_u16() {
                    200..=299 => match (body["schemaType"].as_str(), body["schema"].as_str()) {
                        (None | Some("AVRO"), Some(schema)) => Ok(schema.into()),
                        (Some(kind), Some(_)) => missing(format!(
                            "schema id {id} is a {kind} schema in the registry, not Avro: the \
                             record is not Avro, or the topic mixes formats"
                        )),
                        _ => missing(format!(
                            "schema id {id}: the registry's answer has no schema ({text:.200})"
                        )),
                    },
                    // Credentials, rate limits and the registry's own failures pass or get
                    // fixed: the records wait for them.
                    401 | 403 | 408 | 429 | 500.. => {
                        return Err(Error::Registry(format!("{url}: {status}: {text:.500}")));
                    }
                    // No such id, or none the registry will look up (out of range, say).
                    _ => missing(format!(
                        "unknown schema id {id}: the schema registry ({}) answered {status} \
                         ({})",
                        self.location(),
                        body["message"].as_str().unwrap_or(&text)
                    )),
                }
            }
        };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        match found {
            Ok(schema) => {
                cache.insert(id, Entry::Found(schema.clone()));
                Ok(Some(schema))
            }
            Err(why) => {
                if cache.len() >= MAX_UNKNOWN {
                    cache.retain(|_, e| matches!(e, Entry::Found(_)));
                }
                cache.insert(id, Entry::Unknown(why, Instant::now()));
                Ok(None)
            }
        }
    }

    /// Registers `schema` under `subject` (e.g. `city.camera.events-value`) and returns its
    /// id: the existing id when the registry has the same schema already.
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32> {
        let canonical = canonical(schema)?;
        let id = match &self.source {
            Source::Dir(dir) => register_in_dir(dir, subject, &canonical)?,
            Source::Http { base, auth, client } => {
                let url = base
                    .join(&format!("subjects/{}/versions", encode_segment(subject)))
                    .map_err(|e| Error::Registry(e.to_string()))?;
                let request = client
                    .post(url.clone())
                    .header(reqwest::header::CONTENT_TYPE, CONFLUENT_JSON)
                    .body(serde_json::json!({ "schema": canonical }).to_string());
                let response = send(request, auth).await?;
                let status = response.status();
                let text = response.text().await.unwrap_or_default();
                if !status.is_success() {
                    return Err(Error::Registry(format!("{url}: {status}: {text}")));
                }
                let body: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| Error::Registry(format!("{url}: {e}: {text}")))?;
                body["id"]
                    .as_u64()
                    .and_then(|id| u32::try_from(id).ok())
                    .ok_or_else(|| Error::Registry(format!("{url}: no schema id in {text}")))?
            }
        };
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, Entry::Found(canonical.into()));
        Ok(id)
    }
}

/// Sends a request with the Confluent media types and the credentials; a failure to reach
/// the registry is an [`Error::Registry`].
async fn send(
    request: reqwest::RequestBuilder,
    auth: &Option<(String, String)>,
) -> Result<reqwest::Response> {
    let mut request = request.header(
        reqwest::header::ACCEPT,
        format!("{CONFLUENT_JSON}, application/json"),
    );
    if let Some((user, password)) = auth {
        request = request.basic_auth(user, Some(password));
    }
    request
        .send()
        .await
        .map_err(|e| Error::Registry(e.without_url().to_string()))
}

/// A schema in one line of compact JSON, so that the same schema written differently gets
/// the same id.
fn canonical(schema: &str) -> Result<String> {
    let value: serde_json::Value = serde_json::from_str(schema)
        .map_err(|e| Error::schema("(registered)", format!("not JSON: {e}")))?;
    apache_avro::Schema::parse(&value)
        .map_err(|e| Error::schema("(registered)", format!("not an Avro schema: {e}")))?;
    Ok(value.to_string())
}

/// A subject as one URL path segment.
fn encode_segment(subject: &str) -> String {
    url::form_urlencoded::byte_serialize(subject.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

fn id_file(dir: &Path, id: u32) -> PathBuf {
    dir.join("ids").join(format!("{id}.avsc"))
}

/// A subject's file name: the subject with anything but letters, digits, `.`, `-` and `_`
/// replaced, so that no subject can name a path outside the directory.
fn subject_file(dir: &Path, subject: &str) -> PathBuf {
    let name: String = subject
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir.join("subjects").join(name)
}

/// The directory registry's `register`: the id of an identical schema, or the next free id,
/// claimed with a hard link so that two processes never take the same one.
fn register_in_dir(dir: &Path, subject: &str, canonical: &str) -> Result<u32> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(dir.join("ids"))? {
        let path = entry?.path();
        let Some(id) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".avsc"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        ids.push(id);
        if std::fs::read_to_string(&path)? == canonical {
            add_to_subject(dir, subject, id)?;
            return Ok(id);
        }
    }
    let mut id = ids.iter().max().map_or(1, |m| m + 1);
    let staged = tempfile::NamedTempFile::new_in(dir.join("ids"))?;
    std::fs::write(staged.path(), canonical)?;
    loop {
        match std::fs::hard_link(staged.path(), id_file(dir, id)) {
            Ok(()) => break,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if std::fs::read_to_string(id_file(dir, id))? == canonical {
                    break;
                }
                id += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
    add_to_subject(dir, subject, id)?;
    Ok(id)
}

/// Appends `id` to the subject's versions, unless it is there.
fn add_to_subject(dir: &Path, subject: &str, id: u32) -> Result<()> {
    let path = subject_file(dir, subject);
    let mut text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e.into()),
    };
    if text.lines().any(|l| l.trim() == id.to_string()) {
        return Ok(());
    }
    text.push_str(&format!("{id}\n"));
    crate::files::write_atomically(&path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::extract::{Path as UrlPath, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::{get, post};

    use super::*;

    /// A Confluent Schema Registry as its REST reference documents it: the answers below are
    /// the documented bodies (`GET /schemas/ids/{id}`, `POST /subjects/{subject}/versions`,
    /// error 40403), and it checks what a client must send (media type, basic auth).
    async fn confluent(requests: Arc<AtomicUsize>) -> String {
        async fn by_id(
            State(n): State<Arc<AtomicUsize>>,
            UrlPath(id): UrlPath<u32>,
        ) -> (StatusCode, String) {
            n.fetch_add(1, Ordering::Relaxed);
            match id {
                1 => (
                    StatusCode::OK,
                    serde_json::json!({ "schema": R1 }).to_string(),
                ),
                5 => (
                    StatusCode::OK,
                    r#"{"schemaType":"PROTOBUF","schema":"syntax = \"proto3\";"}"#.into(),
                ),
                9 => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    r#"{"error_code":50001,"message":"Error in the backend data store"}"#.into(),
                ),
                _ => (
                    StatusCode::NOT_FOUND,
                    format!(r#"{{"error_code":40403,"message":"Schema {id} not found"}}"#),
                ),
            }
        }
        async fn register(
            State(n): State<Arc<AtomicUsize>>,
            UrlPath(subject): UrlPath<String>,
            headers: HeaderMap,
            body: String,
        ) -> (StatusCode, String) {
            n.fetch_add(1, Ordering::Relaxed);
            let header = |h: &str| {
                headers
                    .get(h)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string()
            };
            // "user:secret", as basic auth.
            if header("authorization") != "Basic dXNlcjpzZWNyZXQ=" {
                return (
                    StatusCode::UNAUTHORIZED,
                    r#"{"error_code":401,"message":"Unauthorized"}"#.into(),
                );
            }
            let body: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            if header("content-type") != CONFLUENT_JSON
                || subject != "city camera-value"
                || body["schema"].as_str().is_none()
            {
                return (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    r#"{"error_code":42201,"message":"Invalid schema"}"#.into(),
                );
            }
            (StatusCode::OK, r#"{"id":1}"#.into())
        }
        let app = axum::Router::new()
            .route("/schemas/ids/{id}", get(by_id))
            .route("/subjects/{subject}/versions", post(register))
            .with_state(requests);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://user:secret@{addr}/")
    }

    #[tokio::test]
    async fn a_confluent_registry_is_asked_once_per_id_over_its_rest_protocol() {
        let requests = Arc::new(AtomicUsize::new(0));
        let url = confluent(requests.clone()).await;
        let registry = Registry::http(&url).expect("registry");
        // The credentials are not part of the location shown in messages.
        assert!(
            !registry.location().contains("secret"),
            "{}",
            registry.location()
        );
        let found = registry.schema(1).await.expect("lookup").expect("found");
        assert_eq!(&*found, R1);
        assert_eq!(
            registry.schema(1).await.expect("cached").as_deref(),
            Some(R1)
        );
        assert_eq!(
            requests.load(Ordering::Relaxed),
            1,
            "the second lookup is cached"
        );
        assert_eq!(registry.schema(2).await.expect("lookup"), None);
        assert_eq!(registry.cached(2), Some(None));
        // Another schema type is no schema to read Avro records with: their records go to the
        // DLQ with the reason, instead of the query waiting for the registry.
        assert_eq!(registry.schema(5).await.expect("lookup"), None);
        let why = registry.why_unknown(5).expect("reason");
        assert!(why.contains("PROTOBUF schema"), "{why}");
        assert!(registry.why_unknown(2).expect("reason").contains("404"));
        let e = registry.schema(9).await.expect_err("backend error");
        assert!(e.is_transient(), "{e}");
        assert!(e.to_string().contains("50001"), "{e}");
        // A subject with a space is one path segment.
        let id = registry
            .register("city camera-value", R1)
            .await
            .expect("id");
        assert_eq!(id, 1);
        let anonymous = Registry::http(&url.replace("user:secret@", "")).expect("registry");
        let e = anonymous
            .register("city camera-value", R1)
            .await
            .expect_err("auth");
        assert!(e.to_string().contains("401"), "{e}");
        // Nobody listening: transient.
        let port = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let gone = Registry::http(&format!("http://127.0.0.1:{port}")).expect("registry");
        let e = gone.schema(1).await.expect_err("unreachable");
        assert!(matches!(e, Error::Registry(_)) && e.is_transient(), "{e}");
        assert!(Registry::http("ftp://host").is_err());
    }

    const R1: &str = r#"{"type":"record","name":"R","fields":[{"name":"a","type":"long"}]}"#;
    const R2: &str = r#"{"type":"record","name":"R","fields":[{"name":"a","type":"long"},
        {"name":"b","type":["null","string"],"default":null}]}"#;

    #[tokio::test]
    async fn a_directory_registry_gives_one_id_per_schema_and_finds_it_again() {
        let dir = tempfile::tempdir().expect("dir");
        let registry = Registry::dir(dir.path()).expect("registry");
        let a = registry.register("t-value", R1).await.expect("register");
        // The same schema written differently is the same schema.
        let again = registry
            .register("t-value", &R1.replace(',', " , "))
            .await
            .expect("again");
        let b = registry.register("t-value", R2).await.expect("second");
        assert_eq!((a, again), (1, 1));
        assert_eq!(b, 2);
        // Another process sees them, by id.
        let other = Registry::dir(dir.path()).expect("other");
        let found = other.schema(b).await.expect("lookup").expect("found");
        assert!(found.contains("\"b\""), "{found}");
        assert_eq!(other.schema(9).await.expect("lookup"), None);
        assert_eq!(other.cached(9), Some(None));
        let versions = std::fs::read_to_string(dir.path().join("subjects/t-value")).expect("subj");
        assert_eq!(versions, "1\n2\n");
        // A subject cannot name a file outside the directory.
        registry
            .register("../../escape", R1)
            .await
            .expect("register");
        assert!(dir.path().join("subjects/.._.._escape").exists());
        assert!(
            registry.register("t-value", "{not json").await.is_err(),
            "not a schema"
        );
    }
}
