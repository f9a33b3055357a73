//! Traffic formulas as SQL functions: `density`, `v_c` and `flow_rate`.

use std::sync::Arc;

use datafusion::arrow::array::Float64Array;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::{Result, plan_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};

use super::nowcast::{as_of_type, as_of_values};
use super::traffic_table::{density, flow_per_hour, volume_capacity};
use super::{coerce_numbers, float_args, float_args_from, value};

/// Which traffic formula.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TrafficKind {
    /// `density(flow_pcu_h, space_mean_speed_kmh, lanes)`: PCU/km/lane.
    Density,
    /// `v_c(flow, capacity)`: volume over capacity, both per hour.
    VolumeCapacity,
    /// `flow_rate(volume, window_start, window_end)`: a window's count as a rate per hour.
    FlowRate,
}

/// Traffic formulas of INDICATORS.md §3. Null when an input is null, NaN or negative, or the
/// divisor is zero.
///
/// ```sql
/// SELECT density(3600, 30, 4), v_c(7480, 6800),
///        flow_rate(25, TIMESTAMP '2026-01-01 08:00:00', TIMESTAMP '2026-01-01 08:01:00');
/// -- 30.0 (PCU/km/ln), 1.1, 1500.0 (veh/h)
/// ```
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct TrafficFunc {
    kind: TrafficKind,
    signature: Signature,
}

impl TrafficFunc {
    /// The function of `kind`.
    pub fn new(kind: TrafficKind) -> Self {
        Self {
            kind,
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for TrafficFunc {
    fn name(&self) -> &str {
        match self.kind {
            TrafficKind::Density => "density",
            TrafficKind::VolumeCapacity => "v_c",
            TrafficKind::FlowRate => "flow_rate",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, args: &[DataType]) -> Result<Vec<DataType>> {
        match self.kind {
            TrafficKind::Density => coerce_numbers(
                "density",
                "flow_pcu_h, space_mean_speed_kmh, lanes",
                args,
                3,
            ),
            TrafficKind::VolumeCapacity => coerce_numbers("v_c", "flow, capacity", args, 2),
            TrafficKind::FlowRate => {
                if args.len() != 3 {
                    return plan_err!(
                        "flow_rate(volume, window_start, window_end) takes 3 arguments, got {}",
                        args.len()
                    );
                }
                coerce_numbers("flow_rate", "volume", &args[..1], 1)?;
                Ok(vec![
                    DataType::Float64,
                    as_of_type("flow_rate", &args[1])?,
                    as_of_type("flow_rate", &args[2])?,
                ])
            }
        }
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Float64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let n = args.number_rows;
        let out: Float64Array = match self.kind {
            TrafficKind::Density => {
                let a = float_args("density", &args)?;
                (0..n)
                    .map(
                        |r| match (value(&a[0], r), value(&a[1], r), value(&a[2], r)) {
                            (Some(f), Some(s), Some(l)) => density(f, s, l),
                            _ => None,
                        },
                    )
                    .collect()
            }
            TrafficKind::VolumeCapacity => {
                let a = float_args("v_c", &args)?;
                (0..n)
                    .map(|r| match (value(&a[0], r), value(&a[1], r)) {
                        (Some(f), Some(c)) => volume_capacity(f, c),
                        _ => None,
                    })
                    .collect()
            }
            TrafficKind::FlowRate => {
                let arrays = ColumnarValue::values_to_arrays(&args.args)?;
                let volume = float_args_from("flow_rate", &arrays[..1])?;
                let (start, end) = (as_of_values(&arrays[1])?, as_of_values(&arrays[2])?);
                (0..n)
                    .map(|r| match (value(&volume[0], r), start[r], end[r]) {
                        (Some(v), Some(s), Some(e)) => flow_per_hour(v, e - s),
                        _ => None,
                    })
                    .collect()
            }
        };
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}
