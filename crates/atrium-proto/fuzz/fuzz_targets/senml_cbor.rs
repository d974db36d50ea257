//! Feeds arbitrary bytes to the SenML CBOR decoder, the format sniffing and the measurement
//! mapping: they must return a value or an error, never panic; whatever decodes must survive a
//! CBOR re-encoding, and its JSON encoding must decode to the same records.
#![no_main]

use atrium_proto::senml::{
    Format, Limits, RELATIVE_TIME_LIMIT_S, decode, decode_cbor, decode_json, encode_cbor,
    encode_json, to_measurement,
};
use libfuzzer_sys::fuzz_target;

const NOW_S: f64 = 1_700_000_000.0;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    let sniffed = decode(data, NOW_S, &limits);
    let Ok(records) = decode_cbor(data, NOW_S, &limits) else { return };
    if Format::of(data) == Format::Cbor {
        assert_eq!(sniffed.as_ref(), Ok(&records));
    }
    for record in &records {
        let _ = to_measurement(record);
    }
    // Times below 2^28 would be read back as relative; re-encodings may outgrow the limit.
    if records.iter().all(|r| r.time_s >= RELATIVE_TIME_LIMIT_S) {
        let unlimited = Limits { max_payload_bytes: usize::MAX, ..limits };
        let again = decode_cbor(&encode_cbor(&records), NOW_S, &unlimited).expect("re-encoded pack decodes");
        assert_eq!(again, records);
        let as_json = decode_json(&encode_json(&records), NOW_S, &unlimited).expect("JSON encoding decodes");
        assert_eq!(as_json, records);
    }
});
