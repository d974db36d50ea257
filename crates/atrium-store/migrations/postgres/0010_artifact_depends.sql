-- Atrium store schema v10 (postgres): artifacts of one name and device type may coexist when
-- they depend on different things (Mender's rule since delta updates: a delta artifact carries
-- the full artifact's name but depends on the source image's checksum). The uniqueness of
-- (name, device type, depends) is checked by the store inside the write transaction (which
-- locks `artifacts` against concurrent uploads), so `artifact_device_types` becomes a plain
-- index. Keep in step with the other backend's 0010_artifact_depends.sql.

ALTER TABLE artifact_device_types DROP CONSTRAINT artifact_device_types_pkey;
ALTER TABLE artifact_device_types ADD PRIMARY KEY (artifact_id, device_type);
CREATE INDEX artifact_device_types_name ON artifact_device_types (name, device_type);
DROP INDEX artifact_device_types_artifact;
