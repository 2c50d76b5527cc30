//! The node's model store: one copy of each file, any number of snapshots.
//!
//! ```text
//! STORE/
//!   blobs/sha256/<hex>                      LFS/Xet files, by sha256 (read-only, 0444)
//!   blobs/sha1/<hex>                        other files, by git blob id
//!   snapshots/models--org--name/<commit>/   the repo's files as hardlinks to blobs
//!   refs/models--org--name/<revision>       the commit a branch or tag last resolved to
//!   views/hf-cache/…                        snapshots shaped as an HF_HUB_CACHE (see `views`)
//!   staging/                                downloads and snapshots being built
//!   partial/                                large downloads that resume after a restart
//!   meta/models--org--name/<snapshot>.json  each snapshot's size, source, creation, last use
//!   pins.json                               which volume uses which snapshot
//!   lock                                    held (flock) by the one process writing the store
//! ```
//!
//! Nothing is visible half-written: a blob is written, fsynced and renamed into `blobs/`; a
//! snapshot is assembled in `staging/` and renamed into `snapshots/` in one step, so a snapshot
//! directory that exists is complete. `staging/` is emptied on open; `partial/` keeps what a
//! later pull can resume (see `partial`) and loses what is stale.

mod meta;
mod partial;
mod pins;
mod views;

pub use meta::{SnapshotMeta, TOUCH_GRANULARITY, unix};
pub use modelcache_core::Layout;
pub use partial::Partial;
pub use pins::{PIN_SETTLE_SECONDS, PinRecord, Pins, Reconciled};

use modelcache_core::hash::{Algo, ContentHash};
use modelcache_core::repo::{Commit, RepoId, RepoKind, RepoPath, Revision, is_commit_id};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// A store operation that failed, with the path involved.
#[derive(Debug, thiserror::Error)]
#[error("store: {action} {}: {source}", path.display())]
pub struct StoreError {
    action: &'static str,
    path: PathBuf,
    #[source]
    source: io::Error,
}

impl StoreError {
    /// Wraps an I/O error on `path`.
    pub fn from_io(action: &'static str, path: &Path, source: io::Error) -> Self {
        StoreError {
            action,
            path: path.to_path_buf(),
            source,
        }
    }

    /// The underlying I/O error.
    pub fn io(&self) -> &io::Error {
        &self.source
    }

    /// True when the disk (or a quota) is full: evicting may cure it.
    pub fn is_no_space(&self) -> bool {
        modelcache_core::error::is_no_space(&self.source)
    }

    /// What kind of failure this is: a full disk is exhausted, anything else internal.
    pub fn class(&self) -> modelcache_core::error::Class {
        modelcache_core::error::Class::of_io(&self.source)
    }
}

/// Replicas a blob may have: with ext4's 65,000 links each, 64 of them serve over four million
/// files showing one blob.
const MAX_REPLICAS: u32 = 64;

/// `io::Result` with the path and action attached.
pub type Result<T> = std::result::Result<T, StoreError>;

trait Context<T> {
    fn ctx(self, action: &'static str, path: &Path) -> Result<T>;
}

impl<T> Context<T> for io::Result<T> {
    fn ctx(self, action: &'static str, path: &Path) -> Result<T> {
        self.map_err(|source| StoreError {
            action,
            path: path.to_path_buf(),
            source,
        })
    }
}

/// One file of a snapshot: where it goes and which blob it is.
#[derive(Debug, Clone)]
pub struct SnapshotFile {
    /// Path inside the snapshot.
    pub path: RepoPath,
    /// The blob.
    pub hash: ContentHash,
}

/// What names a snapshot: a repo at a commit, with the files a filter takes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SnapshotKey {
    /// Model or dataset.
    pub kind: RepoKind,
    /// `org/name`.
    pub repo: RepoId,
    /// The commit.
    pub commit: Commit,
    /// The key of the include/exclude filter ([`modelcache_core::filter::FileFilter::key`]); None: all files.
    pub filter: Option<String>,
}

impl SnapshotKey {
    /// The key of `repo` at `commit` (checked: 40 hex digits) with the files `filter` names.
    pub fn parse(
        kind: RepoKind,
        repo: &RepoId,
        commit: &str,
        filter: Option<&str>,
    ) -> std::result::Result<Self, modelcache_core::repo::InvalidInput> {
        Ok(SnapshotKey {
            kind,
            repo: repo.clone(),
            commit: Commit::parse(commit)?,
            filter: filter.map(str::to_owned),
        })
    }
}

/// A complete snapshot in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Model or dataset.
    pub kind: RepoKind,
    /// `org/name`.
    pub repo: RepoId,
    /// The commit.
    pub commit: Commit,
    /// The key of the include/exclude filter ([`modelcache_core::filter::FileFilter::key`]); None: all files.
    pub filter: Option<String>,
    /// The directory holding its files.
    pub path: PathBuf,
}

/// How long an untouched partial download is kept for a later pull to resume.
pub const PARTIAL_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// A node's store rooted at a directory.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    /// Partial downloads a running fetch has open; the others may be reclaimed.
    partials: partial::InUse,
    /// The exclusive lock on `STORE/lock` that [`Store::open`] takes; None for [`Store::inspect`].
    _lock: Option<nix::fcntl::Flock<fs::File>>,
}

impl Store {
    /// Opens (creating if needed) a store and clears what an interrupted run left in staging.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root: PathBuf = root.into();
        for dir in [
            "blobs/sha256",
            "blobs/sha1",
            "snapshots",
            "refs",
            "repos",
            "staging",
            "partial",
        ] {
            let d = root.join(dir);
            fs::create_dir_all(&d).ctx("create", &d)?;
        }
        let root = fs::canonicalize(&root).ctx("resolve", &root)?;
        // Closed to other local users: gated models are in here. Pods see snapshots through
        // bind mounts, which do not need the way through the store root.
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&root, fs::Permissions::from_mode(0o700)).ctx("restrict", &root)?;
        }
        // One writer per store: another would sweep this one's staging and partial downloads.
        let lock_path = root.join("lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .ctx("open", &lock_path)?;
        let lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| match errno {
                nix::errno::Errno::EWOULDBLOCK => io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "another modelcache process (the node's agent, or a pull) is using this store; stop it, or give this command another --store",
                ),
                e => io::Error::from(e),
            })
            .ctx("lock", &lock_path)?;
        let store = Store {
            partials: partial::InUse::default(),
            root,
            _lock: Some(lock),
        };
        store.sweep_staging()?;
        store.sweep_partial()?;
        Ok(store)
    }

    /// Opens an existing store as it is, changing nothing: for admin commands that may run
    /// beside the agent, whose staging area must be left alone.
    pub fn inspect(root: impl Into<PathBuf>) -> Result<Self> {
        let root: PathBuf = root.into();
        let blobs = root.join("blobs");
        if !blobs.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "not a modelcache store (no blobs/ directory): check --store",
            ))
            .ctx("open store", &root);
        }
        let root = fs::canonicalize(&root).ctx("resolve", &root)?;
        Ok(Store {
            root,
            partials: partial::InUse::default(),
            _lock: None,
        })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn staging(&self) -> PathBuf {
        self.root.join("staging")
    }

    fn sweep_staging(&self) -> Result<()> {
        let staging = self.staging();
        for entry in fs::read_dir(&staging).ctx("list", &staging)? {
            let path = entry.ctx("list", &staging)?.path();
            let res = if path.is_dir() {
                make_writable(&path);
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            res.ctx("remove leftover", &path)?;
        }
        Ok(())
    }

    /// Drops partial downloads nobody resumed for [`PARTIAL_MAX_AGE`], and those whose blob
    /// is complete.
    fn sweep_partial(&self) -> Result<()> {
        let dir = self.root.join("partial");
        for entry in fs::read_dir(&dir).ctx("list", &dir)? {
            let path = entry.ctx("list", &dir)?.path();
            let age = fs::metadata(&path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .unwrap_or_default();
            let name = path.file_stem().unwrap_or_default().to_string_lossy();
            let done = ContentHash::from_file_name(&name).is_some_and(|h| self.has_blob(&h));
            if age > PARTIAL_MAX_AGE || done {
                fs::remove_file(&path).ctx("remove stale partial download", &path)?;
            }
        }
        Ok(())
    }

    /// The partial download of `hash`, resumed if an earlier run left one with the same chunk
    /// size. The caller must be the only one downloading `hash`.
    pub fn open_partial(&self, hash: &ContentHash, size: u64, chunk: u64) -> Result<Partial> {
        let path = self.root.join("partial").join(hash.file_name());
        Partial::open(path, size, chunk, self.partials.clone())
    }

    /// Bytes already on disk towards the blob `hash`: what its partial download holds.
    pub fn partial_bytes(&self, hash: &ContentHash) -> u64 {
        let path = self.root.join("partial").join(hash.file_name());
        fs::metadata(path).map_or(0, |m| partial::allocated(&m))
    }

    /// The partial downloads' files no running fetch has open, with the bytes each takes. The
    /// lock on the open ones is held while `each` runs.
    fn abandoned_partials(&self, mut each: impl FnMut(&Path, u64) -> Result<()>) -> Result<()> {
        let dir = self.root.join("partial");
        let in_use = self.partials.lock().expect("partials lock");
        for entry in fs::read_dir(&dir).ctx("list", &dir)? {
            let path = entry.ctx("list", &dir)?.path();
            // `<algo>-<hex>` and its journal `<algo>-<hex>.chunks` belong to one download.
            let data = if path.extension().is_some_and(|e| e == "chunks") {
                path.with_extension("")
            } else {
                path.clone()
            };
            if in_use.contains(&data) {
                continue;
            }
            if let Ok(meta) = fs::symlink_metadata(&path) {
                each(&path, partial::allocated(&meta))?;
            }
        }
        Ok(())
    }

    /// Bytes the partial downloads no running fetch has open take.
    pub fn abandoned_partial_bytes(&self) -> u64 {
        let mut bytes = 0;
        let _ = self.abandoned_partials(|_, b| {
            bytes += b;
            Ok(())
        });
        bytes
    }

    /// Deletes the partial downloads no running fetch has open (a failed or abandoned
    /// download's bytes); returns how many files and the bytes they took.
    pub fn reclaim_partials(&self) -> Result<(u64, u64)> {
        let (mut count, mut bytes) = (0, 0);
        self.abandoned_partials(|path, b| match fs::remove_file(path) {
            Ok(()) => {
                count += 1;
                bytes += b;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).ctx("remove abandoned partial download", path),
        })?;
        Ok((count, bytes))
    }

    /// Makes a fully written and verified partial download the blob `hash`.
    pub fn commit_partial(&self, partial: &Partial, hash: &ContentHash) -> Result<()> {
        let (file, tmp) = partial.data();
        file.sync_all().ctx("fsync", tmp)?;
        fs::set_permissions(tmp, fs::Permissions::from_mode(0o444)).ctx("chmod", tmp)?;
        let dest = self.blob_path(hash);
        fs::rename(tmp, &dest).ctx("rename into", &dest)?;
        sync_dir(dest.parent().expect("blob has a parent"))?;
        partial.remove_journal()
    }

    /// Where a blob lives (whether or not it is there).
    pub fn blob_path(&self, hash: &ContentHash) -> PathBuf {
        self.root
            .join("blobs")
            .join(hash.algo().dir_name())
            .join(hash.hex())
    }

    /// Links the blob `hash` at `dest`, never failing on the link limit (see
    /// [`Store::link_shared`]).
    pub fn link_blob(&self, hash: &ContentHash, dest: &Path) -> Result<()> {
        let key = format!("{}/{}", hash.algo().dir_name(), hash.hex());
        self.link_shared(&self.blob_path(hash), dest, &key)
    }

    /// Hard-links `source` (a blob, or a file of a snapshot) at `dest`. A blob is one inode
    /// with a link per file that shows it, and filesystems limit links (ext4: 65,000): past the
    /// limit the link goes to a replica, `blobs/replicas/<key>.<n>`, a copy (a reflink where the
    /// filesystem can) made on first need and shared by later links like the original.
    pub(crate) fn link_shared(&self, source: &Path, dest: &Path, key: &str) -> Result<()> {
        let mut from = source.to_path_buf();
        for n in 1..=MAX_REPLICAS {
            match fs::hard_link(&from, dest) {
                Err(e) if e.raw_os_error() == Some(nix::libc::EMLINK) => {}
                r => return r.ctx("hardlink blob to", dest),
            }
            let replica = self.root.join("blobs/replicas").join(format!("{key}.{n}"));
            if !replica.exists() {
                tracing::info!(source = %source.display(), replica = %replica.display(), "at the link limit; replicating");
                self.replicate(source, &replica)?;
            }
            from = replica;
        }
        fs::hard_link(&from, dest).ctx("hardlink blob replica to", dest)
    }

    /// Copies `from` (verified, read-only) to `to` whole or not at all.
    fn replicate(&self, from: &Path, to: &Path) -> Result<()> {
        let dir = to.parent().expect("replica has a parent");
        fs::create_dir_all(dir).ctx("create", dir)?;
        let tmp = self.staging_file()?;
        // copy_file_range: a reflink on btrfs and XFS, a copy elsewhere.
        fs::copy(from, tmp.path()).ctx("replicate", from)?;
        tmp.as_file().sync_all().ctx("fsync", tmp.path())?;
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o444))
            .ctx("chmod", tmp.path())?;
        // A link, not a rename: a replica another snapshot made meanwhile is kept.
        match fs::hard_link(tmp.path(), to) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                return Err(e).ctx("place replica", to);
            }
            _ => {}
        }
        sync_dir(dir)
    }

    /// Every replica (see [`Store::link_shared`]).
    fn replicas(&self) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for kind in ["sha256", "sha1", "inode"] {
            let dir = self.root.join("blobs/replicas").join(kind);
            match fs::read_dir(&dir) {
                Ok(entries) => {
                    for e in entries {
                        out.push(e.ctx("list", &dir)?.path());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).ctx("list", &dir),
            }
        }
        Ok(out)
    }

    /// True when the blob is in the store.
    pub fn has_blob(&self, hash: &ContentHash) -> bool {
        self.blob_path(hash).is_file()
    }

    /// A new file in staging to download into; removed when dropped unless committed.
    pub fn staging_file(&self) -> Result<tempfile::NamedTempFile> {
        let staging = self.staging();
        tempfile::Builder::new()
            .prefix("blob-")
            .tempfile_in(&staging)
            .ctx("create temp file in", &staging)
    }

    /// Makes a fully written and verified staging file the blob `hash`: read-only, fsynced,
    /// renamed into place. If the blob arrived meanwhile, the copy is dropped.
    pub fn commit_blob(&self, file: tempfile::NamedTempFile, hash: &ContentHash) -> Result<()> {
        let tmp = file.path().to_path_buf();
        file.as_file().sync_all().ctx("fsync", &tmp)?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o444)).ctx("chmod", &tmp)?;
        let dest = self.blob_path(hash);
        file.persist(&dest).map_err(|e| StoreError {
            action: "rename into",
            path: dest.clone(),
            source: e.error,
        })?;
        sync_dir(dest.parent().expect("blob has a parent"))
    }

    fn repo_dir(&self, area: &str, kind: RepoKind, repo: &RepoId) -> PathBuf {
        self.root
            .join(area)
            .join(modelcache_core::repo::cache_folder(kind, repo))
    }

    /// Where a snapshot lives (whether or not it is there): `<commit>` for every file,
    /// `<commit>+<filter key>` for a filtered one.
    pub fn snapshot_path(&self, key: &SnapshotKey) -> PathBuf {
        let name = match &key.filter {
            Some(f) => format!("{}+{f}", key.commit),
            None => key.commit.to_string(),
        };
        self.repo_dir("snapshots", key.kind, &key.repo).join(name)
    }

    /// The snapshot, if complete in the store.
    pub fn snapshot(&self, key: &SnapshotKey) -> Option<Snapshot> {
        let path = self.snapshot_path(key);
        path.is_dir().then(|| Snapshot {
            kind: key.kind,
            repo: key.repo.clone(),
            commit: key.commit.clone(),
            filter: key.filter.clone(),
            path,
        })
    }

    /// Builds a snapshot of hardlinks to blobs (all of which must be present) and makes it
    /// visible in one rename. Idempotent: an existing snapshot is returned as is.
    pub fn assemble_snapshot(&self, key: &SnapshotKey, files: &[SnapshotFile]) -> Result<Snapshot> {
        if let Some(s) = self.snapshot(key) {
            return Ok(s);
        }
        let staging = self.staging();
        let tmp = tempfile::Builder::new()
            .prefix("snap-")
            .tempdir_in(&staging)
            .ctx("create temp dir in", &staging)?;
        for f in files {
            let dest = f.path.under(tmp.path());
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent).ctx("create", parent)?;
            }
            self.link_blob(&f.hash, &dest)?;
        }
        fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755))
            .ctx("chmod", tmp.path())?;
        let dest = self.snapshot_path(key);
        let parent = dest.parent().expect("snapshot has a parent");
        fs::create_dir_all(parent).ctx("create", parent)?;
        let tmp_path = tmp.keep();
        match fs::rename(&tmp_path, &dest) {
            Ok(()) => {}
            // Another assembler won the race; theirs is identical.
            Err(e) if dest.is_dir() => {
                tracing::debug!(error = %e, "snapshot appeared meanwhile");
                let _ = fs::remove_dir_all(&tmp_path);
            }
            Err(e) => {
                let _ = fs::remove_dir_all(&tmp_path);
                return Err(e).ctx("rename snapshot into", &dest);
            }
        }
        sync_dir(parent)?;
        Ok(Snapshot {
            kind: key.kind,
            repo: key.repo.clone(),
            commit: key.commit.clone(),
            filter: key.filter.clone(),
            path: dest,
        })
    }

    /// Records the commit a branch or tag resolved to, for use when the hub cannot be reached.
    pub fn write_ref(
        &self,
        kind: RepoKind,
        repo: &RepoId,
        revision: &Revision,
        commit: &Commit,
    ) -> Result<()> {
        if revision.is_commit() {
            return Ok(());
        }
        let path = self.ref_path(kind, repo, revision);
        if self.read_ref(kind, repo, revision).as_ref() == Some(commit) {
            // Unchanged: only its time moves (when the hub last said so), which a full disk
            // does not refuse.
            let touch = fs::File::options()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_modified(SystemTime::now()));
            match touch {
                // A store from before flat refs keeps `a/b` nested: written flat below.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                touch => return touch.ctx("touch", &path),
            }
        }
        write_atomic(&path, commit.as_bytes())
    }

    /// The commit a branch or tag last resolved to, and when the hub said so, if known.
    pub fn read_ref_at(
        &self,
        kind: RepoKind,
        repo: &RepoId,
        revision: &Revision,
    ) -> Option<(Commit, SystemTime)> {
        let commit = self.read_ref(kind, repo, revision)?;
        let at = fs::metadata(self.ref_path(kind, repo, revision))
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        Some((commit, at))
    }

    /// One flat file per revision, `/` and `%` escaped: `v1` and `v1/x` are two files, not a
    /// file and a directory that cannot both exist.
    fn ref_path(&self, kind: RepoKind, repo: &RepoId, revision: &Revision) -> PathBuf {
        let name = revision.as_str().replace('%', "%25").replace('/', "%2F");
        self.repo_dir("refs", kind, repo).join(name)
    }

    /// The commit a branch or tag last resolved to, if known.
    pub fn read_ref(&self, kind: RepoKind, repo: &RepoId, revision: &Revision) -> Option<Commit> {
        let flat = self.ref_path(kind, repo, revision);
        // Stores written before refs were flat keep `a/b` as nested directories.
        let nested = self.repo_dir("refs", kind, repo).join(revision.as_str());
        let commit = fs::read_to_string(flat)
            .or_else(|_| fs::read_to_string(nested))
            .ok()?;
        Commit::parse(commit.trim()).ok()
    }

    /// Records whether a repo is private or gated, so that access to it is never granted
    /// without asking the hub.
    pub fn set_restricted(&self, kind: RepoKind, repo: &RepoId, restricted: bool) -> Result<()> {
        let path = self.repo_dir("repos", kind, repo).join("restricted");
        match (restricted, path.exists()) {
            (true, false) => write_atomic(&path, b"private or gated on the hub\n"),
            (false, true) => fs::remove_file(&path).ctx("remove", &path),
            _ => Ok(()),
        }
    }

    /// True when the repo was private or gated when last seen.
    pub fn is_restricted(&self, kind: RepoKind, repo: &RepoId) -> bool {
        self.repo_dir("repos", kind, repo)
            .join("restricted")
            .exists()
    }

    /// Every complete snapshot, sorted.
    pub fn list_snapshots(&self) -> Result<Vec<Snapshot>> {
        let dir = self.root.join("snapshots");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).ctx("list", &dir)? {
            let repo_dir = entry.ctx("list", &dir)?.path();
            let name = repo_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let Some((kind, repo)) = parse_repo_dir(&name) else {
                tracing::warn!(dir = %repo_dir.display(), "unexpected directory in snapshots/");
                continue;
            };
            for snap in fs::read_dir(&repo_dir).ctx("list", &repo_dir)? {
                let path = snap.ctx("list", &repo_dir)?.path();
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let (commit, filter) = match name.split_once('+') {
                    Some((c, f)) => (c.to_owned(), Some(f.to_owned())),
                    None => (name, None),
                };
                if let Ok(commit) = Commit::parse(&commit)
                    && path.is_dir()
                {
                    out.push(Snapshot {
                        kind,
                        repo: repo.clone(),
                        commit,
                        filter,
                        path,
                    });
                }
            }
        }
        out.sort_by(|a, b| {
            (a.kind, &a.repo, &a.commit, &a.filter).cmp(&(b.kind, &b.repo, &b.commit, &b.filter))
        });
        Ok(out)
    }

    /// Every blob in the store, with its path.
    pub fn blobs(&self) -> Result<Vec<(ContentHash, PathBuf)>> {
        let mut out = Vec::new();
        for algo in [Algo::Sha256, Algo::GitSha1] {
            let dir = self.root.join("blobs").join(algo.dir_name());
            for entry in fs::read_dir(&dir).ctx("list", &dir)? {
                let path = entry.ctx("list", &dir)?.path();
                let name = path.file_name().unwrap_or_default().to_string_lossy();
                match ContentHash::new(algo, &name) {
                    Ok(hash) => out.push((hash, path)),
                    Err(_) => tracing::warn!(path = %path.display(), "unexpected file among blobs"),
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Moves a blob out of `blobs/` into `quarantine/`, where nothing links to it again; returns
    /// where it went.
    pub fn quarantine_blob(&self, hash: &ContentHash) -> Result<PathBuf> {
        let dir = self.root.join("quarantine");
        fs::create_dir_all(&dir).ctx("create", &dir)?;
        let dest = dir.join(hash.file_name());
        let src = self.blob_path(hash);
        fs::rename(&src, &dest).ctx("move to quarantine", &src)?;
        sync_dir(src.parent().expect("blob has a parent"))?;
        Ok(dest)
    }

    /// Removes a snapshot and its views, each in one step: renamed out of sight first, so it is
    /// never seen half-removed, then deleted. Its blobs stay until [`Store::collect_garbage`].
    pub fn remove_snapshot(&self, snap: &Snapshot) -> Result<()> {
        self.remove_dir_atomically(&self.views_of(snap))?;
        self.remove_dir_atomically(&snap.path)?;
        self.remove_meta(snap)
    }

    fn remove_dir_atomically(&self, dir: &Path) -> Result<()> {
        if !dir.exists() {
            return Ok(());
        }
        let staging = self.staging();
        let doomed = tempfile::Builder::new()
            .prefix("gone-")
            .tempdir_in(&staging)
            .ctx("create temp dir in", &staging)?
            .keep();
        fs::rename(dir, doomed.join("dir")).ctx("move out of sight", dir)?;
        sync_dir(dir.parent().expect("a store directory has a parent"))?;
        make_writable(&doomed);
        fs::remove_dir_all(&doomed).ctx("remove", &doomed)
    }

    /// Deletes the blobs no snapshot or view links to (their only name is in `blobs/`), except
    /// those `keep` names (blobs a running fetch has and will link); returns how many and their
    /// bytes.
    pub fn collect_garbage(&self, keep: impl Fn(&ContentHash) -> bool) -> Result<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let (mut count, mut bytes) = (0, 0);
        for (hash, path) in self.blobs()? {
            let meta = fs::metadata(&path).ctx("stat", &path)?;
            if meta.nlink() == 1 && !keep(&hash) {
                fs::remove_file(&path).ctx("remove unused blob", &path)?;
                count += 1;
                bytes += meta.len();
            }
        }
        for path in self.replicas()? {
            let meta = fs::metadata(&path).ctx("stat", &path)?;
            if meta.nlink() == 1 {
                fs::remove_file(&path).ctx("remove unused replica", &path)?;
                count += 1;
                bytes += meta.len();
            }
        }
        if count > 0 {
            for algo in [Algo::Sha256, Algo::GitSha1] {
                sync_dir(&self.root.join("blobs").join(algo.dir_name()))?;
            }
        }
        Ok((count, bytes))
    }

    /// Bytes of every blob and partial download: what the store takes on disk.
    pub fn bytes_on_disk(&self) -> Result<u64> {
        let mut bytes = 0;
        let replicas = self.replicas()?;
        for path in self.blobs()?.into_iter().map(|(_, p)| p).chain(replicas) {
            bytes += fs::metadata(&path).ctx("stat", &path)?.len();
        }
        let partial = self.root.join("partial");
        for e in walkdir::WalkDir::new(&partial).into_iter().flatten() {
            if e.file_type().is_file() {
                // Allocated blocks: a partial download is sparse until written.
                bytes += e.metadata().map(|m| partial::allocated(&m)).unwrap_or(0);
            }
        }
        Ok(bytes)
    }

    /// The branches and tags recorded for a repo: each with the commit it last resolved to,
    /// and when the hub said so (Unix seconds).
    pub fn refs(&self, kind: RepoKind, repo: &RepoId) -> Vec<(String, String, u64)> {
        let dir = self.repo_dir("refs", kind, repo);
        let mut out: Vec<(String, String, u64)> = walkdir::WalkDir::new(&dir)
            .into_iter()
            .flatten()
            .filter(|e| e.file_type().is_file())
            .filter_map(|e| {
                let name = e.path().strip_prefix(&dir).ok()?.to_str()?;
                let rev = name.replace("%2F", "/").replace("%25", "%");
                let commit = fs::read_to_string(e.path()).ok()?.trim().to_owned();
                let at = e.metadata().ok()?.modified().ok().map(meta::unix)?;
                is_commit_id(&commit).then_some((rev, commit, at))
            })
            .collect();
        out.sort();
        out
    }

    /// The branches and tags that last resolved to `snap`'s commit on this node, each with when
    /// the hub said so (Unix seconds).
    pub fn revisions_resolved(&self, snap: &Snapshot) -> Vec<(String, u64)> {
        self.refs(snap.kind, &snap.repo)
            .into_iter()
            .filter(|(_, c, _)| snap.commit == c.as_str())
            .map(|(r, _, at)| (r, at))
            .collect()
    }

    /// The branches and tags that last resolved to `snap`'s commit on this node.
    pub fn revisions_of(&self, snap: &Snapshot) -> Vec<String> {
        self.revisions_resolved(snap)
            .into_iter()
            .map(|(r, _)| r)
            .collect()
    }

    /// Bytes and file count of a snapshot (each file counted once).
    pub fn snapshot_usage(&self, snap: &Snapshot) -> (u64, u32) {
        let mut bytes = 0;
        let mut files = 0;
        for e in walkdir::WalkDir::new(&snap.path).into_iter().flatten() {
            if e.file_type().is_file() {
                bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
                files += 1;
            }
        }
        (bytes, files)
    }
}

fn parse_repo_dir(name: &str) -> Option<(RepoKind, RepoId)> {
    let (plural, rest) = name.split_once("--")?;
    let kind = match plural {
        "models" => RepoKind::Model,
        "datasets" => RepoKind::Dataset,
        _ => return None,
    };
    let repo = RepoId::parse(&rest.replacen("--", "/", 1)).ok()?;
    Some((kind, repo))
}

/// Writes a small file so that readers see the old or the new content, never a mix.
/// Writes `path` whole or not at all: a temporary file beside it, fsynced, renamed over it.
/// Errors keep the OS's code (ENOSPC, EMFILE…), which decides how a caller reacts.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().expect("file has a parent");
    fs::create_dir_all(dir).ctx("create", dir)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .ctx("create", &tmp)?;
        file.write_all(bytes).ctx("write", &tmp)?;
        file.sync_all().ctx("fsync", &tmp)?;
        fs::rename(&tmp, path).ctx("rename into", path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx("fsync", dir)
}

fn make_writable(dir: &Path) {
    for e in walkdir::WalkDir::new(dir).into_iter().flatten() {
        if e.file_type().is_dir() {
            let _ = fs::set_permissions(e.path(), fs::Permissions::from_mode(0o755));
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;

impl Snapshot {
    /// What names it.
    pub fn key(&self) -> SnapshotKey {
        SnapshotKey {
            kind: self.kind,
            repo: self.repo.clone(),
            commit: self.commit.clone(),
            filter: self.filter.clone(),
        }
    }
}
