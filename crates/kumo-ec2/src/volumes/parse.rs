//! Parameters of the volume and snapshot actions, and the checks that need no store: what
//! kumo cannot do (volume types, IOPS, encryption, multi-attach) is refused, never ignored.

use kumo_store::VolumeRow;
use kumo_types::id::{is_id, IdKind};
use kumo_types::InstanceState;

use crate::error::Ec2Error;
use crate::params::{check_tag, Params, TagSpec};

/// EC2's limits for a volume's size in GiB (gp2/gp3).
pub const MIN_GIB: i64 = 1;
pub const MAX_GIB: i64 = 16_384;
/// Volume types accepted (and ignored: kumo volumes have no types) on create and modify.
pub const ACCEPTED_TYPES: &[&str] = &["gp2", "gp3", "standard"];
/// The other types EC2 knows: refused as unsupported rather than as unknown.
const OTHER_TYPES: &[&str] = &["io1", "io2", "st1", "sc1"];
/// Longest snapshot description (EC2's limit, also the store's).
pub const MAX_DESCRIPTION: usize = 255;

/// A CreateVolume request, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateVolumeParams {
    pub size_gib: Option<u64>,
    pub snapshot: Option<String>,
    /// AvailabilityZone or AvailabilityZoneId: checked against the region's zones only.
    pub zone: Option<String>,
    pub client_token: Option<String>,
    pub tags: Vec<(String, String)>,
}

/// Refuse parameters of capabilities kumo does not have.
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

/// A boolean kumo accepts only as `false`.
fn only_false(p: &mut Params, name: &str, why: &str) -> Result<(), Ec2Error> {
    match p.bool(name)? {
        Some(true) => Err(Ec2Error::UnsupportedOperation(format!(
            "{name}=true is not supported by kumo: {why}"
        ))),
        _ => Ok(()),
    }
}

/// `VolumeType`: the general-purpose types are accepted (kumo has one kind of volume).
pub fn check_type(t: &str) -> Result<(), Ec2Error> {
    if ACCEPTED_TYPES.contains(&t) {
        Ok(())
    } else if OTHER_TYPES.contains(&t) {
        Err(Ec2Error::UnsupportedOperation(format!(
            "Volume type {t} is not supported by kumo; use gp2, gp3 or standard"
        )))
    } else {
        Err(Ec2Error::InvalidParameterValue(format!(
            "Value ({t}) for parameter volumeType is invalid. Valid types: gp2, gp3, standard"
        )))
    }
}

/// The size in GiB, when given.
fn size(p: &mut Params) -> Result<Option<u64>, Ec2Error> {
    Ok(p.int_in("Size", MIN_GIB, MAX_GIB)?
        .and_then(|n| u64::try_from(n).ok()))
}

pub fn check_volume_id(id: &str) -> Result<(), Ec2Error> {
    if is_id(IdKind::Volume, id) {
        Ok(())
    } else {
        Err(Ec2Error::InvalidParameterValue(format!(
            "Invalid id: \"{id}\" (expecting \"vol-...\")"
        )))
    }
}

pub fn check_snapshot_id(id: &str) -> Result<(), Ec2Error> {
    if is_id(IdKind::Snapshot, id) {
        Ok(())
    } else {
        Err(Ec2Error::InvalidParameterValue(format!(
            "Invalid id: \"{id}\" (expecting \"snap-...\")"
        )))
    }
}

pub fn check_instance_id(id: &str) -> Result<(), Ec2Error> {
    if is_id(IdKind::Instance, id) {
        Ok(())
    } else {
        Err(Ec2Error::InstanceMalformed(format!(
            "Invalid id: \"{id}\" (expecting \"i-...\")"
        )))
    }
}

/// The tags of `TagSpecification`s that must all be for `resource_type`.
pub fn spec_tags(
    specs: &[TagSpec],
    resource_type: &str,
) -> Result<Vec<(String, String)>, Ec2Error> {
    let mut tags: Vec<(String, String)> = Vec::new();
    for s in specs {
        if s.resource_type != resource_type {
            return Err(Ec2Error::InvalidParameterValue(format!(
                "'{}' is not a valid taggable resource type for this operation (expected {resource_type})",
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
    Ok(tags)
}

/// CreateVolume's parameters (all but DryRun).
pub fn create_volume(p: &mut Params) -> Result<CreateVolumeParams, Ec2Error> {
    let size_gib = size(p)?;
    let snapshot = p.string("SnapshotId");
    let zone = match (p.string("AvailabilityZone"), p.string("AvailabilityZoneId")) {
        (Some(_), Some(_)) => {
            return Err(Ec2Error::InvalidParameterCombination(
                "Only one of AvailabilityZone and AvailabilityZoneId may be given".into(),
            ))
        }
        (a, b) => a.or(b),
    };
    if let Some(t) = p.string("VolumeType") {
        check_type(&t)?;
    }
    only_false(p, "Encrypted", "kumo volumes are not encrypted")?;
    only_false(
        p,
        "MultiAttachEnabled",
        "a kumo volume is attached to one instance at a time",
    )?;
    refuse(
        p,
        &[
            "Iops",
            "Throughput",
            "KmsKeyId",
            "OutpostArn",
            "VolumeInitializationRate",
            "Operator",
        ],
    )?;
    let client_token = p.string("ClientToken");
    if let Some(t) = &client_token {
        if t.is_empty() || t.len() > 64 || !t.is_ascii() {
            return Err(Ec2Error::InvalidParameterValue(
                "ClientToken must be 1 to 64 ASCII characters".into(),
            ));
        }
    }
    let tags = spec_tags(&p.tag_specs()?, "volume")?;
    if let Some(s) = &snapshot {
        check_snapshot_id(s)?;
    }
    if let Some(z) = &zone {
        if z.is_empty() {
            return Err(Ec2Error::InvalidParameterValue(
                "The parameter AvailabilityZone must not be empty".into(),
            ));
        }
    }
    if size_gib.is_none() && snapshot.is_none() {
        return Err(Ec2Error::MissingParameter(
            "The request must contain the parameter Size or SnapshotId".into(),
        ));
    }
    Ok(CreateVolumeParams {
        size_gib,
        snapshot,
        zone,
        client_token,
        tags,
    })
}

/// ModifyVolume's parameters: the volume and its new size (kumo modifies only the size).
pub fn modify_volume(p: &mut Params) -> Result<(String, u64), Ec2Error> {
    let id = p.required("VolumeId")?;
    let size_gib = size(p)?;
    if let Some(t) = p.string("VolumeType") {
        check_type(&t)?;
    }
    only_false(
        p,
        "MultiAttachEnabled",
        "a kumo volume is attached to one instance at a time",
    )?;
    refuse(p, &["Iops", "Throughput"])?;
    check_volume_id(&id)?;
    let size_gib = size_gib.ok_or_else(|| {
        Ec2Error::MissingParameter(
            "The request must contain the parameter Size: kumo modifies a volume's size only"
                .into(),
        )
    })?;
    Ok((id, size_gib))
}

/// The host an instance runs on, as an attachment needs it.
#[derive(Debug, Clone, Copy)]
pub struct HostRef<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub pool: &'a str,
}

/// Why an attachment cannot be made, as EC2 says it; `host` is the instance's host.
pub fn attach_refusal(
    vol: &VolumeRow,
    inst_id: &str,
    inst_state: InstanceState,
    host: Option<HostRef<'_>>,
) -> Option<Ec2Error> {
    if matches!(
        inst_state,
        InstanceState::Terminated | InstanceState::ShuttingDown
    ) {
        return Some(Ec2Error::IncorrectInstanceState(format!(
            "Instance '{inst_id}' is not 'running' or 'stopped' (it is {inst_state})."
        )));
    }
    if let Some(i) = &vol.instance_id {
        return Some(Ec2Error::VolumeInUse(format!(
            "{} is already attached to an instance ({i})",
            vol.id
        )));
    }
    if vol.state != "available" {
        return Some(Ec2Error::IncorrectState(format!(
            "Volume '{}' is in the '{}' state.",
            vol.id, vol.state
        )));
    }
    let Some(host) = host else {
        return Some(Ec2Error::IncorrectInstanceState(format!(
            "Instance '{inst_id}' has no host yet; try again when it is running."
        )));
    };
    // A local pool's volume is on one host; a shared pool's on every host of the pool.
    let reachable = match &vol.host_id {
        Some(h) => h == host.id,
        None => host.pool == vol.pool,
    };
    if !reachable {
        return Some(Ec2Error::VolumeZoneMismatch(format!(
            "The volume '{}' is not in the same availability zone as instance '{inst_id}': it \
             lives in storage pool {}{}, the instance's host {} uses pool {}",
            vol.id,
            vol.pool,
            vol.host_id
                .as_deref()
                .map(|h| format!(" on host {h}"))
                .unwrap_or_default(),
            host.name,
            host.pool
        )));
    }
    None
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
    fn create_volume_takes_size_or_snapshot() {
        let mut ps = p(&[
            ("Size", "1"),
            ("AvailabilityZone", "site1"),
            ("VolumeType", "gp3"),
            ("Encrypted", "false"),
            ("ClientToken", "tok"),
            ("TagSpecification.1.ResourceType", "volume"),
            ("TagSpecification.1.Tag.1.Key", "Name"),
            ("TagSpecification.1.Tag.1.Value", "data"),
        ]);
        let got = create_volume(&mut ps).ok();
        assert!(ps.finish().is_ok(), "every parameter was taken");
        assert_eq!(
            got,
            Some(CreateVolumeParams {
                size_gib: Some(1),
                snapshot: None,
                zone: Some("site1".into()),
                client_token: Some("tok".into()),
                tags: vec![("Name".into(), "data".into())],
            })
        );
        let mut ps = p(&[("SnapshotId", "snap-0123456789abcdef0")]);
        let got = create_volume(&mut ps).ok();
        assert_eq!(
            got.and_then(|c| c.snapshot).as_deref(),
            Some("snap-0123456789abcdef0")
        );
        assert_eq!(code(create_volume(&mut p(&[]))), "MissingParameter");
        assert_eq!(
            code(create_volume(&mut p(&[("AvailabilityZone", "site1")]))),
            "MissingParameter"
        );
    }

    #[test]
    fn create_volume_refuses_what_kumo_cannot_do() {
        for (k, v, want) in [
            ("Size", "0", "InvalidParameterValue"),
            ("Size", "16385", "InvalidParameterValue"),
            ("Size", "-1", "InvalidParameterValue"),
            ("Size", "big", "InvalidParameterValue"),
            ("VolumeType", "io2", "UnsupportedOperation"),
            ("VolumeType", "fast", "InvalidParameterValue"),
            ("Encrypted", "true", "UnsupportedOperation"),
            ("MultiAttachEnabled", "true", "UnsupportedOperation"),
            ("Iops", "3000", "UnsupportedOperation"),
            ("KmsKeyId", "k", "UnsupportedOperation"),
            ("ClientToken", "", "InvalidParameterValue"),
            (
                "SnapshotId",
                "vol-0123456789abcdef0",
                "InvalidParameterValue",
            ),
            ("AvailabilityZoneId", "", "InvalidParameterValue"),
            (
                "TagSpecification.1.ResourceType",
                "instance",
                "InvalidParameterValue",
            ),
        ] {
            let mut ps = p(&[(k, v)]);
            if k != "Size" {
                ps = ps.merge(p(&[("Size", "1")])).unwrap_or_default();
            }
            if k == "TagSpecification.1.ResourceType" {
                ps = ps
                    .merge(p(&[("TagSpecification.1.Tag.1.Key", "a")]))
                    .unwrap_or_default();
            }
            assert_eq!(code(create_volume(&mut ps)), want, "{k}={v}");
        }
        let mut ps = p(&[
            ("Size", "1"),
            ("AvailabilityZone", "a"),
            ("AvailabilityZoneId", "a"),
        ]);
        assert_eq!(code(create_volume(&mut ps)), "InvalidParameterCombination");
        let mut ps = p(&[
            ("Size", "1"),
            ("TagSpecification.1.ResourceType", "volume"),
            ("TagSpecification.1.Tag.1.Key", "a"),
            ("TagSpecification.1.Tag.2.Key", "a"),
        ]);
        assert_eq!(code(create_volume(&mut ps)), "InvalidParameterValue");
        let mut ps = p(&[("Size", "1"), ("Bogus", "x")]);
        assert!(create_volume(&mut ps).is_ok());
        assert_eq!(code(ps.finish()), "UnknownParameter");
    }

    #[test]
    fn modify_volume_changes_only_the_size() {
        let mut ps = p(&[
            ("VolumeId", "vol-0123456789abcdef0"),
            ("Size", "2"),
            ("VolumeType", "gp2"),
        ]);
        assert_eq!(
            modify_volume(&mut ps).ok(),
            Some(("vol-0123456789abcdef0".to_string(), 2))
        );
        assert!(ps.finish().is_ok());
        let id = ("VolumeId", "vol-0123456789abcdef0");
        assert_eq!(code(modify_volume(&mut p(&[id]))), "MissingParameter");
        assert_eq!(
            code(modify_volume(&mut p(&[id, ("Size", "0")]))),
            "InvalidParameterValue"
        );
        assert_eq!(
            code(modify_volume(&mut p(&[id, ("Size", "2"), ("Iops", "100")]))),
            "UnsupportedOperation"
        );
        assert_eq!(
            code(modify_volume(&mut p(&[("Size", "2")]))),
            "MissingParameter"
        );
        assert_eq!(
            code(modify_volume(&mut p(&[
                ("VolumeId", "nonsense"),
                ("Size", "2")
            ]))),
            "InvalidParameterValue"
        );
    }

    #[test]
    fn attachments_are_refused_with_ec2_s_codes() {
        let mut v = super::super::render::tests::vol("vol-0123456789abcdef0", None);
        let here = HostRef {
            id: "host-1",
            name: "h1",
            pool: "local",
        };
        let other = HostRef {
            id: "host-2",
            name: "h2",
            pool: "local",
        };
        let refusal = |v: &VolumeRow, s: InstanceState, h: Option<HostRef<'_>>| {
            attach_refusal(v, "i-0123456789abcdef0", s, h).map(|e| e.code())
        };
        assert_eq!(refusal(&v, InstanceState::Running, Some(here)), None);
        assert_eq!(refusal(&v, InstanceState::Stopped, Some(here)), None);
        assert_eq!(
            refusal(&v, InstanceState::Running, Some(other)),
            Some("InvalidVolume.ZoneMismatch")
        );
        assert_eq!(
            refusal(&v, InstanceState::Terminated, Some(here)),
            Some("IncorrectInstanceState")
        );
        assert_eq!(
            refusal(&v, InstanceState::Pending, None),
            Some("IncorrectInstanceState")
        );
        // A shared pool's volume is reachable from any host of the pool.
        v.host_id = None;
        v.pool = "shared".into();
        let shared = HostRef {
            id: "host-3",
            name: "h3",
            pool: "shared",
        };
        assert_eq!(refusal(&v, InstanceState::Running, Some(shared)), None);
        assert_eq!(
            refusal(&v, InstanceState::Running, Some(other)),
            Some("InvalidVolume.ZoneMismatch")
        );
        v.state = "creating".into();
        assert_eq!(
            refusal(&v, InstanceState::Running, Some(shared)),
            Some("IncorrectState")
        );
        v.instance_id = Some("i-0123456789abcdef1".into());
        v.state = "in-use".into();
        assert_eq!(
            refusal(&v, InstanceState::Running, Some(shared)),
            Some("VolumeInUse")
        );
    }

    #[test]
    fn ids_are_checked_by_kind() {
        assert!(check_volume_id("vol-0123456789abcdef0").is_ok());
        assert_eq!(
            code(check_volume_id("snap-0123456789abcdef0")),
            "InvalidParameterValue"
        );
        assert!(check_snapshot_id("snap-0123456789abcdef0").is_ok());
        assert_eq!(code(check_snapshot_id("snap-")), "InvalidParameterValue");
        assert_eq!(
            code(check_instance_id("vol-0123456789abcdef0")),
            "InvalidInstanceID.Malformed"
        );
    }
}
