//! The Helm chart, rendered by the Helm library, linted strictly and validated against the
//! Kubernetes API schemas (by `modelcache_tests::helm`), for its defaults and for a values file
//! with every feature on; then the values that matter, followed to where they must arrive. The
//! containers' command lines are parsed by the binaries' own flag parsers, the catalogue by the
//! agent's, and StorageClass parameters and the examples' volume attributes by the driver's.

use clap::Parser;
use modelcache_agent::prewarm::Catalogue;
use modelcache_csi::attributes::Volume;
use modelcache_tests::helm::{
    self, AGENT_ENV, AGENT_MEMORY_LIMIT_MIB, Manifests, argv, chart_dir, container, workspace_root,
};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

const NS: &str = "modelcache";

fn full_values() -> PathBuf {
    chart_dir().join("ci/full-values.yaml")
}

fn defaults() -> Manifests {
    helm::render(&[], None).expect("the chart renders with its defaults")
}

fn full() -> Manifests {
    helm::render(&[&full_values()], None).expect("the chart renders with ci/full-values.yaml")
}

/// The argv a container runs, with the downward API's $(NODE_NAME) and $(POD_IP) filled in as
/// kubelet does.
fn command_line(c: &Value) -> Vec<String> {
    argv(c)
        .into_iter()
        .map(|a| {
            a.replace("$(NODE_NAME)", "node-a")
                .replace("$(POD_IP)", "10.244.1.7")
        })
        .collect()
}

fn agent_cli(m: &Manifests) -> modelcache_agent::cli::Cli {
    let ds = m.get("DaemonSet", "modelcache-node");
    modelcache_agent::cli::Cli::try_parse_from(command_line(container(ds, "agent")))
        .unwrap_or_else(|e| panic!("the agent refuses the chart's flags: {e}"))
}

fn csi_cli(workload: &Value) -> modelcache_csi::cli::Cli {
    let cli = modelcache_csi::cli::Cli::try_parse_from(command_line(container(workload, "plugin")))
        .unwrap_or_else(|e| panic!("the CSI plugin refuses the chart's flags: {e}"));
    cli.check()
        .expect("the CSI plugin accepts the chart's flags");
    cli
}

fn mount<'a>(c: &'a Value, volume: &str) -> &'a Value {
    c["volumeMounts"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["name"] == volume))
        .unwrap_or_else(|| panic!("{} does not mount {volume}", c["name"]))
}

fn host_path<'a>(workload: &'a Value, volume: &str) -> &'a str {
    workload["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["name"] == volume))
        .and_then(|v| v["hostPath"]["path"].as_str())
        .unwrap_or_else(|| panic!("no hostPath volume {volume}"))
}

fn catalogue(m: &Manifests) -> Catalogue {
    let cm = m.get("ConfigMap", "modelcache-catalogue");
    Catalogue::parse(
        cm["data"]["catalogue.json"]
            .as_str()
            .expect("catalogue.json"),
    )
    .expect("the agent accepts the rendered catalogue")
}

fn attributes(map: &Value) -> modelcache_csi::error::Result<Volume> {
    let ctx: HashMap<String, String> = map
        .as_object()
        .expect("a map")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().expect("string values").to_owned()))
        .collect();
    Volume::parse(&ctx, false)
}

#[test]
fn the_csi_driver_object_is_what_kubelet_needs() {
    let m = defaults();
    let driver = m.get("CSIDriver", "csi.modelcache.dev");
    assert_eq!(
        driver["spec"],
        json!({
            "attachRequired": false,
            "podInfoOnMount": true,
            "volumeLifecycleModes": ["Persistent", "Ephemeral"],
            "fsGroupPolicy": "None",
        })
    );
    assert_eq!(
        modelcache_csi::identity::DRIVER_NAME,
        driver["metadata"]["name"]
    );
}

#[test]
fn the_defaults_run_a_node_the_binaries_accept() {
    let m = defaults();
    let ds = m.get("DaemonSet", "modelcache-node");
    let pod = &ds["spec"]["template"]["spec"];
    let names: Vec<&str> = pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["agent", "plugin", "node-driver-registrar", "liveness-probe"]
    );
    assert_eq!(pod["serviceAccountName"], "modelcache-node");
    // bench-fleet runs each agent with the limit and environment its container has here.
    let agent = container(ds, "agent");
    let mib = AGENT_MEMORY_LIMIT_MIB;
    let limit = match mib % 1024 {
        0 => format!("{}Gi", mib / 1024),
        _ => format!("{mib}Mi"),
    };
    assert_eq!(agent["resources"]["limits"]["memory"], limit.as_str());
    for (name, value) in AGENT_ENV {
        let set = agent["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == *name);
        assert_eq!(set.map(|e| &e["value"]), Some(&json!(value)), "{name}");
    }
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    // GPU nodes are tainted; the plugin must run there.
    let tolerated: Vec<&str> = pod["tolerations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["key"].as_str().unwrap())
        .collect();
    assert_eq!(tolerated, ["nvidia.com/gpu", "amd.com/gpu"]);

    // The agent's flags, as its own parser reads them.
    let agent = agent_cli(&m);
    let modelcache_agent::cli::Command::Run {
        store,
        listen,
        metrics_listen,
        node_name,
        catalogue: watched,
        hub,
        eviction,
        ..
    } = agent.command
    else {
        panic!("the agent container does not run `run`")
    };
    assert_eq!(store.store, PathBuf::from("/var/lib/modelcache"));
    assert_eq!(listen, "unix:///run/modelcache/agent.sock");
    assert_eq!(metrics_listen.as_deref(), Some("0.0.0.0:9090"));
    assert_eq!(node_name.as_deref(), Some("node-a"));
    assert_eq!(
        watched,
        Some((NS.to_owned(), "modelcache-catalogue".to_owned()))
    );
    assert_eq!(hub.endpoint, "https://huggingface.co");
    assert!(hub.shared_cache.is_none() && hub.token.is_none());
    let marks = eviction.watermarks().unwrap();
    assert_eq!(
        (marks.high, marks.low, marks.max_store_bytes),
        (85, 75, None)
    );
    let limits = eviction.cache_limits();
    assert_eq!(
        (limits.default_size, limits.max_size),
        (10 << 30, 100 << 30)
    );
    assert_eq!(catalogue(&m), Catalogue::default());

    // The plugin talks to that agent, as this node.
    let plugin = csi_cli(ds);
    assert_eq!(plugin.agent, listen);
    assert_eq!(plugin.node_id.as_deref(), Some("node-a"));
    assert_eq!(plugin.endpoint, "unix:///csi/csi.sock");
    assert_eq!(plugin.publish_wait_seconds, 60);
    // It refuses targets outside kubelet's pods directory and inside the store.
    assert_eq!(plugin.store, store.store);
    let pods_dir = mount(container(ds, "plugin"), "pods-dir")["mountPath"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(plugin.target_root, Some(PathBuf::from(pods_dir)));
    assert!(hub.cdn_hosts.is_empty());

    // Only the plugin is privileged: its mounts must propagate to the host.
    let agent_c = container(ds, "agent");
    let plugin_c = container(ds, "plugin");
    assert_eq!(plugin_c["securityContext"]["privileged"], true);
    assert_eq!(
        agent_c["securityContext"],
        json!({
            "runAsUser": 0, "readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
        })
    );
    // Health: the agent's own endpoints, the plugin's through the livenessprobe sidecar.
    assert_eq!(agent_c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(agent_c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(plugin_c["livenessProbe"]["httpGet"]["port"], "healthz");
    assert!(argv(container(ds, "liveness-probe")).contains(&"--health-port=9808".to_owned()));

    // The controller: CreateVolume for StorageClass PVCs, unprivileged, no leader election alone.
    let ctl = m.get("Deployment", "modelcache-controller");
    let cli = csi_cli(ctl);
    assert_eq!(cli.mode, modelcache_csi::cli::Mode::Controller);
    let provisioner = argv(container(ctl, "csi-provisioner"));
    assert!(provisioner.contains(&"--csi-address=/csi/csi.sock".to_owned()));
    assert!(provisioner.contains(&"--leader-election=false".to_owned()));
    assert!(m.of_kind("StorageClass").is_empty());
    // NOTES.txt tells the admin how to go on.
    for step in [
        "kubectl get csinode",
        "driver: csi.modelcache.dev",
        "label nodes prewarm.modelcache.dev/<name>=true",
        "models.modelcache.dev/Qwen--Qwen3-0.6B",
        "No default hub token",
    ] {
        assert!(
            m.notes.contains(step),
            "NOTES.txt lacks {step:?}:\n{}",
            m.notes
        );
    }
}

#[test]
fn the_kubelet_dir_reaches_the_registrar_and_every_mount() {
    let m = full();
    let ds = m.get("DaemonSet", "modelcache-node");
    let kubelet = "/var/lib/k0s/kubelet";
    let registrar = argv(container(ds, "node-driver-registrar"));
    assert!(
        registrar.contains(&format!(
            "--kubelet-registration-path={kubelet}/plugins/csi.modelcache.dev/csi.sock"
        )),
        "{registrar:?}"
    );
    assert_eq!(
        host_path(ds, "plugin-dir"),
        format!("{kubelet}/plugins/csi.modelcache.dev")
    );
    assert_eq!(
        host_path(ds, "registration-dir"),
        format!("{kubelet}/plugins_registry")
    );
    assert_eq!(host_path(ds, "pods-dir"), format!("{kubelet}/pods"));
    // The plugin mounts into kubelet's pod directories, and the host must see those mounts;
    // the agent sees them too (to check its pins), at the same paths, read-only.
    let plugin = mount(container(ds, "plugin"), "pods-dir");
    assert_eq!(plugin["mountPath"], format!("{kubelet}/pods"));
    assert_eq!(plugin["mountPropagation"], "Bidirectional");
    let agent = mount(container(ds, "agent"), "pods-dir");
    assert_eq!(agent["mountPath"], format!("{kubelet}/pods"));
    assert_eq!(agent["mountPropagation"], "HostToContainer");
    assert_eq!(agent["readOnly"], true);
    // No default kubelet path is left anywhere.
    let all = serde_json::to_string(&m.objects).unwrap();
    assert!(!all.contains("/var/lib/kubelet"), "{all}");
}

#[test]
fn every_value_of_the_full_values_file_arrives_where_it_must() {
    let m = full();
    let ds = m.get("DaemonSet", "modelcache-node");
    let agent = agent_cli(&m);
    let modelcache_agent::cli::Command::Run {
        store,
        metrics_listen,
        hub,
        eviction,
        ..
    } = agent.command
    else {
        panic!("the agent container does not run `run`")
    };
    // The store: one host path, the same inside both containers (the plugin bind-mounts the
    // paths the agent gives it), read-only for the plugin.
    assert_eq!(store.store, PathBuf::from("/mnt/nvme0/modelcache"));
    assert_eq!(host_path(ds, "store"), "/mnt/nvme0/modelcache");
    assert_eq!(
        mount(container(ds, "agent"), "store")["mountPath"],
        "/mnt/nvme0/modelcache"
    );
    let plugin_store = mount(container(ds, "plugin"), "store");
    assert_eq!(plugin_store["mountPath"], "/mnt/nvme0/modelcache");
    assert_eq!(plugin_store["readOnly"], true);
    // But for the caches, whose images the plugin attaches to loop devices read-write, which
    // it finds in the host's /dev.
    let mounts = container(ds, "plugin")["volumeMounts"].as_array().unwrap();
    let caches = mounts
        .iter()
        .find(|m| m["mountPath"] == "/mnt/nvme0/modelcache/caches")
        .expect("the plugin mounts the caches");
    assert_eq!(
        (&caches["name"], &caches["subPath"], caches.get("readOnly")),
        (&json!("store"), &json!("caches"), None)
    );
    assert_eq!(mount(container(ds, "plugin"), "dev")["mountPath"], "/dev");
    assert_eq!(host_path(ds, "dev"), "/dev");
    let limits = eviction.cache_limits();
    assert_eq!((limits.default_size, limits.max_size), (2 << 30, 20 << 30));
    // Peers: found through the headless Service's name, this pod left out, the generated
    // secret mounted; only agents reach the port.
    assert_eq!(
        (hub.peers_dns.as_deref(), hub.peer_own_ip),
        (
            Some("modelcache-peers.modelcache.svc:7575"),
            Some("10.244.1.7".parse().unwrap())
        )
    );
    assert_eq!(
        hub.peer_token_file.as_deref(),
        Some(std::path::Path::new("/etc/modelcache/peer/secret"))
    );
    let modelcache_agent::cli::Command::Run {
        peer_listen,
        peer_max_uploads,
        peer_max_upload_mbps,
        ..
    } = agent_cli(&m).command
    else {
        unreachable!()
    };
    assert_eq!(
        (
            peer_listen.as_deref(),
            peer_max_uploads,
            peer_max_upload_mbps
        ),
        (Some("0.0.0.0:7575"), 4, Some(500))
    );
    let svc = m.get("Service", "modelcache-peers");
    assert_eq!(svc["spec"]["clusterIP"], "None");
    assert_eq!(
        svc["spec"]["selector"],
        ds["spec"]["selector"]["matchLabels"]
    );
    let secret = m.get("Secret", "modelcache-peer-secret");
    assert_eq!(secret["data"]["secret"].as_str().map(str::len), Some(44));
    assert_eq!(
        mount(container(ds, "agent"), "peer-secret")["mountPath"],
        "/etc/modelcache/peer"
    );
    let policy = m.get("NetworkPolicy", "modelcache-peers");
    assert_eq!(
        policy["spec"]["ingress"][0],
        json!({"from": [{"podSelector": {"matchLabels": ds["spec"]["selector"]["matchLabels"]}}],
               "ports": [{"port": 7575, "protocol": "TCP"}]})
    );
    let marks = eviction.watermarks().unwrap();
    assert_eq!(
        (marks.high, marks.low, marks.max_store_bytes),
        (80, 60, Some(500 << 30))
    );
    // The hub, its token from the Secret (never in values), the tuning.
    assert_eq!(hub.endpoint, "https://hf-mirror.internal.example.com");
    assert_eq!(
        (
            hub.revision_ttl.as_secs(),
            hub.access_ttl.as_secs(),
            hub.parallel_files,
            hub.connections,
            hub.chunk_mib
        ),
        (600, 60, 16, 64, 32)
    );
    assert_eq!(
        hub.cdn_hosts,
        ["cdn.mirror.example", "files.mirror.example"]
    );
    assert_eq!(csi_cli(ds).store, PathBuf::from("/mnt/nvme0/modelcache"));
    let env = &container(ds, "agent")["env"];
    let token = env
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "HF_TOKEN")
        .expect("HF_TOKEN from the Secret");
    assert_eq!(
        token["valueFrom"]["secretKeyRef"],
        json!({"name": "hf-token", "key": "HF_TOKEN"})
    );
    // The shared cache: the claim, read-only, its subPath, the tiers.
    let shared = mount(container(ds, "agent"), "shared-cache");
    assert_eq!(shared["readOnly"], true);
    assert_eq!(shared["subPath"], "hf-home");
    assert_eq!(
        hub.shared_cache,
        Some(PathBuf::from("/mnt/shared-hf-cache"))
    );
    assert_eq!(
        hub.sources,
        [
            modelcache_agent::fetch::Tier::SharedCache,
            modelcache_agent::fetch::Tier::Hub
        ]
    );
    let claim = ds["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "shared-cache")
        .unwrap();
    assert_eq!(
        claim["persistentVolumeClaim"],
        json!({"claimName": "hf-models", "readOnly": true})
    );
    // Metrics on the chosen port, scraping annotations off.
    assert_eq!(metrics_listen.as_deref(), Some("0.0.0.0:9191"));
    assert_eq!(
        container(ds, "agent")["ports"][0]["containerPort"],
        json!(9191)
    );
    assert!(ds["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"].is_null());
    // Image, pull secrets, scheduling.
    let image = "registry.example.com/ml/modelcache:0.1.0-rc1";
    assert_eq!(container(ds, "agent")["image"], image);
    assert_eq!(container(ds, "plugin")["image"], image);
    let ctl = m.get("Deployment", "modelcache-controller");
    assert_eq!(container(ctl, "plugin")["image"], image);
    assert_eq!(
        ds["spec"]["template"]["spec"]["imagePullSecrets"],
        json!([{"name": "regcred"}])
    );
    assert_eq!(
        ds["spec"]["template"]["spec"]["tolerations"],
        json!([{"operator": "Exists"}])
    );
    assert_eq!(csi_cli(ds).publish_wait_seconds, 90);
    // Two controllers elect a leader.
    assert_eq!(ctl["spec"]["replicas"], 2);
    assert!(argv(container(ctl, "csi-provisioner")).contains(&"--leader-election=true".to_owned()));

    // The catalogue, as the agent parses it.
    let cat = catalogue(&m);
    let h100 = BTreeMap::from([(
        "nvidia.com/gpu.product".to_owned(),
        "NVIDIA-H100-80GB-HBM3".to_owned(),
    )]);
    assert_eq!(
        cat.wanted_by(&h100).into_iter().collect::<Vec<_>>(),
        ["llama-h100"]
    );
    let labelled = BTreeMap::from([
        (
            "prewarm.modelcache.dev/qwen3-0-6b".to_owned(),
            "true".to_owned(),
        ),
        (
            "prewarm.modelcache.dev/fineweb-sample".to_owned(),
            "true".to_owned(),
        ),
    ]);
    assert_eq!(
        cat.wanted_by(&labelled).into_iter().collect::<Vec<_>>(),
        ["fineweb-sample", "qwen3-0-6b"]
    );

    // StorageClasses: the driver accepts their parameters as volume attributes.
    let classes = m.of_kind("StorageClass");
    assert_eq!(classes.len(), 3);
    for sc in classes {
        assert_eq!(sc["provisioner"], "csi.modelcache.dev");
        attributes(&sc["parameters"]).unwrap_or_else(|e| {
            panic!(
                "the driver refuses StorageClass {}: {e}",
                sc["metadata"]["name"]
            )
        });
    }
}

#[test]
fn bad_values_are_refused_saying_what_to_fix() {
    let cases = [
        (
            json!({"store": {"lowWatermark": 90}}),
            "store.lowWatermark (90) must be below store.highWatermark (85)",
        ),
        (
            json!({"sharedCache": {"enabled": true}}),
            "sharedCache.claimName: name the PVC",
        ),
        (
            json!({"stor": {}}),
            "additional properties 'stor' not allowed",
        ),
        (
            json!({"prewarm": {"catalogue": [{"name": "x", "model": "a/b", "dataset": "c/d"}]}}),
            "/prewarm/catalogue/0",
        ),
        (
            json!({"prewarm": {"catalogue": [{"name": "bad name", "model": "a/b"}]}}),
            "/prewarm/catalogue/0/name",
        ),
        (
            json!({"storageClasses": [{"name": "x", "parameters": {"model": "a/b", "layot": "hf-cache"}}]}),
            "'layot' not allowed",
        ),
        (
            json!({"node": {"publishWaitSeconds": 120}}),
            "/node/publishWaitSeconds",
        ),
        (json!({"kubeletDir": "var/lib/kubelet"}), "/kubeletDir"),
        (
            json!({"controller": {"enabled": false}, "storageClasses": [{"name": "x", "parameters": {"model": "a/b"}}]}),
            "storageClasses need the controller",
        ),
        (
            json!({"sharedCache": {"enabled": true, "claimName": "c", "subPath": "../etc"}}),
            "/sharedCache/subPath",
        ),
    ];
    for (values, message) in cases {
        match helm::render(&[], Some(&values)) {
            Ok(_) => panic!("the chart accepted {values}"),
            Err(e) => assert!(e.contains(message), "{values}: wanted {message:?} in:\n{e}"),
        }
    }
}

/// The `csi` sources of modelcache volumes in a pod or a workload's pod template.
fn csi_volumes(o: &Value) -> Vec<&Value> {
    let spec = match o["kind"].as_str() {
        Some("Pod") => &o["spec"],
        Some("Deployment" | "StatefulSet" | "DaemonSet" | "Job") => &o["spec"]["template"]["spec"],
        _ => return vec![],
    };
    spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["csi"]["driver"] == "csi.modelcache.dev")
        .map(|v| &v["csi"])
        .collect()
}

#[test]
fn the_examples_validate_and_use_attributes_the_driver_accepts() {
    let dir = workspace_root().join("examples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .filter(|p| !p.to_string_lossy().ends_with("-values.yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "{files:?}");
    let m = helm::load(&files);
    let (mut inline, mut claimed, mut caches) = (0, 0, 0);
    for o in &m.objects {
        for csi in csi_volumes(o) {
            let volume = attributes(&csi["volumeAttributes"]).unwrap_or_else(|e| {
                panic!("the driver refuses {}'s volume: {e}", o["metadata"]["name"])
            });
            // Models are mounted read-only; a cache is the one writable volume.
            match volume {
                Volume::Model(_) => assert_eq!(csi["readOnly"], true, "{}", o["metadata"]["name"]),
                Volume::Cache(_) => caches += 1,
            }
            inline += 1;
        }
        if o["kind"] == "StorageClass" {
            assert_eq!(o["provisioner"], "csi.modelcache.dev");
            attributes(&o["parameters"]).unwrap_or_else(|e| {
                panic!(
                    "the driver refuses StorageClass {}: {e}",
                    o["metadata"]["name"]
                )
            });
        }
        if o["kind"] == "PersistentVolumeClaim" {
            assert_eq!(o["spec"]["accessModes"], json!(["ReadOnlyMany"]));
            claimed += 1;
        }
    }
    assert!(
        inline >= 2 && claimed >= 1 && caches >= 1,
        "inline {inline}, claims {claimed}, caches {caches}"
    );

    // The pre-warm example is chart values: they render, and the labels it shows are the
    // entries' names.
    let values = dir.join("prewarm-values.yaml");
    let rendered = helm::render(&[&values], None).expect("the pre-warm example renders");
    let cat = catalogue(&rendered);
    let text = std::fs::read_to_string(&values).unwrap();
    let labels: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split("prewarm.modelcache.dev/").nth(1))
        // `…/<name>=true` sets it, `…/<name>-` removes it.
        .map(|rest| {
            let key = rest.split(['=', ' ']).next().unwrap();
            key.strip_suffix('-').unwrap_or(key)
        })
        .collect();
    assert!(!labels.is_empty(), "the example shows no label");
    for name in labels {
        let node = BTreeMap::from([(format!("prewarm.modelcache.dev/{name}"), "true".to_owned())]);
        assert!(
            cat.wanted_by(&node).contains(name),
            "the label prewarm.modelcache.dev/{name} matches no entry"
        );
    }
}

/// The fleet example turns the peer tier on, with the caps it says, and what it says to run
/// names the chart's objects.
#[test]
fn the_fleet_example_turns_the_peer_tier_on() {
    let values = workspace_root().join("examples/fleet-values.yaml");
    let m = helm::render(&[&values], None).expect("the fleet example renders");
    let cli = agent_cli(&m);
    let modelcache_agent::cli::Command::Run {
        hub,
        peer_listen,
        peer_max_uploads,
        peer_max_upload_mbps,
        ..
    } = cli.command
    else {
        panic!("the agent container does not run `run`")
    };
    assert_eq!(
        (
            hub.peers_dns.as_deref(),
            hub.peer_own_ip,
            hub.peer_token_file.is_some()
        ),
        (
            Some("modelcache-peers.modelcache.svc:7475"),
            Some("10.244.1.7".parse().unwrap()),
            true
        )
    );
    assert_eq!(
        (
            peer_listen.as_deref(),
            peer_max_uploads,
            peer_max_upload_mbps
        ),
        (Some("0.0.0.0:7475"), 4, Some(400))
    );
    m.get("Secret", "modelcache-peer-secret");
    m.get("NetworkPolicy", "modelcache-peers");
    let text = std::fs::read_to_string(&values).unwrap();
    assert!(text.contains("exec ds/modelcache-node -c agent"), "{text}");
    let ds = m.get("DaemonSet", "modelcache-node");
    container(ds, "agent");
}
