//! The pre-warm catalogue, and which of its entries a node should hold.
//!
//! The catalogue is JSON in a ConfigMap (key `catalogue.json`, rendered by the Helm chart from
//! its values): a list of entries, each naming a model or dataset, a revision, optional
//! include/exclude patterns, and an optional nodeSelector. A node wants an entry when it carries
//! the label `prewarm.modelcache.dev/<name>=true`, or when its labels match the entry's
//! nodeSelector. Removing the label (or the entry) makes the entry's snapshot ordinary again:
//! evictable like any other.
//!
//! The logic is plain functions: [`Catalogue::parse`], [`Catalogue::wanted_by`], and
//! [`wanted_sets`], which turns a stream of Node-label and catalogue changes into the stream of
//! wanted sets, emitting only when the set changes. The watches that feed it live with the
//! Kubernetes client.

use crate::labels::is_valid_label_value;
use futures::{Stream, StreamExt};
use modelcache_core::filter::FileFilter;
use modelcache_core::repo::{ModelRef, RepoId, RepoKind, Revision};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};

/// The label a node carries to want an entry: `prewarm.modelcache.dev/<name>=true`.
pub const PREWARM_LABEL_PREFIX: &str = "prewarm.modelcache.dev/";

/// One entry, as written in the ConfigMap.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawEntry {
    name: String,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    dataset: Option<String>,
    #[serde(default)]
    revision: Option<String>,
    #[serde(default)]
    include: Vec<String>,
    #[serde(default)]
    exclude: Vec<String>,
    #[serde(default)]
    node_selector: BTreeMap<String, String>,
}

/// A checked catalogue entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its name: a label name, so that `prewarm.modelcache.dev/<name>` is a label key.
    pub name: String,
    /// What to hold.
    pub model: ModelRef,
    /// Which files.
    pub filter: FileFilter,
    /// Nodes whose labels include all of these want it too.
    pub node_selector: BTreeMap<String, String>,
}

/// The catalogue: entries by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Catalogue {
    entries: BTreeMap<String, Entry>,
}

/// A catalogue that cannot be used; the message names the entry and what to fix.
#[derive(Debug, thiserror::Error)]
#[error("pre-warm catalogue: {0}")]
pub struct BadCatalogue(String);

impl Catalogue {
    /// Parses and checks `catalogue.json`. One bad entry refuses the whole catalogue, so a typo
    /// never silently drops what nodes hold.
    pub fn parse(json: &str) -> Result<Self, BadCatalogue> {
        let raw: Vec<RawEntry> = serde_json::from_str(json)
            .map_err(|e| BadCatalogue(format!("not a JSON list of entries: {e}")))?;
        let mut entries = BTreeMap::new();
        for r in raw {
            let bad = |what: String| BadCatalogue(format!("entry {:?}: {what}", r.name));
            if r.name.is_empty() || !is_valid_label_value(&r.name) {
                return Err(bad(
                    "the name must be a label name: 1-63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit".into(),
                ));
            }
            let (kind, repo) = match (&r.model, &r.dataset) {
                (Some(m), None) => (RepoKind::Model, m),
                (None, Some(d)) => (RepoKind::Dataset, d),
                _ => return Err(bad("give exactly one of model and dataset".into())),
            };
            let model = ModelRef {
                kind,
                repo: RepoId::parse(repo).map_err(|e| bad(e.to_string()))?,
                revision: match &r.revision {
                    Some(rev) => Revision::parse(rev).map_err(|e| bad(e.to_string()))?,
                    None => Revision::main(),
                },
            };
            let filter = FileFilter::new(&r.include, &r.exclude).map_err(|e| bad(e.to_string()))?;
            let entry = Entry {
                name: r.name.clone(),
                model,
                filter,
                node_selector: r.node_selector.clone(),
            };
            if entries.insert(r.name.clone(), entry).is_some() {
                return Err(bad("the name is used twice".into()));
            }
        }
        Ok(Catalogue { entries })
    }

    /// The entries a node with `labels` wants.
    pub fn wanted_by(&self, labels: &BTreeMap<String, String>) -> BTreeSet<String> {
        self.entries
            .values()
            .filter(|e| {
                let labelled = labels
                    .get(&format!("{PREWARM_LABEL_PREFIX}{}", e.name))
                    .is_some_and(|v| v == "true");
                let selected = !e.node_selector.is_empty()
                    && e.node_selector
                        .iter()
                        .all(|(k, v)| labels.get(k) == Some(v));
                labelled || selected
            })
            .map(|e| e.name.clone())
            .collect()
    }

    /// An entry by name.
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.get(name)
    }
}

/// A change seen by the watches.
#[derive(Debug, Clone)]
pub enum Change {
    /// The Node's labels now.
    NodeLabels(BTreeMap<String, String>),
    /// The catalogue now (a bad one is logged by the watch and not sent).
    Catalogue(Catalogue),
}

/// What [`wanted_sets`] has seen so far.
#[derive(Default)]
struct Seen {
    labels: Option<BTreeMap<String, String>>,
    catalogue: Option<Catalogue>,
    last: Option<BTreeSet<String>>,
}

/// The wanted entries after each change, emitted only when they change. Nothing is emitted
/// before both the Node's labels and the catalogue are known, so a node that has not yet read
/// its labels never drops what it holds.
pub fn wanted_sets(
    changes: impl Stream<Item = Change>,
) -> impl Stream<Item = (Catalogue, BTreeSet<String>)> {
    changes
        .scan(Seen::default(), |seen, change| {
            let Seen {
                labels,
                catalogue,
                last,
            } = seen;
            match change {
                Change::NodeLabels(l) => *labels = Some(l),
                Change::Catalogue(c) => *catalogue = Some(c),
            }
            let out = match (labels.as_ref(), catalogue.as_ref()) {
                (Some(l), Some(c)) => {
                    let wanted = c.wanted_by(l);
                    if last.as_ref() == Some(&wanted) {
                        None
                    } else {
                        *last = Some(wanted.clone());
                        Some((c.clone(), wanted))
                    }
                }
                _ => None,
            };
            futures::future::ready(Some(out))
        })
        .filter_map(futures::future::ready)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CATALOGUE: &str = r#"[
        {"name": "qwen", "model": "Qwen/Qwen3-0.6B", "revision": "main",
         "include": ["*.json", "*.safetensors"]},
        {"name": "gpu-default", "model": "org/embedder",
         "nodeSelector": {"nvidia.com/gpu.present": "true"}},
        {"name": "corpus", "dataset": "org/corpus"}
    ]"#;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn names(set: &BTreeSet<String>) -> Vec<&str> {
        set.iter().map(String::as_str).collect()
    }

    #[test]
    fn a_node_wants_what_its_labels_ask_for_or_its_selector_matches() {
        let c = Catalogue::parse(CATALOGUE).unwrap();
        assert_eq!(c.get("corpus").unwrap().model.kind, RepoKind::Dataset);
        assert!(!c.get("qwen").unwrap().filter.is_all());
        let none = c.wanted_by(&labels(&[]));
        assert!(none.is_empty());
        let node = labels(&[
            ("prewarm.modelcache.dev/qwen", "true"),
            ("prewarm.modelcache.dev/corpus", "false"),
            ("nvidia.com/gpu.present", "true"),
        ]);
        assert_eq!(names(&c.wanted_by(&node)), ["gpu-default", "qwen"]);
    }

    #[test]
    fn a_bad_entry_refuses_the_catalogue_and_says_which() {
        for (json, says) in [
            (
                r#"[{"name": "x", "model": "a/b", "dataset": "c/d"}]"#,
                "exactly one",
            ),
            (r#"[{"name": "bad name", "model": "a/b"}]"#, "label name"),
            (r#"[{"name": "x", "model": "../etc"}]"#, "entry \"x\""),
            (
                r#"[{"name": "x", "model": "a/b"}, {"name": "x", "model": "a/c"}]"#,
                "twice",
            ),
            (
                r#"[{"name": "x", "model": "a/b", "revison": "v1"}]"#,
                "unknown field",
            ),
            (r#"{"name": "x"}"#, "JSON list"),
        ] {
            let err = Catalogue::parse(json).unwrap_err().to_string();
            assert!(err.contains(says), "{json}: {err}");
        }
    }

    #[tokio::test]
    async fn wanted_sets_follow_label_and_catalogue_changes_and_skip_repeats() {
        let c = Catalogue::parse(CATALOGUE).unwrap();
        let smaller =
            Catalogue::parse(r#"[{"name": "qwen", "model": "Qwen/Qwen3-0.6B"}]"#).unwrap();
        let qwen = labels(&[("prewarm.modelcache.dev/qwen", "true")]);
        let both = labels(&[
            ("prewarm.modelcache.dev/qwen", "true"),
            ("nvidia.com/gpu.present", "true"),
        ]);
        let changes = futures::stream::iter([
            Change::NodeLabels(qwen.clone()), // catalogue unknown yet: nothing
            Change::Catalogue(c.clone()),     // {qwen}
            Change::NodeLabels(qwen.clone()), // same: nothing
            Change::NodeLabels(both),         // {gpu-default, qwen}
            Change::Catalogue(smaller),       // {qwen}
            Change::NodeLabels(labels(&[])),  // label removed: {}
        ]);
        let seen: Vec<Vec<String>> = wanted_sets(changes)
            .map(|(_, set)| set.into_iter().collect())
            .collect()
            .await;
        assert_eq!(
            seen,
            [
                vec!["qwen".to_owned()],
                vec!["gpu-default".to_owned(), "qwen".to_owned()],
                vec!["qwen".to_owned()],
                vec![],
            ]
        );
    }
}
