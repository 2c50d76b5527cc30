//! What kubelet puts the plugin through besides the happy path: a hub slower than its call
//! timeout, several pods asking for one model at once, and restarts of the plugin and the agent
//! while volumes are mounted. Real processes, sockets and mounts; needs root.

use modelcache_tests::models::generate_model;
use modelcache_tests::node::{Hub, LocalNode, publish};
use modelcache_tests::tree::{assert_same_tree, mount_count};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

const TINY: &str = "modelcache-test/tiny";

struct Fixture {
    node: LocalNode,
    repo_dir: PathBuf,
    _dir: tempfile::TempDir,
}

fn fixture(weights: usize, throttle: Option<u64>, publish_wait_secs: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let hub_root = dir.path().join("hub");
    let repo_dir = hub_root.join("models").join(TINY);
    generate_model(&repo_dir, weights).unwrap();
    let hub = match throttle {
        Some(rate) => Hub::Serve(
            hub_root,
            vec!["--max-bytes-per-second".into(), rate.to_string()],
        ),
        None => Hub::Serve(hub_root, vec![]),
    };
    let node = LocalNode::start(&dir.path().join("node"), hub, publish_wait_secs).unwrap();
    Fixture {
        node,
        repo_dir,
        _dir: dir,
    }
}

fn fetches(node: &LocalNode) -> usize {
    node.agent_log()
        .lines()
        .filter(|l| l.contains(TINY) && l.contains(" fetching "))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_hub_publish_answers_unavailable_with_progress_then_succeeds_with_one_download() {
    // 12 MiB at 3 MiB/s: about 4 s, against a 1 s publish wait.
    let Fixture {
        mut node,
        repo_dir,
        _dir,
    } = fixture(12 << 20, Some(3 << 20), 1);
    node.wait_ready().await.unwrap();
    let retries = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut tasks = Vec::new();
    for volume in ["vol-1", "vol-2", "vol-3"] {
        let mut client = node.node.clone();
        let target = node.target(volume);
        let retries = retries.clone();
        tasks.push(tokio::spawn(async move {
            publish(&mut client, volume, &target, &[("model", TINY)], |s| {
                retries
                    .lock()
                    .unwrap()
                    .push(format!("{:?}: {}", s.code(), s.message()));
            })
            .await
            .map(|()| target)
        }));
    }
    for t in tasks {
        let target = t
            .await
            .unwrap()
            .unwrap_or_else(|s| panic!("publish failed: {s:?}"));
        assert_same_tree(&repo_dir, &target);
    }
    let retries = retries.lock().unwrap().clone();
    let progress: Vec<&String> = retries
        .iter()
        .filter(|m| {
            m.starts_with("Unavailable") && m.contains("is still downloading") && m.contains("MiB")
        })
        .collect();
    assert!(
        progress.len() >= 3,
        "expected UNAVAILABLE with progress while fetching, got {retries:#?}"
    );
    assert_eq!(
        fetches(&node),
        1,
        "three volumes, one download:\n{}",
        node.agent_log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn restarts_leave_mounts_working_and_unpublish_still_cleans_up() {
    let Fixture {
        mut node,
        repo_dir,
        _dir,
    } = fixture(2 << 20, None, 30);
    let (a, b) = (node.target("vol-a"), node.target("vol-b"));
    node.publish("vol-a", &a, &[("model", TINY)], |_| {})
        .await
        .unwrap();
    node.publish("vol-b", &b, &[("model", TINY)], |_| {})
        .await
        .unwrap();

    // The plugin restarts (an upgrade of the DaemonSet): mounts stay, unpublish works.
    node.restart_csi().await.unwrap();
    assert_same_tree(&repo_dir, &a);
    node.unpublish("vol-a", &a).await.unwrap();
    assert_eq!(mount_count(&a), 0);
    assert!(!a.exists());

    // The agent restarts: the mount stays, its pin survives, and unpublish releases it.
    node.restart_agent().await.unwrap();
    assert_same_tree(&repo_dir, &b);
    let pins = node.pinned_volumes().await.unwrap();
    assert_eq!(pins, ["vol-b"], "pins after an agent restart");
    // A publish retried after the restart is idempotent and needs no download.
    node.publish("vol-b", &b, &[("model", TINY)], |_| {})
        .await
        .unwrap();
    assert_eq!(mount_count(&b), 1);
    let c = node.target("vol-c");
    node.publish("vol-c", &c, &[("model", TINY)], |_| {})
        .await
        .unwrap();
    assert_eq!(
        fetches(&node),
        1,
        "the store survived the restart:\n{}",
        node.agent_log()
    );
    for (v, t) in [("vol-b", &b), ("vol-c", &c)] {
        node.unpublish(v, t).await.unwrap();
        assert_eq!(mount_count(t), 0);
    }
    let pins = node
        .snapshots()
        .await
        .unwrap()
        .into_iter()
        .flat_map(|s| s.pinned_by)
        .count();
    assert_eq!(pins, 0);
}
