-- Atrium store schema v5 (postgres): webhooks and their delivery log. Keep in step with the
-- other backend's 0005_webhooks.sql.

CREATE TABLE webhooks (
    id         TEXT PRIMARY KEY NOT NULL,
    url        TEXT NOT NULL,
    -- HMAC key of the signatures; the server needs it in clear to sign.
    secret     TEXT NOT NULL,
    -- Comma-separated event-type prefixes ("room.,device.accept"); empty: every event.
    events     TEXT NOT NULL,
    enabled    BIGINT NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
    created_ms BIGINT NOT NULL
);

-- One row per event per webhook: pending until delivered or given up, with every attempt's
-- outcome in the last_* columns.
CREATE TABLE webhook_deliveries (
    id              TEXT PRIMARY KEY NOT NULL,
    webhook_id      TEXT NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
    event_id        TEXT NOT NULL,
    event_type      TEXT NOT NULL,
    payload         TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        BIGINT NOT NULL,
    next_attempt_ms BIGINT NOT NULL,
    last_status     BIGINT,
    last_error      TEXT,
    created_ms      BIGINT NOT NULL,
    updated_ms      BIGINT NOT NULL,
    UNIQUE (webhook_id, event_id)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (status, next_attempt_ms);
CREATE INDEX webhook_deliveries_hook ON webhook_deliveries (webhook_id, created_ms);

-- How far the lifecycle event feed has read the audit log (one row).
CREATE TABLE event_cursor (
    id       BIGINT PRIMARY KEY NOT NULL CHECK (id = 1),
    last_seq BIGINT NOT NULL
);
INSERT INTO event_cursor (id, last_seq) VALUES (1, 0);
