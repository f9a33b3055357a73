//! Prometheus metrics. Per query (label `query`, bounded by `queries.max_queries`): events in,
//! rows out, micro-batches, decode errors (DLQ), late events, consumer lag, watermark lag,
//! state size, and the emit-latency histogram (recorded by the pipeline as rows are
//! acknowledged). Per service: queries per state (label `state`, four values) and whether
//! Kafka is reachable. The counters are read from each query's live counters when `/metrics`
//! is scraped; series of a dropped query expire after five minutes. City gauges come from the
//! indicators published ([`CityGauges`]): segments per level of service and each ward's AQI.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

use super::manager::QueryStatus;

pub use crate::telemetry::{CityGauges, EMIT_LATENCY};

/// Upper bounds of the emit-latency buckets, seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The process's Prometheus recorder (installed once, on first use).
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .idle_timeout(MetricKindMask::ALL, Some(Duration::from_secs(300)))
            .set_buckets_for_metric(Matcher::Full(EMIT_LATENCY.into()), LATENCY_BUCKETS)
            .expect("the latency buckets are a non-empty constant");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Another recorder installed first (an embedding program's) keeps its place; this
        // handle then renders only what is recorded through it.
        let _ = metrics::set_global_recorder(recorder);
        describe();
        handle
    })
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "urbanstream_events_in_total",
        Unit::Count,
        "Input records read, per query."
    );
    describe_counter!(
        "urbanstream_rows_out_total",
        Unit::Count,
        "Result rows published and acknowledged, per query."
    );
    describe_counter!(
        "urbanstream_batches_total",
        Unit::Count,
        "Micro-batches processed, per query."
    );
    describe_counter!(
        "urbanstream_decode_errors_total",
        Unit::Count,
        "Records the query's source schema rejected (sent to the DLQ)."
    );
    describe_counter!(
        "urbanstream_unknown_ids_total",
        Unit::Count,
        "Input records whose camera, detector or sensor is not in its reference table."
    );
    describe_counter!(
        "urbanstream_late_events_total",
        Unit::Count,
        "Events beyond allowed lateness (sent to the late topic)."
    );
    describe_gauge!(
        "urbanstream_consumer_lag_records",
        Unit::Count,
        "Records between the query's position and the end of its partitions."
    );
    describe_gauge!(
        "urbanstream_watermark_lag_seconds",
        Unit::Seconds,
        "Wall clock minus the query's watermark."
    );
    describe_gauge!(
        "urbanstream_state_groups",
        Unit::Count,
        "(window, group) partials held."
    );
    describe_gauge!(
        "urbanstream_state_bytes",
        Unit::Bytes,
        "Bytes of window state held."
    );
    describe_gauge!(
        "urbanstream_checkpoint_age_seconds",
        Unit::Seconds,
        "Time since the query's last checkpoint was taken."
    );
    describe_gauge!(
        "urbanstream_checkpoint_bytes",
        Unit::Bytes,
        "Size on disk of the query's last checkpoint."
    );
    describe_gauge!(
        "urbanstream_checkpoint_duration_seconds",
        Unit::Seconds,
        "How long the query's last checkpoint took (acknowledgements, commit, write)."
    );
    describe_gauge!("urbanstream_queries", Unit::Count, "Queries per state.");
    describe_gauge!(
        "urbanstream_kafka_reachable",
        Unit::Count,
        "1 when the last metadata request to Kafka succeeded."
    );
    describe_gauge!(
        "urbanstream_segments_by_los",
        Unit::Count,
        "Road segments at each level of service in the latest minute published."
    );
    describe_gauge!(
        "urbanstream_ward_aqi",
        Unit::Count,
        "Latest hourly VN_AQI of each ward published."
    );
    describe_histogram!(
        EMIT_LATENCY,
        Unit::Seconds,
        "Arrival of the micro-batch that closed a window to the acknowledgement of its rows."
    );
}

/// Brings the per-query series up to date and renders the exposition text.
pub fn render(
    queries: &[QueryStatus],
    counts: &std::collections::BTreeMap<&'static str, usize>,
    kafka_reachable: bool,
) -> String {
    let handle = handle();
    for q in queries {
        let name = q.name.clone();
        let label = [("query", name)];
        metrics::counter!("urbanstream_events_in_total", &label).absolute(q.rows_in);
        metrics::counter!("urbanstream_rows_out_total", &label).absolute(q.rows_out);
        metrics::counter!("urbanstream_batches_total", &label).absolute(q.batches);
        metrics::counter!("urbanstream_decode_errors_total", &label).absolute(q.dlq);
        metrics::counter!("urbanstream_unknown_ids_total", &label).absolute(q.unknown_ids);
        metrics::counter!("urbanstream_late_events_total", &label).absolute(q.late);
        // Not measured (a paused or failed query): NaN, not the last figure.
        metrics::gauge!("urbanstream_consumer_lag_records", &label)
            .set(q.consumer_lag.map_or(f64::NAN, |lag| lag as f64));
        if let Some(lag) = q.watermark_lag_ms {
            metrics::gauge!("urbanstream_watermark_lag_seconds", &label).set(lag as f64 / 1e3);
        }
        metrics::gauge!("urbanstream_state_groups", &label).set(q.state_groups as f64);
        metrics::gauge!("urbanstream_state_bytes", &label).set(q.state_bytes as f64);
        if let Some(c) = &q.last_checkpoint {
            let age = (crate::pipeline::epoch_ms() - c.at_ms).max(0);
            metrics::gauge!("urbanstream_checkpoint_age_seconds", &label).set(age as f64 / 1e3);
            metrics::gauge!("urbanstream_checkpoint_bytes", &label).set(c.bytes as f64);
            metrics::gauge!("urbanstream_checkpoint_duration_seconds", &label)
                .set(c.duration_ms as f64 / 1e3);
        }
    }
    for (state, n) in counts {
        metrics::gauge!("urbanstream_queries", "state" => *state).set(*n as f64);
    }
    metrics::gauge!("urbanstream_kafka_reachable").set(if kafka_reachable { 1.0 } else { 0.0 });
    handle.run_upkeep();
    handle.render()
}
