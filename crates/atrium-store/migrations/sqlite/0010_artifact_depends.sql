-- Atrium store schema v10 (sqlite): artifacts of one name and device type may coexist when
-- they depend on different things (Mender's rule since delta updates: a delta artifact carries
-- the full artifact's name but depends on the source image's checksum). The uniqueness of
-- (name, device type, depends) is checked by the store inside the write transaction, so
-- `artifact_device_types` becomes a plain index. Keep in step with the other backend's
-- 0010_artifact_depends.sql.

CREATE TABLE artifact_device_types_v10 (
    artifact_id TEXT NOT NULL REFERENCES artifacts (id) ON DELETE CASCADE,
    name        TEXT NOT NULL,
    device_type TEXT NOT NULL,
    PRIMARY KEY (artifact_id, device_type)
);
INSERT INTO artifact_device_types_v10 (artifact_id, name, device_type)
    SELECT artifact_id, name, device_type FROM artifact_device_types;
DROP TABLE artifact_device_types;
ALTER TABLE artifact_device_types_v10 RENAME TO artifact_device_types;
CREATE INDEX artifact_device_types_name ON artifact_device_types (name, device_type);
CREATE INDEX artifact_device_types_type ON artifact_device_types (device_type);
