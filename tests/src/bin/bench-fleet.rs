//! `bench-fleet`: N agents, each with its own store, start the same cold model at once, the hub
//! capped in total egress (all clients together, as a shared uplink). Two ways in the same run:
//! each agent from the hub alone, and agents that are each other's peers (first wave). Prints a
//! Markdown table of the hub's egress (× the model) and the time until every node holds the
//! model (× one node alone, same hub), and writes an SVG chart. Real agents, each on a host of
//! its own (a network namespace with its own address, on one bridge; `--node-link-mbps` caps its
//! link), and the hub on another; the agents are driven through the agent API over their unix
//! sockets. Each agent runs as the chart runs it: under its container's memory limit (a memory
//! cgroup), so the page cache it writes is bounded as on a node, and with its environment. Each
//! run gets a network and a hub of its own, after the last run's writes reached the disk. Needs
//! root (namespaces, cgroups). Run it with `sudo hack/bench-fleet.sh`.

use anyhow::Context;
use clap::Parser;
use modelcache_proto::agent_v1 as pb;
use modelcache_tests::chart::{BLUE, Bar, GREY, bars_svg};
use modelcache_tests::helm::{AGENT_ENV, AGENT_MEMORY_LIMIT_MIB};
use modelcache_tests::memcg::MemoryCgroup;
use modelcache_tests::netns::{Host, Lan};
use modelcache_tests::procs::{Proc, bin, serve_hub_on, wait_until};
use modelcache_tests::tree::fresh_dir;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Benchmark N cold nodes against a capped hub, with and without peers.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// The model's size in MiB, split into --files files.
    #[arg(long, default_value_t = 2048)]
    model_mib: u64,
    /// Files of the model.
    #[arg(long, default_value_t = 16)]
    files: u64,
    /// The hub's total egress, MB/s (all clients together).
    #[arg(long, default_value_t = 100)]
    hub_mbps: u64,
    /// Each node's link, MB/s each way (0: uncapped).
    #[arg(long, default_value_t = 0)]
    node_link_mbps: u64,
    /// Fleet sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2,4,8")]
    nodes: Vec<usize>,
    /// Each agent's memory limit in MiB, the page cache it writes included, as its container
    /// has in a cluster (the chart's default); 0 for none.
    #[arg(long, default_value_t = AGENT_MEMORY_LIMIT_MIB)]
    agent_memory_mib: u64,
    /// Only the runs with peers (not each node from the hub alone).
    #[arg(long)]
    only_peers: bool,
    /// Working directory (emptied first).
    #[arg(long, default_value = "/tmp/modelcache-bench-fleet")]
    workdir: PathBuf,
    /// Where to write the SVG chart.
    #[arg(long, default_value = "docs/bench/fleet.svg")]
    svg: PathBuf,
}

const REPO: &str = "bench/fleet";
const SECRET: &str = "bench-fleet-peer-secret-0123456789";

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    modelcache_core::process::run_main(run(cli))
}

/// One agent of the fleet.
struct Agent {
    proc: Proc,
    socket: PathBuf,
    /// Its memory limit; dropped after the process (fields drop in order).
    _memory: Option<MemoryCgroup>,
}

/// A process's peak resident memory (VmHWM), in bytes.
fn peak_rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM")?;
    Ok(kib << 10)
}

/// The port agents serve their peers on, each at its host's address.
const PEER_PORT: u16 = 7475;

/// A process's CPU time so far, user and system.
fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = procfs::process::Process::new(pid as i32)?.stat()?;
    let ticks = stat.utime + stat.stime;
    Ok(Duration::from_secs_f64(
        ticks as f64 / procfs::ticks_per_second() as f64,
    ))
}

/// Starts an agent on each of `hosts`, in `dir`, against `endpoint`, each other's peers when
/// `peers`, each in a memory cgroup of `memory` bytes unless 0.
fn start_fleet(
    dir: &Path,
    hosts: &[Host],
    endpoint: &str,
    peers: bool,
    memory: u64,
) -> anyhow::Result<Vec<Agent>> {
    let secret = dir.join("peer-secret");
    std::fs::write(&secret, SECRET)?;
    let mut agents = Vec::new();
    for (i, host) in hosts.iter().enumerate() {
        let home = dir.join(format!("node-{i}"));
        std::fs::create_dir_all(&home)?;
        let socket = home.join("agent.sock");
        let listen = format!("unix://{}", socket.display());
        let store = home.join("store");
        let mut args: Vec<String> = [
            "run",
            "--store",
            store.to_str().context("UTF-8")?,
            "--listen",
            &listen,
            "--endpoint",
            endpoint,
            "--high-watermark",
            "100",
            "--low-watermark",
            "99",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        if peers {
            let others: Vec<String> = hosts
                .iter()
                .filter(|h| h.ip != host.ip)
                .map(|h| format!("http://{}:{PEER_PORT}", h.ip))
                .collect();
            args.extend([
                "--peer-listen".into(),
                format!("{}:{PEER_PORT}", host.ip),
                "--peers".into(),
                others.join(","),
                "--peer-token-file".into(),
                secret.display().to_string(),
            ]);
        }
        // With the chart's environment: `env` sets it and becomes the agent (same process).
        let agent = bin("modelcache-agent")?;
        let mut argv: Vec<String> = AGENT_ENV.iter().map(|(k, v)| format!("{k}={v}")).collect();
        argv.push(agent.display().to_string());
        argv.extend(args);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let proc = Proc::start_on(
            Some(host),
            &format!("agent-{i}"),
            Path::new("env"),
            &argv,
            &home,
        )?;
        // Moved in before it is asked for anything: every download's pages are charged there.
        let memory = match memory {
            0 => None,
            limit => {
                let cg = MemoryCgroup::new(&format!("agent-{i}"), limit)?;
                cg.add(proc.pid())?;
                Some(cg)
            }
        };
        agents.push(Agent {
            proc,
            socket,
            _memory: memory,
        });
    }
    wait_until("the agents' sockets", Duration::from_secs(30), || {
        Ok(agents.iter().all(|a| a.socket.exists()))
    })?;
    Ok(agents)
}

/// Asks an agent for the model until it is ready; the time it took.
async fn ensure(socket: PathBuf, started: Instant) -> anyhow::Result<Duration> {
    let mut client =
        pb::agent_client::AgentClient::new(modelcache_core::transport::connect_unix(&socket));
    let deadline = started + Duration::from_secs(1800);
    loop {
        let req = pb::EnsureRequest {
            model: Some(pb::ModelRef {
                kind: pb::RepoKind::Model as i32,
                repo: REPO.into(),
                revision: "main".into(),
                ..Default::default()
            }),
            wait_ms: 30_000,
            ..Default::default()
        };
        let resp = client.ensure(req).await?.into_inner();
        if let Some(pb::ensure_response::State::Ready(_)) = resp.state {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(Instant::now() < deadline, "not ready after 30 minutes");
    }
}

/// The bytes of file bodies the hub on `host` has sent.
fn hub_egress(host: &Host, endpoint: &str) -> anyhow::Result<u64> {
    let addr = endpoint.trim_start_matches("http://");
    let (status, body) = host.http_get(addr, modelcache_hub::server::REQUESTS_PATH)?;
    anyhow::ensure!(status == 200, "the hub answered {status}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    Ok(v["file_bytes"].as_u64().unwrap_or(0))
}

/// What one run measured.
struct Outcome {
    /// Bytes of file bodies the hub sent.
    egress: u64,
    /// Until every node held the model.
    took: Duration,
    /// The largest agent peak RSS.
    rss: u64,
    /// The agents' CPU time, all together.
    cpu: Duration,
}

/// How every run is set up.
struct Setup<'a> {
    /// Holds `hub/`, what the hub serves, and each run's directory.
    work: &'a Path,
    /// The hub's total egress, bytes a second.
    hub_rate: u64,
    /// Each node's link, bytes a second each way (0: uncapped).
    node_link: u64,
    /// Each agent's memory limit, bytes (0: none).
    agent_memory: u64,
}

/// One run: `n` cold nodes at once, on a network of their own with a hub of its own.
async fn case(setup: &Setup<'_>, name: &str, n: usize, peers: bool) -> anyhow::Result<Outcome> {
    let work = setup.work;
    let dir = work.join(name);
    fresh_dir(&dir)?;
    // Not behind the last run's writeback.
    nix::unistd::sync();
    let mut lan = Lan::new()?;
    let hub_host = lan.host("hub")?;
    let hosts: Vec<Host> = (0..n)
        .map(|i| lan.host(&format!("n{i}")))
        .collect::<Result<_, _>>()?;
    if setup.node_link > 0 {
        for host in &hosts {
            lan.cap_link(host, setup.node_link)?;
        }
    }
    let (_hub, endpoint) = serve_hub_on(
        &hub_host,
        &work.join("hub"),
        &["--max-total-bytes-per-second", &setup.hub_rate.to_string()],
        &dir,
    )?;
    let agents = start_fleet(&dir, &hosts, &endpoint, peers, setup.agent_memory)?;
    let before = hub_egress(&hub_host, &endpoint)?;
    let started = Instant::now();
    let tasks: Vec<_> = agents
        .iter()
        .map(|a| tokio::spawn(ensure(a.socket.clone(), started)))
        .collect();
    let mut slowest = Duration::ZERO;
    for t in tasks {
        slowest = slowest.max(t.await??);
    }
    let egress = hub_egress(&hub_host, &endpoint)? - before;
    let (mut rss, mut cpu) = (0, Duration::ZERO);
    for a in &agents {
        rss = rss.max(peak_rss(a.proc.pid())?);
        cpu += cpu_time(a.proc.pid())?;
    }
    drop(agents);
    std::fs::remove_dir_all(&dir).ok();
    Ok(Outcome {
        egress,
        took: slowest,
        rss,
        cpu,
    })
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let work = &cli.workdir;
    fresh_dir(work)?;
    let model = work.join("hub/models").join(REPO);
    std::fs::create_dir_all(&model)?;
    std::fs::write(model.join("config.json"), b"{\"model_type\": \"bench\"}\n")?;
    let per_file = (cli.model_mib << 20) / cli.files.max(1);
    for i in 0..cli.files {
        // Bytes that differ per file, so no two files share a blob.
        let bytes: Vec<u8> = (0..per_file)
            .map(|j| ((j.wrapping_mul(2654435761) >> 7) as u8) ^ (i as u8))
            .collect();
        std::fs::write(model.join(format!("model-{i:05}.safetensors")), bytes)?;
    }
    let model_bytes: u64 = std::fs::read_dir(&model)?
        .map(|e| Ok(e?.metadata()?.len()))
        .sum::<std::io::Result<u64>>()?;
    let setup = Setup {
        work,
        hub_rate: cli.hub_mbps * 1_000_000,
        node_link: cli.node_link_mbps * 1_000_000,
        agent_memory: cli.agent_memory_mib << 20,
    };
    let one = case(&setup, "one", 1, false).await?.took;
    let limit = match cli.agent_memory_mib {
        0 => "no memory limit".to_owned(),
        mib => format!("each agent's memory limited to {mib} MiB"),
    };
    let links = match cli.node_link_mbps {
        0 => "nodes' links uncapped".to_owned(),
        mbps => format!("nodes' links at {mbps} MB/s"),
    };
    println!(
        "one node alone: {:.1} s for {} MiB at {} MB/s of hub egress; {limit}; {links}",
        one.as_secs_f64(),
        model_bytes >> 20,
        cli.hub_mbps
    );
    println!();
    println!(
        "| nodes | way | hub egress (× model) | time until all hold it | × one node | peak agent RSS | agents' CPU |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut bars = Vec::new();
    let ways = [("hub only", false, GREY), ("peers", true, BLUE)];
    for &n in &cli.nodes {
        for &(way, peers, color) in ways.iter().filter(|w| w.1 || !cli.only_peers) {
            let o = case(&setup, &format!("{n}-{peers}"), n, peers).await?;
            let x = o.egress as f64 / model_bytes as f64;
            let took = o.took;
            let ratio = took.as_secs_f64() / one.as_secs_f64();
            println!(
                "| {n} | {way} | {x:.2} | {:.1} s | {ratio:.2} | {:.0} MiB | {:.1} s |",
                took.as_secs_f64(),
                o.rss as f64 / (1u64 << 20) as f64,
                o.cpu.as_secs_f64()
            );
            bars.push(Bar::new(
                format!("{n} nodes, {way}: {x:.2}× egress"),
                color,
                took.as_secs_f64() * 1000.0,
            ));
        }
    }
    if let Some(parent) = cli.svg.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(
        &cli.svg,
        bars_svg(
            "N cold nodes at once, hub egress capped: time until all hold the model (ms, log scale)",
            &bars,
        ),
    )?;
    println!();
    println!("chart: {}", cli.svg.display());
    Ok(())
}
