//! Checks of `deploy/`: a renderer for the subset of kustomize the manifests use, the offline
//! schema validation (kubernetes-validate), and an RBAC evaluator that says whether a service
//! account may make a given API call, so that tests can hold the manifests against the calls the
//! code really makes.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use serde::Deserialize as _;
use serde_json::Value;

use crate::workspace_root;

pub fn deploy_dir() -> PathBuf {
    workspace_root().join("deploy")
}

/// Kinds without a namespace (kustomize's namespace transformer leaves them alone).
const CLUSTER_SCOPED: &[&str] = &[
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PriorityClass",
    "StorageClass",
    "IngressClass",
    "GatewayClass",
    "ClusterIssuer",
    "PersistentVolume",
    "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration",
];

/// Custom resources in the manifests: kubernetes-validate has no schema for them, so they are
/// parsed and rendered but not schema-checked. Anything else without a schema is an error.
pub const CRD_KINDS: &[&str] = &[
    "ClusterIssuer",
    "Certificate",
    "IngressRoute",
    "HTTPRoute",
    "Middleware",
    "TLSStore",
    "PodMonitor",
];

/// Parses every YAML document of a file (empty documents skipped).
pub fn load_yaml(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = Value::deserialize(doc).with_context(|| format!("parsing {}", path.display()))?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// Renders a kustomization directory: `resources` (files and directories), `configMapGenerator`
/// (`files`, with `options.labels`; only with `disableNameSuffixHash`, since this renderer
/// computes no hash), `namespace`, `images` and JSON 6902 `patches` with a `target`. Other
/// fields are refused, so that the manifests never rely on something this renderer would
/// silently skip.
pub fn render(dir: &Path) -> anyhow::Result<Vec<Value>> {
    let kfile = dir.join("kustomization.yaml");
    let k = load_yaml(&kfile)?
        .into_iter()
        .next()
        .with_context(|| format!("{} is empty", kfile.display()))?;
    let known: BTreeSet<&str> = [
        "apiVersion",
        "kind",
        "resources",
        "configMapGenerator",
        "namespace",
        "images",
        "patches",
    ]
    .into();
    if let Some(m) = k.as_object() {
        for key in m.keys() {
            if !known.contains(key.as_str()) {
                bail!(
                    "{}: `{key}` is not supported by the test renderer",
                    kfile.display()
                );
            }
        }
    }
    let mut docs = Vec::new();
    for r in k["resources"].as_array().into_iter().flatten() {
        let r = r.as_str().context("a resource that is not a string")?;
        let path = dir.join(r);
        if path.is_dir() {
            docs.extend(render(&path)?);
        } else {
            docs.extend(load_yaml(&path)?);
        }
    }
    for g in k["configMapGenerator"].as_array().into_iter().flatten() {
        docs.push(
            generated_configmap(dir, g)
                .with_context(|| format!("{}: configMapGenerator", kfile.display()))?,
        );
    }
    if let Some(ns) = k["namespace"].as_str() {
        for d in &mut docs {
            let kind = d["kind"].as_str().unwrap_or_default().to_owned();
            if !CLUSTER_SCOPED.contains(&kind.as_str()) {
                d["metadata"]["namespace"] = Value::from(ns);
            }
            if kind.ends_with("RoleBinding") {
                for s in d["subjects"].as_array_mut().into_iter().flatten() {
                    if s["kind"] == "ServiceAccount" {
                        s["namespace"] = Value::from(ns);
                    }
                }
            }
        }
    }
    for img in k["images"].as_array().into_iter().flatten() {
        let name = img["name"].as_str().context("images[].name")?;
        let new_name = img["newName"].as_str().unwrap_or(name);
        let new = match img["newTag"].as_str() {
            Some(tag) => format!("{new_name}:{tag}"),
            None => new_name.to_owned(),
        };
        for d in &mut docs {
            for c in containers_mut(d) {
                let image = c["image"].as_str().unwrap_or_default();
                let base = image.split(['@', ':']).next().unwrap_or_default();
                if base == name {
                    c["image"] = Value::from(new.clone());
                }
            }
        }
    }
    for p in k["patches"].as_array().into_iter().flatten() {
        let target = &p["target"];
        let ops: Vec<Value> =
            serde_yaml::from_str(p["patch"].as_str().context("patches[].patch (JSON 6902)")?)
                .context("patches[].patch is not a list of operations")?;
        let mut hit = false;
        for d in &mut docs {
            let matches = ["kind", "name"].iter().all(|f| {
                let want = &target[*f];
                let have = if *f == "name" {
                    &d["metadata"]["name"]
                } else {
                    &d[*f]
                };
                want.is_null() || want == have
            });
            if matches {
                hit = true;
                for op in &ops {
                    apply_op(d, op).with_context(|| format!("{}: patch {op}", kfile.display()))?;
                }
            }
        }
        if !hit {
            bail!("{}: patch target {target} matches nothing", kfile.display());
        }
    }
    Ok(docs)
}

/// A ConfigMap as kustomize generates it from `files` (each file's name is its key).
fn generated_configmap(dir: &Path, g: &Value) -> anyhow::Result<Value> {
    let name = g["name"].as_str().context("name")?;
    if g["options"]["disableNameSuffixHash"] != Value::Bool(true) {
        bail!("{name}: only with options.disableNameSuffixHash: true (no hash computed here)");
    }
    for key in g.as_object().into_iter().flat_map(|m| m.keys()) {
        if !["name", "files", "options"].contains(&key.as_str()) {
            bail!("{name}: `{key}` is not supported by the test renderer");
        }
    }
    let mut data = serde_json::Map::new();
    for f in g["files"].as_array().into_iter().flatten() {
        let f = f.as_str().context("files[]")?;
        let text = std::fs::read_to_string(dir.join(f)).with_context(|| format!("reading {f}"))?;
        let key = Path::new(f)
            .file_name()
            .and_then(|n| n.to_str())
            .context("a file name")?;
        data.insert(key.to_owned(), Value::from(text));
    }
    let mut metadata = serde_json::json!({ "name": name });
    if g["options"]["labels"].is_object() {
        metadata["labels"] = g["options"]["labels"].clone();
    }
    Ok(serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata,
        "data": data,
    }))
}

fn containers_mut(d: &mut Value) -> Vec<&mut Value> {
    let spec = if d["kind"] == "Pod" {
        d.get_mut("spec")
    } else {
        d.get_mut("spec")
            .and_then(|s| s.get_mut("template"))
            .and_then(|t| t.get_mut("spec"))
    };
    let Some(spec) = spec.and_then(Value::as_object_mut) else {
        return Vec::new();
    };
    spec.iter_mut()
        .filter(|(k, _)| *k == "containers" || *k == "initContainers")
        .filter_map(|(_, v)| v.as_array_mut())
        .flatten()
        .collect()
}

/// The containers (and init containers) of a workload or Pod.
pub fn containers(d: &Value) -> Vec<Value> {
    let mut d = d.clone();
    containers_mut(&mut d).into_iter().map(|c| c.clone()).collect()
}

fn apply_op(d: &mut Value, op: &Value) -> anyhow::Result<()> {
    let path = op["path"].as_str().context("op without a path")?;
    let (parent, last) = path.rsplit_once('/').context("path without '/'")?;
    let last = last.replace("~1", "/").replace("~0", "~");
    let parent = d
        .pointer_mut(parent)
        .with_context(|| format!("{parent} not found"))?;
    match op["op"].as_str() {
        Some("add") => match parent {
            Value::Array(a) if last == "-" => a.push(op["value"].clone()),
            Value::Array(a) => {
                let i: usize = last.parse()?;
                anyhow::ensure!(i <= a.len(), "index {i} out of range");
                a.insert(i, op["value"].clone());
            }
            Value::Object(m) => {
                m.insert(last, op["value"].clone());
            }
            _ => bail!("cannot add under a scalar"),
        },
        Some("replace") => {
            let slot = match parent {
                Value::Array(a) => a.get_mut(last.parse::<usize>()?),
                Value::Object(m) => m.get_mut(&last),
                _ => None,
            };
            *slot.with_context(|| format!("{path} not found"))? = op["value"].clone();
        }
        Some("remove") => match parent {
            Value::Array(a) => {
                let i: usize = last.parse()?;
                anyhow::ensure!(i < a.len(), "index {i} out of range");
                a.remove(i);
            }
            Value::Object(m) => {
                m.remove(&last).with_context(|| format!("{path} not found"))?;
            }
            _ => bail!("cannot remove under a scalar"),
        },
        other => bail!("operation {other:?} is not supported"),
    }
    Ok(())
}

/// Validates documents against the Kubernetes 1.33 schemas, strictly (unknown fields are
/// errors). Custom resources of [`CRD_KINDS`] have no schema there and are let through; any
/// other kind without one fails. Returns the kinds that were not schema-checked.
pub fn validate(docs: &[Value], validator: &Path) -> anyhow::Result<BTreeSet<String>> {
    let dir = std::env::temp_dir().join(format!("st8s-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("rendered.yaml");
    let mut text = String::new();
    for d in docs {
        text.push_str("---\n");
        text.push_str(&serde_yaml::to_string(d)?);
    }
    std::fs::write(&file, text)?;
    let out = Command::new(validator)
        .args(["--strict", "-k", "1.33.0"])
        .arg(&file)
        .output()
        .with_context(|| format!("running {} (cargo xtask setup installs it)", validator.display()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = out?;
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut unchecked = BTreeSet::new();
    let mut problems = Vec::new();
    // Every line is INFO (passed), or a WARN about a known custom resource; anything else is a
    // problem. (The validator's exit status is 1 for warnings too.)
    let mut passed = 0;
    for line in report.lines().filter(|l| !l.trim().is_empty()) {
        if line.starts_with("INFO") && line.contains(" passed ") {
            passed += 1;
            continue;
        }
        if let Some(rest) = line.split("Couldn't find schema for kind ").nth(1) {
            let kind = rest.split_whitespace().next().unwrap_or_default();
            if line.starts_with("WARN") && CRD_KINDS.contains(&kind) {
                unchecked.insert(kind.to_owned());
                continue;
            }
        }
        problems.push(line.to_owned());
    }
    if !problems.is_empty() || passed == 0 {
        bail!(
            "manifests do not validate:\n{}\n(full report:\n{report})",
            problems.join("\n")
        );
    }
    Ok(unchecked)
}

/// One request to the API, as RBAC sees it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ApiCall {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
}

fn list_has(v: &Value, want: &str) -> bool {
    v.as_array()
        .is_some_and(|a| a.iter().any(|x| x == "*" || x.as_str() == Some(want)))
}

fn rule_allows(rule: &Value, call: &ApiCall) -> bool {
    if !(list_has(&rule["apiGroups"], &call.group)
        && list_has(&rule["resources"], &call.resource)
        && list_has(&rule["verbs"], &call.verb))
    {
        return false;
    }
    match rule["resourceNames"].as_array() {
        Some(names) if !names.is_empty() => call
            .name
            .as_ref()
            .is_some_and(|n| names.iter().any(|x| x.as_str() == Some(n))),
        _ => true,
    }
}

/// Whether the service account `namespace/name` may make `call`, by the Roles, ClusterRoles and
/// bindings among `docs` (the rendered manifests).
pub fn allowed(docs: &[Value], sa_namespace: &str, sa_name: &str, call: &ApiCall) -> bool {
    let binds_sa = |b: &Value| {
        b["subjects"].as_array().is_some_and(|ss| {
            ss.iter().any(|s| {
                s["kind"] == "ServiceAccount" && s["name"] == sa_name && s["namespace"] == sa_namespace
            })
        })
    };
    let role = |kind: &str, name: &str, ns: Option<&str>| {
        docs.iter().find(|d| {
            d["kind"] == kind
                && d["metadata"]["name"] == name
                && ns.is_none_or(|n| d["metadata"]["namespace"] == n)
        })
    };
    for b in docs.iter().filter(|d| binds_sa(d)) {
        let role_kind = b["roleRef"]["kind"].as_str().unwrap_or_default();
        let role_name = b["roleRef"]["name"].as_str().unwrap_or_default();
        let (scope, r) = match b["kind"].as_str() {
            Some("ClusterRoleBinding") => (None, role("ClusterRole", role_name, None)),
            Some("RoleBinding") => {
                let ns = b["metadata"]["namespace"].as_str();
                let r = if role_kind == "ClusterRole" {
                    role("ClusterRole", role_name, None)
                } else {
                    role("Role", role_name, ns)
                };
                (ns, r)
            }
            _ => continue,
        };
        if let Some(scope) = scope
            && call.namespace.as_deref() != Some(scope)
        {
            continue;
        }
        if r.is_some_and(|r| {
            r["rules"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|rule| rule_allows(rule, call))
        }) {
            return true;
        }
    }
    false
}
