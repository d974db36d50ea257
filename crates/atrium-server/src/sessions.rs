//! Live stream sessions of this node: one [`SessionTable`] for terminals and one for file
//! transfers and forwarded connections. A table holds each live session (its device, and how
//! to end it), enforces the per-device limit and each operator's opening rate in one step,
//! and lets an admin terminate a session.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use atrium_store::DeviceStatus;
use tokio_util::sync::CancellationToken;

use crate::Ctx;
use crate::api::error::ApiError;

/// The window of the opening rate.
const RATE_WINDOW: Duration = Duration::from_secs(60);

struct Live {
    device_id: String,
    cancel: CancellationToken,
    terminated_by: Option<String>,
}

#[derive(Default)]
struct Inner {
    live: HashMap<String, Live>,
    /// Each operator's recent opens, oldest first.
    opens: HashMap<String, VecDeque<Instant>>,
}

/// The live sessions of one kind on this node and the operators' recent opens.
pub struct SessionTable {
    /// What the sessions are called in refusals, plural ("terminal sessions").
    what: &'static str,
    inner: Mutex<Inner>,
}

/// A reserved session; dropping it frees its place on the device.
pub struct Slot {
    table: Arc<SessionTable>,
    /// The session's id (a UUIDv7).
    pub id: String,
    /// Cancelled when an admin terminates the session.
    pub cancel: CancellationToken,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.table.lock().live.remove(&self.id);
    }
}

impl Slot {
    /// Who terminated the session, once an admin did.
    pub fn terminated_by(&self) -> Option<String> {
        self.table
            .lock()
            .live
            .get(&self.id)
            .and_then(|l| l.terminated_by.clone())
    }
}

impl SessionTable {
    /// An empty table of sessions called `what` (plural) in refusals.
    pub fn new(what: &'static str) -> Arc<SessionTable> {
        Arc::new(SessionTable {
            what,
            inner: Mutex::new(Inner::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every change is a single insert, remove or push: a panic cannot leave it half-done.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks the operator's rate and the device's limit and records the new session, in one
    /// step: opens at the same moment cannot both pass a check that only one of them fits.
    /// The rate refuses with 429, the device's limit with 409.
    pub fn reserve(
        self: &Arc<Self>,
        device_id: &str,
        actor: &str,
        max_per_device: u32,
        opens_per_minute: u32,
    ) -> Result<Slot, ApiError> {
        let what = self.what;
        let mut inner = self.lock();
        let Inner { live, opens } = &mut *inner;
        let now = Instant::now();
        let recent = opens.entry(actor.to_owned()).or_default();
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > RATE_WINDOW)
        {
            recent.pop_front();
        }
        if recent.len() >= opens_per_minute as usize {
            return Err(ApiError::TooManyRequests(format!(
                "at most {opens_per_minute} {what} a minute; try again shortly"
            )));
        }
        let on_device = live.values().filter(|l| l.device_id == device_id).count();
        if on_device >= max_per_device as usize {
            return Err(ApiError::Conflict(format!(
                "device {device_id} has {on_device} {what} open, the most allowed"
            )));
        }
        // Only opens given a place count against the operator's rate.
        recent.push_back(now);
        let id = uuid::Uuid::now_v7().to_string();
        let cancel = CancellationToken::new();
        live.insert(
            id.clone(),
            Live {
                device_id: device_id.to_owned(),
                cancel: cancel.clone(),
                terminated_by: None,
            },
        );
        Ok(Slot {
            table: self.clone(),
            id,
            cancel,
        })
    }

    /// Checks that the device is accepted and connected, then reserves a session on it
    /// ([`SessionTable::reserve`]).
    pub async fn admit(
        self: &Arc<Self>,
        ctx: &Ctx,
        device_id: &str,
        actor: &str,
        max_per_device: u32,
        opens_per_minute: u32,
    ) -> Result<Slot, ApiError> {
        let device = ctx
            .store
            .device(device_id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no device {device_id}")))?;
        if device.status != DeviceStatus::Accepted {
            return Err(ApiError::Forbidden(format!(
                "device {device_id} is {}: it has no {}",
                device.status.as_str(),
                self.what
            )));
        }
        if !ctx.links.is_connected(device_id) {
            return Err(ApiError::Conflict(format!(
                "device {device_id} is not connected"
            )));
        }
        self.reserve(device_id, actor, max_per_device, opens_per_minute)
    }

    /// Ends a live session; returns its device, or `None` when no such session is live.
    pub fn terminate(&self, id: &str, actor: &str) -> Option<String> {
        let mut inner = self.lock();
        let session = inner.live.get_mut(id)?;
        session.terminated_by = Some(actor.to_owned());
        session.cancel.cancel();
        Some(session.device_id.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Many opens at once by one operator: exactly the rate's worth get a place, and the
    /// device limit holds across operators.
    #[test]
    fn concurrent_opens_never_exceed_the_limits() {
        for _ in 0..20 {
            let table = SessionTable::new("terminal sessions");
            let start = Arc::new(std::sync::Barrier::new(16));
            let threads: Vec<_> = (0..16)
                .map(|i| {
                    let (table, start) = (table.clone(), start.clone());
                    std::thread::spawn(move || {
                        start.wait();
                        // Half the threads are one operator (rate 3), the others each their
                        // own; all on one device (limit 5).
                        let actor = if i % 2 == 0 {
                            "user:alice".to_owned()
                        } else {
                            format!("user:op{i}")
                        };
                        table
                            .reserve("dev-1", &actor, 5, 3)
                            .map(|slot| (actor, slot))
                    })
                })
                .collect();
            let results: Vec<_> = threads
                .into_iter()
                .map(|t| t.join().expect("a thread panicked"))
                .collect();
            let admitted: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
            assert_eq!(admitted.len(), 5, "the device limit");
            let alice = admitted.iter().filter(|a| a.0 == "user:alice").count();
            assert!(alice <= 3, "alice's rate: {alice}");
            assert_eq!(table.lock().live.len(), 5);
            let recorded: usize = table.lock().opens.values().map(VecDeque::len).sum();
            assert_eq!(recorded, 5, "only admitted opens count against the rate");
            drop(results);
            assert!(
                table.lock().live.is_empty(),
                "dropped slots free their place"
            );
        }
    }

    #[test]
    fn the_rate_refuses_with_429_and_the_device_limit_with_409() {
        let table = SessionTable::new("file transfers");
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(
                table
                    .reserve("dev-1", "user:bob", 10, 2)
                    .expect("within the limits"),
            );
        }
        let rate = table.reserve("dev-2", "user:bob", 10, 2).err();
        assert!(
            matches!(&rate, Some(ApiError::TooManyRequests(m)) if m.contains("at most 2 file transfers a minute")),
            "{:?}",
            rate.map(|e| e.to_string())
        );
        let full = table.reserve("dev-1", "user:carol", 2, 10).err();
        assert!(
            matches!(&full, Some(ApiError::Conflict(m)) if m.contains("has 2 file transfers open")),
            "{:?}",
            full.map(|e| e.to_string())
        );
        held.push(
            table
                .reserve("dev-2", "user:carol", 2, 10)
                .expect("another device"),
        );
        // A freed place is free again; the rate still counts the earlier opens.
        held.remove(0);
        assert!(table.reserve("dev-1", "user:carol", 2, 10).is_ok());
    }

    #[test]
    fn terminating_cancels_and_names_the_admin() {
        let table = SessionTable::new("terminal sessions");
        let slot = table.reserve("dev-1", "user:bob", 4, 10).expect("slot");
        assert_eq!(table.terminate("no-such-id", "user:root"), None);
        assert_eq!(slot.terminated_by(), None);
        assert_eq!(
            table.terminate(&slot.id, "user:root").as_deref(),
            Some("dev-1")
        );
        assert!(slot.cancel.is_cancelled());
        assert_eq!(slot.terminated_by().as_deref(), Some("user:root"));
        let id = slot.id.clone();
        drop(slot);
        assert_eq!(table.terminate(&id, "user:root"), None, "gone once dropped");
    }
}
