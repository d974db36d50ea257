//! Hostile and malformed artifacts, built member by member: each is refused with the error
//! that names the problem, and nothing unverified reaches the payload sink.

mod common;

use atrium_artifact::{Error, Limits, ReadOptions, SignatureStatus, read};
use common::Collect;
use sha2::{Digest, Sha256};
use tar::EntryType;

/// One tar entry, with its name written raw (the tar crate refuses to write unsafe names).
struct M<'a> {
    name: &'a [u8],
    data: &'a [u8],
    kind: EntryType,
}

fn reg<'a>(name: &'a str, data: &'a [u8]) -> M<'a> {
    M {
        name: name.as_bytes(),
        data,
        kind: EntryType::Regular,
    }
}

fn tar_of(members: &[M<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for m in members {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(m.kind);
        h.set_size(if m.kind == EntryType::Regular {
            m.data.len() as u64
        } else {
            0
        });
        h.set_mode(0o644);
        h.as_old_mut().name[..m.name.len()].copy_from_slice(m.name);
        if matches!(m.kind, EntryType::Symlink | EntryType::Link) {
            h.set_link_name("/etc/shadow").expect("link name");
        }
        h.set_cksum();
        let data: &[u8] = if m.kind == EntryType::Regular {
            m.data
        } else {
            &[]
        };
        b.append(&h, data).expect("append");
    }
    b.into_inner().expect("tar")
}

const HEADER_INFO: &str = r#"{"payloads":[{"type":"single-file"}],"artifact_provides":{"artifact_name":"a"},"artifact_depends":{"device_type":["d"]}}"#;
const TYPE_INFO: &str = r#"{"type":"single-file"}"#;

fn header_tar() -> Vec<u8> {
    tar_of(&[
        reg("header-info", HEADER_INFO.as_bytes()),
        reg("headers/0000/type-info", TYPE_INFO.as_bytes()),
        reg("headers/0000/meta-data", b""),
    ])
}

/// An artifact from its header and payload tars, with a manifest listing `listed` payload files
/// (name, content) besides version and header.
fn artifact(
    version: &[u8],
    header: &[u8],
    data: &[u8],
    listed: &[(&str, &[u8])],
    extra: &[M<'_>],
) -> Vec<u8> {
    let mut manifest = String::new();
    let mut lines = vec![
        ("header.tar".to_owned(), hex::encode(Sha256::digest(header))),
        ("version".to_owned(), hex::encode(Sha256::digest(version))),
    ];
    for (name, content) in listed {
        lines.push((
            format!("data/0000/{name}"),
            hex::encode(Sha256::digest(content)),
        ));
    }
    lines.sort();
    for (name, sum) in lines {
        manifest.push_str(&format!("{sum}  {name}\n"));
    }
    let mut members = vec![
        reg("version", version),
        reg("manifest", manifest.as_bytes()),
        reg("header.tar", header),
        reg("data/0000.tar", data),
    ];
    for m in extra {
        members.push(M {
            name: m.name,
            data: m.data,
            kind: m.kind,
        });
    }
    tar_of(&members)
}

const V3: &[u8] = br#"{"format":"mender","version":3}"#;

fn read_all(bytes: &[u8], limits: Limits) -> (Result<atrium_artifact::Artifact, Error>, Collect) {
    let mut sink = Collect::default();
    let options = ReadOptions {
        keys: vec![],
        limits,
    };
    (read(bytes, &options, &mut sink), sink)
}

fn refused(bytes: &[u8]) -> (Error, Collect) {
    let (result, sink) = read_all(bytes, Limits::default());
    match result {
        Ok(_) => panic!("accepted"),
        Err(e) => (e, sink),
    }
}

#[test]
fn a_well_formed_artifact_reads() {
    let data = tar_of(&[reg("file.txt", b"hello")]);
    let bytes = artifact(V3, &header_tar(), &data, &[("file.txt", b"hello")], &[]);
    let (result, sink) = read_all(&bytes, Limits::default());
    let artifact = result.expect("reads");
    assert_eq!(artifact.header.signature, SignatureStatus::Unsigned);
    assert_eq!(sink.files.len(), 1);
    assert_eq!(sink.files[0].1, b"hello");
}

#[test]
fn payload_entries_that_could_escape_are_refused() {
    for (name, kind, reason) in [
        (&b"../evil"[..], EntryType::Regular, "`..`"),
        (b"/etc/passwd", EntryType::Regular, "absolute"),
        (b"sub/file", EntryType::Regular, "plain file names"),
        (b"link", EntryType::Symlink, "links"),
        (b"hard", EntryType::Link, "links"),
        (b"dev", EntryType::Char, "devices"),
        (b"dir", EntryType::Directory, "directories"),
        (b"fifo", EntryType::Fifo, "FIFOs"),
    ] {
        let data = tar_of(&[M {
            name,
            data: b"x",
            kind,
        }]);
        let listed = String::from_utf8_lossy(name).into_owned();
        let bytes = artifact(V3, &header_tar(), &data, &[(&listed, b"x")], &[]);
        let (err, sink) = refused(&bytes);
        assert!(
            matches!(&err, Error::Unsafe { .. }) && err.to_string().contains(reason),
            "{listed}: {err}"
        );
        assert!(sink.files.is_empty(), "{listed} reached the sink");
    }
}

#[test]
fn unsafe_header_entries_are_refused() {
    let header = tar_of(&[
        reg("header-info", HEADER_INFO.as_bytes()),
        reg("headers/0000/../../../etc/cron.d/x", b"* * * * * root sh"),
    ]);
    let bytes = artifact(V3, &header, &tar_of(&[]), &[], &[]);
    let (err, _) = refused(&bytes);
    assert!(matches!(err, Error::Unsafe { .. }), "{err}");

    let header = tar_of(&[
        reg("header-info", HEADER_INFO.as_bytes()),
        M {
            name: b"scripts/ArtifactInstall_Enter_00",
            data: b"",
            kind: EntryType::Symlink,
        },
    ]);
    let bytes = artifact(V3, &header, &tar_of(&[]), &[], &[]);
    let (err, _) = refused(&bytes);
    assert!(err.to_string().contains("links"), "{err}");
}

#[test]
fn header_members_have_size_limits() {
    let big = format!(
        r#"{{"type":"single-file","artifact_provides":{{"k":"{}"}}}}"#,
        "x".repeat(5000)
    );
    let header = tar_of(&[
        reg("header-info", HEADER_INFO.as_bytes()),
        reg("headers/0000/type-info", big.as_bytes()),
    ]);
    let bytes = artifact(V3, &header, &tar_of(&[]), &[], &[]);
    let limits = Limits {
        header_document: 4096,
        ..Limits::default()
    };
    let (result, _) = read_all(&bytes, limits);
    let err = result.expect_err("too large");
    assert!(matches!(err, Error::TooLarge { limit: 4096, .. }), "{err}");

    let limits = Limits {
        header_compressed: 1000,
        ..Limits::default()
    };
    let (result, _) = read_all(&bytes, limits);
    assert!(matches!(result, Err(Error::TooLarge { limit: 1000, .. })));
}

#[test]
fn other_format_versions_and_augmented_artifacts_are_refused() {
    let bytes = artifact(
        br#"{"format":"mender","version":2}"#,
        &header_tar(),
        &tar_of(&[]),
        &[],
        &[],
    );
    let (err, _) = refused(&bytes);
    assert!(
        matches!(&err, Error::Unsupported(m) if m.contains("version 2")),
        "{err}"
    );

    let bytes = artifact(
        br#"{"format":"other","version":3}"#,
        &header_tar(),
        &tar_of(&[]),
        &[],
        &[],
    );
    assert!(matches!(refused(&bytes).0, Error::Format(_)));

    let bytes = tar_of(&[
        reg("version", V3),
        reg(
            "manifest",
            format!("{}  version\n", hex::encode(Sha256::digest(V3))).as_bytes(),
        ),
        reg("manifest-augment", b""),
    ]);
    let (err, _) = refused(&bytes);
    assert!(
        matches!(&err, Error::Unsupported(m) if m.contains("delta")),
        "{err}"
    );
}

#[test]
fn the_manifest_must_account_for_every_file() {
    // A payload file the manifest does not list never reaches the sink.
    let data = tar_of(&[reg("extra.bin", b"smuggled")]);
    let bytes = artifact(V3, &header_tar(), &data, &[], &[]);
    let (err, sink) = refused(&bytes);
    assert!(
        matches!(&err, Error::NotInManifest(n) if n == "data/0000/extra.bin"),
        "{err}"
    );
    assert!(sink.files.is_empty());
    assert_eq!(sink.headers_seen, 1);

    // A listed file that is missing.
    let data = tar_of(&[reg("a", b"1")]);
    let bytes = artifact(V3, &header_tar(), &data, &[("a", b"1"), ("b", b"2")], &[]);
    let (err, _) = refused(&bytes);
    assert!(
        matches!(&err, Error::Missing(n) if n == "data/0000/b"),
        "{err}"
    );

    // The same file twice.
    let data = tar_of(&[reg("a", b"1"), reg("a", b"1")]);
    let bytes = artifact(V3, &header_tar(), &data, &[("a", b"1")], &[]);
    assert!(refused(&bytes).0.to_string().contains("twice"));
}

#[test]
fn member_order_and_count_are_checked() {
    let sum = hex::encode(Sha256::digest(V3));
    // The manifest before the version.
    let bytes = tar_of(&[
        reg("manifest", format!("{sum}  version\n").as_bytes()),
        reg("version", V3),
    ]);
    assert!(refused(&bytes).0.to_string().contains("first member"));
    // Something after the last payload.
    let bytes = artifact(
        V3,
        &header_tar(),
        &tar_of(&[]),
        &[],
        &[reg("data/0001.tar", b"")],
    );
    assert!(
        refused(&bytes)
            .0
            .to_string()
            .contains("after the last payload")
    );
    // header-info with two payloads but one type-info.
    let two = HEADER_INFO.replace(
        r#"[{"type":"single-file"}]"#,
        r#"[{"type":"a"},{"type":"b"}]"#,
    );
    let header = tar_of(&[
        reg("header-info", two.as_bytes()),
        reg("headers/0000/type-info", br#"{"type":"a"}"#),
    ]);
    let bytes = artifact(V3, &header, &tar_of(&[]), &[], &[]);
    assert!(
        refused(&bytes)
            .0
            .to_string()
            .contains("headers/0001/type-info")
    );
    // type-info naming another type than header-info.
    let header = tar_of(&[
        reg("header-info", HEADER_INFO.as_bytes()),
        reg("headers/0000/type-info", br#"{"type":"rootfs-image"}"#),
    ]);
    let bytes = artifact(V3, &header, &tar_of(&[]), &[], &[]);
    assert!(refused(&bytes).0.to_string().contains("type-info says"));
    // meta-data that is not an object.
    let header = tar_of(&[
        reg("header-info", HEADER_INFO.as_bytes()),
        reg("headers/0000/type-info", TYPE_INFO.as_bytes()),
        reg("headers/0000/meta-data", b"[1, 2]"),
    ]);
    let bytes = artifact(V3, &header, &tar_of(&[]), &[], &[]);
    assert!(refused(&bytes).0.to_string().contains("JSON object"));
    // An empty input.
    assert!(refused(b"").0.to_string().contains("empty"));
}

#[test]
fn a_sink_can_refuse_at_the_header() {
    struct Refuse(usize);
    impl atrium_artifact::PayloadSink for Refuse {
        fn header(&mut self, h: &atrium_artifact::Header) -> Result<(), atrium_artifact::BoxError> {
            Err(format!("device type {:?} is not compatible", h.device_types()).into())
        }
        fn file(
            &mut self,
            _: &atrium_artifact::PayloadFile,
            _: &mut dyn std::io::Read,
        ) -> Result<(), atrium_artifact::BoxError> {
            self.0 += 1;
            Ok(())
        }
    }
    let data = tar_of(&[reg("file.txt", b"hello")]);
    let bytes = artifact(V3, &header_tar(), &data, &[("file.txt", b"hello")], &[]);
    let mut sink = Refuse(0);
    let err = read(&bytes[..], &ReadOptions::default(), &mut sink).expect_err("refused");
    assert!(matches!(err, Error::Sink(_)), "{err}");
    assert!(err.to_string().contains("not compatible"));
    assert_eq!(sink.0, 0);
}
