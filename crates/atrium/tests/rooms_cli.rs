//! `atrium rooms eval` as a user runs it on a data set: `name: value` lines on success, with and
//! without a training file, and a non-zero exit naming the line on bad input.

use std::fmt::Write as _;
use std::process::{Command, Output};

fn atrium(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_atrium"))
        .args(args)
        .output()
        .expect("runs atrium")
}

fn stdout_of(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The value of a `name: value` line.
fn metric(report: &str, name: &str) -> f64 {
    report
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(": ")?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{report}"))
}

/// Three hours of an office in the UCI layout: a lamp and rising CO2 while occupied.
fn uci_file() -> String {
    let mut text = String::from(
        "\"date\",\"Temperature\",\"Humidity\",\"Light\",\"CO2\",\"HumidityRatio\",\"Occupancy\"\n",
    );
    for m in 0..180u32 {
        let occupied = (60..120).contains(&m);
        let (light, co2) = if occupied {
            (450.0, 500.0 + 6.0 * f64::from(m - 60))
        } else {
            (0.0, 460.0)
        };
        let _ = writeln!(
            text,
            "\"{}\",\"2015-02-04 {:02}:{:02}:00\",21.0,27.0,{light},{co2},0.0045,{}",
            m + 1,
            9 + m / 60,
            m % 60,
            u8::from(occupied)
        );
    }
    text
}

/// Three hours of a Brains4Buildings office: presence detector and CO2 while a camera counts
/// two people.
fn b4b_file() -> String {
    let mut text = String::from(
        "id,source,timestamp,co2__ppm,door_open__bool,occupancy__bool,occupancy__p,\
         rel_humidity__0,temp_in__degC,valve_frac__0,window_open__bool\n",
    );
    for m in 0..180u32 {
        let occupied = (60..120).contains(&m);
        let co2 = if occupied {
            480.0 + 7.0 * f64::from(m - 60)
        } else {
            480.0
        };
        let _ = writeln!(
            text,
            "999169,bms,2022-10-12T{:02}:{:02}:18+0200,{co2},,{},,0.45,22.0,0.2,",
            9 + m / 60,
            m % 60,
            u8::from(occupied)
        );
    }
    for m in (0..180u32).step_by(5) {
        let n = if (60..120).contains(&m) { 2 } else { 0 };
        let _ = writeln!(
            text,
            "999169,xovis,2022-10-12T{:02}:{:02}:00+0200,,,,{n},,,,",
            9 + m / 60,
            m % 60
        );
    }
    text
}

#[test]
fn eval_prints_scores_with_and_without_training() {
    let dir = tempfile::tempdir().expect("tempdir");
    let uci = dir.path().join("uci.txt");
    let b4b = dir.path().join("999169_raw_properties.csv");
    std::fs::write(&uci, uci_file()).expect("write");
    std::fs::write(&b4b, b4b_file()).expect("write");
    let (uci, b4b) = (uci.to_str().expect("utf-8"), b4b.to_str().expect("utf-8"));

    let trained = stdout_of(&atrium(&[
        "rooms",
        "eval",
        "--format",
        "uci-occupancy",
        "--train",
        uci,
        "--test",
        uci,
    ]));
    assert!(metric(&trained, "accuracy") > 0.9, "{trained}");
    assert_eq!(metric(&trained, "rows"), 180.0);

    let untrained = stdout_of(&atrium(&[
        "rooms", "eval", "--format", "b4b", "--test", b4b,
    ]));
    // The camera labels every row. Motion alone is wrong only for the PIR hold time (5 of
    // the 120 rows since the first motion).
    assert_eq!(metric(&untrained, "rows"), 180.0);
    assert!(metric(&untrained, "accuracy") > 0.9, "{untrained}");
    assert_eq!(metric(&untrained, "motion_only_accuracy"), 0.9583);
    assert!(metric(&untrained, "co2_forecasts") > 0.0);
    assert!(
        metric(&untrained, "co2_forecast_15min_mae_ppm")
            < metric(&untrained, "co2_persistence_15min_mae_ppm"),
        "a steady rise is forecast better than by persistence:\n{untrained}"
    );
    assert!((metric(&untrained, "air_changes_ventilation_free") - 0.64).abs() < 1e-9);
}

#[test]
fn eval_refuses_bad_input_with_the_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let uci = dir.path().join("uci.txt");
    std::fs::write(&uci, uci_file()).expect("write");
    let uci = uci.to_str().expect("utf-8");

    let cases: [(&[&str], &str); 3] = [
        (&["--format", "b4b", "--test", uci], "line 1: header"),
        (
            &["--format", "nope", "--test", uci],
            "unknown data set format",
        ),
        (
            &["--format", "b4b", "--test", "/nonexistent/file.csv"],
            "/nonexistent/file.csv",
        ),
    ];
    for (args, want) in cases {
        let mut all = vec!["rooms", "eval"];
        all.extend_from_slice(args);
        let out = atrium(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err} !~ {want}");
    }
}
