//! The one writer of the steering maps. The agent, the BPF_PROG_TEST_RUN fixtures and the
//! benchmark all write through it, so the bank flip the kernel programs rely on is the one they
//! are tested with.
//!
//! It keeps a copy of what the maps hold and writes only what differs. A port's backends, Maglev
//! row and `PortInfo` go to the idle bank first; one 4-byte `ST8S_PORT_INDEX` write then makes
//! that bank live, so a packet never sees a half-written port.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, Ipv6Addr},
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{Array, HashMap, PerCpuArray, PerCpuValues},
};
use st8s_common::{
    BACKEND_VACANT, Backend, Config, Counters, Discovery, DiscoveryPodKey, DiscoveryPodKey6, LAYOUT_VERSION,
    MAX_PORTS, MacKey, MaglevRow, NodeInfo, PortInfo, PortKey, addr6, addr6_octets, map_names, port_index,
    port_word, word_generation,
};
use tracing::info;

use crate::core::{PortId, Proto};

/// Everything one port's entries hold, bank and slot aside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortContents {
    pub backends: Vec<Backend>,
    /// One backend index per Maglev slot (`MAGLEV_SIZE` of them).
    pub maglev: Vec<u8>,
    /// The backend pod on this node.
    pub local: Option<LocalPod>,
    /// `PORT_*` flags.
    pub flags: u8,
}

/// Where this node's backend pod for a port listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalPod {
    pub addr: Ipv4Addr,
    /// Its IPv6 address on a dual-stack cluster: IPv6 flows are delivered there.
    pub addr6: Option<Ipv6Addr>,
    pub port: u16,
    /// The interface behind which the pod lives.
    pub ifindex: u32,
}

/// A port's live entries, as last written.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PortState {
    info: PortInfo,
    contents: PortContents,
}

/// How many entries a write changed.
#[derive(Debug, Default)]
pub struct WriteCount {
    pub writes: usize,
    pub ports_changed: usize,
}

/// Makes a node map (`ST8S_NODES`, `ST8S_NODES6`) hold `nodes`, writing only what changed
/// since `current`, which it then becomes.
fn sync_nodes<A: Ord + Copy, K: aya::Pod>(
    map: &mut aya::maps::Map,
    current: &mut BTreeMap<A, NodeInfo>,
    nodes: BTreeMap<A, NodeInfo>,
    key: impl Fn(A) -> K,
    count: &mut WriteCount,
) -> anyhow::Result<()> {
    if nodes == *current {
        return Ok(());
    }
    let mut m: HashMap<_, K, NodeInfo> = HashMap::try_from(map)?;
    for (addr, info) in &nodes {
        if current.get(addr) != Some(info) {
            m.insert(key(*addr), info, 0).context("writing a node map")?;
            count.writes += 1;
        }
    }
    for addr in current.keys().filter(|a| !nodes.contains_key(a)) {
        let _ = m.remove(&key(*addr));
        count.writes += 1;
    }
    *current = nodes;
    Ok(())
}

fn map_mut<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name)
        .with_context(|| format!("map {name} missing from the object"))
}

/// The agent's copy of the steering maps, and the only code that writes them.
#[derive(Debug, Default)]
pub struct MapWriter {
    ports: BTreeMap<PortId, PortState>,
    nodes: BTreeMap<Ipv4Addr, NodeInfo>,
    nodes6: BTreeMap<Ipv6Addr, NodeInfo>,
    peer_macs: BTreeSet<[u8; 6]>,
    config: Option<Config>,
    /// `ST8S_DISCOVERY` as last written, by hostPort.
    discovery: BTreeMap<u16, Discovery>,
    /// The last change number written into a port's `ST8S_PORT_INDEX` word, across all ports
    /// and, read back, across restarts (`port_word`).
    generation: u16,
    pub count: WriteCount,
}

impl MapWriter {
    /// A writer for maps that hold nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A writer that starts from what the maps hold (pinned maps a previous agent wrote), so
    /// that its first write changes only what differs.
    pub fn read_back(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        let mut w = MapWriter::default();
        let config: Array<_, Config> = Array::try_from(map_mut(ebpf, map_names::CONFIG)?)?;
        let c = config.get(&0, 0)?;
        // Only a config written by a sync describes anything.
        w.config = (c.layout == LAYOUT_VERSION).then_some(c);
        let nodes: HashMap<_, u32, NodeInfo> = HashMap::try_from(map_mut(ebpf, map_names::NODES)?)?;
        w.nodes = nodes
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (Ipv4Addr::from(u32::from_be(k)), v))
            .collect();
        let nodes6: HashMap<_, [u32; 4], NodeInfo> = HashMap::try_from(map_mut(ebpf, map_names::NODES6)?)?;
        w.nodes6 = nodes6
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (Ipv6Addr::from(addr6_octets(k)), v))
            .collect();
        let macs: HashMap<_, MacKey, u32> = HashMap::try_from(map_mut(ebpf, map_names::PEER_MACS)?)?;
        w.peer_macs = macs.keys().filter_map(Result::ok).map(|k| k.mac).collect();
        let discovery: HashMap<_, u32, Discovery> = HashMap::try_from(map_mut(ebpf, map_names::DISCOVERY)?)?;
        w.discovery = discovery
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (k as u16, v))
            .collect();
        let ports: Vec<(PortKey, PortInfo)> = {
            let m: HashMap<_, PortKey, PortInfo> = HashMap::try_from(map_mut(ebpf, map_names::PORTS)?)?;
            m.iter().filter_map(Result::ok).collect()
        };
        let words: Array<_, u32> = Array::try_from(map_mut(ebpf, map_names::PORT_INDEX)?)?;
        w.generation = ports
            .iter()
            .filter_map(|(k, _)| {
                words
                    .get(&port_index(k.proto, u32::from(u16::from_be(k.port_be))), 0)
                    .ok()
            })
            .map(word_generation)
            .max()
            .unwrap_or(0);
        for (k, info) in ports {
            let Some(proto) = Proto::from_number(k.proto) else {
                continue;
            };
            let id = PortId {
                port: u16::from_be(k.port_be),
                proto,
            };
            let backends: Vec<Backend> = {
                let m: Array<_, Backend> = Array::try_from(map_mut(ebpf, map_names::BACKENDS)?)?;
                (0..u32::from(info.backend_count))
                    .map(|i| m.get(&info.backend_index(i), 0))
                    .collect::<Result<_, _>>()?
            };
            let maglev = {
                let m: Array<_, MaglevRow> = Array::try_from(map_mut(ebpf, map_names::MAGLEV)?)?;
                m.get(&info.maglev_index(), 0)?.slots.to_vec()
            };
            let local = (info.has_local != 0).then(|| LocalPod {
                addr: Ipv4Addr::from(u32::from_be(info.local_addr_be)),
                addr6: (info.local_addr6 != [0; 4]).then(|| Ipv6Addr::from(addr6_octets(info.local_addr6))),
                port: u16::from_be(info.local_port_be),
                ifindex: info.local_ifindex,
            });
            let contents = PortContents {
                backends,
                maglev,
                local,
                flags: info.flags,
            };
            w.ports.insert(id, PortState { info, contents });
        }
        Ok(w)
    }

    /// The config as last written (or read back), if any.
    pub fn config(&self) -> Option<Config> {
        self.config
    }

    /// The ports that hold entries.
    pub fn ports(&self) -> impl Iterator<Item = PortId> + '_ {
        self.ports.keys().copied()
    }

    /// The counter slot of a port.
    pub fn slot(&self, id: PortId) -> Option<u16> {
        self.ports.get(&id).map(|p| p.info.slot)
    }

    pub fn write_config(&mut self, ebpf: &mut Ebpf, config: Config) -> anyhow::Result<()> {
        if self.config != Some(config) {
            let mut m: Array<_, Config> = Array::try_from(map_mut(ebpf, map_names::CONFIG)?)?;
            m.set(0, config, 0).context("writing ST8S_CONFIG")?;
            self.config = Some(config);
            self.count.writes += 1;
        }
        Ok(())
    }

    /// Every node by address, with its MAC (zero when unknown).
    pub fn write_nodes(
        &mut self,
        ebpf: &mut Ebpf,
        nodes: BTreeMap<Ipv4Addr, NodeInfo>,
    ) -> anyhow::Result<()> {
        let m = map_mut(ebpf, map_names::NODES)?;
        sync_nodes(
            m,
            &mut self.nodes,
            nodes,
            |a| u32::from(a).to_be(),
            &mut self.count,
        )
    }

    /// Every node with an IPv6 address, by that address (`ST8S_NODES6`).
    pub fn write_nodes6(
        &mut self,
        ebpf: &mut Ebpf,
        nodes: BTreeMap<Ipv6Addr, NodeInfo>,
    ) -> anyhow::Result<()> {
        let m = map_mut(ebpf, map_names::NODES6)?;
        sync_nodes(m, &mut self.nodes6, nodes, |a| addr6(a.octets()), &mut self.count)
    }

    /// The MACs of the other nodes: a frame from one of them may be a forwarded one.
    pub fn write_peer_macs(&mut self, ebpf: &mut Ebpf, macs: BTreeSet<[u8; 6]>) -> anyhow::Result<()> {
        if macs == self.peer_macs {
            return Ok(());
        }
        let mut m: HashMap<_, MacKey, u32> = HashMap::try_from(map_mut(ebpf, map_names::PEER_MACS)?)?;
        for mac in macs.difference(&self.peer_macs) {
            m.insert(MacKey::new(*mac), 1, 0)
                .context("writing ST8S_PEER_MACS")?;
            self.count.writes += 1;
        }
        for mac in self.peer_macs.difference(&macs) {
            let _ = m.remove(&MacKey::new(*mac));
            self.count.writes += 1;
        }
        self.peer_macs = macs;
        Ok(())
    }

    /// Stops steering a port: its index entry goes first, so no packet reaches its bank.
    pub fn remove_port(&mut self, ebpf: &mut Ebpf, id: PortId) -> anyhow::Result<()> {
        if self.ports.remove(&id).is_none() {
            return Ok(());
        }
        let mut index: Array<_, u32> = Array::try_from(map_mut(ebpf, map_names::PORT_INDEX)?)?;
        index
            .set(port_index(id.proto.number(), u32::from(id.port)), 0, 0)
            .context("writing ST8S_PORT_INDEX")?;
        let mut m: HashMap<_, PortKey, PortInfo> = HashMap::try_from(map_mut(ebpf, map_names::PORTS)?)?;
        let _ = m.remove(&PortKey::new(id.port, id.proto.number()));
        self.count.writes += 1;
        info!(port = %id, "port no longer steered");
        Ok(())
    }

    /// Makes a port hold `contents`: a new port takes a free slot (its counters zeroed), a
    /// changed one is written to its idle bank and flipped live. Returns whether it changed.
    pub fn write_port(
        &mut self,
        ebpf: &mut Ebpf,
        id: PortId,
        contents: PortContents,
    ) -> anyhow::Result<bool> {
        let (slot, bank, contents) = match self.ports.get(&id) {
            Some(s) => {
                let laid = lay_out(&s.contents.backends, contents);
                if same_meaning(&s.contents, &laid) {
                    return Ok(false);
                }
                (s.info.slot, 1 - s.info.bank, laid)
            }
            None => (
                self.free_slot().context("no free port slot")?,
                0,
                lay_out(&[], contents),
            ),
        };
        let local = contents.local;
        let info = PortInfo {
            slot,
            bank,
            backend_count: contents.backends.len() as u16,
            local_addr_be: local.map_or(0, |l| u32::from(l.addr).to_be()),
            local_ifindex: local.map_or(0, |l| l.ifindex),
            local_port_be: local.map_or(0, |l| l.port.to_be()),
            has_local: u8::from(local.is_some()),
            flags: contents.flags,
            _pad: [0; 3],
            local_addr6: local.and_then(|l| l.addr6).map_or([0; 4], |a| addr6(a.octets())),
        };
        {
            let mut m: Array<_, Backend> = Array::try_from(map_mut(ebpf, map_names::BACKENDS)?)?;
            for (i, b) in contents.backends.iter().enumerate() {
                m.set(info.backend_index(i as u32), b, 0)
                    .context("writing ST8S_BACKENDS")?;
            }
        }
        {
            let mut row = MaglevRow::default();
            row.slots.copy_from_slice(&contents.maglev);
            let mut m: Array<_, MaglevRow> = Array::try_from(map_mut(ebpf, map_names::MAGLEV)?)?;
            m.set(info.maglev_index(), row, 0)
                .context("writing ST8S_MAGLEV")?;
        }
        if !self.ports.contains_key(&id) {
            reset_counters(ebpf, u32::from(slot))?;
        }
        // The idle bank's PortInfo, then the one 4-byte index write that makes it live. The
        // word carries a change number no flow has seen, so every flow checks its verdict
        // against the new bank once.
        let mut infos: Array<_, PortInfo> = Array::try_from(map_mut(ebpf, map_names::PORT_INFO)?)?;
        infos
            .set(info.maglev_index(), info, 0)
            .context("writing ST8S_PORT_INFO")?;
        self.generation = self.generation.wrapping_add(1);
        let mut index: Array<_, u32> = Array::try_from(map_mut(ebpf, map_names::PORT_INDEX)?)?;
        index
            .set(
                port_index(id.proto.number(), u32::from(id.port)),
                port_word(self.generation, info.maglev_index()),
                0,
            )
            .context("writing ST8S_PORT_INDEX")?;
        // ST8S_PORTS is what `st8s inspect` and a restarted agent read back.
        let mut m: HashMap<_, PortKey, PortInfo> = HashMap::try_from(map_mut(ebpf, map_names::PORTS)?)?;
        m.insert(PortKey::new(id.port, id.proto.number()), info, 0)
            .context("writing ST8S_PORTS")?;
        self.count.writes += contents.backends.len() + 4;
        self.count.ports_changed += 1;
        self.ports.insert(id, PortState { info, contents });
        Ok(true)
    }

    /// Discovery delivery by hostPort (`slot` filled in from the port). The maps hold the same
    /// entries under different keys (`ST8S_DISCOVERY_PODS6` only those of pods with an IPv6
    /// address and a known MAC); stale ones go first, so that a port that moved to another pod
    /// never has two.
    pub fn write_discovery(&mut self, ebpf: &mut Ebpf, want: BTreeMap<u16, Discovery>) -> anyhow::Result<()> {
        if want == self.discovery {
            return Ok(());
        }
        let pod_key = |d: &Discovery| DiscoveryPodKey {
            pod_addr_be: d.pod_addr_be,
            pod_port_be: d.pod_port_be,
            _pad: 0,
        };
        let pod_key6 = |d: &Discovery| {
            let has6 = d.pod_addr6 != [0; 4] && d.pod_mac != [0; 6];
            has6.then_some(DiscoveryPodKey6 {
                mac: d.pod_mac,
                pod_port_be: d.pod_port_be,
            })
        };
        for (port, old) in &self.discovery {
            if want.get(port) != Some(old) {
                let mut m: HashMap<_, u32, Discovery> =
                    HashMap::try_from(map_mut(ebpf, map_names::DISCOVERY)?)?;
                let _ = m.remove(&u32::from(*port));
                let mut p: HashMap<_, DiscoveryPodKey, Discovery> =
                    HashMap::try_from(map_mut(ebpf, map_names::DISCOVERY_PODS)?)?;
                let _ = p.remove(&pod_key(old));
                if let Some(k) = pod_key6(old) {
                    let mut p6: HashMap<_, DiscoveryPodKey6, Discovery> =
                        HashMap::try_from(map_mut(ebpf, map_names::DISCOVERY_PODS6)?)?;
                    let _ = p6.remove(&k);
                }
                self.count.writes += 2;
                info!(port = *port, "discovery delivery stopped");
            }
        }
        for (port, d) in &want {
            if self.discovery.get(port) != Some(d) {
                let mut p: HashMap<_, DiscoveryPodKey, Discovery> =
                    HashMap::try_from(map_mut(ebpf, map_names::DISCOVERY_PODS)?)?;
                p.insert(pod_key(d), d, 0)
                    .context("writing ST8S_DISCOVERY_PODS")?;
                if let Some(k) = pod_key6(d) {
                    let mut p6: HashMap<_, DiscoveryPodKey6, Discovery> =
                        HashMap::try_from(map_mut(ebpf, map_names::DISCOVERY_PODS6)?)?;
                    p6.insert(k, d, 0).context("writing ST8S_DISCOVERY_PODS6")?;
                }
                let mut m: HashMap<_, u32, Discovery> =
                    HashMap::try_from(map_mut(ebpf, map_names::DISCOVERY)?)?;
                m.insert(u32::from(*port), d, 0)
                    .context("writing ST8S_DISCOVERY")?;
                self.count.writes += 2;
                info!(port = *port, pod = %Ipv4Addr::from(u32::from_be(d.pod_addr_be)), "discovery delivered to the local pod");
            }
        }
        self.discovery = want;
        Ok(())
    }

    fn free_slot(&self) -> Option<u16> {
        let used: BTreeSet<u16> = self.ports.values().map(|p| p.info.slot).collect();
        (0..MAX_PORTS as u16).find(|s| !used.contains(s))
    }
}

/// The place of no node in a port's backend list.
const VACANT: Backend = Backend {
    node_addr_be: 0,
    node_mac: [0; 6],
    flags: BACKEND_VACANT,
    _pad: 0,
};

/// `want` laid out over the list as it was (`before`): every node keeps its place, a node that
/// left leaves its place vacant, a new node takes the first vacant place (or the end), and the
/// Maglev row is renumbered to match. A flow's backend hint then names its node's place for as
/// long as the node serves the port, which is what the packet path checks, with one read.
/// Places are at most as many as the larger of the two lists (256 at most), since a vacant place
/// is taken before the list grows.
fn lay_out(before: &[Backend], mut want: PortContents) -> PortContents {
    let mut places: Vec<Option<Backend>> = vec![None; before.len()];
    let mut place_of = vec![0usize; want.backends.len()];
    let mut newcomers = Vec::new();
    for (i, b) in want.backends.iter().enumerate() {
        let kept = before
            .iter()
            .position(|p| p.flags & BACKEND_VACANT == 0 && p.node_addr_be == b.node_addr_be)
            .filter(|&p| places[p].is_none());
        match kept {
            Some(p) => {
                places[p] = Some(*b);
                place_of[i] = p;
            }
            None => newcomers.push(i),
        }
    }
    for i in newcomers {
        let p = places.iter().position(Option::is_none).unwrap_or_else(|| {
            places.push(None);
            places.len() - 1
        });
        places[p] = Some(want.backends[i]);
        place_of[i] = p;
    }
    while places.last().is_some_and(Option::is_none) {
        places.pop();
    }
    want.backends = places.into_iter().map(|p| p.unwrap_or(VACANT)).collect();
    for slot in &mut want.maglev {
        if let Some(&p) = place_of.get(usize::from(*slot)) {
            // At most MAX_BACKENDS (256) places: they fit the row's bytes.
            *slot = p as u8;
        }
    }
    want
}

/// Whether two layouts of a port steer alike: the same backends (wherever they sit), every Maglev
/// slot naming the same backend, the same local pod and flags.
fn same_meaning(a: &PortContents, b: &PortContents) -> bool {
    let nodes = |c: &PortContents| {
        let mut v: Vec<Backend> = c
            .backends
            .iter()
            .filter(|b| b.flags & BACKEND_VACANT == 0)
            .copied()
            .collect();
        v.sort_by_key(|b| u32::from_be(b.node_addr_be));
        v
    };
    a.local == b.local
        && a.flags == b.flags
        && a.maglev.len() == b.maglev.len()
        && nodes(a) == nodes(b)
        && a.maglev
            .iter()
            .zip(&b.maglev)
            .all(|(x, y)| a.backends.get(usize::from(*x)) == b.backends.get(usize::from(*y)))
}

fn reset_counters(ebpf: &mut Ebpf, slot: u32) -> anyhow::Result<()> {
    let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
    let mut m: PerCpuArray<_, Counters> = PerCpuArray::try_from(map_mut(ebpf, map_names::COUNTERS)?)?;
    let zero = PerCpuValues::try_from(vec![Counters::default(); cpus])?;
    m.set(slot, zero, 0).context("resetting ST8S_COUNTERS")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(last: u8) -> Backend {
        Backend {
            node_addr_be: u32::from(Ipv4Addr::new(10, 0, 0, last)).to_be(),
            node_mac: [2, 0, 0, 0, 0, last],
            flags: 0,
            _pad: 0,
        }
    }

    fn port(backends: Vec<Backend>, maglev: Vec<u8>) -> PortContents {
        PortContents {
            backends,
            maglev,
            local: None,
            flags: 0,
        }
    }

    #[test]
    fn nodes_keep_their_places_and_newcomers_take_vacant_ones() {
        let first = lay_out(&[], port(vec![node(1), node(2), node(3)], vec![0, 1, 2, 2]));
        assert_eq!(first.backends, vec![node(1), node(2), node(3)]);
        // Node 1 leaves, node 4 arrives listed first: 2 and 3 stay put, 4 takes 1's place, and
        // the row (given against the new list) names the same nodes at their places.
        let second = lay_out(
            &first.backends,
            port(vec![node(4), node(2), node(3)], vec![0, 1, 2, 0]),
        );
        assert_eq!(second.backends, vec![node(4), node(2), node(3)]);
        assert_eq!(second.maglev, vec![0, 1, 2, 0]);
        // Node 2 leaves: its place stays vacant; the row is renumbered to the places.
        let third = lay_out(&second.backends, port(vec![node(4), node(3)], vec![1, 0]));
        assert_eq!(third.backends, vec![node(4), VACANT, node(3)]);
        assert_eq!(third.maglev, vec![2, 0]);
        // A vacant place at the end is dropped.
        let fourth = lay_out(&third.backends, port(vec![node(4)], vec![0]));
        assert_eq!(fourth.backends, vec![node(4)]);
    }

    #[test]
    fn a_full_list_replaced_by_other_nodes_stays_within_256_places() {
        let full: Vec<Backend> = (0..=255u8)
            .map(|i| Backend {
                node_mac: [i; 6],
                ..node(i)
            })
            .collect();
        let before = lay_out(&[], port(full, vec![255])).backends;
        let others: Vec<Backend> = (0..=255u8)
            .map(|i| Backend {
                node_addr_be: u32::from(Ipv4Addr::new(10, 1, 0, i)).to_be(),
                ..node(i)
            })
            .collect();
        let after = lay_out(&before, port(others.clone(), vec![255]));
        assert_eq!(after.backends, others);
        assert_eq!(after.maglev, vec![255]);
    }

    #[test]
    fn a_relaid_port_with_the_same_nodes_means_the_same() {
        let a = lay_out(&[], port(vec![node(1), node(2)], vec![0, 1]));
        // The same port listed the other way round: the places stay, nothing to write.
        let b = lay_out(&a.backends, port(vec![node(2), node(1)], vec![1, 0]));
        assert_eq!(b.backends, a.backends);
        assert!(same_meaning(&a, &b));
        let c = lay_out(&a.backends, port(vec![node(2), node(1)], vec![0, 0]));
        assert!(!same_meaning(&a, &c), "the row now names node 2 everywhere");
    }
}
