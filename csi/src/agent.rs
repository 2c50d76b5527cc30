//! The plugin's view of the node agent: ensure a model, pin and unpin it for a volume. Behind a
//! trait so the node service's tests run without an agent; [`AgentClient`] is the real one, gRPC
//! over the agent's unix socket.

use crate::attributes::{CacheAttributes, VolumeAttributes};
use modelcache_core::wire::{layout_to_proto, model_to_proto};
use modelcache_proto::agent_v1 as pb;
use pb::agent_client::AgentClient as GrpcClient;
use std::path::PathBuf;
use std::time::Duration;
use tonic::Status;
use tonic::transport::Channel;

/// Time an Ensure call may take beyond the wait it asks for (resolving the revision first).
pub const ENSURE_MARGIN: Duration = Duration::from_secs(15);

/// What the agent says of a model.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// In the store.
    Ready {
        /// The snapshot directory.
        path: PathBuf,
        /// The resolved commit.
        commit: String,
    },
    /// Still downloading.
    Fetching(pb::Fetching),
}

/// The agent operations the node service uses.
#[tonic::async_trait]
pub trait ModelAgent: Send + Sync + 'static {
    /// Makes the volume's model present in its layout, waiting up to `wait`.
    async fn ensure(
        &self,
        volume: &VolumeAttributes,
        token: Option<String>,
        wait: Duration,
    ) -> Result<Answer, Status>;
    /// Pins the volume's snapshot at `commit`.
    async fn pin(
        &self,
        volume_id: &str,
        volume: &VolumeAttributes,
        commit: &str,
        target: &str,
    ) -> Result<(), Status>;
    /// Makes the volume's cache present and pins it at `target`: its image and mount point.
    async fn ensure_cache(
        &self,
        volume_id: &str,
        cache: &CacheAttributes,
        target: &str,
    ) -> Result<pb::EnsureCacheResponse, Status>;
    /// Releases a volume's pin at `target`.
    async fn unpin(&self, volume_id: &str, target: &str) -> Result<(), Status>;
    /// The volume's pin at `target`, with the store directories a mount of it shows.
    async fn get_pin(&self, volume_id: &str, target: &str) -> Result<Option<pb::PinInfo>, Status>;
    /// Succeeds when the agent answers.
    async fn ready(&self) -> Result<(), Status>;
}

/// The agent over gRPC.
#[derive(Debug, Clone)]
pub struct AgentClient {
    client: GrpcClient<Channel>,
}

impl AgentClient {
    /// A client of the agent at `socket`; connects lazily and reconnects after agent restarts.
    pub fn new(socket: &std::path::Path) -> Self {
        AgentClient {
            client: GrpcClient::new(modelcache_core::transport::connect_unix(socket)),
        }
    }
}

fn with_timeout<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(timeout);
    req
}

#[tonic::async_trait]
impl ModelAgent for AgentClient {
    async fn ensure(
        &self,
        volume: &VolumeAttributes,
        token: Option<String>,
        wait: Duration,
    ) -> Result<Answer, Status> {
        let req = pb::EnsureRequest {
            model: Some(model_to_proto(&volume.model, &volume.filter)),
            layout: layout_to_proto(volume.layout) as i32,
            wait_ms: u32::try_from(wait.as_millis()).unwrap_or(u32::MAX),
            token: token.unwrap_or_default(),
            pod: volume.pod.clone().unwrap_or_default(),
            pod_uid: volume.pod_uid.clone().unwrap_or_default(),
        };
        // Resolving the revision happens before the wait; give it some room, but keep the whole
        // call well inside kubelet's 2-minute operation timeout: past the deadline the call fails
        // with DEADLINE_EXCEEDED, which kubelet retries, and a fetch already started goes on.
        let resp = self
            .client
            .clone()
            .ensure(with_timeout(req, wait + ENSURE_MARGIN))
            .await?
            .into_inner();
        match resp.state {
            Some(pb::ensure_response::State::Ready(r)) => Ok(Answer::Ready {
                path: PathBuf::from(r.snapshot_path),
                commit: r.commit,
            }),
            Some(pb::ensure_response::State::Fetching(f)) => Ok(Answer::Fetching(f)),
            None => Err(Status::internal("agent answered Ensure without a state")),
        }
    }

    async fn pin(
        &self,
        volume_id: &str,
        volume: &VolumeAttributes,
        commit: &str,
        target: &str,
    ) -> Result<(), Status> {
        let req = pb::PinRequest {
            volume_id: volume_id.to_owned(),
            model: Some(model_to_proto(&volume.model, &volume.filter)),
            commit: commit.to_owned(),
            pod: volume.pod.clone().unwrap_or_default(),
            target_path: target.to_owned(),
        };
        self.client
            .clone()
            .pin(with_timeout(req, Duration::from_secs(30)))
            .await?;
        Ok(())
    }

    async fn ensure_cache(
        &self,
        volume_id: &str,
        cache: &CacheAttributes,
        target: &str,
    ) -> Result<pb::EnsureCacheResponse, Status> {
        let req = pb::EnsureCacheRequest {
            name: cache.name.to_string(),
            namespace: if cache.node_wide {
                String::new()
            } else {
                cache.namespace.clone()
            },
            node_wide: cache.node_wide,
            max_size: cache.max_size.unwrap_or(0),
            volume_id: volume_id.to_owned(),
            target_path: target.to_owned(),
            pod: cache.pod.clone().unwrap_or_default(),
            pod_uid: cache.pod_uid.clone().unwrap_or_default(),
        };
        // Formatting a new image takes well under a second.
        let resp = self
            .client
            .clone()
            .ensure_cache(with_timeout(req, Duration::from_secs(60)))
            .await?;
        Ok(resp.into_inner())
    }

    async fn unpin(&self, volume_id: &str, target: &str) -> Result<(), Status> {
        let req = pb::UnpinRequest {
            volume_id: volume_id.to_owned(),
            target_path: target.to_owned(),
        };
        self.client
            .clone()
            .unpin(with_timeout(req, Duration::from_secs(30)))
            .await?;
        Ok(())
    }

    async fn get_pin(&self, volume_id: &str, target: &str) -> Result<Option<pb::PinInfo>, Status> {
        let req = pb::GetPinRequest {
            volume_id: volume_id.to_owned(),
            target_path: target.to_owned(),
        };
        let resp = self
            .client
            .clone()
            .get_pin(with_timeout(req, Duration::from_secs(30)))
            .await?;
        Ok(resp.into_inner().pin)
    }

    async fn ready(&self) -> Result<(), Status> {
        self.client
            .clone()
            .list(with_timeout(pb::ListRequest {}, Duration::from_secs(5)))
            .await?;
        Ok(())
    }
}
