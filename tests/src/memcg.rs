//! Memory cgroups, so that a process on one machine runs under the memory limit it has on a node.
//! In a cluster the agent's container has a memory limit (the chart's
//! `resources.agent.limits.memory`), and the page cache it writes while downloading is charged to
//! that container and reclaimed within the limit. Eight agents on one machine without limits
//! would instead fill the whole machine's memory with eight copies of a model. cgroup v2 where
//! its memory controller is on, else v1. Dropping a [`MemoryCgroup`] removes it once its
//! processes are gone. Needs root.

use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A memory cgroup this process made.
pub struct MemoryCgroup {
    dir: PathBuf,
    /// Where the kernel says the most it has charged the cgroup at once.
    peak_file: PathBuf,
}

/// Which cgroup hierarchy holds the memory controller, and its files.
struct Hierarchy {
    root: PathBuf,
    limit_file: &'static str,
    peak_file: &'static str,
}

fn hierarchy() -> anyhow::Result<Hierarchy> {
    let v2 = Path::new("/sys/fs/cgroup");
    let controllers = std::fs::read_to_string(v2.join("cgroup.controllers")).unwrap_or_default();
    if controllers.split_whitespace().any(|c| c == "memory") {
        let subtree = v2.join("cgroup.subtree_control");
        let on = std::fs::read_to_string(&subtree).unwrap_or_default();
        if !on.split_whitespace().any(|c| c == "memory") {
            std::fs::write(&subtree, "+memory")
                .with_context(|| format!("turning the memory controller on in {subtree:?}"))?;
        }
        return Ok(Hierarchy {
            root: v2.to_owned(),
            limit_file: "memory.max",
            peak_file: "memory.peak",
        });
    }
    let v1 = Path::new("/sys/fs/cgroup/memory");
    if v1.join("memory.limit_in_bytes").exists() {
        return Ok(Hierarchy {
            root: v1.to_owned(),
            limit_file: "memory.limit_in_bytes",
            peak_file: "memory.max_usage_in_bytes",
        });
    }
    bail!("this machine has no memory cgroup controller (neither cgroup v2's nor v1's)")
}

/// Removes the cgroups that a process that no longer runs left behind (a run killed mid-way).
fn remove_stale(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if crate::procs::left_by_a_dead_process(&name, "modelcache-test-", '-') {
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

impl MemoryCgroup {
    /// Makes a cgroup whose memory (process memory and the page cache it writes) is capped at
    /// `limit` bytes.
    pub fn new(label: &str, limit: u64) -> anyhow::Result<MemoryCgroup> {
        crate::procs::require_root()?;
        let h = hierarchy()?;
        remove_stale(&h.root);
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let dir = h.root.join(format!(
            "modelcache-test-{}-{}-{label}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir).with_context(|| format!("creating the cgroup {dir:?}"))?;
        let cg = MemoryCgroup {
            peak_file: dir.join(h.peak_file),
            dir,
        };
        std::fs::write(cg.dir.join(h.limit_file), limit.to_string())
            .with_context(|| format!("setting the memory limit of {:?}", cg.dir))?;
        Ok(cg)
    }

    /// Moves the process `pid` (all its threads) into the cgroup; what it allocates from now on
    /// is charged here.
    pub fn add(&self, pid: u32) -> anyhow::Result<()> {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("moving process {pid} into {:?}", self.dir))
    }

    /// The most memory the cgroup has been charged at once, in bytes.
    pub fn peak(&self) -> anyhow::Result<u64> {
        let file = &self.peak_file;
        let text = std::fs::read_to_string(file).with_context(|| format!("reading {file:?}"))?;
        text.trim()
            .parse()
            .with_context(|| format!("{file:?} holds {text:?}"))
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // A cgroup goes only once its last process has exited, which can lag its kill.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// The premise of running agents in these: a process writing more than its limit is not
    /// killed, and the page cache it writes stays within the limit.
    #[test]
    fn the_page_cache_a_process_writes_stays_within_its_limit() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let file = dir.path().join("written");
        let limit = 64 << 20;
        let cg = MemoryCgroup::new("unit", limit).unwrap();
        // The shell joins the cgroup, then becomes dd, which writes 256 MiB through the page cache.
        let status = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {procs} && exec dd if=/dev/zero of={out} bs=1M count=256 status=none",
                procs = cg.dir.join("cgroup.procs").display(),
                out = file.display()
            ))
            .status()
            .unwrap();
        assert!(status.success(), "dd in the cgroup: {status}");
        assert_eq!(std::fs::metadata(&file).unwrap().len(), 256 << 20);
        let peak = cg.peak().unwrap();
        assert!(
            peak > 0 && peak <= limit,
            "charged {peak} bytes at most, limit {limit}"
        );
        let path = cg.dir.clone();
        drop(cg);
        assert!(
            !path.exists(),
            "the cgroup is removed with its last process gone"
        );
    }
}
