//! The download path's `Range` header parser: never panics, and a partial range it returns
//! always lies inside the blob.
#![no_main]

use atrium_server::artifacts::{ByteRange, parse_range};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, u64)| {
    let (value, size) = input;
    if let ByteRange::Partial { start, end } = parse_range(value, size) {
        assert!(start <= end && end < size);
    }
});
