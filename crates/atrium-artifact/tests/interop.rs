//! Interoperability with the real `mender-artifact` (Debian's package), both ways: what it
//! writes reads and verifies here, what Atrium writes passes its `validate` and `read`.

mod common;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::Path;

use atrium_artifact::{
    Compression, DependValue, Error, FileSource, PayloadKind, PayloadSpec, ReadOptions, Script,
    SignatureStatus, SigningKey, VerifyingKey, WriteOptions, WriteSpec, read, sign_artifact, write,
};
use common::{Collect, bytes, make_keys, mender, mender_signs_with, run, s};
use sha2::{Digest, Sha256};

/// The compressions Debian's mender-artifact (3.9) writes and reads.
const MENDER_COMPRESSIONS: [&str; 3] = ["none", "gzip", "lzma"];

fn read_file(
    path: &Path,
    keys: Vec<VerifyingKey>,
) -> Result<(atrium_artifact::Artifact, Collect), Error> {
    let mut sink = Collect::default();
    let options = ReadOptions {
        keys,
        ..Default::default()
    };
    let artifact = read(File::open(path)?, &options, &mut sink)?;
    Ok((artifact, sink))
}

fn public_key(path: &Path) -> VerifyingKey {
    VerifyingKey::from_pem(&fs::read(path).expect("public key file")).expect("public key")
}

fn signing_key(path: &Path) -> SigningKey {
    SigningKey::from_pem(&fs::read(path).expect("key file")).expect("private key")
}

#[test]
fn mender_rootfs_images_read_and_verify() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("rootfs.ext4");
    let content = bytes(7, 300_000);
    fs::write(&image, &content).expect("image");
    let sum = hex::encode(Sha256::digest(&content));
    for compression in MENDER_COMPRESSIONS {
        let out = dir.path().join(format!("rootfs-{compression}.mender"));
        mender(&[
            "write",
            "rootfs-image",
            "-f",
            s(&image),
            "-n",
            "release-1",
            "-t",
            "board-a",
            "-t",
            "board-b",
            "--compression",
            compression,
            "-o",
            s(&out),
        ]);
        let (artifact, sink) = read_file(&out, vec![]).expect(compression);
        let h = &artifact.header;
        assert_eq!(h.name(), "release-1");
        assert_eq!(h.device_types(), ["board-a", "board-b"]);
        assert_eq!(h.signature, SignatureStatus::Unsigned);
        assert_eq!(h.payloads.len(), 1);
        assert_eq!(h.payloads[0].payload_type.as_deref(), Some("rootfs-image"));
        let provides = &h.payloads[0].type_info.artifact_provides;
        assert_eq!(provides.get("rootfs-image.checksum"), Some(&sum));
        assert_eq!(
            provides.get("rootfs-image.version").map(String::as_str),
            Some("release-1")
        );
        assert_eq!(sink.headers_seen, 1);
        assert_eq!(sink.files.len(), 1);
        assert_eq!(sink.files[0].0.name, "rootfs.ext4");
        assert_eq!(sink.files[0].0.size, content.len() as u64);
        assert!(
            sink.files[0].1 == content,
            "payload bytes differ ({compression})"
        );
        let expected_suffix = match compression {
            "none" => "",
            "gzip" => ".gz",
            _ => ".xz",
        };
        assert_eq!(h.compression_suffix, expected_suffix);
    }
}

#[test]
fn mender_module_images_read_with_everything_in_the_header() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = dir.path().join("app.conf");
    let b = dir.path().join("app.bin");
    fs::write(&a, b"setting = 1\n").expect("file");
    fs::write(&b, bytes(3, 70_000)).expect("file");
    let meta = dir.path().join("meta.json");
    fs::write(&meta, r#"{"restart": ["app"], "level": 2}"#).expect("meta");
    let script = dir.path().join("ArtifactInstall_Enter_10_stop-app");
    fs::write(&script, b"#!/bin/sh\nsystemctl stop app\n").expect("script");
    for compression in MENDER_COMPRESSIONS {
        let out = dir.path().join(format!("module-{compression}.mender"));
        mender(&[
            "write",
            "module-image",
            "-T",
            "single-file",
            "-f",
            s(&a),
            "-f",
            s(&b),
            "-n",
            "app-2.0",
            "-t",
            "board-a",
            "-m",
            s(&meta),
            "-s",
            s(&script),
            "-p",
            "app.version:2.0",
            "-d",
            "app.channel:stable",
            "-N",
            "app-1.0",
            "-g",
            "pilot",
            "-G",
            "lab",
            "--clears-provides",
            "app.*",
            "--compression",
            compression,
            "-o",
            s(&out),
        ]);
        let (artifact, sink) = read_file(&out, vec![]).expect(compression);
        let h = &artifact.header;
        assert_eq!(h.name(), "app-2.0");
        assert_eq!(
            h.info.artifact_provides.artifact_group.as_deref(),
            Some("pilot")
        );
        assert_eq!(h.info.artifact_depends.artifact_name, ["app-1.0"]);
        assert_eq!(h.info.artifact_depends.artifact_group, ["lab"]);
        let p = &h.payloads[0];
        assert_eq!(p.payload_type.as_deref(), Some("single-file"));
        assert_eq!(
            p.type_info
                .artifact_provides
                .get("app.version")
                .map(String::as_str),
            Some("2.0")
        );
        assert_eq!(
            p.type_info.artifact_depends.get("app.channel"),
            Some(&DependValue::One("stable".into()))
        );
        let clears = p
            .type_info
            .clears_artifact_provides
            .clone()
            .unwrap_or_default();
        assert!(clears.contains(&"app.*".to_owned()), "{clears:?}");
        let meta = p.meta_data.as_ref().expect("meta-data");
        assert_eq!(meta.get("level"), Some(&serde_json::json!(2)));
        assert_eq!(h.scripts.len(), 1);
        assert_eq!(h.scripts[0].name, "ArtifactInstall_Enter_10_stop-app");
        assert_eq!(h.scripts[0].content, b"#!/bin/sh\nsystemctl stop app\n");
        let names: Vec<_> = sink.files.iter().map(|(f, _)| f.name.as_str()).collect();
        assert_eq!(names, ["app.conf", "app.bin"]);
        assert_eq!(sink.files[1].1, bytes(3, 70_000));
    }
}

#[test]
fn mender_signed_artifacts_verify_with_every_key_form() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = make_keys(dir.path());
    let image = dir.path().join("rootfs.img");
    fs::write(&image, bytes(11, 50_000)).expect("image");
    for (label, key, public) in keys.pairs.iter().filter(|(l, _, _)| mender_signs_with(l)) {
        for compression in ["gzip", "lzma"] {
            let out = dir.path().join(format!("{label}-{compression}.mender"));
            mender(&[
                "write",
                "rootfs-image",
                "-f",
                s(&image),
                "-n",
                "signed-1",
                "-t",
                "board-a",
                "-k",
                s(key),
                "--compression",
                compression,
                "-o",
                s(&out),
            ]);
            let (artifact, _) = read_file(&out, vec![public_key(public)])
                .unwrap_or_else(|e| panic!("{label} {compression}: {e}"));
            assert_eq!(
                artifact.header.signature,
                SignatureStatus::Verified,
                "{label}"
            );
            let (artifact, _) = read_file(&out, vec![]).expect("reads without keys");
            assert_eq!(artifact.header.signature, SignatureStatus::Unverified);
            // Any other key refuses it, whatever its algorithm.
            for (other, _, other_public) in &keys.pairs {
                if other != label {
                    let err = read_file(&out, vec![public_key(other_public)])
                        .expect_err("wrong key must fail");
                    assert!(
                        matches!(err, Error::BadSignature),
                        "{label} vs {other}: {err}"
                    );
                }
            }
        }
    }
    // An unsigned artifact is refused when keys are given.
    let out = dir.path().join("unsigned.mender");
    mender(&[
        "write",
        "rootfs-image",
        "-f",
        s(&image),
        "-n",
        "u",
        "-t",
        "b",
        "-o",
        s(&out),
    ]);
    let err = read_file(&out, vec![public_key(&keys.pairs[0].2)]).expect_err("unsigned");
    assert!(matches!(err, Error::Unsigned), "{err}");
}

fn spec(kind: PayloadKind, files: Vec<FileSource>) -> WriteSpec {
    WriteSpec {
        name: "atrium-release-7".into(),
        device_types: vec!["board-a".into(), "board-b".into()],
        depends_artifact_names: vec![],
        provides_group: None,
        depends_groups: vec![],
        scripts: vec![],
        payload: PayloadSpec::new(kind, files),
    }
}

/// `mender-artifact read` output, with the progress bar and the times of the files dropped.
fn mender_read(path: &Path, key: Option<&Path>) -> String {
    let mut args = vec!["read"];
    if let Some(k) = key {
        args.extend(["-k", s(k)]);
    }
    args.push(s(path));
    mender(&args)
}

#[test]
fn atrium_artifacts_pass_mender_validate_and_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = make_keys(dir.path());
    let image = dir.path().join("core-image.ext4");
    let content = bytes(5, 400_000);
    fs::write(&image, &content).expect("image");
    let sum = hex::encode(Sha256::digest(&content));
    for compression in [Compression::None, Compression::Gzip, Compression::Lzma] {
        for (label, key, public) in &keys.pairs {
            let key = signing_key(key);
            // rootfs-image
            let out = dir
                .path()
                .join(format!("atrium-rootfs-{compression}-{label}.mender"));
            let written = write(
                &spec(
                    PayloadKind::RootfsImage,
                    vec![FileSource::Path(image.clone())],
                ),
                File::create(&out).expect("out"),
                WriteOptions {
                    compression,
                    key: Some(&key),
                    ..Default::default()
                },
            )
            .expect("writes");
            assert!(written.signed);
            let validated = mender(&["validate", "-k", s(public), s(&out)]);
            assert!(validated.contains("validated successfully"), "{validated}");
            let shown = mender_read(&out, Some(public));
            for needle in [
                "Name: atrium-release-7",
                "Signature: signed and verified correctly",
                "Compatible devices: '[board-a board-b]'",
                "Type:   rootfs-image",
                &format!("rootfs-image.checksum: {sum}"),
                "rootfs-image.version: atrium-release-7",
                "name:     core-image.ext4",
                "size:     400000",
                &format!("checksum: {sum}"),
            ] {
                assert!(
                    shown.contains(needle),
                    "{compression} {label}: no {needle:?} in\n{shown}"
                );
            }
            // Our own reader agrees.
            let (artifact, sink) = read_file(&out, vec![public_key(public)]).expect("reads back");
            assert_eq!(artifact.header.signature, SignatureStatus::Verified);
            assert!(sink.files[0].1 == content);
        }
        // module-image, unsigned, with scripts, meta-data, provides, depends.
        let out = dir
            .path()
            .join(format!("atrium-module-{compression}.mender"));
        let mut module = spec(
            PayloadKind::Module("directory".into()),
            vec![
                FileSource::Memory {
                    name: "update.tar".into(),
                    data: bytes(9, 12_345),
                },
                FileSource::Memory {
                    name: "dest_dir".into(),
                    data: b"/opt/app".to_vec(),
                },
            ],
        );
        module.depends_artifact_names = vec!["atrium-release-6".into()];
        module.provides_group = Some("pilot".into());
        module.scripts = vec![Script {
            name: "ArtifactCommit_Leave_50_notify".into(),
            content: b"#!/bin/sh\necho done\n".to_vec(),
        }];
        module.payload.provides = BTreeMap::from([("app.version".into(), "7".into())]);
        module.payload.depends =
            BTreeMap::from([("app.channel".into(), DependValue::One("stable".into()))]);
        module.payload.meta_data = serde_json::json!({"owner": "facilities"})
            .as_object()
            .cloned();
        write(
            &module,
            File::create(&out).expect("out"),
            WriteOptions {
                compression,
                ..Default::default()
            },
        )
        .expect("writes");
        mender(&["validate", s(&out)]);
        let shown = mender_read(&out, None);
        for needle in [
            "Name: atrium-release-7",
            "Signature: no signature",
            "Provides group: pilot",
            "Depends on one of artifact(s): [atrium-release-6]",
            "ArtifactCommit_Leave_50_notify",
            "Type:   directory",
            "app.version: 7",
            "rootfs-image.directory.version: atrium-release-7",
            "app.channel: stable",
            "\"owner\": \"facilities\"",
            "name:     update.tar",
            "name:     dest_dir",
            &format!("checksum: {}", hex::encode(Sha256::digest(b"/opt/app"))),
        ] {
            assert!(
                shown.contains(needle),
                "{compression} module: no {needle:?} in\n{shown}"
            );
        }
    }
}

#[test]
fn signing_is_interchangeable_with_mender() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = make_keys(dir.path());
    let image = dir.path().join("rootfs.img");
    fs::write(&image, bytes(13, 20_000)).expect("image");
    for (label, key, public) in &keys.pairs {
        // mender writes, Atrium signs, mender validates.
        let unsigned = dir.path().join(format!("unsigned-{label}.mender"));
        mender(&[
            "write",
            "rootfs-image",
            "-f",
            s(&image),
            "-n",
            "x",
            "-t",
            "b",
            "-o",
            s(&unsigned),
        ]);
        let signed = dir.path().join(format!("atrium-signed-{label}.mender"));
        sign_artifact(
            File::open(&unsigned).expect("in"),
            File::create(&signed).expect("out"),
            &signing_key(key),
            false,
        )
        .expect("signs");
        mender(&["validate", "-k", s(public), s(&signed)]);
        // Signing twice needs force.
        let again = dir.path().join(format!("again-{label}.mender"));
        let err = sign_artifact(
            File::open(&signed).expect("in"),
            File::create(&again).expect("out"),
            &signing_key(key),
            false,
        )
        .expect_err("already signed");
        assert!(matches!(err, Error::AlreadySigned), "{err}");

        // Atrium writes, mender signs, Atrium verifies.
        if !mender_signs_with(label) {
            continue;
        }
        let ours = dir.path().join(format!("ours-{label}.mender"));
        write(
            &spec(
                PayloadKind::RootfsImage,
                vec![FileSource::Path(image.clone())],
            ),
            File::create(&ours).expect("out"),
            WriteOptions::default(),
        )
        .expect("writes");
        let theirs = dir.path().join(format!("mender-signed-{label}.mender"));
        mender(&["sign", "-k", s(key), "-o", s(&theirs), s(&ours)]);
        let (artifact, _) = read_file(&theirs, vec![public_key(public)]).expect("verifies");
        assert_eq!(artifact.header.signature, SignatureStatus::Verified);
    }
}

/// Flips one byte of `path` at the first place `needle` occurs.
fn flip(path: &Path, needle: &[u8]) {
    let mut data = fs::read(path).expect("artifact");
    let at = data
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("needle in the artifact");
    data[at] ^= 0x01;
    fs::write(path, data).expect("tampered artifact");
}

#[test]
fn tampering_is_detected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let keys = make_keys(dir.path());
    let (_, key, public) = &keys.pairs[0];
    let image = dir.path().join("rootfs.img");
    let content = bytes(17, 100_000);
    fs::write(&image, &content).expect("image");

    // A payload byte changed: both tools refuse the artifact, and Atrium says which file.
    for (who, path) in [
        ("mender", dir.path().join("m.mender")),
        ("atrium", dir.path().join("a.mender")),
    ] {
        if who == "mender" {
            mender(&[
                "write",
                "rootfs-image",
                "-f",
                s(&image),
                "-n",
                "t",
                "-t",
                "b",
                "-k",
                s(key),
                "--compression",
                "none",
                "-o",
                s(&path),
            ]);
        } else {
            write(
                &spec(
                    PayloadKind::RootfsImage,
                    vec![FileSource::Path(image.clone())],
                ),
                File::create(&path).expect("out"),
                WriteOptions {
                    compression: Compression::None,
                    key: Some(&signing_key(key)),
                    ..Default::default()
                },
            )
            .expect("writes");
        }
        flip(&path, &content[50_000..50_064]);
        let err = read_file(&path, vec![public_key(public)]).expect_err("tampered payload");
        assert!(
            matches!(&err, Error::Checksum(name) if name == "data/0000/rootfs.img"),
            "{who}: {err}"
        );
        let out = run("mender-artifact", &["validate", "-k", s(public), s(&path)]);
        assert!(
            !out.status.success(),
            "mender-artifact accepted a tampered {who} artifact"
        );
    }

    // A changed manifest breaks the signature.
    let path = dir.path().join("manifest.mender");
    mender(&[
        "write",
        "rootfs-image",
        "-f",
        s(&image),
        "-n",
        "t",
        "-t",
        "b",
        "-k",
        s(key),
        "--compression",
        "none",
        "-o",
        s(&path),
    ]);
    flip(&path, b"  data/0000/rootfs.img");
    let err = read_file(&path, vec![public_key(public)]).expect_err("tampered manifest");
    assert!(matches!(err, Error::BadSignature), "{err}");

    // A changed header (compressed), unsigned: the manifest catches it.
    let path = dir.path().join("header.mender");
    mender(&[
        "write",
        "rootfs-image",
        "-f",
        s(&image),
        "-n",
        "release-name-x",
        "-t",
        "b",
        "--compression",
        "none",
        "-o",
        s(&path),
    ]);
    flip(&path, b"release-name-x\"}");
    let err = read_file(&path, vec![]).expect_err("tampered header");
    assert!(
        matches!(&err, Error::Checksum(name) if name == "header.tar"),
        "{err}"
    );
}
