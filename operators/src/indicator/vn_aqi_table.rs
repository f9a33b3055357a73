//! VN_AQI tables of Decision 1459/QĐ-TCMT (12 Nov 2019): breakpoints and categories.
//!
//! The tables are data: a changed regulation is a change here and nowhere else. Concentrations
//! are µg/m³ for every parameter (CO included: 10 000 µg/m³ = 10 mg/m³). Segment i runs from
//! `BP_i` to `BP_{i+1}`, contiguous.

/// A VN_AQI parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pollutant {
    /// PM2.5 (hourly: NowCast; daily: 24-hour mean).
    Pm25,
    /// PM10 (hourly: NowCast; daily: 24-hour mean).
    Pm10,
    /// O3, 1-hour mean.
    O3OneHour,
    /// O3, 8-hour mean.
    O3EightHour,
    /// NO2, 1-hour mean.
    No2,
    /// SO2, 1-hour mean.
    So2,
    /// CO, 1-hour mean.
    Co,
}

impl Pollutant {
    /// Every parameter, in the decision's column order.
    pub const ALL: [Pollutant; 7] = [
        Pollutant::O3OneHour,
        Pollutant::O3EightHour,
        Pollutant::Co,
        Pollutant::So2,
        Pollutant::No2,
        Pollutant::Pm10,
        Pollutant::Pm25,
    ];

    /// The name used in SQL: `pm25`, `pm10`, `o3_1h`, `o3_8h`, `no2`, `so2`, `co`.
    pub fn name(self) -> &'static str {
        match self {
            Pollutant::Pm25 => "pm25",
            Pollutant::Pm10 => "pm10",
            Pollutant::O3OneHour => "o3_1h",
            Pollutant::O3EightHour => "o3_8h",
            Pollutant::No2 => "no2",
            Pollutant::So2 => "so2",
            Pollutant::Co => "co",
        }
    }

    /// The parameter called `name` (case-insensitive; `pm2.5` and `o3` are accepted for `pm25`
    /// and `o3_1h`).
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name.to_ascii_lowercase().as_str() {
            "pm25" | "pm2.5" | "pm2_5" => Pollutant::Pm25,
            "pm10" => Pollutant::Pm10,
            "o3_1h" | "o3" => Pollutant::O3OneHour,
            "o3_8h" => Pollutant::O3EightHour,
            "no2" => Pollutant::No2,
            "so2" => Pollutant::So2,
            "co" => Pollutant::Co,
            _ => return None,
        })
    }

    /// Breakpoints `BP_1 … BP_n` (µg/m³); the O3 8-hour column stops at `BP_6`.
    pub fn breakpoints(self) -> &'static [f64] {
        match self {
            Pollutant::O3OneHour => &[0.0, 160.0, 200.0, 300.0, 400.0, 800.0, 1000.0, 1200.0],
            Pollutant::O3EightHour => &[0.0, 100.0, 120.0, 170.0, 210.0, 400.0],
            Pollutant::Co => &[
                0.0, 10_000.0, 30_000.0, 45_000.0, 60_000.0, 90_000.0, 120_000.0, 150_000.0,
            ],
            Pollutant::So2 => &[0.0, 125.0, 350.0, 550.0, 800.0, 1600.0, 2100.0, 2630.0],
            Pollutant::No2 => &[0.0, 100.0, 200.0, 700.0, 1200.0, 2350.0, 3100.0, 3850.0],
            Pollutant::Pm10 => &[0.0, 50.0, 150.0, 250.0, 350.0, 420.0, 500.0, 600.0],
            Pollutant::Pm25 => &[0.0, 25.0, 50.0, 80.0, 150.0, 250.0, 350.0, 500.0],
        }
    }
}

/// Index values `I_1 … I_8` at the breakpoints.
pub const INDEX: [f64; 8] = [0.0, 50.0, 100.0, 150.0, 200.0, 300.0, 400.0, 500.0];

/// The top of the scale; concentrations beyond the last breakpoint report this value.
pub const TOP: f64 = 500.0;

/// A VN_AQI category.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Category {
    /// Highest AQI in the category (inclusive).
    pub upper: i64,
    /// Name in Vietnamese, as in the decision.
    pub vi: &'static str,
    /// English name.
    pub en: &'static str,
    /// Colour as "R,G,B", as in the decision.
    pub rgb: &'static str,
}

/// Categories in increasing order; an AQI above 500 is in the last one (beyond the scale).
pub const CATEGORIES: [Category; 6] = [
    Category {
        upper: 50,
        vi: "Tốt",
        en: "Good",
        rgb: "0,228,0",
    },
    Category {
        upper: 100,
        vi: "Trung bình",
        en: "Moderate",
        rgb: "255,255,0",
    },
    Category {
        upper: 150,
        vi: "Kém",
        en: "Poor",
        rgb: "255,126,0",
    },
    Category {
        upper: 200,
        vi: "Xấu",
        en: "Bad",
        rgb: "255,0,0",
    },
    Category {
        upper: 300,
        vi: "Rất xấu",
        en: "Very bad",
        rgb: "143,63,151",
    },
    Category {
        upper: 500,
        vi: "Nguy hại",
        en: "Hazardous",
        rgb: "126,0,35",
    },
];

/// The category of an AQI value (`None` for a negative value).
pub fn category(aqi: i64) -> Option<&'static Category> {
    if aqi < 0 {
        return None;
    }
    CATEGORIES
        .iter()
        .find(|c| aqi <= c.upper)
        .or(CATEGORIES.last())
}

/// The sub-index of `pollutant` at concentration `c` (µg/m³), not rounded:
/// `(I_{i+1} − I_i) / (BP_{i+1} − BP_i) × (c − BP_i) + I_i` on the segment holding `c`.
/// `None` for a negative or non-finite concentration, and for an O3 8-hour mean above
/// 400 µg/m³ (the decision then uses the 1-hour sub-index only). Above the last breakpoint the
/// sub-index is 500 (beyond the scale, not extrapolated).
pub fn sub_index(pollutant: Pollutant, c: f64) -> Option<f64> {
    if !c.is_finite() || c < 0.0 {
        return None;
    }
    let bp = pollutant.breakpoints();
    let last = bp.len() - 1;
    if c > bp[last] {
        return if pollutant == Pollutant::O3EightHour {
            None
        } else {
            Some(TOP)
        };
    }
    // The segment [BP_i, BP_{i+1}] holding c (a breakpoint belongs to the lower segment,
    // where both formulas agree).
    let i = (0..last).find(|&i| c <= bp[i + 1]).unwrap_or(last - 1);
    Some((INDEX[i + 1] - INDEX[i]) / (bp[i + 1] - bp[i]) * (c - bp[i]) + INDEX[i])
}

/// The station AQI and its dominant parameter: the maximum of the rounded sub-indices of
/// the given (parameter, concentration) pairs. `None` when neither PM2.5 nor PM10 has a value
/// (at least one of them is mandatory). For the daily AQI, pass both O3 columns; an O3 8-hour
/// mean above 400 µg/m³ has no sub-index, so the 1-hour one decides.
pub fn overall(values: &[(Pollutant, Option<f64>)]) -> Option<(i64, Pollutant)> {
    let has_pm = values.iter().any(|(p, v)| {
        matches!(p, Pollutant::Pm25 | Pollutant::Pm10) && v.and_then(|c| sub_index(*p, c)).is_some()
    });
    if !has_pm {
        return None;
    }
    values
        .iter()
        .filter_map(|(p, v)| v.and_then(|c| sub_index(*p, c)).map(|s| (rounded(s), *p)))
        // Ties go to the earlier parameter of the call (PM first in the SQL functions).
        .fold(None, |best: Option<(i64, Pollutant)>, (s, p)| match best {
            Some((b, _)) if b >= s => best,
            _ => Some((s, p)),
        })
}

/// A sub-index rounded to an integer as the decision prescribes (half away from zero).
pub fn rounded(value: f64) -> i64 {
    value.round() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(p: Pollutant, c: f64) -> i64 {
        rounded(sub_index(p, c).expect("defined"))
    }

    #[test]
    fn decision_worked_examples_hourly() {
        assert_eq!(sub(Pollutant::O3OneHour, 136.1), 43);
        // The decision prints 60 for NO2 118.7, but its own formula gives
        // 50 + (100 − 50)/(200 − 100) × (118.7 − 100) = 59.35 → 59: the printed value is an
        // error in the decision; the formula is what is implemented.
        assert_eq!(sub(Pollutant::No2, 118.7), 59);
        assert_eq!(sub(Pollutant::Pm25, 20.3), 41);
    }

    #[test]
    fn decision_worked_examples_daily() {
        assert_eq!(sub(Pollutant::O3EightHour, 89.3), 45);
        assert_eq!(sub(Pollutant::O3OneHour, 114.6), 36);
        assert_eq!(sub(Pollutant::No2, 130.8), 65);
        assert_eq!(sub(Pollutant::Pm25, 55.7), 110);
    }

    #[test]
    fn every_breakpoint_at_below_and_above() {
        for p in Pollutant::ALL {
            let bp = p.breakpoints();
            for (i, &b) in bp.iter().enumerate() {
                // At a breakpoint the sub-index is exactly its index value.
                assert_eq!(sub_index(p, b), Some(INDEX[i]), "{} at {b}", p.name());
                if i > 0 {
                    let below = sub_index(p, b - 0.01).expect("below");
                    assert!(
                        below < INDEX[i] && below > INDEX[i - 1],
                        "{} below {b}",
                        p.name()
                    );
                }
                if i + 1 < bp.len() {
                    let above = sub_index(p, b + 0.01).expect("above");
                    assert!(
                        above > INDEX[i] && above < INDEX[i + 1],
                        "{} above {b}",
                        p.name()
                    );
                }
            }
        }
    }

    #[test]
    fn beyond_the_scale_and_invalid_input() {
        assert_eq!(sub_index(Pollutant::Pm25, 900.0), Some(TOP));
        assert_eq!(sub_index(Pollutant::Co, 1e9), Some(TOP));
        assert_eq!(sub_index(Pollutant::O3EightHour, 400.1), None);
        assert_eq!(sub_index(Pollutant::Pm25, -1.0), None);
        assert_eq!(sub_index(Pollutant::Pm25, f64::NAN), None);
        assert_eq!(sub_index(Pollutant::Pm25, f64::INFINITY), None);
        assert_eq!(sub_index(Pollutant::Pm25, 0.0), Some(0.0));
    }

    #[test]
    fn decision_station_aqi_hourly_and_daily() {
        use Pollutant::*;
        // Hourly: O3 136.1 → 43, NO2 118.7 → 59, PM2.5 NowCast 20.3 → 41: AQI^h is the
        // maximum. (The decision prints 60 because it prints 60 for NO2; see above.)
        let hourly = overall(&[
            (Pm25, Some(20.3)),
            (O3OneHour, Some(136.1)),
            (No2, Some(118.7)),
        ]);
        assert_eq!(hourly, Some((59, No2)));
        // Daily: O3 8h 89.3 → 45, O3 1h 114.6 → 36, NO2 130.8 → 65, PM2.5 55.7 → 110.
        let daily = overall(&[
            (Pm25, Some(55.7)),
            (O3OneHour, Some(114.6)),
            (O3EightHour, Some(89.3)),
            (No2, Some(130.8)),
        ]);
        assert_eq!(daily, Some((110, Pm25)));
        // No PM: no AQI, however bad the gases.
        assert_eq!(
            overall(&[(Pm25, None), (Pm10, None), (No2, Some(500.0))]),
            None
        );
        // PM present but invalid (negative) counts as absent.
        assert_eq!(overall(&[(Pm25, Some(-3.0)), (No2, Some(50.0))]), None);
    }

    #[test]
    fn categories_at_their_boundaries() {
        let name = |a| category(a).map(|c| c.vi);
        assert_eq!(name(0), Some("Tốt"));
        assert_eq!(name(50), Some("Tốt"));
        assert_eq!(name(51), Some("Trung bình"));
        assert_eq!(name(100), Some("Trung bình"));
        assert_eq!(name(101), Some("Kém"));
        assert_eq!(name(151), Some("Xấu"));
        assert_eq!(name(201), Some("Rất xấu"));
        assert_eq!(name(300), Some("Rất xấu"));
        assert_eq!(name(301), Some("Nguy hại"));
        assert_eq!(name(500), Some("Nguy hại"));
        assert_eq!(name(650), Some("Nguy hại"));
        assert_eq!(name(-1), None);
        assert_eq!(category(110).map(|c| c.rgb), Some("255,126,0"));
    }
}
