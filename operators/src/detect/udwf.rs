//! The detectors, health checks and alert machine as DataFusion window functions.
//!
//! Every function is written `f(value, ts, params…) OVER (PARTITION BY key ORDER BY ts)`:
//! `value` is the series (any number), `ts` its event time (a timestamp), and the parameters
//! are literals. Each returns a struct; read its fields with `f(…)['score']` or from a
//! subquery. Over a table, DataFusion runs each partition from a fresh state; in an urbanstream
//! stream query the engine keeps each key's state across micro-batches (and checkpoints it).
//!
//! | function | parameters (defaults) | returns |
//! |---|---|---|
//! | `anomaly_ewma` | `alpha` (0.1), `warmup` readings (20) | `{score, baseline, warming, likelihood, scale}` (`likelihood` NULL) |
//! | `anomaly_mad` | `window` readings (60), `warmup` (10) | same |
//! | `anomaly_cusum` | slack `k` in σ (0.5), baseline `alpha` (0.02), `warmup` (20) | same |
//! | `anomaly_seasonal` | `'day'`, `'week'` or `'daytype'` (`'day'`), bin (`INTERVAL '15 minutes'`), UTC offset (`INTERVAL '0 hours'`) | same |
//! | `anomaly_score` | UTC offset (`INTERVAL '0 hours'`) | `{score, baseline, warming, likelihood, scale}` (the default detector) |
//! | `anomaly_vector` | UTC offset; `value` is an array of numbers, e.g. `[flow, speed]` | `{score, baseline, warming, likelihood, column, scale}` |
//! | `anomaly_t2` | half-life (`INTERVAL '1 hour'`); `value` is an array of numbers | same (Hotelling's T² of the columns together) |
//! | `sensor_stuck` | identical readings (10) | `{fault, value, detail}` |
//! | `sensor_out_of_range` | quantity, e.g. `'pm25'` | same |
//! | `sensor_missing` | expected interval, `k` (3) | same |
//! | `sensor_jump` | quantity, or a largest change per minute | same |
//! | `alert_state` | `raise`, `clear`, min duration (0), cooldown (0), expiry (none) | `{state, active, started_at, peak, severity}` |
//!
//! A score's `scale` is the spread a reading's deviation is measured in, in the series' own
//! units (its standard deviation or robust equivalent; for `anomaly_t2`, that of the column
//! it names): `baseline ± 3 * scale` is the expected range an alert can quote. For
//! `anomaly_ewma`, `anomaly_mad` and `anomaly_seasonal` the score is `(value - baseline) /
//! scale`; the running sums of `anomaly_cusum` and of `anomaly_score`'s shift part can be far
//! out while a reading lies inside the range.

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanBuilder, Float64Array, Float64Builder, Int32Builder,
    ListArray, StringBuilder, StructArray, TimestampMillisecondArray, TimestampMillisecondBuilder,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Fields, Float64Type, TimeUnit};
use datafusion::common::{Result, ScalarValue, exec_err, plan_datafusion_err, plan_err};
use datafusion::logical_expr::function::{PartitionEvaluatorArgs, WindowUDFFieldArgs};
use datafusion::logical_expr::{
    PartitionEvaluator, Signature, Volatility, WindowUDF, WindowUDFImpl,
};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::Literal;

use super::{
    AlertMachine, AlertRule, Combined, Cusum, Emitted, Ewma, FaultKind, Health, Hotelling,
    RollingMad, Season, Seasonal, SeriesState, VectorScore, health,
};
use crate::window::interval_ms;

/// Which function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SeriesKind {
    /// `anomaly_ewma`.
    Ewma,
    /// `anomaly_mad`.
    Mad,
    /// `anomaly_cusum`.
    Cusum,
    /// `anomaly_seasonal`.
    Seasonal,
    /// `anomaly_score`, the default detector.
    Score,
    /// `anomaly_vector`, the default detector over several columns.
    Vector,
    /// `anomaly_t2`, Hotelling's T² over several columns.
    T2,
    /// `sensor_stuck`.
    Stuck,
    /// `sensor_out_of_range`.
    OutOfRange,
    /// `sensor_missing`.
    Missing,
    /// `sensor_jump`.
    Jump,
    /// `alert_state`.
    Alert,
}

/// Every function of this module.
pub const ALL: [SeriesKind; 12] = [
    SeriesKind::Ewma,
    SeriesKind::Mad,
    SeriesKind::Cusum,
    SeriesKind::Seasonal,
    SeriesKind::Score,
    SeriesKind::Vector,
    SeriesKind::T2,
    SeriesKind::Stuck,
    SeriesKind::OutOfRange,
    SeriesKind::Missing,
    SeriesKind::Jump,
    SeriesKind::Alert,
];

enum Shape {
    Score,
    Vector,
    Health,
    Alert,
}

impl SeriesKind {
    /// The SQL name.
    pub fn name(self) -> &'static str {
        match self {
            SeriesKind::Ewma => "anomaly_ewma",
            SeriesKind::Mad => "anomaly_mad",
            SeriesKind::Cusum => "anomaly_cusum",
            SeriesKind::Seasonal => "anomaly_seasonal",
            SeriesKind::Score => "anomaly_score",
            SeriesKind::Vector => "anomaly_vector",
            SeriesKind::T2 => "anomaly_t2",
            SeriesKind::Stuck => "sensor_stuck",
            SeriesKind::OutOfRange => "sensor_out_of_range",
            SeriesKind::Missing => "sensor_missing",
            SeriesKind::Jump => "sensor_jump",
            SeriesKind::Alert => "alert_state",
        }
    }

    /// Parameters after `(value, ts)`: how many are required, and their names.
    fn params(self) -> (usize, &'static [&'static str]) {
        match self {
            SeriesKind::Ewma => (0, &["alpha", "warmup"]),
            SeriesKind::Mad => (0, &["window", "warmup"]),
            SeriesKind::Cusum => (0, &["k", "alpha", "warmup"]),
            SeriesKind::Seasonal => (0, &["season", "bin", "utc_offset"]),
            SeriesKind::Score | SeriesKind::Vector => (0, &["utc_offset"]),
            SeriesKind::T2 => (0, &["half_life"]),
            SeriesKind::Stuck => (0, &["readings"]),
            SeriesKind::OutOfRange => (1, &["quantity"]),
            SeriesKind::Missing => (1, &["expected_interval", "k"]),
            SeriesKind::Jump => (1, &["quantity or max change per minute"]),
            SeriesKind::Alert => (2, &["raise", "clear", "min_duration", "cooldown", "expire"]),
        }
    }

    fn shape(self) -> Shape {
        match self {
            SeriesKind::Ewma
            | SeriesKind::Mad
            | SeriesKind::Cusum
            | SeriesKind::Seasonal
            | SeriesKind::Score => Shape::Score,
            SeriesKind::Vector | SeriesKind::T2 => Shape::Vector,
            SeriesKind::Stuck | SeriesKind::OutOfRange | SeriesKind::Missing | SeriesKind::Jump => {
                Shape::Health
            }
            SeriesKind::Alert => Shape::Alert,
        }
    }

    /// The fields of the struct it returns.
    pub fn output_fields(self) -> Fields {
        match self.shape() {
            Shape::Score => Fields::from(vec![
                Field::new("score", DataType::Float64, true),
                Field::new("baseline", DataType::Float64, true),
                Field::new("warming", DataType::Boolean, true),
                Field::new("likelihood", DataType::Float64, true),
                Field::new("scale", DataType::Float64, true),
            ]),
            Shape::Vector => Fields::from(vec![
                Field::new("score", DataType::Float64, true),
                Field::new("baseline", DataType::Float64, true),
                Field::new("warming", DataType::Boolean, true),
                Field::new("likelihood", DataType::Float64, true),
                Field::new("column", DataType::Int32, true),
                Field::new("scale", DataType::Float64, true),
            ]),
            Shape::Health => Fields::from(vec![
                Field::new("fault", DataType::Boolean, true),
                Field::new("value", DataType::Float64, true),
                Field::new("detail", DataType::Float64, true),
            ]),
            Shape::Alert => Fields::from(vec![
                Field::new("state", DataType::Utf8, true),
                Field::new("active", DataType::Boolean, true),
                Field::new(
                    "started_at",
                    DataType::Timestamp(TimeUnit::Millisecond, None),
                    true,
                ),
                Field::new("peak", DataType::Float64, true),
                Field::new("severity", DataType::Int32, true),
            ]),
        }
    }

    /// A fresh state from the literal parameters (after `value, ts`).
    pub fn state(self, params: &[ScalarValue]) -> Result<SeriesState> {
        let name = self.name();
        let (required, names) = self.params();
        if params.len() < required || params.len() > names.len() {
            return plan_err!(
                "{name}(value, ts{}) takes {} to {} parameters after value and ts, got {}",
                names.iter().map(|n| format!(", {n}")).collect::<String>(),
                required,
                names.len(),
                params.len()
            );
        }
        let p = Params {
            name,
            names,
            values: params,
        };
        Ok(match self {
            SeriesKind::Ewma => SeriesState::Ewma(Ewma::new(
                p.rate(0, Ewma::DEFAULT_ALPHA)?,
                p.count(1, Ewma::DEFAULT_WARMUP as usize, 0)? as u32,
            )),
            SeriesKind::Mad => {
                let window = p.count(0, RollingMad::DEFAULT_WINDOW, 3)?;
                let warmup = p.count(1, RollingMad::DEFAULT_WARMUP.min(window), 0)?;
                if warmup > window {
                    return plan_err!(
                        "{name}(): warmup ({warmup}) must not exceed the window ({window} readings)"
                    );
                }
                SeriesState::Mad(RollingMad::new(window, warmup))
            }
            SeriesKind::Cusum => SeriesState::Cusum(Cusum::new(
                p.float(0, Cusum::DEFAULT_SLACK, 0.0, 100.0)?,
                p.rate(1, Cusum::DEFAULT_ALPHA)?,
                p.count(2, Cusum::DEFAULT_WARMUP as usize, 0)? as u32,
            )),
            SeriesKind::Seasonal => {
                let season = match p.text(0)? {
                    None => Season::Day,
                    Some(s) => Season::parse(&s).ok_or_else(|| {
                        plan_datafusion_err!(
                            "{name}(): season must be 'day', 'week' or 'daytype', got '{s}'"
                        )
                    })?,
                };
                let bin_ms = p.interval(1, Seasonal::DEFAULT_BIN_MS)?;
                if bin_ms < 60_000 || bin_ms % 60_000 != 0 || 86_400_000 % bin_ms != 0 {
                    return plan_err!(
                        "{name}(): bin must be a whole number of minutes that divides a day, \
                         e.g. INTERVAL '15 minutes' or INTERVAL '1 hour', got {}",
                        spell_ms(bin_ms)
                    );
                }
                SeriesState::Seasonal(Seasonal::new(season, bin_ms, p.utc_offset(2)?))
            }
            SeriesKind::Score => SeriesState::Combined(Box::new(Combined::new(p.utc_offset(0)?))),
            SeriesKind::Vector => SeriesState::Vector(Box::new(VectorScore::new(p.utc_offset(0)?))),
            SeriesKind::T2 => {
                let half_life = p.interval(0, Hotelling::DEFAULT_HALF_LIFE_MS)?;
                if half_life <= 0 {
                    return plan_err!("{name}(): half_life must be positive, got {half_life} ms");
                }
                SeriesState::Hotelling(Box::new(Hotelling::new(half_life)))
            }
            SeriesKind::Stuck => SeriesState::Health(Health::new(FaultKind::Stuck {
                readings: p.count(0, 10, 2)? as u32,
            })),
            SeriesKind::OutOfRange => {
                let quantity = p.text(0)?.unwrap_or_default();
                let (low, high) =
                    crate::indicator::quality::physical_range(&quantity).ok_or_else(|| {
                        plan_datafusion_err!(
                            "{name}(): unknown quantity '{quantity}'; known: {}",
                            crate::indicator::quality::PHYSICAL_RANGES
                                .iter()
                                .map(|r| r.0)
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    })?;
                SeriesState::Health(Health::new(FaultKind::OutOfRange { low, high }))
            }
            SeriesKind::Missing => {
                let expected_ms = p.interval(0, 0)?;
                if expected_ms <= 0 {
                    return plan_err!("{name}(): the expected interval must be positive");
                }
                SeriesState::Health(Health::new(FaultKind::Missing {
                    expected_ms,
                    k: p.float(1, 3.0, 1.0, 1e6)?,
                }))
            }
            SeriesKind::Jump => {
                let per_minute = match &params[0] {
                    ScalarValue::Utf8(Some(q))
                    | ScalarValue::LargeUtf8(Some(q))
                    | ScalarValue::Utf8View(Some(q)) => health::max_step_per_minute(q)
                        .ok_or_else(|| {
                            plan_datafusion_err!(
                                "{name}(): unknown quantity '{q}'; give a largest change per minute instead"
                            )
                        })?,
                    _ => p.float(0, f64::NAN, 0.0, f64::MAX)?,
                };
                if per_minute <= 0.0 {
                    return plan_err!(
                        "{name}(): the largest change per minute must be positive, got {per_minute}"
                    );
                }
                SeriesState::Health(Health::new(FaultKind::Jump { per_minute }))
            }
            SeriesKind::Alert => {
                let raise = p.float(0, f64::NAN, f64::MIN, f64::MAX)?;
                let clear = p.float(1, f64::NAN, f64::MIN, f64::MAX)?;
                if clear > raise {
                    return plan_err!(
                        "{name}(): clear ({clear}) must not be above raise ({raise})"
                    );
                }
                let expire = p.duration(4)?;
                SeriesState::Alert(AlertMachine::new(AlertRule {
                    raise,
                    clear,
                    min_duration_ms: p.duration(2)?,
                    cooldown_ms: p.duration(3)?,
                    expire_ms: (expire > 0).then_some(expire),
                }))
            }
        })
    }

    /// A fresh state from the call's physical arguments (`value, ts, params…`); the parameters
    /// must be literals.
    pub fn state_from_exprs(self, args: &[Arc<dyn PhysicalExpr>]) -> Result<SeriesState> {
        let name = self.name();
        if args.len() < 2 {
            return plan_err!("{name}() needs at least (value, ts)");
        }
        let params = args[2..]
            .iter()
            .enumerate()
            .map(|(i, e)| match e.downcast_ref::<Literal>() {
                Some(l) => Ok(l.value().clone()),
                None => plan_err!(
                    "{name}(): parameter {} must be a constant, got {e}",
                    self.params().1.get(i).copied().unwrap_or("?")
                ),
            })
            .collect::<Result<Vec<_>>>()?;
        self.state(&params)
    }

    /// The struct column of `rows`.
    pub fn build(self, rows: &[Emitted]) -> Result<ArrayRef> {
        let fields = self.output_fields();
        let n = rows.len();
        let columns: Vec<ArrayRef> = match self.shape() {
            Shape::Score => {
                let (mut s, mut b, mut w, mut l, mut k) = (
                    Float64Builder::with_capacity(n),
                    Float64Builder::with_capacity(n),
                    BooleanBuilder::with_capacity(n),
                    Float64Builder::with_capacity(n),
                    Float64Builder::with_capacity(n),
                );
                for r in rows {
                    let Emitted::Score(r) = r else {
                        return exec_err!("{}: internal: wrong output", self.name());
                    };
                    s.append_option(r.score);
                    b.append_option(r.baseline);
                    w.append_value(r.warming);
                    l.append_option(r.likelihood);
                    k.append_option(r.scale);
                }
                vec![
                    Arc::new(s.finish()),
                    Arc::new(b.finish()),
                    Arc::new(w.finish()),
                    Arc::new(l.finish()),
                    Arc::new(k.finish()),
                ]
            }
            Shape::Vector => {
                let (mut s, mut b, mut w, mut l, mut c, mut k) = (
                    Float64Builder::with_capacity(n),
                    Float64Builder::with_capacity(n),
                    BooleanBuilder::with_capacity(n),
                    Float64Builder::with_capacity(n),
                    Int32Builder::with_capacity(n),
                    Float64Builder::with_capacity(n),
                );
                for r in rows {
                    let Emitted::Vector(r) = r else {
                        return exec_err!("{}: internal: wrong output", self.name());
                    };
                    s.append_option(r.score.score);
                    b.append_option(r.score.baseline);
                    w.append_value(r.score.warming);
                    l.append_option(r.score.likelihood);
                    c.append_option(r.column.map(|c| c as i32));
                    k.append_option(r.score.scale);
                }
                vec![
                    Arc::new(s.finish()),
                    Arc::new(b.finish()),
                    Arc::new(w.finish()),
                    Arc::new(l.finish()),
                    Arc::new(c.finish()),
                    Arc::new(k.finish()),
                ]
            }
            Shape::Health => {
                let (mut f, mut v, mut d) = (
                    BooleanBuilder::with_capacity(n),
                    Float64Builder::with_capacity(n),
                    Float64Builder::with_capacity(n),
                );
                for r in rows {
                    let Emitted::Health(r) = r else {
                        return exec_err!("{}: internal: wrong output", self.name());
                    };
                    f.append_value(r.fault);
                    v.append_option(r.value);
                    d.append_option(r.detail);
                }
                vec![
                    Arc::new(f.finish()),
                    Arc::new(v.finish()),
                    Arc::new(d.finish()),
                ]
            }
            Shape::Alert => {
                let mut state = StringBuilder::with_capacity(n, n * 7);
                let mut active = BooleanBuilder::with_capacity(n);
                let mut started = TimestampMillisecondBuilder::with_capacity(n);
                let mut peak = Float64Builder::with_capacity(n);
                let mut severity = Int32Builder::with_capacity(n);
                for r in rows {
                    let Emitted::Alert(r) = r else {
                        return exec_err!("{}: internal: wrong output", self.name());
                    };
                    state.append_option(r.state.map(|s| s.as_str()));
                    active.append_value(r.active);
                    started.append_option(r.started_at);
                    peak.append_option(r.peak);
                    severity.append_option(r.severity);
                }
                vec![
                    Arc::new(state.finish()),
                    Arc::new(active.finish()),
                    Arc::new(started.finish()),
                    Arc::new(peak.finish()),
                    Arc::new(severity.finish()),
                ]
            }
        };
        Ok(Arc::new(StructArray::try_new(fields, columns, None)?))
    }
}

/// The `value` argument of a call: one number per row, or an array of numbers per row (a
/// detector over several columns).
#[derive(Debug)]
pub enum Values {
    /// One number per row.
    Scalar(Float64Array),
    /// Several numbers per row: the list (for its offsets and nulls) and its elements, read
    /// in place.
    List(ListArray, Float64Array),
}

impl Values {
    /// Row `r`'s values into `out` (cleared first): one for a number (`None` if null), each
    /// element of an array (none for a null array).
    pub fn row(&self, r: usize, out: &mut Vec<Option<f64>>) {
        out.clear();
        match self {
            Values::Scalar(x) => out.push((!x.is_null(r)).then(|| x.value(r))),
            Values::List(list, items) => {
                if list.is_null(r) {
                    return;
                }
                let offsets = list.value_offsets();
                let (from, to) = (offsets[r] as usize, offsets[r + 1] as usize);
                out.extend((from..to).map(|i| (!items.is_null(i)).then(|| items.value(i))));
            }
        }
    }
}

/// The `value` and `ts` arguments of a call as arrays.
pub fn inputs(name: &str, args: &[ArrayRef]) -> Result<(Values, TimestampMillisecondArray)> {
    if args.len() < 2 {
        return exec_err!("{name}() needs (value, ts)");
    }
    let values = match args[0].data_type() {
        DataType::List(_) | DataType::LargeList(_) | DataType::FixedSizeList(_, _) => {
            let list = cast(&args[0], &DataType::new_list(DataType::Float64, true))?;
            let list = list.as_list::<i32>().clone();
            let items = list.values().as_primitive::<Float64Type>().clone();
            Values::List(list, items)
        }
        _ => Values::Scalar(cast(&args[0], &DataType::Float64)?.as_primitive().clone()),
    };
    let times = cast(&args[1], &DataType::Timestamp(TimeUnit::Millisecond, None))?;
    Ok((values, times.as_primitive().clone()))
}

/// A length of time as SQL would write it (`-5 minutes`).
fn spell_ms(ms: i64) -> String {
    match ms {
        0 => "0".into(),
        ms if ms % 3_600_000 == 0 => format!("{} hours", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{} minutes", ms / 60_000),
        ms if ms % 1_000 == 0 => format!("{} seconds", ms / 1_000),
        ms => format!("{ms} milliseconds"),
    }
}

struct Params<'a> {
    name: &'static str,
    names: &'static [&'static str],
    values: &'a [ScalarValue],
}

impl Params<'_> {
    fn get(&self, i: usize) -> Option<&ScalarValue> {
        self.values.get(i).filter(|v| !v.is_null())
    }

    fn float(&self, i: usize, default: f64, low: f64, high: f64) -> Result<f64> {
        let Some(v) = self.get(i) else {
            if default.is_nan() {
                return plan_err!("{}(): {} is required", self.name, self.names[i]);
            }
            return Ok(default);
        };
        let x = v
            .cast_to(&DataType::Float64)
            .ok()
            .and_then(|s| match s {
                ScalarValue::Float64(Some(x)) => Some(x),
                _ => None,
            })
            .ok_or_else(|| {
                plan_datafusion_err!(
                    "{}(): {} must be a number, got {v}",
                    self.name,
                    self.names[i]
                )
            })?;
        if !(low..=high).contains(&x) || !x.is_finite() {
            return plan_err!(
                "{}(): {} must be within [{low}, {high}], got {x}",
                self.name,
                self.names[i]
            );
        }
        Ok(x)
    }

    /// A smoothing rate: within (0, 1] (0 would never learn).
    fn rate(&self, i: usize, default: f64) -> Result<f64> {
        let x = self.float(i, default, 0.0, 1.0)?;
        if x == 0.0 {
            return plan_err!(
                "{}(): {} must be above 0 (0 would never learn), at most 1",
                self.name,
                self.names[i]
            );
        }
        Ok(x)
    }

    /// A number of readings: a whole number from `low` to a million.
    fn count(&self, i: usize, default: usize, low: usize) -> Result<usize> {
        let x = self.float(i, default as f64, f64::MIN, f64::MAX)?;
        if x.fract() != 0.0 || x < low as f64 || x > 1.0e6 {
            return plan_err!(
                "{}(): {} is a number of readings, a whole number from {low} to 1000000, got {x}",
                self.name,
                self.names[i]
            );
        }
        Ok(x as usize)
    }

    /// A length of time, 0 by default, never negative.
    fn duration(&self, i: usize) -> Result<i64> {
        let ms = self.interval(i, 0)?;
        if ms < 0 {
            return plan_err!(
                "{}(): {} must not be negative, got {}",
                self.name,
                self.names[i],
                spell_ms(ms)
            );
        }
        Ok(ms)
    }

    /// A UTC offset: from −14 to +14 hours.
    fn utc_offset(&self, i: usize) -> Result<i64> {
        const MAX_MS: i64 = 14 * 3_600_000;
        let ms = self.interval(i, 0)?;
        if !(-MAX_MS..=MAX_MS).contains(&ms) {
            return plan_err!(
                "{}(): {} is a UTC offset, from INTERVAL '-14 hours' to INTERVAL '14 hours' \
                 (Hanoi: INTERVAL '7 hours'), got {}",
                self.name,
                self.names[i],
                spell_ms(ms)
            );
        }
        Ok(ms)
    }

    fn interval(&self, i: usize, default: i64) -> Result<i64> {
        match self.get(i) {
            None => Ok(default),
            Some(v) => interval_ms(v)
                .map_err(|e| plan_datafusion_err!("{}(): {}: {e}", self.name, self.names[i])),
        }
    }

    fn text(&self, i: usize) -> Result<Option<String>> {
        match self.get(i) {
            None => Ok(None),
            Some(
                ScalarValue::Utf8(Some(s))
                | ScalarValue::LargeUtf8(Some(s))
                | ScalarValue::Utf8View(Some(s)),
            ) => Ok(Some(s.clone())),
            Some(v) => plan_err!(
                "{}(): {} must be a string, got {v}",
                self.name,
                self.names[i]
            ),
        }
    }
}

/// A detector, health check or alert machine as a window function.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct SeriesFunc {
    kind: SeriesKind,
    signature: Signature,
}

impl SeriesFunc {
    /// The function for `kind`.
    pub fn new(kind: SeriesKind) -> Self {
        Self {
            kind,
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }

    /// Which function it is.
    pub fn kind(&self) -> SeriesKind {
        self.kind
    }
}

/// Every function of this module as a [`WindowUDF`].
pub fn window_functions() -> Vec<Arc<WindowUDF>> {
    ALL.iter()
        .map(|k| Arc::new(WindowUDF::from(SeriesFunc::new(*k))))
        .collect()
}

impl WindowUDFImpl for SeriesFunc {
    fn name(&self) -> &str {
        self.kind.name()
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        let name = self.kind.name();
        let (required, names) = self.kind.params();
        if arg_types.len() < 2 + required || arg_types.len() > 2 + names.len() {
            return plan_err!(
                "{name}(value, ts{}) takes {} to {} arguments, got {}",
                names.iter().map(|n| format!(", {n}")).collect::<String>(),
                2 + required,
                2 + names.len(),
                arg_types.len()
            );
        }
        let value = if matches!(self.kind, SeriesKind::Vector | SeriesKind::T2) {
            match &arg_types[0] {
                DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _)
                    if f.data_type().is_numeric() || f.data_type() == &DataType::Null =>
                {
                    DataType::new_list(DataType::Float64, true)
                }
                other => {
                    return plan_err!(
                        "{name}(): value must be an array of numbers, e.g. [flow, speed, occupancy], got {other}"
                    );
                }
            }
        } else if arg_types[0].is_numeric() || arg_types[0] == DataType::Null {
            DataType::Float64
        } else {
            return plan_err!("{name}(): value must be a number, got {}", arg_types[0]);
        };
        let ts = match &arg_types[1] {
            DataType::Timestamp(_, tz) => DataType::Timestamp(TimeUnit::Millisecond, tz.clone()),
            DataType::Date32 | DataType::Date64 => DataType::Timestamp(TimeUnit::Millisecond, None),
            other => {
                return plan_err!("{name}(): ts must be a timestamp (the event time), got {other}");
            }
        };
        let mut out = vec![value, ts];
        out.extend(arg_types[2..].iter().cloned());
        Ok(out)
    }

    fn partition_evaluator(
        &self,
        args: PartitionEvaluatorArgs,
    ) -> Result<Box<dyn PartitionEvaluator>> {
        let prototype = self.kind.state_from_exprs(args.input_exprs())?;
        Ok(Box::new(SeriesEvaluator {
            kind: self.kind,
            prototype,
        }))
    }

    fn field(&self, field_args: WindowUDFFieldArgs) -> Result<FieldRef> {
        Ok(Arc::new(Field::new(
            field_args.name(),
            DataType::Struct(self.kind.output_fields()),
            true,
        )))
    }
}

/// Runs one partition, in order, from a fresh state.
#[derive(Debug)]
struct SeriesEvaluator {
    kind: SeriesKind,
    prototype: SeriesState,
}

impl PartitionEvaluator for SeriesEvaluator {
    fn evaluate_all(&mut self, values: &[ArrayRef], num_rows: usize) -> Result<ArrayRef> {
        let (x, t) = inputs(self.kind.name(), values)?;
        let mut state = self.prototype.clone();
        let mut rows = Vec::with_capacity(num_rows);
        let mut row = Vec::new();
        for r in 0..num_rows {
            if t.is_null(r) {
                rows.push(state.blank());
                continue;
            }
            x.row(r, &mut row);
            rows.push(state.step_values(t.value(r), &row));
        }
        self.kind.build(&rows)
    }
}
