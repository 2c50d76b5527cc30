//! The `modelcache-hub` binary as a process: it serves a directory of repos over the Hub's
//! protocol, refuses writes, gates repos by token, and reports the faults it injects.

use modelcache_testkit::process::{Running, free_loopback_addr, wait_listening};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_modelcache-hub");

/// The process (stopped when dropped) and the address it listens on.
struct Hub {
    _process: Running,
    addr: String,
}

fn start(root: &Path, extra: &[&str]) -> Hub {
    let addr = free_loopback_addr();
    let child = Command::new(BIN)
        .args(["--root", root.to_str().unwrap(), "--listen", &addr])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut hub = Running(child);
    wait_listening(&mut hub, &addr, "modelcache-hub", Duration::from_secs(30));
    Hub {
        _process: hub,
        addr,
    }
}

/// One HTTP/1.0 request; the status code and the body.
fn request(hub: &Hub, method: &str, path: &str, headers: &[&str]) -> (u16, String) {
    let mut conn = TcpStream::connect(&hub.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {}\r\n", hub.addr);
    for h in headers {
        req += &format!("{h}\r\n");
    }
    req += "\r\n";
    conn.write_all(req.as_bytes()).unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"));
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, body.to_owned())
}

#[test]
fn serves_repos_refuses_writes_gates_by_token_and_counts_faults() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["open", "gated"] {
        let repo = dir.path().join("models/org").join(name);
        std::fs::create_dir_all(&repo).unwrap();
        std::fs::write(repo.join("config.json"), format!("{{\"name\":\"{name}\"}}")).unwrap();
    }
    let hub = start(
        dir.path(),
        &["--gated", "org/gated=hf_good", "--fault-seed", "1"],
    );

    let (status, info) = request(&hub, "GET", "/api/models/org/open", &[]);
    assert_eq!(status, 200, "{info}");
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["sha"].as_str().unwrap().len(), 40, "{info}");
    let (status, body) = request(&hub, "GET", "/org/open/resolve/main/config.json", &[]);
    assert_eq!((status, body.as_str()), (200, "{\"name\":\"open\"}"));

    assert_eq!(request(&hub, "PUT", "/org/open/resolve/main/x", &[]).0, 405);
    assert_eq!(request(&hub, "GET", "/api/models/org/missing", &[]).0, 404);

    let gated = "/org/gated/resolve/main/config.json";
    assert_eq!(request(&hub, "GET", gated, &[]).0, 401);
    assert_eq!(
        request(&hub, "GET", gated, &["Authorization: Bearer hf_bad"]).0,
        403
    );
    assert_eq!(
        request(&hub, "GET", gated, &["Authorization: Bearer hf_good"]).0,
        200
    );

    // No faults asked for: none injected, and the route says so.
    let (status, counts) = request(&hub, "GET", "/_hub/faults", &[]);
    assert_eq!(status, 200);
    let counts: serde_json::Value = serde_json::from_str(&counts).unwrap();
    assert_eq!(counts["server_errors"], 0, "{counts}");
}
