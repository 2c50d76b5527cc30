//! `modelcache-csi`: the CSI node plugin binary. Parses flags, wires the services to the agent
//! and the real mounter, and serves CSI on a unix socket until SIGTERM/SIGINT.

use anyhow::Context;
use clap::Parser;
use modelcache_agent::telemetry::{self, LogFormat};
use modelcache_agent::{shutdown, transport};
use modelcache_csi::agent::AgentClient;
use modelcache_csi::identity::IdentityService;
use modelcache_csi::mounter::LinuxMounter;
use modelcache_csi::node::NodeService;
use modelcache_proto::csi_v1::{identity_server::IdentityServer, node_server::NodeServer};
use std::sync::Arc;
use std::time::Duration;

/// modelcache CSI node plugin: mounts models from the node's store into pods, read-only.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// CSI endpoint kubelet connects to.
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    /// This node's name (from the downward API: spec.nodeName).
    #[arg(long, env = "MODELCACHE_NODE_ID")]
    node_id: String,
    /// The node agent's endpoint.
    #[arg(
        long,
        env = "MODELCACHE_AGENT_ENDPOINT",
        default_value = "unix:///run/modelcache/agent.sock"
    )]
    agent: String,
    /// Seconds NodePublishVolume waits for a model before answering UNAVAILABLE with progress;
    /// keep it under kubelet's 2-minute operation timeout.
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

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    modelcache_agent::cli::run_main(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let shutdown = shutdown::on_signals()?;
    let socket = transport::unix_socket_path(&cli.endpoint).map_err(anyhow::Error::msg)?;
    let agent_socket = transport::unix_socket_path(&cli.agent).map_err(anyhow::Error::msg)?;
    let agent = Arc::new(AgentClient::new(&agent_socket));
    let node = NodeService::new(
        cli.node_id.clone(),
        LinuxMounter,
        agent.clone(),
        Duration::from_secs(cli.publish_wait_seconds),
    );
    let incoming = transport::bind_unix(&socket)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    tracing::info!(socket = %socket.display(), node.id = %cli.node_id, agent = %agent_socket.display(), "CSI node plugin listening");
    let server = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(IdentityService::new(agent)))
        .add_service(NodeServer::new(node))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled());
    shutdown::drain(server, &shutdown, shutdown::GRACE).await?;
    tracing::info!("CSI node plugin stopped");
    Ok(())
}
