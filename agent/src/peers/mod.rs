//! The peer tier: agents on other nodes give this node the blobs they hold, so a model the
//! fleet already has costs the hub nothing more.
//!
//! - **Serving** ([`server`]): `run --peer-listen HOST:PORT` answers `GET /v1/blobs/<algo>-<hex>`
//!   with the blob's bytes (and `Range`), and `POST /v1/status` with which of some blobs it
//!   holds, claims or wants, to requests that carry the cluster's secret
//!   (`Authorization: Bearer`, from `--peer-token-file`); anything else is 401. Blobs only, by
//!   content hash: no path, repo or snapshot is ever named, and a hash is known only to whoever
//!   the hub gave the repo's tree. Uploads at once are capped (`--peer-max-uploads`; more are
//!   told 503 with `Retry-After`), and the bytes served are counted.
//! - **Fetching** ([`client`]): with `--peers URL[,URL…]`, `peers` is a tier (default order
//!   `shared-cache,peers,hub`). A blob is asked of the peers in an order that depends on its hash
//!   (rendezvous hashing), so the fleet's requests for one model spread over the peers. Every byte
//!   is verified by hash, as hub bytes are; a peer that sends wrong bytes is not asked again for
//!   [`BAN`], and the blob comes from the next peer or the hub.
//! - **The first wave** ([`client::Peers::plan_wave`]): nodes that start the same model at once
//!   split it: each blob gets one owner among them (rendezvous hashing), which gets it from the
//!   hub while the others wait and take it from the owner. Peers are found by DNS
//!   ([`client::discover`]) or listed. Who may read a gated or private
//!   model is still decided by the hub, before any blob is fetched: peers change where bytes come
//!   from, never who may read them.

pub mod client;
pub mod server;

use sha2::{Digest, Sha256};
use std::path::Path;
use std::time::Duration;

pub use client::Peers;
pub use server::PeerServer;

/// How long a peer that sent wrong bytes is not asked.
pub const BAN: Duration = Duration::from_secs(300);

/// Bytes a transfer to or from a peer reads or writes at a time: small, since in a first wave a
/// node feeds and follows dozens of files at once.
const TRANSFER_BUFFER: usize = 64 << 10;

/// The least a peer secret may hold.
pub const MIN_SECRET_BYTES: usize = 16;

/// The cluster's peer secret, as read from `--peer-token-file`.
#[derive(Clone)]
pub struct PeerSecret(String);

impl std::fmt::Debug for PeerSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerSecret(…)")
    }
}

/// Why a peer secret cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BadSecret {
    /// The file could not be read.
    #[error("--peer-token-file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Too short to be a secret.
    #[error(
        "--peer-token-file {0}: the secret must hold at least {MIN_SECRET_BYTES} characters (the chart generates 32)"
    )]
    Short(String),
}

impl PeerSecret {
    /// Reads the secret from `path` (surrounding whitespace dropped).
    pub fn read(path: &Path) -> Result<Self, BadSecret> {
        let text = std::fs::read_to_string(path).map_err(|source| BadSecret::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::new(text.trim()).ok_or_else(|| BadSecret::Short(path.display().to_string()))
    }

    /// A secret, if long enough.
    pub fn new(secret: &str) -> Option<Self> {
        (secret.len() >= MIN_SECRET_BYTES && !secret.contains(char::is_whitespace))
            .then(|| PeerSecret(secret.to_owned()))
    }

    fn digest(&self) -> [u8; 32] {
        Sha256::digest(self.0.as_bytes()).into()
    }

    /// True when `offered` is this secret. Compares digests, in time that does not depend on
    /// where they differ.
    fn accepts(&self, offered: &str) -> bool {
        let offered: [u8; 32] = Sha256::digest(offered.as_bytes()).into();
        self.digest()
            .iter()
            .zip(offered.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }

    /// The `Authorization` header value.
    fn bearer(&self) -> String {
        format!("Bearer {}", self.0)
    }
}

/// The path a blob is served at.
pub fn blob_path(hash: &modelcache_core::hash::ContentHash) -> String {
    format!("/v1/blobs/{}", hash.file_name())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_long_enough_and_compared_whole() {
        assert!(PeerSecret::new("short").is_none());
        assert!(PeerSecret::new("has a space in the middle!").is_none());
        let s = PeerSecret::new("0123456789abcdef-secret").unwrap();
        assert!(s.accepts("0123456789abcdef-secret"));
        assert!(!s.accepts("0123456789abcdef-secreT"));
        assert!(!s.accepts(""));
        assert_eq!(format!("{s:?}"), "PeerSecret(…)");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "0123456789abcdef-secret\n").unwrap();
        assert!(
            PeerSecret::read(&f)
                .unwrap()
                .accepts("0123456789abcdef-secret")
        );
        std::fs::write(&f, "tiny").unwrap();
        assert!(
            PeerSecret::read(&f)
                .unwrap_err()
                .to_string()
                .contains("at least 16")
        );
    }
}
