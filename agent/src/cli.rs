//! The command line of `modelcache-agent`: its flags, in the library so that tests can check
//! what the Helm chart passes.

use crate::evict::Watermarks;
use crate::fetch::{Tier, Tuning};
use crate::store::{Store, StoreError};
use clap::{Parser, Subcommand};
use modelcache_core::telemetry::LogFormat;
use modelcache_hub::client::DEFAULT_ENDPOINT;
use std::path::PathBuf;
use std::time::Duration;

/// modelcache node agent: fills a node's model store from a Hugging Face–compatible hub and
/// serves it to the modelcache CSI plugin.
#[derive(Parser)]
#[command(version, propagate_version = true)]
pub struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "MODELCACHE_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The node's store, for every command that uses one.
#[derive(clap::Args)]
pub struct StoreArgs {
    /// Store directory.
    #[arg(long, env = "MODELCACHE_STORE", default_value = "/var/lib/modelcache")]
    pub store: PathBuf,
}

impl StoreArgs {
    /// Opens the store to write it, holding its lock. The error names the path and the cause.
    pub fn open(&self) -> Result<Store, StoreError> {
        Store::open(&self.store)
    }

    /// Opens the store to read it (for `ls`), beside a running agent.
    pub fn inspect(&self) -> Result<Store, StoreError> {
        Store::inspect(&self.store)
    }
}

/// The running agent, for the commands that change its store.
#[derive(clap::Args)]
pub struct AgentSocketArgs {
    /// The agent API socket (`run --listen`). When an agent answers there, the command runs
    /// inside it, under the lock volumes pin with; when none does, the command takes the store's
    /// lock itself.
    #[arg(
        long = "agent",
        env = "MODELCACHE_AGENT_LISTEN",
        default_value = "unix:///run/modelcache/agent.sock"
    )]
    pub endpoint: String,
}

/// Where models come from.
#[derive(clap::Args)]
pub struct HubArgs {
    /// Hub base URL; HF_ENDPOINT overrides the default, as in huggingface_hub.
    #[arg(long, env = "HF_ENDPOINT", default_value = DEFAULT_ENDPOINT, value_parser = parse_endpoint)]
    pub endpoint: String,
    /// Hub token for gated and private repos (read from HF_TOKEN; never logged). `run` uses it
    /// to pre-warm, never for a volume: a volume reads with its own token alone (see
    /// --lend-token-to-volumes).
    #[arg(long, env = "HF_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Volumes that bring no token of their own read with --token. Off by default: with it on,
    /// every pod on the node may mount whatever --token can read, gated and private repos
    /// included. For single-tenant clusters only.
    #[arg(long, env = "MODELCACHE_LEND_TOKEN_TO_VOLUMES")]
    pub lend_token_to_volumes: bool,
    /// Hosts besides the hub's own that downloads may be redirected to, each with its
    /// subdomains: a mirror's CDN. The Hugging Face Hub's CDN (hf.co) needs no entry.
    #[arg(long, env = "MODELCACHE_CDN_HOSTS", value_delimiter = ',')]
    pub cdn_hosts: Vec<String>,
    /// How long the commit a branch or tag resolved to is used before the hub is asked again
    /// (e.g. 300, 90s, 5m, 1h). Past it, a publish whose snapshot is on the node is served the
    /// commit it has while the hub is asked in the background; 0 asks on every publish, and
    /// the publish waits.
    #[arg(long, env = "MODELCACHE_REVISION_TTL", value_name = "DURATION",
          default_value = "5m", value_parser = parse_duration)]
    pub revision_ttl: Duration,
    /// How long the hub's answer on whether a token may read a gated or private repo is
    /// trusted (a refusal: at most 10 s); 0 asks on every publish.
    #[arg(long, env = "MODELCACHE_ACCESS_TTL", value_name = "DURATION",
          default_value = "2m", value_parser = parse_duration)]
    pub access_ttl: Duration,
    /// Files downloaded at once.
    #[arg(long, env = "MODELCACHE_PARALLEL_FILES", default_value_t = Tuning::default().files,
          value_parser = at_least_one)]
    pub parallel_files: usize,
    /// HTTP requests in flight at once, over all files (large files use several).
    #[arg(long, env = "MODELCACHE_CONNECTIONS", default_value_t = Tuning::default().connections,
          value_parser = at_least_one)]
    pub connections: usize,
    /// Files larger than this many MiB are fetched in ranges of this size, in parallel and
    /// resumably.
    #[arg(long, env = "MODELCACHE_CHUNK_MIB", default_value_t = Tuning::default().chunk_size >> 20,
          value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub chunk_mib: u64,
    /// A file's download fails when less than 64 KiB of it arrived in this long (e.g. 60,
    /// 90s, 2m), whatever retries are under way: a hub or proxy that accepts connections and
    /// then hangs ends in an error this soon.
    #[arg(long, env = "MODELCACHE_STALL_TIMEOUT", value_name = "DURATION",
          default_value = "60s", value_parser = at_least_a_second)]
    pub stall_timeout: Duration,
    /// An HF cache on a shared volume (its HF_HOME, or HF_HOME/hub), as `huggingface-cli
    /// download` fills it: the files it holds are imported from it, verified, instead of
    /// downloaded. Symlinks leading outside a repo's folder are refused.
    #[arg(
        long,
        env = "MODELCACHE_SHARED_CACHE",
        value_name = "DIR",
        help_heading = "Sources"
    )]
    pub shared_cache: Option<PathBuf>,
    /// Where files come from, tried in order per file: `shared-cache` (`pvc` is accepted),
    /// `peers`, `hub`. Default: shared-cache (with --shared-cache), peers (with --peers), hub.
    /// With shared-cache alone, revisions resolve through the cache's refs/ and no hub is asked.
    #[arg(
        long,
        env = "MODELCACHE_SOURCES",
        value_delimiter = ',',
        value_name = "TIER,...",
        help_heading = "Sources"
    )]
    pub sources: Vec<Tier>,
    /// Other agents to fetch blobs from (their --peer-listen), e.g.
    /// http://10.0.0.7:7475,http://10.0.0.8:7475. Every byte is verified by hash.
    #[arg(
        long,
        env = "MODELCACHE_PEERS",
        value_delimiter = ',',
        value_name = "URL,...",
        help_heading = "Peers",
        requires = "peer_token_file"
    )]
    pub peers: Vec<String>,
    /// Find peers by DNS, every 15 s: a name whose addresses are the agents (the chart's
    /// headless Service) and the port they serve on, e.g. modelcache-peers.modelcache.svc:7475.
    #[arg(
        long,
        env = "MODELCACHE_PEERS_DNS",
        value_name = "HOST:PORT",
        help_heading = "Peers",
        requires = "peer_token_file",
        conflicts_with = "peers"
    )]
    pub peers_dns: Option<String>,
    /// This agent's own address (its pod IP), left out of what --peers-dns finds.
    #[arg(
        long,
        env = "MODELCACHE_PEER_OWN_IP",
        value_name = "IP",
        help_heading = "Peers"
    )]
    pub peer_own_ip: Option<std::net::IpAddr>,
    /// A file holding the cluster's peer secret (at least 16 characters): sent to peers, and
    /// required of requests to --peer-listen.
    #[arg(
        long,
        env = "MODELCACHE_PEER_TOKEN_FILE",
        value_name = "FILE",
        help_heading = "Peers"
    )]
    pub peer_token_file: Option<PathBuf>,
}

/// The subcommands. (Flattened argument groups carry their own docs.)
#[allow(missing_docs)]
#[derive(Subcommand)]
pub enum Command {
    /// Moved to the `modelcache-hub` binary; this runs it (installed beside this one) with the
    /// same arguments.
    #[command(hide = true, disable_help_flag = true)]
    ServeHub {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Download a repo into the store, verify every file, and print the snapshot directory
    /// as the last line.
    Pull {
        /// Repo id, `org/name`.
        repo: String,
        /// Branch, tag or 40-hex commit.
        #[arg(long, default_value = "main")]
        revision: String,
        /// The repo is a dataset.
        #[arg(long)]
        dataset: bool,
        /// Only files matching these globs (comma-separated or repeated), as huggingface_hub's
        /// allow_patterns.
        #[arg(long, value_delimiter = ',')]
        include: Vec<String>,
        /// Minus files matching these globs, as huggingface_hub's ignore_patterns.
        #[arg(long, value_delimiter = ',')]
        exclude: Vec<String>,
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        hub: HubArgs,
    },
    /// List what a node's store holds: snapshots, the revisions that last resolved to them,
    /// sizes, and the volumes that have them mounted. Changes nothing.
    Ls {
        #[command(flatten)]
        store: StoreArgs,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove a repo's snapshots from the store (only one commit's with --commit), then the
    /// blobs nothing else uses. Refuses, removing nothing, while a volume has one mounted.
    /// Asks the running agent when one answers on --agent; otherwise takes the store's lock.
    Rm {
        /// Repo id, `org/name`.
        repo: String,
        /// Only the snapshots of this commit: 40 hex digits, or the first 12 as `ls` shows them
        /// (any unique prefix of 7 or more).
        #[arg(long)]
        commit: Option<String>,
        /// The repo is a dataset.
        #[arg(long)]
        dataset: bool,
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        agent: AgentSocketArgs,
        /// Print JSON instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Re-hash every blob in the store. A corrupt blob is moved to quarantine/ and the unpinned
    /// snapshots that showed it are removed, so the next pull fetches them again; mounted ones
    /// are kept and named. Exits with status 1 when anything was corrupt. Asks the running agent
    /// when one answers on --agent; otherwise takes the store's lock.
    Verify {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        agent: AgentSocketArgs,
        /// Only report; move and remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Run the node daemon: serve the agent API on a unix socket.
    Run {
        #[command(flatten)]
        store: StoreArgs,
        /// Agent API endpoint.
        #[arg(
            long,
            env = "MODELCACHE_AGENT_LISTEN",
            default_value = "unix:///run/modelcache/agent.sock"
        )]
        listen: String,
        /// Serve Prometheus metrics on /metrics, and /healthz and /readyz, at this address
        /// (e.g. 0.0.0.0:9090); off when not given.
        #[arg(long, env = "MODELCACHE_METRICS_LISTEN", value_name = "HOST:PORT")]
        metrics_listen: Option<String>,
        /// Serve this node's blobs to other agents at this address (e.g. 0.0.0.0:7475), to
        /// requests that carry the secret of --peer-token-file; off when not given.
        #[arg(
            long,
            env = "MODELCACHE_PEER_LISTEN",
            value_name = "HOST:PORT",
            help_heading = "Peers",
            requires = "peer_token_file"
        )]
        peer_listen: Option<String>,
        /// Uploads of held blobs to peers at once, and four times as many of blobs still
        /// downloading (which go at the download's pace); more are told to come back (503,
        /// Retry-After).
        #[arg(long, env = "MODELCACHE_PEER_MAX_UPLOADS", value_name = "N", help_heading = "Peers",
              default_value_t = crate::peers::server::DEFAULT_MAX_UPLOADS, value_parser = at_least_one)]
        peer_max_uploads: usize,
        /// Uploads to peers, all together, at most this many MB/s (a share of the node's link
        /// for the pods); no cap when not given.
        #[arg(long, env = "MODELCACHE_PEER_MAX_UPLOAD_MBPS", value_name = "MB/S",
              help_heading = "Peers", value_parser = clap::value_parser!(u64).range(1..))]
        peer_max_upload_mbps: Option<u64>,
        /// This node's name (from the downward API's spec.nodeName). Through the in-cluster API
        /// (or KUBECONFIG): label the Node with the models the store holds, and watch it for
        /// pre-warm labels and its DiskPressure condition (which makes eviction critical). Off
        /// when not given.
        #[arg(long, env = "NODE_NAME", value_name = "NAME")]
        node_name: Option<String>,
        /// With --node-name, a kubeconfig to reach the API with instead of the pod's service
        /// account (for development).
        #[arg(long, env = "KUBECONFIG", value_name = "FILE")]
        kubeconfig: Option<PathBuf>,
        /// The pre-warm catalogue's ConfigMap (key catalogue.json), watched with --node-name:
        /// entries this node's labels ask for are fetched and kept, evicted last.
        #[arg(long, env = "MODELCACHE_CATALOGUE", value_name = "NAMESPACE/NAME",
              requires = "node_name", value_parser = parse_namespaced)]
        catalogue: Option<(String, String)>,
        #[command(flatten)]
        hub: HubArgs,
        #[command(flatten)]
        eviction: EvictionArgs,
    },
}

/// When the agent gives disk space back.
#[derive(clap::Args)]
#[command(next_help_heading = "Eviction")]
pub struct EvictionArgs {
    /// Evict models no volume uses when the store's filesystem is fuller than this percent
    /// (kubelet evicts pods at 90% by default).
    #[arg(long, env = "MODELCACHE_HIGH_WATERMARK", value_name = "PCT",
          default_value_t = Watermarks::default().high,
          value_parser = clap::value_parser!(u8).range(1..=100))]
    pub high_watermark: u8,
    /// ... until it is under this percent.
    #[arg(long, env = "MODELCACHE_LOW_WATERMARK", value_name = "PCT",
          default_value_t = Watermarks::default().low,
          value_parser = clap::value_parser!(u8).range(0..=99))]
    pub low_watermark: u8,
    /// Also count the store as full at this size, whatever the filesystem's: the watermarks
    /// apply to it too.
    #[arg(long, env = "MODELCACHE_MAX_STORE_GIB", value_name = "GIB")]
    pub max_store_gib: Option<f64>,
    /// The size of a compilation-cache volume that names no maxSize (e.g. 10Gi).
    #[arg(long, env = "MODELCACHE_CACHE_DEFAULT_SIZE", value_name = "SIZE",
          default_value = "10Gi", value_parser = parse_size, help_heading = "Cache volumes")]
    pub cache_default_size: u64,
    /// The largest maxSize a compilation-cache volume may ask for (e.g. 100Gi).
    #[arg(long, env = "MODELCACHE_CACHE_MAX_SIZE", value_name = "SIZE",
          default_value = "100Gi", value_parser = parse_size, help_heading = "Cache volumes")]
    pub cache_max_size: u64,
}

impl EvictionArgs {
    /// The cache limits these flags ask for.
    pub fn cache_limits(&self) -> crate::caches::CacheLimits {
        crate::caches::CacheLimits {
            default_size: self.cache_default_size,
            max_size: self.cache_max_size,
        }
    }

    /// The watermarks these flags ask for, checked.
    pub fn watermarks(&self) -> Result<Watermarks, BadEviction> {
        let max_store_bytes = match self.max_store_gib {
            Some(g) if g.is_finite() && g > 0.0 => Some((g * (1u64 << 30) as f64) as u64),
            Some(g) => return Err(BadEviction::MaxStore(g)),
            None => None,
        };
        if self.cache_default_size > self.cache_max_size {
            return Err(BadEviction::CacheSizes);
        }
        Ok(Watermarks {
            high: self.high_watermark,
            low: self.low_watermark,
            max_store_bytes,
        }
        .validate()?)
    }
}

/// Eviction flags that do not go together.
#[derive(Debug, thiserror::Error)]
pub enum BadEviction {
    /// `--max-store-gib` is not a positive size.
    #[error("--max-store-gib {0} is not a positive size")]
    MaxStore(f64),
    /// The default cache size is above the maximum.
    #[error("--cache-default-size is larger than --cache-max-size")]
    CacheSizes,
    /// The watermarks are out of order.
    #[error(transparent)]
    Watermarks(#[from] crate::evict::BadWatermarks),
}

/// A count that must be at least one.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a whole number")),
    }
}

/// A duration: whole seconds, or a number with `s`, `m` or `h`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => {
            return Err(format!(
                "{s:?}: write seconds, or a number with s, m or h (90s, 5m)"
            ));
        }
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?}: write seconds, or a number with s, m or h (90s, 5m)"))
}

/// A size: a Kubernetes quantity (10Gi, 512Mi) of at least the smallest cache.
fn parse_size(s: &str) -> Result<u64, String> {
    match modelcache_core::cache::parse_quantity(s) {
        Ok(n) if n >= crate::caches::MIN_CACHE_BYTES => Ok(n),
        Ok(_) => Err(format!("{s:?} is smaller than a cache can be (16Mi)")),
        Err(e) => Err(e.to_string()),
    }
}

/// A duration of at least a second.
fn at_least_a_second(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err("must be at least 1s".into()),
        d => Ok(d),
    }
}

/// A hub endpoint: an http or https URL with a host, checked when the flag is read.
fn parse_endpoint(s: &str) -> Result<String, modelcache_hub::client::BadEndpoint> {
    modelcache_hub::client::check_endpoint(s).map(|()| s.to_owned())
}

fn parse_namespaced(s: &str) -> Result<(String, String), String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_owned(), name.to_owned()))
        }
        _ => Err("write it as namespace/name".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<Cli, String> {
        Cli::try_parse_from(["modelcache-agent", "pull", "org/m"].iter().chain(args))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn zero_concurrency_and_non_http_endpoints_are_refused_when_parsed() {
        for (args, want) in [
            (&["--connections", "0"][..], "at least 1"),
            (&["--stall-timeout", "0"][..], "at least 1s"),
            (&["--parallel-files", "0"][..], "at least 1"),
            (&["--endpoint", "notaurl"][..], "not a URL"),
            (
                &["--endpoint", "ftp://mirror.example"][..],
                "not an http(s) URL",
            ),
        ] {
            let err = parse(args)
                .err()
                .unwrap_or_else(|| panic!("{args:?} accepted"));
            assert!(err.contains(want), "{args:?}: {err}");
        }
        parse(&["--endpoint", "http://127.0.0.1:8080", "--connections", "1"]).unwrap();
    }
}
