//! CSI Node: publish a model snapshot read-only at kubelet's target path, and take it away.
//!
//! Publish: validate → one operation per volume → agent Ensure (bounded wait; UNAVAILABLE with
//! progress while fetching) → pin → create target → bind, remount read-only. Pinning before
//! mounting means the snapshot can never be evicted between "ensured" and "mounted".
//! Unpublish: unmount what this volume's pin names → remove the target → unpin; every step is
//! idempotent. Target paths are validated, confined and never followed through a symlink (see
//! [`crate::mounter`]).

use crate::agent::{Answer, ModelAgent};
use crate::attributes::{CacheAttributes, Volume, VolumeAttributes};
use crate::capability;
use crate::error::{Error, Result};
use crate::limiter::VolumeLocks;
use crate::mounter::{DirId, Mounter, TargetState, libc_errno};
use modelcache_proto::agent_v1 as pb;
use modelcache_proto::csi_v1 as csi;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// Secret keys that may hold the hub token for a volume.
const TOKEN_KEYS: &[&str] = &["token", "HF_TOKEN"];

/// How many mounts stacked at one target an unpublish takes down at most.
const MAX_STACKED: usize = 8;

/// Where targets may be, and where they may not.
#[derive(Debug, Clone, Default)]
pub struct Paths {
    /// The store (snapshots the agent names must be inside, targets outside).
    pub store: PathBuf,
    /// When set, every target must be below it (kubelet's root directory).
    pub target_root: Option<PathBuf>,
}

/// The Node service.
pub struct NodeService<M, A> {
    node_id: String,
    mounter: M,
    agent: Arc<A>,
    locks: VolumeLocks,
    publish_wait: Duration,
    paths: Paths,
    /// Held while a cache's image is mounted, bound, unbound or released: a publish and an
    /// unpublish of one cache never interleave.
    cache_mounts: tokio::sync::Mutex<()>,
}

/// An absolute path without `..`, with `.` and repeated separators folded.
pub fn normalize(field: &str, path: &str) -> Result<PathBuf> {
    use std::path::Component;
    if path.is_empty() {
        return Err(Error::InvalidArgument(format!("{field} is required")));
    }
    let p = Path::new(path);
    if !p.is_absolute() || p.components().any(|c| c == Component::ParentDir) {
        return Err(Error::InvalidArgument(format!(
            "{field} {} must be an absolute path without '..'",
            crate::error::clip(path)
        )));
    }
    let normal: PathBuf = p.components().filter(|c| *c != Component::CurDir).collect();
    if normal.parent().is_none() {
        return Err(Error::InvalidArgument(format!("{field} must not be /")));
    }
    Ok(normal)
}

fn mount_error<'a>(
    action: &'static str,
    target: &'a Path,
) -> impl Fn(std::io::Error) -> Error + 'a {
    move |source| {
        if source.raw_os_error() == Some(libc_errno::ELOOP) {
            return Error::InvalidArgument(format!(
                "target_path {}: a component is a symlink; modelcache never follows one",
                target.display()
            ));
        }
        Error::Mount {
            action,
            target: target.display().to_string(),
            source,
        }
    }
}

impl<M: Mounter, A: ModelAgent> NodeService<M, A> {
    /// A node service for `node_id`. Publish waits up to `publish_wait` for a model before
    /// answering UNAVAILABLE with progress (kubelet retries).
    pub fn new(
        node_id: String,
        mounter: M,
        agent: Arc<A>,
        publish_wait: Duration,
        paths: Paths,
    ) -> Self {
        NodeService {
            node_id,
            mounter,
            agent,
            locks: VolumeLocks::default(),
            publish_wait,
            paths,
            cache_mounts: tokio::sync::Mutex::new(()),
        }
    }

    /// The target, normalized: below the target root when one is set, and neither inside the
    /// store nor above it (a mount there would hide the store).
    fn target(&self, path: &str) -> Result<PathBuf> {
        let target = normalize("target_path", path)?;
        if let Some(root) = &self.paths.target_root
            && (!target.starts_with(root) || target == *root)
        {
            return Err(Error::InvalidArgument(format!(
                "target_path {} is not below kubelet's directory {}",
                target.display(),
                root.display()
            )));
        }
        let store = &self.paths.store;
        if target.starts_with(store) || store.starts_with(&target) {
            return Err(Error::InvalidArgument(format!(
                "target_path {} overlaps the store {}; a volume cannot be mounted there",
                target.display(),
                store.display()
            )));
        }
        Ok(target)
    }

    /// The store directory the agent named, refused when it is not in the store.
    fn source(&self, path: &Path) -> Result<PathBuf> {
        let text = path.to_string_lossy();
        match normalize("snapshot_path", &text) {
            Ok(p) if p.starts_with(&self.paths.store) && p != self.paths.store => Ok(p),
            _ => Err(Error::BadAnswer(format!(
                "the agent named {} to mount, which is not in the store {}",
                path.display(),
                self.paths.store.display()
            ))),
        }
    }

    /// Runs mount-table and mount calls on the blocking pool, never on the async workers.
    async fn blocking<T: Send + 'static>(&self, f: impl FnOnce(&M) -> T + Send + 'static) -> T {
        let mounter = self.mounter.clone();
        tokio::task::spawn_blocking(move || f(&mounter))
            .await
            .expect("mount calls do not panic")
    }

    async fn inspect(&self, target: &Path) -> Result<TargetState> {
        let t = target.to_path_buf();
        self.blocking(move |m| m.inspect(&t))
            .await
            .map_err(mount_error("inspect", target))
    }

    /// What `target` shows when something is mounted there; INVALID_ARGUMENT when it is not a
    /// directory (a file or a symlink, which modelcache never follows).
    async fn mounted_at(&self, target: &Path) -> Result<Option<DirId>> {
        match self.inspect(target).await? {
            TargetState::Other => Err(Error::InvalidArgument(format!(
                "target_path {} exists and is not a directory (a file or a symlink, which \
                 modelcache never follows)",
                target.display()
            ))),
            TargetState::Mounted(shown) => Ok(Some(shown)),
            TargetState::Missing | TargetState::Dir => Ok(None),
        }
    }

    /// The volume's pin at `target`, if the agent has one.
    async fn pin_at(&self, volume_id: &str, target: &Path) -> Result<Option<pb::PinInfo>> {
        self.agent
            .get_pin(volume_id, &target.display().to_string())
            .await
            .map_err(|status| Error::Agent {
                action: "get pin",
                status,
            })
    }

    /// True when the mount showing `shown` is what `pin` names.
    async fn shows_pin(&self, pin: &pb::PinInfo, shown: DirId) -> bool {
        // A pin whose snapshot left the store (it cannot, while pinned, but a store moved by
        // hand could) still names this target: the mount there is the volume's.
        let paths = pin.paths.clone();
        paths.is_empty()
            || self
                .blocking(move |m| {
                    paths
                        .iter()
                        .any(|p| m.dir_id(Path::new(p)).ok() == Some(shown))
                })
                .await
    }

    /// NodePublishVolume's logic.
    pub async fn publish(&self, mut req: csi::NodePublishVolumeRequest) -> Result<()> {
        if req.volume_id.is_empty() {
            return Err(Error::InvalidArgument("volume_id is required".into()));
        }
        let target = self.target(&req.target_path)?;
        capability::check("volume_capability", req.volume_capability.as_ref())?;
        // Bounded, but still CPU work a pod spec chooses: off the async workers.
        let ctx = std::mem::take(&mut req.volume_context);
        let attrs = match tokio::task::spawn_blocking(move || Volume::parse(&ctx, true))
            .await
            .expect("attribute parsing does not panic")?
        {
            Volume::Model(attrs) => attrs,
            Volume::Cache(cache) => return self.publish_cache(&req, &target, &cache).await,
        };
        let token = TOKEN_KEYS
            .iter()
            .find_map(|k| req.secrets.get(*k))
            .filter(|t| !t.trim().is_empty())
            .cloned();
        let _guard = self
            .locks
            .try_lock(&req.volume_id)
            .ok_or_else(|| Error::Busy(req.volume_id.clone()))?;
        if req.readonly {
            tracing::debug!("readonly requested; every modelcache mount is read-only anyway");
        }
        let model = &attrs.model;
        let mounted = self.mounted_at(&target).await?;
        if let Some(shown) = mounted
            && let Some(pin) = self.pin_at(&req.volume_id, &target).await?
            && pin_matches(&pin, &attrs)
            && self.shows_pin(&pin, shown).await
        {
            // A retry of a publish that succeeded, even if the revision has moved since: the
            // volume keeps the snapshot it was published with.
            tracing::info!(model.commit = %pin.commit, "already published");
            return Ok(());
        }
        let (snapshot, commit) = match self
            .agent
            .ensure(&attrs, token, self.publish_wait)
            .await
            .map_err(|status| Error::Agent {
                action: "ensure",
                status,
            })? {
            Answer::Ready { path, commit } => (self.source(&path)?, commit),
            Answer::Fetching(f) => return Err(Error::Fetching(fetching_message(model, &f))),
        };
        tracing::Span::current().record("model.commit", commit.as_str());
        let target_str = target.display().to_string();
        if let Some(shown) = mounted {
            let snap = snapshot.clone();
            if self.blocking(move |m| m.dir_id(&snap).ok()).await == Some(shown) {
                // Mounted before the pin was recorded: record it, and succeed.
                self.pin(&req.volume_id, &attrs, &commit, &target_str)
                    .await?;
                tracing::info!("already published");
                return Ok(());
            }
            return Err(Error::AlreadyExists(format!(
                "target_path {} is already published with different content than {model}",
                target.display()
            )));
        }
        self.pin(&req.volume_id, &attrs, &commit, &target_str)
            .await?;
        let (source, dest) = (snapshot.clone(), target.clone());
        if let Err(e) = self
            .blocking(move |m| m.bind_read_only(&source, &dest))
            .await
            .map_err(mount_error("bind-mount read-only at", &target))
        {
            if let Err(u) = self.agent.unpin(&req.volume_id, &target_str).await {
                tracing::warn!(error = %u.message(), "unpin after a failed mount failed");
            }
            return Err(e);
        }
        tracing::info!(snapshot = %snapshot.display(), target = %target.display(), pod = attrs.pod.as_deref().unwrap_or(""), "published read-only");
        Ok(())
    }

    /// Mounts a cache's image on its mount point (through the loop device it has, if any).
    async fn mount_image(&self, image: &Path, mnt: &Path) -> Result<()> {
        let (i, m) = (image.to_path_buf(), mnt.to_path_buf());
        self.blocking(move |mounter| mounter.mount_image(&i, &m))
            .await
            .map_err(mount_error("mount the cache image on", mnt))
    }

    /// NodePublishVolume of a cache volume: the agent makes the cache and pins it; its image is
    /// mounted on its mount point in the store (once for all its volumes), which is bound at the
    /// target writable, nosuid, nodev (read-only when the pod asks).
    async fn publish_cache(
        &self,
        req: &csi::NodePublishVolumeRequest,
        target: &Path,
        cache: &CacheAttributes,
    ) -> Result<()> {
        let _guard = self
            .locks
            .try_lock(&req.volume_id)
            .ok_or_else(|| Error::Busy(req.volume_id.clone()))?;
        let target_str = target.display().to_string();
        let mounted = self.mounted_at(target).await?;
        let _mounts = self.cache_mounts.lock().await;
        if let Some(shown) = mounted {
            if let Some(pin) = self.pin_at(&req.volume_id, target).await?
                && pin.cache == cache.key()
                && let Some(mnt) = pin.paths.first()
            {
                let (image, mnt) = (
                    self.source(Path::new(&pin.cache_image))?,
                    self.source(Path::new(mnt))?,
                );
                self.mount_image(&image, &mnt).await?;
                if self.blocking(move |m| m.dir_id(&mnt).ok()).await == Some(shown) {
                    tracing::info!(cache = %cache.key(), "already published");
                    return Ok(());
                }
            }
            return Err(Error::AlreadyExists(format!(
                "target_path {} is already published with something other than cache {}",
                target.display(),
                cache.key()
            )));
        }
        let answer = self
            .agent
            .ensure_cache(&req.volume_id, cache, &target_str)
            .await
            .map_err(|status| Error::Agent {
                action: "ensure the cache",
                status,
            })?;
        let image = self.source(Path::new(&answer.image_path))?;
        let mnt = self.source(Path::new(&answer.mount_path))?;
        let read_only = req.readonly;
        let bound = async {
            self.mount_image(&image, &mnt).await?;
            let (source, dest) = (mnt.clone(), target.to_path_buf());
            self.blocking(move |m| match read_only {
                true => m.bind_read_only(&source, &dest),
                false => m.bind_writable(&source, &dest),
            })
            .await
            .map_err(mount_error("bind-mount the cache at", target))
        }
        .await;
        if let Err(e) = bound {
            if let Err(u) = self.agent.unpin(&req.volume_id, &target_str).await {
                tracing::warn!(error = %u.message(), "unpin after a failed mount failed");
            }
            let m = mnt.clone();
            let _ = self
                .blocking(move |mounter| mounter.release_image(&m))
                .await;
            return Err(e);
        }
        tracing::info!(cache = %cache.key(), bytes = answer.max_size, target = %target.display(), pod = cache.pod.as_deref().unwrap_or(""), "published a cache");
        Ok(())
    }

    async fn pin(
        &self,
        volume_id: &str,
        attrs: &VolumeAttributes,
        commit: &str,
        target: &str,
    ) -> Result<()> {
        self.agent
            .pin(volume_id, attrs, commit, target)
            .await
            .map_err(|status| Error::Agent {
                action: "pin",
                status,
            })
    }

    /// NodeUnpublishVolume's logic. Unmounts only what this volume's pin at this target names;
    /// removes the target only when it is an empty directory; never follows a symlink.
    pub async fn unpublish(&self, req: csi::NodeUnpublishVolumeRequest) -> Result<()> {
        if req.volume_id.is_empty() {
            return Err(Error::InvalidArgument("volume_id is required".into()));
        }
        let target = self.target(&req.target_path)?;
        let _guard = self
            .locks
            .try_lock(&req.volume_id)
            .ok_or_else(|| Error::Busy(req.volume_id.clone()))?;
        let pin = self.pin_at(&req.volume_id, &target).await?;
        // A cache's image must be mounted for its mount to be recognised (after a restart of
        // the plugin it is not); it is released once its last volume has gone.
        let cache = match &pin {
            Some(p) if !p.cache.is_empty() => {
                let mounts = self.cache_mounts.lock().await;
                let mnt = p.paths.first().map(String::as_str).unwrap_or_default();
                let (image, mnt) = (
                    self.source(Path::new(&p.cache_image))?,
                    self.source(Path::new(mnt))?,
                );
                self.mount_image(&image, &mnt).await?;
                Some((mounts, mnt))
            }
            _ => None,
        };
        // Stacked mounts (a crash between two publishes) all go.
        for _ in 0..MAX_STACKED {
            match self.inspect(&target).await? {
                TargetState::Mounted(shown) => {
                    let ours = match &pin {
                        Some(p) => self.shows_pin(p, shown).await,
                        None => false,
                    };
                    if !ours {
                        return Err(Error::NotFound(format!(
                            "volume {} is not published at {}: what is mounted there is not its \
                             snapshot; nothing was unmounted",
                            crate::error::clip(&req.volume_id),
                            target.display()
                        )));
                    }
                    let t = target.clone();
                    self.blocking(move |m| m.unmount(&t))
                        .await
                        .map_err(mount_error("unmount", &target))?;
                }
                TargetState::Dir => {
                    let t = target.clone();
                    match self.blocking(move |m| m.remove_dir(&t)).await {
                        Ok(()) => {}
                        Err(e) if e.raw_os_error() == Some(libc_errno::ENOENT) => {}
                        Err(e) if e.raw_os_error() == Some(libc_errno::ENOTEMPTY) => {
                            tracing::warn!(target = %target.display(), "target is a directory with files modelcache did not put there; left as it is");
                        }
                        Err(e) => return Err(mount_error("remove", &target)(e)),
                    }
                    break;
                }
                TargetState::Other => {
                    tracing::warn!(target = %target.display(), "target is not a directory modelcache made; left as it is");
                    break;
                }
                TargetState::Missing => break,
            }
        }
        // A cache's image is unmounted before its pin goes: the agent may evict a cache the
        // moment no pin holds it, and must never unlink an image still mounted. A failure
        // keeps the pin, and kubelet's retry comes back here.
        let _mounts = match cache {
            Some((mounts, mnt)) => {
                let m = mnt.clone();
                if self
                    .blocking(move |mounter| mounter.release_image(&m))
                    .await
                    .map_err(mount_error("unmount the cache image at", &mnt))?
                {
                    tracing::info!(mnt = %mnt.display(), "the cache's last volume left: image unmounted");
                }
                Some(mounts)
            }
            None => None,
        };
        self.agent
            .unpin(&req.volume_id, &target.display().to_string())
            .await
            .map_err(|status| Error::Agent {
                action: "unpin",
                status,
            })?;
        tracing::info!(target = %target.display(), "unpublished");
        Ok(())
    }
}

/// True when a pin is of the repo and file filter the volume names (its revision may have
/// moved since the pin was made).
fn pin_matches(pin: &pb::PinInfo, attrs: &VolumeAttributes) -> bool {
    pin.kind == modelcache_core::wire::kind_to_proto(attrs.model.kind) as i32
        && pin.repo == attrs.model.repo.as_str()
        && pin.filter == attrs.filter.key().unwrap_or_default()
}

fn fetching_message(
    model: &modelcache_core::repo::ModelRef,
    f: &modelcache_proto::agent_v1::Fetching,
) -> String {
    use modelcache_core::size::Size;
    let pct = if f.bytes_total > 0 {
        f.bytes_done as f64 * 100.0 / f.bytes_total as f64
    } else {
        0.0
    };
    format!(
        "{model} ({}) is still downloading: {} of {} ({pct:.0}%), {} of {} files; kubelet will retry",
        &f.commit[..f.commit.len().min(12)],
        Size(f.bytes_done),
        Size(f.bytes_total),
        f.files_done,
        f.files_total,
    )
}

#[tonic::async_trait]
impl<M: Mounter, A: ModelAgent> csi::node_server::Node for NodeService<M, A> {
    async fn node_publish_volume(
        &self,
        req: Request<csi::NodePublishVolumeRequest>,
    ) -> std::result::Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let req = req.into_inner();
        let span = tracing::info_span!(
            "publish",
            volume.id = %req.volume_id,
            model.repo = req.volume_context.get("model").or(req.volume_context.get("dataset")).map(String::as_str).unwrap_or(""),
            model.commit = tracing::field::Empty
        );
        self.publish(req)
            .instrument(span.clone())
            .await
            .map_err(|e| {
                span.in_scope(|| tracing::warn!(error = %e, "publish failed"));
                Status::from(e)
            })?;
        Ok(Response::new(csi::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> std::result::Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let req = req.into_inner();
        let span = tracing::info_span!("unpublish", volume.id = %req.volume_id);
        self.unpublish(req)
            .instrument(span.clone())
            .await
            .map_err(|e| {
                span.in_scope(|| tracing::warn!(error = %e, "unpublish failed"));
                Status::from(e)
            })?;
        Ok(Response::new(csi::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_capabilities(
        &self,
        _req: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> std::result::Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        // No staging, no stats yet: advertise nothing we do not implement.
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities: vec![],
        }))
    }

    async fn node_get_info(
        &self,
        _req: Request<csi::NodeGetInfoRequest>,
    ) -> std::result::Result<Response<csi::NodeGetInfoResponse>, Status> {
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: None,
        }))
    }
}

#[cfg(test)]
mod tests;
