//! Per-batch cost against the state held, in events per second: one micro-batch of 8 192
//! events (8 192 keys, each once) through a query that already holds 10 000 or 1 000 000
//! live keys. Work proportional to the batch, not to the state, gives the same figure at
//! both sizes. Queries: a 1-hour tumbling window with five aggregates (every key live in the
//! one open window), 30-minute sessions (every key's session open), and `anomaly_score` per
//! key over raw events (every key holding a detector state). Each measured batch is a
//! little later in event time than the one before, so detectors learn from every reading
//! and no window or session closes.
#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::sync::Arc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use datafusion::arrow::array::{
    Float64Array, RecordBatch, StringViewArray, TimestampMillisecondArray,
};

const BATCH: usize = 8_192;
/// 2026-01-01T06:00:00Z.
const T0: i64 = 1_767_247_200_000;
/// Processing time: after every event.
const NOW: i64 = T0 + 3_600_000;

/// Keys `keys` (one event each) at `t`, in batches of the engine's size.
fn batches(keys: std::ops::Range<usize>, t: i64) -> Vec<RecordBatch> {
    let schema = urbanstream_benches::key_time_value_schema();
    keys.clone()
        .step_by(BATCH)
        .map(|start| {
            let end = (start + BATCH).min(keys.end);
            let k = StringViewArray::from_iter_values((start..end).map(|i| format!("seg-{i:07}")));
            let t = TimestampMillisecondArray::from_iter_values((start..end).map(|_| t));
            let v = Float64Array::from_iter_values((start..end).map(|i| (i % 97) as f64));
            RecordBatch::try_new(schema.clone(), vec![Arc::new(k), Arc::new(t), Arc::new(v)])
                .expect("batch")
        })
        .collect()
}

const AGGREGATES: &str = "count(*) AS n, sum(v) AS s, avg(v) AS a, min(v) AS lo, max(v) AS hi";

fn state_size(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let queries = [
        (
            "tumble_1h",
            format!(
                "SELECT k, window_start, {AGGREGATES} FROM ev \
                 GROUP BY tumble(event_time, INTERVAL '1 hour'), k"
            ),
        ),
        (
            "session_30m",
            format!(
                "SELECT k, window_start, {AGGREGATES} FROM ev \
                 GROUP BY session(event_time, INTERVAL '30 minutes'), k"
            ),
        ),
        (
            "anomaly_score",
            "SELECT k, anomaly_score(v, event_time) OVER (PARTITION BY k ORDER BY event_time) \
             AS d FROM ev"
                .to_string(),
        ),
    ];
    let mut group = c.benchmark_group("state_size");
    group.sample_size(20);
    group.throughput(Throughput::Elements(BATCH as u64));
    for (name, select) in &queries {
        for live in [10_000, 1_000_000] {
            let mut q = runtime.block_on(async {
                let mut q = urbanstream_benches::key_time_value_query(select).await;
                for batch in batches(0..live, T0) {
                    let partitions = vec![0; batch.num_rows()];
                    q.process(&batch, &partitions, None, NOW)
                        .await
                        .expect("load");
                }
                q
            });
            assert!(q.state_groups() >= live, "{name}: state not loaded");
            let mut step = 0;
            let partitions = vec![0; BATCH];
            group.bench_function(format!("{name}/{live}_live_keys"), |b| {
                b.iter_batched(
                    || {
                        step += 1;
                        batches(0..BATCH, T0 + 1_000 + step).pop().expect("a batch")
                    },
                    |batch| {
                        runtime.block_on(async {
                            let out = q
                                .process(&batch, &partitions, None, NOW)
                                .await
                                .expect("process");
                            assert!(out.diverted.is_empty(), "events diverted");
                            out
                        })
                    },
                    BatchSize::SmallInput,
                )
            });
            assert!(q.state_groups() >= live, "{name}: state lost");
        }
    }
    group.finish();
}

criterion_group!(benches, state_size);
criterion_main!(benches);
