//! What the planning core reads of the cluster: plain structs that the sources fill (the file
//! source from `kubectl` YAML, the Kubernetes source from its watchers). There are no Kubernetes
//! types here, so the core builds without kube or k8s-openapi, and a test writes a cluster as
//! plain values.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
};

/// A node as st8s needs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    /// The node's first IPv4 InternalIP; a node without one is reported and left out.
    pub addr: Option<Ipv4Addr>,
    /// The node's first IPv6 InternalIP (a dual-stack node has one of each).
    pub addr6: Option<Ipv6Addr>,
    /// The node's `Ready` condition is `True`.
    pub ready: bool,
}

/// One hostPort a pod declares, as its spec writes it; the plan checks the values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPort {
    pub host_port: i32,
    pub container_port: i32,
    /// `TCP`, `UDP` or `SCTP`; the API's default, `TCP`, when the spec leaves it out.
    pub protocol: String,
}

impl HostPort {
    pub fn new(host_port: i32, container_port: i32, protocol: &str) -> Self {
        Self {
            host_port,
            container_port,
            protocol: protocol.to_owned(),
        }
    }
}

/// A pod that declares hostPorts (the only pods st8s keeps: a pod's ports never change).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    /// `spec.nodeName`: none until the pod is scheduled.
    pub node: Option<String>,
    /// `status.podIP` as the API gives it (the first of `ips`, in either family).
    pub ip: Option<String>,
    /// `status.podIPs`: a dual-stack pod has one address of each family, the cluster's primary
    /// family first (an IPv6-primary cluster lists the IPv6 one first, and in `podIP`).
    pub ips: Vec<String>,
    /// The pod's `Ready` condition is `True`.
    pub ready: bool,
    /// `metadata.deletionTimestamp` is set: the pod is shutting down (a rolling update deletes
    /// pods that are still Ready), so it takes no new flow, as if it were NotReady.
    pub terminating: bool,
    pub host_network: bool,
    /// The value of the `st8s.io/steer` annotation.
    pub steer: Option<String>,
    /// The value of the `st8s.io/discovery` annotation.
    pub discovery: Option<String>,
    pub host_ports: Vec<HostPort>,
}

impl Pod {
    /// `namespace/name`, the name st8s uses for a pod everywhere.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Every Node and Pod st8s knows of, keyed by name (nodes) and `namespace/name` (pods).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cluster {
    pub nodes: BTreeMap<String, Node>,
    pub pods: BTreeMap<String, Pod>,
}

impl Cluster {
    pub fn upsert_node(&mut self, node: Node) {
        self.nodes.insert(node.name.clone(), node);
    }

    pub fn upsert_pod(&mut self, pod: Pod) {
        self.pods.insert(pod.key(), pod);
    }

    pub fn remove_node(&mut self, name: &str) -> bool {
        self.nodes.remove(name).is_some()
    }

    pub fn remove_pod(&mut self, key: &str) -> bool {
        self.pods.remove(key).is_some()
    }
}
