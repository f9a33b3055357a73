//! Crash recovery with exactly-once output: the service, killed with SIGKILL at random points
//! and started again ten times while numbered events stream in, publishes every window of a
//! query exactly once, with the counts a batch computation over the same events gives.
//!
//! Processes: `urbanstream broker` (the broker keeps its data while the service dies),
//! `urbanstream serve` (checkpoints every second, `exactly_once = true`), and this test as the
//! producer of numbered events and the read_committed consumer of the output.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_urbanstream");
const PARTITIONS: i32 = 4;
const SEGMENTS: usize = 12;
const EVENTS: usize = 3_000;
/// Event-time spacing of the numbered events.
const STEP_MS: i64 = 100;
const WINDOW_MS: i64 = 10_000;
const OUTPUT: &str = "kill.counts";

/// A child process killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn broker(dir: &Path) -> anyhow::Result<(Process, String)> {
    let file = dir.join("broker.addr");
    let child = Command::new(BIN)
        .args([
            "broker",
            "--partitions",
            &PARTITIONS.to_string(),
            "--address-file",
        ])
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let process = Process(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(address) = std::fs::read_to_string(&file)
            && !address.trim().is_empty()
        {
            return Ok((process, address.trim().to_string()));
        }
        anyhow::ensure!(Instant::now() < deadline, "the broker did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn serve(config: &Path, log: &Path) -> anyhow::Result<Process> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    Ok(Process(
        Command::new(BIN)
            .args(["serve", "--config"])
            .arg(config)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?,
    ))
}

/// Polls `done` every 100 ms for up to a minute; fails with `what` otherwise.
fn wait_until(what: &str, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if done() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("{what}")
}

/// Waits until the query holds every input partition (the killed member's partitions come
/// back once its session has timed out), so that a kill lands while it processes.
fn wait_assigned(
    rt: &tokio::runtime::Runtime,
    client: &reqwest::Client,
    base: &str,
) -> anyhow::Result<()> {
    wait_until("the query never got its partitions back", || {
        let status: Option<Value> = rt.block_on(async {
            let r = client
                .get(format!("{base}/v1/queries/counts"))
                .send()
                .await
                .ok()?;
            r.json().await.ok()
        });
        status.is_some_and(|q| q["assigned_partitions"] == PARTITIONS)
    })
}

fn wait_live(
    rt: &tokio::runtime::Runtime,
    client: &reqwest::Client,
    base: &str,
) -> anyhow::Result<()> {
    wait_until("the service did not come up", || {
        rt.block_on(client.get(format!("{base}/livez")).send())
            .is_ok_and(|r| r.status().is_success())
    })
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The numbered event `seq`: its segment, its event time and the record.
fn event(t0: i64, seq: usize) -> (String, i64, Value) {
    let segment = format!("seg-{:02}", seq % SEGMENTS);
    let t = t0 + seq as i64 * STEP_MS;
    let record = json!({
        "camera_id": format!("cam-{seq}"),
        "segment_id": segment,
        "event_time": t,
        "kind": "detection",
        "vehicle_class": "motorbike",
        "speed_kmh": 30.0,
        "lane": seq as i64,
        "confidence": 0.9,
    });
    (segment, t, record)
}

/// A window's events, sum of sequence numbers, first and last sequence number.
type Counts = (i64, i64, i64, i64);

/// (segment, window start) → its counts, computed in batch.
type Windows = BTreeMap<(String, i64), Counts>;

fn expected(t0: i64, watermark: i64) -> Windows {
    let mut out = Windows::new();
    for seq in 0..EVENTS {
        let (segment, t, _) = event(t0, seq);
        let start = t.div_euclid(WINDOW_MS) * WINDOW_MS;
        if start + WINDOW_MS > watermark {
            continue;
        }
        let s = seq as i64;
        let w = out
            .entry((segment, start))
            .or_insert((0, 0, i64::MAX, i64::MIN));
        w.0 += 1;
        w.1 += s;
        w.2 = w.2.min(s);
        w.3 = w.3.max(s);
    }
    out
}

/// Every row of the output topic, read with read_committed, in order.
fn read_output(brokers: &str) -> anyhow::Result<Vec<Value>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "kill-test-reader")
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(OUTPUT), Duration::from_secs(10))?;
    let mut list = rdkafka::TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            let (_, high) = consumer.fetch_watermarks(OUTPUT, p.id(), Duration::from_secs(10))?;
            if high > 0 {
                list.add_partition_offset(OUTPUT, p.id(), rdkafka::Offset::Beginning)?;
                ends.insert(p.id(), high);
            }
        }
    }
    let mut rows = Vec::new();
    if ends.is_empty() {
        return Ok(rows);
    }
    consumer.assign(&list)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ends.is_empty() && Instant::now() < deadline {
        let Some(m) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = m?;
        if let Some(payload) = m.payload() {
            rows.push(serde_json::from_slice(payload)?);
        }
        if ends
            .get(&m.partition())
            .is_some_and(|e| m.offset() + 1 >= *e)
        {
            ends.remove(&m.partition());
        }
    }
    Ok(rows)
}

/// The windows in the output rows, with how many times each was published.
fn published(rows: &[Value]) -> BTreeMap<(String, i64), Vec<Counts>> {
    let mut out: BTreeMap<(String, i64), Vec<_>> = BTreeMap::new();
    for r in rows {
        let segment = r["segment_id"].as_str().unwrap_or_default().to_string();
        if segment == "flush" {
            continue;
        }
        let key = (segment, r["window_start"].as_i64().unwrap_or_default());
        out.entry(key).or_default().push((
            r["events"].as_i64().unwrap_or_default(),
            r["total"].as_i64().unwrap_or_default(),
            r["first"].as_i64().unwrap_or_default(),
            r["last"].as_i64().unwrap_or_default(),
        ));
    }
    out
}

const QUERY: &str = "CREATE EXTERNAL TABLE kill_counts (segment_id VARCHAR NOT NULL, \
     window_start TIMESTAMP NOT NULL, window_end TIMESTAMP NOT NULL, events BIGINT NOT NULL, \
     total BIGINT, first BIGINT, last BIGINT, revision INT NOT NULL, is_final BOOLEAN NOT NULL) \
     STORED AS KAFKA OPTIONS ('topic' 'kill.counts', 'key' 'segment_id'); \
     INSERT INTO kill_counts SELECT segment_id, window_start, window_end, count(*) AS events, \
     sum(CAST(lane AS BIGINT)) AS total, min(CAST(lane AS BIGINT)) AS first, \
     max(CAST(lane AS BIGINT)) AS last \
     FROM camera_events GROUP BY tumble(event_time, INTERVAL '10 seconds'), segment_id";

#[test]
fn a_sigkilled_service_publishes_every_window_exactly_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (_broker, brokers) = broker(dir.path())?;
    let port = free_port()?;
    let base = format!("http://127.0.0.1:{port}");
    let config = dir.path().join("urbanstream.toml");
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbrokers = \"{brokers}\"\ngroup_id = \"kill\"\n\
             [kafka.properties]\n\"session.timeout.ms\" = \"6000\"\n\
             [api]\nlisten = \"127.0.0.1:{port}\"\n\
             [catalog]\npath = \"{}\"\n\
             [queries]\ndefaults = false\n\
             [pipeline]\nlinger = \"5ms\"\n\
             [checkpoint]\ndir = \"{}\"\ninterval = \"1s\"\nexactly_once = true\ninstance = \"kill-0\"\n",
            dir.path().join("catalog.json").display(),
            dir.path().join("checkpoints").display(),
        ),
    )?;
    let log = dir.path().join("serve.log");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let _entered = rt.enter();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let mut service = serve(&config, &log)?;
    wait_live(&rt, &client, &base)?;
    let created = rt.block_on(
        client
            .post(format!("{base}/v1/queries"))
            .json(&json!({ "name": "counts", "sql": QUERY }))
            .send(),
    )?;
    let status = created.status();
    let body = rt.block_on(created.text())?;
    anyhow::ensure!(status.as_u16() == 201, "create: {status} {body}");

    // Numbered events over about 30 s, while the service is killed and started again.
    let t0 = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64
        - 3_600_000)
        .div_euclid(WINDOW_MS)
        * WINDOW_MS;
    let producer_brokers = brokers.clone();
    let producer = std::thread::spawn(move || -> anyhow::Result<()> {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &producer_brokers)
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .create()?;
        for seq in 0..EVENTS {
            let (segment, _, record) = event(t0, seq);
            let payload = serde_json::to_vec(&record)?;
            loop {
                match producer.send(
                    BaseRecord::to("city.camera.events")
                        .key(segment.as_bytes())
                        .payload(&payload),
                ) {
                    Ok(()) => break,
                    Err((_, _)) => {
                        producer.poll(Duration::from_millis(10));
                    }
                }
            }
            producer.poll(Duration::ZERO);
            if seq % 100 == 99 {
                std::thread::sleep(Duration::from_millis(1_000));
            }
        }
        // One event a minute later on every partition: every window of the numbered events
        // closes.
        let flush = t0 + EVENTS as i64 * STEP_MS + 60_000;
        for p in 0..PARTITIONS {
            let record = json!({
                "camera_id": "flush", "segment_id": "flush", "event_time": flush,
                "kind": "detection", "lane": 0, "confidence": 0.9,
            });
            let payload = serde_json::to_vec(&record)?;
            producer
                .send(
                    BaseRecord::to("city.camera.events")
                        .key("flush")
                        .partition(p)
                        .payload(&payload),
                )
                .map_err(|(e, _)| e)?;
        }
        producer.flush(Duration::from_secs(30))?;
        Ok(())
    });

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    for kill in 0..10 {
        wait_assigned(&rt, &client, &base)?;
        std::thread::sleep(Duration::from_millis(rng.random_range(200..2_500)));
        service.0.kill()?; // SIGKILL
        service.0.wait()?;
        eprintln!("kill {} done", kill + 1);
        service = serve(&config, &log)?;
        wait_live(&rt, &client, &base)?;
    }
    producer
        .join()
        .map_err(|_| anyhow::anyhow!("producer panicked"))??;

    // The windows closed by the flush events (watermark: flush time minus the 5 s delay).
    let watermark = t0 + EVENTS as i64 * STEP_MS + 60_000 - 5_000;
    let expected = expected(t0, watermark);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut windows = published(&read_output(&brokers)?);
    while windows.len() < expected.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(2));
        windows = published(&read_output(&brokers)?);
    }
    // A few more checkpoints, for any duplicate to show.
    std::thread::sleep(Duration::from_secs(3));
    windows = published(&read_output(&brokers)?);
    let mut log_text = String::new();
    std::fs::File::open(&log)?.read_to_string(&mut log_text)?;
    let restored = log_text.matches("state restored from checkpoint").count();
    let held_back = log_text.matches("will not be published again").count();

    let missing: Vec<_> = expected
        .keys()
        .filter(|k| !windows.contains_key(*k))
        .collect();
    let duplicated: Vec<_> = windows.iter().filter(|(_, v)| v.len() > 1).collect();
    let unexpected: Vec<_> = windows
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .collect();
    let wrong: Vec<_> = expected
        .iter()
        .filter(|(k, v)| windows.get(*k).is_some_and(|w| w[0] != **v))
        .collect();
    eprintln!(
        "windows expected {}, published {}, restores {restored}, restores that held back \
         published outputs {held_back}",
        expected.len(),
        windows.len()
    );
    assert!(missing.is_empty(), "missing windows: {missing:?}");
    assert!(
        duplicated.is_empty(),
        "windows published more than once: {duplicated:?}"
    );
    assert!(
        unexpected.is_empty(),
        "windows not in the input: {unexpected:?}"
    );
    assert!(wrong.is_empty(), "windows with wrong counts: {wrong:?}");
    // Most kills land while the query runs (some while the service is still starting): it
    // recovered from a checkpoint again and again, and held back what it had published.
    assert!(
        restored >= 5,
        "the service restored {restored} times:\n{log_text}"
    );
    Ok(())
}
