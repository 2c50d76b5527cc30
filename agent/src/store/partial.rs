//! Large downloads in progress, kept across restarts so that an interrupted file continues from
//! the bytes already on disk:
//!
//! ```text
//! STORE/partial/<algo>-<hex>          the file, written at its final size, chunk by chunk
//! STORE/partial/<algo>-<hex>.chunks   a journal: a header line, then one line per chunk written
//! ```
//!
//! A chunk's line is appended only after its bytes were written and flushed to disk, so every
//! chunk the journal names survives a crash of the agent or of the node. The whole-file hash is
//! still checked before the file becomes a blob; the journal only saves work.

use super::{Context, Result};
use modelcache_core::hash::Hasher;
use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{IoSlice, Write};
use std::path::{Path, PathBuf};

/// Bytes read at a time to hash a written range.
const HASH_BUFFER: u64 = 1 << 20;

/// The partial downloads a running fetch has open, by data path: the others are reclaimable.
pub(super) type InUse = std::sync::Arc<std::sync::Mutex<std::collections::HashSet<PathBuf>>>;

/// A download in progress, split into chunks of a fixed size.
#[derive(Debug)]
pub struct Partial {
    in_use: InUse,
    data_path: PathBuf,
    journal_path: PathBuf,
    data: File,
    journal: File,
    size: u64,
    chunk: u64,
    done: BTreeSet<u64>,
}

/// The files of a partial download, just opened.
struct Opened {
    data: File,
    journal: File,
    journal_path: PathBuf,
    done: BTreeSet<u64>,
}

impl Drop for Partial {
    fn drop(&mut self) {
        self.in_use
            .lock()
            .expect("partials lock")
            .remove(&self.data_path);
    }
}

/// Bytes a file takes on disk: its allocated blocks, not its (possibly sparse) length.
pub(super) fn allocated(meta: &fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    meta.blocks().saturating_mul(512)
}

fn header(size: u64, chunk: u64) -> String {
    format!("modelcache-partial v1 size={size} chunk={chunk}\n")
}

impl Partial {
    /// Opens the partial download at `data_path`, resuming it when its journal matches `size`
    /// and `chunk`, else starting over.
    pub(super) fn open(data_path: PathBuf, size: u64, chunk: u64, in_use: InUse) -> Result<Self> {
        // Claimed before the file is touched, under the lock reclaiming holds while it deletes.
        in_use
            .lock()
            .expect("partials lock")
            .insert(data_path.clone());
        match Self::open_files(&data_path, size, chunk) {
            Ok(Opened {
                data,
                journal,
                journal_path,
                done,
            }) => Ok(Partial {
                in_use,
                data_path,
                journal_path,
                data,
                journal,
                size,
                chunk,
                done,
            }),
            Err(e) => {
                in_use.lock().expect("partials lock").remove(&data_path);
                Err(e)
            }
        }
    }

    fn open_files(data_path: &Path, size: u64, chunk: u64) -> Result<Opened> {
        let journal_path = data_path.with_extension("chunks");
        let done = match fs::read_to_string(&journal_path) {
            Ok(text) => parse_journal(&text, size, chunk),
            Err(_) => None,
        };
        let resumed = done.is_some();
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(!resumed)
            .open(data_path)
            .ctx("open partial download", data_path)?;
        data.set_len(size).ctx("size partial download", data_path)?;
        let mut journal = OpenOptions::new()
            .append(true)
            .create(true)
            .truncate(false)
            .open(&journal_path)
            .ctx("open journal", &journal_path)?;
        if !resumed {
            journal.set_len(0).ctx("reset journal", &journal_path)?;
            journal
                .write_all(header(size, chunk).as_bytes())
                .ctx("write journal", &journal_path)?;
        }
        Ok(Opened {
            data,
            journal,
            journal_path,
            done: done.unwrap_or_default(),
        })
    }

    /// Chunks already written (by an earlier, interrupted run).
    pub fn done(&self) -> &BTreeSet<u64> {
        &self.done
    }

    /// The file the chunks are written into.
    pub fn data_path(&self) -> &Path {
        &self.data_path
    }

    /// Number of chunks.
    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(self.chunk)
    }

    /// Byte range `[start, end)` of chunk `i`.
    pub fn range(&self, i: u64) -> (u64, u64) {
        let start = i * self.chunk;
        (start, (start + self.chunk).min(self.size))
    }

    /// Writes `bufs`, one after the other, at `offset`, in as few `pwritev` calls as the kernel
    /// allows (received buffers go to the page cache without being gathered first).
    pub fn write_at(&self, bufs: &[bytes::Bytes], offset: u64) -> Result<()> {
        let (mut i, mut skip, mut at) = (0, 0usize, offset);
        while i < bufs.len() {
            let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(bufs.len() - i);
            slices.push(IoSlice::new(&bufs[i][skip..]));
            slices.extend(bufs[i + 1..].iter().map(|b| IoSlice::new(b)));
            let n = nix::sys::uio::pwritev(&self.data, &slices, at as i64)
                .map_err(std::io::Error::from)
                .ctx("write", &self.data_path)?;
            if n == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::WriteZero))
                    .ctx("write", &self.data_path);
            }
            at += n as u64;
            let mut n = n;
            while i < bufs.len() && n >= bufs[i].len() - skip {
                n -= bufs[i].len() - skip;
                i += 1;
                skip = 0;
            }
            skip += n;
        }
        Ok(())
    }

    /// Feeds bytes `[from, to)` to `hasher`, read [`HASH_BUFFER`] bytes at a time. Reads, not a
    /// mapping: a data file cut short under the agent (a full disk's repair, a person) is an
    /// error here, where a mapping would kill the process with SIGBUS.
    pub fn hash_range(&self, hasher: &mut Hasher, from: u64, to: u64) -> Result<()> {
        use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
        let _ = posix_fadvise(
            &self.data,
            from as i64,
            (to - from) as i64,
            PosixFadviseAdvice::POSIX_FADV_SEQUENTIAL,
        );
        let mut buf = vec![0u8; (to - from).min(HASH_BUFFER) as usize];
        let mut at = from;
        while at < to {
            let n = (to - at).min(HASH_BUFFER) as usize;
            self.read_at(&mut buf[..n], at)?;
            hasher.update(&buf[..n]);
            at += n as u64;
        }
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        use std::os::unix::fs::FileExt;
        self.data
            .read_exact_at(buf, offset)
            .ctx("read", &self.data_path)
    }

    /// Records that chunk `i` is written, after making it durable: the journal never names
    /// bytes a power loss could take, and the file reaches the disk while the rest downloads,
    /// not all at once when it is committed. One `write` of one short line, so concurrent
    /// appends never interleave.
    pub fn mark_done(&self, i: u64) -> Result<()> {
        self.data.sync_data().ctx("fsync", &self.data_path)?;
        (&self.journal)
            .write_all(format!("{i}\n").as_bytes())
            .ctx("write journal", &self.journal_path)
    }

    /// The data file, for committing it as a blob.
    pub(super) fn data(&self) -> (&File, &Path) {
        (&self.data, &self.data_path)
    }

    /// Removes the journal (after the data became a blob) .
    pub(super) fn remove_journal(&self) -> Result<()> {
        fs::remove_file(&self.journal_path).ctx("remove", &self.journal_path)
    }

    /// Deletes the download, e.g. after its bytes failed verification.
    pub fn discard(&self) -> Result<()> {
        for p in [&self.journal_path, &self.data_path] {
            match fs::remove_file(p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).ctx("remove", p);
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// The chunks a journal names, if its header matches; a torn last line is ignored.
fn parse_journal(text: &str, size: u64, chunk: u64) -> Option<BTreeSet<u64>> {
    let body = text.strip_prefix(&header(size, chunk))?;
    let n = size.div_ceil(chunk);
    Some(
        body.split_inclusive('\n')
            .filter_map(|l| l.strip_suffix('\n'))
            .filter_map(|l| l.parse::<u64>().ok())
            .filter(|&i| i < n)
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_parsing() {
        let h = header(10, 4);
        assert_eq!(
            parse_journal(&format!("{h}0\n2\n"), 10, 4),
            Some([0, 2].into())
        );
        // A torn last line, an out-of-range chunk and garbage are ignored.
        assert_eq!(
            parse_journal(&format!("{h}2\n7\nx\n1"), 10, 4),
            Some([2].into())
        );
        // Another size or chunk size: start over.
        assert_eq!(parse_journal(&format!("{h}0\n"), 11, 4), None);
        assert_eq!(parse_journal(&format!("{h}0\n"), 10, 5), None);
    }

    #[test]
    fn resumes_only_what_the_journal_names() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sha256-x");
        let p = Partial::open(path.clone(), 10, 4, InUse::default()).unwrap();
        assert_eq!(p.chunks(), 3);
        assert_eq!(p.range(2), (8, 10));
        let b = |s: &'static [u8]| bytes::Bytes::from_static(s);
        p.write_at(&[b(b"ab"), b(b""), b(b"cd")], 0).unwrap();
        p.mark_done(0).unwrap();
        p.write_at(&[b(b"ef")], 4).unwrap(); // chunk 1 half written, never marked
        drop(p);
        let p = Partial::open(path.clone(), 10, 4, InUse::default()).unwrap();
        assert_eq!(p.done(), &[0].into());
        let mut buf = [0u8; 4];
        p.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"abcd");
        let mut h = Hasher::new(modelcache_core::hash::Algo::Sha256, 6);
        p.hash_range(&mut h, 0, 6).unwrap();
        let mut want = Hasher::new(modelcache_core::hash::Algo::Sha256, 6);
        want.update(b"abcdef");
        assert_eq!(h.finish(), want.finish());
        drop(p);
        // A different chunk size throws the old bytes away.
        let p = Partial::open(path.clone(), 10, 5, InUse::default()).unwrap();
        assert!(p.done().is_empty());
        p.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [0; 4]);
        p.discard().unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn hashing_a_data_file_cut_short_is_an_error_not_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sha256-y");
        let size = 3 * HASH_BUFFER;
        let p = Partial::open(path.clone(), size, HASH_BUFFER, InUse::default()).unwrap();
        let chunk = bytes::Bytes::from(vec![7u8; HASH_BUFFER as usize]);
        for i in 0..3 {
            p.write_at(std::slice::from_ref(&chunk), i * HASH_BUFFER)
                .unwrap();
            p.mark_done(i).unwrap();
        }
        // Someone cuts the file under the download.
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(HASH_BUFFER / 2)
            .unwrap();
        let mut h = Hasher::new(modelcache_core::hash::Algo::Sha256, size);
        let err = p.hash_range(&mut h, 0, size).unwrap_err();
        assert!(err.to_string().contains("read"), "{err}");
    }
}
