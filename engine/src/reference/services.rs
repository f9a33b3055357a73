//! The reference tables of the city's other feeds, typed: the parking lots and streets of
//! `parking_lots.csv` and the water-level gauges of `gauges.csv`, as the simulator places its
//! sensors and the web console draws them, parsed and checked with the rest of
//! [`super::ReferenceData`]. (Queries read them as any reference table.)

use serde::Deserialize;

/// A lot or street of `parking_lots.csv`.
#[derive(Debug, Clone, Deserialize)]
pub struct ParkingLot {
    /// Stable id.
    pub lot_id: String,
    /// Display name.
    pub name: String,
    /// `lot` (a barrier counter) or `street` (bay sensors).
    pub kind: String,
    /// Demand pattern: `old_quarter`, `office`, `visitor` or `market`.
    pub area: String,
    /// Ward it is in.
    pub ward_id: String,
    /// Spaces.
    pub capacity: u32,
    /// Latitude.
    pub lat: f64,
    /// Longitude.
    pub lon: f64,
}

/// A water-level gauge or camera of `gauges.csv`.
#[derive(Debug, Clone, Deserialize)]
pub struct Gauge {
    /// Stable id.
    pub gauge_id: String,
    /// Display name.
    pub name: String,
    /// `gauge` or `camera`.
    pub kind: String,
    /// Ward it is in.
    pub ward_id: String,
    /// Road segment it watches; empty for the river gauge.
    pub segment_id: Option<String>,
    /// Latitude.
    pub lat: f64,
    /// Longitude.
    pub lon: f64,
    /// Warning level I, cm.
    pub level_1_cm: f64,
    /// Warning level II, cm.
    pub level_2_cm: f64,
    /// Warning level III, cm.
    pub level_3_cm: f64,
}

impl Gauge {
    /// Whether it watches a road (not the river).
    pub fn on_road(&self) -> bool {
        self.segment_id.as_deref().is_some_and(|s| !s.is_empty())
    }
}
