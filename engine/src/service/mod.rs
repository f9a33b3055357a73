//! The service: `urbanstream serve`. Runs the built-in and registered queries against the
//! configured Kafka, serves the REST API ([`api`]), keeps the catalog ([`catalog`]) and
//! exports metrics ([`metrics`]); [`client`] is the API's client for `urbanstream query`.
//!
//! ```text
//!  analysts ──► REST /v1 (axum) ──► QueryManager ──► one pipeline per query (consumer group
//!                                       │             <group_id>.<name>, producer, memory pool)
//!                                       └──► catalog.json (atomic rewrite)
//!  Prometheus ──► /metrics          Kubernetes ──► /livez, /readyz
//! ```

pub mod api;
pub mod catalog;
pub mod client;
pub mod config;
pub mod follow;
pub mod http;
pub mod manager;
pub mod metrics;
pub mod shell;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer};
use tracing::{info, warn};

use crate::error::{Error, Result};
use config::ServiceConfig;
use manager::QueryManager;

/// How often the service asks Kafka for its metadata to know whether it is reachable.
const KAFKA_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// How long that request may take.
const KAFKA_CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// The running service: its configuration, queries and Kafka reachability.
pub struct Service {
    /// The configuration it runs with.
    pub config: Arc<ServiceConfig>,
    /// The queries.
    pub manager: QueryManager,
    /// A client that asks Kafka for metadata, to know whether it is reachable.
    probe: Arc<BaseProducer>,
    kafka_reachable: AtomicBool,
    kafka_checked: AtomicBool,
    stopping: AtomicBool,
    /// What the output topics say now, for the web console.
    pub city: Arc<crate::dashboard::CityView>,
    /// Stops the reader of the output topics.
    city_stop: Arc<AtomicBool>,
}

impl Service {
    /// Opens the catalog, starts the built-in and registered queries, and starts watching
    /// whether Kafka is reachable.
    pub async fn start(config: ServiceConfig) -> Result<Arc<Self>> {
        let config = Arc::new(config);
        info!(config = ?config, "starting urbanstream service");
        // The recorder is in place before the first query records into it.
        metrics::handle();
        let mut client = ClientConfig::new();
        client.set("bootstrap.servers", &config.kafka.brokers);
        for (k, v) in config.kafka_properties() {
            client.set(k, v);
        }
        let probe = Arc::new(client.create::<BaseProducer>()?);
        let manager = QueryManager::new(config.clone())?;
        // The city view shows the reference tables the queries read (kept versions included),
        // and follows their new versions.
        let tables = manager.reference_tables().clone();
        let city = crate::dashboard::CityView::new(&tables.city()?, config.api.time_zone);
        tokio::spawn(follow_reference(tables, Arc::downgrade(&city)));
        let service = Arc::new(Self {
            probe,
            manager,
            config: config.clone(),
            kafka_reachable: AtomicBool::new(false),
            kafka_checked: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            city: city.clone(),
            city_stop: Arc::new(AtomicBool::new(false)),
        });
        service.manager.start_all().await?;
        let reader = crate::dashboard::read_outputs(
            city,
            client,
            config.topics.clone(),
            service.manager.registry(),
            service.city_stop.clone(),
        );
        tokio::spawn(reader);
        tokio::spawn(watch_kafka(Arc::downgrade(&service)));
        Ok(service)
    }

    /// Whether the last metadata request to Kafka succeeded.
    pub fn kafka_reachable(&self) -> bool {
        self.kafka_reachable.load(Ordering::Relaxed)
    }

    /// Ready: Kafka reachable, every query that should run running (none starting or
    /// retrying) and holding input partitions, none FAILED, and not shutting down. PAUSED
    /// queries do not hold readiness back. The reason names the queries that do.
    pub fn ready(&self) -> (bool, String) {
        if self.stopping.load(Ordering::Relaxed) {
            return (false, "shutting down".into());
        }
        if !self.kafka_checked.load(Ordering::Relaxed) {
            return (false, "Kafka not checked yet".into());
        }
        if !self.kafka_reachable() {
            return (
                false,
                format!("Kafka at {} is not reachable", self.config.kafka.brokers),
            );
        }
        let failed = self.manager.names_in(manager::QueryState::Failed);
        let starting = self.manager.names_in(manager::QueryState::Starting);
        let unassigned = self.manager.running_without_partitions();
        let mut problems = Vec::new();
        if !failed.is_empty() {
            problems.push(format!("queries failed: {}", failed.join(", ")));
        }
        if !starting.is_empty() {
            problems.push(format!("queries starting: {}", starting.join(", ")));
        }
        let loading = self.manager.reference_tables_loading();
        if !loading.is_empty() {
            problems.push(format!(
                "reference tables reading their topics: {}",
                loading.join(", ")
            ));
        }
        if !unassigned.is_empty() {
            problems.push(format!(
                "queries holding no input partition (not assigned yet, or the group has more \
                 processes than they have partitions): {}",
                unassigned.join(", ")
            ));
        }
        if problems.is_empty() {
            (true, "ready".into())
        } else {
            (false, problems.join("; "))
        }
    }

    /// Stops every query: each publishes what it holds, flushes its producer and commits.
    pub async fn shutdown(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.city_stop.store(true, Ordering::Relaxed);
        self.manager.shutdown().await;
    }

    async fn check_kafka(&self) {
        let probe = self.probe.clone();
        let reachable = tokio::task::spawn_blocking(move || {
            probe
                .client()
                .fetch_metadata(None, KAFKA_CHECK_TIMEOUT)
                .map(|_| ())
        })
        .await;
        let reachable = match reachable {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let first = !self.kafka_checked.swap(true, Ordering::Relaxed);
        let was = self
            .kafka_reachable
            .swap(reachable.is_ok(), Ordering::Relaxed);
        let brokers = &self.config.kafka.brokers;
        match reachable {
            Err(e) if was || first => warn!(%brokers, error = %e, "Kafka not reachable"),
            Err(e) => tracing::debug!(error = %e, "Kafka still not reachable"),
            Ok(()) if !was => info!(%brokers, "Kafka reachable"),
            Ok(()) => {}
        }
    }
}

/// Checks Kafka every few seconds for as long as the service lives.
async fn watch_kafka(service: std::sync::Weak<Service>) {
    loop {
        let Some(s) = service.upgrade() else { return };
        s.check_kafka().await;
        drop(s);
        tokio::time::sleep(KAFKA_CHECK_INTERVAL).await;
    }
}

/// Shows every new version of the city's reference tables in `city` (checked once a second)
/// while the view lives.
async fn follow_reference(
    tables: crate::reference::ReferenceTables,
    city: std::sync::Weak<crate::dashboard::CityView>,
) {
    let generation = tables.generation();
    let mut seen = generation.load(Ordering::Acquire);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(city) = city.upgrade() else {
            return;
        };
        let now = generation.load(Ordering::Acquire);
        if now == seen {
            continue;
        }
        seen = now;
        // A replacement of the city's tables is checked against the others before it is
        // installed, so they read back whole; a table of an analyst's own changes nothing
        // here.
        match tables.city() {
            Ok(reference) => city.set_reference(&reference),
            Err(e) => warn!(error = %e, "the city view keeps the reference tables it had"),
        }
    }
}

/// `urbanstream serve`: starts the service, serves the API until SIGTERM or Ctrl-C, then
/// stops taking requests, stops the queries gracefully and returns.
pub async fn serve(config: ServiceConfig) -> Result<()> {
    let listen = config.api.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Error::Config(format!("api.listen {listen}: {e}")))?;
    let service = Service::start(config).await?;
    let app = api::router(service.clone());
    info!(
        listen = %listener.local_addr().unwrap_or(listen),
        auth = !service.config.api.token.is_empty(),
        "API listening"
    );
    let stop = Arc::new(AtomicBool::new(false));
    crate::signals::stop_on_signal(stop.clone());
    let shutdown = {
        let service = service.clone();
        async move {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            info!("stopping: no new requests; queries publish, flush and commit");
            service.stopping.store(true, Ordering::Relaxed);
            // Open console tabs hold event streams: end them, or the server waits for them.
            service.city.close();
        }
    };
    let limits = http::Limits {
        body_read_timeout: service.config.api.body_timeout,
        ..http::Limits::default()
    };
    http::serve(listener, app, limits, shutdown).await;
    service.shutdown().await;
    info!("stopped");
    Ok(())
}
