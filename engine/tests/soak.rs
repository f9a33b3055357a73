//! A week of the city through the demo: simulated at up to 3 600× from seven days ago until
//! the present (about a million records; the unoptimised test build reaches the present in
//! about four minutes), then in real time. Indicators keep flowing all along, the watermark follows the
//! simulated clock without stalling, and once the clock reaches the present it tracks the
//! wall clock.

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
            "7d",
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
    let week_ago = started - 7 * 86_400_000;
    let (_, _, first_watermark) = points[0];
    // The demo first produces the sensors' last 3 hours (`--air-history-hours`, default 3)
    // before its clock starts, so the first watermark may be up to 3 hours before it.
    assert!(
        first_watermark >= week_ago - 4 * 3_600_000 && first_watermark < week_ago + 86_400_000,
        "the first watermark is a week back: {}",
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
    // While the clock catches up (a week in 168 s), the watermark moves by hours every 5 s.
    let catching_up: Vec<_> = points.iter().filter(|p| p.0 >= 10 && p.0 <= 150).collect();
    for pair in catching_up.windows(2) {
        let (t0, _, w0) = *pair[0];
        let (t1, _, w1) = *pair[1];
        let hours = (w1 - w0) as f64 / 3_600_000.0;
        let seconds = (t1 - t0) as f64;
        assert!(
            hours >= 0.4 * seconds,
            "the watermark lags the simulated clock between t={t0}s and t={t1}s \
             ({hours:.1} h in {seconds} s):\n{stdout}"
        );
    }
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
