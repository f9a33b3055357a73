//! Commands that cannot work say so quickly: a broker that does not answer fails `demo`,
//! `simulate` and `tail` within seconds with a non-zero exit and a message naming the
//! address; flags out of range are refused by the parser before anything starts. And `tail`
//! with a short `--idle` reads a topic to its end.

use std::process::Command;
use std::time::{Duration, Instant};

/// An address nothing listens on (a port just freed on the loopback).
fn dead_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    drop(listener);
    format!("127.0.0.1:{port}")
}

fn run(args: &[&str]) -> (bool, String, Duration) {
    let start = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_urbanstream"))
        .args(args)
        .output()
        .expect("run urbanstream");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text, start.elapsed())
}

#[test]
fn an_unreachable_broker_fails_fast_naming_the_address() {
    let address = dead_address();
    for args in [
        vec!["demo", "--brokers", &address, "--duration", "30s"],
        vec!["simulate", "--brokers", &address, "--duration", "30s"],
        vec!["tail", "--brokers", &address, "--topic", "city.alerts"],
    ] {
        let (ok, text, took) = run(&args);
        assert!(!ok, "{args:?} succeeded:\n{text}");
        assert!(
            text.contains(&address) && text.contains("no Kafka broker answered"),
            "{args:?}: the message does not name {address}:\n{text}"
        );
        assert!(took < Duration::from_secs(15), "{args:?} took {took:?}");
    }
}

#[test]
fn out_of_range_flags_are_refused_by_the_parser() {
    for (args, says) in [
        (vec!["demo", "--rate", "0"], "not above 0"),
        (vec!["demo", "--rate=-5"], "not above 0"),
        (vec!["demo", "--speedup", "0"], "not above 0"),
        (vec!["demo", "--partitions", "0"], "--partitions"),
        (vec!["demo", "--late-share", "2"], "not between 0 and 1"),
        (vec!["broker", "--partitions", "0"], "--partitions"),
    ] {
        let (ok, text, took) = run(&args);
        assert!(!ok, "{args:?} was accepted");
        assert!(text.contains(says), "{args:?}: {text}");
        assert!(took < Duration::from_secs(5), "{args:?} took {took:?}");
    }
}

#[test]
fn a_user_error_prints_its_message_and_no_backtrace() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = dir.path().join("urbanstream.toml");
    std::fs::write(&config, "[kafka]\nbrokers = 42\n").expect("write the configuration");
    let missing = dir.path().join("no-such-file.csv");
    let missing = missing.to_str().expect("a UTF-8 path");
    for args in [
        vec!["serve", "--config", config.to_str().expect("a UTF-8 path")],
        vec!["run", "--input", missing, "--query", "SELECT 1"],
    ] {
        let start = Instant::now();
        let output = Command::new(env!("CARGO_BIN_EXE_urbanstream"))
            .args(&args)
            .env("RUST_BACKTRACE", "1")
            .env("RUST_LIB_BACKTRACE", "1")
            .output()
            .expect("run urbanstream");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} succeeded");
        assert!(
            stderr.lines().any(|l| l.starts_with("error: ")),
            "{args:?}: {stderr}"
        );
        assert!(
            !stderr.to_lowercase().contains("backtrace") && !stderr.contains(" at /"),
            "{args:?} printed a backtrace:\n{stderr}"
        );
        assert!(start.elapsed() < Duration::from_secs(15));
    }
}

/// `tail --idle` counts from when its consumer holds the topic's partitions: joining the
/// group takes seconds on the embedded broker, and `--idle 2s` ended before the first record
/// with "0 records" on a topic of 300. `--details` shows times with their milliseconds.
#[test]
fn tail_reads_a_topic_to_its_end_however_short_the_idle_time() -> anyhow::Result<()> {
    use rdkafka::ClientConfig;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let broker = urbanstream::broker::EmbeddedBroker::start()?;
    let brokers = broker.bootstrap_servers();
    broker.create_topic("tail.me", 2)?;
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()?;
    for i in 0..300i64 {
        let value = format!("{{\"n\":{i},\"event_time\":{}}}", 1_767_225_600_123i64 + i);
        producer
            .send(BaseRecord::to("tail.me").key("k").payload(&value))
            .map_err(|(e, _)| e)?;
    }
    producer.flush(Duration::from_secs(10))?;
    let (ok, text, _) = run(&[
        "tail",
        "--brokers",
        &brokers,
        "--topic",
        "tail.me",
        "--idle",
        "2s",
        "--details",
        "--display-time-zone",
        "+07:00",
    ]);
    assert!(ok, "{text}");
    assert!(text.contains("300 records from tail.me"), "{text}");
    assert!(
        text.contains("\"2026-01-01 07:00:00.123 UTC+07:00\""),
        "the first record's time with its milliseconds:\n{}",
        &text[..text.len().min(2_000)]
    );
    Ok(())
}
