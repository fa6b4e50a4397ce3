//! The file source: a YAML file of Nodes and Pods (`kubectl get nodes,pods -A -o yaml`, a
//! `kind: List` or a stream of documents), re-read when it changes.
//!
//! The file is polled (content, not only mtime), which also follows the symlink swaps a mounted
//! ConfigMap goes through.

use std::{
    io,
    path::{Path, PathBuf},
};

use k8s_openapi::api::core::v1::{Node, Pod};
use serde::Deserialize as _;

use super::k8s;
use crate::core::Cluster;

/// Errors reading cluster objects from YAML.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("document {doc} is not valid YAML")]
    Yaml {
        doc: usize,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{kind} {name:?} (document {doc}) does not match the Kubernetes schema")]
    Schema {
        doc: usize,
        kind: String,
        name: String,
        #[source]
        source: serde_yaml::Error,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: ReadError,
    },
}

pub struct FileSource {
    path: PathBuf,
    last: Option<String>,
}

impl FileSource {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            last: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `Ok(None)` when the file is unchanged since the last call that returned a cluster (or an
    /// error), `Ok(Some)` with the parsed cluster when it changed.
    pub fn poll(&mut self) -> Result<Option<Cluster>, SourceError> {
        let text = std::fs::read_to_string(&self.path).map_err(|source| SourceError::Read {
            path: self.path.clone(),
            source,
        })?;
        if self.last.as_deref() == Some(text.as_str()) {
            return Ok(None);
        }
        self.last = Some(text.clone());
        read_cluster(&text)
            .map(Some)
            .map_err(|source| SourceError::Parse {
                path: self.path.clone(),
                source,
            })
    }
}

/// Parses YAML as `kubectl get nodes,pods -A -o yaml` prints it. Objects of other kinds are
/// ignored; a document that is not YAML, or a Node/Pod that does not fit the schema, is an
/// error naming it.
pub fn read_cluster(text: &str) -> Result<Cluster, ReadError> {
    let mut cluster = Cluster::default();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let doc_no = i + 1;
        let value =
            serde_yaml::Value::deserialize(doc).map_err(|source| ReadError::Yaml { doc: doc_no, source })?;
        add_value(&mut cluster, value, doc_no)?;
    }
    Ok(cluster)
}

fn add_value(cluster: &mut Cluster, value: serde_yaml::Value, doc: usize) -> Result<(), ReadError> {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or("")
        .to_owned();
    match kind.as_str() {
        "List" | "NodeList" | "PodList" => {
            if let Some(items) = value.get("items").and_then(|i| i.as_sequence()) {
                let inner = match kind.as_str() {
                    "NodeList" => "Node",
                    "PodList" => "Pod",
                    _ => "",
                };
                for item in items {
                    let mut item = item.clone();
                    // `kubectl get nodes -o json` lists omit the item kind.
                    if let (false, Some(map)) = (inner.is_empty(), item.as_mapping_mut()) {
                        map.entry("kind".into()).or_insert(inner.into());
                    }
                    add_value(cluster, item, doc)?;
                }
            }
        }
        "Node" => {
            let node: Node = from_schema(value, doc, kind)?;
            cluster.upsert_node(k8s::node(&node));
        }
        "Pod" => {
            let pod: Pod = from_schema(value, doc, kind)?;
            if let Some(pod) = k8s::pod(&pod) {
                cluster.upsert_pod(pod);
            }
        }
        _ => {}
    }
    Ok(())
}

/// A Node or Pod read by the Kubernetes schema; an error names the object.
fn from_schema<T: serde::de::DeserializeOwned>(
    value: serde_yaml::Value,
    doc: usize,
    kind: String,
) -> Result<T, ReadError> {
    let name = object_name(&value);
    serde_yaml::from_value(value).map_err(|source| ReadError::Schema {
        doc,
        kind,
        name,
        source,
    })
}

fn object_name(value: &serde_yaml::Value) -> String {
    let meta = value.get("metadata");
    let name = meta
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .unwrap_or("<unnamed>");
    match meta.and_then(|m| m.get("namespace")).and_then(|n| n.as_str()) {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_kubectl_list() {
        let yaml = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Node
  metadata: {name: node1}
  status:
    addresses: [{type: InternalIP, address: 10.0.0.11}]
- apiVersion: v1
  kind: Pod
  metadata: {name: web, namespace: apps}
  spec:
    nodeName: node1
    containers: [{name: c, ports: [{containerPort: 8080, hostPort: 80}]}]
- apiVersion: v1
  kind: ConfigMap
  metadata: {name: ignored}
"#;
        let c = read_cluster(yaml).expect("parses");
        assert_eq!(c.nodes.len(), 1);
        assert_eq!(
            c.pods["apps/web"].host_ports,
            [crate::core::HostPort::new(80, 8080, "TCP")],
            "protocol defaults to TCP"
        );
    }

    #[test]
    fn reads_several_documents() {
        let yaml = "kind: Node\napiVersion: v1\nmetadata: {name: a}\n---\nkind: Node\napiVersion: v1\nmetadata: {name: b}\n";
        let c = read_cluster(yaml).expect("parses");
        assert_eq!(c.nodes.keys().collect::<Vec<_>>(), ["a", "b"]);
    }

    #[test]
    fn names_the_object_that_does_not_fit() {
        let yaml = "kind: Pod\napiVersion: v1\nmetadata: {name: bad, namespace: x}\nspec: {containers: 3}\n";
        let err = read_cluster(yaml).expect_err("schema error");
        assert!(err.to_string().contains("x/bad"), "{err}");
    }

    #[test]
    fn rejects_broken_yaml() {
        let err = read_cluster("kind: [unclosed\nmetadata: {").expect_err("yaml error");
        assert!(matches!(err, ReadError::Yaml { doc: 1, .. }), "{err}");
    }

    #[test]
    fn reports_changes_once() {
        let dir = std::env::temp_dir().join(format!("st8s-source-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let file = dir.join("cluster.yaml");
        std::fs::write(&file, "apiVersion: v1\nkind: Node\nmetadata: {name: a}\n").expect("write");
        let mut s = FileSource::new(&file);
        assert_eq!(s.poll().expect("reads").expect("first read").nodes.len(), 1);
        assert!(s.poll().expect("reads").is_none(), "unchanged file");
        std::fs::write(&file, "kind: Node\napiVersion: v1\nmetadata: {name: a}\n---\nkind: Node\napiVersion: v1\nmetadata: {name: b}\n").expect("write");
        assert_eq!(s.poll().expect("reads").expect("changed").nodes.len(), 2);
        std::fs::write(&file, "kind: [").expect("write");
        assert!(matches!(s.poll(), Err(SourceError::Parse { .. })));
        assert!(
            s.poll().expect("same broken text").is_none(),
            "a broken file is reported once"
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
