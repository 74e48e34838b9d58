//! REST endpoints for networks, the address pool and elastic IPs.

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use kumo_store::{AddressPoolRow, AddressPoolUsage, AddressRow, NetworkView, NewNetwork};
use kumo_types::api::{ErrorBody, Page};
use kumo_types::networks::{
    Address, AddressPool, AssociateAddress, CreateNetwork, Network, SetAddressPool,
};

use crate::auth::Caller;
use crate::error::{ApiError, ApiJson, ApiPath};
use crate::AppState;

fn forbidden(what: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "Forbidden",
        format!("only administrators can {what}"),
    )
}

fn network(v: NetworkView) -> Network {
    let n = v.network;
    Network {
        is_default: n.name == "default",
        id: n.id,
        name: n.name,
        project_id: n.project_id,
        cidr: n.cidr,
        gateway: n.gateway,
        ipv6_cidr: n.ipv6_cidr,
        isolation: n.isolation,
        vni: n.vni.and_then(|x| u32::try_from(x).ok()),
        vlan_tag: n.vlan_tag.and_then(|x| u32::try_from(x).ok()),
        mtu: n.mtu.and_then(|x| u32::try_from(x).ok()),
        instances: v.instances,
        created_at: v.created_at,
    }
}

fn pool(u: AddressPoolUsage) -> AddressPool {
    AddressPool {
        cidr: u.pool.cidr,
        gateway: u.pool.gateway,
        first: u.pool.first,
        last: u.pool.last,
        size: u.size,
        used: u.used,
        free: u.size.saturating_sub(u.used),
    }
}

fn address(a: AddressRow) -> Address {
    Address {
        id: a.id,
        public_ip: a.public_ip,
        project_id: a.project_id,
        instance_id: a.instance_id,
        association_id: a.association_id,
        private_ip: a.private_ip,
        created_at: a.created_at,
    }
}

#[utoipa::path(get, path = "/api/v1/networks", tag = "networks",
    responses((status = 200, body = Page<Network>, description = "the project's networks (administrators: every project's)")))]
pub async fn list_networks(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
) -> Result<Json<Page<Network>>, ApiError> {
    let rows = st.ctl.networks(&c.scope()).await?;
    Ok(Json(Page {
        items: rows.into_iter().map(network).collect(),
        next_cursor: None,
    }))
}

#[utoipa::path(post, path = "/api/v1/networks", tag = "networks", request_body = CreateNetwork,
    responses((status = 201, body = Network), (status = 400, body = ErrorBody, description = "bad name, CIDR, IPv6 prefix or isolation"),
        (status = 403, body = ErrorBody, description = "vlan networks are for administrators"),
        (status = 409, body = ErrorBody, description = "the name is taken, the CIDR (or IPv6 prefix) overlaps another network of the project, or the VLAN tag is used")))]
pub async fn create_network(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiJson(req): ApiJson<CreateNetwork>,
) -> Result<(StatusCode, Json<Network>), ApiError> {
    let scope = c.scope();
    if !scope.admin && (req.vlan_tag.is_some() || req.isolation.as_deref() == Some("vlan")) {
        return Err(forbidden("create vlan networks"));
    }
    let new = NewNetwork {
        name: req.name,
        cidr: req.cidr,
        isolation: req.isolation,
        vlan_tag: req.vlan_tag.map(i64::from),
        ipv6: req.ipv6,
        ipv6_cidr: req.ipv6_cidr,
    };
    let v = st.ctl.create_network(&scope, &new).await?;
    Ok((StatusCode::CREATED, Json(network(v))))
}

#[utoipa::path(get, path = "/api/v1/networks/{id}", tag = "networks", params(("id" = String, Path, description = "Network id or name")),
    responses((status = 200, body = Network), (status = 404, body = ErrorBody)))]
pub async fn show_network(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Network>, ApiError> {
    Ok(Json(network(st.ctl.network(&c.scope(), &id).await?)))
}

#[utoipa::path(delete, path = "/api/v1/networks/{id}", tag = "networks", params(("id" = String, Path, description = "Network id or name")),
    responses((status = 204, description = "deleted"), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "live instances still use the network")))]
pub async fn delete_network(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    st.ctl.delete_network(&c.scope(), &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/address-pool", tag = "addresses",
    responses((status = 200, body = AddressPool), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody, description = "no pool is defined")))]
pub async fn show_pool(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
) -> Result<Json<AddressPool>, ApiError> {
    if !c.scope().admin {
        return Err(forbidden("see the public address pool"));
    }
    match st.ctl.address_pool().await? {
        Some(u) => Ok(Json(pool(u))),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NotFound",
            "no public address pool is defined; set one with `kumo address-pool set`",
        )),
    }
}

#[utoipa::path(put, path = "/api/v1/address-pool", tag = "addresses", request_body = SetAddressPool,
    responses((status = 200, body = AddressPool), (status = 400, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "allocated addresses would fall outside the new range")))]
pub async fn set_pool(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiJson(req): ApiJson<SetAddressPool>,
) -> Result<Json<AddressPool>, ApiError> {
    if !c.scope().admin {
        return Err(forbidden("set the public address pool"));
    }
    let u = st
        .ctl
        .set_address_pool(&AddressPoolRow {
            cidr: req.cidr,
            gateway: req.gateway,
            first: req.first,
            last: req.last,
        })
        .await?;
    Ok(Json(pool(u)))
}

#[utoipa::path(get, path = "/api/v1/addresses", tag = "addresses",
    responses((status = 200, body = Page<Address>, description = "the project's elastic IPs (administrators: every project's)")))]
pub async fn list_addresses(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
) -> Result<Json<Page<Address>>, ApiError> {
    let rows = st.ctl.addresses(&c.scope()).await?;
    Ok(Json(Page {
        items: rows.into_iter().map(address).collect(),
        next_cursor: None,
    }))
}

#[utoipa::path(post, path = "/api/v1/addresses", tag = "addresses",
    params(("Idempotency-Key" = Option<String>, Header, description = "Replays the first response for the same key")),
    responses((status = 201, body = Address, description = "the pool's lowest free address"),
        (status = 409, body = ErrorBody, description = "no pool is defined or it has no free address")))]
pub async fn allocate(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
) -> Result<(StatusCode, Json<Address>), ApiError> {
    let a = st.ctl.allocate_address(&c.scope()).await?;
    Ok((StatusCode::CREATED, Json(address(a))))
}

#[utoipa::path(delete, path = "/api/v1/addresses/{id}", tag = "addresses", params(("id" = String, Path, description = "Allocation id or public IP")),
    responses((status = 204, description = "released"), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "the address is associated; disassociate it first")))]
pub async fn release(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    st.ctl.release_address(&c.scope(), &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/addresses/{id}/associate", tag = "addresses", request_body = AssociateAddress,
    params(("id" = String, Path, description = "Allocation id or public IP")),
    responses((status = 200, body = Address), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody, description = "no such address or instance in the project"),
        (status = 409, body = ErrorBody, description = "associated with another instance (allow_reassociation moves it), or the instance is terminated")))]
pub async fn associate(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<AssociateAddress>,
) -> Result<Json<Address>, ApiError> {
    let a = st
        .ctl
        .associate_address(&c.scope(), &id, &req.instance_id, req.allow_reassociation)
        .await?;
    Ok(Json(address(a)))
}

#[utoipa::path(post, path = "/api/v1/addresses/{id}/disassociate", tag = "addresses",
    params(("id" = String, Path, description = "Allocation id or public IP")),
    responses((status = 200, body = Address), (status = 404, body = ErrorBody)))]
pub async fn disassociate(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Address>, ApiError> {
    let a = st.ctl.disassociate_address(&c.scope(), &id).await?;
    Ok(Json(address(a)))
}
