//! `bench-publish`: warm NodePublishVolume latency, measured through the real plugin and agent,
//! for a small model and a large one, against two peers on the same snapshot in the same run:
//! the bare syscalls of a read-only bind mount (the floor any CSI driver pays), and copying the
//! model into the pod's directory (what a per-pod copy, e.g. an init container, pays even with
//! the bytes already on the node). Prints a Markdown table with ratios and writes an SVG chart.
//! Needs root. Run it with `sudo hack/bench.sh`.

use anyhow::Context;
use clap::Parser;
use modelcache_csi::mounter::{LinuxMounter, Mounter};
use modelcache_tests::chart::{BLUE, Bar, GREY, RED, Series, bars_svg, ms};
use modelcache_tests::models::generate_model;
use modelcache_tests::node::{Hub, LocalNode, publish_request};
use modelcache_tests::tree::fresh_dir;
use nix::mount::MntFlags;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Benchmark warm NodePublishVolume against bare bind mounts and copies.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Publishes per model.
    #[arg(long, default_value_t = 1000)]
    iterations: usize,
    /// Weights of the small model, in MiB.
    #[arg(long, default_value_t = 1)]
    small_mib: usize,
    /// Weights of the large model, in MiB.
    #[arg(long, default_value_t = 2048)]
    large_mib: usize,
    /// Copies of the large model timed (each writes its whole size).
    #[arg(long, default_value_t = 3)]
    large_copies: usize,
    /// Working directory (emptied first).
    #[arg(long, default_value = "/tmp/modelcache-bench")]
    workdir: PathBuf,
    /// Where to write the SVG chart.
    #[arg(long, default_value = "docs/bench/warm-publish.svg")]
    svg: PathBuf,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    modelcache_core::process::run_main(run(cli))
}

struct Case {
    label: String,
    publish: Series,
    bind: Series,
    copy: Series,
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let work = &cli.workdir;
    fresh_dir(work)?;
    let hub_root = work.join("hub");
    let models = [
        ("bench/small", cli.small_mib, cli.iterations.min(200)),
        ("bench/large", cli.large_mib, cli.large_copies),
    ];
    for (repo, mib, _) in &models {
        println!("==> generating {repo} ({mib} MiB)");
        generate_model(&hub_root.join("models").join(repo), mib << 20)?;
    }
    let mut node = LocalNode::start(&work.join("node"), Hub::Serve(hub_root, vec![]), 100)?;
    node.wait_ready().await?;
    let mut cases = Vec::new();
    for (repo, mib, copies) in models {
        println!(
            "==> {repo}: cold publish (download), then {} warm publishes",
            cli.iterations
        );
        let cold = node.target("cold");
        let started = Instant::now();
        node.publish("cold", &cold, &[("model", repo)], |_| {})
            .await
            .map_err(|s| anyhow::anyhow!("cold publish of {repo}: {}", s.message()))?;
        println!("    cold: {:.1} s", started.elapsed().as_secs_f64());
        let snapshot = PathBuf::from(
            node.snapshots_of(repo)
                .await?
                .into_iter()
                .next()
                .context("no snapshot after publish")?
                .path,
        );
        node.unpublish("cold", &cold).await?;

        // Measure a warm node, not the writeback of the data the setup just wrote.
        nix::unistd::sync();
        let mut publish = Vec::with_capacity(cli.iterations);
        for i in 0..cli.iterations {
            let vol = format!("warm-{i}");
            let target = node.target(&vol);
            let req = publish_request(&vol, &target, &[("model", repo)], &[]);
            let t = Instant::now();
            node.node
                .node_publish_volume(req)
                .await
                .map_err(|s| anyhow::anyhow!("warm publish {i} of {repo}: {}", s.message()))?;
            publish.push(t.elapsed());
            node.unpublish(&vol, &target).await?;
        }

        let peers = work.join("peers");
        nix::unistd::sync();
        let mut bind = Vec::with_capacity(cli.iterations);
        for i in 0..cli.iterations {
            let target = peers.join(format!("bind-{i}"));
            let t = Instant::now();
            std::fs::create_dir_all(&target)?;
            bind_read_only(&snapshot, &target)?;
            bind.push(t.elapsed());
            nix::mount::umount2(&target, MntFlags::empty())?;
            std::fs::remove_dir(&target)?;
        }
        let mut copy = Vec::with_capacity(copies);
        for i in 0..copies {
            let target = peers.join(format!("copy-{i}"));
            let t = Instant::now();
            copy_tree(&snapshot, &target)?;
            copy.push(t.elapsed());
            std::fs::remove_dir_all(&target)?;
        }
        cases.push(Case {
            label: format!("{repo} ({mib} MiB)"),
            publish: Series { samples: publish },
            bind: Series { samples: bind },
            copy: Series { samples: copy },
        });
    }
    let clean = node.stop();
    anyhow::ensure!(clean, "a process did not stop cleanly");

    println!();
    println!(
        "| model | modelcache warm publish p50 / p99 | bare bind+remount p50 / p99 | copy into pod dir p50 | copy ÷ publish (p50) | publish ÷ bare mount (p50) |"
    );
    println!("|---|---|---|---|---|---|");
    for c in &cases {
        println!(
            "| {} | {:.2} / {:.2} ms | {:.3} / {:.3} ms | {:.1} ms | {:.0}× | {:.1}× |",
            c.label,
            ms(c.publish.pct(0.5)),
            ms(c.publish.pct(0.99)),
            ms(c.bind.pct(0.5)),
            ms(c.bind.pct(0.99)),
            ms(c.copy.pct(0.5)),
            ms(c.copy.pct(0.5)) / ms(c.publish.pct(0.5)),
            ms(c.publish.pct(0.5)) / ms(c.bind.pct(0.5)),
        );
    }
    let (small, large) = (&cases[0], &cases[1]);
    println!(
        "\nlarge ÷ small warm publish: p50 {:.2}×, p99 {:.2}× ({} publishes each)",
        ms(large.publish.pct(0.5)) / ms(small.publish.pct(0.5)),
        ms(large.publish.pct(0.99)) / ms(small.publish.pct(0.99)),
        cli.iterations
    );
    if let Some(dir) = cli.svg.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&cli.svg, chart(&cases))?;
    println!("chart: {}", cli.svg.display());
    Ok(())
}

fn bind_read_only(source: &Path, target: &Path) -> anyhow::Result<()> {
    Ok(LinuxMounter::default().bind_read_only(source, target)?)
}

fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    for e in walkdir::WalkDir::new(from) {
        let e = e?;
        let dest = to.join(e.path().strip_prefix(from)?);
        if e.file_type().is_dir() {
            std::fs::create_dir_all(&dest)?;
        } else {
            std::fs::copy(e.path(), &dest)?;
        }
    }
    // Like a pod's copy, the data must reach the disk to survive.
    nix::unistd::sync();
    Ok(())
}

/// The p50 of each way, one group of bars per model.
fn chart(cases: &[Case]) -> String {
    let rows: Vec<Bar> = cases
        .iter()
        .flat_map(|c| {
            [
                Bar::new(
                    format!("{} — bare bind+remount", c.label),
                    GREY,
                    ms(c.bind.pct(0.5)),
                ),
                Bar::new(
                    format!("{} — modelcache publish", c.label),
                    BLUE,
                    ms(c.publish.pct(0.5)),
                ),
                Bar::new(
                    format!("{} — copy into pod dir", c.label),
                    RED,
                    ms(c.copy.pct(0.5)),
                ),
            ]
        })
        .collect();
    bars_svg(
        "Giving a pod a model already on the node: p50 latency (ms, log scale)",
        &rows,
    )
}
