//! `urbanstream bench --backlog N --peer arkflow`: a second stream engine drains the same
//! backlog, through the same broker, in turns with urbanstream and the plain consumer.
//!
//! The peer is ArkFlow (crates.io `arkflow`, a DataFusion-based stream processor; version
//! 0.1.0, the one crates.io carries), installed by `scripts/install-bench-peer.sh` into
//! `target/tools/arkflow`. It runs in a process of its own, so its CPU time (from
//! `/proc/<pid>/stat`) is its own. Its pipeline is the closest it can express to the bench's
//! window query:
//!
//! - a Kafka input from the beginning of the backlog, with a consumer group of its own;
//! - `json_to_arrow` (each record parsed into a one-row batch), then `batch` (`--peer-batch`
//!   rows concatenated), then `sql`: per segment and window (`event_time / window`), count,
//!   mean/min/max speed and motorbike share, then `arrow_to_json` and a Kafka output.
//!
//! ArkFlow 0.1.0 keeps no state between batches: a window's rows are aggregated per batch, not
//! merged across batches, and nothing waits for a watermark. So it does less work per event
//! than urbanstream's window (which keeps every window's state, merges, and publishes each
//! window once, exactly); the comparison favours the peer.
//!
//! Progress is read off its output: every output row carries its `vehicles` count, so the sum
//! over the output topic is the number of input records the peer has processed. The run is
//! timed from its first output to its last, and its CPU time over the same interval, like the
//! engine's (first record to last). ArkFlow's batch processor flushes a partial batch only
//! when a record arrives after its timeout, so up to a batch per worker thread of the backlog
//! is never emitted; the run ends when the output has been quiet for [`QUIET`], and the report
//! says how many records were left unaccounted for.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::Message;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::BaseConsumer;

use super::drain::{DrainRun, Reader};
use super::{BenchArgs, StepTopics, child, load};
use crate::error::{Error, Result};

/// How long the peer's output must stay unchanged before its drain is taken as finished.
const QUIET: Duration = Duration::from_secs(5);

/// ArkFlow's configuration (JSON, which it reads by the file's extension) for one drain.
pub fn arkflow_config(
    args: &BenchArgs,
    brokers: &str,
    topics: &StepTopics,
    group: &str,
    threads: usize,
) -> serde_json::Value {
    let window_ms = args.window.as_millis().max(1);
    let sql = format!(
        "SELECT segment_id, window_start, count(*) AS vehicles, \
                avg(speed_kmh) AS mean_speed_kmh, min(speed_kmh) AS min_speed_kmh, \
                max(speed_kmh) AS max_speed_kmh, \
                avg(CASE WHEN vehicle_class = 'motorbike' THEN 1.0 ELSE 0.0 END) \
                    AS motorbike_share \
         FROM (SELECT *, event_time / {window_ms} * {window_ms} AS window_start FROM flow) \
         GROUP BY segment_id, window_start"
    );
    let brokers: Vec<&str> = brokers.split(',').map(str::trim).collect();
    serde_json::json!({
        "logging": { "level": "warn" },
        "streams": [{
            "input": {
                "type": "kafka",
                "brokers": brokers,
                "topics": [topics.input],
                "consumer_group": group,
                "client_id": group,
                "start_from_latest": false,
            },
            "pipeline": {
                "thread_num": threads,
                "processors": [
                    { "type": "json_to_arrow" },
                    {
                        "type": "batch",
                        "count": args.peer_batch,
                        "timeout_ms": 1000,
                        "data_type": "arrow",
                    },
                    { "type": "sql", "query": sql },
                    { "type": "arrow_to_json" },
                ],
            },
            "output": {
                "type": "kafka",
                "brokers": brokers,
                "topic": topics.output,
                "client_id": format!("{group}-out"),
            },
        }],
    })
}

/// The peer drains the backlog of `expect` records from `topics.input`.
pub(super) async fn drain(
    args: &BenchArgs,
    brokers: &str,
    topics: &StepTopics,
    expect: u64,
) -> Result<DrainRun> {
    let binary = &args.peer_binary;
    if !binary.is_file() {
        return Err(Error::Config(format!(
            "bench: no ArkFlow binary at {} (scripts/install-bench-peer.sh installs it there; \
             --peer-binary names another)",
            binary.display()
        )));
    }
    let threads = args
        .peer_threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let group = format!("bench-arkflow-{}", topics.output);
    std::fs::create_dir_all(&args.out)
        .map_err(|e| Error::Config(format!("{}: {e}", args.out.display())))?;
    let config_path = args.out.join(format!("{}.arkflow.json", topics.output));
    let config = arkflow_config(args, brokers, topics, &group, threads);
    std::fs::write(&config_path, config.to_string())
        .map_err(|e| Error::Config(format!("{}: {e}", config_path.display())))?;
    let log_path = args.out.join(format!("{}.arkflow.log", topics.output));
    let log = std::fs::File::create(&log_path)
        .map_err(|e| Error::Config(format!("{}: {e}", log_path.display())))?;
    let stderr = log
        .try_clone()
        .map_err(|e| Error::Config(format!("{}: {e}", log_path.display())))?;

    let stop = Arc::new(AtomicBool::new(false));
    let output = OutputCounter::start(brokers, &topics.output, stop.clone())?;
    let mut process = tokio::process::Command::new(binary)
        .arg("--config")
        .arg(&config_path)
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Error::Config(format!("cannot start {}: {e}", binary.display())))?;
    let pid = process
        .id()
        .ok_or_else(|| Error::Config(format!("{} exited before it started", binary.display())))?;

    let result = watch(args, &mut process, pid, &output, expect, &log_path).await;
    stop.store(true, Ordering::Relaxed);
    let _ = process.start_kill();
    let _ = process.wait().await;
    let _ = tokio::task::spawn_blocking(move || output.join()).await;
    result
}

/// A point of the peer's progress: when its output's count changed, and its CPU time then.
#[derive(Debug, Clone, Copy)]
struct Progress {
    at: Instant,
    counted: u64,
    cpu_seconds: f64,
}

/// Follows the peer until its output has counted `expect` records or has stayed quiet for
/// [`QUIET`]; returns its run from the first output to the last.
async fn watch(
    args: &BenchArgs,
    process: &mut tokio::process::Child,
    pid: u32,
    output: &OutputCounter,
    expect: u64,
    log_path: &Path,
) -> Result<DrainRun> {
    let deadline = Instant::now() + args.drain;
    let (mut first, mut last): (Option<Progress>, Option<Progress>) = (None, None);
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let counted = output.counted();
        let now = Instant::now();
        if counted > 0 && last.is_none_or(|l| counted > l.counted) {
            let p = Progress {
                at: now,
                counted,
                cpu_seconds: process_cpu(pid)?,
            };
            first.get_or_insert(p);
            last = Some(p);
        }
        if counted >= expect || last.is_some_and(|l| now.duration_since(l.at) >= QUIET) {
            break;
        }
        if let Some(status) = process.try_wait().ok().flatten() {
            return Err(Error::Config(format!(
                "bench: ArkFlow exited ({status}) after {counted} of {expect} records \
                 (its log: {})",
                log_path.display()
            )));
        }
        if output.failed() {
            return Err(Error::Config(format!(
                "bench: ArkFlow's output could not be read after {counted} of {expect} records \
                 (the error is above)"
            )));
        }
        if now >= deadline {
            return Err(Error::Config(format!(
                "bench: ArkFlow emitted {counted} of {expect} records within --drain {} (its \
                 log: {})",
                humantime::format_duration(args.drain),
                log_path.display()
            )));
        }
    }
    let (Some(first), Some(last)) = (first, last) else {
        return Err(Error::Config(format!(
            "bench: ArkFlow emitted nothing (its log: {})",
            log_path.display()
        )));
    };
    if last.counted < expect / 2 {
        return Err(Error::Config(format!(
            "bench: ArkFlow emitted {} of {expect} records, then nothing for {} s (its log: {})",
            last.counted,
            QUIET.as_secs(),
            log_path.display()
        )));
    }
    // The first output opens the interval; the records it counted are before it.
    let records = last.counted - first.counted;
    let seconds = last.at.duration_since(first.at).as_secs_f64().max(1e-6);
    let cpu = last.cpu_seconds - first.cpu_seconds;
    Ok(DrainRun {
        reader: Reader::Peer,
        records,
        seconds,
        rate: records as f64 / seconds,
        cpu_us_per_event: (records > 0).then(|| cpu * 1e6 / records as f64),
        cores: Some(cpu / seconds),
        cpu_us_per_event_by_thread: Default::default(),
        dlq_late: None,
        unaccounted: Some(expect.saturating_sub(last.counted)),
        threads: None,
    })
}

/// CPU time (user + system) of process `pid` so far, seconds.
fn process_cpu(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| Error::Config(format!("bench: cannot read the peer's CPU time: {e}")))?;
    child::stat_cpu(&stat)
        .map(|(_, seconds)| seconds)
        .ok_or_else(|| Error::Config(format!("bench: unreadable /proc/{pid}/stat")))
}

/// Reads the peer's output topic from the beginning on a thread of its own and sums the
/// `vehicles` of its rows (each record a JSON array of rows).
struct OutputCounter {
    handle: std::thread::JoinHandle<()>,
    counted: Arc<AtomicU64>,
    failed: Arc<AtomicBool>,
}

/// One output row of the peer: only the count is read.
#[derive(serde::Deserialize)]
struct PeerRow {
    vehicles: u64,
}

impl OutputCounter {
    fn start(brokers: &str, topic: &str, stop: Arc<AtomicBool>) -> Result<Self> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("bench-peer-output-{topic}"))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "5")
            .create()?;
        load::assign_from_beginning(&consumer, topic)?;
        let counted = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicBool::new(false));
        let (c, f) = (counted.clone(), failed.clone());
        let handle = std::thread::Builder::new()
            .name("bench-peer-output".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Some(message) = consumer.poll(Duration::from_millis(20)) else {
                        continue;
                    };
                    let rows = match message {
                        Ok(m) => m
                            .payload()
                            .map(serde_json::from_slice::<Vec<PeerRow>>)
                            .transpose(),
                        Err(e) => {
                            eprintln!("bench: reading ArkFlow's output: {e}");
                            f.store(true, Ordering::Relaxed);
                            return;
                        }
                    };
                    match rows {
                        Ok(rows) => {
                            let n: u64 = rows.iter().flatten().map(|r| r.vehicles).sum();
                            c.fetch_add(n, Ordering::Relaxed);
                        }
                        Err(e) => {
                            eprintln!("bench: an output record of ArkFlow is not its rows: {e}");
                            f.store(true, Ordering::Relaxed);
                            return;
                        }
                    }
                }
            })
            .map_err(|e| Error::Config(format!("cannot start the peer's output reader: {e}")))?;
        Ok(Self {
            handle,
            counted,
            failed,
        })
    }

    fn counted(&self) -> u64 {
        self.counted.load(Ordering::Relaxed)
    }

    fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    fn join(self) {
        let _ = self.handle.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    #[test]
    fn arkflow_config_reads_the_input_and_writes_the_output_per_window() {
        let args = Cli::parse_from([
            "bench",
            "--backlog",
            "100",
            "--peer",
            "arkflow",
            "--window",
            "1m",
            "--peer-batch",
            "5000",
        ])
        .bench;
        let topics = StepTopics::new("r", 1);
        let config = arkflow_config(&args, "a:1, b:2", &topics, "g", 2);
        let stream = &config["streams"][0];
        assert_eq!(stream["input"]["type"], "kafka");
        assert_eq!(
            stream["input"]["brokers"],
            serde_json::json!(["a:1", "b:2"])
        );
        assert_eq!(stream["input"]["topics"], serde_json::json!([topics.input]));
        assert_eq!(stream["input"]["start_from_latest"], false);
        assert_eq!(stream["output"]["topic"], topics.output.as_str());
        assert_eq!(stream["pipeline"]["thread_num"], 2);
        let processors = stream["pipeline"]["processors"].as_array().unwrap();
        let kinds: Vec<&str> = processors
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["json_to_arrow", "batch", "sql", "arrow_to_json"]);
        assert_eq!(processors[1]["count"], 5000);
        let sql = processors[2]["query"].as_str().unwrap();
        assert!(
            sql.contains("event_time / 60000 * 60000 AS window_start"),
            "{sql}"
        );
        assert!(sql.contains("count(*) AS vehicles"), "{sql}");
    }

    #[test]
    fn process_cpu_reads_this_process() {
        let cpu = process_cpu(std::process::id()).unwrap();
        assert!(cpu >= 0.0);
        // Spin until the kernel has counted a tick more (it counts 100 a second of CPU).
        let busy = Instant::now();
        let mut x = 0u64;
        while process_cpu(std::process::id()).unwrap() <= cpu {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(1));
            }
            assert!(
                busy.elapsed() < Duration::from_secs(60),
                "a minute of spinning counted no CPU time"
            );
        }
    }
}
