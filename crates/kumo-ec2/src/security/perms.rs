//! EC2 permissions (`IpPermissions.N`, or the legacy top-level `IpProtocol`/`CidrIp`/
//! `SourceSecurityGroupName`) as kumo rules: one per CIDR and per source group.

use std::collections::BTreeMap;

use kumo_store::NewSgRule;

use super::check_group_ids;
use crate::error::Ec2Error;
use crate::params::Params;

fn needs_ports(proto: &str) -> bool {
    matches!(
        proto.trim().to_ascii_lowercase().as_str(),
        "tcp" | "6" | "udp" | "17"
    )
}

fn port_range_error() -> Ec2Error {
    Ec2Error::InvalidParameterValue(
        "Invalid value for portRange. Must specify both from and to ports with TCP/UDP.".into(),
    )
}

/// Rename `parameter X` to `parameter PREFIX.X` in errors of a nested reader.
fn nested(e: Ec2Error, prefix: &str) -> Ec2Error {
    let fix = |m: String| m.replace("parameter ", &format!("parameter {prefix}."));
    match e {
        Ec2Error::UnknownParameter(m) => Ec2Error::UnknownParameter(fix(m)),
        Ec2Error::MissingParameter(m) => Ec2Error::MissingParameter(fix(m)),
        Ec2Error::InvalidParameterValue(m) => Ec2Error::InvalidParameterValue(fix(m)),
        other => other,
    }
}

/// One peer entry (`IpRanges.M` or `Groups.M`) as its fields.
fn peer_fields(
    fields: BTreeMap<String, String>,
    known: &[&str],
    prefix: &str,
) -> Result<BTreeMap<String, String>, Ec2Error> {
    if let Some(k) = fields.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(Ec2Error::UnknownParameter(format!(
            "The parameter {prefix}.{k} is not recognized"
        )));
    }
    Ok(fields)
}

/// `IpPermissions.N.*`, one kumo rule per CIDR and per source group.
fn permissions(p: &mut Params, direction: &str) -> Result<Vec<NewSgRule>, Ec2Error> {
    let mut out = Vec::new();
    for (n, fields) in p.indexed("IpPermissions")? {
        let prefix = format!("IpPermissions.{n}");
        let mut inner = Params::from_pairs(fields).map_err(|e| nested(e, &prefix))?;
        let proto = inner
            .required("IpProtocol")
            .map_err(|e| nested(e, &prefix))?;
        let from = inner.int("FromPort").map_err(|e| nested(e, &prefix))?;
        let to = inner.int("ToPort").map_err(|e| nested(e, &prefix))?;
        let ranges = inner.indexed("IpRanges").map_err(|e| nested(e, &prefix))?;
        // botocore sends UserIdGroupPairs as `Groups`; the model's own name is accepted too.
        let mut pairs: Vec<(String, BTreeMap<String, String>)> = Vec::new();
        for list in ["Groups", "UserIdGroupPairs"] {
            for (m, f) in inner.indexed(list).map_err(|e| nested(e, &prefix))? {
                pairs.push((format!("{prefix}.{list}.{m}"), f));
            }
        }
        if inner.take_prefix("Ipv6Ranges") || inner.take_prefix("PrefixListIds") {
            return Err(Ec2Error::UnsupportedOperation(
                "kumo security groups take IPv4 ranges and groups; Ipv6Ranges and PrefixListIds are not supported".into(),
            ));
        }
        inner.finish().map_err(|e| nested(e, &prefix))?;
        if needs_ports(&proto) && (from.is_none() || to.is_none()) {
            return Err(port_range_error());
        }
        let base = NewSgRule {
            direction: direction.into(),
            protocol: proto,
            from_port: from,
            to_port: to,
            ..Default::default()
        };
        let before = out.len();
        for (m, f) in ranges {
            let mut f = peer_fields(
                f,
                &["CidrIp", "Description"],
                &format!("{prefix}.IpRanges.{m}"),
            )?;
            let cidr = f.remove("CidrIp").ok_or_else(|| {
                Ec2Error::MissingParameter(format!(
                    "The request must contain the parameter {prefix}.IpRanges.{m}.CidrIp"
                ))
            })?;
            out.push(NewSgRule {
                cidr: Some(cidr),
                description: f.remove("Description"),
                ..base.clone()
            });
        }
        for (at, f) in pairs {
            let mut f = peer_fields(
                f,
                &["GroupId", "GroupName", "UserId", "Description", "VpcId"],
                &at,
            )?;
            let source = match (f.remove("GroupId"), f.remove("GroupName")) {
                (Some(id), _) => {
                    check_group_ids(std::slice::from_ref(&id))?;
                    id
                }
                (None, Some(name)) => name,
                (None, None) => {
                    return Err(Ec2Error::MissingParameter(format!(
                        "The request must contain the parameter {at}.GroupId"
                    )))
                }
            };
            out.push(NewSgRule {
                source_group: Some(source),
                description: f.remove("Description"),
                ..base.clone()
            });
        }
        if out.len() == before {
            return Err(Ec2Error::MissingParameter(format!(
                "{prefix} must name IpRanges or Groups (UserIdGroupPairs) to allow"
            )));
        }
    }
    Ok(out)
}

/// The legacy single permission: `IpProtocol`, `FromPort`, `ToPort` with `CidrIp` or
/// `SourceSecurityGroupName` (a source group alone means all traffic from it).
fn legacy_permission(p: &mut Params, direction: &str) -> Result<Option<NewSgRule>, Ec2Error> {
    let proto = p.string("IpProtocol");
    let from = p.int("FromPort")?;
    let to = p.int("ToPort")?;
    let cidr = p.string("CidrIp");
    let source = p.string("SourceSecurityGroupName");
    let _owner = p.string("SourceSecurityGroupOwnerId");
    if proto.is_none() && from.is_none() && to.is_none() && cidr.is_none() && source.is_none() {
        return Ok(None);
    }
    if cidr.is_some() && source.is_some() {
        return Err(Ec2Error::InvalidParameterCombination(
            "CidrIp and SourceSecurityGroupName cannot be given together".into(),
        ));
    }
    if cidr.is_none() && source.is_none() {
        return Err(Ec2Error::MissingParameter(
            "The request must contain the parameter CidrIp, SourceSecurityGroupName or IpPermissions".into(),
        ));
    }
    let protocol = match (proto, &source) {
        (Some(p), _) => p,
        (None, Some(_)) => "-1".into(),
        (None, None) => {
            return Err(Ec2Error::MissingParameter(
                "The request must contain the parameter IpProtocol".into(),
            ))
        }
    };
    if needs_ports(&protocol) && (from.is_none() || to.is_none()) && source.is_none() {
        return Err(port_range_error());
    }
    Ok(Some(NewSgRule {
        direction: direction.into(),
        protocol,
        from_port: from,
        to_port: to,
        cidr,
        source_group: source,
        description: None,
    }))
}

/// Every permission of an Authorize or Revoke request.
pub(super) fn requested_rules(p: &mut Params, direction: &str) -> Result<Vec<NewSgRule>, Ec2Error> {
    let mut rules = permissions(p, direction)?;
    if let Some(r) = legacy_permission(p, direction)? {
        if !rules.is_empty() {
            return Err(Ec2Error::InvalidParameterCombination(
                "IpPermissions cannot be combined with the top-level IpProtocol, CidrIp or SourceSecurityGroupName".into(),
            ));
        }
        rules.push(r);
    }
    Ok(rules)
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
    fn permissions_become_one_rule_per_peer() {
        let mut ps = p(&[
            ("IpPermissions.1.IpProtocol", "tcp"),
            ("IpPermissions.1.FromPort", "22"),
            ("IpPermissions.1.ToPort", "22"),
            ("IpPermissions.1.IpRanges.1.CidrIp", "10.0.0.0/8"),
            ("IpPermissions.1.IpRanges.2.CidrIp", "192.168.0.0/16"),
            ("IpPermissions.1.IpRanges.2.Description", "office"),
            ("IpPermissions.1.Groups.1.GroupId", "sg-0123456789abcdef0"),
            ("IpPermissions.2.IpProtocol", "-1"),
            ("IpPermissions.2.UserIdGroupPairs.1.GroupName", "web"),
        ]);
        let rules = requested_rules(&mut ps, "ingress").expect("rules");
        assert!(ps.finish().is_ok());
        type Got = (String, Option<String>, Option<String>, Option<String>);
        let got: Vec<Got> = rules
            .iter()
            .map(|r| {
                (
                    r.protocol.clone(),
                    r.cidr.clone(),
                    r.source_group.clone(),
                    r.description.clone(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("tcp".into(), Some("10.0.0.0/8".into()), None, None),
                (
                    "tcp".into(),
                    Some("192.168.0.0/16".into()),
                    None,
                    Some("office".into())
                ),
                (
                    "tcp".into(),
                    None,
                    Some("sg-0123456789abcdef0".into()),
                    None
                ),
                ("-1".into(), None, Some("web".into()), None),
            ]
        );
        assert!(rules[..3]
            .iter()
            .all(|r| r.from_port == Some(22) && r.to_port == Some(22)));
    }

    #[test]
    fn legacy_form_and_bad_permissions() {
        let mut ps = p(&[
            ("IpProtocol", "udp"),
            ("FromPort", "53"),
            ("ToPort", "53"),
            ("CidrIp", "0.0.0.0/0"),
        ]);
        let r = requested_rules(&mut ps, "egress").expect("legacy");
        assert_eq!(r.len(), 1);
        assert_eq!(
            (r[0].direction.as_str(), r[0].from_port),
            ("egress", Some(53))
        );
        let mut ps = p(&[("SourceSecurityGroupName", "web")]);
        let r = requested_rules(&mut ps, "ingress").expect("source only");
        assert_eq!(
            (r[0].protocol.as_str(), r[0].source_group.as_deref()),
            ("-1", Some("web"))
        );
        for (bad, want) in [
            (
                vec![
                    ("IpPermissions.1.IpProtocol", "tcp"),
                    ("IpPermissions.1.IpRanges.1.CidrIp", "0.0.0.0/0"),
                ],
                "InvalidParameterValue",
            ),
            (
                vec![
                    ("IpPermissions.1.FromPort", "1"),
                    ("IpPermissions.1.IpRanges.1.CidrIp", "0.0.0.0/0"),
                ],
                "MissingParameter",
            ),
            (
                vec![("IpPermissions.1.IpProtocol", "-1")],
                "MissingParameter",
            ),
            (
                vec![
                    ("IpPermissions.1.IpProtocol", "-1"),
                    ("IpPermissions.1.Bogus", "x"),
                ],
                "UnknownParameter",
            ),
            (
                vec![
                    ("IpPermissions.1.IpProtocol", "-1"),
                    ("IpPermissions.1.IpRanges.1.Cidr", "x"),
                ],
                "UnknownParameter",
            ),
            (
                vec![
                    ("IpPermissions.1.IpProtocol", "-1"),
                    ("IpPermissions.1.Ipv6Ranges.1.CidrIpv6", "::/0"),
                ],
                "UnsupportedOperation",
            ),
            (
                vec![
                    ("IpPermissions.1.IpProtocol", "-1"),
                    ("IpPermissions.1.Groups.1.GroupId", "sg-zz"),
                ],
                "InvalidGroupId.Malformed",
            ),
            (
                vec![("IpPermissions.0.IpProtocol", "-1")],
                "InvalidParameterValue",
            ),
            (
                vec![
                    ("IpPermissions.1.IpProtocol", "tcp"),
                    ("IpPermissions.1.FromPort", "x"),
                ],
                "InvalidParameterValue",
            ),
            (vec![("CidrIp", "0.0.0.0/0")], "MissingParameter"),
            (
                vec![("IpProtocol", "tcp"), ("CidrIp", "0.0.0.0/0")],
                "InvalidParameterValue",
            ),
            (
                vec![
                    ("IpProtocol", "-1"),
                    ("CidrIp", "0.0.0.0/0"),
                    ("SourceSecurityGroupName", "x"),
                ],
                "InvalidParameterCombination",
            ),
            (
                vec![
                    ("IpProtocol", "-1"),
                    ("CidrIp", "0.0.0.0/0"),
                    ("IpPermissions.1.IpProtocol", "-1"),
                    ("IpPermissions.1.IpRanges.1.CidrIp", "1.0.0.0/8"),
                ],
                "InvalidParameterCombination",
            ),
        ] {
            let mut ps = p(&bad);
            assert_eq!(code(requested_rules(&mut ps, "ingress")), want, "{bad:?}");
        }
        let mut ps = p(&[
            ("IpPermissions.1.IpProtocol", "-1"),
            ("IpPermissions.1.Bogus", "x"),
        ]);
        match requested_rules(&mut ps, "ingress") {
            Err(Ec2Error::UnknownParameter(m)) => {
                assert!(m.contains("IpPermissions.1.Bogus"), "{m}")
            }
            other => panic!("{other:?}"),
        }
    }
}
