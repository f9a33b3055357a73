use super::*;

const MIN: i64 = 60_000;

/// A deterministic noise in [-1, 1] (no RNG dependency).
fn noise(i: usize) -> f64 {
    let x = (i as f64 * 12.9898).sin() * 43_758.545_3;
    2.0 * (x - x.floor()) - 1.0
}

fn flat(n: usize, level: f64, amplitude: f64) -> Vec<f64> {
    (0..n).map(|i| level + amplitude * noise(i)).collect()
}

fn run(state: &mut SeriesState, series: &[f64], every_ms: i64) -> Vec<Score> {
    series
        .iter()
        .enumerate()
        .map(|(i, x)| match state.step(i as i64 * every_ms, Some(*x)) {
            Emitted::Score(s) => s,
            other => panic!("not a score: {other:?}"),
        })
        .collect()
}

fn detectors() -> Vec<(&'static str, SeriesState)> {
    vec![
        ("ewma", SeriesState::Ewma(Ewma::new(0.1, 20))),
        ("mad", SeriesState::Mad(RollingMad::new(60, 10))),
        ("cusum", SeriesState::Cusum(Cusum::new(0.5, 0.02, 20))),
        (
            "seasonal",
            SeriesState::Seasonal(Seasonal::new(Season::Day, 15 * MIN, 0)),
        ),
        (
            "combined",
            SeriesState::Combined(Box::new(Combined::new(0))),
        ),
    ]
}

/// The detectors that know the time of day.
fn seasonal_detectors() -> Vec<(&'static str, SeriesState)> {
    detectors()
        .into_iter()
        .filter(|(name, _)| matches!(*name, "seasonal" | "combined"))
        .collect()
}

fn max_abs(scores: &[Score]) -> f64 {
    scores
        .iter()
        .filter_map(|s| s.score)
        .fold(0.0, |m, s| m.max(s.abs()))
}

#[test]
fn constant_input_scores_zero_and_finishes_warming() {
    for (name, mut d) in detectors() {
        let s = run(&mut d, &vec![42.0; 200], MIN);
        assert_eq!(max_abs(&s), 0.0, "{name}");
        assert!(s[0].warming, "{name} warms up");
        if name != "seasonal" {
            assert!(!s[199].warming, "{name} warmed up");
            assert_eq!(s[199].baseline, Some(42.0), "{name}");
        }
    }
}

#[test]
fn a_spike_stands_out_for_point_detectors() {
    for (name, mut d) in detectors() {
        if name == "cusum" || name == "seasonal" {
            continue;
        }
        let mut x = flat(200, 50.0, 1.0);
        x[150] = 80.0;
        let s = run(&mut d, &x, MIN);
        let spike = s[150].score.unwrap_or_default();
        assert!(spike > 10.0, "{name}: spike score {spike}");
        let quiet = max_abs(&s[60..150]);
        assert!(quiet < 4.0, "{name}: noise scored {quiet}");
        assert!(
            (s[150].baseline.unwrap_or_default() - 50.0).abs() < 2.0,
            "{name}"
        );
    }
}

#[test]
fn cusum_ignores_one_spike_and_catches_a_small_shift() {
    let mut d = SeriesState::Cusum(Cusum::new(0.5, 0.02, 20));
    let mut x = flat(300, 50.0, 1.0);
    x[100] = 80.0;
    // A shift of about 1.5 σ (the noise is uniform in ±1, σ ≈ 0.58).
    for v in &mut x[200..] {
        *v += 0.9;
    }
    let s = run(&mut d, &x, MIN);
    assert!(
        max_abs(&s[30..200]) < 5.0,
        "spike alone: {}",
        max_abs(&s[30..200])
    );
    let first = (200..300).find(|&i| s[i].score.unwrap_or_default() > 5.0);
    let first = first.expect("shift detected");
    assert!(first < 220, "detected after {} readings", first - 200);
}

#[test]
fn a_level_shift_is_detected_then_absorbed() {
    for (name, mut d) in detectors() {
        if name == "seasonal" {
            continue;
        }
        let mut x = flat(600, 50.0, 1.0);
        for v in &mut x[300..] {
            *v -= 10.0;
        }
        let s = run(&mut d, &x, MIN);
        assert!(
            s[300..310]
                .iter()
                .any(|s| s.score.unwrap_or_default() < -4.0),
            "{name}: shift missed"
        );
        let tail = max_abs(&s[560..]);
        assert!(
            tail < 4.0,
            "{name}: still alarmed at the new level ({tail})"
        );
    }
}

#[test]
fn a_slow_drift_is_caught_by_cusum_and_combined_not_by_ewma() {
    let mut x = flat(600, 50.0, 1.0);
    for (i, v) in x[300..].iter_mut().enumerate() {
        *v += 0.05 * i as f64;
    }
    let alarm = |d: &mut SeriesState| {
        let s = run(d, &x, MIN);
        (300..600).find(|&i| s[i].score.unwrap_or_default() > 4.0)
    };
    assert!(alarm(&mut SeriesState::Cusum(Cusum::new(0.5, 0.02, 20))).is_some());
    // The EWMA follows a slow drift: it is a spike detector.
    assert!(alarm(&mut SeriesState::Ewma(Ewma::new(0.1, 20))).is_none());
}

/// Five days of a daily cycle (a speed dropping from 50 to 20 km/h in the rush hours), one
/// reading every 5 minutes.
fn daily_cycle(days: usize) -> Vec<f64> {
    (0..days * 288)
        .map(|i| {
            let hour = (i % 288) as f64 / 12.0;
            let rush = (-(hour - 8.0).powi(2) / 2.0).exp() + (-(hour - 17.5).powi(2) / 2.0).exp();
            50.0 - 30.0 * rush + noise(i)
        })
        .collect()
}

#[test]
fn seasonal_knows_the_rush_hour() {
    let x = daily_cycle(5);
    let rush = 4 * 288 + 8 * 12;
    for (name, mut d) in seasonal_detectors() {
        let s = run(&mut d, &x, 5 * MIN);
        assert!(!s[rush].warming, "{name}");
        let day5 = max_abs(&s[4 * 288..]);
        assert!(day5 < 4.0, "{name}: a normal day scored {day5}");
        assert!(
            (s[rush].baseline.unwrap_or_default() - 20.0).abs() < 3.0,
            "{name}"
        );
    }
}

#[test]
fn combined_catches_a_drift_once_it_knows_the_day() {
    let mut x = daily_cycle(5);
    let start = 4 * 288;
    for (i, v) in x[start..].iter_mut().enumerate() {
        *v += 0.05 * i as f64;
    }
    let s = run(
        &mut SeriesState::Combined(Box::new(Combined::new(0))),
        &x,
        5 * MIN,
    );
    assert!(max_abs(&s[3 * 288..start]) < 4.0, "a normal day");
    let first = (start..x.len()).find(|&i| s[i].score.unwrap_or_default() > 4.0);
    let first = first.expect("drift detected");
    assert!(first - start < 150, "after {} readings", first - start);
}

#[test]
fn seasonal_flags_a_rush_hour_jam_at_three_in_the_morning() {
    let mut x = daily_cycle(5);
    let night = 4 * 288 + 3 * 12;
    for v in &mut x[night..night + 6] {
        *v = 20.0;
    }
    for (name, mut d) in seasonal_detectors() {
        let s = run(&mut d, &x, 5 * MIN);
        let score = s[night + 1].score.unwrap_or_default();
        assert!(score < -4.0, "{name}: 3 am jam scored {score}");
    }
}

#[test]
fn week_and_day_type_profiles_separate_weekends() {
    let mut d = Seasonal::new(Season::DayType, 60 * MIN, 0);
    // 1970-01-05 was a Monday. Weekdays at 100, weekends at 10, hourly, three weeks.
    let monday = 4 * 86_400_000;
    let mut last = Score::default();
    for h in 0..(21 * 24) {
        let t = monday + h * 3_600_000;
        let weekend = (h / 24) % 7 >= 5;
        last = d.update(
            t,
            Some(if weekend { 10.0 } else { 100.0 } + noise(h as usize)),
        );
    }
    assert!(!last.warming);
    assert!(
        (last.baseline.unwrap_or_default() - 10.0).abs() < 2.0,
        "{last:?}"
    );
    assert!(last.score.unwrap_or_default().abs() < 4.0);
}

#[test]
fn nan_and_null_readings_change_nothing() {
    for (name, mut d) in detectors() {
        let x = flat(100, 50.0, 1.0);
        let before = run(&mut d, &x, MIN);
        let mut copy = d.clone();
        for v in [None, Some(f64::NAN), Some(f64::INFINITY)] {
            match copy.step(100 * MIN, v) {
                Emitted::Score(s) => {
                    assert_eq!(s.score, None, "{name}");
                    assert!(s.baseline.is_some(), "{name}");
                }
                other => panic!("{other:?}"),
            }
        }
        // The seasonal profiles keep their current bin open; everything else is untouched.
        if name != "seasonal" && name != "combined" {
            assert_eq!(copy, d, "{name}");
        }
        assert_eq!(before.len(), 100);
    }
}

#[test]
fn state_round_trips_through_serde() {
    for (name, mut d) in detectors() {
        run(&mut d, &daily_cycle(1), 5 * MIN);
        let json = serde_json::to_string(&d).expect("serialises");
        let mut back: SeriesState = serde_json::from_str(&json).expect("deserialises");
        assert_eq!(
            back.step(86_400_000, Some(33.0)),
            d.step(86_400_000, Some(33.0)),
            "{name}"
        );
    }
}

/// A state copied into another (reusing its buffers, as a key copied while a checkpoint holds
/// it is) is the state copied, whatever the other held: a longer or shorter history, none, or
/// another kind of state; both go on alike.
#[test]
fn a_state_copied_into_another_is_the_state_copied() {
    let kinds = || {
        let mut all = detectors();
        all.extend([
            ("vector", SeriesState::Vector(Box::new(VectorScore::new(0)))),
            (
                "t2",
                SeriesState::Hotelling(Box::new(Hotelling::new(60 * MIN))),
            ),
            (
                "stuck",
                SeriesState::Health(Health::new(FaultKind::Stuck { readings: 5 })),
            ),
            ("alert", SeriesState::Alert(AlertMachine::new(RULE))),
        ]);
        all
    };
    let feed = |state: &mut SeriesState, series: &[f64], every_ms: i64| {
        for (i, x) in series.iter().enumerate() {
            state.step(i as i64 * every_ms, Some(*x));
        }
    };
    // Two days of history, a day at another level and spacing, or nothing at all.
    let two_days = daily_cycle(2);
    let other_day: Vec<f64> = daily_cycle(1).iter().map(|x| x * 2.0 + 7.0).collect();
    let histories: [(&[f64], i64); 3] = [(&two_days, 5 * MIN), (&other_day, 7 * MIN), (&[], MIN)];
    for (name, prototype) in kinds() {
        for (from, every) in histories {
            let mut source = prototype.clone();
            feed(&mut source, from, every);
            for (other, into_prototype) in kinds() {
                for (history, into_every) in histories {
                    let mut into = into_prototype.clone();
                    feed(&mut into, history, into_every);
                    into.clone_from(&source);
                    assert_eq!(into, source, "{name} copied into {other}");
                    let (mut a, mut b) = (source.clone(), into);
                    for i in 0..50 {
                        let t = 2 * 86_400_000 + i * 5 * MIN;
                        let x = Some(30.0 + noise(i as usize) * 3.0);
                        assert_eq!(a.step(t, x), b.step(t, x), "{name} copied into {other}");
                    }
                }
            }
        }
    }
}

fn health(kind: FaultKind, readings: &[(i64, Option<f64>)]) -> Vec<HealthOut> {
    let mut h = Health::new(kind);
    readings.iter().map(|(t, x)| h.update(*t, *x)).collect()
}

#[test]
fn stuck_sensor_after_n_identical_readings() {
    let mut r: Vec<(i64, Option<f64>)> = (0..5).map(|i| (i * MIN, Some(30.0 + i as f64))).collect();
    r.extend((5..12).map(|i| (i * MIN, Some(42.0))));
    r.push((12 * MIN, Some(43.0)));
    let out = health(FaultKind::Stuck { readings: 5 }, &r);
    let faults: Vec<bool> = out.iter().map(|o| o.fault).collect();
    assert_eq!(faults.iter().filter(|f| **f).count(), 3);
    assert!(out[9].fault && !out[8].fault && !out[12].fault);
    assert_eq!(out[11].detail, Some(7.0));
}

#[test]
fn out_of_range_and_impossible_jumps() {
    let range = health(
        FaultKind::OutOfRange {
            low: 0.0,
            high: 1000.0,
        },
        &[
            (0, Some(-3.0)),
            (MIN, Some(20.0)),
            (2 * MIN, Some(1500.0)),
            (3 * MIN, None),
        ],
    );
    assert_eq!(
        range.iter().map(|o| o.fault).collect::<Vec<_>>(),
        [true, false, true, false]
    );
    assert_eq!(range[2].detail, Some(1000.0));
    let jump = health(
        FaultKind::Jump { per_minute: 300.0 },
        &[
            (0, Some(40.0)),
            (MIN, Some(45.0)),
            (2 * MIN, Some(900.0)),
            (3 * MIN, Some(50.0)),
            // 500 over 10 minutes is a plausible rise.
            (13 * MIN, Some(550.0)),
        ],
    );
    assert_eq!(
        jump.iter().map(|o| o.fault).collect::<Vec<_>>(),
        [false, false, true, true, false]
    );
    assert_eq!(jump[2].detail, Some(855.0));
}

#[test]
fn missing_is_decided_on_event_time() {
    let kind = FaultKind::Missing {
        expected_ms: MIN,
        k: 3.0,
    };
    let mut h = Health::new(kind);
    assert!(!h.update(0, Some(1.0)).fault);
    assert!(
        !h.update(MIN, None).fault,
        "a null value still shows a live sensor"
    );
    assert_eq!(h.due(), Some(4 * MIN));
    assert_eq!(
        h.fire(4 * MIN),
        None,
        "a reading at 4 min would still be in time"
    );
    let silent = h.fire(10 * MIN).expect("silence reported");
    assert!(silent.fault);
    assert_eq!(
        silent.detail,
        Some(180.0),
        "silent for k × interval when it became a fault"
    );
    assert_eq!(h.due(), None, "reported once");
    // The sensor comes back: the reading ends the silence rather than reporting it again.
    assert!(!h.update(11 * MIN, Some(2.0)).fault);
    // Without timers (a finished table), the gap is flagged on the reading that ends it.
    let batch = health(
        kind,
        &[(0, Some(1.0)), (10 * MIN, Some(1.0)), (11 * MIN, Some(1.0))],
    );
    assert_eq!(
        batch.iter().map(|o| o.fault).collect::<Vec<_>>(),
        [false, true, false]
    );
}

fn alerts(rule: AlertRule, scores: &[(i64, Option<f64>)]) -> Vec<Option<&'static str>> {
    let mut a = AlertMachine::new(rule);
    scores
        .iter()
        .map(|(t, s)| a.update(*t, *s).state.map(|s| s.as_str()))
        .collect()
}

const RULE: AlertRule = AlertRule {
    raise: 4.0,
    clear: 2.0,
    min_duration_ms: 2 * MIN,
    cooldown_ms: 10 * MIN,
    expire_ms: Some(15 * MIN),
};

#[test]
fn hysteresis_and_minimum_duration() {
    let scores: Vec<(i64, Option<f64>)> = [1.0, 5.0, 5.0, 5.0, 3.0, 5.0, 9.0, 3.0, 1.5, 1.0]
        .iter()
        .enumerate()
        .map(|(i, s)| (i as i64 * MIN, Some(*s)))
        .collect();
    assert_eq!(
        alerts(RULE, &scores),
        [
            None,
            None,
            None,
            Some("RAISED"),
            None, // 3 is between clear and raise: still active, no flapping.
            None,
            Some("UPDATED"), // severity 4 → 5
            None,
            Some("CLEARED"),
            None
        ]
    );
}

#[test]
fn a_blip_shorter_than_the_minimum_duration_raises_nothing() {
    let scores = [(0, Some(9.0)), (MIN, Some(9.0)), (2 * MIN, Some(1.0))];
    assert_eq!(alerts(RULE, &scores), [None, None, None]);
}

#[test]
fn cooldown_holds_back_a_new_alert() {
    let rule = AlertRule {
        min_duration_ms: 0,
        ..RULE
    };
    let scores = [
        (0, Some(5.0)),
        (MIN, Some(1.0)),
        (2 * MIN, Some(5.0)),
        (5 * MIN, Some(5.0)),
        (11 * MIN, Some(5.0)),
    ];
    assert_eq!(
        alerts(rule, &scores),
        [Some("RAISED"), Some("CLEARED"), None, None, Some("RAISED")]
    );
}

#[test]
fn an_alert_without_scores_expires_on_event_time() {
    let mut a = AlertMachine::new(AlertRule {
        min_duration_ms: 0,
        ..RULE
    });
    let raised = a.update(0, Some(6.0));
    assert_eq!(raised.state, Some(AlertTransition::Raised));
    assert_eq!(raised.started_at, Some(0));
    assert_eq!(raised.severity, Some(3));
    assert_eq!(
        a.update(MIN, None).state,
        None,
        "a null score changes nothing"
    );
    assert_eq!(a.due(), Some(15 * MIN));
    assert_eq!(a.fire(15 * MIN), None);
    let cleared = a.fire(20 * MIN).expect("expired");
    assert_eq!(cleared.state, Some(AlertTransition::Cleared));
    assert_eq!(cleared.peak, Some(6.0));
    assert!(!cleared.active);
    assert_eq!(a.due(), None);
}

/// Stationary series without anomalies, of several shapes and scales 1000× apart: the share of
/// readings whose likelihood reaches `1 − ε` is within a factor 2 of ε, for ε = 10⁻³ and
/// 10⁻⁴, for the calibrator alone and for the default detector's likelihood.
#[test]
fn likelihoods_are_calibrated_on_stationary_series_of_any_shape_and_scale() {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, Exp, LogNormal, Normal, StudentT};

    type Draw = Box<dyn Fn(&mut ChaCha8Rng) -> f64>;
    let normal = Normal::new(0.0, 1.0).unwrap();
    let student = StudentT::new(3.0).unwrap();
    let lognormal = LogNormal::new(0.0, 0.8).unwrap();
    let exp = Exp::new(1.0).unwrap();
    let shapes: Vec<(&str, Draw)> = vec![
        ("gaussian", Box::new(move |r| normal.sample(r))),
        ("student-t(3)", Box::new(move |r| student.sample(r))),
        ("lognormal (skewed)", Box::new(move |r| lognormal.sample(r))),
        (
            "intermittent zeros",
            Box::new(move |r| {
                if r.random_bool(0.6) {
                    0.0
                } else {
                    exp.sample(r)
                }
            }),
        ),
    ];
    let n = 400_000;
    let warm = 20_000;
    let mut failures = Vec::new();
    for (name, draw) in &shapes {
        for scale in [1.0e-3, 1.0, 1.0e3] {
            let mut rng = ChaCha8Rng::seed_from_u64(7);
            // The calibrator alone, on |x|.
            let mut calibrator = Calibrator::default();
            // The default detector on the series itself, one reading a minute.
            let mut detector = Combined::new(0);
            let (mut raw, mut det) = ([0usize; 2], [0usize; 2]);
            let (mut raw_n, mut det_n) = (0usize, 0usize);
            for i in 0..n {
                let t = i as i64 * MIN;
                let x = 20.0 * scale + scale * draw(&mut rng);
                let v = (x / scale - 20.0).abs();
                if i >= warm
                    && let Some(l) = calibrator.likelihood(v)
                {
                    raw_n += 1;
                    raw[0] += usize::from(l >= 1.0 - 1e-3);
                    raw[1] += usize::from(l >= 1.0 - 1e-4);
                }
                calibrator.learn(t, v);
                let s = detector.update(t, Some(x));
                if i >= warm
                    && let Some(l) = s.likelihood
                {
                    det_n += 1;
                    det[0] += usize::from(l >= 1.0 - 1e-3);
                    det[1] += usize::from(l >= 1.0 - 1e-4);
                }
            }
            for (what, hits, total) in [("calibrator", raw, raw_n), ("anomaly_score", det, det_n)] {
                assert!(total > n / 2, "{what} on {name}: only {total} likelihoods");
                for (k, eps) in [1e-3, 1e-4].into_iter().enumerate() {
                    let share = hits[k] as f64 / total as f64;
                    if !(eps / 2.0..=eps * 2.0).contains(&share) {
                        failures.push(format!(
                            "{what} on {name} ×{scale}: P(likelihood ≥ 1 − {eps}) = {share:.2e}"
                        ));
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "not calibrated:\n{}",
        failures.join("\n")
    );
}

/// A detector over several columns keeps at most `MAX_COLUMNS` of them however wide a row's
/// array is, counts absent and NaN values as missing, and names the column that moved.
#[test]
fn vector_detector_state_is_bounded_and_names_the_moving_column() {
    let mut wide = VectorScore::new(0);
    wide.update(0, &vec![Some(1.0); 100_000]);
    assert_eq!(wide.width(), VectorScore::MAX_COLUMNS);
    let mut d = VectorScore::new(0);
    let mut last = VectorOut::default();
    for i in 0..80usize {
        let speed = if i < 70 { 40.0 + noise(i) } else { 8.0 };
        let row = [Some(20.0 + noise(i + 1000)), Some(speed), Some(f64::NAN)];
        let short = [Some(20.0 + noise(i + 1000))];
        last = d.update(i as i64 * MIN, if i == 10 { &short } else { &row });
    }
    assert_eq!(d.width(), 3);
    assert_eq!(last.column, Some(2));
    assert!(last.score.score.is_some_and(|s| s < -10.0), "{last:?}");
}

/// Readings near the largest double (finite, so they passed as readings) overflowed the
/// detectors' statistics to infinities and NaN: `anomaly_score`, `anomaly_vector` and
/// `anomaly_cusum` panicked comparing against NaN bounds, and `anomaly_ewma` scored NaN for
/// good. A reading beyond `MAX_READING` is neither scored nor learnt: every detector gives
/// the same outputs for the series with such readings as without them, at every other
/// reading (Hotelling's T², which handled huge readings already, keeps its own rule).
#[test]
fn readings_near_the_largest_double_are_neither_scored_nor_learnt() {
    let extremes = [
        f64::MAX,
        f64::MIN,
        1e308,
        -1.7e308,
        f64::INFINITY,
        f64::NEG_INFINITY,
        1.0000001e100,
        -1e101,
    ];
    // A series with a level shift and spikes, and where the extremes go in it.
    let clean: Vec<f64> = (0..400)
        .map(
            |i| if i < 250 { 10.0 } else { 30.0 } + noise(i) + if i % 97 == 0 { 25.0 } else { 0.0 },
        )
        .collect();
    let at = [0usize, 1, 5, 6, 50, 51, 52, 200, 251, 399];
    // (Hotelling's T² scores a huge finite reading as far off as can be and then holds its
    // learning through an anomalous stretch, by design: its own test covers that, and
    // `any_doubles_leave_every_detector_scoring_numbers` that it scores numbers.)
    let mut kinds = detectors();
    kinds.push(("vector", SeriesState::Vector(Box::new(VectorScore::new(0)))));
    for (name, mut with) in kinds {
        let mut without = with.clone();
        let mut got = Vec::new();
        let mut want = Vec::new();
        let mut t = 0i64;
        for (i, x) in clean.iter().enumerate() {
            if let Some(k) = at.iter().position(|&a| a == i) {
                let extreme = extremes[k % extremes.len()];
                let out = with.step(t, Some(extreme));
                let score = match out {
                    Emitted::Score(s) => s.score,
                    Emitted::Vector(v) => v.score.score,
                    other => panic!("{name}: not a score: {other:?}"),
                };
                assert_eq!(score, None, "{name}: {extreme} was scored");
                t += MIN;
            }
            got.push(with.step(t, Some(*x)));
            want.push(without.step(t, Some(*x)));
            t += MIN;
        }
        assert_eq!(got, want, "{name}");
        let finite = got.iter().all(|e| match e {
            Emitted::Score(s) => s.score.is_none_or(f64::is_finite),
            Emitted::Vector(v) => v.score.score.is_none_or(f64::is_finite),
            _ => false,
        });
        assert!(finite, "{name}: a score that is not a number");
    }
}

use proptest::strategy::Strategy as _;

proptest::proptest! {
    /// No reading a double can hold, in any order, makes a detector panic or score NaN.
    #[test]
    fn any_doubles_leave_every_detector_scoring_numbers(
        readings in proptest::collection::vec(
            proptest::prop_oneof![
                -1e3f64..1e3,
                proptest::num::f64::ANY,
                proptest::sample::select(vec![f64::MAX, f64::MIN, 1e308, -1e308, 0.0, 1.0]),
                (-308i32..308, proptest::bool::ANY)
                    .prop_map(|(e, negative)| if negative { -1.0 } else { 1.0 } * 10f64.powi(e)),
            ],
            1..300,
        )
    ) {
        let mut kinds = detectors();
        kinds.push(("vector", SeriesState::Vector(Box::new(VectorScore::new(0)))));
        kinds.push(("hotelling", SeriesState::Hotelling(Box::new(Hotelling::new(60 * MIN)))));
        for (name, mut state) in kinds {
            for (i, x) in readings.iter().enumerate() {
                let score = match state.step(i as i64 * MIN, Some(*x)) {
                    Emitted::Score(s) => s.score,
                    Emitted::Vector(v) => v.score.score,
                    other => panic!("{name}: not a score: {other:?}"),
                };
                proptest::prop_assert!(score.is_none_or(f64::is_finite), "{}: {:?}", name, score);
            }
        }
    }
}
