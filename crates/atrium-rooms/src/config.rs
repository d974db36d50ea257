//! Room configuration and CO2 threshold profiles.

use serde::{Deserialize, Serialize};

use crate::calibration::Calibration;

/// Which CO2 limits decide the traffic light.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ThresholdProfile {
    /// German UBA / ASR A3.6: below 1000 ppm good, 1000-2000 ventilate, above unacceptable.
    #[default]
    Uba,
    /// Stricter office profile: 800 / 1000 ppm.
    Strict,
    /// EN 16798-1 style limits relative to outdoor air (category II: +800 ppm,
    /// category III: +1350 ppm).
    AboveOutdoor {
        /// ppm above outdoor where "ventilate" starts.
        ventilate_delta_ppm: f64,
        /// ppm above outdoor where "unacceptable" starts.
        unacceptable_delta_ppm: f64,
    },
    /// Absolute limits chosen by the operator.
    Custom {
        /// ppm where "ventilate" starts.
        ventilate_ppm: f64,
        /// ppm where "unacceptable" starts.
        unacceptable_ppm: f64,
    },
}

impl ThresholdProfile {
    /// EN 16798-1 category II relative to outdoor air.
    pub const EN16798_CAT_II: ThresholdProfile = ThresholdProfile::AboveOutdoor {
        ventilate_delta_ppm: 800.0,
        unacceptable_delta_ppm: 1350.0,
    };

    /// The (ventilate, unacceptable) limits in ppm for a given outdoor level.
    pub fn limits(self, outdoor_ppm: f64) -> (f64, f64) {
        let (a, b) = match self {
            ThresholdProfile::Uba => (1000.0, 2000.0),
            ThresholdProfile::Strict => (800.0, 1000.0),
            ThresholdProfile::AboveOutdoor {
                ventilate_delta_ppm,
                unacceptable_delta_ppm,
            } => (
                outdoor_ppm + ventilate_delta_ppm,
                outdoor_ppm + unacceptable_delta_ppm,
            ),
            ThresholdProfile::Custom {
                ventilate_ppm,
                unacceptable_ppm,
            } => (ventilate_ppm, unacceptable_ppm),
        };
        // A misconfigured custom profile must not make the levels non-monotonic.
        (a, b.max(a))
    }

    /// The level of a CO2 concentration under this profile.
    pub fn level(self, co2_ppm: f64, outdoor_ppm: f64) -> Level {
        let (ventilate, unacceptable) = self.limits(outdoor_ppm);
        if co2_ppm >= unacceptable {
            Level::Poor
        } else if co2_ppm >= ventilate {
            Level::Moderate
        } else {
            Level::Good
        }
    }
}

/// The CO2 traffic light.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// Fresh enough.
    Good,
    /// Time to ventilate.
    Moderate,
    /// Unacceptable: ventilate now.
    Poor,
}

impl Level {
    /// The text shown on a room display.
    pub fn label(self) -> &'static str {
        match self {
            Level::Good => "good",
            Level::Moderate => "ventilate",
            Level::Poor => "unacceptable",
        }
    }
}

/// Everything the engine knows about a room besides its readings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RoomConfig {
    /// Air volume of the room in m3.
    pub volume_m3: f64,
    /// Seats; people estimates are capped at twice this.
    pub capacity: u32,
    /// Which CO2 limits apply.
    pub threshold_profile: ThresholdProfile,
    /// Outdoor CO2 in ppm; the engine also tracks the sensor's own baseline.
    pub outdoor_co2_ppm: f64,
    /// How long one PIR trigger keeps the room "recently moved in", seconds.
    pub pir_hold_s: f64,
    /// Air changes per hour assumed until the engine has learnt the room's own.
    pub default_air_changes_per_hour: f64,
    /// A Ventilate event fires this many minutes before a predicted crossing.
    pub ventilate_warning_min: f64,
    /// Occupancy probability band around 0.5 that does not change the occupied flag.
    pub occupancy_hysteresis: f64,
    /// ppm below a limit the CO2 must fall before the level steps down again.
    pub level_hysteresis_ppm: f64,
    /// Learnt per-room parameters, if the room has labelled history.
    pub calibration: Option<Calibration>,
}

impl Default for RoomConfig {
    fn default() -> Self {
        Self {
            volume_m3: 50.0,
            capacity: 6,
            threshold_profile: ThresholdProfile::Uba,
            outdoor_co2_ppm: 420.0,
            pir_hold_s: 300.0,
            default_air_changes_per_hour: 1.0,
            ventilate_warning_min: 10.0,
            occupancy_hysteresis: 0.1,
            level_hysteresis_ppm: 50.0,
            calibration: None,
        }
    }
}

impl RoomConfig {
    /// Replaces nonsensical values (zero volume, NaN) with defaults so the physics stays finite.
    pub fn sanitized(mut self) -> Self {
        let d = RoomConfig::default();
        let fix = |v: f64, lo: f64, hi: f64, dflt: f64| {
            if v.is_finite() && v >= lo && v <= hi {
                v
            } else {
                dflt
            }
        };
        self.volume_m3 = fix(self.volume_m3, 1.0, 1.0e6, d.volume_m3);
        self.outdoor_co2_ppm = fix(self.outdoor_co2_ppm, 100.0, 2000.0, d.outdoor_co2_ppm);
        self.pir_hold_s = fix(self.pir_hold_s, 1.0, 86_400.0, d.pir_hold_s);
        self.default_air_changes_per_hour = fix(
            self.default_air_changes_per_hour,
            0.01,
            100.0,
            d.default_air_changes_per_hour,
        );
        self.ventilate_warning_min = fix(self.ventilate_warning_min, 0.0, 1440.0, 10.0);
        self.occupancy_hysteresis = fix(self.occupancy_hysteresis, 0.0, 0.45, 0.1);
        self.level_hysteresis_ppm = fix(self.level_hysteresis_ppm, 0.0, 1000.0, 50.0);
        self.capacity = self.capacity.max(1);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_levels() {
        let cases = [
            (ThresholdProfile::Uba, 999.0, Level::Good),
            (ThresholdProfile::Uba, 1000.0, Level::Moderate),
            (ThresholdProfile::Uba, 2000.0, Level::Poor),
            (ThresholdProfile::Strict, 850.0, Level::Moderate),
            (ThresholdProfile::Strict, 1001.0, Level::Poor),
            (ThresholdProfile::EN16798_CAT_II, 1219.0, Level::Good),
            (ThresholdProfile::EN16798_CAT_II, 1221.0, Level::Moderate),
            (
                ThresholdProfile::Custom {
                    ventilate_ppm: 1200.0,
                    unacceptable_ppm: 900.0,
                },
                1300.0,
                Level::Poor,
            ),
        ];
        for (p, c, want) in cases {
            assert_eq!(p.level(c, 420.0), want, "{p:?} {c}");
        }
    }

    #[test]
    fn labels() {
        assert_eq!(Level::Moderate.label(), "ventilate");
        assert_eq!(Level::Poor.label(), "unacceptable");
    }

    #[test]
    fn sanitize_fixes_nonsense() {
        let c = RoomConfig {
            volume_m3: f64::NAN,
            pir_hold_s: -1.0,
            ..RoomConfig::default()
        }
        .sanitized();
        assert_eq!(c.volume_m3, 50.0);
        assert_eq!(c.pir_hold_s, 300.0);
    }
}
