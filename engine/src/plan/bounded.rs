//! Functions whose output an analyst's SQL cannot blow up.
//!
//! Some of DataFusion's functions make values as large as an argument says, not as their
//! input is: `repeat(s, 1e10)`, `lpad(s, 1e10)`, `array_repeat(x, 1e10)`,
//! `range(0, 1e12)`, `replace(s, 'a', <a long text>)`. Others grow their input by a factor,
//! which nesting (or views over views) multiplies. Run per event, one such call would take the
//! process's memory, so every function of the string, binary string, regular expression,
//! array and map families is registered wrapped in [`Bounded`]:
//!
//! - before a call that makes values as large as an argument says, the size of what it
//!   would make is computed from its arguments (cheaply: lengths and counts), and a call over
//!   [`MAX_CALL_BYTES`] is an error naming the function and the size;
//! - after any call, the size of what it made is checked against the same limit, so that no
//!   chain of calls grows past it one step at a time.
//!
//! `to_char` (whose format string says how long its output is) is wrapped too, and
//! `concat` counts what it would make (a long literal joined to every row) before it
//! allocates.
//!
//! The error fails the micro-batch like any other error in a query (the query fails with
//! it, and its status says why); nothing is allocated beyond the limit and the limit's
//! factor of one call.
//!
//! A cast to a type one value of which is large whatever its content (a fixed-size list of
//! two billion entries) is refused when the query or view is planned
//! ([`refuse_wide_types`]), before the optimizer folds the cast of a literal.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, FieldRef, Int64Type, TimeUnit};
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Result, ScalarValue, exec_err};
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::interval_arithmetic::Interval;
use datafusion::logical_expr::preimage::PreimageResult;
use datafusion::logical_expr::simplify::{ExprSimplifyResult, SimplifyContext};
use datafusion::logical_expr::sort_properties::{ExprProperties, SortProperties};
use datafusion::logical_expr::{
    ColumnarValue, Documentation, Expr, ExpressionPlacement, ReturnFieldArgs, ScalarFunctionArgs,
    ScalarUDF, ScalarUDFImpl, Signature, StructFieldMapping,
};
use datafusion::prelude::SessionContext;

/// The most bytes one call of a function may make (over a whole micro-batch's rows).
pub const MAX_CALL_BYTES: u128 = 256 << 20;

/// The most steps one call of a function whose work grows faster than its input may take
/// (over a whole micro-batch's rows): `levenshtein` compares every character of one text
/// with every character of the other. About a second.
pub const MAX_CALL_STEPS: u128 = 1 << 28;

/// The documentation sections of the functions that are wrapped: those that make strings,
/// binary strings, arrays or maps.
const SECTIONS: [&str; 5] = [
    "String Functions",
    "Binary String Functions",
    "Regular Expression Functions",
    "Array Functions",
    "Map Functions",
];

/// Functions outside those sections that make values as long as an argument says.
const NAMED: [&str; 2] = ["to_char", "date_format"];

/// Whether `f` is wrapped: a function of [`SECTIONS`] or one [`NAMED`].
fn bounded(f: &ScalarUDF) -> bool {
    f.documentation()
        .is_some_and(|d| SECTIONS.contains(&d.doc_section.label))
        || NAMED.contains(&f.name())
}

/// Registers every string, binary, regular expression, array and map function of `ctx`
/// again, wrapped in [`Bounded`].
pub fn bound_functions(ctx: &SessionContext) {
    let state = ctx.state();
    let wrapped: Vec<ScalarUDF> = state
        .scalar_functions()
        .values()
        .filter(|f| bounded(f))
        .map(|f| Bounded::udf(Arc::clone(f)))
        .collect();
    for f in wrapped {
        ctx.register_udf(f);
    }
}

/// A function whose calls may not make more than [`MAX_CALL_BYTES`]; everything else is the
/// function's own.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Bounded {
    inner: Arc<ScalarUDF>,
}

impl Bounded {
    /// `f`, wrapped (a function already wrapped is kept as it is).
    pub fn udf(f: Arc<ScalarUDF>) -> ScalarUDF {
        if f.inner().as_ref().is::<Bounded>() {
            return f.as_ref().clone();
        }
        ScalarUDF::new_from_impl(Bounded { inner: f })
    }

    /// `expr` with every call of a wrapped family's function that is not wrapped wrapped
    /// (a simplification may rewrite a call into calls of the plain functions).
    fn wrap_calls(expr: Expr) -> Result<Expr> {
        Ok(expr
            .transform_up(|e| match e {
                Expr::ScalarFunction(ScalarFunction { func, args })
                    if !func.inner().as_ref().is::<Bounded>() && bounded(&func) =>
                {
                    Ok(Transformed::yes(Expr::ScalarFunction(ScalarFunction {
                        func: Arc::new(Bounded::udf(func)),
                        args,
                    })))
                }
                e => Ok(Transformed::no(e)),
            })?
            .data)
    }
}

impl ScalarUDFImpl for Bounded {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn schema_name(&self, args: &[Expr]) -> Result<String> {
        self.inner.inner().schema_name(args)
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.inner().return_type(arg_types)
    }

    fn with_updated_config(&self, config: &ConfigOptions) -> Option<ScalarUDF> {
        self.inner
            .inner()
            .with_updated_config(config)
            .map(|f| Bounded::udf(Arc::new(f)))
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        // A range's step written as a constant is checked when the query is planned: one
        // that may not advance would fail every row.
        if matches!(self.inner.name(), "range" | "generate_series")
            && let Some(Some(ScalarValue::IntervalMonthDayNano(Some(step)))) =
                args.scalar_arguments.get(2)
            && let Some(why) = stalling_step(step)
        {
            return datafusion::common::plan_err!("{why}");
        }
        self.inner.inner().return_field_from_args(args)
    }

    fn is_strict(&self) -> bool {
        self.inner.inner().is_strict()
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let name = self.inner.name();
        // A call of constants makes one value; while a query is planned, the optimizer makes
        // it (folding constants), outside the query's memory pool: what such calls make is
        // counted against the planning's budget (see `while_planning`), so that many calls,
        // each within the limit, do not add up past it.
        let constant = args
            .args
            .iter()
            .all(|a| matches!(a, ColumnarValue::Scalar(_)));
        let estimated = if constant {
            made_by(name, &args.args, 1)?
        } else {
            None
        };
        if let Some(bytes) = estimated {
            charge_planning(name, bytes)?;
        }
        if let Some(bytes) = made_by(name, &args.args, args.number_rows)?
            && bytes > MAX_CALL_BYTES
        {
            return too_large(name, bytes);
        }
        if name.starts_with("regexp_")
            && let Some(pattern) = args.args.get(1)
        {
            let flags = regex_flags_at(name).and_then(|i| args.args.get(i));
            let bytes: u128 = distinct_patterns(pattern, flags, args.number_rows)?
                .iter()
                .map(|p| regex_bytes(p))
                .sum();
            if bytes > MAX_REGEX_BYTES {
                return exec_err!(
                    "{name}(): matching with these regular expressions takes {}, more than the \
                     {} a call may take (a slot for each capture group at each step of a \
                     pattern): capture fewer groups ((?:…) groups without capturing) or write \
                     shorter patterns",
                    human(bytes),
                    human(MAX_REGEX_BYTES)
                );
            }
        }
        // array_has_any and array_has_all compare every element of one list with every
        // element of the other when neither is a constant (1 000 000 by 1 000 000 elements
        // took hours); with a constant list they look elements up in a set.
        if matches!(name, "array_has_any" | "array_has_all")
            && let [a @ ColumnarValue::Array(_), b @ ColumnarValue::Array(_)] = args.args.as_slice()
        {
            let rows = args.number_rows;
            let (a, b) = (list_lengths(a, rows)?, list_lengths(b, rows)?);
            let steps: u128 = a.iter().zip(&b).map(|(a, b)| a * b).sum();
            if steps > MAX_CALL_STEPS {
                // Not a limit of the micro-batch: its rows are run in parts until the call
                // fits, and a row over it alone goes to the DLQ.
                return exec_err!(
                    "{name}(): comparing these lists takes {steps} steps, more than the \
                     {MAX_CALL_STEPS} a call may take (each element of one with each of the \
                     other): compare shorter lists, or against a constant list"
                );
            }
        }
        if name == "levenshtein"
            && let [a, b] = args.args.as_slice()
        {
            let rows = args.number_rows;
            let (a, b) = (byte_lengths(a, rows)?, byte_lengths(b, rows)?);
            let steps: u128 = a.iter().zip(&b).map(|(a, b)| a * b).sum();
            if steps > MAX_CALL_STEPS {
                return exec_err!(
                    "levenshtein(): comparing these texts takes {steps} steps, more than the \
                     {MAX_CALL_STEPS} a call may take (its work is the product of the two \
                     lengths): compare shorter texts, e.g. left(s, 200)"
                );
            }
        }
        let out = self.inner.inner().invoke_with_args(args).map_err(|e| {
            let text = e.to_string();
            if let datafusion::common::DataFusionError::Internal(message) = e.find_root() {
                // DataFusion's own words for an argument it cannot take (array_resize to
                // a negative size): the call's failure, on that row, not a fault of the engine.
                datafusion::common::DataFusionError::Execution(format!(
                    "{name}(): {message} (an argument it cannot take)"
                ))
            } else if text.contains("CompiledTooBig")
                || text.contains("Compiled regex exceeds size limit")
            {
                datafusion::common::DataFusionError::Execution(format!(
                    "{name}(): the regular expression is too large once compiled (more than \
                     10 MiB): write a shorter pattern, with fewer nested repetitions"
                ))
            } else {
                e
            }
        })?;
        let bytes = match &out {
            ColumnarValue::Array(a) => a.get_array_memory_size() as u128,
            ColumnarValue::Scalar(s) => s.size() as u128,
        };
        if constant && estimated.is_none() {
            charge_planning(name, bytes)?;
        }
        if bytes > MAX_CALL_BYTES {
            return too_large(name, bytes);
        }
        Ok(out)
    }

    fn simplify(&self, args: Vec<Expr>, info: &SimplifyContext) -> Result<ExprSimplifyResult> {
        // DataFusion writes regexp_like(s, p) as s ~ p, whose patterns computed per row are
        // not checked here (see `regex_bytes`): such a call stays a call. A literal pattern
        // is checked with the plan (`refuse_wide_types`).
        if self.name().starts_with("regexp_")
            && args.get(1).is_some_and(|p| !matches!(p, Expr::Literal(..)))
        {
            return Ok(ExprSimplifyResult::Original(args));
        }
        Ok(match self.inner.inner().simplify(args, info)? {
            ExprSimplifyResult::Simplified(e) => {
                ExprSimplifyResult::Simplified(Bounded::wrap_calls(e)?)
            }
            original => original,
        })
    }

    fn preimage(
        &self,
        args: &[Expr],
        lit_expr: &Expr,
        info: &SimplifyContext,
    ) -> Result<PreimageResult> {
        self.inner.inner().preimage(args, lit_expr, info)
    }

    fn short_circuits(&self) -> bool {
        self.inner.inner().short_circuits()
    }

    fn conditional_arguments<'a>(
        &self,
        args: &'a [Expr],
    ) -> Option<(Vec<&'a Expr>, Vec<&'a Expr>)> {
        self.inner.inner().conditional_arguments(args)
    }

    fn evaluate_bounds(&self, input: &[&Interval]) -> Result<Interval> {
        self.inner.inner().evaluate_bounds(input)
    }

    fn propagate_constraints(
        &self,
        interval: &Interval,
        inputs: &[&Interval],
    ) -> Result<Option<Vec<Interval>>> {
        self.inner.inner().propagate_constraints(interval, inputs)
    }

    fn output_ordering(&self, inputs: &[ExprProperties]) -> Result<SortProperties> {
        self.inner.inner().output_ordering(inputs)
    }

    fn preserves_lex_ordering(&self, inputs: &[ExprProperties]) -> Result<bool> {
        self.inner.inner().preserves_lex_ordering(inputs)
    }

    fn strictly_order_preserving(&self, inputs: &[ExprProperties]) -> Result<bool> {
        self.inner.inner().strictly_order_preserving(inputs)
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.inner().coerce_types(arg_types)
    }

    fn struct_field_mapping(
        &self,
        literal_args: &[Option<ScalarValue>],
    ) -> Option<StructFieldMapping> {
        self.inner.inner().struct_field_mapping(literal_args)
    }

    fn documentation(&self) -> Option<&Documentation> {
        self.inner.documentation()
    }

    fn placement(&self, args: &[ExpressionPlacement]) -> ExpressionPlacement {
        self.inner.inner().placement(args)
    }
}

fn too_large<T>(name: &str, bytes: u128) -> Result<T> {
    exec_err!(
        "{name}() would make {} over a micro-batch, more than the {} one function call may \
         make: ask for shorter values (a smaller count, length or range)",
        human(bytes),
        human(MAX_CALL_BYTES)
    )
}

/// The most bytes the calls of constants may make while one SQL text is planned, in all.
pub const MAX_PLANNING_BYTES: u128 = 16 << 20;

/// What the planning on this thread may still make, and why it was refused.
struct PlanningBudget {
    left: u128,
    deadline: std::time::Instant,
    refused: Option<String>,
}

thread_local! {
    static PLANNING: std::cell::RefCell<Option<PlanningBudget>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `plan` (planning one SQL text, on this thread) with a budget for what calls of
/// constants make ([`MAX_PLANNING_BYTES`]) and a deadline after which such calls fail at
/// once. The optimizer leaves a call it could not fold for the query to make when it runs;
/// a call refused for the budget or the deadline refuses the whole planning instead.
pub fn while_planning<T>(
    deadline: std::time::Instant,
    plan: impl FnOnce() -> Result<T>,
) -> Result<T> {
    PLANNING.with(|p| {
        *p.borrow_mut() = Some(PlanningBudget {
            left: MAX_PLANNING_BYTES,
            deadline,
            refused: None,
        });
    });
    let out = plan();
    let refused = PLANNING
        .with(|p| p.borrow_mut().take())
        .and_then(|b| b.refused);
    match (out, refused) {
        (Ok(_), Some(why)) => datafusion::common::plan_err!("{why}"),
        (out, _) => out,
    }
}

/// Whether this thread is planning and past the planning's deadline.
pub fn planning_time_over() -> bool {
    PLANNING.with(|p| {
        p.borrow()
            .as_ref()
            .is_some_and(|b| std::time::Instant::now() > b.deadline)
    })
}

/// Counts `bytes` made by a call of constants of `name` against the planning's budget, if
/// this thread is planning.
fn charge_planning(name: &str, bytes: u128) -> Result<()> {
    PLANNING.with(|p| {
        let mut p = p.borrow_mut();
        let Some(budget) = p.as_mut() else {
            return Ok(());
        };
        // Once refused, the planning fails: every later call of constants fails at once.
        if let Some(why) = &budget.refused {
            return exec_err!("{why}");
        }
        let why = if std::time::Instant::now() > budget.deadline {
            "planning ran out of time while it made the values of constant expressions: \
             simplify them"
                .to_string()
        } else if bytes > budget.left {
            format!(
                "the constant expressions of this SQL would make more than {} while it is \
                 planned ({name}() of constants would make {}): ask for shorter values (a \
                 smaller count, length or range)",
                human(MAX_PLANNING_BYTES),
                human(bytes)
            )
        } else {
            budget.left -= bytes;
            return Ok(());
        };
        budget.refused.get_or_insert(why.clone());
        exec_err!("{why}")
    })
}

fn human(bytes: u128) -> String {
    const MIB: f64 = (1u64 << 20) as f64;
    let mib = bytes as f64 / MIB;
    if mib >= 1024.0 {
        format!("{:.1} GiB", mib / 1024.0)
    } else if mib >= 1.0 {
        format!("{mib:.0} MiB")
    } else {
        format!("{:.0} KiB", bytes as f64 / 1024.0)
    }
}

/// What a call of `name` over `args` would make, in bytes, for the functions that make values
/// as large as an argument says; none for the others.
fn made_by(name: &str, args: &[ColumnarValue], rows: usize) -> Result<Option<u128>> {
    // A micro-batch of no rows makes nothing (and its arrays have no row to measure).
    if rows == 0 {
        return Ok(Some(0));
    }
    let total = |per_row: &dyn Fn(usize) -> u128| -> u128 { (0..rows).map(per_row).sum() };
    Ok(Some(match (name, args) {
        ("repeat", [s, n]) => {
            let (s, n) = (byte_lengths(s, rows)?, counts(n, rows)?);
            total(&|i| s[i] * n[i])
        }
        ("lpad" | "rpad", [_, n, ..]) => {
            // Up to four bytes a character.
            let n = counts(n, rows)?;
            total(&|i| 4 * n[i])
        }
        ("array_repeat", [x, n]) => {
            let (x, n) = (value_sizes(x, rows)?, counts(n, rows)?);
            total(&|i| (x[i] + 8) * n[i])
        }
        ("array_resize", [_, n, ..]) => {
            let n = counts(n, rows)?;
            total(&|i| 16 * n[i])
        }
        ("replace", [s, from, to]) => {
            let (s, from, to) = (
                byte_lengths(s, rows)?,
                byte_lengths(from, rows)?,
                byte_lengths(to, rows)?,
            );
            total(&|i| s[i] + s[i] / from[i].max(1) * to[i])
        }
        ("regexp_replace", [s, _, to, ..]) => {
            // A match per position at most (an empty pattern matches between characters),
            // each replaced by the replacement with its group references filled in (each at
            // most the whole value).
            let (s, to) = (byte_lengths(s, rows)?, byte_lengths(to, rows)?);
            let refs = group_references(&args[2], rows)?;
            total(&|i| s[i] + (s[i] + 1) * (to[i] + refs[i] * s[i]))
        }
        ("concat" | "string_concat", _) => {
            let lengths = args
                .iter()
                .map(|a| byte_lengths(a, rows))
                .collect::<Result<Vec<_>>>()?;
            total(&|i| lengths.iter().map(|l| l[i]).sum())
        }
        ("concat_ws", [sep, rest @ ..]) => {
            let sep = byte_lengths(sep, rows)?;
            let lengths = rest
                .iter()
                .map(|a| byte_lengths(a, rows))
                .collect::<Result<Vec<_>>>()?;
            let n = rest.len() as u128;
            total(&|i| sep[i] * n + lengths.iter().map(|l| l[i]).sum::<u128>())
        }
        ("to_char" | "date_format", [_, format, ..]) => {
            // A directive of two characters writes at most about thirty (`%c`).
            let format = byte_lengths(format, rows)?;
            total(&|i| 16 * format[i])
        }
        ("range" | "generate_series", [_, ..]) => {
            let n = range_lengths(args, rows)?;
            total(&|i| 8 * n[i])
        }
        _ => return Ok(None),
    }))
}

fn as_array(value: &ColumnarValue, rows: usize) -> Result<ArrayRef> {
    value.to_array(rows)
}

/// `measure` of each row of `value`: a scalar (a literal, say) is measured once, not
/// expanded to the batch's rows first.
fn each_row(
    value: &ColumnarValue,
    rows: usize,
    measure: impl Fn(&ArrayRef) -> Result<Vec<u128>>,
) -> Result<Vec<u128>> {
    match value {
        ColumnarValue::Array(a) => measure(a),
        ColumnarValue::Scalar(s) => {
            let one = measure(&s.to_array()?)?.first().copied().unwrap_or(0);
            Ok(vec![one; rows])
        }
    }
}

/// Each row's length in bytes (0 for null; 0 for what is not a string or binary string),
/// read from the array's offsets or views without copying its values.
fn byte_lengths(value: &ColumnarValue, rows: usize) -> Result<Vec<u128>> {
    fn lengths<'a>(values: impl Iterator<Item = Option<usize>> + 'a) -> Vec<u128> {
        values.map(|n| n.unwrap_or(0) as u128).collect()
    }
    each_row(value, rows, |a| {
        Ok(match a.data_type() {
            DataType::Utf8 => lengths(a.as_string::<i32>().iter().map(|s| s.map(str::len))),
            DataType::LargeUtf8 => lengths(a.as_string::<i64>().iter().map(|s| s.map(str::len))),
            DataType::Utf8View => lengths(a.as_string_view().iter().map(|s| s.map(str::len))),
            DataType::Binary => lengths(a.as_binary::<i32>().iter().map(|s| s.map(<[u8]>::len))),
            DataType::LargeBinary => {
                lengths(a.as_binary::<i64>().iter().map(|s| s.map(<[u8]>::len)))
            }
            DataType::BinaryView => lengths(a.as_binary_view().iter().map(|s| s.map(<[u8]>::len))),
            _ => vec![0; a.len()],
        })
    })
}

/// Each row's number of elements (0 for null; 0 for what is not a list).
fn list_lengths(value: &ColumnarValue, rows: usize) -> Result<Vec<u128>> {
    each_row(value, rows, |a| {
        let lengths: Vec<usize> = match a.data_type() {
            DataType::List(_) => a.as_list::<i32>().offsets().lengths().collect(),
            DataType::LargeList(_) => a.as_list::<i64>().offsets().lengths().collect(),
            DataType::FixedSizeList(_, n) => vec![(*n).max(0) as usize; a.len()],
            _ => vec![0; a.len()],
        };
        Ok(lengths
            .into_iter()
            .enumerate()
            .map(|(i, n)| if a.is_valid(i) { n as u128 } else { 0 })
            .collect())
    })
}

/// Each row's count (0 for null or negative).
fn counts(value: &ColumnarValue, rows: usize) -> Result<Vec<u128>> {
    each_row(value, rows, |a| {
        let a = cast(a, &DataType::Int64)?;
        Ok(a.as_primitive::<Int64Type>()
            .iter()
            .map(|n| n.map_or(0, |n| n.max(0) as u128))
            .collect())
    })
}

/// Each row's value size in bytes: its width, or its length for strings.
fn value_sizes(value: &ColumnarValue, rows: usize) -> Result<Vec<u128>> {
    let data_type = value.data_type();
    if let Some(width) = data_type.primitive_width() {
        return Ok(vec![width as u128; rows]);
    }
    match data_type {
        DataType::Utf8View
        | DataType::Utf8
        | DataType::LargeUtf8
        | DataType::BinaryView
        | DataType::Binary
        | DataType::LargeBinary => byte_lengths(value, rows),
        _ => each_row(value, rows, |a| {
            // Nested values: the rows' share of the array.
            let each = a.get_array_memory_size() as u128 / a.len().max(1) as u128;
            Ok(vec![each.max(1); a.len()])
        }),
    }
}

/// Each row's number of group references (`$1`, `\1`, `${name}`) in a replacement.
fn group_references(value: &ColumnarValue, rows: usize) -> Result<Vec<u128>> {
    each_row(value, rows, |a| {
        let a = cast(a, &DataType::LargeUtf8)?;
        Ok(a.as_string::<i64>()
            .iter()
            .map(|s| s.map_or(0, |s| s.matches(['$', '\\']).count() as u128))
            .collect())
    })
}

/// Each row's number of elements of `range(start, stop[, step])` (or `range(stop)`): for
/// integers, dates and timestamps; a month counted as 28 days (the most elements).
fn range_lengths(args: &[ColumnarValue], rows: usize) -> Result<Vec<u128>> {
    let ns = DataType::Timestamp(TimeUnit::Nanosecond, None);
    let arrays = args
        .iter()
        .map(|a| as_array(a, rows))
        .collect::<Result<Vec<_>>>()?;
    let temporal = arrays.first().is_some_and(|a| {
        matches!(
            a.data_type(),
            DataType::Date32 | DataType::Date64 | DataType::Timestamp(_, _)
        )
    });
    let bounds = |a: &ArrayRef| -> Result<Vec<Option<i128>>> {
        let a = if temporal {
            cast(&cast(a, &ns)?, &DataType::Int64)?
        } else {
            cast(a, &DataType::Int64)?
        };
        Ok(a.as_primitive::<Int64Type>()
            .iter()
            .map(|v| v.map(i128::from))
            .collect())
    };
    // The least and the most a step advances (nanoseconds for times): a month is 28 to 31
    // days, so `-1 month 31 days` advances 0 to 3 days, and from a 31st it does not.
    const DAY: i128 = 86_400_000_000_000;
    let steps: Vec<Option<(i128, i128)>> = match arrays.get(2) {
        None => vec![Some(if temporal { (DAY, DAY) } else { (1, 1) }); rows],
        Some(step) if temporal => {
            let step = cast(
                step,
                &DataType::Interval(datafusion::arrow::datatypes::IntervalUnit::MonthDayNano),
            )?;
            step.as_primitive::<datafusion::arrow::datatypes::IntervalMonthDayNanoType>()
                .iter()
                .map(|s| {
                    if let Some(why) = s.as_ref().and_then(stalling_step) {
                        return exec_err!("{why}");
                    }
                    Ok(s.map(|s| {
                        let months = i128::from(s.months);
                        let rest = i128::from(s.days) * DAY + i128::from(s.nanoseconds);
                        let (short, long) = (months * 28 * DAY + rest, months * 31 * DAY + rest);
                        (short.min(long), short.max(long))
                    }))
                })
                .collect::<Result<_>>()?
        }
        Some(step) => bounds(step)?
            .into_iter()
            .map(|s| s.map(|s| (s, s)))
            .collect(),
    };
    let (start, stop) = match arrays.as_slice() {
        [stop] => (vec![Some(0); rows], bounds(stop)?),
        [start, stop, ..] => (bounds(start)?, bounds(stop)?),
        [] => return Ok(vec![0; rows]),
    };
    (0..rows)
        .map(|i| match (start[i], stop[i], steps[i]) {
            (Some(a), Some(b), Some((least, most))) if least != 0 || most != 0 => {
                // The step that advances least towards the stop.
                let step = if b >= a { least } else { most };
                if (b > a && step <= 0) || (b < a && step >= 0) {
                    if least.signum() == most.signum() {
                        // A step away from the stop: nothing.
                        return Ok(1);
                    }
                    return exec_err!(
                        "range(): the step may not advance from every start (a month is 28 \
                         to 31 days, so a step of months and days of opposite signs can stay \
                         in place): write a step whose parts have one sign"
                    );
                }
                Ok(if step == 0 {
                    1
                } else {
                    ((b - a) / step).max(0) as u128 + 1
                })
            }
            _ => Ok(0),
        })
        .collect()
}

/// Why a range's `step` may not advance from every start, if it may not: its parts have
/// opposite signs.
fn stalling_step(s: &datafusion::arrow::datatypes::IntervalMonthDayNano) -> Option<String> {
    let signs = [
        i128::from(s.months).signum(),
        i128::from(s.days).signum(),
        s.nanoseconds.signum().into(),
    ];
    (signs.contains(&1) && signs.contains(&-1)).then(|| {
        format!(
            "range(): a step whose parts have opposite signs ({} months, {} days, {} ns) may \
             not advance from every start (a month is 28 to 31 days, a day 23 to 25 hours \
             where clocks change), and a range that does not advance never ends: write a step \
             whose parts have one sign",
            s.months, s.days, s.nanoseconds
        )
    })
}

/// The most bytes one value of a type named in a query (`CAST`, `arrow_cast`) may take
/// whatever its content: fixed-size lists and binary strings are allocated whole, even for a
/// null, and a batch holds thousands of rows.
pub const MAX_VALUE_BYTES: u128 = 64 << 10;

/// Refuses a plan that casts to a type one value of which takes more than
/// [`MAX_VALUE_BYTES`] (`arrow_cast(NULL, 'FixedSizeList(2147483647, Int64)')`), before the
/// optimizer folds the cast of a literal and allocates it.
pub fn refuse_wide_types(plan: &datafusion::logical_expr::LogicalPlan) -> Result<()> {
    use datafusion::common::tree_node::TreeNodeRecursion;
    let mut problem: Option<String> = None;
    plan.apply(|node| {
        node.apply_expressions(|expr| {
            expr.apply(|e| {
                let named = match e {
                    Expr::Cast(c) => Some(("CAST".to_string(), c.field.data_type().clone())),
                    Expr::TryCast(c) => Some(("TRY_CAST".to_string(), c.field.data_type().clone())),
                    Expr::ScalarFunction(ScalarFunction { func, args })
                        if func.name() == "arrow_cast" =>
                    {
                        match args.get(1) {
                            Some(Expr::Literal(ScalarValue::Utf8(Some(t)), _))
                            | Some(Expr::Literal(ScalarValue::Utf8View(Some(t)), _))
                            | Some(Expr::Literal(ScalarValue::LargeUtf8(Some(t)), _)) => t
                                .parse::<DataType>()
                                .ok()
                                .map(|dt| ("arrow_cast".to_string(), dt)),
                            _ => None,
                        }
                    }
                    _ => None,
                };
                if let Some((what, dt)) = named {
                    let bytes = least_bytes(&dt);
                    if bytes > MAX_VALUE_BYTES {
                        problem = Some(format!(
                            "{what} to {dt}: one value of that type takes at least {}, more \
                             than the {} a value may take in a stream query",
                            human(bytes),
                            human(MAX_VALUE_BYTES)
                        ));
                        return Ok(TreeNodeRecursion::Stop);
                    }
                }
                if let Some((what, pattern)) = regex_literal(e) {
                    if let Err(err) = regex::RegexBuilder::new(&pattern).build() {
                        problem = Some(match err {
                            regex::Error::CompiledTooBig(limit) => format!(
                                "{what}: the regular expression is too large once compiled \
                                 (more than {}): write a shorter pattern, with fewer nested \
                                 repetitions",
                                human(limit as u128)
                            ),
                            other => {
                                format!("{what}: the regular expression is not valid: {other}")
                            }
                        });
                        return Ok(TreeNodeRecursion::Stop);
                    }
                    let bytes = regex_bytes(&pattern);
                    if bytes > MAX_REGEX_BYTES {
                        problem = Some(format!(
                            "{what}: matching with the regular expression takes {}, more than \
                             the {} a call may take (a slot for each capture group at each \
                             step of the pattern): capture fewer groups ((?:…) groups without \
                             capturing) or write a shorter pattern",
                            human(bytes),
                            human(MAX_REGEX_BYTES)
                        ));
                        return Ok(TreeNodeRecursion::Stop);
                    }
                } else if let Some((what, instead)) = computed_pattern(e) {
                    problem = Some(format!(
                        "{what} with a pattern that is not a constant is not supported (each \
                         row's pattern would be compiled unchecked): write {instead}"
                    ));
                    return Ok(TreeNodeRecursion::Stop);
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })?;
        Ok(if problem.is_some() {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    })?;
    match problem {
        Some(p) => datafusion::common::plan_err!("{p}"),
        None => Ok(()),
    }
}

/// At most this much memory is taken by matching with the regular expressions of one call
/// (see [`regex_bytes`]).
const MAX_REGEX_BYTES: u128 = 64 << 20;

/// The memory matching with `pattern` takes besides its text: its NFA, and the two tables of
/// the regex crate's PikeVM, which keep a slot per capture group (two) for each NFA state.
/// A pattern with 20 000 capture groups asked for 51 GB at its first match. A pattern that
/// does not compile takes nothing here (its compilation gives the error).
fn regex_bytes(pattern: &str) -> u128 {
    use regex_automata::nfa::thompson::{Config, NFA};
    let nfa = NFA::compiler()
        .configure(Config::new().nfa_size_limit(Some(10 << 20)))
        .build(pattern);
    match nfa {
        Ok(nfa) => {
            let slots = nfa.states().len() as u128 * nfa.group_info().slot_len() as u128;
            2 * slots * std::mem::size_of::<usize>() as u128 + nfa.memory_usage() as u128
        }
        Err(_) => 0,
    }
}

/// Where a `regexp_*` function takes its flags (`'i'`, `'x'`, …), which DataFusion compiles
/// into the pattern as `(?flags)`.
fn regex_flags_at(name: &str) -> Option<usize> {
    match name {
        "regexp_like" | "regexp_match" => Some(2),
        "regexp_replace" | "regexp_count" => Some(3),
        "regexp_instr" => Some(4),
        _ => None,
    }
}

/// `pattern` as DataFusion compiles it with `flags` (`g`, for every match of a replace, is
/// not a flag of the expression).
fn with_flags(pattern: &str, flags: Option<&str>) -> String {
    let flags: String = flags
        .unwrap_or_default()
        .chars()
        .filter(|c| *c != 'g')
        .collect();
    if flags.is_empty() {
        pattern.to_string()
    } else {
        format!("(?{flags}){pattern}")
    }
}

/// The distinct patterns of a call's rows (`pattern` with its row's `flags`), as compiled.
fn distinct_patterns(
    pattern: &ColumnarValue,
    flags: Option<&ColumnarValue>,
    rows: usize,
) -> Result<Vec<String>> {
    let texts =
        |v: &ColumnarValue| -> Result<ArrayRef> { Ok(cast(&as_array(v, rows)?, &DataType::Utf8)?) };
    let patterns = texts(pattern)?;
    let flags = flags.map(texts).transpose()?;
    let flags = flags.as_ref().map(|f| f.as_string::<i32>());
    let mut distinct = std::collections::HashSet::new();
    for (i, p) in patterns.as_string::<i32>().iter().enumerate() {
        let Some(p) = p else { continue };
        distinct.insert((p, flags.and_then(|f| f.is_valid(i).then(|| f.value(i)))));
    }
    Ok(distinct
        .into_iter()
        .map(|(p, f)| with_flags(p, f))
        .collect())
}

/// An operator that matches a regular expression computed per row from columns
/// (`s ~ pattern_column`, `SIMILAR TO` a column), which the regex functions check and the
/// operators do not, with what to write instead. (A constant pattern is folded into a
/// literal, checked as such.)
fn computed_pattern(e: &Expr) -> Option<(String, &'static str)> {
    match (regex_operator(e), e) {
        (Some((op, pattern)), _) if computed(pattern) => Some((
            format!("the {op} operator"),
            "regexp_like(s, pattern) (regexp_like(s, pattern, 'i') for a match ignoring case; \
             NOT regexp_like(…) for !~)",
        )),
        (_, Expr::SimilarTo(like)) if computed(&like.pattern) => Some((
            "SIMILAR TO".to_string(),
            "regexp_like(s, '^(' || pattern || ')$')",
        )),
        _ => None,
    }
}

/// Whether a pattern is computed as the query runs (from columns, or by a subquery), not
/// folded into a literal while it is planned.
fn computed(pattern: &Expr) -> bool {
    !pattern.column_refs().is_empty()
        || pattern
            .exists(|e| Ok(matches!(e, Expr::ScalarSubquery(_))))
            .unwrap_or(true)
}

/// A regular expression operator (`~`, `~*`, `!~`, `!~*`) and its pattern.
fn regex_operator(e: &Expr) -> Option<(datafusion::logical_expr::Operator, &Expr)> {
    use datafusion::logical_expr::{BinaryExpr, Operator};
    match e {
        Expr::BinaryExpr(BinaryExpr { op, right, .. })
            if matches!(
                op,
                Operator::RegexMatch
                    | Operator::RegexIMatch
                    | Operator::RegexNotMatch
                    | Operator::RegexNotIMatch
            ) =>
        {
            Some((*op, right))
        }
        _ => None,
    }
}

/// A regular expression given as a literal to an operator (`~`, `~*`, `!~`, `!~*`,
/// `SIMILAR TO`) or a `regexp_*` function, or the one a literal `LIKE` pattern is matched
/// with (`%` any text, `_` any character, the rest as written), with what it was given to.
fn regex_literal(e: &Expr) -> Option<(String, String)> {
    fn literal(e: &Expr) -> Option<&str> {
        match e {
            Expr::Literal(ScalarValue::Utf8(Some(t)), _)
            | Expr::Literal(ScalarValue::Utf8View(Some(t)), _)
            | Expr::Literal(ScalarValue::LargeUtf8(Some(t)), _) => Some(t.as_str()),
            _ => None,
        }
    }
    if let Some((op, pattern)) = regex_operator(e) {
        // DataFusion writes regexp_like(s, 'literal') as s ~ 'literal'.
        return literal(pattern)
            .map(|p| (format!("the {op} operator or regexp_like()"), p.to_string()));
    }
    match e {
        Expr::ScalarFunction(ScalarFunction { func, args })
            if func.name().starts_with("regexp_") =>
        {
            let flags = match regex_flags_at(func.name()).and_then(|i| args.get(i)) {
                None => None,
                Some(f) => Some(literal(f)?),
            };
            args.get(1)
                .and_then(literal)
                .map(|p| (format!("{}()", func.name()), with_flags(p, flags)))
        }
        Expr::SimilarTo(like) => {
            literal(&like.pattern).map(|p| ("SIMILAR TO".to_string(), p.to_string()))
        }
        Expr::Like(like) => literal(&like.pattern).map(|p| {
            let escape = like.escape_char.unwrap_or('\\');
            let mut regex = String::with_capacity(p.len() + 8);
            if like.case_insensitive {
                regex.push_str("(?i)");
            }
            let mut escaped = false;
            for c in p.chars() {
                match c {
                    _ if escaped => {
                        regex.push_str(&regex::escape(c.encode_utf8(&mut [0; 4])));
                        escaped = false;
                    }
                    _ if c == escape => escaped = true,
                    '%' => regex.push_str(".*"),
                    '_' => regex.push('.'),
                    _ => regex.push_str(&regex::escape(c.encode_utf8(&mut [0; 4]))),
                }
            }
            let what = if like.case_insensitive {
                "ILIKE"
            } else {
                "LIKE"
            };
            (format!("the {what} pattern"), regex)
        }),
        _ => None,
    }
}

/// The least bytes one value of `dt` takes whatever its content.
fn least_bytes(dt: &DataType) -> u128 {
    match dt {
        DataType::FixedSizeList(f, n) => (*n).max(0) as u128 * least_bytes(f.data_type()).max(1),
        DataType::FixedSizeBinary(n) => (*n).max(0) as u128,
        DataType::Struct(fields) => fields.iter().map(|f| least_bytes(f.data_type())).sum(),
        other => other.primitive_width().unwrap_or(4) as u128,
    }
}

/// `plan` with every string `||` made a call of [`StringConcat`], wrapped in [`Bounded`]:
/// the operator joins its operands row by row as `concat` does, and a long value joined to
/// every row would take the process's memory before any check after it.
pub fn bound_operators(
    plan: datafusion::logical_expr::LogicalPlan,
) -> Result<datafusion::logical_expr::LogicalPlan> {
    use datafusion::logical_expr::{BinaryExpr, Operator};
    let concat = Arc::new(Bounded::udf(Arc::new(ScalarUDF::new_from_impl(
        StringConcat::new(),
    ))));
    Ok(plan
        .transform_up_with_subqueries(|node| {
            node.map_expressions(|expr| {
                expr.transform_up(|e| match e {
                    Expr::BinaryExpr(BinaryExpr {
                        left,
                        op: Operator::StringConcat,
                        right,
                    }) => Ok(Transformed::yes(Expr::ScalarFunction(ScalarFunction {
                        func: concat.clone(),
                        args: vec![*left, *right],
                    }))),
                    e => Ok(Transformed::no(e)),
                })
            })
        })?
        .data)
}

/// The `||` operator over strings, as a function (so that [`Bounded`] can wrap it): the same
/// coercion, result type and values as DataFusion's operator, and its name in plans.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct StringConcat {
    signature: Signature,
}

impl StringConcat {
    fn new() -> Self {
        Self {
            signature: Signature::user_defined(datafusion::logical_expr::Volatility::Immutable),
        }
    }

    fn coercer<'a>(
        types: &'a [DataType],
    ) -> Result<datafusion::logical_expr::type_coercion::binary::BinaryTypeCoercer<'a>> {
        match types {
            [l, r] => Ok(
                datafusion::logical_expr::type_coercion::binary::BinaryTypeCoercer::new(
                    l,
                    &datafusion::logical_expr::Operator::StringConcat,
                    r,
                ),
            ),
            _ => datafusion::common::plan_err!("|| takes two operands"),
        }
    }
}

impl ScalarUDFImpl for StringConcat {
    fn name(&self) -> &str {
        "string_concat"
    }

    fn schema_name(&self, args: &[Expr]) -> Result<String> {
        match args {
            [l, r] => Ok(format!("{} || {}", l.schema_name(), r.schema_name())),
            _ => datafusion::common::plan_err!("|| takes two operands"),
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        let (l, r) = Self::coercer(arg_types)?.get_input_types()?;
        Ok(vec![l, r])
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        Self::coercer(arg_types)?.get_result_type()
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        let types: Vec<DataType> = args
            .arg_fields
            .iter()
            .map(|f| f.data_type().clone())
            .collect();
        let nullable = args.arg_fields.iter().any(|f| f.is_nullable());
        Ok(Arc::new(datafusion::arrow::datatypes::Field::new(
            self.name(),
            self.return_type(&types)?,
            nullable,
        )))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        use datafusion::arrow::datatypes::{Field, Schema};
        use datafusion::physical_expr::PhysicalExpr;
        use datafusion::physical_expr::expressions::{BinaryExpr, Column};
        let [l, r] = args.args.as_slice() else {
            return exec_err!("|| takes two operands");
        };
        let rows = args.number_rows;
        let (l, r) = (l.to_array(rows)?, r.to_array(rows)?);
        let schema = Arc::new(Schema::new(vec![
            Field::new("l", l.data_type().clone(), true),
            Field::new("r", r.data_type().clone(), true),
        ]));
        let batch = datafusion::arrow::array::RecordBatch::try_new(schema, vec![l, r])?;
        BinaryExpr::new(
            Arc::new(Column::new("l", 0)),
            datafusion::logical_expr::Operator::StringConcat,
            Arc::new(Column::new("r", 1)),
        )
        .evaluate(&batch)
    }
}
