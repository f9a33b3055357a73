//! Windowed aggregation through the stream engine, in events per second: a 1-minute tumbling
//! window, a 5-minute window hopping by 1 minute, and 30-second sessions, each with five
//! aggregates (`count`, `sum`, `avg`, `min`, `max`) grouped by a key of 100, 10 000 or
//! 1 000 000 distinct values. 1 M events in batches of 8 192 (the engine's batch size) arrive
//! in event-time order over 10 minutes of event time, one event per key in turn, so every
//! key is live in every window; the watermark then closes every window.
//!
//! Two shapes over the 1-minute windows, at 100 and 10 000 keys: windows of windows (the
//! minutes' averages, then a 5-minute window hopping by 1 minute over them, in one query;
//! `two_stage_revisable` with a minute of allowed lateness, so the stage above runs over the
//! minutes' changelog) and top-N per window (the 5 keys with most events each minute, ranked over every key of the
//! window). Compare each with `tumble_1m` of the same run.
#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::sync::Arc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use datafusion::arrow::array::{
    Float64Array, RecordBatch, StringViewArray, TimestampMillisecondArray,
};

const EVENTS: usize = 1_000_000;
const BATCH: usize = 8_192;
/// 2026-01-01T06:00:00Z.
const T0: i64 = 1_767_247_200_000;
const SPAN_MS: i64 = 10 * 60_000;
/// Processing time: after every event.
const NOW: i64 = T0 + 2 * SPAN_MS;

fn batches(keys: usize) -> Vec<RecordBatch> {
    let schema = urbanstream_benches::key_time_value_schema();
    let names: Vec<String> = (0..keys).map(|k| format!("seg-{k:07}")).collect();
    (0..EVENTS)
        .step_by(BATCH)
        .map(|start| {
            let end = (start + BATCH).min(EVENTS);
            let k = StringViewArray::from_iter_values((start..end).map(|i| &names[i % keys]));
            let t = TimestampMillisecondArray::from_iter_values(
                (start..end).map(|i| T0 + i as i64 * SPAN_MS / EVENTS as i64),
            );
            let v = Float64Array::from_iter_values((start..end).map(|i| (i % 97) as f64));
            RecordBatch::try_new(schema.clone(), vec![Arc::new(k), Arc::new(t), Arc::new(v)])
                .expect("batch")
        })
        .collect()
}

const AGGREGATES: &str = "count(*) AS n, sum(v) AS s, avg(v) AS a, min(v) AS lo, max(v) AS hi";

/// The window aggregations measured: (name, query, largest key count).
fn queries() -> Vec<(&'static str, String, usize)> {
    let one =
        |window: &str| format!("SELECT k, window_start, {AGGREGATES} FROM ev GROUP BY {window}, k");
    vec![
        (
            "tumble_1m",
            one("tumble(event_time, INTERVAL '1 minute')"),
            1_000_000,
        ),
        (
            "hop_1m_5m",
            one("hop(event_time, INTERVAL '1 minute', INTERVAL '5 minutes')"),
            1_000_000,
        ),
        (
            "session_30s",
            one("session(event_time, INTERVAL '30 seconds')"),
            1_000_000,
        ),
        (
            "two_stage_1m_then_hop_5m",
            format!(
                "SELECT k, window_start, count(*) AS minutes, avg(a) AS a, min(lo) AS lo, \
                 max(hi) AS hi, sum(n) AS n FROM (SELECT k, window_end AS minute, {AGGREGATES} \
                 FROM ev GROUP BY tumble(event_time, INTERVAL '1 minute'), k) \
                 GROUP BY hop(minute, INTERVAL '1 minute', INTERVAL '5 minutes'), k"
            ),
            10_000,
        ),
        (
            // The same with a minute of allowed lateness: the stage above runs over the
            // changelog of the minutes (a revision replaces its row).
            "two_stage_revisable",
            format!(
                "SET urbanstream.allowed_lateness = '1m'; SELECT k, window_start, count(*) AS \
                 minutes, avg(a) AS a, min(lo) AS lo, max(hi) AS hi, sum(n) AS n FROM (SELECT \
                 k, window_end AS minute, {AGGREGATES} FROM ev GROUP BY tumble(event_time, \
                 INTERVAL '1 minute'), k) GROUP BY hop(minute, INTERVAL '1 minute', INTERVAL \
                 '5 minutes'), k"
            ),
            10_000,
        ),
        (
            "top5_per_1m",
            format!(
                "SELECT * FROM (SELECT k, window_start, n, ROW_NUMBER() OVER (PARTITION BY \
                 window_start ORDER BY n DESC, k) AS place FROM (SELECT k, window_start, \
                 {AGGREGATES} FROM ev GROUP BY tumble(event_time, INTERVAL '1 minute'), k)) \
                 WHERE place <= 5"
            ),
            10_000,
        ),
    ]
}

fn windows(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("windows");
    group.sample_size(10);
    group.throughput(Throughput::Elements(EVENTS as u64));
    for keys in [100, 10_000, 1_000_000] {
        let input = batches(keys);
        for (name, select, _) in queries().into_iter().filter(|q| keys <= q.2) {
            group.bench_function(format!("{name}/{keys}_keys"), |b| {
                b.iter_batched(
                    || runtime.block_on(urbanstream_benches::key_time_value_query(&select)),
                    |mut q| {
                        runtime.block_on(async {
                            let partitions = vec![0; BATCH];
                            let mut rows = 0;
                            for batch in &input {
                                // Processing time after the last event: none is in the future.
                                let mut out = q
                                    .process(batch, &partitions[..batch.num_rows()], None, NOW)
                                    .await
                                    .expect("process");
                                q.finish_step(NOW, &mut out).await.expect("process");
                                assert!(out.diverted.is_empty(), "events diverted");
                                rows += out.rows.iter().map(|b| b.num_rows()).sum::<usize>();
                            }
                            let mut out = q
                                .advance_watermark(T0 + 2 * SPAN_MS, NOW)
                                .await
                                .expect("close");
                            q.finish_step(NOW, &mut out).await.expect("close");
                            rows += out.rows.iter().map(|b| b.num_rows()).sum::<usize>();
                            assert!(rows > 0);
                            (q, rows)
                        })
                    },
                    BatchSize::LargeInput,
                )
            });
        }
    }
    group.finish();
}

criterion_group!(benches, windows);
criterion_main!(benches);
