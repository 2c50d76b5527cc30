//! The peer tier, as a fleet on one machine: every agent on a host of its own (a network
//! namespace with its own address, joined to the others by veth pairs and a bridge), the hub on
//! another, its egress capped in total. Agents find each other as the chart makes them do: a
//! name (the headless Service) that resolves to every agent, their own address left out. Each
//! node's CSI plugin stays in this namespace, where its mounts are, and talks to its agent over
//! the agent's unix socket, as on a real node. Needs root and iproute2.

use modelcache_tests::models::generate_model;
use modelcache_tests::netns::{Host, Lan};
use modelcache_tests::node::{Hub, LocalNode, publish_request, publish_until_done};
use modelcache_tests::procs::{Proc, agent_command, serve_hub_on};
use modelcache_tests::tree::assert_same_tree;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const SECRET: &str = "a-cluster-secret-for-the-test-0123";

/// The name every agent resolves to all agents' addresses (the chart's headless Service).
const PEERS_NAME: &str = "modelcache-peers";

/// The hub's total egress in the fleet tests: every node together shares it.
const HUB_BYTES_PER_SECOND: &str = "40000000";

/// A hub and `n` nodes, each on a host of its own.
struct Fleet {
    // Dropped in this order: the nodes, the hub, then the network.
    nodes: Vec<LocalNode>,
    hosts: Vec<Host>,
    _hub: Proc,
    hub_host: Host,
    endpoint: String,
    _lan: Lan,
}

impl Fleet {
    /// Serves `dir/hub` (extra hub flags `hub_extra`) and starts `n` nodes in `dir/n<i>`, each
    /// with `node_extra(i)` added to its agent's flags.
    async fn start(
        dir: &Path,
        n: usize,
        hub_extra: &[&str],
        node_extra: impl Fn(usize) -> Vec<String>,
    ) -> Fleet {
        let mut lan = Lan::new().unwrap();
        let hub_host = lan.host("hub").unwrap();
        let mut extra = vec!["--max-total-bytes-per-second", HUB_BYTES_PER_SECOND];
        extra.extend_from_slice(hub_extra);
        let (hub, endpoint) = serve_hub_on(&hub_host, &dir.join("hub"), &extra, dir).unwrap();
        let hosts: Vec<Host> = (0..n)
            .map(|i| lan.host(&format!("n{i}")).unwrap())
            .collect();
        let names: Vec<_> = hosts.iter().map(|h| (h.ip, PEERS_NAME)).collect();
        let secret = dir.join("peer-secret");
        std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
        let mut nodes = Vec::new();
        for (i, host) in hosts.iter().enumerate() {
            host.set_hosts(&names).unwrap();
            let ip = host.ip.to_string();
            let mut flags: Vec<String> = [
                "--peer-listen",
                "0.0.0.0:7475",
                "--peer-own-ip",
                &ip,
                "--peers-dns",
                &format!("{PEERS_NAME}:7475"),
                "--peer-token-file",
                secret.to_str().unwrap(),
                "--metrics-listen",
                &format!("{ip}:9100"),
            ]
            .map(str::to_owned)
            .to_vec();
            flags.extend(node_extra(i));
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            let node = LocalNode::start_on(
                Some(host),
                &dir.join(format!("n{i}")),
                Hub::Remote(endpoint.clone()),
                60,
                &flags,
            )
            .unwrap();
            nodes.push(node);
        }
        for node in &mut nodes {
            node.wait_ready().await.unwrap();
        }
        Fleet {
            nodes,
            hosts,
            _hub: hub,
            hub_host,
            endpoint,
            _lan: lan,
        }
    }

    /// The hub's count `key` (`file` answers, `file_bytes` sent, …).
    fn hub_count(&self, key: &str) -> u64 {
        let addr = self.endpoint.trim_start_matches("http://");
        let (status, body) = self
            .hub_host
            .http_get(addr, modelcache_hub::server::REQUESTS_PATH)
            .unwrap();
        assert_eq!(status, 200, "{body}");
        let counts: serde_json::Value = serde_json::from_str(&body).unwrap();
        counts[key].as_u64().unwrap_or(0)
    }

    /// Node `i`'s metric `series`.
    fn metric(&self, i: usize, series: &str) -> u64 {
        metric(&self.hosts[i], series)
    }

    /// Where node `i` says its snapshot's bytes came from (`ls`).
    fn source(&self, i: usize) -> String {
        let store = self.nodes[i].store();
        let out = agent_command(&["ls", "--json", "--store", store.to_str().unwrap()]).unwrap();
        let inv: serde_json::Value = serde_json::from_str(&out).unwrap();
        inv["snapshots"][0]["source"]
            .as_str()
            .unwrap_or_else(|| panic!("no snapshot: {out}"))
            .to_owned()
    }

    /// Publishes `repo` at volume `v` of node `i`, as kubelet would.
    async fn publish(&mut self, i: usize, repo: &str) -> PathBuf {
        let node = &mut self.nodes[i];
        let target = node.target("v");
        node.publish("v", &target, &[("model", repo)], |_| {})
            .await
            .unwrap_or_else(|e| panic!("node {i}: {e:?}\n{}", node.agent_log()));
        target
    }
}

/// The metric `series` of the agent on `host`, read over the network from the host itself.
fn metric(host: &Host, series: &str) -> u64 {
    let (status, body) = host
        .http_get(&format!("{}:9100", host.ip), "/metrics")
        .unwrap();
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{body}"))
}

/// The hub's repo `org/m`: the generated model plus `shards` files of 1 MiB, so that in a first
/// wave every node owns some.
fn model(dir: &Path, weights: usize, shards: u8) -> PathBuf {
    let model = dir.join("hub/models/org/m");
    generate_model(&model, weights).unwrap();
    for i in 0..shards {
        std::fs::write(model.join(format!("shard-{i:02}.bin")), vec![i; 1 << 20]).unwrap();
    }
    model
}

fn tree_bytes(dir: &Path) -> u64 {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .map(|e| e.unwrap().metadata().unwrap())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn one_node_then_the_rest_take_it_from_peers_and_the_hub_serves_them_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = model(dir.path(), 16 << 20, 0);
    let model_bytes = tree_bytes(&model);
    let mut fleet = Fleet::start(dir.path(), 3, &[], |_| vec![]).await;

    fleet.publish(0, "org/m").await;
    let files_before = fleet.hub_count("file");
    assert!(files_before > 0);
    assert_eq!(fleet.hub_count("file_bytes"), model_bytes);

    // Two more nodes at once: the hub sends them no file, only the revision and the file list.
    let (t1, t2) = {
        let [_, a, b] = &mut fleet.nodes[..] else {
            unreachable!()
        };
        let (t1, t2) = (a.target("v"), b.target("v"));
        let (r1, r2) = tokio::join!(
            a.publish("v", &t1, &[("model", "org/m")], |_| {}),
            b.publish("v", &t2, &[("model", "org/m")], |_| {}),
        );
        r1.unwrap();
        r2.unwrap();
        (t1, t2)
    };
    assert_same_tree(&model, &t1);
    assert_same_tree(&model, &t2);
    assert_eq!(
        fleet.hub_count("file"),
        files_before,
        "the hub served a later node a file"
    );
    // Each says where its bytes came from and counts them; the senders count what they sent.
    let peers_series = "modelcache_fetched_bytes_total{source=\"peers\"}";
    let served_series = "modelcache_peer_served_bytes_total";
    for i in [1, 2] {
        let source = fleet.source(i);
        assert!(
            source.starts_with("peers (") && !source.contains("hub"),
            "{source}"
        );
        assert_eq!(fleet.metric(i, peers_series), model_bytes);
    }
    let served: u64 = (0..3).map(|i| fleet.metric(i, served_series)).sum();
    assert_eq!(served, 2 * model_bytes);

    // A peer port answers nothing without the secret, from a node's host or any other.
    let blob = format!("/v1/blobs/sha1-{}", "0".repeat(40));
    let peer0 = format!("{}:7475", fleet.hosts[0].ip);
    for host in [&fleet.hosts[1], &fleet.hub_host] {
        let (status, _) = host.http_get(&peer0, &blob).unwrap();
        assert_eq!(status, 401);
    }
}

/// The first wave: four nodes start the same model at once. They split it (each gets a share
/// from the hub and the rest from the others), and the hub sends the model once.
#[tokio::test(flavor = "multi_thread")]
async fn nodes_that_start_a_model_at_once_cost_the_hub_one_copy() {
    let dir = tempfile::tempdir().unwrap();
    let model = model(dir.path(), 16 << 20, 12);
    let model_bytes = tree_bytes(&model);
    let mut fleet = Fleet::start(dir.path(), 4, &[], |_| vec![]).await;
    let targets: Vec<PathBuf> = fleet.nodes.iter().map(|n| n.target("v")).collect();
    let publishes = fleet
        .nodes
        .iter_mut()
        .zip(&targets)
        .map(|(n, t)| n.publish("v", t, &[("model", "org/m")], |_| {}));
    for r in futures::future::join_all(publishes).await {
        r.unwrap();
    }
    for t in &targets {
        assert_same_tree(&model, t);
    }
    let egress = fleet.hub_count("file_bytes");
    assert_eq!(
        egress, model_bytes,
        "the hub sent {egress} bytes for a {model_bytes}-byte model"
    );
    for i in 0..4 {
        let source = fleet.source(i);
        assert!(
            source.starts_with("peers (") && source.contains(" + hub "),
            "node {i}: {source}\n{}",
            fleet.nodes[i].agent_log()
        );
    }
}

/// A node holding the model dies while it sends it: the node taking it goes on from the hub,
/// ends with the right bytes, and keeps nothing the dead peer sent unverified.
#[tokio::test(flavor = "multi_thread")]
async fn a_peer_killed_mid_transfer_is_passed_over() {
    let dir = tempfile::tempdir().unwrap();
    let model = model(dir.path(), 48 << 20, 0);
    let model_bytes = tree_bytes(&model);
    // Node 0 sends at 8 MB/s: the weights take it six seconds.
    let mut fleet = Fleet::start(dir.path(), 2, &[], |i| match i {
        0 => vec!["--peer-max-upload-mbps".into(), "8".into()],
        _ => vec![],
    })
    .await;
    fleet.publish(0, "org/m").await;
    let hub_before = fleet.hub_count("file_bytes");

    let (target, killed) = {
        let [a, b] = &mut fleet.nodes[..] else {
            unreachable!()
        };
        let target = b.target("v");
        let hosts = &fleet.hosts;
        let publish = b.publish("v", &target, &[("model", "org/m")], |_| {});
        let kill = async {
            // Once node 0 has sent 8 MiB (bounded: the weights take it about six seconds).
            let mut sent = 0;
            for _ in 0..400 {
                sent = metric(&hosts[0], "modelcache_peer_served_bytes_total");
                if sent >= 8 << 20 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            a.kill_agent();
            sent
        };
        let (published, killed) = tokio::join!(publish, kill);
        published.unwrap_or_else(|e| panic!("{e:?}\n{}", b.agent_log()));
        (target, killed)
    };
    assert!(
        killed >= 8 << 20 && killed < model_bytes,
        "node 0 was killed after sending {killed} bytes"
    );
    assert_same_tree(&model, &target);
    let from_hub = fleet.hub_count("file_bytes") - hub_before;
    assert!(
        from_hub > 0 && from_hub <= model_bytes,
        "the hub sent node 1 {from_hub} bytes"
    );
    let source = fleet.source(1);
    assert!(source.contains(" + hub "), "{source}");
}

/// A node whose store holds wrong bytes under a blob's name (a bad disk, or a lie) sends them:
/// the node taking the model finds them wrong, stops asking that peer, and gets the right bytes
/// from the hub.
#[tokio::test(flavor = "multi_thread")]
async fn a_peer_that_sends_wrong_bytes_is_dropped_and_the_bytes_come_from_the_hub() {
    let dir = tempfile::tempdir().unwrap();
    let weights = 8 << 20;
    let model = model(dir.path(), weights, 0);
    let mut fleet = Fleet::start(dir.path(), 2, &[], |_| vec![]).await;
    fleet.publish(0, "org/m").await;
    let hub_before = fleet.hub_count("file_bytes");

    // Node 0's copy of the weights, changed in place: same name, same size, other bytes.
    let blob = walkdir::WalkDir::new(fleet.nodes[0].store().join("blobs"))
        .into_iter()
        .map(|e| e.unwrap())
        .find(|e| e.file_type().is_file() && e.metadata().unwrap().len() == weights as u64)
        .expect("node 0 holds the weights")
        .into_path();
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[weights / 2] ^= 0xff;
    std::fs::write(&blob, &bytes).unwrap();

    let target = fleet.publish(1, "org/m").await;
    assert_same_tree(&model, &target);
    let from_hub = fleet.hub_count("file_bytes") - hub_before;
    assert!(
        from_hub >= weights as u64,
        "the hub sent node 1 only {from_hub} bytes"
    );
    let log = fleet.nodes[1].agent_log();
    assert!(log.contains("a peer sent wrong bytes"), "{log}");
    let source = fleet.source(1);
    assert!(source.contains(" + hub "), "{source}");
}

/// Peers change where bytes come from, never who may read them: a node whose volume brings no
/// token gets nothing of a gated model its peer holds; with the token, it gets it from the peer.
#[tokio::test(flavor = "multi_thread")]
async fn a_gated_model_reaches_a_node_through_its_peers_only_for_a_token_the_hub_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("hub/models/org/gated");
    generate_model(&model, 4 << 20).unwrap();
    let mut fleet =
        Fleet::start(dir.path(), 2, &["--gated", "org/gated=token-a"], |_| vec![]).await;
    /// Publishes the gated model at `node`'s volume `v` with these secrets, as kubelet would.
    async fn publish_gated(
        node: &mut LocalNode,
        secrets: &[(&str, &str)],
    ) -> Result<(), tonic::Status> {
        let target = node.target("v");
        let req = publish_request("v", &target, &[("model", "org/gated")], secrets);
        publish_until_done(&mut node.node, req, |_| {}).await
    }
    publish_gated(&mut fleet.nodes[0], &[("token", "token-a")])
        .await
        .unwrap();
    let files_before = fleet.hub_count("file_bytes");

    // No token: refused by the hub's answer, and nothing reaches node 1's store.
    let e = publish_gated(&mut fleet.nodes[1], &[]).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let store = fleet.nodes[1].store();
    let out = agent_command(&["ls", "--json", "--store", store.to_str().unwrap()]).unwrap();
    let inv: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(inv["snapshots"], serde_json::json!([]), "{out}");
    assert_eq!(inv["blobs"], 0, "{out}");

    // With the token: from the peer, the hub sending no file.
    publish_gated(&mut fleet.nodes[1], &[("token", "token-a")])
        .await
        .unwrap();
    assert_same_tree(&model, &fleet.nodes[1].target("v"));
    assert_eq!(fleet.hub_count("file_bytes"), files_before);
    assert!(fleet.source(1).starts_with("peers ("));
}

/// The network the fleet tests stand on: hosts reach each other, and are not reachable from the
/// machine's own namespace.
#[test]
fn hosts_on_the_lan_reach_each_other_and_nothing_else() {
    let mut lan = Lan::new().unwrap();
    let a = lan.host("a").unwrap();
    let b = lan.host("b").unwrap();
    let listener = b
        .run(|| Ok(std::net::TcpListener::bind((b.ip, 0))?))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    a.run(|| Ok(std::net::TcpStream::connect(addr)?)).unwrap();
    // Not from this (the machine's) namespace: the hosts are on their own network.
    assert!(std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err());
}

/// A host's capped link carries no more than its cap, whichever way: what `bench-fleet
/// --node-link-mbps` stands on.
#[test]
fn a_capped_link_is_no_faster_than_its_cap_either_way() {
    use std::io::{Read, Write};
    const BYTES: usize = 8_000_000;
    const RATE: u64 = 10_000_000;
    let mut lan = Lan::new().unwrap();
    let capped = lan.host("capped").unwrap();
    let other = lan.host("other").unwrap();
    lan.cap_link(&capped, RATE).unwrap();
    for (from, to) in [(&capped, &other), (&other, &capped)] {
        let listener = to
            .run(|| Ok(std::net::TcpListener::bind((to.ip, 0))?))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let started = Instant::now();
        let receiver = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut got = Vec::new();
            conn.read_to_end(&mut got).unwrap();
            (got.len(), started.elapsed())
        });
        from.run(|| {
            let mut conn = std::net::TcpStream::connect(addr)?;
            conn.write_all(&vec![7u8; BYTES])?;
            Ok(())
        })
        .unwrap();
        let (got, took) = receiver.join().unwrap();
        assert_eq!(got, BYTES);
        // At most the bucket's burst (256 KiB) comes faster than the rate.
        let least = Duration::from_secs_f64((BYTES - (256 << 10)) as f64 / RATE as f64);
        assert!(
            took >= least.mul_f64(0.9),
            "{BYTES} bytes from {} to {} in {took:?} over a {RATE} B/s link",
            from.ip,
            to.ip
        );
    }
}
