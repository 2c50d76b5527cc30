//! The kubernetes-csi conformance suite, csi-sanity, against the real plugin in node and
//! controller mode, over a real agent and hub, with real mounts (needs root). Every spec that
//! runs must pass. csi-sanity is found as `$CSI_SANITY`, then `../shared/tools/csi-sanity` beside
//! the project, then on PATH.

use anyhow::Context;
use modelcache_tests::models::generate_model;
use modelcache_tests::node::{Hub, LocalNode};
use modelcache_tests::procs::{Proc, bin, wait_until};
use std::path::{Path, PathBuf};
use std::time::Duration;

const MODEL: &str = "sanity/tiny";

fn csi_sanity() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("CSI_SANITY") {
        return Ok(PathBuf::from(p));
    }
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/tools/csi-sanity");
    if shared.is_file() {
        return Ok(shared);
    }
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join("csi-sanity"))
        .find(|p| p.is_file())
        .context(
            "csi-sanity was not found ($CSI_SANITY, ../shared/tools/csi-sanity, PATH): \
             go install github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@latest",
        )
}

/// Counts of a JUnit report: (tests, failures + errors, skipped).
fn junit_counts(xml: &str) -> (usize, usize, usize) {
    let cases = xml.matches("<testcase ").count();
    let failed = xml.matches("<failure").count() + xml.matches("<error").count();
    let skipped = xml.matches("<skipped").count();
    (cases, failed, skipped)
}

#[tokio::test(flavor = "multi_thread")]
async fn csi_sanity_passes_against_the_node_plugin_and_the_controller() {
    let sanity = csi_sanity().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let hub_root = dir.path().join("hub");
    generate_model(&hub_root.join("models").join(MODEL), 64 << 10).unwrap();
    let workdir = dir.path().join("node");
    let mut node = LocalNode::start(&workdir, Hub::Serve(hub_root, vec![]), 30).unwrap();
    node.wait_ready().await.unwrap();
    let ctrl_sock = workdir.join("controller.sock");
    let mut controller = Proc::start(
        "controller",
        &bin("modelcache-csi").unwrap(),
        &[
            "--mode",
            "controller",
            "--endpoint",
            &format!("unix://{}", ctrl_sock.display()),
        ],
        &workdir,
    )
    .unwrap();
    wait_until("the controller socket", Duration::from_secs(30), || {
        controller.check_running()?;
        Ok(ctrl_sock.exists())
    })
    .unwrap();

    let params = workdir.join("params.yaml");
    std::fs::write(&params, format!("model: {MODEL}\n")).unwrap();
    // Targets where kubelet would put them: below the plugin's target root.
    let pods = node.kubelet_pods().join("sanity-pod");
    std::fs::create_dir_all(&pods).unwrap();
    let report = workdir.join("sanity.xml");
    let out = std::process::Command::new(&sanity)
        .arg(format!(
            "--csi.endpoint=unix://{}",
            node.csi_socket().display()
        ))
        .arg(format!(
            "--csi.controllerendpoint=unix://{}",
            ctrl_sock.display()
        ))
        .arg(format!("--csi.testvolumeparameters={}", params.display()))
        .arg(format!("--csi.mountdir={}", pods.join("target").display()))
        .arg(format!(
            "--csi.stagingdir={}",
            pods.join("staging").display()
        ))
        .arg("--ginkgo.no-color")
        .arg(format!("--ginkgo.junit-report={}", report.display()))
        .arg("--ginkgo.timeout=10m")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let xml = std::fs::read_to_string(&report).unwrap_or_default();
    let (cases, failed, skipped) = junit_counts(&xml);
    println!("csi-sanity: {cases} specs, {failed} failed, {skipped} skipped");
    for line in stdout.lines().filter(|l| l.contains("[FAIL]")) {
        println!("{line}");
    }
    assert!(
        out.status.success() && failed == 0,
        "csi-sanity failed ({}):\n{stdout}\n{}\nplugin log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(workdir.join("csi.log")).unwrap_or_default()
    );
    assert!(
        cases - skipped >= 20,
        "too few specs ran: {cases} - {skipped} skipped"
    );
    assert!(node.stop(), "the node processes exited cleanly");
    assert!(controller.stop());
}
