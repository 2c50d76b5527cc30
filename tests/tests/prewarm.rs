//! Pre-warming as the Node watch drives it: a catalogue and the Node's labels arrive as a stream
//! of changes (here from a channel, in the cluster from the watches), the agent fetches each
//! wanted entry from a real hub and marks its snapshot pre-warmed (evicted last), and an entry
//! whose label goes away leaves an ordinary snapshot behind.

use modelcache_agent::evict::Watermarks;
use modelcache_agent::fetch::{Fetcher, Tuning};
use modelcache_agent::mounts::ProcMountTable;
use modelcache_agent::node::Node;
use modelcache_agent::prewarm::{Catalogue, Change, wanted_sets};
use modelcache_agent::store::Store;
use modelcache_core::repo::{RepoId, RepoKind};
use modelcache_hub::HubClient;
use modelcache_tests::models::generate_model;
use modelcache_tests::procs::serve_hub;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Whether the store holds `repo`, and whether it is marked pre-warmed.
fn state(store: &Store, repo: &str) -> Option<bool> {
    let repo = RepoId::parse(repo).unwrap();
    let snaps = store.list_snapshots().unwrap();
    let snap = snaps
        .iter()
        .find(|s| s.kind == RepoKind::Model && s.repo == repo)?;
    Some(store.peek_meta(snap).prewarmed)
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn labelled_entries_are_fetched_and_marked_and_unlabelled_ones_become_ordinary() {
    let dir = tempfile::tempdir().unwrap();
    let hub_root = dir.path().join("hub");
    generate_model(&hub_root.join("models/org/a"), 1 << 20).unwrap();
    generate_model(&hub_root.join("models/org/b"), 1 << 20).unwrap();
    let (mut hub, endpoint) = serve_hub(&hub_root, &[], dir.path()).unwrap();

    let store = Arc::new(Store::open(dir.path().join("store")).unwrap());
    let fetcher = Fetcher::new(
        HubClient::new(&endpoint, &[]).unwrap(),
        store.clone(),
        Tuning::default(),
    );
    let shutdown = CancellationToken::new();
    let no_eviction = Watermarks {
        high: 100,
        low: 99,
        max_store_bytes: None,
    };
    let api = Arc::new(
        Node::new(
            fetcher,
            no_eviction,
            Arc::new(ProcMountTable),
            shutdown.clone(),
        )
        .unwrap(),
    );
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let changes =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    let task = tokio::spawn(api.clone().prewarm(wanted_sets(changes)));

    let catalogue = Catalogue::parse(
        r#"[{"name": "a", "model": "org/a"},
            {"name": "b", "model": "org/b", "nodeSelector": {"gpu": "true"}}]"#,
    )
    .unwrap();
    let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    };
    tx.send(Change::Catalogue(catalogue)).unwrap();
    tx.send(Change::NodeLabels(labels(&[(
        "prewarm.modelcache.dev/a",
        "true",
    )])))
    .unwrap();
    wait_for("org/a pre-warmed", || state(&store, "org/a") == Some(true)).await;
    assert_eq!(state(&store, "org/b"), None, "b is not wanted yet");

    // The label goes, a selector matches: b is fetched and marked, a becomes ordinary.
    tx.send(Change::NodeLabels(labels(&[("gpu", "true")])))
        .unwrap();
    wait_for("org/b pre-warmed, org/a ordinary", || {
        state(&store, "org/b") == Some(true) && state(&store, "org/a") == Some(false)
    })
    .await;

    shutdown.cancel();
    task.await.unwrap();
    hub.stop();
}
