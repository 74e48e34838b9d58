-- Plain SQL that SQLite and PostgreSQL both accept: TEXT ids and timestamps (RFC 3339, UTC),
-- BIGINT numbers, no engine-specific types.

CREATE TABLE projects (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);

CREATE TABLE users (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    project_id TEXT NOT NULL REFERENCES projects(id),
    role TEXT NOT NULL,
    created_at TEXT NOT NULL
);

CREATE TABLE access_keys (
    id TEXT PRIMARY KEY,
    secret TEXT NOT NULL,
    user_id TEXT NOT NULL REFERENCES users(id),
    created_at TEXT NOT NULL,
    revoked_at TEXT
);

CREATE TABLE join_tokens (
    token TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    revoked_at TEXT
);

CREATE TABLE hosts (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    secret TEXT NOT NULL,
    address TEXT NOT NULL,
    site TEXT NOT NULL,
    state TEXT NOT NULL,
    vcpus BIGINT NOT NULL,
    memory_mib BIGINT NOT NULL,
    hypervisor TEXT NOT NULL,
    accel TEXT NOT NULL,
    qemu_version TEXT NOT NULL,
    last_heartbeat TEXT,
    generation BIGINT NOT NULL,
    created_at TEXT NOT NULL
);

CREATE TABLE instance_types (
    name TEXT PRIMARY KEY,
    vcpus BIGINT NOT NULL,
    memory_mib BIGINT NOT NULL,
    disk_gib BIGINT NOT NULL
);

INSERT INTO instance_types (name, vcpus, memory_mib, disk_gib) VALUES
    ('t1.nano', 1, 128, 1),
    ('t1.micro', 1, 256, 2),
    ('t1.small', 1, 512, 4),
    ('t1.medium', 2, 1024, 8),
    ('t1.large', 2, 2048, 16),
    ('t1.xlarge', 4, 4096, 32),
    ('m1.2xlarge', 8, 16384, 64);

CREATE TABLE images (
    id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL REFERENCES projects(id),
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    public BIGINT NOT NULL,
    source_format TEXT,
    virtual_size BIGINT,
    file_size BIGINT,
    sha256 TEXT,
    path TEXT NOT NULL,
    kernel_id TEXT,
    ramdisk_id TEXT,
    cmdline TEXT,
    error TEXT,
    deleted_at TEXT,
    created_at TEXT NOT NULL
);
CREATE INDEX images_project ON images(project_id);

CREATE TABLE networks (
    id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL REFERENCES projects(id),
    name TEXT NOT NULL,
    cidr TEXT NOT NULL,
    gateway TEXT NOT NULL,
    created_at TEXT NOT NULL
);

CREATE TABLE instances (
    id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL REFERENCES projects(id),
    name TEXT NOT NULL,
    image_id TEXT NOT NULL REFERENCES images(id),
    instance_type TEXT NOT NULL,
    vcpus BIGINT NOT NULL,
    memory_mib BIGINT NOT NULL,
    disk_gib BIGINT NOT NULL,
    state TEXT NOT NULL,
    desired TEXT NOT NULL,
    reboot_seq BIGINT NOT NULL,
    host_id TEXT REFERENCES hosts(id),
    network_id TEXT NOT NULL REFERENCES networks(id),
    mac TEXT NOT NULL,
    private_ip TEXT NOT NULL,
    generation BIGINT NOT NULL,
    observed_generation BIGINT NOT NULL,
    last_error TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    terminated_at TEXT
);
CREATE INDEX instances_project ON instances(project_id, id);
CREATE INDEX instances_host ON instances(host_id);
-- An address or MAC is held while an instance exists; terminated instances release them.
CREATE UNIQUE INDEX instances_live_ip ON instances(network_id, private_ip) WHERE state <> 'terminated';
CREATE UNIQUE INDEX instances_live_mac ON instances(mac) WHERE state <> 'terminated';

CREATE TABLE operations (
    id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    target_id TEXT NOT NULL,
    state TEXT NOT NULL,
    progress DOUBLE PRECISION NOT NULL,
    error TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX operations_project ON operations(project_id, id);

CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    project_id TEXT,
    user_id TEXT,
    action TEXT NOT NULL,
    target TEXT,
    result TEXT NOT NULL,
    request_id TEXT,
    detail TEXT
);
CREATE INDEX events_project ON events(project_id, id);

CREATE TABLE idempotency (
    user_id TEXT NOT NULL,
    key TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    status BIGINT NOT NULL,
    body TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (user_id, key)
);
