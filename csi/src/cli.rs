//! The command line of `modelcache-csi`, in the library so that tests can check what the Helm
//! chart passes.

use clap::Parser;
use modelcache_core::telemetry::LogFormat;

/// modelcache CSI plugin: mounts models from the node's store into pods, read-only (node mode),
/// and creates StorageClass-backed volumes for external-provisioner (controller mode).
#[derive(Parser)]
#[command(version)]
pub struct Cli {
    /// Which CSI services to serve.
    #[arg(long, value_enum, env = "MODELCACHE_CSI_MODE", default_value = "node")]
    pub mode: Mode,
    /// CSI endpoint kubelet (node) or external-provisioner (controller) connects to.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    pub endpoint: String,
    /// This node's name, from the downward API (spec.nodeName). Required in node mode.
    #[arg(long, env = "MODELCACHE_NODE_ID")]
    pub node_id: Option<String>,
    /// The node agent's endpoint.
    #[arg(
        long,
        env = "MODELCACHE_AGENT_ENDPOINT",
        default_value = "unix:///run/modelcache/agent.sock"
    )]
    pub agent: String,
    /// The node's store, as the agent's `--store` (the plugin sees it at the same path). Targets
    /// inside it, or above it, are refused; the agent's snapshots must be in it.
    #[arg(long, env = "MODELCACHE_STORE", default_value = "/var/lib/modelcache")]
    pub store: std::path::PathBuf,
    /// When set, every target path must be below this directory: kubelet's pods directory
    /// (`<kubeletDir>/pods`; the Helm chart sets it). Symlinks in it are followed, none below.
    #[arg(long, env = "MODELCACHE_TARGET_ROOT")]
    pub target_root: Option<std::path::PathBuf>,
    /// Seconds NodePublishVolume waits for a model before answering UNAVAILABLE with progress.
    /// A publish answers within this plus 15 s; keep the sum under kubelet's 2-minute timeout.
    #[arg(long, env = "MODELCACHE_PUBLISH_WAIT_SECONDS", default_value_t = 60)]
    pub publish_wait_seconds: u64,
    /// Log format.
    #[arg(
        long,
        value_enum,
        default_value = "text",
        env = "MODELCACHE_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
}

/// The services a plugin process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Identity + Node, on every node, next to the agent.
    Node,
    /// Identity + Controller, next to external-provisioner.
    Controller,
}

impl Cli {
    /// What clap cannot check: a wait that fits kubelet's timeout, and a node id in node mode.
    pub fn check(&self) -> Result<(), BadFlags> {
        if self.publish_wait_seconds > 100 {
            return Err(BadFlags::WaitTooLong(self.publish_wait_seconds));
        }
        for (flag, dir) in [
            ("--store", Some(&self.store)),
            ("--target-root", self.target_root.as_ref()),
        ] {
            if let Some(dir) = dir {
                let text = dir.to_string_lossy();
                let normal = crate::node::normalize(flag, &text)?;
                if normal != *dir {
                    return Err(BadFlags::NotPlain {
                        flag,
                        dir: dir.clone(),
                    });
                }
            }
        }
        if self.mode == Mode::Node && self.node_id.as_deref().is_none_or(str::is_empty) {
            return Err(BadFlags::NoNodeId);
        }
        Ok(())
    }
}

/// Flags that clap accepts but the plugin cannot run with.
#[derive(Debug, thiserror::Error)]
pub enum BadFlags {
    /// The publish wait would outlast kubelet's timeout.
    #[error(
        "--publish-wait-seconds {0} is too long: with the 15 s margin a publish would outlast kubelet's 2-minute timeout; use at most 100"
    )]
    WaitTooLong(u64),
    /// A directory flag is not a plain absolute path.
    #[error("{flag} {} must be written plainly (absolute, no '.', '..' or '//')", dir.display())]
    NotPlain {
        /// The flag.
        flag: &'static str,
        /// Its value.
        dir: std::path::PathBuf,
    },
    /// Node mode without a node id.
    #[error(
        "--node-id (or MODELCACHE_NODE_ID) is required in node mode: pass the node's name, e.g. from the downward API's spec.nodeName"
    )]
    NoNodeId,
    /// A directory flag is not a path at all.
    #[error(transparent)]
    Invalid(#[from] crate::error::Error),
}
