//! `urbanstream bench --backlog N`: how fast a reader drains a backlog.
//!
//! The input topic is filled with `N` camera events first (as fast as the broker takes them;
//! their event times `1 / rate` apart, ending now). Then the readers take turns over that same
//! topic, each from its beginning with a group of its own: the engine (a `bench-engine` child
//! running the bench query) and a plain consumer (one `BaseConsumer` that counts records and
//! decodes nothing: the ceiling of what the broker and librdkafka deliver). Each run is timed
//! from the reader's first record to its `N`-th, so the consumer group's join is not counted;
//! the engine's CPU time is measured over the same interval. The engine's figure against the
//! plain consumer's in the same run is the ratio that matters: both go through the same broker
//! on the same machine at the same time. With `--peer arkflow` a second stream engine takes
//! its turn too, after the plain consumer ([`peer`]).

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::report::{Machine, broker_name, by_thread};
use super::{BenchArgs, Cluster, StepTopics, Workload, child, load, peer};
use crate::error::{Error, Result};

/// Who drains the backlog in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reader {
    /// urbanstream, in a child process, running the bench query.
    Engine,
    /// A plain consumer: the broker's and librdkafka's ceiling.
    Plain,
    /// The peer engine of `--peer` (ArkFlow), in a process of its own.
    Peer,
}

impl Reader {
    fn name(self) -> &'static str {
        match self {
            Reader::Engine => "engine",
            Reader::Plain => "plain",
            Reader::Peer => "arkflow",
        }
    }
}

/// One reader's drain of the backlog.
#[derive(Debug, Clone, Serialize)]
pub struct DrainRun {
    /// Who read.
    pub reader: Reader,
    /// Records counted between the first and the last.
    pub records: u64,
    /// Seconds from the first record read to the last.
    pub seconds: f64,
    /// Records per second over that interval.
    pub rate: f64,
    /// The engine's CPU time per record over that interval, µs.
    pub cpu_us_per_event: Option<f64>,
    /// The engine's CPU use over that interval, in cores.
    pub cores: Option<f64>,
    /// The engine's CPU time per record by kind of thread, µs.
    pub cpu_us_per_event_by_thread: std::collections::BTreeMap<String, f64>,
    /// The engine's threads at the end of the drain.
    pub threads: Option<u64>,
    /// Records the engine dead-lettered and events it found late (none are expected).
    pub dlq_late: Option<(u64, u64)>,
    /// Records of the backlog the peer's output did not account for when it went quiet
    /// (the rows its batch processor still held).
    pub unaccounted: Option<u64>,
}

/// The drain report: the backlog, then each run in the order they ran.
#[derive(Debug, Clone, Serialize)]
pub struct DrainReport {
    version: &'static str,
    machine: Machine,
    options: BenchArgs,
    broker: String,
    /// Events in the backlog (acknowledged by the broker).
    pub backlog: u64,
    /// Seconds the backlog took to produce.
    pub produce_seconds: f64,
    /// The runs, alternating engine, plain consumer and (with `--peer`) the peer.
    pub runs: Vec<DrainRun>,
}

impl DrainReport {
    /// The median rate of one reader's runs.
    pub fn median_rate(&self, reader: Reader) -> Option<f64> {
        self.median(reader, |r| Some(r.rate))
    }

    /// The median CPU time per event of one reader's runs, µs.
    pub fn median_cpu(&self, reader: Reader) -> Option<f64> {
        self.median(reader, |r| r.cpu_us_per_event)
    }

    fn median(&self, reader: Reader, value: impl Fn(&DrainRun) -> Option<f64>) -> Option<f64> {
        let mut values: Vec<f64> = self
            .runs
            .iter()
            .filter(|r| r.reader == reader)
            .filter_map(value)
            .collect();
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied()
    }

    /// The report as text.
    pub fn text(&self) -> String {
        let o = &self.options;
        let mut s = String::new();
        let query = match o.query {
            Workload::Window => format!(
                "{} tumbling window per segment, {} segments",
                humantime::format_duration(o.window),
                o.keys
            ),
            Workload::Filter => "stateless filter and projection".to_string(),
        };
        let query = match (o.queries, o.one_pipeline) {
            (1, false) => query,
            (n, false) => format!("{n} copies of the {query}, a pipeline each"),
            (n, true) => format!("{n} copies of the {query}, in one pipeline"),
        };
        let _ = writeln!(
            s,
            "\nbacklog drain: {} events ({:.0}/s produced), {} partitions; engine query: {query}\n\
             broker: {}; {} CPUs\n",
            self.backlog,
            self.backlog as f64 / self.produce_seconds.max(1e-3),
            o.partitions,
            self.broker,
            self.machine.cpus,
        );
        let _ = writeln!(
            s,
            "{:>3} {:>7} {:>10} {:>8} {:>11} {:>7} {:>7} {:>7}",
            "run", "reader", "records", "seconds", "records/s", "CPU µs", "cores", "threads"
        );
        for (i, r) in self.runs.iter().enumerate() {
            let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
            let _ = writeln!(
                s,
                "{:>3} {:>7} {:>10} {:>8.2} {:>11.0} {:>7} {:>7} {:>7}",
                i + 1,
                r.reader.name(),
                r.records,
                r.seconds,
                r.rate,
                opt(r.cpu_us_per_event),
                opt(r.cores),
                r.threads.map_or("-".to_string(), |t| t.to_string()),
            );
            if let Some((dlq, late)) = r.dlq_late.filter(|&(d, l)| d + l > 0) {
                let _ = writeln!(s, "{:>11} {dlq} records dead-lettered, {late} late", "");
            }
            if let Some(n) = r.unaccounted.filter(|&n| n > 0) {
                let _ = writeln!(
                    s,
                    "{:>11} {n} records of the backlog not in its output (held in its last batch)",
                    ""
                );
            }
            if !r.cpu_us_per_event_by_thread.is_empty() {
                let by = by_thread(&r.cpu_us_per_event_by_thread);
                let _ = writeln!(s, "{:>11} CPU µs/event by thread: {by}", "");
            }
        }
        if let (Some(e), Some(p)) = (
            self.median_rate(Reader::Engine),
            self.median_rate(Reader::Plain),
        ) {
            let _ = writeln!(
                s,
                "\nmedian drain rate: engine {e:.0}/s, plain consumer {p:.0}/s: the engine at {:.0} % \
                 of the plain consumer",
                100.0 * e / p.max(1e-9)
            );
        }
        if let (Some(e), Some(p)) = (
            self.median_rate(Reader::Engine),
            self.median_rate(Reader::Peer),
        ) {
            let _ = writeln!(
                s,
                "median drain rate: arkflow {p:.0}/s, the engine {:.2}× its rate",
                e / p.max(1e-9)
            );
        }
        if let (Some(e), Some(p)) = (
            self.median_cpu(Reader::Engine),
            self.median_cpu(Reader::Peer),
        ) {
            let _ = writeln!(
                s,
                "median CPU per event: engine {e:.2} µs, arkflow {p:.2} µs: arkflow spends {:.1}× \
                 the engine's",
                p / e.max(1e-9)
            );
        }
        s
    }
}

/// Runs `bench --backlog`: fills the input, then drains it `args.runs` times with each reader.
pub(super) async fn run(
    args: &BenchArgs,
    cluster: &Cluster,
    run_id: &str,
    backlog: u64,
) -> Result<()> {
    let brokers = cluster.brokers();
    let base = StepTopics::new(run_id, 0);
    cluster
        .create(std::slice::from_ref(&base.input), args.partitions)
        .await?;
    let produced_at = Instant::now();
    let schedule = load::Schedule::backlog(args.rate, backlog);
    let generator = load::Generator::start(&brokers, &base.input, schedule, args.keys, args.seed)?;
    while !generator.is_finished() {
        tokio::time::sleep(Duration::from_millis(200)).await;
        eprint!(
            "\rproducing the backlog: {} acknowledged",
            generator.acknowledged()
        );
    }
    let generated = generator.join()?;
    let produce_seconds = produced_at.elapsed().as_secs_f64();
    eprintln!(
        "\rproduced the backlog: {} events in {produce_seconds:.1} s",
        generated.acknowledged
    );
    if generated.failed > 0 {
        return Err(Error::Config(format!(
            "bench: the broker refused {} of the backlog's events",
            generated.failed
        )));
    }
    let expect = generated.acknowledged;
    let mut report = DrainReport {
        version: env!("CARGO_PKG_VERSION"),
        machine: Machine::this(),
        options: args.clone(),
        broker: broker_name(args),
        backlog: expect,
        produce_seconds,
        runs: Vec::new(),
    };
    for i in 0..args.runs {
        let peer = args.peer.map(|_| Reader::Peer);
        for reader in [Reader::Engine, Reader::Plain].into_iter().chain(peer) {
            // Each engine run writes to topics of its own (and its group is named after them).
            let mut topics = StepTopics::new(run_id, i + 1);
            topics.input = base.input.clone();
            let run = match reader {
                Reader::Engine => {
                    cluster.create(&topics.all()[1..], args.partitions).await?;
                    drain_engine(args, &brokers, &topics, expect).await?
                }
                Reader::Plain => drain_plain(args, &brokers, &topics.input, expect).await?,
                Reader::Peer => {
                    // Not the engine's output of the same run.
                    topics.output.push_str(".arkflow");
                    cluster
                        .create(std::slice::from_ref(&topics.output), args.partitions)
                        .await?;
                    peer::drain(args, &brokers, &topics, expect).await?
                }
            };
            eprintln!(
                "run {}: {:?} drained {} records in {:.2} s",
                i + 1,
                reader,
                run.records,
                run.seconds
            );
            report.runs.push(run);
        }
    }
    println!("{}", report.text());
    std::fs::create_dir_all(&args.out)
        .map_err(|e| Error::Config(format!("{}: {e}", args.out.display())))?;
    let path = args.out.join("drain.json");
    let json = serde_json::to_string_pretty(&report)
        .map_err(|e| Error::Config(format!("cannot encode the report: {e}")))?;
    std::fs::write(&path, json).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    println!("wrote {}", path.display());
    Ok(())
}

/// The engine drains the backlog; the child times it from its first record to the last.
async fn drain_engine(
    args: &BenchArgs,
    brokers: &str,
    topics: &StepTopics,
    expect: u64,
) -> Result<DrainRun> {
    let mut engine = child::EngineProcess::spawn(args, brokers, topics, Some(expect)).await?;
    let deadline = Instant::now() + args.drain;
    while engine.records_in() < expect {
        if engine.exited() {
            return Err(Error::Config(format!(
                "bench: the engine stopped after reading {} of {expect} records (its error is \
                 above)",
                engine.records_in()
            )));
        }
        if Instant::now() >= deadline {
            return Err(Error::Config(format!(
                "bench: the engine read {} of {expect} records within --drain {}",
                engine.records_in(),
                humantime::format_duration(args.drain)
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        engine.poll_progress();
    }
    let stats = engine.finish().await?;
    let records = stats.records_at_end.saturating_sub(stats.records_at_start);
    if stats.marked_seconds <= 0.0 || records == 0 {
        return Err(Error::Config(
            "bench: the engine's drain was not timed (no records between its marks)".into(),
        ));
    }
    let per_event = |secs: f64| secs * 1e6 / records as f64;
    Ok(DrainRun {
        reader: Reader::Engine,
        records,
        seconds: stats.marked_seconds,
        rate: records as f64 / stats.marked_seconds,
        cpu_us_per_event: Some(per_event(stats.cpu_seconds)),
        cores: Some(stats.cpu_seconds / stats.marked_seconds),
        cpu_us_per_event_by_thread: stats
            .cpu_by_thread
            .iter()
            .map(|(k, v)| (k.clone(), per_event(*v)))
            .collect(),
        dlq_late: Some((stats.dlq, stats.late)),
        unaccounted: None,
        threads: Some(stats.threads),
    })
}

/// A plain consumer drains the backlog, counting records without decoding them.
async fn drain_plain(
    args: &BenchArgs,
    brokers: &str,
    input: &str,
    expect: u64,
) -> Result<DrainRun> {
    // An empty recording interval: rows are counted, not parsed.
    let recording = load::Recording {
        from_us: 1,
        to_us: 0,
        kind: Workload::Filter,
        delay_ms: 0,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let receiver = load::Receiver::start(
        brokers,
        input,
        recording,
        &args.kafka_properties,
        stop.clone(),
    )?;
    let deadline = Instant::now() + args.drain;
    // A receiver that stopped on an error ends the wait; `join` returns its error.
    while receiver.received() < expect && Instant::now() < deadline && !receiver.is_finished() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let received = tokio::task::spawn_blocking(move || receiver.join())
        .await
        .map_err(|e| Error::Config(format!("the receiver task failed: {e}")))??;
    if received.rows < expect {
        return Err(Error::Config(format!(
            "bench: the plain consumer read {} of {expect} records within --drain {}",
            received.rows,
            humantime::format_duration(args.drain)
        )));
    }
    let (Some(first), Some(last)) = (received.first_at, received.last_at) else {
        return Err(Error::Config(
            "bench: the plain consumer read nothing".into(),
        ));
    };
    let seconds = last.duration_since(first).as_secs_f64().max(1e-6);
    // The first record opens the interval; the rest are counted in it, as for the engine.
    let records = received.rows - 1;
    Ok(DrainRun {
        reader: Reader::Plain,
        records,
        seconds,
        rate: records as f64 / seconds,
        cpu_us_per_event: None,
        cores: None,
        cpu_us_per_event_by_thread: Default::default(),
        dlq_late: None,
        unaccounted: None,
        threads: None,
    })
}
