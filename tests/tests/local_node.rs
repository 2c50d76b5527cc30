//! The README's first command, as a user meets it: `local-node` checks its flags before doing
//! anything, never deletes what it did not make, runs once at a time in a work directory, ends
//! cleanly on the terminal's Ctrl-C (SIGINT to its whole process group), and survives its output
//! being closed. The real program, with its real hub, agent, plugin and mounts; needs root.

use modelcache_tests::models::generate_model;
use modelcache_tests::procs::{bin, require_root, serve_hub};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `local-node` with a 1 MiB demo model in `workdir`, in a process group of its own as a
/// terminal's foreground job is, its stdout piped.
fn start(workdir: &Path, extra: &[&str]) -> Child {
    Command::new(bin("local-node").unwrap())
        .arg("--workdir")
        .arg(workdir)
        .args(["--demo-mib", "1"])
        .args(extra)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits at most `limit` for the child to end; its status code, or a panic.
fn wait(child: &mut Child, limit: Duration) -> i32 {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("local-node did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Mounts below `dir`, from this process's mount table.
fn mounts_below(dir: &Path) -> usize {
    procfs::process::Process::myself()
        .unwrap()
        .mountinfo()
        .unwrap()
        .into_iter()
        .filter(|m| m.mount_point.starts_with(dir))
        .count()
}

fn run_to_end(args: &[&str]) -> std::process::Output {
    Command::new(bin("local-node").unwrap())
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn flags_are_checked_before_anything_is_made() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    let w = work.to_str().unwrap();
    for (flags, says) in [
        (vec!["--model", "../etc"], "--model"),
        (vec!["--model", "org/name/../../x"], "--model"),
        (vec!["--revision", "a b"], "--revision"),
        (vec!["--endpoint", "ftp://example.com"], "--endpoint"),
        (vec!["--endpoint", "notaurl"], "--endpoint"),
        (vec!["--demo-mib", "0"], "--demo-mib"),
    ] {
        let mut args = vec!["--workdir", w];
        args.extend(&flags);
        let out = run_to_end(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {stderr}");
        assert!(stderr.contains(says), "{flags:?}: {stderr}");
        assert!(!work.exists(), "{flags:?} made {}", work.display());
    }
    let out = run_to_end(&["--version"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("local-node "), "{stdout}");
}

#[test]
fn a_work_directory_with_files_of_others_is_left_alone() {
    require_root().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("thesis.tex"), b"years of work").unwrap();
    let out = run_to_end(&["--workdir", work.to_str().unwrap(), "--demo-mib", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("holds files local-node did not make (thesis.tex)"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(work.join("thesis.tex")).unwrap(),
        b"years of work"
    );
    assert_eq!(std::fs::read_dir(&work).unwrap().count(), 1);
}

#[test]
fn one_run_at_a_time_and_ctrl_c_unpublishes_and_exits_zero() {
    require_root().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    let mut first = start(&work, &["--keep"]);
    let mut lines = BufReader::new(first.stdout.take().unwrap()).lines();
    let held = loop {
        let line = lines
            .next()
            .expect("local-node --keep ended early")
            .unwrap();
        if line.contains("stays mounted at") {
            break line;
        }
    };
    assert!(mounts_below(&work) > 0, "{held}");

    // A second run in the same directory is refused and touches nothing.
    let out = run_to_end(&["--workdir", work.to_str().unwrap(), "--demo-mib", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("another local-node is running in"),
        "{stderr}"
    );
    assert!(
        mounts_below(&work) > 0,
        "the first run's volume stays mounted"
    );

    // The terminal's Ctrl-C goes to the whole foreground group.
    killpg(Pid::from_raw(first.id() as i32), Signal::SIGINT).unwrap();
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let code = wait(&mut first, Duration::from_secs(60));
    let mut stderr = String::new();
    std::io::Read::read_to_string(first.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(code, 0, "{rest:#?}\n{stderr}");
    assert!(
        rest.iter()
            .any(|l| l.contains("unpublished both volumes and stopped the node")),
        "{rest:#?}"
    );
    assert_eq!(mounts_below(&work), 0);
}

#[test]
fn a_closed_output_does_not_stop_the_run_or_its_cleanup() {
    require_root().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    let mut run = start(&work, &[]);
    // `| head -2`: two lines read, then the pipe closed.
    let mut lines = BufReader::new(run.stdout.take().unwrap()).lines();
    lines.next().unwrap().unwrap();
    lines.next().unwrap().unwrap();
    drop(lines);
    let code = wait(&mut run, Duration::from_secs(120));
    let mut stderr = String::new();
    std::io::Read::read_to_string(run.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(mounts_below(&work), 0);
}

/// A cold publish that takes seconds shows its progress as it goes, and the logs the run leaves
/// hold no terminal colour codes (its output is not a terminal).
#[test]
fn a_slow_cold_publish_shows_its_progress_and_logs_carry_no_colour() {
    require_root().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("hub");
    generate_model(&root.join("models/org/slow"), 16 << 20).unwrap();
    // About 8 s for the weights at 2 MB/s.
    let (_hub, endpoint) =
        serve_hub(&root, &["--max-bytes-per-second", "2000000"], dir.path()).unwrap();
    let work = dir.path().join("work");
    let out = Command::new(bin("local-node").unwrap())
        .arg("--workdir")
        .arg(&work)
        .args(["--endpoint", &endpoint, "--model", "org/slow"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cold: Vec<&str> = stdout
        .lines()
        .take_while(|l| !l.contains("cold publish of"))
        .filter(|l| l.starts_with("    ") && l.contains('%'))
        .collect();
    assert!(cold.len() >= 2, "progress lines: {cold:#?}\n{stdout}");
    let logs: Vec<_> = std::fs::read_dir(work.join("node"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
        .collect();
    assert!(logs.len() >= 2, "{logs:?}");
    for log in logs {
        let text = std::fs::read(log.path()).unwrap();
        assert!(
            !text.contains(&0x1b),
            "{} holds colour codes",
            log.path().display()
        );
    }
}
