//! One blob into the store: the tier walk (the first tier that has the file with the right
//! hash gives it), the import from a shared cache, and the download from the hub.

use super::watchdog::{Stalled, Tally, Watchdog};
use super::{
    FetchError, Fetcher, Misses, PlannedFile, Progress, Source, Tier, TierMiss, budget, import,
    ranged,
};
use crate::store::StoreError;
use backon::BackoffBuilder;
use futures::StreamExt;
use modelcache_core::hash::Hasher;
use modelcache_hub::client::{FileSource, retry_policy};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

impl Fetcher {
    /// Makes the blob `file.hash` present, taking it from the first tier that has it.
    pub(super) async fn fetch_blob(
        &self,
        src: Source<'_>,
        file: &PlannedFile,
        progress: &Arc<Progress>,
    ) -> Result<(), FetchError> {
        // One fetch per blob: a second fetch of the same blob waits here, then finds it.
        let _flight = self.inflight.lock(&file.hash).await;
        if self.store.has_blob(&file.hash) {
            progress.bytes_done.fetch_add(file.size, Ordering::Relaxed);
            progress.files_done.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let order = self.sources.order();
        let mut misses = Vec::new();
        for (i, tier) in order.iter().enumerate() {
            let last = i + 1 == order.len();
            let miss = match tier {
                Tier::SharedCache => self.import_blob(src, file, progress).await?.err(),
                Tier::Peers => {
                    let peers = self
                        .sources
                        .peers()
                        .expect("peers is a tier only with peers");
                    peers
                        .fetch(&self.store, file, progress, src.wave)
                        .await?
                        .err()
                        .map(TierMiss::Peers)
                }
                Tier::Hub => match self.download_blob(src, file, progress).await {
                    Ok(()) => None,
                    Err(e) if last => return Err(e),
                    Err(e) => Some(TierMiss::Hub(Box::new(e))),
                },
            };
            let Some(miss) = miss else {
                progress.files_done.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            };
            if !last {
                tracing::info!(file = %file.path, "{miss}; trying {}", order[i + 1]);
            }
            misses.push(miss);
        }
        Err(FetchError::Unavailable {
            path: file.path.to_string(),
            misses: Misses(misses),
        })
    }

    /// Imports `file` from the shared cache, verified: the blob by its hash (any commit's), or
    /// the commit's snapshot entry. `Ok(Err(miss))` when the cache cannot give it (absent,
    /// refused, or wrong bytes), so the next tier is tried; `Err` when the store fails.
    async fn import_blob(
        &self,
        src: Source<'_>,
        file: &PlannedFile,
        progress: &Arc<Progress>,
    ) -> Result<Result<(), TierMiss>, FetchError> {
        let shared = self
            .sources
            .shared()
            .expect("shared-cache is a tier only with a shared cache")
            .clone();
        let (store, progress, file) = (self.store.clone(), progress.clone(), file.clone());
        let (kind, repo, commit) = (src.kind, src.repo.clone(), src.commit.to_owned());
        tokio::task::spawn_blocking(move || {
            let opened = match shared.open_blob(kind, &repo, &file.hash) {
                Ok(None) => shared.open_snapshot_file(kind, &repo, &commit, &file.path),
                found => found,
            };
            let source = match opened {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(Err(TierMiss::NotInSharedCache)),
                Err(e) => {
                    tracing::warn!(file = %file.path, error = %e, "refused a file of the shared cache");
                    return Ok(Err(TierMiss::SharedCacheRefused(e)));
                }
            };
            let counted = AtomicU64::new(0);
            let added = |n| {
                progress.bytes_done.fetch_add(n, Ordering::Relaxed);
                counted.fetch_add(n, Ordering::Relaxed);
            };
            let res = import::import(&store, &source, &file, &added);
            if res.is_err() {
                progress
                    .bytes_done
                    .fetch_sub(counted.load(Ordering::Relaxed), Ordering::Relaxed);
            }
            match res {
                Ok(()) => {
                    progress
                        .bytes_imported
                        .fetch_add(file.size, Ordering::Relaxed);
                    tracing::debug!(file = %file.path, bytes = file.size, "imported from the shared cache");
                    Ok(Ok(()))
                }
                Err(import::ImportError::Store(e)) => Err(e.into()),
                Err(e) => {
                    tracing::warn!(file = %file.path, error = %e, "the shared cache's copy is not the file wanted");
                    Ok(Err(TierMiss::WrongCopy(e)))
                }
            }
        })
        .await
        .expect("import task does not panic")
    }

    /// Downloads `file` from the hub. A broken connection or a transient hub error is retried
    /// with backoff (a ranged download keeps what it wrote); a mismatch is tried once more,
    /// then fails. Whatever the retries, the download fails once the stall time passes with
    /// nothing moving (see [`Watchdog`]).
    async fn download_blob(
        &self,
        src: Source<'_>,
        file: &PlannedFile,
        progress: &Progress,
    ) -> Result<(), FetchError> {
        let mut backoff = retry_policy().build();
        let mut mismatches = 0;
        let mut watchdog = Watchdog::new(self.tuning.stall);
        loop {
            let tally = Tally::default();
            let attempt = self.download(
                src.file(file, tally.liveness()),
                src.share,
                file,
                progress,
                &tally,
                src.wave.awaited(&file.hash),
            );
            let res = watchdog.watch(attempt, &tally).await;
            progress
                .bytes_done
                .fetch_sub(tally.counted(), Ordering::Relaxed);
            let e = match res {
                Ok(Ok(())) => {
                    progress.bytes_done.fetch_add(file.size, Ordering::Relaxed);
                    progress
                        .bytes_downloaded
                        .fetch_add(file.size, Ordering::Relaxed);
                    return Ok(());
                }
                Ok(Err(e)) => e,
                Err(Stalled) => return Err(self.stalled(file, None)),
            };
            let wait = match &e {
                FetchError::Integrity { .. } => {
                    mismatches += 1;
                    (mismatches < 2).then_some(Duration::ZERO)
                }
                FetchError::Interrupted { .. } => backoff.next(),
                FetchError::Hub(h) if h.is_transient() => backoff.next(),
                _ => None,
            };
            let Some(wait) = wait else {
                return Err(e);
            };
            if watchdog.expired_after(wait) {
                return Err(self.stalled(file, Some(&e)));
            }
            tracing::warn!(file = %file.path, error = %e, retry_in = ?wait, "download failed; retrying");
            tokio::time::sleep(wait).await;
        }
    }

    fn stalled(&self, file: &PlannedFile, last: Option<&FetchError>) -> FetchError {
        FetchError::Stalled {
            path: file.path.to_string(),
            endpoint: self.hub.endpoint().to_owned(),
            after: self.tuning.stall,
            last: last.map(ToString::to_string),
        }
    }

    /// One attempt at a blob; `tally` holds the bytes it added to `progress`. A large file
    /// comes in parallel ranges, unless peers wait for it (`awaited`): then in one stream, in
    /// order, so that they read it as it arrives rather than when its last range lands.
    async fn download(
        &self,
        src: FileSource<'_>,
        share: &budget::Share,
        file: &PlannedFile,
        progress: &Progress,
        tally: &Tally,
        awaited: bool,
    ) -> Result<(), FetchError> {
        if file.size > self.tuning.chunk_size && !awaited {
            let job = ranged::Job {
                hub: &self.hub,
                store: &self.store,
                growing: &self.growing,
                connections: share,
                chunk_size: self.tuning.chunk_size,
                parallel: self.tuning.connections,
                src,
                file,
                progress,
                tally,
            };
            match job.run().await? {
                ranged::Outcome::Done => return Ok(()),
                ranged::Outcome::NoRanges => {
                    tracing::info!(file = %file.path, "the hub does not serve byte ranges; downloading in one stream");
                }
            }
        }
        self.download_stream(src, share, file, progress, tally)
            .await
    }

    /// Downloads a file in one request into staging, hashing as the bytes arrive.
    async fn download_stream(
        &self,
        src: FileSource<'_>,
        share: &budget::Share,
        file: &PlannedFile,
        progress: &Progress,
        tally: &Tally,
    ) -> Result<(), FetchError> {
        let _permit = share.acquire().await;
        let _open = tally.open();
        let resp = self.hub.download(&src).await?;
        let tmp = self.store.staging_file()?;
        let std_file = tmp
            .reopen()
            .map_err(|e| FetchError::Store(StoreError::from_io("reopen", tmp.path(), e)))?;
        let mut out =
            tokio::io::BufWriter::with_capacity(256 << 10, tokio::fs::File::from_std(std_file));
        let mut hasher = Hasher::new(file.hash.algo(), file.size);
        let mut body = std::pin::pin!(resp.bytes());
        let mut got = 0u64;
        // Peers may read it as it grows: what is flushed is told every MiB.
        let grower = self
            .growing
            .start(&file.hash, tmp.path().to_path_buf(), file.size);
        let mut told = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|source| FetchError::Interrupted {
                path: file.path.to_string(),
                source,
            })?;
            got += chunk.len() as u64;
            if got > file.size {
                return Err(FetchError::Integrity {
                    path: file.path.to_string(),
                    detail: format!("body is longer than the {} bytes announced", file.size),
                });
            }
            hasher.update(&chunk);
            out.write_all(&chunk)
                .await
                .map_err(|e| StoreError::from_io("write", tmp.path(), e))?;
            progress
                .bytes_done
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            tally.receive(chunk.len() as u64);
            if got - told >= 1 << 20 {
                out.flush()
                    .await
                    .map_err(|e| StoreError::from_io("write", tmp.path(), e))?;
                grower.grow(got);
                told = got;
            }
        }
        out.flush()
            .await
            .map_err(|e| StoreError::from_io("write", tmp.path(), e))?;
        if got != file.size {
            return Err(FetchError::Integrity {
                path: file.path.to_string(),
                detail: format!("{got} bytes received, {} announced", file.size),
            });
        }
        let actual = hasher.finish();
        if actual != file.hash {
            return Err(FetchError::Integrity {
                path: file.path.to_string(),
                detail: format!("expected {}, got {}", file.hash, actual),
            });
        }
        let store = self.store.clone();
        let hash = file.hash.clone();
        tokio::task::spawn_blocking(move || store.commit_blob(tmp, &hash))
            .await
            .expect("commit task does not panic")?;
        grower.done();
        tracing::debug!(file = %file.path, bytes = got, "verified");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch::Sources;
    use crate::shared_cache::SharedCache;
    use crate::store::Store;
    use modelcache_core::filter::FileFilter;
    use modelcache_core::hash::{Algo, ContentHash};
    use modelcache_core::repo::{RepoId, RepoKind};
    use modelcache_hub::HubClient;
    use modelcache_hub::served::ServedRepos;
    use modelcache_hub::server::{Hub, LocalHub};

    fn git_sha1(bytes: &[u8]) -> ContentHash {
        let mut h = Hasher::new(Algo::GitSha1, bytes.len() as u64);
        h.update(bytes);
        h.finish()
    }

    const FILES: [(&str, &[u8]); 3] = [
        ("config.json", b"{\"a\":1}"),
        ("tok.json", b"{\"t\":2}"),
        ("other.json", b"{\"o\":4}"),
    ];

    /// The tier walk with `shared-cache,hub`: each file comes from the first tier that has it with the
    /// right hash. The shared cache gives what it holds whole (config.json); its wrong copy
    /// (tok.json) and what it lacks (other.json) come from the hub.
    #[tokio::test(flavor = "multi_thread")]
    async fn each_file_comes_from_the_first_tier_that_has_it_right() {
        let dir = tempfile::tempdir().unwrap();
        let served = dir.path().join("hub/models/org/m");
        std::fs::create_dir_all(&served).unwrap();
        for (name, bytes) in FILES {
            std::fs::write(served.join(name), bytes).unwrap();
        }
        // The shared cache, as huggingface_hub lays it out: blobs by git hash.
        let blobs = dir.path().join("shared/models--org--m/blobs");
        std::fs::create_dir_all(&blobs).unwrap();
        std::fs::write(blobs.join(git_sha1(FILES[0].1).hex()), FILES[0].1).unwrap();
        std::fs::write(blobs.join(git_sha1(FILES[1].1).hex()), b"{\"t\":3}").unwrap();

        let hub = LocalHub::start(Hub {
            repos: ServedRepos::load(&dir.path().join("hub")).unwrap(),
            ..Default::default()
        })
        .await
        .unwrap();
        let store = Arc::new(Store::open(dir.path().join("store")).unwrap());
        let shared = SharedCache::open(&dir.path().join("shared")).unwrap();
        let sources = Sources::new(vec![Tier::SharedCache, Tier::Hub], Some(shared)).unwrap();
        let fetcher = Fetcher::new(
            HubClient::new(&hub.endpoint, &[]).unwrap(),
            store,
            Default::default(),
        )
        .with_sources(sources);

        let progress = Arc::new(Progress::default());
        let snap = fetch_all(&fetcher, &progress).await.unwrap();
        for (name, bytes) in FILES {
            assert_eq!(
                std::fs::read(snap.path.join(name)).unwrap(),
                bytes,
                "{name}"
            );
        }
        let view = progress.view();
        assert_eq!(view.bytes_imported, FILES[0].1.len() as u64, "{view:?}");
        assert_eq!(
            view.bytes_downloaded,
            (FILES[1].1.len() + FILES[2].1.len()) as u64,
            "{view:?}"
        );
    }

    /// A hub serving `files` (name, size) of `org/m` with `plan`'s faults, and a fetcher of it
    /// with a stall time of `stall` and 1 MiB ranges.
    async fn faulty_hub(
        dir: &std::path::Path,
        files: &[(&str, usize)],
        plan: modelcache_hub::faults::FaultPlan,
        stall: Duration,
    ) -> (LocalHub, Fetcher) {
        let served = dir.join("hub/models/org/m");
        std::fs::create_dir_all(&served).unwrap();
        for &(name, size) in files {
            let bytes: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
            std::fs::write(served.join(name), bytes).unwrap();
        }
        let hub = LocalHub::start(Hub {
            repos: ServedRepos::load(&dir.join("hub")).unwrap(),
            faults: modelcache_hub::faults::Faults::new(plan),
            ..Default::default()
        })
        .await
        .unwrap();
        let tuning = crate::fetch::Tuning {
            chunk_size: 1 << 20,
            stall,
            ..Default::default()
        };
        let store = Arc::new(Store::open(dir.join("store")).unwrap());
        let fetcher = Fetcher::new(HubClient::new(&hub.endpoint, &[]).unwrap(), store, tuning);
        (hub, fetcher)
    }

    /// Resolves `org/m`'s main and fetches all its files.
    async fn fetch_all(
        fetcher: &Fetcher,
        progress: &Arc<Progress>,
    ) -> Result<crate::store::Snapshot, FetchError> {
        let model = modelcache_core::repo::ModelRef {
            kind: RepoKind::Model,
            repo: RepoId::parse("org/m").unwrap(),
            revision: modelcache_core::repo::Revision::main(),
        };
        let commit = fetcher.resolve(&model, None).await?.commit;
        fetcher
            .fetch(
                RepoKind::Model,
                &model.repo,
                &commit,
                &FileFilter::default(),
                None,
                progress,
            )
            .await
    }

    /// A hub that sends half a file and then hangs, connection open: the file fails within
    /// about the stall time, whether it came in one stream or in ranges, where the retries'
    /// timeouts alone took minutes.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_hub_that_hangs_mid_body_fails_within_the_stall_time() {
        let stall = Duration::from_secs(1);
        for (name, size) in [("small.bin", 400 << 10), ("large.bin", 3 << 20)] {
            let dir = tempfile::tempdir().unwrap();
            let plan = modelcache_hub::faults::FaultPlan {
                stalls: 1.0,
                ..Default::default()
            };
            let (hub, fetcher) = faulty_hub(dir.path(), &[(name, size)], plan, stall).await;
            let started = std::time::Instant::now();
            let progress = Arc::new(Progress::default());
            let res = tokio::time::timeout(Duration::from_secs(60), fetch_all(&fetcher, &progress))
                .await
                .unwrap_or_else(|_| panic!("{name}: still downloading after 60 s"));
            let took = started.elapsed();
            let e = res.expect_err(name);
            assert!(matches!(e, FetchError::Stalled { .. }), "{name}: {e}");
            let msg = e.to_string();
            assert!(
                msg.contains(&hub.endpoint) && msg.contains("in 1s") && msg.contains("HTTPS_PROXY"),
                "{msg}"
            );
            assert!(took < stall * 6, "{name}: failed after {took:?}");
            assert!(hub.hub.faults.injected().stalls >= 1);
            // The failed try took back the bytes it had counted.
            assert_eq!(progress.view().bytes_done, 0, "{name}");
        }
    }

    /// A slow hub that keeps sending is not a stall, however long the file takes.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_slow_hub_that_keeps_sending_is_not_stalled() {
        let dir = tempfile::tempdir().unwrap();
        let plan = modelcache_hub::faults::FaultPlan {
            max_bytes_per_second: std::num::NonZeroU64::new(256 << 10),
            ..Default::default()
        };
        let files = [("small.bin", 600 << 10), ("large.bin", 3 << 19)];
        let stall = Duration::from_secs(1);
        let (_hub, fetcher) = faulty_hub(dir.path(), &files, plan, stall).await;
        let started = std::time::Instant::now();
        let progress = Arc::new(Progress::default());
        fetch_all(&fetcher, &progress).await.unwrap();
        assert_eq!(progress.view().bytes_done, (600 << 10) + (3 << 19));
        assert!(started.elapsed() > stall * 2, "{:?}", started.elapsed());
    }
}
