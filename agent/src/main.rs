//! `modelcache-agent`: the node agent and its tools. Parses the command line, builds the pieces
//! from the library, and runs them until SIGTERM/SIGINT.

use anyhow::Context;
use clap::Parser;
use modelcache_agent::cli::{Cli, Command, HubArgs, StoreArgs};
use modelcache_agent::cluster;
use modelcache_agent::events::PodEvents;
use modelcache_agent::fetch::{Fetcher, Progress, Sources, Ttls, Tuning};
use modelcache_agent::grpc::AgentService;
use modelcache_agent::mounts::ProcMountTable;
use modelcache_agent::node::{self, Admin, Node};
use modelcache_agent::peers::client::{Discovery, discover};
use modelcache_agent::peers::{PeerSecret, PeerServer, Peers};
use modelcache_agent::shared_cache::SharedCache;
use modelcache_agent::{admin, progress};
use modelcache_core::filter::FileFilter;
use modelcache_core::repo::{Commit, ModelRef, RepoId, RepoKind, Revision};
use modelcache_core::telemetry;
use modelcache_core::{shutdown, transport};
use modelcache_hub::HubClient;
use modelcache_hub::client::Token;
use modelcache_proto::agent_v1 as pb;
use modelcache_proto::agent_v1::agent_client::AgentClient;
use modelcache_proto::agent_v1::agent_server::AgentServer;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// A client of the Kubernetes API: from `kubeconfig` when given, else in-cluster (or the
/// default kubeconfig).
async fn kube_client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("cannot read the kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .with_context(|| format!("the kubeconfig {} is not usable", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "--node-name is set but no Kubernetes API is reachable: run in a pod with a service account, or give --kubeconfig",
        )?,
    };
    Ok(kube::Client::try_from(config)?)
}

/// This agent's URL as its peers know it, when it serves them (`--peer-listen`): the address
/// it listens on, or `--peer-own-ip` with that port; None when neither names one address.
fn own_peer_url(
    listen: Option<&str>,
    own_ip: Option<std::net::IpAddr>,
) -> anyhow::Result<Option<String>> {
    let Some(listen) = listen else {
        return Ok(None);
    };
    let addr: std::net::SocketAddr = listen
        .parse()
        .with_context(|| format!("--peer-listen {listen} is not IP:PORT"))?;
    let ip = own_ip.unwrap_or(addr.ip());
    if ip.is_unspecified() {
        tracing::warn!(
            "--peer-listen {listen} without --peer-own-ip: this node serves its peers but takes no share of a first wave"
        );
        return Ok(None);
    }
    Ok(Some(format!(
        "http://{}",
        std::net::SocketAddr::new(ip, addr.port())
    )))
}

fn fetcher(
    store: &StoreArgs,
    hub: &HubArgs,
    own_peer_url: Option<String>,
) -> anyhow::Result<Fetcher> {
    let store = store.open()?;
    let client = HubClient::new(&hub.endpoint, &hub.cdn_hosts)?;
    let tuning = Tuning {
        files: hub.parallel_files,
        connections: hub.connections,
        chunk_size: hub.chunk_mib << 20,
        stall: hub.stall_timeout,
    };
    let shared = match &hub.shared_cache {
        Some(dir) => Some(SharedCache::open(dir)?),
        None => None,
    };
    let peers = match &hub.peer_token_file {
        Some(file) if !hub.peers.is_empty() || hub.peers_dns.is_some() => {
            Some(Peers::new(&hub.peers, PeerSecret::read(file)?)?.with_own_url(own_peer_url))
        }
        _ => None,
    };
    let sources =
        Sources::new(hub.sources.clone(), shared)?.with_peers(peers, !hub.sources.is_empty())?;
    Ok(Fetcher::new(client, Arc::new(store), tuning)
        .with_ttls(Ttls {
            revision: hub.revision_ttl,
            access: hub.access_ttl,
        })
        .with_sources(sources))
}

/// Keeps the peers to what `--peers-dns` finds, when it is given.
fn spawn_discovery(fetcher: &Fetcher, hub: &HubArgs, shutdown: &CancellationToken) {
    if let (Some(name), Some(peers)) = (&hub.peers_dns, fetcher.sources().peers()) {
        let discovery = Discovery {
            name: name.clone(),
            own_ip: hub.peer_own_ip,
        };
        tokio::spawn(discover(peers.clone(), discovery, shutdown.clone()));
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    modelcache_core::process::run_main(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let shutdown = shutdown::on_signals()?;
    match cli.command {
        Command::ServeHub { args } => return Err(serve_hub_moved(args)),
        Command::Pull {
            repo,
            revision,
            dataset,
            include,
            exclude,
            store,
            hub,
        } => {
            let model = ModelRef {
                kind: if dataset {
                    RepoKind::Dataset
                } else {
                    RepoKind::Model
                },
                repo: RepoId::parse(&repo)?,
                revision: Revision::parse(&revision)?,
            };
            let fetcher = fetcher(&store, &hub, None)?;
            spawn_discovery(&fetcher, &hub, &shutdown);
            let token = hub.token.clone().and_then(Token::new);
            let filter = FileFilter::new(&include, &exclude)?;
            let progress = Arc::new(Progress::default());
            let done = CancellationToken::new();
            let reporter = tokio::spawn(progress::report(
                progress.clone(),
                model.repo.to_string(),
                done.clone(),
            ));
            let result = tokio::select! {
                r = node::pull(&fetcher, &model, &filter, token.as_ref(), &progress) => r,
                () = shutdown.cancelled() => anyhow::bail!("interrupted; run the same command again to continue"),
            };
            done.cancel();
            let _ = reporter.await;
            let snap = result?;
            println!("{}", snap.path.display());
        }
        Command::Ls { store, json } => {
            let store = store.inspect()?;
            let inv = admin::inventory(&store)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&inv)?);
            } else {
                print!("{}", admin::render_inventory(&inv));
            }
        }
        Command::Rm {
            repo,
            commit,
            dataset,
            store,
            agent,
            json,
        } => {
            let kind = if dataset {
                RepoKind::Dataset
            } else {
                RepoKind::Model
            };
            let repo = RepoId::parse(&repo)?;
            // As `ls` shows it (12 hex digits) or any unique prefix of 7 or more.
            let commit = match commit {
                Some(c) => Some(admin::find_commit(&store.inspect()?, kind, &repo, &c)?),
                None => None,
            };
            let report = match running_agent(&agent.endpoint)? {
                Some(mut client) => client
                    .remove(pb::RemoveRequest {
                        kind: modelcache_core::wire::kind_to_proto(kind) as i32,
                        repo: repo.to_string(),
                        commit: commit.as_ref().map(Commit::to_string).unwrap_or_default(),
                    })
                    .await
                    .map_err(agent_refused)?
                    .into_inner()
                    .into(),
                None => {
                    Admin::offline(Arc::new(store.open()?))?.remove(kind, &repo, commit.as_ref())?
                }
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", admin::render_remove(&report));
            }
        }
        Command::Verify {
            store,
            agent,
            dry_run,
            json,
        } => {
            let report = match running_agent(&agent.endpoint)? {
                Some(mut client) => client
                    .verify(pb::VerifyRequest { dry_run })
                    .await
                    .map_err(agent_refused)?
                    .into_inner()
                    .into(),
                None => Admin::offline(Arc::new(store.open()?))?.verify(dry_run)?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", admin::render_verify(&report));
            }
            if !report.corrupt.is_empty() {
                anyhow::bail!(
                    "{} corrupt blob(s); pull the affected models again",
                    report.corrupt.len()
                );
            }
        }
        Command::Run {
            store,
            listen,
            metrics_listen,
            peer_listen,
            peer_max_uploads,
            peer_max_upload_mbps,
            node_name,
            kubeconfig,
            catalogue,
            hub,
            eviction,
        } => {
            let marks = eviction.watermarks()?;
            let socket = transport::unix_socket_path(&listen)?;
            let fetcher = fetcher(
                &store,
                &hub,
                own_peer_url(peer_listen.as_deref(), hub.peer_own_ip)?,
            )?;
            spawn_discovery(&fetcher, &hub, &shutdown);
            let sources = fetcher.sources();
            // What this node gets from the hub for its peers, for its peer server to tell.
            let claims = sources
                .peers()
                .map(|p| p.claims().clone())
                .unwrap_or_default();
            tracing::info!(
                store = %fetcher.store().root().display(),
                endpoint = %hub.endpoint,
                sources = ?sources.order(),
                shared_cache = sources.shared().map(|s| s.root().display().to_string()),
                peers = ?sources.peers().map(|p| p.urls()),
                high_watermark = marks.high,
                low_watermark = marks.low,
                max_store_bytes = marks.max_store_bytes,
                "agent starting"
            );
            // With the node's name, the Kubernetes API: the Node's labels and watch, pod events.
            let cluster = match &node_name {
                Some(node) => Some((node.clone(), kube_client(kubeconfig.as_deref()).await?)),
                None => None,
            };
            let agent_token = hub.token.clone().and_then(Token::new);
            if hub.lend_token_to_volumes {
                tracing::warn!(
                    "--lend-token-to-volumes: volumes without a token of their own read with the agent's token"
                );
            }
            let mut api = Node::new(fetcher, marks, Arc::new(ProcMountTable), shutdown.clone())?
                .with_agent_token(agent_token, hub.lend_token_to_volumes)
                .with_cache_limits(eviction.cache_limits());
            if let Some((node, client)) = &cluster {
                api = api.with_events(PodEvents::new(client.clone(), node));
            }
            let api = Arc::new(api);
            if let (Some(addr), Some(file)) = (&peer_listen, &hub.peer_token_file) {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen for peers on {addr}"))?;
                tracing::info!(address = %listener.local_addr()?, max_uploads = peer_max_uploads, "serving blobs to peers");
                let server = PeerServer::new(
                    api.store().clone(),
                    api.wanted().clone(),
                    claims.clone(),
                    PeerSecret::read(file)?,
                    peer_max_uploads,
                    api.metrics().peer_served.clone(),
                );
                let server = server
                    .with_upload_limit(peer_max_upload_mbps.map(|m| m * 1_000_000))
                    .with_growing(api.growing().clone());
                tokio::spawn(server.serve(listener, shutdown.clone()));
            }
            tokio::spawn(api.clone().maintain());
            if let Some((node, client)) = cluster {
                cluster::spawn(api.clone(), client, node, catalogue, shutdown.clone());
            }
            if let Some(addr) = metrics_listen {
                let listener = tokio::net::TcpListener::bind(&addr)
                    .await
                    .with_context(|| format!("cannot listen for metrics on {addr}"))?;
                tracing::info!(address = %listener.local_addr()?, "metrics listening");
                let metrics = api.metrics().clone();
                let stop = shutdown.clone();
                tokio::spawn(async move {
                    if let Err(e) = metrics.serve(listener, stop).await {
                        tracing::error!(error = %e, "the metrics server failed");
                    }
                });
            }
            let incoming = transport::bind_unix(&socket)
                .with_context(|| format!("cannot listen on {}", socket.display()))?;
            tracing::info!(socket = %socket.display(), "agent API listening");
            api.metrics().set_ready(true);
            let server = tonic::transport::Server::builder().serve_with_incoming_shutdown(
                AgentServer::new(AgentService(api)),
                incoming,
                shutdown.cancelled(),
            );
            shutdown::drain(server, &shutdown, shutdown::GRACE).await?;
            tracing::info!("agent stopped");
        }
    }
    Ok(())
}

/// `modelcache-agent serve-hub …` from before the hub had its own binary: runs the
/// `modelcache-hub` installed beside this binary with the same arguments. Returns only on error.
fn serve_hub_moved(args: Vec<std::ffi::OsString>) -> anyhow::Error {
    use std::os::unix::process::CommandExt;
    let hub = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("modelcache-hub")))
        .filter(|p| p.is_file());
    match hub {
        Some(hub) => {
            let e = std::process::Command::new(&hub).args(args).exec();
            anyhow::anyhow!("cannot run {}: {e}", hub.display())
        }
        None => anyhow::anyhow!(
            "serve-hub moved to its own binary, modelcache-hub, which is not installed beside this one; build it with `cargo build -p modelcache-hub --features server`"
        ),
    }
}

/// A client of the agent serving `endpoint`, if one answers there; None when no socket is
/// there or nothing listens on it (a stale socket), and the command should take the store's
/// lock itself.
fn running_agent(endpoint: &str) -> anyhow::Result<Option<AgentClient<tonic::transport::Channel>>> {
    let socket = transport::unix_socket_path(endpoint)?;
    match std::os::unix::net::UnixStream::connect(&socket) {
        Ok(_) => {
            tracing::debug!(socket = %socket.display(), "asking the running agent");
            Ok(Some(AgentClient::new(transport::connect_unix(&socket))))
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(anyhow::anyhow!(
            "cannot reach the agent at {}: {e}; run as root, or pass --agent",
            socket.display()
        )),
    }
}

/// The agent's refusal as this command's error: its message says what and why.
fn agent_refused(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} (the agent answered {:?})", s.message(), s.code())
}
