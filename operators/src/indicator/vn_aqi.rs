//! `vn_aqi(pm25, pm10, o3, no2, so2, co)`.

use std::sync::Arc;

use datafusion::arrow::array::Int64Array;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::Result;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};

use super::{HOURLY, coerce_numbers, station_rows};

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
        let rows = station_rows(self.name(), &args, &HOURLY)?;
        let out: Int64Array = rows.into_iter().map(|r| r.map(|(aqi, _)| aqi)).collect();
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}
