//! `atrium artifact` as build scripts use `mender-artifact`: the same options, artifacts the
//! real `mender-artifact` (Debian's package) validates, and non-zero exits on failure.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

fn tool(program: &str, args: &[&str]) -> Output {
    Command::new(program).args(args).output().unwrap_or_else(|e| {
        panic!(
            "cannot run {program} ({e}): these tests need Debian's mender-artifact and openssl; \
             install them with scripts/ota-deps"
        )
    })
}

fn ok(program: &str, args: &[&str]) -> String {
    let out = tool(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn atrium(args: &[&str]) -> Output {
    tool(env!("CARGO_BIN_EXE_atrium"), args)
}

fn atrium_ok(args: &[&str]) -> String {
    ok(env!("CARGO_BIN_EXE_atrium"), args)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

#[test]
fn write_read_validate_sign_with_mender_on_the_other_side() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (ec_key, ec_pub) = (d.join("ec.key"), d.join("ec.pub"));
    ok(
        "openssl",
        &[
            "ecparam",
            "-genkey",
            "-name",
            "prime256v1",
            "-noout",
            "-out",
            s(&ec_key),
        ],
    );
    ok(
        "openssl",
        &["pkey", "-in", s(&ec_key), "-pubout", "-out", s(&ec_pub)],
    );
    let (rsa_key, rsa_pub) = (d.join("rsa.key"), d.join("rsa.pub"));
    ok(
        "openssl",
        &["genrsa", "-traditional", "-out", s(&rsa_key), "2048"],
    );
    ok(
        "openssl",
        &["pkey", "-in", s(&rsa_key), "-pubout", "-out", s(&rsa_pub)],
    );
    let image = d.join("rootfs.ext4");
    fs::write(
        &image,
        (0..200_000u32)
            .map(|i| (i * 7 % 253) as u8)
            .collect::<Vec<_>>(),
    )
    .expect("image");

    // rootfs-image, -t as an alias of -c, signed with EC: mender-artifact validates it.
    let rootfs = d.join("rootfs.mender");
    atrium_ok(&[
        "artifact",
        "write",
        "rootfs-image",
        "-f",
        s(&image),
        "-n",
        "release-3",
        "-c",
        "board-a",
        "-t",
        "board-b",
        "-k",
        s(&ec_key),
        "--compression",
        "lzma",
        "-o",
        s(&rootfs),
    ]);
    let shown = ok("mender-artifact", &["read", "-k", s(&ec_pub), s(&rootfs)]);
    assert!(shown.contains("Name: release-3"), "{shown}");
    assert!(
        shown.contains("Compatible devices: '[board-a board-b]'"),
        "{shown}"
    );
    assert!(shown.contains("signed and verified correctly"), "{shown}");
    ok(
        "mender-artifact",
        &["validate", "-k", s(&ec_pub), s(&rootfs)],
    );
    let validated = atrium_ok(&["artifact", "validate", "-k", s(&ec_pub), s(&rootfs)]);
    assert!(validated.contains("validated successfully"), "{validated}");

    // The wrong key, a missing file and a tampered artifact all exit non-zero.
    let wrong = atrium(&["artifact", "validate", "-k", s(&rsa_pub), s(&rootfs)]);
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("signature"),
        "{wrong:?}"
    );
    assert!(
        !atrium(&["artifact", "read", s(&d.join("missing.mender"))])
            .status
            .success()
    );

    // module-image with several files, meta-data and a state script; --json shows it.
    let conf = d.join("app.conf");
    fs::write(&conf, b"mode = eco\n").expect("file");
    let meta = d.join("meta.json");
    fs::write(&meta, br#"{"service": "hvac"}"#).expect("meta");
    let script = d.join("ArtifactInstall_Leave_20_restart");
    fs::write(&script, b"#!/bin/sh\n").expect("script");
    let module = d.join("module.mender");
    atrium_ok(&[
        "artifact",
        "write",
        "module-image",
        "-T",
        "single-file",
        "-f",
        s(&conf),
        "-f",
        s(&image),
        "-n",
        "hvac-1",
        "-c",
        "board-a",
        "-m",
        s(&meta),
        "-s",
        s(&script),
        "-p",
        "hvac.version:1",
        "-o",
        s(&module),
        "--compression",
        "none",
    ]);
    ok("mender-artifact", &["validate", s(&module)]);
    let json: serde_json::Value =
        serde_json::from_str(&atrium_ok(&["artifact", "read", "--json", s(&module)]))
            .expect("JSON");
    assert_eq!(
        json["header"]["info"]["artifact_provides"]["artifact_name"],
        "hvac-1"
    );
    assert_eq!(json["header"]["signature"], "unsigned");
    assert_eq!(
        json["header"]["payloads"][0]["meta_data"]["service"],
        "hvac"
    );
    assert_eq!(
        json["header"]["payloads"][0]["type_info"]["artifact_provides"]["hvac.version"],
        "1"
    );
    assert_eq!(
        json["header"]["scripts"][0]["name"],
        "ArtifactInstall_Leave_20_restart"
    );
    assert_eq!(json["files"][0]["name"], "app.conf");
    assert_eq!(json["files"][1]["size"], 200_000);

    // Signing: Atrium signs (RSA), mender-artifact validates; a second signing needs -f.
    let signed = d.join("module-signed.mender");
    atrium_ok(&[
        "artifact",
        "sign",
        "-k",
        s(&rsa_key),
        s(&module),
        "-o",
        s(&signed),
    ]);
    ok(
        "mender-artifact",
        &["validate", "-k", s(&rsa_pub), s(&signed)],
    );
    assert!(
        !atrium(&["artifact", "sign", "-k", s(&ec_key), s(&signed)])
            .status
            .success()
    );
    atrium_ok(&["artifact", "sign", "-f", "-k", s(&ec_key), s(&signed)]);
    ok(
        "mender-artifact",
        &["validate", "-k", s(&ec_pub), s(&signed)],
    );

    // mender-artifact writes, Atrium reads and validates.
    let theirs = d.join("theirs.mender");
    ok(
        "mender-artifact",
        &[
            "write",
            "rootfs-image",
            "-f",
            s(&image),
            "-n",
            "theirs-1",
            "-t",
            "board-a",
            "-k",
            s(&rsa_key),
            "-o",
            s(&theirs),
        ],
    );
    atrium_ok(&["artifact", "validate", "-k", s(&rsa_pub), s(&theirs)]);
    let shown = atrium_ok(&["artifact", "read", "-k", s(&rsa_pub), s(&theirs)]);
    assert!(shown.contains("Name: theirs-1"), "{shown}");
    assert!(shown.contains("signed and verified correctly"), "{shown}");

    // A payload byte flipped: validation fails, naming the file.
    let mut bytes = fs::read(&module).expect("module");
    let at = bytes
        .windows(10)
        .position(|w| w == b"mode = eco")
        .expect("payload in the artifact");
    bytes[at] ^= 0x20;
    let tampered = d.join("tampered.mender");
    fs::write(&tampered, bytes).expect("tampered");
    let out = atrium(&["artifact", "validate", s(&tampered)]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("checksum mismatch for data/0000/app.conf"),
        "{err}"
    );

    // A bad option value is refused with the choices.
    let out = atrium(&[
        "artifact",
        "write",
        "rootfs-image",
        "-f",
        s(&image),
        "-n",
        "x",
        "-c",
        "b",
        "-o",
        s(&d.join("x.mender")),
        "--compression",
        "brotli",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("zstd_best"));
    assert!(!d.join("x.mender").exists());
}

/// The header `atrium artifact read --json` shows for an artifact, with the type-info's own
/// `type` left out (mender-artifact 3.9 leaves it empty for rootfs-image; header-info has it).
fn header_of(path: &Path) -> (serde_json::Value, serde_json::Value) {
    let json: serde_json::Value =
        serde_json::from_str(&atrium_ok(&["artifact", "read", "--json", s(path)])).expect("JSON");
    let mut payload = json["header"]["payloads"][0].clone();
    if let Some(ti) = payload["type_info"].as_object_mut() {
        ti.remove("type");
    }
    (json["header"]["info"].clone(), payload)
}

#[test]
fn same_arguments_same_header_as_mender_artifact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let image = d.join("rootfs.ext4");
    fs::write(&image, b"a small filesystem image").expect("image");
    let image = s(&image).to_owned();
    let rootfs: &[&[&str]] = &[
        &[],
        &["--no-default-software-version"],
        &["--no-default-clears-provides"],
        &["--no-checksum-provide"],
        &["--software-name", "foo"],
        &["--software-name", "foo", "--software-version", "9.1"],
        &["--software-filesystem", "fsx"],
        &["-v", "3", "-t", "second-board"],
        &[
            "-p",
            "app.a:1",
            "-p",
            "app.b:2",
            "-d",
            "hw.rev:b",
            "--clears-provides",
            "app.*",
            "-N",
            "release-1",
            "-N",
            "release-2",
            "-g",
            "pilot",
            "-G",
            "lab",
        ],
    ];
    let module: &[&[&str]] = &[
        &[],
        &["--software-name", "foo"],
        &["--software-filesystem", "fsx", "--software-version", "3"],
        &["--no-default-software-version", "-p", "k:v"],
        &[
            "--no-default-clears-provides",
            "-d",
            "k:v",
            "--clears-provides",
            "a.*",
        ],
    ];
    let rootfs_kind = ["rootfs-image", "-f", image.as_str()];
    let module_kind = ["module-image", "-T", "app-module", "-f", image.as_str()];
    let cases = rootfs
        .iter()
        .map(|a| (&rootfs_kind[..], *a))
        .chain(module.iter().map(|a| (&module_kind[..], *a)));
    for (n, (kind, extra)) in cases.enumerate() {
        let mut paths = Vec::new();
        for program in ["mender-artifact", env!("CARGO_BIN_EXE_atrium")] {
            let out = d.join(format!("{n}-{}.mender", paths.len()));
            let mut args: Vec<&str> = Vec::new();
            if program != "mender-artifact" {
                args.push("artifact");
            }
            args.push("write");
            args.extend(kind);
            args.extend(["-n", "release-3", "-t", "board-a", "--compression", "none"]);
            args.extend(extra);
            args.extend(["-o", s(&out)]);
            ok(program, &args);
            paths.push(out);
        }
        let (mender_info, mender_payload) = header_of(&paths[0]);
        let (atrium_info, atrium_payload) = header_of(&paths[1]);
        assert_eq!(atrium_info, mender_info, "{kind:?} {extra:?}");
        assert_eq!(atrium_payload, mender_payload, "{kind:?} {extra:?}");
        ok("mender-artifact", &["validate", s(&paths[1])]);
    }
    // Format versions other than 3 are refused with the reason.
    let out = atrium(&[
        "artifact",
        "write",
        "rootfs-image",
        "-f",
        &image,
        "-n",
        "x",
        "-c",
        "b",
        "-v",
        "2",
        "-o",
        s(&d.join("v2.mender")),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("only format version 3"));
}

/// Keeps the payload files of an artifact read with the library.
#[derive(Default)]
struct Keep(Vec<Vec<u8>>);

impl atrium_artifact::PayloadSink for Keep {
    fn file(
        &mut self,
        _file: &atrium_artifact::PayloadFile,
        data: &mut dyn std::io::Read,
    ) -> Result<(), atrium_artifact::BoxError> {
        let mut content = Vec::new();
        data.read_to_end(&mut content)?;
        self.0.push(content);
        Ok(())
    }
}

/// Reads a delta artifact and applies its patch to `source`.
fn apply_delta(artifact: &Path, source: &[u8]) -> Vec<u8> {
    use atrium_artifact::delta::{DeltaMeta, apply_patch, check_source};
    let mut keep = Keep::default();
    let read = atrium_artifact::read(
        fs::File::open(artifact).expect("open"),
        &atrium_artifact::ReadOptions::default(),
        &mut keep,
    )
    .expect("the delta artifact reads");
    let meta = DeltaMeta::from_meta_data(read.header.payloads[0].meta_data.as_ref())
        .expect("delta meta-data");
    check_source(source, &meta).expect("the delta's source");
    let mut out = Vec::new();
    apply_patch(source, &mut &keep.0[0][..], &meta, &mut out).expect("applies");
    out
}

#[test]
fn delta_from_artifacts_and_from_images() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (old_img, new_img) = (d.join("old.ext4"), d.join("new.ext4"));
    // xorshift noise: incompressible, so only the delta's use of the old image makes it small.
    let mut x = 0x9e37_79b9_u32;
    let old: Vec<u8> = (0..400_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    let mut new = old.clone();
    new[100_000..101_000].fill(0xa5);
    new.extend_from_slice(&old[..20_000]);
    fs::write(&old_img, &old).expect("old");
    fs::write(&new_img, &new).expect("new");
    let ec_key = d.join("ec.key");
    ok(
        "openssl",
        &[
            "ecparam",
            "-genkey",
            "-name",
            "prime256v1",
            "-noout",
            "-out",
            s(&ec_key),
        ],
    );
    let (old_art, new_art, delta) = (
        d.join("old.mender"),
        d.join("new.mender"),
        d.join("d.mender"),
    );
    for (img, art, name) in [(&old_img, &old_art, "sw-1"), (&new_img, &new_art, "sw-2")] {
        atrium_ok(&[
            "artifact",
            "write",
            "rootfs-image",
            "-f",
            s(img),
            "-n",
            name,
            "-c",
            "gw",
            "-g",
            "fleet",
            "-o",
            s(art),
        ]);
    }
    atrium_ok(&[
        "artifact",
        "delta",
        "--from",
        s(&old_art),
        "--to",
        s(&new_art),
        "-o",
        s(&delta),
        "-k",
        s(&ec_key),
        "--level",
        "3",
    ]);
    // Debian's mender-artifact reads it as an ordinary artifact with one payload.
    let shown = ok("mender-artifact", &["read", s(&delta)]);
    assert!(shown.contains("rootfs-image-delta"), "{shown}");
    let json: serde_json::Value =
        serde_json::from_str(&atrium_ok(&["artifact", "read", "--json", s(&delta)])).expect("json");
    let header = &json["header"];
    assert_eq!(header["info"]["artifact_provides"]["artifact_name"], "sw-2");
    assert_eq!(header["signature"], "unverified");
    let ti = &header["payloads"][0]["type_info"];
    let sha = |b: &[u8]| {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(b))
    };
    assert_eq!(ti["artifact_depends"]["rootfs-image.checksum"], sha(&old));
    assert_eq!(ti["artifact_provides"]["rootfs-image.checksum"], sha(&new));
    assert!(
        fs::metadata(&delta).expect("delta").len()
            < fs::metadata(&new_art).expect("full").len() / 10
    );
    assert!(
        apply_delta(&delta, &old) == new,
        "from artifacts: wrong image"
    );

    // From image files.
    let delta2 = d.join("d2.mender");
    atrium_ok(&[
        "artifact",
        "delta",
        "--from-image",
        s(&old_img),
        "--to-image",
        s(&new_img),
        "-n",
        "sw-2",
        "-c",
        "gw",
        "-o",
        s(&delta2),
    ]);
    assert!(
        apply_delta(&delta2, &old) == new,
        "from images: wrong image"
    );

    // Half the options, or a delta as the source: refused, nothing written.
    let bad = d.join("bad.mender");
    for args in [
        vec!["artifact", "delta", "--from", s(&old_art), "-o", s(&bad)],
        vec![
            "artifact",
            "delta",
            "--from-image",
            s(&old_img),
            "--to-image",
            s(&new_img),
            "-o",
            s(&bad),
        ],
        vec![
            "artifact",
            "delta",
            "--from",
            s(&delta),
            "--to",
            s(&new_art),
            "-o",
            s(&bad),
        ],
    ] {
        let out = atrium(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(!bad.exists(), "{args:?} left a file");
    }
}
