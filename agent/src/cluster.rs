//! The agent's own Node in the Kubernetes API: a readiness label per repo the store holds, and
//! the full inventory as an annotation, so that schedulers can prefer nodes holding a model and
//! admins can see what each node holds.
//!
//! - **Server-side apply** under the field manager [`FIELD_MANAGER`]: the agent sends the whole
//!   set of fields it owns each time, so the API server removes a label the agent applied before
//!   and leaves out now. Other managers' labels are never touched.
//! - **Never stale**: [`NodeLabeller::run`] recomputes the fields from the store every
//!   [`SYNC_INTERVAL`] and applies them when they changed, so a new model gains its label, and an
//!   evicted one, or one `verify` took down, loses it, within seconds.
//! - **Watches, never lists of the cluster**: [`watch_node`] follows the agent's own Node with a
//!   field selector on its name (its labels ask for pre-warm entries; its `DiskPressure`
//!   condition feeds the evictor), and [`watch_catalogue`] follows the one catalogue ConfigMap.
//! - Keys and values: see [`crate::labels`]. The annotation [`INVENTORY_ANNOTATION`] holds a JSON
//!   list of `{kind, repo, revisions, commit, filter, bytes, state}`.

use crate::labels::{commit_label_value, repo_label_key};
use crate::node;
use crate::prewarm::{Catalogue, Change, wanted_sets};
use crate::store::{Store, StoreError};
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The field manager of everything the agent writes to its Node.
pub const FIELD_MANAGER: &str = "modelcache-agent";
/// The Node annotation holding the inventory.
pub const INVENTORY_ANNOTATION: &str = "modelcache.dev/inventory";
/// How often the Node's fields are recomputed when nothing wakes the labeller.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(2);

/// One snapshot, as the inventory annotation lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Held {
    /// `model` or `dataset`.
    pub kind: &'static str,
    /// `org/name`.
    pub repo: String,
    /// Branches and tags that last resolved to this commit on the node.
    pub revisions: Vec<String>,
    /// The commit.
    pub commit: String,
    /// The include/exclude filter key, for a snapshot of some files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    /// Bytes the snapshot shows.
    pub bytes: u64,
    /// `ready`: complete in the store.
    pub state: &'static str,
}

/// The Node fields the agent owns, as a server-side apply body for `node`.
pub fn node_fields(node: &str, store: &Store) -> Result<Value, StoreError> {
    let mut labels: BTreeMap<String, (u64, String)> = BTreeMap::new();
    let mut held = Vec::new();
    for snap in store.list_snapshots()? {
        let meta = store.peek_meta(&snap);
        // A repo's label names the commit volumes used last.
        let key = repo_label_key(snap.kind, &snap.repo);
        let value = commit_label_value(&snap.commit).to_owned();
        let newer = labels
            .get(&key)
            .is_none_or(|(used, v)| (meta.last_used, &value) > (*used, v));
        if newer {
            labels.insert(key, (meta.last_used, value));
        }
        held.push(Held {
            kind: snap.kind.singular(),
            repo: snap.repo.to_string(),
            revisions: store.revisions_of(&snap),
            commit: snap.commit.to_string(),
            filter: snap.filter.clone(),
            bytes: meta.bytes,
            state: "ready",
        });
    }
    let labels: BTreeMap<String, String> = labels.into_iter().map(|(k, (_, v))| (k, v)).collect();
    let inventory = serde_json::to_string(&held).expect("the inventory serializes");
    Ok(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": node,
            "labels": labels,
            "annotations": { INVENTORY_ANNOTATION: inventory },
        },
    }))
}

/// Starts the agent's work with the API server, until `shutdown`: the labeller of `node`, and
/// its watch, whose `DiskPressure` condition feeds the evictor and whose labels, with the
/// catalogue in ConfigMap `catalogue` (namespace, name) when given, say what to pre-warm.
pub fn spawn(
    api: Arc<node::Node>,
    client: kube::Client,
    node: String,
    catalogue: Option<(String, String)>,
    shutdown: CancellationToken,
) {
    let labeller = NodeLabeller::new(client.clone(), node.clone(), api.store().clone());
    tokio::spawn(labeller.run(shutdown));
    let evictor = api.evictor().clone();
    let node_changes = watch_node(client.clone(), &node).map(move |state| {
        evictor.set_disk_pressure(state.disk_pressure);
        Change::NodeLabels(state.labels)
    });
    let catalogue_changes = match &catalogue {
        Some((namespace, name)) => watch_catalogue(client, namespace, name)
            .map(Change::Catalogue)
            .boxed(),
        None => futures::stream::empty().boxed(),
    };
    let changes = futures::stream::select(node_changes, catalogue_changes);
    tokio::spawn(api.prewarm(wanted_sets(changes)));
}

/// The ConfigMap key holding the pre-warm catalogue.
pub const CATALOGUE_KEY: &str = "catalogue.json";

/// What the agent reads of its Node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeState {
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// True while its `DiskPressure` condition is `True`.
    pub disk_pressure: bool,
}

impl NodeState {
    /// Reads a Node.
    pub fn of(node: &Node) -> Self {
        let disk_pressure = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c.type_ == "DiskPressure" && c.status == "True")
            });
        NodeState {
            labels: node.metadata.labels.clone().unwrap_or_default(),
            disk_pressure,
        }
    }
}

/// The agent's own Node as it changes, watched with the field selector `metadata.name=<name>`.
/// Errors are logged and the watch retried with backoff.
pub fn watch_node(client: kube::Client, name: &str) -> impl Stream<Item = NodeState> + use<> {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    watcher(Api::<Node>::all(client), config)
        .default_backoff()
        .applied_objects()
        .filter_map(|r| async move {
            r.map(|node| NodeState::of(&node))
                .inspect_err(|e| tracing::warn!(error = %e, "watching the node failed; retrying"))
                .ok()
        })
}

/// The catalogue in ConfigMap `namespace/name` (key [`CATALOGUE_KEY`]) as it changes. A
/// catalogue that does not parse is logged and skipped, so the last good one stays in force.
pub fn watch_catalogue(
    client: kube::Client,
    namespace: &str,
    name: &str,
) -> impl Stream<Item = Catalogue> + use<> {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    watcher(Api::<ConfigMap>::namespaced(client, namespace), config)
        .default_backoff()
        .applied_objects()
        .filter_map(|r| async move {
            let cm = r
                .inspect_err(|e| tracing::warn!(error = %e, "watching the catalogue failed; retrying"))
                .ok()?;
            let json = cm
                .data
                .as_ref()
                .and_then(|d| d.get(CATALOGUE_KEY))
                .map_or("[]", String::as_str);
            Catalogue::parse(json)
                .inspect_err(|e| tracing::warn!(error = %e, "ignoring the new catalogue; the last good one stays"))
                .ok()
        })
}

/// Keeps the agent's fields on its Node in step with the store.
pub struct NodeLabeller {
    nodes: Api<Node>,
    node: String,
    store: Arc<Store>,
    applied: Option<Value>,
}

/// Why the Node's labels could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// Reading what the store holds failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The API server refused or could not be reached.
    #[error("applying the Node's labels: {0}")]
    Api(#[from] kube::Error),
}

impl NodeLabeller {
    /// A labeller of `node` through `client`.
    pub fn new(client: kube::Client, node: String, store: Arc<Store>) -> Self {
        NodeLabeller {
            nodes: Api::all(client),
            node,
            store,
            applied: None,
        }
    }

    /// Applies the Node's fields if they changed since the last apply; true if it applied.
    pub async fn sync(&mut self) -> Result<bool, SyncError> {
        let store = self.store.clone();
        let node = self.node.clone();
        let fields = tokio::task::spawn_blocking(move || node_fields(&node, &store))
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))?;
        if self.applied.as_ref() == Some(&fields) {
            return Ok(false);
        }
        let params = PatchParams::apply(FIELD_MANAGER).force();
        self.nodes
            .patch(&self.node, &params, &Patch::Apply(&fields))
            .await?;
        let labels = fields["metadata"]["labels"]
            .as_object()
            .map_or(0, |l| l.len());
        tracing::info!(node = %self.node, labels, "applied the node's model labels");
        self.applied = Some(fields);
        Ok(true)
    }

    /// Syncs every [`SYNC_INTERVAL`] until `shutdown`. A failed apply is logged and tried again
    /// at the next tick.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(SYNC_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => return,
            }
            if let Err(e) = self.sync().await {
                tracing::warn!(node = %self.node, error = %e, "cannot update the node's model labels; retrying");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SnapshotFile;
    use modelcache_core::repo::{RepoId, RepoKind, RepoPath};
    use modelcache_testkit::kube_api::{self, Cluster, FakeKubeApi};

    /// The stand-in API server with node-a labelled for pre-warming, whose watch then sees
    /// DiskPressure turn True.
    async fn fake_api_server() -> FakeKubeApi {
        let labels = json!({"prewarm.modelcache.dev/qwen": "true"});
        FakeKubeApi::serve(Cluster {
            node: kube_api::node(labels.clone(), "False", "1"),
            node_events: vec![json!({
                "type": "MODIFIED",
                "object": kube_api::node(labels, "True", "2"),
            })],
        })
        .await
    }

    fn client(api: &FakeKubeApi) -> kube::Client {
        kube::Client::try_from(kube::Config::new(api.url.parse().unwrap())).unwrap()
    }

    fn snapshot(store: &Store, repo: &str, commit: &str, bytes: &[u8]) -> crate::store::Snapshot {
        let hash = crate::store::tests::put_blob(store, bytes);
        let file = SnapshotFile {
            path: RepoPath::parse("w.bin").unwrap(),
            hash,
        };
        let repo = RepoId::parse(repo).unwrap();
        let snap = store
            .assemble_snapshot(
                &crate::store::SnapshotKey::parse(RepoKind::Model, &repo, commit, None).unwrap(),
                &[file],
            )
            .unwrap();
        store.record_snapshot(&snap, "test").unwrap();
        snap
    }

    #[tokio::test]
    async fn labels_follow_the_store_through_server_side_apply() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let snap = snapshot(&store, "Qwen/Qwen3-0.6B", commit, b"weights");
        let api = fake_api_server().await;
        let mut labeller = NodeLabeller::new(client(&api), "node-a".into(), store.clone());

        assert!(labeller.sync().await.unwrap());
        let first = api.seen()[0].clone();
        assert_eq!(
            (first.method.as_str(), first.path.as_str()),
            ("PATCH", "/api/v1/nodes/node-a")
        );
        // Server-side apply, as this manager, taking over conflicting fields.
        let mut query: Vec<&str> = first.query.split('&').filter(|p| !p.is_empty()).collect();
        query.sort();
        assert_eq!(query, ["fieldManager=modelcache-agent", "force=true"]);
        assert_eq!(first.content_type, "application/apply-patch+yaml");
        assert_eq!(
            first.body["metadata"]["labels"],
            json!({"models.modelcache.dev/Qwen--Qwen3-0.6B": "0123456789ab"})
        );
        let inventory: Value = serde_json::from_str(
            first.body["metadata"]["annotations"][INVENTORY_ANNOTATION]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            inventory,
            json!([{"kind": "model", "repo": "Qwen/Qwen3-0.6B", "revisions": [],
                    "commit": commit, "bytes": 7, "state": "ready"}])
        );

        // Nothing changed: nothing sent.
        assert!(!labeller.sync().await.unwrap());
        assert_eq!(api.seen().len(), 1);

        // Evicted: the next apply leaves the label out, and the API server drops it.
        store.remove_snapshot(&snap).unwrap();
        assert!(labeller.sync().await.unwrap());
        let second = api.seen()[1].clone();
        assert_eq!(second.body["metadata"]["labels"], json!({}));
        assert_eq!(
            second.body["metadata"]["annotations"][INVENTORY_ANNOTATION],
            "[]"
        );
    }

    #[tokio::test]
    async fn the_node_is_watched_by_its_name_alone_and_its_disk_pressure_seen() {
        let api = fake_api_server().await;
        let states: Vec<NodeState> = watch_node(client(&api), "node-a").take(2).collect().await;
        let labels: BTreeMap<String, String> =
            [("prewarm.modelcache.dev/qwen".to_owned(), "true".to_owned())].into();
        assert_eq!(
            states,
            [
                NodeState {
                    labels: labels.clone(),
                    disk_pressure: false
                },
                NodeState {
                    labels,
                    disk_pressure: true
                },
            ]
        );
        let requests = api.seen();
        assert_eq!(requests.len(), 2, "one list, one watch: {requests:?}");
        for r in &requests {
            assert_eq!(
                (r.method.as_str(), r.path.as_str()),
                ("GET", "/api/v1/nodes")
            );
            assert!(
                r.query
                    .split('&')
                    .any(|p| p == "fieldSelector=metadata.name%3Dnode-a"),
                "only this node is asked for: {}",
                r.query
            );
        }
        assert!(requests[1].query.contains("watch=true"));
        assert!(requests[1].query.contains("resourceVersion=1"));
    }

    #[test]
    fn a_repo_label_names_the_commit_used_last() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let old = snapshot(&store, "org/m", &"a".repeat(40), b"v1");
        let new = snapshot(&store, "org/m", &"b".repeat(40), b"v2");
        store.set_last_used(&old, 2000);
        store.set_last_used(&new, 1000);
        let fields = node_fields("n", &store).unwrap();
        assert_eq!(
            fields["metadata"]["labels"],
            json!({"models.modelcache.dev/org--m": "aaaaaaaaaaaa"})
        );
        let inventory = fields["metadata"]["annotations"][INVENTORY_ANNOTATION]
            .as_str()
            .unwrap();
        assert_eq!(
            serde_json::from_str::<Vec<Value>>(inventory).unwrap().len(),
            2
        );
    }
}
