//! Access-key secrets are encrypted at rest with AES-256-GCM under a key kept in a file next
//! to the database (mode 0600). A stolen database alone does not reveal them.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use rand::RngCore;

use crate::{Result, StoreError};

const PREFIX: &str = "v1:";

#[derive(Clone)]
pub struct SecretBox {
    cipher: Aes256Gcm,
}

impl SecretBox {
    pub fn load_or_create(path: &Path) -> Result<SecretBox> {
        let err = |source| StoreError::KeyFile {
            path: path.display().to_string(),
            source,
        };
        let key = match std::fs::read(path) {
            Ok(k) if k.len() == 32 => k,
            Ok(_) => {
                return Err(err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "must hold exactly 32 bytes",
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut k = vec![0u8; 32];
                rand::thread_rng().fill_bytes(&mut k);
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(err)?;
                f.write_all(&k).and_then(|_| f.sync_all()).map_err(err)?;
                k
            }
            Err(e) => return Err(err(e)),
        };
        let cipher =
            Aes256Gcm::new_from_slice(&key).map_err(|_| StoreError::Corrupt("secret key"))?;
        Ok(SecretBox { cipher })
    }

    /// A key that lives as long as the process (in-memory stores).
    pub fn ephemeral() -> SecretBox {
        let mut k = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut k);
        SecretBox {
            cipher: Aes256Gcm::new(&k.into()),
        }
    }

    pub fn seal(&self, plain: &str) -> Result<String> {
        let mut nonce = [0u8; 12];
        rand::thread_rng().fill_bytes(&mut nonce);
        let ct = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), plain.as_bytes())
            .map_err(|_| StoreError::Corrupt("secret"))?;
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&ct);
        Ok(format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::STANDARD.encode(blob)
        ))
    }

    pub fn open(&self, sealed: &str) -> Result<String> {
        let blob = sealed
            .strip_prefix(PREFIX)
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .filter(|b| b.len() > 12)
            .ok_or(StoreError::Corrupt("secret"))?;
        let (nonce, ct) = blob.split_at(12);
        let plain = self
            .cipher
            .decrypt(Nonce::from_slice(nonce), ct)
            .map_err(|_| StoreError::Corrupt("secret (wrong secrets.key?)"))?;
        String::from_utf8(plain).map_err(|_| StoreError::Corrupt("secret"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_round_trip_and_are_not_stored_in_clear() {
        let dir = tempfile::tempdir().expect("dir");
        let b = SecretBox::load_or_create(&dir.path().join("k")).expect("key");
        let sealed = b.seal("wJalrXUtnFEMI/K7MDENG").expect("seal");
        assert!(!sealed.contains("wJalr"));
        assert_ne!(
            sealed,
            b.seal("wJalrXUtnFEMI/K7MDENG").expect("seal"),
            "fresh nonce each time"
        );
        assert_eq!(b.open(&sealed).expect("open"), "wJalrXUtnFEMI/K7MDENG");
        // The same key file opens it again; another key does not.
        let again = SecretBox::load_or_create(&dir.path().join("k")).expect("key");
        assert_eq!(again.open(&sealed).expect("open"), "wJalrXUtnFEMI/K7MDENG");
        assert!(SecretBox::ephemeral().open(&sealed).is_err());
        assert!(b.open("v1:garbage").is_err());
    }
}
