//! Feeds arbitrary bytes to the artifact reader: it must return an artifact or an error, never
//! panic, and never hand a payload file to the sink unless the manifest lists it.
#![no_main]

use std::io::Read;

use atrium_artifact::{BoxError, PayloadFile, PayloadSink, ReadOptions};
use libfuzzer_sys::fuzz_target;

struct Check {
    header_seen: bool,
}

impl PayloadSink for Check {
    fn header(&mut self, header: &atrium_artifact::Header) -> Result<(), BoxError> {
        assert_eq!(header.format_version, 3);
        self.header_seen = true;
        Ok(())
    }

    fn file(&mut self, file: &PayloadFile, data: &mut dyn Read) -> Result<(), BoxError> {
        assert!(self.header_seen, "a payload file before the header");
        assert!(!file.name.contains('/'));
        // Read only part of it: the reader must read and check the rest itself.
        let mut head = [0u8; 64];
        let _ = data.read(&mut head)?;
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut sink = Check { header_seen: false };
    if let Ok(artifact) = atrium_artifact::read(data, &ReadOptions::default(), &mut sink) {
        for file in &artifact.files {
            let key = format!("data/{:04}/{}", file.payload, file.name);
            assert!(artifact.header.manifest.get(&key).is_some());
        }
    }
});
