//! CSI Node: publish a model snapshot read-only at kubelet's target path, and take it away.
//!
//! Publish: validate → one operation per volume → agent Ensure (bounded wait; UNAVAILABLE with
//! progress while fetching) → pin → create target → bind, remount read-only. Pinning before
//! mounting means the snapshot can never be evicted between "ensured" and "mounted".
//! Unpublish: unmount if mounted → remove target → unpin; every step is idempotent.

use crate::agent::{Ensured, ModelAgent};
use crate::attributes::VolumeAttributes;
use crate::capability;
use crate::error::{Error, Result};
use crate::limiter::VolumeLocks;
use crate::mounter::Mounter;
use modelcache_proto::csi_v1 as csi;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// Secret keys that may hold the hub token for a volume.
const TOKEN_KEYS: &[&str] = &["token", "HF_TOKEN"];

/// The Node service.
pub struct NodeService<M, A> {
    node_id: String,
    mounter: M,
    agent: Arc<A>,
    locks: VolumeLocks,
    publish_wait: Duration,
}

impl<M: Mounter, A: ModelAgent> NodeService<M, A> {
    /// A node service for `node_id`. Publish waits up to `publish_wait` for a model before
    /// answering UNAVAILABLE with progress (kubelet retries).
    pub fn new(node_id: String, mounter: M, agent: Arc<A>, publish_wait: Duration) -> Self {
        NodeService {
            node_id,
            mounter,
            agent,
            locks: VolumeLocks::default(),
            publish_wait,
        }
    }

    fn target(path: &str) -> Result<PathBuf> {
        if path.is_empty() {
            return Err(Error::InvalidArgument("target_path is required".into()));
        }
        let p = Path::new(path);
        if !p.is_absolute() || p.components().any(|c| c == std::path::Component::ParentDir) {
            return Err(Error::InvalidArgument(format!(
                "target_path {path:?} must be an absolute path without '..'"
            )));
        }
        Ok(p.to_path_buf())
    }

    /// NodePublishVolume's logic.
    pub async fn publish(&self, req: csi::NodePublishVolumeRequest) -> Result<()> {
        if req.volume_id.is_empty() {
            return Err(Error::InvalidArgument("volume_id is required".into()));
        }
        let target = Self::target(&req.target_path)?;
        capability::check("volume_capability", req.volume_capability.as_ref(), false)?;
        let attrs = VolumeAttributes::parse(&req.volume_context)?;
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
        let (snapshot, commit) = match self
            .agent
            .ensure(&attrs, token, self.publish_wait)
            .await
            .map_err(|status| Error::Agent {
                action: "ensure",
                status,
            })? {
            Ensured::Ready { path, commit } => (path, commit),
            Ensured::Fetching(f) => return Err(Error::Fetching(fetching_message(model, &f))),
        };
        tracing::Span::current().record("model.commit", commit.as_str());

        if self.is_mounted(&target)? {
            if self.mounter.shows(&snapshot, &target) {
                // A retry of a publish that succeeded: make sure the pin is there, and succeed.
                self.pin(&req.volume_id, &attrs, &commit, &req.target_path)
                    .await?;
                tracing::info!("already published");
                return Ok(());
            }
            return Err(Error::AlreadyExists(format!(
                "target_path {} is already published with different content than {model}",
                target.display()
            )));
        }
        self.pin(&req.volume_id, &attrs, &commit, &req.target_path)
            .await?;
        if let Err(e) = self.mount(&snapshot, &target) {
            if let Err(u) = self.agent.unpin(&req.volume_id).await {
                tracing::warn!(error = %u.message(), "unpin after a failed mount failed");
            }
            return Err(e);
        }
        tracing::info!(snapshot = %snapshot.display(), target = %target.display(), pod = attrs.pod.as_deref().unwrap_or(""), "published read-only");
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

    fn is_mounted(&self, target: &Path) -> Result<bool> {
        self.mounter
            .is_mount_point(target)
            .map_err(|source| Error::Mount {
                action: "read the mount table for",
                target: target.display().to_string(),
                source,
            })
    }

    fn mount(&self, snapshot: &Path, target: &Path) -> Result<()> {
        let err = |action, source| Error::Mount {
            action,
            target: target.display().to_string(),
            source,
        };
        std::fs::create_dir_all(target).map_err(|e| err("create", e))?;
        self.mounter
            .bind_read_only(snapshot, target)
            .map_err(|e| err("bind-mount read-only at", e))
    }

    /// NodeUnpublishVolume's logic.
    pub async fn unpublish(&self, req: csi::NodeUnpublishVolumeRequest) -> Result<()> {
        if req.volume_id.is_empty() {
            return Err(Error::InvalidArgument("volume_id is required".into()));
        }
        let target = Self::target(&req.target_path)?;
        let _guard = self
            .locks
            .try_lock(&req.volume_id)
            .ok_or_else(|| Error::Busy(req.volume_id.clone()))?;
        let err = |action, source| Error::Mount {
            action,
            target: target.display().to_string(),
            source,
        };
        // Stacked mounts (a crash between two publishes) all go.
        for _ in 0..8 {
            if !self.is_mounted(&target)? {
                break;
            }
            self.mounter
                .unmount(&target)
                .map_err(|e| err("unmount", e))?;
        }
        match std::fs::remove_dir(&target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err("remove", e)),
        }
        self.agent
            .unpin(&req.volume_id)
            .await
            .map_err(|status| Error::Agent {
                action: "unpin",
                status,
            })?;
        tracing::info!(target = %target.display(), "unpublished");
        Ok(())
    }
}

fn fetching_message(
    model: &modelcache_agent::repo::ModelRef,
    f: &modelcache_proto::agent_v1::Fetching,
) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    let pct = if f.bytes_total > 0 {
        f.bytes_done as f64 * 100.0 / f.bytes_total as f64
    } else {
        0.0
    };
    format!(
        "{model} ({}) is still downloading: {:.1} of {:.1} MiB ({pct:.0}%), {} of {} files; kubelet will retry",
        &f.commit[..f.commit.len().min(12)],
        f.bytes_done as f64 / MIB,
        f.bytes_total as f64 / MIB,
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
