//! The engine under test, in its own process: `urbanstream bench-engine`.
//!
//! The parent ([`EngineProcess`]) starts it with the topics and the query, and talks to it
//! over stdin and stdout, one line at a time. The child prints `{"ready":true}` once its
//! queries are planned and the consumer group has assigned it its partitions, then
//! `{"records_in":…}` every 200 ms. A `start` or `end` line on stdin marks the recording
//! interval: the child notes its CPU time and input count at each, and resets its emit-latency histogram at `start`. When
//! stdin closes it stops the pipeline (publishing what is pending and committing) and prints
//! `{"final":{…}}` with [`EngineStats`].

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc;

use super::report::Percentiles;
use super::{BenchArgs, StepTopics, Workload};
use crate::error::{Error, Result};
use crate::pipeline::{Pipeline, PipelineConfig, PipelineStats, latency_histogram};

/// Options of the hidden `bench-engine` command (started by `bench`).
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// Bootstrap servers.
    #[arg(long)]
    pub brokers: String,
    /// Input topic (camera events).
    #[arg(long)]
    pub input: String,
    /// Output topic.
    #[arg(long)]
    pub output: String,
    /// Dead-letter topic.
    #[arg(long)]
    pub dlq: String,
    /// Late-event topic.
    #[arg(long)]
    pub late: String,
    /// The query.
    #[arg(long, value_enum)]
    pub query: Workload,
    /// Window length.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub window: Duration,
    /// Watermark delay.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub watermark_delay: Duration,
    /// Source linger.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub linger: Duration,
    /// Producer linger.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub producer_linger: Duration,
    /// Leave the input's key undeclared (the window query is repartitioned).
    #[arg(long)]
    pub repartition: bool,
    /// A backlog drain: mark the start at the first input record and the end once this many
    /// have been read, instead of waiting for `start` and `end` on stdin.
    #[arg(long)]
    pub expect: Option<u64>,
    /// A librdkafka property (`KEY=VALUE`, repeatable) for the engine's clients.
    #[arg(long = "property", value_parser = super::parse_property)]
    pub properties: Vec<(String, String)>,
    /// Copies of the query, each in a pipeline of its own unless `--one-pipeline`.
    #[arg(long, default_value_t = 1)]
    pub queries: u32,
    /// The copies in one pipeline.
    #[arg(long)]
    pub one_pipeline: bool,
}

/// The bench queries: the input table, the output table and the statement; the tables'
/// names end with `suffix` (copies of the query in one pipeline each declare their own).
pub fn bench_sql(args: &EngineArgs, suffix: &str) -> String {
    let source = format!(
        "CREATE EXTERNAL TABLE bench_events{suffix} (
            camera_id VARCHAR NOT NULL, segment_id VARCHAR NOT NULL,
            event_time TIMESTAMP NOT NULL, kind VARCHAR NOT NULL, vehicle_class VARCHAR,
            speed_kmh DOUBLE, lane INT, direction VARCHAR, confidence DOUBLE NOT NULL,
            severity INT)
         STORED AS KAFKA OPTIONS ('topic' '{}', 'format' 'json', 'event_time' 'event_time',
            'watermark_delay' '{}ms'{});",
        args.input,
        args.watermark_delay.as_millis(),
        if args.repartition {
            ""
        } else {
            ", 'key' 'segment_id'"
        }
    );
    let query = match args.query {
        Workload::Window => format!(
            "CREATE EXTERNAL TABLE bench_windows{suffix} (
                segment_id VARCHAR NOT NULL, window_start TIMESTAMP NOT NULL,
                window_end TIMESTAMP NOT NULL, vehicles BIGINT NOT NULL,
                mean_speed_kmh DOUBLE, min_speed_kmh DOUBLE, max_speed_kmh DOUBLE,
                motorbike_share DOUBLE)
             STORED AS KAFKA OPTIONS ('topic' '{}', 'format' 'json', 'key' 'segment_id');
             INSERT INTO bench_windows{suffix}
             SELECT segment_id, window_start, window_end, count(*) AS vehicles,
                    avg(speed_kmh) AS mean_speed_kmh, min(speed_kmh) AS min_speed_kmh,
                    max(speed_kmh) AS max_speed_kmh,
                    avg(CASE WHEN vehicle_class = 'motorbike' THEN 1.0 ELSE 0.0 END)
                        AS motorbike_share
             FROM bench_events{suffix}
             GROUP BY tumble(event_time, INTERVAL '{} milliseconds'), segment_id;",
            args.output,
            args.window.as_millis()
        ),
        Workload::Filter => format!(
            "CREATE EXTERNAL TABLE bench_detections{suffix} (
                camera_id VARCHAR NOT NULL, segment_id VARCHAR NOT NULL,
                event_time TIMESTAMP NOT NULL, vehicle_class VARCHAR, speed_kmh DOUBLE)
             STORED AS KAFKA OPTIONS ('topic' '{}', 'format' 'json', 'key' 'segment_id');
             INSERT INTO bench_detections{suffix}
             SELECT camera_id, segment_id, event_time, vehicle_class, speed_kmh
             FROM bench_events{suffix}
             WHERE kind = 'detection' AND speed_kmh IS NOT NULL;",
            args.output
        ),
    };
    format!("{source}\n{query}")
}

/// What the engine reports at the end.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EngineStats {
    /// Input records read by the `start` mark.
    pub records_at_start: u64,
    /// Input records read by the `end` mark.
    pub records_at_end: u64,
    /// Records dead-lettered.
    pub dlq: u64,
    /// Events diverted as late.
    pub late: u64,
    /// Seconds between the marks.
    pub marked_seconds: f64,
    /// CPU time (user + system) between the marks, seconds.
    pub cpu_seconds: f64,
    /// Peak resident set size, bytes.
    pub peak_rss_bytes: u64,
    /// Emit latency between the marks (window close → acknowledged), µs.
    pub emit: Percentiles,
    /// CPU time between the marks by kind of thread (thread name without its number), seconds:
    /// where the engine's time goes (`tokio-runtime-w`: decode, queries, encode; `rdk:…`:
    /// librdkafka's consumer and producer).
    pub cpu_by_thread: BTreeMap<String, f64>,
    /// The process's threads at the end mark.
    #[serde(default)]
    pub threads: u64,
}

/// CPU time (user + system) of each thread of this process, seconds, summed by thread name
/// with digits removed (Linux `/proc`; empty elsewhere).
fn thread_cpu() -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        if let Some((name, seconds)) = stat_cpu(&stat) {
            let name: String = name.chars().filter(|c| !c.is_ascii_digit()).collect();
            *out.entry(name).or_insert(0.0) += seconds;
        }
    }
    out
}

/// The name and CPU time (user + system, seconds) in a `/proc/…/stat` line of a process or
/// thread.
pub(super) fn stat_cpu(stat: &str) -> Option<(&str, f64)> {
    // /proc reports in clock ticks of USER_HZ, which Linux fixes at 100 per second.
    const TICKS_PER_SECOND: f64 = 100.0;
    // "tid (name) state ppid …": the name may hold spaces, so split at the last ')'.
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    // After the name: state is field 3 of stat(5), utime 14 and stime 15.
    let ticks = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<f64>().ok());
    Some((
        &stat[open + 1..close],
        (ticks(14)? + ticks(15)?) / TICKS_PER_SECOND,
    ))
}

/// CPU time (user + system) of this process so far, seconds, and its peak RSS in bytes.
fn usage() -> (f64, u64) {
    use nix::sys::resource::{UsageWho, getrusage};
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(u) => {
            let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
            (
                secs(u.user_time()) + secs(u.system_time()),
                // Linux reports ru_maxrss in KiB.
                u.max_rss().max(0) as u64 * 1024,
            )
        }
        Err(_) => (0.0, 0),
    }
}

/// Runs the child side until stdin closes.
pub async fn run(args: EngineArgs) -> Result<()> {
    let copies = args.queries.max(1);
    let queries: Vec<(String, String)> = if copies == 1 {
        vec![("bench".into(), bench_sql(&args, ""))]
    } else {
        (0..copies)
            .map(|i| (format!("bench{i}"), bench_sql(&args, &format!("_{i}"))))
            .collect()
    };
    let pipelines: Vec<Vec<(String, String)>> = if args.one_pipeline {
        vec![queries]
    } else {
        queries.into_iter().map(|q| vec![q]).collect()
    };
    let stop = Arc::new(AtomicBool::new(false));
    let mut all = Vec::new();
    let mut tasks = Vec::new();
    for (i, queries) in pipelines.into_iter().enumerate() {
        let mut config = PipelineConfig::new(&args.brokers);
        // Named after the output, which is new for every run: a run never resumes another's
        // committed offsets.
        config.group_id = match i {
            0 => format!("bench-engine-{}", args.output),
            i => format!("bench-engine-{}-{i}", args.output),
        };
        config.default_queries = false;
        config.queries = queries;
        config.topics.dlq = args.dlq.clone();
        config.topics.late = args.late.clone();
        config.linger = args.linger;
        config.producer_linger = args.producer_linger;
        config.properties = args.properties.clone();
        let stats = Arc::new(PipelineStats::new());
        let pipeline = Pipeline::new(config, stats.clone()).await?;
        tasks.push(tokio::spawn(pipeline.run(stop.clone())));
        all.push(stats);
    }
    let stats = Engines(all);
    let finished = || tasks.iter().any(|t| t.is_finished());
    // Ready once the consumer group has given this process its partitions: a load started
    // before that would pile up a backlog during the group join.
    // A drain's first records follow the assignment closely: look often.
    let look = Duration::from_millis(if args.expect.is_some() { 2 } else { 50 });
    let mut final_stats = EngineStats::default();
    let mut start: Option<Mark> = None;
    while !stats.assigned() {
        if finished() {
            break;
        }
        tokio::time::sleep(look).await;
        if args.expect.is_some() && stats.first_read() {
            start = Some(Mark::start(&stats, &mut final_stats));
            break;
        }
    }
    say(&serde_json::json!({"ready": true}))?;

    // stdin is read on a thread of its own (blocking reads), line by line.
    let (tx, mut commands) = mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut ticker = tokio::time::interval(Duration::from_millis(200));
    // A drain is timed from its own records, looked at every 2 ms.
    let mut watch = tokio::time::interval(Duration::from_millis(2));
    let mut ended = false;
    loop {
        tokio::select! {
            line = commands.recv() => match line {
                Some(line) => match line.trim() {
                    "start" => start = Some(Mark::start(&stats, &mut final_stats)),
                    "end" => {
                        if let Some(start) = &start {
                            start.end(&stats, &mut final_stats);
                        }
                    }
                    other => tracing::warn!(line = other, "bench-engine: unknown command"),
                },
                None => break,
            },
            _ = watch.tick(), if args.expect.is_some() && !ended => {
                let read = stats.records_in();
                match &start {
                    None if stats.first_read() => {
                        start = Some(Mark::start(&stats, &mut final_stats));
                    }
                    Some(mark) if read >= args.expect.unwrap_or(u64::MAX) => {
                        mark.end(&stats, &mut final_stats);
                        ended = true;
                    }
                    _ => {}
                }
            }
            _ = ticker.tick() => {
                if finished() {
                    break;
                }
                say(&serde_json::json!({ "records_in": stats.records_in() }))?;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await
            .map_err(|e| Error::Config(format!("pipeline task failed: {e}")))??;
    }
    final_stats.dlq = stats.0.iter().map(|s| s.dlq.load(Ordering::Relaxed)).sum();
    final_stats.late = stats.0.iter().map(|s| s.late.load(Ordering::Relaxed)).sum();
    final_stats.peak_rss_bytes = usage().1;
    say(&serde_json::json!({ "final": final_stats }))
}

/// The statistics of the child's pipelines (one per copy of the query, or one for all).
struct Engines(Vec<Arc<PipelineStats>>);

impl Engines {
    /// Whether every pipeline has partitions assigned.
    fn assigned(&self) -> bool {
        self.0
            .iter()
            .all(|s| s.assigned_partitions.load(Ordering::Relaxed) > 0)
    }

    /// Whether any pipeline has read a record.
    fn first_read(&self) -> bool {
        self.0
            .iter()
            .any(|s| s.records_in.load(Ordering::Relaxed) > 0)
    }

    /// The input records every pipeline has read: the slowest one's count.
    fn records_in(&self) -> u64 {
        self.0
            .iter()
            .map(|s| s.records_in.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    }
}

/// The start of a measured interval: when, the process's CPU time and each thread's.
struct Mark {
    at: Instant,
    cpu: f64,
    threads: BTreeMap<String, f64>,
}

impl Mark {
    /// Starts the interval: notes the input count and resets the emit-latency histograms.
    fn start(stats: &Engines, out: &mut EngineStats) -> Self {
        out.records_at_start = stats.records_in();
        for s in &stats.0 {
            if let Ok(mut h) = s.emit_latency_us.lock() {
                *h = latency_histogram();
            }
        }
        Self {
            at: Instant::now(),
            cpu: usage().0,
            threads: thread_cpu(),
        }
    }

    /// Ends the interval: input count, time, CPU (in all and by thread), threads, emit latency
    /// (of every pipeline's outputs).
    fn end(&self, stats: &Engines, out: &mut EngineStats) {
        out.records_at_end = stats.records_in();
        out.threads = std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count() as u64);
        out.marked_seconds = self.at.elapsed().as_secs_f64();
        out.cpu_seconds = usage().0 - self.cpu;
        // Threads that ended between the marks are not counted.
        out.cpu_by_thread = thread_cpu()
            .into_iter()
            .map(|(name, secs)| {
                let before = self.threads.get(&name).copied().unwrap_or(0.0);
                (name, (secs - before).max(0.0))
            })
            .filter(|(_, secs)| *secs > 0.0)
            .collect();
        let mut emit = latency_histogram();
        for s in &stats.0 {
            if let Ok(h) = s.emit_latency_us.lock() {
                // Same bounds and precision: adding cannot fail.
                let _ = emit.add(&*h);
            }
        }
        out.emit = Percentiles::of(&emit);
    }
}

/// Writes one line to stdout, for the parent.
fn say(value: &serde_json::Value) -> Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{value}")
        .and_then(|()| out.flush())
        .map_err(|e| Error::Config(format!("bench-engine: cannot write to stdout: {e}")))
}

#[derive(Deserialize)]
struct Line {
    #[serde(default)]
    ready: bool,
    records_in: Option<u64>,
    #[serde(rename = "final")]
    final_stats: Option<EngineStats>,
}

/// The parent's handle on a `bench-engine` child.
pub struct EngineProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<String>,
    records_in: u64,
    final_stats: Option<EngineStats>,
}

impl EngineProcess {
    /// Starts the child and waits until it is ready. With `expect`, the child times a
    /// backlog drain of that many records itself.
    pub async fn spawn(
        args: &BenchArgs,
        brokers: &str,
        topics: &StepTopics,
        expect: Option<u64>,
    ) -> Result<Self> {
        let exe = std::env::current_exe()
            .map_err(|e| Error::Config(format!("cannot find the urbanstream binary: {e}")))?;
        let ms = |d: Duration| format!("{}ms", d.as_millis());
        // The engine logs warnings by default; URBANSTREAM_BENCH_ENGINE_LOG sets its filter.
        let engine_log =
            std::env::var("URBANSTREAM_BENCH_ENGINE_LOG").unwrap_or_else(|_| "warn".into());
        let mut child = tokio::process::Command::new(exe)
            .args(["--log", &engine_log, "bench-engine", "--brokers", brokers])
            .args(["--input", &topics.input, "--output", &topics.output])
            .args(["--dlq", &topics.dlq, "--late", &topics.late])
            .args([
                "--query",
                match args.query {
                    Workload::Window => "window",
                    Workload::Filter => "filter",
                },
            ])
            .args(["--window", &ms(args.window)])
            .args(["--watermark-delay", &ms(args.watermark_delay)])
            .args(["--linger", &ms(args.linger)])
            .args(["--producer-linger", &ms(args.producer_linger)])
            .args(args.repartition.then_some("--repartition"))
            .args(["--queries", &args.queries.to_string()])
            .args(args.one_pipeline.then_some("--one-pipeline"))
            .args(
                expect
                    .iter()
                    .flat_map(|n| ["--expect".to_string(), n.to_string()]),
            )
            .args(
                args.kafka_properties
                    .iter()
                    .flat_map(|(k, v)| ["--property".to_string(), format!("{k}={v}")]),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::Config(format!("cannot start bench-engine: {e}")))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| Error::Config("bench-engine has no stdout".into()))?;
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut process = Self {
            stdin: child.stdin.take(),
            child,
            lines: rx,
            records_in: 0,
            final_stats: None,
        };
        let ready = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = process.lines.recv().await {
                if serde_json::from_str::<Line>(&line).is_ok_and(|l| l.ready) {
                    return true;
                }
            }
            false
        })
        .await;
        if ready != Ok(true) {
            return Err(Error::Config(
                "bench-engine did not become ready within 60 s (see its log above)".into(),
            ));
        }
        Ok(process)
    }

    /// Sends a mark (`start` or `end`).
    pub async fn mark(&mut self, mark: &str) -> Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| Error::Config("bench-engine's stdin is closed".into()))?;
        stdin
            .write_all(format!("{mark}\n").as_bytes())
            .await
            .and(stdin.flush().await)
            .map_err(|e| Error::Config(format!("bench-engine: {e}")))
    }

    /// Reads the progress lines that arrived.
    pub fn poll_progress(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.read(&line);
        }
    }

    fn read(&mut self, line: &str) {
        if let Ok(l) = serde_json::from_str::<Line>(line) {
            if let Some(n) = l.records_in {
                self.records_in = n;
            }
            if l.final_stats.is_some() {
                self.final_stats = l.final_stats;
            }
        }
    }

    /// Whether the child has exited (on an error of its own: it reports it on stderr).
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Input records the engine has read, as of the last progress line.
    pub fn records_in(&self) -> u64 {
        self.records_in
    }

    /// Closes stdin, waits for the final report and the exit.
    pub async fn finish(mut self) -> Result<EngineStats> {
        drop(self.stdin.take());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while self.final_stats.is_none() {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => self.read(&line),
                Ok(None) | Err(_) => break,
            }
        }
        let status = self
            .child
            .wait()
            .await
            .map_err(|e| Error::Config(format!("bench-engine: {e}")))?;
        self.final_stats.ok_or_else(|| {
            Error::Config(format!(
                "bench-engine exited ({status}) without its final report"
            ))
        })
    }
}
