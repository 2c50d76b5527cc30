//! The peer tier, with real agents: node A holds a model; node B, finding A by DNS, gets every
//! file from A, verified, and the hub serves B no file (only the revision and the file list).
//! A's peer port refuses requests without the cluster's secret. Real processes on loopback.

use modelcache_tests::models::generate_model;
use modelcache_tests::node::{Hub, LocalNode, publish_request, publish_until_done};
use modelcache_tests::procs::{agent_command, free_port, http_get};
use modelcache_tests::tree::assert_same_tree;

const SECRET: &str = "a-cluster-secret-for-the-test-0123";

/// The hub's count of answers of one purpose.
fn hub_requests(endpoint: &str, purpose: &str) -> u64 {
    let addr = endpoint.trim_start_matches("http://");
    let (status, body) = http_get(addr, modelcache_hub::server::REQUESTS_PATH).unwrap();
    assert_eq!(status, 200, "{body}");
    let counts: serde_json::Value = serde_json::from_str(&body).unwrap();
    counts[purpose].as_u64().unwrap_or(0)
}

fn metric(addr: &str, series: &str) -> u64 {
    let (status, body) = http_get(addr, "/metrics").unwrap();
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{body}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_gets_a_model_from_a_peer_and_the_hub_serves_it_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let hub_root = dir.path().join("hub");
    let model = hub_root.join("models/org/m");
    generate_model(&model, 24 << 20).unwrap();
    let secret = dir.path().join("peer-secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let secret = secret.to_str().unwrap();
    let peer_a = format!("127.0.0.1:{}", free_port().unwrap());
    let metrics_a = format!("127.0.0.1:{}", free_port().unwrap());
    let metrics_b = format!("127.0.0.1:{}", free_port().unwrap());

    let mut a = LocalNode::start_with(
        &dir.path().join("a"),
        Hub::Serve(hub_root, vec![]),
        60,
        &[
            "--peer-listen",
            &peer_a,
            "--peer-token-file",
            secret,
            "--metrics-listen",
            &metrics_a,
        ],
    )
    .unwrap();
    let endpoint = a.hub_endpoint.clone();
    let mut b = LocalNode::start_with(
        &dir.path().join("b"),
        Hub::Remote(endpoint.clone()),
        60,
        &[
            // Found by DNS, as the chart's headless Service finds them: `localhost` resolves to
            // 127.0.0.1, where A listens (and ::1, where nothing does: passed over).
            "--peers-dns",
            &format!("localhost:{}", peer_a.rsplit(':').next().unwrap()),
            "--peer-token-file",
            secret,
            "--metrics-listen",
            &metrics_b,
        ],
    )
    .unwrap();
    a.wait_ready().await.unwrap();
    b.wait_ready().await.unwrap();

    let ta = a.target("vol-a");
    a.publish("vol-a", &ta, &[("model", "org/m")], |_| {})
        .await
        .unwrap();
    let files_before = hub_requests(&endpoint, "file");
    assert!(files_before > 0);

    let tb = b.target("vol-b");
    b.publish("vol-b", &tb, &[("model", "org/m")], |_| {})
        .await
        .unwrap();
    assert_same_tree(&model, &tb);
    assert_eq!(
        hub_requests(&endpoint, "file"),
        files_before,
        "the hub served node B a file"
    );

    // B says where its files came from; A counts what it sent.
    let out = agent_command(&["ls", "--json", "--store", b.store().to_str().unwrap()]).unwrap();
    let inv: serde_json::Value = serde_json::from_str(&out).unwrap();
    let source = inv["snapshots"][0]["source"].as_str().unwrap().to_owned();
    assert!(source.starts_with("peers ("), "{source}");
    let model_bytes: u64 = walk_bytes(&model);
    assert_eq!(
        metric(
            &metrics_b,
            "modelcache_fetched_bytes_total{source=\"peers\"}"
        ),
        model_bytes
    );
    assert_eq!(
        metric(&metrics_a, "modelcache_peer_served_bytes_total"),
        model_bytes
    );

    // A's peer port: nothing without the secret.
    let (status, _) = http_get(&peer_a, &format!("/v1/blobs/sha1-{}", "0".repeat(40))).unwrap();
    assert_eq!(status, 401);

    a.unpublish("vol-a", &ta).await.unwrap();
    b.unpublish("vol-b", &tb).await.unwrap();
}

fn walk_bytes(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let m = e.metadata().unwrap();
        total += if m.is_dir() {
            walk_bytes(&e.path())
        } else {
            m.len()
        };
    }
    total
}

/// The first wave: three nodes start the same model at once. They split it (each gets a share
/// from the hub and the rest from the others), and the hub sends the model once.
#[tokio::test(flavor = "multi_thread")]
async fn nodes_that_start_a_model_at_once_cost_the_hub_one_copy() {
    let dir = tempfile::tempdir().unwrap();
    let hub_root = dir.path().join("hub");
    let model = hub_root.join("models/org/m");
    // Many files, so that each node owns some.
    generate_model(&model, 24 << 20).unwrap();
    for i in 0..12 {
        std::fs::write(
            model.join(format!("shard-{i:02}.bin")),
            vec![i as u8; 1 << 20],
        )
        .unwrap();
    }
    let secret = dir.path().join("peer-secret");
    std::fs::write(&secret, SECRET).unwrap();
    let secret = secret.to_str().unwrap();
    let ports: Vec<u16> = (0..3).map(|_| free_port().unwrap()).collect();
    let url = |p: u16| format!("http://127.0.0.1:{p}");
    let mut nodes: Vec<LocalNode> = Vec::new();
    let mut endpoint: Option<String> = None;
    for (i, &port) in ports.iter().enumerate() {
        let listen = format!("127.0.0.1:{port}");
        let others: Vec<String> = ports
            .iter()
            .filter(|&&p| p != port)
            .map(|&p| url(p))
            .collect();
        let others = others.join(",");
        let hub = match &endpoint {
            None => Hub::Serve(hub_root.clone(), vec![]),
            Some(e) => Hub::Remote(e.clone()),
        };
        let node = LocalNode::start_with(
            &dir.path().join(format!("n{i}")),
            hub,
            60,
            &[
                "--peer-listen",
                &listen,
                "--peers",
                &others,
                "--peer-token-file",
                secret,
            ],
        )
        .unwrap();
        endpoint.get_or_insert(node.hub_endpoint.clone());
        nodes.push(node);
    }
    let endpoint = endpoint.unwrap();
    for n in nodes.iter_mut() {
        n.wait_ready().await.unwrap();
    }
    let [a, b, c] = &mut nodes[..] else {
        unreachable!()
    };
    let (ta, tb, tc) = (a.target("v"), b.target("v"), c.target("v"));
    let (ra, rb, rc) = tokio::join!(
        a.publish("v", &ta, &[("model", "org/m")], |_| {}),
        b.publish("v", &tb, &[("model", "org/m")], |_| {}),
        c.publish("v", &tc, &[("model", "org/m")], |_| {}),
    );
    ra.unwrap();
    rb.unwrap();
    rc.unwrap();
    for t in [&ta, &tb, &tc] {
        assert_same_tree(&model, t);
    }
    let model_bytes = walk_bytes(&model);
    let egress = hub_requests(&endpoint, "file_bytes");
    assert_eq!(
        egress, model_bytes,
        "the hub sent {egress} bytes for a {model_bytes}-byte model"
    );
    // Each node got a share from the hub, and the rest from its peers.
    for n in [&*a, &*b, &*c] {
        let out = agent_command(&["ls", "--json", "--store", n.store().to_str().unwrap()]).unwrap();
        let inv: serde_json::Value = serde_json::from_str(&out).unwrap();
        let source = inv["snapshots"][0]["source"].as_str().unwrap().to_owned();
        assert!(
            source.starts_with("peers (") && source.contains(" + hub "),
            "{source}\n{}",
            n.agent_log()
        );
    }
}

/// Peers change where bytes come from, never who may read them: a node whose volume brings no
/// token gets nothing of a gated model its peer holds; with the token, it gets it from the peer.
#[tokio::test(flavor = "multi_thread")]
async fn a_gated_model_reaches_a_node_through_its_peers_only_for_a_token_the_hub_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let hub_root = dir.path().join("hub");
    let model = hub_root.join("models/org/gated");
    generate_model(&model, 4 << 20).unwrap();
    let secret = dir.path().join("peer-secret");
    std::fs::write(&secret, SECRET).unwrap();
    let secret = secret.to_str().unwrap();
    let peer_a = format!("127.0.0.1:{}", free_port().unwrap());
    let gate = vec!["--gated".to_owned(), "org/gated=token-a".to_owned()];
    let mut a = LocalNode::start_with(
        &dir.path().join("a"),
        Hub::Serve(hub_root, gate),
        60,
        &["--peer-listen", &peer_a, "--peer-token-file", secret],
    )
    .unwrap();
    let mut b = LocalNode::start_with(
        &dir.path().join("b"),
        Hub::Remote(a.hub_endpoint.clone()),
        60,
        &[
            "--peers",
            &format!("http://{peer_a}"),
            "--peer-token-file",
            secret,
        ],
    )
    .unwrap();
    a.wait_ready().await.unwrap();
    b.wait_ready().await.unwrap();
    /// Publishes the gated model at `node`'s volume `v` with these secrets, as kubelet would.
    async fn publish_gated(
        node: &mut LocalNode,
        secrets: &[(&str, &str)],
    ) -> Result<(), tonic::Status> {
        let target = node.target("v");
        let req = publish_request("v", &target, &[("model", "org/gated")], secrets);
        publish_until_done(&mut node.node, req, |_| {}).await
    }
    publish_gated(&mut a, &[("token", "token-a")])
        .await
        .unwrap();
    let endpoint = a.hub_endpoint.clone();
    let files_before = hub_requests(&endpoint, "file_bytes");

    // No token: refused by the hub's answer, and nothing reaches B's store.
    let e = publish_gated(&mut b, &[]).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let out = agent_command(&["ls", "--json", "--store", b.store().to_str().unwrap()]).unwrap();
    let inv: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(inv["snapshots"], serde_json::json!([]), "{out}");
    assert_eq!(inv["blobs"], 0, "{out}");

    // With the token: from the peer, the hub sending no file.
    publish_gated(&mut b, &[("token", "token-a")])
        .await
        .unwrap();
    assert_same_tree(&model, &b.target("v"));
    assert_eq!(hub_requests(&endpoint, "file_bytes"), files_before);
}
