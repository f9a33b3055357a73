//! What the process-level tests share: the embedded broker, the independent test broker and
//! the service as child processes, the numbered camera events they produce, and a read_committed reader of an
//! output topic.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde_json::{Value, json};

pub const BIN: &str = env!("CARGO_BIN_EXE_urbanstream");
pub const PARTITIONS: i32 = 4;
/// Road segments of `schemas/reference/segments.csv` the numbered events are spread over
/// (in several wards).
pub const SEGMENTS: [&str; 12] = [
    "truong_chinh_ntso",
    "truong_chinh_e",
    "nguyen_trai_ntso",
    "nguyen_trai_hd",
    "lang_ntso",
    "lang_cau_giay",
    "tay_son",
    "thai_ha_flyover",
    "chua_boc",
    "nguyen_chi_thanh",
    "kim_ma_w",
    "xuan_thuy",
];
/// Event-time spacing of the numbered events.
pub const STEP_MS: i64 = 100;
pub const WINDOW_MS: i64 = 10_000;

/// The independent Kafka-protocol broker of the real-broker tests (noida-db, installed by
/// `scripts/install-test-broker.sh`, which this runs when it is missing), on a free port
/// with its data under `dir`, and its address. `topics` are created with [`PARTITIONS`]
/// partitions (it creates no topic on first use; the service creates its outputs).
pub fn real_broker(dir: &Path, topics: &[&str]) -> anyhow::Result<(Process, String)> {
    real_broker_at(dir, "broker-data", free_port()?, topics)
}

/// [`real_broker`] on `port`, its data in `dir`/`data`.
pub fn real_broker_at(
    dir: &Path,
    data: &str,
    port: u16,
    topics: &[&str],
) -> anyhow::Result<(Process, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin = root.join("target/tools/noida-db/noida_db/noida-db");
    if !bin.exists() {
        let status = Command::new("bash")
            .arg(root.join("scripts/install-test-broker.sh"))
            .status()?;
        anyhow::ensure!(
            status.success() && bin.exists(),
            "the test broker could not be installed: run scripts/install-test-broker.sh"
        );
    }
    let log = std::fs::File::create(dir.join(format!("{data}.log")))?;
    let child = Command::new(&bin)
        .args([
            "start",
            "--only",
            "kafka",
            "--kafka-port",
            &port.to_string(),
            "--data-dir",
        ])
        .arg(dir.join(data))
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let process = Process(child);
    let address = format!("127.0.0.1:{port}");
    if let Ok(mut brokers) = TEST_BROKERS.lock() {
        brokers.insert(address.clone());
    }
    wait_until("the test broker did not start", || {
        std::net::TcpStream::connect(&address).is_ok()
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &address)
            .create()?;
        let new: Vec<NewTopic> = topics
            .iter()
            .map(|t| NewTopic::new(t, PARTITIONS, TopicReplication::Fixed(1)))
            .collect();
        for r in admin
            .create_topics(
                &new,
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await?
        {
            if let Err((topic, code)) = r {
                anyhow::bail!("creating {topic} on the test broker: {code}");
            }
        }
        anyhow::Ok(())
    })?;
    Ok((process, address))
}

/// Addresses of the brokers started by [`real_broker`]: a service on one reads back from the
/// log start (`checkpoint.read_back_from_log_start`), because its fetch responses list
/// aborted transactions that ended before the fetched offsets (shown by
/// `the_test_broker_lists_aborted_transactions_outside_the_fetched_range` in
/// `real_broker.rs`).
static TEST_BROKERS: std::sync::Mutex<std::collections::BTreeSet<String>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// An S3-protocol server (moto's, installed by `scripts/install-test-s3.sh`, which this runs
/// when it is missing) on a free port, its log in `dir`, with bucket `bucket` created; and its
/// endpoint URL.
pub fn s3_server(dir: &Path, bucket: &str) -> anyhow::Result<(Process, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let tools = root.join("target/tools/moto");
    if !tools.join("moto/server.py").exists() {
        let status = Command::new("bash")
            .arg(root.join("scripts/install-test-s3.sh"))
            .status()?;
        anyhow::ensure!(
            status.success() && tools.join("moto/server.py").exists(),
            "the test S3 server could not be installed: run scripts/install-test-s3.sh"
        );
    }
    let port = free_port()?;
    let log = std::fs::File::create(dir.join("s3.log"))?;
    let child = Command::new("python3")
        .args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .env("PYTHONPATH", &tools)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let process = Process(child);
    let endpoint = format!("http://127.0.0.1:{port}");
    let api = Api::new()?;
    let bucket_url = format!("{endpoint}/{bucket}");
    wait_until("the test S3 server did not start", || {
        api.rt
            .block_on(async { api.client.put(&bucket_url).send().await })
            .is_ok_and(|r| r.status().is_success())
    })?;
    Ok((process, endpoint))
}

/// One `urbanstream serve` process of a test: its configuration file, log and API address.
pub struct Member {
    pub config: std::path::PathBuf,
    pub log: std::path::PathBuf,
    pub base: String,
}

/// Writes the configuration of member `name` (files `<name>.*` in `dir`): on `brokers`, in
/// consumer group `group`, checkpoints under `checkpoints`, instance `<group>-<name>`, its
/// API on a free port.
pub fn member(
    dir: &Path,
    brokers: &str,
    group: &str,
    name: &str,
    checkpoints: &Path,
) -> anyhow::Result<Member> {
    let port = free_port()?;
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        service_config(
            brokers,
            group,
            port,
            &dir.join(format!("{name}.catalog.json")),
            checkpoints,
            &format!("{group}-{name}"),
        ),
    )?;
    Ok(Member {
        config,
        log: dir.join(format!("{name}.log")),
        base: format!("http://127.0.0.1:{port}"),
    })
}

/// A service of its own in `dir` (consumer group `group`) running [`counts_query`] into
/// `output`: the member, its process and an API client.
pub fn counting_service(
    dir: &Path,
    brokers: &str,
    group: &str,
    output: &str,
) -> anyhow::Result<(Member, Process, Api)> {
    query_service(dir, brokers, group, "counts", &counts_query(output))
}

/// A service of its own in `dir` (consumer group `group`) running `sql` registered as
/// `name`: the member, its process and an API client.
pub fn query_service(
    dir: &Path,
    brokers: &str,
    group: &str,
    name: &str,
    sql: &str,
) -> anyhow::Result<(Member, Process, Api)> {
    let m = member(dir, brokers, group, "0", &dir.join("checkpoints"))?;
    let (service, api) = start_query(&m, name, sql)?;
    Ok((m, service, api))
}

/// Starts member `m` and, once its API answers, creates query `name` running `sql`: its
/// process and an API client.
pub fn start_query(m: &Member, name: &str, sql: &str) -> anyhow::Result<(Process, Api)> {
    let api = Api::new()?;
    let service = serve(&m.config, &m.log)?;
    api.wait_live(&m.base)?;
    api.create(&m.base, name, sql)?;
    Ok((service, api))
}

/// Kills `service` with SIGKILL and starts member `m` again, once its API answers.
pub fn kill_and_restart(service: &mut Process, m: &Member, api: &Api) -> anyhow::Result<()> {
    service.0.kill()?; // SIGKILL
    service.0.wait()?;
    *service = serve(&m.config, &m.log)?;
    api.wait_live(&m.base)
}

/// A child process killed when dropped.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `urbanstream broker` with [`PARTITIONS`] partitions per topic, and its address.
pub fn broker(dir: &Path) -> anyhow::Result<(Process, String)> {
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

/// `urbanstream serve --config <config>`, its output appended to `log`.
pub fn serve(config: &Path, log: &Path) -> anyhow::Result<Process> {
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

/// A service configuration: exactly-once output, checkpoints every second in
/// `checkpoints`, a 6 s group session.
pub fn service_config(
    brokers: &str,
    group: &str,
    port: u16,
    catalog: &Path,
    checkpoints: &Path,
    instance: &str,
) -> String {
    let from_log_start = TEST_BROKERS.lock().is_ok_and(|b| b.contains(brokers));
    format!(
        "[kafka]\nbrokers = \"{brokers}\"\ngroup_id = \"{group}\"\n\
         [kafka.properties]\n\"session.timeout.ms\" = \"6000\"\n\
         [api]\nlisten = \"127.0.0.1:{port}\"\n\
         [catalog]\npath = \"{}\"\n\
         [queries]\ndefaults = false\n\
         [pipeline]\nlinger = \"5ms\"\n\
         [log]\nlevel = \"info,urbanstream::pipeline=debug\"\n[checkpoint]\ndir = \"{}\"\ninterval = \"1s\"\nexactly_once = true\ninstance = \"{instance}\"\n\
         read_back_from_log_start = {from_log_start}\n",
        catalog.display(),
        checkpoints.display(),
    )
}

/// Polls `done` every 100 ms for up to a minute; fails with `what` otherwise.
pub fn wait_until(what: &str, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if done() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    anyhow::bail!("{what}")
}

/// A service's HTTP API, driven from a test thread.
pub struct Api {
    pub rt: tokio::runtime::Runtime,
    pub client: reqwest::Client,
}

impl Api {
    pub fn new() -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let client = {
            let _entered = rt.enter();
            reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()?
        };
        Ok(Self { rt, client })
    }

    /// Waits until the service at `base` answers `/livez`.
    pub fn wait_live(&self, base: &str) -> anyhow::Result<()> {
        wait_until("the service did not come up", || {
            self.rt
                .block_on(async { self.client.get(format!("{base}/livez")).send().await })
                .is_ok_and(|r| r.status().is_success())
        })
    }

    /// Registers query `name`.
    pub fn create(&self, base: &str, name: &str, sql: &str) -> anyhow::Result<()> {
        let (status, body) = self.rt.block_on(async {
            let created = self
                .client
                .post(format!("{base}/v1/queries"))
                .json(&json!({ "name": name, "sql": sql }))
                .send()
                .await?;
            let status = created.status();
            anyhow::Ok((status, created.text().await?))
        })?;
        anyhow::ensure!(status.as_u16() == 201, "create {name}: {status} {body}");
        Ok(())
    }

    /// Query `name`'s status, if the service answers.
    pub fn status(&self, base: &str, name: &str) -> Option<Value> {
        self.rt.block_on(async {
            let r = self
                .client
                .get(format!("{base}/v1/queries/{name}"))
                .send()
                .await
                .ok()?;
            r.json().await.ok()
        })
    }

    /// The input partitions query `name` holds at `base` (0 when the service does not answer).
    pub fn assigned(&self, base: &str, name: &str) -> i64 {
        self.status(base, name)
            .and_then(|q| q["assigned_partitions"].as_i64())
            .unwrap_or(0)
    }
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The numbered event `seq`: its segment, its event time and the record (`lane` carries the
/// sequence number plus one).
pub fn event(t0: i64, seq: usize) -> (String, i64, Value) {
    let segment = SEGMENTS[seq % SEGMENTS.len()].to_string();
    let t = t0 + seq as i64 * STEP_MS;
    let record = json!({
        "camera_id": format!("cam-{seq}"),
        "segment_id": segment,
        "event_time": t,
        "kind": "detection",
        "vehicle_class": "motorbike",
        "speed_kmh": 30.0,
        // Lanes start at 1 (the schema's range); the queries take 1 off again.
        "lane": seq as i64 + 1,
        "confidence": 0.9,
    });
    (segment, t, record)
}

/// The start of the numbered events' first window: an hour ago, on a window boundary.
pub fn first_window() -> anyhow::Result<i64> {
    Ok((std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64
        - 3_600_000)
        .div_euclid(WINDOW_MS)
        * WINDOW_MS)
}

/// Produces `events` numbered events keyed by segment, 100 a second, then one event a minute
/// later on every partition (keyed `flush`), so that every window of the numbered ones closes.
pub fn produce(brokers: &str, t0: i64, events: usize) -> anyhow::Result<()> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()?;
    for seq in 0..events {
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
    producer.flush(Duration::from_secs(30))?;
    produce_flush(brokers, t0 + events as i64 * STEP_MS + 60_000)
}

/// One event at `t` on every partition (keyed `flush`): it closes every window before it.
pub fn produce_flush(brokers: &str, t: i64) -> anyhow::Result<()> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    for p in 0..PARTITIONS {
        let record = json!({
            "camera_id": "flush", "segment_id": "flush", "event_time": t,
            "kind": "detection", "lane": 1, "confidence": 0.9,
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
}

/// A window's events, sum of sequence numbers, first and last sequence number.
pub type Counts = (i64, i64, i64, i64);

/// (segment, window start) → its counts.
pub type Windows = BTreeMap<(String, i64), Counts>;

/// The 10 s windows per segment of the first `events` numbered events that end before
/// `watermark`, computed in batch.
pub fn expected(t0: i64, events: usize, watermark: i64) -> Windows {
    expected_by(t0, events, watermark, |segment| segment.to_string())
}

/// [`expected`], per `group(segment)` instead of per segment.
pub fn expected_by(
    t0: i64,
    events: usize,
    watermark: i64,
    group: impl Fn(&str) -> String,
) -> Windows {
    let mut out = Windows::new();
    for seq in 0..events {
        let (segment, t, _) = event(t0, seq);
        let segment = group(&segment);
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

/// The query counting the numbered events per segment and 10 s window into `topic`.
pub fn counts_query(topic: &str) -> String {
    format!(
        "CREATE EXTERNAL TABLE counts_out (segment_id VARCHAR NOT NULL, \
         window_start TIMESTAMP NOT NULL, window_end TIMESTAMP NOT NULL, events BIGINT NOT NULL, \
         total BIGINT, first BIGINT, last BIGINT, revision INT NOT NULL, is_final BOOLEAN NOT NULL) \
         STORED AS KAFKA OPTIONS ('topic' '{topic}', 'key' 'segment_id'); \
         INSERT INTO counts_out SELECT segment_id, window_start, window_end, count(*) AS events, \
         sum(CAST(lane AS BIGINT) - 1) AS total, min(CAST(lane AS BIGINT) - 1) AS first, \
         max(CAST(lane AS BIGINT) - 1) AS last \
         FROM camera_events GROUP BY tumble(event_time, INTERVAL '10 seconds'), segment_id"
    )
}

/// The query counting the numbered events per ward (of the segment, from the reference
/// table) and 10 s into `topic`: groups that span input partitions.
pub fn ward_query(topic: &str) -> String {
    format!(
        "CREATE EXTERNAL TABLE ward_out (ward_id VARCHAR, \
         window_start TIMESTAMP NOT NULL, window_end TIMESTAMP NOT NULL, events BIGINT NOT NULL, \
         total BIGINT, first BIGINT, last BIGINT, revision INT NOT NULL, is_final BOOLEAN NOT NULL) \
         STORED AS KAFKA OPTIONS ('topic' '{topic}', 'key' 'ward_id'); \
         INSERT INTO ward_out SELECT s.ward_id, window_start, window_end, count(*) AS events, \
         sum(CAST(c.lane AS BIGINT) - 1) AS total, min(CAST(c.lane AS BIGINT) - 1) AS first, \
         max(CAST(c.lane AS BIGINT) - 1) AS last \
         FROM camera_events c LEFT JOIN segments s ON c.segment_id = s.segment_id \
         GROUP BY tumble(c.event_time, INTERVAL '10 seconds'), s.ward_id"
    )
}

/// The outputs of [`counts_query`] into `counts` and [`ward_query`] into `wards` over the first
/// `events` numbered events from `t0`: every window the flush events closed (watermark: flush
/// time minus the 5 s delay) exactly once with the batch computation's counts. Returns how
/// many segment and ward windows were checked.
pub fn assert_counts_exactly_once(
    brokers: &str,
    t0: i64,
    events: usize,
    counts: &str,
    wards: &str,
) -> anyhow::Result<(usize, usize)> {
    let watermark = t0 + events as i64 * STEP_MS + 60_000 - 5_000;
    let segments = assert_exactly_once(
        brokers,
        counts,
        "segment_id",
        &expected(t0, events, watermark),
    )?;
    let ward_of = segment_wards()?;
    let distinct: std::collections::BTreeSet<&String> =
        SEGMENTS.iter().filter_map(|s| ward_of.get(*s)).collect();
    anyhow::ensure!(distinct.len() > 1, "the segments lie in one ward");
    let expected_wards = expected_by(t0, events, watermark, |segment| ward_of[segment].clone());
    let wards = assert_exactly_once(brokers, wards, "ward_id", &expected_wards)?;
    Ok((segments, wards))
}

/// Every row of `topic`, read with read_committed, in order.
pub fn read_output(brokers: &str, topic: &str) -> anyhow::Result<Vec<Value>> {
    read_with(brokers, topic, "read_committed")
}

/// Every row of `topic`, read with `isolation` (`read_committed` or `read_uncommitted`).
pub fn read_with(brokers: &str, topic: &str, isolation: &str) -> anyhow::Result<Vec<Value>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "test-reader")
        .set("isolation.level", isolation)
        .set("enable.auto.commit", "false")
        .create()?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let mut list = rdkafka::TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for t in metadata.topics() {
        for p in t.partitions() {
            let (_, high) = consumer.fetch_watermarks(topic, p.id(), Duration::from_secs(10))?;
            if high > 0 {
                list.add_partition_offset(topic, p.id(), rdkafka::Offset::Beginning)?;
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
        // By position, not by the last message seen: a partition of transactional records
        // ends with a commit marker that is never delivered.
        if let Ok(positions) = consumer.position() {
            for e in positions.elements() {
                if let rdkafka::Offset::Offset(p) = e.offset()
                    && ends.get(&e.partition()).is_some_and(|end| p >= *end)
                {
                    ends.remove(&e.partition());
                }
            }
        }
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

/// The wards of the road segments, from `schemas/reference/segments.csv`.
pub fn segment_wards() -> anyhow::Result<BTreeMap<String, String>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas/reference/segments.csv");
    let text = std::fs::read_to_string(&path)?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or_default().split(',').collect();
    let ward = header
        .iter()
        .position(|h| *h == "ward_id")
        .ok_or_else(|| anyhow::anyhow!("{} has no ward_id", path.display()))?;
    Ok(lines
        .filter_map(|l| {
            let fields: Vec<&str> = l.split(',').collect();
            Some((fields.first()?.to_string(), fields.get(ward)?.to_string()))
        })
        .collect())
}

/// The windows in the output rows (the flush events' left out), with every publication of
/// each.
pub fn published(rows: &[Value]) -> BTreeMap<(String, i64), Vec<Counts>> {
    published_by(rows, "segment_id")
}

/// [`published`], per the group column `key` (rows with a null key are the flush events').
pub fn published_by(rows: &[Value], key: &str) -> BTreeMap<(String, i64), Vec<Counts>> {
    let mut out: BTreeMap<(String, i64), Vec<_>> = BTreeMap::new();
    for r in rows {
        let Some(segment) = r[key].as_str().map(str::to_string) else {
            continue;
        };
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

/// Reads `topic` (windows keyed by column `key`) until it holds every expected window (two minutes at most), then once more
/// a few seconds later for any duplicate to show; asserts each window is there exactly once
/// with the batch computation's counts. Returns how many windows were checked.
pub fn assert_exactly_once(
    brokers: &str,
    topic: &str,
    key: &str,
    expected: &Windows,
) -> anyhow::Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut windows = published_by(&read_output(brokers, topic)?, key);
    while windows.len() < expected.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(2));
        windows = published_by(&read_output(brokers, topic)?, key);
    }
    std::thread::sleep(Duration::from_secs(3));
    windows = published_by(&read_output(brokers, topic)?, key);
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
    anyhow::ensure!(missing.is_empty(), "missing windows: {missing:?}");
    anyhow::ensure!(
        duplicated.is_empty(),
        "windows published more than once: {duplicated:?}"
    );
    anyhow::ensure!(
        unexpected.is_empty(),
        "windows not in the input: {unexpected:?}"
    );
    anyhow::ensure!(wrong.is_empty(), "windows with wrong counts: {wrong:?}");
    Ok(windows.len())
}
