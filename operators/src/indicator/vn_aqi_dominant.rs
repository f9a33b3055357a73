//! `vn_aqi_dominant(pm25, pm10, o3, no2, so2, co)`.

use std::sync::Arc;

use datafusion::arrow::array::StringArray;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::Result;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};

use super::{DAILY, HOURLY, coerce_numbers, station_rows};

/// `vn_aqi_dominant(pm25, pm10, o3, no2, so2, co)`: the parameter whose sub-index is the
/// hourly VN_AQI (`pm25`, `pm10`, `o3_1h`, `no2`, `so2` or `co`), with the arguments of
/// `vn_aqi`; ties go to the earlier argument. Null when `vn_aqi` is null. With seven arguments,
/// those of `vn_aqi_daily`, the parameter of the daily AQI (`o3_8h` among them).
///
/// ```sql
/// SELECT vn_aqi_dominant(20.3, NULL, 136.1, 118.7, NULL, NULL);
/// -- no2
/// ```
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct VnAqiDominantFunc {
    signature: Signature,
}

impl Default for VnAqiDominantFunc {
    fn default() -> Self {
        Self {
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for VnAqiDominantFunc {
    fn name(&self) -> &str {
        "vn_aqi_dominant"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, args: &[DataType]) -> Result<Vec<DataType>> {
        if args.len() == DAILY.len() {
            return coerce_numbers(
                "vn_aqi_dominant",
                "pm25, pm10, o3_1h, o3_8h, no2, so2, co",
                args,
                DAILY.len(),
            );
        }
        coerce_numbers("vn_aqi_dominant", "pm25, pm10, o3, no2, so2, co", args, 6)
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let parameters: &[_] = if args.args.len() == DAILY.len() {
            &DAILY
        } else {
            &HOURLY
        };
        let rows = station_rows(self.name(), &args, parameters)?;
        let out: StringArray = rows.into_iter().map(|r| r.map(|(_, p)| p.name())).collect();
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}
