//! The shared-PVC source tier, for real: huggingface_hub's `snapshot_download` fills an HF cache
//! from `modelcache-hub` (the "PVC + download Job" pattern), and `modelcache-agent pull` imports from
//! it, verified, taking only the rest from the hub; alone without a hub; and refusing a cache
//! that lies (wrong bytes, symlinks that lead out): what it lies about never enters the store,
//! and no snapshot is made from a lie.

use modelcache_testkit::process::free_loopback_addr;
use modelcache_tests::models::{generate_model, run_python};
use modelcache_tests::node::{Hub, LocalNode};
use modelcache_tests::procs::{agent_command, agent_command_logged, http_get, serve_hub};
use modelcache_tests::tree::{assert_same_tree, mount_options};
use std::path::{Path, PathBuf};

const REPO: &str = "org/model";

/// A repo on a hub, and an HF_HOME filled from it by huggingface_hub.
struct Setup {
    dir: tempfile::TempDir,
    model: PathBuf,
    endpoint: String,
    hub: modelcache_tests::procs::Proc,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("hub/models").join(REPO);
        generate_model(&model, 20 << 20).unwrap();
        let (hub, endpoint) = serve_hub(&dir.path().join("hub"), &[], dir.path()).unwrap();
        Setup {
            dir,
            model,
            endpoint,
            hub,
        }
    }

    /// `HF_HOME=<shared> snapshot_download(REPO, allow_patterns=…)`; the snapshot directory.
    fn fill_shared_cache(&self, allow: Option<&str>) -> PathBuf {
        let script = "import os\n\
             from huggingface_hub import snapshot_download\n\
             allow = os.environ.get('ALLOW') or None\n\
             print(snapshot_download(os.environ['REPO'], allow_patterns=allow and allow.split(',')))\n";
        let home = self.shared();
        let mut env: Vec<(&str, &Path)> = vec![
            ("HF_ENDPOINT", Path::new(&self.endpoint)),
            ("HF_HOME", &home),
            ("REPO", Path::new(REPO)),
            ("HF_HUB_DISABLE_TELEMETRY", Path::new("1")),
            ("HF_TOKEN", Path::new("")),
        ];
        if let Some(allow) = allow {
            env.push(("ALLOW", Path::new(allow)));
        }
        let out = run_python(script, &env).unwrap();
        PathBuf::from(out.lines().last().expect("a snapshot path").trim())
    }

    fn shared(&self) -> PathBuf {
        self.dir.path().join("pvc")
    }

    fn folder(&self) -> PathBuf {
        self.shared().join("hub/models--org--model")
    }

    fn store(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `pull REPO` into `store` with these sources; stdout's snapshot path and the log.
    fn pull(&self, store: &Path, sources: &str) -> anyhow::Result<(PathBuf, String)> {
        let (out, log) = agent_command_logged(&[
            "pull",
            REPO,
            "--store",
            store.to_str().unwrap(),
            "--endpoint",
            &self.endpoint,
            "--shared-cache",
            self.shared().to_str().unwrap(),
            "--sources",
            sources,
        ])?;
        let snap = PathBuf::from(out.lines().last().expect("pull prints the snapshot").trim());
        Ok((snap, log))
    }
}

/// `ls --json` of a store: its snapshots.
fn snapshots(store: &Path) -> Vec<serde_json::Value> {
    let out = agent_command(&["ls", "--json", "--store", store.to_str().unwrap()]).unwrap();
    let inv: serde_json::Value = serde_json::from_str(&out).unwrap();
    inv["snapshots"].as_array().unwrap().clone()
}

fn size(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

/// Blobs in a store: (algorithm dir, hex) pairs.
fn blobs(store: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for algo in ["sha256", "sha1"] {
        if let Ok(entries) = std::fs::read_dir(store.join("blobs").join(algo)) {
            out.extend(entries.map(|e| e.unwrap().file_name().into_string().unwrap()));
        }
    }
    out.sort();
    out
}

#[test]
fn a_shared_cache_gives_what_it_holds_and_the_hub_only_the_rest() {
    let mut s = Setup::new();
    // The download Job fetched the weights and the JSON files, not the rest.
    let hf_snapshot = s.fill_shared_cache(Some("*.safetensors,*.json"));
    let imported: u64 = ["model.safetensors", "config.json", "tokenizer_config.json"]
        .iter()
        .chain(&["1_Pooling/config.json"])
        .map(|p| size(&s.model.join(p)))
        .sum();
    let total: u64 = walkdir::WalkDir::new(&s.model)
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().is_file())
        .map(|e| e.metadata().unwrap().len())
        .sum();

    let store = s.store("store");
    let (snap, log) = s.pull(&store, "shared-cache,hub").unwrap();
    assert_same_tree(&s.model, &snap);
    let source = snapshots(&store)[0]["source"].as_str().unwrap().to_owned();
    let want = format!(
        "shared cache {} ({imported} bytes) + hub {} ({} bytes)",
        s.shared().join("hub").display(),
        s.endpoint,
        total - imported
    );
    assert_eq!(source, want, "{log}");
    // The store holds copies, not links into the shared volume.
    use std::os::unix::fs::MetadataExt;
    let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
    let pvc_weights = std::fs::canonicalize(hf_snapshot.join("model.safetensors")).unwrap();
    assert_ne!(ino(&snap.join("model.safetensors")), ino(&pvc_weights));

    // With the hub first, the hub gives everything and the shared cache nothing.
    let hub_first = s.store("hub-first");
    s.pull(&hub_first, "hub,shared-cache").unwrap();
    let source = snapshots(&hub_first)[0]["source"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(source, format!("hub {}", s.endpoint));
    s.hub.stop();
}

#[test]
fn without_a_hub_the_shared_cache_alone_serves_the_commit_its_refs_name() {
    let mut s = Setup::new();
    let hf_snapshot = s.fill_shared_cache(None);
    s.hub.stop();
    let store = s.store("store");
    // `pvc`, the tier's name before it was `shared-cache`, still works.
    let (snap, _) = s.pull(&store, "pvc").unwrap();
    assert_same_tree(&s.model, &snap);
    let commit = std::fs::read_to_string(s.folder().join("refs/main")).unwrap();
    assert_eq!(snap.file_name().unwrap().to_str(), Some(commit.trim()));
    assert_eq!(hf_snapshot.file_name(), snap.file_name());
    let row = &snapshots(&store)[0];
    assert_eq!(
        row["source"].as_str().unwrap(),
        format!("shared cache {}", s.shared().join("hub").display())
    );
    assert_eq!(row["revisions"], serde_json::json!(["main"]));

    // A revision the cache lacks is an error that says how to fill it.
    let err = agent_command(&[
        "pull",
        REPO,
        "--revision",
        "v2",
        "--store",
        store.to_str().unwrap(),
        "--shared-cache",
        s.shared().to_str().unwrap(),
        "--sources",
        "shared-cache",
    ])
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("holds no refs/v2 of org/model")
            && err.contains("huggingface-cli download org/model --revision v2"),
        "{err}"
    );
}

#[test]
fn a_lying_shared_cache_is_refused_and_nothing_it_gave_enters_the_store() {
    let mut s = Setup::new();
    let hf_snapshot = s.fill_shared_cache(None);
    let commit = hf_snapshot.file_name().unwrap().to_owned();

    // One flipped byte in the weights' blob.
    let weights_blob = std::fs::canonicalize(hf_snapshot.join("model.safetensors")).unwrap();
    let mut bytes = std::fs::read(&weights_blob).unwrap();
    bytes[4096] ^= 1;
    std::fs::write(&weights_blob, &bytes).unwrap();
    let store = s.store("alone");
    let err = s.pull(&store, "shared-cache").unwrap_err().to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("has hash sha256:"),
        "{err}"
    );
    assert!(snapshots(&store).is_empty());
    let weights_hash = weights_blob.file_name().unwrap().to_str().unwrap();
    assert!(
        !blobs(&store).iter().any(|b| b == weights_hash),
        "the corrupt weights entered the store"
    );

    // A snapshot entry that leads out of the repo folder, to a file outside the shared volume.
    let secret = s.dir.path().join("secret.json");
    std::fs::write(&secret, br#"{"secret":"another tenant's"}"#).unwrap();
    let escape = s
        .folder()
        .join("snapshots")
        .join(&commit)
        .join("escape.json");
    std::os::unix::fs::symlink("../../../../../secret.json", &escape).unwrap();
    assert!(
        std::fs::read(&escape).is_ok(),
        "the link does lead to the secret"
    );
    let err = s
        .pull(&s.store("escape"), "shared-cache")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("escape.json") && err.contains("not to ../blobs/") && err.contains("refused"),
        "{err}"
    );
    assert!(snapshots(&s.store("escape")).is_empty());
    std::fs::remove_file(&escape).unwrap();

    // A config blob swapped for a symlink to that file.
    let config_blob = std::fs::canonicalize(hf_snapshot.join("config.json")).unwrap();
    std::fs::remove_file(&config_blob).unwrap();
    std::os::unix::fs::symlink(&secret, &config_blob).unwrap();
    let err = s
        .pull(&s.store("escape"), "shared-cache")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("is a symlink") && err.contains("refused"),
        "{err}"
    );
    assert!(snapshots(&s.store("escape")).is_empty());

    // With the hub as the next tier, what the shared cache cannot give truthfully comes from
    // the hub.
    let store = s.store("repaired");
    let (snap, log) = s.pull(&store, "shared-cache,hub").unwrap();
    assert_same_tree(&s.model, &snap);
    assert!(
        log.contains("has hash") && log.contains("is a symlink"),
        "the refusals are logged:\n{log}"
    );
    let source = snapshots(&store)[0]["source"].as_str().unwrap().to_owned();
    let from_hub = size(&s.model.join("model.safetensors")) + size(&s.model.join("config.json"));
    assert!(source.ends_with(&format!("({from_hub} bytes)")), "{source}");
    assert!(
        !std::fs::read_to_string(snap.join("config.json"))
            .unwrap()
            .contains("tenant"),
    );
    s.hub.stop();
}

/// The agent as a node runs it: `run --shared-cache … --sources pvc`, no hub at all, and a pod
/// volume published through the CSI plugin shows the model the download Job put on the share.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_without_a_hub_publishes_volumes_from_the_shared_cache() {
    let mut s = Setup::new();
    s.fill_shared_cache(None);
    s.hub.stop();
    let shared = s.shared();
    let metrics = free_loopback_addr();
    let mut node = LocalNode::start_with(
        &s.dir.path().join("node"),
        // Nothing listens there: a hub asked anything would fail the publish.
        Hub::Remote("http://127.0.0.1:9".into()),
        10,
        &[
            "--shared-cache",
            shared.to_str().unwrap(),
            "--sources",
            "shared-cache",
            "--metrics-listen",
            &metrics,
        ],
    )
    .unwrap();
    let target = node.target("vol-pvc");
    node.publish("vol-pvc", &target, &[("model", REPO)], |st| {
        eprintln!("publish: {} (retrying as kubelet would)", st.message())
    })
    .await
    .unwrap();
    assert_same_tree(&s.model, &target);
    let opts = mount_options(&target).expect("mounted");
    assert!(opts.iter().any(|o| o == "ro"), "{opts:?}");
    // Every byte came from the share, none from a hub.
    let (status, body) = http_get(&metrics, "/metrics").unwrap();
    assert_eq!(status, 200);
    let fetched = |source: &str| -> u64 {
        let series = format!("modelcache_fetched_bytes_total{{source=\"{source}\"}}");
        body.lines()
            .find_map(|l| l.strip_prefix(series.as_str())?.trim().parse().ok())
            .unwrap_or(0)
    };
    assert!(fetched("shared-cache") > 0, "{body}");
    assert_eq!(fetched("hub"), 0, "{body}");
    node.unpublish("vol-pvc", &target).await.unwrap();
}
