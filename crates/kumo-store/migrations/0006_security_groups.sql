-- Security groups (stateful firewall rules per instance port), their rules, which groups each
-- instance is in, and key pairs whose public keys the metadata service hands to guests.

CREATE TABLE security_groups (
    id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL REFERENCES projects(id),
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE UNIQUE INDEX security_groups_name ON security_groups(project_id, name);

-- Exactly one peer per rule: a CIDR or a source group (of the same project). Ports are NULL
-- for icmp and all; a group's rules go with it.
CREATE TABLE security_group_rules (
    id TEXT PRIMARY KEY,
    group_id TEXT NOT NULL REFERENCES security_groups(id) ON DELETE CASCADE,
    direction TEXT NOT NULL,
    protocol TEXT NOT NULL,
    from_port BIGINT,
    to_port BIGINT,
    cidr TEXT,
    source_group_id TEXT REFERENCES security_groups(id),
    description TEXT,
    -- Order within the group (rules of one request share a timestamp).
    seq BIGINT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX security_group_rules_group ON security_group_rules(group_id, seq);
CREATE INDEX security_group_rules_source ON security_group_rules(source_group_id) WHERE source_group_id IS NOT NULL;
-- The same rule twice is refused even when two writers race.
CREATE UNIQUE INDEX security_group_rules_same ON security_group_rules(
    group_id, direction, protocol, COALESCE(from_port, -1), COALESCE(to_port, -1),
    COALESCE(cidr, ''), COALESCE(source_group_id, ''));

-- Memberships of terminated instances go when their group is deleted.
CREATE TABLE instance_security_groups (
    instance_id TEXT NOT NULL REFERENCES instances(id),
    group_id TEXT NOT NULL REFERENCES security_groups(id) ON DELETE CASCADE,
    position BIGINT NOT NULL,
    PRIMARY KEY (instance_id, group_id)
);
CREATE INDEX instance_security_groups_group ON instance_security_groups(group_id);

CREATE TABLE key_pairs (
    id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL REFERENCES projects(id),
    name TEXT NOT NULL,
    key_type TEXT NOT NULL,
    public_key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE UNIQUE INDEX key_pairs_name ON key_pairs(project_id, name);

-- The key an instance was launched with, copied: deleting the key pair later does not change
-- what the guest's metadata says (as in EC2).
ALTER TABLE instances ADD COLUMN key_name TEXT;
ALTER TABLE instances ADD COLUMN public_key TEXT;
