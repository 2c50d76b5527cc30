//! A stand-in for the Kubernetes API server, in process, for the agent's cluster integration:
//! it serves one Node (`node-a`, with the labels and watch events a test gives) and an empty
//! pre-warm catalogue ConfigMap to lists and watches, answers server-side applies and event
//! writes as the real server does, and records every request so tests can assert exact paths,
//! queries, content types and bodies.

use axum::body::Body;
use axum::extract::{Path as UrlPath, RawQuery, Request};
use axum::routing::{get, patch, post};
use futures::StreamExt;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A request the fake API server answered.
#[derive(Debug, Clone)]
pub struct Seen {
    /// `GET`, `PATCH`, `POST`.
    pub method: String,
    /// The URL path.
    pub path: String,
    /// The raw query.
    pub query: String,
    /// The Content-Type header.
    pub content_type: String,
    /// The body, as JSON (`null` when none).
    pub body: Value,
}

/// A running fake API server.
pub struct FakeKubeApi {
    /// Its base URL.
    pub url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

/// Node `node-a` as the API server returns it.
pub fn node(labels: Value, disk_pressure: &str, version: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": "node-a", "resourceVersion": version, "labels": labels},
        "status": {"conditions": [
            {"type": "Ready", "status": "True"},
            {"type": "DiskPressure", "status": disk_pressure}
        ]}
    })
}

async fn record(seen: &Mutex<Vec<Seen>>, req: Request) -> Value {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, 16 << 20)
        .await
        .unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    seen.lock().expect("seen lock").push(Seen {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().unwrap_or_default().to_owned(),
        content_type: parts
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
        body: body.clone(),
    });
    body
}

/// A watch that sends `events` and stays open, or a list of one item.
fn watch_or_list(query: &str, list_kind: &str, item: Value, events: Vec<Value>) -> Body {
    if query.split('&').any(|p| p == "watch=true") {
        let lines = events
            .into_iter()
            .map(|e| Ok::<_, std::io::Error>(format!("{e}\n")));
        Body::from_stream(
            futures::stream::iter(lines)
                .chain(futures::stream::pending())
                .boxed(),
        )
    } else {
        let list = json!({"apiVersion": "v1", "kind": list_kind,
                          "metadata": {"resourceVersion": "1"}, "items": [item]});
        Body::from(list.to_string())
    }
}

/// What the fake serves: the Node a list returns, and the events a Node watch sends.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// `node-a` as a list returns it.
    pub node: Value,
    /// Watch events (`{"type": …, "object": …}`) a Node watch sends before it idles.
    pub node_events: Vec<Value>,
}

impl Default for Cluster {
    /// `node-a` without labels or disk pressure, and a watch on which nothing changes.
    fn default() -> Self {
        Cluster {
            node: node(json!({}), "False", "1"),
            node_events: Vec::new(),
        }
    }
}

impl FakeKubeApi {
    /// Starts it on a free port, serving the default [`Cluster`].
    pub async fn start() -> FakeKubeApi {
        Self::serve(Cluster::default()).await
    }

    /// Starts it on a free port, serving `cluster`.
    pub async fn serve(cluster: Cluster) -> FakeKubeApi {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let (s1, s2, s3, s4) = (seen.clone(), seen.clone(), seen.clone(), seen.clone());
        let app = axum::Router::new()
            .route(
                "/api/v1/nodes",
                get(move |RawQuery(q): RawQuery, req: Request| async move {
                    record(&s1, req).await;
                    let Cluster { node, node_events } = cluster.clone();
                    watch_or_list(&q.unwrap_or_default(), "NodeList", node, node_events)
                }),
            )
            .route(
                "/api/v1/nodes/{name}",
                patch(move |UrlPath(name): UrlPath<String>, req: Request| async move {
                    let mut body = record(&s2, req).await;
                    if body.is_null() {
                        body = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}});
                    }
                    axum::Json(body)
                }),
            )
            .route(
                "/api/v1/namespaces/{ns}/configmaps",
                get(move |RawQuery(q): RawQuery, UrlPath(ns): UrlPath<String>, req: Request| async move {
                    record(&s4, req).await;
                    let q = q.unwrap_or_default();
                    let name = q
                        .split('&')
                        .find_map(|p| p.strip_prefix("fieldSelector=metadata.name%3D"))
                        .unwrap_or_default();
                    let item = json!({"apiVersion": "v1", "kind": "ConfigMap",
                                      "metadata": {"name": name, "namespace": ns, "resourceVersion": "1"},
                                      "data": {"catalogue.json": "[]"}});
                    watch_or_list(&q, "ConfigMapList", item, Vec::new())
                }),
            )
            .route(
                "/apis/events.k8s.io/v1/namespaces/{ns}/events",
                post(move |req: Request| async move {
                    let body = record(&s3, req).await;
                    (axum::http::StatusCode::CREATED, axum::Json(body))
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake API server");
        let url = format!("http://{}", listener.local_addr().expect("an address"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        FakeKubeApi { url, seen }
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen lock").clone()
    }

    /// Writes a kubeconfig for it into `dir`; its path.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\n\
             clusters: [{{name: fake, cluster: {{server: \"{}\"}}}}]\n\
             users: [{{name: fake, user: {{}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]\n\
             current-context: fake\n",
            self.url
        );
        std::fs::write(&path, text).expect("write the kubeconfig");
        path
    }
}
