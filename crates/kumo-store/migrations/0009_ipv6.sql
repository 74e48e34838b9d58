-- Dual-stack tenant networks: an optional IPv6 /64 per network (guests use SLAAC, so each
-- instance's address is derived from the prefix and its MAC and is not stored).
ALTER TABLE networks ADD COLUMN ipv6_cidr TEXT;
-- Existing default groups allow all outbound IPv6 as well, like new ones (and EC2's).
INSERT INTO security_group_rules (id, group_id, direction, protocol, cidr, seq, created_at)
SELECT 'sgr-' || substr(lower(hex(randomblob(9))), 1, 17), g.id, 'egress', 'all', '::/0',
       (SELECT COUNT(*) FROM security_group_rules r WHERE r.group_id = g.id), g.created_at
FROM security_groups g
WHERE g.name = 'default'
  AND EXISTS (SELECT 1 FROM security_group_rules r WHERE r.group_id = g.id AND r.direction = 'egress'
              AND r.protocol = 'all' AND r.cidr = '0.0.0.0/0')
  AND NOT EXISTS (SELECT 1 FROM security_group_rules r WHERE r.group_id = g.id AND r.direction = 'egress'
              AND r.protocol = 'all' AND r.cidr = '::/0');
