//! The blobs that running fetches will link into their snapshots. Garbage collection beside them
//! keeps these, although no snapshot links them yet.

use modelcache_core::hash::ContentHash;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Blobs wanted by running fetches, counted per fetch.
#[derive(Debug, Default, Clone)]
pub struct Wanted(Arc<Mutex<HashMap<ContentHash, usize>>>);

/// Holds a fetch's blobs as wanted until dropped.
#[derive(Debug)]
pub struct WantedGuard {
    wanted: Wanted,
    hashes: Vec<ContentHash>,
}

impl Wanted {
    /// Marks `hashes` wanted until the guard drops.
    pub fn hold(&self, hashes: impl IntoIterator<Item = ContentHash>) -> WantedGuard {
        let hashes: Vec<ContentHash> = hashes.into_iter().collect();
        let mut map = self.0.lock().expect("wanted map is never poisoned");
        for h in &hashes {
            *map.entry(h.clone()).or_default() += 1;
        }
        WantedGuard {
            wanted: self.clone(),
            hashes,
        }
    }

    /// True while a running fetch wants `hash`.
    pub fn contains(&self, hash: &ContentHash) -> bool {
        self.0
            .lock()
            .expect("wanted map is never poisoned")
            .contains_key(hash)
    }
}

impl Drop for WantedGuard {
    fn drop(&mut self) {
        let mut map = self.wanted.0.lock().expect("wanted map is never poisoned");
        for h in &self.hashes {
            if let Some(n) = map.get_mut(h) {
                *n -= 1;
                if *n == 0 {
                    map.remove(h);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelcache_core::hash::Algo;

    #[test]
    fn a_blob_stays_wanted_while_any_fetch_wants_it() {
        let w = Wanted::default();
        let a = ContentHash::new(Algo::Sha256, &"a".repeat(64)).unwrap();
        let b = ContentHash::new(Algo::GitSha1, &"b".repeat(40)).unwrap();
        let first = w.hold([a.clone(), b.clone()]);
        let second = w.hold([a.clone()]);
        drop(first);
        assert!(w.contains(&a) && !w.contains(&b));
        drop(second);
        assert!(!w.contains(&a));
    }
}
