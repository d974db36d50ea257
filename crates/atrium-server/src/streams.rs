//! Byte streams multiplexed over a device link (terminals, file transfers, forwarded connections).
//!
//! An operator-side task asks a link for a stream with [`crate::registry::Control::OpenStream`].
//! The link task allocates the stream id, sends [`StreamOpen`] to the agent, and from then on
//! relays: device → operator as [`FromDevice`] events on a channel the operator task gave it,
//! operator → device as [`ToDevice`] commands on one inbox per link that exists only while the
//! link has streams (idle links keep no stream state at all).
//!
//! Flow control is end to end and in bytes. The agent may send only what the server granted
//! (the initial window, then [`ToDevice::Credit`] as the operator task delivers bytes to the
//! operator); the operator task may send only what the agent granted ([`FromDevice::Credit`]).
//! The link checks both and closes a stream that overruns, so a fast sender on either side
//! cannot make the server buffer more than a window per stream.

use std::collections::HashMap;

use atrium_proto::{Message, StreamClose, StreamData, StreamOpen, StreamResize, StreamWindow};
use tokio::sync::{mpsc, oneshot};

/// Events queued from the link to one operator task before the stream is closed as stalled.
/// The window bounds the bytes; this bounds the messages (a full window in frames of 32 bytes
/// on average), so a device that trickles tiny frames costs under a megabyte per stream.
pub const EVENT_QUEUE: usize = 8192;
/// Commands queued from operator tasks to one link.
const INBOX: usize = 16;

/// What the link tells the operator task of a stream.
#[derive(Debug, PartialEq, Eq)]
pub enum FromDevice {
    /// Output of the device.
    Data(Vec<u8>),
    /// The device accepts this many more input bytes (the first grant means "opened").
    Credit(u32),
    /// The stream ended.
    Closed {
        /// Exit status of the process behind it.
        exit_code: Option<i32>,
        /// Why, when it was not a normal end.
        reason: Option<String>,
    },
}

/// What an operator task tells the link about its stream.
#[derive(Debug, PartialEq, Eq)]
pub enum ToDevice {
    /// Input for the device, within the device's credit.
    Data(Vec<u8>),
    /// The terminal size changed.
    Resize {
        /// Columns.
        cols: u16,
        /// Rows.
        rows: u16,
    },
    /// The operator consumed this many output bytes: the device may send as many more.
    Credit(u32),
    /// The operator side ends the stream.
    Close(String),
}

/// A request to open a stream on a device's link.
#[derive(Debug)]
pub struct StreamRequest {
    /// The stream kind, e.g. "terminal".
    pub kind: String,
    /// Its parameters, JSON.
    pub params_json: String,
    /// Output bytes the device may send before the operator task grants more.
    pub window: u32,
    /// Where the link sends the stream's events; bounded by [`EVENT_QUEUE`].
    pub events: mpsc::Sender<FromDevice>,
    /// Receives the stream's handle once the open is sent.
    pub reply: oneshot::Sender<StreamHandle>,
}

/// The operator task's end of an open stream.
#[derive(Debug, Clone)]
pub struct StreamHandle {
    /// The stream id on the link.
    pub stream: u32,
    inbox: mpsc::Sender<(u32, ToDevice)>,
}

impl StreamHandle {
    /// Sends the operator's held-back input as far as the device's `credit` allows, keeping
    /// the rest in `pending` for when more credit arrives.
    pub async fn send_within_credit(&self, credit: &mut u64, pending: &mut Option<bytes::Bytes>) {
        let Some(mut input) = pending.take() else {
            return;
        };
        let n = usize::try_from(*credit)
            .unwrap_or(usize::MAX)
            .min(input.len());
        if n > 0 {
            let chunk = input.split_to(n);
            *credit -= n as u64;
            // A refused command means the link has ended the stream; the events still queued
            // (output, then the close) say how, so they decide the end.
            let _ = self.send(ToDevice::Data(chunk.to_vec())).await;
        }
        if !input.is_empty() {
            *pending = Some(input);
        }
    }

    /// Sends a command to the link; false when the link has ended the stream (its events
    /// channel then closes after the queued events).
    pub async fn send(&self, command: ToDevice) -> bool {
        self.inbox.send((self.stream, command)).await.is_ok()
    }

    /// Asks the link to close the stream without waiting (from `Drop`).
    pub fn try_close(&self, reason: &str) {
        let _ = self
            .inbox
            .try_send((self.stream, ToDevice::Close(reason.to_owned())));
    }
}

/// Closes the stream when dropped while it still holds the handle: an open that never gets
/// as far as its relay (refused, timed out, upgrade failed) ends on the device too.
pub struct StreamGuard(pub Option<StreamHandle>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if let Some(handle) = self.0.take() {
            handle.try_close("the operator left");
        }
    }
}

struct Open {
    events: mpsc::Sender<FromDevice>,
    /// Input bytes the device still accepts.
    device_credit: u64,
    /// Output bytes the device may still send.
    device_may_send: u64,
}

/// The inbox of a link's streams: the sender handed to operator tasks, and the receiver.
type Inbox = (
    mpsc::Sender<(u32, ToDevice)>,
    mpsc::Receiver<(u32, ToDevice)>,
);

/// The stream state of one link.
#[derive(Default)]
pub struct LinkStreams {
    streams: HashMap<u32, Open>,
    inbox: Option<Inbox>,
    next_id: u32,
}

impl LinkStreams {
    /// Registers a new stream and returns the open message for the device.
    pub fn open(&mut self, request: StreamRequest) -> Option<Message> {
        self.next_id = self.next_id.wrapping_add(1).max(1);
        while self.streams.contains_key(&self.next_id) {
            self.next_id = self.next_id.wrapping_add(1).max(1);
        }
        let stream = self.next_id;
        let (tx, _) = self.inbox.get_or_insert_with(|| mpsc::channel(INBOX));
        let handle = StreamHandle {
            stream,
            inbox: tx.clone(),
        };
        if request.reply.send(handle).is_err() {
            // The operator task gave up already.
            self.drop_inbox_if_idle();
            return None;
        }
        self.streams.insert(
            stream,
            Open {
                events: request.events,
                device_credit: 0,
                device_may_send: u64::from(request.window),
            },
        );
        Some(Message::StreamOpen(StreamOpen {
            stream,
            kind: request.kind,
            params_json: request.params_json,
            initial_window: request.window,
        }))
    }

    /// Whether any stream is open.
    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// The next command of an operator task, never while no stream is open.
    pub async fn next_command(&mut self) -> (u32, ToDevice) {
        match self.inbox.as_mut() {
            // The link keeps a sender, so the inbox never reports closed.
            Some((_, rx)) => match rx.recv().await {
                Some(command) => command,
                None => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }

    /// Turns an operator task's command into the message for the device, if any.
    pub fn command(&mut self, stream: u32, command: ToDevice) -> Option<Message> {
        let Some(open) = self.streams.get_mut(&stream) else {
            // A stream closed meanwhile; its late commands are moot.
            return None;
        };
        match command {
            ToDevice::Data(data) => {
                let len = data.len() as u64;
                if len > open.device_credit {
                    return Some(self.end(
                        stream,
                        None,
                        Some("input beyond the device's window".into()),
                    ));
                }
                open.device_credit -= len;
                Some(Message::StreamData(StreamData { stream, data }))
            }
            ToDevice::Resize { cols, rows } => {
                Some(Message::StreamResize(StreamResize { stream, cols, rows }))
            }
            ToDevice::Credit(credit) => {
                open.device_may_send = open.device_may_send.saturating_add(u64::from(credit));
                Some(Message::StreamWindow(StreamWindow { stream, credit }))
            }
            ToDevice::Close(reason) => {
                self.streams.remove(&stream);
                self.drop_inbox_if_idle();
                Some(Message::StreamClose(StreamClose {
                    stream,
                    exit_code: None,
                    reason: Some(reason),
                }))
            }
        }
    }

    /// Handles a stream message from the device; returns a message for the device, if any.
    pub fn device_message(&mut self, message: Message) -> Option<Message> {
        match message {
            Message::StreamData(StreamData { stream, data }) => {
                let open = self.streams.get_mut(&stream)?;
                let len = data.len() as u64;
                if len > open.device_may_send {
                    return Some(self.end(
                        stream,
                        None,
                        Some("the device sent beyond its window".into()),
                    ));
                }
                open.device_may_send -= len;
                match open.events.try_send(FromDevice::Data(data)) {
                    Ok(()) => None,
                    Err(mpsc::error::TrySendError::Full(_)) => Some(self.end(
                        stream,
                        None,
                        Some("the operator's connection stalled".into()),
                    )),
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        Some(self.end(stream, None, Some("the operator left".into())))
                    }
                }
            }
            Message::StreamWindow(StreamWindow { stream, credit }) => {
                let open = self.streams.get_mut(&stream)?;
                open.device_credit = open.device_credit.saturating_add(u64::from(credit));
                match open.events.try_send(FromDevice::Credit(credit)) {
                    Ok(()) => None,
                    Err(_) => Some(self.end(stream, None, Some("the operator left".into()))),
                }
            }
            Message::StreamClose(StreamClose {
                stream,
                exit_code,
                reason,
            }) => {
                let open = self.streams.remove(&stream)?;
                let _ = open
                    .events
                    .try_send(FromDevice::Closed { exit_code, reason });
                self.drop_inbox_if_idle();
                None
            }
            // The agent does not open streams towards the server.
            Message::StreamOpen(open) => Some(Message::StreamClose(StreamClose {
                stream: open.stream,
                exit_code: None,
                reason: Some("the server does not accept streams from devices".into()),
            })),
            _ => None,
        }
    }

    /// Ends every stream because the link ends.
    pub fn close_all(&mut self, reason: &str) {
        for (_, open) in self.streams.drain() {
            let _ = open.events.try_send(FromDevice::Closed {
                exit_code: None,
                reason: Some(format!("device link closed: {reason}")),
            });
        }
        self.inbox = None;
    }

    /// Ends a stream on both sides; returns the close for the device.
    fn end(&mut self, stream: u32, exit_code: Option<i32>, reason: Option<String>) -> Message {
        if let Some(open) = self.streams.remove(&stream) {
            let _ = open.events.try_send(FromDevice::Closed {
                exit_code,
                reason: reason.clone(),
            });
        }
        self.drop_inbox_if_idle();
        Message::StreamClose(StreamClose {
            stream,
            exit_code,
            reason,
        })
    }

    fn drop_inbox_if_idle(&mut self) {
        if self.streams.is_empty() {
            self.inbox = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(
        window: u32,
    ) -> (
        StreamRequest,
        mpsc::Receiver<FromDevice>,
        oneshot::Receiver<StreamHandle>,
    ) {
        let (events, events_rx) = mpsc::channel(EVENT_QUEUE);
        let (reply, reply_rx) = oneshot::channel();
        (
            StreamRequest {
                kind: "terminal".into(),
                params_json: "{}".into(),
                window,
                events,
                reply,
            },
            events_rx,
            reply_rx,
        )
    }

    #[tokio::test]
    async fn windows_are_enforced_both_ways() {
        let mut streams = LinkStreams::default();
        let (req, mut events, reply) = request(10);
        let Some(Message::StreamOpen(open)) = streams.open(req) else {
            panic!("no open message");
        };
        let handle = reply.await.expect("handle");
        assert_eq!(handle.stream, open.stream);
        // Input before the device granted any credit is refused.
        let reply = streams.command(open.stream, ToDevice::Data(vec![1]));
        assert!(matches!(reply, Some(Message::StreamClose(_))));
        assert!(matches!(
            events.recv().await,
            Some(FromDevice::Closed { .. })
        ));
        assert!(streams.is_empty());

        let (req, mut events, _reply) = request(10);
        let Some(Message::StreamOpen(open)) = streams.open(req) else {
            panic!("no open message");
        };
        let s = open.stream;
        assert_eq!(
            streams.device_message(Message::StreamWindow(StreamWindow {
                stream: s,
                credit: 4
            })),
            None
        );
        assert_eq!(events.recv().await, Some(FromDevice::Credit(4)));
        assert!(matches!(
            streams.command(s, ToDevice::Data(vec![1, 2, 3, 4])),
            Some(Message::StreamData(_))
        ));
        // Output within the window passes; beyond it closes the stream.
        let data = |n| {
            Message::StreamData(StreamData {
                stream: s,
                data: vec![0; n],
            })
        };
        assert_eq!(streams.device_message(data(10)), None);
        assert_eq!(events.recv().await, Some(FromDevice::Data(vec![0; 10])));
        assert!(matches!(
            streams.device_message(data(1)),
            Some(Message::StreamClose(_))
        ));
        assert!(matches!(
            events.recv().await,
            Some(FromDevice::Closed { .. })
        ));
    }

    #[tokio::test]
    async fn credit_reopens_the_window_and_link_end_reaches_operators() {
        let mut streams = LinkStreams::default();
        let (req, mut events, _reply) = request(4);
        let Some(Message::StreamOpen(open)) = streams.open(req) else {
            panic!("no open message");
        };
        let s = open.stream;
        let data = |n| {
            Message::StreamData(StreamData {
                stream: s,
                data: vec![7; n],
            })
        };
        assert_eq!(streams.device_message(data(4)), None);
        assert_eq!(
            streams.command(s, ToDevice::Credit(4)),
            Some(Message::StreamWindow(StreamWindow {
                stream: s,
                credit: 4
            }))
        );
        assert_eq!(streams.device_message(data(4)), None);
        streams.close_all("heartbeat missed");
        assert_eq!(events.recv().await, Some(FromDevice::Data(vec![7; 4])));
        assert_eq!(events.recv().await, Some(FromDevice::Data(vec![7; 4])));
        match events.recv().await {
            Some(FromDevice::Closed {
                reason: Some(r), ..
            }) => assert!(r.contains("heartbeat missed")),
            other => panic!("unexpected {other:?}"),
        }
        // Unknown streams are ignored, not errors.
        assert_eq!(streams.device_message(data(1)), None);
    }
}
