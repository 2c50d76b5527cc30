//! `serve-hub`: a read-only HTTP server speaking the part of the Hub protocol that
//! huggingface_hub and modelcache download with.
//!
//! | request | answer |
//! |---|---|
//! | `GET /api/{models,datasets}/{org}/{name}[/revision/{rev}]` | repo info with `sha` and `siblings` |
//! | `GET /api/{models,datasets}/{org}/{name}/tree/{rev}[/{path}][?recursive=true]` | tree entries |
//! | `GET,HEAD /[datasets/]{org}/{name}/resolve/{rev}/{path}` | the file, with Range support and `X-Repo-Commit`, `ETag`, `X-Linked-Etag`, `X-Linked-Size` |
//!
//! Errors carry `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`, `GatedRepo`)
//! as the Hub's do. Gated repos need `Authorization: Bearer` with one of their tokens.

use crate::hub::catalog::{Catalog, ServedRepo};
use crate::hub::wire::{
    RepoInfo, Sibling, X_ERROR_CODE, X_ERROR_MESSAGE, X_LINKED_ETAG, X_LINKED_SIZE, X_REPO_COMMIT,
};
use crate::repo::{RepoId, RepoKind, RepoPath};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use percent_encoding::percent_decode_str;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;
use tower_http::services::ServeFile;

/// Deliberate misbehaviour, for tests of what a slow or faulty hub does to clients.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// Serve each file body at most this fast (per request).
    pub max_bytes_per_second: Option<std::num::NonZeroU64>,
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
}

impl Hub {
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
    let resp = match ServeFile::new(&file.disk_path).oneshot(req).await {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "ServerError",
                format!("reading {path}: {e}"),
            );
        }
    };
    let (mut parts, body) = resp.into_parts();
    let h = &mut parts.headers;
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
    let body = Body::new(body);
    let body = match hub.faults.max_bytes_per_second {
        Some(rate) => throttle(body, rate.get()),
        None => body,
    };
    Response::from_parts(parts, body)
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
