//! Functions over the result of `hourly_means`: `hour_at`, `hour_mean`, `hours_mean`,
//! `hours_max`, `hours_max_mean`, `hours_complete`. One implementation, one SQL name per kind.

use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, BooleanArray, Float64Array, Int64Array, StructArray, TimestampMillisecondArray,
};
use datafusion::arrow::buffer::NullBuffer;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::{Result, exec_err, plan_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};

use super::hourly_means::{DEFAULT_MIN_SHARE, HOUR_MS, Hour, hour_fields, hours_of};
use super::nowcast::{as_of_type, as_of_values};
use super::{float_args_from, value};

/// What an [`HoursFunc`] computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HoursKind {
    /// `hour_at(hours, as_of)`: the hour ending at `as_of`, as `{hour_start, mean, readings,
    /// complete}`; null when it has no readings.
    ///
    /// ```sql
    /// SELECT hour_at(hourly_means(o3, event_time, 60), window_end)['mean'] AS o3_1h …
    /// ```
    HourAt,
    /// `hour_mean(hours, as_of)`: the mean of the hour ending at `as_of` when that hour is
    /// complete, null otherwise (an incomplete hour does not count).
    HourMean,
    /// `hours_mean(hours)`: the mean of the complete hourly means (a daily PM mean is the
    /// mean of its hourly means); null when no hour is complete.
    Mean,
    /// `hours_max(hours)`: the largest complete hourly mean (the day's max 1-hour mean).
    Max,
    /// `hours_max_mean(hours, n)`: the largest mean of `n` consecutive clock hours within the
    /// list (the day's max 8-hour O3 mean with `n = 8`); a run counts when at least 75 % of
    /// its hours are complete, and its mean is over those hours.
    MaxMean,
    /// `hours_complete(hours)`: the number of complete hours (a daily mean is usually
    /// required to have at least 18).
    Complete,
}

impl HoursKind {
    fn name(self) -> &'static str {
        match self {
            HoursKind::HourAt => "hour_at",
            HoursKind::HourMean => "hour_mean",
            HoursKind::Mean => "hours_mean",
            HoursKind::Max => "hours_max",
            HoursKind::MaxMean => "hours_max_mean",
            HoursKind::Complete => "hours_complete",
        }
    }

    fn params(self) -> &'static str {
        match self {
            HoursKind::HourAt | HoursKind::HourMean => "hours, as_of",
            HoursKind::MaxMean => "hours, n",
            _ => "hours",
        }
    }
}

/// A function over the result of [`hourly_means`](super::hourly_means::HourlyMeansFunc); see
/// [`HoursKind`] for each one.
///
/// ```sql
/// SELECT hours_mean(h) AS pm25_24h, hours_max(h) AS max_1h, hours_max_mean(h, 8) AS max_8h,
///        hours_complete(h) AS hours
/// FROM (SELECT hourly_means(pm25, event_time, 60) AS h FROM air_readings);
/// ```
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct HoursFunc {
    kind: HoursKind,
    signature: Signature,
}

impl HoursFunc {
    /// The function of `kind`.
    pub fn new(kind: HoursKind) -> Self {
        Self {
            kind,
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for HoursFunc {
    fn name(&self) -> &str {
        self.kind.name()
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, args: &[DataType]) -> Result<Vec<DataType>> {
        let (name, params) = (self.kind.name(), self.kind.params());
        let n = params.split(", ").count();
        if args.len() != n {
            return plan_err!("{name}({params}) takes {n} argument(s), got {}", args.len());
        }
        if !matches!(args[0], DataType::List(_) | DataType::Null) {
            return plan_err!(
                "{name}({params}): hours must be the result of hourly_means(…), got {}",
                args[0]
            );
        }
        Ok(match self.kind {
            HoursKind::HourAt | HoursKind::HourMean => {
                vec![args[0].clone(), as_of_type(name, &args[1])?]
            }
            HoursKind::MaxMean => {
                if !(args[1].is_integer() || args[1].is_null()) {
                    return plan_err!("{name}({params}): n must be an integer, got {}", args[1]);
                }
                vec![args[0].clone(), DataType::Int64]
            }
            _ => vec![args[0].clone()],
        })
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(match self.kind {
            HoursKind::HourAt => DataType::Struct(hour_fields()),
            HoursKind::Complete => DataType::Int64,
            _ => DataType::Float64,
        })
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let n = args.number_rows;
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let hours = hours_of(&arrays[0])?;
        let complete = |h: &Option<Vec<Hour>>| -> Option<Vec<Hour>> {
            h.as_ref()
                .map(|h| h.iter().filter(|h| h.complete).copied().collect())
        };
        let at = |as_of: &[Option<i64>]| -> Vec<Option<Hour>> {
            (0..n)
                .map(|r| match (&hours[r], as_of[r]) {
                    (Some(h), Some(t)) => {
                        let start = (t - 1).div_euclid(HOUR_MS) * HOUR_MS;
                        h.iter().find(|h| h.start == start).copied()
                    }
                    _ => None,
                })
                .collect()
        };
        let out: ArrayRef = match self.kind {
            HoursKind::HourAt => hour_array(&at(&as_of_values(&arrays[1])?))?,
            HoursKind::HourMean => Arc::new(Float64Array::from_iter(
                at(&as_of_values(&arrays[1])?)
                    .into_iter()
                    .map(|h| h.filter(|h| h.complete).map(|h| h.mean)),
            )),
            HoursKind::Mean => Arc::new(Float64Array::from_iter((0..n).map(|r| {
                complete(&hours[r])
                    .filter(|h| !h.is_empty())
                    .map(|h| h.iter().map(|h| h.mean).sum::<f64>() / h.len() as f64)
            }))),
            HoursKind::Max => Arc::new(Float64Array::from_iter((0..n).map(|r| {
                complete(&hours[r]).and_then(|h| h.iter().map(|h| h.mean).reduce(f64::max))
            }))),
            HoursKind::Complete => Arc::new(Int64Array::from_iter(
                (0..n).map(|r| complete(&hours[r]).map(|h| h.len() as i64)),
            )),
            HoursKind::MaxMean => {
                let runs = float_args_from(self.kind.name(), &arrays[1..])?;
                let mut out = Vec::with_capacity(n);
                for (r, h) in hours.iter().enumerate() {
                    let run = match value(&runs[0], r) {
                        Some(k) if k >= 1.0 => k as i64,
                        Some(k) => {
                            return exec_err!("hours_max_mean(): n must be at least 1, got {k}");
                        }
                        None => {
                            out.push(None);
                            continue;
                        }
                    };
                    out.push(complete(h).and_then(|h| max_run_mean(&h, run)));
                }
                Arc::new(Float64Array::from(out))
            }
        };
        Ok(ColumnarValue::Array(out))
    }
}

/// The largest mean over runs of `run` consecutive clock hours starting at each present hour,
/// counting runs with at least 75 % of their hours present.
pub fn max_run_mean(hours: &[Hour], run: i64) -> Option<f64> {
    let needed = (DEFAULT_MIN_SHARE * run as f64).ceil() as usize;
    let first = hours.iter().map(|h| h.start).min()?;
    let last = hours.iter().map(|h| h.start).max()?;
    let mut best: Option<f64> = None;
    let mut start = first;
    while start <= last {
        let inside: Vec<f64> = hours
            .iter()
            .filter(|h| h.start >= start && h.start < start + run * HOUR_MS)
            .map(|h| h.mean)
            .collect();
        if inside.len() >= needed.max(1) {
            let m = inside.iter().sum::<f64>() / inside.len() as f64;
            best = Some(best.map_or(m, |b| b.max(m)));
        }
        start += HOUR_MS;
    }
    best
}

/// Hours as a struct array, null where `None`.
fn hour_array(hours: &[Option<Hour>]) -> Result<ArrayRef> {
    let get = |f: fn(&Hour) -> i64| hours.iter().map(move |h| h.as_ref().map_or(0, f));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(TimestampMillisecondArray::from_iter_values(get(|h| {
            h.start
        }))),
        Arc::new(Float64Array::from_iter_values(
            hours.iter().map(|h| h.map_or(0.0, |h| h.mean)),
        )),
        Arc::new(Int64Array::from_iter_values(get(|h| h.readings))),
        Arc::new(BooleanArray::from_iter(
            hours.iter().map(|h| Some(h.is_some_and(|h| h.complete))),
        )),
    ];
    let nulls = NullBuffer::from_iter(hours.iter().map(Option::is_some));
    Ok(Arc::new(StructArray::try_new(
        hour_fields(),
        columns,
        Some(nulls),
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hours(means: &[Option<f64>]) -> Vec<Hour> {
        means
            .iter()
            .enumerate()
            .filter_map(|(i, m)| {
                m.map(|mean| Hour {
                    start: i as i64 * HOUR_MS,
                    mean,
                    readings: 60,
                    complete: true,
                })
            })
            .collect()
    }

    #[test]
    fn max_eight_hour_mean_needs_six_of_eight_hours() {
        // 24 hours at 50 with an afternoon peak of 8 hours at 90 starting at 12:00.
        let mut day: Vec<Option<f64>> = vec![Some(50.0); 24];
        for h in day.iter_mut().skip(12).take(8) {
            *h = Some(90.0);
        }
        assert_eq!(max_run_mean(&hours(&day), 8), Some(90.0));
        // With 13:00–15:00 missing, runs over the peak have 5 of 8 hours and do not count;
        // the best that does is 14:00–22:00: 16:00–19:00 at 90 and 20:00–21:00 at 50.
        for h in day.iter_mut().skip(13).take(3) {
            *h = None;
        }
        let best = max_run_mean(&hours(&day), 8).unwrap();
        assert!(
            (best - (4.0 * 90.0 + 2.0 * 50.0) / 6.0).abs() < 1e-9,
            "{best}"
        );
        assert_eq!(
            max_run_mean(&hours(&[Some(1.0); 5]), 8),
            None,
            "5 hours in all"
        );
        assert_eq!(max_run_mean(&[], 8), None);
    }
}
