//! The CBOR representation of SenML (RFC 8428 §6): integer map keys (Table 4), text strings
//! for strings, byte strings for `vd`, numbers as integers, floats (half, single, double) or
//! decimal fractions (tag 4).
//!
//! Decoding runs in two passes over the payload slice, neither of which allocates from a
//! length the sender declared: the first checks that the payload is one well-formed CBOR item
//! nested at most [`MAX_DEPTH`] deep with nothing after it (so a malformed pack is a `cbor`
//! error whatever its records hold, as with JSON); the second walks the pack's records, takes
//! out the fields RFC 8428 defines (strings borrow from the payload) and resolves them exactly
//! as the JSON path does.

use minicbor::data::{Int, Tag, Type};
use minicbor::decode::Decoder;
use minicbor::encode::Encoder;

use super::{Base, Field, Fields, Label, Limits, Record, RecordProblem, SenmlError, Value};

/// Deepest nesting accepted: the pack (1), a record (2), and room for extension fields.
pub const MAX_DEPTH: usize = 16;

/// The self-described CBOR tag (RFC 8949 §3.4.6), allowed in front of the pack.
const SELF_DESCRIBED: u64 = 55799;
/// Decimal fraction `[exponent, mantissa]` (RFC 8949 §3.4.4), which RFC 8428 allows for numbers.
const DECIMAL_FRACTION: u64 = 4;

type CborResult<T> = Result<T, minicbor::decode::Error>;

fn malformed(e: minicbor::decode::Error) -> SenmlError {
    SenmlError::Cbor(e.to_string())
}

/// Decodes and resolves a SenML CBOR pack; `now_s` (Unix seconds) anchors relative times.
pub fn decode_cbor(payload: &[u8], now_s: f64, limits: &Limits) -> Result<Vec<Record>, SenmlError> {
    super::check_size(payload, limits)?;
    // Pass 1: well-formed, bounded depth, nothing trailing.
    let mut d = Decoder::new(payload);
    skip(&mut d, 0).map_err(|e| match e {
        Skip::Cbor(e) => malformed(e),
        Skip::TooDeep => SenmlError::Cbor(format!("nested deeper than {MAX_DEPTH} levels")),
    })?;
    if d.position() != payload.len() {
        return Err(SenmlError::Cbor(format!(
            "{} bytes after the pack",
            payload.len() - d.position()
        )));
    }

    // Pass 2: the records.
    let mut d = Decoder::new(payload);
    if d.datatype().map_err(malformed)? == Type::Tag
        && d.tag().map_err(malformed)? != Tag::new(SELF_DESCRIBED)
    {
        return Err(SenmlError::NotAnArray);
    }
    let len = match d.datatype().map_err(malformed)? {
        Type::Array | Type::ArrayIndef => d.array().map_err(malformed)?,
        _ => return Err(SenmlError::NotAnArray),
    };
    let count = match len {
        Some(n) => n,
        None => {
            // Indefinite length: count the records first (pass 1 showed they are well-formed
            // and end in a break), so an oversized pack is refused as such, as with JSON.
            let mut probe = d.clone();
            let mut n = 0u64;
            while probe.datatype().map_err(malformed)? != Type::Break {
                probe.skip().map_err(malformed)?;
                n += 1;
            }
            n
        }
    };
    if count > limits.max_records as u64 {
        return Err(SenmlError::TooManyRecords {
            count: usize::try_from(count).unwrap_or(usize::MAX),
            limit: limits.max_records,
        });
    }
    let mut records = Vec::with_capacity(count as usize);
    let mut base = Base::default();
    for index in 0..count as usize {
        let fields = record_fields(&mut d)
            .map_err(malformed)?
            .map_err(|problem| SenmlError::Record { index, problem })?;
        let record = super::resolve(&fields, &mut base, now_s, limits)
            .map_err(|problem| SenmlError::Record { index, problem })?;
        records.push(record);
    }
    Ok(records)
}

/// Why pass 1 stopped.
enum Skip {
    Cbor(minicbor::decode::Error),
    TooDeep,
}

impl From<minicbor::decode::Error> for Skip {
    fn from(e: minicbor::decode::Error) -> Skip {
        Skip::Cbor(e)
    }
}

/// Steps over one data item, checking it is well-formed and at most [`MAX_DEPTH`] deep.
/// Declared lengths are only counted down, never allocated: a hostile length runs out of input.
fn skip(d: &mut Decoder<'_>, depth: usize) -> Result<(), Skip> {
    if depth >= MAX_DEPTH {
        return Err(Skip::TooDeep);
    }
    match d.datatype()? {
        Type::Bool => {
            d.bool()?;
        }
        Type::Null => d.null()?,
        Type::Undefined => d.undefined()?,
        Type::U8 | Type::U16 | Type::U32 | Type::U64 => {
            d.u64()?;
        }
        Type::I8 | Type::I16 | Type::I32 | Type::I64 | Type::Int => {
            d.int()?;
        }
        Type::F16 => {
            half(d)?;
        }
        Type::F32 => {
            d.f32()?;
        }
        Type::F64 => {
            d.f64()?;
        }
        Type::Simple => {
            d.simple()?;
        }
        Type::Bytes => {
            d.bytes()?;
        }
        Type::String => {
            d.str()?;
        }
        Type::BytesIndef => {
            for chunk in d.bytes_iter()? {
                chunk?;
            }
        }
        Type::StringIndef => {
            for chunk in d.str_iter()? {
                chunk?;
            }
        }
        Type::Array | Type::ArrayIndef => {
            let len = d.array()?;
            items(d, len, depth)?;
        }
        Type::Map | Type::MapIndef => match d.map()? {
            Some(n) => {
                for _ in 0..n {
                    skip(d, depth + 1)?;
                    skip(d, depth + 1)?;
                }
            }
            None => {
                while !at_break(d)? {
                    skip(d, depth + 1)?;
                    skip(d, depth + 1)?;
                }
            }
        },
        Type::Tag => {
            d.tag()?;
            skip(d, depth + 1)?;
        }
        Type::Break => {
            return Err(Skip::Cbor(
                minicbor::decode::Error::message("break outside an indefinite-length item")
                    .at(d.position()),
            ));
        }
        Type::Unknown(b) => {
            return Err(Skip::Cbor(
                minicbor::decode::Error::message(format!("reserved initial byte {b:#04x}"))
                    .at(d.position()),
            ));
        }
    }
    Ok(())
}

fn items(d: &mut Decoder<'_>, len: Option<u64>, depth: usize) -> Result<(), Skip> {
    match len {
        Some(n) => {
            for _ in 0..n {
                skip(d, depth + 1)?;
            }
        }
        None => {
            while !at_break(d)? {
                skip(d, depth + 1)?;
            }
        }
    }
    Ok(())
}

/// Consumes the break that ends an indefinite-length item, if it is next.
fn at_break(d: &mut Decoder<'_>) -> CborResult<bool> {
    if d.datatype()? == Type::Break {
        d.set_position(d.position() + 1);
        Ok(true)
    } else {
        Ok(false)
    }
}

/// A half-precision float (RFC 8949 Appendix D), widened exactly to f64.
fn half(d: &mut Decoder<'_>) -> CborResult<f64> {
    let start = d.position();
    let bytes = d
        .input()
        .get(start + 1..start + 3)
        .ok_or_else(|| minicbor::decode::Error::end_of_input().at(start))?;
    d.set_position(start + 3);
    let bits = u16::from_be_bytes([bytes[0], bytes[1]]);
    let exponent = i32::from((bits >> 10) & 0x1f);
    let mantissa = f64::from(bits & 0x3ff);
    let magnitude = match exponent {
        0 => mantissa * 2f64.powi(-24),
        31 if mantissa == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        e => (1024.0 + mantissa) * 2f64.powi(e - 25),
    };
    Ok(if bits & 0x8000 != 0 {
        -magnitude
    } else {
        magnitude
    })
}

/// The fields of one record (a map), or what is wrong with it. The outer error is malformed
/// CBOR, which pass 1 has ruled out.
fn record_fields<'b>(d: &mut Decoder<'b>) -> CborResult<Result<Fields<'b>, RecordProblem>> {
    let len = match d.datatype()? {
        Type::Map | Type::MapIndef => d.map()?,
        _ => return Ok(Err(RecordProblem::NotAnObject)),
    };
    let mut fields = Fields::default();
    let mut remaining = len;
    loop {
        match remaining {
            Some(0) => break,
            Some(ref mut n) => *n -= 1,
            None => {
                if at_break(d)? {
                    break;
                }
            }
        }
        let label = match d.datatype()? {
            Type::U8 | Type::U16 | Type::U32 | Type::U64 => {
                i64::try_from(d.u64()?).ok().map(Label::Int)
            }
            Type::I8 | Type::I16 | Type::I32 | Type::I64 => Some(Label::Int(d.i64()?)),
            Type::String => {
                let key = d.str()?;
                // RFC 8428 §6: extensions use text keys; one ending in `_` must be understood.
                if key.ends_with('_') {
                    fields.must_understand.get_or_insert(key);
                }
                None
            }
            _ => {
                d.skip()?;
                None
            }
        };
        // Only integer labels name the fields of Table 4; other keys are ignored.
        let slot = match label {
            Some(label @ Label::Int(_)) => fields.slot(label),
            _ => None,
        };
        match slot {
            Some((name, slot)) => {
                if slot.is_some() {
                    return Ok(Err(RecordProblem::DuplicateField(name)));
                }
                *slot = Some(field(d)?);
            }
            None => d.skip()?,
        }
    }
    Ok(Ok(fields))
}

/// One field value.
fn field<'b>(d: &mut Decoder<'b>) -> CborResult<Field<'b>> {
    Ok(match d.datatype()? {
        Type::U8 | Type::U16 | Type::U32 | Type::U64 => Field::Uint(d.u64()?),
        Type::I8 | Type::I16 | Type::I32 | Type::I64 | Type::Int => {
            Field::Num(int_to_f64(d.int()?))
        }
        Type::F16 => Field::Num(half(d)?),
        Type::F32 | Type::F64 => Field::Num(d.f64()?),
        Type::String => Field::Str(d.str()?),
        Type::Bytes => Field::Bytes(d.bytes()?),
        Type::Bool => Field::Bool(d.bool()?),
        Type::Tag => {
            let start = d.position();
            if d.tag()? == Tag::new(DECIMAL_FRACTION)
                && let Some(v) = decimal_fraction(d)?
            {
                return Ok(Field::Num(v));
            }
            d.set_position(start);
            d.skip()?;
            Field::Other
        }
        _ => {
            d.skip()?;
            Field::Other
        }
    })
}

fn int_to_f64(i: Int) -> f64 {
    i128::from(i) as f64
}

/// `[exponent, mantissa]` with 64-bit integers, as the f64 nearest to mantissa × 10^exponent;
/// `None` (the caller skips the item) for any other shape, such as a bignum mantissa.
fn decimal_fraction(d: &mut Decoder<'_>) -> CborResult<Option<f64>> {
    if d.datatype()? != Type::Array || d.array()? != Some(2) {
        return Ok(None);
    }
    let mut parts = [0i128; 2];
    for part in &mut parts {
        *part = match d.datatype()? {
            Type::U8 | Type::U16 | Type::U32 | Type::U64 => i128::from(d.u64()?),
            Type::I8 | Type::I16 | Type::I32 | Type::I64 | Type::Int => i128::from(d.int()?),
            _ => return Ok(None),
        };
    }
    let [exponent, mantissa] = parts;
    // Parsing the decimal text gives the correctly rounded f64; huge exponents give 0 or inf,
    // which the finiteness check then refuses.
    Ok(format!("{mantissa}e{exponent}").parse::<f64>().ok())
}

/// Writes resolved records as a SenML CBOR pack, one self-contained record each (integer
/// labels; whole numbers below 2^53 as integers, others as doubles).
///
/// Times are written as absolute (`t`); a `time_s` below 2^28 would be read back as relative.
pub fn encode_cbor(records: &[Record]) -> Vec<u8> {
    let mut e = Encoder::new(Vec::new());
    // Writing to a Vec cannot fail.
    let _ = write_pack(&mut e, records);
    e.into_writer()
}

fn write_pack(
    e: &mut Encoder<Vec<u8>>,
    records: &[Record],
) -> Result<(), minicbor::encode::Error<std::convert::Infallible>> {
    e.array(records.len() as u64)?;
    for r in records {
        let fields = 2
            + u64::from(r.unit.is_some())
            + u64::from(r.value.is_some())
            + u64::from(r.sum.is_some())
            + u64::from(r.update_time_s.is_some());
        e.map(fields)?;
        e.i8(0)?.str(&r.name)?;
        if let Some(u) = &r.unit {
            e.i8(1)?.str(u)?;
        }
        match &r.value {
            Some(Value::Number(v)) => number(e.i8(2)?, *v)?,
            Some(Value::String(s)) => {
                e.i8(3)?.str(s)?;
            }
            Some(Value::Bool(b)) => {
                e.i8(4)?.bool(*b)?;
            }
            Some(Value::Data(data)) => {
                e.i8(8)?.bytes(data)?;
            }
            None => {}
        }
        if let Some(s) = r.sum {
            number(e.i8(5)?, s)?;
        }
        number(e.i8(6)?, r.time_s)?;
        if let Some(ut) = r.update_time_s {
            number(e.i8(7)?, ut)?;
        }
    }
    Ok(())
}

fn number(
    e: &mut Encoder<Vec<u8>>,
    v: f64,
) -> Result<(), minicbor::encode::Error<std::convert::Infallible>> {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    if v.fract() == 0.0 && v.abs() < EXACT {
        e.i64(v as i64)?;
    } else {
        e.f64(v)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
