//! Map keys, values and names shared by the st8s kernel programs and the `st8s` agent.
//!
//! Every type here is `#[repr(C)]`, built from fixed-width integers only, with explicit padding
//! and a size assertion, so that the kernel programs, the agent and `bpftool` agree byte for byte.
//! Fields carrying network byte order end in `_be`.
#![no_std]

/// Names of the maps, as they appear in the object file, in `bpftool map list` and under the
/// agent's pin directory (`/sys/fs/bpf/st8s/<name>`).
pub mod map_names {
    pub const CONFIG: &str = "ST8S_CONFIG";
    pub const PORTS: &str = "ST8S_PORTS";
    pub const PORT_INDEX: &str = "ST8S_PORT_INDEX";
    pub const PORT_INFO: &str = "ST8S_PORT_INFO";
    pub const BACKENDS: &str = "ST8S_BACKENDS";
    pub const MAGLEV: &str = "ST8S_MAGLEV";
    pub const NODES: &str = "ST8S_NODES";
    pub const PEER_MACS: &str = "ST8S_PEER_MACS";
    pub const FLOWS: &str = "ST8S_FLOWS";
    pub const REVNAT: &str = "ST8S_REVNAT";
    pub const COUNTERS: &str = "ST8S_COUNTERS";
    pub const DISCOVERY: &str = "ST8S_DISCOVERY";
    pub const DISCOVERY_PODS: &str = "ST8S_DISCOVERY_PODS";
    pub const SOCK_REVNAT: &str = "ST8S_SOCK_REVNAT";
    pub const FRAGS: &str = "ST8S_FRAGS";
    pub const NODES6: &str = "ST8S_NODES6";
    pub const FLOWS6: &str = "ST8S_FLOWS6";
    pub const REVNAT6: &str = "ST8S_REVNAT6";
    pub const FRAGS6: &str = "ST8S_FRAGS6";
    pub const SOCK_REVNAT6: &str = "ST8S_SOCK_REVNAT6";
    pub const DISCOVERY_PODS6: &str = "ST8S_DISCOVERY_PODS6";
    pub const MONITOR: &str = "ST8S_MONITOR";
    pub const EVENTS: &str = "ST8S_EVENTS";
    pub const POD_LINKS: &str = "ST8S_POD_LINKS";

    pub const ALL: [&str; 24] = [
        CONFIG,
        PORTS,
        PORT_INDEX,
        PORT_INFO,
        BACKENDS,
        MAGLEV,
        NODES,
        PEER_MACS,
        FLOWS,
        REVNAT,
        COUNTERS,
        DISCOVERY,
        DISCOVERY_PODS,
        SOCK_REVNAT,
        FRAGS,
        NODES6,
        FLOWS6,
        REVNAT6,
        FRAGS6,
        SOCK_REVNAT6,
        DISCOVERY_PODS6,
        MONITOR,
        EVENTS,
        POD_LINKS,
    ];
}

/// Names of the kernel programs in the object file.
pub mod program_names {
    /// XDP on the node's uplink: forwards flows owned by another node straight back out.
    pub const UPLINK_XDP: &str = "st8s_uplink_xdp";
    /// TC ingress on the uplink: delivers to the local backend pod (and forwards when XDP is off).
    pub const UPLINK_TC: &str = "st8s_uplink_tc";
    /// TC ingress on the pod-facing interface: reverse translation of backend replies.
    pub const POD_TC: &str = "st8s_pod_tc";
    /// TC ingress on a local backend pod's own bridge port: the reply half of `POD_TC`, before
    /// the bridge (and br_netfilter) sees the frame.
    pub const POD_PORT_TC: &str = "st8s_pod_port_tc";
    /// `XDP_PASS` only: the lab attaches it to the switch side of each veth uplink.
    pub const XDP_PASS: &str = "st8s_xdp_pass";
    /// Socket-level steering for clients on the node itself (its processes and its pods), attached
    /// at the node's cgroup v2 root: `connect()` and `sendmsg()` to a node address on a steered
    /// port are sent to the chosen backend; `recvmsg()` and `getpeername()` show the address the
    /// application used.
    pub const SOCK_CONNECT4: &str = "st8s_sock_connect4";
    pub const SOCK_SENDMSG4: &str = "st8s_sock_sendmsg4";
    pub const SOCK_RECVMSG4: &str = "st8s_sock_recvmsg4";
    pub const SOCK_GETPEERNAME4: &str = "st8s_sock_getpeername4";
    /// The same for IPv6 sockets (and for dual-stack sockets naming an IPv6 address).
    pub const SOCK_CONNECT6: &str = "st8s_sock_connect6";
    pub const SOCK_SENDMSG6: &str = "st8s_sock_sendmsg6";
    pub const SOCK_RECVMSG6: &str = "st8s_sock_recvmsg6";
    pub const SOCK_GETPEERNAME6: &str = "st8s_sock_getpeername6";
    /// The socket programs, with the hook each attaches to.
    pub const SOCKET: [&str; 8] = [
        SOCK_CONNECT4,
        SOCK_SENDMSG4,
        SOCK_RECVMSG4,
        SOCK_GETPEERNAME4,
        SOCK_CONNECT6,
        SOCK_SENDMSG6,
        SOCK_RECVMSG6,
        SOCK_GETPEERNAME6,
    ];
    /// Benchmark baselines: header parsing only.
    pub const PARSE_ONLY_XDP: &str = "st8s_parse_only_xdp";
    pub const PARSE_ONLY_TC: &str = "st8s_parse_only_tc";
    /// Benchmark reference: parsing plus one flow-table lookup.
    pub const PARSE_LOOKUP_XDP: &str = "st8s_parse_lookup_xdp";
    /// Benchmark reference: `st8s_uplink_xdp` with the monitor compiled out.
    pub const UPLINK_XDP_UNMONITORED: &str = "st8s_uplink_xdp_unmonitored";
}

/// Version of what the maps mean. Bump it whenever a map's meaning changes without its shape
/// (key size, value size, type, capacity) changing: an agent that finds pinned maps written under
/// another version rebuilds them instead of misreading them (unless the version is one of
/// `ADOPTED_LAYOUTS`). Shape changes are detected anyway.
///
/// 2: `ST8S_PORT_INDEX` words carry a generation in their high half, and `FlowValue` grew the
/// fields that let a flow decide with one lookup (issue 18).
pub const LAYOUT_VERSION: u16 = 2;

/// Older layouts whose maps this release reads as its own: layout 1's index words are words of
/// generation 0, and its flow entries are carried over with the new fields zeroed (never
/// checked). An agent of layout 1 finds layout 2 and rebuilds, so a downgrade never misreads.
pub const ADOPTED_LAYOUTS: &[u16] = &[1];

/// Steered (port, protocol) pairs at most. A home cluster exposes a handful.
pub const MAX_PORTS: u32 = 64;
/// Backends (nodes owning a backend pod) per steered port at most: as many as a cluster has
/// nodes, so an ingress run as a DaemonSet lists every node. Maglev rows index backends with a
/// `u8` (0..=255).
pub const MAX_BACKENDS: u32 = MAX_NODES;
/// Maglev lookup-table size: prime, and at least 100x the backends a port can have (25,601 >=
/// 100 x 256), the rule of Maglev (paper, sec. 5.3: M > 100 N keeps each backend's share within
/// about 1 % of 1/N) and of Katran's default ring (65,537 for its backends). 128 rows of it are
/// 3.3 MB of map memory.
pub const MAGLEV_SIZE: usize = 25_601;
/// Each port has two banks of backends and Maglev rows: the agent fills the idle bank, then flips
/// `PortInfo::bank` with one map write, so a packet never sees a half-written table.
pub const BANKS: u32 = 2;
/// Connection-tracking entries (LRU: the least recently used flow is evicted first).
pub const MAX_FLOWS: u32 = 65_536;
/// Cluster nodes at most.
pub const MAX_NODES: u32 = 256;
/// `ST8S_PORT_INDEX`: one `u32` word per (protocol, port), TCP first, then UDP. 0: not steered;
/// otherwise its low 16 bits are 1 + the index of the live `PortInfo` in `ST8S_PORT_INFO`
/// (slot * BANKS + bank) and its high 16 bits the port's generation (see [`port_word`]). The
/// packet path reads two arrays instead of hashing, and a port flips to its other bank with one
/// aligned 4-byte write.
pub const PORT_INDEX_ENTRIES: u32 = 2 * 65536;

/// The `ST8S_PORT_INDEX` word of a port whose live `PortInfo` is `info_index`, written by the
/// agent's change number `generation`. Every change of a port writes a word no flow has seen
/// (the agent counts changes across all ports and restarts), so a flow entry that holds the word
/// it was checked under knows, by one comparison, that its verdict still stands (issue 18). The
/// count wraps after 65,536 changes: a flow would have to stay idle across exactly that many,
/// and land on the same bank, to be taken for current.
pub const fn port_word(generation: u16, info_index: u32) -> u32 {
    (generation as u32) << 16 | (info_index + 1)
}

/// The index of the live `PortInfo` named by a non-zero `ST8S_PORT_INDEX` word.
pub const fn word_info_index(word: u32) -> u32 {
    (word & 0xffff).wrapping_sub(1)
}

/// The counter slot of the port a non-zero `ST8S_PORT_INDEX` word names.
pub const fn word_slot(word: u32) -> u32 {
    word_info_index(word) / BANKS
}

/// The generation in an `ST8S_PORT_INDEX` word.
pub const fn word_generation(word: u32) -> u16 {
    (word >> 16) as u16
}

const _: () = assert!(
    MAX_PORTS * BANKS < 0xffff,
    "PortInfo indexes must fit a word's low half"
);

/// The entry of `ST8S_PORT_INDEX` for (`proto`, `port`).
pub const fn port_index(proto: u8, port: u32) -> u32 {
    let base = if proto == PROTO_UDP { 65536 } else { 0 };
    base + (port & 0xffff)
}

/// Slot of the counters not tied to a steered port.
pub const GLOBAL_COUNTER_SLOT: u32 = MAX_PORTS;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// `Config::flags`: prefer the node's own backend pod over remote ones when it has one.
pub const CONFIG_PREFER_LOCAL: u32 = 1;
/// `Config::flags`: the XDP program is attached and forwards remote flows itself.
pub const CONFIG_XDP_FORWARDS: u32 = 2;
/// `Config::flags`: the TC programs are attached through netlink (clsact + cls_bpf filters), on
/// kernels without TCX links (before 6.6). Read by `st8s inspect`; the programs ignore it.
pub const CONFIG_TC_NETLINK: u32 = 4;

/// `Backend::flags`: this backend is the node the program runs on.
pub const BACKEND_LOCAL: u8 = 1;
/// `Backend::flags`: the backend's pod is draining (NotReady or terminating, TCP only): flows
/// already on it stay, the Maglev table sends no new flow to it.
pub const BACKEND_DRAINING: u8 = 2;
/// `Backend::flags`: a place in the list that no node holds (its node left; a node that arrives
/// later takes it). Every node keeps its place in a port's list while it serves the port, so a
/// flow's `backend_hint` names its node's place for the flow's whole life.
pub const BACKEND_VACANT: u8 = 4;

/// `FlowValue::kind`.
pub const FLOW_LOCAL: u8 = 1;
pub const FLOW_REMOTE: u8 = 2;

macro_rules! assert_size {
    ($ty:ty, $size:expr) => {
        const _: () = assert!(core::mem::size_of::<$ty>() == $size);
    };
}

/// Node-wide settings; a one-entry array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// This node's InternalIP: the frontend address of every steered port.
    pub self_addr_be: u32,
    /// The uplink interface the programs are attached to.
    pub uplink_ifindex: u32,
    /// Seed of the flow hash. All agents use the same value, so all nodes build the same tables.
    pub hash_seed: u32,
    /// `CONFIG_*` bits.
    pub flags: u32,
    pub self_mac: [u8; 6],
    /// `LAYOUT_VERSION` of the agent that wrote the maps; 0 before the first sync.
    pub layout: u16,
    /// The uplink subnet's broadcast address (0 if none): discovery broadcasts may use it.
    pub broadcast_be: u32,
    /// This node's IPv6 InternalIP, all zeros when it has none (IPv6 is then not steered).
    pub self_addr6: Addr6,
    /// The uplink's IPv6 link-local address (all zeros if none): discovery pods' IPv6 multicast
    /// leaves from it, as a LAN host's link-scope multicast does.
    pub self_ll6: Addr6,
}
assert_size!(Config, 60);

/// Key of `ST8S_PORTS`, the agent's registry of steered hostPorts (the packet path reads
/// `ST8S_PORT_INDEX` and `ST8S_PORT_INFO` instead).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}
assert_size!(PortKey, 4);

impl PortKey {
    pub const fn new(port: u16, proto: u8) -> Self {
        Self {
            port_be: port.to_be(),
            proto,
            _pad: 0,
        }
    }
}

/// Value of `ST8S_PORTS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortInfo {
    /// Index of this port in the counters and, with `bank`, in the backend and Maglev tables.
    pub slot: u16,
    /// Number of valid entries in the live backend bank (up to `MAX_BACKENDS`, 256: a `u16`);
    /// 0 means "pass to the stack".
    pub backend_count: u16,
    /// The backend pod on this node: address, containerPort and the interface its network hangs
    /// off. Valid when `has_local` is 1.
    pub local_addr_be: u32,
    pub local_ifindex: u32,
    pub local_port_be: u16,
    /// Which of the two banks is live.
    pub bank: u8,
    pub has_local: u8,
    /// `PORT_*` bits.
    pub flags: u8,
    pub _pad: [u8; 3],
    /// The local backend pod's IPv6 address (all zeros if it has none: IPv6 flows are then
    /// not delivered to it).
    pub local_addr6: Addr6,
}
assert_size!(PortInfo, 36);

/// An IPv6 address as it sits in a packet: four 32-bit words in network byte order. All zeros
/// means "none".
pub type Addr6 = [u32; 4];

/// `Addr6` from the 16 bytes of an address.
pub const fn addr6(octets: [u8; 16]) -> Addr6 {
    let o = octets;
    [
        u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
        u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
        u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
        u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
    ]
}

/// The 16 bytes of an `Addr6`.
pub const fn addr6_octets(a: Addr6) -> [u8; 16] {
    let (w0, w1, w2, w3) = (
        a[0].to_ne_bytes(),
        a[1].to_ne_bytes(),
        a[2].to_ne_bytes(),
        a[3].to_ne_bytes(),
    );
    [
        w0[0], w0[1], w0[2], w0[3], w1[0], w1[1], w1[2], w1[3], w2[0], w2[1], w2[2], w2[3], w3[0], w3[1],
        w3[2], w3[3],
    ]
}

/// `PortInfo::flags`: the local backend pod is draining (NotReady or terminating): its
/// established flows keep reaching it, new flows go elsewhere.
pub const PORT_LOCAL_DRAINING: u8 = 1;

impl PortInfo {
    /// Index into `ST8S_BACKENDS` of backend `i` in the live bank.
    pub const fn backend_index(&self, i: u32) -> u32 {
        (self.slot as u32 * BANKS + self.bank as u32) * MAX_BACKENDS + i
    }
    /// Index into `ST8S_MAGLEV` of the live row.
    pub const fn maglev_index(&self) -> u32 {
        self.slot as u32 * BANKS + self.bank as u32
    }
}

/// Value of `ST8S_BACKENDS`: a node that runs a backend pod for a port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub node_addr_be: u32,
    pub node_mac: [u8; 6],
    /// `BACKEND_*` bits.
    pub flags: u8,
    pub _pad: u8,
}
assert_size!(Backend, 12);

/// Value of `ST8S_MAGLEV`: one port's lookup table; each byte is a backend index.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MaglevRow {
    pub slots: [u8; MAGLEV_SIZE],
    pub _pad: [u8; 7],
}
assert_size!(MaglevRow, 25_608);

impl Default for MaglevRow {
    fn default() -> Self {
        Self {
            slots: [0; MAGLEV_SIZE],
            _pad: [0; 7],
        }
    }
}

/// Value of `ST8S_NODES` (keyed by the node's address, `u32` in network byte order) and of
/// `ST8S_NODES6` (keyed by its IPv6 address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
    /// The node's IPv6 InternalIP (all zeros if none): where the socket hooks send an IPv6
    /// client's connection that this node is chosen for.
    pub addr6: Addr6,
}
assert_size!(NodeInfo, 24);

/// Key of `ST8S_PEER_MACS`: the MAC address of a cluster node's uplink. A packet forwarded by a
/// peer is accepted only when its Ethernet source is one of these.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MacKey {
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}
assert_size!(MacKey, 8);

impl MacKey {
    pub const fn new(mac: [u8; 6]) -> Self {
        Self { mac, _pad: [0; 2] }
    }
}

/// Key of `ST8S_FLOWS`: a client's flow as it arrives at this node's own address and a hostPort.
/// A node tracks flows only to its own address, so the address is not part of the key (layouts 1
/// and 2 carried it: [`FLOW_KEY_V2_SIZE`]); a shorter key is a shorter hash on every packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub client_addr_be: u32,
    pub client_port_be: u16,
    pub frontend_port_be: u16,
    pub proto: u8,
    /// Padding as scalars: an odd-sized array here makes LLVM call `memset` in the BPF programs.
    pub _pad: u8,
    pub _pad2: u16,
}
assert_size!(FlowKey, 12);

/// Key of `ST8S_FLOWS6`: an IPv6 client's flow, as [`FlowKey`] (its value is the same
/// [`FlowValue`]: a remote backend is named by its node's IPv4 address, the identity the
/// backend lists and Maglev rows use for both families). 24 bytes instead of layout 2's 40: the
/// kernel's `jhash` takes one mixing round for it where it took three.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey6 {
    pub client_addr: Addr6,
    pub client_port_be: u16,
    pub frontend_port_be: u16,
    pub proto: u8,
    pub _pad: u8,
    pub _pad2: u16,
}
assert_size!(FlowKey6, 24);

/// The size of a `FlowKey` of layouts 1 and 2: the client's address, the frontend (this node's)
/// address, then the fields `FlowKey` has now, in its order.
pub const FLOW_KEY_V2_SIZE: usize = 16;
/// The size of a `FlowKey6` of layouts 1 and 2, laid out as [`FLOW_KEY_V2_SIZE`]'s.
pub const FLOW_KEY6_V2_SIZE: usize = 40;

impl FlowKey {
    /// A flow key of layouts 1 and 2, as the kernel stores it, without its frontend address.
    pub fn from_v2(k: [u8; FLOW_KEY_V2_SIZE]) -> Self {
        let b = |i: usize| k[i];
        FlowKey {
            client_addr_be: u32::from_ne_bytes([b(0), b(1), b(2), b(3)]),
            client_port_be: u16::from_ne_bytes([b(8), b(9)]),
            frontend_port_be: u16::from_ne_bytes([b(10), b(11)]),
            proto: b(12),
            ..Default::default()
        }
    }
}

impl FlowKey6 {
    /// [`FlowKey::from_v2`] for IPv6.
    pub fn from_v2(k: [u8; FLOW_KEY6_V2_SIZE]) -> Self {
        let word = |i: usize| u32::from_ne_bytes([k[i], k[i + 1], k[i + 2], k[i + 3]]);
        FlowKey6 {
            client_addr: [word(0), word(4), word(8), word(12)],
            client_port_be: u16::from_ne_bytes([k[32], k[33]]),
            frontend_port_be: u16::from_ne_bytes([k[34], k[35]]),
            proto: k[36],
            ..Default::default()
        }
    }
}

/// Value of `ST8S_FLOWS`: where the flow goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// `FLOW_REMOTE`: the node forwarded to. `FLOW_LOCAL`: the local backend pod.
    pub backend_addr_be: u32,
    /// `FLOW_LOCAL`: the pod's containerPort. Unused for remote flows.
    pub backend_port_be: u16,
    pub kind: u8,
    /// `FLOW_REMOTE`: where the backend sat in the port's list when it was chosen, so that the
    /// packet path checks that one entry first instead of scanning the list.
    pub backend_hint: u8,
    /// `bpf_ktime_get_ns` when the flow was steered (the LRU keeps recency itself; nothing is
    /// written per packet).
    pub created_ns: u64,
    /// The port's `ST8S_PORT_INDEX` word when this verdict was last checked against the port's
    /// backends (0: never, as in an entry carried over from a release without it). While the
    /// port's word is still this one, the verdict stands without reading the port or its
    /// backends: one flow lookup decides.
    pub port_word: u32,
    /// `FLOW_REMOTE`: the MAC of the backend's node as of `port_word`.
    pub node_mac: [u8; 6],
    pub _pad: [u8; 6],
}
assert_size!(FlowValue, 32);

/// The size of a `FlowValue` of layout 1: the fields up to `created_ns`.
pub const FLOW_VALUE_V1_SIZE: usize = 16;

impl FlowValue {
    /// A flow entry of layout 1 (the fields up to `created_ns`, as the kernel stores them), with
    /// the fields added since zeroed: never checked, so its first packet checks it.
    pub fn from_v1(v: [u8; FLOW_VALUE_V1_SIZE]) -> Self {
        let b = |i: usize| v[i];
        FlowValue {
            backend_addr_be: u32::from_ne_bytes([b(0), b(1), b(2), b(3)]),
            backend_port_be: u16::from_ne_bytes([b(4), b(5)]),
            kind: b(6),
            backend_hint: b(7),
            created_ns: u64::from_ne_bytes([b(8), b(9), b(10), b(11), b(12), b(13), b(14), b(15)]),
            ..Default::default()
        }
    }
}

/// Discovery ports a node delivers broadcast and multicast to: one per (UDP) hostPort whose pod
/// on this node declares it in `st8s.io/discovery`.
pub const MAX_DISCOVERY: u32 = MAX_PORTS;

/// Value of `ST8S_DISCOVERY` (key: the hostPort, a `u32` in host byte order), of
/// `ST8S_DISCOVERY_PODS` and of `ST8S_DISCOVERY_PODS6`: the pod on this node that listens for a
/// discovery port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Discovery {
    pub pod_addr_be: u32,
    /// The pod's containerPort.
    pub pod_port_be: u16,
    pub host_port_be: u16,
    /// Counter slot of the port.
    pub slot: u16,
    pub _pad: u16,
    /// Where the copy is sent, still addressed to the broadcast or the group: the host side of
    /// the pod's own link (its veth), or, until that is known, the bridge it hangs off, which
    /// floods it to every pod on it.
    pub ifindex: u32,
    /// The pod's IPv6 address, all zeros when it has none (IPv6 multicast is then not copied).
    pub pod_addr6: Addr6,
    /// The pod's MAC: its IPv6 multicast leaves from its link-local address, which the agent
    /// does not know, so `ST8S_DISCOVERY_PODS6` recognises it by MAC. All zeros until learned.
    pub pod_mac: [u8; 6],
    pub _pad2: [u8; 2],
}
assert_size!(Discovery, 40);

/// Value of `ST8S_POD_LINKS`, by a port's counter slot: the host side of the local backend
/// pod's own veth, into whose peer (the pod's `eth0`) the uplink program hands the pod's packets
/// with `bpf_redirect_peer`, addressed to `pod_mac`: no FIB lookup, no bridge, no second pass
/// through the backlog queue. The entry counts only while `pod_addr_be` is the port's
/// `PortInfo::local_addr_be` (the two maps are written one after the other); otherwise, and with
/// `ifindex` 0, packets go to `PortInfo::local_ifindex` by `bpf_redirect_neigh` as before.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodLink {
    pub pod_addr_be: u32,
    pub ifindex: u32,
    pub pod_mac: [u8; 6],
    pub _pad: [u8; 2],
}
assert_size!(PodLink, 16);

/// Key of `ST8S_DISCOVERY_PODS`: a discovery pod's socket, as its announcements leave it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DiscoveryPodKey {
    pub pod_addr_be: u32,
    pub pod_port_be: u16,
    pub _pad: u16,
}
assert_size!(DiscoveryPodKey, 8);

/// Key of `ST8S_DISCOVERY_PODS6`: a discovery pod's IPv6 socket, by the pod's MAC (its
/// link-scope multicast comes from a link-local address) and containerPort.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DiscoveryPodKey6 {
    pub mac: [u8; 6],
    pub pod_port_be: u16,
}
assert_size!(DiscoveryPodKey6, 8);

/// Key of `ST8S_REVNAT`: a backend pod's reply as it leaves the pod.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNatKey {
    pub pod_addr_be: u32,
    pub client_addr_be: u32,
    pub pod_port_be: u16,
    pub client_port_be: u16,
    pub proto: u8,
    /// Padding as scalars: an odd-sized array here makes LLVM call `memset` in the BPF programs.
    pub _pad: u8,
    pub _pad2: u16,
}
assert_size!(RevNatKey, 16);

/// Value of `ST8S_REVNAT`: the address and port the client originally sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNatValue {
    pub frontend_addr_be: u32,
    pub frontend_port_be: u16,
    /// Counter slot of the port.
    pub slot: u16,
    pub _pad: [u8; 8],
    /// `bpf_ktime_get_ns` of the last TCP SYN (or UDP datagram) st8s delivered on this flow: a
    /// pod's SYN-ACK, or a UDP reply, with an old stamp belongs to another path and is not
    /// rewritten.
    pub stamp_ns: u64,
}
assert_size!(RevNatValue, 24);

/// Key of `ST8S_REVNAT6`: an IPv6 backend reply as it leaves the pod, as [`RevNatKey`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RevNatKey6 {
    pub pod_addr: Addr6,
    pub client_addr: Addr6,
    pub pod_port_be: u16,
    pub client_port_be: u16,
    pub proto: u8,
    pub _pad: u8,
    pub _pad2: u16,
}
assert_size!(RevNatKey6, 40);

/// Value of `ST8S_REVNAT6`, as [`RevNatValue`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNatValue6 {
    pub frontend_addr: Addr6,
    pub frontend_port_be: u16,
    pub slot: u16,
    pub _pad: u32,
    pub stamp_ns: u64,
}
assert_size!(RevNatValue6, 32);

/// Datagrams in fragments st8s follows at once (`ST8S_FRAGS`): a train lives for the time its
/// first fragment's entry stays (LRU), and at most [`FRAG_TIMEOUT_NS`].
pub const MAX_FRAGS: u32 = 8_192;
/// How long a first fragment's ports apply to the rest of its datagram: the kernel's own
/// reassembly timeout (`net.ipv4.ipfrag_time`, 30 s by default).
pub const FRAG_TIMEOUT_NS: u64 = 30_000_000_000;

/// Key of `ST8S_FRAGS`: one IP datagram in fragments, as the receiver reassembles it (RFC 791:
/// source, destination, protocol and identification), as it sits in the packet st8s sees.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub id_be: u16,
    pub proto: u8,
    pub _pad: u8,
}
assert_size!(FragKey, 12);

/// Key of `ST8S_FRAGS6`: an IPv6 datagram in fragments (RFC 8200 section 4.5: source,
/// destination and the fragment header's 32-bit identification). The value is a [`FragValue`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey6 {
    pub saddr: Addr6,
    pub daddr: Addr6,
    pub id_be: u32,
    pub proto: u8,
    pub _pad: u8,
    pub _pad2: u16,
}
assert_size!(FragKey6, 40);

/// Value of `ST8S_FRAGS`: the ports the first fragment carried, which the later ones lack, and
/// when st8s saw it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragValue {
    pub sport_be: u16,
    pub dport_be: u16,
    pub _pad: u32,
    pub stamp_ns: u64,
}
assert_size!(FragValue, 16);

/// Key of `ST8S_SOCK_REVNAT`: a socket that socket-level steering sent to a backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNatKey {
    /// `bpf_get_socket_cookie`: unique per socket while it lives.
    pub cookie: u64,
    pub backend_addr_be: u32,
    pub backend_port_be: u16,
    pub _pad: u16,
}
assert_size!(SockRevNatKey, 16);

/// Value of `ST8S_SOCK_REVNAT`: the node address and port the application asked for, which
/// `recvmsg()` and `getpeername()` show it instead of the backend's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevNatValue {
    pub frontend_addr_be: u32,
    pub frontend_port_be: u16,
    pub _pad: u16,
}
assert_size!(SockRevNatValue, 8);

/// Key of `ST8S_SOCK_REVNAT6`: an IPv6 socket that socket-level steering sent to a backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevNatKey6 {
    pub cookie: u64,
    pub backend_addr: Addr6,
    pub backend_port_be: u16,
    pub _pad: u16,
    pub _pad2: u32,
}
assert_size!(SockRevNatKey6, 32);

/// Value of `ST8S_SOCK_REVNAT6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevNatValue6 {
    pub frontend_addr: Addr6,
    pub frontend_port_be: u16,
    pub _pad: u16,
}
assert_size!(SockRevNatValue6, 20);

/// Value of `ST8S_COUNTERS` (a per-CPU array indexed by port slot; `GLOBAL_COUNTER_SLOT` for the
/// rest). The names are the ones `st8s inspect` prints.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Delivered to the backend pod on this node.
    pub delivered_local: u64,
    /// Sent on to the node that owns the chosen backend.
    pub forwarded: u64,
    /// Backend replies rewritten to the frontend address and sent to the client.
    pub replied: u64,
    /// Steered port, but left to the kernel (no backends, or not addressed to this node).
    pub passed: u64,
    /// Looked forwarded (sent to another node's address) but not from a cluster node's MAC: left
    /// untouched to the kernel.
    pub untrusted_peer: u64,
    /// Dropped: forwarded to this node by a peer, but this node has no backend for the port.
    pub drop_no_local_backend: u64,
    /// Dropped: a checksum or redirect helper failed.
    pub drop_error: u64,
    /// Broadcast or multicast to a discovery port, copied to the local pod that declares it.
    pub discovered: u64,
    /// A connect or send from this node (a process or a pod) to a node address, sent to the
    /// backend pod on this node.
    pub socket_local: u64,
    /// The same, sent to another node that runs a backend.
    pub socket_remote: u64,
    /// Fragments after the first of a datagram st8s steered, given the verdict and translation
    /// of their first fragment.
    pub fragments: u64,
    /// ICMP errors about this port's flows (unreachable, time exceeded, parameter problem),
    /// translated like the flow they quote and sent on: a pod's to the client, a client's to
    /// the pod or to the node that serves the flow.
    pub icmp_errors: u64,
    /// Not tied to a port (the global slot): a fragment after the first whose first fragment
    /// st8s did not steer or has not seen (not a steered port, arrived out of order, or never
    /// came), left to the kernel.
    pub frag_untracked: u64,
    /// Not tied to a port: a fragment that reaches past 65,535 bytes (RFC 791's limit; the
    /// kernel drops the datagram), left to the kernel untranslated.
    pub frag_invalid: u64,
    /// Not tied to a port: an IPv6 packet with more extension headers before its TCP or UDP
    /// header than st8s walks (four, as Cilium), left to the kernel.
    pub ext_headers: u64,
    /// Not tied to a port: `st8s monitor` events lost because its ring buffer was full (the
    /// listener fell behind); the packets themselves were handled as usual.
    pub monitor_lost: u64,
}
assert_size!(Counters, 128);

impl Counters {
    pub fn add(&mut self, other: &Self) {
        self.delivered_local += other.delivered_local;
        self.forwarded += other.forwarded;
        self.replied += other.replied;
        self.passed += other.passed;
        self.untrusted_peer += other.untrusted_peer;
        self.drop_no_local_backend += other.drop_no_local_backend;
        self.drop_error += other.drop_error;
        self.discovered += other.discovered;
        self.socket_local += other.socket_local;
        self.socket_remote += other.socket_remote;
        self.fragments += other.fragments;
        self.icmp_errors += other.icmp_errors;
        self.frag_untracked += other.frag_untracked;
        self.frag_invalid += other.frag_invalid;
        self.ext_headers += other.ext_headers;
        self.monitor_lost += other.monitor_lost;
    }
}

/// Value of `ST8S_MONITOR` (a one-entry array): whether someone listens to `ST8S_EVENTS`. The
/// programs report while the kernel's monotonic clock (`bpf_ktime_get_ns`) is below `until_ns`;
/// `st8s monitor` pushes it a few seconds ahead while it runs and sets 0 when it stops, so a
/// listener that dies unannounced costs at most those seconds. The agent never writes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonitorCtl {
    pub until_ns: u64,
}
assert_size!(MonitorCtl, 8);

/// Bytes of `ST8S_EVENTS`, the ring buffer `st8s monitor` reads (a power-of-2 multiple of the
/// page size, as the kernel requires): about 5,000 events, a burst of some 2,500 requests and
/// their replies while the listener is descheduled.
pub const EVENTS_BYTES: u32 = 1024 * 1024;

/// How many bytes of a packet an event carries: every header st8s reads (Ethernet, IPv6 with
/// four 8-byte extension headers, TCP without options) fits.
pub const EVENT_SNAP: usize = 128;

/// `Event::kind`: what st8s did with a packet or a socket call. Each is one counter of
/// `Counters` (`EVENT_ICMP_ERROR` is `icmp_errors`, and so on); `EVENT_ANNOUNCED` counts as
/// `replied`.
pub const EVENT_LOCAL: u8 = 1;
pub const EVENT_FORWARDED: u8 = 2;
pub const EVENT_REPLIED: u8 = 3;
pub const EVENT_PASSED: u8 = 4;
pub const EVENT_UNTRUSTED_PEER: u8 = 5;
pub const EVENT_DROP_NO_LOCAL_BACKEND: u8 = 6;
pub const EVENT_DROP_ERROR: u8 = 7;
pub const EVENT_DISCOVERED: u8 = 8;
pub const EVENT_ANNOUNCED: u8 = 9;
pub const EVENT_SOCKET_LOCAL: u8 = 10;
pub const EVENT_SOCKET_REMOTE: u8 = 11;
pub const EVENT_ICMP_ERROR: u8 = 12;
pub const EVENT_FRAG_UNTRACKED: u8 = 13;
pub const EVENT_FRAG_INVALID: u8 = 14;

/// One record of `ST8S_EVENTS`: a steering decision, with the packet as st8s passed it on (after
/// its translation, if any) and what the translation replaced, which the packet no longer shows.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns` (CLOCK_MONOTONIC) when the program decided.
    pub ts_ns: u64,
    /// `EVENT_*`.
    pub kind: u8,
    /// 4 or 6; the family of `was` and `to`.
    pub family: u8,
    /// Socket events: the protocol (packets carry theirs).
    pub proto: u8,
    pub _pad: u8,
    /// The port's counter slot (`GLOBAL_COUNTER_SLOT` when not tied to a port).
    pub slot: u16,
    /// Bytes of `data` filled (0 for socket events).
    pub snap_len: u16,
    /// The packet's length on the wire.
    pub pkt_len: u32,
    /// The interface the program ran on (0: the uplink's XDP hook).
    pub ifindex: u32,
    /// What the translation replaced: the frontend a client sent to (local delivery, and the
    /// address a socket named); the pod's address (a reply, a pod's announcement, a discovery
    /// copy). IPv4 in the first word. All zeros when nothing was replaced.
    pub was: Addr6,
    pub was_port_be: u16,
    /// Socket events: the backend the socket now talks to (the pod, or the node that runs one).
    pub to_port_be: u16,
    pub to: Addr6,
    pub data: [u8; EVENT_SNAP],
}
assert_size!(Event, 192);

/// Flow hash shared by the programs and the agent's tests: all nodes use the same seed, so the
/// same flow maps to the same Maglev slot wherever it is computed. The frontend (the node's
/// address the flow arrived at) enters it too, though it is not part of the key.
pub const fn flow_hash(key: &FlowKey, frontend_addr_be: u32, seed: u32) -> u32 {
    let mut h = seed ^ 0x9e37_79b9;
    h = mix(h, key.client_addr_be);
    h = mix(h, frontend_addr_be);
    h = mix(
        h,
        ((key.client_port_be as u32) << 16) | key.frontend_port_be as u32,
    );
    h = mix(h, key.proto as u32);
    fmix(h)
}

/// [`flow_hash`] for an IPv6 flow: every word of both addresses enters it.
pub const fn flow_hash6(key: &FlowKey6, frontend_addr: &Addr6, seed: u32) -> u32 {
    let mut h = seed ^ 0x9e37_79b9;
    let mut i = 0;
    while i < 4 {
        h = mix(h, key.client_addr[i]);
        h = mix(h, frontend_addr[i]);
        i += 1;
    }
    h = mix(
        h,
        ((key.client_port_be as u32) << 16) | key.frontend_port_be as u32,
    );
    h = mix(h, key.proto as u32);
    fmix(h)
}

/// The hash a socket's new flow is placed with in the Maglev row. A socket's source port is not
/// known at `connect()`, so its cookie stands in for it: every send of one socket lands on one
/// backend while the row stays the same.
pub const fn socket_hash(
    cookie: u64,
    frontend_addr_be: u32,
    frontend_port_be: u16,
    proto: u8,
    seed: u32,
) -> u32 {
    let mut h = seed ^ 0x85eb_ca6b;
    h = mix(h, cookie as u32);
    h = mix(h, (cookie >> 32) as u32);
    h = mix(h, frontend_addr_be);
    h = mix(h, ((proto as u32) << 16) | frontend_port_be as u32);
    fmix(h)
}

const fn mix(h: u32, v: u32) -> u32 {
    let k = v
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

const fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: all of these are repr(C), made of integers and byte arrays, with explicit padding.
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for PortKey {}
    unsafe impl aya::Pod for PortInfo {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for MaglevRow {}
    unsafe impl aya::Pod for NodeInfo {}
    unsafe impl aya::Pod for MacKey {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowValue {}
    unsafe impl aya::Pod for RevNatKey {}
    unsafe impl aya::Pod for RevNatValue {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for MonitorCtl {}
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for Discovery {}
    unsafe impl aya::Pod for PodLink {}
    unsafe impl aya::Pod for DiscoveryPodKey {}
    unsafe impl aya::Pod for DiscoveryPodKey6 {}
    unsafe impl aya::Pod for SockRevNatKey {}
    unsafe impl aya::Pod for SockRevNatValue {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragValue {}
    unsafe impl aya::Pod for FlowKey6 {}
    unsafe impl aya::Pod for RevNatKey6 {}
    unsafe impl aya::Pod for RevNatValue6 {}
    unsafe impl aya::Pod for FragKey6 {}
    unsafe impl aya::Pod for SockRevNatKey6 {}
    unsafe impl aya::Pod for SockRevNatValue6 {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addr6_round_trips_and_keeps_packet_order() {
        let octets = [0xfd, 0, 0x77, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11];
        let a = addr6(octets);
        assert_eq!(addr6_octets(a), octets);
        assert_eq!(a[0].to_ne_bytes(), [0xfd, 0, 0x77, 0]);
    }

    #[test]
    fn flow_hash6_depends_on_every_address_word() {
        let k = FlowKey6 {
            client_addr: [1, 2, 3, 4],
            client_port_be: 9,
            frontend_port_be: 10,
            proto: 6,
            ..Default::default()
        };
        let frontend = [5, 6, 7, 8];
        let h = flow_hash6(&k, &frontend, 7);
        for i in 0..4 {
            let mut c = k;
            c.client_addr[i] ^= 0x100;
            assert_ne!(h, flow_hash6(&c, &frontend, 7));
            let mut f = frontend;
            f[i] ^= 0x100;
            assert_ne!(h, flow_hash6(&k, &f, 7));
        }
        assert_ne!(h, flow_hash6(&k, &frontend, 8));
    }

    #[test]
    fn flow_keys_of_layout_2_lose_only_their_frontend_address() {
        // As layout 2 laid them out: client, frontend, client port, frontend port, proto, pads.
        let mut v4 = [0u8; FLOW_KEY_V2_SIZE];
        v4[0..4].copy_from_slice(&[192, 168, 1, 50]);
        v4[4..8].copy_from_slice(&[192, 168, 1, 11]);
        v4[8..10].copy_from_slice(&40000u16.to_be_bytes());
        v4[10..12].copy_from_slice(&443u16.to_be_bytes());
        v4[12] = 6;
        let k = FlowKey::from_v2(v4);
        assert_eq!(k.client_addr_be.to_ne_bytes(), [192, 168, 1, 50]);
        assert_eq!(u16::from_be(k.client_port_be), 40000);
        assert_eq!(u16::from_be(k.frontend_port_be), 443);
        assert_eq!((k.proto, k._pad, k._pad2), (6, 0, 0));

        let mut v6 = [0u8; FLOW_KEY6_V2_SIZE];
        let client: [u8; 16] = core::array::from_fn(|i| 0xf0 + i as u8);
        v6[0..16].copy_from_slice(&client);
        v6[16..32].copy_from_slice(&[0xaa; 16]);
        v6[32..34].copy_from_slice(&5353u16.to_be_bytes());
        v6[34..36].copy_from_slice(&53u16.to_be_bytes());
        v6[36] = 17;
        let k = FlowKey6::from_v2(v6);
        assert_eq!(addr6_octets(k.client_addr), client);
        assert_eq!(u16::from_be(k.client_port_be), 5353);
        assert_eq!(u16::from_be(k.frontend_port_be), 53);
        assert_eq!(k.proto, 17);
    }

    #[test]
    fn port_key_is_network_order() {
        let k = PortKey::new(80, PROTO_TCP);
        assert_eq!(k.port_be.to_ne_bytes(), [0, 80]);
    }

    #[test]
    fn banks_do_not_overlap() {
        let a = PortInfo {
            slot: 3,
            bank: 0,
            ..Default::default()
        };
        let b = PortInfo {
            slot: 3,
            bank: 1,
            ..Default::default()
        };
        assert_eq!(a.backend_index(MAX_BACKENDS - 1) + 1, b.backend_index(0));
        assert_ne!(a.maglev_index(), b.maglev_index());
        let last = PortInfo {
            slot: (MAX_PORTS - 1) as u16,
            bank: 1,
            ..Default::default()
        };
        assert_eq!(last.maglev_index(), MAX_PORTS * BANKS - 1);
    }

    #[test]
    fn socket_hash_depends_on_seed_and_every_field() {
        let h = socket_hash(0x1_0000_0002, 3, 4, 6, 7);
        for other in [
            socket_hash(0x1_0000_0002, 3, 4, 6, 8),
            socket_hash(0x2_0000_0002, 3, 4, 6, 7),
            socket_hash(0x1_0000_0003, 3, 4, 6, 7),
            socket_hash(0x1_0000_0002, 9, 4, 6, 7),
            socket_hash(0x1_0000_0002, 3, 5, 6, 7),
            socket_hash(0x1_0000_0002, 3, 4, 17, 7),
        ] {
            assert_ne!(h, other);
        }
    }

    #[test]
    fn flow_hash_depends_on_seed_and_every_field() {
        let k = FlowKey {
            client_addr_be: 1,
            client_port_be: 3,
            frontend_port_be: 4,
            proto: 6,
            _pad: 0,
            _pad2: 0,
        };
        let h = flow_hash(&k, 2, 7);
        assert_ne!(h, flow_hash(&k, 2, 8));
        assert_ne!(h, flow_hash(&k, 9, 7));
        assert_ne!(
            h,
            flow_hash(
                &FlowKey {
                    client_addr_be: 9,
                    ..k
                },
                2,
                7
            )
        );
        assert_ne!(
            h,
            flow_hash(
                &FlowKey {
                    client_port_be: 9,
                    ..k
                },
                2,
                7
            )
        );
        assert_ne!(h, flow_hash(&FlowKey { proto: 17, ..k }, 2, 7));
        assert_eq!(h, flow_hash(&k, 2, 7));
    }
}
