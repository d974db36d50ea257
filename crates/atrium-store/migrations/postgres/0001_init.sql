-- Atrium store schema v1 (PostgreSQL). Keep in step with ../sqlite/0001_init.sql:
-- same tables, columns and meaning; only the type names differ.
-- Conventions: ids are app-generated TEXT, times are BIGINT unix milliseconds,
-- booleans are BIGINT 0/1, maps and JSON documents are TEXT (JSON), keys are BYTEA.

CREATE TABLE devices (
    id                   TEXT PRIMARY KEY NOT NULL,
    status               TEXT NOT NULL CHECK (status IN ('pending', 'accepted', 'rejected', 'decommissioned')),
    status_reason        TEXT NOT NULL,
    mac                  TEXT NOT NULL,
    serial               TEXT NOT NULL,
    device_type          TEXT NOT NULL,
    hardware_model       TEXT NOT NULL,
    identity_extra       TEXT NOT NULL,
    -- Unique for ever: a decommissioned device keeps its key, so that key can never enroll again.
    key_fingerprint      TEXT NOT NULL UNIQUE,
    public_key_der       BYTEA NOT NULL,
    enrollment_kind      TEXT NOT NULL CHECK (enrollment_kind IN ('manual', 'preauthorized', 'group')),
    enrollment_group     TEXT,
    tags                 TEXT NOT NULL,
    inventory            TEXT NOT NULL,
    inventory_updated_ms BIGINT,
    created_ms           BIGINT NOT NULL,
    updated_ms           BIGINT NOT NULL,
    last_seen_ms         BIGINT,
    connected            BIGINT NOT NULL DEFAULT 0 CHECK (connected IN (0, 1))
);
CREATE INDEX devices_by_status ON devices (status, created_ms, id);
CREATE INDEX devices_by_created ON devices (created_ms, id);
CREATE INDEX devices_by_serial ON devices (serial);

CREATE TABLE certificates (
    serial_hex   TEXT PRIMARY KEY NOT NULL,
    device_id    TEXT NOT NULL REFERENCES devices (id),
    issued_ms    BIGINT NOT NULL,
    not_after_ms BIGINT NOT NULL,
    revoked      BIGINT NOT NULL DEFAULT 0 CHECK (revoked IN (0, 1)),
    revoked_ms   BIGINT
);
CREATE INDEX certificates_by_device ON certificates (device_id, issued_ms);

CREATE TABLE preauthorizations (
    id              TEXT PRIMARY KEY NOT NULL,
    mac             TEXT NOT NULL,
    serial          TEXT NOT NULL,
    device_type     TEXT NOT NULL,
    hardware_model  TEXT NOT NULL,
    identity_extra  TEXT NOT NULL,
    key_fingerprint TEXT NOT NULL UNIQUE,
    tags            TEXT NOT NULL,
    created_ms      BIGINT NOT NULL,
    created_by      TEXT NOT NULL
);

CREATE TABLE enrollment_groups (
    name           TEXT PRIMARY KEY NOT NULL,
    ca_pem         TEXT NOT NULL,
    ca_fingerprint TEXT NOT NULL UNIQUE,
    enabled        BIGINT NOT NULL CHECK (enabled IN (0, 1)),
    tags           TEXT NOT NULL,
    attributes     TEXT NOT NULL,
    created_ms     BIGINT NOT NULL
);

CREATE TABLE denied_serials (
    serial     TEXT PRIMARY KEY NOT NULL,
    reason     TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);

CREATE TABLE api_tokens (
    id           TEXT PRIMARY KEY NOT NULL,
    name         TEXT NOT NULL,
    role         TEXT NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
    token_hash   TEXT NOT NULL UNIQUE,
    created_ms   BIGINT NOT NULL,
    last_used_ms BIGINT,
    revoked      BIGINT NOT NULL DEFAULT 0 CHECK (revoked IN (0, 1))
);
-- A name is reusable once the token holding it is revoked.
CREATE UNIQUE INDEX api_tokens_active_name ON api_tokens (name) WHERE revoked = 0;

-- The audit log. `seq` comes from the single-row counter below, taken in the writing
-- transaction, so sequence order is commit order on both backends (a reader tailing
-- with `seq > last_seen` never skips an entry that commits late).
CREATE TABLE audit_counter (
    id       BIGINT PRIMARY KEY NOT NULL CHECK (id = 1),
    last_seq BIGINT NOT NULL
);
INSERT INTO audit_counter (id, last_seq) VALUES (1, 0);

CREATE TABLE audit_log (
    seq     BIGINT PRIMARY KEY NOT NULL,
    time_ms BIGINT NOT NULL,
    actor   TEXT NOT NULL,
    action  TEXT NOT NULL,
    target  TEXT NOT NULL,
    details TEXT NOT NULL
);
CREATE INDEX audit_by_target ON audit_log (target, seq);
CREATE INDEX audit_by_actor ON audit_log (actor, seq);
