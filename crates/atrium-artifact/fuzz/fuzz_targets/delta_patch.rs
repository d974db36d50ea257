//! Feeds arbitrary bytes as a delta patch (and a mutated window) to the patch applier against a
//! fixed source image: the target image or an error, never a panic, never more bytes than the
//! meta-data's target size.
#![no_main]

use atrium_artifact::delta::{DELTA_FORMAT, DeltaMeta, apply_patch};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let source: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    let (window, patch) = match data.split_first() {
        Some((w, rest)) => (u32::from(*w % 32), rest),
        None => return,
    };
    let meta = DeltaMeta {
        delta_format: DELTA_FORMAT.into(),
        window_log: window,
        source_size: source.len() as u64,
        source_sha256: String::new(),
        target_size: 8192,
        target_sha256: "00".repeat(32),
    };
    let mut out = Vec::new();
    let _ = apply_patch(&source, &mut &patch[..], &meta, &mut out);
    assert!(out.len() <= 8192);
});
