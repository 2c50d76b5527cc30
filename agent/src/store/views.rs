//! Other shapes of a snapshot, for volumes that ask for them. `hf-cache` presents a snapshot as
//! an `HF_HUB_CACHE`, so `HF_HUB_CACHE=/mnt HF_HUB_OFFLINE=1` and `from_pretrained("org/name")`
//! find it:
//!
//! ```text
//! views/hf-cache/models--org--name/<snapshot dir>/<revision key>/
//!   models--org--name/
//!     refs/<revision>          the commit, as huggingface_hub writes it (absent for a commit)
//!     snapshots/<commit>/…     the files: hardlinks to the same blobs
//!     blobs/                   empty: huggingface_hub reads snapshots/ offline
//! ```
//!
//! Like a snapshot, a view is built in staging and renamed into place, so it is whole or absent.

use super::{Context, Layout, Result, Snapshot, Store, sync_dir};
use modelcache_core::repo::{Revision, cache_folder};
use sha2::{Digest, Sha256};
use std::fs;
use std::path::{Path, PathBuf};

impl Store {
    /// Where the views of a snapshot live (whether or not there are any).
    pub(super) fn views_of(&self, snap: &Snapshot) -> PathBuf {
        let cache_name = cache_folder(snap.kind, &snap.repo);
        let snap_dir = snap.path.file_name().expect("snapshot dir has a name");
        self.root
            .join("views/hf-cache")
            .join(cache_name)
            .join(snap_dir)
    }

    /// Every directory a mount of `snap` may show: the snapshot and its views.
    pub fn shown_dirs(&self, snap: &Snapshot) -> Vec<PathBuf> {
        let mut dirs = vec![snap.path.clone()];
        if let Ok(views) = std::fs::read_dir(self.views_of(snap)) {
            dirs.extend(views.flatten().map(|e| e.path()));
        }
        dirs
    }

    /// The directory to mount for `snap` in `layout`; for `hf-cache`, built on first use. The
    /// revision the volume named goes into `refs/`, so huggingface_hub resolves it offline.
    pub fn view(&self, snap: &Snapshot, layout: Layout, revision: &Revision) -> Result<PathBuf> {
        if layout == Layout::Snapshot {
            return Ok(snap.path.clone());
        }
        let cache_name = cache_folder(snap.kind, &snap.repo);
        let snap_views = self.views_of(snap);
        let rev_key = if revision.is_commit() {
            "commit".to_owned()
        } else {
            hex::encode(&Sha256::digest(revision.as_str().as_bytes())[..8])
        };
        let dest = snap_views.join(rev_key);
        if dest.is_dir() {
            return Ok(dest);
        }
        let staging = self.staging();
        let tmp = tempfile::Builder::new()
            .prefix("view-")
            .tempdir_in(&staging)
            .ctx("create temp dir in", &staging)?;
        let repo_dir = tmp.path().join(&cache_name);
        let files_dir = repo_dir.join("snapshots").join(snap.commit.as_str());
        fs::create_dir_all(repo_dir.join("blobs")).ctx("create", &repo_dir)?;
        for entry in walkdir::WalkDir::new(&snap.path).min_depth(1) {
            let entry = entry.map_err(|e| {
                let path = e.path().unwrap_or(&snap.path).to_path_buf();
                super::StoreError::from_io("walk", &path, e.into())
            })?;
            let rel = entry
                .path()
                .strip_prefix(&snap.path)
                .expect("below snapshot");
            let out = files_dir.join(rel);
            if entry.file_type().is_dir() {
                fs::create_dir_all(&out).ctx("create", &out)?;
            } else {
                if let Some(parent) = out.parent() {
                    fs::create_dir_all(parent).ctx("create", parent)?;
                }
                self.link_shared(entry.path(), &out, &inode_key(entry.path())?)?;
            }
        }
        fs::create_dir_all(&files_dir).ctx("create", &files_dir)?;
        if !revision.is_commit() {
            // Revisions are validated (no '..', no leading '/'): this stays below refs/.
            let r = repo_dir.join("refs").join(revision.as_str());
            fs::create_dir_all(r.parent().expect("ref has a parent")).ctx("create", &r)?;
            fs::write(&r, snap.commit.as_str()).ctx("write", &r)?;
        }
        let parent = dest.parent().expect("view has a parent");
        fs::create_dir_all(parent).ctx("create", parent)?;
        let tmp_path = tmp.keep();
        if let Err(e) = fs::rename(&tmp_path, &dest) {
            let _ = fs::remove_dir_all(&tmp_path);
            if !dest.is_dir() {
                return Err(e).ctx("rename view into", &dest);
            }
        }
        sync_dir(parent)?;
        Ok(dest)
    }
}

/// Names the inode a snapshot file shows, for its replicas past the link limit: the inode number
/// and its birth time, since numbers are reused once an inode is freed (the change time, where
/// the filesystem keeps no birth time: correct, but then replicas are not shared).
fn inode_key(path: &Path) -> super::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = fs::metadata(path).ctx("stat", path)?;
    let born = match meta.created() {
        Ok(t) => t
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
        Err(_) => {
            u128::from(meta.ctime().unsigned_abs()) * 1_000_000_000
                + u128::from(meta.ctime_nsec().unsigned_abs())
        }
    };
    Ok(format!("inode/{}-{born}", meta.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SnapshotFile;
    use crate::store::tests::put_blob;
    use modelcache_core::repo::{RepoId, RepoKind, RepoPath};

    #[test]
    fn hf_cache_view_has_refs_and_shares_inodes() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let bytes = b"{\"a\":1}";
        let hash = put_blob(&store, bytes);
        let repo = RepoId::parse("org/m").unwrap();
        let commit = "5".repeat(40);
        let files = [SnapshotFile {
            path: RepoPath::parse("sub/config.json").unwrap(),
            hash: hash.clone(),
        }];
        let snap = store
            .assemble_snapshot(
                &crate::store::SnapshotKey::parse(RepoKind::Model, &repo, &commit, None).unwrap(),
                &files,
            )
            .unwrap();
        assert_eq!(
            store
                .view(&snap, Layout::Snapshot, &Revision::main())
                .unwrap(),
            snap.path
        );
        let rev = Revision::parse("refs/pr/7").unwrap();
        let view = store.view(&snap, Layout::HfCache, &rev).unwrap();
        let cache = view.join("models--org--m");
        assert_eq!(
            fs::read_to_string(cache.join("refs/refs/pr/7")).unwrap(),
            commit
        );
        let file = cache
            .join("snapshots")
            .join(&commit)
            .join("sub/config.json");
        assert_eq!(fs::read(&file).unwrap(), bytes);
        let ino = |p: &std::path::Path| fs::metadata(p).unwrap().ino();
        assert_eq!(ino(&file), ino(&store.blob_path(&hash)));
        assert_eq!(
            store.view(&snap, Layout::HfCache, &rev).unwrap(),
            view,
            "reused"
        );
        let by_commit = store
            .view(&snap, Layout::HfCache, &Revision::parse(&commit).unwrap())
            .unwrap();
        assert_ne!(by_commit, view);
        assert!(!by_commit.join("models--org--m/refs").exists());
        assert_eq!(fs::read_dir(dir.path().join("staging")).unwrap().count(), 0);
    }
}
