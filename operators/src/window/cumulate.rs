//! `cumulate(ts, step, max)`: windows growing by `step` within each period of `max`.

use datafusion::arrow::datatypes::DataType;
use datafusion::common::Result;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};

use super::{coerce, only_in_stream_group_by, window_type};

/// `cumulate(ts, step, max)`: cumulating windows: within each period of `max` (aligned to the
/// epoch), windows `[period_start, period_start + k·step)` for k = 1 … max/step, so a daily
/// total can be reported every hour.
///
/// ```sql
/// SELECT segment_id, window_start, window_end, count(*) AS vehicles_so_far
/// FROM camera_events
/// GROUP BY cumulate(event_time, INTERVAL '1 hour', INTERVAL '1 day'), segment_id;
/// ```
///
/// It can only be used in the `GROUP BY` of a stream query; as a plain scalar it is an error.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct CumulateFunc {
    signature: Signature,
}

impl Default for CumulateFunc {
    fn default() -> Self {
        Self {
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for CumulateFunc {
    fn name(&self) -> &str {
        "cumulate"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, args: &[DataType]) -> Result<Vec<DataType>> {
        coerce("cumulate", args, 2)
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(window_type())
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        Err(only_in_stream_group_by("cumulate"))
    }
}
