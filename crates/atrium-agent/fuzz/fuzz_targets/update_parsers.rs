//! The update installer's parsers of outside text: state script names, bootloader environment
//! listings, kernel command lines, HTTP Content-Range answers, and the persisted state files.
#![no_main]

use atrium_agent::update::{builtin, fetch, scripts, state};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = scripts::parse_name(text);
        let _ = builtin::parse_env(text);
        let _ = builtin::root_from_cmdline(text);
        let _ = builtin::part_number(std::path::Path::new(text));
        let _ = fetch::content_range_start(text);
    }
    let _ = serde_json::from_slice::<state::UpdateState>(data);
    let _ = serde_json::from_slice::<state::Provides>(data);
});
