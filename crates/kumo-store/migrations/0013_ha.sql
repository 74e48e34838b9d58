-- HA: per-instance failover settings and the leases the controller grants hosts.
ALTER TABLE instances ADD COLUMN ha BIGINT NOT NULL DEFAULT 0;
ALTER TABLE instances ADD COLUMN ha_priority BIGINT NOT NULL DEFAULT 500;

-- The latest lease granted for an instance: the host may run it until `expires_at` (controller
-- clock, counted from when the heartbeat or PUT carrying the grant was received or answered,
-- never from the host's clock). Failover waits until this has provably passed.
CREATE TABLE leases (
    instance_id TEXT PRIMARY KEY,
    host_id TEXT NOT NULL,
    expires_at TEXT NOT NULL
);
CREATE INDEX leases_host ON leases(host_id, expires_at);
