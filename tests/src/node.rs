//! A local node: a hub (served here, or a remote one), `modelcache-agent run` and
//! `modelcache-csi` as separate processes, and a client that calls the CSI plugin over its unix
//! socket the way kubelet does.

use crate::netns::Host;
use crate::procs::{Proc, bin, require_root, serve_hub, wait_until};
use crate::tree::unmount_all_below;
use anyhow::Context;
use modelcache_core::transport::connect_unix;
use modelcache_proto::agent_v1::{self as pb, agent_client::AgentClient};
use modelcache_proto::csi_v1::{
    self as csi, identity_client::IdentityClient, node_client::NodeClient,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Where the node's models come from.
pub enum Hub {
    /// Start `modelcache-hub` on this directory of repos, with extra flags
    /// (`--gated …`, `--max-bytes-per-second …`).
    Serve(PathBuf, Vec<String>),
    /// Use a running hub, e.g. `https://huggingface.co`.
    Remote(String),
}

/// A running local node. Dropping it stops the processes and detaches any mount left below
/// its kubelet directory.
pub struct LocalNode {
    workdir: PathBuf,
    /// The hub's base URL.
    pub hub_endpoint: String,
    /// The CSI Node client.
    pub node: NodeClient<Channel>,
    /// The CSI Identity client.
    pub identity: IdentityClient<Channel>,
    /// The agent API client.
    pub agent: AgentClient<Channel>,
    // Stopped in this order when dropped: CSI, agent, hub.
    csi: Proc,
    agent_proc: Proc,
    hub: Option<Proc>,
}

impl LocalNode {
    /// Starts the processes in `workdir` (logs, sockets, store and kubelet dir all go there).
    /// `publish_wait_secs` bounds how long one NodePublishVolume waits for a download.
    pub fn start(workdir: &Path, hub: Hub, publish_wait_secs: u64) -> anyhow::Result<LocalNode> {
        Self::start_with(workdir, hub, publish_wait_secs, &[])
    }

    /// [`LocalNode::start`], with extra flags for `modelcache-agent run`.
    pub fn start_with(
        workdir: &Path,
        hub: Hub,
        publish_wait_secs: u64,
        agent_extra: &[&str],
    ) -> anyhow::Result<LocalNode> {
        Self::start_on(None, workdir, hub, publish_wait_secs, agent_extra)
    }

    /// [`LocalNode::start_with`], the agent on `host` (its own network namespace) when given;
    /// the CSI plugin, which talks to the agent over its unix socket, stays in this one, where
    /// its mounts are.
    pub fn start_on(
        host: Option<&Host>,
        workdir: &Path,
        hub: Hub,
        publish_wait_secs: u64,
        agent_extra: &[&str],
    ) -> anyhow::Result<LocalNode> {
        require_root()?;
        std::fs::create_dir_all(workdir)?;
        let agent_bin = bin("modelcache-agent")?;
        let (hub_proc, hub_endpoint) = match hub {
            Hub::Serve(root, extra) => {
                let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
                let (p, endpoint) = serve_hub(&root, &extra, workdir)?;
                (Some(p), endpoint)
            }
            Hub::Remote(endpoint) => (None, endpoint),
        };
        let agent_sock = workdir.join("agent.sock");
        let csi_sock = workdir.join("csi.sock");
        let agent_ep = format!("unix://{}", agent_sock.display());
        let csi_ep = format!("unix://{}", csi_sock.display());
        let store = workdir.join("store");
        let mut agent_args = vec![
            "run",
            "--store",
            store.to_str().expect("UTF-8 path"),
            "--listen",
            &agent_ep,
            "--endpoint",
            &hub_endpoint,
        ];
        if !agent_extra.contains(&"--high-watermark") {
            // No eviction unless a test asks for it: how full the machine's disk happens to be
            // must not change what a test sees.
            agent_args.extend(["--high-watermark", "100", "--low-watermark", "99"]);
        }
        agent_args.extend_from_slice(agent_extra);
        let mut agent_proc = Proc::start_on(host, "agent", &agent_bin, &agent_args, workdir)?;
        let wait = publish_wait_secs.to_string();
        let kubelet_pods = workdir.join("kubelet/pods");
        let mut csi = Proc::start(
            "csi",
            &bin("modelcache-csi")?,
            &[
                "--endpoint",
                &csi_ep,
                "--node-id",
                "local-node",
                "--agent",
                &agent_ep,
                "--store",
                store.to_str().expect("UTF-8 path"),
                "--target-root",
                kubelet_pods.to_str().expect("UTF-8 path"),
                "--publish-wait-seconds",
                &wait,
            ],
            workdir,
        )?;
        wait_until("the agent and CSI sockets", Duration::from_secs(30), || {
            agent_proc.check_running()?;
            csi.check_running()?;
            Ok(agent_sock.exists() && csi_sock.exists())
        })?;
        let csi_channel = connect_unix(&csi_sock);
        Ok(LocalNode {
            workdir: workdir.to_path_buf(),
            hub_endpoint,
            node: NodeClient::new(csi_channel.clone()),
            identity: IdentityClient::new(csi_channel),
            agent: AgentClient::new(connect_unix(&agent_sock)),
            csi,
            agent_proc,
            hub: hub_proc,
        })
    }

    /// Restarts the CSI plugin (SIGTERM, start again) and waits until it answers.
    pub async fn restart_csi(&mut self) -> anyhow::Result<()> {
        self.csi.restart()?;
        self.wait_answering().await
    }

    /// Restarts the agent and waits until the CSI plugin reports it ready again.
    pub async fn restart_agent(&mut self) -> anyhow::Result<()> {
        self.agent_proc.restart()?;
        self.wait_ready().await
    }

    /// Kills the agent with SIGKILL mid-work, runs `while_down` on the store while nothing
    /// writes to it, then starts the agent again and waits until the plugin reports it ready.
    pub async fn crash_agent(&mut self, while_down: impl FnOnce(&Path)) -> anyhow::Result<()> {
        self.agent_proc.kill();
        while_down(&self.store());
        self.agent_proc.start_again()?;
        self.wait_ready().await
    }

    async fn wait_answering(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self
            .identity
            .get_plugin_info(csi::GetPluginInfoRequest {})
            .await
            .is_err()
        {
            self.csi.check_running()?;
            if Instant::now() > deadline {
                anyhow::bail!("the CSI plugin does not answer after a restart");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// The processes' log files.
    pub fn logs(&self) -> Vec<&Path> {
        let mut out = vec![self.csi.log_path(), self.agent_proc.log_path()];
        out.extend(self.hub.as_ref().map(Proc::log_path));
        out
    }

    /// The agent API's socket.
    pub fn agent_socket(&self) -> PathBuf {
        self.workdir.join("agent.sock")
    }

    /// The CSI plugin's socket.
    pub fn csi_socket(&self) -> PathBuf {
        self.workdir.join("csi.sock")
    }

    /// The directory that stands in for kubelet's pods directory (the plugin's target root).
    pub fn kubelet_pods(&self) -> PathBuf {
        self.workdir.join("kubelet/pods")
    }

    /// The store directory.
    pub fn store(&self) -> PathBuf {
        self.workdir.join("store")
    }

    /// A target path shaped like kubelet's; like kubelet, creates its parent (the plugin
    /// creates the target).
    pub fn target(&self, volume: &str) -> PathBuf {
        let parent = self
            .workdir
            .join("kubelet/pods/0b3c7c4e-uid/volumes/kubernetes.io~csi")
            .join(volume);
        std::fs::create_dir_all(&parent).expect("create kubelet volume dir");
        parent.join("mount")
    }

    /// Waits until Probe reports ready.
    pub async fn wait_ready(&mut self) -> anyhow::Result<()> {
        self.wait_answering().await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let probe = self
                .identity
                .probe(csi::ProbeRequest {})
                .await?
                .into_inner();
            if probe.ready == Some(true) {
                return Ok(());
            }
            if Instant::now() > deadline {
                anyhow::bail!("the CSI plugin never reported ready");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// NodePublishVolume as kubelet calls it for an inline volume; see [`publish`].
    pub async fn publish(
        &mut self,
        volume: &str,
        target: &Path,
        attrs: &[(&str, &str)],
        on_retry: impl FnMut(&Status),
    ) -> Result<(), Status> {
        publish(&mut self.node, volume, target, attrs, on_retry).await
    }

    /// Restarts the served hub, which reloads its repos from disk (a changed file makes a new
    /// commit of `main`), and waits until it answers.
    pub fn restart_hub(&mut self) -> anyhow::Result<()> {
        let hub = self.hub.as_mut().context("this node uses a remote hub")?;
        hub.restart()?;
        let addr = self.hub_endpoint.trim_start_matches("http://").to_owned();
        wait_until("the hub to listen again", Duration::from_secs(120), || {
            hub.check_running()?;
            Ok(std::net::TcpStream::connect(&addr).is_ok())
        })
    }

    /// Stops the hub, as an outage would.
    pub fn stop_hub(&mut self) {
        if let Some(h) = self.hub.as_mut() {
            h.stop();
        }
    }

    /// Kills the agent with SIGKILL, as a node lost mid-work; it is not started again.
    pub fn kill_agent(&mut self) {
        self.agent_proc.kill();
    }

    /// The agent's log so far.
    pub fn agent_log(&self) -> String {
        self.agent_proc.log()
    }

    /// NodeUnpublishVolume.
    pub async fn unpublish(&mut self, volume: &str, target: &Path) -> Result<(), Status> {
        self.node
            .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: volume.into(),
                target_path: target.display().to_string(),
            })
            .await?;
        Ok(())
    }

    /// The agent's snapshots.
    pub async fn snapshots(&mut self) -> Result<Vec<pb::SnapshotInfo>, Status> {
        Ok(self
            .agent
            .list(pb::ListRequest {})
            .await?
            .into_inner()
            .snapshots)
    }

    /// The volumes that pin any snapshot, sorted.
    pub async fn pinned_volumes(&mut self) -> Result<Vec<String>, Status> {
        let mut all: Vec<String> = self
            .snapshots()
            .await?
            .into_iter()
            .flat_map(|s| s.pinned_by)
            .collect();
        all.sort();
        Ok(all)
    }

    /// The agent's snapshots of one repo.
    pub async fn snapshots_of(&mut self, repo: &str) -> Result<Vec<pb::SnapshotInfo>, Status> {
        let mut all = self.snapshots().await?;
        all.retain(|s| s.repo == repo);
        Ok(all)
    }

    /// Stops the processes now; true when all exited cleanly.
    pub fn stop(&mut self) -> bool {
        let csi = self.csi.stop();
        let agent = self.agent_proc.stop();
        let hub = self.hub.as_mut().is_none_or(Proc::stop);
        csi && agent && hub
    }
}

impl Drop for LocalNode {
    fn drop(&mut self) {
        unmount_all_below(&self.workdir.join("kubelet"));
        // Cache images mounted in the store.
        unmount_all_below(&self.workdir.join("store/caches"));
    }
}

/// The NodePublishVolumeRequest kubelet sends for an inline volume with these attributes and
/// secrets (from `nodePublishSecretRef`).
pub fn publish_request(
    volume: &str,
    target: &Path,
    attrs: &[(&str, &str)],
    secrets: &[(&str, &str)],
) -> csi::NodePublishVolumeRequest {
    use csi::volume_capability::{AccessMode, AccessType, MountVolume, access_mode::Mode};
    let mut volume_context: HashMap<String, String> = attrs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    for (k, v) in [
        ("csi.storage.k8s.io/ephemeral", "true"),
        ("csi.storage.k8s.io/pod.name", "reader"),
        ("csi.storage.k8s.io/pod.namespace", "default"),
        ("csi.storage.k8s.io/pod.uid", "0b3c7c4e-uid"),
    ] {
        volume_context.insert(k.into(), v.into());
    }
    csi::NodePublishVolumeRequest {
        volume_id: volume.into(),
        target_path: target.display().to_string(),
        volume_capability: Some(csi::VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume::default())),
            access_mode: Some(AccessMode {
                mode: Mode::SingleNodeReaderOnly as i32,
            }),
        }),
        readonly: true,
        volume_context,
        secrets: secrets
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..Default::default()
    }
}

/// NodePublishVolume as kubelet calls it for an inline volume, retried while the plugin answers
/// UNAVAILABLE (still downloading) or ABORTED, as kubelet retries; each such answer is passed to
/// `on_retry`.
pub async fn publish(
    node: &mut NodeClient<Channel>,
    volume: &str,
    target: &Path,
    attrs: &[(&str, &str)],
    on_retry: impl FnMut(&Status),
) -> Result<(), Status> {
    let req = publish_request(volume, target, attrs, &[]);
    publish_until_done(node, req, on_retry).await
}

/// Sends `req` until it succeeds or fails with a code kubelet would not retry.
pub async fn publish_until_done(
    node: &mut NodeClient<Channel>,
    req: csi::NodePublishVolumeRequest,
    mut on_retry: impl FnMut(&Status),
) -> Result<(), Status> {
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        match node.node_publish_volume(req.clone()).await {
            Ok(_) => return Ok(()),
            Err(s)
                if matches!(s.code(), Code::Unavailable | Code::Aborted)
                    && Instant::now() < deadline =>
            {
                on_retry(&s);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(s) => return Err(s),
        }
    }
}
