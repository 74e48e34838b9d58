//! EC2 key pair actions. Fingerprints are OpenSSH's (`SHA256:…`) for created and imported
//! keys alike; private keys are answered once by CreateKeyPair and never kept.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use kumo_controller::OpError;
use kumo_store::KeyPairRow;
use kumo_types::id::validate_name;

use super::refuse_tags;
use crate::error::{not_found, Ec2Error};
use crate::filter::{check_names, matches_all};
use crate::params::Params;
use crate::xml::{ts, Xml};
use crate::Ctx;

const KEY_FILTERS: &[&str] = &["key-name", "key-pair-id", "fingerprint", "key-type"];

fn check_key_name(name: &str) -> Result<(), Ec2Error> {
    validate_name(name).map_err(|m| {
        Ec2Error::InvalidParameterValue(format!("Invalid value '{name}' for KeyName: {m}"))
    })
}

fn duplicate(name: &str) -> Ec2Error {
    Ec2Error::KeyPairDuplicate(format!("The keypair '{name}' already exists."))
}

/// `PublicKeyMaterial` is base64 of the key file (botocore encodes it); a bare OpenSSH line is
/// taken as it is.
fn public_key_text(material: &str) -> Result<String, Ec2Error> {
    let bad = || Ec2Error::KeyFormat("Key is not in valid OpenSSH public key format".into());
    let trimmed = material.trim();
    if trimmed.starts_with("ssh-") || trimmed.starts_with("ecdsa-") {
        return Ok(trimmed.to_string());
    }
    let raw = STANDARD.decode(trimmed).map_err(|_| bad())?;
    String::from_utf8(raw).map_err(|_| bad())
}

/// The key pair a RunInstances names, checked to be the caller's.
pub(crate) async fn launch_key(ctx: &Ctx<'_>, name: &str) -> Result<String, Ec2Error> {
    match ctx.ctl.key_pair(&ctx.scope, name).await {
        Ok(k) if k.name == name && k.project_id == ctx.scope.project_id => Ok(k.name),
        Ok(_) | Err(OpError::NotFound { .. }) => Err(not_found("key pair", name)),
        Err(e) => Err(e.into()),
    }
}

pub async fn create(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let name = p.required("KeyName")?;
    let key_type = p.string("KeyType");
    let format = p.string("KeyFormat");
    refuse_tags(&mut p, "key pairs")?;
    let dry = p.dry_run()?;
    p.finish()?;
    check_key_name(&name)?;
    if let Some(t) = &key_type {
        if t != "rsa" && t != "ed25519" {
            return Err(Ec2Error::InvalidParameterValue(format!(
                "Invalid value '{t}' for KeyType: expected rsa or ed25519"
            )));
        }
    }
    match format.as_deref() {
        None | Some("pem") => {}
        Some(f) => {
            return Err(Ec2Error::UnsupportedOperation(format!(
                "KeyFormat {f} is not supported by kumo; keys are handed out as pem"
            )))
        }
    }
    if dry {
        return Err(ctx.dry_run("CreateKeyPair"));
    }
    let (k, private) = match ctx
        .ctl
        .create_key_pair(&ctx.scope, &name, key_type.as_deref())
        .await
    {
        Ok(v) => v,
        Err(OpError::Conflict(_)) => return Err(duplicate(&name)),
        Err(e) => return Err(e.into()),
    };
    let mut x = Xml::new();
    x.response("CreateKeyPair", &ctx.request_id, |x| {
        x.leaf("keyName", &k.name);
        x.leaf("keyFingerprint", &k.fingerprint);
        x.leaf("keyMaterial", &private);
        x.leaf("keyPairId", &k.id);
        x.empty("tagSet");
    });
    Ok(x.finish())
}

pub async fn import(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let name = p.required("KeyName")?;
    let material = p.required("PublicKeyMaterial")?;
    refuse_tags(&mut p, "key pairs")?;
    let dry = p.dry_run()?;
    p.finish()?;
    check_key_name(&name)?;
    let line = public_key_text(&material)?;
    kumo_store::parse_public_key(&line).map_err(|e| Ec2Error::KeyFormat(e.to_string()))?;
    if dry {
        return Err(ctx.dry_run("ImportKeyPair"));
    }
    let k = match ctx.ctl.import_key_pair(&ctx.scope, &name, &line).await {
        Ok(k) => k,
        Err(OpError::Conflict(_)) => return Err(duplicate(&name)),
        Err(OpError::Invalid(m)) => return Err(Ec2Error::KeyFormat(m)),
        Err(e) => return Err(e.into()),
    };
    let mut x = Xml::new();
    x.response("ImportKeyPair", &ctx.request_id, |x| {
        x.leaf("keyFingerprint", &k.fingerprint);
        x.leaf("keyName", &k.name);
        x.leaf("keyPairId", &k.id);
        x.empty("tagSet");
    });
    Ok(x.finish())
}

/// Deleting a key pair that does not exist succeeds, as in EC2.
pub async fn delete(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let name = p.string("KeyName");
    let id = p.string("KeyPairId");
    let dry = p.dry_run()?;
    p.finish()?;
    let (key, by_id) = match (name, id) {
        (Some(n), None) => (n, false),
        (None, Some(i)) => (i, true),
        (None, None) => {
            return Err(Ec2Error::MissingParameter(
                "The request must contain the parameter KeyName or KeyPairId".into(),
            ))
        }
        (Some(_), Some(_)) => {
            return Err(Ec2Error::InvalidParameterCombination(
                "Only one of KeyName and KeyPairId may be given".into(),
            ))
        }
    };
    let found = match ctx.ctl.key_pair(&ctx.scope, &key).await {
        Ok(k) if (by_id && k.id == key) || (!by_id && k.name == key) => Some(k),
        Ok(_) | Err(OpError::NotFound { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    if dry {
        return Err(ctx.dry_run("DeleteKeyPair"));
    }
    if let Some(k) = &found {
        match ctx.ctl.delete_key_pair(&ctx.scope, &k.id).await {
            Ok(_) | Err(OpError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut x = Xml::new();
    x.response("DeleteKeyPair", &ctx.request_id, |x| {
        x.bool("return", true);
        x.opt("keyPairId", found.as_ref().map(|k| k.id.as_str()));
    });
    Ok(x.finish())
}

pub async fn describe(ctx: &Ctx<'_>, mut p: Params) -> Result<String, Ec2Error> {
    let names = p.list("KeyName")?;
    let ids = p.list("KeyPairId")?;
    let filters = p.filters()?;
    let public = p.bool("IncludePublicKey")?.unwrap_or(false);
    let dry = p.dry_run()?;
    p.finish()?;
    check_names(&filters, KEY_FILTERS, false)?;
    if dry {
        return Err(ctx.dry_run("DescribeKeyPairs"));
    }
    let all = ctx.ctl.key_pairs(&ctx.scope).await?;
    for (key, by_id) in names
        .iter()
        .map(|n| (n, false))
        .chain(ids.iter().map(|i| (i, true)))
    {
        if !all
            .iter()
            .any(|k| if by_id { &k.id == key } else { &k.name == key })
        {
            return Err(not_found("key pair", key));
        }
    }
    let shown: Vec<&KeyPairRow> = all
        .iter()
        .filter(|k| names.is_empty() || names.contains(&k.name))
        .filter(|k| ids.is_empty() || ids.contains(&k.id))
        .filter(|k| {
            matches_all(&filters, |f| match f {
                "key-name" => vec![k.name.clone()],
                "key-pair-id" => vec![k.id.clone()],
                "fingerprint" => vec![k.fingerprint.clone()],
                "key-type" => vec![k.key_type.clone()],
                _ => vec![],
            })
        })
        .collect();
    let mut x = Xml::new();
    x.response("DescribeKeyPairs", &ctx.request_id, |x| {
        x.set("keySet", &shown, |x, k| {
            x.leaf("keyPairId", &k.id);
            x.leaf("keyType", &k.key_type);
            x.empty("tagSet");
            x.leaf("keyName", &k.name);
            x.leaf("keyFingerprint", &k.fingerprint);
            x.leaf("createTime", &ts(k.created_at));
            if public {
                x.leaf("publicKey", &k.public_key);
            }
        });
    });
    Ok(x.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_key_material_is_base64_or_a_line() {
        let line =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIF2UTqqTm3O46VP9U6wi5zRgsKtgAgYTehtK6/sPyjCM a";
        assert_eq!(
            public_key_text(&STANDARD.encode(line)).ok().as_deref(),
            Some(line)
        );
        assert_eq!(public_key_text(line).ok().as_deref(), Some(line));
        for bad in ["%%%", &STANDARD.encode([0xff, 0xfe, 0x00])] {
            assert_eq!(
                public_key_text(bad).err().map(|e| e.code()),
                Some("InvalidKey.Format")
            );
        }
        assert_eq!(
            check_key_name("bad name").err().map(|e| e.code()),
            Some("InvalidParameterValue")
        );
    }
}
