//! `local-node`: modelcache on this machine, no cluster. Starts a hub (by default the embedded
//! `modelcache-hub` with a generated demo model), the node agent and the CSI plugin as real processes,
//! publishes the model into a kubelet-style directory twice — cold, then warm — exactly as kubelet
//! calls NodePublishVolume, and prints what was mounted and how long each took. Needs root.
//!
//! It checks its flags before doing anything, uses only a work directory it made (and one run
//! at a time in it), stops its processes and detaches its mounts on Ctrl-C, and keeps going when
//! its output is closed (`| head`).

use anyhow::Context;
use clap::Parser;
use modelcache_core::repo::{RepoId, Revision};
use modelcache_tests::models::generate_model;
use modelcache_tests::node::{Hub, LocalNode};
use modelcache_tests::procs::shield_children_from_ctrl_c;
use modelcache_tests::tree::{mount_options, unmount_all_below};
use nix::fcntl::{Flock, FlockArg};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Run a modelcache node locally: hub → agent → store → CSI publish → read-only mount.
#[derive(Parser)]
#[command(name = "local-node", version)]
struct Cli {
    /// Working directory for the store, sockets, logs and mounts: a new or empty directory, or
    /// one an earlier run made (emptied first).
    #[arg(
        long,
        env = "MODELCACHE_LOCAL_WORKDIR",
        default_value = "/tmp/modelcache-local"
    )]
    workdir: PathBuf,
    /// Repo to publish. Defaults to a generated demo model on the embedded hub.
    #[arg(long, default_value = "modelcache/demo-tiny", value_parser = parse_repo)]
    model: String,
    /// Revision to publish.
    #[arg(long, default_value = "main", value_parser = parse_revision)]
    revision: String,
    /// Use this hub instead of the embedded one, e.g. https://huggingface.co (needs network).
    #[arg(long, env = "HF_ENDPOINT", value_parser = parse_endpoint)]
    endpoint: Option<String>,
    /// Serve this directory of model files as --model on the embedded hub.
    #[arg(long, conflicts_with = "endpoint")]
    model_dir: Option<PathBuf>,
    /// Size of the generated demo model's weights, in MiB.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=65536))]
    demo_mib: u64,
    /// Keep the node running with the volume mounted until Ctrl-C.
    #[arg(long)]
    keep: bool,
}

fn parse_repo(s: &str) -> Result<String, String> {
    RepoId::parse(s)
        .map(|r| r.to_string())
        .map_err(|e| e.to_string())
}

fn parse_revision(s: &str) -> Result<String, String> {
    Revision::parse(s)
        .map(|r| r.to_string())
        .map_err(|e| e.to_string())
}

fn parse_endpoint(s: &str) -> Result<String, String> {
    modelcache_hub::client::check_endpoint(s)
        .map(|()| s.to_owned())
        .map_err(|e| e.to_string())
}

/// Prints a line; a closed stdout (`| head`) does not stop the run, which must still clean up.
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    modelcache_core::process::run_main(interruptible(cli))
}

/// Runs the demo until it ends or Ctrl-C. Ctrl-C while `--keep` holds the volume unpublishes
/// it and ends the run as usual; at any other time the run is dropped, and with it the node,
/// whose processes are stopped and mounts detached.
async fn interruptible(cli: Cli) -> anyhow::Result<()> {
    shield_children_from_ctrl_c();
    let interrupted = CancellationToken::new();
    let keeping = Arc::new(AtomicBool::new(false));
    let on_ctrl_c = interrupted.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            on_ctrl_c.cancel();
        }
    });
    let abort = async {
        interrupted.cancelled().await;
        if keeping.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        done = run(cli, interrupted.clone(), keeping.clone()) => done,
        () = abort => {
            step("interrupted: stopped the node's processes and detached its mounts");
            anyhow::bail!("interrupted before the demo finished")
        }
    }
}

fn step(msg: impl std::fmt::Display) {
    say!("==> {msg}");
}

/// The file that marks a work directory as local-node's, and that a run holds locked.
const MARK: &str = ".modelcache-local-node";

/// Makes `work` this run's: new, or empty, or made by an earlier run (then emptied), owned by
/// this user, and not in use by another run (whose lock the result holds until dropped).
fn claim_workdir(work: &Path) -> anyhow::Result<Flock<std::fs::File>> {
    std::fs::create_dir_all(work).with_context(|| format!("creating {}", work.display()))?;
    let meta = std::fs::symlink_metadata(work)?;
    let me = nix::unistd::geteuid().as_raw();
    anyhow::ensure!(
        meta.is_dir() && meta.uid() == me,
        "--workdir {} is not a directory of yours (owner uid {}); give one you made, or a new path",
        work.display(),
        meta.uid()
    );
    let mark = work.join(MARK);
    let others: Vec<String> = std::fs::read_dir(work)?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != MARK)
        .collect();
    if !mark.exists() && !others.is_empty() {
        anyhow::bail!(
            "--workdir {} holds files local-node did not make ({}); give an empty or new directory (a local-node from before 2026-12 left no mark: if one made it, remove it with `sudo rm -rf {}`)",
            work.display(),
            others
                .iter()
                .take(3)
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
            work.display(),
        );
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&mark)?;
    let mut lock = Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        anyhow::anyhow!(
            "another local-node is running in {} ({e}): stop it (Ctrl-C), or give another --workdir",
            work.display()
        )
    })?;
    unmount_all_below(work);
    for name in others {
        let p = work.join(name);
        if std::fs::symlink_metadata(&p)?.is_dir() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        }
        .with_context(|| format!("emptying {}", work.display()))?;
    }
    lock.set_len(0)?;
    writeln!(lock, "local-node, pid {}", std::process::id())?;
    Ok(lock)
}

async fn run(
    cli: Cli,
    interrupted: CancellationToken,
    keeping: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    modelcache_tests::procs::require_root()?;
    let work = &cli.workdir;
    let _claim = claim_workdir(work)?;
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
                    generate_model(&repo_dir, (cli.demo_mib << 20) as usize)?;
                    step(format!(
                        "generated demo model {} ({} MiB of weights) for the embedded hub",
                        cli.model, cli.demo_mib
                    ));
                }
            }
            Hub::Serve(work.join("hub"), vec![])
        }
    };
    // The plugin answers within 3 s with the download's progress, which is printed as it goes.
    let mut node = LocalNode::start(&work.join("node"), hub, 3)?;
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
                say!("    {}", s.message());
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
    say!();
    say!("  model      {}@{}", cli.model, cli.revision);
    say!("  commit     {}", snap.commit);
    say!(
        "  files      {} ({}), stored once in {}",
        snap.files,
        modelcache_core::size::Size(snap.bytes),
        node.store().display()
    );
    say!("  mounted at {}", target.display());
    say!(
        "  options    {}",
        mount_options(target).unwrap_or_default().join(",")
    );
    say!(
        "  cold       {:>9.1} ms (download, verify, mount)",
        times[0].as_secs_f64() * 1e3
    );
    say!(
        "  warm       {:>9.1} ms (mount only)",
        times[1].as_secs_f64() * 1e3
    );
    say!("  pinned by  {}", snap.pinned_by.join(", "));
    say!();
    print_listing(target)?;
    match std::fs::write(target.join("probe-write"), b"x") {
        Err(e) => say!("  writing into the mount fails as it should: {e}"),
        Ok(()) => anyhow::bail!("the mount at {} is writable", target.display()),
    }
    say!();

    if cli.keep {
        step(format!(
            "the volume stays mounted at {}; press Ctrl-C to unpublish and stop",
            target.display()
        ));
        keeping.store(true, Ordering::SeqCst);
        interrupted.cancelled().await;
        step("Ctrl-C: unpublishing");
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
    say!("    logs: {}", logs.join(" "));
    say!("\nNext:");
    say!("  inspect a live mount:      sudo hack/local-node.sh --keep");
    say!(
        "  serve your own files:      sudo hack/local-node.sh --model-dir /path/to/model --model org/name"
    );
    say!(
        "  from the Hugging Face Hub: sudo hack/local-node.sh --endpoint https://huggingface.co --model Qwen/Qwen3-0.6B"
    );
    say!(
        "  run the pieces yourself:   target/release/modelcache-agent --help, target/release/modelcache-csi --help"
    );
    say!(
        "  on a cluster:              build and push the image, then helm install (README: Install on a cluster)"
    );
    say!("                             then examples/ (inline pod, PVC, vLLM, pre-warm)");
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
        say!("  {len:>12}  {path}");
    }
    if entries.len() > 20 {
        say!("  … and {} more files", entries.len() - 20);
    }
    Ok(())
}
