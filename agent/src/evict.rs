//! Giving disk space back before kubelet evicts pods for disk pressure, never touching a model
//! in use.
//!
//! - **Watched**: the filesystem holding the store, every [`WATCH_INTERVAL`] and whenever a
//!   download finishes. Usage is the larger of the filesystem's (`statvfs`: what kubelet's
//!   `nodefs.available` sees) and, with `--max-store-gib`, the store's bytes against that size.
//! - **Above the high watermark** the evictor removes, until usage is below the low one:
//!   first blobs that no snapshot links (leftovers of failed pulls: deleting them loses
//!   nothing), then snapshots, least recently used first, each followed by the blobs only it
//!   used. Snapshots a pre-warm entry keeps come after all others, and go only when nothing
//!   else frees the space, with a warning.
//! - **Disk pressure** reported by kubelet (the Node's `DiskPressure` condition, fed in through
//!   [`Evictor::set_disk_pressure`]) is critical: every snapshot not in use goes but the
//!   pre-warmed ones, which go too while usage is above the high watermark.
//! - **Never in use**: a snapshot a volume pins (published right now), or one a publish has been
//!   told is ready but has not pinned yet (a lease, [`LEASE`], taken when the agent answers
//!   "ready" and dropped at the pin), is never a candidate. The pins lock is held while one
//!   candidate is checked and removed, so a pin cannot land on a snapshot being removed. Blobs a
//!   running download will link are kept ([`Wanted`]). Blobs a mounted snapshot shares with an
//!   evicted one stay: only blobs no snapshot links are deleted, so no file a volume shows ever
//!   changes or disappears.
//! - **Before a download**, [`Room::make_room`] evicts as needed and refuses early, naming the
//!   sizes, what cannot fit even with every unused model gone.
//! - **Recorded**: every eviction is logged (reason, model, commit, bytes freed, idle time) and
//!   counted in [`EvictionStats`].

use crate::caches::Caches;
use crate::fetch::{NoRoom, Room, Wanted};
use crate::store::{Pins, Snapshot, Store, StoreError, unix};
use modelcache_core::cache::CacheKey;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// How often usage is checked when nothing else wakes the evictor.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// How long a snapshot a publish was told is ready stays protected while waiting for its pin:
/// kubelet's whole operation timeout.
pub const LEASE: Duration = Duration::from_secs(120);

/// When to evict, in percent of the filesystem (or of `max_store_bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watermarks {
    /// Evict when usage is above this.
    pub high: u8,
    /// ... down to below this.
    pub low: u8,
    /// Treat the store as full at this many bytes, whatever the filesystem's size.
    pub max_store_bytes: Option<u64>,
}

impl Default for Watermarks {
    /// 85 / 75: kubelet starts evicting pods at `nodefs.available < 10%` (90% used), so the
    /// store gives space back well before.
    fn default() -> Self {
        Watermarks {
            high: 85,
            low: 75,
            max_store_bytes: None,
        }
    }
}

impl Watermarks {
    /// Checks `low < high <= 100`.
    pub fn validate(self) -> Result<Self, BadWatermarks> {
        if self.low >= self.high || self.high > 100 {
            return Err(BadWatermarks {
                low: self.low,
                high: self.high,
            });
        }
        Ok(self)
    }
}

/// Watermarks out of order or over 100%.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("watermarks must satisfy low < high <= 100; got low {low} and high {high}")]
pub struct BadWatermarks {
    /// The low watermark given.
    pub low: u8,
    /// The high watermark given.
    pub high: u8,
}

/// Space on a filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    /// Bytes in all.
    pub total: u64,
    /// Bytes free for unprivileged writers (what `df` and kubelet call available).
    pub available: u64,
}

/// The syscall boundary: how full a filesystem is.
pub trait Disk: Send + Sync + std::fmt::Debug {
    /// Space on the filesystem holding `path`.
    fn space(&self, path: &Path) -> std::io::Result<Space>;
}

/// `statvfs(2)`.
#[derive(Debug, Default)]
pub struct Statvfs;

impl Disk for Statvfs {
    fn space(&self, path: &Path) -> std::io::Result<Space> {
        let st = nix::sys::statvfs::statvfs(path)?;
        let frag = st.fragment_size();
        Ok(Space {
            total: st.blocks() * frag,
            available: st.blocks_available() * frag,
        })
    }
}

/// Why an eviction ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The filesystem was above the high watermark.
    HighWatermark,
    /// The store was above the high watermark of `--max-store-gib`.
    MaxStoreSize,
    /// A download needed the space.
    MakeRoom,
    /// The Node reports `DiskPressure`.
    DiskPressure,
}

impl Reason {
    /// Every reason, in the order of [`EvictionStats`].
    pub const ALL: [Reason; 4] = [
        Reason::HighWatermark,
        Reason::MaxStoreSize,
        Reason::MakeRoom,
        Reason::DiskPressure,
    ];

    /// The label in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::HighWatermark => "high-watermark",
            Reason::MaxStoreSize => "max-store-size",
            Reason::MakeRoom => "make-room",
            Reason::DiskPressure => "disk-pressure",
        }
    }
}

/// Counters of what eviction did, per [`Reason`], for metrics.
#[derive(Debug, Default)]
pub struct EvictionStats {
    by_reason: [ReasonStats; 4],
    /// Evictions that could not reach their goal because everything left is in use.
    pub exhausted: AtomicU64,
}

/// What eviction did for one reason.
#[derive(Debug, Default)]
pub struct ReasonStats {
    /// Snapshots evicted.
    pub snapshots: AtomicU64,
    /// Cache volumes evicted.
    pub caches: AtomicU64,
    /// Bytes freed (snapshots' blobs and unlinked blobs).
    pub bytes: AtomicU64,
}

impl EvictionStats {
    /// The counters of one reason.
    pub fn of(&self, reason: Reason) -> &ReasonStats {
        let i = Reason::ALL
            .iter()
            .position(|r| *r == reason)
            .expect("every reason is in ALL");
        &self.by_reason[i]
    }

    /// Snapshots evicted, for every reason.
    pub fn snapshots(&self) -> u64 {
        self.by_reason
            .iter()
            .map(|r| r.snapshots.load(Ordering::Relaxed))
            .sum()
    }
}

/// One snapshot evicted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evicted {
    /// The snapshot.
    pub snapshot: Snapshot,
    /// Bytes its removal freed.
    pub bytes: u64,
    /// Seconds since a volume last used it.
    pub idle_seconds: u64,
}

/// What one eviction run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Snapshots removed, in order.
    pub evicted: Vec<Evicted>,
    /// Caches removed, in order, with the bytes each freed.
    pub evicted_caches: Vec<(CacheKey, u64)>,
    /// Bytes freed by unlinked blobs removed before any snapshot.
    pub orphan_bytes: u64,
    /// True when usage is still above the goal: everything left is in use.
    pub exhausted: bool,
}

/// Usage against the watermarks.
#[derive(Debug, Clone, Copy)]
struct Usage {
    space: Space,
    /// Bytes of blobs and partial downloads, when a maximum store size is set.
    store_bytes: Option<u64>,
}

/// Something eviction may remove.
#[derive(Debug)]
enum Candidate {
    /// A snapshot, and whether a pre-warm entry keeps it.
    Snapshot(bool, Snapshot),
    /// A cache no volume has mounted.
    Cache(CacheKey),
}

impl Candidate {
    /// Orders candidates of the same tier and age.
    fn tie(&self) -> PathBuf {
        match self {
            Candidate::Snapshot(_, s) => s.path.clone(),
            Candidate::Cache(k) => PathBuf::from(k.dir_name()),
        }
    }
}

/// Keeps the store under its watermarks.
#[derive(Debug)]
pub struct Evictor {
    store: Arc<Store>,
    pins: Arc<Mutex<Pins>>,
    wanted: Wanted,
    marks: Watermarks,
    disk: Box<dyn Disk>,
    leases: Mutex<HashMap<PathBuf, Instant>>,
    /// One eviction at a time.
    running: Mutex<()>,
    stats: EvictionStats,
    disk_pressure: std::sync::atomic::AtomicBool,
    caches: Option<Arc<Caches>>,
}

/// When an eviction run may stop.
#[derive(Debug, Clone, Copy)]
enum Goal {
    /// When `need` more bytes fit under `pct` percent.
    Fits { need: u64, pct: u8 },
    /// When every ordinary snapshot not in use is gone and usage is under the high watermark.
    Critical,
}

impl Evictor {
    /// An evictor for `store`, whose pins are `pins` and whose running downloads want `wanted`.
    pub fn new(
        store: Arc<Store>,
        pins: Arc<Mutex<Pins>>,
        wanted: Wanted,
        marks: Watermarks,
        disk: Box<dyn Disk>,
    ) -> Self {
        Evictor {
            store,
            pins,
            wanted,
            marks,
            disk,
            leases: Mutex::default(),
            running: Mutex::new(()),
            stats: EvictionStats::default(),
            disk_pressure: Default::default(),
            caches: None,
        }
    }

    /// Evicts `caches` too: unpinned ones, after the unpinned models and before the pre-warmed.
    pub fn with_caches(mut self, caches: Arc<Caches>) -> Self {
        self.caches = Some(caches);
        self
    }

    /// Whether the Node reports `DiskPressure`; while it does, each check evicts as
    /// [`Reason::DiskPressure`].
    pub fn set_disk_pressure(&self, on: bool) {
        if self.disk_pressure.swap(on, Ordering::Relaxed) != on {
            tracing::info!(
                disk_pressure = on,
                "the node's DiskPressure condition changed"
            );
        }
    }

    /// What eviction has done so far.
    pub fn stats(&self) -> &EvictionStats {
        &self.stats
    }

    /// Protects `snap` for [`LEASE`]: a publish was told it is ready and will pin it.
    pub fn lease(&self, snap: &Snapshot) {
        self.leases
            .lock()
            .expect("leases lock")
            .insert(snap.path.clone(), Instant::now());
    }

    /// Ends `snap`'s lease (its pin now protects it).
    pub fn release(&self, snap: &Snapshot) {
        self.leases.lock().expect("leases lock").remove(&snap.path);
    }

    fn leased(&self, snap: &Snapshot) -> bool {
        let mut leases = self.leases.lock().expect("leases lock");
        leases.retain(|_, at| at.elapsed() < LEASE);
        leases.contains_key(&snap.path)
    }

    fn usage(&self) -> Result<Usage, StoreError> {
        let root = self.store.root();
        let space = self
            .disk
            .space(root)
            .map_err(|e| StoreError::from_io("statvfs", root, e))?;
        let caches = self.caches.as_ref().map_or(0, |c| c.bytes_on_disk());
        let store_bytes = match self.marks.max_store_bytes {
            Some(_) => Some(self.store.bytes_on_disk()? + caches),
            None => None,
        };
        Ok(Usage { space, store_bytes })
    }

    /// Whether `u` is above the high watermark or the node under disk pressure, and why.
    fn pressure(&self, u: &Usage) -> Option<Reason> {
        if self.disk_pressure.load(Ordering::Relaxed) {
            return Some(Reason::DiskPressure);
        }
        let used = u.space.total.saturating_sub(u.space.available);
        if over(used, u.space.total, self.marks.high) {
            return Some(Reason::HighWatermark);
        }
        match (u.store_bytes, self.marks.max_store_bytes) {
            (Some(bytes), Some(max)) if over(bytes, max, self.marks.high) => {
                Some(Reason::MaxStoreSize)
            }
            _ => None,
        }
    }

    /// True when `need` more bytes would leave usage at or under `pct`.
    fn fits_under(&self, u: &Usage, need: u64, pct: u8) -> bool {
        let used = u.space.total.saturating_sub(u.space.available);
        let fs_ok = !over(used + need, u.space.total, pct);
        let store_ok = match (u.store_bytes, self.marks.max_store_bytes) {
            (Some(bytes), Some(max)) => !over(bytes + need, max, pct),
            _ => true,
        };
        fs_ok && store_ok
    }

    /// Evicts if usage is above the high watermark; what it did, if it ran.
    pub fn check(&self) -> Result<Option<Report>, StoreError> {
        let u = self.usage()?;
        let goal = Goal::Fits {
            need: 0,
            pct: self.marks.low,
        };
        match self.pressure(&u) {
            Some(Reason::DiskPressure) => self.evict(Reason::DiskPressure, Goal::Critical),
            Some(reason) => self.evict(reason, goal),
            None => return Ok(None),
        }
        .map(Some)
    }

    /// True when an eviction run may stop before a candidate (`prewarmed` or not).
    fn reached(&self, goal: Goal, next_prewarmed: bool) -> Result<bool, StoreError> {
        let u = self.usage()?;
        Ok(match goal {
            Goal::Fits { need, pct } => self.fits_under(&u, need, pct),
            Goal::Critical => next_prewarmed && self.fits_under(&u, 0, self.marks.high),
        })
    }

    /// Evicts until `goal` is reached, or nothing evictable is left.
    fn evict(&self, reason: Reason, goal: Goal) -> Result<Report, StoreError> {
        let _running = self.running.lock().expect("eviction lock");
        let mut report = Report::default();
        let keep = |h: &_| self.wanted.contains(h);
        let freed = |bytes: u64, what: &str| {
            if bytes > 0 {
                tracing::info!(reason = reason.as_str(), bytes, "evicted {what}");
                self.stats
                    .of(reason)
                    .bytes
                    .fetch_add(bytes, Ordering::Relaxed);
            }
        };
        let (_, blobs) = self.store.collect_garbage(keep)?;
        freed(blobs, "blobs no snapshot uses");
        // Partial downloads no running fetch has open: a failed download's bytes.
        let (_, partials) = self.store.reclaim_partials()?;
        freed(partials, "abandoned partial downloads");
        let orphans = blobs + partials;
        report.orphan_bytes = orphans;
        let now = unix(SystemTime::now());
        for (last_used, candidate) in self.candidates()? {
            let (prewarmed, snap) = match candidate {
                Candidate::Snapshot(prewarmed, snap) => (prewarmed, snap),
                Candidate::Cache(key) => {
                    if self.reached(goal, false)? {
                        return Ok(report);
                    }
                    let caches = self
                        .caches
                        .as_ref()
                        .expect("cache candidates come from caches");
                    // Checked and removed under the caches' lock: no pin lands on it meanwhile.
                    if let Some(bytes) = caches.remove_if_idle(&key)? {
                        tracing::info!(
                            reason = reason.as_str(),
                            cache = %key,
                            bytes,
                            idle_seconds = now.saturating_sub(last_used),
                            "evicted a cache no volume has mounted"
                        );
                        let counters = self.stats.of(reason);
                        counters.caches.fetch_add(1, Ordering::Relaxed);
                        counters.bytes.fetch_add(bytes, Ordering::Relaxed);
                        report.evicted_caches.push((key, bytes));
                    }
                    continue;
                }
            };
            if self.reached(goal, prewarmed)? {
                return Ok(report);
            }
            // Checked and removed under the pins lock: no pin lands on it meanwhile.
            let pins = self.pins.lock().expect("pins lock");
            if !pins.volumes_of(&snap).is_empty() || self.leased(&snap) {
                continue;
            }
            if !snap.path.is_dir() {
                continue; // `rm` beside the agent took it.
            }
            self.store.remove_snapshot(&snap)?;
            drop(pins);
            let (_, bytes) = self.store.collect_garbage(keep)?;
            let idle = now.saturating_sub(last_used);
            if prewarmed {
                tracing::warn!(
                    model.repo = %snap.repo,
                    model.commit = %snap.commit,
                    "evicting a pre-warmed model: nothing else frees the space"
                );
            }
            tracing::info!(
                reason = reason.as_str(),
                model.repo = %snap.repo,
                model.commit = %snap.commit,
                filter = snap.filter.as_deref().unwrap_or(""),
                bytes,
                idle_seconds = idle,
                "evicted snapshot"
            );
            let counters = self.stats.of(reason);
            counters.snapshots.fetch_add(1, Ordering::Relaxed);
            counters.bytes.fetch_add(bytes, Ordering::Relaxed);
            report.evicted.push(Evicted {
                snapshot: snap,
                bytes,
                idle_seconds: idle,
            });
        }
        if !self.reached(goal, true)? {
            report.exhausted = true;
            self.stats.exhausted.fetch_add(1, Ordering::Relaxed);
            let pinned = self.pins.lock().expect("pins lock").len();
            tracing::warn!(
                reason = reason.as_str(),
                volumes = pinned,
                "cannot get under the watermark: every snapshot left is in use"
            );
        }
        Ok(report)
    }

    /// What eviction may remove, in order, each with when it was last used: ordinary
    /// snapshots, then caches no volume has mounted, then pre-warmed snapshots; least recently
    /// used first within each. (Pinned snapshots are among them, and skipped under the lock.)
    fn candidates(&self) -> Result<Vec<(u64, Candidate)>, StoreError> {
        let mut candidates: Vec<(u8, u64, Candidate)> = self
            .store
            .list_snapshots()?
            .into_iter()
            .map(|s| {
                let meta = self.store.peek_meta(&s);
                let tier = if meta.prewarmed { 2 } else { 0 };
                (tier, meta.last_used, Candidate::Snapshot(meta.prewarmed, s))
            })
            .collect();
        if let Some(caches) = &self.caches {
            candidates.extend(
                caches
                    .idle()
                    .into_iter()
                    .map(|i| (1, i.last_used, Candidate::Cache(i.key))),
            );
        }
        candidates.sort_by_cached_key(|(tier, last_used, c)| (*tier, *last_used, c.tie()));
        Ok(candidates.into_iter().map(|(_, t, c)| (t, c)).collect())
    }

    /// At most the bytes that evicting every snapshot not in use would free.
    fn reclaimable(&self) -> Result<u64, StoreError> {
        let pins = self.pins.lock().expect("pins lock");
        let snapshots: u64 = self
            .store
            .list_snapshots()?
            .iter()
            .filter(|s| pins.volumes_of(s).is_empty() && !self.leased(s))
            .map(|s| self.store.peek_meta(s).bytes)
            .sum();
        let caches = self.caches.as_ref().map_or(0, |c| c.idle_bytes());
        Ok(snapshots
            .saturating_add(caches)
            .saturating_add(self.store.abandoned_partial_bytes()))
    }

    /// Checks usage every [`WATCH_INTERVAL`] and whenever `wake` is notified, evicting when
    /// above the high watermark, until `shutdown`.
    pub async fn watch(self: Arc<Self>, wake: Arc<Notify>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = wake.notified() => {}
                () = shutdown.cancelled() => return,
            }
            let me = self.clone();
            match tokio::task::spawn_blocking(move || me.check()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "eviction failed"),
                Err(e) => tracing::error!(error = %e, "eviction panicked"),
            }
        }
    }
}

impl Room for Evictor {
    fn make_room(&self, need: u64) -> Result<(), NoRoom> {
        let sized = |u: &Usage, reclaimable| NoRoom {
            needed: need,
            available: u.space.available,
            reclaimable,
        };
        let attempt = || -> Result<Result<(), NoRoom>, StoreError> {
            let u = self.usage()?;
            if self.fits_under(&u, need, self.marks.high) {
                return Ok(Ok(()));
            }
            // Refuse early what cannot fit even with every unused model gone.
            let reclaimable = self.reclaimable()?;
            if !self.fits_under(&u, need.saturating_sub(reclaimable), 100) {
                return Ok(Err(sized(&u, reclaimable)));
            }
            let goal = Goal::Fits {
                need,
                pct: self.marks.high,
            };
            self.evict(Reason::MakeRoom, goal)?;
            let u = self.usage()?;
            if self.fits_under(&u, need, 100) {
                Ok(Ok(()))
            } else {
                Ok(Err(sized(&u, self.reclaimable()?)))
            }
        };
        attempt().unwrap_or_else(|e| {
            // Eviction failing is no reason to refuse the download: the disk decides.
            tracing::warn!(error = %e, "could not make room");
            Ok(())
        })
    }
}

/// True when `used` is more than `pct` percent of `total`.
fn over(used: u64, total: u64, pct: u8) -> bool {
    u128::from(used) * 100 > u128::from(total) * u128::from(pct)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{PinRecord, SnapshotFile};
    use modelcache_core::repo::{RepoId, RepoKind, RepoPath};

    /// A disk of `total` bytes holding only the store's blobs.
    #[derive(Debug)]
    struct BlobDisk {
        total: u64,
    }

    impl Disk for BlobDisk {
        fn space(&self, path: &Path) -> std::io::Result<Space> {
            let used: u64 = walkdir::WalkDir::new(path.join("blobs"))
                .into_iter()
                .flatten()
                .filter(|e| e.file_type().is_file())
                .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
                .sum();
            Ok(Space {
                total: self.total,
                available: self.total - used,
            })
        }
    }

    /// Four snapshots of one 100-byte blob each, last used at 1000, 3000, 2000 and 4000.
    fn store_of_four(dir: &Path) -> (Arc<Store>, Vec<Snapshot>) {
        let store = Arc::new(Store::open(dir).unwrap());
        let repo = RepoId::parse("org/m").unwrap();
        let mut snaps = Vec::new();
        for (i, used) in [1000, 3000, 2000, 4000].into_iter().enumerate() {
            let hash = crate::store::tests::put_blob(&store, &[i as u8; 100]);
            let file = SnapshotFile {
                path: RepoPath::parse("w.bin").unwrap(),
                hash,
            };
            let commit = i.to_string().repeat(40);
            let snap = store
                .assemble_snapshot(
                    &crate::store::SnapshotKey::parse(RepoKind::Model, &repo, &commit, None)
                        .unwrap(),
                    &[file],
                )
                .unwrap();
            store.record_snapshot(&snap, "test").unwrap();
            store.set_last_used(&snap, used);
            snaps.push(snap);
        }
        (store, snaps)
    }

    fn evictor(store: &Arc<Store>, total: u64) -> (Evictor, Arc<Mutex<Pins>>) {
        let pins = Arc::new(Mutex::new(Pins::load(store.root()).unwrap()));
        let marks = Watermarks {
            high: 70,
            low: 50,
            max_store_bytes: None,
        };
        let disk = Box::new(BlobDisk { total });
        let e = Evictor::new(store.clone(), pins.clone(), Wanted::default(), marks, disk);
        (e, pins)
    }

    #[test]
    fn evicts_least_recently_used_first_and_never_a_pinned_or_leased_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let (store, snaps) = store_of_four(dir.path());
        // 400 of 500 bytes: 80% is over 70%; 50% is 250 bytes.
        let (evictor, pins) = evictor(&store, 500);
        let pin = PinRecord {
            kind: "model".into(),
            repo: "org/m".into(),
            commit: snaps[3].commit.to_string(),
            target_path: "/t".into(),
            pod: None,
            filter: None,
            pinned_at: 0,
        };
        pins.lock().unwrap().pin("vol", pin).unwrap();
        evictor.lease(&snaps[1]);

        let report = evictor.check().unwrap().expect("over the high watermark");
        // Oldest first (0, then 2); 1 is leased, 3 is pinned.
        assert_eq!(commits(&report), [&snaps[0].commit, &snaps[2].commit]);
        assert!(report.evicted.iter().all(|e| e.bytes == 100));
        assert!(!report.exhausted);
        assert!(snaps[1].path.is_dir() && snaps[3].path.is_dir());
        assert_eq!(evictor.stats().snapshots(), 2);
        let hw = evictor.stats().of(Reason::HighWatermark);
        assert_eq!(hw.bytes.load(Ordering::Relaxed), 200);
        assert_eq!(
            evictor.check().unwrap(),
            None,
            "under the low watermark now"
        );
    }

    fn commits(report: &Report) -> Vec<&str> {
        report
            .evicted
            .iter()
            .map(|e| e.snapshot.commit.as_str())
            .collect()
    }

    #[test]
    fn pre_warmed_snapshots_go_last_and_only_when_nothing_else_frees_the_space() {
        let dir = tempfile::tempdir().unwrap();
        let (store, snaps) = store_of_four(dir.path());
        store.set_prewarmed(&snaps[0], true).unwrap();
        let (evictor, _) = evictor(&store, 500);
        // The oldest is pre-warmed: the next two oldest go instead.
        let report = evictor.check().unwrap().unwrap();
        assert_eq!(commits(&report), [&snaps[2].commit, &snaps[1].commit]);
        // 300 more bytes fit under the high watermark (350) only with the pre-warmed one gone
        // too, once the ordinary one left is in use.
        evictor.lease(&snaps[3]);
        evictor.make_room(300).unwrap();
        assert!(!snaps[0].path.is_dir(), "the pre-warmed snapshot went last");
        assert!(snaps[3].path.is_dir());
    }

    #[test]
    fn disk_pressure_evicts_every_ordinary_snapshot_not_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let (store, snaps) = store_of_four(dir.path());
        store.set_prewarmed(&snaps[3], true).unwrap();
        // 400 of 10,000 bytes: far under the watermarks.
        let (evictor, _) = evictor(&store, 10_000);
        assert_eq!(evictor.check().unwrap(), None);
        evictor.set_disk_pressure(true);
        let report = evictor.check().unwrap().unwrap();
        assert_eq!(
            commits(&report),
            [&snaps[0].commit, &snaps[2].commit, &snaps[1].commit]
        );
        assert!(
            snaps[3].path.is_dir(),
            "pre-warmed, and under the high watermark"
        );
        evictor.set_disk_pressure(false);
        assert_eq!(evictor.check().unwrap(), None);
    }

    #[test]
    fn idle_caches_go_after_ordinary_snapshots_and_before_pre_warmed_ones_and_mounted_ones_never() {
        use crate::caches::{CacheLimits, CachePin, Caches, MIN_CACHE_BYTES, Mke2fs};
        use modelcache_core::cache::{CacheName, CacheScope};
        let dir = tempfile::tempdir().unwrap();
        let (store, snaps) = store_of_four(dir.path());
        store.set_prewarmed(&snaps[3], true).unwrap();
        let caches =
            Arc::new(Caches::open(store.root(), CacheLimits::default(), Box::new(Mke2fs)).unwrap());
        let key = |name: &str| CacheKey {
            scope: CacheScope::namespace("ns").unwrap(),
            name: CacheName::parse(name).unwrap(),
        };
        let pin = |v: &str| CachePin {
            volume_id: v.into(),
            target_path: format!("/t/{v}"),
            pod: None,
            pinned_at: 0,
        };
        for name in ["idle", "mounted"] {
            caches
                .ensure(&key(name), Some(MIN_CACHE_BYTES), pin(name))
                .unwrap();
        }
        caches.unpin("idle", "/t/idle").unwrap();
        let pins = Arc::new(Mutex::new(Pins::load(store.root()).unwrap()));
        let evictor = Evictor::new(
            store.clone(),
            pins,
            Wanted::default(),
            Watermarks::default(),
            Box::new(BlobDisk { total: 10_000 }),
        )
        .with_caches(caches.clone());
        let order: Vec<String> = evictor
            .candidates()
            .unwrap()
            .iter()
            .map(|(_, c)| match c {
                Candidate::Snapshot(_, s) => s.commit.short().to_owned(),
                Candidate::Cache(k) => k.to_string(),
            })
            .collect();
        let short = |i: usize| snaps[i].commit.short().to_owned();
        assert_eq!(
            order,
            [short(0), short(2), short(1), "ns/idle".into(), short(3)]
        );
        // Disk pressure takes everything not in use but the pre-warmed: the idle cache too.
        evictor.set_disk_pressure(true);
        let report = evictor.check().unwrap().unwrap();
        assert_eq!(report.evicted.len(), 3);
        assert_eq!(report.evicted_caches.len(), 1);
        assert_eq!(report.evicted_caches[0].0, key("idle"));
        let left: Vec<String> = caches.list().iter().map(|c| c.cache.clone()).collect();
        assert_eq!(left, ["ns/mounted"]);
        assert_eq!(
            evictor
                .stats()
                .of(Reason::DiskPressure)
                .caches
                .load(Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn says_so_when_everything_left_is_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let (store, snaps) = store_of_four(dir.path());
        // 400 of 420 bytes is over 70%, and every snapshot is leased: nothing can go.
        let (evictor, _) = evictor(&store, 420);
        for s in &snaps {
            evictor.lease(s);
        }
        let report = evictor.check().unwrap().unwrap();
        assert!(report.evicted.is_empty() && report.exhausted);
        assert_eq!(evictor.stats().exhausted.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn make_room_refuses_early_what_cannot_fit_and_evicts_for_what_can() {
        let dir = tempfile::tempdir().unwrap();
        let (store, snaps) = store_of_four(dir.path());
        let (evictor, _) = evictor(&store, 1000);
        // 400 used, 600 free, 400 reclaimable: 1001 cannot fit.
        let no = evictor.make_room(1001).unwrap_err();
        assert_eq!((no.needed, no.available, no.reclaimable), (1001, 600, 400));
        assert!(
            snaps.iter().all(|s| s.path.is_dir()),
            "a refusal evicts nothing"
        );
        // 450 fits only under the high watermark (700) after evicting the two oldest.
        evictor.make_room(450).unwrap();
        assert!(!snaps[0].path.is_dir() && !snaps[2].path.is_dir());
        assert!(snaps[1].path.is_dir() && snaps[3].path.is_dir());
    }

    #[test]
    fn percentages_compare_without_overflow() {
        assert!(!over(85, 100, 85));
        assert!(over(86, 100, 85));
        assert!(over(u64::MAX, u64::MAX - 1, 100));
        assert!(!over(u64::MAX / 2, u64::MAX, 50));
    }

    #[test]
    fn watermarks_must_be_ordered() {
        assert!(Watermarks::default().validate().is_ok());
        let bad = Watermarks {
            high: 70,
            low: 80,
            max_store_bytes: None,
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("low < high")
        );
    }
}
