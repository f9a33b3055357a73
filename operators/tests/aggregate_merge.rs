//! The merge check for every aggregate of the crate: merging the partial states of two halves
//! of the input gives what updating with the whole input gives. Streams rely on it: hopping
//! windows merge panes, checkpoints store states.

// Helpers below are test code too (clippy.toml allows unwrap in #[test] functions only).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, Float64Array, TimestampMillisecondArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::common::ScalarValue;
use datafusion::logical_expr::function::AccumulatorArgs;
use datafusion::logical_expr::{Accumulator, AggregateUDF};
use proptest::prelude::*;
use urbanstream_operators::aggregate_functions;
use urbanstream_operators::indicator::hourly_means::hours_of;

fn accumulator(f: &AggregateUDF) -> Box<dyn Accumulator> {
    let schema = Schema::empty();
    f.accumulator(AccumulatorArgs {
        return_field: Arc::new(Field::new("out", DataType::Float64, true)),
        schema: &schema,
        ignore_nulls: false,
        order_bys: &[],
        is_reversed: false,
        name: f.name(),
        is_distinct: false,
        exprs: &[],
        expr_fields: &[],
    })
    .unwrap()
}

/// The arguments of `f` for rows of (value, event time).
fn args(f: &AggregateUDF, rows: &[(Option<f64>, i64)]) -> Vec<ArrayRef> {
    let values: ArrayRef = Arc::new(Float64Array::from(
        rows.iter().map(|r| r.0).collect::<Vec<_>>(),
    ));
    match f.name() {
        "hourly_means" => vec![
            values,
            Arc::new(TimestampMillisecondArray::from(
                rows.iter().map(|r| r.1).collect::<Vec<_>>(),
            )),
            Arc::new(Float64Array::from(vec![Some(4.0); rows.len()])),
        ],
        _ => vec![values],
    }
}

fn partial(f: &AggregateUDF, rows: &[(Option<f64>, i64)]) -> Vec<ArrayRef> {
    let mut acc = accumulator(f);
    acc.update_batch(&args(f, rows)).unwrap();
    acc.state()
        .unwrap()
        .iter()
        .map(|s| s.to_array().unwrap())
        .collect()
}

/// Whether two results agree, floats up to summation order.
fn same(a: &ScalarValue, b: &ScalarValue) -> bool {
    match (a, b) {
        (ScalarValue::Float64(Some(x)), ScalarValue::Float64(Some(y))) => {
            (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0)
        }
        (ScalarValue::List(x), ScalarValue::List(y)) => {
            let hours = |l: &ArrayRef| {
                hours_of(l)
                    .unwrap()
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|h| (h.start, format!("{:.9e}", h.mean), h.readings, h.complete))
                    .collect::<Vec<_>>()
            };
            hours(&(x.clone() as ArrayRef)) == hours(&(y.clone() as ArrayRef))
        }
        _ => a == b,
    }
}

fn rows() -> impl Strategy<Value = Vec<(Option<f64>, i64)>> {
    let value = prop_oneof![
        8 => (0.0..300.0f64).prop_map(Some),
        1 => Just(None),
        1 => Just(Some(-1.0)),
        1 => Just(Some(f64::NAN)),
        1 => Just(Some(0.0)),
    ];
    proptest::collection::vec((value, 0i64..6 * 3_600_000), 0..60)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn merge_of_states_equals_update_of_all(a in rows(), b in rows()) {
        for f in aggregate_functions() {
            let mut whole = accumulator(&f);
            whole.update_batch(&args(&f, &a)).unwrap();
            whole.update_batch(&args(&f, &b)).unwrap();
            let expected = whole.evaluate().unwrap();

            let mut merged = accumulator(&f);
            merged.merge_batch(&partial(&f, &a)).unwrap();
            merged.merge_batch(&partial(&f, &b)).unwrap();
            let got = merged.evaluate().unwrap();
            prop_assert!(same(&got, &expected), "{}: merged {got:?}, updated {expected:?}", f.name());

            // A partially updated accumulator merging another's state.
            let mut mixed = accumulator(&f);
            mixed.update_batch(&args(&f, &a)).unwrap();
            mixed.merge_batch(&partial(&f, &b)).unwrap();
            let got = mixed.evaluate().unwrap();
            prop_assert!(same(&got, &expected), "{}: mixed {got:?}, updated {expected:?}", f.name());
        }
    }
}

#[test]
fn empty_inputs_evaluate_to_null_or_empty() {
    for f in aggregate_functions() {
        let mut acc = accumulator(&f);
        acc.update_batch(&args(&f, &[])).unwrap();
        let v = acc.evaluate().unwrap();
        match f.name() {
            "hourly_means" => {
                let ScalarValue::List(l) = v else {
                    panic!("hourly_means returns a list")
                };
                assert_eq!(l.value(0).len(), 0);
            }
            name => assert!(v.is_null(), "{name} of nothing is null, got {v:?}"),
        }
    }
}

#[test]
fn hourly_means_flags_incomplete_hours() {
    let f = aggregate_functions()
        .into_iter()
        .find(|f| f.name() == "hourly_means")
        .unwrap();
    let mut acc = accumulator(&f);
    // Expected 4 per hour: hour 0 has 3 (75 %: complete), hour 1 has 2 valid readings
    // (incomplete) and a negative one that does not count.
    let rows = [
        (Some(10.0), 0),
        (Some(20.0), 60_000),
        (Some(30.0), 120_000),
        (Some(5.0), 3_600_000),
        (Some(7.0), 3_700_000),
        (Some(-3.0), 3_800_000),
    ];
    acc.update_batch(&args(&f, &rows)).unwrap();
    let ScalarValue::List(l) = acc.evaluate().unwrap() else {
        panic!("a list")
    };
    let hours = hours_of(&(l as ArrayRef)).unwrap().remove(0).unwrap();
    assert_eq!(hours.len(), 2);
    assert_eq!(
        (hours[0].mean, hours[0].readings, hours[0].complete),
        (20.0, 3, true)
    );
    assert_eq!(
        (hours[1].mean, hours[1].readings, hours[1].complete),
        (6.0, 2, false)
    );
}
