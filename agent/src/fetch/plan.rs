//! The files a hub's tree says to fetch, checked before anything is written: a path that could
//! escape the snapshot, two entries that collide, a malformed digest or inconsistent sizes
//! refuse the whole tree.

use super::FetchError;
use modelcache_core::hash::{BadDigest, ContentHash};
use modelcache_core::repo::{InvalidInput, RepoId, RepoPath};
use modelcache_hub::wire::TreeEntry;
use std::collections::{BTreeMap, BTreeSet};

/// The largest file a tree may announce: 2 TiB, far above any model shard or dataset file the
/// Hub holds (its own limit for one LFS file is 50 GB). A hub that announces more is refused
/// before a byte is written or a chunk list is built.
pub const MAX_FILE_BYTES: u64 = 2 << 40;

/// One file to fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedFile {
    /// Path in the repo.
    pub path: RepoPath,
    /// The hash it must have.
    pub hash: ContentHash,
    /// Its size.
    pub size: u64,
}

/// Turns a hub's tree into the files to fetch, refusing unsafe or colliding paths, bad digests
/// and inconsistent sizes.
pub fn plan(
    repo: &RepoId,
    commit: &str,
    tree: &[TreeEntry],
) -> Result<Vec<PlannedFile>, FetchError> {
    let mut files = BTreeMap::new();
    for e in tree.iter().filter(|e| e.is_file()) {
        let path = RepoPath::parse(&e.path)
            .map_err(|e: InvalidInput| FetchError::unsafe_tree(repo, commit, e.to_string()))?;
        let hash = ContentHash::for_entry(&e.oid, e.lfs.as_ref().map(|l| l.oid.as_str())).map_err(
            |d: BadDigest| FetchError::unsafe_tree(repo, commit, format!("{}: {d}", e.path)),
        )?;
        let size = match &e.lfs {
            Some(lfs) if lfs.size != e.size => {
                return Err(FetchError::unsafe_tree(
                    repo,
                    commit,
                    format!("{}: size {} but LFS size {}", e.path, e.size, lfs.size),
                ));
            }
            _ => e.size,
        };
        if size > MAX_FILE_BYTES {
            return Err(FetchError::unsafe_tree(
                repo,
                commit,
                format!(
                    "{}: size {size} is larger than {MAX_FILE_BYTES} bytes, the most modelcache accepts for one file",
                    e.path
                ),
            ));
        }
        let planned = PlannedFile {
            path: path.clone(),
            hash,
            size,
        };
        if files.insert(path, planned).is_some() {
            return Err(FetchError::unsafe_tree(
                repo,
                commit,
                format!("{} is listed twice", e.path),
            ));
        }
    }
    // A file may not also be a directory of another file ("a" and "a/b").
    let mut dirs = BTreeSet::new();
    for path in files.keys() {
        let s = path.as_str();
        for (i, _) in s.match_indices('/') {
            dirs.insert(&s[..i]);
        }
    }
    if let Some(clash) = files.keys().find(|p| dirs.contains(p.as_str())) {
        return Err(FetchError::unsafe_tree(
            repo,
            commit,
            format!("{clash} is both a file and a directory"),
        ));
    }
    let files: Vec<PlannedFile> = files.into_values().collect();
    if total_size(&files).is_none() {
        return Err(FetchError::unsafe_tree(
            repo,
            commit,
            "the sizes of its files add up past 2^64 bytes",
        ));
    }
    Ok(files)
}

/// The bytes of `files` together; None when the sum does not fit a u64.
pub fn total_size<'a>(files: impl IntoIterator<Item = &'a PlannedFile>) -> Option<u64> {
    files
        .into_iter()
        .try_fold(0u64, |sum, f| sum.checked_add(f.size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelcache_hub::wire::LfsInfo;

    fn entry(path: &str, oid: &str, size: u64) -> TreeEntry {
        TreeEntry {
            kind: "file".into(),
            oid: oid.into(),
            size,
            path: path.into(),
            lfs: None,
        }
    }

    fn plan_of(tree: &[TreeEntry]) -> Result<Vec<PlannedFile>, FetchError> {
        plan(&RepoId::parse("o/r").unwrap(), &"c".repeat(40), tree)
    }

    #[test]
    fn huge_or_wrapping_sizes_are_refused() {
        let oid = "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391";
        let big = entry("a", oid, MAX_FILE_BYTES + 1);
        let err = plan_of(&[big]).unwrap_err().to_string();
        assert!(err.contains("larger than"), "{err}");
        plan_of(&[entry("a", oid, MAX_FILE_BYTES)]).unwrap();
        // 2^62 four times wraps a u64 to 0; refused by the bound, whatever the sum.
        let wrap: Vec<TreeEntry> = (0..4)
            .map(|i| entry(&format!("f{i}"), oid, 1 << 62))
            .collect();
        assert!(plan_of(&wrap).is_err());
        let sum = |sizes: &[u64]| {
            let files: Vec<PlannedFile> = sizes
                .iter()
                .map(|&size| PlannedFile {
                    path: RepoPath::parse("x").unwrap(),
                    hash: ContentHash::for_entry(oid, None).unwrap(),
                    size,
                })
                .collect();
            total_size(&files)
        };
        assert_eq!(sum(&[1 << 62; 4]), None);
        assert_eq!(sum(&[3, 4]), Some(7));
    }

    #[test]
    fn plan_accepts_a_normal_tree() {
        let oid = "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391";
        let mut lfs = entry("w/model.safetensors", oid, 5);
        lfs.lfs = Some(LfsInfo {
            oid: "b".repeat(64),
            size: 5,
            pointer_size: 134,
        });
        let dir = TreeEntry {
            kind: "directory".into(),
            ..entry("w", oid, 0)
        };
        let p = plan_of(&[entry("config.json", oid, 0), dir, lfs]).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[1].hash.algo(), modelcache_core::hash::Algo::Sha256);
    }

    #[test]
    fn plan_refuses_hostile_trees() {
        let oid = "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391";
        let cases: Vec<(Vec<TreeEntry>, &str)> = vec![
            (vec![entry("../evil", oid, 0)], "'..'"),
            (vec![entry("/etc/passwd", oid, 0)], "absolute"),
            (vec![entry("a\\b", oid, 0)], "backslash"),
            (vec![entry("a\0b", oid, 0)], "NUL"),
            (vec![entry("a", oid, 0), entry("a", oid, 0)], "listed twice"),
            (
                vec![entry("a", oid, 0), entry("a/b", oid, 0)],
                "both a file and a directory",
            ),
            (vec![entry("a", "../../x", 0)], "not 40 lowercase hex"),
        ];
        for (tree, want) in cases {
            let err = plan_of(&tree).unwrap_err().to_string();
            assert!(err.contains(want), "{tree:?}: {err}");
        }
        let mut bad_lfs = entry("w.bin", oid, 5);
        bad_lfs.lfs = Some(LfsInfo {
            oid: "b".repeat(64),
            size: 6,
            pointer_size: 1,
        });
        assert!(plan_of(&[bad_lfs]).is_err());
    }
}
