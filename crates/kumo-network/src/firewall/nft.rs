//! Applying rendered rulesets with `nft -f` and repairing drift (see [`Nft::ensure`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cmd;
use crate::error::{io_err, NetworkError};

/// Runs `nft`, optionally inside a named network namespace.
#[derive(Debug, Clone)]
pub struct Nft {
    bin: PathBuf,
    ip: PathBuf,
}

/// What [`Nft::ensure`] remembers between calls.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    rendered_sha256: String,
    listing: String,
}

fn check_tables(tables: &[(&str, &str)]) -> Result<(), NetworkError> {
    const FAMILIES: [&str; 6] = ["ip", "ip6", "inet", "arp", "bridge", "netdev"];
    for (family, name) in tables {
        let name_ok = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !FAMILIES.contains(family) || !name_ok {
            return Err(NetworkError::InvalidSpec(format!(
                "nftables table {family:?} {name:?} is not a valid family and name"
            )));
        }
    }
    Ok(())
}

fn table_list(tables: &[(&str, &str)]) -> String {
    let names: Vec<String> = tables.iter().map(|(f, n)| format!("{f} {n}")).collect();
    names.join(", ")
}

impl Nft {
    /// Finds `nft` and `ip` (for `ip netns exec`).
    pub fn new() -> Result<Self, NetworkError> {
        Ok(Self {
            bin: cmd::find_program("nft")?,
            ip: cmd::find_program("ip")?,
        })
    }

    async fn run(
        &self,
        netns: Option<&str>,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<String, NetworkError> {
        let nft_args = args.iter().map(|a| a.to_string());
        match netns {
            None => cmd::run(&self.bin, &nft_args.collect::<Vec<_>>(), stdin).await,
            Some(ns) => {
                crate::netns::check_name(ns)?;
                let mut v = vec!["netns".to_string(), "exec".into(), ns.into()];
                v.push(self.bin.display().to_string());
                v.extend(nft_args);
                cmd::run(&self.ip, &v, stdin).await
            }
        }
    }

    /// Runs `nft -f -` with `text`: one transaction, all or nothing.
    pub async fn apply(&self, netns: Option<&str>, text: &str) -> Result<(), NetworkError> {
        self.run(netns, &["-f", "-"], Some(text)).await.map(|_| ())
    }

    /// `nft list table` of each table that exists, concatenated in the order given.
    pub async fn listing(
        &self,
        netns: Option<&str>,
        tables: &[(&str, &str)],
    ) -> Result<String, NetworkError> {
        check_tables(tables)?;
        let present = self.run(netns, &["list", "tables"], None).await?;
        let present: BTreeSet<&str> = present.lines().map(str::trim).collect();
        let mut out = String::new();
        for (family, name) in tables {
            if present.contains(format!("table {family} {name}").as_str()) {
                out.push_str(
                    &self
                        .run(netns, &["list", "table", family, name], None)
                        .await?,
                );
            }
        }
        Ok(out)
    }

    /// Deletes the tables; missing ones are fine.
    pub async fn delete(
        &self,
        netns: Option<&str>,
        tables: &[(&str, &str)],
    ) -> Result<(), NetworkError> {
        check_tables(tables)?;
        let mut text = String::new();
        for (family, name) in tables {
            text.push_str(&format!(
                "table {family} {name} {{}}\ndelete table {family} {name}\n"
            ));
        }
        self.apply(netns, &text).await
    }

    /// Makes `tables` hold `rendered`. Applies it when it differs from what was applied last (per the
    /// `record` file) and re-applies it when the live tables drifted from the listing recorded right
    /// after that. Returns what it did, in words, or None when everything already matched.
    pub async fn ensure(
        &self,
        netns: Option<&str>,
        tables: &[(&str, &str)],
        rendered: &str,
        record: &Path,
    ) -> Result<Option<String>, NetworkError> {
        check_tables(tables)?;
        let hash = hex::encode(Sha256::digest(rendered.as_bytes()));
        let old = load_record(record)?;
        let what = match &old {
            Some(r) if r.rendered_sha256 == hash => {
                let live = self.listing(netns, tables).await?;
                if live == r.listing {
                    return Ok(None);
                }
                let (drifted, detail) = describe_drift(&r.listing, &live);
                format!("repaired nftables drift in {drifted}: {detail}")
            }
            Some(_) => format!(
                "applied new nftables ruleset ({}; {} lines, sha256 {}, replacing a different one)",
                table_list(tables),
                rendered.lines().count(),
                &hash[..12]
            ),
            None => format!(
                "applied new nftables ruleset ({}; {} lines, sha256 {})",
                table_list(tables),
                rendered.lines().count(),
                &hash[..12]
            ),
        };
        self.apply(netns, rendered).await?;
        let listing = self.listing(netns, tables).await?;
        save_record(
            record,
            &Record {
                rendered_sha256: hash,
                listing,
            },
        )?;
        Ok(Some(what))
    }
}

/// The record, or None when there is none or it is unreadable (then the ruleset is simply re-applied).
fn load_record(path: &Path) -> Result<Option<Record>, NetworkError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(serde_json::from_str(&text).ok()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn save_record(path: &Path, record: &Record) -> Result<(), NetworkError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let text = serde_json::to_string(record).map_err(|e| io_err(path)(e.into()))?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// An nft listing split into tables → blocks ("chain x", "set y") → normalised lines.
type Blocks = BTreeMap<String, BTreeMap<String, Vec<String>>>;

fn parse_listing(listing: &str) -> Blocks {
    let mut tables: Blocks = BTreeMap::new();
    let mut table: Option<String> = None;
    let mut block: Option<String> = None;
    for line in listing.lines() {
        if let Some(t) = line.strip_prefix("table ") {
            let t = t.trim_end_matches('{').trim().to_string();
            tables.entry(t.clone()).or_default();
            table = Some(t);
            block = None;
            continue;
        }
        let Some(t) = &table else { continue };
        let blocks = tables.entry(t.clone()).or_default();
        if line == "\t}" {
            block = None;
        } else if line.starts_with('\t') && !line.starts_with("\t\t") && line.ends_with(" {") {
            let b = line.trim().trim_end_matches('{').trim().to_string();
            blocks.entry(b.clone()).or_default();
            block = Some(b);
        } else if let Some(b) = &block {
            // Element lines: one per element except the first and last; drop the list punctuation.
            let l = line.trim();
            let l = l.strip_prefix("elements = { ").unwrap_or(l);
            let l = l.trim_end_matches(',').trim_end_matches(" }");
            blocks.entry(b.clone()).or_default().push(l.to_string());
        }
    }
    tables
}

fn lines_word(n: usize) -> String {
    if n == 1 {
        "1 line".into()
    } else {
        format!("{n} lines")
    }
}

/// Which tables differ, and a short description of how.
pub(super) fn describe_drift(recorded: &str, live: &str) -> (String, String) {
    let old = parse_listing(recorded);
    let new = parse_listing(live);
    let mut drifted = Vec::new();
    let mut details = Vec::new();
    let names: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    for t in names {
        let mut parts = Vec::new();
        match (old.get(t), new.get(t)) {
            (Some(_), None) => parts.push("table missing".to_string()),
            (None, Some(_)) => parts.push("unexpected table".to_string()),
            (Some(o), Some(n)) => {
                let blocks: BTreeSet<&String> = o.keys().chain(n.keys()).collect();
                for b in blocks {
                    match (o.get(b), n.get(b)) {
                        (Some(_), None) => parts.push(format!("{b} missing")),
                        (None, Some(_)) => parts.push(format!("unexpected {b}")),
                        (Some(x), Some(y)) if x != y => {
                            let removed = x.iter().filter(|l| !y.contains(l)).count();
                            let added = y.iter().filter(|l| !x.contains(l)).count();
                            let how = match (added, removed) {
                                (0, 0) => "lines reordered".to_string(),
                                (a, 0) => format!("{} added", lines_word(a)),
                                (0, r) => format!("{} removed", lines_word(r)),
                                (a, r) => {
                                    format!("{} added, {} removed", lines_word(a), lines_word(r))
                                }
                            };
                            parts.push(format!("{b}: {how}"));
                        }
                        _ => {}
                    }
                }
            }
            (None, None) => {}
        }
        if !parts.is_empty() {
            drifted.push(t.clone());
            details.push(format!("{t}: {}", parts.join(", ")));
        }
    }
    if drifted.is_empty() {
        return ("the ruleset".into(), "listing differs".into());
    }
    (drifted.join(", "), details.join("; "))
}
