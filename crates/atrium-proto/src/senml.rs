//! SenML (RFC 8428) packs from sensor nodes, JSON or CBOR, and their mapping to Atrium
//! measurements.
//!
//! Sensor nodes publish SenML packs over MQTT; [`decode_json`] and [`decode_cbor`] resolve a
//! pack (§4.6: base name concatenation, base time + relative time, base unit, base value, base
//! sum) into [`Record`]s, and [`to_measurement`] turns one record into a [`Measurement`] the
//! rooms engine understands. [`decode`] picks the representation from the first byte
//! ([`Format::of`]). [`encode_json`] and [`encode_cbor`] write resolved records back out
//! (simulator, tests). Both representations share one resolver, so a pack means the same and
//! is refused for the same reason whichever way it is written; CBOR specifics are in [`cbor`].
//!
//! What the decoders refuse, each with the index of the offending record:
//! - payloads, packs and names above [`Limits`] (defaults 64 KiB, 1000 records, 128 bytes);
//! - `bver` above [`MAX_VERSION`], or not a positive integer;
//! - names that are empty or break RFC 8428 §4.5.1 (first character alphanumeric, then
//!   alphanumeric or `-:./_`);
//! - records with neither a value (`v`, `vs`, `vb`, `vd`) nor a sum, or with two values;
//! - numbers that are not finite, also after adding a base value, sum or time;
//! - fields whose label ends in `_` (RFC 8428 §4.4: must-understand) — none is defined yet;
//! - in CBOR, a map holding the same label twice, and payloads that are not one well-formed
//!   CBOR item nested at most [`cbor::MAX_DEPTH`] deep.
//!
//! Other unknown fields are ignored, as the RFC asks. Times below 2^28 s (after adding the
//! base time) are relative to the `now_s` the caller passes in, so the decoder never reads
//! the clock.
//!
//! # Naming convention for measurements
//! A record's resolved name is `<node><sep><quantity>` where `<sep>` is the **last** `:` or
//! `/` of the name. Both of these give node `urn:dev:mac:0024befffe804ff1`, quantity `co2`:
//!
//! ```text
//! [{"bn":"urn:dev:mac:0024befffe804ff1:","n":"co2","u":"ppm","v":612}]
//! [{"n":"urn:dev:mac:0024befffe804ff1:co2","u":"ppm","v":612}]
//! ```
//!
//! and `[{"bn":"room-12-desk/","n":"temperature","u":"Cel","v":21.5}]` gives node
//! `room-12-desk`. The quantities, their accepted names and units are listed in one table
//! ([`QUANTITIES`]); adding an alias or a unit is one line there.

use serde_json::{Map, Value as Json};

pub mod cbor;
pub use cbor::{decode_cbor, encode_cbor};

use crate::Reading;

/// Default for [`Limits::max_payload_bytes`]: 64 KiB.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 64 * 1024;
/// Default for [`Limits::max_records`].
pub const DEFAULT_MAX_RECORDS: usize = 1000;
/// Default for [`Limits::max_name_len`], in bytes of the resolved name.
pub const DEFAULT_MAX_NAME_LEN: usize = 128;
/// The newest SenML version understood (`bver`); RFC 8428 is version 10.
pub const MAX_VERSION: u64 = 10;
/// Resolved times below this (2^28 s) are relative to "now" (RFC 8428 §4.5.3).
pub const RELATIVE_TIME_LIMIT_S: f64 = 268_435_456.0;

/// Bounds on what one pack may hold, so a sensor cannot make the agent allocate at will.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload accepted, in bytes (default [`DEFAULT_MAX_PAYLOAD_BYTES`]).
    pub max_payload_bytes: usize,
    /// Most records in one pack (default [`DEFAULT_MAX_RECORDS`]).
    pub max_records: usize,
    /// Longest resolved name (base name + name), in bytes (default [`DEFAULT_MAX_NAME_LEN`]).
    pub max_name_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            max_records: DEFAULT_MAX_RECORDS,
            max_name_len: DEFAULT_MAX_NAME_LEN,
        }
    }
}

/// The value of a record: exactly one of SenML's four value fields.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `v`, with the base value added.
    Number(f64),
    /// `vs`.
    String(String),
    /// `vb`.
    Bool(bool),
    /// `vd`, decoded from base64url.
    Data(Vec<u8>),
}

/// One resolved SenML record: no base fields, absolute time.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Base name + name.
    pub name: String,
    /// Unit, or the base unit when the record has none.
    pub unit: Option<String>,
    /// The value; `None` only for sum-only records, which RFC 8428 allows.
    pub value: Option<Value>,
    /// Sum (`s` + `bs`), if the record has one.
    pub sum: Option<f64>,
    /// Absolute Unix time in seconds (base time + time, made absolute if relative).
    pub time_s: f64,
    /// Update time (`ut`) in seconds, if given.
    pub update_time_s: Option<f64>,
}

/// What was wrong with one record of a pack.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RecordProblem {
    /// The array element is not a JSON object (CBOR map).
    #[error("not a JSON object (CBOR map)")]
    NotAnObject,
    /// A known field with the wrong JSON type.
    #[error("field `{field}` must be a {expected}")]
    FieldType {
        /// The field label.
        field: &'static str,
        /// The JSON type the RFC prescribes.
        expected: &'static str,
    },
    /// Neither base name nor name, or both empty.
    #[error("no name (neither `bn` nor `n`)")]
    EmptyName,
    /// The resolved name is longer than [`Limits::max_name_len`].
    #[error("name of {len} bytes exceeds the limit of {limit}")]
    NameTooLong {
        /// Length of base name + name.
        len: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The resolved name breaks RFC 8428 §4.5.1.
    #[error("name `{0}` has invalid characters")]
    InvalidName(String),
    /// Neither a value nor a sum.
    #[error("no value (one of `v`, `vs`, `vb`, `vd`) and no sum")]
    NoValue,
    /// More than one of `v`, `vs`, `vb`, `vd`.
    #[error("more than one value field")]
    MultipleValues,
    /// A number that is infinite or NaN, possibly only after adding its base.
    #[error("field `{0}` is not a finite number")]
    NonFinite(&'static str),
    /// `bver` is not a positive integer.
    #[error("`bver` must be a positive integer")]
    InvalidVersion,
    /// `bver` is newer than this decoder.
    #[error("SenML version {0} is not supported (at most {MAX_VERSION})")]
    UnsupportedVersion(u64),
    /// A must-understand field (label ending in `_`) this decoder does not know.
    #[error("must-understand field `{0}` is not supported")]
    MustUnderstand(String),
    /// `vd` is not base64url without padding.
    #[error("`vd` is not valid base64url")]
    InvalidData,
    /// A CBOR map holds the same label twice (JSON objects keep the last).
    #[error("field `{0}` appears twice")]
    DuplicateField(&'static str),
}

/// Why a SenML payload could not be decoded or mapped to a measurement.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SenmlError {
    /// The payload exceeds [`Limits::max_payload_bytes`].
    #[error("payload of {bytes} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Payload size.
        bytes: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The payload is not JSON.
    #[error("not valid JSON: {0}")]
    Json(String),
    /// The payload is not well-formed CBOR (or nests deeper than [`cbor::MAX_DEPTH`]).
    #[error("not valid CBOR: {0}")]
    Cbor(String),
    /// The payload is JSON or CBOR but not an array of records.
    #[error("a SenML pack must be an array of records")]
    NotAnArray,
    /// More records than [`Limits::max_records`].
    #[error("pack of {count} records exceeds the limit of {limit}")]
    TooManyRecords {
        /// Records in the pack.
        count: usize,
        /// The configured limit.
        limit: usize,
    },
    /// One record is invalid (the whole pack is refused).
    #[error("record {index}: {problem}")]
    Record {
        /// Zero-based position of the record in the pack.
        index: usize,
        /// What was wrong with it.
        problem: RecordProblem,
    },
    /// The name has no `:` or `/` separating node and quantity.
    #[error(
        "name `{0}` does not name a node (expected `<node>:<quantity>` or `<node>/<quantity>`)"
    )]
    NoNode(String),
    /// The quantity part of the name is not one Atrium knows.
    #[error("unknown quantity `{quantity}` in name `{name}`")]
    UnknownQuantity {
        /// The full record name.
        name: String,
        /// The part after the last separator.
        quantity: String,
    },
    /// A known quantity in a unit Atrium does not accept for it.
    #[error("{quantity} in unit {} is not supported (accepted: {accepted})", unit_label(.unit))]
    UnsupportedUnit {
        /// The quantity.
        quantity: Quantity,
        /// The record's unit.
        unit: Option<String>,
        /// The accepted units, for the operator.
        accepted: String,
    },
    /// A string, data or sum-only record where the quantity needs a number (or boolean).
    #[error("{quantity} needs a number{}, got {got}", if *.bool_ok { " or boolean" } else { "" })]
    WrongValueKind {
        /// The quantity.
        quantity: Quantity,
        /// Whether a boolean would have been accepted.
        bool_ok: bool,
        /// What the record held.
        got: &'static str,
    },
    /// A value outside the quantity's plausible range.
    #[error("{quantity} value {value} is out of range ({min}..={max} {unit})", unit = .quantity.unit())]
    OutOfRange {
        /// The quantity.
        quantity: Quantity,
        /// The value after unit conversion.
        value: f64,
        /// Lowest accepted value.
        min: f64,
        /// Highest accepted value.
        max: f64,
    },
    /// The time does not fit Atrium's millisecond timestamps.
    #[error("time {0} s is out of range")]
    TimeOutOfRange(f64),
}

fn unit_label(unit: &Option<String>) -> String {
    match unit {
        Some(u) => format!("`{u}`"),
        None => "(none)".to_owned(),
    }
}

impl SenmlError {
    /// A short stable label for metrics ("why were readings refused").
    pub fn kind(&self) -> &'static str {
        match self {
            SenmlError::TooLarge { .. } => "too_large",
            SenmlError::Json(_) => "json",
            SenmlError::Cbor(_) => "cbor",
            SenmlError::NotAnArray => "not_an_array",
            SenmlError::TooManyRecords { .. } => "too_many_records",
            SenmlError::Record { .. } => "invalid_record",
            SenmlError::NoNode(_) => "no_node",
            SenmlError::UnknownQuantity { .. } => "unknown_quantity",
            SenmlError::UnsupportedUnit { .. } => "unsupported_unit",
            SenmlError::WrongValueKind { .. } => "wrong_value_kind",
            SenmlError::OutOfRange { .. } => "out_of_range",
            SenmlError::TimeOutOfRange(_) => "time_out_of_range",
        }
    }
}

/// Base fields in effect: they apply to the record that sets them and all after it.
#[derive(Default)]
struct Base {
    name: String,
    time: f64,
    unit: Option<String>,
    value: f64,
    sum: f64,
}

/// The two SenML representations Atrium accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `application/senml+json` (RFC 8428 §5).
    Json,
    /// `application/senml+cbor` (RFC 8428 §6).
    Cbor,
}

impl Format {
    /// Tells the representation from the first byte: 0x80 and above is CBOR (an array is
    /// 0x80..=0x9f, the self-described CBOR tag starts 0xd9), anything else is JSON (a pack
    /// starts with `[`, possibly after whitespace, all below 0x80).
    pub fn of(payload: &[u8]) -> Format {
        match payload.first() {
            Some(&b) if b >= 0x80 => Format::Cbor,
            _ => Format::Json,
        }
    }
}

/// Decodes a SenML pack in either representation, told apart by [`Format::of`].
pub fn decode(payload: &[u8], now_s: f64, limits: &Limits) -> Result<Vec<Record>, SenmlError> {
    match Format::of(payload) {
        Format::Json => decode_json(payload, now_s, limits),
        Format::Cbor => decode_cbor(payload, now_s, limits),
    }
}

/// Decodes and resolves a SenML JSON pack; `now_s` (Unix seconds) anchors relative times.
pub fn decode_json(payload: &[u8], now_s: f64, limits: &Limits) -> Result<Vec<Record>, SenmlError> {
    check_size(payload, limits)?;
    // serde_json limits nesting depth (128), so hostile input cannot exhaust the stack.
    let json: Json =
        serde_json::from_slice(payload).map_err(|e| SenmlError::Json(e.to_string()))?;
    let Json::Array(items) = json else {
        return Err(SenmlError::NotAnArray);
    };
    if items.len() > limits.max_records {
        return Err(SenmlError::TooManyRecords {
            count: items.len(),
            limit: limits.max_records,
        });
    }
    let mut base = Base::default();
    let mut records = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let record = json_fields(item)
            .and_then(|fields| resolve(&fields, &mut base, now_s, limits))
            .map_err(|problem| SenmlError::Record { index, problem })?;
        records.push(record);
    }
    Ok(records)
}

fn check_size(payload: &[u8], limits: &Limits) -> Result<(), SenmlError> {
    if payload.len() > limits.max_payload_bytes {
        return Err(SenmlError::TooLarge {
            bytes: payload.len(),
            limit: limits.max_payload_bytes,
        });
    }
    Ok(())
}

/// One field of a record as it arrived, whatever the representation.
#[derive(Debug, Clone, Copy)]
enum Field<'a> {
    Str(&'a str),
    /// A non-negative integer (the only form `bver` may take).
    Uint(u64),
    /// Any other number, possibly not finite.
    Num(f64),
    Bool(bool),
    /// A CBOR byte string (how CBOR carries `vd`).
    Bytes(&'a [u8]),
    /// Anything else: null, arrays, maps, unknown tags.
    Other,
}

/// The fields RFC 8428 defines, taken out of a JSON object or a CBOR map.
#[derive(Default)]
struct Fields<'a> {
    bver: Option<Field<'a>>,
    bn: Option<Field<'a>>,
    bt: Option<Field<'a>>,
    bu: Option<Field<'a>>,
    bv: Option<Field<'a>>,
    bs: Option<Field<'a>>,
    n: Option<Field<'a>>,
    u: Option<Field<'a>>,
    v: Option<Field<'a>>,
    vs: Option<Field<'a>>,
    vb: Option<Field<'a>>,
    s: Option<Field<'a>>,
    t: Option<Field<'a>>,
    ut: Option<Field<'a>>,
    vd: Option<Field<'a>>,
    /// The first must-understand label (ending in `_`) seen.
    must_understand: Option<&'a str>,
}

impl<'a> Fields<'a> {
    /// The slot of a JSON label, or of a CBOR integer label (RFC 8428 §6, Table 4).
    fn slot(&mut self, label: Label<'_>) -> Option<(&'static str, &mut Option<Field<'a>>)> {
        let (name, slot) = match label {
            Label::Int(-1) | Label::Text("bver") => ("bver", &mut self.bver),
            Label::Int(-2) | Label::Text("bn") => ("bn", &mut self.bn),
            Label::Int(-3) | Label::Text("bt") => ("bt", &mut self.bt),
            Label::Int(-4) | Label::Text("bu") => ("bu", &mut self.bu),
            Label::Int(-5) | Label::Text("bv") => ("bv", &mut self.bv),
            Label::Int(-6) | Label::Text("bs") => ("bs", &mut self.bs),
            Label::Int(0) | Label::Text("n") => ("n", &mut self.n),
            Label::Int(1) | Label::Text("u") => ("u", &mut self.u),
            Label::Int(2) | Label::Text("v") => ("v", &mut self.v),
            Label::Int(3) | Label::Text("vs") => ("vs", &mut self.vs),
            Label::Int(4) | Label::Text("vb") => ("vb", &mut self.vb),
            Label::Int(5) | Label::Text("s") => ("s", &mut self.s),
            Label::Int(6) | Label::Text("t") => ("t", &mut self.t),
            Label::Int(7) | Label::Text("ut") => ("ut", &mut self.ut),
            Label::Int(8) | Label::Text("vd") => ("vd", &mut self.vd),
            _ => return None,
        };
        Some((name, slot))
    }
}

#[derive(Clone, Copy)]
enum Label<'k> {
    Int(i64),
    Text(&'k str),
}

fn json_fields(item: &Json) -> Result<Fields<'_>, RecordProblem> {
    let obj = item.as_object().ok_or(RecordProblem::NotAnObject)?;
    let mut fields = Fields::default();
    for (key, value) in obj {
        if key.ends_with('_') {
            fields.must_understand.get_or_insert(key);
            continue;
        }
        let Some((_, slot)) = fields.slot(Label::Text(key)) else {
            continue;
        };
        *slot = Some(match value {
            Json::String(s) => Field::Str(s),
            Json::Bool(b) => Field::Bool(*b),
            // Without arbitrary precision every JSON number has an f64 (possibly infinite).
            Json::Number(n) => match n.as_u64() {
                Some(u) => Field::Uint(u),
                None => Field::Num(n.as_f64().unwrap_or(f64::NAN)),
            },
            _ => Field::Other,
        });
    }
    Ok(fields)
}

fn resolve(
    fields: &Fields<'_>,
    base: &mut Base,
    now_s: f64,
    limits: &Limits,
) -> Result<Record, RecordProblem> {
    if let Some(label) = fields.must_understand {
        return Err(RecordProblem::MustUnderstand(label.to_owned()));
    }
    if let Some(v) = fields.bver {
        let version = match v {
            Field::Uint(n) if n > 0 => n,
            _ => return Err(RecordProblem::InvalidVersion),
        };
        if version > MAX_VERSION {
            return Err(RecordProblem::UnsupportedVersion(version));
        }
    }
    if let Some(bn) = string(fields.bn, "bn")? {
        base.name = bn.to_owned();
    }
    if let Some(bt) = number(fields.bt, "bt")? {
        base.time = bt;
    }
    if let Some(bu) = string(fields.bu, "bu")? {
        base.unit = Some(bu.to_owned());
    }
    if let Some(bv) = number(fields.bv, "bv")? {
        base.value = bv;
    }
    if let Some(bs) = number(fields.bs, "bs")? {
        base.sum = bs;
    }

    let n = string(fields.n, "n")?.unwrap_or("");
    let len = base.name.len() + n.len();
    if len == 0 {
        return Err(RecordProblem::EmptyName);
    }
    // Checked before concatenating so a huge base name is not copied once per record.
    if len > limits.max_name_len {
        return Err(RecordProblem::NameTooLong {
            len,
            limit: limits.max_name_len,
        });
    }
    let name = format!("{}{n}", base.name);
    if !valid_name(&name) {
        return Err(RecordProblem::InvalidName(name));
    }
    let unit = match string(fields.u, "u")? {
        Some(u) => Some(u.to_owned()),
        None => base.unit.clone(),
    };

    let mut values = Vec::with_capacity(1);
    if let Some(v) = number(fields.v, "v")? {
        values.push(Value::Number(finite("v", base.value + v)?));
    }
    if let Some(vs) = string(fields.vs, "vs")? {
        values.push(Value::String(vs.to_owned()));
    }
    if let Some(vb) = fields.vb {
        let Field::Bool(b) = vb else {
            return Err(RecordProblem::FieldType {
                field: "vb",
                expected: "boolean",
            });
        };
        values.push(Value::Bool(b));
    }
    match fields.vd {
        None => {}
        // JSON carries data as base64url text, CBOR as a byte string (RFC 8428 §6).
        Some(Field::Str(vd)) => values.push(Value::Data(
            base64url_decode(vd).ok_or(RecordProblem::InvalidData)?,
        )),
        Some(Field::Bytes(vd)) => values.push(Value::Data(vd.to_vec())),
        Some(_) => {
            return Err(RecordProblem::FieldType {
                field: "vd",
                expected: "string",
            });
        }
    }
    let sum = match number(fields.s, "s")? {
        Some(s) => Some(finite("s", base.sum + s)?),
        None => None,
    };
    if values.len() > 1 {
        return Err(RecordProblem::MultipleValues);
    }
    let value = values.pop();
    if value.is_none() && sum.is_none() {
        return Err(RecordProblem::NoValue);
    }

    let mut time_s = finite("t", base.time + number(fields.t, "t")?.unwrap_or(0.0))?;
    if time_s < RELATIVE_TIME_LIMIT_S {
        time_s = finite("t", now_s + time_s)?;
    }
    let update_time_s = number(fields.ut, "ut")?;
    Ok(Record {
        name,
        unit,
        value,
        sum,
        time_s,
        update_time_s,
    })
}

fn string<'a>(
    field: Option<Field<'a>>,
    label: &'static str,
) -> Result<Option<&'a str>, RecordProblem> {
    match field {
        None => Ok(None),
        Some(Field::Str(s)) => Ok(Some(s)),
        Some(_) => Err(RecordProblem::FieldType {
            field: label,
            expected: "string",
        }),
    }
}

fn number(field: Option<Field<'_>>, label: &'static str) -> Result<Option<f64>, RecordProblem> {
    match field {
        None => Ok(None),
        Some(Field::Uint(u)) => Ok(Some(u as f64)),
        Some(Field::Num(v)) => finite(label, v).map(Some),
        Some(_) => Err(RecordProblem::FieldType {
            field: label,
            expected: "number",
        }),
    }
}

fn finite(field: &'static str, v: f64) -> Result<f64, RecordProblem> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(RecordProblem::NonFinite(field))
    }
}

/// RFC 8428 §4.5.1: first character alphanumeric, then alphanumeric or one of `-:./_`.
fn valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphanumeric())
        && bytes.all(|b| b.is_ascii_alphanumeric() || b"-:./_".contains(&b))
}

const BASE64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// base64url without padding (RFC 4648 §5), as `vd` requires.
fn base64url_decode(s: &str) -> Option<Vec<u8>> {
    if s.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let d = BASE64URL.iter().position(|&a| a == c)? as u32;
        acc = (acc << 6) | d;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

fn base64url_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n =
            chunk.iter().fold(0u32, |acc, &b| (acc << 8) | u32::from(b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(char::from(BASE64URL[(n >> (18 - 6 * i)) as usize & 63]));
        }
    }
    out
}

/// Writes resolved records as a SenML JSON pack, one self-contained record each.
///
/// Times are written as absolute (`t`); a `time_s` below 2^28 would be read back as relative.
pub fn encode_json(records: &[Record]) -> Vec<u8> {
    let pack: Vec<Json> = records
        .iter()
        .map(|r| {
            let mut obj = Map::new();
            obj.insert("n".into(), r.name.clone().into());
            if let Some(u) = &r.unit {
                obj.insert("u".into(), u.clone().into());
            }
            match &r.value {
                Some(Value::Number(v)) => obj.insert("v".into(), (*v).into()),
                Some(Value::String(s)) => obj.insert("vs".into(), s.clone().into()),
                Some(Value::Bool(b)) => obj.insert("vb".into(), (*b).into()),
                Some(Value::Data(d)) => obj.insert("vd".into(), base64url_encode(d).into()),
                None => None,
            };
            if let Some(s) = r.sum {
                obj.insert("s".into(), s.into());
            }
            obj.insert("t".into(), r.time_s.into());
            if let Some(ut) = r.update_time_s {
                obj.insert("ut".into(), ut.into());
            }
            Json::Object(obj)
        })
        .collect();
    // Serialising a `Value` tree cannot fail (non-finite floats become `null`).
    serde_json::to_vec(&pack).unwrap_or_default()
}

/// What a sensor measured, in Atrium's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Quantity {
    /// CO2 concentration, ppm.
    Co2,
    /// Air temperature, °C.
    Temperature,
    /// Relative humidity, %RH.
    Humidity,
    /// Illuminance, lx.
    Light,
    /// PIR motion: 1 = motion, 0 = none.
    Motion,
    /// Door contact: 1 = open, 0 = closed.
    Door,
    /// People counted by a counter, persons.
    PeopleCount,
    /// Sound level, dB.
    Sound,
}

impl Quantity {
    /// The canonical name, used as [`Reading::name`].
    pub fn as_str(self) -> &'static str {
        self.spec().names[0]
    }

    /// The canonical unit of [`Measurement::value`] (SenML symbol, `/` for 0/1 states).
    pub fn unit(self) -> &'static str {
        self.spec().canonical_unit
    }

    fn spec(self) -> &'static QuantitySpec {
        // Every variant has exactly one row; the table test checks this.
        QUANTITIES
            .iter()
            .find(|q| q.quantity == self)
            .unwrap_or(&QUANTITIES[0])
    }
}

impl std::fmt::Display for Quantity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a unit's value becomes the quantity's canonical unit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Conversion {
    /// Already canonical.
    Identity,
    /// Kelvin to degrees Celsius.
    KelvinToCelsius,
    /// Volts (a microphone's RMS output) to dBV, 20·log10(V). Not SPL without calibration.
    VoltsToDbv,
}

impl Conversion {
    fn apply(self, v: f64) -> f64 {
        match self {
            Conversion::Identity => v,
            Conversion::KelvinToCelsius => v - 273.15,
            Conversion::VoltsToDbv => 20.0 * v.log10(),
        }
    }
}

/// One row of the quantity table.
#[derive(Debug)]
pub struct QuantitySpec {
    /// The quantity.
    pub quantity: Quantity,
    /// Names accepted after the node separator (ASCII case-insensitive); the first is canonical.
    pub names: &'static [&'static str],
    /// Canonical unit of the converted value.
    pub canonical_unit: &'static str,
    /// Accepted units (`None` = no unit) and how each converts.
    pub units: &'static [(Option<&'static str>, Conversion)],
    /// Whether `vb` is accepted (true = 1, false = 0).
    pub bool_ok: bool,
    /// Only 0 and 1 are valid (states, not levels).
    pub binary: bool,
    /// Plausible range of the converted value; outside it the record is refused.
    pub range: (f64, f64),
}

/// Atrium's quantities: names, units and plausible ranges.
pub const QUANTITIES: &[QuantitySpec] = &[
    QuantitySpec {
        quantity: Quantity::Co2,
        names: &["co2"],
        canonical_unit: "ppm",
        units: &[(Some("ppm"), Conversion::Identity)],
        bool_ok: false,
        binary: false,
        range: (0.0, 100_000.0),
    },
    QuantitySpec {
        quantity: Quantity::Temperature,
        names: &["temperature", "temp"],
        canonical_unit: "Cel",
        units: &[
            (Some("Cel"), Conversion::Identity),
            (Some("K"), Conversion::KelvinToCelsius),
        ],
        bool_ok: false,
        binary: false,
        range: (-273.15, 200.0),
    },
    QuantitySpec {
        quantity: Quantity::Humidity,
        names: &["humidity", "rh"],
        canonical_unit: "%RH",
        units: &[(Some("%RH"), Conversion::Identity)],
        bool_ok: false,
        binary: false,
        range: (0.0, 100.0),
    },
    QuantitySpec {
        quantity: Quantity::Light,
        names: &["light", "illuminance"],
        canonical_unit: "lx",
        units: &[(Some("lx"), Conversion::Identity)],
        bool_ok: false,
        binary: false,
        range: (0.0, 200_000.0),
    },
    QuantitySpec {
        quantity: Quantity::Motion,
        names: &["motion", "pir"],
        canonical_unit: "/",
        units: &[
            (None, Conversion::Identity),
            (Some("/"), Conversion::Identity),
        ],
        bool_ok: true,
        binary: true,
        range: (0.0, 1.0),
    },
    QuantitySpec {
        quantity: Quantity::Door,
        names: &["door", "contact"],
        canonical_unit: "/",
        units: &[
            (None, Conversion::Identity),
            (Some("/"), Conversion::Identity),
        ],
        bool_ok: true,
        binary: true,
        range: (0.0, 1.0),
    },
    QuantitySpec {
        quantity: Quantity::PeopleCount,
        names: &["people", "people_count", "count"],
        canonical_unit: "count",
        units: &[
            (None, Conversion::Identity),
            (Some("count"), Conversion::Identity),
        ],
        bool_ok: false,
        binary: false,
        range: (0.0, 10_000.0),
    },
    QuantitySpec {
        quantity: Quantity::Sound,
        names: &["sound", "noise"],
        canonical_unit: "dB",
        units: &[
            (Some("dB"), Conversion::Identity),
            (Some("V"), Conversion::VoltsToDbv),
        ],
        bool_ok: false,
        binary: false,
        range: (-200.0, 200.0),
    },
];

/// A reading Atrium understands: node, quantity, value in the canonical unit, time.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    /// The sensor node (the record name before the last `:` or `/`).
    pub node: String,
    /// What was measured.
    pub quantity: Quantity,
    /// Value in [`Quantity::unit`].
    pub value: f64,
    /// Unix time in milliseconds.
    pub time_ms: i64,
}

impl From<Measurement> for Reading {
    fn from(m: Measurement) -> Reading {
        Reading {
            node: m.node,
            name: m.quantity.as_str().to_owned(),
            time_ms: m.time_ms,
            value: m.value,
        }
    }
}

/// Maps a resolved record to a [`Measurement`] (see the module doc for the naming convention).
pub fn to_measurement(record: &Record) -> Result<Measurement, SenmlError> {
    let name = &record.name;
    let (node, quantity_name) = match name.rfind([':', '/']) {
        Some(i) if i > 0 && i + 1 < name.len() => (&name[..i], &name[i + 1..]),
        _ => return Err(SenmlError::NoNode(name.clone())),
    };
    let spec = QUANTITIES
        .iter()
        .find(|q| {
            q.names
                .iter()
                .any(|n| n.eq_ignore_ascii_case(quantity_name))
        })
        .ok_or_else(|| SenmlError::UnknownQuantity {
            name: name.clone(),
            quantity: quantity_name.to_owned(),
        })?;
    let quantity = spec.quantity;
    let conversion = spec
        .units
        .iter()
        .find(|(u, _)| *u == record.unit.as_deref())
        .map(|(_, c)| *c)
        .ok_or_else(|| SenmlError::UnsupportedUnit {
            quantity,
            unit: record.unit.clone(),
            accepted: spec
                .units
                .iter()
                .map(|(u, _)| u.unwrap_or("(none)"))
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let wrong = |got| SenmlError::WrongValueKind {
        quantity,
        bool_ok: spec.bool_ok,
        got,
    };
    let raw = match &record.value {
        Some(Value::Number(v)) => *v,
        Some(Value::Bool(b)) if spec.bool_ok => f64::from(u8::from(*b)),
        Some(Value::Bool(_)) => return Err(wrong("a boolean")),
        Some(Value::String(_)) => return Err(wrong("a string")),
        Some(Value::Data(_)) => return Err(wrong("data")),
        None => return Err(wrong("only a sum")),
    };
    let value = conversion.apply(raw);
    let (min, max) = spec.range;
    let in_range = if spec.binary {
        value == 0.0 || value == 1.0
    } else {
        (min..=max).contains(&value)
    };
    if !in_range {
        return Err(SenmlError::OutOfRange {
            quantity,
            value,
            min,
            max,
        });
    }
    let ms = (record.time_s * 1000.0).round();
    // i64 holds ±9.2e18 ms; anything near that is nonsense anyway.
    if !ms.is_finite() || ms.abs() >= 9.0e18 {
        return Err(SenmlError::TimeOutOfRange(record.time_s));
    }
    Ok(Measurement {
        node: node.to_owned(),
        quantity,
        value,
        time_ms: ms as i64,
    })
}

#[cfg(test)]
mod tests;
