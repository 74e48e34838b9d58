-- The address other hosts send this host's VXLAN traffic to ('' = none).
ALTER TABLE hosts ADD COLUMN tunnel_ip TEXT NOT NULL DEFAULT '';
