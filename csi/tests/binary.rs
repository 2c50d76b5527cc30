//! The `modelcache-csi` binary on its own, in both modes: it serves over its unix socket, reports
//! not-ready while the agent is down, answers the controller RPCs external-provisioner makes, and
//! exits cleanly on SIGTERM.

use modelcache_core::transport::connect_unix;
use modelcache_proto::csi_v1::{
    self as csi, controller_client::ControllerClient, identity_client::IdentityClient,
    node_client::NodeClient,
};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

struct Plugin {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Plugin {
    /// Starts the binary with `args` plus `--endpoint` and waits until it answers.
    async fn start(args: &[&str]) -> (Plugin, Channel) {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("csi.sock");
        // A stale socket from a previous run is replaced.
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        let child = Command::new(env!("CARGO_BIN_EXE_modelcache-csi"))
            .args(args)
            .args(["--endpoint", &format!("unix://{}", sock.display())])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let channel = connect_unix(&sock);
        let mut identity = IdentityClient::new(channel.clone());
        let deadline = Instant::now() + Duration::from_secs(20);
        while identity
            .get_plugin_info(csi::GetPluginInfoRequest {})
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "plugin never answered");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (Plugin { child, _dir: dir }, channel)
    }

    /// SIGTERM, then the exit status within 10 s.
    fn stop(mut self) -> std::process::ExitStatus {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

async fn plugin_capabilities(channel: &Channel) -> Vec<csi::PluginCapability> {
    IdentityClient::new(channel.clone())
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
}

#[tokio::test]
async fn node_mode_serves_identity_and_node_info_and_stops_on_sigterm() {
    let no_agent = "unix:///nonexistent/modelcache-agent.sock";
    let (plugin, channel) = Plugin::start(&["--node-id", "gpu-node-7", "--agent", no_agent]).await;
    let mut identity = IdentityClient::new(channel.clone());
    let info = identity
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.modelcache.dev");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    let probe = identity
        .probe(csi::ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(false), "ready although no agent runs");

    let mut node = NodeClient::new(channel.clone());
    let ni = node
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ni.node_id, "gpu-node-7");
    let caps = node
        .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        caps.capabilities.is_empty(),
        "advertises {caps:?} it does not implement"
    );
    // The controller is not served here.
    let err = ControllerClient::new(channel.clone())
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    let node_caps = plugin_capabilities(&channel).await;
    drop((identity, node, channel));
    assert!(plugin.stop().success());

    // Every instance gives the same plugin capabilities, whatever its mode.
    let (plugin, channel) = Plugin::start(&["--mode", "controller"]).await;
    assert_eq!(plugin_capabilities(&channel).await, node_caps);
    assert_eq!(node_caps.len(), 1, "{node_caps:?}");
    drop(channel);
    assert!(plugin.stop().success());
}

#[tokio::test]
async fn node_mode_needs_a_node_id() {
    let out = Command::new(env!("CARGO_BIN_EXE_modelcache-csi"))
        .args(["--endpoint", "unix:///tmp/unused.sock"])
        .env_remove("MODELCACHE_NODE_ID")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--node-id"));
}

#[tokio::test]
async fn controller_mode_creates_validates_and_deletes() {
    use csi::volume_capability::{AccessMode, AccessType, MountVolume, access_mode::Mode};
    let (plugin, channel) = Plugin::start(&["--mode", "controller"]).await;
    let mut identity = IdentityClient::new(channel.clone());
    let probe = identity
        .probe(csi::ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true), "the controller needs no agent");
    let mut ctl = ControllerClient::new(channel.clone());
    let caps = ctl
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(caps.capabilities.len(), 1);
    let cap = |mode: Mode| csi::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    };
    let params: std::collections::HashMap<String, String> =
        [("model".to_owned(), "Qwen/Qwen3-0.6B".to_owned())].into();
    let req = csi::CreateVolumeRequest {
        name: "pvc-6f1e".into(),
        volume_capabilities: vec![cap(Mode::MultiNodeReaderOnly)],
        parameters: params.clone(),
        ..Default::default()
    };
    let v = ctl
        .create_volume(req.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert!(v.volume_id.starts_with("pvc-6f1e."), "{}", v.volume_id);
    assert_eq!(v.capacity_bytes, 0);
    let mut read_only = params.clone();
    read_only.insert("csi.modelcache.dev/mount".into(), "read-only".into());
    assert_eq!(v.volume_context, read_only);
    // A claim that says ReadWriteOnce gets the same read-only volume.
    let mut rwo = req.clone();
    rwo.name = "pvc-rwo".into();
    rwo.volume_capabilities = vec![cap(Mode::SingleNodeWriter)];
    let rwo = ctl
        .create_volume(rwo)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(rwo.volume_context, read_only);
    // An id this driver never issued is not found.
    let err = ctl
        .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: "pvc-6f1e".into(),
            volume_capabilities: vec![cap(Mode::MultiNodeReaderOnly)],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    let confirmed = ctl
        .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: v.volume_id.clone(),
            volume_context: v.volume_context.clone(),
            volume_capabilities: vec![cap(Mode::MultiNodeReaderOnly)],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(confirmed.confirmed.is_some(), "{}", confirmed.message);
    for _ in 0..2 {
        ctl.delete_volume(csi::DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    drop((identity, ctl, channel));
    assert!(plugin.stop().success());
}

#[tokio::test]
async fn a_publish_wait_beyond_kubelets_timeout_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_modelcache-csi"))
        .args([
            "--endpoint",
            "unix:///tmp/unused-wait.sock",
            "--node-id",
            "n",
        ])
        .args([
            "--agent",
            "unix:///tmp/unused-agent.sock",
            "--publish-wait-seconds",
            "300",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--publish-wait-seconds 300 is too long"),
        "{err}"
    );
    assert!(
        !std::path::Path::new("/tmp/unused-wait.sock").exists(),
        "it must not start serving"
    );
}

#[test]
fn logs_to_a_file_carry_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("c.sock");
    let log = dir.path().join("plugin.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_modelcache-csi"))
        .args(["--mode", "controller", "--endpoint"])
        .arg(format!("unix://{}", sock.display()))
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&log).unwrap().contains("listening") {
        assert!(Instant::now() < deadline, "the plugin never logged");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains('\u{1b}'),
        "colour codes in a log file:\n{text:?}"
    );
}
