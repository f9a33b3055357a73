//! Top-N per window: ranking the groups of each window (`ROW_NUMBER() OVER (PARTITION BY
//! window_start, … ORDER BY …) <= N` over a windowed aggregation), as Flink's window Top-N.
//!
//! A rank depends on every group of its window, and a revision of one group (a late event)
//! can move others in or out of the top N. So the ranking does not run over an emission's
//! rows alone: [`RankedState`] keeps the latest row of every group of each window still
//! revisable, the query runs its ranking plan over all of a window's rows whenever the window
//! emits, and the result is compared with what was published for that window: rows that
//! left go out as retractions (with the values they were published with), rows that came in
//! as inserts (the window's first emission) or updates.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use datafusion::arrow::array::{BinaryArray, Int64Array, RecordBatch, UInt32Array};
use datafusion::arrow::compute::take_record_batch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::Result;

use super::upsert::UpsertState;
use crate::checkpoint::{DeferredTable, StateSnapshot, column, meta_field, table, typed};

/// What a window's ranking changed.
pub struct Ranked {
    /// Rows published before and no longer in the result (to retract).
    pub left: RecordBatch,
    /// Rows in the result not published before (all of them on the window's first final
    /// result after early ones).
    pub entered: RecordBatch,
    /// The window's revision: 0 for its first emission.
    pub revision: u32,
    /// Whether nothing was published for the window before.
    pub first: bool,
}

/// Rows published (row-encoded), replaced whole, never changed: a checkpoint shares them.
type PublishedRows = Arc<[Box<[u8]>]>;

/// A window's rows published, its last revision, and whether they were published final.
type Published = (PublishedRows, u32, bool);

/// Per window: the latest row of each group, and the ranked rows last published.
pub struct RankedState {
    /// The aggregation's rows with their window's end and op, keyed by groups and window.
    rows: UpsertState,
    /// Output columns of the aggregation.
    width: usize,
    /// The ranking plan's output rows.
    output: RowConverter,
    output_schema: SchemaRef,
    /// Per window end: the rows published (row-encoded), the last revision, and whether
    /// they were published final.
    published: BTreeMap<i64, Published>,
}

impl RankedState {
    /// State over rows of `rows` (an aggregation's output, its window's end and an `op`,
    /// keyed by its groups and window), ranked into rows of `output_schema`.
    pub fn new(rows: UpsertState, width: usize, output_schema: SchemaRef) -> Result<Self> {
        let output = RowConverter::new(
            output_schema
                .fields()
                .iter()
                .map(|f| SortField::new(f.data_type().clone()))
                .collect(),
        )?;
        Ok(Self {
            rows,
            width,
            output,
            output_schema,
            published: BTreeMap::new(),
        })
    }

    /// Takes an emission of the aggregation (rows with window end and op, as `rows` takes
    /// them); returns the ends of the windows it touched.
    pub fn take(&mut self, batch: &RecordBatch) -> Result<std::collections::BTreeSet<i64>> {
        self.rows.apply(batch)?;
        let ends = datafusion::arrow::compute::cast(
            batch.column(self.width),
            &datafusion::arrow::datatypes::DataType::Int64,
        )?;
        Ok(ends
            .as_any()
            .downcast_ref::<Int64Array>()
            .map(|a| a.values().iter().copied().collect())
            .unwrap_or_default())
    }

    /// The current rows (aggregation columns only) of the windows ending at `ends`, in
    /// window order.
    pub fn windows(
        &self,
        ends: &std::collections::BTreeSet<i64>,
    ) -> Result<Vec<(i64, RecordBatch)>> {
        let own: Vec<usize> = (0..self.width).collect();
        self.rows
            .rows_at(ends)?
            .into_iter()
            .map(|(end, rows)| Ok((end, rows.project(&own)?)))
            .collect()
    }

    /// Schema of the rows [`RankedState::take`] takes.
    pub fn rows_schema(&self) -> SchemaRef {
        self.rows.schema()
    }

    /// Compares the ranking `result` of the window ending at `end` with what was published
    /// for it, and remembers the result as published. The first final result of a window
    /// publishes all its rows again (`entered`), after early results that were not final.
    pub fn publish(&mut self, end: i64, result: &[RecordBatch], is_final: bool) -> Result<Ranked> {
        let mut now: Vec<Box<[u8]>> = Vec::new();
        let mut now_batches = Vec::new();
        for b in result {
            let rows = self.output.convert_columns(b.columns())?;
            for r in 0..b.num_rows() {
                now.push(rows.row(r).as_ref().into());
            }
            now_batches.push(b.clone());
        }
        let (before, revision, first, again) = match self.published.get(&end) {
            Some((rows, revision, was_final)) => {
                (rows.clone(), revision + 1, false, is_final && !was_final)
            }
            None => (Arc::from(Vec::new()), 0, true, false),
        };
        // Multiset differences, keeping each side's order.
        let mut remaining: HashMap<&[u8], usize> = HashMap::new();
        for r in &now {
            *remaining.entry(r.as_ref()).or_default() += 1;
        }
        let mut left = Vec::new();
        for r in before.iter() {
            match remaining.get_mut(r.as_ref()) {
                Some(n) if *n > 0 => *n -= 1,
                _ => left.push(r.clone()),
            }
        }
        let mut stayed: HashMap<&[u8], usize> = HashMap::new();
        for r in before.iter() {
            *stayed.entry(r.as_ref()).or_default() += 1;
        }
        let mut entered: Vec<u32> = Vec::new();
        for (i, r) in now.iter().enumerate() {
            match stayed.get_mut(r.as_ref()) {
                Some(n) if *n > 0 && !again => *n -= 1,
                _ => entered.push(i as u32),
            }
        }
        let all = datafusion::arrow::compute::concat_batches(&self.output_schema, &now_batches)?;
        let entered = take_record_batch(&all, &UInt32Array::from(entered))?;
        let parser = self.output.parser();
        let count = left.len();
        let left = RecordBatch::try_new_with_options(
            self.output_schema.clone(),
            self.output
                .convert_rows(left.iter().map(|r| parser.parse(r)))?,
            &datafusion::arrow::array::RecordBatchOptions::new().with_row_count(Some(count)),
        )?;
        if left.num_rows() > 0 || entered.num_rows() > 0 {
            self.published.insert(end, (now.into(), revision, is_final));
        }
        Ok(Ranked {
            left,
            entered,
            revision,
            first,
        })
    }

    /// Forgets the windows ending at or before `end`, which can no longer change.
    pub fn evict_through(&mut self, end: i64) {
        self.rows.evict(|t| t <= end);
        self.published = self.published.split_off(&end.saturating_add(1));
    }

    /// Groups held.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty() && self.published.is_empty()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.rows.bytes()
            + self
                .published
                .values()
                .map(|(rows, _, _)| 16 + rows.iter().map(|r| r.len() + 16).sum::<usize>())
                .sum::<usize>()
    }

    /// The state for a checkpoint: the groups' rows (`rows.*`) and table `published`
    /// (window end, revision, row).
    pub fn snapshot(&mut self) -> crate::Result<StateSnapshot> {
        let mut out = StateSnapshot {
            meta: serde_json::json!({
                "windows": self
                    .published
                    .iter()
                    .map(|(e, (_, r, f))| (*e, *r, *f))
                    .collect::<Vec<_>>(),
            }),
            ..Default::default()
        };
        out.nest("rows", self.rows.snapshot()?);
        if self.published.values().any(|(rows, _, _)| !rows.is_empty()) {
            let taken = self
                .published
                .iter()
                .map(|(end, (rows, _, _))| (*end, rows.clone()))
                .collect();
            out.deferred
                .insert("published".into(), Arc::new(TakenPublished(taken)));
        }
        Ok(out)
    }

    /// Replaces the state with a [`RankedState::snapshot`].
    pub fn restore(&mut self, snapshot: &StateSnapshot) -> crate::Result<()> {
        self.rows.restore(&snapshot.nested("rows"))?;
        let windows: Vec<(i64, u32, bool)> = meta_field(&snapshot.meta, "windows")?;
        let mut rows_of: BTreeMap<i64, Vec<Box<[u8]>>> = BTreeMap::new();
        if let Some(published) = snapshot.tables.get("published") {
            let ends = typed::<Int64Array>(column(published, "end")?, "end")?;
            let rows = typed::<BinaryArray>(column(published, "row")?, "row")?;
            for r in 0..published.num_rows() {
                rows_of
                    .entry(ends.value(r))
                    .or_default()
                    .push(rows.value(r).into());
            }
        }
        self.published = windows
            .into_iter()
            .map(|(end, revision, was_final)| {
                let rows = rows_of.remove(&end).unwrap_or_default();
                (end, (rows.into(), revision, was_final))
            })
            .collect();
        Ok(())
    }
}

/// The `published` table of a [`RankedState::snapshot`]: per window end, the rows it last
/// published, as the snapshot took them.
#[derive(Debug)]
struct TakenPublished(Vec<(i64, PublishedRows)>);

impl DeferredTable for TakenPublished {
    fn compute(&self) -> crate::Result<RecordBatch> {
        let (mut ends, mut rows) = (vec![], vec![]);
        for (end, published) in &self.0 {
            for r in published.iter() {
                ends.push(*end);
                rows.push(r.as_ref());
            }
        }
        table(vec![
            ("end".into(), Arc::new(Int64Array::from(ends))),
            ("row".into(), Arc::new(BinaryArray::from(rows))),
        ])
    }
}
