//! Feeds arbitrary text to the parsers of the file-transfer and TCP-forward streams (their
//! parameters come from the server, the allow list from the device owner): a value or an
//! error, never a panic, and whatever parses is within the documented limits.
#![no_main]

use atrium_agent::files::{check_path, parse_get, parse_header, parse_put};
use atrium_agent::forward_tcp::{parse_params, parse_rule};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_header(data);
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok((_, path)) = parse_get(text) {
        assert!(path.is_absolute());
    }
    if let Ok((params, path)) = parse_put(text) {
        assert!(path.file_name().is_some());
        assert_eq!(params.sha256.len(), 64);
        assert!(params.mode.is_none_or(|m| m <= 0o777));
    }
    if let Ok(path) = check_path(text) {
        assert!(!path.components().any(|c| c == std::path::Component::ParentDir));
    }
    if let Ok(params) = parse_params(text) {
        assert!(params.port > 0 && !params.host.is_empty() && params.host.len() <= 253);
    }
    let _ = parse_rule(text);
});
