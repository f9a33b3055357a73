//! The web console in a real browser: `urbanstream serve` (with an API token) beside the
//! embedded broker, Debian's Chromium driven by playwright-core (`tests/browser/console.mjs`,
//! both installed by `scripts/install-browser.sh`, which this runs when they are missing).
//! The test writes indicator and alert records into the output topics and checks that the page
//! follows: the map draws every reference segment coloured by its LOS, colours change when
//! the LOS changes, an alert appears with its explanation (as text, never markup), and a query
//! is validated, explained, registered and paused from the console. Screenshots of every step
//! are kept in `target/test-artifacts/web-console/`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use serde_json::{Value, json};
use urbanstream::reference::ReferenceData;

use common::{Api, broker, counts_query, free_port, serve, service_config, wait_until};

const TOKEN: &str = "console-test-token";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Chromium and playwright-core, installed when missing.
fn browser() -> anyhow::Result<()> {
    let driver = root().join("tests/browser/node_modules/playwright-core/package.json");
    if !(Path::new("/usr/bin/chromium").exists() && driver.exists()) {
        let status = Command::new("bash")
            .arg(root().join("scripts/install-browser.sh"))
            .status()?;
        anyhow::ensure!(
            status.success(),
            "Chromium or playwright-core could not be installed: run scripts/install-browser.sh"
        );
    }
    Ok(())
}

/// The lines a child writes, as they come.
fn lines_of(out: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (lines, said) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    said
}

fn produce(brokers: &str, topic: &str, records: &[(String, Value)]) -> anyhow::Result<()> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        .create()?;
    for (key, value) in records {
        let payload = serde_json::to_vec(value)?;
        producer
            .send(BaseRecord::to(topic).key(key).payload(&payload))
            .map_err(|(e, _)| e)?;
    }
    producer.flush(Duration::from_secs(10))?;
    Ok(())
}

fn congestion(segment: &str, window_start: i64, los: &str) -> (String, Value) {
    (
        segment.to_string(),
        json!({
            "segment_id": segment, "window_start": window_start,
            "window_end": window_start + 60_000, "vehicles": 40, "mean_speed_kmh": 31.5,
            "motorbike_share": 0.8, "space_mean_speed_kmh": 30.2, "tti": 1.4, "los": los,
        }),
    )
}

#[test]
fn the_console_shows_the_city_and_registers_a_query_in_a_real_browser() -> anyhow::Result<()> {
    browser()?;
    let dir = tempfile::tempdir()?;
    let artifacts = root().join("target/test-artifacts/web-console");
    std::fs::create_dir_all(&artifacts)?;
    let (_broker, brokers) = broker(dir.path())?;
    let reference = ReferenceData::embedded()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let minute = now.div_euclid(60_000) * 60_000 - 120_000;
    let hour = now.div_euclid(3_600_000) * 3_600_000;

    // What the queries would have published before the service started: every segment at
    // LOS A, and the hourly VN_AQI of every ward.
    let rows: Vec<_> = reference
        .segments
        .iter()
        .map(|s| congestion(&s.segment_id, minute, "A"))
        .collect();
    produce(&brokers, "city.indicators.congestion", &rows)?;
    let wards: Vec<_> = reference
        .wards
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let aqi = 40 + 15 * i as i64;
            (
                w.ward_id.clone(),
                json!({
                    "entity_id": w.ward_id, "scope": "ward", "period": "hour",
                    "window_start": hour - 3_600_000, "window_end": hour, "aqi": aqi,
                    "category": "Trung bình", "category_en": "Moderate",
                    "dominant_pollutant": "pm25", "pm25_nowcast": 30.0, "readings": 12,
                }),
            )
        })
        .collect();
    produce(&brokers, "city.indicators.air", &wards)?;
    // A flooded road gauge (warning level II) and the parking of a ward.
    produce(
        &brokers,
        "city.indicators.water",
        &[(
            "wl-001".into(),
            json!({
                "gauge_id": "wl-001", "ward_id": "thanh_xuan", "segment_id": "nguyen_trai_ntso",
                "window_start": minute - 300_000, "window_end": minute, "level_cm": 21.5,
                "max_level_cm": 22.0, "rise_cm_h": 60.0, "rainfall_mm_h": 85.0,
                "warning_level": 2, "readings": 5,
            }),
        )],
    )?;
    produce(
        &brokers,
        "city.indicators.parking",
        &[(
            "hoan_kiem".into(),
            json!({
                "entity_type": "ward", "entity_id": "hoan_kiem", "ward_id": "hoan_kiem",
                "window_start": minute - 300_000, "window_end": minute, "lots": 4,
                "capacity": 570, "occupancy_pct": 96.5, "free_spaces": 20.0,
                "peak_occupancy_pct": 100.0, "readings": 20,
            }),
        )],
    )?;

    let port = free_port()?;
    let config = service_config(
        &brokers,
        "web-console-test",
        port,
        &dir.path().join("catalog.json"),
        &dir.path().join("checkpoints"),
        "web",
    )
    .replace("[api]\n", &format!("[api]\ntoken = \"{TOKEN}\"\n"));
    let config_file = dir.path().join("urbanstream.toml");
    std::fs::write(&config_file, config)?;
    let _service = serve(&config_file, &dir.path().join("service.log"))?;
    let base = format!("http://127.0.0.1:{port}");
    let api = Api::new()?;
    api.wait_live(&base)?;

    // The page is open; the data behind it needs the token.
    let (page, unauthorized, authorized) = api.rt.block_on(async {
        let page = api.client.get(format!("{base}/")).send().await?;
        let page = (page.status().as_u16(), page.text().await?);
        let unauthorized = api.client.get(format!("{base}/v1/city")).send().await?;
        let authorized = api
            .client
            .get(format!("{base}/v1/city/map"))
            .bearer_auth(TOKEN)
            .send()
            .await?;
        anyhow::Ok((
            page,
            unauthorized.status().as_u16(),
            authorized.json::<Value>().await?,
        ))
    })?;
    assert_eq!(page.0, 200);
    assert!(page.1.contains("/ui/app.js"));
    assert_eq!(unauthorized, 401);
    assert_eq!(
        authorized["segments"].as_array().map(Vec::len),
        Some(reference.segments.len())
    );

    let mut driver = Command::new("node")
        .current_dir(root().join("tests/browser"))
        .arg("console.mjs")
        .arg(format!("{base}/"))
        .arg(TOKEN)
        .arg(&artifacts)
        .arg(reference.segments.len().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut to_driver = driver.stdin.take().expect("stdin is piped");
    let from_driver = driver.stdout.take().expect("stdout is piped");
    let said = lines_of(from_driver);
    let expect = |step: &str| -> anyhow::Result<()> {
        let line = said
            .recv_timeout(Duration::from_secs(120))
            .map_err(|_| anyhow::anyhow!("the browser said nothing about {step}"))?;
        anyhow::ensure!(
            line == format!("ok {step}"),
            "{line} (screenshots in {})",
            artifacts.display()
        );
        Ok(())
    };
    let mut tell = |v: Value| -> anyhow::Result<()> {
        writeln!(to_driver, "{v}")?;
        to_driver.flush()?;
        Ok(())
    };

    expect("map")?;

    // Five segments fall to LOS F in the next minute.
    let jammed: Vec<String> = reference
        .segments
        .iter()
        .step_by(7)
        .take(5)
        .map(|s| s.segment_id.clone())
        .collect();
    let rows: Vec<_> = jammed
        .iter()
        .map(|s| congestion(s, minute + 60_000, "F"))
        .collect();
    produce(&brokers, "city.indicators.congestion", &rows)?;
    tell(json!({ "step": "los", "segments": jammed }))?;
    expect("los")?;

    let message = "<b>Ngập</b> nước: 3 camera incident events (flood) in the minute";
    produce(
        &brokers,
        "city.alerts",
        &[(
            jammed[0].clone(),
            json!({
                "alert_id": format!("incident:{}:web", jammed[0]), "state": "RAISED",
                "kind": "incident", "entity_type": "segment", "entity_id": jammed[0],
                "started_at": minute + 60_000, "severity": 4, "message": message,
            }),
        )],
    )?;
    tell(json!({
        "step": "alert", "alert_id": format!("incident:{}:web", jammed[0]), "message": message,
    }))?;
    expect("alert")?;

    // A segment added to the reference table: the open console draws it, and its LOS,
    // without a reload.
    api.rt.block_on(async {
        let rows = api
            .client
            .get(format!("{base}/v1/tables/segments/rows"))
            .bearer_auth(TOKEN)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?;
        let added = "added_segment,Added Street,Added Street,khuong_dinh,2,40,3000,\
                     urban_street,500,\"LINESTRING(105.8200 21.0100, 105.8300 21.0150)\"\n";
        api.client
            .put(format!("{base}/v1/tables/segments/rows"))
            .bearer_auth(TOKEN)
            .header("content-type", "text/csv")
            .body(format!("{rows}{added}"))
            .send()
            .await?
            .error_for_status()?;
        // The view takes rows of the ids it knows: the segment's row goes out once the view
        // follows the new version (within a second).
        let start = std::time::Instant::now();
        loop {
            let map: Value = api
                .client
                .get(format!("{base}/v1/city/map"))
                .bearer_auth(TOKEN)
                .send()
                .await?
                .json()
                .await?;
            let shown = map["segments"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["id"] == "added_segment"));
            if shown {
                break;
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(30),
                "the view never followed the new segments"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        anyhow::Ok(())
    })?;
    produce(
        &brokers,
        "city.indicators.congestion",
        &[congestion("added_segment", minute + 60_000, "F")],
    )?;
    tell(json!({ "step": "segment", "id": "added_segment" }))?;
    expect("segment")?;

    tell(json!({
        "step": "register", "name": "web_counts", "sql": counts_query("test.web.counts"),
    }))?;
    expect("register")?;
    let status = || {
        api.rt.block_on(async {
            let r = api
                .client
                .get(format!("{base}/v1/queries/web_counts"))
                .bearer_auth(TOKEN)
                .send()
                .await
                .ok()?;
            r.json::<Value>().await.ok()
        })
    };
    let registered = status().expect("the registered query's status");
    assert_eq!(registered["name"], "web_counts");
    assert!(
        registered["sql"]
            .as_str()
            .is_some_and(|s| s.contains("test.web.counts"))
    );

    tell(json!({ "step": "pause", "name": "web_counts" }))?;
    expect("pause")?;
    wait_until("the query was not paused", || {
        status().is_some_and(|s| s["state"] == "PAUSED")
    })?;
    let exit = driver.wait()?;
    assert!(exit.success(), "the browser driver exited with {exit}");
    for shot in [
        "1-map.png",
        "2-los-changed.png",
        "3-alert.png",
        "3b-segment.png",
        "4-registered.png",
        "5-paused.png",
    ] {
        let png = std::fs::read(artifacts.join(shot))?;
        assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{shot}");
    }
    Ok(())
}

/// The demo serves the city view (no query console: it runs no service) and says where.
#[test]
fn the_demo_serves_the_city_map_where_it_says() -> anyhow::Result<()> {
    let mut demo = Command::new(common::BIN)
        .args(["demo", "--duration", "60s", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = demo.stdout.take().expect("stdout is piped");
    // Killed when the test ends, passed or not.
    let _demo = common::Process(demo);
    let said = lines_of(stdout);
    let address = loop {
        let line = said
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| anyhow::anyhow!("the demo did not say where its console is"))?;
        if let Some(url) = line.strip_prefix("web console and city map: ") {
            break url.trim_end_matches('/').to_string();
        }
    };
    let api = Api::new()?;
    let get = |path: &str| {
        api.rt.block_on(async {
            let r = api.client.get(format!("{address}{path}")).send().await?;
            anyhow::Ok((r.status().as_u16(), r.text().await?))
        })
    };
    let (status, page) = get("/")?;
    assert_eq!(status, 200);
    assert!(page.contains("/ui/app.js"));
    assert_eq!(get("/v1/queries")?.0, 404, "the demo has no query console");
    // A page reaching the loopback through a name of its own (DNS rebinding) is refused, as
    // by the service: the demo answered any Host header.
    let rebound = api.rt.block_on(async {
        let r = api
            .client
            .get(format!("{address}/v1/city"))
            .header("host", "attacker.example")
            .send()
            .await?;
        anyhow::Ok(r.status().as_u16())
    })?;
    assert_eq!(rebound, 403);
    wait_until("the demo's view showed no segment", || {
        get("/v1/city").is_ok_and(|(_, body)| {
            serde_json::from_str::<Value>(&body).is_ok_and(|v| {
                v["congestion"]["segments"]
                    .as_object()
                    .is_some_and(|s| !s.is_empty())
            })
        })
    })?;
    Ok(())
}

/// A console tab left open (an event stream) does not hold `serve` back from a graceful stop.
#[test]
fn an_open_console_does_not_hold_a_graceful_stop_back() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (_broker, brokers) = broker(dir.path())?;
    let port = free_port()?;
    let config = service_config(
        &brokers,
        "web-console-stop",
        port,
        &dir.path().join("catalog.json"),
        &dir.path().join("checkpoints"),
        "stop",
    );
    let config_file = dir.path().join("urbanstream.toml");
    std::fs::write(&config_file, config)?;
    let mut service = serve(&config_file, &dir.path().join("service.log"))?;
    let base = format!("http://127.0.0.1:{port}");
    let api = Api::new()?;
    api.wait_live(&base)?;
    let stopped = api.rt.block_on(async {
        let mut events = api
            .client
            .get(format!("{base}/v1/city/events"))
            .send()
            .await?;
        let first = events.chunk().await?.unwrap_or_default();
        anyhow::ensure!(
            String::from_utf8_lossy(&first).contains("event: snapshot"),
            "no snapshot first"
        );
        let pid = service.0.id().to_string();
        anyhow::ensure!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()?
                .success()
        );
        // The stream ends as the service stops.
        let ended = tokio::time::timeout(Duration::from_secs(20), async {
            while let Ok(Some(_)) = events.chunk().await {}
        })
        .await;
        anyhow::Ok(ended.is_ok())
    })?;
    assert!(stopped, "the event stream stayed open after SIGTERM");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = service.0.try_wait()? {
            assert!(status.success(), "serve exited with {status}");
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "serve did not stop within 30 s of SIGTERM with a console open"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}
