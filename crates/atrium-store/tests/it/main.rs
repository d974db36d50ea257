//! atrium-store integration tests: one binary (link time on 2 cores), the conformance suite
//! run against both backends, SQLite-only checks and a model-based property test.

// In tests a panic is the failure report; the workspace's unwrap lint guards library code.
#![allow(clippy::unwrap_used)]

mod conformance;
mod lifecycle_model;
mod rooms;
mod sqlite_only;
mod support;
