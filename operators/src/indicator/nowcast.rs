//! `nowcast(hours, as_of [, parameter])`: the NowCast of the 12 hours before `as_of`.

use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, Float64Array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, TimeUnit, TimestampMillisecondType};
use datafusion::common::{Result, exec_err, plan_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};

use super::hourly_means::{HOUR_MS, Hour, hours_of};

/// Hours a NowCast looks back over.
pub const HOURS: usize = 12;

/// The NowCast of hourly means `c[0] = c1` (the current hour) … `c[11] = c12`, `None` for a
/// missing hour (INDICATORS.md §1, the US EPA's algorithm):
/// `w* = c_min / c_max` over the present hours, `w = max(w*, 1/2)` when `floor_half` (PM; O3
/// has no floor), `NowCast = Σ w^(i−1)·c_i / Σ w^(i−1)` over the present hours. `None` unless
/// at least 2 of c1, c2, c3 are present. Negative or non-finite means count as missing.
pub fn nowcast(c: &[Option<f64>], floor_half: bool) -> Option<f64> {
    let valid = |x: &Option<f64>| x.filter(|v| v.is_finite() && *v >= 0.0);
    let recent = c.iter().take(3).filter(|x| valid(x).is_some()).count();
    if recent < 2 {
        return None;
    }
    let present: Vec<(usize, f64)> = c
        .iter()
        .take(HOURS)
        .enumerate()
        .filter_map(|(i, x)| valid(x).map(|v| (i, v)))
        .collect();
    let max = present.iter().map(|p| p.1).fold(f64::MIN, f64::max);
    let min = present.iter().map(|p| p.1).fold(f64::MAX, f64::min);
    let ratio = if max > 0.0 { min / max } else { 1.0 };
    let w = if floor_half { ratio.max(0.5) } else { ratio };
    let (mut num, mut den) = (0.0, 0.0);
    for (i, v) in present {
        let weight = w.powi(i as i32);
        num += weight * v;
        den += weight;
    }
    // With w = 0 (O3, a zero hour) only c1 has weight; when c1 is missing every weight is 0
    // and the most recent present hour stands for the current one.
    if den == 0.0 {
        return c.iter().take(3).find_map(valid);
    }
    Some(num / den)
}

/// The 12 complete hourly means before `as_of` (epoch ms), current hour first: hour `i` starts
/// at the start of the hour containing `as_of − 1 ms`, minus `i` hours. An `as_of` that is a
/// window's end thus makes the window's last hour the current one.
pub fn latest_hours(hours: &[Hour], as_of: i64) -> [Option<f64>; HOURS] {
    let current = (as_of - 1).div_euclid(HOUR_MS) * HOUR_MS;
    let mut c = [None; HOURS];
    for h in hours.iter().filter(|h| h.complete) {
        let back = (current - h.start).div_euclid(HOUR_MS);
        if (0..HOURS as i64).contains(&back) && h.start.rem_euclid(HOUR_MS) == 0 {
            c[back as usize] = Some(h.mean);
        }
    }
    c
}

/// `nowcast(hours, as_of [, parameter])`: the NowCast as of `as_of` from the result of
/// [`hourly_means`](super::hourly_means::HourlyMeansFunc), the current hour being the hour
/// that ends at `as_of` (pass `window_end`). Incomplete hours are dropped, as missing hours
/// are; null unless at least 2 of the latest 3 hours are present. `parameter` is `'pm25'`
/// (default) or `'pm10'` (weight floor 1/2), or `'o3'` (no floor, US EPA).
///
/// ```sql
/// SELECT sensor_id, window_end,
///        nowcast(hourly_means(pm25, event_time, 60), window_end) AS pm25_nowcast
/// FROM air_readings
/// GROUP BY hop(event_time, INTERVAL '1 hour', INTERVAL '12 hours'), sensor_id;
/// -- hourly means 26.9, 24.7, 20.5, 23.5, 19.5, 16.5, 19.0, 16.5, 20.3, 22.4, 19.6, 20.6
/// -- (09:00 … 20:00): NowCast 20.27 at 21:00, VN_AQI 41
/// ```
///
/// A hopping window of 12 hours sliding by 1 hour shares each hour's sums between its 12
/// windows; the window's end is known only when the window is evaluated, which is why the
/// aggregate (`hourly_means`) and the NowCast are two functions.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct NowcastFunc {
    signature: Signature,
}

impl Default for NowcastFunc {
    fn default() -> Self {
        Self {
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

const PARAMS: &str = "nowcast(hours, as_of [, parameter])";

impl ScalarUDFImpl for NowcastFunc {
    fn name(&self) -> &str {
        "nowcast"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, args: &[DataType]) -> Result<Vec<DataType>> {
        if !(2..=3).contains(&args.len()) {
            return plan_err!("{PARAMS} takes 2 or 3 arguments, got {}", args.len());
        }
        if !matches!(args[0], DataType::List(_) | DataType::Null) {
            return plan_err!(
                "{PARAMS}: hours must be the result of hourly_means(…), got {}",
                args[0]
            );
        }
        let mut out = vec![args[0].clone(), as_of_type("nowcast", &args[1])?];
        if args.len() == 3 {
            out.push(DataType::Utf8);
        }
        Ok(out)
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Float64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let n = args.number_rows;
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let hours = hours_of(&arrays[0])?;
        let as_of = as_of_values(&arrays[1])?;
        let params = match arrays.get(2) {
            Some(p) => Some(cast(p, &DataType::Utf8)?),
            None => None,
        };
        let params = params.as_ref().map(|p| p.as_string::<i32>());
        let mut out = Vec::with_capacity(n);
        for r in 0..n {
            let floor_half = match params {
                Some(p) if p.is_valid(r) => floor_for(p.value(r))?,
                _ => true,
            };
            out.push(match (&hours[r], as_of[r]) {
                (Some(h), Some(t)) => nowcast(&latest_hours(h, t), floor_half),
                _ => None,
            });
        }
        Ok(ColumnarValue::Array(Arc::new(Float64Array::from(out))))
    }
}

/// Whether NowCast of `parameter` floors the weight at 1/2.
fn floor_for(parameter: &str) -> Result<bool> {
    match parameter.to_ascii_lowercase().as_str() {
        "pm25" | "pm2.5" | "pm2_5" | "pm10" => Ok(true),
        "o3" => Ok(false),
        other => exec_err!("nowcast(): parameter must be 'pm25', 'pm10' or 'o3', got '{other}'"),
    }
}

/// The type an `as_of` argument is coerced to.
pub(crate) fn as_of_type(name: &str, t: &DataType) -> Result<DataType> {
    match t {
        DataType::Timestamp(_, tz) => Ok(DataType::Timestamp(TimeUnit::Millisecond, tz.clone())),
        DataType::Null => Ok(DataType::Timestamp(TimeUnit::Millisecond, None)),
        other => plan_err!("{name}(): as_of must be a timestamp (e.g. window_end), got {other}"),
    }
}

/// `as_of` values as epoch milliseconds.
pub(crate) fn as_of_values(a: &Arc<dyn Array>) -> Result<Vec<Option<i64>>> {
    let a = cast(a, &DataType::Timestamp(TimeUnit::Millisecond, None))?;
    let a = a.as_primitive::<TimestampMillisecondType>();
    Ok((0..a.len())
        .map(|r| a.is_valid(r).then(|| a.value(r)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::indicator::vn_aqi_table::{Pollutant, rounded, sub_index};

    /// The decision's example: hourly means 09:00 … 20:00, c1 = 20:00.
    const DECISION: [f64; 12] = [
        26.9, 24.7, 20.5, 23.5, 19.5, 16.5, 19.0, 16.5, 20.3, 22.4, 19.6, 20.6,
    ];

    fn latest_first(v: &[f64]) -> Vec<Option<f64>> {
        v.iter().rev().map(|x| Some(*x)).collect()
    }

    #[test]
    fn decision_worked_example() {
        let c = latest_first(&DECISION);
        let n = nowcast(&c, true).unwrap();
        // w* = 16.5 / 26.9 = 0.61; NowCast = 20.27, printed 20.3.
        assert_eq!((n * 10.0).round() / 10.0, 20.3);
        assert_eq!(rounded(sub_index(Pollutant::Pm25, 20.3).unwrap()), 41);
        assert_eq!(rounded(sub_index(Pollutant::Pm25, n).unwrap()), 41);
    }

    #[test]
    fn validity_needs_two_of_the_latest_three_hours() {
        let mut c = latest_first(&DECISION);
        c[0] = None;
        assert!(nowcast(&c, true).is_some(), "c2 and c3 present");
        c[1] = None;
        assert_eq!(nowcast(&c, true), None, "only c3 of the latest three");
        let mut c = latest_first(&DECISION);
        c[1] = None;
        c[2] = None;
        assert_eq!(nowcast(&c, true), None, "only c1 of the latest three");
        assert_eq!(nowcast(&[], true), None);
    }

    #[test]
    fn missing_hours_drop_from_both_sums() {
        // c1 = 10, c2 missing, c3 = 40: w* = 0.25, floored to 0.5; weights 1 and 0.25.
        let c = [Some(10.0), None, Some(40.0)];
        let n = nowcast(&c, true).unwrap();
        assert!((n - (10.0 + 0.25 * 40.0) / 1.25).abs() < 1e-12, "{n}");
        // Without the floor (O3) w = 0.25, weights 1 and 0.0625.
        let o3 = nowcast(&c, false).unwrap();
        assert!((o3 - (10.0 + 0.0625 * 40.0) / 1.0625).abs() < 1e-12, "{o3}");
    }

    #[test]
    fn steady_air_gives_its_level_and_bad_values_are_missing() {
        assert_eq!(nowcast(&[Some(35.0); 12], true), Some(35.0));
        assert_eq!(nowcast(&[Some(0.0); 12], true), Some(0.0));
        assert_eq!(nowcast(&[Some(0.0), Some(0.0), None], false), Some(0.0));
        let c = [Some(f64::NAN), Some(-5.0), Some(20.0)];
        assert_eq!(
            nowcast(&c, true),
            None,
            "NaN and negative hours are missing"
        );
        let c = [Some(f64::INFINITY), Some(20.0), Some(20.0)];
        assert_eq!(nowcast(&c, true), Some(20.0));
    }

    #[test]
    fn hours_are_placed_relative_to_as_of() {
        let h = |hour: i64, mean: f64, complete: bool| Hour {
            start: hour * HOUR_MS,
            mean,
            readings: 60,
            complete,
        };
        let hours = [
            h(9, 1.0, true),
            h(10, 2.0, false),
            h(20, 3.0, true),
            h(30, 4.0, true),
        ];
        let c = latest_hours(&hours, 21 * HOUR_MS);
        assert_eq!(c[0], Some(3.0), "the hour ending at as_of is c1");
        assert_eq!(c[10], None, "an incomplete hour is dropped");
        assert_eq!(c[11], Some(1.0), "09:00 is c12 at 21:00");
        assert_eq!(
            c.iter().flatten().count(),
            2,
            "hours after as_of are ignored"
        );
        // An as_of inside an hour makes that hour the current one.
        assert_eq!(latest_hours(&hours, 20 * HOUR_MS + 5)[0], Some(3.0));
    }
}
