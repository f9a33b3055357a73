//! A changelog source: the latest row per upsert key.
//!
//! A stream table declared with `'upsert_key' 'k1, k2'` is read as a changelog, as an
//! upstream query's output is meant to be read (`op` insert / update / retract, keyed by its
//! group keys and window): a record replaces the earlier record with the same key, and a record
//! with `op = 'retract'` deletes it. [`UpsertState::apply`] turns each admitted micro-batch
//! into the rows to add and the rows to withdraw (the ones superseded), so that the window
//! operator above (over a changelog, see [`super::window`]) holds only each key's latest row.
//!
//! A key is forgotten once every window its row belongs to is gone: a later record for it
//! would be late anyway.
//!
//! The keys live in a [`Layered`] map: a checkpoint takes them in O(1) and encodes its table
//! on the thread that writes it, while the query goes on.

use std::collections::HashMap;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, BinaryArray, Int64Array, RecordBatch, RecordBatchOptions, StringArray,
    TimestampMillisecondArray, UInt32Array,
};
use datafusion::arrow::compute::{cast, take};
use datafusion::arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::{Result, plan_err};

use super::layered::{Layered, Shared};
use crate::checkpoint::{DeferredTable, StateSnapshot, column, table, typed};

/// The `op` value that deletes a key's row.
pub const RETRACT: &str = "retract";

/// The `op` values a changelog's record may carry (in any case): `delete` deletes as
/// `retract` does; a null `op` is an upsert, as `insert` and `update` are.
pub const OPS: [&str; 4] = ["insert", "update", RETRACT, "delete"];

/// A key's latest row: its event time and the row, row-encoded.
type Latest = (i64, Box<[u8]>);

/// The latest row of each key of a changelog source.
pub struct UpsertState {
    schema: SchemaRef,
    key_columns: Vec<usize>,
    op_column: Option<usize>,
    time_column: usize,
    keys: RowConverter,
    rows: RowConverter,
    /// Per key (row-encoded): its row's event time and the row (row-encoded).
    latest: Layered<Box<[u8]>, Latest>,
    /// No key's row is older than this (`i64::MAX` when none is held): eviction walks the
    /// keys only once its frontier passes it.
    oldest: i64,
}

/// What a micro-batch does to a changelog source.
pub struct Changes {
    /// Rows taking effect: the last row of each key in the batch, unless it deletes.
    pub added: RecordBatch,
    /// Rows superseded or deleted: the rows the keys held before the batch.
    pub withdrawn: RecordBatch,
}

impl UpsertState {
    /// State for a source of `schema` keyed by the columns `key` (names), with event time in
    /// column `time`. A column named `op` says which records delete their key.
    pub fn new(schema: SchemaRef, key: &[String], time: &str) -> Result<Self> {
        let index = |name: &str| {
            schema
                .fields()
                .iter()
                .position(|f| f.name().eq_ignore_ascii_case(name))
        };
        let mut key_columns = Vec::with_capacity(key.len());
        for name in key {
            match index(name) {
                Some(i) => key_columns.push(i),
                None => {
                    return plan_err!(
                        "option 'upsert_key': {name} is not a column of the table (columns: {})",
                        schema
                            .fields()
                            .iter()
                            .map(|f| f.name().as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
            }
        }
        if key_columns.is_empty() {
            return plan_err!(
                "option 'upsert_key' names no column: write the columns that identify a row, \
                 e.g. 'segment_id, window_start'"
            );
        }
        let Some(time_column) = index(time) else {
            return plan_err!("event-time column {time} missing");
        };
        let op_column = index("op").filter(|i| {
            matches!(
                schema.field(*i).data_type(),
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
            )
        });
        Self::by_index(schema, key_columns, time_column, op_column)
    }

    /// State for rows of `schema` keyed by the columns at `key_columns`, with event time at
    /// `time_column` and, when given, the `op` (a string column) at `op_column`.
    pub fn by_index(
        schema: SchemaRef,
        key_columns: Vec<usize>,
        time_column: usize,
        op_column: Option<usize>,
    ) -> Result<Self> {
        let sort = |columns: Vec<usize>| -> Vec<SortField> {
            columns
                .into_iter()
                .map(|i| SortField::new(schema.field(i).data_type().clone()))
                .collect()
        };
        Ok(Self {
            keys: RowConverter::new(sort(key_columns.clone()))?,
            rows: RowConverter::new(sort((0..schema.fields().len()).collect()))?,
            schema,
            key_columns,
            op_column,
            time_column,
            latest: Layered::default(),
            oldest: i64::MAX,
        })
    }

    /// The keys of `batch`'s rows, row-encoded (equal keys, equal bytes).
    pub fn key_rows(&self, batch: &RecordBatch) -> Result<datafusion::arrow::row::Rows> {
        let keys: Vec<ArrayRef> = self
            .key_columns
            .iter()
            .map(|i| batch.column(*i).clone())
            .collect();
        Ok(self.keys.convert_columns(&super::comparable_keys(&keys))?)
    }

    /// The event time of the row `key` (row-encoded, see [`UpsertState::key_rows`]) holds.
    pub fn held_time(&self, key: &[u8]) -> Option<i64> {
        self.latest.get(key).map(|(t, _)| *t)
    }

    /// Applies `batch` (admitted rows, in arrival order): returns the rows that take effect
    /// and the rows they supersede.
    pub fn apply(&mut self, batch: &RecordBatch) -> Result<Changes> {
        self.apply_with_late(batch, &[])
    }

    /// The rows of `batch` whose `op` is none of [`OPS`] (nor null), with the value: read as
    /// an upsert, a record meant to delete in another spelling would add a row.
    pub fn unknown_ops(&self, batch: &RecordBatch) -> Result<Vec<(u32, String)>> {
        let Some(i) = self.op_column else {
            return Ok(Vec::new());
        };
        let ops = cast(batch.column(i), &DataType::Utf8)?;
        let Some(ops) = ops.as_any().downcast_ref::<StringArray>() else {
            return plan_err!("the op column is not text");
        };
        Ok(ops
            .iter()
            .enumerate()
            .filter_map(|(r, op)| {
                let op = op?;
                (!OPS.iter().any(|known| op.eq_ignore_ascii_case(known)))
                    .then(|| (r as u32, op.to_string()))
            })
            .collect())
    }

    /// [`UpsertState::apply`], where `late[i]` says row `i` came too late for its windows: as
    /// its key's latest record it still supersedes the key's row (withdrawn), and adds
    /// nothing.
    pub fn apply_with_late(&mut self, batch: &RecordBatch, late: &[bool]) -> Result<Changes> {
        self.latest.settle_before(batch.num_rows());
        let keys: Vec<ArrayRef> = self
            .key_columns
            .iter()
            .map(|i| batch.column(*i).clone())
            .collect();
        let keys = self.keys.convert_columns(&super::comparable_keys(&keys))?;
        let rows = self.rows.convert_columns(batch.columns())?;
        let times = cast(
            batch.column(self.time_column),
            &DataType::Timestamp(TimeUnit::Millisecond, None),
        )?;
        let Some(times) = times.as_any().downcast_ref::<TimestampMillisecondArray>() else {
            return plan_err!("the event-time column is not a timestamp");
        };
        let deletes = match self.op_column {
            Some(i) => Some(cast(batch.column(i), &DataType::Utf8)?),
            None => None,
        };
        let deletes = deletes
            .as_ref()
            .and_then(|d| d.as_any().downcast_ref::<StringArray>());
        // The last row of each key in the batch decides.
        let mut last: HashMap<&[u8], usize> = HashMap::new();
        for r in 0..batch.num_rows() {
            last.insert(keys.row(r).data(), r);
        }
        let mut added: Vec<u32> = Vec::new();
        let mut withdrawn: Vec<Box<[u8]>> = Vec::new();
        let mut decided: Vec<(&[u8], usize)> = last.into_iter().collect();
        decided.sort_unstable_by_key(|(_, r)| *r);
        for (key, r) in decided {
            let delete = late.get(r).copied().unwrap_or(false)
                || deletes.is_some_and(|d| {
                    !d.is_null(r)
                        && (d.value(r).eq_ignore_ascii_case(RETRACT)
                            || d.value(r).eq_ignore_ascii_case("delete"))
                });
            let previous = if delete {
                self.latest.remove(key)
            } else {
                added.push(r as u32);
                self.oldest = self.oldest.min(times.value(r));
                self.latest
                    .replace(key.into(), (times.value(r), rows.row(r).data().into()))
            };
            if let Some((_, row)) = previous {
                withdrawn.push(row);
            }
        }
        let indices = UInt32Array::from(added);
        let added = RecordBatch::try_new_with_options(
            self.schema.clone(),
            batch
                .columns()
                .iter()
                .map(|c| take(c.as_ref(), &indices, None))
                .collect::<std::result::Result<Vec<_>, _>>()?,
            &RecordBatchOptions::new().with_row_count(Some(indices.len())),
        )?;
        let parser = self.rows.parser();
        let count = withdrawn.len();
        let withdrawn = RecordBatch::try_new_with_options(
            self.schema.clone(),
            self.rows
                .convert_rows(withdrawn.iter().map(|r| parser.parse(r)))?,
            &RecordBatchOptions::new().with_row_count(Some(count)),
        )?;
        Ok(Changes { added, withdrawn })
    }

    /// Every key's latest row, in the order of their row encoding (so the same state gives
    /// the same batch however it was built).
    pub fn held(&self) -> Result<RecordBatch> {
        let mut rows: Vec<&[u8]> = self.latest.values().map(|(_, row)| &row[..]).collect();
        rows.sort_unstable();
        let parser = self.rows.parser();
        let count = rows.len();
        Ok(RecordBatch::try_new_with_options(
            self.schema.clone(),
            self.rows
                .convert_rows(rows.into_iter().map(|r| parser.parse(r)))?,
            &RecordBatchOptions::new().with_row_count(Some(count)),
        )?)
    }

    /// The latest rows whose event time is one of `times`, per time.
    pub fn rows_at(
        &self,
        times: &std::collections::BTreeSet<i64>,
    ) -> Result<std::collections::BTreeMap<i64, RecordBatch>> {
        let mut rows: std::collections::BTreeMap<i64, Vec<&[u8]>> =
            times.iter().map(|t| (*t, Vec::new())).collect();
        for (t, row) in self.latest.values() {
            if let Some(at) = rows.get_mut(t) {
                at.push(row);
            }
        }
        let parser = self.rows.parser();
        rows.into_iter()
            .map(|(t, at)| {
                // Sorted, so that a plan over them sees the same input however the state
                // was built.
                let mut at = at;
                at.sort_unstable();
                let count = at.len();
                let batch = RecordBatch::try_new_with_options(
                    self.schema.clone(),
                    self.rows
                        .convert_rows(at.into_iter().map(|r| parser.parse(r)))?,
                    &RecordBatchOptions::new().with_row_count(Some(count)),
                )?;
                Ok((t, batch))
            })
            .collect()
    }

    /// Schema of the rows it takes.
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// Forgets the keys whose row is at an event time for which `gone` holds. `gone` is a
    /// frontier: it holds for every time before one it holds for. So the keys are walked only
    /// once it passes the oldest row held, not on every micro-batch.
    pub fn evict(&mut self, gone: impl Fn(i64) -> bool) {
        if self.latest.is_empty() {
            self.oldest = i64::MAX;
            return;
        }
        if !gone(self.oldest) {
            return;
        }
        self.latest.retain(|(t, _)| !gone(*t));
        self.oldest = self.oldest_held();
    }

    /// The event time of the oldest row held (`i64::MAX` when none is).
    fn oldest_held(&self) -> i64 {
        self.latest
            .values()
            .map(|(t, _)| *t)
            .min()
            .unwrap_or(i64::MAX)
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.latest.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.latest.is_empty()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.latest
            .iter()
            .map(|(k, (_, r))| k.len() + r.len() + 48)
            .sum()
    }

    /// The state for a checkpoint: table `latest` (key, event time, row), deferred: the
    /// query's thread only takes the keys ([`Layered::share`]), and the table is encoded
    /// from them when the snapshot is resolved ([`StateSnapshot::resolve`]).
    pub fn snapshot(&mut self) -> crate::Result<StateSnapshot> {
        let mut out = StateSnapshot::default();
        if self.latest.is_empty() {
            return Ok(out);
        }
        out.deferred
            .insert("latest".into(), Arc::new(TakenLatest(self.latest.share())));
        Ok(out)
    }

    /// Replaces the state with a [`UpsertState::snapshot`].
    pub fn restore(&mut self, snapshot: &StateSnapshot) -> crate::Result<()> {
        self.latest.clear();
        self.oldest = i64::MAX;
        let Some(latest) = snapshot.tables.get("latest") else {
            return Ok(());
        };
        let keys = typed::<BinaryArray>(column(latest, "key")?, "key")?;
        let times = typed::<Int64Array>(column(latest, "time")?, "time")?;
        let rows = typed::<BinaryArray>(column(latest, "row")?, "row")?;
        for r in 0..latest.num_rows() {
            self.latest
                .insert(keys.value(r).into(), (times.value(r), rows.value(r).into()));
        }
        self.oldest = self.oldest_held();
        Ok(())
    }
}

/// The keys' latest rows as an [`UpsertState::snapshot`] took them, encoded into its
/// `latest` table when the snapshot is resolved.
#[derive(Debug)]
struct TakenLatest(Shared<Box<[u8]>, Latest>);

impl DeferredTable for TakenLatest {
    fn compute(&self) -> crate::Result<RecordBatch> {
        let n = self.0.len();
        let (mut keys, mut times, mut rows) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for (k, (t, r)) in self.0.iter() {
            keys.push(k.as_ref());
            times.push(*t);
            rows.push(r.as_ref());
        }
        table(vec![
            ("key".into(), Arc::new(BinaryArray::from(keys))),
            ("time".into(), Arc::new(Int64Array::from(times))),
            ("row".into(), Arc::new(BinaryArray::from(rows))),
        ])
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::datatypes::{Field, Schema};

    use super::*;

    fn batch(rows: &[(&str, i64, i64, &str)]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new("t", DataType::Timestamp(TimeUnit::Millisecond, None), false),
            Field::new("v", DataType::Int64, false),
            Field::new("op", DataType::Utf8, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(
                    rows.iter().map(|r| r.0).collect::<Vec<_>>(),
                )),
                Arc::new(TimestampMillisecondArray::from(
                    rows.iter().map(|r| r.1).collect::<Vec<_>>(),
                )),
                Arc::new(Int64Array::from(
                    rows.iter().map(|r| r.2).collect::<Vec<_>>(),
                )),
                Arc::new(StringArray::from(
                    rows.iter().map(|r| r.3).collect::<Vec<_>>(),
                )),
            ],
        )
        .expect("batch")
    }

    fn values(b: &RecordBatch) -> Vec<i64> {
        let v = b
            .column(2)
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("v");
        v.values().to_vec()
    }

    #[test]
    fn a_record_supersedes_its_keys_row_and_a_retract_deletes_it() {
        let first = batch(&[("a", 0, 1, "insert"), ("b", 0, 2, "insert")]);
        let mut state =
            UpsertState::new(first.schema(), &["k".into(), "t".into()], "t").expect("state");
        let c = state.apply(&first).expect("apply");
        assert_eq!(values(&c.added), vec![1, 2]);
        assert_eq!(c.withdrawn.num_rows(), 0);
        // An update of a, and b updated twice in one batch: only its last row takes effect.
        let c = state
            .apply(&batch(&[
                ("b", 0, 20, "update"),
                ("a", 0, 10, "update"),
                ("b", 0, 21, "update"),
            ]))
            .expect("apply");
        assert_eq!(values(&c.added), vec![10, 21]);
        let mut w = values(&c.withdrawn);
        w.sort_unstable();
        assert_eq!(w, vec![1, 2]);
        // A retract deletes; the same key at another time is another key.
        let c = state
            .apply(&batch(&[("a", 0, 10, "retract"), ("a", 60, 5, "insert")]))
            .expect("apply");
        assert_eq!(values(&c.added), vec![5]);
        assert_eq!(values(&c.withdrawn), vec![10]);
        assert_eq!(state.len(), 2);
        // A checkpoint round trip keeps the rows; eviction forgets old keys.
        let mut snapshot = state.snapshot().expect("snapshot");
        assert!(snapshot.tables.is_empty(), "read out when resolved");
        // Replaced and deleted after the snapshot was taken: not in it, and the state sees
        // the rows it replaces and deletes.
        let c = state
            .apply(&batch(&[("b", 0, 99, "update"), ("a", 60, 0, "retract")]))
            .expect("apply");
        assert_eq!(values(&c.withdrawn), vec![21, 5]);
        assert_eq!(state.len(), 1);
        snapshot.resolve().expect("resolve");
        let mut restored =
            UpsertState::new(first.schema(), &["k".into(), "t".into()], "t").expect("state");
        restored.restore(&snapshot).expect("restore");
        let c = restored
            .apply(&batch(&[("b", 0, 22, "update")]))
            .expect("apply");
        assert_eq!(values(&c.withdrawn), vec![21]);
        restored.evict(|t| t < 60);
        assert_eq!(restored.len(), 1);
    }

    /// Eviction forgets exactly the keys whose row is behind the frontier, however the rows
    /// were replaced (a key's row may move back in time), and keeps track of the oldest row
    /// to skip the walk while the frontier is behind it.
    #[test]
    fn eviction_follows_the_oldest_row_held() {
        let first = batch(&[("a", 100, 1, "insert"), ("b", 200, 2, "insert")]);
        let mut state = UpsertState::new(first.schema(), &["k".into()], "t").expect("state");
        state.apply(&first).expect("apply");
        assert_eq!(state.oldest, 100);
        state.evict(|t| t < 50);
        assert_eq!(state.len(), 2);
        state.evict(|t| t < 150);
        assert_eq!(state.len(), 1, "a is behind the frontier");
        assert_eq!(state.oldest, 200);
        // b's row moves back in time: the frontier now passes it.
        state
            .apply(&batch(&[("b", 10, 3, "update"), ("c", 300, 4, "insert")]))
            .expect("apply");
        assert_eq!(state.oldest, 10);
        state.evict(|t| t < 150);
        assert_eq!(state.len(), 1);
        assert_eq!(state.oldest, 300);
        state
            .apply(&batch(&[("c", 300, 4, "retract")]))
            .expect("apply");
        state.evict(|t| t < 1_000);
        assert!(state.is_empty());
        assert_eq!(state.oldest, i64::MAX);
    }

    #[test]
    fn an_unknown_key_column_is_named() {
        let b = batch(&[]);
        let e = UpsertState::new(b.schema(), &["segment".into()], "t")
            .err()
            .expect("refused");
        assert!(e.to_string().contains("segment is not a column"), "{e}");
    }
}
