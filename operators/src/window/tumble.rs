//! `tumble(ts, size [, offset])`: fixed, non-overlapping event-time windows.

use datafusion::arrow::array::{Array, TimestampMillisecondArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, TimeUnit};
use datafusion::common::{Result, exec_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};

use super::{coerce_range, scalar_intervals, window_array, window_type};

/// `tumble(ts, size [, offset])`: the tumbling window of width `size` that contains `ts`, as
/// `{window_start, window_end}`. Windows are aligned to the Unix epoch shifted by `offset`
/// (default none): days in Vietnam (UTC+7) start at 17:00 UTC, so a local calendar day is
/// `tumble(event_time, INTERVAL '1 day', INTERVAL '17 hours')`.
///
/// In a stream query's `GROUP BY` it makes a tumbling-window aggregation whose
/// `window_start` and `window_end` can be selected:
///
/// ```sql
/// SELECT segment_id, window_start, window_end, count(*) AS vehicles
/// FROM camera_events
/// GROUP BY tumble(event_time, INTERVAL '1 minute'), segment_id;
/// ```
///
/// As a scalar: `SELECT tumble(TIMESTAMP '2026-01-01T06:00:42', INTERVAL '1 minute')` returns
/// `{window_start: 2026-01-01T06:00:00, window_end: 2026-01-01T06:01:00}`.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct TumbleFunc {
    signature: Signature,
}

impl Default for TumbleFunc {
    fn default() -> Self {
        Self {
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for TumbleFunc {
    fn name(&self) -> &str {
        "tumble"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, args: &[DataType]) -> Result<Vec<DataType>> {
        coerce_range("tumble", args, 1, 2)
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(window_type())
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let (width, offset) = match scalar_intervals("tumble", &args)?[..] {
            [width] => (width, 0),
            [width, offset] => (width, offset),
            _ => return exec_err!("tumble() takes one or two intervals"),
        };
        if width <= 0 {
            return exec_err!("tumble(): the window width must be positive");
        }
        let ts = args.args[0].to_array(args.number_rows)?;
        let ts = cast(&ts, &DataType::Timestamp(TimeUnit::Millisecond, None))?;
        let Some(ts) = ts.as_any().downcast_ref::<TimestampMillisecondArray>() else {
            return exec_err!("tumble(): the first argument must be a timestamp");
        };
        if ts.null_count() > 0 {
            return exec_err!("tumble(): the event time must not be null");
        }
        let starts = ts
            .values()
            .iter()
            .map(|t| (t - offset).div_euclid(width) * width + offset)
            .collect();
        window_array(starts, width)
    }
}
