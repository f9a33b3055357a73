//! `los_freeway(density_pc_km_ln [, v_c])`: level of service of a freeway or expressway.

use std::sync::Arc;

use datafusion::arrow::array::StringArray;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::{Result, plan_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};

use super::traffic_table::los_freeway;
use super::{coerce_numbers, float_args, value};

/// `los_freeway(density_pc_km_ln [, v_c])`: HCM freeway level of service `A`–`F` from density
/// in passenger cars per km per lane (A ≤ 6.8, B ≤ 11.2, C ≤ 16.2, D ≤ 21.7, E ≤ 28.0, F above);
/// a volume/capacity ratio above 1 forces F. Null for null, negative or NaN inputs.
///
/// ```sql
/// SELECT los_freeway(6.8), los_freeway(20), los_freeway(30);
/// -- A, D, F
/// ```
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct LosFreewayFunc {
    signature: Signature,
}

impl Default for LosFreewayFunc {
    fn default() -> Self {
        Self {
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for LosFreewayFunc {
    fn name(&self) -> &str {
        "los_freeway"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, args: &[DataType]) -> Result<Vec<DataType>> {
        match args.len() {
            1 | 2 => coerce_numbers("los_freeway", "density_pc_km_ln [, v_c]", args, args.len()),
            n => plan_err!("los_freeway(density_pc_km_ln [, v_c]) takes 1 or 2 arguments, got {n}"),
        }
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let a = float_args("los_freeway", &args)?;
        let out: StringArray = (0..args.number_rows)
            .map(|r| {
                let v_c = a.get(1).and_then(|c| value(c, r));
                value(&a[0], r)
                    .and_then(|d| los_freeway(d, v_c))
                    .map(String::from)
            })
            .collect();
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}
