//! US EPA AQI tables (PM2.5 revision effective 6 May 2024): breakpoints, truncation, categories
//! and the µg/m³ ↔ ppb conversion for gases.
//!
//! The tables are data: a changed rule is a change here and nowhere else. Units are the EPA's:
//! PM in µg/m³, O3 and CO in ppm, SO2 and NO2 in ppb.

/// A US AQI parameter, with its averaging time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UsPollutant {
    /// PM2.5, 24-hour mean (or NowCast), µg/m³.
    Pm25,
    /// PM10, 24-hour mean (or NowCast), µg/m³.
    Pm10,
    /// O3, 8-hour mean, ppm; no index above 0.200 ppm (use the 1-hour mean).
    O3EightHour,
    /// O3, 1-hour mean, ppm; indexed from 0.125 ppm only (below, the 8-hour mean governs).
    O3OneHour,
    /// CO, 8-hour mean, ppm.
    Co,
    /// SO2, 1-hour mean, ppb; from 305 ppb the table is for 24-hour means.
    So2,
    /// NO2, 1-hour mean, ppb.
    No2,
}

/// One band: concentrations `lo..=hi` map linearly onto AQI `i_lo..=i_hi`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Band {
    /// Lowest concentration of the band.
    pub lo: f64,
    /// Highest concentration of the band.
    pub hi: f64,
    /// AQI at `lo`.
    pub i_lo: f64,
    /// AQI at `hi`.
    pub i_hi: f64,
}

const fn band(lo: f64, hi: f64, i_lo: f64, i_hi: f64) -> Band {
    Band { lo, hi, i_lo, i_hi }
}

/// The two readings of the hazardous PM2.5 range that public implementations use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pm25Hazardous {
    /// 225.5–325.4 → 301–400 and 325.5–500.4 → 401–500 (the table of INDICATORS.md §2).
    Split,
    /// 225.5–500.4 → 301–500 in one band.
    Single,
}

/// The hazardous PM2.5 reading in force.
pub const PM25_HAZARDOUS: Pm25Hazardous = Pm25Hazardous::Split;

const PM25_COMMON: [Band; 5] = [
    band(0.0, 9.0, 0.0, 50.0),
    band(9.1, 35.4, 51.0, 100.0),
    band(35.5, 55.4, 101.0, 150.0),
    band(55.5, 125.4, 151.0, 200.0),
    band(125.5, 225.4, 201.0, 300.0),
];
const PM25_SPLIT: [Band; 7] = [
    PM25_COMMON[0],
    PM25_COMMON[1],
    PM25_COMMON[2],
    PM25_COMMON[3],
    PM25_COMMON[4],
    band(225.5, 325.4, 301.0, 400.0),
    band(325.5, 500.4, 401.0, 500.0),
];
const PM25_SINGLE: [Band; 6] = [
    PM25_COMMON[0],
    PM25_COMMON[1],
    PM25_COMMON[2],
    PM25_COMMON[3],
    PM25_COMMON[4],
    band(225.5, 500.4, 301.0, 500.0),
];
const PM10: [Band; 7] = [
    band(0.0, 54.0, 0.0, 50.0),
    band(55.0, 154.0, 51.0, 100.0),
    band(155.0, 254.0, 101.0, 150.0),
    band(255.0, 354.0, 151.0, 200.0),
    band(355.0, 424.0, 201.0, 300.0),
    band(425.0, 504.0, 301.0, 400.0),
    band(505.0, 604.0, 401.0, 500.0),
];
const O3_8H: [Band; 5] = [
    band(0.000, 0.054, 0.0, 50.0),
    band(0.055, 0.070, 51.0, 100.0),
    band(0.071, 0.085, 101.0, 150.0),
    band(0.086, 0.105, 151.0, 200.0),
    band(0.106, 0.200, 201.0, 300.0),
];
const O3_1H: [Band; 5] = [
    band(0.125, 0.164, 101.0, 150.0),
    band(0.165, 0.204, 151.0, 200.0),
    band(0.205, 0.404, 201.0, 300.0),
    band(0.405, 0.504, 301.0, 400.0),
    band(0.505, 0.604, 401.0, 500.0),
];
const CO: [Band; 7] = [
    band(0.0, 4.4, 0.0, 50.0),
    band(4.5, 9.4, 51.0, 100.0),
    band(9.5, 12.4, 101.0, 150.0),
    band(12.5, 15.4, 151.0, 200.0),
    band(15.5, 30.4, 201.0, 300.0),
    band(30.5, 40.4, 301.0, 400.0),
    band(40.5, 50.4, 401.0, 500.0),
];
const SO2: [Band; 7] = [
    band(0.0, 35.0, 0.0, 50.0),
    band(36.0, 75.0, 51.0, 100.0),
    band(76.0, 185.0, 101.0, 150.0),
    band(186.0, 304.0, 151.0, 200.0),
    band(305.0, 604.0, 201.0, 300.0),
    band(605.0, 804.0, 301.0, 400.0),
    band(805.0, 1004.0, 401.0, 500.0),
];
const NO2: [Band; 7] = [
    band(0.0, 53.0, 0.0, 50.0),
    band(54.0, 100.0, 51.0, 100.0),
    band(101.0, 360.0, 101.0, 150.0),
    band(361.0, 649.0, 151.0, 200.0),
    band(650.0, 1249.0, 201.0, 300.0),
    band(1250.0, 1649.0, 301.0, 400.0),
    band(1650.0, 2049.0, 401.0, 500.0),
];

impl UsPollutant {
    /// Every parameter.
    pub const ALL: [UsPollutant; 7] = [
        UsPollutant::Pm25,
        UsPollutant::Pm10,
        UsPollutant::O3EightHour,
        UsPollutant::O3OneHour,
        UsPollutant::Co,
        UsPollutant::So2,
        UsPollutant::No2,
    ];

    /// The name used in SQL: `pm25`, `pm10`, `o3_8h`, `o3_1h`, `co`, `so2`, `no2`.
    pub fn name(self) -> &'static str {
        match self {
            UsPollutant::Pm25 => "pm25",
            UsPollutant::Pm10 => "pm10",
            UsPollutant::O3EightHour => "o3_8h",
            UsPollutant::O3OneHour => "o3_1h",
            UsPollutant::Co => "co",
            UsPollutant::So2 => "so2",
            UsPollutant::No2 => "no2",
        }
    }

    /// The parameter called `name` (case-insensitive; `pm2.5` is accepted for `pm25`).
    pub fn parse(name: &str) -> Option<Self> {
        let lower = name.to_ascii_lowercase();
        let lower = if lower == "pm2.5" || lower == "pm2_5" {
            "pm25".to_string()
        } else {
            lower
        };
        Self::ALL.into_iter().find(|p| p.name() == lower)
    }

    /// The bands, in increasing order.
    pub fn bands(self) -> &'static [Band] {
        match self {
            UsPollutant::Pm25 => match PM25_HAZARDOUS {
                Pm25Hazardous::Split => &PM25_SPLIT,
                Pm25Hazardous::Single => &PM25_SINGLE,
            },
            UsPollutant::Pm10 => &PM10,
            UsPollutant::O3EightHour => &O3_8H,
            UsPollutant::O3OneHour => &O3_1H,
            UsPollutant::Co => &CO,
            UsPollutant::So2 => &SO2,
            UsPollutant::No2 => &NO2,
        }
    }

    /// Decimals kept when truncating a concentration: O3 3 (ppm), PM2.5 and CO 1, PM10, SO2
    /// and NO2 0.
    pub fn decimals(self) -> i32 {
        match self {
            UsPollutant::O3EightHour | UsPollutant::O3OneHour => 3,
            UsPollutant::Pm25 | UsPollutant::Co => 1,
            UsPollutant::Pm10 | UsPollutant::So2 | UsPollutant::No2 => 0,
        }
    }

    /// The concentration truncated as the EPA requires before indexing.
    pub fn truncate(self, c: f64) -> f64 {
        let scale = 10f64.powi(self.decimals());
        // The epsilon keeps values printed with exactly the kept decimals (35.4) from falling
        // to the decimal below through binary rounding (354.0 − 1e-13).
        ((c * scale) + 1e-9).floor() / scale
    }
}

/// The US AQI of concentration `c` of `pollutant` (in the table's unit), rounded to an
/// integer, after truncation. Concentrations beyond the top of the table report 500. `None`
/// for negative or non-finite values, for an O3 1-hour mean below 0.125 ppm and for an O3
/// 8-hour mean above 0.200 ppm (which have no index).
pub fn us_sub_index(pollutant: UsPollutant, c: f64) -> Option<i64> {
    if !c.is_finite() || c < 0.0 {
        return None;
    }
    let c = pollutant.truncate(c);
    let bands = pollutant.bands();
    let top = bands.last()?;
    if c > top.hi {
        return match pollutant {
            UsPollutant::O3EightHour => None,
            _ => Some(500),
        };
    }
    let b = bands
        .iter()
        .find(|b| c >= b.lo - 1e-9 && c <= b.hi + 1e-9)?;
    let i = (b.i_hi - b.i_lo) / (b.hi - b.lo) * (c - b.lo) + b.i_lo;
    Some(i.round() as i64)
}

/// A US AQI category.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsCategory {
    /// Highest AQI in the category (inclusive).
    pub upper: i64,
    /// The EPA's name.
    pub name: &'static str,
    /// Colour as "R,G,B".
    pub rgb: &'static str,
}

/// Categories in increasing order; above 500 is the last one.
pub const US_CATEGORIES: [UsCategory; 6] = [
    UsCategory {
        upper: 50,
        name: "Good",
        rgb: "0,228,0",
    },
    UsCategory {
        upper: 100,
        name: "Moderate",
        rgb: "255,255,0",
    },
    UsCategory {
        upper: 150,
        name: "Unhealthy for Sensitive Groups",
        rgb: "255,126,0",
    },
    UsCategory {
        upper: 200,
        name: "Unhealthy",
        rgb: "255,0,0",
    },
    UsCategory {
        upper: 300,
        name: "Very Unhealthy",
        rgb: "143,63,151",
    },
    UsCategory {
        upper: 500,
        name: "Hazardous",
        rgb: "126,0,35",
    },
];

/// The category of a US AQI value; `None` when negative.
pub fn us_category(aqi: i64) -> Option<&'static UsCategory> {
    if aqi < 0 {
        return None;
    }
    US_CATEGORIES
        .iter()
        .find(|c| aqi <= c.upper)
        .or(US_CATEGORIES.last())
}

/// Molar volume of an ideal gas at 25 °C and 1 atm, litres.
pub const MOLAR_VOLUME_L: f64 = 24.45;

/// Molecular weight (g/mol) of a gas by its SQL name: `no2`, `so2`, `o3`, `co`.
pub fn molecular_weight(gas: &str) -> Option<f64> {
    Some(match gas.to_ascii_lowercase().as_str() {
        "no2" => 46.01,
        "so2" => 64.07,
        "o3" => 48.00,
        "co" => 28.01,
        _ => return None,
    })
}

/// ppb of a gas from µg/m³ (25 °C, 1 atm): `ppb = µg/m³ × 24.45 / MW`.
pub fn ugm3_to_ppb(gas: &str, ugm3: f64) -> Option<f64> {
    molecular_weight(gas).map(|mw| ugm3 * MOLAR_VOLUME_L / mw)
}

/// µg/m³ of a gas from ppb: `µg/m³ = ppb × MW / 24.45`.
pub fn ppb_to_ugm3(gas: &str, ppb: f64) -> Option<f64> {
    molecular_weight(gas).map(|mw| ppb * mw / MOLAR_VOLUME_L)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(p: UsPollutant, c: f64) -> Option<i64> {
        us_sub_index(p, c)
    }

    #[test]
    fn every_band_edge_at_below_and_above() {
        for p in UsPollutant::ALL {
            let step = 10f64.powi(-p.decimals());
            for b in p.bands() {
                assert_eq!(sub(p, b.lo), Some(b.i_lo as i64), "{p:?} at {}", b.lo);
                assert_eq!(sub(p, b.hi), Some(b.i_hi as i64), "{p:?} at {}", b.hi);
                // Just above the top of a band is truncated back onto it.
                assert_eq!(
                    sub(p, b.hi + step * 0.9),
                    Some(b.i_hi as i64),
                    "{p:?} just above {}",
                    b.hi
                );
                if b.lo > 0.0 && b.lo - step >= p.bands()[0].lo {
                    assert_eq!(
                        sub(p, b.lo - step),
                        Some(b.i_lo as i64 - 1),
                        "{p:?} just below {}",
                        b.lo
                    );
                }
            }
        }
    }

    #[test]
    fn pm25_2024_table_and_truncation() {
        assert_eq!(sub(UsPollutant::Pm25, 9.0), Some(50));
        assert_eq!(sub(UsPollutant::Pm25, 9.09), Some(50));
        assert_eq!(sub(UsPollutant::Pm25, 9.1), Some(51));
        assert_eq!(sub(UsPollutant::Pm25, 35.45), Some(100));
        assert_eq!(sub(UsPollutant::Pm25, 55.7), Some(151));
        // 20.3 µg/m³: (100 − 51) / (35.4 − 9.1) × (20.3 − 9.1) + 51 = 71.87 → 72.
        assert_eq!(sub(UsPollutant::Pm25, 20.3), Some(72));
        assert_eq!(sub(UsPollutant::Pm10, 154.9), Some(100));
        assert_eq!(sub(UsPollutant::O3EightHour, 0.0709), Some(100));
        assert_eq!(sub(UsPollutant::No2, 100.99), Some(100));
    }

    #[test]
    fn gaps_beyond_the_scale_and_invalid_input() {
        assert_eq!(sub(UsPollutant::Pm25, 600.0), Some(500));
        assert_eq!(sub(UsPollutant::O3EightHour, 0.201), None);
        assert_eq!(sub(UsPollutant::O3OneHour, 0.124), None);
        assert_eq!(sub(UsPollutant::Pm25, -1.0), None);
        assert_eq!(sub(UsPollutant::Pm25, f64::NAN), None);
        assert_eq!(sub(UsPollutant::Pm25, f64::INFINITY), None);
    }

    #[test]
    fn categories_and_conversion() {
        assert_eq!(us_category(0).map(|c| c.name), Some("Good"));
        assert_eq!(
            us_category(101).map(|c| c.name),
            Some("Unhealthy for Sensitive Groups")
        );
        assert_eq!(us_category(301).map(|c| c.name), Some("Hazardous"));
        assert_eq!(us_category(700).map(|c| c.name), Some("Hazardous"));
        assert_eq!(us_category(-1), None);
        // 100 ppb NO2 is 188.2 µg/m³; the conversion round-trips.
        let ugm3 = ppb_to_ugm3("no2", 100.0).unwrap();
        assert!((ugm3 - 188.18).abs() < 0.01, "{ugm3}");
        assert!((ugm3_to_ppb("NO2", ugm3).unwrap() - 100.0).abs() < 1e-9);
        assert!((ugm3_to_ppb("o3", 136.1).unwrap() - 69.33).abs() < 0.01);
        assert_eq!(ugm3_to_ppb("pm25", 1.0), None);
    }
}
