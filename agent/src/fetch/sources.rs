//! Where a node's files come from, in order: the hub, and optionally a shared cache (a PVC that
//! already holds an HF cache) and other agents (peers, see [`crate::peers`]; they give files,
//! never revisions or access).
//!
//! - **Files** are taken from the first tier that has them with the right hash: with
//!   `shared-cache,hub` the shared cache gives what it holds and the hub only the rest; with
//!   `hub,shared-cache` the shared
//!   cache stands in when the hub fails.
//! - **Revisions and access** are the hub's to answer whenever the hub is a tier: it says which
//!   commit `main` is now and whether a token may read a gated repo. The shared cache's
//!   `refs/` answer only without a hub, or while the hub is unreachable for a repo not known to
//!   be gated. With `shared-cache` alone, whatever the shared cache holds is served to any volume that
//!   names it, as the PVC itself would be: keep gated models off a cache shared by tenants, or
//!   keep `hub` in the tiers.

use crate::peers::Peers;
use crate::shared_cache::SharedCache;
use std::fmt;
use std::sync::Arc;

/// A source of files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Tier {
    /// The shared cache (`--shared-cache`); `pvc`, its name before 0.2, is accepted.
    #[value(name = "shared-cache", alias = "pvc")]
    SharedCache,
    /// Other agents (`--peers`).
    Peers,
    /// The hub (`--endpoint`).
    Hub,
}

/// The tiers, in order, and the shared cache if one is a tier.
#[derive(Debug, Clone)]
pub struct Sources {
    order: Vec<Tier>,
    shared: Option<Arc<SharedCache>>,
    peers: Option<Arc<Peers>>,
}

/// A tier order that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadSources(String);

impl Default for Sources {
    /// The hub alone.
    fn default() -> Self {
        Sources {
            order: vec![Tier::Hub],
            shared: None,
            peers: None,
        }
    }
}

impl Sources {
    /// Checks that `order` names each tier at most once, and the shared cache exactly when
    /// `shared-cache` is in it. An empty order means `shared-cache,hub` with a shared cache and `hub` without.
    pub fn new(order: Vec<Tier>, shared: Option<SharedCache>) -> Result<Self, BadSources> {
        let order = if order.is_empty() {
            match shared {
                Some(_) => vec![Tier::SharedCache, Tier::Hub],
                None => vec![Tier::Hub],
            }
        } else {
            order
        };
        if [Tier::SharedCache, Tier::Peers, Tier::Hub]
            .iter()
            .any(|tier| order.iter().filter(|t| *t == tier).count() > 1)
        {
            return Err(BadSources(format!(
                "--sources {} names a tier twice",
                join(&order)
            )));
        }
        match (order.contains(&Tier::SharedCache), &shared) {
            (true, None) => Err(BadSources(
                "--sources names shared-cache but no --shared-cache is given: point --shared-cache at the \
                 HF cache on the shared volume (its HF_HOME or HF_HOME/hub)"
                    .into(),
            )),
            (false, Some(_)) => Err(BadSources(format!(
                "--shared-cache is given but --sources {} does not name shared-cache: add it, e.g. --sources shared-cache,hub",
                join(&order)
            ))),
            _ => Ok(Sources {
                order,
                shared: shared.map(Arc::new),
                peers: None,
            }),
        }
    }

    /// Adds `peers` as a tier: where `order` names them, or, when it was left to the default,
    /// after the shared cache and before the hub. Refused when the order was given without
    /// `peers`, or names `peers` without any.
    pub fn with_peers(
        mut self,
        peers: Option<Peers>,
        order_given: bool,
    ) -> Result<Self, BadSources> {
        let named = self.order.contains(&Tier::Peers);
        match (peers, named, order_given) {
            (None, false, _) => Ok(self),
            (None, true, _) => Err(BadSources(
                "--sources names peers but no --peers are given".into(),
            )),
            (Some(_), false, true) => Err(BadSources(format!(
                "--peers are given but --sources {} does not name peers: add it, e.g. --sources peers,hub",
                join(&self.order)
            ))),
            (Some(_), _, _)
                if !self
                    .order
                    .iter()
                    .any(|t| matches!(t, Tier::Hub | Tier::SharedCache)) =>
            {
                Err(BadSources(
                    "peers give files, not revisions: keep hub (or shared-cache) in --sources"
                        .into(),
                ))
            }
            (Some(p), named, _) => {
                if !named {
                    let at = self
                        .order
                        .iter()
                        .position(|t| *t == Tier::Hub)
                        .unwrap_or(self.order.len());
                    self.order.insert(at, Tier::Peers);
                }
                self.peers = Some(Arc::new(p));
                Ok(self)
            }
        }
    }

    /// The peers, when they are a tier.
    pub fn peers(&self) -> Option<&Arc<Peers>> {
        self.peers.as_ref()
    }

    /// The tiers in order.
    pub fn order(&self) -> &[Tier] {
        &self.order
    }

    /// True when the hub is a tier.
    pub fn uses_hub(&self) -> bool {
        self.order.contains(&Tier::Hub)
    }

    /// The shared cache, when it is a tier.
    pub fn shared(&self) -> Option<&Arc<SharedCache>> {
        self.shared.as_ref()
    }
}

fn join(order: &[Tier]) -> String {
    order
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::SharedCache => "shared-cache",
            Tier::Peers => "peers",
            Tier::Hub => "hub",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> (tempfile::TempDir, SharedCache) {
        let dir = tempfile::tempdir().unwrap();
        let cache = SharedCache::open(dir.path()).unwrap();
        (dir, cache)
    }

    #[test]
    fn the_default_order_follows_whether_a_shared_cache_is_given() {
        assert_eq!(Sources::new(vec![], None).unwrap().order(), [Tier::Hub]);
        let (_d, c) = cache();
        let s = Sources::new(vec![], Some(c)).unwrap();
        assert_eq!(s.order(), [Tier::SharedCache, Tier::Hub]);
        let (_d, c) = cache();
        let s = Sources::new(vec![Tier::SharedCache], Some(c)).unwrap();
        assert!(!s.uses_hub() && s.shared().is_some());
    }

    #[test]
    fn orders_that_cannot_work_say_what_to_change() {
        let err = Sources::new(vec![Tier::SharedCache, Tier::Hub], None).unwrap_err();
        assert!(err.to_string().contains("no --shared-cache"), "{err}");
        let (_d, c) = cache();
        let err = Sources::new(vec![Tier::Hub], Some(c)).unwrap_err();
        assert!(
            err.to_string().contains("--sources shared-cache,hub"),
            "{err}"
        );
        let err = Sources::new(vec![Tier::Hub, Tier::Hub], None).unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
    }

    fn peers() -> Option<Peers> {
        let secret = crate::peers::PeerSecret::new("0123456789abcdef-secret").unwrap();
        Some(Peers::new(&["http://127.0.0.1:7475".to_owned()], secret).unwrap())
    }

    #[test]
    fn peers_go_after_the_shared_cache_and_before_the_hub_and_never_alone() {
        let s = Sources::new(vec![], None)
            .unwrap()
            .with_peers(peers(), false)
            .unwrap();
        assert_eq!(s.order(), [Tier::Peers, Tier::Hub]);
        assert!(s.peers().is_some());
        let (_d, c) = cache();
        let s = Sources::new(vec![], Some(c))
            .unwrap()
            .with_peers(peers(), false)
            .unwrap();
        assert_eq!(s.order(), [Tier::SharedCache, Tier::Peers, Tier::Hub]);
        // An order given keeps its place for peers.
        let s = Sources::new(vec![Tier::Hub, Tier::Peers], None)
            .unwrap()
            .with_peers(peers(), true)
            .unwrap();
        assert_eq!(s.order(), [Tier::Hub, Tier::Peers]);
        let cases = [
            (vec![Tier::Hub], peers(), true, "does not name peers"),
            (vec![Tier::Peers, Tier::Hub], None, true, "no --peers"),
            (vec![Tier::Peers], peers(), true, "not revisions"),
            (
                vec![Tier::Peers, Tier::Peers, Tier::Hub],
                peers(),
                true,
                "twice",
            ),
        ];
        for (order, peers, given, says) in cases {
            let err = Sources::new(order.clone(), None)
                .and_then(|s| s.with_peers(peers, given))
                .unwrap_err();
            assert!(err.to_string().contains(says), "{order:?}: {err}");
        }
    }
}
