//! Regions, availability zones (kumo sites), account attributes, instance types and tags.

use std::collections::BTreeMap;

use kumo_store::TagRow;
use kumo_types::id::{is_id, IdKind};

use crate::error::Ec2Error;
use crate::filter::{check_names, matches_all};
use crate::params::{check_tag, Params};
use crate::xml::Xml;
use crate::{images, instances, page, Ctx, MAX_INSTANCES};

pub async fn regions(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let names = p.list("RegionName")?;
    let _ = p.bool("AllRegions")?;
    let filters = p.filters()?;
    let dry = p.dry_run()?;
    p.finish()?;
    check_names(
        &filters,
        &["region-name", "endpoint", "opt-in-status"],
        false,
    )?;
    if let Some(bad) = names.iter().find(|n| *n != ctx.region) {
        return Err(Ec2Error::InvalidParameterValue(format!(
            "Invalid region: {bad}; this endpoint serves the region {}",
            ctx.region
        )));
    }
    if dry {
        return Err(ctx.dry_run("DescribeRegions"));
    }
    let endpoint = ctx.endpoint.clone();
    let region = ctx.region.to_string();
    let shown = matches_all(&filters, |n| match n {
        "region-name" => vec![region.clone()],
        "endpoint" => vec![endpoint.clone()],
        "opt-in-status" => vec!["opt-in-not-required".into()],
        _ => vec![],
    });
    let rows: Vec<()> = if shown { vec![()] } else { vec![] };
    let mut x = Xml::new();
    x.response("DescribeRegions", &ctx.request_id, |x| {
        x.set("regionInfo", &rows, |x, _| {
            x.leaf("regionName", &region);
            x.leaf("regionEndpoint", &endpoint);
            x.leaf("optInStatus", "opt-in-not-required");
        });
    });
    Ok(x.finish())
}

pub async fn zones(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let names = p.list("ZoneName")?;
    let ids = p.list("ZoneId")?;
    let _ = p.bool("AllAvailabilityZones")?;
    let filters = p.filters()?;
    let dry = p.dry_run()?;
    p.finish()?;
    const KNOWN: &[&str] = &[
        "zone-name",
        "zone-id",
        "state",
        "region-name",
        "zone-type",
        "group-name",
        "opt-in-status",
    ];
    check_names(&filters, KNOWN, false)?;
    if dry {
        return Err(ctx.dry_run("DescribeAvailabilityZones"));
    }
    // site → any host up?
    let mut sites: BTreeMap<String, bool> = BTreeMap::new();
    for h in ctx.ctl.store.hosts().await? {
        let up = sites.entry(h.site.clone()).or_insert(false);
        *up |= h.state == "up";
    }
    for n in names.iter().chain(ids.iter()) {
        if !sites.contains_key(n) {
            return Err(Ec2Error::InvalidParameterValue(format!(
                "The zone '{n}' does not exist in region {}",
                ctx.region
            )));
        }
    }
    let region = ctx.region.to_string();
    let zones: Vec<(String, &'static str)> = sites
        .into_iter()
        .filter(|(s, _)| {
            (names.is_empty() && ids.is_empty()) || names.contains(s) || ids.contains(s)
        })
        .map(|(s, up)| (s, if up { "available" } else { "impaired" }))
        .filter(|(s, state)| {
            matches_all(&filters, |n| match n {
                "zone-name" | "zone-id" => vec![s.clone()],
                "state" => vec![state.to_string()],
                "region-name" | "group-name" => vec![region.clone()],
                "zone-type" => vec!["availability-zone".into()],
                "opt-in-status" => vec!["opt-in-not-required".into()],
                _ => vec![],
            })
        })
        .collect();
    let mut x = Xml::new();
    x.response("DescribeAvailabilityZones", &ctx.request_id, |x| {
        x.set("availabilityZoneInfo", &zones, |x, (site, state)| {
            x.leaf("optInStatus", "opt-in-not-required");
            x.empty("messageSet");
            x.leaf("regionName", &region);
            x.leaf("zoneName", site);
            x.leaf("zoneId", site);
            x.leaf("groupName", &region);
            x.leaf("networkBorderGroup", &region);
            x.leaf("zoneType", "availability-zone");
            x.leaf("zoneState", state);
        });
    });
    Ok(x.finish())
}

pub async fn account_attributes(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let names = p.list("AttributeName")?;
    let dry = p.dry_run()?;
    p.finish()?;
    let max = MAX_INSTANCES.to_string();
    let all: Vec<(&str, Vec<&str>)> = vec![
        ("supported-platforms", vec!["VPC"]),
        ("default-vpc", vec!["none"]),
        ("max-instances", vec![max.as_str()]),
        ("vpc-max-security-groups-per-interface", vec!["5"]),
        ("max-elastic-ips", vec!["0"]),
        ("vpc-max-elastic-ips", vec!["0"]),
    ];
    if let Some(bad) = names.iter().find(|n| !all.iter().any(|(a, _)| a == n)) {
        return Err(Ec2Error::InvalidParameterValue(format!(
            "Value ({bad}) for parameter attributeName is invalid. Unknown attribute."
        )));
    }
    if dry {
        return Err(ctx.dry_run("DescribeAccountAttributes"));
    }
    let shown: Vec<&(&str, Vec<&str>)> = all
        .iter()
        .filter(|(a, _)| names.is_empty() || names.iter().any(|n| n == a))
        .collect();
    let mut x = Xml::new();
    x.response("DescribeAccountAttributes", &ctx.request_id, |x| {
        x.set("accountAttributeSet", &shown, |x, (name, values)| {
            x.leaf("attributeName", name);
            x.set("attributeValueSet", values, |x, v| {
                x.leaf("attributeValue", v)
            });
        });
    });
    Ok(x.finish())
}

pub async fn instance_types(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let names = p.list("InstanceType")?;
    let filters = p.filters()?;
    let max = p.int_in("MaxResults", 5, 100)?;
    let token = p.string("NextToken");
    let _ = p.bool("IncludeUnsupportedInRegion")?;
    let dry = p.dry_run()?;
    p.finish()?;
    const KNOWN: &[&str] = &[
        "instance-type",
        "vcpu-info.default-vcpus",
        "memory-info.size-in-mib",
        "current-generation",
        "processor-info.supported-architecture",
        "bare-metal",
        "hypervisor",
    ];
    check_names(&filters, KNOWN, false)?;
    if dry {
        return Err(ctx.dry_run("DescribeInstanceTypes"));
    }
    let mut types = ctx.ctl.store.instance_types().await?;
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !types.iter().any(|t| &t.name == *n))
        .collect();
    if !missing.is_empty() {
        return Err(Ec2Error::InvalidInstanceType(format!(
            "The following supplied instance types do not exist: [{}]",
            missing
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    if !names.is_empty() {
        types.retain(|t| names.contains(&t.name));
    }
    types.retain(|t| {
        matches_all(&filters, |n| match n {
            "instance-type" => vec![t.name.clone()],
            "vcpu-info.default-vcpus" => vec![t.vcpus.to_string()],
            "memory-info.size-in-mib" => vec![t.memory_mib.to_string()],
            "current-generation" => vec!["true".into()],
            "processor-info.supported-architecture" => vec!["x86_64".into()],
            "bare-metal" => vec!["false".into()],
            "hypervisor" => vec!["kvm".into()],
            _ => vec![],
        })
    });
    types.sort_by(|a, b| a.name.cmp(&b.name));
    let (types, next) = page::page(types, |t| t.name.clone(), token.as_deref(), max)?;
    let mut x = Xml::new();
    x.response("DescribeInstanceTypes", &ctx.request_id, |x| {
        x.set("instanceTypeSet", &types, |x, t| {
            x.leaf("instanceType", &t.name);
            x.bool("currentGeneration", true);
            x.bool("freeTierEligible", false);
            x.set("supportedUsageClasses", &["on-demand"], |x, v| {
                x.text_item(v)
            });
            x.set("supportedRootDeviceTypes", &["ebs"], |x, v| x.text_item(v));
            x.set("supportedVirtualizationTypes", &["hvm"], |x, v| {
                x.text_item(v)
            });
            x.bool("bareMetal", false);
            x.elem("processorInfo", |x| {
                x.set("supportedArchitectures", &["x86_64"], |x, v| x.text_item(v));
            });
            x.elem("vCpuInfo", |x| {
                x.num("defaultVCpus", t.vcpus);
                x.num("defaultCores", t.vcpus);
                x.num("defaultThreadsPerCore", 1);
            });
            x.elem("memoryInfo", |x| x.num("sizeInMiB", t.memory_mib));
            x.bool("instanceStorageSupported", false);
            x.elem("ebsInfo", |x| {
                x.leaf("ebsOptimizedSupport", "unsupported");
                x.leaf("encryptionSupport", "unsupported");
                x.leaf("nvmeSupport", "unsupported");
            });
            x.elem("networkInfo", |x| {
                x.leaf("networkPerformance", "Moderate");
                x.num("maximumNetworkInterfaces", 1);
                x.num("ipv4AddressesPerInterface", 1);
                x.num("ipv6AddressesPerInterface", 0);
                x.bool("ipv6Supported", false);
                x.leaf("enaSupport", "unsupported");
                x.bool("efaSupported", false);
            });
            x.elem("placementGroupInfo", |x| x.empty("supportedStrategies"));
            x.bool("hibernationSupported", false);
            x.bool("burstablePerformanceSupported", false);
            x.bool("dedicatedHostsSupported", false);
            x.bool("autoRecoverySupported", false);
            x.set("supportedBootModes", &["legacy-bios"], |x, v| {
                x.text_item(v)
            });
        });
        x.opt("nextToken", next.as_deref());
    });
    Ok(x.finish())
}

/// The project of a resource the caller may tag, and its EC2 resource type.
async fn taggable(ctx: &Ctx<'_>, id: &str) -> Result<(String, &'static str), Ec2Error> {
    if id.starts_with("i-") {
        return Ok((instances::instance_project(ctx, id).await?, "instance"));
    }
    if images::is_image(id) {
        return Ok((images::owned_image(ctx, id).await?.project_id, "image"));
    }
    let prefix = id.split('-').next().unwrap_or("");
    if is_id(IdKind::Network, id)
        || matches!(
            prefix,
            "vol" | "snap" | "sg" | "subnet" | "eni" | "eipalloc" | "key" | "pg"
        )
    {
        return Err(Ec2Error::UnsupportedOperation(format!(
            "Tagging {id} is not available in kumo yet"
        )));
    }
    Err(Ec2Error::InvalidId(format!("The ID '{id}' is not valid")))
}

fn resource_ids(p: &mut Params) -> Result<Vec<String>, Ec2Error> {
    let ids = p.list("ResourceId")?;
    if ids.is_empty() {
        return Err(Ec2Error::MissingParameter(
            "The request must contain the parameter ResourceId".into(),
        ));
    }
    Ok(ids)
}

pub async fn create_tags(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let ids = resource_ids(&mut p)?;
    let tags = p.tags("Tag")?;
    let dry = p.dry_run()?;
    p.finish()?;
    if tags.is_empty() {
        return Err(Ec2Error::MissingParameter(
            "The request must contain the parameter Tag".into(),
        ));
    }
    let tags: Vec<(String, String)> = tags
        .into_iter()
        .map(|(k, v)| (k, v.unwrap_or_default()))
        .collect();
    for (k, v) in &tags {
        check_tag(k, v)?;
    }
    let mut by_project: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for id in &ids {
        let (project, rtype) = taggable(ctx, id).await?;
        by_project
            .entry(project)
            .or_default()
            .push((id.clone(), rtype.to_string()));
    }
    if dry {
        return Err(ctx.dry_run("CreateTags"));
    }
    for (project, resources) in by_project {
        ctx.ctl.store.put_tags(&project, &resources, &tags).await?;
    }
    let mut x = Xml::new();
    x.response("CreateTags", &ctx.request_id, |x| x.bool("return", true));
    Ok(x.finish())
}

pub async fn delete_tags(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let ids = resource_ids(&mut p)?;
    let tags = p.tags("Tag")?;
    let dry = p.dry_run()?;
    p.finish()?;
    for id in &ids {
        taggable(ctx, id).await?;
    }
    if dry {
        return Err(ctx.dry_run("DeleteTags"));
    }
    ctx.ctl.store.delete_tags(&ctx.scope, &ids, &tags).await?;
    let mut x = Xml::new();
    x.response("DeleteTags", &ctx.request_id, |x| x.bool("return", true));
    Ok(x.finish())
}

pub async fn describe_tags(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let filters = p.filters()?;
    let max = p.int_in("MaxResults", 5, 1000)?;
    let token = p.string("NextToken");
    let dry = p.dry_run()?;
    p.finish()?;
    check_names(
        &filters,
        &["key", "value", "resource-id", "resource-type"],
        false,
    )?;
    if dry {
        return Err(ctx.dry_run("DescribeTags"));
    }
    let mut rows = ctx.ctl.store.tags(&ctx.scope, ctx.cutoff()).await?;
    rows.retain(|t: &TagRow| {
        matches_all(&filters, |n| match n {
            "key" => vec![t.key.clone()],
            "value" => vec![t.value.clone()],
            "resource-id" => vec![t.resource_id.clone()],
            "resource-type" => vec![t.resource_type.clone()],
            _ => vec![],
        })
    });
    let (rows, next) = page::page(
        rows,
        |t| format!("{}\u{0}{}", t.resource_id, t.key),
        token.as_deref(),
        max,
    )?;
    let mut x = Xml::new();
    x.response("DescribeTags", &ctx.request_id, |x| {
        x.set("tagSet", &rows, |x, t| {
            x.leaf("resourceId", &t.resource_id);
            x.leaf("resourceType", &t.resource_type);
            x.leaf("key", &t.key);
            x.leaf("value", &t.value);
        });
        x.opt("nextToken", next.as_deref());
    });
    Ok(x.finish())
}
