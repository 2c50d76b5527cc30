//! CSI Controller, for StorageClass-backed PVCs (and generic ephemeral volumes) through
//! external-provisioner. A modelcache volume is its attributes, so CreateVolume validates the
//! StorageClass parameters and returns them as the volume context; the node plugin does the real
//! work at publish time.
//!
//! Volume ids are verifiable without state: `<name>.<check>`, where the check is a hash of the
//! name part, so ValidateVolumeCapabilities answers NOT_FOUND for an id this driver never issued.
//! Names longer than [`MAX_NAME_IN_ID`] are replaced by their hash, keeping ids within the CSI
//! spec's 128 bytes. What the controller issued in its lifetime is remembered (bounded) so that
//! a second CreateVolume of a name with other parameters or capacity is ALREADY_EXISTS.

use crate::attributes::{READ_ONLY_KEY, Volume};
use crate::capability;
use crate::error::{Error, Result};
use modelcache_proto::csi_v1 as csi;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;
use tonic::{Request, Response, Status};

/// Longest volume name kept as it is in the volume id.
pub const MAX_NAME_IN_ID: usize = 100;

/// How many issued volumes the controller remembers, to refuse a name reused differently.
const REMEMBERED: usize = 100_000;

/// The check part of an id.
fn check(body: &str) -> String {
    let digest = Sha256::digest(format!("csi.modelcache.dev volume\0{body}").as_bytes());
    hex::encode(&digest[..8])
}

/// The volume id for a CreateVolume name.
pub fn volume_id(name: &str) -> String {
    let body = if name.len() <= MAX_NAME_IN_ID && !name.contains('.') {
        name.to_owned()
    } else {
        format!("h-{}", hex::encode(&Sha256::digest(name.as_bytes())[..24]))
    };
    format!("{body}.{}", check(&body))
}

/// True when this driver issued `id`.
pub fn is_issued(id: &str) -> bool {
    id.rsplit_once('.')
        .is_some_and(|(body, tag)| !body.is_empty() && tag == check(body))
}

/// What a volume was created with, to compare a repeated CreateVolume against.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Issued {
    parameters: Vec<(String, String)>,
    capacity: Option<(i64, i64)>,
}

/// The Controller service.
#[derive(Debug, Default)]
pub struct ControllerService {
    issued: Mutex<HashMap<String, Issued>>,
}

impl ControllerService {
    /// CreateVolume's logic.
    pub fn create(&self, req: &csi::CreateVolumeRequest) -> Result<csi::Volume> {
        if req.name.is_empty() {
            return Err(Error::InvalidArgument("name is required".into()));
        }
        capability::check_all("volume_capabilities", &req.volume_capabilities)?;
        let volume = Volume::parse(&req.parameters, false)?;
        let mut parameters: Vec<(String, String)> = req
            .parameters
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        parameters.sort();
        let issued = Issued {
            parameters,
            capacity: req
                .capacity_range
                .as_ref()
                .map(|c| (c.required_bytes, c.limit_bytes)),
        };
        let id = volume_id(&req.name);
        let mut known = self.issued.lock().expect("issued lock");
        match known.get(&id) {
            Some(before) if *before != issued => {
                return Err(Error::AlreadyExists(format!(
                    "volume {} exists with other parameters or capacity",
                    crate::error::clip(&req.name)
                )));
            }
            Some(_) => {}
            None => {
                if known.len() >= REMEMBERED {
                    known.clear();
                }
                known.insert(id.clone(), issued);
            }
        }
        let mut context = req.parameters.clone();
        // A model is read-only whatever the claim says; a cache is the one writable volume.
        if matches!(volume, Volume::Model(_)) {
            context.insert(READ_ONLY_KEY.0.into(), READ_ONLY_KEY.1.into());
        }
        Ok(csi::Volume {
            // A model volume has no size of its own to promise; the request's is kept so that
            // Kubernetes shows what the claim asked for.
            capacity_bytes: req
                .capacity_range
                .as_ref()
                .map_or(0, |c| c.required_bytes.max(0)),
            volume_id: id,
            volume_context: context,
        })
    }

    /// DeleteVolume's logic: nothing to free (snapshots are reclaimed by eviction).
    pub fn delete(&self, volume_id: &str) -> Result<()> {
        if volume_id.is_empty() {
            return Err(Error::InvalidArgument("volume_id is required".into()));
        }
        self.issued.lock().expect("issued lock").remove(volume_id);
        Ok(())
    }

    /// ValidateVolumeCapabilities' logic: NOT_FOUND for an id this driver never issued;
    /// confirmed when the context and every capability are supported, otherwise a message
    /// saying why (not an error, as the spec asks).
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
        if !is_issued(&req.volume_id) {
            return Err(Error::NotFound(format!(
                "volume {} was not created by csi.modelcache.dev",
                crate::error::clip(&req.volume_id)
            )));
        }
        let context = || {
            if req.volume_context.is_empty() {
                Ok(())
            } else {
                Volume::parse(&req.volume_context, false).map(drop)
            }
        };
        let verdict = context()
            .and_then(|()| capability::check_all("volume_capabilities", &req.volume_capabilities));
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
        self.delete(&req.volume_id)?;
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

    fn cap(mode: Mode) -> csi::VolumeCapability {
        csi::VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume::default())),
            access_mode: Some(AccessMode { mode: mode as i32 }),
        }
    }

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    fn create_req(name: &str) -> csi::CreateVolumeRequest {
        csi::CreateVolumeRequest {
            name: name.into(),
            volume_capabilities: vec![cap(Mode::MultiNodeReaderOnly)],
            parameters: params(&[("model", "org/m"), ("revision", "v1")]),
            ..Default::default()
        }
    }

    #[test]
    fn a_cache_class_makes_a_writable_volume_the_node_accepts_node_wide() {
        let c = ControllerService::default();
        let mut req = create_req("pvc-cache");
        req.volume_capabilities = vec![cap(Mode::MultiNodeMultiWriter)];
        req.parameters = params(&[("cache", "vllm"), ("scope", "node"), ("maxSize", "20Gi")]);
        let v = c.create(&req).unwrap();
        assert_eq!(v.volume_context.get(READ_ONLY_KEY.0), None);
        // As kubelet publishes a PV: its context, and the pod's keys.
        let mut ctx = v.volume_context.clone();
        ctx.insert("csi.storage.k8s.io/ephemeral".into(), "false".into());
        ctx.insert("csi.storage.k8s.io/pod.namespace".into(), "team-b".into());
        match Volume::parse(&ctx, true).expect("the node accepts it") {
            Volume::Cache(cache) => assert_eq!(cache.key(), "node/vllm"),
            other => panic!("{other:?}"),
        }
        let mut bad = req.clone();
        bad.name = "pvc-bad".into();
        bad.parameters = params(&[("cache", "vllm"), ("scope", "cluster")]);
        assert!(c.create(&bad).unwrap_err().to_string().contains("scope"));
    }

    #[test]
    fn create_is_idempotent_accepts_writer_modes_and_says_read_only() {
        let c = ControllerService::default();
        let req = create_req("pvc-1234");
        let v = c.create(&req).unwrap();
        assert!(v.volume_id.starts_with("pvc-1234."), "{}", v.volume_id);
        assert!(is_issued(&v.volume_id));
        assert_eq!(
            v.volume_context
                .get("csi.modelcache.dev/mount")
                .map(String::as_str),
            Some("read-only")
        );
        crate::attributes::VolumeAttributes::parse(&v.volume_context)
            .expect("the node accepts the context");
        assert_eq!(c.create(&req).unwrap(), v, "same request, same volume");
        let mut rwo = create_req("pvc-rwo");
        rwo.volume_capabilities = vec![cap(Mode::SingleNodeWriter)];
        c.create(&rwo).unwrap();
        let mut bad = create_req("pvc-bad");
        bad.parameters = params(&[("model", "org/m"), ("revison", "v1")]);
        assert!(
            c.create(&bad)
                .unwrap_err()
                .to_string()
                .contains("\"revison\"")
        );
        let mut other = req.clone();
        other.parameters = params(&[("model", "org/other")]);
        assert!(matches!(c.create(&other), Err(Error::AlreadyExists(_))));
        let mut bigger = req.clone();
        bigger.capacity_range = Some(csi::CapacityRange {
            required_bytes: 2 << 30,
            limit_bytes: 0,
        });
        assert!(matches!(c.create(&bigger), Err(Error::AlreadyExists(_))));
        let mut unnamed = req;
        unnamed.name.clear();
        assert!(c.create(&unnamed).unwrap_err().to_string().contains("name"));
    }

    #[test]
    fn ids_are_verifiable_and_short() {
        let long = "n".repeat(128);
        for name in ["pvc-1", "a.b", long.as_str()] {
            let id = volume_id(name);
            assert!(is_issued(&id), "{id}");
            assert!(id.len() <= 128, "{} bytes", id.len());
            assert_eq!(volume_id(name), id, "deterministic");
        }
        assert_ne!(volume_id("a.b"), volume_id("a.c"));
        for forged in ["pvc-1", "pvc-1.0000000000000000", "", ".", "some-vol-id"] {
            assert!(!is_issued(forged), "{forged}");
        }
    }

    #[test]
    fn validate_confirms_only_issued_ids() {
        let c = ControllerService::default();
        let v = c.create(&create_req("pvc-1")).unwrap();
        let mut req = csi::ValidateVolumeCapabilitiesRequest {
            volume_id: v.volume_id.clone(),
            volume_context: v.volume_context.clone(),
            volume_capabilities: vec![cap(Mode::SingleNodeWriter)],
            ..Default::default()
        };
        assert!(c.validate(&req).unwrap().confirmed.is_some());
        req.volume_context.clear();
        assert!(
            c.validate(&req).unwrap().confirmed.is_some(),
            "context is optional"
        );
        req.volume_context = params(&[("model", "../etc")]);
        let r = c.validate(&req).unwrap();
        assert!(r.confirmed.is_none());
        assert!(r.message.contains("\"model\""), "{}", r.message);
        req.volume_id = "never-issued".into();
        assert!(matches!(c.validate(&req), Err(Error::NotFound(_))));
        req.volume_id.clear();
        assert!(matches!(c.validate(&req), Err(Error::InvalidArgument(_))));
    }
}
