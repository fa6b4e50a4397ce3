//! The kernel side, as the agent owns it: loads and attaches the programs, pins the maps and
//! links ([`pins`]), reads the node's interfaces ([`net`]) and the live maps ([`inspect`]), and
//! turns a [`Desired`] table into map writes. It may call the core; it knows nothing of where the
//! table came from.
//!
//! One owner holds the map handles; every change goes through [`BpfDataplane::apply`], which writes
//! only what differs from the last applied state. A port's backends and Maglev row are written to
//! the idle bank first and made live with a single `ST8S_PORTS` update.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues},
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode, links::FdLink, tc, tc::SchedClassifierLink, xdp::XdpLink,
    },
};
use st8s_common::{
    Backend, CONFIG_PREFER_LOCAL, CONFIG_XDP_FORWARDS, Config, Counters, Discovery, DiscoveryPodKey,
    LAYOUT_VERSION, MAX_PORTS, MacKey, MaglevRow, NodeInfo, PORT_LOCAL_DRAINING, PortInfo, PortKey,
    map_names, port_index, program_names,
};
use tracing::{info, warn};

pub mod inspect;
pub mod net;
pub mod pins;

pub use pins::MapFate;

use self::net::format_mac;
use crate::core::{Desired, NodeEntry, PortId, Proto, port_tables};

/// The kernel programs, embedded at build time (see build.rs).
pub fn ebpf_object() -> anyhow::Result<&'static [u8]> {
    #[cfg(st8s_ebpf)]
    {
        static OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/st8s.bpf.o"));
        Ok(OBJ)
    }
    #[cfg(not(st8s_ebpf))]
    {
        anyhow::bail!(
            "this st8s binary was built without its kernel programs: run `cargo xtask build-ebpf`, then rebuild"
        )
    }
}

/// How to attach the uplink XDP program.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpChoice {
    /// Native XDP when the driver supports it, otherwise TC alone (never generic XDP).
    Auto,
    /// Native XDP or fail.
    Native,
    /// TC alone.
    Off,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub iface: String,
    pub pin_dir: PathBuf,
    pub xdp: XdpChoice,
    pub prefer_local: bool,
    pub hash_seed: u32,
}

/// A port's live contents, as last written.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PortState {
    slot: u16,
    bank: u8,
    info: PortInfo,
    backends: Vec<Backend>,
    maglev: Vec<u8>,
}

/// The dataplane in the kernel: the loaded programs and the agent's copy of what their maps
/// hold.
pub struct BpfDataplane {
    ebpf: Ebpf,
    opts: Options,
    uplink_ifindex: u32,
    self_mac: [u8; 6],
    xdp_forwards: bool,
    pod_ifaces: BTreeSet<String>,
    ports: BTreeMap<PortId, PortState>,
    nodes: BTreeMap<Ipv4Addr, NodeInfo>,
    peer_macs: BTreeSet<[u8; 6]>,
    config: Option<Config>,
    /// The uplink's addresses and their subnets' broadcast addresses.
    broadcasts: BTreeMap<Ipv4Addr, Ipv4Addr>,
    /// `ST8S_DISCOVERY` as last written, by hostPort.
    discovery: BTreeMap<u16, Discovery>,
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name)
        .with_context(|| format!("map {name} missing from the object"))
}

impl BpfDataplane {
    /// Loads the programs onto the pinned maps (adopting, migrating or rebuilding each, see
    /// [`pins`]) and reads back what the maps hold, so that the first [`apply`](Self::apply)
    /// writes only what differs. Nothing is attached yet: see [`attach`](Self::attach).
    pub fn load(opts: Options) -> anyhow::Result<(Self, Vec<(&'static str, MapFate)>)> {
        let uplink_ifindex = net::ifindex(&opts.iface)?;
        let self_mac = net::mac_of(&opts.iface)?;
        let broadcasts = net::broadcasts(&opts.iface)?;
        let pins::Loaded { mut ebpf, fates } = pins::load_pinned(&opts.pin_dir, ebpf_object()?)?;
        let prog: &mut Xdp = ebpf
            .program_mut(program_names::UPLINK_XDP)
            .context("XDP program missing")?
            .try_into()?;
        prog.load().context("loading the XDP program (verifier)")?;
        for name in [program_names::UPLINK_TC, program_names::POD_TC] {
            let prog: &mut SchedClassifier =
                ebpf.program_mut(name).context("TC program missing")?.try_into()?;
            prog.load()
                .with_context(|| format!("loading {name} (verifier)"))?;
        }
        let mut dp = BpfDataplane {
            ebpf,
            opts,
            uplink_ifindex,
            self_mac,
            xdp_forwards: false,
            pod_ifaces: BTreeSet::new(),
            ports: BTreeMap::new(),
            nodes: BTreeMap::new(),
            peer_macs: BTreeSet::new(),
            config: None,
            broadcasts,
            discovery: BTreeMap::new(),
        };
        dp.read_back()?;
        Ok((dp, fates))
    }

    /// Rebuilds the agent's idea of the live state from the maps (after a restart).
    fn read_back(&mut self) -> anyhow::Result<()> {
        let config: Array<_, Config> = Array::try_from(map_mut(&mut self.ebpf, map_names::CONFIG)?)?;
        let c = config.get(&0, 0)?;
        // Only a config written by a sync describes anything; the flags are recomputed anyway.
        self.config = (c.layout == LAYOUT_VERSION).then_some(c);
        self.xdp_forwards = c.flags & CONFIG_XDP_FORWARDS != 0;
        let nodes: HashMap<_, u32, NodeInfo> = HashMap::try_from(map_mut(&mut self.ebpf, map_names::NODES)?)?;
        self.nodes = nodes
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (Ipv4Addr::from(u32::from_be(k)), v))
            .collect();
        let macs: HashMap<_, MacKey, u32> =
            HashMap::try_from(map_mut(&mut self.ebpf, map_names::PEER_MACS)?)?;
        self.peer_macs = macs.keys().filter_map(Result::ok).map(|k| k.mac).collect();
        let discovery: HashMap<_, u32, Discovery> =
            HashMap::try_from(map_mut(&mut self.ebpf, map_names::DISCOVERY)?)?;
        self.discovery = discovery
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (k as u16, v))
            .collect();
        let ports: Vec<(PortKey, PortInfo)> = {
            let m: HashMap<_, PortKey, PortInfo> =
                HashMap::try_from(map_mut(&mut self.ebpf, map_names::PORTS)?)?;
            m.iter().filter_map(Result::ok).collect()
        };
        for (k, info) in ports {
            let Some(proto) = Proto::from_number(k.proto) else {
                continue;
            };
            let id = PortId {
                port: u16::from_be(k.port_be),
                proto,
            };
            let backends: Vec<Backend> = {
                let m: Array<_, Backend> = Array::try_from(map_mut(&mut self.ebpf, map_names::BACKENDS)?)?;
                (0..u32::from(info.backend_count))
                    .map(|i| m.get(&info.backend_index(i), 0))
                    .collect::<Result<_, _>>()?
            };
            let maglev = {
                let m: Array<_, MaglevRow> = Array::try_from(map_mut(&mut self.ebpf, map_names::MAGLEV)?)?;
                m.get(&info.maglev_index(), 0)?.slots.to_vec()
            };
            self.ports.insert(
                id,
                PortState {
                    slot: info.slot,
                    bank: info.bank,
                    info,
                    backends,
                    maglev,
                },
            );
        }
        if self.config.is_some() {
            info!(
                ports = self.ports.len(),
                nodes = self.nodes.len(),
                "adopted the live table"
            );
        }
        Ok(())
    }

    /// Attaches the programs, or swaps them into the links an earlier agent pinned
    /// (`bpf_link_update`: no packet sees a detached uplink). Call after the first sync, so that
    /// new programs never run against an empty table.
    pub fn attach(&mut self) -> anyhow::Result<()> {
        let dir = self.opts.pin_dir.clone();
        let iface = self.opts.iface.clone();
        let xdp_path = pins::link_path(&dir, "uplink_xdp");
        let xdp_forwards = match self.opts.xdp {
            XdpChoice::Off => {
                pins::unpin_link(&xdp_path);
                false
            }
            choice => {
                let prog: &mut Xdp = self
                    .ebpf
                    .program_mut(program_names::UPLINK_XDP)
                    .context("XDP program missing")?
                    .try_into()?;
                let replaced = pins::pinned_link(&xdp_path)
                    .and_then(|l| XdpLink::try_from(l).ok())
                    .map(|l| prog.attach_to_link(l));
                let attached = match replaced {
                    Some(Ok(id)) => Ok(id),
                    Some(Err(e)) => {
                        warn!(error = %e, "could not update the pinned XDP link: attaching anew");
                        pins::unpin_link(&xdp_path);
                        prog.attach(&iface, XdpMode::Driver)
                    }
                    None => prog.attach(&iface, XdpMode::Driver),
                };
                match attached {
                    Ok(id) => {
                        let link: FdLink = prog
                            .take_link(id)?
                            .try_into()
                            .context("XDP link is not a bpf_link")?;
                        let _ = std::fs::remove_file(&xdp_path);
                        link.pin(&xdp_path).context("pinning the XDP link")?;
                        info!(%iface, "native XDP attached: remote flows are forwarded in XDP");
                        true
                    }
                    Err(e) if choice == XdpChoice::Auto => {
                        warn!(%iface, error = %e, "native XDP unavailable on this interface: TC forwards remote flows instead");
                        false
                    }
                    Err(e) => return Err(e).context(format!("attaching native XDP to {iface}")),
                }
            }
        };
        if xdp_forwards != self.xdp_forwards {
            self.xdp_forwards = xdp_forwards;
            self.write_config()?;
        }
        self.attach_tc(program_names::UPLINK_TC, &iface, "uplink_tc")?;
        Ok(())
    }

    /// Attaches a TC ingress program to `iface`, or updates the link pinned under `what`.
    fn attach_tc(&mut self, program: &str, iface: &str, what: &str) -> anyhow::Result<()> {
        let path = pins::link_path(&self.opts.pin_dir, what);
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(program)
            .context("TC program missing")?
            .try_into()?;
        let replaced = pins::pinned_link(&path)
            .and_then(|l| SchedClassifierLink::try_from(l).ok())
            .map(|l| prog.attach_to_link(l));
        let id = match replaced {
            Some(Ok(id)) => id,
            other => {
                if let Some(Err(e)) = other {
                    warn!(%iface, error = %e, "could not update the pinned TC link: attaching anew");
                }
                pins::unpin_link(&path);
                // EEXIST when the qdisc is there already; with tcx it is not even needed.
                let _ = tc::qdisc_add_clsact(iface);
                prog.attach(iface, TcAttachType::Ingress)
                    .with_context(|| format!("attaching {program} to {iface}"))?
            }
        };
        let link: FdLink = prog
            .take_link(id)?
            .try_into()
            .context("TC link is not a bpf_link")?;
        let _ = std::fs::remove_file(&path);
        link.pin(&path)
            .with_context(|| format!("pinning {}", path.display()))?;
        Ok(())
    }

    pub fn xdp_forwards(&self) -> bool {
        self.xdp_forwards
    }

    /// Makes the maps hold `desired`. Capacity was checked by the plan, so this never leaves a
    /// port half-written: each port flips to its new bank only once the bank is complete.
    pub fn apply(
        &mut self,
        desired: &Desired,
        macs: &BTreeMap<Ipv4Addr, [u8; 6]>,
    ) -> anyhow::Result<ApplyReport> {
        let mut report = ApplyReport::default();
        let self_name = desired.self_node.name.clone();
        // Everything that can fail because of the node's network is resolved before the first
        // write, so that a missing pod route leaves the maps as they were.
        let mut pod_ifindexes = BTreeMap::new();
        for (id, plan) in &desired.ports {
            if let Some(local) = &plan.local {
                pod_ifindexes.insert(*id, self.pod_ifindex(local.addr)?);
            }
        }

        self.write_config_for(desired.self_node.addr, &mut report)?;

        // Nodes and the MACs of peers, for recognising forwarded packets.
        let nodes: BTreeMap<Ipv4Addr, NodeInfo> = desired
            .nodes
            .keys()
            .map(|a| {
                (
                    *a,
                    NodeInfo {
                        mac: macs.get(a).copied().unwrap_or_default(),
                        _pad: [0; 2],
                    },
                )
            })
            .collect();
        if nodes != self.nodes {
            let mut m: HashMap<_, u32, NodeInfo> =
                HashMap::try_from(map_mut(&mut self.ebpf, map_names::NODES)?)?;
            for (addr, info) in &nodes {
                if self.nodes.get(addr) != Some(info) {
                    m.insert(u32::from(*addr).to_be(), info, 0)
                        .context("writing ST8S_NODES")?;
                    report.writes += 1;
                }
            }
            for addr in self.nodes.keys().filter(|a| !nodes.contains_key(a)) {
                let _ = m.remove(&u32::from(*addr).to_be());
                report.writes += 1;
            }
            self.nodes = nodes;
        }
        let peer_macs: BTreeSet<[u8; 6]> = desired
            .nodes
            .keys()
            .filter(|a| **a != desired.self_node.addr)
            .filter_map(|a| macs.get(a).copied())
            .collect();
        if peer_macs != self.peer_macs {
            let mut m: HashMap<_, MacKey, u32> =
                HashMap::try_from(map_mut(&mut self.ebpf, map_names::PEER_MACS)?)?;
            for mac in peer_macs.difference(&self.peer_macs) {
                m.insert(MacKey::new(*mac), 1, 0)
                    .context("writing ST8S_PEER_MACS")?;
                report.writes += 1;
            }
            for mac in self.peer_macs.difference(&peer_macs) {
                let _ = m.remove(&MacKey::new(*mac));
                report.writes += 1;
            }
            self.peer_macs = peer_macs;
        }

        // Ports that went away.
        let gone: Vec<PortId> = self
            .ports
            .keys()
            .filter(|p| !desired.ports.contains_key(p))
            .copied()
            .collect();
        for id in gone {
            let mut index: Array<_, u32> = Array::try_from(map_mut(&mut self.ebpf, map_names::PORT_INDEX)?)?;
            index
                .set(port_index(id.proto.number(), u32::from(id.port)), 0, 0)
                .context("writing ST8S_PORT_INDEX")?;
            let mut m: HashMap<_, PortKey, PortInfo> =
                HashMap::try_from(map_mut(&mut self.ebpf, map_names::PORTS)?)?;
            let _ = m.remove(&PortKey::new(id.port, id.proto.number()));
            self.ports.remove(&id);
            report.writes += 1;
            info!(port = %id, "port no longer steered");
        }

        for (id, plan) in &desired.ports {
            let t = port_tables(plan, &self_name, macs, self.opts.hash_seed);
            for node in &t.unresolved {
                report.unresolved.insert(node.clone());
            }
            let (local_addr_be, local_port_be, local_ifindex, has_local) = match t.local {
                Some((addr, port)) => {
                    let ifindex = pod_ifindexes.get(id).copied().unwrap_or_default();
                    (u32::from(addr).to_be(), port.to_be(), ifindex, 1)
                }
                None => (0, 0, 0, 0),
            };
            let flags = if plan.local.as_ref().is_some_and(|l| l.draining) {
                PORT_LOCAL_DRAINING
            } else {
                0
            };
            let (slot, bank) = match self.ports.get(id) {
                Some(s) => {
                    if s.backends == t.backends
                        && s.maglev == t.maglev
                        && s.info.local_addr_be == local_addr_be
                        && s.info.local_port_be == local_port_be
                        && s.info.local_ifindex == local_ifindex
                        && s.info.flags == flags
                    {
                        continue;
                    }
                    (s.slot, 1 - s.bank)
                }
                None => (self.free_slot().context("no free port slot")?, 0),
            };
            let info = PortInfo {
                slot,
                bank,
                backend_count: t.backends.len() as u8,
                local_addr_be,
                local_ifindex,
                local_port_be,
                has_local,
                flags,
            };
            {
                let mut m: Array<_, Backend> =
                    Array::try_from(map_mut(&mut self.ebpf, map_names::BACKENDS)?)?;
                for (i, b) in t.backends.iter().enumerate() {
                    m.set(info.backend_index(i as u32), b, 0)
                        .context("writing ST8S_BACKENDS")?;
                }
            }
            {
                let mut row = MaglevRow::default();
                row.slots.copy_from_slice(&t.maglev);
                let mut m: Array<_, MaglevRow> =
                    Array::try_from(map_mut(&mut self.ebpf, map_names::MAGLEV)?)?;
                m.set(info.maglev_index(), row, 0)
                    .context("writing ST8S_MAGLEV")?;
            }
            if !self.ports.contains_key(id) {
                self.reset_counters(u32::from(slot))?;
            }
            {
                // The idle bank's PortInfo, then the one 4-byte index write that makes it live.
                let mut infos: Array<_, PortInfo> =
                    Array::try_from(map_mut(&mut self.ebpf, map_names::PORT_INFO)?)?;
                infos
                    .set(info.maglev_index(), info, 0)
                    .context("writing ST8S_PORT_INFO")?;
                let mut index: Array<_, u32> =
                    Array::try_from(map_mut(&mut self.ebpf, map_names::PORT_INDEX)?)?;
                index
                    .set(
                        port_index(id.proto.number(), u32::from(id.port)),
                        info.maglev_index() + 1,
                        0,
                    )
                    .context("writing ST8S_PORT_INDEX")?;
                let mut m: HashMap<_, PortKey, PortInfo> =
                    HashMap::try_from(map_mut(&mut self.ebpf, map_names::PORTS)?)?;
                m.insert(PortKey::new(id.port, id.proto.number()), info, 0)
                    .context("writing ST8S_PORTS")?;
            }
            report.writes += t.backends.len() + 4;
            report.ports_changed += 1;
            info!(
                port = %id,
                backends = ?plan.backends.iter().map(|b| b.node.as_str()).collect::<Vec<_>>(),
                local = ?plan.local.as_ref().map(|l| l.pod.as_str()),
                "port programmed"
            );
            self.ports.insert(
                *id,
                PortState {
                    slot,
                    bank,
                    info,
                    backends: t.backends,
                    maglev: t.maglev,
                },
            );
        }
        self.apply_discovery(desired, &mut report)?;
        Ok(report)
    }

    /// Discovery ports: UDP hostPorts whose pod on this node declares them. Both maps are keyed
    /// differently but hold the same entries; stale ones go first, so that a port that moved to
    /// another pod never has two.
    fn apply_discovery(&mut self, desired: &Desired, report: &mut ApplyReport) -> anyhow::Result<()> {
        let want: BTreeMap<u16, Discovery> = desired
            .ports
            .iter()
            .filter(|(id, _)| id.proto == Proto::Udp)
            .filter_map(|(id, plan)| {
                let local = plan.local.as_ref().filter(|l| l.discovery)?;
                Some((
                    id.port,
                    Discovery {
                        pod_addr_be: u32::from(local.addr).to_be(),
                        pod_port_be: local.port.to_be(),
                        host_port_be: id.port.to_be(),
                        slot: self.ports.get(id)?.slot,
                        _pad: 0,
                    },
                ))
            })
            .collect();
        if want == self.discovery {
            return Ok(());
        }
        let pod_key = |d: &Discovery| DiscoveryPodKey {
            pod_addr_be: d.pod_addr_be,
            pod_port_be: d.pod_port_be,
            _pad: 0,
        };
        for (port, old) in &self.discovery {
            if want.get(port) != Some(old) {
                let mut m: HashMap<_, u32, Discovery> =
                    HashMap::try_from(map_mut(&mut self.ebpf, map_names::DISCOVERY)?)?;
                let _ = m.remove(&u32::from(*port));
                let mut p: HashMap<_, DiscoveryPodKey, Discovery> =
                    HashMap::try_from(map_mut(&mut self.ebpf, map_names::DISCOVERY_PODS)?)?;
                let _ = p.remove(&pod_key(old));
                report.writes += 2;
                info!(port = *port, "discovery delivery stopped");
            }
        }
        for (port, d) in &want {
            if self.discovery.get(port) != Some(d) {
                let mut p: HashMap<_, DiscoveryPodKey, Discovery> =
                    HashMap::try_from(map_mut(&mut self.ebpf, map_names::DISCOVERY_PODS)?)?;
                p.insert(pod_key(d), d, 0)
                    .context("writing ST8S_DISCOVERY_PODS")?;
                let mut m: HashMap<_, u32, Discovery> =
                    HashMap::try_from(map_mut(&mut self.ebpf, map_names::DISCOVERY)?)?;
                m.insert(u32::from(*port), d, 0)
                    .context("writing ST8S_DISCOVERY")?;
                report.writes += 2;
                info!(port = *port, pod = %Ipv4Addr::from(u32::from_be(d.pod_addr_be)), "discovery delivered to the local pod");
            }
        }
        self.discovery = want;
        Ok(())
    }

    fn config_for(&self, self_addr: Ipv4Addr) -> Config {
        let mut flags = 0;
        if self.opts.prefer_local {
            flags |= CONFIG_PREFER_LOCAL;
        }
        if self.xdp_forwards {
            flags |= CONFIG_XDP_FORWARDS;
        }
        Config {
            self_addr_be: u32::from(self_addr).to_be(),
            uplink_ifindex: self.uplink_ifindex,
            hash_seed: self.opts.hash_seed,
            flags,
            self_mac: self.self_mac,
            layout: LAYOUT_VERSION,
            broadcast_be: self
                .broadcasts
                .get(&self_addr)
                .map(|b| u32::from(*b).to_be())
                .unwrap_or_default(),
        }
    }

    fn write_config_for(&mut self, self_addr: Ipv4Addr, report: &mut ApplyReport) -> anyhow::Result<()> {
        let config = self.config_for(self_addr);
        if self.config != Some(config) {
            let mut m: Array<_, Config> = Array::try_from(map_mut(&mut self.ebpf, map_names::CONFIG)?)?;
            m.set(0, config, 0).context("writing ST8S_CONFIG")?;
            self.config = Some(config);
            report.writes += 1;
        }
        Ok(())
    }

    /// Rewrites the config after the XDP mode changed.
    fn write_config(&mut self) -> anyhow::Result<()> {
        if let Some(c) = self.config {
            let addr = Ipv4Addr::from(u32::from_be(c.self_addr_be));
            self.write_config_for(addr, &mut ApplyReport::default())?;
        }
        Ok(())
    }

    fn free_slot(&self) -> Option<u16> {
        let used: BTreeSet<u16> = self.ports.values().map(|p| p.slot).collect();
        (0..MAX_PORTS as u16).find(|s| !used.contains(s))
    }

    fn reset_counters(&mut self, slot: u32) -> anyhow::Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
        let mut m: PerCpuArray<_, Counters> =
            PerCpuArray::try_from(map_mut(&mut self.ebpf, map_names::COUNTERS)?)?;
        let zero = PerCpuValues::try_from(vec![Counters::default(); cpus])?;
        m.set(slot, zero, 0).context("resetting ST8S_COUNTERS")?;
        Ok(())
    }

    /// The interface behind which a local pod lives; the pod program is attached there once.
    fn pod_ifindex(&mut self, pod: Ipv4Addr) -> anyhow::Result<u32> {
        let dev = net::route_dev(pod)?.with_context(|| format!("no route to pod {pod}"))?;
        if dev == self.opts.iface {
            anyhow::bail!(
                "pod {pod} is routed through the uplink {dev}; st8s needs the pod network on its own interface"
            );
        }
        if !self.pod_ifaces.contains(&dev) {
            self.attach_tc(program_names::POD_TC, &dev, &format!("pod_{dev}"))?;
            info!(iface = %dev, "pod program attached");
            self.pod_ifaces.insert(dev.clone());
        }
        Ok(net::ifindex(&dev)?)
    }

    pub fn self_mac(&self) -> String {
        format_mac(&self.self_mac)
    }
}

/// What the agent's loop needs of a dataplane. [`BpfDataplane`] is the kernel's; the loop's tests
/// use one that records what it is given.
pub trait Dataplane {
    /// Makes the maps hold `table`, with `macs` for the other nodes; writes only what changed.
    fn apply(&mut self, table: &Desired, macs: &Macs) -> anyhow::Result<ApplyReport>;
    /// Attaches the programs (after the first [`apply`](Self::apply)).
    fn attach(&mut self) -> anyhow::Result<()>;
}

impl Dataplane for BpfDataplane {
    fn apply(&mut self, table: &Desired, macs: &Macs) -> anyhow::Result<ApplyReport> {
        BpfDataplane::apply(self, table, macs)
    }

    fn attach(&mut self) -> anyhow::Result<()> {
        BpfDataplane::attach(self)?;
        info!(xdp_forwards = self.xdp_forwards, "dataplane attached");
        Ok(())
    }
}

/// The other nodes' MAC addresses, by node address.
pub type Macs = BTreeMap<Ipv4Addr, [u8; 6]>;

/// The node the agent runs on, as its loop needs it: a dataplane to load, and the neighbour
/// table. [`KernelHost`] is this machine's kernel.
pub trait Host {
    type Dataplane: Dataplane;
    /// Loads a dataplane for `self_node` onto the pins; nothing is attached yet.
    fn load(&mut self, self_node: &NodeEntry) -> anyhow::Result<Self::Dataplane>;
    /// The MACs of the other nodes of `desired` that are known; asks the network for the rest.
    fn peer_macs(&mut self, desired: &Desired) -> Macs;
}

/// This machine's kernel.
#[derive(Clone, Debug)]
pub struct KernelHost {
    /// The uplink; by default the interface that holds the node's address.
    pub iface: Option<String>,
    pub pin_dir: PathBuf,
    pub xdp: XdpChoice,
    pub prefer_local: bool,
    pub hash_seed: u32,
}

impl Host for KernelHost {
    type Dataplane = BpfDataplane;

    fn load(&mut self, self_node: &NodeEntry) -> anyhow::Result<BpfDataplane> {
        let iface = match &self.iface {
            Some(i) => i.clone(),
            None => net::iface_with_addr(self_node.addr)
                .with_context(|| format!("finding the uplink of node {} (pass --iface)", self_node.name))?,
        };
        info!(node = %self_node.name, addr = %self_node.addr, %iface, "starting the dataplane");
        let (dp, fates) = BpfDataplane::load(Options {
            iface,
            pin_dir: self.pin_dir.clone(),
            xdp: self.xdp,
            prefer_local: self.prefer_local,
            hash_seed: self.hash_seed,
        })?;
        let adopted = fates.iter().all(|(_, f)| *f == MapFate::Adopted);
        info!(mac = %dp.self_mac(), adopted, "programs loaded");
        Ok(dp)
    }

    fn peer_macs(&mut self, desired: &Desired) -> Macs {
        let known = net::neighbours().unwrap_or_else(|e| {
            warn!(error = %e, "cannot read the neighbour table");
            BTreeMap::new()
        });
        let mut out = BTreeMap::new();
        for addr in desired.nodes.keys().filter(|a| **a != desired.self_node.addr) {
            match known.get(addr) {
                Some(mac) => {
                    out.insert(*addr, *mac);
                }
                None => net::solicit(*addr),
            }
        }
        out
    }
}

#[derive(Debug, Default)]
pub struct ApplyReport {
    pub writes: usize,
    pub ports_changed: usize,
    pub unresolved: BTreeSet<String>,
}

/// Opens a pinned map read-only for `st8s inspect`.
pub fn open_pinned(dir: &Path, name: &str) -> anyhow::Result<aya::maps::Map> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "opening {} (is an st8s agent running with this --pin-dir?)",
            path.display()
        )
    })?;
    Ok(aya::maps::Map::from_map_data(data)?)
}
