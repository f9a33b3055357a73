//! `urbanstream bench`: end-to-end latency at a fixed offered rate, through Kafka.
//!
//! One run has four parts:
//!
//! - a **load generator** ([`load::generate`]) producing 160-byte camera events open-loop: event
//!   `i` is due at `start + i / rate` and carries that instant as its event time, whether or
//!   not the producer kept up, so a stall shows up as latency of every event due during it
//!   (no coordinated omission);
//! - **the engine** in a child process (`urbanstream bench-engine`), so its CPU time and peak
//!   RSS are its own, running one query over the input topic: a 1-second tumbling window per
//!   segment (`--query window`) or a stateless filter and projection (`--query filter`);
//!   or, with `--consumer plain`, no engine at all: a plain consumer of the input topic,
//!   which measures what the broker alone delivers;
//! - a **downstream consumer** ([`load::receive`]) reading the output topic; for each row it
//!   records, in µs, the time from when the row could first have existed to its receipt: for
//!   a window, the due time of the first event past the window's end plus the watermark
//!   delay (the event that closes it); for a filtered event, that event's due time;
//! - the engine's own **emit latency**, from the arrival of the micro-batch that closed a
//!   window to the broker's acknowledgement of its rows.
//!
//! Latencies go into `hdrhistogram`s; the report ([`report`]) gives p50, p90, p99, p99.9 and
//! max, input, engine and output rates, engine CPU per event and peak RSS, as text, JSON and
//! an SVG plot of latency against offered rate. `--sweep` raises the rate step by step and
//! reports the highest whose p99 stays under `--p99-bound` while the engine keeps up (it stops
//! after two failed rates in a row). `--backlog N` measures instead how fast the engine drains
//! a backlog of `N` events against a plain consumer of the same topic ([`drain`]).

pub mod child;
pub mod drain;
pub mod load;
pub mod peer;
pub mod report;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use crate::broker::{EmbeddedBroker, create_topics};
use crate::error::{Error, Result};
use report::{Report, StepReport};

/// What the engine runs during a bench.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Per segment and tumbling window: count, mean/min/max speed, motorbike share.
    Window,
    /// Stateless: each detection filtered and projected, one output row per event.
    Filter,
}

/// Who reads the input topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsumerKind {
    /// urbanstream, in a child process, publishing to an output topic.
    Engine,
    /// A plain Kafka consumer of the input topic: the broker's own ceiling.
    Plain,
}

/// A second stream engine that drains the backlog beside urbanstream (`--peer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerEngine {
    /// ArkFlow (crates.io `arkflow` 0.1.0; `scripts/install-bench-peer.sh` installs it).
    Arkflow,
}

/// Options of `bench`.
#[derive(Debug, Clone, Args, serde::Serialize)]
pub struct BenchArgs {
    /// Kafka bootstrap servers; default: an embedded broker in this process.
    #[arg(long)]
    pub brokers: Option<String>,
    /// Offered input rate, events per second (with --sweep: the first rate).
    #[arg(long, default_value_t = 50_000)]
    pub rate: u64,
    /// How long latencies are recorded at each rate.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    #[serde(with = "humantime_serde_shim")]
    pub duration: Duration,
    /// Load before recording starts (connections, consumer group assignment, first windows).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    #[serde(with = "humantime_serde_shim")]
    pub warmup: Duration,
    /// The engine's query.
    #[arg(long, value_enum, default_value_t = Workload::Window)]
    pub query: Workload,
    /// Who reads the input: urbanstream, or a plain consumer (the broker's ceiling).
    #[arg(long, value_enum, default_value_t = ConsumerKind::Engine)]
    pub consumer: ConsumerKind,
    /// Partitions of the input and output topics. (The embedded broker keeps only about 5 MB
    /// per partition and slows down past 4 partitions; a real broker has neither limit.)
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// Distinct road segments (grouping keys) in the input.
    #[arg(long, default_value_t = 1000)]
    pub keys: u32,
    /// Leave the input's key undeclared: the window query, which groups by segment, is then
    /// repartitioned by segment through an internal topic (as a query grouping by something
    /// other than its input's key is). By default the input is declared keyed by segment and
    /// the query keeps one state per input partition, like a query over `camera_events`.
    #[arg(long)]
    pub repartition: bool,
    /// Length of the tumbling window (`--query window`).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
    #[serde(with = "humantime_serde_shim")]
    pub window: Duration,
    /// Watermark delay of the input (how far out of order events may arrive).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "100ms")]
    #[serde(with = "humantime_serde_shim")]
    pub watermark_delay: Duration,
    /// How long the engine's source waits to fill a micro-batch after its first record.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5ms")]
    #[serde(with = "humantime_serde_shim")]
    pub linger: Duration,
    /// How long the engine's producer waits to fill a batch of outputs.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5ms")]
    #[serde(with = "humantime_serde_shim")]
    pub producer_linger: Duration,
    /// Step the rate up from --rate until two rates in a row fail: p99 above --p99-bound,
    /// rates not kept, or rows missing. The report names the highest rate that passed.
    #[arg(long)]
    pub sweep: bool,
    /// Each sweep step multiplies the rate by this.
    #[arg(long, default_value_t = 1.5)]
    pub sweep_factor: f64,
    /// The sweep stops at this rate.
    #[arg(long, default_value_t = 2_000_000)]
    pub sweep_max: u64,
    /// The p99 a sustainable rate must stay under (end to end).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "50ms")]
    #[serde(with = "humantime_serde_shim")]
    pub p99_bound: Duration,
    /// How long to wait, after the load stops, for the engine to catch up.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
    #[serde(with = "humantime_serde_shim")]
    pub drain: Duration,
    /// Directory for `latency.json` and `latency.svg`.
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,
    /// Random seed of the generated events.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Measure how fast a backlog is drained instead of latency: produce this many events
    /// first (event times --rate apart, ending now), then let the engine and a plain consumer
    /// take turns reading all of them (--runs each), timed from each one's first record to
    /// its last. --drain bounds each run. Writes `drain.json`.
    #[arg(long)]
    pub backlog: Option<u64>,
    /// With --backlog: how many times each reader drains it, alternating.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// With --backlog: copies of the query the engine runs over the input (1 to 64), each as
    /// the service runs a registered query: a pipeline of its own, with its own consumer,
    /// decoding and producer. The engine's CPU per event is per input event, for all of them;
    /// its threads are counted.
    #[arg(long, default_value_t = 1)]
    pub queries: u32,
    /// With --queries: the copies run in one pipeline, which reads and decodes the input once
    /// for all of them (the service runs each registered query in a pipeline of its own).
    #[arg(long)]
    pub one_pipeline: bool,
    /// With --backlog: a second stream engine drains the backlog too, in turns with the
    /// engine and the plain consumer, through the same broker; its CPU time per event is
    /// reported beside the engine's.
    #[arg(long, value_enum)]
    pub peer: Option<PeerEngine>,
    /// The peer's binary.
    #[arg(long, default_value = "target/tools/arkflow/bin/arkflow")]
    pub peer_binary: PathBuf,
    /// Rows the peer aggregates at a time (ArkFlow's batch processor; it keeps no state
    /// between batches).
    #[arg(long, default_value_t = 10_000)]
    pub peer_batch: usize,
    /// The peer's worker threads; default: one per CPU.
    #[arg(long)]
    pub peer_threads: Option<usize>,
    /// Beside the engine, a plain consumer of the input records each event's latency (due
    /// time → received) in the same run: where the engine's latency has stalls, this tells
    /// whether the events were late out of the broker for any reader or only for the engine.
    #[arg(long)]
    pub probe_input: bool,
    /// A librdkafka property (`KEY=VALUE`, repeatable) for the readers' clients: the engine's
    /// and the plain consumer's alike.
    #[arg(long = "kafka-property", value_parser = parse_property)]
    pub kafka_properties: Vec<(String, String)>,
}

/// `KEY=VALUE`, split at the first `=`.
fn parse_property(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!(
            "expected KEY=VALUE (a librdkafka property), got {s:?}"
        )),
    }
}

/// Durations in the JSON report as humantime strings (`"30s"`).
mod humantime_serde_shim {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

/// Where the topics live: an embedded broker kept alive for the run, or an external cluster.
enum Cluster {
    Embedded(EmbeddedBroker),
    External(String),
}

impl Cluster {
    fn brokers(&self) -> String {
        match self {
            Cluster::Embedded(b) => b.bootstrap_servers(),
            Cluster::External(b) => b.clone(),
        }
    }

    async fn create(&self, topics: &[String], partitions: i32) -> Result<()> {
        match self {
            Cluster::Embedded(b) => {
                for t in topics {
                    b.create_topic(t, partitions)?;
                }
                Ok(())
            }
            Cluster::External(brokers) => {
                let wanted: Vec<_> = topics.iter().map(|t| (t.clone(), partitions)).collect();
                create_topics(brokers, &wanted).await
            }
        }
    }
}

/// The topics of one step; fresh names per step, so no step reads another's backlog.
#[derive(Debug, Clone)]
pub struct StepTopics {
    /// Input (camera events).
    pub input: String,
    /// The query's output.
    pub output: String,
    /// Dead-letter queue.
    pub dlq: String,
    /// Late events.
    pub late: String,
}

impl StepTopics {
    fn new(run: &str, step: usize) -> Self {
        let base = format!("bench.{run}.{step}");
        Self {
            input: format!("{base}.in"),
            output: format!("{base}.out"),
            dlq: format!("{base}.dlq"),
            late: format!("{base}.late"),
        }
    }

    fn all(&self) -> Vec<String> {
        vec![
            self.input.clone(),
            self.output.clone(),
            self.dlq.clone(),
            self.late.clone(),
        ]
    }
}

/// Runs `bench`: one rate, or a sweep; prints the report and writes JSON and SVG.
pub async fn run(args: BenchArgs) -> Result<()> {
    validate(&args)?;
    let cluster = match &args.brokers {
        Some(b) => Cluster::External(b.clone()),
        None => Cluster::Embedded(EmbeddedBroker::start()?),
    };
    let run_id = format!("{}", crate::pipeline::epoch_ms());
    if let Some(backlog) = args.backlog {
        return drain::run(&args, &cluster, &run_id, backlog).await;
    }
    let mut report = Report::new(&args);
    let mut rate = args.rate;
    let mut step = 0;
    let mut failures_in_a_row = 0;
    loop {
        let topics = StepTopics::new(&run_id, step);
        cluster.create(&topics.all(), args.partitions).await?;
        let result = run_step(&args, &cluster.brokers(), &topics, rate).await?;
        eprintln!("{}", result.summary());
        failures_in_a_row = if result.passed {
            0
        } else {
            failures_in_a_row + 1
        };
        report.steps.push(result);
        step += 1;
        let next = ((rate as f64) * args.sweep_factor).round() as u64;
        // One failed rate may be noise on a shared machine; two in a row end the sweep.
        if !args.sweep || failures_in_a_row >= 2 || next > args.sweep_max || next <= rate {
            break;
        }
        rate = next;
    }
    report.finish();
    println!("{}", report.text());
    std::fs::create_dir_all(&args.out)
        .map_err(|e| Error::Config(format!("{}: {e}", args.out.display())))?;
    let json = args.out.join("latency.json");
    let svg = args.out.join("latency.svg");
    report.write_json(&json)?;
    report.write_svg(&svg)?;
    println!("wrote {} and {}", json.display(), svg.display());
    Ok(())
}

fn validate(args: &BenchArgs) -> Result<()> {
    let bad = |m: &str| Err(Error::Config(format!("bench: {m}")));
    if args.rate == 0 {
        return bad("--rate must be at least 1 event/s");
    }
    if args.duration.is_zero() {
        return bad("--duration must be positive");
    }
    if args.keys == 0 {
        return bad("--keys must be at least 1");
    }
    if args.partitions < 1 {
        return bad("--partitions must be at least 1");
    }
    if args.window < Duration::from_millis(1) {
        return bad("--window must be at least 1ms");
    }
    if args.backlog == Some(0) {
        return bad("--backlog must be at least 1 event");
    }
    if args.backlog.is_some() && args.sweep {
        return bad("--backlog measures a drain, --sweep latency: give one of them");
    }
    if args.backlog.is_some() && args.runs == 0 {
        return bad("--runs must be at least 1");
    }
    if !(1..=64).contains(&args.queries) {
        return bad("--queries must be from 1 to 64");
    }
    if (args.queries > 1 || args.one_pipeline) && args.backlog.is_none() {
        return bad("--queries and --one-pipeline measure a drain: give --backlog N too");
    }
    if args.peer.is_some() && args.backlog.is_none() {
        return bad("--peer takes turns draining a backlog: give --backlog N too");
    }
    if args.peer_batch == 0 || args.peer_threads == Some(0) {
        return bad("--peer-batch and --peer-threads must be at least 1");
    }
    if args.sweep && args.sweep_factor <= 1.0 {
        return bad("--sweep-factor must be above 1");
    }
    Ok(())
}

/// One rate: start the reader (engine or plain consumer), the receiver and the generator;
/// record; drain; collect.
async fn run_step(
    args: &BenchArgs,
    brokers: &str,
    topics: &StepTopics,
    rate: u64,
) -> Result<StepReport> {
    let mut engine = match args.consumer {
        ConsumerKind::Engine => {
            Some(child::EngineProcess::spawn(args, brokers, topics, None).await?)
        }
        ConsumerKind::Plain => None,
    };
    // The receiver reads the engine's output, or, for the plain consumer, the input itself.
    let (read_topic, kind) = match args.consumer {
        ConsumerKind::Engine => (topics.output.clone(), args.query),
        ConsumerKind::Plain => (topics.input.clone(), Workload::Filter),
    };
    let total = args.warmup + args.duration;
    let events = ((rate as f64) * total.as_secs_f64()).round() as u64;
    let schedule = load::Schedule::new(rate, events);
    let recording = load::Recording {
        from_us: schedule.start_epoch_us + args.warmup.as_micros() as i64,
        to_us: schedule.start_epoch_us + total.as_micros() as i64,
        kind,
        delay_ms: args.watermark_delay.as_millis() as i64,
    };
    let stop_receiver = Arc::new(AtomicBool::new(false));
    let receiver = load::Receiver::start(
        brokers,
        &read_topic,
        recording,
        &args.kafka_properties,
        stop_receiver.clone(),
    )?;
    let probe = match (args.probe_input, args.consumer) {
        (true, ConsumerKind::Engine) => Some(load::Receiver::start(
            brokers,
            &topics.input,
            load::Recording {
                kind: Workload::Filter,
                ..recording
            },
            &args.kafka_properties,
            stop_receiver.clone(),
        )?),
        _ => None,
    };
    let generator = load::Generator::start(brokers, &topics.input, schedule, args.keys, args.seed)?;

    let bar = progress_bar(total, rate);
    let mut marked_start = false;
    while !generator.is_finished() {
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Time on the schedule: the engine's marks bound the same interval as the recording.
        let elapsed = Instant::now().saturating_duration_since(schedule.start);
        if let Some(engine) = engine.as_mut() {
            if !marked_start && elapsed >= args.warmup {
                engine.mark("start").await?;
                marked_start = true;
            }
            engine.poll_progress();
        }
        bar.set_position(elapsed.as_millis().min(total.as_millis()) as u64);
        bar.set_message(format!(
            "sent {}  engine {}  out {}  p99 {}",
            generator.acknowledged(),
            engine
                .as_ref()
                .map_or("-".to_string(), |e| e.records_in().to_string()),
            receiver.received(),
            receiver.p99_text(),
        ));
    }
    let generated = generator.join()?;
    if let Some(engine) = engine.as_mut() {
        if !marked_start {
            engine.mark("start").await?;
        }
        engine.mark("end").await?;
    }
    bar.set_message("draining");
    // Drain: until the reader has read all that was produced and outputs stopped coming.
    let deadline = Instant::now() + args.drain;
    let mut quiet_since = Instant::now();
    let mut last_received = receiver.received();
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let read = match engine.as_mut() {
            Some(e) => {
                e.poll_progress();
                e.records_in()
            }
            None => receiver.received(),
        };
        let received = receiver.received();
        if received != last_received {
            last_received = received;
            quiet_since = Instant::now();
        }
        let caught_up = read >= generated.acknowledged;
        if (caught_up && quiet_since.elapsed() >= Duration::from_millis(500))
            || Instant::now() >= deadline
        {
            break;
        }
    }
    bar.finish_and_clear();
    stop_receiver.store(true, Ordering::Relaxed);
    let received = receiver.join()?;
    let probed = probe.map(load::Receiver::join).transpose()?;
    let engine_stats = match engine {
        Some(e) => Some(e.finish().await?),
        None => None,
    };
    let mut step = StepReport::new(
        args,
        &schedule,
        &recording,
        &generated,
        &received,
        engine_stats.as_ref(),
    );
    step.input_probe_round_trip_max_ms = probed.as_ref().map(|p| p.round_trip_max_us as f64 / 1e3);
    step.input_probe = probed.map(|p| report::Percentiles::of(&p.latency));
    Ok(step)
}

fn progress_bar(total: Duration, rate: u64) -> ProgressBar {
    let bar = ProgressBar::new(total.as_millis() as u64);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} {rate} ev/s [{{bar:30}}] {{elapsed}}/{} {{msg}}",
            humantime::format_duration(total)
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}
