//! `urbanstream replay`: a CSV or JSON-lines file produced into a topic as JSON records, in
//! event-time order, as fast as the broker takes them or paced. (Parquet is refused with the
//! reason: the engine's DataFusion is built without its Parquet reader.)
//!
//! The file is read through DataFusion (streamed, sorted by event time with spilling), its
//! columns renamed as asked, its event-time column turned into epoch milliseconds (numbers in
//! the given unit; text as RFC 3339, or as `YYYY-MM-DD HH:MM[:SS]` in the given time zone), and
//! each row produced as one JSON object keyed by the key column. Rows without a readable event
//! time are not produced; they are counted and the first is shown.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use datafusion::arrow::array::{Array, ArrayRef, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::compute::{cast, kernels::numeric::mul};
use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use datafusion::prelude::{CsvReadOptions, JsonReadOptions, SessionContext};
use futures::StreamExt;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::error::{Error, Result};

/// Options of `replay`.
#[derive(Debug, Clone, Args)]
pub struct ReplayArgs {
    /// The file: CSV with a header (`.csv`) or JSON lines (`.jsonl`, `.ndjson`, `.json`).
    #[arg(long)]
    pub file: PathBuf,
    /// Topic to produce into.
    #[arg(long)]
    pub topic: String,
    /// Kafka bootstrap servers.
    #[arg(long, default_value = "localhost:9092")]
    pub brokers: String,
    /// Column whose value keys each record (e.g. `sensor_id`), after renaming; none: no key.
    #[arg(long)]
    pub key: Option<String>,
    /// Event-time column, after renaming: records go out in its order, as epoch milliseconds.
    #[arg(long)]
    pub time: Option<String>,
    /// Unit of a numeric event-time column: `s`, `ms` or `us`.
    #[arg(long, default_value = "ms")]
    pub time_unit: String,
    /// Time zone of event-time texts written without one, as an offset (`+07:00`) or a name
    /// (`Asia/Ho_Chi_Minh`).
    #[arg(long, default_value = "+00:00")]
    pub time_zone: String,
    /// Renames a column: `--rename station=sensor_id` (repeatable).
    #[arg(long)]
    pub rename: Vec<String>,
    /// Paces records by event time, this many times faster than real time (e.g. 3600: an
    /// hour of data a second); without it, as fast as the broker takes them.
    #[arg(long, value_parser = super::positive)]
    pub speedup: Option<f64>,
    /// Creates the topic with this many partitions when it is missing (on a broker with the
    /// admin API).
    #[arg(long)]
    pub partitions: Option<i32>,
}

/// What a replay did.
#[derive(Debug, Default)]
pub struct ReplaySummary {
    /// Records acknowledged by the broker.
    pub produced: u64,
    /// Rows without a readable event time, not produced.
    pub skipped: u64,
    /// The first of those, shown.
    pub first_skipped: Option<String>,
    /// Event times of the first and last records produced.
    pub span_ms: Option<(i64, i64)>,
}

/// Produces `args.file` into `args.topic`.
pub async fn replay(args: &ReplayArgs) -> Result<ReplaySummary> {
    crate::broker::check_reachable(&args.brokers).await?;
    if let Some(partitions) = args.partitions {
        crate::broker::create_topics(&args.brokers, &[(args.topic.clone(), partitions)]).await?;
    }
    let unit_ms = unit_ms(&args.time_unit)?;
    let mut stream = open_file(
        &args.file,
        &args.rename,
        args.time.as_deref(),
        args.key.as_deref(),
    )
    .await?;

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("linger.ms", "20")
        .set("enable.idempotence", "true")
        .create()?;
    let mut summary = ReplaySummary::default();
    let started = Instant::now();
    let mut last_report = Instant::now();
    let mut pace: Option<(i64, Instant)> = None;
    let mut inflight = Vec::new();
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        let (batch, times) = match &args.time {
            Some(time) => {
                let (batch, times) =
                    with_epoch_ms(&batch, time, unit_ms, &args.time_zone, &mut summary)?;
                (batch, Some(times))
            }
            None => (batch, None),
        };
        if batch.num_rows() == 0 {
            continue;
        }
        let keys = match &args.key {
            Some(k) => {
                let column = batch
                    .column_by_name(k)
                    .ok_or_else(|| Error::Config(format!("key column {k} is missing")))?;
                Some(cast(column, &DataType::Utf8)?)
            }
            None => None,
        };
        let keys = keys
            .as_ref()
            .and_then(|k| k.as_any().downcast_ref::<StringArray>());
        let (bytes, ends) = crate::sink::encode_json_rows(&batch)?;
        let mut start = 0;
        for (r, end) in ends.into_iter().enumerate() {
            if let (Some(speedup), Some(times)) = (args.speedup, &times) {
                let t = times.value(r);
                let (t0, wall0) = *pace.get_or_insert((t, Instant::now()));
                let due =
                    wall0 + Duration::from_secs_f64(((t - t0).max(0) as f64 / 1_000.0) / speedup);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    tokio::time::sleep(wait).await;
                }
            }
            if let Some(times) = &times {
                let t = times.value(r);
                summary.span_ms = Some(match summary.span_ms {
                    Some((a, b)) => (a.min(t), b.max(t)),
                    None => (t, t),
                });
            }
            let key = keys.filter(|k| !k.is_null(r)).map(|k| k.value(r));
            let value = &bytes[start..end];
            let mut record = FutureRecord::<str, [u8]>::to(&args.topic).payload(value);
            if let Some(key) = key {
                record = record.key(key);
            }
            match producer.send_result(record) {
                Ok(delivery) => inflight.push(delivery),
                Err((e, _)) => return Err(Error::Kafka(e)),
            }
            start = end + 1;
            if inflight.len() >= 10_000 {
                summary.produced += acknowledged(std::mem::take(&mut inflight)).await?;
            }
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            last_report = Instant::now();
            tracing::info!(
                produced = summary.produced + inflight.len() as u64,
                rate = ((summary.produced + inflight.len() as u64) as f64
                    / started.elapsed().as_secs_f64()) as u64,
                "replaying"
            );
        }
    }
    summary.produced += acknowledged(inflight).await?;
    Ok(summary)
}

/// Milliseconds per unit of a numeric event-time column (`s`, `ms`); `None` for `us`.
pub(crate) fn unit_ms(unit: &str) -> Result<Option<i64>> {
    match unit {
        "s" => Ok(Some(1_000)),
        "ms" => Ok(Some(1)),
        "us" => Ok(None),
        other => Err(Error::Config(format!(
            "--time-unit {other}: write s, ms or us"
        ))),
    }
}

/// Opens `file` (CSV or JSON lines) as a stream of batches, columns renamed by `rename`
/// (`old=new`), ordered by the `time` column when given; `time` and `key` must name columns
/// after renaming.
pub(crate) async fn open_file(
    file: &std::path::Path,
    rename: &[String],
    time: Option<&str>,
    key: Option<&str>,
) -> Result<datafusion::physical_plan::SendableRecordBatchStream> {
    let renames: Vec<(String, String)> = rename
        .iter()
        .map(|r| {
            r.split_once('=')
                .map(|(a, b)| (a.trim().to_string(), b.trim().to_string()))
                .ok_or_else(|| {
                    Error::Config(format!(
                        "--rename {r}: write old=new, e.g. station=sensor_id"
                    ))
                })
        })
        .collect::<Result<_>>()?;
    let ctx = SessionContext::new();
    let path = file.display().to_string();
    let extension = file
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    match extension.as_str() {
        "csv" => {
            ctx.register_csv("input", &path, CsvReadOptions::new())
                .await?
        }
        "jsonl" | "ndjson" | "json" => {
            ctx.register_json(
                "input",
                &path,
                JsonReadOptions::default().file_extension(&format!(".{extension}")),
            )
            .await?
        }
        "parquet" => {
            return Err(Error::Config(format!(
                "{path}: Parquet is not read yet (this build of DataFusion has no Parquet \
                 reader); convert it to CSV or JSON lines"
            )));
        }
        _ => {
            return Err(Error::Config(format!(
                "{path}: the file's extension says neither .csv nor .jsonl (.ndjson, .json)"
            )));
        }
    }
    let table = ctx.table("input").await?;
    let columns: Vec<String> = table
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    for (old, _) in &renames {
        if !columns.contains(old) {
            return Err(Error::Config(format!(
                "--rename {old}=…: {path} has no column {old} (columns: {})",
                columns.join(", ")
            )));
        }
    }
    let renamed = |c: &String| {
        renames
            .iter()
            .find(|(old, _)| old == c)
            .map_or(c.clone(), |(_, new)| new.clone())
    };
    let names: Vec<String> = columns.iter().map(renamed).collect();
    for (what, column) in [("--time", time), ("--key", key)] {
        if let Some(c) = column
            && !names.iter().any(|n| n == c)
        {
            return Err(Error::Config(format!(
                "{what} {c}: {path} has no column {c} (columns after renaming: {})",
                names.join(", ")
            )));
        }
    }
    let select: Vec<String> = columns
        .iter()
        .zip(&names)
        .map(|(c, n)| {
            format!(
                "\"{}\" AS \"{}\"",
                c.replace('"', "\"\""),
                n.replace('"', "\"\"")
            )
        })
        .collect();
    let mut sql = format!("SELECT {} FROM input", select.join(", "));
    if let Some(time) = time {
        let original = columns
            .iter()
            .zip(&names)
            .find(|(_, n)| n.as_str() == time)
            .map_or(time.to_string(), |(c, _)| c.clone());
        sql.push_str(&format!(" ORDER BY \"{}\"", original.replace('"', "\"\"")));
    }
    Ok(ctx.sql(&sql).await?.execute_stream().await?)
}

/// Waits for deliveries; how many were acknowledged (the first failure is returned).
async fn acknowledged(deliveries: Vec<rdkafka::producer::DeliveryFuture>) -> Result<u64> {
    let mut n = 0;
    for d in deliveries {
        match d.await {
            Ok(Ok(_)) => n += 1,
            Ok(Err((e, _))) => return Err(Error::Kafka(e)),
            Err(_) => {
                return Err(Error::Config(
                    "the producer went away before a record was acknowledged".into(),
                ));
            }
        }
    }
    Ok(n)
}

/// Epoch milliseconds of time texts (RFC 3339, or without a zone: local time in `zone`);
/// an unreadable text becomes null.
fn local_ms(text: &ArrayRef, zone: &str) -> Result<ArrayRef> {
    let options = datafusion::arrow::compute::CastOptions {
        safe: true,
        ..Default::default()
    };
    // Arrow reads times with seconds: `YYYY-MM-DD HH:MM` gets `:00`.
    let text = datafusion::arrow::array::AsArray::as_string::<i32>(text.as_ref());
    let text: ArrayRef = Arc::new(
        text.iter()
            .map(|t| {
                t.map(|t| {
                    let t = t.trim();
                    let minutes_only = t.len() == 16 && t.as_bytes().get(13) == Some(&b':');
                    if minutes_only {
                        format!("{t}:00")
                    } else {
                        t.to_string()
                    }
                })
            })
            .collect::<datafusion::arrow::array::StringArray>(),
    );
    let parsed = datafusion::arrow::compute::cast_with_options(
        &text,
        &DataType::Timestamp(TimeUnit::Millisecond, Some(zone.into())),
        &options,
    )?;
    Ok(cast(
        &cast(&parsed, &DataType::Timestamp(TimeUnit::Millisecond, None))?,
        &DataType::Int64,
    )?)
}

/// `batch` with column `time` as epoch milliseconds (a timestamp column in the output, so
/// that JSON carries numbers), rows without a readable time left out (counted in `summary`);
/// and those milliseconds.
pub(crate) fn with_epoch_ms(
    batch: &RecordBatch,
    time: &str,
    unit_ms: Option<i64>,
    zone: &str,
    summary: &mut ReplaySummary,
) -> Result<(RecordBatch, Int64Array)> {
    let Some(index) = batch.schema().index_of(time).ok() else {
        return Err(Error::Config(format!(
            "event-time column {time} is missing"
        )));
    };
    let column = batch.column(index);
    let ms: ArrayRef = match column.data_type() {
        // A time the file's reader took for a timestamp without a zone (CSV inference reads
        // `2026-01-01 06:00` so) is local time in `zone`, as its text would be.
        DataType::Timestamp(_, None) | DataType::Date64 => {
            local_ms(&cast(column, &DataType::Utf8)?, zone)?
        }
        DataType::Timestamp(..) | DataType::Date32 => cast(
            &cast(column, &DataType::Timestamp(TimeUnit::Millisecond, None))?,
            &DataType::Int64,
        )?,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            local_ms(&cast(column, &DataType::Utf8)?, zone)?
        }
        _ => {
            let n = cast(column, &DataType::Int64)?;
            match unit_ms {
                Some(f) => mul(&n, &Int64Array::new_scalar(f))?,
                None => datafusion::arrow::compute::kernels::numeric::div(
                    &n,
                    &Int64Array::new_scalar(1_000),
                )?,
            }
        }
    };
    let ms = ms
        .as_any()
        .downcast_ref::<Int64Array>()
        .cloned()
        .ok_or_else(|| Error::Config("event times did not convert to milliseconds".into()))?;
    let readable = datafusion::arrow::compute::is_not_null(&ms)?;
    let unreadable = ms.len() - readable.true_count();
    if unreadable > 0 {
        summary.skipped += unreadable as u64;
        if summary.first_skipped.is_none()
            && let Some(r) = (0..ms.len()).find(|r| ms.is_null(*r))
        {
            summary.first_skipped = Some(
                datafusion::arrow::util::display::array_value_to_string(column, r)
                    .unwrap_or_default(),
            );
        }
    }
    let mut fields: Vec<Field> = batch
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields[index] = Field::new(time, DataType::Int64, true);
    let mut columns = batch.columns().to_vec();
    columns[index] = Arc::new(ms.clone());
    let out = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?;
    let out = datafusion::arrow::compute::filter_record_batch(&out, &readable)?;
    let ms = datafusion::arrow::compute::filter(&ms, &readable)?;
    let ms = ms
        .as_any()
        .downcast_ref::<Int64Array>()
        .cloned()
        .ok_or_else(|| Error::Config("event times did not convert to milliseconds".into()))?;
    Ok((out, ms))
}
