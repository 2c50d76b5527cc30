//! Volume attributes: what a pod's inline `volumeAttributes` (or a StorageClass's `parameters`)
//! may say, validated into a [`ModelRef`]. Unknown keys are refused by name, so a typo is an
//! error in `kubectl describe pod` instead of a silently ignored setting.

use crate::error::{Error, Result};
use modelcache_core::Layout;
use modelcache_core::cache::{CacheName, parse_quantity};
use modelcache_core::filter::FileFilter;
use modelcache_core::repo::{ModelRef, RepoId, RepoKind, Revision, clip_to};
use std::collections::HashMap;

/// Keys a volume may set.
pub const KNOWN_KEYS: &[&str] = &[
    "model", "dataset", "revision", "include", "exclude", "layout",
];

/// The most bytes of keys and values a volume's attributes may hold: a pod spec must not be able
/// to make the plugin or the agent work or allocate in proportion to what it sends.
pub const MAX_ATTRIBUTE_BYTES: usize = 16 << 10;

/// The key and value the controller adds to a PV's volume context: whatever access mode a claim
/// names, the volume is mounted read-only.
pub const READ_ONLY_KEY: (&str, &str) = ("csi.modelcache.dev/mount", "read-only");

/// Prefix of the keys kubelet adds (pod name, namespace, uid, service account, ephemeral).
pub const KUBELET_PREFIX: &str = "csi.storage.k8s.io/";

/// Keys a cache volume may set.
pub const CACHE_KEYS: &[&str] = &["cache", "maxSize", "scope"];

/// The key kubelet sets to say whether a volume is inline ("true") or a PV ("false").
pub const EPHEMERAL_KEY: &str = "csi.storage.k8s.io/ephemeral";

/// What a volume is: a model (read-only) or a compilation cache (writable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Volume {
    /// A model or dataset snapshot.
    Model(VolumeAttributes),
    /// A compilation cache.
    Cache(CacheAttributes),
}

impl Volume {
    /// Parses a volume context: a cache when it names one, else a model. `at_publish` adds
    /// the checks of what kubelet passes (the pod's namespace, whether the volume is inline).
    pub fn parse(ctx: &HashMap<String, String>, at_publish: bool) -> Result<Self> {
        if ctx.contains_key("cache") {
            CacheAttributes::parse(ctx, at_publish).map(Volume::Cache)
        } else {
            VolumeAttributes::parse(ctx).map(Volume::Model)
        }
    }
}

/// A cache volume's parsed attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheAttributes {
    /// The cache (`cache`).
    pub name: CacheName,
    /// Its largest size (`maxSize`); None: the agent's default.
    pub max_size: Option<u64>,
    /// Shared by every pod on the node (`scope: node`, from a StorageClass only).
    pub node_wide: bool,
    /// The pod's namespace (whose pods share the cache unless node-wide).
    pub namespace: String,
    /// `namespace/name` of the pod.
    pub pod: Option<String>,
    /// The pod's uid.
    pub pod_uid: Option<String>,
}

impl CacheAttributes {
    /// Parses and validates a cache volume's context.
    pub fn parse(ctx: &HashMap<String, String>, at_publish: bool) -> Result<Self> {
        check_size(ctx)?;
        for key in ctx.keys() {
            if !CACHE_KEYS.contains(&key.as_str()) && !key.starts_with(KUBELET_PREFIX) {
                return Err(attr_error(
                    &clip_to(key, 64),
                    format!(
                        "not an attribute of a cache volume; a cache takes {}",
                        CACHE_KEYS.join(", ")
                    ),
                ));
            }
        }
        let name = CacheName::parse(&ctx["cache"]).map_err(|e| attr_error("cache", e))?;
        let max_size = match ctx.get("maxSize") {
            None => None,
            Some(v) => Some(parse_quantity(v).map_err(|e| attr_error("maxSize", e))?),
        };
        let node_wide = match ctx.get("scope").map(String::as_str) {
            None | Some("namespace") => false,
            Some("node") => true,
            Some(other) => {
                return Err(attr_error(
                    "scope",
                    format!("{:?} is not \"namespace\" or \"node\"", clip_to(other, 64)),
                ));
            }
        };
        let namespace = ctx
            .get("csi.storage.k8s.io/pod.namespace")
            .cloned()
            .unwrap_or_default();
        if at_publish {
            // Kubelet sets these over anything a pod spec says (podInfoOnMount).
            if namespace.is_empty() {
                return Err(Error::InvalidArgument(
                    "a cache volume needs the pod's namespace, which kubelet passes when the CSIDriver has podInfoOnMount: true".into(),
                ));
            }
            if node_wide && ctx.get(EPHEMERAL_KEY).map(String::as_str) != Some("false") {
                return Err(attr_error(
                    "scope",
                    "\"node\" shares a cache across namespaces, which only an administrator's StorageClass may do; an inline volume's cache is its namespace's",
                ));
            }
        }
        let pod = match ctx.get("csi.storage.k8s.io/pod.name") {
            Some(name) if !namespace.is_empty() => Some(format!("{namespace}/{name}")),
            _ => None,
        };
        Ok(CacheAttributes {
            name,
            max_size,
            node_wide,
            namespace,
            pod,
            pod_uid: ctx.get("csi.storage.k8s.io/pod.uid").cloned(),
        })
    }

    /// The cache as the agent names it: `namespace/name` or `node/name`.
    pub fn key(&self) -> String {
        if self.node_wide {
            format!("node/{}", self.name)
        } else {
            format!("{}/{}", self.namespace, self.name)
        }
    }
}

fn check_size(ctx: &HashMap<String, String>) -> Result<()> {
    let size: usize = ctx.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > MAX_ATTRIBUTE_BYTES {
        return Err(Error::InvalidArgument(format!(
            "volume attributes hold {size} bytes; at most {MAX_ATTRIBUTE_BYTES} are accepted"
        )));
    }
    Ok(())
}

/// A volume's parsed attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeAttributes {
    /// The repo and revision to mount.
    pub model: ModelRef,
    /// Which of its files (`include`, `exclude`: comma-separated globs).
    pub filter: FileFilter,
    /// How the files are shown (`layout`: `snapshot` or `hf-cache`).
    pub layout: Layout,
    /// `namespace/name` of the pod, when kubelet passes it (podInfoOnMount).
    pub pod: Option<String>,
    /// The pod's uid, when kubelet passes it.
    pub pod_uid: Option<String>,
}

fn attr_error(key: &str, msg: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("volume attribute {key:?}: {msg}"))
}

impl VolumeAttributes {
    /// Parses and validates `volume_context`.
    pub fn parse(ctx: &HashMap<String, String>) -> Result<Self> {
        check_size(ctx)?;
        if let Some(v) = ctx.get(READ_ONLY_KEY.0)
            && v != READ_ONLY_KEY.1
        {
            return Err(attr_error(
                READ_ONLY_KEY.0,
                format!("can only be {:?}", READ_ONLY_KEY.1),
            ));
        }
        for key in ctx.keys() {
            if !KNOWN_KEYS.contains(&key.as_str())
                && !key.starts_with(KUBELET_PREFIX)
                && key != READ_ONLY_KEY.0
            {
                return Err(attr_error(
                    &clip_to(key, 64),
                    format!("unknown attribute; supported: {}", KNOWN_KEYS.join(", ")),
                ));
            }
        }
        let (key, kind, value) = match (ctx.get("model"), ctx.get("dataset")) {
            (Some(m), None) => ("model", RepoKind::Model, m),
            (None, Some(d)) => ("dataset", RepoKind::Dataset, d),
            (Some(_), Some(_)) => {
                return Err(attr_error(
                    "dataset",
                    "set either \"model\" or \"dataset\", not both",
                ));
            }
            (None, None) => {
                return Err(Error::InvalidArgument(
                    "volume attribute \"model\" is required, e.g. model: Qwen/Qwen3-0.6B".into(),
                ));
            }
        };
        // `org/name:revision`, as in the HUGGINGFACE_MODEL convention.
        let (repo, inline_rev) = match value.split_once(':') {
            Some((r, rev)) => (r, Some(rev)),
            None => (value.as_str(), None),
        };
        let repo = RepoId::parse(repo).map_err(|e| attr_error(key, e))?;
        let revision = match (inline_rev, ctx.get("revision").map(String::as_str)) {
            (Some(a), Some(b)) if a != b => {
                return Err(attr_error(
                    "revision",
                    format!("{b:?} contradicts the revision {a:?} given in {key:?}"),
                ));
            }
            (Some(r), _) | (None, Some(r)) => {
                Revision::parse(r).map_err(|e| attr_error("revision", e))?
            }
            (None, None) => Revision::main(),
        };
        // Compiled once, both lists together; the error names the pattern at fault.
        let filter = FileFilter::new(
            &split_list(ctx.get("include")),
            &split_list(ctx.get("exclude")),
        )
        .map_err(|e| {
            attr_error(
                if e.what.starts_with("exclude") {
                    "exclude"
                } else {
                    "include"
                },
                e,
            )
        })?;
        let layout = match ctx.get("layout") {
            None => Layout::Snapshot,
            Some(v) => Layout::parse(v).ok_or_else(|| {
                attr_error(
                    "layout",
                    format!("{v:?} is not \"snapshot\" or \"hf-cache\""),
                )
            })?,
        };
        let pod = match (
            ctx.get("csi.storage.k8s.io/pod.namespace"),
            ctx.get("csi.storage.k8s.io/pod.name"),
        ) {
            (Some(ns), Some(name)) => Some(format!("{ns}/{name}")),
            _ => None,
        };
        Ok(VolumeAttributes {
            model: ModelRef {
                kind,
                repo,
                revision,
            },
            filter,
            layout,
            pod,
            pod_uid: ctx.get("csi.storage.k8s.io/pod.uid").cloned(),
        })
    }
}

fn split_list(value: Option<&String>) -> Vec<String> {
    value
        .map(|v| v.split(',').map(str::to_owned).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<VolumeAttributes> {
        let ctx = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        VolumeAttributes::parse(&ctx)
    }

    #[test]
    fn valid_forms() {
        let a = parse(&[("model", "Qwen/Qwen3-0.6B")]).unwrap();
        assert_eq!(a.model.revision.as_str(), "main");
        assert_eq!(a.model.kind, RepoKind::Model);
        let a = parse(&[("model", "o/r:v1.0")]).unwrap();
        assert_eq!(a.model.revision.as_str(), "v1.0");
        let a = parse(&[("model", "o/r:v1.0"), ("revision", "v1.0")]).unwrap();
        assert_eq!(a.model.revision.as_str(), "v1.0");
        let a = parse(&[
            ("dataset", "o/d"),
            ("revision", "refs/pr/2"),
            ("csi.storage.k8s.io/pod.name", "p"),
            ("csi.storage.k8s.io/pod.namespace", "ns"),
            ("csi.storage.k8s.io/ephemeral", "true"),
        ])
        .unwrap();
        assert_eq!(a.model.kind, RepoKind::Dataset);
        assert_eq!(a.pod.as_deref(), Some("ns/p"));
        assert!(a.filter.is_all());
        assert_eq!(a.layout, Layout::Snapshot);
        let a = parse(&[("model", "o/r"), ("layout", "hf-cache")]).unwrap();
        assert_eq!(a.layout, Layout::HfCache);
        let a = parse(&[
            ("model", "o/r"),
            ("include", "*.json, *.safetensors"),
            ("exclude", "onnx/"),
        ])
        .unwrap();
        assert_eq!(a.filter.include(), ["*.json", "*.safetensors"]);
        assert_eq!(a.filter.exclude(), ["onnx/*"]);
        assert!(a.filter.admits("model.safetensors") && !a.filter.admits("onnx/model.json"));
    }

    #[test]
    fn oversized_attributes_are_refused_naming_the_limit_in_a_short_message() {
        let many = (0..30_000)
            .map(|i| format!("f{i}"))
            .collect::<Vec<_>>()
            .join(",");
        let huge = "x".repeat(100_000);
        let key = "k".repeat(10_000);
        let fits = (0..65)
            .map(|i| format!("f{i}"))
            .collect::<Vec<_>>()
            .join(",");
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("model", "o/r"), ("include", &many)], "at most 16384"),
            (&[("model", "o/r"), ("exclude", &huge)], "at most 16384"),
            (&[("model", "o/r"), (&key, "v")], "unknown attribute"),
            (&[("model", "o/r"), ("include", &fits)], "more than 64"),
            (
                &[("model", "o/r"), ("exclude", &"y".repeat(300))],
                "longer than 256",
            ),
        ];
        for (pairs, want) in cases {
            let err = parse(pairs).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)));
            let msg = err.to_string();
            assert!(msg.contains(want), "{msg}");
            assert!(msg.len() < 400, "{} bytes: {}", msg.len(), &msg[..200]);
        }
    }

    #[test]
    fn hostile_or_wrong_attributes_name_the_field() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[], "\"model\" is required"),
            (
                &[("model", "o/r"), ("modle", "x")],
                "\"modle\": unknown attribute",
            ),
            (&[("model", "../../etc")], "\"model\""),
            (&[("model", "o/r"), ("revision", "ma in")], "\"revision\""),
            (&[("model", "o/r"), ("revision", "../x")], "\"revision\""),
            (&[("model", "o/r:a"), ("revision", "b")], "contradicts"),
            (&[("model", "o/r"), ("dataset", "o/d")], "not both"),
            (&[("model", "o/r\0")], "\"model\""),
            (
                &[("model", "o/r"), ("include", "[oops")],
                "\"include\": include pattern",
            ),
            (
                &[("model", "o/r"), ("exclude", "a{b")],
                "\"exclude\": exclude pattern",
            ),
            (
                &[("model", "o/r"), ("layout", "flat")],
                "\"layout\": \"flat\" is not",
            ),
        ];
        for (pairs, want) in cases {
            let err = parse(pairs).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{pairs:?}");
            assert!(err.to_string().contains(want), "{pairs:?}: {err}");
        }
        let err = parse(&[("model", "o/r"), ("revision", "ma in")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"volume attribute "revision": revision "ma in" is not a branch, tag or 40-hex commit"#
        );
    }

    fn cache(pairs: &[(&str, &str)]) -> Result<CacheAttributes> {
        let ctx = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        match Volume::parse(&ctx, true)? {
            Volume::Cache(c) => Ok(c),
            Volume::Model(m) => panic!("parsed as a model: {m:?}"),
        }
    }

    const POD: [(&str, &str); 3] = [
        ("csi.storage.k8s.io/pod.namespace", "team-a"),
        ("csi.storage.k8s.io/pod.name", "p"),
        ("csi.storage.k8s.io/ephemeral", "true"),
    ];

    #[test]
    fn cache_volumes() {
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut v: Vec<(&str, &str)> = POD.to_vec();
            v.extend_from_slice(extra);
            cache(&v)
        };
        let c = with(&[("cache", "vllm"), ("maxSize", "20Gi")]).unwrap();
        assert_eq!(
            (c.key(), c.max_size, c.pod.as_deref()),
            ("team-a/vllm".into(), Some(20 << 30), Some("team-a/p"))
        );
        assert_eq!(with(&[("cache", "vllm")]).unwrap().max_size, None);
        // Node-wide only from a PV (a StorageClass); never inline.
        let e = with(&[("cache", "vllm"), ("scope", "node")]).unwrap_err();
        assert!(e.to_string().contains("StorageClass"), "{e}");
        let pv = cache(&[
            ("cache", "vllm"),
            ("scope", "node"),
            ("csi.storage.k8s.io/pod.namespace", "team-b"),
            ("csi.storage.k8s.io/ephemeral", "false"),
        ])
        .unwrap();
        assert_eq!(pv.key(), "node/vllm");
        for (bad, says) in [
            (&[("cache", "../x")][..], "cache name"),
            (&[("cache", "a/b")][..], "cache name"),
            (&[("cache", "vllm"), ("maxSize", "-1")][..], "maxSize"),
            (&[("cache", "vllm"), ("maxSize", "1.5Gi")][..], "maxSize"),
            (&[("cache", "vllm"), ("scope", "cluster")][..], "scope"),
            (
                &[("cache", "vllm"), ("model", "o/r")][..],
                "not an attribute of a cache",
            ),
            (
                &[("cache", "vllm"), (READ_ONLY_KEY.0, READ_ONLY_KEY.1)][..],
                "not an attribute",
            ),
        ] {
            let e = with(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
        // Without the pod's namespace (no podInfoOnMount), no cache at all.
        let e = cache(&[("cache", "vllm")]).unwrap_err();
        assert!(e.to_string().contains("podInfoOnMount"), "{e}");
        // A model volume refuses cache keys by name.
        let e = parse(&[("model", "o/r"), ("maxSize", "1Gi")]).unwrap_err();
        assert!(e.to_string().contains("maxSize"), "{e}");
    }
}
