//! Checkpoint cost of window state, in (window, group) partials per second: a 1-hour tumbling
//! window with five aggregates (`count`, `sum`, `avg`, `min`, `max`) holding 10 000, 100 000
//! or 1 000 000 groups, taken (`lend`: what the query's thread does, lending its panes to
//! the checkpoint), read out (`snapshot_resolved`: plus the state read out into Arrow
//! tables, which the writing thread does), written (`snapshot_and_write`: plus the Arrow IPC
//! files and manifest, fsynced and renamed into place) and restored (`read_and_restore`: read
//! back and merged into a freshly planned query).
//!
//! `micro_batches/…` is what a checkpoint costs the query itself: 512 micro-batches of (up
//! to) 8 192 events updating the state, going round the groups (`plain`; throughput in
//! events), and the same with a checkpoint taken before the first
//! and written on another thread meanwhile (`with_checkpoint`), the lent pane's updates
//! waiting until it is back; `read_on_thread` reads the state out on the query's thread
//! before handing the write on, as checkpoints were taken before panes were lent. The longest
//! single micro-batch of each (the snapshot counting as one; warm-up runs included) is printed.
//!
//! `checkpoint_keyed/…` is the same for keyed detector state: `anomaly_score` per key over
//! raw events, 10 000, 100 000 or 1 000 000 keys. `lend` takes a reference to each key's
//! state (a key updated while a checkpoint holds it is copied first); `snapshot_resolved`
//! adds encoding the states into the Arrow table. Its micro-batches move event time on by a
//! second each, so that every reading is learnt.
#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use datafusion::arrow::array::{
    AsArray, Float64Array, RecordBatch, StringViewArray, TimestampMillisecondArray,
};
use datafusion::arrow::datatypes::TimestampMillisecondType;
use urbanstream::checkpoint::{CheckpointStore, Manifest, QueryManifest, StateSnapshot};
use urbanstream::plan::stream::{StreamContext, StreamQuery};

const BATCH: usize = 8_192;
/// 2026-01-01T06:00:00Z.
const T0: i64 = 1_767_247_200_000;
const SQL: &str = "SELECT k, window_start, count(*) AS n, sum(v) AS s, avg(v) AS a, \
                   min(v) AS lo, max(v) AS hi FROM ev \
                   GROUP BY tumble(event_time, INTERVAL '1 hour'), k";
const KEYED: &str = "SELECT k, anomaly_score(v, event_time) \
                     OVER (PARTITION BY k ORDER BY event_time) AS d FROM ev";

/// One event per key, in batches of the engine's size.
fn batches(keys: usize) -> Vec<RecordBatch> {
    let schema = urbanstream_benches::key_time_value_schema();
    (0..keys)
        .step_by(BATCH)
        .map(|start| {
            let end = (start + BATCH).min(keys);
            let k = StringViewArray::from_iter_values((start..end).map(|i| format!("seg-{i:07}")));
            let t =
                TimestampMillisecondArray::from_iter_values((start..end).map(|i| T0 + i as i64));
            let v = Float64Array::from_iter_values((start..end).map(|i| (i % 97) as f64));
            RecordBatch::try_new(schema.clone(), vec![Arc::new(k), Arc::new(t), Arc::new(v)])
                .expect("batch")
        })
        .collect()
}

async fn query(ctx: &StreamContext, sql: &str) -> StreamQuery {
    let statement = StreamContext::parse(sql).expect("parse").remove(0);
    ctx.plan(statement)
        .await
        .expect("plan")
        .expect("a stream query")
}

async fn loaded(ctx: &StreamContext, sql: &str, input: &[RecordBatch]) -> StreamQuery {
    let mut q = query(ctx, sql).await;
    for b in input {
        let partitions = vec![0; b.num_rows()];
        q.process(b, &partitions, None, T0 + 2_000_000)
            .await
            .expect("process");
    }
    q
}

fn manifest(q: &StreamQuery) -> Manifest {
    Manifest {
        version: 0,
        epoch: 1,
        created_at_ms: T0,
        positions: Vec::new(),
        outputs: Vec::new(),
        queries: vec![QueryManifest {
            name: "bench".into(),
            sql: q.sql().to_string(),
            layout: q.state_layout(),
            settings: q.settings_sql(),
            meta: serde_json::Value::Null,
        }],
        files: Vec::new(),
        partition_counts: Default::default(),
    }
}

fn checkpoint(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let ctx = StreamContext::new();
    runtime
        .block_on(async {
            let ddl = "CREATE EXTERNAL TABLE ev (k VARCHAR NOT NULL, event_time TIMESTAMP NOT NULL, \
                       v DOUBLE) STORED AS KAFKA OPTIONS ('topic' 'ev', 'event_time' 'event_time')";
            ctx.plan(StreamContext::parse(ddl)?.remove(0)).await
        })
        .expect("table");
    let dir = std::env::temp_dir().join(format!("urbanstream-bench-{}", std::process::id()));
    let store = CheckpointStore::open(&dir, 1).expect("store");
    for (name, sql, learns) in [
        ("checkpoint", SQL, false),
        ("checkpoint_keyed", KEYED, true),
    ] {
        let mut group = c.benchmark_group(name);
        group.sample_size(10);
        for keys in [10_000, 100_000, 1_000_000] {
            sizes(&mut group, &runtime, &ctx, &store, sql, keys, learns);
        }
        group.finish();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The benches of one query (`sql`) holding `keys` groups or keys; with `learns`, the
/// micro-batches move event time on by a second each.
fn sizes(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    runtime: &tokio::runtime::Runtime,
    ctx: &StreamContext,
    store: &CheckpointStore,
    sql: &str,
    keys: usize,
    learns: bool,
) {
    let input = batches(keys);
    let mut q = runtime.block_on(loaded(ctx, sql, &input));
    if !learns {
        assert_eq!(q.state_groups(), keys);
    }
    let mut clock = learns.then_some(0);
    group.throughput(Throughput::Elements(keys as u64));
    group.bench_function(format!("lend/{keys}"), |b| {
        b.iter(|| q.snapshot(T0).expect("snapshot"))
    });
    group.bench_function(format!("snapshot_resolved/{keys}"), |b| {
        b.iter(|| {
            let mut state = q.snapshot(T0).expect("snapshot");
            state.resolve().expect("resolve");
            state
        })
    });
    group.bench_function(format!("snapshot_and_write/{keys}"), |b| {
        b.iter(|| {
            let state: StateSnapshot = q.snapshot(T0).expect("snapshot");
            store.write(manifest(&q), vec![state]).expect("write")
        })
    });
    let written = store
        .write(manifest(&q), vec![q.snapshot(T0).expect("snapshot")])
        .expect("write");
    eprintln!("checkpoint of {keys} groups: {} bytes", written.bytes);
    let updates: Vec<RecordBatch> = input.iter().cycle().take(MICRO_BATCHES).cloned().collect();
    let updates = &updates[..];
    group.throughput(Throughput::Elements(
        updates.iter().map(|b| b.num_rows() as u64).sum(),
    ));
    for checkpoint in [Checkpoint::None, Checkpoint::Lent, Checkpoint::ReadOnThread] {
        let name = match checkpoint {
            Checkpoint::None => "plain",
            Checkpoint::Lent => "with_checkpoint",
            Checkpoint::ReadOnThread => "read_on_thread",
        };
        let (mut longest, mut catch_up) = (Duration::ZERO, Duration::ZERO);
        group.bench_function(format!("micro_batches/{name}/{keys}"), |b| {
            b.iter_custom(|iterations| {
                let mut total = Duration::ZERO;
                for _ in 0..iterations {
                    let (elapsed, slowest, rest) = runtime.block_on(micro_batches(
                        &mut q,
                        updates,
                        checkpoint,
                        store,
                        clock.as_mut(),
                    ));
                    total += elapsed;
                    longest = longest.max(slowest);
                    catch_up = catch_up.max(rest);
                }
                total
            })
        });
        eprintln!(
            "micro_batches/{name}/{keys}: longest micro-batch {longest:?}, longest \
                 catching up at the end {catch_up:?}"
        );
    }
    group.throughput(Throughput::Elements(keys as u64));
    group.bench_function(format!("read_and_restore/{keys}"), |b| {
        b.iter_batched(
            || runtime.block_on(query(ctx, sql)),
            |mut fresh| {
                let c = store.latest().expect("read").expect("a checkpoint");
                fresh.restore(&c.queries[0], T0).expect("restore");
                if !learns {
                    assert_eq!(fresh.state_groups(), keys);
                }
                fresh
            },
            BatchSize::PerIteration,
        )
    });
}

/// Micro-batches per `micro_batches` sample.
const MICRO_BATCHES: usize = 512;

/// How `micro_batches` checkpoints.
#[derive(Clone, Copy)]
enum Checkpoint {
    None,
    /// The state lent, read out and written on another thread.
    Lent,
    /// The state read out on the query's thread, written on another.
    ReadOnThread,
}

/// Processes `updates` as micro-batches after `checkpoint` (written on another thread); the
/// time of all of them (the snapshot included), of the longest, and of catching up with the
/// updates still waiting at the end. The state is back in place when it returns, as the next
/// checkpoint would find it. With a `clock`, each micro-batch's event times are moved on by
/// it, and it by a second.
async fn micro_batches(
    q: &mut StreamQuery,
    updates: &[RecordBatch],
    checkpoint: Checkpoint,
    store: &CheckpointStore,
    mut clock: Option<&mut i64>,
) -> (Duration, Duration, Duration) {
    let start = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut writer = None;
    if !matches!(checkpoint, Checkpoint::None) {
        let mut state = q.snapshot(T0).expect("snapshot");
        if matches!(checkpoint, Checkpoint::ReadOnThread) {
            state.resolve().expect("resolve");
        }
        slowest = start.elapsed();
        let (store, manifest) = (store.clone(), manifest(q));
        writer = Some(std::thread::spawn(move || {
            store.write(manifest, vec![state]).expect("write")
        }));
    }
    for b in updates {
        let moved;
        let b = match clock.as_deref_mut() {
            None => b,
            Some(clock) => {
                *clock += 1_000;
                moved = later(b, *clock);
                &moved
            }
        };
        let at = Instant::now();
        let partitions = vec![0; b.num_rows()];
        q.process(b, &partitions, None, T0 + 2_000_000)
            .await
            .expect("process");
        slowest = slowest.max(at.elapsed());
    }
    let elapsed = start.elapsed();
    if let Some(w) = writer {
        w.join().expect("writer");
        // The next checkpoint takes the pane back and applies the updates still waiting:
        // their cost is the updates', counted here, as the last micro-batch's.
        let at = Instant::now();
        q.snapshot(T0).expect("snapshot");
        return (elapsed + at.elapsed(), slowest, at.elapsed());
    }
    (elapsed, slowest, Duration::ZERO)
}

/// `b` with its event times `by` milliseconds later.
fn later(b: &RecordBatch, by: i64) -> RecordBatch {
    let t = b.column(1).as_primitive::<TimestampMillisecondType>();
    let t: TimestampMillisecondArray = t.unary(|t| t + by);
    let mut columns = b.columns().to_vec();
    columns[1] = Arc::new(t);
    RecordBatch::try_new(b.schema(), columns).expect("batch")
}

criterion_group!(benches, checkpoint);
criterion_main!(benches);
