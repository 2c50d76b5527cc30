//! Compilation-cache volumes: a writable directory per cache (a scope and a name), shared by
//! the pods that ask for it, so that vLLM's `torch.compile` cache survives a pod's restart.
//!
//! - **Bounded by the filesystem.** Each cache is an ext4 image of its maximum size,
//!   `STORE/caches/<scope>.<name>/image.ext4`, sparse, so it takes on disk only what it holds.
//!   The CSI plugin mounts it on `mnt/` beside it (nosuid, nodev, discard) and bind-mounts that
//!   into pods: a writer past the size gets ENOSPC from the cache's own filesystem, and the
//!   node's disk is never filled through it. The agent formats the image (`mke2fs`, behind
//!   [`Format`]); it needs no privilege for that, and mounts nothing.
//! - **Pinned while mounted.** [`Caches::ensure`] creates the cache if missing and records the
//!   volume's pin in one step, under the registry lock that eviction takes too; `caches.json`
//!   keeps the pins and each cache's size and last use across restarts.
//! - **Evictable.** Unpinned caches are eviction candidates, least recently used first, after
//!   the unpinned models and before the pre-warmed ones (see [`crate::evict`]). A pinned cache
//!   is never a candidate. Removal unlinks the image and removes the empty `mnt/`; it never
//!   recurses, so a cache mounted by mistake cannot lose its files to it.

use crate::store::{PIN_SETTLE_SECONDS, StoreError, unix};
use modelcache_core::cache::{CacheKey, CacheScope};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

/// The smallest cache: ext4's metadata needs a few MiB.
pub const MIN_CACHE_BYTES: u64 = 16 << 20;

/// The image's file name in a cache's directory.
const IMAGE: &str = "image.ext4";
/// The mount point's name in a cache's directory.
const MNT: &str = "mnt";
/// The registry's file name in `STORE/caches/`.
const REGISTRY: &str = "caches.json";

/// How large caches may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheLimits {
    /// The size of a cache whose volume names none.
    pub default_size: u64,
    /// The largest size a volume may ask for.
    pub max_size: u64,
}

impl Default for CacheLimits {
    /// 10 GiB by default, 100 GiB at most: a vLLM compile cache is hundreds of MiB per model.
    fn default() -> Self {
        CacheLimits {
            default_size: 10 << 30,
            max_size: 100 << 30,
        }
    }
}

/// Why a cache could not be made or pinned.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A size outside the limits.
    #[error(
        "cache {key}: maxSize {asked} bytes is outside what this node allows ({min} to {max} bytes; the agent's --cache-max-size)"
    )]
    Size {
        /// The cache.
        key: String,
        /// The size asked for.
        asked: u64,
        /// The least.
        min: u64,
        /// The most.
        max: u64,
    },
    /// Formatting the image failed.
    #[error("cache {key}: formatting its image failed: {reason}")]
    Format {
        /// The cache.
        key: String,
        /// What mke2fs said.
        reason: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl CacheError {
    /// The class of the failure, for the caller's status.
    pub fn class(&self) -> modelcache_core::error::Class {
        use modelcache_core::error::Class;
        match self {
            CacheError::Size { .. } => Class::Invalid,
            CacheError::Format { .. } => Class::Internal,
            CacheError::Store(s) => s.class(),
        }
    }
}

/// The tool boundary: makes an empty ext4 filesystem in a file.
pub trait Format: Send + Sync + std::fmt::Debug {
    /// Formats `image` (a file of the filesystem's size) as ext4.
    fn format(&self, image: &Path) -> io::Result<()>;
}

/// `mke2fs`, from the image's sbin or PATH.
#[derive(Debug, Default)]
pub struct Mke2fs;

impl Format for Mke2fs {
    fn format(&self, image: &Path) -> io::Result<()> {
        let program = ["/usr/sbin/mke2fs", "/sbin/mke2fs"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.exists())
            .unwrap_or(Path::new("mke2fs"));
        // No reserved blocks (the cache is all its users'), lazy init (a 100 GiB image formats
        // in well under a second), root owned by root: the plugin opens it to every user.
        let out = std::process::Command::new(program)
            .args(["-q", "-F", "-t", "ext4", "-m", "0", "-L", "modelcache"])
            .args([
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1,root_owner=0:0",
            ])
            .arg(image)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", program.display())))?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "{} {}: {}",
                program.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }
}

/// A volume's use of a cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachePin {
    /// The volume.
    pub volume_id: String,
    /// Where it is mounted.
    pub target_path: String,
    /// `namespace/name` of the pod, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// When the pin was made, Unix seconds.
    pub pinned_at: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CacheRecord {
    max_size: u64,
    created: u64,
    last_used: u64,
    #[serde(default)]
    pins: Vec<CachePin>,
}

/// A cache made present and pinned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ensured {
    /// Its image.
    pub image: PathBuf,
    /// The directory to mount the image on.
    pub mount_dir: PathBuf,
    /// The image's size.
    pub max_size: u64,
    /// True when this call made it.
    pub created: bool,
}

/// One cache, as `ls` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CacheView {
    /// `namespace/name` or `node/name`.
    pub cache: String,
    /// `namespace <ns>` or `node`.
    pub scope: String,
    /// The image's size: the most it holds.
    pub max_size: u64,
    /// Bytes it takes on disk now.
    pub bytes: u64,
    /// When a volume last mounted or unmounted it, Unix seconds.
    pub last_used: u64,
    /// The pods (or volume ids) that have it mounted.
    pub mounted_by: Vec<String>,
    /// Its image.
    pub image: PathBuf,
}

/// An unpinned cache, for eviction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idle {
    /// The cache.
    pub key: CacheKey,
    /// When it was last used, Unix seconds.
    pub last_used: u64,
}

/// The node's caches.
#[derive(Debug)]
pub struct Caches {
    root: PathBuf,
    format: Box<dyn Format>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    limits: CacheLimits,
    caches: BTreeMap<CacheKey, CacheRecord>,
}

fn ctx<T>(r: io::Result<T>, action: &'static str, path: &Path) -> Result<T, StoreError> {
    r.map_err(|e| StoreError::from_io(action, path, e))
}

/// True when something is mounted on `dir`, as this process sees it: its device differs from
/// its parent's.
fn mounted_on(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(dir), dir.parent().map(std::fs::metadata)) {
        (Ok(d), Some(Ok(p))) => d.dev() != p.dev(),
        _ => false,
    }
}

/// Bytes a file takes on disk (its allocated blocks), 0 when it is gone.
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

impl Caches {
    /// The caches under `store_root/caches`, as `caches.json` records them. A cache directory
    /// the registry lacks (it was lost) is adopted unpinned, with its image's size.
    pub fn open(
        store_root: &Path,
        limits: CacheLimits,
        format: Box<dyn Format>,
    ) -> Result<Self, StoreError> {
        let root = store_root.join("caches");
        ctx(std::fs::create_dir_all(&root), "create", &root)?;
        let mut caches = load(&root)?;
        let now = unix(SystemTime::now());
        let entries = ctx(std::fs::read_dir(&root), "list", &root)?;
        let mut present = HashSet::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(key) = name.to_str().and_then(CacheKey::from_dir_name) else {
                continue;
            };
            let image = entry.path().join(IMAGE);
            let Ok(meta) = std::fs::metadata(&image) else {
                continue;
            };
            present.insert(key.clone());
            caches.entry(key).or_insert(CacheRecord {
                max_size: meta.len(),
                created: now,
                last_used: now,
                pins: Vec::new(),
            });
        }
        caches.retain(|k, _| present.contains(k));
        let me = Caches {
            root,
            format,
            state: Mutex::new(State { limits, caches }),
        };
        me.save(&me.state.lock().expect("caches lock"))?;
        Ok(me)
    }

    /// Sets the limits new caches are held to.
    pub fn set_limits(&self, limits: CacheLimits) {
        self.state.lock().expect("caches lock").limits = limits;
    }

    fn dir(&self, key: &CacheKey) -> PathBuf {
        self.root.join(key.dir_name())
    }

    fn save(&self, state: &State) -> Result<(), StoreError> {
        let by_dir: BTreeMap<String, &CacheRecord> = state
            .caches
            .iter()
            .map(|(k, r)| (k.dir_name(), r))
            .collect();
        let bytes = serde_json::to_vec_pretty(&by_dir).expect("caches serialize");
        crate::store::write_atomic(&self.root.join(REGISTRY), &bytes)
    }

    /// Makes `key` present (an image of `max_size`, or the default, formatted) and pins it for
    /// `pin`. An existing cache keeps the size it was made with.
    pub fn ensure(
        &self,
        key: &CacheKey,
        max_size: Option<u64>,
        pin: CachePin,
    ) -> Result<Ensured, CacheError> {
        let mut state = self.state.lock().expect("caches lock");
        let limits = state.limits;
        let size = max_size.unwrap_or(limits.default_size);
        if !(MIN_CACHE_BYTES..=limits.max_size).contains(&size) {
            return Err(CacheError::Size {
                key: key.to_string(),
                asked: size,
                min: MIN_CACHE_BYTES,
                max: limits.max_size,
            });
        }
        let dir = self.dir(key);
        let (image, mount_dir) = (dir.join(IMAGE), dir.join(MNT));
        let now = unix(SystemTime::now());
        let created = !image.exists();
        if created {
            self.make(key, &dir, size)?;
            // A record left from an image that went is no longer this cache's.
            state.caches.remove(key);
        }
        let record = state.caches.entry(key.clone()).or_insert(CacheRecord {
            max_size: size,
            created: now,
            last_used: now,
            pins: Vec::new(),
        });
        record
            .pins
            .retain(|p| !(p.volume_id == pin.volume_id && p.target_path == pin.target_path));
        record.pins.push(pin);
        record.last_used = now;
        let max_size = record.max_size;
        self.save(&state)?;
        Ok(Ensured {
            image,
            mount_dir,
            max_size,
            created,
        })
    }

    /// Makes the cache's directory, its mount point and its formatted image (written beside,
    /// then renamed: a crash leaves no half-formatted image).
    fn make(&self, key: &CacheKey, dir: &Path, size: u64) -> Result<(), CacheError> {
        let mnt = dir.join(MNT);
        ctx(std::fs::create_dir_all(&mnt), "create", &mnt)?;
        let tmp = dir.join(".image.ext4.tmp");
        let file = ctx(std::fs::File::create(&tmp), "create", &tmp)?;
        ctx(file.set_len(size), "size", &tmp)?;
        drop(file);
        if let Err(e) = self.format.format(&tmp) {
            let _ = std::fs::remove_file(&tmp);
            return Err(CacheError::Format {
                key: key.to_string(),
                reason: e.to_string(),
            });
        }
        let image = dir.join(IMAGE);
        ctx(std::fs::rename(&tmp, &image), "rename into", &image)?;
        tracing::info!(cache = %key, bytes = size, "made a cache");
        Ok(())
    }

    /// Forgets a volume's pin at `target_path`; the cache it held, if it held one.
    pub fn unpin(
        &self,
        volume_id: &str,
        target_path: &str,
    ) -> Result<Option<CacheKey>, StoreError> {
        let mut state = self.state.lock().expect("caches lock");
        let now = unix(SystemTime::now());
        let mut found = None;
        for (key, record) in state.caches.iter_mut() {
            let before = record.pins.len();
            record
                .pins
                .retain(|p| !(p.volume_id == volume_id && p.target_path == target_path));
            if record.pins.len() != before {
                record.last_used = now;
                found = Some(key.clone());
            }
        }
        if found.is_some() {
            self.save(&state)?;
        }
        Ok(found)
    }

    /// The cache a volume has pinned at `target_path`: its key, image and mount directory.
    pub fn pinned(
        &self,
        volume_id: &str,
        target_path: &str,
    ) -> Option<(CacheKey, PathBuf, PathBuf)> {
        let state = self.state.lock().expect("caches lock");
        let (key, _) = state.caches.iter().find(|(_, r)| {
            r.pins
                .iter()
                .any(|p| p.volume_id == volume_id && p.target_path == target_path)
        })?;
        let dir = self.dir(key);
        Some((key.clone(), dir.join(IMAGE), dir.join(MNT)))
    }

    /// Every cache, for `ls`.
    pub fn list(&self) -> Vec<CacheView> {
        let state = self.state.lock().expect("caches lock");
        views(&self.root, &state.caches)
    }

    /// Every cache of the store at `store_root`, read without changing anything (for `ls`
    /// beside a running agent).
    pub fn inspect(store_root: &Path) -> Result<Vec<CacheView>, StoreError> {
        let root = store_root.join("caches");
        Ok(views(&root, &load(&root)?))
    }

    /// Bytes all caches take on disk.
    pub fn bytes_on_disk(&self) -> u64 {
        self.list().iter().map(|c| c.bytes).sum()
    }

    /// Bytes the caches no volume has mounted take on disk.
    pub fn idle_bytes(&self) -> u64 {
        let state = self.state.lock().expect("caches lock");
        state
            .caches
            .iter()
            .filter(|(_, r)| r.pins.is_empty())
            .map(|(key, _)| allocated(&self.dir(key).join(IMAGE)))
            .sum()
    }

    /// Caches no volume has mounted, least recently used first.
    pub fn idle(&self) -> Vec<Idle> {
        let state = self.state.lock().expect("caches lock");
        let mut idle: Vec<Idle> = state
            .caches
            .iter()
            .filter(|(_, r)| r.pins.is_empty())
            .map(|(key, r)| Idle {
                key: key.clone(),
                last_used: r.last_used,
            })
            .collect();
        idle.sort_by(|a, b| (a.last_used, &a.key).cmp(&(b.last_used, &b.key)));
        idle
    }

    /// Removes `key` if no volume has it pinned (checked under the lock that pins take): the
    /// bytes freed, or None when it is pinned or gone. Never recurses into `mnt/`: if something
    /// is mounted there, its files stay and the directory is left.
    pub fn remove_if_idle(&self, key: &CacheKey) -> Result<Option<u64>, StoreError> {
        let mut state = self.state.lock().expect("caches lock");
        match state.caches.get(key) {
            Some(r) if r.pins.is_empty() => {}
            _ => return Ok(None),
        }
        let dir = self.dir(key);
        let image = dir.join(IMAGE);
        if mounted_on(&dir.join(MNT)) {
            // The plugin unmounts a cache's image before its last pin goes; a mount here is
            // one it has not taken down: unlinking a mounted image would free nothing until
            // its last user left, and take the files with it.
            tracing::warn!(cache = %key, "not evicting a cache whose image is still mounted");
            return Ok(None);
        }
        let bytes = allocated(&image);
        match std::fs::remove_file(&image) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::from_io("remove", &image, e)),
        }
        for empty in [dir.join(MNT), dir.clone()] {
            if let Err(e) = std::fs::remove_dir(&empty) {
                tracing::warn!(dir = %empty.display(), error = %e, "left a cache directory that is not empty");
            }
        }
        state.caches.remove(key);
        self.save(&state)?;
        Ok(Some(bytes))
    }

    /// Drops pins older than [`PIN_SETTLE_SECONDS`] whose target is not a mount point: their
    /// unpublish never came (a node crash). The volume ids dropped.
    pub fn reconcile(
        &self,
        mount_points: &HashSet<PathBuf>,
        now: u64,
    ) -> Result<Vec<String>, StoreError> {
        let mut state = self.state.lock().expect("caches lock");
        let mut dropped = Vec::new();
        for record in state.caches.values_mut() {
            record.pins.retain(|p| {
                let keep = now.saturating_sub(p.pinned_at) < PIN_SETTLE_SECONDS
                    || mount_points.contains(Path::new(&p.target_path));
                if !keep {
                    dropped.push(p.volume_id.clone());
                }
                keep
            });
        }
        if !dropped.is_empty() {
            self.save(&state)?;
        }
        Ok(dropped)
    }
}

/// The registry in `root`, empty when there is none.
fn load(root: &Path) -> Result<BTreeMap<CacheKey, CacheRecord>, StoreError> {
    let path = root.join(REGISTRY);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let by_dir: BTreeMap<String, CacheRecord> = serde_json::from_slice(&bytes)
                .map_err(|e| StoreError::from_io("parse", &path, io::Error::other(e)))?;
            Ok(by_dir
                .into_iter()
                .filter_map(|(dir, r)| CacheKey::from_dir_name(&dir).map(|k| (k, r)))
                .collect())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(StoreError::from_io("read", &path, e)),
    }
}

fn views(root: &Path, caches: &BTreeMap<CacheKey, CacheRecord>) -> Vec<CacheView> {
    caches
        .iter()
        .map(|(key, r)| {
            let image = root.join(key.dir_name()).join(IMAGE);
            CacheView {
                cache: key.to_string(),
                scope: key.scope.to_string(),
                max_size: r.max_size,
                bytes: allocated(&image),
                last_used: r.last_used,
                mounted_by: r
                    .pins
                    .iter()
                    .map(|p| p.pod.clone().unwrap_or_else(|| p.volume_id.clone()))
                    .collect(),
                image,
            }
        })
        .collect()
}

/// The scope a volume's namespace and `scope` attribute give.
pub fn scope_of(
    namespace: &str,
    node_wide: bool,
) -> Result<CacheScope, modelcache_core::repo::InvalidInput> {
    if node_wide {
        Ok(CacheScope::Node)
    } else {
        CacheScope::namespace(namespace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelcache_core::cache::CacheName;

    fn key(ns: &str, name: &str) -> CacheKey {
        CacheKey {
            scope: CacheScope::namespace(ns).unwrap(),
            name: CacheName::parse(name).unwrap(),
        }
    }

    fn pin(volume: &str) -> CachePin {
        CachePin {
            volume_id: volume.into(),
            target_path: format!("/pods/{volume}/mount"),
            pod: Some(format!("ns/{volume}")),
            pinned_at: unix(SystemTime::now()),
        }
    }

    fn caches(dir: &Path) -> Caches {
        Caches::open(dir, CacheLimits::default(), Box::new(Mke2fs)).unwrap()
    }

    #[test]
    fn a_cache_is_a_sparse_formatted_image_pinned_by_its_volumes() {
        let dir = tempfile::tempdir().unwrap();
        let c = caches(dir.path());
        let k = key("team-a", "vllm");
        let e = c.ensure(&k, Some(64 << 20), pin("v1")).unwrap();
        assert!(e.created);
        assert_eq!(std::fs::metadata(&e.image).unwrap().len(), 64 << 20);
        // Sparse: far less on disk than its size.
        assert!(allocated(&e.image) < 32 << 20, "{}", allocated(&e.image));
        assert!(e.mount_dir.is_dir());
        // A second volume shares it, and keeps the size it was made with.
        let again = c.ensure(&k, Some(1 << 30), pin("v2")).unwrap();
        assert!(!again.created);
        assert_eq!((again.image, again.max_size), (e.image.clone(), 64 << 20));
        assert_eq!(c.list()[0].mounted_by, ["ns/v1", "ns/v2"]);
        assert!(c.idle().is_empty());
        // Pinned: not removed.
        assert_eq!(c.remove_if_idle(&k).unwrap(), None);
        assert_eq!(c.unpin("v1", "/pods/v1/mount").unwrap(), Some(k.clone()));
        assert_eq!(c.unpin("v1", "/pods/v1/mount").unwrap(), None);
        assert_eq!(c.remove_if_idle(&k).unwrap(), None);
        assert_eq!(c.idle_bytes(), 0, "mounted: nothing to reclaim");
        c.unpin("v2", "/pods/v2/mount").unwrap();
        assert_eq!(c.idle().len(), 1);
        assert_eq!(c.idle_bytes(), allocated(&e.image));
        assert!(c.idle_bytes() > 0);
        // A restart remembers the cache.
        drop(c);
        let c = caches(dir.path());
        assert_eq!(c.list().len(), 1);
        assert!(c.remove_if_idle(&k).unwrap().is_some());
        assert!(!e.image.exists() && !e.mount_dir.exists());
        assert!(c.list().is_empty());
    }

    #[test]
    fn sizes_outside_the_limits_are_refused_and_nothing_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let c = caches(dir.path());
        c.set_limits(CacheLimits {
            default_size: 32 << 20,
            max_size: 1 << 30,
        });
        for asked in [0, 1 << 20, (1 << 30) + 1, u64::MAX] {
            let e = c.ensure(&key("a", "x"), Some(asked), pin("v")).unwrap_err();
            assert!(matches!(e, CacheError::Size { .. }), "{e}");
        }
        assert!(c.list().is_empty());
        assert_eq!(
            c.ensure(&key("a", "x"), None, pin("v")).unwrap().max_size,
            32 << 20
        );
    }

    #[test]
    fn idle_caches_go_least_recently_used_first_and_stale_pins_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let c = caches(dir.path());
        for (name, last) in [("b", 20), ("a", 30), ("c", 10)] {
            let k = key("ns", name);
            c.ensure(&k, Some(MIN_CACHE_BYTES), pin(name)).unwrap();
            c.unpin(name, &format!("/pods/{name}/mount")).unwrap();
            c.state
                .lock()
                .unwrap()
                .caches
                .get_mut(&k)
                .unwrap()
                .last_used = last;
        }
        let order: Vec<String> = c.idle().iter().map(|i| i.key.to_string()).collect();
        assert_eq!(order, ["ns/c", "ns/b", "ns/a"]);
        // A pin whose target is not mounted goes once it is old enough; a mounted one stays.
        let mut old = pin("gone");
        old.pinned_at = 0;
        c.ensure(&key("ns", "a"), None, old).unwrap();
        let mut mounted = pin("here");
        mounted.pinned_at = 0;
        c.ensure(&key("ns", "b"), None, mounted).unwrap();
        let points: HashSet<PathBuf> = [PathBuf::from("/pods/here/mount")].into();
        let now = unix(SystemTime::now());
        assert_eq!(c.reconcile(&points, now).unwrap(), ["gone"]);
        let order: Vec<String> = c.idle().iter().map(|i| i.key.to_string()).collect();
        assert_eq!(order, ["ns/c", "ns/a"]);
    }

    #[test]
    fn a_failed_format_leaves_nothing() {
        #[derive(Debug)]
        struct Broken;
        impl Format for Broken {
            fn format(&self, _: &Path) -> io::Result<()> {
                Err(io::Error::other("no mke2fs"))
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let c = Caches::open(dir.path(), CacheLimits::default(), Box::new(Broken)).unwrap();
        let e = c.ensure(&key("a", "x"), None, pin("v")).unwrap_err();
        assert!(e.to_string().contains("no mke2fs"), "{e}");
        assert!(c.list().is_empty());
        let d = dir.path().join("caches/ns.a.x");
        assert!(!d.join(IMAGE).exists() && !d.join(".image.ext4.tmp").exists());
    }
}
