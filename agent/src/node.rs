//! The node's core: what the CSI plugin (through [`crate::grpc`]), the cluster integration,
//! the admin commands and `pull` ask of the store, with no gRPC or Kubernetes types in it.
//!
//! `Ensure` is single-flight: however many volumes ask for the same repo at the same commit, one
//! fetch runs; every caller watches it and gets the snapshot, or progress when its wait runs out.
//! The fetch goes on after the caller gives up, so kubelet's retry finds it further along.
//!
//! ## What keeps a snapshot or a blob in the store
//!
//! Eviction, `rm`, `verify` and garbage collection remove nothing that one of these holds:
//!
//! | mechanism | holds | from | until | where |
//! |---|---|---|---|---|
//! | pin | a snapshot | Pin (a volume is published) | Unpin, or reconcile finds no mount | `store::pins` (checked under the pins lock) |
//! | lease | a snapshot | Ensure answers Ready | the Pin that follows, or [`crate::evict::LEASE`] | `evict` |
//! | wanted | the blobs of a running fetch | the fetch plans its files | the snapshot links them (the fetch ends) | `fetch::wanted` |
//! | flight | one Ensure's fetch of a repo at a commit | the first Ensure | the fetch ends; later Ensures join it | `Flight` here |
//! | blob lock | one blob's download | a fetch starts the blob | the blob is in `blobs/` | `fetch::inflight` |
//! | in-use partial | a partial download's file | the download opens it | it is committed or discarded | `store::partial` |
//!
//! A pin and a lease keep snapshots from eviction (`rm` honours pins and refuses); wanted
//! blobs survive garbage collection beside a fetch; flights and blob locks make one download of
//! each thing however many ask; in-use partials are never reclaimed as abandoned.
//!
//! The API also keeps the store in shape ([`Node::maintain`]): the evictor (`crate::evict`)
//! watches disk usage, and pins are reconciled with the mount table at start and every
//! [`RECONCILE_INTERVAL`].

use crate::admin::{self, AdminError, RemoveReport, VerifyReport};
use crate::caches::{CacheError, CacheLimits, CachePin, Caches, Mke2fs};
use crate::events::{PodEvents, PodRef};
use crate::evict::{Evictor, Statvfs, Watermarks};
use crate::fetch::{FetchError, Fetcher, Freshness, Progress, Resolution};
use crate::metrics::{CacheResult, Metrics};
use crate::mounts::MountTable;
use crate::prewarm::Catalogue;
use crate::store::{PinRecord, Pins, Reconciled, Snapshot, SnapshotKey, Store, StoreError, unix};
use modelcache_core::cache::CacheKey;
use modelcache_core::error::Class;
use modelcache_core::filter::FileFilter;
use modelcache_core::repo::{Commit, InvalidInput, ModelRef, RepoId, RepoKind};
use modelcache_hub::client::Token;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Why a call on the node failed. Mapped to a gRPC status in one place, in [`crate::grpc`].
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A request field is missing or malformed.
    #[error("{0}")]
    Invalid(#[from] InvalidInput),
    /// A required field is absent.
    #[error("field {0:?} is required")]
    Missing(&'static str),
    /// Pin names a snapshot that is not in the store.
    #[error("{0} is not in the store; call Ensure first")]
    NotPresent(String),
    /// The fetch failed.
    #[error(transparent)]
    Fetch(Arc<FetchError>),
    /// The store failed outside a fetch.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The agent is stopping.
    #[error("the agent is shutting down; retry")]
    ShuttingDown,
    /// `rm` or `verify` failed or refused.
    #[error(transparent)]
    Admin(#[from] AdminError),
    /// A cache volume could not be made or pinned.
    #[error(transparent)]
    Cache(#[from] CacheError),
}

impl From<FetchError> for NodeError {
    fn from(e: FetchError) -> Self {
        NodeError::Fetch(Arc::new(e))
    }
}

impl NodeError {
    /// What kind of failure this is; each layer's error says its own.
    pub fn class(&self) -> Class {
        match self {
            NodeError::Invalid(_) | NodeError::Missing(_) => Class::Invalid,
            NodeError::NotPresent(_) => Class::Precondition,
            NodeError::ShuttingDown => Class::Unavailable,
            NodeError::Store(s) => s.class(),
            NodeError::Fetch(f) => f.class(),
            NodeError::Admin(a) => a.class(),
            NodeError::Cache(c) => c.class(),
        }
    }
}

type FlightResult = Option<Result<Snapshot, Arc<FetchError>>>;

struct Flight {
    progress: Arc<Progress>,
    done: watch::Receiver<FlightResult>,
}

type FlightKey = (RepoKind, RepoId, Commit, FileFilter);

/// The answer of [`Node::ensure`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ensured {
    /// Complete in the store.
    Ready(Snapshot),
    /// Still downloading.
    Fetching {
        /// The commit being fetched.
        commit: Commit,
        /// Progress so far.
        progress: crate::fetch::ProgressView,
    },
}

/// What a volume asks Ensure for.
#[derive(Debug, Clone)]
pub struct VolumeAsk {
    /// The repo and revision.
    pub model: ModelRef,
    /// The files.
    pub filter: FileFilter,
    /// How the mount shows them.
    pub layout: modelcache_core::Layout,
    /// The volume's own hub token, if it brings one.
    pub token: Option<Token>,
    /// How long to wait for a download before answering with progress.
    pub wait: Duration,
    /// The pod that asked, for events.
    pub pod: Option<PodRef>,
}

/// The answer to a [`VolumeAsk`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The directory to mount.
    Ready {
        /// The snapshot, or its view in the layout asked for.
        path: std::path::PathBuf,
        /// The commit.
        commit: Commit,
        /// Bytes its files show.
        bytes: u64,
        /// Its files.
        files: u32,
    },
    /// Still downloading.
    Fetching {
        /// The commit being fetched.
        commit: Commit,
        /// Progress so far.
        progress: crate::fetch::ProgressView,
    },
}

/// A volume's pin, and the store directories a mount of it may show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinView {
    /// Model or dataset.
    pub kind: RepoKind,
    /// `org/name`, as recorded.
    pub repo: String,
    /// The commit pinned.
    pub commit: String,
    /// The filter key of the snapshot, if it has one.
    pub filter: Option<String>,
    /// The snapshot's directory and its views (empty when the snapshot is gone); for a cache,
    /// the directory its image is mounted on.
    pub paths: Vec<std::path::PathBuf>,
    /// For a cache volume's pin: the cache and its image.
    pub cache: Option<(CacheKey, std::path::PathBuf)>,
}

/// A snapshot, its size and the volumes that pin it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The snapshot.
    pub snapshot: Snapshot,
    /// Bytes its files show.
    pub bytes: u64,
    /// Its files.
    pub files: u32,
    /// Volumes that pin it.
    pub pinned_by: Vec<String>,
}

/// Room made when the disk is too full to record a pin: pins.json and a snapshot record.
const PIN_ROOM: u64 = 1 << 20;

/// How often pins are checked against the mount table.
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(60);

/// The agent API over a store.
pub struct Node {
    fetcher: Fetcher,
    pins: Arc<Mutex<Pins>>,
    evictor: Arc<Evictor>,
    mounts: Arc<dyn MountTable>,
    /// Wakes the evictor when a download finishes.
    wake: Arc<Notify>,
    caches: Arc<Caches>,
    metrics: Arc<Metrics>,
    events: PodEvents,
    flights: Arc<Mutex<HashMap<FlightKey, Arc<Flight>>>>,
    shutdown: CancellationToken,
    /// The agent's own token: for pre-warming, and for volumes only when lent.
    agent_token: Option<Token>,
    lend_token: bool,
}

impl Node {
    /// Serves `fetcher`'s store, keeping its usage under `marks`; fetches stop when `shutdown`
    /// fires. Pins are reconciled with `mounts` before anything else.
    pub fn new(
        fetcher: Fetcher,
        marks: Watermarks,
        mounts: Arc<dyn MountTable>,
        shutdown: CancellationToken,
    ) -> Result<Self, NodeError> {
        let store = fetcher.store().clone();
        let pins: Arc<Mutex<Pins>> = Arc::new(Mutex::new(
            Pins::load(store.root()).map_err(|e| StoreError::from_io("load", store.root(), e))?,
        ));
        let caches = Arc::new(Caches::open(
            store.root(),
            CacheLimits::default(),
            Box::new(Mke2fs),
        )?);
        let evictor = Arc::new(
            Evictor::new(
                store.clone(),
                pins.clone(),
                fetcher.wanted().clone(),
                marks,
                Box::new(Statvfs),
            )
            .with_caches(caches.clone()),
        );
        let metrics = Arc::new(Metrics::new(
            store.clone(),
            pins.clone(),
            evictor.clone(),
            caches.clone(),
            fetcher.hub_counters(),
        ));
        let api = Node {
            fetcher: fetcher.with_room(evictor.clone()),
            pins,
            evictor,
            mounts,
            wake: Arc::default(),
            caches,
            metrics,
            events: PodEvents::disabled(),
            flights: Arc::default(),
            shutdown,
            agent_token: None,
            lend_token: false,
        };
        api.reconcile_pins()?;
        Ok(api)
    }

    /// Holds new caches to `limits`.
    pub fn with_cache_limits(self, limits: CacheLimits) -> Self {
        self.caches.set_limits(limits);
        self
    }

    /// The agent's own token, used to pre-warm; `lend` also gives it to volumes that bring none
    /// (off by default: a volume's access is decided by its own token alone).
    pub fn with_agent_token(mut self, token: Option<Token>, lend: bool) -> Self {
        self.agent_token = token;
        self.lend_token = lend;
        self
    }

    /// The token a volume reads with: its own, or the agent's when lent.
    fn volume_token(&self, own: Option<Token>) -> Option<Token> {
        own.or_else(|| self.agent_token.clone().filter(|_| self.lend_token))
    }

    /// Reports fetches as events on the pods that asked.
    pub fn with_events(mut self, events: PodEvents) -> Self {
        self.events = events;
        self
    }

    /// Reports how an Ensure for `pod` went, as an event on it.
    fn report(
        &self,
        pod: &PodRef,
        model: &ModelRef,
        state: &Result<(Ensured, Freshness), NodeError>,
    ) {
        let name = model.repo.to_string();
        if let Ok((ensured, Freshness::Outage { resolved, error })) = state {
            let commit = match ensured {
                Ensured::Ready(s) => &s.commit,
                Ensured::Fetching { commit, .. } => commit,
            };
            let revision = model.revision.as_str();
            self.events
                .served_stale(pod, &name, revision, commit, *resolved, error);
        }
        let state = state.as_ref().map(|(e, _)| e);
        match state {
            Ok(Ensured::Ready(s)) => {
                let meta = self.fetcher.store().peek_meta(s);
                self.events
                    .ready(pod, &name, &s.commit, meta.bytes, meta.files, &meta.source);
            }
            Ok(Ensured::Fetching { commit, progress }) => {
                self.events.fetching(pod, &name, commit, *progress);
            }
            Err(e) => self.events.failed(pod, &name, &e.to_string()),
        }
    }

    /// The store served.
    pub fn store(&self) -> &Arc<Store> {
        self.fetcher.store()
    }

    /// The evictor, for its counters.
    pub fn evictor(&self) -> &Arc<Evictor> {
        &self.evictor
    }

    /// The metrics, to serve.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Drops pins whose volume is no longer mounted, and pins mounted snapshots that have none
    /// (see [`Pins::reconcile`]).
    pub fn reconcile_pins(&self) -> Result<Reconciled, NodeError> {
        let store = self.fetcher.store();
        let mounted = self
            .mounts
            .mounts_of(store.root())
            .map_err(|e| StoreError::from_io("read the mount table for", store.root(), e))?;
        let now = unix(std::time::SystemTime::now());
        let done = self
            .pins
            .lock()
            .expect("pins lock")
            .reconcile(store, &mounted, now)?;
        for v in &done.dropped {
            tracing::info!(volume.id = %v, "dropped the pin of a volume no longer mounted");
        }
        for v in &done.recovered {
            tracing::warn!(volume.id = %v, "pinned a mounted snapshot that had no pin");
        }
        let points = self
            .mounts
            .mount_points()
            .map_err(|e| StoreError::from_io("read the mount table for", store.root(), e))?;
        for v in self.caches.reconcile(&points, now)? {
            tracing::info!(volume.id = %v, "dropped the cache pin of a volume no longer mounted");
        }
        Ok(done)
    }

    /// Runs until shutdown: the evictor's watch, and pin reconciliation every
    /// [`RECONCILE_INTERVAL`].
    pub async fn maintain(self: Arc<Self>) {
        let watch = self
            .evictor
            .clone()
            .watch(self.wake.clone(), self.shutdown.clone());
        let reconcile = async {
            let mut tick = tokio::time::interval(RECONCILE_INTERVAL);
            tick.tick().await; // The first tick is now; `new` just reconciled.
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = self.shutdown.cancelled() => return,
                }
                let me = self.clone();
                match tokio::task::spawn_blocking(move || me.reconcile_pins()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "pin reconciliation failed"),
                    Err(e) => tracing::error!(error = %e, "pin reconciliation panicked"),
                }
            }
        };
        tokio::join!(watch, reconcile);
    }

    /// Resolves the revision (without waiting for the hub when the node holds what it last
    /// resolved to, see [`Fetcher::resolve_for_volume`]), then waits up to `wait` for the
    /// snapshot, starting (or joining) its fetch.
    pub async fn ensure(
        &self,
        model: &ModelRef,
        filter: &FileFilter,
        token: Option<Token>,
        wait: Duration,
    ) -> Result<(Ensured, Freshness), NodeError> {
        let Resolution { commit, freshness } = self
            .fetcher
            .resolve_for_volume(model, filter, token.as_ref())
            .await
            .inspect_err(|e| self.metrics.hub_error(e))?;
        tracing::Span::current().record("model.commit", commit.as_str());
        let store = self.fetcher.store();
        let key = SnapshotKey {
            kind: model.kind,
            repo: model.repo.clone(),
            commit: commit.clone(),
            filter: filter.key(),
        };
        if let Some(s) = store.snapshot(&key) {
            // Kept from eviction until the publish that asked pins it. Leased first, then
            // looked at again: an eviction between the lookup and the lease is seen.
            self.evictor.lease(&s);
            if s.path.is_dir() {
                let hit = CacheResult { result: "hit" };
                self.metrics.publishes.get_or_create(&hit).inc();
                return Ok((Ensured::Ready(s), freshness));
            }
        }
        let flight = self.join_or_start(model, filter, &commit, token)?;
        let mut done = flight.done.clone();
        let finished = tokio::time::timeout(wait, done.wait_for(Option::is_some)).await;
        let ensured = match finished {
            Ok(Ok(result)) => match result.clone().expect("waited for Some") {
                Ok(s) => {
                    self.evictor.lease(&s);
                    Ensured::Ready(s)
                }
                Err(e) => return Err(NodeError::Fetch(e)),
            },
            // The fetch task went away without an answer: only on shutdown.
            Ok(Err(_)) => return Err(NodeError::ShuttingDown),
            Err(_elapsed) => Ensured::Fetching {
                commit,
                progress: flight.progress.view(),
            },
        };
        Ok((ensured, freshness))
    }

    fn join_or_start(
        &self,
        model: &ModelRef,
        filter: &FileFilter,
        commit: &Commit,
        token: Option<Token>,
    ) -> Result<Arc<Flight>, NodeError> {
        if self.shutdown.is_cancelled() {
            return Err(NodeError::ShuttingDown);
        }
        let key: FlightKey = (
            model.kind,
            model.repo.clone(),
            commit.clone(),
            filter.clone(),
        );
        let mut flights = self.flights.lock().expect("flights lock");
        if let Some(f) = flights.get(&key) {
            let join = CacheResult { result: "join" };
            self.metrics.publishes.get_or_create(&join).inc();
            return Ok(f.clone());
        }
        let progress = Arc::new(Progress::default());
        let (tx, rx) = watch::channel(None);
        let flight = Arc::new(Flight {
            progress: progress.clone(),
            done: rx,
        });
        flights.insert(key.clone(), flight.clone());
        drop(flights);

        let fetcher = self.fetcher.clone();
        let shutdown = self.shutdown.clone();
        let span = tracing::info_span!(
            "fetch",
            model.repo = %model.repo,
            model.commit = %commit,
            model.kind = model.kind.singular()
        );
        let flights = self.flights.clone();
        let (evictor, wake) = (self.evictor.clone(), self.wake.clone());
        let metrics = self.metrics.clone();
        let miss = CacheResult { result: "miss" };
        metrics.publishes.get_or_create(&miss).inc();
        tokio::spawn(
            async move {
                let (kind, repo, commit, filter) = &key;
                let started = Instant::now();
                let result = tokio::select! {
                    r = fetcher.fetch(*kind, repo, commit, filter, token.as_ref(), &progress) => r,
                    () = shutdown.cancelled() => {
                        tracing::info!("fetch stopped by shutdown");
                        return;
                    }
                };
                let seconds = started.elapsed().as_secs_f64();
                match &result {
                    Ok(s) => {
                        // Kept from eviction until a caller sees it ready and leases it anew.
                        evictor.lease(s);
                        metrics.fetched(seconds, progress.view());
                        tracing::info!(
                            seconds,
                            bytes = progress.view().bytes_total,
                            path = %s.path.display(),
                            "snapshot ready"
                        );
                    }
                    Err(e) => {
                        metrics.fetch_failed(e);
                        tracing::warn!(error = %e, "fetch failed");
                    }
                }
                // Forget the flight before publishing the answer, so a caller that sees a
                // failure and retries starts a new fetch.
                flights.lock().expect("flights lock").remove(&key);
                let _ = tx.send(Some(result.map_err(Arc::new)));
                wake.notify_one();
            }
            .instrument(span),
        );
        Ok(flight)
    }
}

/// How often pre-warm entries are checked on.
pub const PREWARM_INTERVAL: Duration = Duration::from_secs(5);

impl Node {
    /// Holds what the pre-warm catalogue asks of this node, as `sets` says (see
    /// [`crate::prewarm::wanted_sets`]): each wanted entry is fetched and its snapshot marked
    /// pre-warmed (evicted last); an entry no longer wanted, or whose revision moved on, leaves
    /// an ordinary snapshot, evictable like any other. Checked on each new set and every
    /// [`PREWARM_INTERVAL`], until shutdown.
    pub async fn prewarm(
        self: Arc<Self>,
        sets: impl futures::Stream<Item = (Catalogue, BTreeSet<String>)>,
    ) {
        use futures::StreamExt;
        let mut sets = std::pin::pin!(sets);
        let mut current: Option<(Catalogue, BTreeSet<String>)> = None;
        let mut held: BTreeMap<String, Snapshot> = BTreeMap::new();
        let mut errors: BTreeMap<String, String> = BTreeMap::new();
        let mut tick = tokio::time::interval(PREWARM_INTERVAL);
        loop {
            tokio::select! {
                set = sets.next() => match set {
                    Some(set) => current = Some(set),
                    None => return,
                },
                _ = tick.tick() => {}
                () = self.shutdown.cancelled() => return,
            }
            let Some((catalogue, wanted)) = &current else {
                continue;
            };
            let store = self.fetcher.store();
            held.retain(|name, _| wanted.contains(name));
            for name in wanted {
                let Some(entry) = catalogue.get(name) else {
                    continue;
                };
                let span =
                    tracing::info_span!("prewarm", entry = %name, model.repo = %entry.model.repo);
                let ensured = self
                    .ensure(
                        &entry.model,
                        &entry.filter,
                        self.agent_token.clone(),
                        Duration::ZERO,
                    )
                    .instrument(span)
                    .await;
                let snap = match ensured {
                    Ok((Ensured::Ready(snap), _)) => snap,
                    Ok((Ensured::Fetching { .. }, _)) => continue,
                    Err(e) => {
                        let msg = e.to_string();
                        if errors.get(name) != Some(&msg) {
                            tracing::warn!(entry = %name, error = %msg, "cannot pre-warm");
                            errors.insert(name.clone(), msg);
                        }
                        continue;
                    }
                };
                errors.remove(name);
                // Ready: the lease `ensure` took is not needed, the mark protects it.
                self.evictor.release(&snap);
                if held.insert(name.clone(), snap.clone()).as_ref() != Some(&snap) {
                    match store.set_prewarmed(&snap, true) {
                        Ok(()) => {
                            tracing::info!(entry = %name, model.repo = %snap.repo, model.commit = %snap.commit, "pre-warmed")
                        }
                        Err(e) => {
                            tracing::warn!(entry = %name, error = %e, "cannot mark a pre-warmed snapshot")
                        }
                    }
                }
            }
            // Every other mark goes: entries dropped, revisions moved on, marks from before a
            // restart that no entry claims now.
            let Ok(snapshots) = store.list_snapshots() else {
                continue;
            };
            for snap in snapshots {
                if store.peek_meta(&snap).prewarmed && !held.values().any(|h| *h == snap) {
                    tracing::info!(model.repo = %snap.repo, model.commit = %snap.commit, "no longer pre-warmed");
                    if let Err(e) = store.set_prewarmed(&snap, false) {
                        tracing::warn!(error = %e, "cannot unmark a pre-warmed snapshot");
                    }
                }
            }
        }
    }

    /// Pins the snapshot of `model` at `commit` for a volume. The snapshot is looked up under
    /// the pins lock, which eviction holds while it removes one, so a pin never lands on a
    /// snapshot being removed.
    pub fn pin(
        &self,
        volume_id: &str,
        model: &ModelRef,
        filter: &FileFilter,
        commit: &Commit,
        target_path: &str,
        pod: Option<&str>,
    ) -> Result<Snapshot, NodeError> {
        let store = self.fetcher.store();
        let mut pins = self.pins.lock().expect("pins lock");
        let key = SnapshotKey {
            kind: model.kind,
            repo: model.repo.clone(),
            commit: commit.clone(),
            filter: filter.key(),
        };
        let snap = store
            .snapshot(&key)
            .ok_or_else(|| NodeError::NotPresent(format!("{}@{commit}", model.repo)))?;
        let record = PinRecord {
            kind: snap.kind.singular().to_owned(),
            repo: snap.repo.to_string(),
            commit: snap.commit.to_string(),
            target_path: target_path.to_owned(),
            pod: pod.map(str::to_owned),
            filter: snap.filter.clone(),
            pinned_at: unix(std::time::SystemTime::now()),
        };
        let mut saved = pins.pin(volume_id, record.clone());
        if let Err(e) = &saved
            && e.is_no_space()
        {
            // A full disk must not fail a warm publish while unused models can go: evict (the
            // snapshot being pinned is leased), then record the pin again.
            drop(pins);
            tracing::warn!(error = %e, "disk full while recording a pin; evicting to make room");
            if let Err(no) = crate::fetch::Room::make_room(self.evictor.as_ref(), PIN_ROOM) {
                tracing::warn!(error = %no, "nothing to evict");
            }
            pins = self.pins.lock().expect("pins lock");
            saved = pins.pin(volume_id, record);
        }
        saved?;
        drop(pins);
        self.evictor.release(&snap);
        // The last-use time orders eviction; failing to record it must not fail the publish.
        if let Err(e) = store.touch(&snap) {
            tracing::warn!(error = %e, "cannot record the snapshot's last use");
        }
        Ok(snap)
    }

    /// Bytes and files of a snapshot, from its record (walked once, when it was made).
    fn usage(&self, snap: &Snapshot) -> (u64, u32) {
        let meta = self.fetcher.store().meta(snap);
        (meta.bytes, meta.files)
    }

    /// A volume's Ensure: [`Node::ensure`] with the volume's own token (or the agent's, when
    /// lent), reported as an event on the pod that asked, and a ready snapshot shown in the
    /// layout the volume asked for.
    pub async fn ensure_volume(&self, ask: VolumeAsk) -> Result<Answer, NodeError> {
        let span = tracing::info_span!(
            "ensure",
            model.repo = %ask.model.repo,
            model.revision = %ask.model.revision,
            model.commit = tracing::field::Empty
        );
        let state = self
            .ensure(
                &ask.model,
                &ask.filter,
                self.volume_token(ask.token),
                ask.wait,
            )
            .instrument(span)
            .await;
        if let Some(pod) = &ask.pod {
            self.report(pod, &ask.model, &state);
        }
        match state?.0 {
            Ensured::Ready(s) => {
                let store = self.fetcher.store().clone();
                let (snap, rev, layout) = (s.clone(), ask.model.revision.clone(), ask.layout);
                let path = tokio::task::spawn_blocking(move || store.view(&snap, layout, &rev))
                    .await
                    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
                let (bytes, files) = self.usage(&s);
                Ok(Answer::Ready {
                    path,
                    commit: s.commit,
                    bytes,
                    files,
                })
            }
            Ensured::Fetching { commit, progress } => Ok(Answer::Fetching { commit, progress }),
        }
    }

    /// Removes a volume's pin at `target_path`; unknown volumes are fine.
    pub fn unpin(&self, volume_id: &str, target_path: &str) -> Result<bool, NodeError> {
        if volume_id.is_empty() {
            return Err(NodeError::Missing("volume_id"));
        }
        let model = self
            .pins
            .lock()
            .expect("pins lock")
            .unpin(volume_id, target_path)?;
        let cache = self.caches.unpin(volume_id, target_path)?;
        if let Some(key) = &cache {
            tracing::info!(volume.id = %volume_id, cache = %key, "a volume left a cache");
            self.wake.notify_one();
        }
        Ok(model || cache.is_some())
    }

    /// Makes a cache present and pins it for a volume (see [`Caches::ensure`]).
    pub fn ensure_cache(
        &self,
        key: &CacheKey,
        max_size: Option<u64>,
        pin: CachePin,
        pod: Option<&PodRef>,
    ) -> Result<crate::caches::Ensured, NodeError> {
        if pin.volume_id.is_empty() {
            return Err(NodeError::Missing("volume_id"));
        }
        let ensured = self.caches.ensure(key, max_size, pin)?;
        if let Some(pod) = pod {
            self.events.cache_ready(pod, key, &ensured);
        }
        if ensured.created {
            // A new image takes disk as it fills: let the evictor look.
            self.wake.notify_one();
        }
        Ok(ensured)
    }

    /// The blobs downloading now, readable as they grow.
    pub fn growing(&self) -> &crate::fetch::Growing {
        self.fetcher.growing()
    }

    /// The blobs this node's running fetches want.
    pub fn wanted(&self) -> &crate::fetch::Wanted {
        self.fetcher.wanted()
    }

    /// The node's caches.
    pub fn caches(&self) -> &Arc<Caches> {
        &self.caches
    }

    /// A volume's pin at `target_path`, with the directories a mount of its snapshot shows.
    pub fn get_pin(&self, volume_id: &str, target_path: &str) -> Option<PinView> {
        let store = self.fetcher.store();
        let pins = self.pins.lock().expect("pins lock");
        let Some(pin) = pins.get(volume_id, target_path).cloned() else {
            drop(pins);
            let (key, image, mnt) = self.caches.pinned(volume_id, target_path)?;
            return Some(PinView {
                kind: RepoKind::Model,
                repo: String::new(),
                commit: String::new(),
                filter: None,
                paths: vec![mnt],
                cache: Some((key, image)),
            });
        };
        drop(pins);
        let kind = match pin.kind.as_str() {
            "dataset" => RepoKind::Dataset,
            _ => RepoKind::Model,
        };
        let key = RepoId::parse(&pin.repo)
            .ok()
            .zip(Commit::parse(&pin.commit).ok())
            .map(|(repo, commit)| SnapshotKey {
                kind,
                repo,
                commit,
                filter: pin.filter.clone(),
            });
        let paths = key
            .and_then(|key| store.snapshot(&key))
            .map(|s| store.shown_dirs(&s))
            .unwrap_or_default();
        Some(PinView {
            kind,
            repo: pin.repo,
            commit: pin.commit,
            filter: pin.filter,
            paths,
            cache: None,
        })
    }

    /// The pins lock, for tests that hold it as eviction does.
    #[cfg(test)]
    pub(crate) fn pins_lock(&self) -> &Mutex<Pins> {
        &self.pins
    }

    /// What `rm` and `verify` need, to run off the async workers.
    pub fn admin(&self) -> Admin {
        Admin {
            store: self.fetcher.store().clone(),
            pins: self.pins.clone(),
            wanted: self.fetcher.wanted().clone(),
        }
    }

    /// Every snapshot with its size and pins.
    pub fn list(&self) -> Result<Vec<Listed>, NodeError> {
        let store = self.fetcher.store();
        let pins = self.pins.lock().expect("pins lock");
        let mut out = Vec::new();
        for snapshot in store.list_snapshots()? {
            let (bytes, files) = self.usage(&snapshot);
            out.push(Listed {
                pinned_by: pins.volumes_of(&snapshot),
                snapshot,
                bytes,
                files,
            });
        }
        Ok(out)
    }
}

/// `pull`: the commit `model` names now, then its snapshot with the files `filter` takes,
/// fetched into the store with `progress` kept up to date. The same resolve and fetch an Ensure
/// runs, without a Node around them: a pull pins nothing and evicts nothing.
pub async fn pull(
    fetcher: &Fetcher,
    model: &ModelRef,
    filter: &FileFilter,
    token: Option<&Token>,
    progress: &Arc<Progress>,
) -> Result<Snapshot, NodeError> {
    let commit = fetcher.resolve(model, token).await?.commit;
    let span = tracing::info_span!("pull", model.repo = %model.repo, model.commit = %commit);
    let snap = fetcher
        .fetch(model.kind, &model.repo, &commit, filter, token, progress)
        .instrument(span.clone())
        .await?;
    let v = progress.view();
    span.in_scope(|| {
        tracing::info!(
            files = v.files_total,
            bytes = v.bytes_total,
            downloaded = v.bytes_downloaded,
            imported = v.bytes_imported,
            "verified"
        )
    });
    Ok(snap)
}

/// `rm` and `verify`: checked and done under the pins lock that Pin and eviction take, so no
/// volume pins a snapshot as it is removed, and sparing the blobs of downloads in flight. Inside
/// the agent ([`Node::admin`]), or, with no agent, over a store whose lock the command holds
/// ([`Admin::offline`]). Blocking: call it on the blocking pool.
pub struct Admin {
    store: Arc<Store>,
    pins: Arc<Mutex<Pins>>,
    wanted: crate::fetch::Wanted,
}

impl Admin {
    /// `rm` and `verify` with no agent running: `store` must be opened with its lock
    /// ([`Store::open`]), so no agent starts meanwhile; nothing is downloading.
    pub fn offline(store: Arc<Store>) -> Result<Admin, NodeError> {
        let pins =
            Pins::load(store.root()).map_err(|e| StoreError::from_io("load", store.root(), e))?;
        Ok(Admin {
            store,
            pins: Arc::new(Mutex::new(pins)),
            wanted: Default::default(),
        })
    }

    /// `rm`: see [`admin::remove`].
    pub fn remove(
        &self,
        kind: RepoKind,
        repo: &RepoId,
        commit: Option<&Commit>,
    ) -> Result<RemoveReport, NodeError> {
        let pins = self.pins.lock().expect("pins lock");
        Ok(admin::remove(
            &self.store,
            &pins,
            kind,
            repo,
            commit,
            |h| self.wanted.contains(h),
        )?)
    }

    /// `verify`: every blob hashed without the lock, then the corrupt ones dealt with under it.
    pub fn verify(&self, dry_run: bool) -> Result<VerifyReport, NodeError> {
        let scan = admin::scan(&self.store)?;
        let pins = self.pins.lock().expect("pins lock");
        Ok(admin::quarantine(&self.store, &pins, scan, dry_run)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread")]
    async fn publishes_that_join_a_running_fetch_are_counted() {
        use modelcache_hub::server;
        let dir = tempfile::tempdir().unwrap();
        let repo_dir = dir.path().join("hub/models/org/slow");
        std::fs::create_dir_all(&repo_dir).unwrap();
        std::fs::write(repo_dir.join("config.json"), b"{}").unwrap();
        let hub = server::LocalHub::start(server::Hub {
            repos: modelcache_hub::served::ServedRepos::load(&dir.path().join("hub")).unwrap(),
            // Every answer waits: the fetch is still running when the others ask.
            faults: modelcache_hub::faults::Faults::new(modelcache_hub::faults::FaultPlan {
                latency: Duration::from_millis(300),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
        let stop = CancellationToken::new();
        let store = Arc::new(crate::store::Store::open(dir.path().join("store")).unwrap());
        let client = modelcache_hub::HubClient::new(&hub.endpoint, &[]).unwrap();
        let api = Node::new(
            Fetcher::new(client, store, Default::default()),
            Watermarks::default(),
            Arc::new(crate::mounts::ProcMountTable),
            stop.clone(),
        )
        .unwrap();
        let model = ModelRef {
            kind: RepoKind::Model,
            repo: RepoId::parse("org/slow").unwrap(),
            revision: modelcache_core::repo::Revision::main(),
        };
        let all = FileFilter::default();
        for _ in 0..3 {
            let (got, _) = api
                .ensure(&model, &all, None, Duration::ZERO)
                .await
                .unwrap();
            assert!(matches!(got, Ensured::Fetching { .. }), "{got:?}");
        }
        let count = |result| {
            api.metrics()
                .publishes
                .get_or_create(&CacheResult { result })
                .get()
        };
        assert_eq!((count("miss"), count("join")), (1, 2));
        stop.cancel();
    }

    /// `rm` through the agent against volumes pinning the same snapshot, both as fast as they
    /// go: whenever a pin succeeds, the snapshot stays whole until it is unpinned. `rm` from a
    /// second process read pins.json and removed later, so a pin in between lost its files.
    #[test]
    fn rm_never_removes_a_snapshot_a_volume_has_pinned() {
        use crate::store::SnapshotFile;
        use modelcache_core::repo::RepoPath;
        const ROUNDS: usize = 400;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(crate::store::Store::open(dir.path().join("store")).unwrap());
        let client = modelcache_hub::HubClient::new("http://127.0.0.1:9", &[]).unwrap();
        let api = Arc::new(
            Node::new(
                Fetcher::new(client, store.clone(), Default::default()),
                Watermarks::default(),
                Arc::new(crate::mounts::ProcMountTable),
                CancellationToken::new(),
            )
            .unwrap(),
        );
        let model = ModelRef {
            kind: RepoKind::Model,
            repo: RepoId::parse("org/race").unwrap(),
            revision: modelcache_core::repo::Revision::main(),
        };
        let commit = Commit::parse(&"a".repeat(40)).unwrap();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let remover = {
            let (admin, done, repo) = (api.admin(), done.clone(), model.repo.clone());
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(120);
                let mut removed = 0;
                while !done.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline
                {
                    match admin.remove(RepoKind::Model, &repo, None) {
                        Ok(_) => removed += 1,
                        Err(NodeError::Admin(
                            AdminError::Pinned(..) | AdminError::NoSuchSnapshot(_),
                        )) => {}
                        Err(e) => panic!("rm failed: {e}"),
                    }
                    // Uneven gaps: rm lands before, during and after pins.
                    std::thread::sleep(Duration::from_micros(rand::random_range(0..400)));
                }
                removed
            })
        };
        let (mut pinned, mut refused) = (0, 0);
        for round in 0..ROUNDS {
            if store
                .snapshot(
                    &crate::store::SnapshotKey::parse(model.kind, &model.repo, &commit, None)
                        .unwrap(),
                )
                .is_none()
            {
                let hash = crate::store::tests::put_blob(&store, b"weights");
                let file = SnapshotFile {
                    path: RepoPath::parse("w.bin").unwrap(),
                    hash,
                };
                // rm's garbage collection may take the blob first: try again next round.
                let _ = store.assemble_snapshot(
                    &crate::store::SnapshotKey::parse(model.kind, &model.repo, &commit, None)
                        .unwrap(),
                    &[file],
                );
            }
            let all = FileFilter::default();
            match api.pin("vol", &model, &all, &commit, "/t", None) {
                Ok(snap) => {
                    pinned += 1;
                    for _ in 0..3 {
                        assert!(
                            snap.path.join("w.bin").is_file(),
                            "round {round}: rm removed a snapshot while a volume had it pinned"
                        );
                        std::thread::yield_now();
                    }
                    api.unpin("vol", "/t").unwrap();
                }
                Err(NodeError::NotPresent(_)) => refused += 1,
                Err(e) => panic!("pin failed: {e}"),
            }
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let removed = remover.join().unwrap();
        // Both sides won often: the race was run, not avoided.
        assert!(
            pinned > 10 && removed > 10,
            "pinned {pinned}, refused {refused}, removed {removed}"
        );
    }
}
