//! Delta artifacts: made from two images or two full artifacts, read back, applied to the
//! source, and the result compared byte for byte with the target; random edits as a property.

use std::io::Read;

use atrium_artifact::delta::{
    self, CHECKSUM_KEY, DELTA_PAYLOAD_TYPE, DeltaMeta, DeltaSpec, apply_patch, check_source,
};
use atrium_artifact::{
    BoxError, Compression, DependValue, FileSource, PayloadFile, PayloadKind, PayloadSink,
    PayloadSpec, ReadOptions, WriteOptions, WriteSpec, read, write,
};
use proptest::prelude::*;
use sha2::{Digest, Sha256};

#[derive(Default)]
struct Keep {
    files: Vec<(PayloadFile, Vec<u8>)>,
}

impl PayloadSink for Keep {
    fn file(&mut self, file: &PayloadFile, data: &mut dyn Read) -> Result<(), BoxError> {
        let mut content = Vec::new();
        data.read_to_end(&mut content)?;
        self.files.push((file.clone(), content));
        Ok(())
    }
}

/// Pseudo-random bytes that do not compress, so a small delta means the source was used.
fn noise(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn full_artifact(name: &str, image: &[u8]) -> Vec<u8> {
    let spec = WriteSpec {
        name: name.into(),
        device_types: vec!["gw-1".into()],
        depends_artifact_names: vec![],
        provides_group: Some("fleet".into()),
        depends_groups: vec![],
        scripts: vec![],
        payload: PayloadSpec::new(
            PayloadKind::RootfsImage,
            vec![FileSource::Memory {
                name: "rootfs.ext4".into(),
                data: image.to_vec(),
            }],
        ),
    };
    let mut out = Vec::new();
    write(
        &spec,
        &mut out,
        WriteOptions {
            compression: Compression::ZstdFast,
            ..WriteOptions::default()
        },
    )
    .expect("full artifact");
    out
}

fn hex_sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

#[test]
fn delta_from_two_full_artifacts_applies_to_the_source() {
    let old = noise(1 << 20, 1);
    let mut new = old.clone();
    new[4096..8192].copy_from_slice(&noise(4096, 2));
    new.extend_from_slice(&noise(10_000, 3));
    let full_old = full_artifact("sw-1", &old);
    let full_new = full_artifact("sw-2", &new);

    // The full artifact already provides the checksum a delta depends on.
    let full = read(&full_old[..], &ReadOptions::default(), &mut Keep::default()).expect("full");
    assert_eq!(
        full.header.payloads[0]
            .type_info
            .artifact_provides
            .get(CHECKSUM_KEY),
        Some(&hex_sha(&old))
    );

    let mut out = Vec::new();
    let made = delta::write_delta_from_artifacts(
        &full_old[..],
        &full_new[..],
        &ReadOptions::default(),
        3,
        &mut out,
        WriteOptions {
            compression: Compression::None,
            ..WriteOptions::default()
        },
    )
    .expect("delta");
    assert!(
        out.len() < full_new.len() / 20,
        "delta artifact {} bytes, full {}",
        out.len(),
        full_new.len()
    );
    assert_eq!(made.patch.meta.target_sha256, hex_sha(&new));

    let mut keep = Keep::default();
    let artifact = read(&out[..], &ReadOptions::default(), &mut keep).expect("delta reads");
    let header = &artifact.header;
    assert_eq!(header.name(), "sw-2");
    assert_eq!(header.device_types(), ["gw-1".to_owned()]);
    assert_eq!(
        header.info.artifact_provides.artifact_group.as_deref(),
        Some("fleet")
    );
    let payload = &header.payloads[0];
    assert_eq!(payload.payload_type.as_deref(), Some(DELTA_PAYLOAD_TYPE));
    let ti = &payload.type_info;
    assert_eq!(
        ti.artifact_depends.get(CHECKSUM_KEY),
        Some(&DependValue::One(hex_sha(&old)))
    );
    assert_eq!(ti.artifact_provides.get(CHECKSUM_KEY), Some(&hex_sha(&new)));
    assert_eq!(
        ti.artifact_provides
            .get("rootfs-image.version")
            .map(String::as_str),
        Some("sw-2")
    );
    // The same provides and clears as the full artifact.
    let full_new_read =
        read(&full_new[..], &ReadOptions::default(), &mut Keep::default()).expect("full new");
    let full_ti = &full_new_read.header.payloads[0].type_info;
    assert_eq!(ti.artifact_provides, full_ti.artifact_provides);
    assert_eq!(
        ti.clears_artifact_provides,
        full_ti.clears_artifact_provides
    );

    let meta = DeltaMeta::from_meta_data(payload.meta_data.as_ref()).expect("meta-data");
    assert_eq!(meta.target_size, new.len() as u64);
    check_source(&old, &meta).expect("source");
    let (file, patch) = &keep.files[0];
    assert_eq!(file.name, delta::PATCH_FILE_NAME);
    let mut image = Vec::new();
    apply_patch(&old, &mut &patch[..], &meta, &mut image).expect("applies");
    assert!(image == new, "the applied delta differs from the target");
}

#[test]
fn delta_between_image_files_and_too_large_refusal() {
    let dir = tempfile::tempdir().expect("tmp");
    let old = noise(200_000, 9);
    let mut new = old.clone();
    new.truncate(150_000);
    new.extend_from_slice(&noise(3000, 10));
    std::fs::write(dir.path().join("a.img"), &old).expect("a");
    std::fs::write(dir.path().join("b.img"), &new).expect("b");
    let mut out = Vec::new();
    let made = delta::write_delta(
        &dir.path().join("a.img"),
        &dir.path().join("b.img"),
        &DeltaSpec::new("sw-b", vec!["gw-1".into()]),
        &mut out,
        WriteOptions::default(),
    )
    .expect("delta");
    let mut keep = Keep::default();
    let artifact = read(&out[..], &ReadOptions::default(), &mut keep).expect("reads");
    let ti = &artifact.header.payloads[0].type_info;
    assert_eq!(
        ti.artifact_provides
            .get("rootfs-image.version")
            .map(String::as_str),
        Some("sw-b")
    );
    let mut image = Vec::new();
    apply_patch(
        &old,
        &mut &keep.files[0].1[..],
        &made.patch.meta,
        &mut image,
    )
    .expect("applies");
    assert!(image == new);

    // An image past the window is refused before anything is written.
    let big = dir.path().join("big.img");
    std::fs::File::create(&big)
        .and_then(|f| f.set_len(delta::MAX_DELTA_IMAGE + 1))
        .expect("sparse file");
    let mut out = Vec::new();
    let err = delta::write_delta(
        &big,
        &dir.path().join("b.img"),
        &DeltaSpec::new("sw-b", vec!["gw-1".into()]),
        &mut out,
        WriteOptions::default(),
    )
    .expect_err("too large");
    assert!(
        matches!(err, atrium_artifact::Error::TooLarge { .. }),
        "{err}"
    );
    assert!(out.is_empty());
}

#[derive(Clone, Debug)]
enum Edit {
    Overwrite { at: usize, len: usize, seed: u32 },
    Insert { at: usize, len: usize, seed: u32 },
    Delete { at: usize, len: usize },
    Move { from: usize, to: usize, len: usize },
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 1..5000usize, any::<u32>()).prop_map(|(at, len, seed)| Edit::Overwrite {
            at,
            len,
            seed
        }),
        (any::<usize>(), 1..5000usize, any::<u32>()).prop_map(|(at, len, seed)| Edit::Insert {
            at,
            len,
            seed
        }),
        (any::<usize>(), 1..5000usize).prop_map(|(at, len)| Edit::Delete { at, len }),
        (any::<usize>(), any::<usize>(), 1..20_000usize).prop_map(|(from, to, len)| Edit::Move {
            from,
            to,
            len
        }),
    ]
}

fn apply_edit(image: &mut Vec<u8>, e: &Edit) {
    let n = image.len().max(1);
    match *e {
        Edit::Overwrite { at, len, seed } => {
            let at = at % n;
            let end = (at + len).min(image.len());
            let fresh = noise(end.saturating_sub(at), seed);
            image[at.min(end)..end].copy_from_slice(&fresh);
        }
        Edit::Insert { at, len, seed } => {
            let at = at % (image.len() + 1);
            image.splice(at..at, noise(len, seed));
        }
        Edit::Delete { at, len } => {
            let at = at % n;
            let end = (at + len).min(image.len());
            image.drain(at.min(end)..end);
        }
        Edit::Move { from, to, len } => {
            let from = from % n;
            let end = (from + len).min(image.len());
            let chunk: Vec<u8> = image.drain(from.min(end)..end).collect();
            let to = to % (image.len() + 1);
            image.splice(to..to, chunk);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Any edits: the patch turns the source into exactly the target, and only the source.
    #[test]
    fn random_edits_round_trip(
        len in 0..200_000usize,
        seed in any::<u32>(),
        edits in proptest::collection::vec(edit(), 0..8),
    ) {
        let old = noise(len, seed);
        let mut new = old.clone();
        for e in &edits {
            apply_edit(&mut new, e);
        }
        let mut patch = Vec::new();
        let info = delta::make_patch(&old, &mut &new[..], new.len() as u64, 1, &mut patch)
            .expect("patch");
        let mut out = Vec::new();
        apply_patch(&old, &mut &patch[..], &info.meta, &mut out).expect("applies");
        prop_assert!(out == new);
        if !old.is_empty() {
            let mut other = old.clone();
            other[len / 2] ^= 0xff;
            prop_assert!(check_source(&other, &info.meta).is_err());
        }
    }
}
