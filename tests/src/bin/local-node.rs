//! `local-node`: modelcache on this machine, no cluster. Starts a hub (by default the embedded
//! `modelcache-hub` with a generated demo model), the node agent and the CSI plugin as real processes,
//! publishes the model into a kubelet-style directory twice — cold, then warm — exactly as kubelet
//! calls NodePublishVolume, and prints what was mounted and how long each took. Needs root.

use anyhow::Context;
use clap::Parser;
use modelcache_tests::models::generate_model;
use modelcache_tests::node::{Hub, LocalNode};
use modelcache_tests::tree::{mount_options, unmount_all_below};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Run a modelcache node locally: hub → agent → store → CSI publish → read-only mount.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Working directory for the store, sockets, logs and mounts (emptied first).
    #[arg(
        long,
        env = "MODELCACHE_LOCAL_WORKDIR",
        default_value = "/tmp/modelcache-local"
    )]
    workdir: PathBuf,
    /// Repo to publish. Defaults to a generated demo model on the embedded hub.
    #[arg(long, default_value = "modelcache/demo-tiny")]
    model: String,
    /// Revision to publish.
    #[arg(long, default_value = "main")]
    revision: String,
    /// Use this hub instead of the embedded one, e.g. https://huggingface.co (needs network).
    #[arg(long, env = "HF_ENDPOINT")]
    endpoint: Option<String>,
    /// Serve this directory of model files as --model on the embedded hub.
    #[arg(long, conflicts_with = "endpoint")]
    model_dir: Option<PathBuf>,
    /// Size of the generated demo model's weights, in MiB.
    #[arg(long, default_value_t = 64)]
    demo_mib: usize,
    /// Keep the node running with the volume mounted until Ctrl-C.
    #[arg(long)]
    keep: bool,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    modelcache_core::process::run_main(run(cli))
}

fn step(msg: impl std::fmt::Display) {
    println!("==> {msg}");
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let work = &cli.workdir;
    if work.exists() {
        unmount_all_below(work);
        std::fs::remove_dir_all(work).with_context(|| format!("emptying {}", work.display()))?;
    }
    std::fs::create_dir_all(work)?;
    let hub = match (&cli.endpoint, &cli.model_dir) {
        (Some(endpoint), _) => {
            step(format!("using the hub at {endpoint}"));
            Hub::Remote(endpoint.clone())
        }
        (None, dir) => {
            let repo_dir = work.join("hub/models").join(&cli.model);
            std::fs::create_dir_all(repo_dir.parent().expect("has a parent"))?;
            match dir {
                Some(d) => {
                    let d = std::fs::canonicalize(d)
                        .with_context(|| format!("--model-dir {}", d.display()))?;
                    std::os::unix::fs::symlink(&d, &repo_dir)?;
                    step(format!(
                        "serving {} as {} on the embedded hub",
                        d.display(),
                        cli.model
                    ));
                }
                None => {
                    generate_model(&repo_dir, cli.demo_mib << 20)?;
                    step(format!(
                        "generated demo model {} ({} MiB of weights) for the embedded hub",
                        cli.model, cli.demo_mib
                    ));
                }
            }
            Hub::Serve(work.join("hub"), vec![])
        }
    };
    let mut node = LocalNode::start(&work.join("node"), hub, 30)?;
    node.wait_ready().await?;
    step(format!(
        "node running: hub {}, agent and CSI plugin on unix sockets in {}",
        node.hub_endpoint,
        work.join("node").display()
    ));

    let attrs = [
        ("model", cli.model.as_str()),
        ("revision", cli.revision.as_str()),
    ];
    let mut times = Vec::new();
    let mut targets = Vec::new();
    for (volume, label) in [("demo-cold", "cold"), ("demo-warm", "warm")] {
        let target = node.target(volume);
        let started = Instant::now();
        let mut last_note = Instant::now() - Duration::from_secs(10);
        node.publish(volume, &target, &attrs, |s| {
            if last_note.elapsed() >= Duration::from_secs(2) {
                println!("    {}", s.message());
                last_note = Instant::now();
            }
        })
        .await
        .map_err(|s| anyhow::anyhow!("NodePublishVolume ({:?}): {}", s.code(), s.message()))?;
        let took = started.elapsed();
        step(format!(
            "{label} publish of {} took {:.1} ms",
            cli.model,
            took.as_secs_f64() * 1e3
        ));
        times.push(took);
        targets.push((volume, target));
    }

    let snap = node
        .snapshots_of(&cli.model)
        .await?
        .into_iter()
        .next()
        .context("the agent lists no snapshot of the model")?;
    let (_, target) = &targets[1];
    println!();
    println!("  model      {}@{}", cli.model, cli.revision);
    println!("  commit     {}", snap.commit);
    println!(
        "  files      {} ({}), stored once in {}",
        snap.files,
        modelcache_core::size::Size(snap.bytes),
        node.store().display()
    );
    println!("  mounted at {}", target.display());
    println!(
        "  options    {}",
        mount_options(target).unwrap_or_default().join(",")
    );
    println!(
        "  cold       {:>9.1} ms (download, verify, mount)",
        times[0].as_secs_f64() * 1e3
    );
    println!(
        "  warm       {:>9.1} ms (mount only)",
        times[1].as_secs_f64() * 1e3
    );
    println!("  pinned by  {}", snap.pinned_by.join(", "));
    println!();
    print_listing(target)?;
    match std::fs::write(target.join("probe-write"), b"x") {
        Err(e) => println!("  writing into the mount fails as it should: {e}"),
        Ok(()) => anyhow::bail!("the mount at {} is writable", target.display()),
    }
    println!();

    if cli.keep {
        step(format!(
            "the volume stays mounted at {}; press Ctrl-C to unpublish and stop",
            target.display()
        ));
        tokio::signal::ctrl_c().await?;
    }
    for (volume, target) in &targets {
        node.unpublish(volume, target)
            .await
            .map_err(|s| anyhow::anyhow!("NodeUnpublishVolume: {}", s.message()))?;
    }
    let logs: Vec<String> = node
        .logs()
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    let clean = node.stop();
    step(format!(
        "unpublished both volumes and stopped the node{}",
        if clean {
            ""
        } else {
            " (a process needed SIGKILL)"
        }
    ));
    println!("    logs: {}", logs.join(" "));
    println!("\nNext:");
    println!("  inspect a live mount:      sudo hack/local-node.sh --keep");
    println!(
        "  serve your own files:      sudo hack/local-node.sh --model-dir /path/to/model --model org/name"
    );
    println!(
        "  from the Hugging Face Hub: sudo hack/local-node.sh --endpoint https://huggingface.co --model Qwen/Qwen3-0.6B"
    );
    println!("  run the pieces yourself:   modelcache-agent --help, modelcache-csi --help");
    println!(
        "  on a cluster:              helm install modelcache deploy/helm/modelcache -n modelcache --create-namespace"
    );
    println!("                             then examples/ (inline pod, PVC, vLLM, pre-warm)");
    Ok(())
}

fn print_listing(dir: &Path) -> anyhow::Result<()> {
    let mut entries: Vec<(String, u64)> = walkdir::WalkDir::new(dir)
        .min_depth(1)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            let rel = e
                .path()
                .strip_prefix(dir)
                .expect("below dir")
                .display()
                .to_string();
            (rel, e.metadata().map(|m| m.len()).unwrap_or(0))
        })
        .collect();
    entries.sort();
    for (path, len) in entries.iter().take(20) {
        println!("  {len:>12}  {path}");
    }
    if entries.len() > 20 {
        println!("  … and {} more files", entries.len() - 20);
    }
    Ok(())
}
