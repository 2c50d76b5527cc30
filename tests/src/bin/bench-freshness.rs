//! `bench-freshness`: warm NodePublishVolume latency when the hub is slow (300 ms per answer)
//! or stopped, through the real plugin, agent and hub, each publish with a token no pod used
//! before. Two ways, in the same run: asking the hub on every publish (`--revision-ttl 0
//! --access-ttl 0`, what every warm publish with a new token paid before revisions were kept
//! per node), and modelcache's default (the revision kept for `--revision-ttl`, here 1 s so that
//! it expires during the run, then served while revalidated in the background). Prints a
//! Markdown table with ratios and the hub requests each way cost, and writes an SVG chart.
//! Needs root. Run it with `sudo hack/bench-freshness.sh`.

use anyhow::Context;
use clap::Parser;
use modelcache_tests::chart::{BLUE, Bar, GREY, Series, bars_svg, ms};
use modelcache_tests::models::generate_model;
use modelcache_tests::node::{Hub, LocalNode, publish_request};
use modelcache_tests::procs::http_get;
use modelcache_tests::tree::fresh_dir;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Benchmark warm publishes against a slow and a stopped hub.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Warm publishes per case with modelcache's freshness rules.
    #[arg(long, default_value_t = 500)]
    iterations: usize,
    /// Warm publishes per case when every publish asks the hub (each costs the hub's latency,
    /// or its retries when it is stopped).
    #[arg(long, default_value_t = 30)]
    ask_iterations: usize,
    /// Milliseconds the hub adds to every answer.
    #[arg(long, default_value_t = 300)]
    hub_latency_ms: u64,
    /// The revision TTL of the modelcache cases: short, so that it expires during the run.
    #[arg(long, default_value = "1s")]
    revision_ttl: String,
    /// Pause between publishes, so that the TTL expires several times during a run.
    #[arg(long, default_value_t = 10)]
    pause_ms: u64,
    /// Working directory (emptied first).
    #[arg(long, default_value = "/tmp/modelcache-bench-freshness")]
    workdir: PathBuf,
    /// Where to write the SVG chart.
    #[arg(long, default_value = "docs/bench/warm-publish-hub.svg")]
    svg: PathBuf,
}

const MODEL: &str = "bench/fresh";
/// The benchmark's target for warm publishes, whatever the hub does.
const TARGET_P99: Duration = Duration::from_millis(10);

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    modelcache_core::process::run_main(run(cli))
}

/// One way of publishing against one state of the hub.
struct Case {
    hub: &'static str,
    policy: &'static str,
    modelcache: bool,
    publishes: Series,
    /// Revision and access requests the hub answered during the warm publishes (None: stopped).
    hub_requests: Option<u64>,
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let work = &cli.workdir;
    fresh_dir(work)?;
    let hub_root = work.join("hub");
    generate_model(&hub_root.join("models").join(MODEL), 1 << 20)?;
    let latency = cli.hub_latency_ms.to_string();
    let slow = format!("{} ms per answer", cli.hub_latency_ms);
    let ask = ["--revision-ttl", "0", "--access-ttl", "0"];
    let keep = ["--revision-ttl", cli.revision_ttl.as_str()];
    let plans: [(&[&str], bool, usize); 4] = [
        (&ask, false, cli.ask_iterations),
        (&keep, false, cli.iterations),
        (&ask, true, cli.ask_iterations.min(5)),
        (&keep, true, cli.iterations),
    ];
    let mut cases = Vec::new();
    for (n, (flags, stop_hub, iterations)) in plans.into_iter().enumerate() {
        let modelcache = flags == keep;
        let policy = if modelcache {
            "modelcache (revision kept per node, revalidated in the background)"
        } else {
            "ask the hub on every publish"
        };
        let hub = if stop_hub { "stopped" } else { slow.as_str() };
        println!("==> {policy}, hub {hub}: {iterations} warm publishes");
        let hub_flags = vec!["--latency-ms".to_owned(), latency.clone()];
        let mut node = LocalNode::start_with(
            &work.join(format!("node-{n}")),
            Hub::Serve(hub_root.clone(), hub_flags),
            100,
            flags,
        )?;
        node.wait_ready().await?;
        let cold = node.target("cold");
        node.publish("cold", &cold, &[("model", MODEL)], |_| {})
            .await
            .map_err(|s| anyhow::anyhow!("cold publish: {}", s.message()))?;
        node.unpublish("cold", &cold).await?;
        if stop_hub {
            node.stop_hub();
        }
        let before = (!stop_hub).then(|| hub_requests(&node)).transpose()?;
        let mut samples = Vec::with_capacity(iterations);
        for i in 0..iterations {
            let vol = format!("warm-{i}");
            let target = node.target(&vol);
            let token = format!("hf_pod_{i}");
            let req = publish_request(&vol, &target, &[("model", MODEL)], &[("token", &token)]);
            let t = Instant::now();
            node.node
                .node_publish_volume(req)
                .await
                .map_err(|s| anyhow::anyhow!("warm publish {i}: {}", s.message()))?;
            samples.push(t.elapsed());
            node.unpublish(&vol, &target).await?;
            tokio::time::sleep(Duration::from_millis(cli.pause_ms)).await;
        }
        let hub_requests = match before {
            Some(before) => Some(hub_requests(&node)? - before),
            None => None,
        };
        anyhow::ensure!(node.stop(), "a process did not stop cleanly");
        cases.push(Case {
            hub: if stop_hub { "stopped" } else { "slow" },
            policy,
            modelcache,
            publishes: Series { samples },
            hub_requests,
        });
    }

    println!();
    println!(
        "| hub | way | warm publishes | p50 | p99 | hub requests | p50 ÷ modelcache's | p99 < {} ms |",
        TARGET_P99.as_millis()
    );
    println!("|---|---|---|---|---|---|---|---|");
    for c in &cases {
        let ours = cases
            .iter()
            .find(|o| o.modelcache && o.hub == c.hub)
            .context("a modelcache case per hub state")?;
        let hub = if c.hub == "slow" { &slow } else { "stopped" };
        println!(
            "| {hub} | {} | {} | {:.2} ms | {:.2} ms | {} | {:.0}× | {} |",
            c.policy,
            c.publishes.samples.len(),
            ms(c.publishes.pct(0.5)),
            ms(c.publishes.pct(0.99)),
            c.hub_requests
                .map_or_else(|| "-".to_owned(), |r| r.to_string()),
            ms(c.publishes.pct(0.5)) / ms(ours.publishes.pct(0.5)),
            if c.publishes.pct(0.99) < TARGET_P99 {
                "yes"
            } else {
                "no"
            },
        );
    }
    let rows: Vec<Bar> = cases
        .iter()
        .map(|c| {
            let who = if c.modelcache {
                "modelcache"
            } else {
                "ask every publish"
            };
            let color = if c.modelcache { BLUE } else { GREY };
            Bar::new(
                format!("hub {} — {who}", c.hub),
                color,
                ms(c.publishes.pct(0.5)),
            )
        })
        .collect();
    if let Some(dir) = cli.svg.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(
        &cli.svg,
        bars_svg(
            "Warm publish with a new token, hub slow or stopped: p50 (ms, log scale)",
            &rows,
        ),
    )?;
    println!("chart: {}", cli.svg.display());
    Ok(())
}

/// Revision and access requests the node's hub has answered.
fn hub_requests(node: &LocalNode) -> anyhow::Result<u64> {
    let addr = node.hub_endpoint.trim_start_matches("http://");
    let (status, body) = http_get(addr, modelcache_hub::server::REQUESTS_PATH)?;
    anyhow::ensure!(status == 200, "{addr} answered {status}");
    let counts: std::collections::BTreeMap<String, u64> = serde_json::from_str(&body)?;
    Ok(["revision", "auth-check"]
        .iter()
        .filter_map(|p| counts.get(*p))
        .sum())
}
