//! `hop(ts, slide, size)`: windows of `size` starting every `slide` (sliding windows).

use datafusion::arrow::datatypes::DataType;
use datafusion::common::Result;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};

use super::{coerce, only_in_stream_group_by, window_type};

/// `hop(ts, slide, size)`: hopping (sliding) event-time windows of `size`, one starting every
/// `slide`. An event belongs to `size / slide` windows; the engine keeps one partial aggregate
/// per pane of `gcd(slide, size)` and merges panes when a window closes.
///
/// ```sql
/// SELECT ward_id, window_start, window_end, avg(pm25) AS pm25
/// FROM air_readings
/// GROUP BY hop(event_time, INTERVAL '1 hour', INTERVAL '12 hours'), ward_id;
/// ```
///
/// It can only be used in the `GROUP BY` of a stream query; as a plain scalar it is an error.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct HopFunc {
    signature: Signature,
}

impl Default for HopFunc {
    fn default() -> Self {
        Self {
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for HopFunc {
    fn name(&self) -> &str {
        "hop"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, args: &[DataType]) -> Result<Vec<DataType>> {
        coerce("hop", args, 2)
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(window_type())
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        Err(only_in_stream_group_by("hop"))
    }
}
