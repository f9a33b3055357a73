//! Anomaly detectors, sensor health and alert semantics.
//!
//! Everything here is a keyed, incremental state machine over one entity's time-ordered series
//! (a sensor, a detector, a segment): [`SeriesState::step`] takes one reading and does O(1)
//! work (O(window) for the rolling median), and the state is plain data (`serde`), so an engine
//! can checkpoint it. The SQL surface ([`udwf`]) exposes each as a window function written
//! `f(value, ts, …) OVER (PARTITION BY key ORDER BY ts)`: in plain DataFusion it runs over a
//! whole partition, and urbanstream's stream engine keeps the state of each key across
//! micro-batches.
//!
//! - Detectors return a [`Score`]: a signed score in standard deviations (or the rule's units),
//!   the baseline it compared against, and whether it is still warming up:
//!   [`Ewma`], [`RollingMad`], [`Cusum`], [`Seasonal`] and the default [`Combined`].
//! - [`Health`] flags one kind of sensor fault ([`FaultKind`]).
//! - [`AlertMachine`] turns scores into alert transitions with hysteresis, minimum duration,
//!   cooldown, expiry and emit-on-change.

mod alert;
mod combined;
mod cusum;
mod ewma;
mod health;
mod hotelling;
mod likelihood;
mod mad;
mod seasonal;
pub mod udwf;
mod vector;

#[cfg(test)]
mod tests;

pub use alert::{AlertMachine, AlertOut, AlertRule, AlertTransition};
pub use combined::Combined;
pub use cusum::Cusum;
pub use ewma::Ewma;
pub use health::{FaultKind, Health, HealthOut, max_step_per_minute};
pub use hotelling::Hotelling;
pub use likelihood::Calibrator;
pub use mad::RollingMad;
pub use seasonal::{Season, Seasonal};
pub use vector::{VectorOut, VectorScore};

use serde::{Deserialize, Serialize};

/// Scores are clamped to this magnitude: a deviation from a perfectly constant series is
/// "very large", not infinite.
pub const MAX_SCORE: f64 = 1.0e6;

/// What a detector says about one reading.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Score {
    /// Signed deviation (positive above the baseline); `None` for a missing, non-finite or
    /// out-of-range ([`MAX_READING`]) reading, or before the detector has anything to
    /// compare with.
    pub score: Option<f64>,
    /// The value the detector expected.
    pub baseline: Option<f64>,
    /// Whether the detector has seen too little of this series to be trusted.
    pub warming: bool,
    /// The anomaly likelihood in [0, 1] (see [`Calibrator`]): the same threshold means the
    /// same false-alert rate on every series. `None` for detectors that do not calibrate, and
    /// while the calibration is warming up.
    pub likelihood: Option<f64>,
    /// The spread the detector measures a reading's deviation in, in the series' own units (a
    /// standard deviation or its robust equivalent): a reading at `baseline ± 3 · scale`
    /// deviates by 3 of them, so that range is the expected range an alert can quote. Where
    /// the score is that ratio (`Ewma`, `RollingMad`, `Seasonal`, and the spike part of
    /// `Combined`), `(x − baseline) / scale` is the score; a running sum (`Cusum`, the shift
    /// part of `Combined`) can score far out while the reading is inside the range, and
    /// `Hotelling` gives the spread of the column it names. `None` before the detector has a
    /// spread.
    pub scale: Option<f64>,
}

/// The largest magnitude a detector takes a reading of: no sensor's, and far enough from the
/// largest double that the squares and sums of a detector's statistics stay finite (readings
/// near ±1.8e308 made them infinite, then NaN, and a comparison with NaN bounds panicked).
/// A reading beyond it is treated as a non-finite one: not scored, not learnt; the sensor
/// checks (`sensor_out_of_range`) see it as it is.
pub const MAX_READING: f64 = 1.0e100;

/// `x` if a detector can take it: present, finite and within [`MAX_READING`].
pub(crate) fn usable(x: Option<f64>) -> Option<f64> {
    x.filter(|v| v.is_finite() && v.abs() <= MAX_READING)
}

/// `(x - baseline) / scale`, the scale floored so that a constant series gives a finite score.
pub(crate) fn standardise(x: f64, baseline: f64, scale: f64) -> f64 {
    let floor = 1e-9_f64.max(1e-9 * baseline.abs());
    let z = (x - baseline) / scale.max(floor);
    z.clamp(-MAX_SCORE, MAX_SCORE)
}

/// One output row of a keyed function.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Emitted {
    /// A detector's score.
    Score(Score),
    /// A sensor-health check.
    Health(HealthOut),
    /// An alert machine's transition.
    Alert(AlertOut),
    /// A detector over several columns.
    Vector(VectorOut),
}

/// The state of one keyed function for one key: every detector, health check and alert
/// machine of this module behind one type, so that an engine can hold, step and checkpoint
/// them without knowing which is which.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub enum SeriesState {
    /// [`Ewma`].
    Ewma(Ewma),
    /// [`RollingMad`].
    Mad(RollingMad),
    /// [`Cusum`].
    Cusum(Cusum),
    /// [`Seasonal`].
    Seasonal(Seasonal),
    /// [`Combined`].
    Combined(Box<Combined>),
    /// [`Health`].
    Health(Health),
    /// [`AlertMachine`].
    Alert(AlertMachine),
    /// [`VectorScore`].
    Vector(Box<VectorScore>),
    /// [`Hotelling`].
    Hotelling(Box<Hotelling>),
}

impl Clone for SeriesState {
    fn clone(&self) -> Self {
        match self {
            SeriesState::Ewma(d) => SeriesState::Ewma(d.clone()),
            SeriesState::Mad(d) => SeriesState::Mad(d.clone()),
            SeriesState::Cusum(d) => SeriesState::Cusum(d.clone()),
            SeriesState::Seasonal(d) => SeriesState::Seasonal(d.clone()),
            SeriesState::Combined(d) => SeriesState::Combined(d.clone()),
            SeriesState::Health(h) => SeriesState::Health(h.clone()),
            SeriesState::Alert(a) => SeriesState::Alert(a.clone()),
            SeriesState::Vector(d) => SeriesState::Vector(d.clone()),
            SeriesState::Hotelling(d) => SeriesState::Hotelling(d.clone()),
        }
    }

    /// Reuses the buffers of a state of the same kind (a key's state copied while a
    /// checkpoint holds it then touches no fresh memory).
    fn clone_from(&mut self, source: &Self) {
        match (self, source) {
            (SeriesState::Mad(d), SeriesState::Mad(s)) => d.clone_from(s),
            (SeriesState::Seasonal(d), SeriesState::Seasonal(s)) => d.clone_from(s),
            (SeriesState::Combined(d), SeriesState::Combined(s)) => d.clone_from(s),
            (SeriesState::Vector(d), SeriesState::Vector(s)) => d.clone_from(s),
            (SeriesState::Hotelling(d), SeriesState::Hotelling(s)) => d.clone_from(s),
            (this, source) => *this = source.clone(),
        }
    }
}

impl SeriesState {
    /// Feeds one reading at event time `t_ms` (milliseconds since the epoch). `x` is `None`
    /// (or NaN) for a missing value.
    pub fn step(&mut self, t_ms: i64, x: Option<f64>) -> Emitted {
        let x = x.filter(|v| !v.is_nan());
        match self {
            SeriesState::Ewma(d) => Emitted::Score(d.update(x)),
            SeriesState::Mad(d) => Emitted::Score(d.update(x)),
            SeriesState::Cusum(d) => Emitted::Score(d.update(x)),
            SeriesState::Seasonal(d) => Emitted::Score(d.update(t_ms, x)),
            SeriesState::Combined(d) => Emitted::Score(d.update(t_ms, x)),
            SeriesState::Health(h) => Emitted::Health(h.update(t_ms, x)),
            SeriesState::Alert(a) => Emitted::Alert(a.update(t_ms, x)),
            SeriesState::Vector(d) => Emitted::Vector(d.update(t_ms, &[x])),
            SeriesState::Hotelling(d) => Emitted::Vector(d.update(t_ms, &[x])),
        }
    }

    /// Feeds one reading of several values (a detector over several columns); the others
    /// take the first value.
    pub fn step_values(&mut self, t_ms: i64, xs: &[Option<f64>]) -> Emitted {
        match self {
            // Each column's detector treats a NaN as a missing reading.
            SeriesState::Vector(d) => Emitted::Vector(d.update(t_ms, xs)),
            SeriesState::Hotelling(d) => Emitted::Vector(d.update(t_ms, xs)),
            other => other.step(t_ms, xs.first().copied().flatten()),
        }
    }

    /// The output for a row that cannot be placed in time (no timestamp): nothing learnt,
    /// nothing said.
    pub fn blank(&self) -> Emitted {
        match self {
            SeriesState::Health(_) => Emitted::Health(HealthOut::default()),
            SeriesState::Alert(_) => Emitted::Alert(AlertOut::default()),
            SeriesState::Vector(_) | SeriesState::Hotelling(_) => Emitted::Vector(VectorOut {
                score: Score {
                    warming: true,
                    ..Score::default()
                },
                column: None,
            }),
            _ => Emitted::Score(Score {
                warming: true,
                ..Score::default()
            }),
        }
    }

    /// The event time at which this state wants to speak without new input (a sensor that
    /// went silent, an alert that expires), if any.
    pub fn due(&self) -> Option<i64> {
        match self {
            SeriesState::Health(h) => h.due(),
            SeriesState::Alert(a) => a.due(),
            _ => None,
        }
    }

    /// Called once the watermark has passed [`SeriesState::due`]: the row to emit, if any.
    pub fn fire(&mut self, watermark: i64) -> Option<Emitted> {
        match self {
            SeriesState::Health(h) => h.fire(watermark).map(Emitted::Health),
            SeriesState::Alert(a) => a.fire(watermark).map(Emitted::Alert),
            _ => None,
        }
    }

    /// Whether it holds something a consumer waits on (a raised alert): such state is not
    /// dropped for silence.
    pub fn is_open(&self) -> bool {
        match self {
            SeriesState::Alert(a) => a.is_open(),
            _ => false,
        }
    }

    /// Approximate bytes held.
    pub fn size(&self) -> usize {
        std::mem::size_of::<Self>()
            + match self {
                SeriesState::Mad(d) => d.heap_size(),
                SeriesState::Seasonal(d) => d.heap_size(),
                SeriesState::Combined(d) => std::mem::size_of::<Combined>() + d.heap_size(),
                SeriesState::Vector(d) => std::mem::size_of::<VectorScore>() + d.heap_size(),
                SeriesState::Hotelling(d) => std::mem::size_of::<Hotelling>() + d.heap_size(),
                _ => 0,
            }
    }
}
