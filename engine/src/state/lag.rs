//! `LAG` per key over a windowed aggregation's rows: `lag(aqi, 2) OVER (PARTITION BY
//! station ORDER BY window_end)`, enough to write "above 150 for three consecutive hours".
//!
//! DataFusion plans `LAG` as a window aggregation that starts every partition afresh on each
//! execution; [`replace_lag_windows`] swaps it for a [`KeyedLagExec`], which keeps the last
//! values of each key across the emissions of the query: each execution orders its rows by
//! the `ORDER BY` time and, per key, gives each row the value `offset` rows back (or the
//! default), then remembers the row's. A row at the time of the key's last one replaces it.
//!
//! Rows of one key must come in time order, which a windowed aggregation gives when each
//! window emits once: the planner allows `LAG` only above one, without allowed lateness or
//! early results (whose revisions would come after the rows that followed them).

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex};

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BinaryArray, Int64Array, RecordBatch};
use datafusion::arrow::compute::{cast, concat_batches};
use datafusion::arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{DataFusionError, Result, ScalarValue, plan_err};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_expr::expressions::Literal;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::windows::{BoundedWindowAggExec, WindowAggExec, WindowExpr};
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
    ReplaceChildrenOptions, collect,
};

use super::keyed::udwf_of;
use super::layered::{Layered, Shared};
use crate::checkpoint::{DeferredTable, StateSnapshot, column, table, typed};

/// `PARTITION BY` and `ORDER BY` of a window specification.
type Spec = (Vec<Arc<dyn PhysicalExpr>>, Arc<dyn PhysicalExpr>);

/// One `lag(value, offset, default)` call.
#[derive(Debug, Clone)]
struct Lag {
    value: Arc<dyn PhysicalExpr>,
    offset: usize,
    default: ScalarValue,
    data_type: DataType,
}

/// One key's last values: per call, up to `offset` (time, value) pairs, oldest first.
#[derive(Debug, Default, Clone)]
struct KeyLags {
    last_t: i64,
    history: Vec<VecDeque<(i64, ScalarValue)>>,
}

/// The state of one [`KeyedLagExec`], shared by its executions.
#[derive(Debug, Clone)]
pub struct LagHandle {
    /// Shared whole with a checkpoint, which reads it out on its own thread
    /// ([`Layered`]).
    keys: Arc<Mutex<Layered<Box<[u8]>, KeyLags>>>,
    /// `urbanstream.key_ttl` in ms (`i64::MAX`: none): a key silent longer starts afresh.
    ttl: Arc<std::sync::atomic::AtomicI64>,
    /// Keys dropped or started afresh after staying silent longer than the TTL.
    expired: Arc<std::sync::atomic::AtomicU64>,
}

impl Default for LagHandle {
    fn default() -> Self {
        Self {
            keys: Default::default(),
            ttl: Arc::new(std::sync::atomic::AtomicI64::new(i64::MAX)),
            expired: Default::default(),
        }
    }
}

impl LagHandle {
    /// Sets the key TTL (`None`: keys never expire).
    pub fn set_ttl(&self, ttl_ms: Option<i64>) {
        self.ttl.store(
            ttl_ms.unwrap_or(i64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Keys dropped or started afresh after staying silent longer than the TTL.
    pub fn expired(&self) -> u64 {
        self.expired.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Drops the keys whose last row is more than the TTL before `watermark`: their next
    /// row would start afresh anyway.
    pub fn expire(&self, watermark: i64) {
        let ttl = self.ttl.load(std::sync::atomic::Ordering::Relaxed);
        if ttl == i64::MAX || watermark == i64::MIN {
            return;
        }
        let horizon = watermark.saturating_sub(ttl);
        if let Ok(mut keys) = self.keys.lock() {
            let before = keys.len();
            keys.retain(|k| k.last_t >= horizon);
            self.expired.fetch_add(
                (before - keys.len()) as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
    }

    fn lock(&self) -> crate::Result<std::sync::MutexGuard<'_, Layered<Box<[u8]>, KeyLags>>> {
        self.keys
            .lock()
            .map_err(|_| crate::Error::Checkpoint("lag state lock poisoned".into()))
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.keys.lock().map_or(0, |k| k.len())
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Approximate bytes held.
    pub fn bytes(&self) -> usize {
        self.keys.lock().map_or(0, |keys| {
            keys.iter()
                .map(|(k, s)| {
                    k.len()
                        + 32
                        + s.history
                            .iter()
                            .flatten()
                            .map(|(_, v)| 8 + v.size())
                            .sum::<usize>()
                })
                .sum()
        })
    }

    /// The state for a checkpoint: table `keys` (key, last time), and per call `c` and slot
    /// `j` (oldest first) the columns `t<c>_<j>` and `v<c>_<j>` (null where the key has fewer
    /// values).
    pub fn snapshot(&self, types: &[DataType]) -> crate::Result<StateSnapshot> {
        let mut keys = self.lock()?;
        let mut out = StateSnapshot {
            meta: serde_json::json!({ "calls": types.len() }),
            ..Default::default()
        };
        if keys.is_empty() {
            return Ok(out);
        }
        let taken = TakenLags {
            keys: keys.share(),
            types: types.to_vec(),
        };
        out.deferred.insert("keys".into(), Arc::new(taken));
        Ok(out)
    }

    /// Replaces the state with a [`LagHandle::snapshot`] of the same query.
    pub fn restore(&self, snapshot: &StateSnapshot, calls: usize) -> crate::Result<()> {
        let mut keys = self.lock()?;
        keys.clear();
        let Some(t) = snapshot.tables.get("keys") else {
            return Ok(());
        };
        let key = typed::<BinaryArray>(column(t, "key")?, "key")?;
        let last_t = typed::<Int64Array>(column(t, "last_t")?, "last_t")?;
        for r in 0..t.num_rows() {
            let mut history = vec![VecDeque::new(); calls];
            for (c, h) in history.iter_mut().enumerate() {
                for j in 0.. {
                    let (Some(ts), Some(vs)) = (
                        t.column_by_name(&format!("t{c}_{j}")),
                        t.column_by_name(&format!("v{c}_{j}")),
                    ) else {
                        break;
                    };
                    let ts = typed::<Int64Array>(ts, "t")?;
                    if ts.is_valid(r) {
                        h.push_back((ts.value(r), ScalarValue::try_from_array(vs, r)?.compacted()));
                    }
                }
            }
            keys.insert(
                key.value(r).into(),
                KeyLags {
                    last_t: last_t.value(r),
                    history,
                },
            );
        }
        Ok(())
    }
}

/// The keys' last values as a [`LagHandle::snapshot`] took them, read out into its `keys`
/// table when the snapshot is resolved.
#[derive(Debug)]
struct TakenLags {
    keys: Shared<Box<[u8]>, KeyLags>,
    types: Vec<DataType>,
}

impl DeferredTable for TakenLags {
    fn compute(&self) -> crate::Result<RecordBatch> {
        let entries: Vec<(&Box<[u8]>, &KeyLags)> = self.keys.iter().collect();
        let mut columns: Vec<(String, ArrayRef)> = vec![
            (
                "key".into(),
                Arc::new(BinaryArray::from_iter_values(
                    entries.iter().map(|(k, _)| k),
                )),
            ),
            (
                "last_t".into(),
                Arc::new(Int64Array::from_iter_values(
                    entries.iter().map(|(_, s)| s.last_t),
                )),
            ),
        ];
        for (c, data_type) in self.types.iter().enumerate() {
            let slots = entries
                .iter()
                .map(|(_, s)| s.history.get(c).map_or(0, VecDeque::len))
                .max()
                .unwrap_or(0);
            for j in 0..slots {
                let at = |s: &KeyLags| s.history.get(c).and_then(|h| h.get(j)).cloned();
                columns.push((
                    format!("t{c}_{j}"),
                    Arc::new(Int64Array::from_iter(
                        entries.iter().map(|(_, s)| at(s).map(|(t, _)| t)),
                    )),
                ));
                let null = ScalarValue::try_from(data_type)?;
                columns.push((
                    format!("v{c}_{j}"),
                    ScalarValue::iter_to_array(
                        entries
                            .iter()
                            .map(|(_, s)| at(s).map_or(null.clone(), |(_, v)| v)),
                    )?,
                ));
            }
        }
        table(columns)
    }
}

/// Keeps each key's last values across executions; see the module doc.
#[derive(Debug, Clone)]
pub struct KeyedLagExec {
    input: Arc<dyn ExecutionPlan>,
    schema: SchemaRef,
    keys: Vec<Arc<dyn PhysicalExpr>>,
    order: Arc<dyn PhysicalExpr>,
    lags: Vec<Lag>,
    handle: LagHandle,
    properties: Arc<PlanProperties>,
}

/// The function name of a window expression when it is a user-defined window function
/// (DataFusion's `lag` and `lead` are).
fn udwf_name(w: &dyn WindowExpr) -> Option<String> {
    udwf_of(w).map(|u| u.fun().name().to_string())
}

impl KeyedLagExec {
    fn try_new(
        input: Arc<dyn ExecutionPlan>,
        schema: SchemaRef,
        exprs: &[Arc<dyn WindowExpr>],
    ) -> Result<Option<Self>> {
        let names: Vec<Option<String>> = exprs.iter().map(|w| udwf_name(w.as_ref())).collect();
        if names.iter().any(|n| n.as_deref() == Some("lead")) {
            return plan_err!(
                "LEAD over a stream needs rows that have not arrived yet: write LAG over the \
                 later row instead (lag(x, 1) OVER (PARTITION BY … ORDER BY window_end) is the \
                 earlier row's x)"
            );
        }
        if !names.iter().any(|n| n.as_deref() == Some("lag")) {
            return Ok(None);
        }
        if names.iter().any(|n| n.as_deref() != Some("lag")) {
            return plan_err!(
                "LAG and other window functions in one SELECT are not supported on streams: \
                 compute LAG in a subquery of its own"
            );
        }
        let mut spec: Option<Spec> = None;
        let mut lags = Vec::new();
        let input_schema = input.schema();
        for w in exprs {
            let order = match w.order_by() {
                [one] if !one.options.descending => one.expr.clone(),
                _ => {
                    return plan_err!(
                        "LAG over a stream needs ORDER BY the time column alone, ascending, e.g. \
                         lag(aqi) OVER (PARTITION BY station ORDER BY window_end)"
                    );
                }
            };
            let this = (w.partition_by().to_vec(), order);
            match &spec {
                None => spec = Some(this),
                Some((k, o)) if *k == this.0 && *o == this.1 => {}
                Some(_) => {
                    return plan_err!(
                        "every LAG of one SELECT must share PARTITION BY and ORDER BY; use a \
                         subquery for another"
                    );
                }
            }
            let Some(args) = udwf_of(w.as_ref()).map(|u| u.args().to_vec()) else {
                return plan_err!("internal: LAG without arguments");
            };
            let Some(value) = args.first().cloned() else {
                return plan_err!("lag() needs the value to shift, e.g. lag(aqi)");
            };
            let literal = |i: usize| args.get(i).and_then(|a| a.downcast_ref::<Literal>());
            let offset = match literal(1).map(|l| l.value().clone()) {
                None if args.len() < 2 => 1,
                Some(v) if !v.is_null() => match v.cast_to(&DataType::Int64)? {
                    ScalarValue::Int64(Some(n)) if (1..=1000).contains(&n) => n as usize,
                    other => {
                        return plan_err!(
                            "lag(): the offset must be a constant from 1 to 1000, got {other}"
                        );
                    }
                },
                _ => return plan_err!("lag(): the offset must be a constant from 1 to 1000"),
            };
            let data_type = value.data_type(&input_schema)?;
            let default = match literal(2) {
                Some(l) => l.value().cast_to(&data_type)?,
                None if args.len() < 3 => ScalarValue::try_from(&data_type)?,
                None => return plan_err!("lag(): the default must be a constant"),
            };
            lags.push(Lag {
                value,
                offset,
                default,
                data_type,
            });
        }
        let Some((keys, order)) = spec else {
            return Ok(None);
        };
        let keys = super::series_keys(keys);
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(schema.clone()),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Final,
            Boundedness::Bounded,
        ));
        Ok(Some(Self {
            input,
            schema,
            keys,
            order,
            lags,
            handle: LagHandle::default(),
            properties,
        }))
    }

    /// Its input.
    pub fn input(&self) -> &Arc<dyn ExecutionPlan> {
        &self.input
    }

    /// The `ORDER BY` expression, over the input's rows.
    pub fn order(&self) -> &Arc<dyn PhysicalExpr> {
        &self.order
    }

    /// The `PARTITION BY` keys, over the input's rows.
    pub fn keys(&self) -> &[Arc<dyn PhysicalExpr>] {
        &self.keys
    }

    /// Types of its values, per call (for checkpoints).
    pub fn types(&self) -> Vec<DataType> {
        self.lags.iter().map(|l| l.data_type.clone()).collect()
    }

    fn run(&self, batches: Vec<RecordBatch>) -> Result<RecordBatch> {
        let batch = concat_batches(&self.input.schema(), &batches)?;
        let n = batch.num_rows();
        let key_columns = self
            .keys
            .iter()
            .map(|k| k.evaluate(&batch)?.into_array(n))
            .collect::<Result<Vec<_>>>()?;
        let fields = key_columns
            .iter()
            .map(|c| SortField::new(c.data_type().clone()))
            .collect();
        let rows =
            RowConverter::new(fields)?.convert_columns(&super::comparable_keys(&key_columns))?;
        let order = self.order.evaluate(&batch)?.into_array(n)?;
        let order = cast(&order, &DataType::Timestamp(TimeUnit::Millisecond, None))?;
        let order = order.as_primitive::<datafusion::arrow::datatypes::TimestampMillisecondType>();
        let values = self
            .lags
            .iter()
            .map(|l| l.value.evaluate(&batch)?.into_array(n))
            .collect::<Result<Vec<_>>>()?;
        // Rows at one time are taken in the order of their values, not of their arrival: the
        // last of a key's rows at a time is the one later rows see.
        let sequence = super::time_then_value_order(&batch, order)?;
        let mut outputs: Vec<Vec<ScalarValue>> = self
            .lags
            .iter()
            .map(|l| vec![l.default.clone(); n])
            .collect();
        let mut keys = self
            .handle
            .keys
            .lock()
            .map_err(|_| DataFusionError::Internal("lag state lock poisoned".into()))?;
        keys.settle_before(n);
        let ttl = self.handle.ttl.load(std::sync::atomic::Ordering::Relaxed);
        for r in sequence {
            if order.is_null(r) {
                continue;
            }
            let t = order.value(r);
            let fresh = || KeyLags {
                last_t: i64::MIN,
                history: vec![VecDeque::new(); self.lags.len()],
            };
            let key = rows.row(r);
            let state = match keys.get_mut(key.as_ref()) {
                Some(state) => state,
                None => keys.get_or_insert_with(key.as_ref().into(), fresh),
            };
            // A key silent longer than the TTL starts afresh, whether or not a sweep has
            // dropped it yet (so the result does not depend on when sweeps ran).
            if ttl != i64::MAX && state.last_t != i64::MIN && t.saturating_sub(state.last_t) > ttl {
                *state = fresh();
                self.handle
                    .expired
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            let in_order = t >= state.last_t;
            for (c, lag) in self.lags.iter().enumerate() {
                let history = &mut state.history[c];
                // The value `offset` rows before this one: of the key's rows so far (rows at
                // one time in the order of their values), or, for a row older than the key's
                // last (which is not kept), of those before its time.
                let before = if in_order {
                    history.iter().rev().nth(lag.offset - 1)
                } else {
                    history
                        .iter()
                        .rev()
                        .filter(|(at, _)| *at < t)
                        .nth(lag.offset - 1)
                };
                if let Some((_, v)) = before {
                    outputs[c][r] = v.clone();
                }
                if in_order {
                    history.push_back((t, ScalarValue::try_from_array(&values[c], r)?.compacted()));
                    while history.len() > lag.offset {
                        history.pop_front();
                    }
                }
            }
            if in_order {
                state.last_t = t;
            }
        }
        let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
        for (lag, out) in self.lags.iter().zip(outputs) {
            let array = if out.is_empty() {
                datafusion::arrow::array::new_empty_array(&lag.data_type)
            } else {
                ScalarValue::iter_to_array(out)?
            };
            columns.push(array);
        }
        // The plan's schema says what type each column has (nullability included).
        let columns = columns
            .into_iter()
            .zip(self.schema.fields())
            .map(|(c, f)| Ok(cast(&c, f.data_type())?))
            .collect::<Result<Vec<_>>>()?;
        Ok(RecordBatch::try_new_with_options(
            self.schema.clone(),
            columns,
            &datafusion::arrow::array::RecordBatchOptions::new().with_row_count(Some(n)),
        )?)
    }
}

impl DisplayAs for KeyedLagExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let offsets: Vec<String> = self.lags.iter().map(|l| l.offset.to_string()).collect();
        write!(f, "KeyedLagExec: offsets [{}]", offsets.join(", "))
    }
}

impl ExecutionPlan for KeyedLagExec {
    fn name(&self) -> &str {
        "KeyedLagExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        for e in self
            .keys
            .iter()
            .chain(std::iter::once(&self.order))
            .chain(self.lags.iter().map(|l| &l.value))
        {
            if f(e)? == TreeNodeRecursion::Stop {
                return Ok(TreeNodeRecursion::Stop);
            }
        }
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        match children.pop() {
            Some(input) if children.is_empty() => Ok(Arc::new(Self {
                input,
                ..self.as_ref().clone()
            })),
            _ => Err(DataFusionError::Internal(
                "KeyedLagExec has one child".into(),
            )),
        }
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.replace_children(
            children,
            ReplaceChildrenOptions::new(
                datafusion::physical_plan::ChildrenPropertiesMode::Recompute,
            ),
        )
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(DataFusionError::Internal(format!(
                "KeyedLagExec has one partition, asked for {partition}"
            )));
        }
        let input = self.input.clone();
        let this = self.clone();
        let schema = self.schema.clone();
        let stream = futures::stream::once(async move {
            let batches = collect(input, context).await?;
            this.run(batches)
        });
        Ok(Box::pin(
            datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(schema, stream),
        ))
    }
}

/// A [`KeyedLagExec`]'s state with what a checkpoint needs to read it back.
#[derive(Debug, Clone)]
pub struct LagState {
    /// The state.
    pub handle: LagHandle,
    /// Types of the values, per call.
    pub types: Vec<DataType>,
    /// Its `PARTITION BY`.
    pub keys: Vec<Arc<dyn PhysicalExpr>>,
    /// Its `ORDER BY`.
    pub order: Arc<dyn PhysicalExpr>,
}

/// Replaces every window aggregation made of `LAG` calls with a [`KeyedLagExec`], returning
/// the new plan and their states; refuses `LEAD`, and `LAG` beside other window functions.
pub fn replace_lag_windows(
    plan: Arc<dyn ExecutionPlan>,
) -> Result<(Arc<dyn ExecutionPlan>, Vec<LagState>)> {
    let mut states = Vec::new();
    let plan = plan
        .transform_up(|node| {
            let (exprs, input) = if let Some(w) = node.downcast_ref::<WindowAggExec>() {
                (w.window_expr().to_vec(), w.input().clone())
            } else if let Some(w) = node.downcast_ref::<BoundedWindowAggExec>() {
                (w.window_expr().to_vec(), w.input().clone())
            } else {
                return Ok(Transformed::no(node));
            };
            match KeyedLagExec::try_new(input, node.schema(), &exprs)? {
                Some(exec) => {
                    states.push(LagState {
                        handle: exec.handle.clone(),
                        types: exec.types(),
                        keys: exec.keys.clone(),
                        order: exec.order.clone(),
                    });
                    Ok(Transformed::yes(Arc::new(exec) as Arc<dyn ExecutionPlan>))
                }
                None => Ok(Transformed::no(node)),
            }
        })?
        .data;
    Ok((plan, states))
}
