//! EC2 security group and key pair actions. Permissions (`IpPermissions.N`, or the legacy
//! top-level `IpProtocol`/`CidrIp`/`SourceSecurityGroupName`) become kumo rules, one per
//! CIDR or source group; the store checks them, and a request adds or revokes all or none.

pub(crate) mod keys;
mod perms;

use std::collections::HashMap;

use kumo_controller::OpError;
use kumo_store::{SecurityGroupRow, SgRuleRow, StoreError, DEFAULT_GROUP};
use kumo_types::id::{is_id, IdKind};

use crate::error::{not_found, Ec2Error};
use crate::filter::{check_names, matches_all};
use crate::params::Params;
use crate::xml::Xml;
use crate::{page, Ctx};
use perms::requested_rules;

const GROUP_FILTERS: &[&str] = &["group-name", "group-id", "description", "owner-id"];

fn check_group_ids(ids: &[String]) -> Result<(), Ec2Error> {
    match ids.iter().find(|id| !is_id(IdKind::SecurityGroup, id)) {
        Some(bad) => Err(Ec2Error::GroupIdMalformed(format!(
            "Invalid id: \"{bad}\" (expecting \"sg-...\")"
        ))),
        None => Ok(()),
    }
}

fn group_not_found(id: &str) -> Ec2Error {
    not_found("security group", id)
}

/// The caller's group named by exactly one of `GroupId` and `GroupName`.
async fn target_group(
    ctx: &Ctx<'_>,
    id: Option<String>,
    name: Option<String>,
) -> Result<SecurityGroupRow, Ec2Error> {
    let (key, by_id) = match (id, name) {
        (Some(id), None) => {
            check_group_ids(std::slice::from_ref(&id))?;
            (id, true)
        }
        (None, Some(name)) => (name, false),
        (None, None) => {
            return Err(Ec2Error::MissingParameter(
                "The request must contain the parameter GroupName or GroupId".into(),
            ))
        }
        (Some(_), Some(_)) => {
            return Err(Ec2Error::InvalidParameterCombination(
                "Only one of GroupId and GroupName may be given".into(),
            ))
        }
    };
    match ctx.ctl.security_group(&ctx.scope, &key).await {
        Ok(g) if (by_id && g.id == key) || (!by_id && g.name == key) => Ok(g),
        Ok(_) | Err(OpError::NotFound { .. }) => Err(group_not_found(&key)),
        Err(e) => Err(e.into()),
    }
}

/// Security groups of a launch (`SecurityGroupId.N` ids, `SecurityGroup.N` names) as ids,
/// checked to be the caller's; none: the project's default group.
pub(crate) async fn launch_groups(
    ctx: &Ctx<'_>,
    ids: &[String],
    names: &[String],
) -> Result<Vec<String>, Ec2Error> {
    check_group_ids(ids)?;
    let mut out = Vec::new();
    for (key, by_id) in ids
        .iter()
        .map(|i| (i, true))
        .chain(names.iter().map(|n| (n, false)))
    {
        let g = match ctx.ctl.security_group(&ctx.scope, key).await {
            Ok(g)
                if g.project_id == ctx.scope.project_id
                    && ((by_id && &g.id == key) || (!by_id && &g.name == key)) =>
            {
                g
            }
            Ok(_) | Err(OpError::NotFound { .. }) => return Err(group_not_found(key)),
            Err(e) => return Err(e.into()),
        };
        if !out.contains(&g.id) {
            out.push(g.id);
        }
    }
    if out.len() > kumo_store::MAX_GROUPS_PER_INSTANCE {
        return Err(Ec2Error::InvalidParameterValue(format!(
            "An instance can be in at most {} security groups",
            kumo_store::MAX_GROUPS_PER_INSTANCE
        )));
    }
    Ok(out)
}

/// `IpProtocol` as EC2 shows it: `-1` for all.
fn ec2_protocol(p: &str) -> &str {
    match p {
        "all" => "-1",
        // EC2 names ICMPv6 by its number.
        "icmpv6" => "58",
        _ => p,
    }
}

fn is_v6(cidr: &str) -> bool {
    cidr.contains(':')
}

fn refuse_tags(p: &mut Params, what: &str) -> Result<(), Ec2Error> {
    if p.take_prefix("TagSpecification") {
        return Err(Ec2Error::UnsupportedOperation(format!(
            "kumo does not tag {what} yet"
        )));
    }
    Ok(())
}

fn render_rule(x: &mut Xml, r: &SgRuleRow, owner: &str) {
    x.leaf("securityGroupRuleId", &r.id);
    x.leaf("groupId", &r.group_id);
    x.leaf("groupOwnerId", owner);
    x.bool("isEgress", r.direction == "egress");
    x.leaf("ipProtocol", ec2_protocol(&r.protocol));
    x.num("fromPort", r.from_port.unwrap_or(-1));
    x.num("toPort", r.to_port.unwrap_or(-1));
    x.opt("cidrIpv4", r.cidr.as_deref().filter(|c| !is_v6(c)));
    x.opt("cidrIpv6", r.cidr.as_deref().filter(|c| is_v6(c)));
    if let Some(g) = &r.source_group_id {
        x.elem("referencedGroupInfo", |x| {
            x.leaf("groupId", g);
            x.leaf("userId", owner);
        });
    }
    x.opt("description", r.description.as_deref());
}

/// Rules of one direction as EC2 permissions: one per protocol and port range, with its
/// CIDRs and source groups, in the order the rules were added.
fn render_permissions(
    x: &mut Xml,
    name: &str,
    rules: &[&SgRuleRow],
    owner: &str,
    names: &HashMap<String, String>,
) {
    /// Protocol and port range.
    type Key<'a> = (&'a str, Option<i64>, Option<i64>);
    let mut perms: Vec<(Key, Vec<&SgRuleRow>)> = Vec::new();
    for r in rules {
        let key = (r.protocol.as_str(), r.from_port, r.to_port);
        match perms.iter_mut().find(|(k, _)| *k == key) {
            Some((_, members)) => members.push(r),
            None => perms.push((key, vec![r])),
        }
    }
    x.set(name, &perms, |x, ((proto, from, to), members)| {
        x.leaf("ipProtocol", ec2_protocol(proto));
        match (*proto, from, to) {
            ("all", _, _) => {}
            ("icmp" | "icmpv6", _, _) => {
                x.num("fromPort", -1);
                x.num("toPort", -1);
            }
            (_, from, to) => {
                x.num("fromPort", from.unwrap_or(0));
                x.num("toPort", to.unwrap_or(65535));
            }
        }
        let groups: Vec<&&SgRuleRow> = members
            .iter()
            .filter(|r| r.source_group_id.is_some())
            .collect();
        x.set("groups", &groups, |x, r| {
            let id = r.source_group_id.as_deref().unwrap_or("");
            x.leaf("userId", owner);
            x.leaf("groupId", id);
            x.opt("groupName", names.get(id).map(String::as_str));
            x.opt("description", r.description.as_deref());
        });
        let (v6, v4): (Vec<&&SgRuleRow>, Vec<&&SgRuleRow>) = members
            .iter()
            .filter(|r| r.cidr.is_some())
            .partition(|r| r.cidr.as_deref().is_some_and(is_v6));
        x.set("ipRanges", &v4, |x, r| {
            x.leaf("cidrIp", r.cidr.as_deref().unwrap_or(""));
            x.opt("description", r.description.as_deref());
        });
        x.set("ipv6Ranges", &v6, |x, r| {
            x.leaf("cidrIpv6", r.cidr.as_deref().unwrap_or(""));
            x.opt("description", r.description.as_deref());
        });
        x.empty("prefixListIds");
    });
}

fn render_group(
    x: &mut Xml,
    g: &SecurityGroupRow,
    rules: &[SgRuleRow],
    names: &HashMap<String, String>,
) {
    let mine: Vec<&SgRuleRow> = rules.iter().filter(|r| r.group_id == g.id).collect();
    let (egress, ingress): (Vec<&SgRuleRow>, Vec<&SgRuleRow>) =
        mine.into_iter().partition(|r| r.direction == "egress");
    x.leaf("ownerId", &g.project_id);
    x.leaf("groupId", &g.id);
    x.leaf("groupName", &g.name);
    x.leaf("groupDescription", &g.description);
    render_permissions(x, "ipPermissions", &ingress, &g.project_id, names);
    render_permissions(x, "ipPermissionsEgress", &egress, &g.project_id, names);
    x.empty("tagSet");
}

pub async fn create_group(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let name = p.required("GroupName")?;
    let description = p.required("GroupDescription")?;
    // kumo's groups belong to the project, not to a network: any VpcId is accepted.
    let _ = p.string("VpcId");
    refuse_tags(&mut p, "security groups")?;
    let dry = p.dry_run()?;
    p.finish()?;
    if name == DEFAULT_GROUP {
        return Err(Ec2Error::GroupReserved(
            "The security group name 'default' is reserved".into(),
        ));
    }
    if dry {
        return Err(ctx.dry_run("CreateSecurityGroup"));
    }
    let g = match ctx
        .ctl
        .create_security_group(&ctx.scope, &name, &description)
        .await
    {
        Ok(g) => g,
        Err(OpError::Conflict(_)) => {
            return Err(Ec2Error::GroupDuplicate(format!(
                "The security group '{name}' already exists"
            )))
        }
        Err(e) => return Err(e.into()),
    };
    let mut x = Xml::new();
    x.response("CreateSecurityGroup", &ctx.request_id, |x| {
        x.bool("return", true);
        x.leaf("groupId", &g.id);
    });
    Ok(x.finish())
}

pub async fn delete_group(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let id = p.string("GroupId");
    let name = p.string("GroupName");
    let dry = p.dry_run()?;
    p.finish()?;
    let g = target_group(ctx, id, name).await?;
    if g.name == DEFAULT_GROUP {
        return Err(Ec2Error::CannotDelete(format!(
            "the specified group: \"{}\" name: \"default\" cannot be deleted by a user",
            g.id
        )));
    }
    if dry {
        return Err(ctx.dry_run("DeleteSecurityGroup"));
    }
    match ctx.ctl.delete_security_group(&ctx.scope, &g.id).await {
        Ok(()) => {}
        Err(OpError::IncorrectState(m)) => return Err(Ec2Error::DependencyViolation(m)),
        Err(e) => return Err(e.into()),
    }
    let mut x = Xml::new();
    x.response("DeleteSecurityGroup", &ctx.request_id, |x| {
        x.bool("return", true);
        x.leaf("groupId", &g.id);
    });
    Ok(x.finish())
}

pub async fn describe_groups(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let ids = p.list("GroupId")?;
    let names = p.list("GroupName")?;
    let filters = p.filters()?;
    let max = p.int_in("MaxResults", 5, 1000)?;
    let token = p.string("NextToken");
    let dry = p.dry_run()?;
    p.finish()?;
    check_group_ids(&ids)?;
    check_names(&filters, GROUP_FILTERS, false)?;
    if max.is_some() && !(ids.is_empty() && names.is_empty()) {
        return Err(Ec2Error::InvalidParameterCombination(
            "The parameter groupIds/groupNames cannot be used with the parameter maxResults".into(),
        ));
    }
    if dry {
        return Err(ctx.dry_run("DescribeSecurityGroups"));
    }
    let mut all = ctx.ctl.security_groups(&ctx.scope).await?;
    // A name is one of the caller's own groups (admins also see other projects' groups).
    let own = |g: &SecurityGroupRow| g.project_id == ctx.scope.project_id;
    for (key, by_id) in ids
        .iter()
        .map(|i| (i, true))
        .chain(names.iter().map(|n| (n, false)))
    {
        if !all.iter().any(|g| {
            if by_id {
                &g.id == key
            } else {
                &g.name == key && own(g)
            }
        }) {
            return Err(group_not_found(key));
        }
    }
    all.retain(|g| {
        (ids.is_empty() || ids.contains(&g.id))
            && (names.is_empty() || (names.contains(&g.name) && own(g)))
            && matches_all(&filters, |f| match f {
                "group-name" => vec![g.name.clone()],
                "group-id" => vec![g.id.clone()],
                "description" => vec![g.description.clone()],
                "owner-id" => vec![g.project_id.clone()],
                _ => vec![],
            })
    });
    all.sort_by(|a, b| a.id.cmp(&b.id));
    let (shown, next) = page::page(all, |g| g.id.clone(), token.as_deref(), max)?;
    let ids: Vec<String> = shown.iter().map(|g| g.id.clone()).collect();
    let rules = ctx.ctl.security_group_rules(&ids).await?;
    let mut sources: Vec<String> = rules
        .iter()
        .filter_map(|r| r.source_group_id.clone())
        .collect();
    sources.sort();
    sources.dedup();
    let names: HashMap<String, String> = ctx
        .ctl
        .store
        .security_group_names(&sources)
        .await?
        .into_iter()
        .collect();
    let mut x = Xml::new();
    x.response("DescribeSecurityGroups", &ctx.request_id, |x| {
        x.set("securityGroupInfo", &shown, |x, g| {
            render_group(x, g, &rules, &names)
        });
        x.opt("nextToken", next.as_deref());
    });
    Ok(x.finish())
}

/// AuthorizeSecurityGroupIngress / AuthorizeSecurityGroupEgress.
pub async fn authorize(ctx: &Ctx<'_>, action: &str, mut p: Params) -> Result<String, Ec2Error> {
    let egress = action.ends_with("Egress");
    let direction = if egress { "egress" } else { "ingress" };
    let id = p.string("GroupId");
    // EC2 names the group of an egress rule by id only.
    let name = if egress { None } else { p.string("GroupName") };
    let rules = requested_rules(&mut p, direction)?;
    refuse_tags(&mut p, "security group rules")?;
    let dry = p.dry_run()?;
    p.finish()?;
    if rules.is_empty() {
        return Err(Ec2Error::MissingParameter(
            "The request must contain the parameter IpPermissions".into(),
        ));
    }
    let g = target_group(ctx, id, name).await?;
    if dry {
        return Err(ctx.dry_run(action));
    }
    let added = match ctx
        .ctl
        .add_security_group_rules(&ctx.scope, &g.id, &rules)
        .await
    {
        Ok(a) => a,
        Err(OpError::Conflict(m)) => return Err(Ec2Error::PermissionDuplicate(m)),
        Err(e) => return Err(e.into()),
    };
    let mut x = Xml::new();
    x.response(action, &ctx.request_id, |x| {
        x.bool("return", true);
        x.set("securityGroupRuleSet", &added, |x, r| {
            render_rule(x, r, &g.project_id)
        });
    });
    Ok(x.finish())
}

/// RevokeSecurityGroupIngress / RevokeSecurityGroupEgress, by permission or rule id.
pub async fn revoke(ctx: &Ctx<'_>, action: &str, mut p: Params) -> Result<String, Ec2Error> {
    let egress = action.ends_with("Egress");
    let direction = if egress { "egress" } else { "ingress" };
    let id = p.string("GroupId");
    let name = if egress { None } else { p.string("GroupName") };
    let rule_ids = p.list("SecurityGroupRuleId")?;
    let rules = requested_rules(&mut p, direction)?;
    let dry = p.dry_run()?;
    p.finish()?;
    if rules.is_empty() && rule_ids.is_empty() {
        return Err(Ec2Error::MissingParameter(
            "The request must contain the parameter IpPermissions or SecurityGroupRuleId".into(),
        ));
    }
    let g = target_group(ctx, id, name).await?;
    // A rule id of the other direction is not a rule of this action.
    let current = ctx
        .ctl
        .security_group_rules(std::slice::from_ref(&g.id))
        .await?;
    if let Some(missing) = rule_ids.iter().find(|id| {
        !current
            .iter()
            .any(|r| &&r.id == id && r.direction == direction)
    }) {
        return Err(Ec2Error::RuleIdNotFound(format!(
            "The security group rule ID '{missing}' does not exist"
        )));
    }
    if dry {
        return Err(ctx.dry_run(action));
    }
    match ctx
        .ctl
        .revoke_security_group_rules(&ctx.scope, &g.id, &rule_ids, &rules)
        .await
    {
        Ok(_) => {}
        Err(OpError::NotFound { kind, id })
            if kind == "security group rule" && rule_ids.contains(&id) =>
        {
            return Err(Ec2Error::RuleIdNotFound(format!(
                "The security group rule ID '{id}' does not exist"
            )))
        }
        Err(e) => return Err(e.into()),
    }
    let mut x = Xml::new();
    x.response(action, &ctx.request_id, |x| {
        x.bool("return", true);
        x.empty("unknownIpPermissionSet");
    });
    Ok(x.finish())
}

/// Names of groups for rendering instances: id → name.
pub(crate) async fn group_names(
    ctx: &Ctx<'_>,
    ids: &[String],
) -> Result<HashMap<String, String>, StoreError> {
    Ok(ctx
        .ctl
        .store
        .security_group_names(ids)
        .await?
        .into_iter()
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_get_ec2_codes() {
        let nf = |kind: &'static str| {
            Ec2Error::from_op(OpError::NotFound {
                kind,
                id: "x".into(),
            })
            .code()
        };
        assert_eq!(nf("security group"), "InvalidGroup.NotFound");
        assert_eq!(nf("security group rule"), "InvalidPermission.NotFound");
        assert_eq!(nf("key pair"), "InvalidKeyPair.NotFound");
        assert_eq!(
            Ec2Error::KeyFormat(String::new()).code(),
            "InvalidKey.Format"
        );
        assert_eq!(Ec2Error::KeyFormat(String::new()).status().as_u16(), 400);
        assert_eq!(Ec2Error::CannotDelete(String::new()).code(), "CannotDelete");
    }

    #[test]
    fn permissions_render_as_ec2_groups_them() {
        let rule = |id: &str,
                    dir: &str,
                    proto: &str,
                    ports: Option<(i64, i64)>,
                    cidr: Option<&str>,
                    src: Option<&str>| SgRuleRow {
            id: id.into(),
            group_id: "sg-1".into(),
            direction: dir.into(),
            protocol: proto.into(),
            from_port: ports.map(|p| p.0),
            to_port: ports.map(|p| p.1),
            cidr: cidr.map(String::from),
            source_group_id: src.map(String::from),
            description: None,
        };
        let rules = vec![
            rule(
                "sgr-1",
                "ingress",
                "tcp",
                Some((22, 22)),
                Some("10.0.0.0/8"),
                None,
            ),
            rule("sgr-2", "ingress", "all", None, None, Some("sg-1")),
            rule(
                "sgr-3",
                "ingress",
                "tcp",
                Some((22, 22)),
                None,
                Some("sg-2"),
            ),
            rule("sgr-4", "egress", "all", None, Some("0.0.0.0/0"), None),
        ];
        let g = SecurityGroupRow {
            id: "sg-1".into(),
            project_id: "proj-1".into(),
            name: "web".into(),
            description: "d".into(),
            created_at: chrono::DateTime::<chrono::Utc>::default(),
        };
        let names: HashMap<String, String> = [
            ("sg-1".to_string(), "web".to_string()),
            ("sg-2".into(), "db".into()),
        ]
        .into();
        let mut x = Xml::new();
        x.elem("item", |x| render_group(x, &g, &rules, &names));
        let xml = x.finish();
        let want = concat!(
            "<ipPermissions><item><ipProtocol>tcp</ipProtocol><fromPort>22</fromPort><toPort>22</toPort>",
            "<groups><item><userId>proj-1</userId><groupId>sg-2</groupId><groupName>db</groupName></item></groups>",
            "<ipRanges><item><cidrIp>10.0.0.0/8</cidrIp></item></ipRanges><ipv6Ranges/><prefixListIds/></item>",
            "<item><ipProtocol>-1</ipProtocol>",
            "<groups><item><userId>proj-1</userId><groupId>sg-1</groupId><groupName>web</groupName></item></groups>",
            "<ipRanges/><ipv6Ranges/><prefixListIds/></item></ipPermissions>",
            "<ipPermissionsEgress><item><ipProtocol>-1</ipProtocol><groups/>",
            "<ipRanges><item><cidrIp>0.0.0.0/0</cidrIp></item></ipRanges><ipv6Ranges/><prefixListIds/></item></ipPermissionsEgress>",
        );
        assert!(xml.contains(want), "{xml}");
    }
}
