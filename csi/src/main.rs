//! `modelcache-csi`: the CSI plugin binary. Parses flags, wires the node services to the agent and
//! the real mounter (or the controller service), and serves CSI on a unix socket until
//! SIGTERM/SIGINT.

use anyhow::Context;
use clap::Parser;
use modelcache_core::telemetry;
use modelcache_core::{shutdown, transport};
use modelcache_csi::agent::AgentClient;
use modelcache_csi::cli::{Cli, Mode};
use modelcache_csi::controller::ControllerService;
use modelcache_csi::identity::IdentityService;
use modelcache_csi::mounter::LinuxMounter;
use modelcache_csi::node::{NodeService, Paths};
use modelcache_csi::routes::Routes;
use modelcache_proto::csi_v1::{
    controller_server::ControllerServer, identity_server::IdentityServer, node_server::NodeServer,
};
use std::sync::Arc;
use std::time::Duration;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    modelcache_core::process::run_main(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    cli.check()?;
    let shutdown = shutdown::on_signals()?;
    let socket = transport::unix_socket_path(&cli.endpoint)?;
    let incoming = transport::bind_unix(&socket)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    let server = tonic::transport::Server::builder();
    let stop = shutdown.cancelled();
    let serving = match cli.mode {
        Mode::Node => {
            // `check` made sure node mode has one.
            let node_id = cli.node_id.clone().unwrap_or_default();
            let agent_socket = transport::unix_socket_path(&cli.agent)?;
            let agent = Arc::new(AgentClient::new(&agent_socket));
            // The agent names snapshots by the store's canonical path.
            let store = std::fs::canonicalize(&cli.store).unwrap_or_else(|_| cli.store.clone());
            let paths = Paths {
                store,
                target_root: cli.target_root.clone(),
            };
            let trusted = [Some(&paths.store), paths.target_root.as_ref()]
                .into_iter()
                .flatten()
                .cloned()
                .collect();
            let node = NodeService::new(
                node_id.clone(),
                LinuxMounter::new(trusted),
                agent.clone(),
                Duration::from_secs(cli.publish_wait_seconds),
                paths,
            );
            tracing::info!(node.id = %node_id, agent = %agent_socket.display(), socket = %socket.display(), "CSI plugin listening, node mode");
            let routes = Routes::new(
                IdentityServer::new(IdentityService::new(Some(agent))),
                NodeServer::new(node),
            );
            Box::pin(server.serve_with_incoming_shutdown(routes, incoming, stop))
                as std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>
        }
        Mode::Controller => {
            tracing::info!(socket = %socket.display(), "CSI plugin listening, controller mode");
            let routes = Routes::new(
                IdentityServer::new(IdentityService::<AgentClient>::new(None)),
                ControllerServer::new(ControllerService::default()),
            );
            Box::pin(server.serve_with_incoming_shutdown(routes, incoming, stop))
        }
    };
    shutdown::drain(serving, &shutdown, shutdown::GRACE).await?;
    tracing::info!("CSI plugin stopped");
    Ok(())
}
