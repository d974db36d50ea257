-- Atrium store schema v4 (postgres): device twins. Keep in step with the other backend's
-- 0004_twins.sql. Each section is JSON text with its version and per-key metadata (JSON
-- pointer -> {updated_ms, version}); versions only grow.

CREATE TABLE twins (
    device_id        TEXT PRIMARY KEY NOT NULL REFERENCES devices (id),
    desired          TEXT NOT NULL,
    desired_version  BIGINT NOT NULL,
    desired_meta     TEXT NOT NULL,
    reported         TEXT NOT NULL,
    reported_version BIGINT NOT NULL,
    reported_meta    TEXT NOT NULL,
    updated_ms       BIGINT NOT NULL
);
