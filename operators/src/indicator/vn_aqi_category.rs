//! `vn_aqi_category(aqi [, language])` and its colour.

use std::sync::Arc;

use datafusion::arrow::array::{Array, Int64Array, StringArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::{Result, exec_err, plan_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};

use super::vn_aqi_table::category;

/// `vn_aqi_category(aqi [, language])`: the category of an AQI value as the decision names
/// it: `'vi'` (default: Tốt, Trung bình, Kém, Xấu, Rất xấu, Nguy hại), `'en'` (Good, Moderate,
/// Poor, Bad, Very bad, Hazardous) or `'rgb'` (the decision's colour as "R,G,B"). Values above
/// 500 are in the last category; null for null or negative values.
///
/// ```sql
/// SELECT vn_aqi_category(110), vn_aqi_category(110, 'en'), vn_aqi_category(110, 'rgb');
/// -- Kém, Poor, 255,126,0
/// ```
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct VnAqiCategoryFunc {
    signature: Signature,
}

impl Default for VnAqiCategoryFunc {
    fn default() -> Self {
        Self {
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for VnAqiCategoryFunc {
    fn name(&self) -> &str {
        "vn_aqi_category"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, args: &[DataType]) -> Result<Vec<DataType>> {
        match args.len() {
            1 => Ok(vec![DataType::Int64]),
            2 => Ok(vec![DataType::Int64, DataType::Utf8]),
            n => plan_err!("vn_aqi_category(aqi [, language]) takes 1 or 2 arguments, got {n}"),
        }
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Utf8)
    }

    fn return_field_from_args(
        &self,
        args: datafusion::logical_expr::ReturnFieldArgs,
    ) -> Result<datafusion::arrow::datatypes::FieldRef> {
        super::check_constant_text(
            "vn_aqi_category",
            &args,
            1,
            |l| matches!(l, "vi" | "en" | "rgb"),
            ("language", "'vi', 'en' or 'rgb'"),
        )?;
        Ok(Arc::new(datafusion::arrow::datatypes::Field::new(
            self.name(),
            DataType::Utf8,
            true,
        )))
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let aqi = cast(&arrays[0], &DataType::Int64)?;
        let Some(aqi) = aqi.as_any().downcast_ref::<Int64Array>() else {
            return exec_err!("vn_aqi_category(): the AQI must be a number");
        };
        let language = match arrays.get(1) {
            Some(l) => Some(cast(l, &DataType::Utf8)?),
            None => None,
        };
        let language = language
            .as_ref()
            .and_then(|l| l.as_any().downcast_ref::<StringArray>());
        let mut out = Vec::with_capacity(aqi.len());
        for r in 0..aqi.len() {
            let lang = language
                .filter(|l| !l.is_null(r))
                .map_or("vi", |l| l.value(r));
            let c = if aqi.is_null(r) {
                None
            } else {
                category(aqi.value(r))
            };
            out.push(match lang {
                "vi" => c.map(|c| c.vi),
                "en" => c.map(|c| c.en),
                "rgb" => c.map(|c| c.rgb),
                other => {
                    return exec_err!(
                        "vn_aqi_category(): unknown language '{other}' (expected 'vi', 'en' or 'rgb')"
                    );
                }
            });
        }
        Ok(ColumnarValue::Array(Arc::new(StringArray::from(out))))
    }
}
