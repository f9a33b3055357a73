//! The city's other feeds: parking occupancy, water levels with rain, citizens' reports.
//!
//! They draw from one random stream of their own (seeded from the run's seed), so turning them
//! on leaves the traffic and air records of a seed as they were, except where water on a road
//! slows its traffic.
//!
//! - **Parking**: every lot and street of `parking_lots.csv` reports once a minute. Demand
//!   follows its area's day: the old quarter fills in the evening (fuller at weekends), office
//!   streets on weekdays' working hours, visitor parks at weekends, markets in the morning.
//!   A barrier counter reports the vehicles inside against the capacity; bay sensors report the
//!   occupied bays among those online (a few go offline now and then).
//! - **Water**: rain events (random, and a storm at [`super::SimConfig::storm_at_ms`]) raise
//!   the water on the road gauges of `gauges.csv` where the rain exceeds the site's drainage
//!   (a storm: 20–40 cm at the worst sites), and it drains away in an hour or two after; the river gauge rises slowly. Each gauge reports once a minute
//!   (level gauges also their rain gauge's intensity). Water on a road slows its traffic.
//! - **Citizens' reports**: a background of reports of every category across the wards, and
//!   reports of flooding where water stands, of accidents where incidents are, and of smoke in
//!   haze.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::{SimRecord, SimTopic};
pub use crate::reference::services::{Gauge, ParkingLot};

#[derive(Serialize)]
struct ParkingJson<'a> {
    lot_id: &'a str,
    sensor: &'a str,
    spaces: u32,
    occupied: u32,
    event_time: i64,
}

#[derive(Serialize)]
struct WaterJson<'a> {
    gauge_id: &'a str,
    kind: &'a str,
    level_cm: Option<f64>,
    rainfall_mm_h: Option<f64>,
    event_time: i64,
}

#[derive(Serialize)]
struct ReportJson<'a> {
    report_id: String,
    category: &'a str,
    ward_id: &'a str,
    lat: Option<f64>,
    lon: Option<f64>,
    text: String,
    event_time: i64,
}

/// A rain event: intensity rises to `peak` at its middle and falls back (mm/h).
#[derive(Debug, Clone, Copy)]
struct Rain {
    from_ms: i64,
    until_ms: i64,
    peak: f64,
}

impl Rain {
    fn intensity(&self, t: i64) -> f64 {
        if t < self.from_ms || t >= self.until_ms {
            return 0.0;
        }
        let x = (t - self.from_ms) as f64 / (self.until_ms - self.from_ms) as f64;
        self.peak * (1.0 - (2.0 * x - 1.0).abs())
    }
}

/// A report to file: category, ward, location, text.
type Filed = (&'static str, String, Option<(f64, f64)>, String);

/// The state of the other feeds.
pub(super) struct Services {
    rng: ChaCha8Rng,
    pub(super) lots: Vec<ParkingLot>,
    /// Per lot: slow noise on its demand.
    drift: Vec<f64>,
    /// Per street: bays offline.
    offline: Vec<u32>,
    pub(super) gauges: Vec<Gauge>,
    /// Per gauge: the water now, cm.
    pub(super) levels: Vec<f64>,
    /// Per road gauge: rain its drains take away (mm/h) and how much the street gathers.
    drainage: Vec<(f64, f64)>,
    rain: Option<Rain>,
    storm_at_ms: Option<i64>,
    reports: u64,
    reports_per_hour: f64,
}

/// Rain events per simulated hour, besides the storm.
const RAIN_PER_HOUR: f64 = 1.0 / 24.0;

impl Services {
    pub(super) fn new(
        reference: &crate::reference::ReferenceData,
        seed: u64,
        storm_at_ms: Option<i64>,
        reports_per_hour: f64,
    ) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5e41_ce5f_eed5);
        let (lots, gauges) = (reference.parking_lots.clone(), reference.gauges.clone());
        let drift = vec![0.0; lots.len()];
        let offline = vec![0; lots.len()];
        let levels = gauges
            .iter()
            .map(|g| {
                if g.on_road() {
                    0.0
                } else {
                    g.level_1_cm * 0.75
                }
            })
            .collect();
        let drainage = gauges
            .iter()
            .map(|_| (rng.random_range(22.0..35.0), rng.random_range(4.0..8.0)))
            .collect();
        Self {
            rng,
            lots,
            drift,
            offline,
            gauges,
            levels,
            drainage,
            rain: None,
            storm_at_ms,
            reports: 0,
            reports_per_hour,
        }
    }

    /// The rain now, mm/h.
    pub(super) fn rain_mm_h(&self, t: i64) -> f64 {
        self.rain.map_or(0.0, |r| r.intensity(t))
    }

    /// One simulated minute starting at `t0`: every lot's and gauge's reading, and the reports
    /// filed in it. `incident_wards` are the wards with a traffic incident now; `haze` whether
    /// the air is hazy. A `malformed_share` of the records are cut short (DLQ material).
    pub(super) fn minute(
        &mut self,
        t0: i64,
        incident_wards: &[String],
        haze: bool,
        malformed_share: f64,
        out: &mut Vec<SimRecord>,
    ) {
        let first = out.len();
        self.weather(t0);
        self.parking(t0, out);
        self.water(t0, out);
        self.citizens(t0, incident_wards, haze, out);
        for record in &mut out[first..] {
            if self.rng.random_bool(malformed_share.clamp(0.0, 1.0)) {
                let half = record.payload.len() / 2;
                record.payload.truncate(half);
            }
        }
    }

    fn weather(&mut self, t0: i64) {
        if self.rain.is_some_and(|r| t0 >= r.until_ms) {
            self.rain = None;
        }
        if self.rain.is_none() {
            let storm = self.storm_at_ms.is_some_and(|at| t0 >= at);
            if storm || self.rng.random_bool(RAIN_PER_HOUR / 60.0) {
                if storm {
                    self.storm_at_ms = None;
                }
                let minutes = self.rng.random_range(50..100);
                self.rain = Some(Rain {
                    from_ms: t0,
                    until_ms: t0 + minutes * 60_000,
                    peak: if storm {
                        self.rng.random_range(85.0..110.0)
                    } else {
                        self.rng.random_range(30.0..90.0)
                    },
                });
            }
        }
    }

    fn parking(&mut self, t0: i64, out: &mut Vec<SimRecord>) {
        let hour = super::hanoi_hour(t0);
        let weekend = hanoi_weekday(t0) >= 5;
        for i in 0..self.lots.len() {
            let lot = &self.lots[i];
            self.drift[i] = 0.95 * self.drift[i] + self.rng.random_range(-0.015..0.015);
            let demand = (parking_demand(&lot.area, hour, weekend) + self.drift[i]).max(0.0);
            let (sensor, spaces, occupied) = if lot.kind == "street" {
                if self.rng.random_bool(0.01) {
                    self.offline[i] = self.rng.random_range(0..3);
                }
                let spaces = lot.capacity.saturating_sub(self.offline[i]).max(1);
                let noise = self.rng.random_range(-0.04..0.04);
                let occupied = ((demand + noise).clamp(0.0, 1.0) * f64::from(spaces)).round();
                ("bay", spaces, occupied as u32)
            } else {
                let occupied = (demand.min(1.0) * f64::from(lot.capacity)).round();
                ("barrier", lot.capacity, occupied as u32)
            };
            let payload = serde_json::to_vec(&ParkingJson {
                lot_id: &lot.lot_id,
                sensor,
                spaces,
                occupied,
                event_time: t0,
            })
            .unwrap_or_default();
            out.push(SimRecord {
                topic: SimTopic::Parking,
                key: lot.lot_id.clone(),
                payload,
                event_time: t0,
            });
        }
    }

    fn water(&mut self, t0: i64, out: &mut Vec<SimRecord>) {
        let rain = self.rain_mm_h(t0);
        for i in 0..self.gauges.len() {
            let gauge = &self.gauges[i];
            if gauge.on_road() {
                // cm per minute: what the drains cannot take, gathered by the street; standing
                // water also runs off, the faster the deeper.
                let (drain, gather) = self.drainage[i];
                let change = (rain - drain) * gather / 600.0 - 0.015 * self.levels[i];
                self.levels[i] = (self.levels[i] + change).max(0.0);
            } else {
                // The river rises slowly with the rain over its basin and falls back.
                let base = gauge.level_1_cm * 0.75;
                self.levels[i] += rain * 0.01 - (self.levels[i] - base) * 0.002;
            }
            // A reading now and then fails (no level).
            let level = (!self.rng.random_bool(0.005)).then(|| {
                let noise = self.rng.random_range(-0.3..0.3);
                ((self.levels[i] + noise).max(0.0) * 10.0).round() / 10.0
            });
            let rainfall = (gauge.kind == "gauge")
                .then(|| ((rain * self.rng.random_range(0.9..1.1)) * 10.0).round() / 10.0);
            let payload = serde_json::to_vec(&WaterJson {
                gauge_id: &gauge.gauge_id,
                kind: &gauge.kind,
                level_cm: level,
                rainfall_mm_h: rainfall,
                event_time: t0,
            })
            .unwrap_or_default();
            out.push(SimRecord {
                topic: SimTopic::Water,
                key: gauge.gauge_id.clone(),
                payload,
                event_time: t0,
            });
        }
    }

    fn citizens(
        &mut self,
        t0: i64,
        incident_wards: &[String],
        haze: bool,
        out: &mut Vec<SimRecord>,
    ) {
        let mut filed: Vec<Filed> = Vec::new();
        // Where water stands on a road, people report it.
        for (i, gauge) in self.gauges.iter().enumerate() {
            if gauge.on_road() && self.levels[i] >= gauge.level_1_cm && self.rng.random_bool(0.3) {
                filed.push((
                    "flooding",
                    gauge.ward_id.clone(),
                    Some((gauge.lat, gauge.lon)),
                    format!(
                        "Nước ngập khoảng {} cm ở {}, xe máy chết máy",
                        self.levels[i].round(),
                        gauge.name
                    ),
                ));
            }
        }
        for ward in incident_wards {
            if self.rng.random_bool(0.1) {
                filed.push((
                    "accident",
                    ward.clone(),
                    None,
                    "Va chạm giao thông, xe cộ ùn tắc kéo dài".into(),
                ));
            }
        }
        if haze && self.rng.random_bool(0.2) && !self.lots.is_empty() {
            let lot = &self.lots[self.rng.random_range(0..self.lots.len())];
            filed.push((
                "pollution",
                lot.ward_id.clone(),
                None,
                "Khói bụi mù mịt, khó thở".into(),
            ));
        }
        // The background: potholes, complaints, everything else.
        if !self.lots.is_empty()
            && self
                .rng
                .random_bool((self.reports_per_hour / 60.0).min(1.0))
        {
            const BACKGROUND: [(&str, &str); 4] = [
                ("pothole", "Ổ gà lớn giữa đường, nguy hiểm cho xe máy"),
                ("congestion", "Tắc đường, đi mãi không qua được ngã tư"),
                ("pollution", "Đốt rác gây khói"),
                ("other", "Đèn đường không sáng"),
            ];
            let (category, text) = BACKGROUND[self.rng.random_range(0..BACKGROUND.len())];
            let lot = &self.lots[self.rng.random_range(0..self.lots.len())];
            filed.push((
                category,
                lot.ward_id.clone(),
                self.rng.random_bool(0.7).then_some((lot.lat, lot.lon)),
                text.into(),
            ));
        }
        for (category, ward, at, text) in filed {
            self.reports += 1;
            // Filed some seconds into the minute.
            let t = t0 + self.rng.random_range(0..60_000);
            let payload = serde_json::to_vec(&ReportJson {
                report_id: format!("r-{:07}", self.reports),
                category,
                ward_id: &ward,
                lat: at.map(|a| a.0),
                lon: at.map(|a| a.1),
                text,
                event_time: t,
            })
            .unwrap_or_default();
            out.push(SimRecord {
                topic: SimTopic::Report,
                key: ward,
                payload,
                event_time: t,
            });
        }
    }
}

/// The day of the week in Hanoi, Monday 0 to Sunday 6.
pub fn hanoi_weekday(epoch_ms: i64) -> u32 {
    // 1970-01-01 was a Thursday (3).
    ((epoch_ms + super::HANOI_OFFSET_MS).div_euclid(86_400_000) + 3).rem_euclid(7) as u32
}

/// The share of a lot's spaces wanted at `hour` (local) by its area's pattern.
pub fn parking_demand(area: &str, hour: f64, weekend: bool) -> f64 {
    let bump = |center: f64, width: f64| (-((hour - center) / width).powi(2)).exp();
    match area {
        "old_quarter" => {
            let evening = if weekend { 0.68 } else { 0.58 };
            0.3 + 0.25 * bump(12.0, 3.0) + evening * bump(20.0, 1.8)
        }
        "office" if !weekend => {
            let working = 1.0 / (1.0 + (-(hour - 8.0) * 3.0).exp())
                * (1.0 / (1.0 + ((hour - 17.5) * 3.0).exp()));
            0.1 + 0.85 * working
        }
        "office" => 0.15 + 0.15 * bump(14.0, 4.0),
        "visitor" => {
            let scale = if weekend { 1.5 } else { 1.0 };
            0.15 + scale * (0.4 * bump(10.0, 2.5) + 0.2 * bump(16.0, 2.5))
        }
        "market" => 0.2 + 0.7 * bump(7.5, 2.0) + 0.25 * bump(17.0, 2.0),
        _ => 0.5,
    }
}
