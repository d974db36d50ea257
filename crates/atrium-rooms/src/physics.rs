//! CO2 mass balance of a well-mixed room: V dC/dt = G n - Q (C - C_out).

/// CO2 one seated adult adds to the room, in ppm m3/h (0.0052 L/s).
pub const PPM_M3_PER_H_PER_PERSON: f64 = 18_720.0;

/// Steady-state concentration with `people` present and `air_changes_per_hour` (= Q/V).
pub fn steady_state_ppm(
    outdoor_ppm: f64,
    people: f64,
    volume_m3: f64,
    air_changes_per_hour: f64,
) -> f64 {
    outdoor_ppm + PPM_M3_PER_H_PER_PERSON * people / (air_changes_per_hour * volume_m3)
}

/// Hours until the concentration rises from `c0` to `threshold` when it approaches `c_ss`
/// exponentially at rate `air_changes_per_hour`; `None` if it never gets there.
pub fn hours_to_threshold(
    c0: f64,
    c_ss: f64,
    threshold: f64,
    air_changes_per_hour: f64,
) -> Option<f64> {
    if !(c0.is_finite() && c_ss.is_finite() && threshold.is_finite()) || air_changes_per_hour <= 0.0
    {
        return None;
    }
    if c0 >= threshold {
        return Some(0.0);
    }
    if c_ss <= threshold {
        return None;
    }
    let t = -((c_ss - threshold) / (c_ss - c0)).ln() / air_changes_per_hour;
    t.is_finite().then_some(t.max(0.0))
}

/// People implied by a concentration and its rate of change (ppm/h).
pub fn people_from_co2(
    c: f64,
    dc_dt_ppm_per_h: f64,
    outdoor_ppm: f64,
    volume_m3: f64,
    air_changes_per_hour: f64,
) -> f64 {
    volume_m3 * (dc_dt_ppm_per_h + air_changes_per_hour * (c - outdoor_ppm))
        / PPM_M3_PER_H_PER_PERSON
}

/// Air changes per hour from two points of an empty room's decay; `None` if they do not decay.
pub fn decay_rate(c1: f64, t1_h: f64, c2: f64, t2_h: f64, outdoor_ppm: f64) -> Option<f64> {
    let (a, b) = (c1 - outdoor_ppm, c2 - outdoor_ppm);
    if a <= 0.0 || b <= 0.0 || t2_h <= t1_h {
        return None;
    }
    let l = (a / b).ln() / (t2_h - t1_h);
    (l.is_finite() && l > 0.0).then_some(l)
}

/// Concentration after `hours` from `c0`, with constant generation.
pub fn concentration_after(c0: f64, c_ss: f64, air_changes_per_hour: f64, hours: f64) -> f64 {
    c_ss + (c0 - c_ss) * (-air_changes_per_hour * hours).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steady_state_table() {
        // (people, volume, ach, expected)
        let cases = [
            (0.0, 50.0, 1.0, 420.0),
            (1.0, 50.0, 1.0, 420.0 + 374.4),
            (4.0, 80.0, 2.0, 420.0 + 468.0),
        ];
        for (n, v, l, want) in cases {
            assert!((steady_state_ppm(420.0, n, v, l) - want).abs() < 1e-9);
        }
    }

    #[test]
    fn time_to_threshold_consistent_with_forward_model() {
        let (c0, l) = (600.0, 0.8);
        let css = steady_state_ppm(420.0, 3.0, 60.0, l);
        let t = hours_to_threshold(c0, css, 1000.0, l).expect("reaches 1000");
        assert!((concentration_after(c0, css, l, t) - 1000.0).abs() < 1e-6);
        assert_eq!(hours_to_threshold(c0, 900.0, 1000.0, l), None);
        assert_eq!(hours_to_threshold(1100.0, 900.0, 1000.0, l), Some(0.0));
        assert_eq!(hours_to_threshold(c0, css, 1000.0, 0.0), None);
    }

    #[test]
    fn decay_rate_recovers_lambda() {
        let l = 0.7;
        let c2 = concentration_after(1400.0, 420.0, l, 1.5);
        let got = decay_rate(1400.0, 0.0, c2, 1.5, 420.0).expect("decays");
        assert!((got - l).abs() < 1e-9);
        assert_eq!(decay_rate(400.0, 0.0, 500.0, 1.0, 420.0), None);
    }

    #[test]
    fn people_inverts_mass_balance() {
        // Steady state with 2 people -> dC/dt = 0 -> 2 people.
        let css = steady_state_ppm(420.0, 2.0, 70.0, 1.2);
        let n = people_from_co2(css, 0.0, 420.0, 70.0, 1.2);
        assert!((n - 2.0).abs() < 1e-9);
    }
}
