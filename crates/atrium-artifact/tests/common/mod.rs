//! Shared by the integration tests: the real `mender-artifact` and `openssl`, key files, and a
//! sink that keeps payload files.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use atrium_artifact::{BoxError, PayloadFile, PayloadSink};

/// Runs a tool that must be installed; a missing tool fails the test with what to do.
pub fn run(program: &str, args: &[&str]) -> Output {
    match Command::new(program).args(args).output() {
        Ok(out) => out,
        Err(e) => panic!(
            "cannot run {program} ({e}): the interoperability tests need Debian's \
             mender-artifact and openssl; install them with scripts/ota-deps"
        ),
    }
}

/// Runs a tool and fails the test, with its output, if it fails.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn mender(args: &[&str]) -> String {
    run_ok("mender-artifact", args)
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 temporary path")
}

/// Key pairs made by openssl, in every PEM form of private key: EC as SEC1 and PKCS#8, RSA as
/// PKCS#1 and PKCS#8; public keys as SubjectPublicKeyInfo.
pub struct Keys {
    /// (label, private key file, public key file)
    pub pairs: Vec<(&'static str, PathBuf, PathBuf)>,
}

/// Whether Debian's mender-artifact (3.9) signs with this key form: it takes only SEC1 EC and
/// PKCS#1 RSA private keys (Atrium takes PKCS#8 as well).
pub fn mender_signs_with(label: &str) -> bool {
    !label.ends_with("pkcs8")
}

pub fn make_keys(dir: &Path) -> Keys {
    let mut pairs = Vec::new();
    let ec_sec1 = dir.join("ec-sec1.key");
    run_ok(
        "openssl",
        &[
            "ecparam",
            "-genkey",
            "-name",
            "prime256v1",
            "-noout",
            "-out",
            s(&ec_sec1),
        ],
    );
    pairs.push(("ec-sec1", ec_sec1));
    let ec_pkcs8 = dir.join("ec-pkcs8.key");
    run_ok(
        "openssl",
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            s(&ec_pkcs8),
        ],
    );
    pairs.push(("ec-pkcs8", ec_pkcs8));
    let rsa_pkcs1 = dir.join("rsa-pkcs1.key");
    run_ok(
        "openssl",
        &["genrsa", "-traditional", "-out", s(&rsa_pkcs1), "3072"],
    );
    pairs.push(("rsa-pkcs1", rsa_pkcs1));
    let rsa_pkcs8 = dir.join("rsa-pkcs8.key");
    run_ok(
        "openssl",
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            s(&rsa_pkcs8),
        ],
    );
    pairs.push(("rsa-pkcs8", rsa_pkcs8));
    Keys {
        pairs: pairs
            .into_iter()
            .map(|(label, key)| {
                let public = key.with_extension("pub");
                run_ok(
                    "openssl",
                    &["pkey", "-in", s(&key), "-pubout", "-out", s(&public)],
                );
                (label, key, public)
            })
            .collect(),
    }
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Keeps every payload file in memory.
#[derive(Default, Debug)]
pub struct Collect {
    pub files: Vec<(PayloadFile, Vec<u8>)>,
    pub headers_seen: usize,
}

impl PayloadSink for Collect {
    fn header(&mut self, _header: &atrium_artifact::Header) -> Result<(), BoxError> {
        self.headers_seen += 1;
        Ok(())
    }

    fn file(&mut self, file: &PayloadFile, data: &mut dyn Read) -> Result<(), BoxError> {
        let mut content = Vec::new();
        data.read_to_end(&mut content)?;
        self.files.push((file.clone(), content));
        Ok(())
    }
}
