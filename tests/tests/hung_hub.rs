//! A hub that accepts connections and then hangs (as behind a stuck proxy): `modelcache-agent
//! pull` ends within its `--stall-timeout`, with a message that says what to check, where the
//! retries' timeouts alone once took about 25 minutes a file.

use modelcache_tests::models::generate_model;
use modelcache_tests::procs::{bin, serve_hub};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn a_pull_from_a_hub_that_hangs_mid_file_fails_within_the_stall_timeout() {
    let dir = tempfile::tempdir().unwrap();
    generate_model(&dir.path().join("hub/models/org/model"), 8 << 20).unwrap();
    // Every file body stops halfway, the connection left open.
    let (_hub, endpoint) =
        serve_hub(&dir.path().join("hub"), &["--stalls", "1"], dir.path()).unwrap();
    let store = dir.path().join("store");
    let started = Instant::now();
    let mut child = Command::new(bin("modelcache-agent").unwrap())
        .args([
            "pull",
            "org/model",
            "--endpoint",
            &endpoint,
            "--stall-timeout",
            "2s",
        ])
        .arg("--store")
        .arg(&store)
        .env_remove("HF_ENDPOINT")
        .env_remove("HF_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Bounded: a pull still running after 90 s is the failure this test is about.
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(90) {
            child.kill().unwrap();
            panic!("the pull was still running after 90 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = started.elapsed();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("less than 64 KiB arrived from")
            && stderr.contains(&endpoint)
            && stderr.contains("in 2s")
            && stderr.contains("HTTPS_PROXY"),
        "{stderr}"
    );
    // The stall time, plus the hub's hashing at start and the process's own.
    assert!(
        took < Duration::from_secs(20),
        "the pull failed after {took:?}"
    );
    // Nothing half-done became a snapshot.
    let listed = modelcache_tests::procs::agent_command(&[
        "ls",
        "--json",
        "--store",
        store.to_str().unwrap(),
    ])
    .unwrap();
    let rows: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(rows["snapshots"], serde_json::json!([]), "{listed}");
}
