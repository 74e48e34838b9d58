//! Deterministic names and addresses derived from ids.

use sha2::{Digest, Sha256};

/// Prefix of tap devices named by [`tap_name`].
pub const TAP_PREFIX: &str = "kt-";

/// The tap device name for an instance: `"kt-"` + 12 hex chars, always 15 chars.
///
/// When the part of the id after its last `-` is at least 12 hex digits (EC2-style `i-0123456789abcdef0`,
/// or a UUID), its last 12 are used, so the name is recognisable; otherwise 12 hex chars of SHA-256(id).
pub fn tap_name(instance_id: &str) -> String {
    let tail = instance_id.rsplit('-').next().unwrap_or(instance_id);
    if tail.len() >= 12 && tail.bytes().all(|b| b.is_ascii_hexdigit()) {
        let start = tail.len() - 12;
        format!("{TAP_PREFIX}{}", tail[start..].to_ascii_lowercase())
    } else {
        let digest = Sha256::digest(instance_id.as_bytes());
        format!("{TAP_PREFIX}{}", &hex::encode(digest)[..12])
    }
}

/// 12 hex chars of SHA-256(`seed`): a short, stable piece of an interface name.
pub fn short_hash(seed: &str) -> String {
    hex::encode(Sha256::digest(seed.as_bytes()))[..12].to_string()
}

/// Short key naming a network's devices: its bridge name after `kb-`, or 12 hex chars of a hash of it.
pub(crate) fn network_key(bridge: &str) -> String {
    match bridge.strip_prefix(crate::BRIDGE_PREFIX) {
        Some(k) if !k.is_empty() && k.len() <= 12 => k.to_string(),
        _ => short_hash(bridge),
    }
}

/// A deterministic, locally administered, unicast MAC address derived from `seed`:
/// `02:` followed by 40 bits of SHA-256(seed).
pub fn mac_for(seed: &str) -> String {
    let digest = Sha256::digest(seed.as_bytes());
    let mut out = String::from("02");
    for b in &digest[..5] {
        out.push_str(&format!(":{b:02x}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_are_short_and_stable() {
        assert_eq!(tap_name("i-0123456789abcdef0"), "kt-56789abcdef0");
        assert_eq!(
            tap_name("0190c6a2-7f5e-7cc1-8d2b-3A4B5C6D7E8F"),
            "kt-3a4b5c6d7e8f"
        );
        let hashed = tap_name("vm one");
        assert_eq!(hashed.len(), 15);
        assert_eq!(hashed, tap_name("vm one"));
        assert_ne!(hashed, tap_name("vm two"));
        for id in [
            "x",
            "i-1",
            "a-very-long-instance-identifier-that-is-not-hex",
        ] {
            assert!(tap_name(id).len() <= 15);
        }
    }

    #[test]
    fn macs_are_local_unicast_and_stable() {
        let m = mac_for("i-1");
        assert_eq!(m, mac_for("i-1"));
        assert_ne!(m, mac_for("i-2"));
        assert!(m.starts_with("02:"));
        assert!(crate::spec::parse_mac(&m).is_ok());
    }
}
