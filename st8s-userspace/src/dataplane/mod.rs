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
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::MapData,
    programs::{
        CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType, Xdp, XdpMode, links::FdLink, tc,
        tc::SchedClassifierLink, xdp::XdpLink,
    },
};
use st8s_common::{
    CONFIG_PREFER_LOCAL, CONFIG_TC_NETLINK, CONFIG_XDP_FORWARDS, Config, Discovery, LAYOUT_VERSION, NodeInfo,
    PORT_LOCAL_DRAINING, PodLink, map_names, program_names,
};
use tracing::{debug, info, warn};

pub mod inspect;
pub mod monitor;
pub mod net;
pub mod pins;
pub mod preflight;
pub mod writer;

pub use pins::MapFate;

use self::{
    net::format_mac,
    writer::{LocalPod, MapWriter, PortContents, WriteCount},
};
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

/// Whether the TC programs go in as netlink filters: chosen once at start, and said in the log.
/// `tcx` on a kernel without TCX is refused here, before any map or link is touched.
fn tc_netlink(choice: TcChoice, kernel: aya::util::KernelVersion) -> anyhow::Result<bool> {
    let netlink = tc_netlink_on(choice, kernel)?;
    if netlink {
        info!(%kernel, priority = NL_PRIORITY, handle = format!("{NL_HANDLE:#x}"), "TC programs attach as netlink filters (clsact, cls_bpf direct-action)");
    } else {
        info!(%kernel, "TC programs attach as TCX links");
    }
    Ok(netlink)
}

/// [`tc_netlink`] on a given kernel: TCX links exist from 6.6 on.
fn tc_netlink_on(choice: TcChoice, kernel: aya::util::KernelVersion) -> anyhow::Result<bool> {
    let has_tcx = kernel >= aya::util::KernelVersion::new(6, 6, 0);
    Ok(match choice {
        TcChoice::Auto => !has_tcx,
        TcChoice::Tcx if !has_tcx => {
            anyhow::bail!("--tc-attach tcx needs TCX links (kernel 6.6 or later); this is {kernel}")
        }
        TcChoice::Tcx => false,
        TcChoice::Netlink => true,
    })
}

/// How to attach the TC programs (`--tc-attach`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TcChoice {
    /// TCX links on kernels that have them (6.6 and later), netlink filters before.
    Auto,
    /// TCX links (bpf_link, pinned; kernel 6.6 or later).
    Tcx,
    /// A cls_bpf filter on the clsact qdisc, through netlink (every kernel st8s runs on).
    Netlink,
}

/// The netlink filters st8s owns: one per interface, at this priority and handle, so that a
/// restarted agent finds and replaces its own filter in place (`tc filter show dev eth0 ingress`
/// lists it as `pref 1 handle 0x5738 bpf direct-action`). Priority 1 runs first among the
/// legacy filters.
pub const NL_PRIORITY: u16 = 1;
pub const NL_HANDLE: u16 = 0x5738;

/// Where the socket hooks for clients on the node itself attach (`--cgroup`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CgroupChoice {
    /// The cgroup v2 hierarchy this process sees mounted (its root): every process and pod of
    /// the node, when the agent sees the host's hierarchy.
    Auto,
    /// This cgroup v2 directory and everything below it.
    Path(PathBuf),
    /// No socket hooks: local clients are not steered.
    Off,
}

impl std::str::FromStr for CgroupChoice {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "auto" => CgroupChoice::Auto,
            "off" => CgroupChoice::Off,
            path => CgroupChoice::Path(path.into()),
        })
    }
}

#[derive(Clone, Debug)]
pub struct Options {
    pub iface: String,
    pub pin_dir: PathBuf,
    pub xdp: XdpChoice,
    pub prefer_local: bool,
    pub hash_seed: u32,
    pub cgroup: CgroupChoice,
    pub tc: TcChoice,
}

/// The dataplane in the kernel: the loaded programs, and the [`MapWriter`] that holds what their
/// maps contain.
pub struct BpfDataplane {
    ebpf: Ebpf,
    opts: Options,
    uplink_ifindex: u32,
    self_mac: [u8; 6],
    xdp_forwards: bool,
    /// The TC programs are netlink filters (no TCX on this kernel, or `--tc-attach netlink`).
    tc_netlink: bool,
    pod_ifaces: BTreeSet<String>,
    /// Local backend pods' bridge ports carrying the reply program (`POD_PORT_TC`): ifindex and
    /// name when attached.
    reply_ports: BTreeMap<u32, String>,
    /// What `ST8S_POD_LINKS` holds, by slot; `None` until the first write.
    pod_link_entries: Option<BTreeMap<u32, PodLink>>,
    /// The uplink's addresses and their subnets' broadcast addresses.
    broadcasts: BTreeMap<Ipv4Addr, Ipv4Addr>,
    writer: MapWriter,
    /// The cgroup the socket hooks are attached at, once they are.
    socket_cgroup: Option<PathBuf>,
    /// Pod-network devices already reported as having no L2 path (said once each).
    no_l2_path: BTreeSet<String>,
    /// Pods already reported as out of reach (said once each, again after they recover).
    undeliverable: BTreeSet<String>,
}

impl BpfDataplane {
    /// Loads the programs onto the pinned maps (adopting, migrating or rebuilding each, see
    /// [`pins`]) and reads back what the maps hold, so that the first [`apply`](Self::apply)
    /// writes only what differs. Nothing is attached yet: see [`attach`](Self::attach).
    pub fn load(opts: Options) -> anyhow::Result<(Self, Vec<(&'static str, MapFate)>)> {
        let kernel = aya::util::KernelVersion::current().context("reading the kernel version")?;
        let needs = preflight::required(opts.cgroup != CgroupChoice::Off);
        preflight::check(kernel, &needs, preflight::probe)?;
        let uplink_ifindex = net::ifindex(&opts.iface)?;
        let self_mac = net::mac_of(&opts.iface)?;
        let broadcasts = net::broadcasts(&opts.iface)?;
        let pins::Loaded { mut ebpf, fates } = pins::load_pinned(&opts.pin_dir, ebpf_object()?)?;
        let prog: &mut Xdp = ebpf
            .program_mut(program_names::UPLINK_XDP)
            .context("XDP program missing")?
            .try_into()?;
        prog.load().context("loading the XDP program (verifier)")?;
        for name in [
            program_names::UPLINK_TC,
            program_names::POD_TC,
            program_names::POD_PORT_TC,
        ] {
            let prog: &mut SchedClassifier =
                ebpf.program_mut(name).context("TC program missing")?.try_into()?;
            prog.load()
                .with_context(|| format!("loading {name} (verifier)"))?;
        }
        if opts.cgroup != CgroupChoice::Off {
            for name in program_names::SOCKET {
                let prog: &mut CgroupSockAddr = ebpf
                    .program_mut(name)
                    .context("socket program missing")?
                    .try_into()?;
                prog.load()
                    .with_context(|| format!("loading {name} (verifier)"))?;
            }
        }
        let writer = MapWriter::read_back(&mut ebpf)?;
        let xdp_forwards = writer
            .config()
            .is_some_and(|c| c.flags & CONFIG_XDP_FORWARDS != 0);
        if writer.config().is_some() {
            info!(ports = writer.ports().count(), "adopted the live table");
        }
        let tc_netlink = tc_netlink(opts.tc, kernel)?;
        let dp = BpfDataplane {
            ebpf,
            opts,
            uplink_ifindex,
            self_mac,
            xdp_forwards,
            tc_netlink,
            pod_ifaces: BTreeSet::new(),
            reply_ports: BTreeMap::new(),
            pod_link_entries: None,
            broadcasts,
            writer,
            socket_cgroup: None,
            no_l2_path: BTreeSet::new(),
            undeliverable: BTreeSet::new(),
        };
        Ok((dp, fates))
    }

    /// Attaches the programs, or swaps them into the links an earlier agent pinned
    /// (`bpf_link_update`: no packet sees a detached uplink). Call after the first sync, so that
    /// new programs never run against an empty table.
    pub fn attach(&mut self) -> anyhow::Result<()> {
        let dir = self.opts.pin_dir.clone();
        let iface = self.opts.iface.clone();
        if let Some(vlan) = net::vlan_of(&iface) {
            // Linux's VLAN driver has no native XDP: with `--xdp auto`, TC forwards.
            info!(
                %iface,
                parent = %vlan.parent,
                vlan = vlan.id,
                "the uplink is a VLAN subinterface: st8s steers the frames of this VLAN on it; tagged frames on the parent are left to the kernel"
            );
        }
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
            // The programs read the mode from the config.
            if let Some(c) = self.writer.config() {
                let config = Config {
                    flags: self.config_flags(),
                    ..c
                };
                self.writer.write_config(&mut self.ebpf, config)?;
            }
        }
        self.attach_tc(program_names::UPLINK_TC, &iface, "uplink_tc")?;
        self.socket_cgroup = self.attach_sockets()?;
        Ok(())
    }

    /// Attaches the socket programs at the node's cgroup v2 root (see [`CgroupChoice`]), pinning
    /// their links. A restarted agent attaches its programs next to the old ones first (cgroup
    /// links always allow several), then unpins the old links, so no connect goes unsteered; while both
    /// run, the second finds the socket already steered and leaves it. Without cgroup v2 the
    /// rest of the dataplane works as before; local clients are not steered.
    fn attach_sockets(&mut self) -> anyhow::Result<Option<PathBuf>> {
        let dir = match &self.opts.cgroup {
            CgroupChoice::Off => None,
            CgroupChoice::Auto => net::cgroup2_mount()?,
            // A hybrid host's /sys/fs/cgroup holds the v2 hierarchy in `unified`.
            CgroupChoice::Path(p) => [p.clone(), p.join("unified")]
                .into_iter()
                .find(|d| net::is_cgroup2(d))
                .or_else(|| {
                    warn!(path = %p.display(), "not a cgroup v2 directory (nor is its `unified`)");
                    None
                }),
        };
        let Some(dir) = dir else {
            for name in program_names::SOCKET {
                pins::unpin_link(&pins::link_path(&self.opts.pin_dir, name));
            }
            if self.opts.cgroup != CgroupChoice::Off {
                warn!(
                    "no cgroup v2 hierarchy: clients on this node itself (its processes and pods) are not steered; everything else is"
                );
            }
            return Ok(None);
        };
        let cgroup =
            std::fs::File::open(&dir).with_context(|| format!("opening the cgroup {}", dir.display()))?;
        for name in program_names::SOCKET {
            let path = pins::link_path(&self.opts.pin_dir, name);
            let prog: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .context("socket program missing")?
                .try_into()?;
            // A bpf_link: the kernel attaches links as BPF_F_ALLOW_MULTI whatever the flags say
            // (and refuses the flag itself), so an old and a new agent's links can coexist.
            let id = prog
                .attach(&cgroup, CgroupAttachMode::Single)
                .with_context(|| format!("attaching {name} to the cgroup {}", dir.display()))?;
            let link: FdLink = prog
                .take_link(id)?
                .try_into()
                .context("cgroup link is not a bpf_link")?;
            // The old link detaches once its pin is gone; the new one already runs.
            pins::unpin_link(&path);
            link.pin(&path)
                .with_context(|| format!("pinning {}", path.display()))?;
        }
        info!(cgroup = %dir.display(), "socket hooks attached: clients on this node are steered too");
        Ok(Some(dir))
    }

    /// Where the socket hooks are attached, if they are.
    pub fn socket_cgroup(&self) -> Option<&Path> {
        self.socket_cgroup.as_deref()
    }

    /// Attaches a TC ingress program to `iface`: as a TCX link, or by updating the link pinned
    /// under `what`; or, in netlink mode, as st8s's filter there, replaced in place when one is
    /// there already (an earlier agent's: no packet meets the interface without a program).
    fn attach_tc(&mut self, program: &str, iface: &str, what: &str) -> anyhow::Result<()> {
        let path = pins::link_path(&self.opts.pin_dir, what);
        let prog: &mut SchedClassifier = self
            .ebpf
            .program_mut(program)
            .context("TC program missing")?
            .try_into()?;
        if self.tc_netlink {
            // A TCX link from an agent that ran in the other mode goes first.
            pins::unpin_link(&path);
            // EEXIST when the qdisc is there already.
            let _ = tc::qdisc_add_clsact(iface);
            let ours = SchedClassifierLink::attached(
                iface,
                TcAttachType::Ingress,
                NL_PRIORITY,
                tc::TcHandle::new(0, NL_HANDLE),
                None,
            )
            .with_context(|| format!("interface {iface}"))?;
            let id = match prog.attach_to_link(ours) {
                Ok(id) => id,
                // No filter of ours there yet (ENOENT): create it.
                Err(_) => prog
                    .attach_with_options(
                        iface,
                        TcAttachType::Ingress,
                        tc::TcAttachOptions::Netlink(tc::NlOptions {
                            priority: NL_PRIORITY,
                            handle: tc::TcHandle::new(0, NL_HANDLE),
                            classid: None,
                        }),
                    )
                    .with_context(|| format!("attaching {program} to {iface} (netlink)"))?,
            };
            // The filter stays when the agent exits (as a pinned link does): `st8s uninstall`
            // removes it.
            std::mem::forget(prog.take_link(id)?);
            return Ok(());
        }
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
                prog.attach_with_options(
                    iface,
                    TcAttachType::Ingress,
                    tc::TcAttachOptions::TcxOrder(aya::programs::LinkOrder::default()),
                )
                .with_context(|| format!("attaching {program} to {iface} (TCX)"))?
            }
        };
        let link: FdLink = prog
            .take_link(id)?
            .try_into()
            .context("TC link is not a bpf_link")?;
        let _ = std::fs::remove_file(&path);
        link.pin(&path)
            .with_context(|| format!("pinning {}", path.display()))?;
        // A netlink filter from an agent that ran in the other mode goes now that TCX runs.
        let _ = tc::qdisc_detach_program(iface, TcAttachType::Ingress, program);
        Ok(())
    }

    /// The TC attach path: `tcx` or `netlink`.
    pub fn tc_mode(&self) -> &'static str {
        if self.tc_netlink { "netlink" } else { "tcx" }
    }

    pub fn xdp_forwards(&self) -> bool {
        self.xdp_forwards
    }

    /// Makes the maps hold `desired`. Capacity was checked by the plan, so this never leaves a
    /// port half-written: each port flips to its new bank only once the bank is complete.
    pub fn apply(&mut self, desired: &Desired, macs: &Macs) -> anyhow::Result<ApplyReport> {
        let mut report = ApplyReport::default();
        // Everything that can fail because of the node's network is resolved before the first
        // write, so that a missing pod route leaves the maps as they were.
        // A pod whose path the agent cannot find (a CNI shape it does not know, a missing route)
        // is said once, by name; its port is left to the kernel on this node (the hostPort's own
        // DNAT, as without st8s) and every other port is steered.
        let mut pod_links = BTreeMap::new();
        for (id, plan) in &desired.ports {
            let Some(local) = &plan.local else { continue };
            match self.pod_link(local.addr) {
                Ok(link) => {
                    self.undeliverable.remove(&local.pod);
                    pod_links.insert(*id, link);
                }
                Err(e) => {
                    if self.undeliverable.insert(local.pod.clone()) {
                        warn!(
                            pod = %local.pod,
                            port = %id,
                            error = %format!("{e:#}"),
                            "cannot deliver to this pod here: its port is left to the kernel on this node; the other ports are steered"
                        );
                    }
                    report.undeliverable.push(local.pod.clone());
                    report.retry = true;
                }
            }
        }
        let mut discovery_links = BTreeMap::new();
        for (id, plan) in &desired.ports {
            if let Some(local) = plan.local.as_ref().filter(|l| l.discovery) {
                let Some((dev, ifindex)) = pod_links.get(id) else {
                    continue;
                };
                if !net::is_ethernet(dev) {
                    if self.no_l2_path.insert(dev.clone()) {
                        warn!(
                            iface = %dev,
                            pod = %local.pod,
                            "the pod network has no L2 path here (not Ethernet): broadcast and multicast are not delivered to its pods"
                        );
                    }
                    continue;
                }
                let (link, mac, learned) = discovery_link(local.addr, *ifindex)?;
                report.retry |= !learned;
                discovery_links.insert(local.addr, (link, mac));
            }
        }
        let (own_links, retry) = self.find_pod_ports(desired, &pod_links);
        report.retry |= retry;
        self.writer.count = WriteCount::default();
        let config = self.config_for(desired.self_node.addr, desired.self_node.addr6);
        let (ebpf, w) = (&mut self.ebpf, &mut self.writer);
        w.write_config(ebpf, config)?;
        // Nodes and the MACs of peers, for recognising forwarded packets; by IPv4 and by IPv6
        // address (a peer's IPv6 forward is addressed to one of the latter).
        let info = |n: &NodeEntry| NodeInfo {
            mac: macs.get(&n.addr).copied().unwrap_or_default(),
            _pad: [0; 2],
            addr6: n.addr6.map_or([0; 4], |a| st8s_common::addr6(a.octets())),
        };
        let nodes = desired.nodes.values().map(|n| (n.addr, info(n))).collect();
        w.write_nodes(ebpf, nodes)?;
        let nodes6 = desired
            .nodes
            .values()
            .filter_map(|n| Some((n.addr6?, info(n))))
            .collect();
        w.write_nodes6(ebpf, nodes6)?;
        let peer_macs = desired.peers().filter_map(|a| macs.get(&a).copied()).collect();
        w.write_peer_macs(ebpf, peer_macs)?;
        let gone: Vec<PortId> = w.ports().filter(|p| !desired.ports.contains_key(p)).collect();
        for id in gone {
            w.remove_port(ebpf, id)?;
        }
        for (id, plan) in &desired.ports {
            let t = port_tables(plan, &desired.self_node.name, macs, self.opts.hash_seed);
            report.unresolved.extend(t.unresolved);
            let contents = PortContents {
                backends: t.backends,
                maglev: t.maglev,
                local: t.local.and_then(|(addr, port)| {
                    let (_, ifindex) = pod_links.get(id)?;
                    Some(LocalPod {
                        addr,
                        addr6: plan.local.as_ref().and_then(|l| l.addr6),
                        port,
                        ifindex: *ifindex,
                    })
                }),
                flags: if plan.local.as_ref().is_some_and(|l| l.draining) {
                    PORT_LOCAL_DRAINING
                } else {
                    0
                },
            };
            if w.write_port(ebpf, *id, contents)? {
                info!(
                    port = %id,
                    backends = ?plan.backends.iter().map(|b| b.node.as_str()).collect::<Vec<_>>(),
                    local = ?plan.local.as_ref().map(|l| l.pod.as_str()),
                    "port programmed"
                );
            }
        }
        // Discovery ports: UDP hostPorts whose pod on this node declares them.
        let discovery = desired
            .ports
            .iter()
            .filter(|(id, _)| id.proto == Proto::Udp)
            .filter_map(|(id, plan)| {
                let local = plan.local.as_ref().filter(|l| l.discovery)?;
                let (ifindex, mac) = *discovery_links.get(&local.addr)?;
                Some((
                    id.port,
                    Discovery {
                        pod_addr_be: u32::from(local.addr).to_be(),
                        pod_port_be: local.port.to_be(),
                        host_port_be: id.port.to_be(),
                        slot: w.slot(*id)?,
                        _pad: 0,
                        ifindex,
                        pod_addr6: local.addr6.map_or([0; 4], |a| st8s_common::addr6(a.octets())),
                        pod_mac: mac.unwrap_or_default(),
                        _pad2: [0; 2],
                    },
                ))
            })
            .collect();
        w.write_discovery(ebpf, discovery)?;
        report.writes = w.count.writes;
        report.ports_changed = w.count.ports_changed;
        self.write_pod_links(&own_links)?;
        Ok(report)
    }

    fn config_for(&self, self_addr: Ipv4Addr, self_addr6: Option<Ipv6Addr>) -> Config {
        Config {
            self_addr_be: u32::from(self_addr).to_be(),
            uplink_ifindex: self.uplink_ifindex,
            hash_seed: self.opts.hash_seed,
            flags: self.config_flags(),
            self_mac: self.self_mac,
            layout: LAYOUT_VERSION,
            broadcast_be: self
                .broadcasts
                .get(&self_addr)
                .map(|b| u32::from(*b).to_be())
                .unwrap_or_default(),
            self_addr6: self_addr6.map_or([0; 4], |a| st8s_common::addr6(a.octets())),
            // Only worth having where the node steers IPv6.
            self_ll6: self_addr6
                .and_then(|_| net::link_local6(&self.opts.iface))
                .map_or([0; 4], |a| st8s_common::addr6(a.octets())),
        }
    }

    /// `Config::flags` as the options and the attach mode make them.
    fn config_flags(&self) -> u32 {
        let mut flags = 0;
        if self.opts.prefer_local {
            flags |= CONFIG_PREFER_LOCAL;
        }
        if self.xdp_forwards {
            flags |= CONFIG_XDP_FORWARDS;
        }
        if self.tc_netlink {
            flags |= CONFIG_TC_NETLINK;
        }
        flags
    }

    /// The interface behind which a local pod lives; the pod program is attached there once.
    /// Its name and ifindex.
    fn pod_link(&mut self, pod: Ipv4Addr) -> anyhow::Result<(String, u32)> {
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
        let ifindex = net::ifindex(&dev)?;
        Ok((dev, ifindex))
    }

    /// Finds each local backend pod's own link (see `PodLink`): its bridge port, or, on a routed
    /// CNI, the link its route names. Puts the reply program on the bridge ports (see
    /// `st8s_pod_port_tc`) and takes it off ports no backend is behind any more. Returns the
    /// pods' links by port, and true when a bridge has yet to learn a pod (it is solicited: look
    /// again). Best effort: until a pod's link is known, and wherever attaching fails, its
    /// packets take the bridge as before, only at the bridge's cost.
    fn find_pod_ports(
        &mut self,
        desired: &Desired,
        pod_links: &BTreeMap<PortId, (String, u32)>,
    ) -> (BTreeMap<PortId, PodLink>, bool) {
        let mut retry = false;
        let neighbours = net::neighbours().unwrap_or_default();
        let fdb = net::Fdb::read()
            .inspect_err(|e| debug!(error = %e, "bridge forwarding database unreadable"))
            .ok();
        let mut wanted: BTreeMap<u32, String> = BTreeMap::new();
        let mut links = BTreeMap::new();
        for (id, plan) in &desired.ports {
            let (Some(local), Some((dev, ifindex))) = (&plan.local, pod_links.get(id)) else {
                continue;
            };
            if !net::is_ethernet(dev) {
                continue;
            }
            // The neighbour table forgets an idle pod (ARP ages); the MAC last written for the
            // same pod stands in until a solicitation brings the entry back.
            let pod_addr_be = u32::from(local.addr).to_be();
            let mac = neighbours.get(&local.addr).copied().or_else(|| {
                let slot = u32::from(self.writer.slot(*id)?);
                let known = self.pod_link_entries.as_ref()?.get(&slot)?;
                (known.pod_addr_be == pod_addr_be).then_some(known.pod_mac)
            });
            // A MAC no bridge learns: Unknown on a bridge, NotABridge on a pod's own link.
            let own = match fdb.as_ref().map(|f| f.port(*ifindex, mac.unwrap_or_default())) {
                Some(net::BridgePort::Port(port)) => {
                    wanted.insert(port, local.pod.clone());
                    Some(port)
                }
                Some(net::BridgePort::NotABridge) => Some(*ifindex),
                Some(net::BridgePort::Unknown) => {
                    net::solicit(local.addr);
                    retry = true;
                    None
                }
                None => None,
            };
            if let (Some(link), Some(mac)) = (own, mac)
                && net::iface_name(link).is_some_and(|n| net::is_veth(&n))
            {
                links.insert(
                    *id,
                    PodLink {
                        pod_addr_be,
                        ifindex: link,
                        pod_mac: mac,
                        _pad: [0; 2],
                    },
                );
            }
        }
        for (&port, pod) in &wanted {
            let Some(name) = net::iface_name(port) else {
                continue;
            };
            if self.reply_ports.get(&port) == Some(&name) {
                continue;
            }
            match self.attach_tc(program_names::POD_PORT_TC, &name, &reply_link(port)) {
                Ok(()) => {
                    info!(iface = %name, %pod, "reply program attached to the pod's bridge port");
                    self.reply_ports.insert(port, name);
                }
                Err(e) => warn!(
                    iface = %name,
                    %pod,
                    error = %format!("{e:#}"),
                    "cannot attach the reply program to the pod's bridge port: the bridge translates its replies"
                ),
            }
        }
        // Ports no backend is behind any more, including those pinned by an earlier agent (not
        // judged without the forwarding database: nothing is taken off then).
        if fdb.is_none() {
            return (links, retry);
        }
        let mut gone: BTreeSet<u32> = self
            .reply_ports
            .keys()
            .copied()
            .filter(|p| !wanted.contains_key(p))
            .collect();
        gone.extend(
            pins::pinned_names(&self.opts.pin_dir, REPLY_LINK_PREFIX)
                .into_iter()
                .filter_map(|n| n.parse().ok())
                .filter(|p| !wanted.contains_key(p)),
        );
        for port in gone {
            pins::unpin_link(&pins::link_path(&self.opts.pin_dir, &reply_link(port)));
            if let Some(name) = self.reply_ports.remove(&port) {
                if self.tc_netlink {
                    let _ =
                        tc::qdisc_detach_program(&name, TcAttachType::Ingress, program_names::POD_PORT_TC);
                }
                info!(iface = %name, "reply program taken off a port no backend is behind");
            }
        }
        (links, retry)
    }

    /// Writes `ST8S_POD_LINKS` (by counter slot) from the pods' links found for the ports just
    /// written; only what changed, everything on the first call (an earlier agent's entries).
    fn write_pod_links(&mut self, links: &BTreeMap<PortId, PodLink>) -> anyhow::Result<()> {
        let want: BTreeMap<u32, PodLink> = links
            .iter()
            .filter_map(|(id, l)| Some((u32::from(self.writer.slot(*id)?), *l)))
            .collect();
        let mut m: aya::maps::Array<_, PodLink> = aya::maps::Array::try_from(
            self.ebpf
                .map_mut(map_names::POD_LINKS)
                .context("map ST8S_POD_LINKS missing")?,
        )?;
        let first = self.pod_link_entries.is_none();
        let had = self.pod_link_entries.get_or_insert_with(BTreeMap::new);
        for slot in 0..st8s_common::MAX_PORTS {
            let new = want.get(&slot).copied().unwrap_or_default();
            if first || had.get(&slot).copied().unwrap_or_default() != new {
                m.set(slot, new, 0)
                    .with_context(|| format!("writing ST8S_POD_LINKS[{slot}]"))?;
            }
        }
        *had = want;
        Ok(())
    }

    pub fn self_mac(&self) -> String {
        format_mac(&self.self_mac)
    }
}

/// What the reply program's link on bridge port `port` (an ifindex) is pinned as.
const REPLY_LINK_PREFIX: &str = "pod_port_";
fn reply_link(port: u32) -> String {
    format!("{REPLY_LINK_PREFIX}{port}")
}

/// Where a discovery pod's copies go (see `deliver_discovery` in the programs): the host side of
/// its own link, found through the bridge's forwarding database when `dev` (the device of the
/// route to the pod) is a bridge. Until the bridge has learned the pod's MAC, the bridge itself,
/// which floods the copy to every pod on it; the pod is then solicited, so that it answers an ARP
/// request and the bridge learns where it is, and `false` says to look again. Also the pod's
/// MAC, once known (its IPv6 multicast is recognised by it).
fn discovery_link(pod: Ipv4Addr, dev: u32) -> anyhow::Result<(u32, Option<[u8; 6]>, bool)> {
    let mac = net::neighbours()?.get(&pod).copied();
    let port = match mac {
        Some(mac) => net::bridge_port(dev, mac)?,
        None => net::BridgePort::Unknown,
    };
    match port {
        net::BridgePort::Port(link) => Ok((link, mac, true)),
        net::BridgePort::NotABridge if mac.is_some() => Ok((dev, mac, true)),
        net::BridgePort::NotABridge | net::BridgePort::Unknown => {
            net::solicit(pod);
            Ok((dev, mac, false))
        }
    }
}

/// What the agent's loop needs of a dataplane. [`BpfDataplane`] is the kernel's; the loop's tests
/// use one that records what it is given.
pub trait Dataplane {
    /// Makes the maps hold `table`, with `macs` for the other nodes; writes only what changed.
    fn apply(&mut self, table: &Desired, macs: &Macs) -> anyhow::Result<ApplyReport>;
    /// Attaches the programs (after the first [`apply`](Self::apply)).
    fn attach(&mut self) -> anyhow::Result<()>;
    /// Clients on the node itself are steered (the socket hooks are attached).
    fn steers_local_clients(&self) -> bool {
        false
    }
    /// How each hook is attached, `(hook, mode)`, for the log and the metrics.
    fn attach_modes(&self) -> Vec<(&'static str, &'static str)> {
        Vec::new()
    }
}

impl Dataplane for BpfDataplane {
    fn apply(&mut self, table: &Desired, macs: &Macs) -> anyhow::Result<ApplyReport> {
        BpfDataplane::apply(self, table, macs)
    }

    fn attach(&mut self) -> anyhow::Result<()> {
        BpfDataplane::attach(self)?;
        info!(
            xdp_forwards = self.xdp_forwards,
            tc = self.tc_mode(),
            local_clients = self.socket_cgroup.is_some(),
            "dataplane attached"
        );
        Ok(())
    }

    fn steers_local_clients(&self) -> bool {
        self.socket_cgroup.is_some()
    }

    fn attach_modes(&self) -> Vec<(&'static str, &'static str)> {
        vec![
            ("xdp", if self.xdp_forwards { "native" } else { "off" }),
            ("tc", self.tc_mode()),
            (
                "socket",
                if self.socket_cgroup.is_some() {
                    "cgroup"
                } else {
                    "off"
                },
            ),
        ]
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
    pub cgroup: CgroupChoice,
    pub tc: TcChoice,
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
            cgroup: self.cgroup.clone(),
            tc: self.tc,
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
        for addr in desired.peers() {
            match known.get(&addr) {
                Some(mac) => {
                    out.insert(addr, *mac);
                }
                None => net::solicit(addr),
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
    /// Something was programmed provisionally (a discovery pod's link not learned yet, a pod
    /// out of reach): apply again on the next tick.
    pub retry: bool,
    /// Local pods the agent found no path to (their ports are left to the kernel here).
    pub undeliverable: Vec<String>,
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

#[cfg(test)]
mod tests {
    use aya::util::KernelVersion;

    use super::*;

    #[test]
    fn tcx_from_6_6_netlink_before_and_tcx_refused_where_it_is_missing() {
        let debian12 = KernelVersion::new(6, 1, 0);
        let ubuntu2204 = KernelVersion::new(5, 15, 0);
        let here = KernelVersion::new(6, 18, 0);
        assert!(tc_netlink_on(TcChoice::Auto, debian12).expect("auto"));
        assert!(tc_netlink_on(TcChoice::Auto, ubuntu2204).expect("auto"));
        assert!(!tc_netlink_on(TcChoice::Auto, KernelVersion::new(6, 6, 0)).expect("auto"));
        assert!(!tc_netlink_on(TcChoice::Auto, here).expect("auto"));
        assert!(tc_netlink_on(TcChoice::Netlink, here).expect("forced"));
        let refused = tc_netlink_on(TcChoice::Tcx, debian12).expect_err("no TCX on 6.1");
        assert!(refused.to_string().contains("6.6"), "{refused}");
    }
}
