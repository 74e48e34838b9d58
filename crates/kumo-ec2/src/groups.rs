//! Placement groups: EC2's `spread` strategy, one member per host (kumo's native API also
//! allows several per host and spreading over storage pools).

use kumo_controller::OpError;
use kumo_store::{PlacementGroupRow, StoreError};

use crate::error::Ec2Error;
use crate::filter::{check_names, matches_all};
use crate::params::Params;
use crate::xml::Xml;
use crate::Ctx;

fn render(x: &mut Xml, g: &PlacementGroupRow) {
    x.leaf("groupName", &g.name);
    x.leaf("state", "available");
    x.leaf("strategy", &g.strategy);
    x.leaf("groupId", &g.id);
    x.leaf("spreadLevel", "host");
    x.empty("tagSet");
}

pub async fn create(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let name = p.required("GroupName")?;
    let strategy = p.string("Strategy").unwrap_or_else(|| "spread".into());
    if let Some(level) = p.string("SpreadLevel") {
        if level != "host" {
            return Err(Ec2Error::UnsupportedOperation(format!(
                "SpreadLevel {level} is not supported by kumo; groups spread over hosts"
            )));
        }
    }
    let dry = p.dry_run()?;
    p.finish()?;
    if strategy != "spread" {
        return Err(Ec2Error::UnsupportedOperation(format!(
            "placement strategy {strategy} is not supported by kumo; use spread"
        )));
    }
    if dry {
        return Err(ctx.dry_run("CreatePlacementGroup"));
    }
    let g = match ctx
        .ctl
        .create_placement_group(&ctx.scope, &name, "spread", 1, false)
        .await
    {
        Ok(g) => g,
        Err(OpError::Conflict(_)) => {
            return Err(Ec2Error::PlacementGroupDuplicate(format!(
                "The Placement Group '{name}' already exists."
            )))
        }
        Err(OpError::Invalid(m)) => return Err(Ec2Error::InvalidParameterValue(m)),
        Err(e) => return Err(Ec2Error::from_op(e)),
    };
    let mut x = Xml::new();
    x.response("CreatePlacementGroup", &ctx.request_id, |x| {
        x.elem("placementGroup", |x| render(x, &g))
    });
    Ok(x.finish())
}

pub async fn describe(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let names = p.list("GroupName")?;
    let ids = p.list("GroupId")?;
    let filters = p.filters()?;
    let dry = p.dry_run()?;
    p.finish()?;
    check_names(
        &filters,
        &[
            "group-name",
            "group-id",
            "state",
            "strategy",
            "spread-level",
        ],
        false,
    )?;
    if dry {
        return Err(ctx.dry_run("DescribePlacementGroups"));
    }
    let all = ctx
        .ctl
        .placement_groups(&ctx.scope)
        .await
        .map_err(Ec2Error::from_op)?;
    for n in names.iter().chain(&ids) {
        if !all.iter().any(|g| &g.name == n || &g.id == n) {
            return Err(Ec2Error::PlacementGroupUnknown(format!(
                "The Placement Group '{n}' is unknown."
            )));
        }
    }
    let shown: Vec<&PlacementGroupRow> = all
        .iter()
        .filter(|g| names.is_empty() || names.contains(&g.name))
        .filter(|g| ids.is_empty() || ids.contains(&g.id))
        .filter(|g| {
            matches_all(&filters, |f| match f {
                "group-name" => vec![g.name.clone()],
                "group-id" => vec![g.id.clone()],
                "state" => vec!["available".into()],
                "strategy" => vec![g.strategy.clone()],
                "spread-level" => vec!["host".into()],
                _ => vec![],
            })
        })
        .collect();
    let mut x = Xml::new();
    x.response("DescribePlacementGroups", &ctx.request_id, |x| {
        x.set("placementGroupSet", &shown, |x, g| render(x, g))
    });
    Ok(x.finish())
}

pub async fn delete(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let name = p.required("GroupName")?;
    let dry = p.dry_run()?;
    p.finish()?;
    let g = match ctx.ctl.store.placement_group(&ctx.scope, &name).await {
        Ok(g) if g.name == name => g,
        Ok(_) | Err(StoreError::NotFound { .. }) => {
            return Err(Ec2Error::PlacementGroupUnknown(format!(
                "The Placement Group '{name}' is unknown."
            )))
        }
        Err(e) => return Err(e.into()),
    };
    if dry {
        return Err(ctx.dry_run("DeletePlacementGroup"));
    }
    match ctx.ctl.delete_placement_group(&ctx.scope, &g.id).await {
        Ok(()) => {}
        Err(OpError::IncorrectState(m)) => return Err(Ec2Error::PlacementGroupInUse(m)),
        Err(e) => return Err(Ec2Error::from_op(e)),
    }
    let mut x = Xml::new();
    x.response("DeletePlacementGroup", &ctx.request_id, |x| {
        x.bool("return", true)
    });
    Ok(x.finish())
}
