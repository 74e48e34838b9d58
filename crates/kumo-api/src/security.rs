//! REST endpoints for security groups and key pairs.

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use kumo_store::{KeyPairRow, NewSgRule, SecurityGroupRow, SgRuleRow};
use kumo_types::api::{ErrorBody, Instance, Page};
use kumo_types::security::{
    CreateKeyPair, CreateSecurityGroup, CreateSecurityGroupRule, KeyPair, SecurityGroup,
    SecurityGroupRule, SetSecurityGroups,
};

use crate::auth::Caller;
use crate::error::{ApiError, ApiJson, ApiPath};
use crate::{convert, AppState};

fn rule(r: SgRuleRow) -> SecurityGroupRule {
    SecurityGroupRule {
        id: r.id,
        direction: r.direction,
        protocol: r.protocol,
        from_port: r.from_port.and_then(|p| u16::try_from(p).ok()),
        to_port: r.to_port.and_then(|p| u16::try_from(p).ok()),
        cidr: r.cidr,
        source_group: r.source_group_id,
        description: r.description,
    }
}

/// Groups with their rules, read in one query.
async fn with_rules(
    st: &AppState,
    groups: Vec<SecurityGroupRow>,
) -> Result<Vec<SecurityGroup>, ApiError> {
    let ids: Vec<String> = groups.iter().map(|g| g.id.clone()).collect();
    let mut rules = st.ctl.security_group_rules(&ids).await?;
    Ok(groups
        .into_iter()
        .map(|g| {
            let (mine, rest): (Vec<SgRuleRow>, Vec<SgRuleRow>) =
                rules.drain(..).partition(|r| r.group_id == g.id);
            rules = rest;
            SecurityGroup {
                id: g.id,
                name: g.name,
                project_id: g.project_id,
                description: g.description,
                rules: mine.into_iter().map(rule).collect(),
                created_at: g.created_at,
            }
        })
        .collect())
}

async fn one_group(st: &AppState, g: SecurityGroupRow) -> Result<SecurityGroup, ApiError> {
    with_rules(st, vec![g])
        .await?
        .pop()
        .ok_or_else(|| ApiError::from(kumo_controller::OpError::Internal("group vanished".into())))
}

fn key_pair(k: KeyPairRow, private_key: Option<String>) -> KeyPair {
    KeyPair {
        id: k.id,
        name: k.name,
        project_id: k.project_id,
        key_type: k.key_type,
        fingerprint: k.fingerprint,
        public_key: k.public_key,
        private_key,
        created_at: k.created_at,
    }
}

#[utoipa::path(get, path = "/api/v1/security-groups", tag = "security-groups",
    responses((status = 200, body = Page<SecurityGroup>, description = "the project's groups with their rules, `default` included")))]
pub async fn list_groups(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
) -> Result<Json<Page<SecurityGroup>>, ApiError> {
    let groups = st.ctl.security_groups(&c.scope()).await?;
    Ok(Json(Page {
        items: with_rules(&st, groups).await?,
        next_cursor: None,
    }))
}

#[utoipa::path(post, path = "/api/v1/security-groups", tag = "security-groups", request_body = CreateSecurityGroup,
    responses((status = 201, body = SecurityGroup), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody, description = "the name is taken")))]
pub async fn create_group(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiJson(req): ApiJson<CreateSecurityGroup>,
) -> Result<(StatusCode, Json<SecurityGroup>), ApiError> {
    let g = st
        .ctl
        .create_security_group(
            &c.scope(),
            &req.name,
            req.description.as_deref().unwrap_or(""),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(one_group(&st, g).await?)))
}

#[utoipa::path(get, path = "/api/v1/security-groups/{id}", tag = "security-groups", params(("id" = String, Path, description = "Group id or name")),
    responses((status = 200, body = SecurityGroup), (status = 404, body = ErrorBody)))]
pub async fn show_group(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<SecurityGroup>, ApiError> {
    let g = st.ctl.security_group(&c.scope(), &id).await?;
    Ok(Json(one_group(&st, g).await?))
}

#[utoipa::path(delete, path = "/api/v1/security-groups/{id}", tag = "security-groups", params(("id" = String, Path, description = "Group id or name")),
    responses((status = 204, description = "deleted"), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "the default group, a group of live instances, or a source of another group's rules")))]
pub async fn delete_group(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    st.ctl.delete_security_group(&c.scope(), &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/security-groups/{id}/rules", tag = "security-groups", request_body = CreateSecurityGroupRule,
    params(("id" = String, Path, description = "Group id or name")),
    responses((status = 201, body = SecurityGroupRule), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "the group already has this rule")))]
pub async fn add_rule(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<CreateSecurityGroupRule>,
) -> Result<(StatusCode, Json<SecurityGroupRule>), ApiError> {
    let new = NewSgRule {
        direction: req.direction.unwrap_or_else(|| "ingress".into()),
        protocol: req.protocol,
        from_port: req.from_port,
        to_port: req.to_port,
        cidr: req.cidr,
        source_group: req.source_group,
        description: req.description,
    };
    let mut added = st
        .ctl
        .add_security_group_rules(&c.scope(), &id, std::slice::from_ref(&new))
        .await?;
    let r = added.pop().ok_or_else(|| {
        ApiError::from(kumo_controller::OpError::Internal("no rule added".into()))
    })?;
    Ok((StatusCode::CREATED, Json(rule(r))))
}

#[utoipa::path(delete, path = "/api/v1/security-groups/{id}/rules/{rule_id}", tag = "security-groups",
    params(("id" = String, Path, description = "Group id or name"), ("rule_id" = String, Path)),
    responses((status = 204, description = "revoked"), (status = 404, body = ErrorBody)))]
pub async fn delete_rule(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath((id, rule_id)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    st.ctl
        .revoke_security_group_rules(&c.scope(), &id, &[rule_id], &[])
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(put, path = "/api/v1/instances/{id}/security-groups", tag = "instances", request_body = SetSecurityGroups,
    params(("id" = String, Path, description = "Instance id or name")),
    responses((status = 200, body = Instance), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "the instance is terminated")))]
pub async fn set_instance_groups(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<SetSecurityGroups>,
) -> Result<Json<Instance>, ApiError> {
    let row = st
        .ctl
        .set_instance_security_groups(&c.scope(), &id, &req.groups)
        .await?;
    Ok(Json(convert::instance(row)))
}

#[utoipa::path(get, path = "/api/v1/key-pairs", tag = "key-pairs", responses((status = 200, body = Page<KeyPair>)))]
pub async fn list_keys(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
) -> Result<Json<Page<KeyPair>>, ApiError> {
    let keys = st.ctl.key_pairs(&c.scope()).await?;
    Ok(Json(Page {
        items: keys.into_iter().map(|k| key_pair(k, None)).collect(),
        next_cursor: None,
    }))
}

#[utoipa::path(post, path = "/api/v1/key-pairs", tag = "key-pairs", request_body = CreateKeyPair,
    responses((status = 201, body = KeyPair, description = "with `private_key` when the key was generated: it is shown this once"),
        (status = 400, body = ErrorBody), (status = 409, body = ErrorBody, description = "the name is taken")))]
pub async fn create_key(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiJson(req): ApiJson<CreateKeyPair>,
) -> Result<(StatusCode, Json<KeyPair>), ApiError> {
    let scope = c.scope();
    let k = match &req.public_key {
        Some(pk) => {
            if req.key_type.is_some() {
                return Err(ApiError::invalid(
                    "key_type is for generated keys; an imported key has its own type",
                ));
            }
            key_pair(st.ctl.import_key_pair(&scope, &req.name, pk).await?, None)
        }
        None => {
            let (row, private) = st
                .ctl
                .create_key_pair(&scope, &req.name, req.key_type.as_deref())
                .await?;
            key_pair(row, Some(private))
        }
    };
    Ok((StatusCode::CREATED, Json(k)))
}

#[utoipa::path(get, path = "/api/v1/key-pairs/{name}", tag = "key-pairs", params(("name" = String, Path, description = "Key pair name or id")),
    responses((status = 200, body = KeyPair), (status = 404, body = ErrorBody)))]
pub async fn show_key(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<KeyPair>, ApiError> {
    Ok(Json(key_pair(
        st.ctl.key_pair(&c.scope(), &name).await?,
        None,
    )))
}

#[utoipa::path(delete, path = "/api/v1/key-pairs/{name}", tag = "key-pairs", params(("name" = String, Path, description = "Key pair name or id")),
    responses((status = 204, description = "deleted; instances launched with it keep the key"), (status = 404, body = ErrorBody)))]
pub async fn delete_key(
    State(st): State<AppState>,
    Extension(c): Extension<Caller>,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    st.ctl.delete_key_pair(&c.scope(), &name).await?;
    Ok(StatusCode::NO_CONTENT)
}
