//! Fuzzes the data-set parsers of `atrium rooms eval` (UCI Occupancy, Room Occupancy
//! Estimation, Brains4Buildings): the first byte picks the format, the rest is the file. What
//! parses is replayed through the engine, which must take it without a panic.
#![no_main]

use atrium_rooms::eval::{DatasetFormat, parse, replay};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let format = match pick % 3 {
        0 => DatasetFormat::UciOccupancy,
        1 => DatasetFormat::RoomOccupancyEstimation,
        _ => DatasetFormat::Brains4Buildings,
    };
    if let Ok(rows) = parse(format, text) {
        assert!(!rows.is_empty());
        // Calibrated on itself and untrained: both paths take any rows that parse.
        let tally = replay(format, &rows, &rows);
        assert!(tally.rows <= rows.len() as u64);
        let _ = replay(format, &[], &rows);
    }
});
