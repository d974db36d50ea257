-- Atrium store schema v2 (SQLite): rooms and telemetry. Keep in step with
-- ../postgres/0002_rooms.sql (same tables and columns; only type names differ).

CREATE TABLE buildings (
    id         TEXT PRIMARY KEY NOT NULL,
    name       TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);

CREATE TABLE floors (
    id          TEXT PRIMARY KEY NOT NULL,
    building_id TEXT NOT NULL REFERENCES buildings (id),
    level       INTEGER NOT NULL,
    name        TEXT NOT NULL,
    created_ms  INTEGER NOT NULL,
    updated_ms  INTEGER NOT NULL,
    UNIQUE (building_id, level)
);

CREATE TABLE rooms (
    id         TEXT PRIMARY KEY NOT NULL,
    floor_id   TEXT NOT NULL REFERENCES floors (id),
    name       TEXT NOT NULL,
    capacity   INTEGER NOT NULL,
    volume_m3  REAL NOT NULL,
    profile    TEXT NOT NULL CHECK (profile IN ('uba', 'strict', 'above-outdoor')),
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE INDEX rooms_by_floor ON rooms (floor_id);

-- A sensor node reports through one gateway device into one room.
CREATE TABLE sensor_nodes (
    node       TEXT PRIMARY KEY NOT NULL,
    room_id    TEXT NOT NULL REFERENCES rooms (id),
    device_id  TEXT NOT NULL REFERENCES devices (id),
    updated_ms INTEGER NOT NULL
);
CREATE INDEX sensor_nodes_by_device ON sensor_nodes (device_id);
CREATE INDEX sensor_nodes_by_room ON sensor_nodes (room_id);

-- One counter that grows with every change of rooms or assignments: the desired-twin version.
CREATE TABLE rooms_revision (
    id       INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    revision INTEGER NOT NULL
);
INSERT INTO rooms_revision (id, revision) VALUES (1, 0);

-- Raw readings, written for rate: no primary key, no index (retention deletes by time
-- with a full scan, once in a while).
CREATE TABLE telemetry (
    device_id TEXT NOT NULL,
    node      TEXT NOT NULL,
    quantity  TEXT NOT NULL,
    time_ms   INTEGER NOT NULL,
    value     REAL NOT NULL
);

-- Per device: the agent spool position up to which readings are stored (the high-water mark).
CREATE TABLE telemetry_marks (
    device_id  TEXT PRIMARY KEY NOT NULL,
    batch_seq  INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);

-- Per room and minute, written by the server's rooms engine.
CREATE TABLE room_history (
    room_id               TEXT NOT NULL,
    minute_ms             INTEGER NOT NULL,
    co2_ppm               REAL,
    temperature_c         REAL,
    humidity_pct          REAL,
    occupancy_probability REAL NOT NULL,
    people                REAL NOT NULL,
    occupied              INTEGER NOT NULL CHECK (occupied IN (0, 1)),
    PRIMARY KEY (room_id, minute_ms)
);

CREATE TABLE room_events (
    room_id TEXT NOT NULL,
    time_ms INTEGER NOT NULL,
    kind    TEXT NOT NULL,
    detail  TEXT NOT NULL
);
CREATE INDEX room_events_by_room ON room_events (room_id, time_ms);
