//! The city dashboard: what the output topics say now, and the web console that shows it.
//!
//! [`CityView`] keeps the latest level of service per road segment, the latest hourly VN_AQI
//! per ward and the active alerts, as read back from the congestion, air and alert topics by
//! an ordinary consumer ([`read_outputs`]): the dashboard shows what really came out of Kafka,
//! whichever query wrote it. `urbanstream serve` and `urbanstream demo` both serve it:
//!
//! | method | path | does |
//! |---|---|---|
//! | GET | `/` | the web console (map, alerts, queries, SQL editor), assets embedded in the binary |
//! | GET | `/v1/city/map` | the reference geometry: segments as lon/lat lines, wards as points |
//! | GET | `/v1/city` | the current view (see [`CityView::snapshot`]) |
//! | GET | `/v1/city/events` | server-sent events: a `snapshot` event with the view at once and on every change (at most every 500 ms) |

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::decode::avro::{MAGIC, avro_to_json};
use crate::decode::registry::Registry;
use crate::error::{Error, Result};
use crate::reference::ReferenceData;
use crate::time::display::DisplayZone;
use crate::time::in_time_range;
use crate::topics::Topics;

/// Records read back from the end of each output partition when the reader starts.
const TAIL: i64 = 20_000;
/// Longest id, kind or state of an alert the view keeps (longer: not a city alert).
const MAX_ALERT_ID: usize = 256;
/// Longest alert message the view keeps (longer: cut, with an ellipsis).
const MAX_ALERT_MESSAGE: usize = 1024;
/// Active alerts a snapshot lists (the most severe, then the newest).
const MAX_ALERTS: usize = 100;
/// Active alerts the view keeps: past it, the one that began first is dropped.
const MAX_ACTIVE_ALERTS: usize = 10_000;
/// Shortest time between two snapshots sent on the event stream.
const EVENT_EVERY: Duration = Duration::from_millis(500);
/// Event streams open at once; more are refused with 503.
const MAX_STREAMS: usize = 64;

/// A congestion indicator as read back from its topic.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct IndicatorRow {
    /// Segment.
    pub segment_id: String,
    /// Window start, epoch ms.
    pub window_start: i64,
    /// Window end, epoch ms.
    pub window_end: i64,
    /// Vehicles in the window.
    pub vehicles: i64,
    /// Time-mean speed.
    pub mean_speed_kmh: Option<f64>,
    /// Motorbike share.
    pub motorbike_share: Option<f64>,
    /// Space-mean speed.
    #[serde(default)]
    pub space_mean_speed_kmh: Option<f64>,
    /// Travel Time Index.
    #[serde(default)]
    pub tti: Option<f64>,
    /// Level of service A–F.
    #[serde(default)]
    pub los: Option<String>,
}

/// An air indicator as read back from its topic.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct AirRow {
    /// Ward or sensor id.
    pub entity_id: String,
    /// `ward` or `sensor`.
    pub scope: String,
    /// `hour` or `day`.
    #[serde(default)]
    pub period: Option<String>,
    /// Window end, epoch ms.
    pub window_end: i64,
    /// VN_AQI.
    pub aqi: Option<i64>,
    /// Category (Vietnamese).
    pub category: Option<String>,
    /// Category (English).
    #[serde(default)]
    pub category_en: Option<String>,
    /// Dominant parameter.
    pub dominant_pollutant: Option<String>,
    /// PM2.5 NowCast.
    #[serde(default)]
    pub pm25_nowcast: Option<f64>,
}

/// An alert record as read back from its topic.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct AlertRow {
    /// Stable id across the alert's records.
    pub alert_id: String,
    /// RAISED, UPDATED or CLEARED.
    pub state: String,
    /// Alert kind.
    pub kind: String,
    /// The entity.
    pub entity_id: String,
    /// Event time the condition began, epoch ms.
    pub started_at: i64,
    /// 2–5.
    #[serde(default)]
    pub severity: Option<i32>,
    /// Explanation.
    #[serde(default)]
    pub message: Option<String>,
}

impl AlertRow {
    /// The alert as the view keeps it: its message cut to [`MAX_ALERT_MESSAGE`] bytes;
    /// none when an id, its kind or its state is longer than [`MAX_ALERT_ID`] or its start
    /// is not a time (analysts' queries write this topic: 10 000 active alerts of a megabyte
    /// each were once held, and sent in every snapshot). Times outside the years 0001–9999
    /// (microseconds taken for milliseconds) are no alert's either.
    fn bounded(mut self) -> Option<Self> {
        if [&self.alert_id, &self.kind, &self.entity_id, &self.state]
            .iter()
            .any(|s| s.len() > MAX_ALERT_ID)
            || !in_time_range(self.started_at)
        {
            return None;
        }
        if let Some(message) = self.message.as_mut()
            && message.len() > MAX_ALERT_MESSAGE
        {
            let mut end = MAX_ALERT_MESSAGE;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push('…');
        }
        Some(self)
    }
}

/// A parking availability row (a lot's or a ward's) as read back from its topic.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ParkingRow {
    /// `lot` or `ward`.
    pub entity_type: String,
    /// Lot or ward id.
    pub entity_id: String,
    /// Ward.
    pub ward_id: String,
    /// Window start, epoch ms.
    pub window_start: i64,
    /// Spaces.
    pub capacity: i64,
    /// Occupied share, percent.
    pub occupancy_pct: Option<f64>,
    /// Free spaces.
    pub free_spaces: Option<f64>,
}

/// A water indicator as read back from its topic.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct WaterRow {
    /// Gauge.
    pub gauge_id: String,
    /// Window start, epoch ms.
    pub window_start: i64,
    /// Latest level, cm.
    pub level_cm: Option<f64>,
    /// Highest level in the window, cm.
    pub max_level_cm: Option<f64>,
    /// Rate of rise, cm/h.
    pub rise_cm_h: Option<f64>,
    /// Rainfall, mm/h.
    #[serde(default)]
    pub rainfall_mm_h: Option<f64>,
    /// 0, or warning level I, II or III.
    pub warning_level: i32,
}

/// Latest row per key: keeps `row` unless a newer one is there.
fn keep_latest<R>(rows: &mut HashMap<String, R>, id: String, row: R, start: impl Fn(&R) -> i64) {
    match rows.get(&id) {
        Some(old) if start(old) > start(&row) => {}
        _ => {
            rows.insert(id, row);
        }
    }
}

/// What the output topics say now.
#[derive(Debug, Clone, Default)]
pub struct View {
    /// Active alerts by id.
    pub alerts: HashMap<String, AlertRow>,
    /// Alerts raised since the view began.
    pub raised: u64,
    /// Alerts cleared since the view began.
    pub cleared: u64,
    /// Latest congestion indicator per segment.
    pub latest: HashMap<String, IndicatorRow>,
    /// Records taken.
    pub received: u64,
    /// Newest congestion window start seen.
    pub last_window: i64,
    /// Latest hourly AQI per ward.
    pub wards: HashMap<String, AirRow>,
    /// Newest hourly ward window end seen.
    pub last_hour: i64,
    /// Latest parking availability per lot.
    pub parking_lots: HashMap<String, ParkingRow>,
    /// Latest parking availability per ward.
    pub parking_wards: HashMap<String, ParkingRow>,
    /// Newest parking window start seen.
    pub last_parking: i64,
    /// Latest water indicator per gauge.
    pub water: HashMap<String, WaterRow>,
    /// Newest water window start seen.
    pub last_water: i64,
    /// The parking and water topics (of the streams the schema files declare), once looked up.
    pub other_topics: Option<(String, String)>,
    /// The segments and wards rows are kept for (those of the map); none: every one. The
    /// topics are written by analysts' queries: ids outside the reference must not grow the
    /// view without bound.
    pub known: Option<Arc<std::collections::HashSet<String>>>,
}

impl View {
    /// Takes one record read back from an output topic; false when it is not one the view
    /// shows (another topic, or not a row of that topic's shape).
    pub fn take(&mut self, topic: &str, topics: &Topics, payload: &[u8]) -> bool {
        if topic == topics.congestion.as_str() {
            let Ok(row) = serde_json::from_slice::<IndicatorRow>(payload) else {
                return false;
            };
            if !self.is_known(&row.segment_id) || !in_time_range(row.window_start) {
                return false;
            }
            self.last_window = self.last_window.max(row.window_start);
            match self.latest.get(&row.segment_id) {
                Some(old) if old.window_start > row.window_start => {}
                _ => {
                    self.latest.insert(row.segment_id.clone(), row);
                }
            }
        } else if topic == topics.alerts.as_str() {
            let Ok(row) = serde_json::from_slice::<AlertRow>(payload) else {
                return false;
            };
            let Some(row) = row.bounded() else {
                return false;
            };
            if row.state == "CLEARED" {
                self.cleared += 1;
                self.alerts.remove(&row.alert_id);
            } else {
                self.raised += u64::from(row.state == "RAISED");
                if self.alerts.len() >= MAX_ACTIVE_ALERTS
                    && !self.alerts.contains_key(&row.alert_id)
                    && let Some(oldest) = self
                        .alerts
                        .values()
                        .min_by_key(|a| a.started_at)
                        .map(|a| a.alert_id.clone())
                {
                    self.alerts.remove(&oldest);
                }
                self.alerts.insert(row.alert_id.clone(), row);
            }
        } else if self.other_topic(topics, 0) == topic {
            let Ok(row) = serde_json::from_slice::<ParkingRow>(payload) else {
                return false;
            };
            if !self.is_known(&row.entity_id) || !in_time_range(row.window_start) {
                return false;
            }
            self.last_parking = self.last_parking.max(row.window_start);
            let rows = if row.entity_type == "ward" {
                &mut self.parking_wards
            } else {
                &mut self.parking_lots
            };
            keep_latest(rows, row.entity_id.clone(), row, |r| r.window_start);
        } else if self.other_topic(topics, 1) == topic {
            let Ok(row) = serde_json::from_slice::<WaterRow>(payload) else {
                return false;
            };
            if !self.is_known(&row.gauge_id) || !in_time_range(row.window_start) {
                return false;
            }
            self.last_water = self.last_water.max(row.window_start);
            keep_latest(&mut self.water, row.gauge_id.clone(), row, |r| {
                r.window_start
            });
        } else if topic == topics.air_indicators.as_str() {
            let Ok(row) = serde_json::from_slice::<AirRow>(payload) else {
                return false;
            };
            if row.scope == "ward"
                && row.period.as_deref() != Some("day")
                && self.is_known(&row.entity_id)
                && in_time_range(row.window_end)
            {
                self.last_hour = self.last_hour.max(row.window_end);
                match self.wards.get(&row.entity_id) {
                    Some(old) if old.window_end > row.window_end => {}
                    _ => {
                        self.wards.insert(row.entity_id.clone(), row);
                    }
                }
            }
        } else {
            return false;
        }
        self.received += 1;
        true
    }

    /// The parking (0) or water (1) topic under `topics`.
    fn other_topic(&mut self, topics: &Topics, which: usize) -> &str {
        let (parking, water) = self.other_topics.get_or_insert_with(|| {
            (
                topics
                    .topic_of_table("parking_availability")
                    .unwrap_or_default(),
                topics
                    .topic_of_table("water_indicators")
                    .unwrap_or_default(),
            )
        });
        if which == 0 { parking } else { water }
    }

    fn is_known(&self, id: &str) -> bool {
        self.known.as_ref().is_none_or(|k| k.contains(id))
    }

    /// Active alerts, the most severe first, then the newest.
    pub fn active_alerts(&self) -> Vec<&AlertRow> {
        let mut alerts: Vec<&AlertRow> = self.alerts.values().collect();
        alerts.sort_by(|a, b| {
            b.severity
                .cmp(&a.severity)
                .then(b.started_at.cmp(&a.started_at))
                .then(a.alert_id.cmp(&b.alert_id))
        });
        alerts
    }
}

/// The view shared by the reader, the API and the terminal screen, with a version that
/// changes whenever a record is taken.
pub struct CityView {
    view: Mutex<View>,
    version: watch::Sender<u64>,
    /// Set when the process stops: event streams end so that a graceful shutdown does not
    /// wait for open browser tabs.
    closing: watch::Sender<bool>,
    /// The snapshot's text for a version, made once however many streams send it.
    text: Mutex<Option<(u64, Arc<str>)>>,
    /// Permits of the open event streams.
    streams: Arc<tokio::sync::Semaphore>,
    /// The map and names of the reference tables, replaced when they get new versions.
    reference: std::sync::RwLock<Arc<Geometry>>,
    zone: DisplayZone,
}

/// What a [`CityView`] shows of the reference tables.
struct Geometry {
    /// `/v1/city/map`.
    map: Value,
    /// Names of segments, wards, parking lots and gauges by id.
    names: HashMap<String, String>,
    /// Changes with every new set of reference tables: the console draws the map again.
    version: u64,
}

impl Geometry {
    fn of(reference: &ReferenceData, version: u64) -> (Self, std::collections::HashSet<String>) {
        let (lots, gauges) = (&reference.parking_lots, &reference.gauges);
        let names: HashMap<String, String> = reference
            .segments
            .iter()
            .map(|s| (s.segment_id.clone(), s.name.clone()))
            .chain(
                reference
                    .wards
                    .iter()
                    .map(|w| (w.ward_id.clone(), w.name.clone())),
            )
            .chain(lots.iter().map(|l| (l.lot_id.clone(), l.name.clone())))
            .chain(gauges.iter().map(|g| (g.gauge_id.clone(), g.name.clone())))
            .collect();
        let known = names.keys().cloned().collect();
        let map = map_of(reference, lots, gauges);
        (
            Self {
                map,
                names,
                version,
            },
            known,
        )
    }
}

impl CityView {
    /// An empty view over the reference geometry of `reference`, its times shown in `zone`.
    pub fn new(reference: &ReferenceData, zone: DisplayZone) -> Arc<Self> {
        let (geometry, known) = Geometry::of(reference, 0);
        Arc::new(Self {
            view: Mutex::new(View {
                known: Some(Arc::new(known)),
                ..View::default()
            }),
            version: watch::Sender::new(0),
            closing: watch::Sender::new(false),
            text: Mutex::new(None),
            streams: Arc::new(tokio::sync::Semaphore::new(MAX_STREAMS)),
            reference: std::sync::RwLock::new(Arc::new(geometry)),
            zone,
        })
    }

    /// Shows `reference` from now on: its map, names, and the rows of its ids (rows of ids
    /// it no longer has are let go). Open consoles draw the new map.
    pub fn set_reference(&self, reference: &ReferenceData) {
        let Ok(mut current) = self.reference.write() else {
            return;
        };
        let (geometry, known) = Geometry::of(reference, current.version + 1);
        if geometry.map == current.map && geometry.names == current.names {
            return;
        }
        *current = Arc::new(geometry);
        drop(current);
        if let Ok(mut v) = self.view.lock() {
            v.latest.retain(|id, _| known.contains(id));
            v.wards.retain(|id, _| known.contains(id));
            v.parking_lots.retain(|id, _| known.contains(id));
            v.parking_wards.retain(|id, _| known.contains(id));
            v.water.retain(|id, _| known.contains(id));
            v.known = Some(Arc::new(known));
        }
        self.version.send_modify(|v| *v += 1);
    }

    fn geometry(&self) -> Arc<Geometry> {
        match self.reference.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Takes one record (see [`View::take`]).
    pub fn take(&self, topic: &str, topics: &Topics, payload: &[u8]) -> bool {
        let taken = self
            .view
            .lock()
            .is_ok_and(|mut v| v.take(topic, topics, payload));
        if taken {
            self.version.send_modify(|v| *v += 1);
        }
        taken
    }

    /// Runs `f` over the view.
    pub fn with<T>(&self, f: impl FnOnce(&View) -> T) -> Option<T> {
        self.view.lock().ok().map(|v| f(&v))
    }

    /// The reference name of a segment or ward, or its id when it has none.
    pub fn name(&self, id: &str) -> String {
        self.geometry()
            .names
            .get(id)
            .map_or_else(|| id.to_string(), String::clone)
    }

    /// The reference geometry (`/v1/city/map`), with its `version` (the snapshots'
    /// `map_version`).
    pub fn map(&self) -> Value {
        let geometry = self.geometry();
        let mut map = geometry.map.clone();
        map["version"] = json!(geometry.version);
        map
    }

    /// The view as JSON: `congestion.segments` (latest row per segment, with `stale` when its
    /// window is over ten minutes older than the newest), `air.wards` (latest hourly VN_AQI
    /// per ward), `parking.lots` and `parking.wards` (latest availability of each, within
    /// half an hour of the newest), `water.gauges` (latest indicator per gauge, within half an
    /// hour of the newest: a gauge gone silent is not shown at its last level), `alerts`
    /// (active, at most 100), the counts, and the display time zone.
    pub fn snapshot(&self) -> Value {
        let version = *self.version.borrow();
        let geometry = self.geometry();
        self.with(|v| {
            let segments: serde_json::Map<String, Value> = v
                .latest
                .iter()
                .map(|(id, r)| {
                    let mut row = json!(r);
                    row["stale"] = json!(r.window_start < v.last_window - 600_000);
                    (id.clone(), row)
                })
                .collect();
            let wards: serde_json::Map<String, Value> = v
                .wards
                .iter()
                .map(|(id, r)| {
                    let mut row = json!(r);
                    row["stale"] = json!(r.window_end < v.last_hour - 3 * 3_600_000);
                    (id.clone(), row)
                })
                .collect();
            let alerts: Vec<Value> = v
                .active_alerts()
                .into_iter()
                .take(MAX_ALERTS)
                .map(|a| {
                    let mut row = json!(a);
                    row["entity_name"] =
                        json!(geometry.names.get(&a.entity_id).unwrap_or(&a.entity_id));
                    row["started"] = json!(self.zone.format(a.started_at));
                    row
                })
                .collect();
            json!({
                "version": version,
                "map_version": geometry.version,
                "time_zone": self.zone.label(),
                "offset_minutes": self.zone.offset_minutes(),
                "received": v.received,
                "congestion": {
                    "window_start": (v.last_window > 0).then_some(v.last_window),
                    "window": (v.last_window > 0).then(|| self.zone.format(v.last_window)),
                    "segments": segments,
                },
                "air": {
                    "hour_end": (v.last_hour > 0).then_some(v.last_hour),
                    "hour": (v.last_hour > 0).then(|| self.zone.format(v.last_hour)),
                    "wards": wards,
                },
                "parking": {
                    "window": (v.last_parking > 0).then(|| self.zone.format(v.last_parking)),
                    "lots": v.parking_lots.iter()
                        .filter(|(_, r)| r.window_start >= v.last_parking - 1_800_000)
                        .map(|(id, r)| (id.clone(), json!(r)))
                        .collect::<serde_json::Map<String, Value>>(),
                    "wards": v.parking_wards.iter()
                        .filter(|(_, r)| r.window_start >= v.last_parking - 1_800_000)
                        .map(|(id, r)| (id.clone(), json!(r)))
                        .collect::<serde_json::Map<String, Value>>(),
                },
                "water": {
                    "gauges": v.water.iter()
                        .filter(|(_, r)| r.window_start >= v.last_water - 1_800_000)
                        .map(|(id, r)| {
                            let mut row = json!(r);
                            row["time"] = json!(self.zone.format(r.window_start));
                            (id.clone(), row)
                        })
                        .collect::<serde_json::Map<String, Value>>(),
                },
                "alerts": alerts,
                "alerts_active": v.alerts.len(),
                "raised": v.raised,
                "cleared": v.cleared,
            })
        })
        .unwrap_or_else(|| json!({ "version": version }))
    }

    /// [`CityView::snapshot`] as JSON text, made once per version.
    pub fn snapshot_text(&self) -> Arc<str> {
        let version = *self.version.borrow();
        if let Ok(cached) = self.text.lock()
            && let Some((v, text)) = cached.as_ref()
            && *v == version
        {
            return text.clone();
        }
        let snapshot = self.snapshot();
        let version = snapshot["version"].as_u64().unwrap_or(version);
        let text: Arc<str> = snapshot.to_string().into();
        if let Ok(mut cached) = self.text.lock() {
            *cached = Some((version, text.clone()));
        }
        text
    }

    /// Ends every event stream (now and later): the process is stopping.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// A receiver that sees every new version.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }
}

/// Segments as `[[lon, lat], …]` lines, wards, parking lots and gauges as points, with the
/// bounds of segments and wards.
fn map_of(
    reference: &ReferenceData,
    lots: &[crate::reference::services::ParkingLot],
    gauges: &[crate::reference::services::Gauge],
) -> Value {
    let mut bounds = [f64::MAX, f64::MAX, f64::MIN, f64::MIN];
    let mut extend = |lon: f64, lat: f64| {
        bounds = [
            bounds[0].min(lon),
            bounds[1].min(lat),
            bounds[2].max(lon),
            bounds[3].max(lat),
        ];
    };
    let segments: Vec<Value> = reference
        .segments
        .iter()
        .map(|s| {
            let coords = linestring(&s.geometry);
            for &[lon, lat] in &coords {
                extend(lon, lat);
            }
            json!({
                "id": s.segment_id, "name": s.name, "road": s.road, "ward_id": s.ward_id,
                "lanes": s.lanes, "coords": coords,
            })
        })
        .collect();
    let wards: Vec<Value> = reference
        .wards
        .iter()
        .map(|w| {
            extend(w.lon, w.lat);
            json!({ "id": w.ward_id, "name": w.name, "lat": w.lat, "lon": w.lon })
        })
        .collect();
    let lots: Vec<Value> = lots
        .iter()
        .map(|l| {
            json!({ "id": l.lot_id, "name": l.name, "kind": l.kind, "ward_id": l.ward_id,
                    "capacity": l.capacity, "lat": l.lat, "lon": l.lon })
        })
        .collect();
    let gauges: Vec<Value> = gauges
        .iter()
        .map(|g| {
            json!({ "id": g.gauge_id, "name": g.name, "kind": g.kind, "ward_id": g.ward_id,
                    "segment_id": g.segment_id, "lat": g.lat, "lon": g.lon,
                    "levels": [g.level_1_cm, g.level_2_cm, g.level_3_cm] })
        })
        .collect();
    json!({ "segments": segments, "wards": wards, "lots": lots, "gauges": gauges, "bounds": bounds })
}

/// The points of a WKT `LINESTRING(lon lat, …)`; none when it is not one.
fn linestring(wkt: &str) -> Vec<[f64; 2]> {
    let Some(body) = wkt
        .trim()
        .strip_prefix("LINESTRING")
        .map(str::trim)
        .and_then(|b| b.strip_prefix('('))
        .and_then(|b| b.strip_suffix(')'))
    else {
        return Vec::new();
    };
    body.split(',')
        .filter_map(|point| {
            let mut xy = point.split_whitespace().map(str::parse::<f64>);
            match (xy.next(), xy.next(), xy.next()) {
                (Some(Ok(lon)), Some(Ok(lat)), None) => Some([lon, lat]),
                _ => None,
            }
        })
        .collect()
}

/// Reads the congestion, air, parking, water and alert topics of `topics` into `view` until
/// `stop`: each
/// partition from its last [`TAIL`] records, partitions that appear later (topics created
/// after the start) from their beginning. Avro records are read through `registry`.
pub async fn read_outputs(
    view: Arc<CityView>,
    client: ClientConfig,
    topics: Topics,
    registry: Option<Arc<Registry>>,
    stop: Arc<AtomicBool>,
) {
    // A failed client is made again: the view must not freeze while the page looks live.
    while !stop.load(Ordering::Relaxed) {
        let read = read_with_one_client(&view, client.clone(), &topics, &registry, &stop);
        match read.await {
            Ok(()) => return,
            Err(e) => {
                warn!(error = %e, "the web console's reader of the output topics failed; again in 5 s");
                for _ in 0..50 {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

async fn read_with_one_client(
    view: &CityView,
    mut client: ClientConfig,
    topics: &Topics,
    registry: &Option<Arc<Registry>>,
    stop: &AtomicBool,
) -> Result<()> {
    let consumer: Arc<StreamConsumer> = Arc::new(
        client
            .set("group.id", "urbanstream-dashboard")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // A tail past a log start trimmed by retention starts at the log start.
            .set("auto.offset.reset", "earliest")
            .create()?,
    );
    let mut wanted = vec![
        topics.congestion.clone(),
        topics.air_indicators.clone(),
        topics.alerts.clone(),
    ];
    wanted.extend(
        ["parking_availability", "water_indicators"]
            .iter()
            .filter_map(|t| topics.topic_of_table(t)),
    );
    let mut assigned: HashMap<String, usize> = HashMap::new();
    let mut first = true;
    let mut next_check = tokio::time::Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if tokio::time::Instant::now() >= next_check {
            next_check = tokio::time::Instant::now() + Duration::from_secs(5);
            let metadata = {
                let consumer = consumer.clone();
                tokio::task::spawn_blocking(move || {
                    consumer
                        .fetch_metadata(None, Duration::from_secs(5))
                        .map(|m| {
                            m.topics()
                                .iter()
                                .map(|t| (t.name().to_string(), t.partitions().len()))
                                .collect::<HashMap<_, _>>()
                        })
                })
                .await
            };
            match metadata {
                Ok(Ok(partitions)) => {
                    let mut added: Vec<(String, i32)> = Vec::new();
                    for topic in &wanted {
                        let now = partitions.get(topic).copied().unwrap_or(0);
                        let had = assigned.get(topic).copied().unwrap_or(0);
                        for p in had..now {
                            added.push((topic.clone(), i32::try_from(p).unwrap_or(i32::MAX)));
                        }
                        if now > had {
                            assigned.insert(topic.clone(), now);
                        }
                    }
                    // A partition seen at the start is read from its recent tail, one that
                    // appeared later from its beginning (it holds only new records). The
                    // tail's first offset is looked up: librdkafka takes a tail offset again
                    // from each reset, so a tail past a trimmed log start reset forever and the
                    // view stopped reading without a word.
                    let starts = {
                        let consumer = consumer.clone();
                        tokio::task::spawn_blocking(move || {
                            added
                                .into_iter()
                                .map(|(topic, p)| {
                                    let from = if first {
                                        consumer
                                            .fetch_watermarks(&topic, p, Duration::from_secs(5))
                                            .map_or(Offset::Beginning, |(low, high)| {
                                                Offset::Offset(low.max(high - TAIL))
                                            })
                                    } else {
                                        Offset::Beginning
                                    };
                                    (topic, p, from)
                                })
                                .collect::<Vec<_>>()
                        })
                        .await
                        .map_err(|e| Error::Config(format!("dashboard offsets: {e}")))?
                    };
                    let mut list = TopicPartitionList::new();
                    for (topic, p, from) in starts {
                        list.add_partition_offset(&topic, p, from)?;
                    }
                    if list.count() > 0 {
                        debug!(partitions = list.count(), "dashboard reads more partitions");
                        consumer.incremental_assign(&list)?;
                    }
                    first = false;
                }
                Ok(Err(e)) => debug!(error = %e, "dashboard: no metadata yet"),
                Err(e) => warn!(error = %e, "dashboard: metadata task failed"),
            }
        }
        let Ok(Ok(message)) =
            tokio::time::timeout(Duration::from_millis(200), consumer.recv()).await
        else {
            continue;
        };
        let Some(payload) = message.payload() else {
            continue;
        };
        if payload.first() == Some(&MAGIC)
            && let Some(registry) = registry
        {
            match avro_to_json(registry, payload).await {
                Ok(json) => {
                    view.take(message.topic(), topics, json.to_string().as_bytes());
                }
                Err(e) => debug!(error = %e, topic = message.topic(), "dashboard: unreadable"),
            }
        } else {
            view.take(message.topic(), topics, payload);
        }
    }
    Ok(())
}

/// The web console's page and assets, open without a token (they hold no data; every call
/// they make goes through the API and its token).
pub fn console_routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/ui/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/ui/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
}

/// `/city/map`, `/city` and `/city/events` over `view`, to nest under `/v1`.
pub fn city_routes<S: Clone + Send + Sync + 'static>(view: Arc<CityView>) -> Router<S> {
    Router::new()
        .route("/city/map", get(map))
        .route("/city", get(snapshot))
        .route("/city/events", get(events))
        .with_state(view)
}

const INDEX: &str = include_str!("ui/index.html");
const APP_JS: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/style.css");

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; \
                 connect-src 'self'; frame-ancestors 'none'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

async fn map(State(view): State<Arc<CityView>>) -> Json<Value> {
    Json(view.map())
}

async fn snapshot(State(view): State<Arc<CityView>>) -> Json<Value> {
    Json(view.snapshot())
}

async fn events(State(view): State<Arc<CityView>>) -> Response {
    let Ok(permit) = view.streams.clone().try_acquire_owned() else {
        return (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "message": format!("{MAX_STREAMS} event streams are open already; poll /v1/city instead")
            })),
        )
            .into_response();
    };
    let changes = view.subscribe();
    let closing = view.closing.subscribe();
    let stream = futures::stream::unfold(
        (view, changes, closing, true, permit),
        |(view, mut changes, mut closing, first, permit)| async move {
            if *closing.borrow() {
                return None;
            }
            if !first {
                let next = async {
                    tokio::time::sleep(EVENT_EVERY).await;
                    changes.changed().await
                };
                tokio::select! {
                    changed = next => changed.ok()?,
                    _ = closing.wait_for(|closed| *closed) => return None,
                }
            }
            changes.mark_unchanged();
            let text = view.snapshot_text();
            let event = Event::default().event("snapshot").data(&*text);
            Some((
                Ok::<_, Infallible>(event),
                (view, changes, closing, false, permit),
            ))
        },
    );
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[cfg(test)]
mod tests;
