//! The per-room engine: readings in, room state and events out.

use serde::{Deserialize, Serialize};

use crate::calibration::{Calibration, Features};
use crate::co2::Co2Tracker;
use crate::config::{Level, RoomConfig};
use crate::physics::{PPM_M3_PER_H_PER_PERSON, concentration_after, hours_to_threshold};
use crate::reading::{MAX_CHANNELS, Reading, RejectReason, SensorKind, check_value};

/// A reading older than this no longer describes the room.
const STALE_MS: i64 = 15 * 60_000;
/// Evidence is counted per minute of time, whatever the sensors' reporting rate, so a chatty
/// sensor does not outvote a quiet one.
const EVIDENCE_PERIOD_MS: f64 = 60_000.0;
/// Bound on the filter's certainty (log-odds): keeps it ready to change its mind within one
/// or two minutes of contrary evidence.
const MAX_LOGIT: f64 = 4.5;
/// Below this probability the room is empty enough to learn its ventilation from the decay.
const DECAY_LEARN_BELOW: f64 = 0.2;
/// Log-odds of the room going dark at once (lights switched off: people leaving) and of a
/// dark room lighting up (lights switched on: people arriving).
const DARK_EDGE_LLR: f64 = -3.0;
const LIT_EDGE_LLR: f64 = 2.0;
/// Per-minute log-odds of a room that went dark within the PIR hold time and stayed dark:
/// the lights were switched off by someone leaving, which outweighs their last motion.
const RECENTLY_DARK_LLR: f64 = -2.5;
/// Time constant of the people-estimate smoothing.
const PEOPLE_SMOOTH_MS: f64 = 5.0 * 60_000.0;

/// Something worth telling people about, at the time of the reading that caused it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Event {
    /// The room became occupied.
    Arrival {
        /// Unix ms.
        time_ms: i64,
        /// Occupancy probability at that moment.
        probability: f64,
    },
    /// The room became free.
    Departure {
        /// Unix ms.
        time_ms: i64,
        /// Occupancy probability at that moment.
        probability: f64,
    },
    /// CO2 crossed into the ventilate level, or will soon.
    Ventilate {
        /// Unix ms.
        time_ms: i64,
        /// Current CO2, ppm.
        co2_ppm: f64,
        /// Current level.
        level: Level,
        /// Minutes until the next limit, if rising towards it.
        minutes_to_threshold: Option<f64>,
    },
    /// CO2 is back at the good level after a Ventilate.
    Ventilated {
        /// Unix ms.
        time_ms: i64,
        /// Current CO2, ppm.
        co2_ppm: f64,
    },
}

/// Events caused by one reading, stored inline so ingesting never allocates.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Events {
    items: [Option<Event>; 4],
    len: usize,
}

impl Events {
    fn push(&mut self, e: Event) {
        if let Some(slot) = self.items.get_mut(self.len) {
            *slot = Some(e);
            self.len += 1;
        }
    }

    /// Number of events.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the reading changed nothing worth an event.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The events in the order they happened.
    pub fn iter(&self) -> impl Iterator<Item = &Event> {
        self.items[..self.len].iter().flatten()
    }
}

/// What became of one reading.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// Taken in; these events resulted.
    Accepted(Events),
    /// Not taken in, for this reason (the caller counts these).
    Rejected(RejectReason),
}

impl Outcome {
    /// The events, or none if rejected.
    pub fn events(&self) -> Events {
        match self {
            Outcome::Accepted(e) => *e,
            Outcome::Rejected(_) => Events::default(),
        }
    }
}

/// The room as the engine sees it after the latest reading.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoomState {
    /// Occupied or free (with hysteresis on the probability).
    pub occupied: bool,
    /// Filtered probability that somebody is in the room.
    pub occupancy_probability: f64,
    /// Estimated number of people.
    pub people_estimate: f64,
    /// The estimate as a whole number of people.
    pub people_count: u32,
    /// Smoothed CO2, ppm, if a CO2 sensor reports.
    pub co2_ppm: Option<f64>,
    /// CO2 traffic light (good when there is no CO2 sensor).
    pub co2_level: Level,
    /// Minutes until CO2 reaches the next limit, if it is heading there.
    pub minutes_to_next_threshold: Option<f64>,
    /// Air changes per hour, once learnt from decays (or calibration).
    pub air_changes_per_hour: Option<f64>,
    /// Time of the latest reading taken in, unix ms.
    pub updated_ms: i64,
}

impl RoomState {
    /// Text of the CO2 level for displays.
    pub fn co2_label(&self) -> &'static str {
        self.co2_level.label()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct Slot {
    value: f64,
    ms: i64,
    set: bool,
}

impl Slot {
    fn fresh(&self, now: i64) -> Option<f64> {
        (self.set && now.saturating_sub(self.ms) <= STALE_MS).then_some(self.value)
    }
}

/// Occupancy and ventilation of one room, updated reading by reading in O(1) without allocating.
#[derive(Debug, Clone)]
pub struct RoomEngine {
    config: RoomConfig,
    model: Calibration,
    co2: Co2Tracker,
    light: [Slot; MAX_CHANNELS],
    sound: [Slot; MAX_CHANNELS],
    sound_base: [f64; MAX_CHANNELS],
    count: Slot,
    pir_seen_ms: Option<i64>,
    last_motion_ms: Option<i64>,
    last_seen: [[Option<i64>; MAX_CHANNELS]; SensorKind::ALL.len()],
    now_ms: Option<i64>,
    first_step: bool,
    step_impulse: bool,
    step_edge_llr: f64,
    dark_since_ms: Option<i64>,
    base_logit: f64,
    base_ms: i64,
    logit: f64,
    label_hint: Option<bool>,
    people_smooth: Option<f64>,
    people_ms: i64,
    ventilate_active: bool,
    /// Numbers the occupied spells (counts arrivals).
    spell: u64,
    state: RoomState,
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn logit(p: f64) -> f64 {
    let p = p.clamp(1e-9, 1.0 - 1e-9);
    (p / (1.0 - p)).ln()
}

impl RoomEngine {
    /// A fresh engine for one room; nonsensical configuration values fall back to defaults.
    pub fn new(config: RoomConfig) -> Self {
        let config = config.sanitized();
        let model = config.calibration.clone().unwrap_or_default();
        let baseline = model.baseline_co2_ppm.unwrap_or(config.outdoor_co2_ppm);
        let co2 = Co2Tracker::new(
            baseline,
            config.default_air_changes_per_hour,
            model
                .air_changes_per_hour
                .filter(|l| l.is_finite() && *l > 0.0),
        );
        let prior = logit(
            model.mean_occupied_h.max(1e-3)
                / (model.mean_occupied_h.max(1e-3) + model.mean_free_h.max(1e-3)),
        );
        let state = RoomState {
            occupied: false,
            occupancy_probability: sigmoid(prior),
            people_estimate: 0.0,
            people_count: 0,
            co2_ppm: None,
            co2_level: Level::Good,
            minutes_to_next_threshold: None,
            air_changes_per_hour: co2.learnt_lambda(),
            updated_ms: 0,
        };
        Self {
            config,
            model,
            co2,
            light: [Slot::default(); MAX_CHANNELS],
            sound: [Slot::default(); MAX_CHANNELS],
            sound_base: [0.0; MAX_CHANNELS],
            count: Slot::default(),
            pir_seen_ms: None,
            last_motion_ms: None,
            last_seen: [[None; MAX_CHANNELS]; SensorKind::ALL.len()],
            now_ms: None,
            first_step: true,
            step_impulse: false,
            step_edge_llr: 0.0,
            dark_since_ms: None,
            base_logit: prior,
            base_ms: 0,
            logit: prior,
            label_hint: None,
            people_smooth: None,
            people_ms: 0,
            ventilate_active: false,
            spell: 0,
            state,
        }
    }

    /// The configuration in use (after sanitizing).
    pub fn config(&self) -> &RoomConfig {
        &self.config
    }

    /// The room after the latest accepted reading.
    pub fn state(&self) -> &RoomState {
        &self.state
    }

    /// CO2 expected `minutes` after the latest reading: the mass balance with the present
    /// generation and ventilation held constant, its trend weighted by how far this room's
    /// trends have been seen to follow through. `None` without a fresh CO2 trend. This is the
    /// forecast behind [`RoomState::minutes_to_next_threshold`].
    pub fn co2_forecast_ppm(&self, minutes: f64) -> Option<f64> {
        let t = self.now_ms?;
        let c = self.co2.level(t)?;
        let heading = self.co2.heading(t)?;
        let hours = minutes.max(0.0) / 60.0;
        Some(concentration_after(c, heading, self.co2.lambda(), hours))
    }

    /// Share of a CO2 trend this room has been seen to follow through on within 15 minutes,
    /// in [0, 1]; starts at 1 (physics alone) and is learnt from the engine's own forecasts.
    pub fn co2_follow_through(&self) -> f64 {
        self.co2.follow_through()
    }

    /// Air changes per hour learnt so far (calibration or observed decays).
    pub fn learnt_air_changes_per_hour(&self) -> Option<f64> {
        self.co2.learnt_lambda()
    }

    /// Takes in a reading from the room's first (or only) sensor of its kind.
    pub fn ingest(&mut self, reading: &Reading) -> Outcome {
        self.ingest_channel(0, reading)
    }

    /// Takes in a reading from sensor `channel` of its kind (rooms with several light sensors,
    /// PIRs, microphones).
    pub fn ingest_channel(&mut self, channel: u8, reading: &Reading) -> Outcome {
        if let Err(reason) = self.validate(channel, reading) {
            return Outcome::Rejected(reason);
        }
        self.begin_step(reading.time_ms);
        let impulse = self.store(usize::from(channel), reading);
        Outcome::Accepted(self.step(reading.time_ms, impulse))
    }

    fn validate(&self, channel: u8, r: &Reading) -> Result<(), RejectReason> {
        let ch = usize::from(channel);
        if ch >= MAX_CHANNELS {
            return Err(RejectReason::UnknownChannel);
        }
        check_value(r.sensor, r.value)?;
        if self.now_ms.is_some_and(|now| r.time_ms < now) {
            return Err(RejectReason::OutOfOrder);
        }
        if self.last_seen[r.sensor.index()][ch] == Some(r.time_ms) {
            return Err(RejectReason::Duplicate);
        }
        Ok(())
    }

    /// Stores a valid reading; true if it is news that deserves full weight at once (the
    /// first motion after a quiet spell), rather than a level that is counted per minute.
    fn store(&mut self, ch: usize, r: &Reading) -> bool {
        let t = r.time_ms;
        self.last_seen[r.sensor.index()][ch] = Some(t);

        let slot = Slot {
            value: r.value,
            ms: t,
            set: true,
        };
        let mut impulse = false;
        match r.sensor {
            SensorKind::Co2 => {
                let free = self.label_hint.unwrap_or(
                    self.state.occupancy_probability < DECAY_LEARN_BELOW && !self.state.occupied,
                );
                let spell = self.state.occupied.then_some(self.spell);
                self.co2.update(t, r.value, free, spell);
            }
            SensorKind::Light => {
                let before = self.any_lit(t);
                self.light[ch] = slot;
                let after = self.any_lit(t);
                if before != after {
                    self.step_edge_llr = if after { LIT_EDGE_LLR } else { DARK_EDGE_LLR };
                    self.dark_since_ms = (!after).then_some(t);
                }
            }
            SensorKind::Sound => {
                let b = &mut self.sound_base[ch];
                // Quiet level: follows drops quickly and rises very slowly, so talk does not
                // become the new normal.
                if *b <= 0.0 {
                    *b = r.value.max(1e-3);
                } else if r.value < *b {
                    *b += 0.2 * (r.value - *b);
                } else {
                    *b += 0.002 * (r.value - *b);
                }
                *b = b.max(1e-3);
                self.sound[ch] = slot;
            }
            SensorKind::Motion => {
                self.pir_seen_ms.get_or_insert(t);
                if r.value >= 0.5 {
                    impulse = self
                        .last_motion_ms
                        .is_none_or(|m| t.saturating_sub(m) as f64 >= EVIDENCE_PERIOD_MS);
                    self.last_motion_ms = Some(t);
                }
            }
            SensorKind::PeopleCount => {
                self.count = Slot {
                    value: r.value.round(),
                    ..slot
                }
            }
            SensorKind::Temperature | SensorKind::Humidity | SensorKind::Door => {}
        }
        impulse
    }

    fn any_lit(&self, now: i64) -> bool {
        (0..MAX_CHANNELS).any(|c| {
            matches!(
                (self.light[c].fresh(now), self.model.light_threshold_lux[c]),
                (Some(v), Some(thr)) if v > thr
            )
        })
    }

    /// The filter's observations at the current time.
    pub(crate) fn features(&self) -> Features {
        let Some(now) = self.now_ms else {
            return Features::default();
        };
        let hold_ms = self.config.pir_hold_s * 1000.0;
        let pir_since_s = self.pir_seen_ms.map(|seen| match self.last_motion_ms {
            Some(m) => now.saturating_sub(m) as f64 / 1000.0,
            // A PIR that has never fired: as good as long ago.
            None => (now.saturating_sub(seen) as f64 + 12.0 * hold_ms) / 1000.0,
        });
        let mut sound_ratio: Option<f64> = None;
        for c in 0..MAX_CHANNELS {
            if let Some(v) = self.sound[c].fresh(now) {
                let b = self.sound_base[c];
                // Values above 20 are decibels, below are sensor volts.
                let r = if b > 20.0 {
                    10f64.powf((v - b) / 20.0)
                } else {
                    v / b
                };
                sound_ratio = Some(sound_ratio.map_or(r, |s| s.max(r)));
            }
        }
        Features {
            light: std::array::from_fn(|c| self.light[c].fresh(now)),
            pir_since_s,
            co2_people: self
                .co2
                .generation(now)
                .map(|g| g * self.config.volume_m3 / PPM_M3_PER_H_PER_PERSON),
            sound_ratio,
            count: self.count.fresh(now),
        }
    }

    pub(crate) fn now_ms(&self) -> Option<i64> {
        self.now_ms
    }

    /// Lets calibration use the labels (not the filter) to decide when decays can be learnt.
    pub(crate) fn set_label_hint(&mut self, free: Option<bool>) {
        self.label_hint = free;
    }

    fn predict(&self, l: f64, dt_ms: i64) -> f64 {
        let dt_h = dt_ms.max(0) as f64 / 3_600_000.0;
        let leave = 1.0 - (-dt_h / self.model.mean_occupied_h.max(1e-3)).exp();
        let come = 1.0 - (-dt_h / self.model.mean_free_h.max(1e-3)).exp();
        let p = sigmoid(l);
        logit(p * (1.0 - leave) + (1.0 - p) * come)
    }

    /// Opens the filter step for time `t`. Readings sharing a timestamp form one step: each
    /// recomputes it from the same base, so the order of sensors within a row does not matter.
    fn begin_step(&mut self, t: i64) {
        match self.now_ms {
            Some(now) if t > now => {
                self.base_logit = self.logit;
                self.base_ms = now;
                self.first_step = false;
                self.step_impulse = false;
                self.step_edge_llr = 0.0;
            }
            Some(_) => {}
            None => self.base_ms = t,
        }
        self.now_ms = Some(t);
    }

    fn step(&mut self, t: i64, impulse: bool) -> Events {
        let dt = t.saturating_sub(self.base_ms);
        self.step_impulse |= impulse;
        let weight = if self.first_step || self.step_impulse {
            1.0
        } else {
            (dt as f64 / EVIDENCE_PERIOD_MS).min(1.0)
        };
        let f = self.features();
        let mut llr = self.model.llr(&f, self.config.pir_hold_s);
        let hold_ms = self.config.pir_hold_s * 1000.0;
        if self
            .dark_since_ms
            .is_some_and(|d| (t.saturating_sub(d) as f64) < hold_ms && !self.any_lit(t))
        {
            llr += RECENTLY_DARK_LLR;
        }
        let predicted = self.predict(self.base_logit, dt);
        let l = (predicted + weight * llr).clamp(-MAX_LOGIT, MAX_LOGIT);
        // The lights going out is news about this very moment: it acts after the bound, so
        // a room that was certainly occupied is at once only probably occupied.
        let l = (l + self.step_edge_llr).clamp(-MAX_LOGIT, MAX_LOGIT);
        self.logit = if l.is_finite() {
            l
        } else {
            predicted.clamp(-MAX_LOGIT, MAX_LOGIT)
        };
        self.update_state(t, &f)
    }

    fn update_state(&mut self, t: i64, f: &Features) -> Events {
        let mut events = Events::default();
        let p = sigmoid(self.logit);
        let h = self.config.occupancy_hysteresis;
        let was = self.state.occupied;
        let occupied = if was { p > 0.5 - h } else { p >= 0.5 + h };
        if occupied != was {
            if occupied {
                self.spell = self.spell.wrapping_add(1);
            }
            events.push(if occupied {
                Event::Arrival {
                    time_ms: t,
                    probability: p,
                }
            } else {
                Event::Departure {
                    time_ms: t,
                    probability: p,
                }
            });
        }

        // People.
        if let Some(n) = f.co2_people {
            let n = n.max(0.0);
            let a = match self.people_smooth {
                None => 1.0,
                Some(_) => {
                    1.0 - (-(t.saturating_sub(self.people_ms) as f64) / PEOPLE_SMOOTH_MS).exp()
                }
            };
            let prev = self.people_smooth.unwrap_or(n);
            self.people_smooth = Some(prev + a * (n - prev));
            self.people_ms = t;
        }
        let cap = f64::from(self.config.capacity) * 2.0;
        let (estimate, count) = if let Some(c) = f.count {
            (c, c)
        } else if !occupied {
            (0.0, 0.0)
        } else if let Some(n) = self
            .model
            .light_pattern(f)
            .and_then(|(p, k)| self.model.people_for(p, k))
        {
            (f64::from(n).max(1.0), f64::from(n).max(1.0))
        } else {
            let n = self.people_smooth.unwrap_or(1.0).clamp(1.0, cap);
            (n, n.round())
        };

        // CO2 level with hysteresis, and the time to the next limit.
        let outdoor = self.config.outdoor_co2_ppm;
        let profile = self.config.threshold_profile;
        let co2 = self.co2.level(t);
        let mut level = self.state.co2_level;
        let mut minutes = None;
        if let Some(c) = co2 {
            let raw = profile.level(c, outdoor);
            if raw > level {
                level = raw;
            } else if raw < level {
                level = profile.level(c + self.config.level_hysteresis_ppm, outdoor);
            }
            let (vent, unacc) = profile.limits(outdoor);
            let next = if c < vent {
                Some(vent)
            } else if c < unacc {
                Some(unacc)
            } else {
                None
            };
            if let (Some(limit), Some(heading)) = (next, self.co2.heading(t)) {
                minutes =
                    hours_to_threshold(c, heading, limit, self.co2.lambda()).map(|h| h * 60.0);
            }
            let soon = minutes.is_some_and(|m| m <= self.config.ventilate_warning_min) && occupied;
            if !self.ventilate_active && (level > Level::Good || soon) {
                self.ventilate_active = true;
                events.push(Event::Ventilate {
                    time_ms: t,
                    co2_ppm: c,
                    level,
                    minutes_to_threshold: minutes,
                });
            } else if self.ventilate_active && level == Level::Good && !soon {
                let falling = self.co2.slope(t).is_some_and(|s| s < 0.0);
                if falling || c + 2.0 * self.config.level_hysteresis_ppm < vent {
                    self.ventilate_active = false;
                    events.push(Event::Ventilated {
                        time_ms: t,
                        co2_ppm: c,
                    });
                }
            }
        }

        self.state = RoomState {
            occupied,
            occupancy_probability: p,
            people_estimate: estimate,
            people_count: count.max(0.0) as u32,
            co2_ppm: co2,
            co2_level: level,
            minutes_to_next_threshold: minutes,
            air_changes_per_hour: self.co2.learnt_lambda(),
            updated_ms: t,
        };
        events
    }
}

#[cfg(test)]
mod sim_tests {
    use super::*;
    use crate::sim::{Meeting, SimConfig, SimStep};

    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_unstable_by(f64::total_cmp);
        if v.is_empty() {
            f64::NAN
        } else {
            v[v.len() / 2]
        }
    }

    fn run(cfg: &SimConfig, room: RoomConfig) -> (Vec<SimStep>, Vec<(i64, RoomState)>, Vec<Event>) {
        let steps = cfg.run();
        let mut e = RoomEngine::new(room);
        let mut states = Vec::new();
        let mut events = Vec::new();
        for s in &steps {
            for r in &s.readings {
                if let Outcome::Accepted(ev) = e.ingest(r) {
                    events.extend(ev.iter().copied());
                }
                states.push((r.time_ms, e.state().clone()));
            }
        }
        (steps, states, events)
    }

    /// Several days with meetings at varying times, so the medians mean something.
    fn week(seed: u64) -> SimConfig {
        let mut schedule = Vec::new();
        let mut rng = crate::sim::SplitMix64::new(seed);
        for day in 0..5 {
            let mut h = day as f64 * 24.0 + 8.0 + rng.uniform();
            while h < day as f64 * 24.0 + 18.0 {
                let len = 0.5 + 2.0 * rng.uniform();
                let people = 1 + (rng.uniform() * 6.0) as u32;
                schedule.push(Meeting {
                    start_h: h,
                    end_h: h + len,
                    people,
                });
                h += len + 0.5 + 1.5 * rng.uniform();
            }
        }
        SimConfig {
            seed,
            duration_h: 5.0 * 24.0,
            schedule,
            ..SimConfig::default()
        }
    }

    fn room(cfg: &SimConfig) -> RoomConfig {
        RoomConfig {
            volume_m3: cfg.volume_m3,
            ..RoomConfig::default()
        }
    }

    #[test]
    fn arrival_and_departure_latency() {
        let mut arrivals = Vec::new();
        let mut departures = Vec::new();
        for seed in 1..=3 {
            let cfg = week(seed);
            let (steps, _, events) = run(&cfg, room(&cfg));
            for m in &cfg.schedule {
                let start = cfg.start_ms + (m.start_h * 3_600_000.0) as i64;
                let end = cfg.start_ms + (m.end_h * 3_600_000.0) as i64;
                let first_motion = steps
                    .iter()
                    .flat_map(|s| s.readings.iter())
                    .find(|r| r.sensor == SensorKind::Motion && r.time_ms >= start)
                    .map_or(start, |r| r.time_ms);
                let arr = events.iter().find_map(|e| match e {
                    Event::Arrival { time_ms, .. }
                        if *time_ms >= start - 60_000 && *time_ms < end =>
                    {
                        Some(*time_ms)
                    }
                    _ => None,
                });
                arrivals.push(arr.map_or(f64::INFINITY, |t| (t - first_motion) as f64 / 1000.0));
                let dep = events.iter().find_map(|e| match e {
                    Event::Departure { time_ms, .. } if *time_ms >= end - 60_000 => Some(*time_ms),
                    _ => None,
                });
                departures.push(dep.map_or(f64::INFINITY, |t| (t - end) as f64 / 1000.0));
            }
        }
        let (a, d) = (median(arrivals.clone()), median(departures.clone()));
        eprintln!("median arrival latency {a:.1} s, departure latency {d:.1} s");
        assert!(a <= 30.0, "median arrival latency {a} s: {arrivals:?}");
        assert!(
            d <= 300.0 + 60.0,
            "median departure latency {d} s: {departures:?}"
        );
    }

    #[test]
    fn predicts_time_to_1000_ppm() {
        let mut errors = Vec::new();
        for seed in 1..=3 {
            let cfg = week(seed);
            let (steps, states, _) = run(&cfg, room(&cfg));
            // First time the true CO2 reaches 1000 ppm in each rise.
            let mut crossings = Vec::new();
            for w in steps.windows(2) {
                if w[0].true_co2_ppm < 1000.0 && w[1].true_co2_ppm >= 1000.0 {
                    crossings.push(w[1].time_ms);
                }
            }
            for (t, s) in &states {
                let Some(cross) = crossings.iter().find(|c| **c > *t).copied() else {
                    continue;
                };
                let ahead_min = (cross - t) as f64 / 60_000.0;
                // Only once the room has been occupied a while, up to 30 minutes ahead.
                if ahead_min > 30.0 || !s.occupied || s.co2_ppm.is_none_or(|c| c >= 1000.0) {
                    continue;
                }
                let predicted = s.minutes_to_next_threshold.unwrap_or(f64::INFINITY);
                errors.push((predicted - ahead_min).abs());
            }
        }
        assert!(errors.len() > 100, "{}", errors.len());
        let n = errors.len();
        let m = median(errors);
        eprintln!("median time-to-1000-ppm error {m:.2} min over {n} predictions");
        assert!(m < 5.0, "median time-to-threshold error {m} min");
    }

    #[test]
    fn learns_air_change_rate() {
        for (ach, volume) in [(0.8, 60.0), (2.0, 40.0), (0.5, 90.0)] {
            let cfg = SimConfig {
                air_changes_per_hour: ach,
                volume_m3: volume,
                ..week(7)
            };
            let (_, states, _) = run(&cfg, room(&cfg));
            let got = states
                .last()
                .and_then(|s| s.1.air_changes_per_hour)
                .expect("learnt");
            eprintln!("simulated {ach} air changes/h, learnt {got:.3}");
            assert!(
                (got - ach).abs() / ach < 0.25,
                "simulated {ach}, learnt {got}"
            );
        }
    }

    #[test]
    fn ventilate_events_pair_up() {
        let cfg = week(3);
        let (_, _, events) = run(&cfg, room(&cfg));
        let v = events
            .iter()
            .filter(|e| matches!(e, Event::Ventilate { .. }))
            .count();
        let ok = events
            .iter()
            .filter(|e| matches!(e, Event::Ventilated { .. }))
            .count();
        assert!(v > 0);
        assert!(v == ok || v == ok + 1, "{v} ventilate, {ok} ventilated");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(t: i64, sensor: SensorKind, value: f64) -> Reading {
        Reading::new(t, sensor, value)
    }

    #[test]
    fn rejects_with_reasons() {
        let mut e = RoomEngine::new(RoomConfig::default());
        let cases = [
            (0, r(1000, SensorKind::Co2, 500.0), None),
            (
                0,
                r(1000, SensorKind::Co2, 510.0),
                Some(RejectReason::Duplicate),
            ),
            (0, r(1000, SensorKind::Light, 10.0), None),
            (
                0,
                r(500, SensorKind::Light, 10.0),
                Some(RejectReason::OutOfOrder),
            ),
            (
                0,
                r(2000, SensorKind::Co2, f64::NAN),
                Some(RejectReason::NotFinite),
            ),
            (
                0,
                r(2000, SensorKind::Humidity, 140.0),
                Some(RejectReason::OutOfRange),
            ),
            (
                9,
                r(2000, SensorKind::Light, 10.0),
                Some(RejectReason::UnknownChannel),
            ),
            (1, r(2000, SensorKind::Light, 10.0), None),
        ];
        for (ch, reading, want) in cases {
            let got = match e.ingest_channel(ch, &reading) {
                Outcome::Accepted(_) => None,
                Outcome::Rejected(why) => Some(why),
            };
            assert_eq!(got, want, "{reading:?}");
        }
        assert_eq!(e.state().updated_ms, 2000);
    }

    #[test]
    fn motion_then_quiet_room_without_other_sensors() {
        let mut e = RoomEngine::new(RoomConfig::default());
        let mut events = Vec::new();
        for k in 0..60i64 {
            let t = k * 60_000;
            if k == 10 {
                events.extend(
                    e.ingest(&r(t, SensorKind::Motion, 1.0))
                        .events()
                        .iter()
                        .copied(),
                );
            }
            events.extend(
                e.ingest(&r(t + 1, SensorKind::Temperature, 21.0))
                    .events()
                    .iter()
                    .copied(),
            );
        }
        assert!(
            matches!(
                events.first(),
                Some(Event::Arrival {
                    time_ms: 600_000,
                    ..
                })
            ),
            "{events:?}"
        );
        assert!(
            matches!(events.get(1), Some(Event::Departure { .. })),
            "{events:?}"
        );
        assert!(!e.state().occupied);
    }

    #[test]
    fn people_counter_wins() {
        let mut e = RoomEngine::new(RoomConfig::default());
        e.ingest(&r(0, SensorKind::PeopleCount, 3.0));
        e.ingest(&r(60_000, SensorKind::PeopleCount, 3.0));
        assert!(e.state().occupied);
        assert_eq!(e.state().people_count, 3);
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn value() -> impl Strategy<Value = f64> {
        prop_oneof![
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(f64::NEG_INFINITY),
            Just(0.0),
            Just(1.0),
            Just(1e300),
            -1e6..1e6f64,
            0.0..3000.0f64,
        ]
    }

    fn step() -> impl Strategy<Value = (i64, usize, f64, u8)> {
        (
            prop_oneof![
                Just(0i64),
                -120_000..600_000i64,
                Just(86_400_000 * 30),
                Just(i64::MAX / 4)
            ],
            0..SensorKind::ALL.len(),
            value(),
            0..6u8,
        )
    }

    fn replay(steps: &[(i64, usize, f64, u8)]) -> (Vec<RoomState>, Vec<Outcome>) {
        let mut e = RoomEngine::new(RoomConfig::default());
        let mut t: i64 = 1_700_000_000_000;
        let mut states = Vec::new();
        let mut outcomes = Vec::new();
        for &(dt, kind, v, ch) in steps {
            t = t.saturating_add(dt);
            outcomes.push(e.ingest_channel(ch, &Reading::new(t, SensorKind::ALL[kind], v)));
            states.push(e.state().clone());
        }
        (states, outcomes)
    }

    proptest! {
        #[test]
        fn never_panics_and_stays_sane(steps in prop::collection::vec(step(), 0..300)) {
            let (states, _) = replay(&steps);
            for s in &states {
                prop_assert!((0.0..=1.0).contains(&s.occupancy_probability));
                prop_assert!(s.people_estimate.is_finite() && s.people_estimate >= 0.0);
                if let Some(c) = s.co2_ppm { prop_assert!(c.is_finite()); }
                if let Some(m) = s.minutes_to_next_threshold { prop_assert!(m.is_finite() && m >= 0.0); }
            }
        }

        #[test]
        fn deterministic(steps in prop::collection::vec(step(), 0..200)) {
            let (a, oa) = replay(&steps);
            let (b, ob) = replay(&steps);
            prop_assert_eq!(a, b);
            prop_assert_eq!(oa, ob);
        }

        #[test]
        fn calibration_never_panics(steps in prop::collection::vec((step(), any::<bool>()), 0..200)) {
            let samples: Vec<_> = steps.iter().enumerate().map(|(i, &((dt, kind, v, ch), occ))| {
                crate::calibration::LabelledSample {
                    readings: vec![crate::calibration::ChannelReading {
                        channel: ch,
                        reading: Reading::new(i as i64 * 60_000 + dt, SensorKind::ALL[kind], v),
                    }],
                    occupied: occ,
                    people: occ.then_some(1),
                }
            }).collect();
            let cal = Calibration::fit(&samples);
            let mut e = RoomEngine::new(RoomConfig { calibration: Some(cal), ..RoomConfig::default() });
            for s in &samples {
                for r in &s.readings { e.ingest_channel(r.channel, &r.reading); }
                prop_assert!((0.0..=1.0).contains(&e.state().occupancy_probability));
            }
        }
    }
}
