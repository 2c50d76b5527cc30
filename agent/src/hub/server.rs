//! `serve-hub`: a read-only HTTP server speaking the part of the Hub protocol that
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
//! [`Faults`] make it misbehave on purpose, for tests of clients: slow bodies, 5xx and 429
//! answers, added latency, bodies cut off or with a wrong byte.

use crate::hub::catalog::{Catalog, ServedFile, ServedRepo};
use crate::hub::wire::{
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

/// Deliberate misbehaviour, for tests of what a slow or faulty hub does to clients. Shares are
/// probabilities in `[0, 1]`, drawn per request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// Serve each file body at most this fast (per response, so per connection at a time).
    pub max_bytes_per_second: Option<std::num::NonZeroU64>,
    /// Share of requests answered `503` (with `Retry-After: 1`) or `500`, half each.
    pub server_errors: f64,
    /// Share of requests answered `429` with `Retry-After: 1` and an exhausted `RateLimit`.
    pub rate_limits: f64,
    /// Share of file bodies cut off halfway (the connection drops).
    pub truncations: f64,
    /// Share of file bodies with one byte changed.
    pub corruptions: f64,
    /// Added before every answer.
    pub latency: std::time::Duration,
}

impl Faults {
    fn roll(share: f64) -> bool {
        share > 0.0 && rand::random::<f64>() < share
    }

    /// A fault answer to send instead of the real one, if the dice say so.
    fn answer(&self) -> Option<Response> {
        if Self::roll(self.rate_limits) {
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                "RateLimited",
                "injected: too many requests".into(),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r.headers_mut()
                .insert("ratelimit", HeaderValue::from_static("\"api\";r=0;t=1"));
            return Some(r);
        }
        if Self::roll(self.server_errors) {
            let mut r = if rand::random::<bool>() {
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServerError",
                    "injected: unavailable".into(),
                )
            } else {
                error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "ServerError",
                    "injected: internal error".into(),
                )
            };
            if r.status() == StatusCode::SERVICE_UNAVAILABLE {
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            return Some(r);
        }
        None
    }

    /// The body as sent: throttled, cut off or corrupted as configured.
    fn body(&self, body: Body, len: u64) -> Body {
        use futures::StreamExt;
        let body = match self.max_bytes_per_second {
            Some(rate) => throttle(body, rate.get()),
            None => body,
        };
        let cut_at = Self::roll(self.truncations).then_some(len / 2);
        let flip_at = Self::roll(self.corruptions).then(|| rand::random_range(0..len.max(1)));
        if cut_at.is_none() && flip_at.is_none() {
            return body;
        }
        let mut at = 0u64;
        let stream = body.into_data_stream().flat_map(move |chunk| {
            let items: Vec<Result<bytes::Bytes, axum::Error>> = match chunk {
                Err(e) => vec![Err(e)],
                Ok(chunk) => {
                    let start = at;
                    at += chunk.len() as u64;
                    let mut b = bytes::BytesMut::from(&chunk[..]);
                    if let Some(flip) = flip_at.filter(|f| (start..at).contains(f)) {
                        b[(flip - start) as usize] ^= 0x55;
                    }
                    match cut_at.filter(|&c| at > c) {
                        // An error item makes the server drop the connection mid-body.
                        Some(cut) => {
                            b.truncate((cut - start.min(cut)) as usize);
                            vec![
                                Ok(b.freeze()),
                                Err(axum::Error::new("injected: connection cut")),
                            ]
                        }
                        None => vec![Ok(b.freeze())],
                    }
                }
            };
            futures::stream::iter(items)
        });
        Body::from_stream(stream)
    }
}

/// What the server serves, and how.
#[derive(Debug, Default)]
pub struct Hub {
    /// The repos.
    pub catalog: Catalog,
    /// Gated repos and the tokens that may read them; every other repo is public.
    pub gated: BTreeMap<RepoId, Vec<String>>,
    /// Faults to inject.
    pub faults: Faults,
    /// Base URL of the CDN that LFS files redirect to (this server's `/cdn/` route, reached under
    /// another host name so that it is another origin); None: LFS files are served in place.
    pub cdn: Option<String>,
    /// How long a CDN link stays valid, as a presigned URL's expiry.
    pub cdn_link_ttl: std::time::Duration,
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
        self.catalog
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
        let repo = find_repo(&self.catalog, kind, org, name)?;
        let Some(allowed) = self.gated.get(&repo.id) else {
            return Ok(repo);
        };
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
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

/// Serves the catalogue on `listener` until `shutdown` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    hub: Arc<Hub>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(hub))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

fn error(status: StatusCode, code: &'static str, message: String) -> Response {
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
    if !hub.faults.latency.is_zero() {
        tokio::time::sleep(hub.faults.latency).await;
    }
    if let Some(resp) = hub.faults.answer() {
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
            let repo = match hub.repo(kind, org, name, req.headers()) {
                Ok(r) => r,
                Err(resp) => return *resp,
            };
            let gated = hub.gated.contains_key(&repo.id);
            match rest {
                [] => repo_info(repo, "main", gated),
                ["revision", rev] => repo_info(repo, rev, gated),
                ["tree", rev, path @ ..] => tree(repo, rev, &path.join("/"), recursive),
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
    catalog: &'a Catalog,
    kind: RepoKind,
    org: &str,
    name: &str,
) -> Result<&'a ServedRepo, Box<Response>> {
    let id = format!("{org}/{name}");
    catalog.get(kind, &id).ok_or_else(|| {
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

fn repo_info(repo: &ServedRepo, rev: &str, gated: bool) -> Response {
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
        private: false,
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
    Ok(Response::from_parts(
        parts,
        hub.faults.body(Body::new(body), len),
    ))
}

/// A body that yields at most `rate` bytes a second, in slices of at most 64 KiB.
fn throttle(body: Body, rate: u64) -> Body {
    use futures::StreamExt;
    const SLICE: usize = 64 * 1024;
    let slices = body.into_data_stream().flat_map(|chunk| {
        let pieces: Vec<Result<bytes::Bytes, axum::Error>> = match chunk {
            Ok(mut b) => {
                let mut out = Vec::new();
                while !b.is_empty() {
                    out.push(Ok(b.split_to(b.len().min(SLICE))));
                }
                out
            }
            Err(e) => vec![Err(e)],
        };
        futures::stream::iter(pieces)
    });
    Body::from_stream(slices.then(move |piece| async move {
        if let Ok(b) = &piece {
            let secs = b.len() as f64 / rate as f64;
            tokio::time::sleep(std::time::Duration::from_secs_f64(secs)).await;
        }
        piece
    }))
}
