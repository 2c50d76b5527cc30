//! `modelcache-hub`: a read-only HTTP server speaking the part of the Hub protocol that
//! huggingface_hub and modelcache download with.
//!
//! | request | answer |
//! |---|---|
//! | `GET /api/{models,datasets}/{org}/{name}[/revision/{rev}]` | repo info with `sha` and `siblings` |
//! | `GET /api/{models,datasets}/{org}/{name}/tree/{rev}[/{path}][?recursive=true]` | tree entries |
//! | `GET,HEAD /[datasets/]{org}/{name}/resolve/{rev}/{path}` | the file, with Range support and `X-Repo-Commit`, `ETag`, `X-Linked-Etag`, `X-Linked-Size` |
//!
//! | `GET,HEAD /cdn/{sha256}?expires={unix time}` | with a CDN configured, where LFS files redirect to (`302` carrying the same headers, as the Hub's do); refuses requests that carry `Authorization` or come after the link expired, as presigned URLs do |
//!
//! Errors carry `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`, `GatedRepo`)
//! as the Hub's do. Gated repos need `Authorization: Bearer` with one of their tokens.
//!
//! With the `faults` feature, [`crate::faults::Faults`] make it misbehave on purpose, for tests
//! of clients: slow bodies, 5xx and 429 answers, added latency, bodies cut off or with a wrong
//! byte; `GET /_hub/faults` counts what it injected.

use crate::served::{ServedFile, ServedRepo, ServedRepos};
use crate::wire::{
    RepoInfo, Sibling, X_ERROR_CODE, X_ERROR_MESSAGE, X_LINKED_ETAG, X_LINKED_SIZE, X_REPO_COMMIT,
};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use modelcache_core::repo::{RepoId, RepoKind, RepoPath};
use percent_encoding::percent_decode_str;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tower_http::services::ServeFile;

/// What the server serves, and how.
#[derive(Debug, Default)]
pub struct Hub {
    /// The repos.
    pub repos: ServedRepos,
    /// Gated repos and the tokens that may read their files; their cards are public.
    pub gated: BTreeMap<RepoId, Vec<String>>,
    /// Private repos and the tokens that may see them; to any other request they do not exist.
    pub private: BTreeMap<RepoId, Vec<String>>,
    /// Faults to inject.
    #[cfg(feature = "faults")]
    pub faults: crate::faults::Faults,
    /// Base URL of the CDN that LFS files redirect to (this server's `/cdn/` route, reached under
    /// another host name so that it is another origin); None: LFS files are served in place.
    pub cdn: Option<String>,
    /// How long a CDN link stays valid, as a presigned URL's expiry.
    pub cdn_link_ttl: std::time::Duration,
    /// Requests answered so far, by purpose, reported at [`REQUESTS_PATH`].
    pub requests: Requests,
}

/// Where the hub reports the requests it answered, as JSON: `{"revision": n, "auth-check": n,
/// "tree": n, "file": n, "file_bytes": n}` (a purpose appears once asked; `file_bytes` counts
/// the bytes of file bodies sent, all clients together: the hub's egress).
pub const REQUESTS_PATH: &str = "/_hub/requests";

/// Requests answered, by purpose, and the bytes of file bodies sent (`file_bytes`).
#[derive(Debug, Default, Clone)]
pub struct Requests(std::sync::Arc<std::sync::Mutex<BTreeMap<&'static str, u64>>>);

impl Requests {
    fn count(&self, purpose: &'static str) {
        self.add(purpose, 1);
    }

    fn add(&self, what: &'static str, n: u64) {
        *self
            .0
            .lock()
            .expect("requests lock")
            .entry(what)
            .or_default() += n;
    }

    /// The counts so far.
    pub fn counts(&self) -> BTreeMap<&'static str, u64> {
        self.0.lock().expect("requests lock").clone()
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

impl Hub {
    /// The served LFS file with this sha256, in any repo.
    fn lfs_blob(&self, sha256: &str) -> Option<&ServedFile> {
        self.repos
            .repos()
            .flat_map(|r| r.files.values())
            .find(|f| f.lfs_sha256.as_deref() == Some(sha256))
    }

    /// The repo, if it exists and the request may read it: a gated repo answers 401 without a
    /// token and 403 with one that has no access, with `X-Error-Code: GatedRepo`, as the Hub does.
    fn repo(
        &self,
        kind: RepoKind,
        org: &str,
        name: &str,
        headers: &HeaderMap,
    ) -> Result<&ServedRepo, Box<Response>> {
        let repo = find_repo(&self.repos, kind, org, name)?;
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if let Some(allowed) = self.private.get(&repo.id)
            && !bearer.is_some_and(|t| allowed.iter().any(|a| a == t))
        {
            return Err(Box::new(error(
                StatusCode::UNAUTHORIZED,
                "RepoNotFound",
                format!("Repository Not Found for url: {}", repo.id),
            )));
        }
        let Some(allowed) = self.gated.get(&repo.id) else {
            return Ok(repo);
        };
        match bearer {
            Some(t) if allowed.iter().any(|a| a == t) => Ok(repo),
            Some(_) => Err(Box::new(error(
                StatusCode::FORBIDDEN,
                "GatedRepo",
                format!(
                    "Access to model {} is restricted and your token is not in the authorized list",
                    repo.id
                ),
            ))),
            None => Err(Box::new(error(
                StatusCode::UNAUTHORIZED,
                "GatedRepo",
                format!(
                    "Access to model {} is restricted. You must have access to it and be authenticated to access it.",
                    repo.id
                ),
            ))),
        }
    }
}

/// The hub's routes.
pub fn router(hub: Arc<Hub>) -> Router {
    Router::new()
        .fallback(handle)
        .with_state(hub)
        .layer(tower_http::trace::TraceLayer::new_for_http())
}

/// Serves the repos on `listener` until `shutdown` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    hub: Arc<Hub>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(hub))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// A hub serving from this process on a free loopback port, for tests of clients. Dropping it
/// stops it.
#[derive(Debug)]
pub struct LocalHub {
    /// Its base URL.
    pub endpoint: String,
    /// What it serves, and its request counts.
    pub hub: Arc<Hub>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl LocalHub {
    /// Serves `hub` on `127.0.0.1` at a free port.
    pub async fn start(hub: Hub) -> std::io::Result<LocalHub> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let stop = CancellationToken::new();
        let hub = Arc::new(hub);
        let task = tokio::spawn(serve(listener, hub.clone(), stop.clone()));
        Ok(LocalHub {
            endpoint,
            hub,
            stop,
            task: Some(task),
        })
    }

    /// Stops it and serves `hub` in its place, at the same address (a hub whose repos or
    /// gating changed).
    pub async fn restart(&mut self, hub: Hub) -> std::io::Result<()> {
        self.stop().await?;
        let addr = self.endpoint.trim_start_matches("http://");
        let listener = tokio::net::TcpListener::bind(addr).await?;
        self.stop = CancellationToken::new();
        self.hub = Arc::new(hub);
        self.task = Some(tokio::spawn(serve(
            listener,
            self.hub.clone(),
            self.stop.clone(),
        )));
        Ok(())
    }

    /// Stops it, and waits until it no longer listens (a client then meets a refused
    /// connection, as when a hub is down).
    pub async fn stop(&mut self) -> std::io::Result<()> {
        self.stop.cancel();
        match self.task.take() {
            Some(task) => task.await.map_err(std::io::Error::other)?,
            None => Ok(()),
        }
    }
}

impl Drop for LocalHub {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub(crate) fn error(status: StatusCode, code: &'static str, message: String) -> Response {
    let mut resp = (
        status,
        Json(serde_json::json!({ "error": message.clone() })),
    )
        .into_response();
    let headers = resp.headers_mut();
    headers.insert(X_ERROR_CODE, HeaderValue::from_static(code));
    if let Ok(v) = HeaderValue::from_str(&message) {
        headers.insert(X_ERROR_MESSAGE, v);
    }
    resp
}

fn not_found_route() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "NotFound",
        "no such route on this hub".into(),
    )
}

async fn handle(State(hub): State<Arc<Hub>>, req: Request) -> Response {
    if req.uri().path() == REQUESTS_PATH {
        return Json(hub.requests.counts()).into_response();
    }
    #[cfg(feature = "faults")]
    if let Some(resp) = hub.faults.before_answer(req.uri().path()).await {
        return resp;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "this hub is read-only".into(),
        );
    }
    let segments: Vec<String> = req
        .uri()
        .path()
        .trim_start_matches('/')
        .split('/')
        .map(|s| percent_decode_str(s).decode_utf8_lossy().into_owned())
        .collect();
    let recursive = req.uri().query().is_some_and(|q| {
        q.split('&')
            .any(|kv| kv == "recursive=true" || kv == "recursive=1")
    });
    let seg: Vec<&str> = segments.iter().map(String::as_str).collect();
    match seg.as_slice() {
        ["api", plural, org, name, rest @ ..] => {
            let Some(kind) = kind_of(plural) else {
                return not_found_route();
            };
            // As on the Hub, a gated repo's card and revisions are public; its files, tree
            // and `auth-check` need a token with access.
            hub.requests.count(match rest {
                [] | ["revision", ..] => "revision",
                ["tree", ..] => "tree",
                ["auth-check"] => "auth-check",
                _ => "other",
            });
            let found = match find_repo(&hub.repos, kind, org, name) {
                Ok(r) if !hub.private.contains_key(&r.id) => r,
                // A private repo shows itself only to its tokens.
                Ok(_) => match hub.repo(kind, org, name, req.headers()) {
                    Ok(r) => r,
                    Err(resp) => return *resp,
                },
                Err(resp) => return *resp,
            };
            let restricted = Restricted {
                gated: hub.gated.contains_key(&found.id),
                private: hub.private.contains_key(&found.id),
            };
            match rest {
                [] => return repo_info(found, "main", restricted),
                ["revision", rev] => return repo_info(found, rev, restricted),
                _ => {}
            }
            let repo = match hub.repo(kind, org, name, req.headers()) {
                Ok(r) => r,
                Err(resp) => return *resp,
            };
            match rest {
                ["tree", rev, path @ ..] => tree(repo, rev, &path.join("/"), recursive),
                ["auth-check"] => Json(serde_json::json!({})).into_response(),
                _ => not_found_route(),
            }
        }
        _ => {
            let (kind, rest) = match seg.as_slice() {
                ["datasets", rest @ ..] => (RepoKind::Dataset, rest),
                rest => (RepoKind::Model, rest),
            };
            match rest {
                ["cdn", sha] if kind == RepoKind::Model => cdn(&hub, sha, req).await,
                [org, name, "resolve", rev, path @ ..] if !path.is_empty() => {
                    hub.requests.count("file");
                    let file = (*org, *name, *rev, path.join("/"));
                    resolve(&hub, kind, file, req).await
                }
                _ => not_found_route(),
            }
        }
    }
}

fn kind_of(plural: &str) -> Option<RepoKind> {
    match plural {
        "models" => Some(RepoKind::Model),
        "datasets" => Some(RepoKind::Dataset),
        _ => None,
    }
}

fn find_repo<'a>(
    repos: &'a ServedRepos,
    kind: RepoKind,
    org: &str,
    name: &str,
) -> Result<&'a ServedRepo, Box<Response>> {
    let id = format!("{org}/{name}");
    repos.get(kind, &id).ok_or_else(|| {
        Box::new(error(
            StatusCode::NOT_FOUND,
            "RepoNotFound",
            format!("Repository Not Found for {}: {id}", kind.plural()),
        ))
    })
}

fn check_revision(repo: &ServedRepo, rev: &str) -> Result<(), Box<Response>> {
    if repo.has_revision(rev) {
        Ok(())
    } else {
        Err(Box::new(error(
            StatusCode::NOT_FOUND,
            "RevisionNotFound",
            format!("Invalid rev id: {rev}"),
        )))
    }
}

/// Who may read a repo, as its card says.
#[derive(Debug, Clone, Copy)]
struct Restricted {
    gated: bool,
    private: bool,
}

fn repo_info(repo: &ServedRepo, rev: &str, Restricted { gated, private }: Restricted) -> Response {
    if let Err(resp) = check_revision(repo, rev) {
        return *resp;
    }
    Json(RepoInfo {
        id: repo.id.to_string(),
        sha: repo.commit.clone(),
        siblings: repo
            .files
            .keys()
            .map(|p| Sibling {
                rfilename: p.to_string(),
            })
            .collect(),
        private,
        gated: if gated {
            serde_json::Value::from("manual")
        } else {
            serde_json::Value::from(false)
        },
    })
    .into_response()
}

fn tree(repo: &ServedRepo, rev: &str, path: &str, recursive: bool) -> Response {
    if let Err(resp) = check_revision(repo, rev) {
        return *resp;
    }
    let entries = repo.tree(path, recursive);
    if entries.is_empty() && !path.is_empty() {
        return error(
            StatusCode::NOT_FOUND,
            "EntryNotFound",
            format!("{path} does not exist at {rev}"),
        );
    }
    Json(entries).into_response()
}

async fn resolve(
    hub: &Hub,
    kind: RepoKind,
    (org, name, rev, path): (&str, &str, &str, String),
    req: Request,
) -> Response {
    let path = path.as_str();
    let repo = match hub.repo(kind, org, name, req.headers()) {
        Ok(r) => r,
        Err(resp) => return *resp,
    };
    if let Err(resp) = check_revision(repo, rev) {
        return *resp;
    }
    let file = RepoPath::parse(path).ok().and_then(|p| repo.files.get(&p));
    let Some(file) = file else {
        return error(
            StatusCode::NOT_FOUND,
            "EntryNotFound",
            format!("{path} does not exist at {rev}"),
        );
    };
    let redirect = match (&hub.cdn, &file.lfs_sha256) {
        (Some(cdn), Some(sha)) => Some(format!(
            "{}/cdn/{sha}?expires={}",
            cdn.trim_end_matches('/'),
            unix_now() + hub.cdn_link_ttl.as_secs()
        )),
        _ => None,
    };
    let mut resp = match redirect {
        Some(location) => {
            let mut r = StatusCode::FOUND.into_response();
            if let Ok(v) = HeaderValue::from_str(&location) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            r
        }
        None => match send_file(hub, file, req).await {
            Ok(r) => r,
            Err(resp) => return resp,
        },
    };
    let h = resp.headers_mut();
    let commit = HeaderValue::from_str(&repo.commit).expect("hex is a valid header");
    h.insert(X_REPO_COMMIT, commit);
    let etag = |s: &str| HeaderValue::from_str(&format!("\"{s}\"")).expect("hex is a valid header");
    match &file.lfs_sha256 {
        Some(sha) => {
            h.insert(header::ETAG, etag(sha));
            h.insert(X_LINKED_ETAG, etag(sha));
            h.insert(X_LINKED_SIZE, HeaderValue::from(file.size));
        }
        None => {
            h.insert(header::ETAG, etag(&file.git_oid));
        }
    }
    resp
}

/// The CDN: an LFS file by sha256, for anyone with an unexpired URL, and only without a token.
async fn cdn(hub: &Hub, sha256: &str, req: Request) -> Response {
    let expires = req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("expires="))
            .and_then(|v| v.parse::<u64>().ok())
    });
    if expires.is_none_or(|t| t < unix_now()) {
        return error(
            StatusCode::FORBIDDEN,
            "AccessDenied",
            "Request has expired".into(),
        );
    }
    if req.headers().contains_key(header::AUTHORIZATION) {
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidArgument",
            "Only one auth mechanism allowed: the URL is presigned, send no Authorization".into(),
        );
    }
    let Some(file) = hub.lfs_blob(sha256) else {
        return error(StatusCode::NOT_FOUND, "NoSuchKey", "no such object".into());
    };
    let mut resp = match send_file(hub, file, req).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let etag = HeaderValue::from_str(&format!("\"{sha256}\"")).expect("hex is a valid header");
    resp.headers_mut().insert(header::ETAG, etag);
    resp
}

/// A file's bytes, honouring `Range` and `HEAD`, with the body faults applied.
async fn send_file(hub: &Hub, file: &ServedFile, req: Request) -> Result<Response, Response> {
    // 1 MiB reads: a quarter of the default's CPU per byte when many clients pull at once.
    let resp = ServeFile::new(&file.disk_path)
        .with_buf_chunk_size(1 << 20)
        .oneshot(req)
        .await
        .map_err(|e| {
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "ServerError",
                format!("reading {}: {e}", file.disk_path.display()),
            )
        })?;
    let (parts, body) = resp.into_parts();
    let len = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(file.size);
    let body = Body::new(body);
    #[cfg(feature = "faults")]
    let body = hub.faults.body(body, len);
    // The bytes that leave the hub, as they leave: its egress.
    let sent = hub.requests.clone();
    let body = Body::from_stream(futures::StreamExt::map(body.into_data_stream(), move |c| {
        if let Ok(bytes) = &c {
            sent.add("file_bytes", bytes.len() as u64);
        }
        c
    }));
    #[cfg(not(feature = "faults"))]
    let _ = (hub, len);
    Ok(Response::from_parts(parts, body))
}
