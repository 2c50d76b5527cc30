//! The agent's side of the Hub protocol, as huggingface_hub speaks it:
//! revision → commit, the recursive tree (following `Link: rel="next"` pages), and `resolve`
//! downloads that follow redirects (reqwest drops `Authorization` when a redirect changes host).

use crate::error::HubError;
use crate::wire::{RepoInfo, TreeEntry, X_ERROR_CODE, X_ERROR_MESSAGE, X_REPO_COMMIT};
use backon::{ExponentialBuilder, Retryable};
use modelcache_core::repo::{Commit, ModelRef, RepoId, RepoKind, RepoPath};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::StatusCode;
use std::time::Duration;

/// The public Hugging Face Hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Characters left as they are in a URL path segment (what Python's `quote(s, safe="")` keeps).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// A hub token. Its `Debug` never shows the secret, so it cannot reach a log by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// A stable, irreversible name for the token (sha256), to key caches by without keeping it.
    pub fn fingerprint(&self) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(self.0.as_bytes()))
    }

    /// Wraps a token; an empty string is no token.
    pub fn new(s: impl Into<String>) -> Option<Self> {
        let s = s.into();
        let s = s.trim();
        (!s.is_empty()).then(|| Token(s.to_owned()))
    }

    fn bearer(&self) -> String {
        format!("Bearer {}", self.0)
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(***)")
    }
}

/// What the hub says of a revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The commit.
    pub commit: Commit,
    /// Whether the repo is private or gated.
    pub restricted: bool,
}

/// A client of one hub endpoint.
#[derive(Clone, Debug)]
pub struct HubClient {
    http: reqwest::Client,
    endpoint: String,
    api_deadline: Duration,
}

impl HubClient {
    /// A client of `endpoint` (e.g. `https://huggingface.co`). Every request names its token,
    /// or none: there is no default, so no caller can lend one by accident. Redirects may go
    /// to the hub's host, to the Hugging Face CDN when the endpoint is the Hub, and to
    /// `cdn_hosts` (each with its subdomains): a mirror's CDN.
    pub fn new(endpoint: &str, cdn_hosts: &[String]) -> Result<Self, HubError> {
        // reqwest is built without a TLS crypto provider of its own; use ring, once per process.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let endpoint = endpoint.trim_end_matches('/').to_owned();
        let allowed = AllowedHosts::for_endpoint(&endpoint, cdn_hosts);
        let http = reqwest::Client::builder()
            .user_agent(concat!("modelcache/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(20))
            .redirect(allowed.redirect_policy())
            .build()
            .map_err(|source| HubError::Network {
                url: endpoint.clone(),
                cause: source.into(),
            })?;
        Ok(HubClient {
            http,
            endpoint,
            api_deadline: API_DEADLINE,
        })
    }

    /// Gives each try of a JSON request `deadline` instead of [`API_DEADLINE`].
    pub fn with_api_deadline(mut self, deadline: Duration) -> Self {
        self.api_deadline = deadline;
        self
    }

    /// The base URL.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A GET of `url`. The token goes only to the hub's own origin: a CDN URL that a redirect
    /// named is presigned, and must not see it.
    fn get(&self, url: &str, token: Option<&Token>) -> reqwest::RequestBuilder {
        let req = self.http.get(url);
        match token {
            Some(t) if same_origin(url, &self.endpoint) => {
                req.header(reqwest::header::AUTHORIZATION, t.bearer())
            }
            _ => req,
        }
    }

    fn api_url(&self, kind: RepoKind, repo: &RepoId) -> String {
        // Repo ids are validated to URL-safe characters and one '/'.
        format!("{}/api/{}/{}", self.endpoint, kind.plural(), repo)
    }

    /// The commit a revision points to, and whether the repo is restricted, as seen with
    /// `token`. Asked of the hub even for a 40-hex revision: the answer also says whether this
    /// token may read the repo.
    pub async fn resolve_revision(
        &self,
        model: &ModelRef,
        token: Option<&Token>,
    ) -> Result<Resolved, HubError> {
        let url = format!(
            "{}/revision/{}",
            self.api_url(model.kind, &model.repo),
            utf8_percent_encode(model.revision.as_str(), SEGMENT)
        );
        let ctx = Ctx::new(model.kind, &model.repo).revision(model.revision.as_str());
        let info: RepoInfo = self.get_json(&url, token, &ctx).await?;
        let Ok(commit) = Commit::parse(&info.sha) else {
            return Err(HubError::Protocol {
                url,
                reason: format!("`sha` {:?} is not a 40-hex commit", info.sha),
            });
        };
        if model.revision.is_commit() && commit != model.revision.as_str() {
            return Err(HubError::Protocol {
                url,
                reason: format!("asked for commit {} and got {}", model.revision, info.sha),
            });
        }
        Ok(Resolved {
            restricted: info.restricted(),
            commit,
        })
    }

    /// Whether `token` may read the files of `repo`: the Hub's `auth-check`, the question
    /// `huggingface_hub.auth_check` asks. A gated repo's card and revisions can be public while
    /// its files are not, so a restricted repo's revision answer alone does not grant access.
    pub async fn check_access(
        &self,
        kind: RepoKind,
        repo: &RepoId,
        token: Option<&Token>,
    ) -> Result<(), HubError> {
        let url = format!("{}/auth-check", self.api_url(kind, repo));
        self.send_json_retrying(&url, token, &Ctx::new(kind, repo))
            .await
            .map(drop)
    }

    /// Every entry of the repo at `commit`, recursively, across all pages.
    pub async fn list_tree(
        &self,
        kind: RepoKind,
        repo: &RepoId,
        commit: &Commit,
        token: Option<&Token>,
    ) -> Result<Vec<TreeEntry>, HubError> {
        let ctx = Ctx::new(kind, repo).revision(commit);
        let mut url = format!(
            "{}/tree/{}?recursive=true&expand=false",
            self.api_url(kind, repo),
            utf8_percent_encode(commit, SEGMENT)
        );
        let mut out = Vec::new();
        for _page in 0..10_000 {
            let resp = self.send_json_retrying(&url, token, &ctx).await?;
            let next = next_link(resp.headers());
            let page: Vec<TreeEntry> = read_json(resp, &url, "tree listing").await?;
            out.extend(page);
            if out.len() > MAX_TREE_ENTRIES {
                return Err(HubError::Protocol {
                    url,
                    reason: format!("tree listing has more than {MAX_TREE_ENTRIES} entries"),
                });
            }
            match next {
                // Pages come from the hub itself: a `next` link elsewhere is refused, so a
                // hostile answer cannot send the client (and its token) to another host.
                Some(n) if same_origin(&n, &self.endpoint) => url = n,
                Some(n) => {
                    return Err(HubError::Protocol {
                        url,
                        reason: format!(
                            "tree listing's next page {} is not on the hub",
                            modelcache_core::repo::clip_to(&n, 200)
                        ),
                    });
                }
                None => return Ok(out),
            }
        }
        Err(HubError::Protocol {
            url,
            reason: "tree listing has more than 10000 pages".into(),
        })
    }

    /// The `resolve` URL of a file, which a hub answers with the bytes or a redirect to them.
    pub fn file_url(&self, file: &FileSource<'_>) -> String {
        let encoded: Vec<String> = file
            .path
            .as_str()
            .split('/')
            .map(|s| utf8_percent_encode(s, SEGMENT).to_string())
            .collect();
        format!(
            "{}/{}{}/resolve/{}/{}",
            self.endpoint,
            file.kind.url_prefix(),
            file.repo,
            file.commit,
            encoded.join("/")
        )
    }

    /// Starts downloading all of `file` from its `resolve` URL; the caller streams the body.
    pub async fn download(&self, file: &FileSource<'_>) -> Result<Download, HubError> {
        self.get_file(file, None, None).await.map(Download)
    }

    /// Asks for bytes `range` of `file`, whose whole size is `size`, from its `resolve` URL or
    /// from `url` where an earlier request was redirected. A `206` must carry the exact
    /// `Content-Range` asked for; a `200` means the server ignores ranges.
    pub async fn download_range(
        &self,
        file: &FileSource<'_>,
        url: Option<&str>,
        range: std::ops::Range<u64>,
        size: u64,
    ) -> Result<RangeAnswer, HubError> {
        let (start, end) = (range.start, range.end);
        let resp = self.get_file(file, url, Some(range)).await?;
        if resp.status() == StatusCode::OK {
            return Ok(RangeAnswer::Whole);
        }
        let protocol = |reason: String| HubError::Protocol {
            url: resp.url().to_string(),
            reason,
        };
        if resp.status() != StatusCode::PARTIAL_CONTENT {
            return Err(protocol(format!(
                "HTTP {} to a range request",
                resp.status()
            )));
        }
        let want = format!("bytes {}-{}/{}", start, end - 1, size);
        let got = resp
            .headers()
            .get(reqwest::header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if got != want {
            return Err(protocol(format!(
                "asked for {want}, Content-Range says {got:?}"
            )));
        }
        Ok(RangeAnswer::Range(Download(resp)))
    }

    async fn get_file(
        &self,
        file: &FileSource<'_>,
        url: Option<&str>,
        range: Option<std::ops::Range<u64>>,
    ) -> Result<reqwest::Response, HubError> {
        let url = match url {
            Some(u) => u.to_owned(),
            None => self.file_url(file),
        };
        let mut ctx = Ctx::new(file.kind, file.repo)
            .revision(file.commit)
            .path(file.path.as_str());
        ctx.liveness = file.liveness;
        let range = range.map(|r| format!("bytes={}-{}", r.start, r.end.saturating_sub(1)));
        let resp = self
            .send_retrying(&url, file.token, &ctx, range.as_deref())
            .await?;
        // The hub names the commit it answered from (a CDN, after a redirect, does not).
        let answered = resp
            .headers()
            .get(X_REPO_COMMIT)
            .and_then(|v| v.to_str().ok());
        if let Some(got) = answered
            && got != file.commit.as_str()
        {
            return Err(HubError::Protocol {
                url,
                reason: format!("answered from commit {got}, asked for {}", file.commit),
            });
        }
        Ok(resp)
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        token: Option<&Token>,
        ctx: &Ctx<'_>,
    ) -> Result<T, HubError> {
        let resp = self.send_json_retrying(url, token, ctx).await?;
        read_json(resp, url, "answer").await
    }

    /// [`HubClient::send_retrying`] for a JSON answer: each try, body included, must end
    /// within [`API_DEADLINE`].
    async fn send_json_retrying(
        &self,
        url: &str,
        token: Option<&Token>,
        ctx: &Ctx<'_>,
    ) -> Result<reqwest::Response, HubError> {
        self.send(url, token, ctx, None, Some(self.api_deadline))
            .await
    }

    /// GET with capped exponential backoff and jitter for transient failures (5xx, 429,
    /// network); a `Retry-After` or `RateLimit` reset from the hub replaces the backoff's delay.
    async fn send_retrying(
        &self,
        url: &str,
        token: Option<&Token>,
        ctx: &Ctx<'_>,
        range: Option<&str>,
    ) -> Result<reqwest::Response, HubError> {
        self.send(url, token, ctx, range, None).await
    }

    async fn send(
        &self,
        url: &str,
        token: Option<&Token>,
        ctx: &Ctx<'_>,
        range: Option<&str>,
        deadline: Option<Duration>,
    ) -> Result<reqwest::Response, HubError> {
        let once = || async {
            let mut req = self.get(url, token);
            if let Some(r) = range {
                req = req.header(reqwest::header::RANGE, r);
            }
            if let Some(d) = deadline {
                req = req.timeout(d);
            }
            let resp = req.send().await.map_err(|source| HubError::Network {
                url: url.to_owned(),
                cause: source.into(),
            })?;
            if let Some(l) = ctx.liveness {
                l.answered();
            }
            classify(resp, url, ctx, &self.endpoint)
        };
        once.retry(retry_policy())
            .when(HubError::is_transient)
            .adjust(|e: &HubError, backoff| match e.retry_after() {
                Some(wait) => Some(jittered(wait.min(MAX_RETRY_AFTER))),
                None => backoff,
            })
            .notify(|e, after| {
                if let Some(l) = ctx.liveness {
                    l.rest(after);
                }
                tracing::warn!(error = %e, retry_in = ?after, "hub request failed; retrying")
            })
            .await
    }
}

/// The most bytes a JSON answer (a revision, a page of a tree) may hold: the Hub's pages of
/// 1,000 entries take about 200 KB.
pub const MAX_JSON_BYTES: usize = 16 << 20;

/// The most entries a tree listing may hold over all its pages.
pub const MAX_TREE_ENTRIES: usize = 2_000_000;

/// How long one try of a JSON request may take, answer included.
pub const API_DEADLINE: Duration = Duration::from_secs(20);

/// Reads a JSON answer of at most [`MAX_JSON_BYTES`] (the agent's peers' answers too).
pub async fn read_json<T: serde::de::DeserializeOwned>(
    mut resp: reqwest::Response,
    url: &str,
    what: &str,
) -> Result<T, HubError> {
    let too_big = || HubError::Protocol {
        url: url.to_owned(),
        reason: format!("{what} is larger than {MAX_JSON_BYTES} bytes"),
    };
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_JSON_BYTES as u64)
    {
        return Err(too_big());
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|source| HubError::Network {
        url: url.to_owned(),
        cause: source.into(),
    })? {
        if body.len() + chunk.len() > MAX_JSON_BYTES {
            return Err(too_big());
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|e| HubError::Protocol {
        url: url.to_owned(),
        reason: format!("{what} is not the JSON expected: {e}"),
    })
}

/// The hosts a request may be redirected to: the hub's own, and for the Hugging Face Hub its
/// CDN (`*.hf.co`, `*.huggingface.co`). A redirect anywhere else is refused.
#[derive(Debug, Clone)]
struct AllowedHosts {
    /// Exact hosts.
    hosts: Vec<String>,
    /// Domains whose subdomains are allowed.
    domains: Vec<String>,
}

impl AllowedHosts {
    fn for_endpoint(endpoint: &str, cdn_hosts: &[String]) -> Self {
        let host = reqwest::Url::parse(endpoint)
            .ok()
            .and_then(|u| u.host_str().map(str::to_ascii_lowercase))
            .unwrap_or_default();
        let mut domains = vec![host.clone()];
        if host == "huggingface.co" || host.ends_with(".huggingface.co") || host == "hf.co" {
            domains.extend(["huggingface.co".to_owned(), "hf.co".to_owned()]);
        }
        domains.extend(
            cdn_hosts
                .iter()
                .map(|h| h.trim().trim_start_matches('.').to_ascii_lowercase())
                .filter(|h| !h.is_empty()),
        );
        AllowedHosts {
            hosts: vec![host],
            domains,
        }
    }

    fn allows(&self, url: &reqwest::Url) -> bool {
        let Some(host) = url.host_str().map(str::to_ascii_lowercase) else {
            return false;
        };
        self.hosts.contains(&host)
            || self.domains.iter().any(|d| {
                host == *d
                    || host
                        .strip_suffix(d.as_str())
                        .is_some_and(|p| p.ends_with('.'))
            })
    }

    fn redirect_policy(self) -> reqwest::redirect::Policy {
        reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= 10 {
                attempt.error("more than 10 redirects")
            } else if !self.allows(attempt.url()) {
                let to = attempt.url().host_str().unwrap_or("").to_owned();
                attempt.error(format!(
                    "redirect to {to}, which is neither the hub nor its CDN"
                ))
            } else {
                attempt.follow()
            }
        })
    }
}

/// The longest wait a hub's `Retry-After` is honoured for; beyond it the request fails.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// Checks that `s` is an http or https URL with a host, as a hub endpoint must be.
pub fn check_endpoint(s: &str) -> Result<(), BadEndpoint> {
    let url = reqwest::Url::parse(s).map_err(|e| BadEndpoint {
        endpoint: s.to_owned(),
        why: format!("is not a URL ({e})"),
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(BadEndpoint {
            endpoint: s.to_owned(),
            why: "is not an http(s) URL with a host".into(),
        });
    }
    Ok(())
}

/// A hub endpoint that cannot be one.
#[derive(Debug, thiserror::Error)]
#[error("{endpoint:?} {why}; write it as https://host[:port]")]
pub struct BadEndpoint {
    endpoint: String,
    why: String,
}

/// A file's bytes on their way: the answer to a download, whose body the caller streams.
#[derive(Debug)]
pub struct Download(reqwest::Response);

impl Download {
    /// Where the bytes come from (after redirects: the CDN's location).
    pub fn url(&self) -> &str {
        self.0.url().as_str()
    }

    /// The body, chunk by chunk; an error is a broken transfer.
    pub fn bytes(self) -> impl futures::Stream<Item = Result<bytes::Bytes, BrokenBody>> {
        use futures::TryStreamExt;
        self.0.bytes_stream().map_err(BrokenBody)
    }
}

/// A body that stopped before its end (the connection dropped, the server cut it).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct BrokenBody(reqwest::Error);

/// The answer to a range request.
#[derive(Debug)]
pub enum RangeAnswer {
    /// The range asked for.
    Range(Download),
    /// The server ignores ranges and would send the whole file.
    Whole,
}

/// Capped exponential backoff with jitter, five tries in all.
pub fn retry_policy() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .with_max_times(4)
        .with_jitter()
}

/// `wait` plus up to 20% more, so that clients told the same time do not return together.
fn jittered(wait: Duration) -> Duration {
    wait + wait.mul_f64(rand::random::<f64>() * 0.2)
}

/// True when `url` has the scheme, host and port of `endpoint`.
fn same_origin(url: &str, endpoint: &str) -> bool {
    match (reqwest::Url::parse(url), reqwest::Url::parse(endpoint)) {
        (Ok(a), Ok(b)) => a.origin() == b.origin(),
        _ => false,
    }
}

/// How long a hub asks a client to wait: `Retry-After` (seconds or an HTTP date), else the reset
/// of an exhausted `RateLimit` (`"api";r=0;t=55`, as the Hub sends) or `RateLimit-Reset`.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(v) = get("retry-after") {
        let v = v.trim();
        if let Ok(secs) = v.parse::<u64>() {
            return Some(Duration::from_secs(secs));
        }
        if let Ok(when) = httpdate::parse_http_date(v) {
            return Some(
                when.duration_since(std::time::SystemTime::now())
                    .unwrap_or_default(),
            );
        }
    }
    if let Some(v) = get("ratelimit") {
        let param = |key: &str| {
            v.split(';')
                .filter_map(|p| p.trim().split_once('='))
                .find(|(k, _)| *k == key)
                .and_then(|(_, n)| n.trim().parse::<u64>().ok())
        };
        if param("r") == Some(0)
            && let Some(t) = param("t")
        {
            return Some(Duration::from_secs(t));
        }
    }
    get("ratelimit-reset")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// A file of a repo at a commit, and the token to ask for it with.
#[derive(Debug, Clone, Copy)]
pub struct FileSource<'a> {
    /// Model or dataset.
    pub kind: RepoKind,
    /// `org/name`.
    pub repo: &'a RepoId,
    /// The commit.
    pub commit: &'a Commit,
    /// The file.
    pub path: &'a RepoPath,
    /// The token to ask with, if any.
    pub token: Option<&'a Token>,
    /// Told of the hub's answers and of the client's waits between tries, if given.
    pub liveness: Option<&'a Liveness>,
}

/// What a caller watching a download can know of its requests that bytes do not show: that
/// the hub answered (any status), and that the client is waiting between tries on purpose
/// (backoff, `Retry-After`). A hub that answers, even "wait", is not hanging.
#[derive(Debug, Default)]
pub struct Liveness {
    answers: std::sync::atomic::AtomicU64,
    resting_until: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Liveness {
    /// Answers received so far.
    pub fn answers(&self) -> u64 {
        self.answers.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// True while the client waits between tries.
    pub fn resting(&self) -> bool {
        let until = *self.resting_until.lock().expect("liveness lock");
        until.is_some_and(|t| std::time::Instant::now() < t)
    }

    /// Notes an answer (the client does, on every response).
    pub fn answered(&self) {
        self.answers
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Notes a wait before the next try (the client does, before each retry).
    pub fn rest(&self, wait: Duration) {
        *self.resting_until.lock().expect("liveness lock") = Some(std::time::Instant::now() + wait);
    }
}

/// What a request was about, for error messages, and who watches it.
struct Ctx<'a> {
    kind: RepoKind,
    repo: &'a RepoId,
    revision: Option<&'a str>,
    path: Option<&'a str>,
    liveness: Option<&'a Liveness>,
}

impl<'a> Ctx<'a> {
    fn new(kind: RepoKind, repo: &'a RepoId) -> Self {
        Ctx {
            kind,
            repo,
            revision: None,
            path: None,
            liveness: None,
        }
    }
    fn revision(mut self, r: &'a str) -> Self {
        self.revision = Some(r);
        self
    }
    fn path(mut self, p: &'a str) -> Self {
        self.path = Some(p);
        self
    }
}

/// Turns a non-success answer into a typed error, using `X-Error-Code` as huggingface_hub does.
fn classify(
    resp: reqwest::Response,
    url: &str,
    ctx: &Ctx<'_>,
    endpoint: &str,
) -> Result<reqwest::Response, HubError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let code = header(X_ERROR_CODE);
    let repo = ctx.repo.to_string();
    let wait = retry_after(resp.headers());
    if matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN)
        && !same_origin(url, endpoint)
    {
        return Err(HubError::LinkRefused {
            url: url.split('?').next().unwrap_or(url).to_owned(),
            status: status.as_u16(),
        });
    }
    Err(match (code.as_str(), status) {
        ("RepoNotFound", _) => HubError::RepoNotFound {
            kind: ctx.kind.singular(),
            repo,
            endpoint: endpoint.to_owned(),
        },
        ("RevisionNotFound", _) => HubError::RevisionNotFound {
            repo,
            revision: ctx.revision.unwrap_or_default().to_owned(),
        },
        ("EntryNotFound", _) => HubError::EntryNotFound {
            repo,
            commit: ctx.revision.unwrap_or_default().to_owned(),
            path: ctx.path.unwrap_or_default().to_owned(),
        },
        ("GatedRepo", _) | (_, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
            HubError::Unauthorized {
                repo,
                status: status.as_u16(),
            }
        }
        (_, StatusCode::TOO_MANY_REQUESTS) => HubError::RateLimited {
            repo,
            retry_after: wait,
        },
        (_, StatusCode::NOT_FOUND) if ctx.path.is_none() => HubError::RepoNotFound {
            kind: ctx.kind.singular(),
            repo,
            endpoint: endpoint.to_owned(),
        },
        _ => HubError::Status {
            url: url.to_owned(),
            status: status.as_u16(),
            message: header(X_ERROR_MESSAGE),
            retry_after: wait,
        },
    })
}

/// The `rel="next"` target of a `Link` header.
fn next_link(headers: &reqwest::header::HeaderMap) -> Option<String> {
    let link = headers.get(reqwest::header::LINK)?.to_str().ok()?;
    link.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        let is_next = params
            .split(';')
            .any(|p| p.trim().replace(' ', "") == "rel=\"next\"");
        is_next.then(|| {
            target
                .trim()
                .trim_start_matches('<')
                .trim_end_matches('>')
                .to_owned()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    /// A hub nobody answers at: the error says what failed and what to check, once, and ends
    /// after the retries.
    #[tokio::test]
    async fn an_unreachable_hub_says_what_to_check_once() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let endpoint = format!("http://127.0.0.1:{port}");
        let client = HubClient::new(&endpoint, &[]).unwrap();
        let model = ModelRef {
            kind: RepoKind::Model,
            repo: RepoId::parse("org/m").unwrap(),
            revision: modelcache_core::repo::Revision::main(),
        };
        let e = client.resolve_revision(&model, None).await.unwrap_err();
        let said = e.to_string();
        assert!(matches!(e, HubError::Network { .. }), "{e:?}");
        assert!(said.contains("Connection refused"), "{said}");
        assert!(
            said.contains("HF_ENDPOINT") && said.contains("HTTPS_PROXY"),
            "{said}"
        );
        assert_eq!(said.matches(&endpoint).count(), 1, "{said}");
        assert!(
            std::error::Error::source(&e).is_none(),
            "the cause is in the message, not repeated as a source"
        );
    }

    #[test]
    fn token_debug_hides_the_secret() {
        let t = Token::new(" hf_secret ").unwrap();
        assert_eq!(format!("{t:?}"), "Token(***)");
        assert_eq!(t.bearer(), "Bearer hf_secret");
        assert!(Token::new("  ").is_none());
    }

    #[test]
    fn link_header_next() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(
            reqwest::header::LINK,
            r#"<https://hub/api/models/a/b/tree/c?cursor=xyz>; rel="next""#
                .parse()
                .unwrap(),
        );
        assert_eq!(
            next_link(&h).as_deref(),
            Some("https://hub/api/models/a/b/tree/c?cursor=xyz")
        );
        h.insert(
            reqwest::header::LINK,
            r#"<https://x>; rel="prev""#.parse().unwrap(),
        );
        assert_eq!(next_link(&h), None);
    }

    #[test]
    fn retry_after_headers() {
        let h = |pairs: &[(&'static str, &str)]| {
            let mut m = reqwest::header::HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, v.parse().unwrap());
            }
            retry_after(&m)
        };
        assert_eq!(h(&[("retry-after", "7")]), Some(Duration::from_secs(7)));
        let soon = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(30));
        let got = h(&[("retry-after", &soon)]).unwrap();
        assert!(
            got > Duration::from_secs(25) && got <= Duration::from_secs(30),
            "{got:?}"
        );
        assert_eq!(
            h(&[("ratelimit", r#""api";r=0;t=55"#)]),
            Some(Duration::from_secs(55))
        );
        // Requests left: no wait from RateLimit.
        assert_eq!(h(&[("ratelimit", r#""api";r=3;t=55"#)]), None);
        assert_eq!(h(&[("ratelimit-reset", "4")]), Some(Duration::from_secs(4)));
        assert_eq!(h(&[]), None);
    }

    #[test]
    fn token_goes_only_to_the_hub_origin() {
        let hub = "http://127.0.0.1:8080";
        assert!(same_origin("http://127.0.0.1:8080/a/b/resolve/c/d", hub));
        assert!(!same_origin("http://localhost:8080/cdn/x", hub));
        assert!(!same_origin("http://127.0.0.1:9090/cdn/x", hub));
        assert!(!same_origin("https://127.0.0.1:8080/x", hub));
    }

    #[tokio::test]
    async fn an_answer_that_never_ends_fails_within_the_deadline() {
        use axum::body::Body;
        // Headers at once, then a body that never ends: the per-read timeout alone (20 s)
        // would wait for ever on a trickle; the deadline ends each try.
        let app = axum::Router::new().fallback(|| async {
            let stream = futures::stream::once(async { Ok::<_, std::io::Error>(b"{".to_vec()) })
                .chain(futures::stream::pending());
            Body::from_stream(stream)
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client = HubClient::new(&endpoint, &[])
            .unwrap()
            .with_api_deadline(Duration::from_millis(200));
        let model = ModelRef {
            kind: RepoKind::Model,
            repo: RepoId::parse("o/r").unwrap(),
            revision: modelcache_core::repo::Revision::main(),
        };
        let started = std::time::Instant::now();
        let res = tokio::time::timeout(
            Duration::from_secs(30),
            client.resolve_revision(&model, None),
        )
        .await
        .expect("the request ended");
        assert!(res.is_err());
        assert!(
            started.elapsed() < Duration::from_secs(25),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn json_answers_are_bounded() {
        let resp = |body: Vec<u8>| reqwest::Response::from(axum::http::Response::new(body));
        let ok: Vec<u32> = read_json(resp(b"[1,2]".to_vec()), "u", "page")
            .await
            .unwrap();
        assert_eq!(ok, [1, 2]);
        // Larger than the bound: refused, whether or not the length was announced.
        let mut big = b"[".to_vec();
        big.resize(MAX_JSON_BYTES + 10, b' ');
        big.push(b']');
        let err = read_json::<Vec<u32>>(resp(big), "u", "page")
            .await
            .unwrap_err();
        assert!(err.to_string().contains("larger than"), "{err}");
        let streamed = reqwest::Body::wrap_stream(futures::stream::iter(
            (0..20).map(|_| Ok::<_, std::io::Error>(vec![b' '; 1 << 20])),
        ));
        let err = read_json::<Vec<u32>>(
            reqwest::Response::from(axum::http::Response::new(streamed)),
            "u",
            "page",
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("larger than"), "{err}");
    }

    #[test]
    fn redirects_go_only_to_the_hub_and_its_cdn() {
        let url = |u: &str| reqwest::Url::parse(u).unwrap();
        let hf = AllowedHosts::for_endpoint("https://huggingface.co", &[]);
        for ok in [
            "https://huggingface.co/x",
            "https://cdn-lfs.hf.co/x",
            "https://cas-bridge.xethub.hf.co/x",
            "https://cdn-lfs.huggingface.co/x",
        ] {
            assert!(hf.allows(&url(ok)), "{ok}");
        }
        for bad in [
            "https://evil.example/x",
            "https://hf.co.evil.example/x",
            "https://evilhf.co/x",
            "http://169.254.169.254/latest/meta-data",
        ] {
            assert!(!hf.allows(&url(bad)), "{bad}");
        }
        let mirror =
            AllowedHosts::for_endpoint("http://127.0.0.1:8080", &["cdn.mirror.example".into()]);
        assert!(mirror.allows(&url("http://127.0.0.1:9999/cdn")));
        assert!(mirror.allows(&url("https://eu.cdn.mirror.example/x")));
        assert!(!mirror.allows(&url("http://localhost:8080/x")));
        assert!(!mirror.allows(&url("https://cdn-lfs.hf.co/x")));
    }

    #[test]
    fn revision_segment_is_fully_encoded() {
        assert_eq!(
            utf8_percent_encode("refs/pr/1", SEGMENT).to_string(),
            "refs%2Fpr%2F1"
        );
    }
}
