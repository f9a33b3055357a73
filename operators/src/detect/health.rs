//! Sensor health: stuck, out of physical range, missing, impossible jumps.

use serde::{Deserialize, Serialize};

/// Largest plausible change per minute of a reading, by quantity (as named in SQL). A larger
/// change between consecutive readings is a fault of the sensor, not of the air or the road.
pub const MAX_STEP_PER_MINUTE: [(&str, f64); 12] = [
    ("pm25", 300.0),
    ("pm10", 500.0),
    ("no2", 400.0),
    ("so2", 500.0),
    ("co", 20_000.0),
    ("o3", 300.0),
    ("temperature_c", 5.0),
    ("humidity_pct", 30.0),
    ("speed_kmh", 100.0),
    ("occupancy_pct", 80.0),
    ("volume", 2_000.0),
    ("confidence", 1.0),
];

/// The largest plausible change per minute of `quantity`, if known.
pub fn max_step_per_minute(quantity: &str) -> Option<f64> {
    let q = quantity.to_ascii_lowercase();
    MAX_STEP_PER_MINUTE.iter().find(|r| r.0 == q).map(|r| r.1)
}

/// One kind of sensor fault, each its own alert kind.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum FaultKind {
    /// The same value for `readings` consecutive readings.
    Stuck {
        /// Identical readings that make a fault.
        readings: u32,
    },
    /// A value outside `[low, high]`.
    OutOfRange {
        /// Lowest possible value.
        low: f64,
        /// Highest possible value.
        high: f64,
    },
    /// No reading for `k` × `expected_ms`, on event time.
    Missing {
        /// Expected interval between readings.
        expected_ms: i64,
        /// Multiple of the interval that makes a gap.
        k: f64,
    },
    /// A change faster than `per_minute` between consecutive readings.
    Jump {
        /// Largest plausible change per minute.
        per_minute: f64,
    },
}

/// One health check's verdict on a reading.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct HealthOut {
    /// Whether the fault is present.
    pub fault: bool,
    /// The reading (none for a silence).
    pub value: Option<f64>,
    /// What the check measured: identical readings in a row (stuck), the bound crossed (out of
    /// range), the silence in seconds (missing), the change from the previous reading (jump).
    pub detail: Option<f64>,
}

/// A sensor-health check for one kind of fault, over one sensor's readings in time order.
///
/// `missing` is decided on event time: the check asks to be woken ([`Health::due`]) at the
/// last reading's time + k × interval, so that an engine can flag a sensor that went silent
/// for good once the watermark passes that time; run over a finished table instead, the gap is
/// flagged on the reading that ends it. A missing value (NULL) is not a reading for the other
/// checks, but shows that the sensor is alive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    kind: FaultKind,
    last_t: Option<i64>,
    last_x: Option<f64>,
    run: u32,
    silent: bool,
}

impl Health {
    /// A check for `kind`.
    pub fn new(kind: FaultKind) -> Self {
        Self {
            kind,
            last_t: None,
            last_x: None,
            run: 0,
            silent: false,
        }
    }

    /// Checks the reading `x` at `t_ms`.
    pub fn update(&mut self, t_ms: i64, x: Option<f64>) -> HealthOut {
        let x = x.filter(|v| v.is_finite());
        let mut out = HealthOut {
            fault: false,
            value: x,
            detail: None,
        };
        match self.kind {
            FaultKind::Missing { expected_ms, k } => {
                if let Some(last) = self.last_t {
                    let gap = t_ms.saturating_sub(last);
                    // A silence already reported ends with this reading.
                    out.fault = !self.silent && gap as f64 > k * expected_ms as f64;
                    out.detail = Some(gap as f64 / 1000.0);
                }
                self.silent = false;
                self.last_t = Some(self.last_t.map_or(t_ms, |l| l.max(t_ms)));
                return out;
            }
            FaultKind::Stuck { readings } => {
                let Some(x) = x else { return out };
                let same = self
                    .last_x
                    .is_some_and(|l| (l - x).abs() <= 1e-9 * l.abs().max(1.0));
                self.run = if same { self.run.saturating_add(1) } else { 1 };
                out.fault = self.run >= readings;
                out.detail = Some(f64::from(self.run));
            }
            FaultKind::OutOfRange { low, high } => {
                let Some(x) = x else { return out };
                if x < low {
                    out.fault = true;
                    out.detail = Some(low);
                } else if x > high {
                    out.fault = true;
                    out.detail = Some(high);
                }
            }
            FaultKind::Jump { per_minute } => {
                let Some(x) = x else { return out };
                if let (Some(lt), Some(lx)) = (self.last_t, self.last_x) {
                    let minutes = ((t_ms - lt) as f64 / 60_000.0).max(1.0);
                    let change = x - lx;
                    out.fault = change.abs() / minutes > per_minute;
                    out.detail = Some(change);
                }
            }
        }
        self.last_t = Some(t_ms);
        self.last_x = x;
        out
    }

    /// When a silence becomes a fault, for the missing check.
    pub fn due(&self) -> Option<i64> {
        match (self.kind, self.last_t, self.silent) {
            (FaultKind::Missing { expected_ms, k }, Some(last), false) => {
                Some(last.saturating_add((k * expected_ms as f64).ceil() as i64))
            }
            _ => None,
        }
    }

    /// The silence, once the watermark has passed [`Health::due`] (a reading stamped exactly
    /// at that time would still be in time). Its detail is the silence in seconds at the time
    /// it became a fault (`due − last reading`), whatever the watermark has reached since, so
    /// that the row does not depend on how the input was cut into batches.
    pub fn fire(&mut self, watermark: i64) -> Option<HealthOut> {
        let due = self.due()?;
        if watermark <= due {
            return None;
        }
        self.silent = true;
        Some(HealthOut {
            fault: true,
            value: None,
            detail: self.last_t.map(|l| due.saturating_sub(l) as f64 / 1000.0),
        })
    }
}
