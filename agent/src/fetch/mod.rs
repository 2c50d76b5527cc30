//! Filling the store: revision → commit, the file plan ([`plan`]), verified downloads from the
//! hub or imports from a shared cache ([`sources`], [`import`]), and the snapshot.
//!
//! Files up to [`Tuning::chunk_size`] stream in one request and are hashed as they arrive. Larger
//! ones are fetched in parallel byte ranges into a resumable partial file ([`ranged`]), hashed in
//! order as the written prefix grows, so the hash is ready when the last byte lands. Either way
//! the hash and size are checked against the hub's tree before the blob becomes visible, and one
//! download per blob runs on a node however many volumes ask for it ([`BlobLocks`]).

mod blob;
mod budget;
mod error;
mod freshness;
mod growing;
mod import;
mod inflight;
mod plan;
mod ranged;
mod resolve;
mod sources;
mod wanted;
mod watchdog;

pub use error::{FetchError, Misses, NoRoom, TierMiss};
pub use freshness::{
    Answers, DEFAULT_ACCESS_TTL, DEFAULT_REVISION_TTL, HubCounters, REFUSAL_TTL, Ttls,
};
pub use growing::{Avail, Grower, Growing, GrowingBlob};
pub use import::ImportError;
pub use plan::{PlannedFile, plan};
pub use resolve::{Freshness, Resolution};
pub use sources::{BadSources, Sources, Tier};
pub use wanted::{Wanted, WantedGuard};
pub use watchdog::STALL_BYTES;

/// Makes room in the store for bytes about to be written (the evictor does, see
/// `crate::evict`).
pub trait Room: Send + Sync + std::fmt::Debug {
    /// Frees space so that `bytes` more fit, or says why they cannot. Blocking.
    fn make_room(&self, bytes: u64) -> Result<(), NoRoom>;
}

use crate::store::{Snapshot, SnapshotFile, SnapshotKey, Store, StoreError};
use futures::{StreamExt, TryStreamExt};
use inflight::BlobLocks;
use modelcache_core::filter::FileFilter;
use modelcache_core::repo::{Commit, RepoId, RepoKind};
use modelcache_hub::client::{FileSource, Liveness};
use modelcache_hub::{HubClient, client::Token};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// The most files of a first wave a fetch follows from peers at once, beyond `--parallel-files`.
const MAX_FOLLOWED: usize = 32;

/// Counters a fetch updates as it goes; readers poll them for progress.
#[derive(Debug, Default)]
pub struct Progress {
    bytes_done: AtomicU64,
    bytes_total: AtomicU64,
    bytes_downloaded: AtomicU64,
    bytes_imported: AtomicU64,
    bytes_from_peers: AtomicU64,
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
    /// Bytes of files fetched from peers, once verified.
    pub bytes_from_peers: u64,
    /// Files present so far.
    pub files_done: u32,
    /// Files in the snapshot.
    pub files_total: u32,
}

impl Progress {
    /// Counts `n` bytes present (while a file arrives).
    pub(crate) fn add_done(&self, n: u64) {
        self.bytes_done.fetch_add(n, Ordering::Relaxed);
    }

    /// Takes back `n` bytes counted by [`Progress::add_done`].
    pub(crate) fn sub_done(&self, n: u64) {
        self.bytes_done.fetch_sub(n, Ordering::Relaxed);
    }

    /// Records a verified file of `bytes` from a peer.
    pub(crate) fn record_peer_bytes(&self, bytes: u64) {
        self.bytes_done.fetch_add(bytes, Ordering::Relaxed);
        self.bytes_from_peers.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Reads the counters.
    pub fn view(&self) -> ProgressView {
        ProgressView {
            bytes_done: self.bytes_done.load(Ordering::Relaxed),
            bytes_total: self.bytes_total.load(Ordering::Relaxed),
            bytes_downloaded: self.bytes_downloaded.load(Ordering::Relaxed),
            bytes_imported: self.bytes_imported.load(Ordering::Relaxed),
            bytes_from_peers: self.bytes_from_peers.load(Ordering::Relaxed),
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
    commit: &'a Commit,
    token: Option<&'a Token>,
    /// This fetch's share of the connections.
    share: &'a budget::Share,
    /// Who gets which blob, with the peers that fetch the same files now.
    wave: &'a crate::peers::client::Wave,
}

impl<'a> Source<'a> {
    fn file(self, f: &'a PlannedFile, liveness: &'a Liveness) -> FileSource<'a> {
        FileSource {
            kind: self.kind,
            repo: self.repo,
            commit: self.commit,
            path: &f.path,
            token: self.token,
            liveness: Some(liveness),
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
    /// A file's download fails once less than [`STALL_BYTES`] of it arrived in this long
    /// while it held a connection, whatever the retries under way.
    pub stall: Duration,
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
            stall: Duration::from_secs(60),
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
    answers: Arc<Answers>,
    inflight: Arc<BlobLocks>,
    sources: Sources,
    wanted: Wanted,
    growing: Growing,
    room: Option<Arc<dyn Room>>,
}

impl Fetcher {
    /// A fetcher that spreads downloads as `tuning` says.
    pub fn new(hub: HubClient, store: Arc<Store>, tuning: Tuning) -> Self {
        let tuning = Tuning {
            files: tuning.files.max(1),
            connections: tuning.connections.max(1),
            chunk_size: tuning.chunk_size.max(1 << 20),
            stall: tuning.stall.max(Duration::from_millis(100)),
        };
        Fetcher {
            hub,
            store,
            tuning,
            connections: budget::Budget::new(tuning.connections),
            answers: Arc::new(Answers::new(Ttls::default())),
            inflight: Arc::default(),
            sources: Sources::default(),
            wanted: Wanted::default(),
            growing: Growing::default(),
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

    /// The blobs downloading now, readable as they grow (for the peer server).
    pub fn growing(&self) -> &Growing {
        &self.growing
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

    /// Trusts the hub's answers on revisions and access for `ttls` (see [`freshness`]).
    pub fn with_ttls(mut self, ttls: Ttls) -> Self {
        self.answers = Arc::new(Answers::new(ttls));
        self
    }

    /// Hub requests made and stale answers served, for the metrics.
    pub fn hub_counters(&self) -> &HubCounters {
        &self.answers.counters
    }

    /// The store filled.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Makes the snapshot of `repo` at `commit`, holding the files `filter` takes, complete in
    /// the store, downloading what is missing; `progress` is updated as files arrive.
    pub async fn fetch(
        &self,
        kind: RepoKind,
        repo: &RepoId,
        commit: &Commit,
        filter: &FileFilter,
        token: Option<&Token>,
        progress: &Arc<Progress>,
    ) -> Result<Snapshot, FetchError> {
        let key = SnapshotKey {
            kind,
            repo: repo.clone(),
            commit: commit.clone(),
            filter: filter.key(),
        };
        if let Some(s) = self.store.snapshot(&key) {
            return Ok(s);
        }
        let (mut files, listed_by) = self.list_files(kind, repo, commit, token).await?;
        files.retain(|f| filter.admits(f.path.as_str()));
        if files.is_empty() && !filter.is_all() {
            return Err(FetchError::NothingMatches {
                repo: repo.to_string(),
                commit: commit.to_string(),
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
        let no_wave = Default::default();
        let src = Source {
            kind,
            repo,
            commit,
            token,
            share: &share,
            wave: &no_wave,
        };
        let no_room = |source| FetchError::NoRoom {
            repo: repo.to_string(),
            commit: commit.to_string(),
            source,
        };
        self.make_room(&files).await.map_err(no_room)?;
        let wave = match self.sources.peers() {
            Some(peers) => {
                let missing: Vec<_> = files
                    .iter()
                    .filter(|f| !self.store.has_blob(&f.hash))
                    .map(|f| f.hash.clone())
                    .collect();
                peers.plan_wave(&missing).await
            }
            None => Default::default(),
        };
        let src = Source { wave: &wave, ..src };
        // In a first wave: this node's share first, so that the hub is asked for every share at
        // once; and a place for each file taken from a peer as it downloads, beside the files
        // fetched (following is waiting, mostly, and holding a place would leave the last files
        // to be taken when the wave's downloads end).
        files.sort_by_key(|f| wave.owner(&f.hash) != Some(&crate::peers::client::Owner::Me));
        let parallel = self.tuning.files + wave.followed().min(MAX_FOLLOWED);
        let mut retried = false;
        loop {
            let res = futures::stream::iter(files.clone())
                .map(|f| async move { self.fetch_blob(src, &f, progress).await })
                .buffer_unordered(parallel)
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
        let source = self.describe_source(listed_by, progress.view());
        let snap = tokio::task::spawn_blocking(move || {
            let snap = store.assemble_snapshot(&key, &links)?;
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
        if v.bytes_from_peers > 0 {
            // Where each tier's bytes came from, peers among them.
            let mut parts = vec![format!("peers ({} bytes)", v.bytes_from_peers)];
            if v.bytes_imported > 0 {
                parts.push(format!("{} ({} bytes)", shared(), v.bytes_imported));
            }
            if v.bytes_downloaded > 0 {
                parts.push(format!("{} ({} bytes)", hub(), v.bytes_downloaded));
            }
            return parts.join(" + ");
        }
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
            (false, false) if listed_by == Tier::SharedCache => shared(),
            (false, false) => hub(),
        }
    }
}
