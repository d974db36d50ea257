//! A deterministic room simulator for tests: CO2 mass balance with a people schedule, PIR
//! with missed detections, lamps and daylight, sensor noise and drift. Seeded, with its own
//! small PRNG, so every run is identical.

use serde::{Deserialize, Serialize};

use crate::physics::{PPM_M3_PER_H_PER_PERSON, concentration_after};
use crate::reading::{Reading, SensorKind};

/// A tiny, fast, well-mixed PRNG (SplitMix64); enough for noise, not for secrets.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator for this seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// One stay of a group in the room.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Meeting {
    /// Start, hours after the simulation start.
    pub start_h: f64,
    /// End, hours after the simulation start.
    pub end_h: f64,
    /// People present.
    pub people: u32,
}

/// The simulated room and its sensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimConfig {
    /// PRNG seed.
    pub seed: u64,
    /// Simulation start, unix ms.
    pub start_ms: i64,
    /// Length, hours.
    pub duration_h: f64,
    /// Sensor reporting period, seconds.
    pub period_s: f64,
    /// Room volume, m3.
    pub volume_m3: f64,
    /// Air changes per hour.
    pub air_changes_per_hour: f64,
    /// Outdoor CO2, ppm.
    pub outdoor_ppm: f64,
    /// CO2 sensor noise (standard deviation), ppm.
    pub co2_noise_ppm: f64,
    /// CO2 sensor drift, ppm per day.
    pub co2_drift_ppm_per_day: f64,
    /// Chance per person per period that a seated person moves enough for the PIR.
    pub pir_detect_prob: f64,
    /// Lux the lamps add when people are in.
    pub lamp_lux: f64,
    /// Peak daylight at the sensor at noon, lux.
    pub daylight_lux: f64,
    /// Who is in the room when.
    pub schedule: Vec<Meeting>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            // 2024-01-08 00:00 UTC, a Monday.
            start_ms: 1_704_672_000_000,
            duration_h: 24.0,
            period_s: 30.0,
            volume_m3: 60.0,
            air_changes_per_hour: 0.8,
            outdoor_ppm: 420.0,
            co2_noise_ppm: 8.0,
            co2_drift_ppm_per_day: 5.0,
            pir_detect_prob: 0.15,
            lamp_lux: 400.0,
            daylight_lux: 150.0,
            schedule: vec![
                Meeting {
                    start_h: 8.0,
                    end_h: 9.5,
                    people: 3,
                },
                Meeting {
                    start_h: 10.0,
                    end_h: 12.0,
                    people: 6,
                },
                Meeting {
                    start_h: 13.25,
                    end_h: 13.75,
                    people: 2,
                },
                Meeting {
                    start_h: 14.5,
                    end_h: 17.0,
                    people: 4,
                },
                Meeting {
                    start_h: 18.0,
                    end_h: 18.5,
                    people: 1,
                },
            ],
        }
    }
}

/// What happened in one reporting period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimStep {
    /// Time, unix ms.
    pub time_ms: i64,
    /// Readings of this period, in time order.
    pub readings: Vec<Reading>,
    /// True people present.
    pub people: u32,
    /// True (noise-free, drift-free) CO2, ppm.
    pub true_co2_ppm: f64,
}

impl SimConfig {
    /// People present at `h` hours after the start.
    pub fn people_at(&self, h: f64) -> u32 {
        self.schedule
            .iter()
            .filter(|m| h >= m.start_h && h < m.end_h)
            .map(|m| m.people)
            .sum()
    }

    /// Runs the simulation.
    pub fn run(&self) -> Vec<SimStep> {
        let mut rng = SplitMix64::new(self.seed);
        let period_h = self.period_s.max(1.0) / 3600.0;
        let steps = (self.duration_h / period_h).floor().max(0.0) as usize;
        let mut c = self.outdoor_ppm;
        let mut out = Vec::with_capacity(steps);
        let mut prev_people = 0;
        for k in 0..steps {
            let h = k as f64 * period_h;
            let people = self.people_at(h);
            let t = self.start_ms + (h * 3_600_000.0).round() as i64;
            let mut readings = Vec::with_capacity(4);
            // Motion: walking in and out is seen (usually) within the period; sitting rarely.
            let moving = if people != prev_people {
                rng.uniform() < 0.95
            } else {
                let miss = (1.0 - self.pir_detect_prob).powf(f64::from(people));
                people > 0 && rng.uniform() >= miss
            };
            if moving {
                let at = t + (rng.uniform() * self.period_s * 500.0) as i64;
                readings.push(Reading::new(at, SensorKind::Motion, 1.0));
            }
            let t_read = t + (self.period_s * 900.0) as i64;
            let drift = self.co2_drift_ppm_per_day * h / 24.0;
            let co2 = (c + drift + self.co2_noise_ppm * rng.normal()).max(100.0);
            readings.push(Reading::new(
                t_read,
                SensorKind::Co2,
                (co2 / 5.0).round() * 5.0,
            ));
            let day_frac = ((self.start_ms as f64 / 3_600_000.0 + h) / 24.0).fract();
            let daylight = self.daylight_lux
                * (std::f64::consts::PI * (day_frac - 0.25) / 0.5)
                    .sin()
                    .max(0.0);
            let lamps = if people > 0 { self.lamp_lux } else { 0.0 };
            let lux = (daylight + lamps + 3.0 * rng.normal()).max(0.0);
            readings.push(Reading::new(t_read, SensorKind::Light, lux.round()));
            readings.push(Reading::new(
                t_read,
                SensorKind::Temperature,
                21.0 + 0.1 * f64::from(people) + 0.05 * rng.normal(),
            ));
            out.push(SimStep {
                time_ms: t,
                readings,
                people,
                true_co2_ppm: c,
            });
            // Exact step of the mass balance with constant occupancy over the period.
            let c_ss = self.outdoor_ppm
                + PPM_M3_PER_H_PER_PERSON * f64::from(people)
                    / (self.air_changes_per_hour * self.volume_m3);
            c = concentration_after(c, c_ss, self.air_changes_per_hour, period_h);
            prev_people = people;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_seed_dependent() {
        let a = SimConfig::default().run();
        let b = SimConfig::default().run();
        assert_eq!(a, b);
        let c = SimConfig {
            seed: 2,
            ..SimConfig::default()
        }
        .run();
        assert_ne!(a, c);
    }

    #[test]
    fn co2_approaches_steady_state() {
        let cfg = SimConfig {
            schedule: vec![Meeting {
                start_h: 0.0,
                end_h: 24.0,
                people: 2,
            }],
            ..SimConfig::default()
        };
        let steps = cfg.run();
        let last = steps.last().map(|s| s.true_co2_ppm).unwrap_or(0.0);
        let css = 420.0 + 18720.0 * 2.0 / (0.8 * 60.0);
        assert!((last - css).abs() < 1.0, "{last} vs {css}");
    }

    #[test]
    fn readings_are_in_time_order() {
        for s in SimConfig::default().run() {
            assert!(s.readings.windows(2).all(|w| w[0].time_ms <= w[1].time_ms));
        }
    }
}
