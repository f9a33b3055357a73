//! The engine's error type.
//!
//! Each variant says where an error came from; [`Error::is_transient`] says whether retrying
//! the same operation later can succeed (a broker that is down) or not (a bad schema file).

use datafusion::arrow::error::ArrowError;
use datafusion::error::DataFusionError;
use rdkafka::error::KafkaError;

/// Everything that can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A schema file in `schemas/` is missing, malformed, or uses an Avro type the engine does
    /// not map to Arrow. Permanent until the file is fixed.
    #[error("schema {name}: {message}")]
    Schema {
        /// The schema's file or topic name.
        name: String,
        /// What is wrong with it.
        message: String,
    },
    /// A reference data file in `schemas/reference/` could not be read. Permanent.
    #[error("reference data {file}: {message}")]
    Reference {
        /// The file.
        file: String,
        /// What is wrong with it.
        message: String,
    },
    /// Invalid configuration, command-line value or request, or something that cannot be
    /// done as asked; the message names the setting, flag or thing. Permanent.
    #[error("{0}")]
    Config(String),
    /// Kafka client error (broker unreachable, request failed, ...). Often transient.
    #[error("kafka: {0}")]
    Kafka(KafkaError),
    /// DataFusion planning or execution error.
    #[error("datafusion: {}", explained(.0))]
    DataFusion(#[from] DataFusionError),
    /// Arrow error while building, casting or encoding batches.
    #[error("arrow: {0}")]
    Arrow(#[from] ArrowError),
    /// I/O error.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// A query went over one of its resource limits (memory, state size). Permanent: the
    /// query fails; others go on.
    #[error("resource limit: {0}")]
    ResourceLimit(String),
    /// A checkpoint could not be written or read back, or does not fit the queries it is
    /// restored into.
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    /// Input the query has not read is gone from the broker (an offset out of range after
    /// retention or truncation). Permanent: the query fails rather than skip it.
    #[error("data loss: {0}")]
    DataLoss(String),
    /// The consumer group moved partitions away from this consumer: the pipeline starts
    /// again from its checkpoint or committed offsets. Transient.
    #[error("rebalanced: {0}")]
    Rebalanced(String),
    /// The service's API refused a request or could not be reached (`urbanstream query`).
    #[error("{0}")]
    Api(String),
    /// The schema registry could not be reached or answered with an error other than "no
    /// such schema". Transient: records waiting for a writer schema are not dead-lettered for
    /// it.
    #[error("schema registry: {0}")]
    Registry(String),
}

impl Error {
    /// Whether the same operation may succeed if retried later.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Kafka(KafkaError::ClientCreation(_)) => false,
            // A fenced group member: another live process holds this one's identity; retrying
            // would fence it in turn. (A fenced producer is retried: the broker also fences a
            // transaction that outlived its timeout, and a restart from the checkpoint is right
            // then. The service's supervisor tells the two apart by how long the attempt ran.)
            Error::Kafka(e) => !matches!(
                e.rdkafka_error_code(),
                Some(
                    rdkafka::types::RDKafkaErrorCode::InvalidConfig
                        | rdkafka::types::RDKafkaErrorCode::Fatal
                        | rdkafka::types::RDKafkaErrorCode::FencedInstanceId
                        // The same record is too large again on every try.
                        | rdkafka::types::RDKafkaErrorCode::MessageSizeTooLarge
                )
            ),
            Error::Io(_) | Error::Rebalanced(_) | Error::Registry(_) => true,
            _ => false,
        }
    }

    /// Whether a transactional producer was fenced: a producer with the same transactional id
    /// was initialised after it, or its transaction outlived the transaction timeout.
    pub fn is_producer_fenced(&self) -> bool {
        use rdkafka::types::RDKafkaErrorCode as C;
        matches!(
            self,
            Error::Kafka(e) if matches!(
                e.rdkafka_error_code(),
                Some(C::Fenced | C::ProducerFenced | C::InvalidProducerEpoch)
            )
        )
    }

    pub(crate) fn schema(name: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Schema {
            name: name.into(),
            message: message.into(),
        }
    }
}

/// Result with the engine's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// DataFusion's message of `e`, with what to write instead where its own message names
/// neither the function nor a way out.
fn explained(e: &DataFusionError) -> String {
    let message = e.to_string();
    if message.contains("Arithmetic Overflow in AvgAccumulator") {
        // DataFusion's avg of a DECIMAL(p, s) is a DECIMAL(min(38, p + 4), s + 4): at
        // precision 38, four digits fewer before the point than its input holds.
        return format!(
            "{message}: an avg of DECIMALs overflowed its result type, a DECIMAL(p + 4, s + 4) \
             of at most 38 digits, which holds four digits fewer before the point than a \
             DECIMAL(38, s) argument; average a smaller scale (avg(CAST(x AS DECIMAL(38, 2)))) \
             or DOUBLE (avg(CAST(x AS DOUBLE)), which rounds)"
        );
    }
    message
}

impl From<KafkaError> for Error {
    /// A client configuration error without a secret's value: librdkafka's message quotes
    /// the value it refuses (`Invalid value "…" for configuration property "ssl.key.pem"`, a
    /// private key), and the error is logged and shown.
    fn from(e: KafkaError) -> Self {
        match e {
            KafkaError::ClientConfig(res, desc, key, value)
                if is_secret_property(&key) && !value.is_empty() =>
            {
                let desc = desc.replace(value.as_str(), "<redacted>");
                Error::Kafka(KafkaError::ClientConfig(
                    res,
                    desc,
                    key,
                    "<redacted>".into(),
                ))
            }
            e => Error::Kafka(e),
        }
    }
}

/// Whether a librdkafka property holds a secret (passwords, keys, tokens, JAAS config,
/// OAUTHBEARER's settings, which carry client secrets).
pub fn is_secret_property(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ([
        "password",
        "secret",
        "token",
        "jaas",
        "key",
        "credential",
        "kinit",
    ]
    .iter()
    .any(|word| key.contains(word))
        || key.starts_with("sasl.oauthbearer."))
        && !key.ends_with(".location")
        && key != "sasl.oauthbearer.method"
}

/// How often one kind of librdkafka client error is logged.
const CLIENT_ERROR_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Which repeated messages are due to be logged: each kind at once the first time, then at
/// most once per [`CLIENT_ERROR_EVERY`].
#[derive(Default)]
struct Throttle {
    /// Per kind, when it was last logged and how many were left out since.
    seen: std::collections::HashMap<String, (std::time::Instant, u64)>,
}

impl Throttle {
    /// Whether a message of `kind` at `now` is logged, and if so how many of its kind were
    /// left out before it.
    fn due(&mut self, kind: &str, now: std::time::Instant) -> Option<u64> {
        match self.seen.get_mut(kind) {
            Some((at, skipped)) if now.duration_since(*at) < CLIENT_ERROR_EVERY => {
                *skipped += 1;
                None
            }
            Some((at, skipped)) => {
                *at = now;
                Some(std::mem::take(skipped))
            }
            None => {
                self.seen.insert(kind.to_string(), (now, 0));
                Some(0)
            }
        }
    }
}

/// Logs an error librdkafka reports about a client (a broker down, every broker down, a
/// failed connection): the first of each kind at once, then at most one every 10 s with
/// how many were left out, rather than hundreds a minute while a broker is away.
pub fn log_kafka_client_error(error: &KafkaError, reason: &str) {
    use std::sync::{Mutex, OnceLock};
    static SEEN: OnceLock<Mutex<Throttle>> = OnceLock::new();
    let kind = format!("{:?}", error.rdkafka_error_code());
    let due = match SEEN.get_or_init(Default::default).lock() {
        Ok(mut seen) => seen.due(&kind, std::time::Instant::now()),
        Err(_) => Some(0),
    };
    match due {
        None => {}
        Some(0) => tracing::error!(target: "librdkafka", "librdkafka: {error}: {reason}"),
        Some(left_out) => tracing::error!(
            target: "librdkafka",
            similar_left_out = left_out,
            "librdkafka: {error}: {reason}"
        ),
    }
}

#[cfg(test)]
mod throttle_tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// While every broker is down librdkafka reports it hundreds of times a minute (20 lines
    /// within one millisecond): each kind is logged once per 10 s, saying how many it stood
    /// for.
    #[test]
    fn a_repeated_client_error_is_logged_once_per_interval() {
        let mut t = Throttle::default();
        let t0 = Instant::now();
        assert_eq!(t.due("AllBrokersDown", t0), Some(0));
        for ms in [0, 1, 500, 9_999] {
            assert_eq!(
                t.due("AllBrokersDown", t0 + Duration::from_millis(ms)),
                None
            );
        }
        assert_eq!(t.due("Transport", t0), Some(0), "another kind");
        assert_eq!(
            t.due("AllBrokersDown", t0 + Duration::from_secs(10)),
            Some(4)
        );
        assert_eq!(t.due("AllBrokersDown", t0 + Duration::from_secs(11)), None);
        assert_eq!(
            t.due("AllBrokersDown", t0 + Duration::from_secs(21)),
            Some(1)
        );
    }
}
