//! The bench report: text table, JSON and an SVG plot of latency against offered rate.

use std::fmt::Write as _;
use std::path::Path;

use hdrhistogram::Histogram;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use super::child::EngineStats;
use super::load::{Generated, Received, Recording, Schedule};
use super::{BenchArgs, ConsumerKind, Workload};
use crate::error::{Error, Result};

/// A plotted series: name, colour, (rate, latency ms) points.
type Series = (&'static str, RGBColor, Vec<(f64, f64)>);

/// Latency percentiles, µs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Values recorded.
    pub count: u64,
    /// Mean.
    pub mean_us: f64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest.
    pub max_us: u64,
}

impl Percentiles {
    /// The percentiles of `h` (all zero when empty).
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            mean_us: h.mean(),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

/// The result at one offered rate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepReport {
    /// Offered rate, events/s.
    pub offered_rate: u64,
    /// Events the broker acknowledged per second of generation.
    pub produced_rate: f64,
    /// How far the generator fell behind its schedule at worst, ms.
    pub generator_max_behind_ms: f64,
    /// Events the broker refused.
    pub produce_failures: u64,
    /// Each event's due time → its acknowledgement by the broker (all events of the run), µs:
    /// a delay that shows here is in the generator's producer or the broker's write, before
    /// any reader could see the event.
    #[serde(default)]
    pub acknowledged: Percentiles,
    /// The longest a record waited in the generator's producer queue, ms (librdkafka's
    /// `int_latency`).
    #[serde(default)]
    pub producer_queued_max_ms: f64,
    /// The longest a produce request waited to be sent, ms (`outbuf_latency`).
    #[serde(default)]
    pub producer_unsent_max_ms: f64,
    /// The longest produce request round trip to the broker, ms (`rtt`).
    #[serde(default)]
    pub produce_round_trip_max_ms: f64,
    /// Input events the reader (engine or plain consumer) took per second while recording.
    pub read_rate: f64,
    /// Rows recorded per second of recording.
    pub output_rate: f64,
    /// End-to-end latency (event due → row received downstream), µs.
    pub end_to_end: Percentiles,
    /// Emit latency inside the engine (window close → acknowledged), µs.
    pub emit: Option<Percentiles>,
    /// The last hop: from each row's producer timestamp (whole ms) to its receipt, µs.
    pub last_hop: Percentiles,
    /// With `--probe-input`: a plain consumer of the input in the same run, each event's due
    /// time → received, µs.
    pub input_probe: Option<Percentiles>,
    /// With `--probe-input`: the probe's longest request round trip to the broker, ms.
    #[serde(default)]
    pub input_probe_round_trip_max_ms: Option<f64>,
    /// The downstream consumer's longest request round trip to the broker, ms.
    #[serde(default)]
    pub receiver_round_trip_max_ms: f64,
    /// Rows expected but not received (filter and plain runs, where each event gives a row).
    pub missing: Option<u64>,
    /// Output rows that could not be read.
    pub unreadable: u64,
    /// Engine CPU time per input event while recording, µs.
    pub engine_cpu_us_per_event: Option<f64>,
    /// Engine CPU use while recording, in cores.
    pub engine_cores: Option<f64>,
    /// Engine peak RSS, bytes.
    pub engine_peak_rss_bytes: Option<u64>,
    /// Records the engine dead-lettered or found late.
    pub engine_dlq_late: Option<(u64, u64)>,
    /// Engine CPU time per input event by kind of thread, µs.
    pub engine_cpu_us_per_event_by_thread: std::collections::BTreeMap<String, f64>,
    /// Whether this rate is sustainable: produced and read within 5 % of the offered rate,
    /// nothing missing, and p99 under the bound.
    pub passed: bool,
}

impl StepReport {
    /// Gathers one step's figures.
    pub fn new(
        args: &BenchArgs,
        schedule: &Schedule,
        recording: &Recording,
        generated: &Generated,
        received: &Received,
        engine: Option<&EngineStats>,
    ) -> Self {
        let rate = schedule.rate;
        let recorded_s = args.duration.as_secs_f64();
        let produced_rate =
            generated.acknowledged as f64 / generated.elapsed.as_secs_f64().max(1e-3);
        // The engine, with the input events it read between the marks.
        let engine_events =
            engine.map(|e| (e, e.records_at_end.saturating_sub(e.records_at_start)));
        let read_rate = match engine_events {
            Some((e, n)) if e.marked_seconds > 0.0 => n as f64 / e.marked_seconds,
            Some(_) => 0.0,
            None => received.recorded as f64 / recorded_s,
        };
        let each_event_a_row =
            args.consumer == ConsumerKind::Plain || args.query == Workload::Filter;
        let missing = each_event_a_row.then(|| {
            schedule
                .due_between(recording.from_us, recording.to_us)
                .saturating_sub(received.recorded)
        });
        let end_to_end = Percentiles::of(&received.latency);
        // CPU seconds → µs per event read between the marks.
        let per_event = engine_events
            .filter(|(_, n)| *n > 0)
            .map(|(e, n)| (e, 1e6 / n as f64));
        let engine_cpu_us_per_event = per_event.map(|(e, us)| e.cpu_seconds * us);
        let engine_cores = engine
            .filter(|e| e.marked_seconds > 0.0)
            .map(|e| e.cpu_seconds / e.marked_seconds);
        let within = |x: f64| x >= 0.95 * rate as f64;
        let passed = within(produced_rate)
            && within(read_rate)
            && generated.failed == 0
            && missing.unwrap_or(0) == 0
            && end_to_end.count > 0
            && end_to_end.p99_us <= args.p99_bound.as_micros() as u64;
        Self {
            offered_rate: rate,
            produced_rate,
            generator_max_behind_ms: generated.max_behind.as_secs_f64() * 1e3,
            produce_failures: generated.failed,
            acknowledged: Percentiles::of(&generated.acknowledged_latency),
            producer_queued_max_ms: generated.waits.queued_us as f64 / 1e3,
            producer_unsent_max_ms: generated.waits.unsent_us as f64 / 1e3,
            produce_round_trip_max_ms: generated.waits.round_trip_us as f64 / 1e3,
            read_rate,
            output_rate: received.recorded as f64 / recorded_s,
            end_to_end,
            emit: engine
                .filter(|_| args.query == Workload::Window)
                .map(|e| e.emit),
            last_hop: Percentiles::of(&received.last_hop),
            input_probe: None,
            input_probe_round_trip_max_ms: None,
            receiver_round_trip_max_ms: received.round_trip_max_us as f64 / 1e3,
            missing,
            unreadable: received.unreadable,
            engine_cpu_us_per_event,
            engine_cores,
            engine_peak_rss_bytes: engine.map(|e| e.peak_rss_bytes),
            engine_dlq_late: engine.map(|e| (e.dlq, e.late)),
            engine_cpu_us_per_event_by_thread: per_event
                .map(|(e, us)| {
                    e.cpu_by_thread
                        .iter()
                        .map(|(k, secs)| (k.clone(), secs * us))
                        .collect()
                })
                .unwrap_or_default(),
            passed,
        }
    }

    /// One line for the log while a sweep runs.
    pub fn summary(&self) -> String {
        format!(
            "{} ev/s offered: read {:.0}/s, p99 {} ms, p99.9 {} ms{}",
            self.offered_rate,
            self.read_rate,
            ms(self.end_to_end.p99_us),
            ms(self.end_to_end.p999_us),
            if self.passed { "" } else { "  (not sustained)" }
        )
    }
}

/// The broker a report names: the address given, or the embedded one.
pub fn broker_name(args: &BenchArgs) -> String {
    args.brokers
        .clone()
        .unwrap_or_else(|| "embedded (librdkafka mock cluster, in the bench process)".into())
}

/// CPU µs per event by kind of thread, largest first: `"name 1.23, other 0.45"`.
pub fn by_thread(us: &std::collections::BTreeMap<String, f64>) -> String {
    let mut by: Vec<_> = us.iter().collect();
    by.sort_by(|a, b| b.1.total_cmp(a.1));
    let parts: Vec<String> = by.iter().map(|(k, v)| format!("{k} {v:.2}")).collect();
    parts.join(", ")
}

/// The machine the bench ran on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    /// Logical CPUs.
    pub cpus: usize,
    /// CPU model, from /proc/cpuinfo.
    pub cpu_model: Option<String>,
    /// Operating system.
    pub os: String,
}

impl Machine {
    /// This machine: its CPUs, CPU model and operating system.
    pub fn this() -> Self {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        });
        Self {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
            os: std::env::consts::OS.into(),
        }
    }
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// urbanstream's version.
    pub version: &'static str,
    /// Where it ran.
    pub machine: Machine,
    /// The options.
    pub options: BenchArgs,
    /// Where the broker was.
    pub broker: String,
    /// One entry per rate.
    pub steps: Vec<StepReport>,
    /// The highest offered rate that passed (None if none did).
    pub max_sustainable_rate: Option<u64>,
}

impl Report {
    /// An empty report for `args`.
    pub fn new(args: &BenchArgs) -> Self {
        Self {
            version: env!("CARGO_PKG_VERSION"),
            machine: Machine::this(),
            options: args.clone(),
            broker: broker_name(args),
            steps: Vec::new(),
            max_sustainable_rate: None,
        }
    }

    /// Computes the summary fields once all steps are in.
    pub fn finish(&mut self) {
        self.max_sustainable_rate = self
            .steps
            .iter()
            .filter(|s| s.passed)
            .map(|s| s.offered_rate)
            .max();
    }

    /// The report as a text table.
    pub fn text(&self) -> String {
        let o = &self.options;
        let mut s = String::new();
        let what = match (o.consumer, o.query) {
            (ConsumerKind::Plain, _) => "plain consumer of the input (no engine)".to_string(),
            (ConsumerKind::Engine, Workload::Window) => format!(
                "engine: {} tumbling window per segment, {} segments, watermark delay {}, {}",
                humantime::format_duration(o.window),
                o.keys,
                humantime::format_duration(o.watermark_delay),
                if o.repartition {
                    "input key undeclared: repartitioned by segment through an internal topic"
                } else {
                    "input keyed by segment: one state per input partition"
                }
            ),
            (ConsumerKind::Engine, Workload::Filter) => {
                "engine: stateless filter and projection, one row per event".to_string()
            }
        };
        let _ = writeln!(
            s,
            "\n{what}\nbroker: {}; {} partitions; {} recorded per rate after {} warm-up; {} CPUs\n",
            self.broker,
            o.partitions,
            humantime::format_duration(o.duration),
            humantime::format_duration(o.warmup),
            self.machine.cpus,
        );
        let _ = writeln!(
            s,
            "{:>9} {:>9} {:>9} {:>9} | {:>8} {:>8} {:>8} {:>8} {:>8} | {:>8} {:>8} | {:>7} {:>6} {:>7} | ok",
            "offered/s",
            "sent/s",
            "read/s",
            "rows/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
            "emit p99",
            "emit max",
            "CPU µs",
            "cores",
            "RSS MiB"
        );
        for st in &self.steps {
            let e = &st.end_to_end;
            let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
            let _ = writeln!(
                s,
                "{:>9} {:>9.0} {:>9.0} {:>9.0} | {:>8} {:>8} {:>8} {:>8} {:>8} | {:>8} {:>8} | {:>7} {:>6} {:>7} | {}",
                st.offered_rate,
                st.produced_rate,
                st.read_rate,
                st.output_rate,
                ms(e.p50_us),
                ms(e.p90_us),
                ms(e.p99_us),
                ms(e.p999_us),
                ms(e.max_us),
                opt(st.emit.map(|p| ms(p.p99_us))),
                opt(st.emit.map(|p| ms(p.max_us))),
                opt(st.engine_cpu_us_per_event.map(|v| format!("{v:.2}"))),
                opt(st.engine_cores.map(|v| format!("{v:.2}"))),
                opt(st
                    .engine_peak_rss_bytes
                    .map(|v| format!("{:.0}", v as f64 / 1048576.0))),
                if st.passed { "yes" } else { "no" },
            );
            if let Some(m) = st.missing.filter(|m| *m > 0) {
                let _ = writeln!(s, "{:>9} {m} expected rows not received", "");
            }
            let _ = writeln!(
                s,
                "{:>9} last hop (producer timestamp → received): {}; longest fetch round trip {:.1} ms",
                "",
                p50_p99_max(&st.last_hop),
                st.receiver_round_trip_max_ms
            );
            if st.acknowledged.count > 0 {
                let _ = writeln!(
                    s,
                    "{:>9} generator (due → acknowledged by the broker): {}; longest waits: producer queue {:.1} ms, unsent {:.1} ms, produce round trip {:.1} ms",
                    "",
                    p50_p99_max(&st.acknowledged),
                    st.producer_queued_max_ms,
                    st.producer_unsent_max_ms,
                    st.produce_round_trip_max_ms
                );
            }
            if let Some(p) = &st.input_probe {
                let _ = writeln!(
                    s,
                    "{:>9} input probe (plain consumer of the input, due → received): p50 {} ms, p90 {} ms, p99 {} ms, max {} ms; longest fetch round trip {}",
                    "",
                    ms(p.p50_us),
                    ms(p.p90_us),
                    ms(p.p99_us),
                    ms(p.max_us),
                    opt(st
                        .input_probe_round_trip_max_ms
                        .map(|v| format!("{v:.1} ms")))
                );
            }
            if !st.engine_cpu_us_per_event_by_thread.is_empty() {
                let _ = writeln!(
                    s,
                    "{:>9} engine CPU µs/event by thread: {}",
                    "",
                    by_thread(&st.engine_cpu_us_per_event_by_thread)
                );
            }
            if st.unreadable > 0 {
                let _ = writeln!(s, "{:>9} {} output rows unreadable", "", st.unreadable);
            }
        }
        let _ = match (o.sweep, self.max_sustainable_rate) {
            (true, Some(r)) => writeln!(
                s,
                "\nhighest sustainable rate with p99 ≤ {}: {r} events/s",
                humantime::format_duration(o.p99_bound)
            ),
            (true, None) => writeln!(
                s,
                "\nno rate was sustainable with p99 ≤ {}",
                humantime::format_duration(o.p99_bound)
            ),
            (false, _) => Ok(()),
        };
        s
    }

    /// Writes the report as JSON.
    pub fn write_json(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self)
            .map_err(|e| Error::Config(format!("cannot encode the report: {e}")))?;
        std::fs::write(path, json).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// Plots end-to-end p50, p99, p99.9 and the engine's emit p99 against offered rate.
    pub fn write_svg(&self, path: &Path) -> Result<()> {
        let plot_error = |e: String| Error::Config(format!("{}: {e}", path.display()));
        let series: Vec<Series> = vec![
            (
                "end to end p50",
                BLUE,
                self.points(|s| Some(s.end_to_end.p50_us)),
            ),
            (
                "end to end p99",
                RED,
                self.points(|s| Some(s.end_to_end.p99_us)),
            ),
            (
                "end to end p99.9",
                MAGENTA,
                self.points(|s| Some(s.end_to_end.p999_us)),
            ),
            (
                "emit p99 (window close → acknowledged)",
                GREEN,
                self.points(|s| s.emit.map(|p| p.p99_us)),
            ),
        ];
        let all = series.iter().flat_map(|(_, _, p)| p.iter());
        let (mut x_max, mut y_min, mut y_max) = (1.0f64, f64::MAX, 0.0f64);
        for (x, y) in all {
            x_max = x_max.max(*x);
            y_min = y_min.min(*y);
            y_max = y_max.max(*y);
        }
        if y_max <= 0.0 {
            y_min = 0.1;
            y_max = 1.0;
        }
        let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_error(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "urbanstream bench: latency against offered rate ({})",
                    self.workload()
                ),
                ("sans-serif", 18),
            )
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(
                0f64..x_max * 1.1,
                ((y_min / 2.0).max(0.01)..y_max * 2.0).log_scale(),
            )
            .map_err(|e| plot_error(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("offered rate (events/s)")
            .y_desc("latency (ms, log scale)")
            .draw()
            .map_err(|e| plot_error(e.to_string()))?;
        for (name, color, points) in series {
            if points.is_empty() {
                continue;
            }
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(|e| plot_error(e.to_string()))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            chart
                .draw_series(
                    points
                        .into_iter()
                        .map(|p| Circle::new(p, 4, color.filled())),
                )
                .map_err(|e| plot_error(e.to_string()))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(|e| plot_error(e.to_string()))?;
        root.present().map_err(|e| plot_error(e.to_string()))
    }

    fn workload(&self) -> &'static str {
        match (self.options.consumer, self.options.query) {
            (ConsumerKind::Plain, _) => "plain consumer",
            (_, Workload::Window) => "tumbling window",
            (_, Workload::Filter) => "stateless filter",
        }
    }

    fn points(&self, value: impl Fn(&StepReport) -> Option<u64>) -> Vec<(f64, f64)> {
        self.steps
            .iter()
            .filter_map(|s| {
                value(s)
                    .filter(|_| s.end_to_end.count > 0)
                    .map(|v| (s.offered_rate as f64, v.max(1) as f64 / 1e3))
            })
            .collect()
    }
}

fn ms(us: u64) -> String {
    format!("{:.1}", us as f64 / 1e3)
}

/// "p50 … ms, p99 … ms, max … ms".
fn p50_p99_max(p: &Percentiles) -> String {
    format!(
        "p50 {} ms, p99 {} ms, max {} ms",
        ms(p.p50_us),
        ms(p.p99_us),
        ms(p.max_us)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut h = crate::pipeline::latency_histogram();
        for v in 1..=1000u64 {
            h.record(v * 1000).expect("in range");
        }
        let p = Percentiles::of(&h);
        assert_eq!(p.count, 1000);
        // Three significant digits: within 0.1 %.
        assert!((p.p50_us as f64 - 500_000.0).abs() <= 500.0, "{p:?}");
        assert!((p.p99_us as f64 - 990_000.0).abs() <= 990.0, "{p:?}");
        assert!((p.max_us as f64 - 1_000_000.0).abs() <= 1000.0, "{p:?}");
        assert_eq!(
            Percentiles::of(&crate::pipeline::latency_histogram()).count,
            0
        );
    }
}
