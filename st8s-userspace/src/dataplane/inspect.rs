//! `st8s inspect`: the live steering table and counters, decoded from the pinned maps.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

use anyhow::Context as _;
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use st8s_common::{
    Addr6, BACKEND_LOCAL, Backend, CONFIG_PREFER_LOCAL, CONFIG_TC_NETLINK, CONFIG_XDP_FORWARDS, Config,
    Counters, FLOW_LOCAL, FlowKey, FlowKey6, FlowValue, GLOBAL_COUNTER_SLOT, PortInfo, PortKey, addr6_octets,
    map_names, program_names,
};

use super::{net::format_mac, open_pinned};
use crate::core::Proto;

fn addr(be: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be(be))
}

/// A discovery pod's sockets: its IPv4 one, then its IPv6 one if it has an IPv6 address.
fn discovery_pods(d: &st8s_common::Discovery) -> Vec<String> {
    let port = u16::from_be(d.pod_port_be);
    let v4 = SocketAddr::new(addr(d.pod_addr_be).into(), port);
    let v6 = addr6(d.pod_addr6).map(|a| SocketAddr::new(a.into(), port));
    std::iter::once(v4).chain(v6).map(|a| a.to_string()).collect()
}

fn discovery_mac(d: &st8s_common::Discovery) -> Option<String> {
    (d.pod_mac != [0; 6]).then(|| format_mac(&d.pod_mac))
}

/// An IPv6 address from a map, `None` when all zeros ("none").
fn addr6(a: [u32; 4]) -> Option<Ipv6Addr> {
    (a != [0; 4]).then(|| Ipv6Addr::from(addr6_octets(a)))
}

/// A tracked flow of either family (`ST8S_FLOWS`, `ST8S_FLOWS6`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub client: SocketAddr,
    pub frontend: SocketAddr,
    pub proto: u8,
    pub value: FlowValue,
}

impl Flow {
    fn new(client: IpAddr, frontend: IpAddr, ports_be: (u16, u16), proto: u8, value: FlowValue) -> Self {
        Flow {
            client: SocketAddr::new(client, u16::from_be(ports_be.0)),
            frontend: SocketAddr::new(frontend, u16::from_be(ports_be.1)),
            proto,
            value,
        }
    }

    /// A flow of `ST8S_FLOWS`; `frontend`: this node's address, which every tracked flow is to.
    fn from_v4(k: FlowKey, value: FlowValue, frontend_be: u32) -> Self {
        let (c, f) = (addr(k.client_addr_be), addr(frontend_be));
        Flow::new(
            c.into(),
            f.into(),
            (k.client_port_be, k.frontend_port_be),
            k.proto,
            value,
        )
    }

    fn from_v6(k: FlowKey6, value: FlowValue, frontend: Addr6) -> Self {
        let c = Ipv6Addr::from(addr6_octets(k.client_addr));
        let f = Ipv6Addr::from(addr6_octets(frontend));
        Flow::new(
            c.into(),
            f.into(),
            (k.client_port_be, k.frontend_port_be),
            k.proto,
            value,
        )
    }

    /// `local` or `remote`, as `st8s inspect` shows it.
    pub fn kind(&self) -> &'static str {
        if self.value.kind == FLOW_LOCAL {
            "local"
        } else {
            "remote"
        }
    }

    /// The local pod (its IPv4 address, which names it for both families, and containerPort),
    /// or the node the flow is forwarded to.
    fn backend(&self) -> String {
        let v = &self.value;
        if v.kind == FLOW_LOCAL {
            format!("{}:{}", addr(v.backend_addr_be), u16::from_be(v.backend_port_be))
        } else {
            addr(v.backend_addr_be).to_string()
        }
    }

    fn frontend_with_proto(&self) -> String {
        let proto = Proto::from_number(self.proto)
            .map(|p| p.to_string())
            .unwrap_or_default();
        format!("{}/{proto}", self.frontend)
    }
}

/// Everything `st8s inspect` shows, read once.
pub struct Snapshot {
    pub config: Config,
    pub ports: Vec<(PortKey, PortInfo, Vec<Backend>, Counters)>,
    pub global: Counters,
    /// Both families' flows, newest first.
    pub flows: Vec<Flow>,
    pub nodes: Vec<Ipv4Addr>,
    /// Reply translations of both families.
    pub revnat_entries: usize,
    /// Discovery ports of this node's pods: (hostPort, entry), by port.
    pub discovery: Vec<(u16, st8s_common::Discovery)>,
    /// The socket hooks are attached (their links are pinned): clients on the node itself are
    /// steered.
    pub local_clients: bool,
}

pub fn snapshot(dir: &Path) -> anyhow::Result<Snapshot> {
    let config: Array<MapData, Config> = Array::try_from(open_pinned(dir, map_names::CONFIG)?)?;
    let config = config.get(&0, 0).context("reading ST8S_CONFIG")?;
    let ports: HashMap<MapData, PortKey, PortInfo> = HashMap::try_from(open_pinned(dir, map_names::PORTS)?)?;
    let backends: Array<MapData, Backend> = Array::try_from(open_pinned(dir, map_names::BACKENDS)?)?;
    let counters: PerCpuArray<MapData, Counters> =
        PerCpuArray::try_from(open_pinned(dir, map_names::COUNTERS)?)?;
    let flows: HashMap<MapData, FlowKey, FlowValue> = HashMap::try_from(open_pinned(dir, map_names::FLOWS)?)?;
    let nodes: HashMap<MapData, u32, st8s_common::NodeInfo> =
        HashMap::try_from(open_pinned(dir, map_names::NODES)?)?;

    let sum = |slot: u32| summed(&counters, slot);
    let mut out = Vec::new();
    for entry in ports.iter() {
        let (k, v) = entry.context("reading ST8S_PORTS")?;
        let mut bs = Vec::new();
        for i in 0..u32::from(v.backend_count) {
            let b = backends
                .get(&v.backend_index(i), 0)
                .context("reading ST8S_BACKENDS")?;
            // A place its node left (`BACKEND_VACANT`) is no backend.
            if b.flags & st8s_common::BACKEND_VACANT == 0 {
                bs.push(b);
            }
        }
        out.push((k, v, bs, sum(u32::from(v.slot))?));
    }
    out.sort_by_key(|(k, ..)| (u16::from_be(k.port_be), k.proto));
    let flows6: HashMap<MapData, FlowKey6, FlowValue> =
        HashMap::try_from(open_pinned(dir, map_names::FLOWS6)?)?;
    let mut fl = Vec::new();
    for entry in flows.iter() {
        let (k, v) = entry.context("reading ST8S_FLOWS")?;
        fl.push(Flow::from_v4(k, v, config.self_addr_be));
    }
    for entry in flows6.iter() {
        let (k, v) = entry.context("reading ST8S_FLOWS6")?;
        fl.push(Flow::from_v6(k, v, config.self_addr6));
    }
    fl.sort_by_key(|f| std::cmp::Reverse(f.value.created_ns));
    let mut ns = Vec::new();
    for k in nodes.keys() {
        ns.push(addr(k.context("reading ST8S_NODES")?));
    }
    ns.sort();
    let revnat: HashMap<MapData, st8s_common::RevNatKey, st8s_common::RevNatValue> =
        HashMap::try_from(open_pinned(dir, map_names::REVNAT)?)?;
    let revnat6: HashMap<MapData, st8s_common::RevNatKey6, st8s_common::RevNatValue6> =
        HashMap::try_from(open_pinned(dir, map_names::REVNAT6)?)?;
    let revnat_entries =
        revnat.keys().filter(Result::is_ok).count() + revnat6.keys().filter(Result::is_ok).count();
    let discovery: HashMap<MapData, u32, st8s_common::Discovery> =
        HashMap::try_from(open_pinned(dir, map_names::DISCOVERY)?)?;
    let mut disc = Vec::new();
    for entry in discovery.iter() {
        let (k, v) = entry.context("reading ST8S_DISCOVERY")?;
        disc.push((k as u16, v));
    }
    disc.sort_by_key(|(k, _)| *k);
    let local_clients = program_names::SOCKET
        .iter()
        .all(|name| super::pins::link_path(dir, name).exists());
    Ok(Snapshot {
        revnat_entries,
        discovery: disc,
        local_clients,
        config,
        ports: out,
        global: sum(GLOBAL_COUNTER_SLOT)?,
        flows: fl,
        nodes: ns,
    })
}

pub fn port_name(k: &PortKey) -> String {
    match Proto::from_number(k.proto) {
        Some(p) => format!("{}/{p}", u16::from_be(k.port_be)),
        None => format!("{}/{}", u16::from_be(k.port_be), k.proto),
    }
}

/// How the TC programs are attached, from the config's flags.
fn tc_mode(flags: u32) -> &'static str {
    if flags & CONFIG_TC_NETLINK != 0 {
        "netlink"
    } else {
        "tcx"
    }
}

pub fn render(s: &Snapshot, max_flows: usize) -> String {
    let mut o = String::new();
    let c = &s.config;
    let _ = writeln!(
        o,
        "node {}{}  uplink ifindex {}  mac {}  xdp forwards: {}  tc: {}  prefer local: {}",
        addr(c.self_addr_be),
        addr6(c.self_addr6).map_or(String::new(), |a| format!(" {a}")),
        c.uplink_ifindex,
        format_mac(&c.self_mac),
        if c.flags & CONFIG_XDP_FORWARDS != 0 {
            "yes"
        } else {
            "no (tc)"
        },
        tc_mode(c.flags),
        if c.flags & CONFIG_PREFER_LOCAL != 0 {
            "yes"
        } else {
            "no"
        },
    );
    let _ = writeln!(
        o,
        "local clients (this node's processes and pods): {}",
        if s.local_clients {
            "steered at the cgroup socket hooks"
        } else {
            "not steered (no cgroup v2 socket hooks attached)"
        }
    );
    let _ = writeln!(
        o,
        "nodes: {}",
        s.nodes
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "{:<9} {:<34} {:<34} {:>15} {:>9} {:>7} {:>6} {:>14} {:>21} {:>10} {:>10} {:>12} {:>13} {:>9} {:>11}",
        "PORT",
        "BACKENDS",
        "LOCAL",
        "DELIVERED_LOCAL",
        "FORWARDED",
        "REPLIED",
        "PASSED",
        "UNTRUSTED_PEER",
        "DROP_NO_LOCAL_BACKEND",
        "DROP_ERROR",
        "DISCOVERED",
        "SOCKET_LOCAL",
        "SOCKET_REMOTE",
        "FRAGMENTS",
        "ICMP_ERRORS"
    );
    for (k, v, bs, n) in &s.ports {
        let backends = bs
            .iter()
            .map(|b| {
                let a = addr(b.node_addr_be);
                if b.flags & BACKEND_LOCAL != 0 {
                    format!("{a}(self)")
                } else {
                    a.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join(",");
        let local = if v.has_local != 0 {
            format!("{}:{}", addr(v.local_addr_be), u16::from_be(v.local_port_be))
        } else {
            "-".into()
        };
        // A dual-stack pod: its IPv6 address takes the port's IPv6 flows.
        let local = match addr6(v.local_addr6).filter(|_| v.has_local != 0) {
            Some(a6) => format!("{local},[{a6}]"),
            None => local,
        };
        let _ = writeln!(
            o,
            "{:<9} {:<34} {:<34} {:>15} {:>9} {:>7} {:>6} {:>14} {:>21} {:>10} {:>10} {:>12} {:>13} {:>9} {:>11}",
            port_name(k),
            backends,
            local,
            n.delivered_local,
            n.forwarded,
            n.replied,
            n.passed,
            n.untrusted_peer,
            n.drop_no_local_backend,
            n.drop_error,
            n.discovered,
            n.socket_local,
            n.socket_remote,
            n.fragments,
            n.icmp_errors
        );
    }
    if !s.discovery.is_empty() {
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "discovery (broadcast and multicast copied to the local pod): {}",
            s.discovery
                .iter()
                .map(|(port, d)| format!(
                    "{port}/udp -> {}{} (link {})",
                    discovery_pods(d).join(" "),
                    discovery_mac(d).map(|m| format!(" mac {m}")).unwrap_or_default(),
                    d.ifindex
                ))
                .collect::<Vec<_>>()
                .join("  ")
        );
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "flows: {} tracked (newest first, at most {max_flows} shown)",
        s.flows.len()
    );
    let _ = writeln!(
        o,
        "{:<22} {:<22} {:<6} {:<22}",
        "CLIENT", "FRONTEND", "KIND", "BACKEND"
    );
    for f in s.flows.iter().take(max_flows) {
        let _ = writeln!(
            o,
            "{:<22} {:<22} {:<6} {:<22}",
            f.client.to_string(),
            f.frontend_with_proto(),
            f.kind(),
            f.backend()
        );
    }
    let g = &s.global;
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "not tied to a port: {}",
        without_port(g)
            .iter()
            .map(|(n, v)| format!("{n} {v}"))
            .collect::<Vec<_>>()
            .join("  ")
    );
    o
}

/// `st8s inspect --output json`: the snapshot with stable field names, those of the maps and of
/// the metrics' labels (`port` as `80/tcp`, counters by their `result` label), for scripts and
/// `kubectl exec`. It parses back into itself.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InspectJson {
    pub node_addr: Ipv4Addr,
    /// The node's IPv6 address, when IPv6 is steered.
    #[serde(default)]
    pub node_addr6: Option<Ipv6Addr>,
    pub uplink_ifindex: u32,
    pub mac: String,
    pub xdp_forwards: bool,
    /// `tcx` or `netlink`, as the agent attached the TC programs.
    pub tc_attach: String,
    pub prefer_local: bool,
    pub local_clients_steered: bool,
    pub nodes: Vec<Ipv4Addr>,
    pub ports: Vec<PortJson>,
    pub discovery: Vec<DiscoveryJson>,
    pub flows: Vec<FlowJson>,
    /// Flows in `ST8S_FLOWS` (all of them; `flows` lists the newest).
    pub flow_entries: usize,
    pub revnat_entries: usize,
    /// Counters not tied to a port.
    pub global: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortJson {
    pub port: String,
    pub backends: Vec<BackendJson>,
    /// The backend pod on this node, `address:containerPort`.
    pub local: Option<String>,
    /// Its IPv6 address on a dual-stack cluster, `[address]:containerPort`.
    #[serde(default)]
    pub local6: Option<String>,
    pub counters: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BackendJson {
    pub node_addr: Ipv4Addr,
    /// This node's own backend.
    pub local: bool,
    pub draining: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiscoveryJson {
    pub port: String,
    pub pod: String,
    /// The pod's IPv6 address and port, when it has one.
    #[serde(default)]
    pub pod6: Option<String>,
    /// The pod's MAC, by which its IPv6 multicast is known; once learned.
    #[serde(default)]
    pub pod_mac: Option<String>,
    /// The ifindex of the pod's link, where the copies are sent.
    pub link: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FlowJson {
    pub client: String,
    pub frontend: String,
    /// `local` or `remote`.
    pub kind: String,
    pub backend: String,
}

fn counter_map(c: &Counters) -> BTreeMap<String, u64> {
    by_result(c).into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// The snapshot as [`InspectJson`], with at most `max_flows` flows listed.
pub fn to_json(s: &Snapshot, max_flows: usize) -> InspectJson {
    let c = &s.config;
    InspectJson {
        node_addr: addr(c.self_addr_be),
        node_addr6: addr6(c.self_addr6),
        uplink_ifindex: c.uplink_ifindex,
        mac: format_mac(&c.self_mac),
        xdp_forwards: c.flags & CONFIG_XDP_FORWARDS != 0,
        tc_attach: tc_mode(c.flags).to_owned(),
        prefer_local: c.flags & CONFIG_PREFER_LOCAL != 0,
        local_clients_steered: s.local_clients,
        nodes: s.nodes.clone(),
        ports: s
            .ports
            .iter()
            .map(|(k, v, bs, n)| PortJson {
                port: port_name(k),
                backends: bs
                    .iter()
                    .map(|b| BackendJson {
                        node_addr: addr(b.node_addr_be),
                        local: b.flags & BACKEND_LOCAL != 0,
                        draining: b.flags & st8s_common::BACKEND_DRAINING != 0,
                    })
                    .collect(),
                local: (v.has_local != 0)
                    .then(|| format!("{}:{}", addr(v.local_addr_be), u16::from_be(v.local_port_be))),
                local6: addr6(v.local_addr6)
                    .filter(|_| v.has_local != 0)
                    .map(|a| SocketAddr::new(a.into(), u16::from_be(v.local_port_be)).to_string()),
                counters: counter_map(n),
            })
            .collect(),
        discovery: s
            .discovery
            .iter()
            .map(|(port, d)| {
                let mut pods = discovery_pods(d).into_iter();
                DiscoveryJson {
                    port: format!("{port}/udp"),
                    pod: pods.next().unwrap_or_default(),
                    pod6: pods.next(),
                    pod_mac: discovery_mac(d),
                    link: d.ifindex,
                }
            })
            .collect(),
        flows: s
            .flows
            .iter()
            .take(max_flows)
            .map(|f| FlowJson {
                client: f.client.to_string(),
                frontend: f.frontend_with_proto(),
                kind: f.kind().to_owned(),
                backend: f.backend(),
            })
            .collect(),
        flow_entries: s.flows.len(),
        revnat_entries: s.revnat_entries,
        global: without_port(&s.global)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
    }
}

/// Counters per port name, for tests and scripts.
pub fn counters_by_port(s: &Snapshot) -> BTreeMap<String, Counters> {
    s.ports.iter().map(|(k, _, _, c)| (port_name(k), *c)).collect()
}

/// A counter slot summed over the CPUs.
fn summed(counters: &PerCpuArray<MapData, Counters>, slot: u32) -> anyhow::Result<Counters> {
    let mut total = Counters::default();
    for c in counters.get(&slot, 0).context("reading ST8S_COUNTERS")?.iter() {
        total.add(c);
    }
    Ok(total)
}

/// The counters of packets st8s cannot tie to a port (the global slot), by reason.
pub fn without_port(c: &Counters) -> [(&'static str, u64); 4] {
    [
        ("drop_error", c.drop_error),
        ("frag_untracked", c.frag_untracked),
        ("frag_invalid", c.frag_invalid),
        ("ext_headers", c.ext_headers),
    ]
}

/// The global slot's counters, summed over the CPUs.
pub fn global_counters(dir: &Path) -> anyhow::Result<Counters> {
    let counters: PerCpuArray<MapData, Counters> =
        PerCpuArray::try_from(open_pinned(dir, map_names::COUNTERS)?)?;
    summed(&counters, GLOBAL_COUNTER_SLOT)
}

/// The counters a port keeps, by the name `st8s inspect` and the metrics give each.
pub fn by_result(c: &Counters) -> [(&'static str, u64); 12] {
    [
        ("delivered_local", c.delivered_local),
        ("forwarded", c.forwarded),
        ("replied", c.replied),
        ("passed", c.passed),
        ("untrusted_peer", c.untrusted_peer),
        ("drop_no_local_backend", c.drop_no_local_backend),
        ("drop_error", c.drop_error),
        ("discovered", c.discovered),
        ("socket_local", c.socket_local),
        ("socket_remote", c.socket_remote),
        ("fragments", c.fragments),
        ("icmp_errors", c.icmp_errors),
    ]
}

/// Each steered port's counters, summed over the CPUs: only the port registry and the counter
/// array are read (a scrape's worth).
pub fn port_counters(dir: &Path) -> anyhow::Result<Vec<(String, Counters)>> {
    let ports: HashMap<MapData, PortKey, PortInfo> = HashMap::try_from(open_pinned(dir, map_names::PORTS)?)?;
    let counters: PerCpuArray<MapData, Counters> =
        PerCpuArray::try_from(open_pinned(dir, map_names::COUNTERS)?)?;
    let mut out = Vec::new();
    for entry in ports.iter() {
        let (k, v) = entry.context("reading ST8S_PORTS")?;
        out.push((port_name(&k), summed(&counters, u32::from(v.slot))?));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// How many entries each map holds (keys only are walked: this is the background census, not
/// a scrape).
pub fn map_entries(dir: &Path) -> anyhow::Result<Vec<(&'static str, usize)>> {
    let ports: HashMap<MapData, PortKey, PortInfo> = HashMap::try_from(open_pinned(dir, map_names::PORTS)?)?;
    let nodes: HashMap<MapData, u32, st8s_common::NodeInfo> =
        HashMap::try_from(open_pinned(dir, map_names::NODES)?)?;
    let flows: HashMap<MapData, FlowKey, FlowValue> = HashMap::try_from(open_pinned(dir, map_names::FLOWS)?)?;
    let revnat: HashMap<MapData, st8s_common::RevNatKey, st8s_common::RevNatValue> =
        HashMap::try_from(open_pinned(dir, map_names::REVNAT)?)?;
    let flows6: HashMap<MapData, FlowKey6, FlowValue> =
        HashMap::try_from(open_pinned(dir, map_names::FLOWS6)?)?;
    let revnat6: HashMap<MapData, st8s_common::RevNatKey6, st8s_common::RevNatValue6> =
        HashMap::try_from(open_pinned(dir, map_names::REVNAT6)?)?;
    Ok(vec![
        (map_names::PORTS, ports.keys().filter(Result::is_ok).count()),
        (map_names::NODES, nodes.keys().filter(Result::is_ok).count()),
        (map_names::FLOWS, flows.keys().filter(Result::is_ok).count()),
        (map_names::REVNAT, revnat.keys().filter(Result::is_ok).count()),
        (map_names::FLOWS6, flows6.keys().filter(Result::is_ok).count()),
        (map_names::REVNAT6, revnat6.keys().filter(Result::is_ok).count()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_output_round_trips_with_the_metric_names() {
        let be = |a: &str| u32::from(a.parse::<Ipv4Addr>().expect("ip")).to_be();
        let s = Snapshot {
            config: Config {
                self_addr_be: be("10.77.0.11"),
                uplink_ifindex: 2,
                flags: CONFIG_PREFER_LOCAL,
                self_mac: [2, 0, 0, 0, 0, 1],
                ..Config::default()
            },
            ports: vec![(
                PortKey {
                    port_be: 80u16.to_be(),
                    proto: 6,
                    ..PortKey::default()
                },
                PortInfo {
                    has_local: 1,
                    local_addr_be: be("10.244.1.11"),
                    local_port_be: 8080u16.to_be(),
                    backend_count: 1,
                    ..PortInfo::default()
                },
                vec![Backend {
                    node_addr_be: be("10.77.0.11"),
                    flags: BACKEND_LOCAL,
                    ..Backend::default()
                }],
                Counters {
                    delivered_local: 3,
                    socket_local: 2,
                    ..Counters::default()
                },
            )],
            global: Counters::default(),
            flows: Vec::new(),
            nodes: vec!["10.77.0.11".parse().expect("ip")],
            revnat_entries: 4,
            discovery: Vec::new(),
            local_clients: true,
        };
        let j = to_json(&s, 10);
        let text = serde_json::to_string(&j).expect("json");
        let back: InspectJson = serde_json::from_str(&text).expect("parses");
        assert_eq!(back, j);
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(v["ports"][0]["port"], "80/tcp");
        assert_eq!(v["ports"][0]["local"], "10.244.1.11:8080");
        assert_eq!(v["ports"][0]["counters"]["delivered_local"], 3);
        assert_eq!(v["ports"][0]["counters"]["socket_local"], 2);
        assert_eq!(v["ports"][0]["backends"][0]["local"], true);
        assert_eq!(v["local_clients_steered"], true);
        // Every counter under the name of its metric label.
        let names: Vec<&str> = by_result(&Counters::default()).iter().map(|(n, _)| *n).collect();
        let keys: Vec<&String> = j.ports[0].counters.keys().collect();
        assert_eq!(keys.len(), names.len());
        assert!(names.iter().all(|n| j.ports[0].counters.contains_key(*n)));
    }
}
