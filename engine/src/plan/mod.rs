//! Plan: the continuous queries.
//!
//! [`CongestionQuery`] is the first continuous query: 1-minute tumbling windows per road
//! segment over camera detections, with vehicle count, time-mean speed and motorbike share.
//! Each micro-batch is partially aggregated by DataFusion (`date_bin` window start, grouped
//! by segment); the partials are merged into [`WindowState`]; a window is emitted once when
//! the watermark passes its end, and then freed. Events for a window already emitted are
//! diverted as late, never dropped.

pub mod feed;
pub mod rewrite;
pub mod stream;
pub mod table;

use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::{
    Array, ArrayRef, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray,
    TimestampMillisecondArray,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Schema, SchemaRef, TimeUnit};
use datafusion::prelude::SessionContext;

use crate::decode::Decoded;
use crate::error::{Error, Result};
use crate::source::RawBatch;
use crate::state::{SegmentPartial, WindowState};
use crate::time::WatermarkTracker;

/// The SQL of the per-batch partial aggregation. `batch` is the micro-batch.
const PARTIAL_SQL: &str = "\
SELECT date_bin(INTERVAL '1 minute', event_time, TIMESTAMP '1970-01-01T00:00:00') AS window_start,
       segment_id,
       count(*) AS vehicles,
       sum(speed_kmh) AS speed_sum,
       count(speed_kmh) AS speed_n,
       sum(CASE WHEN vehicle_class = 'motorbike' THEN 1 ELSE 0 END) AS motorbikes
FROM batch
WHERE kind = 'detection'
GROUP BY 1, 2";

/// Window width of the congestion query.
pub const WINDOW_MS: i64 = 60_000;

/// Settings of the congestion query's event time.
#[derive(Debug, Clone, Copy)]
pub struct EventTimeConfig {
    /// Allowed out-of-orderness: the watermark trails the largest event time by this much.
    pub watermark_delay: Duration,
    /// A partition with no records for this long stops holding the watermark back.
    pub idle_timeout: Duration,
}

impl Default for EventTimeConfig {
    fn default() -> Self {
        Self {
            watermark_delay: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// An event that arrived after its window was emitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LateEvent {
    /// Index of its record in the raw batch.
    pub index: u32,
    /// Its event time, epoch ms.
    pub event_time: i64,
    /// The query's watermark when it arrived.
    pub watermark: i64,
}

/// What one micro-batch produced.
#[derive(Debug, Default)]
pub struct QueryOutput {
    /// Indicator rows of the windows that closed, in (window_start, segment_id) order.
    pub rows: Option<RecordBatch>,
    /// Events too late for their window.
    pub late: Vec<LateEvent>,
}

/// 1-minute tumbling congestion indicators per segment.
pub struct CongestionQuery {
    ctx: SessionContext,
    state: WindowState,
    watermark: WatermarkTracker,
    /// Windows starting before this have been emitted; their events are late.
    closed_before: i64,
    output_schema: SchemaRef,
}

impl CongestionQuery {
    /// A new query with empty state.
    pub fn new(time: EventTimeConfig) -> Self {
        let output_schema = Arc::new(Schema::new(vec![
            datafusion::arrow::datatypes::Field::new("segment_id", DataType::Utf8, false),
            datafusion::arrow::datatypes::Field::new(
                "window_start",
                DataType::Timestamp(TimeUnit::Millisecond, None),
                false,
            ),
            datafusion::arrow::datatypes::Field::new(
                "window_end",
                DataType::Timestamp(TimeUnit::Millisecond, None),
                false,
            ),
            datafusion::arrow::datatypes::Field::new("vehicles", DataType::Int64, false),
            datafusion::arrow::datatypes::Field::new("mean_speed_kmh", DataType::Float64, true),
            datafusion::arrow::datatypes::Field::new("motorbike_share", DataType::Float64, true),
            datafusion::arrow::datatypes::Field::new("revision", DataType::Int32, false),
        ]));
        Self {
            ctx: SessionContext::new(),
            state: WindowState::default(),
            watermark: WatermarkTracker::new(time.watermark_delay, time.idle_timeout),
            closed_before: i64::MIN,
            output_schema,
        }
    }

    /// The schema of the indicator rows.
    pub fn output_schema(&self) -> SchemaRef {
        self.output_schema.clone()
    }

    /// The current watermark (epoch ms), once any event has been seen.
    pub fn watermark(&self) -> Option<i64> {
        self.watermark.current()
    }

    /// The open windows' state.
    pub fn state(&self) -> &WindowState {
        &self.state
    }

    /// Adds a decoded batch of camera events, then closes the windows the watermark has passed.
    pub async fn process(
        &mut self,
        raw: &RawBatch,
        decoded: &Decoded,
        now: i64,
    ) -> Result<QueryOutput> {
        let batch = &decoded.batch;
        let times = event_times(batch)?;
        let mut late = Vec::new();
        let mut on_time = Vec::with_capacity(batch.num_rows());
        let watermark = self.watermark.current().unwrap_or(i64::MIN);
        for (r, &t) in times.values().iter().enumerate() {
            let index = decoded.rows[r];
            if t < self.closed_before {
                late.push(LateEvent {
                    index,
                    event_time: t,
                    watermark,
                });
                continue;
            }
            on_time.push(r as u32);
            let partition = raw.partitions[index as usize];
            let offset = raw.offsets[index as usize];
            let window = self.state.window_mut(t.div_euclid(WINDOW_MS) * WINDOW_MS);
            window
                .min_offsets
                .entry(partition)
                .and_modify(|m| *m = (*m).min(offset))
                .or_insert(offset);
            self.watermark.observe(partition, t, now);
        }
        if !on_time.is_empty() {
            let on_time_batch = if on_time.len() == batch.num_rows() {
                batch.clone()
            } else {
                crate::decode::take_rows(batch, &on_time)?
            };
            self.aggregate(on_time_batch).await?;
        }
        let rows = self.close(now)?;
        Ok(QueryOutput { rows, late })
    }

    /// Advances the watermark for idle partitions and emits what it closes.
    pub fn tick(&mut self, now: i64) -> Result<Option<RecordBatch>> {
        self.close(now)
    }

    async fn aggregate(&mut self, batch: RecordBatch) -> Result<()> {
        self.ctx.register_batch("batch", batch)?;
        let partials = self.ctx.sql(PARTIAL_SQL).await?.collect().await;
        self.ctx.deregister_table("batch")?;
        for part in partials? {
            let starts = cast(
                part.column(0),
                &DataType::Timestamp(TimeUnit::Millisecond, None),
            )?;
            let starts = starts
                .as_any()
                .downcast_ref::<TimestampMillisecondArray>()
                .ok_or_else(|| Error::Config("window_start is not a timestamp".into()))?;
            let segments = string_column(&part, 1)?;
            let vehicles = int64_column(&part, 2)?;
            let speed_sum = cast(part.column(3), &DataType::Float64)?;
            let speed_sum = speed_sum
                .as_any()
                .downcast_ref::<Float64Array>()
                .ok_or_else(|| Error::Config("speed_sum is not a float".into()))?;
            let speed_n = int64_column(&part, 4)?;
            let motorbikes = int64_column(&part, 5)?;
            for r in 0..part.num_rows() {
                let partial = SegmentPartial {
                    vehicles: vehicles.value(r),
                    speed_sum: if speed_sum.is_null(r) {
                        0.0
                    } else {
                        speed_sum.value(r)
                    },
                    speed_n: speed_n.value(r),
                    motorbikes: motorbikes.value(r),
                };
                self.state
                    .window_mut(starts.value(r))
                    .groups
                    .entry(segments.value(r).to_string())
                    .or_default()
                    .merge(&partial);
            }
        }
        Ok(())
    }

    fn close(&mut self, now: i64) -> Result<Option<RecordBatch>> {
        let Some(watermark) = self.watermark.advance(now) else {
            return Ok(None);
        };
        // A window [s, s + W) is complete once the watermark reaches its end.
        let boundary = watermark.div_euclid(WINDOW_MS) * WINDOW_MS;
        if boundary <= self.closed_before {
            return Ok(None);
        }
        self.closed_before = boundary;
        let closed = self.state.close_before(boundary);
        let mut segment_ids = Vec::new();
        let mut starts = Vec::new();
        let mut vehicles = Vec::new();
        let mut mean_speed = Vec::new();
        let mut share = Vec::new();
        for (start, entry) in closed {
            let mut groups: Vec<_> = entry.groups.into_iter().collect();
            groups.sort_by(|a, b| a.0.cmp(&b.0));
            for (segment, p) in groups {
                segment_ids.push(segment);
                starts.push(start);
                vehicles.push(p.vehicles);
                mean_speed.push((p.speed_n > 0).then(|| p.speed_sum / p.speed_n as f64));
                share.push((p.vehicles > 0).then(|| p.motorbikes as f64 / p.vehicles as f64));
            }
        }
        if segment_ids.is_empty() {
            return Ok(None);
        }
        let ends: Vec<i64> = starts.iter().map(|s| s + WINDOW_MS).collect();
        let n = segment_ids.len();
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(segment_ids)),
            Arc::new(TimestampMillisecondArray::from(starts)),
            Arc::new(TimestampMillisecondArray::from(ends)),
            Arc::new(Int64Array::from(vehicles)),
            Arc::new(Float64Array::from(mean_speed)),
            Arc::new(Float64Array::from(share)),
            Arc::new(Int32Array::from(vec![0; n])),
        ];
        Ok(Some(RecordBatch::try_new(
            self.output_schema.clone(),
            columns,
        )?))
    }
}

fn event_times(batch: &RecordBatch) -> Result<TimestampMillisecondArray> {
    let column = batch
        .column_by_name("event_time")
        .ok_or_else(|| Error::Config("camera events have no event_time column".into()))?;
    let column = cast(column, &DataType::Timestamp(TimeUnit::Millisecond, None))?;
    column
        .as_any()
        .downcast_ref::<TimestampMillisecondArray>()
        .cloned()
        .ok_or_else(|| Error::Config("event_time is not a timestamp".into()))
}

fn string_column(batch: &RecordBatch, i: usize) -> Result<&StringArray> {
    batch
        .column(i)
        .as_any()
        .downcast_ref::<StringArray>()
        .ok_or_else(|| Error::Config(format!("column {i} is not a string")))
}

fn int64_column(batch: &RecordBatch, i: usize) -> Result<&Int64Array> {
    batch
        .column(i)
        .as_any()
        .downcast_ref::<Int64Array>()
        .ok_or_else(|| Error::Config(format!("column {i} is not an int64")))
}
