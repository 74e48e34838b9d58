-- Placement policies (issue 3): where each host keeps its VM disks, an operator's per-host
-- overcommit and reserve (NULL: the cluster's policy), spread placement groups, and what an
-- instance asked of placement, kept so that it can be placed again by the same rules.
ALTER TABLE hosts ADD COLUMN storage_pool TEXT NOT NULL DEFAULT '';
ALTER TABLE hosts ADD COLUMN disk_gib BIGINT NOT NULL DEFAULT 0;
ALTER TABLE hosts ADD COLUMN cpu_overcommit DOUBLE PRECISION;
ALTER TABLE hosts ADD COLUMN memory_overcommit DOUBLE PRECISION;
ALTER TABLE hosts ADD COLUMN reserved_memory_mib BIGINT;

CREATE TABLE placement_groups (
    id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL REFERENCES projects(id),
    name TEXT NOT NULL,
    strategy TEXT NOT NULL,
    max_per_host BIGINT NOT NULL,
    spread_storage BIGINT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE UNIQUE INDEX placement_groups_name ON placement_groups(project_id, name);

ALTER TABLE instances ADD COLUMN placement_group_id TEXT;
ALTER TABLE instances ADD COLUMN requested_site TEXT;
ALTER TABLE instances ADD COLUMN constraints TEXT NOT NULL DEFAULT '[]';
CREATE INDEX instances_group ON instances(placement_group_id) WHERE placement_group_id IS NOT NULL AND state <> 'terminated';
