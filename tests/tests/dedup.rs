//! One copy of each byte, measured with `modelcache-agent ls`: any number of volumes of a model
//! cost its bytes once; a second revision adds only the files that changed; a fine-tune adds
//! only what it does not share with its base. Real hub, agent, plugin and mounts; needs root.

use modelcache_tests::models::generate_model;
use modelcache_tests::node::{Hub, LocalNode};
use modelcache_tests::procs::agent_command;
use std::collections::BTreeSet;
use std::path::Path;

const BASE: &str = "dedup/base";
const TUNED: &str = "dedup/tuned";
const MIB: u64 = 1 << 20;

/// Bytes the store's blobs take on disk, from `ls --json`.
fn blob_bytes(store: &Path) -> u64 {
    let out = agent_command(&["ls", "--json", "--store", store.to_str().unwrap()]).unwrap();
    let inv: serde_json::Value = serde_json::from_str(&out).unwrap();
    inv["blob_bytes"].as_u64().unwrap()
}

/// Bytes of a repo's distinct files (two files with the same bytes are one blob).
fn distinct_bytes(dirs: &[&Path]) -> u64 {
    let mut seen = BTreeSet::new();
    let mut total = 0;
    for dir in dirs {
        for e in walkdir::WalkDir::new(dir).into_iter().flatten() {
            if e.file_type().is_file() {
                let bytes = std::fs::read(e.path()).unwrap();
                total += bytes.len() as u64 * u64::from(seen.insert(bytes));
            }
        }
    }
    total
}

#[tokio::test(flavor = "multi_thread")]
async fn volumes_revisions_and_fine_tunes_share_every_byte_they_can() {
    let dir = tempfile::tempdir().unwrap();
    let hub_root = dir.path().join("hub");
    let base = hub_root.join("models").join(BASE);
    generate_model(&base, (32 * MIB) as usize).unwrap();
    // Revisions are asked of the hub on every publish, so `main` moves as soon as the hub does.
    let mut node = LocalNode::start_with(
        &dir.path().join("node"),
        Hub::Serve(hub_root.clone(), vec![]),
        60,
        &["--revision-ttl", "0"],
    )
    .unwrap();
    node.wait_ready().await.unwrap();
    let store = node.store();

    // Five volumes of one model: its bytes once.
    for v in 0..5 {
        let target = node.target(&format!("vol-{v}"));
        node.publish(&format!("vol-{v}"), &target, &[("model", BASE)], |_| {})
            .await
            .unwrap();
    }
    let one = distinct_bytes(&[&base]);
    assert_eq!(blob_bytes(&store), one, "5 volumes of one model");

    // A new revision of main that changes only the weights; a fine-tune that shares the base's
    // configs and tokenizer files and brings its own weights.
    let old_weights = std::fs::read(base.join("model.safetensors")).unwrap();
    generate_model(&base, (32 * MIB) as usize).unwrap();
    let tuned = hub_root.join("models").join(TUNED);
    generate_model(&tuned, (32 * MIB) as usize).unwrap();
    for f in [
        "config.json",
        "tokenizer_config.json",
        "1_Pooling/config.json",
    ] {
        assert_eq!(
            std::fs::read(base.join(f)).unwrap(),
            std::fs::read(tuned.join(f)).unwrap()
        );
    }
    node.restart_hub().unwrap();
    let t = node.target("vol-rev2");
    node.publish(
        "vol-rev2",
        &t,
        &[("model", BASE), ("revision", "main")],
        |_| {},
    )
    .await
    .unwrap();
    let after_rev2 = blob_bytes(&store);
    let new_weights = std::fs::metadata(base.join("model.safetensors"))
        .unwrap()
        .len();
    assert_ne!(
        std::fs::read(base.join("model.safetensors")).unwrap(),
        old_weights
    );
    assert_eq!(
        after_rev2 - one,
        new_weights,
        "a second revision adds its changed file only"
    );

    let t = node.target("vol-tuned");
    node.publish("vol-tuned", &t, &[("model", TUNED)], |_| {})
        .await
        .unwrap();
    let after_tuned = blob_bytes(&store);
    let tuned_own = distinct_bytes(&[&base, &tuned]) - distinct_bytes(&[&base]);
    assert_eq!(
        after_tuned - after_rev2,
        tuned_own,
        "a fine-tune adds what it does not share"
    );
    let tuned_all = distinct_bytes(&[&tuned]);
    eprintln!(
        "dedup: 5 volumes of a {one} B model: {one} B on disk (1.00x); a second revision: +{} B (its new weights, {new_weights} B); a fine-tune of {tuned_all} B: +{} B ({} B of configs shared)",
        after_rev2 - one,
        after_tuned - after_rev2,
        tuned_all - (after_tuned - after_rev2),
    );
}
