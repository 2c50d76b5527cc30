//! CSI Identity: who the plugin is and whether it can serve.

use crate::agent::ModelAgent;
use modelcache_proto::csi_v1 as csi;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The driver name kubelet and the CSIDriver object know the plugin by.
pub const DRIVER_NAME: &str = "csi.modelcache.dev";

/// The Identity service.
pub struct IdentityService<A> {
    agent: Option<Arc<A>>,
}

impl<A> IdentityService<A> {
    /// Identity answering Probe by asking `agent` (node mode), or always ready when there is
    /// none (controller mode, which needs nothing else to serve).
    pub fn new(agent: Option<Arc<A>>) -> Self {
        IdentityService { agent }
    }
}

#[tonic::async_trait]
impl<A: ModelAgent> csi::identity_server::Identity for IdentityService<A> {
    async fn get_plugin_info(
        &self,
        _req: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: DRIVER_NAME.to_owned(),
            vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _req: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        // The same answer in every mode: the driver has a controller; no topology constraints.
        use csi::plugin_capability::{Service, Type, service::Type as ServiceType};
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities: vec![csi::PluginCapability {
                r#type: Some(Type::Service(Service {
                    r#type: ServiceType::ControllerService as i32,
                })),
            }],
        }))
    }

    async fn probe(
        &self,
        _req: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        let ready = match &self.agent {
            None => true,
            Some(agent) => match agent.ready().await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(error = %e.message(), "probe: the agent does not answer");
                    false
                }
            },
        };
        Ok(Response::new(csi::ProbeResponse { ready: Some(ready) }))
    }
}
