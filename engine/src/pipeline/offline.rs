//! A stream query run over a file's rows or a topic's records, outside the running
//! pipeline: `urbanstream run` (offline) and the service's previews.
//!
//! A file's rows become the records of the query's stream through the code the service uses:
//! read through DataFusion (a CSV's columns as text, for the stream's schema to read rather
//! than types guessed from the file's first rows; sorted by the instant of each event time,
//! in a memory pool), columns renamed, the event-time column turned into epoch milliseconds
//! (numbers in the given unit; text as RFC 3339, or as `YYYY-MM-DD HH:MM[:SS]` in the given
//! time zone), encoded as JSON, decoded and
//! validated by the stream's schema (a row the schema rejects is counted with its reason, as
//! the DLQ would get it), fed in event-time order micro-batch by micro-batch, with processing
//! time following the data. At the end of the input every window closes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, Int64Array, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use datafusion::prelude::{CsvReadOptions, SessionContext};
use futures::StreamExt;

use crate::decode::{Codecs, JsonDecoder};
use crate::error::{Error, Result};
use crate::plan::stream::{StreamContext, StreamQuery};
use crate::sink::{JSON_NUMBER_TEXT, JSON_VALUE_TEXT};
use crate::source::RawBatch;

/// Memory a file's reading and sorting may hold; beyond it the sort spills to disk.
const FILE_MEMORY: usize = 256 << 20;

/// Bytes of a file's rows read in one batch, about: the sort holds a batch and its sorted copy
/// within [`FILE_MEMORY`].
const FILE_BATCH_BYTES: usize = 16 << 20;

/// Rows a batch of the text file at `path` takes so that it holds about [`FILE_BATCH_BYTES`]
/// (its lines' mean length), between 1 and 8 192.
fn rows_per_batch(path: &Path) -> std::io::Result<usize> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut buffer = vec![0u8; 1 << 20];
    let (mut bytes, mut lines) = (0usize, 0usize);
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        bytes += n;
        lines += buffer[..n].iter().filter(|b| **b == b'\n').count();
    }
    let mean = bytes / lines.max(1);
    Ok((FILE_BATCH_BYTES / mean.max(1)).clamp(1, 8_192))
}

/// Rows whose event time could not be read (not fed, not produced).
#[derive(Debug, Default, Clone)]
pub struct Unreadable {
    /// How many.
    pub skipped: u64,
    /// The first one's time, as written.
    pub first: Option<String>,
}

/// What a run gave.
#[derive(Debug, Default)]
pub struct RunSummary {
    /// Rows read from the file.
    pub input_rows: u64,
    /// Input rows the stream's schema or the query rejected (the DLQ's records in the
    /// service).
    pub rejected: u64,
    /// The first rejection's reason.
    pub first_rejection: Option<String>,
    /// Result rows not published: a window's result the plan above the windows failed on,
    /// or a row with a float JSON cannot carry (the DLQ's `result` records in the service).
    pub refused_results: u64,
    /// The first of them, with the reason.
    pub first_refused_result: Option<String>,
    /// Rows without a readable event time (not fed).
    pub unreadable_time: u64,
    /// The first of them's time, as written.
    pub first_unreadable: Option<String>,
    /// Rows diverted as late or future-stamped, by reason.
    pub diverted: BTreeMap<String, u64>,
    /// Output rows.
    pub output_rows: u64,
    /// Columns of the file the stream does not have (after renaming): not read.
    pub ignored_columns: Vec<String>,
    /// Fields of the stream the file does not have: NULL (or their default) in every record.
    pub missing_fields: Vec<String>,
    /// The first `limit` output rows.
    pub shown: Vec<RecordBatch>,
}

/// How a file's rows become a stream's records.
#[derive(Debug, Clone)]
pub struct RunInput {
    /// A CSV (with a header) or JSON-lines file.
    pub path: PathBuf,
    /// `old=new` column renames.
    pub rename: Vec<String>,
    /// Unit of a numeric event-time column: `s`, `ms` or `us`; by default the stream's own
    /// (its `'event_time_unit'`, milliseconds unless declared).
    pub time_unit: Option<String>,
    /// Time zone of event-time texts written without one.
    pub time_zone: String,
    /// Bytes the query's state may hold (a preview runs in its query's memory limit); none
    /// for `urbanstream run`, on the operator's own machine.
    pub state_limit: Option<usize>,
}

/// Holds a run's state within its limit, measured as the service measures a running query's:
/// when its entries grew by an eighth (or 4 096), and every few steps besides (one group's
/// `string_agg` grows without new entries).
struct StateMeter {
    limit: Option<usize>,
    measured: Option<usize>,
    steps: u32,
}

impl StateMeter {
    fn new(limit: Option<usize>) -> Self {
        Self {
            limit,
            measured: None,
            steps: 0,
        }
    }

    fn check(&mut self, query: &StreamQuery) -> Result<()> {
        self.check_all(std::iter::once(query))
    }

    /// [`StateMeter::check`] of the instances of one query together.
    fn check_all<'a>(&mut self, queries: impl Iterator<Item = &'a StreamQuery>) -> Result<()> {
        let Some(limit) = self.limit else {
            return Ok(());
        };
        // Every step: a step may grow the state by far more than its groups tell (one group's
        // string_agg of long texts took 1.5 GB over a 512 MiB limit between two looks).
        self.steps += 1;
        let (groups, bytes) = queries.fold((0, 0), |(g, b), q| {
            (g + q.state_groups(), b + q.state_bytes())
        });
        self.measured = Some(groups);
        if bytes > limit {
            return Err(Error::ResourceLimit(format!(
                "state of {bytes} bytes in {groups} entries (windows, sessions, detector keys) \
                 does not fit the query's memory limit of {limit} bytes"
            )));
        }
        Ok(())
    }
}

/// The one stream query of `sql` (its `CREATE EXTERNAL TABLE` and `SET` statements
/// included), planned in `ctx` under the SQL sandbox; `label` names the SQL in errors.
pub async fn one_query(ctx: &StreamContext, sql: &str, label: &str) -> Result<StreamQuery> {
    let mut queries = crate::plan::plan_all(ctx, sql).await?;
    match queries.len() {
        1 => Ok(queries.remove(0)),
        0 => Err(Error::Config(format!(
            "{label} holds no stream query (INSERT INTO <sink> SELECT … FROM <stream> …, or a SELECT)"
        ))),
        _ => Err(Error::Config(format!(
            "{label} holds more than one stream query: run them one at a time"
        ))),
    }
}

/// Runs `query` over the rows of `input`, in event-time order, with processing time
/// following the data; at the end every window closes. Keeps the first `limit` output rows
/// and writes every row to `output` as JSON lines.
pub async fn run_query<W: Write + ?Sized>(
    query: StreamQuery,
    input: &RunInput,
    limit: usize,
    output: Option<&mut W>,
) -> Result<RunSummary> {
    let state_limit = input.state_limit;
    run_file_query(query, input, limit, output)
        .await
        .map_err(|e| out_of_memory(e, state_limit, false))
}

/// DataFusion's refusal to allocate (the file's sort over [`FILE_MEMORY`] when `file`, an
/// operator of the query over its memory limit otherwise) as the resource limit it is,
/// saying which; other errors as they are.
fn out_of_memory(e: Error, state_limit: Option<usize>, file: bool) -> Error {
    let Error::DataFusion(df) = &e else {
        return e;
    };
    let datafusion::error::DataFusionError::ResourcesExhausted(message) = df.find_root() else {
        return e;
    };
    match (file, state_limit) {
        (false, Some(limit)) => Error::ResourceLimit(format!(
            "an operator does not fit the query's memory limit of {limit} bytes ({message})"
        )),
        (false, None) => Error::ResourceLimit(format!("an operator ran out of memory ({message})")),
        (true, _) => Error::ResourceLimit(format!(
            "reading the file and sorting it by event time does not fit the {} MiB it may \
             hold ({message}): a row of tens of megabytes cannot be sorted; leave such rows \
             out of the file",
            FILE_MEMORY >> 20
        )),
    }
}

async fn run_file_query<W: Write + ?Sized>(
    mut query: StreamQuery,
    input: &RunInput,
    limit: usize,
    mut output: Option<&mut W>,
) -> Result<RunSummary> {
    // One file is one stream's rows: a query of two streams would see the other as empty.
    if query.inputs().len() > 1 {
        return Err(Error::Config(format!(
            "this query reads {} streams ({}), and a file gives the rows of one: run it over \
             the streams' topics (replay each file to its topic, then register the query)",
            query.inputs().len(),
            query.input_names()
        )));
    }
    let source = query.source().clone();
    let time = source.options.event_time.clone();
    let declared = match source.options.event_time_unit {
        datafusion::arrow::datatypes::TimeUnit::Second => "s",
        datafusion::arrow::datatypes::TimeUnit::Microsecond => "us",
        _ => "ms",
    };
    let unit_ms = unit_ms(input.time_unit.as_deref().unwrap_or(declared))?;
    let decoder = {
        let d = JsonDecoder::new(source.topic_schema.clone());
        match &time {
            // The file's times are turned into epoch milliseconds before decoding.
            Some(column) => {
                d.with_event_time(column, datafusion::arrow::datatypes::TimeUnit::Millisecond)
            }
            None => d,
        }
    };
    let opened = open_file(
        &input.path,
        &input.rename,
        (time.as_deref(), unit_ms, &input.time_zone),
        None,
        true,
    )
    .await?;
    let mut stream = opened.stream;
    // Lines that cannot be a row are rejected like records the schema refuses.
    let mut summary = RunSummary {
        input_rows: opened.malformed.lines,
        rejected: opened.malformed.lines,
        first_rejection: opened.malformed.first.clone(),
        ..RunSummary::default()
    };
    let fields = source.topic_schema.arrow.clone();
    let csv = input
        .path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    let columns = stream.schema();
    summary.ignored_columns = columns
        .fields()
        .iter()
        .filter(|c| fields.field_with_name(c.name()).is_err())
        .map(|c| c.name().clone())
        .collect();
    // An empty file has no columns to miss.
    summary.missing_fields = fields
        .fields()
        .iter()
        .filter(|f| !columns.fields().is_empty() && columns.field_with_name(f.name()).is_err())
        .map(|f| f.name().clone())
        .collect();
    let mut unreadable = Unreadable::default();
    let mut meter = StateMeter::new(input.state_limit);
    let mut now_ms = i64::MIN;
    let mut offset = 0i64;
    while let Some(batch) = stream.next().await {
        // The file's own reading and sorting: its memory, not the query's.
        let batch = batch.map_err(|e| out_of_memory(e.into(), None, true))?;
        summary.input_rows += batch.num_rows() as u64;
        let batch = match &time {
            Some(column) => {
                let (batch, times) =
                    with_epoch_ms(&batch, column, unit_ms, &input.time_zone, &mut unreadable)?;
                // Processing time follows the data: nothing in the file is from the future.
                if let Some(last) = (0..times.len()).map(|i| times.value(i)).max() {
                    now_ms = now_ms.max(last);
                }
                batch
            }
            None => batch,
        };
        // A CSV's columns are text: its booleans are read here (JSON carries its own), and
        // the spaces around its numbers left out.
        let batch = if csv {
            read_booleans(&batch, &fields, &mut summary)?
        } else {
            batch
        };
        // Columns the stream does not have are not read: they make no part of its records
        // (a 300 KB column it does not read put a row over the record size limit).
        let batch = if summary.ignored_columns.is_empty() {
            batch
        } else {
            let read: Vec<usize> = (0..batch.num_columns())
                .filter(|&i| {
                    fields
                        .field_with_name(batch.schema().field(i).name())
                        .is_ok()
                })
                .collect();
            batch.project(&read)?
        };
        let (bytes, ends) = crate::sink::encode_json_rows(&batch)?;
        let mut raw = RawBatch::new(source.options.topic.clone());
        let mut start = 0;
        for end in ends {
            raw.push(0, offset, None, Some(&bytes[start..end]));
            offset += 1;
            start = end + 1;
        }
        let decoded = decoder.decode(&raw)?;
        summary.rejected += decoded.rejects.len() as u64;
        if summary.first_rejection.is_none() {
            summary.first_rejection = decoded.rejects.first().map(|r| r.error.clone());
        }
        let partitions = vec![0; decoded.batch.num_rows()];
        let offsets: Vec<i64> = decoded
            .rows
            .iter()
            .map(|&r| raw.offsets[r as usize])
            .collect();
        let mut out = query
            .process(&decoded.batch, &partitions, Some(&offsets), now_ms.max(0))
            .await?;
        loop {
            take(&query, out, limit, &mut summary, output.as_deref_mut())?;
            meter.check(&query)?;
            if !query.is_due() {
                break;
            }
            out = query.tick(now_ms.max(0)).await?;
        }
    }
    summary.unreadable_time = unreadable.skipped;
    summary.first_unreadable = unreadable.first;
    // The end of the file closes every window.
    let mut out = query.advance_watermark(i64::MAX / 4, now_ms.max(0)).await?;
    loop {
        take(&query, out, limit, &mut summary, output.as_deref_mut())?;
        if !query.is_due() {
            break;
        }
        out = query.tick(now_ms.max(0)).await?;
    }
    Ok(summary)
}

/// [`run_query`] over records read from a topic (a preview of its recent minutes or an
/// offset range). The records of each partition keep their order, and the partitions are fed
/// side by side in event time (the next record is always the partition's whose next record is
/// oldest), as a running query reads them: a range is read partition after partition, and fed
/// in that order the first partition's times made every other partition's records late.
pub async fn run_query_over_records(
    query: StreamQuery,
    ctx: &StreamContext,
    batches: &[RawBatch],
    limit: usize,
    codecs: &Codecs,
    state_limit: Option<usize>,
) -> Result<RunSummary> {
    run_records_query(query, ctx, batches, limit, codecs, state_limit)
        .await
        .map_err(|e| out_of_memory(e, state_limit, false))
}

async fn run_records_query(
    query: StreamQuery,
    ctx: &StreamContext,
    batches: &[RawBatch],
    limit: usize,
    codecs: &Codecs,
    state_limit: Option<usize>,
) -> Result<RunSummary> {
    const CHUNK: usize = 4096;
    let source = query.source().clone();
    let decoder = source.decoder(source.options.format, codecs)?;
    let mut summary = RunSummary::default();
    // Every record decoded first: (batch, its times, partitions and offsets per row).
    let mut decoded_batches = Vec::with_capacity(batches.len());
    let mut queues: BTreeMap<i32, std::collections::VecDeque<(usize, usize)>> = BTreeMap::new();
    for raw in batches {
        summary.input_rows += raw.len() as u64;
        decoder.prepare(raw).await?;
        let decoded = decoder.decode(raw)?;
        summary.rejected += decoded.rejects.len() as u64;
        if summary.first_rejection.is_none() {
            summary.first_rejection = decoded.rejects.first().map(|r| r.error.clone());
        }
        let times: Option<Int64Array> = match &source.options.event_time {
            Some(time) => match decoded.batch.column_by_name(time) {
                Some(column) => Some(cast(column, &DataType::Int64)?.as_primitive().clone()),
                None => None,
            },
            None => None,
        };
        let partitions: Vec<i32> = decoded
            .rows
            .iter()
            .map(|&r| raw.partitions[r as usize])
            .collect();
        let offsets: Vec<i64> = decoded
            .rows
            .iter()
            .map(|&r| raw.offsets[r as usize])
            .collect();
        let b = decoded_batches.len();
        for (row, partition) in partitions.iter().enumerate() {
            queues.entry(*partition).or_default().push_back((b, row));
        }
        decoded_batches.push((decoded.batch, times, partitions, offsets));
    }
    let time_of = |(b, row): (usize, usize)| -> i64 {
        decoded_batches[b]
            .1
            .as_ref()
            .filter(|t| t.is_valid(row))
            .map_or(i64::MIN, |t| t.value(row))
    };
    // A query the service runs with one state per partition (each with its own watermark,
    // so lateness is judged per partition) runs so here too: one instance per partition;
    // another, one instance for all (-1).
    let mut instances: BTreeMap<i32, StreamQuery> = BTreeMap::new();
    if query.is_partition_local() && queues.len() > 1 {
        for p in queues.keys() {
            instances.insert(*p, query.replan(ctx).await?);
        }
    } else {
        instances.insert(-1, query);
    }
    let one = instances.contains_key(&-1);
    let instance_of: HashMap<i32, i32> = queues
        .keys()
        .map(|p| (*p, if one { -1 } else { *p }))
        .collect();
    let mut now_ms = 0i64;
    let mut meter = StateMeter::new(state_limit);
    let mut chunk: Vec<(usize, usize)> = Vec::with_capacity(CHUNK);
    loop {
        // The partition whose next record is oldest (by partition on ties).
        let next = queues
            .iter()
            .filter_map(|(p, q)| q.front().map(|&at| (time_of(at), *p)))
            .min();
        if let Some((_, p)) = next
            && let Some(at) = queues.get_mut(&p).and_then(|q| q.pop_front())
        {
            chunk.push(at);
            if chunk.len() < CHUNK {
                continue;
            }
        }
        if chunk.is_empty() {
            break;
        }
        // Processing time follows the data.
        if let Some(max) = chunk.iter().map(|&at| time_of(at)).max() {
            now_ms = now_ms.max(max);
        }
        let columns: Vec<&RecordBatch> = decoded_batches.iter().map(|d| &d.0).collect();
        let mut split: BTreeMap<i32, Vec<(usize, usize)>> = BTreeMap::new();
        for &(b, r) in &chunk {
            let i = instance_of
                .get(&decoded_batches[b].2[r])
                .copied()
                .unwrap_or(-1);
            split.entry(i).or_default().push((b, r));
        }
        for (i, rows) in split {
            let batch = datafusion::arrow::compute::interleave_record_batch(&columns, &rows)?;
            let partitions: Vec<i32> = rows.iter().map(|&(b, r)| decoded_batches[b].2[r]).collect();
            let offsets: Vec<i64> = rows.iter().map(|&(b, r)| decoded_batches[b].3[r]).collect();
            let mut out = match instances.get_mut(&i) {
                Some(query) => {
                    query
                        .process(&batch, &partitions, Some(&offsets), now_ms)
                        .await?
                }
                None => continue,
            };
            loop {
                if let Some(query) = instances.get(&i) {
                    take(query, out, limit, &mut summary, None::<&mut std::io::Sink>)?;
                }
                match instances.get_mut(&i) {
                    Some(query) if query.is_due() => out = query.tick(now_ms).await?,
                    _ => break,
                }
            }
        }
        // The instances the chunk gave no rows: the clock goes on for them too (early
        // results).
        for query in instances.values_mut() {
            while query.is_due() {
                let out = query.tick(now_ms).await?;
                take(query, out, limit, &mut summary, None::<&mut std::io::Sink>)?;
            }
        }
        meter.check_all(instances.values())?;
        chunk.clear();
    }
    for query in instances.values_mut() {
        let mut out = query.advance_watermark(i64::MAX / 4, now_ms).await?;
        loop {
            take(query, out, limit, &mut summary, None::<&mut std::io::Sink>)?;
            if !query.is_due() {
                break;
            }
            out = query.tick(now_ms).await?;
        }
    }
    Ok(summary)
}

/// Counts and keeps what one step gave.
fn take<W: Write + ?Sized>(
    query: &StreamQuery,
    out: crate::plan::stream::StepOutput,
    limit: usize,
    summary: &mut RunSummary,
    output: Option<&mut W>,
) -> Result<()> {
    for d in &out.diverted {
        *summary
            .diverted
            .entry(d.reason.as_str().to_string())
            .or_default() += 1;
    }
    // Rows the query failed on go to the DLQ in the service.
    for f in &out.failed {
        summary.rejected += 1;
        summary
            .first_rejection
            .get_or_insert_with(|| format!("the query failed on a row: {}", f.error));
    }
    // So do windows' results the plan above the windows failed on.
    for r in &out.refused {
        summary.refused_results += 1;
        summary.first_refused_result.get_or_insert_with(|| {
            format!(
                "the query failed on a result of its window, {}: {}",
                r.row, r.error
            )
        });
    }
    let mut output = output;
    for rows in out.rows {
        let rows = match query.sink() {
            Some(sink) => crate::sink::conform_stream(&rows, &sink.topic_schema)?,
            None => rows,
        };
        // A row with a float JSON cannot carry goes to the DLQ in the service (a JSON topic),
        // and would be written with a null in --output.
        let rows = match query.sink().map(|s| s.options.format) {
            Some(crate::topics::Format::Json) | None => {
                let (kept, unwritable) = crate::sink::without_non_finite(&rows)?;
                for (row, why) in unwritable {
                    summary.refused_results += 1;
                    summary
                        .first_refused_result
                        .get_or_insert_with(|| format!("{row}: {why}"));
                }
                kept
            }
            Some(_) => rows,
        };
        if rows.num_rows() == 0 {
            continue;
        }
        summary.output_rows += rows.num_rows() as u64;
        let shown: usize = summary.shown.iter().map(RecordBatch::num_rows).sum();
        if shown < limit {
            summary
                .shown
                .push(rows.slice(0, (limit - shown).min(rows.num_rows())));
        }
        if let Some(w) = output.as_deref_mut() {
            let (bytes, _) = crate::sink::encode_json_rows(&rows)?;
            w.write_all(&bytes)
                .map_err(|e| Error::Config(format!("writing the output: {e}")))?;
        }
    }
    Ok(())
}

/// `batch` with its text columns that are boolean fields of the stream (`fields`) read as
/// booleans (JSON carries no text for them), rows whose text is not one left out and
/// counted as rejected with the reason.
fn read_booleans(
    batch: &RecordBatch,
    fields: &Schema,
    summary: &mut RunSummary,
) -> Result<RecordBatch> {
    let mut columns = batch.columns().to_vec();
    let mut schema: Vec<Field> = batch
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    let mut keep = vec![true; batch.num_rows()];
    for (c, field) in batch.schema().fields().iter().enumerate() {
        // A number written with spaces around it (`a, 7` after a comma) is the number.
        let is_number = fields
            .field_with_name(field.name())
            .is_ok_and(|f| f.data_type().is_numeric());
        if is_number && field.data_type() == &DataType::Utf8 {
            let text = columns[c].as_string::<i32>();
            columns[c] = Arc::new(
                text.iter()
                    .map(|t| t.map(str::trim))
                    .collect::<datafusion::arrow::array::StringArray>(),
            );
            continue;
        }
        let is_boolean = fields
            .field_with_name(field.name())
            .is_ok_and(|f| f.data_type() == &DataType::Boolean);
        if !is_boolean || field.data_type() != &DataType::Utf8 {
            continue;
        }
        // As the service's decoder reads a boolean written as text.
        let text = columns[c].as_string::<i32>();
        let read: ArrayRef = Arc::new(
            text.iter()
                .map(|t| crate::decode::boolean_text(t?))
                .collect::<datafusion::arrow::array::BooleanArray>(),
        );
        for (r, kept) in keep.iter_mut().enumerate() {
            if *kept && text.is_valid(r) && read.is_null(r) {
                *kept = false;
                summary.rejected += 1;
                if summary.first_rejection.is_none() {
                    summary.first_rejection = Some(format!(
                        "field {}: {:?} is not a boolean (write true or false)",
                        field.name(),
                        text.value(r)
                    ));
                }
            }
        }
        columns[c] = read;
        schema[c] = Field::new(field.name(), DataType::Boolean, true);
    }
    let out = RecordBatch::try_new(Arc::new(Schema::new(schema)), columns)?;
    if keep.iter().all(|k| *k) {
        return Ok(out);
    }
    Ok(datafusion::arrow::compute::filter_record_batch(
        &out,
        &keep.into_iter().map(Some).collect(),
    )?)
}

/// Milliseconds per unit of a numeric event-time column (`s`, `ms`); `None` for `us`.
pub fn unit_ms(unit: &str) -> Result<Option<i64>> {
    match unit {
        "s" => Ok(Some(1_000)),
        "ms" => Ok(Some(1)),
        "us" => Ok(None),
        other => Err(Error::Config(format!(
            "--time-unit {other}: write s, ms or us"
        ))),
    }
}

/// Checks that `path` ends as a Parquet file does (its footer: the metadata's length, then
/// `PAR1`) and that the metadata's length fits in the file, which the Parquet reader takes on
/// trust (a file of 8 bytes panicked it).
fn parquet_footer(path: &str) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    let not_parquet = |why: String| Error::Config(format!("{path} is not a Parquet file: {why}"));
    let unread = |e: std::io::Error| Error::Config(format!("{path}: {e}"));
    let mut file = std::fs::File::open(path).map_err(unread)?;
    let len = file.metadata().map_err(unread)?.len();
    if len < 12 {
        return Err(not_parquet(format!(
            "{len} bytes, fewer than the 12 of the smallest one"
        )));
    }
    let mut head = [0u8; 4];
    file.read_exact(&mut head).map_err(unread)?;
    let mut tail = [0u8; 8];
    file.seek(SeekFrom::End(-8)).map_err(unread)?;
    file.read_exact(&mut tail).map_err(unread)?;
    if &head != b"PAR1" || !matches!(&tail[4..], b"PAR1" | b"PARE") {
        return Err(not_parquet("it does not start and end with PAR1".into()));
    }
    let metadata = u64::from(u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]));
    if metadata > len - 12 {
        return Err(not_parquet(format!(
            "its footer gives {metadata} bytes of metadata, more than the file's {len} bytes hold"
        )));
    }
    Ok(())
}

/// Opens `file` (CSV, JSON lines or Parquet) as a stream of batches, columns renamed by `rename`
/// (`old=new`), ordered by the instant of the `time` column when given (read as by
/// [`with_epoch_ms`] with its unit and zone); `time` and `key` must name columns after
/// renaming. A CSV's event-time column is read as text (a time with an offset keeps it);
/// with `text`, every column of a CSV is (for a schema to read, rather than types guessed
/// from its first rows, which fail the whole file when a later row differs).
///
/// Lines that cannot be a row (a CSV row with more or fewer fields than the header, a line
/// that is not UTF-8, a JSON line that is not one object) are left out, counted and the first
/// named with its line number ([`OpenedFile::malformed`]): one such line once failed the whole
/// file.
pub async fn open_file(
    file: &std::path::Path,
    rename: &[String],
    (time, unit_ms, zone): (Option<&str>, Option<i64>, &str),
    key: Option<&str>,
    text: bool,
) -> Result<OpenedFile> {
    check_time_zone(zone)?;
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
    // Sorting a large file spills to disk rather than holding it all.
    let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
        .with_memory_limit(FILE_MEMORY, 1.0)
        .build_arc()?;
    // One partition: without an event time the rows go in the file's order, which a scan
    // split over several partitions (and merged as they come) does not keep.
    let config = datafusion::prelude::SessionConfig::new()
        .with_target_partitions(1)
        .with_repartition_file_scans(false);
    let ctx = SessionContext::new_with_config_rt(config, runtime);
    let shown = file.display().to_string();
    let extension = file
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    // The event time's column as the file names it.
    let time_in_file = time.map(|t| {
        renames
            .iter()
            .find(|(_, new)| new == t)
            .map_or(t.to_string(), |(old, _)| old.clone())
    });
    let (cleaned, malformed, mixed) = match extension.as_str() {
        "csv" | "jsonl" | "ndjson" | "json" => {
            let file = file.to_path_buf();
            let csv = extension == "csv";
            tokio::task::spawn_blocking(move || {
                crate::files::check_line_lengths(&file)?;
                without_malformed_lines(&file, csv, time_in_file.as_deref())
            })
            .await
            .map_err(|e| Error::Config(format!("{shown}: {e}")))??
        }
        _ => (None, Malformed::default(), HashSet::new()),
    };
    // The rows are read from the copy without the malformed lines, if one was made; errors
    // name the file given.
    let path = match &cleaned {
        Some(copy) => copy.display().to_string(),
        None => shown.clone(),
    };
    if matches!(extension.as_str(), "csv" | "jsonl" | "ndjson" | "json") {
        // Batches of about FILE_BATCH_BYTES whatever the rows' length: 550 rows of 200 KB
        // made one batch of 110 MB, which the sort could not hold twice in FILE_MEMORY.
        let rows = {
            let path = PathBuf::from(&path);
            tokio::task::spawn_blocking(move || rows_per_batch(&path))
                .await
                .map_err(|e| Error::Config(format!("{shown}: {e}")))?
                .map_err(|e| Error::Config(format!("{shown}: {e}")))?
        };
        let state = ctx.state_ref();
        let mut state = state.write();
        state.config_mut().options_mut().execution.batch_size =
            datafusion::common::config::ConfigNonZeroUsize::try_new(rows)?;
    }
    match extension.as_str() {
        "csv" => {
            // Types are guessed from every row (a value of another type after the first
            // thousand failed the whole file), and a column of codes written with leading
            // zeros or a sign (`0101`, `+84`) is text (as a number, `0101` became 101).
            let guessed = ctx
                .read_csv(
                    &path,
                    CsvReadOptions::new().schema_infer_max_records(usize::MAX),
                )
                .await?
                .schema()
                .as_arrow()
                .clone();
            let coded = {
                let (path, guessed) = (path.clone(), guessed.clone());
                tokio::task::spawn_blocking(move || {
                    std::fs::File::open(&path).map(|f| {
                        crate::reference::tables::coded_columns(
                            std::io::BufReader::new(f),
                            &guessed,
                        )
                    })
                })
                .await
                .map_err(|e| Error::Config(format!("{shown}: {e}")))?
                .map_err(|e| Error::Config(format!("{shown}: {e}")))?
            };
            let time_column = |name: &str| {
                time.is_some_and(|t| {
                    renames
                        .iter()
                        .find(|(old, _)| old == name)
                        .map_or(name, |(_, new)| new.as_str())
                        == t
                })
            };
            let schema = Schema::new(
                guessed
                    .fields()
                    .iter()
                    .zip(&coded)
                    .map(|(f, coded)| {
                        let as_text = text
                            || *coded
                            || (time_column(f.name())
                                && matches!(
                                    f.data_type(),
                                    DataType::Timestamp(..) | DataType::Date32 | DataType::Date64
                                ));
                        if as_text {
                            Field::new(f.name(), DataType::Utf8, true)
                        } else if matches!(f.data_type(), DataType::Int64 | DataType::Float64) {
                            number_text(f.name())
                        } else {
                            f.as_ref().clone()
                        }
                    })
                    .collect::<Vec<_>>(),
            );
            ctx.register_csv("input", &path, CsvReadOptions::new().schema(&schema))
                .await?
        }
        "jsonl" | "ndjson" | "json" => {
            let lines = {
                let path = PathBuf::from(&path);
                tokio::task::spawn_blocking(move || JsonLines::open(path, &mixed))
                    .await
                    .map_err(|e| Error::Config(format!("{shown}: {e}")))?
                    .map_err(|e| Error::Config(format!("{shown}: {e}")))?
            };
            let schema = lines.schema.clone();
            ctx.register_table(
                "input",
                Arc::new(datafusion::catalog::streaming::StreamingTable::try_new(
                    schema,
                    vec![Arc::new(lines)],
                )?),
            )?;
        }
        "parquet" => {
            parquet_footer(&path)?;
            ctx.register_parquet(
                "input",
                &path,
                datafusion::prelude::ParquetReadOptions::default(),
            )
            .await?
        }
        _ => {
            return Err(Error::Config(format!(
                "{shown}: the file's extension says neither .csv, .jsonl (.ndjson, .json) nor \
                 .parquet"
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
    // A Parquet file's columns come from its metadata: the same limit as a CSV's header (a
    // preview of 40 000 columns ran for minutes, past its time limit).
    if columns.len() > MAX_FIELDS_CHECKED {
        return Err(too_many_columns(&shown, columns.len()));
    }
    for (i, (old, new)) in renames.iter().enumerate() {
        if !columns.contains(old) {
            return Err(Error::Config(format!(
                "--rename {old}=…: {shown} has no column {old} (columns: {})",
                columns.join(", ")
            )));
        }
        // One name per column: a second rename of a column was ignored, and a rename onto
        // another column's name failed deep in the reader (or made two columns of one name).
        if renames[..i].iter().any(|(o, _)| o == old) {
            return Err(Error::Config(format!(
                "--rename {old}=… is given twice: rename a column once"
            )));
        }
        if let Some((first, _)) = renames[..i].iter().find(|(_, n)| n == new) {
            return Err(Error::Config(format!(
                "--rename {old}={new}: {first} is renamed {new} already: give each column \
                 its own name"
            )));
        }
        if new != old && columns.contains(new) && !renames.iter().any(|(o, _)| o == new) {
            return Err(Error::Config(format!(
                "--rename {old}={new}: {shown} has a column {new} already: rename that one \
                 too (--rename {new}=…), or choose another name"
            )));
        }
    }
    let renamed = |c: &String| {
        renames
            .iter()
            .find(|(old, _)| old == c)
            .map_or(c.clone(), |(_, new)| new.clone())
    };
    // A file without a row or a column (empty, or blank lines only) has no records.
    if columns.is_empty() {
        return Ok(OpenedFile {
            stream: Box::pin(datafusion::physical_plan::EmptyRecordBatchStream::new(
                Arc::new(Schema::empty()),
            )),
            malformed,
            _copy: cleaned,
        });
    }
    let names: Vec<String> = columns.iter().map(renamed).collect();
    for (what, column) in [("the event time's", time), ("the key's", key)] {
        if let Some(c) = column
            && !names.iter().any(|n| n == c)
        {
            return Err(Error::Config(format!(
                "{shown} has no column {c}, {what} column (columns after renaming: {}); \
                 rename the file's column to it, e.g. --rename time={c}",
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
        // By the instant, not by the text: `06:10+07:00` is before `00:00Z` of that day.
        let data_type = table
            .schema()
            .as_arrow()
            .field_with_name(&original)?
            .data_type()
            .clone();
        let zone = zone.to_string();
        ctx.register_udf(datafusion::logical_expr::create_udf(
            "event_ms",
            vec![data_type],
            DataType::Int64,
            datafusion::logical_expr::Volatility::Immutable,
            Arc::new(move |args: &[datafusion::logical_expr::ColumnarValue]| {
                let arrays = datafusion::logical_expr::ColumnarValue::values_to_arrays(args)?;
                let ms = epoch_ms(&arrays[0], unit_ms, &zone)
                    .map_err(|e| datafusion::error::DataFusionError::Execution(e.to_string()))?;
                Ok(datafusion::logical_expr::ColumnarValue::Array(Arc::new(ms)))
            }),
        ));
        sql.push_str(&format!(
            " ORDER BY event_ms(\"{}\")",
            original.replace('"', "\"\"")
        ));
    }
    let stream = ctx.sql(&sql).await?.execute_stream().await?;
    // A Parquet file's floats go on as their texts: as JSON, NaN and the infinities were
    // nulls, accepted where the stream's schema refuses them; and its timestamps without a
    // zone as the instants they are in `zone`, as its event time is.
    let stream = match extension.as_str() {
        "parquet" => parquet_values(stream, zone)?,
        _ => stream,
    };
    // Errors reading the copy name the file given, not the copy.
    let stream = match &cleaned {
        Some(copy) => {
            let copy = copy.display().to_string();
            let schema = stream.schema();
            let named = stream.map(move |batch| {
                batch.map_err(|e| match e {
                    e @ datafusion::error::DataFusionError::ResourcesExhausted(_) => e,
                    // DataFusion names a local file by its path without the leading '/'.
                    e => datafusion::error::DataFusionError::Execution(
                        e.to_string()
                            .replace(&copy, &shown)
                            .replace(copy.trim_start_matches('/'), &shown),
                    ),
                })
            });
            Box::pin(
                datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(schema, named),
            )
        }
        None => stream,
    };
    Ok(OpenedFile {
        stream,
        malformed,
        _copy: cleaned,
    })
}

/// A column of numbers read as the texts they are written as, for the stream's schema to read
/// (through a guessed float, `0.1000000000000000055` lost its digits).
fn number_text(name: &str) -> Field {
    Field::new(name, DataType::Utf8, true)
        .with_metadata(HashMap::from([(JSON_NUMBER_TEXT.into(), "true".into())]))
}

/// `stream` (a Parquet file's rows) with its float columns as the texts of their values
/// ([`number_text`]) and its timestamps without a zone as the instants they are in `zone`
/// (read as UTC, a column beside the event time was hours off from it).
fn parquet_values(
    stream: datafusion::physical_plan::SendableRecordBatchStream,
    zone: &str,
) -> Result<datafusion::physical_plan::SendableRecordBatchStream> {
    let input = stream.schema();
    let fields: Vec<Field> = input
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            DataType::Float16 | DataType::Float32 | DataType::Float64 => number_text(f.name()),
            DataType::Timestamp(_, None) => Field::new(
                f.name(),
                DataType::Timestamp(TimeUnit::Millisecond, Some("+00:00".into())),
                true,
            ),
            _ => f.as_ref().clone(),
        })
        .collect();
    let schema = Arc::new(Schema::new(fields));
    let out = schema.clone();
    let zone = zone.to_string();
    Ok(Box::pin(
        datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(
            schema,
            stream.map(move |batch| {
                let batch = batch?;
                let columns = batch
                    .columns()
                    .iter()
                    .zip(out.fields())
                    .map(|(c, f)| match (c.data_type(), f.data_type()) {
                        (from, to) if from == to => Ok(c.clone()),
                        (DataType::Timestamp(_, None), to) => {
                            let local =
                                local_ms(&cast(c, &DataType::Utf8)?, &zone).map_err(|e| {
                                    datafusion::arrow::error::ArrowError::ExternalError(Box::new(e))
                                })?;
                            cast(&local, to)
                        }
                        (_, to) => cast(c, to),
                    })
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                Ok(RecordBatch::try_new(out.clone(), columns)?)
            }),
        ),
    ))
}

/// The rows of a JSON-lines file, its numbers read as the texts they are written as (marked
/// [`JSON_NUMBER_TEXT`], written back as numbers) for the stream's schema to read: a type
/// guessed from the file read `12345678901234567890`, or any integer in a column that also
/// holds fractions, through a float, and changed it.
#[derive(Debug)]
struct JsonLines {
    path: PathBuf,
    schema: datafusion::arrow::datatypes::SchemaRef,
}

impl JsonLines {
    /// The file at `path`, its columns and their types found from every line; the fields
    /// `mixed` hold their values' JSON texts ([`without_malformed_lines`]). Blocking.
    fn open(
        path: PathBuf,
        mixed: &HashSet<String>,
    ) -> std::result::Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let file = std::io::BufReader::new(std::fs::File::open(&path)?);
        let (guessed, _) = datafusion::arrow::json::reader::infer_json_schema(file, None)?;
        let fields: Vec<Field> = guessed
            .fields()
            .iter()
            .map(|f| match f.data_type() {
                _ if mixed.contains(f.name()) => Field::new(f.name(), DataType::Utf8, true)
                    .with_metadata(HashMap::from([(JSON_VALUE_TEXT.into(), "true".into())])),
                DataType::Int64 | DataType::Float64 => number_text(f.name()),
                _ => f.as_ref().clone(),
            })
            .collect();
        Ok(Self {
            path,
            schema: Arc::new(Schema::new(fields)),
        })
    }
}

impl datafusion::physical_plan::streaming::PartitionStream for JsonLines {
    fn schema(&self) -> &datafusion::arrow::datatypes::SchemaRef {
        &self.schema
    }

    fn execute(
        &self,
        ctx: Arc<datafusion::execution::TaskContext>,
    ) -> datafusion::physical_plan::SendableRecordBatchStream {
        let mut builder = datafusion::physical_plan::stream::RecordBatchReceiverStreamBuilder::new(
            self.schema.clone(),
            2,
        );
        let tx = builder.tx();
        let (path, schema) = (self.path.clone(), self.schema.clone());
        let batch_size = ctx.session_config().batch_size();
        builder.spawn_blocking(move || {
            let file = std::io::BufReader::new(std::fs::File::open(&path)?);
            let reader = datafusion::arrow::json::ReaderBuilder::new(schema)
                .with_coerce_primitive(true)
                .with_batch_size(batch_size)
                .build(file)?;
            for batch in reader {
                // The stream was dropped: stop reading.
                if tx.blocking_send(batch.map_err(Into::into)).is_err() {
                    break;
                }
            }
            Ok(())
        });
        builder.build()
    }
}

/// A file opened by [`open_file`].
pub struct OpenedFile {
    /// Its rows, in order.
    pub stream: datafusion::physical_plan::SendableRecordBatchStream,
    /// The lines left out.
    pub malformed: Malformed,
    /// The copy without them the rows are read from, if one was made: kept while they are.
    _copy: Option<tempfile::TempPath>,
}

/// Lines of a file that cannot be a row: left out, counted, the first named.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Malformed {
    /// Lines left out.
    pub lines: u64,
    /// The first of them: its line number and why.
    pub first: Option<String>,
}

/// `file` (a CSV with its header, or JSON lines) without the lines that cannot be a row: a CSV
/// row with more or fewer fields than the header, a row or line that is not UTF-8, a JSON line
/// that is not one object, or whose event time (field `time`) holds another kind of value
/// (number, text, true or false, list, object) than most lines' do.
///
/// A JSON field whose values are of several kinds (`12.5` on most lines, `"12.5"` or `"n/a"`
/// on some) cannot be read as one column of one type: it is carried as its values' JSON texts
/// (the third of the result; the copy has them as strings), written back as the values they
/// are ([`JSON_VALUE_TEXT`]), for the stream's schema to read or reject each as the service's
/// decoder does. Such a line was once left out whole.
///
/// When nothing changes, no copy; else a copy, in a temporary file of the same extension.
/// Blocking.
fn without_malformed_lines(
    file: &std::path::Path,
    csv: bool,
    time: Option<&str>,
) -> Result<(Option<tempfile::TempPath>, Malformed, HashSet<String>)> {
    let shown = file.display().to_string();
    let failed = |e: std::io::Error| Error::Config(format!("{shown}: {e}"));
    let mut malformed = Malformed::default();
    let mut note = |line: u64, why: String| {
        malformed.lines += 1;
        if malformed.first.is_none() {
            malformed.first = Some(format!("line {line}: {why}"));
        }
    };
    let copy = || -> Result<tempfile::NamedTempFile> {
        let extension = file
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or_default();
        tempfile::Builder::new()
            .prefix("urbanstream-rows-")
            .suffix(&format!(".{extension}"))
            .tempfile()
            .map_err(failed)
    };
    if csv {
        let open = || {
            csv::ReaderBuilder::new()
                .flexible(true)
                .from_path(file)
                .map_err(|e| Error::Config(format!("{shown}: {e}")))
        };
        let why = |record: &csv::ByteRecord, width: usize| {
            if record.len() != width {
                Some(format!(
                    "{} fields where the header has {width}",
                    record.len()
                ))
            } else if std::str::from_utf8(record.as_slice()).is_err() {
                Some("not UTF-8".to_string())
            } else {
                None
            }
        };
        let mut reader = open()?;
        let header = reader
            .byte_headers()
            .map_err(|e| Error::Config(format!("{shown}: {e}")))?
            .clone();
        if std::str::from_utf8(header.as_slice()).is_err() {
            return Err(Error::Config(format!(
                "{shown}: its header (line 1) is not UTF-8 text: a file of rows is UTF-8 (a \
                 UTF-16 file converts with `iconv -f UTF-16 -t UTF-8`)"
            )));
        }
        // A header names each column once: with a name twice or none, which column a field
        // of the stream is read from is anyone's guess.
        let mut seen = std::collections::HashSet::new();
        for (i, name) in header.iter().enumerate() {
            let name = String::from_utf8_lossy(name);
            let name = name.trim_start_matches('\u{feff}').trim();
            if name.is_empty() {
                return Err(Error::Config(format!(
                    "{shown}: column {} of the header has no name: name every column (or \
                     remove the empty one)",
                    i + 1
                )));
            }
            if !seen.insert(name.to_string()) {
                return Err(Error::Config(format!(
                    "{shown}: the header names column {name} twice: name each column once \
                     (--rename maps a name to the stream's field)"
                )));
            }
        }
        let width = header.len();
        if width > MAX_FIELDS_CHECKED {
            return Err(too_many_columns(&shown, width));
        }
        let mut record = csv::ByteRecord::new();
        while reader
            .read_byte_record(&mut record)
            .map_err(|e| Error::Config(format!("{shown}: {e}")))?
        {
            if let Some(why) = why(&record, width) {
                let line = record.position().map_or(0, |p| p.line());
                note(line, why);
            }
        }
        if malformed.lines == 0 {
            return Ok((None, malformed, HashSet::new()));
        }
        let out = copy()?;
        let mut reader = open()?;
        let mut writer = csv::Writer::from_writer(std::io::BufWriter::new(out.as_file()));
        let header = reader
            .byte_headers()
            .map_err(|e| Error::Config(format!("{shown}: {e}")))?
            .clone();
        let write_failed = |e: csv::Error| Error::Config(format!("a copy of {shown}: {e}"));
        writer.write_byte_record(&header).map_err(write_failed)?;
        while reader
            .read_byte_record(&mut record)
            .map_err(|e| Error::Config(format!("{shown}: {e}")))?
        {
            if why(&record, width).is_none() {
                writer.write_byte_record(&record).map_err(write_failed)?;
            }
        }
        writer.flush().map_err(failed)?;
        drop(writer);
        return Ok((Some(out.into_temp_path()), malformed, HashSet::new()));
    }
    use std::io::{BufRead, Write};
    /// A line's fields, each as the JSON text it is written as; `None` for a blank line.
    fn parse(line: &[u8]) -> Option<std::result::Result<Fields<'_>, String>> {
        let line = without_bom(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            return None;
        }
        // Deeper than the readers take, the line failed the whole file.
        if let Some(why) = crate::decode::nested_too_deep(line) {
            return Some(Err(why));
        }
        Some(match serde_json::from_slice::<Fields<'_>>(line) {
            // A number past a double's range (`1e400`) is no value a reader of the file
            // takes: its line goes, as a line that is no object does (it failed the file).
            Ok(fields) => {
                let past = fields
                    .iter()
                    .find(|(_, v)| {
                        json_kind(v) == Some(0)
                            && v.get().parse::<f64>().is_ok_and(f64::is_infinite)
                    })
                    .map(|(name, v)| {
                        format!(
                            "field {name} holds {}, a number past the range of a double",
                            v.get()
                        )
                    })
                    // An escape that is no character (`\ud800`, half of a pair) is no text a
                    // reader of the file takes: it failed the whole file.
                    .or_else(|| {
                        fields.iter().find_map(|(name, v)| {
                            if !v.get().contains("\\u") {
                                return None;
                            }
                            serde_json::from_str::<serde_json::Value>(v.get())
                                .err()
                                .map(|e| format!("field {name} holds no text: {e}"))
                        })
                    });
                match past {
                    Some(why) => Err(why),
                    None => Ok(fields),
                }
            }
            Err(_) if serde_json::from_slice::<serde::de::IgnoredAny>(line).is_ok() => {
                Err("not a JSON object".to_string())
            }
            Err(e) if e.is_data() || e.is_syntax() || e.is_eof() => {
                Err(format!("not one JSON object ({e})"))
            }
            Err(e) => Err(e.to_string()),
        })
    }
    let lines = |f: &std::path::Path| -> Result<std::io::Split<std::io::BufReader<std::fs::File>>> {
        Ok(std::io::BufReader::new(std::fs::File::open(f).map_err(failed)?).split(b'\n'))
    };
    // The kinds of value each field holds over the file.
    let mut kinds: HashMap<String, [u64; 5]> = HashMap::new();
    let mut bad_lines = false;
    for line in lines(file)? {
        match parse(&line.map_err(failed)?) {
            Some(Ok(fields)) => {
                for (name, value) in fields.iter() {
                    // A field only ever null is a column too.
                    if !kinds.contains_key(name) {
                        // A file of ever new field names is not a stream's rows.
                        if kinds.len() >= MAX_FIELDS_CHECKED {
                            return Err(too_many_columns(&shown, kinds.len() + 1));
                        }
                        kinds.insert(name.clone(), [0; 5]);
                    }
                    if let (Some(kind), Some(counts)) = (json_kind(value), kinds.get_mut(name)) {
                        counts[kind] += 1;
                    }
                }
            }
            Some(Err(_)) => bad_lines = true,
            None => {}
        }
    }
    let mixed: HashSet<String> = kinds
        .iter()
        .filter(|(_, counts)| counts.iter().filter(|n| **n > 0).count() > 1)
        .map(|(name, _)| name.clone())
        .collect();
    // The event time is read by the file's rows, not by the stream's schema: a line whose time
    // is of another kind than most lines' is left out.
    let usual_time: Option<(&str, usize)> = time.filter(|t| mixed.contains(*t)).and_then(|t| {
        let counts = kinds.get(t)?;
        Some((t, (0..counts.len()).max_by_key(|k| counts[*k])?))
    });
    let carried: HashSet<String> = mixed
        .iter()
        .filter(|name| Some(name.as_str()) != time)
        .cloned()
        .collect();
    // A file that begins with a byte-order mark (as some Windows tools write UTF-8) is read
    // from a copy without it: the first line was rejected as no JSON object.
    let bom = {
        let mut first = [0u8; 3];
        std::io::Read::read_exact(&mut std::fs::File::open(file).map_err(failed)?, &mut first)
            .is_ok()
            && first == UTF8_BOM
    };
    if !bad_lines && mixed.is_empty() && !bom {
        return Ok((None, malformed, carried));
    }
    let why = |fields: &Fields<'_>| -> Option<String> {
        let (name, most) = usual_time?;
        let kind = json_kind(fields.get(name)?)?;
        (kind != most).then(|| {
            format!(
                "field {name} holds {} where most lines hold {}",
                JSON_KINDS[kind], JSON_KINDS[most]
            )
        })
    };
    let out = copy()?;
    let mut writer = std::io::BufWriter::new(out.as_file());
    let mut rewritten = Vec::new();
    for (i, line) in lines(file)?.enumerate() {
        let line = line.map_err(failed)?;
        let fields = match parse(&line) {
            None => continue,
            Some(Err(why)) => {
                note(i as u64 + 1, why);
                continue;
            }
            Some(Ok(fields)) => fields,
        };
        if let Some(why) = why(&fields) {
            note(i as u64 + 1, why);
            continue;
        }
        if fields
            .iter()
            .any(|(name, value)| carried.contains(name) && json_kind(value).is_some())
        {
            // The line again, with the carried fields' values as the strings of their texts.
            rewritten.clear();
            rewritten.push(b'{');
            for (n, (name, value)) in fields.iter().enumerate() {
                if n > 0 {
                    rewritten.push(b',');
                }
                serde_json::to_writer(&mut rewritten, name)
                    .map_err(|e| Error::Config(format!("{shown}: {e}")))?;
                rewritten.push(b':');
                if carried.contains(name) && json_kind(value).is_some() {
                    serde_json::to_writer(&mut rewritten, value.get())
                        .map_err(|e| Error::Config(format!("{shown}: {e}")))?;
                } else {
                    rewritten.extend_from_slice(value.get().as_bytes());
                }
            }
            rewritten.push(b'}');
            writer.write_all(&rewritten).map_err(failed)?;
        } else {
            writer.write_all(without_bom(&line)).map_err(failed)?;
        }
        writer.write_all(b"\n").map_err(failed)?;
    }
    writer.flush().map_err(failed)?;
    drop(writer);
    Ok((Some(out.into_temp_path()), malformed, carried))
}

/// UTF-8's byte-order mark.
const UTF8_BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];

/// `line` without a byte-order mark it begins with.
fn without_bom(line: &[u8]) -> &[u8] {
    line.strip_prefix(&UTF8_BOM[..]).unwrap_or(line)
}

/// A JSON line's fields in the line's order, each as the JSON text it is written as (a name
/// given twice is there twice, as in the line; its value is the last, as a JSON reader takes
/// it).
#[derive(Debug)]
struct Fields<'a>(Vec<(String, &'a serde_json::value::RawValue)>);

impl<'a> Fields<'a> {
    fn iter(&self) -> impl Iterator<Item = &(String, &'a serde_json::value::RawValue)> {
        self.0.iter()
    }

    fn get(&self, name: &str) -> Option<&'a serde_json::value::RawValue> {
        self.0
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
    }
}

impl<'de: 'a, 'a> serde::Deserialize<'de> for Fields<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Object<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Object<'a> {
            type Value = Fields<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> std::result::Result<Fields<'a>, M::Error> {
                let mut fields = Vec::new();
                while let Some(field) = map.next_entry()? {
                    fields.push(field);
                }
                Ok(Fields(fields))
            }
        }
        d.deserialize_map(Object(std::marker::PhantomData))
    }
}

/// The refusal of file `shown` for its `columns` columns (more than [`MAX_FIELDS_CHECKED`]):
/// the rows are read through a query naming each column, whose planning grows faster than
/// the columns (300 000 columns took minutes, past a preview's time limit).
fn too_many_columns(shown: &str, columns: usize) -> Error {
    Error::Config(format!(
        "{shown}: {columns} columns or more, over the limit of {MAX_FIELDS_CHECKED}: a stream's \
         rows have fewer; leave out the columns the query does not read"
    ))
}

/// The most columns of a file read as a stream's rows (a CSV's, or the distinct fields of
/// JSON lines, whose kinds of value are checked line by line).
const MAX_FIELDS_CHECKED: usize = 4096;

/// The kinds of JSON value a column of one type holds, as [`json_kind`] numbers them.
const JSON_KINDS: [&str; 5] = ["a number", "a text", "true or false", "a list", "an object"];

/// Which of [`JSON_KINDS`] `value` is; `None` for null, which any column holds.
fn json_kind(value: &serde_json::value::RawValue) -> Option<usize> {
    match value.get().trim_start().as_bytes().first()? {
        b'n' => None,
        b'"' => Some(1),
        b't' | b'f' => Some(2),
        b'[' => Some(3),
        b'{' => Some(4),
        _ => Some(0),
    }
}

/// Refuses a `--time-zone` that names no zone (it failed on the first time without one,
/// with Arrow's words).
pub fn check_time_zone(zone: &str) -> Result<()> {
    zone.parse::<datafusion::arrow::array::timezone::Tz>()
        .map(|_| ())
        .map_err(|_| {
            Error::Config(format!(
                "--time-zone {zone}: not a time zone: write an offset such as +07:00, or a \
                 zone's name such as Asia/Ho_Chi_Minh"
            ))
        })
}

/// Epoch milliseconds of time texts (RFC 3339, or without a zone: local time in `zone`);
/// an unreadable text becomes null.
/// Why the event time `text`, unreadable in `zone`, is so, where it reads as a time without
/// a zone: a local time that daylight saving skips (the hour clocks jump over) or repeats
/// (the hour they go back over), which is no one instant.
pub fn why_unreadable(text: &str, zone: &str) -> Option<String> {
    let one: ArrayRef = Arc::new(datafusion::arrow::array::StringArray::from(vec![text]));
    let naive = local_ms(&one, "+00:00").ok()?;
    let zoned = local_ms(&one, zone).ok()?;
    (naive.is_valid(0) && zoned.is_null(0)).then(|| {
        format!(
            "{text} is skipped or repeated in {zone} where clocks change for daylight saving \
             time, so it is no one instant: write such times with their UTC offset \
             (2026-11-01 01:30-04:00 or -05:00)"
        )
    })
}

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

/// Epoch milliseconds of event times `column`: numbers (or number texts) in the unit of
/// `unit_ms` (milliseconds per unit; `None` for microseconds), fractions rounded to the
/// millisecond; texts as [`local_ms`] reads them; timestamps without a zone as local time in
/// `zone`. A time that cannot be read, or whose milliseconds do not fit, is null.
fn epoch_ms(column: &ArrayRef, unit_ms: Option<i64>, zone: &str) -> Result<Int64Array> {
    let from_integer = |n: i64| match unit_ms {
        Some(f) => n.checked_mul(f),
        None => Some(n.div_euclid(1_000)),
    };
    // A float is the decimal it is written as (its shortest form), cut as a text's is: the
    // same millisecond whichever way a file wrote it (rounded, `1.7672256069999e9` s fell in
    // the next second, and a Parquet file's rows were sorted by another millisecond than the
    // one they went on with).
    let from_float = |v: f64| {
        v.is_finite()
            .then(|| decimal_ms(&v.to_string(), unit_ms))
            .flatten()
    };
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
            let text = cast(column, &DataType::Utf8)?;
            let times = local_ms(&text, zone)?;
            let times = times.as_primitive::<datafusion::arrow::datatypes::Int64Type>();
            let text = text.as_string::<i32>();
            // A text that is a number is one in the unit (a CSV's columns are read as text).
            Arc::new(
                (0..text.len())
                    .map(|r| {
                        if times.is_valid(r) || text.is_null(r) {
                            return times.is_valid(r).then(|| times.value(r));
                        }
                        let t = text.value(r).trim();
                        match t.parse::<i64>() {
                            Ok(n) => from_integer(n),
                            Err(_) => decimal_ms(t, unit_ms)
                                .or_else(|| t.parse::<f64>().ok().and_then(&from_float)),
                        }
                    })
                    .collect::<Int64Array>(),
            )
        }
        DataType::Float16 | DataType::Float32 | DataType::Float64 => {
            let v = cast(column, &DataType::Float64)?;
            let v = v.as_primitive::<datafusion::arrow::datatypes::Float64Type>();
            Arc::new(
                v.iter()
                    .map(|v| v.and_then(from_float))
                    .collect::<Int64Array>(),
            )
        }
        _ => {
            let n = cast(column, &DataType::Int64)?;
            let n = n.as_primitive::<datafusion::arrow::datatypes::Int64Type>();
            Arc::new(
                n.iter()
                    .map(|n| n.and_then(from_integer))
                    .collect::<Int64Array>(),
            )
        }
    };
    ms.as_any()
        .downcast_ref::<Int64Array>()
        .cloned()
        .ok_or_else(|| Error::Config("event times did not convert to milliseconds".into()))
}

/// The epoch milliseconds of the decimal number `text` in the unit of `unit_ms` (as
/// [`epoch_ms`] takes it), exactly, the millisecond it falls in (as a time text's fraction is
/// cut): through a float, `1767225606.9999` seconds rounded to the next second. `None` for a
/// text that is no decimal number (`1e9`) or whose milliseconds do not fit.
fn decimal_ms(text: &str, unit_ms: Option<i64>) -> Option<i64> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(digits) => (true, digits),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let is_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !is_digits(whole) || !is_digits(fraction) {
        return None;
    }
    // The fraction digits milliseconds keep: 3 for seconds ([`unit_ms`]: s, ms or us), none
    // for milliseconds and microseconds.
    let kept = if unit_ms == Some(1_000) { 3 } else { 0 };
    let mut scaled: i128 = whole.parse().ok()?;
    for k in 0..kept {
        let digit = fraction.as_bytes().get(k).map_or(0, |d| d - b'0');
        scaled = scaled.checked_mul(10)?.checked_add(i128::from(digit))?;
    }
    let cut = fraction.bytes().skip(kept).any(|d| d != b'0');
    // The floor: a negative time's cut fraction takes it one unit earlier.
    let floor = if negative {
        -scaled - i128::from(cut)
    } else {
        scaled
    };
    // Seconds are milliseconds now, as milliseconds are; microseconds are not yet.
    let ms = match unit_ms {
        None => floor.div_euclid(1_000),
        Some(_) => floor,
    };
    i64::try_from(ms).ok()
}

/// `batch` with column `time` as epoch milliseconds (a timestamp column in the output, so
/// that JSON carries numbers), rows without a readable time left out (counted in `summary`);
/// and those milliseconds.
pub fn with_epoch_ms(
    batch: &RecordBatch,
    time: &str,
    unit_ms: Option<i64>,
    zone: &str,
    unreadable: &mut Unreadable,
) -> Result<(RecordBatch, Int64Array)> {
    let Some(index) = batch.schema().index_of(time).ok() else {
        return Err(Error::Config(format!(
            "event-time column {time} is missing"
        )));
    };
    let column = batch.column(index);
    let ms = epoch_ms(column, unit_ms, zone)?;
    let readable = datafusion::arrow::compute::is_not_null(&ms)?;
    let unread = ms.len() - readable.true_count();
    if unread > 0 {
        unreadable.skipped += unread as u64;
        if unreadable.first.is_none()
            && let Some(r) = (0..ms.len()).find(|r| ms.is_null(*r))
        {
            // A JSON file's column of nulls only is of the null type, whose rows have no
            // validity of their own.
            let null = column.is_null(r) || *column.data_type() == DataType::Null;
            unreadable.first = Some(match null {
                true => "null (no time)".into(),
                false => datafusion::arrow::util::display::array_value_to_string(column, r)
                    .unwrap_or_default(),
            });
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

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes::Int64Type;
    use futures::StreamExt;

    /// A Parquet file of more columns than a stream's rows may have is refused, as a CSV of
    /// them is, before its rows are read (a preview of a file of 40 000 columns ran for
    /// minutes, past its time limit, holding a preview's place); one at the limit opens.
    #[tokio::test]
    async fn a_parquet_file_of_too_many_columns_is_refused_as_a_csv_is() -> Result<()> {
        use datafusion::arrow::array::Int64Array;
        use datafusion::parquet::arrow::ArrowWriter;
        let dir = tempfile::tempdir()?;
        let parquet = |e: datafusion::parquet::errors::ParquetError| Error::Config(e.to_string());
        for columns in [MAX_FIELDS_CHECKED, MAX_FIELDS_CHECKED + 1] {
            let path = dir.path().join(format!("wide{columns}.parquet"));
            let schema = Arc::new(Schema::new(
                (0..columns)
                    .map(|i| Field::new(format!("x{i}"), DataType::Int64, true))
                    .collect::<Vec<_>>(),
            ));
            let one = Arc::new(Int64Array::from(vec![1])) as ArrayRef;
            let batch = RecordBatch::try_new(schema.clone(), vec![one; columns])?;
            let mut writer = ArrowWriter::try_new(std::fs::File::create(&path)?, schema, None)
                .map_err(parquet)?;
            writer.write(&batch).map_err(parquet)?;
            writer.close().map_err(parquet)?;
            let opened = open_file(&path, &[], (None, None, "+00:00"), None, false).await;
            if columns > MAX_FIELDS_CHECKED {
                let error = opened.err().map(|e| e.to_string()).unwrap_or_default();
                assert!(
                    error.contains("4097 columns or more, over the limit of 4096"),
                    "{error}"
                );
            } else {
                opened?;
            }
        }
        Ok(())
    }

    /// A Parquet file's timestamps without a zone are local times in `--time-zone`, every
    /// column's as the event time's: a column beside the event time, written as the same
    /// local time, was read as UTC, hours off from it. A timestamp with a zone keeps its
    /// instant.
    #[tokio::test]
    async fn a_parquet_files_timestamps_without_a_zone_are_local_times() -> Result<()> {
        use datafusion::arrow::array::TimestampMicrosecondArray;
        use datafusion::parquet::arrow::ArrowWriter;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("local.parquet");
        // 2026-01-01 07:00 and 07:30:00.250 as written, local.
        let local = [1_767_250_800_000_000i64, 1_767_252_600_250_000];
        let naive = || Arc::new(TimestampMicrosecondArray::from(local.to_vec())) as ArrayRef;
        let schema = Arc::new(Schema::new(vec![
            Field::new(
                "event_time",
                DataType::Timestamp(TimeUnit::Microsecond, None),
                false,
            ),
            Field::new(
                "seen",
                DataType::Timestamp(TimeUnit::Microsecond, None),
                true,
            ),
            Field::new(
                "stamped",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                true,
            ),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                naive(),
                naive(),
                Arc::new(TimestampMicrosecondArray::from(local.to_vec()).with_timezone("UTC")),
            ],
        )?;
        let parquet = |e: datafusion::parquet::errors::ParquetError| Error::Config(e.to_string());
        let mut writer =
            ArrowWriter::try_new(std::fs::File::create(&path)?, schema, None).map_err(parquet)?;
        writer.write(&batch).map_err(parquet)?;
        writer.close().map_err(parquet)?;
        let mut opened = open_file(
            &path,
            &[],
            (Some("event_time"), None, "+07:00"),
            None,
            false,
        )
        .await?;
        let mut rows = Vec::new();
        while let Some(batch) = opened.stream.next().await {
            let batch = batch?;
            let (batch, times) = with_epoch_ms(
                &batch,
                "event_time",
                None,
                "+07:00",
                &mut Unreadable::default(),
            )?;
            let ms = |name: &str| -> Result<Vec<i64>> {
                let column = batch
                    .column_by_name(name)
                    .ok_or_else(|| Error::Config(format!("no {name}")))?;
                let column = cast(
                    &cast(column, &DataType::Timestamp(TimeUnit::Millisecond, None))?,
                    &DataType::Int64,
                )?;
                Ok(column.as_primitive::<Int64Type>().values().to_vec())
            };
            for ((t, seen), stamped) in times.values().iter().zip(ms("seen")?).zip(ms("stamped")?) {
                rows.push((*t, seen, stamped));
            }
        }
        // 07:00+07:00 is 00:00Z.
        assert_eq!(
            rows,
            vec![
                (1_767_225_600_000, 1_767_225_600_000, 1_767_250_800_000),
                (1_767_227_400_250, 1_767_227_400_250, 1_767_252_600_250),
            ]
        );
        Ok(())
    }

    /// A CSV's column types are guessed from every row, and codes written with leading zeros
    /// stay text: a station `0101` was replayed as the number 101, and a `2.5` after a
    /// thousand whole numbers failed the whole file.
    #[tokio::test]
    async fn a_csvs_codes_stay_text_and_its_types_fit_every_row() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("stations.csv");
        let mut text = String::from("station,n,v\n");
        for i in 0..1_300 {
            text.push_str(&format!("0{},{i},{i}\n", 101 + i % 3));
        }
        text.push_str("0101,7,2.5\n");
        std::fs::write(&path, text)?;
        let mut opened = open_file(&path, &[], (None, None, "+00:00"), None, false).await?;
        let (mut rows, mut last) = (0, None);
        while let Some(batch) = opened.stream.next().await {
            let batch = batch?;
            let schema = batch.schema();
            // Numbers go on as their texts, marked as numbers; codes as plain text.
            let numbers: Vec<bool> = schema
                .fields()
                .iter()
                .map(|f| f.metadata().contains_key(JSON_NUMBER_TEXT))
                .collect();
            assert_eq!(numbers, [false, true, true]);
            assert!(
                schema
                    .fields()
                    .iter()
                    .all(|f| f.data_type() == &DataType::Utf8)
            );
            rows += batch.num_rows();
            if batch.num_rows() > 0 {
                let stations = batch.column(0).as_string::<i32>();
                last = Some(stations.value(batch.num_rows() - 1).to_string());
            }
        }
        assert_eq!(rows, 1_301);
        assert_eq!(last.as_deref(), Some("0101"));
        Ok(())
    }

    /// Without an event time a file's rows come in the file's order, for JSON lines and CSV
    /// alike: a file of a few MB was read in pieces merged as they came (a replay sent later
    /// readings before earlier ones, and a query found the earlier ones late).
    #[tokio::test]
    async fn without_an_event_time_rows_keep_the_files_order() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let lines = 200_000;
        for (name, text) in [
            (
                "rows.jsonl",
                (0..lines)
                    .map(|i| {
                        format!(
                            "{{\"seq\":{i},\"sensor_id\":\"s-{}\",\"v\":1.5}}\n",
                            i % 500
                        )
                    })
                    .collect::<String>(),
            ),
            (
                "rows.csv",
                std::iter::once("seq,sensor_id,v\n".to_string())
                    .chain((0..lines).map(|i| format!("{i},s-{},1.5\n", i % 500)))
                    .collect::<String>(),
            ),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, text)?;
            let mut opened = open_file(&path, &[], (None, None, "+00:00"), None, false).await?;
            let mut seq = Vec::with_capacity(lines);
            while let Some(batch) = opened.stream.next().await {
                let batch = batch?;
                let column = cast(batch.column_by_name("seq").expect("seq"), &DataType::Int64)?;
                seq.extend(column.as_primitive::<Int64Type>().values().iter().copied());
            }
            assert_eq!(seq.len(), lines, "{name}");
            assert!(
                seq.windows(2).all(|w| w[0] < w[1]),
                "{name}: out of order at {:?}",
                seq.windows(2).position(|w| w[0] >= w[1])
            );
        }
        Ok(())
    }

    /// A CSV header naming a column twice or leaving one unnamed is refused, naming it: the
    /// first said "expected 4 fields, got more than 4", the second listed a blank name among
    /// the columns not read.
    #[tokio::test]
    async fn a_csv_header_names_each_column_once() -> Result<()> {
        let dir = tempfile::tempdir()?;
        for (text, expected) in [
            ("id,t,i,i\na,1,2,3\n", "the header names column i twice"),
            ("id,t,,x\na,1,2,3\n", "column 3 of the header has no name"),
        ] {
            let path = dir.path().join("h.csv");
            std::fs::write(&path, text)?;
            let error = open_file(&path, &[], (None, None, "+00:00"), None, true)
                .await
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
        Ok(())
    }

    /// A number of seconds, milliseconds or microseconds becomes the millisecond it falls in,
    /// as a time text's fraction is cut: through a float, `1767225606.9999` s rounded up into
    /// the next second (and possibly the next window).
    #[test]
    fn a_numbers_time_is_the_millisecond_it_falls_in() {
        let s = Some(1_000);
        let ms = Some(1);
        for (text, unit, expected) in [
            ("1767225606.9999", s, Some(1_767_225_606_999)),
            ("1767225606.123", s, Some(1_767_225_606_123)),
            ("1767225606.5", s, Some(1_767_225_606_500)),
            ("1767225606", s, Some(1_767_225_606_000)),
            ("-1.0005", s, Some(-1_001)),
            ("-1.000", s, Some(-1_000)),
            ("1767225606999.9", ms, Some(1_767_225_606_999)),
            ("-0.5", ms, Some(-1)),
            ("1767225606999999.9", None, Some(1_767_225_606_999)),
            ("-1500", None, Some(-2)),
            ("+12.25", s, Some(12_250)),
            ("1e9", s, None),
            (".5", s, None),
            ("99999999999999999999", s, None),
        ] {
            assert_eq!(decimal_ms(text, unit), expected, "{text} in {unit:?}");
        }
    }

    /// DataFusion's refusal to allocate reads as the limit it met: the query's, or the file
    /// sort's (it told a user of `run` or a preview to change a `datafusion.*` setting, which
    /// the SQL sandbox refuses).
    #[test]
    fn running_out_of_memory_names_the_limit() {
        let refusal = || {
            Error::DataFusion(datafusion::error::DataFusionError::Context(
                "Not enough memory to continue external sort".into(),
                Box::new(datafusion::error::DataFusionError::ResourcesExhausted(
                    "Failed to allocate additional 300.2 MB".into(),
                )),
            ))
        };
        let query = out_of_memory(refusal(), Some(67_108_864), false).to_string();
        assert!(
            query.starts_with("resource limit: an operator does not fit the query's memory limit of 67108864 bytes")
                && query.contains("300.2 MB"),
            "{query}"
        );
        let file = out_of_memory(refusal(), None, true).to_string();
        assert!(
            file.contains("sorting it by event time does not fit the 256 MiB")
                && file.contains("leave such rows out of the file"),
            "{file}"
        );
        let other = out_of_memory(Error::Config("x".into()), None, true).to_string();
        assert_eq!(other, Error::Config("x".into()).to_string());
    }

    /// Regression: 550 rows of 200 KB (110 MB) were read as one batch, which the sort by
    /// event time could not hold twice within its 256 MiB, and the whole run failed; batches
    /// now hold about 16 MiB whatever the rows' length.
    #[tokio::test]
    async fn a_file_of_long_rows_is_sorted_within_its_memory() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("long.csv");
        let mut csv = String::from("t,s\n");
        let text = "x".repeat(200_000);
        // Newest first: the sort has work to do.
        for i in (0..550).rev() {
            csv.push_str(&format!("{i},{text}\n"));
        }
        std::fs::write(&path, csv)?;
        let mut opened = open_file(&path, &[], (Some("t"), Some(1), "+00:00"), None, false).await?;
        let mut times = Vec::new();
        while let Some(batch) = opened.stream.next().await {
            let batch = batch?;
            let t = cast(batch.column_by_name("t").expect("t"), &DataType::Int64)?;
            times.extend(
                t.as_primitive::<datafusion::arrow::datatypes::Int64Type>()
                    .values()
                    .iter()
                    .copied(),
            );
        }
        assert_eq!(times, (0..550).collect::<Vec<i64>>());
        Ok(())
    }

    /// A JSON-lines file's numbers go on as written, sorted by event time: its types were
    /// guessed from the file, so an integer in a column that also holds fractions, or one
    /// beyond 2^63, went through a float (`9007199254740993` became `…992`,
    /// `12345678901234567890` became `12345678901234567000`); and a field first seen after
    /// the thousandth line was not read.
    #[tokio::test]
    async fn a_json_files_numbers_go_on_as_written() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let numbers = [
            "9007199254740993",
            "12345678901234567890",
            "-9223372036854775808",
            "0.1000000000000000055511151231257827",
            "1.5",
            "-0.0",
            "1e300",
            "2E-7",
            "0",
        ];
        let late_field = 1_200;
        let mut json = String::new();
        // Beyond 2^63 arrow's CSV reader takes a number for text, and its column with it (the
        // same digits go on in strings, which the stream's schema reads as numbers): the CSV's
        // column holds 2^63 - 1 there, to check the rest are marked as numbers.
        let in_csv = |n: &'static str| match n {
            "12345678901234567890" => "9223372036854775807",
            n => n,
        };
        // A CSV column arrow takes for numbers.
        let fractions = |i: usize| format!("{i}.1000000000000000055511151231257827");
        let mut csv = String::from("t,v,k,w\n");
        // Written newest first: the rows come out by event time.
        for (i, n) in numbers.iter().enumerate().rev() {
            json.push_str(&format!("{{\"t\":{i},\"v\":{n},\"k\":\"s\"}}\n"));
            csv.push_str(&format!("{i},{},s,{}\n", in_csv(n), fractions(i)));
        }
        for i in numbers.len()..late_field {
            json.push_str(&format!("{{\"t\":{i},\"v\":{i},\"k\":\"s\"}}\n"));
            csv.push_str(&format!("{i},{i},s,{}\n", fractions(i)));
        }
        json.push_str(&format!(
            "{{\"t\":{late_field},\"v\":1,\"k\":\"s\",\"w\":7.25}}\n"
        ));
        csv.push_str(&format!("{late_field},1,s,{}\n", fractions(late_field)));
        for (name, text) in [("rows.jsonl", json), ("rows.csv", csv)] {
            let path = dir.path().join(name);
            std::fs::write(&path, text)?;
            let mut opened =
                open_file(&path, &[], (Some("t"), Some(1), "+00:00"), None, false).await?;
            let mut lines = Vec::new();
            while let Some(batch) = opened.stream.next().await {
                let (bytes, _) = crate::sink::encode_json_rows(&batch?)?;
                lines.extend(
                    String::from_utf8(bytes)
                        .expect("JSON")
                        .lines()
                        .map(String::from),
                );
            }
            assert_eq!(lines.len(), late_field + 1, "{name}");
            for (i, n) in numbers.iter().enumerate() {
                let line: serde_json::Value = serde_json::from_str(&lines[i]).expect("a JSON line");
                assert_eq!(
                    line["t"],
                    serde_json::json!(i),
                    "{name} row {i}: {}",
                    lines[i]
                );
                let n = if name.ends_with("csv") { in_csv(n) } else { n };
                let written = format!("\"v\":{n},");
                assert!(lines[i].contains(&written), "{name} row {i}: {}", lines[i]);
                assert!(
                    name.ends_with("jsonl")
                        || lines[i].ends_with(&format!("\"w\":{}}}", fractions(i))),
                    "{name} row {i}: {}",
                    lines[i]
                );
            }
            if name.ends_with("jsonl") {
                let last: serde_json::Value =
                    serde_json::from_str(&lines[late_field]).expect("a JSON line");
                assert_eq!(last["w"], serde_json::json!(7.25));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod topic_tests {
    use super::*;
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes::Int64Type;

    /// A file is one stream's rows: a union or join of two streams run over it saw the other
    /// stream as empty and said nothing.
    #[tokio::test]
    async fn a_query_of_two_streams_is_not_run_over_one_file() -> Result<()> {
        let ctx = StreamContext::new();
        let query = one_query(
            &ctx,
            "CREATE EXTERNAL TABLE a (k VARCHAR NOT NULL, event_time TIMESTAMP NOT NULL) \
             STORED AS KAFKA OPTIONS ('topic' 'a', 'event_time' 'event_time'); \
             CREATE EXTERNAL TABLE b (k VARCHAR NOT NULL, event_time TIMESTAMP NOT NULL) \
             STORED AS KAFKA OPTIONS ('topic' 'b', 'event_time' 'event_time'); \
             SELECT k, event_time FROM a UNION ALL SELECT k, event_time FROM b",
            "the SQL",
        )
        .await?;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("a.csv");
        std::fs::write(&path, "k,event_time\nx,2026-01-01T00:00:00Z\n")?;
        let input = RunInput {
            path,
            rename: Vec::new(),
            time_unit: Some("ms".into()),
            time_zone: "+00:00".into(),
            state_limit: None,
        };
        let Err(error) = run_query(query, &input, 10, None::<&mut std::io::Sink>).await else {
            panic!("run over one file");
        };
        assert!(
            error
                .to_string()
                .contains("this query reads 2 streams (a, b), and a file gives the rows of one"),
            "{error}"
        );
        Ok(())
    }

    /// A preview runs in its query's memory limit: one window's `string_agg` grew to 1.18 GB
    /// (a 3.6 GB process) against a limit of 512 MiB, where the registered query failed.
    #[tokio::test]
    async fn a_previews_state_is_held_to_its_limit() -> Result<()> {
        let sql = "CREATE EXTERNAL TABLE pin (k VARCHAR NOT NULL, t VARCHAR NOT NULL, \
                   event_time TIMESTAMP NOT NULL) STORED AS KAFKA OPTIONS ('topic' 'pin', \
                   'format' 'json', 'event_time' 'event_time'); \
                   SELECT window_start, length(string_agg(t, ',')) AS n FROM pin \
                   GROUP BY tumble(event_time, INTERVAL '1 day')";
        let t0 = 1_772_409_600_000i64;
        let text = "x".repeat(10_000);
        let mut batches = Vec::new();
        for b in 0..20 {
            let mut raw = RawBatch::new("pin");
            for i in 0..50 {
                let value = format!(
                    r#"{{"k":"a","t":"{text}","event_time":{}}}"#,
                    t0 + (b * 50 + i) * 1000
                );
                raw.push(0, b * 50 + i, Some(b"k"), Some(value.as_bytes()));
            }
            batches.push(raw);
        }
        let ctx = StreamContext::new();
        let query = one_query(&ctx, sql, "the SQL").await?;
        let Err(error) =
            run_query_over_records(query, &ctx, &batches, 10, &Codecs::default(), Some(1 << 20))
                .await
        else {
            panic!("10 MB of text in a 1 MiB limit");
        };
        assert!(
            error
                .to_string()
                .contains("does not fit the query's memory limit of 1048576 bytes"),
            "{error}"
        );
        let ctx = StreamContext::new();
        let query = one_query(&ctx, sql, "the SQL").await?;
        let summary = run_query_over_records(
            query,
            &ctx,
            &batches,
            10,
            &Codecs::default(),
            Some(64 << 20),
        )
        .await?;
        assert_eq!(summary.output_rows, 1);
        Ok(())
    }

    /// A topic's range is read partition after partition; fed in that order, the first
    /// partition's times made every record of the others late (a preview showed 13 of 36
    /// windows and 1 620 rows diverted where the registered query showed every window).
    #[tokio::test]
    async fn a_topics_partitions_are_fed_side_by_side_in_event_time() -> Result<()> {
        let ctx = StreamContext::new();
        let query = one_query(
            &ctx,
            "CREATE EXTERNAL TABLE pin (k VARCHAR NOT NULL, event_time TIMESTAMP NOT NULL) \
             STORED AS KAFKA OPTIONS ('topic' 'pin', 'format' 'json', 'event_time' 'event_time', \
             'key' 'k'); \
             SELECT k, window_start, count(*) AS n FROM pin \
             GROUP BY tumble(event_time, INTERVAL '1 minute'), k",
            "the SQL",
        )
        .await?;
        // Four partitions of ten minutes each, a record a second, read one after another in
        // batches of 500 (as the range reader hands them over).
        let t0 = 1_772_409_600_000i64;
        let mut batches = Vec::new();
        for p in 0..4 {
            let mut raw = RawBatch::new("pin");
            for i in 0..600 {
                let value = format!(r#"{{"k":"k{p}","event_time":{}}}"#, t0 + i * 1000);
                raw.push(p, i, Some(b"k"), Some(value.as_bytes()));
                if raw.len() == 500 {
                    batches.push(std::mem::replace(&mut raw, RawBatch::new("pin")));
                }
            }
            batches.push(raw);
        }
        let summary =
            run_query_over_records(query, &ctx, &batches, 1_000, &Codecs::default(), None).await?;
        assert_eq!(summary.diverted, BTreeMap::new(), "nothing is late");
        assert_eq!(summary.output_rows, 40);
        let mut counts = Vec::new();
        for batch in &summary.shown {
            let n = batch
                .column_by_name("n")
                .expect("n")
                .as_primitive::<Int64Type>();
            counts.extend(n.values().iter().copied());
        }
        assert_eq!(counts, vec![60; 40]);
        Ok(())
    }

    /// A query the service runs with one state per partition judges lateness per partition,
    /// and so does its preview over the topic: fed side by side into one state, a record
    /// late in its own partition (behind that partition's watermark) was counted, as the other
    /// partition held the one watermark back (the preview showed n = 2 where the registered
    /// query published n = 1 and one late record).
    #[tokio::test]
    async fn a_preview_judges_lateness_per_partition_as_the_service_does() -> Result<()> {
        let ctx = StreamContext::new();
        let sql = "CREATE EXTERNAL TABLE pin (k VARCHAR NOT NULL, event_time TIMESTAMP NOT NULL) \
             STORED AS KAFKA OPTIONS ('topic' 'pin', 'format' 'json', 'event_time' 'event_time', \
             'key' 'k', 'watermark_delay' '5s'); \
             SET urbanstream.allowed_lateness = '10s'; \
             SELECT k, window_start, count(*) AS n FROM pin \
             GROUP BY tumble(event_time, INTERVAL '10 seconds'), k";
        let query = one_query(&ctx, sql, "the SQL").await?;
        assert!(query.is_partition_local());
        let t0 = 1_772_409_600_000i64;
        // Partition 1: k1 at 2 s, then a closing record. Partition 3: k0 at 1 s, 25.5 s (its
        // watermark 20.5 s, past the first window's end and lateness, 20 s), then 5 s: late.
        let records = [
            (1, "k1", 2_000),
            (3, "k0", 1_000),
            (3, "k0", 25_500),
            (3, "k0", 5_000),
            (1, "k1", 200_000),
            (3, "k0", 200_000),
        ];
        let mut raw = RawBatch::new("pin");
        for (i, (p, k, t)) in records.iter().enumerate() {
            let value = format!(r#"{{"k":"{k}","event_time":{}}}"#, t0 + t);
            raw.push(*p, i as i64, Some(k.as_bytes()), Some(value.as_bytes()));
        }
        let summary =
            run_query_over_records(query, &ctx, &[raw], 100, &Codecs::default(), None).await?;
        assert_eq!(
            summary.diverted.values().sum::<u64>(),
            1,
            "{:?}",
            summary.diverted
        );
        let mut rows = Vec::new();
        for batch in &summary.shown {
            let column = |name: &str, to: &DataType| {
                cast(
                    batch.column_by_name(name).expect("a column of the query"),
                    to,
                )
            };
            let k = column("k", &DataType::Utf8)?;
            let start = column(
                "window_start",
                &DataType::Timestamp(datafusion::arrow::datatypes::TimeUnit::Millisecond, None),
            )?;
            let start = cast(&start, &DataType::Int64)?;
            let n = column("n", &DataType::Int64)?;
            let (k, start, n) = (
                k.as_string::<i32>(),
                start.as_primitive::<Int64Type>(),
                n.as_primitive::<Int64Type>(),
            );
            for r in 0..batch.num_rows() {
                rows.push((k.value(r).to_string(), start.value(r) - t0, n.value(r)));
            }
        }
        rows.sort();
        assert_eq!(
            rows,
            vec![
                ("k0".to_string(), 0, 1),
                ("k0".to_string(), 20_000, 1),
                ("k0".to_string(), 200_000, 1),
                ("k1".to_string(), 0, 1),
                ("k1".to_string(), 200_000, 1),
            ]
        );
        Ok(())
    }

    /// A local time daylight saving skips or repeats is unreadable in a zone that changes
    /// clocks, and the reason says so (it was "see --time-unit, --time-zone").
    #[test]
    fn a_local_time_daylight_saving_skips_or_repeats_is_named() {
        let zone = "America/New_York";
        for (text, why) in [
            ("2026-03-08 02:30", true),
            ("2026-11-01 01:30:00", true),
            ("2026-03-08 03:30", false),
            ("not a time", false),
        ] {
            let found = super::why_unreadable(text, zone);
            assert_eq!(found.is_some(), why, "{text}: {found:?}");
            if let Some(found) = found {
                assert!(found.contains("daylight saving"), "{found}");
            }
        }
        assert!(super::why_unreadable("2026-03-08 02:30", "+07:00").is_none());
    }
}
