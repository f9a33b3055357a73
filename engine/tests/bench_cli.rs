//! `urbanstream bench` end to end on the embedded broker: a short run of each query prints the
//! latency table and writes a JSON report and an SVG plot whose figures hold together; a
//! backlog drain times both readers over the same backlog.

use std::process::Command;

fn bench(query: &str, dir: &std::path::Path) -> serde_json::Value {
    let output = Command::new(env!("CARGO_BIN_EXE_urbanstream"))
        .args([
            "--log",
            "warn",
            "bench",
            "--rate",
            "2000",
            "--duration",
            "3s",
        ])
        .args(["--warmup", "2s", "--keys", "50", "--query", query, "--out"])
        .arg(dir)
        .output()
        .expect("run urbanstream bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "bench --query {query} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for column in [
        "p50 ms", "p99 ms", "p99.9 ms", "max ms", "CPU µs", "RSS MiB",
    ] {
        assert!(stdout.contains(column), "no {column} in:\n{stdout}");
    }
    let svg = std::fs::read_to_string(dir.join("latency.svg")).expect("latency.svg");
    assert!(
        svg.starts_with("<svg") && svg.contains("end to end p99"),
        "{svg}"
    );
    let json = std::fs::read_to_string(dir.join("latency.json")).expect("latency.json");
    serde_json::from_str(&json).expect("report is JSON")
}

fn n(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn a_short_bench_of_each_query_reports_consistent_latencies() {
    let dir = tempfile::tempdir().expect("tempdir");

    // Stateless: every event due in the recorded 3 s comes out, one row each.
    let report = bench("filter", dir.path());
    let step = &report["steps"][0];
    assert_eq!(n(&step["offered_rate"]), 2000.0);
    assert_eq!(step["missing"], 0, "{step}");
    let e2e = &step["end_to_end"];
    assert!(n(&e2e["count"]) >= 6000.0, "{e2e}");
    assert!(n(&e2e["p50_us"]) > 0.0);
    assert!(n(&e2e["p50_us"]) <= n(&e2e["p99_us"]));
    assert!(n(&e2e["p99_us"]) <= n(&e2e["p999_us"]));
    assert!(n(&e2e["p999_us"]) <= n(&e2e["max_us"]));
    assert!(n(&step["engine_cpu_us_per_event"]) > 0.0, "{step}");
    assert!(n(&step["engine_peak_rss_bytes"]) > 1e6, "{step}");
    assert_eq!(step["engine_dlq_late"], serde_json::json!([0, 0]), "{step}");

    // Windowed: one row per segment seen and second; the engine's emit latency is recorded.
    let report = bench("window", dir.path());
    let step = &report["steps"][0];
    let rows = n(&step["end_to_end"]["count"]);
    // 50 segments at 2 000 events/s: every segment has events in every 1-second window.
    assert!((100.0..=200.0).contains(&rows), "{step}");
    assert!(n(&step["emit"]["count"]) > 0.0, "{step}");
    assert!(n(&step["emit"]["p99_us"]) <= n(&step["emit"]["max_us"]));
    assert_eq!(step["engine_dlq_late"], serde_json::json!([0, 0]), "{step}");
}

#[test]
fn a_backlog_drain_times_the_engine_and_a_plain_consumer_in_turn() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = Command::new(env!("CARGO_BIN_EXE_urbanstream"))
        .args([
            "--log",
            "warn",
            "bench",
            "--backlog",
            "30000",
            "--runs",
            "2",
        ])
        .args(["--keys", "50", "--query", "window", "--out"])
        .arg(dir.path())
        .output()
        .expect("run urbanstream bench --backlog");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "bench --backlog failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("median drain rate"), "{stdout}");
    let json = std::fs::read_to_string(dir.path().join("drain.json")).expect("drain.json");
    let report: serde_json::Value = serde_json::from_str(&json).expect("report is JSON");
    assert_eq!(report["backlog"], 30000, "{report}");
    let runs = report["runs"].as_array().expect("runs");
    let readers: Vec<&str> = runs.iter().map(|r| r["reader"].as_str().unwrap()).collect();
    assert_eq!(readers, ["engine", "plain", "engine", "plain"]);
    for run in runs {
        // Timed from the first record read (for the engine, its first micro-batch) to the
        // last of the backlog; what came before is not counted.
        let records = n(&run["records"]);
        assert!((15000.0..30000.0).contains(&records), "{run}");
        assert!(n(&run["seconds"]) > 0.0, "{run}");
        assert!(
            (n(&run["rate"]) - records / n(&run["seconds"])).abs() < 1.0,
            "{run}"
        );
        if run["reader"] == "engine" {
            assert!(n(&run["cpu_us_per_event"]) > 0.0, "{run}");
            assert_eq!(run["dlq_late"], serde_json::json!([0, 0]), "{run}");
        } else {
            assert!(run["cpu_us_per_event"].is_null(), "{run}");
        }
    }
}
