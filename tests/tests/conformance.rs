//! The CSI spec's requirements for every RPC modelcache serves, checked against the real binaries
//! over their unix sockets, the way a conformance suite (csi-sanity) checks a driver: required
//! fields, error codes, idempotency. Needs root (the node side mounts).

use modelcache_core::transport::connect_unix;
use modelcache_proto::csi_v1::{
    self as csi, controller_client::ControllerClient, identity_client::IdentityClient,
};
use modelcache_tests::models::generate_model;
use modelcache_tests::node::{Hub, LocalNode, publish_request};
use modelcache_tests::procs::{Proc, bin, wait_until};
use modelcache_tests::tree::mount_count;
use std::time::Duration;
use tonic::Code;

const TINY: &str = "conformance/tiny";
const OTHER: &str = "conformance/other";

fn rox() -> csi::VolumeCapability {
    use csi::volume_capability::{AccessMode, AccessType, MountVolume, access_mode::Mode};
    csi::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode {
            mode: Mode::MultiNodeReaderOnly as i32,
        }),
    }
}

fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// Identity: a valid name, a version, the same capabilities from every instance, and Probe.
async fn identity(
    identity: &mut IdentityClient<tonic::transport::Channel>,
) -> Vec<csi::PluginCapability> {
    let info = identity
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    // Domain-name notation, 63 characters at most, alphanumeric at both ends.
    assert!(info.name.len() <= 63);
    assert!(
        info.name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    );
    assert!(info.name.starts_with(|c: char| c.is_ascii_alphanumeric()));
    assert!(info.name.ends_with(|c: char| c.is_ascii_alphanumeric()));
    assert!(!info.vendor_version.is_empty());
    identity.probe(csi::ProbeRequest {}).await.unwrap();
    identity
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
}

#[tokio::test(flavor = "multi_thread")]
async fn node_service_follows_the_spec() {
    let dir = tempfile::tempdir().unwrap();
    let hub_root = dir.path().join("hub");
    for repo in [TINY, OTHER] {
        generate_model(&hub_root.join("models").join(repo), 64 << 10).unwrap();
    }
    let mut node =
        LocalNode::start(&dir.path().join("node"), Hub::Serve(hub_root, vec![]), 30).unwrap();
    node.wait_ready().await.unwrap();
    let node_caps = identity(&mut node.identity).await;

    let info = node
        .node
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!info.node_id.is_empty());
    node.node
        .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
        .await
        .unwrap();

    // NodePublishVolume: every required field, INVALID_ARGUMENT when missing.
    let target = node.target("vol-1");
    let good = publish_request("vol-1", &target, &[("model", TINY)], &[]);
    let mut missing = Vec::new();
    let mut r = good.clone();
    r.volume_id.clear();
    missing.push(("volume_id", r));
    let mut r = good.clone();
    r.target_path.clear();
    missing.push(("target_path", r));
    let mut r = good.clone();
    r.volume_capability = None;
    missing.push(("volume_capability", r));
    let mut r = good.clone();
    r.volume_context.clear();
    missing.push(("volume_context", r));
    for (field, req) in missing {
        let err = node.node.node_publish_volume(req).await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{field}: {}",
            err.message()
        );
    }

    // Publish twice with the same arguments: OK both times, one mount.
    assert_eq!(
        code(node.node.node_publish_volume(good.clone()).await),
        Code::Ok
    );
    assert_eq!(
        code(node.node.node_publish_volume(good.clone()).await),
        Code::Ok
    );
    assert_eq!(mount_count(&target), 1);
    // Same target, other content: ALREADY_EXISTS, and the mount is untouched.
    let other = publish_request("vol-1", &target, &[("model", OTHER)], &[]);
    assert_eq!(
        code(node.node.node_publish_volume(other).await),
        Code::AlreadyExists
    );
    assert_eq!(mount_count(&target), 1);

    // NodeUnpublishVolume: required fields, then idempotent.
    let un = csi::NodeUnpublishVolumeRequest {
        volume_id: "vol-1".into(),
        target_path: target.display().to_string(),
    };
    let mut r = un.clone();
    r.volume_id.clear();
    assert_eq!(
        code(node.node.node_unpublish_volume(r).await),
        Code::InvalidArgument
    );
    let mut r = un.clone();
    r.target_path.clear();
    assert_eq!(
        code(node.node.node_unpublish_volume(r).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(node.node.node_unpublish_volume(un.clone()).await),
        Code::Ok
    );
    assert_eq!(mount_count(&target), 0);
    assert_eq!(code(node.node.node_unpublish_volume(un).await), Code::Ok);
    // A volume that was never published unpublishes fine.
    let never = csi::NodeUnpublishVolumeRequest {
        volume_id: "never".into(),
        target_path: node.target("never").display().to_string(),
    };
    assert_eq!(code(node.node.node_unpublish_volume(never).await), Code::Ok);

    // The controller process gives the same plugin capabilities.
    let sock = dir.path().join("controller.sock");
    let endpoint = format!("unix://{}", sock.display());
    let csi_bin = bin("modelcache-csi").unwrap();
    let mut ctl_proc = Proc::start(
        "controller",
        &csi_bin,
        &["--mode", "controller", "--endpoint", &endpoint],
        dir.path(),
    )
    .unwrap();
    wait_until("the controller socket", Duration::from_secs(30), || {
        ctl_proc.check_running()?;
        Ok(sock.exists())
    })
    .unwrap();
    let channel = connect_unix(&sock);
    let ctl_caps = identity(&mut IdentityClient::new(channel.clone())).await;
    assert_eq!(
        ctl_caps, node_caps,
        "plugin capabilities differ between node and controller"
    );
    controller_follows_the_spec(ControllerClient::new(channel)).await;
}

async fn controller_follows_the_spec(mut ctl: ControllerClient<tonic::transport::Channel>) {
    let caps = ctl
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    assert!(!caps.is_empty());
    let params: std::collections::HashMap<String, String> =
        [("model".to_owned(), TINY.to_owned())].into();
    let good = csi::CreateVolumeRequest {
        name: "pvc-conformance".into(),
        volume_capabilities: vec![rox()],
        parameters: params.clone(),
        ..Default::default()
    };
    // Required fields.
    let mut r = good.clone();
    r.name.clear();
    assert_eq!(code(ctl.create_volume(r).await), Code::InvalidArgument);
    let mut r = good.clone();
    r.volume_capabilities.clear();
    assert_eq!(code(ctl.create_volume(r).await), Code::InvalidArgument);
    // Idempotent: the same name gives the same volume.
    let a = ctl
        .create_volume(good.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let b = ctl
        .create_volume(good.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(a, b);
    assert!(!a.volume_id.is_empty());
    // ValidateVolumeCapabilities: required fields; confirmed for what CreateVolume accepted.
    let v = csi::ValidateVolumeCapabilitiesRequest {
        volume_id: a.volume_id.clone(),
        volume_context: a.volume_context.clone(),
        volume_capabilities: vec![rox()],
        ..Default::default()
    };
    let mut r = v.clone();
    r.volume_id.clear();
    assert_eq!(
        code(ctl.validate_volume_capabilities(r).await),
        Code::InvalidArgument
    );
    let mut r = v.clone();
    r.volume_capabilities.clear();
    assert_eq!(
        code(ctl.validate_volume_capabilities(r).await),
        Code::InvalidArgument
    );
    let ok = ctl
        .validate_volume_capabilities(v)
        .await
        .unwrap()
        .into_inner();
    assert!(ok.confirmed.is_some(), "{}", ok.message);
    // DeleteVolume: required field, idempotent, and fine for an unknown id.
    let del = |id: &str| csi::DeleteVolumeRequest {
        volume_id: id.into(),
        ..Default::default()
    };
    assert_eq!(
        code(ctl.delete_volume(del("")).await),
        Code::InvalidArgument
    );
    assert_eq!(code(ctl.delete_volume(del(&a.volume_id)).await), Code::Ok);
    assert_eq!(code(ctl.delete_volume(del(&a.volume_id)).await), Code::Ok);
    assert_eq!(
        code(ctl.delete_volume(del("never-created")).await),
        Code::Ok
    );
}
