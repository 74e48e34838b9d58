-- An imported machine keeps its identity: its SMBIOS UUID and its NIC's MAC. Neither may be
-- shared by two live instances (seed 003: a P2V'd machine boots once the hypervisor has
-- checked that its UUID and MAC are not duplicated).
ALTER TABLE instances ADD COLUMN smbios_uuid TEXT;
CREATE UNIQUE INDEX instances_live_uuid ON instances(smbios_uuid)
    WHERE smbios_uuid IS NOT NULL AND state <> 'terminated';
-- (MACs of live instances are unique since 0001.)
