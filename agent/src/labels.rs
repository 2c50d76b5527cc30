//! The Node label keys the agent owns, derived from repo ids and pre-warm entry names so that
//! schedulers can prefer nodes that hold a model:
//!
//! ```yaml
//! affinity:
//!   nodeAffinity:
//!     preferredDuringSchedulingIgnoredDuringExecution:
//!       - weight: 100
//!         preference:
//!           matchExpressions:
//!             - { key: models.modelcache.dev/Qwen--Qwen3-0.6B, operator: Exists }
//! ```
//!
//! - A model `org/name` is `models.modelcache.dev/org--name`, a dataset
//!   `datasets.modelcache.dev/org--name`: the id with `/` written `--`, as huggingface_hub names
//!   cache folders. Repo ids never hold `--`, and their parts start and end with a letter or
//!   digit, so this name is a valid label name and unique, when it fits in 63 characters.
//! - A longer id keeps its first 50 characters (ending in a letter or digit), then `-` and the
//!   first 12 hex digits of the sha256 of the whole id: 63 characters, stable, and unique but
//!   for a sha256 collision in 48 bits.
//! - The value is the first 12 hex digits of the commit the node holds.

use modelcache_core::repo::{RepoId, RepoKind};
use sha2::{Digest, Sha256};

/// The label prefix of models.
pub const MODELS_PREFIX: &str = "models.modelcache.dev";
/// The label prefix of datasets.
pub const DATASETS_PREFIX: &str = "datasets.modelcache.dev";
/// Longest name part of a label key (after the `/`).
const NAME_MAX: usize = 63;
/// Characters of a long id kept before its hash.
const KEPT: usize = 50;

/// The Node label key that says this node holds `repo`.
pub fn repo_label_key(kind: RepoKind, repo: &RepoId) -> String {
    let prefix = match kind {
        RepoKind::Model => MODELS_PREFIX,
        RepoKind::Dataset => DATASETS_PREFIX,
    };
    let flat = repo.flat();
    let name = if flat.len() <= NAME_MAX {
        flat
    } else {
        let digest = hex::encode(&Sha256::digest(repo.as_str().as_bytes())[..6]);
        let kept = flat[..KEPT].trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
        format!("{kept}-{digest}")
    };
    format!("{prefix}/{name}")
}

/// The value of a repo's label: the commit, shortened to 12 hex digits.
pub fn commit_label_value(commit: &str) -> &str {
    &commit[..commit.len().min(12)]
}

/// True when `key` is a valid Kubernetes label key: an optional DNS-subdomain prefix of at most
/// 253 characters and `/`, then a name of 1 to 63 characters, alphanumeric at both ends, with
/// `-`, `_` and `.` between.
pub fn is_valid_label_key(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if p.is_empty() || p.len() > 253 || !p.split('.').all(label_ok) {
            return false;
        }
    }
    is_valid_label_value(name) && !name.is_empty()
}

/// True when `value` is a valid label value (empty, or a valid label name).
pub fn is_valid_label_value(value: &str) -> bool {
    value.is_empty()
        || (value.len() <= 63
            && value.starts_with(|c: char| c.is_ascii_alphanumeric())
            && value.ends_with(|c: char| c.is_ascii_alphanumeric())
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(s: &str) -> RepoId {
        RepoId::parse(s).unwrap()
    }

    #[test]
    fn keys_are_the_cache_folder_names_under_a_prefix() {
        assert_eq!(
            repo_label_key(RepoKind::Model, &id("Qwen/Qwen3-0.6B")),
            "models.modelcache.dev/Qwen--Qwen3-0.6B"
        );
        assert_eq!(
            repo_label_key(RepoKind::Dataset, &id("HuggingFaceFW/fineweb")),
            "datasets.modelcache.dev/HuggingFaceFW--fineweb"
        );
        assert_eq!(commit_label_value(&"ab".repeat(20)), "abababababab");
    }

    #[test]
    fn long_ids_keep_a_prefix_and_a_hash() {
        let long = id(&format!("org/{}", "a".repeat(90)));
        let key = repo_label_key(RepoKind::Model, &long);
        let name = key.split_once('/').unwrap().1;
        assert_eq!(name.len(), 63);
        assert!(name.starts_with("org--aaaa"));
        assert!(is_valid_label_key(&key), "{key}");
        // Stable: the same id always gives this key.
        assert_eq!(key, repo_label_key(RepoKind::Model, &long));
        // Two ids alike in their first 50 characters still differ.
        let other = id(&format!("org/{}b", "a".repeat(89)));
        assert_ne!(key, repo_label_key(RepoKind::Model, &other));
    }

    #[test]
    fn the_validator_refuses_what_kubernetes_refuses() {
        for bad in [
            "",
            "a/",
            "/a",
            "Bad.Prefix/a",
            "a/-b",
            "a/b-",
            "a/b c",
            &format!("a/{}", "b".repeat(64)),
        ] {
            assert!(!is_valid_label_key(bad), "{bad:?}");
        }
        for good in ["a", "models.modelcache.dev/a_b.c-d", "x/A9"] {
            assert!(is_valid_label_key(good), "{good:?}");
        }
    }

    /// Repo ids as `RepoId::parse` accepts them: parts of letters, digits, `-`, `_`, `.`,
    /// alphanumeric at both ends, no `--` or `..`.
    fn repo_id() -> impl Strategy<Value = RepoId> {
        let part = "[A-Za-z0-9]([A-Za-z0-9_.-]{0,45}[A-Za-z0-9])?";
        (part, part).prop_filter_map("a valid repo id", |(org, name)| {
            RepoId::parse(&format!("{org}/{name}")).ok()
        })
    }

    proptest! {
        #[test]
        fn every_repo_id_maps_to_a_valid_label_key(repo in repo_id(), dataset in any::<bool>()) {
            let kind = if dataset { RepoKind::Dataset } else { RepoKind::Model };
            let key = repo_label_key(kind, &repo);
            prop_assert!(is_valid_label_key(&key), "{} -> {}", repo, key);
            prop_assert_eq!(&key, &repo_label_key(kind, &repo));
        }

        #[test]
        fn different_repo_ids_map_to_different_keys(a in repo_id(), b in repo_id()) {
            prop_assume!(a != b);
            prop_assert_ne!(
                repo_label_key(RepoKind::Model, &a),
                repo_label_key(RepoKind::Model, &b)
            );
        }

        #[test]
        fn commits_map_to_valid_values(commit in "[0-9a-f]{40}") {
            prop_assert!(is_valid_label_value(commit_label_value(&commit)));
        }
    }
}
