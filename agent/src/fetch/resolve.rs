//! Which commit a revision names, whether a volume's token may read it, and which files it
//! holds: asked of the hub under the freshness rules of [`super::freshness`] (a warm publish
//! does not wait for the hub; a restricted repo needs the token's access granted within the
//! access TTL), with the outage policy (a public repo falls back to what this node or the shared
//! cache last saw; a restricted one only for a recent grant), or of the shared cache alone.

use super::freshness::{Answers, RevisionAnswer};
use super::{FetchError, Fetcher, PlannedFile, Tier, plan};
use crate::store::SnapshotKey;
use modelcache_core::filter::FileFilter;
use modelcache_core::repo::{Commit, ModelRef, RepoId, RepoKind};
use modelcache_hub::HubError;
use modelcache_hub::client::{Resolved, Token};
use std::time::{Instant, SystemTime};
use tracing::Instrument;

/// The commit a revision was served at, and how fresh the answer was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// The commit.
    pub commit: Commit,
    /// How it was known.
    pub freshness: Freshness,
}

/// How fresh a [`Resolution`] is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Freshness {
    /// The hub said so within the revision TTL (or just now), or the revision is a commit.
    Fresh,
    /// The revision TTL had passed: served as last resolved, and asked again in the background.
    Revalidating,
    /// The hub could not be asked: the commit the revision last resolved to on this node.
    Outage {
        /// When the hub last said so, if known.
        resolved: Option<SystemTime>,
        /// Why the hub could not be asked.
        error: String,
    },
}

impl Resolution {
    fn fresh(commit: Commit) -> Self {
        Resolution {
            commit,
            freshness: Freshness::Fresh,
        }
    }
}

impl Fetcher {
    /// The commit a volume of `model` (the files `filter` takes) is served at. When the node
    /// holds that snapshot at the commit the revision last resolved to, the hub is not waited
    /// for: past the revision TTL the commit is served and asked again in the background
    /// (stale-while-revalidate), and during an outage the last commit is served, as
    /// huggingface_hub does offline. A restricted repo first needs the token's access,
    /// granted by the hub within the access TTL. Otherwise, as [`Fetcher::resolve`].
    pub async fn resolve_for_volume(
        &self,
        model: &ModelRef,
        filter: &FileFilter,
        token: Option<&Token>,
    ) -> Result<Resolution, FetchError> {
        if !self.sources.uses_hub() {
            return self.resolve_in_shared_cache(model).map(Resolution::fresh);
        }
        let (kind, repo) = (model.kind, &model.repo);
        if self.store.is_restricted(kind, repo) {
            self.check_access(kind, repo, token).await?;
        }
        let recorded = || self.store.read_ref_at(kind, repo, &model.revision);
        if let Some(known) = self.answers.known(model, recorded, Instant::now()) {
            let key = SnapshotKey {
                kind,
                repo: repo.clone(),
                commit: known.commit.clone(),
                filter: filter.key(),
            };
            if self.store.snapshot(&key).is_some() {
                if known.expired {
                    self.revalidate(model, token);
                }
                let freshness = match known.outage {
                    Some(error) => Freshness::Outage {
                        resolved: known.resolved,
                        error,
                    },
                    None if known.expired => Freshness::Revalidating,
                    None => Freshness::Fresh,
                };
                match freshness {
                    Freshness::Outage { .. } => self.answers.counters.stale("outage"),
                    Freshness::Revalidating => self.answers.counters.stale("expired"),
                    Freshness::Fresh => {}
                }
                return Ok(Resolution {
                    commit: known.commit,
                    freshness,
                });
            }
        }
        self.resolve(model, token).await
    }

    /// The commit `model.revision` points to now, asked of the hub (or taken from its answer
    /// within the revision TTL), with the token's access checked when the repo is restricted.
    /// When the hub cannot be reached (network error, 5xx after retries), the commit the
    /// revision last resolved to on this node (or in the shared cache) is used, for a
    /// restricted repo only with a grant of the token's access still within its TTL.
    pub async fn resolve(
        &self,
        model: &ModelRef,
        token: Option<&Token>,
    ) -> Result<Resolution, FetchError> {
        if !self.sources.uses_hub() {
            return self.resolve_in_shared_cache(model).map(Resolution::fresh);
        }
        let (kind, repo) = (model.kind, &model.repo);
        if let Some(commit) = self.answers.fresh(model, Instant::now()) {
            if self.store.is_restricted(kind, repo) {
                self.check_access(kind, repo, token).await?;
            }
            return Ok(Resolution::fresh(commit));
        }
        let e = match self.ask_revision(model, token).await {
            Ok(resolved) => {
                if resolved.restricted {
                    self.check_access(kind, repo, token).await?;
                }
                return Ok(Resolution::fresh(resolved.commit));
            }
            Err(e) if e.is_transient() => e,
            Err(e) => return Err(e.into()),
        };
        if self.store.is_restricted(kind, repo)
            && !matches!(
                self.answers.access(kind, repo, token, Instant::now()),
                Some(Ok(()))
            )
        {
            return Err(FetchError::AccessUnverifiable {
                repo: repo.to_string(),
                source: e,
            });
        }
        let known = if let Ok(c) = Commit::parse(model.revision.as_str()) {
            Some((c, None, "the commit asked for"))
        } else if let Some((c, at)) = self.store.read_ref_at(kind, repo, &model.revision) {
            Some((
                c,
                Some(at),
                "the commit this revision last resolved to on this node",
            ))
        } else {
            self.shared_ref(model)
                .map(|c| (c, None, "the shared cache's ref"))
        };
        let Some((commit, resolved, why)) = known else {
            return Err(e.into());
        };
        tracing::warn!(error = %e, model.commit = %commit, "hub unreachable; using {why}");
        self.answers.counters.stale("outage");
        Ok(Resolution {
            commit,
            freshness: Freshness::Outage {
                resolved,
                error: e.to_string(),
            },
        })
    }

    /// Asks the hub about `model.revision` in the background, unless it was asked within the
    /// TTL. A public repo's revision is the same for everyone, so it is asked with no token:
    /// a repo that turned gated or private is seen as such. A restricted one is asked with the
    /// token whose access was just granted.
    fn revalidate(&self, model: &ModelRef, token: Option<&Token>) {
        if !self.answers.start_revalidation(model, Instant::now()) {
            return;
        }
        let token = token
            .filter(|_| self.store.is_restricted(model.kind, &model.repo))
            .cloned();
        let (me, model) = (self.clone(), model.clone());
        let span = tracing::info_span!(
            "revalidate",
            model.repo = %model.repo,
            model.revision = %model.revision
        );
        tokio::spawn(
            async move {
                match me.ask_revision(&model, token.as_ref()).await {
                    Ok(r) => tracing::debug!(model.commit = %r.commit, "revalidated"),
                    Err(e) => tracing::warn!(error = %e, "cannot revalidate the revision; serving what the node has"),
                }
            }
            .instrument(span),
        );
    }

    /// One request for `model.revision` however many ask at once, its answer recorded. A
    /// caller whose token differs from the one the shared request was made with, and that got a
    /// refusal, asks again with its own: a refusal of one token says nothing of another.
    async fn ask_revision(
        &self,
        model: &ModelRef,
        token: Option<&Token>,
    ) -> Result<Resolved, HubError> {
        let mine = token.map(Token::fingerprint);
        let key = (model.kind, model.repo.clone(), model.revision.clone());
        let (shared, _) = self.answers.revision_flights.join_or_start(key, || {
            let (me, model, token) = (self.clone(), model.clone(), token.cloned());
            async move { me.ask_revision_once(&model, token.as_ref()).await }
        });
        let answer = shared.await;
        match answer.result {
            Err(HubError::Unauthorized { .. } | HubError::RepoNotFound { .. })
                if answer.asked_with != mine =>
            {
                self.ask_revision_once(model, token).await.result
            }
            result => result,
        }
    }

    /// Asks the hub about `model.revision` and records the answer.
    async fn ask_revision_once(&self, model: &ModelRef, token: Option<&Token>) -> RevisionAnswer {
        self.answers.counters.request("revision");
        let result = self.hub.resolve_revision(model, token).await;
        self.record_revision(model, &result, token.is_none());
        RevisionAnswer {
            result,
            asked_with: token.map(Token::fingerprint),
        }
    }

    /// Keeps the hub's answer on a revision: the commit and whether the repo is restricted, in
    /// the store (for restarts, `ls` and outages) and in memory. A refusal of a public repo, or
    /// an answer that it became restricted, makes every volume prove its access again.
    fn record_revision(
        &self,
        model: &ModelRef,
        result: &Result<Resolved, HubError>,
        anonymous: bool,
    ) {
        let (kind, repo, now) = (model.kind, &model.repo, Instant::now());
        match result {
            Ok(r) => {
                let was = self.store.is_restricted(kind, repo);
                if let Err(e) = self.store.set_restricted(kind, repo, r.restricted) {
                    tracing::warn!(error = %e, "cannot record whether the repo is restricted");
                    if r.restricted {
                        // Not served from memory until it is recorded (fail closed).
                        self.answers.forget(model);
                        return;
                    }
                }
                if r.restricted && !was {
                    self.answers.forget_access(kind, repo);
                }
                if let Err(e) = self.store.write_ref(kind, repo, &model.revision, &r.commit) {
                    tracing::warn!(error = %e, "cannot record the revision's commit");
                }
                self.answers.resolved(model, &r.commit, now);
            }
            Err(HubError::Unauthorized { .. } | HubError::RepoNotFound { .. }) => {
                if anonymous && let Err(e) = self.store.set_restricted(kind, repo, true) {
                    tracing::warn!(error = %e, "cannot record that the repo is restricted");
                }
                self.answers.forget(model);
            }
            Err(HubError::RevisionNotFound { .. }) => self.answers.forget(model),
            Err(e) => self.answers.unreachable(model, e, now),
        }
    }

    /// Whether `token` may read the restricted `repo`: the hub's answer within the access TTL,
    /// else asked (one request per repo and token however many ask). An outage refuses a
    /// token with no grant in the TTL, retryably.
    async fn check_access(
        &self,
        kind: RepoKind,
        repo: &RepoId,
        token: Option<&Token>,
    ) -> Result<(), FetchError> {
        let answer = match self.answers.access(kind, repo, token, Instant::now()) {
            Some(answer) => answer,
            None => {
                let key = Answers::access_key(kind, repo, token);
                let (shared, _) = self.answers.access_flights.join_or_start(key, || {
                    let (me, repo, token) = (self.clone(), repo.clone(), token.cloned());
                    async move {
                        me.answers.counters.request("access");
                        let answer = me.hub.check_access(kind, &repo, token.as_ref()).await;
                        me.answers.record_access(
                            kind,
                            &repo,
                            token.as_ref(),
                            &answer,
                            Instant::now(),
                        );
                        answer
                    }
                });
                shared.await
            }
        };
        match answer {
            Ok(()) => Ok(()),
            Err(e) if e.is_transient() => Err(FetchError::AccessUnverifiable {
                repo: repo.to_string(),
                source: e,
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// The shared cache's ref for `model.revision`, when there is a shared cache and it has one;
    /// a fallback, so a cache that cannot be read is logged and counts as no answer.
    pub(super) fn shared_ref(&self, model: &ModelRef) -> Option<Commit> {
        let shared = self.sources.shared()?;
        shared
            .read_ref(model.kind, &model.repo, &model.revision)
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot read the shared cache's ref");
                None
            })
    }

    /// Without a hub: the commit the shared cache's `refs/<revision>` names (or the commit asked
    /// for, when the cache holds its snapshot).
    fn resolve_in_shared_cache(&self, model: &ModelRef) -> Result<Commit, FetchError> {
        let shared = self
            .sources
            .shared()
            .expect("without the hub, the shared cache is the tier");
        let (kind, repo) = (model.kind, &model.repo);
        match shared.read_ref(kind, repo, &model.revision)? {
            Some(commit) => {
                self.store.write_ref(kind, repo, &model.revision, &commit)?;
                Ok(commit)
            }
            None => Err(FetchError::NotInSharedCache {
                repo: repo.to_string(),
                revision: model.revision.to_string(),
                what: if model.revision.is_commit() {
                    format!("snapshot {}", model.revision)
                } else {
                    format!("refs/{}", model.revision)
                },
                cache: shared.root().display().to_string(),
            }),
        }
    }

    /// The files of `repo` at `commit`, and the tier that listed them: the hub's tree when the
    /// hub is a tier (the shared cache's snapshot while the hub is unreachable), else the shared
    /// cache's snapshot.
    pub(super) async fn list_files(
        &self,
        kind: RepoKind,
        repo: &RepoId,
        commit: &Commit,
        token: Option<&Token>,
    ) -> Result<(Vec<PlannedFile>, Tier), FetchError> {
        if self.sources.uses_hub() {
            self.answers.counters.request("tree");
            let e = match self.hub.list_tree(kind, repo, commit, token).await {
                Ok(tree) => return Ok((plan(repo, commit, &tree)?, Tier::Hub)),
                Err(e) => e,
            };
            if !e.is_transient() {
                return Err(e.into());
            }
            return match self.shared_listing(kind, repo, commit) {
                Ok(Some(files)) => {
                    tracing::warn!(error = %e, "hub unreachable; taking the file list from the shared cache");
                    Ok((files, Tier::SharedCache))
                }
                Ok(None) => Err(e.into()),
                Err(shared) => {
                    tracing::warn!(error = %shared, "cannot list the snapshot in the shared cache");
                    Err(e.into())
                }
            };
        }
        match self.shared_listing(kind, repo, commit)? {
            Some(files) => Ok((files, Tier::SharedCache)),
            None => Err(FetchError::NotInSharedCache {
                repo: repo.to_string(),
                revision: commit.to_string(),
                what: format!("snapshot {commit}"),
                cache: self
                    .sources
                    .shared()
                    .map(|s| s.root().display().to_string())
                    .unwrap_or_default(),
            }),
        }
    }

    /// The shared cache's snapshot of `commit` as files to fetch; None without one.
    fn shared_listing(
        &self,
        kind: RepoKind,
        repo: &RepoId,
        commit: &Commit,
    ) -> Result<Option<Vec<PlannedFile>>, FetchError> {
        let Some(shared) = self.sources.shared() else {
            return Ok(None);
        };
        let files = shared.list_snapshot(kind, repo, commit)?.map(|files| {
            files
                .into_iter()
                .map(|f| PlannedFile {
                    path: f.path,
                    hash: f.hash,
                    size: f.size,
                })
                .collect()
        });
        Ok(files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch::{Progress, Ttls};
    use crate::store::Store;
    use modelcache_core::repo::Revision;
    use modelcache_hub::HubClient;
    use modelcache_hub::faults::{FaultPlan, Faults};
    use modelcache_hub::served::ServedRepos;
    use modelcache_hub::server::{Hub, LocalHub};
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    fn model(repo: &str, revision: &str) -> ModelRef {
        ModelRef {
            kind: RepoKind::Model,
            repo: RepoId::parse(repo).unwrap(),
            revision: Revision::parse(revision).unwrap(),
        }
    }

    /// `org/public` and `org/gated` (readable with `hf_t`) under `root`, each one small file.
    fn write_repos(root: &Path) {
        for name in ["public", "gated"] {
            let repo = root.join("models/org").join(name);
            std::fs::create_dir_all(&repo).unwrap();
            std::fs::write(repo.join("config.json"), name).unwrap();
        }
    }

    /// The hub serving `root`, answering each request after `latency`, with `gated` and
    /// `private` repos that `hf_t` may read.
    fn hub(root: &Path, latency: Duration, gated: &[&str], private: &[&str]) -> Hub {
        let readers = |repos: &[&str]| {
            repos
                .iter()
                .map(|r| (RepoId::parse(r).unwrap(), vec!["hf_t".to_owned()]))
                .collect()
        };
        Hub {
            repos: ServedRepos::load(root).unwrap(),
            gated: readers(gated),
            private: readers(private),
            faults: Faults::new(FaultPlan {
                latency,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// `org/public` and `org/gated` served by a hub as [`hub`] says, and a fetcher of it into
    /// a fresh store, trusting answers for these TTLs.
    struct Setup {
        /// Holds the hub's repos and the store: bind it for the test's length.
        _dir: tempfile::TempDir,
        root: std::path::PathBuf,
        hub: LocalHub,
        f: Fetcher,
    }

    async fn setup(
        latency: Duration,
        gated: &[&str],
        private: &[&str],
        revision: Duration,
        access: Duration,
    ) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("hub");
        write_repos(&root);
        let hub = LocalHub::start(hub(&root, latency, gated, private))
            .await
            .unwrap();
        let client = HubClient::new(&hub.endpoint, &[])
            .unwrap()
            .with_api_deadline(Duration::from_secs(5));
        let store = Arc::new(Store::open(dir.path().join("store")).unwrap());
        let f =
            Fetcher::new(client, store, Default::default()).with_ttls(Ttls { revision, access });
        Setup {
            _dir: dir,
            root,
            hub,
            f,
        }
    }

    fn requests(hub: &LocalHub, purpose: &str) -> u64 {
        hub.hub.requests.counts().get(purpose).copied().unwrap_or(0)
    }

    /// A volume's publish: its resolution, its snapshot fetched when missing.
    async fn publish(
        f: &Fetcher,
        m: &ModelRef,
        token: Option<&Token>,
    ) -> Result<Resolution, FetchError> {
        let all = FileFilter::default();
        let r = f.resolve_for_volume(m, &all, token).await?;
        f.fetch(
            m.kind,
            &m.repo,
            &r.commit,
            &all,
            token,
            &Arc::new(Progress::default()),
        )
        .await?;
        Ok(r)
    }

    /// Publishes until `done` says yes, at most 40 times over about 20 s.
    async fn publish_until(
        f: &Fetcher,
        m: &ModelRef,
        token: Option<&Token>,
        done: impl Fn(&Result<Resolution, FetchError>) -> bool,
    ) -> Result<Resolution, FetchError> {
        for _ in 0..40 {
            let r = publish(f, m, token).await;
            if done(&r) {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!("the publishes never got there");
    }

    /// The outage policy of a publish that must ask the hub (nothing cached): a public repo
    /// falls back to what this node last resolved, a commit stands for itself, an unknown
    /// revision fails, and a gated repo is refused because access cannot be checked.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_hub_outage_falls_back_only_where_access_is_not_in_question() {
        let zero = Duration::ZERO;
        let Setup {
            _dir,
            mut hub,
            f: fetcher,
            ..
        } = setup(zero, &["org/gated"], &[], zero, zero).await;
        let token = Token::new("hf_t");

        let public = fetcher
            .resolve(&model("org/public", "main"), None)
            .await
            .unwrap();
        assert_eq!(public.freshness, Freshness::Fresh);
        let gated = fetcher
            .resolve(&model("org/gated", "main"), token.as_ref())
            .await
            .unwrap();
        assert_ne!(public.commit, gated.commit);

        hub.stop().await.unwrap();

        let down = fetcher
            .resolve(&model("org/public", "main"), None)
            .await
            .unwrap();
        assert_eq!(
            down.commit, public.commit,
            "the last commit of main on this node"
        );
        assert!(
            matches!(
                down.freshness,
                Freshness::Outage {
                    resolved: Some(_),
                    ..
                }
            ),
            "{down:?}"
        );
        let commit = "c".repeat(40);
        let pinned = fetcher.resolve(&model("org/public", &commit), None).await;
        assert_eq!(
            pinned.unwrap().commit,
            commit.as_str(),
            "a commit stands for itself"
        );
        let unknown = fetcher.resolve(&model("org/public", "v2"), None).await;
        assert!(
            matches!(unknown, Err(FetchError::Hub(ref e)) if e.is_transient()),
            "{unknown:?}"
        );
        let refused = fetcher
            .resolve(&model("org/gated", "main"), token.as_ref())
            .await;
        assert!(
            matches!(refused, Err(FetchError::AccessUnverifiable { .. })),
            "a gated repo is not served on an old answer: {refused:?}"
        );
    }

    /// Past the revision TTL, a publish whose snapshot is on the node gets the commit the node
    /// has at once, while one request in the background asks the hub (slow here: 1 s); the
    /// answer, a new commit, serves the publishes after it.
    #[tokio::test(flavor = "multi_thread")]
    async fn past_the_ttl_a_warm_publish_is_served_and_the_revision_revalidated_in_the_background()
    {
        let (latency, ttl) = (Duration::from_secs(1), Duration::from_secs(4));
        let Setup {
            _dir,
            root,
            mut hub,
            f,
            ..
        } = setup(latency, &[], &[], ttl, Duration::ZERO).await;
        let main = model("org/public", "main");

        let first = publish(&f, &main, None).await.unwrap();
        let asked = requests(&hub, "revision");
        assert_eq!(asked, 1);
        // Within the TTL: the hub is not asked, whatever the token.
        let again = publish(&f, &main, Token::new("hf_new").as_ref())
            .await
            .unwrap();
        assert_eq!(again, first);
        assert_eq!(requests(&hub, "revision"), asked);

        // `main` moves at the hub; the node learns it once the TTL has passed.
        std::fs::write(root.join("models/org/public/config.json"), "moved").unwrap();
        hub.restart(self::hub(&root, latency, &[], &[]))
            .await
            .unwrap();
        let asked = requests(&hub, "revision");
        tokio::time::sleep(ttl).await;
        // Eight pods at once, each with a token of its own.
        let tokens: Vec<Option<Token>> = (0..8).map(|i| Token::new(format!("hf_{i}"))).collect();
        let stale =
            futures::future::join_all(tokens.iter().map(|t| publish(&f, &main, t.as_ref())));
        let stale: Vec<_> = stale.await.into_iter().map(Result::unwrap).collect();
        // Served before the hub answered: the request is still in the hub's latency.
        assert_eq!(
            requests(&hub, "revision"),
            asked,
            "nothing waited for the hub"
        );
        for s in &stale {
            assert_eq!(s.commit, first.commit);
            assert_eq!(s.freshness, Freshness::Revalidating);
        }
        let moved = publish_until(&f, &main, None, |r| {
            r.as_ref().is_ok_and(|r| r.commit != first.commit)
        })
        .await
        .unwrap();
        assert_eq!(moved.freshness, Freshness::Fresh);
        assert_eq!(
            requests(&hub, "revision"),
            asked + 1,
            "eight stale publishes, one revalidation"
        );
        let seen = f
            .store
            .read_ref_at(RepoKind::Model, &main.repo, &main.revision);
        assert_eq!(seen.map(|(c, _)| c), Some(moved.commit));
    }

    /// However many publishes ask at once, the hub gets one revision request per (repo,
    /// revision) and one access check per (repo, token); a refusal of one token is not given
    /// to another.
    #[tokio::test(flavor = "multi_thread")]
    async fn concurrent_publishes_share_one_request_per_question() {
        let (latency, minute) = (Duration::from_millis(300), Duration::from_secs(60));
        let Setup { _dir, hub, f, .. } = setup(latency, &["org/gated"], &[], minute, minute).await;
        let all = FileFilter::default();

        let public = model("org/public", "main");
        let asks = (0..16).map(|_| f.resolve_for_volume(&public, &all, None));
        let commits: Vec<_> = futures::future::join_all(asks).await;
        assert!(
            commits
                .iter()
                .all(|c| c.as_ref().unwrap().commit == commits[0].as_ref().unwrap().commit)
        );
        assert_eq!(requests(&hub, "revision"), 1);

        let gated = model("org/gated", "main");
        let (good, bad) = (Token::new("hf_t"), Token::new("hf_bad"));
        let asks = (0..16).map(|i| {
            let t = if i % 2 == 0 {
                good.as_ref()
            } else {
                bad.as_ref()
            };
            f.resolve_for_volume(&gated, &all, t)
        });
        let answers = futures::future::join_all(asks).await;
        for (i, a) in answers.iter().enumerate() {
            if i % 2 == 0 {
                assert!(a.is_ok(), "{a:?}");
            } else {
                assert!(
                    matches!(a, Err(FetchError::Hub(HubError::Unauthorized { .. }))),
                    "{a:?}"
                );
            }
        }
        assert_eq!(requests(&hub, "revision"), 2);
        assert_eq!(requests(&hub, "auth-check"), 2, "one per token");
        // Both answers are kept: later publishes do not ask.
        f.resolve_for_volume(&gated, &all, good.as_ref())
            .await
            .unwrap();
        f.resolve_for_volume(&gated, &all, bad.as_ref())
            .await
            .unwrap_err();
        assert_eq!(requests(&hub, "auth-check"), 2);
    }

    /// During an outage a public repo's volumes get the commit the node last resolved, saying
    /// so; a restricted repo's volumes get it only with a grant of their token's access still
    /// within its TTL, others are refused retryably.
    #[tokio::test(flavor = "multi_thread")]
    async fn an_outage_serves_what_the_node_holds_to_those_who_may_read_it() {
        let (ttl, minute) = (Duration::from_secs(1), Duration::from_secs(60));
        let Setup {
            _dir, mut hub, f, ..
        } = setup(Duration::ZERO, &["org/gated"], &[], ttl, minute).await;
        let (public, gated) = (model("org/public", "main"), model("org/gated", "main"));
        let token = Token::new("hf_t");
        let held = publish(&f, &public, None).await.unwrap().commit;
        let held_gated = publish(&f, &gated, token.as_ref()).await.unwrap().commit;
        hub.stop().await.unwrap();
        tokio::time::sleep(ttl).await;

        let first = publish(&f, &public, None).await.unwrap();
        assert_eq!(
            (first.commit, first.freshness),
            (held.clone(), Freshness::Revalidating)
        );
        // Once the background request has failed, publishes say the hub is out.
        let out = publish_until(&f, &public, None, |r| {
            matches!(
                r,
                Ok(Resolution {
                    freshness: Freshness::Outage { .. },
                    ..
                })
            )
        })
        .await
        .unwrap();
        assert_eq!(out.commit, held);
        let Freshness::Outage { resolved, error } = out.freshness else {
            unreachable!()
        };
        assert!(resolved.is_some());
        assert!(error.contains("cannot reach the hub"), "{error}");

        let granted = publish(&f, &gated, token.as_ref()).await.unwrap();
        assert_eq!(granted.commit, held_gated, "a recent grant stands");
        for other in [None, Token::new("hf_other")] {
            let refused = publish(&f, &gated, other.as_ref()).await;
            assert!(
                matches!(refused, Err(FetchError::AccessUnverifiable { .. })),
                "{refused:?}"
            );
        }
    }

    /// A public repo that turns gated is noticed at the next revalidation: from then on a
    /// volume needs a token with access, although the node holds the files.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_repo_that_turns_gated_is_refused_from_the_next_revalidation() {
        let (ttl, minute) = (Duration::from_secs(1), Duration::from_secs(60));
        let Setup {
            _dir,
            root,
            mut hub,
            f,
            ..
        } = setup(Duration::ZERO, &[], &[], ttl, minute).await;
        let public = model("org/public", "main");
        publish(&f, &public, None).await.unwrap();

        hub.restart(self::hub(&root, Duration::ZERO, &["org/public"], &[]))
            .await
            .unwrap();
        tokio::time::sleep(ttl).await;
        let refused = publish_until(&f, &public, None, Result::is_err).await;
        assert!(
            matches!(refused, Err(FetchError::Hub(HubError::Unauthorized { .. }))),
            "{refused:?}"
        );
        assert!(f.store.is_restricted(RepoKind::Model, &public.repo));
        let other = publish(&f, &public, Token::new("hf_other").as_ref()).await;
        assert!(other.is_err(), "{other:?}");
        publish(&f, &public, Token::new("hf_t").as_ref())
            .await
            .unwrap();
    }

    /// A private repo's revision depends on who asks: when the shared request was made with a
    /// token that cannot see it, a caller with one that can asks with its own.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_refusal_of_one_token_is_not_given_to_another() {
        let (latency, minute) = (Duration::from_millis(300), Duration::from_secs(60));
        let Setup { _dir, hub, f, .. } = setup(latency, &[], &["org/public"], minute, minute).await;
        let private = model("org/public", "main");
        let all = FileFilter::default();
        let (bad, good) = (Token::new("hf_bad"), Token::new("hf_t"));
        // The token that cannot see the repo asks first; the other joins its request.
        let (refused, granted) =
            tokio::join!(f.resolve_for_volume(&private, &all, bad.as_ref()), async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                f.resolve_for_volume(&private, &all, good.as_ref()).await
            });
        assert!(
            matches!(refused, Err(FetchError::Hub(HubError::RepoNotFound { .. }))),
            "{refused:?}"
        );
        granted.unwrap();
        assert_eq!(
            requests(&hub, "revision"),
            2,
            "the shared one, then its own"
        );
        assert!(f.store.is_restricted(RepoKind::Model, &private.repo));
    }
}
