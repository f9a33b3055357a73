//! `hourly_means(value, event_time [, expected_per_hour [, min_share]])`: the hourly means of a
//! window, each with its number of readings and its completeness flag.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Float64Array, Int64Array, ListArray, StructArray,
    TimestampMillisecondArray,
};
use datafusion::arrow::buffer::OffsetBuffer;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Fields, Float64Type, Int64Type};
use datafusion::arrow::datatypes::{TimeUnit, TimestampMillisecondType};
use datafusion::common::{Result, ScalarValue, exec_err, plan_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{Accumulator, AggregateUDFImpl, Signature, Volatility};

/// Milliseconds in an hour.
pub const HOUR_MS: i64 = 3_600_000;

/// Share of the expected readings an hour needs to count (INDICATORS.md §4), unless the call
/// says otherwise.
pub const DEFAULT_MIN_SHARE: f64 = 0.75;

/// One hour of a [`hourly_means`](HourlyMeansFunc) result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hour {
    /// Start of the hour, epoch milliseconds.
    pub start: i64,
    /// Mean of the hour's valid readings.
    pub mean: f64,
    /// Number of valid readings.
    pub readings: i64,
    /// Whether the hour had enough readings to count.
    pub complete: bool,
}

/// The fields of one hour in SQL: `hour_start`, `mean`, `readings`, `complete`.
pub fn hour_fields() -> Fields {
    Fields::from(vec![
        Field::new(
            "hour_start",
            DataType::Timestamp(TimeUnit::Millisecond, None),
            false,
        ),
        Field::new("mean", DataType::Float64, false),
        Field::new("readings", DataType::Int64, false),
        Field::new("complete", DataType::Boolean, false),
    ])
}

/// The SQL type of `hourly_means`: a list of hours in time order.
pub fn hours_type() -> DataType {
    DataType::List(Arc::new(Field::new(
        "item",
        DataType::Struct(hour_fields()),
        true,
    )))
}

/// The hours of each row of an array of type [`hours_type`] (`None` for a null row).
pub fn hours_of(array: &ArrayRef) -> Result<Vec<Option<Vec<Hour>>>> {
    let Some(list) = array.as_list_opt::<i32>() else {
        return exec_err!(
            "expected the result of hourly_means(…) (a list of hours), got {}",
            array.data_type()
        );
    };
    let Some(items) = list.values().as_struct_opt() else {
        return exec_err!("expected a list of hours, got {}", array.data_type());
    };
    let column = |name: &str| {
        items.column_by_name(name).cloned().ok_or_else(|| {
            datafusion::error::DataFusionError::Execution(format!(
                "a list of hours needs the field {name}"
            ))
        })
    };
    let starts = cast(
        &column("hour_start")?,
        &DataType::Timestamp(TimeUnit::Millisecond, None),
    )?;
    let starts = starts.as_primitive::<TimestampMillisecondType>();
    let means = cast(&column("mean")?, &DataType::Float64)?;
    let means = means.as_primitive::<Float64Type>();
    let readings = cast(&column("readings")?, &DataType::Int64)?;
    let readings = readings.as_primitive::<Int64Type>();
    let complete = cast(&column("complete")?, &DataType::Boolean)?;
    let complete = complete.as_boolean();
    let offsets = list.value_offsets();
    Ok((0..list.len())
        .map(|r| {
            if list.is_null(r) {
                return None;
            }
            let range = offsets[r] as usize..offsets[r + 1] as usize;
            Some(
                range
                    .filter(|&i| !items.is_null(i) && !starts.is_null(i) && !means.is_null(i))
                    .map(|i| Hour {
                        start: starts.value(i),
                        mean: means.value(i),
                        readings: if readings.is_null(i) {
                            0
                        } else {
                            readings.value(i)
                        },
                        complete: !complete.is_null(i) && complete.value(i),
                    })
                    .collect(),
            )
        })
        .collect())
}

/// `hourly_means(value, event_time [, expected_per_hour [, min_share]])`: an aggregate whose
/// result is the list of the window's clock hours (UTC-aligned, which is also local-hour
/// aligned in Vietnam, UTC+7), each as `{hour_start, mean, readings, complete}`. Null, NaN and
/// negative readings are not valid and are not counted. An hour is `complete` when it has at
/// least `min_share` (default 0.75) of `expected_per_hour` valid readings (INDICATORS.md §4);
/// without `expected_per_hour` every hour with a reading is complete.
///
/// It is the input of [`nowcast`](super::nowcast::NowcastFunc) and of the `hours_*` functions,
/// which read the list as of the window's end:
///
/// ```sql
/// SELECT sensor_id, window_end,
///        nowcast(hourly_means(pm25, event_time, 60), window_end) AS pm25_nowcast
/// FROM air_readings
/// GROUP BY hop(event_time, INTERVAL '1 hour', INTERVAL '12 hours'), sensor_id;
/// ```
///
/// Its state is per hour a sum and a count, so hopping windows share it through panes and
/// partial states merge exactly.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct HourlyMeansFunc {
    signature: Signature,
}

impl Default for HourlyMeansFunc {
    fn default() -> Self {
        Self {
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl AggregateUDFImpl for HourlyMeansFunc {
    fn name(&self) -> &str {
        "hourly_means"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, args: &[DataType]) -> Result<Vec<DataType>> {
        if !(2..=4).contains(&args.len()) {
            return plan_err!(
                "hourly_means(value, event_time [, expected_per_hour [, min_share]]) takes 2 to 4 arguments, got {}",
                args.len()
            );
        }
        let mut out = Vec::with_capacity(args.len());
        for (i, a) in args.iter().enumerate() {
            out.push(match (i, a) {
                (1, DataType::Timestamp(_, tz)) => {
                    DataType::Timestamp(TimeUnit::Millisecond, tz.clone())
                }
                (1, DataType::Null) => DataType::Timestamp(TimeUnit::Millisecond, None),
                (1, other) => {
                    return plan_err!(
                        "hourly_means(): event_time must be a timestamp, got {other}"
                    );
                }
                (_, a) if a.is_numeric() || a.is_null() => DataType::Float64,
                (_, other) => {
                    return plan_err!(
                        "hourly_means(): argument {} must be a number, got {other}",
                        i + 1
                    );
                }
            });
        }
        Ok(out)
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(hours_type())
    }

    fn accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(HourlyMeansAccumulator::default()))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        let list = |name: &str, t: DataType| {
            Arc::new(Field::new(
                format!("{}[{name}]", args.name),
                DataType::List(Arc::new(Field::new("item", t, true))),
                true,
            ))
        };
        Ok(vec![
            list("hours", DataType::Int64),
            list("sums", DataType::Float64),
            list("counts", DataType::Int64),
            Arc::new(Field::new(
                format!("{}[expected]", args.name),
                DataType::Float64,
                true,
            )),
            Arc::new(Field::new(
                format!("{}[min_share]", args.name),
                DataType::Float64,
                true,
            )),
        ])
    }
}

/// Per hour a sum and a count of valid readings, and the completeness parameters last seen.
#[derive(Debug, Default)]
pub struct HourlyMeansAccumulator {
    hours: BTreeMap<i64, (f64, i64)>,
    expected: Option<f64>,
    min_share: Option<f64>,
}

impl HourlyMeansAccumulator {
    /// The hours so far.
    pub fn hours(&self) -> Vec<Hour> {
        let min_share = self.min_share.unwrap_or(DEFAULT_MIN_SHARE);
        self.hours
            .iter()
            .map(|(&start, &(sum, count))| Hour {
                start,
                mean: sum / count as f64,
                readings: count,
                complete: match self.expected {
                    Some(e) => count as f64 >= min_share * e,
                    None => true,
                },
            })
            .collect()
    }

    fn set_parameters(&mut self, expected: Option<f64>, min_share: Option<f64>) -> Result<()> {
        if let Some(e) = expected {
            if !(e.is_finite() && e > 0.0) {
                return exec_err!("hourly_means(): expected_per_hour must be positive, got {e}");
            }
            self.expected = Some(e);
        }
        if let Some(s) = min_share {
            if !(0.0..=1.0).contains(&s) {
                return exec_err!("hourly_means(): min_share must be in [0, 1], got {s}");
            }
            self.min_share = Some(s);
        }
        Ok(())
    }
}

/// Last non-null value of an optional `Float64` argument.
fn last_value(args: &[ArrayRef], i: usize) -> Result<Option<f64>> {
    let Some(a) = args.get(i) else {
        return Ok(None);
    };
    let a = cast(a, &DataType::Float64)?;
    let a = a.as_primitive::<Float64Type>();
    Ok((0..a.len())
        .rev()
        .find(|&r| a.is_valid(r))
        .map(|r| a.value(r)))
}

/// A one-row list scalar holding `values`.
fn list_scalar(values: ArrayRef) -> ScalarValue {
    let n = values.len();
    let field = Arc::new(Field::new("item", values.data_type().clone(), true));
    ScalarValue::List(Arc::new(ListArray::new(
        field,
        OffsetBuffer::from_lengths([n]),
        values,
        None,
    )))
}

impl Accumulator for HourlyMeansAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let v = cast(&values[0], &DataType::Float64)?;
        let v = v.as_primitive::<Float64Type>();
        let t = cast(
            &values[1],
            &DataType::Timestamp(TimeUnit::Millisecond, None),
        )?;
        let t = t.as_primitive::<TimestampMillisecondType>();
        for r in 0..v.len() {
            if v.is_null(r) || t.is_null(r) {
                continue;
            }
            let x = v.value(r);
            if !(x.is_finite() && x >= 0.0) {
                continue;
            }
            let hour = t.value(r).div_euclid(HOUR_MS) * HOUR_MS;
            let e = self.hours.entry(hour).or_insert((0.0, 0));
            e.0 += x;
            e.1 += 1;
        }
        self.set_parameters(last_value(values, 2)?, last_value(values, 3)?)
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        let hours = self.hours();
        let columns: Vec<ArrayRef> = vec![
            Arc::new(TimestampMillisecondArray::from_iter_values(
                hours.iter().map(|h| h.start),
            )),
            Arc::new(Float64Array::from_iter_values(hours.iter().map(|h| h.mean))),
            Arc::new(Int64Array::from_iter_values(
                hours.iter().map(|h| h.readings),
            )),
            Arc::new(BooleanArray::from_iter(
                hours.iter().map(|h| Some(h.complete)),
            )),
        ];
        let items = StructArray::try_new(hour_fields(), columns, None)?;
        Ok(list_scalar(Arc::new(items)))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.hours.len() * 40
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        Ok(vec![
            list_scalar(Arc::new(Int64Array::from_iter_values(
                self.hours.keys().copied(),
            ))),
            list_scalar(Arc::new(Float64Array::from_iter_values(
                self.hours.values().map(|v| v.0),
            ))),
            list_scalar(Arc::new(Int64Array::from_iter_values(
                self.hours.values().map(|v| v.1),
            ))),
            ScalarValue::Float64(self.expected),
            ScalarValue::Float64(self.min_share),
        ])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        if states.len() != 5 {
            return exec_err!(
                "hourly_means(): expected 5 state columns, got {}",
                states.len()
            );
        }
        let (Some(hours), Some(sums), Some(counts)) = (
            states[0].as_list_opt::<i32>(),
            states[1].as_list_opt::<i32>(),
            states[2].as_list_opt::<i32>(),
        ) else {
            return exec_err!("hourly_means(): malformed state");
        };
        for r in 0..hours.len() {
            if hours.is_null(r) {
                continue;
            }
            let h = hours.value(r);
            let s = sums.value(r);
            let c = counts.value(r);
            let h = h.as_primitive::<Int64Type>();
            let s = s.as_primitive::<Float64Type>();
            let c = c.as_primitive::<Int64Type>();
            if h.len() != s.len() || h.len() != c.len() {
                return exec_err!("hourly_means(): malformed state (lengths differ)");
            }
            for i in 0..h.len() {
                let e = self.hours.entry(h.value(i)).or_insert((0.0, 0));
                e.0 += s.value(i);
                e.1 += c.value(i);
            }
        }
        self.set_parameters(last_value(states, 3)?, last_value(states, 4)?)
    }
}
