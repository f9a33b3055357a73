//! Stream–stream joins bounded in event time:
//! `a JOIN b ON a.k = b.k AND b.ts BETWEEN a.ts - INTERVAL … AND a.ts + INTERVAL …`.
//!
//! Each side keeps the rows it has seen (after its stateless plan: filters, projections,
//! lookups) in a buffer indexed by the join key. A row arriving on one side is joined with the
//! buffered rows of the other, then buffered itself; so each pair of rows is produced once,
//! when the later of the two arrives, whichever order the sides deliver in. The join's
//! condition (the time bound and any other predicate) is DataFusion's own [`JoinFilter`],
//! evaluated on the candidate pairs.
//!
//! With `right.ts - left.ts` bounded to `[lo, hi]`, a left row at `t` can meet no right row
//! to come once the right side's watermark passes `t + hi` (rows older than a watermark are
//! late and never reach the join); it is then evicted, and, when its side is kept whole (the
//! left of a `LEFT JOIN`), emitted with nulls if it met nothing. Likewise a right row at `t`
//! once the left watermark passes `t - lo`. So the state holds each side's rows for the span
//! of the bound plus the watermark delay, and no longer.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;

use datafusion::arrow::row::Rows;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, RecordBatch, UInt32Array, new_null_array,
};
use datafusion::arrow::buffer::NullBuffer;
use datafusion::arrow::compute::{
    FilterBuilder, FilterPredicate, cast, concat, concat_batches, filter_record_batch,
    prep_null_mask_filter, take,
};
use datafusion::arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::{JoinSide, JoinType, Result, plan_err};

/// The most pairs one row of a join of two streams may make (as many as a lookup join's
/// rows, `plan::fan_out::MAX_JOIN_ROWS`), and the most result rows a join with no
/// aggregation above it may give from one micro-batch.
pub const MAX_PAIRS: u64 = 1 << 22;

/// About how many pairs [`StreamJoin::arrive`] makes in one part: the rows that arrive are
/// joined in parts of about this many pairs, each run through the plan above the join before
/// the next, so that a backlog's large micro-batch is not held as pairs all at once.
pub const PART_PAIRS: usize = 1 << 20;
use datafusion::physical_expr::PhysicalExprRef;
use datafusion::physical_plan::joins::utils::JoinFilter;

use crate::checkpoint::{DeferredTable, StateSnapshot, column, typed};

/// What the planner found in the join node.
#[derive(Debug, Clone)]
pub struct JoinSpec {
    /// Inner, left, right or full.
    pub join_type: JoinType,
    /// Equi-join keys: (left expression, right expression), over the sides' rows.
    pub on: Vec<(PhysicalExprRef, PhysicalExprRef)>,
    /// The rest of the condition (the time bound among it), over pairs of rows.
    pub filter: Option<JoinFilter>,
    /// Columns of (left ++ right) the join outputs, when not all.
    pub projection: Option<Vec<usize>>,
    /// Whether null keys equal each other (`IS NOT DISTINCT FROM`).
    pub nulls_equal: bool,
    /// `right.ts - left.ts` lies in `[lo, hi]` (ms) for every pair the condition accepts.
    pub lo: i64,
    /// See `lo`.
    pub hi: i64,
    /// Whether the filter says no more than `[lo, hi]` (which the join tests itself).
    pub bound_only: bool,
    /// Per side, the event-time column in the side's rows.
    pub time: [usize; 2],
    /// Per side, what that column adds to the event time (ms): a side whose rows carry only
    /// `t + INTERVAL …` (the join compares nothing else of it) is timed by it, less this.
    pub time_shift: [i64; 2],
    /// Per side, the schema of its rows.
    pub sides: [SchemaRef; 2],
    /// The join's output.
    pub schema: SchemaRef,
}

/// A buffered run of one side's rows.
#[derive(Debug)]
struct Chunk {
    batch: RecordBatch,
    times: Vec<i64>,
    alive: Vec<bool>,
    matched: Vec<bool>,
    live: usize,
    /// The earliest event time among live rows.
    min_live: i64,
    /// Per input partition, the smallest offset of the rows (while any is live).
    offsets: HashMap<i32, i64>,
    /// The rows' join keys (row format), to tell keys of one hash apart.
    keys: Rows,
}

/// The rows of one key hash: most keys (a plate, a vehicle) have one row, kept inline.
#[derive(Debug)]
enum Slot {
    One((u64, u32)),
    Many(Vec<(u64, u32)>),
}

impl Slot {
    fn push(&mut self, entry: (u64, u32)) {
        match self {
            Slot::One(first) => *self = Slot::Many(vec![*first, entry]),
            Slot::Many(v) => v.push(entry),
        }
    }

    fn entries(&self) -> &[(u64, u32)] {
        match self {
            Slot::One(e) => std::slice::from_ref(e),
            Slot::Many(v) => v,
        }
    }

    /// Keeps the entries `keep` accepts; returns how many it dropped and whether any is left.
    fn retain(&mut self, keep: impl Fn(&(u64, u32)) -> bool) -> (usize, bool) {
        match self {
            Slot::One(e) => {
                if keep(e) {
                    (0, true)
                } else {
                    (1, false)
                }
            }
            Slot::Many(v) => {
                let before = v.len();
                v.retain(|e| keep(e));
                (before - v.len(), !v.is_empty())
            }
        }
    }
}

/// One side's rows, indexed by key.
#[derive(Debug, Default)]
struct Buffer {
    chunks: BTreeMap<u64, Chunk>,
    next: u64,
    /// Rows by the hash of their key (`Chunk::keys` tells keys of one hash apart).
    index: datafusion::common::HashMap<u64, Slot>,
    live: usize,
    /// Index entries of rows no longer live (dropped on the next rebuild).
    stale: usize,
    /// Offsets of evicted rows whose partners on a side kept whole (an outer join's) may
    /// still leave the state unmatched or not: by the watermark of this side that releases
    /// them. Replayed without them, such a partner would come out unmatched a second time.
    lingering: BTreeMap<i64, HashMap<i32, i64>>,
    bytes: usize,
}

/// The state of a stream–stream join; see the module doc.
#[derive(Debug)]
pub struct IntervalJoin {
    spec: JoinSpec,
    converter: RowConverter,
    buffers: [Buffer; 2],
    /// Per side, the columns the join reads from its rows once paired: those it outputs and
    /// those its condition tests. Only these are gathered for a pair.
    needed: [Vec<bool>; 2],
    /// Per side, the highest of its watermarks the other side's rows were evicted by (a side
    /// gone idle follows the other's): a row of that side older than it may have lost its
    /// partners, so it is late, whatever the side's own watermark says.
    evicted_by: [Option<i64>; 2],
}

/// Some of a side's columns (`None`: one the join does not read once rows are paired).
type Columns = Vec<Option<ArrayRef>>;

/// What [`IntervalJoin::arrive`] did with a batch of one side's rows.
#[derive(Debug, Default)]
pub struct Arrival {
    /// The pairs the rows made, in the join's output schema.
    pub pairs: Option<RecordBatch>,
    /// The rows not taken yet (past [`PART_PAIRS`] pairs), to arrive next.
    pub rest: Option<RecordBatch>,
    /// Rows the join's condition failed on with a pair (their index among the rows taken,
    /// each alone, with the error): they joined nothing and are not held.
    pub refused: Vec<(usize, RecordBatch, datafusion::error::DataFusionError)>,
}

/// What the join reads off a batch of one side's rows before pairing or buffering them.
struct Arrived {
    /// Event times (ms; `i64::MIN` for a null).
    times: Vec<i64>,
    /// Join keys in row format.
    keys: Rows,
    /// Whether each row's key can match: a key holding a null equals nothing (unless nulls
    /// are equal).
    valid: Vec<bool>,
    /// The hash of each key row, the same for both sides' indexes.
    hashes: Vec<u64>,
}

/// Event times of `column` in milliseconds.
fn times_of(column: &ArrayRef) -> Result<Vec<i64>> {
    let ms = cast(column, &DataType::Timestamp(TimeUnit::Millisecond, None))?;
    let ms = ms.as_primitive::<datafusion::arrow::datatypes::TimestampMillisecondType>();
    Ok((0..ms.len())
        .map(|i| {
            if ms.is_valid(i) {
                ms.value(i)
            } else {
                i64::MIN
            }
        })
        .collect())
}

/// A side's buffered batches as an [`IntervalJoin::snapshot`] took them, each with its live
/// rows and whether each live row was matched; gathered into its table when resolved.
#[derive(Debug)]
struct TakenSide {
    schema: SchemaRef,
    chunks: Vec<(RecordBatch, BooleanArray, BooleanArray)>,
}

impl DeferredTable for TakenSide {
    fn compute(&self) -> crate::Result<RecordBatch> {
        let mut batches = Vec::with_capacity(self.chunks.len());
        let mut matched: Vec<&dyn Array> = Vec::with_capacity(self.chunks.len());
        for (batch, live, m) in &self.chunks {
            batches.push(filter_record_batch(batch, live)?);
            matched.push(m);
        }
        let rows = concat_batches(&self.schema, &batches)?;
        let mut columns = crate::checkpoint::row_columns(&rows);
        columns.push(("__matched".into(), concat(&matched)?));
        crate::checkpoint::table(columns)
    }
}

impl IntervalJoin {
    /// An empty join of `spec`.
    pub fn new(spec: JoinSpec) -> Result<Self> {
        let fields = spec
            .on
            .iter()
            .map(|(l, _)| Ok(SortField::new(l.data_type(&spec.sides[0])?)))
            .collect::<Result<Vec<_>>>()?;
        let widths = [spec.sides[0].fields().len(), spec.sides[1].fields().len()];
        let all = spec.projection.is_none();
        let mut needed = [vec![all; widths[0]], vec![all; widths[1]]];
        for &i in spec.projection.iter().flatten() {
            if i < widths[0] {
                needed[0][i] = true;
            } else if let Some(n) = needed[1].get_mut(i - widths[0]) {
                *n = true;
            }
        }
        if let Some(filter) = spec.filter.as_ref().filter(|_| !spec.bound_only) {
            for c in filter.column_indices() {
                let side = match c.side {
                    JoinSide::Left => 0,
                    JoinSide::Right => 1,
                    JoinSide::None => continue,
                };
                if let Some(n) = needed[side].get_mut(c.index) {
                    *n = true;
                }
            }
        }
        Ok(Self {
            converter: RowConverter::new(fields)?,
            spec,
            buffers: Default::default(),
            needed,
            evicted_by: [None, None],
        })
    }

    /// The times, keys and key hashes of `batch`, of `side`. Both sides' keys are hashed
    /// with the left index's hasher (the buffers are only ever replaced together).
    fn arrived(&self, side: usize, batch: &RecordBatch) -> Result<Arrived> {
        let mut times = times_of(batch.column(self.spec.time[side]))?;
        let shift = self.spec.time_shift[side];
        if shift != 0 {
            for t in times.iter_mut().filter(|t| **t != i64::MIN) {
                *t = t.saturating_sub(shift);
            }
        }
        let (keys, valid) = self.keys(side, batch)?;
        let hasher = self.buffers[0].index.hasher();
        let hashes = (0..keys.num_rows())
            .map(|i| hasher.hash_one(keys.row(i).as_ref()))
            .collect();
        Ok(Arrived {
            times,
            keys,
            valid,
            hashes,
        })
    }

    /// Whether the keys of `batch`, rows of `side`, evaluate (an overflow in `a.v * 2`
    /// fails them), so that rows they fail on can be left out before any arrives. A key that
    /// is a column cannot fail and is not evaluated here (the join evaluates its keys as
    /// rows arrive).
    pub fn check_keys(&self, side: usize, batch: &RecordBatch) -> Result<()> {
        for (l, r) in &self.spec.on {
            let e = if side == 0 { l } else { r };
            let column = e.downcast_ref::<datafusion::physical_expr::expressions::Column>();
            if column.is_none()
                || e.data_type(batch.schema_ref())? != l.data_type(&self.spec.sides[0])?
            {
                self.key(l, e, batch)?;
            }
        }
        Ok(())
    }

    /// The join key `e` (one side's expression of the pair whose left one is `l`) over
    /// `batch`, in the left key's type.
    fn key(
        &self,
        l: &PhysicalExprRef,
        e: &PhysicalExprRef,
        batch: &RecordBatch,
    ) -> Result<ArrayRef> {
        let a = e.evaluate(batch)?.into_array(batch.num_rows())?;
        let want = l.data_type(&self.spec.sides[0])?;
        Ok(if a.data_type() == &want {
            a
        } else {
            cast(&a, &want)?
        })
    }

    /// The join's description.
    pub fn spec(&self) -> &JoinSpec {
        &self.spec
    }

    /// Each row's key in the index, and whether it can match: a key holding a null equals
    /// nothing (unless nulls are equal).
    fn keys(&self, side: usize, batch: &RecordBatch) -> Result<(Rows, Vec<bool>)> {
        let arrays = self
            .spec
            .on
            .iter()
            .map(|(l, r)| self.key(l, if side == 0 { l } else { r }, batch))
            .collect::<Result<Vec<_>>>()?;
        let rows = self
            .converter
            .convert_columns(&super::comparable_keys(&arrays))?;
        let nulls = match self.spec.nulls_equal {
            true => None,
            false => arrays
                .iter()
                .fold(None, |all, a| NullBuffer::union(all.as_ref(), a.nulls())),
        };
        let valid = match nulls {
            Some(nulls) => nulls.iter().collect(),
            None => vec![true; batch.num_rows()],
        };
        Ok((rows, valid))
    }

    /// Joins `rows`, just arrived on `side` (0 left, 1 right; not late), with the other
    /// side's buffered rows, then buffers them; returns the pairs in the join's output
    /// schema. `offsets` are the rows' smallest input offset per partition, held until the
    /// rows leave the state.
    ///
    /// It takes the rows in order until they have made about [`PART_PAIRS`] pairs: the rows
    /// it did not take come back in [`Arrival::rest`], to arrive next (rows of one side never
    /// pair with each other, so a batch that arrives in parts pairs as it would whole).
    ///
    /// A row the join's condition fails on, with one of its pairs (`length(a.code) / b.d`
    /// with `b.d = 0`), is refused: it joins nothing, is not buffered, and comes back in
    /// [`Arrival::refused`] with the error; the other rows join as if it had not come.
    pub fn arrive(
        &mut self,
        side: usize,
        rows: RecordBatch,
        offsets: HashMap<i32, i64>,
    ) -> Result<Arrival> {
        if rows.num_rows() == 0 {
            return Ok(Arrival::default());
        }
        let mut arrived = self.arrived(side, &rows)?;
        let Arrived {
            times,
            keys,
            valid,
            hashes,
        } = &arrived;
        let other = 1 - side;
        // Candidate pairs: same key, and the time difference within the bound.
        let (lo, hi) = (self.spec.lo, self.spec.hi);
        let mut mine: Vec<u32> = Vec::new();
        let mut theirs: Vec<(u64, u32)> = Vec::new();
        let mut taken = rows.num_rows();
        {
            let Buffer {
                chunks,
                index,
                stale,
                ..
            } = &mut self.buffers[other];
            // Keys met with entries of evicted rows, whose entries are dropped below.
            let mut stale_keys: Vec<u64> = Vec::new();
            for (i, &at) in times.iter().enumerate() {
                if mine.len() >= PART_PAIRS {
                    taken = i;
                    break;
                }
                if !valid[i] {
                    continue;
                }
                let Some(entries) = index.get(&hashes[i]) else {
                    continue;
                };
                let row_pairs = mine.len();
                let key = keys.row(i);
                let mut dead = false;
                for &(id, r) in entries.entries() {
                    let Some(chunk) = chunks.get(&id).filter(|c| c.alive[r as usize]) else {
                        dead = true;
                        continue;
                    };
                    if chunk.keys.row(r as usize) != key {
                        continue;
                    }
                    let t = chunk.times[r as usize];
                    let d = if side == 0 {
                        t.saturating_sub(at)
                    } else {
                        at.saturating_sub(t)
                    };
                    if d >= lo && d <= hi {
                        mine.push(i as u32);
                        theirs.push((id, r));
                        if (mine.len() - row_pairs) as u64 > MAX_PAIRS {
                            return Err(datafusion::error::DataFusionError::Execution(format!(
                                "a row of a join of two streams met more than {MAX_PAIRS} rows \
                                 of the other stream: too many rows of one key meet within its \
                                 time bound; narrow the bound (BETWEEN a.event_time - INTERVAL \
                                 '1 minute' AND …) or join on a more selective key"
                            )));
                        }
                    }
                }
                if dead {
                    stale_keys.push(hashes[i]);
                }
            }
            // One pass per key, however many of the batch's rows have it.
            stale_keys.sort_unstable();
            stale_keys.dedup();
            for hash in stale_keys {
                let Some(entries) = index.get_mut(&hash) else {
                    continue;
                };
                let (dropped, left) =
                    entries.retain(|(id, r)| chunks.get(id).is_some_and(|c| c.alive[*r as usize]));
                *stale = stale.saturating_sub(dropped);
                if !left {
                    index.remove(&hash);
                }
            }
        }
        let (rows, rest) = if taken < rows.num_rows() {
            let rest = rows.slice(taken, rows.num_rows() - taken);
            let rows = rows.slice(0, taken);
            arrived = self.arrived(side, &rows)?;
            (rows, Some(rest))
        } else {
            (rows, None)
        };
        let mut matched = vec![false; rows.num_rows()];
        let mut refused = Vec::new();
        let output = if mine.is_empty() {
            None
        } else {
            let mine_rows = self.take(side, &rows, &mine)?;
            let theirs_rows = self.gather(other, &theirs)?;
            let (left, right) = if side == 0 {
                (mine_rows, theirs_rows)
            } else {
                (theirs_rows, mine_rows)
            };
            let keep = match self.condition(&left, &right, mine.len()) {
                Ok(keep) => keep,
                Err(e) => {
                    let (keep, failed) = self.condition_by_row(&left, &right, &mine, e)?;
                    refused = failed;
                    Some(keep)
                }
            };
            for (p, &i) in mine.iter().enumerate() {
                if keep.as_ref().is_none_or(|k| k.value(p)) {
                    matched[i as usize] = true;
                    let (id, r) = theirs[p];
                    if let Some(chunk) = self.buffers[other].chunks.get_mut(&id) {
                        chunk.matched[r as usize] = true;
                    }
                }
            }
            let (left, right, n) = match &keep {
                Some(k) => {
                    let keep = FilterBuilder::new(k).optimize().build();
                    (
                        filter_columns(&left, &keep)?,
                        filter_columns(&right, &keep)?,
                        k.true_count(),
                    )
                }
                None => (left, right, mine.len()),
            };
            Some(self.assemble(Some(&left), Some(&right), n)?)
        };
        let refused = if refused.is_empty() {
            self.buffer(side, rows, arrived, matched, offsets);
            Vec::new()
        } else {
            // The refused rows stay out of the state.
            let gone: std::collections::HashSet<u32> = refused.iter().map(|(i, _)| *i).collect();
            let keep: BooleanArray = (0..rows.num_rows() as u32)
                .map(|i| Some(!gone.contains(&i)))
                .collect();
            let kept = filter_record_batch(&rows, &keep)?;
            let matched = matched
                .into_iter()
                .enumerate()
                .filter(|(i, _)| !gone.contains(&(*i as u32)))
                .map(|(_, m)| m)
                .collect();
            // None left: nothing to hold (an empty chunk would hold its offsets for good).
            if kept.num_rows() > 0 {
                let arrived = self.arrived(side, &kept)?;
                self.buffer(side, kept, arrived, matched, offsets);
            }
            refused
                .into_iter()
                .map(|(i, e)| (i as usize, rows.slice(i as usize, 1), e))
                .collect()
        };
        Ok(Arrival {
            pairs: output.filter(|b| b.num_rows() > 0),
            rest,
            refused,
        })
    }

    /// The join's condition over the pairs of each arriving row on its own (`mine`: the
    /// arriving row of each pair, in row order), once over all of them has failed with
    /// `error`: the pairs that meet it, and the arriving rows it fails on with their error
    /// (their pairs meet nothing). `error` again when no row fails alone.
    fn condition_by_row(
        &self,
        left: &Columns,
        right: &Columns,
        mine: &[u32],
        error: datafusion::error::DataFusionError,
    ) -> Result<(BooleanArray, Vec<(u32, datafusion::error::DataFusionError)>)> {
        let slice = |columns: &Columns, at: usize, n: usize| -> Columns {
            columns
                .iter()
                .map(|c| c.as_ref().map(|a| a.slice(at, n)))
                .collect()
        };
        let mut keep = Vec::with_capacity(mine.len());
        let mut failed = Vec::new();
        let mut at = 0;
        while at < mine.len() {
            let row = mine[at];
            let n = mine[at..].iter().take_while(|&&r| r == row).count();
            match self.condition(&slice(left, at, n), &slice(right, at, n), n) {
                Ok(Some(pass)) => keep.extend(pass.iter().map(|p| p == Some(true))),
                Ok(None) => keep.extend(std::iter::repeat_n(true, n)),
                Err(e) => {
                    keep.extend(std::iter::repeat_n(false, n));
                    failed.push((row, e));
                }
            }
            at += n;
        }
        if failed.is_empty() {
            return Err(error);
        }
        Ok((BooleanArray::from(keep), failed))
    }

    /// Whether each pair of `left` and `right` (row i with row i) meets the filter; `None`
    /// when the join has none.
    fn condition(&self, left: &Columns, right: &Columns, n: usize) -> Result<Option<BooleanArray>> {
        let Some(filter) = self.spec.filter.as_ref().filter(|_| !self.spec.bound_only) else {
            return Ok(None);
        };
        let columns = filter
            .column_indices()
            .iter()
            .map(|c| {
                let side = match c.side {
                    JoinSide::Left => left,
                    JoinSide::Right => right,
                    JoinSide::None => return plan_err!("a mark column in a stream join's filter"),
                };
                match side.get(c.index) {
                    Some(Some(column)) => Ok(column.clone()),
                    _ => plan_err!("internal: a stream join's filter column was not gathered"),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let options = datafusion::arrow::array::RecordBatchOptions::new().with_row_count(Some(n));
        let batch = RecordBatch::try_new_with_options(filter.schema().clone(), columns, &options)?;
        let result = filter
            .expression()
            .evaluate(&batch)?
            .into_array(batch.num_rows())?;
        // A null condition is not a match.
        let result = result.as_boolean();
        Ok(Some(match result.nulls() {
            Some(_) => prep_null_mask_filter(result),
            None => result.clone(),
        }))
    }

    /// The buffered rows `at` of `side`: the columns the join reads.
    fn gather(&self, side: usize, at: &[(u64, u32)]) -> Result<Columns> {
        let buffer = &self.buffers[side];
        let mut ids: Vec<u64> = at.iter().map(|(id, _)| *id).collect();
        ids.sort_unstable();
        ids.dedup();
        let position: HashMap<u64, usize> =
            ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        let batches: Vec<&RecordBatch> = ids
            .iter()
            .filter_map(|id| buffer.chunks.get(id).map(|c| &c.batch))
            .collect();
        let indices: Vec<(usize, usize)> = at
            .iter()
            .map(|(id, r)| (position[id], *r as usize))
            .collect();
        self.needed[side]
            .iter()
            .enumerate()
            .map(|(c, needed)| {
                if !needed {
                    return Ok(None);
                }
                let arrays: Vec<&dyn Array> =
                    batches.iter().map(|b| b.column(c).as_ref()).collect();
                Ok(Some(datafusion::arrow::compute::interleave(
                    &arrays, &indices,
                )?))
            })
            .collect()
    }

    /// Rows `at` of `batch`, of `side`: the columns the join reads.
    fn take(&self, side: usize, batch: &RecordBatch, at: &[u32]) -> Result<Columns> {
        let indices = UInt32Array::from(at.to_vec());
        self.needed[side]
            .iter()
            .zip(batch.columns())
            .map(|(needed, c)| {
                Ok(match needed {
                    true => Some(take(c.as_ref(), &indices, None)?),
                    false => None,
                })
            })
            .collect()
    }

    /// Rows of the output schema from `left` and `right` (`None`: nulls), `n` rows.
    fn assemble(
        &self,
        left: Option<&Columns>,
        right: Option<&Columns>,
        n: usize,
    ) -> Result<RecordBatch> {
        let width = self.spec.sides[0].fields().len();
        let column = |i: usize| -> Result<ArrayRef> {
            let (side, c) = if i < width { (0, i) } else { (1, i - width) };
            match [left, right][side] {
                Some(columns) => match columns.get(c) {
                    Some(Some(column)) => Ok(column.clone()),
                    _ => plan_err!("internal: a stream join's output column was not gathered"),
                },
                None => match self.spec.sides[side].fields().get(c) {
                    Some(field) => Ok(new_null_array(field.data_type(), n)),
                    None => plan_err!("internal: a stream join's output column is out of range"),
                },
            }
        };
        let columns = match &self.spec.projection {
            Some(p) => p.iter().map(|&i| column(i)).collect::<Result<Vec<_>>>()?,
            None => (0..width + self.spec.sides[1].fields().len())
                .map(column)
                .collect::<Result<Vec<_>>>()?,
        };
        // Columns keep the types of the join's output; nullability follows the output's.
        let options = datafusion::arrow::array::RecordBatchOptions::new().with_row_count(Some(n));
        Ok(RecordBatch::try_new_with_options(
            self.spec.schema.clone(),
            columns,
            &options,
        )?)
    }

    /// Buffers `batch`, of `side`, as read by [`IntervalJoin::arrived`].
    fn buffer(
        &mut self,
        side: usize,
        batch: RecordBatch,
        arrived: Arrived,
        matched: Vec<bool>,
        offsets: HashMap<i32, i64>,
    ) {
        let Arrived {
            times,
            keys,
            valid,
            hashes,
        } = arrived;
        let buffer = &mut self.buffers[side];
        let id = buffer.next;
        buffer.next += 1;
        for (r, valid) in valid.iter().enumerate() {
            if *valid {
                let hash = hashes[r];
                match buffer.index.get_mut(&hash) {
                    Some(slot) => slot.push((id, r as u32)),
                    None => {
                        buffer.index.insert(hash, Slot::One((id, r as u32)));
                    }
                }
            }
        }
        let n = batch.num_rows();
        buffer.live += n;
        buffer.bytes += batch.get_array_memory_size() + n * 24 + keys.size();
        buffer.chunks.insert(
            id,
            Chunk {
                min_live: times.iter().copied().min().unwrap_or(i64::MAX),
                batch,
                times,
                alive: vec![true; n],
                matched,
                live: n,
                offsets,
                keys,
            },
        );
    }

    /// Evicts the rows no row to come can meet, given the sides' input watermarks (rows
    /// older than its watermark never reach a side); returns the unmatched rows of a side the
    /// join keeps whole, padded with nulls.
    pub fn evict(&mut self, watermarks: [Option<i64>; 2]) -> Result<Vec<RecordBatch>> {
        for (by, w) in self.evicted_by.iter_mut().zip(watermarks) {
            *by = (*by).max(w);
        }
        let mut out = Vec::new();
        for side in 0..2 {
            // A left row at t meets right rows up to t + hi; a right row at t meets left
            // rows from t - lo.
            let Some(other) = watermarks[1 - side] else {
                continue;
            };
            let cutoff = if side == 0 {
                other.saturating_sub(self.spec.hi)
            } else {
                other.saturating_add(self.spec.lo)
            };
            let preserved = match self.spec.join_type {
                JoinType::Full => true,
                JoinType::Left => side == 0,
                JoinType::Right => side == 1,
                _ => false,
            };
            let mut unmatched: Vec<(u64, u32)> = Vec::new();
            let buffer = &mut self.buffers[side];
            let mut emptied = Vec::new();
            for (id, chunk) in buffer.chunks.iter_mut() {
                if chunk.min_live >= cutoff {
                    continue;
                }
                let mut min_live = i64::MAX;
                for r in 0..chunk.times.len() {
                    if !chunk.alive[r] {
                        continue;
                    }
                    if chunk.times[r] < cutoff {
                        chunk.alive[r] = false;
                        chunk.live -= 1;
                        buffer.live -= 1;
                        buffer.stale += 1;
                        if preserved && !chunk.matched[r] {
                            unmatched.push((*id, r as u32));
                        }
                    } else {
                        min_live = min_live.min(chunk.times[r]);
                    }
                }
                chunk.min_live = min_live;
                if chunk.live == 0 {
                    emptied.push(*id);
                }
            }
            if !unmatched.is_empty() {
                let rows = self.gather(side, &unmatched)?;
                let n = unmatched.len();
                out.push(if side == 0 {
                    self.assemble(Some(&rows), None, n)?
                } else {
                    self.assemble(None, Some(&rows), n)?
                });
            }
            // The other side kept whole: its rows' partners of this side must come back on
            // replay until the other side's rows can no longer leave the state.
            let other_preserved = match self.spec.join_type {
                JoinType::Full => true,
                JoinType::Left => side == 1,
                JoinType::Right => side == 0,
                _ => false,
            };
            let span = self.spec.hi.saturating_sub(self.spec.lo);
            let buffer = &mut self.buffers[side];
            for id in emptied {
                if let Some(c) = buffer.chunks.remove(&id) {
                    buffer.bytes = buffer.bytes.saturating_sub(
                        c.batch.get_array_memory_size() + c.times.len() * 24 + c.keys.size(),
                    );
                    if other_preserved {
                        // A row at t of this side meets rows of the other that leave once
                        // this side's watermark passes t + (hi - lo).
                        let last = c.times.iter().copied().max().unwrap_or(i64::MIN);
                        let until = buffer
                            .lingering
                            .entry(last.saturating_add(span))
                            .or_default();
                        for (p, o) in c.offsets {
                            until.entry(p).and_modify(|m| *m = (*m).min(o)).or_insert(o);
                        }
                    }
                }
            }
            if let Some(own) = watermarks[side] {
                buffer.lingering = buffer.lingering.split_off(&own);
            }
            if buffer.stale > 4096 && buffer.stale > 2 * buffer.live {
                self.reindex(side);
            }
        }
        Ok(out)
    }

    /// Drops `side`'s index entries of rows no longer live.
    fn reindex(&mut self, side: usize) {
        let buffer = &mut self.buffers[side];
        let chunks = &buffer.chunks;
        buffer.index.retain(|_, entries| {
            entries
                .retain(|(id, r)| chunks.get(id).is_some_and(|c| c.alive[*r as usize]))
                .1
        });
        buffer.stale = 0;
    }

    /// Rows buffered, both sides.
    pub fn rows(&self) -> usize {
        self.buffers.iter().map(|b| b.live).sum()
    }

    /// Bytes buffered, both sides, with the index.
    pub fn bytes(&self) -> usize {
        self.buffers
            .iter()
            .map(|b| b.bytes + b.index.len() * 40 + (b.live + b.stale) * 12)
            .sum()
    }

    /// Per input partition, the smallest offset of a row `side` still holds (or whose
    /// partners an outer join may still emit).
    pub fn held_offsets(&self, side: usize, out: &mut HashMap<i32, i64>) {
        let buffer = &self.buffers[side];
        let held = buffer
            .chunks
            .values()
            .map(|c| &c.offsets)
            .chain(buffer.lingering.values());
        for offsets in held {
            for (&p, &o) in offsets {
                out.entry(p).and_modify(|m| *m = (*m).min(o)).or_insert(o);
            }
        }
    }

    /// The highest watermark of `side` the other side's rows were evicted by: rows of `side`
    /// older than it are late for the join.
    pub fn evicted_by(&self, side: usize) -> Option<i64> {
        self.evicted_by.get(side).copied().flatten()
    }

    /// The state for a checkpoint: per side, table `side<i>` of its live rows with a
    /// `__matched` column. The tables are deferred: the query's thread takes the buffered
    /// batches (shared, not copied) and which rows are live and matched, and the live rows
    /// are gathered when the snapshot is resolved ([`StateSnapshot::resolve`]).
    pub fn snapshot(&self) -> crate::Result<StateSnapshot> {
        let mut out = StateSnapshot {
            meta: serde_json::json!({ "sides": 2, "evicted_by": self.evicted_by }),
            ..Default::default()
        };
        for side in 0..2 {
            let chunks: Vec<(RecordBatch, BooleanArray, BooleanArray)> = self.buffers[side]
                .chunks
                .values()
                .map(|chunk| {
                    let live: BooleanArray = chunk.alive.iter().map(|a| Some(*a)).collect();
                    let matched: BooleanArray = chunk
                        .alive
                        .iter()
                        .zip(&chunk.matched)
                        .filter(|(a, _)| **a)
                        .map(|(_, m)| Some(*m))
                        .collect();
                    (chunk.batch.clone(), live, matched)
                })
                .collect();
            if chunks.is_empty() {
                continue;
            }
            out.deferred.insert(
                format!("side{side}"),
                Arc::new(TakenSide {
                    schema: self.spec.sides[side].clone(),
                    chunks,
                }),
            );
        }
        Ok(out)
    }

    /// Replaces the state with an [`IntervalJoin::snapshot`] of the same join.
    pub fn restore(&mut self, snapshot: &StateSnapshot) -> crate::Result<()> {
        self.buffers = Default::default();
        // Checkpoints taken before it was kept: none (the sides' own watermarks decide).
        self.evicted_by = snapshot
            .meta
            .get("evicted_by")
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or([None, None]);
        for side in 0..2 {
            let Some(t) = snapshot.tables.get(&format!("side{side}")) else {
                continue;
            };
            let schema = self.spec.sides[side].clone();
            if t.num_columns() != schema.fields().len() + 1 {
                return Err(crate::Error::Checkpoint(format!(
                    "the join state of side {side} has {} columns, the query's side {}",
                    t.num_columns() - 1,
                    schema.fields().len()
                )));
            }
            let columns = (0..schema.fields().len())
                .map(|i| {
                    let c = t.column(i);
                    let want = schema.field(i).data_type();
                    Ok(if c.data_type() == want {
                        c.clone()
                    } else {
                        cast(c, want)?
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let rows = RecordBatch::try_new(schema, columns)?;
            let matched = typed::<BooleanArray>(column(t, "__matched")?, "__matched")?;
            let matched: Vec<bool> = matched.iter().map(|m| m == Some(true)).collect();
            let arrived = self.arrived(side, &rows)?;
            self.buffer(side, rows, arrived, matched, HashMap::new());
        }
        Ok(())
    }
}

/// The rows of `columns` that `keep` accepts.
fn filter_columns(columns: &Columns, keep: &FilterPredicate) -> Result<Columns> {
    columns
        .iter()
        .map(|c| {
            c.as_ref()
                .map(|c| keep.filter(c.as_ref()))
                .transpose()
                .map_err(Into::into)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, StringArray, TimestampMillisecondArray};
    use datafusion::arrow::datatypes::{Field, Schema};
    use datafusion::logical_expr::Operator;
    use datafusion::physical_expr::expressions::{BinaryExpr, Column, Literal};
    use datafusion::physical_plan::joins::utils::ColumnIndex;
    use datafusion::scalar::ScalarValue;

    /// One side's rows: `(k, ts, v, name)`.
    fn side(prefix: &str) -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, true),
            Field::new(
                "ts",
                DataType::Timestamp(TimeUnit::Millisecond, None),
                false,
            ),
            Field::new(format!("{prefix}v"), DataType::Int64, false),
            Field::new(format!("{prefix}name"), DataType::Utf8, false),
        ]))
    }

    /// A full join on `k`, `b.ts` within a second of `a.ts`, `a.v + 30 >= b.v`, projected
    /// to `projection` (of the 8 columns of both sides).
    fn join(projection: Option<Vec<usize>>) -> IntervalJoin {
        let sides = [side("a"), side("b")];
        let all: Vec<Field> = sides
            .iter()
            .flat_map(|s| {
                s.fields()
                    .iter()
                    .map(|f| f.as_ref().clone().with_nullable(true))
            })
            .collect();
        let schema = Arc::new(Schema::new(match &projection {
            Some(p) => p.iter().map(|&i| all[i].clone()).collect(),
            None => all,
        }));
        let filter_schema = Arc::new(Schema::new(vec![
            Field::new("av", DataType::Int64, false),
            Field::new("bv", DataType::Int64, false),
        ]));
        let expression = Arc::new(BinaryExpr::new(
            Arc::new(BinaryExpr::new(
                Arc::new(Column::new("av", 0)),
                Operator::Plus,
                Arc::new(Literal::new(ScalarValue::Int64(Some(30)))),
            )),
            Operator::GtEq,
            Arc::new(Column::new("bv", 1)),
        ));
        let filter = JoinFilter::new(
            expression,
            vec![
                ColumnIndex {
                    index: 2,
                    side: JoinSide::Left,
                },
                ColumnIndex {
                    index: 2,
                    side: JoinSide::Right,
                },
            ],
            filter_schema,
        );
        IntervalJoin::new(JoinSpec {
            join_type: JoinType::Full,
            on: vec![(Arc::new(Column::new("k", 0)), Arc::new(Column::new("k", 0)))],
            filter: Some(filter),
            projection,
            nulls_equal: false,
            lo: -1000,
            hi: 1000,
            bound_only: false,
            time: [1, 1],
            time_shift: [0, 0],
            sides,
            schema,
        })
        .unwrap()
    }

    fn rows(schema: &SchemaRef, rows: &[(Option<i64>, i64, i64, &str)]) -> RecordBatch {
        RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from_iter(rows.iter().map(|r| r.0))),
                Arc::new(TimestampMillisecondArray::from_iter_values(
                    rows.iter().map(|r| r.1),
                )),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.2))),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.3))),
            ],
        )
        .unwrap()
    }

    /// Runs both sides through `join` in a few batches, then evicts everything; every output
    /// batch, in order.
    fn run(mut join: IntervalJoin) -> Vec<RecordBatch> {
        let (a, b) = (join.spec.sides[0].clone(), join.spec.sides[1].clone());
        let mut out = Vec::new();
        let steps: Vec<(usize, RecordBatch)> = vec![
            (
                0,
                rows(
                    &a,
                    &[
                        (Some(1), 1_000, 10, "a1"),
                        (Some(2), 1_000, 10, "a2"),
                        (None, 1_000, 10, "a-null"),
                        (Some(3), 5_000, 0, "a3"),
                    ],
                ),
            ),
            (
                1,
                rows(
                    &b,
                    &[
                        (Some(1), 1_500, 40, "b1-meets"),
                        (Some(1), 1_800, 41, "b1-fails-filter"),
                        (Some(2), 3_000, 10, "b2-too-late"),
                        (None, 1_000, 10, "b-null"),
                    ],
                ),
            ),
            (0, rows(&a, &[(Some(1), 2_000, 20, "a1-again")])),
            (1, rows(&b, &[(Some(3), 4_500, 30, "b3-meets")])),
        ];
        for (s, batch) in steps {
            let arrival = join.arrive(s, batch, HashMap::new()).unwrap();
            assert!(arrival.rest.is_none() && arrival.refused.is_empty());
            out.extend(arrival.pairs);
        }
        out.extend(
            join.evict([Some(i64::MAX / 2), Some(i64::MAX / 2)])
                .unwrap(),
        );
        out
    }

    /// One key's rows on both sides within the bound make many pairs from one micro-batch
    /// (a backlog's): the rows arrive in parts of about [`PART_PAIRS`] pairs, every pair made
    /// once, and the rows of every part buffered for the other side (25 million pairs of
    /// 5 000 rows at once took 1.6 GB, and a service 6 GB, outside any memory pool).
    #[test]
    fn a_batch_that_makes_many_pairs_arrives_in_parts() {
        let mut join = join(None);
        let (a, b) = (join.spec.sides[0].clone(), join.spec.sides[1].clone());
        let many: Vec<(Option<i64>, i64, i64, &str)> =
            (0..2_100).map(|_| (Some(1), 1_000, 10, "x")).collect();
        let arrival = join
            .arrive(1, rows(&b, &many), HashMap::new())
            .expect("buffered");
        assert!(arrival.pairs.is_none() && arrival.rest.is_none());
        let mut rest = Some(rows(&a, &many));
        let (mut parts, mut pairs) = (0, 0);
        while let Some(rows) = rest.take() {
            let arrival = join.arrive(0, rows, HashMap::new()).expect("a part");
            let (part, more) = (arrival.pairs, arrival.rest);
            let n = part.map_or(0, |p| p.num_rows());
            assert!(n <= PART_PAIRS + 2_100, "{n} pairs in one part");
            pairs += n;
            parts += 1;
            rest = more;
        }
        assert_eq!(pairs, 2_100 * 2_100);
        assert_eq!(parts, 5);
        // Every row of every part is buffered: a row arriving on the other side meets all.
        let arrival = join
            .arrive(1, rows(&b, &many[..1]), HashMap::new())
            .expect("one more");
        assert!(arrival.rest.is_none());
        assert_eq!(arrival.pairs.map_or(0, |p| p.num_rows()), 2_100);
    }

    /// The join gathers only the columns it outputs or its condition tests: projected past
    /// a condition column and a payload column of each side, its output is exactly those
    /// columns of the unprojected join's, pairs and null-padded unmatched rows alike.
    #[test]
    fn a_projected_join_equals_the_projection_of_the_whole() {
        let whole = run(join(None));
        let projection = vec![0, 3, 7];
        let projected = run(join(Some(projection.clone())));
        assert_eq!(whole.len(), projected.len());
        let mut pairs = 0;
        for (w, p) in whole.iter().zip(&projected) {
            assert_eq!(p.num_columns(), 3);
            assert_eq!(w.num_rows(), p.num_rows());
            for (out, &i) in projection.iter().enumerate() {
                assert_eq!(w.column(i).as_ref(), p.column(out).as_ref(), "column {i}");
            }
            pairs += (0..w.num_rows())
                .filter(|&r| w.column(0).is_valid(r) && w.column(4).is_valid(r))
                .count();
        }
        // a1–b1-meets, a1-again–b1-meets, a1-again–b1-fails-filter, a3–b3-meets; the rest
        // (a2, both null keys, b2-too-late) leave unmatched.
        assert_eq!(pairs, 4);
        let rows: usize = whole.iter().map(RecordBatch::num_rows).sum();
        assert_eq!(rows, 4 + 2 + 2);
        let names: Vec<String> = projected
            .iter()
            .flat_map(|b| {
                let a = b.column(1).as_string::<i32>();
                let n = b.column(2).as_string::<i32>();
                let text = |c: &datafusion::arrow::array::StringArray, r: usize| match c.is_valid(r)
                {
                    true => c.value(r).to_string(),
                    false => "-".to_string(),
                };
                (0..b.num_rows())
                    .map(|r| format!("{}|{}", text(a, r), text(n, r)))
                    .collect::<Vec<_>>()
            })
            .collect();
        for expected in [
            "a1|b1-meets",
            "a1-again|b1-meets",
            "a1-again|b1-fails-filter",
            "a3|b3-meets",
            "a2|-",
            "a-null|-",
            "-|b-null",
            "-|b2-too-late",
        ] {
            assert!(
                names.iter().any(|n| n == expected),
                "{expected} in {names:?}"
            );
        }
    }
}
