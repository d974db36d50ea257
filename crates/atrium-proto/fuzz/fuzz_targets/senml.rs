//! Feeds arbitrary bytes to the SenML JSON decoder and the measurement mapping: they must return
//! a value or an error, never panic; whatever decodes must survive an encode/decode round trip.
#![no_main]

use atrium_proto::senml::{Limits, decode_json, encode_json, to_measurement};
use libfuzzer_sys::fuzz_target;

const NOW_S: f64 = 1_700_000_000.0;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    let Ok(records) = decode_json(data, NOW_S, &limits) else { return };
    for record in &records {
        let _ = to_measurement(record);
    }
    // Resolved records re-encode to a pack that decodes to the same records. Times below 2^28
    // would be read back as relative, and the re-encoding may outgrow the payload limit.
    if records.iter().all(|r| r.time_s >= atrium_proto::senml::RELATIVE_TIME_LIMIT_S) {
        let unlimited = Limits { max_payload_bytes: usize::MAX, ..limits };
        let again = decode_json(&encode_json(&records), NOW_S, &unlimited).expect("re-encoded pack decodes");
        assert_eq!(again, records);
    }
});
