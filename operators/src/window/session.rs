//! `session(ts, gap)`: per-key windows of activity separated by a gap.

use datafusion::arrow::datatypes::DataType;
use datafusion::common::Result;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};

use super::{coerce, only_in_stream_group_by, window_type};

/// `session(ts, gap)`: session windows per group key: events less than `gap` apart belong to
/// the same session, which closes when the watermark passes its last event plus `gap`.
///
/// ```sql
/// SELECT camera_id, window_start, window_end, count(*) AS events
/// FROM camera_events
/// GROUP BY session(event_time, INTERVAL '5 minutes'), camera_id;
/// ```
///
/// It can only be used in the `GROUP BY` of a stream query; as a plain scalar it is an error.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct SessionFunc {
    signature: Signature,
}

impl Default for SessionFunc {
    fn default() -> Self {
        Self {
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for SessionFunc {
    fn name(&self) -> &str {
        "session"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, args: &[DataType]) -> Result<Vec<DataType>> {
        coerce("session", args, 1)
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(window_type())
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        Err(only_in_stream_group_by("session"))
    }
}
