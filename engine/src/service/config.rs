//! The service's configuration: `default.toml` (compiled in), then a file, then
//! `URBANSTREAM__*` environment variables, merged by figment. Unknown keys are errors that name
//! the key; secrets are redacted wherever the configuration is shown.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::topics::Topics;

/// The compiled-in defaults (`engine/default.toml`).
pub const DEFAULT_TOML: &str = include_str!("../../default.toml");

/// Prefix of the environment variables that override the configuration; `__` separates the
/// section from the key.
pub const ENV_PREFIX: &str = "URBANSTREAM__";

/// Everything `urbanstream serve` reads.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// `[kafka]`
    pub kafka: KafkaConfig,
    /// `[topics]`
    pub topics: Topics,
    /// `[api]`
    pub api: ApiConfig,
    /// `[catalog]`
    pub catalog: CatalogConfig,
    /// `[reference]`
    pub reference: ReferenceConfig,
    /// `[schema_registry]`
    pub schema_registry: SchemaRegistryConfig,
    /// `[protobuf]`
    pub protobuf: ProtobufConfig,
    /// `[queries]`
    pub queries: QueriesConfig,
    /// `[pipeline]`
    pub pipeline: PipelineSettings,
    /// `[checkpoint]`
    pub checkpoint: CheckpointConfig,
    /// `[log]`
    pub log: LogConfig,
}

/// `[kafka]`: where Kafka is and how to reach it.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers.
    pub brokers: String,
    /// Prefix of the queries' consumer groups.
    pub group_id: String,
    /// librdkafka properties for every client.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// Kafka topic settings (`retention.ms`, `cleanup.policy`, `min.insync.replicas`, …) of
    /// the topics the service creates: the queries' outputs, the late and DLQ topics, the
    /// internal repartition topics. Topics that exist are left as they are.
    #[serde(default)]
    pub topic_properties: BTreeMap<String, String>,
}

/// `[api]`: the HTTP server.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// Bearer token of administrators (every endpoint); empty for none.
    pub token: String,
    /// Bearer token that may only read (list, status, info, metrics, validate); empty for
    /// none.
    pub read_token: String,
    /// Whether the API may listen on a non-loopback address without a token.
    pub allow_unauthenticated: bool,
    /// Largest request body.
    pub max_body: ByteSize,
    /// Largest body of a preview (`POST /v1/queries/preview`, the input file inline).
    pub max_preview_body: ByteSize,
    /// Longest a preview may run.
    #[serde(with = "humantime_serde")]
    pub preview_timeout: std::time::Duration,
    /// Longest a request's body may take to arrive, from the server's first read of it.
    #[serde(with = "humantime_serde")]
    pub body_timeout: std::time::Duration,
    /// The time zone the web console shows times in (a fixed UTC offset).
    pub time_zone: crate::time::display::DisplayZone,
}

/// `[catalog]`: where registered queries are kept.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogConfig {
    /// The catalog file.
    pub path: PathBuf,
}

/// `[reference]`: the reference tables (sensors, cameras, detectors, segments, wards, …).
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceConfig {
    /// Where new versions of reference tables are kept (empty: `reference/` beside the
    /// catalog file).
    pub dir: PathBuf,
    /// What happens to a camera event, detector reading or air reading whose camera,
    /// detector or sensor is not in its reference table: `process` (counted, and processed
    /// with the defaults the queries give, e.g. a 60 s reporting interval) or `dead_letter`
    /// (counted, and sent to the DLQ with the reason).
    pub unknown_ids: crate::decode::UnknownIds,
    /// The most CSV, in bytes, the current versions of all reference tables hold together
    /// (their rows are held in memory, about five times as much); a version that would take
    /// them over is refused.
    pub max_total_bytes: usize,
    /// Tables kept current from a compacted Kafka topic: table name → topic. The topic holds
    /// the whole table, one JSON object per row keyed by its id, a tombstone deleting one.
    #[serde(default)]
    pub topics: std::collections::BTreeMap<String, String>,
}

/// `[schema_registry]`: where the writer schemas of Avro records are.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SchemaRegistryConfig {
    /// A Confluent Schema Registry's URL; empty: the directory registry.
    pub url: String,
    /// The directory registry (empty: `registry/` beside the catalog).
    pub dir: PathBuf,
}

/// `[protobuf]`: the message descriptors of protobuf streams.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProtobufConfig {
    /// `.proto` files (compiled at start) or binary `FileDescriptorSet` files whose messages
    /// streams may name, beside the city's own.
    pub files: Vec<PathBuf>,
}

impl ServiceConfig {
    /// The schema registry of Avro streams: `schema_registry.url`, or the directory
    /// registry.
    pub fn schema_registry(&self) -> crate::Result<crate::decode::Registry> {
        if !self.schema_registry.url.is_empty() {
            return crate::decode::Registry::http(&self.schema_registry.url);
        }
        let dir = if self.schema_registry.dir.as_os_str().is_empty() {
            self.catalog
                .path
                .parent()
                .map_or_else(|| PathBuf::from("registry"), |p| p.join("registry"))
        } else {
            self.schema_registry.dir.clone()
        };
        crate::decode::Registry::dir(dir)
    }

    /// The reference tables' directory: `reference.dir`, or `reference/` beside the catalog.
    pub fn reference_dir(&self) -> PathBuf {
        if !self.reference.dir.as_os_str().is_empty() {
            return self.reference.dir.clone();
        }
        self.catalog
            .path
            .parent()
            .map_or_else(|| PathBuf::from("reference"), |p| p.join("reference"))
    }
}

/// `[queries]`: built-in queries and the limits of every query.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QueriesConfig {
    /// Whether the queries of `queries/` run.
    pub defaults: bool,
    /// Most queries at once.
    pub max_queries: usize,
    /// Memory pool per query.
    pub memory_limit: ByteSize,
    /// Largest memory pool a query may ask for (`memory_limit` of a create request).
    pub max_memory_limit: ByteSize,
    /// Most (window, group) partials per query.
    pub max_state_groups: usize,
}

/// `[pipeline]`: micro-batching and retries.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSettings {
    /// Records per micro-batch at most.
    pub max_batch_rows: usize,
    /// Linger of a micro-batch.
    #[serde(with = "humantime_serde")]
    pub linger: Duration,
    /// Linger of the producer.
    #[serde(with = "humantime_serde")]
    pub producer_linger: Duration,
    /// First wait before a query stopped by a transient error starts again.
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
}

/// `[checkpoint]`: recovery and delivery guarantees.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Whether queries checkpoint (off: at-least-once from held-back offsets, and processes
    /// may share a consumer group).
    pub enabled: bool,
    /// Directory of the checkpoints, one sub-directory per query.
    pub dir: PathBuf,
    /// An object store for the checkpoints instead of `dir`: `s3://bucket/prefix` (S3 or an
    /// S3-compatible server), `gs://bucket/prefix` or `az://container/prefix`. Every process
    /// of a deployment pointed at the same URL can restore any partition's state, so queries
    /// scale out across machines.
    #[serde(default)]
    pub url: Option<String>,
    /// The object store's options (`aws_endpoint`, `aws_region`, `aws_access_key_id`,
    /// `aws_secret_access_key`, `aws_allow_http`, `google_service_account`,
    /// `azure_storage_account_name`, …), over its `AWS_*`, `GOOGLE_*` and `AZURE_*`
    /// environment variables.
    #[serde(default)]
    pub store: BTreeMap<String, String>,
    /// Time between checkpoints (and between output transactions with `exactly_once`).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Checkpoints kept per query.
    pub retain: usize,
    /// Exactly-once output: a transactional producer per query.
    pub exactly_once: bool,
    /// Exactly-once recovery reads back what was published after the checkpoint from the
    /// output partitions' log start instead of from the checkpoint's marks (counting only
    /// what lies past the marks). For brokers whose fetch responses list aborted
    /// transactions that ended before the fetched offsets (the client then skips committed
    /// records after them as aborted, and the recovery would publish them again); Apache
    /// Kafka lists only the ones that overlap, and needs this off.
    #[serde(default)]
    pub read_back_from_log_start: bool,
    /// This service instance's name in the queries' transactional ids; stable across
    /// restarts, different for each process sharing a consumer group.
    pub instance: String,
}

/// `[log]`: logging.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Filter.
    pub level: String,
    /// `plain` or `json`.
    pub format: LogFormatConfig,
}

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormatConfig {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

/// For an environment variable's name after `URBANSTREAM__` that sets a librdkafka property,
/// the table it goes to and the property's name as written.
fn property_table(key: &str) -> Option<(&'static str, &str)> {
    let upper = key.to_ascii_uppercase();
    [
        ("KAFKA__PROPERTIES__", "kafka.properties"),
        ("KAFKA__TOPIC_PROPERTIES__", "kafka.topic_properties"),
    ]
    .into_iter()
    .find(|(prefix, _)| upper.starts_with(prefix))
    .map(|(prefix, table)| (table, &key[prefix.len()..]))
}

impl ServiceConfig {
    /// The defaults, then `file` if given, then the process's `URBANSTREAM__*` variables.
    pub fn load(file: Option<&Path>) -> Result<Self> {
        let mut figment = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(path) = file {
            if !path.exists() {
                return Err(Error::Config(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            if !path.is_file() {
                return Err(Error::Config(format!(
                    "config file {} is not a file (a directory or a device): give the path of \
                     a TOML file",
                    path.display()
                )));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        // A librdkafka property's name has dots, which figment would take for nesting:
        // `URBANSTREAM__KAFKA__PROPERTIES__SASL_PASSWORD` (or `…__SASL.PASSWORD`) sets
        // `sasl.password`, as does `…__KAFKA__TOPIC_PROPERTIES__…` for topics.
        figment = figment.merge(
            Env::prefixed(ENV_PREFIX)
                .filter(|key| property_table(key.as_str()).is_none())
                .split("__"),
        );
        // A setting's variable with one underscore after the prefix
        // (`URBANSTREAM_KAFKA__BROKERS`) is read by no one: the service started on the
        // default instead, silently.
        for (key, _) in std::env::vars_os() {
            let Some(key) = key.to_str() else {
                continue;
            };
            let single = "URBANSTREAM_";
            if let Some(rest) = key
                .get(..single.len())
                .filter(|p| p.eq_ignore_ascii_case(single))
                .map(|_| &key[single.len()..])
                && !rest.starts_with('_')
                && rest.contains("__")
            {
                return Err(Error::Config(format!(
                    "environment variable {key} is not read: a setting's variable has two \
                     underscores after URBANSTREAM, as between its section and key: write \
                     {ENV_PREFIX}{rest}"
                )));
            }
        }
        // Variables that are not Unicode are no one's settings (as figment skips them).
        for (key, value) in std::env::vars_os() {
            let (Some(key), Some(value)) = (key.to_str(), value.into_string().ok()) else {
                continue;
            };
            // The prefix in any case, as figment matches it.
            let Some(rest) = key
                .get(..ENV_PREFIX.len())
                .filter(|p| p.eq_ignore_ascii_case(ENV_PREFIX))
                .map(|_| &key[ENV_PREFIX.len()..])
            else {
                continue;
            };
            if let Some((table, name)) = property_table(rest) {
                let name = name.to_ascii_lowercase().replace('_', ".");
                let entry = BTreeMap::from([(name, value)]);
                figment = figment.merge(figment::providers::Serialized::default(table, entry));
            }
        }
        let config: Self = figment.extract().map_err(|e| {
            let messages: Vec<String> = e.into_iter().map(|e| describe(&e)).collect();
            Error::Config(messages.join("; "))
        })?;
        config.check()?;
        Ok(config)
    }

    /// Where the queries' checkpoints go: `checkpoint.url`'s object store, or
    /// `checkpoint.dir`.
    pub fn checkpoint_root(&self) -> Result<crate::checkpoint::Location> {
        match &self.checkpoint.url {
            Some(url) => crate::checkpoint::Location::object(url, &self.checkpoint.store),
            None => Ok(crate::checkpoint::Location::Local(
                self.checkpoint.dir.clone(),
            )),
        }
    }

    fn check(&self) -> Result<()> {
        if self.kafka.brokers.trim().is_empty() {
            return Err(Error::Config("kafka.brokers is empty".into()));
        }
        // The prefix of every consumer group and transactional id (`<group_id>.<query>`).
        if self.kafka.group_id.trim().is_empty() {
            return Err(Error::Config(
                "kafka.group_id is empty: it is the prefix of every query's consumer group \
                 (<group_id>.<query>); the default is \"urbanstream\""
                    .into(),
            ));
        }
        if self.catalog.path.as_os_str().is_empty() {
            return Err(Error::Config(
                "catalog.path is empty: the registered queries are kept in that file (the \
                 default is urbanstream-data/catalog.json)"
                    .into(),
            ));
        }
        // librdkafka's queue.buffering.max.ms takes 0 to 900 000 ms: past it every query
        // stayed STARTING, retrying a producer it could never make.
        if self.pipeline.producer_linger > Duration::from_secs(900) {
            return Err(Error::Config(format!(
                "pipeline.producer_linger is {}, above the 15 minutes a producer may wait to \
                 fill a batch (librdkafka's queue.buffering.max.ms); a few milliseconds is \
                 usual",
                humantime::format_duration(self.pipeline.producer_linger)
            )));
        }
        if self.pipeline.retry_backoff < Duration::from_millis(100) {
            return Err(Error::Config(format!(
                "pipeline.retry_backoff is {}: a query stopped by a transient error would be \
                 started again in a tight loop; give at least 100ms (the default is 1s)",
                humantime::format_duration(self.pipeline.retry_backoff)
            )));
        }
        if self.queries.max_queries == 0 {
            return Err(Error::Config(
                "queries.max_queries must be at least 1".into(),
            ));
        }
        if self.pipeline.max_batch_rows == 0 {
            return Err(Error::Config(
                "pipeline.max_batch_rows must be at least 1".into(),
            ));
        }
        if self.checkpoint.exactly_once && !self.checkpoint.enabled {
            return Err(Error::Config(
                "checkpoint.exactly_once needs checkpoint.enabled: each transaction ends at a \
                 checkpoint"
                    .into(),
            ));
        }
        if self.checkpoint.enabled {
            self.checkpoint_root()?;
        }
        if self.checkpoint.interval.is_zero() {
            return Err(Error::Config(
                "checkpoint.interval is 0: give how often a checkpoint is taken, e.g. \
                 interval = \"10s\" in [checkpoint] (or URBANSTREAM__CHECKPOINT__INTERVAL)"
                    .into(),
            ));
        }
        if self.checkpoint.retain == 0 {
            return Err(Error::Config(
                "checkpoint.retain is 0: give how many checkpoints are kept per query, at \
                 least 1, e.g. retain = 3 in [checkpoint] (or URBANSTREAM__CHECKPOINT__RETAIN)"
                    .into(),
            ));
        }
        if self.api.token.is_empty()
            && !self.api.listen.ip().is_loopback()
            && !self.api.allow_unauthenticated
        {
            return Err(Error::Config(format!(
                "api.listen is {}, reachable from other machines, and api.token is empty: \
                 set a token (URBANSTREAM__API__TOKEN=<secret>, or token = \"…\" under [api]), \
                 listen on 127.0.0.1, or set api.allow_unauthenticated = true to serve every \
                 caller without one",
                self.api.listen
            )));
        }
        // With a read token only, every change would be refused (they take api.token), and the
        // service could not be administered at all.
        if !self.api.read_token.is_empty() && self.api.token.is_empty() {
            return Err(Error::Config(
                "api.read_token is set and api.token is not: reading would need the read token \
                 and every change api.token, which is empty, so no one could register or \
                 control a query; set api.token too"
                    .into(),
            ));
        }
        if !self.api.read_token.is_empty() && self.api.read_token == self.api.token {
            return Err(Error::Config(
                "api.read_token equals api.token: give readers a token of their own".into(),
            ));
        }
        if self.queries.memory_limit > self.queries.max_memory_limit {
            return Err(Error::Config(format!(
                "queries.memory_limit ({}) is above queries.max_memory_limit ({})",
                self.queries.memory_limit, self.queries.max_memory_limit
            )));
        }
        if self.checkpoint.instance.trim().is_empty() {
            return Err(Error::Config("checkpoint.instance is empty".into()));
        }
        for key in self.kafka.properties.keys() {
            if matches!(
                key.as_str(),
                "bootstrap.servers" | "group.id" | "enable.auto.commit" | "transactional.id"
            ) {
                return Err(Error::Config(format!(
                    "kafka.properties.\"{key}\" is set by urbanstream itself (use kafka.brokers \
                     or kafka.group_id)"
                )));
            }
        }
        Ok(())
    }

    /// The librdkafka properties as pairs.
    pub fn kafka_properties(&self) -> Vec<(String, String)> {
        self.kafka
            .properties
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The configuration as JSON with every secret replaced by `"<redacted>"`: what logs and
    /// `/v1/info` show.
    pub fn redacted(&self) -> serde_json::Value {
        let mut shown = self.clone();
        if !shown.api.token.is_empty() {
            shown.api.token = REDACTED.into();
        }
        if !shown.api.read_token.is_empty() {
            shown.api.read_token = REDACTED.into();
        }
        // Passwords, keys and tokens of the broker, its topics and the checkpoint store.
        for (key, value) in shown
            .kafka
            .properties
            .iter_mut()
            .chain(shown.kafka.topic_properties.iter_mut())
            .chain(shown.checkpoint.store.iter_mut())
        {
            if is_secret(key) {
                *value = REDACTED.into();
            }
        }
        // Credentials in URLs.
        redact_url(&mut shown.schema_registry.url);
        if let Some(url) = shown.checkpoint.url.as_mut() {
            redact_url(url);
        }
        serde_json::to_value(&shown).unwrap_or(serde_json::Value::Null)
    }
}

/// `url` without the user name and password it carries, if any, nor the values of its query
/// (`?token=…`, a signed URL's signature) and fragment.
fn redact_url(url: &mut String) {
    const HIDDEN: &str = "redacted";
    let Ok(mut parsed) = url::Url::parse(url) else {
        return;
    };
    if !parsed.username().is_empty() || parsed.password().is_some() {
        let _ = parsed.set_username(HIDDEN);
        let _ = parsed.set_password(None);
    }
    if parsed.query().is_some() {
        let names: Vec<String> = parsed.query_pairs().map(|(k, _)| k.into_owned()).collect();
        let mut query = parsed.query_pairs_mut();
        query.clear();
        for name in names {
            query.append_pair(&name, HIDDEN);
        }
    }
    if parsed.fragment().is_some() {
        parsed.set_fragment(Some(HIDDEN));
    }
    *url = parsed.to_string();
}

impl std::fmt::Debug for ServiceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.redacted())
    }
}

const REDACTED: &str = "<redacted>";

/// Whether a librdkafka property holds a secret (passwords, keys, tokens, JAAS config).
pub fn is_secret(key: &str) -> bool {
    crate::error::is_secret_property(key)
}

/// A figment error as one line naming the key and where its value came from.
fn describe(e: &figment::Error) -> String {
    let mut line = String::new();
    if !e.path.is_empty() {
        line.push_str(&e.path.join("."));
        line.push_str(": ");
    }
    // figment's own words quote its list of choices twice (``plain` or `json``).
    let one_of = |choices: &[&str]| {
        choices
            .iter()
            .map(|c| format!("`{c}`"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match &e.kind {
        figment::error::Kind::UnknownVariant(found, choices) => line.push_str(&format!(
            "`{found}` is not one of its values: write one of {}",
            one_of(choices)
        )),
        figment::error::Kind::UnknownField(found, choices) => {
            let section = match e.path.split_last() {
                Some((_, section)) if !section.is_empty() => format!("[{}]", section.join(".")),
                _ => "the top level".to_string(),
            };
            // The path names the key already, when there is one.
            let what = if e.path.is_empty() {
                format!("no key `{found}`")
            } else {
                "no such key".to_string()
            };
            line.push_str(&format!(
                "{what} in {section}: its keys are {}",
                one_of(choices)
            ))
        }
        kind => line.push_str(&kind.to_string()),
    }
    if let Some(meta) = &e.metadata {
        let source = meta
            .source
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_else(|| meta.name.to_string());
        line.push_str(&format!(" (in {source})"));
    }
    line
}

#[cfg(test)]
// figment's Jail takes closures returning figment's own (large) error type.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    fn load(file: Option<&str>) -> std::result::Result<ServiceConfig, String> {
        ServiceConfig::load(file.map(Path::new)).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_load_and_every_section_is_read() {
        Jail::expect_with(|_| {
            let c = load(None)?;
            assert_eq!(c.kafka.brokers, "localhost:9092");
            assert_eq!(c.api.listen.to_string(), "127.0.0.1:8080");
            assert_eq!(c.api.max_body, ByteSize::kib(64));
            assert_eq!(c.queries.memory_limit, ByteSize::mib(512));
            assert_eq!(c.pipeline.linger, Duration::from_millis(20));
            assert_eq!(c.topics, Topics::default());
            assert_eq!(c.log.format, LogFormatConfig::Plain);
            Ok(())
        });
    }

    /// A librdkafka property (whose name has dots) is set from the environment, its dots
    /// written as such or as underscores: it was read as a nested table and refused. Settings
    /// no process could run with are refused at start: every query stayed STARTING (a
    /// producer linger past librdkafka's range), restarted in a tight loop (no retry
    /// backoff), or the catalog could not be written.
    #[test]
    fn properties_come_from_the_environment_and_unworkable_settings_are_refused() {
        Jail::expect_with(|jail| {
            jail.set_env("URBANSTREAM__KAFKA__PROPERTIES__SASL_PASSWORD", "secret");
            jail.set_env(
                "URBANSTREAM__KAFKA__PROPERTIES__SECURITY.PROTOCOL",
                "SASL_SSL",
            );
            jail.set_env(
                "URBANSTREAM__KAFKA__TOPIC_PROPERTIES__COMPRESSION_TYPE",
                "lz4",
            );
            let c = load(None)?;
            assert_eq!(c.kafka.properties["sasl.password"], "secret");
            assert_eq!(c.kafka.properties["security.protocol"], "SASL_SSL");
            assert_eq!(c.kafka.topic_properties["compression.type"], "lz4");
            // Each set back to a working value after its case (the environment is the
            // process's: it is not cleared under other tests).
            for (key, value, words, working) in [
                (
                    "URBANSTREAM__PIPELINE__PRODUCER_LINGER",
                    "16m",
                    "pipeline.producer_linger is 16m",
                    "5ms",
                ),
                (
                    "URBANSTREAM__PIPELINE__RETRY_BACKOFF",
                    "0s",
                    "pipeline.retry_backoff is 0s",
                    "1s",
                ),
                (
                    "URBANSTREAM__KAFKA__GROUP_ID",
                    "",
                    "kafka.group_id is empty",
                    "urbanstream",
                ),
                (
                    "URBANSTREAM__CATALOG__PATH",
                    "",
                    "catalog.path is empty",
                    "data/catalog.json",
                ),
            ] {
                jail.set_env(key, value);
                let e = load(None).expect_err(key);
                assert!(e.contains(words), "{e}");
                jail.set_env(key, working);
            }
            let dir = jail.directory().to_path_buf();
            let e = ServiceConfig::load(Some(&dir))
                .map_err(|e| e.to_string())
                .expect_err("a directory");
            assert!(e.contains("is not a file"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn checkpoint_settings_are_checked() {
        Jail::expect_with(|jail| {
            let c = load(None)?;
            assert!(c.checkpoint.enabled && !c.checkpoint.exactly_once);
            assert_eq!(c.checkpoint.interval, Duration::from_secs(10));
            jail.set_env("URBANSTREAM__CHECKPOINT__ENABLED", "false");
            jail.set_env("URBANSTREAM__CHECKPOINT__EXACTLY_ONCE", "true");
            let e = load(None).expect_err("exactly-once without checkpoints");
            assert!(
                e.contains("checkpoint.exactly_once needs checkpoint.enabled"),
                "{e}"
            );
            jail.set_env("URBANSTREAM__CHECKPOINT__ENABLED", "true");
            jail.set_env("URBANSTREAM__CHECKPOINT__INTERVAL", "0s");
            let e = load(None).expect_err("zero interval");
            assert!(e.contains("checkpoint.interval"), "{e}");
            jail.set_env("URBANSTREAM__CHECKPOINT__INTERVAL", "10s");
            jail.set_env("URBANSTREAM__CHECKPOINT__URL", "bucket/prefix");
            let e = load(None).expect_err("not a URL");
            assert!(
                e.contains("checkpoint.url \"bucket/prefix\" is not a URL"),
                "{e}"
            );
            jail.set_env("URBANSTREAM__CHECKPOINT__URL", "ftp://host/prefix");
            let e = load(None).expect_err("no such store");
            assert!(e.contains("checkpoint.url ftp://host/prefix"), "{e}");
            jail.set_env("URBANSTREAM__CHECKPOINT__URL", "s3://bucket/prefix");
            let c = load(None)?;
            assert_eq!(
                c.checkpoint_root().map(|l| l.to_string()).ok(),
                Some("s3://bucket/prefix".to_string())
            );
            Ok(())
        });
    }

    #[test]
    fn file_then_environment_override_the_defaults() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                "[kafka]\nbrokers = \"file:9092\"\n[api]\nlisten = \"0.0.0.0:9000\"\n\
                 token = \"t\"\n[queries]\nmax_queries = 3\n",
            )?;
            let c = load(Some("c.toml"))?;
            assert_eq!(c.kafka.brokers, "file:9092");
            assert_eq!(c.api.listen.to_string(), "0.0.0.0:9000");
            assert_eq!(c.queries.max_queries, 3);
            jail.set_env("URBANSTREAM__KAFKA__BROKERS", "env:9092");
            jail.set_env("URBANSTREAM__QUERIES__DEFAULTS", "false");
            jail.set_env("URBANSTREAM_LOG", "debug");
            let c = load(Some("c.toml"))?;
            assert_eq!(c.kafka.brokers, "env:9092");
            assert_eq!(c.api.listen.to_string(), "0.0.0.0:9000");
            assert!(!c.queries.defaults);
            jail.set_env("URBANSTREAM__API__LISTEN", "127.0.0.1:7000");
            let c = load(None)?;
            assert_eq!(c.api.listen.to_string(), "127.0.0.1:7000");
            Ok(())
        });
    }

    #[test]
    fn an_open_api_on_a_public_address_is_refused() {
        Jail::expect_with(|jail| {
            jail.set_env("URBANSTREAM__API__LISTEN", "0.0.0.0:9000");
            let e = load(None).expect_err("no token");
            assert!(
                e.contains("api.token") && e.contains("URBANSTREAM__API__TOKEN"),
                "{e}"
            );
            jail.set_env("URBANSTREAM__API__ALLOW_UNAUTHENTICATED", "true");
            assert!(load(None).is_ok());
            jail.set_env("URBANSTREAM__API__ALLOW_UNAUTHENTICATED", "false");
            jail.set_env("URBANSTREAM__API__TOKEN", "s3cret");
            assert!(load(None).is_ok());
            jail.set_env("URBANSTREAM__API__READ_TOKEN", "s3cret");
            let e = load(None).expect_err("same tokens");
            assert!(e.contains("read_token"), "{e}");
            jail.set_env("URBANSTREAM__API__LISTEN", "[::1]:9000");
            jail.set_env("URBANSTREAM__API__TOKEN", "");
            jail.set_env("URBANSTREAM__API__READ_TOKEN", "");
            assert!(load(None).is_ok(), "loopback needs no token");
            // A read token without an admin token: no one could change anything.
            jail.set_env("URBANSTREAM__API__READ_TOKEN", "reader");
            let e = load(None).expect_err("read token only");
            assert!(e.contains("set api.token too"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[kafka]\nbrokerz = \"x\"\n")?;
            let err = load(Some("c.toml")).expect_err("unknown key");
            assert!(err.contains("brokerz") && err.contains("c.toml"), "{err}");
            // The section's keys, each quoted once.
            assert!(
                err.contains("kafka.brokerz: no such key in [kafka]: its keys are `brokers`, "),
                "{err}"
            );
            jail.create_file("f.toml", "[log]\nformat = \"xml\"\n")?;
            let err = load(Some("f.toml")).expect_err("unknown value");
            assert!(
                err.contains(
                    "log.format: `xml` is not one of its values: write one of `plain`, `json`"
                ),
                "{err}"
            );
            let err = load(Some("/no/such.toml")).expect_err("missing file");
            assert!(err.contains("/no/such.toml"), "{err}");
            jail.set_env("URBANSTREAM__API__LISTEN", "nowhere");
            let err = load(None).expect_err("bad address");
            assert!(err.contains("api.listen"), "{err}");
            jail.set_env("URBANSTREAM__API__LISTEN", "127.0.0.1:1");
            jail.set_env("URBANSTREAM__APII__LISTEN", "x");
            let err = load(None).expect_err("unknown section");
            assert!(err.contains("apii"), "{err}");
            // One underscore after the prefix: read by no one, the default used silently.
            jail.set_env("URBANSTREAM__APII__LISTEN", "");
            jail.set_env("URBANSTREAM_KAFKA__BROKERS", "elsewhere:9092");
            let err = load(None).expect_err("one underscore");
            assert!(
                err.contains("URBANSTREAM_KAFKA__BROKERS is not read")
                    && err.contains("write URBANSTREAM__KAFKA__BROKERS"),
                "{err}"
            );
            Ok(())
        });
    }

    /// Every `URBANSTREAM__…` variable the Docker files set is a key the service reads.
    #[test]
    fn the_docker_files_set_only_known_keys() {
        let files = [
            include_str!("../../../docker/compose.yaml"),
            include_str!("../../../docker/Dockerfile"),
        ];
        Jail::expect_with(|jail| {
            let mut set = 0;
            for text in files {
                for line in text.lines() {
                    let line = line.trim();
                    let Some(start) = line.find(ENV_PREFIX) else {
                        continue;
                    };
                    if line.starts_with('#') {
                        continue;
                    }
                    let setting = line[start..].trim_end_matches('\\').trim();
                    let (key, value) = setting
                        .split_once(['=', ':'])
                        .ok_or_else(|| format!("no value in {line:?}"))?;
                    jail.set_env(key.trim(), value.trim());
                    set += 1;
                }
            }
            assert!(set >= 4, "only {set} settings found");
            load(None)?;
            Ok(())
        });
    }

    /// librdkafka's refusal of a property quotes the value it refuses: not a secret's (a
    /// private key in `ssl.key.pem`, a client secret in `sasl.oauthbearer.config`).
    #[test]
    fn a_client_refused_for_a_secret_does_not_show_it() {
        for (key, value) in [
            ("ssl.key.pem", "HUNTER2-pem"),
            (
                "sasl.oauthbearer.config",
                "principal=city client_secret=0auth",
            ),
            ("ssl.key.password", "pw2"),
        ] {
            assert!(is_secret(key), "{key}");
            let mut client = rdkafka::ClientConfig::new();
            client.set(key, value);
            if let Err(e) = client.create::<rdkafka::producer::BaseProducer>() {
                let shown = crate::Error::from(e).to_string();
                assert!(!shown.contains(value), "{key}: {shown}");
                assert!(shown.contains(key), "{key}: {shown}");
            }
        }
        assert!(!is_secret("sasl.oauthbearer.method") && !is_secret("ssl.key.location"));
    }

    #[test]
    fn librdkafka_properties_pass_through_and_secrets_are_hidden() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                "[kafka.properties]\n\"security.protocol\" = \"SASL_SSL\"\n\
                 \"sasl.username\" = \"city\"\n\"sasl.password\" = \"hunter2\"\n\
                 \"ssl.key.location\" = \"/k.pem\"\n\"ssl.key.password\" = \"pw2\"\n\
                 \"sasl.oauthbearer.config\" = \"principal=city client_secret=0auth\"\n\
                 \"sasl.kerberos.kinit.cmd\" = \"kinit -S k1n1t x\"\n\
                 [api]\ntoken = \"t0ps3cret\"\n\
                 [schema_registry]\nurl = \"https://city:r3g1stry@registry:8081/?token=qt0k3n&a=b#fr4g\"\n\
                 [checkpoint]\nurl = \"s3://minio:m1n10pw@city/checkpoints\"\n\
                 [checkpoint.store]\naws_region = \"hn-1\"\naws_access_key_id = \"AKIACITY\"\n\
                 aws_secret_access_key = \"S3CR3T\"\naws_session_token = \"s3ss10n\"\n",
            )?;
            let c = load(Some("c.toml"))?;
            let props = c.kafka_properties();
            assert!(props.contains(&("sasl.password".into(), "hunter2".into())));
            assert!(props.contains(&("security.protocol".into(), "SASL_SSL".into())));
            let shown = format!("{c:?} {}", c.redacted());
            for secret in [
                "hunter2",
                "pw2",
                "t0ps3cret",
                "r3g1stry",
                "m1n10pw",
                "S3CR3T",
                "s3ss10n",
                "0auth",
                "k1n1t",
                "qt0k3n",
                "fr4g",
            ] {
                assert!(!shown.contains(secret), "{secret} shown in {shown}");
            }
            assert!(
                shown.contains("SASL_SSL") && shown.contains("/k.pem") && shown.contains("hn-1"),
                "{shown}"
            );
            jail.create_file("d.toml", "[kafka.properties]\n\"group.id\" = \"x\"\n")?;
            let err = load(Some("d.toml")).expect_err("reserved");
            assert!(err.contains("group.id"), "{err}");
            Ok(())
        });
    }
}
