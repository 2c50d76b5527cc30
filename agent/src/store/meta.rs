//! What the store knows of each snapshot beyond its files: its size, where it came from, when it
//! was made and when a volume last used it (what eviction orders by).
//!
//! One small JSON file per snapshot, `STORE/meta/<repo dir>/<snapshot name>.json`, written
//! atomically (temp file, fsync, rename), like `pins.json` and `refs/`. Not an embedded database
//! such as redb: the records are few, change rarely (when a snapshot is made, and at most once a
//! minute per snapshot when volumes use it), are read whole, and stay readable with `cat` on a
//! node. And all of a record but its source can be rebuilt from the snapshot directory itself
//! (sizes by walking it, times from its mtime), which [`Store::meta`] does when a record is
//! missing or unreadable, so losing `meta/` loses nothing that matters.

use super::{Context, Result, Snapshot, Store, write_atomic};
use serde::{Deserialize, Serialize};
use std::fs;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How stale `last_used` may get before a use writes it again.
pub const TOUCH_GRANULARITY: Duration = Duration::from_secs(60);

/// A snapshot's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// Bytes its files show.
    pub bytes: u64,
    /// Its files.
    pub files: u32,
    /// Where its files came from (`hub <endpoint>`, `shared cache <dir>`, or both with the bytes
    /// each gave), or `unknown` for a rebuilt record.
    pub source: String,
    /// When it was made, in Unix seconds.
    pub created: u64,
    /// When a volume last used it, in Unix seconds.
    pub last_used: u64,
    /// Kept because a pre-warm entry asks for it: evicted only when nothing else frees space.
    #[serde(default)]
    pub prewarmed: bool,
}

/// `t` in Unix seconds, the unit of [`SnapshotMeta`]'s times.
pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

impl Store {
    fn meta_path(&self, snap: &Snapshot) -> PathBuf {
        let repo_dir = snap
            .path
            .parent()
            .and_then(|p| p.file_name())
            .expect("a snapshot lives in a repo directory");
        let name = snap.path.file_name().expect("a snapshot has a name");
        self.root
            .join("meta")
            .join(repo_dir)
            .join(format!("{}.json", name.to_string_lossy()))
    }

    /// Records a snapshot just made from `source`.
    pub fn record_snapshot(&self, snap: &Snapshot, source: &str) -> Result<SnapshotMeta> {
        let (bytes, files) = self.snapshot_usage(snap);
        let now = unix(SystemTime::now());
        let meta = SnapshotMeta {
            bytes,
            files,
            source: source.to_owned(),
            created: now,
            last_used: now,
            prewarmed: false,
        };
        self.write_meta(snap, &meta)?;
        Ok(meta)
    }

    /// The snapshot's record; rebuilt from its directory (and written back) when missing or
    /// unreadable.
    pub fn meta(&self, snap: &Snapshot) -> SnapshotMeta {
        let (meta, rebuilt) = self.load_meta(snap);
        if rebuilt && let Err(e) = self.write_meta(snap, &meta) {
            tracing::warn!(error = %e, "could not write a rebuilt snapshot record");
        }
        meta
    }

    /// The snapshot's record, rebuilt in memory when missing; writes nothing.
    pub fn peek_meta(&self, snap: &Snapshot) -> SnapshotMeta {
        self.load_meta(snap).0
    }

    fn load_meta(&self, snap: &Snapshot) -> (SnapshotMeta, bool) {
        let path = self.meta_path(snap);
        if let Some(meta) = fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
        {
            return (meta, false);
        }
        let (bytes, files) = self.snapshot_usage(snap);
        let mtime = fs::metadata(&snap.path)
            .and_then(|m| m.modified())
            .map(unix)
            .unwrap_or_default();
        let meta = SnapshotMeta {
            bytes,
            files,
            source: "unknown".to_owned(),
            created: mtime,
            last_used: mtime,
            prewarmed: false,
        };
        (meta, true)
    }

    /// Notes that a volume uses the snapshot now; written only when the record is older than
    /// [`TOUCH_GRANULARITY`], so a burst of publishes costs one write.
    pub fn touch(&self, snap: &Snapshot) -> Result<()> {
        self.touch_at(snap, SystemTime::now())
    }

    fn touch_at(&self, snap: &Snapshot, now: SystemTime) -> Result<()> {
        let mut meta = self.meta(snap);
        let now = unix(now);
        if now < meta.last_used + TOUCH_GRANULARITY.as_secs() {
            return Ok(());
        }
        meta.last_used = now;
        self.write_meta(snap, &meta)
    }

    /// Marks a snapshot as wanted by a pre-warm entry (or no longer), which eviction orders by.
    pub fn set_prewarmed(&self, snap: &Snapshot, prewarmed: bool) -> Result<()> {
        let mut meta = self.meta(snap);
        if meta.prewarmed == prewarmed {
            return Ok(());
        }
        meta.prewarmed = prewarmed;
        self.write_meta(snap, &meta)
    }

    /// Sets a snapshot's last use, for tests of what orders by it.
    #[cfg(test)]
    pub(crate) fn set_last_used(&self, snap: &Snapshot, unix_seconds: u64) {
        let mut meta = self.meta(snap);
        meta.last_used = unix_seconds;
        self.write_meta(snap, &meta).unwrap();
    }

    /// Removes a snapshot's record (with the snapshot).
    pub(super) fn remove_meta(&self, snap: &Snapshot) -> Result<()> {
        let path = self.meta_path(snap);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).ctx("remove", &path),
            _ => Ok(()),
        }
    }

    fn write_meta(&self, snap: &Snapshot, meta: &SnapshotMeta) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(meta).expect("a record serializes");
        write_atomic(&self.meta_path(snap), &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SnapshotFile;
    use crate::store::tests::put_blob;
    use modelcache_core::repo::{RepoId, RepoKind, RepoPath};

    #[test]
    fn records_survive_loss_and_corruption_and_touches_are_coarse() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let blob = put_blob(&store, b"seven b");
        let files = [SnapshotFile {
            path: RepoPath::parse("a/f").unwrap(),
            hash: blob,
        }];
        let repo = RepoId::parse("org/m").unwrap();
        let snap = store
            .assemble_snapshot(
                &crate::store::SnapshotKey::parse(RepoKind::Model, &repo, &"1".repeat(40), None)
                    .unwrap(),
                &files,
            )
            .unwrap();
        let made = store.record_snapshot(&snap, "hub http://h").unwrap();
        assert_eq!((made.bytes, made.files), (7, 1));
        assert_eq!(store.meta(&snap), made);

        // A touch within the granularity writes nothing; later, it moves last_used.
        let t0 = UNIX_EPOCH + Duration::from_secs(made.last_used);
        store.touch_at(&snap, t0 + Duration::from_secs(5)).unwrap();
        assert_eq!(store.meta(&snap).last_used, made.last_used);
        store.touch_at(&snap, t0 + Duration::from_secs(61)).unwrap();
        assert_eq!(store.meta(&snap).last_used, made.last_used + 61);

        // Lost or corrupt: rebuilt from the directory, sizes exact, source unknown.
        let path = store.meta_path(&snap);
        for damage in [None, Some(&b"{not json"[..])] {
            match damage {
                None => fs::remove_file(&path).unwrap(),
                Some(b) => fs::write(&path, b).unwrap(),
            }
            let rebuilt = store.meta(&snap);
            assert_eq!((rebuilt.bytes, rebuilt.files), (7, 1));
            assert_eq!(rebuilt.source, "unknown");
            assert!(path.exists(), "the rebuilt record is written back");
        }
        store.remove_snapshot(&snap).unwrap();
        assert!(!path.exists());
    }
}
