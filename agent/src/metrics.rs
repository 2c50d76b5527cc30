//! Prometheus metrics (text format, `prometheus-client`) and health, served on
//! `--metrics-listen`:
//!
//! - `/metrics`: the store (bytes used and capacity of its filesystem, bytes of blobs,
//!   snapshots, pins; compilation caches, their bytes and volumes), read at each scrape; publishes that found their model in the store,
//!   started a fetch or joined one; fetches by outcome and their durations; bytes fetched per source (their
//!   rate is the download throughput); evictions and bytes freed per reason; hub errors per kind;
//!   hub requests per purpose and publishes served a stale revision per reason.
//! - `/healthz`: the process answers.
//! - `/readyz`: the agent API is serving and the store is readable.

use crate::caches::Caches;
use crate::evict::{Evictor, Reason};
use crate::fetch::{FetchError, HubCounters, ProgressView};
use crate::store::{Pins, Store};
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The agent's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Publishes (Ensure calls) that found the model (`hit`) or started its fetch (`miss`).
    pub publishes: Family<CacheResult, Counter>,
    /// Fetches by outcome (`ok`, `error`).
    pub fetches: Family<FetchResult, Counter>,
    /// Seconds a successful fetch took.
    pub fetch_seconds: Histogram,
    /// Bytes fetched, per source (`hub`, `shared-cache`).
    pub fetched_bytes: Family<Source, Counter>,
    /// Hub errors that failed a resolve or a fetch, per kind.
    pub hub_errors: Family<ErrorKind, Counter>,
    /// Bytes this node sent to peers (its peer server counts them).
    pub peer_served: Counter,
    ready: Arc<AtomicBool>,
}

macro_rules! one_label {
    ($name:ident, $key:ident) => {
        #[doc = concat!("The `", stringify!($key), "` label.")]
        #[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
        pub struct $name {
            #[doc = concat!("The ", stringify!($key), ".")]
            pub $key: &'static str,
        }
    };
}
one_label!(CacheResult, result);
one_label!(FetchResult, result);
one_label!(Source, source);
one_label!(ErrorKind, kind);
one_label!(Purpose, purpose);
one_label!(StaleReason, reason);

impl Metrics {
    /// Metrics of the agent serving `store`, with `pins`, kept in shape by `evictor`, asking
    /// the hub as `hub` counts.
    pub fn new(
        store: Arc<Store>,
        pins: Arc<Mutex<Pins>>,
        evictor: Arc<Evictor>,
        caches: Arc<Caches>,
        hub: &HubCounters,
    ) -> Self {
        let mut registry = Registry::with_prefix("modelcache");
        registry.register(
            "hub_requests",
            "Requests to the hub before a fetch, by purpose: revision (which commit a branch or tag names), access (may a token read a restricted repo), tree (a commit's file list)",
            hub.requests.clone(),
        );
        registry.register(
            "stale_serves",
            "Publishes served the commit a revision last resolved to without a fresh answer from the hub, by reason: expired (past --revision-ttl, asked again in the background), outage (the hub could not be asked)",
            hub.stale_serves.clone(),
        );
        let publishes = Family::<CacheResult, Counter>::default();
        registry.register(
            "publishes",
            "Publishes that found their model in the store (hit), started its fetch (miss) or joined a fetch already running (join)",
            publishes.clone(),
        );
        let fetches = Family::<FetchResult, Counter>::default();
        registry.register(
            "fetches",
            "Fetches of a snapshot, by outcome",
            fetches.clone(),
        );
        let fetch_seconds = Histogram::new(exponential_buckets(0.25, 2.0, 14));
        registry.register(
            "fetch_duration_seconds",
            "Seconds a successful fetch of a snapshot took",
            fetch_seconds.clone(),
        );
        let fetched_bytes = Family::<Source, Counter>::default();
        registry.register(
            "fetched_bytes",
            "Bytes fetched and verified, per source (hub, shared-cache); their rate is the throughput",
            fetched_bytes.clone(),
        );
        let hub_errors = Family::<ErrorKind, Counter>::default();
        registry.register(
            "hub_errors",
            "Hub errors that failed a resolve or a fetch, per kind",
            hub_errors.clone(),
        );
        let peer_served = Counter::default();
        registry.register(
            "peer_served_bytes",
            "Bytes of blobs this node sent to other agents (--peer-listen)",
            peer_served.clone(),
        );
        registry.register_collector(Box::new(StoreCollector {
            store,
            pins,
            evictor,
            caches,
        }));
        Metrics {
            registry,
            publishes,
            fetches,
            fetch_seconds,
            fetched_bytes,
            hub_errors,
            peer_served,
            ready: Arc::default(),
        }
    }

    /// Records a finished fetch.
    pub fn fetched(&self, seconds: f64, progress: ProgressView) {
        self.fetches
            .get_or_create(&FetchResult { result: "ok" })
            .inc();
        self.fetch_seconds.observe(seconds);
        let by_source = [
            ("hub", progress.bytes_downloaded),
            ("shared-cache", progress.bytes_imported),
            ("peers", progress.bytes_from_peers),
        ];
        for (source, bytes) in by_source {
            self.fetched_bytes
                .get_or_create(&Source { source })
                .inc_by(bytes);
        }
    }

    /// Records a failed fetch.
    pub fn fetch_failed(&self, e: &FetchError) {
        self.fetches
            .get_or_create(&FetchResult { result: "error" })
            .inc();
        self.hub_error(e);
    }

    /// Counts `e` if the hub caused it.
    pub fn hub_error(&self, e: &FetchError) {
        if let FetchError::Hub(h) = e {
            self.hub_errors
                .get_or_create(&ErrorKind { kind: h.kind() })
                .inc();
        }
    }

    /// Says whether the agent API serves.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String does not fail");
        out
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown`.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> std::io::Result<()> {
        use axum::http::{StatusCode, header};
        use axum::routing::get;
        let metrics = self.clone();
        let app = axum::Router::new()
            .route(
                "/metrics",
                get(move || {
                    let metrics = metrics.clone();
                    async move {
                        let body = tokio::task::spawn_blocking(move || metrics.render())
                            .await
                            .unwrap_or_default();
                        (
                            [(
                                header::CONTENT_TYPE,
                                "text/plain; version=0.0.4; charset=utf-8",
                            )],
                            body,
                        )
                    }
                }),
            )
            .route("/healthz", get(|| async { "ok\n" }))
            .route(
                "/readyz",
                get(move || {
                    let ready = self.ready.load(Ordering::Relaxed);
                    async move {
                        if ready {
                            (StatusCode::OK, "ready\n")
                        } else {
                            (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
                        }
                    }
                }),
            );
        serve_bounded(listener, app, Limits::default(), shutdown).await;
        Ok(())
    }
}

/// What the metrics listener allows, so that it can never starve the node of file descriptors
/// or hold a connection for ever.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once; past it a new connection is closed at once.
    pub connections: usize,
    /// Time to send a request's headers.
    pub header_timeout: Duration,
    /// Time a connection may stay open in all.
    pub deadline: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections: 32,
            header_timeout: Duration::from_secs(5),
            deadline: Duration::from_secs(30),
        }
    }
}

/// Serves `app` over HTTP/1 on `listener` within `limits`, until `shutdown`. One request per
/// connection (Prometheus and kubelet's probes open one each time).
pub async fn serve_bounded(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    limits: Limits,
    shutdown: tokio_util::sync::CancellationToken,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.connections));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = shutdown.cancelled() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and the like: wait instead of spinning, keep serving.
                tracing::warn!(error = %e, "metrics listener cannot accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .keep_alive(false);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = tokio::time::timeout(limits.deadline, conn) => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

/// Reads the store and the evictor's counters at each scrape.
#[derive(Debug)]
struct StoreCollector {
    store: Arc<Store>,
    pins: Arc<Mutex<Pins>>,
    evictor: Arc<Evictor>,
    caches: Arc<Caches>,
}

impl prometheus_client::collector::Collector for StoreCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut gauge = |name: &str, help: &str, value: u64| {
            let m = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value as i64).encode(m)
        };
        if let Ok(st) = nix::sys::statvfs::statvfs(self.store.root()) {
            let frag = st.fragment_size();
            let total = st.blocks() * frag;
            let used = total - st.blocks_available() * frag;
            gauge(
                "store_filesystem_used_bytes",
                "Bytes used on the store's filesystem",
                used,
            )?;
            gauge(
                "store_filesystem_capacity_bytes",
                "Bytes of the store's filesystem",
                total,
            )?;
        }
        if let Ok(bytes) = self.store.bytes_on_disk() {
            gauge(
                "store_bytes",
                "Bytes of the store's blobs and partial downloads",
                bytes,
            )?;
        }
        if let Ok(snaps) = self.store.list_snapshots() {
            gauge(
                "snapshots",
                "Complete snapshots in the store",
                snaps.len() as u64,
            )?;
        }
        let pins = self.pins.lock().expect("pins lock").len();
        gauge("pins", "Volumes that have a snapshot mounted", pins as u64)?;
        let caches = self.caches.list();
        gauge(
            "caches",
            "Compilation caches on the node",
            caches.len() as u64,
        )?;
        gauge(
            "cache_bytes",
            "Bytes the compilation caches take on disk",
            caches.iter().map(|c| c.bytes).sum(),
        )?;
        gauge(
            "cache_volumes",
            "Volumes that have a compilation cache mounted",
            caches.iter().map(|c| c.mounted_by.len() as u64).sum(),
        )?;

        let stats = self.evictor.stats();
        let mut counter = |name: &str, help: &str, values: Vec<(&'static str, u64)>| {
            let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (reason, value) in values {
                let labels = [("reason", reason)];
                ConstCounter::new(value).encode(m.encode_family(&labels)?)?;
            }
            Ok::<_, std::fmt::Error>(())
        };
        let per_reason = |f: &dyn Fn(Reason) -> u64| {
            Reason::ALL
                .iter()
                .map(|r| (r.as_str(), f(*r)))
                .collect::<Vec<_>>()
        };
        counter(
            "evictions",
            "Snapshots evicted, per reason",
            per_reason(&|r| stats.of(r).snapshots.load(Ordering::Relaxed)),
        )?;
        counter(
            "cache_evictions",
            "Compilation caches evicted, per reason",
            per_reason(&|r| stats.of(r).caches.load(Ordering::Relaxed)),
        )?;
        counter(
            "evicted_bytes",
            "Bytes freed by eviction (snapshots and caches), per reason",
            per_reason(&|r| stats.of(r).bytes.load(Ordering::Relaxed)),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    /// Connections the server end still holds open: ESTABLISHED sockets whose local port is
    /// the listener's (one it dropped is in FIN_WAIT). Read from the kernel's table, so other
    /// tests opening and closing files in this process do not move the count.
    fn held_by_server(port: u16) -> usize {
        let table = std::fs::read_to_string("/proc/self/net/tcp").unwrap();
        table
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|f| f.len() > 3 && f[3] == "01")
            .filter(|f| {
                let local_port = f[1].rsplit(':').next().unwrap_or("");
                u16::from_str_radix(local_port, 16) == Ok(port)
            })
            .count()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_listener_bounds_connections_and_time() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route("/x", axum::routing::get(|| async { "ok" }));
        let limits = Limits {
            connections: 4,
            header_timeout: Duration::from_millis(300),
            deadline: Duration::from_secs(2),
        };
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(serve_bounded(listener, app, limits, stop.clone()));

        let get = move || {
            let mut c = TcpStream::connect(addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            c.write_all(b"GET /x HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
            let mut out = String::new();
            let _ = c.read_to_string(&mut out);
            out
        };
        assert!(
            tokio::task::spawn_blocking(get)
                .await
                .unwrap()
                .starts_with("HTTP/1.1 200")
        );

        // A request that never finishes its headers is closed after the header timeout.
        let slow = tokio::task::spawn_blocking(move || {
            let mut c = TcpStream::connect(addr).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            c.write_all(b"GET /x HTTP/1.1\r\n").unwrap();
            let started = std::time::Instant::now();
            let mut buf = [0u8; 256];
            let _ = c.read(&mut buf);
            started.elapsed()
        });
        assert!(slow.await.unwrap() < Duration::from_secs(3));

        // Many idle connections: the server holds at most `connections` of them.
        let idle: Vec<TcpStream> = (0..60).map(|_| TcpStream::connect(addr).unwrap()).collect();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let held = held_by_server(addr.port());
        assert!(
            held <= limits.connections,
            "the server holds {held} connections"
        );
        // Once they time out, the listener answers again.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(
            tokio::task::spawn_blocking(get)
                .await
                .unwrap()
                .starts_with("HTTP/1.1 200")
        );
        drop(idle);
        stop.cancel();
    }
}
