//! `los_urban(speed_kmh, free_flow_kmh [, v_c])`: level of service of an urban street.

use std::sync::Arc;

use datafusion::arrow::array::StringArray;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::{Result, plan_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};

use super::traffic_table::los_urban;
use super::{coerce_numbers, float_args, value};

/// `los_urban(speed_kmh, free_flow_kmh [, v_c])`: HCM urban-street level of service `A`–`F`
/// from travel speed as a share of base free-flow speed (A > 80 %, B > 67 %, C > 50 %,
/// D > 40 %, E > 30 %, F ≤ 30 %); a volume/capacity ratio above 1 forces F. Null for null,
/// negative or NaN inputs.
///
/// ```sql
/// SELECT los_urban(42, 50), los_urban(12, 50), los_urban(42, 50, 1.1);
/// -- A, F, F
/// ```
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct LosUrbanFunc {
    signature: Signature,
}

impl Default for LosUrbanFunc {
    fn default() -> Self {
        Self {
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for LosUrbanFunc {
    fn name(&self) -> &str {
        "los_urban"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, args: &[DataType]) -> Result<Vec<DataType>> {
        match args.len() {
            2 | 3 => coerce_numbers(
                "los_urban",
                "speed_kmh, free_flow_kmh [, v_c]",
                args,
                args.len(),
            ),
            n => plan_err!(
                "los_urban(speed_kmh, free_flow_kmh [, v_c]) takes 2 or 3 arguments, got {n}"
            ),
        }
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let a = float_args("los_urban", &args)?;
        let out: StringArray = (0..args.number_rows)
            .map(|r| {
                let v_c = a.get(2).and_then(|c| value(c, r));
                match (value(&a[0], r), value(&a[1], r)) {
                    (Some(s), Some(ff)) => los_urban(s, ff, v_c).map(String::from),
                    _ => None,
                }
            })
            .collect();
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}
