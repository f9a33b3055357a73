//! Window functions for stream queries: `tumble`, `hop`, `session`, `cumulate`.
//!
//! They are written in a stream query's `GROUP BY`; the engine recognises them and assigns
//! events to windows itself (tumbling windows by `date_bin`, hopping and cumulating windows
//! through panes, sessions per key). As scalar functions each returns the window an event
//! belongs to as a struct `{window_start, window_end}` of millisecond timestamps. Only
//! `tumble` can be computed row by row (an event has exactly one tumbling window), so it also
//! works in plain DataFusion queries; the others fail outside a stream query's `GROUP BY`,
//! with a message that says so.

mod cumulate;
mod hop;
mod session;
mod tumble;

pub use cumulate::CumulateFunc;
pub use hop::HopFunc;
pub use session::SessionFunc;
pub use tumble::TumbleFunc;

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Fields, IntervalUnit, TimeUnit};
use datafusion::common::{Result, ScalarValue, exec_err, plan_err};
use datafusion::logical_expr::{ColumnarValue, ScalarFunctionArgs};

/// Names of the window functions.
pub const WINDOW_FUNCTIONS: [&str; 4] = ["tumble", "hop", "session", "cumulate"];

/// The kind of a stream window and its parameters, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WindowSpec {
    /// Fixed, non-overlapping windows of `width`.
    Tumble {
        /// Window width.
        width: i64,
        /// Shift of window starts from the Unix epoch, in `[0, width)`: with a width of one
        /// day, 17 hours makes days start at midnight in Vietnam (UTC+7).
        offset: i64,
    },
    /// Windows of `size` starting every `slide`.
    Hop {
        /// Distance between window starts.
        slide: i64,
        /// Window size.
        size: i64,
    },
    /// Per key, events closer than `gap` belong to one window.
    Session {
        /// Inactivity gap that ends a session.
        gap: i64,
    },
    /// Windows growing by `step` from the start of each `max`-sized period.
    Cumulate {
        /// Growth step.
        step: i64,
        /// Size of the period.
        max: i64,
    },
}

/// The longest window interval (size, slide, step, gap or offset): ten years. An event's
/// time plus or minus it stays far inside the range of a timestamp.
pub const MAX_INTERVAL_MS: i64 = 3_650 * 86_400_000;

/// The most windows one event may belong to (a hop's size over its slide, a cumulate's
/// maximum over its step): each is state of its own.
pub const MAX_WINDOWS_PER_EVENT: i64 = 10_000;

impl WindowSpec {
    /// Validates and builds a spec from a window function's name and interval arguments.
    pub fn new(name: &str, intervals: &[i64]) -> Result<Self> {
        // A tumble's offset moves its windows, earlier or later: it may be zero or negative
        // (`-50 s` is `+70 s` of two-minute windows).
        let sizes = match (name, intervals) {
            ("tumble", [width, _]) => std::slice::from_ref(width),
            _ => intervals,
        };
        if sizes.iter().any(|&i| i <= 0) {
            return plan_err!(
                "{name}(): window sizes, slides, steps and gaps must be at least one \
                 millisecond (a shorter one counts as zero)"
            );
        }
        if let Some((at, i)) = intervals
            .iter()
            .enumerate()
            .find(|(_, i)| i.unsigned_abs() > MAX_INTERVAL_MS as u64)
        {
            if name == "tumble" && at == 1 {
                return plan_err!(
                    "{name}(): an offset of {i} ms moves the windows by more than the ten \
                     years ({MAX_INTERVAL_MS} ms) a window interval may span: an offset \
                     counts within one window's size (of {} ms), so write one at most that",
                    intervals[0]
                );
            }
            return plan_err!(
                "{name}(): a window interval of {i} ms is longer than the ten years \
                 ({MAX_INTERVAL_MS} ms) a window may span"
            );
        }
        Ok(match (name, intervals) {
            ("tumble", [width]) => WindowSpec::Tumble {
                width: *width,
                offset: 0,
            },
            ("tumble", [width, offset]) => WindowSpec::Tumble {
                width: *width,
                offset: offset.rem_euclid(*width),
            },
            ("hop", [slide, size]) => {
                if size < slide {
                    return plan_err!(
                        "hop(): the size ({size} ms) must be at least the slide ({slide} ms)"
                    );
                }
                // Both at most ten years: no overflow.
                let windows = (size + slide - 1) / slide;
                if windows > MAX_WINDOWS_PER_EVENT {
                    return plan_err!(
                        "hop(): windows of {size} ms every {slide} ms put each event in \
                         {windows} windows, more than the {MAX_WINDOWS_PER_EVENT} one event \
                         may belong to: use a longer slide"
                    );
                }
                WindowSpec::Hop {
                    slide: *slide,
                    size: *size,
                }
            }
            ("session", [gap]) => WindowSpec::Session { gap: *gap },
            ("cumulate", [step, max]) => {
                if max % step != 0 {
                    return plan_err!(
                        "cumulate(): the maximum size ({max} ms) must be a multiple of the step ({step} ms)"
                    );
                }
                if max / step > MAX_WINDOWS_PER_EVENT {
                    return plan_err!(
                        "cumulate(): windows growing by {step} ms up to {max} ms put an event \
                         in up to {} windows, more than the {MAX_WINDOWS_PER_EVENT} one event \
                         may belong to: use a longer step",
                        max / step
                    );
                }
                WindowSpec::Cumulate {
                    step: *step,
                    max: *max,
                }
            }
            _ => {
                return plan_err!(
                    "{name}() takes an event-time column and {} interval(s)",
                    match name {
                        "hop" | "cumulate" => "2",
                        "tumble" => "1 or 2",
                        _ => "1",
                    }
                );
            }
        })
    }
}

/// The type every window function returns: `{window_start, window_end}`.
pub fn window_type() -> DataType {
    DataType::Struct(window_fields())
}

/// The fields of [`window_type`].
pub fn window_fields() -> Fields {
    let ts = DataType::Timestamp(TimeUnit::Millisecond, None);
    Fields::from(vec![
        Field::new("window_start", ts.clone(), false),
        Field::new("window_end", ts, false),
    ])
}

/// An interval literal as milliseconds. Month-based intervals have no fixed length and are
/// refused.
pub fn interval_ms(value: &ScalarValue) -> Result<i64> {
    match value {
        ScalarValue::IntervalMonthDayNano(Some(v)) if v.months == 0 => {
            Ok(v.days as i64 * 86_400_000 + v.nanoseconds / 1_000_000)
        }
        ScalarValue::IntervalDayTime(Some(v)) => {
            Ok(v.days as i64 * 86_400_000 + v.milliseconds as i64)
        }
        ScalarValue::IntervalYearMonth(_) | ScalarValue::IntervalMonthDayNano(Some(_)) => {
            plan_err!("window intervals must not use months or years (they have no fixed length)")
        }
        ScalarValue::DurationSecond(Some(v)) => Ok(v * 1000),
        ScalarValue::DurationMillisecond(Some(v)) => Ok(*v),
        ScalarValue::DurationMicrosecond(Some(v)) => Ok(v / 1000),
        ScalarValue::DurationNanosecond(Some(v)) => Ok(v / 1_000_000),
        other => plan_err!("expected an interval literal such as INTERVAL '1 minute', got {other}"),
    }
}

/// Argument types the window functions accept: a timestamp, then intervals.
pub(crate) fn coerce(name: &str, args: &[DataType], intervals: usize) -> Result<Vec<DataType>> {
    coerce_range(name, args, intervals, intervals)
}

/// [`coerce`] for a function taking `min` to `max` intervals.
pub(crate) fn coerce_range(
    name: &str,
    args: &[DataType],
    min: usize,
    max: usize,
) -> Result<Vec<DataType>> {
    if args.len() < 1 + min || args.len() > 1 + max {
        let intervals = if min == max {
            min.to_string()
        } else {
            format!("{min} or {max}")
        };
        return plan_err!(
            "{name}() takes an event-time column and {intervals} interval(s), got {} argument(s)",
            args.len()
        );
    }
    let ts = match &args[0] {
        DataType::Timestamp(_, tz) => DataType::Timestamp(TimeUnit::Millisecond, tz.clone()),
        DataType::Null => DataType::Timestamp(TimeUnit::Millisecond, None),
        other => return plan_err!("{name}(): the first argument must be a timestamp, got {other}"),
    };
    let mut out = vec![ts];
    for arg in &args[1..] {
        match arg {
            DataType::Interval(_) | DataType::Duration(_) => out.push(arg.clone()),
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
                out.push(DataType::Interval(IntervalUnit::MonthDayNano))
            }
            other => {
                return plan_err!(
                    "{name}(): window sizes must be intervals, got {other}: write the size with \
                     its unit, e.g. {name}(event_time, INTERVAL '1 minute')"
                );
            }
        }
    }
    Ok(out)
}

/// The interval arguments of a call, which must be constants.
pub(crate) fn scalar_intervals(name: &str, args: &ScalarFunctionArgs) -> Result<Vec<i64>> {
    args.args[1..]
        .iter()
        .map(|a| match a {
            ColumnarValue::Scalar(s) => interval_ms(s),
            ColumnarValue::Array(_) => exec_err!("{name}(): window sizes must be constants"),
        })
        .collect()
}

/// The error of a window function evaluated outside a stream query's `GROUP BY`.
pub(crate) fn only_in_stream_group_by(name: &str) -> datafusion::error::DataFusionError {
    datafusion::error::DataFusionError::Plan(format!(
        "{name}() assigns events to several windows and can only be used in the GROUP BY of a \
         stream query (registered with urbanstream); for a batch query use date_bin()"
    ))
}

/// Windows of `width` starting at `starts`, as a window struct column.
pub(crate) fn window_array(starts: Vec<i64>, width: i64) -> Result<ColumnarValue> {
    use datafusion::arrow::array::{ArrayRef, StructArray, TimestampMillisecondArray};
    let ends: Vec<i64> = starts.iter().map(|s| s + width).collect();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(TimestampMillisecondArray::from(starts)),
        Arc::new(TimestampMillisecondArray::from(ends)),
    ];
    Ok(ColumnarValue::Array(Arc::new(StructArray::try_new(
        window_fields(),
        columns,
        None,
    )?)))
}
