//! Scores the rooms engine on a published data set:
//! `cargo run -p atrium-rooms --release --example eval -- --format uci-occupancy [--train TRAIN] --test TEST`

use std::process::ExitCode;

use atrium_rooms::eval::{DatasetFormat, evaluate};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let (Some(format), Some(test)) = (get("--format"), get("--test")) else {
        eprintln!(
            "usage: eval --format uci-occupancy|room-occupancy-estimation|b4b [--train FILE] --test FILE"
        );
        return ExitCode::from(2);
    };
    let run = || -> Result<String, String> {
        let format: DatasetFormat = format.parse().map_err(|e| format!("{e}"))?;
        let train = match get("--train") {
            Some(p) => Some(std::fs::read_to_string(&p).map_err(|e| format!("{p}: {e}"))?),
            None => None,
        };
        let test = std::fs::read_to_string(&test).map_err(|e| format!("{test}: {e}"))?;
        evaluate(format, train.as_deref(), &test)
            .map(|r| r.to_string())
            .map_err(|e| e.to_string())
    };
    match run() {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
