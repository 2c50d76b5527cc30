//! `modelcache-hub`: serve repos from a directory over the Hub's HTTP protocol (read-only).

use anyhow::Context;
use clap::Parser;
use modelcache_core::repo::RepoId;
use modelcache_core::{shutdown, telemetry};
use modelcache_hub::served::ServedRepos;
use modelcache_hub::server;
use std::path::PathBuf;
use std::sync::Arc;

/// Serve repos from a directory over the Hub's HTTP protocol (read-only).
///
/// ROOT/models/<org>/<name>/ holds a model's files, ROOT/datasets/<org>/<name>/ a dataset's;
/// each is served as revision `main`. Point the agent's --endpoint (or HF_ENDPOINT) at it.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Directory of repos.
    #[arg(long, env = "MODELCACHE_HUB_ROOT")]
    root: PathBuf,
    /// Address to listen on.
    #[arg(long, env = "MODELCACHE_HUB_LISTEN", default_value = "127.0.0.1:8080")]
    listen: String,
    /// Gate a repo: only requests with one of these tokens may read it (repeatable).
    #[arg(long, value_name = "ORG/NAME=TOKEN[,TOKEN...]", value_parser = parse_gated)]
    gated: Vec<(RepoId, Vec<String>)>,
    /// Make a repo private: only requests with one of these tokens see it; to others it does
    /// not exist (repeatable).
    #[arg(long, value_name = "ORG/NAME=TOKEN[,TOKEN...]", value_parser = parse_gated)]
    private: Vec<(RepoId, Vec<String>)>,
    /// Redirect LFS files to this base URL's /cdn/ route (this server under another host
    /// name, e.g. http://localhost:8080 when listening on 127.0.0.1:8080), as the Hub
    /// redirects to its CDN.
    #[arg(long, value_name = "URL")]
    cdn_url: Option<String>,
    /// How long a CDN link stays valid (403 after), as presigned URLs do.
    #[arg(long, value_name = "SECONDS", default_value_t = 3600)]
    cdn_link_seconds: u64,
    /// Log format.
    #[arg(
        long,
        value_enum,
        default_value = "text",
        env = "MODELCACHE_LOG_FORMAT"
    )]
    log_format: telemetry::LogFormat,
    #[cfg(feature = "faults")]
    #[command(flatten)]
    faults: fault_args::FaultArgs,
}

fn parse_gated(s: &str) -> Result<(RepoId, Vec<String>), String> {
    let (repo, tokens) = s
        .split_once('=')
        .ok_or("write it as org/name=token[,token...]")?;
    let repo = RepoId::parse(repo).map_err(|e| e.to_string())?;
    let tokens: Vec<String> = tokens
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(String::from)
        .collect();
    if tokens.is_empty() {
        return Err("a gated repo needs at least one token".into());
    }
    Ok((repo, tokens))
}

#[cfg(feature = "faults")]
mod fault_args {
    use modelcache_hub::faults::FaultPlan;
    use std::time::Duration;

    /// Fault injection, to test clients against a misbehaving hub.
    #[derive(clap::Args)]
    #[command(next_help_heading = "Fault injection")]
    pub struct FaultArgs {
        /// Serve each response body at most this many bytes a second.
        #[arg(long, value_name = "BYTES")]
        max_bytes_per_second: Option<std::num::NonZeroU64>,
        /// Serve all file bodies together at most this many bytes a second: the hub's egress.
        #[arg(long, value_name = "BYTES")]
        max_total_bytes_per_second: Option<std::num::NonZeroU64>,
        /// Share of requests answered 500 or 503 (0 to 1).
        #[arg(long, value_name = "SHARE", default_value_t = 0.0, value_parser = share)]
        server_errors: f64,
        /// Share of requests answered 429 with Retry-After (0 to 1).
        #[arg(long, value_name = "SHARE", default_value_t = 0.0, value_parser = share)]
        rate_limits: f64,
        /// Share of file bodies cut off halfway (0 to 1).
        #[arg(long, value_name = "SHARE", default_value_t = 0.0, value_parser = share)]
        truncations: f64,
        /// Share of file bodies with one wrong byte (0 to 1).
        #[arg(long, value_name = "SHARE", default_value_t = 0.0, value_parser = share)]
        corruptions: f64,
        /// Share of file bodies that stop halfway and hang, the connection open (0 to 1).
        #[arg(long, value_name = "SHARE", default_value_t = 0.0, value_parser = share)]
        stalls: f64,
        /// Milliseconds added before every answer.
        #[arg(long, value_name = "MS", default_value_t = 0)]
        latency_ms: u64,
        /// Seed of the fault draws (default: random, logged at start to replay a run).
        #[arg(long, value_name = "N")]
        fault_seed: Option<u64>,
    }

    fn share(s: &str) -> Result<f64, String> {
        match s.parse::<f64>() {
            Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
            _ => Err(format!("{s:?} is not a share between 0 and 1")),
        }
    }

    impl FaultArgs {
        pub fn plan(&self) -> FaultPlan {
            FaultPlan {
                max_bytes_per_second: self.max_bytes_per_second,
                max_total_bytes_per_second: self.max_total_bytes_per_second,
                server_errors: self.server_errors,
                rate_limits: self.rate_limits,
                truncations: self.truncations,
                corruptions: self.corruptions,
                stalls: self.stalls,
                latency: Duration::from_millis(self.latency_ms),
                seed: self.fault_seed.unwrap_or_else(rand::random),
            }
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    modelcache_core::process::run_main(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let shutdown = shutdown::on_signals()?;
    let repos = ServedRepos::load(&cli.root)
        .with_context(|| format!("cannot load repos from {}", cli.root.display()))?;
    for r in repos.repos() {
        tracing::info!(model.repo = %r.id, model.commit = %r.commit, files = r.files.len(), kind = r.kind.singular(), "serving");
    }
    let listener = tokio::net::TcpListener::bind(&cli.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    tracing::info!(address = %listener.local_addr()?, "hub listening");
    let hub = server::Hub {
        repos,
        gated: cli.gated.into_iter().collect(),
        private: cli.private.into_iter().collect(),
        #[cfg(feature = "faults")]
        faults: {
            let plan = cli.faults.plan();
            tracing::info!(seed = plan.seed, "fault draws seeded");
            modelcache_hub::faults::Faults::new(plan)
        },
        cdn: cli.cdn_url,
        cdn_link_ttl: std::time::Duration::from_secs(cli.cdn_link_seconds),
        requests: Default::default(),
    };
    server::serve(listener, Arc::new(hub), shutdown).await?;
    Ok(())
}
