//! Time limits of a byte stream (a terminal, a forwarded connection): an idle timeout and a
//! maximum lifetime, applied the same way by whichever end serves the stream (the agent for
//! terminals, the server for forwarded connections), with the same close reasons.
//!
//! Pure arithmetic over any instant type (`std` or `tokio`): the caller reads the clock and
//! sleeps until [`Limits::next`].

use std::fmt;
use std::ops::Add;
use std::time::Duration;

/// The limits of one stream; `None` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// A stream with no bytes either way for this long is closed.
    pub idle: Option<Duration>,
    /// A stream is closed this long after it opened, busy or not.
    pub lifetime: Option<Duration>,
}

/// Which limit ended a stream; its text is the close reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// No bytes either way for the idle timeout.
    Idle(Duration),
    /// Open for the longest allowed time.
    Lifetime(Duration),
}

impl fmt::Display for Expiry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expiry::Idle(d) => write!(f, "idle for {} s", d.as_secs()),
            Expiry::Lifetime(d) => write!(f, "open for the longest allowed {} s", d.as_secs()),
        }
    }
}

impl Limits {
    /// Limits from configured seconds, where 0 means never.
    pub fn from_secs(idle_s: u64, lifetime_s: u64) -> Limits {
        let some = |s: u64| (s > 0).then(|| Duration::from_secs(s));
        Limits {
            idle: some(idle_s),
            lifetime: some(lifetime_s),
        }
    }

    /// The same limits without the idle timeout.
    pub fn without_idle(self) -> Limits {
        Limits { idle: None, ..self }
    }

    /// The next moment a limit ends a stream opened at `started` and last active at
    /// `last_activity`, and which limit it is; `None` when no limit applies. When both fall
    /// on the same moment, the lifetime is named.
    pub fn next<T>(&self, started: T, last_activity: T) -> Option<(T, Expiry)>
    where
        T: Copy + Ord + Add<Duration, Output = T>,
    {
        let idle = self.idle.map(|d| (last_activity + d, Expiry::Idle(d)));
        let lifetime = self.lifetime.map(|d| (started + d, Expiry::Lifetime(d)));
        match (idle, lifetime) {
            (Some(i), Some(l)) => Some(if i.0 < l.0 { i } else { l }),
            (i, l) => i.or(l),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn zero_is_never() {
        let limits = Limits::from_secs(0, 0);
        assert_eq!(limits, Limits::default());
        let now = Instant::now();
        assert_eq!(limits.next(now, now), None);
    }

    #[test]
    fn the_earlier_limit_wins_and_names_itself() {
        let limits = Limits::from_secs(10, 60);
        let t0 = Instant::now();
        let (at, why) = limits.next(t0, t0).expect("a limit");
        assert_eq!(
            (at, why),
            (
                t0 + Duration::from_secs(10),
                Expiry::Idle(Duration::from_secs(10))
            )
        );
        assert_eq!(why.to_string(), "idle for 10 s");
        // Activity pushes the idle deadline, never the lifetime.
        let late = t0 + Duration::from_secs(55);
        let (at, why) = limits.next(t0, late).expect("a limit");
        assert_eq!(at, t0 + Duration::from_secs(60));
        assert_eq!(why.to_string(), "open for the longest allowed 60 s");
        assert_eq!(
            limits.without_idle().next(t0, t0),
            Some((
                t0 + Duration::from_secs(60),
                Expiry::Lifetime(Duration::from_secs(60))
            ))
        );
    }

    #[test]
    fn one_limit_alone_applies() {
        let t0 = Instant::now();
        assert_eq!(
            Limits::from_secs(5, 0).next(t0, t0).map(|n| n.1),
            Some(Expiry::Idle(Duration::from_secs(5)))
        );
        assert_eq!(
            Limits::from_secs(0, 5).next(t0, t0).map(|n| n.1),
            Some(Expiry::Lifetime(Duration::from_secs(5)))
        );
    }
}
