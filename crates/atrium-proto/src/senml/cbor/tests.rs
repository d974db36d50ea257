use minicbor::encode::Encoder;
use proptest::prelude::*;
use serde_json::Value as Json;

use super::super::tests::{arb_json, arb_record};
use super::super::*;
use super::MAX_DEPTH;

const NOW: f64 = 1_700_000_000.0;

/// RFC 8428 Table 4: JSON label and CBOR label.
const LABELS: &[(&str, i64)] = &[
    ("bver", -1),
    ("bn", -2),
    ("bt", -3),
    ("bu", -4),
    ("bv", -5),
    ("bs", -6),
    ("n", 0),
    ("u", 1),
    ("v", 2),
    ("vs", 3),
    ("vb", 4),
    ("s", 5),
    ("t", 6),
    ("ut", 7),
    ("vd", 8),
];

/// Writes a JSON pack the way a CBOR sensor would: integer labels, integers as CBOR integers,
/// `vd` as a byte string (when it is valid base64url; otherwise left as text).
fn to_cbor(json: &Json) -> Vec<u8> {
    fn write(e: &mut Encoder<Vec<u8>>, v: &Json, key: Option<&str>) {
        let r = match v {
            Json::Null => e.null().map(drop),
            Json::Bool(b) => e.bool(*b).map(drop),
            Json::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
                (Some(u), _, _) => e.u64(u).map(drop),
                (None, Some(i), _) => e.i64(i).map(drop),
                (None, None, Some(f)) => e.f64(f).map(drop),
                (None, None, None) => e.null().map(drop),
            },
            Json::String(s) => match (key, base64url_decode(s)) {
                (Some("vd"), Some(data)) => e.bytes(&data).map(drop),
                _ => e.str(s).map(drop),
            },
            Json::Array(items) => {
                let r = e.array(items.len() as u64).map(drop);
                for item in items {
                    write(e, item, None);
                }
                r
            }
            Json::Object(map) => {
                let r = e.map(map.len() as u64).map(drop);
                for (k, item) in map {
                    let _ = match LABELS.iter().find(|(l, _)| l == k) {
                        Some((_, label)) => e.i64(*label),
                        None => e.str(k),
                    };
                    write(e, item, Some(k));
                }
                r
            }
        };
        assert!(r.is_ok());
    }
    let mut e = Encoder::new(Vec::new());
    write(&mut e, json, None);
    e.into_writer()
}

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn cbor(bytes: &[u8]) -> Result<Vec<Record>, String> {
    decode_cbor(bytes, NOW, &Limits::default()).map_err(|e| e.to_string())
}

/// JSON packs, valid and not: the CBOR form of each decodes to the same records, or is
/// refused with the same message.
#[test]
fn cbor_means_what_json_means() {
    let packs = [
        r#"[{"n":"urn:dev:ow:10e2073a01080063","u":"Cel","v":23.1}]"#,
        r#"[{"bn":"urn:dev:ow:10e2073a01080063:","bt":1.320067464e9,"bu":"%RH","v":20},
            {"u":"lon","v":24.30621},{"u":"lat","v":60.07965},
            {"t":60,"v":20.3},{"u":"lon","t":60,"v":24.30622},{"u":"lat","t":60,"v":60.07965},
            {"t":120,"v":20.7},{"u":"lon","t":120,"v":24.30623},{"u":"lat","t":120,"v":60.07966},
            {"u":"%EL","t":150,"v":98},{"t":180,"v":21.2},{"u":"lon","t":180,"v":24.30628},
            {"u":"lat","t":180,"v":60.07967}]"#,
        r#"[{"bn":"urn:dev:ow:10e2073a0108006:","bt":1.276020076001e9,"bu":"A","bver":5},
            {"n":"voltage","u":"V","v":120.1},{"n":"current","t":-5,"v":1.2},
            {"n":"current","t":-4,"v":1.3},{"n":"current","t":-3,"v":1.4}]"#,
        r#"[{"bn":"dev:","n":"door","vb":true},{"n":"label","vs":"hall"},{"n":"blob","vd":"aGkgCg"},
            {"n":"energy","u":"kWh","s":12.5,"bs":100},{"n":"rel","t":-10,"v":1,"ut":30}]"#,
        r#"[{"bn":"dev:","bv":20,"n":"t","v":1.5},{"n":"t2","v":-2}]"#,
        r#"{"n":"a","v":1}"#,
        "[1]",
        r#"[{"n":"a","v":1},{"n":"x y","v":1}]"#,
        r#"[{"n":"-a","v":1}]"#,
        r#"[{"bn":"dev:","n":"ä","v":1}]"#,
        r#"[{"v":1}]"#,
        r#"[{"n":"a"}]"#,
        r#"[{"bn":"a","bv":3}]"#,
        r#"[{"n":"a","v":1,"vb":true}]"#,
        r#"[{"n":"a","v":"1"}]"#,
        r#"[{"n":"a","vb":1}]"#,
        r#"[{"n":5,"v":1}]"#,
        r#"[{"n":"a","v":1,"bver":11}]"#,
        r#"[{"n":"a","v":1,"bver":0}]"#,
        r#"[{"n":"a","v":1,"bver":-3}]"#,
        r#"[{"n":"a","v":1,"bver":2.5}]"#,
        r#"[{"n":"a","v":1,"crit_":1}]"#,
        r#"[{"n":"a","v":1,"extension":{"deep":[1,2,{"x":null}]}}]"#,
        r#"[{"n":"a","vd":"a"}]"#,
        r#"[{"n":"a","vd":5}]"#,
        r#"[{"n":"a","v":null}]"#,
        r#"[{"n":"a","v":1.5e308,"bv":1.5e308}]"#,
        r#"[{"n":"a","v":1,"bt":1.7e308,"t":1.7e308}]"#,
        r#"[{"n":"a","v":-18446744073709551615}]"#,
    ];
    for pack in packs {
        let json: Json = serde_json::from_str(pack).expect("test pack is JSON");
        let from_json =
            decode_json(pack.as_bytes(), NOW, &Limits::default()).map_err(|e| e.to_string());
        let bytes = to_cbor(&json);
        assert_eq!(Format::of(&bytes), Format::Cbor, "{pack}");
        assert_eq!(cbor(&bytes), from_json, "{pack}");
        assert_eq!(
            decode(&bytes, NOW, &Limits::default()).map_err(|e| e.to_string()),
            from_json
        );
    }
}

/// The example of docs/SENSORS.md, byte for byte.
#[test]
fn documented_example() {
    // [{-2: "room-12-desk:", -3: 1764000000, 0: "co2", 1: "ppm", 2: 812},
    //  {0: "temperature", 1: "Cel", 2: 21.5}, {0: "humidity", 1: "%RH", 2: 41},
    //  {0: "motion", 4: true}]
    let bytes = hex("84
        a5 21 6d 726f6f6d2d31322d6465736b3a 22 1a 69248100 00 63 636f32 01 63 70706d 02 19 032c
        a3 00 6b 74656d7065726174757265 01 63 43656c 02 f9 4d60
        a3 00 68 68756d6964697479 01 63 255248 02 18 29
        a2 00 66 6d6f74696f6e 04 f5");
    assert_eq!(bytes.len(), 90);
    let json = r#"[{"bn":"room-12-desk:","bt":1764000000,"n":"co2","u":"ppm","v":812},
       {"n":"temperature","u":"Cel","v":21.5},{"n":"humidity","u":"%RH","v":41},
       {"n":"motion","vb":true}]"#;
    let want = decode_json(json.as_bytes(), NOW, &Limits::default()).expect("JSON decodes");
    assert_eq!(want.len(), 4);
    assert_eq!(want[1].name, "room-12-desk:temperature");
    assert_eq!(want[3].value, Some(Value::Bool(true)));
    assert!(want.iter().all(|r| r.time_s == 1_764_000_000.0));
    assert_eq!(cbor(&bytes), Ok(want));
}

#[test]
fn cbor_number_forms() {
    // {0: "a", 2: <value>} with the value written in each form RFC 8428 §6 allows.
    let cases: &[(&str, f64)] = &[
        ("00", 0.0),
        ("17", 23.0),
        ("1903e8", 1000.0),
        ("1bffffffffffffffff", 18_446_744_073_709_551_615.0),
        ("20", -1.0),
        ("3903e7", -1000.0),
        ("3bffffffffffffffff", -18_446_744_073_709_551_616.0),
        ("f93e00", 1.5),
        ("f9c400", -4.0),
        ("f90001", 5.960_464_477_539_063e-8),
        ("f97bff", 65504.0),
        ("fa47c35000", 100_000.0),
        ("fb3ff199999999999a", 1.1),
        // Decimal fractions: 273.15 = 27315e-2, and -1.5 = -15e-1.
        ("c4 82 21 19 6ab3", 273.15),
        ("c4 82 20 2e", -1.5),
    ];
    for (value, want) in cases {
        let bytes = hex(&format!("81 a2 00 61 61 02 {value}"));
        let got = cbor(&bytes);
        assert_eq!(
            got.as_ref().map(|r| r[0].value.clone()),
            Ok(Some(Value::Number(*want))),
            "{value}"
        );
    }
    // Not finite, or numbers in forms that are not numbers.
    for (value, want) in [
        ("f97c00", "record 0: field `v` is not a finite number"),
        ("f97e00", "record 0: field `v` is not a finite number"),
        (
            "fb7ff8000000000000",
            "record 0: field `v` is not a finite number",
        ),
        (
            "c4 82 19 ffff 01",
            "record 0: field `v` is not a finite number",
        ),
        ("c2 41 01", "record 0: field `v` must be a number"),
        ("c1 1a 69259720", "record 0: field `v` must be a number"),
        ("c4 83 01 01 01", "record 0: field `v` must be a number"),
        ("f6", "record 0: field `v` must be a number"),
    ] {
        let bytes = hex(&format!("81 a2 00 61 61 02 {value}"));
        assert_eq!(cbor(&bytes), Err(want.to_owned()), "{value}");
    }
}

#[test]
fn cbor_structure() {
    let one = |extra: &str| hex(&format!("81 a2 00 61 61 02 01 {extra}"));
    // Indefinite-length pack and record, and the self-described CBOR tag.
    for bytes in [
        hex("9f a2 00 61 61 02 01 ff"),
        hex("81 bf 00 61 61 02 01 ff"),
        hex("9f bf 00 61 61 02 01 ff ff"),
        hex("d9d9f7 81 a2 00 61 61 02 01"),
    ] {
        let got = cbor(&bytes).expect("decodes");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].name, "a");
    }
    // Unknown integer labels and text keys are ignored; text keys do not name RFC fields.
    assert_eq!(
        cbor(&hex("81 a4 00 61 61 02 01 18 63 f6 61 76 62 7878")).map(|r| r.len()),
        Ok(1)
    );
    assert_eq!(
        cbor(&hex("81 a2 61 6e 61 61 02 01")),
        Err("record 0: no name (neither `bn` nor `n`)".into())
    );
    // Data is a byte string; text is still read as base64url.
    let data = cbor(&hex("81 a2 00 61 61 08 43 010203")).expect("decodes");
    assert_eq!(data[0].value, Some(Value::Data(vec![1, 2, 3])));
    let text = cbor(&hex("81 a2 00 61 61 08 64 41514944")).expect("decodes");
    assert_eq!(text[0].value, Some(Value::Data(vec![1, 2, 3])));
    // bver only as an unsigned integer.
    assert!(cbor(&one("")).is_ok());
    assert!(cbor(&hex("81 a3 00 61 61 02 01 20 0a")).is_ok());
    assert_eq!(
        cbor(&hex("81 a3 00 61 61 02 01 20 f94900")),
        Err("record 0: `bver` must be a positive integer".into())
    );
    for (bytes, want) in [
        (
            hex("81 a3 00 61 61 02 01 02 02"),
            "record 0: field `v` appears twice",
        ),
        (
            hex("81 a3 00 61 61 02 01 65 637269745f 01"),
            "record 0: must-understand field `crit_` is not supported",
        ),
        (
            hex("a2 00 61 61 02 01"),
            "a SenML pack must be an array of records",
        ),
        (
            hex("c1 81 a2 00 61 61 02 01"),
            "a SenML pack must be an array of records",
        ),
        (hex("81 01"), "record 0: not a JSON object (CBOR map)"),
        (
            hex("82 a2 00 61 61 02 01 a2 00 62 2061 02 01"),
            "record 1: name ` a` has invalid characters",
        ),
    ] {
        assert_eq!(cbor(&bytes), Err(want.to_owned()));
    }
}

#[test]
fn malformed_cbor_is_refused_whatever_the_records_hold() {
    for (bytes, why) in [
        (hex(""), "empty"),
        (hex("81"), "truncated pack"),
        (hex("81 a2 00 61 61 02"), "truncated record"),
        (hex("81 a2 00 62 61"), "truncated string"),
        (hex("82 a2 00 61 61 02 01 ff"), "stray break"),
        (hex("81 a2 00 62 c328 02 01"), "invalid UTF-8"),
        (hex("81 a2 00 61 61 02 01 00"), "trailing item"),
        (
            hex("81 a2 00 61 61 02 1c"),
            "reserved additional information",
        ),
        (
            hex("9f a2 00 61 61 02 01"),
            "indefinite pack without its break",
        ),
        (
            hex("81 bf 00 61 61 02 ff"),
            "indefinite map with a key and no value",
        ),
        // A first record the resolver would refuse does not hide a malformed second one.
        (hex("82 01 1c"), "bad record, then malformed"),
        // Hostile lengths: nothing is allocated for them, the input runs out first.
        (hex("9b ffffffffffffffff 01"), "array of 2^64-1 items"),
        (hex("81 bb ffffffffffffffff 00"), "map of 2^64-1 pairs"),
        (hex("81 a1 00 7b ffffffffffffffff"), "text of 2^64-1 bytes"),
    ] {
        let got = decode_cbor(&bytes, NOW, &Limits::default());
        assert!(matches!(got, Err(SenmlError::Cbor(_))), "{why}: {got:?}");
        assert_eq!(got.map_err(|e| e.kind()), Err("cbor"));
    }
    // Deep nesting is refused without recursing through it.
    let mut deep = vec![0x81u8; 100_000];
    deep.push(0x01);
    let limits = Limits {
        max_payload_bytes: usize::MAX,
        ..Limits::default()
    };
    assert!(matches!(
        decode_cbor(&deep, NOW, &limits),
        Err(SenmlError::Cbor(e)) if e.contains("nested deeper")
    ));
    // Fifteen levels are fine (an extension field nested inside a record).
    let mut nested = hex("81 a3 00 61 61 02 01 61 78");
    nested.extend(std::iter::repeat_n(0x81u8, MAX_DEPTH - 3));
    nested.push(0x01);
    assert!(cbor(&nested).is_ok());
    nested.insert(nested.len() - 1, 0x81);
    assert!(cbor(&nested).is_err());
}

#[test]
fn cbor_limits() {
    let limits = Limits {
        max_payload_bytes: 40,
        max_records: 2,
        max_name_len: 5,
    };
    let d = |b: &[u8]| decode_cbor(b, NOW, &limits).map_err(|e| e.to_string());
    assert_eq!(
        d(&[0x80; 41]),
        Err("payload of 41 bytes exceeds the limit of 40".into())
    );
    assert_eq!(
        d(&hex("83 01 01 01")),
        Err("pack of 3 records exceeds the limit of 2".into())
    );
    assert_eq!(
        d(&hex("9f 01 01 01 01 ff")),
        Err("pack of 4 records exceeds the limit of 2".into())
    );
    // A declared count with nothing behind it is malformed, and nothing is reserved for it.
    assert!(d(&hex("9a ffffffff")).is_err_and(|e| e.starts_with("not valid CBOR")));
    assert_eq!(
        d(&hex("81 a2 00 66 616263646566 02 01")),
        Err("record 0: name of 6 bytes exceeds the limit of 5".into())
    );
}

#[test]
fn format_is_told_by_the_first_byte() {
    assert_eq!(Format::of(b"[{\"n\":\"a\",\"v\":1}]"), Format::Json);
    assert_eq!(Format::of(b" \n\t[]"), Format::Json);
    assert_eq!(Format::of(b""), Format::Json);
    assert_eq!(Format::of(b"{}"), Format::Json);
    for first in 0x80..=0xffu8 {
        assert_eq!(Format::of(&[first]), Format::Cbor);
    }
    for first in 0..0x80u8 {
        assert_eq!(Format::of(&[first]), Format::Json);
    }
    assert_eq!(
        decode(b"not json", NOW, &Limits::default()).map_err(|e| e.kind()),
        Err("json")
    );
    assert_eq!(
        decode(&[0x81, 0xff], NOW, &Limits::default()).map_err(|e| e.kind()),
        Err("cbor")
    );
}

proptest! {
    #[test]
    fn cbor_never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512), now in any::<f64>()) {
        if let Ok(records) = decode_cbor(&bytes, now, &Limits::default()) {
            for r in &records {
                prop_assert!(valid_name(&r.name));
                let _ = to_measurement(r);
            }
        }
        let _ = decode(&bytes, now, &Limits::default());
    }

    #[test]
    fn cbor_never_panics_on_packs_with_a_cbor_prefix(
        prefix in prop_oneof![Just(vec![0x81u8]), Just(vec![0x82, 0xa2]), Just(vec![0x9f, 0xbf])],
        rest in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut bytes = prefix;
        bytes.extend(rest);
        let _ = decode_cbor(&bytes, NOW, &Limits::default());
    }

    /// Any JSON pack (valid or not), written as CBOR, decodes to the same records or the same
    /// refusal.
    #[test]
    fn cbor_and_json_agree(json in arb_json(), now in prop_oneof![Just(NOW), any::<f64>()]) {
        let pack = match json {
            Json::Array(_) => json,
            other => Json::Array(vec![other]),
        };
        let text = serde_json::to_vec(&pack).expect("serialisable");
        let from_json = decode_json(&text, now, &Limits::default());
        let from_cbor = decode_cbor(&to_cbor(&pack), now, &Limits::default());
        prop_assert_eq!(from_cbor, from_json);
    }

    /// Any valid pack encodes to JSON and to CBOR, and both decode to the same records.
    #[test]
    fn encoded_records_agree(records in proptest::collection::vec(arb_record(), 0..20)) {
        let limits = Limits { max_payload_bytes: usize::MAX, ..Limits::default() };
        let cbor = encode_cbor(&records);
        prop_assert_eq!(Format::of(&cbor), Format::Cbor);
        prop_assert_eq!(decode_cbor(&cbor, NOW, &limits), Ok(records.clone()));
        prop_assert_eq!(decode(&cbor, NOW, &limits), Ok(records.clone()));
        prop_assert_eq!(decode(&encode_json(&records), NOW, &limits), Ok(records));
    }
}
