//! `ugm3_to_ppb(gas, concentration)` and `ppb_to_ugm3(gas, concentration)`.

use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, Float64Array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Float64Type};
use datafusion::common::{Result, exec_err, plan_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};

use super::us_aqi_table::{molecular_weight, ppb_to_ugm3, ugm3_to_ppb};

/// Converts a gas concentration between µg/m³ and ppb at 25 °C and 1 atm
/// (`ppb = µg/m³ × 24.45 / MW`; NO2 46.01, SO2 64.07, O3 48.00, CO 28.01 g/mol). Divide ppb by
/// 1000 for ppm (the unit of the US AQI's O3 and CO tables). `gas` is `no2`, `so2`, `o3` or
/// `co`; null for a null concentration.
///
/// ```sql
/// SELECT ugm3_to_ppb('no2', 188.18), ppb_to_ugm3('o3', 70) / 1000;
/// -- 100.0 (ppb), 0.137 (mg/m³)
/// ```
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct GasUnitFunc {
    to_ppb: bool,
    signature: Signature,
}

impl GasUnitFunc {
    /// `ugm3_to_ppb` when `to_ppb`, `ppb_to_ugm3` otherwise.
    pub fn new(to_ppb: bool) -> Self {
        Self {
            to_ppb,
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for GasUnitFunc {
    fn name(&self) -> &str {
        if self.to_ppb {
            "ugm3_to_ppb"
        } else {
            "ppb_to_ugm3"
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, args: &[DataType]) -> Result<Vec<DataType>> {
        if args.len() != 2 {
            return plan_err!(
                "{}(gas, concentration) takes 2 arguments, got {}",
                self.name(),
                args.len()
            );
        }
        Ok(vec![DataType::Utf8, DataType::Float64])
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Float64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let gas = cast(&arrays[0], &DataType::Utf8)?;
        let gas = gas.as_string::<i32>();
        let c = cast(&arrays[1], &DataType::Float64)?;
        let c = c.as_primitive::<Float64Type>();
        let mut out = Vec::with_capacity(args.number_rows);
        for r in 0..args.number_rows {
            if gas.is_null(r) || c.is_null(r) {
                out.push(None);
                continue;
            }
            let g = gas.value(r);
            if molecular_weight(g).is_none() {
                return exec_err!(
                    "{}(): unknown gas '{g}' (expected no2, so2, o3 or co)",
                    self.name()
                );
            }
            out.push(if self.to_ppb {
                ugm3_to_ppb(g, c.value(r))
            } else {
                ppb_to_ugm3(g, c.value(r))
            });
        }
        Ok(ColumnarValue::Array(Arc::new(Float64Array::from(out))))
    }
}
