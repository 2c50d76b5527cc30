//! Serving this node's blobs to other agents (see [`super`]).

use super::PeerSecret;
use crate::fetch::{Avail, Growing, GrowingBlob, Wanted};
use crate::store::Store;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use modelcache_core::hash::ContentHash;
use prometheus_client::metrics::counter::Counter;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Uploads at once by default.
pub const DEFAULT_MAX_UPLOADS: usize = 8;

/// The peer server's state.
#[derive(Clone)]
pub struct PeerServer {
    store: Arc<Store>,
    wanted: Wanted,
    claims: Wanted,
    secret: PeerSecret,
    /// Uploads of held blobs at once.
    uploads: Arc<Semaphore>,
    /// Uploads of blobs still downloading at once: they go at the download's pace, so more of
    /// them may run ([`FOLLOWERS_PER_UPLOAD`] for each upload).
    following: Arc<Semaphore>,
    served: Counter,
    link: Option<Arc<Link>>,
    growing: Growing,
}

/// Uploads of blobs still downloading allowed for each upload of a held blob. In a first wave
/// every node follows every other's share as it downloads: with the default 8 uploads, 32
/// followers, so that eight nodes each owning a few files all follow them at once instead of
/// waiting for a free upload until the download ends.
pub const FOLLOWERS_PER_UPLOAD: usize = 4;

/// An upload link of a fixed rate that every upload shares: each chunk waits for its turn.
#[derive(Debug)]
pub struct Link {
    bytes_per_second: f64,
    next_free: std::sync::Mutex<tokio::time::Instant>,
}

impl Link {
    /// A link of `bytes_per_second`.
    pub fn new(bytes_per_second: u64) -> Self {
        Link {
            bytes_per_second: bytes_per_second.max(1) as f64,
            next_free: std::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    /// Waits for `n` bytes' turn.
    async fn take(&self, n: usize) {
        let start = {
            let mut next = self.next_free.lock().expect("link lock");
            let now = tokio::time::Instant::now();
            let start = (*next).max(now);
            *next = start + std::time::Duration::from_secs_f64(n as f64 / self.bytes_per_second);
            start
        };
        tokio::time::sleep_until(start).await;
    }
}

impl std::fmt::Debug for PeerServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerServer")
            .field("served", &self.served.get())
            .finish_non_exhaustive()
    }
}

impl PeerServer {
    /// Serves `store`'s blobs to holders of `secret`, at most `max_uploads` at once, counting
    /// the bytes sent in `served`, and says which blobs this node's running fetches `wanted`
    /// and which it `claims` (gets from the hub for its peers).
    pub fn new(
        store: Arc<Store>,
        wanted: Wanted,
        claims: Wanted,
        secret: PeerSecret,
        max_uploads: usize,
        served: Counter,
    ) -> Self {
        PeerServer {
            store,
            wanted,
            claims,
            secret,
            uploads: Arc::new(Semaphore::new(max_uploads.max(1))),
            following: Arc::new(Semaphore::new(max_uploads.max(1) * FOLLOWERS_PER_UPLOAD)),
            served,
            link: None,
            growing: Growing::default(),
        }
    }

    /// Serves the blobs `growing` holds as they download.
    pub fn with_growing(mut self, growing: Growing) -> Self {
        self.growing = growing;
        self
    }

    /// Caps uploads, all together, at `bytes_per_second`.
    pub fn with_upload_limit(mut self, bytes_per_second: Option<u64>) -> Self {
        self.link = bytes_per_second.map(|r| Arc::new(Link::new(r)));
        self
    }

    /// The routes.
    pub fn router(self) -> axum::Router {
        axum::Router::new()
            .route("/v1/blobs/{name}", axum::routing::get(blob))
            .route("/v1/status", axum::routing::post(status))
            .layer(axum::extract::DefaultBodyLimit::max(MAX_STATUS_BODY))
            .fallback(|| async { refuse(StatusCode::NOT_FOUND, "no such route") })
            .with_state(self)
    }

    /// Serves on `listener` until `shutdown`.
    pub async fn serve(self, listener: tokio::net::TcpListener, shutdown: CancellationToken) {
        let app = self.router();
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "the peer server stopped");
        }
    }
}

/// The largest status request: about 100,000 blob names.
pub const MAX_STATUS_BODY: usize = 8 << 20;

/// Which of some blobs a node holds, and which its running fetches want (and will hold).
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Status {
    /// Held.
    pub have: Vec<String>,
    /// Wanted by a fetch running now, not held yet.
    pub want: Vec<String>,
    /// Being got from the hub by this node for its peers (a first wave's share).
    #[serde(default)]
    pub claim: Vec<String>,
}

/// A status request: blob names (`<algo>-<hex>`).
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StatusRequest {
    /// The blobs asked about.
    pub blobs: Vec<String>,
}

/// None when the request carries the secret; else the 401 to answer.
fn unauthorized(server: &PeerServer, headers: &HeaderMap) -> Option<Response> {
    let offered = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if offered.is_some_and(|t| server.secret.accepts(t)) {
        return None;
    }
    let mut r = refuse(
        StatusCode::UNAUTHORIZED,
        "the cluster's peer secret is required",
    );
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    Some(r)
}

async fn status(
    State(server): State<PeerServer>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(r) = unauthorized(&server, &headers) {
        return r;
    }
    let Ok(req) = serde_json::from_slice::<StatusRequest>(&body) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            "expected {\"blobs\": [\"<algo>-<hex>\", …]}",
        );
    };
    let mut answer = Status::default();
    for name in req.blobs {
        let Some(hash) = ContentHash::from_file_name(&name) else {
            continue;
        };
        if server.store.has_blob(&hash) {
            answer.have.push(name);
        } else if server.claims.contains(&hash) {
            answer.claim.push(name);
        } else if server.wanted.contains(&hash) {
            answer.want.push(name);
        }
    }
    axum::Json(answer).into_response()
}

fn refuse(status: StatusCode, why: &str) -> Response {
    (status, format!("{why}\n")).into_response()
}

/// `bytes=a-b` or `bytes=a-` within `len`: the first and last byte; `Err` for a range that
/// cannot be served (416); `Ok(None)` without a Range header.
fn range(headers: &HeaderMap, len: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(v) = headers.get(header::RANGE) else {
        return Ok(None);
    };
    let spec = v.to_str().map_err(drop)?.strip_prefix("bytes=").ok_or(())?;
    let (a, b) = spec.split_once('-').ok_or(())?;
    let first: u64 = a.parse().map_err(drop)?;
    let last: u64 = match b {
        "" => len.checked_sub(1).ok_or(())?,
        b => b.parse::<u64>().map_err(drop)?.min(len.saturating_sub(1)),
    };
    if first > last || first >= len {
        return Err(());
    }
    Ok(Some((first, last)))
}

async fn blob(
    State(server): State<PeerServer>,
    UrlPath(name): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = unauthorized(&server, &headers) {
        return r;
    }
    let Some(hash) = ContentHash::from_file_name(&name) else {
        return refuse(StatusCode::BAD_REQUEST, "not a blob name (<algo>-<hex>)");
    };
    let busy = || {
        let mut r = refuse(StatusCode::SERVICE_UNAVAILABLE, "busy: too many uploads");
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        r
    };
    if !server.store.has_blob(&hash) {
        // Still downloading: the part written so far, then the rest as it comes.
        if let Some(blob) = server.growing.get(&hash) {
            let Ok(permit) = server.following.clone().try_acquire_owned() else {
                return busy();
            };
            if let Ok(file) = tokio::fs::File::open(&blob.path).await {
                return growing_response(
                    file,
                    blob,
                    permit,
                    server.served.clone(),
                    server.link.clone(),
                );
            }
        }
        if server.store.has_blob(&hash) {
            // Done between the two looks: served whole below.
        } else if server.claims.contains(&hash) || server.wanted.contains(&hash) {
            let mut r = refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "not started yet: ask again",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return r;
        } else {
            return refuse(StatusCode::NOT_FOUND, "this node does not hold that blob");
        }
    }
    let Ok(permit) = server.uploads.clone().try_acquire_owned() else {
        return busy();
    };
    let path = server.store.blob_path(&hash);
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(_) => return refuse(StatusCode::NOT_FOUND, "this node does not hold that blob"),
    };
    let len = match file.metadata().await {
        Ok(m) => m.len(),
        Err(_) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the blob"),
    };
    let (status, first, count) = match range(&headers, len) {
        Ok(None) => (StatusCode::OK, 0, len),
        Ok(Some((a, b))) => (StatusCode::PARTIAL_CONTENT, a, b - a + 1),
        Err(()) => {
            let mut r = refuse(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable");
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return r;
        }
    };
    if first > 0 && file.seek(std::io::SeekFrom::Start(first)).await.is_err() {
        return refuse(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the blob");
    }
    let (served, link) = (server.served.clone(), server.link.clone());
    // The permit lives as long as the body streams; each chunk waits for its turn on the
    // upload link when one is set.
    let stream =
        tokio_util::io::ReaderStream::with_capacity(file.take(count), super::TRANSFER_BUFFER).then(
            move |chunk| {
                let (served, link) = (served.clone(), link.clone());
                let _held = &permit;
                async move {
                    if let Ok(c) = &chunk {
                        if let Some(link) = &link {
                            link.take(c.len()).await;
                        }
                        served.inc_by(c.len() as u64);
                    }
                    chunk
                }
            },
        );
    let mut r = Response::new(Body::from_stream(stream));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {first}-{}/{len}", first + count - 1))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    r
}

/// A blob still downloading, sent as it grows: what is written, then each part as it is
/// written, until it is done; a failed download breaks the body off (the peer that reads it
/// goes elsewhere).
fn growing_response(
    file: tokio::fs::File,
    blob: GrowingBlob,
    permit: tokio::sync::OwnedSemaphorePermit,
    served: Counter,
    link: Option<Arc<Link>>,
) -> Response {
    struct State {
        file: tokio::fs::File,
        sent: u64,
        size: u64,
        avail: tokio::sync::watch::Receiver<Avail>,
        _permit: tokio::sync::OwnedSemaphorePermit,
        served: Counter,
        link: Option<Arc<Link>>,
    }
    let size = blob.size;
    let state = State {
        file,
        sent: 0,
        size,
        avail: blob.avail,
        _permit: permit,
        served,
        link,
    };
    let stream = futures::stream::unfold(state, |mut st| async move {
        loop {
            if st.sent >= st.size {
                return None;
            }
            let now = *st.avail.borrow_and_update();
            let ready = match now {
                Avail::Growing(n) => n.min(st.size),
                Avail::Done => st.size,
                Avail::Failed => {
                    let e = std::io::Error::other("the download failed");
                    st.sent = st.size;
                    return Some((Err(e), st));
                }
            };
            if ready > st.sent {
                let want = (ready - st.sent).min(super::TRANSFER_BUFFER as u64) as usize;
                let mut buf = vec![0u8; want];
                let n = match st.file.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let e = std::io::Error::other("cannot read the growing blob");
                        st.sent = st.size;
                        return Some((Err(e), st));
                    }
                    Ok(n) => n,
                };
                buf.truncate(n);
                if let Some(link) = &st.link {
                    link.take(n).await;
                }
                st.sent += n as u64;
                st.served.inc_by(n as u64);
                return Some((Ok(bytes::Bytes::from(buf)), st));
            }
            if st.avail.changed().await.is_err() {
                // The download's handle went without a last word: as good as failed, unless
                // it said done.
                if *st.avail.borrow() != Avail::Done {
                    let e = std::io::Error::other("the download stopped");
                    st.sent = st.size;
                    return Some((Err(e), st));
                }
            }
        }
    });
    let mut r = Response::new(Body::from_stream(stream));
    let h = r.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::RANGE, HeaderValue::from_str(v).unwrap());
            m
        };
        assert_eq!(range(&HeaderMap::new(), 10), Ok(None));
        assert_eq!(range(&h("bytes=0-3"), 10), Ok(Some((0, 3))));
        assert_eq!(range(&h("bytes=4-"), 10), Ok(Some((4, 9))));
        assert_eq!(range(&h("bytes=4-100"), 10), Ok(Some((4, 9))));
        for bad in [
            "bytes=10-",
            "bytes=5-4",
            "bytes=-3",
            "items=0-1",
            "bytes=a-b",
            "bytes=0-1,3-4",
        ] {
            assert_eq!(range(&h(bad), 10), Err(()), "{bad}");
        }
        assert_eq!(range(&h("bytes=0-"), 0), Err(()));
    }
}
