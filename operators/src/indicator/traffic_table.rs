//! Traffic indicator tables: level-of-service thresholds (HCM 7th ed.) and PCU factors
//! (TCVN 4054:2005, from `schemas/reference/pcu_factors.csv`).

/// Urban street LOS by travel speed as a share of base free-flow speed (HCM Exhibit 16-3/18-1):
/// the first grade whose threshold the share exceeds; F otherwise.
pub const URBAN_SPEED_SHARE: [(char, f64); 5] = [
    ('A', 0.80),
    ('B', 0.67),
    ('C', 0.50),
    ('D', 0.40),
    ('E', 0.30),
];

/// Freeway/expressway LOS by density in pc/km/ln (metric HCM): the first grade whose upper
/// bound the density does not exceed; F above the last.
pub const FREEWAY_DENSITY: [(char, f64); 5] = [
    ('A', 6.8),
    ('B', 11.2),
    ('C', 16.2),
    ('D', 21.7),
    ('E', 28.0),
];

/// Urban street LOS. `None` for null, negative or non-finite inputs or a non-positive
/// free-flow speed. A volume/capacity ratio above 1 forces F.
pub fn los_urban(speed: f64, free_flow: f64, v_c: Option<f64>) -> Option<char> {
    if !speed.is_finite() || !free_flow.is_finite() || speed < 0.0 || free_flow <= 0.0 {
        return None;
    }
    if v_c.is_some_and(|r| r > 1.0) {
        return Some('F');
    }
    let share = speed / free_flow;
    Some(
        URBAN_SPEED_SHARE
            .iter()
            .find(|(_, t)| share > *t)
            .map_or('F', |(g, _)| *g),
    )
}

/// Freeway LOS from density (pc/km/ln); a volume/capacity ratio above 1 forces F.
pub fn los_freeway(density: f64, v_c: Option<f64>) -> Option<char> {
    if !density.is_finite() || density < 0.0 {
        return None;
    }
    if v_c.is_some_and(|r| r > 1.0) {
        return Some('F');
    }
    Some(
        FREEWAY_DENSITY
            .iter()
            .find(|(_, t)| density <= *t)
            .map_or('F', |(g, _)| *g),
    )
}

/// Travel Time Index: free-flow speed over space-mean speed, at least 1. `None` when the speed
/// is not positive (no travel time to compare) or an input is invalid.
pub fn tti(free_flow: f64, space_mean_speed: f64) -> Option<f64> {
    if !free_flow.is_finite()
        || !space_mean_speed.is_finite()
        || free_flow <= 0.0
        || space_mean_speed <= 0.0
    {
        return None;
    }
    Some((free_flow / space_mean_speed).max(1.0))
}

/// Density (PCU/km/lane): flow (PCU/h) over space-mean speed (km/h) and lanes. `None` when
/// the speed or lane count is not positive or an input is invalid.
pub fn density(flow_pcu_h: f64, space_mean_speed: f64, lanes: f64) -> Option<f64> {
    let ok = |x: f64| x.is_finite() && x >= 0.0;
    if !ok(flow_pcu_h) || !ok(space_mean_speed) || !ok(lanes) || space_mean_speed == 0.0 {
        return None;
    }
    if lanes < 1.0 {
        return None;
    }
    Some(flow_pcu_h / space_mean_speed / lanes)
}

/// Volume over capacity (both per hour). `None` when the capacity is not positive or an input
/// is invalid.
pub fn volume_capacity(flow: f64, capacity: f64) -> Option<f64> {
    if !flow.is_finite() || !capacity.is_finite() || flow < 0.0 || capacity <= 0.0 {
        return None;
    }
    Some(flow / capacity)
}

/// Flow per hour from a count over a window of `window_ms`. `None` for an empty or invalid
/// window or a negative count.
pub fn flow_per_hour(volume: f64, window_ms: i64) -> Option<f64> {
    if !volume.is_finite() || volume < 0.0 || window_ms <= 0 {
        return None;
    }
    Some(volume * 3_600_000.0 / window_ms as f64)
}

/// The `p`-th quantile (0 ≤ p ≤ 1) of `values` with linear interpolation between order
/// statistics (`percentile_cont`); sorts `values` in place. `None` when empty.
pub fn quantile(values: &mut [f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let rank = p * (values.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    Some(values[lo] + (values[hi] - values[lo]) * (rank - lo as f64))
}

/// Planning Time Index: the 95th percentile of TTI over a reporting period.
pub fn pti(ttis: &mut [f64]) -> Option<f64> {
    quantile(ttis, 0.95)
}

/// Buffer index: (95th-percentile travel time − mean travel time) / mean travel time. `None`
/// when empty or the mean is not positive.
pub fn buffer_index(travel_times: &mut [f64]) -> Option<f64> {
    if travel_times.is_empty() {
        return None;
    }
    let mean = travel_times.iter().sum::<f64>() / travel_times.len() as f64;
    if mean <= 0.0 {
        return None;
    }
    quantile(travel_times, 0.95).map(|p95| (p95 - mean) / mean)
}

/// The PCU factor table, from `schemas/reference/pcu_factors.csv`: (vehicle class, factor).
pub fn pcu_factors() -> Vec<(String, f64)> {
    include_str!("../../../schemas/reference/pcu_factors.csv")
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split(',');
            let class = fields.next()?.trim().to_string();
            let pcu = fields.next()?.trim().parse().ok()?;
            Some((class, pcu))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urban_los_at_every_threshold() {
        // Exactly at a threshold is the worse grade ("A > 80 %").
        for (i, (grade, share)) in URBAN_SPEED_SHARE.iter().enumerate() {
            assert_eq!(los_urban(share * 50.0 + 0.01, 50.0, None), Some(*grade));
            let worse = URBAN_SPEED_SHARE.get(i + 1).map_or('F', |(g, _)| *g);
            assert_eq!(
                los_urban(share * 50.0, 50.0, None),
                Some(worse),
                "at {share}"
            );
        }
        assert_eq!(los_urban(10.0, 50.0, None), Some('F'));
        assert_eq!(los_urban(60.0, 50.0, None), Some('A'));
        assert_eq!(los_urban(45.0, 50.0, Some(1.01)), Some('F'));
        assert_eq!(los_urban(45.0, 50.0, Some(1.0)), Some('A'));
        assert_eq!(los_urban(-1.0, 50.0, None), None);
        assert_eq!(los_urban(f64::NAN, 50.0, None), None);
        assert_eq!(los_urban(30.0, 0.0, None), None);
    }

    #[test]
    fn freeway_los_at_every_threshold() {
        for (i, (grade, limit)) in FREEWAY_DENSITY.iter().enumerate() {
            assert_eq!(los_freeway(*limit, None), Some(*grade), "at {limit}");
            let worse = FREEWAY_DENSITY.get(i + 1).map_or('F', |(g, _)| *g);
            assert_eq!(
                los_freeway(limit + 0.01, None),
                Some(worse),
                "above {limit}"
            );
        }
        assert_eq!(los_freeway(0.0, None), Some('A'));
        assert_eq!(los_freeway(5.0, Some(1.2)), Some('F'));
        assert_eq!(los_freeway(-0.1, None), None);
    }

    #[test]
    fn tti_examples() {
        // 1.3 means a 20-minute trip takes 26.
        assert_eq!(tti(52.0, 40.0), Some(1.3));
        assert_eq!(tti(50.0, 60.0), Some(1.0));
        assert_eq!(tti(50.0, 0.0), None);
        assert_eq!(tti(50.0, f64::NAN), None);
    }

    #[test]
    fn density_volume_capacity_flow() {
        assert_eq!(density(3600.0, 30.0, 4.0), Some(30.0));
        assert_eq!(density(3600.0, 0.0, 4.0), None);
        assert_eq!(density(3600.0, 30.0, 0.0), None);
        assert_eq!(density(-1.0, 30.0, 4.0), None);
        assert_eq!(density(f64::NAN, 30.0, 4.0), None);
        assert_eq!(volume_capacity(6800.0, 6800.0), Some(1.0));
        assert_eq!(volume_capacity(100.0, 0.0), None);
        assert_eq!(flow_per_hour(25.0, 60_000), Some(1500.0));
        assert_eq!(flow_per_hour(25.0, 0), None);
    }

    #[test]
    fn quantiles_pti_and_buffer_index() {
        let mut v: Vec<f64> = (1..=21).map(|i| 1.0 + f64::from(i) / 20.0).collect();
        // 21 values 1.05 … 2.05: the 95th percentile is at rank 19 exactly.
        assert!((pti(&mut v).unwrap() - 2.0).abs() < 1e-12);
        assert_eq!(pti(&mut []), None);
        assert_eq!(quantile(&mut [3.0], 0.95), Some(3.0));
        let mut tt = vec![10.0, 10.0, 10.0, 10.0, 20.0];
        // Mean 12, p95 = 10 + 0.8 × 10 = 18: buffer index 0.5.
        assert!((buffer_index(&mut tt).unwrap() - 0.5).abs() < 1e-12);
        assert_eq!(buffer_index(&mut []), None);
    }

    #[test]
    fn pcu_factors_come_from_the_reference_table() {
        let f = pcu_factors();
        let get = |c: &str| f.iter().find(|(k, _)| k == c).map(|(_, v)| *v);
        assert_eq!(get("motorbike"), Some(0.3));
        assert_eq!(get("bicycle"), Some(0.2));
        assert_eq!(get("car"), Some(1.0));
        assert_eq!(get("articulated"), Some(4.0));
    }
}
