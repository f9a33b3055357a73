//! Invariants of the streaming engine, in deterministic mode:
//! - incremental results equal a batch DataFusion query over the same events, whatever the
//!   arrival order (within the allowed lateness) and the micro-batch split;
//! - window state is freed once windows close.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, Int32Array, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, TimeUnit};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use proptest::prelude::*;
use urbanstream::deterministic::{DeterministicEngine, Outcome};
use urbanstream_tests::plan_query;

/// 2026-01-01T06:00:00Z.
const T0: i64 = 1_767_247_200_000;

#[derive(Debug, Clone)]
struct Event {
    key: String,
    t: i64,
    v: i64,
}

/// (count, sum, min, max) of a window.
type Aggregates = (i64, i64, i64, i64);

/// (key, window_start) → aggregates.
type Results = BTreeMap<(String, i64), Aggregates>;

async fn setup(engine: &mut DeterministicEngine, group_by: &str) -> anyhow::Result<()> {
    for sql in [
        "CREATE EXTERNAL TABLE ev (k VARCHAR NOT NULL, t TIMESTAMP NOT NULL, v BIGINT NOT NULL) \
         STORED AS KAFKA OPTIONS ('topic' 'ev', 'event_time' 't', 'watermark_delay' '0s')",
        "CREATE EXTERNAL TABLE out (k VARCHAR NOT NULL, window_start TIMESTAMP NOT NULL, \
         n BIGINT NOT NULL, s BIGINT, lo BIGINT, hi BIGINT, revision INT NOT NULL, is_final BOOLEAN NOT NULL, \
         op VARCHAR NOT NULL) \
         STORED AS KAFKA OPTIONS ('topic' 'out')",
        "SET urbanstream.allowed_lateness = '10m'",
    ] {
        engine.execute(sql).await?;
    }
    engine
        .execute(&format!(
            "INSERT INTO out SELECT k, window_start, count(*) AS n, sum(v) AS s, min(v) AS lo, \
             max(v) AS hi FROM ev GROUP BY {group_by}, k"
        ))
        .await?;
    Ok(())
}

fn values_sql(events: &[Event]) -> String {
    let rows: Vec<String> = events
        .iter()
        .map(|e| format!("('{}', to_timestamp_millis({}), {})", e.key, e.t, e.v))
        .collect();
    format!("INSERT INTO ev VALUES {}", rows.join(", "))
}

fn column(batch: &RecordBatch, name: &str, data_type: &DataType) -> ArrayRef {
    let c = batch
        .column_by_name(name)
        .unwrap_or_else(|| panic!("column {name}"));
    cast(c, data_type).unwrap_or_else(|e| panic!("column {name}: {e}"))
}

/// Runs the engine over `arrivals` split into micro-batches at `cuts`, then closes every
/// window; returns the last revision of each (key, window).
async fn incremental(
    group_by: &str,
    arrivals: &[Event],
    cuts: &[usize],
) -> anyhow::Result<Results> {
    let mut engine = DeterministicEngine::new();
    setup(&mut engine, group_by).await?;
    let mut start = 0;
    for &cut in cuts.iter().chain(std::iter::once(&arrivals.len())) {
        let cut = cut.clamp(start, arrivals.len());
        if cut > start {
            engine.execute(&values_sql(&arrivals[start..cut])).await?;
        }
        start = cut;
    }
    engine
        .execute("ADVANCE WATERMARK ev TO '2026-01-02T00:00:00'")
        .await?;
    let Outcome::Rows(late) = engine.execute("SHOW LATE").await? else {
        anyhow::bail!("rows")
    };
    assert_eq!(
        late.iter().map(|b| b.num_rows()).sum::<usize>(),
        0,
        "nothing may be late"
    );
    let Outcome::Rows(rows) = engine
        .execute("SELECT k, window_start, n, s, lo, hi, revision, is_final, op FROM out")
        .await?
    else {
        anyhow::bail!("rows")
    };
    // The changelog applied in order: upsert by (key, window_start), delete on 'retract'.
    let mut latest: BTreeMap<(String, i64), (i32, Aggregates)> = BTreeMap::new();
    for b in &rows {
        let ts = DataType::Timestamp(TimeUnit::Millisecond, None);
        let k = column(b, "k", &DataType::Utf8);
        let k = k.as_any().downcast_ref::<StringArray>().expect("k");
        let ws = column(b, "window_start", &ts);
        let ws = ws
            .as_any()
            .downcast_ref::<TimestampMillisecondArray>()
            .expect("ws");
        let ints: Vec<ArrayRef> = ["n", "s", "lo", "hi"]
            .iter()
            .map(|c| column(b, c, &DataType::Int64))
            .collect();
        let ints: Vec<&Int64Array> = ints
            .iter()
            .map(|a| a.as_any().downcast_ref::<Int64Array>().expect("int"))
            .collect();
        let (n, s, lo, hi) = (ints[0], ints[1], ints[2], ints[3]);
        let rev = column(b, "revision", &DataType::Int32);
        let rev = rev.as_any().downcast_ref::<Int32Array>().expect("revision");
        let op = column(b, "op", &DataType::Utf8);
        let op = op.as_any().downcast_ref::<StringArray>().expect("op");
        for r in 0..b.num_rows() {
            let key = (k.value(r).to_string(), ws.value(r));
            if op.value(r) == "retract" {
                latest.remove(&key);
                continue;
            }
            let value = (
                rev.value(r),
                (n.value(r), s.value(r), lo.value(r), hi.value(r)),
            );
            let entry = latest.entry(key).or_insert(value);
            if value.0 >= entry.0 {
                *entry = value;
            }
        }
    }
    Ok(latest.into_iter().map(|(k, (_, v))| (k, v)).collect())
}

/// The same aggregation as one batch DataFusion query; `window_starts` lists, as SQL, the
/// window starts of an event (several for hopping windows).
/// Results of a batch query whose columns are k, ws, n, s, lo, hi.
fn batch_results(batches: &[RecordBatch]) -> anyhow::Result<Results> {
    let mut out = Results::new();
    for b in batches {
        let ws = cast(
            b.column(1),
            &DataType::Timestamp(TimeUnit::Millisecond, None),
        )?;
        let ws = ws
            .as_any()
            .downcast_ref::<TimestampMillisecondArray>()
            .expect("ts");
        let k = cast(b.column(0), &DataType::Utf8)?;
        let k = k.as_any().downcast_ref::<StringArray>().expect("k");
        let ints: Vec<ArrayRef> = (2..6)
            .map(|i| cast(b.column(i), &DataType::Int64))
            .collect::<Result<_, _>>()?;
        let ints: Vec<&Int64Array> = ints
            .iter()
            .map(|a| a.as_any().downcast_ref::<Int64Array>().expect("int"))
            .collect();
        for r in 0..b.num_rows() {
            out.insert(
                (k.value(r).to_string(), ws.value(r)),
                (
                    ints[0].value(r),
                    ints[1].value(r),
                    ints[2].value(r),
                    ints[3].value(r),
                ),
            );
        }
    }
    Ok(out)
}

/// The events as a batch table `ev(k, t, v)`.
fn events_context(events: &[Event]) -> anyhow::Result<SessionContext> {
    let ctx = SessionContext::new();
    let keys: ArrayRef = Arc::new(StringArray::from_iter_values(
        events.iter().map(|e| e.key.as_str()),
    ));
    let times: ArrayRef = Arc::new(TimestampMillisecondArray::from_iter_values(
        events.iter().map(|e| e.t),
    ));
    let values: ArrayRef = Arc::new(Int64Array::from_iter_values(events.iter().map(|e| e.v)));
    let b = RecordBatch::try_from_iter(vec![("k", keys), ("t", times), ("v", values)])?;
    ctx.register_table(
        "ev",
        Arc::new(MemTable::try_new(b.schema(), vec![vec![b]])?),
    )?;
    Ok(ctx)
}

async fn batch(events: &[Event], window_starts: &str) -> anyhow::Result<Results> {
    let ctx = events_context(events)?;
    let sql = format!(
        "SELECT k, ws, count(*) AS n, sum(v) AS s, min(v) AS lo, max(v) AS hi \
         FROM (SELECT k, v, {window_starts} AS ws FROM ev {}) GROUP BY k, ws",
        if window_starts.contains("o.n") {
            "CROSS JOIN (VALUES (0), (1), (2)) AS o(n)"
        } else {
            ""
        }
    );
    batch_results(&ctx.sql(&sql).await?.collect().await?)
}

/// Events over ~20 minutes, arriving out of order by up to 4 minutes (within the 10-minute
/// allowed lateness), with random micro-batch boundaries.
fn scenario() -> impl Strategy<Value = (Vec<Event>, Vec<usize>)> {
    scenario_with(4, 1_200_000, 120, 240_000)
}

/// [`scenario`] with `keys` keys, up to `events` events over `span` ms, arriving up to
/// `max_delay` ms late.
fn scenario_with(
    keys: usize,
    span: i64,
    events: usize,
    max_delay: i64,
) -> impl Strategy<Value = (Vec<Event>, Vec<usize>)> {
    let event = (0usize..keys, 0i64..span, -50i64..50, 0i64..max_delay);
    (
        prop::collection::vec(event, 1..events),
        prop::collection::vec(0usize..events, 0..events.min(24)),
    )
        .prop_map(|(raw, mut cuts)| {
            // Arrival order is event time plus a random delay.
            let mut events: Vec<(i64, Event)> = raw
                .into_iter()
                .map(|(k, t, v, delay)| {
                    let key = ["a", "b", "c", "d"][k].to_string();
                    (t + delay, Event { key, t: T0 + t, v })
                })
                .collect();
            events.sort_by_key(|(arrival, _)| *arrival);
            cuts.sort_unstable();
            (events.into_iter().map(|(_, e)| e).collect(), cuts)
        })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    #[test]
    fn tumbling_windows_equal_batch_query((events, cuts) in scenario()) {
        let rt = runtime();
        let got = rt.block_on(incremental("tumble(t, INTERVAL '1 minute')", &events, &cuts)).expect("engine");
        let want = rt.block_on(batch(&events, "date_bin(INTERVAL '1 minute', t)")).expect("batch");
        prop_assert!(!want.is_empty());
        prop_assert_eq!(got, want);
    }

    #[test]
    fn hopping_windows_equal_batch_query((events, cuts) in scenario()) {
        let rt = runtime();
        let got = rt
            .block_on(incremental("hop(t, INTERVAL '1 minute', INTERVAL '3 minutes')", &events, &cuts))
            .expect("engine");
        let want = rt
            .block_on(batch(
                &events,
                "date_bin(INTERVAL '1 minute', t) - CASE o.n WHEN 0 THEN INTERVAL '0 minutes' \
                 WHEN 1 THEN INTERVAL '1 minute' ELSE INTERVAL '2 minutes' END",
            ))
            .expect("batch");
        prop_assert!(!want.is_empty());
        prop_assert_eq!(got, want);
    }
}

/// Sessions as one batch query (gaps and islands): a new session starts where an event is
/// the gap or more after the previous one of its key.
async fn batch_sessions(events: &[Event]) -> anyhow::Result<Results> {
    let ctx = events_context(events)?;
    let sql = "SELECT k, min(t) AS ws, count(*) AS n, sum(v) AS s, min(v) AS lo, max(v) AS hi FROM (
        SELECT k, t, v, sum(fresh) OVER (PARTITION BY k ORDER BY t, v ROWS UNBOUNDED PRECEDING) AS sid FROM (
          SELECT k, t, v, CASE WHEN t - lag(t) OVER (PARTITION BY k ORDER BY t, v) < INTERVAL '5 minutes'
                               THEN 0 ELSE 1 END AS fresh FROM ev))
        GROUP BY k, sid";
    batch_results(&ctx.sql(sql).await?.collect().await?)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    /// Events about a gap apart per key (sessions split, close and are published) arriving
    /// up to 8 minutes late, beyond the gap (5 minutes): published sessions merge and start
    /// earlier, and their rows are retracted; the changelog applied (upsert by key and start,
    /// delete on retract) is the sessions.
    #[test]
    fn session_windows_equal_batch_query((events, cuts) in scenario_with(2, 3_600_000, 16, 540_000)) {
        let rt = runtime();
        let got = rt
            .block_on(incremental("session(t, INTERVAL '5 minutes')", &events, &cuts))
            .expect("engine");
        let want = rt.block_on(batch_sessions(&events)).expect("batch");
        prop_assert!(!want.is_empty());
        prop_assert_eq!(got, want);
    }
}

#[tokio::test]
async fn state_is_freed_when_windows_close() -> anyhow::Result<()> {
    let mut engine = DeterministicEngine::new();
    setup(&mut engine, "tumble(t, INTERVAL '1 minute')").await?;
    let events: Vec<Event> = (0..2000)
        .map(|i| Event {
            key: ["a", "b", "c", "d"][i % 4].to_string(),
            t: T0 + (i as i64) * 50,
            v: i as i64,
        })
        .collect();
    for chunk in events.chunks(250) {
        engine.execute(&values_sql(chunk)).await?;
    }
    let (groups, bytes) = engine.state_size();
    assert!(
        groups > 0 && bytes > 0,
        "state while windows are open: {groups} groups, {bytes} B"
    );
    // Past every window's end plus the 10-minute allowed lateness: everything is evicted.
    engine
        .execute("ADVANCE WATERMARK ev TO '2026-01-01T07:00:00'")
        .await?;
    assert_eq!(engine.state_size(), (0, 0));
    assert_eq!(engine.queries()[0].open_windows(), 0);
    assert!(engine.queries()[0].held_offsets().is_empty());
    Ok(())
}

/// Regression: a session published and then moved to an earlier start, or merged into
/// another, left its published row behind (5 events became 12 when upserted by key and
/// window). Applying the changelog gives the sessions of a batch query.
#[tokio::test]
async fn published_sessions_that_merge_or_move_are_retracted() -> anyhow::Result<()> {
    let ev = |key: &str, minute: i64| Event {
        key: key.to_string(),
        t: T0 + minute * 60_000,
        v: minute,
    };
    // a's sessions at 0 and 8 are published once b moves the watermark to 13; then a's 4
    // bridges them (the one at 8 is retracted) and a's -1 moves the merged session's start
    // (the one at 0 is retracted), all within the allowed lateness.
    let arrivals = vec![
        ev("a", 0),
        ev("a", 8),
        ev("b", 13),
        ev("a", 4),
        ev("a", -1),
        ev("b", 40),
    ];
    let got = incremental(
        "session(t, INTERVAL '5 minutes')",
        &arrivals,
        &[1, 2, 3, 4, 5],
    )
    .await?;
    let want = batch_sessions(&arrivals).await?;
    assert_eq!(got, want);
    assert_eq!(got.len(), 3, "{got:?}");
    Ok(())
}

/// Many keys' sessions opening and closing in turn while one key's session stays open the
/// whole time, with a session published and then bridged by a late event, and late events
/// revising sessions already published: the operator emits a closing session from the oldest
/// part of its state (moving the open sessions it passes over), and the changelog applied is
/// the sessions of a batch query, whatever the micro-batch size.
#[tokio::test]
async fn sessions_closing_in_turn_beside_a_long_one_equal_batch_query() -> anyhow::Result<()> {
    let ev = |key: String, seconds: i64, v: i64| Event {
        key,
        t: T0 + seconds * 1_000,
        v,
    };
    let mut events = Vec::new();
    for round in 0..4 {
        for k in 0..48 {
            let start = round * 1_200 + k * 20;
            for step in 0..4 {
                events.push(ev(format!("k{k:02}"), start + step * 60, round * 100 + k));
            }
        }
    }
    // Open from the first minute to the last.
    for minute in 0..20 {
        events.push(ev("long".into(), minute * 240, minute));
    }
    // Two sessions 8 minutes apart.
    events.push(ev("m".into(), 2_400, 1));
    events.push(ev("m".into(), 2_880, 2));
    events.sort_by_key(|e| e.t);
    // Late, within the allowed lateness (10 minutes), arriving when the watermark is 54
    // minutes: one bridges m's two sessions (both published by then), the others revise
    // sessions of round 2 published a little before (one extends, one falls inside).
    let at = events
        .iter()
        .position(|e| e.t >= T0 + 3_240_000)
        .unwrap_or(events.len());
    let late = [
        ev("m".into(), 2_640, 3),
        ev("k00".into(), 2_600, 7),
        ev("k05".into(), 2_550, 8),
    ];
    events.splice(at..at, late);
    let want = batch_sessions(&events).await?;
    assert_eq!(want.len(), 4 * 48 + 1 + 1, "{want:?}");
    for size in [1, 5, 13, 40] {
        let cuts: Vec<usize> = (size..events.len()).step_by(size).collect();
        let got = incremental("session(t, INTERVAL '5 minutes')", &events, &cuts).await?;
        assert_eq!(got, want, "micro-batches of {size}");
    }
    Ok(())
}

/// A window's row published more than once (revised by late rows, fired early, withdrawn)
/// must reach an upserting consumer in order; rows without a Kafka key go to any partition,
/// and a revision read before the row it revises left the consumer with the older one. A sink
/// declared without 'key' is keyed by the window's bound; one that publishes no bound to key
/// by is refused, saying to declare a key.
#[tokio::test]
async fn a_sink_of_revised_rows_without_a_key_is_keyed_by_the_window() -> anyhow::Result<()> {
    let source = "CREATE EXTERNAL TABLE cam (k VARCHAR, event_time TIMESTAMP NOT NULL, v BIGINT) \
         STORED AS KAFKA OPTIONS ('topic' 'cam', 'event_time' 'event_time', 'watermark_delay' '0s')";
    let sink = |columns: &str, key: &str| {
        format!(
            "CREATE EXTERNAL TABLE out ({columns}) STORED AS KAFKA OPTIONS ('topic' 'out'{key})"
        )
    };
    let select = "INSERT INTO out SELECT k, window_start, count(*) AS n \
         FROM cam GROUP BY tumble(event_time, INTERVAL '1 minute'), k";
    let keyed = |query: &urbanstream::plan::stream::StreamQuery| {
        query.sink().and_then(|s| s.options.key.clone())
    };
    let with_bound = sink("k VARCHAR, window_start TIMESTAMP, n BIGINT", "");
    for setting in [
        "SET urbanstream.allowed_lateness = '2m'",
        "SET urbanstream.early_fire = '10s'",
    ] {
        let query = plan_query([source, &with_bound, setting, select]).await?;
        assert_eq!(keyed(&query).as_deref(), Some("window_start"), "{setting}");
    }
    // Declared keys are kept, and rows published once are not keyed.
    let declared = sink("k VARCHAR, window_start TIMESTAMP, n BIGINT", ", 'key' 'k'");
    let query = plan_query([
        source,
        &declared,
        "SET urbanstream.allowed_lateness = '2m'",
        select,
    ])
    .await?;
    assert_eq!(keyed(&query).as_deref(), Some("k"));
    let query = plan_query([source, &with_bound, select]).await?;
    assert_eq!(keyed(&query), None);
    // Nothing to key by.
    let unbounded = sink("k VARCHAR, n BIGINT", "");
    let error = plan_query([
        source,
        &unbounded,
        "SET urbanstream.allowed_lateness = '2m'",
        "INSERT INTO out SELECT k, count(*) AS n FROM cam \
         GROUP BY tumble(event_time, INTERVAL '1 minute'), k",
    ])
    .await
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(
        error.contains("sink out has no 'key': with urbanstream.allowed_lateness")
            && error.contains("'key' '<column>'"),
        "{error}"
    );
    // Keyed by an aggregate's result, each revision carries another key to another partition:
    // refused where rows are revised (renamed or not), taken where each is published once.
    let by_count = sink("k VARCHAR, window_start TIMESTAMP, n BIGINT", ", 'key' 'n'");
    for select in [
        select.to_string(),
        "INSERT INTO out SELECT k, window_start, c AS n FROM (SELECT k, window_start, \
         count(*) AS c FROM cam GROUP BY tumble(event_time, INTERVAL '1 minute'), k)"
            .to_string(),
    ] {
        let error = plan_query([
            source,
            &by_count,
            "SET urbanstream.allowed_lateness = '2m'",
            &select,
        ])
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(
            error.contains(
                "sink out is keyed by n, an aggregate's result: with \
                 urbanstream.allowed_lateness"
            ) && error.contains("Key the sink by a GROUP BY column"),
            "{select}: {error}"
        );
    }
    let query = plan_query([source, &by_count, select]).await?;
    assert_eq!(keyed(&query).as_deref(), Some("n"));
    let by_start = sink(
        "k VARCHAR, window_start TIMESTAMP, n BIGINT",
        ", 'key' 'window_start'",
    );
    let query = plan_query([
        source,
        &by_start,
        "SET urbanstream.allowed_lateness = '2m'",
        select,
    ])
    .await?;
    assert_eq!(keyed(&query).as_deref(), Some("window_start"));
    Ok(())
}

/// Regression: a hop with many windows an event, over readings far apart, emitted every
/// window a step closed at once, however little state they came from: 1 500 readings made
/// 15 M rows and 9 GB. A step now gives a bounded part of them and the next ticks the rest,
/// each (key, window) once; a stage above holds its watermark back to the windows emitted
/// below, so that none of them reaches it late.
#[tokio::test]
async fn a_step_closing_many_windows_gives_them_a_part_at_a_time() -> anyhow::Result<()> {
    const SLIDE: i64 = 1_000;
    const SIZE: i64 = 2_000_000;
    const HOUR: i64 = 3_600_000;
    // Each reading alone in its 2 000 windows.
    let events: Vec<(String, i64, i64)> = (0..40)
        .map(|i| (format!("k{}", i % 4), T0 + i * (SIZE + SLIDE), i))
        .collect();
    let ddl = "CREATE EXTERNAL TABLE ev (k VARCHAR, t TIMESTAMP NOT NULL, v BIGINT) STORED AS \
               KAFKA OPTIONS ('topic' 'ev', 'event_time' 't', 'watermark_delay' '0s')";
    let hop = "hop(t, INTERVAL '1 second', INTERVAL '2000 seconds')";
    let batch = readings(&events)?;
    let partitions = vec![0; events.len()];
    let now = T0 + 1000 * HOUR;
    // Steps until the query has nothing more due; the rows of each step.
    async fn steps(
        query: &mut urbanstream::plan::stream::StreamQuery,
        batch: &RecordBatch,
        partitions: &[i32],
        now: i64,
    ) -> anyhow::Result<Vec<Vec<RecordBatch>>> {
        // The readings' own watermark closes the windows of all but the last reading.
        let mut parts = vec![query.process(batch, partitions, None, now).await?.rows];
        while query.is_due() {
            parts.push(query.tick(now).await?.rows);
            assert!(parts.len() < 10_000, "the steps never end");
        }
        parts.push(query.advance_watermark(i64::MAX / 4, now).await?.rows);
        while query.is_due() {
            parts.push(query.tick(now).await?.rows);
            assert!(parts.len() < 10_000, "the steps never end");
        }
        Ok(parts)
    }
    let text = |b: &RecordBatch, c: &str| -> anyhow::Result<Vec<String>> {
        let a = cast(column_named(b, c)?, &DataType::Utf8)?;
        Ok((0..a.len())
            .map(|i| datafusion::arrow::util::display::array_value_to_string(&a, i))
            .collect::<Result<_, _>>()?)
    };

    // One stage: every (key, window) once, with its one reading.
    let mut query = plan_query([
        ddl.to_string(),
        format!("SELECT k, window_start, count(*) AS n, sum(v) AS s FROM ev GROUP BY {hop}, k"),
    ])
    .await?;
    let parts = steps(&mut query, &batch, &partitions, now).await?;
    let closing: Vec<usize> = parts
        .iter()
        .map(|p| p.iter().map(RecordBatch::num_rows).sum())
        .collect();
    assert!(
        closing.len() > 3,
        "80 000 windows closed in one step come in parts: {closing:?}"
    );
    let mut seen: BTreeMap<(String, i64), (String, String)> = BTreeMap::new();
    for b in parts.iter().flatten() {
        let starts = window_starts(b)?;
        for (i, (k, (n, s))) in text(b, "k")?
            .into_iter()
            .zip(text(b, "n")?.into_iter().zip(text(b, "s")?))
            .enumerate()
        {
            let previous = seen.insert((k.clone(), starts[i]), (n, s));
            assert!(previous.is_none(), "({k}, {}) emitted twice", starts[i]);
        }
    }
    let mut expected: BTreeMap<(String, i64), (String, String)> = BTreeMap::new();
    for (k, t, v) in &events {
        let last = t.div_euclid(SLIDE) * SLIDE;
        for start in (last - SIZE + SLIDE..=last).step_by(SLIDE as usize) {
            expected.insert((k.clone(), start), ("1".into(), v.to_string()));
        }
    }
    assert_eq!(seen.len(), expected.len());
    assert!(
        seen == expected,
        "the windows' results differ from each reading's"
    );
    assert_eq!(
        query.open_windows(),
        0,
        "every window is evicted once emitted"
    );

    // Two stages: per key and hour, the hop windows ending in it, counted above them.
    let mut query = plan_query([
        ddl.to_string(),
        format!(
            "SELECT k, window_start, sum(n) AS windows FROM (SELECT k, window_end AS e, \
             count(*) AS n FROM ev GROUP BY {hop}, k) GROUP BY tumble(e, INTERVAL '1 hour'), k"
        ),
    ])
    .await?;
    let parts = steps(&mut query, &batch, &partitions, now).await?;
    let mut hours: BTreeMap<(String, i64), String> = BTreeMap::new();
    for b in parts.iter().flatten() {
        let starts = window_starts(b)?;
        for (i, (k, n)) in text(b, "k")?
            .into_iter()
            .zip(text(b, "windows")?)
            .enumerate()
        {
            let previous = hours.insert((k.clone(), starts[i]), n);
            assert!(
                previous.is_none(),
                "hour ({k}, {}) emitted twice",
                starts[i]
            );
        }
    }
    let mut expected: BTreeMap<(String, i64), i64> = BTreeMap::new();
    for (k, t, _) in &events {
        let last = t.div_euclid(SLIDE) * SLIDE;
        for start in (last - SIZE + SLIDE..=last).step_by(SLIDE as usize) {
            let end = start + SIZE;
            *expected
                .entry((k.clone(), end.div_euclid(HOUR) * HOUR))
                .or_default() += 1;
        }
    }
    let expected: BTreeMap<(String, i64), String> = expected
        .into_iter()
        .map(|(k, n)| (k, n.to_string()))
        .collect();
    assert_eq!(hours, expected);
    Ok(())
}

/// Where a step stops its emission changes nothing: readings each alone in their 2 000 hop
/// windows, out of order and some behind the watermark within the allowed lateness (windows
/// revised after their emission), give the same results (the changelog applied) and the same
/// late records fed as one micro-batch (cut into runs at the rows out of order, each run's
/// windows emitted in parts) as fed one reading a step. Over one window, a window of windows
/// above it, and a top-2 per window.
#[tokio::test]
async fn results_do_not_depend_on_where_a_step_stops_its_emission() -> anyhow::Result<()> {
    const SLIDE: i64 = 1_000;
    const SIZE: i64 = 2_000_000;
    let mut events: Vec<(String, i64, i64)> = (0..60)
        .map(|i| (format!("k{}", i % 3), T0 + i * (SIZE + SLIDE), i))
        .collect();
    // Out of order in the first half: every fifth reading swapped with the one before it,
    // and readings half a window behind the one just before them (a part of their windows
    // gone, the others revised within the 30 minutes' lateness). The last 25 in order but for
    // two readings far behind (below): runs whose windows are more than one part.
    for i in (5..=30).step_by(5) {
        events.swap(i - 1, i);
    }
    for i in [3usize, 11, 20, 33] {
        let (k, t, _) = events[i].clone();
        events.insert(i + 1, (k, t - SIZE / 2, 100 + i as i64));
    }
    // In the tail, after many windows have closed at once (more than one part), readings
    // behind the lateness for some of their windows: those must be gone for them, emitted or
    // not.
    for v in [40i64, 47] {
        let at = events.iter().position(|e| e.2 == v).expect("reading");
        let (k, t, _) = events[at - 1].clone();
        events.insert(at + 1, (k, t - 100_000, 200 + v));
    }
    let ddl = "CREATE EXTERNAL TABLE ev (k VARCHAR, t TIMESTAMP NOT NULL, v BIGINT) STORED AS \
               KAFKA OPTIONS ('topic' 'ev', 'event_time' 't', 'watermark_delay' '0s')";
    let lateness = "SET urbanstream.allowed_lateness = '30m'";
    let windows = "SELECT k, window_start, count(*) AS n, sum(v) AS s FROM ev \
                   GROUP BY hop(t, INTERVAL '1 second', INTERVAL '2000 seconds'), k";
    let queries = [
        windows.to_string(),
        "SELECT k, window_start, sum(n) AS n FROM (SELECT k, window_end AS e, count(*) AS n \
         FROM ev GROUP BY hop(t, INTERVAL '1 second', INTERVAL '2000 seconds'), k) \
         GROUP BY tumble(e, INTERVAL '1 hour'), k"
            .to_string(),
        format!(
            "SELECT k, window_start, n FROM (SELECT k, window_start, n, ROW_NUMBER() OVER \
             (PARTITION BY window_start ORDER BY n DESC, k) AS place FROM ({windows})) \
             WHERE place <= 2"
        ),
    ];
    let now = T0 + 1_000 * 3_600_000;
    // The changelog applied: per (key, window_start), the values of its last revision
    // (columns then revision, is_final, op); a retraction removes it.
    type Applied = BTreeMap<(String, String), Vec<String>>;
    let apply = |b: &RecordBatch, applied: &mut Applied| -> anyhow::Result<()> {
        let columns = b
            .columns()
            .iter()
            .map(|c| cast(c, &DataType::Utf8))
            .collect::<Result<Vec<_>, _>>()?;
        for i in 0..b.num_rows() {
            let row = columns
                .iter()
                .map(|c| datafusion::arrow::util::display::array_value_to_string(c, i))
                .collect::<Result<Vec<_>, _>>()?;
            let key = (row[0].clone(), row[1].clone());
            match row.last().map(String::as_str) {
                Some("retract") => {
                    applied.remove(&key);
                }
                _ => {
                    applied.insert(key, row[2..row.len() - 3].to_vec());
                }
            }
        }
        Ok(())
    };
    for sql in &queries {
        // (rows, late records as (time, reason, window)), fed in `steps`.
        let mut results = Vec::new();
        for steps in [
            vec![events.clone()],
            events.iter().map(|e| vec![e.clone()]).collect(),
        ] {
            let mut query = plan_query([ddl, lateness, sql.as_str()]).await?;
            let (mut rows, mut late) = (Applied::new(), Vec::new());
            let mut parts = 0;
            for step in &steps {
                let out = query
                    .process(&readings(step)?, &vec![0; step.len()], None, now)
                    .await?;
                for d in &out.diverted {
                    late.push(format!("{:?} {:?} {:?}", d.event_time, d.reason, d.window));
                }
                let mut step_rows = out.rows;
                while query.is_due() {
                    parts += 1;
                    step_rows.extend(query.tick(now).await?.rows);
                }
                for b in &step_rows {
                    apply(b, &mut rows)?;
                }
            }
            let mut end = query.advance_watermark(i64::MAX / 4, now).await?;
            query.finish_step(now, &mut end).await?;
            for b in &end.rows {
                apply(b, &mut rows)?;
            }
            late.sort();
            results.push((rows, late, parts));
        }
        let (whole, single) = (&results[0], &results[1]);
        assert!(
            whole.2 > 0,
            "the whole batch's emission stops at its budget: {sql}"
        );
        assert!(
            !whole.1.is_empty(),
            "some readings are late for some windows: {sql}"
        );
        assert_eq!(whole.1.len(), single.1.len(), "late records of {sql}");
        assert!(
            whole.1 == single.1,
            "late records of {sql} differ, first: {:?}",
            whole.1.iter().zip(&single.1).find(|(a, b)| a != b)
        );
        assert_eq!(whole.0.len(), single.0.len(), "rows of {sql}");
        assert!(whole.0 == single.0, "results of {sql} differ");
    }
    Ok(())
}

/// Regression: `array_agg` keeps the texts it is given, and its state was counted by their
/// views alone (16 bytes a text of any length): 1 200 texts of 200 KB were 40 KB of state
/// against the memory limit while they took 226 MB. Its state now counts the texts, in a
/// tumbling window and in a session alike.
#[tokio::test]
async fn array_agg_state_counts_the_values_it_keeps() -> anyhow::Result<()> {
    const TEXTS: usize = 40;
    const LENGTH: usize = 100_000;
    for window in [
        "tumble(t, INTERVAL '1 day')",
        "session(t, INTERVAL '1 hour')",
    ] {
        let mut query = plan_query([
            "CREATE EXTERNAL TABLE ev (k VARCHAR, t TIMESTAMP NOT NULL, s VARCHAR) STORED AS \
             KAFKA OPTIONS ('topic' 'ev', 'event_time' 't', 'watermark_delay' '1h')"
                .to_string(),
            format!(
                "SELECT k, window_start, cardinality(array_agg(s)) AS n FROM ev \
                 GROUP BY {window}, k"
            ),
        ])
        .await?;
        // Texts of 100 000 characters, each in a micro-batch of its own.
        for i in 0..TEXTS {
            let text = format!("{i:05}").repeat(LENGTH / 5);
            let batch = RecordBatch::try_from_iter_with_nullable(vec![
                (
                    "k",
                    Arc::new(datafusion::arrow::array::StringViewArray::from(vec!["a"]))
                        as ArrayRef,
                    true,
                ),
                (
                    "t",
                    Arc::new(TimestampMillisecondArray::from(vec![T0 + i as i64 * 1_000])),
                    false,
                ),
                (
                    "s",
                    Arc::new(datafusion::arrow::array::StringViewArray::from(vec![
                        text.as_str(),
                    ])),
                    true,
                ),
            ])?;
            query.process(&batch, &[0], None, T0 + 86_400_000).await?;
        }
        let held = query.state_bytes();
        assert!(
            held >= TEXTS * LENGTH,
            "{window}: {TEXTS} texts of {LENGTH} bytes held as {held} bytes of state"
        );
    }
    Ok(())
}

/// (k, t, v) readings as a batch of stream `ev (k VARCHAR, t TIMESTAMP NOT NULL, v BIGINT)`.
fn readings(events: &[(String, i64, i64)]) -> anyhow::Result<RecordBatch> {
    Ok(RecordBatch::try_from_iter_with_nullable(vec![
        (
            "k",
            Arc::new(datafusion::arrow::array::StringViewArray::from_iter_values(
                events.iter().map(|e| &e.0),
            )) as ArrayRef,
            true,
        ),
        (
            "t",
            Arc::new(TimestampMillisecondArray::from_iter_values(
                events.iter().map(|e| e.1),
            )),
            false,
        ),
        (
            "v",
            Arc::new(Int64Array::from_iter_values(events.iter().map(|e| e.2))),
            true,
        ),
    ])?)
}

fn window_starts(batch: &RecordBatch) -> anyhow::Result<Vec<i64>> {
    let starts = cast(column_named(batch, "window_start")?, &DataType::Int64)?;
    let starts = starts
        .as_any()
        .downcast_ref::<Int64Array>()
        .ok_or_else(|| anyhow::anyhow!("window_start"))?;
    Ok(starts.values().to_vec())
}

fn column_named<'a>(batch: &'a RecordBatch, name: &str) -> anyhow::Result<&'a ArrayRef> {
    batch
        .column_by_name(name)
        .ok_or_else(|| anyhow::anyhow!("no column {name}"))
}
