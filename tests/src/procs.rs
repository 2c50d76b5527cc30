//! Child processes that are stopped when dropped, and the binaries they run.

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The path of a workspace binary. Tests find them in the target directory, where
/// `cargo test --workspace` builds them (the agent and csi crates have integration tests, so
/// cargo builds their binaries); the `local-node` program finds them beside itself.
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the running executable")?;
    // target/<profile>/local-node, or target/<profile>/deps/<test>.
    for dir in exe.ancestors().skip(1).take(2) {
        let path = dir.join(name);
        if path.is_file() {
            return Ok(path);
        }
    }
    bail!(
        "{name} is not built next to {}: run `cargo build --workspace --bins` (hack/test.sh and hack/local-node.sh do)",
        exe.display()
    )
}

/// Fails unless running as root: mounts, network namespaces and cgroups need it (CI runs as
/// root).
pub fn require_root() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "mounts, network namespaces and cgroups need root: run this as root (CI does), e.g. with sudo"
        );
    }
    Ok(())
}

/// True when `name` carries, right after `prefix` and up to `end`, the id of a process that no
/// longer runs: something a test killed mid-way left behind.
pub fn left_by_a_dead_process(name: &str, prefix: &str, end: char) -> bool {
    name.strip_prefix(prefix)
        .and_then(|rest| rest.split(end).next())
        .and_then(|pid| pid.parse::<u32>().ok())
        .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped; its output goes to a log
/// file that is printed when a test panics.
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    program: PathBuf,
    args: Vec<String>,
}

impl Proc {
    /// Starts `program args…`, logging to `dir/name.log`.
    pub fn start(name: &str, program: &Path, args: &[&str], dir: &Path) -> anyhow::Result<Proc> {
        let log = dir.join(format!("{name}.log"));
        let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        let child = spawn(program, &args, &log)?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            log,
            program: program.to_path_buf(),
            args,
        })
    }

    /// [`Proc::start`] on `host` (in its network namespace), when given.
    pub fn start_on(
        host: Option<&crate::netns::Host>,
        name: &str,
        program: &Path,
        args: &[&str],
        dir: &Path,
    ) -> anyhow::Result<Proc> {
        let Some(host) = host else {
            return Proc::start(name, program, args, dir);
        };
        let (program, args) = host.wrap(program, args);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Proc::start(name, &program, &args, dir)
    }

    /// Stops the process (SIGTERM) and starts it again with the same arguments; the log goes on.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.start_again()
    }

    /// Kills the process with SIGKILL, as a crash or the OOM killer would, and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the process again with the same arguments; the log goes on.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        self.child = spawn(&self.program, &self.args, &self.log)?;
        Ok(())
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where the process logs.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The process's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Fails if the process has exited, with its log.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Ok(Some(status)) = self.child.try_wait() {
            bail!("{} exited ({status}):\n{}", self.name, self.log());
        }
        Ok(())
    }

    /// Sends SIGTERM and waits up to 15 s; returns whether it exited with success.
    pub fn stop(&mut self) -> bool {
        if let Ok(Some(status)) = self.child.try_wait() {
            return status.success();
        }
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let mut err = std::io::stderr();
            let _ = writeln!(err, "----- {} log -----\n{}", self.name, self.log());
        }
    }
}

/// Starts `program args…` with stdout and stderr appended to `log`.
/// Whether children start in process groups of their own (see [`shield_children_from_ctrl_c`]).
static OWN_GROUPS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Starts every later child in a process group of its own, so that the terminal's Ctrl-C
/// (SIGINT to the foreground group) reaches only this program, which then stops its children in
/// order itself. For programs that handle Ctrl-C; without it, the children die with the
/// program when it is interrupted.
pub fn shield_children_from_ctrl_c() {
    OWN_GROUPS.store(true, std::sync::atomic::Ordering::Relaxed);
}

fn spawn(program: &Path, args: &[String], log: &Path) -> anyhow::Result<Child> {
    use std::os::unix::process::CommandExt;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let mut cmd = Command::new(program);
    if OWN_GROUPS.load(std::sync::atomic::Ordering::Relaxed) {
        cmd.process_group(0);
    }
    cmd.args(args)
        .env(
            "RUST_LOG",
            "info,modelcache_agent=debug,modelcache_csi=debug",
        )
        .env_remove("HF_ENDPOINT")
        .env_remove("HF_TOKEN")
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))
}

/// Runs `modelcache-agent args…` to completion, without the hub settings of the environment;
/// its stdout, or an error with everything it printed.
pub fn agent_command(args: &[&str]) -> anyhow::Result<String> {
    agent_command_logged(args).map(|(stdout, _)| stdout)
}

/// [`agent_command`], also returning what it logged (stderr).
pub fn agent_command_logged(args: &[&str]) -> anyhow::Result<(String, String)> {
    let out = Command::new(bin("modelcache-agent")?)
        .args(args)
        .env_remove("HF_ENDPOINT")
        .env_remove("HF_TOKEN")
        .output()
        .context("running modelcache-agent")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        bail!(
            "modelcache-agent {} failed ({}):\n{stdout}{stderr}",
            args.join(" "),
            out.status,
        );
    }
    Ok((stdout, stderr))
}

/// Starts `modelcache-hub --root ROOT extra…` on a free port, logging into `dir`,
/// and waits until it listens; the process and its base URL.
pub fn serve_hub(root: &Path, extra: &[&str], dir: &Path) -> anyhow::Result<(Proc, String)> {
    let listen = format!("127.0.0.1:{}", free_port()?);
    serve_hub_at(None, &listen, root, extra, dir)
}

/// [`serve_hub`] on `host` (a network namespace of its own), at port 8080 of its address.
pub fn serve_hub_on(
    host: &crate::netns::Host,
    root: &Path,
    extra: &[&str],
    dir: &Path,
) -> anyhow::Result<(Proc, String)> {
    serve_hub_at(Some(host), &format!("{}:8080", host.ip), root, extra, dir)
}

/// [`serve_hub`] at `listen`, on `host` when given.
pub fn serve_hub_at(
    host: Option<&crate::netns::Host>,
    listen: &str,
    root: &Path,
    extra: &[&str],
    dir: &Path,
) -> anyhow::Result<(Proc, String)> {
    let root = root.to_str().context("a UTF-8 hub root")?;
    let mut args = vec!["--root", root, "--listen", listen];
    args.extend_from_slice(extra);
    let mut p = Proc::start_on(host, "hub", &bin("modelcache-hub")?, &args, dir)?;
    let listening = || Ok(std::net::TcpStream::connect(listen).is_ok());
    // The hub hashes every file first.
    wait_until("the hub to listen", Duration::from_secs(120), || {
        p.check_running()?;
        match host {
            None => listening(),
            Some(h) => h.run(listening),
        }
    })?;
    Ok((p, format!("http://{listen}")))
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Polls `cond` until it holds, failing after `timeout` (or as soon as `cond` fails).
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !cond()? {
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Ok(())
}

/// `GET http://addr/path` over a plain HTTP/1.0 connection: the status and the body.
pub fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::Read;
    let mut conn = std::net::TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    write!(conn, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .context("an HTTP answer has a head")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("an HTTP status")?;
    Ok((status, body.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_a_process_that_is_gone_left_are_stale() {
        let mut child = Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        let me = std::process::id();
        assert!(left_by_a_dead_process(
            &format!("mc{gone}n0-hub"),
            "mc",
            'n'
        ));
        assert!(!left_by_a_dead_process(&format!("mc{me}n0-hub"), "mc", 'n'));
        assert!(!left_by_a_dead_process(
            &format!("xy{gone}n0-hub"),
            "mc",
            'n'
        ));
        assert!(!left_by_a_dead_process("mcn0-hub", "mc", 'n'));
    }
}
