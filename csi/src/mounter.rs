//! The syscall boundary: bind mounts, and what is at a target path. [`LinuxMounter`] is the real
//! one; tests of the node service use a recording fake.
//!
//! Kubelet's target path comes from a request, so it is never trusted: no component of it is
//! followed if it is a symlink (`openat2` with `RESOLVE_NO_SYMLINKS`), and every mount, unmount
//! and removal acts on the directory that resolution opened, through `/proc/self/fd/N`, so a
//! symlink swapped in after the check changes nothing. Whether something is mounted on a target
//! is the mount id of the opened directory against its parent's (`/proc/self/fdinfo`), never a
//! path compared with the mount table, whose escapes (`\040` for a space…) would hide it.

use nix::fcntl::{AT_FDCWD, OFlag, OpenHow, ResolveFlag, openat2};
use nix::mount::{MntFlags, MsFlags};
use nix::sys::stat::{Mode, SFlag, fstat, mkdirat};
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Device and inode of a directory: what a bind mount shows.
pub type DirId = (u64, u64);

/// What is at a target path, looked at without following symlinks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetState {
    /// Nothing.
    Missing,
    /// A directory with nothing mounted on it.
    Dir,
    /// A mount point, showing the directory with this id.
    Mounted(DirId),
    /// A file, a symlink or a device: modelcache never puts one there.
    Other,
}

/// Mount operations the node plugin needs. Every path is resolved without following symlinks.
pub trait Mounter: Clone + Send + Sync + 'static {
    /// What is at `target`.
    fn inspect(&self, target: &Path) -> io::Result<TargetState>;
    /// Creates the directory `target` if missing, bind-mounts `source` there and makes the mount
    /// read-only, nosuid, nodev. On failure nothing stays mounted.
    fn bind_read_only(&self, source: &Path, target: &Path) -> io::Result<()>;
    /// Creates the directory `target` if missing and bind-mounts `source` there writable,
    /// nosuid, nodev: a cache volume.
    fn bind_writable(&self, source: &Path, target: &Path) -> io::Result<()>;
    /// Mounts the ext4 image `image` on the directory `mnt` (nosuid, nodev, discard) through
    /// the loop device already attached to it, or a new one; nothing when `mnt` is already a
    /// mount point. Its root is made writable by all, sticky, as `/tmp`.
    fn mount_image(&self, image: &Path, mnt: &Path) -> io::Result<()>;
    /// Unmounts `mnt` when no other mount shows its filesystem: the last volume of a cache has
    /// gone. True when it did.
    fn release_image(&self, mnt: &Path) -> io::Result<bool>;
    /// Unmounts the topmost mount at `target`.
    fn unmount(&self, target: &Path) -> io::Result<()>;
    /// Removes `target` if it is an empty directory (ENOTEMPTY otherwise).
    fn remove_dir(&self, target: &Path) -> io::Result<()>;
    /// The id of the directory `dir` (a store directory the agent named).
    fn dir_id(&self, dir: &Path) -> io::Result<DirId>;
}

/// Linux mounts through the mount(2) family, on directories opened with `openat2`.
#[derive(Debug, Default, Clone)]
pub struct LinuxMounter {
    /// Directories set by the administrator (kubelet's root, the store): symlinks in these
    /// prefixes are followed, nothing below them is.
    trusted: Vec<PathBuf>,
}

const NO_LINKS: ResolveFlag =
    ResolveFlag::RESOLVE_NO_SYMLINKS.union(ResolveFlag::RESOLVE_NO_MAGICLINKS);

fn how(flags: OFlag, resolve: ResolveFlag) -> OpenHow {
    OpenHow::new()
        .flags(flags | OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(resolve)
}

fn proc_fd(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// The mount id of the mount an open file is on.
fn mount_id(fd: &OwnedFd) -> io::Result<u64> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    info.lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no mnt_id in /proc/self/fdinfo"))
}

fn is_dir(fd: &OwnedFd) -> io::Result<Option<DirId>> {
    let st = fstat(fd)?;
    let dir = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR;
    Ok(dir.then_some((st.st_dev, st.st_ino)))
}

impl LinuxMounter {
    /// A mounter that follows symlinks only within the `trusted` prefixes themselves.
    pub fn new(trusted: Vec<PathBuf>) -> Self {
        LinuxMounter { trusted }
    }

    /// Opens the directory `dir` (O_PATH) without following a symlink below a trusted prefix,
    /// or anywhere when it is under none.
    fn open_dir(&self, dir: &Path) -> io::Result<OwnedFd> {
        let dir_flags = OFlag::O_DIRECTORY;
        for root in &self.trusted {
            if let Ok(rel) = dir.strip_prefix(root) {
                let root_fd = openat2(AT_FDCWD, root, how(dir_flags, ResolveFlag::empty()))?;
                let rel = if rel.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    rel
                };
                let beneath = NO_LINKS | ResolveFlag::RESOLVE_BENEATH;
                return Ok(openat2(root_fd.as_fd(), rel, how(dir_flags, beneath))?);
            }
        }
        Ok(openat2(AT_FDCWD, dir, how(dir_flags, NO_LINKS))?)
    }

    /// Bind-mounts `source` at `target` (made if missing), then remounts the new mount
    /// nosuid, nodev and `extra` (read-only, or nothing). On failure nothing stays mounted.
    fn bind(&self, source: &Path, target: &Path, extra: MsFlags) -> io::Result<()> {
        let source = self.open_dir(source)?;
        let (parent, name) = self.parent_of(target)?;
        match mkdirat(parent.as_fd(), name, Mode::from_bits_truncate(0o750)) {
            Ok(()) | Err(nix::errno::Errno::EEXIST) => {}
            Err(e) => return Err(e.into()),
        }
        let (_, dir) = self.open_target(target)?;
        nix::mount::mount(
            Some(&proc_fd(&source)),
            &proc_fd(&dir),
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )?;
        // A bind mount ignores MS_RDONLY on creation; it takes effect on a remount, of the new
        // mount, which opening the target again now reaches.
        let (_, mounted) = self.open_target(target)?;
        let ro =
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | extra;
        let remount = nix::mount::mount(
            None::<&str>,
            &proc_fd(&mounted),
            None::<&str>,
            ro,
            None::<&str>,
        );
        if let Err(e) = remount {
            let _ = nix::mount::umount2(&proc_fd(&mounted), MntFlags::MNT_DETACH);
            return Err(e.into());
        }
        Ok(())
    }

    /// The parent directory of `target`, opened, and its last component.
    fn parent_of<'a>(&self, target: &'a Path) -> io::Result<(OwnedFd, &'a OsStr)> {
        let (Some(parent), Some(name)) = (target.parent(), target.file_name()) else {
            return Err(io::Error::from_raw_os_error(libc_errno::EINVAL));
        };
        Ok((self.open_dir(parent)?, name))
    }

    /// `name` in `parent`, opened without following it (a symlink opens as itself).
    fn open_entry(parent: BorrowedFd<'_>, name: &OsStr) -> io::Result<OwnedFd> {
        let beneath = NO_LINKS | ResolveFlag::RESOLVE_BENEATH;
        Ok(openat2(parent, name, how(OFlag::O_NOFOLLOW, beneath))?)
    }

    /// The target directory opened, with its parent; ENOTDIR (ELOOP for a symlink) when it is
    /// something else.
    fn open_target(&self, target: &Path) -> io::Result<(OwnedFd, OwnedFd)> {
        let (parent, name) = self.parent_of(target)?;
        let fd = Self::open_entry(parent.as_fd(), name)?;
        if is_dir(&fd)?.is_none() {
            let st = fstat(&fd)?;
            let link = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK;
            let errno = if link {
                libc_errno::ELOOP
            } else {
                libc_errno::ENOTDIR
            };
            return Err(io::Error::from_raw_os_error(errno));
        }
        Ok((parent, fd))
    }
}

/// The errno values used here (nix re-exports them as `Errno`, as i32 they stay comparable with
/// `io::Error::raw_os_error`).
pub mod libc_errno {
    use nix::errno::Errno;
    /// Invalid argument.
    pub const EINVAL: i32 = Errno::EINVAL as i32;
    /// Too many symbolic links: a symlink was met where none may be.
    pub const ELOOP: i32 = Errno::ELOOP as i32;
    /// Not a directory.
    pub const ENOTDIR: i32 = Errno::ENOTDIR as i32;
    /// Directory not empty.
    pub const ENOTEMPTY: i32 = Errno::ENOTEMPTY as i32;
    /// No such file or directory.
    pub const ENOENT: i32 = Errno::ENOENT as i32;
}

impl Mounter for LinuxMounter {
    fn inspect(&self, target: &Path) -> io::Result<TargetState> {
        let (parent, name) = match self.parent_of(target) {
            Ok(p) => p,
            Err(e) if e.raw_os_error() == Some(libc_errno::ENOENT) => {
                return Ok(TargetState::Missing);
            }
            Err(e) => return Err(e),
        };
        let fd = match Self::open_entry(parent.as_fd(), name) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc_errno::ENOENT) => {
                return Ok(TargetState::Missing);
            }
            Err(e) => return Err(e),
        };
        let Some(id) = is_dir(&fd)? else {
            return Ok(TargetState::Other);
        };
        Ok(if mount_id(&fd)? != mount_id(&parent)? {
            TargetState::Mounted(id)
        } else {
            TargetState::Dir
        })
    }

    fn bind_read_only(&self, source: &Path, target: &Path) -> io::Result<()> {
        self.bind(source, target, MsFlags::MS_RDONLY)
    }

    fn bind_writable(&self, source: &Path, target: &Path) -> io::Result<()> {
        self.bind(source, target, MsFlags::empty())
    }

    fn mount_image(&self, image: &Path, mnt: &Path) -> io::Result<()> {
        let (parent, dir) = self.open_target(mnt)?;
        if mount_id(&dir)? != mount_id(&parent)? {
            return Ok(());
        }
        let (device, _attached) = match modelcache_loopdev::find(image)? {
            Some(dev) => (dev, None),
            None => {
                let (dev, file) = modelcache_loopdev::attach(image)?;
                (dev, Some(file))
            }
        };
        nix::mount::mount(
            Some(&device),
            &proc_fd(&dir),
            Some("ext4"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("discard"),
        )?;
        let (_, root) = self.open_target(mnt)?;
        std::fs::set_permissions(proc_fd(&root), std::fs::Permissions::from_mode(0o1777))?;
        Ok(())
    }

    fn release_image(&self, mnt: &Path) -> io::Result<bool> {
        let (parent, dir) = self.open_target(mnt)?;
        if mount_id(&dir)? == mount_id(&parent)? {
            return Ok(false);
        }
        let dev = fstat(&dir)?.st_dev;
        let majmin = format!(
            "{}:{}",
            nix::sys::stat::major(dev),
            nix::sys::stat::minor(dev)
        );
        let table = std::fs::read_to_string("/proc/self/mountinfo")?;
        let showing = table
            .lines()
            .filter(|l| l.split(' ').nth(2) == Some(majmin.as_str()))
            .count();
        if showing > 1 {
            return Ok(false);
        }
        nix::mount::umount2(&proc_fd(&dir), MntFlags::MNT_DETACH)?;
        Ok(true)
    }
    fn unmount(&self, target: &Path) -> io::Result<()> {
        let (parent, dir) = self.open_target(target)?;
        if mount_id(&dir)? == mount_id(&parent)? {
            return Err(io::Error::from_raw_os_error(libc_errno::EINVAL));
        }
        // Detached: the descriptor this holds keeps the mount busy for a plain umount. The
        // mount goes once the descriptor closes, right after.
        Ok(nix::mount::umount2(&proc_fd(&dir), MntFlags::MNT_DETACH)?)
    }

    fn remove_dir(&self, target: &Path) -> io::Result<()> {
        let (parent, name) = self.parent_of(target)?;
        Ok(nix::unistd::unlinkat(
            parent.as_fd(),
            name,
            nix::unistd::UnlinkatFlags::RemoveDir,
        )?)
    }

    fn dir_id(&self, dir: &Path) -> io::Result<DirId> {
        let fd = self.open_dir(dir)?;
        is_dir(&fd)?.ok_or_else(|| io::Error::from_raw_os_error(libc_errno::ENOTDIR))
    }
}

/// A mounter that records calls and keeps a mount table in memory, over a real directory tree.
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
impl FakeMounter {
    /// The source mounted at `target`.
    pub fn source_of(&self, target: &Path) -> Option<PathBuf> {
        self.mounts.lock().unwrap().get(target).cloned()
    }

    /// Records a bind mount (`op`: read-only or writable), or fails as `fail_bind` says.
    fn bind(&self, op: &str, source: &Path, target: &Path) -> io::Result<()> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("{op} {} {}", source.display(), target.display()));
        if let Some(errno) = *self.fail_bind.lock().unwrap() {
            return Err(io::Error::from_raw_os_error(errno));
        }
        std::fs::create_dir_all(target)?;
        self.mounts
            .lock()
            .unwrap()
            .insert(target.to_path_buf(), source.to_path_buf());
        Ok(())
    }

    /// A made-up id for a path: equal paths, equal ids.
    pub fn id_of(path: &Path) -> DirId {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        path.hash(&mut h);
        (0, h.finish())
    }
}

#[cfg(test)]
impl Mounter for std::sync::Arc<FakeMounter> {
    fn inspect(&self, target: &Path) -> io::Result<TargetState> {
        if let Some(source) = self.source_of(target) {
            return Ok(TargetState::Mounted(FakeMounter::id_of(&source)));
        }
        Ok(match std::fs::symlink_metadata(target) {
            Ok(m) if m.is_dir() => TargetState::Dir,
            Ok(_) => TargetState::Other,
            Err(_) => TargetState::Missing,
        })
    }

    fn bind_read_only(&self, source: &Path, target: &Path) -> io::Result<()> {
        self.bind("bind_ro", source, target)
    }

    fn bind_writable(&self, source: &Path, target: &Path) -> io::Result<()> {
        self.bind("bind_rw", source, target)
    }

    fn mount_image(&self, image: &Path, mnt: &Path) -> io::Result<()> {
        self.calls.lock().unwrap().push(format!(
            "mount_image {} {}",
            image.display(),
            mnt.display()
        ));
        Ok(())
    }

    fn release_image(&self, mnt: &Path) -> io::Result<bool> {
        let others = self.mounts.lock().unwrap().values().any(|s| s == mnt);
        self.calls
            .lock()
            .unwrap()
            .push(format!("release_image {} {}", mnt.display(), !others));
        Ok(!others)
    }

    fn unmount(&self, target: &Path) -> io::Result<()> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("unmount {}", target.display()));
        match self.mounts.lock().unwrap().remove(target) {
            Some(_) => Ok(()),
            None => Err(io::Error::from_raw_os_error(libc_errno::EINVAL)),
        }
    }

    fn remove_dir(&self, target: &Path) -> io::Result<()> {
        std::fs::remove_dir(target)
    }

    fn dir_id(&self, dir: &Path) -> io::Result<DirId> {
        Ok(FakeMounter::id_of(dir))
    }
}
