//! Connections to the hub, shared fairly by the fetches that run at once.
//!
//! One budget of `--connections` serves every fetch. A fetch running alone may use all of it; a
//! fetch that holds fewer than its fair share (the budget divided by the fetches running) gets a
//! connection at once, even past the budget, so slow repos that hold every connection cannot
//! stall an honest one behind them. Connections in use stay under twice the budget (plus one a
//! fetch when there are more fetches than connections).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// The shared budget.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    state: Mutex<State>,
    freed: Notify,
}

#[derive(Debug, Default)]
struct State {
    in_use: usize,
    next: u64,
    held: HashMap<u64, usize>,
}

/// One fetch's claim on the budget; it leaves the budget when dropped.
#[derive(Debug)]
pub struct Share {
    budget: Arc<Budget>,
    id: u64,
}

/// One connection's place in the budget, given back when dropped.
#[derive(Debug)]
pub struct Permit<'a> {
    share: &'a Share,
}

impl Budget {
    /// A budget of `limit` connections (at least one).
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Budget {
            limit: limit.max(1),
            state: Mutex::default(),
            freed: Notify::new(),
        })
    }

    /// A share for one more fetch.
    pub fn share(self: &Arc<Self>) -> Share {
        let mut st = self.state.lock().expect("budget lock");
        let id = st.next;
        st.next += 1;
        st.held.insert(id, 0);
        Share {
            budget: self.clone(),
            id,
        }
    }

    /// Connections in use now.
    #[cfg(test)]
    fn in_use(&self) -> usize {
        self.state.lock().expect("budget lock").in_use
    }
}

impl Share {
    /// Waits for a connection.
    pub async fn acquire(&self) -> Permit<'_> {
        loop {
            let freed = self.budget.freed.notified();
            tokio::pin!(freed);
            // Registered before the check, so a release between the two is not missed.
            freed.as_mut().enable();
            if self.try_acquire() {
                return Permit { share: self };
            }
            freed.await;
        }
    }

    fn try_acquire(&self) -> bool {
        let mut st = self.budget.state.lock().expect("budget lock");
        let fair = (self.budget.limit / st.held.len().max(1)).max(1);
        let mine = st.held.get(&self.id).copied().unwrap_or(0);
        if st.in_use < self.budget.limit || mine < fair {
            st.in_use += 1;
            *st.held.entry(self.id).or_default() += 1;
            true
        } else {
            false
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let budget = &self.share.budget;
        let mut st = budget.state.lock().expect("budget lock");
        st.in_use -= 1;
        if let Some(n) = st.held.get_mut(&self.share.id) {
            *n -= 1;
        }
        drop(st);
        budget.freed.notify_waiters();
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut st = self.budget.state.lock().expect("budget lock");
        st.held.remove(&self.id);
        drop(st);
        // Fair shares grow when a fetch leaves.
        self.budget.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn granted<'a>(share: &'a Share) -> Option<Permit<'a>> {
        tokio::time::timeout(Duration::from_millis(50), share.acquire())
            .await
            .ok()
    }

    #[tokio::test]
    async fn a_fetch_gets_its_fair_share_even_when_others_hold_every_connection() {
        let budget = Budget::new(4);
        let slow = budget.share();
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(granted(&slow).await.expect("alone, the whole budget"));
        }
        assert!(granted(&slow).await.is_none(), "not past the budget alone");
        // An honest fetch arrives while the slow one holds everything: fair share 2, at once.
        let honest = budget.share();
        let a = granted(&honest).await.expect("first connection at once");
        let b = granted(&honest).await.expect("second connection at once");
        assert_eq!(budget.in_use(), 6);
        assert!(granted(&honest).await.is_none(), "past its share it waits");
        assert!(granted(&slow).await.is_none(), "the slow one too");
        // As connections free up, waiters get them back under the budget.
        drop((a, b));
        held.pop();
        assert!(granted(&honest).await.is_some());
        drop(held);
        drop(slow);
        assert_eq!(budget.in_use(), 0);
    }

    #[tokio::test]
    async fn a_waiter_wakes_when_a_connection_is_given_back() {
        let budget = Budget::new(1);
        let share = budget.share();
        let first = share.acquire().await;
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move {
                let share = budget.share();
                let _p = share.acquire().await;
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(first);
        tokio::time::timeout(Duration::from_secs(2), waiting)
            .await
            .expect("woken")
            .unwrap();
    }
}
