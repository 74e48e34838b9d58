//! Key pairs: OpenSSH public keys of a project, checked and fingerprinted here. Private
//! keys are never stored (the controller hands a generated one out once).

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine;
use chrono::{DateTime, Utc};
use kumo_types::id::{new_id, validate_name, IdKind};
use sha2::{Digest, Sha256};
use sqlx::Row;

use super::invalid;
use crate::auth::unique_conflict;
use crate::{now_str, parse_time, Result, Scope, Store, StoreError};

#[derive(Debug, Clone)]
pub struct KeyPairRow {
    pub id: String,
    pub project_id: String,
    pub name: String,
    /// `ed25519`, `rsa` or `ecdsa`.
    pub key_type: String,
    /// The OpenSSH public key line.
    pub public_key: String,
    /// `SHA256:…`, as `ssh-keygen -l` prints it.
    pub fingerprint: String,
    pub created_at: DateTime<Utc>,
}

/// A checked OpenSSH public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// `ed25519`, `rsa` or `ecdsa`.
    pub key_type: String,
    /// The line, whitespace normalised.
    pub line: String,
    pub fingerprint: String,
}

const KEY_COLS: &str = "id, project_id, name, key_type, public_key, fingerprint, created_at";

fn key_from_row(r: &sqlx::sqlite::SqliteRow) -> Result<KeyPairRow> {
    Ok(KeyPairRow {
        id: r.try_get("id")?,
        project_id: r.try_get("project_id")?,
        name: r.try_get("name")?,
        key_type: r.try_get("key_type")?,
        public_key: r.try_get("public_key")?,
        fingerprint: r.try_get("fingerprint")?,
        created_at: parse_time(&r.try_get::<String, _>("created_at")?)?,
    })
}

/// Read one length-prefixed string of the SSH wire format.
fn ssh_string<'a>(blob: &mut &'a [u8]) -> Option<&'a [u8]> {
    if blob.len() < 4 {
        return None;
    }
    let n = u32::from_be_bytes([blob[0], blob[1], blob[2], blob[3]]) as usize;
    let rest = &blob[4..];
    if rest.len() < n {
        return None;
    }
    let (s, tail) = rest.split_at(n);
    *blob = tail;
    Some(s)
}

/// Check an OpenSSH public key line (`ssh-ed25519 AAAA… comment`, also ssh-rsa and
/// ecdsa-sha2-nistp256): the blob decodes, names the line's type and has that type's fields.
pub fn parse_public_key(line: &str) -> Result<PublicKey> {
    let line = line.trim();
    let garbage = |why: &str| invalid(format!("not an OpenSSH public key: {why}"));
    if line.is_empty() {
        return Err(garbage("it is empty"));
    }
    if line.len() > 16 * 1024 || line.chars().any(|c| c.is_control() && c != '\t') {
        return Err(garbage(
            "give one line of at most 16 KiB, as in a .pub file",
        ));
    }
    let mut parts = line.split_whitespace();
    let (Some(kind), Some(b64)) = (parts.next(), parts.next()) else {
        return Err(garbage("expected \"TYPE BASE64 [COMMENT]\""));
    };
    let comment: Vec<&str> = parts.collect();
    let key_type = match kind {
        "ssh-ed25519" => "ed25519",
        "ssh-rsa" => "rsa",
        "ecdsa-sha2-nistp256" => "ecdsa",
        other => {
            return Err(invalid(format!(
            "key type {other:?} is not supported; use ssh-ed25519, ssh-rsa or ecdsa-sha2-nistp256"
        )))
        }
    };
    let blob = STANDARD
        .decode(b64)
        .map_err(|_| garbage("the key is not valid base64"))?;
    let mut rest = blob.as_slice();
    if ssh_string(&mut rest) != Some(kind.as_bytes()) {
        return Err(garbage(&format!("the key data is not a {kind} key")));
    }
    let ok = match key_type {
        "ed25519" => ssh_string(&mut rest).is_some_and(|k| k.len() == 32),
        "rsa" => {
            let e = ssh_string(&mut rest);
            let n = ssh_string(&mut rest);
            // ssh-keygen refuses RSA keys under 1024 bits; so does kumo.
            let bits = |m: &[u8]| {
                let m: Vec<u8> = m.iter().copied().skip_while(|b| *b == 0).collect();
                m.first()
                    .map_or(0, |b| (m.len() - 1) * 8 + (8 - b.leading_zeros() as usize))
            };
            e.is_some_and(|e| !e.is_empty()) && n.is_some_and(|n| bits(n) >= 1024)
        }
        _ => {
            ssh_string(&mut rest) == Some(b"nistp256".as_slice())
                && ssh_string(&mut rest).is_some_and(|q| q.len() == 65 && q[0] == 4)
        }
    };
    if !ok || !rest.is_empty() {
        return Err(garbage(&format!("the key data is not a valid {kind} key")));
    }
    let mut norm = format!("{kind} {b64}");
    if !comment.is_empty() {
        norm.push(' ');
        norm.push_str(&comment.join(" "));
    }
    Ok(PublicKey {
        key_type: key_type.into(),
        line: norm,
        fingerprint: format!("SHA256:{}", STANDARD_NO_PAD.encode(Sha256::digest(&blob))),
    })
}

impl Store {
    /// (key name, OpenSSH public key) given to the instance at creation (empty without a key).
    pub async fn instance_public_keys(&self, instance_id: &str) -> Result<Vec<(String, String)>> {
        Ok(sqlx::query_as(
            "SELECT key_name, public_key FROM instances
             WHERE id = $1 AND key_name IS NOT NULL AND public_key IS NOT NULL",
        )
        .bind(instance_id)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Store a project's key pair from an OpenSSH public key line.
    pub async fn import_key_pair(
        &self,
        scope: &Scope,
        name: &str,
        public_key: &str,
    ) -> Result<KeyPairRow> {
        validate_name(name).map_err(StoreError::Invalid)?;
        let k = parse_public_key(public_key)?;
        let id = new_id(IdKind::KeyPair);
        sqlx::query(&format!(
            "INSERT INTO key_pairs ({KEY_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
        ))
        .bind(&id)
        .bind(&scope.project_id)
        .bind(name)
        .bind(&k.key_type)
        .bind(&k.line)
        .bind(&k.fingerprint)
        .bind(now_str())
        .execute(&self.pool)
        .await
        .map_err(|e| unique_conflict(e, format!("a key pair named {name} already exists")))?;
        self.key_pair(scope, &id).await
    }

    /// A key pair of the scope's project by id or name.
    pub async fn key_pair(&self, scope: &Scope, id_or_name: &str) -> Result<KeyPairRow> {
        let row = sqlx::query(&format!(
            "SELECT {KEY_COLS} FROM key_pairs
             WHERE (id = $1 OR name = $1) AND (CAST($2 AS TEXT) IS NULL OR project_id = $2)
             ORDER BY project_id = $3 DESC, id = $1 DESC LIMIT 1"
        ))
        .bind(id_or_name)
        .bind(scope.filter())
        .bind(&scope.project_id)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => key_from_row(&r),
            None => Err(StoreError::NotFound {
                kind: "key pair",
                id: id_or_name.to_string(),
            }),
        }
    }

    pub async fn key_pairs(&self, scope: &Scope) -> Result<Vec<KeyPairRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {KEY_COLS} FROM key_pairs
             WHERE CAST($1 AS TEXT) IS NULL OR project_id = $1 ORDER BY name, project_id"
        ))
        .bind(scope.filter())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(key_from_row).collect()
    }

    /// Delete a key pair; instances launched with it keep their copy of the public key.
    pub async fn delete_key_pair(&self, scope: &Scope, id_or_name: &str) -> Result<KeyPairRow> {
        let k = self.key_pair(scope, id_or_name).await?;
        let done = sqlx::query("DELETE FROM key_pairs WHERE id = $1")
            .bind(&k.id)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() != 1 {
            return Err(StoreError::NotFound {
                kind: "key pair",
                id: id_or_name.to_string(),
            });
        }
        Ok(k)
    }
}
