-- Storage: pools (one per host, reported by its agent), volumes, snapshots, backups and schedules.
-- Rows of deleted volumes, snapshots and backups stay, so ids are never reused (seed 002).
CREATE TABLE storage_pools (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    -- Virtual bytes per real byte (thin provisioning), set by the operator.
    overcommit DOUBLE PRECISION NOT NULL DEFAULT 1.0,
    created_at TEXT NOT NULL
);
ALTER TABLE hosts ADD COLUMN pool_name TEXT NOT NULL DEFAULT 'local';
ALTER TABLE hosts ADD COLUMN pool_kind TEXT NOT NULL DEFAULT 'dir';
ALTER TABLE hosts ADD COLUMN pool_total_bytes BIGINT NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN pool_free_bytes BIGINT NOT NULL DEFAULT 0;
-- An instance whose root disk was made from a snapshot (booted snapshot, hot clone).
ALTER TABLE instances ADD COLUMN root_snapshot_id TEXT;

CREATE TABLE volumes (
    id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL REFERENCES projects(id),
    name TEXT,
    size_bytes BIGINT NOT NULL,
    pool TEXT NOT NULL,
    -- The host holding the volume in a local pool; NULL in a shared pool.
    host_id TEXT REFERENCES hosts(id),
    state TEXT NOT NULL,
    instance_id TEXT REFERENCES instances(id),
    attach_state TEXT,
    snapshot_id TEXT,
    last_error TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    deleted_at TEXT
);
CREATE INDEX volumes_project ON volumes(project_id, id) WHERE deleted_at IS NULL;
CREATE INDEX volumes_instance ON volumes(instance_id) WHERE instance_id IS NOT NULL;
CREATE UNIQUE INDEX volumes_name ON volumes(project_id, name) WHERE deleted_at IS NULL AND name IS NOT NULL;

CREATE TABLE snapshots (
    id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL REFERENCES projects(id),
    description TEXT,
    source_kind TEXT NOT NULL,
    source_id TEXT NOT NULL,
    size_bytes BIGINT NOT NULL,
    pool TEXT NOT NULL,
    host_id TEXT REFERENCES hosts(id),
    state TEXT NOT NULL,
    io_pause_ms DOUBLE PRECISION,
    image_id TEXT,
    last_error TEXT,
    created_at TEXT NOT NULL,
    deleted_at TEXT
);
CREATE INDEX snapshots_project ON snapshots(project_id, id) WHERE deleted_at IS NULL;

CREATE TABLE backups (
    id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL REFERENCES projects(id),
    source_kind TEXT NOT NULL,
    source_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    parent_id TEXT,
    state TEXT NOT NULL,
    bytes_written BIGINT,
    virtual_size BIGINT,
    repository TEXT NOT NULL,
    operation_id TEXT,
    schedule_id TEXT,
    last_error TEXT,
    created_at TEXT NOT NULL,
    finished_at TEXT,
    deleted_at TEXT
);
CREATE INDEX backups_source ON backups(source_id, created_at) WHERE deleted_at IS NULL;

CREATE TABLE backup_schedules (
    id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL REFERENCES projects(id),
    source_kind TEXT NOT NULL,
    source_id TEXT NOT NULL,
    cron TEXT NOT NULL,
    keep_last BIGINT NOT NULL,
    keep_hourly BIGINT NOT NULL,
    keep_daily BIGINT NOT NULL,
    keep_weekly BIGINT NOT NULL,
    next_run TEXT,
    created_at TEXT NOT NULL,
    deleted_at TEXT
);
