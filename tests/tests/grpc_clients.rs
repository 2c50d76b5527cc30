//! Other gRPC clients than tonic's: grpcio (Python), which from 1.85 sends the unix socket's
//! path, percent-encoded, as `:authority`. The plugin's and the agent's sockets must answer it.
//! Real processes, real sockets; needs root (the node) and grpcio (tests/requirements.txt).

use modelcache_tests::models::{generate_model, run_python};
use modelcache_tests::node::{Hub, LocalNode};

/// Calls each method with an empty request, three times (the later calls use the client's
/// HPACK table), and prints the answers' sizes.
const CALLS: &str = r#"
import os, grpc
print(grpc.__version__)
for sock, method in [(os.environ["CSI_SOCK"], "/csi.v1.Identity/GetPluginInfo"),
                     (os.environ["CSI_SOCK"], "/csi.v1.Node/NodeGetInfo"),
                     (os.environ["AGENT_SOCK"], "/modelcache.v1.Agent/List")]:
    with grpc.insecure_channel("unix://" + sock) as ch:
        call = ch.unary_unary(method, request_serializer=lambda x: x,
                              response_deserializer=lambda b: b)
        for _ in range(3):
            print(method, len(call(b"", timeout=10)))
"#;

#[tokio::test(flavor = "multi_thread")]
async fn grpcio_clients_reach_the_plugin_and_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let hub_root = dir.path().join("hub");
    generate_model(&hub_root.join("models/grpc/tiny"), 16 << 10).unwrap();
    let workdir = dir.path().join("node");
    let mut node = LocalNode::start(&workdir, Hub::Serve(hub_root, vec![]), 30).unwrap();
    node.wait_ready().await.unwrap();
    let (csi, agent) = (node.csi_socket(), workdir.join("agent.sock"));
    let out = run_python(CALLS, &[("CSI_SOCK", &csi), ("AGENT_SOCK", &agent)]).unwrap();
    let mut lines = out.lines();
    let version = lines.next().unwrap();
    let minor: u32 = version.split('.').nth(1).unwrap().parse().unwrap();
    assert!(
        minor >= 85,
        "grpcio {version} does not send the path as :authority"
    );
    let answers: Vec<&str> = lines.collect();
    assert_eq!(answers.len(), 9, "{out}");
    assert!(
        answers[0].starts_with("/csi.v1.Identity/GetPluginInfo "),
        "{out}"
    );
    assert!(node.stop());
}
