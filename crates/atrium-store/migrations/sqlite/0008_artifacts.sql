-- Atrium store schema v8 (sqlite): update artifacts (Mender format) in the blob store. Keep in
-- step with the other backend's 0008_artifacts.sql.

-- One row per uploaded artifact; its bytes are the blob named by `id`.
CREATE TABLE artifacts (
    id              TEXT PRIMARY KEY NOT NULL,
    name            TEXT NOT NULL,
    -- JSON array of the compatible device types.
    device_types    TEXT NOT NULL,
    -- JSON objects: everything the artifact provides and depends on (artifact and payloads).
    provides        TEXT NOT NULL,
    depends         TEXT NOT NULL,
    -- JSON arrays: provides the artifact clears on install, payload types.
    clears_provides TEXT NOT NULL,
    payload_types   TEXT NOT NULL,
    size            INTEGER NOT NULL,
    -- SHA-256 (hex) of the whole artifact file.
    sha256          TEXT NOT NULL,
    signed          INTEGER NOT NULL CHECK (signed IN (0, 1)),
    -- The configured verification key that verified the signature (none: not checked).
    verified_key    TEXT,
    description     TEXT NOT NULL,
    uploaded_by     TEXT NOT NULL,
    uploaded_ms     INTEGER NOT NULL
);
CREATE INDEX artifacts_name ON artifacts (name, uploaded_ms);

-- Mender's rule: one artifact per name and device type, so a device is never offered two
-- different artifacts under one name.
CREATE TABLE artifact_device_types (
    artifact_id TEXT NOT NULL REFERENCES artifacts (id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    device_type TEXT NOT NULL,
    PRIMARY KEY (name, device_type)
);
CREATE INDEX artifact_device_types_artifact ON artifact_device_types (artifact_id);
CREATE INDEX artifact_device_types_type ON artifact_device_types (device_type);
