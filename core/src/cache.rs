//! What a compilation-cache volume names: a cache, whose pods share it, and how large it may
//! grow. Validated on construction, so a cache's directory name can never escape the store.

use crate::repo::{InvalidInput, clip_to};
use std::fmt;

/// A cache's name (`cache: vllm`): a DNS label, 1 to 63 characters of `a-z`, `0-9` and `-`,
/// starting and ending with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CacheName(String);

fn invalid(what: &'static str, value: &str, reason: &'static str) -> InvalidInput {
    InvalidInput {
        what,
        value: clip_to(value, 100),
        reason,
    }
}

/// True for a DNS-1123 label: what Kubernetes namespaces are, and what cache names are.
fn is_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

impl CacheName {
    /// Parses a name.
    pub fn parse(s: &str) -> Result<Self, InvalidInput> {
        if !is_label(s) {
            return Err(invalid(
                "cache name",
                s,
                "must be 1 to 63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit (e.g. vllm)",
            ));
        }
        Ok(CacheName(s.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CacheName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which pods share a cache.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CacheScope {
    /// Pods of one namespace (the default).
    Namespace(String),
    /// Every pod on the node: only an administrator's StorageClass can say so.
    Node,
}

impl CacheScope {
    /// The scope of pods in `namespace`.
    pub fn namespace(ns: &str) -> Result<Self, InvalidInput> {
        if !is_label(ns) {
            return Err(invalid(
                "namespace",
                ns,
                "is not a Kubernetes namespace name",
            ));
        }
        Ok(CacheScope::Namespace(ns.to_owned()))
    }

    /// The namespace, for a namespace scope.
    pub fn namespace_name(&self) -> Option<&str> {
        match self {
            CacheScope::Namespace(ns) => Some(ns),
            CacheScope::Node => None,
        }
    }
}

impl fmt::Display for CacheScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheScope::Namespace(ns) => write!(f, "namespace {ns}"),
            CacheScope::Node => f.write_str("node"),
        }
    }
}

/// One cache on a node: its scope and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CacheKey {
    /// Who shares it.
    pub scope: CacheScope,
    /// Its name.
    pub name: CacheName,
}

impl CacheKey {
    /// The cache's directory name in the store: `ns.<namespace>.<name>` or `node.<name>`.
    /// Neither part may hold a dot, so two keys never share a directory.
    pub fn dir_name(&self) -> String {
        match &self.scope {
            CacheScope::Namespace(ns) => format!("ns.{ns}.{}", self.name),
            CacheScope::Node => format!("node.{}", self.name),
        }
    }

    /// The key a directory name stands for, if it is one.
    pub fn from_dir_name(dir: &str) -> Option<Self> {
        let mut parts = dir.split('.');
        let key = match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("ns"), Some(ns), Some(name), None) => CacheKey {
                scope: CacheScope::namespace(ns).ok()?,
                name: CacheName::parse(name).ok()?,
            },
            (Some("node"), Some(name), None, None) => CacheKey {
                scope: CacheScope::Node,
                name: CacheName::parse(name).ok()?,
            },
            _ => return None,
        };
        Some(key)
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.scope {
            CacheScope::Namespace(ns) => write!(f, "{ns}/{}", self.name),
            CacheScope::Node => write!(f, "node/{}", self.name),
        }
    }
}

/// Parses a Kubernetes quantity of bytes: `512Mi`, `20Gi`, `1Ti`, `500M`, `10G`, or a plain
/// number of bytes. Fractions and exponents are refused: a size is a whole number of bytes.
pub fn parse_quantity(s: &str) -> Result<u64, InvalidInput> {
    const UNITS: [(&str, u64); 8] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    let bad = || {
        invalid(
            "size",
            s,
            "must be a whole number with Ki, Mi, Gi, Ti, k, M, G or T (e.g. 20Gi)",
        )
    };
    let (digits, scale) = UNITS
        .iter()
        .find_map(|(u, scale)| s.strip_suffix(u).map(|d| (d, *scale)))
        .unwrap_or((s, 1));
    if digits.is_empty() || digits.len() > 20 || !digits.bytes().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_dns_labels() {
        for ok in ["vllm", "a", "torch-compile-2", &"x".repeat(63)] {
            CacheName::parse(ok).unwrap();
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a.b",
            "a/b",
            "..",
            "a b",
            "é",
            &"x".repeat(64),
            "a\0",
        ] {
            assert!(CacheName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn directory_names_round_trip_and_never_collide() {
        let key = |ns: Option<&str>, name: &str| CacheKey {
            scope: ns.map_or(CacheScope::Node, |n| CacheScope::namespace(n).unwrap()),
            name: CacheName::parse(name).unwrap(),
        };
        let keys = [
            key(Some("team-a"), "vllm"),
            key(Some("team-a--vllm"), "x"),
            key(Some("node"), "vllm"),
            key(None, "vllm"),
        ];
        let dirs: std::collections::BTreeSet<String> =
            keys.iter().map(CacheKey::dir_name).collect();
        assert_eq!(dirs.len(), keys.len());
        for k in &keys {
            assert_eq!(CacheKey::from_dir_name(&k.dir_name()).as_ref(), Some(k));
        }
        for junk in [
            "", "ns.a", "ns.a.b.c", "node", "other.a", "ns..a", "node.A", "ns.a/b.c",
        ] {
            assert_eq!(CacheKey::from_dir_name(junk), None, "{junk:?}");
        }
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("20Gi").unwrap(), 20 << 30);
        assert_eq!(parse_quantity("512Mi").unwrap(), 512 << 20);
        assert_eq!(parse_quantity("10G").unwrap(), 10_000_000_000);
        assert_eq!(parse_quantity("4096").unwrap(), 4096);
        for bad in [
            "",
            "Gi",
            "-1Gi",
            "1.5Gi",
            "1e9",
            "20GB",
            "99999999999999999999Ti",
            " 1Gi",
        ] {
            assert!(parse_quantity(bad).is_err(), "{bad:?}");
        }
    }
}
