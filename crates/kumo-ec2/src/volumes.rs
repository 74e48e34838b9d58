//! EC2 volume (EBS) actions over kumo's volumes, and (in `snapshots`) its snapshots. Sizes
//! are GiB: `Size=N` makes exactly N GiB; a volume made natively with a size that is not a
//! whole GiB shows its size rounded up. kumo volumes have one type (shown as gp2; gp3 and
//! standard are accepted), no encryption, no multi-attach. Device names (/dev/sdf, /dev/sdg,
//! …) follow the order of an instance's volumes; `Device` is accepted and not kept: the guest
//! finds a volume by its serial, `/dev/disk/by-id/virtio-vol-…`. A volume's zone is the site
//! of the host holding it; CreateVolume's zone is checked but does not steer placement.

mod parse;
mod render;
mod snapshots;

use std::collections::{HashMap, HashSet};

use kumo_controller::OpError;
use kumo_store::{IdempotencyClaim, IdempotentResponse, StoreError, VolumeRow, GIB};
use kumo_types::storage::{AttachVolume, CreateVolume, ResizeVolume};
use sha2::{Digest, Sha256};

use crate::error::{not_found, Ec2Error};
use crate::filter::{check_names, matches_all};
use crate::params::Params;
use crate::xml::Xml;
use crate::{page, Ctx};

pub use snapshots::{create_snapshot, delete_snapshot, describe_snapshots};

use parse::{check_instance_id, check_volume_id, HostRef};
use render::{VolumeLookups, Zones};

/// An operation's error on a volume or snapshot: its state conflicts are about the volume,
/// not an instance.
fn vol_err(e: OpError) -> Ec2Error {
    match e {
        OpError::IncorrectState(m) => Ec2Error::IncorrectState(m),
        other => Ec2Error::from_op(other),
    }
}

fn missing_volumes(ids: &[String]) -> Ec2Error {
    match ids {
        [one] => not_found("volume", one),
        _ => Ec2Error::VolumeNotFound(format!("The volumes '{}' do not exist.", ids.join(", "))),
    }
}

/// The caller's volume with exactly this id (the store also matches names; EC2 does not).
async fn own_volume(ctx: &Ctx<'_>, id: &str) -> Result<VolumeRow, Ec2Error> {
    check_volume_id(id)?;
    match ctx.ctl.store.volume(&ctx.scope, id).await {
        Ok(v) if v.id == id => Ok(v),
        Ok(_) | Err(StoreError::NotFound { .. }) => Err(not_found("volume", id)),
        Err(e) => Err(e.into()),
    }
}

/// Tags of the scope's volumes and snapshots, by resource id.
async fn storage_tags(ctx: &Ctx<'_>) -> Result<HashMap<String, Vec<(String, String)>>, Ec2Error> {
    let mut out: HashMap<String, Vec<(String, String)>> = HashMap::new();
    for t in ctx.ctl.store.tags(&ctx.scope, ctx.cutoff()).await? {
        if t.resource_id.starts_with("vol-") || t.resource_id.starts_with("snap-") {
            out.entry(t.resource_id).or_default().push((t.key, t.value));
        }
    }
    Ok(out)
}

async fn zones(ctx: &Ctx<'_>) -> Result<Zones, Ec2Error> {
    let hosts = ctx.ctl.store.hosts().await?;
    Ok(Zones::new(
        hosts.into_iter().map(|h| (h.id, h.site, h.pool_name)),
        ctx.region,
    ))
}

/// Lookups for rendering a few volumes: devices from their instances' volumes.
async fn lookups_for(ctx: &Ctx<'_>, rows: &[&VolumeRow]) -> Result<VolumeLookups, Ec2Error> {
    let mut devices = HashMap::new();
    let instances: HashSet<&str> = rows
        .iter()
        .filter_map(|v| v.instance_id.as_deref())
        .collect();
    for i in instances {
        devices.extend(render::devices(
            &ctx.ctl.store.volumes_of_instance(i).await?,
        ));
    }
    let mut tags = storage_tags(ctx).await?;
    tags.retain(|id, _| rows.iter().any(|v| &v.id == id));
    Ok(VolumeLookups {
        zones: zones(ctx).await?,
        devices,
        tags,
    })
}

/// Forget a deleted resource's tags (their rows would otherwise outlive it).
async fn drop_tags(ctx: &Ctx<'_>, id: &str) {
    if let Err(e) = ctx
        .ctl
        .store
        .delete_tags(&ctx.scope, &[id.to_string()], &[])
        .await
    {
        tracing::warn!(resource = id, error = %e, "could not delete the tags of a deleted resource");
    }
}

pub async fn create(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let request_hash = hex::encode(Sha256::digest(
        p.canonical(&["ClientToken", "DryRun"]).as_bytes(),
    ));
    let req = parse::create_volume(&mut p)?;
    let dry = p.dry_run()?;
    p.finish()?;
    if let Some(z) = &req.zone {
        // Checked as RunInstances checks its zone; kumo's pool placement decides the rest.
        let known = ctx.ctl.store.hosts().await?.iter().any(|h| &h.site == z);
        if !known {
            return Err(Ec2Error::InvalidParameterValue(format!(
                "Invalid availability zone: [{z}]"
            )));
        }
    }
    if let Some(s) = &req.snapshot {
        let snap = snapshots::own_snapshot(ctx, s).await?;
        if snap.state != "completed" {
            return Err(Ec2Error::IncorrectState(format!(
                "Snapshot '{}' is in the '{}' state, not completed.",
                snap.id, snap.state
            )));
        }
        if let Some(g) = req.size_gib {
            if g * GIB < snap.size_bytes {
                return Err(Ec2Error::InvalidParameterValue(format!(
                    "The volume size ({g} GiB) is smaller than the snapshot '{}' ({} GiB).",
                    snap.id,
                    render::gib(snap.size_bytes)
                )));
            }
        }
    }
    if dry {
        return Err(ctx.dry_run("CreateVolume"));
    }
    let key = req
        .client_token
        .as_ref()
        .map(|t| format!("ec2:CreateVolume:{t}"));
    if let Some(k) = &key {
        match ctx
            .ctl
            .store
            .claim_idempotency(&ctx.key.user_id, k, &request_hash)
            .await?
        {
            IdempotencyClaim::Claimed => {}
            IdempotencyClaim::Done(prev) if prev.request_hash == request_hash => {
                let v = own_volume(ctx, &prev.body).await?;
                return volume_response(ctx, "CreateVolume", &v).await;
            }
            IdempotencyClaim::Done(_) => {
                return Err(Ec2Error::IdempotentParameterMismatch(
                    "Arguments on this idempotent request are inconsistent with arguments used in previous request(s).".into(),
                ))
            }
            IdempotencyClaim::InProgress => {
                return Err(Ec2Error::Unavailable(
                    "A request with this ClientToken is still running; try again shortly".into(),
                ))
            }
        }
    }
    let made = make_volume(ctx, &req).await;
    if let Some(k) = &key {
        let recorded = match &made {
            Ok(v) => {
                let rec = IdempotentResponse {
                    request_hash,
                    status: 200,
                    body: v.id.clone(),
                };
                ctx.ctl
                    .store
                    .finish_idempotency(&ctx.key.user_id, k, &rec)
                    .await
            }
            // Nothing was made: a retry with the token may run again.
            Err(_) => ctx.ctl.store.release_idempotency(&ctx.key.user_id, k).await,
        };
        if let Err(e) = recorded {
            tracing::warn!(error = %e, "could not record the CreateVolume client token");
        }
    }
    volume_response(ctx, "CreateVolume", &made?).await
}

/// The volume, then its tags; a volume whose tags cannot be written is deleted again.
async fn make_volume(
    ctx: &Ctx<'_>,
    req: &parse::CreateVolumeParams,
) -> Result<VolumeRow, Ec2Error> {
    let create = CreateVolume {
        size_bytes: req.size_gib.map(|g| g * GIB),
        snapshot: req.snapshot.clone(),
        ..CreateVolume::default()
    };
    let v = ctx
        .ctl
        .create_volume(&ctx.scope, &create)
        .await
        .map_err(vol_err)?;
    if !req.tags.is_empty() {
        let resources = [(v.id.clone(), "volume".to_string())];
        if let Err(e) = ctx
            .ctl
            .store
            .put_tags(&ctx.scope.project_id, &resources, &req.tags)
            .await
        {
            if let Err(e2) = ctx.ctl.delete_volume(&ctx.scope, &v.id).await {
                tracing::warn!(volume = %v.id, error = %e2, "could not delete a volume whose tags failed");
            }
            return Err(e.into());
        }
    }
    Ok(v)
}

/// `<{action}Response>` with one volume's members.
async fn volume_response(ctx: &Ctx<'_>, action: &str, v: &VolumeRow) -> Result<String, Ec2Error> {
    let l = lookups_for(ctx, &[v]).await?;
    let mut x = Xml::new();
    x.response(action, &ctx.request_id, |x| render::volume(x, v, &l));
    Ok(x.finish())
}

pub async fn describe(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let ids = p.list("VolumeId")?;
    let filters = p.filters()?;
    let max = p.int_in("MaxResults", 5, 500)?;
    let token = p.string("NextToken");
    let _ = p.bool("IncludeManagedResources")?;
    let dry = p.dry_run()?;
    p.finish()?;
    for id in &ids {
        check_volume_id(id)?;
    }
    if max.is_some() && !ids.is_empty() {
        return Err(Ec2Error::InvalidParameterCombination(
            "The parameter volumeSet cannot be used with the parameter maxResults".into(),
        ));
    }
    check_names(&filters, render::VOLUME_FILTERS, true)?;
    if dry {
        return Err(ctx.dry_run("DescribeVolumes"));
    }
    let all = ctx.ctl.store.volumes(&ctx.scope).await?;
    let mut missing: Vec<String> = ids
        .iter()
        .filter(|id| !all.iter().any(|v| &v.id == *id))
        .cloned()
        .collect();
    missing.dedup();
    if !missing.is_empty() {
        return Err(missing_volumes(&missing));
    }
    // Devices come from every volume of an instance, shown or not.
    let l = VolumeLookups {
        zones: zones(ctx).await?,
        devices: render::devices(&all),
        tags: storage_tags(ctx).await?,
    };
    let mut shown: Vec<VolumeRow> = all
        .into_iter()
        .filter(|v| ids.is_empty() || ids.contains(&v.id))
        .filter(|v| matches_all(&filters, |n| render::volume_values(v, &l, n)))
        .collect();
    shown.sort_by(|a, b| a.id.cmp(&b.id));
    let (shown, next) = page::page(shown, |v| v.id.clone(), token.as_deref(), max)?;
    let mut x = Xml::new();
    x.response("DescribeVolumes", &ctx.request_id, |x| {
        x.set("volumeSet", &shown, |x, v| render::volume(x, v, &l));
        x.opt("nextToken", next.as_deref());
    });
    Ok(x.finish())
}

/// The device name of an attached volume among its instance's volumes.
async fn device_of(ctx: &Ctx<'_>, v: &VolumeRow) -> Result<String, Ec2Error> {
    let Some(i) = &v.instance_id else {
        return Ok(String::new());
    };
    let all = ctx.ctl.store.volumes_of_instance(i).await?;
    Ok(render::devices(&all).remove(&v.id).unwrap_or_default())
}

pub async fn attach(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let vid = p.required("VolumeId")?;
    let iid = p.required("InstanceId")?;
    // Accepted as EC2 requires it, kept nowhere: kumo names the device (see the module doc).
    let device = p.string("Device");
    if let Some(n) = p.int("EbsCardIndex")? {
        if n != 0 {
            return Err(Ec2Error::UnsupportedOperation(
                "kumo instances have one EBS card (EbsCardIndex 0)".into(),
            ));
        }
    }
    let dry = p.dry_run()?;
    p.finish()?;
    if device.as_deref() == Some("") {
        return Err(Ec2Error::InvalidParameterValue(
            "The parameter Device must not be empty".into(),
        ));
    }
    check_volume_id(&vid)?;
    check_instance_id(&iid)?;
    // The volume first: another project's volume is NotFound whatever the instance.
    let vol = own_volume(ctx, &vid).await?;
    let inst = match ctx.ctl.store.instance_by_id(&ctx.scope, &iid).await {
        Ok(i) => i,
        Err(StoreError::NotFound { .. }) => return Err(not_found("instance", &iid)),
        Err(e) => return Err(e.into()),
    };
    let host = match &inst.host_id {
        Some(h) => Some(ctx.ctl.store.host(h).await?),
        None => None,
    };
    let host_ref = host.as_ref().map(|h| HostRef {
        id: &h.id,
        name: &h.name,
        pool: &h.pool_name,
    });
    if let Some(e) = parse::attach_refusal(&vol, &inst.id, inst.state, host_ref) {
        return Err(e);
    }
    if dry {
        return Err(ctx.dry_run("AttachVolume"));
    }
    let req = AttachVolume {
        instance: inst.id.clone(),
    };
    let v = match ctx.ctl.attach_volume(&ctx.scope, &vol.id, &req).await {
        Ok(v) => v,
        // Something changed since the checks above (another attach won): say what it is now.
        Err(OpError::IncorrectState(m)) => {
            let now = own_volume(ctx, &vid).await?;
            return Err(match &now.instance_id {
                Some(i) => Ec2Error::VolumeInUse(format!(
                    "{} is already attached to an instance ({i})",
                    now.id
                )),
                None if m.starts_with("instance") => Ec2Error::IncorrectInstanceState(m),
                None => Ec2Error::IncorrectState(m),
            });
        }
        Err(OpError::Invalid(m)) if m.contains("storage pool") => {
            return Err(Ec2Error::VolumeZoneMismatch(m))
        }
        Err(e) => return Err(vol_err(e)),
    };
    let device = device_of(ctx, &v).await?;
    let mut x = Xml::new();
    x.response("AttachVolume", &ctx.request_id, |x| {
        render::attachment(x, &v, &device, Some(chrono::Utc::now()))
    });
    Ok(x.finish())
}

pub async fn detach(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let vid = p.required("VolumeId")?;
    let iid = p.string("InstanceId");
    // Both accepted: kumo keeps no device names, and a detach is always a clean unplug.
    let _ = p.string("Device");
    let _ = p.bool("Force")?;
    let dry = p.dry_run()?;
    p.finish()?;
    check_volume_id(&vid)?;
    if let Some(i) = &iid {
        check_instance_id(i)?;
    }
    let vol = own_volume(ctx, &vid).await?;
    match (&vol.instance_id, &iid) {
        (None, _) => {
            return Err(Ec2Error::IncorrectState(format!(
                "Volume '{}' is in the '{}' state.",
                vol.id, vol.state
            )))
        }
        (Some(on), Some(want)) if on != want => {
            return Err(Ec2Error::IncorrectState(format!(
                "Volume '{}' is attached to '{on}', not to '{want}'.",
                vol.id
            )))
        }
        _ => {}
    }
    if dry {
        return Err(ctx.dry_run("DetachVolume"));
    }
    // Named before the detach, while the volume still counts among its instance's.
    let device = device_of(ctx, &vol).await?;
    let v = ctx
        .ctl
        .detach_volume(&ctx.scope, &vol.id)
        .await
        .map_err(vol_err)?;
    let mut x = Xml::new();
    x.response("DetachVolume", &ctx.request_id, |x| {
        render::attachment(x, &v, &device, None)
    });
    Ok(x.finish())
}

pub async fn delete(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let vid = p.required("VolumeId")?;
    let dry = p.dry_run()?;
    p.finish()?;
    let vol = own_volume(ctx, &vid).await?;
    if let Some(i) = &vol.instance_id {
        return Err(Ec2Error::VolumeInUse(format!(
            "Volume {} is currently attached to {i}",
            vol.id
        )));
    }
    if vol.state == "creating" {
        return Err(Ec2Error::IncorrectState(format!(
            "Volume '{}' is in the 'creating' state.",
            vol.id
        )));
    }
    if dry {
        return Err(ctx.dry_run("DeleteVolume"));
    }
    match ctx.ctl.delete_volume(&ctx.scope, &vol.id).await {
        Ok(()) => {}
        Err(OpError::IncorrectState(m)) => {
            let now = own_volume(ctx, &vid).await?;
            return Err(match &now.instance_id {
                Some(i) => {
                    Ec2Error::VolumeInUse(format!("Volume {} is currently attached to {i}", now.id))
                }
                None => Ec2Error::IncorrectState(m),
            });
        }
        Err(e) => return Err(vol_err(e)),
    }
    drop_tags(ctx, &vol.id).await;
    let mut x = Xml::new();
    x.response("DeleteVolume", &ctx.request_id, |x| x.bool("return", true));
    Ok(x.finish())
}

pub async fn modify(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let (vid, size_gib) = parse::modify_volume(&mut p)?;
    let dry = p.dry_run()?;
    p.finish()?;
    let vol = own_volume(ctx, &vid).await?;
    let target = size_gib * GIB;
    let original = render::gib(vol.size_bytes);
    if target < vol.size_bytes {
        return Err(Ec2Error::InvalidParameterValue(format!(
            "New size cannot be smaller than existing size: volume '{}' has {original} GiB \
             (copy it into a smaller volume to shrink it)",
            vol.id
        )));
    }
    if target == vol.size_bytes {
        return Err(Ec2Error::InvalidParameterValue(format!(
            "Volume '{}' already has {size_gib} GiB: the modification changes nothing",
            vol.id
        )));
    }
    if !matches!(vol.state.as_str(), "available" | "in-use") {
        return Err(Ec2Error::IncorrectState(format!(
            "Volume '{}' is in the '{}' state.",
            vol.id, vol.state
        )));
    }
    if dry {
        return Err(ctx.dry_run("ModifyVolume"));
    }
    let at = chrono::Utc::now();
    let req = ResizeVolume { size_bytes: target };
    ctx.ctl
        .resize_volume(&ctx.scope, &vol.id, &req)
        .await
        .map_err(vol_err)?;
    let mut x = Xml::new();
    x.response("ModifyVolume", &ctx.request_id, |x| {
        x.elem("volumeModification", |x| {
            render::modification(x, &vol.id, original, size_gib, at)
        })
    });
    Ok(x.finish())
}
