//! Cli: the `urbanstream` command line.
//!
//! `urbanstream` with no arguments runs [`demo`]: an embedded broker, the simulated city, the
//! pipeline and a live terminal view. `simulate` produces simulated city data into any Kafka;
//! `replay` produces a file of real data; `broker` runs the embedded broker on its own.

pub mod demo;
pub mod replay;
pub mod run;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use rdkafka::config::ClientConfig;
use rdkafka::producer::FutureProducer;

use crate::broker::{EmbeddedBroker, create_topics};
use crate::error::{Error, Result};
use crate::reference::ReferenceData;
use crate::signals::stop_on_signal;
use crate::simulate::{CitySimulator, ProducerStats, SimConfig, SimTopic, SimTopics, run_producer};
use crate::topics::Topics;

/// urbanstream: a stream processing engine for a city's sensor and camera feeds.
///
/// Run with no arguments to see the whole pipeline work on an embedded Kafka broker with a
/// simulated Hanoi.
#[derive(Debug, Parser)]
#[command(name = "urbanstream", version, about, long_about = None)]
pub struct Cli {
    /// Log filter (tracing syntax), e.g. `info` or `urbanstream=debug`.
    #[arg(long, global = true, env = "URBANSTREAM_LOG")]
    pub log: Option<String>,
    /// Log format (default: plain; `serve` takes it from `[log] format`).
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    /// What to run (default: demo).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole pipeline on an embedded broker with a simulated city and a live view.
    ///
    /// Example: `urbanstream demo --duration 20s`
    Demo(DemoArgs),
    /// Run as a service beside Kafka: the built-in queries and every registered query, the
    /// REST API, /livez, /readyz and /metrics. Stops gracefully on SIGTERM or Ctrl-C.
    ///
    /// Configuration: the built-in defaults (engine/default.toml), then --config FILE, then
    /// URBANSTREAM__<SECTION>__<KEY> environment variables.
    ///
    /// Example: `URBANSTREAM__KAFKA__BROKERS=localhost:9092 urbanstream serve` or
    /// `urbanstream serve --config /etc/urbanstream/urbanstream.toml`
    Serve(ServeArgs),
    /// Register, inspect and control the queries of a running service through its API.
    ///
    /// Example: `urbanstream query list` or
    /// `urbanstream query add busy_segments --file busy.sql --server http://10.0.0.5:8080`
    Query(crate::service::client::QueryArgs),
    /// List the tables SQL can read, and read or replace a running service's reference
    /// tables (sensors with their reporting interval, stations, cameras, detectors, segments,
    /// wards, or tables of your own) without restarting its queries.
    ///
    /// Example: `urbanstream table list` or
    /// `urbanstream table replace sensors --file sensors.csv`
    Table(crate::service::client::TableArgs),
    /// An interactive SQL shell against a running service: SHOW TABLES, DESCRIBE, EXPLAIN,
    /// previews of queries, CREATE QUERY; multi-line statements ending with ';', history.
    ///
    /// Example: `urbanstream sql --server http://127.0.0.1:8080`
    Sql(crate::service::shell::ShellArgs),
    /// Produce simulated city traffic, detector and air data into a Kafka cluster.
    ///
    /// Example: `urbanstream simulate --brokers localhost:9092 --rate 5000 --speedup 60`
    Simulate(SimulateArgs),
    /// Produce a CSV, JSON-lines or Parquet file into a topic as JSON records, in event-time
    /// order, as fast as the broker takes them or paced by event time, with progress and a
    /// summary.
    ///
    /// Example: `urbanstream replay --brokers localhost:9092 --file hanoi_pm25.csv \
    /// --topic city.air.readings --rename station=sensor_id --time event_time \
    /// --time-zone +07:00 --key ward_id`
    Replay(replay::ReplayArgs),
    /// Run a stream query over a CSV, JSON-lines or Parquet file, offline, without Kafka: the file's
    /// rows are the stream's records (validated by its schema), every window closes at the
    /// end of the file; prints the first output rows and what was rejected or late.
    ///
    /// Example: `urbanstream run --query busy.sql --input detections.csv \
    /// --rename time=event_time --time-zone +07:00`
    Run(run::RunArgs),
    /// Print the records of a topic as they arrive (values, one per line), from the beginning
    /// or from the end.
    ///
    /// Example: `urbanstream tail --brokers localhost:9092 --topic city.indicators.congestion --max 5`
    Tail(TailArgs),
    /// Run the embedded Kafka-protocol broker in this process and print its address.
    ///
    /// Example: `urbanstream broker --partitions 4`
    Broker(BrokerArgs),
    /// Evaluate the anomaly detectors and sensor-health checks on labelled series: precision,
    /// recall and detection delay per detector.
    ///
    /// Example: `urbanstream evaluate` (the built-in set) or
    /// `urbanstream evaluate --data labelled.csv --json report.json`
    Evaluate(EvaluateArgs),
    /// Measure end-to-end latency through Kafka at a fixed offered rate (open loop, corrected
    /// for coordinated omission): p50/p90/p99/p99.9/max, rates, engine CPU per event and peak
    /// RSS, as text, JSON and an SVG plot; `--sweep` finds the highest sustainable rate.
    ///
    /// Example: `urbanstream bench --rate 50000 --duration 30s` or
    /// `urbanstream bench --sweep --rate 10000 --duration 10s --p99-bound 50ms`
    Bench(crate::bench::BenchArgs),
    /// The engine side of `bench`, in its own process (started by `bench`, not by hand).
    #[command(hide = true)]
    BenchEngine(crate::bench::child::EngineArgs),
}

/// Options of `serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// A TOML file over the defaults (every key is listed, with its meaning, in the defaults:
    /// `urbanstream serve --print-defaults`).
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Print the built-in default configuration and exit.
    #[arg(long)]
    pub print_defaults: bool,
}

/// Options of `evaluate`.
#[derive(Debug, Clone, Args)]
pub struct EvaluateArgs {
    /// A labelled CSV (`series,timestamp,value,label`, or `timestamp,value,label` for one
    /// series named after the file; label 1 inside an anomaly) instead of the built-in set.
    /// Columns are found by the header's names where it names them, by position otherwise;
    /// timestamps are RFC 3339 (with an offset, or UTC) or numbers in `--time-unit`.
    #[arg(long)]
    pub data: Option<std::path::PathBuf>,
    /// With `--data`: the unit of numeric timestamps, `ms` (epoch milliseconds) or `s`.
    #[arg(long, default_value = "ms", value_parser = ["ms", "s"])]
    pub time_unit: String,
    /// Seed of the built-in set.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Simulated days of the city simulator's detector and air readings added to the built-in
    /// set, labelled with the incidents and sensor faults it injected (0: none).
    #[arg(long, default_value_t = 3)]
    pub simulated_days: u32,
    /// How long after a labelled window's end an alert still counts as finding it.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "30m")]
    pub tolerance: Duration,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// Also write every reading as each detector scored it, as CSV
    /// (`series,timestamp,value,label,detector,score,alert`): for the built-in set or
    /// `--data`.
    #[arg(long, conflicts_with_all = ["skab", "alerts"])]
    pub scores: Option<std::path::PathBuf>,
    /// UTC offset of the series' local days, for the detectors' daily profiles, as the SQL
    /// functions take it (e.g. `+07:00`, `-05:00`). Default: `+07:00` for the built-in
    /// (Hanoi) set, `+00:00` (the SQL functions' default) for `--data`.
    #[arg(long, value_parser = utc_offset)]
    pub utc_offset: Option<i64>,
    /// SKAB's data folder (`valve1/`, `valve2/`, `other/`, `anomaly-free/`): score the
    /// default detector on it per sensor column and for the whole pump, as SKAB scores its
    /// leaderboard (NAB changepoint scores, outlier F1).
    #[arg(long, conflicts_with = "data")]
    pub skab: Option<std::path::PathBuf>,
    /// With `--skab`: the likelihood an alert is raised at (default 0.9999; the built-in set
    /// and `--data` use each detector's own levels).
    #[arg(long, requires = "skab")]
    pub threshold: Option<f64>,
    /// With `--skab`: the likelihood at or below which a raised alert clears (default 0.99).
    #[arg(long, requires = "skab")]
    pub clear: Option<f64>,
    /// Instead of the detectors one series at a time: run the city's default alert queries on
    /// traffic (the incident query's loop-detector statement, the congestion anomalies over
    /// cameras), as the service runs them, over `--simulated-days` of the simulator with
    /// incidents and again without, and score their alerts against the incidents injected.
    #[arg(long, conflicts_with_all = ["data", "skab"])]
    pub alerts: bool,
}

/// A UTC offset `±HH:MM` (or `0`), in milliseconds.
fn utc_offset(text: &str) -> std::result::Result<i64, String> {
    text.parse::<crate::time::display::DisplayZone>()
        .map(|zone| zone.offset_ms())
}

/// A finite number above 0.
fn positive(text: &str) -> std::result::Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        Ok(_) => Err(format!("{text} is not above 0")),
        Err(e) => Err(format!("{text} is not a number ({e})")),
    }
}

/// A share from 0 to 1.
fn share(text: &str) -> std::result::Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        Ok(_) => Err(format!("{text} is not between 0 and 1")),
        Err(e) => Err(format!("{text} is not a number ({e})")),
    }
}

/// Options shared by everything that simulates the city.
#[derive(Debug, Clone, Args)]
pub struct SimArgs {
    /// Mean camera detections per wall-clock second (follows the daily traffic profile);
    /// above 0.
    #[arg(long, default_value_t = 2000.0, value_parser = positive)]
    pub rate: f64,
    /// Simulated seconds per wall-clock second; above 0. Simulated time never runs ahead of
    /// the wall clock: once it reaches the present it runs in real time.
    #[arg(long, default_value_t = 60.0, value_parser = positive)]
    pub speedup: f64,
    /// Random seed; the same seed gives the same events.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Share of malformed records (0 to 1).
    #[arg(long, default_value_t = 0.002, value_parser = share)]
    pub malformed_share: f64,
    /// Share of late camera events (1.5 to 5 minutes behind; 0 to 1).
    #[arg(long, default_value_t = 0.002, value_parser = share)]
    pub late_share: f64,
    /// Share of out-of-order camera events (up to 4 s behind; 0 to 1).
    #[arg(long, default_value_t = 0.05, value_parser = share)]
    pub out_of_order_share: f64,
    /// Hours of air readings produced at start from before the simulated clock, so the hourly
    /// AQI (NowCast needs 2 of the latest 3 hours) is published from the first minute.
    #[arg(long, default_value_t = 3)]
    pub air_history_hours: u32,
    /// Start the simulated clock this long before now (`7d`, `36h`) instead of at 06:30
    /// Hanoi time on the previous day: with `--speedup 3600`, `7d` runs a week in under three
    /// minutes before reaching the present.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub start_ago: Option<Duration>,
    /// A storm this long after the simulated clock starts: it floods the road gauges (flood
    /// warnings, flooded roads, citizens' reports of flooding) and drains in an hour or two.
    #[arg(long, default_value = "40m", value_parser = humantime::parse_duration)]
    pub storm_after: Duration,
    /// No storm (rain still comes now and then, about once a simulated day).
    #[arg(long)]
    pub no_storm: bool,
    /// Only the camera, detector and air feeds: no parking, water levels or citizens' reports.
    #[arg(long)]
    pub traffic_and_air_only: bool,
}

impl SimArgs {
    /// The simulator settings; the simulated clock starts at 06:30 Hanoi time on the previous
    /// day, so the morning rush hour comes within the first minutes at the default speed-up.
    pub fn sim_config(&self) -> SimConfig {
        let day = 86_400_000;
        let now = crate::pipeline::epoch_ms() + crate::simulate::HANOI_OFFSET_MS;
        let local_midnight = now.div_euclid(day) * day - day;
        let start_ms = match self.start_ago {
            // On a minute: detectors and sensors report on the minute.
            Some(ago) => {
                (crate::pipeline::epoch_ms()
                    - i64::try_from(ago.as_millis()).unwrap_or(i64::MAX / 2))
                .div_euclid(60_000)
                    * 60_000
            }
            None => local_midnight + 6 * 3_600_000 + 30 * 60_000 - crate::simulate::HANOI_OFFSET_MS,
        };
        SimConfig {
            seed: self.seed,
            detections_per_sim_second: self.rate / self.speedup.max(0.001),
            start_ms,
            malformed_share: self.malformed_share,
            late_share: self.late_share,
            out_of_order_share: self.out_of_order_share,
            air_history_hours: self.air_history_hours,
            // Every feed, and a storm (40 simulated minutes in by default), so that flood
            // warnings, flooded roads and the reports confirming them show within minutes.
            all_feeds: !self.traffic_and_air_only,
            storm_at_ms: (!self.no_storm).then(|| {
                start_ms + i64::try_from(self.storm_after.as_millis()).unwrap_or(i64::MAX / 2)
            }),
            ..SimConfig::default()
        }
    }
}

/// Options of `demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Stop after this long (e.g. `20s`, `5m`); default: until Ctrl-C.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Use this Kafka instead of the embedded broker (`host:port[,host:port]`).
    #[arg(long)]
    pub brokers: Option<String>,
    /// Partitions per topic when creating topics (1 to 1024).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(i32).range(1..=1024))]
    pub partitions: i32,
    /// Serve the web console and city map here (`127.0.0.1:0` picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: Option<std::net::SocketAddr>,
    /// Serve no web console.
    #[arg(long)]
    pub no_web: bool,
    /// Time zone the view, the summary and the web console show times in (a UTC offset such
    /// as +07:00, or UTC); the city's by default.
    #[arg(long, env = "URBANSTREAM_DISPLAY_TIME_ZONE", default_value = "+07:00")]
    pub display_time_zone: crate::time::display::DisplayZone,
    /// Simulation settings.
    #[command(flatten)]
    pub sim: SimArgs,
}

/// Options of `simulate`.
#[derive(Debug, Clone, Args)]
pub struct SimulateArgs {
    /// Kafka bootstrap servers.
    #[arg(long)]
    pub brokers: String,
    /// Stop after this long; default: until Ctrl-C.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Create the input topics first (with this many partitions, 1 to 1024) if they do not
    /// exist.
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=1024))]
    pub create_topics: Option<i32>,
    /// Simulation settings.
    #[command(flatten)]
    pub sim: SimArgs,
}

/// Options of `tail`.
#[derive(Debug, Clone, Args)]
pub struct TailArgs {
    /// Kafka bootstrap servers.
    #[arg(long)]
    pub brokers: String,
    /// The topic.
    #[arg(long)]
    pub topic: String,
    /// Stop after this many records.
    #[arg(long)]
    pub max: Option<u64>,
    /// Start at the end instead of the beginning.
    #[arg(long)]
    pub from_end: bool,
    /// Stop when nothing arrives for this long, counted from when the topic's partitions are
    /// held (joining takes seconds); default: wait until Ctrl-C.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub idle: Option<Duration>,
    /// Where the writer schemas of Avro records are (a schema registry's URL or the
    /// directory registry): Confluent-framed Avro records are printed as JSON.
    #[arg(long, default_value = "urbanstream-data/registry")]
    pub registry: String,
    /// Print each record's partition, offset, key and Kafka timestamp before it, and its
    /// times (epoch-millisecond fields such as `event_time`, `window_start`, `started_at`) in
    /// the display time zone.
    #[arg(long)]
    pub details: bool,
    /// Time zone of `--details` (a UTC offset such as +07:00, or UTC); the city's by default.
    #[arg(long, env = "URBANSTREAM_DISPLAY_TIME_ZONE", default_value = "+07:00")]
    pub display_time_zone: crate::time::display::DisplayZone,
}

/// Options of `broker`.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// Partitions of each of the city's topics, created at start (1 to 1024).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(i32).range(1..=1024))]
    pub partitions: i32,
    /// Also write the bootstrap address to this file (for scripts).
    #[arg(long)]
    pub address_file: Option<std::path::PathBuf>,
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> Result<()> {
    match cli.command.unwrap_or(Command::Demo(DemoArgs {
        duration: None,
        brokers: None,
        partitions: 4,
        listen: "127.0.0.1:8080".parse().ok(),
        no_web: false,
        display_time_zone: crate::time::display::DisplayZone::CITY,
        sim: SimArgs {
            rate: 2000.0,
            speedup: 60.0,
            seed: 42,
            malformed_share: 0.002,
            late_share: 0.002,
            out_of_order_share: 0.05,
            air_history_hours: 3,
            start_ago: None,
            storm_after: Duration::from_secs(40 * 60),
            no_storm: false,
            traffic_and_air_only: false,
        },
    })) {
        Command::Demo(args) => demo::run(args).await,
        Command::Serve(args) => {
            if args.print_defaults {
                print!("{}", crate::service::config::DEFAULT_TOML);
                return Ok(());
            }
            let config = crate::service::config::ServiceConfig::load(args.config.as_deref())?;
            crate::service::serve(config).await
        }
        Command::Query(args) => crate::service::client::run(args).await,
        Command::Table(args) => crate::service::client::run_table(args).await,
        Command::Sql(args) => crate::service::shell::run(args).await,
        Command::Simulate(args) => simulate(args).await,
        Command::Broker(args) => broker(args).await,
        Command::Tail(args) => tail(args).await,
        Command::Replay(args) => {
            let summary = replay::replay(&args).await?;
            let beyond = summary.beyond_embedded_limits();
            println!("produced {} records into {}", summary.produced, args.topic);
            if let Some((first, last)) = summary.span_ms {
                let utc = crate::time::display::DisplayZone::UTC;
                println!(
                    "  event time {} to {} UTC",
                    utc.format(first),
                    utc.format(last)
                );
            }
            if summary.skipped > 0 {
                let first = summary.first_skipped.unwrap_or_default();
                let why = crate::pipeline::offline::why_unreadable(&first, &args.time_zone)
                    .unwrap_or_else(|| "see --time-unit and --time-zone".into());
                println!(
                    "  {} rows without a readable event time were not produced (the first: \
                     {first:?}; {why})",
                    summary.skipped,
                );
            }
            if summary.unfit > 0 {
                println!(
                    "  {} rows do not fit the schema and were not produced (the first: {})",
                    summary.unfit,
                    summary.first_unfit.unwrap_or_default()
                );
            }
            if summary.too_large > 0 {
                println!(
                    "  {} rows are larger than a record may be (message.max.bytes, 1 MB) and were \
                     not produced (the first: {})",
                    summary.too_large,
                    summary.first_too_large.unwrap_or_default()
                );
            }
            if summary.malformed.lines > 0 {
                println!(
                    "  {} lines of the file cannot be a row and were not produced (the first: \
                     {})",
                    summary.malformed.lines,
                    summary.malformed.first.unwrap_or_default()
                );
            }
            if !beyond.is_empty() {
                let partitions: Vec<String> = beyond
                    .iter()
                    .map(|(p, records, bytes, start)| {
                        format!(
                            "partition {p}: {records} records, {:.1} MiB; it now begins at \
                             offset {start}",
                            *bytes as f64 / (1 << 20) as f64
                        )
                    })
                    .collect();
                println!(
                    "  note: the embedded broker dropped the oldest records of {} ({}): {}",
                    args.topic,
                    partitions.join("; "),
                    crate::broker::LIMITS
                );
            }
            if summary.produced == 0 {
                return Err(Error::Config(format!(
                    "nothing from {} was produced",
                    args.file.display()
                )));
            }
            Ok(())
        }
        Command::Evaluate(args) => evaluate(args).await,
        Command::Run(args) => {
            let summary = run::run_file(&args).await?;
            print!("{}", run::report(&summary, &args.time_zone)?);
            Ok(())
        }
        Command::Bench(args) => crate::bench::run(args).await,
        Command::BenchEngine(args) => crate::bench::child::run(args).await,
    }
}

/// Writes `reports` as JSON to `path`, if one was given.
fn write_json(path: Option<&std::path::Path>, reports: &impl serde::Serialize) -> Result<()> {
    let Some(path) = path else {
        return Ok(());
    };
    let json = serde_json::to_string_pretty(reports)
        .map_err(|e| crate::error::Error::Config(e.to_string()))?;
    std::fs::write(path, json)
        .map_err(|e| crate::error::Error::Config(format!("{}: {e}", path.display())))?;
    println!("\nwrote {}", path.display());
    Ok(())
}

async fn evaluate(args: EvaluateArgs) -> Result<()> {
    use crate::evaluate as eval;
    if args.skab.is_none() && (args.threshold.is_some() || args.clear.is_some()) {
        return Err(crate::error::Error::Config(
            "--threshold and --clear apply to --skab: the built-in set and --data use each \
             detector's own levels"
                .into(),
        ));
    }
    let threshold = args
        .threshold
        .unwrap_or(urbanstream_operators::detect::Calibrator::DEFAULT_THRESHOLD);
    let clear = args.clear.unwrap_or(0.99);
    if !(0.0..=1.0).contains(&threshold) || !(0.0..=threshold).contains(&clear) {
        return Err(crate::error::Error::Config(format!(
            "--threshold {threshold} and --clear {clear} must be likelihoods with clear ≤ threshold (e.g. --threshold 0.9999 --clear 0.99)"
        )));
    }
    if args.alerts {
        let days = args.simulated_days.max(1);
        let tolerance = args.tolerance.as_millis() as i64;
        let mut reports = Vec::new();
        for statement in [
            eval::alerts::Statement::Incidents,
            eval::alerts::Statement::Congestion,
        ] {
            for incidents_per_hour in [2.0, 0.0] {
                eprintln!(
                    "running {} over {days} simulated days, {incidents_per_hour} incidents an hour…",
                    statement.name()
                );
                reports.push(
                    eval::alerts::evaluate(
                        statement,
                        args.seed,
                        days,
                        incidents_per_hour,
                        tolerance,
                    )
                    .await?,
                );
            }
        }
        println!(
            "default alert queries over the simulator's days (seed {}), tolerance {}\n",
            args.seed,
            humantime::format_duration(args.tolerance)
        );
        print!("{}", eval::alerts::table(&reports));
        return write_json(args.json.as_deref(), &reports);
    }
    if let Some(dir) = &args.skab {
        let (experiments, free) = eval::skab::load(dir)?;
        let rows: usize = experiments.iter().map(|e| e.times.len()).sum();
        println!(
            "SKAB at {}: {} experiments, {rows} rows{}\n",
            dir.display(),
            experiments.len(),
            free.as_ref().map_or(String::new(), |f| format!(
                ", anomaly-free run of {} rows",
                f.times.len()
            ))
        );
        let reports = eval::skab::evaluate(&experiments, free.as_ref(), threshold, clear)?;
        print!("{}", eval::skab::table(&reports, threshold, clear));
        return write_json(args.json.as_deref(), &reports);
    }
    let (set, source) = match &args.data {
        Some(path) => (
            eval::from_csv_in(path, if args.time_unit == "s" { 1_000 } else { 1 })?,
            path.display().to_string(),
        ),
        None => {
            let mut set = eval::builtin(args.seed);
            if args.simulated_days > 0 {
                eprintln!("simulating {} days of the city…", args.simulated_days);
                set.extend(eval::simulated(args.seed, args.simulated_days * 24)?);
            }
            (
                set,
                format!(
                    "built-in labelled set (synthetic cases + {} simulated days), seed {}",
                    args.simulated_days, args.seed
                ),
            )
        }
    };
    let points: usize = set.iter().map(|s| s.times.len()).sum();
    let windows: usize = set.iter().map(|s| s.windows.len()).sum();
    println!(
        "{source}: {} series, {points} readings, {windows} labelled windows; tolerance {}\n",
        set.len(),
        humantime::format_duration(args.tolerance)
    );
    let offset = args.utc_offset.unwrap_or(if args.data.is_some() {
        0
    } else {
        eval::HANOI_UTC_OFFSET_MS
    });
    let reports = eval::evaluate_all(&set, args.tolerance.as_millis() as i64, offset)?;
    print!("{}", eval::table(&reports));
    write_json(args.json.as_deref(), &reports)?;
    if let Some(path) = &args.scores {
        let file = std::fs::File::create(path)
            .map_err(|e| crate::error::Error::Config(format!("{}: {e}", path.display())))?;
        let mut out = std::io::BufWriter::new(file);
        let rows = eval::write_scores(&set, offset, &mut out)?;
        std::io::Write::flush(&mut out)
            .map_err(|e| crate::error::Error::Config(format!("{}: {e}", path.display())))?;
        println!("wrote {rows} scored readings to {}", path.display());
    }
    Ok(())
}

/// A producer for simulated data.
pub fn sim_producer(brokers: &str) -> Result<FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .set("enable.idempotence", "true")
        .create()?)
}

async fn simulate(args: SimulateArgs) -> Result<()> {
    crate::broker::check_reachable(&args.brokers).await?;
    let topics = SimTopics::city()?;
    if let Some(partitions) = args.create_topics {
        let wanted: Vec<_> = SimTopic::ALL
            .iter()
            .map(|&feed| (topics.topic(feed).to_string(), partitions))
            .collect();
        create_topics(&args.brokers, &wanted).await?;
    }
    let reference = Arc::new(ReferenceData::embedded()?);
    let simulator = CitySimulator::new(args.sim.sim_config(), reference);
    let stop = Arc::new(AtomicBool::new(false));
    stop_on_signal(stop.clone());
    if let Some(d) = args.duration {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            stop.store(true, Ordering::Relaxed);
        });
    }
    let stats = Arc::new(ProducerStats::default());
    let producer = sim_producer(&args.brokers)?;
    let mut task = tokio::spawn(run_producer(
        simulator,
        producer,
        topics,
        args.sim.speedup,
        stop.clone(),
        stats.clone(),
    ));
    let mut last = 0;
    // Progress every 5 s; the end (Ctrl-C, --duration, an error) is taken at once.
    let finished = loop {
        tokio::select! {
            done = &mut task => break done,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {
                let produced = stats.produced.load(Ordering::Relaxed);
                tracing::info!(
                    produced,
                    rate = (produced - last) / 5,
                    sim_time = %demo::hanoi_time(stats.sim_time_ms.load(Ordering::Relaxed)),
                    "simulating"
                );
                last = produced;
            }
        }
    };
    finished.map_err(|e| Error::Config(format!("simulator task failed: {e}")))??;
    let produced = stats.produced.load(Ordering::Relaxed);
    println!("produced {produced} records");
    if produced == 0 {
        return Err(Error::Config(format!(
            "no record was acknowledged by {}: check that the broker accepts writes to the \
             city's topics (or run longer)",
            args.brokers
        )));
    }
    Ok(())
}

async fn tail(args: TailArgs) -> Result<()> {
    crate::broker::check_reachable(&args.brokers).await?;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::Message;
    // No group: the consumer reads where it is told and commits nothing.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set(
            "group.id",
            format!("urbanstream-tail-{}", std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .set(
            "auto.offset.reset",
            if args.from_end { "latest" } else { "earliest" },
        )
        .create()?;
    consumer.subscribe(&[args.topic.as_str()])?;
    let stop = Arc::new(AtomicBool::new(false));
    stop_on_signal(stop.clone());
    let mut seen = 0;
    let mut last = std::time::Instant::now();
    // `--idle` counts from when the consumer holds the topic's partitions: joining its group
    // takes seconds, and a short idle time ended before the first record could come.
    let mut assigned = false;
    let started = std::time::Instant::now();
    let mut registry = None;
    while !stop.load(Ordering::Relaxed) && args.max.is_none_or(|m| seen < m) {
        if !assigned {
            assigned = consumer
                .assignment()
                .is_ok_and(|a| a.count() > 0)
                // A topic that does not exist gets none: the idle time counts from then on.
                || started.elapsed() >= Duration::from_secs(30);
            if assigned {
                last = std::time::Instant::now();
            }
        }
        if assigned && args.idle.is_some_and(|idle| last.elapsed() >= idle) {
            break;
        }
        let Ok(message) = tokio::time::timeout(Duration::from_millis(200), consumer.recv()).await
        else {
            continue;
        };
        let message = message?;
        let payload = message.payload().unwrap_or_default();
        let zone = args.display_time_zone;
        if args.details {
            println!(
                "partition {} offset {} key {} timestamp {}",
                message.partition(),
                message.offset(),
                message
                    .key()
                    .map_or_else(|| "-".into(), String::from_utf8_lossy),
                message.timestamp().to_millis().map_or_else(
                    || "-".to_string(),
                    |ms| format!("{} {zone}", zone.format_data(ms))
                ),
            );
        }
        // JSON never starts with a zero byte; Confluent-framed Avro always does.
        let json = if payload.first() == Some(&crate::decode::avro::MAGIC) {
            let registry = registry.get_or_insert(replay::registry_at(&args.registry)?);
            match crate::decode::avro::avro_to_json(registry, payload).await {
                Ok(json) => Some(json.to_string().into_bytes()),
                Err(e) => {
                    println!("(Avro record at offset {}: {e})", message.offset());
                    None
                }
            }
        } else {
            Some(payload.to_vec())
        };
        if let Some(json) = json {
            match args.details.then(|| show_times(&json, zone)).flatten() {
                Some(shown) => println!("{shown}"),
                None => println!("{}", String::from_utf8_lossy(&json)),
            }
        }
        seen += 1;
        last = std::time::Instant::now();
    }
    eprintln!("{seen} records from {}", args.topic);
    Ok(())
}

/// The JSON object `record` with its epoch-millisecond times (fields named `*_time`,
/// `*_at`, `window_start`, `window_end`, `*_ms`) as `YYYY-MM-DD HH:MM:SS UTC±hh:mm` in
/// `zone`; a JSON record's fields in their order and every other value as written (read into
/// a map of floats, `1234567890123456.1234` showed as `…456.0` and the fields came sorted; an
/// Avro record's come in its decoded JSON's order). `None` when it is no JSON object.
fn show_times(record: &[u8], zone: crate::time::display::DisplayZone) -> Option<String> {
    let fields = crate::decode::json_fields(record)?;
    let mut shown = String::from("{");
    for (i, (name, value)) in fields.iter().enumerate() {
        if i > 0 {
            shown.push(',');
        }
        shown.push_str(&serde_json::to_string(name).ok()?);
        shown.push(':');
        let is_time = name.ends_with("_time")
            || name.ends_with("_at")
            || name.ends_with("_ms")
            || name == "window_start"
            || name == "window_end";
        // A time of data keeps its milliseconds (`07:00:00.123`; they were cut off).
        match value.get().parse::<i64>().ok().filter(|_| is_time) {
            Some(ms) => shown.push_str(
                &serde_json::to_string(&format!("{} {zone}", zone.format_data(ms))).ok()?,
            ),
            None => shown.push_str(value.get()),
        }
    }
    shown.push('}');
    Some(shown)
}

async fn broker(args: BrokerArgs) -> Result<()> {
    let broker = EmbeddedBroker::start()?;
    for topic in Topics::default().all() {
        broker.create_topic(&topic, args.partitions)?;
    }
    println!("{}", broker.bootstrap_servers());
    if let Some(path) = &args.address_file {
        std::fs::write(path, format!("{}\n", broker.bootstrap_servers()))
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    }
    eprintln!(
        "embedded broker listening on {} ({} partitions per city topic); Ctrl-C to stop\n\
         note: {}",
        broker.bootstrap_servers(),
        args.partitions,
        crate::broker::LIMITS
    );
    let stop = Arc::new(AtomicBool::new(false));
    stop_on_signal(stop.clone());
    while !stop.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn details_show_a_records_times_in_the_display_zone() {
        let written = r#"{"segment_id":"kim_ma_w","window_start":1767222000000,
            "event_time":1767222000000,"started_at":1767222060000,"vehicles":1767222000000,
            "name_time":"already text","dec":1234567890123456.1234}"#;
        let shown = super::show_times(written.as_bytes(), crate::time::display::DisplayZone::CITY)
            .expect("an object");
        // In the record's order, every other value as written.
        assert!(
            shown.starts_with(r#"{"segment_id":"kim_ma_w","window_start":"#)
                && shown.ends_with(r#","dec":1234567890123456.1234}"#),
            "{shown}"
        );
        let record: serde_json::Value = serde_json::from_str(&shown).expect("JSON");
        assert_eq!(record["window_start"], "2026-01-01 06:00:00 UTC+07:00");
        assert_eq!(record["event_time"], "2026-01-01 06:00:00 UTC+07:00");
        assert_eq!(record["started_at"], "2026-01-01 06:01:00 UTC+07:00");
        assert_eq!(
            record["vehicles"], 1_767_222_000_000_i64,
            "not a time field"
        );
        assert_eq!(record["name_time"], "already text");
    }

    use super::*;

    #[test]
    fn utc_offsets_are_read_as_the_sql_functions_take_them() {
        assert_eq!(utc_offset("+07:00"), Ok(7 * 3_600_000));
        assert_eq!(utc_offset("-05:30"), Ok(-(5 * 3_600_000 + 30 * 60_000)));
        assert_eq!(utc_offset("0"), Ok(0));
        assert!(utc_offset("7").is_err());
        assert!(utc_offset("+25:00").is_err());
    }
}
