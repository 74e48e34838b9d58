//! `kumo network ...`, `kumo address-pool ...` and `kumo address ...`: tenant networks, the
//! operator's public address pool and elastic IPs.

use clap::Subcommand;
use kumo_types::api::Page;
use kumo_types::networks::{
    Address, AddressPool, AssociateAddress, CreateNetwork, Network, SetAddressPool,
};

use crate::commands::{print_json, table, Output};
use crate::{Client, ClientError};

fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

impl Client {
    pub async fn networks(&self) -> Result<Vec<Network>, ClientError> {
        Ok(self.get::<Page<Network>>("/api/v1/networks").await?.items)
    }

    pub async fn network(&self, id: &str) -> Result<Network, ClientError> {
        self.get(&format!("/api/v1/networks/{}", enc(id))).await
    }

    pub async fn create_network(&self, req: &CreateNetwork) -> Result<Network, ClientError> {
        self.post("/api/v1/networks", req).await
    }

    pub async fn delete_network(&self, id: &str) -> Result<(), ClientError> {
        self.no_content("DELETE", &format!("/api/v1/networks/{}", enc(id)))
            .await
    }

    pub async fn address_pool(&self) -> Result<AddressPool, ClientError> {
        self.get("/api/v1/address-pool").await
    }

    pub async fn set_address_pool(&self, req: &SetAddressPool) -> Result<AddressPool, ClientError> {
        let v = serde_json::to_value(req).map_err(|e| ClientError::Http(e.to_string()))?;
        self.request("PUT", "/api/v1/address-pool", Some(&v), None)
            .await
    }

    pub async fn addresses(&self) -> Result<Vec<Address>, ClientError> {
        Ok(self.get::<Page<Address>>("/api/v1/addresses").await?.items)
    }

    pub async fn allocate_address(&self) -> Result<Address, ClientError> {
        self.request("POST", "/api/v1/addresses", None, None).await
    }

    /// Release an address (allocation id or public IP).
    pub async fn release_address(&self, id: &str) -> Result<(), ClientError> {
        self.no_content("DELETE", &format!("/api/v1/addresses/{}", enc(id)))
            .await
    }

    pub async fn associate_address(
        &self,
        id: &str,
        req: &AssociateAddress,
    ) -> Result<Address, ClientError> {
        self.post(&format!("/api/v1/addresses/{}/associate", enc(id)), req)
            .await
    }

    pub async fn disassociate_address(&self, id: &str) -> Result<Address, ClientError> {
        self.request(
            "POST",
            &format!("/api/v1/addresses/{}/disassociate", enc(id)),
            None,
            None,
        )
        .await
    }

    /// A request answered by 204 No Content.
    async fn no_content(&self, method: &str, path: &str) -> Result<(), ClientError> {
        match self
            .request::<serde_json::Value>(method, path, None, None)
            .await
        {
            Ok(_) => Ok(()),
            // An empty body is what 204 means.
            Err(ClientError::Http(m)) if m.contains("EOF while parsing") => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum NetworkCmd {
    /// Create a network in your project (VXLAN; VLAN with --vlan, administrators only).
    Create {
        name: String,
        /// IPv4 CIDR, prefix length 16 to 28, e.g. 10.1.0.0/24.
        #[arg(long)]
        cidr: String,
        /// Make it a VLAN network with this 802.1Q tag (1-4094).
        #[arg(long = "vlan")]
        vlan_tag: Option<u32>,
        /// Dual stack: also an IPv6 /64 (a random unique local one unless --ipv6-cidr gives it);
        /// guests configure their address by SLAAC.
        #[arg(long)]
        ipv6: bool,
        /// The IPv6 /64 of a dual-stack network, e.g. fd60:1::/64 (implies --ipv6).
        #[arg(long = "ipv6-cidr")]
        ipv6_cidr: Option<String>,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    #[command(alias = "ls")]
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Show one network (id or name).
    Show {
        id: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Delete a network no live instance uses.
    #[command(alias = "rm")]
    Delete { id: String },
}

#[derive(Debug, Subcommand)]
pub enum AddressPoolCmd {
    /// Define or replace the public address pool (administrators).
    Set {
        /// The public subnet, e.g. 203.0.113.0/24.
        #[arg(long)]
        cidr: String,
        /// Next hop for traffic leaving through an elastic IP.
        #[arg(long)]
        gateway: String,
        /// Addresses handed out, FIRST-LAST (inclusive).
        #[arg(long)]
        range: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// The pool and how much of it is allocated.
    Show {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub enum AddressCmd {
    /// Allocate an elastic IP (the pool's lowest free address) to your project.
    Allocate {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    #[command(alias = "ls")]
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Map an address (allocation id or IP) to an instance (id or name).
    Associate {
        address: String,
        instance: String,
        /// Move the address even if it is associated with another instance.
        #[arg(long)]
        allow_reassociation: bool,
    },
    Disassociate {
        address: String,
    },
    /// Give an address back to the pool (disassociate it first).
    Release {
        address: String,
    },
}

/// `FIRST-LAST` of `--range`.
fn split_range(range: &str) -> Result<(String, String), ClientError> {
    range
        .split_once('-')
        .map(|(a, b)| (a.trim().to_string(), b.trim().to_string()))
        .filter(|(a, b)| !a.is_empty() && !b.is_empty())
        .ok_or_else(|| {
            ClientError::Config(format!(
                "--range must be FIRST-LAST, e.g. 203.0.113.10-203.0.113.200 (got {range:?})"
            ))
        })
}

fn show_network(n: &Network, output: Output) -> Result<(), ClientError> {
    if output == Output::Json {
        return print_json(n);
    }
    let isolation = match (n.vni, n.vlan_tag) {
        (Some(vni), _) => format!("{} (VNI {vni})", n.isolation),
        (_, Some(tag)) => format!("{} (tag {tag})", n.isolation),
        _ => n.isolation.clone(),
    };
    let mut t = table(&["field", "value"]);
    for (k, v) in [
        ("id", n.id.clone()),
        ("name", n.name.clone()),
        ("project", n.project_id.clone()),
        ("cidr", n.cidr.clone()),
        ("gateway", n.gateway.clone()),
        (
            "ipv6 cidr",
            n.ipv6_cidr.clone().unwrap_or_else(|| "-".into()),
        ),
        ("isolation", isolation),
        (
            "mtu",
            n.mtu.map(|m| m.to_string()).unwrap_or_else(|| "-".into()),
        ),
        ("default", n.is_default.to_string()),
        ("instances", n.instances.to_string()),
        ("created", n.created_at.to_rfc3339()),
    ] {
        t.add_row(vec![k.to_string(), v]);
    }
    println!("{t}");
    Ok(())
}

fn show_pool(p: &AddressPool, output: Output) -> Result<(), ClientError> {
    if output == Output::Json {
        return print_json(p);
    }
    println!(
        "{} via {}: {}-{} ({} used, {} free of {})",
        p.cidr, p.gateway, p.first, p.last, p.used, p.free, p.size
    );
    Ok(())
}

impl NetworkCmd {
    pub async fn run(self, client: &Client) -> Result<(), ClientError> {
        match self {
            NetworkCmd::Create {
                name,
                cidr,
                vlan_tag,
                ipv6,
                ipv6_cidr,
                output,
            } => {
                let n = client
                    .create_network(&CreateNetwork {
                        name,
                        cidr,
                        isolation: vlan_tag.map(|_| "vlan".into()),
                        vlan_tag,
                        ipv6,
                        ipv6_cidr,
                    })
                    .await?;
                if output == Output::Json {
                    return print_json(&n);
                }
                match &n.ipv6_cidr {
                    Some(v6) => println!(
                        "{} {} ({} and {v6}, gateway {})",
                        n.id, n.name, n.cidr, n.gateway
                    ),
                    None => println!("{} {} ({}, gateway {})", n.id, n.name, n.cidr, n.gateway),
                }
            }
            NetworkCmd::List { output } => {
                let list = client.networks().await?;
                if output == Output::Json {
                    return print_json(&list);
                }
                let mut t = table(&["id", "name", "cidr", "isolation", "instances", "project"]);
                for n in list {
                    let iso = match (n.vni, n.vlan_tag) {
                        (Some(v), _) => format!("vxlan {v}"),
                        (_, Some(tag)) => format!("vlan {tag}"),
                        _ => n.isolation,
                    };
                    t.add_row(vec![
                        n.id,
                        n.name,
                        n.cidr,
                        iso,
                        n.instances.to_string(),
                        n.project_id,
                    ]);
                }
                println!("{t}");
            }
            NetworkCmd::Show { id, output } => show_network(&client.network(&id).await?, output)?,
            NetworkCmd::Delete { id } => {
                client.delete_network(&id).await?;
                println!("deleted");
            }
        }
        Ok(())
    }
}

impl AddressPoolCmd {
    pub async fn run(self, client: &Client) -> Result<(), ClientError> {
        match self {
            AddressPoolCmd::Set {
                cidr,
                gateway,
                range,
                output,
            } => {
                let (first, last) = split_range(&range)?;
                let p = client
                    .set_address_pool(&SetAddressPool {
                        cidr,
                        gateway,
                        first,
                        last,
                    })
                    .await?;
                show_pool(&p, output)?;
            }
            AddressPoolCmd::Show { output } => show_pool(&client.address_pool().await?, output)?,
        }
        Ok(())
    }
}

impl AddressCmd {
    pub async fn run(self, client: &Client) -> Result<(), ClientError> {
        match self {
            AddressCmd::Allocate { output } => {
                let a = client.allocate_address().await?;
                if output == Output::Json {
                    return print_json(&a);
                }
                println!("{} {}", a.id, a.public_ip);
            }
            AddressCmd::List { output } => {
                let list = client.addresses().await?;
                if output == Output::Json {
                    return print_json(&list);
                }
                let mut t = table(&["id", "public ip", "instance", "private ip", "association"]);
                for a in list {
                    t.add_row(vec![
                        a.id,
                        a.public_ip,
                        a.instance_id.unwrap_or_else(|| "-".into()),
                        a.private_ip.unwrap_or_else(|| "-".into()),
                        a.association_id.unwrap_or_else(|| "-".into()),
                    ]);
                }
                println!("{t}");
            }
            AddressCmd::Associate {
                address,
                instance,
                allow_reassociation,
            } => {
                let a = client
                    .associate_address(
                        &address,
                        &AssociateAddress {
                            instance_id: instance,
                            allow_reassociation,
                        },
                    )
                    .await?;
                println!(
                    "{} -> {} ({})",
                    a.public_ip,
                    a.instance_id.unwrap_or_default(),
                    a.private_ip.unwrap_or_default()
                );
            }
            AddressCmd::Disassociate { address } => {
                let a = client.disassociate_address(&address).await?;
                println!("{} is not associated", a.public_ip);
            }
            AddressCmd::Release { address } => {
                client.release_address(&address).await?;
                println!("released");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_on_the_dash() {
        let ok = split_range("203.0.113.10-203.0.113.20").ok();
        assert_eq!(
            ok,
            Some(("203.0.113.10".to_string(), "203.0.113.20".to_string()))
        );
        for bad in ["203.0.113.10", "-203.0.113.20", "203.0.113.10-", ""] {
            assert!(split_range(bad).is_err(), "{bad}");
        }
    }
}
