-- Atrium store schema v9 (sqlite): deployments of update artifacts to devices, in phases. Keep
-- in step with the other backend's 0009_deployments.sql.

CREATE TABLE deployments (
    id                  TEXT PRIMARY KEY NOT NULL,
    name                TEXT NOT NULL,
    -- `artifact_provides.artifact_name` of the artifacts to install.
    artifact_name       TEXT NOT NULL,
    -- JSON: {"device": ..} | {"group": ..} | {"filter": ..}.
    target              TEXT NOT NULL,
    -- JSON array of phases with their progress (devices, started_ms, released).
    phases              TEXT NOT NULL,
    success_threshold   INTEGER NOT NULL,
    failure_threshold   INTEGER NOT NULL,
    failure_min_devices INTEGER NOT NULL,
    max_concurrent      INTEGER NOT NULL,
    retries             INTEGER NOT NULL,
    retry_delay_s       INTEGER NOT NULL,
    resolve_interval_s  INTEGER NOT NULL,
    start_at            INTEGER,
    -- scheduled, running, paused, halted, aborted, finished.
    status              TEXT NOT NULL,
    status_reason       TEXT,
    -- Index of the last phase started.
    phase               INTEGER NOT NULL,
    created_by          TEXT NOT NULL,
    created_ms          INTEGER NOT NULL,
    updated_ms          INTEGER NOT NULL,
    finished_ms         INTEGER,
    -- After an operator resumed a halted deployment: the failure threshold counts only
    -- devices that ended from then on.
    thresholds_from_ms  INTEGER
);
CREATE INDEX deployments_created ON deployments (created_ms);
CREATE INDEX deployments_status ON deployments (status);

-- One row per device a deployment targets; a device that leaves the target keeps its row.
CREATE TABLE deployment_devices (
    deployment_id TEXT NOT NULL REFERENCES deployments (id) ON DELETE CASCADE,
    device_id     TEXT NOT NULL,
    phase         INTEGER NOT NULL,
    -- pending, offered, downloading, installing, rebooting, verifying, success,
    -- already-installed, failure, incompatible, aborted.
    status        TEXT NOT NULL,
    attempt       INTEGER NOT NULL,
    bytes         INTEGER NOT NULL,
    -- The compatible artifact picked for this device (none: incompatible).
    artifact_id   TEXT,
    reason        TEXT,
    -- The device's own install log, the last 64 KiB.
    log           TEXT NOT NULL,
    started_ms    INTEGER,
    updated_ms    INTEGER NOT NULL,
    finished_ms   INTEGER,
    -- When a pending device may be offered (a retry's delay); none: when due.
    next_offer_ms INTEGER,
    PRIMARY KEY (deployment_id, device_id)
);
CREATE INDEX deployment_devices_device ON deployment_devices (device_id);
