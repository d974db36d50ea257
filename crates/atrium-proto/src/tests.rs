use proptest::prelude::*;

use super::*;

fn sample_messages() -> Vec<Message> {
    vec![
        Message::Hello(Hello {
            agent_version: "0.1.0".into(),
            min_protocol: 1,
            max_protocol: 1,
            features: vec!["terminal".into()],
        }),
        Message::Welcome(Welcome {
            protocol: 1,
            device_id: "dev-1".into(),
            server_time_ms: 1_700_000_000_000,
            heartbeat_s: 30,
        }),
        Message::Ping(7),
        Message::Pong(7),
        Message::Inventory(BTreeMap::from([("os".into(), "Debian 12".into())])),
        Message::Telemetry(TelemetryBatch {
            batch_seq: 42,
            readings: vec![Reading {
                node: "node-1".into(),
                name: "co2".into(),
                time_ms: 1,
                value: 612.5,
            }],
        }),
        Message::TelemetryAck(42),
        Message::TwinGet,
        Message::Twin(TwinDocument {
            section: TwinSection::Desired,
            version: 3,
            full: true,
            json: "{}".into(),
        }),
        Message::Command(Command {
            id: 1,
            name: "reboot".into(),
            args_json: "null".into(),
        }),
        Message::CommandResult(CommandResult {
            id: 1,
            ok: true,
            output: String::new(),
        }),
        Message::StreamOpen(StreamOpen {
            stream: 1,
            kind: "terminal".into(),
            params_json: "{}".into(),
            initial_window: 65536,
        }),
        Message::StreamData(StreamData {
            stream: 1,
            data: vec![0, 255, 10],
        }),
        Message::StreamWindow(StreamWindow {
            stream: 1,
            credit: 1024,
        }),
        Message::StreamClose(StreamClose {
            stream: 1,
            exit_code: Some(0),
            reason: None,
        }),
        Message::RenewRequest(RenewRequest {
            csr_der: vec![0x30, 0x82],
        }),
        Message::RenewResponse(RenewResponse {
            chain_der: vec![ByteBuf(vec![1, 2, 3])],
        }),
        Message::Error(ErrorMessage {
            code: 400,
            message: "bad".into(),
        }),
        Message::Goodbye("decommissioned".into()),
        Message::StreamResize(StreamResize {
            stream: 1,
            cols: 132,
            rows: 43,
        }),
        Message::DeploymentOffer(DeploymentOffer {
            deployment: "d-1".into(),
            artifact_id: "a-1".into(),
            artifact_name: "gateway-2.1".into(),
            size: 1 << 30,
            sha256: "ab".repeat(32),
            url: "/api/v1/artifact-downloads/a-1?expires=1&sig=x".into(),
            attempt: 2,
        }),
        Message::DeploymentStatus(DeploymentStatus {
            deployment: "d-1".into(),
            attempt: 2,
            status: "downloading".into(),
            bytes: 4096,
            log: vec!["Download: started".into()],
        }),
        Message::DeploymentCancel(DeploymentCancel {
            deployment: "d-1".into(),
        }),
    ]
}

#[test]
fn every_message_round_trips_and_kinds_are_distinct() {
    let mut kinds = std::collections::BTreeSet::new();
    for (i, message) in sample_messages().into_iter().enumerate() {
        let frame = Frame {
            seq: i as u64 + 1,
            message,
        };
        let bytes = frame.encode();
        assert_eq!(bytes[0], MAGIC);
        assert_eq!(bytes[1], PROTOCOL_VERSION);
        assert!(kinds.insert(bytes[2]), "kind {} used twice", bytes[2]);
        assert_eq!(kind_name(bytes[2]), Some(frame.message.name()));
        assert_eq!(Frame::decode(&bytes), Ok(frame));
    }
    assert_eq!(kinds.len(), 23, "a new message needs a sample here");
}

#[test]
fn header_errors_are_named() {
    let good = Frame {
        seq: 1,
        message: Message::Ping(9),
    }
    .encode();
    let cases: Vec<(Vec<u8>, ProtoError)> = vec![
        (vec![], ProtoError::Truncated(0)),
        (vec![MAGIC, 1], ProtoError::Truncated(2)),
        (vec![0x00, 1, 3, 1, 9], ProtoError::BadMagic(0)),
        (vec![MAGIC, 0, 3, 1, 9], ProtoError::UnsupportedVersion(0)),
        (
            vec![MAGIC, 200, 3, 1, 9],
            ProtoError::UnsupportedVersion(200),
        ),
        (vec![MAGIC, 1, 250, 1, 9], ProtoError::UnknownKind(250)),
        (
            [good.clone(), vec![0]].concat(),
            ProtoError::TrailingBytes(1),
        ),
        (
            vec![0; MAX_FRAME_BYTES + 1],
            ProtoError::TooLarge(MAX_FRAME_BYTES + 1),
        ),
    ];
    for (bytes, want) in cases {
        assert_eq!(Frame::decode(&bytes), Err(want));
    }
}

#[test]
fn truncated_bodies_are_malformed_not_panics() {
    for message in sample_messages() {
        let bytes = Frame { seq: 300, message }.encode();
        for cut in HEADER_BYTES..bytes.len() {
            match Frame::decode(&bytes[..cut]) {
                Err(ProtoError::Malformed { .. }) => {}
                other => panic!("cut at {cut} of {}: {other:?}", bytes.len()),
            }
        }
    }
}

#[test]
fn replayed_skipped_and_in_order_sequences() {
    let mut check = SeqCheck::default();
    assert_eq!(check.check(1), Ok(()));
    assert_eq!(check.check(2), Ok(()));
    assert_eq!(
        check.check(2),
        Err(ProtoError::Sequence {
            expected: 3,
            got: 2
        })
    );
    assert_eq!(
        check.check(5),
        Err(ProtoError::Sequence {
            expected: 3,
            got: 5
        })
    );
    assert_eq!(check.check(3), Ok(()));
}

#[test]
fn counter_numbers_frames_from_one() {
    let mut counter = SeqCounter::default();
    let mut check = SeqCheck::default();
    for _ in 0..3 {
        let frame = Frame::decode(&counter.encode(Message::TwinGet)).expect("decodes");
        check.check(frame.seq).expect("consecutive");
    }
}

#[test]
fn negotiation_picks_highest_common_version() {
    let hello = |min, max| Hello {
        agent_version: String::new(),
        min_protocol: min,
        max_protocol: max,
        features: vec![],
    };
    assert_eq!(negotiate(&hello(1, 1)), Some(1));
    assert_eq!(negotiate(&hello(1, 9)), Some(PROTOCOL_VERSION));
    assert_eq!(negotiate(&hello(PROTOCOL_VERSION + 1, 9)), None);
    assert_eq!(negotiate(&hello(0, 0)), None);
}

fn reading() -> impl Strategy<Value = Reading> {
    (".{0,12}", ".{0,12}", any::<i64>(), any::<f64>()).prop_map(|(node, name, time_ms, value)| {
        Reading {
            node,
            name,
            time_ms,
            value,
        }
    })
}

proptest! {
    #[test]
    fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Frame::decode(&bytes);
    }

    #[test]
    fn decode_never_panics_behind_a_valid_header(kind in 0u8..32, body in proptest::collection::vec(any::<u8>(), 0..256)) {
        let bytes = [vec![MAGIC, PROTOCOL_VERSION, kind], body].concat();
        let _ = Frame::decode(&bytes);
    }

    #[test]
    fn telemetry_round_trips(seq in 1u64.., batch_seq in any::<u64>(), readings in proptest::collection::vec(reading(), 0..20)) {
        let frame = Frame { seq, message: Message::Telemetry(TelemetryBatch { batch_seq, readings }) };
        let decoded = Frame::decode(&frame.encode()).expect("round trip");
        // NaN != NaN, so compare the encodings.
        prop_assert_eq!(decoded.encode(), frame.encode());
    }

    #[test]
    fn stream_data_round_trips(stream in any::<u32>(), data in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let frame = Frame { seq: 1, message: Message::StreamData(StreamData { stream, data }) };
        prop_assert_eq!(Frame::decode(&frame.encode()), Ok(frame));
    }
}
