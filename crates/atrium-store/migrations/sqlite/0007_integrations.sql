-- Atrium store schema v7 (sqlite): how far each external integration (a device registry kept in
-- step with the lifecycle) has read the audit log. Keep in step with the other backend's
-- 0007_integrations.sql.

CREATE TABLE integration_cursors (
    name     TEXT PRIMARY KEY NOT NULL,
    last_seq INTEGER NOT NULL
);
