//! Cluster in, the steering table one node should run out.
//!
//! No kernel, no API server: [`plan`] is a function of the [`Cluster`] and the node's name, so the
//! file source, the Kubernetes watcher and the tests all share it.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{Ipv4Addr, Ipv6Addr},
};

use st8s_common::{MAX_BACKENDS, MAX_NODES, MAX_PORTS, PROTO_TCP, PROTO_UDP};

use super::cluster::{Cluster, Pod};

/// Pod annotation: `"false"` keeps the pod's hostPorts out of st8s.
pub const STEER_ANNOTATION: &str = "st8s.io/steer";
/// `"7359/udp,1900/udp"`: UDP hostPorts of the pod that also receive broadcast and multicast
/// (discovery) on its node.
pub const DISCOVERY_ANNOTATION: &str = "st8s.io/discovery";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => PROTO_TCP,
            Proto::Udp => PROTO_UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            PROTO_TCP => Some(Proto::Tcp),
            PROTO_UDP => Some(Proto::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// A steered hostPort.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortId {
    pub port: u16,
    pub proto: Proto,
}

impl fmt::Display for PortId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.port, self.proto)
    }
}

/// A cluster node as the dataplane needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeEntry {
    pub name: String,
    pub addr: Ipv4Addr,
    /// The node's IPv6 InternalIP on a dual-stack cluster (not steered yet: IPv6 is passed).
    pub addr6: Option<Ipv6Addr>,
    pub ready: bool,
}

/// A node that runs a Ready backend pod for a port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendEntry {
    pub node: String,
    pub node_addr: Ipv4Addr,
    pub pod: String,
    /// The pod is NotReady (or terminating) but still there: the flows it has keep reaching
    /// it, no new flow is sent to it. TCP only: UDP has no connection to finish.
    pub draining: bool,
}

/// The backend pod on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalBackend {
    pub pod: String,
    pub addr: Ipv4Addr,
    /// The pod's IPv6 address on a dual-stack cluster (not steered yet: IPv6 is passed).
    pub addr6: Option<Ipv6Addr>,
    pub port: u16,
    /// The pod declares this (UDP) hostPort in `st8s.io/discovery`: broadcast and multicast to
    /// it are delivered to the pod too.
    pub discovery: bool,
    /// See [`BackendEntry::draining`].
    pub draining: bool,
}

/// One steered port: every node with a backend (sorted by node name, the order every agent uses
/// for the Maglev table), and this node's own backend if it has one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortPlan {
    pub backends: Vec<BackendEntry>,
    pub local: Option<LocalBackend>,
}

/// What one node's dataplane should hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    pub self_node: NodeEntry,
    /// Every node with an InternalIP, by address (this one included).
    pub nodes: BTreeMap<Ipv4Addr, NodeEntry>,
    pub ports: BTreeMap<PortId, PortPlan>,
}

impl Desired {
    /// The addresses of the other nodes: this node's peers.
    pub fn peers(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.nodes.keys().copied().filter(|a| *a != self.self_node.addr)
    }

    /// The table without the backends on `unreachable` nodes: their flows move to
    /// the remaining backends. This node's own backend is never removed. A port whose every
    /// backend is unreachable keeps them all (a "panic" mode, as in Envoy): when nothing answers, a
    /// broken probe path (a firewall dropping the probe port) is likelier than a dead cluster,
    /// and trying beats refusing every connection.
    pub fn without_nodes(&self, unreachable: &BTreeSet<Ipv4Addr>) -> Desired {
        let mut d = self.clone();
        if unreachable.is_empty() {
            return d;
        }
        for port in d.ports.values_mut() {
            keep_reachable(&mut port.backends, |b| {
                b.node_addr == self.self_node.addr || !unreachable.contains(&b.node_addr)
            });
        }
        d
    }
}

/// Panic mode, as Envoy's load balancers have it: keeps the candidates that are `up`, unless none
/// is; then the probes are the likelier failure (a NetworkPolicy, a firewall) and all stay.
/// Whether it panicked (candidates, none up). The agent's backends and `st8s dns`'s answers
/// follow this one rule.
pub fn keep_reachable<T>(candidates: &mut Vec<T>, up: impl Fn(&T) -> bool) -> bool {
    if candidates.iter().any(&up) {
        candidates.retain(up);
        false
    } else {
        !candidates.is_empty()
    }
}

/// Something wrong with one object. The object is left out of the plan; the file source refuses
/// the whole update while there are any, the Kubernetes source applies the rest.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("node {node}: no InternalIP address")]
    NodeWithoutAddress { node: String },
    #[error("pod {pod}: Ready with hostPorts but no podIP")]
    PodWithoutIp { pod: String },
    #[error(
        "pod {pod}: no IPv4 address among its podIPs {ip:?} (st8s steers IPv4; an IPv6-only pod is left to the kernel)"
    )]
    PodIpNotIpv4 { pod: String, ip: String },
    #[error("pod {pod}: hostPort {port} has unknown protocol {protocol:?} (st8s steers TCP and UDP)")]
    UnknownProtocol {
        pod: String,
        port: i32,
        protocol: String,
    },
    #[error("pod {pod}: port {port} is out of range")]
    PortOutOfRange { pod: String, port: i32 },
    #[error("pod {pod}: annotation {STEER_ANNOTATION}={value:?} is neither \"true\" nor \"false\"")]
    BadAnnotation { pod: String, value: String },
    #[error("pod {pod}: annotation {DISCOVERY_ANNOTATION}: {entry:?} {reason}")]
    BadDiscovery {
        pod: String,
        entry: String,
        reason: &'static str,
    },
    #[error("pods {first} and {second} both claim hostPort {port} on node {node}")]
    HostPortConflict {
        port: PortId,
        node: String,
        first: String,
        second: String,
    },
}

/// The plan cannot be programmed at all.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("node {node:?} is not in the cluster")]
    UnknownNode { node: String },
    #[error("node {node:?} has no InternalIP address")]
    SelfWithoutAddress { node: String },
    #[error("{count} steered ports exceed the map capacity of {max}")]
    TooManyPorts { count: usize, max: u32 },
    #[error("port {port} has {count} backends, more than the map capacity of {max}")]
    TooManyBackends { port: PortId, count: usize, max: u32 },
    #[error("{count} nodes exceed the map capacity of {max}")]
    TooManyNodes { count: usize, max: u32 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub desired: Desired,
    pub problems: Vec<Problem>,
}

/// A hostPort one pod declares.
struct Claim {
    port: PortId,
    container_port: u16,
}

/// The hostPorts of a pod that st8s should steer, or the problems that keep it out.
fn pod_claims(pod: &Pod, name: &str, problems: &mut Vec<Problem>) -> Vec<Claim> {
    let mut claims = Vec::new();
    for port in &pod.host_ports {
        let host_port = port.host_port;
        let proto = match port.protocol.as_str() {
            "TCP" => Proto::Tcp,
            "UDP" => Proto::Udp,
            other => {
                problems.push(Problem::UnknownProtocol {
                    pod: name.to_owned(),
                    port: host_port,
                    protocol: other.to_owned(),
                });
                continue;
            }
        };
        let (Ok(hp), Ok(cp)) = (u16::try_from(host_port), u16::try_from(port.container_port)) else {
            problems.push(Problem::PortOutOfRange {
                pod: name.to_owned(),
                port: host_port,
            });
            continue;
        };
        if hp == 0 || cp == 0 {
            problems.push(Problem::PortOutOfRange {
                pod: name.to_owned(),
                port: host_port,
            });
            continue;
        }
        claims.push(Claim {
            port: PortId { port: hp, proto },
            container_port: cp,
        });
    }
    claims
}

/// The hostPorts a pod declares for discovery (`st8s.io/discovery: "7359/udp,1900/udp"`): each
/// must be one of its UDP hostPorts. Entries that are not are reported and left out.
fn discovery_ports(pod: &Pod, name: &str, claims: &[Claim], problems: &mut Vec<Problem>) -> BTreeSet<u16> {
    let Some(value) = pod.discovery.as_deref() else {
        return BTreeSet::new();
    };
    let mut ports = BTreeSet::new();
    for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let bad = |reason| Problem::BadDiscovery {
            pod: name.to_owned(),
            entry: entry.to_owned(),
            reason,
        };
        let (port, proto) = entry.split_once('/').unwrap_or((entry, "udp"));
        let Ok(port) = port.parse::<u16>() else {
            problems.push(bad("is not <port>/udp"));
            continue;
        };
        if !proto.eq_ignore_ascii_case("udp") {
            problems.push(bad(
                "is not UDP (discovery is broadcast and multicast, which are UDP)",
            ));
            continue;
        }
        let id = PortId {
            port,
            proto: Proto::Udp,
        };
        if !claims.iter().any(|c| c.port == id) {
            problems.push(bad("is not one of the pod's UDP hostPorts"));
            continue;
        }
        ports.insert(port);
    }
    ports
}

/// The pod that holds a hostPort on a node: (pod, IPv4 address, IPv6 address, containerPort,
/// discovery, draining).
type Owner = (String, Ipv4Addr, Option<Ipv6Addr>, u16, bool, bool);

/// A pod's first IPv4 and first IPv6 address, from `podIP` and `podIPs`.
fn pod_addresses(pod: &Pod) -> (Option<Ipv4Addr>, Option<Ipv6Addr>) {
    let all = || pod.ip.iter().chain(pod.ips.iter());
    (
        all().find_map(|a| a.parse().ok()),
        all().find_map(|a| a.parse().ok()),
    )
}

/// Turns the cluster into the table node `self_name` should run.
///
/// Every (hostPort, protocol) declared by a Ready pod on a Ready node becomes a steered port; the
/// pod's node becomes one of its backends. Pods annotated `st8s.io/steer: "false"` and
/// hostNetwork pods (the node itself already answers on their port) are left alone.
pub fn plan(cluster: &Cluster, self_name: &str) -> Result<Plan, PlanError> {
    let mut problems = Vec::new();
    let mut nodes = BTreeMap::new();
    let mut node_by_name = BTreeMap::new();
    for (name, node) in &cluster.nodes {
        let Some(addr) = node.addr else {
            problems.push(Problem::NodeWithoutAddress { node: name.clone() });
            continue;
        };
        let entry = NodeEntry {
            name: name.clone(),
            addr,
            addr6: node.addr6,
            ready: node.ready,
        };
        node_by_name.insert(name.clone(), entry.clone());
        nodes.insert(addr, entry);
    }
    let self_node = match (cluster.nodes.contains_key(self_name), node_by_name.get(self_name)) {
        (false, _) => {
            return Err(PlanError::UnknownNode {
                node: self_name.to_owned(),
            });
        }
        (true, None) => {
            return Err(PlanError::SelfWithoutAddress {
                node: self_name.to_owned(),
            });
        }
        (true, Some(n)) => n.clone(),
    };
    if nodes.len() > MAX_NODES as usize {
        return Err(PlanError::TooManyNodes {
            count: nodes.len(),
            max: MAX_NODES,
        });
    }

    let mut owners: BTreeMap<(PortId, String), Owner> = BTreeMap::new();
    // Ready pods first: a draining pod only keeps a hostPort that no Ready pod on its node took.
    // A terminating pod drains like a NotReady one (its TCP flows finish, no new flow).
    let mut pods: Vec<(&String, &Pod, bool)> = cluster
        .pods
        .iter()
        .map(|(n, p)| (n, p, p.ready && !p.terminating))
        .collect();
    pods.sort_by_key(|(_, _, ready)| !*ready);
    for (name, pod, ready) in pods {
        match pod.steer.as_deref() {
            None | Some("true") => {}
            Some("false") => continue,
            Some(other) => {
                problems.push(Problem::BadAnnotation {
                    pod: name.clone(),
                    value: other.to_owned(),
                });
                continue;
            }
        }
        if pod.host_network {
            continue;
        }
        let has_ip = pod.ip.is_some();
        if !ready && !has_ip {
            continue;
        }
        let mut claims = if ready {
            pod_claims(pod, name, &mut problems)
        } else {
            // Problems are reported for Ready pods; a draining pod's TCP ports are kept quietly.
            let mut ignored = Vec::new();
            pod_claims(pod, name, &mut ignored)
        };
        if !ready {
            claims.retain(|c| c.port.proto == Proto::Tcp);
        }
        if claims.is_empty() {
            continue;
        }
        let discovery = discovery_ports(pod, name, &claims, &mut problems);
        let Some(node) = pod.node.as_ref().and_then(|n| node_by_name.get(n)) else {
            continue;
        };
        if !node.ready {
            continue;
        }
        let Some(ip) = pod.ip.as_ref() else {
            problems.push(Problem::PodWithoutIp { pod: name.clone() });
            continue;
        };
        // podIP is the primary family's; on a dual-stack cluster podIPs has both (an
        // IPv6-primary cluster lists its IPv6 address first).
        let (v4, v6) = pod_addresses(pod);
        let Some(addr) = v4 else {
            let all = std::iter::once(ip.clone()).chain(pod.ips.iter().cloned());
            problems.push(Problem::PodIpNotIpv4 {
                pod: name.clone(),
                ip: all
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect::<Vec<_>>()
                    .join(","),
            });
            continue;
        };
        for claim in claims {
            let key = (claim.port, node.name.clone());
            if let Some((first, ..)) = owners.get(&key) {
                if !ready {
                    continue;
                }
                problems.push(Problem::HostPortConflict {
                    port: claim.port,
                    node: node.name.clone(),
                    first: first.clone(),
                    second: name.clone(),
                });
                continue;
            }
            let discovers = claim.port.proto == Proto::Udp && discovery.contains(&claim.port.port);
            owners.insert(
                key,
                (name.clone(), addr, v6, claim.container_port, discovers, !ready),
            );
        }
    }

    let mut ports: BTreeMap<PortId, PortPlan> = BTreeMap::new();
    for ((port, node_name), (pod, addr, addr6, container_port, discovery, draining)) in owners {
        let entry = ports.entry(port).or_default();
        let node = &node_by_name[&node_name];
        entry.backends.push(BackendEntry {
            node: node_name.clone(),
            node_addr: node.addr,
            pod: pod.clone(),
            draining,
        });
        if node_name == self_name {
            entry.local = Some(LocalBackend {
                pod,
                addr,
                addr6,
                port: container_port,
                discovery,
                draining,
            });
        }
    }
    if ports.len() > MAX_PORTS as usize {
        return Err(PlanError::TooManyPorts {
            count: ports.len(),
            max: MAX_PORTS,
        });
    }
    for (port, p) in &ports {
        if p.backends.len() > MAX_BACKENDS as usize {
            return Err(PlanError::TooManyBackends {
                port: *port,
                count: p.backends.len(),
                max: MAX_BACKENDS,
            });
        }
    }
    Ok(Plan {
        desired: Desired {
            self_node,
            nodes,
            ports,
        },
        problems,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::core::cluster::{HostPort, Node};

    pub fn node(name: &str, ip: &str, ready: bool) -> Node {
        Node {
            name: name.into(),
            addr: Some(ip.parse().expect("test address")),
            addr6: None,
            ready,
        }
    }

    /// A Ready pod in namespace `ns`.
    pub fn pod(name: &str, node: &str, ip: &str, ports: &[HostPort]) -> Pod {
        Pod {
            namespace: "ns".into(),
            name: name.into(),
            node: Some(node.into()),
            ip: (!ip.is_empty()).then(|| ip.into()),
            ready: true,
            host_ports: ports.to_vec(),
            ..Pod::default()
        }
    }

    pub fn cluster(nodes: Vec<Node>, pods: Vec<Pod>) -> Cluster {
        let mut c = Cluster::default();
        nodes.into_iter().for_each(|n| c.upsert_node(n));
        pods.into_iter().for_each(|p| c.upsert_pod(p));
        c
    }

    pub fn three_nodes() -> Vec<Node> {
        vec![
            node("node1", "10.0.0.11", true),
            node("node2", "10.0.0.12", true),
            node("node3", "10.0.0.13", true),
        ]
    }

    pub fn web() -> Vec<HostPort> {
        vec![HostPort::new(80, 8080, "TCP")]
    }

    fn dns() -> Vec<HostPort> {
        vec![HostPort::new(53, 53, "UDP"), HostPort::new(53, 53, "TCP")]
    }

    pub const WEB_PORT: PortId = PortId {
        port: 80,
        proto: Proto::Tcp,
    };

    #[test]
    fn discovery_ports_are_udp_hostports_of_the_local_pod() {
        let jellyfin = [
            HostPort::new(8096, 8096, "TCP"),
            HostPort::new(7359, 7359, "UDP"),
            HostPort::new(1900, 1900, "UDP"),
        ];
        let mut p = pod("jellyfin", "node1", "10.244.1.2", &jellyfin);
        p.discovery = Some("7359/udp, 1900, 8096/tcp, 5353/udp, x/udp".into());
        let c = cluster(three_nodes(), vec![p]);
        let p = plan(&c, "node1").expect("plans");
        let disc = |port: u16, proto: Proto| {
            p.desired.ports[&PortId { port, proto }]
                .local
                .as_ref()
                .map(|l| l.discovery)
        };
        assert_eq!(disc(7359, Proto::Udp), Some(true));
        assert_eq!(disc(1900, Proto::Udp), Some(true), "udp is the default");
        assert_eq!(disc(8096, Proto::Tcp), Some(false));
        let text: Vec<String> = p.problems.iter().map(|e| e.to_string()).collect();
        assert_eq!(p.problems.len(), 3, "{text:?}");
        assert!(
            text.iter()
                .any(|t| t.contains("8096/tcp") && t.contains("not UDP")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|t| t.contains("5353/udp") && t.contains("hostPorts")),
            "{text:?}"
        );
        assert!(text.iter().any(|t| t.contains("x/udp")), "{text:?}");
        // Another node sees the port, but no local pod, so it delivers nothing.
        let p2 = plan(&c, "node2").expect("plans");
        assert!(
            p2.desired.ports[&PortId {
                port: 7359,
                proto: Proto::Udp
            }]
                .local
                .is_none()
        );
    }

    #[test]
    fn unreachable_nodes_lose_their_backends_but_never_this_node() {
        let c = cluster(
            three_nodes(),
            vec![
                pod("web-a", "node1", "10.244.1.2", &web()),
                pod("web-b", "node2", "10.244.2.2", &web()),
            ],
        );
        let d = plan(&c, "node1").expect("plans").desired;
        let nodes = |d: &Desired| -> Vec<String> {
            d.ports[&WEB_PORT]
                .backends
                .iter()
                .map(|b| b.node.clone())
                .collect()
        };
        let unreachable: BTreeSet<Ipv4Addr> =
            ["10.0.0.11".parse().expect("a"), "10.0.0.12".parse().expect("a")].into();
        let cut = d.without_nodes(&unreachable);
        assert_eq!(nodes(&cut), ["node1"], "node2 is gone, node1 is this node");
        assert!(cut.ports[&WEB_PORT].local.is_some());
        assert_eq!(nodes(&d.without_nodes(&BTreeSet::new())), ["node1", "node2"]);
        // Seen from node3, which has no backend: with both backends silent, both stay.
        let d3 = plan(&c, "node3").expect("plans").desired;
        assert_eq!(
            nodes(&d3.without_nodes(&unreachable)),
            ["node1", "node2"],
            "panic mode"
        );
        let one: BTreeSet<Ipv4Addr> = ["10.0.0.12".parse().expect("a")].into();
        assert_eq!(nodes(&d3.without_nodes(&one)), ["node1"]);
    }

    #[test]
    fn every_ready_hostport_is_steered_on_every_node() {
        let c = cluster(
            three_nodes(),
            vec![
                pod("web-a", "node1", "10.244.1.2", &web()),
                pod("dns", "node2", "10.244.2.2", &dns()),
            ],
        );
        let p = plan(&c, "node3").expect("plans");
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        let ids: Vec<String> = p.desired.ports.keys().map(|k| k.to_string()).collect();
        assert_eq!(ids, ["53/tcp", "53/udp", "80/tcp"]);
        let web = &p.desired.ports[&WEB_PORT];
        assert_eq!(web.backends.len(), 1);
        assert_eq!(web.backends[0].node, "node1");
        assert_eq!(web.local, None, "node3 runs no web pod");
        let on_node1 = plan(&c, "node1").expect("plans");
        let local = on_node1.desired.ports[&WEB_PORT].local.clone();
        assert_eq!(
            local,
            Some(LocalBackend {
                pod: "ns/web-a".into(),
                addr: "10.244.1.2".parse().expect("test address"),
                addr6: None,
                port: 8080,
                discovery: false,
                draining: false,
            })
        );
    }

    #[test]
    fn opted_out_not_ready_and_host_network_pods_are_left_alone() {
        let mut off = pod("off", "node1", "10.244.1.2", &web());
        off.steer = Some("false".into());
        let mut hostnet = pod("hostnet", "node2", "10.0.0.12", &[HostPort::new(81, 81, "TCP")]);
        hostnet.host_network = true;
        let mut unready = pod("unready", "node3", "10.244.3.2", &[HostPort::new(82, 82, "TCP")]);
        unready.ready = false;
        let mut unready_dns = pod(
            "unready-dns",
            "node3",
            "10.244.3.3",
            &[HostPort::new(53, 53, "UDP")],
        );
        unready_dns.ready = false;
        let p = plan(
            &cluster(three_nodes(), vec![off, hostnet, unready, unready_dns]),
            "node1",
        )
        .expect("plans");
        // A NotReady pod takes no new flow: its TCP port is kept only as draining (flows it
        // already has finish), its UDP port not at all.
        let unready = PortId {
            port: 82,
            proto: Proto::Tcp,
        };
        assert_eq!(p.desired.ports.len(), 1, "{:?}", p.desired.ports);
        assert!(p.desired.ports[&unready].backends.iter().all(|b| b.draining));
        assert!(p.problems.is_empty());
    }

    #[test]
    fn a_daemonset_on_every_node_of_the_largest_cluster_lists_them_all() {
        // Addresses for up to 65,535 nodes: 10.0.<i / 256>.<i % 256>.
        let addr = |i: usize, net: u8| format!("10.{net}.{}.{}", i / 256, i % 256);
        let nodes = |n: usize| -> Vec<Node> {
            (1..=n)
                .map(|i| node(&format!("node{i}"), &addr(i, 0), true))
                .collect()
        };
        let pods = |n: usize| -> Vec<Pod> {
            (1..=n)
                .map(|i| pod(&format!("web{i}"), &format!("node{i}"), &addr(i, 244), &web()))
                .collect()
        };
        let p = plan(&cluster(nodes(20), pods(20)), "node1").expect("plans");
        assert_eq!(p.desired.ports[&WEB_PORT].backends.len(), 20);
        // A port holds as many backends as a cluster has nodes.
        assert_eq!(MAX_BACKENDS, MAX_NODES);
        let max = MAX_NODES as usize;
        let p = plan(&cluster(nodes(max), pods(max)), "node1").expect("plans");
        assert_eq!(p.desired.ports[&WEB_PORT].backends.len(), max);
        assert!(matches!(
            plan(&cluster(nodes(max + 1), pods(max + 1)), "node1"),
            Err(PlanError::TooManyNodes { count, .. }) if count == max + 1
        ));
    }

    #[test]
    fn a_terminating_pod_drains_although_it_is_still_ready() {
        let mut going = pod("going", "node2", "10.244.2.2", &[HostPort::new(80, 8080, "TCP")]);
        going.terminating = true;
        let mut going_dns = pod(
            "going-dns",
            "node2",
            "10.244.2.3",
            &[HostPort::new(53, 53, "UDP")],
        );
        going_dns.terminating = true;
        let stay = pod("stay", "node1", "10.244.1.2", &[HostPort::new(80, 8080, "TCP")]);
        let p = plan(&cluster(three_nodes(), vec![going, going_dns, stay]), "node3").expect("plans");
        let web = &p.desired.ports[&WEB_PORT];
        let by_node: Vec<(&str, bool)> = web
            .backends
            .iter()
            .map(|b| (b.node.as_str(), b.draining))
            .collect();
        assert_eq!(
            by_node,
            [("node1", false), ("node2", true)],
            "its TCP flows finish, new ones go elsewhere"
        );
        assert!(
            !p.desired.ports.keys().any(|k| k.port == 53),
            "UDP has no connection to finish: the port goes"
        );
    }

    #[test]
    fn a_ready_pod_wins_a_hostport_over_a_draining_one() {
        let mut old = pod("old", "node1", "10.244.1.2", &web());
        old.ready = false;
        let new = pod("new", "node1", "10.244.1.3", &web());
        let p = plan(&cluster(three_nodes(), vec![old, new]), "node1").expect("plans");
        let web = &p.desired.ports[&WEB_PORT];
        assert_eq!(web.backends.len(), 1);
        assert_eq!(
            (web.backends[0].pod.as_str(), web.backends[0].draining),
            ("ns/new", false)
        );
        assert!(
            p.problems.is_empty(),
            "no conflict reported for a draining pod: {:?}",
            p.problems
        );
    }

    #[test]
    fn pods_on_not_ready_nodes_are_not_backends() {
        let c = cluster(
            vec![
                node("node1", "10.0.0.11", true),
                node("node2", "10.0.0.12", false),
            ],
            vec![pod("web", "node2", "10.244.2.2", &web())],
        );
        let p = plan(&c, "node1").expect("plans");
        assert!(p.desired.ports.is_empty());
        assert_eq!(p.desired.nodes.len(), 2, "a NotReady node is still a known peer");
    }

    #[test]
    fn backends_are_sorted_by_node_name() {
        let c = cluster(
            three_nodes(),
            vec![
                pod("w3", "node3", "10.244.3.2", &web()),
                pod("w1", "node1", "10.244.1.2", &web()),
            ],
        );
        let p = plan(&c, "node2").expect("plans");
        let names: Vec<_> = p.desired.ports[&WEB_PORT]
            .backends
            .iter()
            .map(|b| b.node.as_str())
            .collect();
        assert_eq!(names, ["node1", "node3"]);
    }

    #[test]
    fn bad_objects_are_named() {
        let mut nodes = three_nodes();
        nodes.push(Node {
            name: "noaddr".into(),
            addr: None,
            addr6: None,
            ready: true,
        });
        let mut weird = pod("weird", "node1", "10.244.1.3", &web());
        weird.steer = Some("maybe".into());
        let pods = vec![
            pod("sctp", "node1", "10.244.1.2", &[HostPort::new(9, 9, "SCTP")]),
            pod("noip", "node1", "", &web()),
            weird,
            pod("a", "node2", "10.244.2.2", &web()),
            pod("b", "node2", "10.244.2.3", &web()),
            pod("v6", "node3", "fd00::2", &web()),
            pod("huge", "node3", "10.244.3.2", &[HostPort::new(70000, 80, "TCP")]),
        ];
        let p = plan(&cluster(nodes, pods), "node1").expect("plans");
        let text: Vec<String> = p.problems.iter().map(|e| e.to_string()).collect();
        let all = text.join("\n");
        assert!(all.contains("node noaddr: no InternalIP"), "{all}");
        assert!(all.contains("ns/sctp") && all.contains("SCTP"), "{all}");
        assert!(
            all.contains("pod ns/noip: Ready with hostPorts but no podIP"),
            "{all}"
        );
        assert!(all.contains("ns/weird") && all.contains("maybe"), "{all}");
        assert!(
            all.contains("pods ns/a and ns/b both claim hostPort 80/tcp on node node2"),
            "{all}"
        );
        assert!(all.contains("ns/v6") && all.contains("no IPv4 address"), "{all}");
        assert!(all.contains("ns/huge: port 70000 is out of range"), "{all}");
        assert_eq!(p.problems.len(), 7, "{all}");
    }

    /// Dual-stack clusters: a pod's podIP is its primary family's (IPv6 first on an
    /// IPv6-primary cluster), and podIPs lists both. The pod is steered by its IPv4 address,
    /// whichever comes first, and the plan keeps the IPv6 ones of pods and nodes.
    #[test]
    fn dual_stack_pods_are_steered_by_their_ipv4_address_whichever_family_is_primary() {
        let mut nodes = three_nodes();
        nodes[0].addr6 = Some("fd00:77::11".parse().expect("a"));
        let mut v6_primary = pod("v6first", "node1", "fd00:244:1::5", &web());
        v6_primary.ips = vec!["fd00:244:1::5".into(), "10.244.1.5".into()];
        let mut v4_primary = pod("v4first", "node2", "10.244.2.5", &web());
        v4_primary.ips = vec!["10.244.2.5".into(), "fd00:244:2::5".into()];
        let mut v6_only = pod("v6only", "node3", "fd00:244:3::5", &web());
        v6_only.ips = vec!["fd00:244:3::5".into()];
        let p = plan(&cluster(nodes, vec![v6_primary, v4_primary, v6_only]), "node1").expect("plans");
        let port = &p.desired.ports[&PortId {
            port: 80,
            proto: Proto::Tcp,
        }];
        let local = port.local.as_ref().expect("node1's pod");
        assert_eq!(local.addr, "10.244.1.5".parse::<Ipv4Addr>().expect("a"));
        assert_eq!(local.addr6, Some("fd00:244:1::5".parse().expect("a")));
        assert_eq!(
            port.backends.iter().map(|b| b.node.as_str()).collect::<Vec<_>>(),
            ["node1", "node2"],
            "the IPv6-only pod is not a backend"
        );
        assert_eq!(p.desired.self_node.addr6, Some("fd00:77::11".parse().expect("a")));
        let all: Vec<String> = p.problems.iter().map(ToString::to_string).collect();
        assert_eq!(all.len(), 1, "{all:?}");
        assert!(
            all[0].contains("ns/v6only") && all[0].contains("fd00:244:3::5"),
            "{all:?}"
        );
    }

    #[test]
    fn self_must_exist_with_an_address() {
        let c = cluster(three_nodes(), vec![]);
        assert_eq!(
            plan(&c, "nope"),
            Err(PlanError::UnknownNode { node: "nope".into() })
        );
        let bare = Node {
            name: "bare".into(),
            addr: None,
            addr6: None,
            ready: true,
        };
        assert_eq!(
            plan(&cluster(vec![bare], vec![]), "bare"),
            Err(PlanError::SelfWithoutAddress { node: "bare".into() })
        );
    }

    #[test]
    fn too_many_ports_is_an_error_not_a_partial_table() {
        let ports: Vec<HostPort> = (1..=MAX_PORTS as i32 + 1)
            .map(|p| HostPort::new(p, p, "TCP"))
            .collect();
        let c = cluster(three_nodes(), vec![pod("big", "node1", "10.244.1.2", &ports)]);
        assert!(matches!(plan(&c, "node1"), Err(PlanError::TooManyPorts { .. })));
    }
}
