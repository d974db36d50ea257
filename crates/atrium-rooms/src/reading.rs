//! Sensor readings and their validation.

use serde::{Deserialize, Serialize};

/// How many channels (physical sensors of one kind) a room may have.
pub const MAX_CHANNELS: usize = 4;

/// What a reading measures, with its unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SensorKind {
    /// CO2 concentration in ppm.
    Co2,
    /// Air temperature in degrees Celsius.
    Temperature,
    /// Relative humidity in percent.
    Humidity,
    /// Illuminance in lux.
    Light,
    /// PIR motion: 1 = motion seen (event or level), 0 = none.
    Motion,
    /// Door contact: 1 = open, 0 = closed.
    Door,
    /// People counter: how many people are in the room.
    PeopleCount,
    /// Sound level (V or dB, only compared with the room's own quiet level).
    Sound,
}

impl SensorKind {
    /// Every kind, in a fixed order (used as an index).
    pub const ALL: [SensorKind; 8] = [
        SensorKind::Co2,
        SensorKind::Temperature,
        SensorKind::Humidity,
        SensorKind::Light,
        SensorKind::Motion,
        SensorKind::Door,
        SensorKind::PeopleCount,
        SensorKind::Sound,
    ];

    /// Dense index of this kind in [`SensorKind::ALL`].
    pub fn index(self) -> usize {
        match self {
            SensorKind::Co2 => 0,
            SensorKind::Temperature => 1,
            SensorKind::Humidity => 2,
            SensorKind::Light => 3,
            SensorKind::Motion => 4,
            SensorKind::Door => 5,
            SensorKind::PeopleCount => 6,
            SensorKind::Sound => 7,
        }
    }

    /// The physically plausible range of values; anything outside is a sensor fault.
    pub fn valid_range(self) -> (f64, f64) {
        match self {
            // Below 100 ppm is impossible in inhabited air; 40000 is the SCD4x ceiling.
            SensorKind::Co2 => (100.0, 40_000.0),
            SensorKind::Temperature => (-50.0, 100.0),
            SensorKind::Humidity => (0.0, 100.0),
            SensorKind::Light => (0.0, 200_000.0),
            SensorKind::Motion | SensorKind::Door => (0.0, 1.0),
            SensorKind::PeopleCount => (0.0, 10_000.0),
            SensorKind::Sound => (0.0, 200.0),
        }
    }
}

/// One measurement of one sensor of a room, timestamped by the sender.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    /// When it was measured, unix milliseconds.
    pub time_ms: i64,
    /// What was measured.
    pub sensor: SensorKind,
    /// The value, in the unit of `sensor`.
    pub value: f64,
}

impl Reading {
    /// A reading of `sensor` at `time_ms`.
    pub fn new(time_ms: i64, sensor: SensorKind, value: f64) -> Self {
        Self {
            time_ms,
            sensor,
            value,
        }
    }
}

/// Why a reading was not taken in; the caller counts these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// The value is NaN or infinite.
    #[error("value is not a finite number")]
    NotFinite,
    /// The value is outside the physically plausible range of the sensor kind.
    #[error("value is outside the sensor's plausible range")]
    OutOfRange,
    /// The reading is older than what the room has already processed.
    #[error("reading is older than the room's latest reading")]
    OutOfOrder,
    /// The same sensor channel already reported at this exact time.
    #[error("duplicate reading for this sensor and time")]
    Duplicate,
    /// The channel number is not below [`MAX_CHANNELS`].
    #[error("sensor channel is out of range")]
    UnknownChannel,
}

/// Checks a value against its kind, without looking at time.
pub fn check_value(sensor: SensorKind, value: f64) -> Result<(), RejectReason> {
    if !value.is_finite() {
        return Err(RejectReason::NotFinite);
    }
    let (lo, hi) = sensor.valid_range();
    if value < lo || value > hi {
        return Err(RejectReason::OutOfRange);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_checks() {
        let cases = [
            (SensorKind::Co2, 420.0, Ok(())),
            (SensorKind::Co2, 50.0, Err(RejectReason::OutOfRange)),
            (SensorKind::Co2, f64::NAN, Err(RejectReason::NotFinite)),
            (
                SensorKind::Light,
                f64::INFINITY,
                Err(RejectReason::NotFinite),
            ),
            (SensorKind::Light, -1.0, Err(RejectReason::OutOfRange)),
            (SensorKind::Motion, 1.0, Ok(())),
            (SensorKind::Motion, 2.0, Err(RejectReason::OutOfRange)),
            (SensorKind::Humidity, 100.0, Ok(())),
            (
                SensorKind::Temperature,
                -60.0,
                Err(RejectReason::OutOfRange),
            ),
            (SensorKind::PeopleCount, 3.0, Ok(())),
        ];
        for (kind, value, want) in cases {
            assert_eq!(check_value(kind, value), want, "{kind:?} {value}");
        }
    }

    #[test]
    fn index_matches_all() {
        for (i, k) in SensorKind::ALL.iter().enumerate() {
            assert_eq!(k.index(), i);
        }
    }
}
