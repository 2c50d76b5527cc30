//! Blobs still downloading, readable as they grow: a node halfway through a file already feeds
//! its peers the part it has written, in order (see [`crate::peers`]). Each download that writes
//! a blob in order registers its file here with how many bytes from the start are written; a
//! reader waits for more until the download is done or fails. Readers verify nothing: the peer
//! that takes the bytes hashes the whole file, as it does every file.

use modelcache_core::hash::ContentHash;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// How far a growing blob is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Avail {
    /// Bytes written from the start, more to come.
    Growing(u64),
    /// Complete, verified and in the store.
    Done,
    /// The download failed; what was written may never be whole.
    Failed,
}

/// The blobs downloading now that can be read as they grow.
#[derive(Debug, Default, Clone)]
pub struct Growing(Arc<Mutex<HashMap<ContentHash, Entry>>>);

#[derive(Debug, Clone)]
struct Entry {
    path: PathBuf,
    size: u64,
    avail: watch::Receiver<Avail>,
}

/// A growing blob, as a reader finds it.
#[derive(Debug, Clone)]
pub struct GrowingBlob {
    /// The file being written (open it before it is renamed into the store).
    pub path: PathBuf,
    /// Its final size.
    pub size: u64,
    /// How far it is.
    pub avail: watch::Receiver<Avail>,
}

/// A download's handle on its growing blob: it says how far it is, and that it is done; dropped
/// before [`Grower::done`], the blob failed.
#[derive(Debug)]
pub struct Grower {
    growing: Growing,
    hash: ContentHash,
    tx: watch::Sender<Avail>,
    finished: bool,
}

impl Growing {
    /// Registers the download of `hash` into `path` (of `size` bytes), written in order.
    pub fn start(&self, hash: &ContentHash, path: PathBuf, size: u64) -> Grower {
        let (tx, avail) = watch::channel(Avail::Growing(0));
        self.0
            .lock()
            .expect("growing lock")
            .insert(hash.clone(), Entry { path, size, avail });
        Grower {
            growing: self.clone(),
            hash: hash.clone(),
            tx,
            finished: false,
        }
    }

    /// The blob `hash`, if it is downloading now.
    pub fn get(&self, hash: &ContentHash) -> Option<GrowingBlob> {
        let map = self.0.lock().expect("growing lock");
        map.get(hash).map(|e| GrowingBlob {
            path: e.path.clone(),
            size: e.size,
            avail: e.avail.clone(),
        })
    }
}

impl Grower {
    /// `bytes` from the start are written and readable.
    pub fn grow(&self, bytes: u64) {
        self.tx.send_replace(Avail::Growing(bytes));
    }

    /// The blob is complete and in the store.
    pub fn done(mut self) {
        self.finished = true;
        self.tx.send_replace(Avail::Done);
    }
}

impl Drop for Grower {
    fn drop(&mut self) {
        if !self.finished {
            self.tx.send_replace(Avail::Failed);
        }
        self.growing
            .0
            .lock()
            .expect("growing lock")
            .remove(&self.hash);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_grows_then_is_done_or_failed_and_leaves_the_registry() {
        let g = Growing::default();
        let h = ContentHash::new(modelcache_core::hash::Algo::GitSha1, &"a".repeat(40)).unwrap();
        let grower = g.start(&h, "/s/staging/x".into(), 10);
        let blob = g.get(&h).unwrap();
        assert_eq!((blob.size, *blob.avail.borrow()), (10, Avail::Growing(0)));
        grower.grow(4);
        assert_eq!(*blob.avail.borrow(), Avail::Growing(4));
        grower.done();
        assert_eq!(*blob.avail.borrow(), Avail::Done);
        assert!(g.get(&h).is_none());
        let failed = g.start(&h, "/s/staging/y".into(), 10);
        let blob = g.get(&h).unwrap();
        drop(failed);
        assert_eq!(*blob.avail.borrow(), Avail::Failed);
        assert!(g.get(&h).is_none());
    }
}
