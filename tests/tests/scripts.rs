//! The README's commands run as `sudo hack/…` on a stock machine where rustup lives in the
//! invoking user's home: sudo resets PATH (its `secure_path`), so `hack/lib.sh` finds cargo in
//! that home, and gives back to that user what root made in their cargo home, `target/` and
//! `.venv/`. Run here as sudo leaves them: a clean environment, `SUDO_USER` set, a real user
//! made for the test. Needs root.

use modelcache_tests::procs::require_root;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

/// A user made for the test, removed when dropped.
struct User {
    name: String,
    uid: u32,
}

impl User {
    fn create(name: &str, home: &Path) -> User {
        let _ = Command::new("userdel").arg(name).status();
        let ok = Command::new("useradd")
            .args(["-M", "-s", "/bin/sh", "-d"])
            .arg(home)
            .arg(name)
            .status()
            .expect("run useradd");
        assert!(ok.success(), "useradd {name}");
        let out = Command::new("id").args(["-u", name]).output().unwrap();
        let uid = String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        User {
            name: name.to_owned(),
            uid,
        }
    }
}

impl Drop for User {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).status();
    }
}

/// Runs `script` after sourcing hack/lib.sh in `dir`, with the environment sudo leaves.
fn as_sudo_leaves_it(dir: &Path, user: &str, script: &str) -> std::process::Output {
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hack/lib.sh");
    Command::new("env")
        .args([
            "-i",
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME=/root",
        ])
        .arg(format!("SUDO_USER={user}"))
        .args(["bash", "-c"])
        .arg(format!("set -euo pipefail; . {}; {script}", lib.display()))
        .current_dir(dir)
        .output()
        .expect("run bash")
}

fn write_executable(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn sudo_finds_cargo_in_the_invokers_home_and_gives_back_what_root_made() {
    require_root().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let user = User::create("mc-sudo-test", &home);
    // rustup's layout: the proxies in ~/.cargo/bin, the toolchains in ~/.rustup.
    write_executable(
        &home.join(".cargo/bin/cargo"),
        "#!/bin/sh\necho \"cargo of the invoker: $* (RUSTUP_HOME=$RUSTUP_HOME)\"\n",
    );
    std::fs::create_dir_all(home.join(".rustup")).unwrap();
    let repo = dir.path().join("repo");
    for made_by_root in ["target/debug/x", ".venv/bin/y", "elsewhere/z"] {
        let p = repo.join(made_by_root);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"root made me").unwrap();
    }
    let registry = home.join(".cargo/registry/cache");
    std::fs::create_dir_all(&registry).unwrap();

    let out = as_sudo_leaves_it(
        &repo,
        &user.name,
        "require_cargo; cargo build; echo \"CARGO_HOME=$CARGO_HOME\"; give_back",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rustup = home.join(".rustup");
    assert!(
        stdout.contains(&format!(
            "cargo of the invoker: build (RUSTUP_HOME={})",
            rustup.display()
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("CARGO_HOME={}", home.join(".cargo").display())),
        "{stdout}"
    );
    let owner = |p: &Path| std::fs::symlink_metadata(p).unwrap().uid();
    for given_back in [
        repo.join("target/debug/x"),
        repo.join("target"),
        repo.join(".venv/bin/y"),
        registry.clone(),
    ] {
        assert_eq!(owner(&given_back), user.uid, "{}", given_back.display());
    }
    assert_eq!(
        owner(&repo.join("elsewhere/z")),
        0,
        "only what the build and the venv hold"
    );
}

#[test]
fn without_cargo_anywhere_the_scripts_say_how_to_get_it() {
    require_root().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let user = User::create("mc-sudo-none", &home);
    let out = as_sudo_leaves_it(dir.path(), &user.name, "require_cargo; echo unreachable");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cargo not found") && stderr.contains("rustup"),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("unreachable"));
}

#[test]
fn the_demo_answers_help_and_version_without_root_or_a_build() {
    require_root().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hack/local-node.sh");
    for (flag, says) in [("--help", "--keep"), ("--version", "local-node ")] {
        let out = Command::new("runuser")
            .args(["-u", "nobody", "--", "bash"])
            .arg(&script)
            .arg(flag)
            .output()
            .expect("run runuser");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{flag}: {stdout}{stderr}");
        assert!(stdout.contains(says), "{flag}: {stdout}");
        assert!(!stderr.contains("building"), "{flag} built: {stderr}");
    }
}
