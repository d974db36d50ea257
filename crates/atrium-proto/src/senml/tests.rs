use proptest::prelude::*;

use super::*;

const NOW: f64 = 1_700_000_000.0;

fn decode(pack: &str) -> Result<Vec<Record>, SenmlError> {
    decode_json(pack.as_bytes(), NOW, &Limits::default())
}

fn rec(name: &str, unit: Option<&str>, value: Value, time_s: f64) -> Record {
    Record {
        name: name.into(),
        unit: unit.map(Into::into),
        value: Some(value),
        sum: None,
        time_s,
        update_time_s: None,
    }
}

fn n(v: f64) -> Value {
    Value::Number(v)
}

/// RFC 8428 §5.1-style packs and their resolved records (§4.6).
#[test]
fn rfc_examples_resolve() {
    let dev = "urn:dev:ow:10e2073a01080063";
    let cases: Vec<(&str, &str, Vec<Record>)> = vec![
        (
            "5.1.1 single datapoint",
            r#"[{"n":"urn:dev:ow:10e2073a01080063","u":"Cel","v":23.1}]"#,
            vec![rec(dev, Some("Cel"), n(23.1), NOW)],
        ),
        (
            "5.1.2 multiple datapoints, base name",
            r#"[{"bn":"urn:dev:ow:10e2073a01080063:","n":"voltage","u":"V","v":120.1},
                {"n":"current","u":"A","v":1.2}]"#,
            vec![
                rec(
                    "urn:dev:ow:10e2073a01080063:voltage",
                    Some("V"),
                    n(120.1),
                    NOW,
                ),
                rec(
                    "urn:dev:ow:10e2073a01080063:current",
                    Some("A"),
                    n(1.2),
                    NOW,
                ),
            ],
        ),
        (
            "5.1.3 multiple measurements, base time and unit, relative times",
            r#"[{"bn":"urn:dev:ow:10e2073a01080063:","bt":1.276020076001e+09,"bu":"A","bver":5,
                 "n":"voltage","u":"V","v":120.1},
                {"n":"current","t":-5,"v":1.2},
                {"n":"current","t":-4,"v":1.3},
                {"n":"current","v":1.7}]"#,
            vec![
                rec(
                    "urn:dev:ow:10e2073a01080063:voltage",
                    Some("V"),
                    n(120.1),
                    1.276020076001e9,
                ),
                rec(
                    "urn:dev:ow:10e2073a01080063:current",
                    Some("A"),
                    n(1.2),
                    1.276020076001e9 - 5.0,
                ),
                rec(
                    "urn:dev:ow:10e2073a01080063:current",
                    Some("A"),
                    n(1.3),
                    1.276020076001e9 - 4.0,
                ),
                rec(
                    "urn:dev:ow:10e2073a01080063:current",
                    Some("A"),
                    n(1.7),
                    1.276020076001e9,
                ),
            ],
        ),
        (
            "5.1.4 resolved data passes through unchanged",
            r#"[{"n":"urn:dev:ow:10e2073a01080063:current","u":"A","t":1276020071.001,"v":1.2}]"#,
            vec![rec(
                "urn:dev:ow:10e2073a01080063:current",
                Some("A"),
                n(1.2),
                1276020071.001,
            )],
        ),
        (
            "5.1.5 multiple data types; vd is base64url",
            r#"[{"bn":"urn:dev:ow:10e2073a01080063:","n":"temperature","u":"Cel","v":23.1},
                {"n":"label","vs":"Machine Room"},
                {"n":"open","vb":false},
                {"n":"nfc-reader","vd":"aGkgCg"}]"#,
            vec![
                rec(
                    "urn:dev:ow:10e2073a01080063:temperature",
                    Some("Cel"),
                    n(23.1),
                    NOW,
                ),
                rec(
                    "urn:dev:ow:10e2073a01080063:label",
                    None,
                    Value::String("Machine Room".into()),
                    NOW,
                ),
                rec(
                    "urn:dev:ow:10e2073a01080063:open",
                    None,
                    Value::Bool(false),
                    NOW,
                ),
                rec(
                    "urn:dev:ow:10e2073a01080063:nfc-reader",
                    None,
                    Value::Data(b"hi \n".to_vec()),
                    NOW,
                ),
            ],
        ),
        (
            "5.1.6 collection of resources, base name only, relative time in the past",
            r#"[{"bn":"2001:db8::2/","n":"temperature","u":"Cel","v":25.2,"t":-60},
                {"bn":"urn:dev:ow:10e2073a01080063","u":"%RH","v":21.2}]"#,
            vec![
                rec("2001:db8::2/temperature", Some("Cel"), n(25.2), NOW - 60.0),
                rec(dev, Some("%RH"), n(21.2), NOW),
            ],
        ),
        (
            "base value, base sum, update time",
            r#"[{"bn":"meter/","bv":100,"bs":1000,"n":"energy","u":"J","v":5,"s":7,"ut":30},
                {"n":"energy","s":1},
                {"bv":0,"n":"energy","v":5}]"#,
            vec![
                Record {
                    name: "meter/energy".into(),
                    unit: Some("J".into()),
                    value: Some(n(105.0)),
                    sum: Some(1007.0),
                    time_s: NOW,
                    update_time_s: Some(30.0),
                },
                Record {
                    name: "meter/energy".into(),
                    unit: None,
                    value: None,
                    sum: Some(1001.0),
                    time_s: NOW,
                    update_time_s: None,
                },
                rec("meter/energy", None, n(5.0), NOW),
            ],
        ),
        (
            "unknown fields are ignored, empty pack is fine",
            r#"[{"n":"a","v":1,"foo":{"bar":[1,2]}}]"#,
            vec![rec("a", None, n(1.0), NOW)],
        ),
        ("empty pack", "[]", vec![]),
    ];
    for (what, pack, want) in cases {
        assert_eq!(decode(pack), Ok(want), "{what}");
    }
}

#[test]
fn refusals_name_the_record_and_reason() {
    let cases = [
        (
            r#"{"n":"a","v":1}"#,
            "a SenML pack must be an array of records",
        ),
        ("[1]", "record 0: not a JSON object (CBOR map)"),
        (
            r#"[{"n":"a","v":1},{"n":"b","v":1},{"n":"c","v":1},{"n":"x y","v":1}]"#,
            "record 3: name `x y` has invalid characters",
        ),
        (
            r#"[{"n":"-a","v":1}]"#,
            "record 0: name `-a` has invalid characters",
        ),
        (
            r#"[{"bn":"dev:","n":"ä","v":1}]"#,
            "record 0: name `dev:ä` has invalid characters",
        ),
        (r#"[{"v":1}]"#, "record 0: no name (neither `bn` nor `n`)"),
        (
            r#"[{"n":"a"}]"#,
            "record 0: no value (one of `v`, `vs`, `vb`, `vd`) and no sum",
        ),
        (
            r#"[{"bn":"a","bv":3}]"#,
            "record 0: no value (one of `v`, `vs`, `vb`, `vd`) and no sum",
        ),
        (
            r#"[{"n":"a","v":1,"vb":true}]"#,
            "record 0: more than one value field",
        ),
        (
            r#"[{"n":"a","v":"1"}]"#,
            "record 0: field `v` must be a number",
        ),
        (
            r#"[{"n":"a","vb":1}]"#,
            "record 0: field `vb` must be a boolean",
        ),
        (r#"[{"n":5,"v":1}]"#, "record 0: field `n` must be a string"),
        (
            r#"[{"n":"a","v":1,"bver":11}]"#,
            "record 0: SenML version 11 is not supported (at most 10)",
        ),
        (
            r#"[{"n":"a","v":1,"bver":0}]"#,
            "record 0: `bver` must be a positive integer",
        ),
        (
            r#"[{"n":"a","v":1,"bver":2.5}]"#,
            "record 0: `bver` must be a positive integer",
        ),
        (
            r#"[{"n":"a","v":1,"crit_":1}]"#,
            "record 0: must-understand field `crit_` is not supported",
        ),
        (
            r#"[{"n":"a","vd":"a"}]"#,
            "record 0: `vd` is not valid base64url",
        ),
        (
            r#"[{"n":"a","vd":"aGk="}]"#,
            "record 0: `vd` is not valid base64url",
        ),
        (
            r#"[{"n":"a","v":1.5e308,"bv":1.5e308}]"#,
            "record 0: field `v` is not a finite number",
        ),
        (
            r#"[{"n":"a","v":1,"bt":1.7e308,"t":1.7e308}]"#,
            "record 0: field `t` is not a finite number",
        ),
    ];
    for (pack, want) in cases {
        let got = decode(pack).map_err(|e| e.to_string());
        assert_eq!(got, Err(want.to_owned()), "{pack}");
    }
    // Numbers beyond f64 are refused by the JSON parser itself.
    assert!(matches!(
        decode(r#"[{"n":"a","v":1e400}]"#),
        Err(SenmlError::Json(_))
    ));
}

#[test]
fn limits_are_enforced() {
    let limits = Limits {
        max_payload_bytes: 40,
        max_records: 2,
        max_name_len: 5,
    };
    let d = |s: &str| decode_json(s.as_bytes(), NOW, &limits).map_err(|e| e.to_string());
    assert_eq!(
        d(&format!("[{}]", " ".repeat(40))),
        Err("payload of 42 bytes exceeds the limit of 40".into())
    );
    assert_eq!(
        d(r#"[{"n":"a","v":1},{"n":"a","v":1},{"n":"a","v":1}]"#).map(|_| ()),
        Err("payload of 49 bytes exceeds the limit of 40".into())
    );
    assert_eq!(
        d("[1,2,3]"),
        Err("pack of 3 records exceeds the limit of 2".into())
    );
    assert_eq!(
        d(r#"[{"n":"abcdef","v":1}]"#),
        Err("record 0: name of 6 bytes exceeds the limit of 5".into())
    );
    assert!(d(r#"[{"bn":"ab:","n":"cd","v":1}]"#).is_ok());
    let defaults = Limits::default();
    assert_eq!(
        (
            defaults.max_payload_bytes,
            defaults.max_records,
            defaults.max_name_len
        ),
        (65536, 1000, 128)
    );
}

#[test]
fn base_fields_carry_over_until_replaced() {
    let got = decode(
        r#"[{"bn":"a:","bu":"ppm","bt":1.7e9,"n":"x","v":1},{"n":"y","t":2,"v":2},{"bn":"b/","n":"z","u":"lx","v":3}]"#,
    )
    .expect("valid pack");
    let summary: Vec<_> = got
        .iter()
        .map(|r| (r.name.as_str(), r.unit.as_deref(), r.time_s))
        .collect();
    assert_eq!(
        summary,
        [
            ("a:x", Some("ppm"), 1.7e9),
            ("a:y", Some("ppm"), 1.7e9 + 2.0),
            ("b/z", Some("lx"), 1.7e9)
        ]
    );
}

#[test]
fn relative_time_boundary_is_two_to_the_28() {
    let at = |t: f64| decode(&format!(r#"[{{"n":"a","v":1,"t":{t}}}]"#)).expect("valid")[0].time_s;
    assert_eq!(at(268_435_455.0), NOW + 268_435_455.0);
    assert_eq!(at(268_435_456.0), 268_435_456.0);
    assert_eq!(at(-10.0), NOW - 10.0);
}

/// (pack, expected node, quantity, value) or the error kind.
#[test]
fn measurements_table() {
    type Want = Result<(&'static str, Quantity, f64), &'static str>;
    let mac = "urn:dev:mac:0024befffe804ff1";
    let cases: &[(&str, Want)] = &[
        (
            r#"[{"bn":"urn:dev:mac:0024befffe804ff1:","n":"co2","u":"ppm","v":612}]"#,
            Ok((mac, Quantity::Co2, 612.0)),
        ),
        (
            r#"[{"n":"urn:dev:mac:0024befffe804ff1:co2","u":"ppm","v":612}]"#,
            Ok((mac, Quantity::Co2, 612.0)),
        ),
        (
            r#"[{"bn":"desk-3/","n":"temperature","u":"Cel","v":21.5}]"#,
            Ok(("desk-3", Quantity::Temperature, 21.5)),
        ),
        (
            r#"[{"bn":"desk-3/","n":"Temp","u":"K","v":294.65}]"#,
            Ok(("desk-3", Quantity::Temperature, 21.5)),
        ),
        (
            r#"[{"bn":"d/","n":"humidity","u":"%RH","v":45}]"#,
            Ok(("d", Quantity::Humidity, 45.0)),
        ),
        (
            r#"[{"bn":"d/","n":"light","u":"lx","v":350}]"#,
            Ok(("d", Quantity::Light, 350.0)),
        ),
        (
            r#"[{"bn":"d/","n":"motion","vb":true}]"#,
            Ok(("d", Quantity::Motion, 1.0)),
        ),
        (
            r#"[{"bn":"d/","n":"motion","u":"/","v":0}]"#,
            Ok(("d", Quantity::Motion, 0.0)),
        ),
        (
            r#"[{"bn":"d/","n":"door","vb":false}]"#,
            Ok(("d", Quantity::Door, 0.0)),
        ),
        (
            r#"[{"bn":"d/","n":"door","v":1}]"#,
            Ok(("d", Quantity::Door, 1.0)),
        ),
        (
            r#"[{"bn":"d/","n":"people","u":"count","v":4}]"#,
            Ok(("d", Quantity::PeopleCount, 4.0)),
        ),
        (
            r#"[{"bn":"d/","n":"people","v":4}]"#,
            Ok(("d", Quantity::PeopleCount, 4.0)),
        ),
        (
            r#"[{"bn":"d/","n":"sound","u":"dB","v":42}]"#,
            Ok(("d", Quantity::Sound, 42.0)),
        ),
        (
            r#"[{"bn":"d/","n":"sound","u":"V","v":0.1}]"#,
            Ok(("d", Quantity::Sound, -20.0)),
        ),
        (r#"[{"n":"co2","u":"ppm","v":612}]"#, Err("no_node")),
        (r#"[{"n":"d:","u":"ppm","v":612}]"#, Err("no_node")),
        (
            r#"[{"bn":"d/","n":"pressure","u":"Pa","v":1e5}]"#,
            Err("unknown_quantity"),
        ),
        (
            r#"[{"bn":"d/","n":"co2","v":612}]"#,
            Err("unsupported_unit"),
        ),
        (
            r#"[{"bn":"d/","n":"temperature","u":"degF","v":70}]"#,
            Err("unsupported_unit"),
        ),
        (
            r#"[{"bn":"d/","n":"co2","u":"ppm","vb":true}]"#,
            Err("wrong_value_kind"),
        ),
        (
            r#"[{"bn":"d/","n":"co2","u":"ppm","vs":"high"}]"#,
            Err("wrong_value_kind"),
        ),
        (
            r#"[{"bn":"d/","n":"co2","u":"ppm","s":5}]"#,
            Err("wrong_value_kind"),
        ),
        (
            r#"[{"bn":"d/","n":"co2","u":"ppm","v":-1}]"#,
            Err("out_of_range"),
        ),
        (r#"[{"bn":"d/","n":"motion","v":0.5}]"#, Err("out_of_range")),
        (
            r#"[{"bn":"d/","n":"humidity","u":"%RH","v":101}]"#,
            Err("out_of_range"),
        ),
        (
            r#"[{"bn":"d/","n":"sound","u":"V","v":0}]"#,
            Err("out_of_range"),
        ),
        (
            r#"[{"bn":"d/","n":"co2","u":"ppm","v":600,"t":1e300}]"#,
            Err("time_out_of_range"),
        ),
    ];
    for (pack, want) in cases {
        let records = decode(pack).expect(pack);
        let got = to_measurement(&records[0]);
        match (got, want) {
            (Ok(m), Ok((node, quantity, value))) => {
                assert_eq!((m.node.as_str(), m.quantity), (*node, *quantity), "{pack}");
                assert!(
                    (m.value - value).abs() < 1e-9,
                    "{pack}: {} != {value}",
                    m.value
                );
                assert_eq!(m.time_ms, (NOW * 1000.0) as i64, "{pack}");
            }
            (Err(e), Err(kind)) => assert_eq!(e.kind(), *kind, "{pack}: {e}"),
            (got, want) => panic!("{pack}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn measurement_errors_read_well() {
    let m =
        |pack: &str| to_measurement(&decode(pack).expect("valid")[0]).map_err(|e| e.to_string());
    assert_eq!(
        m(r#"[{"bn":"d/","n":"temperature","u":"degF","v":70}]"#),
        Err("temperature in unit `degF` is not supported (accepted: Cel, K)".into())
    );
    assert_eq!(
        m(r#"[{"bn":"d/","n":"co2","v":1}]"#),
        Err("co2 in unit (none) is not supported (accepted: ppm)".into())
    );
    assert_eq!(
        m(r#"[{"bn":"d/","n":"door","vs":"open"}]"#),
        Err("door needs a number or boolean, got a string".into())
    );
    assert_eq!(
        m(r#"[{"bn":"d/","n":"pm25","v":1}]"#),
        Err("unknown quantity `pm25` in name `d/pm25`".into())
    );
}

#[test]
fn quantity_table_is_consistent() {
    let all = [
        Quantity::Co2,
        Quantity::Temperature,
        Quantity::Humidity,
        Quantity::Light,
        Quantity::Motion,
        Quantity::Door,
        Quantity::PeopleCount,
        Quantity::Sound,
    ];
    assert_eq!(QUANTITIES.len(), all.len());
    for q in all {
        assert_eq!(
            QUANTITIES.iter().filter(|s| s.quantity == q).count(),
            1,
            "{q:?}"
        );
    }
    let mut names: Vec<_> = QUANTITIES.iter().flat_map(|s| s.names.iter()).collect();
    let before = names.len();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), before, "a name maps to two quantities");
    let reading = Reading::from(Measurement {
        node: "d".into(),
        quantity: Quantity::PeopleCount,
        value: 2.0,
        time_ms: 5,
    });
    assert_eq!(reading.name, "people");
}

#[test]
fn base64url_round_trips() {
    for len in 0..20 {
        let data: Vec<u8> = (0..len).map(|i| (i * 37 + 250) as u8).collect();
        let enc = base64url_encode(&data);
        assert!(!enc.contains('='));
        assert_eq!(base64url_decode(&enc), Some(data));
    }
    assert_eq!(base64url_encode(b"hi \n"), "aGkgCg");
}

fn arb_name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9][a-zA-Z0-9:./_-]{0,40}"
}

fn arb_finite() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>().prop_filter("finite", |v| v.is_finite()),
        (-100_000i64..100_000).prop_map(|v| v as f64 / 10.0),
    ]
}

pub(super) fn arb_record() -> impl Strategy<Value = Record> {
    let value = prop_oneof![
        arb_finite().prop_map(Value::Number),
        any::<String>().prop_map(Value::String),
        any::<bool>().prop_map(Value::Bool),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(Value::Data),
    ];
    (
        arb_name(),
        proptest::option::of("[a-zA-Z%/]{1,6}"),
        proptest::option::of(value),
        proptest::option::of(arb_finite()),
        RELATIVE_TIME_LIMIT_S..4.0e9,
        proptest::option::of(0.0..1e6f64),
    )
        .prop_filter("value or sum", |(_, _, v, s, _, _)| {
            v.is_some() || s.is_some()
        })
        .prop_map(|(name, unit, value, sum, time_s, update_time_s)| Record {
            name,
            unit,
            value,
            sum,
            time_s,
            update_time_s,
        })
}

pub(super) fn arb_json() -> impl Strategy<Value = Json> {
    let key = prop_oneof![
        Just("bn".to_owned()),
        Just("bt".to_owned()),
        Just("bu".to_owned()),
        Just("bv".to_owned()),
        Just("bs".to_owned()),
        Just("bver".to_owned()),
        Just("n".to_owned()),
        Just("u".to_owned()),
        Just("v".to_owned()),
        Just("vs".to_owned()),
        Just("vb".to_owned()),
        Just("vd".to_owned()),
        Just("s".to_owned()),
        Just("t".to_owned()),
        Just("ut".to_owned()),
        ".{0,4}",
    ];
    let leaf = prop_oneof![
        Just(Json::Null),
        any::<bool>().prop_map(Json::from),
        any::<f64>().prop_map(Json::from),
        any::<i64>().prop_map(Json::from),
        any::<u64>().prop_map(Json::from),
        ".{0,10}".prop_map(Json::from),
        "[a-z0-9:/]{0,10}".prop_map(Json::from),
    ];
    leaf.prop_recursive(4, 64, 8, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Json::Array),
            proptest::collection::btree_map(key.clone(), inner, 0..8)
                .prop_map(|m| Json::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #[test]
    fn never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512), now in any::<f64>()) {
        if let Ok(records) = decode_json(&bytes, now, &Limits::default()) {
            for r in &records {
                let _ = to_measurement(r);
            }
        }
    }

    #[test]
    fn never_panics_on_json(json in arb_json(), now in prop_oneof![Just(NOW), any::<f64>()]) {
        // Non-arrays are wrapped so the record paths are exercised too.
        let pack = match json {
            Json::Array(_) => json,
            other => Json::Array(vec![other]),
        };
        let bytes = serde_json::to_vec(&pack).expect("serialisable");
        if let Ok(records) = decode_json(&bytes, now, &Limits::default()) {
            for r in &records {
                prop_assert!(valid_name(&r.name));
                prop_assert!(r.value.is_some() || r.sum.is_some());
                let _ = to_measurement(r);
            }
        }
    }

    #[test]
    fn encoded_records_round_trip(records in proptest::collection::vec(arb_record(), 0..20)) {
        let bytes = encode_json(&records);
        let limits = Limits { max_payload_bytes: usize::MAX, ..Limits::default() };
        prop_assert_eq!(decode_json(&bytes, NOW, &limits), Ok(records));
    }

    #[test]
    fn valid_measurements_round_trip(
        node in "[a-z0-9][a-z0-9-]{0,20}",
        idx in 0..QUANTITIES.len(),
        raw in 0.0..1.0f64,
        time_ms in 300_000_000_000i64..4_000_000_000_000,
    ) {
        let spec = &QUANTITIES[idx];
        let (min, max) = spec.range;
        let value = if spec.binary { raw.round() } else { min + raw * (max - min) };
        let record = Record {
            name: format!("{node}:{}", spec.names[0]),
            unit: spec.units.iter().find(|(_, c)| *c == Conversion::Identity).and_then(|(u, _)| u.map(Into::into)),
            value: Some(Value::Number(value)),
            sum: None,
            time_s: time_ms as f64 / 1000.0,
            update_time_s: None,
        };
        let decoded = decode_json(&encode_json(std::slice::from_ref(&record)), NOW, &Limits::default()).expect("decodes");
        let m = to_measurement(&decoded[0]).expect("maps");
        prop_assert_eq!(m, Measurement { node, quantity: spec.quantity, value, time_ms });
    }
}
