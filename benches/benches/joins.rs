//! Stream–stream interval joins through the stream engine, in input events per second: two
//! streams of 500 000 events each (1 M in all) over 10 minutes of event time, in batches of
//! 8 192 taken from each stream in turn, with 10 000 keys (each key seen every 12 s on each
//! stream). The right stream's events trail the left's by 4 s, and the join pairs each left
//! event with the right events of its key from 0 to 10 s after it: about one pair per event.
//!
//! `pairs` publishes every pair; `pairs_left_outer` keeps unmatched left events too;
//! `count_per_1m` counts the pairs per minute of the left event time. Compare with
//! `windows/tumble_1m/10000_keys`, a one-stream aggregation over the same number of events.
#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::sync::Arc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use datafusion::arrow::array::{
    Float64Array, RecordBatch, StringViewArray, TimestampMillisecondArray,
};
use urbanstream::plan::stream::{StreamContext, StreamQuery};

const PER_STREAM: usize = 500_000;
const BATCH: usize = 8_192;
const KEYS: usize = 10_000;
/// 2026-01-01T06:00:00Z.
const T0: i64 = 1_767_247_200_000;
const SPAN_MS: i64 = 10 * 60_000;
/// How far the right stream trails the left.
const TRAIL_MS: i64 = 4_000;
/// Processing time: after every event.
const NOW: i64 = T0 + 2 * SPAN_MS;

fn batches(trail: i64) -> Vec<RecordBatch> {
    let schema = urbanstream_benches::key_time_value_schema();
    let names: Vec<String> = (0..KEYS).map(|k| format!("seg-{k:07}")).collect();
    (0..PER_STREAM)
        .step_by(BATCH)
        .map(|start| {
            let end = (start + BATCH).min(PER_STREAM);
            let k = StringViewArray::from_iter_values((start..end).map(|i| &names[i % KEYS]));
            let t = TimestampMillisecondArray::from_iter_values(
                (start..end).map(|i| T0 + trail + i as i64 * SPAN_MS / PER_STREAM as i64),
            );
            let v = Float64Array::from_iter_values((start..end).map(|i| (i % 97) as f64));
            RecordBatch::try_new(schema.clone(), vec![Arc::new(k), Arc::new(t), Arc::new(v)])
                .expect("batch")
        })
        .collect()
}

async fn query(select: &str) -> StreamQuery {
    let ctx = StreamContext::new();
    for stream in ["l", "r"] {
        let sql = format!(
            "CREATE EXTERNAL TABLE {stream} (k VARCHAR NOT NULL, event_time TIMESTAMP NOT NULL, \
             v DOUBLE) STORED AS KAFKA OPTIONS ('topic' '{stream}', 'event_time' 'event_time', \
             'watermark_delay' '0s')"
        );
        for statement in StreamContext::parse(&sql).expect("parse") {
            ctx.plan(statement).await.expect("plan");
        }
    }
    for statement in StreamContext::parse(select).expect("parse") {
        if let Some(q) = ctx.plan(statement).await.expect("plan") {
            return q;
        }
    }
    panic!("no query planned")
}

const BOUND: &str =
    "l.k = r.k AND r.event_time BETWEEN l.event_time AND l.event_time + INTERVAL '10 seconds'";

fn queries() -> Vec<(&'static str, String)> {
    vec![
        (
            "pairs",
            format!(
                "SELECT l.k, l.event_time, r.event_time AS later, l.v + r.v AS v FROM l JOIN r ON {BOUND}"
            ),
        ),
        (
            "pairs_left_outer",
            format!(
                "SELECT l.k, l.event_time, r.event_time AS later, r.v FROM l LEFT JOIN r ON {BOUND}"
            ),
        ),
        (
            "count_per_1m",
            format!(
                "SELECT l.k, window_start, count(*) AS n, avg(r.v) AS v FROM l JOIN r ON {BOUND} \
                 GROUP BY tumble(l.event_time, INTERVAL '1 minute'), l.k"
            ),
        ),
    ]
}

fn joins(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let left = batches(0);
    let right = batches(TRAIL_MS);
    let mut group = c.benchmark_group("joins");
    group.sample_size(10);
    group.throughput(Throughput::Elements(2 * PER_STREAM as u64));
    for (name, select) in queries() {
        group.bench_function(format!("{name}/{KEYS}_keys"), |b| {
            b.iter_batched(
                || runtime.block_on(query(&select)),
                |mut q| {
                    runtime.block_on(async {
                        let partitions = vec![0; BATCH];
                        let mut rows = 0;
                        for (l, r) in left.iter().zip(&right) {
                            for (stream, batch) in [("l", l), ("r", r)] {
                                let out = q
                                    .process_from(
                                        stream,
                                        batch,
                                        &partitions[..batch.num_rows()],
                                        None,
                                        NOW,
                                    )
                                    .await
                                    .expect("process");
                                let mut out = out;
                                q.finish_step(NOW, &mut out).await.expect("process");
                                assert!(out.diverted.is_empty(), "events diverted");
                                rows += out.rows.iter().map(|b| b.num_rows()).sum::<usize>();
                            }
                        }
                        for stream in ["l", "r"] {
                            let mut out = q
                                .advance_watermark_of(stream, T0 + 2 * SPAN_MS, NOW)
                                .await
                                .expect("close");
                            q.finish_step(NOW, &mut out).await.expect("close");
                            rows += out.rows.iter().map(|b| b.num_rows()).sum::<usize>();
                        }
                        assert!(rows > 0);
                        (q, rows)
                    })
                },
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, joins);
criterion_main!(benches);
