-- Tenant networks per project and elastic IPs.
-- A network is isolated by a VXLAN VNI (unique across all networks, deleted ones included, so
-- never reused) or by a VLAN tag an administrator gives (unique among live networks: there are
-- only 4094). Deleted networks keep their row because terminated instances still name them.
ALTER TABLE networks ADD COLUMN isolation TEXT NOT NULL DEFAULT 'vxlan';
ALTER TABLE networks ADD COLUMN vni BIGINT;
ALTER TABLE networks ADD COLUMN vlan_tag BIGINT;
ALTER TABLE networks ADD COLUMN mtu BIGINT;
ALTER TABLE networks ADD COLUMN deleted_at TEXT;
-- Existing networks get VNIs 1, 2, ... in creation order (their MTU stays the host link's).
UPDATE networks SET vni = (
    SELECT COUNT(*) FROM networks o
    WHERE o.created_at < networks.created_at OR (o.created_at = networks.created_at AND o.id <= networks.id)
);
CREATE UNIQUE INDEX networks_vni ON networks(vni) WHERE vni IS NOT NULL;
CREATE UNIQUE INDEX networks_vlan_tag ON networks(vlan_tag) WHERE vlan_tag IS NOT NULL AND deleted_at IS NULL;
CREATE UNIQUE INDEX networks_name ON networks(project_id, name) WHERE deleted_at IS NULL;

-- The operator's public addresses (one pool): elastic IPs are first_ip..last_ip of cidr.
CREATE TABLE address_pool (
    id BIGINT PRIMARY KEY CHECK (id = 1),
    cidr TEXT NOT NULL,
    gateway TEXT NOT NULL,
    first_ip TEXT NOT NULL,
    last_ip TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

-- Elastic IPs. Released rows stay (ids are never reused); their address is free again.
CREATE TABLE addresses (
    id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL REFERENCES projects(id),
    public_ip TEXT NOT NULL,
    instance_id TEXT REFERENCES instances(id),
    association_id TEXT,
    associated_at TEXT,
    created_at TEXT NOT NULL,
    released_at TEXT
);
CREATE UNIQUE INDEX addresses_live_ip ON addresses(public_ip) WHERE released_at IS NULL;
-- One address per instance.
CREATE UNIQUE INDEX addresses_instance ON addresses(instance_id) WHERE instance_id IS NOT NULL;
CREATE UNIQUE INDEX addresses_association ON addresses(association_id) WHERE association_id IS NOT NULL;
CREATE INDEX addresses_project ON addresses(project_id, id) WHERE released_at IS NULL;
