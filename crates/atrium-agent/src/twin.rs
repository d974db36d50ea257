//! The agent's side of the device twin: which desired version it has applied, the outcome
//! per desired key, persisted so the gateway starts with what it last applied while offline.
//!
//! The server sends the whole desired section with its version on connect and on every
//! change; the agent asks for it again (`TwinGet`) after each reconnect. A document not newer
//! than the one applied is ignored. Each top-level desired key goes to its handler; a key
//! without one is reported as rejected, so operators see that this agent does not understand
//! it. The outcome is reported as the reported key `applied` ([`AppliedReport`]).

use std::collections::BTreeMap;
use std::path::Path;

use atrium_proto::twin::{APPLIED_KEY, AppliedReport, KeyStatus};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// File in the data directory with the last applied desired twin.
const TWIN_FILE: &str = "twin.json";

/// What the agent keeps of the desired twin.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LocalTwin {
    /// The desired document last processed.
    pub desired: Map<String, Value>,
    /// The outcome per key, with the desired version.
    pub applied: AppliedReport,
}

impl LocalTwin {
    /// Loads the persisted twin; none (or an unreadable one, logged) is empty.
    pub fn load(data_dir: &Path) -> LocalTwin {
        let path = data_dir.join(TWIN_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "ignoring the stored twin");
                LocalTwin::default()
            }),
            Err(_) => LocalTwin::default(),
        }
    }

    /// Persists the twin atomically.
    pub fn store(&self, data_dir: &Path) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec_pretty(self)?;
        atrium_pki::write_secret_file(&data_dir.join(TWIN_FILE), &bytes)?;
        Ok(())
    }

    /// The desired version last processed (0: none).
    pub fn version(&self) -> u64 {
        self.applied.desired_version
    }

    /// The reported patch that tells the server the outcome.
    pub fn report_json(&self) -> String {
        let mut map = Map::new();
        map.insert(
            APPLIED_KEY.to_owned(),
            serde_json::to_value(&self.applied).unwrap_or(Value::Null),
        );
        Value::Object(map).to_string()
    }
}

/// The decision on one desired key.
pub type Outcome = Result<(), String>;

/// What the agent decided about a desired twin document from the server, before any side
/// effect: the twin to keep (and report) and the settings of the keys it handles.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    /// The document and its outcome per key; persist it and send its [`LocalTwin::report_json`].
    pub local: LocalTwin,
    /// The `filter` key's settings, when present and valid (absent: the configuration file's).
    pub filter: Option<crate::filter::FilterConfig>,
    /// The `rooms` key's room assignment, when present and valid.
    pub assignment: Option<crate::rooms::Assignment>,
}

/// Runs a desired twin document through the agent's handlers (`filter`: the sensor filter
/// settings, `rooms`: the room assignment; any other key is rejected). `None` when the document
/// is not a whole desired section, is not newer than `applied_version`, or is not a JSON
/// object (logged): nothing is applied or reported then.
pub fn receive(applied_version: u64, doc: &atrium_proto::TwinDocument) -> Option<Received> {
    if doc.section != atrium_proto::TwinSection::Desired || !doc.full {
        tracing::debug!(
            version = doc.version,
            "ignoring a twin patch or reported section"
        );
        return None;
    }
    if doc.version <= applied_version {
        tracing::debug!(
            version = doc.version,
            applied_version,
            "desired twin not newer"
        );
        return None;
    }
    let desired = match atrium_proto::twin::parse(&doc.json) {
        Ok(map) => map,
        Err(e) => {
            tracing::warn!(version = doc.version, error = %e, "desired twin not applied");
            return None;
        }
    };
    let mut assignment = None;
    let mut filter = None;
    let report = process(doc.version, &desired, |key, value| match key {
        "filter" => Some(crate::filter_from_twin(value).map(|f| {
            filter = Some(f);
        })),
        "rooms" => {
            let json = serde_json::json!({ "rooms": value }).to_string();
            Some(match crate::rooms::Assignment::from_twin_json(&json) {
                Ok(a) => {
                    assignment = Some(a);
                    Ok(())
                }
                Err(e) => Err(e.to_string()),
            })
        }
        _ => None,
    });
    Some(Received {
        local: LocalTwin {
            desired,
            applied: report,
        },
        filter,
        assignment,
    })
}

/// The link message carrying a reported patch (`json`, e.g. [`LocalTwin::report_json`]).
pub fn reported_message(json: String) -> atrium_proto::Message {
    atrium_proto::Message::Twin(atrium_proto::TwinDocument {
        section: atrium_proto::TwinSection::Reported,
        version: 0,
        full: false,
        json,
    })
}

/// Runs every top-level key of `desired` through `handle` (which returns `None` for keys it
/// has no handler for) and collects the outcomes for `version`.
pub fn process(
    version: u64,
    desired: &Map<String, Value>,
    mut handle: impl FnMut(&str, &Value) -> Option<Outcome>,
) -> AppliedReport {
    let keys: BTreeMap<String, KeyStatus> = desired
        .iter()
        .map(|(key, value)| {
            let status = match handle(key, value) {
                Some(Ok(())) => KeyStatus::Applied,
                Some(Err(reason)) => KeyStatus::Rejected { reason },
                None => KeyStatus::Rejected {
                    reason: format!(
                        "atrium-agent {} has no handler for {key:?}",
                        env!("CARGO_PKG_VERSION")
                    ),
                },
            };
            (key.clone(), status)
        })
        .collect();
    AppliedReport {
        desired_version: version,
        keys,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_without_handlers_are_rejected_with_a_reason() {
        let desired = match json!({"rooms": {}, "mystery": 1, "bad": 2}) {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        let report = process(7, &desired, |key, _| match key {
            "rooms" => Some(Ok(())),
            "bad" => Some(Err("out of range".into())),
            _ => None,
        });
        assert_eq!(report.desired_version, 7);
        assert_eq!(report.keys["rooms"], KeyStatus::Applied);
        assert_eq!(
            report.keys["bad"],
            KeyStatus::Rejected {
                reason: "out of range".into()
            }
        );
        assert!(
            matches!(&report.keys["mystery"], KeyStatus::Rejected { reason } if reason.contains("no handler"))
        );
    }

    fn desired(version: u64, json: &str) -> atrium_proto::TwinDocument {
        atrium_proto::TwinDocument {
            section: atrium_proto::TwinSection::Desired,
            version,
            full: true,
            json: json.into(),
        }
    }

    #[test]
    fn receive_applies_known_keys_and_skips_old_or_partial_documents() {
        let doc = desired(4, r#"{"filter": {}, "rooms": {}, "mystery": true}"#);
        let received = receive(3, &doc).expect("newer whole document");
        assert_eq!(received.local.version(), 4);
        assert_eq!(received.local.applied.keys["filter"], KeyStatus::Applied);
        assert_eq!(received.local.applied.keys["rooms"], KeyStatus::Applied);
        assert!(matches!(
            &received.local.applied.keys["mystery"],
            KeyStatus::Rejected { .. }
        ));
        assert!(received.filter.is_some());
        assert!(received.assignment.is_some());
        // Not newer, a patch, the reported section, garbage: nothing to apply.
        assert_eq!(receive(4, &doc), None);
        assert_eq!(receive(5, &doc), None);
        let patch = atrium_proto::TwinDocument {
            full: false,
            ..doc.clone()
        };
        assert_eq!(receive(0, &patch), None);
        let reported = atrium_proto::TwinDocument {
            section: atrium_proto::TwinSection::Reported,
            ..doc.clone()
        };
        assert_eq!(receive(0, &reported), None);
        assert_eq!(receive(0, &desired(9, "[1]")), None);
        // A bad value is rejected with its reason and leaves the setting alone.
        let bad = receive(0, &desired(2, r#"{"filter": 7}"#)).expect("processed");
        assert!(matches!(
            &bad.local.applied.keys["filter"],
            KeyStatus::Rejected { .. }
        ));
        assert_eq!(bad.filter, None);
    }

    #[test]
    fn persists_and_reloads() {
        let dir = tempfile::tempdir().expect("dir");
        assert_eq!(LocalTwin::load(dir.path()), LocalTwin::default());
        let twin = LocalTwin {
            desired: Map::new(),
            applied: AppliedReport {
                desired_version: 3,
                keys: BTreeMap::new(),
            },
        };
        twin.store(dir.path()).expect("store");
        assert_eq!(LocalTwin::load(dir.path()).version(), 3);
        std::fs::write(dir.path().join(TWIN_FILE), b"garbage").expect("write");
        assert_eq!(LocalTwin::load(dir.path()), LocalTwin::default());
        let report: Value = serde_json::from_str(&twin.report_json()).expect("json");
        assert_eq!(report["applied"]["desired_version"], 3);
    }
}
