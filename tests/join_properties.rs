//! Stream–stream joins against batch joins, over what the world varies: random events on two
//! streams with nullable keys, spread over 4 partitions each, arriving out of order within
//! and beyond the watermark delay, cut into random micro-batches of either stream, with
//! restarts from checkpoints at random points.
//!
//! The model follows the engine's promises: a stream's watermark is the lowest of its
//! partitions' largest event times less the delay (monotonic), and an event older than its
//! stream's watermark on arrival is late for the join and goes to the late records. Then,
//! once both watermarks are advanced past every event:
//! - the inner join's pairs equal a batch DataFusion join of the events the model keeps;
//! - the left and full outer joins' rows equal the batch outer joins of the same events
//!   (each unmatched row once, with nulls);
//! - counts and sums per five minutes of the left event time, and per five minutes of the
//!   right's, equal the batch aggregation of the batch join: no window closes before every
//!   pair in it is in;
//! - the late records are exactly the model's;
//! - counts and sums per five minutes over a `UNION ALL` of the two streams equal the batch
//!   query over the events the union keeps (an event is late for it when its window has
//!   ended by the lowest of the two streams' watermarks), and its late records the model's.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray,
};
use datafusion::arrow::util::display::array_value_to_string;
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use proptest::prelude::*;
use urbanstream::deterministic::{DeterministicEngine, Outcome};
use urbanstream_tests::plan_query;

/// 2026-01-01T06:00:00Z.
const T0: i64 = 1_767_247_200_000;
const SEC: i64 = 1000;
const PARTITIONS: i32 = 4;
/// Both streams' watermark delay.
const DELAY: i64 = 120 * SEC;

#[derive(Debug, Clone)]
struct Event {
    id: i64,
    /// Index into the keys; `None` is a null key.
    k: Option<u8>,
    t: i64,
    v: i64,
    partition: i32,
}

#[derive(Debug, Clone)]
struct Run {
    /// Micro-batches in arrival order: (stream 0 = a, 1 = b; events of one partition).
    batches: Vec<(usize, Vec<Event>)>,
    restarts: Vec<bool>,
}

fn event(stream: usize) -> impl Strategy<Value = (Option<u8>, i64, i64, i32, i64)> {
    let _ = stream;
    (
        prop_oneof![4 => (0u8..2).prop_map(Some), 1 => Just(None)],
        // On a 30 s grid, so that events often sit exactly on the bounds and watermarks.
        (0i64..40).prop_map(|t| t * 30),
        0i64..100,
        0..PARTITIONS,
        // Arrival jitter: mostly within the delay, sometimes beyond it.
        prop_oneof![6 => (0i64..4).prop_map(|j| j * 30), 1 => (4i64..10).prop_map(|j| j * 30)],
    )
}

fn run() -> impl Strategy<Value = Run> {
    (
        prop::collection::vec(event(0), 0..60),
        prop::collection::vec(event(1), 0..60),
        prop::collection::vec(1usize..7, 80),
        prop::collection::vec(prop::bool::weighted(0.1), 80),
    )
        .prop_map(|(a, b, cuts, restarts)| {
            // Each event arrives at its time plus its jitter; ties keep generation order.
            let mut arrivals: Vec<(i64, usize, Event)> = Vec::new();
            let mut id = 0;
            for (stream, events) in [(0usize, a), (1, b)] {
                for (k, t, v, partition, jitter) in events {
                    id += 1;
                    arrivals.push((
                        t + jitter,
                        stream,
                        Event {
                            id,
                            k,
                            t: T0 + t * SEC,
                            v,
                            partition,
                        },
                    ));
                }
            }
            arrivals.sort_by_key(|(at, _, e)| (*at, e.id));
            let mut batches: Vec<(usize, Vec<Event>)> = Vec::new();
            let mut cut = cuts.iter().cycle();
            let mut room = 0;
            for (_, stream, e) in arrivals {
                match batches.last_mut() {
                    Some((s, events))
                        if *s == stream && events[0].partition == e.partition && room > 0 =>
                    {
                        events.push(e);
                        room -= 1;
                    }
                    _ => {
                        batches.push((stream, vec![e]));
                        room = cut.next().copied().unwrap_or(1) - 1;
                    }
                }
            }
            let restarts = restarts.into_iter().cycle().take(batches.len()).collect();
            Run { batches, restarts }
        })
}

/// The model of the union: an event is late when its five-minute window has ended by the
/// union's watermark (the lowest of the watermarks of the streams that have delivered, each
/// over its events, late ones included); returns the kept events per stream and the late ids.
fn union_model(run: &Run) -> ([Vec<Event>; 2], Vec<i64>) {
    const WINDOW: i64 = 5 * 60 * SEC;
    let mut kept: [Vec<Event>; 2] = [Vec::new(), Vec::new()];
    let mut late = Vec::new();
    let mut maxima: [BTreeMap<i32, i64>; 2] = [BTreeMap::new(), BTreeMap::new()];
    let mut watermark: [Option<i64>; 2] = [None, None];
    for (stream, events) in &run.batches {
        let s = *stream;
        let union = watermark.iter().flatten().min().copied();
        for e in events {
            let end = e.t.div_euclid(WINDOW) * WINDOW + WINDOW;
            // Late or not, an event shows how far its partition has come.
            let m = maxima[s].entry(e.partition).or_insert(e.t);
            *m = (*m).max(e.t);
            if union.is_some_and(|w| end <= w) {
                late.push(e.id);
            } else {
                kept[s].push(e.clone());
            }
        }
        if let Some(low) = maxima[s].values().min() {
            let candidate = low - DELAY;
            watermark[s] = Some(watermark[s].map_or(candidate, |w| w.max(candidate)));
        }
    }
    late.sort_unstable();
    (kept, late)
}

/// The events the model keeps per stream, and the ids of the late ones.
fn model(run: &Run) -> ([Vec<Event>; 2], Vec<i64>) {
    let mut kept: [Vec<Event>; 2] = [Vec::new(), Vec::new()];
    let mut late = Vec::new();
    let mut maxima: [BTreeMap<i32, i64>; 2] = [BTreeMap::new(), BTreeMap::new()];
    let mut watermark: [Option<i64>; 2] = [None, None];
    for (stream, events) in &run.batches {
        let s = *stream;
        for e in events {
            let m = maxima[s].entry(e.partition).or_insert(e.t);
            *m = (*m).max(e.t);
            if watermark[s].is_some_and(|w| e.t < w) {
                late.push(e.id);
            } else {
                kept[s].push(e.clone());
            }
        }
        if let Some(low) = maxima[s].values().min() {
            let candidate = low - DELAY;
            watermark[s] = Some(watermark[s].map_or(candidate, |w| w.max(candidate)));
        }
    }
    late.sort_unstable();
    (kept, late)
}

const KEYS: [&str; 4] = ["k0", "k1", "k2", "k3"];

const BOUND: &str =
    "a.k = b.k AND b.t BETWEEN a.t - INTERVAL '1 minute' AND a.t + INTERVAL '3 minutes'";

const WINDOWED: &str = "a.k = b.k AND date_bin(INTERVAL '5 minutes', a.t) = date_bin(INTERVAL '5 minutes', b.t) \
     AND b.t BETWEEN a.t - INTERVAL '5 minutes' AND a.t + INTERVAL '5 minutes'";

const STRICT: &str =
    "a.k = b.k AND b.t > a.t - INTERVAL '1 minute' AND a.t + INTERVAL '3 minutes' > b.t";

/// The queries: (sink, its columns, the SELECT, the batch SELECT giving the same rows).
fn queries() -> Vec<(&'static str, &'static str, String, String)> {
    vec![
        (
            "inner_pairs",
            "aid BIGINT, bid BIGINT",
            format!("SELECT a.id AS aid, b.id AS bid FROM a JOIN b ON {BOUND}"),
            format!("SELECT a.id AS aid, b.id AS bid FROM a JOIN b ON {BOUND}"),
        ),
        (
            // A condition beyond the time bound, evaluated on each pair.
            "filtered_pairs",
            "aid BIGINT, bid BIGINT",
            format!(
                "SELECT a.id AS aid, b.id AS bid FROM a LEFT JOIN b ON {BOUND} AND a.v + 30 >= b.v"
            ),
            format!(
                "SELECT a.id AS aid, b.id AS bid FROM a LEFT JOIN b ON {BOUND} AND a.v + 30 >= b.v"
            ),
        ),
        (
            // A window join: both rows in the same five minutes, as an interval join with the
            // window in the key.
            "window_pairs",
            "aid BIGINT, bid BIGINT",
            format!("SELECT a.id AS aid, b.id AS bid FROM a JOIN b ON {WINDOWED}"),
            format!("SELECT a.id AS aid, b.id AS bid FROM a JOIN b ON {WINDOWED}"),
        ),
        (
            // No equi key: every pair within the bound.
            "keyless_pairs",
            "aid BIGINT, bid BIGINT",
            "SELECT a.id AS aid, b.id AS bid FROM a JOIN b ON b.t BETWEEN a.t - INTERVAL '30 seconds' \
             AND a.t + INTERVAL '30 seconds'"
                .to_string(),
            "SELECT a.id AS aid, b.id AS bid FROM a JOIN b ON b.t BETWEEN a.t - INTERVAL '30 seconds' \
             AND a.t + INTERVAL '30 seconds'"
                .to_string(),
        ),
        (
            // Strict bounds: a pair exactly on them is not one.
            "strict_pairs",
            "aid BIGINT, bid BIGINT",
            format!("SELECT a.id AS aid, b.id AS bid FROM a JOIN b ON {STRICT}"),
            format!("SELECT a.id AS aid, b.id AS bid FROM a JOIN b ON {STRICT}"),
        ),
        (
            "left_pairs",
            "aid BIGINT, bid BIGINT",
            format!("SELECT a.id AS aid, b.id AS bid FROM a LEFT JOIN b ON {BOUND}"),
            format!("SELECT a.id AS aid, b.id AS bid FROM a LEFT JOIN b ON {BOUND}"),
        ),
        (
            "full_pairs",
            "aid BIGINT, bid BIGINT",
            format!("SELECT a.id AS aid, b.id AS bid FROM a FULL JOIN b ON {BOUND}"),
            format!("SELECT a.id AS aid, b.id AS bid FROM a FULL JOIN b ON {BOUND}"),
        ),
        (
            "by_left",
            "window_start TIMESTAMP NOT NULL, n BIGINT NOT NULL, s BIGINT, revision INT NOT NULL, op VARCHAR NOT NULL",
            format!(
                "SELECT window_start, count(*) AS n, sum(a.v * b.v) AS s FROM a JOIN b ON {BOUND} \
                 GROUP BY tumble(a.t, INTERVAL '5 minutes')"
            ),
            format!(
                "SELECT date_bin(INTERVAL '5 minutes', a.t) AS window_start, count(*) AS n, \
                 sum(a.v * b.v) AS s FROM a JOIN b ON {BOUND} GROUP BY 1"
            ),
        ),
        (
            "by_right",
            "window_start TIMESTAMP NOT NULL, n BIGINT NOT NULL, s BIGINT, revision INT NOT NULL, op VARCHAR NOT NULL",
            format!(
                "SELECT window_start, count(*) AS n, sum(b.v) AS s FROM a RIGHT JOIN b ON {BOUND} \
                 GROUP BY tumble(b.t, INTERVAL '5 minutes')"
            ),
            format!(
                "SELECT date_bin(INTERVAL '5 minutes', b.t) AS window_start, count(*) AS n, \
                 sum(b.v) AS s FROM a RIGHT JOIN b ON {BOUND} GROUP BY 1"
            ),
        ),
        // Last: the union, whose late events follow the windows (see `model`).
        (
            "union_counts",
            "window_start TIMESTAMP NOT NULL, n BIGINT NOT NULL, s BIGINT, revision INT NOT NULL, op VARCHAR NOT NULL",
            "SELECT window_start, count(*) AS n, sum(v) AS s FROM (SELECT k, t, v FROM a \
             UNION ALL SELECT k, t, v * 1000 AS v FROM b) GROUP BY tumble(t, INTERVAL '5 minutes')"
                .to_string(),
            "SELECT date_bin(INTERVAL '5 minutes', t) AS window_start, count(*) AS n, sum(v) AS s \
             FROM (SELECT k, t, v FROM ua UNION ALL SELECT k, t, v * 1000 AS v FROM ub) GROUP BY 1"
                .to_string(),
        ),
    ]
}

fn values(events: &[Event]) -> String {
    events
        .iter()
        .map(|e| {
            format!(
                "({}, {}, to_timestamp_millis({}), {})",
                e.id,
                e.k.map_or("NULL".to_string(), |k| format!("'{}'", KEYS[k as usize])),
                e.t,
                e.v
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Rows as sorted text lines, without the engine's revision and op columns.
fn lines(batches: &[RecordBatch]) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for b in batches {
        let schema = b.schema();
        let columns: Vec<usize> = (0..b.num_columns())
            .filter(|&c| {
                !matches!(
                    schema.field(c).name().as_str(),
                    "revision" | "op" | "is_final"
                )
            })
            .collect();
        for r in 0..b.num_rows() {
            let cells = columns
                .iter()
                .map(|&c| {
                    let a = b.column(c);
                    if a.is_null(r) {
                        Ok("NULL".to_string())
                    } else {
                        array_value_to_string(a, r)
                    }
                })
                .collect::<Result<Vec<_>, _>>()?;
            out.push(cells.join(" "));
        }
    }
    out.sort();
    Ok(out)
}

/// What each query published, and the ids of the late records.
async fn engine(run: &Run) -> anyhow::Result<(Vec<Vec<String>>, Vec<i64>, Vec<i64>)> {
    let mut engine = DeterministicEngine::new();
    for stream in ["a", "b"] {
        engine
            .execute(&format!(
                "CREATE EXTERNAL TABLE {stream} (id BIGINT NOT NULL, k VARCHAR, t TIMESTAMP NOT NULL, \
                 v BIGINT NOT NULL) STORED AS KAFKA OPTIONS ('topic' '{stream}', 'event_time' 't', \
                 'watermark_delay' '2m', 'idle_timeout' '7d')"
            ))
            .await?;
    }
    let queries = queries();
    for (sink, columns, select, _) in &queries {
        engine
            .execute(&format!(
                "CREATE EXTERNAL TABLE {sink} ({columns}) STORED AS KAFKA OPTIONS ('topic' '{sink}')"
            ))
            .await?;
        engine
            .execute(&format!("INSERT INTO {sink} {select}"))
            .await?;
    }
    for ((stream, events), restart) in run.batches.iter().zip(&run.restarts) {
        engine
            .execute(&format!(
                "INSERT INTO {} PARTITION {} VALUES {}",
                ["a", "b"][*stream],
                events[0].partition,
                values(events)
            ))
            .await?;
        if *restart {
            engine.execute("RESTART").await?;
        }
    }
    for stream in ["a", "b"] {
        engine
            .execute(&format!(
                "ADVANCE WATERMARK {stream} TO '2026-01-02T00:00:00'"
            ))
            .await?;
    }
    let mut out = Vec::new();
    for (sink, ..) in &queries {
        let Outcome::Rows(rows) = engine.execute(&format!("SELECT * FROM {sink}")).await? else {
            anyhow::bail!("no rows from {sink}")
        };
        out.push(lines(&rows)?);
    }
    let Outcome::Rows(late_rows) = engine.execute("SHOW LATE").await? else {
        anyhow::bail!("no late rows")
    };
    // Each late event is reported once per query; the payload is not shown, so late events
    // are known by their event time. The union's (the last query's) apart.
    let union_query = format!("q{}", queries.len());
    let mut late = Vec::new();
    let mut union_late = Vec::new();
    for b in &late_rows {
        let names = b
            .column(0)
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| anyhow::anyhow!("late query names"))?;
        let t = datafusion::arrow::compute::cast(
            b.column(1),
            &datafusion::arrow::datatypes::DataType::Timestamp(
                datafusion::arrow::datatypes::TimeUnit::Millisecond,
                None,
            ),
        )?;
        let t = t
            .as_any()
            .downcast_ref::<TimestampMillisecondArray>()
            .ok_or_else(|| anyhow::anyhow!("late event time"))?;
        for r in 0..b.num_rows() {
            if names.value(r) == union_query {
                union_late.push(t.value(r));
            } else {
                late.push(t.value(r));
            }
        }
    }
    late.sort_unstable();
    union_late.sort_unstable();
    Ok((out, late, union_late))
}

/// The batch queries over the kept events.
async fn batch(
    kept: &[Vec<Event>; 2],
    union: &[Vec<Event>; 2],
) -> anyhow::Result<Vec<Vec<String>>> {
    let ctx = SessionContext::new();
    for (stream, events) in ["a", "b", "ua", "ub"].iter().zip(kept.iter().chain(union)) {
        let columns: Vec<(&str, ArrayRef)> = vec![
            (
                "id",
                Arc::new(Int64Array::from_iter_values(events.iter().map(|e| e.id))),
            ),
            (
                "k",
                Arc::new(StringArray::from_iter(
                    events.iter().map(|e| e.k.map(|k| KEYS[k as usize])),
                )),
            ),
            (
                "t",
                Arc::new(TimestampMillisecondArray::from_iter_values(
                    events.iter().map(|e| e.t),
                )),
            ),
            (
                "v",
                Arc::new(Int64Array::from_iter_values(events.iter().map(|e| e.v))),
            ),
        ];
        let batch = RecordBatch::try_from_iter(columns)?;
        ctx.register_table(
            *stream,
            Arc::new(MemTable::try_new(batch.schema(), vec![vec![batch]])?),
        )?;
    }
    let mut out = Vec::new();
    for (_, _, _, select) in queries() {
        let rows = ctx.sql(&select).await?.collect().await?;
        out.push(lines(&rows)?);
    }
    Ok(out)
}

fn check(run: &Run) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let (kept, late_ids) = model(run);
    let (union_kept, union_late_ids) = union_model(run);
    let (published, late, union_late) = rt
        .block_on(engine(run))
        .map_err(|e| TestCaseError::fail(format!("engine: {e:#}")))?;
    let expected = rt
        .block_on(batch(&kept, &union_kept))
        .map_err(|e| TestCaseError::fail(format!("batch: {e:#}")))?;
    for (((sink, ..), got), want) in queries().iter().zip(&published).zip(&expected) {
        prop_assert_eq!(got, want, "{} differs from the batch query", sink);
    }
    let times: BTreeMap<i64, i64> = run
        .batches
        .iter()
        .flat_map(|(_, events)| events.iter().map(|e| (e.id, e.t)))
        .collect();
    let mut want_late: Vec<i64> = late_ids
        .iter()
        .flat_map(|id| std::iter::repeat_n(times[id], queries().len() - 1))
        .collect();
    want_late.sort_unstable();
    prop_assert_eq!(late, want_late, "late records of the joins");
    let mut want_union_late: Vec<i64> = union_late_ids.iter().map(|id| times[id]).collect();
    want_union_late.sort_unstable();
    prop_assert_eq!(union_late, want_union_late, "late records of the union");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(if std::env::var_os("CI").is_some() { 24 } else { 48 }))]

    #[test]
    fn interval_joins_match_batch_joins(run in run()) {
        check(&run)?;
    }
}

/// Without checkpoints, a LEFT JOIN holds back the offsets of a right row it has evicted
/// until its left partners have left the state too: replayed without the right row, a left
/// row would otherwise come out unmatched after its pair was published.
#[tokio::test]
async fn an_outer_join_holds_a_partners_offsets_until_the_kept_side_is_done() -> anyhow::Result<()>
{
    let mut query = join_of_two(
        "7d",
        format!("SELECT a.id AS aid, b.id AS bid FROM a LEFT JOIN b ON {BOUND}"),
    )
    .await?;
    let now = T0 + 86_400_000;
    let batch = |id: i64, t: i64| one_row(id, t, 1);
    // Left row 1 at T0 and right row 2 at T0 pair. The bound is b.t - a.t in [-1 min, 3 min].
    query
        .process_from("a", &batch(1, T0)?, &[0], Some(&[10]), now)
        .await?;
    let out = query
        .process_from("b", &batch(2, T0)?, &[0], Some(&[20]), now)
        .await?;
    assert_eq!(out.rows.iter().map(RecordBatch::num_rows).sum::<usize>(), 1);
    // The left stream moves 2 minutes on: right row 2 can meet no left row to come (it needs
    // a left row by T0 + 1 min) and leaves the state; left row 1 stays (a right row up to
    // T0 + 3 min could still come).
    query
        .process_from("a", &batch(3, T0 + 120_000)?, &[0], Some(&[11]), now)
        .await?;
    assert_eq!(
        query.held_offsets_of("tb").get(&0),
        Some(&20),
        "right row 2 still held"
    );
    // The right stream reaches T0 + 4 min: left row 1 leaves, matched, but a left row at
    // T0 + 1 min (right row 2's last possible partner) would not have left yet.
    query
        .process_from("b", &batch(4, T0 + 240_000)?, &[0], Some(&[21]), now)
        .await?;
    assert_eq!(
        query.held_offsets_of("tb").get(&0),
        Some(&20),
        "right row 2 still held"
    );
    // Past it: right row 2 is released.
    query
        .process_from("b", &batch(5, T0 + 241_000)?, &[0], Some(&[22]), now)
        .await?;
    assert_eq!(
        query.held_offsets_of("tb").get(&0),
        Some(&21),
        "right row 2 released"
    );
    Ok(())
}

/// A join's progress watermark (the one the pipeline shows) follows a side that has gone
/// quiet for its idle timeout, as the join's own eviction does, while the query's plain
/// watermark still waits for it; once both sides are quiet the query counts as quiet. Each
/// side delivers on 4 partitions.
#[tokio::test]
async fn a_joins_progress_watermark_follows_the_side_that_still_delivers() -> anyhow::Result<()> {
    let mut query = join_of_two(
        "10s",
        format!("SELECT a.id AS aid, b.id AS bid FROM a JOIN b ON {BOUND}"),
    )
    .await?;
    // One row per partition, all at `t`.
    let batch = |t: i64| -> anyhow::Result<RecordBatch> {
        let n = PARTITIONS as usize;
        let columns: Vec<(&str, ArrayRef)> = vec![
            ("id", Arc::new(Int64Array::from_iter_values(0..n as i64))),
            (
                "k",
                Arc::new(datafusion::arrow::array::StringViewArray::from(vec![
                    Some(
                        "k0"
                    );
                    n
                ])),
            ),
            ("t", Arc::new(TimestampMillisecondArray::from(vec![t; n]))),
            ("v", Arc::new(Int64Array::from(vec![1; n]))),
        ];
        Ok(RecordBatch::try_from_iter(columns)?)
    };
    let partitions: Vec<i32> = (0..PARTITIONS).collect();
    // Processing time a day on, so that no event counts as stamped in the future.
    let now = T0 + 86_400_000;
    query
        .process_from("a", &batch(T0)?, &partitions, None, now)
        .await?;
    query
        .process_from("b", &batch(T0)?, &partitions, None, now)
        .await?;
    // b.t - a.t in [-1 min, 3 min]: new pairs may still come from left rows at T0 meeting
    // right rows up to T0 + 3 min, so the output waits 3 minutes behind both.
    assert_eq!(query.watermark(), Some(T0 - 180_000));
    assert_eq!(query.progress_watermark(now), query.watermark());
    assert!(!query.inputs_quiet(now));

    // 20 s on, only the left stream delivers, 2 minutes on in event time.
    let later = now + 20_000;
    query
        .process_from("a", &batch(T0 + 120_000)?, &partitions, None, later)
        .await?;
    assert_eq!(
        query.watermark(),
        Some(T0 - 180_000),
        "the plain watermark waits for the quiet right stream"
    );
    assert_eq!(
        query.progress_watermark(later),
        Some(T0 - 60_000),
        "the quiet right stream follows the left: min(T0+2min-3min, T0+2min-1min)"
    );
    assert!(!query.inputs_quiet(later));
    assert!(
        query.inputs_quiet(later + 10_001),
        "both streams silent past their idle timeout"
    );
    Ok(())
}

/// A join's side watermarks move on processing time alone (a side quiet for its idle timeout
/// follows the other) while its output watermark may stay where it was; the rows that move
/// releases (here the right rows no left row can match any more, published unmatched) come
/// out whether or not the query was ticked in between, over 4 partitions a side.
#[tokio::test]
async fn a_join_side_going_idle_releases_rows_however_often_it_is_ticked() -> anyhow::Result<()> {
    let plan = || {
        plan_query([
            "CREATE EXTERNAL TABLE a (id BIGINT NOT NULL, k VARCHAR, t TIMESTAMP NOT NULL, v BIGINT NOT NULL) \
             STORED AS KAFKA OPTIONS ('topic' 'ta', 'event_time' 't', 'watermark_delay' '0s', 'idle_timeout' '60s')",
            "CREATE EXTERNAL TABLE b (id BIGINT NOT NULL, k VARCHAR, t TIMESTAMP NOT NULL, v BIGINT NOT NULL) \
             STORED AS KAFKA OPTIONS ('topic' 'tb', 'event_time' 't', 'watermark_delay' '0s', 'idle_timeout' '60s')",
            "SELECT a.id AS aid, b.id AS bid, b.t AS bt FROM a RIGHT JOIN b ON a.k = b.k \
             AND b.t BETWEEN a.t AND a.t + INTERVAL '10 seconds'",
        ])
    };
    // Rows at `t + i` seconds on partition i % 4, all of key `k`.
    let batch = |k: &str, t: i64, n: usize| -> anyhow::Result<RecordBatch> {
        let columns: Vec<(&str, ArrayRef)> = vec![
            ("id", Arc::new(Int64Array::from_iter_values(0..n as i64))),
            (
                "k",
                Arc::new(datafusion::arrow::array::StringViewArray::from(vec![
                    Some(k);
                    n
                ])),
            ),
            (
                "t",
                Arc::new(TimestampMillisecondArray::from_iter_values(
                    (0..n as i64).map(|i| t + i * SEC),
                )),
            ),
            ("v", Arc::new(Int64Array::from(vec![1; n]))),
        ];
        Ok(RecordBatch::try_from_iter(columns)?)
    };
    let partitions = |n: usize| -> Vec<i32> { (0..n as i32).map(|i| i % PARTITIONS).collect() };
    let now = T0 + 86_400_000;
    let count = |outs: &[urbanstream::plan::stream::StepOutput]| -> usize {
        outs.iter()
            .flat_map(|o| &o.rows)
            .map(RecordBatch::num_rows)
            .sum()
    };
    let mut runs = Vec::new();
    // Ticked at these processing times after the input, then at a minute and a second after
    // the left side's last record, when it has gone idle.
    for ticks in [vec![], vec![55 * SEC], vec![52 * SEC, 55 * SEC, 59 * SEC]] {
        let mut query = plan().await?;
        let mut outs = Vec::new();
        outs.push(
            query
                .process_from("a", &batch("k0", T0, 8)?, &partitions(8), None, now)
                .await?,
        );
        outs.push(
            query
                .process_from(
                    "b",
                    &batch("k1", T0 + 3 * SEC, 8)?,
                    &partitions(8),
                    None,
                    now + 50 * SEC,
                )
                .await?,
        );
        for t in ticks {
            outs.push(query.tick(now + t).await?);
        }
        outs.push(query.tick(now + 61 * SEC).await?);
        runs.push(count(&outs));
    }
    assert!(
        runs[0] > 0,
        "the right rows were not published unmatched once the left side went idle"
    );
    assert!(
        runs.iter().all(|r| *r == runs[0]),
        "rows published with and without ticks in between: {runs:?}"
    );
    Ok(())
}

/// A backlog's micro-batch of one key meeting many buffered rows: 2 100 rows on each side
/// make 4 410 000 pairs from one batch, more than a join's results may be from one
/// micro-batch. Aggregated above the join, the pairs go through in parts and every one is
/// counted (a cap on pairs per micro-batch failed this query at every retry); with nothing
/// aggregating them, the query fails naming the way out rather than hold them all.
#[tokio::test]
async fn a_micro_batch_of_millions_of_pairs_is_aggregated_in_parts() -> anyhow::Result<()> {
    const ROWS: usize = 2_100;
    let tables = [
        "CREATE EXTERNAL TABLE a (id BIGINT NOT NULL, k VARCHAR, t TIMESTAMP NOT NULL, v BIGINT NOT NULL) \
         STORED AS KAFKA OPTIONS ('topic' 'ta', 'event_time' 't', 'watermark_delay' '0s', 'idle_timeout' '7d')",
        "CREATE EXTERNAL TABLE b (id BIGINT NOT NULL, k VARCHAR, t TIMESTAMP NOT NULL, v BIGINT NOT NULL) \
         STORED AS KAFKA OPTIONS ('topic' 'tb', 'event_time' 't', 'watermark_delay' '0s', 'idle_timeout' '7d')",
    ];
    let now = T0 + 86_400_000;
    let batch = |rows: usize, t: i64| -> anyhow::Result<RecordBatch> {
        let columns: Vec<(&str, ArrayRef)> = vec![
            ("id", Arc::new(Int64Array::from_iter_values(0..rows as i64))),
            (
                "k",
                Arc::new(datafusion::arrow::array::StringViewArray::from(vec![
                    Some(
                        "k0"
                    );
                    rows
                ])),
            ),
            (
                "t",
                Arc::new(TimestampMillisecondArray::from(vec![t; rows])),
            ),
            ("v", Arc::new(Int64Array::from_iter_values(0..rows as i64))),
        ];
        Ok(RecordBatch::try_from_iter(columns)?)
    };
    let mut counted = plan_query(tables.iter().copied().chain([format!(
        "SELECT window_start, count(*) AS pairs, sum(a.v + b.v) AS total FROM a JOIN b ON {BOUND} \
         GROUP BY tumble(a.t, INTERVAL '5 minutes')"
    )
    .as_str()]))
    .await?;
    let mut rows = Vec::new();
    for (table, t) in [
        ("b", T0),
        ("a", T0),
        ("a", T0 + 3_600_000),
        ("b", T0 + 3_600_000),
    ] {
        let n = if t == T0 { ROWS } else { 1 };
        let out = counted
            .process_from(table, &batch(n, t)?, &[0], Some(&[0]), now)
            .await?;
        rows.extend(out.rows);
    }
    let first = rows
        .iter()
        .find(|b| b.num_rows() > 0)
        .ok_or_else(|| anyhow::anyhow!("no window closed"))?;
    let column = |name: &str| -> anyhow::Result<i64> {
        Ok(array_value_to_string(first.column_by_name(name).expect(name), 0)?.parse()?)
    };
    let n = ROWS as i64;
    assert_eq!(column("pairs")?, n * n);
    // Each of the n values of a side meets every one of the other's: 2 · n · Σv.
    assert_eq!(column("total")?, 2 * n * (n * (n - 1) / 2));

    // With nothing aggregating the pairs: `buffered` rows of one side met by `arriving` of
    // the other in one micro-batch.
    let listed = |buffered: usize, arriving: usize| {
        let batch = &batch;
        async move {
            let mut listed = plan_query(tables.iter().copied().chain([
                format!("SELECT a.id AS aid, b.id AS bid FROM a JOIN b ON {BOUND}").as_str(),
            ]))
            .await?;
            listed
                .process_from("b", &batch(buffered, T0)?, &[0], Some(&[0]), now)
                .await?;
            let error = listed
                .process_from("a", &batch(arriving, T0)?, &[0], Some(&[0]), now)
                .await
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            anyhow::Ok(error)
        }
    };
    let error = listed(ROWS, ROWS).await?;
    assert!(
        error.contains(
            "a join of two streams gave more than 4194304 result rows from one micro-batch"
        ) && error.contains("aggregate the pairs"),
        "{error}"
    );
    // Held whichever part crosses the cap, the last one too: 1 400 000 buffered rows met by 3
    // arriving ones make parts of 1 400 000 pairs each, the third past the cap.
    let error = listed(1_400_000, 3).await?;
    assert!(
        error.contains("a join of two streams gave more than 4194304 result rows"),
        "{error}"
    );
    Ok(())
}

/// A micro-batch every row of which the join's condition refuses holds nothing: it held its
/// offsets for good (an empty chunk that eviction never reached), so that the partition's
/// commit stood still. The refused record goes to the DLQ, the others' offsets are released
/// as usual.
#[tokio::test]
async fn a_batch_the_join_condition_refuses_whole_holds_no_offsets() -> anyhow::Result<()> {
    let mut query = join_of_two(
        "7d",
        format!("SELECT a.id AS aid, b.id AS bid FROM a JOIN b ON {BOUND} AND a.v / b.v > 0"),
    )
    .await?;
    let now = T0 + 86_400_000;
    let batch = one_row;
    // Right row 2 (v = 0) is held; left row 1 meets it and is refused: alone in its batch.
    query
        .process_from("b", &batch(2, T0, 0)?, &[0], Some(&[20]), now)
        .await?;
    let out = query
        .process_from("a", &batch(1, T0, 5)?, &[0], Some(&[10]), now)
        .await?;
    assert_eq!(out.failed.len(), 1, "{out:?}");
    assert!(
        out.failed[0].error.contains("Divide by zero"),
        "{:?}",
        out.failed
    );
    assert_eq!(
        query.held_offsets_of("ta").get(&0),
        None,
        "nothing of a held"
    );
    // Both streams move far on: nothing of either is held.
    query
        .process_from("a", &batch(3, T0 + 3_600_000, 1)?, &[0], Some(&[11]), now)
        .await?;
    query
        .process_from("b", &batch(4, T0 + 3_600_000, 1)?, &[0], Some(&[21]), now)
        .await?;
    let held = query.held_offsets_of("ta").get(&0).copied();
    assert!(
        held.is_none_or(|o| o >= 11),
        "left offset 10 still held: {held:?}"
    );
    Ok(())
}

/// The query `select` over streams `a` and `b` of [`two_streams`].
async fn join_of_two(
    idle: &str,
    select: String,
) -> anyhow::Result<urbanstream::plan::stream::StreamQuery> {
    let [a, b] = two_streams(idle);
    plan_query([a, b, select]).await
}

/// Streams `a` and `b` (id, k, t, v) on topics `ta` and `tb`, without watermark delay, idle
/// after `idle`.
fn two_streams(idle: &str) -> [String; 2] {
    ["a", "b"].map(|name| {
        format!(
            "CREATE EXTERNAL TABLE {name} (id BIGINT NOT NULL, k VARCHAR, t TIMESTAMP NOT NULL, \
             v BIGINT NOT NULL) STORED AS KAFKA OPTIONS ('topic' 't{name}', 'event_time' 't', \
             'watermark_delay' '0s', 'idle_timeout' '{idle}')"
        )
    })
}

/// One row (id, key k0, t, v) of [`two_streams`].
fn one_row(id: i64, t: i64, v: i64) -> anyhow::Result<RecordBatch> {
    let columns: Vec<(&str, ArrayRef)> = vec![
        ("id", Arc::new(Int64Array::from(vec![id]))),
        (
            "k",
            Arc::new(datafusion::arrow::array::StringViewArray::from(vec![Some(
                "k0",
            )])),
        ),
        ("t", Arc::new(TimestampMillisecondArray::from(vec![t]))),
        ("v", Arc::new(Int64Array::from(vec![v]))),
    ];
    Ok(RecordBatch::try_from_iter(columns)?)
}
