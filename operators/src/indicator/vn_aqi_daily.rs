//! `vn_aqi_daily(pm25_24h, pm10_24h, o3_1h_max, o3_8h_max, no2_1h_max, so2_1h_max, co_1h_max)`.

use std::sync::Arc;

use datafusion::arrow::array::Int64Array;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::Result;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};

use super::{DAILY, coerce_numbers, station_rows};

/// `vn_aqi_daily(pm25_24h, pm10_24h, o3_1h_max, o3_8h_max, no2_1h_max, so2_1h_max,
/// co_1h_max)`: the daily VN_AQI of a station: 24-hour means of PM2.5 and PM10; for O3 the
/// larger of the sub-indices of the day’s maximum 1-hour and maximum 8-hour means (an 8-hour
/// maximum above 400 µg/m³ has no sub-index, so the 1-hour one decides); the day’s maximum
/// 1-hour means of NO2, SO2 and CO. At least one of PM2.5 or PM10 is mandatory.
///
/// ```sql
/// SELECT vn_aqi_daily(55.7, NULL, 114.6, 89.3, 130.8, NULL, NULL);
/// -- 110 (PM2.5 110; O3 8h 45, O3 1h 36; NO2 65)
/// ```
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct VnAqiDailyFunc {
    signature: Signature,
}

impl Default for VnAqiDailyFunc {
    fn default() -> Self {
        Self {
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for VnAqiDailyFunc {
    fn name(&self) -> &str {
        "vn_aqi_daily"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, args: &[DataType]) -> Result<Vec<DataType>> {
        coerce_numbers(
            "vn_aqi_daily",
            "pm25_24h, pm10_24h, o3_1h_max, o3_8h_max, no2_1h_max, so2_1h_max, co_1h_max",
            args,
            7,
        )
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Int64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let rows = station_rows(self.name(), &args, &DAILY)?;
        let out: Int64Array = rows.into_iter().map(|r| r.map(|(aqi, _)| aqi)).collect();
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}
