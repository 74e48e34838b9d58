//! Store rows to API models.

use kumo_store::{EventRow, HostRow, HostUsage, ImageRow, InstanceRow, OperationRow};
use kumo_types::api::{Event, Host, Image, Instance, Operation};

pub fn instance(r: InstanceRow) -> Instance {
    Instance {
        id: r.id,
        name: r.name,
        project_id: r.project_id,
        image_id: r.image_id,
        instance_type: r.instance_type,
        vcpus: r.vcpus,
        memory_mib: r.memory_mib,
        disk_gib: r.disk_gib,
        state: r.state,
        desired: r.desired,
        host_id: r.host_id,
        private_ip: Some(r.private_ip),
        public_ip: r.public_ip,
        ipv6: r.ipv6,
        mac: Some(r.mac),
        generation: r.generation,
        last_error: r.last_error,
        created_at: r.created_at,
        updated_at: r.updated_at,
        terminated_at: r.terminated_at,
        placement_group_id: r.placement_group_id,
        requested_site: r.requested_site,
        constraints: r.constraints,
        security_groups: r.security_group_ids,
        key_name: r.key_name,
        ha: r.ha,
        ha_priority: r.ha_priority,
    }
}

pub fn placement_group(r: kumo_store::PlacementGroupRow) -> kumo_types::api::PlacementGroup {
    kumo_types::api::PlacementGroup {
        id: r.id,
        name: r.name,
        project_id: r.project_id,
        strategy: r.strategy,
        max_per_host: r.max_per_host,
        spread_storage: r.spread_storage,
        members: r.members,
        created_at: r.created_at,
    }
}

pub fn image(r: ImageRow) -> Image {
    Image {
        id: r.id,
        name: r.name,
        kind: r.kind,
        state: r.state,
        public: r.public,
        source_format: r.source_format,
        virtual_size: r.virtual_size,
        file_size: r.file_size,
        sha256: r.sha256,
        kernel_id: r.kernel_id,
        ramdisk_id: r.ramdisk_id,
        cmdline: r.cmdline,
        error: r.error,
        created_at: r.created_at,
    }
}

pub fn host(r: HostRow, u: Option<&HostUsage>) -> Host {
    let u = u.cloned().unwrap_or_default();
    Host {
        id: r.id,
        name: r.name,
        site: r.site,
        state: r.state,
        address: r.address,
        vcpus: r.vcpus,
        memory_mib: r.memory_mib,
        hypervisor: r.hypervisor,
        accel: r.accel,
        qemu_version: r.qemu_version,
        used_vcpus: u.vcpus,
        used_memory_mib: u.memory_mib,
        instances: u.instances,
        last_heartbeat: r.last_heartbeat,
        labels: r.labels,
        storage_pool: r.storage_pool,
        disk_gib: r.disk_gib,
        used_disk_gib: u.disk_gib,
        cpu_overcommit: r.cpu_overcommit,
        memory_overcommit: r.memory_overcommit,
        reserved_memory_mib: r.reserved_memory_mib,
        created_at: r.created_at,
        // Filled from the controller's latest heartbeat reports where that matters.
        path: None,
    }
}

pub fn operation(r: OperationRow) -> Operation {
    Operation {
        id: r.id,
        kind: r.kind,
        target_id: r.target_id,
        state: r.state,
        progress: r.progress,
        error: r.error,
        created_at: r.created_at,
        updated_at: r.updated_at,
    }
}

pub fn event(r: EventRow) -> Event {
    Event {
        id: r.id,
        time: r.time,
        project_id: r.project_id,
        user_id: r.user_id,
        action: r.action,
        target: r.target,
        result: r.result,
        request_id: r.request_id,
        detail: r.detail,
    }
}
