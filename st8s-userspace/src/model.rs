//! The cluster as st8s sees it: Nodes and Pods, as the API server serves them.
//!
//! The file source reads the output of `kubectl get nodes,pods -A -o yaml` (a `kind: List`) or a
//! stream of YAML documents; the Kubernetes source (a watcher) fills the same [`Cluster`].

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Pod};
use serde::Deserialize;

/// Errors reading cluster objects from YAML.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
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

/// Every Node and Pod st8s knows of, keyed by name (nodes) and namespace/name (pods).
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    pub nodes: BTreeMap<String, Node>,
    pub pods: BTreeMap<String, Pod>,
}

impl Cluster {
    pub fn upsert_node(&mut self, node: Node) {
        let name = node.metadata.name.clone().unwrap_or_default();
        self.nodes.insert(name, node);
    }

    pub fn upsert_pod(&mut self, pod: Pod) {
        self.pods.insert(pod_key(&pod), pod);
    }

    pub fn remove_node(&mut self, name: &str) {
        self.nodes.remove(name);
    }

    pub fn remove_pod(&mut self, key: &str) {
        self.pods.remove(key);
    }

    /// Parses YAML as `kubectl get nodes,pods -A -o yaml` prints it. Objects of other kinds are
    /// ignored; a document that is not YAML, or a Node/Pod that does not fit the schema, is an
    /// error naming it.
    pub fn from_yaml(text: &str) -> Result<Self, ModelError> {
        let mut cluster = Cluster::default();
        for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let doc_no = i + 1;
            let value = serde_yaml::Value::deserialize(doc)
                .map_err(|source| ModelError::Yaml { doc: doc_no, source })?;
            cluster.add_value(value, doc_no)?;
        }
        Ok(cluster)
    }

    fn add_value(&mut self, value: serde_yaml::Value, doc: usize) -> Result<(), ModelError> {
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
                        self.add_value(item, doc)?;
                    }
                }
            }
            "Node" => {
                let name = object_name(&value);
                let node: Node = serde_yaml::from_value(value).map_err(|source| ModelError::Schema {
                    doc,
                    kind,
                    name,
                    source,
                })?;
                self.upsert_node(node);
            }
            "Pod" => {
                let name = object_name(&value);
                let pod: Pod = serde_yaml::from_value(value).map_err(|source| ModelError::Schema {
                    doc,
                    kind,
                    name,
                    source,
                })?;
                self.upsert_pod(pod);
            }
            _ => {}
        }
        Ok(())
    }
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

/// `namespace/name`, the name st8s uses for a pod everywhere.
pub fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or("<unnamed>")
    )
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
        let c = Cluster::from_yaml(yaml).expect("parses");
        assert_eq!(c.nodes.len(), 1);
        assert!(c.pods.contains_key("apps/web"));
    }

    #[test]
    fn reads_several_documents() {
        let yaml = "kind: Node\napiVersion: v1\nmetadata: {name: a}\n---\nkind: Node\napiVersion: v1\nmetadata: {name: b}\n";
        let c = Cluster::from_yaml(yaml).expect("parses");
        assert_eq!(c.nodes.keys().collect::<Vec<_>>(), ["a", "b"]);
    }

    #[test]
    fn names_the_object_that_does_not_fit() {
        let yaml = "kind: Pod\napiVersion: v1\nmetadata: {name: bad, namespace: x}\nspec: {containers: 3}\n";
        let err = Cluster::from_yaml(yaml).expect_err("schema error");
        assert!(err.to_string().contains("x/bad"), "{err}");
    }

    #[test]
    fn rejects_broken_yaml() {
        let err = Cluster::from_yaml("kind: [unclosed\nmetadata: {").expect_err("yaml error");
        assert!(matches!(err, ModelError::Yaml { doc: 1, .. }), "{err}");
    }
}
