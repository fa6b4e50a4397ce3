//! Kubernetes objects into the core's input types: what st8s reads of a Node and of a Pod.
//! Shared by the file source (k8s-openapi types parsed from YAML) and `st8s dns`.

use std::{collections::BTreeMap, net::Ipv4Addr};

use k8s_openapi::{
    api::core::v1::{Node, Pod},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use crate::core::{self, DISCOVERY_ANNOTATION, HostPort, STEER_ANNOTATION};

/// The node's first InternalIP that is an IPv4 address.
pub fn internal_ip(node: &Node) -> Option<Ipv4Addr> {
    first_internal_ip(node)
}

/// The node's first InternalIP that is an IPv6 address (a dual-stack node has one of each).
pub fn internal_ip6(node: &Node) -> Option<std::net::Ipv6Addr> {
    first_internal_ip(node)
}

/// The first InternalIP that parses as `A`.
fn first_internal_ip<A: std::str::FromStr>(node: &Node) -> Option<A> {
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse().ok())
}

/// The node's `Ready` condition is `True`.
pub fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

pub fn node(node: &Node) -> core::Node {
    core::Node {
        name: node.metadata.name.clone().unwrap_or_default(),
        addr: internal_ip(node),
        addr6: internal_ip6(node),
        ready: node_ready(node),
    }
}

/// The namespace of an object that names none.
const DEFAULT_NAMESPACE: &str = "default";
/// The name given to an object without one.
const UNNAMED: &str = "<unnamed>";

/// `namespace/name` from an object's metadata, with the defaults [`core_pod`] uses.
pub fn pod_key(namespace: Option<&str>, name: Option<&str>) -> String {
    format!(
        "{}/{}",
        namespace.unwrap_or(DEFAULT_NAMESPACE),
        name.unwrap_or(UNNAMED)
    )
}

/// What both sources read of a pod (the YAML reader from k8s-openapi's `Pod`, the watcher from
/// its slim `WatchedPod`).
pub struct PodParts<'a, P> {
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub annotations: Option<&'a BTreeMap<String, String>>,
    pub node: Option<String>,
    pub ip: Option<String>,
    /// `status.podIPs`.
    pub ips: Vec<String>,
    pub ready: bool,
    /// `metadata.deletionTimestamp` is set.
    pub terminating: bool,
    pub host_network: bool,
    /// (hostPort, containerPort, protocol) of every container port.
    pub ports: P,
}

/// The pod as the core reads it, or nothing when it declares no hostPort (such a pod never
/// matters: a pod's ports cannot change).
pub fn core_pod<'a, P>(parts: PodParts<'a, P>) -> Option<core::Pod>
where
    P: Iterator<Item = (Option<i32>, i32, Option<&'a str>)>,
{
    let host_ports: Vec<HostPort> = parts
        .ports
        .filter_map(|(host, container, protocol)| {
            Some(HostPort::new(host?, container, protocol.unwrap_or("TCP")))
        })
        .collect();
    if host_ports.is_empty() {
        return None;
    }
    let annotation = |key: &str| parts.annotations?.get(key).cloned();
    Some(core::Pod {
        namespace: parts.namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.into()),
        name: parts.name.unwrap_or_else(|| UNNAMED.into()),
        node: parts.node,
        ip: parts.ip,
        ips: parts.ips,
        ready: parts.ready,
        terminating: parts.terminating,
        host_network: parts.host_network,
        steer: annotation(STEER_ANNOTATION),
        discovery: annotation(DISCOVERY_ANNOTATION),
        host_ports,
    })
}

/// A k8s-openapi `Pod` as the core reads it (see [`core_pod`]).
pub fn pod(pod: &Pod) -> Option<core::Pod> {
    let spec = pod.spec.as_ref()?;
    let status = pod.status.as_ref();
    core_pod(PodParts {
        namespace: pod.metadata.namespace.clone(),
        name: pod.metadata.name.clone(),
        annotations: pod.metadata.annotations.as_ref(),
        node: spec.node_name.clone(),
        ip: status.and_then(|s| s.pod_ip.clone()),
        ips: status
            .and_then(|s| s.pod_ips.as_ref())
            .map(|ips| ips.iter().map(|p| p.ip.clone()).collect())
            .unwrap_or_default(),
        ready: status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True")),
        terminating: pod.metadata.deletion_timestamp.is_some(),
        host_network: spec.host_network.unwrap_or(false),
        ports: spec
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .map(|p| (p.host_port, p.container_port, p.protocol.as_deref())),
    })
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct SlimMeta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
    #[serde(default)]
    resource_version: Option<String>,
    #[serde(default)]
    deletion_timestamp: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
}

/// Metadata without managedFields, labels and the rest: name, namespace, resourceVersion,
/// deletionTimestamp, and the `st8s.io/` annotations (`#[serde(deserialize_with = "k8s::slim_meta")]` on a slim type's
/// `metadata`).
pub fn slim_meta<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let m = <SlimMeta as serde::Deserialize>::deserialize(d)?;
    Ok(ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        resource_version: m.resource_version,
        deletion_timestamp: m.deletion_timestamp,
        annotations: m
            .annotations
            .map(|a| a.into_iter().filter(|(k, _)| k.starts_with("st8s.io/")).collect())
            .filter(|a: &BTreeMap<String, String>| !a.is_empty()),
        ..Default::default()
    })
}
