-- Indexes for the hot paths measured at 10,000 instances (bench/issue7.py):
-- the live-name check on every create,
CREATE INDEX instances_project_name ON instances(project_id, name) WHERE state <> 'terminated';
-- the reconciler's "not yet applied" query on every wake,
CREATE INDEX instances_to_push ON instances(updated_at) WHERE state <> 'terminated' AND generation > observed_generation;
-- and the per-host usage sum, answered from the index alone.
CREATE INDEX instances_usage ON instances(host_id, state, vcpus, memory_mib);
