//! Anomaly detectors, health checks and the alert machine, in readings per second:
//!
//! - `detectors/state/*`: the keyed state machine alone, 1 M readings over 1 000 keys (a
//!   hash-map lookup per reading, as the engine does); the state bytes per key after the run
//!   are printed beside each (`state bytes per key`); `anomaly_vector` and `anomaly_t2` over
//!   8 columns a reading;
//! - `detectors/stream/*`: through the stream engine, a query
//!   `f(pm25, event_time) OVER (PARTITION BY sensor_id ORDER BY event_time)` over simulated,
//!   decoded air readings in batches of 8 192 rows (key encoding, ordering, state, output).
#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::collections::HashMap;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use datafusion::common::ScalarValue;
use urbanstream::pipeline::Topics;
use urbanstream::plan::city_context;
use urbanstream::schema::SchemaRegistry;
use urbanstream::simulate::SimTopic;
use urbanstream_benches::decoded_batches;
use urbanstream_operators::detect::SeriesState;
use urbanstream_operators::detect::udwf::SeriesKind;

const READINGS: usize = 1_000_000;
const KEYS: usize = 1_000;

fn minutes(m: i64) -> ScalarValue {
    ScalarValue::new_interval_mdn(0, 0, m * 60_000_000_000)
}

/// Each function with its parameters, and its SQL call.
fn cases() -> Vec<(SeriesKind, Vec<ScalarValue>, &'static str)> {
    vec![
        (SeriesKind::Ewma, vec![], "anomaly_ewma(pm25, event_time)"),
        (SeriesKind::Mad, vec![], "anomaly_mad(pm25, event_time)"),
        (SeriesKind::Cusum, vec![], "anomaly_cusum(pm25, event_time)"),
        (
            SeriesKind::Seasonal,
            vec![],
            "anomaly_seasonal(pm25, event_time)",
        ),
        (SeriesKind::Score, vec![], "anomaly_score(pm25, event_time)"),
        (SeriesKind::Stuck, vec![], "sensor_stuck(pm25, event_time)"),
        (
            SeriesKind::Missing,
            vec![minutes(1)],
            "sensor_missing(pm25, event_time, INTERVAL '1 minute')",
        ),
        (
            SeriesKind::Jump,
            vec![ScalarValue::from("pm25")],
            "sensor_jump(pm25, event_time, 'pm25')",
        ),
        (
            SeriesKind::Alert,
            vec![ScalarValue::from(50.0), ScalarValue::from(40.0)],
            "alert_state(pm25, event_time, 50, 40)",
        ),
    ]
}

fn state_machines(c: &mut Criterion) {
    let mut group = c.benchmark_group("detectors/state");
    group.sample_size(10);
    group.throughput(Throughput::Elements(READINGS as u64));
    // One reading a minute per key, a daily cycle plus a deterministic wobble.
    let readings: Vec<(usize, i64, f64)> = (0..READINGS)
        .map(|i| {
            let key = i % KEYS;
            let t = 1_767_225_600_000 + (i / KEYS) as i64 * 60_000;
            let h = (t % 86_400_000) as f64 / 3_600_000.0;
            let x = 50.0 + 20.0 * (h / 24.0 * std::f64::consts::TAU).sin() + (i % 7) as f64;
            (key, t, x)
        })
        .collect();
    for (kind, params, _) in cases() {
        let prototype = kind.state(&params).expect("state");
        let mut states = HashMap::<usize, SeriesState>::with_capacity(KEYS);
        for &(key, t, x) in &readings {
            states
                .entry(key)
                .or_insert_with(|| prototype.clone())
                .step(t, Some(x));
        }
        let bytes: usize = states.values().map(SeriesState::size).sum();
        println!(
            "{}: state bytes per key after {} readings a key: {}",
            kind.name(),
            READINGS / KEYS,
            bytes / KEYS
        );
        group.bench_function(kind.name(), |b| {
            b.iter_batched(
                || HashMap::<usize, SeriesState>::with_capacity(KEYS),
                |mut states| {
                    let mut flagged = 0usize;
                    for &(key, t, x) in &readings {
                        let state = states.entry(key).or_insert_with(|| prototype.clone());
                        if let urbanstream_operators::detect::Emitted::Score(s) =
                            state.step(t, Some(x))
                        {
                            flagged += usize::from(s.score.is_some_and(|z| z.abs() > 4.0));
                        }
                    }
                    (states, flagged)
                },
                BatchSize::LargeInput,
            )
        });
    }
    // The multivariate detectors, 8 columns a reading (a pump's sensors): readings per second.
    let columns = |x: f64| -> [Option<f64>; 8] {
        std::array::from_fn(|j| Some(x * (1.0 + j as f64 / 8.0) + (j * 3 % 5) as f64))
    };
    for kind in [SeriesKind::Vector, SeriesKind::T2] {
        let prototype = kind.state(&[]).expect("state");
        let mut states = HashMap::<usize, SeriesState>::with_capacity(KEYS);
        for &(key, t, x) in &readings {
            states
                .entry(key)
                .or_insert_with(|| prototype.clone())
                .step_values(t, &columns(x));
        }
        let bytes: usize = states.values().map(SeriesState::size).sum();
        println!(
            "{} of 8 columns: state bytes per key after {} readings a key: {}",
            kind.name(),
            READINGS / KEYS,
            bytes / KEYS
        );
        group.bench_function(format!("{} of 8 columns", kind.name()), |b| {
            b.iter_batched(
                || HashMap::<usize, SeriesState>::with_capacity(KEYS),
                |mut states| {
                    let mut flagged = 0usize;
                    for &(key, t, x) in &readings {
                        let state = states.entry(key).or_insert_with(|| prototype.clone());
                        if let urbanstream_operators::detect::Emitted::Vector(v) =
                            state.step_values(t, &columns(x))
                        {
                            flagged += usize::from(v.score.likelihood.is_some_and(|l| l >= 0.9999));
                        }
                    }
                    (states, flagged)
                },
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

fn through_the_engine(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let schemas = SchemaRegistry::embedded().expect("schemas");
    let batches = decoded_batches(SimTopic::Air, "air_reading", READINGS);
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    let mut group = c.benchmark_group("detectors/stream");
    group.sample_size(10);
    group.throughput(Throughput::Elements(rows as u64));
    for (kind, _, call) in cases() {
        let sql = format!(
            "SELECT sensor_id, {call} OVER (PARTITION BY sensor_id ORDER BY event_time) AS d \
             FROM air_readings"
        );
        group.bench_function(kind.name(), |b| {
            b.iter_batched(
                || {
                    runtime.block_on(async {
                        let ctx = city_context(&Topics::default(), &schemas).expect("city");
                        let statement = urbanstream::plan::stream::StreamContext::parse(&sql)
                            .expect("parse")
                            .remove(0);
                        ctx.plan(statement).await.expect("plan").expect("query")
                    })
                },
                |mut query| {
                    runtime.block_on(async {
                        let (mut out, mut late) = (0, 0);
                        for batch in &batches {
                            let partitions = vec![0; batch.num_rows()];
                            let step = query
                                .process(batch, &partitions, None, i64::MAX / 2)
                                .await
                                .expect("process");
                            out += step.rows.iter().map(|b| b.num_rows()).sum::<usize>();
                            late += step.diverted.len();
                        }
                        // Readings wait until the watermark passes them: the end of the
                        // input releases the last ones.
                        let mut end = query
                            .advance_watermark(i64::MAX / 4, i64::MAX / 2)
                            .await
                            .expect("advance");
                        query
                            .finish_step(i64::MAX / 2, &mut end)
                            .await
                            .expect("advance");
                        out += end.rows.iter().map(|b| b.num_rows()).sum::<usize>();
                        // Every reading has its row (but the simulator's few late ones, set
                        // aside); a silent sensor adds one.
                        assert!(
                            out + late >= rows && late * 100 < rows,
                            "{out} rows and {late} late out of {rows}"
                        );
                        query
                    })
                },
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, state_machines, through_the_engine);
criterion_main!(benches);
