//! Who may read what, remembered briefly. Every Ensure asks the hub, with the volume's own token,
//! what its revision resolves to; the hub's yes is kept for a short time per (repo, revision,
//! token), so a burst of publishes costs one request, and a tenant whose token cannot read a
//! gated repo is refused even when another tenant's download put it in the store. Only answers
//! that granted access are kept: a refusal is asked again every time. Tokens are keyed by their
//! sha256, never kept.

use modelcache_core::repo::{Commit, ModelRef, RepoId, RepoKind};
use modelcache_hub::client::Token;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

type Key = (RepoKind, RepoId, String, String);

/// Recently granted resolutions.
#[derive(Debug)]
pub struct AccessCache {
    ttl: Duration,
    granted: Mutex<HashMap<Key, (Instant, Commit)>>,
}

impl AccessCache {
    /// Keeps each granted answer for `ttl` (zero disables the cache).
    pub fn new(ttl: Duration) -> Self {
        AccessCache {
            ttl,
            granted: Mutex::default(),
        }
    }

    fn key(model: &ModelRef, token: Option<&Token>) -> Key {
        (
            model.kind,
            model.repo.clone(),
            model.revision.to_string(),
            token.map(Token::fingerprint).unwrap_or_default(),
        )
    }

    /// The commit the hub granted for this model and token within the last `ttl`.
    pub fn get(&self, model: &ModelRef, token: Option<&Token>, now: Instant) -> Option<Commit> {
        let mut granted = self.granted.lock().expect("access cache lock");
        let key = Self::key(model, token);
        match granted.get(&key) {
            Some((at, commit)) if now.duration_since(*at) < self.ttl => Some(commit.clone()),
            Some(_) => {
                granted.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Remembers that the hub granted this model to this token, resolving to `commit`.
    pub fn grant(&self, model: &ModelRef, token: Option<&Token>, commit: &Commit, now: Instant) {
        if self.ttl.is_zero() {
            return;
        }
        let mut granted = self.granted.lock().expect("access cache lock");
        granted.retain(|_, (at, _)| now.duration_since(*at) < self.ttl);
        granted.insert(Self::key(model, token), (now, commit.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c1() -> Commit {
        Commit::parse(&"c1".repeat(20)).unwrap()
    }
    use modelcache_core::repo::Revision;

    fn model(rev: &str) -> ModelRef {
        ModelRef {
            kind: RepoKind::Model,
            repo: RepoId::parse("org/gated").unwrap(),
            revision: Revision::parse(rev).unwrap(),
        }
    }

    #[test]
    fn grants_are_per_token_and_expire() {
        let cache = AccessCache::new(Duration::from_secs(30));
        let t0 = Instant::now();
        let a = Token::new("token-a");
        let b = Token::new("token-b");
        cache.grant(&model("main"), a.as_ref(), &c1(), t0);
        assert_eq!(cache.get(&model("main"), a.as_ref(), t0), Some(c1()));
        assert_eq!(
            cache.get(&model("main"), b.as_ref(), t0),
            None,
            "another token"
        );
        assert_eq!(cache.get(&model("main"), None, t0), None, "no token");
        assert_eq!(
            cache.get(&model("v2"), a.as_ref(), t0),
            None,
            "another revision"
        );
        let later = t0 + Duration::from_secs(31);
        assert_eq!(
            cache.get(&model("main"), a.as_ref(), later),
            None,
            "expired"
        );
    }

    #[test]
    fn zero_ttl_keeps_nothing() {
        let cache = AccessCache::new(Duration::ZERO);
        let now = Instant::now();
        cache.grant(&model("main"), None, &c1(), now);
        assert_eq!(cache.get(&model("main"), None, now), None);
    }

    #[test]
    fn keys_hold_no_token() {
        let key = AccessCache::key(&model("main"), Token::new("hf_secret").as_ref());
        assert!(!format!("{key:?}").contains("hf_secret"));
    }
}
