//! The syscall boundary: bind mounts and the mount table. [`LinuxMounter`] is the real one
//! (nix + /proc/self/mountinfo); tests of the node service use a recording fake.

use nix::mount::{MntFlags, MsFlags};
use std::io;
use std::path::Path;
#[cfg(test)]
use std::path::PathBuf;

/// Mount operations the node plugin needs.
pub trait Mounter: Send + Sync + 'static {
    /// Bind-mounts `source` at `target`, then remounts it read-only, nosuid, nodev. On failure
    /// nothing stays mounted.
    fn bind_read_only(&self, source: &Path, target: &Path) -> io::Result<()>;
    /// Unmounts `target`.
    fn unmount(&self, target: &Path) -> io::Result<()>;
    /// True when something is mounted exactly at `target`.
    fn is_mount_point(&self, target: &Path) -> io::Result<bool>;
    /// True when `target` shows the directory `source` (a bind mount keeps the inode).
    fn shows(&self, source: &Path, target: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(source), std::fs::metadata(target)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }
}

/// Linux mounts through the mount(2) family.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxMounter;

impl Mounter for LinuxMounter {
    fn bind_read_only(&self, source: &Path, target: &Path) -> io::Result<()> {
        nix::mount::mount(
            Some(source),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )?;
        // A bind mount ignores MS_RDONLY on creation; it takes effect on a remount.
        let ro = MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV;
        if let Err(e) = nix::mount::mount(None::<&str>, target, None::<&str>, ro, None::<&str>) {
            let _ = nix::mount::umount2(target, MntFlags::empty());
            return Err(e.into());
        }
        Ok(())
    }

    fn unmount(&self, target: &Path) -> io::Result<()> {
        Ok(nix::mount::umount2(target, MntFlags::empty())?)
    }

    fn is_mount_point(&self, target: &Path) -> io::Result<bool> {
        let target = match std::fs::canonicalize(target) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        let mounts = procfs::process::Process::myself()
            .and_then(|p| p.mountinfo())
            .map_err(io::Error::other)?;
        Ok(mounts.into_iter().any(|m| m.mount_point == target))
    }
}

/// A mounter that records calls and keeps a mount table in memory.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct FakeMounter {
    /// Calls, in order, as `op target`.
    pub calls: std::sync::Mutex<Vec<String>>,
    /// Current mounts: target → source.
    pub mounts: std::sync::Mutex<std::collections::BTreeMap<PathBuf, PathBuf>>,
    /// When set, bind_read_only fails with this errno.
    pub fail_bind: std::sync::Mutex<Option<i32>>,
}

#[cfg(test)]
impl Mounter for std::sync::Arc<FakeMounter> {
    fn bind_read_only(&self, source: &Path, target: &Path) -> io::Result<()> {
        self.calls.lock().unwrap().push(format!(
            "bind_ro {} {}",
            source.display(),
            target.display()
        ));
        if let Some(errno) = *self.fail_bind.lock().unwrap() {
            return Err(io::Error::from_raw_os_error(errno));
        }
        self.mounts
            .lock()
            .unwrap()
            .insert(target.to_path_buf(), source.to_path_buf());
        Ok(())
    }

    fn unmount(&self, target: &Path) -> io::Result<()> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("unmount {}", target.display()));
        match self.mounts.lock().unwrap().remove(target) {
            Some(_) => Ok(()),
            None => Err(io::Error::from_raw_os_error(22)),
        }
    }

    fn is_mount_point(&self, target: &Path) -> io::Result<bool> {
        Ok(self.mounts.lock().unwrap().contains_key(target))
    }

    fn shows(&self, source: &Path, target: &Path) -> bool {
        self.source_of(target).as_deref() == Some(source)
    }
}

#[cfg(test)]
impl FakeMounter {
    /// The source mounted at `target`.
    pub fn source_of(&self, target: &Path) -> Option<PathBuf> {
        self.mounts.lock().unwrap().get(target).cloned()
    }
}
