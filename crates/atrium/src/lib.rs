//! The `atrium` command as a library: the REST API client the CLI uses, and the demo (a
//! server with a simulated office), so tests and tools can start the demo themselves, and the remote-terminal client.
#![forbid(unsafe_code)]

pub mod client;
pub mod demo;
pub mod simscore;
pub mod terminal;
