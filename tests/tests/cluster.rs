//! The agent in a cluster, end to end but for the API server (a faithful in-process stand-in):
//! started with `--node-name` and a kubeconfig, it watches only its own Node, labels it with
//! the model a pod's volume brought, by server-side apply as `modelcache-agent`, and tells the
//! pod how its model came, with events.

use modelcache_tests::kube_api::FakeKubeApi;
use modelcache_tests::models::generate_model;
use modelcache_tests::node::{Hub, LocalNode};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread")]
async fn a_node_labels_itself_with_what_it_holds_and_tells_the_pod() {
    let dir = tempfile::tempdir().unwrap();
    let hub_root = dir.path().join("hub");
    generate_model(&hub_root.join("models/org/m"), 4 << 20).unwrap();
    let api = FakeKubeApi::start().await;
    let kubeconfig = api.kubeconfig(dir.path());
    let mut node = LocalNode::start_with(
        &dir.path().join("node"),
        Hub::Serve(hub_root, vec![]),
        20,
        &[
            "--node-name",
            "node-a",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
        ],
    )
    .unwrap();
    let target = node.target("vol-m");
    node.publish("vol-m", &target, &[("model", "org/m")], |_| {})
        .await
        .unwrap();

    // Within seconds: the label, and the pod's ModelReady.
    let start = Instant::now();
    let (label, ready) = loop {
        let seen = api.seen();
        let label = seen
            .iter()
            .filter(|r| r.method == "PATCH" && r.path == "/api/v1/nodes/node-a")
            .find(|r| r.body["metadata"]["labels"]["models.modelcache.dev/org--m"].is_string())
            .cloned();
        let ready = seen
            .iter()
            .find(|r| r.method == "POST" && r.body["reason"] == "ModelReady")
            .cloned();
        if let (Some(l), Some(r)) = (&label, &ready) {
            break (l.clone(), r.clone());
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no label or event after 15 s: {seen:#?}\n{}",
            node.agent_log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut query: Vec<&str> = label.query.split('&').filter(|p| !p.is_empty()).collect();
    query.sort();
    assert_eq!(query, ["fieldManager=modelcache-agent", "force=true"]);
    assert_eq!(label.content_type, "application/apply-patch+yaml");
    let commit = node.snapshots_of("org/m").await.unwrap()[0].commit.clone();
    assert_eq!(
        label.body["metadata"]["labels"]["models.modelcache.dev/org--m"],
        commit[..12]
    );

    assert_eq!(
        ready.path,
        "/apis/events.k8s.io/v1/namespaces/default/events"
    );
    assert_eq!(ready.body["regarding"]["name"], "reader");
    assert_eq!(ready.body["regarding"]["uid"], "0b3c7c4e-uid");
    assert_eq!(ready.body["reportingInstance"], "node-a");
    let note = ready.body["note"].as_str().unwrap();
    assert!(
        note.starts_with(&format!("org/m@{}: ", &commit[..12])),
        "{note}"
    );

    // Only its own Node was ever asked for.
    for r in api.seen().iter().filter(|r| r.method == "GET") {
        assert_eq!(r.path, "/api/v1/nodes");
        assert!(
            r.query
                .split('&')
                .any(|p| p == "fieldSelector=metadata.name%3Dnode-a"),
            "{}",
            r.query
        );
    }
    node.unpublish("vol-m", &target).await.unwrap();
}
