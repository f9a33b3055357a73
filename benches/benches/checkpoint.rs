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
//! `paced/…` runs the same micro-batches arriving at about a quarter of the query's full
//! speed (one every 5 ms for the window, 1.6 M events/s; every 20 ms for the detector) and
//! reports as its time the most any micro-batch of a run finished after it arrived: with a
//! checkpoint, how long the query was held up.
//!
//! `checkpoint_keyed/…` is the same for keyed detector state: `anomaly_score` per key over
//! raw events, 10 000 or 100 000 keys, each with a day of profile (a reading every 15
//! minutes for a day; about 5 KB a key in the checkpoint). `lend` shares the keys' map
//! with the checkpoint (a key updated while the checkpoint holds it is copied first, into a
//! state the previous checkpoint let go of);
//! `snapshot_resolved` adds encoding the states into the Arrow table. Its micro-batches
//! move event time on past every event before them, so that every reading is learnt.
//!
//! `checkpoint_changelog/…` is the same for a changelog source's state (the latest row per
//! upsert key) under the 1-hour window per key: 10 000, 100 000 or 1 000 000 keys, each
//! micro-batch replacing the rows of the keys it carries (withdrawn from and added to their
//! windows). `lend` shares the keys' map with the checkpoint, as for detector state; the
//! window over the changelog keeps its input rows per pane, which it still reads out on the
//! query's thread. Not paced.
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
/// The default detector's daily profile: 96 bins of 15 minutes.
const PROFILE_BINS: i64 = 96;
const BIN_MS: i64 = 15 * 60_000;
/// 2026-01-01T06:00:00Z.
const T0: i64 = 1_767_247_200_000;
const SQL: &str = "SELECT k, window_start, count(*) AS n, sum(v) AS s, avg(v) AS a, \
                   min(v) AS lo, max(v) AS hi FROM ev \
                   GROUP BY tumble(event_time, INTERVAL '1 hour'), k";
const CHANGELOG: &str = "SELECT k, window_start, count(*) AS n, sum(v) AS s FROM evu \
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
            tables: q.tables_identity(),
            meta: serde_json::Value::Null,
        }],
        files: Vec::new(),
        partition_counts: Default::default(),
        digests: Default::default(),
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
            ctx.plan(StreamContext::parse(ddl)?.remove(0)).await?;
            let changelog = "CREATE EXTERNAL TABLE evu (k VARCHAR NOT NULL, \
                             event_time TIMESTAMP NOT NULL, v DOUBLE) STORED AS KAFKA \
                             OPTIONS ('topic' 'evu', 'event_time' 'event_time', 'upsert_key' 'k')";
            ctx.plan(StreamContext::parse(changelog)?.remove(0)).await
        })
        .expect("table");
    let dir = std::env::temp_dir().join(format!("urbanstream-bench-{}", std::process::id()));
    let store = CheckpointStore::open(&dir, 1).expect("store");
    let cases = [
        Case {
            group: "checkpoint",
            sql: SQL,
            learns: false,
            held: 1,
            sizes: &[10_000, 100_000, 1_000_000],
            pace: Some(Duration::from_millis(5)),
        },
        // Each key's latest row and its window group: two entries a key.
        Case {
            group: "checkpoint_changelog",
            sql: CHANGELOG,
            learns: false,
            held: 2,
            sizes: &[10_000, 100_000, 1_000_000],
            // At a million keys a micro-batch takes about 26 ms at full speed: 512 paced ones
            // would take over a minute a run. Not paced.
            pace: None,
        },
        // A key's `anomaly_score` state with a day of profile is about 5 KB in a checkpoint
        // (its daily profile, residual window and likelihood histogram; about 9 KB in
        // memory): a million keys would be 5 GB.
        Case {
            group: "checkpoint_keyed",
            sql: KEYED,
            learns: true,
            held: 1,
            sizes: &[10_000, 100_000],
            pace: Some(Duration::from_millis(20)),
        },
    ];
    for case in &cases {
        let mut group = c.benchmark_group(case.group);
        group.sample_size(10);
        for &keys in case.sizes {
            sizes(&mut group, &runtime, &ctx, &store, case, keys);
        }
        group.finish();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// One group of benches.
struct Case {
    group: &'static str,
    /// The query.
    sql: &'static str,
    /// Whether every reading must be later than the last (a detector's, to be learnt):
    /// each micro-batch then moves event time on past every event before it.
    learns: bool,
    /// Entries of state held per key (when not `learns`).
    held: usize,
    /// Groups or keys held.
    sizes: &'static [usize],
    /// Paced micro-batches arrive one per this: about a quarter of what the query takes at
    /// full speed (200 a second, 1.6 M events/s, for the window; 50 a second for the
    /// detector, which runs at about 2 M readings/s); `None`: no paced benches.
    pace: Option<Duration>,
}

/// The benches of `case` holding `keys` groups or keys.
fn sizes(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    runtime: &tokio::runtime::Runtime,
    ctx: &StreamContext,
    store: &CheckpointStore,
    case: &Case,
    keys: usize,
) {
    let Case {
        sql,
        learns,
        held,
        pace,
        ..
    } = *case;
    let input = batches(keys);
    let mut q = runtime.block_on(loaded(ctx, sql, &input));
    if !learns {
        assert_eq!(q.state_groups(), held * keys);
    }
    // A detector's keys hold a day of profile, as a deployment's do after their first day:
    // one reading a key every 15 minutes for a day, each bin of the daily profile seen once.
    let warmed = if learns { PROFILE_BINS - 1 } else { 0 };
    runtime.block_on(async {
        for pass in 1..=warmed {
            let by = pass * BIN_MS;
            for b in &input {
                let partitions = vec![0; b.num_rows()];
                q.process(&later(b, by), &partitions, None, T0 + 2_000_000 + by)
                    .await
                    .expect("process");
            }
        }
    });
    let mut clock = learns.then_some(Clock {
        at: warmed * BIN_MS,
        step: keys as i64,
    });
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
    // Paced: the time reported is the most any micro-batch of a run finished after it
    // arrived; otherwise, the time of the whole run.
    for paced in std::iter::once(None).chain(pace.map(Some)) {
        for checkpoint in [Checkpoint::None, Checkpoint::Lent, Checkpoint::ReadOnThread] {
            let name = checkpoint.name();
            let mode = if paced.is_some() {
                "paced"
            } else {
                "micro_batches"
            };
            let (mut longest, mut catch_up) = (Duration::ZERO, Duration::ZERO);
            group.bench_function(format!("{mode}/{name}/{keys}"), |b| {
                b.iter_custom(|iterations| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iterations {
                        let run = runtime.block_on(micro_batches(
                            &mut q,
                            updates,
                            checkpoint,
                            store,
                            clock.as_mut(),
                            paced,
                        ));
                        total += if paced.is_some() {
                            run.latest
                        } else {
                            run.elapsed
                        };
                        longest = longest.max(run.slowest);
                        catch_up = catch_up.max(run.catch_up);
                    }
                    total
                })
            });
            if paced.is_none() && longest > Duration::ZERO {
                eprintln!(
                    "micro_batches/{name}/{keys}: longest micro-batch {longest:?}, longest \
                     catching up at the end {catch_up:?}"
                );
            }
        }
    }
    group.throughput(Throughput::Elements(keys as u64));
    group.bench_function(format!("read_and_restore/{keys}"), |b| {
        b.iter_batched(
            || runtime.block_on(query(ctx, sql)),
            |mut fresh| {
                let c = store.latest().expect("read").expect("a checkpoint");
                fresh.restore(&c.queries[0], T0).expect("restore");
                if !learns {
                    assert_eq!(fresh.state_groups(), held * keys);
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

impl Checkpoint {
    fn name(self) -> &'static str {
        match self {
            Checkpoint::None => "plain",
            Checkpoint::Lent => "with_checkpoint",
            Checkpoint::ReadOnThread => "read_on_thread",
        }
    }
}

/// What [`micro_batches`] measured.
struct Run {
    /// All the micro-batches, the snapshot and the catching up at the end.
    elapsed: Duration,
    /// The longest micro-batch (the snapshot counting as one).
    slowest: Duration,
    /// Catching up at the end.
    catch_up: Duration,
    /// Paced: the most a micro-batch finished after it arrived.
    latest: Duration,
}

/// Processes `updates` as micro-batches after `checkpoint` (written on another thread); the
/// time of all of them (the snapshot included), of the longest, and of catching up with the
/// updates still waiting at the end. The state is back in place when it returns, as the next
/// checkpoint would find it. With a `clock`, each micro-batch's event times (and processing
/// time) are moved on by it, and it by its step. With a `pace`, micro-batch `i` arrives `i`
/// paces after the start (the snapshot is taken at the start) and is processed no earlier.
async fn micro_batches(
    q: &mut StreamQuery,
    updates: &[RecordBatch],
    checkpoint: Checkpoint,
    store: &CheckpointStore,
    mut clock: Option<&mut Clock>,
    pace: Option<Duration>,
) -> Run {
    let start = Instant::now();
    let (mut slowest, mut latest) = (Duration::ZERO, Duration::ZERO);
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
    for (i, b) in updates.iter().enumerate() {
        let arrives = pace.map(|p| start + p * i as u32);
        if let Some(due) = arrives {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
        let moved;
        let (b, by) = match clock.as_deref_mut() {
            None => (b, 0),
            Some(clock) => {
                clock.at += clock.step;
                moved = later(b, clock.at);
                (&moved, clock.at)
            }
        };
        let at = Instant::now();
        let partitions = vec![0; b.num_rows()];
        q.process(b, &partitions, None, T0 + 2_000_000 + by)
            .await
            .expect("process");
        slowest = slowest.max(at.elapsed());
        if let Some(due) = arrives {
            latest = latest.max(due.elapsed());
        }
    }
    let mut run = Run {
        elapsed: start.elapsed(),
        slowest,
        catch_up: Duration::ZERO,
        latest,
    };
    if let Some(w) = writer {
        w.join().expect("writer");
        // The next checkpoint takes the pane back and applies the updates still waiting:
        // their cost is the updates', counted here, as the last micro-batch's.
        let at = Instant::now();
        q.snapshot(T0).expect("snapshot");
        run.catch_up = at.elapsed();
        run.elapsed += run.catch_up;
    }
    run
}

/// How far `micro_batches` has moved event time on, and by how much each micro-batch.
struct Clock {
    at: i64,
    step: i64,
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
