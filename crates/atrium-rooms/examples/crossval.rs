//! Leave-one-day-out cross-validation on one data file: for every day, calibrate on the
//! other days and score that day; prints per-day and pooled figures.
//! `cargo run -p atrium-rooms --release --example crossval -- --format F --file FILE [--block-hours H]`
//! (`--block-hours 6` holds out quarter days instead of whole days).

use std::process::ExitCode;

use atrium_rooms::eval::{DatasetFormat, Tally, crossval_blocks};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let (Some(format), Some(file)) = (get("--format"), get("--file")) else {
        eprintln!(
            "usage: crossval --format uci-occupancy|room-occupancy-estimation|b4b --file FILE"
        );
        return ExitCode::from(2);
    };
    let run = || -> Result<(), String> {
        let format: DatasetFormat = format.parse().map_err(|e| format!("{e}"))?;
        let text = std::fs::read_to_string(&file).map_err(|e| format!("{file}: {e}"))?;
        let hours: u32 = match get("--block-hours") {
            Some(h) => h
                .parse()
                .map_err(|_| format!("--block-hours: not a number: {h}"))?,
            None => 24,
        };
        let folds = crossval_blocks(format, &text, hours).map_err(|e| e.to_string())?;
        let mut pooled = Tally::default();
        for f in &folds {
            let line = f.tally.report().to_string().replace('\n', "  ");
            println!("# held out {}: {}", f.day, line.trim_end());
            pooled.add(&f.tally);
        }
        println!("# pooled over {} folds", folds.len());
        print!("{}", pooled.report());
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
