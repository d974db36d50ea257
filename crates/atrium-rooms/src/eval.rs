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
    /// Brains4Buildings 2022 (Windesheim, Zwolle): an office's building-management rows
    /// (1-minute CO2, temperature, humidity, presence detector, ventilation valve) with the
    /// people counts of a 3D camera as labels where the camera ran.
    Brains4Buildings,
}

impl FromStr for DatasetFormat {
    type Err = EvalError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "uci-occupancy" => Ok(DatasetFormat::UciOccupancy),
            "room-occupancy-estimation" => Ok(DatasetFormat::RoomOccupancyEstimation),
            "b4b" => Ok(DatasetFormat::Brains4Buildings),
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
            // Both rooms the format covers are 75 m3 (the data set's room metadata); the camera
            // counts up to 12 people in 917810.
            DatasetFormat::Brains4Buildings => RoomConfig {
                volume_m3: B4B_VOLUME_M3,
                capacity: 8,
                ..RoomConfig::default()
            },
        }
    }
}

/// Why a data set could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EvalError {
    /// The format name is not one of `uci-occupancy`, `room-occupancy-estimation`, `b4b`.
    #[error(
        "unknown data set format {0:?} (expected uci-occupancy, room-occupancy-estimation or b4b)"
    )]
    UnknownFormat(String),
    /// A Brains4Buildings file of a room the format does not cover.
    #[error(
        "line {line}: room {room:?} is not one the b4b format covers (999169 and 917810 have \
         1-minute building-management rows with a presence detector)"
    )]
    UnknownRoom {
        /// 1-based line number.
        line: usize,
        /// The room id (truncated).
        room: String,
    },
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
    /// Whether the room was occupied, if the data set says for this row.
    pub occupied: Option<bool>,
    /// People present, if the data set counts them.
    pub people: Option<u32>,
    /// Air changes per hour the mechanical ventilation was set to, if the data set says.
    pub ventilation_ach: Option<f64>,
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

/// A people count: a whole number from 0 to 1000.
fn people_count(line: usize, column: &'static str, s: &str) -> Result<u32, EvalError> {
    let n = num(line, column, s)?;
    if !(0.0..=1000.0).contains(&n) || n.fract() != 0.0 {
        return Err(field_err(line, column, s));
    }
    Ok(n as u32)
}

/// The comma-separated fields of a row that must have exactly `n`.
fn fields<'a>(
    line: usize,
    l: &'a str,
    n: usize,
    expected: &'static str,
) -> Result<Vec<&'a str>, EvalError> {
    let f: Vec<&str> = l.split(',').collect();
    if f.len() != n {
        return Err(EvalError::FieldCount {
            line,
            expected,
            found: f.len(),
        });
    }
    Ok(f)
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
    let header = header.trim_start_matches('\u{feff}');
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
                    occupied: Some(occ == 1.0),
                    people: None,
                    ventilation_ach: None,
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
                let f = fields(line, l, ROOM_HEADER.len(), "19")?;
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
                let people = people_count(line, "Room_Occupancy_Count", f[18])?;
                rows.push(Row {
                    line,
                    time_ms: t,
                    readings,
                    occupied: Some(people > 0),
                    people: Some(people),
                    ventilation_ach: None,
                });
            }
        }
        DatasetFormat::Brains4Buildings => parse_b4b(hline + 1, &names, lines, &mut rows)?,
    }
    if rows.is_empty() {
        return Err(EvalError::NoRows);
    }
    Ok(rows)
}

/// Volume of the Brains4Buildings rooms the format covers (room metadata of the data set).
const B4B_VOLUME_M3: f64 = 75.0;
/// Their ventilation's maximum airflow, m3/h (room metadata of the data set).
const B4B_VENT_MAX_M3_H: f64 = 240.0;
const B4B_ROOMS: [&str; 2] = ["999169", "917810"];
/// The camera reports every 5 minutes; a count describes the room until the next one.
const CAMERA_HOLD_MS: i64 = 5 * 60_000;

/// Parses `2022-10-10T00:00:18+0200` (ISO 8601 with a numeric offset) into unix ms (UTC).
fn parse_iso(line: usize, column: &'static str, s: &str) -> Result<i64, EvalError> {
    let s = s.trim();
    let err = || field_err(line, column, s);
    let (date, rest) = s.split_once('T').ok_or_else(err)?;
    let split = rest.rfind(['+', '-']).ok_or_else(err)?;
    let (time, offset) = rest.split_at(split);
    let local = parse_datetime(line, column, date, time)?;
    let sign = if offset.starts_with('-') { -1 } else { 1 };
    let digits: String = offset[1..].chars().filter(|c| *c != ':').collect();
    if digits.len() != 4 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err());
    }
    let h: i64 = digits[..2].parse().map_err(|_| err())?;
    let m: i64 = digits[2..].parse().map_err(|_| err())?;
    if h > 14 || m > 59 {
        return Err(err());
    }
    Ok(local - sign * (h * 60 + m) * 60_000)
}

/// A Brains4Buildings file: building-management (`bms`) rows become readings, the camera's
/// (`xovis`) counts label them. Rows of the slower CO2 meter and the human observer are not
/// used: the first duplicates the building's CO2 sensor at a tenth of its rate, the second
/// has a handful of rows.
fn parse_b4b<'a>(
    header_line: usize,
    names: &[&str],
    lines: impl Iterator<Item = (usize, &'a str)>,
    rows: &mut Vec<Row>,
) -> Result<(), EvalError> {
    const EXPECTED: &str = "id,source,timestamp,co2__ppm,[occupancy__bool,]occupancy__p,\
                            rel_humidity__0,temp_in__degC,valve_frac__0";
    let col = |n: &str| names.iter().position(|h| *h == n);
    let need = |n: &str| {
        col(n).ok_or(EvalError::Header {
            line: header_line,
            expected: EXPECTED,
        })
    };
    let (c_id, c_source, c_time) = (need("id")?, need("source")?, need("timestamp")?);
    let (c_co2, c_people) = (need("co2__ppm")?, need("occupancy__p")?);
    let (c_rh, c_temp, c_valve) = (
        need("rel_humidity__0")?,
        need("temp_in__degC")?,
        need("valve_frac__0")?,
    );
    let c_pir = col("occupancy__bool");
    // An empty field means "not measured in this row".
    let opt = |line: usize, column: &'static str, f: &str| -> Result<Option<f64>, EvalError> {
        if f.trim().is_empty() {
            Ok(None)
        } else {
            num(line, column, f).map(Some)
        }
    };
    let mut camera: Vec<(i64, u32)> = Vec::new();
    for (i, l) in lines {
        let line = i + 1;
        let f = fields(line, l, names.len(), "as many as the header")?;
        let room = unquote(f[c_id]);
        if !B4B_ROOMS.contains(&room) {
            return Err(EvalError::UnknownRoom {
                line,
                room: room.chars().take(40).collect(),
            });
        }
        let t = parse_iso(line, "timestamp", unquote(f[c_time]))?;
        match unquote(f[c_source]) {
            "bms" => {
                let mut readings = Vec::with_capacity(4);
                let mut add = |sensor, value: Option<f64>| {
                    if let Some(v) = value {
                        readings.push(reading(0, t, sensor, v));
                    }
                };
                add(SensorKind::Co2, opt(line, "co2__ppm", f[c_co2])?);
                add(
                    SensorKind::Temperature,
                    opt(line, "temp_in__degC", f[c_temp])?,
                );
                // A fraction in the file, percent in the engine.
                add(
                    SensorKind::Humidity,
                    opt(line, "rel_humidity__0", f[c_rh])?.map(|h| h * 100.0),
                );
                if let Some(c) = c_pir {
                    add(SensorKind::Motion, opt(line, "occupancy__bool", f[c])?);
                }
                let valve = opt(line, "valve_frac__0", f[c_valve])?;
                if valve.is_some_and(|v| !(0.0..=1.0).contains(&v)) {
                    return Err(field_err(line, "valve_frac__0", f[c_valve]));
                }
                rows.push(Row {
                    line,
                    time_ms: t,
                    readings,
                    occupied: None,
                    people: None,
                    ventilation_ach: valve.map(|v| v * B4B_VENT_MAX_M3_H / B4B_VOLUME_M3),
                });
            }
            "xovis" if !f[c_people].trim().is_empty() => {
                camera.push((t, people_count(line, "occupancy__p", f[c_people])?));
            }
            _ => {}
        }
    }
    // The file lists each source in its own block; replay in time order.
    rows.sort_by_key(|r| r.time_ms);
    camera.sort_by_key(|c| c.0);
    let mut next = 0;
    let mut last: Option<(i64, u32)> = None;
    for row in rows.iter_mut() {
        while next < camera.len() && camera[next].0 <= row.time_ms {
            last = Some(camera[next]);
            next += 1;
        }
        if let Some((_, n)) = last.filter(|(ct, _)| row.time_ms - ct < CAMERA_HOLD_MS) {
            row.people = Some(n);
            row.occupied = Some(n > 0);
        }
    }
    Ok(())
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
    /// Rows scored: those the data set labels occupied or free.
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
    /// Labelled rows scored for the motion sensor alone (data sets with one), from the first
    /// motion on.
    pub motion_rows: u64,
    /// Of those, rows where "motion within the PIR hold time" was right.
    pub motion_correct: u64,
    /// Rows of an occupied room (as the engine saw it) with a CO2 forecast to check.
    pub forecasts: u64,
    /// Sum of absolute errors of the engine's 15-minute CO2 forecast, ppm.
    pub forecast_abs_err: f64,
    /// Sum of absolute errors of persistence (CO2 stays where it is) at the same rows, ppm.
    pub persistence_abs_err: f64,
    /// Rows where the engine saw a free room and the data set gives the ventilation.
    pub free_vent_rows: u64,
    /// Sum of the ventilation's air changes per hour over those rows.
    pub free_vent_ach: f64,
    /// Replays that ended with a learnt air-change rate.
    pub learnt_runs: u64,
    /// Sum of the air-change rates learnt by the end of those replays.
    pub learnt_ach: f64,
    /// Replays summed in `follow_through`.
    pub replays: u64,
    /// Sum of the CO2 trend follow-through learnt by the end of each replay.
    pub follow_through: f64,
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
        self.motion_rows += o.motion_rows;
        self.motion_correct += o.motion_correct;
        self.forecasts += o.forecasts;
        self.forecast_abs_err += o.forecast_abs_err;
        self.persistence_abs_err += o.persistence_abs_err;
        self.free_vent_rows += o.free_vent_rows;
        self.free_vent_ach += o.free_vent_ach;
        self.learnt_runs += o.learnt_runs;
        self.learnt_ach += o.learnt_ach;
        self.replays += o.replays;
        self.follow_through += o.follow_through;
    }

    /// The report lines for these tallies.
    pub fn report(&self) -> EvalReport {
        let mut r = EvalReport::default();
        if self.rows > 0 {
            r.push("accuracy", self.correct as f64 / self.rows as f64, 4);
        }
        if self.counted > 0 {
            let c = self.counted as f64;
            r.push("count_exact", self.count_exact as f64 / c, 4);
            r.push("count_mae", self.count_abs_err / c, 4);
        }
        if self.motion_rows > 0 {
            r.push(
                "motion_only_accuracy",
                self.motion_correct as f64 / self.motion_rows as f64,
                4,
            );
        }
        if self.forecasts > 0 {
            let n = self.forecasts as f64;
            r.push("co2_forecast_15min_mae_ppm", self.forecast_abs_err / n, 1);
            r.push(
                "co2_persistence_15min_mae_ppm",
                self.persistence_abs_err / n,
                1,
            );
            r.push("co2_forecasts", n, 0);
        }
        if self.replays > 0 {
            r.push(
                "co2_follow_through",
                self.follow_through / self.replays as f64,
                2,
            );
        }
        if self.learnt_runs > 0 {
            r.push(
                "air_changes_learnt",
                self.learnt_ach / self.learnt_runs as f64,
                2,
            );
        }
        if self.free_vent_rows > 0 {
            r.push(
                "air_changes_ventilation_free",
                self.free_vent_ach / self.free_vent_rows as f64,
                2,
            );
        }
        r.push("rows", self.rows as f64, 0);
        r.push("rejected_readings", self.rejected as f64, 0);
        r
    }
}

/// Turns the labelled rows into calibration samples.
pub fn samples(rows: &[Row]) -> Vec<LabelledSample> {
    rows.iter()
        .filter_map(|r| {
            Some(LabelledSample {
                readings: r.readings.clone(),
                occupied: r.occupied?,
                people: r.people,
            })
        })
        .collect()
}

/// The forecast horizon the replay checks.
const FORECAST_MIN: f64 = 15.0;
/// The measured CO2 a forecast is checked against is the median of the readings this close
/// to its horizon, so that one noisy reading does not decide.
const TRUTH_HALF_WIDTH_MS: i64 = 2 * 60_000;

/// The CO2 reading of a row (the first CO2 channel), if it has one.
fn row_co2(row: &Row) -> Option<f64> {
    row.readings
        .iter()
        .find(|r| r.reading.sensor == SensorKind::Co2)
        .map(|r| r.reading.value)
}

/// Median CO2 of the rows within [`TRUTH_HALF_WIDTH_MS`] of `t_ms`, starting the search at
/// row `from` (rows are in time order).
fn co2_around(rows: &[Row], from: usize, t_ms: i64) -> Option<f64> {
    let mut near: Vec<f64> = rows[from..]
        .iter()
        .skip_while(|r| r.time_ms < t_ms - TRUTH_HALF_WIDTH_MS)
        .take_while(|r| r.time_ms <= t_ms + TRUTH_HALF_WIDTH_MS)
        .filter_map(row_co2)
        .collect();
    if near.is_empty() {
        return None;
    }
    near.sort_unstable_by(f64::total_cmp);
    Some(near[near.len() / 2])
}

/// Calibrates on `train` (if it has labelled rows; else the engine runs untrained, from
/// physical priors), replays `test` through a fresh engine and tallies the scores.
pub fn replay(format: DatasetFormat, train: &[Row], test: &[Row]) -> Tally {
    let mut config = format.room_config();
    let labelled = samples(train);
    if !labelled.is_empty() {
        config.calibration = Some(Calibration::fit_for(&config, &labelled));
    }
    let hold_ms = (config.pir_hold_s * 1000.0) as i64;
    let mut engine = RoomEngine::new(config);
    let mut t = Tally::default();
    let mut motion_ms: Option<i64> = None;
    // (row, forecast, level then) of the forecasts made in an occupied room.
    let mut forecasts: Vec<(usize, f64, f64)> = Vec::new();
    for (i, row) in test.iter().enumerate() {
        for r in &row.readings {
            match engine.ingest_channel(r.channel, &r.reading) {
                Outcome::Rejected(_) => t.rejected += 1,
                Outcome::Accepted(_) => {
                    if r.reading.sensor == SensorKind::Motion && r.reading.value >= 0.5 {
                        motion_ms = Some(r.reading.time_ms);
                    }
                }
            }
        }
        let s = engine.state();
        if s.occupied
            && let (Some(f), Some(c)) = (engine.co2_forecast_ppm(FORECAST_MIN), s.co2_ppm)
        {
            forecasts.push((i, f, c));
        }
        if !s.occupied
            && let Some(v) = row.ventilation_ach
        {
            t.free_vent_rows += 1;
            t.free_vent_ach += v;
        }
        let Some(occupied) = row.occupied else {
            continue;
        };
        t.rows += 1;
        t.correct += u64::from(s.occupied == occupied);
        if let Some(n) = row.people {
            t.counted += 1;
            t.count_exact += u64::from(s.people_count == n);
            t.count_abs_err += (f64::from(s.people_count) - f64::from(n)).abs();
        }
        if let Some(m) = motion_ms {
            t.motion_rows += 1;
            let moving = row.time_ms.saturating_sub(m) <= hold_ms;
            t.motion_correct += u64::from(moving == occupied);
        }
    }
    if let Some(l) = engine.learnt_air_changes_per_hour() {
        t.learnt_runs += 1;
        t.learnt_ach += l;
    }
    t.replays += 1;
    t.follow_through += engine.co2_follow_through();
    let horizon_ms = (FORECAST_MIN * 60_000.0) as i64;
    for (i, forecast, level) in forecasts {
        if let Some(truth) = co2_around(test, i, test[i].time_ms + horizon_ms) {
            t.forecasts += 1;
            t.forecast_abs_err += (forecast - truth).abs();
            t.persistence_abs_err += (level - truth).abs();
        }
    }
    t
}

/// Calibrates on the `train` file contents (none: untrained) and scores the `test` file
/// contents.
pub fn evaluate(
    format: DatasetFormat,
    train: Option<&str>,
    test: &str,
) -> Result<EvalReport, EvalError> {
    let train = match train {
        Some(text) => parse(format, text)?,
        None => Vec::new(),
    };
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
        assert_eq!(rows[0].occupied, Some(true));
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
        assert_eq!(
            "b4b".parse::<DatasetFormat>(),
            Ok(DatasetFormat::Brains4Buildings)
        );
    }

    const B4B_HEADER: &str = "\u{feff}id,source,timestamp,co2__ppm,door_open__bool,occupancy__bool,\
occupancy__p,rel_humidity__0,temp_in__degC,valve_frac__0,window_open__bool\n";

    #[test]
    fn parses_b4b_rows_in_time_order_with_camera_labels() {
        // The camera block comes after the building's rows, as in the published files; the
        // clocks change from summer time to winter time between the last two rows.
        let text = format!(
            "{B4B_HEADER}\
999169,bms,2022-10-30T02:58:00+0200,480.0,,0,,0.46,22.6,0.2,\n\
999169,bms,2022-10-30T02:59:00+0200,,,1,,0.46,22.6,0.99,\n\
999169,bms,2022-10-30T02:09:00+0100,500.0,,1,,,22.5,,\n\
999169,bms,2022-10-30T02:50:00+0100,500.0,,1,,,22.5,,\n\
999169,CO2-meter-SCD4x,2022-10-30T02:59:00+0200,530.0,,,1,0.5,21.0,,\n\
999169,xovis,2022-10-30T02:55:00+0200,,,,2,,,,\n\
999169,xovis,2022-10-30T02:05:00+0100,,,,0,,,,\n"
        );
        let rows = parse(DatasetFormat::Brains4Buildings, &text).expect("parses");
        assert_eq!(
            rows.len(),
            4,
            "the CO2 meter's and the camera's rows are not readings"
        );
        assert!(rows.windows(2).all(|w| w[0].time_ms < w[1].time_ms));
        assert_eq!(rows[1].time_ms - rows[0].time_ms, 60_000);
        assert_eq!(
            rows[2].time_ms - rows[1].time_ms,
            10 * 60_000,
            "02:09+01 is 03:09+02"
        );
        // Empty fields are readings not taken: no CO2 in the second row, no humidity later.
        let kinds = |r: &Row| {
            r.readings
                .iter()
                .map(|c| c.reading.sensor)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            kinds(&rows[0]),
            [
                SensorKind::Co2,
                SensorKind::Temperature,
                SensorKind::Humidity,
                SensorKind::Motion
            ]
        );
        assert_eq!(
            kinds(&rows[1]),
            [
                SensorKind::Temperature,
                SensorKind::Humidity,
                SensorKind::Motion
            ]
        );
        assert!(
            (rows[0].readings[2].reading.value - 46.0).abs() < 1e-9,
            "percent"
        );
        // A camera count labels the rows of the next 5 minutes.
        assert_eq!(rows[0].people, Some(2));
        assert_eq!(rows[1].people, Some(2));
        assert_eq!(rows[1].occupied, Some(true));
        assert_eq!(rows[2].people, Some(0));
        assert_eq!(rows[3].people, None, "40 minutes after the last count");
        assert_eq!(rows[3].occupied, None);
        // Valve 0.2 of 240 m3/h in 75 m3.
        assert!((rows[0].ventilation_ach.expect("valve") - 0.64).abs() < 1e-9);
        assert_eq!(rows[2].ventilation_ach, None);
    }

    #[test]
    fn bad_b4b_input_names_the_line() {
        let row = |r: &str| format!("{B4B_HEADER}{r}\n");
        let cases = [
            (
                row("925038,bms,2022-10-06T00:00:00+0200,600,,,,0.5,21,1.0,"),
                "line 2: room \"925038\"",
            ),
            (
                row("999169,bms,2022-10-06T00:00:00,600,,0,,0.5,21,0.2,"),
                "line 2: column timestamp",
            ),
            (
                row("999169,bms,2022-10-06T00:00:00+02,600,,0,,0.5,21,0.2,"),
                "line 2: column timestamp",
            ),
            (
                row("999169,bms,2022-10-06T00:00:00+0200,600,,0,,0.5,21,1.5,"),
                "line 2: column valve_frac__0",
            ),
            (
                row("999169,xovis,2022-10-06T00:00:00+0200,,,,1.5,,,,"),
                "line 2: column occupancy__p",
            ),
            (
                row("999169,bms,2022-10-06T00:00:00+0200,600"),
                "line 2: expected as many as the header",
            ),
            (
                "id,source,timestamp\n999169,bms,2022-10-06T00:00:00+0200\n".to_string(),
                "line 1: header",
            ),
        ];
        for (text, want) in cases {
            let err = parse(DatasetFormat::Brains4Buildings, &text)
                .expect_err(want)
                .to_string();
            assert!(err.contains(want), "{err} !~ {want}");
        }
    }

    #[test]
    fn replay_scores_only_labelled_rows_and_checks_forecasts() {
        // Two hours of a steady rise and fall with a presence detector; the camera counts only
        // during the first hour.
        let mut text = B4B_HEADER.to_string();
        for m in 0..120u32 {
            let (co2, pir) = if m < 60 {
                (450.0 + 8.0 * f64::from(m), 1)
            } else {
                (930.0 - 6.0 * f64::from(m - 60), 0)
            };
            let (h, mi) = (10 + m / 60, m % 60);
            text.push_str(&format!(
                "999169,bms,2022-10-10T{h:02}:{mi:02}:00+0200,{co2},,{pir},,0.45,22.0,0.2,\n"
            ));
        }
        for m in (0..60).step_by(5) {
            text.push_str(&format!(
                "999169,xovis,2022-10-10T10:{m:02}:00+0200,,,,3,,,,\n"
            ));
        }
        let rows = parse(DatasetFormat::Brains4Buildings, &text).expect("parses");
        let t = replay(DatasetFormat::Brains4Buildings, &[], &rows);
        assert_eq!(t.rows, 60, "only rows the camera labels are scored");
        assert_eq!(t.counted, 60);
        assert!(t.motion_rows > 0 && t.motion_correct == t.motion_rows);
        assert!(
            t.forecasts > 0,
            "an occupied, rising room has forecasts to check"
        );
        // A steady rise follows through: the trend beats "CO2 stays where it is".
        assert!(t.forecast_abs_err < t.persistence_abs_err, "{t:?}");
        let report = t.report().to_string();
        for line in [
            "accuracy: ",
            "co2_forecast_15min_mae_ppm: ",
            "motion_only_accuracy: ",
        ] {
            assert!(report.contains(line), "{report}");
        }
    }

    mod props {
        use super::super::*;
        use super::B4B_HEADER;
        use proptest::prelude::*;

        proptest! {
            /// Any text is either rows or a clear error, for every format, never a panic.
            #[test]
            fn any_text_parses_or_errs(text in ".{0,400}", pick in 0usize..3) {
                let format = [
                    DatasetFormat::UciOccupancy,
                    DatasetFormat::RoomOccupancyEstimation,
                    DatasetFormat::Brains4Buildings,
                ][pick];
                if let Ok(rows) = parse(format, &text) {
                    prop_assert!(!rows.is_empty());
                }
            }

            /// Mangled rows of a valid b4b file are refused with their line, or read.
            #[test]
            fn b4b_rows_with_junk_fields(junk in "[-+0-9.:TZe, ]{0,20}", field in 0usize..11) {
                let mut f: Vec<String> = "999169,bms,2022-10-10T00:00:18+0200,484.0,,0,,0.46,22.6,0.2,"
                    .split(',')
                    .map(str::to_string)
                    .collect();
                f[field] = junk;
                let text = format!("{B4B_HEADER}{}\n", f.join(","));
                match parse(DatasetFormat::Brains4Buildings, &text) {
                    Ok(rows) => prop_assert!(rows.len() <= 1),
                    // A row of another source is not a reading: the file then has none.
                    Err(EvalError::NoRows) => prop_assert!(field == 1),
                    Err(e) => prop_assert!(e.to_string().starts_with("line 2:"), "{}", e),
                }
            }
        }
    }
}
