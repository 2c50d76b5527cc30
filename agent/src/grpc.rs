//! The agent API (`modelcache.v1.Agent`) the CSI node plugin calls: a thin adapter over
//! [`Node`]. Wire messages become domain types here and back, every store or pins call runs on
//! the blocking pool (pins are saved with an fsync, under a lock eviction holds across
//! `remove_dir_all`), and [`From<NodeError> for Status`] is the one map from errors to statuses.

use crate::caches::{CachePin, scope_of};
use crate::events::PodRef;
use crate::node::{Answer, Node, NodeError, VolumeAsk};
use crate::store::unix;
use modelcache_core::cache::{CacheKey, CacheName};
use modelcache_core::repo::{Commit, RepoId, RepoKind};
use modelcache_core::wire::{kind_to_proto, layout_from_proto, model_from_proto};
use modelcache_hub::client::Token;
use modelcache_proto::agent_v1 as pb;
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};

/// The gRPC face of a [`Node`].
#[derive(Clone)]
pub struct AgentService(pub Arc<Node>);

/// The one map from the node's errors to gRPC statuses: the class's code, and the message
/// clipped to what a status carries.
impl From<NodeError> for Status {
    fn from(e: NodeError) -> Self {
        Status::new(
            e.class().code(),
            modelcache_core::repo::clip(&e.to_string()),
        )
    }
}

/// Runs `f` on the blocking pool: store and pins work never holds an async worker.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, NodeError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
        .map_err(Status::from)
}

fn required(field: &'static str, value: &str) -> Result<(), NodeError> {
    if value.is_empty() {
        return Err(NodeError::Missing(field));
    }
    Ok(())
}

fn kind_from_proto(v: i32) -> RepoKind {
    match pb::RepoKind::try_from(v) {
        Ok(pb::RepoKind::Dataset) => RepoKind::Dataset,
        _ => RepoKind::Model,
    }
}

#[tonic::async_trait]
impl pb::agent_server::Agent for AgentService {
    async fn ensure(
        &self,
        req: Request<pb::EnsureRequest>,
    ) -> Result<Response<pb::EnsureResponse>, Status> {
        let req = req.into_inner();
        let (model, filter) = model_from_proto(req.model).map_err(NodeError::from)?;
        let ask = VolumeAsk {
            model,
            filter,
            layout: layout_from_proto(req.layout).map_err(NodeError::from)?,
            token: Token::new(req.token),
            wait: Duration::from_millis(req.wait_ms.into()),
            pod: PodRef::parse(&req.pod, &req.pod_uid),
        };
        let state = match self.0.ensure_volume(ask).await? {
            Answer::Ready {
                path,
                commit,
                bytes,
                files,
            } => pb::ensure_response::State::Ready(pb::Ready {
                snapshot_path: path.display().to_string(),
                commit: commit.into(),
                bytes,
                files,
            }),
            Answer::Fetching { commit, progress } => {
                pb::ensure_response::State::Fetching(pb::Fetching {
                    commit: commit.into(),
                    bytes_done: progress.bytes_done,
                    bytes_total: progress.bytes_total,
                    files_done: progress.files_done,
                    files_total: progress.files_total,
                })
            }
        };
        Ok(Response::new(pb::EnsureResponse { state: Some(state) }))
    }

    async fn pin(&self, req: Request<pb::PinRequest>) -> Result<Response<pb::PinResponse>, Status> {
        let req = req.into_inner();
        let (model, filter) = model_from_proto(req.model).map_err(NodeError::from)?;
        let commit = Commit::parse(&req.commit).map_err(NodeError::from)?;
        required("volume_id", &req.volume_id)?;
        let node = self.0.clone();
        blocking(move || {
            let pod = Some(req.pod.as_str()).filter(|p| !p.is_empty());
            let snap = node.pin(
                &req.volume_id,
                &model,
                &filter,
                &commit,
                &req.target_path,
                pod,
            )?;
            tracing::info!(volume.id = %req.volume_id, model.repo = %snap.repo, model.commit = %snap.commit, pod = pod.unwrap_or(""), "pinned");
            Ok(())
        })
        .await?;
        Ok(Response::new(pb::PinResponse {}))
    }

    async fn unpin(
        &self,
        req: Request<pb::UnpinRequest>,
    ) -> Result<Response<pb::UnpinResponse>, Status> {
        let req = req.into_inner();
        let node = self.0.clone();
        blocking(move || {
            if node.unpin(&req.volume_id, &req.target_path)? {
                tracing::info!(volume.id = %req.volume_id, target = %req.target_path, "unpinned");
            }
            Ok(())
        })
        .await?;
        Ok(Response::new(pb::UnpinResponse {}))
    }

    async fn ensure_cache(
        &self,
        req: Request<pb::EnsureCacheRequest>,
    ) -> Result<Response<pb::EnsureCacheResponse>, Status> {
        let req = req.into_inner();
        required("volume_id", &req.volume_id)?;
        required("target_path", &req.target_path)?;
        let key = CacheKey {
            scope: scope_of(&req.namespace, req.node_wide).map_err(NodeError::from)?,
            name: CacheName::parse(&req.name).map_err(NodeError::from)?,
        };
        let node = self.0.clone();
        let ensured = blocking(move || {
            let pod = PodRef::parse(&req.pod, &req.pod_uid);
            let pin = CachePin {
                volume_id: req.volume_id.clone(),
                target_path: req.target_path.clone(),
                pod: Some(req.pod.clone()).filter(|p| !p.is_empty()),
                pinned_at: unix(std::time::SystemTime::now()),
            };
            let max_size = Some(req.max_size).filter(|s| *s > 0);
            let ensured = node.ensure_cache(&key, max_size, pin, pod.as_ref())?;
            tracing::info!(volume.id = %req.volume_id, cache = %key, bytes = ensured.max_size, created = ensured.created, pod = %req.pod, "cache pinned");
            Ok(ensured)
        })
        .await?;
        Ok(Response::new(pb::EnsureCacheResponse {
            image_path: ensured.image.display().to_string(),
            mount_path: ensured.mount_dir.display().to_string(),
            max_size: ensured.max_size,
        }))
    }

    async fn get_pin(
        &self,
        req: Request<pb::GetPinRequest>,
    ) -> Result<Response<pb::GetPinResponse>, Status> {
        let req = req.into_inner();
        required("volume_id", &req.volume_id)?;
        let node = self.0.clone();
        let pin = blocking(move || Ok(node.get_pin(&req.volume_id, &req.target_path))).await?;
        Ok(Response::new(pb::GetPinResponse {
            pin: pin.map(|p| pb::PinInfo {
                kind: kind_to_proto(p.kind) as i32,
                repo: p.repo,
                commit: p.commit,
                filter: p.filter.unwrap_or_default(),
                paths: p.paths.iter().map(|p| p.display().to_string()).collect(),
                cache: p
                    .cache
                    .as_ref()
                    .map(|(k, _)| k.to_string())
                    .unwrap_or_default(),
                cache_image: p
                    .cache
                    .as_ref()
                    .map(|(_, image)| image.display().to_string())
                    .unwrap_or_default(),
            }),
        }))
    }

    async fn list(
        &self,
        _req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let node = self.0.clone();
        let listed = blocking(move || node.list()).await?;
        let snapshots = listed
            .into_iter()
            .map(|l| pb::SnapshotInfo {
                kind: kind_to_proto(l.snapshot.kind) as i32,
                repo: l.snapshot.repo.to_string(),
                commit: l.snapshot.commit.into(),
                path: l.snapshot.path.display().to_string(),
                bytes: l.bytes,
                files: l.files,
                pinned_by: l.pinned_by,
                filter: l.snapshot.filter.unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(pb::ListResponse { snapshots }))
    }

    async fn remove(
        &self,
        req: Request<pb::RemoveRequest>,
    ) -> Result<Response<pb::RemoveResponse>, Status> {
        let req = req.into_inner();
        let kind = kind_from_proto(req.kind);
        let repo = RepoId::parse(&req.repo).map_err(NodeError::from)?;
        let commit = match req.commit.as_str() {
            "" => None,
            c => Some(Commit::parse(c).map_err(NodeError::from)?),
        };
        let admin = self.0.admin();
        let report = blocking(move || admin.remove(kind, &repo, commit.as_ref())).await?;
        tracing::info!(model.repo = %req.repo, removed = report.removed.len(), bytes_freed = report.bytes_freed, "removed on request");
        Ok(Response::new(report.into()))
    }

    async fn verify(
        &self,
        req: Request<pb::VerifyRequest>,
    ) -> Result<Response<pb::VerifyResponse>, Status> {
        let dry_run = req.into_inner().dry_run;
        let admin = self.0.admin();
        let report = blocking(move || admin.verify(dry_run)).await?;
        Ok(Response::new(report.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evict::Watermarks;
    use crate::fetch::{FetchError, Fetcher};
    use crate::store::StoreError;
    use modelcache_hub::HubError;
    use tokio_util::sync::CancellationToken;

    #[test]
    fn status_codes_are_chosen_on_purpose() {
        let code = |e: NodeError| Status::from(e).code();
        let repo = || "o/r".to_owned();
        let hub = |h: HubError| NodeError::from(FetchError::Hub(h));
        use tonic::Code;
        assert_eq!(code(NodeError::Missing("model")), Code::InvalidArgument);
        assert_eq!(
            code(NodeError::Invalid(RepoId::parse("x").unwrap_err())),
            Code::InvalidArgument
        );
        assert_eq!(
            code(hub(HubError::RepoNotFound {
                kind: "model",
                repo: repo(),
                endpoint: "e".into()
            })),
            Code::NotFound
        );
        assert_eq!(
            code(hub(HubError::Unauthorized {
                repo: repo(),
                status: 401
            })),
            Code::PermissionDenied
        );
        assert_eq!(
            code(hub(HubError::LinkRefused {
                url: "u".into(),
                status: 403
            })),
            Code::Unavailable
        );
        assert_eq!(
            code(hub(HubError::RateLimited {
                repo: repo(),
                retry_after: None
            })),
            Code::Unavailable
        );
        assert_eq!(
            code(hub(HubError::Status {
                url: "u".into(),
                status: 503,
                message: String::new(),
                retry_after: None
            })),
            Code::Unavailable
        );
        assert_eq!(
            code(NodeError::from(FetchError::Integrity {
                path: "p".into(),
                detail: "d".into()
            })),
            Code::DataLoss
        );
        let enospc = StoreError::from_io(
            "write",
            std::path::Path::new("/s"),
            std::io::Error::from_raw_os_error(28),
        );
        assert_eq!(code(NodeError::Store(enospc)), Code::ResourceExhausted);
        assert_eq!(code(NodeError::ShuttingDown), Code::Unavailable);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn pin_refuses_a_missing_volume_id_or_snapshot() {
        use pb::agent_server::Agent;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(crate::store::Store::open(dir.path()).unwrap());
        let hub = modelcache_hub::HubClient::new("http://127.0.0.1:9", &[]).unwrap();
        let api = AgentService(Arc::new(
            Node::new(
                Fetcher::new(hub, store, Default::default()),
                Watermarks::default(),
                Arc::new(crate::mounts::ProcMountTable),
                CancellationToken::new(),
            )
            .unwrap(),
        ));
        let req = |volume_id: &str| pb::PinRequest {
            volume_id: volume_id.into(),
            model: Some(pb::ModelRef {
                repo: "o/r".into(),
                ..Default::default()
            }),
            commit: "a".repeat(40),
            target_path: "/t".into(),
            pod: String::new(),
        };
        let code = |r: Result<Response<pb::PinResponse>, Status>| r.unwrap_err().code();
        assert_eq!(
            code(Agent::pin(&api, Request::new(req(""))).await),
            tonic::Code::InvalidArgument
        );
        let absent = Agent::pin(&api, Request::new(req("vol-1"))).await;
        assert_eq!(code(absent), tonic::Code::FailedPrecondition);
        assert!(
            !dir.path().join("pins.json").exists(),
            "a refused pin wrote nothing"
        );
    }

    /// Eviction holds the pins lock across `remove_dir_all`; a Pin waiting for it must wait on
    /// the blocking pool, not on the async worker every other call needs. On a one-thread
    /// runtime, a timer still fires on time while a Pin waits.
    #[tokio::test(flavor = "current_thread")]
    async fn a_pin_waiting_for_the_pins_lock_leaves_the_async_worker_free() {
        use pb::agent_server::Agent;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(crate::store::Store::open(dir.path()).unwrap());
        let hub = modelcache_hub::HubClient::new("http://127.0.0.1:9", &[]).unwrap();
        let node = Arc::new(
            Node::new(
                Fetcher::new(hub, store, Default::default()),
                Watermarks::default(),
                Arc::new(crate::mounts::ProcMountTable),
                CancellationToken::new(),
            )
            .unwrap(),
        );
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let holder = {
            let node = node.clone();
            std::thread::spawn(move || {
                let _pins = node.pins_lock().lock().unwrap();
                held_tx.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(800));
            })
        };
        held_rx.recv().unwrap();
        let service = AgentService(node);
        let pin = tokio::spawn(async move {
            let req = pb::PinRequest {
                volume_id: "vol".into(),
                model: Some(pb::ModelRef {
                    repo: "o/r".into(),
                    ..Default::default()
                }),
                commit: "a".repeat(40),
                target_path: "/t".into(),
                pod: String::new(),
            };
            service.pin(Request::new(req)).await
        });
        let started = std::time::Instant::now();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let waited = started.elapsed();
        assert!(
            waited < Duration::from_millis(400),
            "a 50 ms timer fired after {waited:?}: the Pin held the async worker"
        );
        holder.join().unwrap();
        // The snapshot is absent: the Pin, once it had the lock, refused.
        let refused = pin.await.unwrap().unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    }
}
