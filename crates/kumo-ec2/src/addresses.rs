//! EC2 elastic IP (and VPC) actions. Elastic IPs are kumo's addresses (`eipalloc-…`); VPCs are
//! kumo's networks (`vpc-…`). kumo has no subnets: a network is its own single subnet, so an
//! instance's `subnetId` is its network's id and RunInstances takes a network id as `SubnetId`.

use kumo_controller::OpError;
use kumo_store::{AddressRow, NetworkView, NewNetwork, StoreError};
use kumo_types::id::{is_id, IdKind};
use kumo_types::InstanceState;
use rand::Rng;

use crate::error::Ec2Error;
use crate::filter::{check_names, matches_all};
use crate::params::Params;
use crate::render::derived_id;
use crate::xml::Xml;
use crate::{page, Ctx};

const ADDRESS_FILTERS: &[&str] = &[
    "allocation-id",
    "association-id",
    "domain",
    "instance-id",
    "public-ip",
    "private-ip-address",
    "network-interface-id",
    "network-border-group",
];

const VPC_FILTERS: &[&str] = &[
    "cidr",
    "cidr-block-association.cidr-block",
    "vpc-id",
    "state",
    "is-default",
    "owner-id",
    "dhcp-options-id",
];

fn allocation_not_found(id: &str) -> Ec2Error {
    Ec2Error::AllocationNotFound(format!("The allocation ID '{id}' does not exist"))
}

fn address_not_found(ip: &str) -> Ec2Error {
    Ec2Error::AddressNotFound(format!("Address '{ip}' not found."))
}

fn association_not_found(id: &str) -> Ec2Error {
    Ec2Error::AssociationNotFound(format!("The association ID '{id}' does not exist"))
}

fn vpc_not_found(id: &str) -> Ec2Error {
    Ec2Error::VpcNotFound(format!("The vpc ID '{id}' does not exist"))
}

/// Refuse parameters kumo has no capability for, rather than ignoring them.
fn refuse(p: &mut Params, names: &[&str]) -> Result<(), Ec2Error> {
    for n in names {
        if p.take_prefix(n) {
            return Err(Ec2Error::UnsupportedOperation(format!(
                "The parameter {n} is not supported by kumo"
            )));
        }
    }
    Ok(())
}

/// Exactly one of two parameters that name the same thing.
fn one_of(p: &mut Params, a: &str, b: &str) -> Result<(Option<String>, Option<String>), Ec2Error> {
    let (x, y) = (p.string(a), p.string(b));
    match (&x, &y) {
        (Some(_), Some(_)) => Err(Ec2Error::InvalidParameterCombination(format!(
            "Only one of {a} and {b} may be given"
        ))),
        (None, None) => Err(Ec2Error::MissingParameter(format!(
            "The request must contain the parameter {a} or {b}"
        ))),
        (Some(v), _) | (_, Some(v)) if v.is_empty() => {
            Err(Ec2Error::InvalidParameterValue(format!(
                "The parameter {} must not be empty",
                if x.is_some() { a } else { b }
            )))
        }
        _ => Ok((x, y)),
    }
}

/// The caller's address named by allocation id or public IP, with EC2's NotFound codes.
async fn by_allocation_or_ip(
    ctx: &Ctx<'_>,
    alloc: Option<&str>,
    ip: Option<&str>,
) -> Result<AddressRow, Ec2Error> {
    let key = alloc.or(ip).unwrap_or_default();
    let missing = || match alloc {
        Some(a) => allocation_not_found(a),
        None => address_not_found(key),
    };
    match ctx.ctl.address(&ctx.scope, key).await {
        Ok(a) if Some(a.id.as_str()) == alloc || Some(a.public_ip.as_str()) == ip => Ok(a),
        Ok(_) | Err(OpError::NotFound { .. }) => Err(missing()),
        Err(e) => Err(e.into()),
    }
}

fn render_address(x: &mut Xml, a: &AddressRow, region: &str) {
    x.leaf("publicIp", &a.public_ip);
    x.leaf("allocationId", &a.id);
    x.leaf("domain", "vpc");
    if let Some(i) = &a.instance_id {
        x.leaf("instanceId", i);
        x.opt("associationId", a.association_id.as_deref());
        x.leaf("networkInterfaceId", &derived_id("eni", i));
        x.leaf("networkInterfaceOwnerId", &a.project_id);
        x.opt("privateIpAddress", a.private_ip.as_deref());
    }
    x.empty("tagSet");
    x.leaf("publicIpv4Pool", "kumo");
    x.leaf("networkBorderGroup", region);
}

fn address_values(a: &AddressRow, region: &str, name: &str) -> Vec<String> {
    let opt = |v: &Option<String>| v.clone().into_iter().collect::<Vec<_>>();
    match name {
        "allocation-id" => vec![a.id.clone()],
        "association-id" => opt(&a.association_id),
        "domain" => vec!["vpc".into()],
        "instance-id" => opt(&a.instance_id),
        "public-ip" => vec![a.public_ip.clone()],
        "private-ip-address" => opt(&a.private_ip),
        "network-interface-id" => a.instance_id.iter().map(|i| derived_id("eni", i)).collect(),
        "network-border-group" => vec![region.to_string()],
        _ => vec![],
    }
}

pub async fn allocate(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    match p.string("Domain").as_deref() {
        None | Some("vpc") => {}
        Some("standard") => {
            return Err(Ec2Error::UnsupportedOperation(
                "EC2-Classic addresses (Domain=standard) are not supported by kumo; use Domain=vpc"
                    .into(),
            ))
        }
        Some(d) => {
            return Err(Ec2Error::InvalidParameterValue(format!(
                "Invalid value '{d}' for Domain: expected vpc"
            )))
        }
    }
    if let Some(g) = p.string("NetworkBorderGroup") {
        if g != ctx.region {
            return Err(Ec2Error::InvalidParameterValue(format!(
                "Invalid network border group '{g}': this region's is '{}'",
                ctx.region
            )));
        }
    }
    refuse(
        &mut p,
        &[
            "Address",
            "PublicIpv4Pool",
            "CustomerOwnedIpv4Pool",
            "IpamPoolId",
            "TagSpecification",
        ],
    )?;
    let dry = p.dry_run()?;
    p.finish()?;
    if dry {
        return Err(ctx.dry_run("AllocateAddress"));
    }
    let a = match ctx.ctl.allocate_address(&ctx.scope).await {
        Ok(a) => a,
        // No pool or no free address in it: either way the limit is reached.
        Err(OpError::Conflict(m)) => return Err(Ec2Error::AddressLimitExceeded(m)),
        Err(e) => return Err(e.into()),
    };
    let mut x = Xml::new();
    x.response("AllocateAddress", &ctx.request_id, |x| {
        x.leaf("publicIp", &a.public_ip);
        x.leaf("domain", "vpc");
        x.leaf("allocationId", &a.id);
        x.leaf("publicIpv4Pool", "kumo");
        x.leaf("networkBorderGroup", ctx.region);
    });
    Ok(x.finish())
}

pub async fn associate(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let (alloc, ip) = one_of(&mut p, "AllocationId", "PublicIp")?;
    let instance = p.string("InstanceId");
    let private_ip = p.string("PrivateIpAddress");
    let allow = p.bool("AllowReassociation")?.unwrap_or(false);
    refuse(&mut p, &["NetworkInterfaceId"])?;
    let dry = p.dry_run()?;
    p.finish()?;
    let instance = instance.ok_or_else(|| {
        Ec2Error::MissingParameter("The request must contain the parameter InstanceId".into())
    })?;
    if !is_id(IdKind::Instance, &instance) {
        return Err(Ec2Error::InstanceMalformed(format!(
            "Invalid id: \"{instance}\" (expecting \"i-...\")"
        )));
    }
    let a = by_allocation_or_ip(ctx, alloc.as_deref(), ip.as_deref()).await?;
    let i = match ctx.ctl.store.instance_by_id(&ctx.scope, &instance).await {
        Ok(i) => i,
        Err(StoreError::NotFound { .. }) => {
            return Err(crate::error::not_found("instance", &instance))
        }
        Err(e) => return Err(e.into()),
    };
    if matches!(
        i.state,
        InstanceState::Terminated | InstanceState::ShuttingDown
    ) {
        return Err(Ec2Error::IncorrectInstanceState(format!(
            "The instance '{}' is not in a valid state for this operation ({}).",
            i.id, i.state
        )));
    }
    if let Some(want) = &private_ip {
        if *want != i.private_ip {
            return Err(Ec2Error::InvalidParameterValue(format!(
                "The private IP address {want} is not the address of instance {} ({})",
                i.id, i.private_ip
            )));
        }
    }
    if dry {
        return Err(ctx.dry_run("AssociateAddress"));
    }
    let done = match ctx
        .ctl
        .associate_address(&ctx.scope, &a.id, &i.id, allow)
        .await
    {
        Ok(d) => d,
        Err(OpError::Conflict(m)) => return Err(Ec2Error::ResourceAlreadyAssociated(m)),
        Err(OpError::NotFound {
            kind: "instance", ..
        }) => return Err(crate::error::not_found("instance", &instance)),
        Err(OpError::NotFound { .. }) => {
            return Err(match &alloc {
                Some(id) => allocation_not_found(id),
                None => address_not_found(&a.public_ip),
            })
        }
        Err(e) => return Err(e.into()),
    };
    let mut x = Xml::new();
    x.response("AssociateAddress", &ctx.request_id, |x| {
        x.bool("return", true);
        x.opt("associationId", done.association_id.as_deref());
    });
    Ok(x.finish())
}

pub async fn disassociate(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let (assoc, ip) = one_of(&mut p, "AssociationId", "PublicIp")?;
    let dry = p.dry_run()?;
    p.finish()?;
    let a = match &assoc {
        Some(id) => match ctx.ctl.address(&ctx.scope, id).await {
            Ok(a) if a.association_id.as_deref() == Some(id.as_str()) => a,
            Ok(_) | Err(OpError::NotFound { .. }) => return Err(association_not_found(id)),
            Err(e) => return Err(e.into()),
        },
        None => by_allocation_or_ip(ctx, None, ip.as_deref()).await?,
    };
    if dry {
        return Err(ctx.dry_run("DisassociateAddress"));
    }
    ctx.ctl.disassociate_address(&ctx.scope, &a.id).await?;
    let mut x = Xml::new();
    x.response("DisassociateAddress", &ctx.request_id, |x| {
        x.bool("return", true)
    });
    Ok(x.finish())
}

pub async fn release(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let (alloc, ip) = one_of(&mut p, "AllocationId", "PublicIp")?;
    if let Some(g) = p.string("NetworkBorderGroup") {
        if g != ctx.region {
            return Err(Ec2Error::InvalidParameterValue(format!(
                "Invalid network border group '{g}': this region's is '{}'",
                ctx.region
            )));
        }
    }
    let dry = p.dry_run()?;
    p.finish()?;
    let a = by_allocation_or_ip(ctx, alloc.as_deref(), ip.as_deref()).await?;
    if dry {
        return Err(ctx.dry_run("ReleaseAddress"));
    }
    match ctx.ctl.release_address(&ctx.scope, &a.id).await {
        Ok(_) => {}
        Err(OpError::Conflict(m)) => return Err(Ec2Error::AddressInUse(m)),
        Err(OpError::NotFound { .. }) => {
            return Err(match &alloc {
                Some(id) => allocation_not_found(id),
                None => address_not_found(&a.public_ip),
            })
        }
        Err(e) => return Err(e.into()),
    }
    let mut x = Xml::new();
    x.response("ReleaseAddress", &ctx.request_id, |x| {
        x.bool("return", true)
    });
    Ok(x.finish())
}

pub async fn describe(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let ids = p.list("AllocationId")?;
    let ips = p.list("PublicIp")?;
    let filters = p.filters()?;
    let dry = p.dry_run()?;
    p.finish()?;
    check_names(&filters, ADDRESS_FILTERS, false)?;
    if dry {
        return Err(ctx.dry_run("DescribeAddresses"));
    }
    let all = ctx.ctl.addresses(&ctx.scope).await?;
    if let Some(id) = ids.iter().find(|id| !all.iter().any(|a| &a.id == *id)) {
        return Err(allocation_not_found(id));
    }
    if let Some(ip) = ips
        .iter()
        .find(|ip| !all.iter().any(|a| &a.public_ip == *ip))
    {
        return Err(address_not_found(ip));
    }
    let shown: Vec<&AddressRow> = all
        .iter()
        .filter(|a| ids.is_empty() || ids.contains(&a.id))
        .filter(|a| ips.is_empty() || ips.contains(&a.public_ip))
        .filter(|a| matches_all(&filters, |n| address_values(a, ctx.region, n)))
        .collect();
    let mut x = Xml::new();
    x.response("DescribeAddresses", &ctx.request_id, |x| {
        x.set("addressesSet", &shown, |x, a| {
            render_address(x, a, ctx.region)
        })
    });
    Ok(x.finish())
}

// --- VPCs: kumo's networks ---

fn render_vpc(x: &mut Xml, v: &NetworkView) {
    let n = &v.network;
    x.leaf("vpcId", &n.id);
    x.leaf("ownerId", &n.project_id);
    x.leaf("state", "available");
    x.leaf("cidrBlock", &n.cidr);
    x.elem("cidrBlockAssociationSet", |x| {
        x.elem("item", |x| {
            x.leaf("associationId", &derived_id("vpc-cidr-assoc", &n.id));
            x.leaf("cidrBlock", &n.cidr);
            x.elem("cidrBlockState", |x| x.leaf("state", "associated"));
        })
    });
    match &n.ipv6_cidr {
        Some(v6) => x.elem("ipv6CidrBlockAssociationSet", |x| {
            x.elem("item", |x| {
                x.leaf(
                    "associationId",
                    &derived_id("vpc-cidr-assoc", &format!("{}:ipv6", n.id)),
                );
                x.leaf("ipv6CidrBlock", v6);
                x.elem("ipv6CidrBlockState", |x| x.leaf("state", "associated"));
            })
        }),
        None => x.empty("ipv6CidrBlockAssociationSet"),
    }
    x.leaf("dhcpOptionsId", "default");
    x.leaf("instanceTenancy", "default");
    x.bool("isDefault", n.name == "default");
    x.empty("tagSet");
}

fn vpc_values(v: &NetworkView, name: &str) -> Vec<String> {
    let n = &v.network;
    match name {
        "cidr" | "cidr-block-association.cidr-block" => vec![n.cidr.clone()],
        "vpc-id" => vec![n.id.clone()],
        "state" => vec!["available".into()],
        "is-default" => vec![(n.name == "default").to_string()],
        "owner-id" => vec![n.project_id.clone()],
        "dhcp-options-id" => vec!["default".into()],
        _ => vec![],
    }
}

pub async fn create_vpc(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let cidr = p.required("CidrBlock")?;
    if let Some(t) = p.string("InstanceTenancy") {
        if t != "default" {
            return Err(Ec2Error::UnsupportedOperation(format!(
                "InstanceTenancy {t} is not supported by kumo"
            )));
        }
    }
    if p.bool("AmazonProvidedIpv6CidrBlock")? == Some(true) {
        return Err(Ec2Error::UnsupportedOperation(
            "IPv6 CIDR blocks are not supported by kumo".into(),
        ));
    }
    refuse(
        &mut p,
        &[
            "Ipv6Pool",
            "Ipv6CidrBlock",
            "Ipv4IpamPoolId",
            "Ipv4NetmaskLength",
            "Ipv6IpamPoolId",
            "Ipv6NetmaskLength",
            "Ipv6CidrBlockNetworkBorderGroup",
            "VpcEncryptionControl",
            "TagSpecification",
        ],
    )?;
    let dry = p.dry_run()?;
    p.finish()?;
    if dry {
        return Err(ctx.dry_run("CreateVpc"));
    }
    // EC2 VPCs have no names; kumo's networks do: a generated one, like EC2 instances get.
    let suffix: u32 = rand::thread_rng().gen();
    let new = NewNetwork {
        name: format!("ec2-vpc-{suffix:08x}"),
        cidr: cidr.clone(),
        isolation: None,
        vlan_tag: None,
        ..NewNetwork::default()
    };
    let v = match ctx.ctl.create_network(&ctx.scope, &new).await {
        Ok(v) => v,
        Err(OpError::Invalid(m) | OpError::Conflict(m)) => {
            return Err(Ec2Error::VpcRange(format!(
                "The CIDR '{cidr}' is invalid: {m}"
            )))
        }
        Err(e) => return Err(e.into()),
    };
    let mut x = Xml::new();
    x.response("CreateVpc", &ctx.request_id, |x| {
        x.elem("vpc", |x| render_vpc(x, &v))
    });
    Ok(x.finish())
}

pub async fn describe_vpcs(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let ids = p.list("VpcId")?;
    let filters = p.filters()?;
    let max = p.int_in("MaxResults", 5, 1000)?;
    let token = p.string("NextToken");
    let dry = p.dry_run()?;
    p.finish()?;
    check_names(&filters, VPC_FILTERS, false)?;
    if dry {
        return Err(ctx.dry_run("DescribeVpcs"));
    }
    let all = ctx.ctl.networks(&ctx.scope).await?;
    if let Some(id) = ids
        .iter()
        .find(|id| !all.iter().any(|v| &v.network.id == *id))
    {
        return Err(vpc_not_found(id));
    }
    let mut shown: Vec<NetworkView> = all
        .into_iter()
        .filter(|v| ids.is_empty() || ids.contains(&v.network.id))
        .filter(|v| matches_all(&filters, |n| vpc_values(v, n)))
        .collect();
    shown.sort_by(|a, b| a.network.id.cmp(&b.network.id));
    let (shown, next) = page::page(shown, |v| v.network.id.clone(), token.as_deref(), max)?;
    let mut x = Xml::new();
    x.response("DescribeVpcs", &ctx.request_id, |x| {
        x.set("vpcSet", &shown, render_vpc);
        x.opt("nextToken", next.as_deref());
    });
    Ok(x.finish())
}

pub async fn delete_vpc(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let id = p.required("VpcId")?;
    let dry = p.dry_run()?;
    p.finish()?;
    match ctx.ctl.network(&ctx.scope, &id).await {
        Ok(v) if v.network.id == id => {}
        Ok(_) | Err(OpError::NotFound { .. }) => return Err(vpc_not_found(&id)),
        Err(e) => return Err(e.into()),
    }
    if dry {
        return Err(ctx.dry_run("DeleteVpc"));
    }
    match ctx.ctl.delete_network(&ctx.scope, &id).await {
        Ok(_) => {}
        Err(OpError::IncorrectState(m)) => {
            return Err(Ec2Error::DependencyViolation(format!(
                "The vpc '{id}' has dependencies and cannot be deleted: {m}"
            )))
        }
        Err(OpError::NotFound { .. }) => return Err(vpc_not_found(&id)),
        Err(e) => return Err(e.into()),
    }
    let mut x = Xml::new();
    x.response("DeleteVpc", &ctx.request_id, |x| x.bool("return", true));
    Ok(x.finish())
}

// --- RunInstances' subnet ---

/// The subnet of a launch: `SubnetId`, or `NetworkInterface.1.SubnetId` of the one interface
/// kumo gives an instance (device 0). Other interface settings are refused, not ignored.
pub(crate) fn take_subnet(p: &mut Params) -> Result<Option<String>, Ec2Error> {
    let top = p.string("SubnetId");
    let mut nic = None;
    for (n, fields) in p.indexed("NetworkInterface")? {
        if n != 1 {
            return Err(Ec2Error::UnsupportedOperation(
                "kumo instances have one network interface (NetworkInterface.1)".into(),
            ));
        }
        for (k, v) in fields {
            match k.as_str() {
                "SubnetId" => nic = Some(v),
                "DeviceIndex" if v == "0" => {}
                "DeleteOnTermination" if v.eq_ignore_ascii_case("true") => {}
                "AssociatePublicIpAddress" if v.eq_ignore_ascii_case("false") => {}
                other => {
                    return Err(Ec2Error::UnsupportedOperation(format!(
                        "The parameter NetworkInterface.{n}.{other}={v} is not supported by kumo"
                    )))
                }
            }
        }
    }
    match (top, nic) {
        (Some(_), Some(_)) => Err(Ec2Error::InvalidParameterCombination(
            "Network interfaces and an instance-level subnet ID may not be specified on the same request".into(),
        )),
        (Some(s), None) | (None, Some(s)) => Ok(Some(s)),
        (None, None) => Ok(None),
    }
}

/// The caller's network with this id (kumo's subnets are its networks).
pub(crate) async fn resolve_subnet(ctx: &Ctx<'_>, subnet: &str) -> Result<String, Ec2Error> {
    let missing = || Ec2Error::SubnetNotFound(format!("The subnet ID '{subnet}' does not exist"));
    match ctx.ctl.network(&ctx.scope, subnet).await {
        Ok(v) if v.network.id == subnet && v.network.project_id == ctx.scope.project_id => {
            Ok(v.network.id)
        }
        Ok(_) | Err(OpError::NotFound { .. }) => Err(missing()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Params {
        Params::from_pairs(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .unwrap_or_default()
    }

    fn code<T: std::fmt::Debug>(r: Result<T, Ec2Error>) -> &'static str {
        match r {
            Err(e) => e.code(),
            Ok(v) => panic!("expected an error, got {v:?}"),
        }
    }

    #[test]
    fn subnets_come_from_subnet_id_or_the_first_interface() {
        let mut ps = p(&[("SubnetId", "vpc-1")]);
        assert_eq!(
            take_subnet(&mut ps).ok().flatten().as_deref(),
            Some("vpc-1")
        );
        let mut ps = p(&[
            ("NetworkInterface.1.SubnetId", "vpc-2"),
            ("NetworkInterface.1.DeviceIndex", "0"),
        ]);
        assert_eq!(
            take_subnet(&mut ps).ok().flatten().as_deref(),
            Some("vpc-2")
        );
        assert!(ps.finish().is_ok());
        let mut ps = p(&[]);
        assert_eq!(take_subnet(&mut ps).ok().flatten(), None);
        let mut ps = p(&[
            ("SubnetId", "vpc-1"),
            ("NetworkInterface.1.SubnetId", "vpc-2"),
        ]);
        assert_eq!(code(take_subnet(&mut ps)), "InvalidParameterCombination");
        let mut ps = p(&[("NetworkInterface.2.SubnetId", "vpc-2")]);
        assert_eq!(code(take_subnet(&mut ps)), "UnsupportedOperation");
        let mut ps = p(&[("NetworkInterface.1.PrivateIpAddress", "10.0.0.5")]);
        assert_eq!(code(take_subnet(&mut ps)), "UnsupportedOperation");
        let mut ps = p(&[("NetworkInterface.1.DeviceIndex", "1")]);
        assert_eq!(code(take_subnet(&mut ps)), "UnsupportedOperation");
    }

    #[test]
    fn one_of_two_names() {
        let mut ps = p(&[("AllocationId", "eipalloc-1"), ("PublicIp", "1.2.3.4")]);
        assert_eq!(
            code(one_of(&mut ps, "AllocationId", "PublicIp")),
            "InvalidParameterCombination"
        );
        let mut ps = p(&[]);
        assert_eq!(
            code(one_of(&mut ps, "AllocationId", "PublicIp")),
            "MissingParameter"
        );
        let mut ps = p(&[("PublicIp", "")]);
        assert_eq!(
            code(one_of(&mut ps, "AllocationId", "PublicIp")),
            "InvalidParameterValue"
        );
        let mut ps = p(&[("PublicIp", "1.2.3.4")]);
        assert_eq!(
            one_of(&mut ps, "AllocationId", "PublicIp").ok(),
            Some((None, Some("1.2.3.4".to_string())))
        );
    }

    #[test]
    fn address_xml_has_the_association_only_when_associated() {
        let mut a = AddressRow {
            id: "eipalloc-0123456789abcdef0".into(),
            project_id: "proj-1".into(),
            public_ip: "203.0.113.10".into(),
            instance_id: None,
            association_id: None,
            private_ip: None,
            created_at: chrono::Utc::now(),
        };
        let mut x = Xml::new();
        x.elem("item", |x| render_address(x, &a, "kumo"));
        let free = x.finish();
        assert!(free.contains("<publicIp>203.0.113.10</publicIp><allocationId>eipalloc-0123456789abcdef0</allocationId><domain>vpc</domain><tagSet/>"), "{free}");
        assert!(!free.contains("instanceId"));
        a.instance_id = Some("i-0123456789abcdef0".into());
        a.association_id = Some("eipassoc-0123456789abcdef0".into());
        a.private_ip = Some("10.0.0.10".into());
        let mut x = Xml::new();
        x.elem("item", |x| render_address(x, &a, "kumo"));
        let used = x.finish();
        assert!(used.contains("<instanceId>i-0123456789abcdef0</instanceId><associationId>eipassoc-0123456789abcdef0</associationId>"), "{used}");
        assert!(used.contains("<privateIpAddress>10.0.0.10</privateIpAddress>"));
        assert_eq!(
            address_values(&a, "kumo", "instance-id"),
            vec!["i-0123456789abcdef0"]
        );
        assert_eq!(address_values(&a, "kumo", "domain"), vec!["vpc"]);
    }
}
