//! `modelcache-agent pull` against real hubs, as separate processes: the project's own
//! `modelcache-hub`, and a hostile hub that serves escaping paths, wrong bytes and over-long bodies.

use axum::Router;
use axum::response::IntoResponse;
use modelcache_testkit::process::{Running, free_loopback_addr, wait_listening};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A hub process.
type Hub = Running;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_modelcache-agent");

/// The `modelcache-hub` binary, built beside the agent by `cargo build --workspace --bins`.
fn hub_bin() -> PathBuf {
    let hub = Path::new(BIN).with_file_name("modelcache-hub");
    assert!(
        hub.is_file(),
        "{} is not built: run `cargo build --workspace --bins` first (hack/test.sh does)",
        hub.display()
    );
    hub
}

fn serve_hub(root: &Path) -> (Hub, String) {
    let (hub, endpoint, _) = serve_hub_with(root, |_| Vec::new());
    (hub, endpoint)
}

/// modelcache-hub with extra arguments, which may name the port it listens on.
fn serve_hub_with(root: &Path, extra: impl Fn(u16) -> Vec<String>) -> (Hub, String, u16) {
    let addr = free_loopback_addr();
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    let child = Command::new(hub_bin())
        .args(["--root", root.to_str().unwrap(), "--listen", &addr])
        .args(extra(port))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut hub = Running(child);
    wait_listening(&mut hub, &addr, "modelcache-hub", Duration::from_secs(30));
    (hub, format!("http://{addr}"), port)
}

fn pull(endpoint: &str, store: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("pull")
        .args(args)
        .args(["--store", store.to_str().unwrap(), "--endpoint", endpoint])
        .env_remove("HF_TOKEN")
        // The test CDN is the same server under another name.
        .env("MODELCACHE_CDN_HOSTS", "localhost")
        .output()
        .unwrap()
}

fn last_line(out: &Output) -> PathBuf {
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    PathBuf::from(stdout.lines().last().expect("pull printed nothing"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn files_below(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = walk(dir)
        .into_iter()
        .map(|p| {
            (
                p.strip_prefix(dir).unwrap().display().to_string(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

fn walk_dirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| rd.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn pull_downloads_verifies_and_prints_the_snapshot() {
    use rand::RngCore;
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("hub/models/org/m");
    std::fs::create_dir_all(repo.join("sub")).unwrap();
    std::fs::write(repo.join("config.json"), br#"{"a":1}"#).unwrap();
    std::fs::write(repo.join("sub/empty"), b"").unwrap();
    let mut big = vec![0u8; 11 << 20]; // above the LFS threshold
    rand::rng().fill_bytes(&mut big);
    std::fs::write(repo.join("weights.bin"), &big).unwrap();
    let (_hub, endpoint) = serve_hub(&dir.path().join("hub"));
    let store = dir.path().join("store");

    let out = pull(&endpoint, &store, &["org/m"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let snap = last_line(&out);
    assert!(
        snap.starts_with(&store),
        "{} not in the store",
        snap.display()
    );
    assert_eq!(files_below(&snap), files_below(&repo));

    // Again: nothing to do, same answer.
    let again = pull(&endpoint, &store, &["org/m", "--revision", "main"]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(last_line(&again), snap);

    // By commit id, which needs no lookup.
    let commit = snap.file_name().unwrap().to_str().unwrap().to_owned();
    let by_commit = pull(&endpoint, &store, &["org/m", "--revision", &commit]);
    assert_eq!(last_line(&by_commit), snap);
}

#[test]
fn pull_errors_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("hub/models/org/m")).unwrap();
    std::fs::write(dir.path().join("hub/models/org/m/f"), b"x").unwrap();
    let (_hub, endpoint) = serve_hub(&dir.path().join("hub"));
    let store = dir.path().join("store");
    let cases: &[(&[&str], &str)] = &[
        (&["org/absent"], "model repo org/absent was not found"),
        (
            &["org/m", "--revision", "v2"],
            "revision \"v2\" of org/m was not found",
        ),
        (
            &["org/m", "--revision", "ma in"],
            "revision \"ma in\" is not a branch, tag or 40-hex commit",
        ),
        (&["not-a-repo"], "must be org/name"),
    ];
    for (args, want) in cases {
        let out = pull(&endpoint, &store, args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = stderr(&out);
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("Stack backtrace"), "{args:?}: {err}");
    }
    let out = pull("http://127.0.0.1:9", &store, &["org/m"]);
    assert!(
        stderr(&out).contains("cannot reach the hub at http://127.0.0.1:9"),
        "{}",
        stderr(&out)
    );
}

/// A hub whose tree and bodies are chosen by the test; a body starting with `@` claims, in
/// `X-Repo-Commit`, to come from another commit than the one asked for.
fn hostile_hub(tree: serde_json::Value, body: &'static [u8]) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let app = Router::new().fallback(move |req: axum::extract::Request| {
                let tree = tree.clone();
                async move {
                    let path = req.uri().path().to_owned();
                    if path.contains("/revision/") {
                        axum::Json(serde_json::json!({"id": "evil/m", "sha": "e".repeat(40)}))
                            .into_response()
                    } else if path.contains("/tree/") {
                        axum::Json(tree).into_response()
                    } else if let Some(rest) = body.strip_prefix(b"@") {
                        ([("x-repo-commit", "f".repeat(40))], rest).into_response()
                    } else {
                        body.into_response()
                    }
                }
            });
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(l, app).await.unwrap();
        });
    });
    format!("http://{addr}")
}

fn entry(path: &str, oid: &str, size: u64) -> serde_json::Value {
    serde_json::json!({"type": "file", "path": path, "oid": oid, "size": size})
}

#[test]
fn hostile_hubs_write_nothing() {
    // git blob id of "hello\n"
    let hello = "ce013625030ba8dba906f756967f9e9ca394464a";
    let wrong_commit = format!(
        "answered from commit {}, asked for {}",
        "f".repeat(40),
        "e".repeat(40)
    );
    let cases: Vec<(serde_json::Value, &'static [u8], &str)> = vec![
        (
            serde_json::json!([entry("../../escape", hello, 6)]),
            b"hello\n",
            "unsafe",
        ),
        (
            serde_json::json!([entry("/etc/cron.d/x", hello, 6)]),
            b"hello\n",
            "unsafe",
        ),
        (
            serde_json::json!([entry("a", hello, 6), entry("a/b", hello, 6)]),
            b"hello\n",
            "both a file and a directory",
        ),
        (
            serde_json::json!([entry("f", hello, 6)]),
            b"HELLO\n",
            "do not match",
        ),
        (
            serde_json::json!([entry("f", hello, 6)]),
            b"hello\nand more",
            "longer than the 6 bytes announced",
        ),
        (
            serde_json::json!([entry("f", hello, 6)]),
            b"hel",
            "3 bytes received, 6 announced",
        ),
        (
            serde_json::json!([entry("f", hello, 6)]),
            b"@hello\n",
            &wrong_commit,
        ),
    ];
    for (tree, body, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        let endpoint = hostile_hub(tree.clone(), body);
        let store = dir.path().join("store");
        let out = pull(&endpoint, &store, &["evil/m"]);
        assert!(!out.status.success(), "{tree}: pull succeeded");
        assert!(stderr(&out).contains(want), "{tree}: {}", stderr(&out));
        // Nothing outside the store, and no blob or snapshot inside it.
        let outside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(outside, ["store"], "{tree}");
        let kept: Vec<PathBuf> = walk(&store)
            .into_iter()
            .filter(|p| !p.ends_with("refs/models--evil--m/main") && *p != store.join("lock"))
            .collect();
        assert!(kept.is_empty(), "{tree}: left {kept:?}");
    }
}

/// A repo with one large LFS file of random bytes and `small` small files.
fn large_repo(hub_root: &Path, name: &str, mib: usize, small: usize) -> PathBuf {
    use rand::RngCore;
    let repo = hub_root.join("models/org").join(name);
    std::fs::create_dir_all(repo.join("tok")).unwrap();
    let mut big = vec![0u8; mib << 20];
    rand::rng().fill_bytes(&mut big);
    std::fs::write(repo.join("model.safetensors"), &big).unwrap();
    for i in 0..small {
        std::fs::write(
            repo.join(format!("tok/f{i}.json")),
            format!("{{\"i\":{i}}}"),
        )
        .unwrap();
    }
    repo
}

fn cdn_on(port: u16) -> Vec<String> {
    // Another host name for the same server: another origin, as a CDN is.
    vec!["--cdn-url".into(), format!("http://localhost:{port}")]
}

#[test]
fn large_files_come_in_ranges_from_the_cdn_without_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let hub_root = dir.path().join("hub");
    let repo = large_repo(&hub_root, "gated", 20, 5);
    let (_hub, endpoint, _) = serve_hub_with(&hub_root, |port| {
        let mut a = cdn_on(port);
        a.extend(["--gated".into(), "org/gated=hf_good".into()]);
        a
    });
    let store = dir.path().join("store");
    let ranged = ["--chunk-mib", "1", "--connections", "8"];
    // Without the token, the hub refuses; with it, the resolve URLs accept it and the CDN,
    // which refuses any request carrying Authorization, serves the ranges.
    let out = pull(&endpoint, &store, &[&["org/gated"][..], &ranged].concat());
    assert!(
        stderr(&out).contains("accept the licence"),
        "{}",
        stderr(&out)
    );
    let out = pull(
        &endpoint,
        &store,
        &[&["org/gated", "--token", "hf_good"][..], &ranged].concat(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(files_below(&last_line(&out)), files_below(&repo));
    assert!(!stderr(&out).contains("hf_good"), "the token was logged");
    let partial: Vec<_> = walk(&store.join("partial"));
    assert!(partial.is_empty(), "left partial downloads: {partial:?}");
}

#[test]
fn a_redirect_to_a_host_that_is_not_the_hubs_cdn_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let hub_root = dir.path().join("hub");
    large_repo(&hub_root, "m", 2, 1);
    let (_hub, endpoint, _) = serve_hub_with(&hub_root, cdn_on);
    let store = dir.path().join("store");
    let out = Command::new(BIN)
        .args([
            "pull",
            "org/m",
            "--store",
            store.to_str().unwrap(),
            "--endpoint",
            &endpoint,
        ])
        .env_remove("HF_TOKEN")
        .env_remove("MODELCACHE_CDN_HOSTS")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("neither the hub nor its CDN"),
        "{}",
        stderr(&out)
    );
    assert!(
        walk(&store.join("blobs/sha256")).is_empty(),
        "nothing stored"
    );
}

#[test]
fn an_expired_cdn_link_is_replaced_by_a_fresh_one() {
    let dir = tempfile::tempdir().unwrap();
    let hub_root = dir.path().join("hub");
    let repo = large_repo(&hub_root, "m", 8, 0);
    // Links live 1 s; one connection at 2 MB/s needs 4 s for the file, so later ranges find
    // their link expired and must ask the hub again.
    let (_hub, endpoint, _) = serve_hub_with(&hub_root, |port| {
        let mut a = cdn_on(port);
        a.extend(
            [
                "--cdn-link-seconds",
                "1",
                "--max-bytes-per-second",
                "2000000",
            ]
            .map(String::from),
        );
        a
    });
    let store = dir.path().join("store");
    let out = pull(
        &endpoint,
        &store,
        &["org/m", "--chunk-mib", "1", "--connections", "1"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("asking the hub for a new one"),
        "{}",
        stderr(&out)
    );
    assert_eq!(files_below(&last_line(&out)), files_below(&repo));
}

#[test]
fn pull_gets_through_a_faulty_hub() {
    let dir = tempfile::tempdir().unwrap();
    let hub_root = dir.path().join("hub");
    let repo = large_repo(&hub_root, "m", 24, 40);
    // ~150 requests (40 small files, 24 ranges and their CDN redirects, the API): each fault
    // is frequent enough to hit several (no rate limit at all: < 1e-3), and rare enough that
    // five tries of one request all failing is out of reach (< 1e-4 over the run).
    let (_hub, endpoint, _) = serve_hub_with(&hub_root, |port| {
        let mut a = cdn_on(port);
        for (flag, v) in [
            ("--server-errors", "0.05"),
            ("--rate-limits", "0.05"),
            ("--truncations", "0.1"),
            ("--latency-ms", "5"),
            ("--fault-seed", FAULT_SEED),
        ] {
            a.extend([flag.to_owned(), v.to_owned()]);
        }
        a
    });
    let store = dir.path().join("store");
    let out = pull(&endpoint, &store, &["org/m", "--chunk-mib", "1"]);
    assert!(out.status.success(), "seed {FAULT_SEED}: {}", stderr(&out));
    assert_eq!(files_below(&last_line(&out)), files_below(&repo));
    // The pull got through faults, not around them.
    let injected = faults_injected(&endpoint);
    for kind in ["server_errors", "rate_limits", "truncations"] {
        assert!(
            injected[kind].as_u64().unwrap() > 0,
            "seed {FAULT_SEED}: no {kind} injected: {injected}"
        );
    }
}

/// The seed of the fault draws, printed with any failure: requests race, so a replay draws the
/// same sequence but may hand it to other requests.
const FAULT_SEED: &str = "20261130";

/// What modelcache-hub says it injected (`GET /_hub/faults`).
fn faults_injected(endpoint: &str) -> serde_json::Value {
    use std::io::{Read, Write};
    let addr = endpoint.trim_start_matches("http://");
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(conn, "GET /_hub/faults HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}"))
}

#[test]
fn wrong_bytes_are_refused_and_not_kept() {
    let dir = tempfile::tempdir().unwrap();
    let hub_root = dir.path().join("hub");
    // One file, so that its own failure (not another's) ends the pull.
    large_repo(&hub_root, "m", 3, 0);
    let (_hub, endpoint, _) =
        serve_hub_with(&hub_root, |_| vec!["--corruptions".into(), "1".into()]);
    let store = dir.path().join("store");
    let out = pull(&endpoint, &store, &["org/m", "--chunk-mib", "1"]);
    assert!(!out.status.success(), "a corrupt pull succeeded");
    assert!(faults_injected(&endpoint)["corruptions"].as_u64().unwrap() > 0);
    assert!(
        stderr(&out).contains("do not match the hub"),
        "{}",
        stderr(&out)
    );
    for area in ["blobs", "snapshots", "partial", "staging"] {
        let kept = walk(&store.join(area));
        assert!(kept.is_empty(), "{area}: kept {kept:?}");
    }
}

/// The files of the store's blobs that do not hash to their name.
fn corrupt_blobs(store: &Path) -> Vec<PathBuf> {
    use sha2::Digest;
    walk(&store.join("blobs/sha256"))
        .into_iter()
        .filter(|p| {
            let bytes = std::fs::read(p).unwrap();
            hex::encode(sha2::Sha256::digest(&bytes)) != p.file_name().unwrap().to_str().unwrap()
        })
        .collect()
}

#[test]
fn pulls_killed_at_random_points_resume_and_end_verified() {
    use rand::Rng;
    let dir = tempfile::tempdir().unwrap();
    let hub_root = dir.path().join("hub");
    let repo = large_repo(&hub_root, "m", 48, 5);
    // 8 MB/s per response and 4 connections: 1.5 s for the whole file, more than five rounds
    // of 150-450 ms give it, and a 1 MiB chunk completes every ~30 ms.
    let (_hub, endpoint, _) = serve_hub_with(&hub_root, |_| {
        vec!["--max-bytes-per-second".into(), "8000000".into()]
    });
    let store = dir.path().join("store");
    let args = [
        "pull",
        "org/m",
        "--chunk-mib",
        "1",
        "--connections",
        "4",
        "--store",
        store.to_str().unwrap(),
        "--endpoint",
        &endpoint,
    ];
    let journal = store.join("partial").join(format!(
        "sha256-{}.chunks",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
            std::fs::read(repo.join("model.safetensors")).unwrap()
        ))
    ));
    let mut kept_before = 0;
    let mut finished_early = false;
    for round in 0..5 {
        let mut child = Command::new(BIN)
            .args(args)
            .env("MODELCACHE_CDN_HOSTS", "localhost")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rand::rng().random_range(150..450)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // Nothing half-written is visible: a snapshot that exists is complete.
        if let Some(snap) = walk_dirs(&store.join("snapshots/models--org--m")).first() {
            assert_eq!(files_below(snap), files_below(&repo), "round {round}");
            finished_early = true;
            break;
        }
        assert_eq!(
            corrupt_blobs(&store),
            Vec::<PathBuf>::new(),
            "round {round}"
        );
        // What is kept only grows.
        let kept = std::fs::read_to_string(&journal)
            .map(|j| j.lines().count())
            .unwrap_or(0);
        assert!(
            kept >= kept_before,
            "round {round}: journal shrank {kept_before} → {kept}"
        );
        kept_before = kept;
    }
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    if !finished_early {
        assert!(kept_before > 1, "no chunk was ever kept across kills");
        assert!(
            stderr(&out).contains("resuming an interrupted download"),
            "{}",
            stderr(&out)
        );
    }
    assert_eq!(files_below(&last_line(&out)), files_below(&repo));
    assert!(walk(&store.join("partial")).is_empty());
}

#[test]
fn serve_hub_from_before_the_move_runs_modelcache_hub() {
    let dir = tempfile::tempdir().unwrap();
    let hub_root = dir.path().join("hub");
    large_repo(&hub_root, "m", 1, 1);
    hub_bin();
    let addr = free_loopback_addr();
    let child = Command::new(BIN)
        .args(["serve-hub", "--root", hub_root.to_str().unwrap()])
        .args(["--listen", &addr])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut hub = Running(child);
    wait_listening(&mut hub, &addr, "serve-hub", Duration::from_secs(30));
    let store = dir.path().join("store");
    let out = pull(&format!("http://{addr}"), &store, &["org/m"]);
    assert!(out.status.success(), "{}", stderr(&out));
}
