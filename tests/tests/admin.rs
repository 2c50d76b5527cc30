//! `modelcache-agent rm` and `verify` beside a running agent: they run inside it, under the lock
//! volumes pin with, and without a reachable agent they take the store's lock, never skip it.
//! Needs root (CI runs as root); fails, never skips, without it.

use modelcache_tests::models::generate_model;
use modelcache_tests::node::{Hub, LocalNode};
use std::process::{Command, Output};

const TINY: &str = "modelcache-test/tiny";

fn agent(args: &[&str]) -> Output {
    let bin = modelcache_tests::procs::bin("modelcache-agent").unwrap();
    Command::new(bin)
        .args(args)
        .env_remove("MODELCACHE_AGENT_LISTEN")
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn rm_and_verify_go_through_the_running_agent_and_never_skip_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let hub_root = dir.path().join("hub");
    generate_model(&hub_root.join("models").join(TINY), 4 << 20).unwrap();
    let mut node =
        LocalNode::start(&dir.path().join("node"), Hub::Serve(hub_root, vec![]), 5).unwrap();
    node.wait_ready().await.unwrap();
    let target = node.target("vol-a");
    let attrs = [("model", TINY), ("revision", "main")];
    node.publish("vol-a", &target, &attrs, |_| {})
        .await
        .unwrap();

    let store = node.store();
    let store = store.to_str().unwrap();
    let socket = format!("unix://{}", node.agent_socket().display());
    let absent = format!("unix://{}", dir.path().join("no-agent.sock").display());

    // Through the agent: a mounted model is refused, by the agent, and stays mounted.
    let out = agent(&["rm", TINY, "--store", store, "--agent", &socket]);
    assert!(!out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("is mounted by volumes vol-a") && said.contains("FailedPrecondition"),
        "{said}"
    );
    assert!(target.join("config.json").is_file());

    // With no agent answering, the command takes the store's lock, which the agent holds.
    for args in [
        vec!["rm", TINY, "--store", store, "--agent", &absent],
        vec!["verify", "--store", store, "--agent", &absent],
    ] {
        let out = agent(&args);
        assert!(
            !out.status.success(),
            "{args:?} skipped the lock: {}",
            text(&out)
        );
        assert!(text(&out).contains("is using this store"), "{}", text(&out));
    }

    // verify through the agent hashes every blob.
    let out = agent(&["verify", "--json", "--store", store, "--agent", &socket]);
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(report["checked"].as_u64().unwrap() > 0, "{report}");

    // Unmounted, the model goes, through the agent, named by its commit as `ls` shows it; a
    // second rm finds nothing.
    node.unpublish("vol-a", &target).await.unwrap();
    let commit = node.snapshots_of(TINY).await.unwrap()[0].commit.clone();
    let ls = agent(&["ls", "--store", store]);
    assert!(text(&ls).contains(&commit[..12]), "{}", text(&ls));
    let out = agent(&[
        "rm",
        TINY,
        "--commit",
        &commit[..12],
        "--json",
        "--store",
        store,
        "--agent",
        &socket,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["removed"].as_array().unwrap().len(), 1, "{report}");
    assert!(
        report["bytes_freed"].as_u64().unwrap() >= 4 << 20,
        "{report}"
    );
    let out = agent(&["rm", TINY, "--store", store, "--agent", &socket]);
    assert!(text(&out).contains("NotFound"), "{}", text(&out));
    // A second agent on the live socket is refused and leaves the first serving.
    let other = dir.path().join("other-store");
    let mut second = Command::new(modelcache_tests::procs::bin("modelcache-agent").unwrap())
        .args([
            "run",
            "--store",
            other.to_str().unwrap(),
            "--listen",
            &socket,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while second.try_wait().unwrap().is_none() {
        if started.elapsed() > std::time::Duration::from_secs(20) {
            let _ = second.kill();
            panic!("a second agent on the live socket {socket} kept running: it took it over");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = second.wait_with_output().unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("is served by another running process"),
        "{}",
        text(&out)
    );
    node.snapshots().await.unwrap();
    assert!(node.stop(), "a process did not exit cleanly on SIGTERM");
}
