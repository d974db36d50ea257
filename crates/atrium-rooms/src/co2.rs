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
    /// the decay be used to learn the air-change rate.
    pub(crate) fn update(&mut self, t_ms: i64, c: f64, free: bool) {
        if self
            .last_ms
            .is_some_and(|last| t_ms.saturating_sub(last) > DECAY_MAX_GAP_MS)
        {
            // After a long silence the old points say nothing about the present slope.
            self.len = 0;
            self.end_decay();
        }
        self.values[self.head] = c;
        self.times[self.head] = t_ms;
        self.head = (self.head + 1) % RING;
        self.len = (self.len + 1).min(RING);
        self.last_ms = Some(t_ms);
        self.last_value = c;
        self.refit(t_ms);
        self.track_baseline(t_ms);
        self.learn_decay(t_ms, c, free);
    }

    fn refit(&mut self, now: i64) {
        let (mut n, mut sx, mut sy, mut sxx, mut sxy) = (0.0, 0.0, 0.0, 0.0, 0.0);
        let mut span_ms = 0;
        for k in 0..self.len {
            let i = (self.head + RING - 1 - k) % RING;
            let age = now.saturating_sub(self.times[i]);
            if age > WINDOW_MS {
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
                self.slope_ppm_h = Some(slope);
                self.level = intercept;
                return;
            }
        }
        self.slope_ppm_h = None;
        self.level = self.last_value;
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
    pub(crate) fn baseline(&self) -> f64 {
        self.baseline
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
                t.update(ms, c, true);
                ms += period_s * 1000;
            }
            t.update(ms, 2000.0, false);
            let got = t.learnt_lambda().expect("learnt");
            assert!((got - lambda).abs() / lambda < 0.05, "{lambda}: {got}");
        }
    }

    #[test]
    fn slope_of_linear_rise() {
        let mut t = Co2Tracker::new(420.0, 1.0, None);
        for k in 0..20 {
            t.update(k * 60_000, 500.0 + 2.0 * k as f64, false);
        }
        let s = t.slope(19 * 60_000).expect("slope");
        assert!((s - 120.0).abs() < 1e-6, "{s}");
        assert!(t.slope(19 * 60_000 + STALE_MS + 1).is_none());
    }

    #[test]
    fn baseline_follows_low_readings_and_creeps_up() {
        let mut t = Co2Tracker::new(420.0, 1.0, None);
        for k in 0..10 {
            t.update(k * 60_000, 360.0, true);
        }
        assert!((t.baseline() - 360.0).abs() < 1.0);
        for k in 10..70 {
            t.update(k * 60_000, 900.0, false);
        }
        assert!(t.baseline() < 365.0);
    }
}
