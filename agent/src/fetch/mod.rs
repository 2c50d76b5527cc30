//! Filling the store: revision → commit, the file plan ([`plan`]), verified downloads from the
//! hub or imports from a shared cache ([`sources`], [`import`]), and the snapshot.
//!
//! Files up to [`Tuning::chunk_size`] stream in one request and are hashed as they arrive. Larger
//! ones are fetched in parallel byte ranges into a resumable partial file ([`ranged`]), hashed in
//! order as the written prefix grows, so the hash is ready when the last byte lands. Either way
//! the hash and size are checked against the hub's tree before the blob becomes visible, and one
//! download per blob runs on a node however many volumes ask for it ([`BlobLocks`]).

mod budget;
mod import;
mod inflight;
mod plan;
mod ranged;
mod sources;
mod wanted;

pub use plan::{PlannedFile, plan};
pub use sources::{BadSources, Sources, Tier};
pub use wanted::{Wanted, WantedGuard};

/// Makes room in the store for bytes about to be written (the evictor does, see
/// `crate::evict`).
pub trait Room: Send + Sync + std::fmt::Debug {
    /// Frees space so that `bytes` more fit, or says why they cannot. Blocking.
    fn make_room(&self, bytes: u64) -> Result<(), NoRoom>;
}

/// Bytes that do not fit in the store, even after evicting every model not in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "needs {needed} more bytes on disk, but the store's filesystem has {available} bytes free and evicting every model not in use would free at most {reclaimable} more"
)]
pub struct NoRoom {
    /// Bytes to write.
    pub needed: u64,
    /// Bytes free now.
    pub available: u64,
    /// Bytes that evicting every snapshot not in use could free (at most).
    pub reclaimable: u64,
}

use crate::access::AccessCache;
use crate::shared_cache::SharedCacheError;
use crate::store::{Snapshot, SnapshotFile, Store, StoreError};
use backon::BackoffBuilder;
use futures::{StreamExt, TryStreamExt};
use inflight::BlobLocks;
use modelcache_core::filter::FileFilter;
use modelcache_core::hash::Hasher;
use modelcache_core::repo::{ModelRef, RepoId, RepoKind};
use modelcache_hub::client::{FileSource, retry_policy};
use modelcache_hub::{HubClient, HubError, client::Token};
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
    /// The shared cache holds something modelcache will not read.
    #[error(transparent)]
    SharedCache(#[from] SharedCacheError),
    /// Without a hub, the shared cache is all there is, and it lacks the revision.
    #[error(
        "the shared cache at {cache} holds no {what} of {repo}, and the hub is not among --sources: fill it (huggingface-cli download {repo} --revision {revision}) or add hub to --sources"
    )]
    NotInSharedCache {
        /// `org/name`.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// `refs/<revision>` or `snapshot <commit>`.
        what: String,
        /// The shared cache's path.
        cache: String,
    },
    /// The snapshot does not fit in the store.
    #[error(
        "{repo}@{commit} does not fit in the store: {source}; free disk space, unpublish models, or give the store a larger disk"
    )]
    NoRoom {
        /// `org/name`.
        repo: String,
        /// The commit.
        commit: String,
        /// The sizes.
        #[source]
        source: NoRoom,
    },
    /// No tier could give a file.
    #[error("{path}: {reason}")]
    Unavailable {
        /// The file.
        path: String,
        /// What each tier said.
        reason: String,
    },
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
    /// What kind of failure this is, for the caller's status code.
    pub fn class(&self) -> modelcache_core::error::Class {
        use modelcache_core::error::Class;
        match self {
            FetchError::Hub(h) => h.class(),
            FetchError::Store(s) => s.class(),
            FetchError::UnsafeTree { .. }
            | FetchError::NothingMatches { .. }
            | FetchError::SharedCache(_) => Class::Precondition,
            FetchError::NotInSharedCache { .. } => Class::NotFound,
            FetchError::NoRoom { .. } => Class::Exhausted,
            // A download Job may still be filling the shared cache.
            FetchError::Unavailable { .. } => Class::Unavailable,
            FetchError::Integrity { .. } => Class::DataLoss,
            FetchError::Interrupted { .. } | FetchError::AccessUnverifiable { .. } => {
                Class::Unavailable
            }
        }
    }

    pub(crate) fn unsafe_tree(repo: &RepoId, commit: &str, reason: impl Into<String>) -> Self {
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
    bytes_downloaded: AtomicU64,
    bytes_imported: AtomicU64,
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
    /// Bytes of files downloaded from the hub, once verified.
    pub bytes_downloaded: u64,
    /// Bytes of files imported from the shared cache, once verified.
    pub bytes_imported: u64,
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
            bytes_downloaded: self.bytes_downloaded.load(Ordering::Relaxed),
            bytes_imported: self.bytes_imported.load(Ordering::Relaxed),
            files_done: self.files_done.load(Ordering::Relaxed),
            files_total: self.files_total.load(Ordering::Relaxed),
        }
    }
}

/// The repo at a commit that files are fetched from.
#[derive(Clone, Copy)]
struct Source<'a> {
    kind: RepoKind,
    repo: &'a RepoId,
    commit: &'a str,
    token: Option<&'a Token>,
    /// This fetch's share of the connections.
    share: &'a budget::Share,
}

impl<'a> Source<'a> {
    fn file(self, f: &'a PlannedFile) -> FileSource<'a> {
        FileSource {
            kind: self.kind,
            repo: self.repo,
            commit: self.commit,
            path: &f.path,
            token: self.token,
        }
    }
}

/// How downloads are spread over connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// Files downloaded at once.
    pub files: usize,
    /// HTTP requests in flight at once, over all files.
    pub connections: usize,
    /// Files larger than this are fetched in ranges of this size, in parallel and resumably.
    pub chunk_size: u64,
}

impl Default for Tuning {
    /// Defaults measured by `hack/bench-pull.sh` (README): 32 connections fill 1.2 GB/s of
    /// 40 MB/s-per-connection CDN links while peak RSS stays under 64 MiB (64 connections add
    /// little on a 2-core node and cross it), and 16 MiB ranges keep the per-request overhead
    /// small while a retry loses little.
    fn default() -> Self {
        Tuning {
            files: 8,
            connections: 32,
            chunk_size: 16 << 20,
        }
    }
}

/// Downloads repos into a store.
#[derive(Debug, Clone)]
pub struct Fetcher {
    hub: HubClient,
    store: Arc<Store>,
    tuning: Tuning,
    connections: Arc<budget::Budget>,
    access: Arc<AccessCache>,
    inflight: Arc<BlobLocks>,
    sources: Sources,
    wanted: Wanted,
    room: Option<Arc<dyn Room>>,
}

/// How long the hub's "yes" to a (repo, revision, token) is trusted by default.
pub const DEFAULT_ACCESS_TTL: Duration = Duration::from_secs(30);

impl Fetcher {
    /// A fetcher that spreads downloads as `tuning` says.
    pub fn new(hub: HubClient, store: Arc<Store>, tuning: Tuning) -> Self {
        let tuning = Tuning {
            files: tuning.files.max(1),
            connections: tuning.connections.max(1),
            chunk_size: tuning.chunk_size.max(1 << 20),
        };
        Fetcher {
            hub,
            store,
            tuning,
            connections: budget::Budget::new(tuning.connections),
            access: Arc::new(AccessCache::new(DEFAULT_ACCESS_TTL)),
            inflight: Arc::default(),
            sources: Sources::default(),
            wanted: Wanted::default(),
            room: None,
        }
    }

    /// Asks `room` for space before writing a snapshot's missing bytes, and again once on
    /// ENOSPC.
    pub fn with_room(mut self, room: Arc<dyn Room>) -> Self {
        self.room = Some(room);
        self
    }

    /// The blobs running fetches want (for garbage collection beside them).
    pub fn wanted(&self) -> &Wanted {
        &self.wanted
    }

    /// Takes files from `sources`, in their order (the hub alone by default).
    pub fn with_sources(mut self, sources: Sources) -> Self {
        self.sources = sources;
        self
    }

    /// The tiers files come from.
    pub fn sources(&self) -> &Sources {
        &self.sources
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
        if !self.sources.uses_hub() {
            return self.resolve_in_shared_cache(model);
        }
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
                    Some((model.revision.to_string(), "the commit asked for"))
                } else if let Some(c) = self.store.read_ref(kind, repo, &model.revision) {
                    Some((c, "the commit this revision last resolved to on this node"))
                } else {
                    self.shared_ref(model)
                        .map(|c| (c, "the shared cache's ref"))
                };
                match known {
                    Some((commit, why)) => {
                        tracing::warn!(error = %e, model.commit = %commit, "hub unreachable; using {why}");
                        Ok(commit)
                    }
                    None => Err(e.into()),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The shared cache's ref for `model.revision`, when there is a shared cache and it has one;
    /// a fallback, so a cache that cannot be read is logged and counts as no answer.
    fn shared_ref(&self, model: &ModelRef) -> Option<String> {
        let shared = self.sources.shared()?;
        shared
            .read_ref(model.kind, &model.repo, &model.revision)
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot read the shared cache's ref");
                None
            })
    }

    /// Without a hub: the commit the shared cache's `refs/<revision>` names (or the commit asked
    /// for, when the cache holds its snapshot).
    fn resolve_in_shared_cache(&self, model: &ModelRef) -> Result<String, FetchError> {
        let shared = self
            .sources
            .shared()
            .expect("without the hub, the shared cache is the tier");
        let (kind, repo) = (model.kind, &model.repo);
        match shared.read_ref(kind, repo, &model.revision)? {
            Some(commit) => {
                self.store.write_ref(kind, repo, &model.revision, &commit)?;
                Ok(commit)
            }
            None => Err(FetchError::NotInSharedCache {
                repo: repo.to_string(),
                revision: model.revision.to_string(),
                what: if model.revision.is_commit() {
                    format!("snapshot {}", model.revision)
                } else {
                    format!("refs/{}", model.revision)
                },
                cache: shared.root().display().to_string(),
            }),
        }
    }

    /// The files of `repo` at `commit`, and the tier that listed them: the hub's tree when the
    /// hub is a tier (the shared cache's snapshot while the hub is unreachable), else the shared
    /// cache's snapshot.
    async fn list_files(
        &self,
        kind: RepoKind,
        repo: &RepoId,
        commit: &str,
        token: Option<&Token>,
    ) -> Result<(Vec<PlannedFile>, Tier), FetchError> {
        if self.sources.uses_hub() {
            let e = match self.hub.list_tree(kind, repo, commit, token).await {
                Ok(tree) => return Ok((plan(repo, commit, &tree)?, Tier::Hub)),
                Err(e) => e,
            };
            if !e.is_transient() {
                return Err(e.into());
            }
            return match self.shared_listing(kind, repo, commit) {
                Ok(Some(files)) => {
                    tracing::warn!(error = %e, "hub unreachable; taking the file list from the shared cache");
                    Ok((files, Tier::Pvc))
                }
                Ok(None) => Err(e.into()),
                Err(shared) => {
                    tracing::warn!(error = %shared, "cannot list the snapshot in the shared cache");
                    Err(e.into())
                }
            };
        }
        match self.shared_listing(kind, repo, commit)? {
            Some(files) => Ok((files, Tier::Pvc)),
            None => Err(FetchError::NotInSharedCache {
                repo: repo.to_string(),
                revision: commit.to_owned(),
                what: format!("snapshot {commit}"),
                cache: self
                    .sources
                    .shared()
                    .map(|s| s.root().display().to_string())
                    .unwrap_or_default(),
            }),
        }
    }

    /// The shared cache's snapshot of `commit` as files to fetch; None without one.
    fn shared_listing(
        &self,
        kind: RepoKind,
        repo: &RepoId,
        commit: &str,
    ) -> Result<Option<Vec<PlannedFile>>, FetchError> {
        let Some(shared) = self.sources.shared() else {
            return Ok(None);
        };
        let files = shared.list_snapshot(kind, repo, commit)?.map(|files| {
            files
                .into_iter()
                .map(|f| PlannedFile {
                    path: f.path,
                    hash: f.hash,
                    size: f.size,
                })
                .collect()
        });
        Ok(files)
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
        progress: &Arc<Progress>,
    ) -> Result<Snapshot, FetchError> {
        let key = filter.key();
        if let Some(s) = self.store.snapshot(kind, repo, commit, key.as_deref()) {
            return Ok(s);
        }
        let (mut files, listed_by) = self.list_files(kind, repo, commit, token).await?;
        files.retain(|f| filter.admits(f.path.as_str()));
        if files.is_empty() && !filter.is_all() {
            return Err(FetchError::NothingMatches {
                repo: repo.to_string(),
                commit: commit.to_owned(),
                include: filter.include().join(","),
                exclude: filter.exclude().join(","),
            });
        }
        progress.bytes_total.store(
            plan::total_size(&files).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        progress
            .files_total
            .store(files.len() as u32, Ordering::Relaxed);
        tracing::info!(
            files = files.len(),
            bytes = progress.view().bytes_total,
            "fetching"
        );
        // Garbage collection keeps these blobs until the snapshot links them.
        let _wanted = self.wanted.hold(files.iter().map(|f| f.hash.clone()));
        let share = self.connections.share();
        let src = Source {
            kind,
            repo,
            commit,
            token,
            share: &share,
        };
        let no_room = |source| FetchError::NoRoom {
            repo: repo.to_string(),
            commit: commit.to_owned(),
            source,
        };
        self.make_room(&files).await.map_err(no_room)?;
        let mut retried = false;
        loop {
            let res = futures::stream::iter(files.clone())
                .map(|f| async move { self.fetch_blob(src, &f, progress).await })
                .buffer_unordered(self.tuning.files)
                .try_collect::<()>()
                .await;
            match res {
                Err(FetchError::Store(e)) if e.is_no_space() && !retried && self.room.is_some() => {
                    tracing::warn!(error = %e, "the disk filled up during the download; evicting and trying once more");
                    retried = true;
                    progress.bytes_done.store(0, Ordering::Relaxed);
                    progress.files_done.store(0, Ordering::Relaxed);
                    self.make_room(&files).await.map_err(no_room)?;
                }
                res => break res?,
            }
        }
        let links: Vec<SnapshotFile> = files
            .into_iter()
            .map(|f| SnapshotFile {
                path: f.path,
                hash: f.hash,
            })
            .collect();
        let store = self.store.clone();
        let (repo, commit) = (repo.clone(), commit.to_owned());
        let source = self.describe_source(listed_by, progress.view());
        let snap = tokio::task::spawn_blocking(move || {
            let snap = store.assemble_snapshot(kind, &repo, &commit, key.as_deref(), &links)?;
            store.record_snapshot(&snap, &source)?;
            Ok::<_, StoreError>(snap)
        })
        .await
        .expect("assemble task does not panic")?;
        Ok(snap)
    }

    /// Asks the room keeper for the bytes of `files` the store lacks.
    async fn make_room(&self, files: &[PlannedFile]) -> Result<(), NoRoom> {
        let Some(room) = self.room.clone() else {
            return Ok(());
        };
        // What a partial download already holds is not asked for again; `plan` checked that
        // the sizes add up within a u64.
        let missing = files
            .iter()
            .filter(|f| !self.store.has_blob(&f.hash))
            .map(|f| f.size.saturating_sub(self.store.partial_bytes(&f.hash)))
            .try_fold(0u64, u64::checked_add)
            .unwrap_or(u64::MAX);
        if missing == 0 {
            return Ok(());
        }
        tokio::task::spawn_blocking(move || room.make_room(missing))
            .await
            .expect("make_room does not panic")
    }

    /// What a snapshot was made from, for its record: the tiers that gave bytes (with the bytes
    /// each gave when both did), or the one that listed it when the store had every blob.
    fn describe_source(&self, listed_by: Tier, v: ProgressView) -> String {
        let shared = || match self.sources.shared() {
            Some(s) => format!("shared cache {}", s.root().display()),
            None => "shared cache".to_owned(),
        };
        let hub = || format!("hub {}", self.hub.endpoint());
        match (v.bytes_imported > 0, v.bytes_downloaded > 0) {
            (true, true) => format!(
                "{} ({} bytes) + {} ({} bytes)",
                shared(),
                v.bytes_imported,
                hub(),
                v.bytes_downloaded
            ),
            (true, false) => shared(),
            (false, true) => hub(),
            (false, false) if listed_by == Tier::Pvc => shared(),
            (false, false) => hub(),
        }
    }

    /// Makes the blob `file.hash` present, taking it from the first tier that has it.
    async fn fetch_blob(
        &self,
        src: Source<'_>,
        file: &PlannedFile,
        progress: &Arc<Progress>,
    ) -> Result<(), FetchError> {
        // One fetch per blob: a second fetch of the same blob waits here, then finds it.
        let _flight = self.inflight.lock(&file.hash).await;
        if self.store.has_blob(&file.hash) {
            progress.bytes_done.fetch_add(file.size, Ordering::Relaxed);
            progress.files_done.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let order = self.sources.order();
        let mut misses = Vec::new();
        for (i, tier) in order.iter().enumerate() {
            let last = i + 1 == order.len();
            let miss = match tier {
                Tier::Pvc => match self.import_blob(src, file, progress).await? {
                    Ok(()) => None,
                    Err(reason) => Some(format!("shared cache: {reason}")),
                },
                Tier::Hub => match self.download_blob(src, file, progress).await {
                    Ok(()) => None,
                    Err(e) if last => return Err(e),
                    Err(e) => Some(format!("hub: {e}")),
                },
            };
            let Some(miss) = miss else {
                progress.files_done.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            };
            if !last {
                tracing::info!(file = %file.path, "{miss}; trying {}", order[i + 1]);
            }
            misses.push(miss);
        }
        Err(FetchError::Unavailable {
            path: file.path.to_string(),
            reason: misses.join("; "),
        })
    }

    /// Imports `file` from the shared cache, verified: the blob by its hash (any commit's), or
    /// the commit's snapshot entry. `Ok(Err(reason))` when the cache cannot give it (absent,
    /// refused, or wrong bytes), so the next tier is tried; `Err` when the store fails.
    async fn import_blob(
        &self,
        src: Source<'_>,
        file: &PlannedFile,
        progress: &Arc<Progress>,
    ) -> Result<Result<(), String>, FetchError> {
        let shared = self
            .sources
            .shared()
            .expect("pvc is a tier only with a shared cache")
            .clone();
        let (store, progress, file) = (self.store.clone(), progress.clone(), file.clone());
        let (kind, repo, commit) = (src.kind, src.repo.clone(), src.commit.to_owned());
        tokio::task::spawn_blocking(move || {
            let opened = match shared.open_blob(kind, &repo, &file.hash) {
                Ok(None) => shared.open_snapshot_file(kind, &repo, &commit, &file.path),
                found => found,
            };
            let source = match opened {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(Err("not there".to_owned())),
                Err(e) => {
                    tracing::warn!(file = %file.path, error = %e, "refused a file of the shared cache");
                    return Ok(Err(e.to_string()));
                }
            };
            let counted = AtomicU64::new(0);
            let added = |n| {
                progress.bytes_done.fetch_add(n, Ordering::Relaxed);
                counted.fetch_add(n, Ordering::Relaxed);
            };
            let res = import::import(&store, &source, &file, &added);
            if res.is_err() {
                progress
                    .bytes_done
                    .fetch_sub(counted.load(Ordering::Relaxed), Ordering::Relaxed);
            }
            match res {
                Ok(()) => {
                    progress
                        .bytes_imported
                        .fetch_add(file.size, Ordering::Relaxed);
                    tracing::debug!(file = %file.path, bytes = file.size, "imported from the shared cache");
                    Ok(Ok(()))
                }
                Err(import::ImportError::Store(e)) => Err(e.into()),
                Err(e) => {
                    tracing::warn!(file = %file.path, error = %e, "the shared cache's copy is not the file wanted");
                    Ok(Err(format!("its copy {e}")))
                }
            }
        })
        .await
        .expect("import task does not panic")
    }

    /// Downloads `file` from the hub. A broken connection or a transient hub error is retried
    /// with backoff (a ranged download keeps what it wrote); a mismatch is tried once more,
    /// then fails.
    async fn download_blob(
        &self,
        src: Source<'_>,
        file: &PlannedFile,
        progress: &Progress,
    ) -> Result<(), FetchError> {
        let mut backoff = retry_policy().build();
        let mut mismatches = 0;
        loop {
            let counted = AtomicU64::new(0);
            let res = self
                .download(src.file(file), src.share, file, progress, &counted)
                .await;
            progress
                .bytes_done
                .fetch_sub(counted.load(Ordering::Relaxed), Ordering::Relaxed);
            let e = match res {
                Ok(()) => {
                    progress.bytes_done.fetch_add(file.size, Ordering::Relaxed);
                    progress
                        .bytes_downloaded
                        .fetch_add(file.size, Ordering::Relaxed);
                    return Ok(());
                }
                Err(e) => e,
            };
            let wait = match &e {
                FetchError::Integrity { .. } => {
                    mismatches += 1;
                    (mismatches < 2).then_some(Duration::ZERO)
                }
                FetchError::Interrupted { .. } => backoff.next(),
                FetchError::Hub(h) if h.is_transient() => backoff.next(),
                _ => None,
            };
            let Some(wait) = wait else {
                return Err(e);
            };
            tracing::warn!(file = %file.path, error = %e, retry_in = ?wait, "download failed; retrying");
            tokio::time::sleep(wait).await;
        }
    }

    /// One attempt at a blob; `counted` holds the bytes it added to `progress`.
    async fn download(
        &self,
        src: FileSource<'_>,
        share: &budget::Share,
        file: &PlannedFile,
        progress: &Progress,
        counted: &AtomicU64,
    ) -> Result<(), FetchError> {
        if file.size > self.tuning.chunk_size {
            let job = ranged::Job {
                hub: &self.hub,
                store: &self.store,
                connections: share,
                chunk_size: self.tuning.chunk_size,
                parallel: self.tuning.connections,
                src,
                file,
                progress,
                counted,
            };
            match job.run().await? {
                ranged::Outcome::Done => return Ok(()),
                ranged::Outcome::NoRanges => {
                    tracing::info!(file = %file.path, "the hub does not serve byte ranges; downloading in one stream");
                }
            }
        }
        self.download_stream(src, share, file, progress, counted)
            .await
    }

    /// Downloads a file in one request into staging, hashing as the bytes arrive.
    async fn download_stream(
        &self,
        src: FileSource<'_>,
        share: &budget::Share,
        file: &PlannedFile,
        progress: &Progress,
        counted: &AtomicU64,
    ) -> Result<(), FetchError> {
        let _permit = share.acquire().await;
        let resp = self.hub.download(&src, None, None).await?;
        let tmp = self.store.staging_file()?;
        let std_file = tmp
            .reopen()
            .map_err(|e| FetchError::Store(StoreError::from_io("reopen", tmp.path(), e)))?;
        let mut out =
            tokio::io::BufWriter::with_capacity(256 << 10, tokio::fs::File::from_std(std_file));
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
            counted.fetch_add(chunk.len() as u64, Ordering::Relaxed);
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
