//! IPv6 addressing of tenant networks: a /64 per network and SLAAC (EUI-64) addresses derived from
//! each VM's MAC, so a VM's IPv6 address never changes and is known to the store, the API and the
//! host firewall without asking the guest.

use std::net::Ipv6Addr;

use rand::Rng;

/// Why an IPv6 prefix or MAC address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Ipv6Error {
    #[error("{0:?} is not an IPv6 /64 prefix like fd60:1:2:3::/64")]
    NotPrefix(String),
    #[error("{0} is not a /64: SLAAC needs exactly 64 bits of prefix")]
    NotSlash64(String),
    #[error("{0} has host bits set; did you mean {1}/64?")]
    HostBits(String, Ipv6Addr),
    #[error("{0} is not a unicast prefix (link-local, multicast, loopback and :: are reserved)")]
    Reserved(String),
    #[error("MAC {0:?} is not of the form xx:xx:xx:xx:xx:xx")]
    Mac(String),
}

fn parse_mac(mac: &str) -> Result<[u8; 6], Ipv6Error> {
    let bad = || Ipv6Error::Mac(mac.to_string());
    let parts: Vec<&str> = mac.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut out = [0u8; 6];
    for (o, p) in out.iter_mut().zip(&parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *o = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// The modified EUI-64 interface identifier of a MAC (RFC 4291 appendix A): ff:fe in the middle,
/// the universal/local bit flipped.
fn interface_id(mac: &str) -> Result<u64, Ipv6Error> {
    let m = parse_mac(mac)?;
    let b = [m[0] ^ 0x02, m[1], m[2], 0xff, 0xfe, m[3], m[4], m[5]];
    Ok(u64::from_be_bytes(b))
}

/// The SLAAC address a host with `mac` forms in the /64 `prefix` (only the upper 64 bits of
/// `prefix` are used).
pub fn eui64(prefix: Ipv6Addr, mac: &str) -> Result<Ipv6Addr, Ipv6Error> {
    let net = u128::from(prefix) & !u128::from(u64::MAX);
    Ok(Ipv6Addr::from(net | u128::from(interface_id(mac)?)))
}

/// The link-local address (fe80::/64) a host with `mac` forms.
pub fn link_local(mac: &str) -> Result<Ipv6Addr, Ipv6Error> {
    eui64(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), mac)
}

/// Parses a network's IPv6 prefix: a unicast /64 without host bits. Returns its first address.
pub fn parse_prefix64(cidr: &str) -> Result<Ipv6Addr, Ipv6Error> {
    let bad = || Ipv6Error::NotPrefix(cidr.to_string());
    let (addr, len) = cidr.trim().split_once('/').ok_or_else(bad)?;
    let addr: Ipv6Addr = addr.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    if len != 64 {
        return Err(Ipv6Error::NotSlash64(cidr.to_string()));
    }
    let net = Ipv6Addr::from(u128::from(addr) & !u128::from(u64::MAX));
    if net != addr {
        return Err(Ipv6Error::HostBits(cidr.to_string(), net));
    }
    let first = addr.segments()[0];
    // fe80::/10 link-local, ff00::/8 multicast, ::/8 (loopback, unspecified, mapped).
    if first & 0xffc0 == 0xfe80 || first & 0xff00 == 0xff00 || first & 0xff00 == 0 {
        return Err(Ipv6Error::Reserved(cidr.to_string()));
    }
    Ok(addr)
}

/// The canonical text of a /64 prefix (`fd60:1::/64`).
pub fn prefix_text(prefix: Ipv6Addr) -> String {
    format!("{prefix}/64")
}

/// The gateway of a network's /64: `<prefix>::1`.
pub fn gateway(prefix: Ipv6Addr) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(prefix) | 1)
}

/// A random unique local /64 (RFC 4193: fd00::/8, a random 40-bit global id, subnet 0).
pub fn random_ula() -> Ipv6Addr {
    let global: u64 = rand::thread_rng().gen::<u64>() & 0xff_ffff_ffff;
    let high = (0xfd_u64 << 56) | (global << 16);
    Ipv6Addr::from(u128::from(high) << 64)
}

/// The SLAAC address of `mac` in the network prefix `cidr`; `None` when the network has no (valid)
/// prefix or the MAC is malformed.
pub fn address_in(cidr: Option<&str>, mac: &str) -> Option<Ipv6Addr> {
    let prefix = parse_prefix64(cidr?).ok()?;
    eui64(prefix, mac).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eui64_flips_the_local_bit_and_inserts_fffe() {
        let p: Ipv6Addr = "fd60:1::".parse().unwrap();
        assert_eq!(
            eui64(p, "52:54:00:12:34:56").unwrap(),
            "fd60:1::5054:ff:fe12:3456".parse::<Ipv6Addr>().unwrap()
        );
        // A locally administered MAC (02:…) gets the bit cleared.
        assert_eq!(
            link_local("02:aa:bb:cc:dd:ee").unwrap(),
            "fe80::aa:bbff:fecc:ddee".parse::<Ipv6Addr>().unwrap()
        );
        assert!(eui64(p, "52:54:00:12:34").is_err());
        assert!(eui64(p, "52:54:00:12:34:zz").is_err());
        assert_eq!(
            address_in(Some("fd60:1::/64"), "52:54:00:12:34:56").map(|a| a.to_string()),
            Some("fd60:1::5054:ff:fe12:3456".to_string())
        );
        assert_eq!(address_in(None, "52:54:00:12:34:56"), None);
    }

    #[test]
    fn prefixes_are_checked() {
        assert_eq!(
            parse_prefix64("fd60:1::/64").unwrap(),
            "fd60:1::".parse::<Ipv6Addr>().unwrap()
        );
        assert!(matches!(
            parse_prefix64("fd60:1::/48"),
            Err(Ipv6Error::NotSlash64(_))
        ));
        assert!(matches!(
            parse_prefix64("fd60:1::5/64"),
            Err(Ipv6Error::HostBits(..))
        ));
        for bad in [
            "fe80::/64",
            "ff02::/64",
            "::/64",
            "10.0.0.0/24",
            "fd60::",
            "x/64",
        ] {
            assert!(parse_prefix64(bad).is_err(), "accepted {bad}");
        }
        assert_eq!(
            gateway("fd60:1::".parse().unwrap()).to_string(),
            "fd60:1::1"
        );
    }

    #[test]
    fn random_ula_is_a_valid_fd_slash64() {
        let a = random_ula();
        assert_eq!(a.segments()[0] >> 8, 0xfd);
        assert_eq!(a.segments()[3], 0, "subnet id 0");
        assert!(parse_prefix64(&prefix_text(a)).is_ok());
        assert_ne!(random_ula(), random_ula());
    }
}
