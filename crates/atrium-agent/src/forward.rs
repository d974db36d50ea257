//! Store-and-forward over the device link: spool batches out, server acks in.
//!
//! One batch is in flight at a time (the spool hands out the oldest unacknowledged batch, the
//! same one until it is acknowledged), so after a reconnect the same `batch_seq` is sent again
//! and the server, which treats it as a high-water mark, stores nothing twice. A server that
//! does not take telemetry yet (`Error` 501) is asked again after [`UNSUPPORTED_PAUSE`]; the
//! data stays spooled meanwhile.

use std::sync::Arc;
use std::time::Duration;

use atrium_proto::TelemetryBatch;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::intake::SharedSpool;

/// Wait after the server said it does not handle telemetry (501) before trying again.
pub const UNSUPPORTED_PAUSE: Duration = Duration::from_secs(300);
/// Wait after the server could not store a batch (503) before sending it again.
pub const RETRY_PAUSE: Duration = Duration::from_secs(5);
/// A batch not acknowledged within this time is sent again (same `batch_seq`).
pub const ACK_TIMEOUT: Duration = Duration::from_secs(60);

/// Most readings per batch: with 128-byte node names this stays well inside one frame
/// ([`atrium_proto::MAX_FRAME_BYTES`]).
pub const MAX_BATCH: usize = 4000;

/// The link's side of the spool.
pub struct Forwarder {
    spool: SharedSpool,
    appended: watch::Receiver<u64>,
    max_readings: usize,
    in_flight: Option<(u64, Instant)>,
    paused_until: Option<Instant>,
    told_unsupported: bool,
    refused_batches: u64,
    /// The appended position at which the spool was last seen with nothing unacknowledged:
    /// until it moves there is nothing to look for (the link's loop asks on every message).
    drained_at: Option<u64>,
    /// The spool look under way, with the appended position it began at.
    looking: Option<(u64, tokio::task::JoinHandle<Option<TelemetryBatch>>)>,
    /// Looks into the spool begun so far.
    looks: u64,
}

impl Forwarder {
    /// A forwarder over `spool`, woken by `appended` (the spool's appended position).
    pub fn new(spool: SharedSpool, appended: watch::Receiver<u64>, max_readings: usize) -> Self {
        Forwarder {
            spool,
            appended,
            max_readings: max_readings.clamp(1, MAX_BATCH),
            in_flight: None,
            paused_until: None,
            told_unsupported: false,
            refused_batches: 0,
            drained_at: None,
            looking: None,
            looks: 0,
        }
    }

    /// A new link session: nothing is in flight on it, and a new server may take telemetry.
    pub fn reset(&mut self) {
        self.in_flight = None;
        self.paused_until = None;
    }

    /// The next batch to send, once one may be sent: nothing in flight (or its ack overdue),
    /// not paused, and something unacknowledged in the spool. Cancel-safe.
    pub async fn ready(&mut self) -> TelemetryBatch {
        loop {
            if let Some((_, sent)) = self.in_flight {
                tokio::time::sleep_until(sent + ACK_TIMEOUT).await;
                tracing::warn!("telemetry batch not acknowledged in time; sending it again");
                self.in_flight = None;
            }
            if let Some(until) = self.paused_until {
                tokio::time::sleep_until(until).await;
                self.paused_until = None;
            }
            // Mark the current position seen before looking, so an append after the look wakes us.
            let position = *self.appended.borrow_and_update();
            if self.drained_at == Some(position) {
                if self.appended.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
                continue;
            }
            // A look begun by a call that was cancelled is awaited, not begun again.
            let (position, look) = match &mut self.looking {
                Some((at, look)) if *at == position => (position, look),
                looking => {
                    let spool = Arc::clone(&self.spool);
                    let max = self.max_readings;
                    self.looks += 1;
                    let look = tokio::task::spawn_blocking(move || {
                        spool.lock().ok().and_then(|mut s| s.next_batch(max))
                    });
                    let (at, look) = looking.insert((position, look));
                    (*at, look)
                }
            };
            let batch = look.await.ok().flatten();
            self.looking = None;
            if let Some(batch) = batch {
                self.drained_at = None;
                return batch;
            }
            self.drained_at = Some(position);
            if self.appended.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// The spool's counters.
    pub async fn spool_stats(&self) -> crate::spool::SpoolStats {
        let spool = Arc::clone(&self.spool);
        tokio::task::spawn_blocking(move || spool.lock().map(|s| s.stats()).unwrap_or_default())
            .await
            .unwrap_or_default()
    }

    /// The batch went out.
    pub fn sent(&mut self, batch_seq: u64) {
        self.in_flight = Some((batch_seq, Instant::now()));
    }

    /// The server stored everything up to `batch_seq`.
    pub async fn acked(&mut self, batch_seq: u64) {
        let spool = Arc::clone(&self.spool);
        let result = tokio::task::spawn_blocking(move || match spool.lock() {
            Ok(mut s) => s.ack(batch_seq).map_err(|e| e.to_string()),
            Err(_) => Err("spool lock poisoned".into()),
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        if let Err(e) = result {
            tracing::warn!(batch_seq, error = %e, "telemetry ack not applied");
        }
        if self.in_flight.is_some_and(|(seq, _)| seq <= batch_seq) {
            self.in_flight = None;
        }
        self.told_unsupported = false;
    }

    /// The server answered with an error while a batch was in flight: 501 (no telemetry
    /// support yet) pauses for [`UNSUPPORTED_PAUSE`], 503 (not stored, send again) for
    /// [`RETRY_PAUSE`]; 422 (the batch can never be stored) skips it, so one bad batch cannot
    /// stall the spool for ever. True if the error was about telemetry.
    pub async fn server_error(&mut self, code: u16, message: &str) -> bool {
        let Some((batch_seq, _)) = self.in_flight else {
            return false;
        };
        match code {
            501 => {
                self.in_flight = None;
                self.paused_until = Some(Instant::now() + UNSUPPORTED_PAUSE);
                if !self.told_unsupported {
                    tracing::warn!(%message, "the server does not take telemetry yet; readings stay spooled");
                    self.told_unsupported = true;
                }
                true
            }
            503 => {
                tracing::warn!(batch_seq, %message, "server could not store telemetry; sending again");
                self.in_flight = None;
                self.paused_until = Some(Instant::now() + RETRY_PAUSE);
                true
            }
            422 => {
                tracing::error!(batch_seq, %message, "server refused a telemetry batch; skipping it");
                self.refused_batches += 1;
                self.acked(batch_seq).await;
                true
            }
            _ => false,
        }
    }

    /// Batches the server refused for good (422) and the agent skipped.
    pub fn refused_batches(&self) -> u64 {
        self.refused_batches
    }

    /// Looks into the spool begun so far (each one a blocking task).
    pub fn spool_looks(&self) -> u64 {
        self.looks
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use atrium_proto::Reading;
    use futures_util::FutureExt as _;

    use super::*;
    use crate::spool::{Spool, SpoolLimits};

    fn readings(from: i64, n: i64) -> Vec<Reading> {
        (from..from + n)
            .map(|t| Reading {
                node: "n1".into(),
                name: "co2".into(),
                time_ms: t,
                value: 500.0,
            })
            .collect()
    }

    async fn pending(f: &mut Forwarder) -> bool {
        tokio::time::timeout(Duration::from_millis(200), f.ready())
            .await
            .is_err()
    }

    #[tokio::test(flavor = "current_thread")]
    async fn resends_until_acked_and_backs_off_on_501() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut spool = Spool::open(dir.path(), SpoolLimits::default()).expect("spool");
        spool.append(&readings(0, 3)).expect("append");
        let spool = Arc::new(Mutex::new(spool));
        let (appended, rx) = watch::channel(3);
        let mut f = Forwarder::new(Arc::clone(&spool), rx, 100);

        let batch = f.ready().await;
        assert_eq!((batch.batch_seq, batch.readings.len()), (3, 3));
        f.sent(batch.batch_seq);
        // In flight: nothing more until the ack (or its timeout).
        assert!(pending(&mut f).await);
        // An old server: 501, data kept, no retry for a while, but a new session may try again.
        assert!(
            f.server_error(501, "this server does not handle telemetry messages yet")
                .await
        );
        assert!(!f.server_error(501, "again, nothing in flight").await);
        assert!(pending(&mut f).await);
        f.reset();
        let again = f.ready().await;
        assert_eq!(again, batch, "the same batch_seq after a reconnect");
        f.sent(again.batch_seq);
        f.acked(3).await;
        assert_eq!(f.spool_stats().await.acked_seq, 3);
        assert!(pending(&mut f).await, "nothing left to send");

        spool
            .lock()
            .expect("lock")
            .append(&readings(10, 2))
            .expect("append");
        appended.send_replace(5);
        let next = f.ready().await;
        assert_eq!((next.batch_seq, next.readings[0].time_ms), (5, 10));
        f.sent(next.batch_seq);
        // Not stored (503): sent again, same batch; refused for good (422): skipped.
        assert!(f.server_error(503, "store busy").await);
        let again = tokio::time::timeout(RETRY_PAUSE * 2, f.ready())
            .await
            .expect("resent after the pause");
        assert_eq!(again, next);
        f.sent(again.batch_seq);
        assert!(f.server_error(422, "refused").await);
        assert_eq!(f.refused_batches(), 1);
        assert_eq!(f.spool_stats().await.acked_seq, 5);
    }

    /// The link asks for the next batch on every message it handles, dropping the question
    /// when something else comes first: that must not cost a look into the spool each time.
    #[tokio::test(flavor = "current_thread")]
    async fn asking_often_looks_into_the_spool_only_when_needed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = Spool::open(dir.path(), SpoolLimits::default()).expect("spool");
        let spool = Arc::new(Mutex::new(spool));
        let (appended, rx) = watch::channel(0);
        let mut f = Forwarder::new(Arc::clone(&spool), rx, 100);
        let ask = |f: &mut Forwarder| {
            let _ = f.ready().now_or_never();
        };

        // Empty: one look, then none until the spool moves.
        assert!(pending(&mut f).await);
        for _ in 0..100 {
            ask(&mut f);
        }
        assert_eq!(f.spool_looks(), 1);

        // A look that cannot finish yet (the spool is busy) is awaited again, not repeated.
        spool
            .lock()
            .expect("lock")
            .append(&readings(0, 2))
            .expect("append");
        appended.send_replace(2);
        let busy = spool.lock().expect("lock");
        for _ in 0..100 {
            ask(&mut f);
        }
        assert_eq!(f.spool_looks(), 2);
        drop(busy);
        let batch = f.ready().await;
        assert_eq!((batch.batch_seq, batch.readings.len()), (2, 2));
        assert_eq!(f.spool_looks(), 2);
    }
}
