//! Per-sensor likelihoods of the occupancy filter: physical priors for a room nobody has
//! labelled, and their fit from a room's labelled history.

use serde::{Deserialize, Serialize};

use crate::config::RoomConfig;
use crate::engine::RoomEngine;
use crate::reading::{MAX_CHANNELS, Reading, SensorKind};

/// Light patterns: one bit per light channel that is lit.
pub const PATTERNS: usize = 1 << MAX_CHANNELS;
/// Bins of the time since the last PIR motion.
pub const PIR_BINS: usize = 6;
/// Bins of the people count implied by the CO2 mass balance.
pub const CO2_BINS: usize = 7;
/// Bins of the brightest light channel relative to its lit threshold.
pub const LIGHT_BINS: usize = 7;
/// Bins of sound relative to the room's quiet level.
pub const SOUND_BINS: usize = 5;

/// Upper edges of the CO2 people bins; generation below zero means a faster decay than the
/// room's ventilation explains, i.e. nobody breathing.
const CO2_EDGES: [f64; CO2_BINS - 1] = [-0.5, -0.15, 0.15, 0.4, 0.8, 1.5];
/// Upper edges of the PIR bins, as multiples of the hold time.
const PIR_EDGES: [f64; PIR_BINS - 1] = [0.2, 0.6, 1.0, 3.0, 12.0];
/// Brightness relative to the lit threshold: near the threshold daylight and lamps mix, so
/// those bins may learn to be unsure and let CO2 decide.
const LIGHT_EDGES: [f64; LIGHT_BINS - 1] = [0.5, 0.8, 1.0, 1.25, 1.6, 2.5];
const SOUND_EDGES: [f64; SOUND_BINS - 1] = [1.5, 2.5, 4.0, 8.0];
/// No single sensor may be more certain than this (log-odds), or one faulty sensor could
/// pin the room.
const MAX_LLR: f64 = 4.0;
/// A PIR firing in an empty room is rarer than any other sensor's error (false triggers
/// are about one a day), so motion may speak louder.
const MAX_PIR_LLR: f64 = 6.0;
/// Lux above which an uncalibrated channel counts as lit: office lighting, not dusk.
const PRIOR_LIGHT_LUX: f64 = 200.0;

/// What the engine observes at one instant, as the likelihood model sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Features {
    pub(crate) light: [Option<f64>; MAX_CHANNELS],
    pub(crate) pir_since_s: Option<f64>,
    pub(crate) co2_people: Option<f64>,
    pub(crate) sound_ratio: Option<f64>,
    pub(crate) count: Option<f64>,
}

/// One sensor's reading with the channel it came from (0 for rooms with one sensor per kind).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ChannelReading {
    /// Which sensor of this kind, below [`MAX_CHANNELS`].
    pub channel: u8,
    /// The reading.
    pub reading: Reading,
}

/// A moment of a room's history with what was really true then.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelledSample {
    /// Readings since the previous sample, in time order.
    pub readings: Vec<ChannelReading>,
    /// Whether anybody was in the room.
    pub occupied: bool,
    /// How many people, if known.
    pub people: Option<u32>,
}

/// Learnt parameters of one room; [`Calibration::physical_prior`] is the untrained default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// Lux above which each light channel counts as lit; `None` ignores the channel.
    pub light_threshold_lux: [Option<f64>; MAX_CHANNELS],
    /// Log-likelihood ratio (occupied vs free) of the brightest channel's level bins.
    pub light_llr: [f64; LIGHT_BINS],
    /// Log-likelihood ratio of each time-since-motion bin.
    pub pir_llr: [f64; PIR_BINS],
    /// Log-likelihood ratio of each CO2-implied people bin.
    pub co2_llr: [f64; CO2_BINS],
    /// Log-likelihood ratio of each sound bin.
    pub sound_llr: [f64; SOUND_BINS],
    /// Log-likelihood ratio of a people counter saying zero / more than zero.
    pub count_llr: [f64; 2],
    /// Mean length of an occupied spell, hours.
    pub mean_occupied_h: f64,
    /// Mean length of a free spell, hours.
    pub mean_free_h: f64,
    /// The CO2 sensor's fresh-air reading, ppm.
    pub baseline_co2_ppm: Option<f64>,
    /// Air changes per hour learnt from decays.
    pub air_changes_per_hour: Option<f64>,
    /// Most common people count for each lit pattern.
    pub people_by_pattern: [Option<u8>; PATTERNS],
    /// Most common people count by number of lit channels.
    pub people_by_lit: [Option<u8>; MAX_CHANNELS + 1],
    /// How many labelled samples this was learnt from.
    pub samples: u64,
}

impl Default for Calibration {
    fn default() -> Self {
        Self::physical_prior()
    }
}

fn bin_of(x: f64, edges: &[f64]) -> usize {
    edges.iter().take_while(|e| x >= **e).count()
}

impl Calibration {
    /// Likelihoods from physics and common sense, for a room without labelled history.
    pub fn physical_prior() -> Self {
        Self {
            light_threshold_lux: [Some(PRIOR_LIGHT_LUX); MAX_CHANNELS],
            // A dark room is hardly ever occupied; a bright one may just be lit by daylight,
            // so brightness alone is weak evidence (switching lamps on and off is strong, and
            // is counted as an edge by the engine). Calibration learns a room's own.
            light_llr: [-2.0, -1.2, -0.3, 0.2, 0.3, 0.4, 0.4],
            // Motion is near-proof of presence; its absence only slowly argues for "free"
            // because seated people do not trigger a PIR.
            pir_llr: [5.0, 1.0, -0.3, -1.8, -1.5, -1.5],
            co2_llr: [-1.5, -1.0, -0.5, 0.3, 1.0, 1.5, 2.0],
            sound_llr: [-0.2, 0.3, 0.6, 0.9, 1.2],
            // Counters drift and miss people, so "0" is strong but not absolute.
            count_llr: [-3.5, 4.0],
            mean_occupied_h: 1.0,
            mean_free_h: 4.0,
            baseline_co2_ppm: None,
            air_changes_per_hour: None,
            people_by_pattern: [None; PATTERNS],
            people_by_lit: [None; MAX_CHANNELS + 1],
            samples: 0,
        }
    }

    /// Learns from labelled history with the default room configuration.
    pub fn fit(samples: &[LabelledSample]) -> Calibration {
        Self::fit_for(&RoomConfig::default(), samples)
    }

    /// Learns from labelled history of a room with this configuration (volume and PIR hold
    /// shape the features).
    pub fn fit_for(config: &RoomConfig, samples: &[LabelledSample]) -> Calibration {
        let mut cfg = config.clone();
        cfg.calibration = None;
        let prior = Calibration::physical_prior();

        // Pass 1: ventilation and baseline, learnt with the labels gating the decay fits.
        let mut engine = RoomEngine::new(cfg.clone());
        let mut free_co2 = Vec::new();
        for s in samples {
            engine.set_label_hint(Some(!s.occupied));
            for r in &s.readings {
                engine.ingest_channel(r.channel, &r.reading);
                if !s.occupied && r.reading.sensor == SensorKind::Co2 && r.reading.value.is_finite()
                {
                    free_co2.push(r.reading.value);
                }
            }
        }
        let mut cal = prior.clone();
        cal.samples = samples.len() as u64;
        cal.air_changes_per_hour = engine.learnt_air_changes_per_hour();
        if free_co2.len() >= 20 {
            free_co2.sort_unstable_by(f64::total_cmp);
            cal.baseline_co2_ppm = Some(free_co2[free_co2.len() / 50]);
        }

        // Pass 2: the features exactly as the calibrated engine will see them.
        cfg.calibration = Some(cal.clone());
        let mut engine = RoomEngine::new(cfg.clone());
        let mut rows: Vec<(Features, bool, Option<u32>, i64)> = Vec::with_capacity(samples.len());
        for s in samples {
            for r in &s.readings {
                engine.ingest_channel(r.channel, &r.reading);
            }
            if let Some(now) = engine.now_ms() {
                rows.push((engine.features(), s.occupied, s.people, now));
            }
        }
        if rows.is_empty() {
            return cal;
        }

        cal.light_threshold_lux = fit_light_thresholds(&rows);
        let hold = cfg.sanitized().pir_hold_s;

        cal.light_llr = fit_hist(
            rows.iter().filter_map(|(f, o, _, _)| {
                cal.light_ratio(f).map(|r| (bin_of(r, &LIGHT_EDGES), *o))
            }),
            &prior.light_llr,
        );
        cal.pir_llr = fit_hist_max(
            rows.iter()
                .filter_map(|(f, o, _, _)| f.pir_since_s.map(|s| (pir_bin(s, hold), *o))),
            &prior.pir_llr,
            MAX_PIR_LLR,
        );
        cal.co2_llr = fit_hist(
            rows.iter()
                .filter_map(|(f, o, _, _)| f.co2_people.map(|n| (bin_of(n, &CO2_EDGES), *o))),
            &prior.co2_llr,
        );
        cal.sound_llr = fit_hist(
            rows.iter()
                .filter_map(|(f, o, _, _)| f.sound_ratio.map(|r| (bin_of(r, &SOUND_EDGES), *o))),
            &prior.sound_llr,
        );

        // People: the most common count per lit pattern, where the history says so.
        let mut by_pattern = [[0u32; 256]; PATTERNS];
        let mut by_lit = [[0u32; 256]; MAX_CHANNELS + 1];
        for (f, o, people, _) in &rows {
            if let (true, Some(n), Some((p, k))) = (*o, *people, cal.light_pattern(f)) {
                let n = n.min(255) as usize;
                by_pattern[p][n] += 1;
                by_lit[k][n] += 1;
            }
        }
        cal.people_by_pattern = std::array::from_fn(|p| mode(&by_pattern[p], 3));
        cal.people_by_lit = std::array::from_fn(|k| mode(&by_lit[k], 3));

        // Spell lengths set how readily the filter believes a change.
        let (mut occ_ms, mut free_ms, mut arrivals, mut departures) = (0i64, 0i64, 0u32, 0u32);
        for w in rows.windows(2) {
            let dt = w[1].3.saturating_sub(w[0].3).clamp(0, 3_600_000);
            if w[0].1 {
                occ_ms += dt
            } else {
                free_ms += dt
            }
            match (w[0].1, w[1].1) {
                (false, true) => arrivals += 1,
                (true, false) => departures += 1,
                _ => {}
            }
        }
        let h = |ms: i64| ms as f64 / 3_600_000.0;
        cal.mean_occupied_h =
            (h(occ_ms) + 2.0 * prior.mean_occupied_h) / (f64::from(departures) + 2.0);
        cal.mean_free_h = (h(free_ms) + 2.0 * prior.mean_free_h) / (f64::from(arrivals) + 2.0);
        cal
    }

    /// The lit pattern and number of lit channels, if any light channel is fresh.
    pub(crate) fn light_pattern(&self, f: &Features) -> Option<(usize, usize)> {
        let mut any = false;
        let mut pattern = 0usize;
        for c in 0..MAX_CHANNELS {
            if let (Some(v), Some(thr)) = (f.light[c], self.light_threshold_lux[c]) {
                any = true;
                if v > thr {
                    pattern |= 1 << c;
                }
            }
        }
        any.then_some((pattern, pattern.count_ones() as usize))
    }

    /// The brightest channel's lux over its lit threshold, if any light channel is fresh.
    pub(crate) fn light_ratio(&self, f: &Features) -> Option<f64> {
        let mut best: Option<f64> = None;
        for c in 0..MAX_CHANNELS {
            if let (Some(v), Some(thr)) = (f.light[c], self.light_threshold_lux[c]) {
                let r = v / thr.max(1.0);
                best = Some(best.map_or(r, |b| b.max(r)));
            }
        }
        best
    }

    /// Summed log-likelihood ratio (occupied vs free) of everything observed now.
    pub(crate) fn llr(&self, f: &Features, pir_hold_s: f64) -> f64 {
        let clip = |x: f64| {
            if x.is_finite() {
                x.clamp(-MAX_LLR, MAX_LLR)
            } else {
                0.0
            }
        };
        let mut sum = 0.0;
        if let Some(r) = self.light_ratio(f) {
            sum += clip(self.light_llr[bin_of(r, &LIGHT_EDGES)]);
        }
        if let Some(s) = f.pir_since_s {
            let x = self.pir_llr[pir_bin(s, pir_hold_s)];
            sum += if x.is_finite() {
                x.clamp(-MAX_LLR, MAX_PIR_LLR)
            } else {
                0.0
            };
        }
        if let Some(n) = f.co2_people {
            sum += clip(self.co2_llr[bin_of(n, &CO2_EDGES)]);
        }
        if let Some(r) = f.sound_ratio {
            sum += clip(self.sound_llr[bin_of(r, &SOUND_EDGES)]);
        }
        if let Some(c) = f.count {
            sum += clip(self.count_llr[usize::from(c >= 0.5)]);
        }
        sum
    }

    /// People for an occupied room whose lights show `pattern`, if the history knows.
    pub(crate) fn people_for(&self, pattern: usize, lit: usize) -> Option<u8> {
        self.people_by_pattern
            .get(pattern)
            .copied()
            .flatten()
            .or_else(|| self.people_by_lit.get(lit).copied().flatten())
    }
}

fn pir_bin(since_s: f64, hold_s: f64) -> usize {
    bin_of(since_s / hold_s.max(1.0), &PIR_EDGES)
}

fn mode(counts: &[u32; 256], min_support: u32) -> Option<u8> {
    let total: u32 = counts.iter().sum();
    if total < min_support {
        return None;
    }
    let (best, _) =
        counts.iter().enumerate().fold(
            (0usize, 0u32),
            |acc, (i, &c)| if c > acc.1 { (i, c) } else { acc },
        );
    u8::try_from(best).ok()
}

/// Laplace-smoothed log-likelihood ratios per bin, shrunk to `prior` where a bin saw little data.
fn fit_hist<const B: usize>(
    items: impl Iterator<Item = (usize, bool)>,
    prior: &[f64; B],
) -> [f64; B] {
    fit_hist_max(items, prior, MAX_LLR)
}

fn fit_hist_max<const B: usize>(
    items: impl Iterator<Item = (usize, bool)>,
    prior: &[f64; B],
    max_llr: f64,
) -> [f64; B] {
    let mut occ = [0.0f64; B];
    let mut free = [0.0f64; B];
    for (b, o) in items {
        let b = b.min(B - 1);
        if o { occ[b] += 1.0 } else { free[b] += 1.0 }
    }
    let (n_occ, n_free): (f64, f64) = (occ.iter().sum(), free.iter().sum());
    if n_occ < 10.0 || n_free < 10.0 {
        return *prior;
    }
    let k = B as f64;
    std::array::from_fn(|b| {
        let data = ((occ[b] + 1.0) / (n_occ + k)).ln() - ((free[b] + 1.0) / (n_free + k)).ln();
        let support = occ[b] + free[b];
        let w = support / (support + 5.0);
        (w * data + (1.0 - w) * prior[b]).clamp(-MAX_LLR, max_llr)
    })
}

/// Per channel, the lux threshold that best separates occupied from free; then, if the history
/// has people counts, thresholds that make lit patterns tell how many are there.
fn fit_light_thresholds(
    rows: &[(Features, bool, Option<u32>, i64)],
) -> [Option<f64>; MAX_CHANNELS] {
    let mut thr = [Some(PRIOR_LIGHT_LUX); MAX_CHANNELS];
    let n_occ_all = rows.iter().filter(|r| r.1).count();
    if n_occ_all < 20 || rows.len() - n_occ_all < 20 {
        // One class only: nothing to separate, keep the physical prior.
        return thr;
    }
    // Per channel: its brightest reading, if it has enough readings to judge.
    let mut brightest = [None; MAX_CHANNELS];
    for (c, slot) in thr.iter_mut().enumerate() {
        *slot = None;
        let mut v: Vec<(f64, bool)> = rows
            .iter()
            .filter_map(|(f, o, _, _)| f.light[c].map(|x| (x, *o)))
            .collect();
        if v.len() < 20 {
            continue;
        }
        v.sort_unstable_by(|a, b| a.0.total_cmp(&b.0));
        brightest[c] = v.last().map(|x| x.0);
        let n = v.len();
        let n_occ = v.iter().filter(|x| x.1).count();
        let majority = n_occ.max(n - n_occ);
        // Sweep: threshold between v[i-1] and v[i]; correct = free below + occupied above.
        let mut free_below = 0usize;
        let mut occ_below = 0usize;
        let mut best = (0usize, Vec::new());
        for i in 1..n {
            if v[i - 1].1 {
                occ_below += 1
            } else {
                free_below += 1
            }
            if v[i].0 <= v[i - 1].0 {
                continue;
            }
            let correct = free_below + (n_occ - occ_below);
            if correct > best.0 {
                best = (correct, vec![i]);
            } else if correct == best.0 {
                best.1.push(i);
            }
        }
        // A channel that does not beat guessing the majority is not a room light.
        if best.0 * 1000 <= majority * 1005 || best.1.is_empty() {
            continue;
        }
        // Middle of the best plateau: the widest margin to both classes.
        let lo = best.1[0];
        let hi = best.1[best.1.len() - 1];
        let t_lo = 0.5 * (v[lo - 1].0 + v[lo].0);
        let t_hi = 0.5 * (v[hi - 1].0 + v[hi].0);
        *slot = Some(0.5 * (t_lo + t_hi));
    }
    inherit_room_threshold(&mut thr, &brightest);

    let counted: Vec<(&Features, u32)> = rows
        .iter()
        .filter_map(|(f, o, p, _)| match (o, p) {
            (true, Some(n)) if *n > 0 => Some((f, *n)),
            _ => None,
        })
        .collect();
    if counted.len() < 20 {
        return thr;
    }
    let score = |thr: &[Option<f64>; MAX_CHANNELS]| -> usize {
        let mut table = [[0u32; 256]; PATTERNS];
        let cal = Calibration {
            light_threshold_lux: *thr,
            ..Calibration::physical_prior()
        };
        for (f, n) in &counted {
            if let Some((p, _)) = cal.light_pattern(f) {
                table[p][(*n).min(255) as usize] += 1;
            }
        }
        table
            .iter()
            .map(|t| t.iter().copied().max().unwrap_or(0) as usize)
            .sum()
    };
    let mut best_score = score(&thr);
    for _round in 0..2 {
        for c in 0..MAX_CHANNELS {
            let mut vals: Vec<f64> = counted.iter().filter_map(|(f, _)| f.light[c]).collect();
            if vals.len() < 20 {
                continue;
            }
            vals.sort_unstable_by(f64::total_cmp);
            let mut candidates = vec![None];
            for q in 1..48 {
                let i = q * (vals.len() - 1) / 48;
                candidates.push(Some(0.5 * (vals[i] + vals[(i + 1).min(vals.len() - 1)])));
            }
            for cand in candidates {
                let mut t = thr;
                t[c] = cand;
                let s = score(&t);
                if s > best_score {
                    best_score = s;
                    thr = t;
                }
            }
        }
    }
    thr
}

/// A channel that separated nothing because it was never lit (its brightest reading is under
/// every room light's threshold: the lamp at that place was not switched on in this history)
/// takes the room's usual threshold, the median of the others, so that a place first used
/// later still counts. A channel that was bright but told nothing (daylight at a window)
/// stays ignored.
fn inherit_room_threshold(
    thr: &mut [Option<f64>; MAX_CHANNELS],
    brightest: &[Option<f64>; MAX_CHANNELS],
) {
    let mut lit: Vec<f64> = thr.iter().flatten().copied().collect();
    if lit.is_empty() {
        return;
    }
    lit.sort_unstable_by(f64::total_cmp);
    let lowest = lit[0];
    let typical = if lit.len() % 2 == 1 {
        lit[lit.len() / 2]
    } else {
        0.5 * (lit[lit.len() / 2 - 1] + lit[lit.len() / 2])
    };
    for (slot, max) in thr.iter_mut().zip(brightest) {
        if slot.is_none()
            && let Some(max) = max
            && *max < lowest
        {
            *slot = Some(typical);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins() {
        let cases = [
            (-1.0, 0),
            (-0.3, 1),
            (0.0, 2),
            (0.2, 3),
            (0.5, 4),
            (1.0, 5),
            (3.0, 6),
        ];
        for (x, b) in cases {
            assert_eq!(bin_of(x, &CO2_EDGES), b, "{x}");
        }
        assert_eq!(pir_bin(0.0, 300.0), 0);
        assert_eq!(pir_bin(299.0, 300.0), 2);
        assert_eq!(pir_bin(1e9, 300.0), PIR_BINS - 1);
    }

    #[test]
    fn hist_falls_back_to_prior_without_data() {
        let prior = [0.5, -0.5];
        assert_eq!(fit_hist([(0, true)].into_iter(), &prior), prior);
        let items = (0..100).map(|i| (usize::from(i % 2 == 0), i % 2 == 0));
        let got = fit_hist(items, &prior);
        assert!(got[1] > 2.0 && got[0] < -2.0, "{got:?}");
    }

    #[test]
    fn light_threshold_separates_classes() {
        let rows: Vec<_> = (0..200)
            .map(|i| {
                let occ = i % 3 == 0;
                let lux = if occ {
                    400.0 + f64::from(i)
                } else {
                    f64::from(i)
                };
                let f = Features {
                    light: [Some(lux), None, None, None],
                    ..Features::default()
                };
                (f, occ, None, i64::from(i))
            })
            .collect();
        let t = fit_light_thresholds(&rows)[0].expect("threshold");
        assert!(t > 199.0 && t < 400.0, "{t}");
    }

    /// Desk lamps on channels 0 and 1 (one person each); channel 2's lamp never on in the
    /// history (dim all along); channel 3 at a window (bright whether or not anybody is in).
    #[test]
    fn a_channel_never_lit_takes_the_room_threshold_and_a_window_stays_ignored() {
        let rows: Vec<_> = (0..400)
            .map(|i| {
                // Of every 8 samples: 4 free, then A, B, A and B, A.
                let (a, b) = match i % 8 {
                    4 | 7 => (true, false),
                    5 => (false, true),
                    6 => (true, true),
                    _ => (false, false),
                };
                let lamp = |on: bool| if on { 150.0 } else { 10.0 };
                let f = Features {
                    light: [
                        Some(lamp(a) + f64::from(i % 7)),
                        Some(lamp(b) + f64::from(i % 5)),
                        Some(40.0 + f64::from(i % 11)),
                        Some(if i % 3 == 0 { 900.0 } else { 300.0 }),
                    ],
                    ..Features::default()
                };
                (f, a || b, Some(u32::from(a) + u32::from(b)), i64::from(i))
            })
            .collect();
        let thr = fit_light_thresholds(&rows);
        let (t0, t1) = (thr[0].expect("lamp 0"), thr[1].expect("lamp 1"));
        assert!(
            (16.0..150.0).contains(&t0) && (14.0..150.0).contains(&t1),
            "{thr:?}"
        );
        assert!(t0.min(t1) > 50.0, "{thr:?}");
        let t2 = thr[2].expect("the unused place keeps a threshold");
        assert!((t2 - 0.5 * (t0 + t1)).abs() < 1e-9, "{thr:?}");
        assert_eq!(thr[3], None, "{thr:?}");

        // Its lamp switched on later counts as one more lit place.
        let cal = Calibration {
            light_threshold_lux: thr,
            ..Calibration::physical_prior()
        };
        let later = Features {
            light: [Some(150.0), Some(150.0), Some(150.0), Some(300.0)],
            ..Features::default()
        };
        let (pattern, lit) = cal.light_pattern(&later).expect("pattern");
        assert_eq!((pattern, lit), (0b0111, 3));
    }
}
