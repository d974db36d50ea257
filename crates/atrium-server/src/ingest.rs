//! Durable telemetry ingest: links validate their batches, one task commits the batches of
//! many links together (group commit, like the [`crate::enroll::Enroller`]), and a second task
//! feeds the committed readings to the rooms engines and only then answers each link, while the
//! next group is already being committed.
//!
//! A batch is refused as a whole (an `Error`, no ack) when it is malformed: too many readings,
//! a sequence number of 0 or beyond 2^63, empty or oversized node or quantity names, or a value
//! that is not a finite number. Single readings stamped more than
//! [`crate::ServerConfig::telemetry_max_future_ms`] ahead of the server clock are dropped and
//! counted (a gateway with a wrong clock must not poison history); the rest of the batch is
//! stored and acked. Physically implausible values are stored as measured and rejected (and
//! counted) by the rooms engine.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use atrium_proto::TelemetryBatch;
use atrium_store::{Store, TelemetryOutcome, TelemetryReading, TelemetryWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::rooms::RoomHub;

/// Longest node id or quantity name accepted.
const MAX_NAME_BYTES: usize = 128;
/// Most readings committed in one transaction (batches are never split).
const MAX_READINGS_PER_COMMIT: usize = 200_000;
/// Committed groups that may wait for the rooms engines while the next group commits.
const FEED_QUEUE: usize = 2;

type Reply = oneshot::Sender<Result<TelemetryOutcome, String>>;

/// Counters of the ingest path.
#[derive(Debug, Default)]
pub struct IngestStats {
    /// Batches stored.
    pub batches_stored: AtomicU64,
    /// Retransmitted batches acknowledged again without storing.
    pub batches_duplicate: AtomicU64,
    /// Malformed batches refused.
    pub batches_refused: AtomicU64,
    /// Readings stored.
    pub readings_stored: AtomicU64,
    /// Readings dropped for a timestamp too far in the future (gateway clock skew).
    pub readings_future: AtomicU64,
    /// Commits (transactions) made.
    pub commits: AtomicU64,
    /// Commits that failed (their batches were not acknowledged).
    pub commit_failures: AtomicU64,
}

/// Checks a batch and turns it into a write; `Err` is the reason to send to the agent.
pub fn validate(
    device_id: &str,
    batch: TelemetryBatch,
    now_ms: i64,
    max_readings: usize,
    max_future_ms: i64,
    stats: &IngestStats,
) -> Result<TelemetryWrite, String> {
    let seq = batch.batch_seq;
    let batch_seq = i64::try_from(seq)
        .ok()
        .filter(|s| *s > 0)
        .ok_or_else(|| format!("telemetry batch {seq} refused: batch_seq must be 1..=2^63-1"))?;
    if batch.readings.len() > max_readings {
        return Err(format!(
            "telemetry batch {seq} refused: {} readings, at most {max_readings} per batch",
            batch.readings.len()
        ));
    }
    let latest = now_ms.saturating_add(max_future_ms);
    let mut readings = Vec::with_capacity(batch.readings.len());
    let mut future = 0u64;
    for (i, r) in batch.readings.into_iter().enumerate() {
        let name_ok = |s: &str| {
            !s.is_empty() && s.len() <= MAX_NAME_BYTES && !s.chars().any(char::is_control)
        };
        if !name_ok(&r.node) || !name_ok(&r.name) {
            return Err(format!(
                "telemetry batch {seq} refused: reading {i} has an empty, control-character or \
                 longer than {MAX_NAME_BYTES} byte node or quantity name"
            ));
        }
        if !r.value.is_finite() {
            return Err(format!(
                "telemetry batch {seq} refused: reading {i} ({} {}) is not a finite number",
                r.node, r.name
            ));
        }
        if r.time_ms > latest {
            future += 1;
            continue;
        }
        readings.push(TelemetryReading {
            node: r.node,
            quantity: r.name,
            time_ms: r.time_ms,
            value: r.value,
        });
    }
    if future > 0 {
        stats.readings_future.fetch_add(future, Ordering::Relaxed);
        tracing::warn!(
            device = %device_id,
            batch_seq = seq,
            dropped = future,
            "readings more than {max_future_ms} ms in the future dropped (gateway clock skew)"
        );
    }
    Ok(TelemetryWrite {
        device_id: device_id.to_owned(),
        batch_seq,
        readings,
    })
}

/// Collects telemetry batches from all links and commits them together.
pub struct Ingest {
    tx: mpsc::Sender<(TelemetryWrite, Reply)>,
    /// Counters.
    pub stats: Arc<IngestStats>,
}

/// A group of batches whose commit has finished, on its way to the rooms engines and the links.
struct Committed {
    writes: Vec<TelemetryWrite>,
    replies: Vec<Reply>,
    outcomes: Result<Vec<TelemetryOutcome>, String>,
}

impl Ingest {
    /// Starts the committing task and the task that feeds committed readings to the rooms
    /// engines and answers the links. They overlap: while one group is fed and acknowledged,
    /// the next is already being committed (in commit order; at most [`FEED_QUEUE`] groups
    /// wait to be fed).
    pub fn spawn(
        store: Store,
        hub: Arc<RoomHub>,
        max_batches: usize,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Ingest {
        let max_batches = max_batches.max(1);
        let stats = Arc::new(IngestStats::default());
        let (tx, mut rx) = mpsc::channel::<(TelemetryWrite, Reply)>(max_batches * 2);
        let (fed_tx, fed_rx) = mpsc::channel::<Committed>(FEED_QUEUE);
        tasks.spawn(feed(fed_rx, hub, stats.clone()));
        let task_stats = stats.clone();
        tasks.spawn(async move {
            let stats = task_stats;
            loop {
                let (write, reply) = tokio::select! {
                    next = rx.recv() => match next {
                        Some(next) => next,
                        None => return,
                    },
                    _ = shutdown.cancelled() => return,
                };
                let mut readings = write.readings.len();
                let mut writes: Vec<TelemetryWrite> = Vec::with_capacity(max_batches.min(64));
                let mut replies: Vec<Reply> = Vec::with_capacity(max_batches.min(64));
                writes.push(write);
                replies.push(reply);
                while writes.len() < max_batches && readings < MAX_READINGS_PER_COMMIT {
                    match rx.try_recv() {
                        Ok((write, reply)) => {
                            readings += write.readings.len();
                            writes.push(write);
                            replies.push(reply);
                        }
                        Err(_) => break,
                    }
                }
                stats.commits.fetch_add(1, Ordering::Relaxed);
                let outcomes = match store.store_telemetry(&writes, crate::now_ms()).await {
                    Ok(outcomes) => Ok(outcomes),
                    Err(e) => {
                        stats.commit_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(error = %e, batches = writes.len(), "telemetry commit failed");
                        Err(format!("telemetry not stored: {e}"))
                    }
                };
                let committed = Committed {
                    writes,
                    replies,
                    outcomes,
                };
                if fed_tx.send(committed).await.is_err() {
                    return;
                }
            }
        });
        Ingest { tx, stats }
    }

    /// Queues one batch and waits until it is committed (or found to be a retransmission).
    pub async fn write(&self, write: TelemetryWrite) -> Result<TelemetryOutcome, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((write, reply))
            .await
            .map_err(|_| "server is shutting down".to_owned())?;
        rx.await.map_err(|_| "server is shutting down".to_owned())?
    }
}

/// Feeds each committed group's stored readings to the rooms engines, in commit order, then
/// answers its links: an acknowledged batch is durable and already in the rooms' state.
async fn feed(
    mut committed: mpsc::Receiver<Committed>,
    hub: Arc<RoomHub>,
    stats: Arc<IngestStats>,
) {
    while let Some(Committed {
        writes,
        replies,
        outcomes,
    }) = committed.recv().await
    {
        match outcomes {
            Ok(outcomes) => {
                for (write, outcome) in writes.iter().zip(&outcomes) {
                    match outcome {
                        TelemetryOutcome::Stored => {
                            stats.batches_stored.fetch_add(1, Ordering::Relaxed);
                            stats.readings_stored.fetch_add(
                                u64::try_from(write.readings.len()).unwrap_or(u64::MAX),
                                Ordering::Relaxed,
                            );
                            hub.feed(&write.device_id, &write.readings);
                        }
                        TelemetryOutcome::Duplicate => {
                            stats.batches_duplicate.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(reason) => {
                for reply in replies {
                    let _ = reply.send(Err(reason.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use atrium_proto::Reading;

    use super::*;

    fn reading(node: &str, name: &str, time_ms: i64, value: f64) -> Reading {
        Reading {
            node: node.into(),
            name: name.into(),
            time_ms,
            value,
        }
    }

    fn batch(batch_seq: u64, readings: Vec<Reading>) -> TelemetryBatch {
        TelemetryBatch {
            batch_seq,
            readings,
        }
    }

    #[test]
    fn validation_refuses_malformed_batches_and_drops_future_readings() {
        let stats = IngestStats::default();
        let now = 1_000_000;
        let check = |b: TelemetryBatch| validate("d", b, now, 3, 300_000, &stats);
        let cases: Vec<(TelemetryBatch, Option<&str>)> = vec![
            (batch(0, vec![]), Some("batch_seq")),
            (batch(u64::MAX, vec![]), Some("batch_seq")),
            (
                batch(1, vec![reading("n", "co2", now, 1.0); 4]),
                Some("at most 3"),
            ),
            (batch(1, vec![reading("", "co2", now, 1.0)]), Some("name")),
            (
                batch(1, vec![reading("n", "c\u{7}", now, 1.0)]),
                Some("name"),
            ),
            (
                batch(1, vec![reading("n", "co2", now, f64::NAN)]),
                Some("finite"),
            ),
            (
                batch(1, vec![reading("n", "co2", now, f64::INFINITY)]),
                Some("finite"),
            ),
            (batch(7, vec![reading("n", "co2", now, 1.0)]), None),
        ];
        for (b, refused) in cases {
            match (check(b.clone()), refused) {
                (Err(e), Some(why)) => assert!(e.contains(why), "{e}"),
                (Ok(_), None) => {}
                (got, want) => panic!("{b:?}: got {got:?}, wanted refusal {want:?}"),
            }
        }
        let w = check(batch(
            9,
            vec![
                reading("n", "co2", now + 300_000, 1.0),
                reading("n", "co2", now + 300_001, 1.0),
            ],
        ))
        .expect("valid");
        assert_eq!(w.batch_seq, 9);
        assert_eq!(w.readings.len(), 1);
        assert_eq!(stats.readings_future.load(Ordering::Relaxed), 1);
    }
}
