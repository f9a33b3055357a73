//! Days of the city through the demo: simulated at up to 3 600× from three days ago until the
//! present (every feed: cameras, detectors, air, parking, water levels and citizen reports;
//! over half a million records), then in real time. Indicators keep flowing all along, the
//! watermark moves forward without stalling while the clock catches up, and once the clock
//! reaches the present it tracks the wall clock.
//!
//! How fast the clock catches up depends on the machine (an unoptimised test build on two
//! cores decodes a few thousand records a second, below the 3 600× rate), so nothing here
//! measures speed: throughput is the benches' job. Three days take about two and a half
//! minutes on a slow machine, well inside the six the demo runs.

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const HANOI_OFFSET_MS: i64 = 7 * 3_600_000;

/// A demo line's `key=value` field.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[start..];
    // The watermark is a date and a time separated by a space.
    if key == "watermark" {
        return rest.get(..19);
    }
    rest.split_whitespace().next()
}

/// `YYYY-MM-DD HH:MM:SS` in Hanoi time, as epoch ms.
fn hanoi_ms(text: &str) -> Option<i64> {
    let t = humantime::parse_rfc3339_weak(text).ok()?;
    let ms = t.duration_since(UNIX_EPOCH).ok()?.as_millis() as i64;
    Some(ms - HANOI_OFFSET_MS)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[test]
fn a_simulated_week_keeps_indicators_flowing_and_the_watermark_tracking() -> anyhow::Result<()> {
    let started = now_ms();
    let output = Command::new(env!("CARGO_BIN_EXE_urbanstream"))
        .args([
            "demo",
            "--duration",
            "360s",
            "--speedup",
            "3600",
            "--rate",
            "400",
            "--start-ago",
            "3d",
            "--partitions",
            "2",
        ])
        .env("RUST_LOG", "warn")
        .output()?;
    let ended = now_ms();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the demo failed:\n{stdout}\n{stderr}"
    );
    // (seconds since start, indicators published, watermark ms)
    let mut points: Vec<(u64, u64, i64)> = Vec::new();
    for line in stdout.lines().filter(|l| l.starts_with("t=")) {
        let t = line[2..]
            .split('s')
            .next()
            .and_then(|s| s.trim().parse::<u64>().ok());
        let out = field(line, "indicators_out").and_then(|s| s.parse::<u64>().ok());
        let watermark = field(line, "watermark").and_then(hanoi_ms);
        if let (Some(t), Some(out), Some(w)) = (t, out, watermark) {
            points.push((t, out, w));
        }
    }
    assert!(points.len() >= 30, "too few progress lines:\n{stdout}");
    let days_ago = started - 3 * 86_400_000;
    let (_, _, first_watermark) = points[0];
    // The demo first produces the sensors' last 3 hours (`--air-history-hours`, default 3)
    // before its clock starts, so the first watermark may be up to 3 hours before it.
    assert!(
        first_watermark >= days_ago - 4 * 3_600_000 && first_watermark < days_ago + 86_400_000,
        "the first watermark is three days back: {}",
        stdout
    );
    for pair in points.windows(2) {
        assert!(pair[1].2 >= pair[0].2, "the watermark went back:\n{stdout}");
    }
    // Indicators flow all along: more in every 70 s (windows close every minute of
    // simulated time, which is a minute of wall-clock time once the present is reached).
    for span in points.windows(14) {
        assert!(
            span[13].1 > span[0].1,
            "no indicators from t={}s to t={}s:\n{stdout}",
            span[0].0,
            span[13].0
        );
    }
    // While the clock catches up (until the watermark is within an hour of the wall clock),
    // the watermark moves forward in every minute (15 s was within a slow micro-batch's reach
    // on a loaded machine): at 3 600× that is hours of simulated time,
    // so a query that stalls while its input delivers, or a watermark held back by an idle
    // stream, shows here (a query whose inputs have all gone quiet holds only its own).
    let catching_up: Vec<_> = points
        .iter()
        .take_while(|p| p.2 < started + (p.0 as i64) * 1_000 - 3_600_000)
        .collect();
    assert!(
        catching_up.len() >= 5,
        "the watermark was near the wall clock from the start:\n{stdout}"
    );
    for span in catching_up.windows(catching_up.len().min(13)) {
        let (t0, _, w0) = *span[0];
        let (t3, _, w3) = *span[span.len() - 1];
        assert!(
            w3 > w0,
            "the watermark stalled from t={t0}s to t={t3}s while catching up:\n{stdout}"
        );
    }
    // The clock reaches the present well before the end, and stays there.
    assert!(
        catching_up.len() < points.len() - 10,
        "the clock did not reach the present with a minute to spare:\n{stdout}"
    );
    // At the end the simulated clock is the wall clock, and the watermark tracks it.
    let (_, _, last) = *points.last().unwrap_or(&(0, 0, 0));
    let behind = Duration::from_millis((ended - last).max(0) as u64);
    assert!(
        behind < Duration::from_secs(15 * 60),
        "the watermark is {behind:?} behind the wall clock at the end:\n{stdout}"
    );
    assert!(
        last <= ended + 10 * 60_000,
        "a watermark in the future:\n{stdout}"
    );
    Ok(())
}
