//! huggingface_hub, the Hub's own Python client, against `modelcache-hub`: `snapshot_download` of a
//! model (its LFS file redirected to the CDN route) and of a dataset yields the same files as
//! the repos on disk and as `modelcache-agent pull`. This is what keeps `modelcache-hub` a faithful
//! stand-in for the Hub in every other test.

use modelcache_tests::models::{generate_model, run_python};
use modelcache_tests::procs::{agent_command, free_port, serve_hub_at};
use modelcache_tests::tree::assert_same_tree;
use std::path::{Path, PathBuf};

const SNAPSHOT_DOWNLOAD: &str = r#"
import os
from huggingface_hub import snapshot_download
kind = os.environ["REPO_TYPE"]
print(snapshot_download(os.environ["REPO"], repo_type=kind, cache_dir=os.environ["CACHE"]))
"#;

fn snapshot_download(endpoint: &Path, repo: &str, kind: &str, cache: &Path) -> PathBuf {
    let out = run_python(
        SNAPSHOT_DOWNLOAD,
        &[
            ("HF_ENDPOINT", endpoint),
            ("REPO", Path::new(repo)),
            ("REPO_TYPE", Path::new(kind)),
            ("CACHE", cache),
            ("HF_HUB_DISABLE_TELEMETRY", Path::new("1")),
            ("HF_TOKEN", Path::new("")),
        ],
    )
    .unwrap();
    PathBuf::from(
        out.lines()
            .last()
            .expect("snapshot_download printed its path"),
    )
}

#[test]
fn snapshot_download_from_modelcache_hub_yields_the_repo_files() {
    let dir = tempfile::tempdir().unwrap();
    let hub_root = dir.path().join("hub");
    let model = hub_root.join("models/org/model");
    let dataset = hub_root.join("datasets/org/data");
    generate_model(&model, 12 << 20).unwrap();
    std::fs::create_dir_all(dataset.join("train")).unwrap();
    std::fs::write(dataset.join("train/part-0.jsonl"), b"{\"text\":\"hi\"}\n").unwrap();
    std::fs::write(dataset.join("README.md"), b"# data\n").unwrap();

    // The CDN route under another host name, as the Hub's CDN is.
    let port = free_port().unwrap();
    let listen = format!("127.0.0.1:{port}");
    let cdn = format!("http://localhost:{port}");
    let (mut hub, endpoint) =
        serve_hub_at(None, &listen, &hub_root, &["--cdn-url", &cdn], dir.path()).unwrap();
    let endpoint = PathBuf::from(endpoint);
    let cache = dir.path().join("hf-cache");

    let got = snapshot_download(&endpoint, "org/model", "model", &cache);
    assert_same_tree(&model, &got);
    let got = snapshot_download(&endpoint, "org/data", "dataset", &cache);
    assert_same_tree(&dataset, &got);

    // modelcache's own client agrees, commit included.
    let store = dir.path().join("store");
    let out = agent_command(&[
        "pull",
        "org/model",
        "--store",
        store.to_str().unwrap(),
        "--endpoint",
        endpoint.to_str().unwrap(),
        "--cdn-hosts",
        "localhost",
    ])
    .unwrap();
    let pulled = PathBuf::from(out.lines().last().expect("pull prints the snapshot").trim());
    assert_same_tree(&model, &pulled);
    let hf_commit = std::fs::read_to_string(cache.join("models--org--model/refs/main")).unwrap();
    assert_eq!(pulled.file_name().unwrap().to_str(), Some(hf_commit.trim()));
    hub.stop();
}
