//! US EPA AQI as SQL functions: `us_aqi_sub(parameter, concentration)`,
//! `us_aqi(pm25, pm10, o3_8h, o3_1h, co, so2, no2)` and `us_aqi_category(aqi [, what])`.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, Int64Array, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Float64Type, Int64Type};
use datafusion::common::{Result, exec_err, plan_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};

use super::us_aqi_table::{UsPollutant, us_category, us_sub_index};
use super::{coerce_numbers, float_args, value};

/// Which US AQI function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UsAqiKind {
    /// `us_aqi_sub(parameter, concentration)`: one parameter's index.
    Sub,
    /// `us_aqi(pm25, pm10, o3_8h, o3_1h, co, so2, no2)`: the largest index.
    Overall,
    /// `us_aqi_category(aqi [, what])`: the category name (`'name'`, default) or colour
    /// (`'rgb'`).
    Category,
}

/// US EPA AQI (PM2.5 table of 6 May 2024; INDICATORS.md §2). Concentrations are in the EPA's
/// units (PM µg/m³, O3 and CO ppm, SO2 and NO2 ppb; convert gases with `ugm3_to_ppb`), and are
/// truncated before indexing (O3 to 3 decimals, PM2.5 and CO to 1, PM10, SO2 and NO2 to
/// integers). Beyond the top of a table the index is 500. Null for null, negative or NaN
/// concentrations, an O3 1-hour mean below 0.125 ppm or an O3 8-hour mean above 0.200 ppm.
/// `us_aqi` is the largest sub-index of its non-null arguments.
///
/// ```sql
/// SELECT us_aqi_sub('pm25', 20.3), us_aqi_sub('o3_8h', 0.0709),
///        us_aqi(55.7, 80, NULL, NULL, NULL, NULL, 60), us_aqi_category(151);
/// -- 72, 100, 151, Unhealthy
/// ```
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct UsAqiFunc {
    kind: UsAqiKind,
    signature: Signature,
}

impl UsAqiFunc {
    /// The function of `kind`.
    pub fn new(kind: UsAqiKind) -> Self {
        Self {
            kind,
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

/// Argument order of `us_aqi`.
const OVERALL: [UsPollutant; 7] = UsPollutant::ALL;

impl ScalarUDFImpl for UsAqiFunc {
    fn name(&self) -> &str {
        match self.kind {
            UsAqiKind::Sub => "us_aqi_sub",
            UsAqiKind::Overall => "us_aqi",
            UsAqiKind::Category => "us_aqi_category",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, args: &[DataType]) -> Result<Vec<DataType>> {
        match self.kind {
            UsAqiKind::Sub if args.len() == 2 => Ok(vec![DataType::Utf8, DataType::Float64]),
            UsAqiKind::Sub => plan_err!(
                "us_aqi_sub(parameter, concentration) takes 2 arguments, got {}",
                args.len()
            ),
            UsAqiKind::Overall => coerce_numbers(
                "us_aqi",
                "pm25, pm10, o3_8h, o3_1h, co, so2, no2",
                args,
                OVERALL.len(),
            ),
            UsAqiKind::Category => match args.len() {
                1 => Ok(vec![DataType::Int64]),
                2 => Ok(vec![DataType::Int64, DataType::Utf8]),
                n => plan_err!("us_aqi_category(aqi [, what]) takes 1 or 2 arguments, got {n}"),
            },
        }
    }

    fn return_field_from_args(
        &self,
        args: datafusion::logical_expr::ReturnFieldArgs,
    ) -> Result<datafusion::arrow::datatypes::FieldRef> {
        match self.kind {
            UsAqiKind::Sub => super::check_constant_text(
                "us_aqi_sub",
                &args,
                0,
                |p| UsPollutant::parse(p).is_some(),
                ("parameter", "one of pm25, pm10, o3_8h, o3_1h, co, so2, no2"),
            )?,
            UsAqiKind::Category => super::check_constant_text(
                "us_aqi_category",
                &args,
                1,
                |w| matches!(w, "name" | "rgb"),
                ("output", "'name' or 'rgb'"),
            )?,
            UsAqiKind::Overall => {}
        }
        Ok(std::sync::Arc::new(
            datafusion::arrow::datatypes::Field::new(self.name(), self.return_type(&[])?, true),
        ))
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(match self.kind {
            UsAqiKind::Category => DataType::Utf8,
            _ => DataType::Int64,
        })
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let n = args.number_rows;
        let out: ArrayRef = match self.kind {
            UsAqiKind::Sub => {
                let arrays = ColumnarValue::values_to_arrays(&args.args)?;
                let names = cast(&arrays[0], &DataType::Utf8)?;
                let names = names.as_string::<i32>();
                let c = cast(&arrays[1], &DataType::Float64)?;
                let c = c.as_primitive::<Float64Type>();
                let mut out = Vec::with_capacity(n);
                for r in 0..n {
                    if names.is_null(r) || c.is_null(r) {
                        out.push(None);
                        continue;
                    }
                    let Some(p) = UsPollutant::parse(names.value(r)) else {
                        return exec_err!(
                            "us_aqi_sub(): unknown parameter '{}' (expected one of pm25, pm10, o3_8h, o3_1h, co, so2, no2)",
                            names.value(r)
                        );
                    };
                    out.push(us_sub_index(p, c.value(r)));
                }
                Arc::new(Int64Array::from(out))
            }
            UsAqiKind::Overall => {
                let a = float_args("us_aqi", &args)?;
                Arc::new(Int64Array::from_iter((0..n).map(|r| {
                    OVERALL
                        .iter()
                        .zip(&a)
                        .filter_map(|(p, c)| value(c, r).and_then(|c| us_sub_index(*p, c)))
                        .max()
                })))
            }
            UsAqiKind::Category => {
                let arrays = ColumnarValue::values_to_arrays(&args.args)?;
                let aqi = cast(&arrays[0], &DataType::Int64)?;
                let aqi = aqi.as_primitive::<Int64Type>();
                let what = match arrays.get(1) {
                    Some(w) => Some(cast(w, &DataType::Utf8)?),
                    None => None,
                };
                let what = what.as_ref().map(|w| w.as_string::<i32>());
                let mut out = Vec::with_capacity(n);
                for r in 0..n {
                    let c = aqi.is_valid(r).then(|| us_category(aqi.value(r))).flatten();
                    let w = what
                        .filter(|w| w.is_valid(r))
                        .map_or("name", |w| w.value(r));
                    out.push(match w {
                        "name" => c.map(|c| c.name),
                        "rgb" => c.map(|c| c.rgb),
                        other => {
                            return exec_err!(
                                "us_aqi_category(): unknown '{other}' (expected 'name' or 'rgb')"
                            );
                        }
                    });
                }
                Arc::new(StringArray::from(out))
            }
        };
        Ok(ColumnarValue::Array(out))
    }
}
