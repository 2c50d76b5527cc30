//! Compilation-cache volumes, for real: the agent makes an ext4 image per cache, the plugin
//! loop-mounts it in the store and binds it into pods writable, nosuid, nodev. Pods of one
//! namespace share a cache, another namespace gets its own; `maxSize` is the filesystem's size;
//! an unmounted cache is evicted under pressure, a mounted one never; concurrent writers with
//! vLLM's locking end with one complete cache; hostile attributes change nothing. Needs root.

use modelcache_proto::csi_v1 as csi;
use modelcache_tests::models::python;
use modelcache_tests::node::{Hub, LocalNode, publish_request};
use modelcache_tests::procs::{agent_command, free_port, http_get};
use modelcache_tests::tree::{mount_count, mount_options};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tonic::Code;

/// A node with an empty hub (cache volumes need none) and these extra agent flags.
fn node(dir: &Path, agent_extra: &[&str]) -> LocalNode {
    let hub = dir.join("hub");
    std::fs::create_dir_all(hub.join("models")).unwrap();
    LocalNode::start_with(&dir.join("node"), Hub::Serve(hub, vec![]), 10, agent_extra).unwrap()
}

/// The publish kubelet sends for an inline cache volume of a pod in `namespace`.
fn cache_request(
    volume: &str,
    target: &Path,
    namespace: &str,
    attrs: &[(&str, &str)],
) -> csi::NodePublishVolumeRequest {
    use csi::volume_capability::access_mode::Mode;
    let mut req = publish_request(volume, target, attrs, &[]);
    req.volume_context
        .insert("csi.storage.k8s.io/pod.namespace".into(), namespace.into());
    req.volume_context.insert(
        "csi.storage.k8s.io/pod.name".into(),
        format!("pod-{volume}"),
    );
    req.readonly = false;
    if let Some(cap) = req.volume_capability.as_mut() {
        cap.access_mode = Some(csi::volume_capability::AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        });
    }
    req
}

async fn publish(
    node: &mut LocalNode,
    req: csi::NodePublishVolumeRequest,
) -> Result<(), tonic::Status> {
    node.node.node_publish_volume(req).await.map(drop)
}

/// `ls --json`'s caches.
fn caches(node: &LocalNode) -> Vec<serde_json::Value> {
    let out = agent_command(&["ls", "--json", "--store", node.store().to_str().unwrap()]).unwrap();
    let inv: serde_json::Value = serde_json::from_str(&out).unwrap();
    inv["caches"].as_array().cloned().unwrap_or_default()
}

fn cache_dir(node: &LocalNode, dir_name: &str) -> PathBuf {
    node.store().join("caches").join(dir_name)
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_of_a_namespace_share_a_cache_that_outlives_them_and_other_namespaces_do_not_see_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = node(dir.path(), &[]);
    node.wait_ready().await.unwrap();
    let attrs = [("cache", "vllm"), ("maxSize", "64Mi")];
    let (a, b, c) = (
        node.target("vol-a"),
        node.target("vol-b"),
        node.target("vol-c"),
    );
    publish(&mut node, cache_request("vol-a", &a, "team-a", &attrs))
        .await
        .unwrap();
    publish(&mut node, cache_request("vol-b", &b, "team-a", &attrs))
        .await
        .unwrap();
    publish(&mut node, cache_request("vol-c", &c, "team-b", &attrs))
        .await
        .unwrap();

    // Writable, nosuid, nodev.
    let opts = mount_options(&a).expect("vol-a is mounted");
    for want in ["rw", "nosuid", "nodev"] {
        assert!(opts.iter().any(|o| o == want), "{opts:?}");
    }
    // What one pod of team-a writes, the other sees; team-b does not.
    std::fs::create_dir_all(a.join("torch_compile_cache/abc/rank_0_0")).unwrap();
    std::fs::write(
        a.join("torch_compile_cache/abc/rank_0_0/graph.py"),
        b"compiled",
    )
    .unwrap();
    assert_eq!(
        std::fs::read(b.join("torch_compile_cache/abc/rank_0_0/graph.py")).unwrap(),
        b"compiled"
    );
    assert!(!c.join("torch_compile_cache").exists());
    // The root is open to any user, sticky, as /tmp.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&a).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o1777, "{mode:o}");

    let listed = caches(&node);
    let names: Vec<&str> = listed
        .iter()
        .map(|c| c["cache"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["team-a/vllm", "team-b/vllm"]);
    assert_eq!(listed[0]["max_size"], 64 << 20);
    assert_eq!(
        listed[0]["mounted_by"],
        serde_json::json!(["team-a/pod-vol-a", "team-a/pod-vol-b"])
    );

    // A retried publish succeeds and changes nothing.
    publish(&mut node, cache_request("vol-a", &a, "team-a", &attrs))
        .await
        .unwrap();
    assert_eq!(mount_count(&a), 1);

    // Both pods go: the image is unmounted, the cache stays on the node.
    let mnt = cache_dir(&node, "ns.team-a.vllm").join("mnt");
    node.unpublish("vol-a", &a).await.unwrap();
    assert_eq!(mount_count(&mnt), 1, "still in use by vol-b");
    node.unpublish("vol-b", &b).await.unwrap();
    assert_eq!(mount_count(&mnt), 0, "the last volume left");
    let image = cache_dir(&node, "ns.team-a.vllm").join("image.ext4");
    assert_eq!(
        loop_devices_of(&image),
        0,
        "the loop device detached with its last mount"
    );
    assert!(!a.exists() && !b.exists());
    let listed = caches(&node);
    assert_eq!(listed[0]["mounted_by"], serde_json::json!([]));

    // The next pod of team-a finds what the first compiled.
    let d = node.target("vol-d");
    publish(&mut node, cache_request("vol-d", &d, "team-a", &attrs))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(d.join("torch_compile_cache/abc/rank_0_0/graph.py")).unwrap(),
        b"compiled"
    );
    node.unpublish("vol-d", &d).await.unwrap();
    node.unpublish("vol-c", &c).await.unwrap();
    assert_eq!(
        mount_count(&cache_dir(&node, "ns.team-b.vllm").join("mnt")),
        0
    );
}

/// How many loop devices are attached to `image`.
fn loop_devices_of(image: &Path) -> usize {
    let want = std::fs::canonicalize(image).unwrap();
    std::fs::read_dir("/sys/block")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("loop/backing_file")).ok())
        .filter(|b| Path::new(b.trim()) == want)
        .count()
}

/// A plugin in a container loses its mounts of cache images when it restarts, while pods keep
/// theirs (and the loop device): the next publish must mount the device already attached, as
/// a second device over the same image would corrupt it.
#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_plugin_mounts_the_loop_device_a_cache_already_has() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = node(dir.path(), &[]);
    node.wait_ready().await.unwrap();
    let (a, b) = (node.target("vol-a"), node.target("vol-b"));
    publish(
        &mut node,
        cache_request("vol-a", &a, "ns", &[("cache", "vllm")]),
    )
    .await
    .unwrap();
    let image = cache_dir(&node, "ns.ns.vllm").join("image.ext4");
    let mnt = cache_dir(&node, "ns.ns.vllm").join("mnt");
    assert_eq!(loop_devices_of(&image), 1);
    node.restart_csi().await.unwrap();
    // As the restarted container sees it: the image's mount gone, the pod's still there.
    nix::mount::umount2(&mnt, nix::mount::MntFlags::MNT_DETACH).unwrap();
    assert_eq!(mount_count(&mnt), 0);
    publish(
        &mut node,
        cache_request("vol-b", &b, "ns", &[("cache", "vllm")]),
    )
    .await
    .unwrap();
    assert_eq!(
        loop_devices_of(&image),
        1,
        "a second loop device over one image"
    );
    // One filesystem: each pod sees what the other writes.
    std::fs::write(a.join("from-a"), b"a").unwrap();
    std::fs::write(b.join("from-b"), b"b").unwrap();
    assert_eq!(std::fs::read(b.join("from-a")).unwrap(), b"a");
    assert_eq!(std::fs::read(a.join("from-b")).unwrap(), b"b");
    node.unpublish("vol-a", &a).await.unwrap();
    node.unpublish("vol-b", &b).await.unwrap();
    assert_eq!(loop_devices_of(&image), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cache_full_at_its_max_size_says_enospc_and_the_node_is_unharmed() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = node(dir.path(), &[]);
    node.wait_ready().await.unwrap();
    let t = node.target("vol");
    let attrs = [("cache", "small"), ("maxSize", "32Mi")];
    publish(&mut node, cache_request("vol", &t, "ns", &attrs))
        .await
        .unwrap();
    let free_before = nix::sys::statvfs::statvfs(&node.store()).unwrap();
    // 64 MiB into a 32 MiB cache: the cache's own filesystem refuses.
    let chunk = vec![7u8; 1 << 20];
    let mut file = std::fs::File::create(t.join("big")).unwrap();
    let mut written = 0u64;
    let err = loop {
        use std::io::Write;
        match file.write_all(&chunk).and_then(|()| file.sync_data()) {
            Ok(()) => written += chunk.len() as u64,
            Err(e) => break e,
        }
        assert!(
            written <= 64 << 20,
            "wrote {written} bytes into a 32 MiB cache"
        );
    };
    drop(file);
    assert_eq!(err.raw_os_error(), Some(nix::libc::ENOSPC), "{err}");
    assert!(written < 32 << 20, "{written}");
    // The store's filesystem lost at most the cache's size.
    let free_after = nix::sys::statvfs::statvfs(&node.store()).unwrap();
    let frag = free_after.fragment_size();
    let lost = (free_before
        .blocks_available()
        .saturating_sub(free_after.blocks_available()))
        * frag;
    assert!(lost <= 36 << 20, "the store's filesystem lost {lost} bytes");
    // Freeing space in the cache lets it be written again.
    std::fs::remove_file(t.join("big")).unwrap();
    std::fs::write(t.join("again"), vec![1u8; 8 << 20]).unwrap();
    // A second cache is untouched by the first one's fill.
    let u = node.target("vol-2");
    publish(
        &mut node,
        cache_request("vol-2", &u, "ns", &[("cache", "other")]),
    )
    .await
    .unwrap();
    std::fs::write(u.join("f"), b"ok").unwrap();
    node.unpublish("vol", &t).await.unwrap();
    node.unpublish("vol-2", &u).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_cache_attributes_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = node(
        dir.path(),
        &["--cache-default-size", "64Mi", "--cache-max-size", "1Gi"],
    );
    node.wait_ready().await.unwrap();
    let t = node.target("vol");
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("cache", "../../etc")], "cache name"),
        (&[("cache", "a/b")], "cache name"),
        (&[("cache", "")], "cache name"),
        (&[("cache", "x"), ("scope", "node")], "StorageClass"),
        (&[("cache", "x"), ("maxSize", "2Gi")], "maxSize"),
        (&[("cache", "x"), ("maxSize", "1Ki")], "maxSize"),
        (
            &[("cache", "x"), ("maxSize", "99999999999999999999Ti")],
            "maxSize",
        ),
        (
            &[("cache", "x"), ("model", "org/m")],
            "not an attribute of a cache",
        ),
    ];
    for (attrs, says) in cases {
        let e = publish(&mut node, cache_request("vol", &t, "ns", attrs))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{attrs:?}: {e:?}");
        assert!(e.message().contains(says), "{attrs:?}: {}", e.message());
        assert!(!t.exists(), "{attrs:?} created the target");
    }
    // A namespace that is not one (kubelet would never send it): refused by the agent too.
    let e = publish(
        &mut node,
        cache_request("vol", &t, "../etc", &[("cache", "x")]),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(caches(&node).is_empty());
    let entries: Vec<_> = std::fs::read_dir(node.store().join("caches"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != "caches.json")
        .collect();
    assert!(entries.is_empty(), "{entries:?}");
}

/// vLLM's pattern: take a file lock in the cache, compile only if the ready marker is absent,
/// write the artifacts and then the marker, release.
const WRITER: &str = r##"
import fcntl, os, sys, time
root, me = sys.argv[1], sys.argv[2]
d = os.path.join(root, "torch_compile_cache", "hash0", "rank_0_0")
os.makedirs(d, exist_ok=True)
with open(os.path.join(root, "torch_compile_cache", "hash0", ".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(os.path.join(d, "READY")):
        for i in range(20):
            with open(os.path.join(d, f"kernel_{i}.py"), "w") as f:
                f.write(f"# compiled by {me}\n" + "x" * 4096)
            time.sleep(0.01)
        with open(os.path.join(d, "compiled_by"), "a") as f:
            f.write(me + "\n")
        open(os.path.join(d, "READY"), "w").close()
    fcntl.flock(lock, fcntl.LOCK_UN)
"##;

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_writers_with_vllms_locking_end_with_one_complete_cache() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = node(dir.path(), &[]);
    node.wait_ready().await.unwrap();
    let mut targets = Vec::new();
    for v in ["w-1", "w-2", "w-3"] {
        let t = node.target(v);
        publish(&mut node, cache_request(v, &t, "ns", &[("cache", "vllm")]))
            .await
            .unwrap();
        targets.push((v, t));
    }
    // Three pods start at once, each through its own mount of the cache.
    let children: Vec<_> = targets
        .iter()
        .map(|(v, t)| {
            Command::new(python())
                .args(["-c", WRITER])
                .arg(t)
                .arg(v)
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                assert!(status.success());
                break;
            }
            assert!(Instant::now() < deadline, "a writer still runs after 60 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let d = targets[0].1.join("torch_compile_cache/hash0/rank_0_0");
    let compiled_by = std::fs::read_to_string(d.join("compiled_by")).unwrap();
    assert_eq!(compiled_by.lines().count(), 1, "{compiled_by}");
    let writer = compiled_by.trim();
    assert!(d.join("READY").exists());
    for i in 0..20 {
        let text = std::fs::read_to_string(d.join(format!("kernel_{i}.py"))).unwrap();
        assert!(
            text.starts_with(&format!("# compiled by {writer}\n")),
            "kernel_{i}"
        );
        assert_eq!(text.len(), format!("# compiled by {writer}\n").len() + 4096);
    }
    for (v, t) in &targets {
        node.unpublish(v, t).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn under_pressure_an_unmounted_cache_is_evicted_and_a_mounted_one_never() {
    let dir = tempfile::tempdir().unwrap();
    // The store counts as full at 64 MiB; eviction starts above 50% (32 MiB).
    let metrics = format!("127.0.0.1:{}", free_port().unwrap());
    let mut node = node(
        dir.path(),
        &[
            "--max-store-gib",
            "0.0625",
            "--high-watermark",
            "50",
            "--low-watermark",
            "40",
            "--metrics-listen",
            &metrics,
        ],
    );
    node.wait_ready().await.unwrap();
    let (idle, busy) = (node.target("idle"), node.target("busy"));
    let attrs = [("cache", "old"), ("maxSize", "32Mi")];
    publish(&mut node, cache_request("idle", &idle, "ns", &attrs))
        .await
        .unwrap();
    std::fs::write(idle.join("f"), vec![1u8; 20 << 20]).unwrap();
    node.unpublish("idle", &idle).await.unwrap();
    let attrs = [("cache", "new"), ("maxSize", "32Mi")];
    publish(&mut node, cache_request("busy", &busy, "ns", &attrs))
        .await
        .unwrap();
    let data = vec![2u8; 20 << 20];
    std::fs::write(busy.join("f"), &data).unwrap();
    // A cache whose pin went while its image is still mounted (a plugin that skipped its
    // unmount): the agent sees the mount and leaves it.
    let stuck = node.target("stuck");
    let attrs = [("cache", "stuck"), ("maxSize", "16Mi")];
    publish(&mut node, cache_request("stuck", &stuck, "ns", &attrs))
        .await
        .unwrap();
    std::fs::write(stuck.join("f"), b"kept").unwrap();
    node.agent
        .unpin(modelcache_proto::agent_v1::UnpinRequest {
            volume_id: "stuck".into(),
            target_path: stuck.display().to_string(),
        })
        .await
        .unwrap();
    nix::unistd::sync();
    // About 40 MiB of 64: the evictor (every 2 s) removes the idle cache, not the mounted one.
    let deadline = Instant::now() + Duration::from_secs(30);
    while cache_dir(&node, "ns.ns.old").exists() {
        assert!(
            Instant::now() < deadline,
            "the idle cache is still there after 30 s:\n{}",
            node.agent_log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let names: Vec<String> = caches(&node)
        .iter()
        .map(|c| c["cache"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["ns/new", "ns/stuck"]);
    assert_eq!(std::fs::read(stuck.join("f")).unwrap(), b"kept");
    assert!(cache_dir(&node, "ns.ns.stuck").join("image.ext4").exists());
    // Still over the watermark with only the mounted cache left: it stays, whole.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(std::fs::read(busy.join("f")).unwrap(), data);
    // Seen in the metrics: two caches left, one mounted, one evicted.
    let (status, body) = http_get(&metrics, "/metrics").unwrap();
    assert_eq!(status, 200);
    let value = |prefix: &str| -> u64 {
        body.lines()
            .filter_map(|l| l.strip_prefix(prefix))
            .filter_map(|rest| rest.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    assert_eq!(value("modelcache_caches "), 2, "{body}");
    assert_eq!(value("modelcache_cache_volumes "), 1, "{body}");
    assert!(value("modelcache_cache_bytes ") >= 20 << 20, "{body}");
    assert_eq!(value("modelcache_cache_evictions_total{"), 1, "{body}");
    let log = node.agent_log();
    assert!(
        log.contains("evicted a cache no volume has mounted"),
        "{log}"
    );
    assert!(
        log.contains("not evicting a cache whose image is still mounted"),
        "{log}"
    );
    node.unpublish("busy", &busy).await.unwrap();
}
