//! The `modelcache-csi` binary on its own: it serves Identity and Node over its unix socket,
//! reports not-ready while the agent is down, and exits cleanly on SIGTERM.

use modelcache_agent::transport::connect_unix;
use modelcache_proto::csi_v1::{
    self as csi, identity_client::IdentityClient, node_client::NodeClient,
};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[tokio::test]
async fn serves_identity_and_node_info_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("csi.sock");
    // A stale socket from a previous run is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let mut child = Command::new(env!("CARGO_BIN_EXE_modelcache-csi"))
        .args([
            "--endpoint",
            &format!("unix://{}", sock.display()),
            "--node-id",
            "gpu-node-7",
            "--agent",
            &format!("unix://{}", dir.path().join("no-agent.sock").display()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let channel = connect_unix(&sock);
    let mut identity = IdentityClient::new(channel.clone());
    let deadline = Instant::now() + Duration::from_secs(20);
    let info = loop {
        match identity.get_plugin_info(csi::GetPluginInfoRequest {}).await {
            Ok(r) => break r.into_inner(),
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("plugin never answered: {e}"),
        }
    };
    assert_eq!(info.name, "csi.modelcache.dev");
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
    let probe = identity
        .probe(csi::ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(false), "ready although no agent runs");

    let mut node = NodeClient::new(channel);
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

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status}");
}
