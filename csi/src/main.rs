//! `modelcache-csi`: the CSI plugin binary. Parses flags, wires the node services to the agent and
//! the real mounter (or the controller service), and serves CSI on a unix socket until
//! SIGTERM/SIGINT.

use anyhow::Context;
use clap::Parser;
use modelcache_agent::telemetry::{self, LogFormat};
use modelcache_agent::{shutdown, transport};
use modelcache_csi::agent::AgentClient;
use modelcache_csi::controller::ControllerService;
use modelcache_csi::identity::IdentityService;
use modelcache_csi::mounter::LinuxMounter;
use modelcache_csi::node::NodeService;
use modelcache_proto::csi_v1::{
    controller_server::ControllerServer, identity_server::IdentityServer, node_server::NodeServer,
};
use std::sync::Arc;
use std::time::Duration;

/// modelcache CSI plugin: mounts models from the node's store into pods, read-only (node mode),
/// and creates StorageClass-backed volumes for external-provisioner (controller mode).
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Which CSI services to serve.
    #[arg(long, value_enum, env = "MODELCACHE_CSI_MODE", default_value = "node")]
    mode: Mode,
    /// CSI endpoint kubelet (node) or external-provisioner (controller) connects to.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    /// This node's name, from the downward API (spec.nodeName). Required in node mode.
    #[arg(long, env = "MODELCACHE_NODE_ID")]
    node_id: Option<String>,
    /// The node agent's endpoint.
    #[arg(
        long,
        env = "MODELCACHE_AGENT_ENDPOINT",
        default_value = "unix:///run/modelcache/agent.sock"
    )]
    agent: String,
    /// Seconds NodePublishVolume waits for a model before answering UNAVAILABLE with progress.
    /// A publish answers within this plus 15 s; keep the sum under kubelet's 2-minute timeout.
    #[arg(long, env = "MODELCACHE_PUBLISH_WAIT_SECONDS", default_value_t = 60)]
    publish_wait_seconds: u64,
    /// Log format.
    #[arg(
        long,
        value_enum,
        default_value = "text",
        env = "MODELCACHE_LOG_FORMAT"
    )]
    log_format: LogFormat,
}

/// The services a plugin process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    /// Identity + Node, on every node, next to the agent.
    Node,
    /// Identity + Controller, next to external-provisioner.
    Controller,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    modelcache_agent::cli::run_main(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    anyhow::ensure!(
        cli.publish_wait_seconds <= 100,
        "--publish-wait-seconds {} is too long: with the 15 s margin a publish would outlast kubelet's 2-minute timeout; use at most 100",
        cli.publish_wait_seconds
    );
    let shutdown = shutdown::on_signals()?;
    let socket = transport::unix_socket_path(&cli.endpoint).map_err(anyhow::Error::msg)?;
    let mut server = tonic::transport::Server::builder();
    let router = match cli.mode {
        Mode::Node => {
            let node_id = cli.node_id.clone().filter(|n| !n.is_empty()).context(
                "--node-id (or MODELCACHE_NODE_ID) is required in node mode: pass the node's name, \
                 e.g. from the downward API's spec.nodeName",
            )?;
            let agent_socket =
                transport::unix_socket_path(&cli.agent).map_err(anyhow::Error::msg)?;
            let agent = Arc::new(AgentClient::new(&agent_socket));
            let node = NodeService::new(
                node_id.clone(),
                LinuxMounter,
                agent.clone(),
                Duration::from_secs(cli.publish_wait_seconds),
            );
            tracing::info!(node.id = %node_id, agent = %agent_socket.display(), "node mode");
            server
                .add_service(IdentityServer::new(IdentityService::new(Some(agent))))
                .add_service(NodeServer::new(node))
        }
        Mode::Controller => {
            tracing::info!("controller mode");
            server
                .add_service(IdentityServer::new(IdentityService::<AgentClient>::new(
                    None,
                )))
                .add_service(ControllerServer::new(ControllerService))
        }
    };
    let incoming = transport::bind_unix(&socket)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    tracing::info!(socket = %socket.display(), "CSI plugin listening");
    let serving = router.serve_with_incoming_shutdown(incoming, shutdown.cancelled());
    shutdown::drain(serving, &shutdown, shutdown::GRACE).await?;
    tracing::info!("CSI plugin stopped");
    Ok(())
}
