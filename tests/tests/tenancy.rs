//! Gated models and tenants: a volume gets a gated model only with a token the hub accepts for
//! it, even when the store already holds the model because another tenant's pod asked first.
//! Real hub with a gated repo, real agent and plugin, real mounts; needs root.

use modelcache_tests::models::generate_model;
use modelcache_tests::node::{Hub, LocalNode, publish_request, publish_until_done};
use modelcache_tests::tree::assert_same_tree;
use tonic::{Code, Status};

/// Attributes or secrets, as pairs.
type Pairs<'a> = &'a [(&'a str, &'a str)];

const GATED: &str = "modelcache-test/gated";
const PUBLIC: &str = "modelcache-test/tiny";

#[tokio::test(flavor = "multi_thread")]
async fn a_gated_model_reaches_only_volumes_whose_token_has_access() {
    let dir = tempfile::tempdir().unwrap();
    let hub_root = dir.path().join("hub");
    for repo in [GATED, PUBLIC] {
        generate_model(&hub_root.join("models").join(repo), 1 << 20).unwrap();
    }
    let gate = vec!["--gated".into(), format!("{GATED}=token-a")];
    let mut node = LocalNode::start(
        &dir.path().join("node"),
        Hub::Serve(hub_root.clone(), gate),
        30,
    )
    .unwrap();
    node.wait_ready().await.unwrap();

    // Publishes once, retrying only while the model downloads, as kubelet would.
    async fn try_publish(
        node: &mut LocalNode,
        vol: &str,
        attrs: &[(&str, &str)],
        secrets: &[(&str, &str)],
    ) -> Result<(), Status> {
        let target = node.target(vol);
        let req = publish_request(vol, &target, attrs, secrets);
        let res = publish_until_done(&mut node.node, req, |_| {}).await;
        if res.is_err() {
            assert!(
                !target.exists(),
                "{vol}: a refused publish created its target"
            );
        }
        res
    }

    // Tenant A, with access: the model is fetched and mounted.
    try_publish(
        &mut node,
        "vol-a",
        &[("model", GATED)],
        &[("token", "token-a")],
    )
    .await
    .unwrap();
    assert_same_tree(&hub_root.join("models").join(GATED), &node.target("vol-a"));
    let commit = node
        .snapshots_of(GATED)
        .await
        .unwrap()
        .into_iter()
        .next()
        .unwrap()
        .commit;

    // Tenant B: without a token, with a token that lacks access, and naming the commit to try to
    // skip the revision lookup — all refused although the store holds the model.
    let refusals: &[(Pairs, Pairs)] = &[
        (&[("model", GATED)], &[]),
        (&[("model", GATED)], &[("token", "token-b")]),
        (&[("model", GATED)], &[("HF_TOKEN", "token-b")]),
        (&[("model", GATED), ("revision", &commit)], &[]),
        (
            &[("model", GATED), ("revision", &commit)],
            &[("token", "token-b")],
        ),
    ];
    for (i, (attrs, secrets)) in refusals.iter().enumerate() {
        let err = try_publish(&mut node, &format!("vol-b{i}"), attrs, secrets)
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::PermissionDenied,
            "{attrs:?} {secrets:?}: {}",
            err.message()
        );
        assert!(
            err.message().contains("accept the licence"),
            "{}",
            err.message()
        );
    }
    // The key HF_TOKEN works as well as token; so does the commit, with access.
    try_publish(
        &mut node,
        "vol-a2",
        &[("model", GATED), ("revision", &commit)],
        &[("HF_TOKEN", "token-a")],
    )
    .await
    .unwrap();
    // A public model needs no token.
    try_publish(&mut node, "vol-p", &[("model", PUBLIC)], &[])
        .await
        .unwrap();

    // Hub outage: access to the gated model cannot be checked, so a token without a recent
    // answer is refused (retryably); recent grants and public models keep working.
    node.stop_hub();
    let target = node.target("vol-b9");
    let req = publish_request(
        "vol-b9",
        &target,
        &[("model", GATED)],
        &[("token", "token-c")],
    );
    let err = node.node.node_publish_volume(req).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(
        err.message().contains("cannot check access"),
        "{}",
        err.message()
    );
    assert!(!target.exists());
    try_publish(
        &mut node,
        "vol-a3",
        &[("model", GATED)],
        &[("token", "token-a")],
    )
    .await
    .unwrap();
    try_publish(&mut node, "vol-p2", &[("model", PUBLIC)], &[])
        .await
        .unwrap();

    let pinned: Vec<String> = node
        .snapshots_of(GATED)
        .await
        .unwrap()
        .into_iter()
        .flat_map(|s| s.pinned_by)
        .collect();
    assert_eq!(
        pinned,
        ["vol-a", "vol-a2", "vol-a3"],
        "only tenant A's volumes hold the gated model"
    );
}

/// The agent's own token (the chart's `hub.tokenSecret`) pre-warms and pulls, but a volume
/// without a token of its own, or with a blank one, is not let in with it — unless the operator
/// opts in with `--lend-token-to-volumes`.
#[tokio::test(flavor = "multi_thread")]
async fn the_agents_token_is_never_a_volumes_unless_lent() {
    let dir = tempfile::tempdir().unwrap();
    let hub_root = dir.path().join("hub");
    generate_model(&hub_root.join("models").join(GATED), 256 << 10).unwrap();
    let gate = vec!["--gated".into(), format!("{GATED}=agent-token")];
    for lend in [false, true] {
        let mut flags = vec!["--token", "agent-token"];
        if lend {
            flags.push("--lend-token-to-volumes");
        }
        let mut node = LocalNode::start_with(
            &dir.path().join(format!("node-{lend}")),
            Hub::Serve(hub_root.clone(), gate.clone()),
            30,
            &flags,
        )
        .unwrap();
        node.wait_ready().await.unwrap();
        let secrets: &[Pairs] = &[&[], &[("token", "")], &[("token", "   ")]];
        for (i, secrets) in secrets.iter().enumerate() {
            let vol = format!("vol-{i}");
            let target = node.target(&vol);
            let req = publish_request(&vol, &target, &[("model", GATED)], secrets);
            let res = publish_until_done(&mut node.node, req, |_| {}).await;
            if lend {
                res.unwrap();
            } else {
                let err = res.unwrap_err();
                assert_eq!(
                    err.code(),
                    Code::PermissionDenied,
                    "{secrets:?}: {}",
                    err.message()
                );
                assert!(!target.exists());
            }
        }
    }
}
