//! The stream core against a model, over everything the world varies: random events with two
//! group keys (one nullable), spread over 4 partitions, arriving out of order within and
//! beyond the allowed lateness, cut into random micro-batches, with restarts from
//! checkpoints at random points and, in half the runs, early fires; for tumbling, hopping, cumulating and session windows with
//! count, sum, avg, min, max, count distinct and an ordered aggregate.
//!
//! The model follows the engine's promises: the query watermark is the lowest of the
//! partitions' largest event times (monotonic); an event is late when every window it
//! belongs to ended at least the allowed lateness before the watermark at its arrival (the
//! one the events before it made, whatever the micro-batches; for sessions, the one at the
//! start of its micro-batch), and late for one window (recorded with that window) when only
//! some of them did. Then:
//! - the changelog applied (the last revision of each key and window; for sessions, upsert
//!   by key and window start and delete on retract) equals a batch DataFusion query over the
//!   (event, window) pairs the model keeps;
//! - the late records are exactly the model's, with their reasons and windows.
//!
//! And the default detector with an alert machine above per-minute counts (no allowed
//! lateness: each window published once), over the same runs: the rows (count, score, alert
//! state) equal the same SQL over the windows of the events the model keeps, run as one
//! batch DataFusion query.
//!
//! And `LAG` over the raw events per two keys (one nullable), over the same runs: an event
//! behind the watermark at its arrival is late, every other one is published once with its
//! key's previous values, equal to the batch query over the events kept.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, Int32Array, Int64Array, RecordBatch, StringArray,
    TimestampMillisecondArray,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Float64Type, Int64Type, SchemaRef, TimeUnit};
use datafusion::arrow::util::display::array_value_to_string;
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use proptest::prelude::*;
use urbanstream::deterministic::{DeterministicEngine, Outcome};
use urbanstream_tests::plan_query;

/// 2026-01-01T06:00:00Z.
const T0: i64 = 1_767_247_200_000;
const MIN: i64 = 60_000;
/// Allowed lateness.
const LATENESS: i64 = 2 * MIN;
const PARTITIONS: i32 = 4;

#[derive(Debug, Clone, Copy)]
enum Kind {
    Tumble,
    Hop,
    Cumulate,
    Session,
}

/// The session gap.
const GAP: i64 = 2 * MIN;

impl Kind {
    fn sql(self) -> &'static str {
        match self {
            Kind::Tumble => "tumble(t, INTERVAL '1 minute')",
            Kind::Hop => "hop(t, INTERVAL '1 minute', INTERVAL '3 minutes')",
            Kind::Cumulate => "cumulate(t, INTERVAL '1 minute', INTERVAL '3 minutes')",
            Kind::Session => "session(t, INTERVAL '2 minutes')",
        }
    }

    /// The windows (start, end) holding `t`.
    fn windows(self, t: i64) -> Vec<(i64, i64)> {
        match self {
            Kind::Tumble => {
                let s = t.div_euclid(MIN) * MIN;
                vec![(s, s + MIN)]
            }
            Kind::Hop => {
                let last = t.div_euclid(MIN) * MIN;
                (0..3)
                    .map(|k| (last - k * MIN, last - k * MIN + 3 * MIN))
                    .collect()
            }
            Kind::Cumulate => {
                let period = t.div_euclid(3 * MIN) * 3 * MIN;
                let first_end = period + (t - period).div_euclid(MIN) * MIN + MIN;
                (first_end..=period + 3 * MIN)
                    .step_by(MIN as usize)
                    .map(|end| (period, end))
                    .collect()
            }
            Kind::Session => unreachable!("sessions have their own model"),
        }
    }
}

#[derive(Debug, Clone)]
struct Event {
    k: &'static str,
    g: Option<i32>,
    t: i64,
    v: i64,
    partition: i32,
}

/// A run: micro-batches in arrival order (each from one partition), and after which of them
/// the engine restarts from a checkpoint.
#[derive(Debug, Clone)]
struct Run {
    batches: Vec<Vec<Event>>,
    restarts: Vec<bool>,
    /// Whether windows fire early (partial results every 10 s of processing time, which moves
    /// 7 s per micro-batch).
    early_fire: bool,
}

fn run() -> impl Strategy<Value = Run> {
    // Event time within 20 minutes; arrival delays up to 6 minutes, beyond the 2 minutes of
    // allowed lateness for some.
    let event = (
        0usize..3,
        prop::option::weighted(0.8, 0i32..2),
        0i64..1_200,
        -20i64..20,
        prop_oneof![3 => 0i64..90_000, 1 => 0i64..360_000],
        0..PARTITIONS,
    );
    (
        prop::collection::vec(event, 1..90),
        prop::collection::vec(0usize..90, 0..12),
        prop::collection::vec(any::<bool>(), 0..120),
        any::<bool>(),
    )
        .prop_map(|(raw, mut cuts, restart_draws, early_fire)| {
            let mut arrivals: Vec<(i64, Event)> = raw
                .into_iter()
                .enumerate()
                .map(|(i, (k, g, second, v, delay, partition))| {
                    // Distinct event times (ms apart), so that ordered aggregates have one
                    // answer.
                    let t = T0 + second * 1_000 + i as i64;
                    let k = ["a", "b", "c"][k];
                    (
                        t + delay,
                        Event {
                            k,
                            g,
                            t,
                            v,
                            partition,
                        },
                    )
                })
                .collect();
            arrivals.sort_by_key(|(arrival, _)| *arrival);
            let events: Vec<Event> = arrivals.into_iter().map(|(_, e)| e).collect();
            cuts.sort_unstable();
            // Cut the arrivals, then split each piece by partition (one micro-batch each).
            let mut batches = Vec::new();
            let mut start = 0;
            for cut in cuts.into_iter().chain(std::iter::once(events.len())) {
                let cut = cut.clamp(start, events.len());
                let mut by_partition: BTreeMap<i32, Vec<Event>> = BTreeMap::new();
                for e in &events[start..cut] {
                    by_partition.entry(e.partition).or_default().push(e.clone());
                }
                batches.extend(by_partition.into_values());
                start = cut;
            }
            let restarts = (0..batches.len())
                .map(|i| restart_draws.get(i).copied().unwrap_or(false))
                .collect();
            Run {
                batches,
                restarts,
                early_fire,
            }
        })
}

fn time_text(ms: i64) -> String {
    let a = TimestampMillisecondArray::from(vec![ms]);
    array_value_to_string(&a, 0).expect("timestamp")
}

/// An event and one of its windows (start, end).
type Pair = (Event, (i64, i64));

/// A late record: the event's time and the reason (with the window it missed).
type Late = (i64, String);

/// What the model expects: the (event, window) pairs that count, and the late records.
fn model(kind: Kind, run: &Run) -> (Vec<Pair>, Vec<Late>) {
    if let Kind::Session = kind {
        return session_model(run);
    }
    model_with(kind, run, LATENESS)
}

/// [`model`] with `lateness` of allowed lateness.
fn model_with(kind: Kind, run: &Run, lateness: i64) -> (Vec<Pair>, Vec<Late>) {
    let mut pairs = Vec::new();
    let mut late = Vec::new();
    let mut max_by_partition: BTreeMap<i32, i64> = BTreeMap::new();
    let mut watermark = i64::MIN;
    for e in run.batches.iter().flatten() {
        // Judged by the watermark the events before it made, however they were cut.
        let frontier = watermark.saturating_sub(lateness);
        // Late or not, an event shows how far its partition has come.
        let m = max_by_partition.entry(e.partition).or_insert(e.t);
        *m = (*m).max(e.t);
        if let Some(lowest) = max_by_partition.values().min() {
            watermark = watermark.max(*lowest);
        }
        let windows = kind.windows(e.t);
        if windows.iter().all(|(_, end)| *end <= frontier) {
            late.push((e.t, "beyond_allowed_lateness".to_string()));
            continue;
        }
        for w in windows {
            if w.1 <= frontier {
                late.push((
                    e.t,
                    format!("window_closed [{}, {})", time_text(w.0), time_text(w.1)),
                ));
            } else {
                pairs.push((e.clone(), w));
            }
        }
    }
    late.sort();
    (pairs, late)
}

/// A session of the model: its span and events.
struct ModelSession {
    start: i64,
    last: i64,
    events: Vec<Event>,
}

/// Sessions as the engine promises them: per key, events less than the gap apart form one
/// session. An event arriving when the watermark is past allowed lateness for a session of
/// its own, `[t, t + gap)`, is late unless a live session of its key reaches it (lateness is
/// tested against the merged session, with the events before it in arrival order). A
/// session is freed once the watermark passes its end plus allowed lateness; an event after
/// that starts a new session.
fn session_model(run: &Run) -> (Vec<Pair>, Vec<Late>) {
    let mut live: BTreeMap<(&str, Option<i32>), Vec<ModelSession>> = BTreeMap::new();
    let mut done: Vec<ModelSession> = Vec::new();
    let mut late = Vec::new();
    let mut max_by_partition: BTreeMap<i32, i64> = BTreeMap::new();
    let mut watermark = i64::MIN;
    let reaches = |s: &ModelSession, t: i64| s.start - GAP < t && t < s.last + GAP;
    for batch in &run.batches {
        let frontier = watermark.saturating_sub(LATENESS);
        for e in batch {
            let absorbed = live
                .get(&(e.k, e.g))
                .is_some_and(|sessions| sessions.iter().any(|s| reaches(s, e.t)));
            let m = max_by_partition.entry(e.partition).or_insert(e.t);
            *m = (*m).max(e.t);
            if e.t + GAP <= frontier && !absorbed {
                late.push((e.t, "beyond_allowed_lateness".to_string()));
                continue;
            }
            let sessions = live.entry((e.k, e.g)).or_default();
            let (touching, rest): (Vec<ModelSession>, Vec<ModelSession>) =
                sessions.drain(..).partition(|s| reaches(s, e.t));
            let mut merged = ModelSession {
                start: e.t,
                last: e.t,
                events: vec![e.clone()],
            };
            for s in touching {
                merged.start = merged.start.min(s.start);
                merged.last = merged.last.max(s.last);
                merged.events.extend(s.events);
            }
            *sessions = rest;
            sessions.push(merged);
        }
        if let Some(lowest) = max_by_partition.values().min() {
            watermark = watermark.max(*lowest);
        }
        let frontier = watermark.saturating_sub(LATENESS);
        for sessions in live.values_mut() {
            let (gone, kept): (Vec<ModelSession>, Vec<ModelSession>) =
                sessions.drain(..).partition(|s| s.last + GAP <= frontier);
            done.extend(gone);
            *sessions = kept;
        }
    }
    done.extend(live.into_values().flatten());
    let pairs = done
        .into_iter()
        .flat_map(|s| {
            let window = (s.start, s.last + GAP);
            s.events.into_iter().map(move |e| (e, window))
        })
        .collect();
    late.sort();
    (pairs, late)
}

/// (k, g, window start, window end) → (n, s, avg, lo, hi, distinct, first).
type Results = BTreeMap<(String, Option<i64>, i64, i64), (i64, i64, String, i64, i64, i64, i64)>;

const AGGREGATES: &str = "count(*) AS n, sum(v) AS s, avg(v) AS a, min(v) AS lo, max(v) AS hi, \
     count(DISTINCT v % 5) AS d, first_value(v ORDER BY t) AS f";

/// How output rows are applied.
#[derive(Clone, Copy, PartialEq)]
enum Apply {
    /// One row per key and window (a batch query).
    Once,
    /// The last revision per key and window counts.
    LatestRevision,
    /// A changelog applied in order: upsert by key and window start, delete on `retract`
    /// (sessions, whose end moves and whose rows may be withdrawn).
    Changelog,
}

fn results(batches: &[RecordBatch], apply: Apply) -> anyhow::Result<Results> {
    let latest_revision = apply == Apply::LatestRevision;
    let mut latest: BTreeMap<(String, Option<i64>, i64, i64), (i32, _)> = BTreeMap::new();
    let mut changelog: BTreeMap<(String, Option<i64>, i64), (i64, _)> = BTreeMap::new();
    let ts = DataType::Timestamp(TimeUnit::Millisecond, None);
    for b in batches {
        let col = |name: &str, t: &DataType| -> anyhow::Result<ArrayRef> {
            let c = b
                .column_by_name(name)
                .ok_or_else(|| anyhow::anyhow!("column {name}"))?;
            Ok(cast(c, t)?)
        };
        let k = col("k", &DataType::Utf8)?;
        let k = k.as_string::<i32>();
        let g = col("g", &DataType::Int64)?;
        let g = g.as_primitive::<Int64Type>();
        let (ws, we) = (col("window_start", &ts)?, col("window_end", &ts)?);
        let ws = ws
            .as_any()
            .downcast_ref::<TimestampMillisecondArray>()
            .expect("ts");
        let we = we
            .as_any()
            .downcast_ref::<TimestampMillisecondArray>()
            .expect("ts");
        let ints: Vec<ArrayRef> = ["n", "s", "lo", "hi", "d", "f"]
            .iter()
            .map(|c| col(c, &DataType::Int64))
            .collect::<anyhow::Result<_>>()?;
        let ints: Vec<&Int64Array> = ints.iter().map(|a| a.as_primitive::<Int64Type>()).collect();
        let avg = col("a", &DataType::Float64)?;
        let avg = avg.as_primitive::<Float64Type>();
        let revision: ArrayRef = if latest_revision {
            col("revision", &DataType::Int32)?
        } else {
            Arc::new(Int32Array::from(vec![0; b.num_rows()]))
        };
        let revision = revision.as_any().downcast_ref::<Int32Array>().expect("int");
        for r in 0..b.num_rows() {
            let key = (
                k.value(r).to_string(),
                (!g.is_null(r)).then(|| g.value(r)),
                ws.value(r),
                we.value(r),
            );
            let value = (
                ints[0].value(r),
                ints[1].value(r),
                format!("{:.6}", avg.value(r)),
                ints[2].value(r),
                ints[3].value(r),
                ints[4].value(r),
                ints[5].value(r),
            );
            if apply == Apply::Changelog {
                let (k, g, ws, we) = key;
                let op = col("op", &DataType::Utf8)?;
                let op = op.as_string::<i32>().value(r);
                if op == "retract" {
                    changelog.remove(&(k, g, ws));
                } else {
                    changelog.insert((k, g, ws), (we, value));
                }
                continue;
            }
            let rev = revision.value(r);
            match latest.get(&key) {
                Some((seen, _)) if *seen > rev => {}
                _ => {
                    latest.insert(key, (rev, value));
                }
            }
        }
    }
    if apply == Apply::Changelog {
        return Ok(changelog
            .into_iter()
            .map(|((k, g, ws), (we, v))| ((k, g, ws, we), v))
            .collect());
    }
    Ok(latest.into_iter().map(|(k, (_, v))| (k, v)).collect())
}

/// The engine's changelog (last revision per key and window) and late records.
async fn engine(kind: Kind, run: &Run) -> anyhow::Result<(Results, Vec<Late>)> {
    let (out, late) = published(kind, run).await?;
    let apply = match kind {
        Kind::Session => Apply::Changelog,
        _ => Apply::LatestRevision,
    };
    Ok((results(&out, apply)?, late))
}

/// The runs' stream: processing time moves only with early fire; partitions never count as
/// idle.
const EV: &str = "CREATE EXTERNAL TABLE ev (k VARCHAR NOT NULL, g INT, t TIMESTAMP NOT NULL, \
     v BIGINT NOT NULL) STORED AS KAFKA OPTIONS ('topic' 'ev', 'event_time' 't', \
     'watermark_delay' '0s', 'idle_timeout' '7d')";

/// Runs `statements` (the tables, settings and the query into `output`) on a fresh engine,
/// feeds it the run (moving processing time after each micro-batch when `early`), and gives
/// what `output` holds, in order, and the late records.
async fn run_query(
    statements: &[String],
    output: &str,
    run: &Run,
    early: bool,
) -> anyhow::Result<(Vec<RecordBatch>, Vec<Late>)> {
    let mut engine = DeterministicEngine::new();
    for sql in statements {
        engine.execute(sql).await?;
    }
    feed(&mut engine, run, early).await?;
    let Outcome::Rows(out) = engine.execute(&format!("SELECT * FROM {output}")).await? else {
        anyhow::bail!("no rows")
    };
    let late = late_records(&mut engine).await?;
    Ok((out, late))
}

/// `SET urbanstream.early_fire`, when the run fires early.
fn early_fire(run: &Run) -> Option<String> {
    run.early_fire
        .then(|| "SET urbanstream.early_fire = '10s'".to_string())
}

/// What the windowed query published, in order, and the late records.
async fn published(kind: Kind, run: &Run) -> anyhow::Result<(Vec<RecordBatch>, Vec<Late>)> {
    let select = format!(
        "SELECT k, g, window_start, window_end, {AGGREGATES} FROM ev GROUP BY {}, k, g",
        kind.sql()
    );
    published_by(run, None, &select).await
}

/// What `select` (a windowed query over `ev` with the columns of [`AGGREGATES`]), with
/// `table` declared first, published into `out`, in order, and the late records.
async fn published_by(
    run: &Run,
    table: Option<&str>,
    select: &str,
) -> anyhow::Result<(Vec<RecordBatch>, Vec<Late>)> {
    let statements: Vec<String> = [
        Some(EV.to_string()),
        table.map(str::to_string),
        Some(
            "CREATE EXTERNAL TABLE out (k VARCHAR NOT NULL, g BIGINT, window_start TIMESTAMP NOT NULL, \
             window_end TIMESTAMP NOT NULL, n BIGINT NOT NULL, s BIGINT, a DOUBLE, lo BIGINT, hi BIGINT, \
             d BIGINT, f BIGINT, revision INT NOT NULL, is_final BOOLEAN NOT NULL, op VARCHAR NOT NULL) \
             STORED AS KAFKA OPTIONS ('topic' 'out')"
                .to_string(),
        ),
        Some("SET urbanstream.allowed_lateness = '2m'".to_string()),
        early_fire(run),
        Some(format!("INSERT INTO out {select}")),
    ]
    .into_iter()
    .flatten()
    .collect();
    run_query(&statements, "out", run, run.early_fire).await
}

/// Feeds the run's micro-batches (each into its partition), restarting where it says and,
/// with `early`, moving processing time 7 s after each (early fires come due), then closes
/// every window.
async fn feed(engine: &mut DeterministicEngine, run: &Run, early: bool) -> anyhow::Result<()> {
    for (batch, restart) in run.batches.iter().zip(&run.restarts) {
        let Some(first) = batch.first() else { continue };
        let rows: Vec<String> = batch
            .iter()
            .map(|e| {
                format!(
                    "('{}', {}, to_timestamp_millis({}), {})",
                    e.k,
                    e.g.map_or("NULL".to_string(), |g| g.to_string()),
                    e.t,
                    e.v
                )
            })
            .collect();
        engine
            .execute(&format!(
                "INSERT INTO ev PARTITION {} VALUES {}",
                first.partition,
                rows.join(", ")
            ))
            .await?;
        if *restart {
            engine.execute("RESTART").await?;
        }
        if early {
            engine.execute("ADVANCE TIME 7s").await?;
        }
    }
    engine
        .execute("ADVANCE WATERMARK ev TO '2026-01-02T00:00:00'")
        .await?;
    Ok(())
}

/// The late records: (event time, reason), sorted.
pub(crate) async fn late_records(engine: &mut DeterministicEngine) -> anyhow::Result<Vec<Late>> {
    let Outcome::Rows(late_rows) = engine.execute("SHOW LATE").await? else {
        anyhow::bail!("no rows")
    };
    let mut late = Vec::new();
    for b in &late_rows {
        let t = cast(
            b.column(1),
            &DataType::Timestamp(TimeUnit::Millisecond, None),
        )?;
        let t = t
            .as_any()
            .downcast_ref::<TimestampMillisecondArray>()
            .expect("ts");
        let reason = b
            .column(3)
            .as_any()
            .downcast_ref::<StringArray>()
            .expect("reason");
        for r in 0..b.num_rows() {
            late.push((t.value(r), reason.value(r).to_string()));
        }
    }
    late.sort();
    Ok(late)
}

/// A session with the model's (event, window) pairs as table `pairs`: k, g, t, v,
/// window_start, window_end.
fn pairs_context(pairs: &[Pair]) -> anyhow::Result<SessionContext> {
    let ctx = SessionContext::new();
    let columns: Vec<(&str, ArrayRef)> = vec![
        (
            "k",
            Arc::new(StringArray::from_iter_values(
                pairs.iter().map(|(e, _)| e.k),
            )),
        ),
        (
            "g",
            Arc::new(Int64Array::from_iter(
                pairs.iter().map(|(e, _)| e.g.map(i64::from)),
            )),
        ),
        (
            "t",
            Arc::new(TimestampMillisecondArray::from_iter_values(
                pairs.iter().map(|(e, _)| e.t),
            )),
        ),
        (
            "v",
            Arc::new(Int64Array::from_iter_values(pairs.iter().map(|(e, _)| e.v))),
        ),
        (
            "window_start",
            Arc::new(TimestampMillisecondArray::from_iter_values(
                pairs.iter().map(|(_, w)| w.0),
            )),
        ),
        (
            "window_end",
            Arc::new(TimestampMillisecondArray::from_iter_values(
                pairs.iter().map(|(_, w)| w.1),
            )),
        ),
    ];
    let b = RecordBatch::try_from_iter(columns)?;
    ctx.register_table(
        "pairs",
        Arc::new(MemTable::try_new(b.schema(), vec![vec![b]])?),
    )?;
    Ok(ctx)
}

/// The batch DataFusion query over the model's (event, window) pairs.
async fn batch(pairs: &[Pair]) -> anyhow::Result<Results> {
    let ctx = pairs_context(pairs)?;
    let sql = format!(
        "SELECT k, g, window_start, window_end, {AGGREGATES} FROM pairs \
         GROUP BY k, g, window_start, window_end"
    );
    results(&ctx.sql(&sql).await?.collect().await?, Apply::Once)
}

fn check(kind: Kind, run: &Run) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (pairs, want_late) = model(kind, run);
    let (got, got_late) = rt.block_on(engine(kind, run)).expect("engine");
    let want = rt.block_on(batch(&pairs)).expect("batch");
    prop_assert_eq!(got_late, want_late, "late records");
    prop_assert_eq!(got, want, "results");
    Ok(())
}

/// Group keys of many types, each nullable or with its edge values, as `(name, expression
/// over k, g, t, v)`: a nullable string, a float that is -0.0, 0.0 or NaN, and, all from the
/// nullable `g` (so that groups hold several events), a boolean, a small integer, an
/// unsigned one, a decimal, a date and a timestamp.
const TYPED_KEYS: [(&str, &str); 8] = [
    ("kn", "CASE WHEN v % 7 = 0 THEN NULL ELSE 'x' END"),
    (
        "kz",
        "CASE WHEN v % 5 = 0 THEN CAST('NaN' AS DOUBLE) WHEN v % 3 = 0 THEN -0.0 ELSE 0.0 END",
    ),
    ("kb", "g = 0"),
    ("k8", "CAST(g AS TINYINT) - 1"),
    ("ku", "CAST(g AS INT UNSIGNED)"),
    ("kd", "CAST(g AS DECIMAL(10, 2)) / 4"),
    ("kdate", "CAST(t AS DATE) + g"),
    (
        "kts",
        "to_timestamp_seconds(CAST(g AS BIGINT) * 86400 + 1767225600)",
    ),
];

/// Aggregates of every kind, rendered as text (floating-point ones rounded, and -0.0 made
/// 0.0: partial states merge in another order than a batch query's).
const EVERY_AGGREGATE: &str = "count(*) AS n, count(g) AS ng, sum(v) AS s, \
     round(avg(v), 6) + 0.0 AS a, min(v) AS lo, max(v) AS hi, min(k) AS klo, max(t) AS last_t, \
     round(stddev(v), 6) + 0.0 AS sd, round(var_pop(v), 6) + 0.0 AS vp, median(v) AS med, \
     count(DISTINCT g) AS dg, sum(DISTINCT v) AS sdv, approx_distinct(v) AS ad, \
     bool_and(v > 0) AS ba, bool_or(v > 15) AS bo, bit_xor(v) AS bx, \
     first_value(v ORDER BY t) AS f, last_value(v ORDER BY t) AS l, \
     array_to_string(array_agg(v ORDER BY t), ',') AS vs, string_agg(k, '' ORDER BY t) AS ks, \
     round(covar_samp(v, v % 4), 6) + 0.0 AS cr";

/// The columns of [`EVERY_AGGREGATE`].
const EVERY_AGGREGATE_COLUMNS: [&str; 22] = [
    "n", "ng", "s", "a", "lo", "hi", "klo", "last_t", "sd", "vp", "med", "dg", "sdv", "ad", "ba",
    "bo", "bx", "f", "l", "vs", "ks", "cr",
];

/// Minute windows over `input` grouped by the [`TYPED_KEYS`] and computing
/// [`EVERY_AGGREGATE`], with the window start, the keys and the aggregates rendered as text.
fn typed_query(input: &str, window: &str) -> String {
    let derived: Vec<String> = TYPED_KEYS
        .iter()
        .map(|(name, expr)| format!("{expr} AS {name}"))
        .collect();
    let names: Vec<&str> = TYPED_KEYS.iter().map(|(name, _)| *name).collect();
    let key = names
        .iter()
        .map(|n| format!("coalesce(CAST({n} AS VARCHAR), 'null')"))
        .collect::<Vec<_>>()
        .join(", ");
    let values = EVERY_AGGREGATE_COLUMNS
        .iter()
        .map(|c| format!("coalesce(CAST({c} AS VARCHAR), 'null')"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "SELECT window_start, concat_ws('|', {key}) AS gk, concat_ws('|', {values}) AS aggs \
         FROM (SELECT window_start, {names}, {EVERY_AGGREGATE} \
               FROM (SELECT *, {derived} FROM {input}) GROUP BY {window}, {names})",
        names = names.join(", "),
        derived = derived.join(", "),
    )
}

/// Per (window start, key), the aggregates: for the engine's output, its last revision.
fn typed_results(batches: &[RecordBatch]) -> anyhow::Result<BTreeMap<(String, String), String>> {
    let mut latest: BTreeMap<(String, String), (i64, String)> = BTreeMap::new();
    for b in batches {
        let text = |name: &str| -> anyhow::Result<Vec<String>> {
            let c = b
                .column_by_name(name)
                .ok_or_else(|| anyhow::anyhow!("column {name}"))?;
            (0..c.len())
                .map(|i| Ok(array_value_to_string(c, i)?))
                .collect()
        };
        let (start, key, aggs) = (text("window_start")?, text("gk")?, text("aggs")?);
        let revision = match b.column_by_name("revision") {
            Some(r) => cast(r, &DataType::Int64)?,
            None => Arc::new(Int64Array::from(vec![0; b.num_rows()])),
        };
        let revision = revision.as_primitive::<Int64Type>();
        for r in 0..b.num_rows() {
            let entry = (start[r].clone(), key[r].clone());
            if latest
                .get(&entry)
                .is_none_or(|(seen, _)| *seen <= revision.value(r))
            {
                latest.insert(entry, (revision.value(r), aggs[r].clone()));
            }
        }
    }
    Ok(latest.into_iter().map(|(k, (_, v))| (k, v)).collect())
}

/// Windows grouped by keys of every type (nullable, -0.0 and NaN among them) and computing
/// aggregates of every kind, with allowed lateness and, in half the runs, early fires: their
/// last revisions hold what the batch query over the events that were not late gives.
fn check_typed(kind: Kind, run: &Run) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (pairs, want_late) = model(kind, run);
    let (got, got_late) = rt
        .block_on(async {
            let statements: Vec<String> = [
                Some(EV.to_string()),
                Some(
                    "CREATE EXTERNAL TABLE out (window_start TIMESTAMP NOT NULL, gk VARCHAR, \
                     aggs VARCHAR, revision INT NOT NULL) STORED AS KAFKA OPTIONS ('topic' 'out')"
                        .to_string(),
                ),
                Some("SET urbanstream.allowed_lateness = '2m'".to_string()),
                early_fire(run),
                Some(format!("INSERT INTO out {}", typed_query("ev", kind.sql()))),
            ]
            .into_iter()
            .flatten()
            .collect();
            let (out, late) = run_query(&statements, "out", run, run.early_fire).await?;
            anyhow::Ok((typed_results(&out)?, late))
        })
        .expect("engine");
    let want = rt
        .block_on(async {
            let ctx = pairs_context(&pairs)?;
            let sql = typed_query("pairs", "window_start, window_end");
            typed_results(&ctx.sql(&sql).await?.collect().await?)
        })
        .expect("batch");
    prop_assert_eq!(got_late, want_late, "late records");
    prop_assert!(pairs.is_empty() || !want.is_empty(), "nothing to compare");
    prop_assert_eq!(got, want, "groups and aggregates");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn tumbling_windows_over_keys_of_every_type_with_every_aggregate_match_the_model(run in run()) {
        check_typed(Kind::Tumble, &run)?;
    }

    #[test]
    fn hopping_windows_over_keys_of_every_type_with_every_aggregate_match_the_model(run in run()) {
        check_typed(Kind::Hop, &run)?;
    }
}

/// A condition over a window's rows: `HAVING`, or a `WHERE` above a lookup join of the
/// window's rows with a reference table.
#[derive(Debug, Clone, Copy)]
enum Condition {
    Having,
    AboveLookup,
}

/// Each key's floor for [`Condition::AboveLookup`] (a window passes when its sum is above
/// it); `Condition::Having` asks for a sum above 0.
const FLOORS: &str =
    "CREATE TABLE floors (k VARCHAR, floor BIGINT) AS VALUES ('a', 0), ('b', -15), ('c', 12)";

/// The windowed query over `input` grouped by `group_by`, with `condition`.
fn conditioned(condition: Condition, input: &str, group_by: &str) -> String {
    match condition {
        Condition::Having => format!(
            "SELECT k, g, window_start, window_end, {AGGREGATES} FROM {input} \
             GROUP BY {group_by} HAVING sum(v) > 0"
        ),
        Condition::AboveLookup => format!(
            "SELECT m.k, m.g, m.window_start, m.window_end, m.n, m.s, m.a, m.lo, m.hi, m.d, m.f \
             FROM (SELECT k, g, window_start, window_end, {AGGREGATES} FROM {input} \
             GROUP BY {group_by}) m JOIN floors fl ON m.k = fl.k WHERE m.s > fl.floor"
        ),
    }
}

/// A windowed query with a condition, with allowed lateness and, in half the runs, early
/// fires: its changelog applied in order (upsert by key and window, delete on `retract`)
/// holds the windows the batch query over the events that were not late gives, those
/// passing the condition only. A revision that no longer passes withdraws the row published
/// before; one that passes again is published again.
fn check_conditioned(kind: Kind, condition: Condition, run: &Run) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (pairs, want_late) = model(kind, run);
    let (got, got_late) = rt
        .block_on(async {
            let select = conditioned(condition, "ev", &format!("{}, k, g", kind.sql()));
            let (out, late) = published_by(run, Some(FLOORS), &select).await?;
            anyhow::Ok((results(&out, Apply::Changelog)?, late))
        })
        .expect("engine");
    let want = rt
        .block_on(async {
            let ctx = pairs_context(&pairs)?;
            ctx.sql(FLOORS).await?.collect().await?;
            let sql = conditioned(condition, "pairs", "k, g, window_start, window_end");
            results(&ctx.sql(&sql).await?.collect().await?, Apply::Once)
        })
        .expect("batch");
    prop_assert_eq!(got_late, want_late, "late records");
    prop_assert_eq!(got, want, "windows passing the condition");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn tumbling_windows_under_having_match_the_model(run in run()) {
        check_conditioned(Kind::Tumble, Condition::Having, &run)?;
    }

    #[test]
    fn hopping_windows_under_a_condition_above_a_lookup_match_the_model(run in run()) {
        check_conditioned(Kind::Hop, Condition::AboveLookup, &run)?;
    }

    #[test]
    fn tumbling_windows_under_a_condition_above_a_lookup_match_the_model(run in run()) {
        check_conditioned(Kind::Tumble, Condition::AboveLookup, &run)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn tumbling_windows_match_the_model(run in run()) {
        check(Kind::Tumble, &run)?;
    }

    #[test]
    fn hopping_windows_match_the_model(run in run()) {
        check(Kind::Hop, &run)?;
    }

    #[test]
    fn cumulating_windows_match_the_model(run in run()) {
        check(Kind::Cumulate, &run)?;
    }

    #[test]
    fn session_windows_match_the_model(run in run()) {
        check(Kind::Session, &run)?;
    }

    #[test]
    fn a_detector_and_alerts_downstream_of_a_window_match_a_batch_query(run in run()) {
        check_detected(&run)?;
    }

    #[test]
    fn five_minute_windows_over_a_minute_changelog_match_a_batch_query(run in run()) {
        check_chained(Kind::Tumble, &run)?;
    }

    #[test]
    fn five_minute_windows_over_a_session_changelog_match_a_batch_query(run in run()) {
        check_chained(Kind::Session, &run)?;
    }

    #[test]
    fn the_top_two_of_each_minute_match_a_batch_ranking(run in run()) {
        check_top(Kind::Tumble, &run)?;
    }

    #[test]
    fn the_top_two_of_each_hopping_window_match_a_batch_ranking(run in run()) {
        check_top(Kind::Hop, &run)?;
    }

    #[test]
    fn the_top_two_of_each_cumulating_window_match_a_batch_ranking(run in run()) {
        check_top(Kind::Cumulate, &run)?;
    }

    #[test]
    fn an_append_only_two_stage_query_over_minutes_matches_a_batch_query(run in run()) {
        check_two_stages(Kind::Tumble, false, true, &run)?;
    }

    #[test]
    fn an_append_only_two_stage_query_over_hopping_windows_matches_a_batch_query(run in run()) {
        check_two_stages(Kind::Hop, true, true, &run)?;
    }

    #[test]
    fn a_two_stage_query_over_minutes_matches_a_batch_query(run in run()) {
        check_two_stages(Kind::Tumble, false, false, &run)?;
    }

    #[test]
    fn a_two_stage_query_over_hopping_windows_matches_a_batch_query(run in run()) {
        check_two_stages(Kind::Hop, false, false, &run)?;
    }

    #[test]
    fn a_two_stage_query_by_window_end_over_cumulating_windows_matches_a_batch_query(run in run()) {
        check_two_stages(Kind::Cumulate, true, false, &run)?;
    }
}

/// Five-minute windows over the first query's changelog (read with 'upsert_key'), by the
/// first query's window start.
const CHAINED: &str = "SELECT k, g, window.window_start AS window_start, \
     window.window_end AS window_end, sum(n) AS n, sum(s) AS s, max(hi) AS hi, \
     count(*) AS rows_in FROM {input} GROUP BY {window}, k, g";

/// (k, g, window start) → (n, s, hi, rows in).
type Chained = BTreeMap<(String, Option<i64>, i64), (i64, i64, i64, i64)>;

/// Applies a changelog of [`CHAINED`] rows (upsert by key and window start, delete on
/// retract); `Once` rows are a batch query's.
fn chained(batches: &[RecordBatch], changelog: bool) -> anyhow::Result<Chained> {
    let mut out = Chained::new();
    for b in batches {
        let col = |name: &str, t: &DataType| -> anyhow::Result<ArrayRef> {
            let c = b
                .column_by_name(name)
                .ok_or_else(|| anyhow::anyhow!("column {name}"))?;
            Ok(cast(c, t)?)
        };
        let k = col("k", &DataType::Utf8)?;
        let k = k.as_string::<i32>();
        let g = col("g", &DataType::Int64)?;
        let g = g.as_primitive::<Int64Type>();
        let ws = col("window_start", &DataType::Int64)?;
        let ws = ws.as_primitive::<Int64Type>();
        let ints: Vec<ArrayRef> = ["n", "s", "hi", "rows_in"]
            .iter()
            .map(|c| col(c, &DataType::Int64))
            .collect::<anyhow::Result<_>>()?;
        let ints: Vec<&Int64Array> = ints.iter().map(|a| a.as_primitive::<Int64Type>()).collect();
        let op = if changelog {
            Some(col("op", &DataType::Utf8)?)
        } else {
            None
        };
        for r in 0..b.num_rows() {
            let key = (
                k.value(r).to_string(),
                (!g.is_null(r)).then(|| g.value(r)),
                ws.value(r),
            );
            if op
                .as_ref()
                .is_some_and(|o| o.as_string::<i32>().value(r) == "retract")
            {
                out.remove(&key);
            } else {
                let v = |i: usize| ints[i].value(r);
                out.insert(key, (v(0), v(1), v(2), v(3)));
            }
        }
    }
    Ok(out)
}

/// The first query (`kind` windows) publishes its changelog; a second engine reads it as a
/// changelog source, in other micro-batch cuts, spread by key over 4 partitions, restarting
/// where the run says, and aggregates it in five-minute windows. Applied, its changelog
/// equals the same two-level aggregation as one batch query over the events the model keeps:
/// each revision of the first query replaced its row below instead of adding to it, and each
/// retraction (a session merged away) took it out.
fn check_chained(kind: Kind, run: &Run) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (pairs, _) = model(kind, run);
    let got = rt
        .block_on(async {
            let (upstream, _) = published(kind, run).await?;
            let mut engine = DeterministicEngine::new();
            for sql in [
                // A day of allowed lateness: every revision of the first query counts.
                "CREATE EXTERNAL TABLE mins (k VARCHAR NOT NULL, g BIGINT, \
                 window_start TIMESTAMP NOT NULL, n BIGINT NOT NULL, s BIGINT, hi BIGINT, \
                 op VARCHAR NOT NULL) STORED AS KAFKA OPTIONS ('topic' 'mins', \
                 'event_time' 'window_start', 'watermark_delay' '0s', 'idle_timeout' '7d', \
                 'upsert_key' 'k, g, window_start')",
                "CREATE EXTERNAL TABLE five (k VARCHAR NOT NULL, g BIGINT, \
                 window_start TIMESTAMP NOT NULL, window_end TIMESTAMP NOT NULL, n BIGINT, \
                 s BIGINT, hi BIGINT, rows_in BIGINT, op VARCHAR NOT NULL) \
                 STORED AS KAFKA OPTIONS ('topic' 'five')",
                "SET urbanstream.allowed_lateness = '1d'",
            ] {
                engine.execute(sql).await?;
            }
            let query = CHAINED
                .replace("{input}", "mins")
                .replace("{window}", "tumble(window_start, INTERVAL '5 minutes')");
            engine.execute(&format!("INSERT INTO five {query}")).await?;
            // The first query's rows in publication order, as VALUES, with the partition of
            // their key (records of one key stay in order, as in Kafka).
            let mut rows: Vec<(i32, String)> = Vec::new();
            for b in &upstream {
                let text = |name: &str| -> anyhow::Result<Vec<String>> {
                    let c = b
                        .column_by_name(name)
                        .ok_or_else(|| anyhow::anyhow!("column {name}"))?;
                    Ok((0..c.len())
                        .map(|i| {
                            if c.is_null(i) {
                                "NULL".to_string()
                            } else {
                                array_value_to_string(c, i).unwrap_or_default()
                            }
                        })
                        .collect())
                };
                let ws = cast(
                    b.column_by_name("window_start").expect("window_start"),
                    &DataType::Int64,
                )?;
                let ws = ws.as_primitive::<Int64Type>();
                let (k, g, n, s, hi, op) = (
                    text("k")?,
                    text("g")?,
                    text("n")?,
                    text("s")?,
                    text("hi")?,
                    text("op")?,
                );
                for r in 0..b.num_rows() {
                    let partition = match k[r].as_str() {
                        "a" => 0,
                        "b" => 1,
                        _ => 3,
                    };
                    rows.push((
                        partition,
                        format!(
                            "('{}', {}, to_timestamp_millis({}), {}, {}, {}, '{}')",
                            k[r],
                            g[r],
                            ws.value(r),
                            n[r],
                            s[r],
                            hi[r],
                            op[r]
                        ),
                    ));
                }
            }
            // Cuts of the run's batch sizes, each piece split by partition.
            let mut sizes = run.batches.iter().map(|b| b.len().max(1)).cycle();
            let mut start = 0;
            let mut step = 0;
            while start < rows.len() {
                let end = (start + sizes.next().unwrap_or(1)).min(rows.len());
                let mut by_partition: BTreeMap<i32, Vec<&str>> = BTreeMap::new();
                for (p, v) in &rows[start..end] {
                    by_partition.entry(*p).or_default().push(v);
                }
                for (p, values) in by_partition {
                    engine
                        .execute(&format!(
                            "INSERT INTO mins PARTITION {p} VALUES {}",
                            values.join(", ")
                        ))
                        .await?;
                }
                if run.restarts.get(step).copied().unwrap_or(false) {
                    engine.execute("RESTART").await?;
                }
                start = end;
                step += 1;
            }
            engine
                .execute("ADVANCE WATERMARK mins TO '2026-01-03T00:00:00'")
                .await?;
            let Outcome::Rows(out) = engine.execute("SELECT * FROM five").await? else {
                anyhow::bail!("no rows")
            };
            let Outcome::Rows(late) = engine.execute("SHOW LATE").await? else {
                anyhow::bail!("no rows")
            };
            anyhow::ensure!(
                late.iter().all(|b| b.num_rows() == 0),
                "rows of the first query were late for the second: {late:?}"
            );
            chained(&out, true)
        })
        .expect("engine");
    let want = rt.block_on(two_levels(&pairs, false)).expect("batch");
    prop_assert!(pairs.is_empty() || !want.is_empty(), "nothing to compare");
    prop_assert_eq!(got, want, "second-stage changelog applied");
    Ok(())
}

/// The two-level aggregation of [`CHAINED`] as one batch query over the model's (event,
/// window) pairs: the first level per key and first-level window, the second per five
/// minutes of the first level's window start (or, `by_end`, its end).
async fn two_levels(pairs: &[Pair], by_end: bool) -> anyhow::Result<Chained> {
    let ctx = pairs_context(pairs)?;
    let first = if by_end { "window_end" } else { "window_start" };
    // The first query's final rows, then the second aggregation over them.
    let query = format!(
        "SELECT k, g, date_bin(INTERVAL '5 minutes', window_start) AS window_start, \
         date_bin(INTERVAL '5 minutes', window_start) + INTERVAL '5 minutes' AS window_end, \
         sum(n) AS n, sum(s) AS s, max(hi) AS hi, count(*) AS rows_in \
         FROM (SELECT k, g, {first} AS window_start, count(*) AS n, sum(v) AS s, \
               max(v) AS hi FROM pairs GROUP BY k, g, {first}) \
         GROUP BY k, g, date_bin(INTERVAL '5 minutes', window_start)"
    );
    chained(&ctx.sql(&query).await?.collect().await?, false)
}

/// The two levels of [`check_chained`] as one query (windows of windows, no topic between
/// them): the run's events in its micro-batch cuts over 4 partitions, with early fires and
/// restarts where it says, and revisions within the allowed lateness. Applied, its changelog
/// equals the batch query over the events the model keeps; nothing is late for the second
/// stage.
///
/// With `append_only`, the query runs without allowed lateness or early results: each window
/// below publishes each group once, and the stage above aggregates incrementally.
fn check_two_stages(
    kind: Kind,
    by_end: bool,
    append_only: bool,
    run: &Run,
) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (pairs, want_late) = if append_only {
        model_with(kind, run, 0)
    } else {
        model(kind, run)
    };
    let (got, got_late) = rt
        .block_on(async {
            let mut engine = DeterministicEngine::new();
            for sql in [
                EV,
                "CREATE EXTERNAL TABLE five (k VARCHAR NOT NULL, g BIGINT, \
                 window_start TIMESTAMP NOT NULL, window_end TIMESTAMP NOT NULL, n BIGINT, \
                 s BIGINT, hi BIGINT, rows_in BIGINT, op VARCHAR NOT NULL) \
                 STORED AS KAFKA OPTIONS ('topic' 'five')",
            ] {
                engine.execute(sql).await?;
            }
            let early = run.early_fire && !append_only;
            if !append_only {
                engine
                    .execute("SET urbanstream.allowed_lateness = '2m'")
                    .await?;
            }
            if early {
                engine.execute("SET urbanstream.early_fire = '10s'").await?;
            }
            let bound = if by_end { "window_end" } else { "window_start" };
            let inner = format!(
                "(SELECT k, g, {bound} AS w, count(*) AS n, sum(v) AS s, max(v) AS hi \
                 FROM ev GROUP BY {}, k, g)",
                kind.sql()
            );
            engine
                .execute(&format!(
                    "INSERT INTO five SELECT k, g, window_start, window_end, sum(n) AS n, \
                     sum(s) AS s, max(hi) AS hi, count(*) AS rows_in FROM {inner} \
                     GROUP BY tumble(w, INTERVAL '5 minutes'), k, g"
                ))
                .await?;
            feed(&mut engine, run, early).await?;
            engine
                .execute("ADVANCE WATERMARK ev TO '2026-01-03T00:00:00'")
                .await?;
            let Outcome::Rows(out) = engine.execute("SELECT * FROM five").await? else {
                anyhow::bail!("no rows")
            };
            let late = late_records(&mut engine).await?;
            anyhow::Ok((chained(&out, true)?, late))
        })
        .expect("engine");
    let want = rt.block_on(two_levels(&pairs, by_end)).expect("batch");
    prop_assert_eq!(got_late, want_late, "late records");
    prop_assert!(pairs.is_empty() || !want.is_empty(), "nothing to compare");
    prop_assert_eq!(got, want, "two-stage changelog applied");
    Ok(())
}

/// The two groups with the most events (then the largest sum, then by key) of each window.
const TOP: &str = "SELECT k, g, window_end, n, s, place FROM (SELECT k, g, window_end, n, s, \
     ROW_NUMBER() OVER (PARTITION BY window_end ORDER BY n DESC, s DESC, k, g) AS place \
     FROM (SELECT k, g, {window_end} AS window_end, count(*) AS n, sum(v) AS s FROM {input} \
     GROUP BY {group_by}, k, g)) WHERE place <= 2";

/// (window end, k, g) → (n, s, place).
type Top = BTreeMap<(i64, String, Option<i64>), (i64, i64, i64)>;

/// Applies a changelog of [`TOP`] rows (upsert by window and group, delete on retract);
/// without `op`, a batch query's rows.
fn top(batches: &[RecordBatch]) -> anyhow::Result<Top> {
    let mut out = Top::new();
    for b in batches {
        let col = |name: &str, t: &DataType| -> anyhow::Result<ArrayRef> {
            let c = b
                .column_by_name(name)
                .ok_or_else(|| anyhow::anyhow!("column {name}"))?;
            Ok(cast(c, t)?)
        };
        let k = col("k", &DataType::Utf8)?;
        let k = k.as_string::<i32>();
        let ints: Vec<ArrayRef> = ["g", "window_end", "n", "s", "place"]
            .iter()
            .map(|c| col(c, &DataType::Int64))
            .collect::<anyhow::Result<_>>()?;
        let ints: Vec<&Int64Array> = ints.iter().map(|a| a.as_primitive::<Int64Type>()).collect();
        let op = match b.column_by_name("op") {
            Some(_) => Some(col("op", &DataType::Utf8)?),
            None => None,
        };
        for r in 0..b.num_rows() {
            let key = (
                ints[1].value(r),
                k.value(r).to_string(),
                (!ints[0].is_null(r)).then(|| ints[0].value(r)),
            );
            if op
                .as_ref()
                .is_some_and(|o| o.as_string::<i32>().value(r) == "retract")
            {
                anyhow::ensure!(
                    out.remove(&key).is_some(),
                    "a retraction of {key:?}, never published"
                );
            } else {
                out.insert(key, (ints[2].value(r), ints[3].value(r), ints[4].value(r)));
            }
        }
    }
    Ok(out)
}

/// Top-N per window: the run's events in its cuts over 4 partitions, with early fires,
/// revisions and restarts, ranked per window by the engine; the applied changelog equals the
/// batch ranking of the groups the model keeps.
fn check_top(kind: Kind, run: &Run) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (pairs, want_late) = model(kind, run);
    let (got, got_late) = rt
        .block_on(async {
            let query = TOP
                .replace("{window_end}", "window_end")
                .replace("{input}", "ev")
                .replace("{group_by}", kind.sql());
            let statements: Vec<String> = [
                Some(EV.to_string()),
                Some(
                    "CREATE EXTERNAL TABLE top (k VARCHAR NOT NULL, g BIGINT, \
                     window_end TIMESTAMP NOT NULL, n BIGINT, s BIGINT, place BIGINT, \
                     op VARCHAR NOT NULL) STORED AS KAFKA OPTIONS ('topic' 'top')"
                        .to_string(),
                ),
                Some("SET urbanstream.allowed_lateness = '2m'".to_string()),
                early_fire(run),
                Some(format!("INSERT INTO top {query}")),
            ]
            .into_iter()
            .flatten()
            .collect();
            let (out, late) = run_query(&statements, "top", run, run.early_fire).await?;
            anyhow::Ok((top(&out)?, late))
        })
        .expect("engine");
    let want = rt
        .block_on(async {
            let ctx = pairs_context(&pairs)?;
            let query = TOP
                .replace("{window_end}", "window_end")
                .replace("{input}", "pairs")
                .replace("{group_by}", "window_end");
            top(&ctx.sql(&query).await?.collect().await?)
        })
        .expect("batch");
    prop_assert_eq!(got_late, want_late, "late records");
    prop_assert!(pairs.is_empty() || !want.is_empty(), "nothing to compare");
    prop_assert_eq!(got, want, "top two per window");
    Ok(())
}

/// Per-minute counts per key with the default detector and an alert machine above them,
/// without allowed lateness (each window is published once; a detector does not take back
/// what it learnt from a revision).
const DETECTED: &str = "SELECT k, window_end, n, round(d['score'], 6) AS score, a['state'] AS state, \
     a['active'] AS active FROM (SELECT k, window_end, n, d, \
       alert_state(n, window_end, 3, 1) OVER (PARTITION BY k ORDER BY window_end) AS a \
     FROM (SELECT k, window_end, n, \
             anomaly_score(CAST(n AS DOUBLE), window_end) OVER (PARTITION BY k ORDER BY window_end) AS d \
           FROM (SELECT k, window_end, count(*) AS n FROM {input} {group_by})))";

/// (k, window end) → (n, score, state, active).
type Detected = BTreeMap<(String, i64), (i64, String, String, String)>;

fn detected(batches: &[RecordBatch]) -> anyhow::Result<Detected> {
    let mut out = Detected::new();
    for b in batches {
        let text = |name: &str| -> anyhow::Result<Vec<String>> {
            let c = b
                .column_by_name(name)
                .ok_or_else(|| anyhow::anyhow!("column {name}"))?;
            Ok((0..c.len())
                .map(|i| array_value_to_string(c, i).unwrap_or_default())
                .collect())
        };
        let k = text("k")?;
        let end = cast(
            b.column_by_name("window_end").expect("window_end"),
            &DataType::Timestamp(TimeUnit::Millisecond, None),
        )?;
        let end = end
            .as_any()
            .downcast_ref::<TimestampMillisecondArray>()
            .expect("ts");
        let n = cast(b.column_by_name("n").expect("n"), &DataType::Int64)?;
        let n = n.as_primitive::<Int64Type>();
        let (score, state, active) = (text("score")?, text("state")?, text("active")?);
        for r in 0..b.num_rows() {
            out.insert(
                (k[r].clone(), end.value(r)),
                (
                    n.value(r),
                    score[r].clone(),
                    state[r].clone(),
                    active[r].clone(),
                ),
            );
        }
    }
    Ok(out)
}

fn check_detected(run: &Run) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (pairs, want_late) = model_with(Kind::Tumble, run, 0);
    let (got, got_late) = rt
        .block_on(async {
            let query = DETECTED
                .replace("{input}", "ev")
                .replace("{group_by}", "GROUP BY tumble(t, INTERVAL '1 minute'), k");
            let statements = [
                "CREATE EXTERNAL TABLE ev (k VARCHAR NOT NULL, g INT, t TIMESTAMP NOT NULL, v BIGINT NOT NULL) \
                 STORED AS KAFKA OPTIONS ('topic' 'ev', 'event_time' 't', 'watermark_delay' '0s')"
                    .to_string(),
                "CREATE EXTERNAL TABLE out (k VARCHAR NOT NULL, window_end TIMESTAMP NOT NULL, n BIGINT NOT NULL, \
                 score DOUBLE, state VARCHAR, active BOOLEAN) STORED AS KAFKA OPTIONS ('topic' 'out')"
                    .to_string(),
                format!("INSERT INTO out {query}"),
            ];
            let (out, late) = run_query(&statements, "out", run, false).await?;
            anyhow::Ok((detected(&out)?, late))
        })
        .expect("engine");
    let want = rt
        .block_on(async {
            let ctx = SessionContext::new();
            urbanstream_operators::register_all(&ctx);
            let b = RecordBatch::try_from_iter(vec![
                (
                    "k",
                    Arc::new(StringArray::from_iter_values(
                        pairs.iter().map(|(e, _)| e.k),
                    )) as ArrayRef,
                ),
                (
                    "window_end",
                    Arc::new(TimestampMillisecondArray::from_iter_values(
                        pairs.iter().map(|(_, w)| w.1),
                    )),
                ),
            ])?;
            ctx.register_table(
                "pairs",
                Arc::new(MemTable::try_new(b.schema(), vec![vec![b]])?),
            )?;
            let query = DETECTED
                .replace("{input}", "pairs")
                .replace("{group_by}", "GROUP BY k, window_end");
            anyhow::Ok(detected(&ctx.sql(&query).await?.collect().await?)?)
        })
        .expect("batch");
    prop_assert_eq!(got_late, want_late, "late records");
    prop_assert!(pairs.is_empty() || !want.is_empty(), "no window to compare");
    prop_assert_eq!(got, want, "detector and alert rows");
    Ok(())
}

/// A row of the LAG query: (k, g, t, v, the key's value before, the one before that).
type LagRow = (String, Option<i64>, i64, i64, Option<i64>, Option<i64>);

/// LAG over the raw events, per two keys (one nullable), in event-time order.
const LAGGED: &str = "SELECT k, g, t, v, lag(v) OVER w AS p1, lag(v, 2) OVER w AS p2 FROM {input} \
     WINDOW w AS (PARTITION BY k, g ORDER BY t)";

fn lag_rows(batches: &[RecordBatch]) -> anyhow::Result<Vec<LagRow>> {
    let mut out = Vec::new();
    for b in batches {
        let col = |name: &str, t: &DataType| -> anyhow::Result<ArrayRef> {
            let c = b
                .column_by_name(name)
                .ok_or_else(|| anyhow::anyhow!("column {name}"))?;
            Ok(cast(c, t)?)
        };
        let k = col("k", &DataType::Utf8)?;
        let k = k.as_string::<i32>();
        let ints: Vec<ArrayRef> = ["g", "t", "v", "p1", "p2"]
            .iter()
            .map(|c| {
                let t = if *c == "t" {
                    cast(
                        &col(c, &DataType::Timestamp(TimeUnit::Millisecond, None))?,
                        &DataType::Int64,
                    )?
                } else {
                    col(c, &DataType::Int64)?
                };
                anyhow::Ok(t)
            })
            .collect::<anyhow::Result<_>>()?;
        let ints: Vec<&Int64Array> = ints.iter().map(|a| a.as_primitive::<Int64Type>()).collect();
        let at = |c: usize, r: usize| (!ints[c].is_null(r)).then(|| ints[c].value(r));
        for r in 0..b.num_rows() {
            out.push((
                k.value(r).to_string(),
                at(0, r),
                ints[1].value(r),
                ints[2].value(r),
                at(3, r),
                at(4, r),
            ));
        }
    }
    out.sort();
    Ok(out)
}

/// `LAG` over a stream's events against the batch query over the events the model keeps: an
/// event is held until the watermark passes it and then taken in event-time order per key,
/// so an event that arrives behind the watermark (the lowest of the partitions' newest event
/// times) is late; every other one is published once, with its key's previous values, however
/// the events arrive, are cut into micro-batches and restarted.
/// The events a query over the raw events keeps, in arrival order, and those it diverts as
/// late (sorted): an event older than the watermark (the lowest of the partitions' latest
/// event times, late events' included, no delay) when it arrives is late.
fn kept_and_late(run: &Run) -> (Vec<Event>, Vec<Late>) {
    let mut kept: Vec<Event> = Vec::new();
    let mut late: Vec<Late> = Vec::new();
    let mut max_by_partition: BTreeMap<i32, i64> = BTreeMap::new();
    let mut watermark = i64::MIN;
    for e in run.batches.iter().flatten() {
        // Judged by the watermark the events before it made, however they were cut.
        let late_here = e.t < watermark;
        let m = max_by_partition.entry(e.partition).or_insert(e.t);
        *m = (*m).max(e.t);
        if let Some(lowest) = max_by_partition.values().min() {
            watermark = watermark.max(*lowest);
        }
        if late_here {
            late.push((e.t, "beyond_allowed_lateness".to_string()));
            continue;
        }
        kept.push(e.clone());
    }
    late.sort();
    (kept, late)
}

fn check_lagged(run: &Run) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (kept, want_late) = kept_and_late(run);
    let (got, got_late) = rt
        .block_on(async {
            let statements = [
                EV.to_string(),
                "CREATE EXTERNAL TABLE out (k VARCHAR NOT NULL, g BIGINT, t TIMESTAMP NOT NULL, \
                 v BIGINT NOT NULL, p1 BIGINT, p2 BIGINT) STORED AS KAFKA OPTIONS ('topic' 'out')"
                    .to_string(),
                format!("INSERT INTO out {}", LAGGED.replace("{input}", "ev")),
            ];
            let (out, late) = run_query(&statements, "out", run, false).await?;
            anyhow::Ok((lag_rows(&out)?, late))
        })
        .expect("engine");
    let want = rt
        .block_on(async {
            // The kept events as the model's pairs, with a window LAG does not read.
            let events: Vec<Pair> = kept.iter().map(|e| (e.clone(), (0, 0))).collect();
            let ctx = pairs_context(&events)?;
            let query = LAGGED.replace("{input}", "pairs");
            anyhow::Ok(lag_rows(&ctx.sql(&query).await?.collect().await?)?)
        })
        .expect("batch");
    prop_assert_eq!(got_late, want_late, "late records");
    prop_assert_eq!(want.len(), kept.len());
    prop_assert_eq!(got, want, "lagged rows");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn lag_over_events_matches_a_batch_query(run in run()) {
        check_lagged(&run)?;
    }
}

/// Detectors per key over the raw events whose rows are one per event (no timers): the
/// default anomaly score, a stuck-sensor check and an alert machine.
const DETECTED_EVENTS: &str = "SELECT k, g, t, v, round(d['score'], 6) AS score, d['likelihood'] AS l, \
     d['warming'] AS warming, s['fault'] AS stuck, a['state'] AS state, a['started_at'] AS started \
     FROM (SELECT *, anomaly_score(CAST(v AS DOUBLE), t) OVER w AS d, \
     sensor_stuck(CAST(v / 10 AS DOUBLE), t, 2) OVER w AS s, alert_state(v, t, 10, 0, INTERVAL '30 seconds') OVER w AS a \
     FROM {input} WINDOW w AS (PARTITION BY k, g ORDER BY t))";

/// Rows rendered column by column (`columns`, in order), sorted.
fn rendered_rows(batches: &[RecordBatch], columns: &[&str]) -> anyhow::Result<Vec<String>> {
    let mut rows = Vec::new();
    for b in batches {
        let cols = columns
            .iter()
            .map(|name| {
                b.column_by_name(name)
                    .ok_or_else(|| anyhow::anyhow!("column {name}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        for r in 0..b.num_rows() {
            rows.push(
                cols.iter()
                    .map(|c| array_value_to_string(c, r))
                    .collect::<Result<Vec<_>, _>>()?
                    .join("|"),
            );
        }
    }
    rows.sort();
    Ok(rows)
}

/// Detectors over the raw events, fed in any cut, partitions, disorder and restarts, give
/// what the same functions give over a table of the events that were not late: each key's
/// readings are stepped in event-time order, once each, whatever the micro-batches.
fn check_detected_events(run: &Run) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (kept, want_late) = kept_and_late(run);
    let columns = [
        "k", "g", "t", "v", "score", "l", "warming", "stuck", "state", "started",
    ];
    let (got, got_late) = rt
        .block_on(async {
            let statements = [
                EV.to_string(),
                "CREATE EXTERNAL TABLE out (k VARCHAR NOT NULL, g INT, t TIMESTAMP NOT NULL, \
                 v BIGINT NOT NULL, score DOUBLE, l DOUBLE, warming BOOLEAN, stuck BOOLEAN, \
                 state VARCHAR, started TIMESTAMP) STORED AS KAFKA OPTIONS ('topic' 'out')"
                    .to_string(),
                format!(
                    "INSERT INTO out {}",
                    DETECTED_EVENTS.replace("{input}", "ev")
                ),
            ];
            let (out, late) = run_query(&statements, "out", run, false).await?;
            anyhow::Ok((rendered_rows(&out, &columns)?, late))
        })
        .expect("engine");
    let want = rt
        .block_on(async {
            let events: Vec<Pair> = kept.iter().map(|e| (e.clone(), (0, 0))).collect();
            let ctx = pairs_context(&events)?;
            urbanstream_operators::register_all(&ctx);
            let query = DETECTED_EVENTS.replace("{input}", "pairs");
            anyhow::Ok(rendered_rows(
                &ctx.sql(&query).await?.collect().await?,
                &columns,
            )?)
        })
        .expect("batch");
    prop_assert_eq!(got_late, want_late, "late records");
    prop_assert_eq!(want.len(), kept.len());
    prop_assert_eq!(got, want, "detected rows");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn detectors_over_events_match_a_batch_query(run in run()) {
        check_detected_events(&run)?;
    }
}

/// How a checkpoint taken during a run is written.
#[derive(Debug, Clone, Copy)]
enum Written {
    /// On another thread at once, while the next micro-batches are processed.
    Concurrently,
    /// Only after the micro-batch it was taken before (which finds the state still lent).
    AfterTheNextBatch,
    /// Never (a failed write): the query takes its state back unread.
    Never,
}

/// Each micro-batch's output, rendered row by row (every column, in order), and its late
/// rows' event times.
type Steps = Vec<(Vec<String>, Vec<i64>)>;

fn rendered(step: &urbanstream::plan::stream::StepOutput) -> (Vec<String>, Vec<i64>) {
    let rows = step
        .rows
        .iter()
        .flat_map(|b| {
            (0..b.num_rows()).map(move |r| {
                b.columns()
                    .iter()
                    .map(|c| array_value_to_string(c, r).expect("value"))
                    .collect::<Vec<_>>()
                    .join("|")
            })
        })
        .collect();
    (
        rows,
        step.diverted.iter().filter_map(|d| d.event_time).collect(),
    )
}

/// What a checkpoint taken while running is tried on.
#[derive(Debug, Clone, Copy)]
enum Checkpointed {
    /// The windowed query of this kind, with allowed lateness and, in half the runs, early
    /// fires.
    Windows(Kind),
    /// Detectors, a health check with timers and an alert machine per (k, g) over the raw
    /// events.
    Detectors,
    /// A left interval join of the stream with itself per (k, g) within a minute.
    Join,
    /// `LAG` over the raw events per (k, g).
    Lag,
    /// The events read as a changelog (the latest event per (k, g); some events delete their
    /// key's row), in minute windows with allowed lateness.
    Changelog,
    /// The top two groups per minute window, with allowed lateness and, in half the runs,
    /// early fires.
    TopN,
}

/// Detectors per key over the raw events: `anomaly_score`, `sensor_missing` (whose timers
/// keep each key's last row) and `alert_state`.
const DETECTORS: &str = "SELECT k, g, t, v, round(d['score'], 6) AS score, d['likelihood'] AS l,      m['fault'] AS missing, a['state'] AS state FROM (SELECT *,        anomaly_score(CAST(v AS DOUBLE), t) OVER w AS d,        sensor_missing(CAST(v AS DOUBLE), t, INTERVAL '1 minute') OVER w AS m,        alert_state(v, t, 30, 10) OVER w AS a      FROM ev WINDOW w AS (PARTITION BY k, g ORDER BY t))";

/// The query `what` is tried on.
async fn checkpointed_query(
    what: Checkpointed,
    run: &Run,
) -> anyhow::Result<urbanstream::plan::stream::StreamQuery> {
    let mut statements = vec![EV.to_string()];
    match what {
        Checkpointed::Windows(kind) => {
            statements.push("SET urbanstream.allowed_lateness = '2m'".to_string());
            statements.extend(early_fire(run));
            statements.push(format!(
                "SELECT k, g, window_start, window_end, {AGGREGATES} FROM ev GROUP BY {}, k, g",
                kind.sql()
            ));
        }
        Checkpointed::Detectors => statements.push(DETECTORS.to_string()),
        Checkpointed::Lag => statements.push(LAGGED.replace("{input}", "ev")),
        Checkpointed::Changelog => {
            assert!(
                EV.contains("'idle_timeout' '7d'") && EV.contains("v BIGINT NOT NULL)"),
                "the option follows this one, the op column the last"
            );
            // With an `op` column: some records delete their key's row (see `with_op`).
            statements[0] = EV
                .replace(
                    "'idle_timeout' '7d'",
                    "'idle_timeout' '7d', 'upsert_key' 'k, g'",
                )
                .replace("v BIGINT NOT NULL)", "v BIGINT NOT NULL, op VARCHAR)");
            statements.push("SET urbanstream.allowed_lateness = '2m'".to_string());
            statements.push(
                "SELECT window_start, window_end, count(*) AS n, sum(v) AS s, max(v) AS hi \
                 FROM ev GROUP BY tumble(t, INTERVAL '1 minute')"
                    .to_string(),
            );
        }
        Checkpointed::TopN => {
            statements.push("SET urbanstream.allowed_lateness = '2m'".to_string());
            statements.extend(early_fire(run));
            statements.push(
                TOP.replace("{window_end}", "window_end")
                    .replace("{input}", "ev")
                    .replace("{group_by}", Kind::Tumble.sql()),
            );
        }
        Checkpointed::Join => statements.push(
            "SELECT a.k, a.g, a.t, a.v, b.t AS bt, b.v AS bv FROM ev a LEFT JOIN ev b \
             ON a.k = b.k AND (a.g IS NOT DISTINCT FROM b.g) \
             AND b.t BETWEEN a.t - INTERVAL '1 minute' AND a.t + INTERVAL '1 minute'"
                .to_string(),
        ),
    }
    plan_query(&statements).await
}

/// Micro-batch `i` of the run as the stream's rows, with each row's partition.
fn micro_batch(batch: &[Event]) -> anyhow::Result<(RecordBatch, Vec<i32>)> {
    let columns: Vec<(&str, ArrayRef)> = vec![
        (
            "k",
            Arc::new(datafusion::arrow::array::StringViewArray::from_iter_values(
                batch.iter().map(|e| e.k),
            )),
        ),
        (
            "g",
            Arc::new(datafusion::arrow::array::Int32Array::from_iter(
                batch.iter().map(|e| e.g),
            )),
        ),
        (
            "t",
            Arc::new(TimestampMillisecondArray::from_iter_values(
                batch.iter().map(|e| e.t),
            )),
        ),
        (
            "v",
            Arc::new(datafusion::arrow::array::Int64Array::from_iter_values(
                batch.iter().map(|e| e.v),
            )),
        ),
    ];
    Ok((
        RecordBatch::try_from_iter(columns)?,
        batch.iter().map(|e| e.partition).collect(),
    ))
}

/// `rows` with an `op` column, as a changelog reads it: a quarter of the events delete their
/// key's row (`retract`), a few have no op (which upserts), the rest upsert.
fn with_op(schema: SchemaRef, rows: RecordBatch, batch: &[Event]) -> anyhow::Result<RecordBatch> {
    let op = datafusion::arrow::array::StringViewArray::from_iter(batch.iter().map(|e| {
        match e.v.rem_euclid(7) {
            0 => None,
            _ if e.v % 4 == 0 => Some("retract"),
            _ => Some("upsert"),
        }
    }));
    let mut columns = rows.columns().to_vec();
    columns.push(Arc::new(op));
    Ok(RecordBatch::try_new(schema, columns)?)
}

/// Processing time at micro-batch `i`: 7 s a batch, so that early fires come due.
fn now_at(i: usize) -> i64 {
    T0 + 86_400_000 + i as i64 * 7_000
}

/// Feeds micro-batches `from..` of the run into `query`, then closes every window; each
/// micro-batch's output (the last entry: the closing's). Before micro-batch `i`, when
/// `checkpoints[i]` says so, a checkpoint is taken and written as it says; the checkpoints
/// written, each with the micro-batch it was taken before.
async fn feed_query(
    query: &mut urbanstream::plan::stream::StreamQuery,
    run: &Run,
    from: usize,
    checkpoints: &[Option<Written>],
) -> anyhow::Result<(Steps, Vec<(usize, urbanstream::checkpoint::StateSnapshot)>)> {
    let mut steps = Vec::new();
    let mut written = Vec::new();
    let mut writing: Vec<(
        usize,
        std::thread::JoinHandle<anyhow::Result<urbanstream::checkpoint::StateSnapshot>>,
    )> = Vec::new();
    let mut after_next: Option<(usize, urbanstream::checkpoint::StateSnapshot)> = None;
    let schema = query.source().topic_schema.output_schema();
    let changelog_op = schema.column_with_name("op").is_some();
    for (i, batch) in run.batches.iter().enumerate().skip(from) {
        if let Some(how) = checkpoints.get(i).copied().flatten() {
            let state = query.snapshot(now_at(i))?;
            match how {
                Written::Concurrently => writing.push((
                    i,
                    std::thread::spawn(move || {
                        let mut state = state;
                        state.resolve()?;
                        Ok(state)
                    }),
                )),
                Written::AfterTheNextBatch => after_next = Some((i, state)),
                Written::Never => drop(state),
            }
        }
        let (mut rows, partitions) = micro_batch(batch)?;
        if changelog_op {
            rows = with_op(schema.clone(), rows, batch)?;
        }
        steps.push(rendered(
            &query
                .process_topic("ev", &rows, &partitions, None, now_at(i))
                .await?,
        ));
        if let Some((at, mut state)) = after_next.take() {
            state.resolve()?;
            written.push((at, state));
        }
    }
    for (at, w) in writing {
        let state = w
            .join()
            .map_err(|_| anyhow::anyhow!("the writer panicked"))??;
        written.push((at, state));
    }
    let end = T0 + 86_400_000;
    steps.push(rendered(
        &query
            .advance_watermark(end, now_at(run.batches.len()))
            .await?,
    ));
    written.sort_by_key(|(at, _)| *at);
    Ok((steps, written))
}

/// Checkpoints taken while the query runs, written while it goes on, later, or never, change
/// nothing it publishes or diverts, micro-batch by micro-batch (the same rows in the same
/// order, floating-point averages included); and each one written holds the state as it was
/// when taken: restored into a fresh query and fed the rest of the run, it publishes what
/// the uninterrupted query did from there.
fn check_checkpoints_taken_while_running(
    what: Checkpointed,
    run: &Run,
) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // Checkpoints before the micro-batches the run restarts after, written in turn each way.
    let ways = [
        Written::Concurrently,
        Written::AfterTheNextBatch,
        Written::Never,
    ];
    let checkpoints: Vec<Option<Written>> = run
        .restarts
        .iter()
        .enumerate()
        .map(|(i, c)| c.then_some(ways[i % 3]))
        .collect();
    let (plain, checkpointed, written) = rt
        .block_on(async {
            let mut q = checkpointed_query(what, run).await?;
            let (plain, _) = feed_query(&mut q, run, 0, &[]).await?;
            let mut q = checkpointed_query(what, run).await?;
            let (checkpointed, written) = feed_query(&mut q, run, 0, &checkpoints).await?;
            anyhow::Ok((plain, checkpointed, written))
        })
        .expect("engine");
    prop_assert_eq!(
        &checkpointed,
        &plain,
        "published while checkpoints were taken"
    );
    for (at, state) in &written {
        let restored = rt
            .block_on(async {
                let mut q = checkpointed_query(what, run).await?;
                q.restore(state, now_at(*at))?;
                let (steps, _) = feed_query(&mut q, run, *at, &[]).await?;
                anyhow::Ok(steps)
            })
            .expect("restored");
        // Row order within a micro-batch may differ after a restore; the rows may not.
        let sorted = |steps: &[(Vec<String>, Vec<i64>)]| -> Steps {
            steps
                .iter()
                .map(|(rows, late)| {
                    let mut rows = rows.clone();
                    rows.sort();
                    (rows, late.clone())
                })
                .collect()
        };
        prop_assert_eq!(
            sorted(&restored),
            sorted(&plain[*at..]),
            "restored from the checkpoint taken before micro-batch {}",
            at
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn tumbling_windows_checkpointed_while_running_publish_the_same(run in run()) {
        check_checkpoints_taken_while_running(Checkpointed::Windows(Kind::Tumble), &run)?;
    }

    #[test]
    fn hopping_windows_checkpointed_while_running_publish_the_same(run in run()) {
        check_checkpoints_taken_while_running(Checkpointed::Windows(Kind::Hop), &run)?;
    }

    #[test]
    fn cumulating_windows_checkpointed_while_running_publish_the_same(run in run()) {
        check_checkpoints_taken_while_running(Checkpointed::Windows(Kind::Cumulate), &run)?;
    }

    #[test]
    fn detectors_checkpointed_while_running_publish_the_same(run in run()) {
        check_checkpoints_taken_while_running(Checkpointed::Detectors, &run)?;
    }

    #[test]
    fn interval_joins_checkpointed_while_running_publish_the_same(run in run()) {
        check_checkpoints_taken_while_running(Checkpointed::Join, &run)?;
    }

    #[test]
    fn lag_checkpointed_while_running_publishes_the_same(run in run()) {
        check_checkpoints_taken_while_running(Checkpointed::Lag, &run)?;
    }

    #[test]
    fn changelogs_checkpointed_while_running_publish_the_same(run in run()) {
        check_checkpoints_taken_while_running(Checkpointed::Changelog, &run)?;
    }

    #[test]
    fn top_n_checkpointed_while_running_publishes_the_same(run in run()) {
        check_checkpoints_taken_while_running(Checkpointed::TopN, &run)?;
    }
}

/// A checkpoint reads window state out as it was when taken while the query goes on: updates
/// after the snapshot wait (the lent pane counts the groups it had), reach the state once the
/// checkpoint has read it out, and are not in its table; restored, the checkpoint holds
/// only what came before it. A snapshot not yet read out is refused by a restore.
#[tokio::test]
async fn a_checkpoint_reads_window_state_out_as_taken_while_updates_wait() -> anyhow::Result<()> {
    let plan = || {
        plan_query([
            EV,
            "SELECT k, g, window_start, count(*) AS n, sum(v) AS s FROM ev \
             GROUP BY tumble(t, INTERVAL '1 minute'), k, g",
        ])
    };
    let events = |keys: &[(&'static str, i64)]| -> Vec<Event> {
        keys.iter()
            .enumerate()
            .map(|(i, (k, v))| Event {
                k,
                g: Some(1),
                t: T0 + 1_000 + i as i64,
                v: *v,
                partition: i as i32 % PARTITIONS,
            })
            .collect()
    };
    let now = now_at(0);
    let counts = |steps: Vec<urbanstream::plan::stream::StepOutput>| -> Vec<String> {
        let mut rows: Vec<String> = steps.iter().flat_map(|s| rendered(s).0).collect();
        rows.sort();
        rows
    };
    let mut q = plan().await?;
    let (b, p) = micro_batch(&events(&[("a", 1), ("b", 2)]))?;
    q.process(&b, &p, None, now).await?;
    assert_eq!(q.state_groups(), 2);
    let snapshot = q.snapshot(now)?;
    assert!(!snapshot.deferred.is_empty(), "the window's panes are lent");
    // Keys c, d and e are new, a is not: all wait while the pane is lent.
    for update in [("c", 4), ("d", 32), ("e", 64), ("a", 8)] {
        let (b, p) = micro_batch(&events(&[update]))?;
        q.process(&b, &p, None, now).await?;
    }
    assert_eq!(q.state_groups(), 2, "c, d and e wait with their pane");
    let written = std::thread::spawn(move || {
        let mut snapshot = snapshot;
        snapshot.resolve().map(|()| snapshot)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the writer panicked"))??;
    let panes = written
        .tables
        .get("window.panes")
        .ok_or_else(|| anyhow::anyhow!("no panes table: {:?}", written.tables.keys()))?;
    assert_eq!(panes.num_rows(), 2, "the table holds the groups as taken");
    // Once read out, the pane catches up two waiting updates a micro-batch, each new one
    // waiting behind: five waiting, then four, three and two, and it is back.
    for (v, groups) in [(16, 2), (100, 2), (200, 2), (300, 5)] {
        let (b, p) = micro_batch(&events(&[("a", v)]))?;
        q.process(&b, &p, None, now).await?;
        assert_eq!(q.state_groups(), groups, "after a = {v}");
    }
    let end = T0 + 86_400_000;
    let published = counts(vec![q.advance_watermark(end, now).await?]);
    assert_eq!(
        published,
        [
            "a|1|2026-01-01T06:00:00|6|625|0|true|insert",
            "b|1|2026-01-01T06:00:00|1|2|0|true|insert",
            "c|1|2026-01-01T06:00:00|1|4|0|true|insert",
            "d|1|2026-01-01T06:00:00|1|32|0|true|insert",
            "e|1|2026-01-01T06:00:00|1|64|0|true|insert"
        ]
    );
    // Restored, the checkpoint holds what came before it only.
    let mut restored = plan().await?;
    let mut other = plan().await?;
    let (b, p) = micro_batch(&events(&[("a", 1)]))?;
    other.process(&b, &p, None, now).await?;
    let unresolved = other.snapshot(now)?;
    let refused = restored
        .restore(&unresolved, now)
        .expect_err("not read out");
    assert!(
        refused
            .to_string()
            .contains("before its state was read out"),
        "{refused}"
    );
    // Waiting updates are bounded: the 65th makes the query read the pane out itself (the
    // checkpoint still gets the state as taken), then it catches up as usual.
    let mut unresolved = unresolved;
    for i in 0..65 {
        let key: &'static str = Box::leak(format!("k{i}").into_boxed_str());
        let (b, p) = micro_batch(&events(&[(key, 1)]))?;
        other.process(&b, &p, None, now).await?;
        assert_eq!(other.state_groups(), 1, "after {} waiting updates", i + 1);
    }
    unresolved.resolve()?;
    assert_eq!(
        unresolved
            .tables
            .get("window.panes")
            .map(RecordBatch::num_rows),
        Some(1)
    );
    let closed = counts(vec![other.advance_watermark(end, now).await?]);
    assert_eq!(closed.len(), 66, "every waiting update reached the window");
    restored.restore(&written, now)?;
    assert_eq!(restored.state_groups(), 2);
    let published = counts(vec![restored.advance_watermark(end, now).await?]);
    assert_eq!(
        published,
        [
            "a|1|2026-01-01T06:00:00|1|1|0|true|insert",
            "b|1|2026-01-01T06:00:00|1|2|0|true|insert"
        ]
    );
    Ok(())
}
