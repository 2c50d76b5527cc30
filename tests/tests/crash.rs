//! Crash safety: the agent is killed with SIGKILL at random points while several volumes' models
//! download (some in parallel ranges). Whenever it is down, every snapshot in the store is
//! complete and every blob holds the bytes its name promises (`modelcache-agent verify`); after
//! each restart the downloads go on, and in the end every volume shows its model whole. Real hub,
//! agent, plugin and mounts; needs root.

use modelcache_tests::models::generate_model;
use modelcache_tests::node::{Hub, LocalNode, publish};
use modelcache_tests::procs::agent_command;
use modelcache_tests::tree::assert_same_tree;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::time::Duration;

const MODELS: usize = 4;

/// Every snapshot the store shows matches its repo on the hub, and `verify` finds no bad blob.
/// `verify` goes through the agent on `agent` when it runs, and takes the store's lock when not.
fn assert_store_consistent(store: &Path, agent: &Path, hub_root: &Path, round: usize, seed: u64) {
    let snaps = store.join("snapshots");
    for repo_dir in std::fs::read_dir(&snaps).into_iter().flatten().flatten() {
        let name = repo_dir.file_name().to_string_lossy().into_owned();
        let repo = name.trim_start_matches("models--").replacen("--", "/", 1);
        for snap in std::fs::read_dir(repo_dir.path()).unwrap().flatten() {
            assert_same_tree(&hub_root.join("models").join(&repo), &snap.path());
        }
    }
    let agent = format!("unix://{}", agent.display());
    let store = store.to_str().unwrap();
    if let Err(e) = agent_command(&["verify", "--dry-run", "--store", store, "--agent", &agent]) {
        panic!("seed {seed}, round {round}: verify found corrupt blobs: {e:#}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_killed_at_random_points_leaves_nothing_partial_and_finishes_every_model() {
    let dir = tempfile::tempdir().unwrap();
    let hub_root = dir.path().join("hub");
    // 20 and 40 MiB of weights in 1 MiB ranges, small files in one stream each: both download
    // paths are hit.
    for i in 0..MODELS {
        let repo = hub_root.join(format!("models/crash/m{i}"));
        generate_model(&repo, (20 + 20 * (i % 2)) << 20).unwrap();
    }
    // 4 connections at 4 MB/s each: about 8 s for the 120 MiB, longer than the crash rounds give
    // it, while a range completes every ~70 ms.
    let throttle = vec!["--max-bytes-per-second".into(), "4000000".into()];
    let mut node = LocalNode::start_with(
        &dir.path().join("node"),
        Hub::Serve(hub_root.clone(), throttle),
        2,
        &["--chunk-mib", "1", "--connections", "4"],
    )
    .unwrap();
    node.wait_ready().await.unwrap();

    let publishes: Vec<_> = (0..MODELS)
        .map(|i| {
            let mut client = node.node.clone();
            let target = node.target(&format!("vol-{i}"));
            tokio::spawn(async move {
                let model = format!("crash/m{i}");
                publish(
                    &mut client,
                    &format!("vol-{i}"),
                    &target,
                    &[("model", &model)],
                    |_| {},
                )
                .await
                .map(|()| target)
            })
        })
        .collect();

    // The crash times, replayable: MODELCACHE_TEST_SEED=<seed> draws the same ones.
    let seed: u64 = std::env::var("MODELCACHE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("crash times drawn with seed {seed} (MODELCACHE_TEST_SEED={seed} replays them)");
    let mut rng = StdRng::seed_from_u64(seed);
    let socket = node.agent_socket();
    for round in 0..6 {
        let wait = rng.random_range(200..1200);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        node.crash_agent(|store| assert_store_consistent(store, &socket, &hub_root, round, seed))
            .await
            .unwrap_or_else(|e| panic!("seed {seed}, round {round}: {e:#}"));
    }

    for (i, p) in publishes.into_iter().enumerate() {
        let target = p
            .await
            .unwrap()
            .unwrap_or_else(|s| panic!("seed {seed}: vol-{i}: {s}"));
        assert_same_tree(&hub_root.join(format!("models/crash/m{i}")), &target);
    }
    let log = node.agent_log();
    assert!(
        log.contains("resuming an interrupted download"),
        "seed {seed}: no range download was ever resumed across a crash"
    );
    assert_store_consistent(&node.store(), &socket, &hub_root, 99, seed);
}
