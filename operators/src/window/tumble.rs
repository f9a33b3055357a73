//! `tumble(ts, size)`: fixed, non-overlapping event-time windows.

use datafusion::arrow::array::{Array, TimestampMillisecondArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, TimeUnit};
use datafusion::common::{Result, exec_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};

use super::{coerce, scalar_intervals, window_array, window_type};

/// `tumble(ts, size)`: the tumbling window of width `size` that contains `ts`, aligned to the
/// Unix epoch, as `{window_start, window_end}`.
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
        coerce("tumble", args, 1)
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(window_type())
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let [width] = scalar_intervals("tumble", &args)?[..] else {
            return exec_err!("tumble() takes one interval");
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
            .map(|t| t.div_euclid(width) * width)
            .collect();
        window_array(starts, width)
    }
}
