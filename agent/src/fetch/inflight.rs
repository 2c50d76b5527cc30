//! One download per blob on a node: whoever fetches a blob holds its lock, and others asking
//! for the same blob wait, then find it in the store.

use modelcache_core::hash::ContentHash;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::OwnedMutexGuard;

/// Locks by blob, created on demand and dropped when nobody holds or waits for them.
#[derive(Debug, Default)]
pub(super) struct BlobLocks(Mutex<HashMap<ContentHash, Arc<tokio::sync::Mutex<()>>>>);

/// Held while a blob is fetched.
pub(super) struct BlobLock<'a> {
    owner: &'a BlobLocks,
    hash: ContentHash,
    guard: Option<OwnedMutexGuard<()>>,
}

impl BlobLocks {
    /// Waits until nobody else fetches `hash`, and holds it until the returned guard drops.
    pub(super) async fn lock(&self, hash: &ContentHash) -> BlobLock<'_> {
        let lock = self
            .0
            .lock()
            .expect("in-flight map is never poisoned")
            .entry(hash.clone())
            .or_default()
            .clone();
        BlobLock {
            owner: self,
            hash: hash.clone(),
            guard: Some(lock.lock_owned().await),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

impl Drop for BlobLock<'_> {
    fn drop(&mut self) {
        let mut map = self
            .owner
            .0
            .lock()
            .expect("in-flight map is never poisoned");
        self.guard.take();
        // Only the map's reference left: nobody holds or awaits this lock.
        if map
            .get(&self.hash)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            map.remove(&self.hash);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelcache_core::hash::Algo;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn one_holder_per_blob_and_no_leak() {
        let flights = Arc::new(BlobLocks::default());
        let busy = Arc::new(AtomicUsize::new(0));
        let hash = ContentHash::new(Algo::GitSha1, &"a".repeat(40)).unwrap();
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (flights, busy, hash) = (flights.clone(), busy.clone(), hash.clone());
                tokio::spawn(async move {
                    let _f = flights.lock(&hash).await;
                    assert_eq!(
                        busy.fetch_add(1, Ordering::SeqCst),
                        0,
                        "two holders at once"
                    );
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    busy.fetch_sub(1, Ordering::SeqCst);
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(flights.len(), 0);
        // Another blob is not held up by this one.
        let _a = flights.lock(&hash).await;
        let other = ContentHash::new(Algo::GitSha1, &"b".repeat(40)).unwrap();
        let _b = tokio::time::timeout(Duration::from_secs(1), flights.lock(&other))
            .await
            .expect("another blob's lock is free");
    }
}
