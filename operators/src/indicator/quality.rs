//! Data quality (INDICATORS.md §4): `reading_valid(quantity, value)` (physical range) and
//! `complete(readings, expected [, min_share])` (completeness).

use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, BooleanArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Float64Type};
use datafusion::common::{Result, exec_err, plan_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};

use super::hourly_means::DEFAULT_MIN_SHARE;
use super::{float_args, value};

/// Physical ranges of readings, inclusive: (quantity as named in SQL, low, high, unit). Values
/// outside are faults of the sensor, not of the air or the road.
pub const PHYSICAL_RANGES: [(&str, f64, f64, &str); 12] = [
    ("pm25", 0.0, 1_000.0, "µg/m³"),
    ("pm10", 0.0, 2_000.0, "µg/m³"),
    ("no2", 0.0, 4_000.0, "µg/m³"),
    ("so2", 0.0, 5_000.0, "µg/m³"),
    ("co", 0.0, 200_000.0, "µg/m³"),
    ("o3", 0.0, 2_000.0, "µg/m³"),
    ("temperature_c", -40.0, 60.0, "°C"),
    ("humidity_pct", 0.0, 100.0, "%"),
    ("speed_kmh", 0.0, 200.0, "km/h"),
    ("occupancy_pct", 0.0, 100.0, "%"),
    ("volume", 0.0, 10_000.0, "vehicles per interval"),
    ("confidence", 0.0, 1.0, ""),
];

/// The physical range `[low, high]` of `quantity`, if known.
pub fn physical_range(quantity: &str) -> Option<(f64, f64)> {
    let q = quantity.to_ascii_lowercase();
    PHYSICAL_RANGES
        .iter()
        .find(|r| r.0 == q)
        .map(|r| (r.1, r.2))
}

/// Whether `value` of `quantity` is physically possible; `None` for an unknown quantity.
pub fn physically_valid(quantity: &str, value: f64) -> Option<bool> {
    physical_range(quantity).map(|(low, high)| value.is_finite() && value >= low && value <= high)
}

/// Whether `readings` out of `expected` reach `min_share`.
pub fn is_complete(readings: f64, expected: f64, min_share: f64) -> bool {
    readings >= min_share * expected
}

/// Which data-quality function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QualityKind {
    /// `reading_valid(quantity, value)`.
    RangeValid,
    /// `complete(readings, expected [, min_share])`.
    Complete,
}

/// Data-quality checks.
///
/// `reading_valid(quantity, value)` is true when a reading is physically possible (the ranges
/// of [`PHYSICAL_RANGES`]: no negative concentration, speeds up to 200 km/h, occupancy up to
/// 100 %, …), false when it is not or is NaN, null when the value is null. The quantities are
/// the input columns' names: `pm25`, `pm10`, `no2`, `so2`, `co`, `o3`, `temperature_c`,
/// `humidity_pct`, `speed_kmh`, `occupancy_pct`, `volume`, `confidence`.
///
/// `complete(readings, expected [, min_share])` is true when a window has at least
/// `min_share` (default 0.75) of its expected readings.
///
/// ```sql
/// SELECT reading_valid('pm25', -3), reading_valid('occupancy_pct', 42), complete(44, 60),
///        complete(46, 60);
/// -- false, true, false, true
/// SELECT avg(pm25) FILTER (WHERE reading_valid('pm25', pm25)) … ;
/// ```
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct QualityFunc {
    kind: QualityKind,
    signature: Signature,
}

impl QualityFunc {
    /// The function of `kind`.
    pub fn new(kind: QualityKind) -> Self {
        Self {
            kind,
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for QualityFunc {
    fn name(&self) -> &str {
        match self.kind {
            QualityKind::RangeValid => "reading_valid",
            QualityKind::Complete => "complete",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, args: &[DataType]) -> Result<Vec<DataType>> {
        match (self.kind, args.len()) {
            (QualityKind::RangeValid, 2) => Ok(vec![DataType::Utf8, DataType::Float64]),
            (QualityKind::RangeValid, n) => {
                plan_err!("reading_valid(quantity, value) takes 2 arguments, got {n}")
            }
            (QualityKind::Complete, n @ 2..=3) => Ok(vec![DataType::Float64; n]),
            (QualityKind::Complete, n) => plan_err!(
                "complete(readings, expected [, min_share]) takes 2 or 3 arguments, got {n}"
            ),
        }
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Boolean)
    }

    fn return_field_from_args(
        &self,
        args: datafusion::logical_expr::ReturnFieldArgs,
    ) -> Result<datafusion::arrow::datatypes::FieldRef> {
        if self.kind == QualityKind::RangeValid {
            let known: Vec<&str> = PHYSICAL_RANGES.iter().map(|r| r.0).collect();
            super::check_constant_text(
                "reading_valid",
                &args,
                0,
                |q| physical_range(q).is_some(),
                ("quantity", &format!("one of {}", known.join(", "))),
            )?;
        }
        Ok(std::sync::Arc::new(
            datafusion::arrow::datatypes::Field::new(self.name(), DataType::Boolean, true),
        ))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let n = args.number_rows;
        let mut out = Vec::with_capacity(n);
        match self.kind {
            QualityKind::RangeValid => {
                let arrays = ColumnarValue::values_to_arrays(&args.args)?;
                let q = cast(&arrays[0], &DataType::Utf8)?;
                let q = q.as_string::<i32>();
                let v = cast(&arrays[1], &DataType::Float64)?;
                let v = v.as_primitive::<Float64Type>();
                for r in 0..n {
                    if q.is_null(r) || v.is_null(r) {
                        out.push(None);
                        continue;
                    }
                    match physically_valid(q.value(r), v.value(r)) {
                        Some(ok) => out.push(Some(ok)),
                        None => {
                            let known: Vec<&str> = PHYSICAL_RANGES.iter().map(|r| r.0).collect();
                            return exec_err!(
                                "reading_valid(): unknown quantity '{}' (expected one of {})",
                                q.value(r),
                                known.join(", ")
                            );
                        }
                    }
                }
            }
            QualityKind::Complete => {
                let a = float_args("complete", &args)?;
                for r in 0..n {
                    let share = match a.get(2) {
                        Some(s) => value(s, r),
                        None => Some(DEFAULT_MIN_SHARE),
                    };
                    out.push(match (value(&a[0], r), value(&a[1], r), share) {
                        (Some(got), Some(exp), Some(s)) => {
                            if !(0.0..=1.0).contains(&s) {
                                return exec_err!(
                                    "complete(): min_share must be in [0, 1], got {s}"
                                );
                            }
                            Some(is_complete(got, exp, s))
                        }
                        _ => None,
                    });
                }
            }
        }
        Ok(ColumnarValue::Array(Arc::new(BooleanArray::from(out))))
    }
}
