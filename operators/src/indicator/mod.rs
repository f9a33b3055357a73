//! City indicators as DataFusion functions: air-quality indices (VN_AQI, US AQI, NowCast over
//! hourly means), traffic indicators and data-quality checks. Tables live in data modules
//! ([`vn_aqi_table`], [`us_aqi_table`], [`traffic_table`], [`quality::PHYSICAL_RANGES`]); each
//! SQL function, or family of functions sharing one implementation, has its own file.

pub mod gas_units;
pub mod hourly_means;
pub mod hours;
pub mod los_freeway;
pub mod los_urban;
pub mod nowcast;
pub mod pcu;
pub mod quality;
pub mod traffic_aggs;
pub mod traffic_funcs;
pub mod traffic_table;
pub mod tti;
pub mod us_aqi;
pub mod us_aqi_table;
pub mod vn_aqi;
pub mod vn_aqi_category;
pub mod vn_aqi_daily;
pub mod vn_aqi_dominant;
pub mod vn_aqi_sub;
pub mod vn_aqi_table;

use datafusion::arrow::array::{Array, ArrayRef, Float64Array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::{Result, exec_err};
use datafusion::logical_expr::{ColumnarValue, ScalarFunctionArgs};

/// Refuses, when the query is planned, a constant text argument `at` of function `name` that
/// `known` does not take (`vn_aqi_sub('xyz', pm25)` was accepted, and failed the query on its
/// first row); a column's texts are still checked row by row when it runs.
pub(crate) fn check_constant_text(
    name: &str,
    args: &datafusion::logical_expr::ReturnFieldArgs,
    at: usize,
    known: impl Fn(&str) -> bool,
    (what, expected): (&str, &str),
) -> Result<()> {
    use datafusion::scalar::ScalarValue;
    if let Some(Some(
        ScalarValue::Utf8(Some(text))
        | ScalarValue::LargeUtf8(Some(text))
        | ScalarValue::Utf8View(Some(text)),
    )) = args.scalar_arguments.get(at)
        && !known(text)
    {
        return datafusion::common::plan_err!(
            "{name}(): unknown {what} '{text}' (expected {expected})"
        );
    }
    Ok(())
}

/// The arguments of a call as `Float64` arrays of the call's length.
pub(crate) fn float_args(name: &str, args: &ScalarFunctionArgs) -> Result<Vec<Float64Array>> {
    float_args_from(name, &ColumnarValue::values_to_arrays(&args.args)?)
}

/// `arrays` as `Float64` arrays.
pub(crate) fn float_args_from(name: &str, arrays: &[ArrayRef]) -> Result<Vec<Float64Array>> {
    arrays
        .iter()
        .map(|a| {
            let a = cast(a, &DataType::Float64)?;
            match a.as_any().downcast_ref::<Float64Array>() {
                Some(f) => Ok(f.clone()),
                None => exec_err!("{name}(): arguments must be numbers"),
            }
        })
        .collect()
}

/// Value of row `r`, `None` when null.
pub(crate) fn value(a: &Float64Array, r: usize) -> Option<f64> {
    (!a.is_null(r)).then(|| a.value(r))
}

/// Coerces `n` numeric arguments to `Float64`, with a message naming the function's
/// parameters when the count is wrong.
pub(crate) fn coerce_numbers(
    name: &str,
    params: &str,
    args: &[DataType],
    n: usize,
) -> Result<Vec<DataType>> {
    if args.len() != n {
        return datafusion::common::plan_err!(
            "{name}({params}) takes {n} arguments, got {}",
            args.len()
        );
    }
    for a in args {
        if !(a.is_numeric() || a.is_null()) {
            return datafusion::common::plan_err!(
                "{name}({params}): arguments must be numbers (µg/m³), got {a}"
            );
        }
    }
    Ok(vec![DataType::Float64; n])
}

/// The parameters of `vn_aqi` and `vn_aqi_dominant`, in argument order.
pub(crate) const HOURLY: [vn_aqi_table::Pollutant; 6] = {
    use vn_aqi_table::Pollutant::*;
    [Pm25, Pm10, O3OneHour, No2, So2, Co]
};

/// The parameters of `vn_aqi_daily`, in argument order.
pub(crate) const DAILY: [vn_aqi_table::Pollutant; 7] = {
    use vn_aqi_table::Pollutant::*;
    [Pm25, Pm10, O3OneHour, O3EightHour, No2, So2, Co]
};

/// Per row, the station AQI and its dominant parameter, with one argument per parameter of
/// `pollutants` (see [`vn_aqi_table::overall`]).
pub(crate) fn station_rows(
    name: &str,
    args: &ScalarFunctionArgs,
    pollutants: &[vn_aqi_table::Pollutant],
) -> Result<Vec<Option<(i64, vn_aqi_table::Pollutant)>>> {
    let a = float_args(name, args)?;
    Ok((0..args.number_rows)
        .map(|r| {
            let values: Vec<_> = pollutants
                .iter()
                .zip(&a)
                .map(|(p, c)| (*p, value(c, r)))
                .collect();
            vn_aqi_table::overall(&values)
        })
        .collect())
}
