//! The `atrium` command as a library: the REST API client the CLI uses, and the demo (a
//! server with a simulated office), so tests and tools can start the demo themselves, the remote-terminal client, and file copy and port forwarding.
#![forbid(unsafe_code)]

pub mod client;
pub mod demo;
pub mod simscore;
pub mod terminal;
pub mod transfer;
