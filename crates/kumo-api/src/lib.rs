//! kumo's native REST API under `/api/v1`. Handlers are thin: they translate HTTP into
//! controller operations. The OpenAPI document is generated from this code.

mod agent;
pub mod auth;
mod backups;
mod convert;
pub mod error;
mod images;
mod instances;
mod migrate;
mod misc;
mod networks;
mod placement;
mod security;
mod storage;
mod streams;

use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use kumo_controller::Controller;
use utoipa::OpenApi;

#[derive(Clone)]
pub struct AppState {
    pub ctl: Controller,
    /// The SigV4 region requests must be signed for.
    pub region: String,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "kumo", description = "kumo's native API. Every request is signed with AWS Signature Version 4 (service `kumo`). Errors are `{\"error\": {\"code\", \"message\", \"request_id\"}}`."),
    paths(
        instances::list, instances::create, instances::create_batch, instances::show, instances::update, instances::terminate,
        instances::start, instances::stop, instances::reboot, instances::console,
        images::list, images::show, images::import, images::upload, images::delete,
        misc::hosts, misc::host, misc::set_host_state, misc::join_tokens, misc::create_join_token, misc::revoke_join_token, placement::explain_placement, placement::capacity, placement::stats, placement::update_host, placement::list_groups, placement::create_group, placement::show_group, placement::delete_group, misc::instance_types, misc::operations, misc::operation, misc::events, misc::whoami,
        security::list_groups, security::create_group, security::show_group, security::delete_group, security::add_rule, security::delete_rule,
        security::set_instance_groups, security::list_keys, security::create_key, security::show_key, security::delete_key,
        networks::list_networks, networks::create_network, networks::show_network, networks::delete_network,
        networks::show_pool, networks::set_pool, networks::list_addresses, networks::allocate, networks::release, networks::associate, networks::disassociate,
        storage::list_pools, storage::show_pool, storage::update_pool, storage::list_volumes, storage::create_volume, storage::show_volume,
        storage::delete_volume, storage::attach_volume, storage::detach_volume, storage::resize_volume, storage::copy_volume,
        storage::list_snapshots, storage::create_snapshot, storage::show_snapshot, storage::delete_snapshot, storage::clone_instance,
        storage::export_volume, storage::export_snapshot, storage::image_from_snapshot, storage::download_export, images::download,
        backups::list, backups::create, backups::show, backups::delete, backups::verify, backups::restore,
        backups::list_schedules, backups::create_schedule, backups::delete_schedule,
        migrate::migrate, migrate::list, migrate::show, migrate::cancel, migrate::evacuate, migrate::return_host,
    ),
    components(schemas(images::ImageWithOperation,
        kumo_types::security::SecurityGroup, kumo_types::security::SecurityGroupRule, kumo_types::security::CreateSecurityGroup,
        kumo_types::security::CreateSecurityGroupRule, kumo_types::security::SetSecurityGroups, kumo_types::security::KeyPair, kumo_types::security::CreateKeyPair,
        kumo_types::networks::Network, kumo_types::networks::CreateNetwork, kumo_types::networks::AddressPool,
        kumo_types::networks::SetAddressPool, kumo_types::networks::Address, kumo_types::networks::AssociateAddress,
        storage::VolumeWithOperation, kumo_types::storage::StoragePool, kumo_types::storage::PoolHost, kumo_types::storage::UpdateStoragePool,
        kumo_types::storage::Volume, kumo_types::storage::CreateVolume, kumo_types::storage::AttachVolume, kumo_types::storage::ResizeVolume,
        kumo_types::storage::CopyVolume, kumo_types::storage::Snapshot, kumo_types::storage::CreateSnapshot, kumo_types::storage::CloneInstance,
        kumo_types::storage::CloneResult, kumo_types::storage::Backup, kumo_types::storage::CreateBackup,
        kumo_types::storage::BackupWithOperation, kumo_types::storage::RestoreBackup, kumo_types::storage::RestoreResult,
        kumo_types::storage::BackupSchedule, kumo_types::storage::CreateBackupSchedule,
        kumo_types::storage::ExportDisk, kumo_types::storage::ExportResult, storage::ImageFromSnapshot,
        kumo_types::migration::MigrateInstance, kumo_types::migration::Migration, kumo_types::migration::EvacuateHost,
        kumo_types::migration::Evacuation, kumo_types::migration::EvacuationItem, kumo_types::migration::ReturnHost)),
    tags((name = "instances"), (name = "images"), (name = "hosts"), (name = "placement-groups"), (name = "security-groups"), (name = "key-pairs"), (name = "networks"), (name = "addresses"), (name = "storage"), (name = "operations"), (name = "events"), (name = "auth"))
)]
pub struct ApiDoc;

/// The OpenAPI document, pretty-printed as committed in `openapi/kumo.json`.
pub fn openapi_json() -> String {
    ApiDoc::openapi().to_pretty_json().unwrap_or_default()
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route(
            "/api/v1/instances",
            get(instances::list).post(instances::create),
        )
        .route(
            "/api/v1/instances/{id}",
            get(instances::show)
                .patch(instances::update)
                .delete(instances::terminate),
        )
        .route("/api/v1/instances/{id}/start", post(instances::start))
        .route("/api/v1/instances/{id}/stop", post(instances::stop))
        .route("/api/v1/instances/{id}/reboot", post(instances::reboot))
        .route("/api/v1/instances/{id}/console", get(instances::console))
        .route("/api/v1/instances/{id}/serial", get(streams::serial))
        .route("/api/v1/instances/{id}/tcp/{port}", get(streams::tcp))
        .route("/api/v1/images", get(images::list).post(images::import))
        .route("/api/v1/images/upload", put(images::upload))
        .route(
            "/api/v1/images/{id}",
            get(images::show).delete(images::delete),
        )
        .route("/api/v1/hosts", get(misc::hosts))
        .route(
            "/api/v1/hosts/{id}",
            get(misc::host).patch(placement::update_host),
        )
        .route("/api/v1/instance-batches", post(instances::create_batch))
        .route(
            "/api/v1/placement-groups",
            get(placement::list_groups).post(placement::create_group),
        )
        .route(
            "/api/v1/placement-groups/{id}",
            get(placement::show_group).delete(placement::delete_group),
        )
        .route("/api/v1/placement/stats", get(placement::stats))
        .route("/api/v1/hosts/{id}/state", post(misc::set_host_state))
        .route(
            "/api/v1/join-tokens",
            get(misc::join_tokens).post(misc::create_join_token),
        )
        .route(
            "/api/v1/join-tokens/{token}",
            delete(misc::revoke_join_token),
        )
        .route(
            "/api/v1/placement/explain",
            get(placement::explain_placement),
        )
        .route("/api/v1/capacity", get(placement::capacity))
        .route(
            "/api/v1/networks",
            get(networks::list_networks).post(networks::create_network),
        )
        .route(
            "/api/v1/networks/{id}",
            get(networks::show_network).delete(networks::delete_network),
        )
        .route(
            "/api/v1/address-pool",
            get(networks::show_pool).put(networks::set_pool),
        )
        .route(
            "/api/v1/addresses",
            get(networks::list_addresses).post(networks::allocate),
        )
        .route("/api/v1/addresses/{id}", delete(networks::release))
        .route(
            "/api/v1/addresses/{id}/associate",
            post(networks::associate),
        )
        .route(
            "/api/v1/addresses/{id}/disassociate",
            post(networks::disassociate),
        )
        .route("/api/v1/instance-types", get(misc::instance_types))
        .route("/api/v1/operations", get(misc::operations))
        .route("/api/v1/operations/{id}", get(misc::operation))
        .route("/api/v1/events", get(misc::events))
        .route("/api/v1/whoami", get(misc::whoami))
        .route(
            "/api/v1/security-groups",
            get(security::list_groups).post(security::create_group),
        )
        .route(
            "/api/v1/security-groups/{id}",
            get(security::show_group).delete(security::delete_group),
        )
        .route(
            "/api/v1/security-groups/{id}/rules",
            post(security::add_rule),
        )
        .route(
            "/api/v1/security-groups/{id}/rules/{rule_id}",
            delete(security::delete_rule),
        )
        .route(
            "/api/v1/instances/{id}/security-groups",
            put(security::set_instance_groups),
        )
        .route(
            "/api/v1/key-pairs",
            get(security::list_keys).post(security::create_key),
        )
        .route(
            "/api/v1/key-pairs/{name}",
            get(security::show_key).delete(security::delete_key),
        )
        .route("/api/v1/storage-pools", get(storage::list_pools))
        .route(
            "/api/v1/storage-pools/{name}",
            get(storage::show_pool).patch(storage::update_pool),
        )
        .route(
            "/api/v1/volumes",
            get(storage::list_volumes).post(storage::create_volume),
        )
        .route(
            "/api/v1/volumes/{id}",
            get(storage::show_volume).delete(storage::delete_volume),
        )
        .route("/api/v1/volumes/{id}/attach", post(storage::attach_volume))
        .route("/api/v1/volumes/{id}/detach", post(storage::detach_volume))
        .route("/api/v1/volumes/{id}/resize", post(storage::resize_volume))
        .route("/api/v1/volumes/{id}/copy", post(storage::copy_volume))
        .route(
            "/api/v1/snapshots",
            get(storage::list_snapshots).post(storage::create_snapshot),
        )
        .route(
            "/api/v1/snapshots/{id}",
            get(storage::show_snapshot).delete(storage::delete_snapshot),
        )
        .route(
            "/api/v1/instances/{id}/clone",
            post(storage::clone_instance),
        )
        .route("/api/v1/backups", get(backups::list).post(backups::create))
        .route(
            "/api/v1/backups/{id}",
            get(backups::show).delete(backups::delete),
        )
        .route("/api/v1/volumes/{id}/export", post(storage::export_volume))
        .route(
            "/api/v1/snapshots/{id}/export",
            post(storage::export_snapshot),
        )
        .route(
            "/api/v1/snapshots/{id}/image",
            post(storage::image_from_snapshot),
        )
        .route("/api/v1/exports/{file}", get(storage::download_export))
        .route("/api/v1/images/{id}/file", get(images::download))
        .route("/api/v1/instances/{id}/migrate", post(migrate::migrate))
        .route("/api/v1/migrations", get(migrate::list))
        .route("/api/v1/migrations/{id}", get(migrate::show))
        .route("/api/v1/migrations/{id}/cancel", post(migrate::cancel))
        .route("/api/v1/hosts/{id}/evacuate", post(migrate::evacuate))
        .route("/api/v1/hosts/{id}/return", post(migrate::return_host))
        .route("/api/v1/backups/{id}/verify", post(backups::verify))
        .route("/api/v1/backups/{id}/restore", post(backups::restore))
        .route(
            "/api/v1/backup-schedules",
            get(backups::list_schedules).post(backups::create_schedule),
        )
        .route(
            "/api/v1/backup-schedules/{id}",
            delete(backups::delete_schedule),
        )
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/agent/register", post(agent::register))
        .route("/api/v1/agent/heartbeat", post(agent::heartbeat))
        .route("/api/v1/agent/network-policy", get(agent::network_policy))
        .route("/api/v1/agent/images/{id}", get(agent::image_content))
        .route("/healthz", get(|| async { "ok" }))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::pipeline,
        ));
    let ec2 = kumo_ec2::router(kumo_ec2::Ec2State {
        ctl: state.ctl.clone(),
        region: state.region.clone(),
    });
    api.fallback(not_found).with_state(state).merge(ec2)
}

/// Unknown paths get the same error shape and request id as every other error.
async fn not_found() -> axum::response::Response {
    use axum::response::IntoResponse;
    let id = kumo_types::new_id(kumo_types::IdKind::Request);
    let mut resp = error::REQUEST_ID
        .scope(id.clone(), async {
            error::ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "NotFound",
                "no such API path",
            )
            .into_response()
        })
        .await;
    if let Ok(v) = axum::http::HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}
