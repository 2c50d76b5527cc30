//! A Hugging Face cache that another program wrote, read without trusting it: the "shared RWX PVC
//! filled by a download Job" many clusters run today, mounted into the agent as a source tier.
//!
//! `huggingface-cli download` and `snapshot_download` write, under `HF_HOME/hub`:
//!
//! ```text
//! models--org--name/
//!   refs/<revision>                 the commit the revision resolved to
//!   snapshots/<commit>/<path>       -> ../../blobs/<etag>, a relative symlink
//!   blobs/<etag>                    the file; etag = sha256 for LFS/Xet files, git blob sha1 else
//! ```
//!
//! so a blob's name is the same content hash the store keys blobs by. Anyone who can write to the
//! PVC can put anything there, so:
//!
//! - every open goes through `openat2` from the repo folder with `RESOLVE_BENEATH`: a symlink
//!   that leads outside the folder (absolute, or `..` past it), even one swapped in during the
//!   open, is refused by the kernel; blobs and refs are opened with `RESOLVE_NO_SYMLINKS`;
//! - only regular files are read (a FIFO or device is refused, never blocked on);
//! - a blob's name is only a claim: the importer (`fetch::import`) hashes the bytes it copies;
//! - a ref must hold a 40-hex commit, and snapshot paths pass [`RepoPath`]'s checks.

use modelcache_core::hash::{Algo, ContentHash};
use modelcache_core::repo::{Commit, RepoId, RepoKind, RepoPath, Revision, cache_folder};
use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{FileStat, SFlag, fstat};
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// Reading the shared cache failed, or it holds something modelcache will not read.
#[derive(Debug, thiserror::Error)]
pub enum SharedCacheError {
    /// An I/O error.
    #[error("shared cache: cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A symlink (or `..`) that leads outside the repo's folder.
    #[error(
        "shared cache: {} leads outside {folder} (a symlink that escapes it): refused; fix or remove it on the shared volume",
        path.display()
    )]
    Escapes {
        /// The path.
        path: PathBuf,
        /// The repo folder it must stay in.
        folder: String,
    },
    /// Something other than what huggingface_hub writes.
    #[error("shared cache: {}: {reason}", path.display())]
    Unexpected {
        /// The path.
        path: PathBuf,
        /// What is wrong, and what to do.
        reason: String,
    },
}

type Result<T> = std::result::Result<T, SharedCacheError>;

/// A file of a snapshot in the shared cache, as its symlink names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedFile {
    /// Path in the repo.
    pub path: RepoPath,
    /// The hash its blob's name claims.
    pub hash: ContentHash,
    /// The blob's size now.
    pub size: u64,
}

/// An `HF_HUB_CACHE` on a shared volume.
#[derive(Debug)]
pub struct SharedCache {
    root: PathBuf,
    dir: OwnedFd,
}

/// The flags every open here uses: the kernel refuses escapes from the directory resolved from.
fn beneath() -> ResolveFlag {
    ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS
}

impl SharedCache {
    /// Opens the cache at `dir`: an `HF_HUB_CACHE`, or an `HF_HOME` holding one in `hub/`.
    pub fn open(dir: &Path) -> Result<Self> {
        let hub = dir.join("hub");
        let root = if hub.is_dir() && !holds_repo_folders(dir) {
            hub
        } else {
            dir.to_path_buf()
        };
        let fd = nix::fcntl::open(
            &root,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| SharedCacheError::Io {
            action: "open",
            path: root.clone(),
            source: e.into(),
        })?;
        Ok(SharedCache { root, dir: fd })
    }

    /// The `HF_HUB_CACHE` directory read.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The repo's folder, if the cache has one; it must be a real directory, not a symlink.
    fn folder(&self, kind: RepoKind, repo: &RepoId) -> Result<Option<RepoFolder<'_>>> {
        let name = cache_folder(kind, repo);
        let how = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(beneath() | ResolveFlag::RESOLVE_NO_SYMLINKS);
        match openat2(self.dir.as_fd(), name.as_str(), how) {
            Ok(fd) => Ok(Some(RepoFolder {
                cache: self,
                name,
                fd,
            })),
            Err(Errno::ENOENT) => Ok(None),
            Err(e) => Err(self.error("open", &name, e, &name)),
        }
    }

    fn error(&self, action: &'static str, rel: &str, e: Errno, folder: &str) -> SharedCacheError {
        let path = self.root.join(rel);
        match e {
            Errno::EXDEV => SharedCacheError::Escapes {
                path,
                folder: folder.to_owned(),
            },
            Errno::ELOOP => SharedCacheError::Unexpected {
                path,
                reason:
                    "is a symlink where huggingface_hub writes a plain file or directory: refused"
                        .into(),
            },
            _ => SharedCacheError::Io {
                action,
                path,
                source: e.into(),
            },
        }
    }

    /// The commit `revision` resolved to when the cache was filled (`refs/<revision>`), if the
    /// cache has the repo and that ref. A commit is returned as is when the cache holds its
    /// snapshot.
    pub fn read_ref(
        &self,
        kind: RepoKind,
        repo: &RepoId,
        revision: &Revision,
    ) -> Result<Option<Commit>> {
        let Some(folder) = self.folder(kind, repo)? else {
            return Ok(None);
        };
        if revision.is_commit() {
            let snap = format!("snapshots/{revision}");
            let commit = Commit::parse(revision.as_str()).ok();
            return Ok(commit.filter(|_| folder.exists_dir(&snap).unwrap_or(false)));
        }
        let rel = format!("refs/{revision}");
        let Some(file) = folder.open_file(&rel, true)? else {
            return Ok(None);
        };
        let mut text = String::new();
        use std::io::Read;
        file.take(256)
            .read_to_string(&mut text)
            .map_err(|source| SharedCacheError::Io {
                action: "read",
                path: folder.path(&rel),
                source,
            })?;
        let commit = text.trim();
        match Commit::parse(commit) {
            Ok(c) => Ok(Some(c)),
            Err(_) => Err(SharedCacheError::Unexpected {
                path: folder.path(&rel),
                reason: format!("holds {commit:?}, not a 40-hex commit"),
            }),
        }
    }

    /// Opens the blob `hash` of the repo (`blobs/<hex>`), if the cache has it.
    pub fn open_blob(
        &self,
        kind: RepoKind,
        repo: &RepoId,
        hash: &ContentHash,
    ) -> Result<Option<File>> {
        match self.folder(kind, repo)? {
            Some(folder) => folder.open_file(&format!("blobs/{}", hash.hex()), true),
            None => Ok(None),
        }
    }

    /// Opens `path` of the snapshot of `commit` (following its symlink, which must stay in the
    /// repo's folder), if the cache has it.
    pub fn open_snapshot_file(
        &self,
        kind: RepoKind,
        repo: &RepoId,
        commit: &Commit,
        path: &RepoPath,
    ) -> Result<Option<File>> {
        match self.folder(kind, repo)? {
            Some(folder) => folder.open_file(&format!("snapshots/{commit}/{path}"), false),
            None => Ok(None),
        }
    }

    /// The files of the snapshot of `commit`, named by the blobs their symlinks point to; None
    /// when the cache lacks the snapshot. Without a hub this listing is all there is to know
    /// of the commit, so anything that is not a symlink to a blob refuses the whole snapshot.
    pub fn list_snapshot(
        &self,
        kind: RepoKind,
        repo: &RepoId,
        commit: &Commit,
    ) -> Result<Option<Vec<CachedFile>>> {
        let Some(folder) = self.folder(kind, repo)? else {
            return Ok(None);
        };
        let snap = format!("snapshots/{commit}");
        if !folder.exists_dir(&snap)? {
            return Ok(None);
        }
        let mut links = Vec::new();
        folder.walk(&snap, &mut links)?;
        let mut files = Vec::with_capacity(links.len());
        for (rel, target) in links {
            let path = RepoPath::parse(&rel[snap.len() + 1..]).map_err(|e| {
                SharedCacheError::Unexpected {
                    path: folder.path(&rel),
                    reason: e.to_string(),
                }
            })?;
            let Some(target) = target else {
                return Err(SharedCacheError::Unexpected {
                    path: folder.path(&rel),
                    reason: "is a plain file, not a symlink to a blob named by its hash: its hash \
                             is unknown without a hub; add hub to --sources, or fill the cache \
                             with huggingface_hub"
                        .into(),
                });
            };
            let hash = blob_of_link(&rel, &target).ok_or_else(|| SharedCacheError::Unexpected {
                path: folder.path(&rel),
                reason: format!(
                    "points to {}, not to ../blobs/<sha256 or git sha1> as huggingface_hub writes: refused",
                    target.display()
                ),
            })?;
            let blob = format!("blobs/{}", hash.hex());
            let size = match folder.stat_file(&blob)? {
                Some(st) => st.st_size as u64,
                None => {
                    return Err(SharedCacheError::Unexpected {
                        path: folder.path(&rel),
                        reason: format!(
                            "points to {blob}, which is missing: the cache is incomplete; download it again"
                        ),
                    });
                }
            };
            files.push(CachedFile { path, hash, size });
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(Some(files))
    }
}

/// True when `dir` itself holds `models--…` or `datasets--…` folders.
fn holds_repo_folders(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            let name = e.file_name();
            let name = name.as_bytes();
            name.starts_with(b"models--") || name.starts_with(b"datasets--")
        })
    })
}

/// The blob a snapshot symlink at `rel` (relative to the repo folder) names, if its target
/// resolves, by its own path alone, to `blobs/<sha256 or sha1 hex>` of the same folder.
fn blob_of_link(rel: &str, target: &Path) -> Option<ContentHash> {
    let mut at: Vec<&OsStr> = Path::new(rel).parent()?.iter().collect();
    for c in target.components() {
        match c {
            Component::Normal(part) => at.push(part),
            Component::ParentDir => {
                at.pop()?;
            }
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    let [blobs, name] = at.as_slice() else {
        return None;
    };
    if *blobs != "blobs" {
        return None;
    }
    let name = name.to_str()?;
    let algo = match name.len() {
        64 => Algo::Sha256,
        40 => Algo::GitSha1,
        _ => return None,
    };
    ContentHash::new(algo, name).ok()
}

/// A repo's folder in the cache, opened; paths are relative to it.
struct RepoFolder<'a> {
    cache: &'a SharedCache,
    name: String,
    fd: OwnedFd,
}

impl RepoFolder<'_> {
    fn path(&self, rel: &str) -> PathBuf {
        self.cache.root.join(&self.name).join(rel)
    }

    fn error(&self, action: &'static str, rel: &str, e: Errno) -> SharedCacheError {
        self.cache
            .error(action, &format!("{}/{rel}", self.name), e, &self.name)
    }

    fn open_at(&self, rel: &str, flags: OFlag, resolve: ResolveFlag) -> Result<Option<OwnedFd>> {
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .resolve(resolve);
        match openat2(self.fd.as_fd(), rel, how) {
            Ok(fd) => Ok(Some(fd)),
            Err(Errno::ENOENT | Errno::ENOTDIR) => Ok(None),
            Err(e) => Err(self.error("open", rel, e)),
        }
    }

    fn exists_dir(&self, rel: &str) -> Result<bool> {
        let resolve = beneath() | ResolveFlag::RESOLVE_NO_SYMLINKS;
        Ok(self
            .open_at(rel, OFlag::O_PATH | OFlag::O_DIRECTORY, resolve)?
            .is_some())
    }

    /// Opens a regular file for reading; `no_symlinks` refuses any symlink on the way.
    fn open_file(&self, rel: &str, no_symlinks: bool) -> Result<Option<File>> {
        let mut resolve = beneath();
        if no_symlinks {
            resolve |= ResolveFlag::RESOLVE_NO_SYMLINKS;
        }
        // O_NONBLOCK: opening a FIFO someone put there must not hang the agent.
        let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
        let Some(fd) = self.open_at(rel, flags, resolve)? else {
            return Ok(None);
        };
        let st = fstat(&fd).map_err(|e| self.error("stat", rel, e))?;
        self.require_regular(rel, &st)?;
        Ok(Some(File::from(fd)))
    }

    fn stat_file(&self, rel: &str) -> Result<Option<FileStat>> {
        let resolve = beneath() | ResolveFlag::RESOLVE_NO_SYMLINKS;
        let Some(fd) = self.open_at(rel, OFlag::O_PATH, resolve)? else {
            return Ok(None);
        };
        let st = fstat(&fd).map_err(|e| self.error("stat", rel, e))?;
        self.require_regular(rel, &st)?;
        Ok(Some(st))
    }

    fn require_regular(&self, rel: &str, st: &FileStat) -> Result<()> {
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
            return Err(SharedCacheError::Unexpected {
                path: self.path(rel),
                reason: "is not a regular file: refused".into(),
            });
        }
        Ok(())
    }

    /// Lists `rel` recursively without following symlinks: each entry's path relative to the
    /// folder, with its symlink target (None for a regular file).
    fn walk(&self, rel: &str, out: &mut Vec<(String, Option<PathBuf>)>) -> Result<()> {
        use nix::dir::{Dir, Type};
        let resolve = beneath() | ResolveFlag::RESOLVE_NO_SYMLINKS;
        let Some(fd) = self.open_at(rel, OFlag::O_RDONLY | OFlag::O_DIRECTORY, resolve)? else {
            return Ok(());
        };
        let dir_fd = fd.try_clone().map_err(|e| SharedCacheError::Io {
            action: "read",
            path: self.path(rel),
            source: e,
        })?;
        let mut dir = Dir::from_fd(fd).map_err(|e| self.error("read", rel, e))?;
        for entry in dir.iter() {
            let entry = entry.map_err(|e| self.error("read", rel, e))?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if name == "." || name == ".." {
                continue;
            }
            let Some(name) = name.to_str() else {
                return Err(SharedCacheError::Unexpected {
                    path: self.path(rel).join(name),
                    reason: "is not UTF-8, which no hub path is".into(),
                });
            };
            let child = format!("{rel}/{name}");
            let kind = match entry.file_type() {
                Some(t) => t,
                None => {
                    let st = nix::sys::stat::fstatat(
                        &dir_fd,
                        name,
                        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                    )
                    .map_err(|e| self.error("stat", &child, e))?;
                    match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
                        SFlag::S_IFDIR => Type::Directory,
                        SFlag::S_IFLNK => Type::Symlink,
                        SFlag::S_IFREG => Type::File,
                        _ => Type::Fifo,
                    }
                }
            };
            match kind {
                Type::Directory => self.walk(&child, out)?,
                Type::Symlink => {
                    let target = nix::fcntl::readlinkat(&dir_fd, name)
                        .map_err(|e| self.error("read link", &child, e))?;
                    out.push((child, Some(PathBuf::from(target))));
                }
                Type::File => out.push((child, None)),
                _ => {
                    return Err(SharedCacheError::Unexpected {
                        path: self.path(&child),
                        reason: "is not a file, directory or symlink: refused".into(),
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

    fn commit() -> Commit {
        Commit::parse(COMMIT).unwrap()
    }

    fn sha1_of(bytes: &[u8]) -> ContentHash {
        let mut h = modelcache_core::hash::Hasher::new(Algo::GitSha1, bytes.len() as u64);
        h.update(bytes);
        h.finish()
    }

    /// An HF cache as huggingface_hub writes it, with config.json and a nested file.
    fn hf_cache(root: &Path) -> (RepoId, ContentHash) {
        let repo = RepoId::parse("org/m").unwrap();
        let folder = root.join("models--org--m");
        let hash = sha1_of(b"{}");
        std::fs::create_dir_all(folder.join("blobs")).unwrap();
        std::fs::write(folder.join("blobs").join(hash.hex()), b"{}").unwrap();
        std::fs::create_dir_all(folder.join("refs")).unwrap();
        std::fs::write(folder.join("refs/main"), COMMIT).unwrap();
        let snap = folder.join("snapshots").join(COMMIT);
        std::fs::create_dir_all(snap.join("sub")).unwrap();
        symlink(
            format!("../../blobs/{}", hash.hex()),
            snap.join("config.json"),
        )
        .unwrap();
        symlink(
            format!("../../../blobs/{}", hash.hex()),
            snap.join("sub/a.json"),
        )
        .unwrap();
        (repo, hash)
    }

    #[test]
    fn reads_refs_snapshots_and_blobs_as_huggingface_hub_writes_them() {
        let dir = tempfile::tempdir().unwrap();
        let (repo, hash) = hf_cache(dir.path());
        let cache = SharedCache::open(dir.path()).unwrap();
        let m = RepoKind::Model;
        assert_eq!(
            cache.read_ref(m, &repo, &Revision::main()).unwrap(),
            Some(commit())
        );
        let by_commit = Revision::parse(COMMIT).unwrap();
        assert_eq!(
            cache.read_ref(m, &repo, &by_commit).unwrap(),
            Some(commit())
        );
        let other = RepoId::parse("org/other").unwrap();
        assert_eq!(cache.read_ref(m, &other, &Revision::main()).unwrap(), None);
        let files = cache.list_snapshot(m, &repo, &commit()).unwrap().unwrap();
        let paths: Vec<&str> = files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["config.json", "sub/a.json"]);
        assert!(files.iter().all(|f| f.hash == hash && f.size == 2));
        assert!(cache.open_blob(m, &repo, &hash).unwrap().is_some());
        let path = RepoPath::parse("sub/a.json").unwrap();
        assert!(
            cache
                .open_snapshot_file(m, &repo, &commit(), &path)
                .unwrap()
                .is_some()
        );
        assert_eq!(
            cache
                .list_snapshot(m, &repo, &Commit::parse(&"f".repeat(40)).unwrap())
                .unwrap(),
            None
        );
    }

    #[test]
    fn an_hf_home_is_read_through_its_hub_folder() {
        let dir = tempfile::tempdir().unwrap();
        let (repo, _) = hf_cache(&dir.path().join("hub"));
        let cache = SharedCache::open(dir.path()).unwrap();
        assert_eq!(cache.root(), dir.path().join("hub"));
        let commit = cache
            .read_ref(RepoKind::Model, &repo, &Revision::main())
            .unwrap();
        assert_eq!(commit.as_deref(), Some(COMMIT));
    }

    #[test]
    fn symlinks_that_leave_the_repo_folder_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (repo, _) = hf_cache(dir.path());
        let outside = dir.path().join("secret");
        std::fs::write(&outside, b"not yours").unwrap();
        let snap = dir.path().join("models--org--m/snapshots").join(COMMIT);
        let m = RepoKind::Model;
        let cache = SharedCache::open(dir.path()).unwrap();
        let open = |name: &str| {
            cache.open_snapshot_file(m, &repo, &commit(), &RepoPath::parse(name).unwrap())
        };

        symlink(&outside, snap.join("absolute")).unwrap();
        assert!(matches!(
            open("absolute"),
            Err(SharedCacheError::Escapes { .. })
        ));
        symlink("../../../secret", snap.join("dotdot")).unwrap();
        let err = open("dotdot").unwrap_err();
        assert!(matches!(err, SharedCacheError::Escapes { .. }), "{err}");
        assert!(
            err.to_string().contains("leads outside models--org--m"),
            "{err}"
        );
        // Listing refuses the snapshot: the escaping link does not point into blobs/.
        let err = cache.list_snapshot(m, &repo, &commit()).unwrap_err();
        assert!(err.to_string().contains("not to ../blobs/"), "{err}");

        // A blob that is itself a symlink, even one that stays inside, is refused.
        let fake = "e".repeat(40);
        let blobs = dir.path().join("models--org--m/blobs");
        symlink("../refs/main", blobs.join(&fake)).unwrap();
        let hash = ContentHash::new(Algo::GitSha1, &fake).unwrap();
        let err = cache.open_blob(m, &repo, &hash).unwrap_err();
        assert!(err.to_string().contains("is a symlink"), "{err}");

        // A repo folder that is a symlink elsewhere is refused.
        let elsewhere = tempfile::tempdir().unwrap();
        hf_cache(elsewhere.path());
        symlink(
            elsewhere.path().join("models--org--m"),
            dir.path().join("models--org--n"),
        )
        .unwrap();
        let n = RepoId::parse("org/n").unwrap();
        assert!(cache.read_ref(m, &n, &Revision::main()).is_err());
    }

    #[test]
    fn fifos_bad_refs_and_plain_files_are_refused_with_reasons() {
        let dir = tempfile::tempdir().unwrap();
        let (repo, _) = hf_cache(dir.path());
        let folder = dir.path().join("models--org--m");
        let m = RepoKind::Model;
        let cache = SharedCache::open(dir.path()).unwrap();

        let fifo = "f".repeat(64);
        nix::unistd::mkfifo(
            &folder.join("blobs").join(&fifo),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        let hash = ContentHash::new(Algo::Sha256, &fifo).unwrap();
        let err = cache.open_blob(m, &repo, &hash).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");

        std::fs::write(folder.join("refs/main"), "../../etc/passwd").unwrap();
        let err = cache.read_ref(m, &repo, &Revision::main()).unwrap_err();
        assert!(err.to_string().contains("not a 40-hex commit"), "{err}");

        std::fs::write(
            folder.join("snapshots").join(COMMIT).join("plain.txt"),
            b"x",
        )
        .unwrap();
        let err = cache.list_snapshot(m, &repo, &commit()).unwrap_err();
        assert!(err.to_string().contains("add hub to --sources"), "{err}");
    }

    #[test]
    fn link_targets_resolve_lexically_to_blobs() {
        let sha = "a".repeat(64);
        let ok = |rel: &str, t: &str| blob_of_link(rel, Path::new(t)).map(|h| h.hex().to_owned());
        assert_eq!(
            ok("snapshots/c/x", &format!("../../blobs/{sha}")),
            Some(sha.clone())
        );
        assert_eq!(
            ok("snapshots/c/d/x", &format!("../../../blobs/{sha}")),
            Some(sha.clone())
        );
        assert_eq!(ok("snapshots/c/x", &format!("../../../blobs/{sha}")), None);
        assert_eq!(ok("snapshots/c/x", &format!("/blobs/{sha}")), None);
        assert_eq!(ok("snapshots/c/x", "../../blobs/short"), None);
        assert_eq!(ok("snapshots/c/x", &format!("../../refs/{sha}")), None);
    }
}
