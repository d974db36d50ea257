//! Feeds arbitrary text to the device filter parser: errors are fine, panics are not; a filter
//! that parses prints to text that parses back to the same filter, and evaluating it against
//! a device with a few attributes terminates.
#![no_main]

use atrium_proto::filter::{Attr, Attributes, parse};
use libfuzzer_sys::fuzz_target;

struct Device;

impl Attributes for Device {
    fn attribute(&self, attr: &Attr) -> Option<&str> {
        match attr {
            Attr::Tag(name) if name == "floor" => Some("3"),
            Attr::Field(name) if name == "os" => Some("Debian GNU/Linux 12"),
            Attr::Field(name) if name == "memory_total_kb" => Some("8000000"),
            _ => None,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(filter) = parse(text) else { return };
    let printed = filter.to_string();
    assert_eq!(parse(&printed).as_ref(), Ok(&filter), "{printed}");
    let _ = filter.matches(&Device);
});
