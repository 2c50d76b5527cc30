//! ext4's link limit (65,000 links an inode) against the store, on a real ext4 made in the test
//! and loop-mounted (needs root and mkfs.ext4): a repo with 65,000 copies of one file must not
//! break every other snapshot and view that shows that file.

use modelcache_agent::store::{Layout, SnapshotFile, Store};
use modelcache_core::hash::{Algo, Hasher};
use modelcache_core::repo::{RepoId, RepoKind, RepoPath, Revision};
use modelcache_tests::procs::require_root;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// An ext4 image loop-mounted at a path; unmounted (and its loop device freed) when dropped.
struct Ext4(PathBuf);

impl Ext4 {
    fn mount(image: &Path, at: &Path, mib: u64) -> Ext4 {
        std::fs::File::create(image)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
        let out = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-N", "2048"])
            .arg(image)
            .output()
            .expect("mkfs.ext4 (e2fsprogs) runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-o", "loop"])
            .arg(image)
            .arg(at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount -o loop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ext4(at.to_path_buf())
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-d").arg(&self.0).status();
    }
}

#[test]
fn a_blob_at_the_link_limit_gets_a_replica_and_nothing_fails() {
    require_root().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let fs = Ext4::mount(&dir.path().join("ext4.img"), &dir.path().join("mnt"), 96);
    let store = Store::open(fs.0.join("store")).unwrap();
    let bytes = b"{\"popular\": true}\n";
    let mut h = Hasher::new(Algo::GitSha1, bytes.len() as u64);
    h.update(bytes);
    let hash = h.finish();
    let mut f = store.staging_file().unwrap();
    f.write_all(bytes).unwrap();
    store.commit_blob(f, &hash).unwrap();

    // A repo of 65,000 copies of the file: past the limit on its own.
    let copies: Vec<SnapshotFile> = (0..65_000)
        .map(|i| SnapshotFile {
            path: RepoPath::parse(&format!("d{}/f{i}.json", i % 64)).unwrap(),
            hash: hash.clone(),
        })
        .collect();
    let repo = |n: &str| RepoId::parse(n).unwrap();
    let (c1, c2) = ("1".repeat(40), "2".repeat(40));
    let flood = store
        .assemble_snapshot(
            &modelcache_agent::store::SnapshotKey::parse(
                RepoKind::Dataset,
                &repo("org/flood"),
                &c1,
                None,
            )
            .unwrap(),
            &copies,
        )
        .unwrap();
    // Another model with the same file: linked to the replica.
    let one = [SnapshotFile {
        path: RepoPath::parse("config.json").unwrap(),
        hash: hash.clone(),
    }];
    let other = store
        .assemble_snapshot(
            &modelcache_agent::store::SnapshotKey::parse(
                RepoKind::Model,
                &repo("org/other"),
                &c2,
                None,
            )
            .unwrap(),
            &one,
        )
        .unwrap();
    assert_eq!(
        std::fs::read(other.path.join("config.json")).unwrap(),
        bytes
    );
    // Its hf-cache view too, and the flood's, whose files are all at the limit.
    let main = Revision::parse("main").unwrap();
    for snap in [&other, &flood] {
        let view = store.view(snap, Layout::HfCache, &main).unwrap();
        assert!(view.is_dir());
    }
    let replicas = fs.0.join("store/blobs/replicas/sha1");
    assert!(
        std::fs::read_dir(&replicas).unwrap().count() >= 1,
        "a replica was made"
    );
    // Replicas count as the store's bytes.
    assert!(store.bytes_on_disk().unwrap() >= 2 * bytes.len() as u64);
    // Once the snapshots go, garbage collection frees the blob and its replicas.
    for snap in [&flood, &other] {
        store.remove_snapshot(snap).unwrap();
    }
    let (count, _) = store.collect_garbage(|_| false).unwrap();
    assert!(count >= 2, "blob and replica freed: {count}");
    assert_eq!(std::fs::read_dir(&replicas).unwrap().count(), 0);
}
