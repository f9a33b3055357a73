//! Memory held per live group: the default congestion query (`queries/congestion_minute.sql`,
//! ten aggregates per segment and minute, a lookup join) with 1 000 000 distinct segments in
//! one open minute. Reports the engine's own account of its state (DataFusion's group
//! interner and accumulators, per pane) and the process's resident memory before and after,
//! per group. Then the same per live window: a hop of 10 000 windows a reading over 30
//! readings far apart (300 000 windows, one group each). Not a timing bench: it prints two
//! tables.
//!
//! `cargo bench -p urbanstream-benches --bench memory`

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, RecordBatch, StringArray};
use urbanstream::pipeline::Topics;
use urbanstream::plan::{city_context, plan_all};
use urbanstream::schema::SchemaRegistry;
use urbanstream::simulate::SimTopic;
use urbanstream_benches::decoded_batches;

const GROUPS: usize = 1_000_000;

/// Resident and peak resident memory of this process, in bytes (Linux).
fn rss() -> (usize, usize) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<usize>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if std::env::args().any(|a| a == HOP_WINDOWS) {
        hop_windows(&runtime);
        return;
    }
    let schemas = SchemaRegistry::embedded().expect("schemas");
    // Simulated camera detections, each given its own segment, all in the same minute.
    let template = decoded_batches(SimTopic::Camera, "camera_event", 8_192).remove(0);
    let segment = template
        .schema()
        .index_of("segment_id")
        .expect("segment_id");
    let time = template
        .schema()
        .index_of("event_time")
        .expect("event_time");
    let first = template.column(time).clone();
    let batches: Vec<RecordBatch> = (0..GROUPS)
        .step_by(template.num_rows())
        .map(|start| {
            let n = template.num_rows().min(GROUPS - start);
            let mut columns: Vec<ArrayRef> = template.slice(0, n).columns().to_vec();
            columns[segment] = Arc::new(StringArray::from_iter_values(
                (start..start + n).map(|i| format!("seg-{i:07}")),
            ));
            // Every row at the first detection's time, so one minute stays open.
            columns[time] = datafusion::arrow::compute::take(
                &first,
                &datafusion::arrow::array::UInt32Array::from(vec![0u32; n]),
                None,
            )
            .expect("time");
            RecordBatch::try_new(template.schema(), columns).expect("batch")
        })
        .collect();
    let (rss_before, _) = rss();
    let (groups, state_bytes, rss_after, peak) = runtime.block_on(async {
        let ctx = city_context(&Topics::default(), &schemas).expect("city");
        let sql = include_str!("../../queries/congestion_minute.sql");
        let mut query = plan_all(&ctx, sql).await.expect("plan").remove(0);
        for batch in &batches {
            let partitions = vec![0; batch.num_rows()];
            query
                .process(batch, &partitions, None, i64::MAX / 2)
                .await
                .expect("process");
        }
        let (rss_after, peak) = rss();
        (query.state_groups(), query.state_bytes(), rss_after, peak)
    });
    let input_bytes: usize = batches.iter().map(|b| b.get_array_memory_size()).sum();
    println!("default congestion query, {GROUPS} segments in one open minute");
    println!("| measure | total | per group |");
    println!("|---|---|---|");
    println!("| live (window, group) pairs | {groups} | |");
    println!(
        "| engine state (group keys + accumulators) | {:.1} MiB | {} B |",
        state_bytes as f64 / 1048576.0,
        state_bytes / groups.max(1)
    );
    println!(
        "| RSS growth while holding it (input batches of {:.1} MiB included) | {:.1} MiB | {} B |",
        input_bytes as f64 / 1048576.0,
        rss_after.saturating_sub(rss_before) as f64 / 1048576.0,
        rss_after.saturating_sub(rss_before) / groups.max(1)
    );
    let held = rss_after
        .saturating_sub(rss_before)
        .saturating_sub(input_bytes);
    println!(
        "| RSS growth minus the input batches | {:.1} MiB | {} B |",
        held as f64 / 1048576.0,
        held / groups.max(1)
    );
    println!(
        "| process RSS / peak RSS | {:.1} / {:.1} MiB | |",
        rss_after as f64 / 1048576.0,
        peak as f64 / 1048576.0
    );
    println!();
    // In a process of its own: memory the first table freed would be taken again unseen.
    let status = std::process::Command::new(std::env::current_exe().expect("this bench"))
        .arg(HOP_WINDOWS)
        .status()
        .expect("the hop windows' table");
    assert!(status.success(), "the hop windows' table: {status}");
}

/// The argument that makes the bench print the hop windows' table alone.
const HOP_WINDOWS: &str = "--hop-windows";

/// The engine's account of live hop windows against the resident memory they take.
fn hop_windows(runtime: &tokio::runtime::Runtime) {
    use datafusion::arrow::array::{Int64Array, StringViewArray, TimestampMillisecondArray};
    const T0: i64 = 1_767_247_200_000;
    const READINGS: i64 = 30;
    let sql = "CREATE EXTERNAL TABLE ev (k VARCHAR, t TIMESTAMP NOT NULL, v BIGINT) STORED AS \
               KAFKA OPTIONS ('topic' 'ev', 'event_time' 't', 'watermark_delay' '1000000s'); \
               SELECT k, window_start, count(*) AS n, sum(v) AS s FROM ev \
               GROUP BY hop(t, INTERVAL '1 second', INTERVAL '10000 seconds'), k";
    let times: Vec<i64> = (0..READINGS).map(|i| T0 + i * 10_001_000).collect();
    let batch = RecordBatch::try_from_iter_with_nullable(vec![
        (
            "k",
            Arc::new(StringViewArray::from_iter_values(times.iter().map(|_| "k"))) as ArrayRef,
            true,
        ),
        (
            "t",
            Arc::new(TimestampMillisecondArray::from_iter_values(times.clone())),
            false,
        ),
        (
            "v",
            Arc::new(Int64Array::from_iter_values(times.clone())),
            true,
        ),
    ])
    .expect("batch");
    let (windows, state_bytes, growth) = runtime.block_on(async {
        let ctx = urbanstream::plan::stream::StreamContext::new();
        let mut query = plan_all(&ctx, sql).await.expect("plan").remove(0);
        let (before, _) = rss();
        query
            .process(&batch, &vec![0; batch.num_rows()], None, T0 + 1_000_000_000)
            .await
            .expect("process");
        let (after, _) = rss();
        (
            query.open_windows(),
            query.state_bytes(),
            after.saturating_sub(before),
        )
    });
    println!("hop of 10 000 windows a reading, {READINGS} readings far apart");
    println!("| measure | total | per window |");
    println!("|---|---|---|");
    println!("| live windows | {windows} | |");
    println!(
        "| engine state | {:.1} MiB | {} B |",
        state_bytes as f64 / 1048576.0,
        state_bytes / windows.max(1)
    );
    println!(
        "| RSS growth while holding it | {:.1} MiB | {} B |",
        growth as f64 / 1048576.0,
        growth / windows.max(1)
    );
}
