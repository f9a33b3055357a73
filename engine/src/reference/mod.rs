//! Reference data from `schemas/reference/`: wards, road segments, cameras, detectors, air
//! sensors and PCU factors.
//!
//! The CSV files are compiled into the binary. The simulator places its traffic and sensors
//! with them, and the SQL layer exposes them as lookup tables.

use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

pub mod changelog;
pub mod services;
pub mod tables;
pub use tables::{ReferenceTables, TableVersion};

/// One of the city's wards (phường).
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Ward {
    /// Stable id (ASCII slug of the name).
    pub ward_id: String,
    /// Vietnamese name.
    pub name: String,
    /// Centroid latitude.
    pub lat: f64,
    /// Centroid longitude.
    pub lon: f64,
}

/// Functional class of a road segment; it decides which level-of-service method applies.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RoadClass {
    /// Urban street: level of service by travel speed.
    UrbanStreet,
    /// Expressway or elevated ring road: level of service by density; no motorbikes.
    Expressway,
}

/// A directed stretch of road between two junctions.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Segment {
    /// Stable id.
    pub segment_id: String,
    /// Display name.
    pub name: String,
    /// Road or corridor it belongs to.
    pub road: String,
    /// Ward it lies in.
    pub ward_id: String,
    /// Lanes (both directions).
    pub lanes: u32,
    /// Free-flow speed, km/h.
    pub free_flow_kmh: f64,
    /// Capacity in passenger-car units per hour.
    pub capacity_pcu_h: f64,
    /// Functional class.
    pub road_class: RoadClass,
    /// Length in metres.
    pub length_m: f64,
    /// WKT `LINESTRING` in longitude/latitude.
    pub geometry: String,
}

/// An AI traffic camera watching a segment.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Camera {
    /// Stable id.
    pub camera_id: String,
    /// Segment it watches.
    pub segment_id: String,
    /// Latitude.
    pub lat: f64,
    /// Longitude.
    pub lon: f64,
    /// Direction of travel it faces.
    pub direction: String,
}

/// A loop or radar detector on a segment.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Detector {
    /// Stable id.
    pub detector_id: String,
    /// Segment it sits on.
    pub segment_id: String,
    /// `loop` or `radar`.
    pub kind: String,
    /// Latitude.
    pub lat: f64,
    /// Longitude.
    pub lon: f64,
    /// Seconds between readings.
    pub interval_s: u32,
}

/// An air-quality station or low-cost sensor.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Sensor {
    /// Stable id.
    pub sensor_id: String,
    /// Ward it stands in.
    pub ward_id: String,
    /// `station` (reference monitor) or `low_cost`.
    pub kind: String,
    /// Latitude.
    pub lat: f64,
    /// Longitude.
    pub lon: f64,
    /// Seconds between readings.
    pub interval_s: u32,
}

/// Passenger-car-unit factor of a vehicle class.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct PcuFactor {
    /// Vehicle class.
    pub vehicle_class: String,
    /// Passenger-car units per vehicle.
    pub pcu: f64,
    /// Where the factor comes from.
    pub description: String,
}

/// Roads of the congestion hot spots named for Hanoi (Ngã Tư Sở, the Thái Hà–Chùa Bộc
/// flyover, Phạm Văn Đồng, Xuân Thủy, Kim Mã, Minh Khai, Nguyễn Xiển–Nguyễn Trãi, the Pháp Vân
/// interchange, Ring Road 3, Phạm Văn Bạch × Hoàng Quốc Việt), as `Segment::road` values.
pub const HOTSPOT_ROADS: &[&str] = &[
    "Trường Chinh",
    "Nguyễn Trãi",
    "Ring Road 2",
    "Thái Hà – Chùa Bộc",
    "Phạm Văn Đồng",
    "Xuân Thủy",
    "Kim Mã",
    "Minh Khai",
    "Nguyễn Xiển",
    "Pháp Vân – Cầu Giẽ",
    "Ring Road 3 elevated",
    "Phạm Văn Bạch",
    "Hoàng Quốc Việt",
];

/// The reference CSV files compiled into the binary: (file name, contents), every `*.csv`
/// of `schemas/reference/`.
pub const EMBEDDED: &[(&str, &str)] = crate::embedded::REFERENCE_FILES;

/// All reference data.
#[derive(Debug, Clone)]
pub struct ReferenceData {
    /// Wards.
    pub wards: Vec<Ward>,
    /// Road segments.
    pub segments: Vec<Segment>,
    /// Cameras.
    pub cameras: Vec<Camera>,
    /// Detectors.
    pub detectors: Vec<Detector>,
    /// Air sensors.
    pub sensors: Vec<Sensor>,
    /// PCU factors.
    pub pcu_factors: Vec<PcuFactor>,
    /// Parking lots and streets.
    pub parking_lots: Vec<services::ParkingLot>,
    /// Water-level gauges and cameras.
    pub gauges: Vec<services::Gauge>,
}

impl ReferenceData {
    /// The reference data compiled into the binary, with its cross-references checked.
    pub fn embedded() -> Result<Self> {
        Self::from_csv(&|file| {
            Self::embedded_csv(file)
                .map(str::to_string)
                .ok_or_else(|| Error::Reference {
                    file: file.into(),
                    message: "not embedded".into(),
                })
        })
    }

    /// The reference data of the CSV texts `text` gives per file name (`wards.csv`, …), each
    /// row checked against its type and the cross-references checked.
    pub fn from_csv(text: &dyn Fn(&str) -> Result<String>) -> Result<Self> {
        let data = Self {
            wards: parse("wards.csv", &text("wards.csv")?)?,
            segments: parse("segments.csv", &text("segments.csv")?)?,
            cameras: parse("cameras.csv", &text("cameras.csv")?)?,
            detectors: parse("detectors.csv", &text("detectors.csv")?)?,
            sensors: parse("sensors.csv", &text("sensors.csv")?)?,
            pcu_factors: parse("pcu_factors.csv", &text("pcu_factors.csv")?)?,
            parking_lots: parse("parking_lots.csv", &text("parking_lots.csv")?)?,
            gauges: parse("gauges.csv", &text("gauges.csv")?)?,
        };
        data.check()?;
        Ok(data)
    }

    /// Why the rows of one of the city's files (`sensors.csv`, …) cannot be read as its rows
    /// on their own (a cell missing or of the wrong type), naming the column; the checks
    /// across rows and tables are [`ReferenceData::from_csv`]'s. Other files pass.
    pub fn check_rows(file: &str, text: &str) -> std::result::Result<(), String> {
        match file {
            "wards.csv" => rows_of::<Ward>(text),
            "segments.csv" => rows_of::<Segment>(text),
            "cameras.csv" => rows_of::<Camera>(text),
            "detectors.csv" => rows_of::<Detector>(text),
            "sensors.csv" => rows_of::<Sensor>(text),
            "pcu_factors.csv" => rows_of::<PcuFactor>(text),
            "parking_lots.csv" => rows_of::<services::ParkingLot>(text),
            "gauges.csv" => rows_of::<services::Gauge>(text),
            _ => Ok(()),
        }
    }

    /// The CSV text of an embedded file.
    pub fn embedded_csv(file: &str) -> Option<&'static str> {
        EMBEDDED
            .iter()
            .find(|(name, _)| *name == file)
            .map(|(_, text)| *text)
    }

    fn check(&self) -> Result<()> {
        let bad = |file: &str, message: String| Error::Reference {
            file: file.into(),
            message,
        };
        let problems = self
            .wards
            .iter()
            .map(|r| ("wards.csv", r.problem()))
            .chain(self.segments.iter().map(|r| ("segments.csv", r.problem())))
            .chain(self.cameras.iter().map(|r| ("cameras.csv", r.problem())))
            .chain(
                self.detectors
                    .iter()
                    .map(|r| ("detectors.csv", r.problem())),
            )
            .chain(self.sensors.iter().map(|r| ("sensors.csv", r.problem())))
            .chain(
                self.pcu_factors
                    .iter()
                    .map(|r| ("pcu_factors.csv", r.problem())),
            )
            .chain(
                self.parking_lots
                    .iter()
                    .map(|r| ("parking_lots.csv", r.problem())),
            )
            .chain(self.gauges.iter().map(|r| ("gauges.csv", r.problem())));
        for (file, problem) in problems {
            if let Some(message) = problem {
                return Err(bad(file, message));
            }
        }
        unique("wards.csv", self.wards.iter().map(|w| w.ward_id.as_str()))?;
        unique(
            "segments.csv",
            self.segments.iter().map(|s| s.segment_id.as_str()),
        )?;
        unique(
            "cameras.csv",
            self.cameras.iter().map(|c| c.camera_id.as_str()),
        )?;
        unique(
            "detectors.csv",
            self.detectors.iter().map(|d| d.detector_id.as_str()),
        )?;
        unique(
            "sensors.csv",
            self.sensors.iter().map(|s| s.sensor_id.as_str()),
        )?;
        let wards: std::collections::HashSet<&str> =
            self.wards.iter().map(|w| w.ward_id.as_str()).collect();
        let segments: std::collections::HashSet<&str> = self
            .segments
            .iter()
            .map(|s| s.segment_id.as_str())
            .collect();
        let has_ward = |id: &str| wards.contains(id);
        let has_segment = |id: &str| segments.contains(id);
        for s in &self.segments {
            if !has_ward(&s.ward_id) {
                return Err(bad(
                    "segments.csv",
                    format!("{}: unknown ward {}", s.segment_id, s.ward_id),
                ));
            }
        }
        for c in &self.cameras {
            if !has_segment(&c.segment_id) {
                return Err(bad(
                    "cameras.csv",
                    format!("{}: unknown segment {}", c.camera_id, c.segment_id),
                ));
            }
        }
        for d in &self.detectors {
            if !has_segment(&d.segment_id) {
                return Err(bad(
                    "detectors.csv",
                    format!("{}: unknown segment {}", d.detector_id, d.segment_id),
                ));
            }
        }
        for s in &self.sensors {
            if !has_ward(&s.ward_id) {
                return Err(bad(
                    "sensors.csv",
                    format!("{}: unknown ward {}", s.sensor_id, s.ward_id),
                ));
            }
        }
        unique(
            "parking_lots.csv",
            self.parking_lots.iter().map(|l| l.lot_id.as_str()),
        )?;
        for l in &self.parking_lots {
            if !has_ward(&l.ward_id) {
                return Err(bad(
                    "parking_lots.csv",
                    format!("{}: unknown ward {}", l.lot_id, l.ward_id),
                ));
            }
        }
        unique(
            "gauges.csv",
            self.gauges.iter().map(|g| g.gauge_id.as_str()),
        )?;
        for g in &self.gauges {
            if !has_ward(&g.ward_id) {
                return Err(bad(
                    "gauges.csv",
                    format!("{}: unknown ward {}", g.gauge_id, g.ward_id),
                ));
            }
            if let Some(segment) = g.segment_id.as_deref().filter(|s| !s.is_empty())
                && !has_segment(segment)
            {
                return Err(bad(
                    "gauges.csv",
                    format!("{}: unknown segment {segment}", g.gauge_id),
                ));
            }
            if !(g.level_1_cm < g.level_2_cm && g.level_2_cm < g.level_3_cm) {
                return Err(bad(
                    "gauges.csv",
                    format!(
                        "{}: warning levels {}, {}, {} cm do not rise (level I < II < III)",
                        g.gauge_id, g.level_1_cm, g.level_2_cm, g.level_3_cm
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Refuses a file whose ids repeat.
fn unique<'a>(file: &str, ids: impl Iterator<Item = &'a str>) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for id in ids {
        if !seen.insert(id) {
            return Err(Error::Reference {
                file: file.into(),
                message: format!("{id} appears twice (ids are unique)"),
            });
        }
    }
    Ok(())
}

pub(crate) fn parse<T: DeserializeOwned>(file: &str, text: &str) -> Result<Vec<T>> {
    csv::ReaderBuilder::new()
        .trim(csv::Trim::Headers)
        .from_reader(text.as_bytes())
        .deserialize()
        .collect::<Result<Vec<T>, _>>()
        .map_err(|e| Error::Reference {
            file: file.into(),
            message: e.to_string(),
        })
}

/// Why a row of `text` cannot be read as a `T`, naming its column.
fn rows_of<T: DeserializeOwned + Row>(text: &str) -> std::result::Result<(), String> {
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::Headers)
        .from_reader(text.as_bytes());
    let headers = reader.headers().map_err(|e| e.to_string())?.clone();
    for row in reader.deserialize::<T>() {
        match row {
            Ok(row) => {
                if let Some(problem) = row.problem() {
                    return Err(problem);
                }
            }
            Err(e) => {
                return Err(match e.kind() {
                    csv::ErrorKind::Deserialize { err, .. } => match err.field() {
                        Some(i) => format!(
                            "column {}: {}",
                            headers.get(i as usize).unwrap_or("?"),
                            err.kind()
                        ),
                        None => err.to_string(),
                    },
                    _ => e.to_string(),
                });
            }
        }
    }
    Ok(())
}

/// A row of one of the city's reference files, checked on its own: what no query could use
/// (an empty id, one with spaces around it that no record would match, a place off the
/// globe, a size that is not positive).
pub(crate) trait Row {
    /// Its id.
    fn id(&self) -> &str;

    /// Its latitude and longitude, if it has a place.
    fn place(&self) -> Option<(f64, f64)> {
        None
    }

    /// Its sizes that must be positive numbers: (column, value).
    fn sizes(&self) -> Vec<(&'static str, f64)> {
        Vec::new()
    }

    /// Why it cannot be used, if it cannot.
    fn problem(&self) -> Option<String> {
        let id = self.id();
        if id.is_empty() {
            return Some("a row has an empty id".into());
        }
        if id.trim() != id {
            return Some(format!(
                "id {id:?} starts or ends with a space (records carry ids without, so none \
                 would match it)"
            ));
        }
        if let Some((lat, lon)) = self.place()
            && (!(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon))
        {
            return Some(format!(
                "{id}: lat {lat}, lon {lon} is not a place (latitude −90 to 90, longitude −180 \
                 to 180, in degrees)"
            ));
        }
        self.sizes()
            .into_iter()
            .find(|(_, v)| !(v.is_finite() && *v > 0.0))
            .map(|(column, value)| format!("{id}: {column} is {value} (a positive number)"))
    }
}

impl Row for Ward {
    fn id(&self) -> &str {
        &self.ward_id
    }
    fn place(&self) -> Option<(f64, f64)> {
        Some((self.lat, self.lon))
    }
}

impl Row for Segment {
    fn id(&self) -> &str {
        &self.segment_id
    }
    fn sizes(&self) -> Vec<(&'static str, f64)> {
        vec![
            ("lanes", f64::from(self.lanes)),
            ("free_flow_kmh", self.free_flow_kmh),
            ("capacity_pcu_h", self.capacity_pcu_h),
            ("length_m", self.length_m),
        ]
    }
}

impl Row for Camera {
    fn id(&self) -> &str {
        &self.camera_id
    }
    fn place(&self) -> Option<(f64, f64)> {
        Some((self.lat, self.lon))
    }
}

impl Row for Detector {
    fn id(&self) -> &str {
        &self.detector_id
    }
    fn place(&self) -> Option<(f64, f64)> {
        Some((self.lat, self.lon))
    }
    fn sizes(&self) -> Vec<(&'static str, f64)> {
        vec![("interval_s", f64::from(self.interval_s))]
    }
}

impl Row for Sensor {
    fn id(&self) -> &str {
        &self.sensor_id
    }
    fn place(&self) -> Option<(f64, f64)> {
        Some((self.lat, self.lon))
    }
    fn sizes(&self) -> Vec<(&'static str, f64)> {
        vec![("interval_s", f64::from(self.interval_s))]
    }
}

impl Row for PcuFactor {
    fn id(&self) -> &str {
        &self.vehicle_class
    }
    fn sizes(&self) -> Vec<(&'static str, f64)> {
        vec![("pcu", self.pcu)]
    }
}

impl Row for services::ParkingLot {
    fn id(&self) -> &str {
        &self.lot_id
    }
    fn place(&self) -> Option<(f64, f64)> {
        Some((self.lat, self.lon))
    }
    fn sizes(&self) -> Vec<(&'static str, f64)> {
        vec![("capacity", f64::from(self.capacity))]
    }
}

impl Row for services::Gauge {
    fn id(&self) -> &str {
        &self.gauge_id
    }
    fn place(&self) -> Option<(f64, f64)> {
        Some((self.lat, self.lon))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_reference_data_is_consistent() {
        let data = ReferenceData::embedded().expect("reference data");
        assert_eq!(data.wards.len(), 51, "the 51 urban wards since 1 July 2025");
        // The corridors named as congestion hot spots are all covered.
        for road in HOTSPOT_ROADS {
            assert!(
                data.segments.iter().any(|s| s.road == *road),
                "no segment on {road}"
            );
        }
        assert!(
            data.segments
                .iter()
                .all(|s| data.cameras.iter().any(|c| c.segment_id == s.segment_id))
        );
        assert!(
            data.wards
                .iter()
                .all(|w| data.sensors.iter().any(|s| s.ward_id == w.ward_id))
        );
        let motorbike = data
            .pcu_factors
            .iter()
            .find(|p| p.vehicle_class == "motorbike");
        assert_eq!(motorbike.map(|p| p.pcu), Some(0.3));
    }

    /// The embedded data with `from` replaced by `to` in the first data line of `file`: the
    /// error.
    fn refusal_of(file: &str, from: &str, to: &str) -> String {
        let result = ReferenceData::from_csv(&|name| {
            let text = ReferenceData::embedded_csv(name).expect("embedded");
            if name != file {
                return Ok(text.to_string());
            }
            let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
            lines[1] = lines[1].replacen(from, to, 1);
            Ok(lines.join("\n"))
        });
        match result {
            Ok(_) => panic!("{file}: the edited row was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn ids_places_and_sizes_that_nothing_could_use_are_refused() {
        let cases = [
            ("cameras.csv", "cam-0001", "", "a row has an empty id"),
            (
                "sensors.csv",
                "aq-001",
                "aq-001 ",
                "id \"aq-001 \" starts or ends with a space",
            ),
            (
                "wards.csv",
                "21.0287",
                "999",
                "hoan_kiem: lat 999, lon 105.8525 is not a place",
            ),
            (
                "parking_lots.csv",
                "105.84540",
                "-200",
                "pk-hk-01: lat 21.0305, lon -200 is not a place",
            ),
            (
                "segments.csv",
                ",4,50,",
                ",0,50,",
                "truong_chinh_ntso: lanes is 0 (a positive number)",
            ),
            (
                "segments.csv",
                ",4,50,",
                ",4,NaN,",
                "truong_chinh_ntso: free_flow_kmh is NaN (a positive number)",
            ),
            (
                "segments.csv",
                ",1064,",
                ",-5,",
                "truong_chinh_ntso: length_m is -5 (a positive number)",
            ),
            (
                "pcu_factors.csv",
                "0.2",
                "0",
                "bicycle: pcu is 0 (a positive number)",
            ),
        ];
        for (file, from, to, says) in cases {
            let error = refusal_of(file, from, to);
            assert!(error.contains(file), "{error}");
            assert!(error.contains(says), "{file}: {error}");
        }
    }
}
