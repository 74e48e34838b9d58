//! VXLAN flooding lists: one all-zeros forwarding entry per peer host, so broadcasts (ARP, DHCP is kept
//! local by the firewall) reach every host carrying the network; unicast MACs are learned.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::path::Path;

use serde::Deserialize;

use crate::cmd;
use crate::error::NetworkError;

const FLOOD: &str = "00:00:00:00:00:00";

#[derive(Debug, Deserialize)]
struct Entry {
    mac: String,
    dst: Option<String>,
}

/// Makes the flooding entries of `dev` exactly `peers`; returns the repairs made.
pub(crate) async fn apply(
    bridge: &Path,
    netns: Option<&str>,
    dev: &str,
    peers: &[Ipv4Addr],
) -> Result<Vec<String>, NetworkError> {
    let mut base: Vec<String> = Vec::new();
    if let Some(ns) = netns {
        base.extend(["-n".to_string(), ns.to_string()]);
    }
    let mut show = base.clone();
    show.extend(["-j", "fdb", "show", "dev", dev].map(String::from));
    let out = cmd::run(bridge, &show, None).await?;
    let entries: Vec<Entry> = if out.trim().is_empty() {
        vec![]
    } else {
        serde_json::from_str(&out).map_err(|source| NetworkError::Parse {
            command: cmd::describe(bridge, &show),
            source,
        })?
    };
    let have: BTreeSet<Ipv4Addr> = entries
        .iter()
        .filter(|e| e.mac == FLOOD)
        .filter_map(|e| e.dst.as_deref()?.parse().ok())
        .collect();
    let want: BTreeSet<Ipv4Addr> = peers.iter().copied().collect();
    let mut lines = Vec::new();
    let mut repairs = Vec::new();
    for p in want.difference(&have) {
        lines.push(format!("fdb append {FLOOD} dev {dev} dst {p}"));
        repairs.push(format!("{dev}: added peer {p}"));
    }
    for p in have.difference(&want) {
        lines.push(format!("fdb del {FLOOD} dev {dev} dst {p}"));
        repairs.push(format!("{dev}: removed peer {p}"));
    }
    if !lines.is_empty() {
        let mut input = lines.join("\n");
        input.push('\n');
        let mut args = base;
        args.extend(["-batch", "-"].map(String::from));
        cmd::run(bridge, &args, Some(&input)).await?;
    }
    Ok(repairs)
}
