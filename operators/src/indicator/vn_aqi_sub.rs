//! `vn_aqi_sub(parameter, concentration)`: one VN_AQI sub-index.

use std::sync::Arc;

use datafusion::arrow::array::{Array, Int64Array, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::{Result, exec_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};

use super::vn_aqi_table::{Pollutant, rounded, sub_index};

/// `vn_aqi_sub(parameter, concentration)`: the VN_AQI sub-index (Decision 1459/QĐ-TCMT) of a
/// concentration in µg/m³, rounded to an integer. `parameter` is one of `pm25`, `pm10`,
/// `o3_1h`, `o3_8h`, `no2`, `so2`, `co`; for hourly PM pass the NowCast. Above the last
/// breakpoint it is 500 (beyond the scale). Null for a null, negative or NaN concentration, and
/// for an O3 8-hour mean above 400 µg/m³ (which has no sub-index).
///
/// ```sql
/// SELECT vn_aqi_sub('pm25', 20.3), vn_aqi_sub('o3_1h', 136.1), vn_aqi_sub('no2', 118.7);
/// -- 41, 43, 59
/// ```
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct VnAqiSubFunc {
    signature: Signature,
}

impl Default for VnAqiSubFunc {
    fn default() -> Self {
        Self {
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for VnAqiSubFunc {
    fn name(&self) -> &str {
        "vn_aqi_sub"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, args: &[DataType]) -> Result<Vec<DataType>> {
        if args.len() != 2 {
            return datafusion::common::plan_err!(
                "vn_aqi_sub(parameter, concentration) takes 2 arguments, got {}",
                args.len()
            );
        }
        Ok(vec![DataType::Utf8, DataType::Float64])
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Int64)
    }

    fn return_field_from_args(
        &self,
        args: datafusion::logical_expr::ReturnFieldArgs,
    ) -> Result<datafusion::arrow::datatypes::FieldRef> {
        super::check_constant_text(
            "vn_aqi_sub",
            &args,
            0,
            |p| Pollutant::parse(p).is_some(),
            ("parameter", "pm25, pm10, o3_1h, o3_8h, no2, so2 or co"),
        )?;
        Ok(Arc::new(datafusion::arrow::datatypes::Field::new(
            self.name(),
            DataType::Int64,
            true,
        )))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let names = cast(&arrays[0], &DataType::Utf8)?;
        let values = cast(&arrays[1], &DataType::Float64)?;
        let (Some(names), Some(values)) = (
            names.as_any().downcast_ref::<StringArray>(),
            values
                .as_any()
                .downcast_ref::<datafusion::arrow::array::Float64Array>(),
        ) else {
            return exec_err!("vn_aqi_sub(): expected (text, number)");
        };
        let mut out = Vec::with_capacity(values.len());
        for r in 0..values.len() {
            if names.is_null(r) || values.is_null(r) {
                out.push(None);
                continue;
            }
            let Some(p) = Pollutant::parse(names.value(r)) else {
                return exec_err!(
                    "vn_aqi_sub(): unknown parameter '{}' (expected pm25, pm10, o3_1h, o3_8h, no2, so2 or co)",
                    names.value(r)
                );
            };
            out.push(sub_index(p, values.value(r)).map(rounded));
        }
        Ok(ColumnarValue::Array(Arc::new(Int64Array::from(out))))
    }
}
