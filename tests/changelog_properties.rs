//! A changelog source (`'upsert_key'`) against a model, over what the world varies: random
//! inserts, updates and retractions of per-minute rows under a two-column key (one of them
//! nullable), spread over 4 partitions by key (as a keyed Kafka topic spreads them), arriving
//! out of order within and beyond the allowed lateness, cut into random micro-batches, with
//! restarts from checkpoints at random points.
//!
//! The model: the watermark is the lowest of the partitions' largest event times; a record is
//! late when its five-minute window ended at least the allowed lateness before the watermark
//! the records before it made (whatever the micro-batches), and is then dropped and reported.
//! Every other record sets (insert, update) or removes (retract) its key's row. Then the
//! five-minute query's changelog, applied in order (upsert by key and window, delete on
//! retract), equals the sum, count and maximum of the rows the model holds per key and
//! window, and the late records are exactly the model's.

use std::collections::BTreeMap;

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Int64Type};
use proptest::prelude::*;
use urbanstream::deterministic::{DeterministicEngine, Outcome};

/// 2026-01-01T06:00:00Z.
const T0: i64 = 1_767_247_200_000;
const MIN: i64 = 60_000;
const FIVE: i64 = 5 * MIN;
/// Allowed lateness.
const LATENESS: i64 = 2 * MIN;
const PARTITIONS: u64 = 4;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Insert,
    Update,
    Retract,
}

impl Op {
    fn sql(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Retract => "retract",
        }
    }
}

/// One changelog record: key (k, g), the minute it is about, its value and what it does.
#[derive(Debug, Clone)]
struct Record {
    k: &'static str,
    g: Option<i32>,
    minute: i64,
    n: i64,
    op: Op,
    revision: i32,
}

impl Record {
    fn t(&self) -> i64 {
        T0 + self.minute * MIN
    }

    /// The partition a keyed topic puts the record in.
    fn partition(&self) -> u64 {
        let key = format!("{}/{:?}/{}", self.k, self.g, self.minute);
        key.bytes()
            .fold(17u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)))
            % PARTITIONS
    }
}

/// Micro-batches in arrival order (each from one partition) and after which the engine
/// restarts from a checkpoint.
#[derive(Debug, Clone)]
struct Run {
    batches: Vec<Vec<Record>>,
    restarts: Vec<bool>,
}

fn run() -> impl Strategy<Value = Run> {
    // Rows about minutes 0..25, arriving up to 8 minutes after their minute (beyond the
    // 2 minutes of allowed lateness for some); a key's records in arrival order.
    let record = (
        0usize..2,
        prop::option::weighted(0.7, 0i32..2),
        0i64..25,
        -5i64..50,
        prop_oneof![4 => Just(Op::Insert), 3 => Just(Op::Update), 2 => Just(Op::Retract)],
        prop_oneof![3 => 0i64..120, 1 => 0i64..480],
    );
    (
        prop::collection::vec(record, 1..80),
        prop::collection::vec(0usize..80, 0..12),
        prop::collection::vec(any::<bool>(), 0..100),
    )
        .prop_map(|(raw, mut cuts, restart_draws)| {
            let mut arrivals: Vec<(i64, usize, Record)> = raw
                .into_iter()
                .enumerate()
                .map(|(i, (k, g, minute, n, op, delay))| {
                    let record = Record {
                        k: ["a", "b"][k],
                        g,
                        minute,
                        n,
                        op,
                        revision: 0,
                    };
                    (record.t() + delay * 1_000, i, record)
                })
                .collect();
            arrivals.sort_by_key(|(arrival, i, _)| (*arrival, *i));
            // Revisions count up per key in arrival order, as a windowed query writes them.
            let mut revisions: BTreeMap<(&str, Option<i32>, i64), i32> = BTreeMap::new();
            let records: Vec<Record> = arrivals
                .into_iter()
                .map(|(_, _, mut r)| {
                    let next = revisions.entry((r.k, r.g, r.minute)).or_insert(0);
                    r.revision = *next;
                    *next += 1;
                    r
                })
                .collect();
            cuts.sort_unstable();
            let mut batches = Vec::new();
            let mut start = 0;
            for cut in cuts.into_iter().chain(std::iter::once(records.len())) {
                let cut = cut.clamp(start, records.len());
                let mut by_partition: BTreeMap<u64, Vec<Record>> = BTreeMap::new();
                for r in &records[start..cut] {
                    by_partition
                        .entry(r.partition())
                        .or_default()
                        .push(r.clone());
                }
                batches.extend(by_partition.into_values());
                start = cut;
            }
            let restarts = (0..batches.len())
                .map(|i| restart_draws.get(i).copied().unwrap_or(false))
                .collect();
            Run { batches, restarts }
        })
}

/// (k, g, five-minute window start) → (sum, count, max).
type Results = BTreeMap<(String, Option<i64>, i64), (i64, i64, i64)>;

/// A late record: its event time.
type Late = Vec<i64>;

fn model(run: &Run) -> (Results, Late) {
    let mut rows: BTreeMap<(&str, Option<i32>, i64), i64> = BTreeMap::new();
    let mut late = Vec::new();
    let mut max_by_partition: BTreeMap<u64, i64> = BTreeMap::new();
    let mut watermark = i64::MIN;
    for r in run.batches.iter().flatten() {
        let frontier = watermark.saturating_sub(LATENESS);
        let m = max_by_partition.entry(r.partition()).or_insert(r.t());
        *m = (*m).max(r.t());
        if let Some(lowest) = max_by_partition.values().min() {
            watermark = watermark.max(*lowest);
        }
        let end = r.t().div_euclid(FIVE) * FIVE + FIVE;
        if end <= frontier {
            late.push(r.t());
            continue;
        }
        match r.op {
            Op::Insert | Op::Update => {
                rows.insert((r.k, r.g, r.minute), r.n);
            }
            Op::Retract => {
                rows.remove(&(r.k, r.g, r.minute));
            }
        }
    }
    let mut results = Results::new();
    for ((k, g, minute), n) in rows {
        let start = (T0 + minute * MIN).div_euclid(FIVE) * FIVE;
        let entry = results
            .entry((k.to_string(), g.map(i64::from), start))
            .or_insert((0, 0, i64::MIN));
        entry.0 += n;
        entry.1 += 1;
        entry.2 = entry.2.max(n);
    }
    late.sort_unstable();
    (results, late)
}

async fn engine(run: &Run) -> anyhow::Result<(Results, Late)> {
    let mut engine = DeterministicEngine::new();
    for sql in [
        "CREATE EXTERNAL TABLE minutes (k VARCHAR NOT NULL, g INT, window_start TIMESTAMP NOT NULL, \
         n BIGINT NOT NULL, revision INT NOT NULL, op VARCHAR NOT NULL) STORED AS KAFKA OPTIONS \
         ('topic' 'minutes', 'event_time' 'window_start', 'watermark_delay' '0s', \
         'idle_timeout' '7d', 'upsert_key' 'k, g, window_start')",
        "CREATE EXTERNAL TABLE five (k VARCHAR NOT NULL, g BIGINT, window_start TIMESTAMP NOT NULL, \
         n BIGINT NOT NULL, minutes BIGINT NOT NULL, top BIGINT NOT NULL, revision INT NOT NULL, \
         op VARCHAR NOT NULL) STORED AS KAFKA OPTIONS ('topic' 'five')",
        "SET urbanstream.allowed_lateness = '2m'",
        "INSERT INTO five SELECT k, g, window.window_start AS window_start, sum(n) AS n, \
         count(*) AS minutes, max(n) AS top FROM minutes \
         GROUP BY tumble(window_start, INTERVAL '5 minutes'), k, g",
    ] {
        engine.execute(sql).await?;
    }
    for (batch, restart) in run.batches.iter().zip(&run.restarts) {
        let Some(first) = batch.first() else { continue };
        let rows: Vec<String> = batch
            .iter()
            .map(|r| {
                format!(
                    "('{}', {}, to_timestamp_millis({}), {}, {}, '{}')",
                    r.k,
                    r.g.map_or("NULL".to_string(), |g| g.to_string()),
                    r.t(),
                    r.n,
                    r.revision,
                    r.op.sql()
                )
            })
            .collect();
        engine
            .execute(&format!(
                "INSERT INTO minutes PARTITION {} VALUES {}",
                first.partition(),
                rows.join(", ")
            ))
            .await?;
        if *restart {
            engine.execute("RESTART").await?;
        }
    }
    engine
        .execute("ADVANCE WATERMARK minutes TO '2026-01-02T00:00:00'")
        .await?;
    let Outcome::Rows(out) = engine.execute("SELECT * FROM five").await? else {
        anyhow::bail!("no rows")
    };
    let late = crate::stream_properties::late_records(&mut engine)
        .await?
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    Ok((applied(&out)?, late))
}

/// The five-minute changelog applied in order: upsert by key and window, delete on retract.
fn applied(batches: &[RecordBatch]) -> anyhow::Result<Results> {
    let mut results = Results::new();
    for b in batches {
        let col = |name: &str, t: &DataType| -> anyhow::Result<_> {
            let c = b
                .column_by_name(name)
                .ok_or_else(|| anyhow::anyhow!("column {name}"))?;
            Ok(cast(c, t)?)
        };
        let k = col("k", &DataType::Utf8)?;
        let g = col("g", &DataType::Int64)?;
        let start = col("window_start", &DataType::Int64)?;
        let op = col("op", &DataType::Utf8)?;
        let values: Vec<_> = ["n", "minutes", "top"]
            .iter()
            .map(|c| col(c, &DataType::Int64))
            .collect::<anyhow::Result<_>>()?;
        let (k, g, start, op) = (
            k.as_string::<i32>(),
            g.as_primitive::<Int64Type>(),
            start.as_primitive::<Int64Type>(),
            op.as_string::<i32>(),
        );
        let value = |c: usize, r: usize| values[c].as_primitive::<Int64Type>().value(r);
        for r in 0..b.num_rows() {
            let key = (
                k.value(r).to_string(),
                g.is_valid(r).then(|| g.value(r)),
                start.value(r),
            );
            if op.value(r) == "retract" {
                results.remove(&key);
            } else {
                results.insert(key, (value(0, r), value(1, r), value(2, r)));
            }
        }
    }
    Ok(results)
}

fn check(run: &Run) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (want, want_late) = model(run);
    let (got, got_late) = rt.block_on(engine(run)).expect("engine");
    prop_assert_eq!(got_late, want_late, "late records");
    prop_assert_eq!(got, want, "results");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn five_minute_windows_over_an_upsert_changelog_match_the_model(run in run()) {
        check(&run)?;
    }
}
