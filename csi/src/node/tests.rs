use super::*;
use crate::attributes::VolumeAttributes;
use crate::mounter::FakeMounter;
use modelcache_proto::agent_v1 as pb;
use std::collections::HashMap;
use std::sync::Mutex;
use tonic::Code;

/// An agent that answers from a script and records calls.
#[derive(Default)]
struct FakeAgent {
    calls: Mutex<Vec<String>>,
    fetching: Mutex<bool>,
    ensure_error: Mutex<Option<Status>>,
    snapshot: PathBuf,
    /// Held during ensure, to test concurrent calls.
    gate: tokio::sync::Mutex<()>,
}

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

#[tonic::async_trait]
impl ModelAgent for FakeAgent {
    async fn ensure(
        &self,
        volume: &VolumeAttributes,
        token: Option<String>,
        _wait: Duration,
    ) -> std::result::Result<Ensured, Status> {
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
            return Ok(Ensured::Fetching(pb::Fetching {
                commit: COMMIT.into(),
                bytes_done: 50 << 20,
                bytes_total: 200 << 20,
                files_done: 1,
                files_total: 4,
            }));
        }
        Ok(Ensured::Ready {
            path: self.snapshot.clone(),
            commit: COMMIT.into(),
        })
    }
    async fn pin(
        &self,
        volume_id: &str,
        volume: &VolumeAttributes,
        commit: &str,
        _target: &str,
    ) -> std::result::Result<(), Status> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("pin {volume_id} {} {commit}", volume.model.repo));
        Ok(())
    }
    async fn unpin(&self, volume_id: &str) -> std::result::Result<(), Status> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("unpin {volume_id}"));
        Ok(())
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
        snapshot: dir.path().join("store/snap"),
        ..Default::default()
    });
    let node = NodeService::new(
        "node-a".into(),
        mounter.clone(),
        agent.clone(),
        Duration::from_millis(10),
    );
    Fixture {
        dir,
        mounter,
        agent,
        node,
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
    assert_eq!(f.mounter.source_of(&target), Some(f.agent.snapshot.clone()));
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
            f.agent.snapshot.display(),
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
            .contains("50.0 of 200.0 MiB (25%), 1 of 4 files"),
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
