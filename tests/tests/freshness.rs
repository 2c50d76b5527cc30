//! A warm publish never waits for the hub: past `--revision-ttl` it is served the commit the
//! node holds while the hub is asked in the background, and during an outage it is served the
//! same commit with a Warning event on the pod. Real hub (2 s latency, then stopped), agent and
//! plugin, real mounts, the API server's stand-in for events; needs root.

use modelcache_testkit::kube_api::FakeKubeApi;
use modelcache_tests::models::generate_model;
use modelcache_tests::node::{Hub, LocalNode, publish_request};
use modelcache_tests::procs::{agent_command, free_port, http_get};
use std::time::{Duration, Instant};

const MODEL: &str = "org/fresh";
/// Added by the hub before each answer.
const HUB_LATENCY: Duration = Duration::from_secs(2);
const REVISION_TTL: Duration = Duration::from_secs(3);

/// The value of the metric line that starts with `series`; 0 when the series has not appeared.
fn metric(addr: &str, series: &str) -> u64 {
    let (status, body) = http_get(addr, "/metrics").unwrap();
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

/// A warm publish with a token no publish used before, and how long it took.
async fn warm_publish(node: &mut LocalNode, i: usize) -> Duration {
    let vol = format!("vol-{i}");
    let target = node.target(&vol);
    let token = format!("hf_pod_{i}");
    let req = publish_request(&vol, &target, &[("model", MODEL)], &[("token", &token)]);
    let started = Instant::now();
    node.node
        .node_publish_volume(req)
        .await
        .unwrap_or_else(|s| panic!("warm publish {i}: {}", s.message()));
    let took = started.elapsed();
    node.unpublish(&vol, &target).await.unwrap();
    took
}

#[tokio::test(flavor = "multi_thread")]
async fn warm_publishes_never_wait_for_a_slow_or_stopped_hub() {
    let dir = tempfile::tempdir().unwrap();
    let hub_root = dir.path().join("hub");
    generate_model(&hub_root.join("models").join(MODEL), 1 << 20).unwrap();
    let api = FakeKubeApi::start().await;
    let kubeconfig = api.kubeconfig(dir.path());
    let metrics = format!("127.0.0.1:{}", free_port().unwrap());
    let ttl = format!("{}s", REVISION_TTL.as_secs());
    let latency = HUB_LATENCY.as_millis().to_string();
    let mut node = LocalNode::start_with(
        &dir.path().join("node"),
        Hub::Serve(hub_root, vec!["--latency-ms".into(), latency]),
        60,
        &[
            "--revision-ttl",
            &ttl,
            "--metrics-listen",
            &metrics,
            "--node-name",
            "node-a",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
        ],
    )
    .unwrap();
    node.wait_ready().await.unwrap();
    let cold = node.target("vol-cold");
    node.publish("vol-cold", &cold, &[("model", MODEL)], |_| {})
        .await
        .unwrap();
    node.unpublish("vol-cold", &cold).await.unwrap();
    let revision = r#"modelcache_hub_requests_total{purpose="revision"}"#;
    assert_eq!(metric(&metrics, revision), 1);

    // Past the TTL: served at once, each pod with a new token, one request in the background.
    tokio::time::sleep(REVISION_TTL).await;
    for i in 0..3 {
        let took = warm_publish(&mut node, i).await;
        assert!(
            took < HUB_LATENCY / 2,
            "warm publish {i} took {took:?}: it waited for the hub"
        );
    }
    let expired = r#"modelcache_stale_serves_total{reason="expired"}"#;
    assert_eq!(metric(&metrics, expired), 3);
    let access = r#"modelcache_hub_requests_total{purpose="access"}"#;
    assert_eq!(
        metric(&metrics, access),
        0,
        "a public repo needs no access check"
    );
    let wait = Instant::now();
    while metric(&metrics, revision) < 2 {
        assert!(wait.elapsed() < Duration::from_secs(20), "no revalidation");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The hub goes away. Publishes keep being served at once; once a revalidation has failed,
    // each tells its pod that its model may be out of date.
    node.stop_hub();
    let outage = r#"modelcache_stale_serves_total{reason="outage"}"#;
    let wait = Instant::now();
    let mut i = 3;
    while metric(&metrics, outage) == 0 {
        assert!(
            wait.elapsed() < Duration::from_secs(40),
            "no outage seen\n{}",
            node.agent_log()
        );
        let took = warm_publish(&mut node, i).await;
        assert!(took < HUB_LATENCY / 2, "publish {i} took {took:?}");
        i += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let warning = api
        .seen()
        .into_iter()
        .find(|r| r.method == "POST" && r.body["reason"] == "ModelRevisionStale")
        .unwrap_or_else(|| panic!("no ModelRevisionStale event\n{}", node.agent_log()));
    assert_eq!(warning.body["type"], "Warning");
    let note = warning.body["note"].as_str().unwrap();
    assert!(
        note.contains("could not be asked which commit main names"),
        "{note}"
    );

    // `ls` says when main was last resolved.
    let store = node.store();
    let ls = agent_command(&["ls", "--store", store.to_str().unwrap()]).unwrap();
    assert!(ls.contains("main ("), "{ls}");
    let json = agent_command(&["ls", "--json", "--store", store.to_str().unwrap()]).unwrap();
    let inv: serde_json::Value = serde_json::from_str(&json).unwrap();
    let resolved = inv["snapshots"][0]["resolved"]["main"].as_u64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(now - resolved < 120, "resolved {resolved}, now {now}");
}
