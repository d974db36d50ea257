//! Feeds arbitrary bytes to the enrollment request parser (JSON shape and identity checks).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = atrium_proto::enrollment::EnrollmentRequest::parse(data);
});
