//! Plan: analysts' SQL into running stream queries.
//!
//! - [`stream`]: the planner ([`stream::StreamContext`]) and the per-query runtime
//!   ([`stream::StreamQuery`]): DataFusion plans the SQL once; the physical plan is split at
//!   the aggregation into a per-batch part and a per-emission part around the window
//!   operator of [`crate::state::window`].
//! - [`table`]: Kafka topics as tables (`CREATE EXTERNAL TABLE … STORED AS KAFKA`).
//! - [`rewrite`]: makes `window_start`/`window_end` selectable.
//! - [`feed`]: the leaf that feeds micro-batches into a planned query; [`reused`]: the plans
//!   run for every micro-batch, in copies that bound what their runs leave behind.
//! - [`sandbox`]: what analysts' SQL may reach, and the limits on parsing and planning it.
//!
//! [`city_context`] registers the city's topics (from `schemas/`) and reference tables (from
//! `schemas/reference/`); [`DEFAULT_QUERIES`] are the queries of `queries/`.

pub mod bounded;
mod chain;
mod checked;
mod corr;
pub mod fan_out;
pub mod feed;
mod join;
pub mod lookup;
mod ordered;
pub mod repartition;
pub mod reused;
pub mod rewrite;
pub mod sandbox;
pub mod stream;
pub mod table;
mod topn;
mod union;

use crate::error::Result;
use crate::reference::ReferenceTables;
use crate::schema::{SchemaRegistry, StreamRole};
use crate::topics::Topics;
use stream::StreamContext;
use table::StreamTable;

/// The queries of `queries/`, compiled in: (name, SQL), every `*.sql` file by name.
pub const DEFAULT_QUERIES: &[(&str, &str)] = crate::embedded::QUERY_FILES;

/// A stream context with the city's streams and reference tables:
///
/// - every stream a schema file of `schemas/topics/` declares (its `"urbanstream"`
///   attribute: table, topic, role, key; see [`crate::schema::StreamDeclaration`]), with the
///   topic `[topics]` gives it: the camera, detector, air, parking, water-level and citizen
///   report inputs (event time `event_time`), and the indicator and alert outputs;
/// - every reference table of `schemas/reference/` (`segments`, `wards`, …, `parking_lots`,
///   `gauges`), `ward_sensors` derived from `sensors`, and tables added at run time.
///
/// The reference tables are the ones compiled into the binary; [`city_context_in`] takes a
/// process's [`ReferenceTables`], whose new versions queries see as they run.
pub fn city_context(topics: &Topics, schemas: &SchemaRegistry) -> Result<StreamContext> {
    city_context_in(
        StreamContext::new(),
        topics,
        schemas,
        &ReferenceTables::embedded()?,
    )
}

/// [`city_context`] registered into `ctx` (one made with a memory limit, say), reading
/// `reference`.
pub fn city_context_in(
    mut ctx: StreamContext,
    topics: &Topics,
    schemas: &SchemaRegistry,
    reference: &ReferenceTables,
) -> Result<StreamContext> {
    for (schema, declared) in schemas.streams()? {
        let topic = topics.topic_of(&declared);
        let mut table = StreamTable::from_topic_schema(
            declared.table.as_str(),
            schema.clone(),
            topic,
            declared.key.as_deref(),
        )?;
        if declared.event_time.is_some() || !declared.options.is_empty() {
            let mut options = table.options.clone();
            if let Some(time) = &declared.event_time {
                options.event_time = Some(time.clone());
            }
            if !declared.options.is_empty() {
                if let Some(own) = ["topic", "format", "key", "event_time", "protobuf_message"]
                    .into_iter()
                    .find(|o| declared.options.contains_key(*o))
                {
                    return Err(crate::error::Error::schema(
                        &schema.name,
                        format!(
                            "\"urbanstream\": option {own} has its own attribute (or, for the \
                             format, [topics] input_format and output_format)"
                        ),
                    ));
                }
                let mut raw: std::collections::HashMap<String, String> = declared
                    .options
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                raw.insert("topic".into(), options.topic.clone());
                let parsed = table::StreamOptions::parse(&raw)
                    .map_err(|e| crate::error::Error::schema(&schema.name, e.to_string()))?;
                options.watermark_delay = parsed.watermark_delay;
                options.idle_timeout = parsed.idle_timeout;
                options.future_tolerance = parsed.future_tolerance;
                options.event_time_unit = parsed.event_time_unit;
                options.upsert_key = parsed.upsert_key;
            }
            table = StreamTable::new(declared.table.as_str(), schema, options)?;
        }
        match declared.role {
            StreamRole::Input => {
                table.options.format = topics.input_format;
                if topics.input_format == crate::topics::Format::Protobuf {
                    table.options.protobuf_message = declared.protobuf_message.clone();
                }
            }
            StreamRole::Output => table.options.format = topics.output_format,
        }
        ctx.register_stream(table)?;
    }
    ctx.register_reference_tables(reference)?;
    Ok(ctx)
}

/// Plans `sql` (one or more statements) in `ctx`; returns the stream queries among them.
/// This is the entry point for SQL from clients: it runs on a planning thread of its own
/// with a time limit ([`sandbox::on_planning_thread`]), and every statement passes the
/// sandbox's checks.
pub async fn plan_all(ctx: &StreamContext, sql: &str) -> Result<Vec<stream::StreamQuery>> {
    let ctx = ctx.clone();
    let sql = sql.to_string();
    let queries = sandbox::on_planning_thread(move || async move {
        let mut queries = Vec::new();
        let statements = StreamContext::parse(&sql)?;
        if statements.len() > sandbox::MAX_STATEMENTS {
            return datafusion::common::plan_err!(
                "the SQL holds {} statements, more than the {} one request may: register \
                 fewer views and queries at once (views that each read the one before cost \
                 more with every one)",
                statements.len(),
                sandbox::MAX_STATEMENTS
            );
        }
        for statement in statements {
            // A caller that stopped waiting at the deadline is not kept planning after it.
            if bounded::planning_time_over() {
                return datafusion::common::plan_err!(
                    "planning took longer than {} s: simplify the statement",
                    sandbox::PLANNING_TIMEOUT.as_secs()
                );
            }
            if let Some(q) = ctx.plan(statement).await? {
                queries.push(q);
            }
        }
        Ok(queries)
    })
    .await?;
    Ok(queries)
}

/// The default queries, planned in `ctx`, with their names.
pub async fn default_queries(ctx: &StreamContext) -> Result<Vec<(String, stream::StreamQuery)>> {
    let mut out = Vec::new();
    for (name, sql) in DEFAULT_QUERIES {
        for q in plan_all(ctx, sql).await? {
            out.push((name.to_string(), q));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chain of views, each reading the one before, costs more with every view: 990 of them
    /// in 38 KB took 10 GB and went on planning after the request had been refused for time.
    #[tokio::test]
    async fn a_request_holds_at_most_so_many_statements() {
        let ctx = StreamContext::new();
        let chain = |n: usize| {
            let mut sql = String::from(
                "CREATE EXTERNAL TABLE ev (k VARCHAR NOT NULL, t TIMESTAMP NOT NULL) \
                 STORED AS KAFKA OPTIONS ('topic' 'ev', 'event_time' 't');\n\
                 CREATE VIEW v0 AS SELECT * FROM ev;\n",
            );
            for i in 1..n {
                sql.push_str(&format!("CREATE VIEW v{i} AS SELECT * FROM v{};\n", i - 1));
            }
            sql
        };
        let Err(error) = plan_all(&ctx, &chain(64)).await else {
            panic!("65 statements were planned");
        };
        let error = error.to_string();
        assert!(
            error.contains("the SQL holds 65 statements, more than the 64 one request may"),
            "{error}"
        );
        assert!(plan_all(&ctx, &chain(63)).await.is_ok());
    }

    /// Regression: groups by a topic's key column that may be null were kept per partition,
    /// but a record whose key is null is produced without a Kafka key, to any partition, and
    /// one group was published twice with part of its count each time. Such a column places
    /// nothing: the query is repartitioned (or keeps one state).
    #[tokio::test]
    async fn only_a_key_column_that_cannot_be_null_keeps_state_per_partition() {
        for (column, local) in [("k VARCHAR NOT NULL", true), ("k VARCHAR", false)] {
            let ctx = StreamContext::new();
            let mut query = None;
            for sql in [
                format!(
                    "CREATE EXTERNAL TABLE ev ({column}, t TIMESTAMP NOT NULL) \
                     STORED AS KAFKA OPTIONS ('topic' 'ev', 'event_time' 't', 'key' 'k')"
                ),
                "CREATE EXTERNAL TABLE o (k VARCHAR, n BIGINT NOT NULL) \
                 STORED AS KAFKA OPTIONS ('topic' 'o')"
                    .to_string(),
                "INSERT INTO o SELECT k, count(*) AS n FROM ev \
                 GROUP BY tumble(t, INTERVAL '1 minute'), k"
                    .to_string(),
            ] {
                query = plan_all(&ctx, &sql).await.expect("plan").pop().or(query);
            }
            let query = query.expect("query");
            assert_eq!(query.is_partition_local(), local, "{column}");
            assert!(query.is_repartitionable(), "{column}");
        }
    }

    #[tokio::test]
    async fn a_batch_of_another_schema_is_an_error_not_a_panic() {
        use datafusion::arrow::array::{RecordBatch, StringArray, TimestampMillisecondArray};
        use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
        use std::sync::Arc;
        let ctx = StreamContext::new();
        let mut query = None;
        for sql in [
            "CREATE EXTERNAL TABLE ev (k VARCHAR NOT NULL, t TIMESTAMP NOT NULL) \
             STORED AS KAFKA OPTIONS ('topic' 'ev', 'event_time' 't')",
            "SELECT k, count(*) AS n FROM ev GROUP BY tumble(t, INTERVAL '1 minute'), k",
        ] {
            query = plan_all(&ctx, sql).await.expect("plan").pop();
        }
        let mut query = query.expect("query");
        // VARCHAR is a string view; a plain string column is another schema.
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new("t", DataType::Timestamp(TimeUnit::Millisecond, None), false),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec!["a"])),
                Arc::new(TimestampMillisecondArray::from(vec![0])),
            ],
        )
        .expect("batch");
        let err = query
            .process(&batch, &[0], None, 0)
            .await
            .expect_err("refused");
        assert!(
            err.to_string()
                .contains("does not have the stream's schema"),
            "{err}"
        );
    }

    /// The last query of `statements`, planned over the stream `ev (segment_id, t, v)` with
    /// the embedded reference tables, which are returned to be replaced.
    async fn over_segments(statements: &[&str]) -> (ReferenceTables, stream::StreamQuery) {
        let reference = ReferenceTables::embedded().expect("reference");
        let mut ctx = StreamContext::new();
        ctx.register_reference_tables(&reference)
            .expect("reference");
        let mut query = None;
        let stream = "CREATE EXTERNAL TABLE ev (segment_id VARCHAR NOT NULL, \
             t TIMESTAMP NOT NULL, v DOUBLE) STORED AS KAFKA \
             OPTIONS ('topic' 'ev', 'event_time' 't', 'watermark_delay' '0s')";
        for sql in std::iter::once(&stream).chain(statements) {
            if let Some(q) = plan_all(&ctx, sql).await.expect("plan").pop() {
                query = Some(q);
            }
        }
        (reference, query.expect("query"))
    }

    /// A revision that no longer passes a condition above a lookup join is withdrawn with
    /// the reference table's current version: the plan that tells the withdrawn rows reads a
    /// replaced table from its next run, as the query's own plan does.
    #[tokio::test]
    async fn a_withdrawal_above_a_lookup_join_reads_the_current_reference_table() {
        use datafusion::arrow::array::TimestampMillisecondArray;
        use datafusion::arrow::array::{Float64Array, RecordBatch, StringViewArray};
        use datafusion::arrow::util::display::array_value_to_string;
        use std::sync::Arc;
        let (reference, mut query) = over_segments(&[
            "SET urbanstream.allowed_lateness = '10m'",
            "SELECT m.segment_id, m.window_start, s.name, m.speed FROM (SELECT segment_id, \
             window_start, avg(v) AS speed FROM ev GROUP BY tumble(t, INTERVAL '1 minute'), \
             segment_id) m JOIN segments s ON m.segment_id = s.segment_id \
             WHERE m.speed < 0.6 * s.free_flow_kmh",
        ])
        .await;
        let schema = query.source().topic_schema.output_schema();
        let feed = |rows: &[(i64, f64)]| {
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(StringViewArray::from_iter_values(
                        rows.iter().map(|_| "truong_chinh_ntso"),
                    )),
                    Arc::new(TimestampMillisecondArray::from_iter_values(
                        rows.iter().map(|r| r.0),
                    )),
                    Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.1))),
                ],
            )
            .expect("batch")
        };
        let rendered = |out: &stream::StepOutput| -> Vec<String> {
            out.rows
                .iter()
                .flat_map(|b| {
                    (0..b.num_rows()).map(move |r| {
                        ["name", "speed", "op"]
                            .iter()
                            .map(|c| {
                                array_value_to_string(b.column_by_name(c).expect(c), r)
                                    .expect("value")
                            })
                            .collect::<Vec<_>>()
                            .join("|")
                    })
                })
                .collect()
        };
        // 2026-01-01T06:00:10 and 06:01:30: the first minute closes at 20 km/h (free flow 50).
        let t0 = 1_767_247_210_000;
        let b = feed(&[(t0, 20.0), (t0 + 80_000, 20.0)]);
        let out = query
            .process(&b, &[0, 0], None, t0 + 86_400_000)
            .await
            .expect("step");
        assert_eq!(
            rendered(&out)[0],
            "Trường Chinh (Ngã Tư Sở – Tôn Thất Tùng)|20.0|insert"
        );
        // A late reading that keeps it below: an update (the plans collect the table).
        let b = feed(&[(t0 + 3_000, 20.0)]);
        let out = query
            .process(&b, &[0], None, t0 + 86_400_000)
            .await
            .expect("step");
        assert_eq!(
            rendered(&out),
            ["Trường Chinh (Ngã Tư Sở – Tôn Thất Tùng)|20.0|update"]
        );
        // The segment renamed, and a late reading lifts the minute above 30 km/h.
        let csv = reference.get("segments").expect("segments").csv.clone();
        let renamed = csv.replace("Trường Chinh (Ngã Tư Sở – Tôn Thất Tùng)", "Renamed");
        reference.replace("segments", &renamed).expect("replace");
        let b = feed(&[(t0 + 5_000, 65.0)]);
        let out = query
            .process(&b, &[0], None, t0 + 86_400_000)
            .await
            .expect("step");
        assert_eq!(rendered(&out), ["Renamed|35.0|retract"]);
    }

    /// A window over a changelog joined with a reference table whose new version moves a
    /// key's row elsewhere: the row the key's next record supersedes is withdrawn as it was
    /// added, not as the new version gives it, so the segment's minute is counted once. The
    /// rows held are moved to the new version when it comes: the minute leaves its old
    /// ward's window for its new ward's.
    #[tokio::test]
    async fn a_superseded_row_is_withdrawn_as_it_was_added_after_a_new_table_version() {
        superseded_after_a_new_table_version(false).await;
    }

    /// The same with the query stopped after the first count, the table replaced while it
    /// was down, and the query restored from its checkpoint: the versions its rows were
    /// computed with are in the checkpoint, read back from the reference directory, and the
    /// rows move to the new version as if it had been running.
    #[tokio::test]
    async fn a_superseded_row_is_withdrawn_as_it_was_added_after_a_restart_and_a_new_version() {
        superseded_after_a_new_table_version(true).await;
    }

    async fn superseded_after_a_new_table_version(restart: bool) {
        use datafusion::arrow::array::TimestampMillisecondArray;
        use datafusion::arrow::array::{Int64Array, RecordBatch, StringViewArray};
        use datafusion::arrow::util::display::array_value_to_string;
        use std::collections::BTreeMap;
        use std::sync::Arc;
        let dir = tempfile::tempdir().expect("dir");
        let reference = ReferenceTables::open(dir.path()).expect("reference");
        let mut ctx = StreamContext::new();
        ctx.register_reference_tables(&reference)
            .expect("reference");
        let statements = [
            "CREATE EXTERNAL TABLE counts (segment_id VARCHAR NOT NULL, minute TIMESTAMP NOT \
             NULL, n BIGINT, op VARCHAR) STORED AS KAFKA OPTIONS ('topic' 'counts', \
             'event_time' 'minute', 'watermark_delay' '0s', 'upsert_key' 'segment_id, minute')",
            "SELECT s.ward_id, window_start, sum(c.n) AS vehicles FROM counts c \
             JOIN segments s ON c.segment_id = s.segment_id \
             GROUP BY tumble(c.minute, INTERVAL '5 minutes'), s.ward_id",
        ];
        // The table once, the query as often as it is started.
        let plan = async |from: usize| {
            let mut query = None;
            for sql in &statements[from..] {
                if let Some(q) = plan_all(&ctx, sql).await.expect("plan").pop() {
                    query = Some(q);
                }
            }
            query.expect("query")
        };
        let mut query = plan(0).await;
        let schema = query.source().topic_schema.output_schema();
        let feed = |minute: i64, n: i64| {
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(StringViewArray::from_iter_values(["truong_chinh_ntso"])),
                    Arc::new(TimestampMillisecondArray::from_iter_values([minute])),
                    Arc::new(Int64Array::from_iter_values([n])),
                    Arc::new(StringViewArray::from(vec![None::<&str>])),
                ],
            )
            .expect("batch")
        };
        // The changelog of (ward, window) → vehicles, applied as a consumer applies it.
        let mut table: BTreeMap<String, String> = BTreeMap::new();
        let mut apply = |out: &stream::StepOutput| {
            for b in &out.rows {
                for r in 0..b.num_rows() {
                    let value = |c: &str| {
                        b.column_by_name(c)
                            .map(|a| array_value_to_string(a, r).expect("value"))
                    };
                    let ward = value("ward_id").expect("ward_id");
                    match value("op").as_deref() {
                        Some("retract") => table.remove(&ward),
                        _ => table.insert(ward, value("vehicles").expect("vehicles")),
                    };
                }
            }
        };
        // 2026-01-01T06:01: three vehicles counted on the segment, in ward khuong_dinh.
        let minute = 1_767_247_260_000;
        let now = minute + 86_400_000;
        apply(
            &query
                .process(&feed(minute, 3), &[0], None, now)
                .await
                .expect("step"),
        );
        // The segment moves to phuong_liet; then the minute's count is revised to four, and
        // the time runs past the window.
        let csv = reference.get("segments").expect("segments").csv.clone();
        let moved = csv.replacen(
            ",Trường Chinh,khuong_dinh,",
            ",Trường Chinh,phuong_liet,",
            1,
        );
        assert_ne!(moved, *csv);
        if restart {
            let mut snapshot = query.snapshot(now).expect("snapshot");
            snapshot.resolve().expect("resolve");
            reference.replace("segments", &moved).expect("replace");
            query = plan(1).await;
            query.restore(&snapshot, now).expect("restore");
        } else {
            reference.replace("segments", &moved).expect("replace");
        }
        apply(
            &query
                .process(&feed(minute, 4), &[0], None, now)
                .await
                .expect("step"),
        );
        apply(
            &query
                .advance_watermark(minute + 3_600_000, now)
                .await
                .expect("step"),
        );
        let expected: BTreeMap<String, String> =
            [("phuong_liet".to_string(), "4".to_string())].into();
        assert_eq!(table, expected);
    }

    /// A lookup join's build side, collected again when the reference table gets a new
    /// version, lets through the stream rows that join its new keys: no filter made from an
    /// earlier version's keys is left on the stream's side of the join.
    #[tokio::test]
    async fn a_row_joining_a_key_new_in_the_reference_table_is_joined() {
        use datafusion::arrow::array::TimestampMillisecondArray;
        use datafusion::arrow::array::{Float64Array, RecordBatch, StringViewArray};
        use std::sync::Arc;
        let (reference, mut query) = over_segments(&["SELECT e.segment_id, s.name, e.v \
             FROM ev e JOIN segments s ON e.segment_id = s.segment_id WHERE e.v > 1"])
        .await;
        let schema = query.source().topic_schema.output_schema();
        let feed = |segment: &str, t: i64| {
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(StringViewArray::from_iter_values([segment])),
                    Arc::new(TimestampMillisecondArray::from_iter_values([t])),
                    Arc::new(Float64Array::from_iter_values([20.0])),
                ],
            )
            .expect("batch")
        };
        let t0 = 1_767_247_210_000;
        let rows = |out: &stream::StepOutput| out.rows.iter().map(|b| b.num_rows()).sum::<usize>();
        let out = query
            .process(&feed("truong_chinh_ntso", t0), &[0], None, t0)
            .await
            .expect("step");
        assert_eq!(rows(&out), 1);
        let mut csv = reference.get("segments").expect("segments").csv.to_string();
        let row = csv
            .lines()
            .find(|l| l.starts_with("truong_chinh_ntso,"))
            .expect("row")
            .replacen("truong_chinh_ntso", "zzz_new_segment", 1)
            .replacen("Trường Chinh", "New road", 1);
        csv.push_str(&row);
        csv.push('\n');
        reference.replace("segments", &csv).expect("replace");
        for (i, segment) in ["zzz_new_segment", "truong_chinh_ntso", "zzz_new_segment"]
            .iter()
            .enumerate()
        {
            let t = t0 + 1_000 * (i as i64 + 1);
            let out = query
                .process(&feed(segment, t), &[0], None, t)
                .await
                .expect("step");
            assert_eq!(rows(&out), 1, "{segment} after the new version");
        }
    }

    /// Plans are run again for every micro-batch (through copies DataFusion's
    /// `reset_plan_states` makes), which its contract allows only for plans without dynamic
    /// filters: the session plans none (the engine's own leaves accept no pushed filter
    /// either), whatever the query.
    #[tokio::test]
    async fn plans_run_again_hold_no_dynamic_filter() {
        for sql in [
            "SELECT e.segment_id, s.name, e.v FROM ev e JOIN segments s \
             ON e.segment_id = s.segment_id WHERE e.v > 1",
            "SELECT m.segment_id, s.name, m.top FROM (SELECT segment_id, max(v) AS top \
             FROM ev GROUP BY tumble(t, INTERVAL '1 minute'), segment_id) m \
             JOIN segments s ON m.segment_id = s.segment_id",
            "SELECT a.segment_id, a.v, b.v FROM ev a JOIN ev b ON a.segment_id = b.segment_id \
             AND b.t BETWEEN a.t AND a.t + INTERVAL '1 minute'",
        ] {
            let (_, query) = over_segments(&[sql]).await;
            let explained = query.explain().to_string();
            assert!(explained.contains("segment_id"), "{explained}");
            assert!(!explained.contains("DynamicFilter"), "{sql}\n{explained}");
        }
    }

    /// A key's state is counted by what it holds: an alert over a detector keeps each key's
    /// last row, whose detector struct used to be counted (and kept) with the buffers of the
    /// whole micro-batch it came in, so the state's bytes grew with keys × batch size and a
    /// city of 10 000 sensors failed its memory limit.
    #[tokio::test]
    async fn stacked_detectors_state_grows_with_keys_not_keys_times_rows() {
        use datafusion::arrow::array::TimestampMillisecondArray;
        use datafusion::arrow::array::{Float64Array, RecordBatch, StringViewArray};
        use std::sync::Arc;
        let mut per_key = Vec::new();
        for keys in [1_000usize, 8_000] {
            let ctx = StreamContext::new();
            let mut query = None;
            for sql in [
                "CREATE EXTERNAL TABLE ev (k VARCHAR NOT NULL, t TIMESTAMP NOT NULL, v DOUBLE) \
                 STORED AS KAFKA OPTIONS ('topic' 'ev', 'event_time' 't', 'watermark_delay' '0s')",
                "SELECT k, t, alert_state(d['score'], t, 4, 2) OVER (PARTITION BY k ORDER BY t) AS a \
                 FROM (SELECT *, anomaly_ewma(v, t) OVER (PARTITION BY k ORDER BY t) AS d FROM ev)",
            ] {
                if let Some(q) = plan_all(&ctx, sql).await.expect("plan").pop() {
                    query = Some(q);
                }
            }
            let mut query = query.expect("query");
            let schema = query.source().topic_schema.output_schema();
            let t0 = 1_767_247_200_000i64;
            for step in 0..3i64 {
                let batch = RecordBatch::try_new(
                    schema.clone(),
                    vec![
                        Arc::new(StringViewArray::from_iter_values(
                            (0..keys).map(|i| format!("sensor-{i}")),
                        )),
                        Arc::new(TimestampMillisecondArray::from_iter_values(
                            (0..keys).map(|_| t0 + step * 60_000),
                        )),
                        Arc::new(Float64Array::from_iter_values(
                            (0..keys).map(|i| (i % 7) as f64),
                        )),
                    ],
                )
                .expect("batch");
                let t = t0 + step * 60_000;
                query
                    .process(&batch, &vec![0; keys], None, t)
                    .await
                    .expect("step");
            }
            per_key.push(query.state_bytes() / keys);
        }
        assert!(
            per_key[1] < per_key[0] * 3 / 2,
            "bytes per key at 1 000 and 8 000 keys: {per_key:?}"
        );
    }

    /// A state's layout says what the columns a window aggregates and a detector reads are
    /// computed from: a column of a subquery that keeps its name but not its meaning no
    /// longer passes for the same state (an upgrade mixed sums of speeds and of speeds times
    /// 1000), while a changed filter still does.
    #[tokio::test]
    async fn a_layout_tells_what_a_subquerys_columns_mean() {
        let layout =
            |sql: &'static str| async move { over_segments(&[sql]).await.1.state_layout() };
        let sums = |inner: &str| {
            format!(
                "SELECT segment_id, window_start, sum(x) AS s FROM ({inner}) \
                 GROUP BY tumble(t, INTERVAL '1 minute'), segment_id"
            )
        };
        let plain = layout(sums("SELECT segment_id, t, v AS x FROM ev").leak()).await;
        let scaled = layout(sums("SELECT segment_id, t, v * 1000 AS x FROM ev").leak()).await;
        assert_ne!(plain, scaled);
        assert!(
            scaled.iter().any(|l| l.contains("x = (v) * 1000")),
            "{scaled:?}"
        );
        for filtered in [
            "SELECT segment_id, t, v AS x FROM ev WHERE v > 3",
            "SELECT segment_id, t, v AS x FROM ev WHERE segment_id <> 'a' AND t IS NOT NULL",
        ] {
            assert_eq!(layout(sums(filtered).leak()).await, plain, "{filtered}");
        }
        let detected = |x: &str| {
            format!(
                "SELECT *, anomaly_ewma(x, window_end) OVER (PARTITION BY segment_id \
                 ORDER BY window_end) AS d FROM (SELECT segment_id, window_end, {x} AS x \
                 FROM (SELECT segment_id, window_end, count(*) AS n FROM ev \
                 GROUP BY tumble(t, INTERVAL '1 minute'), segment_id))"
            )
        };
        let counts = layout(detected("n * 1.0").leak()).await;
        let thousands = layout(detected("n * 1000.0").leak()).await;
        assert_ne!(counts, thousands);
        assert!(
            thousands
                .iter()
                .any(|l| l.starts_with("detectors read ") && l.contains("1000")),
            "{thousands:?}"
        );
    }

    /// A column used twice in each of many nested subqueries is spelled out in the layout
    /// within a bound: resolved through every level, it would be 2^depth long (SQL is the
    /// client's; the layout is made at every checkpoint).
    #[tokio::test]
    async fn a_layout_stays_small_over_nested_subqueries() {
        let mut inner = "SELECT segment_id, t, v AS x FROM ev".to_string();
        for _ in 0..20 {
            inner = format!("SELECT segment_id, t, x * x + x AS x FROM ({inner})");
        }
        let sql = format!(
            "SELECT segment_id, window_start, sum(x) AS s FROM ({inner}) \
             GROUP BY tumble(t, INTERVAL '1 minute'), segment_id"
        );
        let (_, query) = over_segments(&[sql.as_str()]).await;
        let bytes: usize = query.state_layout().iter().map(String::len).sum();
        assert!(bytes < 1 << 20, "{bytes} bytes of layout");
    }

    #[tokio::test]
    async fn declared_options_reach_the_stream_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let probe = |options: &str| {
            std::fs::write(
                dir.path().join("probe.avsc"),
                format!(
                    r#"{{"type": "record", "name": "Probe",
                        "urbanstream": {{"table": "probes", "topic": "city.probes", "role": "input",
                                         "key": "id", "options": {options}}},
                        "fields": [{{"name": "id", "type": "string"}},
                                   {{"name": "event_time", "type": {{"type": "long", "logicalType": "timestamp-millis"}}}}]}}"#
                ),
            )
            .expect("write");
            let schemas = SchemaRegistry::load_dir(dir.path()).expect("schemas");
            city_context_in(
                StreamContext::new(),
                &Topics::default(),
                &schemas,
                &ReferenceTables::embedded().expect("reference"),
            )
        };
        let ctx = probe(r#"{"idle_timeout": "5s", "watermark_delay": "30s"}"#).expect("city");
        let table = ctx
            .stream_table("probes")
            .await
            .expect("lookup")
            .expect("a stream");
        assert_eq!(
            table.options.idle_timeout,
            std::time::Duration::from_secs(5)
        );
        assert_eq!(
            table.options.watermark_delay,
            std::time::Duration::from_secs(30)
        );
        assert_eq!(table.options.event_time.as_deref(), Some("event_time"));
        assert_eq!(table.options.key.as_deref(), Some("id"));
        let e = probe(r#"{"idle_timeout": "soon"}"#)
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("idle_timeout"), "{e}");
        let e = probe(r#"{"topic": "elsewhere"}"#)
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("has its own attribute"), "{e}");
        let e = probe(r#"{"watermark": "5s"}"#)
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("unknown option 'watermark'"), "{e}");
        // The city's reports go idle sooner than the default minute.
        let city = city_context(
            &Topics::default(),
            &SchemaRegistry::embedded().expect("schemas"),
        )
        .expect("city");
        let reports = city
            .stream_table("citizen_reports")
            .await
            .expect("lookup")
            .expect("a stream");
        assert_eq!(
            reports.options.idle_timeout,
            std::time::Duration::from_secs(5)
        );
    }

    #[tokio::test]
    async fn default_queries_plan_against_the_city() {
        let ctx = city_context(
            &Topics::default(),
            &SchemaRegistry::embedded().expect("schemas"),
        )
        .expect("city");
        let queries = default_queries(&ctx).await.expect("default queries plan");
        let routes: Vec<(&str, &str, Option<&str>, bool)> = queries
            .iter()
            .map(|(name, q)| {
                (
                    name.as_str(),
                    q.source().name.as_str(),
                    q.sink().map(|s| s.name.as_str()),
                    q.is_windowed(),
                )
            })
            .collect();
        let alerts = Some("alerts");
        // The queries run in the order of their file names; statements in file order.
        let by_name = |mut v: Vec<(&'static str, &'static str, Option<&'static str>, bool)>| {
            v.sort_by_key(|r| r.0);
            v
        };
        assert_eq!(
            routes,
            by_name(vec![
                (
                    "congestion_minute",
                    "camera_events",
                    Some("congestion_indicators"),
                    true
                ),
                (
                    "air_hourly_sensor",
                    "air_readings",
                    Some("air_indicators"),
                    true
                ),
                (
                    "air_hourly_ward",
                    "air_readings",
                    Some("air_indicators"),
                    true
                ),
                (
                    "air_daily_sensor",
                    "air_readings",
                    Some("air_indicators"),
                    true
                ),
                ("alerts_congestion", "camera_events", alerts, true),
                ("alerts_incidents", "camera_events", alerts, true),
                ("alerts_incidents", "detector_readings", alerts, true),
                ("alerts_pollution", "air_readings", alerts, true),
                ("alerts_sensor_faults", "air_readings", alerts, false),
                ("alerts_sensor_faults", "air_readings", alerts, false),
                ("alerts_sensor_faults", "air_readings", alerts, false),
                ("alerts_sensor_faults", "air_readings", alerts, false),
                ("alerts_pollution_hours", "air_readings", alerts, true),
                ("alerts_incidents_confirmed", "camera_events", alerts, true),
                (
                    "congestion_top_wards",
                    "camera_events",
                    Some("congestion_top"),
                    true
                ),
                ("travel_times", "camera_events", Some("travel_times"), true),
                ("alerts_flood", "water_levels", alerts, true),
                ("alerts_flooded_roads", "water_indicators", alerts, true),
                ("alerts_parking_anomaly", "parking_readings", alerts, true),
                ("alerts_parking_full", "parking_readings", alerts, true),
                ("alerts_reports_confirmed", "citizen_reports", alerts, true),
                (
                    "parking_lot_availability",
                    "parking_readings",
                    Some("parking_availability"),
                    true
                ),
                (
                    "parking_ward_availability",
                    "parking_readings",
                    Some("parking_availability"),
                    true
                ),
                (
                    "water_level_gauge",
                    "water_levels",
                    Some("water_indicators"),
                    true
                ),
            ])
        );
        // How each statement keeps its state: per input partition when it groups by its
        // input's key, else repartitioned when it can be, else one state.
        let partitioning: Vec<(&str, &str)> = queries
            .iter()
            .map(|(name, q)| {
                let how = if q.is_partition_local() {
                    "per_partition"
                } else if q.is_repartitionable() {
                    "repartitioned"
                } else {
                    "single"
                };
                (name.as_str(), how)
            })
            .collect();
        // Sensors' readings are keyed by ward: the engine cannot know each sensor stays in its
        // ward's partition, so the per-sensor aggregates are repartitioned and the per-sensor
        // detectors keep one state.
        let mut expected = vec![
            ("congestion_minute", "per_partition"),
            ("air_hourly_sensor", "repartitioned"),
            ("air_hourly_ward", "per_partition"),
            ("air_daily_sensor", "repartitioned"),
            ("alerts_congestion", "per_partition"),
            ("alerts_incidents", "per_partition"),
            ("alerts_incidents", "per_partition"),
            ("alerts_pollution", "per_partition"),
            ("alerts_sensor_faults", "single"),
            ("alerts_sensor_faults", "single"),
            ("alerts_sensor_faults", "single"),
            ("alerts_sensor_faults", "single"),
            ("alerts_pollution_hours", "per_partition"),
            // A join of two topics keeps one state for both.
            ("alerts_incidents_confirmed", "single"),
            // A ranking needs every segment of a ward's minute in one state.
            ("congestion_top_wards", "single"),
            ("travel_times", "single"),
            ("alerts_flood", "per_partition"),
            // Joins of two topics keep one state for both.
            ("alerts_flooded_roads", "single"),
            ("alerts_parking_anomaly", "per_partition"),
            ("alerts_parking_full", "per_partition"),
            ("alerts_reports_confirmed", "single"),
            ("parking_lot_availability", "per_partition"),
            // A window of the lots' windows, per ward: one state.
            ("parking_ward_availability", "single"),
            ("water_level_gauge", "per_partition"),
        ];
        expected.sort_by_key(|r| r.0);
        assert_eq!(partitioning, expected);
    }
}
