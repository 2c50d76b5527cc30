//! The syscall boundary to the mount table: which directories are mount points showing the
//! store's filesystem, and what each shows (device and inode of its root), so pins can be
//! checked against what kubelet really has mounted.

use std::path::{Path, PathBuf};

/// A mount point that shows a directory of the store's filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountedDir {
    /// Where it is mounted (a volume's target path).
    pub path: PathBuf,
    /// Device and inode of the directory it shows.
    pub dev: u64,
    /// See `dev`.
    pub ino: u64,
}

/// Reads the mount table.
pub trait MountTable: Send + Sync + std::fmt::Debug {
    /// Mount points whose filesystem is the one holding `store_root` (bind mounts of store
    /// directories among them); others are never stat'ed, so a dead network mount cannot hang
    /// the agent.
    fn mounts_of(&self, store_root: &Path) -> std::io::Result<Vec<MountedDir>>;
}

/// `/proc/self/mountinfo`: the agent's mount namespace, which must see kubelet's pod
/// directories (the Helm chart mounts them with HostToContainer propagation).
#[derive(Debug, Default)]
pub struct ProcMountTable;

impl MountTable for ProcMountTable {
    fn mounts_of(&self, store_root: &Path) -> std::io::Result<Vec<MountedDir>> {
        use nix::sys::stat::{major, minor, stat};
        let dev = stat(store_root)?.st_dev;
        let majmin = format!("{}:{}", major(dev), minor(dev));
        let table = procfs::process::Process::myself()
            .and_then(|p| p.mountinfo())
            .map_err(std::io::Error::other)?;
        let mut out = Vec::new();
        for m in table {
            if m.majmin != majmin {
                continue;
            }
            // A mount point that went away between reading the table and here is no mount.
            if let Ok(st) = stat(&m.mount_point) {
                out.push(MountedDir {
                    path: m.mount_point,
                    dev: st.st_dev,
                    ino: st.st_ino,
                });
            }
        }
        Ok(out)
    }
}
