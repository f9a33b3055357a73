//! Prometheus metrics. Per query (label `query`, bounded by `queries.max_queries`): events in,
//! rows out, micro-batches, decode errors (DLQ), late events, consumer lag, watermark lag,
//! state size, and the emit-latency histogram (recorded by the pipeline as rows are
//! acknowledged). Per service: queries per state (label `state`, four values) and whether
//! Kafka is reachable. The counters are read from each query's live counters when `/metrics`
//! is scraped; series of a dropped query expire after five minutes. City gauges come from the
//! indicators published ([`CityGauges`]): segments per level of service and each ward's AQI.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

use super::manager::QueryStatus;

/// Name of the emit-latency histogram: from the arrival of the micro-batch that closed a
/// window to the broker's acknowledgement of the result row, seconds.
pub const EMIT_LATENCY: &str = "urbanstream_emit_latency_seconds";

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
        metrics::counter!("urbanstream_late_events_total", &label).absolute(q.late);
        if let Some(lag) = q.consumer_lag {
            metrics::gauge!("urbanstream_consumer_lag_records", &label).set(lag as f64);
        }
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

/// City gauges from the indicators a query publishes: segments per level of service (each
/// segment counted once, at the LOS of its latest window; a segment silent for ten windows
/// drops out), and each ward's latest hourly AQI. Labels are bounded: six LOS letters, and the
/// wards of `schemas/reference/wards.csv` (rows of other entities are not exported).
#[derive(Debug, Clone)]
pub struct CityGauges {
    congestion_topic: String,
    air_topic: String,
    wards: std::collections::HashSet<String>,
    /// Per segment, its latest window.
    segments: std::sync::Arc<std::sync::Mutex<HashMap<String, LatestWindow>>>,
}

/// A segment's latest window: its end, its width (ms) and its LOS (0 = A).
type LatestWindow = (i64, i64, u8);

impl CityGauges {
    /// Gauges for the indicators published to the city's `congestion` and `air` topics.
    pub fn new(congestion_topic: &str, air_topic: &str, wards: &[String]) -> Self {
        Self {
            congestion_topic: congestion_topic.to_string(),
            air_topic: air_topic.to_string(),
            wards: wards.iter().cloned().collect(),
            segments: Default::default(),
        }
    }

    /// Updates the gauges from rows published to `topic` (in the topic's schema).
    pub fn observe(&self, topic: &str, batch: &datafusion::arrow::array::RecordBatch) {
        if topic == self.congestion_topic {
            self.observe_congestion(batch);
        } else if topic == self.air_topic {
            self.observe_air(batch);
        }
    }

    fn observe_congestion(&self, batch: &datafusion::arrow::array::RecordBatch) {
        use datafusion::arrow::array::{Array, AsArray};
        use datafusion::arrow::datatypes::{DataType, Int64Type};
        let (Some(segment), Some(los), Some(start), Some(end)) = (
            strings(batch, "segment_id"),
            strings(batch, "los"),
            numbers(batch, "window_start", &DataType::Int64),
            numbers(batch, "window_end", &DataType::Int64),
        ) else {
            return;
        };
        let (start, end) = (
            start.as_primitive::<Int64Type>(),
            end.as_primitive::<Int64Type>(),
        );
        let Ok(mut segments) = self.segments.lock() else {
            return;
        };
        for i in 0..batch.num_rows() {
            if !(segment.is_valid(i) && los.is_valid(i) && start.is_valid(i) && end.is_valid(i)) {
                continue;
            }
            let Some(level) = los
                .value(i)
                .bytes()
                .next()
                .filter(|b| (b'A'..=b'F').contains(b))
            else {
                continue;
            };
            let (e, width) = (end.value(i), end.value(i) - start.value(i));
            match segments.get_mut(segment.value(i)) {
                Some(latest) if latest.0 > e => {}
                Some(latest) => *latest = (e, width, level - b'A'),
                None => {
                    segments.insert(segment.value(i).to_string(), (e, width, level - b'A'));
                }
            }
        }
        let Some(newest) = segments.values().map(|s| s.0).max() else {
            return;
        };
        segments.retain(|_, (e, width, _)| *e > newest - 10 * (*width).max(1));
        let mut counts = [0u64; 6];
        for (_, _, level) in segments.values() {
            counts[usize::from(*level)] += 1;
        }
        for (level, n) in ["A", "B", "C", "D", "E", "F"].into_iter().zip(counts) {
            metrics::gauge!("urbanstream_segments_by_los", "los" => level).set(n as f64);
        }
    }

    fn observe_air(&self, batch: &datafusion::arrow::array::RecordBatch) {
        use datafusion::arrow::array::{Array, AsArray};
        use datafusion::arrow::datatypes::{DataType, Float64Type};
        let (Some(entity), Some(scope), Some(period), Some(aqi)) = (
            strings(batch, "entity_id"),
            strings(batch, "scope"),
            strings(batch, "period"),
            numbers(batch, "aqi", &DataType::Float64),
        ) else {
            return;
        };
        let aqi = aqi.as_primitive::<Float64Type>();
        for i in 0..batch.num_rows() {
            let valid = [
                entity.is_valid(i),
                scope.is_valid(i),
                period.is_valid(i),
                aqi.is_valid(i),
            ];
            if valid.contains(&false) || scope.value(i) != "ward" || period.value(i) != "hour" {
                continue;
            }
            let ward = entity.value(i);
            if self.wards.contains(ward) {
                metrics::gauge!("urbanstream_ward_aqi", "ward" => ward.to_string())
                    .set(aqi.value(i));
            }
        }
    }
}

/// Column `name` as plain strings, if the batch has it.
fn strings(
    batch: &datafusion::arrow::array::RecordBatch,
    name: &str,
) -> Option<datafusion::arrow::array::StringArray> {
    use datafusion::arrow::array::AsArray;
    let column = batch.column_by_name(name)?;
    let cast =
        datafusion::arrow::compute::cast(column, &datafusion::arrow::datatypes::DataType::Utf8)
            .ok()?;
    Some(cast.as_string::<i32>().clone())
}

/// Column `name` cast to `to`, if the batch has it and it casts.
fn numbers(
    batch: &datafusion::arrow::array::RecordBatch,
    name: &str,
    to: &datafusion::arrow::datatypes::DataType,
) -> Option<datafusion::arrow::array::ArrayRef> {
    datafusion::arrow::compute::cast(batch.column_by_name(name)?, to).ok()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{
        Float64Array, RecordBatch, StringArray, TimestampMillisecondArray,
    };
    use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};

    use super::*;

    /// Regression: the gauge was set from the last published batch alone (14 of 38 segments
    /// when partitions publish a minute in several batches). Each segment counts once, at the
    /// LOS of its latest window, whichever batch brought it.
    #[test]
    fn city_gauges_count_each_segment_once_and_known_wards_only() {
        let gauges = CityGauges::new("cong", "air", &["hoan_kiem".to_string()]);
        let minute = |rows: &[(&str, i64, Option<&str>)]| {
            RecordBatch::try_new(
                Arc::new(Schema::new(vec![
                    Field::new("segment_id", DataType::Utf8, false),
                    Field::new(
                        "window_start",
                        DataType::Timestamp(TimeUnit::Millisecond, None),
                        false,
                    ),
                    Field::new(
                        "window_end",
                        DataType::Timestamp(TimeUnit::Millisecond, None),
                        false,
                    ),
                    Field::new("los", DataType::Utf8, true),
                ])),
                vec![
                    Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
                    Arc::new(TimestampMillisecondArray::from_iter_values(
                        rows.iter().map(|r| r.1 - 60_000),
                    )),
                    Arc::new(TimestampMillisecondArray::from_iter_values(
                        rows.iter().map(|r| r.1),
                    )),
                    Arc::new(StringArray::from_iter(rows.iter().map(|r| r.2))),
                ],
            )
            .expect("batch")
        };
        // Minute 1 of three segments, then minute 2 of two of them in two batches (one per
        // partition); a row without LOS counts nowhere.
        let batches = [
            minute(&[
                ("s1", 60_000, Some("F")),
                ("s2", 60_000, Some("C")),
                ("s3", 60_000, Some("A")),
            ]),
            minute(&[("s1", 120_000, Some("A")), ("s4", 120_000, None)]),
            minute(&[("s2", 120_000, Some("F"))]),
            // A late revision of an older minute does not replace a newer one.
            minute(&[("s1", 60_000, Some("E"))]),
        ];
        let air = RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("entity_id", DataType::Utf8, false),
                Field::new("scope", DataType::Utf8, false),
                Field::new("period", DataType::Utf8, false),
                Field::new("aqi", DataType::Float64, true),
            ])),
            vec![
                Arc::new(StringArray::from(vec!["hoan_kiem", "nowhere", "hoan_kiem"])),
                Arc::new(StringArray::from(vec!["ward", "ward", "ward"])),
                Arc::new(StringArray::from(vec!["hour", "hour", "day"])),
                Arc::new(Float64Array::from(vec![
                    Some(151.0),
                    Some(99.0),
                    Some(80.0),
                ])),
            ],
        )
        .expect("batch");
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            for b in &batches {
                gauges.observe("cong", b);
            }
            gauges.observe("air", &air);
            gauges.observe("elsewhere", &air);
        });
        let text = handle.render();
        // s1 → A (minute 2), s2 → F (minute 2), s3 → A (minute 1).
        for (level, n) in [("A", 2), ("F", 1), ("C", 0), ("E", 0)] {
            assert!(
                text.contains(&format!(
                    "urbanstream_segments_by_los{{los=\"{level}\"}} {n}"
                )),
                "{level}: {text}"
            );
        }
        assert!(
            text.contains("urbanstream_ward_aqi{ward=\"hoan_kiem\"} 151"),
            "{text}"
        );
        assert!(!text.contains("nowhere"), "{text}");
    }
}
