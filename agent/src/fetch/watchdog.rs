//! The bound on a download that stopped moving.
//!
//! Each layer of a download has its own bound: a request's tries, a range's continuations after
//! a cut, a blob's tries. Their product was the worst case: against a hub that accepts
//! connections and then says nothing, 25 tries of a 60 s read timeout for one file. The
//! watchdog bounds them all at once: a file fails once less than [`STALL_BYTES`] of it arrived
//! in [`Tuning::stall`](super::Tuning::stall) while it held a connection, counted across tries.

use modelcache_hub::client::Liveness;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The bytes a download must move in the stall time to count as moving: a trickle below this
/// is as good as a stall.
pub const STALL_BYTES: u64 = 64 << 10;

/// What one try of a file did: the bytes it added to the progress, the bytes that arrived, the
/// connections it holds, and what the hub client saw of its requests.
#[derive(Debug, Default)]
pub(super) struct Tally {
    counted: AtomicU64,
    received: AtomicU64,
    open: AtomicUsize,
    liveness: Liveness,
}

/// A connection held by a try, counted while this lives.
pub(super) struct Open<'a>(&'a Tally);

impl Tally {
    /// `n` bytes added to the progress (kept from an earlier try, or received).
    pub fn count(&self, n: u64) {
        self.counted.fetch_add(n, Ordering::Relaxed);
    }

    /// `n` bytes arrived (and were added to the progress).
    pub fn receive(&self, n: u64) {
        self.count(n);
        self.received.fetch_add(n, Ordering::Relaxed);
    }

    /// The bytes this try added to the progress.
    pub fn counted(&self) -> u64 {
        self.counted.load(Ordering::Relaxed)
    }

    /// For the hub client to report answers and waits.
    pub fn liveness(&self) -> &Liveness {
        &self.liveness
    }

    /// Counts a connection as held until the guard drops.
    pub fn open(&self) -> Open<'_> {
        self.open.fetch_add(1, Ordering::Relaxed);
        Open(self)
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Watches the tries of one file.
pub(super) struct Watchdog {
    limit: Duration,
    /// When the file last moved, or last waited for a connection.
    moved_at: Instant,
    /// The try's received bytes then.
    moved_bytes: u64,
    /// The try's answers from the hub then.
    answers: u64,
}

/// The watchdog ended a try.
#[derive(Debug)]
pub(super) struct Stalled;

impl Watchdog {
    pub fn new(limit: Duration) -> Self {
        Watchdog {
            limit,
            moved_at: Instant::now(),
            moved_bytes: 0,
            answers: 0,
        }
    }

    /// Runs `attempt`, whose work `tally` counts, until it ends or stalls. A try moves when
    /// bytes arrive or the hub answers; time holding no connection (waiting for one from the
    /// budget) or waiting between tries on purpose (backoff, `Retry-After`) does not count.
    pub async fn watch<T>(
        &mut self,
        attempt: impl Future<Output = T>,
        tally: &Tally,
    ) -> Result<T, Stalled> {
        (self.moved_bytes, self.answers) = (0, 0);
        let mut attempt = std::pin::pin!(attempt);
        let mut tick = tokio::time::interval((self.limit / 8).min(Duration::from_secs(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                done = &mut attempt => {
                    // What the try's end showed (an answer, say) counts before the next wait.
                    self.observe(tally);
                    return Ok(done);
                }
                _ = tick.tick() => {
                    if self.observe(tally) {
                        return Err(Stalled);
                    }
                }
            }
        }
    }

    /// Notes whether the try moved since last seen; true when it has not for the limit.
    fn observe(&mut self, tally: &Tally) -> bool {
        let received = tally.received.load(Ordering::Relaxed);
        let answers = tally.liveness.answers();
        let waiting = tally.open.load(Ordering::Relaxed) == 0 || tally.liveness.resting();
        if waiting || received >= self.moved_bytes + STALL_BYTES || answers > self.answers {
            (self.moved_at, self.moved_bytes, self.answers) = (Instant::now(), received, answers);
        }
        self.moved_at.elapsed() >= self.limit
    }

    /// True when waiting `wait` more before the next try would pass the limit with nothing
    /// moving.
    pub fn expired_after(&self, wait: Duration) -> bool {
        self.moved_at.elapsed() + wait >= self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_millis(400);

    #[tokio::test]
    async fn a_try_holding_a_connection_and_moving_nothing_is_ended() {
        let tally = Tally::default();
        let mut dog = Watchdog::new(LIMIT);
        let started = Instant::now();
        let _open = tally.open();
        let res = dog.watch(std::future::pending::<()>(), &tally).await;
        assert!(res.is_err());
        assert!(started.elapsed() < LIMIT * 3, "{:?}", started.elapsed());
        assert!(dog.expired_after(Duration::ZERO));
    }

    #[tokio::test]
    async fn a_try_waiting_for_a_connection_is_not_stalled() {
        let tally = Tally::default();
        let mut dog = Watchdog::new(LIMIT);
        let res = dog.watch(tokio::time::sleep(LIMIT * 3), &tally).await;
        assert!(res.is_ok());
    }

    #[tokio::test]
    async fn a_trickle_is_a_stall_and_a_flow_is_not() {
        for (bytes_per_tick, stalls) in [(STALL_BYTES / 64, true), (STALL_BYTES, false)] {
            let tally = Tally::default();
            let mut dog = Watchdog::new(LIMIT);
            let attempt = async {
                let _open = tally.open();
                for _ in 0..60 {
                    tally.receive(bytes_per_tick);
                    tokio::time::sleep(LIMIT / 20).await;
                }
            };
            let res = dog.watch(attempt, &tally).await;
            assert_eq!(res.is_err(), stalls, "{bytes_per_tick} bytes a tick");
        }
    }

    #[tokio::test]
    async fn answers_and_waits_the_hub_asked_for_are_not_stalls() {
        let tally = Tally::default();
        let mut dog = Watchdog::new(LIMIT);
        let answering = async {
            let _open = tally.open();
            for _ in 0..6 {
                tally.liveness().answered();
                tokio::time::sleep(LIMIT / 2).await;
            }
        };
        assert!(dog.watch(answering, &tally).await.is_ok());
        let resting = async {
            let _open = tally.open();
            tally.liveness().rest(LIMIT * 3);
            tokio::time::sleep(LIMIT * 2).await;
        };
        assert!(dog.watch(resting, &tally).await.is_ok());
    }

    #[tokio::test]
    async fn bytes_kept_from_an_earlier_try_are_not_movement() {
        let tally = Tally::default();
        let mut dog = Watchdog::new(LIMIT);
        let attempt = async {
            let _open = tally.open();
            tally.count(1 << 30);
            std::future::pending::<()>().await
        };
        assert!(dog.watch(attempt, &tally).await.is_err());
        assert_eq!(tally.counted(), 1 << 30);
    }
}
