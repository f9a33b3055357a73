//! `vn_aqi(pm25, pm10, o3, no2, so2, co)`.

use std::sync::Arc;

use datafusion::arrow::array::Int64Array;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::Result;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};

use super::vn_aqi_table::{Pollutant, overall};
use super::{coerce_numbers, float_args, value};

/// `vn_aqi(pm25, pm10, o3, no2, so2, co)`: the hourly VN_AQI of a station (Decision
/// 1459/QĐ-TCMT): the maximum of the rounded sub-indices, with the NowCast of PM2.5 and PM10
/// and the 1-hour means of O3, NO2, SO2 and CO (µg/m³). Any argument may be null; at least one
/// of PM2.5 or PM10 is mandatory, so without either the result is null.
///
/// ```sql
/// SELECT vn_aqi(20.3, NULL, 136.1, 118.7, NULL, NULL);
/// -- 59 (NO2; the decision prints 60, see vn_aqi_sub)
/// ```
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct VnAqiFunc {
    signature: Signature,
}

impl Default for VnAqiFunc {
    fn default() -> Self {
        Self {
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for VnAqiFunc {
    fn name(&self) -> &str {
        "vn_aqi"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, args: &[DataType]) -> Result<Vec<DataType>> {
        coerce_numbers("vn_aqi", "pm25, pm10, o3, no2, so2, co", args, 6)
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Int64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let a = float_args("vn_aqi", &args)?;
        let out: Int64Array = (0..args.number_rows)
            .map(|r| {
                let v = |i: usize| value(&a[i], r);
                overall(&[
                    (Pollutant::Pm25, v(0)),
                    (Pollutant::Pm10, v(1)),
                    (Pollutant::O3OneHour, v(2)),
                    (Pollutant::No2, v(3)),
                    (Pollutant::So2, v(4)),
                    (Pollutant::Co, v(5)),
                ])
                .map(|(aqi, _)| aqi)
            })
            .collect();
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}
