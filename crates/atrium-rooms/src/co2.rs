//! CO2 tracking: smoothed level and slope, outdoor baseline, and the air-change rate
//! learnt from decays of the empty room.

use serde::{Deserialize, Serialize};

const RING: usize = 32;
/// Slope window: long enough to average 5 ppm sensor steps, short enough to confirm a
/// departure within minutes.
const WINDOW_MS: i64 = 6 * 60_000;
/// A reading this old no longer describes the room.
const STALE_MS: i64 = 15 * 60_000;
const MS_PER_H: f64 = 3_600_000.0;
/// The baseline creeps up this fast (ppm/h) so sensor drift and outdoor changes are followed,
/// but an occupied afternoon is not mistaken for fresh air.
const BASELINE_RISE_PPM_PER_H: f64 = 2.0;
/// Excess over baseline below which a decay is drowned in sensor noise.
const DECAY_MIN_EXCESS_PPM: f64 = 60.0;
const DECAY_MIN_DURATION_MS: i64 = 15 * 60_000;
const DECAY_MAX_GAP_MS: i64 = 20 * 60_000;
const LAMBDAS: usize = 9;
/// Trend window of the forecast: long enough that minute-to-minute sensor noise and the odd
/// door opening do not pass for a trend, short enough to see a meeting's rise early (the ring
/// bounds it at fast sampling). 6, 10 and 15 minutes compared in docs/BENCHMARKS.md.
const TREND_WINDOW_MS: i64 = 10 * 60_000;
/// The horizon at which the tracker checks its own forecasts against what happened.
const CHECK_HORIZON_MS: i64 = 15 * 60_000;
/// A forecast is checked against the first reading at most this long after it fell due.
const CHECK_LATE_MS: i64 = 5 * 60_000;
/// Forecasts in flight at most. A server keeps an engine per room, so this stays small:
/// forecasts a few minutes apart overlap in what they say anyway.
const PENDING: usize = 4;
/// One forecast is filed for checking every so often, so that `PENDING` cover the horizon.
const CHECK_EVERY_MS: i64 = CHECK_HORIZON_MS / PENDING as i64;
/// Weight of the physical prior (the trend follows through in full) in ppm^2 of trend: as much
/// as five checked forecasts whose trend part was 50 ppm.
const FOLLOW_PRIOR_PPM2: f64 = 5.0 * 50.0 * 50.0;
/// Forgetting per checked forecast: the fit remembers roughly the last 500, a week or two of
/// a meeting room's occupied hours.
const FOLLOW_FORGET: f64 = 0.998;

/// A forecast waiting for its horizon: the occupied spell it was made in, the level then and
/// the trend's part of the forecast.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
struct Pending {
    due_ms: i64,
    spell: u64,
    level: f64,
    trend: f64,
}

/// How much of a CO2 trend the room follows through on while the same people stay, learnt by
/// least squares from the tracker's own forecasts: 1 where people and a steady air supply set
/// the curve (the mass balance holds), less where something bends it back (demand-controlled
/// ventilation opening its valve as CO2 rises). Only forecasts whose occupied spell lasted to
/// their horizon are checked: people leaving changes the generation, which no trend foresees
/// and which is not the ventilation's doing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct FollowThrough {
    pending: [Pending; PENDING],
    head: usize,
    len: usize,
    last_push_ms: Option<i64>,
    /// Forgetting sums of trend x trend and trend x what came of it.
    stt: f64,
    ste: f64,
}

impl Default for FollowThrough {
    fn default() -> Self {
        Self {
            pending: [Pending::default(); PENDING],
            head: 0,
            len: 0,
            last_push_ms: None,
            stt: 0.0,
            ste: 0.0,
        }
    }
}

impl FollowThrough {
    /// The share of the trend to forecast with, in [0, 1].
    fn share(&self) -> f64 {
        ((FOLLOW_PRIOR_PPM2 + self.ste) / (FOLLOW_PRIOR_PPM2 + self.stt)).clamp(0.0, 1.0)
    }

    /// Checks the forecasts that fell due against `level`, then files the present one if the
    /// room is in occupied spell `spell`.
    fn update(&mut self, t_ms: i64, level: f64, trend: Option<f64>, spell: Option<u64>) {
        while self.len > 0 {
            let p = self.pending[self.head];
            if p.due_ms > t_ms {
                break;
            }
            self.head = (self.head + 1) % PENDING;
            self.len -= 1;
            if spell == Some(p.spell) && t_ms.saturating_sub(p.due_ms) <= CHECK_LATE_MS {
                self.stt = FOLLOW_FORGET * self.stt + p.trend * p.trend;
                self.ste = FOLLOW_FORGET * self.ste + p.trend * (level - p.level);
            }
        }
        let (Some(trend), Some(spell)) = (trend, spell) else {
            return;
        };
        if self
            .last_push_ms
            .is_some_and(|l| t_ms.saturating_sub(l) < CHECK_EVERY_MS)
        {
            return;
        }
        if self.len == PENDING {
            self.head = (self.head + 1) % PENDING;
            self.len -= 1;
        }
        self.pending[(self.head + self.len) % PENDING] = Pending {
            due_ms: t_ms.saturating_add(CHECK_HORIZON_MS),
            spell,
            level,
            trend,
        };
        self.len += 1;
        self.last_push_ms = Some(t_ms);
    }

    /// Forgets the forecasts in flight (after a long silence they cannot be checked).
    fn clear(&mut self) {
        self.len = 0;
    }
}

/// Running least-squares fit of ln(C - C_out) against time over one decay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
struct DecayFit {
    active: bool,
    start_ms: i64,
    last_ms: i64,
    n: f64,
    sx: f64,
    sy: f64,
    sxx: f64,
    sxy: f64,
    syy: f64,
}

impl DecayFit {
    fn add(&mut self, t_ms: i64, y: f64) {
        if !self.active {
            *self = DecayFit {
                active: true,
                start_ms: t_ms,
                last_ms: t_ms,
                ..DecayFit::default()
            };
        }
        let x = t_ms.saturating_sub(self.start_ms) as f64 / MS_PER_H;
        self.n += 1.0;
        self.sx += x;
        self.sy += y;
        self.sxx += x * x;
        self.sxy += x * y;
        self.syy += y * y;
        self.last_ms = t_ms;
    }

    /// The decay rate if the segment was long and clean enough to trust.
    fn finish(&mut self) -> Option<f64> {
        let fit = *self;
        self.active = false;
        if !fit.active
            || fit.n < 8.0
            || fit.last_ms.saturating_sub(fit.start_ms) < DECAY_MIN_DURATION_MS
        {
            return None;
        }
        let vx = fit.sxx - fit.sx * fit.sx / fit.n;
        let vy = fit.syy - fit.sy * fit.sy / fit.n;
        let cxy = fit.sxy - fit.sx * fit.sy / fit.n;
        if vx <= 0.0 || vy <= 0.0 {
            return None;
        }
        let slope = cxy / vx;
        let r2 = cxy * cxy / (vx * vy);
        let lambda = -slope;
        // A poor fit means the room was not simply decaying (window opened half-way, someone
        // came back, sensor noise); such segments would only blur the estimate.
        (r2 >= 0.8 && lambda.is_finite() && (0.02..=20.0).contains(&lambda)).then_some(lambda)
    }
}

/// Smoothed CO2 level, slope and learnt ventilation of one room.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Co2Tracker {
    times: [i64; RING],
    values: [f64; RING],
    len: usize,
    head: usize,
    last_ms: Option<i64>,
    last_value: f64,
    level: f64,
    slope_ppm_h: Option<f64>,
    trend_ppm_h: Option<f64>,
    follow: FollowThrough,
    baseline: f64,
    baseline_ms: Option<i64>,
    decay: DecayFit,
    lambdas: [f64; LAMBDAS],
    n_lambdas: usize,
    next_lambda: usize,
    learnt_lambda: Option<f64>,
    prior_lambda: f64,
}

impl Co2Tracker {
    pub(crate) fn new(baseline_ppm: f64, prior_lambda: f64, learnt_lambda: Option<f64>) -> Self {
        let mut t = Self {
            times: [0; RING],
            values: [0.0; RING],
            len: 0,
            head: 0,
            last_ms: None,
            last_value: baseline_ppm,
            level: baseline_ppm,
            slope_ppm_h: None,
            trend_ppm_h: None,
            follow: FollowThrough::default(),
            baseline: baseline_ppm,
            baseline_ms: None,
            decay: DecayFit::default(),
            lambdas: [0.0; LAMBDAS],
            n_lambdas: 0,
            next_lambda: 0,
            learnt_lambda: None,
            prior_lambda,
        };
        if let Some(l) = learnt_lambda {
            t.push_lambda(l);
        }
        t
    }

    /// Takes one reading; `free` says whether the room is confidently empty, which lets
    /// the decay be used to learn the air-change rate; `spell` numbers the occupied spell the
    /// room is in (`None` while free), which lets forecasts be checked.
    pub(crate) fn update(&mut self, t_ms: i64, c: f64, free: bool, spell: Option<u64>) {
        if self
            .last_ms
            .is_some_and(|last| t_ms.saturating_sub(last) > DECAY_MAX_GAP_MS)
        {
            // After a long silence the old points say nothing about the present slope.
            self.len = 0;
            self.end_decay();
            self.follow.clear();
        }
        self.values[self.head] = c;
        self.times[self.head] = t_ms;
        self.head = (self.head + 1) % RING;
        self.len = (self.len + 1).min(RING);
        self.last_ms = Some(t_ms);
        self.last_value = c;
        self.refit(t_ms);
        self.trend_ppm_h = self.fit(t_ms, TREND_WINDOW_MS).map(|(slope, _)| slope);
        let trend = self.trend_part(CHECK_HORIZON_MS as f64 / MS_PER_H);
        self.follow.update(t_ms, self.level, trend, spell);
        self.track_baseline(t_ms);
        self.learn_decay(t_ms, c, free);
    }

    fn refit(&mut self, now: i64) {
        if let Some((slope, level)) = self.fit(now, WINDOW_MS) {
            self.slope_ppm_h = Some(slope);
            self.level = level;
        } else {
            self.slope_ppm_h = None;
            self.level = self.last_value;
        }
    }

    /// Least-squares slope (ppm/h) and level now of the readings of the last `window_ms`.
    fn fit(&self, now: i64, window_ms: i64) -> Option<(f64, f64)> {
        let (mut n, mut sx, mut sy, mut sxx, mut sxy) = (0.0, 0.0, 0.0, 0.0, 0.0);
        let mut span_ms = 0;
        for k in 0..self.len {
            let i = (self.head + RING - 1 - k) % RING;
            let age = now.saturating_sub(self.times[i]);
            if age > window_ms {
                break;
            }
            span_ms = age;
            let x = -(age as f64) / MS_PER_H;
            let y = self.values[i];
            n += 1.0;
            sx += x;
            sy += y;
            sxx += x * x;
            sxy += x * y;
        }
        let vx = sxx - sx * sx / n;
        // Three points spanning at least two minutes, or the slope is mostly noise.
        if n >= 3.0 && vx > 0.0 && span_ms >= 120_000 {
            let slope = (sxy - sx * sy / n) / vx;
            let intercept = sy / n - slope * sx / n;
            if slope.is_finite() && intercept.is_finite() {
                return Some((slope, intercept));
            }
        }
        None
    }

    /// The part of the forecast `hours` ahead that the trend adds to the level: the mass
    /// balance with the present generation and ventilation held constant.
    fn trend_part(&self, hours: f64) -> Option<f64> {
        let l = self.lambda();
        self.trend_ppm_h.map(|s| s / l * (1.0 - (-l * hours).exp()))
    }

    fn track_baseline(&mut self, t_ms: i64) {
        let dt_h = self
            .baseline_ms
            .map_or(0.0, |b| t_ms.saturating_sub(b) as f64 / MS_PER_H);
        self.baseline_ms = Some(t_ms);
        if self.level < self.baseline {
            self.baseline = self.level;
        } else {
            self.baseline = (self.baseline + BASELINE_RISE_PPM_PER_H * dt_h).min(self.level);
        }
    }

    fn learn_decay(&mut self, t_ms: i64, c: f64, free: bool) {
        let excess = c - self.baseline;
        let rising = self.slope_ppm_h.is_some_and(|s| s > 20.0);
        if free && excess > DECAY_MIN_EXCESS_PPM && !rising {
            self.decay.add(t_ms, excess.ln());
        } else if self.decay.active {
            self.end_decay();
        }
    }

    fn end_decay(&mut self) {
        if let Some(l) = self.decay.finish() {
            self.push_lambda(l);
        }
    }

    fn push_lambda(&mut self, l: f64) {
        self.lambdas[self.next_lambda] = l;
        self.next_lambda = (self.next_lambda + 1) % LAMBDAS;
        self.n_lambdas = (self.n_lambdas + 1).min(LAMBDAS);
        // The median of the last few decays shrugs off the odd window-open episode.
        let mut sorted = [0.0; LAMBDAS];
        sorted[..self.n_lambdas].copy_from_slice(&self.lambdas[..self.n_lambdas]);
        let s = &mut sorted[..self.n_lambdas];
        s.sort_unstable_by(f64::total_cmp);
        let m = s.len();
        self.learnt_lambda = Some(if m % 2 == 1 {
            s[m / 2]
        } else {
            0.5 * (s[m / 2 - 1] + s[m / 2])
        });
    }

    /// Air changes per hour learnt from decays, if any.
    pub(crate) fn learnt_lambda(&self) -> Option<f64> {
        self.learnt_lambda
    }

    /// Air changes per hour to compute with: learnt, else the configured prior.
    pub(crate) fn lambda(&self) -> f64 {
        self.learnt_lambda.unwrap_or(self.prior_lambda)
    }

    /// The smoothed level, if the last reading is recent.
    pub(crate) fn level(&self, now: i64) -> Option<f64> {
        self.fresh(now).then_some(self.level)
    }

    /// ppm/h, if there are enough recent points.
    pub(crate) fn slope(&self, now: i64) -> Option<f64> {
        if self.fresh(now) {
            self.slope_ppm_h
        } else {
            None
        }
    }

    fn fresh(&self, now: i64) -> bool {
        self.last_ms
            .is_some_and(|l| now.saturating_sub(l) <= STALE_MS)
    }

    /// The sensor's fresh-air level (outdoor air plus sensor offset).
    #[cfg(test)]
    pub(crate) fn baseline(&self) -> f64 {
        self.baseline
    }

    /// The level the room heads for if the present trend keeps on as far as this room's trends
    /// have been seen to (the steady state of the forecast); `None` without a fresh trend.
    pub(crate) fn heading(&self, now: i64) -> Option<f64> {
        let trend = if self.fresh(now) {
            self.trend_ppm_h
        } else {
            None
        }?;
        Some(self.level + self.follow.share() * trend / self.lambda())
    }

    /// Share of a trend this room has been seen to follow through on, in [0, 1].
    pub(crate) fn follow_through(&self) -> f64 {
        self.follow.share()
    }

    /// CO2 generation in ppm/h implied by the mass balance: dC/dt + lambda (C - C_out).
    pub(crate) fn generation(&self, now: i64) -> Option<f64> {
        let slope = self.slope(now)?;
        Some(slope + self.lambda() * (self.level - self.baseline))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::physics::concentration_after;

    #[test]
    fn learns_decay_rate_from_clean_decay() {
        // (lambda, sample period s)
        for (lambda, period_s) in [(0.5, 60), (1.5, 30), (3.0, 120)] {
            let mut t = Co2Tracker::new(420.0, 1.0, None);
            let mut ms = 0i64;
            while ms < 3 * 3_600_000 {
                let c = concentration_after(1500.0, 420.0, lambda, ms as f64 / MS_PER_H);
                t.update(ms, c, true, None);
                ms += period_s * 1000;
            }
            t.update(ms, 2000.0, false, Some(1));
            let got = t.learnt_lambda().expect("learnt");
            assert!((got - lambda).abs() / lambda < 0.05, "{lambda}: {got}");
        }
    }

    #[test]
    fn a_trend_that_follows_through_keeps_its_weight() {
        // People in a room with steady ventilation: CO2 rises towards its steady state, and
        // every forecast of the trend comes true.
        let (lambda, c_ss) = (0.8, 1600.0);
        let mut t = Co2Tracker::new(420.0, lambda, Some(lambda));
        let mut ms = 0i64;
        while ms < 3 * 3_600_000 {
            let c = concentration_after(450.0, c_ss, lambda, ms as f64 / MS_PER_H);
            t.update(ms, c, false, Some(1));
            ms += 60_000;
        }
        assert!(t.follow_through() > 0.9, "{}", t.follow_through());
        let heading = t.heading(ms - 60_000).expect("heading");
        assert!(
            (heading - c_ss).abs() < 60.0,
            "heads for {heading}, not {c_ss}"
        );
    }

    #[test]
    fn a_trend_that_turns_back_loses_its_weight() {
        // A ventilation controller opening its valve as CO2 rises and closing it as CO2 falls:
        // the level swings around 800 ppm, and each trend has turned by the time it is checked.
        let mut t = Co2Tracker::new(420.0, 1.0, Some(1.0));
        for k in 0..(2 * 24 * 60) {
            let phase = f64::from(k) / 40.0 * std::f64::consts::TAU;
            t.update(
                i64::from(k) * 60_000,
                800.0 + 120.0 * phase.sin(),
                false,
                Some(1),
            );
        }
        assert!(t.follow_through() < 0.3, "{}", t.follow_through());
    }

    #[test]
    fn people_leaving_is_not_held_against_the_trend() {
        // Meetings of 40 minutes with the room free for 40 minutes between them: each rise
        // ends because the people go, not because the trend was wrong.
        let lambda = 0.8;
        let mut t = Co2Tracker::new(420.0, lambda, Some(lambda));
        let mut c = 450.0;
        for k in 0..(3 * 24 * 60u32) {
            let meeting = (k / 40) % 2 == 0;
            let c_ss = if meeting { 1500.0 } else { 420.0 };
            c = concentration_after(c, c_ss, lambda, 1.0 / 60.0);
            let spell = meeting.then_some(u64::from(k / 80));
            t.update(i64::from(k) * 60_000, c, !meeting, spell);
        }
        // Not quite 1: a straight line through the last minutes of a rise that levels off
        // overshoots (about 0.8 here). Counting the departures would bring it to a half.
        assert!(t.follow_through() > 0.7, "{}", t.follow_through());
    }

    #[test]
    fn slope_of_linear_rise() {
        let mut t = Co2Tracker::new(420.0, 1.0, None);
        for k in 0..20 {
            t.update(k * 60_000, 500.0 + 2.0 * k as f64, false, Some(1));
        }
        let s = t.slope(19 * 60_000).expect("slope");
        assert!((s - 120.0).abs() < 1e-6, "{s}");
        assert!(t.slope(19 * 60_000 + STALE_MS + 1).is_none());
    }

    #[test]
    fn baseline_follows_low_readings_and_creeps_up() {
        let mut t = Co2Tracker::new(420.0, 1.0, None);
        for k in 0..10 {
            t.update(k * 60_000, 360.0, true, None);
        }
        assert!((t.baseline() - 360.0).abs() < 1.0);
        for k in 10..70 {
            t.update(k * 60_000, 900.0, false, Some(1));
        }
        assert!(t.baseline() < 365.0);
    }
}
