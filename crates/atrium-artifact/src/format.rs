//! The documents inside an artifact: `version`, `manifest`, `header-info`, `type-info`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Error;

/// The only format version this crate reads and writes.
pub const FORMAT_VERSION: u32 = 3;

/// The `version` member.
#[derive(Serialize, Deserialize)]
pub(crate) struct Version {
    pub format: String,
    pub version: u32,
}

/// The bytes of the `version` member `mender-artifact` writes.
pub(crate) fn version_bytes() -> Vec<u8> {
    // Field order and spacing as Mender writes it; serde_json keeps the struct order.
    serde_json::to_vec(&Version {
        format: "mender".into(),
        version: FORMAT_VERSION,
    })
    .unwrap_or_default()
}

/// `header-info`: what the whole artifact is, provides and depends on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct HeaderInfo {
    /// One entry per payload, in the order of `data/NNNN`.
    pub payloads: Vec<PayloadEntry>,
    pub artifact_provides: ArtifactProvides,
    pub artifact_depends: ArtifactDepends,
}

/// A payload's entry in `header-info`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct PayloadEntry {
    /// The payload type (the update module's name, or `rootfs-image`); none for an empty
    /// (bootstrap) payload.
    #[serde(rename = "type", default)]
    pub payload_type: Option<String>,
}

/// What installing the artifact makes the device provide.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ArtifactProvides {
    pub artifact_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_group: Option<String>,
}

/// What the device must have for the artifact to install: any one value of each list.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct ArtifactDepends {
    /// Artifacts the device must run now (empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifact_name: Vec<String>,
    /// Device types the artifact is compatible with.
    #[serde(default)]
    pub device_type: Vec<String>,
    /// Groups the device must be in (empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifact_group: Vec<String>,
}

/// `headers/NNNN/type-info`: one payload's type, provides and depends.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct TypeInfo {
    /// The payload type; `mender-artifact` 3.9 leaves it empty for `rootfs-image` and null for
    /// empty payloads, so the type in `header-info` is the one that counts.
    #[serde(rename = "type", default)]
    pub payload_type: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub artifact_depends: BTreeMap<String, DependValue>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub artifact_provides: BTreeMap<String, String>,
    /// Provides (names or `prefix.*` patterns) that installing this payload removes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clears_artifact_provides: Option<Vec<String>>,
}

/// A payload dependency: one value, or a list of which any one will do.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(untagged)]
pub enum DependValue {
    One(String),
    Any(Vec<String>),
}

impl std::fmt::Display for DependValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DependValue::One(v) => f.write_str(v),
            DependValue::Any(vs) => write!(f, "[{}]", vs.join(", ")),
        }
    }
}

/// The `manifest`: the SHA-256 of every member (and payload file) that follows it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Manifest {
    entries: BTreeMap<String, [u8; 32]>,
}

impl Manifest {
    /// Parses `SHA256-HEX  NAME` lines.
    pub fn parse(bytes: &[u8]) -> Result<Self, Error> {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| Error::format("the manifest is not UTF-8 text"))?;
        let mut entries = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let bad = || Error::format(format!("manifest line {}: expected `SHA256  NAME`", n + 1));
            let (hash, rest) = (
                line.get(..64).ok_or_else(bad)?,
                line.get(64..).ok_or_else(bad)?,
            );
            let name = rest.trim_start_matches([' ', '\t']);
            if name.len() == rest.len() || name.is_empty() {
                return Err(bad());
            }
            let mut sum = [0u8; 32];
            hex::decode_to_slice(hash, &mut sum).map_err(|_| bad())?;
            if entries.insert(name.to_owned(), sum).is_some() {
                return Err(Error::format(format!("the manifest lists {name} twice")));
            }
        }
        if entries.is_empty() {
            return Err(Error::format("the manifest is empty"));
        }
        Ok(Manifest { entries })
    }

    /// Adds or replaces an entry.
    pub fn insert(&mut self, name: impl Into<String>, sha256: [u8; 32]) {
        self.entries.insert(name.into(), sha256);
    }

    /// The checksum listed for `name`.
    pub fn get(&self, name: &str) -> Option<&[u8; 32]> {
        self.entries.get(name)
    }

    /// Every entry, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8; 32])> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The manifest's bytes, as `mender-artifact` writes them (sorted by name).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = String::new();
        for (name, sum) in &self.entries {
            out.push_str(&hex::encode(sum));
            out.push_str("  ");
            out.push_str(name);
            out.push('\n');
        }
        out.into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_is_what_mender_writes() {
        assert_eq!(version_bytes(), br#"{"format":"mender","version":3}"#);
    }

    #[test]
    fn manifest_round_trip() {
        let text = "f105c016590c0ba45891e21749863b36a02cd8ada31eb8d6c96ae40fcfab73ba  data/0000/rootfs.ext4\n\
                    30bca94442d664ebcc6ac96656af44eb77a270a34961137280deb5c13cffabfe  header.tar.gz\n\
                    96bcd965947569404798bcbdb614f103db5a004eb6e364cfc162c146890ea35b  version\n";
        let m = Manifest::parse(text.as_bytes()).expect("parses");
        assert_eq!(m.to_bytes(), text.as_bytes());
        assert!(m.get("header.tar.gz").is_some());
        assert!(m.get("header.tar").is_none());
    }

    #[test]
    fn manifest_refusals() {
        for bad in [
            "",
            "abc  version\n",
            "zz05c016590c0ba45891e21749863b36a02cd8ada31eb8d6c96ae40fcfab73ba  version\n",
            "f105c016590c0ba45891e21749863b36a02cd8ada31eb8d6c96ae40fcfab73baversion\n",
            "f105c016590c0ba45891e21749863b36a02cd8ada31eb8d6c96ae40fcfab73ba  \n",
            "f105c016590c0ba45891e21749863b36a02cd8ada31eb8d6c96ae40fcfab73ba  v\n\
             f105c016590c0ba45891e21749863b36a02cd8ada31eb8d6c96ae40fcfab73ba  v\n",
            "é105c016590c0ba45891e21749863b36a02cd8ada31eb8d6c96ae40fcfab73b  v\n",
        ] {
            assert!(Manifest::parse(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn header_info_as_mender_writes_it() {
        let text = r#"{"payloads":[{"type":"single-file"}],"artifact_provides":{"artifact_name":"mod-1","artifact_group":"grp"},"artifact_depends":{"artifact_name":["prev-1"],"device_type":["dev-a"],"artifact_group":["dg"]}}"#;
        let info: HeaderInfo = serde_json::from_str(text).expect("parses");
        assert_eq!(
            info.payloads[0].payload_type.as_deref(),
            Some("single-file")
        );
        assert_eq!(serde_json::to_string(&info).expect("json"), text);
        let bootstrap = r#"{"payloads":[{"type":null}],"artifact_provides":{"artifact_name":"boot-1"},"artifact_depends":{"device_type":["dev-a"]}}"#;
        let info: HeaderInfo = serde_json::from_str(bootstrap).expect("parses");
        assert_eq!(serde_json::to_string(&info).expect("json"), bootstrap);
    }

    #[test]
    fn type_info_as_mender_writes_it() {
        let text = r#"{"type":"single-file","artifact_depends":{"dep":"x","many":["a","b"]},"artifact_provides":{"foo":"bar","rootfs-image.single-file.version":"mod-1"},"clears_artifact_provides":["single-file.*","rootfs-image.single-file.*"]}"#;
        let info: TypeInfo = serde_json::from_str(text).expect("parses");
        assert_eq!(
            info.artifact_depends.get("many"),
            Some(&DependValue::Any(vec!["a".into(), "b".into()]))
        );
        assert_eq!(serde_json::to_string(&info).expect("json"), text);
    }
}
