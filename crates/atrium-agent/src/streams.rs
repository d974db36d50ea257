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

struct Entry {
    input: mpsc::Sender<Input>,
    /// Input bytes the server may still send (the task's grants minus what arrived).
    server_credit: u64,
    kind: Kind,
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
    sessions: HashMap<u32, Entry>,
    out_tx: mpsc::Sender<Message>,
    out_rx: mpsc::Receiver<Message>,
}

impl Services {
    /// No streams yet.
    pub fn new(files: FilesConfig, forward: PortForwardConfig) -> Services {
        let (out_tx, out_rx) = mpsc::channel(32);
        Services {
            files,
            forward,
            sessions: HashMap::new(),
            out_tx,
            out_rx,
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
        self.sessions.contains_key(&stream)
    }

    /// Number of open streams.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether no stream is open.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// The next message a task wants sent to the server.
    pub async fn outgoing(&mut self) -> Message {
        loop {
            // out_tx lives in self, so the channel never closes while we wait.
            if let Some(message) = self.out_rx.recv().await {
                if let Message::StreamClose(close) = &message {
                    self.sessions.remove(&close.stream);
                }
                if let Message::StreamWindow(w) = &message
                    && let Some(entry) = self.sessions.get_mut(&w.stream)
                {
                    entry.server_credit = entry.server_credit.saturating_add(u64::from(w.credit));
                }
                return message;
            }
        }
    }

    /// Handles a stream message from the server; returns a reply to send at once, if any.
    pub fn handle(&mut self, message: Message) -> Option<Message> {
        match message {
            Message::StreamOpen(open) => self.open(open),
            Message::StreamData(StreamData { stream, data }) => {
                let entry = self.sessions.get_mut(&stream)?;
                let len = data.len() as u64;
                if len > entry.server_credit {
                    return Some(self.fail(stream, "server overran the stream's input window"));
                }
                entry.server_credit -= len;
                self.deliver(stream, Input::Data(data))
            }
            Message::StreamWindow(StreamWindow { stream, credit }) => {
                self.deliver(stream, Input::Window(credit))
            }
            Message::StreamClose(close) => {
                // Dropping the sender ends the task; it answers nothing.
                self.sessions.remove(&close.stream);
                None
            }
            _ => None,
        }
    }

    fn deliver(&mut self, stream: u32, input: Input) -> Option<Message> {
        let entry = self.sessions.get(&stream)?;
        match entry.input.try_send(input) {
            Ok(()) => None,
            Err(mpsc::error::TrySendError::Full(_)) => {
                Some(self.fail(stream, "server overran the stream's input queue"))
            }
            // The task has ended; its close is on its way.
            Err(mpsc::error::TrySendError::Closed(_)) => None,
        }
    }

    fn fail(&mut self, stream: u32, reason: &str) -> Message {
        self.sessions.remove(&stream);
        refuse(stream, reason)
    }

    fn open(&mut self, open: StreamOpen) -> Option<Message> {
        let stream = open.stream;
        if self.sessions.contains_key(&stream) {
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
        let open_now = self.sessions.values().filter(|e| e.kind == kind).count();
        if open_now >= limit {
            return Some(refuse(
                stream,
                &format!("busy: this device allows at most {limit} {what} at a time"),
            ));
        }
        let (input_tx, input_rx) = mpsc::channel(INPUT_QUEUE);
        self.sessions.insert(
            stream,
            Entry {
                input: input_tx,
                // Nothing until the task accepts; its grants pass through `outgoing`.
                server_credit: 0,
                kind,
            },
        );
        let io = StreamIo {
            stream,
            input: input_rx,
            out: self.out_tx.clone(),
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
