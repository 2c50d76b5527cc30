//! Why a fetch fails, what kind of failure each is, and why a tier could not give a file.

use super::import::ImportError;
use crate::shared_cache::SharedCacheError;
use crate::store::StoreError;
use modelcache_core::error::Class;
use modelcache_core::repo::RepoId;
use modelcache_hub::HubError;
use std::fmt;

/// Bytes that do not fit in the store, even after evicting every model not in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "needs {needed} more bytes on disk, but the store's filesystem has {available} bytes free and evicting every model not in use would free at most {reclaimable} more"
)]
pub struct NoRoom {
    /// Bytes to write.
    pub needed: u64,
    /// Bytes free now.
    pub available: u64,
    /// Bytes that evicting every snapshot not in use could free (at most).
    pub reclaimable: u64,
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The hub refused or failed.
    #[error(transparent)]
    Hub(#[from] HubError),
    /// Writing to the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The shared cache holds something modelcache will not read.
    #[error(transparent)]
    SharedCache(#[from] SharedCacheError),
    /// Without a hub, the shared cache is all there is, and it lacks the revision.
    #[error(
        "the shared cache at {cache} holds no {what} of {repo}, and the hub is not among --sources: fill it (huggingface-cli download {repo} --revision {revision}) or add hub to --sources"
    )]
    NotInSharedCache {
        /// `org/name`.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// `refs/<revision>` or `snapshot <commit>`.
        what: String,
        /// The shared cache's path.
        cache: String,
    },
    /// The snapshot does not fit in the store.
    #[error(
        "{repo}@{commit} does not fit in the store: {source}; free disk space, unpublish models, or give the store a larger disk"
    )]
    NoRoom {
        /// `org/name`.
        repo: String,
        /// The commit.
        commit: String,
        /// The sizes.
        #[source]
        source: NoRoom,
    },
    /// No tier could give a file.
    #[error("{path}: {misses}")]
    Unavailable {
        /// The file.
        path: String,
        /// What each tier said.
        misses: Misses,
    },
    /// The hub's tree holds something modelcache will not write.
    #[error("{repo}@{commit}: the hub's file list is unsafe: {reason}")]
    UnsafeTree {
        /// `org/name`.
        repo: String,
        /// The commit.
        commit: String,
        /// What was wrong.
        reason: String,
    },
    /// The repo is private or gated and the hub cannot be asked whether this token may read it.
    #[error(
        "cannot check access to {repo}, which is private or gated: the hub is unreachable ({source}); retry when it is back"
    )]
    AccessUnverifiable {
        /// `org/name`.
        repo: String,
        /// Why the hub could not answer.
        #[source]
        source: HubError,
    },
    /// The include/exclude patterns take no file of the repo.
    #[error(
        "no file of {repo}@{commit} matches include {include:?} minus exclude {exclude:?}: check the patterns against the repo's file names"
    )]
    NothingMatches {
        /// `org/name`.
        repo: String,
        /// The commit.
        commit: String,
        /// Include patterns.
        include: String,
        /// Exclude patterns.
        exclude: String,
    },
    /// Downloaded bytes did not match the hub's hash or size, twice.
    #[error(
        "{path}: downloaded bytes do not match the hub ({detail}); the data was discarded — retry, and if it persists the hub or a proxy is serving corrupt data"
    )]
    Integrity {
        /// The file.
        path: String,
        /// Expected vs got.
        detail: String,
    },
    /// Less than [`super::STALL_BYTES`] of a file arrived in [`super::Tuning::stall`], over
    /// every retry.
    #[error(
        "{path}: less than 64 KiB arrived from {endpoint} in {}s, over every retry{}; the hub, or a proxy on the way, accepts connections and then hangs: check --endpoint (or HF_ENDPOINT), HTTPS_PROXY and NO_PROXY",
        after.as_secs_f32(), last.as_ref().map(|e| format!(" (last error: {e})")).unwrap_or_default()
    )]
    Stalled {
        /// The file.
        path: String,
        /// The hub's endpoint.
        endpoint: String,
        /// The stall timeout.
        after: std::time::Duration,
        /// The error of the last try that ended, if one did.
        last: Option<String>,
    },
    /// The connection broke while streaming a body.
    #[error("{path}: download interrupted: {source}")]
    Interrupted {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: modelcache_hub::client::BrokenBody,
    },
}

impl FetchError {
    /// What kind of failure this is, for the caller's status code.
    pub fn class(&self) -> Class {
        match self {
            FetchError::Hub(h) => h.class(),
            FetchError::Store(s) => s.class(),
            FetchError::UnsafeTree { .. }
            | FetchError::NothingMatches { .. }
            | FetchError::SharedCache(_) => Class::Precondition,
            FetchError::NotInSharedCache { .. } => Class::NotFound,
            FetchError::NoRoom { .. } => Class::Exhausted,
            // A download Job may still be filling the shared cache.
            FetchError::Unavailable { .. } => Class::Unavailable,
            FetchError::Integrity { .. } => Class::DataLoss,
            FetchError::Interrupted { .. }
            | FetchError::Stalled { .. }
            | FetchError::AccessUnverifiable { .. } => Class::Unavailable,
        }
    }

    pub(crate) fn unsafe_tree(repo: &RepoId, commit: &str, reason: impl Into<String>) -> Self {
        FetchError::UnsafeTree {
            repo: repo.to_string(),
            commit: commit.to_owned(),
            reason: reason.into(),
        }
    }
}

/// Why one tier could not give a file; the next tier is tried.
#[derive(Debug, thiserror::Error)]
pub enum TierMiss {
    /// The shared cache does not hold the file.
    #[error("shared cache: not there")]
    NotInSharedCache,
    /// The shared cache holds something modelcache will not read (a symlink out of it, …).
    #[error("shared cache: {0}")]
    SharedCacheRefused(#[source] SharedCacheError),
    /// The shared cache's copy is not the file wanted.
    #[error("shared cache: its copy {0}")]
    WrongCopy(#[source] ImportError),
    /// No peer gave the file with the right bytes.
    #[error("peers: {0}")]
    Peers(crate::peers::client::PeerMiss),
    /// The hub failed, and another tier comes after it.
    #[error("hub: {0}")]
    Hub(#[source] Box<FetchError>),
}

/// What every tier said, in order.
#[derive(Debug, Default)]
pub struct Misses(pub Vec<TierMiss>);

impl fmt::Display for Misses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, m) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{m}")?;
        }
        Ok(())
    }
}
