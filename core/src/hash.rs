//! Content hashes as the Hub defines them, computed while bytes stream past.
//!
//! The Hub names every file by its git blob id (`sha1("blob {len}\0" + bytes)`), and files stored
//! with LFS or Xet also by the sha256 of their bytes. modelcache verifies LFS/Xet files by sha256
//! and the rest by git blob sha1, and keys its blob store by the same hash, so the mapping from a
//! tree entry to the hash that identifies it lives in one place: [`ContentHash::for_entry`].

use sha1::Sha1;
use sha2::{Digest, Sha256};
use std::fmt;

/// Which hash function identifies a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algo {
    /// sha256 of the bytes (LFS and Xet files).
    Sha256,
    /// git's blob id: sha1 over `blob {len}\0` and the bytes (regular git files).
    GitSha1,
}

impl Algo {
    /// Directory name of this algorithm's blobs in the store.
    pub fn dir_name(self) -> &'static str {
        match self {
            Algo::Sha256 => "sha256",
            Algo::GitSha1 => "sha1",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algo::Sha256 => 64,
            Algo::GitSha1 => 40,
        }
    }
}

/// A file's identity: an algorithm and a lowercase hex digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentHash {
    algo: Algo,
    hex: String,
}

/// A digest from a hub that is not lowercase hex of the right length.
#[derive(Debug, thiserror::Error)]
#[error("{algo:?} digest {value:?} is not {len} lowercase hex characters")]
pub struct BadDigest {
    algo: Algo,
    value: String,
    len: usize,
}

impl ContentHash {
    /// Validates a hex digest; hubs sometimes quote ETags, so callers strip quotes first.
    pub fn new(algo: Algo, hex: &str) -> Result<Self, BadDigest> {
        let ok = hex.len() == algo.hex_len()
            && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !ok {
            return Err(BadDigest {
                algo,
                value: hex.chars().take(80).collect(),
                len: algo.hex_len(),
            });
        }
        Ok(ContentHash {
            algo,
            hex: hex.to_owned(),
        })
    }

    /// The hash that identifies a tree entry: the LFS sha256 when there is one, else the git oid.
    pub fn for_entry(git_oid: &str, lfs_sha256: Option<&str>) -> Result<Self, BadDigest> {
        match lfs_sha256 {
            Some(sha) => ContentHash::new(Algo::Sha256, sha),
            None => ContentHash::new(Algo::GitSha1, git_oid),
        }
    }

    /// The algorithm.
    pub fn algo(&self) -> Algo {
        self.algo
    }

    /// The lowercase hex digest.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// `<algo>-<hex>`: a file name for things kept per blob.
    pub fn file_name(&self) -> String {
        format!("{}-{}", self.algo.dir_name(), self.hex)
    }

    /// Parses [`ContentHash::file_name`].
    pub fn from_file_name(name: &str) -> Option<Self> {
        let (algo, hex) = name.split_once('-')?;
        let algo = [Algo::Sha256, Algo::GitSha1]
            .into_iter()
            .find(|a| a.dir_name() == algo)?;
        ContentHash::new(algo, hex).ok()
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algo.dir_name(), self.hex)
    }
}

/// Computes a [`ContentHash`] incrementally.
pub enum Hasher {
    /// sha256 state.
    Sha256(Sha256),
    /// sha1 state, already fed the git blob header.
    GitSha1(Sha1),
}

impl Hasher {
    /// A hasher for `algo`; the git blob header needs the file's length up front.
    pub fn new(algo: Algo, len: u64) -> Self {
        match algo {
            Algo::Sha256 => Hasher::Sha256(Sha256::new()),
            Algo::GitSha1 => {
                let mut h = Sha1::new();
                h.update(format!("blob {len}\0").as_bytes());
                Hasher::GitSha1(h)
            }
        }
    }

    /// Feeds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::GitSha1(h) => h.update(bytes),
        }
    }

    /// The digest of everything fed.
    pub fn finish(self) -> ContentHash {
        let (algo, hex) = match self {
            Hasher::Sha256(h) => (Algo::Sha256, hex::encode(h.finalize())),
            Hasher::GitSha1(h) => (Algo::GitSha1, hex::encode(h.finalize())),
        };
        ContentHash { algo, hex }
    }
}

/// Hashes a whole file from disk (the hub server and `verify` use it; downloads hash as they go).
pub fn hash_file(path: &std::path::Path, algo: Algo) -> std::io::Result<ContentHash> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let mut hasher = Hasher::new(algo, len);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_blob_sha1_matches_git() {
        // `printf 'hello\n' | git hash-object --stdin`
        let mut h = Hasher::new(Algo::GitSha1, 6);
        h.update(b"hello\n");
        assert_eq!(h.finish().hex(), "ce013625030ba8dba906f756967f9e9ca394464a");
        // The empty blob.
        assert_eq!(
            Hasher::new(Algo::GitSha1, 0).finish().hex(),
            "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
        );
    }

    #[test]
    fn sha256_matches_known_vector() {
        let mut h = Hasher::new(Algo::Sha256, 3);
        h.update(b"abc");
        assert_eq!(
            h.finish().hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn entry_hash_prefers_lfs_and_validates() {
        let oid = "ce013625030ba8dba906f756967f9e9ca394464a";
        assert_eq!(
            ContentHash::for_entry(oid, None).unwrap().algo(),
            Algo::GitSha1
        );
        let sha = "a".repeat(64);
        let h = ContentHash::for_entry(oid, Some(&sha)).unwrap();
        assert_eq!((h.algo(), h.hex()), (Algo::Sha256, sha.as_str()));
        assert!(ContentHash::new(Algo::GitSha1, "../../etc/passwd").is_err());
        assert!(ContentHash::new(Algo::Sha256, &"A".repeat(64)).is_err());
    }
}
