//! The live device links of this server node, so a lifecycle decision can reach them at once.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::mpsc;

/// How long a stream open waits for room in a busy link's control queue.
pub const OPEN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// What the rest of the server can tell a link task.
#[derive(Debug)]
pub enum Control {
    /// Close the link now, telling the agent why.
    Close(String),
    /// The device's desired twin changed: send it.
    TwinChanged,
    /// Open a byte stream to the device (a terminal).
    OpenStream(Box<crate::streams::StreamRequest>),
    /// Send this message to the device (deployment offers and cancels).
    Send(Box<atrium_proto::Message>),
}

struct Entry {
    conn: u64,
    control: mpsc::Sender<Control>,
}

/// Device id -> the one live link of that device on this node.
#[derive(Default)]
pub struct LinkRegistry {
    links: Mutex<HashMap<String, Entry>>,
    seen: Mutex<HashSet<String>>,
    next_conn: AtomicU64,
}

/// Proof of registration: removing needs it, so a newer link of the same device is never
/// removed by an older one that is shutting down.
#[derive(Debug)]
pub struct Registration {
    /// The device.
    pub device_id: String,
    conn: u64,
}

impl LinkRegistry {
    /// Registers a link; an older link of the same device is told to close.
    pub fn register(&self, device_id: &str, control: mpsc::Sender<Control>) -> Registration {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let old = self
            .lock_links()
            .insert(device_id.to_owned(), Entry { conn, control });
        if let Some(old) = old {
            // try_send: a full channel means the old link is already closing.
            let _ = old.control.try_send(Control::Close(
                "replaced by a newer link of the same device".into(),
            ));
        }
        Registration {
            device_id: device_id.to_owned(),
            conn,
        }
    }

    /// Removes the link if it is still the registered one.
    pub fn unregister(&self, registration: &Registration) {
        let mut links = self.lock_links();
        if links
            .get(&registration.device_id)
            .is_some_and(|e| e.conn == registration.conn)
        {
            links.remove(&registration.device_id);
        }
    }

    /// Tells the device's link, if any, to close; returns whether there was one.
    pub fn disconnect(&self, device_id: &str, reason: &str) -> bool {
        let control = self.lock_links().get(device_id).map(|e| e.control.clone());
        match control {
            Some(control) => {
                let _ = control.try_send(Control::Close(reason.to_owned()));
                true
            }
            None => false,
        }
    }

    /// Tells the device's link, if any, to send its desired twin again.
    pub fn twin_changed(&self, device_id: &str) {
        let control = self.lock_links().get(device_id).map(|e| e.control.clone());
        // Notifications take at most half the slots, so a Close always finds room; when
        // they are skipped, one already queued will send the newest twin anyway.
        if let Some(control) = control.filter(|c| c.capacity() > c.max_capacity() / 2) {
            let _ = control.try_send(Control::TwinChanged);
        }
    }

    /// Queues a message for the device's link; `false` when the device has no link here or
    /// its link is busy (the caller tries again later).
    pub fn send(&self, device_id: &str, message: atrium_proto::Message) -> bool {
        let control = self.lock_links().get(device_id).map(|e| e.control.clone());
        // Like twin notifications, at most half the slots, so a Close always finds room.
        match control.filter(|c| c.capacity() > c.max_capacity() / 2) {
            Some(control) => control.try_send(Control::Send(Box::new(message))).is_ok(),
            None => false,
        }
    }

    /// Asks the device's link to open a stream; refused when there is no link, or when the
    /// link stays busy for [`OPEN_WAIT`] (many opens at once, e.g. a browser's parallel
    /// connections through a port forward, wait their turn instead of failing).
    pub async fn open_stream(
        &self,
        device_id: &str,
        request: crate::streams::StreamRequest,
    ) -> Result<(), String> {
        let control = self
            .lock_links()
            .get(device_id)
            .map(|e| e.control.clone())
            .ok_or_else(|| format!("device {device_id} is not connected"))?;
        let busy = || format!("the link of device {device_id} is busy; try again");
        let deadline = tokio::time::Instant::now() + OPEN_WAIT;
        let mut request = Box::new(request);
        loop {
            // Like twin notifications, opens take at most half the slots so a Close finds room.
            if control.capacity() > control.max_capacity() / 2 {
                match control.try_send(Control::OpenStream(request)) {
                    Ok(()) => return Ok(()),
                    Err(mpsc::error::TrySendError::Full(Control::OpenStream(back))) => {
                        request = back;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        return Err(format!("device {device_id} is not connected"));
                    }
                    Err(mpsc::error::TrySendError::Full(_)) => return Err(busy()),
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(busy());
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Whether the device has a live link on this node.
    pub fn is_connected(&self, device_id: &str) -> bool {
        self.lock_links().contains_key(device_id)
    }

    /// Number of live links.
    pub fn len(&self) -> usize {
        self.lock_links().len()
    }

    /// Whether there are no live links.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Notes that a device was heard from; flushed to storage in batches.
    pub fn mark_seen(&self, device_id: &str) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if !seen.contains(device_id) {
            seen.insert(device_id.to_owned());
        }
    }

    /// Takes the devices heard from since the last call.
    pub fn take_seen(&self) -> Vec<String> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.drain().collect()
    }

    fn lock_links(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding the lock cannot leave the map half-updated (single inserts and
        // removes), so a poisoned lock is still usable.
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn newer_link_replaces_older_and_older_cannot_unregister_it() {
        let registry = LinkRegistry::default();
        let (tx1, mut rx1) = mpsc::channel(1);
        let (tx2, mut rx2) = mpsc::channel(1);
        let first = registry.register("d1", tx1);
        let second = registry.register("d1", tx2);
        assert!(matches!(rx1.recv().await, Some(Control::Close(_))));
        registry.unregister(&first);
        assert!(registry.is_connected("d1"));
        assert!(registry.disconnect("d1", "decommissioned"));
        assert!(matches!(
            rx2.recv().await,
            Some(Control::Close(reason)) if reason == "decommissioned"
        ));
        registry.unregister(&second);
        assert!(!registry.is_connected("d1"));
        assert!(!registry.disconnect("d1", "again"));
    }

    fn request() -> crate::streams::StreamRequest {
        let (events, _) = mpsc::channel(1);
        let (reply, _) = tokio::sync::oneshot::channel();
        crate::streams::StreamRequest {
            kind: "tcp".into(),
            params_json: "{}".into(),
            window: 1024,
            events,
            reply,
        }
    }

    #[tokio::test]
    async fn stream_opens_wait_for_a_busy_link_and_keep_room_for_a_close() {
        let registry = std::sync::Arc::new(LinkRegistry::default());
        let (tx, mut rx) = mpsc::channel(4);
        registry.register("d1", tx);
        // Opens may fill half the queue at once.
        registry.open_stream("d1", request()).await.expect("first");
        registry.open_stream("d1", request()).await.expect("second");
        // A third waits until the link has taken one out, instead of failing.
        let waiting = tokio::spawn({
            let registry = registry.clone();
            async move { registry.open_stream("d1", request()).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "the third open must wait");
        // A Close still finds room while opens wait.
        assert!(registry.disconnect("d1", "bye"));
        assert_eq!(rx.len(), 3);
        assert!(matches!(rx.recv().await, Some(Control::OpenStream(_))));
        assert!(matches!(rx.recv().await, Some(Control::OpenStream(_))));
        assert!(matches!(rx.recv().await, Some(Control::Close(_))));
        waiting.await.expect("join").expect("third open");
        assert!(matches!(rx.recv().await, Some(Control::OpenStream(_))));
        // A link that stays busy refuses after the wait.
        registry.open_stream("d1", request()).await.expect("fourth");
        registry.open_stream("d1", request()).await.expect("fifth");
        let refused = registry.open_stream("d1", request()).await;
        assert!(refused.is_err_and(|e| e.contains("busy")));
    }

    #[test]
    fn seen_devices_are_taken_once() {
        let registry = LinkRegistry::default();
        registry.mark_seen("a");
        registry.mark_seen("a");
        registry.mark_seen("b");
        let mut seen = registry.take_seen();
        seen.sort();
        assert_eq!(seen, vec!["a", "b"]);
        assert!(registry.take_seen().is_empty());
    }
}
