//! Deliberate misbehaviour of the test hub (cargo feature `faults`), for tests of what a slow or
//! faulty hub does to clients. Every draw comes from one RNG seeded by [`FaultPlan::seed`], so a
//! failing run can be replayed, and every fault injected is counted, so a test can check that
//! the faults it asked for happened (`GET /_hub/faults`).

use crate::server::error;
use axum::Json;
use axum::body::Body;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Which faults to inject, and how often. Shares are probabilities in `[0, 1]`, drawn per
/// request.
#[derive(Debug, Clone, Copy, Default)]
pub struct FaultPlan {
    /// Serve each file body at most this fast (per response, so per connection at a time).
    pub max_bytes_per_second: Option<std::num::NonZeroU64>,
    /// Serve file bodies at most this fast all together, whatever the number of clients and
    /// connections: the hub's egress link.
    pub max_total_bytes_per_second: Option<std::num::NonZeroU64>,
    /// Share of requests answered `503` (with `Retry-After: 1`) or `500`, half each.
    pub server_errors: f64,
    /// Share of requests answered `429` with `Retry-After: 1` and an exhausted `RateLimit`.
    pub rate_limits: f64,
    /// Share of file bodies cut off halfway (the connection drops).
    pub truncations: f64,
    /// Share of file bodies with one byte changed.
    pub corruptions: f64,
    /// Share of file bodies that stop halfway and never end: the connection stays open and
    /// silent, as behind a proxy that hangs.
    pub stalls: f64,
    /// Added before every answer.
    pub latency: Duration,
    /// Seed of the draws.
    pub seed: u64,
}

/// How many faults of each kind were injected.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Injected {
    /// `500`/`503` answers.
    pub server_errors: u64,
    /// `429` answers.
    pub rate_limits: u64,
    /// Bodies cut off.
    pub truncations: u64,
    /// Bodies with a wrong byte.
    pub corruptions: u64,
    /// Bodies that stopped halfway and hung.
    pub stalls: u64,
}

/// A [`FaultPlan`] in action: its RNG and counters.
#[derive(Debug)]
pub struct Faults {
    plan: FaultPlan,
    /// When the egress link is next free, for `max_total_bytes_per_second`.
    egress: std::sync::Arc<Mutex<tokio::time::Instant>>,
    rng: Mutex<StdRng>,
    server_errors: AtomicU64,
    rate_limits: AtomicU64,
    truncations: AtomicU64,
    corruptions: AtomicU64,
    stalls: AtomicU64,
}

impl Default for Faults {
    fn default() -> Self {
        Self::new(FaultPlan::default())
    }
}

/// The route that reports [`Injected`].
pub const COUNTS_PATH: &str = "/_hub/faults";

impl Faults {
    /// Faults drawn by `plan`.
    pub fn new(plan: FaultPlan) -> Self {
        Self {
            plan,
            egress: std::sync::Arc::new(Mutex::new(tokio::time::Instant::now())),
            rng: Mutex::new(StdRng::seed_from_u64(plan.seed)),
            server_errors: AtomicU64::new(0),
            rate_limits: AtomicU64::new(0),
            truncations: AtomicU64::new(0),
            corruptions: AtomicU64::new(0),
            stalls: AtomicU64::new(0),
        }
    }

    /// What has been injected so far.
    pub fn injected(&self) -> Injected {
        Injected {
            server_errors: self.server_errors.load(Ordering::Relaxed),
            rate_limits: self.rate_limits.load(Ordering::Relaxed),
            truncations: self.truncations.load(Ordering::Relaxed),
            corruptions: self.corruptions.load(Ordering::Relaxed),
            stalls: self.stalls.load(Ordering::Relaxed),
        }
    }

    fn roll(&self, share: f64, count: &AtomicU64) -> bool {
        let hit = share > 0.0 && self.rng.lock().expect("rng lock").random::<f64>() < share;
        if hit {
            count.fetch_add(1, Ordering::Relaxed);
        }
        hit
    }

    /// Waits the added latency, then answers the counts route, or a fault answer to send
    /// instead of the real one if the dice say so.
    pub(crate) async fn before_answer(&self, path: &str) -> Option<Response> {
        if path == COUNTS_PATH {
            return Some(Json(self.injected()).into_response());
        }
        if !self.plan.latency.is_zero() {
            tokio::time::sleep(self.plan.latency).await;
        }
        if self.roll(self.plan.rate_limits, &self.rate_limits) {
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
        if self.roll(self.plan.server_errors, &self.server_errors) {
            let unavailable = self.rng.lock().expect("rng lock").random::<bool>();
            let mut r = if unavailable {
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
            if unavailable {
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            return Some(r);
        }
        None
    }

    /// The body as sent: throttled, cut off, corrupted or hung as planned.
    pub(crate) fn body(&self, body: Body, len: u64) -> Body {
        use futures::StreamExt;
        let body = match self.plan.max_bytes_per_second {
            Some(rate) => throttle(body, rate.get()),
            None => body,
        };
        let body = match self.plan.max_total_bytes_per_second {
            Some(rate) => share_link(body, rate.get(), self.egress.clone()),
            None => body,
        };
        let cut_at = self
            .roll(self.plan.truncations, &self.truncations)
            .then_some(len / 2);
        let flip_at = self
            .roll(self.plan.corruptions, &self.corruptions)
            .then(|| {
                self.rng
                    .lock()
                    .expect("rng lock")
                    .random_range(0..len.max(1))
            });
        let hang_at = self.roll(self.plan.stalls, &self.stalls).then_some(len / 2);
        if cut_at.is_none() && flip_at.is_none() && hang_at.is_none() {
            return body;
        }
        let mut at = 0u64;
        let stream = body.into_data_stream().flat_map(move |chunk| {
            let mut hang = false;
            let items: Vec<Result<bytes::Bytes, axum::Error>> = match chunk {
                Err(e) => vec![Err(e)],
                Ok(chunk) => {
                    let start = at;
                    at += chunk.len() as u64;
                    let mut b = bytes::BytesMut::from(&chunk[..]);
                    if let Some(flip) = flip_at.filter(|f| (start..at).contains(f)) {
                        b[(flip - start) as usize] ^= 0x55;
                    }
                    if let Some(h) = hang_at.filter(|&h| at > h) {
                        b.truncate((h - start.min(h)) as usize);
                        hang = true;
                        vec![Ok(b.freeze())]
                    } else {
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
                }
            };
            let items = futures::stream::iter(items);
            // A hung body sends what it has, then nothing, and never ends.
            match hang {
                true => items.chain(futures::stream::pending()).boxed(),
                false => items.boxed(),
            }
        });
        Body::from_stream(stream)
    }
}

/// A body whose slices (of at most 64 KiB) each wait for their turn on a link of `rate` bytes
/// a second that every body shares: `next_free` is when the link is next free.
fn share_link(
    body: Body,
    rate: u64,
    next_free: std::sync::Arc<Mutex<tokio::time::Instant>>,
) -> Body {
    use futures::StreamExt;
    const SLICE: usize = 64 * 1024;
    let stream = body
        .into_data_stream()
        .flat_map(|chunk| {
            let items: Vec<Result<bytes::Bytes, axum::Error>> = match chunk {
                Err(e) => vec![Err(e)],
                Ok(b) => (0..b.len())
                    .step_by(SLICE)
                    .map(|i| Ok(b.slice(i..(i + SLICE).min(b.len()))))
                    .collect(),
            };
            futures::stream::iter(items)
        })
        .then(move |item| {
            let next_free = next_free.clone();
            async move {
                if let Ok(b) = &item {
                    let start = {
                        let mut next = next_free.lock().expect("egress lock");
                        let now = tokio::time::Instant::now();
                        let start = (*next).max(now);
                        *next = start + Duration::from_secs_f64(b.len() as f64 / rate as f64);
                        start
                    };
                    tokio::time::sleep_until(start).await;
                }
                item
            }
        });
    Body::from_stream(stream)
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
            tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        }
        piece
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_same_seed_draws_the_same_faults_and_counts_them() {
        let plan = FaultPlan {
            server_errors: 0.3,
            corruptions: 0.5,
            seed: 7,
            ..Default::default()
        };
        let draw = || async {
            let f = Faults::new(plan);
            let mut statuses = Vec::new();
            for _ in 0..40 {
                let r = f.before_answer("/api/models/o/r").await;
                statuses.push(r.map(|r| r.status().as_u16()));
                let _ = f.body(Body::from("x"), 1);
            }
            (statuses, f.injected())
        };
        let (a, counted) = draw().await;
        let (b, _) = draw().await;
        assert_eq!(a, b, "one seed, one sequence");
        let answered = a.iter().filter(|s| s.is_some()).count() as u64;
        assert_eq!(counted.server_errors, answered);
        assert!(
            counted.server_errors > 0 && counted.corruptions > 0,
            "{counted:?}"
        );
        assert_eq!((counted.rate_limits, counted.truncations), (0, 0));
    }

    /// Bodies served at once share the egress cap: three bodies of 192 KiB at a total
    /// 1 MiB/s take about 0.56 s together, where each alone would take about 0.19 s.
    #[tokio::test]
    async fn the_total_egress_cap_is_shared_by_every_body() {
        use futures::StreamExt;
        let f = Faults::new(FaultPlan {
            max_total_bytes_per_second: std::num::NonZeroU64::new(1 << 20),
            ..Default::default()
        });
        let started = tokio::time::Instant::now();
        let bodies = (0..3).map(|_| {
            let body = f.body(Body::from(vec![1u8; 192 << 10]), 192 << 10);
            async move {
                let mut n = 0;
                let mut s = body.into_data_stream();
                while let Some(c) = s.next().await {
                    n += c.unwrap().len();
                }
                n
            }
        });
        let sizes = futures::future::join_all(bodies).await;
        assert_eq!(sizes, [192 << 10; 3]);
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(500), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
    }
}
