//! Atrium's rooms science: which rooms are occupied, by how many, and whether they need
//! fresh air, from whatever sensors a room has.
//!
//! Architecture invariant: pure and deterministic. No I/O, never reads the clock (time
//! arrives with every [`Reading`]), no randomness but the seeded simulator. The same
//! readings always give the same [`RoomState`] and [`Event`]s, on the gateway and the
//! server alike.
//!
//! API boundary: [`RoomEngine`] (one per room) with [`RoomConfig`], [`Reading`] in,
//! [`RoomState`] and [`Event`] out; [`Calibration`] learnt from [`LabelledSample`]s;
//! [`eval`] and [`sim`] for checking it against real and simulated rooms.
#![forbid(unsafe_code)]

mod calibration;
mod co2;
mod config;
mod engine;
pub mod eval;
pub mod physics;
mod reading;
pub mod sim;

pub use calibration::{Calibration, ChannelReading, LabelledSample};
pub use config::{Level, RoomConfig, ThresholdProfile};
pub use engine::{Event, Events, Outcome, RoomEngine, RoomState};
pub use reading::{MAX_CHANNELS, Reading, RejectReason, SensorKind, check_value};
