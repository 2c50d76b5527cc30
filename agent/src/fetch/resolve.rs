//! Which commit a revision names and which files it holds: asked of the hub, with the outage
//! policy (a public repo falls back to what this node or the shared cache last saw; a gated one
//! is refused), or of the shared cache alone.

use super::{FetchError, Fetcher, PlannedFile, Tier, plan};
use modelcache_core::repo::{Commit, ModelRef, RepoId, RepoKind};
use modelcache_hub::client::Token;
use std::time::Instant;

impl Fetcher {
    /// The commit `model.revision` points to now, asked of the hub with `token` (which also
    /// checks that the token may read the repo), or taken from a recent answer to the same
    /// question. When the hub cannot be reached (network error, 5xx after retries), a public
    /// repo falls back to the commit the revision last resolved to on this node, so a node keeps
    /// serving what it holds through a hub outage; a private or gated one is refused, because
    /// access cannot be checked.
    pub async fn resolve(
        &self,
        model: &ModelRef,
        token: Option<&Token>,
    ) -> Result<Commit, FetchError> {
        if !self.sources.uses_hub() {
            return self.resolve_in_shared_cache(model);
        }
        if let Some(commit) = self.access.get(model, token, Instant::now()) {
            return Ok(commit);
        }
        let (kind, repo) = (model.kind, &model.repo);
        match self.hub.resolve_revision(model, token).await {
            Ok(resolved) => {
                self.store.set_restricted(kind, repo, resolved.restricted)?;
                self.store
                    .write_ref(kind, repo, &model.revision, &resolved.commit)?;
                self.access
                    .grant(model, token, &resolved.commit, Instant::now());
                Ok(resolved.commit)
            }
            Err(e) if e.is_transient() && self.store.is_restricted(kind, repo) => {
                Err(FetchError::AccessUnverifiable {
                    repo: repo.to_string(),
                    source: e,
                })
            }
            Err(e) if e.is_transient() => {
                let known = if let Ok(c) = Commit::parse(model.revision.as_str()) {
                    Some((c, "the commit asked for"))
                } else if let Some(c) = self.store.read_ref(kind, repo, &model.revision) {
                    Some((c, "the commit this revision last resolved to on this node"))
                } else {
                    self.shared_ref(model)
                        .map(|c| (c, "the shared cache's ref"))
                };
                match known {
                    Some((commit, why)) => {
                        tracing::warn!(error = %e, model.commit = %commit, "hub unreachable; using {why}");
                        Ok(commit)
                    }
                    None => Err(e.into()),
                }
            }
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
    use crate::store::Store;
    use modelcache_core::repo::Revision;
    use modelcache_hub::HubClient;
    use modelcache_hub::served::ServedRepos;
    use modelcache_hub::server::{Hub, LocalHub};
    use std::sync::Arc;
    use std::time::Duration;

    fn model(repo: &str, revision: &str) -> ModelRef {
        ModelRef {
            kind: RepoKind::Model,
            repo: RepoId::parse(repo).unwrap(),
            revision: Revision::parse(revision).unwrap(),
        }
    }

    /// The outage policy against a real (in-process) hub that answers, then goes away: a
    /// public repo falls back to what this node last resolved, a commit stands for itself, an
    /// unknown revision fails, and a gated repo is refused because access cannot be checked.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_hub_outage_falls_back_only_where_access_is_not_in_question() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["public", "gated"] {
            let repo = dir.path().join("hub/models/org").join(name);
            std::fs::create_dir_all(&repo).unwrap();
            std::fs::write(repo.join("config.json"), name).unwrap();
        }
        let mut hub = LocalHub::start(Hub {
            repos: ServedRepos::load(&dir.path().join("hub")).unwrap(),
            gated: [(RepoId::parse("org/gated").unwrap(), vec!["hf_t".into()])].into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let store = Arc::new(Store::open(dir.path().join("store")).unwrap());
        let client = HubClient::new(&hub.endpoint, &[])
            .unwrap()
            .with_api_deadline(Duration::from_secs(5));
        let fetcher =
            Fetcher::new(client, store, Default::default()).with_access_ttl(Duration::ZERO);
        let token = Token::new("hf_t");

        let public = fetcher
            .resolve(&model("org/public", "main"), None)
            .await
            .unwrap();
        let gated = fetcher
            .resolve(&model("org/gated", "main"), token.as_ref())
            .await
            .unwrap();
        assert_ne!(public, gated);

        hub.stop().await.unwrap();

        let down = fetcher.resolve(&model("org/public", "main"), None).await;
        assert_eq!(
            down.unwrap(),
            public,
            "the last commit of main on this node"
        );
        let commit = "c".repeat(40);
        let pinned = fetcher.resolve(&model("org/public", &commit), None).await;
        assert_eq!(
            pinned.unwrap(),
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
}
