//! Instance actions, each over the controller's instance operations.

use std::collections::HashSet;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use kumo_store::{IdempotentResponse, InstanceRow, LaunchExtras, Scope, StoreError};
use kumo_types::api::CreateInstance;
use kumo_types::id::{is_id, IdKind};
use kumo_types::InstanceState;
use rand::Rng;
use sha2::{Digest, Sha256};

use crate::error::{not_found, Ec2Error};
use crate::filter::{check_names, matches_all, tag_values};
use crate::params::{check_tag, Params};
use crate::render::{self, private_dns, reservation_id, Lookups};
use crate::security;
use crate::xml::{ts, Xml};
use crate::{page, Ctx, MAX_INSTANCES};

/// Largest user data, decoded (EC2's limit).
const MAX_USER_DATA: usize = 16 * 1024;

const INSTANCE_FILTERS: &[&str] = &[
    "instance-id",
    "image-id",
    "instance-type",
    "instance-state-name",
    "instance-state-code",
    "private-ip-address",
    "private-dns-name",
    "reservation-id",
    "availability-zone",
    "ami-launch-index",
    "kernel-id",
    "ramdisk-id",
    "client-token",
    "architecture",
    "root-device-type",
    "root-device-name",
    "virtualization-type",
    "hypervisor",
    "owner-id",
    "vpc-id",
    "subnet-id",
    "ip-address",
    "network-interface.mac-address",
    "launch-time",
    "monitoring-state",
    "tenancy",
    "dns-name",
];

const STATUS_FILTERS: &[&str] = &[
    "availability-zone",
    "instance-state-name",
    "instance-state-code",
    "instance-status.status",
    "instance-status.reachability",
    "system-status.status",
    "system-status.reachability",
];

fn instance_values(i: &InstanceRow, l: &Lookups, region: &str, name: &str) -> Vec<String> {
    if let Some(v) = tag_values(name, l.tags_of(&i.id)) {
        return v;
    }
    let one = |s: &str| vec![s.to_string()];
    match name {
        "instance-id" => one(&i.id),
        "image-id" => one(&i.image_id),
        "instance-type" => one(&i.instance_type),
        "instance-state-name" => one(i.state.as_str()),
        "instance-state-code" => one(&i.state.code().to_string()),
        "private-ip-address" => one(&i.private_ip),
        "private-dns-name" => one(&private_dns(i, region)),
        "reservation-id" => one(&reservation_id(i)),
        "availability-zone" => one(&l.zone(i)),
        "ami-launch-index" => one(&i.launch_index.to_string()),
        "kernel-id" => l.kernel(i).into_iter().collect(),
        "ramdisk-id" => l.ramdisk(i).into_iter().collect(),
        "client-token" => i.client_token.clone().into_iter().collect(),
        "architecture" => one("x86_64"),
        "root-device-type" => one("ebs"),
        "root-device-name" => one(render::ROOT_DEVICE),
        "virtualization-type" => one("hvm"),
        "hypervisor" => one("kvm"),
        "owner-id" => one(&i.project_id),
        "vpc-id" | "subnet-id" => one(&i.network_id),
        "ip-address" => i.public_ip.clone().into_iter().collect(),
        "network-interface.mac-address" => one(&i.mac),
        "launch-time" => one(&ts(i.created_at)),
        "monitoring-state" => one("disabled"),
        "tenancy" => one("default"),
        "dns-name" => one(""),
        _ => vec![],
    }
}

fn check_instance_ids(ids: &[String]) -> Result<(), Ec2Error> {
    match ids.iter().find(|id| !is_id(IdKind::Instance, id)) {
        Some(bad) => Err(Ec2Error::InstanceMalformed(format!(
            "Invalid id: \"{bad}\" (expecting \"i-...\")"
        ))),
        None => Ok(()),
    }
}

fn missing_instances(ids: &[String]) -> Ec2Error {
    if ids.len() == 1 {
        not_found("instance", &ids[0])
    } else {
        Ec2Error::InstanceNotFound(format!(
            "The instance IDs '{}' do not exist",
            ids.join(", ")
        ))
    }
}

fn visible(i: &InstanceRow, cutoff: chrono::DateTime<chrono::Utc>) -> bool {
    i.state != InstanceState::Terminated || i.terminated_at.is_none_or(|t| t >= cutoff)
}

/// The named instances of the caller (well-formed ids, existing, visible), in the given order.
async fn resolve(ctx: &Ctx<'_>, ids: &[String]) -> Result<Vec<InstanceRow>, Ec2Error> {
    check_instance_ids(ids)?;
    let cutoff = ctx.cutoff();
    let mut rows = Vec::new();
    let mut missing = Vec::new();
    let mut seen = HashSet::new();
    for id in ids {
        if !seen.insert(id.clone()) {
            continue;
        }
        match ctx.ctl.store.instance_by_id(&ctx.scope, id).await {
            Ok(r) if visible(&r, cutoff) => rows.push(r),
            Ok(_) | Err(StoreError::NotFound { .. }) => missing.push(id.clone()),
            Err(e) => return Err(e.into()),
        }
    }
    if !missing.is_empty() {
        return Err(missing_instances(&missing));
    }
    Ok(rows)
}

fn required_ids(p: &mut Params) -> Result<Vec<String>, Ec2Error> {
    let ids = p.list("InstanceId")?;
    if ids.is_empty() {
        return Err(Ec2Error::MissingParameter(
            "The request must contain the parameter InstanceId".into(),
        ));
    }
    Ok(ids)
}

/// Sites, images and tags for rendering `rows`.
pub(crate) async fn lookups(ctx: &Ctx<'_>, rows: &[InstanceRow]) -> Result<Lookups, Ec2Error> {
    let mut l = Lookups::default();
    {
        let p = ctx.ctl.store.placement().await?;
        for host in rows.iter().filter_map(|r| r.host_id.as_deref()) {
            if let Some(h) = p.host(host) {
                l.sites.insert(h.id.clone(), h.site.clone());
            }
        }
    }
    let mut sgs: Vec<String> = rows
        .iter()
        .flat_map(|r| r.security_group_ids.iter().cloned())
        .collect();
    sgs.sort();
    sgs.dedup();
    l.security_groups = security::group_names(ctx, &sgs).await?;
    if rows.iter().any(|r| r.placement_group_id.is_some()) {
        for g in ctx.ctl.store.placement_groups(&Scope::system()).await? {
            l.groups.insert(g.id, g.name);
        }
    }
    for i in rows {
        if !l.images.contains_key(&i.image_id) {
            if let Ok(img) = ctx.ctl.store.image_unscoped(&i.image_id).await {
                l.images.insert(i.image_id.clone(), img);
            }
        }
    }
    let wanted: HashSet<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    for t in ctx.ctl.store.tags(&ctx.scope, ctx.cutoff()).await? {
        if wanted.contains(t.resource_id.as_str()) {
            l.tags
                .entry(t.resource_id)
                .or_default()
                .push((t.key, t.value));
        }
    }
    Ok(l)
}

fn no_max_with_ids(max: Option<i64>, ids: &[String]) -> Result<(), Ec2Error> {
    if max.is_some() && !ids.is_empty() {
        return Err(Ec2Error::InvalidParameterCombination(
            "The parameter instancesSet cannot be used with the parameter maxResults".into(),
        ));
    }
    Ok(())
}

pub async fn describe(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let ids = p.list("InstanceId")?;
    let filters = p.filters()?;
    let max = p.int_in("MaxResults", 5, 1000)?;
    let token = p.string("NextToken");
    let _ = p.bool("IncludeManagedResources")?;
    let dry = p.dry_run()?;
    p.finish()?;
    check_instance_ids(&ids)?;
    no_max_with_ids(max, &ids)?;
    check_names(&filters, INSTANCE_FILTERS, true)?;
    if dry {
        return Err(ctx.dry_run("DescribeInstances"));
    }
    if ids.is_empty() && filters.is_empty() {
        // No filters: the page comes straight from the store, in id order.
        let after = token.as_deref().map(page::decode).transpose()?;
        let rows = ctx
            .ctl
            .store
            .instances_visible_after(
                &ctx.scope,
                ctx.cutoff(),
                after.as_deref(),
                max.map(|m| m + 1),
            )
            .await?;
        let (rows, next) = page::page(rows, |r| r.id.clone(), None, max)?;
        let l = lookups(ctx, &rows).await?;
        return Ok(render_describe(ctx, &rows, &l, next.as_deref()));
    }
    let mut rows = ctx
        .ctl
        .store
        .instances_visible(&ctx.scope, ctx.cutoff())
        .await?;
    if !ids.is_empty() {
        let have: HashSet<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        let missing: Vec<String> = ids
            .iter()
            .filter(|i| !have.contains(i.as_str()))
            .cloned()
            .collect();
        if !missing.is_empty() {
            return Err(missing_instances(&missing));
        }
        let want: HashSet<&String> = ids.iter().collect();
        rows.retain(|r| want.contains(&r.id));
    }
    let l = lookups(ctx, &rows).await?;
    rows.retain(|i| matches_all(&filters, |n| instance_values(i, &l, ctx.region, n)));
    let (rows, next) = page::page(rows, |r| r.id.clone(), token.as_deref(), max)?;
    Ok(render_describe(ctx, &rows, &l, next.as_deref()))
}

fn render_describe(ctx: &Ctx<'_>, rows: &[InstanceRow], l: &Lookups, next: Option<&str>) -> String {
    let mut x = Xml::new();
    x.response("DescribeInstances", &ctx.request_id, |x| {
        let groups = render::group(rows);
        x.set("reservationSet", &groups, |x, (rid, members)| {
            render::reservation_body(x, rid, members, l, ctx.region)
        });
        x.opt("nextToken", next);
    });
    x.finish()
}

fn decode_user_data(v: &str) -> Result<Option<String>, Ec2Error> {
    if v.is_empty() {
        return Ok(None);
    }
    let raw = STANDARD.decode(v.trim()).map_err(|_| {
        Ec2Error::InvalidParameterValue("Invalid BASE64 encoding of user data.".into())
    })?;
    if raw.len() > MAX_USER_DATA {
        return Err(Ec2Error::InvalidParameterValue(format!(
            "User data is limited to {MAX_USER_DATA} bytes."
        )));
    }
    Ok(Some(STANDARD.encode(raw)))
}

fn random_hex(n: usize) -> String {
    let mut rng = rand::thread_rng();
    (0..n)
        .map(|_| char::from_digit(rng.gen_range(0..16), 16).unwrap_or('0'))
        .collect()
}

/// Refuse parameters of capabilities kumo does not have yet.
fn refuse_unsupported(p: &mut Params, names: &[&str]) -> Result<(), Ec2Error> {
    for n in names {
        if p.take_prefix(n) {
            return Err(Ec2Error::UnsupportedOperation(format!(
                "The parameter {n} is not supported by kumo yet"
            )));
        }
    }
    Ok(())
}

/// A boolean parameter kumo accepts only with EC2's default value.
fn only_default_bool(p: &mut Params, name: &str, default: bool) -> Result<(), Ec2Error> {
    match p.bool(name)? {
        Some(v) if v != default => Err(Ec2Error::UnsupportedOperation(format!(
            "{name}={v} is not supported by kumo"
        ))),
        _ => Ok(()),
    }
}

pub async fn run(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let request_hash = hex::encode(Sha256::digest(
        p.canonical(&["ClientToken", "DryRun"]).as_bytes(),
    ));
    let image_id = p.required("ImageId")?;
    let itype = p
        .string("InstanceType")
        .unwrap_or_else(|| kumo_controller::DEFAULT_TYPE.to_string());
    let min = p.int("MinCount")?.ok_or_else(|| {
        Ec2Error::MissingParameter("The request must contain the parameter MinCount".into())
    })?;
    let max = p.int("MaxCount")?.ok_or_else(|| {
        Ec2Error::MissingParameter("The request must contain the parameter MaxCount".into())
    })?;
    let user_data = match p.string("UserData") {
        Some(v) => decode_user_data(&v)?,
        None => None,
    };
    let client_token = p.string("ClientToken");
    let kernel = p.string("KernelId");
    let ramdisk = p.string("RamdiskId");
    let zone = p.string("Placement.AvailabilityZone");
    let group = p.string("Placement.GroupName");
    if let Some(t) = p.string("Placement.Tenancy") {
        if t != "default" {
            return Err(Ec2Error::UnsupportedOperation(format!(
                "Tenancy {t} is not supported by kumo"
            )));
        }
    }
    only_default_bool(&mut p, "Monitoring.Enabled", false)?;
    only_default_bool(&mut p, "DisableApiTermination", false)?;
    only_default_bool(&mut p, "DisableApiStop", false)?;
    only_default_bool(&mut p, "EbsOptimized", false)?;
    if let Some(b) = p.string("InstanceInitiatedShutdownBehavior") {
        if b != "stop" {
            return Err(Ec2Error::UnsupportedOperation(format!(
                "InstanceInitiatedShutdownBehavior {b} is not supported by kumo (guests that power off are stopped)"
            )));
        }
    }
    let group_ids = p.list("SecurityGroupId")?;
    let group_names = p.list("SecurityGroup")?;
    let key_name = p.string("KeyName");
    let specs = p.tag_specs()?;
    let subnet = crate::addresses::take_subnet(&mut p)?;
    refuse_unsupported(
        &mut p,
        &[
            "PrivateIpAddress",
            "BlockDeviceMapping",
            "IamInstanceProfile",
            "LaunchTemplate",
            "Ipv6Address",
            "Ipv6AddressCount",
        ],
    )?;
    let dry = p.dry_run()?;
    p.finish()?;

    if min < 1 || max < 1 {
        return Err(Ec2Error::InvalidParameterValue(
            "MinCount and MaxCount must be at least 1".into(),
        ));
    }
    if min > max {
        return Err(Ec2Error::InvalidParameterValue(format!(
            "MinCount ({min}) must not be greater than MaxCount ({max})"
        )));
    }
    if let Some(t) = &client_token {
        if t.is_empty() || t.len() > 64 || !t.is_ascii() {
            return Err(Ec2Error::InvalidParameterValue(
                "ClientToken must be 1 to 64 ASCII characters".into(),
            ));
        }
    }
    let mut tags: Vec<(String, String)> = Vec::new();
    for s in &specs {
        if s.resource_type != "instance" {
            return Err(Ec2Error::UnsupportedOperation(format!(
                "kumo tags only instances at launch, not {:?} resources",
                s.resource_type
            )));
        }
        for (k, v) in &s.tags {
            check_tag(k, v)?;
            if tags.iter().any(|(k2, _)| k2 == k) {
                return Err(Ec2Error::InvalidParameterValue(format!(
                    "The tag key '{k}' is given more than once"
                )));
            }
            tags.push((k.clone(), v.clone()));
        }
    }
    if !is_id(IdKind::Image, &image_id) {
        return Err(Ec2Error::AmiMalformed(format!(
            "Invalid id: \"{image_id}\" (expecting \"ami-...\")"
        )));
    }
    let image = match ctx.ctl.store.image(&ctx.scope, &image_id).await {
        Ok(img) if img.id == image_id => img,
        Ok(_) | Err(StoreError::NotFound { .. }) => return Err(not_found("image", &image_id)),
        Err(e) => return Err(e.into()),
    };
    if kernel
        .as_ref()
        .is_some_and(|k| Some(k) != image.kernel_id.as_ref())
        || ramdisk
            .as_ref()
            .is_some_and(|r| Some(r) != image.ramdisk_id.as_ref())
    {
        return Err(Ec2Error::UnsupportedOperation(
            "kumo boots the kernel and ramdisk registered with the image; KernelId and RamdiskId must match them".into(),
        ));
    }
    match ctx.ctl.store.instance_type(&itype).await {
        Ok(_) => {}
        Err(StoreError::NotFound { .. }) => {
            return Err(Ec2Error::InvalidParameterValue(format!(
                "Invalid value '{itype}' for InstanceType."
            )))
        }
        Err(e) => return Err(e.into()),
    }
    if let Some(g) = &group {
        match ctx.ctl.store.placement_group(&ctx.scope, g).await {
            Ok(pg) if &pg.name == g => {}
            Ok(_) | Err(StoreError::NotFound { .. }) => {
                return Err(Ec2Error::PlacementGroupUnknown(format!(
                    "The Placement Group '{g}' is unknown."
                )))
            }
            Err(e) => return Err(e.into()),
        }
    }
    if let Some(z) = &zone {
        let known = {
            let p = ctx.ctl.store.placement().await?;
            p.hosts().iter().any(|h| &h.site == z)
        };
        if !known {
            return Err(Ec2Error::InvalidParameterValue(format!(
                "Invalid availability zone: [{z}]"
            )));
        }
    }
    let network = match &subnet {
        Some(s) => Some(crate::addresses::resolve_subnet(ctx, s).await?),
        None => None,
    };
    let security_groups = security::launch_groups(ctx, &group_ids, &group_names).await?;
    let key_name = match &key_name {
        Some(k) => Some(security::keys::launch_key(ctx, k).await?),
        None => None,
    };
    if dry {
        return Err(ctx.dry_run("RunInstances"));
    }

    let _guard = match &client_token {
        Some(_) => Some(ctx.inner.run_lock.lock().await),
        None => None,
    };
    let idem_key = client_token
        .as_ref()
        .map(|t| format!("ec2:RunInstances:{t}"));
    if let Some(k) = &idem_key {
        if let Some(prev) = ctx
            .ctl
            .store
            .idempotent_response(&ctx.key.user_id, k)
            .await?
        {
            if prev.request_hash != request_hash {
                return Err(Ec2Error::IdempotentParameterMismatch(
                    "Arguments on this idempotent request are inconsistent with arguments used in previous request(s).".into(),
                ));
            }
            let rows = ctx
                .ctl
                .store
                .reservation_instances(&ctx.scope, &prev.body)
                .await?;
            return reservation_response(ctx, &prev.body, &rows).await;
        }
    }

    let live = ctx.ctl.store.count_live_instances(&ctx.scope).await?;
    let room = MAX_INSTANCES - live;
    if room < min {
        return Err(Ec2Error::InstanceLimitExceeded(format!(
            "Your quota allows for {} more running instance(s). You requested at least {min}.",
            room.max(0)
        )));
    }
    let count = max.min(room).min(i64::from(kumo_controller::MAX_BATCH));
    if count < min {
        return Err(Ec2Error::InvalidParameterValue(format!(
            "MinCount ({min}) is above the {} instances one request may launch",
            kumo_controller::MAX_BATCH
        )));
    }
    let rid = format!("r-{}", random_hex(17));
    let base = tags
        .iter()
        .find(|(k, _)| k == "Name")
        .map(|(_, v)| v.clone());
    let mut names = Vec::with_capacity(count as usize);
    for n in 0..count {
        names.push(pick_name(ctx, base.as_deref(), count > 1, n).await?);
    }
    let req = CreateInstance {
        name: names.first().cloned().unwrap_or_default(),
        image: image.id.clone(),
        instance_type: Some(itype.clone()),
        site: zone.clone(),
        constraints: vec![],
        placement_group: group.clone(),
        security_groups,
        key_name,
        network,
        ..Default::default()
    };
    let launch = |n: u32| {
        let extras = LaunchExtras {
            user_data: user_data.clone(),
            reservation_id: Some(rid.clone()),
            launch_index: n,
            client_token: client_token.clone(),
        };
        (names[n as usize].clone(), extras)
    };
    // All or at least MinCount, in one step: nothing to roll back when capacity runs out.
    let created = ctx
        .ctl
        .create_instances(&ctx.scope, &req, count as u32, min as u32, launch)
        .await
        .map_err(Ec2Error::from_op)?;
    if !tags.is_empty() {
        let resources: Vec<(String, String)> = created
            .iter()
            .map(|r| (r.id.clone(), "instance".to_string()))
            .collect();
        ctx.ctl
            .store
            .put_tags(&ctx.scope.project_id, &resources, &tags)
            .await?;
    }
    if let Some(k) = &idem_key {
        let rec = IdempotentResponse {
            request_hash,
            status: 200,
            body: rid.clone(),
        };
        ctx.ctl
            .store
            .save_idempotent_response(&ctx.key.user_id, k, &rec)
            .await?;
    }
    reservation_response(ctx, &rid, &created).await
}

/// The Name tag (suffixed in a multi-instance launch) when it is a valid and free kumo
/// name, else a generated one.
async fn pick_name(
    ctx: &Ctx<'_>,
    base: Option<&str>,
    multi: bool,
    n: i64,
) -> Result<String, Ec2Error> {
    if let Some(b) = base {
        let candidate = if multi {
            format!("{b}-{}", n + 1)
        } else {
            b.to_string()
        };
        if kumo_types::id::validate_name(&candidate).is_ok() {
            match ctx.ctl.store.instance(&ctx.scope, &candidate).await {
                Err(StoreError::NotFound { .. }) => return Ok(candidate),
                Ok(_) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(format!("ec2-{}", random_hex(8)))
}

async fn reservation_response(
    ctx: &Ctx<'_>,
    rid: &str,
    rows: &[InstanceRow],
) -> Result<String, Ec2Error> {
    let l = lookups(ctx, rows).await?;
    let refs: Vec<&InstanceRow> = rows.iter().collect();
    let mut x = Xml::new();
    x.response("RunInstances", &ctx.request_id, |x| {
        render::reservation_body(x, rid, &refs, &l, ctx.region)
    });
    Ok(x.finish())
}

pub async fn change_state(ctx: &Ctx<'_>, action: &str, mut p: Params) -> Result<String, Ec2Error> {
    let ids = required_ids(&mut p)?;
    match action {
        "StopInstances" => {
            // kumo always stops gracefully first and forces after a timeout.
            let _ = p.bool("Force")?;
            only_default_bool(&mut p, "Hibernate", false)?;
        }
        "StartInstances" => {
            let _ = p.string("AdditionalInfo");
        }
        _ => {}
    }
    let dry = p.dry_run()?;
    p.finish()?;
    let rows = resolve(ctx, &ids).await?;
    if dry {
        return Err(ctx.dry_run(action));
    }
    let mut changes = Vec::new();
    for r in &rows {
        let new = match action {
            "StartInstances" => ctx.ctl.start_instance(&ctx.scope, &r.id).await,
            "StopInstances" => ctx.ctl.stop_instance(&ctx.scope, &r.id).await,
            "RebootInstances" => ctx.ctl.reboot_instance(&ctx.scope, &r.id).await,
            _ => ctx.ctl.terminate_instance(&ctx.scope, &r.id).await,
        }?;
        changes.push((r.id.clone(), r.state, new.state));
    }
    let mut x = Xml::new();
    x.response(action, &ctx.request_id, |x| {
        if action == "RebootInstances" {
            x.bool("return", true);
            return;
        }
        x.set("instancesSet", &changes, |x, (id, prev, cur)| {
            x.leaf("instanceId", id);
            render::state(x, "currentState", *cur);
            render::state(x, "previousState", *prev);
        });
    });
    Ok(x.finish())
}

fn status_summary(x: &mut Xml, name: &str, s: InstanceState) {
    let (status, reach) = match s {
        InstanceState::Running => ("ok", Some("passed")),
        InstanceState::Pending => ("initializing", Some("initializing")),
        _ => ("not-applicable", None),
    };
    x.elem(name, |x| {
        x.leaf("status", status);
        match reach {
            Some(r) => x.elem("details", |x| {
                x.elem("item", |x| {
                    x.leaf("name", "reachability");
                    x.leaf("status", r);
                })
            }),
            None => x.empty("details"),
        }
    });
}

fn status_values(i: &InstanceRow, l: &Lookups, name: &str) -> Vec<String> {
    let (status, reach) = match i.state {
        InstanceState::Running => ("ok", "passed"),
        InstanceState::Pending => ("initializing", "initializing"),
        _ => ("not-applicable", ""),
    };
    let one = |s: &str| vec![s.to_string()];
    match name {
        "availability-zone" => one(&l.zone(i)),
        "instance-state-name" => one(i.state.as_str()),
        "instance-state-code" => one(&i.state.code().to_string()),
        "instance-status.status" | "system-status.status" => one(status),
        "instance-status.reachability" | "system-status.reachability" => one(reach),
        _ => vec![],
    }
}

pub async fn status(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let ids = p.list("InstanceId")?;
    let filters = p.filters()?;
    let max = p.int_in("MaxResults", 5, 1000)?;
    let token = p.string("NextToken");
    let all = p.bool("IncludeAllInstances")?.unwrap_or(false);
    let _ = p.bool("IncludeManagedResources")?;
    let dry = p.dry_run()?;
    p.finish()?;
    check_instance_ids(&ids)?;
    no_max_with_ids(max, &ids)?;
    check_names(&filters, STATUS_FILTERS, false)?;
    let mut rows = if ids.is_empty() {
        ctx.ctl
            .store
            .instances_visible(&ctx.scope, ctx.cutoff())
            .await?
    } else {
        let mut r = resolve(ctx, &ids).await?;
        r.sort_by(|a, b| a.id.cmp(&b.id));
        r
    };
    if dry {
        return Err(ctx.dry_run("DescribeInstanceStatus"));
    }
    if !all {
        rows.retain(|r| r.state == InstanceState::Running);
    }
    let l = lookups(ctx, &rows).await?;
    rows.retain(|i| matches_all(&filters, |n| status_values(i, &l, n)));
    let (rows, next) = page::page(rows, |r| r.id.clone(), token.as_deref(), max)?;
    let mut x = Xml::new();
    x.response("DescribeInstanceStatus", &ctx.request_id, |x| {
        x.set("instanceStatusSet", &rows, |x, i| {
            x.leaf("instanceId", &i.id);
            x.leaf("availabilityZone", &l.zone(i));
            x.empty("eventsSet");
            render::state(x, "instanceState", i.state);
            status_summary(x, "systemStatus", i.state);
            status_summary(x, "instanceStatus", i.state);
        });
        x.opt("nextToken", next.as_deref());
    });
    Ok(x.finish())
}

pub async fn console(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let id = p.required("InstanceId")?;
    let _ = p.bool("Latest")?;
    let dry = p.dry_run()?;
    p.finish()?;
    let row = resolve(ctx, std::slice::from_ref(&id)).await?.remove(0);
    if dry {
        return Err(ctx.dry_run("GetConsoleOutput"));
    }
    // EC2 keeps the last 64 KiB.
    let (_, out) = ctx
        .ctl
        .console_output(&ctx.scope, &row.id, 64 * 1024)
        .await?;
    let mut x = Xml::new();
    x.response("GetConsoleOutput", &ctx.request_id, |x| {
        x.leaf("instanceId", &row.id);
        x.leaf("timestamp", &ts(chrono::Utc::now()));
        x.leaf("output", &STANDARD.encode(out.as_bytes()));
    });
    Ok(x.finish())
}

pub async fn describe_attribute(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let id = p.required("InstanceId")?;
    let attr = p.required("Attribute")?;
    let dry = p.dry_run()?;
    p.finish()?;
    const KNOWN: &[&str] = &[
        "instanceType",
        "kernel",
        "ramdisk",
        "userData",
        "disableApiTermination",
        "disableApiStop",
        "instanceInitiatedShutdownBehavior",
        "rootDeviceName",
        "blockDeviceMapping",
        "productCodes",
        "sourceDestCheck",
        "groupSet",
        "ebsOptimized",
        "sriovNetSupport",
        "enaSupport",
        "enclaveOptions",
    ];
    if !KNOWN.contains(&attr.as_str()) {
        return Err(Ec2Error::InvalidParameterValue(format!(
            "Value ({attr}) for parameter attribute is invalid. Unknown attribute."
        )));
    }
    let row = resolve(ctx, std::slice::from_ref(&id)).await?.remove(0);
    if dry {
        return Err(ctx.dry_run("DescribeInstanceAttribute"));
    }
    let l = lookups(ctx, std::slice::from_ref(&row)).await?;
    let value = |x: &mut Xml, name: &str, v: Option<&str>| match v {
        Some(v) => x.elem(name, |x| x.leaf("value", v)),
        None => x.empty(name),
    };
    let mut x = Xml::new();
    x.response("DescribeInstanceAttribute", &ctx.request_id, |x| {
        x.leaf("instanceId", &row.id);
        match attr.as_str() {
            "instanceType" => value(x, "instanceType", Some(&row.instance_type)),
            "kernel" => value(x, "kernel", l.kernel(&row).as_deref()),
            "ramdisk" => value(x, "ramdisk", l.ramdisk(&row).as_deref()),
            "userData" => value(x, "userData", row.user_data.as_deref()),
            "disableApiTermination" | "disableApiStop" | "ebsOptimized" | "enaSupport" => {
                value(x, &attr, Some("false"))
            }
            "sourceDestCheck" => value(x, "sourceDestCheck", Some("true")),
            "instanceInitiatedShutdownBehavior" => value(x, &attr, Some("stop")),
            "rootDeviceName" => value(x, &attr, Some(render::ROOT_DEVICE)),
            "enclaveOptions" => x.elem("enclaveOptions", |x| x.bool("enabled", false)),
            "groupSet" => render::group_set(x, &row, &l),
            other => x.empty(other),
        }
    });
    Ok(x.finish())
}

pub async fn modify_attribute(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let id = p.required("InstanceId")?;
    let mut changes: Vec<(&str, String)> = Vec::new();
    if let Some(attr) = p.string("Attribute") {
        let v = p.string("Value").unwrap_or_default();
        match attr.as_str() {
            "instanceType" => changes.push(("instanceType", v)),
            "userData" => changes.push(("userData", v)),
            other => {
                return Err(Ec2Error::UnsupportedOperation(format!(
                    "Changing the attribute {other} is not supported by kumo"
                )))
            }
        }
    } else if p.peek("Value").is_some() {
        return Err(Ec2Error::MissingParameter(
            "The request must contain the parameter Attribute with Value".into(),
        ));
    }
    if let Some(v) = p.string("InstanceType.Value") {
        changes.push(("instanceType", v));
    }
    if let Some(v) = p.string("UserData.Value") {
        changes.push(("userData", v));
    }
    let groups = p.list("GroupId")?;
    if !groups.is_empty() {
        changes.push(("groupSet", String::new()));
    }
    refuse_unsupported(
        &mut p,
        &[
            "Kernel",
            "Ramdisk",
            "DisableApiTermination",
            "DisableApiStop",
            "InstanceInitiatedShutdownBehavior",
            "SourceDestCheck",
            "EbsOptimized",
            "EnaSupport",
            "SriovNetSupport",
            "BlockDeviceMapping",
        ],
    )?;
    let dry = p.dry_run()?;
    p.finish()?;
    let (what, value) = match changes.len() {
        0 => {
            return Err(Ec2Error::MissingParameter(
                "The request must name one attribute to change (e.g. InstanceType.Value)".into(),
            ))
        }
        1 => changes.remove(0),
        _ => {
            return Err(Ec2Error::InvalidParameterCombination(
                "Only one attribute can be changed per call".into(),
            ))
        }
    };
    let user_data = if what == "userData" {
        decode_user_data(&value)?
    } else {
        None
    };
    let row = resolve(ctx, std::slice::from_ref(&id)).await?.remove(0);
    let group_ids = if what == "groupSet" {
        security::launch_groups(ctx, &groups, &[]).await?
    } else {
        vec![]
    };
    if dry {
        return Err(ctx.dry_run("ModifyInstanceAttribute"));
    }
    let res = if what == "groupSet" {
        ctx.ctl
            .set_instance_security_groups(&ctx.scope, &row.id, &group_ids)
            .await
    } else if what == "instanceType" {
        if ctx.ctl.store.instance_type(&value).await.is_err() {
            return Err(Ec2Error::InvalidParameterValue(format!(
                "Invalid value '{value}' for InstanceType."
            )));
        }
        ctx.ctl.resize_instance(&ctx.scope, &row.id, &value).await
    } else {
        ctx.ctl
            .set_user_data(&ctx.scope, &row.id, user_data.as_deref())
            .await
    };
    res?;
    let mut x = Xml::new();
    x.response("ModifyInstanceAttribute", &ctx.request_id, |x| {
        x.bool("return", true)
    });
    Ok(x.finish())
}

/// Instances of the scope by id, for tag operations.
pub(crate) async fn instance_project(ctx: &Ctx<'_>, id: &str) -> Result<String, Ec2Error> {
    Ok(resolve(ctx, &[id.to_string()]).await?.remove(0).project_id)
}
