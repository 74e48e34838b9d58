//! EC2 snapshot actions over kumo's snapshots. A snapshot of an attached volume is taken live
//! (the guest keeps running); kumo answers when it is made, so it shows as completed at once.
//! Snapshots of instances' root disks (made natively) are listed too, with EC2's `vol-ffffffff`
//! as their volume; volumes can be made from either kind.

use kumo_controller::OpError;
use kumo_store::{SnapshotRow, StoreError};
use kumo_types::storage::CreateSnapshot;

use super::parse::{self, check_snapshot_id, MAX_DESCRIPTION};
use super::render::{self, SNAPSHOT_FILTERS};
use super::{drop_tags, own_volume, storage_tags, vol_err};
use crate::error::{not_found, Ec2Error};
use crate::filter::{check_names, matches_all};
use crate::params::Params;
use crate::xml::Xml;
use crate::{page, Ctx};

/// The caller's snapshot with this id.
pub(super) async fn own_snapshot(ctx: &Ctx<'_>, id: &str) -> Result<SnapshotRow, Ec2Error> {
    check_snapshot_id(id)?;
    match ctx.ctl.store.snapshot(&ctx.scope, id).await {
        Ok(s) if s.id == id => Ok(s),
        Ok(_) | Err(StoreError::NotFound { .. }) => Err(not_found("snapshot", id)),
        Err(e) => Err(e.into()),
    }
}

fn in_use(id: &str, by: &[String]) -> Ec2Error {
    Ec2Error::SnapshotInUse(format!(
        "The snapshot {id} is currently in use by {}",
        by.join(", ")
    ))
}

/// Which owners' snapshots `Owner.N` asks for: kumo has no public snapshots, so "amazon" and
/// the like name nobody.
fn owned_by(owners: &[String], project: &str, me: &str) -> bool {
    owners.is_empty()
        || owners.iter().any(|o| match o.as_str() {
            "self" => project == me,
            other => other == project,
        })
}

/// `RestorableBy.N`: a kumo snapshot is restorable by its own project only.
fn restorable_by(users: &[String], project: &str, me: &str) -> bool {
    users.is_empty()
        || users.iter().any(|u| match u.as_str() {
            "self" => project == me,
            "all" => false,
            other => other == project,
        })
}

pub async fn create_snapshot(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let vid = p.required("VolumeId")?;
    let description = p.string("Description");
    let tags = parse::spec_tags(&p.tag_specs()?, "snapshot")?;
    match p.string("Location").as_deref() {
        None | Some("regional") => {}
        Some(l) => {
            return Err(Ec2Error::UnsupportedOperation(format!(
            "Snapshot location {l} is not supported by kumo (snapshots stay in their storage pool)"
        )))
        }
    }
    if p.take_prefix("OutpostArn") {
        return Err(Ec2Error::UnsupportedOperation(
            "The parameter OutpostArn is not supported by kumo".into(),
        ));
    }
    let dry = p.dry_run()?;
    p.finish()?;
    if description
        .as_ref()
        .is_some_and(|d| d.chars().count() > MAX_DESCRIPTION)
    {
        return Err(Ec2Error::InvalidParameterValue(format!(
            "A snapshot description has at most {MAX_DESCRIPTION} characters"
        )));
    }
    let vol = own_volume(ctx, &vid).await?;
    let changing = matches!(vol.attach_state.as_deref(), Some("attaching" | "detaching"));
    if !matches!(vol.state.as_str(), "available" | "in-use") || changing {
        return Err(Ec2Error::IncorrectState(format!(
            "Volume '{}' is in the '{}' state{}; try again when it is available or attached.",
            vol.id,
            vol.state,
            vol.attach_state
                .as_deref()
                .filter(|_| changing)
                .map(|a| format!(" ({a})"))
                .unwrap_or_default()
        )));
    }
    if dry {
        return Err(ctx.dry_run("CreateSnapshot"));
    }
    let req = CreateSnapshot {
        instance: None,
        volume: Some(vol.id.clone()),
        description,
    };
    let snap = ctx
        .ctl
        .create_snapshot(&ctx.scope, &req)
        .await
        .map_err(vol_err)?;
    if !tags.is_empty() {
        let resources = [(snap.id.clone(), "snapshot".to_string())];
        if let Err(e) = ctx
            .ctl
            .store
            .put_tags(&ctx.scope.project_id, &resources, &tags)
            .await
        {
            if let Err(e2) = ctx.ctl.delete_snapshot(&ctx.scope, &snap.id).await {
                tracing::warn!(snapshot = %snap.id, error = %e2, "could not delete a snapshot whose tags failed");
            }
            return Err(e.into());
        }
    }
    let mut x = Xml::new();
    x.response("CreateSnapshot", &ctx.request_id, |x| {
        render::snapshot(x, &snap, &tags)
    });
    Ok(x.finish())
}

pub async fn describe_snapshots(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let ids = p.list("SnapshotId")?;
    let owners = p.list("Owner")?;
    let restorable = p.list("RestorableBy")?;
    let filters = p.filters()?;
    let max = p.int_in("MaxResults", 5, 1000)?;
    let token = p.string("NextToken");
    let dry = p.dry_run()?;
    p.finish()?;
    for id in &ids {
        check_snapshot_id(id)?;
    }
    if max.is_some() && !ids.is_empty() {
        return Err(Ec2Error::InvalidParameterCombination(
            "The parameter snapshotSet cannot be used with the parameter maxResults".into(),
        ));
    }
    check_names(&filters, SNAPSHOT_FILTERS, true)?;
    if dry {
        return Err(ctx.dry_run("DescribeSnapshots"));
    }
    let all = ctx.ctl.store.snapshots(&ctx.scope).await?;
    let mut missing: Vec<&String> = ids
        .iter()
        .filter(|id| !all.iter().any(|s| &s.id == *id))
        .collect();
    missing.dedup();
    match missing.as_slice() {
        [] => {}
        [one] => return Err(not_found("snapshot", one)),
        many => {
            return Err(Ec2Error::SnapshotNotFound(format!(
                "The snapshots '{}' do not exist.",
                many.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    }
    let tags = storage_tags(ctx).await?;
    let none = Vec::new();
    let tags_of = |id: &str| tags.get(id).unwrap_or(&none);
    let me = ctx.scope.project_id.as_str();
    let mut shown: Vec<SnapshotRow> = all
        .into_iter()
        .filter(|s| ids.is_empty() || ids.contains(&s.id))
        .filter(|s| owned_by(&owners, &s.project_id, me))
        .filter(|s| restorable_by(&restorable, &s.project_id, me))
        .filter(|s| matches_all(&filters, |n| render::snapshot_values(s, tags_of(&s.id), n)))
        .collect();
    shown.sort_by(|a, b| a.id.cmp(&b.id));
    let (shown, next) = page::page(shown, |s| s.id.clone(), token.as_deref(), max)?;
    let mut x = Xml::new();
    x.response("DescribeSnapshots", &ctx.request_id, |x| {
        x.set("snapshotSet", &shown, |x, s| {
            render::snapshot(x, s, tags_of(&s.id))
        });
        x.opt("nextToken", next.as_deref());
    });
    Ok(x.finish())
}

pub async fn delete_snapshot(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let sid = p.required("SnapshotId")?;
    let dry = p.dry_run()?;
    p.finish()?;
    let snap = own_snapshot(ctx, &sid).await?;
    let deps = ctx.ctl.store.snapshot_dependents(&snap.id).await?;
    if !deps.is_empty() {
        return Err(in_use(&snap.id, &deps));
    }
    if dry {
        return Err(ctx.dry_run("DeleteSnapshot"));
    }
    match ctx.ctl.delete_snapshot(&ctx.scope, &snap.id).await {
        Ok(()) => {}
        // Something was made from it since the check above.
        Err(OpError::IncorrectState(m)) => {
            let deps = ctx.ctl.store.snapshot_dependents(&snap.id).await?;
            return Err(if deps.is_empty() {
                Ec2Error::IncorrectState(m)
            } else {
                in_use(&snap.id, &deps)
            });
        }
        Err(e) => return Err(vol_err(e)),
    }
    drop_tags(ctx, &snap.id).await;
    let mut x = Xml::new();
    x.response("DeleteSnapshot", &ctx.request_id, |x| {
        x.bool("return", true)
    });
    Ok(x.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_and_restorers() {
        let none: Vec<String> = vec![];
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(owned_by(&none, "proj-1", "proj-1"));
        assert!(owned_by(&v(&["self"]), "proj-1", "proj-1"));
        assert!(!owned_by(&v(&["self"]), "proj-2", "proj-1"));
        assert!(owned_by(&v(&["proj-2"]), "proj-2", "proj-1"));
        assert!(!owned_by(&v(&["amazon"]), "proj-1", "proj-1"));
        assert!(restorable_by(&none, "proj-1", "proj-1"));
        assert!(restorable_by(&v(&["self"]), "proj-1", "proj-1"));
        assert!(!restorable_by(&v(&["all"]), "proj-1", "proj-1"));
        assert!(!restorable_by(&v(&["proj-9"]), "proj-1", "proj-1"));
    }

    #[test]
    fn in_use_names_the_dependents() {
        let e = in_use("snap-1", &["vol-1".to_string(), "i-2".to_string()]);
        assert_eq!(e.code(), "InvalidSnapshot.InUse");
        assert_eq!(
            e.to_string(),
            "The snapshot snap-1 is currently in use by vol-1, i-2"
        );
    }
}
