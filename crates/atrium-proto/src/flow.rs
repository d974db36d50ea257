//! The receiving side of a stream's flow control: bytes consumed are granted back to the
//! sender ([`crate::StreamWindow`]) in batches of at least a quarter of the window, not one
//! grant per message. A terminal's echo then needs no grant frame of its own, and a bulk
//! stream costs one grant per quarter window; the sender never stalls for it, since it
//! always holds at least three quarters of the window minus what is in flight. The server
//! grants this way for what it delivers to operators, the agent for terminal input written
//! to the PTY.

/// Bytes consumed but not yet granted back, for one stream.
#[derive(Debug, Clone, Copy)]
pub struct Grants {
    ungranted: u64,
    batch: u64,
}

impl Grants {
    /// Grants for a stream whose receiver offered `window` bytes.
    pub fn new(window: u32) -> Grants {
        Grants {
            ungranted: 0,
            batch: (u64::from(window) / 4).max(1),
        }
    }

    /// Records `n` bytes consumed; returns the credit to grant now, if a batch is full.
    pub fn consumed(&mut self, n: usize) -> Option<u32> {
        self.ungranted = self.ungranted.saturating_add(n as u64);
        if self.ungranted < self.batch {
            return None;
        }
        let grant = u32::try_from(self.ungranted).unwrap_or(u32::MAX);
        self.ungranted -= u64::from(grant);
        Some(grant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_come_in_quarter_windows_and_lose_nothing() {
        let mut grants = Grants::new(64);
        let mut granted = 0u64;
        let mut frames = 0;
        for _ in 0..100 {
            if let Some(g) = grants.consumed(1) {
                assert!(g >= 16);
                granted += u64::from(g);
                frames += 1;
            }
        }
        assert_eq!(frames, 6);
        assert_eq!(granted + grants.ungranted, 100);
        // A message larger than the batch is granted at once, whole.
        assert_eq!(grants.consumed(40), Some(44));
    }

    /// A sender that sends whatever credit it has never waits forever: whatever it sent is
    /// eventually granted back, however the bytes are cut.
    #[test]
    fn a_sender_within_credit_never_deadlocks() {
        for cut in 1..=70u64 {
            let window = 64u64;
            let mut grants = Grants::new(window as u32);
            let mut credit = window;
            let mut sent = 0u64;
            while sent < 10_000 {
                let n = cut.min(credit);
                assert!(n > 0, "stalled at {sent} bytes with cut {cut}");
                credit -= n;
                sent += n;
                if let Some(g) = grants.consumed(n as usize) {
                    credit += u64::from(g);
                }
                assert!(credit <= window);
            }
        }
    }
}
