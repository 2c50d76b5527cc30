//! Comparing directory trees byte for byte, and reading the mount table.

use modelcache_agent::mounts::unescape;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Every regular file below `dir` (following symlinks), by relative path, with its bytes.
pub fn read_tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    walkdir::WalkDir::new(dir)
        .follow_links(true)
        .into_iter()
        .map(|e| e.expect("walk"))
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            let rel = e
                .path()
                .strip_prefix(dir)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            (rel, std::fs::read(e.path()).expect("read"))
        })
        .collect()
}

/// Fails unless the two trees hold the same paths with byte-identical contents, naming the
/// first difference.
pub fn assert_same_tree(expected: &Path, actual: &Path) {
    let (a, b) = (read_tree(expected), read_tree(actual));
    assert!(!a.is_empty(), "{} holds no files", expected.display());
    let names = |t: &BTreeMap<String, Vec<u8>>| t.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&a), names(&b), "file lists differ");
    for (path, bytes) in &a {
        let got = &b[path];
        if got != bytes {
            let at = bytes.iter().zip(got).position(|(x, y)| x != y);
            panic!(
                "{path}: contents differ (expected {} bytes, got {}, first difference at {at:?})",
                bytes.len(),
                got.len()
            );
        }
    }
}

/// The options of the mount at exactly `target` (e.g. `ro`, `nosuid`, `nodev`), if mounted.
pub fn mount_options(target: &Path) -> Option<Vec<String>> {
    let mounts = procfs::process::Process::myself()
        .and_then(|p| p.mountinfo())
        .expect("read mountinfo");
    mounts
        .into_iter()
        .find(|m| unescape(&m.mount_point) == target)
        .map(|m| {
            let mut opts: Vec<String> = m.mount_options.into_keys().collect();
            opts.sort();
            opts
        })
}

/// How many mounts sit exactly at `target`.
pub fn mount_count(target: &Path) -> usize {
    procfs::process::Process::myself()
        .and_then(|p| p.mountinfo())
        .expect("read mountinfo")
        .into_iter()
        .filter(|m| unescape(&m.mount_point) == target)
        .count()
}

/// Makes `dir` an empty directory: detaches what a run that stopped mid-way left mounted below
/// it, removes it, creates it.
pub fn fresh_dir(dir: &Path) -> std::io::Result<()> {
    if dir.exists() {
        unmount_all_below(dir);
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)
}

/// Detaches every mount below `dir` (deepest first): cleanup after a run that stopped mid-way.
pub fn unmount_all_below(dir: &Path) {
    let Ok(mounts) = procfs::process::Process::myself().and_then(|p| p.mountinfo()) else {
        return;
    };
    let mut below: Vec<PathBuf> = mounts
        .into_iter()
        .map(|m| unescape(&m.mount_point))
        .filter(|p| p.starts_with(dir))
        .collect();
    below.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for m in below {
        let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_trees(a: &[u8], b: &[u8]) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let (x, y) = (d.path().join("x"), d.path().join("y"));
        for (dir, bytes) in [(&x, a), (&y, b)] {
            std::fs::create_dir_all(dir.join("sub")).unwrap();
            std::fs::write(dir.join("sub/f"), bytes).unwrap();
        }
        (d, x, y)
    }

    #[test]
    fn same_trees_pass() {
        let (_d, x, y) = two_trees(b"abc", b"abc");
        assert_same_tree(&x, &y);
    }

    #[test]
    #[should_panic(expected = "sub/f: contents differ")]
    fn one_byte_differs() {
        let (_d, x, y) = two_trees(b"abc", b"abd");
        assert_same_tree(&x, &y);
    }

    #[test]
    #[should_panic(expected = "file lists differ")]
    fn extra_file() {
        let (_d, x, y) = two_trees(b"abc", b"abc");
        std::fs::write(y.join("extra"), b"").unwrap();
        assert_same_tree(&x, &y);
    }
}
