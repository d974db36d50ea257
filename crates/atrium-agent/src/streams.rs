//! The stream kinds other than the terminal: file transfer ([`crate::files`], kinds
//! `"file-get"` and `"file-put"`) and TCP forwarding ([`crate::forward_tcp`], kind `"tcp"`).
//!
//! [`Services`] is to these kinds what [`crate::terminal::Terminals`] is to terminals: it
//! accepts or refuses each [`StreamOpen`], hands the stream's messages to the task serving
//! it, and checks the server's input against the credit granted. Each task answers the open
//! itself, once it has checked what it was asked (the file exists and may be read, the target
//! is allowed and reachable): a [`StreamWindow`] is the acceptance, a [`StreamClose`] with a
//! reason the refusal.
//!
//! Flow control is the terminal's: a task sends only within the server's window
//! ([`StreamIo::send`]) and grants input credit back only once it has consumed the bytes, so
//! neither side buffers more than a window per stream.

use std::collections::HashMap;

use atrium_proto::{Message, StreamClose, StreamData, StreamOpen, StreamWindow};
use tokio::sync::mpsc;

use crate::files::FilesConfig;
use crate::forward_tcp::PortForwardConfig;

/// Messages queued from the link to one task before the server is considered to overrun it.
const INPUT_QUEUE: usize = 1024;

/// What the link hands a running stream task.
#[derive(Debug)]
pub enum Input {
    /// Bytes from the server, within the credit the task granted.
    Data(Vec<u8>),
    /// The server accepts this many more bytes.
    Window(u32),
}

/// A stream task's end of its stream.
pub struct StreamIo {
    /// The stream id.
    pub stream: u32,
    /// Input from the server; ends when the server closes the stream or the link goes.
    pub input: mpsc::Receiver<Input>,
    out: mpsc::Sender<Message>,
    /// Bytes the server still accepts.
    pub credit: u64,
}

/// Why a stream task stopped early.
#[derive(Debug)]
pub enum Stop {
    /// The server closed the stream or the link went down: nobody to tell.
    Gone,
}

impl StreamIo {
    /// Accepts the stream, granting the server `window` input bytes.
    pub async fn accept(&self, window: u32) -> Result<(), Stop> {
        self.message(Message::StreamWindow(StreamWindow {
            stream: self.stream,
            credit: window,
        }))
        .await
    }

    /// Grants the server `n` more input bytes.
    pub async fn grant(&self, n: usize) -> Result<(), Stop> {
        if n == 0 {
            return Ok(());
        }
        self.accept(u32::try_from(n).unwrap_or(u32::MAX)).await
    }

    /// Ends the stream with an exit code and a reason.
    pub async fn close(&self, exit_code: Option<i32>, reason: Option<String>) {
        let _ = self
            .message(Message::StreamClose(StreamClose {
                stream: self.stream,
                exit_code,
                reason,
            }))
            .await;
    }

    /// Sends `data`, waiting for the server's credit as needed. Input data arriving meanwhile
    /// is a protocol error for one-way streams and ends the stream.
    pub async fn send(&mut self, mut data: &[u8]) -> Result<(), Stop> {
        while !data.is_empty() {
            while self.credit == 0 {
                match self.input.recv().await {
                    Some(Input::Window(more)) => {
                        self.credit = self.credit.saturating_add(u64::from(more));
                    }
                    Some(Input::Data(_)) | None => return Err(Stop::Gone),
                }
            }
            let n = usize::try_from(self.credit)
                .unwrap_or(usize::MAX)
                .min(data.len());
            let (now, rest) = data.split_at(n);
            self.send_now(now.to_vec()).await?;
            data = rest;
        }
        Ok(())
    }

    /// Sends bytes known to be within the credit.
    pub async fn send_now(&mut self, data: Vec<u8>) -> Result<(), Stop> {
        self.credit = self.credit.saturating_sub(data.len() as u64);
        self.message(Message::StreamData(StreamData {
            stream: self.stream,
            data,
        }))
        .await
    }

    async fn message(&self, message: Message) -> Result<(), Stop> {
        self.out.send(message).await.map_err(|_| Stop::Gone)
    }
}

/// The open streams of one service on one link (the terminals, or the file transfers and
/// forwarded connections): each stream's input queue, the bytes of input the server may still
/// send it, and the channel all their tasks send through. Input beyond a stream's credit or
/// queue ends that stream.
pub(crate) struct StreamTable<I, T> {
    entries: HashMap<u32, TableEntry<I, T>>,
    out_tx: mpsc::Sender<Message>,
    out_rx: mpsc::Receiver<Message>,
    /// What the service calls a stream, for the reasons it gives ("stream", "terminal").
    noun: &'static str,
}

struct TableEntry<I, T> {
    input: mpsc::Sender<I>,
    /// Input bytes the server may still send (the task's grants minus what arrived).
    server_credit: u64,
    tag: T,
}

impl<I, T> StreamTable<I, T> {
    pub(crate) fn new(noun: &'static str) -> Self {
        let (out_tx, out_rx) = mpsc::channel(32);
        Self {
            entries: HashMap::new(),
            out_tx,
            out_rx,
            noun,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn contains(&self, stream: u32) -> bool {
        self.entries.contains_key(&stream)
    }

    /// The tags of the open streams.
    pub(crate) fn tags(&self) -> impl Iterator<Item = &T> {
        self.entries.values().map(|e| &e.tag)
    }

    /// The channel a stream's task sends its messages through.
    pub(crate) fn out(&self) -> mpsc::Sender<Message> {
        self.out_tx.clone()
    }

    /// Opens `stream`: the server may send `server_credit` bytes of input at once, and the
    /// task reads its input from the returned queue.
    pub(crate) fn insert(&mut self, stream: u32, server_credit: u64, tag: T) -> mpsc::Receiver<I> {
        let (input, input_rx) = mpsc::channel(INPUT_QUEUE);
        self.entries.insert(
            stream,
            TableEntry {
                input,
                server_credit,
                tag,
            },
        );
        input_rx
    }

    /// The next message a task wants sent to the server. What a task grants, the server may
    /// send: counted before it leaves. A close forgets the stream.
    pub(crate) async fn outgoing(&mut self) -> Message {
        loop {
            // out_tx lives in self, so the channel never closes while we wait.
            if let Some(message) = self.out_rx.recv().await {
                match &message {
                    Message::StreamClose(close) => {
                        self.entries.remove(&close.stream);
                    }
                    Message::StreamWindow(grant) => {
                        if let Some(entry) = self.entries.get_mut(&grant.stream) {
                            entry.server_credit =
                                entry.server_credit.saturating_add(u64::from(grant.credit));
                        }
                    }
                    _ => {}
                }
                return message;
            }
        }
    }

    /// Input bytes from the server for `stream`, within its credit; the reply to send at once
    /// if the stream ends over it.
    pub(crate) fn data(
        &mut self,
        stream: u32,
        data: Vec<u8>,
        wrap: fn(Vec<u8>) -> I,
    ) -> Option<Message> {
        let entry = self.entries.get_mut(&stream)?;
        let len = data.len() as u64;
        if len > entry.server_credit {
            return Some(self.fail(stream, "input window"));
        }
        entry.server_credit -= len;
        self.deliver(stream, wrap(data))
    }

    /// Hands `input` to the stream's task; the reply to send at once if the stream ends over it.
    pub(crate) fn deliver(&mut self, stream: u32, input: I) -> Option<Message> {
        let entry = self.entries.get(&stream)?;
        match entry.input.try_send(input) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(_)) => Some(self.fail(stream, "input queue")),
            // The task has ended; its close is on its way.
            Err(mpsc::error::TrySendError::Closed(_)) => None,
        }
    }

    /// The server closed `stream`: dropping its queue ends the task, which answers nothing.
    pub(crate) fn remove(&mut self, stream: u32) {
        self.entries.remove(&stream);
    }

    fn fail(&mut self, stream: u32, what: &str) -> Message {
        self.entries.remove(&stream);
        refuse(
            stream,
            &format!("server overran the {}'s {what}", self.noun),
        )
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Files,
    Tcp,
}

/// The file transfers and TCP forwards of one link session. Dropping it ends them all
/// (their tasks see their input end; an unfinished upload leaves no file behind).
pub struct Services {
    files: FilesConfig,
    forward: PortForwardConfig,
    streams: StreamTable<Input, Kind>,
}

impl Services {
    /// No streams yet.
    pub fn new(files: FilesConfig, forward: PortForwardConfig) -> Services {
        Services {
            files,
            forward,
            streams: StreamTable::new("stream"),
        }
    }

    /// Whether `kind` is served here (rather than by the terminal).
    pub fn serves(kind: &str) -> bool {
        matches!(
            kind,
            crate::files::GET | crate::files::PUT | crate::forward_tcp::KIND
        )
    }

    /// Whether stream `stream` is one of ours.
    pub fn owns(&self, stream: u32) -> bool {
        self.streams.contains(stream)
    }

    /// Number of open streams.
    pub fn len(&self) -> usize {
        self.streams.len()
    }

    /// Whether no stream is open.
    pub fn is_empty(&self) -> bool {
        self.streams.len() == 0
    }

    /// The next message a task wants sent to the server.
    pub async fn outgoing(&mut self) -> Message {
        self.streams.outgoing().await
    }

    /// Handles a stream message from the server; returns a reply to send at once, if any.
    pub fn handle(&mut self, message: Message) -> Option<Message> {
        match message {
            Message::StreamOpen(open) => self.open(open),
            Message::StreamData(StreamData { stream, data }) => {
                self.streams.data(stream, data, Input::Data)
            }
            Message::StreamWindow(StreamWindow { stream, credit }) => {
                self.streams.deliver(stream, Input::Window(credit))
            }
            Message::StreamClose(close) => {
                self.streams.remove(close.stream);
                None
            }
            _ => None,
        }
    }

    fn open(&mut self, open: StreamOpen) -> Option<Message> {
        let stream = open.stream;
        if self.streams.contains(stream) {
            return Some(refuse(stream, "stream id already in use"));
        }
        let kind = match open.kind.as_str() {
            crate::files::GET | crate::files::PUT => Kind::Files,
            crate::forward_tcp::KIND => Kind::Tcp,
            other => {
                return Some(refuse(
                    stream,
                    &format!("stream kind {other:?} is not supported by this agent"),
                ));
            }
        };
        let (enabled, limit, what) = match kind {
            Kind::Files => (
                self.files.enabled,
                self.files.max_transfers,
                "file transfers",
            ),
            Kind::Tcp => (
                self.forward.enabled,
                self.forward.max_connections,
                "forwarded connections",
            ),
        };
        if !enabled {
            let reason = match kind {
                Kind::Files => "disabled: file transfer is disabled on this device",
                Kind::Tcp => "disabled: port forwarding is disabled on this device",
            };
            return Some(refuse(stream, reason));
        }
        let open_now = self.streams.tags().filter(|k| **k == kind).count();
        if open_now >= limit {
            return Some(refuse(
                stream,
                &format!("busy: this device allows at most {limit} {what} at a time"),
            ));
        }
        // Nothing until the task accepts; its grants pass through `outgoing`.
        let input = self.streams.insert(stream, 0, kind);
        let io = StreamIo {
            stream,
            input,
            out: self.streams.out(),
            credit: u64::from(open.initial_window),
        };
        match open.kind.as_str() {
            crate::files::GET => {
                tokio::spawn(crate::files::serve_get(
                    self.files.clone(),
                    open.params_json,
                    io,
                ));
            }
            crate::files::PUT => {
                tokio::spawn(crate::files::serve_put(
                    self.files.clone(),
                    open.params_json,
                    io,
                ));
            }
            _ => {
                tokio::spawn(crate::forward_tcp::serve(
                    self.forward.clone(),
                    open.params_json,
                    io,
                ));
            }
        }
        None
    }
}

/// A close that refuses or fails a stream.
pub fn refuse(stream: u32, reason: &str) -> Message {
    Message::StreamClose(StreamClose {
        stream,
        exit_code: None,
        reason: Some(reason.to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(m: Option<Message>) -> Option<String> {
        match m {
            Some(Message::StreamClose(c)) => c.reason,
            other => panic!("expected a close, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn input_flows_within_the_credit_the_task_granted() {
        let mut table: StreamTable<Input, ()> = StreamTable::new("stream");
        let mut input = table.insert(7, 0, ());
        // Nothing granted yet: the first byte is an overrun, and the stream is gone.
        let refused = table.data(7, vec![1], Input::Data);
        assert_eq!(
            reason(refused).as_deref(),
            Some("server overran the stream's input window")
        );
        assert!(!table.contains(7));

        let mut input_b = table.insert(8, 0, ());
        // The task grants 4 bytes; the grant counts once it passes through `outgoing`.
        let out = table.out();
        out.send(Message::StreamWindow(StreamWindow {
            stream: 8,
            credit: 4,
        }))
        .await
        .expect("queued");
        assert!(matches!(table.outgoing().await, Message::StreamWindow(_)));
        assert_eq!(table.data(8, vec![1, 2, 3], Input::Data), None);
        assert!(matches!(input_b.recv().await, Some(Input::Data(d)) if d == [1, 2, 3]));
        assert_eq!(table.data(8, vec![4], Input::Data), None);
        let over = table.data(8, vec![5], Input::Data);
        assert_eq!(
            reason(over).as_deref(),
            Some("server overran the stream's input window")
        );
        // The first stream's task sees its input end.
        assert!(input.recv().await.is_none());
    }

    #[tokio::test]
    async fn a_full_queue_ends_the_stream_and_a_close_forgets_it() {
        let mut table: StreamTable<Input, &str> = StreamTable::new("terminal");
        let _input = table.insert(1, u64::MAX, "a");
        for _ in 0..INPUT_QUEUE {
            assert_eq!(table.deliver(1, Input::Window(1)), None);
        }
        assert_eq!(
            reason(table.deliver(1, Input::Window(1))).as_deref(),
            Some("server overran the terminal's input queue")
        );
        assert_eq!(table.len(), 0);

        // A task that has ended: its input goes nowhere and nothing is answered.
        drop(table.insert(2, 10, "b"));
        assert_eq!(table.data(2, vec![0], Input::Data), None);
        // The task's close passes through `outgoing` and forgets the stream.
        let _input = table.insert(3, 10, "c");
        assert_eq!(table.tags().copied().collect::<Vec<_>>().len(), 2);
        table.out().send(refuse(3, "done")).await.expect("queued");
        assert!(matches!(table.outgoing().await, Message::StreamClose(_)));
        assert!(!table.contains(3));
        table.remove(2);
        assert_eq!(table.len(), 0);
    }
}
