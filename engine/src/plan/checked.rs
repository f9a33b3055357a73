//! Arithmetic that fails on overflow instead of wrapping: `sum`, and the operators of a
//! plan's expressions ([`check_arithmetic`]).
//!
//! `sum` that fails on overflow instead of wrapping. DataFusion's `sum` of integers and
//! decimals adds with wrapping arithmetic: a BIGINT total past 2^63 − 1 came out negative,
//! a result the input never had. Here the same function, under the same name, adds with
//! checked arithmetic for BIGINT, unsigned BIGINT and DECIMAL(38) sums (and checks a
//! decimal total against its precision); an overflow fails the query with the way out (sum a
//! DECIMAL). Everything else (signature, types, state, `DISTINCT`, sliding frames, floats,
//! intervals) is DataFusion's own.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BooleanArray, PrimitiveArray};
use datafusion::arrow::buffer::NullBuffer;
use datafusion::arrow::datatypes::Schema;
use datafusion::arrow::datatypes::{
    ArrowPrimitiveType, DataType, Decimal128Type, FieldRef, Int64Type, UInt64Type,
};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Result, ScalarValue, exec_err, plan_err};
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::AggregateOrderSensitivity;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, Documentation, EmitTo, Expr, GroupsAccumulator,
    Operator, ReversedUDAF, SetMonotonicity, Signature, StatisticsArgs,
};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::{BinaryExpr, Literal, NegativeExpr};
use datafusion::physical_expr::projection::ProjectionExpr;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::aggregates::{AggregateExec, AggregateMode, PhysicalGroupBy};
use datafusion::physical_plan::filter::{FilterExec, FilterExecBuilder};
use datafusion::physical_plan::joins::utils::JoinFilter;
use datafusion::physical_plan::joins::{
    HashJoinExec, NestedLoopJoinExec, NestedLoopJoinExecBuilder,
};
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::windows::{BoundedWindowAggExec, WindowAggExec, WindowExpr};
use datafusion::prelude::SessionContext;

/// Registers [`CheckedSum`] over `ctx`'s `sum`.
pub fn check_sums(ctx: &SessionContext) {
    let Some(sum) = ctx.state().aggregate_functions().get("sum").cloned() else {
        return;
    };
    ctx.register_udaf(AggregateUDF::from(CheckedSum { inner: sum }));
}

/// DataFusion's `sum` with checked additions (see the module docs).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct CheckedSum {
    inner: Arc<AggregateUDF>,
}

/// Whether sums of `data_type` are checked here.
fn checked(data_type: &DataType) -> bool {
    matches!(
        data_type,
        DataType::Int64 | DataType::UInt64 | DataType::Decimal128(..)
    )
}

fn overflow(name: &str, data_type: &DataType) -> datafusion::error::DataFusionError {
    let instead = match data_type {
        DataType::Decimal128(..) => {
            "Sum smaller units (x / 1000, a smaller scale) or DOUBLE, \
             which rounds"
        }
        _ => {
            "Sum a wider type: sum(CAST(x AS DECIMAL(38, 0))) for integers (or DOUBLE, which \
             rounds)"
        }
    };
    datafusion::error::DataFusionError::Execution(format!(
        "{name} overflowed its type {}: the total is larger than it can hold. {instead}",
        crate::schema::sql_type_name(data_type)
    ))
}

impl AggregateUDFImpl for CheckedSum {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }

    fn return_field(&self, arg_fields: &[FieldRef]) -> Result<FieldRef> {
        self.inner.return_field(arg_fields)
    }

    fn is_nullable(&self) -> bool {
        self.inner.is_nullable()
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        let data_type = args.return_field.data_type().clone();
        if !checked(&data_type) {
            return self.inner.accumulator(args);
        }
        let name = match args.expr_fields.first() {
            Some(field) if args.name == self.name() => format!("sum({})", field.name()),
            _ => args.name.to_string(),
        };
        if args.is_distinct {
            return Ok(Box::new(DistinctTotal {
                inner: self.inner.accumulator(args)?,
                name,
                data_type,
            }));
        }
        Ok(match data_type {
            DataType::Int64 => Box::new(Total::<Int64Type>::new(name, data_type)),
            DataType::UInt64 => Box::new(Total::<UInt64Type>::new(name, data_type)),
            _ => Box::new(Total::<Decimal128Type>::new(name, data_type)),
        })
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        self.inner.state_fields(args)
    }

    fn groups_accumulator_supported(&self, args: AccumulatorArgs) -> bool {
        self.inner.groups_accumulator_supported(args)
    }

    fn create_groups_accumulator(
        &self,
        args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        let data_type = args.return_field.data_type().clone();
        if args.is_distinct || !checked(&data_type) {
            return self.inner.create_groups_accumulator(args);
        }
        let name = match args.expr_fields.first() {
            Some(field) if args.name == self.name() => format!("sum({})", field.name()),
            _ => args.name.to_string(),
        };
        Ok(match data_type {
            DataType::Int64 => Box::new(Totals::<Int64Type>::new(name, data_type)),
            DataType::UInt64 => Box::new(Totals::<UInt64Type>::new(name, data_type)),
            _ => Box::new(Totals::<Decimal128Type>::new(name, data_type)),
        })
    }

    fn create_sliding_accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        self.inner.create_sliding_accumulator(args)
    }

    fn order_sensitivity(&self) -> AggregateOrderSensitivity {
        self.inner.inner().order_sensitivity()
    }

    /// Not simplified: DataFusion rewrites `sum(v + 5)` beside `sum(v + 1)` as
    /// `sum(v) + 5 * count(v)`, whose `+` would wrap outside the checked sum.
    fn simplify_expr_op_literal(
        &self,
        _agg_function: &AggregateFunction,
        _arg: &Expr,
        _op: Operator,
        _lit: &Expr,
        _arg_is_left: bool,
    ) -> Result<Option<Expr>> {
        Ok(None)
    }

    fn reverse_expr(&self) -> ReversedUDAF {
        self.inner.reverse_udf()
    }

    fn value_from_stats(&self, statistics_args: &StatisticsArgs) -> Option<ScalarValue> {
        self.inner.value_from_stats(statistics_args)
    }

    fn default_value(&self, data_type: &DataType) -> Result<ScalarValue> {
        self.inner.default_value(data_type)
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }

    fn set_monotonicity(&self, data_type: &DataType) -> SetMonotonicity {
        self.inner.inner().set_monotonicity(data_type)
    }
}

/// The native values a checked sum adds, which it adds as 128-bit integers: the total is
/// checked against its type when it is read (a state or a result), so a total that passes
/// the type's limit on the way and comes back, as rows arrive in another order, is right.
trait Wide: ArrowPrimitiveType<Native: Into<i128> + TryFrom<i128>> {}
impl<T: ArrowPrimitiveType<Native: Into<i128> + TryFrom<i128>>> Wide for T {}

/// `total + value`, or the overflow error (a DECIMAL(38)'s, past 128 bits).
fn add(total: i128, value: i128, (name, data_type): (&str, &DataType)) -> Result<i128> {
    total
        .checked_add(value)
        .ok_or_else(|| overflow(name, data_type))
}

/// `totals` as an array of `data_type`, or the overflow error where a decimal total is
/// longer than its precision.
fn finish<T: Wide>(
    totals: &[i128],
    nulls: Option<NullBuffer>,
    (name, data_type): (&str, &DataType),
) -> Result<ArrayRef> {
    let totals = totals
        .iter()
        .map(|t| T::Native::try_from(*t).map_err(|_| overflow(name, data_type)))
        .collect::<Result<Vec<T::Native>>>()?;
    let array = PrimitiveArray::<T>::new(totals.into(), nulls).with_data_type(data_type.clone());
    if let DataType::Decimal128(precision, _) = data_type
        && array
            .as_any()
            .downcast_ref::<PrimitiveArray<Decimal128Type>>()
            .is_some_and(|d| d.validate_decimal_precision(*precision).is_err())
    {
        return Err(overflow(name, data_type));
    }
    Ok(Arc::new(array))
}

/// One group's checked sum (aggregates without groups).
struct Total<T: ArrowPrimitiveType> {
    total: Option<i128>,
    _type: std::marker::PhantomData<fn() -> T>,
    name: String,
    data_type: DataType,
}

impl<T: ArrowPrimitiveType> std::fmt::Debug for Total<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Total")
            .field("total", &self.total)
            .field("data_type", &self.data_type)
            .finish()
    }
}

impl<T: ArrowPrimitiveType> Total<T> {
    fn new(name: String, data_type: DataType) -> Self {
        Self {
            total: None,
            _type: std::marker::PhantomData,
            name,
            data_type,
        }
    }
}

impl<T: Wide> Accumulator for Total<T> {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let Some(values) = values.first() else {
            return exec_err!("sum takes one argument");
        };
        let values = values.as_primitive::<T>();
        for value in values.iter().flatten() {
            self.total = Some(add(
                self.total.unwrap_or_default(),
                value.into(),
                (&self.name, &self.data_type),
            )?);
        }
        Ok(())
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        self.update_batch(states)
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        Ok(vec![self.evaluate()?])
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        let nulls = self.total.is_none().then(|| NullBuffer::new_null(1));
        let array = finish::<T>(
            &[self.total.unwrap_or_default()],
            nulls,
            (&self.name, &self.data_type),
        )?;
        ScalarValue::try_from_array(&array, 0)
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self)
    }
}

/// A checked `sum(DISTINCT …)`: DataFusion's own accumulator keeps the distinct values (its
/// state, unchanged), and their total is added here in 128 bits, where DataFusion's wraps.
#[derive(Debug)]
struct DistinctTotal {
    inner: Box<dyn Accumulator>,
    name: String,
    data_type: DataType,
}

impl DistinctTotal {
    fn total<T: Wide>(&self, values: &ArrayRef) -> Result<ScalarValue> {
        let id = (self.name.as_str(), &self.data_type);
        let mut total = None;
        for value in values.as_primitive::<T>().iter().flatten() {
            total = Some(add(total.unwrap_or_default(), value.into(), id)?);
        }
        let nulls = total.is_none().then(|| NullBuffer::new_null(1));
        ScalarValue::try_from_array(&finish::<T>(&[total.unwrap_or_default()], nulls, id)?, 0)
    }
}

impl Accumulator for DistinctTotal {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        self.inner.update_batch(values)
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        self.inner.merge_batch(states)
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        self.inner.state()
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        let state = self.inner.state()?;
        let Some(ScalarValue::List(list)) = state.first() else {
            return exec_err!("internal: the state of {} is not a list", self.name);
        };
        let values = list.value(0);
        match self.data_type {
            DataType::Int64 => self.total::<Int64Type>(&values),
            DataType::UInt64 => self.total::<UInt64Type>(&values),
            _ => self.total::<Decimal128Type>(&values),
        }
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.inner.size()
    }
}

/// Checked sums of many groups, one total and one "seen a value" flag per group.
struct Totals<T: ArrowPrimitiveType> {
    totals: Vec<i128>,
    _type: std::marker::PhantomData<fn() -> T>,
    seen: Vec<bool>,
    name: String,
    data_type: DataType,
}

impl<T: Wide> Totals<T> {
    fn new(name: String, data_type: DataType) -> Self {
        Self {
            totals: Vec::new(),
            _type: std::marker::PhantomData,
            seen: Vec::new(),
            name,
            data_type,
        }
    }

    fn take(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        // Read before anything is taken: a total its type cannot hold leaves the groups as
        // they were.
        let n = match emit_to {
            EmitTo::All => self.totals.len(),
            EmitTo::First(n) => n.min(self.totals.len()),
        };
        let seen = &self.seen[..n];
        let nulls = seen
            .contains(&false)
            .then(|| NullBuffer::from(seen.to_vec()));
        let array = finish::<T>(&self.totals[..n], nulls, (&self.name, &self.data_type))?;
        emit_to.take_needed(&mut self.totals);
        emit_to.take_needed(&mut self.seen);
        Ok(array)
    }
}

impl<T: Wide> GroupsAccumulator for Totals<T> {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        let Some(values) = values.first() else {
            return exec_err!("sum takes one argument");
        };
        let values = values.as_primitive::<T>();
        self.totals.resize(total_num_groups, 0);
        self.seen.resize(total_num_groups, false);
        let taken = |row: usize| {
            values.is_valid(row) && opt_filter.is_none_or(|f| f.is_valid(row) && f.value(row))
        };
        let checked = (self.name.as_str(), &self.data_type);
        if values.null_count() == 0 && opt_filter.is_none() {
            for (&group, &value) in group_indices.iter().zip(values.values()) {
                self.totals[group] = add(self.totals[group], value.into(), checked)?;
                self.seen[group] = true;
            }
        } else {
            for (row, &group) in group_indices.iter().enumerate() {
                if taken(row) {
                    self.totals[group] =
                        add(self.totals[group], values.value(row).into(), checked)?;
                    self.seen[group] = true;
                }
            }
        }
        Ok(())
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        self.take(emit_to)
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        Ok(vec![self.take(emit_to)?])
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        self.update_batch(values, group_indices, None, total_num_groups)
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        let Some(values) = values.first() else {
            return exec_err!("sum takes one argument");
        };
        let values = values.as_primitive::<T>();
        let nulls = match opt_filter {
            None => values.nulls().cloned(),
            Some(f) => {
                let keep: NullBuffer = (0..values.len())
                    .map(|row| f.is_valid(row) && f.value(row))
                    .collect::<Vec<bool>>()
                    .into();
                NullBuffer::union(values.nulls(), Some(&keep))
            }
        };
        let state = PrimitiveArray::<T>::new(values.values().clone(), nulls)
            .with_data_type(self.data_type.clone());
        Ok(vec![Arc::new(state)])
    }

    fn size(&self) -> usize {
        self.totals.capacity() * std::mem::size_of::<i128>() + self.seen.capacity()
    }
}

/// `plan` with its arithmetic checked: `+`, `-` and `*` of integers (and decimals) fail on
/// overflow, as does `-` of the smallest integer, where DataFusion's wrap (a BIGINT's
/// `v * 2` came out negative). This covers projections, filters, an aggregation's
/// arguments, groups and `FILTER` clauses (`sum(v * 2)`), and join conditions (keys and the
/// rest). A failure in a projection, a filter, an aggregation's inputs or a join with a
/// reference table, or in a join key of two streams is the row's: it goes to the DLQ as a
/// division by zero does. One in the rest of the condition of a join of two streams, over
/// pairs of rows, fails the query: a pair has no one record to dead-letter.
pub fn check_arithmetic(plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>> {
    plan.transform_up(|node| {
        if let Some(a) = node.downcast_ref::<AggregateExec>() {
            return check_aggregation(a).map(|rebuilt| match rebuilt {
                Some(rebuilt) => Transformed::yes(rebuilt),
                None => Transformed::no(node.clone()),
            });
        }
        if let Some(j) = node.downcast_ref::<HashJoinExec>() {
            let schema = j.left().schema();
            let other = j.right().schema();
            let mut changed = false;
            let on = j
                .on()
                .iter()
                .map(|(l, r)| {
                    let l = checked_expr(l, &schema)?;
                    let r = checked_expr(r, &other)?;
                    changed |= l.transformed || r.transformed;
                    Ok((l.data, r.data))
                })
                .collect::<Result<Vec<_>>>()?;
            let filter = checked_filter(j.filter())?;
            if !changed && filter.is_none() {
                return Ok(Transformed::no(node));
            }
            let rebuilt = j
                .builder()
                .with_on(on)
                .with_filter(filter.or_else(|| j.filter().cloned()))
                .build_exec()?;
            return Ok(Transformed::yes(rebuilt));
        }
        if let Some(j) = node.downcast_ref::<NestedLoopJoinExec>() {
            let Some(filter) = checked_filter(j.filter())? else {
                return Ok(Transformed::no(node));
            };
            let rebuilt: Arc<dyn ExecutionPlan> = Arc::new(
                NestedLoopJoinExecBuilder::from(j)
                    .with_filter(Some(filter))
                    .build()?,
            );
            return Ok(Transformed::yes(rebuilt));
        }
        if let Some(p) = node.downcast_ref::<ProjectionExec>() {
            let schema = p.input().schema();
            let mut changed = false;
            let exprs = p
                .expr()
                .iter()
                .map(|e| {
                    let checked = checked_expr(&e.expr, &schema)?;
                    changed |= checked.transformed;
                    Ok(ProjectionExpr {
                        expr: checked.data,
                        alias: e.alias.clone(),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            if !changed {
                return Ok(Transformed::no(node));
            }
            let rebuilt: Arc<dyn ExecutionPlan> =
                Arc::new(ProjectionExec::try_new(exprs, p.input().clone())?);
            return Ok(Transformed::yes(rebuilt));
        }
        if let Some(w) = node.downcast_ref::<WindowAggExec>() {
            refuse_window_arithmetic(w.window_expr(), &w.input().schema())?;
        }
        if let Some(w) = node.downcast_ref::<BoundedWindowAggExec>() {
            refuse_window_arithmetic(w.window_expr(), &w.input().schema())?;
        }
        if let Some(f) = node.downcast_ref::<FilterExec>() {
            let predicate = checked_expr(f.predicate(), &f.input().schema())?;
            if !predicate.transformed {
                return Ok(Transformed::no(node));
            }
            let rebuilt: Arc<dyn ExecutionPlan> = Arc::new(
                FilterExecBuilder::from(f)
                    .with_predicate(predicate.data)
                    .build()?,
            );
            return Ok(Transformed::yes(rebuilt));
        }
        Ok(Transformed::no(node))
    })
    .map(|t| t.data)
}

/// `aggregation` with checked arithmetic in what it evaluates over its input rows (its
/// arguments, ORDER BY expressions, groups and filters), or `None` when it has none to check
/// or only merges partial states.
fn check_aggregation(aggregation: &AggregateExec) -> Result<Option<Arc<dyn ExecutionPlan>>> {
    if !matches!(
        aggregation.mode(),
        AggregateMode::Partial | AggregateMode::Single | AggregateMode::SinglePartitioned
    ) {
        return Ok(None);
    }
    let schema = aggregation.input().schema();
    let mut changed = false;
    let mut check = |e: &Arc<dyn PhysicalExpr>| -> Result<Arc<dyn PhysicalExpr>> {
        let checked = checked_expr(e, &schema)?;
        changed |= checked.transformed;
        Ok(checked.data)
    };
    let group_by = aggregation.group_expr();
    let groups = group_by
        .expr()
        .iter()
        .map(|(e, name)| Ok((check(e)?, name.clone())))
        .collect::<Result<Vec<_>>>()?;
    let mut aggregates = Vec::with_capacity(aggregation.aggr_expr().len());
    for a in aggregation.aggr_expr() {
        let args = a
            .expressions()
            .iter()
            .map(&mut check)
            .collect::<Result<_>>()?;
        let order = a
            .order_bys()
            .iter()
            .map(|o| check(&o.expr))
            .collect::<Result<_>>()?;
        aggregates.push(match a.with_new_expressions(args, order) {
            Some(rebuilt) => Arc::new(rebuilt),
            None => a.clone(),
        });
    }
    let filters = aggregation
        .filter_expr()
        .iter()
        .map(|f| f.as_ref().map(&mut check).transpose())
        .collect::<Result<Vec<_>>>()?;
    if !changed {
        return Ok(None);
    }
    let group_by = PhysicalGroupBy::new(
        groups,
        group_by.null_expr().to_vec(),
        group_by.groups().to_vec(),
        group_by.has_grouping_set(),
    );
    Ok(Some(Arc::new(AggregateExec::try_new(
        *aggregation.mode(),
        group_by,
        aggregates,
        filters,
        aggregation.input().clone(),
        aggregation.input_schema(),
    )?)))
}

/// A join's filter with checked arithmetic, or `None` when it has none to check.
fn checked_filter(filter: Option<&JoinFilter>) -> Result<Option<JoinFilter>> {
    let Some(filter) = filter else {
        return Ok(None);
    };
    let checked = checked_expr(filter.expression(), filter.schema())?;
    Ok(checked.transformed.then(|| {
        JoinFilter::new(
            checked.data,
            filter.column_indices().to_vec(),
            filter.schema().clone(),
        )
    }))
}

/// Refuses integer arithmetic in the arguments, PARTITION BY or ORDER BY of window functions
/// (`lag(v * 2) OVER (…)`, a detector's argument, a ranking's order), over rows of `schema`:
/// DataFusion's window expressions cannot be rebuilt with checked operators, and wrapped,
/// such a value is silently wrong. Computed in a subquery below the window, it is checked.
fn refuse_window_arithmetic(exprs: &[Arc<dyn WindowExpr>], schema: &Schema) -> Result<()> {
    for w in exprs {
        let all = w.all_expressions();
        for e in all
            .args
            .iter()
            .chain(&all.partition_by_exprs)
            .chain(&all.order_by_exprs)
        {
            let mut found = None;
            e.apply(|x| {
                let wraps = if let Some(b) = x.downcast_ref::<BinaryExpr>() {
                    matches!(
                        b.op(),
                        Operator::Plus | Operator::Minus | Operator::Multiply
                    ) && b.data_type(schema)?.is_integer()
                } else if let Some(n) = x.downcast_ref::<NegativeExpr>() {
                    n.arg().data_type(schema)?.is_signed_integer()
                } else {
                    false
                };
                if wraps {
                    found = Some(x.clone());
                    return Ok(TreeNodeRecursion::Stop);
                }
                Ok(TreeNodeRecursion::Continue)
            })?;
            if let Some(x) = found {
                let shown = datafusion::physical_expr_common::physical_expr::fmt_sql(x.as_ref())
                    .to_string();
                return plan_err!(
                    "{shown} in {}: integer arithmetic in a window function's arguments, \
                     PARTITION BY or ORDER BY is not checked for overflow there (a value past \
                     the type's range would wrap around): compute it in a subquery below, e.g. \
                     SELECT …, lag(v2) OVER (PARTITION BY k ORDER BY t) FROM (SELECT *, v * 2 \
                     AS v2 FROM s)",
                    w.name()
                );
            }
        }
    }
    Ok(())
}

/// `expr` (over rows of `schema`) with checked arithmetic.
fn checked_expr(
    expr: &Arc<dyn PhysicalExpr>,
    schema: &Schema,
) -> Result<Transformed<Arc<dyn PhysicalExpr>>> {
    expr.clone().transform_up(|e| {
        if let Some(b) = e.downcast_ref::<BinaryExpr>()
            && matches!(
                b.op(),
                Operator::Plus | Operator::Minus | Operator::Multiply
            )
        {
            let rebuilt: Arc<dyn PhysicalExpr> = Arc::new(
                BinaryExpr::new(b.left().clone(), *b.op(), b.right().clone())
                    .with_fail_on_overflow(true),
            );
            return Ok(Transformed::yes(rebuilt));
        }
        if let Some(n) = e.downcast_ref::<NegativeExpr>() {
            let data_type = n.arg().data_type(schema)?;
            if data_type.is_signed_integer() {
                let zero = ScalarValue::new_zero(&data_type)?;
                let rebuilt: Arc<dyn PhysicalExpr> = Arc::new(
                    BinaryExpr::new(
                        Arc::new(Literal::new(zero)),
                        Operator::Minus,
                        n.arg().clone(),
                    )
                    .with_fail_on_overflow(true),
                );
                return Ok(Transformed::yes(rebuilt));
            }
        }
        Ok(Transformed::no(e))
    })
}
