//! Importing a file from a shared cache into the store, verified.
//!
//! The kernel copies (`copy_file_range`, which clones extents where the filesystem can, e.g.
//! XFS or Btrfs, and copies in the page cache elsewhere) while a second thread hashes each range
//! of the *copy* as it lands, so the bytes verified are the bytes kept, even if someone rewrites
//! the source meanwhile, and hashing overlaps copying. Where the kernel refuses to copy between
//! the two filesystems (an NFS share into a local disk), the bytes are read once, hashed from the
//! same buffer and written. Nothing enters `blobs/` unless size and hash match.

use super::PlannedFile;
use crate::store::{Store, StoreError};
use modelcache_core::hash::Hasher;
use nix::errno::Errno;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::mpsc;

/// Bytes per `copy_file_range` call and per hashed range.
const RANGE: u64 = 8 << 20;
/// Ranges of the source asked to be read ahead of the copy.
const READ_AHEAD: u64 = 4;
/// Bytes per read when hashing the copy, or when copying by hand.
const BUF: usize = 4 << 20;

/// Why an import did not produce a blob.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The source's bytes are not the file wanted: try the next tier.
    #[error("{0}")]
    Mismatch(String),
    /// Reading the source failed: try the next tier.
    #[error("reading the shared cache: {0}")]
    Source(io::Error),
    /// Writing the store failed: the fetch fails.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Copies `src` into the store as the blob `file.hash`, verifying size and hash; `added` is told
/// of each range verified. Blocking.
pub fn import(
    store: &Store,
    src: &File,
    file: &PlannedFile,
    added: &(dyn Fn(u64) + Sync),
) -> Result<(), ImportError> {
    let len = src.metadata().map_err(ImportError::Source)?.len();
    if len != file.size {
        return Err(ImportError::Mismatch(format!(
            "is {len} bytes, {} expected",
            file.size
        )));
    }
    let tmp = store.staging_file()?;
    let out = tmp.as_file();
    let store_err = |e: io::Error| ImportError::Store(StoreError::from_io("write", tmp.path(), e));
    let mut hasher = Hasher::new(file.hash.algo(), file.size);
    let copied = std::thread::scope(|s| {
        let (ranges, landed) = mpsc::sync_channel::<(u64, u64)>(4);
        let copier = s.spawn(move || kernel_copy(src, out, file.size, &ranges));
        let mut buf = vec![0u8; BUF];
        for (mut at, n) in landed {
            let end = at + n;
            while at < end {
                let want = (end - at).min(BUF as u64) as usize;
                out.read_exact_at(&mut buf[..want], at).map_err(store_err)?;
                hasher.update(&buf[..want]);
                at += want as u64;
            }
            // Start writing the range back now, while the next ones are copied, so the fsync
            // before the rename has little left to wait for.
            start_writeback(out, at - n, n);
            added(n);
        }
        Ok::<_, ImportError>(copier.join().expect("the copier does not panic"))
    })?;
    match copied {
        Ok(Copied::All) => {}
        Ok(Copied::Unsupported) => {
            copy_by_hand(src, out, file.size, &mut hasher, added).map_err(|e| match e {
                Side::Read(e) => ImportError::Source(e),
                Side::Write(e) => store_err(e),
            })?
        }
        Ok(Copied::Short(at)) => {
            return Err(ImportError::Mismatch(format!(
                "ended at byte {at} of {} while being copied",
                file.size
            )));
        }
        Err(Side::Read(e)) => return Err(ImportError::Source(e)),
        Err(Side::Write(e)) => return Err(store_err(e)),
    }
    let actual = hasher.finish();
    if actual != file.hash {
        return Err(ImportError::Mismatch(format!(
            "has hash {actual}, {} expected",
            file.hash
        )));
    }
    store.commit_blob(tmp, &file.hash)?;
    Ok(())
}

/// Asks the kernel to start writing a range back to disk, without waiting (on Linux,
/// POSIX_FADV_DONTNEED starts writeback of dirty pages, and drops only pages already clean).
/// Only a hint: an error changes nothing that the final fsync does not check.
fn start_writeback(file: &File, offset: u64, len: u64) {
    use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
    let _ = posix_fadvise(
        file,
        offset as i64,
        len as i64,
        PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    );
}

/// How far the kernel copy got.
enum Copied {
    All,
    /// The kernel cannot copy between these files; nothing was copied.
    Unsupported,
    /// The source ended early, at this byte.
    Short(u64),
}

/// Which side of a copy failed.
enum Side {
    Read(io::Error),
    Write(io::Error),
}

/// Copies `len` bytes with `copy_file_range`, sending each range landed to `ranges`.
fn kernel_copy(
    src: &File,
    out: &File,
    len: u64,
    ranges: &mpsc::SyncSender<(u64, u64)>,
) -> Result<Copied, Side> {
    use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
    let mut at = 0u64;
    while at < len {
        let want = (len - at).min(RANGE);
        let start = at;
        // Read the next ranges ahead while this one is copied (a hint; errors change nothing).
        let _ = posix_fadvise(
            src,
            (start + want) as i64,
            (READ_AHEAD * RANGE) as i64,
            PosixFadviseAdvice::POSIX_FADV_WILLNEED,
        );
        while at < start + want {
            let (mut off_in, mut off_out) = (at as i64, at as i64);
            let n = (start + want - at) as usize;
            match nix::fcntl::copy_file_range(src, Some(&mut off_in), out, Some(&mut off_out), n) {
                Ok(0) => return Ok(Copied::Short(at)),
                Ok(n) => at += n as u64,
                Err(Errno::EINTR) => {}
                // Not between these filesystems (or not on this kernel): copy by hand.
                Err(Errno::EXDEV | Errno::EINVAL | Errno::EOPNOTSUPP | Errno::ENOSYS)
                    if at == 0 =>
                {
                    return Ok(Copied::Unsupported);
                }
                Err(e @ (Errno::ENOSPC | Errno::EDQUOT | Errno::EFBIG)) => {
                    return Err(Side::Write(e.into()));
                }
                Err(e) => return Err(Side::Read(e.into())),
            }
        }
        if ranges.send((start, want)).is_err() {
            // The hasher stopped on an error of its own, which it reports.
            return Ok(Copied::All);
        }
    }
    Ok(Copied::All)
}

/// Reads, hashes and writes `len` bytes through one buffer.
fn copy_by_hand(
    src: &File,
    out: &File,
    len: u64,
    hasher: &mut Hasher,
    added: &(dyn Fn(u64) + Sync),
) -> Result<(), Side> {
    let mut buf = vec![0u8; BUF];
    let mut at = 0u64;
    while at < len {
        let want = (len - at).min(BUF as u64) as usize;
        src.read_exact_at(&mut buf[..want], at)
            .map_err(Side::Read)?;
        hasher.update(&buf[..want]);
        out.write_all_at(&buf[..want], at).map_err(Side::Write)?;
        added(want as u64);
        at += want as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelcache_core::hash::{Algo, ContentHash};
    use modelcache_core::repo::RepoPath;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn planned(bytes: &[u8]) -> PlannedFile {
        let mut h = Hasher::new(Algo::Sha256, bytes.len() as u64);
        h.update(bytes);
        PlannedFile {
            path: RepoPath::parse("model.safetensors").unwrap(),
            hash: h.finish(),
            size: bytes.len() as u64,
        }
    }

    fn source(dir: &std::path::Path, bytes: &[u8]) -> File {
        let path = dir.join("src");
        std::fs::write(&path, bytes).unwrap();
        File::open(path).unwrap()
    }

    #[test]
    fn imports_verified_bytes_in_ranges_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        let bytes: Vec<u8> = (0..(RANGE * 2 + 12345))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let file = planned(&bytes);
        let counted = AtomicU64::new(0);
        let added = |n| {
            counted.fetch_add(n, Ordering::Relaxed);
        };
        import(&store, &source(dir.path(), &bytes), &file, &added).unwrap();
        assert_eq!(std::fs::read(store.blob_path(&file.hash)).unwrap(), bytes);
        assert_eq!(counted.load(Ordering::Relaxed), bytes.len() as u64);
    }

    #[test]
    fn wrong_bytes_or_size_are_a_mismatch_and_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        let file = planned(b"the real weights");
        let none = |_| {};
        let err = import(
            &store,
            &source(dir.path(), b"the fake weights"),
            &file,
            &none,
        )
        .unwrap_err();
        assert!(
            matches!(err, ImportError::Mismatch(ref m) if m.contains("has hash")),
            "{err}"
        );
        let err = import(&store, &source(dir.path(), b"short"), &file, &none).unwrap_err();
        assert!(
            matches!(err, ImportError::Mismatch(ref m) if m.contains("5 bytes")),
            "{err}"
        );
        assert!(!store.has_blob(&file.hash));
        let staged = std::fs::read_dir(store.root().join("staging"))
            .unwrap()
            .count();
        assert_eq!(staged, 0, "staging is left empty");
        let other = ContentHash::new(Algo::Sha256, &"0".repeat(64)).unwrap();
        assert!(!store.has_blob(&other));
    }

    #[test]
    fn copying_by_hand_gives_the_same_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        let bytes: Vec<u8> = (0..(BUF as u64 * 3 + 7)).map(|i| (i % 253) as u8).collect();
        let file = planned(&bytes);
        let tmp = store.staging_file().unwrap();
        let mut hasher = Hasher::new(Algo::Sha256, file.size);
        let src = source(dir.path(), &bytes);
        assert!(copy_by_hand(&src, tmp.as_file(), file.size, &mut hasher, &|_| {}).is_ok());
        assert_eq!(hasher.finish(), file.hash);
        assert_eq!(std::fs::read(tmp.path()).unwrap(), bytes);
    }
}
