//! Local filtering of sensor readings before they are spooled: deadband and rate limit per
//! node and quantity, on top of the SenML decoder's range checks.
//!
//! Pure and clock-free: time comes with each reading. Every refusal is counted with a reason
//! ([`FilterStats::refused`]); nothing here panics on outside data.

use std::collections::{BTreeMap, HashMap};

use atrium_proto::Reading;
use serde::{Deserialize, Serialize};

/// How the filter thins readings out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FilterConfig {
    /// Shortest time between two kept readings of one node and quantity, ms (0 = no limit).
    /// A binary quantity (motion, door) that changed state always passes.
    pub min_interval_ms: u64,
    /// Per quantity (canonical name, e.g. "co2"): changes smaller than this are dropped.
    pub deadband: BTreeMap<String, f64>,
    /// A reading inside the deadband is still kept when the last kept one is this old, s,
    /// so a steady value keeps reporting (and the server sees the node alive).
    pub max_silence_s: u64,
}

impl FilterConfig {
    /// Refuses settings that make no sense: a deadband must be a finite number >= 0, the
    /// minimum interval at most an hour, the longest silence at most a day.
    pub fn validate(&self) -> Result<(), String> {
        if self.min_interval_ms > 3_600_000 {
            return Err("min_interval_ms must be at most 3600000 (an hour)".into());
        }
        if self.max_silence_s > 86_400 {
            return Err("max_silence_s must be at most 86400 (a day)".into());
        }
        match self
            .deadband
            .iter()
            .find(|(_, v)| !v.is_finite() || **v < 0.0)
        {
            Some((quantity, v)) => Err(format!(
                "deadband of {quantity} must be a finite number >= 0, not {v}"
            )),
            None => Ok(()),
        }
    }
}

impl Default for FilterConfig {
    fn default() -> Self {
        FilterConfig {
            min_interval_ms: 1000,
            deadband: BTreeMap::from([
                ("co2".to_owned(), 5.0),
                ("temperature".to_owned(), 0.05),
                ("humidity".to_owned(), 0.2),
                ("light".to_owned(), 2.0),
            ]),
            max_silence_s: 300,
        }
    }
}

/// Why a reading was not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Refusal {
    /// Within the deadband of the last kept value.
    Deadband,
    /// Sooner than `min_interval_ms` after the last kept reading.
    RateLimited,
    /// Older than (or as old as) the last kept reading of the same node and quantity.
    OutOfOrder,
}

impl Refusal {
    /// A stable label for counters.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Deadband => "deadband",
            Refusal::RateLimited => "rate_limited",
            Refusal::OutOfOrder => "out_of_order",
        }
    }
}

/// What the filter has done so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FilterStats {
    /// Readings kept.
    pub kept: u64,
    /// Readings refused, by reason label.
    pub refused: BTreeMap<String, u64>,
}

impl FilterStats {
    /// Counts one refusal.
    pub fn refuse(&mut self, reason: &str) {
        *self.refused.entry(reason.to_owned()).or_default() += 1;
    }
}

#[derive(Debug, Clone, Copy)]
struct Last {
    time_ms: i64,
    value: f64,
}

/// Most (node, quantity) pairs remembered; beyond it the memory is cleared (a flood of fake
/// node names must not grow the agent without bound).
const MAX_TRACKED: usize = 10_000;

/// The filter: remembers the last kept reading of each node and quantity.
#[derive(Debug, Default)]
pub struct Filter {
    config: FilterConfig,
    last: HashMap<(String, String), Last>,
    stats: FilterStats,
}

fn is_binary(name: &str) -> bool {
    matches!(name, "motion" | "door")
}

impl Filter {
    /// A filter with this configuration.
    pub fn new(config: FilterConfig) -> Filter {
        Filter {
            config,
            last: HashMap::new(),
            stats: FilterStats::default(),
        }
    }

    /// Replaces the settings; what was kept so far and the counters stay.
    pub fn set_config(&mut self, config: FilterConfig) {
        self.config = config;
    }

    /// Keeps or refuses one reading, counting the outcome.
    pub fn check(&mut self, reading: &Reading) -> Result<(), Refusal> {
        let verdict = self.verdict(reading);
        match verdict {
            Ok(()) => {
                self.stats.kept += 1;
                if self.last.len() >= MAX_TRACKED {
                    self.last.clear();
                }
                self.last.insert(
                    (reading.node.clone(), reading.name.clone()),
                    Last {
                        time_ms: reading.time_ms,
                        value: reading.value,
                    },
                );
            }
            Err(reason) => self.stats.refuse(reason.label()),
        }
        verdict
    }

    fn verdict(&self, r: &Reading) -> Result<(), Refusal> {
        let Some(last) = self.last.get(&(r.node.clone(), r.name.clone())) else {
            return Ok(());
        };
        if r.time_ms <= last.time_ms {
            return Err(Refusal::OutOfOrder);
        }
        let since = u64::try_from(r.time_ms.saturating_sub(last.time_ms)).unwrap_or(u64::MAX);
        let changed = r.value != last.value;
        if is_binary(&r.name) && changed {
            return Ok(());
        }
        if since < self.config.min_interval_ms {
            return Err(Refusal::RateLimited);
        }
        let band = self.config.deadband.get(&r.name).copied().unwrap_or(0.0);
        let silent_long = since >= self.config.max_silence_s.saturating_mul(1000);
        let small = if is_binary(&r.name) {
            !changed
        } else {
            (r.value - last.value).abs() < band
        };
        if small && !silent_long {
            return Err(Refusal::Deadband);
        }
        Ok(())
    }

    /// Counters so far.
    pub fn stats(&self) -> &FilterStats {
        &self.stats
    }

    /// Counts a refusal made before the filter (decoder errors, topic mismatches).
    pub fn count_refusal(&mut self, reason: &str) {
        self.stats.refuse(reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(node: &str, name: &str, time_ms: i64, value: f64) -> Reading {
        Reading {
            node: node.into(),
            name: name.into(),
            time_ms,
            value,
        }
    }

    #[test]
    fn settings_change_in_place_and_nonsense_is_refused() {
        let mut filter = Filter::new(FilterConfig::default());
        assert_eq!(filter.check(&r("a", "co2", 10_000, 600.0)), Ok(()));
        filter.set_config(FilterConfig {
            min_interval_ms: 60_000,
            ..FilterConfig::default()
        });
        // What was kept before still counts, and so do the counters.
        assert_eq!(
            filter.check(&r("a", "co2", 30_000, 900.0)),
            Err(Refusal::RateLimited)
        );
        assert_eq!(filter.check(&r("a", "co2", 70_000, 900.0)), Ok(()));
        assert_eq!(filter.stats().kept, 2);
        assert!(FilterConfig::default().validate().is_ok());
        for bad in [
            FilterConfig {
                min_interval_ms: 3_600_001,
                ..FilterConfig::default()
            },
            FilterConfig {
                max_silence_s: 86_401,
                ..FilterConfig::default()
            },
            FilterConfig {
                deadband: BTreeMap::from([("co2".to_owned(), -1.0)]),
                ..FilterConfig::default()
            },
            FilterConfig {
                deadband: BTreeMap::from([("co2".to_owned(), f64::NAN)]),
                ..FilterConfig::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn table() {
        use Refusal::*;
        // (reading, expected) applied in order to one filter with the default configuration.
        let cases: &[(Reading, Result<(), Refusal>)] = &[
            (r("a", "co2", 10_000, 600.0), Ok(())),
            (r("a", "co2", 10_500, 700.0), Err(RateLimited)),
            (r("a", "co2", 12_000, 603.0), Err(Deadband)),
            (r("a", "co2", 13_000, 606.0), Ok(())),
            (r("a", "co2", 13_000, 700.0), Err(OutOfOrder)),
            (r("a", "co2", 9_000, 700.0), Err(OutOfOrder)),
            (r("b", "co2", 13_000, 606.0), Ok(())),
            (r("a", "temperature", 13_000, 21.0), Ok(())),
            (r("a", "temperature", 20_000, 21.01), Err(Deadband)),
            // Silent for max_silence_s: kept even inside the deadband.
            (r("a", "co2", 313_000, 606.0), Ok(())),
            // Binary: a change passes at once, a repeat is a deadband refusal.
            (r("a", "motion", 1_000, 1.0), Ok(())),
            (r("a", "motion", 1_100, 0.0), Ok(())),
            (r("a", "motion", 5_000, 0.0), Err(Deadband)),
            (r("a", "motion", 5_100, 1.0), Ok(())),
            // Quantities without a deadband only see the rate limit.
            (r("a", "people", 1_000, 3.0), Ok(())),
            (r("a", "people", 2_000, 3.0), Ok(())),
        ];
        let mut filter = Filter::new(FilterConfig::default());
        for (i, (reading, expected)) in cases.iter().enumerate() {
            assert_eq!(filter.check(reading), *expected, "case {i}: {reading:?}");
        }
        let stats = filter.stats();
        assert_eq!(stats.kept, 10);
        assert_eq!(stats.refused.get("deadband"), Some(&3));
        assert_eq!(stats.refused.get("rate_limited"), Some(&1));
        assert_eq!(stats.refused.get("out_of_order"), Some(&2));
    }

    #[test]
    fn zero_config_keeps_everything_in_order() {
        let mut filter = Filter::new(FilterConfig {
            min_interval_ms: 0,
            deadband: BTreeMap::new(),
            max_silence_s: 0,
        });
        for t in 1..100 {
            assert_eq!(filter.check(&r("n", "co2", t, 500.0)), Ok(()));
        }
    }

    #[test]
    fn nonsense_values_do_not_panic() {
        let mut filter = Filter::new(FilterConfig::default());
        for v in [f64::NAN, f64::INFINITY, -0.0, f64::MAX] {
            let _ = filter.check(&r("n", "co2", i64::MIN, v));
            let _ = filter.check(&r("n", "co2", i64::MAX, v));
        }
    }
}
