//! The manifests an operator applies: every kustomization renders, every manifest validates
//! strictly against the Kubernetes schemas, every flag and environment variable they give
//! `st8s` exists in its `--help`, no secret is committed, and the RBAC evaluator that the
//! agent and dns tests use answers as Kubernetes would.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;
use xtask::deploy::{self, ApiCall, allowed, containers, render};

fn kustomizations() -> Vec<PathBuf> {
    let root = deploy::deploy_dir();
    let mut dirs = vec![root.join("base"), root.join("monitoring")];
    let examples = root.join("examples");
    if let Ok(entries) = std::fs::read_dir(&examples) {
        let mut more: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.join("kustomization.yaml").is_file())
            .collect();
        more.sort();
        dirs.extend(more);
    }
    dirs
}

fn st8s() -> PathBuf {
    xtask::st8s_debug_bin()
}

fn help(args: &[&str]) -> String {
    let out = Command::new(st8s())
        .args(args)
        .arg("--help")
        .output()
        .expect("st8s runs");
    assert!(out.status.success(), "st8s {args:?} --help failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn name(d: &Value) -> String {
    format!(
        "{} {}",
        d["kind"].as_str().unwrap_or("?"),
        d["metadata"]["name"].as_str().unwrap_or("?")
    )
}

#[test]
fn every_kustomization_renders_and_validates_strictly() {
    let validator = xtask::setup::kubernetes_validate();
    assert!(
        validator.is_file(),
        "{} missing: `cargo xtask setup` installs it",
        validator.display()
    );
    for dir in kustomizations() {
        let docs = render(&dir).unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()));
        assert!(!docs.is_empty(), "{} renders nothing", dir.display());
        let unchecked =
            deploy::validate(&docs, &validator).unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()));
        let mut seen = BTreeSet::new();
        for d in &docs {
            let key = format!(
                "{}/{}",
                d["metadata"]["namespace"].as_str().unwrap_or(""),
                name(d)
            );
            assert!(seen.insert(key.clone()), "{}: {key} twice", dir.display());
        }
        println!(
            "{}: {} objects rendered; all but the custom resources ({unchecked:?}, no schema offline) valid against Kubernetes 1.33 (strict)",
            dir.strip_prefix(xtask::workspace_root())
                .unwrap_or(&dir)
                .display(),
            docs.len()
        );
    }
}

/// Issue 17: the optional monitoring kustomization carries the dashboard as the ConfigMap
/// Grafana's sidecar loads, and a PodMonitor for the agents' named port and one for `st8s dns`'s.
#[test]
fn the_monitoring_kustomization_ships_the_dashboard_and_the_pod_monitors() {
    let docs = render(&deploy::deploy_dir().join("monitoring")).expect("renders");
    let cm = docs
        .iter()
        .find(|d| name(d) == "ConfigMap st8s-dashboard")
        .expect("the dashboard's ConfigMap");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(cm["metadata"]["namespace"], "st8s-system");
    let json = cm["data"]["st8s-dashboard.json"].as_str().expect("the dashboard");
    assert_eq!(
        json,
        std::fs::read_to_string(xtask::dashboard_path()).expect("file"),
        "the file itself"
    );
    let ports: BTreeSet<String> = docs
        .iter()
        .filter(|d| d["kind"] == "PodMonitor")
        .flat_map(|d| {
            d["spec"]["podMetricsEndpoints"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|e| e["port"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(ports, ["http".to_owned(), "st8s-metrics".to_owned()].into());
    // The ports they name exist: the agent's in the base, st8s dns's in the home example.
    let named = |dir: &str, port: &str| {
        render(&deploy::deploy_dir().join(dir))
            .expect("renders")
            .iter()
            .any(|d| {
                serde_json::to_string(d)
                    .unwrap_or_default()
                    .contains(&format!("\"name\":\"{port}\""))
            })
    };
    assert!(named("base", "http"), "the agent's port `http`");
    assert!(
        named("examples/home", "st8s-metrics"),
        "st8s dns's port `st8s-metrics`"
    );
}

/// The base alone: what the DaemonSet promises.
#[test]
fn the_agent_daemonset_keeps_its_promises() {
    let docs = render(&deploy::deploy_dir().join("base")).expect("renders");
    let ds = docs
        .iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert!(
        pod["tolerations"].as_array().is_some_and(|t| t
            .iter()
            .any(|t| t["operator"] == "Exists" && t.get("key").is_none())),
        "runs on every node"
    );
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    assert_ne!(sc["privileged"], true, "not privileged");
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert!(c["resources"]["limits"]["memory"].is_string());
    let env: Vec<&str> = c["env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert!(env.contains(&"NODE_NAME"));
    let mounts: Vec<&str> = c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    assert!(mounts.contains(&"/sys/fs/bpf") && mounts.contains(&"/sys/kernel/btf"));
    assert_eq!(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"], 1);
}

#[test]
fn every_flag_and_variable_given_to_st8s_exists() {
    let mut checked = 0;
    for dir in kustomizations() {
        let docs = render(&dir).expect("renders");
        for d in &docs {
            for c in containers(d) {
                let image = c["image"].as_str().unwrap_or_default();
                if !image.rsplit('/').next().unwrap_or_default().starts_with("st8s") {
                    continue;
                }
                let args: Vec<&str> = c["args"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                let sub = *args
                    .first()
                    .unwrap_or_else(|| panic!("{}: no subcommand", name(d)));
                let text = help(&[sub]);
                for a in &args[1..] {
                    if let Some(flag) = a.strip_prefix("--") {
                        let flag = format!("--{}", flag.split('=').next().unwrap_or_default());
                        assert!(
                            text.contains(&format!("{flag} ")) || text.contains(&format!("{flag}\n")),
                            "{} in {}: `st8s {sub}` has no {flag}:\n{text}",
                            name(d),
                            dir.display()
                        );
                        checked += 1;
                    }
                }
                for e in c["env"].as_array().into_iter().flatten() {
                    let var = e["name"].as_str().unwrap_or_default();
                    assert!(
                        text.contains(&format!("[env: {var}")),
                        "{} in {}: `st8s {sub}` reads no {var}:\n{text}",
                        name(d),
                        dir.display()
                    );
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 5, "only {checked} flags and variables checked");
}

#[test]
fn no_secret_is_committed() {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(&deploy::deploy_dir(), &mut files);
    assert!(!files.is_empty());
    for f in files {
        for d in deploy::load_yaml(&f).unwrap_or_else(|e| panic!("{e:#}")) {
            if d["kind"] == "Secret" {
                assert!(
                    d.get("data").is_none() && d.get("stringData").is_none(),
                    "{}: a Secret with content is committed",
                    f.display()
                );
            }
        }
    }
}

/// The evaluator that the agent and dns tests rely on must be able to say no.
#[test]
fn rbac_evaluation_says_yes_and_no_as_kubernetes_would() {
    let docs = render(&deploy::deploy_dir().join("base")).expect("renders");
    let call = |verb: &str, group: &str, resource: &str, ns: Option<&str>, name: Option<&str>| ApiCall {
        verb: verb.into(),
        group: group.into(),
        resource: resource.into(),
        namespace: ns.map(str::to_owned),
        name: name.map(str::to_owned),
    };
    let zones = call("patch", "", "configmaps", Some("st8s-system"), Some("st8s-zones"));
    assert!(allowed(&docs, "st8s-system", "st8s-dns", &zones));
    assert!(
        !allowed(&docs, "st8s-system", "st8s-agent", &zones),
        "the agent writes no ConfigMap"
    );
    let other = call("patch", "", "configmaps", Some("st8s-system"), Some("coredns"));
    assert!(
        !allowed(&docs, "st8s-system", "st8s-dns", &other),
        "only its own ConfigMap"
    );
    let elsewhere = call("patch", "", "configmaps", Some("kube-system"), Some("st8s-zones"));
    assert!(
        !allowed(&docs, "st8s-system", "st8s-dns", &elsewhere),
        "only in its namespace"
    );
    let pods = call("watch", "", "pods", None, None);
    assert!(allowed(&docs, "st8s-system", "st8s-agent", &pods));
    assert!(allowed(&docs, "st8s-system", "st8s-dns", &pods));
    let evict = call("delete", "", "pods", Some("media"), Some("jellyfin-0"));
    assert!(
        !allowed(&docs, "st8s-system", "st8s-dns", &evict),
        "it reads pods, nothing more"
    );
    assert!(!allowed(&docs, "st8s-system", "st8s-agent", &evict));
    let lease = call(
        "create",
        "coordination.k8s.io",
        "leases",
        Some("st8s-system"),
        Some("st8s-agent-n1"),
    );
    assert!(allowed(&docs, "st8s-system", "st8s-agent", &lease));
    assert!(
        !allowed(&docs, "default", "st8s-agent", &lease),
        "the service account's namespace counts"
    );
    let secrets = call("get", "", "secrets", Some("st8s-system"), Some("x"));
    assert!(!allowed(&docs, "st8s-system", "st8s-agent", &secrets));
    assert!(!allowed(&docs, "st8s-system", "st8s-dns", &secrets));
}
