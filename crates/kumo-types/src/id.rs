//! EC2-style resource ids (`i-` + 17 hex digits). Ids are random, so they are never reused;
//! rows are kept after deletion, so a collision would also be refused by the store.

use rand::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdKind {
    Instance,
    Image,
    Kernel,
    Ramdisk,
    Host,
    Operation,
    Project,
    User,
    Network,
    Request,
    PlacementGroup,
    SecurityGroup,
    SecurityGroupRule,
    KeyPair,
    /// An elastic IP allocation.
    Address,
    /// An elastic IP's association with an instance.
    Association,
    Volume,
    Snapshot,
    Backup,
    BackupSchedule,
}

impl IdKind {
    pub fn prefix(self) -> &'static str {
        match self {
            IdKind::Instance => "i",
            IdKind::Image => "ami",
            IdKind::Kernel => "aki",
            IdKind::Ramdisk => "ari",
            IdKind::Host => "host",
            IdKind::Operation => "op",
            IdKind::Project => "proj",
            IdKind::User => "user",
            IdKind::Network => "vpc",
            IdKind::Request => "req",
            IdKind::PlacementGroup => "pg",
            IdKind::SecurityGroup => "sg",
            IdKind::SecurityGroupRule => "sgr",
            IdKind::KeyPair => "key",
            IdKind::Address => "eipalloc",
            IdKind::Association => "eipassoc",
            IdKind::Volume => "vol",
            IdKind::Snapshot => "snap",
            IdKind::Backup => "backup",
            IdKind::BackupSchedule => "bsched",
        }
    }
}

pub fn new_id(kind: IdKind) -> String {
    let n: u128 = rand::thread_rng().gen();
    // 17 hex digits = 68 bits of randomness, the length EC2 uses.
    format!("{}-{:017x}", kind.prefix(), n & ((1u128 << 68) - 1))
}

/// Access key ids look like AWS ones so that tools which check the shape accept them.
pub fn new_access_key_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut rng = rand::thread_rng();
    let tail: String = (0..16)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    format!("AKIA{tail}")
}

pub fn new_secret() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut rng = rand::thread_rng();
    (0..40)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

/// True when `s` has the shape of an id of this kind.
pub fn is_id(kind: IdKind, s: &str) -> bool {
    match s.split_once('-') {
        Some((p, rest)) => {
            p == kind.prefix()
                && (rest.len() == 17 || rest.len() == 8)
                && rest
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        }
        None => false,
    }
}

/// Resource names: 1–63 characters, letters, digits, `-`, `_`, `.`, starting with a letter or digit.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err(format!(
            "name must be 1 to 63 characters long (got {})",
            name.len()
        ));
    }
    let first_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if !first_ok || !rest_ok {
        return Err(format!(
            "name {name:?} may only contain letters, digits, '-', '_' and '.', and must start with a letter or digit"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_ec2_shape_and_differ() {
        let a = new_id(IdKind::Instance);
        let b = new_id(IdKind::Instance);
        assert_ne!(a, b);
        assert!(is_id(IdKind::Instance, &a), "{a}");
        assert_eq!(a.len(), 2 + 17);
        assert!(!is_id(IdKind::Image, &a));
        assert!(!is_id(IdKind::Instance, "i-XYZ"));
    }

    #[test]
    fn access_keys_look_like_aws() {
        let k = new_access_key_id();
        assert!(k.starts_with("AKIA") && k.len() == 20);
        assert_eq!(new_secret().len(), 40);
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("web1").is_ok());
        assert!(validate_name("a.b_c-d").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name(&"x".repeat(64)).is_err());
        assert!(validate_name("-lead").is_err());
        assert!(validate_name("bad name").is_err());
        assert!(validate_name("semi;colon").is_err());
        assert!(validate_name("ünicode").is_err());
    }
}

/// A UUID in its canonical text form (`8-4-4-4-12` hex digits), e.g. an SMBIOS system UUID.
pub fn valid_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(p, n)| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A unicast MAC address `aa:bb:cc:dd:ee:ff` (not multicast, not all zeros).
pub fn valid_unicast_mac(s: &str) -> bool {
    let bytes: Vec<u8> = s
        .split(':')
        .filter(|p| p.len() == 2)
        .filter_map(|p| u8::from_str_radix(p, 16).ok())
        .collect();
    bytes.len() == 6 && s.len() == 17 && bytes[0] & 1 == 0 && bytes.iter().any(|b| *b != 0)
}

#[cfg(test)]
mod identity_tests {
    use super::*;

    #[test]
    fn uuids_and_macs() {
        assert!(valid_uuid("4c4c4544-0042-3510-8052-b4c04f4e4b32"));
        for bad in [
            "",
            "4c4c4544-0042-3510-8052",
            "4c4c4544-0042-3510-8052-b4c04f4e4b3g",
            "x",
        ] {
            assert!(!valid_uuid(bad), "{bad}");
        }
        assert!(valid_unicast_mac("00:1b:21:3a:4f:52"));
        assert!(valid_unicast_mac("02:00:00:00:00:01"));
        for bad in [
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
            "00:1b:21:3a:4f",
            "00-1b-21-3a-4f-52",
            "0:1b:21:3a:4f:52:",
        ] {
            assert!(!valid_unicast_mac(bad), "{bad}");
        }
    }
}
