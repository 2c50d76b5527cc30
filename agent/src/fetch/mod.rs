//! Filling the store from a hub: revision → commit, the file plan ([`plan`]), verified
//! downloads, and the snapshot.
//!
//! Files up to [`Tuning::chunk_size`] stream in one request and are hashed as they arrive. Larger
//! ones are fetched in parallel byte ranges into a resumable partial file ([`ranged`]), hashed in
//! order as the written prefix grows, so the hash is ready when the last byte lands. Either way
//! the hash and size are checked against the hub's tree before the blob becomes visible, and one
//! download per blob runs on a node however many volumes ask for it ([`InFlight`]).

mod inflight;
mod plan;
mod ranged;

pub use plan::{PlannedFile, plan};

use crate::access::AccessCache;
use crate::filter::FileFilter;
use crate::hash::Hasher;
use crate::hub::client::{FileSource, retry_policy};
use crate::hub::{HubClient, HubError, client::Token};
use crate::repo::{ModelRef, RepoId, RepoKind};
use crate::store::{Snapshot, SnapshotFile, Store, StoreError};
use backon::BackoffBuilder;
use futures::{StreamExt, TryStreamExt};
use inflight::InFlight;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;

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

/// The repo at a commit that files are fetched from.
#[derive(Clone, Copy)]
struct Source<'a> {
    kind: RepoKind,
    repo: &'a RepoId,
    commit: &'a str,
    token: Option<&'a Token>,
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
    connections: Arc<Semaphore>,
    access: Arc<AccessCache>,
    inflight: Arc<InFlight>,
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
            connections: Arc::new(Semaphore::new(tuning.connections)),
            access: Arc::new(AccessCache::new(DEFAULT_ACCESS_TTL)),
            inflight: Arc::default(),
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
            .buffer_unordered(self.tuning.files)
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
        let source = format!("hub {}", self.hub.endpoint());
        let snap = tokio::task::spawn_blocking(move || {
            let snap = store.assemble_snapshot(kind, &repo, &commit, key.as_deref(), &links)?;
            store.record_snapshot(&snap, &source)?;
            Ok::<_, StoreError>(snap)
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
        // One download per blob: a second fetch of the same blob waits here, then finds it.
        let _flight = self.inflight.lock(&file.hash).await;
        if self.store.has_blob(&file.hash) {
            progress.bytes_done.fetch_add(file.size, Ordering::Relaxed);
        } else {
            // A broken connection or a transient hub error is retried with backoff (a ranged
            // download keeps what it wrote); a mismatch is tried once more, then fails.
            let mut backoff = retry_policy().build();
            let mut mismatches = 0;
            loop {
                let counted = AtomicU64::new(0);
                let res = self
                    .download(src.file(file), file, progress, &counted)
                    .await;
                progress
                    .bytes_done
                    .fetch_sub(counted.load(Ordering::Relaxed), Ordering::Relaxed);
                let e = match res {
                    Ok(()) => {
                        progress.bytes_done.fetch_add(file.size, Ordering::Relaxed);
                        break;
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
        progress.files_done.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// One attempt at a blob; `counted` holds the bytes it added to `progress`.
    async fn download(
        &self,
        src: FileSource<'_>,
        file: &PlannedFile,
        progress: &Progress,
        counted: &AtomicU64,
    ) -> Result<(), FetchError> {
        if file.size > self.tuning.chunk_size {
            let job = ranged::Job {
                hub: &self.hub,
                store: &self.store,
                connections: &self.connections,
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
        self.download_stream(src, file, progress, counted).await
    }

    /// Downloads a file in one request into staging, hashing as the bytes arrive.
    async fn download_stream(
        &self,
        src: FileSource<'_>,
        file: &PlannedFile,
        progress: &Progress,
        counted: &AtomicU64,
    ) -> Result<(), FetchError> {
        let _permit = self
            .connections
            .acquire()
            .await
            .expect("the connection semaphore is never closed");
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
