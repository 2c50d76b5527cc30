use super::*;
use modelcache_core::hash::{Algo, Hasher};
use std::io::Write;

/// Puts `bytes` into the store as a git-sha1 blob.
pub(crate) fn put_blob(store: &Store, bytes: &[u8]) -> ContentHash {
    let mut h = Hasher::new(Algo::GitSha1, bytes.len() as u64);
    h.update(bytes);
    let hash = h.finish();
    let mut f = store.staging_file().unwrap();
    f.write_all(bytes).unwrap();
    store.commit_blob(f, &hash).unwrap();
    hash
}

fn repo() -> RepoId {
    RepoId::parse("org/model").unwrap()
}

#[test]
fn snapshots_share_blobs_and_appear_whole() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let a = put_blob(&store, b"shared tokenizer");
    let b = put_blob(&store, b"weights v1");
    let c = put_blob(&store, b"weights v2");
    let file = |p: &str, h: &ContentHash| SnapshotFile {
        path: RepoPath::parse(p).unwrap(),
        hash: h.clone(),
    };
    let (c1, c2) = ("1".repeat(40), "2".repeat(40));
    assert!(
        store
            .snapshot(&SnapshotKey::parse(RepoKind::Model, &repo(), &c1, None).unwrap())
            .is_none()
    );
    let s1 = store
        .assemble_snapshot(
            &SnapshotKey::parse(RepoKind::Model, &repo(), &c1, None).unwrap(),
            &[file("tok/t.json", &a), file("w.bin", &b)],
        )
        .unwrap();
    let s2 = store
        .assemble_snapshot(
            &SnapshotKey::parse(RepoKind::Model, &repo(), &c2, None).unwrap(),
            &[file("tok/t.json", &a), file("w.bin", &c)],
        )
        .unwrap();
    assert_eq!(std::fs::read(s1.path.join("w.bin")).unwrap(), b"weights v1");
    assert_eq!(std::fs::read(s2.path.join("w.bin")).unwrap(), b"weights v2");
    // One copy of the shared file: both snapshot entries are the blob's inode.
    use std::os::unix::fs::MetadataExt;
    let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
    assert_eq!(ino(&s1.path.join("tok/t.json")), ino(&store.blob_path(&a)));
    assert_eq!(ino(&s2.path.join("tok/t.json")), ino(&store.blob_path(&a)));
    // Blobs are read-only.
    let mode = std::fs::metadata(store.blob_path(&a))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o444);
    // Idempotent.
    let again = store
        .assemble_snapshot(
            &SnapshotKey::parse(RepoKind::Model, &repo(), &c1, None).unwrap(),
            &[],
        )
        .unwrap();
    assert_eq!(again, s1);
    assert_eq!(store.list_snapshots().unwrap(), vec![s1, s2]);
    // Nothing left in staging.
    assert_eq!(
        std::fs::read_dir(dir.path().join("staging"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn missing_blob_fails_and_leaves_no_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let absent = ContentHash::new(Algo::GitSha1, &"0".repeat(40)).unwrap();
    let commit = "3".repeat(40);
    let err = store
        .assemble_snapshot(
            &SnapshotKey::parse(RepoKind::Model, &repo(), &commit, None).unwrap(),
            &[SnapshotFile {
                path: RepoPath::parse("x").unwrap(),
                hash: absent,
            }],
        )
        .unwrap_err();
    assert_eq!(err.io().kind(), io::ErrorKind::NotFound);
    assert!(
        store
            .snapshot(&SnapshotKey::parse(RepoKind::Model, &repo(), &commit, None).unwrap())
            .is_none()
    );
    assert_eq!(
        std::fs::read_dir(dir.path().join("staging"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn open_sweeps_staging_and_refs_roundtrip() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let leftover = store.staging_file().unwrap().keep().unwrap().1;
    std::fs::create_dir_all(dir.path().join("staging/snap-x/sub")).unwrap();
    let rev = Revision::parse("refs/pr/1").unwrap();
    let commit = Commit::parse(&"a".repeat(40)).unwrap();
    store
        .write_ref(RepoKind::Dataset, &repo(), &rev, &commit)
        .unwrap();
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert!(!leftover.exists());
    assert_eq!(
        std::fs::read_dir(dir.path().join("staging"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(
        store.read_ref(RepoKind::Dataset, &repo(), &rev),
        Some(commit)
    );
    assert_eq!(store.read_ref(RepoKind::Model, &repo(), &rev), None);
}

#[test]
fn pins_survive_reload_and_corruption_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let rec = PinRecord {
        kind: "model".into(),
        repo: "org/model".into(),
        commit: "c".repeat(40),
        target_path: "/var/lib/kubelet/pods/x/volumes/y/mount".into(),
        pod: Some("team-a/vllm-0".into()),
        filter: None,
        pinned_at: 1,
    };
    let mut pins = Pins::load(dir.path()).unwrap();
    pins.pin("vol-1", rec.clone()).unwrap();
    pins.pin("vol-2", rec.clone()).unwrap();
    let mut pins = Pins::load(dir.path()).unwrap();
    let snap = Snapshot {
        kind: RepoKind::Model,
        repo: repo(),
        commit: Commit::parse(&rec.commit).unwrap(),
        filter: None,
        path: PathBuf::new(),
    };
    assert_eq!(pins.volumes_of(&snap), ["vol-1", "vol-2"]);
    let filtered = Snapshot {
        filter: Some("f".repeat(16)),
        ..snap
    };
    assert!(
        pins.volumes_of(&filtered).is_empty(),
        "another filter is another snapshot"
    );
    let t = rec.target_path.as_str();
    assert!(pins.unpin("vol-1", t).unwrap());
    assert!(!pins.unpin("vol-1", t).unwrap());
    let pins = Pins::load(dir.path()).unwrap();
    assert_eq!(pins.get("vol-2", t), Some(&rec));
    assert!(pins.get("vol-1", t).is_none());
    std::fs::write(dir.path().join("pins.json"), b"{not json").unwrap();
    let err = Pins::load(dir.path()).unwrap_err();
    assert!(err.to_string().contains("corrupt"), "{err}");
}

#[test]
fn a_filtered_snapshot_is_its_own_directory_sharing_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let a = put_blob(&store, b"config");
    let b = put_blob(&store, b"weights");
    let file = |p: &str, h: &ContentHash| SnapshotFile {
        path: RepoPath::parse(p).unwrap(),
        hash: h.clone(),
    };
    let c = "4".repeat(40);
    let key = "0123456789abcdef";
    let all = store
        .assemble_snapshot(
            &SnapshotKey::parse(RepoKind::Model, &repo(), &c, None).unwrap(),
            &[file("c.json", &a), file("w.bin", &b)],
        )
        .unwrap();
    let some = store
        .assemble_snapshot(
            &SnapshotKey::parse(RepoKind::Model, &repo(), &c, Some(key)).unwrap(),
            &[file("c.json", &a)],
        )
        .unwrap();
    assert_ne!(all.path, some.path);
    assert!(some.path.ends_with(format!("{c}+{key}")));
    assert!(!some.path.join("w.bin").exists());
    assert_eq!(
        store.snapshot(&SnapshotKey::parse(RepoKind::Model, &repo(), &c, Some(key)).unwrap()),
        Some(some.clone())
    );
    assert_eq!(store.list_snapshots().unwrap(), vec![all, some]);
}

#[test]
fn one_writer_per_store() {
    let dir = tempfile::tempdir().unwrap();
    let first = Store::open(dir.path()).unwrap();
    let err = Store::open(dir.path()).unwrap_err();
    assert!(
        err.to_string().contains("another modelcache process"),
        "{err}"
    );
    // Reading beside the writer is fine.
    Store::inspect(dir.path()).unwrap();
    drop(first);
    Store::open(dir.path()).unwrap();
}

#[test]
fn reconcile_drops_pins_of_unmounted_volumes_and_pins_mounted_snapshots() {
    use crate::mounts::MountedDir;
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let hash = put_blob(&store, b"weights");
    let file = SnapshotFile {
        path: RepoPath::parse("w.bin").unwrap(),
        hash,
    };
    let commit = "a".repeat(40);
    let snap = store
        .assemble_snapshot(
            &SnapshotKey::parse(RepoKind::Model, &repo(), &commit, None).unwrap(),
            &[file],
        )
        .unwrap();
    let m = std::fs::metadata(&snap.path).unwrap();
    let shows_snapshot = MountedDir {
        path: "/k/mounted".into(),
        dev: m.dev(),
        ino: m.ino(),
    };
    let shows_other = MountedDir {
        path: "/k/other".into(),
        dev: m.dev(),
        ino: m.ino() + 1_000_000,
    };
    let pin = |target: &str, pinned_at| PinRecord {
        kind: "model".into(),
        repo: "org/model".into(),
        commit: commit.clone(),
        target_path: target.into(),
        pod: None,
        filter: None,
        pinned_at,
    };
    let now = 10_000;
    let mut pins = Pins::load(dir.path()).unwrap();
    pins.pin("gone", pin("/k/gone", 0)).unwrap();
    pins.pin("settling", pin("/k/not-yet", now - 5)).unwrap();
    let done = pins
        .reconcile(&store, &[shows_snapshot, shows_other], now)
        .unwrap();
    assert_eq!(done.dropped, ["gone"]);
    assert_eq!(done.recovered, ["recovered:/k/mounted"]);
    let reloaded = Pins::load(dir.path()).unwrap();
    assert_eq!(
        reloaded.volumes_of(&snap),
        ["recovered:/k/mounted", "settling"]
    );
    assert!(reloaded.get("gone", "/k/gone").is_none());
}

#[test]
fn the_store_root_is_closed_to_other_users() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let store = Store::open(&root).unwrap();
    let mode = std::fs::metadata(store.root())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700, "{mode:o}");
}

#[test]
fn a_volume_pinned_at_two_targets_keeps_one_when_the_other_goes() {
    let dir = tempfile::tempdir().unwrap();
    let rec = |target: &str| PinRecord {
        kind: "model".into(),
        repo: "org/model".into(),
        commit: "c".repeat(40),
        target_path: target.into(),
        pod: None,
        filter: None,
        pinned_at: 1,
    };
    let mut pins = Pins::load(dir.path()).unwrap();
    pins.pin("pv-1", rec("/k/pod-a/mount")).unwrap();
    pins.pin("pv-1", rec("/k/pod-b/mount")).unwrap();
    assert_eq!(pins.len(), 2);
    assert!(pins.unpin("pv-1", "/k/pod-a/mount").unwrap());
    let pins = Pins::load(dir.path()).unwrap();
    assert!(pins.get("pv-1", "/k/pod-a/mount").is_none());
    assert_eq!(
        pins.get("pv-1", "/k/pod-b/mount"),
        Some(&rec("/k/pod-b/mount"))
    );
}

#[test]
fn pins_written_by_volume_id_still_load() {
    let dir = tempfile::tempdir().unwrap();
    let old = r#"{"vol-1": {"kind": "model", "repo": "org/model", "commit": "cccccccccccccccccccccccccccccccccccccccc", "target_path": "/k/t", "pinned_at": 5}}"#;
    std::fs::write(dir.path().join("pins.json"), old).unwrap();
    let mut pins = Pins::load(dir.path()).unwrap();
    assert_eq!(pins.get("vol-1", "/k/t").map(|r| r.pinned_at), Some(5));
    // Saved again in the new form, which loads too.
    assert!(pins.unpin("vol-1", "/k/t").unwrap());
    assert!(Pins::load(dir.path()).unwrap().is_empty());
}

#[test]
fn a_pin_that_cannot_be_saved_is_not_kept_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let rec = PinRecord {
        kind: "model".into(),
        repo: "org/model".into(),
        commit: "c".repeat(40),
        target_path: "/k/t".into(),
        pod: None,
        filter: None,
        pinned_at: 1,
    };
    let mut pins = Pins::load(dir.path()).unwrap();
    // pins.json cannot be replaced while a directory stands there.
    std::fs::create_dir(dir.path().join("pins.json")).unwrap();
    assert!(pins.pin("vol-1", rec.clone()).is_err());
    assert!(
        pins.get("vol-1", "/k/t").is_none(),
        "memory follows the file"
    );
    std::fs::remove_dir(dir.path().join("pins.json")).unwrap();
    pins.pin("vol-1", rec.clone()).unwrap();
    assert_eq!(
        Pins::load(dir.path()).unwrap().get("vol-1", "/k/t"),
        Some(&rec)
    );
}

#[test]
fn refs_of_revisions_that_are_path_prefixes_do_not_collide() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let c1 = Commit::parse(&"1".repeat(40)).unwrap();
    let c2 = Commit::parse(&"2".repeat(40)).unwrap();
    for (rev, c) in [("v1", &c1), ("v1/x", &c2)] {
        let rev = Revision::parse(rev).unwrap();
        store.write_ref(RepoKind::Model, &repo(), &rev, c).unwrap();
    }
    for (rev, c) in [("v1", &c1), ("v1/x", &c2)] {
        let rev = Revision::parse(rev).unwrap();
        assert_eq!(
            store.read_ref(RepoKind::Model, &repo(), &rev).as_ref(),
            Some(c)
        );
    }
}

/// A ref says when the hub last named its commit, also when the answer did not change: the
/// age a restarted agent and `ls` go by.
#[test]
fn an_unchanged_answer_moves_the_refs_time() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let c = Commit::parse(&"1".repeat(40)).unwrap();
    let rev = Revision::parse("feature/x").unwrap();
    store.write_ref(RepoKind::Model, &repo(), &rev, &c).unwrap();
    let path = store.ref_path(RepoKind::Model, &repo(), &rev);
    let hour_ago = SystemTime::now() - std::time::Duration::from_secs(3600);
    fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(hour_ago)
        .unwrap();
    let (_, at) = store.read_ref_at(RepoKind::Model, &repo(), &rev).unwrap();
    assert!(at <= hour_ago + std::time::Duration::from_secs(1));
    store.write_ref(RepoKind::Model, &repo(), &rev, &c).unwrap();
    let (commit, at) = store.read_ref_at(RepoKind::Model, &repo(), &rev).unwrap();
    assert_eq!(commit, c);
    assert!(at.elapsed().unwrap() < std::time::Duration::from_secs(60));
    let listed = store.refs(RepoKind::Model, &repo());
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].0, "feature/x", "listed as named, not as escaped");
}

#[test]
fn abandoned_partial_downloads_are_reclaimed_open_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let hash = |c: char| ContentHash::new(Algo::Sha256, &c.to_string().repeat(64)).unwrap();
    let open = store.open_partial(&hash('a'), 1 << 20, 1 << 18).unwrap();
    open.write_at(&[bytes::Bytes::from(vec![1u8; 1 << 18])], 0)
        .unwrap();
    {
        let gone = store.open_partial(&hash('b'), 1 << 20, 1 << 18).unwrap();
        gone.write_at(&[bytes::Bytes::from(vec![2u8; 1 << 19])], 0)
            .unwrap();
    }
    // Sparse files count by their allocated blocks, not their length.
    assert!(store.partial_bytes(&hash('b')) >= 1 << 19);
    assert!(store.partial_bytes(&hash('b')) < 1 << 20);
    let abandoned = store.abandoned_partial_bytes();
    assert!((1 << 19..1 << 20).contains(&abandoned), "{abandoned}");
    let (count, bytes) = store.reclaim_partials().unwrap();
    assert_eq!(count, 2, "data and journal");
    assert_eq!(bytes, abandoned);
    assert_eq!(store.partial_bytes(&hash('b')), 0);
    assert!(
        store.partial_bytes(&hash('a')) >= 1 << 18,
        "an open download is kept"
    );
    drop(open);
    assert_eq!(store.reclaim_partials().unwrap().0, 2);
}
