//! Properties: whatever is written reads back the same, in every compression, signed or not;
//! and no mutation of an artifact's bytes makes the reader panic or accept a payload file
//! whose content differs from its manifest.

use std::collections::BTreeMap;
use std::io::Read;
use std::sync::OnceLock;

use atrium_artifact::{
    BoxError, Compression, FileSource, PayloadFile, PayloadKind, PayloadSink, PayloadSpec,
    ReadOptions, SignatureStatus, SigningKey, WriteOptions, WriteSpec, read, write,
};
use proptest::prelude::*;
use proptest::sample::Index;
use sha2::{Digest, Sha256};

// Made with `openssl ecparam -genkey -name prime256v1 -noout`.
const EC_KEY: &str = "-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIBI8T9ary8oSZ8O4b1fHXnIECyv1Yi5p2kGt4LrY0BQRoAoGCCqGSM49
AwEHoUQDQgAE7xr970O2p147EOOOPeUT/4ZzvwfVcNGy0LMvrsSMAw3/RSuG+Nct
xowV1NCaDdrbpT81JFPpV3ZDjxHTHAfbJg==
-----END EC PRIVATE KEY-----
";

fn key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::from_pem(EC_KEY.as_bytes()).expect("test key"))
}

/// Hashes every file itself, so a property can compare with what the reader claimed.
#[derive(Default)]
struct Hashing {
    files: Vec<(PayloadFile, Vec<u8>, [u8; 32])>,
}

impl PayloadSink for Hashing {
    fn file(&mut self, file: &PayloadFile, data: &mut dyn Read) -> Result<(), BoxError> {
        let mut content = Vec::new();
        data.read_to_end(&mut content)?;
        let sum = Sha256::digest(&content).into();
        self.files.push((file.clone(), content, sum));
        Ok(())
    }
}

fn spec(name: &str, devices: Vec<String>, kind: PayloadKind, files: Vec<FileSource>) -> WriteSpec {
    WriteSpec {
        name: name.to_owned(),
        device_types: devices,
        depends_artifact_names: vec![],
        provides_group: None,
        depends_groups: vec![],
        scripts: vec![],
        payload: PayloadSpec::new(kind, files),
    }
}

fn compression() -> impl Strategy<Value = Compression> {
    proptest::sample::select(Compression::ALL.to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn what_is_written_reads_back(
        name in "[A-Za-z0-9][A-Za-z0-9._ -]{0,30}",
        devices in proptest::collection::vec("[a-z0-9][a-z0-9_-]{0,15}", 1..4),
        files in proptest::collection::btree_map(
            "[A-Za-z0-9][A-Za-z0-9._-]{0,20}",
            proptest::collection::vec(any::<u8>(), 0..4000),
            1..4,
        ),
        compression in compression(),
        rootfs in any::<bool>(),
        signed in any::<bool>(),
    ) {
        let mut files: Vec<(String, Vec<u8>)> = files.into_iter().collect();
        if rootfs {
            files.truncate(1);
        }
        let kind = if rootfs { PayloadKind::RootfsImage } else { PayloadKind::Module("single-file".into()) };
        let sources = files
            .iter()
            .map(|(n, d)| FileSource::Memory { name: n.clone(), data: d.clone() })
            .collect();
        let mut out = Vec::new();
        write(
            &spec(&name, devices.clone(), kind.clone(), sources),
            &mut out,
            WriteOptions { compression, key: signed.then(key), ..Default::default() },
        )
        .expect("writes");

        let keys = if signed { vec![key().verifying_key()] } else { vec![] };
        let mut sink = Hashing::default();
        let artifact = read(&out[..], &ReadOptions { keys, ..Default::default() }, &mut sink)
            .expect("reads back");
        let h = &artifact.header;
        prop_assert_eq!(h.name(), name.as_str());
        prop_assert_eq!(h.device_types(), &devices[..]);
        prop_assert_eq!(h.compression_suffix, compression.suffix());
        prop_assert_eq!(h.signature, if signed { SignatureStatus::Verified } else { SignatureStatus::Unsigned });
        prop_assert_eq!(h.payloads[0].payload_type.as_deref(), Some(kind.type_name()));
        let got: Vec<(String, Vec<u8>)> =
            sink.files.iter().map(|(f, d, _)| (f.name.clone(), d.clone())).collect();
        prop_assert_eq!(&got, &files);
        if rootfs {
            let provides: &BTreeMap<String, String> = &h.payloads[0].type_info.artifact_provides;
            prop_assert_eq!(
                provides.get("rootfs-image.checksum"),
                Some(&hex::encode(Sha256::digest(&files[0].1)))
            );
        }
        // Writing is reproducible, byte for byte (ECDSA signatures aside, which are randomised).
        if !signed {
            let mut again = Vec::new();
            let sources = files
                .iter()
                .map(|(n, d)| FileSource::Memory { name: n.clone(), data: d.clone() })
                .collect();
            write(&spec(&name, devices, kind, sources), &mut again,
                WriteOptions { compression, ..Default::default() }).expect("writes");
            prop_assert!(again == out);
        }
    }
}

/// One small valid artifact per compression, signed, to mutate.
fn base(compression: Compression) -> &'static [u8] {
    static BASES: OnceLock<Vec<(Compression, Vec<u8>)>> = OnceLock::new();
    let bases = BASES.get_or_init(|| {
        Compression::ALL
            .into_iter()
            .map(|c| {
                let mut out = Vec::new();
                let files = vec![
                    FileSource::Memory {
                        name: "a.bin".into(),
                        data: (0..3000u32).map(|i| (i % 7) as u8).collect(),
                    },
                    FileSource::Memory {
                        name: "b.txt".into(),
                        data: b"payload two".to_vec(),
                    },
                ];
                write(
                    &spec(
                        "base",
                        vec!["dev".into()],
                        PayloadKind::Module("single-file".into()),
                        files,
                    ),
                    &mut out,
                    WriteOptions {
                        compression: c,
                        key: Some(key()),
                        ..Default::default()
                    },
                )
                .expect("base artifact");
                (c, out)
            })
            .collect()
    });
    bases
        .iter()
        .find(|(c, _)| *c == compression)
        .map(|(_, b)| b.as_slice())
        .unwrap_or_default()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn mutated_artifacts_never_panic_nor_pass_bad_content(
        compression in compression(),
        flips in proptest::collection::vec((any::<Index>(), any::<u8>()), 0..6),
        cut in proptest::option::of(any::<Index>()),
        with_key in any::<bool>(),
    ) {
        let mut bytes = base(compression).to_vec();
        for (at, value) in &flips {
            let i = at.index(bytes.len());
            bytes[i] = *value;
        }
        if let Some(cut) = cut {
            bytes.truncate(cut.index(bytes.len()));
        }
        let keys = if with_key { vec![key().verifying_key()] } else { vec![] };
        let mut sink = Hashing::default();
        if let Ok(artifact) = read(&bytes[..], &ReadOptions { keys, ..Default::default() }, &mut sink) {
            // Whatever passed matches its manifest, and its signature when a key was given.
            for (file, _, sum) in &sink.files {
                prop_assert_eq!(&file.sha256, sum);
                let listed = artifact.header.manifest.get(&format!("data/{:04}/{}", file.payload, file.name));
                prop_assert_eq!(listed, Some(sum));
            }
            if with_key {
                prop_assert_eq!(artifact.header.signature, SignatureStatus::Verified);
            }
        }
    }
}
