//! CSI Controller, for StorageClass-backed PVCs (and generic ephemeral volumes) through
//! external-provisioner. Stateless: a modelcache volume is its attributes, so CreateVolume
//! validates the StorageClass parameters and returns them as the volume context, with the
//! request name as the volume id; the node plugin does the real work at publish time.

use crate::attributes::VolumeAttributes;
use crate::capability;
use crate::error::{Error, Result};
use modelcache_proto::csi_v1 as csi;
use tonic::{Request, Response, Status};

/// The Controller service.
#[derive(Debug, Default, Clone, Copy)]
pub struct ControllerService;

impl ControllerService {
    /// CreateVolume's logic.
    pub fn create(&self, req: &csi::CreateVolumeRequest) -> Result<csi::Volume> {
        if req.name.is_empty() {
            return Err(Error::InvalidArgument("name is required".into()));
        }
        capability::check_all("volume_capabilities", &req.volume_capabilities, true)?;
        VolumeAttributes::parse(&req.parameters)?;
        Ok(csi::Volume {
            capacity_bytes: 0,
            volume_id: req.name.clone(),
            volume_context: req.parameters.clone(),
        })
    }

    /// ValidateVolumeCapabilities' logic: confirmed when the context and every capability are
    /// supported, otherwise a message saying why (not an error, as the spec asks).
    pub fn validate(
        &self,
        req: &csi::ValidateVolumeCapabilitiesRequest,
    ) -> Result<csi::ValidateVolumeCapabilitiesResponse> {
        if req.volume_id.is_empty() {
            return Err(Error::InvalidArgument("volume_id is required".into()));
        }
        if req.volume_capabilities.is_empty() {
            return Err(Error::InvalidArgument(
                "volume_capabilities is required".into(),
            ));
        }
        let verdict = VolumeAttributes::parse(&req.volume_context).and_then(|_| {
            capability::check_all("volume_capabilities", &req.volume_capabilities, true)
        });
        Ok(match verdict {
            Ok(()) => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                    volume_context: req.volume_context.clone(),
                    volume_capabilities: req.volume_capabilities.clone(),
                    parameters: req.parameters.clone(),
                }),
                message: String::new(),
            },
            Err(e) => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: e.to_string(),
            },
        })
    }
}

#[tonic::async_trait]
impl csi::controller_server::Controller for ControllerService {
    async fn create_volume(
        &self,
        req: Request<csi::CreateVolumeRequest>,
    ) -> std::result::Result<Response<csi::CreateVolumeResponse>, Status> {
        let req = req.into_inner();
        let volume = self.create(&req).map_err(|e| {
            tracing::warn!(volume.name = %req.name, error = %e, "CreateVolume refused");
            Status::from(e)
        })?;
        tracing::info!(volume.id = %volume.volume_id, model.repo = req.parameters.get("model").or(req.parameters.get("dataset")).map(String::as_str).unwrap_or(""), "volume created");
        Ok(Response::new(csi::CreateVolumeResponse {
            volume: Some(volume),
        }))
    }

    async fn delete_volume(
        &self,
        req: Request<csi::DeleteVolumeRequest>,
    ) -> std::result::Result<Response<csi::DeleteVolumeResponse>, Status> {
        let req = req.into_inner();
        if req.volume_id.is_empty() {
            return Err(Error::InvalidArgument("volume_id is required".into()).into());
        }
        // Nothing to free: the store's snapshots are reclaimed by eviction, not per volume.
        tracing::info!(volume.id = %req.volume_id, "volume deleted");
        Ok(Response::new(csi::DeleteVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> std::result::Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        Ok(Response::new(self.validate(&req.into_inner())?))
    }

    async fn controller_get_capabilities(
        &self,
        _req: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> std::result::Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        use csi::controller_service_capability::{Rpc, Type, rpc::Type as RpcType};
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse {
            capabilities: vec![csi::ControllerServiceCapability {
                r#type: Some(Type::Rpc(Rpc {
                    r#type: RpcType::CreateDeleteVolume as i32,
                })),
            }],
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use csi::volume_capability::{AccessMode, AccessType, MountVolume, access_mode::Mode};
    use std::collections::HashMap;

    fn rox() -> csi::VolumeCapability {
        csi::VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume::default())),
            access_mode: Some(AccessMode {
                mode: Mode::MultiNodeReaderOnly as i32,
            }),
        }
    }

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    #[test]
    fn create_is_deterministic_and_validates() {
        let c = ControllerService;
        let req = csi::CreateVolumeRequest {
            name: "pvc-1234".into(),
            volume_capabilities: vec![rox()],
            parameters: params(&[("model", "org/m"), ("revision", "v1")]),
            ..Default::default()
        };
        let v = c.create(&req).unwrap();
        assert_eq!(v.volume_id, "pvc-1234");
        assert_eq!(v.capacity_bytes, 0);
        assert_eq!(v.volume_context, req.parameters);
        assert_eq!(c.create(&req).unwrap(), v, "same request, same volume");

        let mut bad = req.clone();
        bad.parameters = params(&[("model", "org/m"), ("revison", "v1")]);
        assert!(
            c.create(&bad)
                .unwrap_err()
                .to_string()
                .contains("\"revison\"")
        );
        let mut rwx = req.clone();
        rwx.volume_capabilities[0].access_mode = Some(AccessMode {
            mode: Mode::MultiNodeMultiWriter as i32,
        });
        assert!(matches!(c.create(&rwx), Err(Error::InvalidArgument(_))));
        let mut unnamed = req;
        unnamed.name.clear();
        assert!(c.create(&unnamed).unwrap_err().to_string().contains("name"));
    }

    #[test]
    fn validate_confirms_or_explains() {
        let c = ControllerService;
        let mut req = csi::ValidateVolumeCapabilitiesRequest {
            volume_id: "pvc-1".into(),
            volume_context: params(&[("model", "org/m")]),
            volume_capabilities: vec![rox()],
            ..Default::default()
        };
        assert!(c.validate(&req).unwrap().confirmed.is_some());
        req.volume_capabilities[0].access_mode = Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        });
        let r = c.validate(&req).unwrap();
        assert!(r.confirmed.is_none());
        assert!(r.message.contains("read-only"), "{}", r.message);
        req.volume_id.clear();
        assert!(c.validate(&req).is_err());
    }
}
