//! `pcu(vehicle_class)`: passenger-car-unit factor of a vehicle class.

use std::sync::Arc;

use datafusion::arrow::array::{Array, Float64Array, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::{Result, exec_err, plan_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};

use super::traffic_table::pcu_factors;

/// `pcu(vehicle_class)`: the passenger-car-unit factor of a vehicle class (TCVN 4054:2005,
/// plain terrain, from `schemas/reference/pcu_factors.csv`): bicycle 0.2, motorbike 0.3, car
/// 1.0, bus and truck 2.0, large bus and heavy truck 2.5, articulated 4.0, other 1.0. Null for
/// a class not in the table. `sum(pcu(vehicle_class))` over a window is its PCU volume.
///
/// ```sql
/// SELECT pcu('motorbike'), pcu('car'), pcu('bus');
/// -- 0.3, 1.0, 2.0
/// ```
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct PcuFunc {
    signature: Signature,
    factors: Vec<(String, u64)>,
}

impl Default for PcuFunc {
    fn default() -> Self {
        Self {
            signature: Signature::user_defined(Volatility::Immutable),
            // f64 is not Hash: the table is kept as bits.
            factors: pcu_factors()
                .into_iter()
                .map(|(c, f)| (c, f.to_bits()))
                .collect(),
        }
    }
}

impl ScalarUDFImpl for PcuFunc {
    fn name(&self) -> &str {
        "pcu"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, args: &[DataType]) -> Result<Vec<DataType>> {
        if args.len() != 1 {
            return plan_err!("pcu(vehicle_class) takes 1 argument, got {}", args.len());
        }
        Ok(vec![DataType::Utf8])
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Float64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let classes = cast(&arrays[0], &DataType::Utf8)?;
        let Some(classes) = classes.as_any().downcast_ref::<StringArray>() else {
            return exec_err!("pcu(): the vehicle class must be text");
        };
        let out: Float64Array = (0..classes.len())
            .map(|r| {
                if classes.is_null(r) {
                    return None;
                }
                let class = classes.value(r);
                self.factors
                    .iter()
                    .find(|(c, _)| c == class)
                    .map(|(_, bits)| f64::from_bits(*bits))
            })
            .collect();
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}
