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
    /// Every mount point: a cache volume's pin holds while its target is one.
    fn mount_points(&self) -> std::io::Result<std::collections::HashSet<PathBuf>>;
}

/// A mount point as the kernel writes it in `/proc/self/mountinfo`, with its escapes decoded:
/// space, tab, newline and backslash appear as `\040`, `\011`, `\012` and `\134`.
pub fn unescape(path: &Path) -> PathBuf {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    let raw = path.as_os_str().as_bytes();
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let octal = raw.get(i + 1..i + 4).filter(|d| {
            raw[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)) && d[0] <= b'3'
        });
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(raw[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsString::from_vec(out))
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
            let path = unescape(&m.mount_point);
            if let Ok(st) = stat(&path) {
                out.push(MountedDir {
                    path,
                    dev: st.st_dev,
                    ino: st.st_ino,
                });
            }
        }
        Ok(out)
    }

    fn mount_points(&self) -> std::io::Result<std::collections::HashSet<PathBuf>> {
        let table = procfs::process::Process::myself()
            .and_then(|p| p.mountinfo())
            .map_err(std::io::Error::other)?;
        Ok(table
            .into_iter()
            .map(|m| unescape(&m.mount_point))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        let cases = [
            ("/k/pods/a\\040b/mount", "/k/pods/a b/mount"),
            ("/t\\011ab\\012nl\\134bs", "/t\tab\nnl\\bs"),
            ("/plain/path", "/plain/path"),
            ("/not\\09octal\\", "/not\\09octal\\"),
        ];
        for (raw, want) in cases {
            assert_eq!(unescape(Path::new(raw)), PathBuf::from(want), "{raw}");
        }
    }
}
