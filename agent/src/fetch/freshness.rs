//! How long the hub's answers are trusted, and one hub request for many askers.
//!
//! Two questions go to the hub before a volume is served, under different rules:
//!
//! | question | asked | kept per | kept for | when it is old |
//! |---|---|---|---|---|
//! | which commit a revision names | `GET /api/{kind}s/{repo}/revision/{rev}` | (kind, repo, revision), node-wide | `revision_ttl` | a publish whose snapshot is on the node uses the commit it knows and asks again in the background (stale-while-revalidate) |
//! | whether a token may read a restricted (gated or private) repo | `GET /api/{kind}s/{repo}/auth-check` | (kind, repo, token sha256) | `access_ttl` (a refusal: at most [`REFUSAL_TTL`]) | the publish waits for the hub; during an outage it is refused (UNAVAILABLE) |
//!
//! A revision is a fact about the repo, the same for every pod, so it is shared by all volumes
//! of the node; access belongs to a token, so it never is. Concurrent askers of the same
//! question share one request ([`Coalesce`]), whatever the number of pods. A zero TTL keeps
//! nothing: every publish asks (and waits).

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use modelcache_core::repo::{Commit, ModelRef, RepoId, RepoKind, Revision};
use modelcache_hub::HubError;
use modelcache_hub::client::Token;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::metrics::{Purpose, StaleReason};

/// How long a revision's resolution is used before it is asked again, by default. Pods come and
/// go minutes apart, so a shorter TTL would send most publishes' revalidations to the hub; a node
/// asks at most once per window for each (repo, revision), and the Hub counts its API limits in
/// five-minute windows. A push to a branch reaches a node within this time plus one publish; pin
/// a commit (or set 0) where that matters.
pub const DEFAULT_REVISION_TTL: Duration = Duration::from_secs(300);

/// How long the hub's yes to a token's access is trusted by default: as long as kube-apiserver
/// trusts a webhook's token review (`--authentication-token-webhook-cache-ttl`, 2 minutes). It
/// bounds how long a revoked token still mounts what the node already holds.
pub const DEFAULT_ACCESS_TTL: Duration = Duration::from_secs(120);

/// A refusal is kept at most this long (kube-apiserver's unauthorized TTL), so a user who has
/// just accepted a licence is not refused for long, while a pod retrying with a bad token does
/// not send every retry to the hub.
pub const REFUSAL_TTL: Duration = Duration::from_secs(10);

/// The most revisions remembered; pod specs choose them, so they are bounded.
pub const MAX_REVISIONS: usize = 4096;

/// How long answers are trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ttls {
    /// Which commit a revision names.
    pub revision: Duration,
    /// Whether a token may read a restricted repo.
    pub access: Duration,
}

impl Default for Ttls {
    fn default() -> Self {
        Ttls {
            revision: DEFAULT_REVISION_TTL,
            access: DEFAULT_ACCESS_TTL,
        }
    }
}

/// Requests made of the hub and answers served old, for the metrics.
#[derive(Debug, Clone, Default)]
pub struct HubCounters {
    /// Hub requests by purpose: `revision`, `access`, `tree`.
    pub requests: Family<Purpose, Counter>,
    /// Publishes served a revision's commit without a fresh answer: `expired` (revalidating in
    /// the background), `outage` (the hub could not be asked).
    pub stale_serves: Family<StaleReason, Counter>,
}

impl HubCounters {
    pub(crate) fn request(&self, purpose: &'static str) {
        self.requests.get_or_create(&Purpose { purpose }).inc();
    }

    pub(crate) fn stale(&self, reason: &'static str) {
        self.stale_serves
            .get_or_create(&StaleReason { reason })
            .inc();
    }
}

pub(crate) type RevisionKey = (RepoKind, RepoId, Revision);
pub(crate) type AccessKey = (RepoKind, RepoId, String);
/// The hub's answer on a token's access, and when it was given.
type AccessAnswer = (Instant, Result<(), HubError>);

/// What this node knows of a revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    /// The commit it last resolved to.
    pub commit: Commit,
    /// When the hub last said so (None: never in this process, for a commit named as such).
    pub resolved: Option<SystemTime>,
    /// The revision TTL has passed since the hub last said so.
    pub expired: bool,
    /// Why the last revalidation failed, when it did (the hub could not be reached).
    pub outage: Option<String>,
}

#[derive(Debug, Clone)]
struct Seen {
    commit: Commit,
    /// When the hub said so, for people.
    resolved: Option<SystemTime>,
    /// The same, for ages (None: longer ago than this clock reaches, or never).
    resolved_at: Option<Instant>,
    /// When the hub was last asked, answered or not.
    asked: Option<Instant>,
    outage: Option<String>,
}

/// The answers this node keeps, and the requests in flight.
#[derive(Debug)]
pub struct Answers {
    ttls: Ttls,
    revisions: Mutex<HashMap<RevisionKey, Seen>>,
    access: Mutex<HashMap<AccessKey, AccessAnswer>>,
    pub(crate) revision_flights: Coalesce<RevisionKey, RevisionAnswer>,
    pub(crate) access_flights: Coalesce<AccessKey, Result<(), HubError>>,
    pub(crate) counters: HubCounters,
}

/// The hub's answer to a revision request, and the token it was asked with (its sha256).
#[derive(Debug, Clone)]
pub(crate) struct RevisionAnswer {
    pub result: Result<modelcache_hub::client::Resolved, HubError>,
    pub asked_with: Option<String>,
}

impl Answers {
    /// Keeps answers for `ttls`.
    pub fn new(ttls: Ttls) -> Self {
        Answers {
            ttls,
            revisions: Mutex::default(),
            access: Mutex::default(),
            revision_flights: Coalesce::default(),
            access_flights: Coalesce::default(),
            counters: HubCounters::default(),
        }
    }

    fn revision_key(model: &ModelRef) -> RevisionKey {
        (model.kind, model.repo.clone(), model.revision.clone())
    }

    /// What is known of `model.revision`: from this process's answers, else from `recorded`
    /// (the commit and time the store's ref holds), else the commit a commit revision names.
    /// None when the revision TTL is zero (nothing is kept).
    pub fn known(
        &self,
        model: &ModelRef,
        recorded: impl FnOnce() -> Option<(Commit, SystemTime)>,
        now: Instant,
    ) -> Option<Known> {
        if self.ttls.revision.is_zero() {
            return None;
        }
        let mut revisions = self.revisions.lock().expect("revisions lock");
        let key = Self::revision_key(model);
        let seen = match revisions.get(&key) {
            Some(seen) => seen.clone(),
            None => {
                let seen = if let Some((commit, at)) = recorded() {
                    // The ref file's time is when the hub last said so, in an earlier process
                    // perhaps: as old as that.
                    let age = SystemTime::now().duration_since(at).unwrap_or_default();
                    Seen {
                        commit,
                        resolved: Some(at),
                        resolved_at: now.checked_sub(age),
                        asked: now.checked_sub(age),
                        outage: None,
                    }
                } else {
                    Seen {
                        commit: Commit::parse(model.revision.as_str()).ok()?,
                        resolved: None,
                        resolved_at: None,
                        asked: None,
                        outage: None,
                    }
                };
                if revisions.len() >= MAX_REVISIONS {
                    // Pod specs choose revisions: the longest unasked goes first.
                    let oldest = revisions
                        .iter()
                        .min_by_key(|(_, s)| s.asked)
                        .map(|(k, _)| k.clone());
                    if let Some(k) = oldest {
                        revisions.remove(&k);
                    }
                }
                revisions.insert(key, seen.clone());
                seen
            }
        };
        Some(Known {
            commit: seen.commit,
            resolved: seen.resolved,
            expired: seen
                .resolved_at
                .is_none_or(|at| now.duration_since(at) >= self.ttls.revision),
            outage: seen.outage,
        })
    }

    /// The commit the hub gave for `model.revision` within the TTL.
    pub fn fresh(&self, model: &ModelRef, now: Instant) -> Option<Commit> {
        let revisions = self.revisions.lock().expect("revisions lock");
        let seen = revisions.get(&Self::revision_key(model))?;
        let at = seen.resolved_at?;
        (now.duration_since(at) < self.ttls.revision).then(|| seen.commit.clone())
    }

    /// Marks the revision as being asked now, so that the next publishes within the TTL do not
    /// ask again. False if it was already asked within the TTL.
    pub fn start_revalidation(&self, model: &ModelRef, now: Instant) -> bool {
        let mut revisions = self.revisions.lock().expect("revisions lock");
        let Some(seen) = revisions.get_mut(&Self::revision_key(model)) else {
            return false;
        };
        if seen
            .asked
            .is_some_and(|at| now.duration_since(at) < self.ttls.revision)
        {
            return false;
        }
        seen.asked = Some(now);
        true
    }

    /// Records the hub's answer: `commit`, now.
    pub fn resolved(&self, model: &ModelRef, commit: &Commit, now: Instant) {
        if self.ttls.revision.is_zero() {
            return;
        }
        let seen = Seen {
            commit: commit.clone(),
            resolved: Some(SystemTime::now()),
            resolved_at: Some(now),
            asked: Some(now),
            outage: None,
        };
        self.revisions
            .lock()
            .expect("revisions lock")
            .insert(Self::revision_key(model), seen);
    }

    /// Records that the hub could not be asked about `model.revision` (`why`), keeping what is
    /// known; the next try is after the TTL.
    pub fn unreachable(&self, model: &ModelRef, why: &HubError, now: Instant) {
        let mut revisions = self.revisions.lock().expect("revisions lock");
        if let Some(seen) = revisions.get_mut(&Self::revision_key(model)) {
            seen.asked = Some(now);
            seen.outage = Some(why.to_string());
        }
    }

    /// Forgets `model.revision`: the hub no longer gives it to everyone.
    pub fn forget(&self, model: &ModelRef) {
        self.revisions
            .lock()
            .expect("revisions lock")
            .remove(&Self::revision_key(model));
    }

    pub(crate) fn access_key(kind: RepoKind, repo: &RepoId, token: Option<&Token>) -> AccessKey {
        (
            kind,
            repo.clone(),
            token.map(Token::fingerprint).unwrap_or_default(),
        )
    }

    /// The hub's recent answer on whether `token` may read `repo`.
    pub fn access(
        &self,
        kind: RepoKind,
        repo: &RepoId,
        token: Option<&Token>,
        now: Instant,
    ) -> Option<Result<(), HubError>> {
        let access = self.access.lock().expect("access lock");
        let (at, answer) = access.get(&Self::access_key(kind, repo, token))?;
        let ttl = match answer {
            Ok(()) => self.ttls.access,
            Err(_) => self.ttls.access.min(REFUSAL_TTL),
        };
        (now.duration_since(*at) < ttl).then(|| answer.clone())
    }

    /// Records the hub's answer on `token` reading `repo` (a grant, or a refusal that is not
    /// an outage).
    pub fn record_access(
        &self,
        kind: RepoKind,
        repo: &RepoId,
        token: Option<&Token>,
        answer: &Result<(), HubError>,
        now: Instant,
    ) {
        if self.ttls.access.is_zero() || answer.as_ref().is_err_and(HubError::is_transient) {
            return;
        }
        let mut access = self.access.lock().expect("access lock");
        let (grant, refusal) = (self.ttls.access, self.ttls.access.min(REFUSAL_TTL));
        access
            .retain(|_, (at, a)| now.duration_since(*at) < if a.is_ok() { grant } else { refusal });
        access.insert(Self::access_key(kind, repo, token), (now, answer.clone()));
    }

    /// Forgets every answer on access to `repo`: it changed from public to restricted.
    pub fn forget_access(&self, kind: RepoKind, repo: &RepoId) {
        self.access
            .lock()
            .expect("access lock")
            .retain(|(k, r, _), _| !(*k == kind && r == repo));
    }
}

/// One request for many askers: the first to ask for a key starts the request as a task of its
/// own (it ends even if every asker goes away, and forgets its key when done); those who ask
/// for the key meanwhile get the same answer.
#[derive(Debug)]
pub struct Coalesce<K, V> {
    flights: Arc<Mutex<HashMap<K, Shared<BoxFuture<'static, V>>>>>,
}

impl<K, V> Default for Coalesce<K, V> {
    fn default() -> Self {
        Coalesce {
            flights: Arc::default(),
        }
    }
}

impl<K, V> Coalesce<K, V>
where
    K: Hash + Eq + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// The answer for `key`: the running request's, or that of `request()`, started now (true).
    pub fn join_or_start<F>(
        &self,
        key: K,
        request: impl FnOnce() -> F,
    ) -> (Shared<BoxFuture<'static, V>>, bool)
    where
        F: Future<Output = V> + Send + 'static,
    {
        let mut flights = self.flights.lock().expect("flights lock");
        if let Some(f) = flights.get(&key) {
            return (f.clone(), false);
        }
        let request = request();
        let (all, k) = (self.flights.clone(), key.clone());
        let task = tokio::spawn(async move {
            let answer = request.await;
            all.lock().expect("flights lock").remove(&k);
            answer
        });
        let shared = async move { task.await.expect("a hub request does not panic") }
            .boxed()
            .shared();
        flights.insert(key, shared.clone());
        (shared, true)
    }

    /// Requests running.
    #[cfg(test)]
    pub fn running(&self) -> usize {
        self.flights.lock().expect("flights lock").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn c(n: u8) -> Commit {
        Commit::parse(&format!("{n:02x}").repeat(20)).unwrap()
    }

    fn model(rev: &str) -> ModelRef {
        ModelRef {
            kind: RepoKind::Model,
            repo: RepoId::parse("org/m").unwrap(),
            revision: Revision::parse(rev).unwrap(),
        }
    }

    fn ttls(revision: u64, access: u64) -> Ttls {
        Ttls {
            revision: Duration::from_secs(revision),
            access: Duration::from_secs(access),
        }
    }

    fn refused() -> HubError {
        HubError::Unauthorized {
            repo: "org/m".into(),
            status: 403,
        }
    }

    #[test]
    fn a_revision_expires_after_its_ttl_and_is_revalidated_once() {
        let answers = Answers::new(ttls(60, 0));
        let t0 = Instant::now();
        assert_eq!(answers.known(&model("main"), || None, t0), None);
        answers.resolved(&model("main"), &c(1), t0);
        let k = answers.known(&model("main"), || None, t0).unwrap();
        assert_eq!((k.commit, k.expired), (c(1), false));
        assert_eq!(answers.fresh(&model("main"), t0), Some(c(1)));
        assert!(!answers.start_revalidation(&model("main"), t0 + Duration::from_secs(59)));

        let later = t0 + Duration::from_secs(60);
        assert!(
            answers
                .known(&model("main"), || None, later)
                .unwrap()
                .expired
        );
        assert_eq!(answers.fresh(&model("main"), later), None);
        assert!(answers.start_revalidation(&model("main"), later));
        assert!(
            !answers.start_revalidation(&model("main"), later),
            "one revalidation per TTL"
        );
        assert!(
            answers
                .known(&model("main"), || None, later)
                .unwrap()
                .expired,
            "still old while it is revalidated"
        );
    }

    #[test]
    fn an_outage_keeps_the_commit_and_says_so() {
        let answers = Answers::new(ttls(60, 0));
        let t0 = Instant::now();
        answers.resolved(&model("main"), &c(1), t0);
        let down = HubError::Protocol {
            url: "u".into(),
            reason: "down".into(),
        };
        let t1 = t0 + Duration::from_secs(61);
        answers.unreachable(&model("main"), &down, t1);
        let k = answers.known(&model("main"), || None, t1).unwrap();
        assert_eq!(k.commit, c(1));
        assert!(k.expired);
        assert!(k.outage.unwrap().contains("down"));
        assert!(
            !answers.start_revalidation(&model("main"), t1),
            "not asked again before the TTL"
        );
        assert_eq!(answers.fresh(&model("main"), t1), None, "not fresh");
        answers.resolved(&model("main"), &c(2), t1);
        assert_eq!(
            answers.known(&model("main"), || None, t1).unwrap().outage,
            None
        );
    }

    #[test]
    fn a_recorded_ref_is_as_old_as_its_file_and_a_commit_stands_for_itself() {
        let answers = Answers::new(ttls(60, 0));
        let now = Instant::now();
        let recent = SystemTime::now() - Duration::from_secs(10);
        let k = answers
            .known(&model("main"), || Some((c(3), recent)), now)
            .unwrap();
        assert_eq!((k.commit, k.expired), (c(3), false));
        let old = SystemTime::now() - Duration::from_secs(600);
        let k = answers
            .known(&model("v1"), || Some((c(4), old)), now)
            .unwrap();
        assert!(k.expired);
        let commit = c(5).to_string();
        let k = answers.known(&model(&commit), || None, now).unwrap();
        assert_eq!(k.commit, c(5));
        assert!(k.expired, "never asked in this process");
        assert_eq!(
            Answers::new(ttls(0, 0)).known(&model(&commit), || None, now),
            None,
            "a zero TTL keeps nothing"
        );
    }

    #[test]
    fn revisions_remembered_are_bounded() {
        let answers = Answers::new(ttls(60, 0));
        let now = Instant::now();
        answers.resolved(&model("main"), &c(1), now);
        for i in 0..MAX_REVISIONS + 10 {
            let commit = format!("{i:040x}");
            answers.known(&model(&commit), || None, now).unwrap();
        }
        assert_eq!(answers.revisions.lock().unwrap().len(), MAX_REVISIONS);
        assert!(
            answers.fresh(&model("main"), now).is_some(),
            "an answer asked of the hub outlives commits named but never asked"
        );
    }

    #[test]
    fn access_is_per_token_and_refusals_are_kept_briefly() {
        let answers = Answers::new(ttls(0, 120));
        let t0 = Instant::now();
        let repo = RepoId::parse("org/m").unwrap();
        let (a, b) = (Token::new("token-a"), Token::new("token-b"));
        let kind = RepoKind::Model;
        answers.record_access(kind, &repo, a.as_ref(), &Ok(()), t0);
        answers.record_access(kind, &repo, b.as_ref(), &Err(refused()), t0);
        assert!(matches!(
            answers.access(kind, &repo, a.as_ref(), t0),
            Some(Ok(()))
        ));
        assert!(matches!(
            answers.access(kind, &repo, b.as_ref(), t0),
            Some(Err(_))
        ));
        assert!(answers.access(kind, &repo, None, t0).is_none(), "no token");
        let t1 = t0 + REFUSAL_TTL;
        assert!(answers.access(kind, &repo, b.as_ref(), t1).is_none());
        assert!(answers.access(kind, &repo, a.as_ref(), t1).is_some());
        let t2 = t0 + Duration::from_secs(120);
        assert!(answers.access(kind, &repo, a.as_ref(), t2).is_none());

        let down = HubError::Status {
            url: "u".into(),
            status: 503,
            message: String::new(),
            retry_after: None,
        };
        answers.record_access(kind, &repo, None, &Err(down), t0);
        assert!(
            answers.access(kind, &repo, None, t0).is_none(),
            "an outage is not an answer"
        );
        answers.record_access(kind, &repo, a.as_ref(), &Ok(()), t0);
        answers.forget_access(kind, &repo);
        assert!(answers.access(kind, &repo, a.as_ref(), t0).is_none());
    }

    #[test]
    fn keys_hold_no_token() {
        let key = Answers::access_key(
            RepoKind::Model,
            &RepoId::parse("org/m").unwrap(),
            Token::new("hf_secret").as_ref(),
        );
        assert!(!format!("{key:?}").contains("hf_secret"));
    }

    #[tokio::test]
    async fn concurrent_askers_share_one_request_that_outlives_them() {
        let coalesce: Coalesce<u8, usize> = Coalesce::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let (release, gate) = tokio::sync::watch::channel(false);
        let mut joined = Vec::new();
        for _ in 0..50 {
            let (calls, mut gate) = (calls.clone(), gate.clone());
            let (answer, _) = coalesce.join_or_start(1, move || async move {
                let _ = gate.wait_for(|open| *open).await;
                calls.fetch_add(1, Ordering::SeqCst) + 1
            });
            joined.push(answer);
        }
        // The first asker goes away; the request goes on for the others.
        drop(joined.remove(0));
        release.send(true).unwrap();
        for answer in joined {
            assert_eq!(answer.await, 1);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(coalesce.running(), 0, "the key is forgotten when done");
        let (again, started) = coalesce.join_or_start(1, || async { 7 });
        assert!(started);
        assert_eq!(again.await, 7);
    }
}
