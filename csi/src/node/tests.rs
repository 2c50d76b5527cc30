use super::*;
use crate::attributes::VolumeAttributes;
use crate::mounter::FakeMounter;
use modelcache_proto::agent_v1 as pb;
use std::collections::HashMap;
use std::sync::Mutex;
use tonic::Code;

/// A pin the fake agent holds: repo, commit, snapshot directory.
type FakePin = (String, String, PathBuf);

/// An agent that answers from a script and records calls.
#[derive(Default)]
struct FakeAgent {
    calls: Mutex<Vec<String>>,
    fetching: Mutex<bool>,
    ensure_error: Mutex<Option<Status>>,
    /// What Ensure answers: the snapshot directory and its commit (`main` may move).
    ready: Mutex<(PathBuf, String)>,
    /// Pins by (volume, target): repo, commit, snapshot directory.
    pins: Mutex<HashMap<(String, String), FakePin>>,
    /// Held during ensure, to test concurrent calls.
    gate: tokio::sync::Mutex<()>,
    /// Cache pins by (volume, target): the cache's key.
    cache_pins: Mutex<HashMap<(String, String), String>>,
    /// The store, where caches live.
    store: PathBuf,
    /// When set, unpins are also written in this mounter's log, to check their order against
    /// the mount calls.
    mounter_log: Mutex<Option<Arc<FakeMounter>>>,
}

impl FakeAgent {
    /// A cache's image and mount point, as the agent lays them out.
    fn cache_paths(&self, key: &str) -> (PathBuf, PathBuf) {
        let dir = self.store.join("caches").join(key.replace('/', "."));
        (dir.join("image.ext4"), dir.join("mnt"))
    }
}

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

#[tonic::async_trait]
impl ModelAgent for FakeAgent {
    async fn ensure(
        &self,
        volume: &VolumeAttributes,
        token: Option<String>,
        _wait: Duration,
    ) -> std::result::Result<Answer, Status> {
        self.calls.lock().unwrap().push(format!(
            "ensure {} token={}",
            volume.model,
            token.is_some()
        ));
        let _g = self.gate.lock().await;
        if let Some(s) = self.ensure_error.lock().unwrap().clone() {
            return Err(s);
        }
        if *self.fetching.lock().unwrap() {
            return Ok(Answer::Fetching(pb::Fetching {
                commit: COMMIT.into(),
                bytes_done: 50 << 20,
                bytes_total: 200 << 20,
                files_done: 1,
                files_total: 4,
            }));
        }
        let (path, commit) = self.ready.lock().unwrap().clone();
        Ok(Answer::Ready { path, commit })
    }
    async fn pin(
        &self,
        volume_id: &str,
        volume: &VolumeAttributes,
        commit: &str,
        target: &str,
    ) -> std::result::Result<(), Status> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("pin {volume_id} {} {commit}", volume.model.repo));
        let (path, _) = self.ready.lock().unwrap().clone();
        self.pins.lock().unwrap().insert(
            (volume_id.into(), target.into()),
            (volume.model.repo.to_string(), commit.into(), path),
        );
        Ok(())
    }
    async fn ensure_cache(
        &self,
        _volume_id: &str,
        _cache: &crate::attributes::CacheAttributes,
        _target: &str,
    ) -> std::result::Result<pb::EnsureCacheResponse, Status> {
        // The real agent and real mounts: tests/tests/caches.rs. Here: the plugin's side.
        let key = _cache.key();
        self.calls
            .lock()
            .unwrap()
            .push(format!("ensure_cache {_volume_id} {key}"));
        self.cache_pins
            .lock()
            .unwrap()
            .insert((_volume_id.into(), _target.into()), key.clone());
        let (image, mnt) = self.cache_paths(&key);
        Ok(pb::EnsureCacheResponse {
            image_path: image.display().to_string(),
            mount_path: mnt.display().to_string(),
            max_size: 1 << 30,
        })
    }
    async fn unpin(&self, volume_id: &str, target: &str) -> std::result::Result<(), Status> {
        if let Some(m) = self.mounter_log.lock().unwrap().as_ref() {
            m.calls
                .lock()
                .unwrap()
                .push(format!("agent unpin {volume_id}"));
        }
        self.cache_pins
            .lock()
            .unwrap()
            .remove(&(volume_id.to_owned(), target.to_owned()));
        self.calls
            .lock()
            .unwrap()
            .push(format!("unpin {volume_id}"));
        self.pins
            .lock()
            .unwrap()
            .remove(&(volume_id.into(), target.into()));
        Ok(())
    }
    async fn get_pin(
        &self,
        volume_id: &str,
        target: &str,
    ) -> std::result::Result<Option<pb::PinInfo>, Status> {
        if let Some(key) = self
            .cache_pins
            .lock()
            .unwrap()
            .get(&(volume_id.to_owned(), target.to_owned()))
        {
            let (image, mnt) = self.cache_paths(key);
            return Ok(Some(pb::PinInfo {
                cache: key.clone(),
                cache_image: image.display().to_string(),
                paths: vec![mnt.display().to_string()],
                ..Default::default()
            }));
        }
        let pins = self.pins.lock().unwrap();
        Ok(pins
            .get(&(volume_id.into(), target.into()))
            .map(|(repo, commit, path)| pb::PinInfo {
                kind: pb::RepoKind::Model as i32,
                repo: repo.clone(),
                commit: commit.clone(),
                filter: String::new(),
                paths: vec![path.display().to_string()],
                ..Default::default()
            }))
    }
    async fn ready(&self) -> std::result::Result<(), Status> {
        Ok(())
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    mounter: Arc<FakeMounter>,
    agent: Arc<FakeAgent>,
    node: NodeService<Arc<FakeMounter>, FakeAgent>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mounter = Arc::new(FakeMounter::default());
    let agent = Arc::new(FakeAgent {
        ready: Mutex::new((dir.path().join("store/snap"), COMMIT.into())),
        store: dir.path().join("store"),
        ..Default::default()
    });
    let node = NodeService::new(
        "node-a".into(),
        mounter.clone(),
        agent.clone(),
        Duration::from_millis(10),
        Paths {
            store: dir.path().join("store"),
            target_root: Some(dir.path().join("pods")),
        },
    );
    Fixture {
        dir,
        mounter,
        agent,
        node,
    }
}

impl Fixture {
    fn snapshot(&self) -> PathBuf {
        self.agent.ready.lock().unwrap().0.clone()
    }
}

fn mount_cap() -> csi::VolumeCapability {
    use csi::volume_capability::{AccessMode, AccessType, MountVolume, access_mode::Mode};
    csi::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode {
            mode: Mode::MultiNodeReaderOnly as i32,
        }),
    }
}

fn publish_req(f: &Fixture, volume: &str, ctx: &[(&str, &str)]) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_id: volume.into(),
        target_path: f.dir.path().join("pods").join(volume).display().to_string(),
        volume_capability: Some(mount_cap()),
        volume_context: ctx
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..Default::default()
    }
}

fn calls(f: &Fixture) -> (Vec<String>, Vec<String>) {
    (
        f.agent.calls.lock().unwrap().clone(),
        f.mounter.calls.lock().unwrap().clone(),
    )
}

#[tokio::test]
async fn publish_pins_then_binds_read_only_and_is_idempotent() {
    let f = fixture();
    let mut req = publish_req(&f, "vol-1", &[("model", "org/m")]);
    req.secrets = HashMap::from([("token".to_owned(), "hf_x".to_owned())]);
    f.node.publish(req.clone()).await.unwrap();
    let target = PathBuf::from(&req.target_path);
    assert!(target.is_dir(), "target created");
    assert_eq!(f.mounter.source_of(&target), Some(f.snapshot()));
    let (agent, mounts) = calls(&f);
    assert_eq!(
        agent,
        [
            "ensure org/m@main token=true".to_owned(),
            format!("pin vol-1 org/m {COMMIT}")
        ]
    );
    assert_eq!(
        mounts,
        [format!(
            "bind_ro {} {}",
            f.snapshot().display(),
            target.display()
        )]
    );
    // Same request again: OK, no second mount.
    f.node.publish(req).await.unwrap();
    assert_eq!(calls(&f).1.len(), 1);
}

#[tokio::test]
async fn publish_over_other_content_is_already_exists() {
    let f = fixture();
    let req = publish_req(&f, "vol-1", &[("model", "org/m")]);
    let target = PathBuf::from(&req.target_path);
    f.mounter
        .mounts
        .lock()
        .unwrap()
        .insert(target, PathBuf::from("/elsewhere"));
    let err = f.node.publish(req).await.unwrap_err();
    assert_eq!(Status::from(err).code(), Code::AlreadyExists);
}

#[tokio::test]
async fn publish_while_fetching_is_unavailable_with_progress() {
    let f = fixture();
    *f.agent.fetching.lock().unwrap() = true;
    let err = f
        .node
        .publish(publish_req(&f, "vol-1", &[("model", "org/m")]))
        .await
        .unwrap_err();
    let status = Status::from(err);
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status
            .message()
            .contains("50.0 MiB of 200.0 MiB (25%), 1 of 4 files"),
        "{}",
        status.message()
    );
    assert!(calls(&f).1.is_empty(), "nothing mounted");
    assert_eq!(calls(&f).0.len(), 1, "not pinned");
}

#[tokio::test]
async fn agent_errors_keep_their_code_and_nothing_is_mounted() {
    let f = fixture();
    *f.agent.ensure_error.lock().unwrap() = Some(Status::not_found("repo org/m was not found"));
    let err = f
        .node
        .publish(publish_req(&f, "vol-1", &[("model", "org/m")]))
        .await
        .unwrap_err();
    let status = Status::from(err);
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("org/m was not found"));
    assert!(calls(&f).1.is_empty());
}

#[tokio::test]
async fn failed_mount_unpins() {
    let f = fixture();
    *f.mounter.fail_bind.lock().unwrap() = Some(1); // EPERM
    let err = f
        .node
        .publish(publish_req(&f, "vol-1", &[("model", "org/m")]))
        .await
        .unwrap_err();
    assert_eq!(Status::from(err).code(), Code::Internal);
    assert_eq!(calls(&f).0.last().unwrap(), "unpin vol-1");
}

#[tokio::test]
async fn invalid_requests_name_the_field_and_change_nothing() {
    let f = fixture();
    let base = publish_req(&f, "vol-1", &[("model", "org/m")]);
    let with = |f: fn(&mut csi::NodePublishVolumeRequest)| {
        let mut r = base.clone();
        f(&mut r);
        r
    };
    let mut cases: Vec<(csi::NodePublishVolumeRequest, &str)> = vec![
        (with(|r| r.volume_id = String::new()), "volume_id"),
        (with(|r| r.target_path = String::new()), "target_path"),
        (with(|r| r.target_path = "relative/x".into()), "target_path"),
        (
            with(|r| r.target_path = "/var/lib/kubelet/../../etc".into()),
            "target_path",
        ),
        (with(|r| r.volume_capability = None), "volume_capability"),
    ];
    let mut block = base.clone();
    block.volume_capability.as_mut().unwrap().access_type =
        Some(csi::volume_capability::AccessType::Block(Default::default()));
    cases.push((block, "block"));
    cases.push((
        publish_req(&f, "vol-1", &[("model", "../../etc/passwd")]),
        "\"model\"",
    ));
    cases.push((
        publish_req(&f, "vol-1", &[("model", "o/m"), ("layuot", "x")]),
        "\"layuot\"",
    ));
    for (req, want) in cases {
        let status = Status::from(f.node.publish(req).await.unwrap_err());
        assert_eq!(status.code(), Code::InvalidArgument, "{want}");
        assert!(
            status.message().contains(want),
            "{want}: {}",
            status.message()
        );
    }
    assert_eq!(calls(&f), (vec![], vec![]), "no agent or mount call");
}

#[tokio::test]
async fn concurrent_operation_on_a_volume_is_aborted() {
    let f = Arc::new(fixture());
    let gate = f.agent.gate.lock().await;
    let f2 = f.clone();
    let first = tokio::spawn(async move {
        f2.node
            .publish(publish_req(&f2, "vol-1", &[("model", "org/m")]))
            .await
    });
    // Wait until the first call holds the volume (it is blocked in ensure).
    while f.agent.calls.lock().unwrap().is_empty() {
        tokio::task::yield_now().await;
    }
    let err = f
        .node
        .publish(publish_req(&f, "vol-1", &[("model", "org/m")]))
        .await
        .unwrap_err();
    assert_eq!(Status::from(err).code(), Code::Aborted);
    // Another volume is not blocked by the lock (it waits on the agent, not on vol-1).
    drop(gate);
    first.await.unwrap().unwrap();
}

#[tokio::test]
async fn unpublish_unmounts_removes_and_unpins_idempotently() {
    let f = fixture();
    let req = publish_req(&f, "vol-1", &[("model", "org/m")]);
    f.node.publish(req.clone()).await.unwrap();
    let un = csi::NodeUnpublishVolumeRequest {
        volume_id: "vol-1".into(),
        target_path: req.target_path.clone(),
    };
    f.node.unpublish(un.clone()).await.unwrap();
    let target = PathBuf::from(&req.target_path);
    assert!(!target.exists());
    assert!(f.mounter.source_of(&target).is_none());
    assert_eq!(calls(&f).0.last().unwrap(), "unpin vol-1");
    // Again, with nothing there: still OK.
    f.node.unpublish(un).await.unwrap();
    let unmounts = calls(&f)
        .1
        .iter()
        .filter(|c| c.starts_with("unmount"))
        .count();
    assert_eq!(unmounts, 1);
}

fn unpublish_req(volume: &str, target: &str) -> csi::NodeUnpublishVolumeRequest {
    csi::NodeUnpublishVolumeRequest {
        volume_id: volume.into(),
        target_path: target.into(),
    }
}

#[tokio::test]
async fn a_retry_after_the_revision_moved_is_success_with_the_pinned_snapshot() {
    let f = fixture();
    let req = publish_req(&f, "vol-1", &[("model", "org/m")]);
    f.node.publish(req.clone()).await.unwrap();
    // `main` moves on between kubelet's call and its retry.
    *f.agent.ready.lock().unwrap() = (f.dir.path().join("store/next"), "f".repeat(40));
    f.node.publish(req.clone()).await.unwrap();
    let target = PathBuf::from(&req.target_path);
    assert_eq!(
        f.mounter.source_of(&target),
        Some(f.dir.path().join("store/snap"))
    );
    let (agent, mounts) = calls(&f);
    assert_eq!(mounts.len(), 1, "no second mount: {mounts:?}");
    assert_eq!(
        agent.len(),
        2,
        "the retry asks neither the hub nor for a pin: {agent:?}"
    );
    // Another model at the same target is still refused.
    let other = publish_req(&f, "vol-1", &[("model", "org/other")]);
    let err = f.node.publish(other).await.unwrap_err();
    assert_eq!(Status::from(err).code(), Code::AlreadyExists);
}

#[tokio::test]
async fn unpublish_of_another_volumes_target_unmounts_nothing_and_keeps_pins() {
    let f = fixture();
    let a = publish_req(&f, "vol-a", &[("model", "org/m")]);
    let b = publish_req(&f, "vol-b", &[("model", "org/m")]);
    f.node.publish(a.clone()).await.unwrap();
    f.node.publish(b.clone()).await.unwrap();
    let err = f
        .node
        .unpublish(unpublish_req("vol-b", &a.target_path))
        .await
        .unwrap_err();
    assert_eq!(Status::from(err).code(), Code::NotFound);
    assert!(
        f.mounter.source_of(Path::new(&a.target_path)).is_some(),
        "A still mounted"
    );
    let pins = f.agent.pins.lock().unwrap().clone();
    assert!(pins.contains_key(&("vol-a".into(), a.target_path.clone())));
    assert!(pins.contains_key(&("vol-b".into(), b.target_path.clone())));
}

#[tokio::test]
async fn one_volume_at_two_targets_keeps_the_other_pin() {
    // A ReadOnlyMany PVC used by two pods on one node: one volume id, two targets.
    let f = fixture();
    let first = publish_req(&f, "pv-1", &[("model", "org/m")]);
    let mut second = first.clone();
    second.target_path = f.dir.path().join("pods/other-pod").display().to_string();
    f.node.publish(first.clone()).await.unwrap();
    f.node.publish(second.clone()).await.unwrap();
    f.node
        .unpublish(unpublish_req("pv-1", &first.target_path))
        .await
        .unwrap();
    let pins = f.agent.pins.lock().unwrap().clone();
    assert_eq!(pins.len(), 1);
    assert!(pins.contains_key(&("pv-1".into(), second.target_path.clone())));
    assert!(
        f.mounter
            .source_of(Path::new(&second.target_path))
            .is_some()
    );
}

#[tokio::test]
async fn targets_are_confined_normalized_and_kept_out_of_the_store() {
    let f = fixture();
    let root = f.dir.path();
    for (target, want) in [
        ("/etc".to_owned(), "not below kubelet"),
        (root.join("pods").display().to_string(), "not below kubelet"),
        (
            root.join("store/snapshots/x").display().to_string(),
            "not below kubelet",
        ),
        ("/".to_owned(), "must not be /"),
    ] {
        let mut req = publish_req(&f, "vol-1", &[("model", "org/m")]);
        req.target_path = target.clone();
        let status = Status::from(f.node.publish(req).await.unwrap_err());
        assert_eq!(status.code(), Code::InvalidArgument, "{target}");
        assert!(
            status.message().contains(want),
            "{target}: {}",
            status.message()
        );
    }
    // Without confinement, the store and its parents are still refused.
    let open = NodeService::new(
        "n".into(),
        f.mounter.clone(),
        f.agent.clone(),
        Duration::from_millis(10),
        Paths {
            store: root.join("store"),
            target_root: None,
        },
    );
    for target in [root.join("store/snapshots/x"), root.to_path_buf()] {
        let mut req = publish_req(&f, "vol-1", &[("model", "org/m")]);
        req.target_path = target.display().to_string();
        let status = Status::from(open.publish(req).await.unwrap_err());
        assert!(
            status.message().contains("overlaps the store"),
            "{}",
            status.message()
        );
    }
    assert!(calls(&f).1.is_empty(), "nothing mounted");
    // `//` and `/./` are folded before the pin records the target.
    let mut req = publish_req(&f, "vol-1", &[("model", "org/m")]);
    let plain = req.target_path.clone();
    req.target_path = format!("{}/.//pods//vol-1", root.display());
    f.node.publish(req).await.unwrap();
    assert!(
        f.agent
            .pins
            .lock()
            .unwrap()
            .contains_key(&("vol-1".into(), plain))
    );
}

#[tokio::test]
async fn unpublish_leaves_what_modelcache_did_not_make_and_succeeds() {
    let f = fixture();
    let full = f.dir.path().join("pods/full");
    std::fs::create_dir_all(&full).unwrap();
    std::fs::write(full.join("keep"), b"user data").unwrap();
    let file = f.dir.path().join("pods/file");
    std::fs::write(&file, b"x").unwrap();
    for target in [&full, &file] {
        f.node
            .unpublish(unpublish_req("vol-1", &target.display().to_string()))
            .await
            .unwrap();
    }
    assert_eq!(std::fs::read(full.join("keep")).unwrap(), b"user data");
    assert!(file.exists());
}

#[tokio::test]
async fn an_agent_path_outside_the_store_is_never_mounted() {
    let f = fixture();
    *f.agent.ready.lock().unwrap() = (PathBuf::from("/etc"), COMMIT.into());
    let err = f
        .node
        .publish(publish_req(&f, "vol-1", &[("model", "org/m")]))
        .await
        .unwrap_err();
    let status = Status::from(err);
    assert_eq!(status.code(), Code::Internal);
    assert!(
        status.message().contains("not in the store"),
        "{}",
        status.message()
    );
    assert!(calls(&f).1.is_empty());
}

fn cache_req(f: &Fixture, volume: &str, namespace: &str) -> csi::NodePublishVolumeRequest {
    publish_req(
        f,
        volume,
        &[
            ("cache", "vllm"),
            ("csi.storage.k8s.io/pod.namespace", namespace),
            ("csi.storage.k8s.io/pod.name", "p"),
            ("csi.storage.k8s.io/ephemeral", "true"),
        ],
    )
}

#[tokio::test]
async fn a_cache_is_mounted_then_bound_writable_and_its_image_released_before_its_pin() {
    let f = fixture();
    *f.agent.mounter_log.lock().unwrap() = Some(f.mounter.clone());
    let req = cache_req(&f, "vol-1", "team-a");
    let target = PathBuf::from(&req.target_path);
    f.node.publish(req.clone()).await.unwrap();
    let (image, mnt) = f.agent.cache_paths("team-a/vllm");
    assert_eq!(
        calls(&f).1,
        [
            format!("mount_image {} {}", image.display(), mnt.display()),
            format!("bind_rw {} {}", mnt.display(), target.display()),
        ]
    );
    // A retry: nothing new is bound.
    f.node.publish(req).await.unwrap();
    assert_eq!(
        calls(&f).1.iter().filter(|c| c.starts_with("bind")).count(),
        1
    );
    // A pod that asks for it read-only gets it read-only.
    let mut ro = cache_req(&f, "vol-2", "team-a");
    ro.readonly = true;
    let ro_target = PathBuf::from(&ro.target_path);
    f.node.publish(ro).await.unwrap();
    assert!(calls(&f).1.contains(&format!(
        "bind_ro {} {}",
        mnt.display(),
        ro_target.display()
    )));
    f.node
        .unpublish(csi::NodeUnpublishVolumeRequest {
            volume_id: "vol-2".into(),
            target_path: ro_target.display().to_string(),
        })
        .await
        .unwrap();
    f.node
        .unpublish(csi::NodeUnpublishVolumeRequest {
            volume_id: "vol-1".into(),
            target_path: target.display().to_string(),
        })
        .await
        .unwrap();
    let log = calls(&f).1;
    let at = |c: &str| {
        log.iter()
            .position(|l| l == c)
            .unwrap_or_else(|| panic!("{c}: {log:?}"))
    };
    // The agent may evict a cache as soon as no pin holds it: its image must be down first.
    let released = at(&format!("release_image {} true", mnt.display()));
    assert!(released < at("agent unpin vol-1"), "{log:?}");
    assert!(
        at(&format!("unmount {}", target.display())) < released,
        "{log:?}"
    );
}
