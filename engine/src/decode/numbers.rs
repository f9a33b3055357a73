//! JSON numbers read exactly.
//!
//! arrow-json reads `2.5` in an integer field as 2, drops the decimal places a DECIMAL does
//! not keep, and reads a REAL beyond its range as infinity, all without an error. So integer
//! and decimal fields are carried through arrow-json as decimals with room for any fraction
//! a producer writes ([`carrier`]), and [`settle`] converts them to the field's type only
//! where that loses nothing; any other record is dead-lettered with the number and the reason.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, Decimal128Array, PrimitiveArray};
use datafusion::arrow::datatypes::{
    ArrowPrimitiveType, DataType, Decimal128Type, Decimal256Type, Float32Type, Float64Type,
    Int8Type, Int16Type, Int32Type, Int64Type, UInt8Type, UInt16Type, UInt32Type, UInt64Type, i256,
};

use crate::error::Result;

/// Decimal places an integer field's carrier keeps: a fraction finer than 10⁻¹⁸ is not seen.
const WHOLE_SCALE: i8 = 18;
/// 10^WHOLE_SCALE.
const WHOLE_UNIT: i128 = 1_000_000_000_000_000_000;
/// Decimal places a DECIMAL field's carrier keeps beyond the field's own.
const EXTRA_SCALE: i8 = 38;

/// The type a JSON field of type `t` is read as, if not `t` itself.
pub(crate) fn carrier(t: &DataType) -> Option<DataType> {
    match t {
        DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32
        | DataType::UInt64 => Some(DataType::Decimal128(38, WHOLE_SCALE)),
        // 38 integer digits less the field's scale hold any DECIMAL(p ≤ 38, s)'s.
        DataType::Decimal128(_, s) if (0..=38).contains(s) => {
            Some(DataType::Decimal256(76, s + EXTRA_SCALE))
        }
        _ => None,
    }
}

/// `column`, read by JSON for a field `name` of type `t`, as a column of type `t`. The
/// reason a value cannot be that goes into `reasons` (the first reason of a row wins; its
/// value is then null); returns whether any row got one.
pub(crate) fn settle(
    column: &ArrayRef,
    name: &str,
    t: &DataType,
    reasons: &mut [Option<String>],
) -> Result<(ArrayRef, bool)> {
    let mut bad = false;
    let mut fault = |slot: &mut Option<String>, why: String| {
        if slot.is_none() {
            *slot = Some(why);
            bad = true;
        }
    };
    let settled: ArrayRef = match (column.data_type(), t) {
        (DataType::Decimal128(_, WHOLE_SCALE), _) if carrier(t).is_some() => {
            let values = column.as_primitive::<Decimal128Type>();
            match t {
                DataType::Int8 => whole::<Int8Type>(values, name, t, reasons, &mut fault),
                DataType::Int16 => whole::<Int16Type>(values, name, t, reasons, &mut fault),
                DataType::Int32 => whole::<Int32Type>(values, name, t, reasons, &mut fault),
                DataType::Int64 => whole::<Int64Type>(values, name, t, reasons, &mut fault),
                DataType::UInt8 => whole::<UInt8Type>(values, name, t, reasons, &mut fault),
                DataType::UInt16 => whole::<UInt16Type>(values, name, t, reasons, &mut fault),
                DataType::UInt32 => whole::<UInt32Type>(values, name, t, reasons, &mut fault),
                DataType::UInt64 => whole::<UInt64Type>(values, name, t, reasons, &mut fault),
                _ => return Ok((column.clone(), false)),
            }
        }
        (DataType::Decimal256(_, carried), DataType::Decimal128(p, s)) => {
            let values = column.as_primitive::<Decimal256Type>();
            let unit = i256::from_i128(10).wrapping_pow((carried - s) as u32);
            let limit = i256::from_i128(10).wrapping_pow(u32::from(*p));
            let out: Decimal128Array = values
                .iter()
                .zip(reasons.iter_mut())
                .map(|(v, slot)| {
                    let v = v?;
                    let (q, r) = (v.wrapping_div(unit), v.wrapping_rem(unit));
                    if r != i256::ZERO {
                        fault(
                            slot,
                            format!(
                                "field {name}: {} has more decimal places than {t} keeps",
                                decimal_text(v.to_string(), *carried)
                            ),
                        );
                        None
                    } else if q >= limit || q <= limit.wrapping_neg() {
                        fault(
                            slot,
                            format!(
                                "field {name}: {} has more digits than {t} holds",
                                decimal_text(q.to_string(), *s)
                            ),
                        );
                        None
                    } else {
                        q.to_i128()
                    }
                })
                .collect();
            Arc::new(out.with_precision_and_scale(*p, *s)?)
        }
        (DataType::Float32, _) => {
            finite(
                column.as_primitive::<Float32Type>(),
                name,
                t,
                reasons,
                &mut fault,
            );
            column.clone()
        }
        (DataType::Float64, _) => {
            finite(
                column.as_primitive::<Float64Type>(),
                name,
                t,
                reasons,
                &mut fault,
            );
            column.clone()
        }
        _ => column.clone(),
    };
    Ok((settled, bad))
}

/// Whole numbers of `values` (scale [`WHOLE_SCALE`]) that `T` holds.
fn whole<T>(
    values: &Decimal128Array,
    name: &str,
    t: &DataType,
    reasons: &mut [Option<String>],
    fault: &mut impl FnMut(&mut Option<String>, String),
) -> ArrayRef
where
    T: ArrowPrimitiveType,
    T::Native: TryFrom<i128>,
{
    let out: PrimitiveArray<T> = values
        .iter()
        .zip(reasons.iter_mut())
        .map(|(v, slot)| {
            let v = v?;
            let (q, r) = split_whole(v);
            if r != 0 {
                let text = decimal_text(v.to_string(), WHOLE_SCALE);
                fault(
                    slot,
                    format!("field {name}: {text} is not a whole number, as {t} needs"),
                );
                return None;
            }
            match T::Native::try_from(q) {
                Ok(n) => Some(n),
                Err(_) => {
                    fault(
                        slot,
                        format!("field {name}: {q} is outside the range of {t}"),
                    );
                    None
                }
            }
        })
        .collect();
    Arc::new(out)
}

/// `v / 10¹⁸` and its remainder. Most integers of city records are small: their quotient is
/// found with 64-bit arithmetic (10¹⁸ = 2¹⁸·5¹⁸) instead of a 128-bit division.
fn split_whole(v: i128) -> (i128, i128) {
    const FIVES: u64 = 3_814_697_265_625; // 5¹⁸
    let magnitude = v.unsigned_abs();
    if magnitude & ((1 << 18) - 1) == 0
        && let Ok(shifted) = u64::try_from(magnitude >> 18)
    {
        let (q, r) = (shifted / FIVES, shifted % FIVES);
        let (q, r) = (i128::from(q), i128::from(r) << 18);
        return if v < 0 { (-q, -r) } else { (q, r) };
    }
    (v / WHOLE_UNIT, v % WHOLE_UNIT)
}

/// Marks the infinities and NaNs of `values`: JSON has none, so each came from a number beyond
/// the type's range or a string such as "NaN".
fn finite<T>(
    values: &PrimitiveArray<T>,
    name: &str,
    t: &DataType,
    reasons: &mut [Option<String>],
    fault: &mut impl FnMut(&mut Option<String>, String),
) where
    T: ArrowPrimitiveType,
    T::Native: Into<f64>,
{
    if values
        .values()
        .iter()
        .all(|v| Into::<f64>::into(*v).is_finite())
    {
        return;
    }
    for (r, slot) in reasons.iter_mut().enumerate() {
        if values.is_valid(r) && !Into::<f64>::into(values.value(r)).is_finite() {
            fault(
                slot,
                format!("field {name}: the number is not finite or beyond the range of {t}"),
            );
        }
    }
}

/// The digits of an unscaled decimal written with `scale` decimal places, without trailing
/// zeros: ("25" + 18 zeros, 18) → "2.5".
fn decimal_text(digits: String, scale: i8) -> String {
    let (sign, digits) = match digits.strip_prefix('-') {
        Some(rest) => ("-", rest),
        None => ("", digits.as_str()),
    };
    let scale = usize::try_from(scale).unwrap_or(0);
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (whole, fraction) = padded.split_at(padded.len() - scale);
    let fraction = fraction.trim_end_matches('0');
    if fraction.is_empty() {
        format!("{sign}{whole}")
    } else {
        format!("{sign}{whole}.{fraction}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotients_of_small_and_large_carried_integers_agree_with_division() {
        for n in [
            0i128,
            1,
            -1,
            7,
            4_800_000,
            -4_800_001,
            i128::from(i64::MAX),
            i128::from(u64::MAX),
            -i128::from(i64::MAX) - 1,
        ] {
            for frac in [0i128, 1, 5 * 10i128.pow(17), WHOLE_UNIT - 1, 1 << 18] {
                let v = n * WHOLE_UNIT + if n < 0 { -frac } else { frac };
                assert_eq!(
                    split_whole(v),
                    (v / WHOLE_UNIT, v % WHOLE_UNIT),
                    "{n} {frac}"
                );
            }
        }
    }

    #[test]
    fn decimal_texts_drop_trailing_zeros_only() {
        assert_eq!(decimal_text("25".to_string() + &"0".repeat(17), 18), "2.5");
        assert_eq!(decimal_text("-1".into(), 3), "-0.001");
        assert_eq!(decimal_text("1000".into(), 3), "1");
        assert_eq!(decimal_text("1010".into(), 2), "10.1");
        assert_eq!(decimal_text("0".into(), 0), "0");
    }
}
