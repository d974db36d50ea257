-- Atrium store schema v6 (postgres): device groups. Keep in step with the other backend's
-- 0006_groups.sql. A static group lists its members; a dynamic group is a saved filter
-- (the text of atrium_proto::filter) whose members are computed when asked.

CREATE TABLE device_groups (
    name       TEXT PRIMARY KEY NOT NULL,
    -- NULL: a static group.
    filter     TEXT,
    created_ms BIGINT NOT NULL,
    created_by TEXT NOT NULL
);

CREATE TABLE device_group_members (
    group_name TEXT NOT NULL REFERENCES device_groups (name) ON DELETE CASCADE,
    device_id  TEXT NOT NULL REFERENCES devices (id),
    added_ms   BIGINT NOT NULL,
    PRIMARY KEY (group_name, device_id)
);
CREATE INDEX device_group_members_device ON device_group_members (device_id);
