//! What can go wrong talking to a hub, in terms a user can act on.

/// A failed hub request. Cloneable, so one answer can go to every caller that shared the
/// request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HubError {
    /// The repo does not exist, or is private and the token cannot see it.
    #[error(
        "{kind} repo {repo} was not found on {endpoint}: check the name, or give a token that can see it if it is private"
    )]
    RepoNotFound {
        /// Model or dataset.
        kind: &'static str,
        /// `org/name`.
        repo: String,
        /// The hub's base URL.
        endpoint: String,
    },
    /// The repo exists but the revision does not.
    #[error("revision {revision:?} of {repo} was not found: check the branch, tag or commit")]
    RevisionNotFound {
        /// `org/name`.
        repo: String,
        /// As asked for.
        revision: String,
    },
    /// A file listed in the tree could not be found.
    #[error("file {path:?} of {repo}@{commit} was not found on the hub")]
    EntryNotFound {
        /// `org/name`.
        repo: String,
        /// The commit.
        commit: String,
        /// The file.
        path: String,
    },
    /// The repo is gated or private and the token is missing or lacks access.
    #[error(
        "access to {repo} was refused ({status}): accept the licence on the Hub and provide a token with access (volume secret key `token`, or the agent's --token)"
    )]
    Unauthorized {
        /// `org/name`.
        repo: String,
        /// HTTP status.
        status: u16,
    },
    /// A download location the hub redirected to (a CDN's presigned URL) refused the request:
    /// the link expired or is not valid.
    #[error(
        "the download location {url} refused the request ({status}): its presigned link expired or is invalid; retry to get a fresh one from the hub"
    )]
    LinkRefused {
        /// The location, without its query (which holds the signature).
        url: String,
        /// HTTP status.
        status: u16,
    },
    /// The hub asked us to slow down.
    #[error("the hub rate-limited requests for {repo}; retry later")]
    RateLimited {
        /// `org/name`.
        repo: String,
        /// How long the hub asked to wait, if it said.
        retry_after: Option<std::time::Duration>,
    },
    /// Any other unexpected HTTP status.
    #[error("{url} answered HTTP {status}: {message}")]
    Status {
        /// The URL requested (never with a token).
        url: String,
        /// HTTP status.
        status: u16,
        /// The hub's message, if any.
        message: String,
        /// How long the hub asked to wait (`Retry-After` on a 503), if it said.
        retry_after: Option<std::time::Duration>,
    },
    /// The hub could not be reached or the connection broke.
    #[error(
        "cannot reach the hub at {url}: {}; check the network, --endpoint (or HF_ENDPOINT) and any proxy (HTTPS_PROXY, NO_PROXY)",
        root_cause(cause.as_ref())
    )]
    Network {
        /// The URL requested.
        url: String,
        /// The underlying error; its innermost cause is in the message, so it is not the
        /// error's `source` (that would print the URL and the cause again).
        cause: std::sync::Arc<reqwest::Error>,
    },
    /// The hub answered something that does not follow the protocol.
    #[error("the hub answered {url} with something modelcache cannot use: {reason}")]
    Protocol {
        /// The URL requested.
        url: String,
        /// What was wrong.
        reason: String,
    },
}

impl HubError {
    /// What kind of failure this is, for the caller's status code.
    pub fn class(&self) -> modelcache_core::error::Class {
        use modelcache_core::error::Class;
        match self {
            HubError::RepoNotFound { .. }
            | HubError::RevisionNotFound { .. }
            | HubError::EntryNotFound { .. } => Class::NotFound,
            HubError::Unauthorized { .. } => Class::Denied,
            // A refused CDN link is cured by the next try, which asks the hub anew.
            HubError::LinkRefused { .. } => Class::Unavailable,
            _ if self.is_transient() => Class::Unavailable,
            HubError::RateLimited { .. } | HubError::Network { .. } => Class::Unavailable,
            HubError::Status { .. } | HubError::Protocol { .. } => Class::Precondition,
        }
    }

    /// A short name of the kind of error, for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            HubError::RepoNotFound { .. } => "repo_not_found",
            HubError::RevisionNotFound { .. } => "revision_not_found",
            HubError::EntryNotFound { .. } => "entry_not_found",
            HubError::Unauthorized { .. } => "unauthorized",
            HubError::LinkRefused { .. } => "link_refused",
            HubError::RateLimited { .. } => "rate_limited",
            HubError::Status { .. } => "status",
            HubError::Network { .. } => "network",
            HubError::Protocol { .. } => "protocol",
        }
    }

    /// True for errors a retry may cure: rate limits, server errors, broken connections.
    pub fn is_transient(&self) -> bool {
        match self {
            HubError::RateLimited { .. } | HubError::Network { .. } => true,
            HubError::Status { status, .. } => *status >= 500,
            _ => false,
        }
    }

    /// How long the hub asked to wait before the next try, if it said.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            HubError::RateLimited { retry_after, .. } | HubError::Status { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }
}

/// The innermost cause of `e` ("Connection refused (os error 111)", "operation timed out"),
/// which says what went wrong where the outer ones repeat the URL.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut inner = e;
    while let Some(next) = inner.source() {
        inner = next;
    }
    inner.to_string()
}
