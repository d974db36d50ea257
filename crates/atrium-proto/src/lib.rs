//! The wire protocol between `atrium-agent` and the `atrium` server.
//!
//! Every WebSocket binary message on the device link carries exactly one [`Frame`]:
//!
//! ```text
//! byte 0      magic 0xA7
//! byte 1      protocol version of the body (1 = this crate's first version)
//! byte 2      message kind (see [`Message::kind`])
//! bytes 3..   postcard encoding of (sequence number, message body)
//! ```
//!
//! The kind byte sits outside the body so a receiver can name a message it does not
//! understand (a newer peer) instead of failing on it. Versions are negotiated once per
//! connection: the agent says which versions it speaks in [`Hello`], the server answers
//! with the one it chose in [`Welcome`], and both sides then only send messages that
//! version knows. Sequence numbers start at 1 and grow by one per direction; a replayed
//! or skipped frame is a protocol error ([`SeqCheck`]).
//!
//! Architecture invariant: this crate does no I/O and knows nothing of TLS, sockets
//! or storage. It is shared by agent and server and must build for small targets.
#![forbid(unsafe_code)]

pub mod enrollment;
pub mod filter;
pub mod flow;
pub mod limits;
pub mod senml;
pub mod twin;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// First byte of every frame.
pub const MAGIC: u8 = 0xA7;
/// The newest protocol version this crate encodes.
pub const PROTOCOL_VERSION: u8 = 1;
/// The oldest protocol version this crate still decodes.
pub const MIN_PROTOCOL_VERSION: u8 = 1;
/// Frames larger than this are refused before decoding (the link also caps its messages).
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;
/// Size of the fixed header before the postcard body.
pub const HEADER_BYTES: usize = 3;

/// Why a frame could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// Fewer bytes than the fixed header.
    #[error("frame truncated: {0} bytes, at least {HEADER_BYTES} needed")]
    Truncated(usize),
    /// The first byte is not [`MAGIC`]: not an Atrium frame.
    #[error("not an Atrium frame (first byte {0:#04x})")]
    BadMagic(u8),
    /// A version outside [`MIN_PROTOCOL_VERSION`]..=[`PROTOCOL_VERSION`].
    #[error(
        "unsupported protocol version {0} (this side speaks {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION})"
    )]
    UnsupportedVersion(u8),
    /// A message kind this side does not know (sent by a newer peer).
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// The frame exceeds [`MAX_FRAME_BYTES`].
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_BYTES}")]
    TooLarge(usize),
    /// The body does not decode as the message its kind byte names.
    #[error("malformed {kind} body: {detail}")]
    Malformed {
        /// Name of the message kind.
        kind: &'static str,
        /// What the decoder found wrong.
        detail: String,
    },
    /// Bytes left over after the body: a frame carries exactly one message.
    #[error("{0} trailing bytes after the message body")]
    TrailingBytes(usize),
    /// A sequence number that is not the next one expected.
    #[error(
        "frame sequence {got} where {expected} was expected (replayed, reordered or lost frame)"
    )]
    Sequence {
        /// The sequence number the receiver expected.
        expected: u64,
        /// The sequence number that arrived.
        got: u64,
    },
}

/// One message on the link with its per-direction sequence number.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// Starts at 1 and grows by one for every frame sent in one direction.
    pub seq: u64,
    /// The message itself.
    pub message: Message,
}

/// The first message of a connection, from the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Version of the agent software, e.g. "0.1.0".
    pub agent_version: String,
    /// Oldest protocol version the agent speaks.
    pub min_protocol: u8,
    /// Newest protocol version the agent speaks.
    pub max_protocol: u8,
    /// Optional capabilities the agent offers ("terminal", "twin", ...).
    pub features: Vec<String>,
}

/// The server's answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The protocol version both sides use from now on.
    pub protocol: u8,
    /// The device id the server knows this link as (from its certificate).
    pub device_id: String,
    /// The server's clock, so the agent can report skew.
    pub server_time_ms: i64,
    /// Seconds between heartbeats the server expects.
    pub heartbeat_s: u32,
}

/// One sensor reading as the gateway forwards it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    /// Sensor node that measured it (SenML base name without the trailing separator).
    pub node: String,
    /// What was measured, e.g. "co2", "temperature", "motion".
    pub name: String,
    /// Unix time of the measurement in milliseconds.
    pub time_ms: i64,
    /// The measured value in the quantity's canonical unit.
    pub value: f64,
}

/// A batch of readings taken from the agent's spool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryBatch {
    /// Spool sequence number of the batch; retransmissions reuse it so the server de-duplicates.
    pub batch_seq: u64,
    /// The readings, oldest first.
    pub readings: Vec<Reading>,
}

/// Which half of a twin a document belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TwinSection {
    /// Written by operators and server features.
    Desired,
    /// Written by the agent.
    Reported,
}

/// A twin document (or patch) with its version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TwinDocument {
    /// The section the document belongs to.
    pub section: TwinSection,
    /// Version of the section after this document; only ever grows.
    pub version: u64,
    /// True when `json` is the whole section, false when it is a patch.
    pub full: bool,
    /// JSON text of the document or patch.
    pub json: String,
}

/// A command from the server to the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Id chosen by the server, echoed in the result.
    pub id: u64,
    /// Command name, e.g. "reboot".
    pub name: String,
    /// Arguments as JSON text.
    pub args_json: String,
}

/// The outcome of a [`Command`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandResult {
    /// Id of the command.
    pub id: u64,
    /// Whether it succeeded.
    pub ok: bool,
    /// Output or error text.
    pub output: String,
}

/// Opens a multiplexed byte stream (terminal, file transfer, port forward).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamOpen {
    /// Stream id chosen by the opener; unique among the connection's open streams.
    pub stream: u32,
    /// What the stream is for: "terminal", "file-get", "file-put", "tcp".
    pub kind: String,
    /// Parameters of the stream as JSON text (window size, path, target address...).
    pub params_json: String,
    /// Bytes the opener is ready to receive before the peer must wait for a window update.
    pub initial_window: u32,
}

/// Bytes on an open stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamData {
    /// The stream the bytes belong to.
    pub stream: u32,
    /// The bytes, in order.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// Grants the peer more bytes to send on a stream (flow control).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamWindow {
    /// The stream.
    pub stream: u32,
    /// Additional bytes the peer may send.
    pub credit: u32,
}

/// Closes a stream from either side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamClose {
    /// The stream.
    pub stream: u32,
    /// Exit status of the process behind the stream, where there is one.
    pub exit_code: Option<i32>,
    /// Why the stream closed, where it was not a normal end.
    pub reason: Option<String>,
}

/// New size of the terminal behind a stream (sent by the server to the agent).
///
/// A message of its own, not bytes in [`StreamData`], so the data of a terminal stays a
/// plain, binary-safe byte sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamResize {
    /// The stream.
    pub stream: u32,
    /// Columns.
    pub cols: u16,
    /// Rows.
    pub rows: u16,
}

/// The agent asks for a fresh operational certificate before the current one expires.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RenewRequest {
    /// A CSR signed with the device's identity key (DER).
    #[serde(with = "serde_bytes")]
    pub csr_der: Vec<u8>,
}

/// The renewed certificate chain (leaf first, DER).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RenewResponse {
    /// Leaf certificate followed by the issuing CA.
    pub chain_der: Vec<ByteBuf>,
}

/// An owned byte string that postcard encodes compactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteBuf(#[serde(with = "serde_bytes")] pub Vec<u8>);

/// A problem the peer should know about; the connection may stay open.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorMessage {
    /// A stable code: 400 bad frame, 403 forbidden, 409 conflict, 500 server trouble.
    pub code: u16,
    /// Words an operator can act on.
    pub message: String,
}

/// An update the server asks the device to install (a deployment's offer).
///
/// The server sends it when the device is due (its phase started, the download cap has room)
/// and again on every reconnect while the device has not reported an end; the agent treats a
/// repeated offer of a deployment it already runs or finished as a request for its status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentOffer {
    /// The deployment's id.
    pub deployment: String,
    /// The artifact's id on the server.
    pub artifact_id: String,
    /// The artifact's name (`artifact_provides.artifact_name`).
    pub artifact_name: String,
    /// Size of the artifact file in bytes.
    pub size: u64,
    /// SHA-256 of the whole artifact file, lowercase hex.
    pub sha256: String,
    /// Where to download it: an absolute URL, or a path the agent resolves against its server URL.
    pub url: String,
    /// The attempt this offer starts, from 1; a retry after a failure has a higher number.
    pub attempt: u32,
}

/// Progress or outcome of a deployment on the device.
///
/// `status` is one of `downloading`, `installing`, `rebooting`, `verifying` (running the new
/// software, not yet committed), `success`, `already-installed`, `failure`; the last three end
/// the attempt. Unknown values are stored as reported and shown, never fatal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentStatus {
    /// The deployment's id.
    pub deployment: String,
    /// The attempt (from the offer).
    pub attempt: u32,
    /// The state reached.
    pub status: String,
    /// Artifact bytes received so far.
    pub bytes: u64,
    /// Lines of the install log since the previous status of this attempt (the device's own
    /// log; the server appends them, bounded).
    pub log: Vec<String>,
}

/// The server withdraws a deployment (aborted): an agent that has not started installing drops
/// it and reports `aborted`; one already installing finishes and reports as usual.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentCancel {
    /// The deployment's id.
    pub deployment: String,
}

/// Every message of protocol version 1. New messages are only ever appended, with a new kind byte.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// Agent opens the conversation.
    Hello(Hello),
    /// Server accepts it.
    Welcome(Welcome),
    /// Heartbeat request.
    Ping(u64),
    /// Heartbeat answer with the same nonce.
    Pong(u64),
    /// Inventory attributes of the device (complete set).
    Inventory(BTreeMap<String, String>),
    /// Readings from the agent's spool.
    Telemetry(TelemetryBatch),
    /// The server stored every batch up to and including this `batch_seq` durably.
    TelemetryAck(u64),
    /// The agent asks for the full twin.
    TwinGet,
    /// A twin document or patch, in either direction.
    Twin(TwinDocument),
    /// A command for the agent.
    Command(Command),
    /// The result of a command.
    CommandResult(CommandResult),
    /// Opens a byte stream.
    StreamOpen(StreamOpen),
    /// Bytes on a stream.
    StreamData(StreamData),
    /// Flow-control credit for a stream.
    StreamWindow(StreamWindow),
    /// Closes a stream.
    StreamClose(StreamClose),
    /// The agent asks for a renewed certificate.
    RenewRequest(RenewRequest),
    /// The renewed certificate.
    RenewResponse(RenewResponse),
    /// A reported problem.
    Error(ErrorMessage),
    /// The sender is about to close the connection, and why.
    Goodbye(String),
    /// The terminal behind a stream changed size.
    StreamResize(StreamResize),
    /// The server asks the device to install an update.
    DeploymentOffer(DeploymentOffer),
    /// The device reports a deployment's progress or outcome.
    DeploymentStatus(DeploymentStatus),
    /// The server withdraws a deployment.
    DeploymentCancel(DeploymentCancel),
}

macro_rules! kinds {
    ($( $kind:literal => $variant:ident $( ( $ty:ty ) )? , $name:literal ; )*) => {
        impl Message {
            /// The kind byte of this message.
            pub fn kind(&self) -> u8 {
                match self { $( kinds!(@pat $variant $( $ty )?) => $kind, )* }
            }

            /// A stable name for logs and errors.
            pub fn name(&self) -> &'static str {
                match self { $( kinds!(@pat $variant $( $ty )?) => $name, )* }
            }

            fn encode_body(&self, seq: u64, out: Vec<u8>) -> postcard::Result<Vec<u8>> {
                match self {
                    $( kinds!(@bind body, $variant $( $ty )?) => kinds!(@ser seq, out, body $( , $ty )?), )*
                }
            }

            fn decode_body(kind: u8, body: &[u8]) -> Result<(u64, Message), ProtoError> {
                match kind {
                    $( $kind => kinds!(@de body, $name, $variant $( , $ty )?), )*
                    other => Err(ProtoError::UnknownKind(other)),
                }
            }
        }

        /// Name of a kind byte, where this side knows it.
        pub fn kind_name(kind: u8) -> Option<&'static str> {
            match kind { $( $kind => Some($name), )* _ => None }
        }
    };
    (@pat $variant:ident $ty:ty) => { Message::$variant(_) };
    (@pat $variant:ident) => { Message::$variant };
    (@bind $b:ident, $variant:ident $ty:ty) => { Message::$variant($b) };
    (@bind $b:ident, $variant:ident) => { Message::$variant };
    (@ser $seq:ident, $out:ident, $b:ident, $ty:ty) => { postcard::to_extend(&($seq, $b), $out) };
    (@ser $seq:ident, $out:ident, $b:ident) => { postcard::to_extend(&$seq, $out) };
    (@de $body:ident, $name:literal, $variant:ident, $ty:ty) => {
        finish::<(u64, $ty)>($body, $name).map(|(seq, m)| (seq, Message::$variant(m)))
    };
    (@de $body:ident, $name:literal, $variant:ident) => {
        finish::<u64>($body, $name).map(|seq| (seq, Message::$variant))
    };
}

kinds! {
    1 => Hello(Hello), "hello";
    2 => Welcome(Welcome), "welcome";
    3 => Ping(u64), "ping";
    4 => Pong(u64), "pong";
    5 => Inventory(BTreeMap<String, String>), "inventory";
    6 => Telemetry(TelemetryBatch), "telemetry";
    7 => TelemetryAck(u64), "telemetry-ack";
    8 => TwinGet, "twin-get";
    9 => Twin(TwinDocument), "twin";
    10 => Command(Command), "command";
    11 => CommandResult(CommandResult), "command-result";
    12 => StreamOpen(StreamOpen), "stream-open";
    13 => StreamData(StreamData), "stream-data";
    14 => StreamWindow(StreamWindow), "stream-window";
    15 => StreamClose(StreamClose), "stream-close";
    16 => RenewRequest(RenewRequest), "renew-request";
    17 => RenewResponse(RenewResponse), "renew-response";
    18 => Error(ErrorMessage), "error";
    19 => Goodbye(String), "goodbye";
    20 => StreamResize(StreamResize), "stream-resize";
    21 => DeploymentOffer(DeploymentOffer), "deployment-offer";
    22 => DeploymentStatus(DeploymentStatus), "deployment-status";
    23 => DeploymentCancel(DeploymentCancel), "deployment-cancel";
}

fn finish<'a, T: Deserialize<'a>>(body: &'a [u8], kind: &'static str) -> Result<T, ProtoError> {
    let (value, rest) =
        postcard::take_from_bytes::<T>(body).map_err(|e| ProtoError::Malformed {
            kind,
            detail: e.to_string(),
        })?;
    if rest.is_empty() {
        Ok(value)
    } else {
        Err(ProtoError::TrailingBytes(rest.len()))
    }
}

impl Frame {
    /// Encodes the frame with the current [`PROTOCOL_VERSION`].
    pub fn encode(&self) -> Vec<u8> {
        let out = vec![MAGIC, PROTOCOL_VERSION, self.message.kind()];
        // Serialising owned, well-formed values into a Vec cannot fail: postcard only
        // errors on unsupported serde features or a full fixed buffer, neither of which applies.
        match self.message.encode_body(self.seq, out) {
            Ok(bytes) => bytes,
            Err(e) => unreachable!("postcard cannot fail on Vec output: {e}"),
        }
    }

    /// Decodes one frame, checking magic, version, kind and size.
    pub fn decode(bytes: &[u8]) -> Result<Frame, ProtoError> {
        if bytes.len() > MAX_FRAME_BYTES {
            return Err(ProtoError::TooLarge(bytes.len()));
        }
        let [magic, version, kind, body @ ..] = bytes else {
            return Err(ProtoError::Truncated(bytes.len()));
        };
        if *magic != MAGIC {
            return Err(ProtoError::BadMagic(*magic));
        }
        if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(version) {
            return Err(ProtoError::UnsupportedVersion(*version));
        }
        let (seq, message) = Message::decode_body(*kind, body)?;
        Ok(Frame { seq, message })
    }
}

/// Chooses the protocol version for a connection, or `None` when the ranges do not overlap.
pub fn negotiate(hello: &Hello) -> Option<u8> {
    let high = hello.max_protocol.min(PROTOCOL_VERSION);
    (high >= hello.min_protocol.max(MIN_PROTOCOL_VERSION)).then_some(high)
}

/// Checks that frames arrive with consecutive sequence numbers starting at 1.
#[derive(Debug, Default, Clone)]
pub struct SeqCheck {
    last: u64,
}

impl SeqCheck {
    /// Accepts `seq` if it is the next one, else reports a replayed, reordered or lost frame.
    pub fn check(&mut self, seq: u64) -> Result<(), ProtoError> {
        let expected = self.last.wrapping_add(1);
        if seq == expected {
            self.last = seq;
            Ok(())
        } else {
            Err(ProtoError::Sequence { expected, got: seq })
        }
    }
}

/// Numbers outgoing frames: 1, 2, 3, ...
#[derive(Debug, Default, Clone)]
pub struct SeqCounter {
    last: u64,
}

impl SeqCounter {
    /// Wraps `message` in a frame with the next sequence number and encodes it.
    pub fn encode(&mut self, message: Message) -> Vec<u8> {
        self.last += 1;
        Frame {
            seq: self.last,
            message,
        }
        .encode()
    }
}

#[cfg(test)]
mod tests;
