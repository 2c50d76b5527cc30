//! Filling the store from a hub: revision → commit, the file plan, verified downloads, and the
//! snapshot. Every byte is hashed as it streams to disk and checked against the hub's tree before
//! the blob becomes visible; a tree that names a path that could escape the snapshot, or two
//! entries that collide, is refused before anything is written.

use crate::access::AccessCache;
use crate::filter::FileFilter;
use crate::hash::{BadDigest, ContentHash, Hasher};
use crate::hub::wire::TreeEntry;
use crate::hub::{HubClient, HubError, client::Token};
use crate::repo::{InvalidInput, ModelRef, RepoId, RepoKind, RepoPath};
use crate::store::{Snapshot, SnapshotFile, Store, StoreError};
use futures::{StreamExt, TryStreamExt};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The hub refused or failed.
    #[error(transparent)]
    Hub(#[from] HubError),
    /// Writing to the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The hub's tree holds something modelcache will not write.
    #[error("{repo}@{commit}: the hub's file list is unsafe: {reason}")]
    UnsafeTree {
        /// `org/name`.
        repo: String,
        /// The commit.
        commit: String,
        /// What was wrong.
        reason: String,
    },
    /// The repo is private or gated and the hub cannot be asked whether this token may read it.
    #[error(
        "cannot check access to {repo}, which is private or gated: the hub is unreachable ({source}); retry when it is back"
    )]
    AccessUnverifiable {
        /// `org/name`.
        repo: String,
        /// Why the hub could not answer.
        #[source]
        source: HubError,
    },
    /// The include/exclude patterns take no file of the repo.
    #[error(
        "no file of {repo}@{commit} matches include {include:?} minus exclude {exclude:?}: check the patterns against the repo's file names"
    )]
    NothingMatches {
        /// `org/name`.
        repo: String,
        /// The commit.
        commit: String,
        /// Include patterns.
        include: String,
        /// Exclude patterns.
        exclude: String,
    },
    /// Downloaded bytes did not match the hub's hash or size, twice.
    #[error(
        "{path}: downloaded bytes do not match the hub ({detail}); the data was discarded — retry, and if it persists the hub or a proxy is serving corrupt data"
    )]
    Integrity {
        /// The file.
        path: String,
        /// Expected vs got.
        detail: String,
    },
    /// The connection broke while streaming a body.
    #[error("{path}: download interrupted: {source}")]
    Interrupted {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
}

impl FetchError {
    fn unsafe_tree(repo: &RepoId, commit: &str, reason: impl Into<String>) -> Self {
        FetchError::UnsafeTree {
            repo: repo.to_string(),
            commit: commit.to_owned(),
            reason: reason.into(),
        }
    }
}

/// Counters a fetch updates as it goes; readers poll them for progress.
#[derive(Debug, Default)]
pub struct Progress {
    bytes_done: AtomicU64,
    bytes_total: AtomicU64,
    files_done: AtomicU32,
    files_total: AtomicU32,
}

/// A reading of [`Progress`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProgressView {
    /// Bytes present so far (already in the store or downloaded).
    pub bytes_done: u64,
    /// Bytes of the whole snapshot; 0 until the file list is known.
    pub bytes_total: u64,
    /// Files present so far.
    pub files_done: u32,
    /// Files in the snapshot.
    pub files_total: u32,
}

impl Progress {
    /// Reads the counters.
    pub fn view(&self) -> ProgressView {
        ProgressView {
            bytes_done: self.bytes_done.load(Ordering::Relaxed),
            bytes_total: self.bytes_total.load(Ordering::Relaxed),
            files_done: self.files_done.load(Ordering::Relaxed),
            files_total: self.files_total.load(Ordering::Relaxed),
        }
    }
}

/// One file to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedFile {
    /// Path in the repo.
    pub path: RepoPath,
    /// The hash it must have.
    pub hash: ContentHash,
    /// Its size.
    pub size: u64,
}

/// Turns a hub's tree into the files to fetch, refusing unsafe or colliding paths, bad digests
/// and inconsistent sizes.
pub fn plan(
    repo: &RepoId,
    commit: &str,
    tree: &[TreeEntry],
) -> Result<Vec<PlannedFile>, FetchError> {
    let mut files = BTreeMap::new();
    for e in tree.iter().filter(|e| e.is_file()) {
        let path = RepoPath::parse(&e.path)
            .map_err(|e: InvalidInput| FetchError::unsafe_tree(repo, commit, e.to_string()))?;
        let hash = ContentHash::for_entry(&e.oid, e.lfs.as_ref().map(|l| l.oid.as_str())).map_err(
            |d: BadDigest| FetchError::unsafe_tree(repo, commit, format!("{}: {d}", e.path)),
        )?;
        let size = match &e.lfs {
            Some(lfs) if lfs.size != e.size => {
                return Err(FetchError::unsafe_tree(
                    repo,
                    commit,
                    format!("{}: size {} but LFS size {}", e.path, e.size, lfs.size),
                ));
            }
            _ => e.size,
        };
        let planned = PlannedFile {
            path: path.clone(),
            hash,
            size,
        };
        if files.insert(path, planned).is_some() {
            return Err(FetchError::unsafe_tree(
                repo,
                commit,
                format!("{} is listed twice", e.path),
            ));
        }
    }
    // A file may not also be a directory of another file ("a" and "a/b").
    let mut dirs = BTreeSet::new();
    for path in files.keys() {
        let s = path.as_str();
        for (i, _) in s.match_indices('/') {
            dirs.insert(&s[..i]);
        }
    }
    if let Some(clash) = files.keys().find(|p| dirs.contains(p.as_str())) {
        return Err(FetchError::unsafe_tree(
            repo,
            commit,
            format!("{clash} is both a file and a directory"),
        ));
    }
    Ok(files.into_values().collect())
}

/// The repo at a commit that files are fetched from.
#[derive(Clone, Copy)]
struct Source<'a> {
    kind: RepoKind,
    repo: &'a RepoId,
    commit: &'a str,
    token: Option<&'a Token>,
}

/// Downloads repos into a store.
#[derive(Debug, Clone)]
pub struct Fetcher {
    hub: HubClient,
    store: Arc<Store>,
    files_in_parallel: usize,
    access: Arc<AccessCache>,
}

/// How long the hub's "yes" to a (repo, revision, token) is trusted by default.
pub const DEFAULT_ACCESS_TTL: Duration = Duration::from_secs(30);

impl Fetcher {
    /// A fetcher downloading up to `files_in_parallel` files at once.
    pub fn new(hub: HubClient, store: Arc<Store>, files_in_parallel: usize) -> Self {
        Fetcher {
            hub,
            store,
            files_in_parallel: files_in_parallel.max(1),
            access: Arc::new(AccessCache::new(DEFAULT_ACCESS_TTL)),
        }
    }

    /// Trusts the hub's answers on access and revisions for `ttl` (zero: ask every time).
    pub fn with_access_ttl(mut self, ttl: Duration) -> Self {
        self.access = Arc::new(AccessCache::new(ttl));
        self
    }

    /// The store filled.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The commit `model.revision` points to now, asked of the hub with `token` (which also
    /// checks that the token may read the repo), or taken from a recent answer to the same
    /// question. When the hub cannot be reached (network error, 5xx after retries), a public
    /// repo falls back to the commit the revision last resolved to on this node, so a node keeps
    /// serving what it holds through a hub outage; a private or gated one is refused, because
    /// access cannot be checked.
    pub async fn resolve(
        &self,
        model: &ModelRef,
        token: Option<&Token>,
    ) -> Result<String, FetchError> {
        if let Some(commit) = self.access.get(model, token, Instant::now()) {
            return Ok(commit);
        }
        let (kind, repo) = (model.kind, &model.repo);
        match self.hub.resolve_revision(model, token).await {
            Ok(resolved) => {
                self.store.set_restricted(kind, repo, resolved.restricted)?;
                self.store
                    .write_ref(kind, repo, &model.revision, &resolved.commit)?;
                self.access
                    .grant(model, token, &resolved.commit, Instant::now());
                Ok(resolved.commit)
            }
            Err(e) if e.is_transient() && self.store.is_restricted(kind, repo) => {
                Err(FetchError::AccessUnverifiable {
                    repo: repo.to_string(),
                    source: e,
                })
            }
            Err(e) if e.is_transient() => {
                let known = if model.revision.is_commit() {
                    Some(model.revision.to_string())
                } else {
                    self.store.read_ref(kind, repo, &model.revision)
                };
                match known {
                    Some(commit) => {
                        tracing::warn!(error = %e, model.commit = %commit, "hub unreachable; using the commit this revision last resolved to");
                        Ok(commit)
                    }
                    None => Err(e.into()),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Makes the snapshot of `repo` at `commit`, holding the files `filter` takes, complete in
    /// the store, downloading what is missing; `progress` is updated as files arrive.
    pub async fn fetch(
        &self,
        kind: RepoKind,
        repo: &RepoId,
        commit: &str,
        filter: &FileFilter,
        token: Option<&Token>,
        progress: &Progress,
    ) -> Result<Snapshot, FetchError> {
        let key = filter.key();
        if let Some(s) = self.store.snapshot(kind, repo, commit, key.as_deref()) {
            return Ok(s);
        }
        let tree = self.hub.list_tree(kind, repo, commit, token).await?;
        let mut files = plan(repo, commit, &tree)?;
        files.retain(|f| filter.admits(f.path.as_str()));
        if files.is_empty() && !filter.is_all() {
            return Err(FetchError::NothingMatches {
                repo: repo.to_string(),
                commit: commit.to_owned(),
                include: filter.include().join(","),
                exclude: filter.exclude().join(","),
            });
        }
        progress
            .bytes_total
            .store(files.iter().map(|f| f.size).sum(), Ordering::Relaxed);
        progress
            .files_total
            .store(files.len() as u32, Ordering::Relaxed);
        tracing::info!(
            files = files.len(),
            bytes = progress.view().bytes_total,
            "fetching"
        );
        let src = Source {
            kind,
            repo,
            commit,
            token,
        };
        futures::stream::iter(files.clone())
            .map(|f| async move { self.fetch_blob(src, &f, progress).await })
            .buffer_unordered(self.files_in_parallel)
            .try_collect::<()>()
            .await?;
        let links: Vec<SnapshotFile> = files
            .into_iter()
            .map(|f| SnapshotFile {
                path: f.path,
                hash: f.hash,
            })
            .collect();
        let store = self.store.clone();
        let (repo, commit) = (repo.clone(), commit.to_owned());
        let snap = tokio::task::spawn_blocking(move || {
            store.assemble_snapshot(kind, &repo, &commit, key.as_deref(), &links)
        })
        .await
        .expect("assemble task does not panic")?;
        Ok(snap)
    }

    async fn fetch_blob(
        &self,
        src: Source<'_>,
        file: &PlannedFile,
        progress: &Progress,
    ) -> Result<(), FetchError> {
        if !self.store.has_blob(&file.hash) {
            // A mismatch or a broken stream is tried once more before failing.
            let mut attempt = 0;
            loop {
                attempt += 1;
                let mut counted = 0u64;
                let res = self.download_once(src, file, progress, &mut counted).await;
                match res {
                    Ok(()) => break,
                    Err(e) => {
                        progress.bytes_done.fetch_sub(counted, Ordering::Relaxed);
                        let retry = matches!(
                            e,
                            FetchError::Integrity { .. } | FetchError::Interrupted { .. }
                        ) || matches!(&e, FetchError::Hub(h) if h.is_transient());
                        if attempt >= 2 || !retry {
                            return Err(e);
                        }
                        tracing::warn!(file = %file.path, error = %e, "download failed; retrying once");
                    }
                }
            }
        } else {
            progress.bytes_done.fetch_add(file.size, Ordering::Relaxed);
        }
        progress.files_done.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// One download attempt; `counted` holds the bytes it added to `progress`, so a failed
    /// attempt can take them back.
    async fn download_once(
        &self,
        src: Source<'_>,
        file: &PlannedFile,
        progress: &Progress,
        counted: &mut u64,
    ) -> Result<(), FetchError> {
        let resp = self
            .hub
            .download(src.kind, src.repo, src.commit, &file.path, src.token)
            .await?;
        let tmp = self.store.staging_file()?;
        let std_file = tmp
            .reopen()
            .map_err(|e| FetchError::Store(StoreError::from_io("reopen", tmp.path(), e)))?;
        let mut out =
            tokio::io::BufWriter::with_capacity(1 << 20, tokio::fs::File::from_std(std_file));
        let mut hasher = Hasher::new(file.hash.algo(), file.size);
        let mut body = resp.bytes_stream();
        let mut got = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|source| FetchError::Interrupted {
                path: file.path.to_string(),
                source,
            })?;
            got += chunk.len() as u64;
            if got > file.size {
                return Err(FetchError::Integrity {
                    path: file.path.to_string(),
                    detail: format!("body is longer than the {} bytes announced", file.size),
                });
            }
            hasher.update(&chunk);
            out.write_all(&chunk)
                .await
                .map_err(|e| StoreError::from_io("write", tmp.path(), e))?;
            progress
                .bytes_done
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            *counted += chunk.len() as u64;
        }
        out.flush()
            .await
            .map_err(|e| StoreError::from_io("write", tmp.path(), e))?;
        if got != file.size {
            return Err(FetchError::Integrity {
                path: file.path.to_string(),
                detail: format!("{got} bytes received, {} announced", file.size),
            });
        }
        let actual = hasher.finish();
        if actual != file.hash {
            return Err(FetchError::Integrity {
                path: file.path.to_string(),
                detail: format!("expected {}, got {}", file.hash, actual),
            });
        }
        let store = self.store.clone();
        let hash = file.hash.clone();
        tokio::task::spawn_blocking(move || store.commit_blob(tmp, &hash))
            .await
            .expect("commit task does not panic")?;
        tracing::debug!(file = %file.path, bytes = got, "verified");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::wire::LfsInfo;

    fn entry(path: &str, oid: &str, size: u64) -> TreeEntry {
        TreeEntry {
            kind: "file".into(),
            oid: oid.into(),
            size,
            path: path.into(),
            lfs: None,
        }
    }

    fn plan_of(tree: &[TreeEntry]) -> Result<Vec<PlannedFile>, FetchError> {
        plan(&RepoId::parse("o/r").unwrap(), &"c".repeat(40), tree)
    }

    #[test]
    fn plan_accepts_a_normal_tree() {
        let oid = "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391";
        let mut lfs = entry("w/model.safetensors", oid, 5);
        lfs.lfs = Some(LfsInfo {
            oid: "b".repeat(64),
            size: 5,
            pointer_size: 134,
        });
        let dir = TreeEntry {
            kind: "directory".into(),
            ..entry("w", oid, 0)
        };
        let p = plan_of(&[entry("config.json", oid, 0), dir, lfs]).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[1].hash.algo(), crate::hash::Algo::Sha256);
    }

    #[test]
    fn plan_refuses_hostile_trees() {
        let oid = "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391";
        let cases: Vec<(Vec<TreeEntry>, &str)> = vec![
            (vec![entry("../evil", oid, 0)], "'..'"),
            (vec![entry("/etc/passwd", oid, 0)], "absolute"),
            (vec![entry("a\\b", oid, 0)], "backslash"),
            (vec![entry("a\0b", oid, 0)], "NUL"),
            (vec![entry("a", oid, 0), entry("a", oid, 0)], "listed twice"),
            (
                vec![entry("a", oid, 0), entry("a/b", oid, 0)],
                "both a file and a directory",
            ),
            (vec![entry("a", "../../x", 0)], "not 40 lowercase hex"),
        ];
        for (tree, want) in cases {
            let err = plan_of(&tree).unwrap_err().to_string();
            assert!(err.contains(want), "{tree:?}: {err}");
        }
        let mut bad_lfs = entry("w.bin", oid, 5);
        bad_lfs.lfs = Some(LfsInfo {
            oid: "b".repeat(64),
            size: 6,
            pointer_size: 1,
        });
        assert!(plan_of(&[bad_lfs]).is_err());
    }
}
