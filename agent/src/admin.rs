//! What an admin asks of a node's store: what it holds (`ls`), to drop a model (`rm`), and
//! whether every blob still has the bytes its name promises (`verify`). `rm` refuses snapshots
//! that volumes have mounted, and frees the blobs nothing else uses; `verify` moves corrupt blobs
//! to `STORE/quarantine/` and takes down the unpinned snapshots that showed them, so the next
//! pull downloads them again.
//!
//! `rm` and `verify` change the store, so they run where the pins are: inside the running agent
//! (the `Remove` and `Verify` RPCs, under the lock Pin takes), or, with no agent, in the command
//! itself holding the store's lock. The functions here take the pins from their caller for that
//! reason.

use crate::store::{Pins, Snapshot, Store, StoreError};
use modelcache_core::hash::{ContentHash, hash_file};
use modelcache_core::repo::{Commit, RepoId, RepoKind};
use modelcache_core::size::Size;
use modelcache_proto::agent_v1 as pb;
use serde::Serialize;
use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

/// One snapshot, as `ls` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotRow {
    /// `model` or `dataset`.
    pub kind: &'static str,
    /// `org/name`.
    pub repo: String,
    /// Branches and tags that last resolved to this commit on this node.
    pub revisions: Vec<String>,
    /// When the hub last said so, per branch or tag, in Unix seconds.
    pub resolved: std::collections::BTreeMap<String, u64>,
    /// The commit.
    pub commit: String,
    /// The include/exclude filter key, for a snapshot of some files.
    pub filter: Option<String>,
    /// Files.
    pub files: u32,
    /// Bytes the snapshot shows (its files may share blobs with other snapshots).
    pub bytes: u64,
    /// Volumes that have it mounted.
    pub pinned_by: Vec<String>,
    /// Where its files came from.
    pub source: String,
    /// When it was made, in Unix seconds.
    pub created: u64,
    /// When a volume last used it, in Unix seconds.
    pub last_used: u64,
    /// Its directory.
    pub path: PathBuf,
}

/// The store as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Inventory {
    /// Every complete snapshot.
    pub snapshots: Vec<SnapshotRow>,
    /// Blobs in the store.
    pub blobs: u64,
    /// Bytes on disk: each blob once, however many snapshots show it.
    pub blob_bytes: u64,
    /// Compilation caches.
    pub caches: Vec<crate::caches::CacheView>,
}

/// Why an admin command failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Reading or changing the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// `pins.json` could not be read.
    #[error("cannot read the pins: {0}")]
    Pins(std::io::Error),
    /// Nothing in the store matches.
    #[error("the store holds no snapshot of {0}: `modelcache-agent ls` shows what it holds")]
    NoSuchSnapshot(String),
    /// A commit prefix names several snapshots' commits.
    #[error("--commit {0} names more than one commit of {1}: {2}; give more of it")]
    AmbiguousCommit(String, String, String),
    /// Not a commit, nor the start of one.
    #[error(
        "--commit {0:?} is not a commit: give its 40 hex digits, or at least the first 7 (`modelcache-agent ls` shows 12)"
    )]
    BadCommit(String),
    /// Volumes have the snapshots mounted; nothing was removed.
    #[error(
        "nothing removed: {0} is mounted by volumes {1}; delete the pods that use it (or wait for them to end) and run rm again"
    )]
    Pinned(String, String),
}

impl AdminError {
    /// What kind of failure this is, for the caller's status code.
    pub fn class(&self) -> modelcache_core::error::Class {
        use modelcache_core::error::Class;
        match self {
            AdminError::Store(s) => s.class(),
            AdminError::Pins(_) => Class::Internal,
            AdminError::NoSuchSnapshot(_) => Class::NotFound,
            AdminError::AmbiguousCommit(..) | AdminError::BadCommit(_) => Class::Invalid,
            AdminError::Pinned(..) => Class::Precondition,
        }
    }
}

/// What `rm` removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RemoveReport {
    /// The snapshot directories removed.
    pub removed: Vec<PathBuf>,
    /// Blobs deleted because nothing else used them.
    pub blobs_freed: u64,
    /// Their bytes.
    pub bytes_freed: u64,
}

/// Removes the snapshots of `repo` (only those at `commit` when given), then the blobs that no
/// other snapshot uses and `keep` does not name (downloads in flight). Refuses, removing
/// nothing, when `pins` has any of them mounted. The caller holds `pins` locked throughout, so
/// no pin lands on a snapshot being removed.
pub fn remove(
    store: &Store,
    pins: &Pins,
    kind: RepoKind,
    repo: &RepoId,
    commit: Option<&Commit>,
    keep: impl Fn(&ContentHash) -> bool,
) -> Result<RemoveReport, AdminError> {
    let what = match commit {
        Some(c) => format!("{repo}@{c}"),
        None => repo.to_string(),
    };
    let doomed: Vec<Snapshot> = store
        .list_snapshots()?
        .into_iter()
        .filter(|s| s.kind == kind && &s.repo == repo)
        .filter(|s| commit.is_none_or(|c| s.commit == *c))
        .collect();
    if doomed.is_empty() {
        return Err(AdminError::NoSuchSnapshot(what));
    }
    let volumes: BTreeSet<String> = doomed.iter().flat_map(|s| pins.volumes_of(s)).collect();
    if !volumes.is_empty() {
        let volumes: Vec<String> = volumes.into_iter().collect();
        return Err(AdminError::Pinned(what, volumes.join(", ")));
    }
    for s in &doomed {
        store.remove_snapshot(s)?;
        tracing::info!(model.repo = %s.repo, model.commit = %s.commit, "removed snapshot");
    }
    let (blobs_freed, bytes_freed) = store.collect_garbage(keep)?;
    Ok(RemoveReport {
        removed: doomed.into_iter().map(|s| s.path).collect(),
        blobs_freed,
        bytes_freed,
    })
}

/// The commit of one of `repo`'s snapshots that `given` names: all 40 hex digits, or the first 7
/// or more (as `ls` shows 12), matching exactly one commit the store holds.
pub fn find_commit(
    store: &Store,
    kind: RepoKind,
    repo: &RepoId,
    given: &str,
) -> Result<Commit, AdminError> {
    if let Ok(c) = Commit::parse(given) {
        return Ok(c);
    }
    let prefix = given.to_ascii_lowercase();
    if prefix.len() < 7 || prefix.len() > 40 || !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(AdminError::BadCommit(given.to_owned()));
    }
    let mut commits: Vec<Commit> = store
        .list_snapshots()?
        .into_iter()
        .filter(|s| s.kind == kind && &s.repo == repo && s.commit.starts_with(&prefix))
        .map(|s| s.commit)
        .collect();
    commits.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    commits.dedup();
    match commits.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(AdminError::NoSuchSnapshot(format!("{repo} at {given}"))),
        many => Err(AdminError::AmbiguousCommit(
            given.to_owned(),
            repo.to_string(),
            many.iter()
                .map(|c| c.short())
                .collect::<Vec<_>>()
                .join(", "),
        )),
    }
}

/// `rm` as lines for people.
pub fn render_remove(r: &RemoveReport) -> String {
    let mut out = String::new();
    for p in &r.removed {
        out += &format!("removed {}\n", p.display());
    }
    out += &format!("freed {} blobs, {}\n", r.blobs_freed, Size(r.bytes_freed));
    out
}

/// Lists what the store holds.
pub fn inventory(store: &Store) -> Result<Inventory, AdminError> {
    let pins = Pins::load(store.root()).map_err(AdminError::Pins)?;
    let mut snapshots = Vec::new();
    for snap in store.list_snapshots()? {
        let meta = store.peek_meta(&snap);
        let resolved: std::collections::BTreeMap<String, u64> =
            store.revisions_resolved(&snap).into_iter().collect();
        snapshots.push(SnapshotRow {
            kind: snap.kind.singular(),
            repo: snap.repo.to_string(),
            revisions: resolved.keys().cloned().collect(),
            resolved,
            commit: snap.commit.to_string(),
            filter: snap.filter.clone(),
            files: meta.files,
            bytes: meta.bytes,
            pinned_by: pins.volumes_of(&snap),
            source: meta.source,
            created: meta.created,
            last_used: meta.last_used,
            path: snap.path.clone(),
        });
    }
    let (mut blobs, mut blob_bytes) = (0, 0);
    for (_, path) in store.blobs()? {
        blobs += 1;
        blob_bytes += fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    }
    Ok(Inventory {
        snapshots,
        blobs,
        blob_bytes,
        caches: crate::caches::Caches::inspect(store.root())?,
    })
}

/// What `verify` found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Blobs hashed.
    pub checked: u64,
    /// Bytes hashed.
    pub bytes: u64,
    /// Blobs whose bytes do not match their name.
    pub corrupt: Vec<CorruptBlob>,
}

/// A blob that failed verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CorruptBlob {
    /// Its name, `<algo>:<hex>`.
    pub blob: String,
    /// What its bytes hash to.
    pub actual: String,
    /// Where it went (None: `--dry-run`).
    pub quarantined_to: Option<PathBuf>,
    /// Snapshots that showed it and were removed (the next pull fetches them again).
    pub removed_snapshots: Vec<PathBuf>,
    /// Snapshots that show it and are mounted: left in place, the pods using them should be
    /// restarted after the model is pulled again.
    pub pinned_snapshots: Vec<PathBuf>,
}

/// What hashing every blob found: the slow half of `verify`, which needs no lock.
#[derive(Debug, Default)]
pub struct Scan {
    checked: u64,
    bytes: u64,
    bad: Vec<(ContentHash, ContentHash, Inode)>,
}

/// Re-hashes every blob.
pub fn scan(store: &Store) -> Result<Scan, AdminError> {
    let mut scan = Scan::default();
    for (hash, path) in store.blobs()? {
        let meta = fs::metadata(&path).map_err(|e| StoreError::from_io("stat", &path, e))?;
        let actual =
            hash_file(&path, hash.algo()).map_err(|e| StoreError::from_io("hash", &path, e))?;
        scan.checked += 1;
        scan.bytes += meta.len();
        if actual != hash {
            tracing::error!(blob = %hash, actual = %actual, "corrupt blob");
            scan.bad.push((hash, actual, (meta.dev(), meta.ino())));
        }
    }
    Ok(scan)
}

/// Acts on a [`scan`]: unless `dry_run`, a corrupt blob is moved to `quarantine/` and the
/// snapshots that show it and `pins` does not name are removed. The caller holds `pins` locked.
pub fn quarantine(
    store: &Store,
    pins: &Pins,
    scan: Scan,
    dry_run: bool,
) -> Result<VerifyReport, AdminError> {
    let mut report = VerifyReport {
        checked: scan.checked,
        bytes: scan.bytes,
        corrupt: Vec::new(),
    };
    if scan.bad.is_empty() {
        return Ok(report);
    }
    let inodes: BTreeSet<Inode> = scan.bad.iter().map(|(_, _, i)| *i).collect();
    let showing = snapshots_showing(store, &inodes)?;
    for (hash, actual, inode) in scan.bad {
        let snaps: Vec<&Snapshot> = showing
            .iter()
            .filter(|(_, i)| i.contains(&inode))
            .map(|(s, _)| s)
            .collect();
        let (pinned, unpinned): (Vec<&Snapshot>, Vec<&Snapshot>) = snaps
            .into_iter()
            .partition(|s| !pins.volumes_of(s).is_empty());
        let mut entry = CorruptBlob {
            blob: hash.to_string(),
            actual: actual.to_string(),
            quarantined_to: None,
            removed_snapshots: Vec::new(),
            pinned_snapshots: pinned.iter().map(|s| s.path.clone()).collect(),
        };
        if !dry_run {
            for s in unpinned {
                store.remove_snapshot(s)?;
                entry.removed_snapshots.push(s.path.clone());
            }
            entry.quarantined_to = Some(store.quarantine_blob(&hash)?);
        }
        report.corrupt.push(entry);
    }
    Ok(report)
}

/// [`scan`] then [`quarantine`], for a caller that holds the store alone.
pub fn verify(store: &Store, pins: &Pins, dry_run: bool) -> Result<VerifyReport, AdminError> {
    quarantine(store, pins, scan(store)?, dry_run)
}

/// A file's identity on the node: (device, inode).
type Inode = (u64, u64);

/// Each snapshot with the inodes of its files that are among `inodes`.
fn snapshots_showing(
    store: &Store,
    inodes: &BTreeSet<Inode>,
) -> Result<Vec<(Snapshot, BTreeSet<Inode>)>, AdminError> {
    let mut out = Vec::new();
    for snap in store.list_snapshots()? {
        let hits: BTreeSet<Inode> = walkdir::WalkDir::new(&snap.path)
            .into_iter()
            .flatten()
            .filter(|e| e.file_type().is_file())
            .filter_map(|e| e.metadata().ok())
            .map(|m| (m.dev(), m.ino()))
            .filter(|i| inodes.contains(i))
            .collect();
        if !hits.is_empty() {
            out.push((snap, hits));
        }
    }
    Ok(out)
}

fn paths(p: &[PathBuf]) -> Vec<String> {
    p.iter().map(|p| p.to_string_lossy().into_owned()).collect()
}

fn path_bufs(p: Vec<String>) -> Vec<PathBuf> {
    p.into_iter().map(PathBuf::from).collect()
}

impl From<RemoveReport> for pb::RemoveResponse {
    fn from(r: RemoveReport) -> Self {
        pb::RemoveResponse {
            removed: paths(&r.removed),
            blobs_freed: r.blobs_freed,
            bytes_freed: r.bytes_freed,
        }
    }
}

impl From<pb::RemoveResponse> for RemoveReport {
    fn from(r: pb::RemoveResponse) -> Self {
        RemoveReport {
            removed: path_bufs(r.removed),
            blobs_freed: r.blobs_freed,
            bytes_freed: r.bytes_freed,
        }
    }
}

impl From<VerifyReport> for pb::VerifyResponse {
    fn from(r: VerifyReport) -> Self {
        pb::VerifyResponse {
            checked: r.checked,
            bytes: r.bytes,
            corrupt: r
                .corrupt
                .into_iter()
                .map(|c| pb::CorruptBlob {
                    blob: c.blob,
                    actual: c.actual,
                    quarantined_to: c
                        .quarantined_to
                        .map(|p| p.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    removed_snapshots: paths(&c.removed_snapshots),
                    pinned_snapshots: paths(&c.pinned_snapshots),
                })
                .collect(),
        }
    }
}

impl From<pb::VerifyResponse> for VerifyReport {
    fn from(r: pb::VerifyResponse) -> Self {
        VerifyReport {
            checked: r.checked,
            bytes: r.bytes,
            corrupt: r
                .corrupt
                .into_iter()
                .map(|c| CorruptBlob {
                    blob: c.blob,
                    actual: c.actual,
                    quarantined_to: Some(c.quarantined_to)
                        .filter(|q| !q.is_empty())
                        .map(PathBuf::from),
                    removed_snapshots: path_bufs(c.removed_snapshots),
                    pinned_snapshots: path_bufs(c.pinned_snapshots),
                })
                .collect(),
        }
    }
}

/// How long before `now` the Unix time `at` was, for people.
fn ago(now: u64, at: u64) -> String {
    let secs = now.saturating_sub(at);
    format!(
        "{} ago",
        indicatif::HumanDuration(std::time::Duration::from_secs(secs))
    )
}

/// `ls` as a table for people.
pub fn render_inventory(inv: &Inventory) -> String {
    let mut table = comfy_table::Table::new();
    table
        .load_preset(comfy_table::presets::NOTHING)
        .set_header([
            "KIND",
            "REPO",
            "REVISIONS",
            "COMMIT",
            "FILTER",
            "FILES",
            "SIZE",
            "LAST USED",
            "PINNED BY",
        ]);
    let now = crate::store::unix(std::time::SystemTime::now());
    for s in &inv.snapshots {
        table.add_row([
            s.kind.to_owned(),
            s.repo.clone(),
            if s.revisions.is_empty() {
                "-".to_owned()
            } else {
                // Each with when the hub last said it names this commit.
                s.resolved
                    .iter()
                    .map(|(rev, at)| format!("{rev} ({})", ago(now, *at)))
                    .collect::<Vec<_>>()
                    .join(",")
            },
            s.commit[..12].to_owned(),
            s.filter.clone().unwrap_or_else(|| "-".to_owned()),
            s.files.to_string(),
            Size(s.bytes).to_string(),
            ago(now, s.last_used),
            if s.pinned_by.is_empty() {
                "-".to_owned()
            } else {
                s.pinned_by.join(",")
            },
        ]);
    }
    let shown: u64 = inv.snapshots.iter().map(|s| s.bytes).sum();
    let mut out = format!(
        "{table}\nsnapshots: {}, showing {}; blobs: {}, {} on disk\n",
        inv.snapshots.len(),
        Size(shown),
        inv.blobs,
        Size(inv.blob_bytes)
    );
    if !inv.caches.is_empty() {
        let mut caches = comfy_table::Table::new();
        caches
            .load_preset(comfy_table::presets::NOTHING)
            .set_header(["CACHE", "SCOPE", "SIZE", "MAX", "LAST USED", "MOUNTED BY"]);
        for c in &inv.caches {
            caches.add_row([
                c.cache.clone(),
                c.scope.clone(),
                Size(c.bytes).to_string(),
                Size(c.max_size).to_string(),
                ago(now, c.last_used),
                if c.mounted_by.is_empty() {
                    "-".to_owned()
                } else {
                    c.mounted_by.join(",")
                },
            ]);
        }
        let bytes: u64 = inv.caches.iter().map(|c| c.bytes).sum();
        out += &format!(
            "\n{caches}\ncaches: {}, {} on disk\n",
            inv.caches.len(),
            Size(bytes)
        );
    }
    out
}

/// `verify` as lines for people.
pub fn render_verify(r: &VerifyReport) -> String {
    let mut out = format!(
        "checked {} blobs ({}): {} corrupt\n",
        r.checked,
        Size(r.bytes),
        r.corrupt.len()
    );
    for c in &r.corrupt {
        out += &format!("corrupt {} (its bytes hash to {})\n", c.blob, c.actual);
        match &c.quarantined_to {
            Some(p) => out += &format!("  moved to {}\n", p.display()),
            None => out += "  left in place (--dry-run)\n",
        }
        for p in &c.removed_snapshots {
            out += &format!(
                "  removed snapshot {} (the next pull fetches it again)\n",
                p.display()
            );
        }
        for p in &c.pinned_snapshots {
            out += &format!(
                "  snapshot {} is mounted: kept; restart its pods after the model is pulled again\n",
                p.display()
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::put_blob;
    use crate::store::{PinRecord, SnapshotFile};
    use modelcache_core::Layout;
    use modelcache_core::repo::{RepoPath, Revision};
    use std::os::unix::fs::PermissionsExt;

    fn pins(store: &Store) -> Pins {
        Pins::load(store.root()).unwrap()
    }

    fn pin(store: &Store, volume: &str, snap: &Snapshot) {
        let mut pins = Pins::load(store.root()).unwrap();
        let record = PinRecord {
            kind: "model".into(),
            repo: "org/m".into(),
            commit: snap.commit.to_string(),
            target_path: "/t".into(),
            pod: None,
            filter: None,
            pinned_at: 0,
        };
        pins.pin(volume, record).unwrap();
    }

    fn snap(store: &Store, commit: char, files: &[(&str, &ContentHash)]) -> Snapshot {
        let files: Vec<SnapshotFile> = files
            .iter()
            .map(|(p, h)| SnapshotFile {
                path: RepoPath::parse(p).unwrap(),
                hash: (*h).clone(),
            })
            .collect();
        let repo = RepoId::parse("org/m").unwrap();
        store
            .assemble_snapshot(
                &crate::store::SnapshotKey::parse(
                    RepoKind::Model,
                    &repo,
                    &commit.to_string().repeat(40),
                    None,
                )
                .unwrap(),
                &files,
            )
            .unwrap()
    }

    #[test]
    fn inventory_counts_shared_blobs_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let tok = put_blob(&store, b"tokenizer");
        let (w1, w2) = (
            put_blob(&store, b"weights one"),
            put_blob(&store, b"weights two"),
        );
        let s1 = snap(&store, '1', &[("tok.json", &tok), ("w", &w1)]);
        snap(&store, '2', &[("tok.json", &tok), ("w", &w2)]);
        let repo = RepoId::parse("org/m").unwrap();
        store
            .write_ref(
                RepoKind::Model,
                &repo,
                &Revision::parse("main").unwrap(),
                &Commit::parse(&"2".repeat(40)).unwrap(),
            )
            .unwrap();
        pin(&store, "vol-1", &s1);
        let inv = inventory(&store).unwrap();
        assert_eq!(inv.snapshots.len(), 2);
        assert_eq!(inv.snapshots[0].pinned_by, ["vol-1"]);
        assert!(inv.snapshots[0].revisions.is_empty());
        assert_eq!(inv.snapshots[1].revisions, ["main"]);
        assert_eq!(inv.snapshots[0].bytes, 9 + 11);
        assert_eq!((inv.blobs, inv.blob_bytes), (3, 9 + 11 + 11));
        let text = render_inventory(&inv);
        assert!(
            text.contains("vol-1") && text.contains("snapshots: 2,"),
            "{text}"
        );
    }

    #[test]
    fn rm_takes_a_commit_as_ls_shows_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let repo = RepoId::parse("org/m").unwrap();
        let twins = [
            "a".repeat(40),
            format!("{}{}", "a".repeat(12), "b".repeat(28)),
        ];
        let single = "c".repeat(40);
        for c in twins.iter().chain([&single]) {
            let key = crate::store::SnapshotKey::parse(RepoKind::Model, &repo, c, None).unwrap();
            store.assemble_snapshot(&key, &[]).unwrap();
        }
        let find = |given: &str| find_commit(&store, RepoKind::Model, &repo, given);
        let shown = render_inventory(&inventory(&store).unwrap());
        assert!(shown.contains(&single[..12]), "{shown}");
        assert_eq!(
            find(&single[..12]).unwrap(),
            single.as_str(),
            "as ls shows it"
        );
        assert_eq!(find(&single[..7]).unwrap(), single.as_str());
        assert_eq!(find(&single.to_uppercase()[..9]).unwrap(), single.as_str());
        assert_eq!(find(&single).unwrap(), single.as_str());
        assert!(matches!(
            find(&twins[0][..12]),
            Err(AdminError::AmbiguousCommit(..))
        ));
        assert_eq!(find(&twins[1][..13]).unwrap(), twins[1].as_str());
        assert!(matches!(
            find("ddddddd"),
            Err(AdminError::NoSuchSnapshot(_))
        ));
        let other = RepoId::parse("org/other").unwrap();
        assert!(matches!(
            find_commit(&store, RepoKind::Model, &other, &single[..12]),
            Err(AdminError::NoSuchSnapshot(_))
        ));
        for bad in ["abc", "xyzxyzxyz", "", &"a".repeat(41)] {
            assert!(
                matches!(find(bad), Err(AdminError::BadCommit(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn rm_frees_only_what_nothing_else_uses_and_never_a_mounted_model() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let tok = put_blob(&store, b"shared tokenizer");
        let (w1, w2) = (
            put_blob(&store, b"weights one"),
            put_blob(&store, b"weights 2"),
        );
        let old = snap(&store, '1', &[("tok.json", &tok), ("w", &w1)]);
        let new = snap(&store, '2', &[("tok.json", &tok), ("w", &w2)]);
        let view = store
            .view(&old, Layout::HfCache, &Revision::parse("main").unwrap())
            .unwrap();
        pin(&store, "vol-new", &new);
        let repo = RepoId::parse("org/m").unwrap();

        // The repo as a whole is mounted: nothing is removed.
        let err = remove(&store, &pins(&store), RepoKind::Model, &repo, None, |_| {
            false
        })
        .unwrap_err();
        assert!(err.to_string().contains("vol-new"), "{err}");
        assert!(old.path.exists() && new.path.exists());
        let absent = remove(
            &store,
            &pins(&store),
            RepoKind::Model,
            &repo,
            Some(&Commit::parse(&"9".repeat(40)).unwrap()),
            |_| false,
        )
        .unwrap_err();
        assert!(absent.to_string().contains("ls"), "{absent}");

        // The old commit alone: its snapshot and view go, and only its own weights are freed.
        let r = remove(
            &store,
            &pins(&store),
            RepoKind::Model,
            &repo,
            Some(&old.commit),
            |_| false,
        )
        .unwrap();
        assert_eq!(r.removed, std::slice::from_ref(&old.path));
        assert_eq!((r.blobs_freed, r.bytes_freed), (1, 11));
        assert!(!old.path.exists() && !view.exists());
        assert!(!store.has_blob(&w1) && store.has_blob(&w2) && store.has_blob(&tok));
        assert_eq!(
            std::fs::read(new.path.join("tok.json")).unwrap(),
            b"shared tokenizer"
        );
    }

    #[test]
    fn verify_quarantines_corrupt_blobs_and_spares_mounted_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let good = put_blob(&store, b"good");
        let bad = put_blob(&store, b"will rot");
        let pinned = snap(&store, '1', &[("a", &good), ("b", &bad)]);
        let loose = snap(&store, '2', &[("b", &bad)]);
        let clean = snap(&store, '3', &[("a", &good)]);
        pin(&store, "vol-1", &pinned);
        // Bit rot: the blob's bytes change in place.
        let path = store.blob_path(&bad);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&path, b"has rotted").unwrap();

        let dry = verify(&store, &pins(&store), true).unwrap();
        assert_eq!((dry.checked, dry.corrupt.len()), (2, 1));
        assert!(path.exists() && loose.path.exists());

        let r = verify(&store, &pins(&store), false).unwrap();
        let c = &r.corrupt[0];
        assert_eq!(c.blob, bad.to_string());
        assert_eq!(c.removed_snapshots, std::slice::from_ref(&loose.path));
        assert_eq!(c.pinned_snapshots, std::slice::from_ref(&pinned.path));
        assert!(!path.exists() && c.quarantined_to.as_ref().unwrap().exists());
        assert!(!loose.path.exists() && pinned.path.exists() && clean.path.exists());
        // Verified again: nothing left to find.
        assert!(
            verify(&store, &pins(&store), false)
                .unwrap()
                .corrupt
                .is_empty()
        );
        assert!(render_verify(&r).contains("is mounted: kept"));
    }
}
