//! The agent in a cluster, end to end but for the API server (a faithful in-process stand-in):
//! started with `--node-name` and a kubeconfig, it watches only its own Node, labels it with
//! the model a pod's volume brought, by server-side apply as `modelcache-agent`, and tells the
//! pod how its model came, with events. The chart's RBAC allows every request it made, and grants
//! nothing it did not use.

use modelcache_testkit::kube_api::FakeKubeApi;
use modelcache_tests::models::generate_model;
use modelcache_tests::node::{Hub, LocalNode};
use modelcache_tests::{helm, rbac};
use std::collections::BTreeSet;
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
            // As the chart runs it: release "modelcache" in namespace "modelcache".
            "--catalogue",
            "modelcache/modelcache-catalogue",
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

    // Only its own Node and the catalogue were ever asked for.
    let seen = api.seen();
    for r in seen.iter().filter(|r| r.method == "GET") {
        let wanted = match r.path.as_str() {
            "/api/v1/nodes" => "fieldSelector=metadata.name%3Dnode-a",
            "/api/v1/namespaces/modelcache/configmaps" => {
                "fieldSelector=metadata.name%3Dmodelcache-catalogue"
            }
            other => panic!("unexpected GET {other}"),
        };
        assert!(r.query.split('&').any(|p| p == wanted), "{}", r.query);
    }
    assert!(
        seen.iter()
            .any(|r| r.path == "/api/v1/namespaces/modelcache/configmaps"),
        "the catalogue was never read"
    );

    // The chart's RBAC, evaluated as the API server would for the agent's ServiceAccount:
    // everything the agent did is allowed, and every grant but one was used.
    let chart = helm::render(&[], None).expect("the chart renders with its defaults");
    let rules = rbac::rules_of(&chart.objects, "modelcache", "modelcache-node");
    let mut used = BTreeSet::new();
    for r in &seen {
        let a = rbac::attributes(&r.method, &r.path, &r.query);
        assert!(
            rbac::allows(&rules, &a),
            "the chart's RBAC forbids {a:?} ({} {}?{})",
            r.method,
            r.path,
            r.query
        );
        used.insert((a.group, a.resource, a.verb));
    }
    for (_, rule) in &rules {
        for list in ["apiGroups", "resources", "verbs"] {
            assert!(
                !rule[list].as_array().unwrap().iter().any(|v| v == "*"),
                "wildcard in {rule}"
            );
        }
    }
    let granted = rbac::grants(&rules);
    let unused: Vec<_> = granted.difference(&used).collect();
    // kube's event recorder patches an event when it repeats (its series count).
    assert_eq!(
        unused,
        [&(
            "events.k8s.io".to_owned(),
            "events".to_owned(),
            "patch".to_owned()
        )],
        "granted but never used"
    );
    node.unpublish("vol-m", &target).await.unwrap();
}
