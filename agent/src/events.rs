//! Events on the pod a volume is for, so users see a model's progress in `kubectl describe pod`:
//!
//! - `ModelFetching` (Normal): bytes and files so far, at most once per [`PROGRESS_EVERY`] per
//!   pod and model, however often kubelet retries the publish.
//! - `CacheReady` (Normal): a compilation cache, its scope and size, and whether it was made
//!   now or already on the node.
//! - `ModelReady` (Normal): commit, bytes, files, seconds since the pod first asked, and where
//!   the files came from (or that the node already held them).
//! - `ModelFetchFailed` (Warning): the reason, worded to act on, at most once per
//!   [`PROGRESS_EVERY`] per pod and model.
//!
//! Written as `events.k8s.io/v1` Events by kube's recorder (which folds repeats into a series),
//! reported by controller [`REPORTING_CONTROLLER`] from the node's name. Publishing never
//! blocks a publish: it runs in the background, and a failure is logged.

use crate::fetch::ProgressView;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use modelcache_core::size::Size;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The reporting controller of every event.
pub const REPORTING_CONTROLLER: &str = "modelcache.dev/agent";
/// Least time between two progress (or failure) events for one pod and model.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(15);

/// Pod waits remembered at most. A wait is forgotten when its model is ready; pods deleted
/// while waiting, or waiting on a model that never comes, would otherwise stay for ever.
pub const MAX_WAITING: usize = 4096;

/// A wait with no event for this long is forgotten first when the map is full.
const STALE_WAIT: Duration = Duration::from_secs(30 * 60);

/// The pod a volume is for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PodRef {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its uid.
    pub uid: String,
}

impl PodRef {
    /// From `namespace/name` and a uid, as the CSI plugin passes them; None when incomplete.
    pub fn parse(pod: &str, uid: &str) -> Option<Self> {
        let (namespace, name) = pod.split_once('/')?;
        (!namespace.is_empty() && !name.is_empty() && !uid.is_empty()).then(|| PodRef {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid: uid.to_owned(),
        })
    }

    fn reference(&self) -> ObjectReference {
        ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(self.namespace.clone()),
            name: Some(self.name.clone()),
            uid: Some(self.uid.clone()),
            ..Default::default()
        }
    }
}

/// What is known of a pod's wait for a model.
#[derive(Debug)]
struct Waiting {
    since: Instant,
    last_event: Option<Instant>,
}

/// Events on pods; a no-op outside a cluster.
pub struct PodEvents {
    recorder: Option<Recorder>,
    waiting: Mutex<HashMap<(PodRef, String), Waiting>>,
}

impl std::fmt::Debug for PodEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodEvents")
            .field("enabled", &self.recorder.is_some())
            .finish()
    }
}

/// Makes room in a full map of waits: the stale ones go, or else the oldest.
fn forget_oldest(waiting: &mut HashMap<(PodRef, String), Waiting>, now: Instant) {
    let last = |w: &Waiting| w.last_event.unwrap_or(w.since);
    waiting.retain(|_, w| now.duration_since(last(w)) < STALE_WAIT);
    if waiting.len() >= MAX_WAITING {
        let oldest = waiting
            .iter()
            .min_by_key(|(_, w)| last(w))
            .map(|(k, _)| k.clone());
        if let Some(k) = oldest {
            waiting.remove(&k);
        }
    }
}

impl PodEvents {
    /// No events (no cluster).
    pub fn disabled() -> Self {
        PodEvents {
            recorder: None,
            waiting: Mutex::default(),
        }
    }

    /// Events through `client`, reported from node `node`.
    pub fn new(client: kube::Client, node: &str) -> Self {
        let reporter = Reporter {
            controller: REPORTING_CONTROLLER.into(),
            instance: Some(node.to_owned()),
        };
        PodEvents {
            recorder: Some(Recorder::new(client, reporter)),
            waiting: Mutex::default(),
        }
    }

    /// True when the pod's wait for `model` may get another progress or failure event now; the
    /// first call starts the pod's wait.
    fn due(&self, pod: &PodRef, model: &str, now: Instant) -> bool {
        let mut waiting = self.waiting.lock().expect("events lock");
        let key = (pod.clone(), model.to_owned());
        if waiting.len() >= MAX_WAITING && !waiting.contains_key(&key) {
            forget_oldest(&mut waiting, now);
        }
        let w = waiting.entry(key).or_insert(Waiting {
            since: now,
            last_event: None,
        });
        let due = w
            .last_event
            .is_none_or(|t| now.duration_since(t) >= PROGRESS_EVERY);
        if due {
            w.last_event = Some(now);
        }
        due
    }

    /// The model is still on its way.
    pub fn fetching(&self, pod: &PodRef, model: &str, commit: &str, p: ProgressView) {
        if !self.due(pod, model, Instant::now()) {
            return;
        }
        let percent = (p.bytes_done * 100).checked_div(p.bytes_total).unwrap_or(0);
        let note = format!(
            "{model}@{}: {} of {} ({percent}%), {} of {} files",
            &commit[..commit.len().min(12)],
            Size(p.bytes_done),
            Size(p.bytes_total),
            p.files_done,
            p.files_total
        );
        self.publish(pod, EventType::Normal, "ModelFetching", "Fetch", note);
    }

    /// The model is ready to mount; `source` names where its files came from. A pod that never
    /// waited for it is told the node already held it.
    pub fn ready(
        &self,
        pod: &PodRef,
        model: &str,
        commit: &str,
        bytes: u64,
        files: u32,
        source: &str,
    ) {
        let since = self
            .waiting
            .lock()
            .expect("events lock")
            .remove(&(pod.clone(), model.to_owned()))
            .map(|w| w.since);
        let whence = match since {
            Some(s) => format!(
                "fetched in {:.1} s from {source}",
                s.elapsed().as_secs_f64()
            ),
            None => "already on this node".to_owned(),
        };
        let note = format!(
            "{model}@{}: {}, {files} files, {whence}",
            &commit[..commit.len().min(12)],
            Size(bytes)
        );
        self.publish(pod, EventType::Normal, "ModelReady", "Fetch", note);
    }

    /// The hub could not be asked which commit `revision` names now (`error`): the pod gets
    /// `commit`, which it last resolved to on this node at `resolved`.
    pub fn served_stale(
        &self,
        pod: &PodRef,
        model: &str,
        revision: &str,
        commit: &str,
        resolved: Option<std::time::SystemTime>,
        error: &str,
    ) {
        let when = match resolved.and_then(|t| t.elapsed().ok()) {
            Some(age) => format!(
                "as resolved {} ago",
                indicatif::HumanDuration(std::time::Duration::from_secs(age.as_secs()))
            ),
            None => "as last resolved".to_owned(),
        };
        let note: String = format!(
            "{model}: the hub could not be asked which commit {revision} names now, so this pod gets {} {when}; it may be out of date ({error})",
            &commit[..commit.len().min(12)]
        )
        .chars()
        .take(1000)
        .collect();
        self.publish(
            pod,
            EventType::Warning,
            "ModelRevisionStale",
            "Resolve",
            note,
        );
    }

    /// A cache volume is ready to mount: made now, or shared with the pods already using it.
    pub fn cache_ready(
        &self,
        pod: &PodRef,
        key: &modelcache_core::cache::CacheKey,
        ensured: &crate::caches::Ensured,
    ) {
        let how = if ensured.created {
            "made empty on this node"
        } else {
            "already on this node"
        };
        let note = format!(
            "cache {key} ({}): at most {}, {how}",
            key.scope,
            Size(ensured.max_size)
        );
        self.publish(pod, EventType::Normal, "CacheReady", "Mount", note);
    }

    /// The model cannot be had; `reason` says what to do.
    pub fn failed(&self, pod: &PodRef, model: &str, reason: &str) {
        if !self.due(pod, model, Instant::now()) {
            return;
        }
        // Event notes are limited to 1 kB.
        let note: String = format!("{model}: {reason}").chars().take(1000).collect();
        self.publish(pod, EventType::Warning, "ModelFetchFailed", "Fetch", note);
    }

    fn publish(&self, pod: &PodRef, type_: EventType, reason: &str, action: &str, note: String) {
        let Some(recorder) = self.recorder.clone() else {
            return;
        };
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        let reference = pod.reference();
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&event, &reference).await {
                tracing::warn!(error = %e, reason = %event.reason, "cannot write a pod event");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelcache_testkit::kube_api::FakeKubeApi;
    use serde_json::{Value, json};

    /// Every event the server got: once `n` have come, it waits a while longer for any that
    /// should not have been sent, so a test can assert there were exactly `n`.
    async fn settled(api: &FakeKubeApi, n: usize) -> Vec<(String, Value)> {
        let events = || -> Vec<(String, Value)> {
            api.seen()
                .into_iter()
                .filter(|s| s.method == "POST" && s.path.ends_with("/events"))
                .map(|s| (s.path, s.body))
                .collect()
        };
        for _ in 0..200 {
            if events().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        events()
    }

    fn client(api: &FakeKubeApi) -> kube::Client {
        kube::Client::try_from(kube::Config::new(api.url.parse().unwrap())).unwrap()
    }

    #[tokio::test]
    async fn a_pod_sees_progress_rate_limited_then_ready_with_the_facts() {
        let api = FakeKubeApi::start().await;
        let events = PodEvents::new(client(&api), "node-a");
        let pod = PodRef::parse("team-a/vllm-0", "0b3c7c4e-uid").unwrap();
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let progress = ProgressView {
            bytes_done: 1_200_000_000,
            bytes_total: 4_800_000_000,
            files_done: 3,
            files_total: 10,
            ..Default::default()
        };
        events.fetching(&pod, "Qwen/Qwen3-0.6B", commit, progress);
        // A retry seconds later: no second progress event.
        events.fetching(&pod, "Qwen/Qwen3-0.6B", commit, progress);
        let hub = "hub https://huggingface.co";
        events.ready(&pod, "Qwen/Qwen3-0.6B", commit, 4_800_000_000, 10, hub);
        // Another pod finds it on the node.
        let other = PodRef::parse("team-a/vllm-1", "uid-2").unwrap();
        events.ready(&other, "Qwen/Qwen3-0.6B", commit, 4_800_000_000, 10, hub);
        let seen = settled(&api, 3).await;
        assert_eq!(seen.len(), 3, "{seen:?}");
        let (path, fetching) = &seen[0];
        assert_eq!(path, "/apis/events.k8s.io/v1/namespaces/team-a/events");
        assert_eq!(fetching["reason"], "ModelFetching");
        assert_eq!(fetching["type"], "Normal");
        assert_eq!(
            fetching["note"],
            "Qwen/Qwen3-0.6B@0123456789ab: 1.1 GiB of 4.5 GiB (25%), 3 of 10 files"
        );
        assert_eq!(
            fetching["regarding"],
            json!({"apiVersion": "v1", "kind": "Pod", "namespace": "team-a",
                   "name": "vllm-0", "uid": "0b3c7c4e-uid"})
        );
        assert_eq!(fetching["reportingController"], REPORTING_CONTROLLER);
        assert_eq!(fetching["reportingInstance"], "node-a");
        let ready = &seen[1].1;
        assert_eq!(ready["reason"], "ModelReady");
        let note = ready["note"].as_str().unwrap();
        assert!(
            note.starts_with("Qwen/Qwen3-0.6B@0123456789ab: 4.5 GiB, 10 files, fetched in ")
                && note.ends_with(" s from hub https://huggingface.co"),
            "{note}"
        );
        assert_eq!(
            seen[2].1["note"],
            "Qwen/Qwen3-0.6B@0123456789ab: 4.5 GiB, 10 files, already on this node"
        );
    }

    #[tokio::test]
    async fn failures_are_warnings_and_outside_a_cluster_nothing_is_sent() {
        let api = FakeKubeApi::start().await;
        let events = PodEvents::new(client(&api), "node-a");
        let pod = PodRef::parse("ns/p", "uid-1").unwrap();
        events.failed(
            &pod,
            "org/gated",
            "access to org/gated was refused (403): accept the licence",
        );
        events.failed(&pod, "org/gated", "again, seconds later");
        let seen = settled(&api, 1).await;
        assert_eq!(
            seen.len(),
            1,
            "the second failure was not held back: {seen:?}"
        );
        assert_eq!(seen[0].1["type"], "Warning");
        assert_eq!(seen[0].1["reason"], "ModelFetchFailed");
        assert!(
            seen[0].1["note"]
                .as_str()
                .unwrap()
                .contains("accept the licence")
        );

        PodEvents::disabled().failed(&pod, "org/m", "no cluster: a no-op");
        assert!(PodRef::parse("no-slash", "u").is_none());
        assert!(PodRef::parse("ns/p", "").is_none());
    }

    #[tokio::test]
    async fn a_pod_is_told_whether_its_cache_was_made_or_shared() {
        use modelcache_core::cache::{CacheKey, CacheName, CacheScope};
        let api = FakeKubeApi::start().await;
        let events = PodEvents::new(client(&api), "node-a");
        let pod = PodRef::parse("team-a/vllm-0", "uid-1").unwrap();
        let key = CacheKey {
            scope: CacheScope::namespace("team-a").unwrap(),
            name: CacheName::parse("vllm").unwrap(),
        };
        let mut ensured = crate::caches::Ensured {
            image: "/s/caches/ns.team-a.vllm/image.ext4".into(),
            mount_dir: "/s/caches/ns.team-a.vllm/mnt".into(),
            max_size: 20 << 30,
            created: true,
        };
        events.cache_ready(&pod, &key, &ensured);
        ensured.created = false;
        events.cache_ready(&pod, &key, &ensured);
        let seen = settled(&api, 2).await;
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!(seen[0].0, "/apis/events.k8s.io/v1/namespaces/team-a/events");
        assert_eq!(seen[0].1["reason"], "CacheReady");
        assert_eq!(seen[0].1["type"], "Normal");
        assert_eq!(
            seen[0].1["note"],
            "cache team-a/vllm (namespace team-a): at most 20.0 GiB, made empty on this node"
        );
        assert_eq!(
            seen[1].1["note"],
            "cache team-a/vllm (namespace team-a): at most 20.0 GiB, already on this node"
        );
    }

    #[test]
    fn waits_of_pods_that_never_get_their_model_are_bounded() {
        let events = PodEvents::disabled();
        let start = Instant::now();
        let pod = |i: usize| PodRef::parse(&format!("ns/p{i}"), &format!("uid-{i}")).unwrap();
        for i in 0..MAX_WAITING + 500 {
            assert!(events.due(&pod(i), "o/r", start + Duration::from_millis(i as u64)));
        }
        let waiting = events.waiting.lock().unwrap();
        assert_eq!(waiting.len(), MAX_WAITING);
        // The oldest went; the newest is remembered.
        assert!(!waiting.contains_key(&(pod(0), "o/r".to_owned())));
        assert!(waiting.contains_key(&(pod(MAX_WAITING + 499), "o/r".to_owned())));
    }
}
