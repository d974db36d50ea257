//! Device twins: the rules both ends apply to a twin section (desired or reported).
//!
//! A section is a JSON object with a version that only ever grows and per-key metadata (when
//! each key, at every level, last changed and in which version). Changes are JSON merge
//! patches (RFC 7386): objects merge key by key, `null` deletes a key, anything else replaces.
//! Limits keep a twin small enough to travel on every reconnect and to sit in a database row:
//!
//! | limit | value |
//! | --- | --- |
//! | a section or a patch, as compact JSON | at most [`MAX_SECTION_BYTES`] (32 KiB) |
//! | nesting of objects and arrays | at most [`MAX_DEPTH`] (10) levels below the section |
//! | a key | 1 to [`MAX_KEY_BYTES`] (128) bytes, no control characters, not starting with `$` |
//!
//! The module is pure (no I/O, no clock): callers pass the time.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Largest section or patch, in bytes of compact JSON.
pub const MAX_SECTION_BYTES: usize = 32 * 1024;
/// Deepest nesting below the section object.
pub const MAX_DEPTH: usize = 10;
/// Longest key.
pub const MAX_KEY_BYTES: usize = 128;

/// Why a twin document or patch is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TwinError {
    /// Not JSON.
    #[error("not valid JSON: {0}")]
    Json(String),
    /// JSON, but not an object.
    #[error("a twin section or patch must be a JSON object")]
    NotAnObject,
    /// Over the size limit.
    #[error("{bytes} bytes is over the twin limit of {MAX_SECTION_BYTES} bytes")]
    TooLarge {
        /// Size of the compact JSON.
        bytes: usize,
    },
    /// Nested too deep.
    #[error("nested deeper than {MAX_DEPTH} levels at {path}")]
    TooDeep {
        /// Where.
        path: String,
    },
    /// A key breaks the rules.
    #[error(
        "key {key:?} at {path}: keys are 1-{MAX_KEY_BYTES} bytes, without control characters, not starting with '$'"
    )]
    BadKey {
        /// The key.
        key: String,
        /// The object holding it.
        path: String,
    },
}

/// When a key last changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyMeta {
    /// Unix ms of the change.
    pub updated_ms: i64,
    /// Section version the change made.
    pub version: u64,
}

/// One section of a twin: the document, its version and per-key metadata (keyed by JSON
/// pointer, e.g. `/telemetry/interval_s`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Section {
    /// Version; 0 for a section never written.
    pub version: u64,
    /// The document.
    pub doc: Map<String, Value>,
    /// Per-key metadata by JSON pointer.
    pub meta: BTreeMap<String, KeyMeta>,
}

/// Parses and checks a document or patch.
pub fn parse(json: &str) -> Result<Map<String, Value>, TwinError> {
    let value: Value = serde_json::from_str(json).map_err(|e| TwinError::Json(e.to_string()))?;
    match value {
        Value::Object(map) => {
            check(&map)?;
            Ok(map)
        }
        _ => Err(TwinError::NotAnObject),
    }
}

/// Checks an already parsed document or patch against the limits.
pub fn check(map: &Map<String, Value>) -> Result<(), TwinError> {
    check_object(map, "", 0)?;
    let bytes = compact_len(map);
    if bytes > MAX_SECTION_BYTES {
        return Err(TwinError::TooLarge { bytes });
    }
    Ok(())
}

fn compact_len(map: &Map<String, Value>) -> usize {
    serde_json::to_vec(map)
        .map(|v| v.len())
        .unwrap_or(usize::MAX)
}

fn check_object(map: &Map<String, Value>, path: &str, depth: usize) -> Result<(), TwinError> {
    for (key, value) in map {
        let bad = key.is_empty()
            || key.len() > MAX_KEY_BYTES
            || key.starts_with('$')
            || key.chars().any(char::is_control);
        if bad {
            return Err(TwinError::BadKey {
                key: key.chars().take(MAX_KEY_BYTES).collect(),
                path: display_path(path),
            });
        }
        check_value(value, &pointer(path, key), depth + 1)?;
    }
    Ok(())
}

fn check_value(value: &Value, path: &str, depth: usize) -> Result<(), TwinError> {
    let nested = matches!(value, Value::Object(_) | Value::Array(_));
    if nested && depth >= MAX_DEPTH {
        return Err(TwinError::TooDeep {
            path: display_path(path),
        });
    }
    match value {
        Value::Object(map) => check_object(map, path, depth),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, v)| check_value(v, &format!("{path}/{i}"), depth + 1)),
        _ => Ok(()),
    }
}

fn display_path(path: &str) -> String {
    if path.is_empty() {
        "/".to_owned()
    } else {
        path.to_owned()
    }
}

/// The JSON pointer of `key` inside the object at `parent` (RFC 6901 escaping).
pub fn pointer(parent: &str, key: &str) -> String {
    format!("{parent}/{}", key.replace('~', "~0").replace('/', "~1"))
}

impl Section {
    /// Applies a merge patch at `now_ms`. Returns whether anything changed; only a change
    /// bumps the version. The result is checked against the limits before it is kept, so a
    /// refused patch leaves the section as it was.
    pub fn apply_patch(
        &mut self,
        patch: &Map<String, Value>,
        now_ms: i64,
    ) -> Result<bool, TwinError> {
        check(patch)?;
        let mut doc = self.doc.clone();
        let mut changed = Vec::new();
        merge(&mut doc, patch, "", &mut changed);
        if changed.is_empty() {
            return Ok(false);
        }
        check(&doc)?;
        self.commit(doc, &changed, now_ms);
        Ok(true)
    }

    /// Replaces the whole document at `now_ms` (keys that are gone are deleted). Returns
    /// whether anything changed.
    pub fn replace(&mut self, doc: Map<String, Value>, now_ms: i64) -> Result<bool, TwinError> {
        check(&doc)?;
        let patch = diff(&self.doc, &doc);
        if patch.is_empty() {
            return Ok(false);
        }
        let mut changed = Vec::new();
        let mut merged = self.doc.clone();
        merge(&mut merged, &patch, "", &mut changed);
        self.commit(merged, &changed, now_ms);
        Ok(true)
    }

    fn commit(&mut self, doc: Map<String, Value>, changed: &[Change], now_ms: i64) {
        self.version = self.version.saturating_add(1);
        let stamp = KeyMeta {
            updated_ms: now_ms,
            version: self.version,
        };
        for change in changed {
            let prefix = format!("{}/", change.path);
            self.meta
                .retain(|p, _| *p != change.path && !p.starts_with(&prefix));
            if change.deleted {
                continue;
            }
            self.meta.insert(change.path.clone(), stamp);
            // New leaves below the changed key get the stamp too.
            if let Some(value) = lookup(&doc, &change.path) {
                stamp_children(value, &change.path, stamp, &mut self.meta);
            }
        }
        // Every ancestor of a change changed as well.
        for change in changed {
            let mut path = change.path.as_str();
            while let Some(cut) = path.rfind('/') {
                path = &path[..cut];
                if path.is_empty() {
                    break;
                }
                self.meta.insert(path.to_owned(), stamp);
            }
        }
        self.doc = doc;
    }

    /// The document as compact JSON text.
    pub fn json(&self) -> String {
        Value::Object(self.doc.clone()).to_string()
    }
}

struct Change {
    path: String,
    deleted: bool,
}

/// RFC 7386 merge of `patch` into `doc`, recording the pointers of keys whose value changed.
fn merge(
    doc: &mut Map<String, Value>,
    patch: &Map<String, Value>,
    path: &str,
    changed: &mut Vec<Change>,
) {
    for (key, value) in patch {
        let at = pointer(path, key);
        match value {
            Value::Null => {
                if doc.remove(key).is_some() {
                    changed.push(Change {
                        path: at,
                        deleted: true,
                    });
                }
            }
            Value::Object(inner) => match doc.get_mut(key) {
                Some(Value::Object(existing)) => merge(existing, inner, &at, changed),
                _ => {
                    let mut fresh = Map::new();
                    let mut ignored = Vec::new();
                    merge(&mut fresh, inner, &at, &mut ignored);
                    doc.insert(key.clone(), Value::Object(fresh));
                    changed.push(Change {
                        path: at,
                        deleted: false,
                    });
                }
            },
            other => {
                if doc.get(key) != Some(other) {
                    doc.insert(key.clone(), other.clone());
                    changed.push(Change {
                        path: at,
                        deleted: false,
                    });
                }
            }
        }
    }
}

/// The merge patch that turns `from` into `to`.
pub fn diff(from: &Map<String, Value>, to: &Map<String, Value>) -> Map<String, Value> {
    let mut patch = Map::new();
    for key in from.keys() {
        if !to.contains_key(key) {
            patch.insert(key.clone(), Value::Null);
        }
    }
    for (key, new) in to {
        match (from.get(key), new) {
            (Some(old), new) if old == new => {}
            (Some(Value::Object(old)), Value::Object(new)) => {
                patch.insert(key.clone(), Value::Object(diff(old, new)));
            }
            // A new object without nulls inside merges to itself.
            (_, new) => {
                patch.insert(key.clone(), strip_nulls(new));
            }
        }
    }
    patch
}

/// Merge patches cannot carry `null` values inside new objects (they mean "delete"), so a
/// document's nulls inside objects are dropped when it is turned into a patch.
fn strip_nulls(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), strip_nulls(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

fn lookup<'a>(doc: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    let mut parts = path.split('/').skip(1);
    let first = unescape(parts.next()?);
    let mut value = doc.get(&first)?;
    for part in parts {
        value = value.as_object()?.get(&unescape(part))?;
    }
    Some(value)
}

fn unescape(part: &str) -> String {
    part.replace("~1", "/").replace("~0", "~")
}

fn stamp_children(value: &Value, path: &str, stamp: KeyMeta, meta: &mut BTreeMap<String, KeyMeta>) {
    if let Value::Object(map) = value {
        for (key, child) in map {
            let at = pointer(path, key);
            meta.insert(at.clone(), stamp);
            stamp_children(child, &at, stamp, meta);
        }
    }
}

/// What the agent reports about one desired key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum KeyStatus {
    /// The agent applied the key's value.
    Applied,
    /// The agent did not apply it, and why.
    Rejected {
        /// Why, in words an operator can act on.
        reason: String,
    },
}

/// The part of the reported section in which the agent answers the desired section: the
/// desired version it has processed and the outcome per top-level desired key. Reported as
/// the key [`APPLIED_KEY`] of the reported section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedReport {
    /// The desired version these results are for.
    pub desired_version: u64,
    /// Outcome per top-level key of the desired section.
    pub keys: BTreeMap<String, KeyStatus>,
}

/// The reported key under which the agent answers the desired section.
pub const APPLIED_KEY: &str = "applied";

#[cfg(test)]
// In tests a panic is the failure report.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn merge_patch_follows_rfc_7386() {
        let mut s = Section::default();
        assert!(
            s.apply_patch(&obj(json!({"a": {"b": 1, "c": 2}, "x": [1, 2]})), 10)
                .unwrap()
        );
        assert_eq!(s.version, 1);
        assert!(
            s.apply_patch(&obj(json!({"a": {"b": null, "d": 4}, "x": [3]})), 20)
                .unwrap()
        );
        assert_eq!(s.doc, obj(json!({"a": {"c": 2, "d": 4}, "x": [3]})));
        assert_eq!(s.version, 2);
        // Nothing changed: same version.
        assert!(
            !s.apply_patch(&obj(json!({"a": {"c": 2}, "gone": null})), 30)
                .unwrap()
        );
        assert_eq!(s.version, 2);
        // Metadata: changed keys and their ancestors carry the change, others keep theirs.
        assert_eq!(
            s.meta["/a/c"],
            KeyMeta {
                updated_ms: 10,
                version: 1
            }
        );
        assert_eq!(
            s.meta["/a/d"],
            KeyMeta {
                updated_ms: 20,
                version: 2
            }
        );
        assert_eq!(
            s.meta["/a"],
            KeyMeta {
                updated_ms: 20,
                version: 2
            }
        );
        assert!(!s.meta.contains_key("/a/b"));
        assert_eq!(s.meta["/x"].version, 2);
        // A scalar replacing an object drops the object's metadata.
        assert!(s.apply_patch(&obj(json!({"a": 5})), 40).unwrap());
        assert!(!s.meta.contains_key("/a/c"));
        assert_eq!(s.meta["/a"].version, 3);
    }

    #[test]
    fn replace_deletes_missing_keys() {
        let mut s = Section::default();
        s.replace(obj(json!({"a": 1, "b": {"c": 2}})), 1).unwrap();
        assert!(s.replace(obj(json!({"b": {"d": 3}})), 2).unwrap());
        assert_eq!(s.doc, obj(json!({"b": {"d": 3}})));
        assert!(!s.meta.contains_key("/a") && !s.meta.contains_key("/b/c"));
        assert!(!s.replace(obj(json!({"b": {"d": 3}})), 3).unwrap());
        assert_eq!(s.version, 2);
    }

    #[test]
    fn limits_are_enforced_and_leave_the_section_unchanged() {
        assert_eq!(parse("[1]"), Err(TwinError::NotAnObject));
        assert!(matches!(parse("{"), Err(TwinError::Json(_))));
        assert!(matches!(
            parse(r#"{"$version": 1}"#),
            Err(TwinError::BadKey { .. })
        ));
        assert!(matches!(parse(r#"{"": 1}"#), Err(TwinError::BadKey { .. })));
        let key = "k".repeat(MAX_KEY_BYTES + 1);
        assert!(matches!(
            parse(&format!(r#"{{"{key}": 1}}"#)),
            Err(TwinError::BadKey { .. })
        ));
        let deep = format!(
            "{}1{}",
            r#"{"a":"#.repeat(MAX_DEPTH + 1),
            "}".repeat(MAX_DEPTH + 1)
        );
        assert!(
            matches!(parse(&deep), Err(TwinError::TooDeep { .. })),
            "{deep}"
        );
        let ok_deep = format!("{}1{}", r#"{"a":"#.repeat(MAX_DEPTH), "}".repeat(MAX_DEPTH));
        assert!(parse(&ok_deep).is_ok());
        let big = format!(r#"{{"a": "{}"}}"#, "x".repeat(MAX_SECTION_BYTES));
        assert!(matches!(parse(&big), Err(TwinError::TooLarge { .. })));
        // Two patches each under the limit whose sum is over it: the second is refused.
        let mut s = Section::default();
        let half = "x".repeat(MAX_SECTION_BYTES / 2);
        s.apply_patch(&obj(json!({"a": half})), 1).unwrap();
        let before = s.clone();
        assert!(matches!(
            s.apply_patch(&obj(json!({"b": half})), 2),
            Err(TwinError::TooLarge { .. })
        ));
        assert_eq!(s, before);
    }

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<i32>().prop_map(|n| json!(n)),
            "[a-c]{0,3}".prop_map(Value::String),
            any::<bool>().prop_map(Value::Bool),
        ]
    }

    fn patch() -> impl Strategy<Value = Map<String, Value>> {
        let value = leaf().prop_recursive(3, 16, 3, |inner| {
            prop::collection::btree_map("[a-d]", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect()))
        });
        prop::collection::btree_map("[a-d]", value, 0..4).prop_map(|m| m.into_iter().collect())
    }

    proptest! {
        /// Replacing with the result of a merge patch gives the same document, diff/merge
        /// round-trips, versions only grow, and every key of the document has metadata.
        #[test]
        fn merge_diff_and_versions_agree(patches in prop::collection::vec(patch(), 1..8)) {
            let mut a = Section::default();
            let mut b = Section::default();
            let mut last = 0;
            for (i, p) in patches.iter().enumerate() {
                let now = i64::try_from(i).unwrap_or(0);
                a.apply_patch(p, now).unwrap();
                prop_assert!(a.version >= last);
                last = a.version;
                b.replace(a.doc.clone(), now).unwrap();
                prop_assert_eq!(&a.doc, &b.doc);
                let d = diff(&Map::new(), &a.doc);
                let mut c = Section::default();
                c.apply_patch(&d, 0).unwrap();
                prop_assert_eq!(&c.doc, &a.doc);
                for (k, v) in &a.doc {
                    prop_assert!(a.meta.contains_key(&pointer("", k)));
                    prop_assert!(!v.is_null());
                }
            }
        }
    }
}
