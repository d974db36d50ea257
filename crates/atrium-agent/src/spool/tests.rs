use std::collections::BTreeSet;
use std::io::{BufRead, BufReader as StdBufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;

/// Reading number `i`: its `time_ms` and `value` identify it.
fn reading(i: u64) -> Reading {
    Reading {
        node: format!("urn:dev:mac:{:012x}", i % 7),
        name: "co2".into(),
        time_ms: i as i64,
        value: i as f64,
    }
}

fn readings(range: std::ops::Range<u64>) -> Vec<Reading> {
    range.map(reading).collect()
}

fn ids(batch: &Batch) -> Vec<u64> {
    batch.readings.iter().map(|r| r.time_ms as u64).collect()
}

fn small() -> SpoolLimits {
    SpoolLimits {
        max_bytes: 1 << 30,
        segment_bytes: MIN_SEGMENT_BYTES,
    }
}

fn open(dir: &Path, limits: &SpoolLimits) -> Spool {
    // A child process spawned by a parallel test holds copies of our descriptors (the lock among
    // them) between fork and exec, so a just-released lock can still look taken for a moment.
    for _ in 0..100 {
        match Spool::open(dir, limits.clone()) {
            Err(SpoolError::Locked(_)) => std::thread::sleep(Duration::from_millis(10)),
            other => return other.expect("spool opens"),
        }
    }
    panic!("spool {} stays locked", dir.display());
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = fs::read_dir(dir)
        .expect("dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    files.sort();
    files
}

/// Takes and acks batches until the spool is empty; returns the reading ids in delivery order.
fn drain(spool: &mut Spool, max: usize) -> Vec<u64> {
    let mut out = Vec::new();
    while let Some(batch) = spool.next_batch(max) {
        out.extend(ids(&batch));
        spool.ack(batch.batch_seq).expect("ack");
    }
    out
}

#[test]
fn crc32c_matches_the_standard_check_value() {
    assert_eq!(crc32c(&[b"123456789"]), 0xE306_9283);
    assert_eq!(crc32c(&[b"1234", b"56789"]), 0xE306_9283);
}

#[test]
fn batches_repeat_until_acked_and_seq_is_the_end_position() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut spool = open(dir.path(), &small());
    assert_eq!(spool.next_batch(10), None);
    spool.append(&readings(0..25)).expect("append");
    let first = spool.next_batch(10).expect("batch");
    assert_eq!((first.batch_seq, ids(&first)), (10, (0..10).collect()));
    spool.append(&readings(25..30)).expect("append");
    assert_eq!(
        spool.next_batch(3),
        Some(first.clone()),
        "retransmission carries the same batch"
    );
    spool.ack(10).expect("ack");
    let second = spool.next_batch(100).expect("batch");
    assert_eq!((second.batch_seq, ids(&second)), (30, (10..30).collect()));
    assert_eq!(second.readings[0], reading(10), "contents survive encoding");
    spool.ack(5).expect("stale ack is ignored");
    assert_eq!(spool.next_batch(100), Some(second));
    assert!(matches!(
        spool.ack(31),
        Err(SpoolError::AckBeyondEnd {
            seq: 31,
            appended: 30
        })
    ));
    spool.ack(30).expect("ack");
    assert_eq!(spool.next_batch(100), None);
    let stats = spool.stats();
    assert_eq!(
        (stats.queued_readings, stats.appended_seq, stats.acked_seq),
        (0, 30, 30)
    );
}

#[test]
fn ack_of_a_position_inside_the_batch_moves_there() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut spool = open(dir.path(), &small());
    spool.append(&readings(0..10)).expect("append");
    spool.append(&readings(10..20)).expect("append");
    let _ = spool.next_batch(20);
    spool.ack(13).expect("partial ack");
    let rest = spool.next_batch(100).expect("batch");
    assert_eq!((rest.batch_seq, ids(&rest)), (20, (13..20).collect()));
}

#[test]
fn reopen_keeps_queue_positions_and_acks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = small();
    {
        let mut spool = open(dir.path(), &limits);
        for i in 0..50 {
            spool
                .append(&readings(i * 20..i * 20 + 20))
                .expect("append");
        }
        let b = spool.next_batch(333).expect("batch");
        spool.ack(b.batch_seq).expect("ack");
        let _in_flight = spool.next_batch(100);
    }
    let mut spool = open(dir.path(), &limits);
    assert!(spool.stats().segments > 1, "test should span segments");
    assert_eq!(spool.stats().queued_readings, 1000 - 333);
    let b = spool.next_batch(100).expect("batch");
    assert_eq!((b.batch_seq, ids(&b)), (433, (333..433).collect()));
    assert_eq!(
        drain(&mut spool, 64),
        (333..1000).collect::<Vec<_>>(),
        "the unacked batch comes again first"
    );
    spool.append(&readings(1000..1001)).expect("append");
    drop(spool);
    let mut spool = open(dir.path(), &limits);
    let b = spool.next_batch(100).expect("batch");
    assert_eq!(
        (b.batch_seq, ids(&b)),
        (1001, vec![1000]),
        "positions continue after reopen"
    );
    assert_eq!(spool.stats().segments, 1, "acked segments are deleted");
    assert!(spool.take_incidents().is_empty());
}

#[test]
fn second_open_of_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _spool = open(dir.path(), &small());
    assert!(matches!(
        Spool::open(dir.path(), small()),
        Err(SpoolError::Locked(_))
    ));
}

#[test]
fn invalid_limits_and_oversized_readings_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = [
        SpoolLimits {
            max_bytes: 1 << 20,
            segment_bytes: 100,
        },
        SpoolLimits {
            max_bytes: 1 << 20,
            segment_bytes: 1 << 20,
        },
    ];
    for limits in bad {
        assert!(matches!(
            Spool::open(dir.path(), limits),
            Err(SpoolError::InvalidLimits(_))
        ));
    }
    let mut spool = open(dir.path(), &small());
    let huge = Reading {
        node: "n".repeat(5000),
        ..reading(0)
    };
    assert!(matches!(
        spool.append(&[huge]),
        Err(SpoolError::ReadingTooLarge { .. })
    ));
    let long = Reading {
        name: "x".repeat(70_000),
        ..reading(0)
    };
    assert!(matches!(
        spool.append(&[long]),
        Err(SpoolError::ReadingTooLarge { .. })
    ));
    let limits = SpoolLimits {
        max_bytes: 2 * MIN_SEGMENT_BYTES,
        segment_bytes: MIN_SEGMENT_BYTES,
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut tight = open(dir.path(), &limits);
    assert!(matches!(
        tight.append(&readings(0..200)),
        Err(SpoolError::AppendTooLarge { .. })
    ));
    assert_eq!(spool.stats().appended_seq, 0);
}

#[test]
fn full_spool_drops_oldest_segments_and_counts_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = SpoolLimits {
        max_bytes: 4 * MIN_SEGMENT_BYTES,
        segment_bytes: MIN_SEGMENT_BYTES,
    };
    let mut spool = open(dir.path(), &limits);
    for i in 0..100 {
        spool
            .append(&readings(i * 10..i * 10 + 10))
            .expect("append");
        assert!(spool.stats().queued_bytes <= limits.max_bytes);
    }
    let stats = spool.stats();
    assert!(stats.dropped_readings > 0);
    assert_eq!(stats.dropped_readings + stats.queued_readings, 1000);
    drop(spool);
    let mut spool = open(dir.path(), &limits);
    assert_eq!(
        spool.stats().dropped_readings,
        stats.dropped_readings,
        "drop count is persisted"
    );
    let delivered = drain(&mut spool, 77);
    assert_eq!(
        delivered,
        (stats.dropped_readings..1000).collect::<Vec<_>>(),
        "the newest readings remain, in order"
    );
}

#[test]
fn drop_under_an_outstanding_batch_never_reuses_its_seq_for_other_readings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = SpoolLimits {
        max_bytes: 2 * MIN_SEGMENT_BYTES,
        segment_bytes: MIN_SEGMENT_BYTES,
    };
    let mut spool = open(dir.path(), &limits);
    spool.append(&readings(0..50)).expect("append");
    let in_flight = spool.next_batch(40).expect("batch");
    for i in 0..20 {
        spool
            .append(&readings(50 + i * 20..70 + i * 20))
            .expect("append");
    }
    assert!(spool.stats().dropped_readings >= 50);
    let next = spool.next_batch(40).expect("batch");
    assert_ne!(next.batch_seq, in_flight.batch_seq);
    // The server acks the old batch late: harmless.
    spool.ack(in_flight.batch_seq).expect("late ack");
    assert_eq!(spool.next_batch(40), Some(next));
}

/// Appends 5 records, then cuts the last segment at every byte of the last record: reopening
/// must give exactly the first 4 records, and the spool must keep working.
#[test]
fn torn_last_record_is_truncated_at_every_offset() {
    let template = tempfile::tempdir().expect("tempdir");
    let limits = small();
    let mut spool = open(template.path(), &limits);
    for i in 0..4 {
        spool
            .append(&readings(i * 10..i * 10 + 10))
            .expect("append");
    }
    let before = spool.stats().queued_bytes;
    spool.append(&readings(40..50)).expect("append");
    let after = spool.stats().queued_bytes;
    drop(spool);
    let seg = segment_files(template.path()).pop().expect("segment");
    let full = fs::read(&seg).expect("read");
    assert_eq!(full.len() as u64, after);
    for cut in before..after {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(
            dir.path().join("state"),
            fs::read(template.path().join("state")).expect("state"),
        )
        .expect("copy");
        fs::write(
            dir.path().join(seg.file_name().expect("name")),
            &full[..cut as usize],
        )
        .expect("write");
        let mut spool = open(dir.path(), &limits);
        let incidents = spool.take_incidents();
        if cut > before {
            assert!(
                matches!(incidents.as_slice(), [SpoolError::TornTail { bytes, .. }] if *bytes == cut - before),
                "cut {cut}: {incidents:?}"
            );
        } else {
            assert!(incidents.is_empty());
        }
        assert_eq!(spool.stats().appended_seq, 40, "cut {cut}");
        spool
            .append(&readings(40..45))
            .expect("append after recovery");
        drop(spool);
        let mut spool = open(dir.path(), &limits);
        assert_eq!(
            drain(&mut spool, 7),
            (0..45).collect::<Vec<_>>(),
            "cut {cut}"
        );
        assert_eq!(spool.stats().corrupt_readings, 0);
        assert!(spool.take_incidents().is_empty());
    }
}

#[test]
fn garbage_or_zeros_after_the_last_record_are_truncated() {
    for tail in [
        vec![0u8; 300],
        vec![0xA5; 17],
        b"\x10\x00\x00\x00garbage-garbage!".to_vec(),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut spool = open(dir.path(), &small());
        spool.append(&readings(0..10)).expect("append");
        drop(spool);
        let seg = segment_files(dir.path()).pop().expect("segment");
        let mut f = OpenOptions::new().append(true).open(&seg).expect("open");
        f.write_all(&tail).expect("write");
        drop(f);
        let mut spool = open(dir.path(), &small());
        assert!(matches!(
            spool.take_incidents().as_slice(),
            [SpoolError::TornTail { .. }]
        ));
        spool.append(&readings(10..12)).expect("append");
        assert_eq!(drain(&mut spool, 5), (0..12).collect::<Vec<_>>());
    }
}

/// A flipped byte in a sealed segment loses the rest of that segment (counted, reported) and
/// nothing else.
#[test]
fn corrupt_middle_segment_is_skipped_and_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = small();
    let mut spool = open(dir.path(), &limits);
    for i in 0..60 {
        spool
            .append(&readings(i * 10..i * 10 + 10))
            .expect("append");
    }
    drop(spool);
    let files = segment_files(dir.path());
    assert!(files.len() >= 3);
    let victim = &files[1];
    let base: u64 = victim
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .expect("base");
    let next: u64 = files[2]
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .expect("base");
    let mut bytes = fs::read(victim).expect("read");
    // Into the third record's payload (each record: 8 header + 4 count + 10 readings).
    let record = bytes.len() / ((next - base) as usize / 10);
    bytes[SEGMENT_HEADER as usize + 2 * record + 20] ^= 0xFF;
    fs::write(victim, bytes).expect("write");

    let mut spool = open(dir.path(), &limits);
    assert!(
        spool.take_incidents().is_empty(),
        "sealed segments are not scanned on open"
    );
    let delivered = drain(&mut spool, 25);
    let lost: Vec<u64> = (base + 20..next).collect();
    let expected: Vec<u64> = (0..600).filter(|i| !lost.contains(i)).collect();
    assert_eq!(delivered, expected);
    assert_eq!(spool.stats().corrupt_readings, lost.len() as u64);
    let incidents = spool.take_incidents();
    assert!(
        matches!(incidents.as_slice(), [SpoolError::CorruptSegment { lost: l, .. }] if *l == lost.len() as u64),
        "{incidents:?}"
    );
    drop(spool);
    let spool = open(dir.path(), &limits);
    assert_eq!(
        spool.stats().corrupt_readings,
        lost.len() as u64,
        "persisted"
    );
}

#[test]
fn corrupt_segment_header_loses_that_segment_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = small();
    let mut spool = open(dir.path(), &limits);
    for i in 0..60 {
        spool
            .append(&readings(i * 10..i * 10 + 10))
            .expect("append");
    }
    drop(spool);
    let files = segment_files(dir.path());
    let parse = |p: &Path| -> u64 {
        p.file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse().ok())
            .expect("base")
    };
    assert!(files.len() >= 3);
    let (base, next) = (parse(&files[1]), parse(&files[2]));
    let mut bytes = fs::read(&files[1]).expect("read");
    bytes[0] = b'X';
    fs::write(&files[1], bytes).expect("write");
    let mut spool = open(dir.path(), &limits);
    assert!(matches!(
        spool.take_incidents().as_slice(),
        [SpoolError::CorruptSegment { .. }]
    ));
    assert_eq!(spool.stats().corrupt_readings, next - base);
    let expected: Vec<u64> = (0..base).chain(next..600).collect();
    assert_eq!(drain(&mut spool, 100), expected);
}

#[test]
fn corrupt_header_of_the_newest_segment_skips_its_positions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = small();
    let mut spool = open(dir.path(), &limits);
    for i in 0..30 {
        spool
            .append(&readings(i * 10..i * 10 + 10))
            .expect("append");
    }
    drop(spool);
    let files = segment_files(dir.path());
    let last = files.last().expect("segment");
    let base: u64 = last
        .file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .expect("base");
    let mut bytes = fs::read(last).expect("read");
    bytes[12] ^= 1; // base position in the header
    fs::write(last, bytes).expect("write");
    let mut spool = open(dir.path(), &limits);
    assert!(matches!(
        spool.take_incidents().as_slice(),
        [SpoolError::CorruptSegment { .. }]
    ));
    assert!(
        spool.stats().appended_seq > 300,
        "positions of the unreadable segment are never reused"
    );
    spool.append(&readings(1000..1001)).expect("append");
    let mut expected: Vec<u64> = (0..base).collect();
    expected.push(1000);
    assert_eq!(drain(&mut spool, 64), expected);
}

#[test]
fn corrupt_state_file_resends_instead_of_losing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut spool = open(dir.path(), &small());
    spool.append(&readings(0..30)).expect("append");
    let b = spool.next_batch(10).expect("batch");
    spool.ack(b.batch_seq).expect("ack");
    drop(spool);
    fs::write(dir.path().join("state"), b"nonsense").expect("write");
    let mut spool = open(dir.path(), &small());
    assert!(matches!(
        spool.take_incidents().as_slice(),
        [SpoolError::CorruptState { .. }]
    ));
    assert_eq!(drain(&mut spool, 100), (0..30).collect::<Vec<_>>());
}

#[test]
fn torn_segment_creation_and_stray_files_are_harmless() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut spool = open(dir.path(), &small());
    spool.append(&readings(0..10)).expect("append");
    drop(spool);
    // A crash right after creating the next segment file, before its header was written.
    fs::write(segment_path(dir.path(), 10), b"ATR").expect("write");
    fs::write(dir.path().join("state.tmp"), b"half").expect("write");
    fs::write(dir.path().join("notes.txt"), b"ignored").expect("write");
    let mut spool = open(dir.path(), &small());
    spool.append(&readings(10..20)).expect("append");
    assert_eq!(drain(&mut spool, 6), (0..20).collect::<Vec<_>>());
    assert!(!dir.path().join("state.tmp").exists());
}

#[test]
fn deleted_newest_segment_never_reuses_acked_positions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut spool = open(dir.path(), &small());
    spool.append(&readings(0..10)).expect("append");
    let b = spool.next_batch(100).expect("batch");
    spool.ack(b.batch_seq).expect("ack");
    drop(spool);
    for f in segment_files(dir.path()) {
        fs::remove_file(f).expect("rm");
    }
    let mut spool = open(dir.path(), &small());
    spool.append(&readings(100..101)).expect("append");
    assert_eq!(spool.next_batch(10).map(|b| b.batch_seq), Some(11));
}

/// Recovery and reading must survive any bytes in the files.
#[test]
fn random_file_contents_never_panic() {
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 200,
        ..ProptestConfig::default()
    });
    let strategy = (
        proptest::collection::vec(any::<u8>(), 0..400),
        proptest::collection::vec(any::<u8>(), 0..400),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
        any::<bool>(),
    );
    runner
        .run(&strategy, |(tail_a, tail_b, state, keep_header)| {
            let dir = tempfile::tempdir().expect("tempdir");
            let mut spool = open(dir.path(), &small());
            spool.append(&readings(0..10)).expect("append");
            drop(spool);
            let mut a = segment_header(0).to_vec();
            if !keep_header {
                a.clear();
            }
            a.extend_from_slice(&tail_a);
            fs::write(segment_path(dir.path(), 0), a).expect("write");
            let mut b = segment_header(10).to_vec();
            b.extend_from_slice(&tail_b);
            fs::write(segment_path(dir.path(), 10), b).expect("write");
            if let Some(state) = state {
                fs::write(dir.path().join("state"), state).expect("write");
            }
            let mut spool = open(dir.path(), &small());
            let _ = drain(&mut spool, 3);
            spool
                .append(&readings(0..3))
                .expect("append after recovery");
            prop_assert!(spool.next_batch(10).is_some());
            Ok(())
        })
        .expect("no panics");
}

#[derive(Debug, Clone)]
enum Op {
    Append(u64),
    NextBatch(usize),
    Ack,
    AckStale,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u64..120).prop_map(Op::Append),
        4 => (1usize..150).prop_map(Op::NextBatch),
        3 => Just(Op::Ack),
        1 => Just(Op::AckStale),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Random operations against a model: batches are contiguous runs of the oldest
    /// unacknowledged readings, repeat until acked, survive reopen, and at the end every
    /// appended reading was delivered exactly once or counted as dropped.
    #[test]
    fn behaves_like_the_model(ops in proptest::collection::vec(op(), 1..60), tight in any::<bool>()) {
        let limits = if tight {
            SpoolLimits { max_bytes: 3 * MIN_SEGMENT_BYTES, segment_bytes: MIN_SEGMENT_BYTES }
        } else {
            small()
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let mut spool = open(dir.path(), &limits);
        let mut appended = 0u64;
        let mut delivered: Vec<u64> = Vec::new();
        let mut acked = 0u64;
        let mut outstanding: Option<Batch> = None;
        let mut dropped_when_handed_out = 0;
        for op in ops {
            match op {
                Op::Append(n) => {
                    spool.append(&readings(appended..appended + n)).expect("append");
                    appended += n;
                }
                Op::NextBatch(max) => {
                    let got = spool.next_batch(max);
                    if spool.stats().dropped_readings > dropped_when_handed_out {
                        // Dropping the oldest segment discards the outstanding batch.
                        outstanding = None;
                    }
                    if let Some(prev) = &outstanding {
                        prop_assert_eq!(got.as_ref(), Some(prev), "same batch until acked");
                    }
                    dropped_when_handed_out = spool.stats().dropped_readings;
                    if let Some(b) = &got {
                        let ids = ids(b);
                        // A repeated batch keeps its size whatever `max` is now.
                        prop_assert!(!ids.is_empty() && (outstanding.is_some() || ids.len() <= max));
                        prop_assert!(ids[0] >= acked, "batch starts at or after the ack");
                        prop_assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "contiguous: {:?}", ids);
                        prop_assert_eq!(b.batch_seq, ids[ids.len() - 1] + 1);
                        prop_assert!(b.readings.iter().all(|r| *r == reading(r.time_ms as u64)));
                        // Nothing between the ack and the batch start was skipped without counting.
                        prop_assert!(ids[0] == acked || spool.stats().dropped_readings > 0);
                    } else {
                        prop_assert_eq!(spool.stats().queued_readings, 0);
                    }
                    outstanding = got;
                }
                Op::Ack => {
                    if let Some(b) = outstanding.take()
                        && spool.stats().dropped_readings == dropped_when_handed_out
                    {
                        spool.ack(b.batch_seq).expect("ack");
                        delivered.extend(ids(&b));
                        acked = b.batch_seq;
                    }
                }
                Op::AckStale => {
                    spool.ack(acked.saturating_sub(3)).expect("stale ack");
                }
                Op::Reopen => {
                    drop(spool);
                    spool = open(dir.path(), &limits);
                    outstanding = None;
                    prop_assert!(spool.take_incidents().is_empty());
                }
            }
            let stats = spool.stats();
            prop_assert!(stats.queued_bytes <= limits.max_bytes);
            prop_assert_eq!(stats.appended_seq, appended);
        }
        delivered.extend(drain(&mut spool, 50));
        let stats = spool.stats();
        prop_assert_eq!(stats.corrupt_readings, 0);
        prop_assert!(delivered.windows(2).all(|w| w[0] < w[1]), "in order, no duplicates");
        prop_assert_eq!(delivered.len() as u64 + stats.dropped_readings, appended);
        if !tight {
            prop_assert_eq!(stats.dropped_readings, 0);
        }
        let unique: BTreeSet<_> = delivered.iter().collect();
        prop_assert_eq!(unique.len(), delivered.len());
    }
}

const KILL_DIR_ENV: &str = "ATRIUM_SPOOL_KILL_TEST_DIR";

/// The child half of `kill_9_loses_nothing_acknowledged`: appends forever, printing the number
/// of readings made durable after each append returned.
#[test]
#[ignore = "child process of kill_9_loses_nothing_acknowledged"]
fn kill_9_child_writer() {
    let Ok(dir) = std::env::var(KILL_DIR_ENV) else {
        return;
    };
    let mut spool = open(Path::new(&dir), &small());
    let mut next = spool.stats().appended_seq;
    let mut stdout = io::stdout().lock();
    loop {
        let n = 1 + next % 50;
        spool.append(&readings(next..next + n)).expect("append");
        next += n;
        writeln!(stdout, "{next}").expect("stdout");
        stdout.flush().expect("stdout");
        // Consume and ack now and then so acks and segment deletion race the kill too.
        if next.is_multiple_of(7)
            && let Some(b) = spool.next_batch(120)
        {
            spool.ack(b.batch_seq).expect("ack");
            writeln!(stdout, "acked {}", b.batch_seq).expect("stdout");
        }
    }
}

/// A child process appends in a loop and is killed with SIGKILL at a random moment, several
/// times over the same directory: every append it reported as returned must be delivered.
#[test]
fn kill_9_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("test binary");
    let test_name = format!(
        "{}::kill_9_child_writer",
        module_path!().split_once("::").map_or("", |(_, rest)| rest)
    );
    let mut durable = 0u64;
    let mut acked = 0u64;
    for round in 0..4u64 {
        let mut child = Command::new(&exe)
            .args([
                test_name.as_str(),
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(KILL_DIR_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = StdBufReader::new(stdout).lines();
        let start = Instant::now();
        let wait = Duration::from_millis(150 + 90 * round);
        for line in lines.by_ref() {
            let line = line.expect("line");
            if let Some(seq) = line.strip_prefix("acked ") {
                acked = seq.parse().expect("number");
            } else if let Ok(n) = line.parse::<u64>() {
                durable = n;
            }
            if start.elapsed() > wait {
                break;
            }
        }
        child.kill().expect("SIGKILL");
        // Lines already written before the kill still count as acknowledged appends.
        for line in lines.map_while(Result::ok) {
            if let Some(seq) = line.strip_prefix("acked ") {
                acked = seq.parse().expect("number");
            } else if let Ok(n) = line.parse::<u64>() {
                durable = n;
            }
        }
        let _ = child.wait();
        assert!(durable > 0, "child made progress in round {round}");
        let spool = open(dir.path(), &small());
        let stats = spool.stats();
        assert!(
            stats.appended_seq >= durable,
            "round {round}: {} < {durable}",
            stats.appended_seq
        );
        assert!(
            stats.acked_seq >= acked,
            "round {round}: acks are persisted"
        );
        assert_eq!(stats.corrupt_readings, 0);
    }
    let mut spool = open(dir.path(), &small());
    let delivered = drain(&mut spool, 200);
    let start = delivered.first().copied().unwrap_or(0);
    assert!(
        start <= acked,
        "resends start at or before the last ack seen"
    );
    assert_eq!(
        delivered,
        (start..spool.stats().appended_seq).collect::<Vec<_>>()
    );
    assert!(spool.stats().appended_seq >= durable);
}

/// Release-mode figure: `cargo test --release -- --ignored throughput --nocapture`.
#[test]
#[ignore = "benchmark"]
fn throughput() {
    let dir = match std::env::var("SPOOL_BENCH_DIR") {
        Ok(d) => tempfile::tempdir_in(d).expect("tempdir"),
        Err(_) => tempfile::tempdir().expect("tempdir"),
    };
    let mut spool = open(dir.path(), &SpoolLimits::default());
    let batches = 2000u64;
    let start = Instant::now();
    for i in 0..batches {
        spool
            .append(&readings(i * 100..i * 100 + 100))
            .expect("append");
    }
    let append = start.elapsed();
    let start = Instant::now();
    let delivered = drain(&mut spool, 1000).len();
    let drain_time = start.elapsed();
    let n = (batches * 100) as f64;
    println!(
        "append, batches of 100 with fsync: {:.0} readings/s ({:.2} ms per append); next_batch+ack (1000 per batch): {:.0} readings/s; {} bytes per reading",
        n / append.as_secs_f64(),
        append.as_secs_f64() * 1000.0 / batches as f64,
        delivered as f64 / drain_time.as_secs_f64(),
        encode_records(&readings(0..100), MAX_SEGMENT_BYTES).expect("encode")[0]
            .0
            .len()
            / 100,
    );
}
