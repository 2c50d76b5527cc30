//! The repositories a `serve-hub` serves, read from a directory:
//!
//! ```text
//! ROOT/models/<org>/<name>/…files…      a model repo; its files are revision `main`
//! ROOT/datasets/<org>/<name>/…files…    a dataset repo
//! ```
//!
//! A repo directory may be a symlink (to a model shipped by a package, say). Each repo's manifest
//! (every file's git blob id, sha256 for LFS-style files, and a commit id derived from them) is
//! computed once when the repos are loaded, so requests never hash.

use crate::wire::{LfsInfo, TreeEntry};
use modelcache_core::hash::{Algo, hash_file};
use modelcache_core::repo::{RepoId, RepoKind, RepoPath};
use sha1::{Digest, Sha1};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Files at least this large are served as LFS files (sha256-identified), as the Hub stores them.
pub const LFS_THRESHOLD: u64 = 10 * 1024 * 1024;

/// Extensions the Hub's default `.gitattributes` sends to LFS whatever their size.
const LFS_EXTENSIONS: &[&str] = &[
    "7z",
    "arrow",
    "bin",
    "bz2",
    "ckpt",
    "ftz",
    "gguf",
    "gz",
    "h5",
    "joblib",
    "mlmodel",
    "model",
    "msgpack",
    "npy",
    "npz",
    "onnx",
    "ot",
    "parquet",
    "pb",
    "pickle",
    "pkl",
    "pt",
    "pth",
    "rar",
    "safetensors",
    "tar",
    "tflite",
    "tgz",
    "wasm",
    "xz",
    "zip",
    "zst",
];

/// One served file.
#[derive(Debug, Clone)]
pub struct ServedFile {
    /// Where the bytes are.
    pub disk_path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// git blob id.
    pub git_oid: String,
    /// sha256, for LFS-style files.
    pub lfs_sha256: Option<String>,
}

/// One served repository at its single revision, `main`.
#[derive(Debug, Clone)]
pub struct ServedRepo {
    /// Model or dataset.
    pub kind: RepoKind,
    /// `org/name`.
    pub id: RepoId,
    /// Commit id of `main`: sha1 over the sorted (path, blob id) list.
    pub commit: String,
    /// Files by path.
    pub files: BTreeMap<RepoPath, ServedFile>,
}

impl ServedRepo {
    /// Reads and hashes every file below `dir`.
    pub fn load(kind: RepoKind, id: RepoId, dir: &Path) -> std::io::Result<Self> {
        let mut files = BTreeMap::new();
        for entry in walkdir::WalkDir::new(dir).follow_links(true).min_depth(1) {
            let entry = entry.map_err(std::io::Error::other)?;
            if entry.file_type().is_dir() {
                continue;
            }
            let rel = entry
                .path()
                .strip_prefix(dir)
                .map_err(std::io::Error::other)?
                .to_string_lossy()
                .into_owned();
            if rel == ".git" || rel.starts_with(".git/") {
                continue;
            }
            let path = RepoPath::parse(&rel).map_err(std::io::Error::other)?;
            let size = entry.metadata().map_err(std::io::Error::other)?.len();
            let git_oid = hash_file(entry.path(), Algo::GitSha1)?.hex().to_owned();
            let lfs_sha256 = if is_lfs(&rel, size) {
                Some(hash_file(entry.path(), Algo::Sha256)?.hex().to_owned())
            } else {
                None
            };
            files.insert(
                path,
                ServedFile {
                    disk_path: entry.path().to_path_buf(),
                    size,
                    git_oid,
                    lfs_sha256,
                },
            );
        }
        let mut h = Sha1::new();
        h.update(b"modelcache-serve-hub-tree-v1\n");
        for (path, f) in &files {
            h.update(format!("{}\0{}\n", path, f.git_oid).as_bytes());
        }
        let commit = hex::encode(h.finalize());
        Ok(ServedRepo {
            kind,
            id,
            commit,
            files,
        })
    }

    /// True when `revision` names this repo's only revision: `main` or its commit.
    pub fn has_revision(&self, revision: &str) -> bool {
        revision == "main" || revision == self.commit
    }

    /// The tree listing: directories and files under `prefix` (all of them when recursive).
    pub fn tree(&self, prefix: &str, recursive: bool) -> Vec<TreeEntry> {
        let prefix = prefix.trim_matches('/');
        let in_scope = |p: &str| -> Option<String> {
            let rest = if prefix.is_empty() {
                p
            } else {
                p.strip_prefix(prefix)?.strip_prefix('/')?
            };
            Some(rest.to_owned())
        };
        let mut dirs = BTreeSet::new();
        let mut out = Vec::new();
        for (path, f) in &self.files {
            let Some(rest) = in_scope(path.as_str()) else {
                continue;
            };
            let parts: Vec<&str> = rest.split('/').collect();
            // Every directory between the prefix and the file.
            let mut dir = prefix.to_owned();
            for part in &parts[..parts.len() - 1] {
                dir = if dir.is_empty() {
                    (*part).to_owned()
                } else {
                    format!("{dir}/{part}")
                };
                dirs.insert(dir.clone());
                if !recursive {
                    break;
                }
            }
            if !recursive && parts.len() > 1 {
                continue;
            }
            out.push(TreeEntry {
                kind: "file".into(),
                oid: f.git_oid.clone(),
                size: f.size,
                path: path.as_str().to_owned(),
                lfs: f.lfs_sha256.as_ref().map(|sha| LfsInfo {
                    oid: sha.clone(),
                    size: f.size,
                    pointer_size: 134,
                }),
            });
        }
        for dir in dirs {
            let mut h = Sha1::new();
            h.update(dir.as_bytes());
            out.push(TreeEntry {
                kind: "directory".into(),
                oid: hex::encode(h.finalize()),
                size: 0,
                path: dir,
                lfs: None,
            });
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        out
    }
}

fn is_lfs(path: &str, size: u64) -> bool {
    let ext = path.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    size >= LFS_THRESHOLD || ext.is_some_and(|e| LFS_EXTENSIONS.contains(&e.as_str()))
}

/// Every repo under a root directory.
#[derive(Debug, Default)]
pub struct ServedRepos {
    repos: BTreeMap<(RepoKind, RepoId), ServedRepo>,
}

impl ServedRepos {
    /// Loads `root/models/*/*` and `root/datasets/*/*`. A directory whose name is not a valid
    /// repo id is an error, so a typo is not silently left unserved.
    pub fn load(root: &Path) -> std::io::Result<Self> {
        if !root.is_dir() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "hub root {} is not a directory: create ROOT/models/<org>/<name>/ holding a model's files",
                    root.display()
                ),
            ));
        }
        let mut repos = BTreeMap::new();
        for kind in [RepoKind::Model, RepoKind::Dataset] {
            let kind_dir = root.join(kind.plural());
            if !kind_dir.is_dir() {
                continue;
            }
            for org in sorted_dirs(&kind_dir)? {
                for name in sorted_dirs(&org)? {
                    let id = format!("{}/{}", file_name(&org), file_name(&name));
                    let id = RepoId::parse(&id).map_err(std::io::Error::other)?;
                    let repo = ServedRepo::load(kind, id.clone(), &name)?;
                    repos.insert((kind, id), repo);
                }
            }
        }
        Ok(ServedRepos { repos })
    }

    /// The repo, if served.
    pub fn get(&self, kind: RepoKind, id: &str) -> Option<&ServedRepo> {
        let id = RepoId::parse(id).ok()?;
        self.repos.get(&(kind, id))
    }

    /// All served repos.
    pub fn repos(&self) -> impl Iterator<Item = &ServedRepo> {
        self.repos.values()
    }
}

fn sorted_dirs(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo() -> (tempfile::TempDir, ServedRepo) {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path().join("models/org/m");
        std::fs::create_dir_all(r.join("sub/deeper")).unwrap();
        std::fs::write(r.join("config.json"), b"hello\n").unwrap();
        std::fs::write(r.join("model.safetensors"), b"abc").unwrap();
        std::fs::write(r.join("sub/deeper/x.txt"), b"").unwrap();
        let cat = ServedRepos::load(dir.path()).unwrap();
        let repo = cat.get(RepoKind::Model, "org/m").unwrap().clone();
        (dir, repo)
    }

    #[test]
    fn manifest_hashes_like_the_hub() {
        let (_d, repo) = repo();
        let cfg = &repo.files[&RepoPath::parse("config.json").unwrap()];
        assert_eq!(cfg.git_oid, "ce013625030ba8dba906f756967f9e9ca394464a");
        assert!(cfg.lfs_sha256.is_none());
        let st = &repo.files[&RepoPath::parse("model.safetensors").unwrap()];
        assert_eq!(
            st.lfs_sha256.as_deref(),
            Some("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        );
        assert!(repo.has_revision("main") && repo.has_revision(&repo.commit));
        assert!(!repo.has_revision("v2"));
    }

    #[test]
    fn tree_lists_dirs_and_files() {
        let (_d, repo) = repo();
        let paths = |t: Vec<TreeEntry>| -> Vec<(String, String)> {
            t.into_iter().map(|e| (e.kind, e.path)).collect()
        };
        let all = paths(repo.tree("", true));
        assert_eq!(
            all,
            [
                ("file", "config.json"),
                ("file", "model.safetensors"),
                ("directory", "sub"),
                ("directory", "sub/deeper"),
                ("file", "sub/deeper/x.txt"),
            ]
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
        );
        let top = paths(repo.tree("", false));
        assert_eq!(top.len(), 3, "{top:?}");
        let sub = paths(repo.tree("sub", true));
        assert_eq!(sub.len(), 2, "{sub:?}");
    }

    #[test]
    fn commit_changes_with_content() {
        let (d, a) = repo();
        std::fs::write(d.path().join("models/org/m/config.json"), b"changed").unwrap();
        let b = ServedRepos::load(d.path()).unwrap();
        assert_ne!(a.commit, b.get(RepoKind::Model, "org/m").unwrap().commit);
    }

    #[test]
    fn bad_repo_dir_name_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("models/org/bad name")).unwrap();
        assert!(ServedRepos::load(dir.path()).is_err());
    }
}
