//! `urbanstream sql` driven through a pseudo-terminal, as an analyst types into it: tables
//! listed and described (a statement over two lines), a preview over a file, a setting, a
//! registration, an error that leaves the shell running, and `quit`.

mod common;

use std::process::Command;

use common::{Api, broker, free_port, serve};

#[test]
fn the_sql_shell_lists_describes_previews_and_registers() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (_broker, brokers) = broker(dir.path())?;
    let port = free_port()?;
    let config = dir.path().join("urbanstream.toml");
    std::fs::write(
        &config,
        format!(
            "[kafka]\nbrokers = \"{brokers}\"\n[api]\nlisten = \"127.0.0.1:{port}\"\n\
             [catalog]\npath = \"{}\"\n[queries]\ndefaults = false\n\
             [checkpoint]\ndir = \"{}\"\n",
            dir.path().join("data/catalog.json").display(),
            dir.path().join("data/checkpoints").display()
        ),
    )?;
    let _service = serve(&config, &dir.path().join("serve.log"))?;
    let base = format!("http://127.0.0.1:{port}");
    Api::new()?.wait_live(&base)?;
    let data = dir.path().join("detections.csv");
    std::fs::write(
        &data,
        "cam,segment_id,time,kind,vehicle_class,confidence\n\
         cam-0001,kim_ma_w,2026-01-01 06:00:05,detection,car,0.9\n\
         cam-0001,kim_ma_w,2026-01-01 06:00:45,detection,motorbike,0.9\n\
         cam-0002,xuan_thuy,2026-01-01 06:00:10,detection,bus,0.8\n\
         cam-0001,kim_ma_w,2026-01-01 06:01:15,detection,hovercraft,0.9\n",
    )?;
    let mut command = Command::new(env!("CARGO_BIN_EXE_urbanstream"));
    command
        .args(["sql", "--server", &base])
        .env("HOME", dir.path())
        .env("RUST_LOG", "error");
    let mut shell = rexpect::session::spawn_with_options(
        command,
        rexpect::reader::Options::new()
            .timeout_ms(Some(60_000))
            .strip_ansi_escape_codes(true),
    )?;
    shell.exp_string("urbanstream SQL shell")?;
    shell.exp_string("urbanstream> ")?;

    shell.send_line("SHOW TABLES;")?;
    shell.exp_string("camera_events")?;
    shell.exp_string("city.camera.events")?;
    shell.exp_string("urbanstream> ")?;

    // A statement over two lines.
    shell.send_line("DESCRIBE")?;
    shell.exp_string("-> ")?;
    shell.send_line("  sensors;")?;
    shell.exp_string("interval_s")?;
    shell.exp_string("urbanstream> ")?;

    shell.send_line(&format!(
        "\\data {} cam=camera_id time=event_time",
        data.display()
    ))?;
    shell.exp_string("previews read")?;
    shell.send_line("SET time_zone = '+07:00';")?;
    shell.exp_string("time_zone = '+07:00'")?;
    shell.send_line(
        "SELECT segment_id, window_start, count(*) AS n FROM camera_events \
         GROUP BY tumble(event_time, INTERVAL '1 minute'), segment_id;",
    )?;
    // Columns in the query's order; window times in the display time zone (the city's),
    // as the data file wrote them.
    shell.exp_string("segment_id")?;
    shell.exp_string("window_start")?;
    shell.exp_string("kim_ma_w")?;
    shell.exp_string("2026-01-01 06:00:00")?;
    shell.exp_string("times in UTC+07:00")?;
    shell.exp_string("4 input rows, 2 output rows")?;
    shell.exp_string("1 rows rejected")?;
    shell.exp_string("hovercraft")?;

    // An error names the problem, and the shell goes on.
    shell.send_line("SELECT x FROM nowhere;")?;
    shell.exp_string("error:")?;
    shell.exp_string("nowhere")?;
    shell.exp_string("urbanstream> ")?;

    shell.send_line(
        "CREATE QUERY busy AS CREATE EXTERNAL TABLE busy (segment_id VARCHAR NOT NULL, \
         window_start TIMESTAMP NOT NULL, n BIGINT NOT NULL) STORED AS KAFKA \
         OPTIONS ('topic' 'test.busy'); INSERT INTO busy SELECT segment_id, window_start, \
         count(*) AS n FROM camera_events GROUP BY tumble(event_time, INTERVAL '1 minute'), \
         segment_id;",
    )?;
    shell.exp_string("registered busy")?;
    shell.send_line("SHOW QUERIES;")?;
    shell.exp_string("busy")?;
    shell.exp_string("urbanstream> ")?;

    shell.send_line("quit")?;
    shell.exp_eof()?;
    assert!(
        dir.path().join(".urbanstream_history").exists(),
        "the history is kept"
    );
    Ok(())
}
