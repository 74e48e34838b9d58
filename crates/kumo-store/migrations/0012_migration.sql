-- Live migrations: one row per attempt, its id the operation's. The step is persisted before
-- every action that cannot be taken back, so a restarted controller knows whether to roll the
-- migration back (before `switch`) or forward (from `switch` on).
CREATE TABLE migrations (
    id TEXT PRIMARY KEY,
    instance_id TEXT NOT NULL,
    project_id TEXT NOT NULL,
    source_host TEXT NOT NULL,
    dest_host TEXT NOT NULL,
    mode TEXT NOT NULL,
    step TEXT NOT NULL,
    reason TEXT NOT NULL,
    downtime_ms INTEGER NOT NULL,
    auto_converge INTEGER NOT NULL,
    bandwidth INTEGER,
    -- The source agent's job id while the transfer runs.
    job_id TEXT,
    -- The evacuation this migration belongs to, if any.
    evacuation_id TEXT,
    stats TEXT,
    error TEXT,
    -- A failed migration whose destination has not removed what it made yet (it did not answer):
    -- retried in the background until it does.
    dest_pending INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
-- At most one migration in flight per instance: the second one is refused by the database itself.
CREATE UNIQUE INDEX migrations_active ON migrations(instance_id) WHERE step NOT IN ('done', 'failed');
CREATE INDEX migrations_dest ON migrations(dest_host) WHERE step NOT IN ('done', 'failed');
CREATE INDEX migrations_instance ON migrations(instance_id, created_at);

-- Where an evacuated instance came from, so `kumo host return --move-home` can bring it back.
ALTER TABLE instances ADD COLUMN home_host_id TEXT;
