//! The Helm chart as Helm renders it: `tests/helm/render.py` lints it strictly, renders it with
//! the Helm library itself and validates every manifest against the Kubernetes API schemas; this
//! module runs it and hands the objects to tests as JSON.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The memory limit the chart's defaults give the agent's container, in MiB, for programs that
/// run the agent outside a cluster as the chart runs it (`bench-fleet`); `tests/tests/chart.rs`
/// checks that the chart still says so.
pub const AGENT_MEMORY_LIMIT_MIB: u64 = 1024;

/// The environment the chart gives the agent's container besides what the cluster fills in
/// (likewise).
pub const AGENT_ENV: &[(&str, &str)] = &[("MALLOC_ARENA_MAX", "2")];

/// The repository's root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_owned()
}

/// The chart's directory.
pub fn chart_dir() -> PathBuf {
    workspace_root().join("deploy/helm/modelcache")
}

/// Rendered manifests (or loaded files), validated.
#[derive(Debug)]
pub struct Manifests {
    /// Every object, in template order.
    pub objects: Vec<Value>,
    /// NOTES.txt, rendered.
    pub notes: String,
}

impl Manifests {
    /// All objects of a kind.
    pub fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.objects.iter().filter(|o| o["kind"] == kind).collect()
    }

    /// The object of `kind` named `name`; panics naming what there is when absent.
    pub fn get(&self, kind: &str, name: &str) -> &Value {
        self.objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| {
                let have: Vec<String> = self
                    .objects
                    .iter()
                    .map(|o| format!("{}/{}", o["kind"], o["metadata"]["name"]))
                    .collect();
                panic!("no {kind} {name:?} among {have:?}")
            })
    }
}

/// A pod template's container by name.
pub fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no container {name:?} in {}", workload["metadata"]["name"]))
}

/// A container's `command` followed by its `args`, as strings.
pub fn argv(container: &Value) -> Vec<String> {
    ["command", "args"]
        .iter()
        .flat_map(|k| container[*k].as_array().cloned().unwrap_or_default())
        .map(|v| v.as_str().expect("string args").to_owned())
        .collect()
}

fn run(args: &[&str]) -> Result<Manifests, String> {
    let script = workspace_root().join("tests/helm/render.py");
    let out = Command::new(crate::models::python())
        .arg(&script)
        .args(args)
        .output()
        .expect("run python3 (install Python 3)");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    match out.status.code() {
        Some(0) => {
            let v: Value = serde_json::from_slice(&out.stdout).expect("render.py prints JSON");
            Ok(Manifests {
                objects: v["objects"]
                    .as_array()
                    .expect("objects")
                    .iter()
                    .map(|o| o["object"].clone())
                    .collect(),
                notes: v["notes"].as_str().unwrap_or_default().to_owned(),
            })
        }
        Some(1) => Err(stderr),
        _ => panic!(
            "{} {args:?} failed (lint or schema validation, or a missing package: hack/test.sh \
             installs tests/requirements.txt):\n{stderr}",
            script.display()
        ),
    }
}

/// Renders the chart with these values files and JSON values (merged last, as `--set`).
/// `Err` is Helm's refusal of the values; a lint finding or an invalid manifest panics.
pub fn render(values: &[&Path], set_json: Option<&Value>) -> Result<Manifests, String> {
    let chart = chart_dir();
    let mut args = vec!["render".to_owned(), chart.display().to_string()];
    for v in values {
        args.push("--values".into());
        args.push(v.display().to_string());
    }
    if let Some(set) = set_json {
        args.push("--set-json".into());
        args.push(set.to_string());
    }
    run(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Loads and validates manifest files (the examples).
pub fn load(files: &[PathBuf]) -> Manifests {
    let mut args = vec!["load".to_owned()];
    args.extend(files.iter().map(|f| f.display().to_string()));
    run(&args.iter().map(String::as_str).collect::<Vec<_>>())
        .unwrap_or_else(|e| panic!("cannot load {files:?}: {e}"))
}
