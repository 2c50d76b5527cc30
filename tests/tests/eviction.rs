//! Eviction on a small real filesystem: the store on a 96 MiB tmpfs, models of ~16 MiB, and a
//! churn of publishes and unpublishes whose total is twice the disk. After every step usage is
//! back under the high watermark within seconds, the volume mounted throughout never changes,
//! and every eviction is in the agent's log. Also: a model larger than the disk is refused early
//! with the sizes, and pins follow the mount table across a crash that loses `pins.json`.
//! Needs root (tmpfs, bind mounts); fails, never skips, without it.

use modelcache_tests::models::generate_model;
use modelcache_tests::node::{Hub, LocalNode};
use modelcache_tests::procs::{free_port, http_get, require_root};
use modelcache_tests::tree::{assert_same_tree, read_tree};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tonic::{Code, Status};

const DISK: u64 = 96 << 20;
const HIGH: u64 = 70;
const LOW: u64 = 50;

/// A tmpfs mounted at a path, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, bytes: u64) -> Tmpfs {
        use nix::mount::{MsFlags, mount};
        std::fs::create_dir_all(path).unwrap();
        let opts = format!("size={bytes},mode=0755");
        mount(
            Some("tmpfs"),
            path,
            Some("tmpfs"),
            MsFlags::empty(),
            Some(opts.as_str()),
        )
        .expect("mount a tmpfs (root needed)");
        Tmpfs(path.to_path_buf())
    }

    /// Used bytes, in percent of the size.
    fn used_pct(&self) -> u64 {
        let st = nix::sys::statvfs::statvfs(&self.0).unwrap();
        let total = st.blocks() * st.fragment_size();
        let avail = st.blocks_available() * st.fragment_size();
        (total - avail) * 100 / total
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn log_retry(s: &Status) {
    eprintln!("publish: {} (retrying as kubelet would)", s.message());
}

/// Publishes and unpublishes `org/m<i>` for each `i`, as pods that come and go, checking after
/// each that the disk is back under the high watermark and that `kept` still shows `before`.
async fn churn(
    node: &mut LocalNode,
    fs: &Tmpfs,
    hub_root: &Path,
    models: std::ops::Range<usize>,
    (kept, before): (&Path, &BTreeMap<String, Vec<u8>>),
) {
    for i in models {
        let model = format!("org/m{i}");
        let volume = format!("vol-{i}-{}", fs.used_pct());
        let target = node.target(&volume);
        node.publish(&volume, &target, &[("model", &model)], log_retry)
            .await
            .unwrap();
        assert_same_tree(&hub_root.join("models").join(&model), &target);
        node.unpublish(&volume, &target).await.unwrap();
        let waited = wait_under_high(fs, node, &volume);
        eprintln!(
            "{volume}: {}% used, under the watermark after {waited:?}",
            fs.used_pct()
        );
        assert_eq!(
            &read_tree(kept),
            before,
            "{volume}: the mounted model changed"
        );
    }
}

/// Waits until the store's disk is at or under the high watermark; the time it took.
fn wait_under_high(fs: &Tmpfs, node: &LocalNode, step: &str) -> Duration {
    let start = Instant::now();
    while fs.used_pct() > HIGH {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{step}: still {}% used after 10 s\n{}",
            fs.used_pct(),
            node.agent_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

struct Setup {
    dir: tempfile::TempDir,
    hub_root: PathBuf,
    /// Where the agent serves its metrics.
    metrics: String,
}

impl Setup {
    /// Six models of 16 MiB of weights each (96 MiB in all: the whole disk) and one of 128 MiB.
    fn new() -> Setup {
        require_root().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let hub_root = dir.path().join("hub");
        for i in 0..6 {
            generate_model(&hub_root.join(format!("models/org/m{i}")), 16 << 20).unwrap();
        }
        generate_model(&hub_root.join("models/org/huge"), 128 << 20).unwrap();
        let metrics = format!("127.0.0.1:{}", free_port().unwrap());
        Setup {
            dir,
            hub_root,
            metrics,
        }
    }

    /// The value of a metric line that starts with `series` (name and labels).
    fn metric(&self, series: &str) -> u64 {
        let (status, body) = http_get(&self.metrics, "/metrics").unwrap();
        assert_eq!(status, 200);
        let value = body
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok());
        // A counter never incremented has no series yet: it is zero, if its family is there.
        let name = series.split('{').next().unwrap_or(series);
        let family = name.strip_suffix("_total").unwrap_or(name);
        let declared = body
            .lines()
            .any(|l| l == format!("# TYPE {family} counter"));
        match value {
            Some(v) => v,
            None if declared && name.ends_with("_total") => 0,
            None => panic!("no {series} in\n{body}"),
        }
    }

    fn node_dir(&self) -> PathBuf {
        self.dir.path().join("node")
    }

    /// The node, its store on a fresh [`DISK`]-sized tmpfs, eviction at [`HIGH`] / [`LOW`].
    fn start(&self) -> (Tmpfs, LocalNode) {
        self.start_with_hub(&[])
    }

    /// [`Setup::start`], with extra `modelcache-hub` flags.
    fn start_with_hub(&self, hub_flags: &[&str]) -> (Tmpfs, LocalNode) {
        self.start_with(hub_flags, HIGH, LOW)
    }

    /// [`Setup::start_with_hub`], with these watermarks.
    fn start_with(&self, hub_flags: &[&str], high: u64, low: u64) -> (Tmpfs, LocalNode) {
        let fs = Tmpfs::mount(&self.node_dir().join("store"), DISK);
        let hub_flags = hub_flags.iter().map(|f| (*f).to_owned()).collect();
        let node = LocalNode::start_with(
            &self.node_dir(),
            Hub::Serve(self.hub_root.clone(), hub_flags),
            20,
            &[
                "--high-watermark",
                &high.to_string(),
                "--low-watermark",
                &low.to_string(),
                "--metrics-listen",
                &self.metrics,
            ],
        )
        .unwrap();
        (fs, node)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_churn_twice_the_disk_stays_under_the_watermark_and_never_touches_a_mounted_model() {
    let s = Setup::new();
    let (fs, mut node) = s.start();

    // m0 stays mounted throughout; a file of it is held open too.
    let kept = node.target("vol-kept");
    node.publish("vol-kept", &kept, &[("model", "org/m0")], log_retry)
        .await
        .unwrap();
    let before = read_tree(&kept);
    let open_weights = std::fs::File::open(kept.join("model.safetensors")).unwrap();

    // Publish and unpublish the others, twice over: 160 MiB through a 96 MiB disk.
    let steps = 10;
    for _ in 0..2 {
        churn(&mut node, &fs, &s.hub_root, 1..6, (&kept, &before)).await;
    }
    // Something else fills the disk past the high watermark: the watch evicts on its own,
    // within seconds, what no volume uses.
    let ballast = fs.0.join("ballast");
    std::fs::write(&ballast, vec![1u8; 20 << 20]).unwrap();
    let waited = wait_under_high(&fs, &node, "ballast");
    eprintln!("ballast: {}% used after {waited:?}", fs.used_pct());
    assert!(
        s.metric("modelcache_evictions_total{reason=\"high-watermark\"}") > 0,
        "the watch evicted past the high watermark, and counted it"
    );
    std::fs::remove_file(&ballast).unwrap();
    assert_eq!(
        read_tree(&kept),
        before,
        "ballast: the mounted model changed"
    );

    use std::os::unix::fs::FileExt;
    let mut head = [0u8; 4096];
    open_weights.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(&head[..], &before["model.safetensors"][..4096]);
    drop(open_weights);

    // Every eviction is recorded with its reason, model, commit and bytes; m0 never is.
    let log = node.agent_log();
    let evictions: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("evicted snapshot"))
        .collect();
    assert!(
        evictions.len() >= steps / 2,
        "{} evictions for {steps} models through a disk that holds 3: {log}",
        evictions.len()
    );
    for line in &evictions {
        for field in [
            "reason",
            "model.repo",
            "model.commit",
            "bytes",
            "idle_seconds",
        ] {
            assert!(line.contains(field), "{field} missing: {line}");
        }
        assert!(
            !line.contains("org/m0"),
            "the mounted model was evicted: {line}"
        );
    }
    let snaps = node.snapshots_of("org/m0").await.unwrap();
    assert_eq!(snaps[0].pinned_by, ["vol-kept"]);

    // The metrics count the same evictions, and what the store holds now.
    let counted: u64 = ["make-room", "high-watermark"]
        .iter()
        .map(|r| s.metric(&format!("modelcache_evictions_total{{reason=\"{r}\"}}")))
        .sum();
    assert_eq!(counted as usize, evictions.len(), "metrics and log agree");
    assert!(s.metric("modelcache_evicted_bytes_total{reason=\"make-room\"}") >= 16 << 20);
    assert_eq!(s.metric("modelcache_pins"), 1);
    // Eleven publishes: those whose model was still in the store were hits (none, when eviction
    // kept up: five models cycled through a disk of three is LRU's worst case).
    let misses = s.metric("modelcache_publishes_total{result=\"miss\"}");
    let hits = s.metric("modelcache_publishes_total{result=\"hit\"}");
    assert_eq!(hits + misses, 11);
    assert!(
        misses >= 8,
        "the disk holds three models: most second rounds miss ({misses})"
    );
    // Each miss fetched its model's weights from the hub, and its small files at most.
    let model_bytes: u64 = walkdir::WalkDir::new(s.hub_root.join("models/org/m0"))
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .map(|e| e.metadata().unwrap().len())
        .sum();
    let fetched = s.metric("modelcache_fetched_bytes_total{source=\"hub\"}");
    assert!(
        (misses * (16 << 20)..=misses * model_bytes).contains(&fetched),
        "{fetched}"
    );
    assert_eq!(s.metric("modelcache_fetches_total{result=\"ok\"}"), misses);
    assert_eq!(s.metric("modelcache_store_filesystem_capacity_bytes"), DISK);
    assert_eq!(http_get(&s.metrics, "/readyz").unwrap().0, 200);
    assert_eq!(http_get(&s.metrics, "/healthz").unwrap().0, 200);
    assert_eq!(read_tree(&kept), before);
    node.unpublish("vol-kept", &kept).await.unwrap();
    drop(node);
    drop(fs);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_larger_than_the_disk_is_refused_early_with_the_sizes() {
    let s = Setup::new();
    let (fs, mut node) = s.start();
    let target = node.target("vol-huge");
    let err = node
        .publish("vol-huge", &target, &[("model", "org/huge")], log_retry)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    assert!(
        err.message().contains("does not fit in the store")
            && err.message().contains("needs 134217")
            && err.message().contains("bytes free"),
        "{}",
        err.message()
    );
    assert!(fs.used_pct() < 5, "nothing was written: {}%", fs.used_pct());
    // A model that fits still does.
    let ok = node.target("vol-ok");
    node.publish("vol-ok", &ok, &[("model", "org/m1")], log_retry)
        .await
        .unwrap();
    node.unpublish("vol-ok", &ok).await.unwrap();
    drop(node);
    drop(fs);
}

#[tokio::test(flavor = "multi_thread")]
async fn pins_follow_the_mount_table_across_a_crash_that_loses_them() {
    let s = Setup::new();
    let (fs, mut node) = s.start();
    let mounted = node.target("vol-mounted");
    node.publish("vol-mounted", &mounted, &[("model", "org/m1")], log_retry)
        .await
        .unwrap();
    let target = mounted.display().to_string();

    // The agent dies and pins.json is lost; a stale pin of a long-gone volume is left instead.
    node.crash_agent(|store| {
        let stale = serde_json::json!({
            "vol-gone": {
                "kind": "model", "repo": "org/m2", "commit": "c".repeat(40),
                "target_path": "/var/lib/kubelet/pods/gone/volumes/x/mount",
            }
        });
        std::fs::write(store.join("pins.json"), stale.to_string()).unwrap();
    })
    .await
    .unwrap();

    let snaps = node.snapshots_of("org/m1").await.unwrap();
    assert_eq!(snaps[0].pinned_by, [format!("recovered:{target}")]);
    let pins = std::fs::read_to_string(node.store().join("pins.json")).unwrap();
    assert!(
        !pins.contains("vol-gone"),
        "the stale pin was dropped: {pins}"
    );

    // Pressure now: the recovered pin keeps the mounted model.
    let before = read_tree(&mounted);
    churn(&mut node, &fs, &s.hub_root, 2..6, (&mounted, &before)).await;
    assert_same_tree(&s.hub_root.join("models/org/m1"), &mounted);
    node.unpublish("vol-mounted", &mounted).await.unwrap();
    drop(node);
    drop(fs);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_disk_that_fills_up_mid_download_is_evicted_and_the_download_tried_again() {
    let s = Setup::new();
    // 8 MB/s: a 16 MiB model takes two seconds, time to fill the disk under it. No watch
    // eviction (high watermark 100%): the watch's 2 s tick could free the disk between the
    // ballast and the download's next write, and the path under test is the download's own.
    let (fs, mut node) = s.start_with(&["--max-bytes-per-second", "8000000"], 100, 99);
    // Three models no volume uses: 48 MiB to give back. (No volume is kept mounted here.)
    let nothing_kept = s.dir.path().join("empty");
    std::fs::create_dir_all(&nothing_kept).unwrap();
    churn(
        &mut node,
        &fs,
        &s.hub_root,
        1..4,
        (&nothing_kept, &BTreeMap::new()),
    )
    .await;

    let target = node.target("vol-late");
    let publish = node.publish("vol-late", &target, &[("model", "org/m4")], log_retry);
    // Fill the disk to its last MiB once the download has written its first MiB.
    let staging = fs.0.join("staging");
    let filled = async {
        let started = Instant::now();
        while !std::fs::read_dir(&staging).unwrap().flatten().any(|e| {
            e.file_name().to_string_lossy().starts_with("blob-")
                && e.metadata().is_ok_and(|m| m.len() >= 1 << 20)
        }) {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "no download started"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // MiB by MiB, as the download keeps writing too: stop at the last MiB, or when the
        // disk is full already.
        use std::io::Write;
        let mut ballast = std::fs::File::create(fs.0.join("ballast")).unwrap();
        let mib = vec![1u8; 1 << 20];
        loop {
            let st = nix::sys::statvfs::statvfs(&fs.0).unwrap();
            if st.blocks_available() * st.fragment_size() <= 2 << 20 {
                break;
            }
            match ballast.write_all(&mib) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("writing the ballast: {e}"),
            }
        }
    };
    let ((), published) = tokio::join!(filled, publish);
    published.unwrap();
    assert_same_tree(&s.hub_root.join("models/org/m4"), &target);
    let log = node.agent_log();
    assert!(
        log.contains("the disk filled up during the download"),
        "the download met ENOSPC and was tried again:\n{log}"
    );
    std::fs::remove_file(fs.0.join("ballast")).unwrap();
    node.unpublish("vol-late", &target).await.unwrap();
    drop(node);
    drop(fs);
}

/// A disk filled to the last byte by something else: a warm publish still succeeds, because
/// recording its pin evicts an unused model when the write fails with ENOSPC, and the error class
/// (RESOURCE_EXHAUSTED, never INTERNAL) is kept when nothing can go.
#[tokio::test(flavor = "multi_thread")]
async fn a_warm_publish_on_a_full_disk_evicts_an_unused_model_and_succeeds() {
    require_root().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let hub_root = dir.path().join("hub");
    for i in 0..2 {
        generate_model(&hub_root.join(format!("models/org/m{i}")), 8 << 20).unwrap();
    }
    let node_dir = dir.path().join("node");
    let fs = Tmpfs::mount(&node_dir.join("store"), 40 << 20);
    // No background eviction (watermarks 100/99): only the pin path may make room.
    let mut node = LocalNode::start(&node_dir, Hub::Serve(hub_root.clone(), vec![]), 20).unwrap();
    node.wait_ready().await.unwrap();
    let (a, b) = (node.target("vol-a"), node.target("vol-b"));
    node.publish("vol-a", &a, &[("model", "org/m0")], log_retry)
        .await
        .unwrap();
    node.publish("vol-b", &b, &[("model", "org/m1")], log_retry)
        .await
        .unwrap();
    node.unpublish("vol-b", &b).await.unwrap();
    let before = read_tree(&a);

    // Fill the disk to the last byte.
    let filler = fs.0.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![7u8; 64 << 10];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.write_all(&[7u8; 512]);
    }
    assert_eq!(fs.used_pct(), 100);

    let c = node.target("vol-c");
    node.publish("vol-c", &c, &[("model", "org/m0")], log_retry)
        .await
        .unwrap();
    assert_same_tree(&hub_root.join("models/org/m0"), &c);
    assert!(
        node.snapshots_of("org/m1").await.unwrap().is_empty(),
        "the unused model made room"
    );
    assert_eq!(read_tree(&a), before, "the mounted model is untouched");

    // Nothing left to evict: the answer says the disk is full, in its class.
    let mut pad = std::fs::OpenOptions::new()
        .append(true)
        .open(&filler)
        .unwrap();
    {
        use std::io::Write;
        while pad.write_all(&[7u8; 4096]).is_ok() {}
    }
    let d = node.target("vol-d");
    let err = node
        .publish("vol-d", &d, &[("model", "org/m0")], log_retry)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    assert!(!d.exists(), "a refused publish leaves no target");
}

/// A download that failed (or an agent that died) leaves a partial file: it must not block the
/// next model for ever. Abandoned partials count as reclaimable and eviction deletes them.
#[tokio::test(flavor = "multi_thread")]
async fn an_abandoned_partial_download_never_blocks_a_model_that_fits() {
    require_root().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let hub_root = dir.path().join("hub");
    generate_model(&hub_root.join("models/org/fits"), 24 << 20).unwrap();
    let node_dir = dir.path().join("node");
    let fs = Tmpfs::mount(&node_dir.join("store"), 48 << 20);
    // What a failed download of another model left: 32 MiB written, with its journal.
    let partial = fs.0.join("partial");
    std::fs::create_dir_all(&partial).unwrap();
    let name = format!("sha256-{}", "e".repeat(64));
    std::fs::write(partial.join(&name), vec![1u8; 32 << 20]).unwrap();
    std::fs::write(
        partial.join(format!("{name}.chunks")),
        format!(
            "modelcache-partial v1 size={} chunk={}\n0\n1\n",
            64 << 20,
            16 << 20
        ),
    )
    .unwrap();
    let mut node = LocalNode::start(&node_dir, Hub::Serve(hub_root.clone(), vec![]), 20).unwrap();
    node.wait_ready().await.unwrap();
    let target = node.target("vol-fits");
    node.publish("vol-fits", &target, &[("model", "org/fits")], log_retry)
        .await
        .unwrap();
    assert_same_tree(&hub_root.join("models/org/fits"), &target);
    assert!(
        !partial.join(&name).exists(),
        "the abandoned partial was reclaimed"
    );
    assert!(
        node.agent_log()
            .contains("evicted abandoned partial downloads"),
        "{}",
        node.agent_log()
    );
}
