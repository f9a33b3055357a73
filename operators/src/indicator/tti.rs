//! `tti(free_flow_kmh, space_mean_speed_kmh)`: Travel Time Index.

use std::sync::Arc;

use datafusion::arrow::array::Float64Array;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::Result;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};

use super::traffic_table::tti;
use super::{coerce_numbers, float_args, value};

/// `tti(free_flow_kmh, space_mean_speed_kmh)`: actual over free-flow travel time, which is
/// free-flow speed over space-mean speed, at least 1 (1.3: a 20-minute trip takes 26). Null
/// when the speed is not positive or an input is null, negative or NaN.
///
/// ```sql
/// SELECT tti(52, 40);
/// -- 1.3
/// ```
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct TtiFunc {
    signature: Signature,
}

impl Default for TtiFunc {
    fn default() -> Self {
        Self {
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for TtiFunc {
    fn name(&self) -> &str {
        "tti"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, args: &[DataType]) -> Result<Vec<DataType>> {
        coerce_numbers("tti", "free_flow_kmh, space_mean_speed_kmh", args, 2)
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Float64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let a = float_args("tti", &args)?;
        let out: Float64Array = (0..args.number_rows)
            .map(|r| match (value(&a[0], r), value(&a[1], r)) {
                (Some(ff), Some(s)) => tti(ff, s),
                _ => None,
            })
            .collect();
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}
