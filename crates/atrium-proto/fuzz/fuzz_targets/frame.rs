//! Feeds arbitrary bytes to the link's frame decoder: it must return a value or an error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = atrium_proto::Frame::decode(data) {
        // Whatever decodes must encode again to something that decodes to the same frame.
        let again = atrium_proto::Frame::decode(&frame.encode()).expect("re-encoded frame decodes");
        assert_eq!(again.encode(), frame.encode());
    }
});
