//! End-to-end scenarios live in `tests/e2e`; this crate has no library code of its own.
#![forbid(unsafe_code)]
