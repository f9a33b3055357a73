//! Simulate: a deterministic simulated city producing the city's input topics.
//!
//! [`CitySimulator`] advances simulated time one second per [`CitySimulator::next_tick`] and
//! returns that second's records: camera detections on every segment (motorbike-dominated class
//! mix; speeds fall with load), detector readings and air readings every interval, with daily
//! rush hours, injected incidents (a segment's speed collapses and its cameras raise incident
//! events), haze episodes, sensor faults (stuck, missing, spikes), and a configurable share of
//! malformed, out-of-order and late records. The same seed and settings give the same records.
//! With [`SimConfig::all_feeds`] it also produces parking occupancy, water levels (with rain
//! and floods that slow the traffic) and citizens' reports ([`services`]).
//!
//! [`run_producer`] paces the simulator against the wall clock (`speedup` simulated seconds per
//! wall second) and produces into Kafka.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Poisson};
use serde::Serialize;

use crate::reference::{HOTSPOT_ROADS, ReferenceData, RoadClass};

pub mod services;

/// Hanoi is UTC+7 all year.
pub const HANOI_OFFSET_MS: i64 = 7 * 3_600_000;

/// Which input topic a record is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SimTopic {
    /// `city.camera.events`.
    Camera,
    /// `city.traffic.detectors`.
    Detector,
    /// `city.air.readings`.
    Air,
    /// `city.parking.readings`.
    Parking,
    /// `city.water.levels`.
    Water,
    /// `city.citizen.reports`.
    Report,
}

impl SimTopic {
    /// Every feed.
    pub const ALL: [SimTopic; 6] = [
        SimTopic::Camera,
        SimTopic::Detector,
        SimTopic::Air,
        SimTopic::Parking,
        SimTopic::Water,
        SimTopic::Report,
    ];

    /// The table of the city's SQL context the feed is (declared by its schema file).
    pub fn table(self) -> &'static str {
        match self {
            SimTopic::Camera => "camera_events",
            SimTopic::Detector => "detector_readings",
            SimTopic::Air => "air_readings",
            SimTopic::Parking => "parking_readings",
            SimTopic::Water => "water_levels",
            SimTopic::Report => "citizen_reports",
        }
    }
}

/// The topic of each of the simulator's feeds, as a deployment's `[topics]` names them.
#[derive(Debug, Clone)]
pub struct SimTopics(HashMap<SimTopic, String>);

impl SimTopics {
    /// The feeds' topics under `topics`, from the streams `schemas` declare.
    pub fn new(
        topics: &crate::topics::Topics,
        schemas: &crate::schema::SchemaRegistry,
    ) -> crate::error::Result<Self> {
        let streams = schemas.streams()?;
        let mut map = HashMap::new();
        for feed in SimTopic::ALL {
            let (_, declared) = streams
                .iter()
                .find(|(_, d)| d.table == feed.table())
                .ok_or_else(|| {
                    crate::error::Error::schema(
                        feed.table(),
                        "no schema file declares this stream (schemas/topics)",
                    )
                })?;
            map.insert(feed, topics.topic_of(declared));
        }
        Ok(Self(map))
    }

    /// The city's default topics.
    pub fn city() -> crate::error::Result<Self> {
        Self::new(
            &crate::topics::Topics::default(),
            &crate::schema::SchemaRegistry::embedded()?,
        )
    }

    /// The topic of `feed`.
    pub fn topic(&self, feed: SimTopic) -> &str {
        self.0.get(&feed).map_or("", String::as_str)
    }
}

/// One simulated Kafka record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimRecord {
    /// Target topic.
    pub topic: SimTopic,
    /// Record key (segment_id or ward_id).
    pub key: String,
    /// Record value (JSON, or deliberately malformed bytes).
    pub payload: Vec<u8>,
    /// Event time carried in the payload (epoch ms).
    pub event_time: i64,
}

/// Settings of the simulation.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Random seed: the same seed gives the same records.
    pub seed: u64,
    /// Mean camera detections per simulated second over the day; the actual rate follows the
    /// daily profile (about 1.6× at rush hour, 0.1× at night).
    pub detections_per_sim_second: f64,
    /// Simulated start time, epoch ms.
    pub start_ms: i64,
    /// Share of records made malformed (DLQ material).
    pub malformed_share: f64,
    /// Share of camera events delayed by up to 4 s (within the default watermark delay).
    pub out_of_order_share: f64,
    /// Share of camera events delayed by 1.5 to 5 minutes (beyond allowed lateness).
    pub late_share: f64,
    /// Incidents started per simulated hour across the city.
    pub incidents_per_hour: f64,
    /// Sensor faults started per simulated hour across all air sensors.
    pub sensor_faults_per_hour: f64,
    /// Hours of air readings before `start_ms` that the first tick also returns, so that
    /// hourly indicators needing past hours (NowCast wants 2 of the latest 3) start at once.
    pub air_history_hours: u32,
    /// Also parking occupancy, water levels and citizens' reports ([`services`]), from a
    /// random stream of their own (the other feeds' records stay those of the seed, but for
    /// water slowing the traffic on flooded roads).
    pub all_feeds: bool,
    /// With `all_feeds`: a storm (85–110 mm/h at its peak) starts at this simulated time.
    pub storm_at_ms: Option<i64>,
    /// With `all_feeds`: citizens' reports per simulated hour besides those of floods, incidents
    /// and haze.
    pub reports_per_hour: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            seed: 42,
            detections_per_sim_second: 100.0,
            start_ms: 1_767_222_000_000, // 2026-01-01 06:00 in Hanoi
            malformed_share: 0.002,
            out_of_order_share: 0.05,
            late_share: 0.002,
            incidents_per_hour: 2.0,
            sensor_faults_per_hour: 3.0,
            air_history_hours: 0,
            all_feeds: false,
            storm_at_ms: None,
            reports_per_hour: 12.0,
        }
    }
}

#[derive(Serialize)]
struct CameraJson<'a> {
    camera_id: &'a str,
    segment_id: &'a str,
    event_time: i64,
    kind: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    vehicle_class: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    speed_kmh: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lane: Option<i32>,
    direction: &'a str,
    confidence: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    severity: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    plate_hash: Option<String>,
}

#[derive(Serialize)]
struct DetectorJson<'a> {
    detector_id: &'a str,
    segment_id: &'a str,
    event_time: i64,
    interval_s: u32,
    volume_motorbike: u32,
    volume_car: u32,
    volume_bus: u32,
    volume_truck: u32,
    volume_bicycle: u32,
    volume_other: u32,
    occupancy_pct: f64,
    mean_speed_kmh: Option<f64>,
}

#[derive(Serialize)]
struct AirJson<'a> {
    sensor_id: &'a str,
    ward_id: &'a str,
    event_time: i64,
    pm25: Option<f64>,
    pm10: Option<f64>,
    no2: Option<f64>,
    so2: Option<f64>,
    co: Option<f64>,
    o3: Option<f64>,
    temperature_c: f64,
    humidity_pct: f64,
}

#[derive(Debug, Clone)]
struct Incident {
    segment: usize,
    until_ms: i64,
}

#[derive(Debug, Clone, Copy)]
enum FaultKind {
    Stuck(f64),
    Missing,
}

#[derive(Debug, Clone, Copy)]
struct SensorFault {
    kind: FaultKind,
    until_ms: i64,
}

const CLASSES_STREET: [(&str, f64, f64); 6] = [
    // (class, share, speed factor)
    ("motorbike", 0.80, 0.95),
    ("car", 0.14, 1.0),
    ("bus", 0.02, 0.8),
    ("truck", 0.02, 0.85),
    ("bicycle", 0.015, 0.35),
    ("other", 0.005, 0.9),
];
const CLASSES_EXPRESSWAY: [(&str, f64, f64); 6] = [
    ("motorbike", 0.0, 1.0),
    ("car", 0.74, 1.0),
    ("bus", 0.08, 0.85),
    ("truck", 0.16, 0.85),
    ("bicycle", 0.0, 1.0),
    ("other", 0.02, 0.9),
];

/// The simulated city.
pub struct CitySimulator {
    config: SimConfig,
    reference: Arc<ReferenceData>,
    rng: ChaCha8Rng,
    now_ms: i64,
    /// Congestion proneness per segment (hot spots are above 1).
    hotspot: Vec<f64>,
    cameras_by_segment: Vec<Vec<usize>>,
    /// Per camera: when vehicles passing it pass another camera of its segment further on
    /// (the next one facing the same way), that camera and the distance to it in metres.
    next_camera: Vec<Option<(usize, f64)>>,
    /// Plates read so far (each detection's plate hash is drawn from this count).
    plates: u64,
    /// Detections of vehicles at a camera further on, by (event time, plate count, segment).
    ahead: std::collections::BTreeMap<(i64, u64), (usize, SimRecord)>,
    ward_base_pm25: HashMap<String, f64>,
    incidents: Vec<Incident>,
    faults: HashMap<usize, SensorFault>,
    haze_until_ms: i64,
    haze_factor: f64,
    services: Option<services::Services>,
    /// Per segment: what the water on it leaves of its speed (1 when dry).
    flood: Vec<f64>,
}

impl CitySimulator {
    /// A simulator over `reference` data.
    pub fn new(config: SimConfig, reference: Arc<ReferenceData>) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let hotspot = reference
            .segments
            .iter()
            .map(|s| {
                let base = if HOTSPOT_ROADS.contains(&s.road.as_str()) {
                    1.2
                } else {
                    0.9
                };
                base + rng.random_range(0.0..0.15)
            })
            .collect();
        let cameras_by_segment = reference
            .segments
            .iter()
            .map(|s| {
                reference
                    .cameras
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.segment_id == s.segment_id)
                    .map(|(i, _)| i)
                    .collect()
            })
            .collect();
        let next_camera = next_cameras(&reference);
        let ward_base_pm25 = reference
            .wards
            .iter()
            .map(|w| (w.ward_id.clone(), rng.random_range(32.0..52.0)))
            .collect();
        let services = config.all_feeds.then(|| {
            services::Services::new(
                &reference,
                config.seed,
                config.storm_at_ms,
                config.reports_per_hour,
            )
        });
        let flood = vec![1.0; reference.segments.len()];
        Self {
            now_ms: config.start_ms,
            services,
            flood,
            config,
            reference,
            rng,
            hotspot,
            cameras_by_segment,
            next_camera,
            plates: 0,
            ahead: std::collections::BTreeMap::new(),
            ward_base_pm25,
            incidents: Vec::new(),
            faults: HashMap::new(),
            haze_until_ms: i64::MIN,
            haze_factor: 1.0,
        }
    }

    /// From now on `factor` times as many camera detections per simulated second: when the
    /// simulated clock reaches the present and slows from `speedup` to real time, a factor of
    /// `speedup` keeps the detections per wall-clock second what they were.
    pub fn scale_detections(&mut self, factor: f64) {
        self.config.detections_per_sim_second *= factor;
    }

    /// The start of the next simulated second, epoch ms.
    pub fn sim_time_ms(&self) -> i64 {
        self.now_ms
    }

    /// Segments with an incident in progress.
    pub fn active_incidents(&self) -> Vec<&str> {
        self.incidents
            .iter()
            .map(|i| self.reference.segments[i.segment].segment_id.as_str())
            .collect()
    }

    /// Sensors with a fault in progress, with its kind (`stuck` or `missing`).
    pub fn active_faults(&self) -> Vec<(&str, &'static str)> {
        self.faults
            .iter()
            .map(|(s, f)| {
                let kind = match f.kind {
                    FaultKind::Stuck(_) => "stuck",
                    FaultKind::Missing => "missing",
                };
                (self.reference.sensors[*s].sensor_id.as_str(), kind)
            })
            .collect()
    }

    /// Gauges of roads with water at level I or above, with the level (cm).
    pub fn flooded_gauges(&self) -> Vec<(&str, f64)> {
        self.services.as_ref().map_or_else(Vec::new, |s| {
            s.gauges
                .iter()
                .zip(&s.levels)
                .filter(|(g, l)| g.on_road() && **l >= g.level_1_cm)
                .map(|(g, l)| (g.gauge_id.as_str(), *l))
                .collect()
        })
    }

    /// The rain now, mm/h (0 without `all_feeds`).
    pub fn rain_mm_h(&self) -> f64 {
        self.services
            .as_ref()
            .map_or(0.0, |s| s.rain_mm_h(self.now_ms))
    }

    /// Simulates one second and returns its records.
    pub fn next_tick(&mut self) -> Vec<SimRecord> {
        let t0 = self.now_ms;
        let mut out = Vec::new();
        if t0 == self.config.start_ms && self.config.air_history_hours > 0 {
            // The sensors' recent past, one reading a minute, before the live clock starts.
            let from = t0 - i64::from(self.config.air_history_hours) * 3_600_000;
            let first = from.div_euclid(60_000) * 60_000;
            for t in (first..t0).step_by(60_000) {
                if t >= from {
                    self.air(t, hanoi_hour(t), &mut out);
                }
            }
        }
        self.now_ms += 1000;
        let hour = hanoi_hour(t0);
        self.update_events(t0);
        self.cameras(t0, hour, &mut out);
        if t0.rem_euclid(60_000) == 0 {
            self.detectors(t0, hour, &mut out);
            self.air(t0, hour, &mut out);
        }
        self.disturb(&mut out);
        if t0.rem_euclid(60_000) == 0 {
            // After the others' disturbances, which draw from the main random stream.
            self.services_minute(t0, &mut out);
        }
        out
    }

    fn services_minute(&mut self, t0: i64, out: &mut Vec<SimRecord>) {
        let Some(services) = &mut self.services else {
            return;
        };
        let incident_wards: Vec<String> = self
            .incidents
            .iter()
            .map(|i| self.reference.segments[i.segment].ward_id.clone())
            .collect();
        services.minute(
            t0,
            &incident_wards,
            self.haze_factor > 1.0,
            self.config.malformed_share,
            out,
        );
        // Water on a road slows it: 15 % of its speed gone at half level I, half at level I,
        // three quarters at level II, most of it at level III.
        for (segment, factor) in self.reference.segments.iter().zip(self.flood.iter_mut()) {
            let deepest = services
                .gauges
                .iter()
                .zip(&services.levels)
                .filter(|(g, _)| g.segment_id.as_deref() == Some(segment.segment_id.as_str()))
                .map(|(g, l)| l / g.level_1_cm)
                .fold(0.0, f64::max);
            *factor = match deepest {
                d if d >= 3.0 => 0.12,
                d if d >= 2.0 => 0.25,
                d if d >= 1.0 => 0.5,
                d if d >= 0.5 => 0.85,
                _ => 1.0,
            };
        }
    }

    fn update_events(&mut self, t0: i64) {
        self.incidents.retain(|i| i.until_ms > t0);
        self.faults.retain(|_, f| f.until_ms > t0);
        if t0 > self.haze_until_ms && self.haze_factor > 1.0 {
            self.haze_factor = 1.0;
        }
        // Poisson arrivals, one draw per simulated second.
        if self
            .rng
            .random_bool((self.config.incidents_per_hour / 3600.0).clamp(0.0, 1.0))
        {
            let segment = self.rng.random_range(0..self.reference.segments.len());
            let minutes = self.rng.random_range(15..40);
            self.incidents.push(Incident {
                segment,
                until_ms: t0 + minutes * 60_000,
            });
        }
        if self
            .rng
            .random_bool((self.config.sensor_faults_per_hour / 3600.0).clamp(0.0, 1.0))
        {
            let sensor = self.rng.random_range(0..self.reference.sensors.len());
            let minutes = self.rng.random_range(20..90);
            let kind = if self.rng.random_bool(0.5) {
                FaultKind::Stuck(self.rng.random_range(20.0..80.0))
            } else {
                FaultKind::Missing
            };
            self.faults.insert(
                sensor,
                SensorFault {
                    kind,
                    until_ms: t0 + minutes * 60_000,
                },
            );
        }
        if self.haze_factor == 1.0 && self.rng.random_bool(1.0 / (36.0 * 3600.0)) {
            self.haze_factor = self.rng.random_range(2.2..4.0);
            self.haze_until_ms = t0 + self.rng.random_range(12..48) * 3_600_000;
        }
    }

    fn segment_speed(&self, segment: usize, hour: f64) -> (f64, bool) {
        let s = &self.reference.segments[segment];
        let load = traffic_profile(hour) * self.hotspot[segment];
        let mut factor = (1.0 - 0.7 * load.powf(2.2)).max(0.18);
        let incident = self.incidents.iter().any(|i| i.segment == segment);
        if incident {
            factor = 0.12;
        }
        factor = factor.min(self.flood[segment]);
        (s.free_flow_kmh * factor, incident)
    }

    fn cameras(&mut self, t0: i64, hour: f64, out: &mut Vec<SimRecord>) {
        let segments = self.reference.segments.len();
        let per_segment = self.config.detections_per_sim_second / segments as f64;
        let profile = traffic_profile(hour) / 0.62; // 0.62 = the profile's daily mean
        let mut events: Vec<(i64, usize, SimRecord)> = Vec::new();
        // Vehicles seen upstream that reach the camera further on within this second.
        while let Some(entry) = self.ahead.first_entry() {
            if entry.key().0 >= t0 + 1000 {
                break;
            }
            let ((at, _), (seg, record)) = entry.remove_entry();
            events.push((at, seg, record));
        }
        for seg in 0..segments {
            let lambda = per_segment * profile * self.hotspot[seg];
            let count = if lambda > 0.0 {
                Poisson::new(lambda)
                    .map(|p| p.sample(&mut self.rng) as usize)
                    .unwrap_or(0)
            } else {
                0
            };
            let (speed, incident) = self.segment_speed(seg, hour);
            let segment = &self.reference.segments[seg];
            let classes = match segment.road_class {
                RoadClass::Expressway => &CLASSES_EXPRESSWAY,
                RoadClass::UrbanStreet => &CLASSES_STREET,
            };
            let cams = &self.cameras_by_segment[seg];
            for _ in 0..count {
                let at = t0 + self.rng.random_range(0..1000);
                let cam_index = cams[self.rng.random_range(0..cams.len())];
                let cam = &self.reference.cameras[cam_index];
                let (class, _, speed_factor) = pick_class(classes, self.rng.random());
                let noise = Normal::new(1.0, 0.15)
                    .map(|n| n.sample(&mut self.rng))
                    .unwrap_or(1.0);
                let mut v = (speed * speed_factor * noise).max(1.0);
                if class == "bicycle" {
                    v = v.min(18.0);
                }
                let payload = serde_json::to_vec(&CameraJson {
                    camera_id: &cam.camera_id,
                    segment_id: &segment.segment_id,
                    event_time: at,
                    kind: "detection",
                    vehicle_class: Some(class),
                    speed_kmh: Some((v * 10.0).round() / 10.0),
                    lane: Some(self.rng.random_range(1..=(segment.lanes / 2).max(1) as i32)),
                    direction: &cam.direction,
                    confidence: (self.rng.random_range(0.80..0.999f64) * 1000.0).round() / 1000.0,
                    severity: None,
                    plate_hash: Some(plate_hash(self.config.seed, self.plates)),
                })
                .unwrap_or_default();
                let speed_kmh = (v * 10.0).round() / 10.0;
                // The same vehicle at the next camera facing its way, at its speed.
                if let Some((next, metres)) = self.next_camera[cam_index] {
                    let later = at + (metres / (speed_kmh / 3.6) * 1000.0).round() as i64;
                    let next = &self.reference.cameras[next];
                    let ahead = serde_json::to_vec(&CameraJson {
                        camera_id: &next.camera_id,
                        segment_id: &segment.segment_id,
                        event_time: later,
                        kind: "detection",
                        vehicle_class: Some(class),
                        speed_kmh: Some(speed_kmh),
                        lane: None,
                        direction: &next.direction,
                        confidence: 0.9,
                        severity: None,
                        plate_hash: Some(plate_hash(self.config.seed, self.plates)),
                    })
                    .unwrap_or_default();
                    self.ahead.insert(
                        (later, self.plates),
                        (
                            seg,
                            SimRecord {
                                topic: SimTopic::Camera,
                                key: segment.segment_id.clone(),
                                payload: ahead,
                                event_time: later,
                            },
                        ),
                    );
                }
                self.plates += 1;
                events.push((
                    at,
                    seg,
                    SimRecord {
                        topic: SimTopic::Camera,
                        key: segment.segment_id.clone(),
                        payload,
                        event_time: at,
                    },
                ));
            }
            // A camera on a segment with an incident reports it once a minute.
            if incident && t0.rem_euclid(60_000) == 0 {
                let cam = &self.reference.cameras[cams[0]];
                let kinds = ["stalled_vehicle", "collision", "congestion_queue"];
                let kind = kinds[self.rng.random_range(0..kinds.len())];
                let payload = serde_json::to_vec(&CameraJson {
                    camera_id: &cam.camera_id,
                    segment_id: &segment.segment_id,
                    event_time: t0,
                    kind,
                    vehicle_class: None,
                    speed_kmh: None,
                    lane: None,
                    direction: &cam.direction,
                    confidence: 0.9,
                    severity: Some(self.rng.random_range(2..=4)),
                    plate_hash: None,
                })
                .unwrap_or_default();
                events.push((
                    t0,
                    seg,
                    SimRecord {
                        topic: SimTopic::Camera,
                        key: segment.segment_id.clone(),
                        payload,
                        event_time: t0,
                    },
                ));
            }
        }
        events.sort_by_key(|(at, seg, _)| (*at, *seg));
        out.extend(events.into_iter().map(|(_, _, r)| r));
    }

    fn detectors(&mut self, t0: i64, hour: f64, out: &mut Vec<SimRecord>) {
        let segments = self.reference.segments.len();
        let profile = traffic_profile(hour);
        for d in 0..self.reference.detectors.len() {
            let det = &self.reference.detectors[d];
            let Some(seg) = self
                .reference
                .segments
                .iter()
                .position(|s| s.segment_id == det.segment_id)
            else {
                continue;
            };
            let segment = &self.reference.segments[seg];
            let (speed, incident) = self.segment_speed(seg, hour);
            let flow_per_lane_h = 1400.0 * profile * self.hotspot[seg] / 1.2;
            let vehicles = flow_per_lane_h * segment.lanes as f64 * det.interval_s as f64 / 3600.0;
            let classes = match segment.road_class {
                RoadClass::Expressway => &CLASSES_EXPRESSWAY,
                RoadClass::UrbanStreet => &CLASSES_STREET,
            };
            let mut volume = [0u32; 6];
            for (k, (_, share, _)) in classes.iter().enumerate() {
                let lambda = vehicles * share * if incident { 0.4 } else { 1.0 };
                if lambda > 0.0 {
                    volume[k] = Poisson::new(lambda)
                        .map(|p| p.sample(&mut self.rng) as u32)
                        .unwrap_or(0);
                }
            }
            let density = (profile * self.hotspot[seg]).min(1.6);
            let occupancy = if incident {
                70.0
            } else {
                4.0 + 38.0 * density.powf(1.6)
            } + self.rng.random_range(-2.0..2.0);
            let _ = segments;
            let payload = serde_json::to_vec(&DetectorJson {
                detector_id: &det.detector_id,
                segment_id: &det.segment_id,
                event_time: t0,
                interval_s: det.interval_s,
                volume_motorbike: volume[0],
                volume_car: volume[1],
                volume_bus: volume[2],
                volume_truck: volume[3],
                volume_bicycle: volume[4],
                volume_other: volume[5],
                occupancy_pct: (occupancy.clamp(0.0, 100.0) * 10.0).round() / 10.0,
                mean_speed_kmh: Some((speed * 10.0).round() / 10.0),
            })
            .unwrap_or_default();
            out.push(SimRecord {
                topic: SimTopic::Detector,
                key: det.segment_id.clone(),
                payload,
                event_time: t0,
            });
        }
    }

    fn air(&mut self, t0: i64, hour: f64, out: &mut Vec<SimRecord>) {
        let traffic = traffic_profile(hour);
        let pm_cycle = pm_diurnal(hour) * self.haze_factor;
        let sun = (-((hour - 13.5) / 3.0).powi(2)).exp();
        for s in 0..self.reference.sensors.len() {
            let sensor = &self.reference.sensors[s];
            let fault = self.faults.get(&s).copied();
            if let Some(SensorFault {
                kind: FaultKind::Missing,
                ..
            }) = fault
            {
                continue;
            }
            let base = self
                .ward_base_pm25
                .get(&sensor.ward_id)
                .copied()
                .unwrap_or(40.0);
            let bias = if sensor.kind == "low_cost" { 1.1 } else { 1.0 };
            let noise = |rng: &mut ChaCha8Rng| rng.random_range(0.9..1.1);
            let mut pm25 = base * pm_cycle * bias * noise(&mut self.rng);
            // A rare single-reading spike (a sensor glitch).
            if self.rng.random_bool(0.0005) {
                pm25 *= 8.0;
            }
            if let Some(SensorFault {
                kind: FaultKind::Stuck(v),
                ..
            }) = fault
            {
                pm25 = v;
            }
            let r1 = |v: f64| (v * 10.0).round() / 10.0;
            let payload = serde_json::to_vec(&AirJson {
                sensor_id: &sensor.sensor_id,
                ward_id: &sensor.ward_id,
                event_time: t0,
                pm25: Some(r1(pm25)),
                pm10: Some(r1(pm25 * 1.6 * noise(&mut self.rng))),
                no2: Some(r1(25.0 + 45.0 * traffic * noise(&mut self.rng))),
                so2: (sensor.kind == "station").then(|| r1(12.0 * noise(&mut self.rng))),
                co: (sensor.kind == "station")
                    .then(|| r1(700.0 + 1500.0 * traffic * noise(&mut self.rng))),
                o3: (sensor.kind == "station")
                    .then(|| r1(20.0 + 90.0 * sun * noise(&mut self.rng))),
                temperature_c: r1(18.0 + 8.0 * sun + self.rng.random_range(-0.5..0.5)),
                humidity_pct: r1(80.0 - 20.0 * sun + self.rng.random_range(-2.0..2.0)),
            })
            .unwrap_or_default();
            out.push(SimRecord {
                topic: SimTopic::Air,
                key: sensor.ward_id.clone(),
                payload,
                event_time: t0,
            });
        }
    }

    /// Makes some records malformed, out of order or late.
    fn disturb(&mut self, out: &mut [SimRecord]) {
        for record in out.iter_mut() {
            let roll: f64 = self.rng.random();
            if roll < self.config.malformed_share {
                record.payload = self.malform(&record.payload);
            } else if record.topic == SimTopic::Camera {
                let roll = roll - self.config.malformed_share;
                let shift = if roll < self.config.late_share {
                    self.rng.random_range(90_000..300_000)
                } else if roll < self.config.late_share + self.config.out_of_order_share {
                    self.rng.random_range(500..4_000)
                } else {
                    0
                };
                if shift > 0 {
                    let old = record.event_time;
                    record.event_time -= shift;
                    record.payload = replace_event_time(&record.payload, old, record.event_time);
                }
            }
        }
    }

    fn malform(&mut self, payload: &[u8]) -> Vec<u8> {
        let text = String::from_utf8_lossy(payload);
        match self.rng.random_range(0..7) {
            0 => payload[..payload.len() / 2].to_vec(),
            1 => text
                .replacen("\"event_time\":", "\"event_time\":\"yesterday\",\"x\":", 1)
                .into_bytes(),
            2 => text
                .replacen("\"camera_id\"", "\"camera\"", 1)
                .replacen("\"sensor_id\"", "\"sensor\"", 1)
                .replacen("\"detector_id\"", "\"detector\"", 1)
                .into_bytes(),
            3 => text
                .replacen("\"motorbike\"", "\"hovercraft\"", 1)
                .replacen("\"ward_id\":\"", "\"ward_id\":7,\"w\":\"", 1)
                .replacen("\"interval_s\":", "\"interval_s\":\"sixty\",\"i\":", 1)
                .into_bytes(),
            4 => vec![0xff, 0xfe, b'{', 0x80, b'}'],
            5 => Vec::new(),
            _ => b"[1,2,3]".to_vec(),
        }
    }
}

/// An anonymised plate: the `n`th plate read, hashed with the run's seed (SplitMix64).
fn plate_hash(seed: u64, n: u64) -> String {
    let mut z = seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    format!("{:016x}", z ^ (z >> 31))
}

/// Per camera of `reference`: the next camera of its segment facing the same way (in camera
/// id order) and the distance to it in metres, if any.
fn next_cameras(reference: &ReferenceData) -> Vec<Option<(usize, f64)>> {
    let cameras = &reference.cameras;
    (0..cameras.len())
        .map(|i| {
            let c = &cameras[i];
            let next = (0..cameras.len())
                .filter(|&j| {
                    let d = &cameras[j];
                    d.segment_id == c.segment_id
                        && d.direction == c.direction
                        && d.camera_id > c.camera_id
                })
                .min_by(|&a, &b| cameras[a].camera_id.cmp(&cameras[b].camera_id))?;
            let d = &cameras[next];
            // Equirectangular distance: fine over a segment's length.
            let lat = (c.lat + d.lat).to_radians() / 2.0;
            let dx = (d.lon - c.lon).to_radians() * lat.cos();
            let dy = (d.lat - c.lat).to_radians();
            Some((next, 6_371_000.0 * (dx * dx + dy * dy).sqrt()))
        })
        .collect()
}

fn pick_class(classes: &[(&'static str, f64, f64); 6], u: f64) -> (&'static str, f64, f64) {
    let mut acc = 0.0;
    for c in classes {
        acc += c.1;
        if u < acc {
            return *c;
        }
    }
    classes[1]
}

fn replace_event_time(payload: &[u8], old: i64, new: i64) -> Vec<u8> {
    String::from_utf8_lossy(payload)
        .replacen(
            &format!("\"event_time\":{old}"),
            &format!("\"event_time\":{new}"),
            1,
        )
        .into_bytes()
}

/// Local hour of day in Hanoi (fractional).
pub fn hanoi_hour(epoch_ms: i64) -> f64 {
    ((epoch_ms + HANOI_OFFSET_MS).rem_euclid(86_400_000)) as f64 / 3_600_000.0
}

/// Relative traffic demand by hour of day: morning and evening peaks near 1.0, night near 0.05.
pub fn traffic_profile(hour: f64) -> f64 {
    let bump = |center: f64, width: f64| (-((hour - center) / width).powi(2)).exp();
    let day = if (5.5..23.0).contains(&hour) {
        0.45
    } else {
        0.05
    };
    (day + 0.55 * bump(7.8, 1.1) + 0.6 * bump(17.8, 1.3)).min(1.0)
}

/// PM2.5 relative to the daily mean: traffic peaks morning and evening, low mid-afternoon.
pub fn pm_diurnal(hour: f64) -> f64 {
    let bump = |center: f64, width: f64| (-((hour - center) / width).powi(2)).exp();
    1.0 + 0.35 * bump(8.0, 1.5) + 0.45 * bump(20.5, 2.5) - 0.3 * bump(14.5, 3.0)
}

/// Counters of what a producer loop sent.
#[derive(Debug, Default)]
pub struct ProducerStats {
    /// Records produced (acknowledged).
    pub produced: AtomicU64,
    /// Simulated time reached, epoch ms.
    pub sim_time_ms: std::sync::atomic::AtomicI64,
}

/// Paces `simulator` at `speedup` simulated seconds per wall second and produces its records
/// into `topics` until `stop` is set or `duration` of simulated time
/// has passed. Simulated time is capped at the wall clock: once it reaches the present it runs
/// in real time (one simulated second per second), so no event is stamped in the future, and
/// the detections per simulated second grow by `speedup`, so the detections per wall-clock
/// second stay what they were.
pub async fn run_producer(
    mut simulator: CitySimulator,
    producer: rdkafka::producer::FutureProducer,
    topics: SimTopics,
    speedup: f64,
    stop: Arc<AtomicBool>,
    stats: Arc<ProducerStats>,
) -> crate::error::Result<()> {
    use rdkafka::producer::FutureRecord;
    let tick = Duration::from_secs_f64(1.0 / speedup.max(0.001));
    let start = tokio::time::Instant::now();
    let mut ticks: u32 = 0;
    let mut in_flight = Vec::new();
    let mut real_time = false;
    while !stop.load(Ordering::Relaxed) {
        for record in simulator.next_tick() {
            let topic = topics.topic(record.topic);
            loop {
                let r = FutureRecord::to(topic)
                    .key(&record.key)
                    .payload(&record.payload);
                match producer.send_result(r) {
                    Ok(delivery) => {
                        in_flight.push(delivery);
                        break;
                    }
                    Err((
                        rdkafka::error::KafkaError::MessageProduction(
                            rdkafka::types::RDKafkaErrorCode::QueueFull,
                        ),
                        _,
                    )) => tokio::time::sleep(Duration::from_millis(2)).await,
                    Err((e, _)) => return Err(e.into()),
                }
            }
        }
        stats
            .sim_time_ms
            .store(simulator.sim_time_ms(), Ordering::Relaxed);
        ticks += 1;
        if in_flight.len() > 10_000 || ticks.is_multiple_of(16) {
            for delivery in in_flight.drain(..) {
                if let Ok(Ok(_)) = delivery.await {
                    stats.produced.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        // Simulated time never runs ahead of the wall clock: once it has caught up, the city
        // runs in real time, so its events are never stamped in the future.
        let ahead_ms = simulator.sim_time_ms() - crate::pipeline::epoch_ms();
        let paced = start + tick * ticks;
        if ahead_ms > 0 && !real_time {
            real_time = true;
            simulator.scale_detections(speedup.max(1.0));
        }
        if ahead_ms > 0 {
            let caught_up = tokio::time::Instant::now() + Duration::from_millis(ahead_ms as u64);
            tokio::time::sleep_until(paced.max(caught_up)).await;
        } else {
            tokio::time::sleep_until(paced).await;
        }
    }
    for delivery in in_flight {
        if let Ok(Ok(_)) = delivery.await {
            stats.produced.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
