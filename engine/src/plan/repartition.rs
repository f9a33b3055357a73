//! Repartitioning: a query whose groups span input partitions (it groups by something other
//! than the column its input topic is keyed by, e.g. ward totals over segment-keyed camera
//! events) runs in two stages joined by an internal Kafka topic, the way Kafka Streams
//! repartitions:
//!
//! ```text
//!   input partition p ── stage 1: key plan ──► repartition topic, partition hash(group) % n
//!                                               (the input record as it is, with its origin)
//!   repartition partition q ── stage 2: the query, keeping only groups with hash % n = q
//! ```
//!
//! Stage 1 is stateless. The [`KeyPlan`] is the query's own `FROM … JOIN … WHERE` with its
//! `GROUP BY` keys as the select list, over the input with a row number added: for each input
//! record it gives the partitions its groups belong to (a lookup join may give a record
//! several). Stage 2 runs the whole query on the records of its partition and, after its
//! joins and filters, keeps the rows of its own groups only ([`group_partitions`], the same
//! hash on the same expressions). So each group's state lives in exactly one partition of the
//! repartition topic, which moves between processes like any input partition.

use crate::plan::reused::ReusedPlan;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use datafusion::arrow::array::{ArrayRef, RecordBatch, UInt32Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::Result;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::execution::TaskContext;
use datafusion::sql::parser::Statement as DFStatement;
use datafusion::sql::sqlparser::ast::{
    Expr, GroupByExpr, Ident, ObjectName, ObjectNamePart, Query, Select, SelectItem, SetExpr,
    Statement, TableAlias, TableFactor,
};

use super::feed::{Feed, FeedExec};
use super::rewrite::is_window_call;
use super::stream::StreamContext;
use super::table::{StreamOptions, StreamTable};
use crate::schema::TopicSchema;

/// The row-number column the key plan's input carries.
const ROW: &str = "__urbanstream_row";

/// Which partitions (of `n`) the rows of `keys` (group key columns) belong to: a stable hash
/// (FNV-1a over Arrow's row format of the key values), the same in every process.
pub fn group_partitions(keys: &[ArrayRef], n: u32) -> Result<Vec<u32>> {
    let rows = match keys.first() {
        Some(first) => first.len(),
        None => return Ok(Vec::new()),
    };
    let fields = keys
        .iter()
        .map(|k| SortField::new(k.data_type().clone()))
        .collect();
    let converter = RowConverter::new(fields)?;
    let encoded = converter.convert_columns(&crate::state::comparable_keys(keys))?;
    let n = u64::from(n.max(1));
    Ok((0..rows)
        .map(|r| (fnv1a(encoded.row(r).as_ref()) % n) as u32)
        .collect())
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Stage 1 of a repartitioned query: per input record, the partitions of its groups.
pub struct KeyPlan {
    feed: Feed,
    plan: ReusedPlan,
    task_ctx: Arc<TaskContext>,
    schema: SchemaRef,
}

impl std::fmt::Debug for KeyPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPlan").finish_non_exhaustive()
    }
}

impl KeyPlan {
    /// For each row of `batch` (the source's decoded records), the partitions of `n` its
    /// groups belong to; none when the query's filters drop it, or when the plan fails on
    /// its values alone (a cast, a division by zero: [`is_data_error`]): such rows are
    /// returned with the error, found by halving the batch, and the others go on.
    ///
    /// [`is_data_error`]: super::stream::is_data_error
    pub async fn targets(
        &self,
        batch: &RecordBatch,
        n: u32,
    ) -> Result<(Vec<Vec<u32>>, Vec<(u32, String)>)> {
        let mut out = vec![Vec::new(); batch.num_rows()];
        let mut failed = Vec::new();
        let mut pieces = Vec::new();
        // Ranges still to key, the next on top; a failed range is halved in place.
        let mut ranges = vec![(0, batch.num_rows())];
        while let Some((start, len)) = ranges.pop() {
            if len == 0 {
                continue;
            }
            let slice = if len == batch.num_rows() {
                batch.clone()
            } else {
                batch.slice(start, len)
            };
            match self.keys(&slice).await {
                Ok(keyed) => {
                    for (rows, keys) in keyed {
                        let rows: UInt32Array =
                            rows.values().iter().map(|r| r + start as u32).collect();
                        pieces.push((rows, keys));
                    }
                }
                Err(e) if super::stream::is_data_error(&e) => {
                    if len == 1 {
                        failed.push((start as u32, e.to_string()));
                    } else {
                        ranges.push((start + len / 2, len - len / 2));
                        ranges.push((start, len / 2));
                    }
                }
                Err(e) => return Err(e),
            }
        }
        for (rows, keys) in pieces {
            let partitions = group_partitions(&keys, n)?;
            for (r, q) in rows.values().iter().zip(partitions) {
                let targets = &mut out[*r as usize];
                if !targets.contains(&q) {
                    targets.push(q);
                }
            }
        }
        Ok((out, failed))
    }

    /// The group keys of the rows of `batch` (the source's decoded records), after the
    /// query's joins and filters: pieces of (row index in `batch`, key columns). A row the
    /// query's filters drop has none; a lookup join may give a row several.
    pub async fn keys(&self, batch: &RecordBatch) -> Result<Vec<(UInt32Array, Vec<ArrayRef>)>> {
        let rows = batch.num_rows();
        let mut columns = batch.columns().to_vec();
        columns.push(Arc::new(UInt32Array::from_iter_values(0..rows as u32)));
        self.feed
            .set(vec![RecordBatch::try_new(self.schema.clone(), columns)?]);
        let mut out = Vec::new();
        for keyed in self.plan.collect(self.task_ctx.clone()).await? {
            if keyed.num_rows() == 0 {
                continue;
            }
            let cast = datafusion::arrow::compute::cast(keyed.column(0), &DataType::UInt32)?;
            let Some(row) = cast.as_any().downcast_ref::<UInt32Array>() else {
                continue;
            };
            out.push((row.clone(), keyed.columns()[1..].to_vec()));
        }
        Ok(out)
    }
}

/// The select list of stage 1 of the query planned from `sql` (see [`key_plan`]), reading
/// stream `source` through table `table`; `None` without one.
fn key_select(sql: &str, source: &str, table: &str) -> Result<Option<Select>> {
    let mut statements = StreamContext::parse(sql)?;
    let Some(DFStatement::Statement(statement)) = statements.pop() else {
        return Ok(None);
    };
    let body = match statement.as_ref() {
        Statement::Insert(insert) => insert.source.as_deref(),
        Statement::Query(q) => Some(q.as_ref()),
        _ => None,
    };
    let Some(select) = body.and_then(window_select) else {
        return Ok(None);
    };
    let GroupByExpr::Expressions(group, _) = &select.group_by else {
        return Ok(None);
    };
    let keys: Vec<Expr> = group
        .iter()
        .filter(|e| !is_window_call(e))
        .cloned()
        .collect();
    if keys.is_empty() {
        return Ok(None);
    }
    let mut select = select.clone();
    let mut qualifier = None;
    for from in select.from.iter_mut() {
        for factor in std::iter::once(&mut from.relation)
            .chain(from.joins.iter_mut().map(|j| &mut j.relation))
        {
            if let TableFactor::Table { name, alias, .. } = factor
                && name
                    .0
                    .last()
                    .and_then(ObjectNamePart::as_ident)
                    .is_some_and(|i| i.value.eq_ignore_ascii_case(source))
            {
                let shown = alias
                    .as_ref()
                    .map_or_else(|| source.to_string(), |a| a.name.value.clone());
                *name = ObjectName::from(vec![Ident::new(table)]);
                if alias.is_none() {
                    *alias = Some(TableAlias {
                        explicit: true,
                        name: Ident::new(&shown),
                        columns: Vec::new(),
                        at: None,
                    });
                }
                qualifier = Some(shown);
            }
        }
    }
    let Some(qualifier) = qualifier else {
        return Ok(None);
    };
    select.projection = std::iter::once(SelectItem::UnnamedExpr(Expr::CompoundIdentifier(vec![
        Ident::new(qualifier),
        Ident::new(ROW),
    ])))
    .chain(
        keys.into_iter()
            .enumerate()
            .map(|(i, expr)| SelectItem::ExprWithAlias {
                expr,
                alias: Ident::new(format!("__urbanstream_key{i}")),
            }),
    )
    .collect();
    select.group_by = GroupByExpr::Expressions(Vec::new(), Vec::new());
    select.having = None;
    Ok(Some(select))
}

/// What decides which records stage 1 of the query planned from `sql` passes on, and where
/// (its joins, filters and group keys), as text; `None` when it has no stage 1. Queries with
/// the same text pass the same records on to the same partitions.
pub fn key_statement(sql: &str, source: &str) -> Result<Option<String>> {
    Ok(key_select(sql, source, "__urbanstream_rows")?.map(|s| s.to_string()))
}

/// Plans stage 1 of the query planned from `sql`, reading `source`: its innermost `SELECT …
/// GROUP BY <window>, keys` with the keys as the select list and the stream replaced by a
/// row-numbered copy. `None` when the query has no such select over its stream table
/// directly (a view, say): it then keeps one state for all partitions.
pub async fn key_plan(
    ctx: &StreamContext,
    sql: String,
    source: Arc<StreamTable>,
) -> Result<Option<KeyPlan>> {
    static PLANS: AtomicU64 = AtomicU64::new(0);
    let table = format!(
        "__urbanstream_rows_{}",
        PLANS.fetch_add(1, Ordering::Relaxed)
    );
    let Some(select) = key_select(&sql, &source.name, &table)? else {
        return Ok(None);
    };
    let mut fields: Vec<Field> = source
        .topic_schema
        .output_schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new(ROW, DataType::UInt32, false));
    let schema = Arc::new(Schema::new(fields));
    let session = ctx.session();
    // The row-numbered copy of the stream, a stream table of its own for the planning.
    session.register_table(
        table.as_str(),
        Arc::new(StreamTable::new(
            table.clone(),
            Arc::new(TopicSchema::from_arrow(&table, schema.clone())),
            StreamOptions::new(&table),
        )?),
    )?;
    let planned = async {
        let logical = session
            .state()
            .create_logical_plan(&select.to_string())
            .await?;
        let physical = session.state().create_physical_plan(&logical).await?;
        super::lookup::refresh_lookup_joins(physical, ctx.reference_generation())
            .and_then(super::fan_out::guard_unnest)
    }
    .await;
    session.deregister_table(table.as_str())?;
    let plan = planned?;
    let mut feeds = Vec::new();
    plan.apply(|node| {
        if let Some(f) = node.downcast_ref::<FeedExec>() {
            feeds.push(f.feed().clone());
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    let [feed] = feeds.as_slice() else {
        return Ok(None);
    };
    Ok(Some(KeyPlan {
        feed: feed.clone(),
        plan: ReusedPlan::new(plan),
        task_ctx: Arc::new(TaskContext::from(&session.state())),
        schema,
    }))
}

/// The innermost `SELECT` of `query` whose `GROUP BY` holds a window call.
fn window_select(query: &Query) -> Option<&Select> {
    let SetExpr::Select(select) = query.body.as_ref() else {
        return None;
    };
    if let GroupByExpr::Expressions(exprs, _) = &select.group_by
        && exprs.iter().any(is_window_call)
    {
        return Some(select);
    }
    select.from.iter().find_map(|from| {
        std::iter::once(&from.relation)
            .chain(from.joins.iter().map(|j| &j.relation))
            .find_map(|factor| match factor {
                TableFactor::Derived { subquery, .. } => window_select(subquery),
                _ => None,
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::StringArray;

    /// Stage 1 is decided by the FROM, joins, WHERE and group keys of the windowed select:
    /// what is computed from the groups (aggregates, HAVING, the outer query) does not
    /// change it, a filter or another key does.
    #[test]
    fn the_key_statement_follows_what_selects_and_routes_records() {
        let sql = |body: &str| format!("INSERT INTO out {body}");
        let base = sql("SELECT camera_id, count(*) AS n FROM camera_events \
             GROUP BY tumble(event_time, INTERVAL '1 minute'), camera_id");
        let key = |q: &str| key_statement(q, "camera_events").expect("parsed");
        let of_base = key(&base);
        assert!(
            of_base.as_deref().is_some_and(|k| k.contains("camera_id")),
            "{of_base:?}"
        );
        for same in [
            sql("SELECT camera_id, sum(speed_kmh) AS s FROM camera_events \
                 GROUP BY tumble(event_time, INTERVAL '1 minute'), camera_id HAVING count(*) > 2"),
            sql("SELECT camera_id, count(*) AS n FROM camera_events \
                 GROUP BY tumble(event_time, INTERVAL '1 minute'), camera_id"),
        ] {
            assert_eq!(key(&same), of_base, "{same}");
        }
        for other in [
            sql(
                "SELECT camera_id, count(*) AS n FROM camera_events WHERE speed_kmh > 5 \
                 GROUP BY tumble(event_time, INTERVAL '1 minute'), camera_id",
            ),
            sql("SELECT segment_id, count(*) AS n FROM camera_events \
                 GROUP BY tumble(event_time, INTERVAL '1 minute'), segment_id"),
        ] {
            assert_ne!(key(&other), of_base, "{other}");
        }
        // No group key besides the window: no stage 1.
        assert_eq!(
            key(&sql("SELECT count(*) AS n FROM camera_events \
                      GROUP BY tumble(event_time, INTERVAL '1 minute')")),
            None
        );
    }

    #[test]
    fn group_partitions_are_stable_and_spread() {
        let keys: Vec<ArrayRef> = vec![Arc::new(StringArray::from(
            (0..64).map(|i| format!("ward-{i}")).collect::<Vec<_>>(),
        ))];
        let a = group_partitions(&keys, 4).expect("hash");
        let b = group_partitions(&keys, 4).expect("hash");
        assert_eq!(a, b);
        for q in 0..4 {
            assert!(a.contains(&q), "partition {q} never chosen: {a:?}");
        }
        // The same key, wherever it is in the batch, goes to the same partition.
        let one: Vec<ArrayRef> = vec![Arc::new(StringArray::from(vec!["ward-5"]))];
        assert_eq!(group_partitions(&one, 4).expect("hash")[0], a[5]);
    }

    /// Detectors and `LAG` over the windows keyed by every group key (and more) keep their
    /// keys' state with the groups: the query is repartitioned. Keyed by fewer (a key's rows
    /// would come from groups of several partitions), it keeps one state. (Below the windows
    /// they are refused.)
    #[tokio::test]
    async fn detectors_keyed_by_the_groups_go_with_them_through_the_repartition_topic() {
        use crate::schema::SchemaRegistry;
        use crate::topics::Topics;
        let schemas = SchemaRegistry::embedded().expect("schemas");
        let windows = |keys: &str| {
            format!(
                "SELECT s.ward_id, c.kind, window_end, count(*) AS n \
                 FROM camera_events c JOIN segments s ON c.segment_id = s.segment_id \
                 GROUP BY tumble(c.event_time, INTERVAL '1 minute'), {keys}"
            )
        };
        for (sql, repartitioned) in [
            (
                format!(
                    "SELECT ward_id, kind, window_end, anomaly_score(CAST(n AS DOUBLE), window_end) \
                     OVER (PARTITION BY ward_id, kind ORDER BY window_end) AS d FROM ({})",
                    windows("s.ward_id, c.kind")
                ),
                true,
            ),
            (
                format!(
                    "SELECT ward_id, kind, window_end, n - lag(n) \
                     OVER (PARTITION BY kind, ward_id ORDER BY window_end) AS change FROM ({})",
                    windows("s.ward_id, c.kind")
                ),
                true,
            ),
            (
                format!(
                    "SELECT ward_id, kind, window_end, anomaly_score(CAST(n AS DOUBLE), window_end) \
                     OVER (PARTITION BY ward_id ORDER BY window_end) AS d FROM ({})",
                    windows("s.ward_id, c.kind")
                ),
                false,
            ),
            (
                format!(
                    "SELECT ward_id, kind, window_end, n, n - lag(n) \
                     OVER (PARTITION BY kind ORDER BY window_end) AS change FROM ({})",
                    windows("s.ward_id, c.kind")
                ),
                false,
            ),
        ] {
            let ctx = crate::plan::city_context(&Topics::default(), &schemas).expect("city");
            let query = crate::plan::plan_all(&ctx, &sql)
                .await
                .expect("plan")
                .pop()
                .expect("query");
            assert!(!query.is_partition_local(), "{sql}");
            assert_eq!(query.is_repartitionable(), repartitioned, "{sql}");
            if repartitioned {
                assert!(
                    key_plan(&ctx, query.sql().to_string(), query.source().clone())
                        .await
                        .expect("key plan")
                        .is_some(),
                    "{sql}"
                );
            }
        }
    }

    /// Stage 1 of ward totals over camera events: each record goes where its ward's group
    /// lives, records the query filters out go nowhere, and a query grouping by the input's
    /// key is not repartitioned.
    #[tokio::test]
    async fn the_key_plan_sends_each_record_to_its_groups_partition() {
        use crate::decode::JsonDecoder;
        use crate::schema::SchemaRegistry;
        use crate::source::RawBatch;
        use crate::topics::Topics;
        let schemas = SchemaRegistry::embedded().expect("schemas");
        let ctx = crate::plan::city_context(&Topics::default(), &schemas).expect("city");
        let sql = "SELECT s.ward_id, window_start, count(*) AS n \
             FROM camera_events c LEFT JOIN segments s ON c.segment_id = s.segment_id \
             WHERE c.kind = 'detection' \
             GROUP BY tumble(c.event_time, INTERVAL '1 minute'), s.ward_id";
        let query = crate::plan::plan_all(&ctx, sql)
            .await
            .expect("plan")
            .pop()
            .expect("query");
        assert!(!query.is_partition_local() && query.is_repartitionable());
        let keys = key_plan(&ctx, query.sql().to_string(), query.source().clone())
            .await
            .expect("key plan")
            .expect("repartitionable");
        let mut raw = RawBatch::new("city.camera.events");
        // tay_son and thai_ha_flyover lie in one ward, xuan_thuy in another; the incident is
        // filtered out; an unknown segment has no ward (a null group).
        for (i, (segment, kind)) in [
            ("tay_son", "detection"),
            ("xuan_thuy", "detection"),
            ("thai_ha_flyover", "detection"),
            ("tay_son", "collision"),
            ("nowhere", "detection"),
        ]
        .iter()
        .enumerate()
        {
            let value = format!(
                r#"{{"camera_id":"c{i}","segment_id":"{segment}","event_time":1767222000000,"kind":"{kind}","confidence":0.9}}"#
            );
            raw.push(
                0,
                i as i64,
                Some(segment.as_bytes()),
                Some(value.as_bytes()),
            );
        }
        let decoded = JsonDecoder::new(schemas.get("camera_event").expect("schema"))
            .decode(&raw)
            .expect("decode");
        assert_eq!(decoded.batch.num_rows(), 5);
        let (targets, failed) = keys.targets(&decoded.batch, 4).await.expect("targets");
        assert!(failed.is_empty(), "{failed:?}");
        let wards = crate::reference::ReferenceData::embedded().expect("reference");
        let ward_of = |segment: &str| {
            wards
                .segments
                .iter()
                .find(|s| s.segment_id == segment)
                .map(|s| s.ward_id.clone())
                .expect("segment")
        };
        let expected = |ward: Option<String>| {
            let key: ArrayRef = Arc::new(StringArray::from(vec![ward]));
            group_partitions(&[key], 4).expect("hash")
        };
        assert_eq!(ward_of("tay_son"), ward_of("thai_ha_flyover"));
        assert_eq!(targets[0], expected(Some(ward_of("tay_son"))));
        assert_eq!(targets[1], expected(Some(ward_of("xuan_thuy"))));
        assert_eq!(targets[2], targets[0], "one ward, one partition");
        assert!(targets[3].is_empty(), "filtered out: {:?}", targets[3]);
        assert_eq!(targets[4], expected(None));

        let by_segment = crate::plan::plan_all(
            &ctx,
            "SELECT c.segment_id, window_start, count(*) AS n FROM camera_events c \
             GROUP BY tumble(c.event_time, INTERVAL '1 minute'), c.segment_id",
        )
        .await
        .expect("plan")
        .pop()
        .expect("query");
        assert!(by_segment.is_partition_local());
    }
}
