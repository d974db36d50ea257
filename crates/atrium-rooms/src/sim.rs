//! A deterministic room simulator: CO2 and water-vapour mass balances with a people
//! schedule, PIR with missed detections, lamps and daylight, door contacts and people
//! counters, sensor noise and drift. Seeded, with its own small PRNG, so every run is
//! identical.
//!
//! Two forms share one code path: [`RoomSim`] steps through time as long as it is asked (a
//! live simulated room), and [`SimConfig::run`] collects a fixed span of it (tests and
//! evaluations). [`DayPlan`] generates a plausible day of meetings for a room.

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

/// Indoor temperature of the simulated room with nobody in it, °C.
const BASE_TEMPERATURE_C: f64 = 21.0;
/// Warming per person present, °C (a crude stand-in for the room's heat balance).
const WARMING_PER_PERSON_C: f64 = 0.1;
/// Highest relative humidity the simulated air reaches: condensation on cold surfaces and
/// the room's own moisture buffer keep real rooms below saturation.
const MAX_HUMIDITY_PCT: f64 = 95.0;

/// The simulated room and its sensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SimConfig {
    /// PRNG seed.
    pub seed: u64,
    /// Simulation start, unix ms.
    pub start_ms: i64,
    /// Length, hours ([`SimConfig::run`] only; a [`RoomSim`] runs as long as it is stepped).
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
    /// People switch the lamps on only while daylight at the sensor is below this many lux
    /// (a bright room); `None`: whenever they are in.
    pub lamps_below_lux: Option<f64>,
    /// Who is in the room when.
    pub schedule: Vec<Meeting>,
    /// The schedule starts over every this many hours (e.g. 24: the same day every day);
    /// `None`: it plays once.
    pub repeat_every_h: Option<f64>,
    /// Whether the node reports relative humidity (with CO2 and temperature, as SCD4x-class
    /// sensors do).
    pub humidity: bool,
    /// Relative humidity of the air the ventilation brings in, at room temperature, %.
    pub supply_humidity_pct: f64,
    /// Water vapour one seated adult adds, g/h (sedentary office work: about 40-70).
    pub moisture_g_per_h_per_person: f64,
    /// Furnishings and walls take up and give back moisture: the room behaves, for water
    /// vapour, like this many times its air volume (1: bare room; 2-4: furnished office).
    pub moisture_buffer: f64,
    /// Humidity sensor noise (standard deviation), %RH.
    pub humidity_noise_pct: f64,
    /// Whether the room's door has a contact sensor: it opens (1) and closes again (0) when
    /// people come or go.
    pub door_sensor: bool,
    /// Whether the room has a people counter at the door, reporting every period.
    pub people_counter: bool,
    /// Chance per report that the people counter is off by one while people are in.
    pub counter_error_prob: f64,
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
            lamps_below_lux: None,
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
            repeat_every_h: None,
            humidity: true,
            supply_humidity_pct: 40.0,
            moisture_g_per_h_per_person: 50.0,
            moisture_buffer: 2.0,
            humidity_noise_pct: 0.5,
            door_sensor: false,
            people_counter: false,
            counter_error_prob: 0.05,
        }
    }
}

/// What happened in one reporting period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimStep {
    /// Start of the period, unix ms.
    pub time_ms: i64,
    /// Readings of this period, in time order (all before the period's end).
    pub readings: Vec<Reading>,
    /// True people present.
    pub people: u32,
    /// True (noise-free, drift-free) CO2, ppm.
    pub true_co2_ppm: f64,
    /// True relative humidity, %.
    pub true_humidity_pct: f64,
}

/// Water-vapour density of saturated air at `temp_c`, g/m3 (Magnus formula over water).
pub fn saturation_vapour_density(temp_c: f64) -> f64 {
    let pressure_hpa = 6.112 * (17.62 * temp_c / (243.12 + temp_c)).exp();
    // Ideal gas: rho = e / (R_v T), R_v = 461.5 J/(kg K); hPa -> Pa, kg -> g.
    pressure_hpa * 100.0 / (461.5 * (temp_c + 273.15)) * 1000.0
}

impl SimConfig {
    /// People present at `h` hours after the start.
    pub fn people_at(&self, h: f64) -> u32 {
        let h = match self.repeat_every_h {
            Some(p) if p > 0.0 => h.rem_euclid(p),
            _ => h,
        };
        self.schedule
            .iter()
            .filter(|m| h >= m.start_h && h < m.end_h)
            .map(|m| m.people)
            .sum()
    }

    /// Runs the simulation for `duration_h`: the first steps of a [`RoomSim`].
    pub fn run(&self) -> Vec<SimStep> {
        let mut sim = RoomSim::new(self.clone());
        let steps = (self.duration_h / sim.period_h()).floor().max(0.0) as usize;
        (0..steps).map(|_| sim.next_step()).collect()
    }

    /// Water-vapour density of the supply air, g/m3.
    fn supply_moisture(&self) -> f64 {
        self.supply_humidity_pct.clamp(0.0, 100.0) / 100.0
            * saturation_vapour_density(BASE_TEMPERATURE_C)
    }
}

/// A simulated room stepping through time, one reporting period per step: the live form of
/// [`SimConfig::run`], for as long as it is stepped.
#[derive(Debug, Clone)]
pub struct RoomSim {
    config: SimConfig,
    /// The stream of the original sensors (motion, CO2, light, temperature).
    rng: SplitMix64,
    /// A separate stream for humidity, doors and counters, so adding them leaves the other
    /// sensors' readings exactly as they were.
    aux: SplitMix64,
    step: u64,
    co2_ppm: f64,
    moisture_g_m3: f64,
    prev_people: u32,
}

impl RoomSim {
    /// A room at the start of `config`'s simulation: empty, at outdoor CO2 and supply humidity.
    pub fn new(config: SimConfig) -> Self {
        Self {
            rng: SplitMix64::new(config.seed),
            aux: SplitMix64::new(config.seed ^ 0x5EED_0FA0_C5D0_0F00),
            step: 0,
            co2_ppm: config.outdoor_ppm,
            moisture_g_m3: config.supply_moisture(),
            prev_people: 0,
            config,
        }
    }

    /// The room's configuration.
    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    fn period_h(&self) -> f64 {
        self.config.period_s.max(1.0) / 3600.0
    }

    /// Length of one step, ms.
    pub fn period_ms(&self) -> i64 {
        (self.period_h() * 3_600_000.0).round() as i64
    }

    fn hours(&self, step: u64) -> f64 {
        step as f64 * self.period_h()
    }

    fn start_of(&self, step: u64) -> i64 {
        self.config.start_ms + (self.hours(step) * 3_600_000.0).round() as i64
    }

    /// Start of the next step's period, unix ms.
    pub fn next_time_ms(&self) -> i64 {
        self.start_of(self.step)
    }

    /// The steps whose periods have ended by `time_ms` (each reading of a step is taken
    /// before its period ends, so none of them lies after `time_ms`).
    pub fn step_until(&mut self, time_ms: i64) -> Vec<SimStep> {
        let mut out = Vec::new();
        while self.start_of(self.step + 1) <= time_ms {
            out.push(self.next_step());
        }
        out
    }

    /// Simulates the next reporting period.
    pub fn next_step(&mut self) -> SimStep {
        let cfg = &self.config;
        let period_h = self.period_h();
        let h = self.hours(self.step);
        let t = self.start_of(self.step);
        let people = cfg.people_at(h);
        let prev_people = self.prev_people;
        let rng = &mut self.rng;
        let aux = &mut self.aux;
        let mut readings = Vec::with_capacity(8);
        // Motion: walking in and out is seen (usually) within the period; sitting rarely.
        let moving = if people != prev_people {
            rng.uniform() < 0.95
        } else {
            let miss = (1.0 - cfg.pir_detect_prob).powf(f64::from(people));
            people > 0 && rng.uniform() >= miss
        };
        let mut motion_at = None;
        if moving {
            let at = t + (rng.uniform() * cfg.period_s * 500.0) as i64;
            readings.push(Reading::new(at, SensorKind::Motion, 1.0));
            motion_at = Some(at);
        }
        // The door opens as people come or go (when the PIR saw them, at that moment) and
        // closes behind them a little later, well before the period's other readings.
        if cfg.door_sensor && people != prev_people {
            let opened =
                motion_at.unwrap_or_else(|| t + (aux.uniform() * cfg.period_s * 400.0) as i64);
            let open_ms = ((0.1 + 0.25 * aux.uniform()) * cfg.period_s * 1000.0) as i64;
            readings.push(Reading::new(opened, SensorKind::Door, 1.0));
            readings.push(Reading::new(opened + open_ms.max(1), SensorKind::Door, 0.0));
        }
        let t_read = t + (cfg.period_s * 900.0) as i64;
        let drift = cfg.co2_drift_ppm_per_day * h / 24.0;
        let co2 = (self.co2_ppm + drift + cfg.co2_noise_ppm * rng.normal()).max(100.0);
        readings.push(Reading::new(
            t_read,
            SensorKind::Co2,
            (co2 / 5.0).round() * 5.0,
        ));
        let day_frac = ((cfg.start_ms as f64 / 3_600_000.0 + h) / 24.0).fract();
        let daylight = cfg.daylight_lux
            * (std::f64::consts::PI * (day_frac - 0.25) / 0.5)
                .sin()
                .max(0.0);
        let dark = cfg.lamps_below_lux.is_none_or(|below| daylight < below);
        let lamps = if people > 0 && dark {
            cfg.lamp_lux
        } else {
            0.0
        };
        let lux = (daylight + lamps + 3.0 * rng.normal()).max(0.0);
        readings.push(Reading::new(t_read, SensorKind::Light, lux.round()));
        let temp_c = BASE_TEMPERATURE_C + WARMING_PER_PERSON_C * f64::from(people);
        readings.push(Reading::new(
            t_read,
            SensorKind::Temperature,
            // Sensors report to 0.01 °C.
            ((temp_c + 0.05 * rng.normal()) * 100.0).round() / 100.0,
        ));
        let true_humidity_pct = (self.moisture_g_m3 / saturation_vapour_density(temp_c) * 100.0)
            .clamp(0.0, MAX_HUMIDITY_PCT);
        if cfg.humidity {
            let rh = true_humidity_pct + cfg.humidity_noise_pct * aux.normal();
            readings.push(Reading::new(
                t_read,
                SensorKind::Humidity,
                ((rh * 10.0).round() / 10.0).clamp(0.0, 100.0),
            ));
        }
        if cfg.people_counter {
            let mut counted = i64::from(people);
            if people > 0 && aux.uniform() < cfg.counter_error_prob {
                counted += if aux.uniform() < 0.5 { -1 } else { 1 };
            }
            readings.push(Reading::new(
                t_read,
                SensorKind::PeopleCount,
                counted.max(0) as f64,
            ));
        }
        // Stable: readings of one instant keep the order above.
        readings.sort_by_key(|r| r.time_ms);
        let step = SimStep {
            time_ms: t,
            readings,
            people,
            true_co2_ppm: self.co2_ppm,
            true_humidity_pct,
        };
        // Exact steps of both mass balances with constant occupancy over the period.
        let n = f64::from(people);
        let flow = (cfg.air_changes_per_hour * cfg.volume_m3).max(1e-9);
        let c_ss = cfg.outdoor_ppm + PPM_M3_PER_H_PER_PERSON * n / flow;
        self.co2_ppm = concentration_after(self.co2_ppm, c_ss, cfg.air_changes_per_hour, period_h);
        let w_ss = cfg.supply_moisture() + cfg.moisture_g_per_h_per_person * n / flow;
        let w_rate = cfg.air_changes_per_hour / cfg.moisture_buffer.max(1.0);
        let w_cap = saturation_vapour_density(temp_c) * MAX_HUMIDITY_PCT / 100.0;
        self.moisture_g_m3 =
            concentration_after(self.moisture_g_m3, w_ss, w_rate, period_h).min(w_cap);
        self.prev_people = people;
        self.step += 1;
        step
    }
}

/// How a room is used over a day, for generating its meetings ([`DayPlan::meetings`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DayPlan {
    /// PRNG seed: the same plan and seed give the same day.
    pub seed: u64,
    /// Seats: no meeting has more people.
    pub capacity: u32,
    /// Share of the working day the room is in use, 0..1 (about: gaps are random).
    pub busyness: f64,
    /// Meetings start within this many hours after the start of the day.
    pub working_h: f64,
    /// Length of the day, hours: no meeting ends later (the day can then repeat).
    pub day_h: f64,
    /// The first meeting starts between these minutes after the start of the day.
    pub first_start_min: (f64, f64),
    /// Shortest meeting, minutes.
    pub min_meeting_min: f64,
    /// Longest meeting, minutes.
    pub max_meeting_min: f64,
}

impl Default for DayPlan {
    fn default() -> Self {
        DayPlan {
            seed: 1,
            capacity: 4,
            busyness: 0.5,
            working_h: 10.0,
            day_h: 24.0,
            first_start_min: (1.0, 30.0),
            min_meeting_min: 15.0,
            max_meeting_min: 120.0,
        }
    }
}

/// Meetings are booked in steps of this many minutes (lengths and gaps).
const BOOKING_STEP_MIN: f64 = 5.0;

impl DayPlan {
    /// A day of meetings, in time order, never overlapping, each with 1..=capacity people,
    /// separated by gaps of at least five minutes.
    pub fn meetings(&self) -> Vec<Meeting> {
        let mut rng = SplitMix64::new(self.seed);
        let capacity = self.capacity.max(1);
        let min_len = self.min_meeting_min.max(BOOKING_STEP_MIN);
        let max_len = self.max_meeting_min.max(min_len);
        let busy = self.busyness.clamp(0.05, 0.95);
        let day_min = self.day_h.max(1.0) * 60.0;
        let working_min = (self.working_h * 60.0).clamp(0.0, day_min);
        let (lo, hi) = self.first_start_min;
        let lo = lo.max(0.0);
        let hi = hi.max(lo);
        // Mean gap so that meetings fill about `busy` of the time.
        let mean_len = (min_len + max_len) / 2.0;
        let mean_gap = mean_len * (1.0 - busy) / busy;
        let round = |m: f64| (m / BOOKING_STEP_MIN).round() * BOOKING_STEP_MIN;

        let mut out = Vec::new();
        let mut start = lo + (hi - lo) * rng.uniform();
        while start < working_min {
            // Lengths lean towards the short end, as bookings do.
            let len = round(min_len + (max_len - min_len) * rng.uniform().powf(1.3))
                .clamp(min_len, max_len);
            let end = (start + len).min(day_min);
            if end - start < min_len.min(BOOKING_STEP_MIN) {
                break;
            }
            // Most meetings use a part of the seats; a full room is rare.
            let people = (1 + (rng.uniform().powf(1.6) * f64::from(capacity)) as u32).min(capacity);
            out.push(Meeting {
                start_h: start / 60.0,
                end_h: end / 60.0,
                people,
            });
            let gap = round(-mean_gap * (1.0 - rng.uniform()).ln()).max(BOOKING_STEP_MIN);
            start = end + gap;
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
    #[test]
    fn stepping_is_the_same_run() {
        let cfg = SimConfig {
            door_sensor: true,
            people_counter: true,
            ..SimConfig::default()
        };
        let whole = cfg.run();
        let mut sim = RoomSim::new(cfg.clone());
        let mut stepped = Vec::new();
        // Uneven slices of time, as a live clock would hand them out.
        let mut until = cfg.start_ms;
        while stepped.len() < whole.len() {
            until += 47_000;
            stepped.extend(sim.step_until(until));
            // No reading lies after the time asked for.
            assert!(
                stepped
                    .iter()
                    .flat_map(|s: &SimStep| s.readings.iter())
                    .all(|r| r.time_ms <= until)
            );
        }
        stepped.truncate(whole.len());
        assert_eq!(whole, stepped);
    }

    #[test]
    fn new_sensors_leave_the_old_readings_alone() {
        let plain = SimConfig {
            humidity: false,
            ..SimConfig::default()
        }
        .run();
        let full = SimConfig {
            door_sensor: true,
            people_counter: true,
            ..SimConfig::default()
        }
        .run();
        let old_kinds = |s: &SimStep| -> Vec<Reading> {
            s.readings
                .iter()
                .filter(|r| {
                    !matches!(
                        r.sensor,
                        SensorKind::Humidity | SensorKind::Door | SensorKind::PeopleCount
                    )
                })
                .copied()
                .collect()
        };
        for (a, b) in plain.iter().zip(&full) {
            assert_eq!(old_kinds(a), old_kinds(b));
        }
    }

    #[test]
    fn humidity_rises_with_people_and_falls_after() {
        let cfg = SimConfig {
            volume_m3: 30.0,
            air_changes_per_hour: 1.0,
            schedule: vec![Meeting {
                start_h: 1.0,
                end_h: 2.0,
                people: 4,
            }],
            duration_h: 6.0,
            ..SimConfig::default()
        };
        let steps = cfg.run();
        let at = |h: f64| {
            steps
                .iter()
                .find(|s| s.time_ms >= cfg.start_ms + (h * 3_600_000.0) as i64)
                .map(|s| s.true_humidity_pct)
                .unwrap_or(f64::NAN)
        };
        let before = at(0.9);
        let peak = at(2.0);
        let later = at(5.9);
        assert!(
            (before - 40.0).abs() < 0.5,
            "empty room at supply humidity: {before}"
        );
        // 4 people x 50 g/h into 30 m3 at 1 ach, buffered 2x: +~9 g/m3 in the hour, ~+20 %RH
        // (less the warming), a clearly visible but not absurd rise.
        assert!(
            peak - before > 8.0 && peak - before < 30.0,
            "{before} -> {peak}"
        );
        assert!(
            later < before + 0.3 * (peak - before),
            "decays: {peak} -> {later}"
        );
        for s in &steps {
            assert!((0.0..=MAX_HUMIDITY_PCT).contains(&s.true_humidity_pct));
            for r in s
                .readings
                .iter()
                .filter(|r| r.sensor == SensorKind::Humidity)
            {
                assert!((0.0..=100.0).contains(&r.value));
            }
        }
        // A crowded, unventilated room saturates at the cap, not beyond.
        let stuffy = SimConfig {
            volume_m3: 10.0,
            air_changes_per_hour: 0.2,
            moisture_buffer: 1.0,
            schedule: vec![Meeting {
                start_h: 0.0,
                end_h: 24.0,
                people: 10,
            }],
            ..SimConfig::default()
        }
        .run();
        let top = stuffy
            .iter()
            .map(|s| s.true_humidity_pct)
            .fold(0.0, f64::max);
        assert!((top - MAX_HUMIDITY_PCT).abs() < 1e-9, "{top}");
    }

    #[test]
    fn saturation_vapour_density_table() {
        // Reference values (g/m3) from psychrometric tables.
        for (t, want) in [(0.0, 4.85), (20.0, 17.3), (21.0, 18.3), (30.0, 30.4)] {
            let got = saturation_vapour_density(t);
            assert!((got - want).abs() / want < 0.02, "{t} °C: {got} vs {want}");
        }
    }

    #[test]
    fn door_opens_and_closes_when_people_come_and_go() {
        let cfg = SimConfig {
            door_sensor: true,
            ..SimConfig::default()
        };
        let steps = cfg.run();
        let mut changes = 0;
        for w in steps.windows(2) {
            let doors: Vec<&Reading> = w[1]
                .readings
                .iter()
                .filter(|r| r.sensor == SensorKind::Door)
                .collect();
            if w[0].people != w[1].people {
                changes += 1;
                assert_eq!(doors.len(), 2, "open and close at {}", w[1].time_ms);
                assert_eq!((doors[0].value, doors[1].value), (1.0, 0.0));
                assert!(doors[0].time_ms < doors[1].time_ms);
                assert!(doors[1].time_ms < w[1].time_ms + 30_000);
            } else {
                assert!(doors.is_empty(), "door moved with nobody coming or going");
            }
        }
        // The default schedule: 5 meetings, each an arrival and a departure.
        assert_eq!(changes, 10);
        let without = SimConfig::default().run();
        assert!(
            without
                .iter()
                .flat_map(|s| s.readings.iter())
                .all(|r| r.sensor != SensorKind::Door)
        );
    }

    #[test]
    fn people_counter_counts_the_people() {
        let cfg = SimConfig {
            people_counter: true,
            ..SimConfig::default()
        };
        let steps = cfg.run();
        let mut off = 0;
        for s in &steps {
            let counts: Vec<f64> = s
                .readings
                .iter()
                .filter(|r| r.sensor == SensorKind::PeopleCount)
                .map(|r| r.value)
                .collect();
            assert_eq!(counts.len(), 1);
            let error = (counts[0] - f64::from(s.people)).abs();
            assert!(error <= 1.0);
            if s.people == 0 {
                assert_eq!(counts[0], 0.0, "an empty room counts zero");
            }
            off += usize::from(error > 0.0);
        }
        let occupied = steps.iter().filter(|s| s.people > 0).count();
        assert!(
            off > 0 && off < occupied / 10,
            "{off} of {occupied} off by one"
        );
    }

    #[test]
    fn co2_stays_in_office_ranges() {
        // (volume, air changes, people): small well-ventilated room to a stuffy one.
        for (volume, ach, people, lo, hi) in [
            (12.0, 4.0, 1, 700.0, 900.0),
            (30.0, 3.0, 4, 1100.0, 1300.0),
            (140.0, 3.0, 16, 1050.0, 1200.0),
            (30.0, 0.6, 4, 2000.0, 3000.0),
        ] {
            let cfg = SimConfig {
                volume_m3: volume,
                air_changes_per_hour: ach,
                schedule: vec![Meeting {
                    start_h: 1.0,
                    end_h: 2.0,
                    people,
                }],
                duration_h: 8.0,
                ..SimConfig::default()
            };
            let steps = cfg.run();
            let peak = steps.iter().map(|s| s.true_co2_ppm).fold(0.0, f64::max);
            assert!(
                (lo..hi).contains(&peak),
                "{volume} m3, {ach}/h, {people}: {peak}"
            );
            let last = steps.last().map_or(0.0, |s| s.true_co2_ppm);
            assert!(last < 500.0, "back near outdoor air: {last}");
            for s in &steps {
                for r in s.readings.iter().filter(|r| r.sensor == SensorKind::Co2) {
                    assert!((380.0..3100.0).contains(&r.value), "{}", r.value);
                }
            }
        }
    }

    #[test]
    fn bright_rooms_switch_lamps_on_only_in_the_dark() {
        let cfg = SimConfig {
            daylight_lux: 600.0,
            lamps_below_lux: Some(250.0),
            schedule: vec![Meeting {
                start_h: 0.0,
                end_h: 24.0,
                people: 2,
            }],
            ..SimConfig::default()
        };
        let lux_at = |h: f64| {
            cfg.run()
                .iter()
                .find(|s| s.time_ms >= cfg.start_ms + (h * 3_600_000.0) as i64)
                .and_then(|s| s.readings.iter().find(|r| r.sensor == SensorKind::Light))
                .map_or(f64::NAN, |r| r.value)
        };
        // Noon: daylight only (600 lux), no lamps on top.
        assert!((lux_at(12.0) - 600.0).abs() < 20.0, "{}", lux_at(12.0));
        // Night: the lamps.
        assert!((lux_at(2.0) - 400.0).abs() < 20.0, "{}", lux_at(2.0));
        // Dusk, daylight under 250 lux: daylight plus lamps.
        assert!(lux_at(17.0) > 450.0, "{}", lux_at(17.0));
    }

    #[test]
    fn schedule_repeats_when_asked() {
        let cfg = SimConfig {
            repeat_every_h: Some(24.0),
            ..SimConfig::default()
        };
        for h in [0.0, 8.5, 11.0, 13.5, 18.2, 23.9] {
            assert_eq!(cfg.people_at(h), cfg.people_at(h + 24.0));
            assert_eq!(cfg.people_at(h), cfg.people_at(h + 72.0));
        }
        assert_eq!(SimConfig::default().people_at(8.5 + 24.0), 0);
        assert_eq!(cfg.people_at(8.5 + 24.0), 3);
    }

    fn plan(seed: u64, capacity: u32, busyness: f64) -> DayPlan {
        DayPlan {
            seed,
            capacity,
            busyness,
            ..DayPlan::default()
        }
    }

    #[test]
    fn day_plans_are_deterministic_and_plausible() {
        assert_eq!(plan(9, 8, 0.5).meetings(), plan(9, 8, 0.5).meetings());
        assert_ne!(plan(9, 8, 0.5).meetings(), plan(10, 8, 0.5).meetings());
        for seed in 0..200 {
            for capacity in [1, 2, 4, 8, 16] {
                let p = DayPlan {
                    first_start_min: (0.5, 3.0),
                    ..plan(seed, capacity, 0.6)
                };
                let day = p.meetings();
                assert!(!day.is_empty());
                let first = day[0].start_h * 60.0;
                assert!((0.5..=3.0).contains(&first), "first meeting at {first} min");
                for m in &day {
                    assert!((1..=capacity).contains(&m.people), "{m:?}");
                    let len = (m.end_h - m.start_h) * 60.0;
                    assert!((15.0 - 1e-9..=120.0 + 1e-9).contains(&len), "{len} min");
                    assert!(m.start_h < p.working_h && m.end_h <= p.day_h);
                }
                for w in day.windows(2) {
                    let gap = (w[1].start_h - w[0].end_h) * 60.0;
                    assert!(gap >= 5.0 - 1e-9, "gap of {gap} min");
                }
            }
        }
    }

    #[test]
    fn busier_rooms_are_used_more() {
        let used = |busyness: f64| -> f64 {
            (0..100)
                .map(|seed| {
                    plan(seed, 6, busyness)
                        .meetings()
                        .iter()
                        .map(|m| m.end_h - m.start_h)
                        .sum::<f64>()
                })
                .sum::<f64>()
                / 100.0
        };
        let (quiet, busy) = (used(0.25), used(0.75));
        // Out of a 10-hour working day.
        assert!(quiet > 1.5 && quiet < 4.5, "quiet room: {quiet} h");
        assert!(busy > 6.0 && busy < 10.0, "busy room: {busy} h");
        // Groups fill part of a room: the mean is well under the seats, a full room happens.
        let people: Vec<u32> = (0..100)
            .flat_map(|seed| plan(seed, 8, 0.5).meetings())
            .map(|m| m.people)
            .collect();
        let mean = people.iter().map(|p| f64::from(*p)).sum::<f64>() / people.len() as f64;
        assert!(mean > 2.0 && mean < 5.0, "mean group {mean}");
        assert!(people.contains(&8) && people.contains(&1));
    }
}
