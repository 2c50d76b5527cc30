//! Hostile target paths against the real plugin and agent, with real mounts (needs root): a
//! symlink anywhere in a target is never followed, a volume never unmounts another's mount,
//! targets in or above the store are refused, targets whose names the mount table escapes
//! (space, tab, newline, backslash) work, and kubelet's retry after `main` moved succeeds.

use modelcache_proto::agent_v1 as pb;
use modelcache_tests::models::generate_model;
use modelcache_tests::node::{Hub, LocalNode, publish_request};
use modelcache_tests::tree::{assert_same_tree, mount_count, mount_options};
use std::path::{Path, PathBuf};
use tonic::Code;

const TINY: &str = "targets/tiny";

async fn node_with_model(dir: &Path) -> (LocalNode, PathBuf) {
    let hub_root = dir.join("hub");
    generate_model(&hub_root.join("models").join(TINY), 64 << 10).unwrap();
    let mut node = LocalNode::start_with(
        &dir.join("node"),
        Hub::Serve(hub_root.clone(), vec![]),
        30,
        // Ask the hub at every publish, so a moved `main` is seen at once.
        &["--revision-ttl", "0"],
    )
    .unwrap();
    node.wait_ready().await.unwrap();
    (node, hub_root.join("models").join(TINY))
}

async fn publish_at(
    node: &mut LocalNode,
    volume: &str,
    target: &Path,
) -> Result<(), tonic::Status> {
    let req = publish_request(volume, target, &[("model", TINY)], &[]);
    modelcache_tests::node::publish_until_done(&mut node.node, req, |_| {}).await
}

async fn pins_of(node: &mut LocalNode) -> Vec<String> {
    node.pinned_volumes().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn symlinks_in_targets_are_never_followed() {
    let dir = tempfile::tempdir().unwrap();
    let (mut node, _) = node_with_model(dir.path()).await;
    // Stands in for /etc: a directory a symlinked target would mount the model over.
    let victim = dir.path().join("victim");
    std::fs::create_dir_all(&victim).unwrap();
    std::fs::write(victim.join("passwd"), b"root:x:0:0").unwrap();

    // A symlink as the target itself.
    let target = node.target("vol-link");
    std::os::unix::fs::symlink(&victim, &target).unwrap();
    let err = publish_at(&mut node, "vol-link", &target)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(err.message().contains("symlink"), "{}", err.message());
    // A symlink as a directory on the way.
    let parent = node.target("vol-parent");
    let parent_dir = parent.parent().unwrap().to_path_buf();
    std::fs::remove_dir(&parent_dir).unwrap();
    std::os::unix::fs::symlink(&victim, &parent_dir).unwrap();
    let err = publish_at(&mut node, "vol-parent", &parent)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert_eq!(mount_count(&victim), 0, "nothing mounted over the victim");
    assert_eq!(std::fs::read(victim.join("passwd")).unwrap(), b"root:x:0:0");
    assert!(
        !victim.join("mount").exists(),
        "no directory made through the link"
    );

    // Unpublish through a symlink to a live volume's target leaves that volume mounted.
    let real = node.target("vol-real");
    publish_at(&mut node, "vol-real", &real).await.unwrap();
    let alias = node.target("vol-alias");
    std::os::unix::fs::symlink(&real, &alias).unwrap();
    let r = node.unpublish("vol-real", &alias).await;
    assert!(
        r.is_ok() || r.as_ref().unwrap_err().code() == Code::InvalidArgument,
        "{r:?}"
    );
    assert_eq!(mount_count(&real), 1, "the real target is still mounted");
    assert!(alias.is_symlink(), "the symlink itself is left alone");
    assert_eq!(pins_of(&mut node).await, ["vol-real"]);
    node.unpublish("vol-real", &real).await.unwrap();
    assert_eq!(mount_count(&real), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_volume_never_unmounts_another_volumes_target() {
    let dir = tempfile::tempdir().unwrap();
    let (mut node, _) = node_with_model(dir.path()).await;
    let (a, b) = (node.target("vol-a"), node.target("vol-b"));
    publish_at(&mut node, "vol-a", &a).await.unwrap();
    publish_at(&mut node, "vol-b", &b).await.unwrap();
    let err = node.unpublish("vol-b", &a).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());
    assert_eq!(mount_count(&a), 1, "A is still mounted");
    assert_eq!(
        pins_of(&mut node).await,
        ["vol-a", "vol-b"],
        "both pins stay"
    );
    for (v, t) in [("vol-a", &a), ("vol-b", &b)] {
        node.unpublish(v, t).await.unwrap();
        assert!(!t.exists());
    }
    assert!(pins_of(&mut node).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn targets_in_or_above_the_store_or_outside_kubelet_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut node, _) = node_with_model(dir.path()).await;
    let store = node.store();
    for target in [
        store.join("snapshots/hidden"),
        store.clone(),
        dir.path().join("elsewhere/mount"),
    ] {
        let err = publish_at(&mut node, "vol-x", &target).await.unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{}: {}",
            target.display(),
            err.message()
        );
        assert_eq!(mount_count(&target), 0);
    }
    assert!(!dir.path().join("elsewhere").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn targets_the_mount_table_escapes_publish_retry_and_unpublish() {
    let dir = tempfile::tempdir().unwrap();
    let (mut node, model) = node_with_model(dir.path()).await;
    let base = node.target("vol-odd");
    let target = base.parent().unwrap().join("mo unt\twith\nodd\\name");
    publish_at(&mut node, "vol-odd", &target).await.unwrap();
    assert_same_tree(&model, &target);
    let opts = mount_options(&target).expect("mounted");
    assert!(opts.contains(&"ro".to_owned()), "{opts:?}");
    // kubelet's retry: recognised as published, not mounted again.
    publish_at(&mut node, "vol-odd", &target).await.unwrap();
    assert_eq!(mount_count(&target), 1, "no stacked mount");

    // The agent recognises the mount too: with pins.json lost, a restart recovers the pin.
    node.crash_agent(|store| std::fs::remove_file(store.join("pins.json")).unwrap())
        .await
        .unwrap();
    let pins = pins_of(&mut node).await;
    assert_eq!(
        pins,
        [format!("recovered:{}", target.display())],
        "{pins:?}"
    );
    // The recovered pin is this target's: unpublish takes it down and drops it.
    node.unpublish("vol-odd", &target).await.unwrap();
    assert_eq!(mount_count(&target), 0);
    assert!(!target.exists());
    assert!(pins_of(&mut node).await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn kubelets_retry_after_main_moved_is_success() {
    let dir = tempfile::tempdir().unwrap();
    let (mut node, model) = node_with_model(dir.path()).await;
    let target = node.target("vol-retry");
    publish_at(&mut node, "vol-retry", &target).await.unwrap();
    let before = node.snapshots_of(TINY).await.unwrap();
    // `main` moves on at the hub.
    std::fs::write(model.join("config.json"), b"{\"moved\": true}").unwrap();
    node.restart_hub().unwrap();
    publish_at(&mut node, "vol-retry", &target).await.unwrap();
    assert_eq!(mount_count(&target), 1);
    let after = node.snapshots_of(TINY).await.unwrap();
    assert_eq!(
        after, before,
        "the retry keeps the pinned snapshot and fetches nothing"
    );
    // A new volume gets the new commit.
    let fresh = node.target("vol-fresh");
    publish_at(&mut node, "vol-fresh", &fresh).await.unwrap();
    let commits: Vec<pb::SnapshotInfo> = node.snapshots_of(TINY).await.unwrap();
    assert_eq!(commits.len(), 2);
    assert_eq!(
        std::fs::read(fresh.join("config.json")).unwrap(),
        b"{\"moved\": true}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn other_local_users_cannot_read_the_store_but_pods_read_their_mounts() {
    let dir = tempfile::tempdir().unwrap();
    let (mut node, _) = node_with_model(dir.path()).await;
    let target = node.target("vol-user");
    publish_at(&mut node, "vol-user", &target).await.unwrap();
    // The temporary directory itself must let `nobody` through, as /var/lib does.
    {
        use std::os::unix::fs::PermissionsExt;
        for d in [dir.path(), &dir.path().join("node")] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    let as_nobody = |path: &Path| {
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"])
            .arg(path)
            .output()
            .expect("setpriv (util-linux) runs")
    };
    let snapshot = node.snapshots_of(TINY).await.unwrap()[0].path.clone();
    let through_store = as_nobody(&Path::new(&snapshot).join("config.json"));
    assert!(
        !through_store.status.success(),
        "a local user read the store"
    );
    let through_mount = as_nobody(&target.join("config.json"));
    assert!(
        through_mount.status.success(),
        "{}",
        String::from_utf8_lossy(&through_mount.stderr)
    );
}
