//! Traffic aggregates: `space_mean_speed(speed_kmh)`, `pti(tti)`, `buffer_index(travel_time)`.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, Float64Array, ListArray};
use datafusion::arrow::buffer::OffsetBuffer;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Float64Type, Int64Type};
use datafusion::common::{Result, ScalarValue, exec_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{Accumulator, AggregateUDFImpl, Signature, Volatility};

use super::coerce_numbers;
use super::traffic_table::{buffer_index, pti};

/// Which traffic aggregate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TrafficAggKind {
    /// `space_mean_speed(speed_kmh)`: harmonic mean of positive spot speeds (the speed travel
    /// time and density need); stopped vehicles (0 km/h) have no travel time and are left out,
    /// as are nulls, NaN and negative speeds.
    SpaceMeanSpeed,
    /// `pti(tti)`: Planning Time Index, the 95th percentile (linear interpolation) of the TTIs
    /// of a reporting period, e.g. a day of 15-minute periods.
    Pti,
    /// `buffer_index(travel_time)`: (95th-percentile travel time − mean) / mean.
    BufferIndex,
}

/// Traffic aggregates of INDICATORS.md §3. Null over no valid value.
///
/// ```sql
/// SELECT segment_id, space_mean_speed(speed_kmh) FROM camera_events
/// GROUP BY tumble(event_time, INTERVAL '1 minute'), segment_id;
/// -- spot speeds 20, 30, 60 km/h: 30.0 (the arithmetic mean would say 36.7)
/// SELECT pti(tti) FROM (VALUES (1.0), (1.2), (1.5), (2.5)) t(tti);
/// -- 2.35
/// ```
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct TrafficAggFunc {
    kind: TrafficAggKind,
    signature: Signature,
}

impl TrafficAggFunc {
    /// The aggregate of `kind`.
    pub fn new(kind: TrafficAggKind) -> Self {
        Self {
            kind,
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl AggregateUDFImpl for TrafficAggFunc {
    fn name(&self) -> &str {
        match self.kind {
            TrafficAggKind::SpaceMeanSpeed => "space_mean_speed",
            TrafficAggKind::Pti => "pti",
            TrafficAggKind::BufferIndex => "buffer_index",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, args: &[DataType]) -> Result<Vec<DataType>> {
        let param = match self.kind {
            TrafficAggKind::SpaceMeanSpeed => "speed_kmh",
            TrafficAggKind::Pti => "tti",
            TrafficAggKind::BufferIndex => "travel_time",
        };
        coerce_numbers(self.name(), param, args, 1)
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Float64)
    }

    fn accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(match self.kind {
            TrafficAggKind::SpaceMeanSpeed => Box::new(HarmonicMean::default()),
            kind => Box::new(Percentiles {
                kind,
                values: Vec::new(),
            }),
        })
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        let name = |s: &str| format!("{}[{s}]", args.name);
        Ok(match self.kind {
            TrafficAggKind::SpaceMeanSpeed => vec![
                Arc::new(Field::new(name("count"), DataType::Int64, true)),
                Arc::new(Field::new(name("sum_inverse"), DataType::Float64, true)),
            ],
            _ => vec![Arc::new(Field::new(
                name("values"),
                DataType::List(Arc::new(Field::new("item", DataType::Float64, true))),
                true,
            ))],
        })
    }
}

/// Valid (finite, non-negative) values of a numeric argument.
fn valid_values(a: &ArrayRef) -> Result<Vec<f64>> {
    let a = cast(a, &DataType::Float64)?;
    let a = a.as_primitive::<Float64Type>();
    Ok(a.iter()
        .flatten()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .collect())
}

/// Count and sum of inverses of positive speeds.
#[derive(Debug, Default)]
struct HarmonicMean {
    count: i64,
    sum_inverse: f64,
}

impl Accumulator for HarmonicMean {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        for v in valid_values(&values[0])? {
            if v > 0.0 {
                self.count += 1;
                self.sum_inverse += 1.0 / v;
            }
        }
        Ok(())
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(ScalarValue::Float64(
            (self.count > 0).then(|| self.count as f64 / self.sum_inverse),
        ))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self)
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        Ok(vec![
            ScalarValue::Int64(Some(self.count)),
            ScalarValue::Float64(Some(self.sum_inverse)),
        ])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let c = cast(&states[0], &DataType::Int64)?;
        let s = cast(&states[1], &DataType::Float64)?;
        self.count += c.as_primitive::<Int64Type>().iter().flatten().sum::<i64>();
        self.sum_inverse += s
            .as_primitive::<Float64Type>()
            .iter()
            .flatten()
            .sum::<f64>();
        Ok(())
    }
}

/// Every valid value, for an exact percentile.
#[derive(Debug)]
struct Percentiles {
    kind: TrafficAggKind,
    values: Vec<f64>,
}

impl Accumulator for Percentiles {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        self.values.extend(valid_values(&values[0])?);
        Ok(())
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        let mut v = self.values.clone();
        Ok(ScalarValue::Float64(match self.kind {
            TrafficAggKind::Pti => pti(&mut v),
            _ => buffer_index(&mut v),
        }))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.values.capacity() * 8
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let values: ArrayRef = Arc::new(Float64Array::from(self.values.clone()));
        let field = Arc::new(Field::new("item", DataType::Float64, true));
        Ok(vec![ScalarValue::List(Arc::new(ListArray::new(
            field,
            OffsetBuffer::from_lengths([values.len()]),
            values,
            None,
        )))])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let Some(lists) = states[0].as_list_opt::<i32>() else {
            return exec_err!("{}: malformed state", self.kind_name());
        };
        for r in 0..lists.len() {
            if lists.is_valid(r) {
                self.values.extend(valid_values(&lists.value(r))?);
            }
        }
        Ok(())
    }
}

impl Percentiles {
    fn kind_name(&self) -> &'static str {
        match self.kind {
            TrafficAggKind::Pti => "pti",
            _ => "buffer_index",
        }
    }
}
