//! Replays published occupancy data sets through the engine, exactly as live data would
//! flow (row by row, state read after each row), and scores it.
//!
//! The parsers take file contents, not paths: this crate does no I/O.

use std::fmt;
use std::str::FromStr;

use crate::calibration::{Calibration, ChannelReading, LabelledSample};
use crate::config::RoomConfig;
use crate::engine::{Outcome, RoomEngine};
use crate::reading::{Reading, SensorKind};

const DAY_MS: i64 = 86_400_000;

/// The data sets the evaluation understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetFormat {
    /// UCI "Occupancy Detection" (Candanedo & Feldheim 2016), 1-minute rows.
    UciOccupancy,
    /// UCI "Room Occupancy Estimation" (Singh et al. 2018), 30-second rows with counts.
    RoomOccupancyEstimation,
}

impl FromStr for DatasetFormat {
    type Err = EvalError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "uci-occupancy" => Ok(DatasetFormat::UciOccupancy),
            "room-occupancy-estimation" => Ok(DatasetFormat::RoomOccupancyEstimation),
            other => Err(EvalError::UnknownFormat(other.to_string())),
        }
    }
}

impl DatasetFormat {
    /// The room the data set was measured in, as far as its paper tells.
    pub fn room_config(self) -> RoomConfig {
        match self {
            // An ordinary single office; the paper gives no volume.
            DatasetFormat::UciOccupancy => RoomConfig {
                volume_m3: 50.0,
                capacity: 4,
                ..RoomConfig::default()
            },
            // 6 m x 4.6 m, ceiling height assumed 2.8 m.
            DatasetFormat::RoomOccupancyEstimation => RoomConfig {
                volume_m3: 77.0,
                capacity: 4,
                ..RoomConfig::default()
            },
        }
    }
}

/// Why a data set could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EvalError {
    /// The format name is not one of `uci-occupancy`, `room-occupancy-estimation`.
    #[error("unknown data set format {0:?} (expected uci-occupancy or room-occupancy-estimation)")]
    UnknownFormat(String),
    /// The input has no header line.
    #[error("the input is empty")]
    Empty,
    /// The header does not name the expected columns.
    #[error("line {line}: header does not match: expected {expected}")]
    Header {
        /// 1-based line number.
        line: usize,
        /// The expected header.
        expected: &'static str,
    },
    /// A row has the wrong number of fields.
    #[error("line {line}: expected {expected} fields, found {found}")]
    FieldCount {
        /// 1-based line number.
        line: usize,
        /// Fields a row must have.
        expected: &'static str,
        /// Fields it has.
        found: usize,
    },
    /// A field cannot be parsed.
    #[error("line {line}: column {column}: cannot parse {value:?}")]
    Field {
        /// 1-based line number.
        line: usize,
        /// Column name.
        column: &'static str,
        /// The offending text (truncated).
        value: String,
    },
    /// There are no data rows.
    #[error("no data rows")]
    NoRows,
}

/// One labelled row of a data set.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// 1-based line in the input.
    pub line: usize,
    /// Row time, unix ms (the data sets' local time read as UTC).
    pub time_ms: i64,
    /// The row's readings.
    pub readings: Vec<ChannelReading>,
    /// Whether the room was occupied.
    pub occupied: bool,
    /// People present, if the data set counts them.
    pub people: Option<u32>,
}

const UCI_HEADER: [&str; 7] = [
    "date",
    "Temperature",
    "Humidity",
    "Light",
    "CO2",
    "HumidityRatio",
    "Occupancy",
];
const ROOM_HEADER: [&str; 19] = [
    "Date",
    "Time",
    "S1_Temp",
    "S2_Temp",
    "S3_Temp",
    "S4_Temp",
    "S1_Light",
    "S2_Light",
    "S3_Light",
    "S4_Light",
    "S1_Sound",
    "S2_Sound",
    "S3_Sound",
    "S4_Sound",
    "S5_CO2",
    "S5_CO2_Slope",
    "S6_PIR",
    "S7_PIR",
    "Room_Occupancy_Count",
];

fn unquote(s: &str) -> &str {
    let s = s.trim();
    s.strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .unwrap_or(s)
}

fn field_err(line: usize, column: &'static str, value: &str) -> EvalError {
    EvalError::Field {
        line,
        column,
        value: value.chars().take(40).collect(),
    }
}

fn num(line: usize, column: &'static str, s: &str) -> Result<f64, EvalError> {
    unquote(s)
        .parse::<f64>()
        .map_err(|_| field_err(line, column, s))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses `YYYY-MM-DD` or `YYYY/MM/DD` and `HH:MM:SS` into unix ms.
fn parse_datetime(
    line: usize,
    column: &'static str,
    date: &str,
    time: &str,
) -> Result<i64, EvalError> {
    let err = || field_err(line, column, &format!("{date} {time}"));
    let dp: Vec<&str> = date.split(['-', '/']).collect();
    let tp: Vec<&str> = time.split(':').collect();
    if dp.len() != 3 || tp.len() != 3 {
        return Err(err());
    }
    let int = |s: &str| s.trim().parse::<i64>().map_err(|_| err());
    let (y, mo, d) = (int(dp[0])?, int(dp[1])?, int(dp[2])?);
    let (h, mi) = (int(tp[0])?, int(tp[1])?);
    let s = tp[2].trim().parse::<f64>().map_err(|_| err())?;
    let ok = (1..=12).contains(&mo)
        && (1..=31).contains(&d)
        && (0..24).contains(&h)
        && (0..60).contains(&mi)
        && (0.0..61.0).contains(&s)
        && (1900..=9999).contains(&y);
    if !ok {
        return Err(err());
    }
    let day = days_from_civil(y, mo, d);
    Ok(((day * 24 + h) * 60 + mi) * 60_000 + (s * 1000.0).round() as i64)
}

fn reading(channel: u8, time_ms: i64, sensor: SensorKind, value: f64) -> ChannelReading {
    ChannelReading {
        channel,
        reading: Reading::new(time_ms, sensor, value),
    }
}

/// Parses a whole data set into labelled rows.
pub fn parse(format: DatasetFormat, text: &str) -> Result<Vec<Row>, EvalError> {
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let (hline, header) = lines.next().ok_or(EvalError::Empty)?;
    let names: Vec<&str> = header.split(',').map(unquote).collect();
    let mut rows = Vec::new();
    match format {
        DatasetFormat::UciOccupancy => {
            // The published files name 7 columns but carry a quoted row id first.
            let named = names
                .iter()
                .copied()
                .filter(|n| !n.is_empty())
                .collect::<Vec<_>>();
            let named = if named.len() == 8 {
                &named[1..]
            } else {
                &named[..]
            };
            if named != UCI_HEADER {
                return Err(EvalError::Header {
                    line: hline + 1,
                    expected: "date,Temperature,Humidity,Light,CO2,HumidityRatio,Occupancy",
                });
            }
            for (i, l) in lines {
                let line = i + 1;
                let f: Vec<&str> = l.split(',').collect();
                let f = match f.len() {
                    8 => &f[1..],
                    7 => &f[..],
                    n => {
                        return Err(EvalError::FieldCount {
                            line,
                            expected: "8 (or 7 without row id)",
                            found: n,
                        });
                    }
                };
                let dt = unquote(f[0]);
                let (date, time) = dt
                    .split_once(' ')
                    .ok_or_else(|| field_err(line, "date", dt))?;
                let t = parse_datetime(line, "date", date, time)?;
                let occ = num(line, "Occupancy", f[6])?;
                if occ != 0.0 && occ != 1.0 {
                    return Err(field_err(line, "Occupancy", f[6]));
                }
                rows.push(Row {
                    line,
                    time_ms: t,
                    readings: vec![
                        reading(
                            0,
                            t,
                            SensorKind::Temperature,
                            num(line, "Temperature", f[1])?,
                        ),
                        reading(0, t, SensorKind::Humidity, num(line, "Humidity", f[2])?),
                        reading(0, t, SensorKind::Light, num(line, "Light", f[3])?),
                        reading(0, t, SensorKind::Co2, num(line, "CO2", f[4])?),
                    ],
                    occupied: occ == 1.0,
                    people: None,
                });
            }
        }
        DatasetFormat::RoomOccupancyEstimation => {
            if names != ROOM_HEADER {
                return Err(EvalError::Header {
                    line: hline + 1,
                    expected: "Date,Time,S1_Temp..S4_Temp,S1_Light..S4_Light,S1_Sound..S4_Sound,S5_CO2,S5_CO2_Slope,S6_PIR,S7_PIR,Room_Occupancy_Count",
                });
            }
            for (i, l) in lines {
                let line = i + 1;
                let f: Vec<&str> = l.split(',').collect();
                if f.len() != ROOM_HEADER.len() {
                    return Err(EvalError::FieldCount {
                        line,
                        expected: "19",
                        found: f.len(),
                    });
                }
                let t = parse_datetime(line, "Date/Time", unquote(f[0]), unquote(f[1]))?;
                let mut readings = Vec::with_capacity(15);
                for c in 0..4u8 {
                    let k = usize::from(c);
                    readings.push(reading(
                        c,
                        t,
                        SensorKind::Temperature,
                        num(line, ROOM_HEADER[2 + k], f[2 + k])?,
                    ));
                    readings.push(reading(
                        c,
                        t,
                        SensorKind::Light,
                        num(line, ROOM_HEADER[6 + k], f[6 + k])?,
                    ));
                    readings.push(reading(
                        c,
                        t,
                        SensorKind::Sound,
                        num(line, ROOM_HEADER[10 + k], f[10 + k])?,
                    ));
                }
                readings.push(reading(0, t, SensorKind::Co2, num(line, "S5_CO2", f[14])?));
                readings.push(reading(
                    0,
                    t,
                    SensorKind::Motion,
                    num(line, "S6_PIR", f[16])?,
                ));
                readings.push(reading(
                    1,
                    t,
                    SensorKind::Motion,
                    num(line, "S7_PIR", f[17])?,
                ));
                let count = num(line, "Room_Occupancy_Count", f[18])?;
                if !(0.0..=1000.0).contains(&count) || count.fract() != 0.0 {
                    return Err(field_err(line, "Room_Occupancy_Count", f[18]));
                }
                let people = count as u32;
                rows.push(Row {
                    line,
                    time_ms: t,
                    readings,
                    occupied: people > 0,
                    people: Some(people),
                });
            }
        }
    }
    if rows.is_empty() {
        return Err(EvalError::NoRows);
    }
    Ok(rows)
}

/// Scores of one replay, rendered as `name: value` lines.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EvalReport {
    /// (name, value, decimals) in display order.
    pub metrics: Vec<(String, f64, usize)>,
}

impl EvalReport {
    /// The value of a metric by name.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.metrics.iter().find(|m| m.0 == name).map(|m| m.1)
    }

    fn push(&mut self, name: &str, value: f64, decimals: usize) {
        self.metrics.push((name.to_string(), value, decimals));
    }
}

impl fmt::Display for EvalReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, value, decimals) in &self.metrics {
            writeln!(f, "{name}: {value:.decimals$}")?;
        }
        Ok(())
    }
}

/// Tallies of a replay, summable over folds.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Tally {
    /// Rows scored.
    pub rows: u64,
    /// Rows whose occupied/free was right.
    pub correct: u64,
    /// Rows with a people label.
    pub counted: u64,
    /// Rows whose rounded people estimate equals the label.
    pub count_exact: u64,
    /// Sum of absolute people errors.
    pub count_abs_err: f64,
    /// Readings the engine rejected.
    pub rejected: u64,
}

impl Tally {
    /// Adds another fold's tallies.
    pub fn add(&mut self, o: &Tally) {
        self.rows += o.rows;
        self.correct += o.correct;
        self.counted += o.counted;
        self.count_exact += o.count_exact;
        self.count_abs_err += o.count_abs_err;
        self.rejected += o.rejected;
    }

    /// The report lines for these tallies.
    pub fn report(&self) -> EvalReport {
        let mut r = EvalReport::default();
        let n = self.rows.max(1) as f64;
        r.push("accuracy", self.correct as f64 / n, 4);
        if self.counted > 0 {
            let c = self.counted as f64;
            r.push("count_exact", self.count_exact as f64 / c, 4);
            r.push("count_mae", self.count_abs_err / c, 4);
        }
        r.push("rows", self.rows as f64, 0);
        r.push("rejected_readings", self.rejected as f64, 0);
        r
    }
}

/// Turns rows into calibration samples.
pub fn samples(rows: &[Row]) -> Vec<LabelledSample> {
    rows.iter()
        .map(|r| LabelledSample {
            readings: r.readings.clone(),
            occupied: r.occupied,
            people: r.people,
        })
        .collect()
}

/// Calibrates on `train`, replays `test` through a fresh engine and tallies the scores.
pub fn replay(format: DatasetFormat, train: &[Row], test: &[Row]) -> Tally {
    let mut config = format.room_config();
    config.calibration = Some(Calibration::fit_for(&config, &samples(train)));
    let mut engine = RoomEngine::new(config);
    let mut t = Tally::default();
    for row in test {
        for r in &row.readings {
            if let Outcome::Rejected(_) = engine.ingest_channel(r.channel, &r.reading) {
                t.rejected += 1;
            }
        }
        let s = engine.state();
        t.rows += 1;
        t.correct += u64::from(s.occupied == row.occupied);
        if let Some(n) = row.people {
            t.counted += 1;
            t.count_exact += u64::from(s.people_count == n);
            t.count_abs_err += (f64::from(s.people_count) - f64::from(n)).abs();
        }
    }
    t
}

/// Calibrates on the `train` file contents and scores the `test` file contents.
pub fn evaluate(format: DatasetFormat, train: &str, test: &str) -> Result<EvalReport, EvalError> {
    let train = parse(format, train)?;
    let test = parse(format, test)?;
    Ok(replay(format, &train, &test).report())
}

/// One fold of a leave-one-day-out cross-validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Fold {
    /// The held-out day, `YYYY-MM-DD`.
    pub day: String,
    /// Its scores.
    pub tally: Tally,
}

fn day_name(day: i64) -> String {
    // Inverse of days_from_civil.
    let z = day + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Leave-one-day-out: for every day, calibrate on all other days and score that day.
pub fn crossval(format: DatasetFormat, text: &str) -> Result<Vec<Fold>, EvalError> {
    crossval_blocks(format, text, 24)
}

/// Leave-one-block-out over blocks of `block_hours` (dividing 24): for every block with
/// rows, calibrate on all other rows and score the block.
pub fn crossval_blocks(
    format: DatasetFormat,
    text: &str,
    block_hours: u32,
) -> Result<Vec<Fold>, EvalError> {
    let rows = parse(format, text)?;
    let block_ms = i64::from(block_hours.clamp(1, 24)) * 3_600_000;
    let block = |r: &Row| r.time_ms.div_euclid(block_ms);
    let mut blocks: Vec<i64> = rows.iter().map(block).collect();
    blocks.sort_unstable();
    blocks.dedup();
    Ok(blocks
        .into_iter()
        .map(|b| {
            let (test, train): (Vec<Row>, Vec<Row>) =
                rows.iter().cloned().partition(|r| block(r) == b);
            let start = b * block_ms;
            let hour = start.rem_euclid(DAY_MS) / 3_600_000;
            Fold {
                day: if block_ms == DAY_MS {
                    day_name(start.div_euclid(DAY_MS))
                } else {
                    format!(
                        "{} {hour:02}h+{block_hours}h",
                        day_name(start.div_euclid(DAY_MS))
                    )
                },
                tally: replay(format, &train, &test),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UCI: &str = "\"date\",\"Temperature\",\"Humidity\",\"Light\",\"CO2\",\"HumidityRatio\",\"Occupancy\"\n\
\"1\",\"2015-02-04 17:51:00\",23.18,27.272,426,721.25,0.00479298817650529,1\n\
\"2\",\"2015-02-04 17:51:59\",23.15,27.2675,429.5,714,0.00478344094931065,1\n";

    #[test]
    fn parses_uci_rows() {
        let rows = parse(DatasetFormat::UciOccupancy, UCI).expect("parses");
        assert_eq!(rows.len(), 2);
        assert!(rows[0].occupied);
        assert_eq!(rows[1].time_ms - rows[0].time_ms, 59_000);
        assert_eq!(day_name(rows[0].time_ms.div_euclid(DAY_MS)), "2015-02-04");
    }

    #[test]
    fn bad_input_names_the_line() {
        let cases: [(&str, &str); 5] = [
            ("", "empty"),
            ("a,b,c\n1,2,3\n", "line 1: header"),
            (
                "\"date\",\"Temperature\",\"Humidity\",\"Light\",\"CO2\",\"HumidityRatio\",\"Occupancy\"\n\"1\",\"2015-02-04 17:51:00\",23.18\n",
                "line 2: expected 8",
            ),
            (
                "\"date\",\"Temperature\",\"Humidity\",\"Light\",\"CO2\",\"HumidityRatio\",\"Occupancy\"\n\"1\",\"2015-02-04 17:51:00\",x,27,426,721,0.004,1\n",
                "line 2: column Temperature",
            ),
            (
                "\"date\",\"Temperature\",\"Humidity\",\"Light\",\"CO2\",\"HumidityRatio\",\"Occupancy\"\n\"1\",\"2015-13-04 17:51:00\",1,27,426,721,0.004,1\n",
                "line 2: column date",
            ),
        ];
        for (text, want) in cases {
            let err = parse(DatasetFormat::UciOccupancy, text)
                .expect_err(want)
                .to_string();
            assert!(err.contains(want), "{err} !~ {want}");
        }
        let room = "Date,Time\n";
        assert!(parse(DatasetFormat::RoomOccupancyEstimation, room).is_err());
    }

    #[test]
    fn civil_round_trip() {
        for d in [-1000, 0, 16_470, 17_523, 40_000] {
            let name = day_name(d);
            let p: Vec<i64> = name.split('-').filter_map(|x| x.parse().ok()).collect();
            assert_eq!(days_from_civil(p[0], p[1], p[2]), d);
        }
    }

    #[test]
    fn format_names() {
        assert_eq!(
            "uci-occupancy".parse::<DatasetFormat>(),
            Ok(DatasetFormat::UciOccupancy)
        );
        assert!("nope".parse::<DatasetFormat>().is_err());
    }
}
