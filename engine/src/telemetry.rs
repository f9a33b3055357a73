//! What the pipeline records about the city and about itself, below the service that exports
//! it: the emit-latency histogram's name, and the city gauges kept from the indicators
//! published ([`CityGauges`]). The service's Prometheus exporter (`service::metrics`) renders
//! them.

use std::collections::HashMap;

/// Name of the emit-latency histogram: from the arrival of the micro-batch that closed a
/// window to the broker's acknowledgement of the result row, seconds.
pub const EMIT_LATENCY: &str = "urbanstream_emit_latency_seconds";

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

    use metrics_exporter_prometheus::PrometheusBuilder;

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
