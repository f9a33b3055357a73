//! `corr` computed from co-moments, under DataFusion's name.
//!
//! DataFusion's grouped `corr` adds up x, y, x², y² and xy and takes the differences at the
//! end: over values far from zero compared with their spread (counts around 10⁸ that differ
//! by units), the differences cancel to nothing and the result came out NULL (10⁸) or NaN
//! (10⁹), and off where it did not. Here each group keeps its count, means and co-moments,
//! updated one value at a time (Welford) and merged by Chan's formulas, which lose nothing
//! to the values' distance from zero. Signature, argument coercion, NULL and NaN results
//! are DataFusion's: NULL for fewer than two pairs or a constant side, NaN when both sides
//! hold a NaN or either an infinity, NULL when one side holds a NaN; a pair with a NULL is
//! left out. Pairs are not taken out
//! of a sliding frame (`corr(…) OVER (ROWS …)` is computed afresh per row): downdating the
//! moments lost five digits at 10¹⁰.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Float64Array, UInt64Array};
use datafusion::arrow::buffer::NullBuffer;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Float64Type, UInt64Type};
use datafusion::common::{Result, ScalarValue};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::utils::format_state_name;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, EmitTo, GroupsAccumulator, Signature, Volatility,
};
use datafusion::prelude::SessionContext;

/// Registers [`Corr`] over `ctx`'s `corr`.
pub fn stable_corr(ctx: &SessionContext) {
    ctx.register_udaf(AggregateUDF::from(Corr::default()));
}

/// Pearson's correlation of two columns from co-moments (see the module docs).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Corr {
    signature: Signature,
}

impl Default for Corr {
    fn default() -> Self {
        Self {
            signature: Signature::exact(
                vec![DataType::Float64, DataType::Float64],
                Volatility::Immutable,
            ),
        }
    }
}

impl AggregateUDFImpl for Corr {
    fn name(&self) -> &str {
        "corr"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Float64)
    }

    fn accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(CorrAccumulator::default()))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        let field = |part: &str, data_type: DataType| {
            Arc::new(Field::new(
                format_state_name(args.name, part),
                data_type,
                true,
            ))
        };
        // The count last: DataFusion's state (count, then five sums) has the same types in
        // another order, so a checkpoint of it is refused at restore by its layout rather
        // than read as means and co-moments.
        Ok(vec![
            field("mean_x", DataType::Float64),
            field("mean_y", DataType::Float64),
            field("m2_x", DataType::Float64),
            field("m2_y", DataType::Float64),
            field("c_xy", DataType::Float64),
            field("count", DataType::UInt64),
        ])
    }

    fn groups_accumulator_supported(&self, _args: AccumulatorArgs) -> bool {
        true
    }

    fn create_groups_accumulator(
        &self,
        _args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(CorrGroups::default()))
    }
}

/// One group's count, means and co-moments.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Moments {
    n: u64,
    mean_x: f64,
    mean_y: f64,
    m2_x: f64,
    m2_y: f64,
    c_xy: f64,
}

impl Moments {
    /// Folds in the pair (x, y).
    fn add(&mut self, x: f64, y: f64) {
        // An infinite value makes the correlation NaN whatever comes before or after it, as
        // DataFusion's sums make it (here ∞ − ∞ would give NULL or NaN by the pairs' order).
        if x.is_infinite() || y.is_infinite() {
            self.n += 1;
            self.mean_x = f64::NAN;
            self.mean_y = f64::NAN;
            return;
        }
        self.n += 1;
        let n = self.n as f64;
        let dx = x - self.mean_x;
        self.mean_x += dx / n;
        let dy = y - self.mean_y;
        self.mean_y += dy / n;
        self.m2_x += dx * (x - self.mean_x);
        self.m2_y += dy * (y - self.mean_y);
        self.c_xy += dx * (y - self.mean_y);
    }

    /// Folds in another group's moments (Chan et al.).
    fn merge(&mut self, other: &Moments) {
        if other.n == 0 {
            return;
        }
        if self.n == 0 {
            *self = *other;
            return;
        }
        let (a, b) = (self.n as f64, other.n as f64);
        let n = a + b;
        let dx = other.mean_x - self.mean_x;
        let dy = other.mean_y - self.mean_y;
        self.mean_x += dx * b / n;
        self.mean_y += dy * b / n;
        self.m2_x += other.m2_x + dx * dx * a * b / n;
        self.m2_y += other.m2_y + dy * dy * a * b / n;
        self.c_xy += other.c_xy + dx * dy * a * b / n;
        self.n += other.n;
    }

    /// The correlation, with DataFusion's NULL and NaN results.
    fn corr(&self) -> Option<f64> {
        if self.mean_x.is_nan() && self.mean_y.is_nan() {
            return Some(f64::NAN);
        }
        if self.n < 2 || self.mean_x.is_nan() || self.mean_y.is_nan() {
            return None;
        }
        if self.m2_x == 0.0 || self.m2_y == 0.0 {
            return None;
        }
        // Rounding may put a perfect correlation a hair outside [-1, 1].
        Some((self.c_xy / (self.m2_x.sqrt() * self.m2_y.sqrt())).clamp(-1.0, 1.0))
            .map(|r| if r.is_nan() { f64::NAN } else { r })
    }
}

/// The pairs of `values` (x, y) with neither NULL, and with `filter` (if any) true.
fn pairs<'a>(
    values: &'a [ArrayRef],
    filter: Option<&'a BooleanArray>,
) -> impl Iterator<Item = (usize, f64, f64)> + 'a {
    let x = values[0].as_primitive::<Float64Type>();
    let y = values[1].as_primitive::<Float64Type>();
    (0..x.len()).filter_map(move |i| {
        let kept =
            x.is_valid(i) && y.is_valid(i) && filter.is_none_or(|f| f.is_valid(i) && f.value(i));
        kept.then(|| (i, x.value(i), y.value(i)))
    })
}

/// Moments as the six state columns.
fn state_of(moments: &[Moments]) -> Vec<ArrayRef> {
    let column = |f: fn(&Moments) -> f64| -> ArrayRef {
        Arc::new(moments.iter().map(f).collect::<Float64Array>())
    };
    vec![
        column(|m| m.mean_x),
        column(|m| m.mean_y),
        column(|m| m.m2_x),
        column(|m| m.m2_y),
        column(|m| m.c_xy),
        Arc::new(moments.iter().map(|m| m.n).collect::<UInt64Array>()),
    ]
}

/// Row `i` of the six state columns.
fn moments_at(states: &[ArrayRef], i: usize) -> Option<Moments> {
    let count = states[5].as_primitive::<UInt64Type>();
    if count.is_null(i) {
        return None;
    }
    let f = |c: usize| states[c].as_primitive::<Float64Type>().value(i);
    Some(Moments {
        n: count.value(i),
        mean_x: f(0),
        mean_y: f(1),
        m2_x: f(2),
        m2_y: f(3),
        c_xy: f(4),
    })
}

/// `corr` over one group.
#[derive(Debug, Default)]
struct CorrAccumulator {
    moments: Moments,
}

impl Accumulator for CorrAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        for (_, x, y) in pairs(values, None) {
            self.moments.add(x, y);
        }
        Ok(())
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(ScalarValue::Float64(self.moments.corr()))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self)
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let m = self.moments;
        Ok(vec![
            ScalarValue::Float64(Some(m.mean_x)),
            ScalarValue::Float64(Some(m.mean_y)),
            ScalarValue::Float64(Some(m.m2_x)),
            ScalarValue::Float64(Some(m.m2_y)),
            ScalarValue::Float64(Some(m.c_xy)),
            ScalarValue::UInt64(Some(m.n)),
        ])
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        for i in 0..states[5].len() {
            if let Some(other) = moments_at(states, i) {
                self.moments.merge(&other);
            }
        }
        Ok(())
    }
}

/// `corr` over many groups.
#[derive(Debug, Default)]
struct CorrGroups {
    moments: Vec<Moments>,
}

impl GroupsAccumulator for CorrGroups {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        self.moments.resize(total_num_groups, Moments::default());
        for (i, x, y) in pairs(values, opt_filter) {
            self.moments[group_indices[i]].add(x, y);
        }
        Ok(())
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        let emitted = emit_to.take_needed(&mut self.moments);
        let values: Vec<Option<f64>> = emitted.iter().map(Moments::corr).collect();
        let nulls = NullBuffer::from(values.iter().map(Option::is_some).collect::<Vec<_>>());
        let values: Float64Array = values.iter().map(|v| v.unwrap_or(0.0)).collect();
        Ok(Arc::new(Float64Array::new(
            values.values().clone(),
            Some(nulls),
        )))
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        Ok(state_of(&emit_to.take_needed(&mut self.moments)))
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        self.moments.resize(total_num_groups, Moments::default());
        for (i, &group) in group_indices.iter().enumerate() {
            if let Some(other) = moments_at(values, i) {
                self.moments[group].merge(&other);
            }
        }
        Ok(())
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        let mut moments = vec![Moments::default(); values[0].len()];
        for (i, x, y) in pairs(values, opt_filter) {
            moments[i].add(x, y);
        }
        Ok(state_of(&moments))
    }

    fn size(&self) -> usize {
        self.moments.capacity() * std::mem::size_of::<Moments>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pearson's r of `pairs`, computed exactly in rationals is out of reach; in f64 from the
    /// centred values (two passes), which loses nothing to the values' offset.
    fn two_pass(pairs: &[(f64, f64)]) -> Option<f64> {
        let n = pairs.len() as f64;
        let (mx, my) = (
            pairs.iter().map(|p| p.0).sum::<f64>() / n,
            pairs.iter().map(|p| p.1).sum::<f64>() / n,
        );
        let (mut sxx, mut syy, mut sxy) = (0.0, 0.0, 0.0);
        for (x, y) in pairs {
            sxx += (x - mx) * (x - mx);
            syy += (y - my) * (y - my);
            sxy += (x - mx) * (y - my);
        }
        (pairs.len() >= 2 && sxx > 0.0 && syy > 0.0).then(|| sxy / (sxx * syy).sqrt())
    }

    /// Far from zero, in one group or merged from parts, the moments give the two-pass correlation: the sums DataFusion keeps gave NULL at 10⁸ and
    /// NaN at 10⁹ for 0.98271.
    #[test]
    fn the_correlation_of_values_far_from_zero_is_the_two_pass_one() {
        for offset in [0.0, 1e4, 1e8, 1e9, 1e12, -3e10] {
            let pairs: Vec<(f64, f64)> = [(1.0, 1.0), (2.0, 2.0), (3.0, 3.0), (5.0, 4.0)]
                .iter()
                .map(|(v, x)| (offset + v, *x))
                .collect();
            let mut one = Moments::default();
            for (x, y) in &pairs {
                one.add(*x, *y);
            }
            // 6.5 / √43.75.
            let want = 0.982_707_629_8;
            let got = one.corr().expect("a correlation");
            assert!((got - want).abs() < 1e-9, "{offset}: {got}");
            let exact = two_pass(&pairs).expect("two-pass");
            assert!(
                (got - exact).abs() < 1e-9,
                "{offset}: {got} against {exact}"
            );
            let (mut a, mut b) = (Moments::default(), Moments::default());
            for (i, (x, y)) in pairs.iter().enumerate() {
                if i % 2 == 0 {
                    a.add(*x, *y)
                } else {
                    b.add(*x, *y)
                }
            }
            a.merge(&b);
            let merged = a.corr().expect("merged");
            assert!((merged - want).abs() < 1e-9, "{offset}: merged {merged}");
        }
    }

    /// NULL for fewer than two pairs or a constant side; NaN when both sides hold a NaN,
    /// NULL when one does: DataFusion's results.
    #[test]
    fn nulls_and_nans_are_datafusions() {
        let of = |pairs: &[(f64, f64)]| {
            let mut m = Moments::default();
            for (x, y) in pairs {
                m.add(*x, *y);
            }
            m.corr()
        };
        assert_eq!(of(&[]), None);
        assert_eq!(of(&[(1.0, 2.0)]), None);
        assert_eq!(of(&[(1.0, 2.0), (1.0, 3.0)]), None);
        assert_eq!(of(&[(1.0, 2.0), (f64::NAN, 3.0)]), None);
        for pairs in [
            [(f64::INFINITY, 2.0), (1.0, 3.0), (2.0, 5.0)],
            [(1.0, 3.0), (2.0, 5.0), (f64::INFINITY, 2.0)],
            [(1.0, 3.0), (2.0, f64::NEG_INFINITY), (2.0, 5.0)],
        ] {
            assert!(of(&pairs).is_some_and(f64::is_nan), "{pairs:?}");
        }
        assert!(of(&[(f64::NAN, 2.0), (1.0, f64::NAN)]).is_some_and(f64::is_nan));
        assert!(of(&[(1.0, 2.0), (2.0, 4.0)]).is_some_and(|r| (r - 1.0).abs() < 1e-12));
        assert!(of(&[(1.0, 2.0), (2.0, 1.0)]).is_some_and(|r| (r + 1.0).abs() < 1e-12));
    }
}
