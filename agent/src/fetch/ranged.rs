//! A large file in parallel byte ranges, resumable after a restart or a dropped connection.
//!
//! The file is split into chunks of a fixed size, written in place into a [`Partial`] in the
//! store. The first request follows the hub's redirects and tells where the bytes are (a CDN,
//! usually) and whether the server honours `Range`; the other chunks go straight there, all
//! sharing the fetcher's connection budget. A chunk cut off mid-body continues from its last
//! written byte. As chunks complete, a hasher reads the file's written prefix in order, mapped
//! straight from the page cache moments after it was written (no copy), so the hash is ready
//! when the last byte lands; a mismatch discards the partial file.

use super::watchdog::{Open, Tally};
use super::{FetchError, PlannedFile, Progress};
use crate::store::{Partial, Store, StoreError};
use backon::BackoffBuilder;
use futures::{StreamExt, TryStreamExt};
use modelcache_core::hash::{ContentHash, Hasher};
use modelcache_hub::client::{Download, FileSource, RangeAnswer, retry_policy};
use modelcache_hub::{HubClient, HubError};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::mpsc;

/// Bytes a connection holds (as received, not copied) before handing them to a write.
const WRITE_BUFFER: usize = 128 << 10;

/// How a ranged download ended.
pub(super) enum Outcome {
    /// The blob is in the store.
    Done,
    /// The server ignores `Range`; nothing was kept.
    NoRanges,
}

/// One ranged download.
pub(super) struct Job<'a> {
    pub hub: &'a HubClient,
    pub store: &'a Arc<Store>,
    /// Where the file is told as its in-order prefix grows, for peers to read.
    pub growing: &'a super::Growing,
    pub connections: &'a super::budget::Share,
    pub chunk_size: u64,
    /// Requests in flight at most (the size of `connections`).
    pub parallel: usize,
    pub src: FileSource<'a>,
    pub file: &'a PlannedFile,
    pub progress: &'a Progress,
    /// What this attempt added to `progress`, received, and holds.
    pub tally: &'a Tally,
}

/// What the first answer said.
enum Opened {
    Ranges(Download),
    NoRanges,
}

impl Job<'_> {
    pub(super) async fn run(&self) -> Result<Outcome, FetchError> {
        let (store, hash, size, chunk) = (
            self.store.clone(),
            self.file.hash.clone(),
            self.file.size,
            self.chunk_size,
        );
        let partial = Arc::new(
            blocking(move || store.open_partial(&hash, size, chunk))
                .await
                .map_err(FetchError::Store)?,
        );
        let todo: Vec<u64> = (0..partial.chunks())
            .filter(|i| !partial.done().contains(i))
            .collect();
        if !partial.done().is_empty() {
            let kept: u64 = partial
                .done()
                .iter()
                .map(|&i| partial.range(i))
                .map(|(a, b)| b - a)
                .sum();
            tracing::info!(file = %self.file.path, bytes = kept, "resuming an interrupted download");
            self.keep(kept);
        }
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        for &i in partial.done() {
            let _ = done_tx.send(i);
        }
        let grower = self.growing.start(
            &self.file.hash,
            partial.data_path().to_path_buf(),
            self.file.size,
        );
        let hashing = hash_in_order(partial.clone(), self.file, done_rx, &grower);
        let (job, partial_ref, tx) = (self, &partial, &done_tx);
        let fetching = async move {
            let Some((&first, rest)) = todo.split_first() else {
                return Ok::<(), Failure>(());
            };
            // The first request finds where the bytes are; the others go there directly.
            let permit = job.permit().await;
            let (start, end) = partial_ref.range(first);
            let resp = match job.open(start, end, None).await? {
                Opened::Ranges(r) => r,
                Opened::NoRanges => return Err(Failure::NoRanges),
            };
            let location = resp.url().to_string();
            let location = location.as_str();
            let first_chunk = async move {
                let _permit = permit;
                job.chunk(partial_ref, first, Some(resp), location).await?;
                let _ = tx.send(first);
                Ok::<_, Failure>(())
            };
            let others = futures::stream::iter(rest.iter().copied())
                .map(move |i| async move {
                    let _permit = job.permit().await;
                    job.chunk(partial_ref, i, None, location).await?;
                    let _ = tx.send(i);
                    Ok::<_, Failure>(())
                })
                .buffer_unordered(job.parallel)
                .try_collect::<()>();
            futures::try_join!(first_chunk, others).map(|_| ())
        };
        let result = futures::try_join!(fetching, async { hashing.await.map_err(Failure::Fetch) });
        match result {
            Ok(((), actual)) if actual == self.file.hash => {
                let (store, hash) = (self.store.clone(), self.file.hash.clone());
                let p = partial.clone();
                blocking(move || store.commit_partial(&p, &hash))
                    .await
                    .map_err(FetchError::Store)?;
                grower.done();
                tracing::debug!(file = %self.file.path, bytes = self.file.size, "verified");
                Ok(Outcome::Done)
            }
            Ok(((), actual)) => {
                discard(partial).await;
                Err(FetchError::Integrity {
                    path: self.file.path.to_string(),
                    detail: format!("expected {}, got {}", self.file.hash, actual),
                })
            }
            Err(Failure::NoRanges) => {
                discard(partial).await;
                Ok(Outcome::NoRanges)
            }
            Err(Failure::Fetch(e @ FetchError::Integrity { .. })) => {
                discard(partial).await;
                Err(e)
            }
            // Anything else keeps the written chunks for the next try.
            Err(Failure::Fetch(e)) => Err(e),
        }
    }

    /// Bytes written by an earlier try, kept.
    fn keep(&self, n: u64) {
        self.progress.bytes_done.fetch_add(n, Ordering::Relaxed);
        self.tally.count(n);
    }

    /// Bytes received.
    fn receive(&self, n: u64) {
        self.progress.bytes_done.fetch_add(n, Ordering::Relaxed);
        self.tally.receive(n);
    }

    /// A connection from the budget, counted as held by this try.
    async fn permit(&self) -> (super::budget::Permit<'_>, Open<'_>) {
        let permit = self.connections.acquire().await;
        (permit, self.tally.open())
    }

    /// Asks for bytes `[start, end)` and checks the answer is that range, or a whole file
    /// from a server that ignores `Range`.
    async fn open(&self, start: u64, end: u64, url: Option<&str>) -> Result<Opened, FetchError> {
        let answer = self
            .hub
            .download_range(&self.src, url, start..end, self.file.size)
            .await?;
        Ok(match answer {
            RangeAnswer::Range(d) => Opened::Ranges(d),
            RangeAnswer::Whole => Opened::NoRanges,
        })
    }

    /// Asks for `[start, end)` at the CDN `location`. A presigned location can expire during a
    /// long download; when it is refused, the hub is asked again for a fresh one.
    async fn reopen(&self, start: u64, end: u64, location: &str) -> Result<Opened, FetchError> {
        match self.open(start, end, Some(location)).await {
            Err(FetchError::Hub(HubError::LinkRefused { .. })) => {
                tracing::info!(file = %self.file.path, "the download location was refused; asking the hub for a new one");
                self.open(start, end, None).await
            }
            other => other,
        }
    }

    /// Fetches chunk `i` (from `resp` if the request was already made), continuing after a
    /// dropped connection from the last byte written, and records it in the journal.
    async fn chunk(
        &self,
        partial: &Arc<Partial>,
        i: u64,
        mut resp: Option<Download>,
        location: &str,
    ) -> Result<(), Failure> {
        let (start, end) = partial.range(i);
        let mut at = start;
        let mut backoff = retry_policy().build();
        loop {
            let resp = match resp.take() {
                Some(r) => r,
                None => match self.reopen(at, end, location).await? {
                    Opened::Ranges(r) => r,
                    Opened::NoRanges => {
                        return Err(FetchError::Hub(HubError::Protocol {
                            url: location.to_owned(),
                            reason: "the server stopped honouring Range".into(),
                        })
                        .into());
                    }
                },
            };
            match self.stream(partial, resp, &mut at, end).await {
                Ok(()) => break,
                Err(e @ FetchError::Interrupted { .. }) => match backoff.next() {
                    Some(wait) => {
                        tracing::debug!(file = %self.file.path, chunk = i, at, error = %e, "range interrupted; continuing");
                        tokio::time::sleep(wait).await;
                    }
                    None => return Err(e.into()),
                },
                Err(e) => return Err(e.into()),
            }
        }
        let p = partial.clone();
        blocking(move || p.mark_done(i))
            .await
            .map_err(FetchError::Store)?;
        Ok(())
    }

    /// Writes the body of a range answer at `*at`, advancing it past every byte written.
    async fn stream(
        &self,
        partial: &Arc<Partial>,
        resp: Download,
        at: &mut u64,
        end: u64,
    ) -> Result<(), FetchError> {
        let mut body = std::pin::pin!(resp.bytes());
        let mut buf = Buffer::default();
        let mut flushed = *at;
        let result = loop {
            match body.next().await {
                None => break Ok(()),
                Some(Err(source)) => {
                    break Err(FetchError::Interrupted {
                        path: self.file.path.to_string(),
                        source,
                    });
                }
                Some(Ok(bytes)) => {
                    if flushed + (buf.len + bytes.len()) as u64 > end {
                        break Err(FetchError::Integrity {
                            path: self.file.path.to_string(),
                            detail: format!(
                                "the answer to a range request is longer than the {} bytes asked for",
                                end - *at
                            ),
                        });
                    }
                    self.receive(bytes.len() as u64);
                    buf.push(bytes);
                    if buf.len >= WRITE_BUFFER {
                        flushed = write(partial, &mut buf, flushed).await?;
                    }
                }
            }
        };
        // What arrived before a cut is kept; only the rest is asked for again.
        let flushed = write(partial, &mut buf, flushed).await?;
        *at = flushed;
        result?;
        if flushed != end {
            return Err(FetchError::Integrity {
                path: self.file.path.to_string(),
                detail: format!("a range answer ended {} bytes short", end - flushed),
            });
        }
        Ok(())
    }
}

/// Received bytes not yet written.
#[derive(Default)]
struct Buffer {
    parts: Vec<bytes::Bytes>,
    len: usize,
}

impl Buffer {
    fn push(&mut self, b: bytes::Bytes) {
        self.len += b.len();
        self.parts.push(b);
    }
}

/// Writes `buf` at `at` and empties it; returns the offset after it.
async fn write(partial: &Arc<Partial>, buf: &mut Buffer, at: u64) -> Result<u64, FetchError> {
    if buf.len == 0 {
        return Ok(at);
    }
    let Buffer { parts, len } = std::mem::take(buf);
    let p = partial.clone();
    blocking(move || p.write_at(&parts, at))
        .await
        .map_err(FetchError::Store)?;
    Ok(at + len as u64)
}

/// Hashes the file's chunks in order as their indices arrive on `done`.
async fn hash_in_order(
    partial: Arc<Partial>,
    file: &PlannedFile,
    mut done: mpsc::UnboundedReceiver<u64>,
    grower: &super::Grower,
) -> Result<ContentHash, FetchError> {
    let n = partial.chunks();
    let mut ready = BTreeSet::new();
    let mut next = 0;
    let mut hasher = Hasher::new(file.hash.algo(), file.size);
    while next < n {
        match done.recv().await {
            Some(i) => ready.insert(i),
            // The fetching side stopped; its error is the one reported.
            None => std::future::pending().await,
        };
        let mut run_end = next;
        while ready.remove(&run_end) {
            run_end += 1;
        }
        if run_end == next {
            continue;
        }
        let (from, to) = (partial.range(next).0, partial.range(run_end - 1).1);
        let p = partial.clone();
        hasher = blocking(move || {
            p.hash_range(&mut hasher, from, to)?;
            Ok::<_, StoreError>(hasher)
        })
        .await?;
        next = run_end;
        // Written from the start up to here: peers may read it.
        grower.grow(to);
    }
    Ok(hasher.finish())
}

async fn discard(partial: Arc<Partial>) {
    if let Err(e) = blocking(move || partial.discard()).await {
        tracing::warn!(error = %e, "could not remove a discarded partial download");
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .expect("store tasks do not panic")
}

/// Why the fetching side stopped.
enum Failure {
    /// The first answer showed the server ignores `Range`.
    NoRanges,
    Fetch(FetchError),
}

impl From<FetchError> for Failure {
    fn from(e: FetchError) -> Self {
        Failure::Fetch(e)
    }
}
