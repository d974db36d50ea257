//! Feeds arbitrary bytes to the twin parser and, when two documents parse, merges one into
//! the other: errors are fine, panics are not; a kept section always satisfies the limits and
//! replacing with a merged document reproduces it.
#![no_main]

use atrium_proto::twin::{Section, check, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // Split near the middle, at a character boundary.
    let mut mid = text.len() / 2;
    while !text.is_char_boundary(mid) {
        mid -= 1;
    }
    let (first, second) = text.split_at(mid);
    let (Ok(a), Ok(b)) = (parse(first), parse(second)) else {
        let _ = parse(text);
        return;
    };
    let mut section = Section::default();
    if section.apply_patch(&a, 1).is_err() {
        return;
    }
    let before = section.clone();
    match section.apply_patch(&b, 2) {
        Ok(_) => {
            check(&section.doc).expect("a kept section is within the limits");
            let mut replaced = before;
            replaced.replace(section.doc.clone(), 2).expect("a valid document replaces");
            assert_eq!(replaced.doc, section.doc);
        }
        Err(_) => assert_eq!(section, before, "a refused patch changes nothing"),
    }
});
