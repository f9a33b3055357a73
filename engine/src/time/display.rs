//! How times are shown to people: one display time zone, a fixed UTC offset (the city's by
//! default: Hanoi, UTC+07:00, which keeps no daylight saving time), always shown with it.

use std::fmt;
use std::str::FromStr;

/// A fixed UTC offset that human-facing output shows times in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DisplayZone {
    offset_minutes: i32,
}

impl DisplayZone {
    /// The city's: Hanoi, UTC+07:00.
    pub const CITY: Self = Self {
        offset_minutes: 7 * 60,
    };
    /// UTC.
    pub const UTC: Self = Self { offset_minutes: 0 };

    /// The zone `offset_minutes` east of UTC (at most 14 hours and 59 minutes either way).
    pub fn from_minutes(offset_minutes: i32) -> Option<Self> {
        (-(14 * 60 + 59)..=14 * 60 + 59)
            .contains(&offset_minutes)
            .then_some(Self { offset_minutes })
    }

    /// Milliseconds east of UTC.
    pub fn offset_ms(self) -> i64 {
        i64::from(self.offset_minutes) * 60_000
    }

    /// Minutes east of UTC.
    pub fn offset_minutes(self) -> i32 {
        self.offset_minutes
    }

    /// `UTC+07:00`.
    pub fn label(self) -> String {
        let m = self.offset_minutes;
        let sign = if m < 0 { '-' } else { '+' };
        format!("UTC{sign}{:02}:{:02}", m.abs() / 60, m.abs() % 60)
    }

    /// `YYYY-MM-DD HH:MM:SS` in this zone; `-` for an unset time (0 or `i64::MIN`).
    pub fn format(self, epoch_ms: i64) -> String {
        if epoch_ms == i64::MIN || epoch_ms == 0 {
            return "-".into();
        }
        self.format_data(epoch_ms.saturating_sub(epoch_ms.rem_euclid(1000)))
    }

    /// A time of data (any epoch ms, 0 included) in this zone: `YYYY-MM-DD HH:MM:SS`, with
    /// `.mmm` when it has milliseconds.
    pub fn format_data(self, epoch_ms: i64) -> String {
        let local = epoch_ms.saturating_add(self.offset_ms());
        let days = local.div_euclid(86_400_000);
        let ms = local.rem_euclid(86_400_000);
        let (y, m, d) = civil_from_days(days);
        let mut out = format!(
            "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
            ms / 3_600_000,
            ms / 60_000 % 60,
            ms / 1000 % 60
        );
        if ms % 1000 != 0 {
            out.push_str(&format!(".{:03}", ms % 1000));
        }
        out
    }

    /// [`DisplayZone::format`] followed by the zone: `2026-01-01 06:00:00 UTC+07:00`.
    pub fn format_labelled(self, epoch_ms: i64) -> String {
        format!("{} {self}", self.format(epoch_ms))
    }

    /// `HH:MM:SS` of [`DisplayZone::format`], or `-`.
    pub fn clock(self, epoch_ms: i64) -> String {
        let t = self.format(epoch_ms);
        t.get(11..).map_or_else(|| "-".to_string(), str::to_string)
    }
}

impl Default for DisplayZone {
    fn default() -> Self {
        Self::CITY
    }
}

impl fmt::Display for DisplayZone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label())
    }
}

impl FromStr for DisplayZone {
    type Err = String;

    /// `+07:00`, `-03:30`, `UTC+07:00`, `UTC`, `Z`, `0`, or `Asia/Ho_Chi_Minh` (the city's).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let why = || {
            format!(
                "{s:?} is not a UTC offset: write one such as +07:00 or -03:30, UTC, or \
                 Asia/Ho_Chi_Minh"
            )
        };
        if t.eq_ignore_ascii_case("asia/ho_chi_minh") || t.eq_ignore_ascii_case("asia/hanoi") {
            return Ok(Self::CITY);
        }
        if t.eq_ignore_ascii_case("utc") || t.eq_ignore_ascii_case("z") || t == "0" {
            return Ok(Self::UTC);
        }
        let t = t
            .strip_prefix("UTC")
            .or_else(|| t.strip_prefix("utc"))
            .unwrap_or(t);
        let (sign, rest) = match t.as_bytes().first() {
            Some(b'+') => (1, &t[1..]),
            Some(b'-') => (-1, &t[1..]),
            _ => return Err(why()),
        };
        let (h, m) = rest.split_once(':').unwrap_or((rest, "0"));
        if h.is_empty() || h.len() > 2 || m.len() > 2 {
            return Err(why());
        }
        let (Ok(h), Ok(m)) = (h.parse::<i32>(), m.parse::<i32>()) else {
            return Err(why());
        };
        if !(0..60).contains(&m) {
            return Err(why());
        }
        Self::from_minutes(sign * (h * 60 + m)).ok_or_else(why)
    }
}

impl<'de> serde::Deserialize<'de> for DisplayZone {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for DisplayZone {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.label())
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_shown_in_the_zone_with_its_offset() {
        // 2026-01-01 06:00 in Hanoi is 2025-12-31 23:00 UTC.
        let t = 1_767_222_000_000;
        assert_eq!(DisplayZone::CITY.format(t), "2026-01-01 06:00:00");
        assert_eq!(DisplayZone::UTC.format(t), "2025-12-31 23:00:00");
        assert_eq!(DisplayZone::CITY.clock(t), "06:00:00");
        assert_eq!(DisplayZone::CITY.format(i64::MIN), "-");
        assert_eq!(DisplayZone::CITY.clock(0), "-");
        assert_eq!(DisplayZone::CITY.label(), "UTC+07:00");
        assert_eq!(
            DisplayZone::CITY.format_labelled(t),
            "2026-01-01 06:00:00 UTC+07:00"
        );
        let newfoundland: DisplayZone = "-03:30".parse().unwrap();
        assert_eq!(newfoundland.label(), "UTC-03:30");
        assert_eq!(newfoundland.format(t), "2025-12-31 19:30:00");
        assert_eq!(
            i64::MAX.to_string().len(),
            19,
            "no overflow on extreme times"
        );
        assert!(!DisplayZone::CITY.format(i64::MAX).is_empty());
        assert!(!DisplayZone::CITY.format(i64::MIN + 1).is_empty());
        // Times of data: milliseconds when there are some, and 0 is a time.
        assert_eq!(DisplayZone::CITY.format(t + 250), "2026-01-01 06:00:00");
        assert_eq!(
            DisplayZone::CITY.format_data(t + 250),
            "2026-01-01 06:00:00.250"
        );
        assert_eq!(DisplayZone::CITY.format_data(t), "2026-01-01 06:00:00");
        assert_eq!(DisplayZone::UTC.format_data(0), "1970-01-01 00:00:00");
        assert_eq!(DisplayZone::UTC.format_data(-1), "1969-12-31 23:59:59.999");
        assert!(!DisplayZone::CITY.format_data(i64::MIN).is_empty());
    }

    #[test]
    fn zones_are_parsed_or_refused_with_what_to_write() {
        for (text, minutes) in [
            ("+07:00", 420),
            ("UTC+07:00", 420),
            ("+7", 420),
            ("Asia/Ho_Chi_Minh", 420),
            ("UTC", 0),
            ("Z", 0),
            ("0", 0),
            ("+14:59", 899),
            ("-03:30", -210),
        ] {
            let zone: DisplayZone = text.parse().unwrap();
            assert_eq!(zone.offset_minutes(), minutes, "{text}");
        }
        for bad in [
            "",
            "Europe/Paris",
            "+25:00",
            "+15:00",
            "+07:75",
            "07:00",
            "+abc",
        ] {
            let e = bad.parse::<DisplayZone>().unwrap_err();
            assert!(e.contains("+07:00"), "{bad}: {e}");
        }
    }
}
