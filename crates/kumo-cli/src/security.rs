//! `kumo sg ...` and `kumo key ...`, and the client calls behind them.

use std::io::Write;
use std::path::PathBuf;

use clap::{ArgGroup, Subcommand, ValueEnum};
use kumo_types::api::{Instance, Page};
use kumo_types::security::{
    CreateKeyPair, CreateSecurityGroup, CreateSecurityGroupRule, KeyPair, SecurityGroup,
    SecurityGroupRule, SetSecurityGroups,
};

use crate::commands::{print_json, table, Output};
use crate::{Client, ClientError};

fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

impl Client {
    pub async fn security_groups(&self) -> Result<Vec<SecurityGroup>, ClientError> {
        Ok(self
            .get::<Page<SecurityGroup>>("/api/v1/security-groups")
            .await?
            .items)
    }

    pub async fn security_group(&self, id: &str) -> Result<SecurityGroup, ClientError> {
        self.get(&format!("/api/v1/security-groups/{}", enc(id)))
            .await
    }

    pub async fn create_security_group(
        &self,
        req: &CreateSecurityGroup,
    ) -> Result<SecurityGroup, ClientError> {
        self.post("/api/v1/security-groups", req).await
    }

    pub async fn delete_security_group(&self, id: &str) -> Result<(), ClientError> {
        self.delete_empty(&format!("/api/v1/security-groups/{}", enc(id)))
            .await
    }

    pub async fn add_security_group_rule(
        &self,
        group: &str,
        rule: &CreateSecurityGroupRule,
    ) -> Result<SecurityGroupRule, ClientError> {
        self.post(
            &format!("/api/v1/security-groups/{}/rules", enc(group)),
            rule,
        )
        .await
    }

    pub async fn revoke_security_group_rule(
        &self,
        group: &str,
        rule_id: &str,
    ) -> Result<(), ClientError> {
        self.delete_empty(&format!(
            "/api/v1/security-groups/{}/rules/{}",
            enc(group),
            enc(rule_id)
        ))
        .await
    }

    /// Replace an instance's security groups.
    pub async fn set_instance_security_groups(
        &self,
        instance: &str,
        groups: &[String],
    ) -> Result<Instance, ClientError> {
        let body = serde_json::to_value(SetSecurityGroups {
            groups: groups.to_vec(),
        })
        .map_err(|e| ClientError::Http(e.to_string()))?;
        self.request(
            "PUT",
            &format!("/api/v1/instances/{}/security-groups", enc(instance)),
            Some(&body),
            None,
        )
        .await
    }

    pub async fn key_pairs(&self) -> Result<Vec<KeyPair>, ClientError> {
        Ok(self.get::<Page<KeyPair>>("/api/v1/key-pairs").await?.items)
    }

    /// Generate (no `public_key`: the answer carries the private key, once) or import a key.
    pub async fn create_key_pair(&self, req: &CreateKeyPair) -> Result<KeyPair, ClientError> {
        self.post("/api/v1/key-pairs", req).await
    }

    pub async fn delete_key_pair(&self, name: &str) -> Result<(), ClientError> {
        self.delete_empty(&format!("/api/v1/key-pairs/{}", enc(name)))
            .await
    }

    /// DELETE answered by 204 No Content.
    async fn delete_empty(&self, path: &str) -> Result<(), ClientError> {
        match self
            .request::<serde_json::Value>("DELETE", path, None, None)
            .await
        {
            Ok(_) => Ok(()),
            // 204 has no body.
            Err(ClientError::Http(m)) if m.contains("EOF while parsing") => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
    All,
}

#[derive(Clone, Copy, Debug, Default, ValueEnum, PartialEq, Eq)]
pub enum KeyType {
    #[default]
    Ed25519,
    Rsa,
}

/// `80` or `8000-8100`.
fn parse_ports(s: &str) -> Result<(u16, u16), String> {
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .map_err(|_| format!("{p:?} is not a port (0-65535)"))
    };
    match s.split_once('-') {
        Some((a, b)) => Ok((port(a)?, port(b)?)),
        None => {
            let p = port(s)?;
            Ok((p, p))
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum SgCmd {
    /// Create a security group (it starts with no rules: nothing may reach its members).
    Create {
        name: String,
        #[arg(long, default_value = "")]
        description: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    #[command(alias = "ls")]
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// A group and its rules.
    Show {
        sg: String,
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    /// Delete a group no live instance uses (the default group stays).
    #[command(alias = "rm")]
    Delete { sg: String },
    /// Allow traffic: from a CIDR or a group's members (to them, with --egress).
    #[command(group(ArgGroup::new("peer").required(true).args(["from", "from_group"])))]
    Allow {
        sg: String,
        #[arg(long, value_enum)]
        proto: Proto,
        /// PORT or FIRST-LAST (tcp and udp; default: every port).
        #[arg(long, value_parser = parse_ports)]
        port: Option<(u16, u16)>,
        /// The peer's IPv4 CIDR, e.g. 0.0.0.0/0.
        #[arg(long)]
        from: Option<String>,
        /// The members of this group (id or name) as the peer.
        #[arg(long)]
        from_group: Option<String>,
        /// A rule for outbound traffic (the peer is the destination).
        #[arg(long)]
        egress: bool,
        #[arg(long)]
        description: Option<String>,
    },
    /// Remove a rule (ids are in `kumo sg show`).
    Revoke { sg: String, rule_id: String },
}

#[derive(Debug, Subcommand)]
pub enum KeyCmd {
    /// Generate a key pair: the private key is shown once (or written to --out, mode 0600).
    Create {
        name: String,
        #[arg(long = "type", value_enum, default_value_t)]
        key_type: KeyType,
        /// Write the private key here (never overwrites a file).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Import an OpenSSH public key (a .pub file).
    Import { name: String, pubkey_file: PathBuf },
    #[command(alias = "ls")]
    List {
        #[arg(short, long, value_enum, default_value_t)]
        output: Output,
    },
    #[command(alias = "rm")]
    Delete { name: String },
}

fn ports(r: &SecurityGroupRule) -> String {
    match (r.from_port, r.to_port) {
        (Some(0), Some(65535)) => "all".into(),
        (Some(a), Some(b)) if a == b => a.to_string(),
        (Some(a), Some(b)) => format!("{a}-{b}"),
        _ => "-".into(),
    }
}

fn print_group(g: &SecurityGroup, names: &[SecurityGroup]) {
    println!("{} {} ({})", g.id, g.name, g.description);
    let mut t = table(&[
        "rule",
        "direction",
        "protocol",
        "ports",
        "peer",
        "description",
    ]);
    for r in &g.rules {
        let peer = match (&r.cidr, &r.source_group) {
            (Some(c), _) => c.clone(),
            (None, Some(s)) => {
                let name = names.iter().find(|n| &n.id == s).map(|n| n.name.as_str());
                format!("group {}", name.unwrap_or(s))
            }
            (None, None) => "-".into(),
        };
        t.add_row(vec![
            r.id.clone(),
            r.direction.clone(),
            r.protocol.clone(),
            ports(r),
            peer,
            r.description.clone().unwrap_or_default(),
        ]);
    }
    println!("{t}");
}

impl SgCmd {
    pub async fn run(self, client: &Client) -> Result<(), ClientError> {
        match self {
            SgCmd::Create {
                name,
                description,
                output,
            } => {
                let g = client
                    .create_security_group(&CreateSecurityGroup {
                        name,
                        description: Some(description),
                    })
                    .await?;
                if output == Output::Json {
                    return print_json(&g);
                }
                println!("{} {}", g.id, g.name);
            }
            SgCmd::List { output } => {
                let groups = client.security_groups().await?;
                if output == Output::Json {
                    return print_json(&groups);
                }
                let mut t = table(&["id", "name", "ingress", "egress", "description"]);
                for g in groups {
                    let n = |d: &str| g.rules.iter().filter(|r| r.direction == d).count();
                    t.add_row(vec![
                        g.id.clone(),
                        g.name.clone(),
                        n("ingress").to_string(),
                        n("egress").to_string(),
                        g.description.clone(),
                    ]);
                }
                println!("{t}");
            }
            SgCmd::Show { sg, output } => {
                let g = client.security_group(&sg).await?;
                if output == Output::Json {
                    return print_json(&g);
                }
                let names = if g.rules.iter().any(|r| r.source_group.is_some()) {
                    client.security_groups().await?
                } else {
                    vec![]
                };
                print_group(&g, &names);
            }
            SgCmd::Delete { sg } => {
                client.delete_security_group(&sg).await?;
                println!("deleted");
            }
            SgCmd::Allow {
                sg,
                proto,
                port,
                from,
                from_group,
                egress,
                description,
            } => {
                let protocol = match proto {
                    Proto::Tcp => "tcp",
                    Proto::Udp => "udp",
                    Proto::Icmp => "icmp",
                    Proto::Icmpv6 => "icmpv6",
                    Proto::All => "all",
                };
                let r = client
                    .add_security_group_rule(
                        &sg,
                        &CreateSecurityGroupRule {
                            direction: Some(if egress { "egress" } else { "ingress" }.into()),
                            protocol: protocol.into(),
                            from_port: port.map(|p| i64::from(p.0)),
                            to_port: port.map(|p| i64::from(p.1)),
                            cidr: from,
                            source_group: from_group,
                            description,
                        },
                    )
                    .await?;
                println!("{} {} {} {}", r.id, r.direction, r.protocol, ports(&r));
            }
            SgCmd::Revoke { sg, rule_id } => {
                client.revoke_security_group_rule(&sg, &rule_id).await?;
                println!("revoked");
            }
        }
        Ok(())
    }
}

/// A new file only this user can read; an existing file is never replaced.
fn write_private(path: &PathBuf, key: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(key.as_bytes())?;
    f.sync_all()
}

impl KeyCmd {
    pub async fn run(self, client: &Client) -> Result<(), ClientError> {
        match self {
            KeyCmd::Create {
                name,
                key_type,
                out,
            } => {
                // Checked first: the private key exists only in the answer.
                if let Some(p) = &out {
                    if p.exists() {
                        return Err(ClientError::Config(format!(
                            "{} exists; kumo does not overwrite it",
                            p.display()
                        )));
                    }
                }
                let k = client
                    .create_key_pair(&CreateKeyPair {
                        name,
                        key_type: Some(
                            match key_type {
                                KeyType::Ed25519 => "ed25519",
                                KeyType::Rsa => "rsa",
                            }
                            .into(),
                        ),
                        public_key: None,
                    })
                    .await?;
                let private = k.private_key.clone().unwrap_or_default();
                match out {
                    Some(p) => {
                        if let Err(e) = write_private(&p, &private) {
                            // Not lost: the key cannot be fetched again.
                            print!("{private}");
                            return Err(ClientError::Failed(format!(
                                "cannot write {}: {e}; the private key is printed above",
                                p.display()
                            )));
                        }
                        println!(
                            "{} {} ({}), private key in {}",
                            k.id,
                            k.name,
                            k.fingerprint,
                            p.display()
                        );
                    }
                    None => {
                        eprintln!("{} {} ({})", k.id, k.name, k.fingerprint);
                        print!("{private}");
                    }
                }
            }
            KeyCmd::Import { name, pubkey_file } => {
                let public_key = std::fs::read_to_string(&pubkey_file).map_err(|e| {
                    ClientError::Config(format!("cannot read {}: {e}", pubkey_file.display()))
                })?;
                let k = client
                    .create_key_pair(&CreateKeyPair {
                        name,
                        key_type: None,
                        public_key: Some(public_key),
                    })
                    .await?;
                println!("{} {} ({})", k.id, k.name, k.fingerprint);
            }
            KeyCmd::List { output } => {
                let keys = client.key_pairs().await?;
                if output == Output::Json {
                    return print_json(&keys);
                }
                let mut t = table(&["id", "name", "type", "fingerprint"]);
                for k in keys {
                    t.add_row(vec![k.id, k.name, k.key_type, k.fingerprint]);
                }
                println!("{t}");
            }
            KeyCmd::Delete { name } => {
                client.delete_key_pair(&name).await?;
                println!("deleted");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_parse() {
        assert_eq!(parse_ports("80"), Ok((80, 80)));
        assert_eq!(parse_ports("8000-8100"), Ok((8000, 8100)));
        assert!(parse_ports("70000").is_err());
        assert!(parse_ports("a-b").is_err());
    }

    #[test]
    fn private_keys_are_written_0600_and_never_over_a_file() {
        use std::os::unix::fs::PermissionsExt;
        struct Gone(PathBuf);
        impl Drop for Gone {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let dir =
            Gone(std::env::temp_dir().join(format!("kumo-cli-test-{}-{n}", std::process::id())));
        std::fs::create_dir(&dir.0).expect("dir");
        let p = dir.0.join("k.pem");
        write_private(&p, "secret").expect("write");
        let mode = std::fs::metadata(&p).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(write_private(&p, "other").is_err());
        assert_eq!(std::fs::read_to_string(&p).expect("read"), "secret");
    }
}
